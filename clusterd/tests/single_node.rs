//! One real `clusterd` process: curl recipes, Debian's etcdctl (ETCDCTL_API=2), python-etcd, bad input,
//! clusterctl, restart with data, and refusing a corrupt store.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::{curl, have, missing, python_path, wait_until, Cluster, CTL};
use keel_clusterd::client::request;

#[test]
fn curl_recipes_work() {
    if missing("curl", have("curl"), "make deps") {
        return;
    }
    let c = Cluster::start(1, false);
    let ep = c.members[0].client_url.clone();
    let (s, b) = curl(&["-X", "PUT", &format!("{ep}/v2/keys/message"), "-d", "value=Hello world"]);
    assert_eq!(s, 201, "{b}");
    assert!(b.contains("\"action\":\"set\"") && b.contains("\"value\":\"Hello world\""), "{b}");
    let (s, b) = curl(&[&format!("{ep}/v2/keys/message")]);
    assert_eq!(s, 200, "{b}");
    let (s, b) = curl(&["-X", "PUT", &format!("{ep}/v2/keys/message?prevValue=nope"), "-d", "value=x"]);
    assert_eq!(s, 412, "{b}");
    assert!(b.contains("\"errorCode\":101"), "{b}");
    let (s, b) = curl(&["-X", "POST", &format!("{ep}/v2/keys/queue"), "-d", "value=Job1"]);
    assert_eq!(s, 201, "{b}");
    assert!(b.contains("\"action\":\"create\""), "{b}");
    let (s, b) = curl(&[&format!("{ep}/v2/keys/queue?recursive=true&sorted=true")]);
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("Job1"), "{b}");
    let (s, _) = curl(&["-X", "PUT", &format!("{ep}/v2/keys/tmp"), "-d", "value=e", "-d", "ttl=1"]);
    assert_eq!(s, 201);
    wait_until("ttl key to expire through the log", Duration::from_secs(10), || {
        (curl(&[&format!("{ep}/v2/keys/tmp")]).0 == 404).then_some(())
    });
    // A watch resumes at modifiedIndex+1 and sees the expire event.
    let (s, b) = curl(&["-X", "PATCH", &format!("{ep}/v2/keys/message")]);
    assert_eq!(s, 405, "{b}");
    let (s, b) = curl(&[&format!("{ep}/v2/members")]);
    assert_eq!(s, 200);
    assert!(b.contains("\"clientURLs\":[\"") && b.contains("\"name\":\"m0\""), "{b}");
    let (s, b) = curl(&[&format!("{ep}/health")]);
    assert_eq!((s, b.trim()), (200, "{\"health\":\"true\"}"));
    let (s, b) = curl(&[&format!("{ep}/version")]);
    assert_eq!(s, 200, "{b}");
    let (s, b) = curl(&[&format!("{ep}/metrics")]);
    assert_eq!(s, 200);
    for m in ["keel_raft_term", "keel_raft_commit_index", "keel_raft_applied_index", "keel_proposals_total", "keel_wal_fsync_duration_seconds_count", "keel_watchers"] {
        assert!(b.contains(m), "metric {m} missing from /metrics");
    }
}

#[test]
fn watch_long_poll_wakes_on_write_and_resumes_without_gap() {
    let c = Cluster::start(1, false);
    // waitIndex = current index + 1 makes the watch independent of when it reaches the server.
    let next = c.store_index(0) + 1;
    let w = {
        let url = c.url(0, &format!("/v2/keys/w?wait=true&waitIndex={next}"));
        std::thread::spawn(move || request("GET", &url, None, Duration::from_secs(20)))
    };
    let set = c.put(0, "/w", "1").expect("put");
    let ev = w.join().expect("join").expect("watch");
    let v = ev.json().expect("json");
    assert_eq!(v["node"]["value"], "1", "{}", ev.body);
    let idx = set.json().expect("json")["node"]["modifiedIndex"].as_u64().expect("index");
    c.put(0, "/w", "2").expect("put");
    c.put(0, "/w", "3").expect("put");
    let r = request("GET", &c.url(0, &format!("/v2/keys/w?wait=true&waitIndex={}", idx + 1)), None, Duration::from_secs(5)).expect("watch");
    assert_eq!(r.json().expect("json")["node"]["value"], "2", "resume must return the next event, no gap");
}

#[test]
fn bad_input_is_refused_and_member_stays_healthy() {
    let c = Cluster::start(1, false);
    // A body announced over the 1 MiB limit is refused before it is read.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(c.members[0].client_url.trim_start_matches("http://")).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let head = "PUT /v2/keys/big HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 2097152\r\nConnection: close\r\n\r\nvalue=";
        s.write_all(head.as_bytes()).expect("write head");
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        assert!(resp.starts_with("HTTP/1.1 413"), "oversized body: {}", &resp[..resp.len().min(300)]);
        assert!(resp.contains("\"errorCode\":210"), "{resp}");
    }
    // A chunked body that grows past the limit is cut off too (the client may see the answer or a reset).
    let big = "v".repeat(2 * 1024 * 1024);
    if let Ok(r) = request("PUT", &c.url(0, "/v2/keys/big"), Some(&format!("value={big}")), Duration::from_secs(10)) {
        assert_eq!(r.status, 413, "oversized body: {}", &r.body[..r.body.len().min(200)]);
    }
    let r = request("PUT", &c.url(0, "/v2/keys/k"), Some("value=%zz"), Duration::from_secs(5)).expect("bad form");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("\"errorCode\":210"), "{}", r.body);
    let r = request("GET", &c.url(0, "/v2/keys/k?recursive=perhaps"), None, Duration::from_secs(5)).expect("bad bool");
    assert!(r.body.contains("\"errorCode\":209"), "{}", r.body);
    let r = request("PUT", &c.url(0, "/v2/keys/k?ttl=abc"), Some("value=1"), Duration::from_secs(5)).expect("bad ttl");
    assert!(r.body.contains("\"errorCode\":202"), "{}", r.body);
    let r = request("GET", &c.url(0, "/v2/keys/a/%2e%2e/%2e%2e/x"), None, Duration::from_secs(5)).expect("bad key");
    assert_eq!(r.status, 400, "{}", r.body);
    // Garbage on the socket.
    if let Ok(mut s) = std::net::TcpStream::connect(c.members[0].client_url.trim_start_matches("http://")) {
        use std::io::Write;
        let _ = s.write_all(b"\x00\x01garbage\r\n\r\n");
    }
    let r = c.put(0, "/still", "alive").expect("put after bad input");
    assert_eq!(r.status, 201);
    let h = request("GET", &c.url(0, "/health"), None, Duration::from_secs(5)).expect("health");
    assert_eq!(h.status, 200);
}

#[test]
fn etcdctl_v2_works_unchanged() {
    if missing("etcdctl", have("etcdctl"), "make deps, or apt-get install etcd-client") {
        return;
    }
    let c = Cluster::start(1, false);
    let ep = c.members[0].client_url.clone();
    let ctl = |args: &[&str]| {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "2")
            .args(["--endpoints", &ep])
            .args(args)
            .output()
            .expect("run etcdctl");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    assert_eq!(ctl(&["set", "/foo", "bar"]), (true, "bar\n".into()));
    assert_eq!(ctl(&["get", "/foo"]), (true, "bar\n".into()));
    assert!(ctl(&["mk", "/new", "v"]).0);
    let (ok, out) = ctl(&["mk", "/new", "v"]);
    assert!(!ok && out.contains("Key already exists"), "{out}");
    assert!(ctl(&["mkdir", "/dir"]).0);
    assert!(ctl(&["set", "/dir/a", "1"]).0);
    assert_eq!(ctl(&["update", "/foo", "baz"]), (true, "baz\n".into()));
    let (ok, out) = ctl(&["ls", "--recursive", "/"]);
    assert!(ok && out.contains("/dir/a") && out.contains("/foo") && out.contains("/new"), "{out}");
    assert!(ctl(&["rm", "/foo"]).0);
    let (ok, out) = ctl(&["get", "/foo"]);
    assert!(!ok && out.contains("Key not found"), "{out}");
    assert!(ctl(&["rm", "/dir/a"]).0);
    assert!(ctl(&["rmdir", "/dir"]).0);
    let (ok, out) = ctl(&["member", "list"]);
    assert!(ok && out.contains("name=m0") && out.contains(&c.members[0].peer_url), "{out}");
    // watch: blocks until the next change.
    let ep2 = ep.clone();
    let after = c.store_index(0).to_string();
    let w = std::thread::spawn(move || {
        Command::new("etcdctl").env("ETCDCTL_API", "2").args(["--endpoints", &ep2, "watch", "--after-index", &after, "/watched"]).output()
    });
    assert!(ctl(&["set", "/watched", "hello"]).0);
    let out = w.join().expect("join").expect("etcdctl watch");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    // exec-watch runs a command on change.
    let ep3 = ep.clone();
    let marker = c.tmp.path().join("exec-watch.out");
    let m2 = marker.clone();
    let mut ew = Command::new("etcdctl")
        .env("ETCDCTL_API", "2")
        .args(["--endpoints", &ep3, "exec-watch", "--recursive", "/ew", "--", "sh", "-c"])
        .arg(format!("echo \"$ETCD_WATCH_VALUE\" > {}", m2.display()))
        .spawn()
        .expect("exec-watch");
    // exec-watch only sees changes made after it connected: keep changing the key until it fires.
    wait_until("exec-watch to run its command", Duration::from_secs(20), || {
        assert!(ctl(&["set", "/ew", "fired"]).0);
        std::thread::sleep(Duration::from_millis(200));
        std::fs::read_to_string(&marker).ok().filter(|s| s.trim() == "fired").map(|_| ())
    });
    let _ = ew.kill();
    let _ = ew.wait();
}

#[test]
fn python_etcd_works_unchanged() {
    let python = || {
        let mut cmd = Command::new("python3");
        cmd.env("PYTHONPATH", python_path());
        cmd
    };
    let ok = python().args(["-c", "import etcd"]).status().map(|s| s.success()).unwrap_or(false);
    if missing("python-etcd", ok, "make deps installs it into target/python") {
        return;
    }
    let c = Cluster::start(1, false);
    let url = c.members[0].client_url.trim_start_matches("http://").to_string();
    let (host, port) = url.split_once(':').expect("host:port");
    let script = format!(
        r#"
import etcd, sys
c = etcd.Client(host="{host}", port={port}, allow_reconnect=False)
c.write("/py/a", "1")
assert c.read("/py/a").value == "1"
r = c.write("/py/a", "2", prevValue="1")
assert r.value == "2"
try:
    c.write("/py/a", "3", prevValue="nope")
    sys.exit("CAS should have failed")
except etcd.EtcdCompareFailed:
    pass
c.write("/py/dir", None, dir=True)
c.write("/py/dir/x", "x")
c.write("/py/q", "job", append=True)
keys = sorted(ch.key for ch in c.read("/py", recursive=True).leaves)
assert "/py/a" in keys and "/py/dir/x" in keys, keys
c.write("/py/t", "v", ttl=60)
assert c.read("/py/t").ttl is not None
c.delete("/py/a")
try:
    c.read("/py/a")
    sys.exit("key should be gone")
except etcd.EtcdKeyNotFound:
    pass
idx = c.write("/py/w", "one").modifiedIndex
c.write("/py/w", "two")
ev = c.watch("/py/w", index=idx + 1, timeout=5)
assert ev.value == "two", ev.value
print("python-etcd ok")
"#
    );
    let out = python().args(["-c", &script]).output().expect("python3");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("python-etcd ok"), "python-etcd script failed:\n{text}");
}

#[test]
fn clusterctl_kv_and_member_commands() {
    let c = Cluster::start(1, false);
    let ep = c.members[0].client_url.clone();
    let ctl = |args: &[&str]| {
        let out = Command::new(CTL).args(["--endpoints", &ep]).args(args).output().expect("clusterctl");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    assert_eq!(ctl(&["kv", "set", "/a/b", "hello world"]), (true, "hello world\n".into()));
    assert_eq!(ctl(&["kv", "get", "/a/b"]), (true, "hello world\n".into()));
    let (ok, out) = ctl(&["kv", "mk", "/a/b", "again"]);
    assert!(!ok && out.contains("105"), "{out}");
    let (ok, out) = ctl(&["kv", "ls", "/", "--recursive"]);
    assert!(ok && out.contains("/a/b"), "{out}");
    let (ok, out) = ctl(&["--json", "kv", "get", "/a/b"]);
    assert!(ok && out.contains("\"action\":\"get\""), "{out}");
    let (ok, out) = ctl(&["member", "list"]);
    assert!(ok && out.contains("m0"), "{out}");
    let (ok, out) = ctl(&["status"]);
    assert!(ok && out.contains("leader: m0") && out.contains("healthy"), "{out}");
    assert!(ctl(&["kv", "rm", "/a", "--recursive"]).0);
    let (ok, _) = ctl(&["kv", "get", "/a/b"]);
    assert!(!ok);
    let help = Command::new(CTL).arg("--help").output().expect("help");
    assert!(String::from_utf8_lossy(&help.stdout).contains("EXAMPLES"));
}

#[test]
fn restart_keeps_data_and_corrupt_store_is_refused() {
    let mut c = Cluster::start(1, false);
    for i in 0..50 {
        assert_eq!(c.put(0, &format!("/r/k{i}"), &format!("v{i}")).expect("put").status, 201);
    }
    c.kill9(0);
    c.spawn(0);
    c.wait_ready();
    for i in 0..50 {
        assert_eq!(c.value(0, &format!("/r/k{i}"), false).as_deref(), Some(format!("v{i}").as_str()), "lost /r/k{i} after kill -9");
    }
    c.stop(0);
    let dir = c.members[0].dir.clone();
    let db = dir.join("clusterd.redb");
    let saved = std::fs::read(&db).expect("read db");
    let refused = |what: &str| {
        let err = c.run_refused(0);
        assert!(err.contains("clusterd.redb") && err.contains("corrupt or truncated"), "{what}: unclear message: {err}");
        assert!(!err.contains("RUST_BACKTRACE") && !err.contains("panicked"), "{what}: a crash report, not a message: {err}");
        err
    };
    // Truncated to its first page (cutting only free pages at the end would leave a valid store).
    std::fs::OpenOptions::new().write(true).open(&db).expect("open db").set_len(4096).expect("truncate");
    refused("truncated");
    // The header overwritten.
    let mut bad = saved.clone();
    bad[..64].fill(0);
    std::fs::write(&db, &bad).expect("write db");
    refused("zeroed header");
    // The log file gone, the snapshot file left: the member's vote is lost, so it must not start empty.
    std::fs::remove_file(&db).expect("remove db");
    let err = refused("log file missing");
    assert!(err.contains("vote"), "{err}");
    // Put back, it starts with its data.
    std::fs::write(&db, &saved).expect("restore db");
    c.spawn(0);
    c.wait_ready();
    assert_eq!(c.value(0, "/r/k49", false).as_deref(), Some("v49"));
    // Restarted with its data, a member does not check --initial-cluster again (like etcd): a --name the list
    // does not hold, refused for an empty data directory, still starts it.
    c.stop(0);
    let m = &c.members[0];
    let child = Command::new(common::BIN)
        .args(["--name", "renamed", "--initial-cluster", &format!("{}={}", m.name, m.peer_url)])
        .arg("--data-dir")
        .arg(&m.dir)
        .args(["--listen-client-urls", &m.client_url, "--listen-peer-urls", &format!("http://{}", m.peer_listen)])
        .args(["--initial-advertise-peer-urls", &m.peer_url, "--cluster-token", &c.token])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn clusterd");
    c.members[0].child = Some(child);
    c.wait_ready();
    assert_eq!(c.value(0, "/r/k49", false).as_deref(), Some("v49"));
}

#[test]
fn the_snapshot_lives_in_its_own_file_and_a_compacted_log_without_it_is_refused() {
    let mut c = Cluster::create(1, false);
    c.snapshot_count = 100;
    c.spawn(0);
    c.wait_ready();
    for i in 0..400 {
        assert_eq!(c.put(0, &format!("/s/k{}", i % 50), &format!("v{i}")).expect("put").status, 200 + if i < 50 { 1 } else { 0 });
    }
    let snap = c.members[0].dir.join("snapshot.redb");
    // A snapshot was taken and the log behind it compacted (the member says so on /metrics).
    wait_until("a snapshot and a compacted log", Duration::from_secs(20), || {
        let m = c.get_ok(0, "/metrics").body;
        let first: u64 = m.lines().find_map(|l| l.strip_prefix("keel_raft_log_first_index "))?.trim().parse().ok()?;
        (first > 0 && snap.exists()).then_some(())
    });
    c.kill9(0);
    c.spawn(0);
    c.wait_ready();
    for i in 350..400 {
        assert_eq!(c.value(0, &format!("/s/k{}", i % 50), false).as_deref(), Some(format!("v{i}").as_str()), "lost /s/k{} after restart", i % 50);
    }
    c.stop(0);
    // Without the snapshot the compacted log cannot rebuild the state: refuse, and name the missing file.
    let kept = c.members[0].dir.join("snapshot.redb.kept");
    std::fs::rename(&snap, &kept).expect("move snapshot.redb away");
    let err = c.run_refused(0);
    assert!(err.contains("snapshot.redb") && err.contains("compacted"), "unclear message: {err}");
    // Put back, the member starts with every value.
    std::fs::remove_file(&snap).ok();
    std::fs::rename(&kept, &snap).expect("restore snapshot.redb");
    c.spawn(0);
    c.wait_ready();
    assert_eq!(c.value(0, "/s/k49", false).as_deref(), Some("v399"));
}

/// The port allocator every multi-process suite uses (common/ports.rs).
#[test]
fn no_port_is_handed_out_twice() {
    // 2,000 ports from a ≈ 28,000-port range: plain bind-and-close repeats some (the birthday bound expects
    // dozens), this must not.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..2000 {
        let port = common::free_port("127.0.0.254");
        assert!(seen.insert(port), "port {port} handed out twice");
    }
}

#[test]
fn a_name_or_url_missing_from_initial_cluster_is_refused_with_the_fix() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        let o = Command::new(common::BIN)
            .args(["--data-dir"])
            .arg(tmp.path().join("data"))
            .args(["--listen-client-urls", "http://127.0.0.1:1", "--listen-peer-urls", "http://127.0.0.1:2"])
            .args(args)
            .output()
            .expect("run clusterd");
        assert!(!o.status.success(), "{args:?} started");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // A mistyped name whose peer URL is another member's entry used to start as that member.
    let err = run(&["--name", "a", "--initial-cluster", "b=http://127.0.0.1:2,c=http://127.0.0.1:3"]);
    assert!(err.contains("--name \"a\" is not in --initial-cluster (it names b, c)"), "{err}");
    let err = run(&["--name", "b", "--initial-cluster", "b=http://127.0.0.1:2", "--initial-advertise-peer-urls", "http://127.0.0.1:9"]);
    assert!(err.contains("--initial-cluster has b=http://127.0.0.1:2 but --initial-advertise-peer-urls is http://127.0.0.1:9"), "{err}");
    assert!(!tmp.path().join("data").exists(), "refused before touching the data directory");
}

/// One HTTP/1.1 request on a connection opened from `src`: the status line's code, or `None` if the member closed
/// the connection without answering.
fn ask_from(src: &str, dst: std::net::SocketAddr) -> (std::net::TcpStream, Option<u16>) {
    use std::io::{Read, Write};
    use std::net::{IpAddr, SocketAddr, TcpStream};
    let fd = rustix::net::socket(rustix::net::AddressFamily::INET, rustix::net::SocketType::STREAM, None).expect("socket");
    rustix::net::bind(&fd, &SocketAddr::new(src.parse::<IpAddr>().expect("ip"), 0)).expect("bind");
    rustix::net::connect(&fd, &dst).expect("connect");
    let mut s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: clusterd\r\n\r\n");
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    let code = std::str::from_utf8(&buf[..n]).ok().and_then(|h| h.strip_prefix("HTTP/1.1 ")).and_then(|h| h.get(..3)).and_then(|c| c.parse().ok());
    (s, code)
}

/// Containers cannot take the member's file descriptors: past `--max-container-connections` their connections are
/// closed unread, the host is still served, the refusals are counted, and a closed connection frees its place.
#[test]
fn containers_cannot_hold_more_than_their_connection_budget() {
    let mut c = Cluster::create(1, false);
    let container_ip = format!("{}.201", c.members[0].ip.rsplit_once('.').map_or("127.0.0", |(net, _)| net));
    c.extra_args = vec!["--container-subnet".into(), format!("{container_ip}/32"), "--max-container-connections".into(), "8".into()];
    c.spawn(0);
    c.wait_ready();
    let addr: std::net::SocketAddr = c.members[0].client_url.trim_start_matches("http://").parse().expect("client addr");
    let mut held: Vec<_> = (0..8)
        .map(|i| {
            let (s, code) = ask_from(&container_ip, addr);
            assert_eq!(code, Some(200), "container connection {i} within the budget");
            s
        })
        .collect();
    let (_s, code) = ask_from(&container_ip, addr);
    assert_eq!(code, None, "the ninth container connection is closed unanswered");
    let r = request("GET", &c.url(0, "/health"), None, Duration::from_secs(5)).expect("host health");
    assert_eq!(r.status, 200, "the host is served while containers are at their budget");
    let metrics = request("GET", &c.url(0, "/metrics"), None, Duration::from_secs(5)).expect("metrics").body;
    assert!(metrics.contains("keel_connections{kind=\"container\"} 8"), "{metrics}");
    assert!(metrics.contains("keel_connections_refused_total{kind=\"container\"} 1"), "{metrics}");
    assert!(metrics.contains("keel_connections_limit{kind=\"container\"} 8"), "{metrics}");
    // A container that closes a connection gets its place back (once the member has seen the close).
    held.pop();
    wait_until("a freed container connection place", Duration::from_secs(10), || {
        let (_s, code) = ask_from(&container_ip, addr);
        (code == Some(200)).then_some(())
    });
    drop(held);
}
