//! Every command-line tool, failing the way a user first meets it (nothing running, nothing built): one line
//! on stderr, `prog: what failed: why`, the cause said once, exit status 1, and no backtrace or "Caused by:"
//! block even with RUST_BACKTRACE=1 set in the user's shell.

use std::process::Command;

use keel_tests::image;

/// A loopback port with nothing listening (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn each_tool_reports_a_failure_in_one_line_that_says_its_cause_once() {
    let bin = image::release_dir();
    if !bin.join("clusterctl").exists() {
        eprintln!("keel-tests: release binaries not built; run `cargo build --release --workspace --bins`");
        return;
    }
    let dir = image::work_dir("cli-errors");
    let url = format!("http://127.0.0.1:{}", closed_port());
    let sock = dir.join("no-init.sock");
    let sock = sock.to_str().expect("utf-8 path");
    let missing = dir.join("missing");
    let missing = missing.to_str().expect("utf-8 path");
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("clusterctl", vec!["--endpoints", &url, "kv", "get", "/x"], "Connection refused"),
        ("fleetctl", vec!["--endpoint", &url, "list-units"], "Connection refused"),
        ("locksmithctl", vec!["--endpoint", &url, "status"], "Connection refused"),
        ("updatectl", vec!["--endpoint", &url, "status"], "Connection refused"),
        ("initctl", vec!["--socket", sock, "list"], "No such file or directory"),
        ("keelvm", vec!["run", "--out", missing], "No such file or directory"),
        ("keelvm", vec!["shell", "--socket", sock], "No such file or directory"),
        ("mkpayload", vec!["verify", "--keys", missing, "/etc/hostname"], missing),
    ];
    for (prog, args, cause) in cases {
        let out = Command::new(bin.join(prog)).args(&args).env("RUST_BACKTRACE", "1").output().expect("run the tool");
        let err = String::from_utf8_lossy(&out.stderr);
        let shown = format!("{prog} {}: exit {:?}, stderr:\n{err}", args.join(" "), out.status.code());
        assert_eq!(out.status.code(), Some(1), "{shown}");
        assert_eq!(err.lines().count(), 1, "not one line: {shown}");
        assert!(err.starts_with(&format!("{prog}: ")), "not prefixed with the tool's name: {shown}");
        assert_eq!(err.matches(cause).count(), 1, "the cause {cause:?} is not said exactly once: {shown}");
    }
}
