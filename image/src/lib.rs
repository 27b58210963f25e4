//! Keel's image tooling.
//!
//! - `mkimage`: assembles the bootable disk (USR erofs, initramfs, UKIs, ESP, OEM, ROOT, GPT) — see docs/image.md.
//! - `gpt`: reads a raw GPT and rewrites the A/B slot attribute bits (used by tests and tools).
//! - `qemu`: the QEMU command lines Keel boots with (used by `keelvm` and the tests' harness).
//!
//! The payload signing tool (`mkpayload`) lives in its own modules and is not touched by these.

pub mod gpt;
pub mod mkimage;
pub mod qemu;
