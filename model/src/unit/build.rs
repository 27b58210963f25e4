//! Turning parsed INI files (main file, then drop-ins) into a [`Unit`]: key by key, with systemd's meaning,
//! then whole-unit checks. Pure.
//!
//! Semantics (systemd's unless noted):
//! - Files are applied in order; a later assignment of a scalar key wins. An empty assignment (`Key=`)
//!   resets the key: lists (dependencies, `Exec*`, `Environment`, `EnvironmentFile`,
//!   `ConditionPathExists`) are cleared, scalars return to their default.
//! - Dependency lists (`Requires Wants BindsTo After Before Conflicts WantedBy RequiredBy`) are
//!   space-separated, accumulate and are deduplicated. A name of another systemd type (`.socket`, `.mount`,
//!   …) is dropped with a warning; an invalid name or a template is an error.
//! - `Exec*` values are split with systemd quoting ([`crate::values::split_words`]); specifiers are expanded
//!   per word after splitting. Prefix `-` sets `ignore_failure`; `+ ! !! :` are stripped with a warning; `@`
//!   is stripped and its argv\[0\] word dropped with a warning (Keel always runs with argv\[0\] = program).
//!   The program must be absolute or a bare name. `$VAR` references are left for the runtime.
//! - More than one `ExecStart=` is an error unless `Type=oneshot`. A service needs `ExecStart=`, except a
//!   oneshot with `ExecStop=`; with neither `Type=` nor `ExecStart=`, the type defaults to oneshot.
//! - `Restart=on-abnormal|on-abort|on-watchdog` → `OnFailure` and `Restart=on-success` → `Always`, each with
//!   a warning (Keel only distinguishes success from failure; `Always` keeps an on-success service running).
//! - `Type=idle` → `Simple`, `Type=notify-reload` → `Notify` (warning); `forking`/`dbus` are errors.
//! - `TimeoutSec=` sets start and stop; `0` or `infinity` means no timeout. `RestartSec=infinity` is an
//!   error.
//! - `MemoryMax=`/`TasksMax=` as a percentage: warning, ignored. `MemoryLimit=` is accepted as `MemoryMax=`.
//! - `ConditionPathExists=|…` (triggering condition) is treated as a plain condition, with a warning.
//! - `WorkingDirectory=-path` drops the `-` (a missing directory is then an error at runtime);
//!   `WorkingDirectory=~` is an error.
//! - `Documentation=` and `DefaultDependencies=` are accepted and not used (Keel adds no implicit
//!   dependencies).
//! - Specifiers are expanded in `Description`, dependency lists, `Condition*`, `Exec*`, `Environment`,
//!   `EnvironmentFile`, `WorkingDirectory`, `User`, `Group` and extra sections; an unknown one is an error.
//! - `[Service]` in a target, unknown sections and unknown keys are warnings; sections `Container` and
//!   `X-*` are kept raw in `extra_sections`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    Condition, ExecCommand, InstallSpec, KillMode, RestartPolicy, ServiceSpec, ServiceType, Unit,
    START_LIMIT_INTERVAL_INFINITY,
};
use crate::duration::parse_timespan;
use crate::ini::{Entry, IniFile};
use crate::name::{expand_specifiers, UnitKind, UnitName, OTHER_SYSTEMD_TYPES};
use crate::values::{parse_bool, parse_percent, parse_size, split_words};
use crate::{Diagnostic, Severity};

pub(super) fn build(
    name: UnitName,
    files: &[IniFile],
    hostname: &str,
) -> (Option<Unit>, Vec<Diagnostic>) {
    let mut b = Builder::new(name, hostname);
    let Some(main) = files.first() else {
        b.file = PathBuf::from(&b.unit.name.full);
        b.error(0, "no unit file given".to_string());
        return (None, b.diags);
    };
    for file in files {
        b.apply_file(file);
    }
    b.finish(&main.path)
}

/// `Container` and `X-*` sections are kept raw for other components.
fn is_extra_section(section: &str) -> bool {
    section == "Container" || section.starts_with("X-")
}

fn invalid(e: &Entry, why: &str) -> String {
    format!("invalid value '{}' for {}= ({why})", e.value, e.key)
}

struct Builder<'h> {
    hostname: &'h str,
    unit: Unit,
    svc: ServiceSpec,
    type_set: bool,
    /// Where each `ExecStart=` command came from, aligned with `svc.exec_start`.
    exec_start_at: Vec<(PathBuf, usize)>,
    /// An `ExecStart=` line was rejected: do not also report "no ExecStart=".
    exec_start_rejected: bool,
    start_limit_interval: Option<Duration>,
    start_limit_burst: Option<u32>,
    /// The file being applied, for diagnostics.
    file: PathBuf,
    diags: Vec<Diagnostic>,
}

impl<'h> Builder<'h> {
    fn new(name: UnitName, hostname: &'h str) -> Self {
        let unit = Unit {
            name,
            description: String::new(),
            requires: Vec::new(),
            wants: Vec::new(),
            binds_to: Vec::new(),
            after: Vec::new(),
            before: Vec::new(),
            conflicts: Vec::new(),
            conditions: Vec::new(),
            service: None,
            install: InstallSpec::default(),
            extra_sections: BTreeMap::new(),
            sources: Vec::new(),
        };
        Builder {
            hostname,
            unit,
            svc: ServiceSpec::default(),
            type_set: false,
            exec_start_at: Vec::new(),
            exec_start_rejected: false,
            start_limit_interval: None,
            start_limit_burst: None,
            file: PathBuf::new(),
            diags: Vec::new(),
        }
    }

    fn push(&mut self, file: PathBuf, line: usize, severity: Severity, message: String) {
        self.diags.push(Diagnostic {
            file,
            line,
            severity,
            message,
        });
    }

    fn warn(&mut self, line: usize, message: String) {
        self.push(self.file.clone(), line, Severity::Warning, message);
    }

    fn error(&mut self, line: usize, message: String) {
        self.push(self.file.clone(), line, Severity::Error, message);
    }

    fn expand(&self, s: &str) -> Result<String, String> {
        expand_specifiers(s, &self.unit.name, self.hostname)
    }

    fn apply_file(&mut self, file: &IniFile) {
        self.file = file.path.clone();
        self.unit.sources.push(file.path.clone());
        let mut warned: BTreeSet<&str> = BTreeSet::new();
        let is_service = self.unit.name.kind == UnitKind::Service;
        for e in &file.entries {
            let result = match e.section.as_str() {
                "Unit" => self.apply_unit(e),
                "Service" if is_service => self.apply_service(e),
                "Install" => self.apply_install(e),
                s if is_extra_section(s) => self.apply_extra(e),
                s => {
                    if warned.insert(s) {
                        self.warn(e.line, ignored_section_message(s));
                    }
                    Ok(())
                }
            };
            if let Err(message) = result {
                self.exec_start_rejected |= e.key == "ExecStart";
                self.error(e.line, message);
            }
        }
    }

    fn unknown_key(&mut self, e: &Entry) {
        self.warn(
            e.line,
            format!(
                "unknown key '{}' in section [{}], ignored",
                e.key, e.section
            ),
        );
    }

    fn apply_unit(&mut self, e: &Entry) -> Result<(), String> {
        let empty = e.value.is_empty();
        match e.key.as_str() {
            "Description" => self.unit.description = self.expand(&e.value)?,
            "Documentation" => {}
            "DefaultDependencies" if !empty => {
                parse_bool(&e.value).ok_or_else(|| invalid(e, "expected a boolean"))?;
            }
            "DefaultDependencies" => {}
            "Requires" | "Wants" | "BindsTo" | "After" | "Before" | "Conflicts" => {
                self.apply_deps(e)?
            }
            "ConditionPathExists" => self.apply_condition(e)?,
            "StartLimitIntervalSec" if empty => self.start_limit_interval = None,
            "StartLimitIntervalSec" => self.start_limit_interval = Some(start_limit_interval(e)?),
            "StartLimitBurst" if empty => self.start_limit_burst = None,
            "StartLimitBurst" => self.start_limit_burst = Some(parse_u32(e)?),
            _ => self.unknown_key(e),
        }
        Ok(())
    }

    fn apply_install(&mut self, e: &Entry) -> Result<(), String> {
        match e.key.as_str() {
            "WantedBy" | "RequiredBy" => self.apply_deps(e),
            _ => {
                self.unknown_key(e);
                Ok(())
            }
        }
    }

    fn apply_extra(&mut self, e: &Entry) -> Result<(), String> {
        let value = self.expand(&e.value)?;
        let section = self
            .unit
            .extra_sections
            .entry(e.section.clone())
            .or_default();
        section.push((e.key.clone(), value));
        Ok(())
    }

    fn dep_list(&mut self, key: &str) -> Option<&mut Vec<String>> {
        let u = &mut self.unit;
        let list = match key {
            "Requires" => &mut u.requires,
            "Wants" => &mut u.wants,
            "BindsTo" => &mut u.binds_to,
            "After" => &mut u.after,
            "Before" => &mut u.before,
            "Conflicts" => &mut u.conflicts,
            "WantedBy" => &mut u.install.wanted_by,
            "RequiredBy" => &mut u.install.required_by,
            _ => return None,
        };
        Some(list)
    }

    fn apply_deps(&mut self, e: &Entry) -> Result<(), String> {
        let names = if e.value.is_empty() {
            None
        } else {
            Some(self.dep_names(e)?)
        };
        let Some(list) = self.dep_list(&e.key) else {
            return Ok(());
        };
        match names {
            None => list.clear(),
            Some(names) => {
                for n in names {
                    if !list.contains(&n) {
                        list.push(n);
                    }
                }
            }
        }
        Ok(())
    }

    fn dep_names(&mut self, e: &Entry) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        for word in e.value.split_whitespace() {
            let word = self.expand(word)?;
            match dependency_name(&word) {
                Ok(Some(name)) => out.push(name),
                Ok(None) => self.warn(
                    e.line,
                    format!(
                        "{}={word} ignored: Keel only has .service and .target units",
                        e.key
                    ),
                ),
                Err(m) => return Err(format!("invalid unit name in {}=: {m}", e.key)),
            }
        }
        Ok(out)
    }

    fn apply_condition(&mut self, e: &Entry) -> Result<(), String> {
        if e.value.is_empty() {
            self.unit.conditions.clear();
            return Ok(());
        }
        let mut v = e.value.as_str();
        if let Some(rest) = v.strip_prefix('|') {
            self.warn(
                e.line,
                "triggering condition '|' is not supported; treated as a plain condition".into(),
            );
            v = rest.trim_start();
        }
        let (negate, raw) = match v.strip_prefix('!') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, v),
        };
        let path = PathBuf::from(self.expand(raw)?);
        if !path.is_absolute() {
            return Err(invalid(
                e,
                "expected an absolute path, optionally prefixed with '!'",
            ));
        }
        self.unit
            .conditions
            .push(Condition::PathExists { path, negate });
        Ok(())
    }

    fn apply_service(&mut self, e: &Entry) -> Result<(), String> {
        if e.value.is_empty() {
            self.reset_service_key(e);
            return Ok(());
        }
        match e.key.as_str() {
            "Type" => {
                self.svc.kind = self.service_type(e)?;
                self.type_set = true;
            }
            "ExecStart" | "ExecStartPre" | "ExecStartPost" | "ExecStop" => self.apply_exec(e)?,
            "Restart" => self.svc.restart = self.restart(e)?,
            "RestartSec" => {
                self.svc.restart_sec =
                    timespan(e)?.ok_or_else(|| invalid(e, "infinity is not allowed"))?
            }
            "TimeoutSec" => {
                self.svc.timeout_start = timeout(e)?;
                self.svc.timeout_stop = self.svc.timeout_start;
            }
            "TimeoutStartSec" => self.svc.timeout_start = timeout(e)?,
            "TimeoutStopSec" => self.svc.timeout_stop = timeout(e)?,
            "Environment" => self.apply_environment(e)?,
            "EnvironmentFile" => self.apply_environment_file(e)?,
            "WorkingDirectory" => self.svc.working_directory = Some(self.working_directory(e)?),
            "User" => self.svc.user = Some(self.expand(&e.value)?),
            "Group" => self.svc.group = Some(self.expand(&e.value)?),
            "KillMode" => self.svc.kill_mode = kill_mode(e)?,
            "RemainAfterExit" => {
                self.svc.remain_after_exit =
                    parse_bool(&e.value).ok_or_else(|| invalid(e, "expected a boolean"))?;
            }
            "MemoryMax" | "MemoryLimit" => self.svc.memory_max = self.memory_max(e)?,
            "CPUQuota" => self.svc.cpu_quota_percent = Some(cpu_quota(e)?),
            "TasksMax" => self.svc.tasks_max = self.tasks_max(e)?,
            "StartLimitInterval" => self.start_limit_interval = Some(start_limit_interval(e)?),
            "StartLimitBurst" => self.start_limit_burst = Some(parse_u32(e)?),
            _ => self.unknown_key(e),
        }
        Ok(())
    }

    /// `Key=` in `[Service]`: lists are cleared, scalars return to their default.
    fn reset_service_key(&mut self, e: &Entry) {
        let d = ServiceSpec::default();
        let s = &mut self.svc;
        match e.key.as_str() {
            "Type" => {
                s.kind = d.kind;
                self.type_set = false;
            }
            "ExecStart" => {
                s.exec_start.clear();
                self.exec_start_at.clear();
            }
            "ExecStartPre" => s.exec_start_pre.clear(),
            "ExecStartPost" => s.exec_start_post.clear(),
            "ExecStop" => s.exec_stop.clear(),
            "Restart" => s.restart = d.restart,
            "RestartSec" => s.restart_sec = d.restart_sec,
            "TimeoutSec" => (s.timeout_start, s.timeout_stop) = (d.timeout_start, d.timeout_stop),
            "TimeoutStartSec" => s.timeout_start = d.timeout_start,
            "TimeoutStopSec" => s.timeout_stop = d.timeout_stop,
            "Environment" => s.environment.clear(),
            "EnvironmentFile" => s.environment_files.clear(),
            "WorkingDirectory" => s.working_directory = None,
            "User" => s.user = None,
            "Group" => s.group = None,
            "KillMode" => s.kill_mode = d.kill_mode,
            "RemainAfterExit" => s.remain_after_exit = d.remain_after_exit,
            "MemoryMax" | "MemoryLimit" => s.memory_max = None,
            "CPUQuota" => s.cpu_quota_percent = None,
            "TasksMax" => s.tasks_max = None,
            "StartLimitInterval" => self.start_limit_interval = None,
            "StartLimitBurst" => self.start_limit_burst = None,
            _ => self.unknown_key(e),
        }
    }

    fn service_type(&mut self, e: &Entry) -> Result<ServiceType, String> {
        let t = match e.value.as_str() {
            "simple" => ServiceType::Simple,
            "exec" => ServiceType::Exec,
            "notify" => ServiceType::Notify,
            "oneshot" => ServiceType::Oneshot,
            "idle" => {
                self.warn(e.line, "Type=idle is treated as Type=simple".into());
                ServiceType::Simple
            }
            "notify-reload" => {
                self.warn(
                    e.line,
                    "Type=notify-reload is treated as Type=notify (no reload)".into(),
                );
                ServiceType::Notify
            }
            "forking" | "dbus" => {
                return Err(format!(
                    "Type={} is unsupported by Keel (use simple, exec, notify or oneshot)",
                    e.value
                ))
            }
            _ => return Err(invalid(e, "expected simple, exec, notify or oneshot")),
        };
        Ok(t)
    }

    fn restart(&mut self, e: &Entry) -> Result<RestartPolicy, String> {
        let r = match e.value.as_str() {
            "no" => RestartPolicy::No,
            "on-failure" => RestartPolicy::OnFailure,
            "always" => RestartPolicy::Always,
            v @ ("on-abnormal" | "on-abort" | "on-watchdog") => {
                self.warn(
                    e.line,
                    format!("Restart={v} is treated as Restart=on-failure"),
                );
                RestartPolicy::OnFailure
            }
            "on-success" => {
                self.warn(
                    e.line,
                    "Restart=on-success is treated as Restart=always (also restarts after failures)".into(),
                );
                RestartPolicy::Always
            }
            _ => return Err(invalid(e, "expected no, on-failure or always")),
        };
        Ok(r)
    }

    fn apply_exec(&mut self, e: &Entry) -> Result<(), String> {
        let cmd = self.exec_command(e)?;
        let s = &mut self.svc;
        match e.key.as_str() {
            "ExecStartPre" => s.exec_start_pre.push(cmd),
            "ExecStartPost" => s.exec_start_post.push(cmd),
            "ExecStop" => s.exec_stop.push(cmd),
            _ => {
                s.exec_start.push(cmd);
                self.exec_start_at.push((self.file.clone(), e.line));
            }
        }
        Ok(())
    }

    fn exec_command(&mut self, e: &Entry) -> Result<ExecCommand, String> {
        let mut words = split_words(&e.value).map_err(|m| format!("{}=: {m}", e.key))?;
        let Some(first) = words.first_mut() else {
            return Err(format!("{}= has no command", e.key));
        };
        let program = first
            .trim_start_matches(['-', '@', ':', '+', '!'])
            .to_string();
        let prefixes: BTreeSet<char> = first[..first.len() - program.len()].chars().collect();
        *first = program;
        for p in prefixes.iter().filter(|p| !matches!(p, '-' | '@')) {
            self.warn(
                e.line,
                format!(
                    "prefix '{p}' in {}= is not supported by Keel, ignored",
                    e.key
                ),
            );
        }
        if prefixes.contains(&'@') {
            if words.len() < 2 {
                return Err(format!(
                    "'@' prefix in {}= needs an argv[0] word after the executable",
                    e.key
                ));
            }
            let argv0 = words.remove(1);
            self.warn(
                e.line,
                format!(
                    "argv[0] override '{argv0}' ('@' prefix) in {}= is not supported, ignored",
                    e.key
                ),
            );
        }
        let argv = words
            .iter()
            .map(|w| self.expand(w))
            .collect::<Result<Vec<_>, _>>()?;
        check_program(argv.first().map(String::as_str).unwrap_or(""), &e.key)?;
        Ok(ExecCommand {
            argv,
            ignore_failure: prefixes.contains(&'-'),
        })
    }

    fn apply_environment(&mut self, e: &Entry) -> Result<(), String> {
        let mut vars = Vec::new();
        for word in split_words(&e.value).map_err(|m| format!("Environment=: {m}"))? {
            let word = self.expand(&word)?;
            let (name, value) = word
                .split_once('=')
                .filter(|(n, _)| valid_env_name(n))
                .ok_or_else(|| {
                    format!("invalid assignment '{word}' in Environment= (expected NAME=value)")
                })?;
            vars.push((name.to_string(), value.to_string()));
        }
        self.svc.environment.extend(vars);
        Ok(())
    }

    fn apply_environment_file(&mut self, e: &Entry) -> Result<(), String> {
        let (optional, raw) = match e.value.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, e.value.as_str()),
        };
        let path = PathBuf::from(self.expand(raw)?);
        if !path.is_absolute() {
            return Err(invalid(
                e,
                "expected an absolute path, optionally prefixed with '-'",
            ));
        }
        self.svc.environment_files.push((path, optional));
        Ok(())
    }

    fn working_directory(&mut self, e: &Entry) -> Result<PathBuf, String> {
        let raw = e.value.strip_prefix('-').unwrap_or(&e.value);
        if raw == "~" {
            return Err(invalid(e, "'~' is not supported; give an absolute path"));
        }
        let path = PathBuf::from(self.expand(raw)?);
        if !path.is_absolute() {
            return Err(invalid(e, "expected an absolute path"));
        }
        Ok(path)
    }

    fn memory_max(&mut self, e: &Entry) -> Result<Option<u64>, String> {
        if e.value == "infinity" {
            return Ok(None);
        }
        if e.value.ends_with('%') {
            parse_percent(&e.value).map_err(|m| invalid(e, &m))?;
            self.warn(
                e.line,
                format!(
                    "{}= as a percentage is not supported by Keel, ignored",
                    e.key
                ),
            );
            return Ok(self.svc.memory_max);
        }
        parse_size(&e.value).map(Some).map_err(|m| invalid(e, &m))
    }

    fn tasks_max(&mut self, e: &Entry) -> Result<Option<u64>, String> {
        if e.value == "infinity" {
            return Ok(None);
        }
        if e.value.ends_with('%') {
            parse_percent(&e.value).map_err(|m| invalid(e, &m))?;
            self.warn(
                e.line,
                "TasksMax= as a percentage is not supported by Keel, ignored".into(),
            );
            return Ok(self.svc.tasks_max);
        }
        match e.value.parse::<u64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(invalid(e, "expected a positive number or infinity")),
        }
    }

    fn finish(mut self, main: &Path) -> (Option<Unit>, Vec<Diagnostic>) {
        if self.unit.name.kind == UnitKind::Service {
            self.finish_service(main);
        }
        let usable = !self.diags.iter().any(|d| d.severity == Severity::Error);
        (usable.then_some(self.unit), self.diags)
    }

    fn finish_service(&mut self, main: &Path) {
        let mut svc = std::mem::take(&mut self.svc);
        let container = self.unit.extra_sections.contains_key("Container");
        if !self.type_set && svc.exec_start.is_empty() && !container {
            svc.kind = ServiceType::Oneshot;
        }
        if let Some(interval) = self.start_limit_interval {
            svc.start_limit_interval = interval;
        }
        if let Some(burst) = self.start_limit_burst {
            svc.start_limit_burst = burst;
        }
        let n = svc.exec_start.len();
        if n > 1 && svc.kind != ServiceType::Oneshot {
            let (file, line) = self
                .exec_start_at
                .get(1)
                .cloned()
                .unwrap_or_else(|| (main.to_path_buf(), 0));
            let message = format!(
                "ExecStart= given {n} times; more than one is only allowed for Type=oneshot"
            );
            self.push(file, line, Severity::Error, message);
        }
        let stop_only_oneshot = svc.kind == ServiceType::Oneshot && !svc.exec_stop.is_empty();
        if n == 0 && !stop_only_oneshot && !self.exec_start_rejected && !container {
            self.push(
                main.to_path_buf(),
                0,
                Severity::Error,
                "service has no ExecStart=".into(),
            );
        }
        self.unit.service = Some(svc);
    }
}

fn ignored_section_message(section: &str) -> String {
    if section == "Service" {
        "[Service] section is ignored in a target unit".to_string()
    } else {
        format!("unknown section [{section}], ignored")
    }
}

/// `Ok(Some(name))` for a usable dependency, `Ok(None)` for a valid name of a type Keel does not have.
fn dependency_name(word: &str) -> Result<Option<String>, String> {
    match UnitName::parse(word) {
        Ok(n) if n.is_template() => Err(format!("'{word}' is a template; name an instance")),
        Ok(n) => Ok(Some(n.full)),
        Err(m) => {
            let other_type = word.rsplit_once('.').is_some_and(|(stem, suffix)| {
                !stem.is_empty() && OTHER_SYSTEMD_TYPES.contains(&suffix)
            });
            let plausible = word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ":_.\\@-".contains(c));
            if other_type && plausible {
                Ok(None)
            } else {
                Err(m)
            }
        }
    }
}

fn check_program(program: &str, key: &str) -> Result<(), String> {
    if program.is_empty() {
        return Err(format!("{key}= has an empty executable"));
    }
    if program.contains('/') && !program.starts_with('/') {
        return Err(format!(
            "executable '{program}' in {key}= must be an absolute path or a bare name"
        ));
    }
    Ok(())
}

fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn timespan(e: &Entry) -> Result<Option<Duration>, String> {
    parse_timespan(&e.value).map_err(|m| invalid(e, &m))
}

/// `0` and `infinity` both mean no timeout.
fn timeout(e: &Entry) -> Result<Option<Duration>, String> {
    Ok(timespan(e)?.filter(|d| !d.is_zero()))
}

fn start_limit_interval(e: &Entry) -> Result<Duration, String> {
    Ok(timespan(e)?.unwrap_or(START_LIMIT_INTERVAL_INFINITY))
}

fn parse_u32(e: &Entry) -> Result<u32, String> {
    e.value
        .parse()
        .map_err(|_| invalid(e, "expected a non-negative number"))
}

fn kill_mode(e: &Entry) -> Result<KillMode, String> {
    match e.value.as_str() {
        "control-group" => Ok(KillMode::ControlGroup),
        "mixed" => Ok(KillMode::Mixed),
        "process" => Ok(KillMode::Process),
        "none" => Ok(KillMode::None),
        _ => Err(invalid(e, "expected control-group, mixed, process or none")),
    }
}

fn cpu_quota(e: &Entry) -> Result<u32, String> {
    match parse_percent(&e.value) {
        Ok(0) => Err(invalid(e, "must be above 0%")),
        Ok(p) => Ok(p),
        Err(m) => Err(invalid(e, &m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: &str = "/etc/keel/units/a.service";

    fn ini(path: &str, text: &str) -> IniFile {
        IniFile::parse(Path::new(path), text).expect("test INI parses")
    }

    fn run(name: &str, texts: &[(&str, &str)]) -> (Option<Unit>, Vec<Diagnostic>) {
        let files: Vec<IniFile> = texts.iter().map(|(p, t)| ini(p, t)).collect();
        Unit::from_ini(UnitName::parse(name).expect("name"), &files, "node1")
    }

    fn load(name: &str, text: &str) -> (Option<Unit>, Vec<Diagnostic>) {
        run(name, &[(MAIN, text)])
    }

    /// A usable unit (warnings allowed).
    fn unit(name: &str, text: &str) -> Unit {
        let (u, d) = load(name, text);
        u.unwrap_or_else(|| panic!("unit unusable: {d:?}"))
    }

    fn svc(text: &str) -> ServiceSpec {
        unit("a.service", text).service.expect("service")
    }

    fn messages(d: &[Diagnostic], sev: Severity) -> Vec<String> {
        d.iter()
            .filter(|d| d.severity == sev)
            .map(|d| d.to_string())
            .collect()
    }

    /// The unit is unusable and exactly these errors (rendered `file:line: error: …`) were produced.
    fn errors(name: &str, text: &str) -> Vec<String> {
        let (u, d) = load(name, text);
        assert!(u.is_none(), "unit should be unusable: {d:?}");
        messages(&d, Severity::Error)
    }

    fn warnings(name: &str, text: &str) -> Vec<String> {
        let (u, d) = load(name, text);
        assert!(u.is_some(), "unit should be usable: {d:?}");
        messages(&d, Severity::Warning)
    }

    fn argv(cmds: &[ExecCommand]) -> Vec<Vec<&str>> {
        cmds.iter()
            .map(|c| c.argv.iter().map(String::as_str).collect())
            .collect()
    }

    const SIMPLE: &str = "[Service]\nExecStart=/bin/true\n";

    #[test]
    fn minimal_service_has_systemd_defaults() {
        let u = unit("a.service", SIMPLE);
        assert_eq!(u.sources, vec![PathBuf::from(MAIN)]);
        assert_eq!(u.description, "");
        assert_eq!(u.description_or_name(), "a.service");
        let s = u.service.expect("service");
        assert_eq!(argv(&s.exec_start), vec![vec!["/bin/true"]]);
        let want = ServiceSpec {
            exec_start: s.exec_start.clone(),
            ..ServiceSpec::default()
        };
        assert_eq!(s, want);
        assert_eq!(s.kind, ServiceType::Simple);
        assert_eq!(s.timeout_start, Some(Duration::from_secs(90)));
    }

    #[test]
    fn description_expands_specifiers() {
        let u = unit(
            "web@8080.service",
            "[Unit]\nDescription=Web %i on %H (%n)\n[Service]\nExecStart=/bin/web\n",
        );
        assert_eq!(u.description, "Web 8080 on node1 (web@8080.service)");
        assert_eq!(u.description_or_name(), u.description);
    }

    #[test]
    fn dependency_lists_accumulate_and_dedupe() {
        let u = unit(
            "a.service",
            "[Unit]\nWants=b.service c.service\nWants=b.service d.target\nRequires=r.service\n\
             BindsTo=x.service\nAfter=b.service\nBefore=z.target\nConflicts=q.service\n[Service]\nExecStart=/bin/a\n",
        );
        assert_eq!(u.wants, vec!["b.service", "c.service", "d.target"]);
        assert_eq!(u.requires, vec!["r.service"]);
        assert_eq!(u.binds_to, vec!["x.service"]);
        assert_eq!(u.after, vec!["b.service"]);
        assert_eq!(u.before, vec!["z.target"]);
        assert_eq!(u.conflicts, vec!["q.service"]);
    }

    #[test]
    fn empty_assignment_resets_dependency_list_across_drop_ins() {
        let (u, d) = run(
            "a.service",
            &[
                (
                    MAIN,
                    "[Unit]\nAfter=b.service c.service\n[Service]\nExecStart=/bin/a\n",
                ),
                (
                    "/etc/keel/units/a.service.d/10.conf",
                    "[Unit]\nAfter=\nAfter=x.service\n",
                ),
            ],
        );
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(u.expect("usable").after, vec!["x.service"]);
    }

    #[test]
    fn dependency_on_other_systemd_type_is_dropped_with_warning() {
        let w = warnings(
            "a.service",
            "[Unit]\nRequires=docker.socket b.service\n[Service]\nExecStart=/bin/a\n",
        );
        assert_eq!(
            w,
            vec![format!(
                "{MAIN}:2: warning: Requires=docker.socket ignored: Keel only has .service and .target units"
            )]
        );
        assert_eq!(
            unit(
                "a.service",
                "[Unit]\nAfter=x.mount\n[Service]\nExecStart=/a\n"
            )
            .after,
            Vec::<String>::new()
        );
    }

    #[test]
    fn invalid_or_template_dependency_is_an_error_on_its_line() {
        let e = errors(
            "a.service",
            "[Unit]\nDescription=x\nWants=bad!name.service\n[Service]\nExecStart=/bin/a\n",
        );
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with(&format!("{MAIN}:3: error: invalid unit name in Wants=")),
            "{e:?}"
        );
        let e = errors(
            "a.service",
            "[Unit]\nWants=web@.service\n[Service]\nExecStart=/bin/a\n",
        );
        assert!(e[0].contains("'web@.service' is a template"), "{e:?}");
    }

    #[test]
    fn dependency_specifiers_expand() {
        let u = unit(
            "web@3.service",
            "[Unit]\nRequires=db@%i.service\nAfter=%p-setup.service\n[Service]\nExecStart=/a\n",
        );
        assert_eq!(u.requires, vec!["db@3.service"]);
        assert_eq!(u.after, vec!["web-setup.service"]);
    }

    #[test]
    fn install_section() {
        let u = unit(
            "a.service",
            "[Service]\nExecStart=/a\n[Install]\nWantedBy=multi-user.target\nRequiredBy=b.target\nWantedBy=c.target\n",
        );
        assert_eq!(u.install.wanted_by, vec!["multi-user.target", "c.target"]);
        assert_eq!(u.install.required_by, vec!["b.target"]);
        let w = warnings(
            "a.service",
            "[Service]\nExecStart=/a\n[Install]\nAlias=x.service\n",
        );
        assert_eq!(
            w,
            vec![format!(
                "{MAIN}:4: warning: unknown key 'Alias' in section [Install], ignored"
            )]
        );
    }

    #[test]
    fn exec_quoting_and_ignore_failure() {
        let s = svc(concat!(
            "[Service]\n",
            "ExecStartPre=-/bin/mkdir -p \"/var/lib/my app\"\n",
            "ExecStart=/bin/sh -c 'echo \"hi there\"; exit 0'\n",
            "ExecStartPost=/bin/echo a\\ b \\x41\n",
            "ExecStop=-kill-helper --now\n",
        ));
        assert_eq!(
            argv(&s.exec_start_pre),
            vec![vec!["/bin/mkdir", "-p", "/var/lib/my app"]]
        );
        assert!(s.exec_start_pre[0].ignore_failure);
        assert_eq!(
            argv(&s.exec_start),
            vec![vec!["/bin/sh", "-c", "echo \"hi there\"; exit 0"]]
        );
        assert!(!s.exec_start[0].ignore_failure);
        assert_eq!(
            argv(&s.exec_start_post),
            vec![vec!["/bin/echo", "a b", "A"]]
        );
        assert_eq!(argv(&s.exec_stop), vec![vec!["kill-helper", "--now"]]);
        assert!(s.exec_stop[0].ignore_failure);
    }

    #[test]
    fn exec_unsupported_prefixes_warn_and_are_stripped() {
        let (u, d) = load(
            "a.service",
            "[Service]\nExecStart=+!-/bin/a x\nExecStop=@/bin/sleep sleepy 5\n",
        );
        let s = u.expect("usable").service.expect("service");
        assert_eq!(argv(&s.exec_start), vec![vec!["/bin/a", "x"]]);
        assert!(s.exec_start[0].ignore_failure);
        assert_eq!(argv(&s.exec_stop), vec![vec!["/bin/sleep", "5"]]);
        let w = messages(&d, Severity::Warning);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(
            w[0].contains(":2: warning: prefix '!' in ExecStart="),
            "{w:?}"
        );
        assert!(
            w[1].contains(":2: warning: prefix '+' in ExecStart="),
            "{w:?}"
        );
        assert!(
            w[2].contains(":3: warning: argv[0] override 'sleepy'"),
            "{w:?}"
        );
    }

    #[test]
    fn exec_errors() {
        let e = errors("a.service", "[Service]\nExecStart=bin/a\n");
        assert_eq!(
            e,
            vec![format!("{MAIN}:2: error: executable 'bin/a' in ExecStart= must be an absolute path or a bare name")]
        );
        let e = errors(
            "a.service",
            "[Service]\nExecStart=/bin/sh -c \"unterminated\n",
        );
        assert!(
            e[0].contains(":2: error: ExecStart=: unterminated \" quote"),
            "{e:?}"
        );
        let e = errors("a.service", "[Service]\nExecStart=/a\nExecStop=-\n");
        assert!(
            e[0].contains(":3: error: ExecStop= has an empty executable"),
            "{e:?}"
        );
        let e = errors("a.service", "[Service]\nExecStart=@/bin/a\n");
        assert!(e[0].contains("needs an argv[0] word"), "{e:?}");
    }

    #[test]
    fn bare_program_name_is_accepted() {
        assert_eq!(
            argv(&svc("[Service]\nExecStart=sleep 10\n").exec_start),
            vec![vec!["sleep", "10"]]
        );
    }

    #[test]
    fn second_exec_start_is_an_error_unless_oneshot() {
        let e = errors("a.service", "[Service]\nExecStart=/a\n\nExecStart=/b\n");
        assert_eq!(
            e,
            vec![format!(
                "{MAIN}:4: error: ExecStart= given 2 times; more than one is only allowed for Type=oneshot"
            )]
        );
        let s = svc("[Service]\nExecStart=/a\nExecStart=/b\nType=oneshot\n");
        assert_eq!(argv(&s.exec_start), vec![vec!["/a"], vec!["/b"]]);
    }

    #[test]
    fn drop_in_resets_exec_start() {
        let drop_in = "/etc/keel/units/a.service.d/override.conf";
        let (u, d) = run(
            "a.service",
            &[
                (MAIN, "[Service]\nExecStart=/old --flag\n"),
                (drop_in, "[Service]\nExecStart=\nExecStart=/new\n"),
            ],
        );
        assert!(d.is_empty(), "{d:?}");
        let u = u.expect("usable");
        assert_eq!(
            argv(&u.service.expect("service").exec_start),
            vec![vec!["/new"]]
        );
        assert_eq!(u.sources, vec![PathBuf::from(MAIN), PathBuf::from(drop_in)]);
    }

    #[test]
    fn drop_in_adding_exec_start_without_reset_points_at_drop_in() {
        let drop_in = "/etc/keel/units/a.service.d/override.conf";
        let (u, d) = run(
            "a.service",
            &[(MAIN, SIMPLE), (drop_in, "\n[Service]\nExecStart=/new\n")],
        );
        assert!(u.is_none());
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].file.to_str(), d[0].line), (Some(drop_in), 3));
    }

    #[test]
    fn drop_in_scalar_overrides_main() {
        let (u, _) = run(
            "a.service",
            &[
                (MAIN, "[Service]\nExecStart=/a\nRestart=always\nUser=a\n"),
                ("/d/x.conf", "[Service]\nRestart=no\nUser=\n"),
            ],
        );
        let s = u.expect("usable").service.expect("service");
        assert_eq!((s.restart, s.user), (RestartPolicy::No, None));
    }

    #[test]
    fn service_without_exec_start_is_an_error() {
        assert_eq!(
            errors("a.service", "[Unit]\nDescription=x\n[Service]\nUser=x\n"),
            vec![format!("{MAIN}:0: error: service has no ExecStart=")]
        );
        assert!(!errors("a.service", "[Service]\nType=simple\nExecStop=/bin/stop\n").is_empty());
        assert!(!errors("a.service", "[Service]\nType=oneshot\n").is_empty());
    }

    #[test]
    fn oneshot_with_only_exec_stop_is_fine_and_type_defaults_to_oneshot() {
        let s = svc("[Service]\nRemainAfterExit=yes\nExecStop=/bin/cleanup\n");
        assert_eq!(s.kind, ServiceType::Oneshot);
        assert!(s.remain_after_exit);
        assert_eq!(
            svc("[Service]\nType=oneshot\nExecStop=/bin/c\n").kind,
            ServiceType::Oneshot
        );
    }

    #[test]
    fn template_instance_specifiers_everywhere() {
        let u = unit(
            "web@srv-data.service",
            concat!(
                "[Service]\n",
                "ExecStart=/bin/web --port=%i --data=%I --name \"%p on %H\"\n",
                "Environment=INST=%i \"WHO=%N x\"\n",
                "EnvironmentFile=-/etc/web/%i.env\n",
                "WorkingDirectory=/srv/%I\n",
                "User=%p\n",
                "[X-Fleet]\n",
                "Conflicts=%p@*.service\n",
            ),
        );
        let s = u.service.clone().expect("service");
        assert_eq!(
            argv(&s.exec_start),
            vec![vec![
                "/bin/web",
                "--port=srv-data",
                "--data=srv/data",
                "--name",
                "web on node1"
            ]]
        );
        assert_eq!(
            s.environment,
            vec![
                ("INST".into(), "srv-data".into()),
                ("WHO".into(), "web@srv-data x".into())
            ]
        );
        assert_eq!(
            s.environment_files,
            vec![(PathBuf::from("/etc/web/srv-data.env"), true)]
        );
        assert_eq!(s.working_directory, Some(PathBuf::from("/srv/srv/data")));
        assert_eq!(s.user.as_deref(), Some("web"));
    }

    #[test]
    fn relative_expanded_working_directory_is_an_error() {
        let (u, d) = load(
            "web@srv-data.service",
            "[Service]\nExecStart=/a\nWorkingDirectory=%I\n",
        );
        assert!(u.is_none());
        assert!(
            d[0].message
                .contains("for WorkingDirectory= (expected an absolute path)"),
            "{d:?}"
        );
    }

    #[test]
    fn working_directory_forms() {
        let s = svc("[Service]\nExecStart=/a\nWorkingDirectory=-/srv/%p\n");
        assert_eq!(s.working_directory, Some(PathBuf::from("/srv/a")));
        assert!(
            errors("a.service", "[Service]\nExecStart=/a\nWorkingDirectory=~\n")[0]
                .contains("'~' is not supported")
        );
    }

    #[test]
    fn specifiers_in_exec_and_extra_sections() {
        let u = unit(
            "web@7.service",
            "[Service]\nExecStart=/bin/web %i\n[X-Fleet]\nConflicts=%p@*.service\nMachineOf=\n[Container]\nImage=reg/web:%i\n",
        );
        assert_eq!(
            argv(&u.service.expect("svc").exec_start),
            vec![vec!["/bin/web", "7"]]
        );
        assert_eq!(
            u.extra_sections.get("X-Fleet"),
            Some(&vec![
                ("Conflicts".into(), "web@*.service".into()),
                ("MachineOf".into(), String::new())
            ])
        );
        assert_eq!(
            u.extra_sections.get("Container"),
            Some(&vec![("Image".into(), "reg/web:7".into())])
        );
    }

    #[test]
    fn extra_sections_append_across_drop_ins() {
        let (u, _) = run(
            "a.service",
            &[
                (MAIN, "[Service]\nExecStart=/a\n[X-Fleet]\nA=1\n"),
                ("/d/1.conf", "[X-Fleet]\nB=2\n"),
            ],
        );
        let x = u.expect("usable").extra_sections;
        assert_eq!(
            x.get("X-Fleet"),
            Some(&vec![("A".into(), "1".into()), ("B".into(), "2".into())])
        );
    }

    #[test]
    fn unknown_specifier_is_an_error_with_line() {
        let e = errors("a.service", "[Service]\nExecStart=/bin/a %Q\n");
        assert_eq!(
            e,
            vec![format!("{MAIN}:2: error: unknown specifier '%Q' in '%Q'")]
        );
        assert!(!errors("a.service", "[Service]\nExecStart=/a\n[X-Fleet]\nK=%z\n").is_empty());
    }

    #[test]
    fn percent_escape_in_exec() {
        assert_eq!(
            argv(&svc("[Service]\nExecStart=/bin/printf 100%%\n").exec_start),
            vec![vec!["/bin/printf", "100%"]]
        );
    }

    #[test]
    fn environment_quoting_reset_and_errors() {
        let s = svc(
            "[Service]\nExecStart=/a\nEnvironment=A=1 \"B=two words\" 'C=x=y'\nEnvironment=D=\n",
        );
        let want: Vec<(String, String)> = [("A", "1"), ("B", "two words"), ("C", "x=y"), ("D", "")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(s.environment, want);
        let s = svc("[Service]\nExecStart=/a\nEnvironment=A=1\nEnvironment=\nEnvironment=B=2\n");
        assert_eq!(s.environment, vec![("B".to_string(), "2".to_string())]);
        let e = errors(
            "a.service",
            "[Service]\nExecStart=/a\nEnvironment=NOEQUALS\n",
        );
        assert_eq!(e, vec![format!("{MAIN}:3: error: invalid assignment 'NOEQUALS' in Environment= (expected NAME=value)")]);
        assert!(!errors("a.service", "[Service]\nExecStart=/a\nEnvironment=1X=2\n").is_empty());
    }

    #[test]
    fn environment_files() {
        let s = svc(
            "[Service]\nExecStart=/a\nEnvironmentFile=/etc/a.env\nEnvironmentFile=-/etc/b.env\n",
        );
        assert_eq!(
            s.environment_files,
            vec![
                (PathBuf::from("/etc/a.env"), false),
                (PathBuf::from("/etc/b.env"), true)
            ]
        );
        let s = svc("[Service]\nExecStart=/a\nEnvironmentFile=/etc/a.env\nEnvironmentFile=\n");
        assert!(s.environment_files.is_empty());
        assert!(errors(
            "a.service",
            "[Service]\nExecStart=/a\nEnvironmentFile=rel.env\n"
        )[0]
        .contains("EnvironmentFile="));
    }

    #[test]
    fn restart_values() {
        assert_eq!(svc(SIMPLE).restart, RestartPolicy::No);
        for (v, want) in [
            ("no", RestartPolicy::No),
            ("on-failure", RestartPolicy::OnFailure),
            ("always", RestartPolicy::Always),
        ] {
            assert_eq!(svc(&format!("{SIMPLE}Restart={v}\n")).restart, want);
        }
        let e = errors(
            "a.service",
            "[Unit]\n\n[Service]\nExecStart=/a\n\n\n\n\n\n\n\nRestart=sometimes\n",
        );
        assert_eq!(
            e,
            vec![format!("{MAIN}:12: error: invalid value 'sometimes' for Restart= (expected no, on-failure or always)")]
        );
    }

    #[test]
    fn restart_systemd_variants_map_with_warning() {
        for v in ["on-abnormal", "on-abort", "on-watchdog"] {
            let text = format!("{SIMPLE}Restart={v}\n");
            assert_eq!(svc(&text).restart, RestartPolicy::OnFailure);
            assert_eq!(warnings("a.service", &text).len(), 1);
        }
        let text = format!("{SIMPLE}Restart=on-success\n");
        assert_eq!(svc(&text).restart, RestartPolicy::Always);
        assert!(warnings("a.service", &text)[0]
            .contains(":3: warning: Restart=on-success is treated as Restart=always"));
    }

    #[test]
    fn service_types() {
        for (v, want) in [
            ("simple", ServiceType::Simple),
            ("exec", ServiceType::Exec),
            ("notify", ServiceType::Notify),
            ("oneshot", ServiceType::Oneshot),
            ("idle", ServiceType::Simple),
            ("notify-reload", ServiceType::Notify),
        ] {
            assert_eq!(svc(&format!("{SIMPLE}Type={v}\n")).kind, want, "{v}");
        }
        assert_eq!(
            warnings("a.service", &format!("{SIMPLE}Type=idle\n")).len(),
            1
        );
    }

    #[test]
    fn forking_and_dbus_are_unsupported_errors() {
        for v in ["forking", "dbus"] {
            let e = errors("a.service", &format!("{SIMPLE}Type={v}\n"));
            assert_eq!(e.len(), 1);
            assert!(
                e[0].contains(&format!(":3: error: Type={v} is unsupported")),
                "{e:?}"
            );
        }
        let e = errors("a.service", &format!("{SIMPLE}Type=weird\n"));
        assert!(e[0].contains(
            "invalid value 'weird' for Type= (expected simple, exec, notify or oneshot)"
        ));
    }

    #[test]
    fn kill_modes() {
        assert_eq!(svc(SIMPLE).kill_mode, KillMode::ControlGroup);
        for (v, want) in [
            ("control-group", KillMode::ControlGroup),
            ("mixed", KillMode::Mixed),
            ("process", KillMode::Process),
            ("none", KillMode::None),
        ] {
            assert_eq!(svc(&format!("{SIMPLE}KillMode={v}\n")).kill_mode, want);
        }
        assert!(
            errors("a.service", &format!("{SIMPLE}KillMode=all\n"))[0].contains("for KillMode=")
        );
    }

    #[test]
    fn remain_after_exit_booleans() {
        for v in ["1", "yes", "true", "on"] {
            assert!(
                svc(&format!("{SIMPLE}RemainAfterExit={v}\n")).remain_after_exit,
                "{v}"
            );
        }
        for v in ["0", "no", "false", "off"] {
            assert!(
                !svc(&format!("{SIMPLE}RemainAfterExit={v}\n")).remain_after_exit,
                "{v}"
            );
        }
        let e = errors("a.service", &format!("{SIMPLE}RemainAfterExit=maybe\n"));
        assert_eq!(
            e,
            vec![format!(
                "{MAIN}:3: error: invalid value 'maybe' for RemainAfterExit= (expected a boolean)"
            )]
        );
    }

    #[test]
    fn timeouts() {
        let s = svc(&format!("{SIMPLE}TimeoutSec=30\n"));
        assert_eq!(
            (s.timeout_start, s.timeout_stop),
            (Some(Duration::from_secs(30)), Some(Duration::from_secs(30)))
        );
        let s = svc(&format!(
            "{SIMPLE}TimeoutSec=30\nTimeoutStopSec=1min 30s\nTimeoutStartSec=infinity\n"
        ));
        assert_eq!(
            (s.timeout_start, s.timeout_stop),
            (None, Some(Duration::from_secs(90)))
        );
        assert_eq!(
            svc(&format!("{SIMPLE}TimeoutStartSec=0\n")).timeout_start,
            None
        );
        let e = errors("a.service", &format!("{SIMPLE}TimeoutSec=soon\n"));
        assert!(
            e[0].contains(":3: error: invalid value 'soon' for TimeoutSec="),
            "{e:?}"
        );
    }

    #[test]
    fn restart_sec() {
        assert_eq!(svc(SIMPLE).restart_sec, Duration::from_millis(100));
        assert_eq!(
            svc(&format!("{SIMPLE}RestartSec=2.5s\n")).restart_sec,
            Duration::from_millis(2500)
        );
        assert_eq!(
            svc(&format!("{SIMPLE}RestartSec=5\n")).restart_sec,
            Duration::from_secs(5)
        );
        assert!(
            errors("a.service", &format!("{SIMPLE}RestartSec=infinity\n"))[0]
                .contains("infinity is not allowed")
        );
    }

    #[test]
    fn start_limits_in_unit_and_old_names_in_service() {
        let s =
            svc("[Unit]\nStartLimitIntervalSec=1min\nStartLimitBurst=3\n[Service]\nExecStart=/a\n");
        assert_eq!(
            (s.start_limit_interval, s.start_limit_burst),
            (Duration::from_secs(60), 3)
        );
        let s = svc("[Service]\nExecStart=/a\nStartLimitInterval=20s\nStartLimitBurst=7\n");
        assert_eq!(
            (s.start_limit_interval, s.start_limit_burst),
            (Duration::from_secs(20), 7)
        );
        let s = svc("[Unit]\nStartLimitIntervalSec=infinity\n[Service]\nExecStart=/a\n");
        assert_eq!(s.start_limit_interval, START_LIMIT_INTERVAL_INFINITY);
        let s = svc("[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=/a\n");
        assert_eq!(s.start_limit_interval, Duration::ZERO);
        assert!(errors(
            "a.service",
            "[Unit]\nStartLimitBurst=-1\n[Service]\nExecStart=/a\n"
        )[0]
        .contains(":2: error"));
    }

    #[test]
    fn memory_max() {
        assert_eq!(svc(SIMPLE).memory_max, None);
        assert_eq!(
            svc(&format!("{SIMPLE}MemoryMax=512M\n")).memory_max,
            Some(512 << 20)
        );
        assert_eq!(
            svc(&format!("{SIMPLE}MemoryMax=2G\n")).memory_max,
            Some(2 << 30)
        );
        assert_eq!(
            svc(&format!("{SIMPLE}MemoryMax=4096\n")).memory_max,
            Some(4096)
        );
        assert_eq!(
            svc(&format!("{SIMPLE}MemoryMax=1T\n")).memory_max,
            Some(1 << 40)
        );
        assert_eq!(
            svc(&format!("{SIMPLE}MemoryMax=1K\nMemoryMax=infinity\n")).memory_max,
            None
        );
        assert_eq!(
            svc(&format!("{SIMPLE}MemoryLimit=1K\n")).memory_max,
            Some(1024)
        );
        let text = format!("{SIMPLE}MemoryMax=50%\n");
        assert_eq!(svc(&text).memory_max, None);
        assert!(warnings("a.service", &text)[0].contains("percentage is not supported"));
        assert!(
            errors("a.service", &format!("{SIMPLE}MemoryMax=lots\n"))[0].contains("for MemoryMax=")
        );
    }

    #[test]
    fn cpu_quota_and_tasks_max() {
        let s = svc(&format!("{SIMPLE}CPUQuota=150%\nTasksMax=64\n"));
        assert_eq!((s.cpu_quota_percent, s.tasks_max), (Some(150), Some(64)));
        assert_eq!(
            svc(&format!("{SIMPLE}TasksMax=64\nTasksMax=infinity\n")).tasks_max,
            None
        );
        assert_eq!(
            warnings("a.service", &format!("{SIMPLE}TasksMax=10%\n")).len(),
            1
        );
        assert!(errors("a.service", &format!("{SIMPLE}CPUQuota=50\n"))[0].contains("for CPUQuota="));
        assert!(errors("a.service", &format!("{SIMPLE}CPUQuota=0%\n"))[0].contains("above 0%"));
        assert!(
            errors("a.service", &format!("{SIMPLE}TasksMax=many\n"))[0].contains("for TasksMax=")
        );
    }

    #[test]
    fn condition_path_exists() {
        let u = unit(
            "a@x.service",
            "[Unit]\nConditionPathExists=/etc/%i.conf\nConditionPathExists=!/run/skip\n[Service]\nExecStart=/a\n",
        );
        assert_eq!(
            u.conditions,
            vec![
                Condition::PathExists {
                    path: PathBuf::from("/etc/x.conf"),
                    negate: false
                },
                Condition::PathExists {
                    path: PathBuf::from("/run/skip"),
                    negate: true
                },
            ]
        );
        let u = unit(
            "a.service",
            "[Unit]\nConditionPathExists=/x\nConditionPathExists=\n[Service]\nExecStart=/a\n",
        );
        assert!(u.conditions.is_empty());
        assert!(errors(
            "a.service",
            "[Unit]\nConditionPathExists=relative\n[Service]\nExecStart=/a\n"
        )[0]
        .contains(":2: error"));
        assert_eq!(
            warnings(
                "a.service",
                "[Unit]\nConditionPathExists=|/x\n[Service]\nExecStart=/a\n"
            )
            .len(),
            1
        );
    }

    #[test]
    fn unknown_key_warns_with_exact_message_and_unit_stays_usable() {
        let w = warnings(
            "a.service",
            "[Service]\nExecStart=/a\nPIDFile=/run/a.pid\n[Unit]\nFoo=bar\n",
        );
        assert_eq!(
            w,
            vec![
                format!("{MAIN}:3: warning: unknown key 'PIDFile' in section [Service], ignored"),
                format!("{MAIN}:5: warning: unknown key 'Foo' in section [Unit], ignored"),
            ]
        );
        let w = warnings("a.service", "[Service]\nExecStart=/a\nBogus=\n");
        assert_eq!(w.len(), 1, "an empty unknown key is still reported");
    }

    #[test]
    fn unknown_section_warns_once_per_file() {
        let w = warnings(
            "a.service",
            "[Service]\nExecStart=/a\n[Socket]\nListenStream=80\nAccept=no\n",
        );
        assert_eq!(
            w,
            vec![format!(
                "{MAIN}:4: warning: unknown section [Socket], ignored"
            )]
        );
    }

    #[test]
    fn documentation_and_default_dependencies_are_accepted() {
        let text = "[Unit]\nDocumentation=man:x(1) https://x\nDefaultDependencies=no\n[Service]\nExecStart=/a\n";
        assert!(warnings("a.service", text).is_empty());
        assert!(!errors(
            "a.service",
            "[Unit]\nDefaultDependencies=perhaps\n[Service]\nExecStart=/a\n"
        )
        .is_empty());
    }

    #[test]
    fn user_and_group() {
        let s = svc(&format!("{SIMPLE}User=web\nGroup=www-data\n"));
        assert_eq!(
            (s.user.as_deref(), s.group.as_deref()),
            (Some("web"), Some("www-data"))
        );
    }

    #[test]
    fn target_ignores_service_section_with_warning() {
        let (u, d) = load(
            "multi-user.target",
            "[Unit]\nDescription=Multi-User\nWants=a.service\n[Service]\nExecStart=/a\nUser=x\n",
        );
        let u = u.expect("usable");
        assert_eq!(u.service, None);
        assert_eq!(u.wants, vec!["a.service"]);
        assert_eq!(
            messages(&d, Severity::Warning),
            vec![format!(
                "{MAIN}:5: warning: [Service] section is ignored in a target unit"
            )]
        );
        assert!(
            load("x.target", "[Unit]\nDescription=x\n").0.is_some(),
            "targets need no ExecStart"
        );
    }

    #[test]
    fn every_error_is_reported_not_just_the_first() {
        let e = errors(
            "a.service",
            "[Service]\nExecStart=/a\nRestart=x\nKillMode=y\nType=z\n",
        );
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].contains(":3:") && e[1].contains(":4:") && e[2].contains(":5:"));
    }

    #[test]
    fn empty_scalar_assignment_restores_default() {
        let s = svc(&format!("{SIMPLE}Restart=always\nRestart=\nTimeoutSec=5\nTimeoutSec=\nKillMode=none\nKillMode=\n"));
        assert_eq!(s.restart, RestartPolicy::No);
        assert_eq!(s.timeout_start, Some(Duration::from_secs(90)));
        assert_eq!(s.kill_mode, KillMode::ControlGroup);
    }

    #[test]
    fn bad_value_on_continued_line_reports_first_line() {
        let e = errors(
            "a.service",
            "[Service]\nExecStart=/bin/a \\\n  --flag\nRestart=\\\n  sometimes\n",
        );
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with(&format!("{MAIN}:4: error: invalid value 'sometimes'")),
            "{e:?}"
        );
        let s = svc("[Service]\nExecStart=/bin/a \\\n  --flag\n");
        assert_eq!(argv(&s.exec_start), vec![vec!["/bin/a", "--flag"]]);
    }

    #[test]
    fn environment_in_systemd_documented_form() {
        let s = svc("[Service]\nExecStart=/a\nEnvironment=\"A=1\" \"B=two words\"\n");
        let want = vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "two words".to_string()),
        ];
        assert_eq!(s.environment, want);
    }

    #[test]
    fn podman_style_runtime_specifiers() {
        let s = svc("[Service]\nExecStart=/usr/bin/podman run --conmon-pidfile %t/%n-pid\n");
        assert_eq!(s.exec_start[0].argv[3], "/run/a.service-pid");
    }

    #[test]
    fn no_files_is_an_error() {
        let (u, d) = Unit::from_ini(UnitName::parse("a.service").expect("name"), &[], "h");
        assert!(u.is_none());
        assert_eq!(d[0].message, "no unit file given");
    }
}
