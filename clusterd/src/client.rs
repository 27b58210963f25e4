//! A small blocking HTTP/1.1 client for the keys API, used by `clusterctl` and the tests.
//!
//! Owns: one request per connection (`Connection: close`), chunked and length-delimited bodies, timeouts,
//! trying several endpoints in turn. Does not: pool connections or speak TLS.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// A client-side failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad URL.
    #[error("invalid endpoint URL {0:?} (expected http://host:port)")]
    Url(String),
    /// Could not connect: the request was certainly not delivered.
    #[error("{url}: cannot connect: {source}")]
    Connect {
        /// Endpoint.
        url: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Connection or I/O failure after connecting (the request may have been delivered).
    #[error("{url}: {source}")]
    Io {
        /// Endpoint.
        url: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Connected, but no answer within the timeout (the request may have been delivered and may still
    /// take effect: a write forwarded to a leader that froze, say).
    #[error("{url}: no answer within {after:?}")]
    TimedOut {
        /// Endpoint.
        url: String,
        /// The timeout.
        after: Duration,
    },
    /// Malformed answer.
    #[error("{url}: malformed HTTP response: {detail}")]
    Protocol {
        /// Endpoint.
        url: String,
        /// What was wrong.
        detail: String,
    },
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Body text.
    pub body: String,
}

impl HttpResponse {
    /// First header value by (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    /// Body as JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }
}

/// Percent-encode a form/query value.
pub fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Perform one request. `url` is `http://host:port/path?query`; `form` is sent as a urlencoded body.
pub fn request(method: &str, url: &str, form: Option<&str>, timeout: Duration) -> Result<HttpResponse, ClientError> {
    request_with(method, url, form.map(|f| ("application/x-www-form-urlencoded", f)), timeout)
}

/// Perform one request with an explicit body content type.
pub fn request_with(method: &str, url: &str, body: Option<(&str, &str)>, timeout: Duration) -> Result<HttpResponse, ClientError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| ClientError::Url(url.into()))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ClientError::TimedOut { url: url.to_string(), after: timeout },
        _ => ClientError::Io { url: url.to_string(), source },
    };
    let addr = host.to_socket_addrs().map_err(io)?.next().ok_or_else(|| ClientError::Url(url.into()))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout.min(Duration::from_secs(3)))
        .map_err(|source| ClientError::Connect { url: url.to_string(), source })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let _ = s.set_nodelay(true);
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some((ct, f)) = body {
        req.push_str(&format!("Content-Type: {ct}\r\nContent-Length: {}\r\n", f.len()));
    } else if matches!(method, "PUT" | "POST" | "DELETE") {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    if let Some((_, f)) = body {
        req.push_str(f);
    }
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut r = BufReader::new(s);
    let proto = |d: &str| ClientError::Protocol { url: url.to_string(), detail: d.to_string() };
    let mut line = String::new();
    r.read_line(&mut line).map_err(io)?;
    let status: u16 = line.split_whitespace().nth(1).and_then(|x| x.parse().ok()).ok_or_else(|| proto(&line))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).map_err(io)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if method == "HEAD" || status == 204 || status == 304 {
    } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            line.clear();
            r.read_line(&mut line).map_err(io)?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).map_err(|_| proto("chunk size"))?;
            if n == 0 {
                break;
            }
            let mut buf = vec![0; n];
            r.read_exact(&mut buf).map_err(io)?;
            body.extend_from_slice(&buf);
            line.clear();
            r.read_line(&mut line).map_err(io)?;
            // A watch answers with exactly one event: stop after the first chunk.
            if body.ends_with(b"\n") {
                break;
            }
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body).map_err(io)?;
    } else {
        r.read_to_end(&mut body).map_err(io)?;
    }
    Ok(HttpResponse { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

/// Try `endpoints` in order until one answers (connection errors move on to the next).
pub fn request_any(
    endpoints: &[String],
    method: &str,
    path: &str,
    form: Option<&str>,
    timeout: Duration,
) -> Result<HttpResponse, ClientError> {
    let mut last = ClientError::Url("no endpoints given".into());
    for ep in endpoints {
        match request(method, &format!("{}{}", ep.trim_end_matches('/'), path), form, timeout) {
            Ok(r) => return Ok(r),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Send a JSON body to the first endpoint that answers.
pub fn request_json_any(endpoints: &[String], method: &str, path: &str, json: &str, timeout: Duration) -> Result<HttpResponse, ClientError> {
    let mut last = ClientError::Url("no endpoints given".into());
    for ep in endpoints {
        match request_with(method, &format!("{}{}", ep.trim_end_matches('/'), path), Some(("application/json", json)), timeout) {
            Ok(r) => return Ok(r),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_accepts_but_never_answers_is_reported_as_a_timeout() {
        // Like a SIGSTOPped member: the kernel accepts the connection, nobody reads it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/v2/keys/a", listener.local_addr().expect("addr"));
        let e = request("PUT", &url, Some("value=1"), Duration::from_millis(200)).expect_err("no answer");
        assert!(matches!(e, ClientError::TimedOut { .. }), "{e:?}");
        assert_eq!(e.to_string(), format!("{url}: no answer within 200ms"));
    }
}
