//! `updatectl`: command-line client of update-engine's control API.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "updatectl",
    version,
    about = "Ask update-engine what it is doing, or tell it what to do",
    long_about = "Ask update-engine what it is doing, or tell it what to do.\n\n\
Examples:\n  \
updatectl status              # state, versions, progress, last error\n  \
updatectl check               # is an update available? (does not download)\n  \
updatectl apply               # check, download, verify, install; waits and shows progress\n  \
updatectl channel beta        # follow another channel from the next check on\n  \
updatectl rollback            # boot the other slot next time (no network needed)\n  \
updatectl status --json       # for scripts\n\n\
States: IDLE, CHECKING, DOWNLOADING, VERIFYING, FINALIZING, UPDATED_NEED_REBOOT, ERROR.\n\
Reboot manager phases (the REBOOT line): idle, off, waiting-for-window, waiting-for-lock, draining, \
rebooting, holding-lock, releasing-lock, error (docs/locksmith.md)."
)]
struct Cli {
    /// update-engine's control API
    #[arg(
        long,
        env = "KEEL_UPDATE_ENDPOINT",
        default_value = "http://127.0.0.1:9745",
        global = true
    )]
    endpoint: String,
    /// JSON output for scripts
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show state, versions, slot, progress and the last error
    Status,
    /// Ask the server whether an update is available (downloads nothing)
    Check,
    /// Check and install an available update (waits and shows progress)
    #[command(
        long_about = "Check and install an available update.\n\nWaits until the engine is done and prints \
progress on a terminal; --no-wait returns at once.\n\nExample:\n  updatectl apply && reboot"
    )]
    Apply {
        /// Return immediately instead of waiting
        #[arg(long)]
        no_wait: bool,
    },
    /// Show or set the channel (Omaha track)
    #[command(
        long_about = "Show or set the channel.\n\nExamples:\n  updatectl channel\n  updatectl channel beta"
    )]
    Channel { name: Option<String> },
    /// Make the other slot boot next (no network); reboot to switch
    Rollback,
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

fn call(method: &str, url: &str, body: Option<Value>) -> Result<Value> {
    let req = agent().request(method, url);
    let resp = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    keel_updater::json_reply(resp, "", || {
        format!("cannot reach update-engine at {url}; is it running? (see --endpoint)")
    })
}

fn print_status(s: &Value) {
    let g = |k: &str| match s.get(k) {
        Some(Value::String(v)) => v.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(v) => v.to_string(),
    };
    println!("STATE          {}", g("state"));
    println!("VERSION        {}", g("current_version"));
    println!("CHANNEL        {}", g("channel"));
    println!("SLOT           {}", g("active_slot"));
    println!("HEALTH         {}", g("health"));
    if s.get("new_version").is_some_and(|v| !v.is_null()) {
        println!("NEW VERSION    {}", g("new_version"));
    }
    if g("state") == "DOWNLOADING" || g("state") == "VERIFYING" {
        let p = s.get("progress").and_then(|p| p.as_f64()).unwrap_or(0.0);
        println!(
            "PROGRESS       {:.1}% ({} of {} bytes)",
            p * 100.0,
            g("bytes_done"),
            g("bytes_total")
        );
    }
    if s.get("last_check_result").is_some_and(|v| !v.is_null()) {
        println!("LAST CHECK     {}", g("last_check_result"));
    }
    if s.get("last_error").is_some_and(|v| !v.is_null()) {
        println!(
            "LAST ERROR     {} (code {})",
            g("last_error"),
            g("last_error_code")
        );
    }
    if let Some(r) = s.get("reboot").filter(|r| r.is_object()) {
        print_reboot(r);
    }
}

/// The reboot manager's lines: strategy, windows, what it waits for.
fn print_reboot(r: &Value) {
    let g = |k: &str| match r.get(k) {
        Some(Value::String(v)) => v.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(v) => v.to_string(),
    };
    println!("REBOOT         {} (strategy {}, group {})", g("phase"), g("strategy"), g("group"));
    let windows = r.get("windows").and_then(|w| w.as_array()).map(|w| {
        w.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join("; ")
    });
    match windows.filter(|w| !w.is_empty()) {
        None => println!("WINDOWS        any time"),
        Some(w) => {
            let open = r.get("window_open").and_then(|v| v.as_bool()).unwrap_or(false);
            let next = r
                .get("next_window")
                .and_then(|v| v.as_i64())
                .map(keel_updater::reboot::window::format_utc)
                .unwrap_or_else(|| "-".into());
            println!("WINDOWS        {w} ({})", if open { "open now".to_string() } else { format!("next opens {next}") });
        }
    }
    if r.get("holding_lock").and_then(|v| v.as_bool()) == Some(true) {
        println!("LOCK           held by this machine");
    }
    if !g("detail").is_empty() && g("detail") != "-" {
        println!("REBOOT DETAIL  {}", g("detail"));
    }
}

/// Run; on failure one line on stderr (`updatectl: what failed: why`) and exit status 1.
fn main() -> std::process::ExitCode {
    keel_model::report::exit("updatectl", run())
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let base = cli.endpoint.trim_end_matches('/');
    match cli.cmd {
        Cmd::Status => {
            let s = call("GET", &format!("{base}/v1/status"), None)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&s)?)
            } else {
                print_status(&s)
            }
        }
        Cmd::Check => {
            let r = call("POST", &format!("{base}/v1/check"), None)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                match r.get("update").filter(|u| !u.is_null()) {
                    Some(u) => println!(
                        "update available: {} ({} bytes); run `updatectl apply`",
                        u.get("version").and_then(|v| v.as_str()).unwrap_or("?"),
                        u.get("size").and_then(|v| v.as_u64()).unwrap_or(0)
                    ),
                    None => println!("no update available"),
                }
            }
        }
        Cmd::Apply { no_wait } => {
            let mut s = call("POST", &format!("{base}/v1/apply"), None)?;
            let tty = std::io::stderr().is_terminal();
            if !no_wait {
                std::thread::sleep(Duration::from_millis(200));
                loop {
                    s = call("GET", &format!("{base}/v1/status"), None)?;
                    let st = s
                        .get("state")
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_string();
                    if tty {
                        let p = s.get("progress").and_then(|p| p.as_f64()).unwrap_or(0.0);
                        eprint!("\r{st:<20} {:5.1}%", p * 100.0);
                    }
                    if matches!(st.as_str(), "IDLE" | "UPDATED_NEED_REBOOT" | "ERROR") {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
                if tty {
                    eprintln!();
                }
            }
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
            if s.get("state").and_then(|v| v.as_str()) == Some("ERROR") {
                std::process::exit(1);
            }
        }
        Cmd::Channel { name } => {
            let r = match name {
                Some(n) => call(
                    "POST",
                    &format!("{base}/v1/channel"),
                    Some(serde_json::json!({ "channel": n })),
                )?,
                None => call("GET", &format!("{base}/v1/channel"), None)?,
            };
            if cli.json {
                println!("{r}");
            } else {
                println!(
                    "{}",
                    r.get("channel").and_then(|c| c.as_str()).unwrap_or("?")
                );
            }
        }
        Cmd::Rollback => {
            let r = call("POST", &format!("{base}/v1/rollback"), None)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "next boot uses {}; reboot to switch",
                    r.get("next_boot")
                        .and_then(|v| v.as_str())
                        .unwrap_or("the other slot")
                );
            }
        }
    }
    Ok(())
}
