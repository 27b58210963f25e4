//! The runtime as the supervisor sees it: is this unit a container, start its main process, clean up after it,
//! and the text of the transient units `initctl run` asks for.
//!
//! Owns: mapping a loaded `Unit` (its `[Container]` section, `ExecStart=` argv and `[Service]` environment) to a
//! [`StartRequest`]. Does not: track pids or states (the supervisor does).

use std::os::fd::AsRawFd;

use keel_model::Unit;

use super::{ContainerSpec, Runtime, StartRequest};

pub const SECTION: &str = "Container";

pub fn is_container(unit: &Unit) -> bool {
    unit.extra_sections.contains_key(SECTION)
}

/// Start `unit`'s container with `argv` (its `ExecStart=`, possibly empty) and `extra_env` from init, in the
/// unit's cgroup (its open `cgroup.procs` and its directory).
/// Returns the pid of the container's first process, a child of the caller.
pub fn start(
    unit: &Unit,
    name: &str,
    argv: &[String],
    extra_env: &[(String, String)],
    stdout: &impl AsRawFd,
    stderr: &impl AsRawFd,
    cgroup: Option<(&impl AsRawFd, &std::path::Path)>,
) -> Result<i32, String> {
    let entries = unit.extra_sections.get(SECTION).cloned().unwrap_or_default();
    let spec = ContainerSpec::parse(&entries).map_err(|e| e.to_string())?;
    let mut env: Vec<(String, String)> = Vec::new();
    if let Some(svc) = &unit.service {
        for (path, optional) in &svc.environment_files {
            match std::fs::read_to_string(path) {
                Ok(text) => env.extend(crate::spawn::parse_env_file(&text)),
                Err(_) if *optional => {}
                Err(e) => return Err(format!("{}: EnvironmentFile cannot be read: {e}", path.display())),
            }
        }
        env.extend(svc.environment.iter().cloned());
    }
    env.extend(extra_env.iter().filter(|(k, _)| k != "NOTIFY_SOCKET").cloned());
    let devnull = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    let req = StartRequest {
        unit: name,
        spec: &spec,
        exec_start: argv,
        service_env: &env,
        stdin: devnull.as_raw_fd(),
        stdout: stdout.as_raw_fd(),
        stderr: stderr.as_raw_fd(),
        cgroup_procs: cgroup.map(|(procs, _)| procs.as_raw_fd()),
        cgroup_dir: cgroup.map(|(_, dir)| dir),
        memory_max: unit.service.as_ref().and_then(|s| s.memory_max),
        tasks_max: unit.service.as_ref().and_then(|s| s.tasks_max),
    };
    Runtime::from_env().start(&req).map_err(|e| e.to_string())
}

/// Remove what a stopped container left on disk (directory, leases).
pub fn cleanup(name: &str) {
    Runtime::from_env().cleanup(name);
}

/// Called for every reaped process of a container unit: when it is the container's first process, the container
/// is gone (its namespaces with it) and its leftovers are removed before anything else (a restart, the next
/// `ExecStart=` of a oneshot) can start a new one.
/// Returns true when the container's memory cgroup (v1 fallback) recorded an OOM kill.
pub fn on_exit(name: &str, pid: i32) -> bool {
    let rt = Runtime::from_env();
    if rt.pid_of(name) != Some(pid) {
        return false;
    }
    let oom = super::v1::oom_kills(name) > 0;
    rt.cleanup(name);
    oom
}

/// What `initctl run` asks for.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunSpec {
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    /// `host` or `private`.
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub volumes: Vec<String>,
    #[serde(default)]
    pub environment: Vec<String>,
}

fn quote(word: &str) -> String {
    let escaped = word.replace('\\', "\\\\").replace('"', "\\\"").replace('%', "%%");
    format!("\"{escaped}\"")
}

/// The unit file text of a transient `initctl run` unit.
pub fn run_unit_text(spec: &RunSpec) -> Result<String, String> {
    let all = std::iter::once(&spec.image).chain(&spec.command).chain(&spec.volumes).chain(&spec.environment);
    if all.clone().any(|w| w.contains('\n') || w.contains('\r')) {
        return Err("arguments of `run` cannot contain newlines".into());
    }
    let mut t = format!(
        "[Unit]\nDescription=initctl run {}\n[Service]\n[Container]\nImage={}\n",
        spec.image.replace('%', "%%"),
        spec.image.replace('%', "%%")
    );
    if !spec.command.is_empty() {
        t.push_str(&format!("Command={}\n", spec.command.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")));
    }
    if let Some(n) = &spec.network {
        t.push_str(&format!("Network={n}\n"));
    }
    for v in &spec.volumes {
        t.push_str(&format!("Volume={}\n", v.replace('%', "%%")));
    }
    for e in &spec.environment {
        t.push_str(&format!("Environment={}\n", quote(e)));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_units_quote_every_word() {
        let spec = RunSpec { image: "busybox".into(), command: vec!["sh".into(), "-c".into(), "echo \"a b\" 100%".into()], ..Default::default() };
        let text = run_unit_text(&spec).expect("text");
        let line = text.lines().find(|l| l.starts_with("Command=")).expect("Command=");
        // After the model's specifier expansion (%% → %) the words come back unchanged.
        let words = crate::runtime::spec::split_words(&line["Command=".len()..].replace("%%", "%")).expect("split");
        assert_eq!(words, spec.command);
        assert!(run_unit_text(&RunSpec { image: "x\ny".into(), ..Default::default() }).is_err());
    }
}
