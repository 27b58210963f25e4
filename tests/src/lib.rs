//! Keel's cross-component and QEMU integration tests: library side.
//!
//! - `vm`: start a Keel VM from the built image (own qcow2 overlay, own OVMF vars), read its serial console
//!   into a log, wait for markers with deadlines, run commands over the debug-shell port, shut down; QEMU is
//!   always killed on drop and the console log is kept under target/keel-tests/.
//! - `net`: a test-made network namespace with a bridge and one tap per VM.
//! - `image`: build the image under test with mkimage (once per test process).
//! - `cluster`: several VMs on a test bridge forming one Keel cluster, restarted when they reboot, with a
//!   timeline of what happened to each.
//! - `probe`: the client outside the VMs (`keel-probe`, src/bin) and what tests compute from its records.
//! - `readme`: the README's command blocks, for the tests that run its tours as written.

pub mod cluster;
pub mod image;
pub mod net;
pub mod probe;
pub mod readme;
pub mod vm;

use std::time::{Duration, Instant};

/// Poll `cond` every 100 ms until it holds: how long that took, or "`what` did not happen within `timeout`".
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<Duration, String> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() >= timeout {
            return Err(format!("{what} did not happen within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(start.elapsed())
}

#[cfg(test)]
mod workspace_checks {
    /// The workspace's crates, as the root manifest lists them.
    fn members() -> Vec<String> {
        let root = std::fs::read_to_string(crate::image::workspace().join("Cargo.toml")).unwrap_or_default();
        let members = root.lines().find_map(|l| l.strip_prefix("members = [")).unwrap_or("");
        members.trim_end_matches(']').split(',').map(|m| m.trim().trim_matches('"').to_string()).filter(|m| !m.is_empty()).collect()
    }

    /// A binary declared `test = false` (every Keel CLI: see clusterd/Cargo.toml) must not carry unit tests:
    /// `cargo test` would never build or run them.
    #[test]
    fn binaries_without_a_test_harness_have_no_unit_tests() {
        let ws = crate::image::workspace();
        let mut checked = 0;
        for krate in members() {
            let manifest = std::fs::read_to_string(ws.join(&krate).join("Cargo.toml")).unwrap_or_default();
            for block in manifest.split("[[bin]]").skip(1) {
                let block = block.split("\n[").next().unwrap_or("");
                if !block.lines().any(|l| l.replace(' ', "") == "test=false") {
                    continue;
                }
                let path = block.lines().find_map(|l| l.strip_prefix("path = ")).map(|p| p.trim_matches('"')).unwrap_or("");
                let src = std::fs::read_to_string(ws.join(&krate).join(path)).unwrap_or_else(|e| panic!("{krate}/{path}: {e}"));
                assert!(!src.contains("#[test]"), "{krate}/{path} has unit tests but `test = false`: move them into the library");
                checked += 1;
            }
        }
        assert!(checked >= 14, "only {checked} binaries with test = false found; did the manifests change?");
    }

    /// With `autotests = false` (one integration-test binary per crate, tests/integration.rs), a file in tests/
    /// that integration.rs does not name as a module would silently never run.
    #[test]
    fn every_integration_test_file_is_a_module_of_the_crates_test_binary() {
        let ws = crate::image::workspace();
        let mut checked = 0;
        for krate in members() {
            let dir = ws.join(&krate).join("tests");
            if !dir.is_dir() {
                continue;
            }
            let main = std::fs::read_to_string(dir.join("integration.rs")).unwrap_or_else(|e| panic!("{krate}: {e}"));
            let manifest = std::fs::read_to_string(ws.join(&krate).join("Cargo.toml")).unwrap_or_default();
            assert!(manifest.contains("autotests = false"), "{krate}/Cargo.toml: autotests must be off");
            for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
                let path = entry.expect("dir entry").path();
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
                let module = path.extension().is_some_and(|e| e == "rs") || path.join("mod.rs").exists();
                if !module || stem == "integration" {
                    continue;
                }
                let named = main.lines().any(|l| l.trim() == format!("mod {stem};"));
                assert!(named, "{} is not `mod {stem};` in {krate}/tests/integration.rs: it would never run", path.display());
                checked += 1;
            }
        }
        assert!(checked >= 20, "only {checked} integration-test files found; did the layout change?");
    }
}
