//! Parsing of `/v2/keys` requests: URL path, query string and form body into a [`KeysRequest`].
//!
//! Owns: etcd's parameter rules (which field is a bool, uint or string, which combination is refused and with
//! which error code), the body size limit and the strict form decoder (a bad `%` escape is an error, as in Go).
//! Does not: touch the store or Raft; everything here is pure and unit-tested.

use crate::kv::error::{code, EtcdError};
use crate::kv::store::{clean_key, KvOp, OpKind};

/// Largest accepted request body (form), in bytes. Larger bodies get HTTP 413.
pub const MAX_BODY: usize = 1024 * 1024;
/// Longest accepted key, in bytes.
pub const MAX_KEY: usize = 8 * 1024;

/// A parsed keys request.
#[derive(Debug, Clone, PartialEq)]
pub enum KeysRequest {
    /// GET/HEAD without `wait`.
    Get {
        /// Cleaned key.
        key: String,
        /// `recursive=true`.
        recursive: bool,
        /// `sorted=true`.
        sorted: bool,
        /// Linearizable (default) or local (`quorum=false`, or `serializable=true`).
        linearizable: bool,
        /// HEAD: headers only.
        head: bool,
    },
    /// GET with `wait=true`.
    Watch {
        /// Cleaned key.
        key: String,
        /// Watch the subtree.
        recursive: bool,
        /// First index of interest (`waitIndex`); `None` = next event.
        wait_index: Option<u64>,
        /// `stream=true`: keep the response open and send every event as its own JSON line.
        stream: bool,
    },
    /// A write, to be replicated.
    Write(KvOp),
}

/// The request parameters: body values first, then query values (Go's `r.Form` order).
#[derive(Debug, Default)]
pub struct Form {
    pairs: Vec<(String, String)>,
}

fn check_escapes(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let ok = b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
            if !ok {
                let end = (i + 3).min(b.len());
                return Err(format!("invalid URL escape \"{}\"", String::from_utf8_lossy(&b[i..end])));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

impl Form {
    /// Decode `body` (if it is a form) followed by `query`. Bad escapes give etcd's 210 Invalid POST form.
    pub fn parse(query: &str, body: Option<&[u8]>) -> Result<Form, EtcdError> {
        let mut pairs = Vec::new();
        if let Some(body) = body {
            let text = std::str::from_utf8(body)
                .map_err(|_| EtcdError::new(code::INVALID_FORM, "form body is not valid UTF-8", 0))?;
            check_escapes(text).map_err(|e| EtcdError::new(code::INVALID_FORM, e, 0))?;
            pairs.extend(form_urlencoded::parse(text.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())));
        }
        check_escapes(query).map_err(|e| EtcdError::new(code::INVALID_FORM, e, 0))?;
        pairs.extend(form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())));
        Ok(Form { pairs })
    }

    /// First value of `k`, if present.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.pairs.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str())
    }

    fn bool(&self, k: &str) -> Result<Option<bool>, EtcdError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v {
                "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(Some(true)),
                "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(Some(false)),
                _ => Err(EtcdError::new(code::INVALID_FIELD, format!("invalid value for \"{k}\""), 0)),
            },
        }
    }

    fn uint(&self, k: &str, c: u32) -> Result<Option<u64>, EtcdError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .parse::<u64>()
                .map(Some)
                .map_err(|_| EtcdError::new(c, format!("invalid value for \"{k}\""), 0)),
        }
    }
}

/// Percent-decode a URL path (no `+` handling, as in URL paths).
pub fn decode_path(p: &str) -> Result<String, EtcdError> {
    check_escapes(p).map_err(|e| EtcdError::new(code::INVALID_FORM, e, 0))?;
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).unwrap_or("00");
            out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| EtcdError::new(code::INVALID_FORM, "key is not valid UTF-8", 0))
}

/// Parse a keys request. `key_path` is the URL path after `/v2/keys` (still percent-encoded).
pub fn parse(method: &str, key_path: &str, query: &str, form_body: Option<&[u8]>) -> Result<KeysRequest, EtcdError> {
    let raw = decode_path(key_path)?;
    if raw.len() > MAX_KEY {
        return Err(EtcdError::new(code::INVALID_FIELD, format!("key longer than {MAX_KEY} bytes"), 0));
    }
    if raw.contains('\0') {
        return Err(EtcdError::new(code::INVALID_FIELD, "key contains a NUL byte", 0));
    }
    let key = clean_key(&raw).ok_or_else(|| EtcdError::new(code::INVALID_FIELD, "key climbs above the root", 0))?;
    let f = Form::parse(query, form_body)?;

    let prev_index = f.uint("prevIndex", code::INDEX_NAN)?;
    let wait_index = f.uint("waitIndex", code::INDEX_NAN)?;
    let recursive = f.bool("recursive")?.unwrap_or(false);
    let sorted = f.bool("sorted")?.unwrap_or(false);
    let wait = f.bool("wait")?.unwrap_or(false);
    let dir = f.bool("dir")?.unwrap_or(false);
    let quorum = f.bool("quorum")?;
    let stream = f.bool("stream")?.unwrap_or(false);
    if wait && method != "GET" {
        return Err(EtcdError::new(code::INVALID_FIELD, "\"wait\" can only be used with GET requests", 0));
    }
    let prev_value = f.get("prevValue");
    if prev_value == Some("") {
        return Err(EtcdError::new(code::PREV_VALUE_REQUIRED, "\"prevValue\" cannot be empty", 0));
    }
    let _ = f.bool("noValueOnSuccess")?;
    let ttl = match f.get("ttl") {
        Some(t) if !t.is_empty() => {
            Some(t.parse::<u64>().map_err(|_| EtcdError::new(code::TTL_NAN, "invalid value for \"ttl\"", 0))?)
        }
        _ => None,
    };
    let prev_exist = match f.get("prevExist") {
        None => None,
        Some(_) => Some(
            f.bool("prevExist").map_err(|_| EtcdError::new(code::INVALID_FIELD, "invalid value for prevExist", 0))?.unwrap_or(false),
        ),
    };
    let refresh = match f.get("refresh") {
        None => false,
        Some(_) => f.bool("refresh").map_err(|_| EtcdError::new(code::INVALID_FIELD, "invalid value for refresh", 0))?.unwrap_or(false),
    };
    if refresh {
        if f.get("value").is_some_and(|v| !v.is_empty()) {
            return Err(EtcdError::new(code::REFRESH_VALUE, "A value was provided on a refresh", 0));
        }
        if ttl.is_none() {
            return Err(EtcdError::new(code::REFRESH_TTL_REQUIRED, "No TTL value set", 0));
        }
    }
    let serializable = f.bool("serializable").ok().flatten().unwrap_or(false);

    let op = |kind| KvOp {
        kind,
        key: key.clone(),
        value: f.get("value").unwrap_or("").to_string(),
        dir,
        prev_exist,
        prev_value: prev_value.unwrap_or("").to_string(),
        prev_index: prev_index.unwrap_or(0),
        ttl,
        refresh,
        recursive,
    };
    Ok(match method {
        // waitIndex=0 means "from now on", as in etcd.
        "GET" | "HEAD" if wait => KeysRequest::Watch { key, recursive, wait_index: wait_index.filter(|i| *i > 0), stream },
        "GET" | "HEAD" => KeysRequest::Get {
            key,
            recursive,
            sorted,
            linearizable: quorum.unwrap_or(true) && !serializable,
            head: method == "HEAD",
        },
        "PUT" => KeysRequest::Write(op(OpKind::Put)),
        "POST" => KeysRequest::Write(op(OpKind::Post)),
        "DELETE" => KeysRequest::Write(op(OpKind::Delete)),
        _ => return Err(EtcdError::new(code::INVALID_FIELD, format!("method {method} not allowed"), 0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_escape_is_invalid_form() {
        let e = parse("PUT", "/k", "", Some(b"value=%zz")).err();
        assert_eq!(e.map(|e| e.code), Some(code::INVALID_FORM));
        let e = parse("GET", "/k", "recursive=%", None).err();
        assert_eq!(e.map(|e| e.code), Some(code::INVALID_FORM));
    }

    #[test]
    fn body_wins_over_query() {
        let r = parse("PUT", "/k", "value=q", Some(b"value=b")).ok();
        match r {
            Some(KeysRequest::Write(op)) => assert_eq!(op.value, "b"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn key_is_cleaned_and_checked() {
        assert!(parse("GET", "/a/../../b", "", None).is_err());
        match parse("GET", "//a//b/", "", None) {
            Ok(KeysRequest::Get { key, .. }) => assert_eq!(key, "/a/b"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
