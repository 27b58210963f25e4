//! The fleet agent: this machine's part of fleet, running inside every clusterd process.
//!
//! Owns: publishing this machine's record with a heartbeat (a TTL'd key rewritten every
//! [`HEARTBEAT_INTERVAL`](super::HEARTBEAT_INTERVAL), on its own thread so a slow init never delays it), and
//! reconciling the units fleet assigned here with the local init: unit files in a runtime directory init
//! loads (`--fleet-units-dir`, default /run/keel/units), `reload`, `start`/`stop`/`restart`, and reporting
//! each unit's current state to `/_keel/fleet/states/`. Reads are linearizable, so an agent never acts on
//! a stale view (a machine that rejoins first catches up); when the cluster cannot be read, nothing is
//! stopped — units keep running until the cluster says otherwise.
//! Does not: schedule (the engine does), or touch units outside its runtime directory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use keel_model::fleet::{self, Capacity, DesiredState, MachineRecord, UnitState};

use super::init_client::{InitClient, InitUnit};
use super::registry::{Kv, Snapshot};
use super::units::{parse_unit, FleetSpec};
use super::{text_hash, unix_now, AGENT_TICK, HEARTBEAT_INTERVAL, HEARTBEAT_RETRY, HEARTBEAT_WRITE_TIMEOUT, RECORD_TTL_SECS};

/// First line of every unit file the agent writes; files without it are not the agent's.
pub const MARKER: &str = "# Written by the keel fleet agent; it removes this file when the unit leaves this machine.\n";

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub machine_id: String,
    pub hostname: String,
    pub addresses: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub version: String,
    /// This machine's clusterd client URL as others reach it (journal/status endpoint).
    pub endpoint: String,
    /// Where the agent reads and writes the KV store (its own clusterd first).
    pub kv_endpoints: Vec<String>,
    pub init_socket: PathBuf,
    pub units_dir: PathBuf,
}

static LOCAL_INIT: OnceLock<InitClient> = OnceLock::new();

/// The init the agent of this process talks to (for the journal endpoint); `None` without an agent.
pub fn local_init() -> Option<&'static InitClient> {
    LOCAL_INIT.get()
}

/// CPUs × 1000 and MemTotal of this machine.
pub fn detect_capacity() -> Capacity {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .unwrap_or(0);
    Capacity { cpu_millis: cpus * 1000, memory_bytes: mem_kib * 1024 }
}

/// `VERSION_ID` from os-release, or empty.
pub fn detect_version() -> String {
    ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find_map(|s| s.lines().find_map(|l| l.strip_prefix("VERSION_ID=").map(|v| v.trim_matches('"').to_string())))
        .unwrap_or_default()
}

/// Start the heartbeat and reconcile threads. Returns at once.
pub fn start(cfg: AgentConfig) -> std::io::Result<()> {
    std::fs::create_dir_all(&cfg.units_dir)?;
    let _ = LOCAL_INIT.set(InitClient::new(&cfg.init_socket));
    let cfg = Arc::new(cfg);
    let hb = cfg.clone();
    std::thread::Builder::new().name("fleet-heartbeat".into()).spawn(move || heartbeat_loop(&hb))?;
    std::thread::Builder::new().name("fleet-agent".into()).spawn(move || Agent::new(cfg).run())?;
    Ok(())
}

fn record(cfg: &AgentConfig) -> MachineRecord {
    MachineRecord {
        id: cfg.machine_id.clone(),
        hostname: cfg.hostname.clone(),
        addresses: cfg.addresses.clone(),
        metadata: cfg.metadata.clone(),
        capacity: cfg.capacity,
        version: cfg.version.clone(),
        endpoint: cfg.endpoint.clone(),
    }
}

fn heartbeat_loop(cfg: &AgentConfig) {
    let kv = Kv::new(cfg.kv_endpoints.clone(), HEARTBEAT_WRITE_TIMEOUT);
    let key = fleet::machine_key(&cfg.machine_id);
    let value = serde_json::to_string(&record(cfg)).unwrap_or_default();
    let mut failing_since: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let pause = match kv.set(&key, &value, Some(RECORD_TTL_SECS)) {
            Ok(()) => {
                if let Some(since) = failing_since.take() {
                    tracing::warn!("fleet agent: heartbeat restored after {:.1} s", since.elapsed().as_secs_f64());
                }
                HEARTBEAT_INTERVAL
            }
            Err(e) => {
                if failing_since.is_none() {
                    tracing::warn!("fleet agent: heartbeat failed: {e} (units keep running; retrying)");
                    failing_since = Some(Instant::now());
                }
                HEARTBEAT_RETRY
            }
        };
        std::thread::sleep(pause.saturating_sub(started.elapsed()));
    }
}

/// What should run here: unit → (text, desired).
type Want = BTreeMap<String, (String, DesiredState, bool)>;

/// The local actions of one reconcile pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LocalPlan {
    pub write: Vec<(String, String)>,
    pub remove: Vec<String>,
    pub stop: Vec<String>,
    pub restart: Vec<String>,
    pub start: Vec<String>,
}

impl LocalPlan {
    fn needs_reload(&self) -> bool {
        !self.write.is_empty() || !self.remove.is_empty()
    }
}

fn running(active: &str) -> bool {
    matches!(active, "active" | "activating" | "reloading")
}

/// Decide the local actions. `want`: what fleet assigned here; `on_disk`: files in the runtime dir;
/// `init`: what init reports; `may_retry(unit)`: whether a failed unit may be started again now.
pub fn plan_local(
    want: &Want,
    on_disk: &BTreeMap<String, String>,
    init: &BTreeMap<String, InitUnit>,
    may_retry: &dyn Fn(&str) -> bool,
) -> LocalPlan {
    let mut p = LocalPlan::default();
    let active = |n: &str| init.get(n).map(|u| u.active.as_str()).unwrap_or("inactive");
    for name in on_disk.keys().filter(|n| !want.contains_key(*n)) {
        match active(name) {
            a if running(a) => p.stop.push(name.clone()),
            "deactivating" => {}
            _ => p.remove.push(name.clone()),
        }
    }
    for (name, (text, desired, _)) in want {
        let changed = on_disk.get(name) != Some(text);
        if changed {
            p.write.push((name.clone(), text.clone()));
        }
        let a = active(name);
        match desired {
            DesiredState::Launched if changed && running(a) => p.restart.push(name.clone()),
            DesiredState::Launched if a == "inactive" || (a == "failed" && may_retry(name)) => p.start.push(name.clone()),
            DesiredState::Loaded if running(a) => p.stop.push(name.clone()),
            _ => {}
        }
    }
    p
}

struct Agent {
    cfg: Arc<AgentConfig>,
    kv: Kv,
    init: InitClient,
    specs: HashMap<String, (String, Option<Arc<FleetSpec>>)>,
    /// state key → what was reported last.
    reported: HashMap<String, Reported>,
    last_start: HashMap<String, Instant>,
    last_error: Option<String>,
    /// Names refused because a non-fleet file of that name exists (warned once).
    clashes: BTreeSet<String>,
}

/// (load, active, sub, hash) as last reported for one state key, its JSON and when.
type Seen = (String, String, String, String);
type Reported = (Seen, String, Instant);

/// A failed unit is started again at most this often.
const RETRY_FAILED: Duration = Duration::from_secs(5);
/// Unchanged states are re-reported this often (so `updated` shows the agent is alive).
const REPORT_REFRESH: Duration = Duration::from_secs(30);

impl Agent {
    fn new(cfg: Arc<AgentConfig>) -> Agent {
        let kv = Kv::new(cfg.kv_endpoints.clone(), Duration::from_secs(2));
        let init = InitClient::new(&cfg.init_socket);
        Agent { cfg, kv, init, specs: HashMap::new(), reported: HashMap::new(), last_start: HashMap::new(), last_error: None, clashes: BTreeSet::new() }
    }

    fn run(mut self) {
        loop {
            std::thread::sleep(AGENT_TICK);
            if let Err(e) = self.tick() {
                if self.last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!("fleet agent: {e} (units keep running; retrying)");
                    self.last_error = Some(e);
                }
            } else {
                self.last_error = None;
            }
        }
    }

    fn spec(&mut self, name: &str, text: &str) -> Option<Arc<FleetSpec>> {
        if let Some((t, s)) = self.specs.get(name) {
            if t == text {
                return s.clone();
            }
        }
        let s = parse_unit(name, text).ok().map(Arc::new);
        self.specs.insert(name.to_string(), (text.to_string(), s.clone()));
        s
    }

    fn want(&mut self, snap: &Snapshot) -> Want {
        let me = self.cfg.machine_id.clone();
        let mut want = Want::new();
        for (name, u) in &snap.units {
            if u.desired == DesiredState::Inactive || name.contains("@.") {
                continue;
            }
            let Some(spec) = self.spec(name, &u.text) else { continue };
            let here = if spec.global {
                spec.matches_machine(&me, &self.cfg.metadata)
            } else {
                snap.schedule.get(name) == Some(&me)
            };
            if here {
                // A Global unit being rolled out keeps its old text here until this machine's turn.
                let text = match snap.rollouts.get(name) {
                    Some(r) if spec.global && !r.done.contains(&me) => r.old.clone(),
                    _ => u.text.clone(),
                };
                want.insert(name.clone(), (text, u.desired, spec.global));
            }
        }
        want
    }

    /// Fleet's files in the runtime dir (those starting with [`MARKER`], marker stripped), and the names of
    /// other files there (cloud-config's units share /run/keel/units; fleet never touches them).
    fn on_disk(&self) -> (BTreeMap<String, String>, BTreeSet<String>) {
        let (mut ours, mut foreign) = (BTreeMap::new(), BTreeSet::new());
        let Ok(rd) = std::fs::read_dir(&self.cfg.units_dir) else { return (ours, foreign) };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.ends_with(".service") || name.ends_with(".target")) {
                continue;
            }
            match std::fs::read_to_string(e.path()) {
                Ok(text) => match text.strip_prefix(MARKER) {
                    Some(t) => {
                        ours.insert(name, t.to_string());
                    }
                    None => {
                        foreign.insert(name);
                    }
                },
                Err(_) => {
                    foreign.insert(name);
                }
            }
        }
        (ours, foreign)
    }

    fn tick(&mut self) -> Result<(), String> {
        let snap = self.kv.snapshot().map_err(|e| format!("cannot read the cluster: {e}"))?;
        let mut want = self.want(&snap);
        let (on_disk, foreign) = self.on_disk();
        want.retain(|name, _| {
            let clash = foreign.contains(name);
            if clash && self.clashes.insert(name.clone()) {
                tracing::warn!(
                    "fleet agent: not running {name}: {} already holds a unit of that name not written by fleet",
                    self.cfg.units_dir.display()
                );
            }
            !clash
        });
        let init: BTreeMap<String, InitUnit> = self
            .init
            .list()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|u| want.contains_key(&u.name) || on_disk.contains_key(&u.name))
            .map(|u| (u.name.clone(), u))
            .collect();
        let now = Instant::now();
        let last_start = &self.last_start;
        let may_retry = |n: &str| last_start.get(n).is_none_or(|t| now.duration_since(*t) >= RETRY_FAILED);
        let plan = plan_local(&want, &on_disk, &init, &may_retry);
        self.act(&plan)?;
        self.report(&want, &on_disk, &init);
        Ok(())
    }

    fn act(&mut self, plan: &LocalPlan) -> Result<(), String> {
        let dir = &self.cfg.units_dir;
        for (name, text) in &plan.write {
            write_atomic(&dir.join(name), &format!("{MARKER}{text}")).map_err(|e| format!("writing {}: {e}", dir.join(name).display()))?;
        }
        for name in &plan.remove {
            let _ = std::fs::remove_file(dir.join(name));
        }
        if plan.needs_reload() {
            for d in self.init.reload().map_err(|e| e.to_string())? {
                if plan.write.iter().any(|(n, _)| d.contains(n.as_str())) {
                    tracing::warn!("fleet agent: {d}");
                }
            }
        }
        for (cmd, list) in [("stop", &plan.stop), ("restart", &plan.restart), ("start", &plan.start)] {
            for name in list {
                tracing::info!("fleet agent: {cmd} {name}");
                if cmd != "stop" {
                    self.last_start.insert(name.clone(), Instant::now());
                }
                if let Err(e) = self.init.job(cmd, name) {
                    tracing::warn!("fleet agent: {cmd} {name}: {e}");
                }
            }
        }
        Ok(())
    }

    fn report(&mut self, want: &Want, on_disk: &BTreeMap<String, String>, init: &BTreeMap<String, InitUnit>) {
        let me = self.cfg.machine_id.clone();
        let mut keep = Vec::new();
        for (name, (text, _, global)) in want {
            let key = if *global { fleet::global_state_key(name, &me) } else { fleet::state_key(name) };
            keep.push(key.clone());
            let u = init.get(name);
            let hash = on_disk.get(name).filter(|t| *t == text).map(|t| text_hash(t)).unwrap_or_default();
            let seen: Seen = (
                u.map(|u| u.load.clone()).unwrap_or_else(|| "not-found".into()),
                u.map(|u| u.active.clone()).unwrap_or_else(|| "inactive".into()),
                u.map(|u| u.sub.clone()).unwrap_or_else(|| "dead".into()),
                hash,
            );
            let fresh = self.reported.get(&key).is_some_and(|(s, _, at)| *s == seen && at.elapsed() < REPORT_REFRESH);
            if fresh {
                continue;
            }
            let st = UnitState {
                machine: me.clone(),
                load: seen.0.clone(),
                active: seen.1.clone(),
                sub: seen.2.clone(),
                updated: unix_now(),
                hash: seen.3.clone(),
            };
            let json = serde_json::to_string(&st).unwrap_or_default();
            match self.kv.set(&key, &json, None) {
                Ok(()) => {
                    self.reported.insert(key, (seen, json, Instant::now()));
                }
                Err(e) => tracing::debug!("fleet agent: reporting {name}: {e}"),
            }
        }
        let gone: Vec<String> = self.reported.keys().filter(|k| !keep.contains(k)).cloned().collect();
        for key in gone {
            if let Some((_, json, _)) = self.reported.get(&key) {
                // Only if still ours: the unit's new machine may already have reported.
                if self.kv.delete(&key, Some(json)).is_ok() {
                    self.reported.remove(&key);
                }
            }
        }
    }
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("fleet-tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iu(name: &str, active: &str) -> (String, InitUnit) {
        (name.to_string(), InitUnit { name: name.into(), load: "loaded".into(), active: active.into(), ..Default::default() })
    }

    #[test]
    fn local_plan_converges() {
        let want: Want = [
            ("new.service".to_string(), ("A".to_string(), DesiredState::Launched, false)),
            ("changed.service".to_string(), ("B2".to_string(), DesiredState::Launched, false)),
            ("loaded.service".to_string(), ("C".to_string(), DesiredState::Loaded, false)),
            ("failed.service".to_string(), ("D".to_string(), DesiredState::Launched, false)),
        ]
        .into_iter()
        .collect();
        let disk: BTreeMap<String, String> = [
            ("changed.service", "B1"),
            ("loaded.service", "C"),
            ("failed.service", "D"),
            ("moved.service", "E"),
            ("old.service", "F"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let init: BTreeMap<String, InitUnit> = [
            iu("changed.service", "active"),
            iu("loaded.service", "active"),
            iu("failed.service", "failed"),
            iu("moved.service", "active"),
            iu("old.service", "inactive"),
        ]
        .into_iter()
        .collect();
        let p = plan_local(&want, &disk, &init, &|_| false);
        assert_eq!(p.write.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), vec!["changed.service", "new.service"]);
        assert_eq!(p.remove, vec!["old.service"]);
        assert_eq!(p.stop, vec!["moved.service", "loaded.service"]);
        assert_eq!(p.restart, vec!["changed.service"]);
        assert_eq!(p.start, vec!["new.service"], "failed units wait for their retry time");
        let p = plan_local(&want, &disk, &init, &|_| true);
        assert!(p.start.contains(&"failed.service".to_string()));
    }
}
