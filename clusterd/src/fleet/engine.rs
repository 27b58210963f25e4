//! The fleet engine: runs in every clusterd, acts only while this member is the Raft leader.
//!
//! Owns: the loop that, every [`ENGINE_TICK`](super::ENGINE_TICK) on every member, reads the fleet tree from the
//! local state machine (a follower only its machines and schedule) and updates the heartbeat tracker ([`Liveness`]) — followers apply the same log, so a
//! member that becomes leader already knows how long each machine has been silent — and, on the leader only,
//! builds the scheduler's input (live, draining and dead machines; parsed units, cached by text) and proposes
//! the resulting schedule changes through Raft. On gaining leadership it gives every machine a grace
//! ([`LEADER_CHANGE_GRACE`](super::LEADER_CHANGE_GRACE), [`Liveness::gained_leadership`]) to land a heartbeat
//! delayed by the election. Does not: talk to init or to
//! agents.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use keel_model::fleet::{self, DesiredState};

use super::liveness::Liveness;
use super::registry::Snapshot;
use super::scheduler::{self, Change, Input, MachineInfo, MachineState, UnitInfo};
use super::units::{parse_unit, FleetSpec};
use super::{ENGINE_TICK, HEARTBEAT_INTERVAL, HEARTBEAT_TTL, LEADER_CHANGE_GRACE};
use crate::kv::{KvOp, OpKind};
use crate::server::Ctx;

/// Parsed units by name: (text, spec or the parse errors).
type SpecCache = HashMap<String, (String, Result<Arc<FleetSpec>, Vec<String>>)>;

/// Run forever (spawned by clusterd).
pub async fn run(ctx: Arc<Ctx>) {
    let mut live = Liveness::new(HEARTBEAT_TTL, HEARTBEAT_INTERVAL, LEADER_CHANGE_GRACE, ENGINE_TICK);
    let mut leading = false;
    let mut cache = SpecCache::new();
    let mut dead_before = BTreeSet::new();
    loop {
        tokio::time::sleep(ENGINE_TICK).await;
        let leader = ctx.raft.metrics().borrow().current_leader == Some(ctx.id);
        // A follower only tracks heartbeats: machines and the schedule, not the unit texts and states.
        let snap = if leader { read_local(&ctx) } else { read_local_dirs(&ctx, &[fleet::MACHINES_DIR, fleet::SCHEDULE_DIR]) };
        let referenced: BTreeSet<String> = snap.schedule.values().cloned().collect();
        let beats: BTreeMap<String, u64> = snap.machines.iter().map(|(id, m)| (id.clone(), m.modified)).collect();
        live.observe(Instant::now(), &beats, &referenced);
        if leader && !leading {
            live.gained_leadership();
            tracing::info!("fleet engine: leading; machines silent so far get {:?} more of heartbeats", live.grace);
        } else if !leader && leading {
            tracing::info!("fleet engine: no longer the leader; standing by");
            dead_before.clear();
        }
        leading = leader;
        if !leader {
            continue;
        }
        let dead = live.dead();
        for id in dead.difference(&dead_before) {
            tracing::warn!("fleet engine: machine {id} missed heartbeats for {:?} while others did not: rescheduling its units", HEARTBEAT_TTL);
        }
        dead_before = dead.clone();
        let input = build_input(&snap, dead, &mut cache);
        let changes = scheduler::plan(&input);
        if !changes.is_empty() {
            apply(&ctx, &snap, changes).await;
        }
    }
}

/// The fleet tree as the local state machine has it.
pub fn read_local(ctx: &Ctx) -> Snapshot {
    let now = crate::kv::time::now_nanos();
    let Ok(d) = ctx.sm.data.read() else { return Snapshot::default() };
    match d.store.get(fleet::PREFIX, true, false, now) {
        Ok(ev) => Snapshot::from_node(&ev.node),
        Err(_) => Snapshot::default(),
    }
}

/// Only these directories of the fleet tree, as the local state machine has them.
fn read_local_dirs(ctx: &Ctx, dirs: &[&str]) -> Snapshot {
    let now = crate::kv::time::now_nanos();
    let mut snap = Snapshot::default();
    let Ok(d) = ctx.sm.data.read() else { return snap };
    for dir in dirs {
        if let Ok(ev) = d.store.get(dir, true, false, now) {
            snap.add_dir(&ev.node);
        }
    }
    snap
}

fn build_input(snap: &Snapshot, dead: BTreeSet<String>, cache: &mut SpecCache) -> Input {
    let mut input = Input { dead, schedule: snap.schedule.clone(), ..Default::default() };
    for (id, m) in &snap.machines {
        if input.dead.contains(id) {
            continue;
        }
        let state = if snap.drains.contains_key(id) { MachineState::Draining } else { MachineState::Alive };
        input.machines.insert(
            id.clone(),
            MachineInfo { metadata: m.record.metadata.clone(), capacity: m.record.capacity, state },
        );
    }
    cache.retain(|name, _| snap.units.contains_key(name));
    for (name, u) in &snap.units {
        if name.contains("@.") {
            continue;
        }
        let fresh = cache.get(name).is_some_and(|(t, _)| *t == u.text);
        if !fresh {
            let parsed = parse_unit(name, &u.text).map(Arc::new);
            if let Err(errs) = &parsed {
                tracing::warn!("fleet engine: not scheduling {name}: {}", errs.join("; "));
            }
            cache.insert(name.clone(), (u.text.clone(), parsed));
        }
        match cache.get(name).map(|(_, p)| p) {
            Some(Ok(spec)) => {
                input.units.insert(name.clone(), UnitInfo { desired: u.desired, spec: spec.clone() });
            }
            _ => {
                input.broken.insert(name.clone());
            }
        }
    }
    input
}

async fn apply(ctx: &Arc<Ctx>, snap: &Snapshot, changes: Vec<Change>) {
    let mut tasks = Vec::with_capacity(changes.len());
    for c in changes {
        let op = match &c {
            Change::Assign { unit, machine } => {
                match snap.schedule.get(unit) {
                    Some(old) => tracing::info!("fleet engine: moving {unit} from {old} to {machine}"),
                    None => tracing::debug!("fleet engine: {unit} → {machine}"),
                }
                KvOp { kind: OpKind::Put, key: fleet::schedule_key(unit), value: machine.clone(), ..Default::default() }
            }
            Change::Unassign { unit } => {
                let launched = snap.units.get(unit).is_some_and(|u| u.desired == DesiredState::Launched);
                if launched {
                    tracing::warn!("fleet engine: {unit} fits on no live machine; unscheduled");
                }
                KvOp { kind: OpKind::Delete, key: fleet::schedule_key(unit), ..Default::default() }
            }
        };
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move { ctx.propose_kv(op).await }));
    }
    for t in tasks {
        match t.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!("fleet engine: schedule write failed: {e}");
            }
            Err(e) => tracing::debug!("fleet engine: schedule write task: {e}"),
        }
    }
}
