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
