//! Falling back by itself when the health gate fails: record why, then ask init to reboot, so that the
//! boot loader and the initramfs (which follow the GPT bits and systemd-boot's counters) return to the
//! previous slot. A machine never sits on an unblessed slot waiting for someone to notice.
//!
//! Owns: `<state>/gate-failed.json` (what failed and why, read once by the fallback boot so `updatectl
//! status` can say what happened) and the `power` request to init's control socket.
//! Does not: choose the slot (the unblessed slot has no tries left, so the next boot skips it), report the
//! rollback (the fallback boot queues 3/0/44 in `boot_detect`), or reboot for an installed update (that is
//! the reboot manager's, with its strategies and locks).

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Engine;
use crate::slot::Slot;

/// What the engine does when the health gate gives up on the running slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureAction {
    /// Ask init to reboot (default): the next boot falls back to the previous slot.
    #[default]
    Reboot,
    /// Only record and report it; the fallback happens at the next reboot, whenever that is.
    Stay,
}

impl std::str::FromStr for FailureAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reboot" => Ok(FailureAction::Reboot),
            "stay" | "none" => Ok(FailureAction::Stay),
            _ => Err(format!("{s:?}: expected reboot or stay")),
        }
    }
}

/// The record a failed gate leaves for the fallback boot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GateFailure {
    /// The version whose slot failed.
    pub version: String,
    pub slot: Slot,
    pub reason: String,
    /// Unix time of the failure.
    pub at: u64,
}

const RECORD: &str = "gate-failed.json";

impl Engine {
    /// The gate failed on `active`: record it, and unless configured to stay, reboot through init when the
    /// other slot can still boot (without one, a reboot would only come back here).
    pub(crate) fn fall_back(&self, active: Slot, reason: &str) {
        let record = GateFailure {
            version: self.cfg.running_version.clone(),
            slot: active,
            reason: reason.to_string(),
            at: super::now(),
        };
        if let Ok(b) = serde_json::to_vec(&record) {
            let _ = std::fs::create_dir_all(&self.cfg.state_dir);
            let _ = crate::payload::apply::write_durable(&self.cfg.state_dir.join(RECORD), &b);
        }
        eprintln!("update-engine: health gate failed on {active} ({}): {reason}", self.cfg.running_version);
        if self.cfg.health.on_failure == FailureAction::Stay {
            return;
        }
        let other_ok = self.slots().flags(active.other()).map(|f| f.bootable()).unwrap_or(false);
        let note = if !other_ok {
            format!("; not rebooting: {} cannot boot either (priority 0, or no tries and not successful)", active.other())
        } else {
            match ask_init_power(&self.cfg.health.init_socket, "reboot") {
                Ok(()) => format!("; rebooting to fall back to {}", active.other()),
                Err(e) => format!("; could not ask init to reboot ({e}): reboot to fall back to {}", active.other()),
            }
        };
        eprintln!("update-engine: {}", note.trim_start_matches("; "));
        self.set(|s| {
            if let Some(e) = s.last_error.as_mut() {
                e.push_str(&note);
            }
        });
    }

    /// Read and remove the record of a gate failure (the fallback boot calls this once).
    pub(crate) fn take_gate_failure(&self) -> Option<GateFailure> {
        let p = self.cfg.state_dir.join(RECORD);
        let rec = std::fs::read(&p).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let _ = std::fs::remove_file(&p);
        rec
    }
}

/// Sends `{"cmd":"power","action":ACTION}` to init (docs/init-api.md) and checks the answer.
pub fn ask_init_power(socket: &Path, action: &str) -> Result<(), String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach init at {}: {e}", socket.display()))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    s.write_all(format!("{{\"cmd\":\"power\",\"action\":\"{action}\"}}\n").as_bytes())
        .map_err(|e| format!("writing to init: {e}"))?;
    let mut line = String::new();
    std::io::BufReader::new(s.take(1 << 20))
        .read_line(&mut line)
        .map_err(|e| format!("reading init's answer: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("init answered non-JSON: {e}"))?;
    match v["type"].as_str() {
        Some("ok") => Ok(()),
        _ => Err(format!("init answered {}", line.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_action_parses() {
        assert_eq!("reboot".parse(), Ok(FailureAction::Reboot));
        assert_eq!("stay".parse(), Ok(FailureAction::Stay));
        assert!("later".parse::<FailureAction>().is_err());
    }

    #[test]
    fn power_request_is_one_json_line_and_needs_ok() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("init.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().expect("accept");
            let mut line = String::new();
            std::io::BufReader::new(&c).read_line(&mut line).expect("read");
            c.write_all(b"{\"type\":\"ok\",\"message\":\"rebooting\"}\n").expect("write");
            line
        });
        assert_eq!(ask_init_power(&sock, "reboot"), Ok(()));
        let got: serde_json::Value = serde_json::from_str(&t.join().expect("join")).expect("json");
        assert_eq!(got, serde_json::json!({"cmd": "power", "action": "reboot"}));
        assert!(ask_init_power(&dir.path().join("none.sock"), "reboot").is_err());
    }
}
