//! The placement decision: given machines, units and the current schedule, which unit goes where.
//!
//! Owns: [`plan`], a pure function. Rules, in order:
//! 1. Units keep their machine while it is not dead, their constraints still hold there and it is not
//!    draining (a draining machine keeps a unit that fits nowhere else). Nothing moves for balance.
//! 2. Units to place (new, from a dead machine, violating constraints, leaving a draining machine) are taken
//!    in name order, `MachineOf=` dependents after what they follow. Candidates are live, non-draining
//!    machines that satisfy `MachineID=`, `MachineMetadata=`, `MachineOf=`, `Conflicts=` (both ways),
//!    `Replaces=` (a machine whose unit replaces this one is refused) and declared requests
//!    (`MemoryMax=`, `CPUQuota=`) within free capacity.
//! 3. The best candidate: the one running a unit this one `Replaces=`, then the most free capacity (the
//!    smaller of free CPU and free memory fractions, counting request-less units at
//!    [`DEFAULT_REQUEST`](super::units::DEFAULT_REQUEST)), then the fewest units, then the smallest id.
//!
//! Global units are not scheduled (no entry); they count on every machine they match.
//! Does not: read the store, judge liveness, or write anything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use keel_model::fleet::{Capacity, DesiredState};

use super::units::{glob_match, FleetSpec, Resources};

/// Whether a machine can take new units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineState {
    Alive,
    /// Takes nothing new; its launched units move if they fit elsewhere.
    Draining,
}

/// A machine with a current record, not declared dead.
#[derive(Debug, Clone)]
pub struct MachineInfo {
    pub metadata: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub state: MachineState,
}

/// A unit that parsed.
#[derive(Debug, Clone)]
pub struct UnitInfo {
    pub desired: DesiredState,
    pub spec: Arc<FleetSpec>,
}

/// What the engine is to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Assign { unit: String, machine: String },
    Unassign { unit: String },
}

/// Everything [`plan`] looks at.
#[derive(Debug, Clone, Default)]
pub struct Input {
    /// Live machines by id.
    pub machines: BTreeMap<String, MachineInfo>,
    /// Machines declared dead.
    pub dead: BTreeSet<String>,
    /// Units that parsed (templates excluded).
    pub units: BTreeMap<String, UnitInfo>,
    /// Units whose text does not parse: their entries are left alone.
    pub broken: BTreeSet<String>,
    /// Current schedule, unit → machine.
    pub schedule: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct Load {
    specs: Vec<Arc<FleetSpec>>,
    scored: Resources,
    declared: Resources,
}

impl Load {
    fn add(&mut self, spec: &Arc<FleetSpec>) {
        let s = spec.score_request();
        self.scored.cpu_millis += s.cpu_millis;
        self.scored.memory_bytes += s.memory_bytes;
        self.declared.cpu_millis += spec.request.cpu_millis;
        self.declared.memory_bytes += spec.request.memory_bytes;
        self.specs.push(spec.clone());
    }
}

struct Planner<'a> {
    input: &'a Input,
    loads: BTreeMap<String, Load>,
    placed: BTreeMap<String, String>,
}

/// Compute the schedule changes. Deterministic: the same input gives the same changes.
pub fn plan(input: &Input) -> Vec<Change> {
    let mut p = Planner { input, loads: BTreeMap::new(), placed: BTreeMap::new() };
    p.place_globals();
    let (mut queue, fallback) = p.keep_current();
    p.enforce_machine_of(&mut queue);
    p.place_queue(queue, &fallback);
    p.diff()
}

impl<'a> Planner<'a> {
    fn active_units(&self) -> impl Iterator<Item = (&'a String, &'a UnitInfo)> {
        self.input.units.iter().filter(|(_, u)| u.desired != DesiredState::Inactive)
    }

    fn place_globals(&mut self) {
        for (id, m) in &self.input.machines {
            let load = self.loads.entry(id.clone()).or_default();
            for (_, u) in self.input.units.iter().filter(|(_, u)| u.desired != DesiredState::Inactive) {
                if u.spec.global && u.spec.matches_machine(id, &m.metadata) {
                    load.add(&u.spec);
                }
            }
        }
    }

    /// Keep what may stay; return the units to place (name order) and drain fallbacks (unit → old machine).
    fn keep_current(&mut self) -> (Vec<String>, BTreeMap<String, String>) {
        let mut queue = Vec::new();
        let mut fallback = BTreeMap::new();
        let units: Vec<(&String, &UnitInfo)> = self.active_units().filter(|(_, u)| !u.spec.global).collect();
        for (name, u) in units {
            let Some(m) = self.input.schedule.get(name) else {
                queue.push(name.clone());
                continue;
            };
            if self.input.dead.contains(m) {
                queue.push(name.clone());
                continue;
            }
            let Some(info) = self.input.machines.get(m) else {
                // Not dead yet, just no record (expired during a stall): leave it alone.
                self.placed.insert(name.clone(), m.clone());
                continue;
            };
            if !self.fits(&u.spec, m, info, false) {
                queue.push(name.clone());
                continue;
            }
            if info.state == MachineState::Draining && u.desired == DesiredState::Launched {
                fallback.insert(name.clone(), m.clone());
                queue.push(name.clone());
                continue;
            }
            self.put(name, m, &u.spec);
        }
        (queue, fallback)
    }

    fn put(&mut self, name: &str, machine: &str, spec: &Arc<FleetSpec>) {
        self.placed.insert(name.to_string(), machine.to_string());
        self.loads.entry(machine.to_string()).or_default().add(spec);
    }

    fn remove(&mut self, name: &str) {
        if let Some(m) = self.placed.remove(name) {
            if let Some(load) = self.loads.get_mut(&m) {
                let mut fresh = Load::default();
                for s in load.specs.iter().filter(|s| s.name != name) {
                    fresh.add(s);
                }
                *load = fresh;
            }
        }
    }

    /// Kept units whose `MachineOf=` targets are not on their machine are re-placed, until stable.
    fn enforce_machine_of(&mut self, queue: &mut Vec<String>) {
        loop {
            let broken: Vec<String> = self
                .placed
                .iter()
                .filter(|(name, m)| {
                    self.input.units.get(*name).is_some_and(|u| !u.spec.machine_of.is_empty() && !self.machine_of_ok(&u.spec, m))
                })
                .map(|(n, _)| n.clone())
                .collect();
            if broken.is_empty() {
                return;
            }
            for n in broken {
                self.remove(&n);
                queue.push(n);
            }
        }
    }

    fn machine_of_ok(&self, spec: &FleetSpec, machine: &str) -> bool {
        spec.machine_of.iter().all(|t| {
            self.placed.get(t).is_some_and(|m| m == machine)
                || self.loads.get(machine).is_some_and(|l| l.specs.iter().any(|s| s.global && &s.name == t))
        })
    }

    fn place_queue(&mut self, mut queue: Vec<String>, fallback: &BTreeMap<String, String>) {
        queue.sort();
        queue.dedup();
        // Units without MachineOf first, so targets are placed before their followers.
        queue.sort_by_key(|n| self.input.units.get(n).is_some_and(|u| !u.spec.machine_of.is_empty()));
        loop {
            let mut progress = false;
            let mut rest = Vec::new();
            for name in queue {
                let Some(u) = self.input.units.get(&name) else { continue };
                match self.best_machine(&u.spec) {
                    Some(m) => {
                        self.put(&name, &m, &u.spec);
                        progress = true;
                    }
                    None => rest.push(name),
                }
            }
            queue = rest;
            if !progress || queue.is_empty() {
                break;
            }
        }
        for name in queue {
            if let (Some(m), Some(u)) = (fallback.get(&name), self.input.units.get(&name)) {
                self.put(&name, &m.clone(), &u.spec);
            }
        }
    }

    fn fits(&self, spec: &FleetSpec, id: &str, info: &MachineInfo, check_machine_of: bool) -> bool {
        if !spec.matches_machine(id, &info.metadata) {
            return false;
        }
        if check_machine_of && !self.machine_of_ok(spec, id) {
            return false;
        }
        let Some(load) = self.loads.get(id) else { return true };
        let clash = load.specs.iter().any(|other| {
            other.name != spec.name
                && (spec.conflicts_with(other) || other.replaces.iter().any(|g| glob_match(g, &spec.name)))
        });
        if clash {
            return false;
        }
        let cap = info.capacity;
        let over = |req: u64, used: u64, cap: u64| req > 0 && used + req > cap;
        !(over(spec.request.cpu_millis, load.declared.cpu_millis, cap.cpu_millis)
            || over(spec.request.memory_bytes, load.declared.memory_bytes, cap.memory_bytes))
    }

    fn best_machine(&self, spec: &FleetSpec) -> Option<String> {
        self.input
            .machines
            .iter()
            .filter(|(_, info)| info.state == MachineState::Alive)
            .filter(|(id, info)| self.fits(spec, id, info, true))
            .map(|(id, info)| {
                let load = self.loads.get(id);
                let replaces_here = load.is_some_and(|l| {
                    l.specs.iter().any(|s| spec.replaces.iter().any(|g| glob_match(g, &s.name)))
                });
                let score = free_permille(info.capacity, load.map(|l| l.scored).unwrap_or_default(), spec.score_request());
                let count = load.map(|l| l.specs.len()).unwrap_or(0);
                ((!replaces_here, std::cmp::Reverse(score), count, id.clone()), id)
            })
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, id)| id.clone())
    }

    fn diff(&self) -> Vec<Change> {
        let mut out = Vec::new();
        for unit in self.input.schedule.keys() {
            if self.input.broken.contains(unit) {
                continue;
            }
            if !self.placed.contains_key(unit) {
                out.push(Change::Unassign { unit: unit.clone() });
            }
        }
        for (unit, m) in &self.placed {
            if self.input.schedule.get(unit) != Some(m) {
                out.push(Change::Assign { unit: unit.clone(), machine: m.clone() });
            }
        }
        out
    }
}

/// Free fraction (‰) of the scarcer resource after adding `req`.
fn free_permille(cap: Capacity, used: Resources, req: Resources) -> i64 {
    let frac = |cap: u64, used: u64| -> i64 {
        if cap == 0 {
            return 0;
        }
        let cap = i128::from(cap);
        ((cap - i128::from(used)) * 1000 / cap) as i64
    };
    frac(cap.cpu_millis, used.cpu_millis + req.cpu_millis).min(frac(cap.memory_bytes, used.memory_bytes + req.memory_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::units::parse_unit;

    const CAP: Capacity = Capacity { cpu_millis: 2000, memory_bytes: 4 << 30 };

    fn machines(ids: &[(&str, &str)]) -> BTreeMap<String, MachineInfo> {
        ids.iter()
            .map(|(id, md)| {
                let metadata = crate::fleet::units::parse_metadata(md).expect("metadata");
                (id.to_string(), MachineInfo { metadata, capacity: CAP, state: MachineState::Alive })
            })
            .collect()
    }

    fn unit(name: &str, xfleet: &str) -> (String, UnitInfo) {
        let text = format!("[Service]\nExecStart=/bin/sleep 1000\n{xfleet}");
        let spec = parse_unit(name, &text).expect("unit parses");
        (name.to_string(), UnitInfo { desired: DesiredState::Launched, spec: Arc::new(spec) })
    }

    fn apply(input: &mut Input) -> Vec<Change> {
        let changes = plan(input);
        for c in &changes {
            match c {
                Change::Assign { unit, machine } => {
                    input.schedule.insert(unit.clone(), machine.clone());
                }
                Change::Unassign { unit } => {
                    input.schedule.remove(unit);
                }
            }
        }
        changes
    }

    fn counts(input: &Input) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for m in input.schedule.values() {
            *c.entry(m.clone()).or_default() += 1;
        }
        c
    }

    #[test]
    fn instances_spread_evenly_and_ties_go_to_the_smallest_id() {
        let mut input = Input { machines: machines(&[("a", ""), ("b", ""), ("c", "")]), ..Default::default() };
        input.units = (1..=6).map(|i| unit(&format!("web@{i}.service"), "")).collect();
        apply(&mut input);
        assert_eq!(counts(&input).values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
        assert_eq!(input.schedule["web@1.service"], "a");
        assert!(plan(&input).is_empty(), "a settled schedule is stable");
    }

    #[test]
    fn constraints_are_honoured() {
        let mut input = Input { machines: machines(&[("a", "region=eu"), ("b", "region=us,disk=ssd"), ("c", "region=us")]), ..Default::default() };
        input.units = [
            unit("db.service", "[X-Fleet]\nMachineMetadata=disk=ssd\n"),
            unit("app.service", "[X-Fleet]\nMachineOf=db.service\n"),
            unit("x1.service", "[X-Fleet]\nConflicts=x*.service\nMachineMetadata=region=us\n"),
            unit("x2.service", "[X-Fleet]\nConflicts=x*.service\nMachineMetadata=region=us\n"),
            unit("pin.service", "[X-Fleet]\nMachineID=c\n"),
        ]
        .into_iter()
        .collect();
        apply(&mut input);
        let s = &input.schedule;
        assert_eq!(s["db.service"], "b");
        assert_eq!(s["app.service"], "b");
        assert_ne!(s["x1.service"], s["x2.service"]);
        assert!(["b", "c"].contains(&s["x1.service"].as_str()) && ["b", "c"].contains(&s["x2.service"].as_str()));
        assert_eq!(s["pin.service"], "c");
    }

    #[test]
    fn dead_machine_units_move_and_stay_moved() {
        let mut input = Input { machines: machines(&[("a", ""), ("b", ""), ("c", "")]), ..Default::default() };
        input.units = (1..=6).map(|i| unit(&format!("u{i}.service"), "")).collect();
        apply(&mut input);
        let on_a: Vec<String> = input.schedule.iter().filter(|(_, m)| *m == "a").map(|(u, _)| u.clone()).collect();
        input.dead.insert("a".into());
        input.machines.remove("a");
        apply(&mut input);
        assert!(input.schedule.values().all(|m| m != "a"));
        let before = input.schedule.clone();
        // a returns: nothing moves back.
        input.dead.clear();
        input.machines = machines(&[("a", ""), ("b", ""), ("c", "")]);
        assert!(apply(&mut input).is_empty());
        assert_eq!(before, input.schedule);
        assert_eq!(on_a.len(), 2);
    }

    #[test]
    fn draining_moves_launched_units_but_keeps_what_fits_nowhere_else() {
        let mut input = Input { machines: machines(&[("a", ""), ("b", "")]), ..Default::default() };
        input.units = [unit("free.service", ""), unit("pinned.service", "[X-Fleet]\nMachineID=a\n")].into_iter().collect();
        input.schedule.insert("free.service".into(), "a".into());
        input.schedule.insert("pinned.service".into(), "a".into());
        if let Some(m) = input.machines.get_mut("a") {
            m.state = MachineState::Draining;
        }
        apply(&mut input);
        assert_eq!(input.schedule["free.service"], "b");
        assert_eq!(input.schedule["pinned.service"], "a", "fits nowhere else: stays");
    }

    #[test]
    fn requests_pick_the_machine_with_most_room_and_refuse_overcommit() {
        let mut input = Input { machines: machines(&[("a", ""), ("b", "")]), ..Default::default() };
        input.units = [
            unit("big.service", "MemoryMax=3G\n"),
            unit("c1.service", "MemoryMax=1G\n"),
            unit("huge.service", "MemoryMax=5G\n"),
        ]
        .into_iter()
        .collect();
        apply(&mut input);
        assert_ne!(input.schedule["big.service"], input.schedule["c1.service"]);
        assert!(!input.schedule.contains_key("huge.service"), "5G fits on no 4G machine");
    }

    #[test]
    fn replaces_takes_the_machine_and_pushes_the_old_unit_away() {
        let mut input = Input { machines: machines(&[("a", ""), ("b", "")]), ..Default::default() };
        input.units = [unit("old.service", ""), unit("new.service", "[X-Fleet]\nReplaces=old.service\n")].into_iter().collect();
        input.schedule.insert("old.service".into(), "b".into());
        apply(&mut input);
        apply(&mut input);
        assert_eq!(input.schedule["new.service"], "b");
        assert_eq!(input.schedule["old.service"], "a");
    }

    #[test]
    fn inactive_and_destroyed_units_lose_their_entry_globals_get_none() {
        let mut input = Input { machines: machines(&[("a", "")]), ..Default::default() };
        let (n, mut u) = unit("idle.service", "");
        u.desired = DesiredState::Inactive;
        input.units.insert(n, u);
        let (g, gu) = unit("g.service", "[X-Fleet]\nGlobal=true\n");
        input.units.insert(g, gu);
        input.schedule.insert("idle.service".into(), "a".into());
        input.schedule.insert("gone.service".into(), "a".into());
        apply(&mut input);
        assert!(input.schedule.is_empty(), "{:?}", input.schedule);
    }
}
