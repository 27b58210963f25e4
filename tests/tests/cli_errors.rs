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

/// The release binaries' directory, or None (said on stderr) when they are not built.
fn release_bins() -> Option<std::path::PathBuf> {
    let bin = image::release_dir();
    if !bin.join("clusterctl").exists() {
        eprintln!("keel-tests: release binaries not built; run `cargo build --release --workspace --bins`");
        return None;
    }
    Some(bin)
}

#[test]
fn each_tool_reports_a_failure_in_one_line_that_says_its_cause_once() {
    let Some(bin) = release_bins() else { return };
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

/// The subcommands a clap help page lists under "Commands:" (less `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim_end() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Every tool's `--help`, and every subcommand's, reads in a 100-column terminal: clap wraps its own text
/// only when the terminal is narrower, and hand-written paragraphs never.
#[test]
fn every_help_page_fits_in_100_columns() {
    let Some(bin) = release_bins() else { return };
    let tools: Vec<String> = std::fs::read_dir(&bin)
        .expect("release dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| std::os::unix::fs::PermissionsExt::mode(&e.metadata().expect("metadata").permissions()) & 0o111 != 0)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(tools.len() >= 10, "too few tools in {}: {tools:?}", bin.display());
    let (mut pages, mut wide) = (0, Vec::new());
    let mut todo: Vec<Vec<String>> = tools.iter().map(|t| vec![t.clone()]).collect();
    while let Some(cmd) = todo.pop() {
        let out = Command::new(bin.join(&cmd[0])).args(&cmd[1..]).arg("--help").env_remove("COLUMNS").output().expect("run --help");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.lines().count() > 3, "{} --help: {:?}\n{text}", cmd.join(" "), out.status);
        pages += 1;
        wide.extend(text.lines().filter(|l| l.chars().count() > 100).map(|l| format!("{}: {l}", cmd.join(" "))));
        if cmd.len() < 3 {
            todo.extend(subcommands(&text).into_iter().map(|s| cmd.iter().cloned().chain([s]).collect()));
        }
    }
    assert!(wide.is_empty(), "help lines over 100 columns:\n{}", wide.join("\n"));
    eprintln!("keel-tests: {pages} help pages of {} tools, none wider than 100 columns", tools.len());
}
