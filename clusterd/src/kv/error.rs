//! etcd v2 error codes and their wire form.
//!
//! Owns: [`EtcdError`] (code, cause, index), the message text of every code and its HTTP status, exactly as
//! etcd 3.4 prints them (`{"errorCode":100,"message":"Key not found","cause":"/k","index":5}`).
//! Does not: decide when an error happens (see `store` and `api::params`).

use serde::{Deserialize, Serialize};

/// Error codes of the etcd v2 API that Keel produces.
pub mod code {
    /// Key not found (404).
    pub const KEY_NOT_FOUND: u32 = 100;
    /// Compare failed (412).
    pub const TEST_FAILED: u32 = 101;
    /// Not a file (403).
    pub const NOT_FILE: u32 = 102;
    /// Not a directory (400).
    pub const NOT_DIR: u32 = 104;
    /// Key already exists (412).
    pub const NODE_EXIST: u32 = 105;
    /// Root is read only (400).
    pub const ROOT_RONLY: u32 = 107;
    /// Directory not empty (403).
    pub const DIR_NOT_EMPTY: u32 = 108;
    /// The request requires user authentication (401): a container writing a host-only key.
    pub const UNAUTHORIZED: u32 = 110;
    /// Value is Required in POST form.
    pub const VALUE_REQUIRED: u32 = 200;
    /// PrevValue is Required in POST form.
    pub const PREV_VALUE_REQUIRED: u32 = 201;
    /// The given TTL in POST form is not a number.
    pub const TTL_NAN: u32 = 202;
    /// The given index in POST form is not a number.
    pub const INDEX_NAN: u32 = 203;
    /// Invalid field.
    pub const INVALID_FIELD: u32 = 209;
    /// Invalid POST form.
    pub const INVALID_FORM: u32 = 210;
    /// Value provided on refresh.
    pub const REFRESH_VALUE: u32 = 211;
    /// A TTL must be provided on refresh.
    pub const REFRESH_TTL_REQUIRED: u32 = 212;
    /// Raft Internal Error (500).
    pub const RAFT_INTERNAL: u32 = 300;
    /// During Leader Election (500).
    pub const LEADER_ELECT: u32 = 301;
    /// The event in requested index is outdated and cleared (400).
    pub const EVENT_INDEX_CLEARED: u32 = 401;
}

/// An etcd v2 API error: what the client sees as `{"errorCode","message","cause","index"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("etcd error {code} ({}): {cause} [index {index}]", message(*code))]
pub struct EtcdError {
    /// The etcd error code, see [`code`].
    pub code: u32,
    /// The key or condition involved (etcd's `cause`).
    pub cause: String,
    /// The store index when the error happened (0 for request-parsing errors, as etcd does).
    pub index: u64,
}

/// etcd's message for an error code.
pub fn message(code: u32) -> &'static str {
    match code {
        100 => "Key not found",
        101 => "Compare failed",
        102 => "Not a file",
        103 => "Reached the max number of peers in the cluster",
        104 => "Not a directory",
        105 => "Key already exists",
        107 => "Root is read only",
        108 => "Directory not empty",
        110 => "The request requires user authentication",
        200 => "Value is Required in POST form",
        201 => "PrevValue is Required in POST form",
        202 => "The given TTL in POST form is not a number",
        203 => "The given index in POST form is not a number",
        209 => "Invalid field",
        210 => "Invalid POST form",
        211 => "Value provided on refresh",
        212 => "A TTL must be provided on refresh",
        300 => "Raft Internal Error",
        301 => "During Leader Election",
        400 => "watcher is cleared due to etcd recovery",
        401 => "The event in requested index is outdated and cleared",
        _ => "Unknown error",
    }
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "errorCode")]
    code: u32,
    message: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    cause: &'a str,
    index: u64,
}

impl EtcdError {
    /// Build an error.
    pub fn new(code: u32, cause: impl Into<String>, index: u64) -> Self {
        EtcdError { code, cause: cause.into(), index }
    }

    /// HTTP status etcd uses for this code (everything not listed is 400).
    pub fn status(&self) -> u16 {
        match self.code {
            100 => 404,
            102 | 108 => 403,
            110 => 401,
            101 | 105 => 412,
            300 | 301 => 500,
            _ => 400,
        }
    }

    /// The JSON body, with etcd's trailing newline.
    pub fn to_json(&self) -> String {
        let w = Wire { code: self.code, message: message(self.code), cause: &self.cause, index: self.index };
        let mut s = serde_json::to_string(&w).unwrap_or_default();
        s.push('\n');
        s
    }
}
