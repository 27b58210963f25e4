//! The control API on init's unix socket: request and reply types (the wire format) and a blocking client.
//!
//! Owns: the protocol spoken on `/run/keel/init.sock` (documented in docs/init-api.md): one JSON object per
//! line each way. Does not: act on requests (the event loop and supervisor do; see `server`).

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::journal::{Query, Record};
use crate::supervisor::UnitStatus;
use crate::sys::PowerAction;

/// Requests longer than this are refused with an error reply (the connection is then closed).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

pub const DEFAULT_SOCKET: &str = "/run/keel/init.sock";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Ping,
    List,
    Status {
        unit: String,
        /// Recent journal lines to include.
        #[serde(default)]
        lines: usize,
    },
    Start {
        unit: String,
        /// Reply only once the job finished (default), with its result.
        #[serde(default = "yes")]
        wait: bool,
    },
    Stop {
        unit: String,
        #[serde(default = "yes")]
        wait: bool,
    },
    Restart {
        unit: String,
        #[serde(default = "yes")]
        wait: bool,
    },
    /// Re-read unit files.
    Reload,
    Enable {
        unit: String,
    },
    Disable {
        unit: String,
    },
    Logs {
        #[serde(default)]
        query: Query,
        /// Keep the connection open and stream new records as they arrive.
        #[serde(default)]
        follow: bool,
    },
    Power {
        action: PowerAction,
    },
    /// `initctl run`: create a transient container unit `run-N.service` and start it (the reply is its job).
    Run {
        spec: crate::runtime::unit::RunSpec,
    },
    /// Drop a finished transient unit.
    Forget {
        unit: String,
    },
}

fn yes() -> bool {
    true
}

/// One reply line. A `Logs` request with `follow` gets any number of `Record` lines after the first reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    Ok {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    Error {
        message: String,
        /// Machine-readable reason: `unknown-unit`, `bad-request`, `job-failed`, `permission`, `too-large`.
        code: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        suggestions: Vec<String>,
    },
    Pong {
        version: String,
        pid: i32,
        ready: bool,
    },
    Units {
        units: Vec<UnitStatus>,
    },
    Status {
        status: Box<UnitStatus>,
        #[serde(default)]
        logs: Vec<Record>,
    },
    Job {
        unit: String,
        ok: bool,
        message: String,
        /// The unit's state after the job.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<Box<UnitStatus>>,
        #[serde(default)]
        logs: Vec<Record>,
    },
    Reloaded {
        units: usize,
        diagnostics: Vec<String>,
    },
    Records {
        records: Vec<Record>,
    },
    Record {
        record: Record,
    },
}

impl Reply {
    pub fn error(code: &str, message: impl Into<String>) -> Reply {
        Reply::Error { message: message.into(), code: code.into(), suggestions: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_shape() {
        let r: Request = serde_json::from_str(r#"{"cmd":"start","unit":"web.service"}"#).unwrap();
        assert!(matches!(r, Request::Start { ref unit, wait: true } if unit == "web.service"));
        let p: Request = serde_json::from_str(r#"{"cmd":"power","action":"reboot"}"#).unwrap();
        assert!(matches!(p, Request::Power { action: PowerAction::Reboot }));
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
    }
}
