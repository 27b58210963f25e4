//! Keel's updater: signed zstd payloads, streaming apply, A/B slots, the Omaha client and the update server.
//!
//! Module map (each module's header says what it owns and must not touch):
//! - [`payload`]: payload format, keys, build, verify, streaming apply with resume.
//! - [`slot`]: GPT priority/tries/successful bits and ESP kernel-image names, written together.
//! - [`omaha`]: Omaha v3 request/response XML as CoreOS/Flatcar speak it.
//! - [`server`]: the `updateserver` state and HTTP service.
//! - [`engine`]: the `update-engine` state machine, downloads and the local control API.
//! - [`reboot`]: the reboot manager (strategies, windows, the cluster reboot lock, drain) and `locksmithctl`'s client.

pub mod engine;
pub mod omaha;
pub mod payload;
pub mod reboot;
pub mod server;
pub mod slot;
