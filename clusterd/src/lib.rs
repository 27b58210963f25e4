//! Keel's cluster store: a Raft-replicated key-value store speaking etcd's v2 keys API.
//!
//! Layout: [`kv`] is the pure etcd-v2 state machine; [`raft`] wires it to openraft with redb storage and an
//! HTTP peer transport; [`api`] serves the client API (`/v2/keys`, `/v2/members`, `/health`, `/version`,
//! `/metrics`); [`server`] assembles a member; [`connections`] budgets the connections each kind of client may hold open; [`discovery`] forms a cluster from a discovery token; [`client`] is a small blocking HTTP client used by
//! `clusterctl` and the tests. [`fleet`] schedules units across the cluster (engine on the leader, agent on every
//! member talking to the local init). [`fleetlock`] serves FleetLock (`/v1/pre-reboot`, `/v1/steady-state`) on the
//! reboot-lock semaphore.

pub mod api;
pub mod client;
pub mod connections;
pub mod discovery;
pub mod fleetlock;
pub mod fleet;
pub mod kv;
pub mod logging;
pub mod raft;
pub mod server;
