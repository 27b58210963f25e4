//! The etcd v2 key space as a pure, deterministic state machine.
//!
//! Owns: [`store::Store`] (tree, indexes, TTLs, watch history), [`error::EtcdError`] (etcd's error codes) and
//! the RFC 3339 time format etcd prints. Does not: replicate, persist or serve anything — `raft` feeds it
//! committed commands, `api` renders its events.

pub mod error;
pub mod store;
pub mod time;

pub use error::EtcdError;
pub use store::{Event, KvOp, NodeView, OpKind, Store, WriteOk};
