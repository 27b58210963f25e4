//! Raft wiring: the openraft type configuration, the replicated command and its result, member identity.
//!
//! Owns: [`TypeConfig`], [`Request`] (what goes through the log), [`Response`], [`Member`] (a node's name and
//! peer URL as kept in the Raft membership) and member-id derivation. Submodules own storage (`storage`, redb)
//! and the peer transport client (`network`). Does not: serve HTTP (see `server`) or interpret keys (see `kv`).

pub mod codec;
pub mod network;
pub mod storage;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::kv::{EtcdError, KvOp, WriteOk};

/// A member as recorded in the Raft membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Human name (`--name`); may be empty for a member added by URL that has not started yet.
    pub name: String,
    /// Peer URL, e.g. `http://127.0.0.1:2380`.
    pub peer_url: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.peer_url)
    }
}

/// A command replicated through the Raft log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Request {
    /// A keys-API write; `now` is the proposer's wall clock (Unix ns), from which TTLs are computed.
    Kv {
        /// The write.
        op: KvOp,
        /// Proposer's clock.
        now: i64,
    },
    /// Expire every key whose expiration is at or before `now` (proposed by the leader).
    Expire {
        /// Cutoff (leader's clock).
        now: i64,
    },
    /// A member publishes its name and client URLs (like etcd's member attributes).
    Attrs {
        /// Member id.
        id: u64,
        /// Name.
        name: String,
        /// Client URLs.
        client_urls: Vec<String>,
    },
    /// Several concurrent proposals in one log entry (group commit above openraft, which flushes its log
    /// once per entry); applied in order, each with its own store index.
    /// Shared, so that the copies openraft takes of an entry (for each replication stream, for applying) do not copy
    /// every value in it.
    Batch(std::sync::Arc<[Request]>),
}

/// The result of applying a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Response {
    /// Result of a keys write (boxed: it is many times the size of the other variants, and responses are
    /// moved through openraft's channels).
    Kv(Box<Result<WriteOk, EtcdError>>),
    /// Number of keys expired.
    Expired(usize),
    /// Nothing to report (blank entries, membership, attrs).
    Done,
    /// One response per request of a [`Request::Batch`].
    Batch(Vec<Response>),
}

openraft::declare_raft_types!(
    /// Keel's openraft type configuration.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft handle type.
pub type Raft = openraft::Raft<TypeConfig>;

/// FNV-1a 64-bit.
pub fn fnv64(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.as_bytes().iter().chain(std::iter::once(&0u8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A member's id: derived from its peer URL and the cluster token (as etcd derives ids from peer URLs).
pub fn member_id(peer_url: &str, token: &str) -> u64 {
    let id = fnv64(&[peer_url.trim_end_matches('/'), token]);
    if id == 0 {
        1
    } else {
        id
    }
}
