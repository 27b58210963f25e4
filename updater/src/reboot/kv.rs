//! A small client of clusterd's etcd v2 keys API: just what the reboot lock and drain need.
//!
//! Owns: GET (linearizable, clusterd's default), recursive listing, PUT with `prevIndex` (compare-and-swap) or
//! `prevExist=false` (create), DELETE, and `/v2/members`, over HTTP with ureq, trying each endpoint in turn
//! while one cannot be reached. Errors keep etcd's meaning (compare failed, already exists) so callers can
//! retry a lost race. Does not: decide anything about locks (see `lock`) or depend on clusterd's crate.

use std::io::Read;
use std::time::Duration;

use serde::Deserialize;

/// The largest body read from the KV (a recursive listing of the fleet's keys).
const MAX_BODY: u64 = 16 << 20;

/// Why a KV request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KvError {
    /// No endpoint answered.
    #[error(
        "cannot reach the KV store at {endpoints}: {reason}; is clusterd running? (see --endpoint)"
    )]
    Unreachable { endpoints: String, reason: String },
    /// `prevIndex` did not match: someone else wrote first.
    #[error("compare failed on {key}: it changed since it was read")]
    CompareFailed { key: String },
    /// `prevExist=false` on an existing key.
    #[error("{key} already exists")]
    Exists { key: String },
    /// Any other error answer.
    #[error("KV store answered HTTP {status} for {key}: {message}")]
    Http {
        key: String,
        status: u16,
        message: String,
    },
    /// An answer that is not etcd's JSON.
    #[error("KV store sent an unreadable answer for {key}: {reason}")]
    Protocol { key: String, reason: String },
}

impl KvError {
    /// True for failures worth retrying later (no endpoint, no leader, quorum timeout).
    pub fn is_transient(&self) -> bool {
        match self {
            KvError::Unreachable { .. } => true,
            KvError::Http { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// A file node: its value and the index of its last write (for compare-and-swap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvNode {
    pub key: String,
    pub value: String,
    pub modified_index: u64,
}

/// A cluster member as `/v2/members` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct KvMember {
    pub id: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Deserialize)]
struct EtcdNode {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    dir: bool,
    #[serde(default)]
    nodes: Vec<EtcdNode>,
    #[serde(rename = "modifiedIndex", default)]
    modified_index: u64,
}

#[derive(Deserialize)]
struct EtcdAnswer {
    node: EtcdNode,
}

#[derive(Deserialize, Default)]
struct EtcdErrorBody {
    #[serde(rename = "errorCode", default)]
    error_code: u32,
    #[serde(default)]
    message: String,
    #[serde(default)]
    cause: String,
}

/// The client. Cheap to clone.
#[derive(Clone)]
pub struct Kv {
    endpoints: Vec<String>,
    agent: ureq::Agent,
}

/// Percent-encodes a form or query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn flatten(n: EtcdNode, out: &mut Vec<KvNode>) {
    if n.dir {
        for c in n.nodes {
            flatten(c, out);
        }
    } else if let Some(value) = n.value {
        out.push(KvNode {
            key: n.key,
            value,
            modified_index: n.modified_index,
        });
    }
}

impl Kv {
    /// A client for `endpoints` (`http://host:port`, comma-separated lists are split).
    pub fn new(endpoints: &[String], timeout: Duration) -> Kv {
        let endpoints = endpoints
            .iter()
            .flat_map(|e| e.split(','))
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .collect();
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3).min(timeout))
            .timeout(timeout)
            .user_agent(concat!("keel-reboot-manager/", env!("CARGO_PKG_VERSION")))
            .build();
        Kv { endpoints, agent }
    }

    /// The endpoints, comma-separated (for messages).
    pub fn endpoints(&self) -> String {
        self.endpoints.join(",")
    }

    /// One request, trying each endpoint while the previous one cannot be reached.
    fn call(&self, method: &str, path: &str, form: Option<&str>) -> Result<(u16, String), KvError> {
        let mut last = String::from("no endpoint configured");
        for ep in &self.endpoints {
            let req = self.agent.request(method, &format!("{ep}{path}"));
            let r = match form {
                Some(f) => req
                    .set("Content-Type", "application/x-www-form-urlencoded")
                    .send_string(f),
                None => req.call(),
            };
            let resp = match r {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(ureq::Error::Transport(t)) => {
                    last = t.to_string();
                    continue;
                }
            };
            let status = resp.status();
            let mut body = String::new();
            resp.into_reader()
                .take(MAX_BODY)
                .read_to_string(&mut body)
                .map_err(|e| KvError::Unreachable {
                    endpoints: ep.clone(),
                    reason: format!("reading answer: {e}"),
                })?;
            return Ok((status, body));
        }
        Err(KvError::Unreachable {
            endpoints: self.endpoints(),
            reason: last,
        })
    }

    fn keys_url(key: &str) -> String {
        let key = key.trim_start_matches('/');
        let path: Vec<String> = key.split('/').map(enc).collect();
        format!("/v2/keys/{}", path.join("/"))
    }

    fn error(key: &str, status: u16, body: &str) -> KvError {
        let e: EtcdErrorBody = serde_json::from_str(body).unwrap_or_default();
        match e.error_code {
            101 => KvError::CompareFailed { key: key.into() },
            105 => KvError::Exists { key: key.into() },
            _ => KvError::Http {
                key: key.into(),
                status,
                message: if e.message.is_empty() {
                    body.trim().chars().take(200).collect()
                } else {
                    format!("{} ({})", e.message, e.cause)
                },
            },
        }
    }

    fn node(key: &str, body: &str) -> Result<EtcdNode, KvError> {
        serde_json::from_str::<EtcdAnswer>(body)
            .map(|a| a.node)
            .map_err(|e| KvError::Protocol {
                key: key.into(),
                reason: e.to_string(),
            })
    }

    /// The file at `key`, or None if it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<KvNode>, KvError> {
        let (status, body) = self.call("GET", &Kv::keys_url(key), None)?;
        match status {
            200 => {
                let n = Kv::node(key, &body)?;
                Ok(n.value.map(|value| KvNode {
                    key: key.to_string(),
                    value,
                    modified_index: n.modified_index,
                }))
            }
            404 => Ok(None),
            s => Err(Kv::error(key, s, &body)),
        }
    }

    /// Every file under the directory `dir` (recursively); empty if it does not exist.
    pub fn list(&self, dir: &str) -> Result<Vec<KvNode>, KvError> {
        let (status, body) = self.call(
            "GET",
            &format!("{}?recursive=true", Kv::keys_url(dir)),
            None,
        )?;
        match status {
            200 => {
                let mut out = Vec::new();
                flatten(Kv::node(dir, &body)?, &mut out);
                Ok(out)
            }
            404 => Ok(Vec::new()),
            s => Err(Kv::error(dir, s, &body)),
        }
    }

    fn put(&self, key: &str, form: String) -> Result<u64, KvError> {
        let (status, body) = self.call("PUT", &Kv::keys_url(key), Some(&form))?;
        match status {
            200 | 201 => Ok(Kv::node(key, &body)?.modified_index),
            s => Err(Kv::error(key, s, &body)),
        }
    }

    /// Writes `value` only if `key` was last modified at `prev_index`. Returns the new modified index.
    pub fn compare_and_swap(
        &self,
        key: &str,
        value: &str,
        prev_index: u64,
    ) -> Result<u64, KvError> {
        self.put(key, format!("value={}&prevIndex={prev_index}", enc(value)))
    }

    /// Creates `key` only if it does not exist.
    pub fn create(&self, key: &str, value: &str) -> Result<u64, KvError> {
        self.put(key, format!("value={}&prevExist=false", enc(value)))
    }

    /// Writes `value` unconditionally.
    pub fn set(&self, key: &str, value: &str) -> Result<u64, KvError> {
        self.put(key, format!("value={}", enc(value)))
    }

    /// Deletes the file `key`. Ok(false) if it did not exist.
    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        let (status, body) = self.call("DELETE", &Kv::keys_url(key), None)?;
        match status {
            200 | 204 => Ok(true),
            404 => Ok(false),
            s => Err(Kv::error(key, s, &body)),
        }
    }

    /// The cluster's members (`/v2/members`).
    pub fn members(&self) -> Result<Vec<KvMember>, KvError> {
        #[derive(Deserialize)]
        struct Members {
            members: Vec<KvMember>,
        }
        let (status, body) = self.call("GET", "/v2/members", None)?;
        if status != 200 {
            return Err(Kv::error("/v2/members", status, &body));
        }
        serde_json::from_str::<Members>(&body)
            .map(|m| m.members)
            .map_err(|e| KvError::Protocol {
                key: "/v2/members".into(),
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_per_segment() {
        assert_eq!(
            Kv::keys_url("/coreos.com/updateengine/rebootlock/semaphore"),
            "/v2/keys/coreos.com/updateengine/rebootlock/semaphore"
        );
        assert_eq!(
            Kv::keys_url("/_keel/fleet/drain/a b"),
            "/v2/keys/_keel/fleet/drain/a%20b"
        );
        assert_eq!(enc("{\"a\":1}"), "%7B%22a%22%3A1%7D");
    }

    #[test]
    fn etcd_errors_keep_their_meaning() {
        let cas = r#"{"errorCode":101,"message":"Compare failed","cause":"[1 != 2]","index":9}"#;
        assert!(matches!(
            Kv::error("/k", 412, cas),
            KvError::CompareFailed { .. }
        ));
        let exists = r#"{"errorCode":105,"message":"Key already exists","cause":"/k","index":9}"#;
        assert!(matches!(
            Kv::error("/k", 412, exists),
            KvError::Exists { .. }
        ));
        let e = Kv::error(
            "/k",
            500,
            r#"{"errorCode":300,"message":"Raft Internal Error","cause":"x"}"#,
        );
        assert!(e.is_transient());
    }

    #[test]
    fn listing_flattens_directories() {
        let body = r#"{"action":"get","node":{"key":"/a","dir":true,"nodes":[
            {"key":"/a/x","value":"1","modifiedIndex":3,"createdIndex":3},
            {"key":"/a/d","dir":true,"nodes":[{"key":"/a/d/y","value":"2","modifiedIndex":4}]}]}}"#;
        let mut out = Vec::new();
        flatten(Kv::node("/a", body).expect("node"), &mut out);
        let keys: Vec<&str> = out.iter().map(|n| n.key.as_str()).collect();
        assert_eq!(keys, ["/a/x", "/a/d/y"]);
    }
}
