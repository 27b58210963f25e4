//! `init`: Keel's PID 1, or a unit supervisor when started as an ordinary process.

use std::path::PathBuf;
use std::time::Duration;

use keel_init::journal::Limits;
use keel_init::run::{self, Init, Mode, Options};

const LONG_ABOUT: &str = "\
Keel's init. As PID 1 of a machine it mounts the pseudo-filesystems, sets the hostname, supervises
every unit (services, targets, containers) and, on reboot or poweroff, stops them in reverse
dependency order before calling reboot(2). Started as an ordinary process it is a child subreaper
that supervises the same units, which is how tests and developers run it.

Units are systemd-style unit files, searched in --units-dir order (first match wins): by default
/etc/keel/units, /run/keel/units and /usr/lib/keel/units. At start init starts --target and
everything it wants or requires. Control it with `initctl` over the --socket.

SIGNALS
  SIGTERM, SIGINT       reboot (PID 1 of a machine) or stop everything and exit (otherwise)
  SIGUSR2, SIGRTMIN+4   power off
  SIGUSR1, SIGRTMIN+3   halt
  SIGRTMIN+5            reboot
  SIGHUP                re-read unit files

EXAMPLES
  Supervise a directory of units as a normal process, state under /tmp/keel:
    init --units-dir ./units --state-dir /tmp/keel
    initctl --socket /tmp/keel/init.sock list

  Run as PID 1 of a fresh namespace (what the tests do):
    unshare --pid --fork --mount-proc init --units-dir ./units --state-dir /tmp/keel";

const USAGE: &str = "\
Usage: init [OPTIONS]

Options:
      --units-dir DIR       A directory of unit files; repeat for several (earlier ones win).
                            Default: /etc/keel/units, /run/keel/units, /usr/lib/keel/units
      --target UNIT         The unit to start at boot, with everything it wants
                            [default: default.target]
      --state-dir DIR       Where sockets (and, unless --journal-dir, the journal) live.
                            Default: /run/keel for sockets, /var/log/keel/journal for the journal
      --socket PATH         The control socket initctl talks to [default: STATE_DIR/init.sock]
      --journal-dir DIR     Journal directory [default: STATE_DIR/journal or /var/log/keel/journal]
      --journal-max-mib N   Journal size bound in MiB; oldest segments are deleted beyond it
                            [default: 64]
      --cgroup-root DIR     Where a cgroup2 hierarchy is mounted [default: /sys/fs/cgroup]
      --hostname NAME       Hostname to set (PID 1 only) [default: /etc/hostname]
      --forward-to-console  Also print every unit's output on init's stderr (the console)
      --mode MODE           Override detection: system | namespace | supervisor
  -h, --help                Print help
  -V, --version             Print version";

/// init's command line. Parsed by hand: init is resident on every machine and clap would double the pages
/// it keeps in memory (see docs/benchmarks.md).
#[derive(Debug, Default)]
struct Args {
    units_dirs: Vec<PathBuf>,
    target: Option<String>,
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    journal_dir: Option<PathBuf>,
    journal_max_mib: Option<u64>,
    cgroup_root: Option<PathBuf>,
    hostname: Option<String>,
    forward_to_console: bool,
    mode: Option<String>,
}

impl Args {
    fn parse(argv: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut a = Args::default();
        let mut it = argv.peekable();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| -> Result<String, String> {
                inline.clone().or_else(|| it.next()).ok_or_else(|| format!("{name} needs a value"))
            };
            match flag.as_str() {
                "-h" | "--help" => {
                    println!("Keel's init: PID 1 and unit supervisor\n\n{LONG_ABOUT}\n\n{USAGE}");
                    std::process::exit(0);
                }
                "-V" | "--version" => {
                    println!("init {}", env!("CARGO_PKG_VERSION"));
                    std::process::exit(0);
                }
                "--units-dir" => a.units_dirs.push(value(&flag)?.into()),
                "--target" => a.target = Some(value(&flag)?),
                "--state-dir" => a.state_dir = Some(value(&flag)?.into()),
                "--socket" => a.socket = Some(value(&flag)?.into()),
                "--journal-dir" => a.journal_dir = Some(value(&flag)?.into()),
                "--journal-max-mib" => {
                    let v = value(&flag)?;
                    a.journal_max_mib = Some(v.parse().map_err(|_| format!("--journal-max-mib takes a number, not {v:?}"))?);
                }
                "--cgroup-root" => a.cgroup_root = Some(value(&flag)?.into()),
                "--hostname" => a.hostname = Some(value(&flag)?),
                "--forward-to-console" => a.forward_to_console = true,
                "--mode" => {
                    let v = value(&flag)?;
                    if !["system", "namespace", "supervisor"].contains(&v.as_str()) {
                        return Err(format!("--mode takes system, namespace or supervisor, not {v:?}"));
                    }
                    a.mode = Some(v);
                }
                // The kernel passes unknown command-line words (e.g. `single`, `quiet`) to PID 1: ignore them.
                other if std::process::id() == 1 && !other.starts_with("--") => {}
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        Ok(a)
    }
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
    let max = a.journal_max_mib.unwrap_or(64).max(1) * 1024 * 1024;
    Options {
        mode,
        unit_dirs,
        target: a.target.unwrap_or_else(|| "default.target".into()),
        socket: a.socket.unwrap_or_else(|| run_dir.join("init.sock")),
        notify_socket: run_dir.join("notify"),
        journal_dir,
        journal_limits: Limits { max_total_bytes: max, max_segment_bytes: (max / 16).max(64 * 1024) },
        cgroup_root: a.cgroup_root.unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup")),
        hostname: a.hostname,
        forward_to_console: a.forward_to_console,
    }
}

fn main() {
    // In the initramfs (PID 1 with /etc/initrd-release, or `init --initrd`): find and mount the USR slot and
    // ROOT, then switch_root into the real init. Never returns on success.
    if std::env::args().nth(1).as_deref() == Some("--initrd")
        || (std::process::id() == 1 && std::path::Path::new("/etc/initrd-release").exists())
    {
        let Err(e) = keel_init::initrd::run();
        eprintln!("keel initrd: FATAL: {}", keel_model::report::one_line(e.as_ref()));
        run::reap_forever("initramfs mode failed");
    }
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("init: {e}\n\n{USAGE}");
            if std::process::id() == 1 {
                run::reap_forever("bad command line");
            }
            std::process::exit(2);
        }
    };
    let opts = options(args);
    let pid1 = opts.mode != Mode::Supervisor;
    let outcome = std::panic::catch_unwind(move || -> anyhow::Result<i32> { Ok(Init::setup(opts)?.run()) });
    let why = match outcome {
        Ok(Ok(code)) => std::process::exit(code),
        Ok(Err(e)) => keel_model::report::one_line(e.as_ref()),
        Err(_) => "internal error (panic); see the message above".to_string(),
    };
    if pid1 && std::process::id() == 1 {
        run::reap_forever(&why);
    }
    eprintln!("init: {why}");
    std::thread::sleep(Duration::from_millis(10));
    std::process::exit(1);
}
