//! `update-engine`: the Omaha client daemon. Parses flags, builds the engine, serves the control API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use keel_updater::engine::{control, Config, Engine, HealthConfig};
use keel_updater::slot::Slot;

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 7m, 4h, 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit in {s:?}; use ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Parser)]
#[command(
    name = "update-engine",
    version,
    about = "Keel's update daemon: Omaha checks, signed A/B payloads, health gate",
    long_about = "Keel's update daemon.\n\n\
Checks the update server (Omaha v3, as CoreOS/Flatcar) a few minutes after boot and then periodically\n\
with jitter, backing off exponentially on failures. An offered payload is streamed, verified chunk by\n\
chunk and written to the inactive USR slot; its UKI goes on the ESP with a boot counter. After the\n\
next boot a health gate blesses the new slot; a slot that never passes is abandoned by the boot\n\
loader and the failure is reported to the server (event 3/0, error 44).\n\n\
Control it with `updatectl` (HTTP on loopback, --listen). State lives in --state-dir.\n\n\
Example (what the image's unit runs):\n  \
update-engine --server http://updates.example:8080/v1/update/ --disk /dev/vda --esp /boot/efi\n\n\
Example (tests, a file-backed disk):\n  \
update-engine --server http://127.0.0.1:8080/v1/update/ --disk disk.img --esp esp/ \\\n      \
--state-dir state/ --keys keys/ --running-version 1.0.0 --active-slot a --first-check 1s"
)]
struct Args {
    /// Omaha endpoint of the update server
    #[arg(
        long,
        env = "KEEL_UPDATE_SERVER",
        default_value = "http://127.0.0.1:8080/v1/update/"
    )]
    server: String,
    /// Channel (Omaha track) when none was set with `updatectl channel`
    #[arg(long, default_value = "stable")]
    channel: String,
    /// Whole disk holding the USR-A/USR-B partitions (block device or image file)
    #[arg(long, default_value = "/dev/vda")]
    disk: PathBuf,
    /// Mounted EFI system partition
    #[arg(long, default_value = "/boot/efi")]
    esp: PathBuf,
    /// Directory of trusted *.pub keys
    #[arg(long, default_value = keel_updater::payload::keys::DEFAULT_KEYS_DIR)]
    keys: PathBuf,
    /// State directory (channel, resume point, pending events)
    #[arg(long, default_value = "/var/lib/keel/update")]
    state_dir: PathBuf,
    /// Control API address (keep it on loopback)
    #[arg(long, default_value = "127.0.0.1:9745")]
    listen: String,
    /// Running OS version; default: VERSION_ID from --os-release
    #[arg(long)]
    running_version: Option<String>,
    #[arg(long, default_value = "/usr/lib/os-release")]
    os_release: PathBuf,
    /// Running slot (a|b); default: /run/keel/boot.env, else the kernel command line, else the GPT flags
    #[arg(long)]
    active_slot: Option<String>,
    /// Machine id; default: /etc/machine-id
    #[arg(long)]
    machine_id: Option<String>,
    /// Boot id; default: /proc/sys/kernel/random/boot_id
    #[arg(long)]
    boot_id: Option<String>,
    /// Delay before the first check after start
    #[arg(long, default_value = "7m", value_parser = parse_duration)]
    first_check: Duration,
    /// Interval between checks
    #[arg(long, default_value = "45m", value_parser = parse_duration)]
    interval: Duration,
    /// Random ± jitter on the interval
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    jitter: Duration,
    /// Longest backoff after repeated failures
    #[arg(long, default_value = "4h", value_parser = parse_duration)]
    max_backoff: Duration,
    /// Accept payloads older than the running version
    #[arg(long)]
    allow_downgrade: bool,
    /// Limit download rate, bytes per second
    #[arg(long)]
    max_download_rate: Option<u64>,
    /// Health gate: command that exits 0 while every required unit runs
    #[arg(long)]
    health_cmd: Option<String>,
    /// Health gate: how long the command must keep succeeding before the slot is blessed
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    health_hold: Duration,
    /// Health gate: give up after this long (slot stays unblessed; next boot falls back)
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    health_timeout: Duration,
    /// Health gate: units that must be up (comma-separated); default: the lines of --health-units-file
    #[arg(long, value_delimiter = ',')]
    health_units: Option<Vec<String>>,
    /// File listing the units the image marks as required for a healthy boot, one per line
    #[arg(long, default_value = "/usr/lib/keel/update-health-units")]
    health_units_file: PathBuf,
    /// init's control socket (asked for unit states by the health gate)
    #[arg(long, env = "KEEL_INIT_SOCKET", default_value = "/run/keel/init.sock")]
    init_socket: PathBuf,
    /// Do not check periodically; only on `updatectl check|apply`
    #[arg(long)]
    no_schedule: bool,
    #[arg(long, default_value = "amd64-usr")]
    board: String,
    #[arg(long, default_value = "qemu")]
    platform: String,
}

fn read_trim(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn os_release_version(p: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(p).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_ID="))
        .map(|v| v.trim_matches('"').to_string())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Args::parse();
    let running_version = match a.running_version {
        Some(v) => v,
        None => os_release_version(&a.os_release).with_context(|| {
            format!(
                "no VERSION_ID in {}; pass --running-version",
                a.os_release.display()
            )
        })?,
    };
    let active_slot = match a.active_slot.as_deref() {
        Some(s) => {
            Some(Slot::parse(s).with_context(|| format!("--active-slot {s:?}: expected a or b"))?)
        }
        None => None,
    };
    let cfg = Config {
        server: a.server,
        default_channel: a.channel,
        disk: a.disk,
        esp: a.esp,
        keys_dir: a.keys,
        state_dir: a.state_dir.clone(),
        machine_id: a
            .machine_id
            .or_else(|| read_trim("/etc/machine-id"))
            .unwrap_or_else(|| "unknown".into()),
        boot_id: a
            .boot_id
            .or_else(|| read_trim("/proc/sys/kernel/random/boot_id"))
            .unwrap_or_default(),
        running_version,
        active_slot,
        cmdline: read_trim("/proc/cmdline").unwrap_or_default(),
        boot_env: PathBuf::from("/run/keel/boot.env"),
        allow_downgrade: a.allow_downgrade,
        first_check_delay: a.first_check,
        interval: a.interval,
        jitter: a.jitter,
        max_backoff: a.max_backoff,
        max_download_rate: a.max_download_rate,
        health: HealthConfig {
            cmd: a.health_cmd,
            hold: a.health_hold,
            timeout: a.health_timeout,
            units: a.health_units.unwrap_or_else(|| {
                std::fs::read_to_string(&a.health_units_file)
                    .map(|t| {
                        t.lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty() && !l.starts_with('#'))
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default()
            }),
            init_socket: a.init_socket,
        },
        board: a.board,
        platform: a.platform,
    };
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    let engine = Arc::new(Engine::new(cfg));
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("binding control API on {}", a.listen))?;
    eprintln!(
        "update-engine: control API on http://{}",
        listener.local_addr()?
    );
    let e = engine.clone();
    if tokio::task::spawn_blocking(move || e.boot_detect())
        .await
        .unwrap_or(false)
    {
        let e = engine.clone();
        tokio::task::spawn_blocking(move || e.gate_and_bless());
    }
    if !a.no_schedule {
        tokio::spawn(control::schedule(engine.clone()));
    }
    axum::serve(listener, control::router(engine))
        .await
        .context("control API")?;
    Ok(())
}
