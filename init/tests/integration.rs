//! One test binary for init's integration tests: init as PID 1 of a PID namespace, units, the journal, and
//! containers in real namespaces and cgroups.
//!
//! Each file beside this one is a module of it, not a test target of its own: one thin-LTO link instead of one
//! per file (≈ 20 s of CPU each; `make test` links four of these instead of twenty). `autotests = false` in
//! Cargo.toml keeps cargo from building the files twice; keel-tests' `workspace_checks` fails if a file here
//! is not listed below. Run one file's tests with `cargo test --release -p <crate> --test integration -- <file>::`.

mod common;

mod containers;
mod pid1;
