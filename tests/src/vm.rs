//! One Keel VM under QEMU (TCG) for a test.
//!
//! Owns: the VM's directory (target/keel-tests/vms/<name>/: disk overlay, OVMF vars, console.log,
//! shell.log, the debug-shell socket), QEMU's process (killed on drop, always), the serial console
//! (QEMU's stdout, copied line by line into console.log and an in-memory buffer), waiting for console markers
//! with deadlines, and running commands in the guest over the debug-shell virtio-serial port
//! (`org.keel.shell`, served by the image's keel-debug-shell unit).
//! Does not: build the image (`image`), or decide what a test checks.
//!
//! Command protocol: the host writes one line per command,
//! `echo <BEGIN>; printf %s <base64> | base64 -d >/tmp/f; sh /tmp/f </dev/null 2>&1; echo "<END> $?"`, and
//! takes the bytes between the BEGIN and END markers as the output and the number after END as the exit code.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use keel_image::mkimage::Manifest;
use keel_image::qemu::{self, Boot, Console, VmSpec};

use crate::image;

/// What "booted" looks like on the console: Keel's init prints `keel: init: all units ready (...)`;
/// the image's placeholder init (when init was not built) prints `keel-ready`.
pub const READY_MARKERS: &[&str] = &["all units ready", "keel-ready"];

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{what} did not happen within {secs} s; console log: {}\n--- last console lines ---\n{tail}", log.display())]
    Timeout { what: String, secs: u64, log: PathBuf, tail: String },
    #[error("QEMU exited ({status}) while waiting for {what}; console log: {}\n--- last console lines ---\n{tail}", log.display())]
    Exited { what: String, status: String, log: PathBuf, tail: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Setup(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// The disk a VM boots from.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    /// "qcow2" or "raw"
    pub format: String,
}

/// How to start a VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Names the VM's directory and logs (unique per test).
    pub name: String,
    pub uefi: bool,
    /// Direct boot: `Some("USR-A")` adds `keel.usr=USR-A`; `None` lets the initramfs use the GPT bits.
    pub slot: Option<String>,
    /// Direct boot: extra kernel command line.
    pub append: String,
    /// cloud-config passed as fw_cfg `opt/keel/user-data`.
    pub user_data: Option<PathBuf>,
    /// `None`: a fresh qcow2 overlay on the image. `Some`: this disk (e.g. the previous boot's, to reboot).
    pub disk: Option<Disk>,
    /// UEFI: reuse these OVMF vars (a reboot); `None`: a fresh copy.
    pub vars: Option<PathBuf>,
    pub memory_mib: u32,
    /// Direct boot of something else entirely (kernel, initrd, full command line): benchmark baselines.
    pub foreign: Option<(PathBuf, PathBuf, String)>,
    /// A NIC: (network namespace, tap ifname, MAC); QEMU then runs inside that namespace (see `net`).
    pub tap: Option<(String, String, String)>,
    /// Extra raw disks, attached read-only after the boot disk (e.g. a NoCloud CIDATA disk).
    pub extra_disks: Vec<PathBuf>,
    /// Boot this image instead of the one under test (`image::image()`), e.g. an older release.
    pub image: Option<Manifest>,
    /// QEMU user-mode network: the guest (10.0.2.15) reaches the host's 127.0.0.1 at 10.0.2.2.
    pub user_net: bool,
}

impl VmOptions {
    pub fn direct(name: &str) -> VmOptions {
        VmOptions {
            name: name.into(),
            uefi: false,
            slot: Some("USR-A".into()),
            append: String::new(),
            user_data: None,
            disk: None,
            vars: None,
            memory_mib: 512,
            foreign: None,
            tap: None,
            extra_disks: Vec::new(),
            image: None,
            user_net: false,
        }
    }
    pub fn uefi(name: &str) -> VmOptions {
        VmOptions { uefi: true, slot: None, ..VmOptions::direct(name) }
    }
}

/// A command's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub code: i32,
}

pub struct Vm {
    pub name: String,
    pub dir: PathBuf,
    pub disk: Disk,
    pub vars: Option<PathBuf>,
    child: Child,
    started: Instant,
    console: Arc<Mutex<String>>,
    console_log: PathBuf,
    shell_socket: PathBuf,
    shell: Option<(UnixStream, Arc<Mutex<Vec<u8>>>)>,
    exit_status: Option<String>,
}

static SEQ: AtomicU64 = AtomicU64::new(1);

/// A sparse raw copy of the image under test in the VM directory `name` (for tests that edit the disk).
pub fn raw_copy(name: &str) -> Result<Disk, VmError> {
    let m = image::image().map_err(VmError::Setup)?;
    let dir = image::work_dir(&format!("vms/{name}"));
    let path = dir.join("disk.img");
    let _ = std::fs::remove_file(&path);
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&m.image)
        .arg(&path)
        .status()
        .map_err(io("running cp"))?;
    if !st.success() {
        return Err(VmError::Setup(format!("cp {} {} failed", m.image.display(), path.display())));
    }
    Ok(Disk { path, format: "raw".into() })
}

impl Vm {
    /// Start QEMU. Returns as soon as the process runs; wait for markers next.
    pub fn start(opts: &VmOptions) -> Result<Vm, VmError> {
        let m: &Manifest = match &opts.image {
            Some(m) => m,
            None => image::image().map_err(VmError::Setup)?,
        };
        let dir = image::work_dir(&format!("vms/{}", opts.name));
        let disk = match &opts.disk {
            Some(d) => d.clone(),
            None => {
                let p = dir.join("disk.qcow2");
                qemu::create_overlay(&m.image, &p).map_err(|e| VmError::Setup(e.to_string()))?;
                Disk { path: p, format: "qcow2".into() }
            }
        };
        let (boot, vars) = if opts.uefi {
            let vars = match &opts.vars {
                Some(v) => v.clone(),
                None => {
                    let v = dir.join("OVMF_VARS.fd");
                    qemu::fresh_vars(&v).map_err(|e| VmError::Setup(e.to_string()))?;
                    v
                }
            };
            (Boot::Uefi { vars: vars.clone() }, Some(vars))
        } else if let Some((kernel, initrd, cmdline)) = &opts.foreign {
            (Boot::Direct { kernel: kernel.clone(), initrd: initrd.clone(), cmdline: cmdline.clone() }, None)
        } else {
            let mut cmdline = match &opts.slot {
                Some(s) => m.cmdline_for(s),
                None => m.cmdline.clone(),
            };
            if !opts.append.is_empty() {
                cmdline.push(' ');
                cmdline.push_str(&opts.append);
            }
            (Boot::Direct { kernel: m.kernel.clone(), initrd: m.initrd.clone(), cmdline }, None)
        };
        let shell_socket = dir.join("shell.sock");
        let _ = std::fs::remove_file(&shell_socket);
        let mut spec = VmSpec::new(disk.path.clone(), boot);
        spec.disk_format = disk.format.clone();
        spec.memory_mib = opts.memory_mib;
        spec.console = Console::Stdout;
        spec.shell_socket = Some(shell_socket.clone());
        if let Some((_, ifname, mac)) = &opts.tap {
            spec.net = qemu::Net::Tap { ifname: ifname.clone(), mac: mac.clone() };
        }
        if opts.user_net {
            spec.net = qemu::Net::User;
        }
        for d in &opts.extra_disks {
            spec.extra.push("-drive".into());
            spec.extra.push(format!("file={},format=raw,if=virtio,readonly=on", d.display()));
        }
        if let Some(ud) = &opts.user_data {
            spec.fw_cfg_files.push((qemu::USER_DATA_FW_CFG.into(), ud.clone()));
        }
        let qemu_bin = qemu::qemu_binary().map_err(|e| VmError::Setup(e.to_string()))?;
        let console_log = dir.join(format!("console-{}.log", SEQ.fetch_add(1, Ordering::Relaxed)));
        let mut logf = std::fs::File::create(&console_log).map_err(io(format!("creating {}", console_log.display())))?;
        let _ = writeln!(logf, "# {} {}", qemu_bin.display(), spec.args().join(" "));
        let started = Instant::now();
        let mut cmd = match &opts.tap {
            Some((ns, _, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&qemu_bin);
                c
            }
            None => Command::new(&qemu_bin),
        };
        let mut child = cmd
            .args(spec.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("starting {}", qemu_bin.display())))?;
        let console = Arc::new(Mutex::new(String::new()));
        let logf = Arc::new(Mutex::new(logf));
        if let Some(out) = child.stdout.take() {
            pump(out, console.clone(), logf.clone(), started, "");
        }
        if let Some(err) = child.stderr.take() {
            pump(err, console.clone(), logf, started, "[qemu] ");
        }
        Ok(Vm {
            name: opts.name.clone(),
            dir,
            disk,
            vars,
            child,
            started,
            console,
            console_log,
            shell_socket,
            shell: None,
            exit_status: None,
        })
    }

    /// QEMU's process id (`ip netns exec` execs QEMU, so this is QEMU even inside a namespace).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// Everything the console printed so far.
    pub fn console(&self) -> String {
        self.console.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn tail(&self) -> String {
        let c = self.console();
        let lines: Vec<&str> = c.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    fn check_alive(&mut self, what: &str) -> Result<(), VmError> {
        if let Ok(Some(st)) = self.child.try_wait() {
            self.exit_status = Some(st.to_string());
            // let the pumps drain
            std::thread::sleep(Duration::from_millis(100));
            return Err(VmError::Exited {
                what: what.into(),
                status: st.to_string(),
                log: self.console_log.clone(),
                tail: self.tail(),
            });
        }
        Ok(())
    }

    /// QEMU's exit status if it has exited (e.g. the guest rebooted: QEMU runs with -no-reboot), else None.
    pub fn exited(&mut self) -> Option<String> {
        if self.exit_status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exit_status = Some(st.to_string());
            }
        }
        self.exit_status.clone()
    }

    /// Wait until the console shows any of `markers`; returns (which, time since QEMU started).
    pub fn wait_for_any(&mut self, markers: &[&str], timeout: Duration) -> Result<(usize, Duration), VmError> {
        let deadline = Instant::now() + timeout;
        let what = format!("console marker {markers:?}");
        loop {
            let c = self.console();
            if let Some(i) = markers.iter().position(|m| c.contains(m)) {
                return Ok((i, self.started.elapsed()));
            }
            self.check_alive(&what)?;
            if Instant::now() >= deadline {
                return Err(VmError::Timeout { what, secs: timeout.as_secs(), log: self.console_log.clone(), tail: self.tail() });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<Duration, VmError> {
        self.wait_for_any(&[marker], timeout).map(|(_, d)| d)
    }

    /// Wait for init's ready marker (or the placeholder's); returns the time since QEMU started.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, VmError> {
        self.wait_for_any(READY_MARKERS, timeout).map(|(_, d)| d)
    }

    fn connect_shell(&mut self, timeout: Duration) -> Result<(), VmError> {
        if self.shell.is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(&self.shell_socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(VmError::Io { what: format!("connecting {}", self.shell_socket.display()), source: e })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut reader = stream.try_clone().map_err(io("cloning the shell socket"))?;
        let sink = buf.clone();
        let log_path = self.dir.join("shell.log");
        std::thread::spawn(move || {
            let mut log = std::fs::OpenOptions::new().create(true).append(true).open(log_path).ok();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = reader.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                if let Some(l) = log.as_mut() {
                    let _ = l.write_all(&chunk[..n]);
                }
                if let Ok(mut b) = sink.lock() {
                    b.extend_from_slice(&chunk[..n]);
                }
            }
        });
        self.shell = Some((stream, buf));
        // wait until the guest shell answers
        let mut n = 0u32;
        loop {
            n += 1;
            let marker = format!("__KEEL_PING_{n}__");
            self.shell_write(&format!("echo {marker}\n"))?;
            let until = Instant::now() + Duration::from_secs(1);
            while Instant::now() < until {
                if self.shell_text().contains(&marker) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            self.check_alive("the debug shell")?;
            if Instant::now() >= deadline {
                return Err(VmError::Timeout {
                    what: "the debug shell on virtio port org.keel.shell".into(),
                    secs: timeout.as_secs(),
                    log: self.console_log.clone(),
                    tail: self.tail(),
                });
            }
        }
    }

    fn shell_write(&mut self, s: &str) -> Result<(), VmError> {
        let Some((stream, _)) = self.shell.as_mut() else { return Err(VmError::Setup("shell not connected".into())) };
        stream.write_all(s.as_bytes()).map_err(io("writing to the debug shell"))
    }

    fn shell_text(&self) -> String {
        self.shell
            .as_ref()
            .and_then(|(_, b)| b.lock().ok().map(|b| String::from_utf8_lossy(&b).into_owned()))
            .unwrap_or_default()
    }

    /// Run `script` with /bin/sh in the guest; returns its combined stdout/stderr and exit code.
    pub fn run(&mut self, script: &str, timeout: Duration) -> Result<Output, VmError> {
        self.connect_shell(timeout)?;
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let begin = format!("__KEEL_BEGIN_{n}__");
        let end = format!("__KEEL_END_{n}__");
        let b64 = base64(script.as_bytes());
        let line = format!(
            "echo {begin}; printf '%s' '{b64}' | base64 -d > /tmp/.keel-cmd-{n}; sh /tmp/.keel-cmd-{n} </dev/null 2>&1; \
             echo \"{end} $?\"; rm -f /tmp/.keel-cmd-{n}\n"
        );
        self.shell_write(&line)?;
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.shell_text();
            if let (Some(b), Some(e)) = (text.find(&format!("{begin}\n")), text.find(&format!("{end} "))) {
                let rest = &text[e + end.len() + 1..];
                if let Some(nl) = rest.find('\n') {
                    let code = rest[..nl].trim().parse().unwrap_or(-1);
                    let start = b + begin.len() + 1;
                    let stdout = if e >= start { text[start..e].to_string() } else { String::new() };
                    return Ok(Output { stdout, code });
                }
            }
            self.check_alive(&format!("command {script:?}"))?;
            if Instant::now() >= deadline {
                return Err(VmError::Timeout {
                    what: format!("command {script:?}"),
                    secs: timeout.as_secs(),
                    log: self.dir.join("shell.log"),
                    tail: text.lines().rev().take(10).collect::<Vec<_>>().join("\n"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until QEMU exits by itself (the guest powered off, or rebooted: QEMU runs with -no-reboot);
    /// `what` names the awaited event in the timeout error. Returns how long the wait took.
    pub fn wait_exit(&mut self, timeout: Duration, what: &str) -> Result<Duration, VmError> {
        let start = Instant::now();
        while self.exited().is_none() {
            if start.elapsed() >= timeout {
                return Err(VmError::Timeout {
                    what: what.to_string(),
                    secs: timeout.as_secs(),
                    log: self.console_log.clone(),
                    tail: self.tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(start.elapsed())
    }

    /// Sync, ask init to power off, wait for QEMU to exit; kill it after `timeout`. Returns whether the
    /// shutdown was clean (QEMU exited by itself).
    pub fn shutdown(mut self, timeout: Duration) -> Result<bool, VmError> {
        if self.connect_shell(Duration::from_secs(20)).is_ok() {
            let _ = self.run("sync", Duration::from_secs(20));
            let _ = self.shell_write(
                "(initctl poweroff || initctl reboot || poweroff) >/dev/null 2>&1 </dev/null &\n",
            );
        }
        Ok(self.wait_exit(timeout, "QEMU to exit after poweroff").is_ok()) // if not, drop kills it
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.exit_status.is_none() {
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
        eprintln!("keel-tests: VM {} console log kept at {}", self.name, self.console_log.display());
    }
}

/// Copy a QEMU output stream into the console buffer and the log file, each line stamped with the seconds
/// since QEMU started.
fn pump<R: Read + Send + 'static>(
    src: R,
    console: Arc<Mutex<String>>,
    log: Arc<Mutex<std::fs::File>>,
    started: Instant,
    prefix: &'static str,
) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).replace('\r', "");
                    if let Ok(mut c) = console.lock() {
                        c.push_str(prefix);
                        c.push_str(&text);
                    }
                    if let Ok(mut f) = log.lock() {
                        let _ = write!(f, "{:8.3} {prefix}{text}", started.elapsed().as_secs_f64());
                    }
                }
            }
        }
    });
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Whether QEMU tests can run here. Without qemu-system-x86_64 they are skipped with a message, unless
/// `KEEL_REQUIRE_QEMU=1` (then missing QEMU is a failure, as CI should have it).
pub fn qemu_available() -> bool {
    match qemu::qemu_binary() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("KEEL_REQUIRE_QEMU").is_ok_and(|v| v == "1") {
                panic!("KEEL_REQUIRE_QEMU=1 but {e}");
            }
            eprintln!("keel-tests: SKIPPED (not run): {e}");
            false
        }
    }
}

/// A test's share of the host's VM slots; given back on drop.
pub struct VmSlots {
    held: usize,
}

/// Slots taken by the tests of this process, and how many tests needing more than one slot are waiting (then
/// single-slot tests queue behind them instead of taking each slot the moment it frees).
struct Pool {
    used: usize,
    big_waiting: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { used: 0, big_waiting: 0 });
static FREED: Condvar = Condvar::new();

/// How many VMs may run at once: each TCG vCPU keeps one host core busy, so one per core (2 on the build
/// machines). `KEEL_TEST_VMS=1` runs one VM at a time, for timing figures (docs/benchmarks.md).
pub fn capacity() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let asked = std::env::var("KEEL_TEST_VMS").ok().and_then(|v| v.parse().ok());
    asked.unwrap_or(cores).clamp(1, cores)
}

/// Waits for `vms` VM slots (a test running that many VMs at once; capped at `capacity()`, so a 3-VM cluster
/// runs alone) and holds them until the guard drops. Tests hold this while their VMs run.
pub fn slots(vms: usize) -> VmSlots {
    let cap = capacity();
    let (want, big) = (vms.clamp(1, cap), vms > 1);
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    pool.big_waiting += usize::from(big);
    while pool.used + want > cap || (!big && pool.big_waiting > 0) {
        pool = FREED.wait(pool).unwrap_or_else(|p| p.into_inner());
    }
    pool.big_waiting -= usize::from(big);
    pool.used += want;
    VmSlots { held: want }
}

/// Every slot: nothing else runs a VM meanwhile (boot-time benchmarks).
pub fn exclusive() -> VmSlots {
    slots(usize::MAX)
}

impl Drop for VmSlots {
    fn drop(&mut self) {
        POOL.lock().unwrap_or_else(|p| p.into_inner()).used -= self.held;
        FREED.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    fn pool() -> (usize, usize) {
        let p = POOL.lock().unwrap();
        (p.used, p.big_waiting)
    }

    /// A test wanting every slot waits for a running VM test to finish, and a single-slot test that comes
    /// after it waits behind it (even with a slot free), so a cluster test cannot be starved.
    #[test]
    fn a_test_wanting_every_slot_waits_and_is_not_overtaken() {
        let first = slots(1);
        assert_eq!(pool(), (1, 0));
        let (tx, rx) = std::sync::mpsc::channel();
        let big = {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let all = exclusive();
                tx.send(("big", capacity())).unwrap();
                drop(all);
            })
        };
        crate::wait_until("the exclusive test queueing", Duration::from_secs(10), || pool().1 == 1).unwrap();
        let small = std::thread::spawn(move || {
            let one = slots(1);
            tx.send(("small", 1)).unwrap();
            drop(one);
        });
        assert!(rx.try_recv().is_err(), "nothing may start while the first test holds its slot");
        drop(first);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), ("big", capacity()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), ("small", 1));
        big.join().unwrap();
        small.join().unwrap();
        assert_eq!(pool(), (0, 0));
    }
}
