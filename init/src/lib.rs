//! Keel's init: PID 1 of a Keel machine, or a plain supervisor for development and tests.
//!
//! Data flow: unit files → `keel_model` (parse, validate) → `supervisor` (jobs in dependency order, process
//! lifecycle) → `spawn` (fork/exec into the unit's cgroup) → `run` (poll loop, reaper, signals) ← `api`
//! (initctl and other components on the control socket). Unit output goes through pipes into `journal`.
//!
//! Unsafe code lives only in `sys` (and one borrow of owned fds for poll in `run`).

pub mod api;
pub mod boot;
pub mod cgroup;
pub mod cloudconfig;
pub mod initrd;
pub mod journal;
pub mod notify;
pub mod run;
pub mod shutdown;
pub mod spawn;
pub mod supervisor;
pub mod sys;
pub mod users;
