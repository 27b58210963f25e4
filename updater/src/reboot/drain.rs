//! Draining a machine's fleet units before it reboots.
//!
//! Owns: writing and deleting this machine's drain marker (`/_keel/fleet/drain/<machine-id>`, a
//! [`keel_model::fleet::DrainRecord`]) and reading fleet's units, schedule and states from the KV to ask
//! [`keel_model::fleet::DrainProgress::next`] what is still pending. Does not: move units (fleet's engine does,
//! as long as the marker exists) or decide how long to wait (the parent module bounds it).

use std::collections::BTreeMap;

use keel_model::fleet::{
    drain_key, DrainProgress, DrainRecord, UnitRecord, UnitState, SCHEDULE_DIR,
    STATES_DIR, UNITS_DIR,
};

use super::kv::{Kv, KvError};

/// Puts the drain marker on `machine_id`: fleet stops scheduling onto it and moves its units away.
pub fn begin(kv: &Kv, machine_id: &str, reason: &str, now: u64) -> Result<(), KvError> {
    let rec = DrainRecord {
        reason: reason.to_string(),
        since: now,
    };
    let json = serde_json::to_string(&rec).unwrap_or_default();
    kv.set(&drain_key(machine_id), &json).map(|_| ())
}

/// Removes the drain marker (units do not move back). Ok(false) if there was none.
pub fn end(kv: &Kv, machine_id: &str) -> Result<bool, KvError> {
    kv.delete(&drain_key(machine_id))
}

/// Whether the marker is there.
pub fn is_draining(kv: &Kv, machine_id: &str) -> Result<bool, KvError> {
    Ok(kv.get(&drain_key(machine_id))?.is_some())
}

/// The last path segment of `key` if `key` is exactly one level below `dir`.
fn child_name<'a>(dir: &str, key: &'a str) -> Option<&'a str> {
    let rest = key.strip_prefix(dir)?.strip_prefix('/')?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

/// Reads fleet's records and asks the contract's pure function which units still have to move; `before` is
/// the previous look (units pending then stay pending until they run elsewhere).
pub fn progress(kv: &Kv, machine_id: &str, before: &DrainProgress) -> Result<DrainProgress, KvError> {
    let units: Vec<UnitRecord> = kv
        .list(UNITS_DIR)?
        .into_iter()
        .filter_map(|n| serde_json::from_str(&n.value).ok())
        .collect();
    let schedule: BTreeMap<String, String> = kv
        .list(SCHEDULE_DIR)?
        .into_iter()
        .filter_map(|n| {
            Some((
                child_name(SCHEDULE_DIR, &n.key)?.to_string(),
                n.value.trim().to_string(),
            ))
        })
        .collect();
    let states: BTreeMap<String, UnitState> = kv
        .list(STATES_DIR)?
        .into_iter()
        .filter_map(|n| {
            let name = child_name(STATES_DIR, &n.key)?.to_string();
            Some((name, serde_json::from_str(&n.value).ok()?))
        })
        .collect();
    Ok(before.next(machine_id, &units, &schedule, &states))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_direct_children_are_non_global_states() {
        assert_eq!(
            child_name(STATES_DIR, "/_keel/fleet/states/web.service"),
            Some("web.service")
        );
        assert_eq!(
            child_name(STATES_DIR, "/_keel/fleet/states/g.service/m1"),
            None
        );
        assert_eq!(child_name(STATES_DIR, "/_keel/fleet/statesx/a"), None);
    }
}
