//! The client outside the VMs: a `keel-probe` process (tests/src/bin/keel-probe.rs) run inside the test's
//! network namespace that writes to the cluster's KV, reads each write back, polls a service on every machine,
//! every member's `/health` and the reboot lock, and prints one [`Record`] per result on stdout; plus what the
//! tests compute from those records (per-second success, longest outage).
//!
//! Owns: the record format, the tiny HTTP/1.1 client the probe uses (no proxies, `Connection: close`), starting
//! and stopping the probe process and collecting its records. Does not: start VMs (`cluster`, `vm`) or decide
//! what a test asserts.
//!
//! Record line: `<kind> <unix-ms> <target> <0|1> <latency-ms> <detail…>`; kind W (KV write, target = the member
//! that acknowledged), R (linearizable read of that write), S (service GET, target = machine), H (member
//! `/health`), L (reboot lock holders: detail is `-` when free, `absent` before anyone created the key).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::net::TestNet;

/// The locksmith semaphore key of group "default" (keel_model::lock, docs/updater.md).
pub const LOCK_KEY: &str = "/coreos.com/updateengine/rebootlock/semaphore";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Write,
    Read,
    Service,
    Health,
    Lock,
}

impl Kind {
    fn letter(self) -> char {
        match self {
            Kind::Write => 'W',
            Kind::Read => 'R',
            Kind::Service => 'S',
            Kind::Health => 'H',
            Kind::Lock => 'L',
        }
    }
    fn from_letter(s: &str) -> Option<Kind> {
        Some(match s {
            "W" => Kind::Write,
            "R" => Kind::Read,
            "S" => Kind::Service,
            "H" => Kind::Health,
            "L" => Kind::Lock,
            _ => return None,
        })
    }
}

/// One result the probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    /// Wall clock (ms since the Unix epoch) when the request finished.
    pub at_ms: u64,
    /// Index of the member/machine that answered (or was asked, on failure).
    pub target: usize,
    pub ok: bool,
    pub latency_ms: u64,
    /// W/R: the key's sequence number; S: the body's first line; L: holders (`a,b`), `-` or `absent`; on
    /// failure: the error.
    pub detail: String,
}

impl Record {
    pub fn line(&self) -> String {
        let detail = self.detail.replace(['\n', '\r'], " ");
        format!("{} {} {} {} {} {}", self.kind.letter(), self.at_ms, self.target, u8::from(self.ok), self.latency_ms, detail)
    }

    pub fn parse(line: &str) -> Option<Record> {
        let mut it = line.splitn(6, ' ');
        let kind = Kind::from_letter(it.next()?)?;
        let at_ms = it.next()?.parse().ok()?;
        let target = it.next()?.parse().ok()?;
        let ok = it.next()? == "1";
        let latency_ms = it.next()?.parse().ok()?;
        let detail = it.next().unwrap_or("").to_string();
        Some(Record { kind, at_ms, target, ok, latency_ms, detail })
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request to `url` (`http://host:port/path`): at most 1 s (and `timeout`) to connect, `timeout`
/// for each read/write.
pub fn http(method: &str, url: &str, body: Option<&str>, timeout: Duration) -> Result<Response, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hostport}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout.min(Duration::from_secs(1))).map_err(|e| format!("connect {hostport}: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    let ctype = if body.is_empty() { "" } else { "Content-Type: application/x-www-form-urlencoded\r\n" };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n{ctype}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| format!("send to {hostport}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read from {hostport}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("{hostport}: truncated answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{hostport}: bad status line {:?}", head.lines().next()))?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    Ok(Response { status, body })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// What the probe process is told to watch.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// Client URLs of the KV members (`http://10.77.0.11:2379`).
    pub kv: Vec<String>,
    /// One service URL per machine (`http://10.77.0.11:8080/`).
    pub service: Vec<String>,
    /// Directory the writes go under (`/rolling`).
    pub prefix: String,
    /// Time between two writes.
    pub interval: Duration,
    /// Time between two polls of one service URL.
    pub service_interval: Duration,
    pub lock_key: String,
}

impl ProbeConfig {
    pub fn args(&self) -> Vec<String> {
        vec![
            "--kv".into(),
            self.kv.join(","),
            "--service".into(),
            self.service.join(","),
            "--prefix".into(),
            self.prefix.clone(),
            "--interval-ms".into(),
            self.interval.as_millis().to_string(),
            "--service-interval-ms".into(),
            self.service_interval.as_millis().to_string(),
            "--lock-key".into(),
            self.lock_key.clone(),
        ]
    }
}

/// A running probe; its records accumulate in memory (and in `log`).
pub struct Probe {
    child: Child,
    records: Arc<Mutex<Vec<Record>>>,
    pub log: PathBuf,
}

impl Probe {
    /// `ip netns exec <ns> <bin> run …`; records are collected from its stdout.
    pub fn start(net: &TestNet, bin: &Path, cfg: &ProbeConfig, log: PathBuf) -> Result<Probe, String> {
        let mut child = net
            .exec(&bin.display().to_string())
            .arg("run")
            .args(cfg.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let out = child.stdout.take().ok_or("probe has no stdout")?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let sink = records.clone();
        let mut logf = std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = writeln!(logf, "{line}");
                if let Some(r) = Record::parse(&line) {
                    if let Ok(mut v) = sink.lock() {
                        v.push(r);
                    }
                }
            }
        });
        Ok(Probe { child, records, log })
    }

    /// Everything recorded so far.
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Ask the probe to stop (closes its stdin), wait a little, then kill it; returns every record.
    pub fn stop(mut self) -> Vec<Record> {
        drop(self.child.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200)); // let the reader drain
        self.records()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Run `keel-probe <args…>` once inside the namespace and return its stdout (e.g. `get URL`, `keys …`).
pub fn probe_once(net: &TestNet, bin: &Path, args: &[&str]) -> Result<String, String> {
    let out = net.exec(&bin.display().to_string()).args(args).output().map_err(|e| format!("running probe: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("keel-probe {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Records of `kind` from `from_ms` on.
pub fn of(records: &[Record], kind: Kind) -> impl Iterator<Item = &Record> {
    records.iter().filter(move |r| r.kind == kind)
}

/// The longest stretch (ms) within [from_ms, to_ms] with no successful record of `kind` (from any target):
/// the longest outage the client saw.
pub fn longest_outage(records: &[Record], kind: Kind, from_ms: u64, to_ms: u64) -> u64 {
    longest_outage_of(records, kind, from_ms, to_ms, |_| true)
}

/// [`longest_outage`] counting only successes from targets `which` accepts (e.g. one service instance).
pub fn longest_outage_of(records: &[Record], kind: Kind, from_ms: u64, to_ms: u64, which: impl Fn(usize) -> bool) -> u64 {
    let mut last = from_ms;
    let mut worst = 0;
    for r in of(records, kind).filter(|r| r.ok && r.at_ms >= from_ms && r.at_ms <= to_ms && which(r.target)) {
        worst = worst.max(r.at_ms.saturating_sub(last));
        last = r.at_ms;
    }
    worst.max(to_ms.saturating_sub(last))
}

/// Why the failed records of `kind` failed, counted: `etcd 301` (the KV's errorCode: 300 no quorum in time,
/// 301 during a leader election), `connect` (the machine did not answer), `read` (no answer in time), `other`.
pub fn failure_causes(records: &[Record], kind: Kind) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for r in of(records, kind).filter(|r| !r.ok) {
        let d = r.detail.replace('\\', "");
        let cause = if let Some(i) = d.find("\"errorCode\":") {
            format!("etcd {}", d[i + 12..].chars().take_while(char::is_ascii_digit).collect::<String>())
        } else if d.contains("connect ") {
            "connect".into()
        } else if d.contains("read from") {
            "read".into()
        } else {
            "other".into()
        };
        *m.entry(cause).or_insert(0) += 1;
    }
    m
}

/// Per second since `from_ms`: how many distinct groups (`group(target)`) had a success of `kind`.
pub fn per_second_groups(records: &[Record], kind: Kind, from_ms: u64, to_ms: u64, group: impl Fn(usize) -> usize) -> Vec<usize> {
    let n = (to_ms.saturating_sub(from_ms) / 1000 + 1) as usize;
    let mut v: Vec<std::collections::BTreeSet<usize>> = vec![Default::default(); n];
    for r in of(records, kind).filter(|r| r.ok && r.at_ms >= from_ms && r.at_ms <= to_ms) {
        v[((r.at_ms - from_ms) / 1000) as usize].insert(group(r.target));
    }
    v.into_iter().map(|s| s.len()).collect()
}

/// Per second since `from_ms`: (successes, attempts) of `kind`.
pub fn per_second(records: &[Record], kind: Kind, from_ms: u64, to_ms: u64) -> Vec<(u32, u32)> {
    let n = (to_ms.saturating_sub(from_ms) / 1000 + 1) as usize;
    let mut v = vec![(0u32, 0u32); n];
    for r in of(records, kind).filter(|r| r.at_ms >= from_ms && r.at_ms <= to_ms) {
        let i = ((r.at_ms - from_ms) / 1000) as usize;
        v[i].1 += 1;
        if r.ok {
            v[i].0 += 1;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: Kind, at_ms: u64, ok: bool) -> Record {
        Record { kind, at_ms, target: 0, ok, latency_ms: 3, detail: "x y".into() }
    }

    #[test]
    fn records_round_trip_through_their_line() {
        let r = Record { kind: Kind::Lock, at_ms: 17, target: 2, ok: true, latency_ms: 5, detail: "m1,m2 extra".into() };
        assert_eq!(Record::parse(&r.line()), Some(r));
        assert_eq!(Record::parse("X 1 2 3 4"), None);
    }

    #[test]
    fn longest_outage_counts_edges_and_gaps() {
        let rs = [rec(Kind::Write, 1000, true), rec(Kind::Write, 1500, false), rec(Kind::Write, 4000, true), rec(Kind::Read, 9000, true)];
        assert_eq!(longest_outage(&rs, Kind::Write, 0, 5000), 3000);
        assert_eq!(longest_outage(&rs, Kind::Write, 0, 9000), 5000);
        assert_eq!(per_second(&rs, Kind::Write, 1000, 4999), vec![(1, 2), (0, 0), (0, 0), (1, 1)]);
    }

    #[test]
    fn failures_are_classified_by_cause() {
        let mut rs = vec![rec(Kind::Write, 1, false), rec(Kind::Write, 2, false), rec(Kind::Write, 3, true)];
        rs[0].detail = r#"7 HTTP 500 {"errorCode":301,"message":"During Leader Election"}"#.into();
        rs[1].detail = "8 connect 10.77.0.11:2379: timed out".into();
        let c = failure_causes(&rs, Kind::Write);
        assert_eq!(c.get("etcd 301"), Some(&1));
        assert_eq!(c.get("connect"), Some(&1));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
