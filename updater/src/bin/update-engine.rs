//! `update-engine`: the Omaha client daemon. Parses flags, builds the engine, serves the control API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use keel_updater::engine::{control, Config, Engine, HealthConfig};
use keel_updater::reboot::{self, RebootConfig, RebootManager, Strategy};
use keel_updater::slot::Slot;

/// A flag's duration: a systemd time span (`30s`, `7m`, `4h`, `500ms`, `1h30m`; a bare number is seconds), the
/// same grammar as unit files (keel_model::duration); `infinity` has no meaning for these flags.
fn parse_duration(s: &str) -> Result<Duration, String> {
    keel_model::duration::parse_timespan(s)?
        .ok_or_else(|| format!("{s:?} is not allowed here; give a duration like 30s, 7m, 4h or 500ms"))
}

#[derive(Parser)]
#[command(
    name = "update-engine",
    version,
    about = "Keel's update daemon: Omaha checks, signed A/B payloads, health gate",
    long_about = "Keel's update daemon.\n\n\
Checks the update server (Omaha v3, as CoreOS/Flatcar) a few minutes after boot and then periodically \
with jitter, backing off exponentially on failures. An offered payload is streamed, verified chunk by \
chunk and written to the inactive USR slot; its UKI goes on the ESP with a boot counter. After the \
next boot a health gate blesses the new slot; when the gate gives up, the engine reboots through init \
(--health-failure), the boot loader skips the unblessed slot, and the fallback boot reports the \
failure to the server (event 3/0, error 44).\n\n\
Once an update is installed, the reboot manager acts by --reboot-strategy: `reboot` at once, `etcd-lock` \
inside a reboot window take a slot of the cluster semaphore in clusterd's KV, drain this machine's fleet \
units, then reboot through init; `off` (default) waits for an operator. The lock is given back as soon as \
the next boot's health gate has finished, whatever the window (docs/locksmith.md). Its settings default \
to cloud-config's (keel.update.reboot_strategy, reboot_windows; keel.locksmith.group, max, endpoint).\n\n\
Control it with `updatectl` (HTTP on loopback, --listen). State lives in --state-dir.\n\n\
Example (what the image's unit runs, via /usr/lib/keel/update-engine-start, with the settings of \
cloud-config's keel.update section):\n  \
update-engine --server http://updates.example:8080/v1/update/ --channel stable --disk /dev/vda --esp /efi\n\n\
Example (rolling reboots, weekday nights at 02:00 for 1h, Berlin summer time as a fixed offset):\n  \
update-engine --reboot-strategy etcd-lock --reboot-window \"Mon-Fri 02:00 1h +02:00\" ...\n\n\
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
    /// Health gate: give up after this long (slot stays unblessed; next boot falls back). It gives up sooner
    /// when a required unit has stayed failed, with no restart pending, for --health-hold
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    health_timeout: Duration,
    /// Health gate: units that must be up (comma-separated); default: the lines of --health-units-file
    #[arg(long, value_delimiter = ',')]
    health_units: Option<Vec<String>>,
    /// File listing the units the image marks as required for a healthy boot, one per line
    #[arg(long, default_value = "/usr/lib/keel/update-health-units")]
    health_units_file: PathBuf,
    /// Health gate: what to do when it gives up. `reboot`: ask init to reboot now, so the machine falls
    /// back to the previous slot by itself (only when that slot can boot); `stay`: record it and wait for
    /// the next reboot
    #[arg(long, default_value = "reboot", value_name = "reboot|stay")]
    health_failure: keel_updater::engine::fallback::FailureAction,
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
    /// Reboot manager: what to do once an update is installed: reboot | etcd-lock | off.
    /// Default: cloud-config's keel.update.reboot_strategy, else off
    #[arg(long, value_name = "STRATEGY", env = "KEEL_UPDATE_REBOOT_STRATEGY", help_heading = "Reboot manager")]
    reboot_strategy: Option<String>,
    /// Reboot window "[DAYS] HH:MM LENGTH [TIMEZONE]", e.g. "Mon-Fri 04:00 1h +02:00"; repeat for several.
    /// Replaces cloud-config's keel.update.reboot_windows. No window: any time
    #[arg(long = "reboot-window", value_name = "WINDOW", help_heading = "Reboot manager")]
    reboot_windows: Vec<String>,
    /// Reboot-lock group (its own semaphore and max). Default: cloud-config's keel.locksmith.group, else default
    #[arg(long, value_name = "GROUP", help_heading = "Reboot manager")]
    lock_group: Option<String>,
    /// clusterd client URLs (comma-separated) holding the reboot lock and fleet's drain state.
    /// Default: keel.locksmith.endpoint, else the local clusterd's client URLs (clusterd.env), else
    /// http://127.0.0.1:2379
    #[arg(long, value_name = "URLS", help_heading = "Reboot manager")]
    lock_endpoint: Option<String>,
    /// Max holders of a semaphore this machine creates (the first lock creates it).
    /// Default: keel.locksmith.max, else 1. Change it later with `locksmithctl set-max`
    #[arg(long, value_name = "N", help_heading = "Reboot manager")]
    lock_max: Option<i64>,
    /// Shell command that reboots the machine. Default: ask init over --init-socket (`initctl reboot`)
    #[arg(long, value_name = "CMD", help_heading = "Reboot manager")]
    reboot_command: Option<String>,
    /// etcd-lock: longest wait for fleet to move this machine's units before rebooting anyway
    #[arg(long, default_value = "60s", value_parser = parse_duration, help_heading = "Reboot manager")]
    drain_timeout: Duration,
    /// How often the reboot manager re-checks the window, the lock and the engine
    #[arg(long, default_value = "10s", value_parser = parse_duration, help_heading = "Reboot manager")]
    reboot_poll: Duration,
    /// Where init writes cloud-config's settings (update.env, locksmith.env, cloud-config.json)
    #[arg(long, default_value = "/run/keel/config", help_heading = "Reboot manager")]
    config_dir: PathBuf,
}

/// The reboot manager's settings: flags first, then cloud-config's files in --config-dir.
fn reboot_config(a: &Args) -> Result<RebootConfig> {
    let files = reboot::config::load(&a.config_dir).map_err(anyhow::Error::msg)?;
    let strategy_text = a.reboot_strategy.clone().or(files.strategy).unwrap_or_else(|| "off".into());
    let strategy = Strategy::parse(&strategy_text).map_err(anyhow::Error::msg)?;
    let windows = if a.reboot_windows.is_empty() {
        files.windows
    } else {
        a.reboot_windows
            .iter()
            .map(|w| reboot::window::Window::parse(w).map(|p| (w.clone(), p)))
            .collect::<Result<Vec<_>, _>>()
            .context("--reboot-window")?
    };
    Ok(RebootConfig {
        strategy,
        window_texts: windows.iter().map(|(t, _)| t.clone()).collect(),
        windows: reboot::window::Windows(windows.into_iter().map(|(_, w)| w).collect()),
        group: a.lock_group.clone().or(files.group).unwrap_or_else(|| "default".into()),
        endpoints: match a.lock_endpoint.clone().or(files.endpoints) {
            Some(e) => vec![e],
            None => reboot::config::clusterd_client_urls(&a.config_dir),
        },
        initial_max: a.lock_max.or(files.max).unwrap_or(1),
        reboot_command: a.reboot_command.clone(),
        init_socket: a.init_socket.clone(),
        drain_timeout: a.drain_timeout,
        poll: a.reboot_poll.max(Duration::from_millis(100)),
        // Filled in from the engine's configuration once it is built.
        machine_id: String::new(),
        boot_id: String::new(),
        state_dir: a.state_dir.clone(),
    })
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

/// Run; on failure one line on stderr (`update-engine: what failed: why`) and exit status 1.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    keel_model::report::exit("update-engine", run().await)
}

async fn run() -> Result<()> {
    let a = Args::parse();
    // Unusable reboot settings must not stop the engine: it is what blesses a freshly updated slot.
    let (mut reboot_cfg, reboot_problem) = match reboot_config(&a) {
        Ok(c) => (c, None),
        Err(e) => (
            RebootConfig::off(a.state_dir.clone(), a.init_socket.clone()),
            Some(format!("reboot manager settings: {}", keel_model::report::one_line(e.as_ref()))),
        ),
    };
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
            on_failure: a.health_failure,
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
    reboot_cfg.machine_id = engine.cfg.machine_id.clone();
    reboot_cfg.boot_id = engine.cfg.boot_id.clone();
    let manager = RebootManager::new(reboot_cfg, engine.clone(), reboot_problem);
    let e = engine.clone();
    let needs_gate = tokio::task::spawn_blocking(move || e.boot_detect())
        .await
        .unwrap_or(false);
    // The manager runs the health gate (if this boot needs it), releases a lock taken before the
    // reboot, then acts on UPDATED_NEED_REBOOT by strategy.
    std::thread::Builder::new()
        .name("reboot-manager".into())
        .spawn(move || manager.run(needs_gate))
        .context("starting the reboot manager thread")?;
    if !a.no_schedule {
        tokio::spawn(control::schedule(engine.clone()));
    }
    axum::serve(listener, control::router(engine))
        .await
        .context("control API")?;
    Ok(())
}
