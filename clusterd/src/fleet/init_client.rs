//! Talking to the local init over its control socket (docs/init-api.md): one JSON object per line each way.
//!
//! Owns: the few requests the agent and the journal endpoint need (`list`, `status`, `start`, `stop`,
//! `restart`, `reload`, `logs`), with timeouts so a busy init never wedges the agent. Speaks the documented
//! protocol directly rather than linking keel-init (which would pull init's whole runtime into clusterd).
//! Does not: interpret unit states beyond decoding them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

/// A failure talking to init.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot connect to init at {path}: {source} (is init running? check --init-socket)")]
    Connect { path: String, source: std::io::Error },
    #[error("talking to init at {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("init at {path} sent something that is not a reply: {detail}")]
    Decode { path: String, detail: String },
    #[error("init refused {cmd}: {message} ({code})")]
    Refused { cmd: String, code: String, message: String },
}

/// One unit as init reports it (the fields fleet uses).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct InitUnit {
    pub name: String,
    #[serde(default)]
    pub load: String,
    #[serde(default)]
    pub active: String,
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub main_pid: Option<i64>,
}

/// A client for one init socket; every call opens its own connection.
#[derive(Debug, Clone)]
pub struct InitClient {
    pub socket: PathBuf,
    pub timeout: Duration,
}

impl InitClient {
    pub fn new(socket: &Path) -> InitClient {
        InitClient { socket: socket.to_path_buf(), timeout: Duration::from_secs(10) }
    }

    fn io(&self, source: std::io::Error) -> InitError {
        InitError::Io { path: self.socket.display().to_string(), source }
    }

    /// Send one request and return the first reply line, refusing `error` replies.
    pub fn call(&self, req: &Value) -> Result<Value, InitError> {
        let (reply, _) = self.open(req)?;
        Ok(reply)
    }

    /// Send one request; return the first reply and the open connection (for streamed replies).
    pub fn open(&self, req: &Value) -> Result<(Value, BufReader<UnixStream>), InitError> {
        let path = self.socket.display().to_string();
        let s = UnixStream::connect(&self.socket).map_err(|source| InitError::Connect { path: path.clone(), source })?;
        s.set_read_timeout(Some(self.timeout)).map_err(|e| self.io(e))?;
        s.set_write_timeout(Some(self.timeout)).map_err(|e| self.io(e))?;
        let mut line = serde_json::to_vec(req).map_err(|e| InitError::Decode { path: path.clone(), detail: e.to_string() })?;
        line.push(b'\n');
        (&s).write_all(&line).map_err(|e| self.io(e))?;
        let mut r = BufReader::new(s);
        let reply = read_reply(&mut r, &path)?;
        if reply["type"] == "error" {
            return Err(InitError::Refused {
                cmd: req["cmd"].as_str().unwrap_or("?").to_string(),
                code: reply["code"].as_str().unwrap_or("").to_string(),
                message: reply["message"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok((reply, r))
    }

    /// Every unit init knows.
    pub fn list(&self) -> Result<Vec<InitUnit>, InitError> {
        let r = self.call(&json!({"cmd": "list"}))?;
        serde_json::from_value(r["units"].clone())
            .map_err(|e| InitError::Decode { path: self.socket.display().to_string(), detail: e.to_string() })
    }

    /// Start/stop/restart without waiting for the job.
    pub fn job(&self, cmd: &str, unit: &str) -> Result<(), InitError> {
        self.call(&json!({"cmd": cmd, "unit": unit, "wait": false})).map(|_| ())
    }

    /// Re-read unit files; returns init's diagnostics.
    pub fn reload(&self) -> Result<Vec<String>, InitError> {
        let r = self.call(&json!({"cmd": "reload"}))?;
        Ok(r["diagnostics"].as_array().map(|a| a.iter().filter_map(|d| d.as_str().map(str::to_string)).collect()).unwrap_or_default())
    }

    /// `status` with the last `lines` journal lines (the raw reply).
    pub fn status(&self, unit: &str, lines: usize) -> Result<Value, InitError> {
        self.call(&json!({"cmd": "status", "unit": unit, "lines": lines}))
    }

    /// Journal records of `unit`: the last `last`, or those after sequence number `after_seq`.
    pub fn logs(&self, unit: &str, last: usize, after_seq: Option<u64>) -> Result<Vec<Value>, InitError> {
        let mut query = json!({"unit": unit});
        match after_seq {
            Some(seq) => query["after_seq"] = json!(seq),
            None => query["last"] = json!(last),
        }
        let r = self.call(&json!({"cmd": "logs", "query": query, "follow": false}))?;
        Ok(r["records"].as_array().cloned().unwrap_or_default())
    }
}

fn read_reply(r: &mut BufReader<UnixStream>, path: &str) -> Result<Value, InitError> {
    let mut line = String::new();
    let n = r.read_line(&mut line).map_err(|source| InitError::Io { path: path.to_string(), source })?;
    if n == 0 {
        return Err(InitError::Decode { path: path.to_string(), detail: "connection closed without a reply".into() });
    }
    serde_json::from_str(&line).map_err(|e| InitError::Decode { path: path.to_string(), detail: e.to_string() })
}
