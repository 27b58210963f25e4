//! The unit supervisor: loads units, runs start/stop jobs in dependency order, follows each unit's processes,
//! restarts them by policy, and answers status questions.
//!
//! Owns: every unit's runtime state and jobs, the pid → unit table, unit output pipes, and unit cgroups (through
//! `cgroup`). Does not: wait(2) (the event loop's reaper hands it exit statuses), read sockets, or talk to
//! clients (see `api`); it only reacts to calls and leaves `events` for the loop to deliver.
//!
//! Modules: `state` (data), `jobs` (what to start/stop and in which order), `lifecycle` (process transitions).

mod jobs;
mod lifecycle;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use keel_model::{Diagnostic, Severity, Unit, UnitLoader};
use serde::Serialize;

use crate::cgroup::Cgroups;
use crate::journal::{Journal, Query, Record, Stream};
pub use state::{Active, ExitInfo, JobKind, Outcome, Phase, UnitRuntime};

/// Something the event loop must pass on (to API clients waiting for a job, to the console).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SupEvent {
    JobDone { unit: String, job: JobKind, ok: bool, message: String },
}

/// Static settings of a supervisor.
pub struct Config {
    pub unit_dirs: Vec<PathBuf>,
    pub hostname: String,
    pub notify_socket: PathBuf,
    /// Also copy unit output to init's stderr (the console).
    pub forward_to_console: bool,
}

pub struct Supervisor {
    pub(crate) cfg: Config,
    pub(crate) units: BTreeMap<String, UnitRuntime>,
    pub(crate) pids: HashMap<i32, (String, state::Role)>,
    pub(crate) cgroups: Option<Cgroups>,
    pub(crate) journal: Option<Journal>,
    pub events: Vec<SupEvent>,
    pub dropped_log_lines: u64,
    pub diagnostics: Vec<Diagnostic>,
}

/// What `initctl status` shows for one unit.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct UnitStatus {
    pub name: String,
    pub description: String,
    pub load: String,
    pub active: Active,
    pub sub: Phase,
    pub job: Option<JobKind>,
    pub main_pid: Option<i32>,
    pub since: u64,
    pub uptime_secs: Option<u64>,
    pub restarts: u32,
    pub last_exit: Option<ExitInfo>,
    pub result: Option<Outcome>,
    pub error: Option<String>,
    pub status_text: Option<String>,
    pub enabled: bool,
    pub sources: Vec<PathBuf>,
    pub tasks: Option<usize>,
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Supervisor {
    pub fn new(cfg: Config, cgroups: Option<Cgroups>, journal: Option<Journal>) -> Supervisor {
        Supervisor {
            cfg,
            units: BTreeMap::new(),
            pids: HashMap::new(),
            cgroups,
            journal,
            events: Vec::new(),
            dropped_log_lines: 0,
            diagnostics: Vec::new(),
        }
    }

    fn loader(&self) -> UnitLoader {
        UnitLoader::new(self.cfg.unit_dirs.clone())
    }

    /// (Re-)read every unit file. Running units keep running; their new definition applies from their next
    /// start. Units whose files disappeared are dropped once inactive. Returns the diagnostics.
    pub fn reload(&mut self) -> Vec<Diagnostic> {
        let report = self.loader().load_all(&self.cfg.hostname);
        for d in &report.diagnostics {
            let msg = d.to_string();
            self.log("init", &msg);
        }
        let mut seen = Vec::new();
        for (name, unit) in report.units {
            seen.push(name.clone());
            match self.units.get_mut(&name) {
                Some(rt) => rt.def = Ok(unit),
                None => {
                    self.units.insert(name, UnitRuntime::new(Ok(unit)));
                }
            }
        }
        // Files with errors: keep the unit visible as "error" so status can say why.
        for d in report.diagnostics.iter().filter(|d| d.severity == Severity::Error) {
            let Some(name) = error_unit_name(d) else { continue };
            if seen.contains(&name) {
                continue;
            }
            let rt = self.units.entry(name.clone()).or_insert_with(|| UnitRuntime::new(Err(String::new())));
            if !rt.is_up() {
                rt.def = Err(d.to_string());
            }
            seen.push(name);
        }
        self.units.retain(|name, rt| seen.contains(name) || rt.is_up() || rt.job.is_some());
        self.refresh_enabled();
        self.diagnostics = report.diagnostics.clone();
        report.diagnostics
    }

    /// Load a unit not yet known (an instance of a template, or a unit added since the last reload).
    pub(crate) fn ensure_loaded(&mut self, name: &str) -> bool {
        if self.units.get(name).is_some_and(|rt| rt.def.is_ok()) {
            return true;
        }
        match self.loader().load(name, &self.cfg.hostname) {
            Ok(unit) => {
                let rt = self.units.entry(name.to_string()).or_insert_with(|| UnitRuntime::new(Err(String::new())));
                rt.def = Ok(unit);
                true
            }
            Err(diags) => {
                if let Some(rt) = self.units.get_mut(name) {
                    rt.def = Err(diags.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "));
                }
                false
            }
        }
    }

    fn refresh_enabled(&mut self) {
        let wanted: Vec<String> = self
            .units
            .values()
            .filter_map(|rt| rt.def.as_ref().ok())
            .flat_map(|u| u.wants.iter().chain(u.requires.iter()).cloned().collect::<Vec<_>>())
            .collect();
        for (name, rt) in self.units.iter_mut() {
            rt.enabled = wanted.contains(name);
        }
    }

    pub fn def(&self, name: &str) -> Option<&Unit> {
        self.units.get(name).and_then(|rt| rt.def.as_ref().ok())
    }

    pub fn unit_names(&self) -> Vec<String> {
        self.units.keys().cloned().collect()
    }

    /// Names of known units closest to `name`, for "unknown unit" messages.
    pub fn close_matches(&self, name: &str) -> Vec<String> {
        let mut scored: Vec<(usize, &String)> =
            self.units.keys().map(|k| (edit_distance(name, k), k)).filter(|(d, _)| *d <= 4).collect();
        scored.sort();
        scored.into_iter().take(3).map(|(_, k)| k.clone()).collect()
    }

    pub fn status(&self, name: &str) -> Option<UnitStatus> {
        let rt = self.units.get(name)?;
        let def = rt.def.as_ref().ok();
        Some(UnitStatus {
            name: name.to_string(),
            description: def.map(|u| u.description.clone()).unwrap_or_default(),
            load: match &rt.def {
                Ok(_) => "loaded".into(),
                Err(_) => "error".into(),
            },
            active: rt.active,
            sub: rt.phase,
            job: rt.job,
            main_pid: rt.main_pid,
            since: rt.since.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            uptime_secs: (rt.active == Active::Active).then(|| rt.started_mono.map(|t| t.elapsed().as_secs())).flatten(),
            restarts: rt.restarts,
            last_exit: rt.last_exit,
            result: rt.outcome,
            error: rt.error.clone().or_else(|| rt.def.as_ref().err().cloned()),
            status_text: rt.status_text.clone(),
            enabled: rt.enabled,
            sources: def.map(|u| u.sources.clone()).unwrap_or_default(),
            tasks: self.cgroups.as_ref().map(|c| c.pids(name).len()),
        })
    }

    pub fn list(&self) -> Vec<UnitStatus> {
        self.units.keys().filter_map(|n| self.status(n)).collect()
    }

    /// True when no unit has a job or a transition in flight.
    pub fn is_idle(&self) -> bool {
        self.units.values().all(|rt| rt.job.is_none() && rt.is_settled())
    }

    pub fn count(&self, active: Active) -> usize {
        self.units.values().filter(|rt| rt.active == active).count()
    }

    /// A message from init itself about `unit`, to the console and the journal.
    pub fn log(&mut self, unit: &str, msg: &str) {
        eprintln!("keel: {unit}: {msg}");
        self.journal_append(unit, Stream::Init, msg);
    }

    pub(crate) fn journal_append(&mut self, unit: &str, stream: Stream, msg: &str) {
        if let Some(j) = self.journal.as_mut() {
            if j.append(unit, stream, msg).is_err() {
                self.dropped_log_lines += 1;
            }
        }
    }

    pub fn journal_query(&mut self, q: &Query) -> Vec<Record> {
        let Some(j) = self.journal.as_mut() else { return Vec::new() };
        let _ = j.flush();
        j.query(q).unwrap_or_default()
    }

    pub fn journal_last_seq(&self) -> u64 {
        self.journal.as_ref().map(|j| j.last_seq()).unwrap_or(0)
    }

    pub fn journal_flush(&mut self) {
        if let Some(j) = self.journal.as_mut() {
            let _ = j.flush();
        }
    }

    pub fn journal_sync(&mut self) {
        if let Some(j) = self.journal.as_mut() {
            let _ = j.sync();
        }
    }

    /// The earliest timer any unit is waiting on.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.units.values().filter_map(|rt| rt.deadline).min()
    }

    /// True while some stopping unit waits for its cgroup to empty (the loop then polls at a short interval).
    pub fn waiting_for_cgroups(&self) -> bool {
        self.units.values().any(|rt| matches!(rt.phase, state::Phase::StopSigterm | state::Phase::StopSigkill))
    }
}

/// The unit a file-level error diagnostic is about (its file name).
fn error_unit_name(d: &Diagnostic) -> Option<String> {
    let name = d.file.file_name()?.to_str()?;
    (name.ends_with(".service") || name.ends_with(".target")).then(|| name.to_string())
}

/// Levenshtein distance, for suggestions.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::edit_distance;

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("web.service", "web.service"), 0);
        assert_eq!(edit_distance("wbe.service", "web.service"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
