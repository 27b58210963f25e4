//! Starting one process of a unit: environment, PATH lookup, User/Group, stdio, cgroup, then fork+exec.
//!
//! Owns: turning an `ExecCommand` plus the unit's settings into a running child, and reporting exactly which
//! step failed (program not found, unknown user, chdir, exec) before or right after the fork.
//! Does not: wait for or reap the child (see `reaper`), or decide restarts (see `supervisor`).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use keel_model::{ExecCommand, ServiceSpec};
use nix::unistd::Pid;

use crate::sys::{self, ChildPlan, ChildStage};
use crate::users;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{program}: executable not found in PATH ({path})")]
    NotFound { program: String, path: String },
    #[error("{0}: EnvironmentFile cannot be read: {1}")]
    EnvFile(PathBuf, std::io::Error),
    #[error("{0}")]
    User(#[from] users::UserError),
    #[error("argument contains a NUL byte: {0:?}")]
    Nul(String),
    #[error("fork failed: {0}")]
    Fork(nix::errno::Errno),
    #[error("{program}: failed while {stage}: {errno}")]
    Child { program: String, stage: &'static str, errno: nix::errno::Errno },
    #[error("cannot create pipe: {0}")]
    Pipe(std::io::Error),
}

/// Everything about a unit that applies to each of its processes.
pub struct ProcessContext<'a> {
    pub unit: &'a str,
    pub spec: &'a ServiceSpec,
    pub stdout: &'a OwnedFd,
    pub stderr: &'a OwnedFd,
    pub cgroup_procs: Option<&'a fs::File>,
    pub extra_env: &'a [(String, String)],
}

/// Build the environment a unit's processes see: a sane base, then EnvironmentFile=, then Environment=
/// (later assignments win, as in systemd), then init-provided variables.
pub fn environment(ctx: &ProcessContext<'_>) -> Result<BTreeMap<String, String>, SpawnError> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), default_path());
    env.insert("LANG".to_string(), "C.UTF-8".to_string());
    for (path, optional) in &ctx.spec.environment_files {
        match fs::read_to_string(path) {
            Ok(text) => env.extend(parse_env_file(&text)),
            Err(_) if *optional => {}
            Err(e) => return Err(SpawnError::EnvFile(path.clone(), e)),
        }
    }
    for (k, v) in &ctx.spec.environment {
        env.insert(k.clone(), v.clone());
    }
    for (k, v) in ctx.extra_env {
        env.insert(k.clone(), v.clone());
    }
    Ok(env)
}

/// systemd's fixed PATH, plus the directory init itself runs from (so units always find `initctl`, e.g.
/// for `initctl notify`, also when Keel runs from a build tree).
fn default_path() -> String {
    let own = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.display().to_string()));
    match own {
        Some(d) if !DEFAULT_PATH.split(':').any(|x| x == d) => format!("{DEFAULT_PATH}:{d}"),
        _ => DEFAULT_PATH.to_string(),
    }
}

/// `KEY=value` lines; `#`/`;` comments; optional single or double quotes around the value.
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

/// Find `program` the way execvp would, in the unit's PATH.
pub fn resolve_program(program: &str, path_var: &str) -> Result<PathBuf, SpawnError> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return if p.exists() {
            Ok(p)
        } else {
            Err(SpawnError::NotFound { program: program.to_string(), path: "absolute path".into() })
        };
    }
    path_var
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| is_executable(p))
        .ok_or_else(|| SpawnError::NotFound { program: program.to_string(), path: path_var.to_string() })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

fn cstring(s: &str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Nul(s.to_string()))
}

/// Start one command of a unit. Returns once the child has exec'd (or reports why it could not).
pub fn spawn(cmd: &ExecCommand, ctx: &ProcessContext<'_>) -> Result<Pid, SpawnError> {
    let mut env = environment(ctx)?;
    let creds = match &ctx.spec.user {
        Some(user) => Some(users::resolve(user, ctx.spec.group.as_deref())?),
        None => match &ctx.spec.group {
            Some(g) => Some(users::resolve("root", Some(g))?),
            None => None,
        },
    };
    if let Some(c) = &creds {
        env.insert("USER".into(), c.name.clone());
        env.insert("LOGNAME".into(), c.name.clone());
        env.insert("HOME".into(), c.home.clone());
        env.insert("SHELL".into(), c.shell.clone());
    }
    let program = cmd.argv.first().map(String::as_str).unwrap_or_default();
    let path_var = env.get("PATH").cloned().unwrap_or_else(default_path);
    let resolved = resolve_program(program, &path_var)?;

    let path_c = CString::new(resolved.as_os_str().as_bytes()).map_err(|_| SpawnError::Nul(program.into()))?;
    let argv_c: Vec<CString> = cmd.argv.iter().map(|a| cstring(a)).collect::<Result<_, _>>()?;
    let env_c: Vec<CString> = env.iter().map(|(k, v)| cstring(&format!("{k}={v}"))).collect::<Result<_, _>>()?;
    let argv_p: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).chain([std::ptr::null()]).collect();
    let env_p: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).chain([std::ptr::null()]).collect();
    let cwd_c = match &ctx.spec.working_directory {
        Some(d) => Some(CString::new(d.as_os_str().as_bytes()).map_err(|_| SpawnError::Nul(d.display().to_string()))?),
        None => None,
    };
    let devnull = fs::File::open("/dev/null").map_err(SpawnError::Pipe)?;
    let (report_r, report_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| SpawnError::Pipe(e.into()))?;
    let groups: Vec<libc::gid_t> = creds.as_ref().map(|c| c.groups.clone()).unwrap_or_default();
    let plan = ChildPlan {
        path: &path_c,
        argv: &argv_p,
        envp: &env_p,
        cwd: cwd_c.as_ref(),
        stdin: devnull.as_raw_fd(),
        stdout: ctx.stdout.as_raw_fd(),
        stderr: ctx.stderr.as_raw_fd(),
        cgroup_procs: ctx.cgroup_procs.map(|f| f.as_raw_fd()),
        uid: creds.as_ref().map(|c| c.uid),
        gid: creds.as_ref().map(|c| c.gid),
        groups: &groups,
        report: report_w.as_raw_fd(),
    };
    let pid = sys::fork_exec(&plan).map_err(SpawnError::Fork)?;
    drop(report_w);
    // The report pipe is close-on-exec: EOF means exec succeeded, 5 bytes mean a step failed.
    let mut buf = [0u8; 5];
    let mut file = fs::File::from(report_r);
    let n = read_full(&mut file, &mut buf);
    if n == 5 {
        let stage = ChildStage::from_byte(buf[0]).map(ChildStage::describe).unwrap_or("starting");
        let errno = nix::errno::Errno::from_raw(i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]));
        // The child exits 127 right away; the reaper collects it like any other exit.
        return Err(SpawnError::Child { program: program.to_string(), stage, errno });
    }
    Ok(pid)
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_handles_quotes_comments_and_export() {
        let got = parse_env_file("# c\nA=1\nexport B=\"two words\"\n; x\nC='q'\n\nbad line\n");
        assert_eq!(
            got,
            vec![("A".into(), "1".into()), ("B".into(), "two words".into()), ("C".into(), "q".into())]
        );
    }

    #[test]
    fn resolve_finds_sh_in_path_and_reports_missing_program() {
        assert!(resolve_program("sh", DEFAULT_PATH).is_ok());
        let err = resolve_program("no-such-program-keel", "/bin").unwrap_err();
        assert!(err.to_string().contains("no-such-program-keel: executable not found"), "{err}");
    }
}
