//! `clusterctl`: command-line client for Keel's cluster store (keys, members, status).

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use keel_clusterd::client::{enc, request, request_any, HttpResponse};

const LONG_ABOUT: &str = "\
Talk to Keel's cluster store (clusterd) over its etcd-v2-compatible client API.

Tables for people, --json for scripts (prints the server's JSON as is). Endpoints are tried in order until one answers; writes and linearizable reads sent to a follower are forwarded to the leader by the server.

EXAMPLES
  clusterctl kv set /config/mode production --ttl 60
  clusterctl kv get /config/mode
  clusterctl kv ls / --recursive
  clusterctl kv watch /config --recursive --forever
  clusterctl member list
  clusterctl member add d http://10.0.0.4:2380     # then start d: --initial-cluster-state existing
  clusterctl status --endpoints http://10.0.0.1:2379,http://10.0.0.2:2379";

/// Command-line client for Keel's cluster store.
#[derive(Parser, Debug)]
#[command(name = "clusterctl", version, about, long_about = LONG_ABOUT)]
struct Args {
    /// Comma-separated client URLs of cluster members.
    #[arg(long, global = true, default_value = "http://127.0.0.1:2379")]
    endpoints: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Request timeout in seconds (watches wait forever).
    #[arg(long, global = true, default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Read and write keys.
    #[command(subcommand)]
    Kv(Kv),
    /// List, add and remove members.
    #[command(subcommand)]
    Member(MemberCmd),
    /// Show leader, term, indexes and each member's health.
    Status,
}

#[derive(Subcommand, Debug)]
enum Kv {
    /// Print a key's value (a directory prints its listing).
    Get {
        /// Key, e.g. /config/mode.
        key: String,
        /// Read from the answering member without a quorum check.
        #[arg(long)]
        local: bool,
    },
    /// Set a key (creating or overwriting).
    Set {
        /// Key.
        key: String,
        /// Value.
        value: String,
        /// Time to live in seconds.
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Create a key; fails if it exists.
    Mk {
        /// Key.
        key: String,
        /// Value.
        value: String,
        /// Time to live in seconds.
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Remove a key (or a directory with --recursive).
    Rm {
        /// Key.
        key: String,
        /// Remove a directory and everything below it.
        #[arg(long)]
        recursive: bool,
    },
    /// List a directory.
    Ls {
        /// Directory (default /).
        #[arg(default_value = "/")]
        key: String,
        /// List everything below.
        #[arg(long)]
        recursive: bool,
    },
    /// Wait for the next change of a key (or below it with --recursive).
    Watch {
        /// Key.
        key: String,
        /// Watch the whole subtree.
        #[arg(long)]
        recursive: bool,
        /// Keep watching, printing every change (resumes at modifiedIndex+1: no gap, no repeat).
        #[arg(long)]
        forever: bool,
        /// Start after this store index.
        #[arg(long)]
        after_index: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum MemberCmd {
    /// List members.
    List,
    /// Add a member (learner, then voter); then start it with --initial-cluster-state existing.
    Add {
        /// Name of the new member.
        name: String,
        /// Its peer URL, e.g. http://10.0.0.4:2380.
        peer_url: String,
    },
    /// Remove a member by id (hex, as shown by `member list`).
    Remove {
        /// Member id.
        id: String,
    },
}

struct Cli {
    endpoints: Vec<String>,
    json: bool,
    timeout: Duration,
}

fn key_path(key: &str) -> String {
    let k = key.trim_start_matches('/');
    let enc_key: Vec<String> = k.split('/').map(|c| enc(c).replace('+', "%20")).collect();
    format!("/v2/keys/{}", enc_key.join("/"))
}

impl Cli {
    fn call(&self, method: &str, path: &str, form: Option<&str>) -> anyhow::Result<HttpResponse> {
        request_any(&self.endpoints, method, path, form, self.timeout).with_context(|| format!("no endpoint of {} answered", self.endpoints.join(",")))
    }

    fn check(&self, r: &HttpResponse) -> anyhow::Result<serde_json::Value> {
        let v = r.json().unwrap_or(serde_json::Value::Null);
        if r.status >= 400 {
            let msg = v.get("message").and_then(|m| m.as_str()).unwrap_or(r.body.trim());
            let cause = v.get("cause").and_then(|m| m.as_str()).unwrap_or("");
            let code = v.get("errorCode").map(|c| c.to_string()).unwrap_or_default();
            bail!("error {code} ({}): {msg} {cause}", r.status);
        }
        Ok(v)
    }

    fn print_node(&self, v: &serde_json::Value) {
        if self.json {
            println!("{v}");
        } else if let Some(val) = v["node"]["value"].as_str() {
            println!("{val}");
        } else {
            self.print_listing(&v["node"]);
        }
    }

    fn print_listing(&self, node: &serde_json::Value) {
        if let Some(nodes) = node["nodes"].as_array() {
            for n in nodes {
                let k = n["key"].as_str().unwrap_or("");
                if n["dir"].as_bool() == Some(true) {
                    println!("{k}/");
                    self.print_listing(n);
                } else {
                    println!("{k}");
                }
            }
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let cli = Cli {
        endpoints: args.endpoints.split(',').map(|s| s.trim().trim_end_matches('/').to_string()).filter(|s| !s.is_empty()).collect(),
        json: args.json,
        timeout: Duration::from_secs(args.timeout.max(1)),
    };
    match args.cmd {
        Cmd::Kv(Kv::Get { key, local }) => {
            let q = if local { "?quorum=false" } else { "" };
            let r = cli.call("GET", &format!("{}{q}", key_path(&key)), None)?;
            let v = cli.check(&r)?;
            cli.print_node(&v);
        }
        Cmd::Kv(Kv::Set { key, value, ttl }) => {
            let mut f = format!("value={}", enc(&value));
            if let Some(t) = ttl {
                f.push_str(&format!("&ttl={t}"));
            }
            let v = cli.check(&cli.call("PUT", &key_path(&key), Some(&f))?)?;
            cli.print_node(&v);
        }
        Cmd::Kv(Kv::Mk { key, value, ttl }) => {
            let mut f = format!("value={}&prevExist=false", enc(&value));
            if let Some(t) = ttl {
                f.push_str(&format!("&ttl={t}"));
            }
            let v = cli.check(&cli.call("PUT", &key_path(&key), Some(&f))?)?;
            cli.print_node(&v);
        }
        Cmd::Kv(Kv::Rm { key, recursive }) => {
            let q = if recursive { "?recursive=true" } else { "" };
            let v = cli.check(&cli.call("DELETE", &format!("{}{q}", key_path(&key)), None)?)?;
            if cli.json {
                println!("{v}");
            }
        }
        Cmd::Kv(Kv::Ls { key, recursive }) => {
            let q = if recursive { "?recursive=true&sorted=true" } else { "?sorted=true" };
            let v = cli.check(&cli.call("GET", &format!("{}{q}", key_path(&key)), None)?)?;
            if cli.json {
                println!("{v}");
            } else {
                cli.print_listing(&v["node"]);
            }
        }
        Cmd::Kv(Kv::Watch { key, recursive, forever, after_index }) => {
            let mut next = after_index.map(|i| i + 1);
            loop {
                let mut q = format!("?wait=true{}", if recursive { "&recursive=true" } else { "" });
                if let Some(n) = next {
                    q.push_str(&format!("&waitIndex={n}"));
                }
                let path = format!("{}{q}", key_path(&key));
                let mut r = None;
                for ep in &cli.endpoints {
                    if let Ok(x) = request("GET", &format!("{ep}{path}"), None, Duration::from_secs(24 * 3600)) {
                        r = Some(x);
                        break;
                    }
                }
                let r = r.with_context(|| format!("no endpoint of {} answered", cli.endpoints.join(",")))?;
                let v = cli.check(&r)?;
                if cli.json {
                    println!("{v}");
                } else {
                    println!(
                        "{} {} {}",
                        v["action"].as_str().unwrap_or(""),
                        v["node"]["key"].as_str().unwrap_or(""),
                        v["node"]["value"].as_str().unwrap_or("")
                    );
                }
                if !forever {
                    break;
                }
                next = v["node"]["modifiedIndex"].as_u64().map(|i| i + 1);
            }
        }
        Cmd::Member(MemberCmd::List) => {
            let v = cli.check(&cli.call("GET", "/v2/members", None)?)?;
            if cli.json {
                println!("{v}");
            } else {
                println!("{:<18} {:<12} {:<28} CLIENT URLS", "ID", "NAME", "PEER URL");
                for m in v["members"].as_array().cloned().unwrap_or_default() {
                    let urls: Vec<String> = m["clientURLs"].as_array().cloned().unwrap_or_default().iter().filter_map(|u| u.as_str().map(String::from)).collect();
                    println!(
                        "{:<18} {:<12} {:<28} {}",
                        m["id"].as_str().unwrap_or(""),
                        m["name"].as_str().unwrap_or(""),
                        m["peerURLs"][0].as_str().unwrap_or(""),
                        urls.join(",")
                    );
                }
            }
        }
        Cmd::Member(MemberCmd::Add { name, peer_url }) => {
            let body = serde_json::json!({"name": name, "peerURLs": [peer_url]}).to_string();
            // The members API takes JSON; send it raw.
            let r = keel_clusterd::client::request_json_any(&cli.endpoints, "POST", "/v2/members", &body, Duration::from_secs(90))?;
            let v = cli.check(&r)?;
            if cli.json {
                println!("{v}");
            } else {
                println!("added member {} ({}); start it with --initial-cluster-state existing", v["id"].as_str().unwrap_or(""), name);
            }
        }
        Cmd::Member(MemberCmd::Remove { id }) => {
            let r = cli.call("DELETE", &format!("/v2/members/{id}"), None)?;
            cli.check(&r)?;
            if !cli.json {
                println!("removed member {id}");
            }
        }
        Cmd::Status => {
            let r = cli.call("GET", "/keel/status", None)?;
            let v = cli.check(&r)?;
            let members = v["members"].as_array().cloned().unwrap_or_default();
            let mut rows = Vec::new();
            for m in &members {
                let urls: Vec<String> = m["clientURLs"].as_array().cloned().unwrap_or_default().iter().filter_map(|u| u.as_str().map(String::from)).collect();
                let health = urls
                    .first()
                    .and_then(|u| request("GET", &format!("{u}/health"), None, Duration::from_secs(2)).ok())
                    .map(|r| if r.status == 200 { "healthy" } else { "unhealthy" })
                    .unwrap_or("unreachable");
                rows.push(serde_json::json!({"id": m["id"], "name": m["name"], "leader": m["leader"], "voter": m["voter"], "clientURLs": urls, "health": health}));
            }
            if cli.json {
                let mut out = v.clone();
                out["members"] = serde_json::Value::Array(rows);
                println!("{out}");
            } else {
                let leader = members.iter().find(|m| m["leader"].as_bool() == Some(true)).and_then(|m| m["name"].as_str()).unwrap_or("(none)");
                println!("leader: {leader}  term: {}  commit: {}  applied: {}  store index: {}", v["term"], v["commitIndex"], v["appliedIndex"], v["storeIndex"]);
                println!("{:<18} {:<12} {:<8} {:<7} HEALTH", "ID", "NAME", "ROLE", "LEADER");
                for r in rows {
                    println!(
                        "{:<18} {:<12} {:<8} {:<7} {}",
                        r["id"].as_str().unwrap_or(""),
                        r["name"].as_str().unwrap_or(""),
                        if r["voter"].as_bool() == Some(true) { "voter" } else { "learner" },
                        if r["leader"].as_bool() == Some(true) { "*" } else { "" },
                        r["health"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    keel_model::report::exit("clusterctl", run(Args::parse()))
}
