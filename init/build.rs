//! Link-time layout of the `init` binary: the functions of its idle loop and control API first in `.text`
//! (`link-order.txt`, lld's `--symbol-ordering-file`), so that the code pages init keeps resident after it
//! releases its start-up pages are few (docs/benchmarks.md, init). Only when the linker is rust-lld — rustc's
//! default for x86_64-unknown-linux-gnu since 1.90 — and no other linker was configured; otherwise the binary
//! is linked as before. Does not: change what the code does, or any other binary.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=link-order.txt");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let Ok(dir) = std::env::var("CARGO_MANIFEST_DIR") else { return };
    if !links_with_rust_lld() {
        return;
    }
    println!("cargo:rustc-link-arg-bin=init=-Wl,--symbol-ordering-file={dir}/link-order.txt");
    // Names from an older build that no longer exist are expected; they only cost locality.
    println!("cargo:rustc-link-arg-bin=init=-Wl,--no-warn-symbol-ordering");
}

/// True when rustc will link through rust-lld: the x86_64 gnu target, rustc ≥ 1.90, and no linker chosen in
/// the configuration or RUSTFLAGS.
fn links_with_rust_lld() -> bool {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    if env("TARGET") != "x86_64-unknown-linux-gnu" || !env("RUSTC_LINKER").is_empty() {
        return false;
    }
    let flags = env("CARGO_ENCODED_RUSTFLAGS");
    if flags.contains("linker") || flags.contains("link-self-contained") {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("-vV").output() else { return false };
    let text = String::from_utf8_lossy(&out.stdout);
    let minor = text
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok());
    matches!(minor, Some(m) if m >= 90)
}
