//! cgroup v2 bookkeeping: one cgroup per unit under init's own cgroup, limits, and killing a whole unit.
//!
//! Owns: creating `<base>/<unit>` directories, writing `memory.max`, `cpu.max`, `pids.max`, reading
//! `cgroup.procs`/`memory.events`, `cgroup.kill`, and removing empty unit cgroups.
//! Does not: decide when to kill (see `supervisor`) or start processes (see `spawn`).
//!
//! Layout: init finds its own cgroup from /proc/self/cgroup. If that is not the hierarchy's root it moves itself
//! into `<base>/init.scope` (cgroup v2 forbids processes in a cgroup whose controllers are delegated), enables
//! the available controllers in `<base>`, and puts each unit in `<base>/<unit name>`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use keel_model::ServiceSpec;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted at {0}; units run without cgroups (no limits, kill by pid only)")]
    NotMounted(PathBuf),
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_path_buf(), source }
}

/// init's view of its cgroup subtree.
#[derive(Debug, Clone)]
pub struct Cgroups {
    base: PathBuf,
    controllers: Vec<String>,
}

/// Counters a unit's cgroup reports after its processes exit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Events {
    pub oom_kills: u64,
}

impl Cgroups {
    /// Set up init's subtree under the cgroup2 mount at `mount` (normally /sys/fs/cgroup).
    pub fn setup(mount: &Path) -> Result<Cgroups, CgroupError> {
        if !mount.join("cgroup.controllers").exists() {
            return Err(CgroupError::NotMounted(mount.to_path_buf()));
        }
        let own = own_cgroup_path().unwrap_or_else(|| "/".into());
        let base = mount.join(own.trim_start_matches('/'));
        if own != "/" {
            let scope = base.join("init.scope");
            fs::create_dir_all(&scope).map_err(io_err(&scope))?;
            let procs = scope.join("cgroup.procs");
            fs::write(&procs, b"0").map_err(io_err(&procs))?;
        }
        let available = fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
        let mut controllers = Vec::new();
        for c in available.split_whitespace() {
            if ["memory", "pids", "cpu"].contains(&c) {
                let ctl = base.join("cgroup.subtree_control");
                if fs::write(&ctl, format!("+{c}")).is_ok() {
                    controllers.push(c.to_string());
                }
            }
        }
        Ok(Cgroups { base, controllers })
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    pub fn has_controller(&self, name: &str) -> bool {
        self.controllers.iter().any(|c| c == name)
    }

    pub fn unit_path(&self, unit: &str) -> PathBuf {
        self.base.join(unit)
    }

    /// Create the unit's cgroup (if needed) and apply its limits. Returns warnings for limits this kernel's
    /// cgroup2 cannot enforce (e.g. a hybrid host where the memory controller is bound to cgroup v1).
    pub fn prepare_unit(&self, unit: &str, spec: &ServiceSpec) -> Result<Vec<String>, CgroupError> {
        let path = self.unit_path(unit);
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        let mut warnings = Vec::new();
        let limits = [
            ("memory", "memory.max", spec.memory_max.map(|v| v.to_string()), "MemoryMax"),
            ("pids", "pids.max", spec.tasks_max.map(|v| v.to_string()), "TasksMax"),
            ("cpu", "cpu.max", spec.cpu_quota_percent.map(|p| format!("{} 100000", u64::from(p) * 1000)), "CPUQuota"),
        ];
        for (controller, file, value, key) in limits {
            let Some(value) = value else { continue };
            if !self.has_controller(controller) {
                warnings.push(format!("{key}= ignored: the {controller} controller is not available in cgroup2 here"));
                continue;
            }
            let f = path.join(file);
            fs::write(&f, &value).map_err(io_err(&f))?;
        }
        Ok(warnings)
    }

    /// Open the unit's `cgroup.procs` for a child to join before exec.
    pub fn procs_file(&self, unit: &str) -> Result<fs::File, CgroupError> {
        let p = self.unit_path(unit).join("cgroup.procs");
        fs::OpenOptions::new().write(true).open(&p).map_err(io_err(&p))
    }

    /// Pids currently in the unit's cgroup (empty if it does not exist).
    pub fn pids(&self, unit: &str) -> Vec<i32> {
        let p = self.unit_path(unit).join("cgroup.procs");
        fs::read_to_string(p)
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    pub fn is_empty(&self, unit: &str) -> bool {
        self.pids(unit).is_empty()
    }

    /// Send `sig` to every process in the unit's cgroup. SIGKILL uses `cgroup.kill`, which is atomic
    /// against forks; other signals go pid by pid.
    pub fn signal_all(&self, unit: &str, sig: nix::sys::signal::Signal) {
        if sig == nix::sys::signal::Signal::SIGKILL {
            let kill = self.unit_path(unit).join("cgroup.kill");
            if fs::write(kill, b"1").is_ok() {
                return;
            }
        }
        for pid in self.pids(unit) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    pub fn events(&self, unit: &str) -> Events {
        let p = self.unit_path(unit).join("memory.events");
        let text = fs::read_to_string(p).unwrap_or_default();
        let oom_kills = text
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Events { oom_kills }
    }

    /// Remove the unit's cgroup once it is empty; harmless if it is not.
    pub fn remove(&self, unit: &str) {
        let _ = fs::remove_dir(self.unit_path(unit));
    }

    /// The unit a pid belongs to, by its cgroup path (for sd_notify sender checks).
    pub fn unit_of_pid(&self, pid: i32) -> Option<String> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        let own = own_cgroup_path().unwrap_or_else(|| "/".into());
        let own_trim = own.trim_end_matches('/');
        let rest = path.strip_prefix(own_trim)?.trim_start_matches('/');
        let unit = rest.split('/').next()?;
        (!unit.is_empty() && unit != "init.scope").then(|| unit.to_string())
    }
}

/// init's own cgroup v2 path from /proc/self/cgroup (the `0::` line), with `/init.scope` stripped so the
/// answer stays the same after init moved itself there.
fn own_cgroup_path() -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    let p = text.lines().find_map(|l| l.strip_prefix("0::"))?.to_string();
    let p = p.strip_suffix("/init.scope").map(str::to_string).unwrap_or(p);
    Some(if p.is_empty() { "/".to_string() } else { p })
}
