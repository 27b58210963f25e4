//! Partitions through a TCP proxy in front of every peer listener, and a Wing–Gong linearizability check over
//! histories of concurrent reads, writes and CAS recorded while the leader is partitioned away and killed.

use crate::{common, linearizability};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{wait_until, Cluster};
use keel_clusterd::client::{enc, request, ClientError, HttpResponse};
use linearizability::{check, prepare, Kind, Op, Verdict};

fn read_value(url: &str, key: &str) -> Result<Option<String>, ()> {
    let r = request("GET", &format!("{url}/v2/keys{key}"), None, Duration::from_secs(8)).map_err(|_| ())?;
    match r.status {
        200 => Ok(r.json().and_then(|v| v["node"]["value"].as_str().map(String::from))),
        404 if r.body.contains("\"errorCode\":100") => Ok(None),
        _ => Err(()),
    }
}

/// A write that certainly had no effect: never delivered, or refused with 301 "During Leader Election", which
/// clusterd answers only when the proposal never entered the leader's log (or was truncated from it) or the
/// forwarded request never reached the leader. Recording these as failed (not as unknown) makes the check
/// stricter: if one did take effect, its unique value shows up with no write to explain it.
fn not_applied(r: &Result<HttpResponse, ClientError>) -> bool {
    match r {
        Err(ClientError::Connect { .. }) => true,
        Ok(r) => r.status == 500 && r.body.contains("\"errorCode\":301"),
        Err(_) => false,
    }
}

#[test]
fn minority_refuses_majority_continues_and_histories_are_linearizable() {
    let mut c = Cluster::start(3, true);
    let urls: Vec<String> = c.members.iter().map(|m| m.client_url.clone()).collect();
    let keys = ["/lin/a", "/lin/b", "/lin/c"];
    let start = Instant::now();
    let now = move || start.elapsed().as_nanos() as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let history: Arc<Mutex<Vec<(usize, Op)>>> = Arc::default();
    // Writes that certainly had no effect (not recorded in the history).
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for t in 0..4usize {
        let (urls, stop, history, refused) = (urls.clone(), stop.clone(), history.clone(), refused.clone());
        clients.push(std::thread::spawn(move || {
            let mut n = 0u64;
            let mut rng: u64 = 0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let mut rand = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut seen: Vec<Option<String>> = vec![None; 3];
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let k = (rand() % 3) as usize;
                let url = &urls[(rand() % urls.len() as u64) as usize];
                let key = keys[k];
                let inv = now();
                let op = match rand() % 3 {
                    0 => {
                        let v = format!("c{t}-{n}");
                        let r = request("PUT", &format!("{url}/v2/keys{key}"), Some(&format!("value={}", enc(&v))), Duration::from_secs(8));
                        if not_applied(&r) {
                            refused.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let ok = matches!(&r, Ok(r) if r.status == 200 || r.status == 201);
                        Op { kind: Kind::Write(v), invoke: inv, ret: ok.then(now) }
                    }
                    1 => match read_value(url, key) {
                        Ok(v) => {
                            seen[k] = v.clone();
                            Op { kind: Kind::Read(Some(v)), invoke: inv, ret: Some(now()) }
                        }
                        Err(()) => continue, // no information
                    },
                    _ => {
                        let Some(exp) = seen[k].clone() else { continue };
                        let v = format!("c{t}-{n}");
                        let r = request(
                            "PUT",
                            &format!("{url}/v2/keys{key}?prevValue={}", enc(&exp)),
                            Some(&format!("value={}", enc(&v))),
                            Duration::from_secs(8),
                        );
                        if not_applied(&r) {
                            refused.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let outcome = match &r {
                            Ok(r) if r.status == 200 => Some(true),
                            Ok(r) if r.status == 412 || r.status == 404 => Some(false),
                            _ => None,
                        };
                        Op { kind: Kind::Cas(exp, v, outcome), invoke: inv, ret: outcome.map(|_| now()) }
                    }
                };
                history.lock().expect("lock").push((k, op));
                std::thread::sleep(Duration::from_millis(3));
            }
        }));
    }

    // 1. Partition the leader away from the other two.
    let leader = c.wait_leader(Duration::from_secs(20));
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    std::thread::sleep(Duration::from_millis(500)); // let some history accumulate (not a correctness wait)
    c.partition(&[leader], &others);
    // The majority elects a new leader and keeps accepting writes.
    let new_leader = wait_until("a leader in the majority", Duration::from_secs(20), || {
        others.iter().copied().find(|i| c.status(*i).is_some_and(|s| s["isLeader"].as_bool() == Some(true)))
    });
    let r = c.put(new_leader, "/part/majority", "yes").expect("majority write");
    assert_eq!(r.status, 201, "majority write refused: {}", r.body);
    // The minority refuses writes and linearizable reads (after its proposal timeout), serves local reads.
    let lurl = urls[leader].clone();
    let w = std::thread::spawn({
        let lurl = lurl.clone();
        move || request("PUT", &format!("{lurl}/v2/keys/part/minority"), Some("value=no"), Duration::from_secs(15))
    });
    let rd = request("GET", &format!("{lurl}/v2/keys/part/majority"), None, Duration::from_secs(15)).expect("minority read");
    assert!(rd.status >= 500, "minority served a linearizable read: {} {}", rd.status, rd.body);
    let wr = w.join().expect("join").expect("minority write");
    assert!(wr.status >= 500, "minority accepted a write: {} {}", wr.status, wr.body);
    let local = request("GET", &format!("{lurl}/v2/keys/lin?quorum=false"), None, Duration::from_secs(5)).expect("local read");
    assert!(local.status == 200 || local.status == 404, "local read on the minority: {}", local.status);

    // 2. Heal: everyone converges, the old leader sees the majority's write.
    c.heal();
    wait_until("the old leader to see the majority's write", Duration::from_secs(30), || {
        (c.value(leader, "/part/majority", false).as_deref() == Some("yes")).then_some(())
    });
    assert_eq!(c.value(new_leader, "/part/minority", false), None, "the minority's refused write must not appear");

    // 3. Kill -9 the current leader under the same load, restart it.
    let l2 = c.wait_leader(Duration::from_secs(20));
    c.kill9(l2);
    wait_until("a new leader after the kill", Duration::from_secs(30), || c.leader().filter(|l| *l != l2));
    std::thread::sleep(Duration::from_millis(500)); // more history under the new leader (not a correctness wait)
    c.spawn(l2);
    c.wait_ready();
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.join().expect("client thread");
    }
    wait_until("all members to converge", Duration::from_secs(30), || {
        let idx: Vec<u64> = (0..3).filter_map(|i| c.status(i)?["storeIndex"].as_u64()).collect();
        (idx.len() == 3 && idx.iter().all(|x| *x == idx[0])).then_some(())
    });

    // 4. Check every key's history.
    let history = history.lock().expect("lock").clone();
    assert!(history.len() > 30, "history too short to mean anything: {}", history.len());
    eprintln!("{} writes certainly had no effect (undelivered or 301), left out", refused.load(Ordering::Relaxed));
    for (k, key) in keys.iter().enumerate() {
        let all: Vec<Op> = history.iter().filter(|(kk, _)| *kk == k).map(|(_, o)| o.clone()).collect();
        let ops = prepare(all);
        let unknown = ops.iter().filter(|o| o.ret.is_none()).count();
        eprintln!("{key}: {} operations ({unknown} with unknown outcome)", ops.len());
        let dump = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("keel-lin-{}.txt", key.replace('/', "_")));
        let lines: Vec<String> = ops.iter().map(|o| format!("{:?} [{} .. {:?}]", o.kind, o.invoke, o.ret)).collect();
        let _ = std::fs::write(&dump, lines.join("\n"));
        let (verdict, states) = check(&ops, None);
        eprintln!("{key}: {verdict:?} after {states} states");
        if verdict != Verdict::Linearizable {
            eprintln!("history of {key}, one operation a line (invoke .. return, ns):\n{}", lines.join("\n"));
        }
        assert_eq!(verdict, Verdict::Linearizable, "history of {key} (written to {})", dump.display());
    }
}
