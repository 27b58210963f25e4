//! The README's host tour, run as written: `make run-host` (scripts/run-host.sh: Keel's init as PID 1 of a PID
//! namespace on this host, supervising examples/demo-units) in one terminal, the README's commands under "On the
//! host, without a VM" in another, then Ctrl-C in the first. Needs root (unshare) and the release binaries.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_tests::{image, readme, wait_until};

/// How long a person would keep retrying a tour line that depends on work still in flight.
const RETRY: Duration = Duration::from_secs(60);

/// The run-host terminal: its process group gets SIGINT (Ctrl-C) or, if the test fails first, SIGKILL.
struct Terminal(Child);

impl Terminal {
    fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([&format!("-{sig}"), "--", &format!("-{}", self.0.id())]).status();
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.signal("KILL");
            let _ = self.0.wait();
        }
    }
}

#[test]
fn the_readme_host_tour_runs_as_written_beside_make_run_host() {
    let ws = image::workspace();
    let release = image::release_dir();
    assert!(release.join("init").exists(), "build the release binaries first (cargo build --release --workspace --bins)");
    let tour = readme::sh_block(&readme::read(&ws), "On the host, without a VM");
    assert!(tour.len() >= 3, "no host tour in README.md after 'On the host, without a VM': {tour:?}");
    assert!(tour[0].starts_with("export "), "the host tour starts by setting PATH and KEEL_INIT_SOCKET: {:?}", tour[0]);
    assert!(!port_answers(8080), "something on this host already listens on 127.0.0.1:8080 (the demo web unit's port)");

    // The tour's state dir (/tmp/keel-run in the README) is the test's own; KEEL_RUN_STATE moves it.
    let state = image::work_dir("host-tour");
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).expect("state dir");
    let console_path = state.with_extension("console.log");
    let console = std::fs::File::create(&console_path).expect("console log");
    let term = Terminal(
        Command::new(ws.join("scripts/run-host.sh"))
            .current_dir(&ws)
            .env("KEEL_RUN_STATE", &state)
            .stdin(Stdio::null())
            .stdout(console.try_clone().expect("dup"))
            .stderr(console)
            .process_group(0) // a terminal's foreground job: Ctrl-C reaches every process of it
            .spawn()
            .expect("scripts/run-host.sh"),
    );
    let log = || std::fs::read_to_string(&console_path).unwrap_or_default();
    wait_until("init's control socket", Duration::from_secs(30), || state.join("init.sock").exists())
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", log()));

    let export = tour[0].replace("/tmp/keel-run", &state.display().to_string());
    // (line prefix, what the tour's comment promises, a check of the line's output).
    type Promise = (&'static str, &'static str, fn(&str) -> bool);
    let promises: [Promise; 3] = [
        ("initctl list; curl 127.0.0.1:8080", "the page", |o| o.contains("hello from Keel")),
        // "became active only after READY=1": the unit is active, not stuck activating.
        ("initctl list; curl 127.0.0.1:8080", "web.service active", |o| {
            o.lines().any(|l| l.split_whitespace().take(2).eq(["web.service", "active"]))
        }),
        ("initctl status flaky.service", "start-limit-hit", |o| o.contains("start-limit-hit")),
    ];
    for line in &tour[1..] {
        if line.starts_with("initctl logs -f") {
            let out = follow(&ws, &format!("{export}\n{line}"), "flaky: starting", Duration::from_secs(30));
            eprintln!("keel-tests: host tour $ {line}\n{}", out.trim_end());
            assert!(out.contains("flaky: starting"), "`{line}` showed no unit output within 30 s:\n{out}\nconsole:\n{}", log());
            continue;
        }
        let wanted: Vec<&Promise> = promises.iter().filter(|(p, _, _)| line.starts_with(p)).collect();
        let want_code = readme::expected_code(line);
        let deadline = Instant::now() + RETRY;
        let (code, out) = loop {
            let (code, out) = sh(&ws, &format!("{export}\n{line}"));
            let kept = code == want_code && wanted.iter().all(|(_, _, ok)| ok(&out));
            if kept || Instant::now() >= deadline {
                break (code, out);
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        eprintln!("keel-tests: host tour $ {line}\n{}", out.trim_end());
        assert_eq!(code, want_code, "README host tour line {line:?} exited {code} (want {want_code}):\n{out}\nconsole:\n{}", log());
        for (_, what, ok) in wanted {
            assert!(ok(&out), "README host tour line {line:?} did not show {what}:\n{out}\nconsole:\n{}", log());
        }
    }

    // Ctrl-C in the run-host terminal: every unit stops, the namespace ends, the web port is free again.
    term.signal("INT");
    let mut term = term;
    wait_until("run-host to end after Ctrl-C", Duration::from_secs(30), || matches!(term.0.try_wait(), Ok(Some(_))))
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", log()));
    assert!(log().contains("keel: starting init"), "{}", log());
    assert!(!port_answers(8080), "the demo web server outlived Ctrl-C:\n{}", log());
}

/// Run one tour line the way the reader's second terminal would (bash, in the checkout); (exit code, stdout+stderr).
fn sh(dir: &Path, script: &str) -> (i32, String) {
    let out = Command::new("bash").args(["-c", script]).current_dir(dir).output().expect("bash");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Run a line that follows forever (`logs -f`) until its output contains `until` or `timeout` passes; its output.
fn follow(dir: &Path, script: &str, until: &str, timeout: Duration) -> String {
    let mut child = Command::new("bash")
        .args(["-c", script])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("bash");
    let mut pipe = child.stdout.take().expect("stdout");
    let following = Terminal(child);
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut all = Vec::new();
    while !String::from_utf8_lossy(&all).contains(until) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(chunk) => all.extend_from_slice(&chunk),
            Err(_) => break, // deadline, or the line ended by itself
        }
    }
    drop(following);
    String::from_utf8_lossy(&all).into_owned()
}

fn port_answers(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)).is_ok()
}
