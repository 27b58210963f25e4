//! Keel's cluster store: a Raft-replicated key-value store speaking etcd's v2 keys API.
//!
//! Layout: [`kv`] is the pure etcd-v2 state machine; [`raft`] wires it to openraft with redb storage and an
//! HTTP peer transport; [`api`] serves the client API (`/v2/keys`, `/v2/members`, `/health`, `/version`,
//! `/metrics`); [`server`] assembles a member; [`discovery`] forms a cluster from a discovery token; [`client`] is a small blocking HTTP client used by
//! `clusterctl` and the tests.

pub mod api;
pub mod client;
pub mod discovery;
pub mod kv;
pub mod raft;
pub mod server;
