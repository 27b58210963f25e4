//! The typed meaning of a unit file: `[Unit]`, `[Service]`, `[Install]`, plus the raw keys of extension
//! sections (`[Container]`, `[X-Fleet]`) that other components interpret.
//!
//! Owns: the unit types and turning parsed INI (`crate::ini`) into `Unit` ([`Unit::from_ini`]; the key-by-key
//! rules live in the `build` submodule), with systemd's defaults, reporting bad values as `file:line`
//! diagnostics. Does not: read files (see `load`) or act on anything.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::ini::IniFile;
use crate::name::UnitName;
use crate::Diagnostic;

mod build;

/// systemd's defaults, kept in one place.
pub const DEFAULT_RESTART_SEC: Duration = Duration::from_millis(100);
pub const DEFAULT_START_LIMIT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_START_LIMIT_BURST: u32 = 5;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);
/// `StartLimitIntervalSec=infinity`: a finite stand-in (about 136 years) so that `Instant + interval` cannot
/// overflow.
pub const START_LIMIT_INTERVAL_INFINITY: Duration = Duration::from_secs(u32::MAX as u64);

/// A fully loaded unit (main file + drop-ins, template instantiated, specifiers expanded).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unit {
    pub name: UnitName,
    /// `Description=`; empty when not set (see [`Unit::description_or_name`]).
    pub description: String,
    pub requires: Vec<String>,
    pub wants: Vec<String>,
    pub binds_to: Vec<String>,
    pub after: Vec<String>,
    pub before: Vec<String>,
    pub conflicts: Vec<String>,
    pub conditions: Vec<Condition>,
    /// `Some` for `.service` units; targets have none.
    pub service: Option<ServiceSpec>,
    pub install: InstallSpec,
    /// Raw keys of sections this crate does not interpret (`Container`, `X-*` such as `X-Fleet`), in file
    /// order, drop-ins appended after the main file. Section name → list of (key, value) with specifiers
    /// expanded; an empty value is kept as is (its meaning, e.g. a reset, is up to the consumer).
    pub extra_sections: BTreeMap<String, Vec<(String, String)>>,
    /// The main file and the drop-ins that made this unit, in the order applied.
    pub sources: Vec<PathBuf>,
}

impl Unit {
    /// Build a unit from its main file (`files[0]`) and drop-ins (`files[1..]`, in application order),
    /// expanding specifiers for `name` and `hostname`. Returns `None` when any `Error` diagnostic was
    /// produced; warnings never make a unit unusable. See the `build` module for the exact semantics.
    pub fn from_ini(
        name: UnitName,
        files: &[IniFile],
        hostname: &str,
    ) -> (Option<Unit>, Vec<Diagnostic>) {
        build::build(name, files, hostname)
    }

    /// The description, or the unit name when none is set (what systemd shows).
    pub fn description_or_name(&self) -> &str {
        if self.description.is_empty() {
            &self.name.full
        } else {
            &self.description
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Condition {
    /// `ConditionPathExists=[!]path`
    PathExists { path: PathBuf, negate: bool },
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct InstallSpec {
    pub wanted_by: Vec<String>,
    pub required_by: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceType {
    Simple,
    Exec,
    Notify,
    Oneshot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    No,
    OnFailure,
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KillMode {
    /// Every process in the unit's cgroup (systemd's default).
    ControlGroup,
    /// SIGTERM to the main process only, then SIGKILL to the whole cgroup.
    Mixed,
    /// The main process only.
    Process,
    /// No process is killed.
    None,
}

/// One `Exec*=` line, already split into words with systemd's quoting rules and specifiers expanded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecCommand {
    /// argv[0] as the program to run (absolute, or a bare name searched in PATH).
    pub argv: Vec<String>,
    /// `-` prefix: a non-zero exit is not a failure.
    pub ignore_failure: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceSpec {
    pub kind: ServiceType,
    pub exec_start_pre: Vec<ExecCommand>,
    pub exec_start: Vec<ExecCommand>,
    pub exec_start_post: Vec<ExecCommand>,
    pub exec_stop: Vec<ExecCommand>,
    pub restart: RestartPolicy,
    pub restart_sec: Duration,
    /// `StartLimitIntervalSec=` (in `[Unit]`, or the old `StartLimitInterval=` in `[Service]`). Zero disables
    /// rate limiting (as in systemd); `infinity` is stored as [`START_LIMIT_INTERVAL_INFINITY`].
    pub start_limit_interval: Duration,
    /// `StartLimitBurst=` (in `[Unit]`, or in `[Service]` as systemd's old location).
    pub start_limit_burst: u32,
    /// `TimeoutStartSec=` / `TimeoutSec=`; `None` means infinity (`infinity` or `0`, as in systemd).
    pub timeout_start: Option<Duration>,
    /// `TimeoutStopSec=` / `TimeoutSec=`; `None` means infinity (`infinity` or `0`).
    pub timeout_stop: Option<Duration>,
    /// `Environment=` assignments in order (later wins).
    pub environment: Vec<(String, String)>,
    /// `EnvironmentFile=[-]path`: (path, optional).
    pub environment_files: Vec<(PathBuf, bool)>,
    /// `WorkingDirectory=` (absolute; a leading `-` is dropped).
    pub working_directory: Option<PathBuf>,
    /// `User=` / `Group=` as written (specifiers expanded); resolving them is the runtime's job.
    pub user: Option<String>,
    pub group: Option<String>,
    pub kill_mode: KillMode,
    pub remain_after_exit: bool,
    /// `MemoryMax=` in bytes (accepts K/M/G/T suffixes, `infinity` → None).
    pub memory_max: Option<u64>,
    /// `CPUQuota=` in percent of one CPU (e.g. `50%` → 50, `200%` → 200).
    pub cpu_quota_percent: Option<u32>,
    /// `TasksMax=` (`infinity` → None).
    pub tasks_max: Option<u64>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        ServiceSpec {
            kind: ServiceType::Simple,
            exec_start_pre: Vec::new(),
            exec_start: Vec::new(),
            exec_start_post: Vec::new(),
            exec_stop: Vec::new(),
            restart: RestartPolicy::No,
            restart_sec: DEFAULT_RESTART_SEC,
            start_limit_interval: DEFAULT_START_LIMIT_INTERVAL,
            start_limit_burst: DEFAULT_START_LIMIT_BURST,
            timeout_start: Some(DEFAULT_TIMEOUT),
            timeout_stop: Some(DEFAULT_TIMEOUT),
            environment: Vec::new(),
            environment_files: Vec::new(),
            working_directory: None,
            user: None,
            group: None,
            kill_mode: KillMode::ControlGroup,
            remain_after_exit: false,
            memory_max: None,
            cpu_quota_percent: None,
            tasks_max: None,
        }
    }
}
