//! Test harness: a real `init` as PID 1 of a fresh PID namespace (or as a plain supervisor), in its own cgroup,
//! driven with the real `initctl`. Waits are conditions with deadlines; Drop always kills what it started.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const INIT: &str = env!("CARGO_BIN_EXE_init");
pub const INITCTL: &str = env!("CARGO_BIN_EXE_initctl");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Where a cgroup2 hierarchy is mounted on this host (hybrid hosts mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.controllers").exists())
}

pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(eventually(timeout, cond), "timed out after {timeout:?} waiting for: {what}");
}

/// Whether `cond` holds within `timeout` (polled every 20 ms); for callers that explain a failure themselves.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub struct TestInit {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub cgroup: Option<PathBuf>,
    pub namespace: bool,
}

impl TestInit {
    pub fn units_dir(&self) -> PathBuf {
        self.dir.path().join("units")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn socket(&self) -> PathBuf {
        self.state_dir().join("init.sock")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// Write units (name, text; `@WORK@` is replaced by a scratch directory) and a default.target that wants
    /// every unit listed in `wanted`.
    pub fn prepare(units: &[(&str, &str)], wanted: &[&str]) -> TestInit {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = TestInit { dir, child: None, cgroup: None, namespace: true };
        std::fs::create_dir_all(t.units_dir().join("default.target.wants")).expect("mkdir units");
        std::fs::create_dir_all(t.work()).expect("mkdir work");
        std::fs::write(t.units_dir().join("default.target"), "[Unit]\nDescription=test target\n").expect("write");
        for (name, text) in units {
            let text = text.replace("@WORK@", &t.work().display().to_string());
            std::fs::write(t.units_dir().join(name), text).expect("write unit");
        }
        for w in wanted {
            std::os::unix::fs::symlink(t.units_dir().join(w), t.units_dir().join("default.target.wants").join(w))
                .expect("symlink");
        }
        t
    }

    /// Start init as PID 1 of a new PID (and mount, UTS) namespace.
    pub fn start(units: &[(&str, &str)], wanted: &[&str]) -> TestInit {
        let mut t = TestInit::prepare(units, wanted);
        t.launch(true);
        t
    }

    /// (Re)start init on the same directories. `namespace=false` runs it as a plain supervisor.
    pub fn launch(&mut self, namespace: bool) {
        self.namespace = namespace;
        // A relaunch (init restarted on the same state): the previous run's cgroup is not reused; remove it.
        if let Some(old) = self.cgroup.take() {
            remove_cgroup_tree(&old);
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let root = cgroup2_root();
        let cg = root.as_ref().map(|r| r.join(format!("keel-test-{}-{n}", std::process::id())));
        if let Some(cg) = &cg {
            std::fs::create_dir_all(cg).expect("create test cgroup");
        }
        let mut cmd = if namespace {
            let mut c = Command::new("unshare");
            c.args(["--pid", "--fork", "--kill-child", "--mount-proc", "--uts", "--"]).arg(INIT);
            c
        } else {
            Command::new(INIT)
        };
        cmd.arg("--units-dir")
            .arg(self.units_dir())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--cgroup-root")
            .arg(root.clone().unwrap_or_else(|| PathBuf::from("/nonexistent")))
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(self.dir.path().join(format!("console-{n}.log"))).expect("log")))
            .stderr(Stdio::from(
                std::fs::OpenOptions::new().append(true).open(self.dir.path().join(format!("console-{n}.log"))).expect("log"),
            ));
        if let Some(cg) = &cg {
            let procs = std::ffi::CString::new(cg.join("cgroup.procs").display().to_string()).expect("path");
            // SAFETY: pre_exec runs in the forked child before exec; it only makes raw open/write/close syscalls on a
            // path prepared before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd >= 0 {
                        libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                    }
                    Ok(())
                });
            }
        }
        let _ = std::fs::remove_file(self.socket());
        self.child = Some(cmd.spawn().expect("spawn init"));
        self.cgroup = cg;
        let sock = self.socket();
        wait_until("init's control socket", Duration::from_secs(10), || sock.exists());
    }

    pub fn console(&self) -> String {
        let mut out = String::new();
        let mut files: Vec<_> = std::fs::read_dir(self.dir.path())
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for f in files.iter().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("console-"))) {
            out.push_str(&std::fs::read_to_string(f).unwrap_or_default());
        }
        out
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(INITCTL).arg("--socket").arg(self.socket()).args(args).output().expect("run initctl")
    }

    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(o.status.success(), "initctl {args:?} failed: {}\n{}\nconsole:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr), self.console());
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn wait_ready(&self) {
        let o = self.ctl(&["ping", "--wait-ready", "--timeout", "30"]);
        assert!(o.status.success(), "init never became ready: {}\nconsole:\n{}", String::from_utf8_lossy(&o.stderr), self.console());
    }

    pub fn status(&self, unit: &str) -> Value {
        let o = self.ctl(&["--json", "status", unit, "-n", "50"]);
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
    }

    pub fn active(&self, unit: &str) -> String {
        self.status(unit)["status"]["active"].as_str().unwrap_or("").to_string()
    }

    pub fn wait_active(&self, unit: &str, state: &str, timeout: Duration) {
        wait_until(&format!("{unit} to be {state}"), timeout, || self.active(unit) == state);
    }

    pub fn logs(&self, unit: &str) -> String {
        let o = self.ctl(&["logs", unit]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Ask init to power off and wait for it to exit; returns its exit status.
    pub fn poweroff(&mut self) -> std::process::ExitStatus {
        self.ctl_ok(&["poweroff"]);
        let mut child = self.child.take().expect("init running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().expect("wait init") {
                return st;
            }
            assert!(Instant::now() < deadline, "init did not exit after poweroff\nconsole:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Host pid of init (the unshare child in namespace mode).
    pub fn init_host_pid(&self) -> Option<i32> {
        let c = self.child.as_ref()?;
        if !self.namespace {
            return Some(c.id() as i32);
        }
        let kids = std::fs::read_to_string(format!("/proc/{}/task/{}/children", c.id(), c.id())).ok()?;
        kids.split_whitespace().next()?.parse().ok()
    }
}

/// Processes whose parent is `ppid`, with their state letter.
pub fn children_of(ppid: i32) -> Vec<(i32, char)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some(rest) = stat.rsplit(')').next() else { continue };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if f.next().and_then(|p| p.parse::<i32>().ok()) == Some(ppid) {
            v.push((pid, state));
        }
    }
    v
}

/// Pids whose command line contains `needle`.
pub fn pids_with_cmdline(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|p| *p != me)
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

impl Drop for TestInit {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = self.init_host_pid_of(&c) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(cg) = &self.cgroup {
            remove_cgroup_tree(cg);
        }
        if std::env::var_os("KEEL_KEEP_TEST_DIRS").is_some() {
            let _ = self.dir.path().to_path_buf();
        }
    }
}

impl TestInit {
    fn init_host_pid_of(&self, c: &Child) -> Option<i32> {
        if !self.namespace {
            return Some(c.id() as i32);
        }
        let kids = std::fs::read_to_string(format!("/proc/{}/task/{}/children", c.id(), c.id())).ok()?;
        kids.split_whitespace().next()?.parse().ok()
    }
}

/// Kill everything left in a test cgroup and remove it, deepest first.
pub fn remove_cgroup_tree(cg: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let _ = std::fs::write(cg.join("cgroup.kill"), b"1");
        let mut dirs = Vec::new();
        collect_dirs(cg, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in &dirs {
            let _ = std::fs::remove_dir(d);
        }
        if !cg.exists() || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn collect_dirs(p: &Path, out: &mut Vec<PathBuf>) {
    out.push(p.to_path_buf());
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&e.path(), out);
        }
    }
}
