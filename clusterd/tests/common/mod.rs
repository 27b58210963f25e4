//! Test harness: real `clusterd` processes on 127.0.0.x, free ports, condition waits with deadlines,
//! children killed on drop, and an optional TCP proxy in front of every peer listener (for partitions).
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_clusterd::client::{enc, request, HttpResponse};

pub const BIN: &str = env!("CARGO_BIN_EXE_clusterd");
pub const CTL: &str = env!("CARGO_BIN_EXE_clusterctl");

/// Wait until `f` returns Some, or panic with `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub mod ports;
pub use ports::{bind_unused, free_port};

/// Whether `tool` is on PATH.
/// Run curl with `args`: (HTTP status, body); status 0 when curl got no answer.
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl").args(["-sS", "-o", "-", "-w", "\n%{http_code}"]).args(args).output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

pub fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool} >/dev/null")]).status().is_ok_and(|s| s.success())
}

/// True when a client tool a test drives is missing. `make test` sets `KEEL_REQUIRE_TOOLS=1` (its `make deps`
/// installs them all), and then a missing tool fails the test instead of skipping it.
pub fn missing(tool: &str, available: bool, install_hint: &str) -> bool {
    if available {
        return false;
    }
    if std::env::var("KEEL_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
        panic!("KEEL_REQUIRE_TOOLS=1 but {tool} is missing ({install_hint})");
    }
    eprintln!("SKIP: {tool} is missing ({install_hint})");
    true
}

/// Where `make deps` installs the Python clients (`pip install --target`): Debian's own python3 refuses
/// installs into the system (PEP 668), so they live in the build tree. `KEEL_PYTHONPATH` overrides it.
pub fn python_path() -> String {
    let ours = std::env::var("KEEL_PYTHONPATH")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/python").to_string());
    match std::env::var("PYTHONPATH") {
        Ok(p) if !p.is_empty() => format!("{ours}:{p}"),
        _ => ours,
    }
}

/// Shared partition state: blocked (from member id, to member index) pairs and live connections.
#[derive(Default)]
pub struct Faults {
    blocked: Mutex<HashSet<(String, usize)>>,
    conns: Mutex<Vec<(String, usize, TcpStream)>>,
}

impl Faults {
    fn is_blocked(&self, from: &str, to: usize) -> bool {
        self.blocked.lock().map(|b| b.contains(&(from.to_string(), to))).unwrap_or(false)
    }
}

pub struct Member {
    pub name: String,
    pub ip: String,
    pub dir: PathBuf,
    pub client_url: String,
    /// URL others use (the proxy, if any).
    pub peer_url: String,
    /// Where the member listens for peers.
    pub peer_listen: String,
    pub id: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

pub struct Cluster {
    pub members: Vec<Member>,
    pub token: String,
    pub tmp: tempfile::TempDir,
    pub faults: Arc<Faults>,
    pub snapshot_count: u32,
    /// Extra clusterd flags for every member.
    pub extra_args: Vec<String>,
    pub existing: Vec<bool>,
    stop: Arc<AtomicBool>,
}

fn proxy(listener: TcpListener, to_index: usize, target: String, faults: Arc<Faults>, stop: Arc<AtomicBool>) {
    listener.set_nonblocking(true).ok();
    while !stop.load(Ordering::Relaxed) {
        let (mut inbound, _) = match listener.accept() {
            Ok(c) => c,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        inbound.set_nonblocking(false).ok();
        let faults = faults.clone();
        let target = target.clone();
        std::thread::spawn(move || {
            // Peek at the first request head to learn the sender (x-keel-from).
            inbound.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                match inbound.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            inbound.set_read_timeout(None).ok();
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let from = text
                .lines()
                .find_map(|l| l.strip_prefix("x-keel-from:").map(|v| v.trim().to_string()))
                .unwrap_or_default();
            if faults.is_blocked(&from, to_index) {
                let _ = inbound.shutdown(Shutdown::Both);
                return;
            }
            let Ok(mut outbound) = TcpStream::connect(&target) else { return };
            outbound.set_nodelay(true).ok();
            inbound.set_nodelay(true).ok();
            if outbound.write_all(&head).is_err() {
                return;
            }
            if let (Ok(a), Ok(b)) = (inbound.try_clone(), outbound.try_clone()) {
                if let Ok(mut c) = faults.conns.lock() {
                    c.push((from.clone(), to_index, a));
                    c.push((from.clone(), to_index, b));
                }
            }
            let (Ok(mut in2), Ok(mut out2)) = (inbound.try_clone(), outbound.try_clone()) else { return };
            let t = std::thread::spawn(move || {
                let _ = std::io::copy(&mut out2, &mut in2);
                let _ = in2.shutdown(Shutdown::Both);
            });
            let _ = std::io::copy(&mut inbound, &mut outbound);
            let _ = outbound.shutdown(Shutdown::Both);
            let _ = t.join();
        });
    }
}

impl Cluster {
    /// Start `n` members (each on its own 127.0.0.x), optionally with a proxy in front of each peer port.
    pub fn start(n: usize, with_proxy: bool) -> Cluster {
        let c = Cluster::create(n, with_proxy);
        let mut c = c;
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_ready();
        c
    }

    pub fn create(n: usize, with_proxy: bool) -> Cluster {
        let tmp = tempfile::tempdir().expect("tempdir");
        let token = format!("test-{}-{}", std::process::id(), free_port("127.0.0.1"));
        let faults = Arc::new(Faults::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut members = Vec::new();
        // Each cluster of this test process gets its own 127.x.y.0/24 so parallel tests never share addresses.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let net = NEXT.fetch_add(1, Ordering::Relaxed);
        let (x, y) = (20 + (std::process::id() % 200) as usize, net % 250 + 1);
        for i in 0..n {
            let ip = format!("127.{x}.{y}.{}", i + 1);
            let cp = free_port(&ip);
            let pp = free_port(&ip);
            let peer_listen = format!("{ip}:{pp}");
            let peer_url = if with_proxy {
                let l = bind_unused(&ip);
                let url = format!("http://{}", l.local_addr().expect("addr"));
                let (f, s, t) = (faults.clone(), stop.clone(), peer_listen.clone());
                std::thread::spawn(move || proxy(l, i, t, f, s));
                url
            } else {
                format!("http://{peer_listen}")
            };
            let id = format!("{:016x}", keel_clusterd::raft::member_id(&peer_url, &token));
            let name = format!("m{i}");
            members.push(Member {
                dir: tmp.path().join(&name),
                log: tmp.path().join(format!("{name}.log")),
                name,
                client_url: format!("http://{ip}:{cp}"),
                peer_url,
                peer_listen,
                id,
                ip,
                child: None,
            });
        }
        Cluster { existing: vec![false; n], members, token, tmp, faults, snapshot_count: 2000, extra_args: Vec::new(), stop }
    }

    /// Describe one more member (not started, not added).
    pub fn push_member(&mut self) -> usize {
        let i = self.members.len();
        let ip = format!("127.0.251.{}", i + 1 + (std::process::id() % 50) as usize * 4);
        let cp = free_port(&ip);
        let pp = free_port(&ip);
        let peer_listen = format!("{ip}:{pp}");
        let peer_url = format!("http://{peer_listen}");
        let name = format!("m{i}");
        self.members.push(Member {
            dir: self.tmp.path().join(&name),
            log: self.tmp.path().join(format!("{name}.log")),
            id: format!("{:016x}", keel_clusterd::raft::member_id(&peer_url, &self.token)),
            name,
            client_url: format!("http://{ip}:{cp}"),
            peer_url,
            peer_listen,
            ip,
            child: None,
        });
        self.existing.push(true);
        i
    }

    pub fn initial_cluster(&self) -> String {
        self.members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect::<Vec<_>>().join(",")
    }

    pub fn command(&self, i: usize) -> Command {
        let m = &self.members[i];
        let mut cmd = Command::new(BIN);
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &format!("http://{}", m.peer_listen)])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster()])
            .args(["--cluster-token", &self.token])
            .args(["--snapshot-count", &self.snapshot_count.to_string()])
            .args(&self.extra_args);
        if let Ok(level) = std::env::var("KEEL_TEST_LOG_LEVEL") {
            cmd.args(["--log-level", &level]);
        }
        if self.existing[i] {
            cmd.args(["--initial-cluster-state", "existing"]);
        }
        cmd
    }

    pub fn spawn(&mut self, i: usize) {
        let mut cmd = self.command(i);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.members[i].log).expect("log file");
        let log2 = log.try_clone().expect("clone log");
        cmd.stdout(Stdio::from(log)).stderr(Stdio::from(log2));
        let child = cmd.spawn().expect("spawn clusterd");
        self.members[i].child = Some(child);
    }

    /// Run member `i` in the foreground on a store it must refuse; its stderr. Fails, instead of hanging, when
    /// the member is still running after 20 s: it started on the damaged store.
    pub fn run_refused(&self, i: usize) -> String {
        let mut child = self.command(i).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("run clusterd");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait for clusterd") {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                assert!(!status.success(), "clusterd exited 0 on a damaged store: {err}");
                return err;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("clusterd started on a damaged store (still running after 20 s)");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    pub fn status(&self, i: usize) -> Option<serde_json::Value> {
        let r = request("GET", &format!("{}/keel/status", self.members[i].client_url), None, Duration::from_secs(2)).ok()?;
        r.json()
    }

    /// Index of the leader as seen by a majority of running members... (any running member that knows it).
    pub fn leader(&self) -> Option<usize> {
        for i in 0..self.members.len() {
            if !self.is_running(i) {
                continue;
            }
            if let Some(s) = self.status(i) {
                if s["isLeader"].as_bool() == Some(true) {
                    return Some(i);
                }
            }
        }
        None
    }

    pub fn wait_leader(&self, timeout: Duration) -> usize {
        wait_until("a leader", timeout, || self.leader())
    }

    pub fn wait_ready(&self) {
        wait_until("all members healthy", Duration::from_secs(30), || {
            let all = (0..self.members.len()).filter(|i| self.is_running(*i)).all(|i| {
                request("GET", &format!("{}/health", self.members[i].client_url), None, Duration::from_secs(2))
                    .map(|r| r.status == 200)
                    .unwrap_or(false)
            });
            all.then_some(())
        });
        self.wait_leader(Duration::from_secs(30));
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        format!("{}{}", self.members[i].client_url, path)
    }

    pub fn put(&self, i: usize, key: &str, value: &str) -> Result<HttpResponse, String> {
        request("PUT", &self.url(i, &format!("/v2/keys{key}")), Some(&format!("value={}", enc(value))), Duration::from_secs(10))
            .map_err(|e| e.to_string())
    }

    pub fn get(&self, i: usize, key: &str) -> Result<HttpResponse, String> {
        request("GET", &self.url(i, &format!("/v2/keys{key}")), None, Duration::from_secs(10)).map_err(|e| e.to_string())
    }

    /// GET `path` on member `i`, retrying transient failures (no leader yet, 5xx) until it answers 200.
    pub fn get_ok(&self, i: usize, path: &str) -> HttpResponse {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match request("GET", &self.url(i, path), None, Duration::from_secs(10)) {
                Ok(r) if r.status == 200 => return r,
                Ok(r) if Instant::now() > deadline => panic!("GET {path} on m{i}: {} {}", r.status, r.body),
                Err(e) if Instant::now() > deadline => panic!("GET {path} on m{i}: {e}"),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Current store index (`X-Etcd-Index`) as seen by member `i`.
    pub fn store_index(&self, i: usize) -> u64 {
        let r = self.get_ok(i, "/v2/keys/");
        r.header("x-etcd-index").and_then(|v| v.parse().ok()).expect("X-Etcd-Index header")
    }

    /// Value of `key` read on member `i` (None if missing).
    /// Transient failures (no leader yet, connection refused, 5xx) are retried for up to 20 s; only a definitive
    /// answer (200 or 404) is returned.
    pub fn value(&self, i: usize, key: &str, local: bool) -> Option<String> {
        let q = if local { "?quorum=false" } else { "" };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match request("GET", &self.url(i, &format!("/v2/keys{key}{q}")), None, Duration::from_secs(10)) {
                Ok(r) if r.status == 200 => return r.json()?["node"]["value"].as_str().map(String::from),
                Ok(r) if r.status == 404 => return None,
                Ok(r) if Instant::now() > deadline => panic!("reading {key} on m{i}: {} {}", r.status, r.body),
                Err(e) if Instant::now() > deadline => panic!("reading {key} on m{i}: {e}"),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Block traffic between the members in `a` and those in `b` (both directions).
    pub fn partition(&self, a: &[usize], b: &[usize]) {
        {
            let mut bl = self.faults.blocked.lock().expect("faults");
            for &x in a {
                for &y in b {
                    bl.insert((self.members[x].id.clone(), y));
                    bl.insert((self.members[y].id.clone(), x));
                }
            }
        }
        // Cut live connections that cross the cut.
        let mut conns = self.faults.conns.lock().expect("conns");
        conns.retain(|(from, to, s)| {
            if self.faults.is_blocked(from, *to) {
                let _ = s.shutdown(Shutdown::Both);
                false
            } else {
                true
            }
        });
    }

    pub fn heal(&self) {
        self.faults.blocked.lock().expect("faults").clear();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            if std::env::var("KEEL_TEST_KEEP").is_ok() {
                let kept = std::mem::replace(&mut self.tmp, tempfile::tempdir().expect("tempdir")).keep();
                eprintln!("kept test data in {}", kept.display());
            }
            for m in &self.members {
                eprintln!("----- log of {} -----\n{}", m.name, std::fs::read_to_string(&m.log).unwrap_or_default().lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
    }
}
