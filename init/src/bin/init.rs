//! `init`: Keel's PID 1, or a unit supervisor when started as an ordinary process.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use keel_init::journal::Limits;
use keel_init::run::{self, Init, Mode, Options};

const LONG_ABOUT: &str = "\
Keel's init. As PID 1 of a machine it mounts the pseudo-filesystems, sets the hostname, supervises every unit
(services, targets, containers) and, on reboot or poweroff, stops them in reverse dependency order before
calling reboot(2). Started as an ordinary process it is a child subreaper that supervises the same units, which
is how tests and developers run it.

Units are systemd-style unit files, searched in --units-dir order (first match wins): by default
/etc/keel/units, /run/keel/units and /usr/lib/keel/units. At start init starts --target and everything it
wants or requires. Control it with `initctl` over the --socket.

SIGNALS
  SIGTERM, SIGINT   reboot (PID 1 of a machine) or stop everything and exit (otherwise)
  SIGUSR2, SIGRTMIN+4   power off        SIGUSR1, SIGRTMIN+3   halt        SIGRTMIN+5   reboot
  SIGHUP            re-read unit files

EXAMPLES
  Supervise a directory of units as a normal process, state under /tmp/keel:
    init --units-dir ./units --state-dir /tmp/keel
    initctl --socket /tmp/keel/init.sock list

  Run as PID 1 of a fresh namespace (what the tests do):
    unshare --pid --fork --mount-proc init --units-dir ./units --state-dir /tmp/keel";

/// Keel's init: PID 1 and unit supervisor.
#[derive(Parser, Debug)]
#[command(name = "init", version, about, long_about = LONG_ABOUT)]
struct Args {
    /// A directory of unit files; repeat for several (earlier ones win). Default: /etc/keel/units,
    /// /run/keel/units, /usr/lib/keel/units.
    #[arg(long = "units-dir", value_name = "DIR")]
    units_dirs: Vec<PathBuf>,

    /// The unit to start at boot (it pulls in everything it wants).
    #[arg(long, default_value = "default.target", value_name = "UNIT")]
    target: String,

    /// Where init keeps its sockets and (unless --journal-dir) its journal. Default: /run/keel for sockets and
    /// /var/log/keel/journal for the journal as PID 1 of a machine.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// The control socket initctl talks to. Default: STATE_DIR/init.sock or /run/keel/init.sock.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Journal directory. Default: STATE_DIR/journal or /var/log/keel/journal.
    #[arg(long, value_name = "DIR")]
    journal_dir: Option<PathBuf>,

    /// Journal size bound in MiB (oldest segments are deleted beyond it).
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    journal_max_mib: u64,

    /// Where a cgroup2 hierarchy is mounted (units get a cgroup each under init's own cgroup).
    #[arg(long, default_value = "/sys/fs/cgroup", value_name = "DIR")]
    cgroup_root: PathBuf,

    /// Hostname to set (PID 1 only; default: /etc/hostname).
    #[arg(long)]
    hostname: Option<String>,

    /// Also print every unit's output on init's stderr (the console).
    #[arg(long)]
    forward_to_console: bool,

    /// Override mode detection: system (PID 1 of a machine), namespace (PID 1 of a PID namespace) or
    /// supervisor (an ordinary process).
    #[arg(long, value_parser = ["system", "namespace", "supervisor"])]
    mode: Option<String>,
}

fn options(a: Args) -> Options {
    let mode = match a.mode.as_deref() {
        Some("system") => Mode::System,
        Some("namespace") => Mode::Namespace,
        Some("supervisor") => Mode::Supervisor,
        _ => Mode::detect(),
    };
    let run_dir = a.state_dir.clone().unwrap_or_else(|| PathBuf::from("/run/keel"));
    let journal_dir = a.journal_dir.unwrap_or_else(|| match &a.state_dir {
        Some(d) => d.join("journal"),
        None => PathBuf::from("/var/log/keel/journal"),
    });
    let unit_dirs = if a.units_dirs.is_empty() {
        keel_model::UnitLoader::default_dirs()
    } else {
        a.units_dirs
    };
    let max = a.journal_max_mib.max(1) * 1024 * 1024;
    Options {
        mode,
        unit_dirs,
        target: a.target,
        socket: a.socket.unwrap_or_else(|| run_dir.join("init.sock")),
        notify_socket: run_dir.join("notify"),
        journal_dir,
        journal_limits: Limits { max_total_bytes: max, max_segment_bytes: (max / 16).max(64 * 1024) },
        cgroup_root: a.cgroup_root,
        hostname: a.hostname,
        forward_to_console: a.forward_to_console,
    }
}

fn main() {
    let args = Args::parse();
    let opts = options(args);
    let pid1 = opts.mode != Mode::Supervisor;
    let outcome = std::panic::catch_unwind(move || -> anyhow::Result<i32> { Ok(Init::setup(opts)?.run()) });
    let why = match outcome {
        Ok(Ok(code)) => std::process::exit(code),
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => "internal error (panic); see the message above".to_string(),
    };
    if pid1 && std::process::id() == 1 {
        run::reap_forever(&why);
    }
    eprintln!("init: {why}");
    std::thread::sleep(Duration::from_millis(10));
    std::process::exit(1);
}
