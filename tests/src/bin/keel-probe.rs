//! `keel-probe`: the client outside the VMs in the rolling-update scenario (tests/tests/rolling.rs). Run inside
//! the test's network namespace (`ip netns exec`). It writes to the KV, reads every write back, polls a service
//! and the members' health and the reboot lock, and prints one record per result (format: keel_tests::probe).
//!
//! Owns: the request loops and their pacing. Does not: judge results (the test does).

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keel_tests::probe::{http, now_ms, Kind, ProbeConfig, Record, LOCK_KEY};

const HELP: &str = "\
keel-probe: a KV and service client for Keel's rolling-update test, run inside its network
namespace.

USAGE
  keel-probe run --kv URL,URL,.. --service URL,URL,.. [--prefix /rolling] [--interval-ms 250]
               [--service-interval-ms 250] [--lock-key KEY]
      Until stdin closes: every interval PUT <prefix>/<seq> (trying the members in turn, starting
      with the one that answered last) and read it back (linearizable); GET every service URL
      every service interval (1 s timeout, one thread per URL); every 500 ms GET each member's
      /health and the reboot lock KEY, and watch KEY for every change. Prints one line per result:
      `<W|R|S|H|L> <unix-ms> <target> <0|1> <latency-ms> <detail>`.
  keel-probe keys --kv URL,URL,.. [--prefix /rolling]
      Print every key under the prefix (a linearizable recursive GET), one per line.
  keel-probe http METHOD URL [BODY]
      One request; prints the body; exits 1 unless the status is 2xx.

EXAMPLES
  ip netns exec keelnet-1-0 \\
    keel-probe run --kv http://10.77.0.11:2379 --service http://10.77.0.11:8080/
  ip netns exec keelnet-1-0 keel-probe http PUT http://10.77.0.11:2379/v2/keys/a value=1
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => run(parse(&args[1..])?),
        Some("keys") => keys(&parse(&args[1..])?),
        Some("http") => one(&args[1..]),
        Some("-h" | "--help") | None => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}; see keel-probe --help"),
    }
}

fn parse(args: &[String]) -> Result<ProbeConfig> {
    let mut cfg = ProbeConfig {
        kv: Vec::new(),
        service: Vec::new(),
        prefix: "/rolling".into(),
        interval: Duration::from_millis(250),
        service_interval: Duration::from_millis(250),
        lock_key: LOCK_KEY.into(),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value; see keel-probe --help"))?;
        let list = || v.split(',').filter(|s| !s.is_empty()).map(|s| s.trim_end_matches('/').to_string()).collect();
        match flag.as_str() {
            "--kv" => cfg.kv = list(),
            "--service" => cfg.service = v.split(',').filter(|s| !s.is_empty()).map(String::from).collect(),
            "--prefix" => cfg.prefix = v.trim_end_matches('/').to_string(),
            "--interval-ms" => cfg.interval = Duration::from_millis(v.parse().context("--interval-ms")?),
            "--service-interval-ms" => {
                cfg.service_interval = Duration::from_millis(v.parse().context("--service-interval-ms")?)
            }
            "--lock-key" => cfg.lock_key = v.clone(),
            _ => bail!("unknown flag {flag}; see keel-probe --help"),
        }
    }
    if cfg.kv.is_empty() {
        bail!("--kv URL[,URL..] is required");
    }
    Ok(cfg)
}

fn one(args: &[String]) -> Result<()> {
    let (Some(method), Some(url)) = (args.first(), args.get(1)) else { bail!("usage: keel-probe http METHOD URL [BODY]") };
    let r = http(method, url, args.get(2).map(String::as_str), Duration::from_secs(10)).map_err(anyhow::Error::msg)?;
    print!("{}", r.body);
    if !(200..300).contains(&r.status) {
        bail!("{method} {url}: HTTP {}", r.status);
    }
    Ok(())
}

fn keys(cfg: &ProbeConfig) -> Result<()> {
    let mut last = String::new();
    for m in &cfg.kv {
        let url = format!("{m}/v2/keys{}?recursive=true", cfg.prefix);
        match http("GET", &url, None, Duration::from_secs(15)) {
            Ok(r) if r.status == 200 => {
                let v: serde_json::Value = serde_json::from_str(&r.body).context("parsing the listing")?;
                let mut out = Vec::new();
                collect_keys(&v["node"], &mut out);
                for k in out {
                    println!("{k}");
                }
                return Ok(());
            }
            Ok(r) => last = format!("{url}: HTTP {} {}", r.status, r.body.trim()),
            Err(e) => last = e,
        }
    }
    bail!("no member listed {}: {last}", cfg.prefix)
}

fn collect_keys(node: &serde_json::Value, out: &mut Vec<String>) {
    if let Some(nodes) = node["nodes"].as_array() {
        for n in nodes {
            collect_keys(n, out);
        }
    } else if let Some(k) = node["key"].as_str() {
        if node["dir"].as_bool() != Some(true) {
            out.push(k.to_string());
        }
    }
}

struct Out {
    lock: Mutex<()>,
    stop: AtomicBool,
}

impl Out {
    fn emit(&self, kind: Kind, target: usize, ok: bool, started: Instant, detail: String) {
        let r = Record { kind, at_ms: now_ms(), target, ok, latency_ms: started.elapsed().as_millis() as u64, detail };
        let _g = self.lock.lock();
        let mut so = std::io::stdout().lock();
        if writeln!(so, "{}", r.line()).and_then(|()| so.flush()).is_err() {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

fn pace(out: &Out, started: Instant, interval: Duration) {
    let until = started + interval;
    while !out.stopped() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10).min(until.saturating_duration_since(Instant::now())));
    }
}

fn run(cfg: ProbeConfig) -> Result<()> {
    let out = Arc::new(Out { lock: Mutex::new(()), stop: AtomicBool::new(false) });
    let mut threads = Vec::new();
    {
        let (out, cfg) = (out.clone(), cfg.clone());
        threads.push(std::thread::spawn(move || writer(&out, &cfg)));
    }
    for (i, url) in cfg.service.iter().enumerate() {
        let (out, url, every) = (out.clone(), url.clone(), cfg.service_interval);
        threads.push(std::thread::spawn(move || service(&out, i, &url, every)));
    }
    {
        let (out, cfg) = (out.clone(), cfg.clone());
        threads.push(std::thread::spawn(move || health(&out, &cfg)));
    }
    {
        let (out, cfg) = (out.clone(), cfg.clone());
        threads.push(std::thread::spawn(move || lock_watch(&out, &cfg)));
    }
    // stdin closing (the test dropping its end) stops everything
    for _ in std::io::stdin().lock().lines().map_while(Result::ok) {}
    out.stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Try the members in turn from `first`; returns (member, response) of the first 2xx, else the last error.
fn failover(kv: &[String], first: usize, method: &str, path: &str, body: Option<&str>) -> (usize, Result<String, String>) {
    let mut last = (first, Err("no members".to_string()));
    for k in 0..kv.len() {
        let m = (first + k) % kv.len();
        match http(method, &format!("{}{path}", kv[m]), body, Duration::from_secs(6)) {
            Ok(r) if (200..300).contains(&r.status) => return (m, Ok(r.body)),
            Ok(r) => last = (m, Err(format!("HTTP {} {}", r.status, r.body.trim()))),
            Err(e) => last = (m, Err(e)),
        }
    }
    last
}

fn writer(out: &Out, cfg: &ProbeConfig) {
    let mut pref = 0;
    let mut seq = 0u64;
    while !out.stopped() {
        let tick = Instant::now();
        seq += 1;
        let path = format!("/v2/keys{}/{seq:08}", cfg.prefix);
        let (m, res) = failover(&cfg.kv, pref, "PUT", &path, Some(&format!("value={seq}")));
        match res {
            Ok(_) => {
                pref = m;
                out.emit(Kind::Write, m, true, tick, seq.to_string());
                let t = Instant::now();
                let (m, res) = failover(&cfg.kv, pref, "GET", &path, None);
                let ok = res.as_ref().is_ok_and(|b| b.contains(&format!("\"value\":\"{seq}\"")));
                out.emit(Kind::Read, m, ok, t, if ok { seq.to_string() } else { format!("{seq} {res:?}") });
            }
            Err(e) => {
                pref = (m + 1) % cfg.kv.len();
                out.emit(Kind::Write, m, false, tick, format!("{seq} {e}"));
            }
        }
        pace(out, tick, cfg.interval);
    }
}

fn service(out: &Out, i: usize, url: &str, every: Duration) {
    while !out.stopped() {
        let tick = Instant::now();
        match http("GET", url, None, Duration::from_secs(1)) {
            Ok(r) if r.status == 200 => {
                out.emit(Kind::Service, i, true, tick, r.body.lines().next().unwrap_or("").to_string())
            }
            Ok(r) => out.emit(Kind::Service, i, false, tick, format!("HTTP {}", r.status)),
            Err(e) => out.emit(Kind::Service, i, false, tick, e),
        }
        pace(out, tick, every);
    }
}

fn health(out: &Out, cfg: &ProbeConfig) {
    let mut pref = 0;
    while !out.stopped() {
        let tick = Instant::now();
        for (i, m) in cfg.kv.iter().enumerate() {
            let t = Instant::now();
            match http("GET", &format!("{m}/health"), None, Duration::from_secs(1)) {
                Ok(r) => out.emit(Kind::Health, i, r.status == 200, t, format!("HTTP {}", r.status)),
                Err(e) => out.emit(Kind::Health, i, false, t, e),
            }
        }
        let t = Instant::now();
        let (m, res) = failover(&cfg.kv, pref, "GET", &format!("/v2/keys{}", cfg.lock_key), None);
        match res {
            Ok(body) => {
                pref = m;
                out.emit(Kind::Lock, m, true, t, holders(&body));
            }
            Err(e) if e.contains("\"errorCode\":100") => {
                pref = m;
                out.emit(Kind::Lock, m, true, t, "absent".into())
            }
            Err(e) => out.emit(Kind::Lock, m, false, t, e),
        }
        pace(out, tick, Duration::from_millis(500));
    }
}

/// The holders in a semaphore key's GET answer: `a,b`, or `-` when none.
fn holders(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let sem: serde_json::Value = v["node"]["value"].as_str().and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
    let hs: Vec<&str> = sem["holders"].as_array().map(|a| a.iter().filter_map(|h| h.as_str()).collect()).unwrap_or_default();
    if hs.is_empty() {
        "-".into()
    } else {
        hs.join(",")
    }
}

/// Every change of the lock key, through etcd v2 watches (`?wait=true&waitIndex=N`), so that no value the
/// semaphore ever had is missed between two polls. Emits L records like the poll does.
fn lock_watch(out: &Out, cfg: &ProbeConfig) {
    let mut m = 0;
    let mut next: Option<u64> = None;
    while !out.stopped() {
        let t = Instant::now();
        let path = match next {
            Some(i) => format!("{}/v2/keys{}?wait=true&waitIndex={i}", cfg.kv[m], cfg.lock_key),
            None => format!("{}/v2/keys{}", cfg.kv[m], cfg.lock_key),
        };
        match http("GET", &path, None, Duration::from_secs(5)) {
            Ok(r) if r.status == 200 => {
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
                match v["node"]["modifiedIndex"].as_u64() {
                    Some(i) => {
                        next = Some(i + 1);
                        out.emit(Kind::Lock, m, true, t, holders(&r.body));
                    }
                    None => next = None,
                }
            }
            // the key does not exist yet, or the index was compacted away: start again from a plain GET
            Ok(_) => {
                next = None;
                pace(out, t, Duration::from_millis(300));
            }
            // a long poll that timed out keeps its index; an unreachable member: try the next one
            Err(e) if e.starts_with("read from") && next.is_some() => {}
            Err(_) => {
                m = (m + 1) % cfg.kv.len();
                next = None;
                pace(out, t, Duration::from_millis(200));
            }
        }
    }
}
