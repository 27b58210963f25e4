//! The cluster reboot lock with real processes: a 3-member clusterd cluster (the release binary) on 127.x.y.z,
//! `locksmithctl`, FleetLock over curl, and `update-engine`'s reboot manager in etcd-lock mode with a test
//! reboot command, across a simulated reboot (a new engine process with a new boot id on the other slot).
//!
//! clusterd comes from the release directory next to this test binary: `cargo build --release -p
//! keel-clusterd` first (`make test` builds every binary before testing).

use crate::common;
use crate::ports;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use keel_model::lock::Semaphore;
use keel_updater::reboot::kv::Kv;
use keel_updater::reboot::lock::{LockClient, LockClientError};
use ports::free_port;
use serde_json::{json, Value};

const LOCKSMITHCTL: &str = env!("CARGO_BIN_EXE_locksmithctl");
const SEMAPHORE: &str = "/coreos.com/updateengine/rebootlock/semaphore";

// ---------------------------------------------------------------------------------------------------------
// A real clusterd cluster.

fn clusterd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let release = exe.parent().and_then(Path::parent).expect("release dir");
    let bin = release.join("clusterd");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --release -p keel-clusterd` (make test does)",
        bin.display()
    );
    bin
}


struct Cluster {
    children: Vec<Child>,
    names: Vec<String>,
    client_urls: Vec<String>,
    logs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let net = NEXT.fetch_add(1, Ordering::Relaxed);
        let (x, y) = (20 + std::process::id() % 200, 200 - (net % 50));
        let dir = tempfile::tempdir().expect("tempdir");
        let token = format!("reboot-test-{}-{net}", std::process::id());
        let mut peers = Vec::new();
        let mut client_urls = Vec::new();
        for i in 0..n {
            let ip = format!("127.{x}.{y}.{}", i + 1);
            peers.push(format!("http://{ip}:{}", free_port(&ip)));
            client_urls.push(format!("http://{ip}:{}", free_port(&ip)));
        }
        let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let initial: Vec<String> = names
            .iter()
            .zip(&peers)
            .map(|(n, p)| format!("{n}={p}"))
            .collect();
        let mut children = Vec::new();
        let mut logs = Vec::new();
        for i in 0..n {
            let log = dir.path().join(format!("m{i}.log"));
            let f = std::fs::File::create(&log).expect("log");
            let child = Command::new(clusterd_bin())
                .args(["--name", &names[i]])
                .arg("--data-dir")
                .arg(dir.path().join(&names[i]))
                .args(["--listen-client-urls", &client_urls[i]])
                .args(["--advertise-client-urls", &client_urls[i]])
                .args(["--listen-peer-urls", &peers[i]])
                .args(["--initial-advertise-peer-urls", &peers[i]])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--cluster-token", &token])
                .stdout(Stdio::from(f.try_clone().expect("clone")))
                .stderr(Stdio::from(f))
                .spawn()
                .expect("spawn clusterd");
            children.push(child);
            logs.push(log);
        }
        let c = Cluster {
            children,
            names,
            client_urls,
            logs,
            _dir: dir,
        };
        let ok = wait_until(Duration::from_secs(30), || {
            c.client_urls.iter().all(|u| {
                ureq::get(&format!("{u}/health"))
                    .timeout(Duration::from_secs(2))
                    .call()
                    .is_ok()
            })
        });
        assert!(ok, "cluster never became healthy:\n{}", c.log_tails());
        c
    }

    fn endpoints(&self) -> String {
        self.client_urls.join(",")
    }

    fn kv(&self) -> Kv {
        Kv::new(&self.client_urls, Duration::from_secs(10))
    }

    fn log_tails(&self) -> String {
        self.logs
            .iter()
            .map(|l| {
                let t = std::fs::read_to_string(l).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                format!(
                    "--- {}\n{}",
                    l.display(),
                    lines[lines.len().saturating_sub(20)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn semaphore(&self, group_key: &str) -> Option<Semaphore> {
        self.kv()
            .get(group_key)
            .expect("read semaphore")
            .map(|n| Semaphore::parse(&n.value).expect("valid semaphore"))
    }

    /// Every value `key` took from store index `from` to its last write, in order, read back from the watch
    /// history.
    fn history(&self, key: &str, from: u64) -> Vec<(u64, String)> {
        // The key's own last write: a watch past it would wait for a write that never comes.
        let end = self
            .kv()
            .get(key)
            .expect("read key")
            .map(|n| n.modified_index)
            .unwrap_or(0);
        let mut out = Vec::new();
        let mut idx = from;
        while idx <= end {
            let v: Value = ureq::get(&format!(
                "{}/v2/keys{key}?wait=true&waitIndex={idx}",
                self.client_urls[0]
            ))
            .timeout(Duration::from_secs(10))
            .call()
            .expect("watch history")
            .into_json()
            .expect("json");
            let at = v["node"]["modifiedIndex"].as_u64().expect("modifiedIndex");
            if at > end {
                break;
            }
            out.push((at, v["node"]["value"].as_str().unwrap_or("").to_string()));
            idx = at + 1;
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
    }
}

fn locksmithctl(c: &Cluster, args: &[&str]) -> Output {
    Command::new(LOCKSMITHCTL)
        .args(["--endpoint", &c.endpoints()])
        .args(args)
        .output()
        .expect("run locksmithctl")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "locksmithctl failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "locksmithctl should have failed: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn holders(s: &Option<Semaphore>) -> Vec<String> {
    s.as_ref().map(|s| s.holders.clone()).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------------------
// The lock itself.

#[test]
fn concurrent_lockers_never_hold_more_than_max() {
    let c = Cluster::start(3);
    let start = ureq::get(&format!("{}/v2/keys/", c.client_urls[0]))
        .call()
        .expect("index")
        .header("x-etcd-index")
        .and_then(|v| v.parse::<u64>().ok())
        .expect("index")
        + 1;
    const LOCKERS: usize = 12;
    const ROUNDS: usize = 4;
    let inside = Arc::new(AtomicUsize::new(0));
    let worst = Arc::new(AtomicUsize::new(0));
    let conflicts = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..LOCKERS)
        .map(|i| {
            // Each locker talks to one member, so followers forward to the leader too; every fourth speaks
            // FleetLock to clusterd instead of compare-and-swap from the client side.
            let member = c.client_urls[i % 3].clone();
            let client = LockClient::new(
                Kv::new(std::slice::from_ref(&member), Duration::from_secs(10)),
                "default",
                1,
            )
            .expect("client");
            let fleetlock = i % 4 == 3;
            let (inside, worst, conflicts) = (inside.clone(), worst.clone(), conflicts.clone());
            std::thread::spawn(move || {
                let id = format!("machine-{i}");
                let mut done = 0;
                let deadline = Instant::now() + Duration::from_secs(120);
                while done < ROUNDS {
                    assert!(Instant::now() < deadline, "{id} starved");
                    let got = if fleetlock {
                        match fleetlock_post(&member, "/v1/pre-reboot", &id) {
                            200 => true,
                            409 => false,
                            code => panic!("{id}: pre-reboot answered {code}"),
                        }
                    } else {
                        match client.lock(&id) {
                            Ok(_) => true,
                            Err(LockClientError::Lock(keel_model::lock::LockError::Full {
                                ..
                            })) => false,
                            Err(e) => panic!("{id}: {e}"),
                        }
                    };
                    if !got {
                        conflicts.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    worst.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                    inside.fetch_sub(1, Ordering::SeqCst);
                    if fleetlock {
                        assert_eq!(
                            fleetlock_post(&member, "/v1/steady-state", &id),
                            200,
                            "{id}: steady-state"
                        );
                    } else {
                        client.unlock(&id).expect("unlock what we hold");
                    }
                    done += 1;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("locker thread");
    }
    let elapsed = t0.elapsed();
    assert_eq!(
        worst.load(Ordering::SeqCst),
        1,
        "two lockers were inside at once"
    );
    // Every value the key ever took, not just the ones the lockers happened to see.
    let history = c.history(SEMAPHORE, start);
    let mut acquisitions = 0;
    let mut prev: Vec<String> = Vec::new();
    for (idx, v) in &history {
        let s = Semaphore::parse(v).unwrap_or_else(|e| panic!("index {idx}: {v}: {e}"));
        assert!(
            s.holders.len() <= 1,
            "index {idx}: two holders at once: {v}"
        );
        assert_eq!(
            s.semaphore,
            s.max - s.holders.len() as i64,
            "index {idx}: bad count: {v}"
        );
        if s.holders.len() > prev.len() {
            acquisitions += 1;
        }
        prev = s.holders;
    }
    assert_eq!(acquisitions, LOCKERS * ROUNDS, "history: {history:?}");
    assert!(holders(&c.semaphore(SEMAPHORE)).is_empty());
    eprintln!(
        "{} lock/unlock cycles by {LOCKERS} lockers (3 of them FleetLock) through 3 members in {:.2}s ({:.1} ms per cycle), {} refusals while full, {} values checked",
        LOCKERS * ROUNDS,
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / (LOCKERS * ROUNDS) as f64,
        conflicts.load(Ordering::Relaxed),
        history.len()
    );
}

#[test]
fn locksmithctl_lock_is_reentrant_unlock_frees_and_groups_have_their_own_max() {
    let c = Cluster::start(3);
    // The first lock creates the semaphore; locking again is fine; a second machine is refused.
    assert!(ok(&locksmithctl(&c, &["lock", "alpha"])).contains("locked for alpha"));
    assert!(ok(&locksmithctl(&c, &["lock", "alpha"])).contains("already so"));
    let err = fails(&locksmithctl(&c, &["lock", "beta"]));
    assert!(err.contains("full") && err.contains("alpha"), "{err}");
    assert_eq!(holders(&c.semaphore(SEMAPHORE)), ["alpha"]);
    assert_eq!(
        c.semaphore(SEMAPHORE).map(|s| s.to_json()),
        Some(r#"{"semaphore":0,"max":1,"holders":["alpha"]}"#.to_string())
    );

    // status: alpha is neither a fleet machine nor a clusterd member: it left the cluster.
    let st: Value =
        serde_json::from_str(&ok(&locksmithctl(&c, &["status", "--json"]))).expect("json");
    let h = &st["groups"][0]["holders"][0];
    assert_eq!(
        (
            h["id"].as_str(),
            h["fleet_machine"].as_bool(),
            h["cluster_member"].as_bool()
        ),
        (Some("alpha"), Some(false), Some(false)),
        "{st}"
    );
    let text = ok(&locksmithctl(&c, &["status"]));
    assert!(
        text.contains("LEFT THE CLUSTER") && text.contains("locksmithctl unlock alpha"),
        "{text}"
    );
    // Once it has a fleet machine record it is present again.
    c.kv()
        .set(
            "/_keel/fleet/machines/alpha",
            r#"{"id":"alpha","hostname":"alpha"}"#,
        )
        .expect("machine record");
    let text = ok(&locksmithctl(&c, &["status"]));
    assert!(
        text.contains("fleet machine") && !text.contains("LEFT THE CLUSTER"),
        "{text}"
    );

    // unlock frees the slot; unlocking again says nobody holds it.
    ok(&locksmithctl(&c, &["unlock", "alpha"]));
    assert!(fails(&locksmithctl(&c, &["unlock", "alpha"])).contains("does not hold"));
    // A clusterd member's name is recognised as present.
    ok(&locksmithctl(&c, &["lock", &c.names[1]]));
    let st: Value =
        serde_json::from_str(&ok(&locksmithctl(&c, &["status", "--json"]))).expect("json");
    assert_eq!(
        st["groups"][0]["holders"][0]["cluster_member"], true,
        "{st}"
    );
    ok(&locksmithctl(&c, &["unlock", &c.names[1]]));

    // Groups: their own semaphore and max.
    ok(&locksmithctl(&c, &["set-max", "2", "--group", "canary"]));
    ok(&locksmithctl(&c, &["lock", "x", "--group", "canary"]));
    ok(&locksmithctl(&c, &["lock", "y", "--group", "canary"]));
    fails(&locksmithctl(&c, &["lock", "z", "--group", "canary"]));
    ok(&locksmithctl(&c, &["lock", "z"])); // the default group is separate
    let canary = "/coreos.com/updateengine/rebootlock/groups/canary/semaphore";
    assert_eq!(holders(&c.semaphore(canary)), ["x", "y"]);
    // Lowering max below the holders keeps them and gives no slot until enough unlock.
    ok(&locksmithctl(&c, &["set-max", "1", "--group", "canary"]));
    let s = c.semaphore(canary).expect("canary");
    assert_eq!(
        (s.max, s.semaphore, s.holders.clone()),
        (1, -1, vec!["x".to_string(), "y".to_string()])
    );
    ok(&locksmithctl(&c, &["unlock", "x", "--group", "canary"]));
    fails(&locksmithctl(&c, &["lock", "w", "--group", "canary"]));
    ok(&locksmithctl(&c, &["unlock", "y", "--group", "canary"]));
    ok(&locksmithctl(&c, &["lock", "w", "--group", "canary"]));
    let st: Value =
        serde_json::from_str(&ok(&locksmithctl(&c, &["status", "--json"]))).expect("json");
    let groups: Vec<&str> = st["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["group"].as_str())
        .collect();
    assert_eq!(groups, ["default", "canary"]);
    assert!(fails(&locksmithctl(&c, &["set-max", "-1"]))
        .to_lowercase()
        .contains("max"));
    assert!(fails(&locksmithctl(&c, &["lock", "a", "--group", "../x"])).contains("group"));
}

fn curl(url: &str, header: bool, body: &str) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
    ]);
    if header {
        cmd.args(["-H", "fleet-lock-protocol: true"]);
    }
    let out = cmd
        .args(["--data-binary", body, url])
        .output()
        .expect("curl (Debian package curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// One FleetLock request with ureq (the concurrent test); returns the HTTP status.
fn fleetlock_post(member: &str, path: &str, id: &str) -> u16 {
    let r = ureq::post(&format!("{member}{path}"))
        .set("fleet-lock-protocol", "true")
        .send_string(&fleetlock_body(id, "default"));
    match r {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{path} for {id}: {e}"),
    }
}

/// A FleetLock request (protocol header set) for machine `id` in `group`, with curl.
fn fleetlock(url: &str, id: &str, group: &str) -> (u16, Value) {
    curl(url, true, &fleetlock_body(id, group))
}

fn fleetlock_body(id: &str, group: &str) -> String {
    json!({"client_params": {"id": id, "group": group}}).to_string()
}

#[test]
fn fleetlock_over_curl_shares_the_semaphore_with_locksmithctl() {
    let c = Cluster::start(3);
    let url = |i: usize, p: &str| format!("{}{p}", c.client_urls[i]);
    // The protocol header is required; a bad body is explained.
    let (code, v) = curl(
        &url(0, "/v1/pre-reboot"),
        false,
        &fleetlock_body("node-a", "default"),
    );
    assert_eq!(
        (code, v["kind"].as_str()),
        (400, Some("failed_header_validation")),
        "{v}"
    );
    let (code, v) = curl(&url(0, "/v1/pre-reboot"), true, "{\"id\":\"node-a\"}");
    assert_eq!(
        (code, v["kind"].as_str()),
        (400, Some("failed_body_validation")),
        "{v}"
    );

    // Every member answers (followers forward to the leader).
    for i in 0..3 {
        let (code, v) = fleetlock(&url(i, "/v1/pre-reboot"), "node-a", "default");
        assert_eq!(code, 200, "member {i}: {v}");
    }
    assert_eq!(holders(&c.semaphore(SEMAPHORE)), ["node-a"]);
    let err = fails(&locksmithctl(&c, &["lock", "machine-b"]));
    assert!(err.contains("node-a"), "{err}");
    let (code, v) = fleetlock(&url(1, "/v1/pre-reboot"), "node-b", "default");
    assert_eq!(
        (code, v["kind"].as_str()),
        (409, Some("failed_lock_semaphore_full")),
        "{v}"
    );
    assert!(v["value"].as_str().unwrap_or("").contains("node-a"), "{v}");

    // steady-state releases; releasing again is fine; then locksmithctl gets the slot and FleetLock sees it.
    for _ in 0..2 {
        let (code, v) = fleetlock(&url(2, "/v1/steady-state"), "node-a", "default");
        assert_eq!(code, 200, "{v}");
    }
    ok(&locksmithctl(&c, &["lock", "machine-b"]));
    let (code, _) = fleetlock(&url(0, "/v1/pre-reboot"), "node-a", "default");
    assert_eq!(code, 409);
    // locksmithctl can free a FleetLock holder too, and groups are shared.
    ok(&locksmithctl(&c, &["set-max", "1", "--group", "workers"]));
    let (code, v) = fleetlock(&url(1, "/v1/pre-reboot"), "node-w", "workers");
    assert_eq!(code, 200, "{v}");
    let st: Value = serde_json::from_str(&ok(&locksmithctl(
        &c,
        &["status", "--group", "workers", "--json"],
    )))
    .expect("json");
    assert_eq!(st["groups"][0]["holders"][0]["id"], "node-w", "{st}");
    ok(&locksmithctl(
        &c,
        &["unlock", "node-w", "--group", "workers"],
    ));
    let (code, v) = fleetlock(&url(1, "/v1/pre-reboot"), "node-v", "workers");
    assert_eq!(code, 200, "{v}");
}

// ---------------------------------------------------------------------------------------------------------
// The reboot manager inside update-engine.


/// An update server with 1.1.0 published, a file-backed disk and ESP, and the cluster.
struct Machine {
    dir: tempfile::TempDir,
    disk: PathBuf,
    esp: PathBuf,
    keys: PathBuf,
    server: Proc,
    cluster: Cluster,
    rebooted: PathBuf,
}

impl Machine {
    fn new() -> Machine {
        let cluster = Cluster::start(3);
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = make_disk(dir.path());
        let (esp, key, keys) = booted_esp_and_keys(dir.path());
        let data = dir.path().join("server");
        let server = spawn(
            env!("CARGO_BIN_EXE_updateserver"),
            &[
                "serve".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--data".into(),
                data.display().to_string(),
            ],
            None,
        );
        let (payload, _, _) = make_payload(dir.path(), "1.1.0", &key, 1 << 20, 61);
        let out = Command::new(env!("CARGO_BIN_EXE_updateserver"))
            .args(["--server", &server.url, "publish", "--channel", "stable"])
            .arg(&payload)
            .output()
            .expect("publish");
        assert!(
            out.status.success(),
            "publish: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rebooted = dir.path().join("rebooted");
        Machine {
            dir,
            disk,
            esp,
            keys,
            server,
            cluster,
            rebooted,
        }
    }

    fn engine(&self, boot: &str, slot: &str, version: &str, extra: &[&str]) -> Proc {
        let config = self.dir.path().join("config");
        std::fs::create_dir_all(&config).expect("config dir");
        let mut args: Vec<String> = [
            "--server",
            &format!("{}/v1/update/", self.server.url),
            "--disk",
            &self.disk.display().to_string(),
            "--esp",
            &self.esp.display().to_string(),
            "--keys",
            &self.keys.display().to_string(),
            "--state-dir",
            &self.dir.path().join("state").display().to_string(),
            "--listen",
            "127.0.0.1:0",
            "--machine-id",
            "machine-1",
            "--no-schedule",
            "--boot-id",
            boot,
            "--active-slot",
            slot,
            "--running-version",
            version,
            "--config-dir",
            &config.display().to_string(),
            "--lock-endpoint",
            &self.cluster.endpoints(),
            "--reboot-poll",
            "200ms",
            "--reboot-command",
            &format!("echo {boot} >> {}", self.rebooted.display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        spawn(
            env!("CARGO_BIN_EXE_update-engine"),
            &args,
            Some(self.dir.path().join("engine.log")),
        )
    }

    fn reboots(&self) -> Vec<String> {
        std::fs::read_to_string(&self.rebooted)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn engine_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("engine.log")).unwrap_or_default()
    }
}

fn status(e: &Proc) -> Value {
    ureq::get(&format!("{}/v1/status", e.url))
        .call()
        .expect("status")
        .into_json()
        .expect("json")
}

fn phase(e: &Proc) -> String {
    status(e)["reboot"]["phase"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn install(e: &Proc) {
    ureq::post(&format!("{}/v1/apply", e.url))
        .call()
        .expect("apply");
    let mut last = Value::Null;
    let done = wait_until(Duration::from_secs(60), || {
        last = status(e);
        matches!(
            last["state"].as_str(),
            Some("UPDATED_NEED_REBOOT" | "ERROR")
        )
    });
    assert!(
        done && last["state"] == "UPDATED_NEED_REBOOT",
        "update not installed: {last}"
    );
}

/// `HH:MM` in UTC, `ahead` seconds from now (rounded down to the minute).
fn utc_hhmm(ahead: u64) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + ahead;
    format!("{:02}:{:02}", t % 86_400 / 3600, t % 3600 / 60)
}

fn wait_phase(m: &Machine, e: &Proc, want: &str, timeout: Duration) {
    let ok = wait_until(timeout, || phase(e) == want);
    assert!(
        ok,
        "reboot manager never reached {want}: {}\n{}",
        status(e)["reboot"],
        m.engine_log()
    );
}

#[test]
fn reboot_manager_locks_only_inside_a_window_drains_and_releases_after_the_next_boots_gate() {
    let m = Machine::new();
    let kv = m.cluster.kv();
    let closed = format!("{} 1h UTC", utc_hhmm(3 * 3600));
    let open = format!("{} 2h UTC", utc_hhmm(0));

    // 1. Installed, but the only window is closed: no lock, no reboot.
    let e = m.engine(
        "boot-1",
        "a",
        "1.0.0",
        &["--reboot-strategy", "etcd-lock", "--reboot-window", &closed],
    );
    install(&e);
    wait_phase(&m, &e, "waiting-for-window", Duration::from_secs(10));
    let st = status(&e)["reboot"].clone();
    assert_eq!(
        (st["strategy"].as_str(), st["window_open"].as_bool()),
        (Some("etcd-lock"), Some(false)),
        "{st}"
    );
    assert!(st["next_window"].as_u64().is_some(), "{st}");
    let out = Command::new(env!("CARGO_BIN_EXE_updatectl"))
        .args(["--endpoint", &e.url, "status"])
        .output()
        .expect("updatectl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("etcd-lock") && text.contains("waiting-for-window"),
        "updatectl status: {text}"
    );
    assert!(
        holders(&m.cluster.semaphore(SEMAPHORE)).is_empty(),
        "took the lock outside every window"
    );
    let metrics = ureq::get(&format!("{}/metrics", e.url))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    assert!(
        metrics.contains(
            "keel_reboot_manager_phase{phase=\"waiting-for-window\",strategy=\"etcd-lock\"} 1"
        ),
        "{metrics}"
    );
    assert!(m.reboots().is_empty(), "rebooted outside every window");
    drop(e);

    // 2. Inside a window, but another machine holds the only slot: wait and say who.
    ok(&locksmithctl(&m.cluster, &["lock", "machine-0"]));
    // A unit of this machine that fleet must move before the reboot.
    kv.set("/_keel/fleet/units/web.service", &json!({"name": "web.service", "text": "[Service]\nExecStart=/bin/web\n", "desired": "launched"}).to_string()).expect("unit");
    kv.set("/_keel/fleet/schedule/web.service", "machine-1")
        .expect("schedule");
    kv.set("/_keel/fleet/states/web.service", &json!({"machine": "machine-1", "load": "loaded", "active": "active", "sub": "running", "updated": 1}).to_string()).expect("state");
    let e = m.engine(
        "boot-1",
        "a",
        "1.0.0",
        &[
            "--reboot-strategy",
            "etcd-lock",
            "--reboot-window",
            &closed,
            "--reboot-window",
            &open,
            "--drain-timeout",
            "60s",
        ],
    );
    wait_phase(&m, &e, "waiting-for-lock", Duration::from_secs(10));
    assert!(
        status(&e)["reboot"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("machine-0"),
        "{}",
        status(&e)["reboot"]
    );
    assert!(m.reboots().is_empty());

    // 3. The slot frees: take it, drain (the unit is still here), then reboot once fleet moved it.
    ok(&locksmithctl(&m.cluster, &["unlock", "machine-0"]));
    wait_phase(&m, &e, "draining", Duration::from_secs(10));
    assert_eq!(holders(&m.cluster.semaphore(SEMAPHORE)), ["machine-1"]);
    let drain = kv
        .get("/_keel/fleet/drain/machine-1")
        .expect("read drain")
        .expect("drain marker set");
    assert!(drain.value.contains("1.1.0"), "{}", drain.value);
    assert!(
        wait_until(Duration::from_secs(5), || status(&e)["reboot"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("web.service")),
        "drain does not say what it waits for: {}",
        status(&e)["reboot"]
    );
    assert!(m.reboots().is_empty(), "rebooted before the units moved");
    let moved = Instant::now();
    kv.set("/_keel/fleet/schedule/web.service", "machine-2")
        .expect("reschedule");
    kv.set("/_keel/fleet/states/web.service", &json!({"machine": "machine-2", "load": "loaded", "active": "active", "sub": "running", "updated": 2}).to_string()).expect("state");
    assert!(
        wait_until(Duration::from_secs(10), || m.reboots() == ["boot-1"]),
        "never rebooted: {}\n{}",
        status(&e)["reboot"],
        m.engine_log()
    );
    eprintln!(
        "reboot command ran {:.2}s after fleet reported the unit moved",
        moved.elapsed().as_secs_f64()
    );
    assert_eq!(phase(&e), "rebooting");
    assert_eq!(
        holders(&m.cluster.semaphore(SEMAPHORE)),
        ["machine-1"],
        "lock not held across the reboot"
    );
    drop(e);

    // 4. The next boot (B, 1.1.0), outside every window: the gate passes, the lock and the drain are released.
    let booted = Instant::now();
    let e = m.engine(
        "boot-2",
        "b",
        "1.1.0",
        &[
            "--reboot-strategy",
            "etcd-lock",
            "--reboot-window",
            &closed,
            "--health-cmd",
            "true",
            "--health-hold",
            "300ms",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(20), || holders(
            &m.cluster.semaphore(SEMAPHORE)
        )
        .is_empty()),
        "lock never released after the gate: {}\n{}",
        status(&e)["reboot"],
        m.engine_log()
    );
    eprintln!(
        "lock released {:.2}s after the new boot's engine started (gate hold 300 ms)",
        booted.elapsed().as_secs_f64()
    );
    let st = status(&e);
    assert_eq!(
        st["health"], "good",
        "released before the gate passed: {st}"
    );
    // The drain marker goes right after the unlock, then the record, then the status says so.
    assert!(
        wait_until(Duration::from_secs(10), || status(&e)["reboot"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("released")),
        "{}",
        status(&e)["reboot"]
    );
    assert!(
        kv.get("/_keel/fleet/drain/machine-1")
            .expect("read")
            .is_none(),
        "drain marker left behind"
    );
    assert!(!m.dir.path().join("state/reboot-lock.json").exists());
    assert_eq!(m.reboots(), ["boot-1"], "rebooted again");
}

#[test]
fn failed_gate_keeps_the_lock_until_the_fallback_boot() {
    let m = Machine::new();
    let open = format!("{} 2h UTC", utc_hhmm(0));
    let e = m.engine(
        "boot-1",
        "a",
        "1.0.0",
        &[
            "--reboot-strategy",
            "etcd-lock",
            "--reboot-window",
            &open,
            "--drain-timeout",
            "5s",
        ],
    );
    install(&e);
    assert!(
        wait_until(Duration::from_secs(15), || m.reboots() == ["boot-1"]),
        "{}\n{}",
        status(&e)["reboot"],
        m.engine_log()
    );
    drop(e);

    // The new slot's gate fails: the machine keeps the slot of the semaphore while it falls back.
    let e = m.engine(
        "boot-2",
        "b",
        "1.1.0",
        &[
            "--reboot-strategy",
            "etcd-lock",
            "--health-cmd",
            "false",
            "--health-hold",
            "100ms",
            "--health-timeout",
            "1s",
            "--health-failure",
            "stay",
        ],
    );
    wait_phase(&m, &e, "holding-lock", Duration::from_secs(15));
    assert!(wait_until(Duration::from_secs(10), || status(&e)["health"] == "failed"));
    assert_eq!(
        holders(&m.cluster.semaphore(SEMAPHORE)),
        ["machine-1"],
        "released while the machine is still unhealthy"
    );
    drop(e);

    // The boot loader counted B down and came back on A: that boot releases the lock.
    std::fs::rename(
        m.esp.join("EFI/Linux/keel-1.1.0-usr-b+1-0.efi"),
        m.esp.join("EFI/Linux/keel-1.1.0-usr-b+0-1.efi"),
    )
    .expect("count down");
    let e = m.engine("boot-3", "a", "1.0.0", &["--reboot-strategy", "etcd-lock"]);
    assert!(
        wait_until(Duration::from_secs(15), || holders(
            &m.cluster.semaphore(SEMAPHORE)
        )
        .is_empty()),
        "fallback boot never released the lock: {}\n{}",
        status(&e)["reboot"],
        m.engine_log()
    );
    assert_eq!(status(&e)["state"], "IDLE");
    assert_eq!(m.reboots(), ["boot-1"]);
}

#[test]
fn strategy_reboot_ignores_the_lock_and_off_never_reboots() {
    let m = Machine::new();
    ok(&locksmithctl(&m.cluster, &["lock", "someone-else"]));
    // Unusable settings do not stop the engine (it blesses slots); they show up as the reboot phase.
    let e = m.engine(
        "boot-1",
        "a",
        "1.0.0",
        &["--reboot-strategy", "best-effort"],
    );
    install(&e);
    wait_phase(&m, &e, "error", Duration::from_secs(10));
    let detail = status(&e)["reboot"]["detail"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        detail.contains("best-effort") && detail.contains("off until"),
        "{detail}"
    );
    drop(e);
    let e = m.engine("boot-1", "a", "1.0.0", &["--reboot-strategy", "off"]);
    install(&e);
    wait_phase(&m, &e, "off", Duration::from_secs(10));
    assert!(m.reboots().is_empty());
    drop(e);
    let e = m.engine("boot-1", "a", "1.0.0", &["--reboot-strategy", "reboot"]);
    assert!(
        wait_until(Duration::from_secs(15), || m.reboots() == ["boot-1"]),
        "{}",
        status(&e)["reboot"]
    );
    assert_eq!(holders(&m.cluster.semaphore(SEMAPHORE)), ["someone-else"]);
    // Settings also come from cloud-config's files when no flag is given.
    drop(e);
    std::fs::write(
        m.dir.path().join("config/update.env"),
        "REBOOT_STRATEGY=etcd-lock\n",
    )
    .expect("update.env");
    std::fs::write(
        m.dir.path().join("config/locksmith.env"),
        "GROUP=canary\nMAX=2\n",
    )
    .expect("locksmith.env");
    let e = m.engine("boot-1", "a", "1.0.0", &[]);
    assert!(
        wait_until(Duration::from_secs(15), || m.reboots().len() == 2),
        "{}",
        status(&e)["reboot"]
    );
    let canary = m
        .cluster
        .semaphore("/coreos.com/updateengine/rebootlock/groups/canary/semaphore")
        .expect("canary created");
    assert_eq!(
        (canary.max, canary.holders.clone()),
        (2, vec!["machine-1".to_string()])
    );
    // The same boot restarted after its window closed (the reboot never happened): the lock is given back.
    drop(e);
    let closed = format!("{} 1h UTC", utc_hhmm(3 * 3600));
    let e = m.engine("boot-1", "a", "1.0.0", &["--reboot-window", &closed]);
    let canary_key = "/coreos.com/updateengine/rebootlock/groups/canary/semaphore";
    assert!(
        wait_until(Duration::from_secs(10), || holders(
            &m.cluster.semaphore(canary_key)
        )
        .is_empty()),
        "lock kept outside the window: {}\n{}",
        status(&e)["reboot"],
        m.engine_log()
    );
    wait_phase(&m, &e, "waiting-for-window", Duration::from_secs(10));
    assert_eq!(m.reboots().len(), 2);
}
