//! Keel's image tooling.
//!
//! - `mkimage`: assembles the bootable disk (USR erofs, initramfs, UKIs, ESP, OEM, ROOT, GPT) — see docs/image.md.
//! - `qemu`: the QEMU command lines Keel boots with (used by `keelvm` and the tests' harness).
//!
//! The GPT reader and slot-bit writer that mkimage and the tests use is `keel_model::gpt`, shared with the
//! updater and the initramfs.
//!
//! The payload signing tool (`mkpayload`) lives in its own modules and is not touched by these.

pub mod mkimage;
pub mod qemu;
