//! One test binary for clusterd's integration tests: real clusterd processes on 127.x addresses, real
//! clients (curl, etcdctl, python-etcd), faults (kill -9, partitions through a proxy, a slowed disk) and the
//! linearizability check.
//!
//! Each file beside this one is a module of it, not a test target of its own: one thin-LTO link instead of one
//! per file (≈ 20 s of CPU each; `make test` links four of these instead of twenty). `autotests = false` in
//! Cargo.toml keeps cargo from building the files twice; keel-tests' `workspace_checks` fails if a file here
//! is not listed below. Run one file's tests with `cargo test --release -p <crate> --test integration -- <file>::`.

mod common;
mod linearizability;

mod etcd_pairs;
mod fleet;
mod partition;
mod single_node;
mod three_nodes;
mod watch;
