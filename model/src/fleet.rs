//! The fleet contract: where fleet keeps its state in clusterd's KV store, the JSON records stored there, and
//! the pure question "is this machine drained yet?" ([`drain_progress`]).
//!
//! Owns: the key layout under the hidden prefix `/_keel/fleet/` (constants and key functions), the serde types
//! of machine, unit, state and drain records, and recognising a `Global=true` unit from its text. Shared by
//! clusterd's fleet (engine, agent, `fleetctl`) and the updater's reboot manager.
//! Does not: talk to the KV store, schedule anything, or interpret `[X-Fleet]` beyond `Global=` (clusterd's
//! `fleet::units` owns the rest). Pure.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ini::IniFile;
use crate::values::parse_bool;

/// Every fleet key lives below this hidden (leading `_`) directory.
pub const PREFIX: &str = "/_keel/fleet";
/// `<MACHINES_DIR>/<machine-id>`: [`MachineRecord`], written by the agent with a TTL (its heartbeat).
pub const MACHINES_DIR: &str = "/_keel/fleet/machines";
/// `<UNITS_DIR>/<unit-name>`: [`UnitRecord`], written by `fleetctl`.
pub const UNITS_DIR: &str = "/_keel/fleet/units";
/// `<SCHEDULE_DIR>/<unit-name>`: the machine id the engine assigned (plain string; Global units have none).
pub const SCHEDULE_DIR: &str = "/_keel/fleet/schedule";
/// `<STATES_DIR>/<unit-name>` or `<STATES_DIR>/<unit-name>/<machine-id>` (Global units): [`UnitState`].
pub const STATES_DIR: &str = "/_keel/fleet/states";
/// `<DRAIN_DIR>/<machine-id>`: [`DrainRecord`]; present while the machine is being drained.
pub const DRAIN_DIR: &str = "/_keel/fleet/drain";

/// `<ROLLOUT_DIR>/<unit-name>`: [`Rollout`] while `fleetctl replace` rolls a Global unit machine by machine.
pub const ROLLOUT_DIR: &str = "/_keel/fleet/rollout";

/// Key of a Global unit's rollout.
pub fn rollout_key(unit: &str) -> String {
    format!("{ROLLOUT_DIR}/{unit}")
}

/// Key of a machine's record.
pub fn machine_key(machine_id: &str) -> String {
    format!("{MACHINES_DIR}/{machine_id}")
}

/// Key of a unit's record.
pub fn unit_key(unit: &str) -> String {
    format!("{UNITS_DIR}/{unit}")
}

/// Key of a unit's assignment.
pub fn schedule_key(unit: &str) -> String {
    format!("{SCHEDULE_DIR}/{unit}")
}

/// Key of a (non-Global) unit's current state.
pub fn state_key(unit: &str) -> String {
    format!("{STATES_DIR}/{unit}")
}

/// Key of a Global unit's current state on one machine.
pub fn global_state_key(unit: &str, machine_id: &str) -> String {
    format!("{STATES_DIR}/{unit}/{machine_id}")
}

/// Key of a machine's drain marker.
pub fn drain_key(machine_id: &str) -> String {
    format!("{DRAIN_DIR}/{machine_id}")
}

/// What a machine offers to the scheduler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// CPUs × 1000.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// `/_keel/fleet/machines/<id>`: one machine as its agent publishes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    /// The machine id (`/etc/machine-id` unless overridden).
    pub id: String,
    pub hostname: String,
    /// IP addresses the machine is reachable on.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// From cloud-config (`fleet.metadata`, `METADATA=` in fleet.env) or `--fleet-metadata`.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub capacity: Capacity,
    /// OS version, or empty.
    #[serde(default)]
    pub version: String,
    /// Extension beyond the agreed fields: the machine's clusterd client URL, where its agent serves unit
    /// journals (`fleetctl journal`). Empty when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
}

/// Desired state of a unit in the cluster (fleet's three states).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    /// Known to the cluster, not scheduled.
    #[default]
    Inactive,
    /// Scheduled onto a machine and its file written there, not started.
    Loaded,
    /// Scheduled and running.
    Launched,
}

impl DesiredState {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Inactive => "inactive",
            DesiredState::Loaded => "loaded",
            DesiredState::Launched => "launched",
        }
    }
}

/// `/_keel/fleet/units/<name>`: a submitted unit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitRecord {
    pub name: String,
    /// The unit file, verbatim (an instance carries its template's text).
    pub text: String,
    pub desired: DesiredState,
}

impl UnitRecord {
    /// `[X-Fleet] Global=true` (the last assignment wins; unparsable text is not Global).
    pub fn is_global(&self) -> bool {
        is_global_text(&self.text)
    }
}

/// `[X-Fleet] Global=` of a unit text.
pub fn is_global_text(text: &str) -> bool {
    let Ok(ini) = IniFile::parse(Path::new("fleet-unit"), text) else {
        return false;
    };
    ini.section("X-Fleet")
        .filter(|e| e.key == "Global")
        .last()
        .and_then(|e| parse_bool(&e.value))
        .unwrap_or(false)
}

/// `/_keel/fleet/states/<unit>[/<machine>]`: what the agent running the unit last saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitState {
    pub machine: String,
    /// init's `load`: `loaded`, `error`, or `not-found`.
    pub load: String,
    /// init's `active`: `inactive`, `activating`, `active`, `deactivating`, `failed`.
    pub active: String,
    /// init's sub-state (`running`, `dead`, …).
    pub sub: String,
    /// Unix seconds of this report.
    pub updated: u64,
    /// Extension beyond the agreed fields: a hash of the unit text the agent runs, so `fleetctl replace` can
    /// tell the new text is live. Empty when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

/// `/_keel/fleet/rollout/<unit>`: a Global unit being replaced one machine at a time. Machines not yet in
/// `done` keep running `old`; the others run the unit record's (new) text. Deleted when the roll finishes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub old: String,
    #[serde(default)]
    pub done: Vec<String>,
}

/// `/_keel/fleet/drain/<machine-id>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRecord {
    pub reason: String,
    /// Unix seconds when the drain began.
    pub since: u64,
}

/// What still keeps a machine from being drained.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainProgress {
    /// Non-Global launched units that were on the machine and are not yet both scheduled elsewhere and
    /// reported active there, sorted. Empty = drained.
    pub pending: Vec<String>,
}

impl DrainProgress {
    pub fn is_drained(&self) -> bool {
        self.pending.is_empty()
    }

    /// The next look at a drain that is being waited for; `self` is what was pending at the previous look.
    /// A unit pending then stays pending until it runs elsewhere: once the machine it moved to reports it in
    /// any state (e.g. `inactive`, just before starting it), the records no longer name this machine, and
    /// [`drain_progress`] alone would count the unit as moved before it runs.
    pub fn next(
        &self,
        machine_id: &str,
        units: &[UnitRecord],
        schedule: &BTreeMap<String, String>,
        states: &BTreeMap<String, UnitState>,
    ) -> DrainProgress {
        let mut p = drain_progress(machine_id, units, schedule, states);
        let still_launched = |name: &str| {
            units.iter().any(|u| u.name == name && u.desired == DesiredState::Launched && !u.is_global())
        };
        for name in &self.pending {
            if still_launched(name) && !moved(machine_id, name, schedule, states) {
                p.pending.push(name.clone());
            }
        }
        p.pending.sort();
        p.pending.dedup();
        p
    }
}

/// Whether `name` is scheduled on a machine other than `machine_id` and that machine reports it active.
fn moved(machine_id: &str, name: &str, schedule: &BTreeMap<String, String>, states: &BTreeMap<String, UnitState>) -> bool {
    schedule
        .get(name)
        .is_some_and(|m| m != machine_id && states.get(name).is_some_and(|s| s.machine == *m && s.active == "active"))
}

/// Which of `machine_id`'s units still have to move. A unit counts as "on the machine" when it is scheduled
/// there or its (non-Global) state says it runs there. It is done once it is scheduled on another machine
/// and that machine reports it `active`. Global and non-launched units never block a drain.
///
/// `schedule` maps unit name → machine id; `states` maps unit name → its (non-Global) [`UnitState`].
pub fn drain_progress(
    machine_id: &str,
    units: &[UnitRecord],
    schedule: &BTreeMap<String, String>,
    states: &BTreeMap<String, UnitState>,
) -> DrainProgress {
    let mut pending: Vec<String> = units
        .iter()
        .filter(|u| u.desired == DesiredState::Launched && !u.is_global())
        .filter(|u| {
            let sched = schedule.get(&u.name).map(String::as_str);
            let state = states.get(&u.name);
            let was_here = sched == Some(machine_id) || state.is_some_and(|s| s.machine == machine_id);
            was_here && !moved(machine_id, &u.name, schedule, states)
        })
        .map(|u| u.name.clone())
        .collect();
    pending.sort();
    DrainProgress { pending }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str, desired: DesiredState, global: bool) -> UnitRecord {
        let x = if global { "[X-Fleet]\nGlobal=true\n" } else { "" };
        UnitRecord {
            name: name.into(),
            text: format!("[Service]\nExecStart=/bin/sleep 1\n{x}"),
            desired,
        }
    }

    fn state(machine: &str, active: &str) -> UnitState {
        UnitState {
            machine: machine.into(),
            active: active.into(),
            ..Default::default()
        }
    }

    fn map<V: Clone>(pairs: &[(&str, V)]) -> BTreeMap<String, V> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn keys_follow_the_contract() {
        assert_eq!(machine_key("m1"), "/_keel/fleet/machines/m1");
        assert_eq!(schedule_key("a.service"), "/_keel/fleet/schedule/a.service");
        assert_eq!(
            global_state_key("g.service", "m1"),
            "/_keel/fleet/states/g.service/m1"
        );
        assert_eq!(drain_key("m1"), "/_keel/fleet/drain/m1");
    }

    #[test]
    fn global_is_read_from_x_fleet() {
        assert!(is_global_text("[X-Fleet]\nGlobal=yes\n"));
        assert!(!is_global_text("[X-Fleet]\nGlobal=true\nGlobal=false\n"));
        assert!(!is_global_text("[Service]\nGlobal=true\n"));
        assert!(!is_global_text("not ini"));
    }

    #[test]
    fn drained_only_when_moved_and_active_elsewhere() {
        use DesiredState::*;
        let units = vec![
            unit("a.service", Launched, false),
            unit("b.service", Launched, false),
            unit("c.service", Launched, false),
            unit("g.service", Launched, true),
            unit("l.service", Loaded, false),
            unit("other.service", Launched, false),
        ];
        let schedule = map(&[
            ("a.service", "m1".to_string()),
            ("b.service", "m2".to_string()),
            ("c.service", "m2".to_string()),
            ("l.service", "m1".to_string()),
            ("other.service", "m3".to_string()),
        ]);
        let states = map(&[
            ("a.service", state("m1", "active")),
            ("b.service", state("m2", "active")),
            ("c.service", state("m1", "active")),
            ("other.service", state("m3", "activating")),
        ]);
        let p = drain_progress("m1", &units, &schedule, &states);
        // a: still scheduled here; c: scheduled elsewhere but m2 has not reported it yet.
        assert_eq!(p.pending, vec!["a.service", "c.service"]);
        let states2 = map(&[
            ("a.service", state("m3", "active")),
            ("b.service", state("m2", "active")),
            ("c.service", state("m2", "active")),
        ]);
        let schedule2 = map(&[
            ("a.service", "m3".to_string()),
            ("b.service", "m2".to_string()),
            ("c.service", "m2".to_string()),
        ]);
        assert!(drain_progress("m1", &units, &schedule2, &states2).is_drained());
    }

    #[test]
    fn a_unit_pending_at_the_last_look_stays_pending_until_it_runs_elsewhere() {
        let units = vec![unit("a.service", DesiredState::Launched, false), unit("gone.service", DesiredState::Inactive, false)];
        let before = DrainProgress { pending: vec!["a.service".into(), "gone.service".into()] };
        let schedule = map(&[("a.service", "m2".to_string())]);
        // m2 has the file and reports it inactive, just before starting it: no record names m1 any more.
        let starting = map(&[("a.service", state("m2", "inactive"))]);
        assert!(drain_progress("m1", &units, &schedule, &starting).is_drained());
        let p = before.next("m1", &units, &schedule, &starting);
        assert_eq!(p.pending, vec!["a.service"], "a.service is not running anywhere yet; gone.service was stopped");
        let running = map(&[("a.service", state("m2", "active"))]);
        assert!(p.next("m1", &units, &schedule, &running).is_drained());
    }
}
