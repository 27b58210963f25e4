//! One test binary for Keel's cross-component tests: the image booted under QEMU (one VM, updates, a
//! 3-machine cluster), the README's tours as written, and the CLIs' error messages.
//!
//! Each file beside this one is a module of it, not a test target of its own: one thin-LTO link instead of one
//! per file (≈ 20 s of CPU each; `make test` links four of these instead of twenty). `autotests = false` in
//! Cargo.toml keeps cargo from building the files twice; keel-tests' `workspace_checks` fails if a file here
//! is not listed below. Run one file's tests with `cargo test --release -p <crate> --test integration -- <file>::`.

mod bench_boot;
mod cli_errors;
mod host_tour;
mod qemu;
mod rolling;
mod update;
