//! `updateserver`: the small-deployment peer of Nebraska. `serve` runs it; the other verbs are admin
//! API clients.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use keel_updater::server::{http, Config};
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "updateserver",
    version,
    about = "Serve Keel updates over Omaha: channels, rollout groups, machines",
    long_about = "Serve Keel updates over Omaha v3 (the dialect CoreOS/Flatcar and Nebraska speak).\n\n\
Channels hold versions; each version is one signed payload. Machines ask with their track (= group);\n\
a group follows a channel with a rollout policy: paused, max updates per period, and a halt as soon\n\
as a machine reports an error or a rollback. Payloads are served with HTTP Range so downloads resume.\n\n\
Examples:\n  \
updateserver serve --listen 0.0.0.0:8080 --data /srv/keel-updates --keys /etc/keel/update-keys\n  \
updateserver publish --channel stable out/keel-1.2.0.payload\n  \
updateserver group set stable --max-updates 10 --period 1h\n  \
updateserver pause stable        # stop handing out updates\n  \
updateserver resume stable       # continue (also clears a halt)\n  \
updateserver machines            # every machine's version and state\n\n\
Admin verbs talk to --server (env KEEL_UPDATESERVER) with an optional --token."
)]
struct Cli {
    /// Server base URL for admin verbs
    #[arg(
        long,
        env = "KEEL_UPDATESERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    server: String,
    /// Admin bearer token (if the server was started with --admin-token)
    #[arg(long, env = "KEEL_UPDATESERVER_TOKEN", global = true)]
    token: Option<String>,
    /// JSON output
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server
    Serve {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Data directory (state.json, payloads/)
        #[arg(long, default_value = "/var/lib/keel-updateserver")]
        data: PathBuf,
        /// Trusted keys directory; publish refuses payloads that do not verify against it
        #[arg(long)]
        keys: Option<PathBuf>,
        /// Public base URL of payloads (default: http://<Host header>/payloads/)
        #[arg(long)]
        base_url: Option<String>,
        /// Require this bearer token on /api/
        #[arg(long, env = "KEEL_UPDATESERVER_TOKEN")]
        admin_token: Option<String>,
    },
    /// Upload a payload and publish it on a channel
    #[command(
        long_about = "Upload a payload and publish it on a channel. The server verifies its signature \
(with --keys) and that it was built for that channel.\n\nExample:\n  updateserver publish --channel stable keel-1.2.0.payload"
    )]
    Publish {
        #[arg(long)]
        channel: String,
        payload: PathBuf,
    },
    /// List channels and their versions
    Channels,
    /// List groups and their rollout policy
    Groups,
    /// Change a group's policy (creates the group if missing)
    #[command(
        long_about = "Change a group's policy; creates it if missing.\n\nExamples:\n  \
updateserver group set canary --channel beta\n  updateserver group set stable --max-updates 10 --period 1h"
    )]
    Group {
        #[command(subcommand)]
        cmd: GroupCmd,
    },
    /// Stop handing out updates to a group
    Pause { group: String },
    /// Continue a paused or halted group
    Resume { group: String },
    /// Every machine's version, state and last error
    Machines,
}

#[derive(Subcommand)]
enum GroupCmd {
    Set {
        group: String,
        #[arg(long)]
        channel: Option<String>,
        /// Updates granted per period (0 = unlimited)
        #[arg(long)]
        max_updates: Option<u32>,
        /// Length of the period the limit counts over: `1h`, `30m`, `1d`, `1h30m`, or plain seconds (`3600`)
        #[arg(long, value_parser = keel_updater::reboot::window::parse_period)]
        period: Option<u64>,
        /// Halt the group when a machine reports an error or rollback
        #[arg(long)]
        halt_on_error: Option<bool>,
        /// Offer the channel's version even to machines running a newer one (fleet rollback)
        #[arg(long)]
        allow_downgrade: Option<bool>,
    },
}

struct Client {
    base: String,
    token: Option<String>,
}

impl Client {
    fn req(&self, method: &str, path: &str) -> ureq::Request {
        let r = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .build()
            .request(
                method,
                &format!("{}{path}", self.base.trim_end_matches('/')),
            );
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }
    fn done(&self, r: std::result::Result<ureq::Response, ureq::Error>) -> Result<Value> {
        keel_updater::json_reply(r, "server: ", || {
            format!("cannot reach {}; is updateserver running? (--server)", self.base)
        })
    }
}

/// Run; on failure one line on stderr (`updateserver: what failed: why`) and exit status 1.
fn main() -> std::process::ExitCode {
    keel_model::report::exit("updateserver", run())
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let c = Client {
        base: cli.server.clone(),
        token: cli.token.clone(),
    };
    let out = |v: &Value| -> Result<()> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(())
    };
    match cli.cmd {
        Cmd::Serve {
            listen,
            data,
            keys,
            base_url,
            admin_token,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let server = http::open(Config {
                    data: data.clone(),
                    base_url,
                    keys,
                    admin_token,
                })?;
                let l = tokio::net::TcpListener::bind(&listen)
                    .await
                    .with_context(|| format!("binding {listen}"))?;
                eprintln!(
                    "updateserver: serving {} on http://{}",
                    data.display(),
                    l.local_addr()?
                );
                axum::serve(l, http::router(server))
                    .await
                    .context("serving")?;
                anyhow::Ok(())
            })?;
        }
        Cmd::Publish { channel, payload } => {
            let name = payload
                .file_name()
                .and_then(|n| n.to_str())
                .context("payload path has no file name")?
                .to_string();
            let f = std::fs::File::open(&payload)
                .with_context(|| format!("opening {}", payload.display()))?;
            let len = f.metadata()?.len();
            let r = c
                .req(
                    "PUT",
                    &format!("/api/channels/{channel}/payloads?name={name}"),
                )
                .set("Content-Length", &len.to_string())
                .send(f);
            let v = c.done(r)?;
            if cli.json {
                out(&v)?;
            } else {
                println!(
                    "published {} on {channel}: version {} sha256 {}",
                    name,
                    v.get("version").and_then(|x| x.as_str()).unwrap_or("?"),
                    v.get("sha256").and_then(|x| x.as_str()).unwrap_or("?")
                );
            }
        }
        Cmd::Channels => {
            let v = c.done(c.req("GET", "/api/channels").call())?;
            if cli.json {
                return out(&v);
            }
            println!(
                "{:<12} {:<12} {:<32} {:>12}",
                "CHANNEL", "VERSION", "FILE", "SIZE"
            );
            for (ch, rels) in v.as_object().into_iter().flatten() {
                for r in rels.as_array().into_iter().flatten() {
                    println!(
                        "{:<12} {:<12} {:<32} {:>12}",
                        ch,
                        r["version"].as_str().unwrap_or(""),
                        r["file"].as_str().unwrap_or(""),
                        r["size"].as_u64().unwrap_or(0)
                    );
                }
            }
        }
        Cmd::Groups => {
            let v = c.done(c.req("GET", "/api/groups").call())?;
            if cli.json {
                return out(&v);
            }
            println!(
                "{:<12} {:<12} {:<8} {:<14} HALTED",
                "GROUP", "CHANNEL", "PAUSED", "MAX/PERIOD"
            );
            for (g, p) in v.as_object().into_iter().flatten() {
                println!(
                    "{:<12} {:<12} {:<8} {:<14} {}",
                    g,
                    p["channel"].as_str().unwrap_or(""),
                    p["paused"].as_bool().unwrap_or(false),
                    format!(
                        "{}/{}s",
                        p["max_updates_per_period"].as_u64().unwrap_or(0),
                        p["period_secs"].as_u64().unwrap_or(0)
                    ),
                    p["halted"].as_str().unwrap_or("-")
                );
            }
        }
        Cmd::Group {
            cmd:
                GroupCmd::Set {
                    group,
                    channel,
                    max_updates,
                    period,
                    halt_on_error,
                    allow_downgrade,
                },
        } => {
            let body = serde_json::json!({
                "channel": channel, "max_updates_per_period": max_updates, "period_secs": period, "halt_on_error": halt_on_error,
                "allow_downgrade": allow_downgrade
            });
            let v = c.done(
                c.req("PUT", &format!("/api/groups/{group}"))
                    .send_json(body),
            )?;
            out(&v)?;
        }
        Cmd::Pause { group } => {
            let v = c.done(c.req("POST", &format!("/api/groups/{group}/pause")).call())?;
            if cli.json {
                out(&v)?
            } else {
                println!("group {group} paused")
            }
        }
        Cmd::Resume { group } => {
            let v = c.done(c.req("POST", &format!("/api/groups/{group}/resume")).call())?;
            if cli.json {
                out(&v)?
            } else {
                println!("group {group} resumed")
            }
        }
        Cmd::Machines => {
            let v = c.done(c.req("GET", "/api/machines").call())?;
            if cli.json {
                return out(&v);
            }
            println!(
                "{:<34} {:<10} {:<10} {:<12} {:<8} LAST ERROR",
                "MACHINE", "GROUP", "VERSION", "STATE", "TARGET"
            );
            for (id, m) in v.as_object().into_iter().flatten() {
                println!(
                    "{:<34} {:<10} {:<10} {:<12} {:<8} {}",
                    id,
                    m["group"].as_str().unwrap_or(""),
                    m["version"].as_str().unwrap_or(""),
                    m["state"].as_str().unwrap_or(""),
                    m["target_version"].as_str().unwrap_or("-"),
                    m["last_error"]
                        .as_u64()
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into())
                );
            }
        }
    }
    Ok(())
}
