//! Keel's init: PID 1 of a Keel machine, or a plain supervisor for development and tests.
//!
//! Data flow: unit files → `keel_model` (parse, validate) → `supervisor` (jobs in dependency order, process
//! lifecycle) → `spawn` (fork/exec into the unit's cgroup) → `run` (poll loop, reaper, signals) ← `api`
//! (initctl and other components on the control socket). Unit output goes through pipes into `journal`.
//!
//! Unsafe code lives only in `sys` and `runtime::child` (and one borrow of owned fds for poll in `run`).
//! Containers: `images` (the image store) and `runtime` (a unit's `[Container]` started by init itself).

pub mod api;
pub mod boot;
pub mod cgroup;
pub mod cloudconfig;
pub mod initrd;
pub mod images;
pub mod journal;
pub mod notify;
pub mod run;
pub mod runtime;
pub mod shutdown;
pub mod spawn;
pub mod supervisor;
pub mod sys;
pub mod users;
