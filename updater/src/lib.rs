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

/// The name serde gives a unit enum variant (`UPDATED_NEED_REBOOT`, `waiting-for-lock`): the one spelling that
/// `/v1/status`, `--json` and the human output share, so `Display` impls use it rather than a second table.
pub(crate) fn serde_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A JSON reply of one of our HTTP services for a CLI: the body on success; on an HTTP error status the service's
/// own `error` text (prefixed by `who`) with the status; when no reply came, `unreachable` says what to check.
pub fn json_reply(
    reply: Result<ureq::Response, ureq::Error>,
    who: &str,
    unreachable: impl FnOnce() -> String,
) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    match reply {
        Ok(r) => Ok(r.into_json()?),
        Err(ureq::Error::Status(code, r)) => {
            let v: serde_json::Value = r.into_json().unwrap_or(serde_json::Value::Null);
            let what = v.get("error").and_then(|e| e.as_str()).unwrap_or("request failed");
            anyhow::bail!("{who}{what} (HTTP {code})")
        }
        Err(e) => Err(e).with_context(unreachable),
    }
}
