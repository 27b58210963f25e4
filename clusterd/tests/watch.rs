//! Watches against a real `clusterd`: `stream=true` sends every event as its own chunk until the client leaves,
//! a watcher whose client disconnected is dropped at once (the `/metrics` gauge falls back without any write),
//! and the default client listener serves loopback plus the container bridge address 10.88.0.1 once it exists.

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{have, missing, wait_until, Cluster, BIN};
use keel_clusterd::client::request;

/// A raw HTTP/1.1 watch: the response head, then one decoded chunk per `next_chunk`.
struct RawWatch {
    reader: BufReader<TcpStream>,
    head: String,
}

impl RawWatch {
    fn open(client_url: &str, path_and_query: &str) -> RawWatch {
        let hostport = client_url.trim_start_matches("http://");
        let mut s = TcpStream::connect(hostport).expect("connect to the client listener");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        write!(s, "GET {path_and_query} HTTP/1.1\r\nHost: {hostport}\r\nAccept: */*\r\n\r\n").expect("send request");
        let mut reader = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read the response head");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        RawWatch { reader, head }
    }

    /// The next chunk of a `Transfer-Encoding: chunked` body (None at the final empty chunk).
    fn next_chunk(&mut self) -> Option<String> {
        let mut size = String::new();
        self.reader.read_line(&mut size).expect("read a chunk size");
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or_else(|_| panic!("bad chunk size line {size:?}"));
        let mut data = vec![0u8; n + 2];
        self.reader.read_exact(&mut data).expect("read a chunk");
        assert_eq!(&data[n..], b"\r\n", "chunk not terminated by CRLF");
        data.truncate(n);
        (n > 0).then(|| String::from_utf8(data).expect("UTF-8 chunk"))
    }
}

/// `keel_watchers` from `/metrics`.
fn watchers(c: &Cluster) -> i64 {
    let r = request("GET", &c.url(0, "/metrics"), None, Duration::from_secs(5)).expect("GET /metrics");
    r.body
        .lines()
        .find_map(|l| l.strip_prefix("keel_watchers "))
        .and_then(|v| v.trim().parse().ok())
        .expect("keel_watchers in /metrics")
}

fn event(chunk: &str) -> serde_json::Value {
    assert!(chunk.ends_with('\n') && chunk.trim_end().lines().count() == 1, "one JSON line per chunk: {chunk:?}");
    serde_json::from_str(chunk.trim_end()).unwrap_or_else(|e| panic!("chunk {chunk:?} is not JSON: {e}"))
}

#[test]
fn stream_watch_sends_every_event_until_the_client_leaves() {
    let c = Cluster::start(1, false);
    let mut w = RawWatch::open(&c.members[0].client_url, "/v2/keys/s?wait=true&stream=true&recursive=true");
    assert!(w.head.starts_with("HTTP/1.1 200"), "{}", w.head);
    assert!(w.head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{}", w.head);
    wait_until("the stream to be counted as a watcher", Duration::from_secs(10), || (watchers(&c) == 1).then_some(()));

    let mut written = Vec::new();
    for i in 0..5 {
        let r = c.put(0, &format!("/s/k{}", i % 2), &format!("v{i}")).expect("PUT");
        assert!(r.status == 200 || r.status == 201, "{}", r.body);
        written.push(r.json().expect("PUT JSON")["node"]["modifiedIndex"].as_u64().expect("modifiedIndex"));
        // A write outside the watched directory is not streamed.
        c.put(0, "/elsewhere", "x").expect("PUT elsewhere");
    }
    let mut seen = Vec::new();
    for i in 0..5 {
        let ev = event(&w.next_chunk().expect("an event chunk"));
        assert_eq!(ev["action"], "set");
        assert_eq!(ev["node"]["value"], format!("v{i}"));
        seen.push(ev["node"]["modifiedIndex"].as_u64().expect("modifiedIndex"));
    }
    assert_eq!(seen, written, "every event, in order, none from outside the directory");

    // Resuming a stream at waitIndex replays the history from there, then goes on live.
    let mut resumed = RawWatch::open(&c.members[0].client_url, &format!("/v2/keys/s?wait=true&stream=true&recursive=true&waitIndex={}", written[2]));
    let replayed: Vec<u64> = (0..3).map(|_| event(&resumed.next_chunk().expect("a replayed event"))["node"]["modifiedIndex"].as_u64().unwrap_or(0)).collect();
    assert_eq!(replayed, written[2..].to_vec());
    let last = c.put(0, "/s/k9", "live").expect("PUT");
    let live = event(&resumed.next_chunk().expect("a live event"));
    assert_eq!(live["node"]["modifiedIndex"].as_u64(), last.json().and_then(|j| j["node"]["modifiedIndex"].as_u64()));
    let ev = event(&w.next_chunk().expect("the first stream goes on too"));
    assert_eq!(ev["node"]["value"], "live");

    // Both clients leave; no write follows, yet both watchers go.
    drop(w);
    drop(resumed);
    let t0 = Instant::now();
    wait_until("watchers to be dropped after the clients left", Duration::from_secs(10), || (watchers(&c) == 0).then_some(()));
    eprintln!("stream watchers dropped {:?} after their clients disconnected", t0.elapsed());
}

#[test]
fn abandoned_long_poll_watches_are_dropped_without_an_event() {
    let c = Cluster::start(1, false);
    let base = watchers(&c);
    let polls: Vec<RawWatch> = (0..3).map(|i| RawWatch::open(&c.members[0].client_url, &format!("/v2/keys/never{i}?wait=true"))).collect();
    wait_until("three long polls to be counted", Duration::from_secs(10), || (watchers(&c) == base + 3).then_some(()));
    drop(polls);
    let t0 = Instant::now();
    wait_until("the gauge to fall back with no write in between", Duration::from_secs(10), || (watchers(&c) == base).then_some(()));
    eprintln!("long-poll watchers dropped {:?} after their clients disconnected", t0.elapsed());

    // A long poll that does get its event still ends after one (no stream) and is not counted afterwards.
    let mut once = RawWatch::open(&c.members[0].client_url, "/v2/keys/once?wait=true");
    wait_until("the long poll to be counted", Duration::from_secs(10), || (watchers(&c) == base + 1).then_some(()));
    c.put(0, "/once", "1").expect("PUT");
    assert_eq!(event(&once.next_chunk().expect("the event"))["node"]["value"], "1");
    assert_eq!(once.next_chunk(), None, "a long poll ends after its event");
    wait_until("the finished long poll to leave the gauge", Duration::from_secs(10), || (watchers(&c) == base).then_some(()));
}

/// Runs `script` as root in a fresh network namespace; None when this machine cannot make one.
fn in_netns(script: &str) -> Option<String> {
    let probe = Command::new("unshare").args(["-n", "true"]).output().ok()?;
    if !probe.status.success() {
        return None;
    }
    let out = Command::new("unshare").args(["-n", "sh", "-euc", script]).output().expect("run unshare");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "netns script failed:\n{text}");
    Some(text)
}

#[test]
fn default_client_listener_serves_loopback_and_the_container_bridge() {
    if missing("ip and curl", have("ip") && have("curl"), "make deps") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().display();
    // Default flags only (the namespace is private, so 127.0.0.1:2379/2380 are free): first without the bridge
    // (clusterd must start anyway), then the bridge appears as on a container's first start, then a restart
    // with the bridge already there.
    let script = format!(
        r#"
ip link set lo up
wait_health() {{ for i in $(seq 200); do curl -sf -m 1 "$1/health" >/dev/null && return 0; sleep 0.1; done; return 1; }}
{BIN} --name a --data-dir {dir}/data >{dir}/log1 2>&1 & pid=$!
wait_health http://127.0.0.1:2379 || {{ echo "no loopback answer"; cat {dir}/log1; exit 1; }}
echo "loopback: ok"
curl -s -m 1 http://10.88.0.1:2379/health >/dev/null 2>&1 && echo "bridge before it exists: answered" || echo "bridge before it exists: unreachable"
ip link add keel0 type bridge
ip addr add 10.88.0.1/16 dev keel0
ip link set keel0 up
wait_health http://10.88.0.1:2379 && echo "bridge once created: ok" || echo "bridge once created: FAILED"
curl -s http://127.0.0.1:2379/v2/members; echo
kill $pid; wait $pid || true
{BIN} --name a --data-dir {dir}/data >{dir}/log2 2>&1 & pid=$!
wait_health http://10.88.0.1:2379 && echo "bridge at start: ok" || echo "bridge at start: FAILED"
wait_health http://127.0.0.1:2379 && echo "loopback after restart: ok" || echo "loopback after restart: FAILED"
kill $pid; wait $pid || true
"#
    );
    let Some(out) = in_netns(&script) else {
        eprintln!("SKIP: cannot create a network namespace here (needs root)");
        return;
    };
    eprintln!("{out}");
    for want in ["loopback: ok", "bridge before it exists: unreachable", "bridge once created: ok", "bridge at start: ok", "loopback after restart: ok"] {
        assert!(out.contains(want), "expected {want:?} in:\n{out}");
    }
    // The bridge address is machine-local: it is served, never advertised to other members or clients.
    assert!(out.contains("\"clientURLs\":[\"http://127.0.0.1:2379\"]"), "{out}");
}
