//! `locksmithctl`: look at and change the cluster reboot lock (locksmith's semaphore in clusterd's KV).

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use keel_model::lock::Outcome;
use keel_updater::reboot::kv::Kv;
use keel_updater::reboot::lock::{groups, GroupStatus, LockClient};
use serde_json::json;

const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";

#[derive(Parser)]
#[command(
    name = "locksmithctl",
    version,
    about = "Show and change the cluster reboot lock that update-engine's reboot managers share",
    long_about = "Show and change the cluster reboot lock.\n\n\
Machines with reboot strategy etcd-lock take a slot of a semaphore in clusterd's KV before\n\
they reboot for an update, and give it back once their new boot passes its health gate.\n\
The value lives at /coreos.com/updateengine/rebootlock/semaphore (group default) or at\n\
.../rebootlock/groups/<group>/semaphore, as {\"semaphore\":<free>,\"max\":<max>,\"holders\":[...]},\n\
and changes only by compare-and-swap, so locksmithctl, every reboot manager and FleetLock\n\
clients (clusterd's /v1/pre-reboot) share it. Locking a lock you hold succeeds.\n\
See docs/locksmith.md.",
    after_help = "Examples:\n  \
locksmithctl status                    # holders, max, free slots; who left the cluster\n  \
locksmithctl lock                      # take a slot for this machine (/etc/machine-id)\n  \
locksmithctl unlock 4f3a9c...          # free the slot of a machine that died holding it\n  \
locksmithctl set-max 2                 # let two machines reboot at once\n  \
locksmithctl set-max 1 --group canary  # a group with its own semaphore\n  \
locksmithctl --endpoint http://10.0.0.1:2379 status --json"
)]
struct Cli {
    /// clusterd client URL(s), comma-separated; tried in turn
    #[arg(
        long,
        global = true,
        env = "LOCKSMITHCTL_ENDPOINT",
        default_value = "http://127.0.0.1:2379"
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
    /// Show each group's max, free slots and holders; flags holders that left the cluster
    #[command(
        after_help = "Examples:\n  locksmithctl status\n  locksmithctl status --group canary --json"
    )]
    Status {
        /// Only this group (default: every group found)
        #[arg(long)]
        group: Option<String>,
    },
    /// Take a slot for ID (default: this machine's /etc/machine-id); succeeds if ID already holds one
    #[command(
        after_help = "Examples:\n  locksmithctl lock\n  locksmithctl lock node-7 --group canary"
    )]
    Lock {
        id: Option<String>,
        #[arg(long, default_value = "default")]
        group: String,
    },
    /// Free ID's slot (e.g. a machine that left the cluster holding it)
    #[command(after_help = "Example:\n  locksmithctl unlock 4f3a9c0e2d7b4b0f9a1e3c5d7f9b1d3e")]
    Unlock {
        id: String,
        #[arg(long, default_value = "default")]
        group: String,
    },
    /// Set how many machines of the group may hold the lock at once; current holders are kept
    #[command(
        after_help = "Examples:\n  locksmithctl set-max 2\n  locksmithctl set-max 1 --group canary"
    )]
    SetMax {
        max: i64,
        #[arg(long, default_value = "default")]
        group: String,
    },
}

fn machine_id() -> Result<String> {
    let id = std::fs::read_to_string("/etc/machine-id").context(
        "reading /etc/machine-id; pass the id to lock explicitly (locksmithctl lock ID)",
    )?;
    Ok(id.trim().to_string())
}

fn client(kv: &Kv, group: &str) -> Result<LockClient> {
    LockClient::new(kv.clone(), group, 1).map_err(anyhow::Error::new)
}

fn print_group(g: &GroupStatus) {
    let held = g.holders.len();
    println!(
        "group {}: {held} holder(s), max {}, {} free{}",
        g.group,
        g.max,
        g.semaphore.max(0),
        if g.exists {
            ""
        } else {
            " (not created yet; the first lock creates it)"
        }
    );
    if g.holders.is_empty() {
        return;
    }
    println!("  {:<36} STATUS", "HOLDER");
    for h in &g.holders {
        let status = match (h.fleet_machine, h.cluster_member) {
            (true, true) => "fleet machine, clusterd member".to_string(),
            (true, false) => "fleet machine".to_string(),
            (false, true) => "clusterd member".to_string(),
            (false, false) => format!(
                "LEFT THE CLUSTER (no fleet machine record, not a clusterd member): free it with `locksmithctl unlock {}{}`",
                h.id,
                if g.group == "default" { String::new() } else { format!(" --group {}", g.group) }
            ),
        };
        println!("  {:<36} {status}", h.id);
    }
    if held as i64 > g.max {
        println!(
            "  note: more holders than max: no slot frees until {} of them unlock",
            held as i64 - g.max + 1
        );
    }
}

fn changed(
    cli_json: bool,
    c: &LockClient,
    s: &keel_model::lock::Semaphore,
    o: Outcome,
    what: &str,
) -> Result<()> {
    if cli_json {
        let v = json!({"group": c.group(), "key": c.key(), "changed": o == Outcome::Changed, "value": s});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let note = if o == Outcome::Unchanged {
            " (already so; nothing changed)"
        } else {
            ""
        };
        println!(
            "{what}{note}: group {} now has max {}, {} free, holders [{}]",
            c.group(),
            s.max,
            s.semaphore.max(0),
            s.holders.join(", ")
        );
    }
    Ok(())
}

/// Run; on failure one line on stderr (`locksmithctl: what failed: why`) and exit status 1.
fn main() -> std::process::ExitCode {
    keel_model::report::exit("locksmithctl", run())
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    // Left at its default, the endpoint is followed by where cloud-config told the local clusterd to listen.
    let endpoints = if cli.endpoint == DEFAULT_ENDPOINT {
        keel_updater::reboot::config::clusterd_client_urls(std::path::Path::new("/run/keel/config"))
    } else {
        vec![cli.endpoint.clone()]
    };
    let kv = Kv::new(&endpoints, Duration::from_secs(10));
    match &cli.cmd {
        Cmd::Status { group } => {
            let names = match group {
                Some(g) => vec![g.clone()],
                None => groups(&kv)?,
            };
            let mut all = Vec::new();
            for g in names {
                all.push(client(&kv, &g)?.status()?);
            }
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "groups": all }))?
                );
            } else {
                for g in &all {
                    print_group(g);
                }
            }
        }
        Cmd::Lock { id, group } => {
            let id = match id {
                Some(i) => i.clone(),
                None => machine_id()?,
            };
            let c = client(&kv, group)?;
            let (s, o) = c.lock(&id)?;
            changed(cli.json, &c, &s, o, &format!("locked for {id}"))?;
        }
        Cmd::Unlock { id, group } => {
            let c = client(&kv, group)?;
            let (s, o) = c.unlock(id)?;
            changed(cli.json, &c, &s, o, &format!("unlocked {id}"))?;
        }
        Cmd::SetMax { max, group } => {
            let c = client(&kv, group)?;
            let (s, o) = c.set_max(*max)?;
            changed(cli.json, &c, &s, o, &format!("max set to {max}"))?;
        }
    }
    Ok(())
}
