//! init's main loop: one thread, one poll(2) over the signalfd, the notify socket, the API socket and every
//! unit's output pipes; timers come from the supervisor's deadlines.
//!
//! Owns: the mode init runs in (system PID 1, PID 1 of a namespace, or a plain supervisor), the one reaper
//! (every wait(2) happens here, so no exit status is lost and no pid is reused under us), signal handling,
//! the "all units ready" marker, when start-up pages are handed back (at ready and when idle after work), and the
//! shutdown sequence. Does not: know about unit semantics (see `supervisor`) or the wire protocol (see `api`).

use std::os::fd::{BorrowedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::api::server::{Effects, Server};
use crate::boot;
use crate::cgroup::Cgroups;
use crate::journal::{Journal, Limits, Stream};
use crate::notify::NotifySocket;
use crate::shutdown;
use crate::supervisor::{Active, Config, Supervisor};
use crate::sys::{self, PowerAction};

/// How init is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a machine: mounts, hostname, console, and reboot(2) at the end.
    System,
    /// PID 1 of a PID namespace (tests, containers): no machine-wide changes; exits when told to power off.
    Namespace,
    /// An ordinary process: a child subreaper supervising its units; exits when told to stop.
    Supervisor,
}

impl Mode {
    /// PID 1 that can see kthreadd (pid 2) is the machine's init; PID 1 that cannot is a namespace's.
    pub fn detect() -> Mode {
        if std::process::id() != 1 {
            return Mode::Supervisor;
        }
        let comm = std::fs::read_to_string("/proc/2/comm").unwrap_or_default();
        if comm.trim() == "kthreadd" || !std::path::Path::new("/proc/self").exists() {
            Mode::System
        } else {
            Mode::Namespace
        }
    }
}

pub struct Options {
    pub mode: Mode,
    pub unit_dirs: Vec<PathBuf>,
    pub target: String,
    pub socket: PathBuf,
    pub notify_socket: PathBuf,
    pub journal_dir: PathBuf,
    pub journal_limits: Limits,
    pub cgroup_root: PathBuf,
    pub hostname: Option<String>,
    pub forward_to_console: bool,
}

const HANDLED: [Signal; 6] = [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGUSR1, Signal::SIGUSR2];
/// systemd's SIGRTMIN+3 (halt), +4 (poweroff), +5 (reboot), as raw numbers.
const RT_HALT: i32 = 34 + 3;
const RT_POWEROFF: i32 = 34 + 4;
const RT_REBOOT: i32 = 34 + 5;

fn signal_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(s);
    }
    set
}

/// Block the handled signals (the realtime ones via libc, which nix's `Signal` cannot name) and open a signalfd.
fn signal_fd() -> anyhow::Result<SignalFd> {
    let set = signal_set();
    let mut raw = *set.as_ref();
    for rt in [RT_HALT, RT_POWEROFF, RT_REBOOT] {
        // SAFETY: `raw` is a valid, initialised sigset_t owned by this frame; sigaddset only writes into it.
        unsafe { libc::sigaddset(&mut raw, rt) };
    }
    // SAFETY: `raw` was produced from a valid SigSet plus sigaddset calls, so it is a valid sigset_t.
    let full = unsafe { SigSet::from_sigset_t_unchecked(raw) };
    full.thread_block().context("blocking signals for the signalfd")?;
    SignalFd::with_flags(&full, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).context("creating signalfd")
}

/// What a signal asks of init.
fn power_for_signal(signo: i32, mode: Mode) -> Option<PowerAction> {
    match signo {
        s if s == Signal::SIGTERM as i32 || s == Signal::SIGINT as i32 => {
            Some(if mode == Mode::System { PowerAction::Reboot } else { PowerAction::Poweroff })
        }
        s if s == Signal::SIGUSR1 as i32 || s == RT_HALT => Some(PowerAction::Halt),
        s if s == Signal::SIGUSR2 as i32 || s == RT_POWEROFF => Some(PowerAction::Poweroff),
        RT_REBOOT => Some(PowerAction::Reboot),
        _ => None,
    }
}

/// Where a ready fd came from.
enum Source {
    Signal,
    Notify,
    Listener,
    Conn,
    Output(String, Stream),
}

pub struct Init {
    opts: Options,
    sup: Supervisor,
    server: Server,
    notify: NotifySocket,
    sigfd: SignalFd,
    started: Instant,
    shutdown: Option<(PowerAction, Instant)>,
    orphans_reaped: u64,
    /// Unit commands from cloud-config, run after the first unit load.
    boot_commands: Vec<(String, String)>,
    /// Whether start-up-only pages were handed back since init last did any work (see `release_when_quiet`).
    pages_released: bool,
}

/// Longest a whole shutdown may take before init stops waiting for units and goes on.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(180);

impl Init {
    pub fn setup(opts: Options) -> anyhow::Result<Init> {
        let started = Instant::now();
        let sigfd = signal_fd()?;
        let mut notes = Vec::new();
        // Phases that took long enough to matter for boot time are named in the first log lines.
        let mut phase_at = Instant::now();
        let mut timed = |notes: &mut Vec<String>, what: &str| {
            let ms = phase_at.elapsed().as_millis();
            if ms >= 50 {
                notes.push(format!("{what} took {ms} ms"));
            }
            phase_at = Instant::now();
        };
        let mut boot_commands = Vec::new();
        match opts.mode {
            Mode::System => {
                boot::attach_console();
                notes.extend(boot::mount_early());
                timed(&mut notes, "early mounts");
                sys::disable_cad();
                if let Err(e) = sys::loopback_up() {
                    notes.push(format!("cannot bring up lo: {e}"));
                }
                if let Some(h) = boot::set_hostname(opts.hostname.as_deref()) {
                    notes.push(format!("hostname set to {h}"));
                }
                let _ = boot::ensure_machine_id(std::path::Path::new("/etc/machine-id"));
                boot_commands = crate::cloudconfig::boot(&mut |m| notes.push(m.to_string()));
                timed(&mut notes, "hostname, machine-id and cloud-config");
            }
            Mode::Namespace => {
                if let Some(h) = opts.hostname.as_deref() {
                    boot::set_hostname(Some(h));
                }
            }
            Mode::Supervisor => {
                sys::set_child_subreaper().context("becoming a child subreaper (PR_SET_CHILD_SUBREAPER)")?;
            }
        }
        let cgroups = match Cgroups::setup(&opts.cgroup_root) {
            Ok(c) => Some(c),
            Err(e) => {
                notes.push(e.to_string());
                None
            }
        };
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().replace('-', ""))
            .unwrap_or_else(|_| boot::random_id());
        // A namespace or supervisor restart is a new "boot" of this init.
        let boot_id = if opts.mode == Mode::System { boot_id } else { boot::random_id() };
        timed(&mut notes, "cgroup setup");
        let journal = match Journal::open(&opts.journal_dir, opts.journal_limits, &boot_id) {
            Ok(j) => {
                notes.extend(j.recovery_notes().iter().cloned());
                Some(j)
            }
            Err(e) => {
                notes.push(format!("journal disabled: {e}"));
                None
            }
        };
        let notify = NotifySocket::bind(&opts.notify_socket)
            .with_context(|| format!("binding the notify socket {}", opts.notify_socket.display()))?;
        let admin = opts.unit_dirs.first().cloned().unwrap_or_else(|| PathBuf::from("/etc/keel/units"));
        let server = Server::bind(&opts.socket, admin)
            .with_context(|| format!("binding the control socket {}", opts.socket.display()))?;
        let cfg = Config {
            unit_dirs: opts.unit_dirs.clone(),
            hostname: boot::hostname(),
            notify_socket: opts.notify_socket.clone(),
            forward_to_console: opts.forward_to_console,
        };
        let mut sup = Supervisor::new(cfg, cgroups, journal);
        timed(&mut notes, "journal and sockets");
        sup.log("init", &format!("keel init {} starting ({:?} mode, pid {}, setup {} ms)", env!("CARGO_PKG_VERSION"), opts.mode, std::process::id(), started.elapsed().as_millis()));
        for n in notes {
            sup.log("init", &n);
        }
        Ok(Init { opts, sup, server, notify, sigfd, started, shutdown: None, orphans_reaped: 0, boot_commands, pages_released: false })
    }

    /// Load units and start the target. Then serve until shutdown. Returns only in Namespace/Supervisor mode.
    pub fn run(mut self) -> i32 {
        self.sup.reload();
        let target = self.opts.target.clone();
        if let Err(e) = self.sup.start(&target, false) {
            self.sup.log("init", &format!("cannot start {target}: {e}; waiting for commands"));
        }
        for (unit, cmd) in std::mem::take(&mut self.boot_commands) {
            let res = match cmd.as_str() {
                "stop" => self.sup.stop(&unit),
                "restart" | "reload-or-restart" | "try-restart" => self.sup.restart(&unit),
                _ => self.sup.start(&unit, false),
            };
            if let Err(e) = res {
                self.sup.log("init", &format!("cloud-config: {cmd} {unit}: {e}"));
            }
        }
        loop {
            let now = Instant::now();
            self.turn(now);
            if let Some(action) = self.shutdown_complete() {
                return self.finish(action);
            }
        }
    }

    fn turn(&mut self, _now: Instant) {
        // Jobs queued by the previous turn (or by `run`) start before we sleep in poll.
        self.advance();
        let outputs = self.sup.output_fds();
        let mut sources: Vec<(RawFd, PollFlags, Source)> = vec![
            (self.sigfd_raw(), PollFlags::POLLIN, Source::Signal),
            (self.notify.fd(), PollFlags::POLLIN, Source::Notify),
        ];
        for (fd, wants_write) in self.server.poll_fds() {
            let flags = if wants_write { PollFlags::POLLIN | PollFlags::POLLOUT } else { PollFlags::POLLIN };
            let src = if fd == self.server.listener_fd() { Source::Listener } else { Source::Conn };
            sources.push((fd, flags, src));
        }
        for (fd, unit, stream) in outputs {
            sources.push((fd, PollFlags::POLLIN, Source::Output(unit, stream)));
        }
        let timeout = self.poll_timeout();
        let ready: Vec<PollFlags> = {
            // SAFETY: every fd in `sources` is owned by self (signalfd, sockets, connections, unit pipes) and
            // stays open for the duration of this poll call; the borrow does not outlive this block.
            let mut pfds: Vec<PollFd> = sources
                .iter()
                .map(|(fd, flags, _)| PollFd::new(unsafe { BorrowedFd::borrow_raw(*fd) }, *flags))
                .collect();
            match nix::poll::poll(&mut pfds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => self.sup.log("init", &format!("poll failed: {e}")),
            }
            pfds.iter().map(|p| p.revents().unwrap_or(PollFlags::empty())).collect()
        };
        self.release_when_quiet(ready.iter().all(|r| r.is_empty()));
        let mut fx = Effects::default();
        for ((fd, _, src), rev) in sources.into_iter().zip(ready) {
            if rev.is_empty() {
                continue;
            }
            match src {
                Source::Signal => self.on_signals(),
                Source::Notify => {
                    // In order; a barrier's pipe closes (dropped) once everything before it was handled.
                    for n in self.notify.recv_all() {
                        if !n.is_barrier() {
                            self.sup.on_notify(n.pid, &n.text, Instant::now());
                        }
                    }
                }
                Source::Listener => self.server.accept_all(),
                Source::Conn => self.server.on_ready(fd, &mut self.sup, &mut fx),
                Source::Output(unit, stream) => self.sup.drain_output(&unit, stream),
            }
        }
        if let Some(action) = fx.power {
            self.request_shutdown(action);
        }
        self.advance();
    }

    fn sigfd_raw(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.sigfd.as_raw_fd()
    }

    fn poll_timeout(&self) -> PollTimeout {
        let now = Instant::now();
        let mut wait = Duration::from_secs(5);
        if let Some(d) = self.sup.next_deadline() {
            wait = wait.min(d.saturating_duration_since(now));
        }
        if self.sup.waiting_for_cgroups() {
            wait = wait.min(Duration::from_millis(20));
        }
        let ms = u16::try_from(wait.as_millis().max(1)).unwrap_or(u16::MAX);
        PollTimeout::from(ms)
    }

    /// Timers, job steps, job-completion replies, the ready marker, log followers.
    fn advance(&mut self) {
        let now = Instant::now();
        self.sup.on_timers(now);
        self.sup.poll_stopping(now);
        self.sup.step(now);
        let events = std::mem::take(&mut self.sup.events);
        self.server.on_events(&events, &mut self.sup);
        if !self.server.ready && self.shutdown.is_none() && self.sup.is_idle() {
            self.server.ready = true;
            let msg = format!(
                "all units ready ({} active, {} failed) in {} ms",
                self.sup.count(Active::Active),
                self.sup.count(Active::Failed),
                self.started.elapsed().as_millis()
            );
            self.sup.log("init", &msg);
            // Boot is over: what only start-up ran need not stay resident (docs/benchmarks.md, init).
            sys::release_startup_pages();
            self.pages_released = true;
        }
        self.sup.journal_flush();
        self.server.pump(&mut self.sup);
    }

    /// After a poll that timed out with nothing to do, once per burst of work (a reload, API commands, unit
    /// restarts): unmap the code pages that work touched and return free heap, so the resident set of an idle
    /// init stays what its idle loop needs. The pages stay in the page cache; a minor fault maps them back.
    fn release_when_quiet(&mut self, timed_out: bool) {
        if !timed_out {
            self.pages_released = false;
        } else if !self.pages_released && self.server.ready && self.shutdown.is_none() && self.sup.is_idle() {
            sys::release_startup_pages();
            self.pages_released = true;
        }
    }

    /// The one reaper: collect every exited child and hand its status to the supervisor.
    fn on_signals(&mut self) {
        let mut reap = false;
        while let Ok(Some(info)) = self.sigfd.read_signal() {
            let signo = info.ssi_signo as i32;
            if signo == Signal::SIGCHLD as i32 {
                reap = true;
            } else if let Some(action) = power_for_signal(signo, self.opts.mode) {
                self.request_shutdown(action);
            } else if signo == Signal::SIGHUP as i32 {
                self.sup.log("init", "SIGHUP: reloading unit files");
                self.sup.reload();
            }
        }
        if reap {
            self.reap();
        }
    }

    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(st) => {
                    let known = st.pid().is_some_and(|p| self.sup.pids.contains_key(&p.as_raw()));
                    if !known {
                        self.orphans_reaped += 1;
                    }
                    self.sup.on_exit(st, Instant::now());
                }
            }
        }
    }

    fn request_shutdown(&mut self, action: PowerAction) {
        if let Some((current, _)) = self.shutdown {
            self.sup.log("init", &format!("{action:?} requested while already shutting down for {current:?}"));
            return;
        }
        self.sup.log("init", &format!("{action:?} requested: stopping all units").to_lowercase());
        self.shutdown = Some((action, Instant::now()));
        self.sup.stop_all();
    }

    fn shutdown_complete(&mut self) -> Option<PowerAction> {
        let (action, since) = self.shutdown?;
        let all_down = self.sup.list().iter().all(|s| matches!(s.active, Active::Inactive | Active::Failed));
        if all_down && self.sup.is_idle() {
            return Some(action);
        }
        if since.elapsed() > SHUTDOWN_BOUND {
            self.sup.log("init", "shutdown is taking too long; killing everything that is left");
            return Some(action);
        }
        None
    }

    fn finish(mut self, action: PowerAction) -> i32 {
        let pid1 = self.opts.mode != Mode::Supervisor;
        let mut logs = Vec::new();
        shutdown::kill_remaining(pid1, &mut |m| logs.push(m.to_string()));
        self.reap();
        for l in logs {
            self.sup.log("init", &l);
        }
        self.sup.log("init", &format!("all units stopped; {} orphaned processes reaped during this run", self.orphans_reaped));
        self.sup.journal_sync();
        self.server.close_all();
        let _ = std::fs::remove_file(self.notify.path());
        match self.opts.mode {
            Mode::System => {
                drop(self.sup);
                shutdown::unmount_all(&mut |m| eprintln!("keel: {m}"));
                shutdown::final_power(action)
            }
            Mode::Namespace | Mode::Supervisor => 0,
        }
    }
}

/// For a fatal internal error in PID 1: say why on the console and keep reaping forever.
pub fn reap_forever(why: &str) -> ! {
    eprintln!("keel: FATAL: {why}");
    eprintln!("keel: init cannot continue supervising units; it keeps reaping orphans. Reboot with SysRq or power.");
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}
