//! `initctl`: control Keel's init over its socket.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use keel_init::api::client::Client;
use keel_init::api::{Reply, Request, DEFAULT_SOCKET};
use keel_init::journal::{BootSel, Query, Record};
use keel_init::supervisor::UnitStatus;
use keel_init::sys::PowerAction;

const LONG_ABOUT: &str = "\
Control Keel's init: list and inspect units, start and stop them, read their logs, reboot the machine.
Every command talks to init's control socket (root only) and exits non-zero when what it asked for failed.
Add --json for machine-readable output.

EXAMPLES
  initctl list                         every unit with its state
  initctl status web.service           state, pid, uptime, restarts, last exit and recent log lines
  initctl start web.service            start it and wait for the result
  initctl logs -f -n 20 web.service    the last 20 lines, then follow
  initctl logs -b -1                   everything from the previous boot
  initctl enable web.service           start it at every boot ([Install] WantedBy=)
  initctl reload                       re-read unit files after editing them
  initctl image import busybox.tar     add an image (oci-archive, docker save; docs/containers.md)
  initctl run busybox echo hello       a one-off container in the foreground
  initctl reboot";

#[derive(Parser, Debug)]
#[command(name = "initctl", version, about = "Control Keel's init", long_about = LONG_ABOUT)]
struct Args {
    /// init's control socket.
    #[arg(long, global = true, env = "KEEL_INIT_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of tables (one object per line for `logs -f`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List every unit: name, state, sub-state, pid, description.
    List,
    /// Show one unit: state, main pid, uptime, restarts, last exit, recent log lines.
    Status {
        unit: String,
        /// Log lines to show.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
    },
    /// Start a unit (and what it requires); waits for the result.
    Start {
        unit: String,
        /// Return as soon as the job is queued.
        #[arg(long)]
        no_block: bool,
    },
    /// Stop a unit (and what requires it); waits until it is down.
    Stop {
        unit: String,
        #[arg(long)]
        no_block: bool,
    },
    /// Stop then start a unit.
    Restart {
        unit: String,
        #[arg(long)]
        no_block: bool,
    },
    /// Re-read every unit file; running units keep running.
    Reload,
    /// Start a unit at boot: link it into the .wants/ of its [Install] WantedBy= targets.
    Enable { unit: String },
    /// Undo `enable`.
    Disable { unit: String },
    /// Show unit output from the journal.
    Logs {
        /// Only this unit (default: every unit and init itself).
        unit: Option<String>,
        /// Keep printing new lines as they arrive.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(short = 'n', long)]
        lines: Option<usize>,
        /// Which boot: 0 = this one, -1 = the previous, or a boot id.
        #[arg(short, long, allow_hyphen_values = true)]
        boot: Option<String>,
        /// Only lines since this many seconds ago.
        #[arg(long, value_name = "SECONDS")]
        since: Option<u64>,
    },
    /// Stop every unit and reboot.
    Reboot,
    /// Stop every unit and power off.
    Poweroff,
    /// Stop every unit and halt.
    Halt,
    /// Check a #cloud-config file offline: prints each problem as `user-data:LINE:COLUMN: …`, exits 1 on errors.
    CloudConfig {
        /// The user-data file to check.
        file: PathBuf,
    },
    /// Send sd_notify assignments (READY=1, STATUS=…) to $NOTIFY_SOCKET, like systemd-notify.
    ///
    /// Returns once init has handled them (a barrier, at most 5 s), so a short-lived sender is still there when
    /// init looks up its unit (docs/init-api.md, "sd_notify").
    Notify {
        /// KEY=VALUE assignments, e.g. READY=1 "STATUS=serving on :80".
        #[arg(required = true)]
        assignments: Vec<String>,
        /// Send on behalf of this pid: a number, `parent` (default, the shell that runs us) or `self`.
        #[arg(long, default_value = "parent")]
        pid: String,
    },
    /// Manage container images: import, pull, list, inspect, rm, prune (works on the store directly).
    Image {
        #[command(subcommand)]
        cmd: keel_init::images::cli::ImageCmd,
    },
    /// Run a one-off container in the foreground: output here, its exit code ours.
    Run(keel_init::runtime::cli::RunArgs),
    /// Check that init answers; exits 0 once init is up (`--wait-ready` waits for "all units ready").
    Ping {
        #[arg(long)]
        wait_ready: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("initctl: {}", keel_model::report::one_line(e.as_ref()));
            std::process::exit(1);
        }
    }
}

fn connect(args: &Args) -> anyhow::Result<Client> {
    Ok(Client::connect(&args.socket)?)
}

fn run(args: Args) -> anyhow::Result<i32> {
    let req = match &args.cmd {
        Cmd::List => Request::List,
        Cmd::Status { unit, lines } => Request::Status { unit: unit.clone(), lines: *lines },
        Cmd::Start { unit, no_block } => Request::Start { unit: unit.clone(), wait: !no_block },
        Cmd::Stop { unit, no_block } => Request::Stop { unit: unit.clone(), wait: !no_block },
        Cmd::Restart { unit, no_block } => Request::Restart { unit: unit.clone(), wait: !no_block },
        Cmd::Reload => Request::Reload,
        Cmd::Enable { unit } => Request::Enable { unit: unit.clone() },
        Cmd::Disable { unit } => Request::Disable { unit: unit.clone() },
        Cmd::Logs { unit, follow, lines, boot, since } => Request::Logs { query: logs_query(unit, *lines, boot, *since)?, follow: *follow },
        Cmd::Reboot => Request::Power { action: PowerAction::Reboot },
        Cmd::Poweroff => Request::Power { action: PowerAction::Poweroff },
        Cmd::Halt => Request::Power { action: PowerAction::Halt },
        Cmd::Image { cmd } => return keel_init::images::cli::run(cmd, args.json),
        Cmd::Run(r) => return keel_init::runtime::cli::run(&args.socket, r),
        Cmd::Ping { wait_ready, timeout } => return ping(&args, *wait_ready, *timeout),
        Cmd::Notify { assignments, pid } => return notify(assignments, pid),
        Cmd::CloudConfig { file } => return check_cloud_config(file, args.json),
    };
    let mut client = connect(&args)?;
    let reply = client.call(&req)?;
    let code = print_reply(&reply, args.json);
    if let (Cmd::Logs { follow: true, .. }, Reply::Records { .. }) = (&args.cmd, &reply) {
        loop {
            match client.recv()? {
                Reply::Record { record } => print_record(&record, args.json),
                other => return Ok(print_reply(&other, args.json)),
            }
        }
    }
    Ok(code)
}

fn logs_query(unit: &Option<String>, lines: Option<usize>, boot: &Option<String>, since: Option<u64>) -> anyhow::Result<Query> {
    let boot = match boot.as_deref() {
        None => None,
        Some(b) => Some(match b.parse::<i32>() {
            Ok(n) => BootSel::Offset(n),
            Err(_) if b.len() >= 8 => BootSel::Id(b.to_string()),
            Err(_) => bail!("--boot takes an offset (0, -1, …) or a boot id, not {b:?}"),
        }),
    };
    let since_us = since.map(|s| {
        let now = std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        now.saturating_sub(Duration::from_secs(s)).as_micros() as u64
    });
    Ok(Query { unit: unit.clone(), boot, since_us, last: lines, after_seq: None })
}

fn check_cloud_config(file: &std::path::Path, json: bool) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let (cfg, problems) = keel_init::cloudconfig::parse(&text, &Default::default());
    if json {
        println!("{}", serde_json::json!({ "config": cfg, "problems": problems }));
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        if problems.is_empty() {
            println!("{}: valid", file.display());
        }
    }
    Ok(i32::from(problems.iter().any(|p| p.fatal)))
}

fn notify(assignments: &[String], pid: &str) -> anyhow::Result<i32> {
    let path = std::env::var("NOTIFY_SOCKET").context("NOTIFY_SOCKET is not set: run this from a Type=notify unit")?;
    let pid = match pid {
        "self" => std::process::id() as i32,
        "parent" => nix::unistd::getppid().as_raw(),
        n => n.parse().with_context(|| format!("--pid takes a number, `parent` or `self`, not {n:?}"))?,
    };
    let text = assignments.join("\n");
    let confirmed = keel_init::notify::send(std::path::Path::new(&path), &text, pid)
        .with_context(|| format!("sending to {path}"))?;
    if !confirmed {
        eprintln!(
            "initctl: sent, but {path} did not confirm within {:?}; it may not have handled it yet",
            keel_init::notify::BARRIER_TIMEOUT
        );
    }
    Ok(0)
}

fn ping(args: &Args, wait_ready: bool, timeout: u64) -> anyhow::Result<i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
    let mut last_err = None;
    while std::time::Instant::now() < deadline {
        match connect(args).and_then(|mut c| Ok(c.call(&Request::Ping)?)) {
            Ok(Reply::Pong { version, pid, ready }) if ready || !wait_ready => {
                if args.json {
                    println!("{}", serde_json::json!({"version": version, "pid": pid, "ready": ready}));
                } else {
                    println!("init {version} (pid {pid}) {}", if ready { "ready" } else { "starting" });
                }
                return Ok(0);
            }
            Ok(_) => {}
            Err(e) => last_err = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match last_err {
        Some(e) => Err(e).context(format!("init did not answer within {timeout} s")),
        None => bail!("init did not report ready within {timeout} s"),
    }
}

/// Print a reply for people (or as JSON) and return the exit code it implies.
fn print_reply(reply: &Reply, json: bool) -> i32 {
    let code = match reply {
        Reply::Error { .. } => 1,
        Reply::Job { ok, .. } => i32::from(!ok),
        _ => 0,
    };
    if json {
        match reply {
            Reply::Records { records } => records.iter().for_each(|r| print_record(r, true)),
            _ => println!("{}", serde_json::to_string(reply).unwrap_or_default()),
        }
        return code;
    }
    match reply {
        Reply::Ok { message } => {
            if let Some(m) = message {
                println!("{m}");
            }
        }
        Reply::Error { message, suggestions, .. } => {
            eprintln!("initctl: {message}");
            if !suggestions.is_empty() && !message.contains("did you mean") {
                eprintln!("did you mean: {}", suggestions.join(", "));
            }
        }
        Reply::Pong { version, pid, ready } => println!("init {version} (pid {pid}) {}", if *ready { "ready" } else { "starting" }),
        Reply::Units { units } => print_table(units),
        Reply::Status { status, logs } => {
            print_status(status);
            print_logs(logs);
        }
        Reply::Job { unit, ok, message, status, logs } => {
            if !ok {
                eprintln!("initctl: job for {unit} failed: {message}");
                if let Some(s) = status {
                    print_status(s);
                }
                print_logs(logs);
            }
        }
        Reply::Reloaded { units, diagnostics } => {
            for d in diagnostics {
                eprintln!("{d}");
            }
            println!("reloaded: {units} units");
        }
        Reply::Records { records } => records.iter().for_each(|r| print_record(r, false)),
        Reply::Record { record } => print_record(record, false),
    }
    code
}

fn enum_str<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn print_table(units: &[UnitStatus]) {
    let w = units.iter().map(|u| u.name.len()).max().unwrap_or(4).max(4);
    println!("{:w$}  {:8}  {:12}  {:>7}  DESCRIPTION", "UNIT", "ACTIVE", "SUB", "PID");
    for u in units {
        let pid = u.main_pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        println!("{:w$}  {:8}  {:12}  {:>7}  {}", u.name, enum_str(&u.active), enum_str(&u.sub), pid, u.description);
    }
    let failed = units.iter().filter(|u| enum_str(&u.active) == "failed").count();
    println!("\n{} units listed, {} failed", units.len(), failed);
}

fn print_status(s: &UnitStatus) {
    println!("{} - {}", s.name, if s.description.is_empty() { "(no description)" } else { &s.description });
    println!("   Loaded: {}{}", s.load, s.sources.first().map(|p| format!(" ({}{})", p.display(), if s.enabled { "; enabled" } else { "" })).unwrap_or_default());
    let uptime = s.uptime_secs.map(|u| format!("; up {}", human(u))).unwrap_or_default();
    let result = s.result.as_ref().map(|r| format!(" (result: {})", enum_str(r))).unwrap_or_default();
    println!("   Active: {} ({}){result}{uptime}", enum_str(&s.active), enum_str(&s.sub));
    if let Some(p) = s.main_pid {
        println!(" Main PID: {p}");
    }
    if let Some(t) = s.tasks {
        println!("    Tasks: {t}");
    }
    println!(" Restarts: {}", s.restarts);
    if let Some(e) = &s.last_exit {
        println!("Last exit: pid {} {}", e.pid, describe_exit(e.code, e.signal, e.oom_killed));
    }
    if let Some(t) = &s.status_text {
        println!("   Status: {t}");
    }
    if let Some(e) = &s.error {
        println!("    Error: {e}");
    }
}

fn describe_exit(code: Option<i32>, signal: Option<i32>, oom: bool) -> String {
    match (code, signal) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("killed by signal {s}{}", if oom { " (out of memory)" } else { "" }),
        _ => "ended".into(),
    }
}

fn human(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}min {}s", s / 60, s % 60),
        s => format!("{}h {}min", s / 3600, (s % 3600) / 60),
    }
}

fn print_logs(logs: &[Record]) {
    if !logs.is_empty() {
        println!();
        logs.iter().for_each(|r| print_record(r, false));
    }
}

fn print_record(r: &Record, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    let secs = (r.ts_us / 1_000_000) as i64;
    let ms = (r.ts_us / 1000) % 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    println!("{h:02}:{m:02}:{s:02}.{ms:03} {}: {}", r.unit, r.message);
}
