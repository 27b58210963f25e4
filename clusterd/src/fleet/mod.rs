//! fleet: schedule units across the cluster and run them on each machine's init.
//!
//! Owns: reading fleet's KV state into one consistent view ([`registry`]), the meaning of `[X-Fleet]` and of
//! a unit's resource requests ([`units`]), the pure placement decision ([`scheduler`]), telling dead machines
//! from a slow store ([`liveness`]), the engine loop that tracks heartbeats on every member and plans only on
//! the Raft leader ([`engine`]), the agent that runs on every machine and reconciles with the local init
//! ([`agent`], [`init_client`]) and the agent's small HTTP surface for `fleetctl journal`/`status`
//! ([`http`]). Key layout and records are the shared contract in `keel_model::fleet`.
//! Does not: parse INI (keel-model does), run processes (init does), or touch the KV store except through
//! proposals (engine) and the keys API (agent, `fleetctl`).

pub mod agent;
pub mod engine;
pub mod http;
pub mod init_client;
pub mod liveness;
pub mod registry;
pub mod scheduler;
pub mod units;

use std::time::Duration;

/// How often an agent refreshes its machine record.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Longest one heartbeat write may take. A write stuck in an election (or forwarded to a frozen leader) is
/// abandoned after this and retried, so a healthy machine lands a heartbeat soon after a new leader is elected.
/// Far above a write's normal latency (milliseconds; tens under heavy load); an abandoned write that does
/// commit later is harmless (it only refreshes the record).
pub const HEARTBEAT_WRITE_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause before retrying a heartbeat write that failed or timed out (e.g. refused while no leader is known):
/// short, so the first heartbeat after an election lands almost at once.
pub const HEARTBEAT_RETRY: Duration = Duration::from_millis(100);
/// Least healthy-store time every machine gets to land a heartbeat after a member becomes the Raft leader.
/// It must cover the worst case for a healthy agent: a write started just before the election hangs on the
/// old leader for [`HEARTBEAT_WRITE_TIMEOUT`], the retry follows [`HEARTBEAT_RETRY`] later and must commit
/// under the new leader; one [`HEARTBEAT_INTERVAL`] on top is the slack for that commit and the engine's tick.
pub const LEADER_CHANGE_GRACE: Duration =
    HEARTBEAT_WRITE_TIMEOUT.saturating_add(HEARTBEAT_RETRY).saturating_add(HEARTBEAT_INTERVAL);
/// A machine whose heartbeat made no progress for this long, while other machines' heartbeats did, is dead.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(2);
/// TTL of the machine record in the KV store (whole seconds): removes records of machines gone for good.
pub const RECORD_TTL_SECS: u64 = 3;
/// How often the engine looks at the cluster.
pub const ENGINE_TICK: Duration = Duration::from_millis(200);
/// How often the agent reconciles with init.
pub const AGENT_TICK: Duration = Duration::from_millis(250);

/// A stable 64-bit hash of a unit text, as hex (what `UnitState::hash` carries).
pub fn text_hash(text: &str) -> String {
    format!("{:016x}", crate::raft::fnv64(&[text]))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
