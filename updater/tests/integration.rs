//! One test binary for the update engine's integration tests: Omaha exchanges, signed payloads, A/B slots on
//! disk images, the engine end to end against a real update server, and reboot locks on a real clusterd.
//!
//! Each file beside this one is a module of it, not a test target of its own: one thin-LTO link instead of one
//! per file (≈ 20 s of CPU each; `make test` links four of these instead of twenty). `autotests = false` in
//! Cargo.toml keeps cargo from building the files twice; keel-tests' `workspace_checks` fails if a file here
//! is not listed below. Run one file's tests with `cargo test --release -p <crate> --test integration -- <file>::`.

mod common;
#[path = "../../clusterd/tests/common/ports.rs"]
mod ports;

mod e2e;
mod omaha;
mod payload;
mod reboot;
mod server_policy;
mod slot;
