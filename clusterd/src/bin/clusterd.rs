//! `clusterd`: run one member of Keel's Raft-replicated, etcd-v2-compatible key-value store.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;

use keel_clusterd::fleet::agent::{self, AgentConfig};
use keel_clusterd::fleet::units::parse_metadata;
use keel_clusterd::server::{self, ClusterState, Config};

/// jemalloc instead of glibc's allocator: under write load glibc's malloc/free (with its chunk consolidation)
/// took ≈ 20 % of every member's CPU; jemalloc gave +12–15 % PUT throughput at 64 connections with a lower p99
/// (mimalloc was as fast but added a 2–20 ms tail to 1 % of requests). See docs/benchmarks.md.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const LONG_ABOUT: &str = "\
Run one member of Keel's cluster store: a key-value store replicated with Raft (openraft, redb storage, fsync before acknowledging) that speaks etcd's v2 keys API, so curl recipes, `etcdctl` (ETCDCTL_API=2) and python-etcd work unchanged.

Clients talk to --listen-client-urls (/v2/keys, /v2/members, /health, /version, /metrics). Members talk to each other on --listen-peer-urls; every peer request carries --cluster-token and a member with another token is refused.

Containers reach the client API too (at 10.88.0.1:2379, their KEEL_KV_URL). A client whose address is in --container-subnet may read every key and write its own, but not the host's: keys under /_keel (fleet's units, which every machine runs as root) and the reboot lock under /coreos.com/updateengine/rebootlock are refused with etcd's error 110 (401); so are member changes, fleet journals, FleetLock calls and the peer port (403).

Under an init that sets NOTIFY_SOCKET (a `Type=notify` unit, as in Keel's image), clusterd reports READY=1 once its client and peer listeners are bound, before a quorum exists, so units ordered after it find the API answering.

A new static cluster forms by itself: start every member with the same --initial-cluster. A member restarted with its data directory rejoins with its data; a damaged store makes it refuse to start. To grow a cluster, run `clusterctl member add NAME PEER-URL`, then start the new member with --initial-cluster-state existing.

EXAMPLES
  One member on loopback:
    clusterd --name a --data-dir /var/lib/keel/clusterd

  Three members on one machine:
    clusterd --name a --data-dir /tmp/a --listen-client-urls http://127.0.0.1:2379 \\
      --listen-peer-urls http://127.0.0.1:2380 --cluster-token t1 \\
      --initial-cluster a=http://127.0.0.1:2380,b=http://127.0.0.1:2382,c=http://127.0.0.1:2384
    (and the same for b and c with their own ports and data directories)

  Discovery instead of a static list (like discovery.etcd.io):
    clusterd discovery --listen-url http://10.0.0.1:8087 &
    curl 'http://10.0.0.1:8087/new?size=3'        # prints a token URL
    clusterd --name a ... --discovery http://10.0.0.1:8087/<token>   (on each of the 3 members)

  Fleet: every member also runs the fleet engine (acting only while it leads) and, when init's
  socket exists, the fleet agent, which runs the units fleet assigns to this machine
  (see fleetctl --help, docs/fleet.md):
    clusterd --name a --machine-id m1 --fleet-metadata region=eu,disk=ssd \\
      --init-socket /run/keel/init.sock

  Then:
    curl -X PUT http://127.0.0.1:2379/v2/keys/message -d value=hello
    ETCDCTL_API=2 etcdctl --endpoints http://127.0.0.1:2379 get /message";

/// Run one member of Keel's cluster store (Raft-replicated, etcd v2 keys API).
#[derive(Parser, Debug)]
#[command(name = "clusterd", version, about, long_about = LONG_ABOUT)]
struct Args {
    /// Human-readable name of this member (must match its entry in --initial-cluster).
    #[arg(long, default_value = "default")]
    name: String,
    /// Directory holding this member's store (clusterd.redb: log and vote; snapshot.redb: latest snapshot).
    #[arg(long, default_value = "/var/lib/keel/clusterd")]
    data_dir: PathBuf,
    /// Comma-separated URLs to serve the client API on. Default: http://127.0.0.1:2379, plus
    /// http://10.88.0.1:2379 (the container bridge keel0, where containers find KEEL_KV_URL), served as soon as
    /// that address exists on this machine and never advertised to other members.
    #[arg(long)]
    listen_client_urls: Option<String>,
    /// Client URLs advertised in /v2/members (default: --listen-client-urls).
    #[arg(long)]
    advertise_client_urls: Option<String>,
    /// URL to serve peer (Raft) traffic on.
    #[arg(long, default_value = "http://127.0.0.1:2380")]
    listen_peer_urls: String,
    /// This member's peer URL as other members reach it (default: its --initial-cluster entry).
    #[arg(long)]
    initial_advertise_peer_urls: Option<String>,
    /// Initial members as name=peer-url,... (default: just this member).
    #[arg(long)]
    initial_cluster: Option<String>,
    /// `new` bootstraps a cluster from --initial-cluster when the store is empty; `existing` waits to be added.
    #[arg(long, default_value = "new", value_parser = ["new", "existing"])]
    initial_cluster_state: String,
    /// Shared secret of this cluster; peers presenting another token are refused.
    #[arg(long, default_value = "keel-cluster")]
    cluster_token: String,
    /// Raft log entries between two snapshots (older entries are then compacted).
    #[arg(long, default_value_t = 10_000)]
    snapshot_count: u64,
    /// Also snapshot (and compact the log) once this many MiB of log entries were written since the last
    /// snapshot: one entry can carry a batch of hundreds of writes, so --snapshot-count alone does not bound the
    /// store file's size.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    snapshot_log_mb: u64,
    /// Milliseconds between the leader's heartbeats to the other members.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=5_000))]
    heartbeat_interval: u64,
    /// Base election timeout in milliseconds (at least 3x --heartbeat-interval). A member that hears nothing
    /// from the leader for 3-4x this value starts an election (openraft keeps the leader's lease, 2x, before
    /// the randomised 1-2x timeout), so the default 300 replaces a dead leader in about 1 s. Raise it on
    /// machines whose members can be starved of CPU for longer than that (e.g. busy emulated VMs).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(30..=60_000))]
    election_timeout: u64,
    /// Threads that serve clients and peers and run Raft; the log writer and file work have threads of their
    /// own. Default: half the CPUs this process may use (affinity and cgroup quota count), at least 1, so that
    /// a member leaves the machine to the containers beside it. Fewer threads also cost less CPU per request: a
    /// write passes through several tasks (HTTP, Raft, replication, apply) that then hand over without waking
    /// another thread (2 CPUs, 3 members, 1 thread vs 2: 5-8 % less CPU per PUT, GET req/s +5-20 %;
    /// docs/benchmarks.md).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Discovery token URL (from `clusterd discovery`'s /new?size=N): wait for the cluster's members to
    /// register there instead of using --initial-cluster.
    #[arg(long)]
    discovery: Option<String>,
    /// Source addresses of containers (Keel's bridge, see docs/containers.md): clients there may not write
    /// the host's keys (/_keel, the reboot lock), change members, read fleet journals, or use the peer port.
    /// `none` treats every client alike (etcd v2 without auth). Containers on the host network
    /// (Network=host) have the host's addresses and are not told apart.
    #[arg(long, default_value = "10.88.0.0/16", value_name = "CIDR|none", value_parser = parse_subnet)]
    container_subnet: Subnet,
    /// Client connections that containers (--container-subnet) may hold open at once, all of them together;
    /// more are closed as soon as they are accepted. Whatever this says, containers get at most half of the
    /// client connections this member can hold, so the host's clients and fleet always have room. clusterd
    /// raises its open-file limit to the hard limit at start; the peer port gets 256 connections and 256
    /// descriptors stay free for the store and Raft; clients share the rest (`keel_connections` on /metrics).
    #[arg(long, value_name = "N", default_value_t = keel_clusterd::connections::DEFAULT_CONTAINER_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_container_connections: u32,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "warn", value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: String,
    /// At most LINES per SECONDS from one place in the code (info and above), e.g. 5/10s; the rest are counted
    /// and summed up in one "held back N more" line per window. 0 prints every line. A member that cannot reach
    /// a peer would otherwise log each failed leadership check of a read, thousands of lines a second.
    #[arg(long, default_value = "5/10s", value_name = "LINES/SECONDS")]
    log_repeat_limit: keel_clusterd::logging::Limit,
    /// Run the fleet agent (default: when --init-socket exists). The fleet engine always runs and acts only
    /// while this member leads.
    #[arg(long, overrides_with = "no_fleet_agent")]
    fleet_agent: bool,
    /// Do not run the fleet agent on this machine.
    #[arg(long)]
    no_fleet_agent: bool,
    /// init's control socket, which the fleet agent drives.
    #[arg(long, default_value = "/run/keel/init.sock")]
    init_socket: PathBuf,
    /// This machine's fleet id (default: the contents of /etc/machine-id).
    #[arg(long)]
    machine_id: Option<String>,
    /// Fleet metadata as key=value,... (adds to METADATA= from --fleet-env-file).
    #[arg(long)]
    fleet_metadata: Option<String>,
    /// Directory the fleet agent writes assigned unit files to; init must load it (--units-dir).
    #[arg(long, default_value = "/run/keel/units")]
    fleet_units_dir: PathBuf,
    /// cloud-config's fleet section as an env file (METADATA=, PUBLIC_IP=); ignored when missing.
    #[arg(long, default_value = "/run/keel/config/fleet.env")]
    fleet_env_file: PathBuf,
    #[command(subcommand)]
    cmd: Option<Sub>,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Serve a discovery service: GET /new?size=N hands out token URLs members register under.
    ///
    /// Protocol (like discovery.etcd.io): `GET /new?size=N` (1-99, default 3) answers a token URL;
    /// `PUT /<token>/<name>` with form `value=<peer-url>` registers a member (201; 200 when the name was there;
    /// 409 once N are registered); `GET /<token>` answers `{"size":N,"members":[{"name","peerURL"}]}`;
    /// `DELETE /<token>/<name>` removes a stale entry. Members started with `--discovery <token-url>` register
    /// and wait until N have, then form the cluster from that list.
    ///
    /// Tokens are 128 random bits and live 7 days, in memory only (restarting the service forgets them). At most
    /// 10,000 tokens and 100,000 members are kept (503 beyond); names are at most 64 bytes, peer URLs 256.
    Discovery {
        /// URL to listen on.
        #[arg(long, default_value = "http://127.0.0.1:8087")]
        listen_url: String,
        /// Base URL printed in token URLs (default: --listen-url).
        #[arg(long)]
        advertise_url: Option<String>,
    },
}

/// Async worker threads: `--threads`, else half the CPUs available to this process, at least 1.
fn worker_threads(flag: Option<u16>) -> usize {
    match flag {
        Some(n) => usize::from(n),
        None => std::thread::available_parallelism().map_or(1, |n| n.get() / 2).max(1),
    }
}

/// `--container-subnet`: a subnet, or `none`.
#[derive(Debug, Clone, Copy)]
struct Subnet(Option<keel_clusterd::api::access::Subnet>);

fn parse_subnet(s: &str) -> Result<Subnet, String> {
    if s == "none" {
        return Ok(Subnet(None));
    }
    s.parse().map(|n| Subnet(Some(n))).map_err(|e| format!("{e}, or none"))
}

/// The client URL served by default.
const DEFAULT_CLIENT_URL: &str = "http://127.0.0.1:2379";
/// Also served by default, once the container bridge (docs/containers.md) gives this machine the address.
const BRIDGE_CLIENT_URL: &str = "http://10.88.0.1:2379";

fn config(a: &Args) -> anyhow::Result<Config> {
    let (listen, late_client_addrs) = match &a.listen_client_urls {
        Some(urls) => (urls.as_str(), Vec::new()),
        None => (DEFAULT_CLIENT_URL, vec![server::parse_url_addr(BRIDGE_CLIENT_URL)?]),
    };
    let client_urls: Vec<String> = listen.split(',').map(|s| s.trim().trim_end_matches('/').to_string()).filter(|s| !s.is_empty()).collect();
    let client_addrs = client_urls.iter().map(|u| server::parse_url_addr(u)).collect::<Result<Vec<_>, _>>()?;
    let advertise = match &a.advertise_client_urls {
        Some(s) => s.split(',').map(|s| s.trim().trim_end_matches('/').to_string()).collect(),
        None => client_urls.clone(),
    };
    let listen_peer = a.listen_peer_urls.split(',').next().unwrap_or("").trim().trim_end_matches('/').to_string();
    let peer_addr = server::parse_url_addr(&listen_peer)?;
    let initial = match (&a.discovery, &a.initial_cluster) {
        (Some(url), _) => {
            let own = a.initial_advertise_peer_urls.clone().unwrap_or_else(|| listen_peer.clone());
            let members = keel_clusterd::discovery::join(url, &a.name, own.trim_end_matches('/'), std::time::Duration::from_secs(600))?;
            members.into_iter().map(|m| (m.name, m.peer_url.trim_end_matches('/').to_string())).collect()
        }
        (None, Some(s)) => server::parse_initial_cluster(s)?,
        (None, None) => [(a.name.clone(), a.initial_advertise_peer_urls.clone().unwrap_or_else(|| listen_peer.clone()))].into_iter().collect(),
    };
    // Only a member that bootstraps reads the list; one restarted with its data ignores it (as etcd does).
    if a.discovery.is_none() && a.initial_cluster.is_some() && a.initial_cluster_state == "new" && !has_store(&a.data_dir) {
        check_own_entry(&initial, &a.name, a.initial_advertise_peer_urls.as_deref())?;
    }
    if a.election_timeout < 3 * a.heartbeat_interval {
        anyhow::bail!(
            "--election-timeout {} ms is less than 3x --heartbeat-interval {} ms: members would elect while the leader is healthy; raise --election-timeout or lower --heartbeat-interval",
            a.election_timeout,
            a.heartbeat_interval
        );
    }
    let peer_url = match &a.initial_advertise_peer_urls {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => initial.get(&a.name).cloned().unwrap_or_else(|| listen_peer.clone()),
    };
    Ok(Config {
        name: a.name.clone(),
        data_dir: a.data_dir.clone(),
        client_addrs,
        late_client_addrs,
        advertise_client_urls: advertise,
        peer_addr,
        peer_url,
        initial_cluster: initial,
        state: if a.initial_cluster_state == "existing" { ClusterState::Existing } else { ClusterState::New },
        token: a.cluster_token.clone(),
        snapshot_count: a.snapshot_count.max(100),
        snapshot_log_bytes: a.snapshot_log_mb << 20,
        heartbeat_ms: a.heartbeat_interval,
        election_timeout_ms: a.election_timeout,
        container_subnet: a.container_subnet.0,
        max_container_connections: a.max_container_connections as usize,
    })
}

/// etcd's start-up check of a new cluster's flags: this member appears in --initial-cluster under its own
/// --name, at the peer URL it advertises. Without it a mistyped --name would join as whichever member's URL
/// matched, under the wrong name.
fn check_own_entry(initial: &std::collections::BTreeMap<String, String>, name: &str, advertise: Option<&str>) -> anyhow::Result<()> {
    let Some(url) = initial.get(name) else {
        let names: Vec<&str> = initial.keys().map(String::as_str).collect();
        anyhow::bail!(
            "--name {name:?} is not in --initial-cluster (it names {}): every member of a new cluster is listed there \
             as NAME=PEER-URL under its own --name; fix --name or the list",
            names.join(", ")
        );
    };
    if let Some(adv) = advertise.map(|u| u.trim_end_matches('/')) {
        if adv != url {
            anyhow::bail!(
                "--initial-cluster has {name}={url} but --initial-advertise-peer-urls is {adv}: a member's entry must be \
                 the URL it advertises; make them the same"
            );
        }
    }
    Ok(())
}

/// Whether `dir` holds a store (either file): such a member restarts with its data instead of bootstrapping.
fn has_store(dir: &std::path::Path) -> bool {
    dir.join("clusterd.redb").exists() || dir.join("snapshot.redb").exists()
}

/// Open and verify a store in a throw-away child process: a damaged file can make the storage engine abort,
/// and this way the member reports it clearly instead of dying without a word.
fn check_store_in_child(dir: &std::path::Path) -> anyhow::Result<()> {
    if !has_store(dir) {
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the clusterd binary")?;
    let out = std::process::Command::new(exe).arg("__check-store").arg(dir).output().context("running the store check")?;
    if out.status.success() {
        return Ok(());
    }
    let detail = String::from_utf8_lossy(&out.stderr);
    let detail = detail.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("the storage engine aborted").trim().to_string();
    // The check names the damaged file itself (clusterd.redb or snapshot.redb) when it gets that far.
    if detail.starts_with("store ") {
        anyhow::bail!("{detail}");
    }
    Err(keel_clusterd::raft::storage::StorageError::Corrupt { path: dir.join("clusterd.redb"), detail }.into())
}

/// `KEY=value` lines (quotes stripped) of an env file; empty when it does not exist.
fn read_env_file(path: &std::path::Path) -> anyhow::Result<BTreeMap<String, String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').trim_matches('\'').to_string()))
        .collect())
}

fn host_of(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let hostport = rest.split('/').next()?;
    let host = hostport.rsplit_once(':').map(|(h, _)| h).unwrap_or(hostport);
    Some(host.trim_matches(['[', ']']).to_string())
}

/// The fleet agent's configuration, or `None` when it is not to run.
fn fleet_agent_config(a: &Args, cfg: &Config) -> anyhow::Result<Option<AgentConfig>> {
    let wanted = if a.no_fleet_agent { false } else { a.fleet_agent || a.init_socket.exists() };
    if !wanted {
        return Ok(None);
    }
    let env = read_env_file(&a.fleet_env_file)?;
    let mut metadata = BTreeMap::new();
    for src in [env.get("METADATA").cloned(), a.fleet_metadata.clone()].into_iter().flatten() {
        metadata.extend(parse_metadata(&src).map_err(|e| anyhow::anyhow!("fleet metadata: {e}"))?);
    }
    let machine_id = match &a.machine_id {
        Some(m) => m.clone(),
        None => match std::fs::read_to_string("/etc/machine-id") {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => {
                eprintln!("clusterd: /etc/machine-id is missing; fleet uses the member name {:?} as machine id", cfg.name);
                cfg.name.clone()
            }
        },
    };
    let local = cfg.client_addrs.first().copied().context("no client URL to reach this member on")?;
    let local = if local.ip().is_unspecified() { std::net::SocketAddr::new([127, 0, 0, 1].into(), local.port()) } else { local };
    let mut addresses: Vec<String> = env.get("PUBLIC_IP").or_else(|| env.get("PUBLIC-IP")).into_iter().cloned().collect();
    for u in &cfg.advertise_client_urls {
        if let Some(h) = host_of(u) {
            if !addresses.contains(&h) {
                addresses.push(h);
            }
        }
    }
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default();
    Ok(Some(AgentConfig {
        machine_id,
        hostname,
        addresses,
        metadata,
        capacity: agent::detect_capacity(),
        version: agent::detect_version(),
        endpoint: cfg.advertise_client_urls.first().cloned().unwrap_or_default(),
        kv_endpoints: vec![format!("http://{local}")],
        init_socket: a.init_socket.clone(),
        units_dir: a.fleet_units_dir.clone(),
    }))
}

/// Tell a supervising init that clients can connect now (sd_notify `READY=1` on `$NOTIFY_SOCKET`, for
/// `Type=notify` units under Keel's init or systemd, as etcd does). Sent once the client and peer listeners are
/// bound, not once a quorum is reached: the first member of a new cluster must not hold up its machine's boot
/// until the others come up. A failure to send is logged; the member keeps serving.
fn notify_ready() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let addr = match path.to_str().and_then(|p| p.strip_prefix('@')) {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(b"READY=1", &a));
    if let Err(e) = sent {
        tracing::warn!("cannot tell init this member is ready (NOTIFY_SOCKET={}): {e}", path.to_string_lossy());
    }
}

/// Run; on failure one line on stderr (`clusterd: what failed: why`) and exit status 1.
fn main() -> std::process::ExitCode {
    keel_model::report::exit("clusterd", run())
}

fn run() -> anyhow::Result<()> {
    let mut raw = std::env::args_os();
    if raw.nth(1).is_some_and(|a| a == "__check-store") {
        // The storage engine may panic on damaged pages: its message, on one line, is what the parent reports.
        std::panic::set_hook(Box::new(|info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the storage engine aborted".into());
            eprintln!("{}", msg.replace('\n', " "));
        }));
        let dir = std::path::PathBuf::from(raw.next().unwrap_or_default());
        match keel_clusterd::raft::storage::verify(&dir) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    let args = Args::parse();
    let level = match args.log_level.as_str() {
        "error" => tracing::Level::ERROR,
        "info" => tracing::Level::INFO,
        "debug" => tracing::Level::DEBUG,
        "trace" => tracing::Level::TRACE,
        _ => tracing::Level::WARN,
    };
    keel_clusterd::logging::init(level, args.log_repeat_limit);
    if let Some(Sub::Discovery { listen_url, advertise_url }) = &args.cmd {
        let addr = server::parse_url_addr(listen_url)?;
        let public = advertise_url.clone().unwrap_or_else(|| listen_url.clone());
        keel_clusterd::connections::raise_nofile_limit();
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
        eprintln!("clusterd discovery: serving on {listen_url}; GET {public}/new?size=N for a token");
        return rt.block_on(keel_clusterd::discovery::serve(addr, public)).with_context(|| format!("discovery service on {listen_url}"));
    }
    let cfg = config(&args)?;
    let agent_cfg = fleet_agent_config(&args, &cfg)?;
    // Watches hold a connection each: the kernel's default soft limit (1024) would cap them early.
    keel_clusterd::connections::raise_nofile_limit();
    check_store_in_child(&cfg.data_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads(args.threads))
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let running = server::start(cfg.clone())
            .await
            .with_context(|| format!("clusterd member {:?} failed to start", cfg.name))?;
        eprintln!(
            "clusterd: member {} ({:016x}) serving clients on {} and peers on {}",
            cfg.name,
            running.ctx.id,
            cfg.advertise_client_urls.join(","),
            cfg.peer_url
        );
        tokio::spawn(keel_clusterd::fleet::engine::run(running.ctx.clone()));
        if let Some(agent_cfg) = agent_cfg {
            eprintln!(
                "clusterd: fleet agent for machine {} (init at {}, units in {})",
                agent_cfg.machine_id,
                agent_cfg.init_socket.display(),
                agent_cfg.units_dir.display()
            );
            agent::start(agent_cfg).context("starting the fleet agent")?;
        }
        notify_ready();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("installing SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("clusterd: shutting down");
        running.shutdown().await.context("stopping raft")?;
        Ok(())
    })
}
