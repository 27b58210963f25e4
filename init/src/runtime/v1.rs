//! cgroup v1 limits for containers on hybrid hosts (cgroup2 mounted, but the memory and pids controllers bound to
//! v1 hierarchies, as on this project's build machine): `MemoryMax=` and `TasksMax=` still hold for containers.
//!
//! Owns: `<v1 mount>/{memory,pids}/<init's own v1 path>/keel.<unit>` — created before the container starts (the
//! child joins them right after the unit's cgroup2 cgroup), read for OOM kills when the container's first process
//! exits, removed at cleanup. A controller whose v1 hierarchy is mounted cannot be in cgroup2, so the presence of
//! `/sys/fs/cgroup/<controller>/cgroup.procs` is what selects this path.
//! Does not: touch cgroup2 (see `crate::cgroup`) or apply anything but these two limits.

use std::fs;
use std::path::{Path, PathBuf};

const V1: &str = "/sys/fs/cgroup";

fn own_path(controller: &str) -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        ctrls.split(',').any(|c| c == controller).then(|| path.to_string())
    })
}

/// The v1 cgroup directory for `unit` under `controller`, if that controller is a mounted v1 hierarchy.
pub fn dir(controller: &str, unit: &str) -> Option<PathBuf> {
    let mount = Path::new(V1).join(controller);
    if !mount.join("cgroup.procs").exists() {
        return None;
    }
    let own = own_path(controller)?;
    Some(mount.join(own.trim_start_matches('/')).join(format!("keel.{unit}")))
}

/// Create the v1 cgroups `unit` needs for these limits; returns the `cgroup.procs` files the child must join.
pub fn prepare(unit: &str, memory_max: Option<u64>, tasks_max: Option<u64>) -> Result<Vec<fs::File>, String> {
    let mut joins = Vec::new();
    for (controller, file, value) in [("memory", "memory.limit_in_bytes", memory_max), ("pids", "pids.max", tasks_max)] {
        let Some(value) = value else { continue };
        let Some(d) = dir(controller, unit) else { continue };
        fs::create_dir_all(&d).map_err(|e| format!("cgroup v1 {}: {e}", d.display()))?;
        fs::write(d.join(file), value.to_string()).map_err(|e| format!("cgroup v1 {}: {e}", d.join(file).display()))?;
        if controller == "memory" {
            // Without swap accounting the limit alone holds; with it, keep swap out too.
            let _ = fs::write(d.join("memory.memsw.limit_in_bytes"), value.to_string());
        }
        let procs = d.join("cgroup.procs");
        joins.push(fs::OpenOptions::new().write(true).open(&procs).map_err(|e| format!("cgroup v1 {}: {e}", procs.display()))?);
    }
    Ok(joins)
}

/// OOM kills recorded in `unit`'s v1 memory cgroup.
pub fn oom_kills(unit: &str) -> u64 {
    let Some(d) = dir("memory", unit) else { return 0 };
    fs::read_to_string(d.join("memory.oom_control"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Remove `unit`'s v1 cgroups (they are empty once the container's namespace is gone).
pub fn remove(unit: &str) {
    for controller in ["memory", "pids"] {
        if let Some(d) = dir(controller, unit) {
            let _ = fs::remove_dir(d);
        }
    }
}
