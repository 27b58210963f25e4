//! Cluster discovery, like discovery.etcd.io: a token names a cluster of N members; members register their
//! name and peer URL under it; once N have registered, each of them knows the initial cluster.
//!
//! Owns: the discovery service ([`serve`], `clusterd discovery`) and the member side ([`join`], `--discovery`).
//! The service keeps tokens in memory (a discovery service is a bootstrap aid, not a store of record).
//! Protocol: `GET /new?size=N` → `<public-url>/<token>`; `PUT /<token>/<name>` with form `value=<peer-url>`
//! → 201 (409 if the cluster is already full); `GET /<token>` → `{"size":N,"members":[{"name","peerURL"}]}`;
//! `DELETE /<token>/<name>` removes a stale entry.
//! Tokens are 128 random bits and live 7 days; the service keeps at most [`MAX_TOKENS`] tokens and
//! [`MAX_MEMBERS`] members (503 beyond), so no client can grow its memory without bound.
//! Does not: store anything durable or take part in Raft.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

/// A registered member.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Registered {
    /// Member name.
    pub name: String,
    /// Peer URL.
    #[serde(rename = "peerURL")]
    pub peer_url: String,
}

/// State of one token.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct TokenState {
    /// Expected cluster size.
    pub size: usize,
    /// Members in registration order.
    pub members: Vec<Registered>,
}

/// Discovery failures (member side).
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The service could not be reached or answered badly.
    #[error("discovery service {url}: {detail}")]
    Service {
        /// Token URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The cluster filled up without this member.
    #[error("discovery token {url} is full ({size} members) and {name:?} is not one of them; remove a stale entry with DELETE {url}/<name>")]
    Full {
        /// Token URL.
        url: String,
        /// Size.
        size: usize,
        /// This member.
        name: String,
    },
}

/// How long a token lives: long enough to bootstrap a cluster, short enough that abandoned tokens go.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Live tokens at most; `GET /new` beyond that answers 503 until some expire.
pub const MAX_TOKENS: usize = 10_000;
/// Registered members at most, over all tokens.
pub const MAX_MEMBERS: usize = 100_000;
/// Longest member name accepted, bytes.
pub const MAX_NAME: usize = 64;
/// Longest peer URL accepted, bytes.
pub const MAX_URL: usize = 256;

/// The service's tokens, with the limits that keep its memory bounded whatever clients send.
#[derive(Debug)]
pub struct Registry {
    tokens: HashMap<String, (std::time::Instant, TokenState)>,
    members: usize,
    max_tokens: usize,
    max_members: usize,
    lifetime: Duration,
}

impl Registry {
    /// An empty registry with these limits.
    pub fn new(max_tokens: usize, max_members: usize, lifetime: Duration) -> Registry {
        Registry { tokens: HashMap::new(), members: 0, max_tokens, max_members, lifetime }
    }

    /// Forget tokens older than the lifetime.
    fn expire(&mut self, now: std::time::Instant) {
        let lifetime = self.lifetime;
        let mut gone = 0;
        self.tokens.retain(|_, (born, st)| {
            let keep = now.duration_since(*born) < lifetime;
            if !keep {
                gone += st.members.len();
            }
            keep
        });
        self.members -= gone;
    }

    /// A new token for a cluster of `size`: 128 random bits, hex, like discovery.etcd.io's. A guessable token
    /// would let anyone register members into someone else's cluster.
    fn create(&mut self, size: usize, now: std::time::Instant) -> Result<String, (u16, String)> {
        if size == 0 || size > 99 {
            return Err((400, "size must be between 1 and 99\n".into()));
        }
        self.expire(now);
        if self.tokens.len() >= self.max_tokens {
            return Err((503, format!("{{\"message\":\"{} tokens are open, the most this service keeps; try again later\"}}\n", self.tokens.len())));
        }
        let mut raw = [0u8; 16];
        rustix::rand::getrandom(&mut raw, rustix::rand::GetRandomFlags::empty())
            .map_err(|e| (500, format!("{{\"message\":\"no randomness for a token: {e}\"}}\n")))?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        self.tokens.insert(token.clone(), (now, TokenState { size, members: Vec::new() }));
        Ok(token)
    }

    /// Register (or move) `name` at `url` under `token`.
    fn register(&mut self, token: &str, name: &str, url: Option<String>, now: std::time::Instant) -> (u16, String) {
        self.expire(now);
        let Some(url) = url.filter(|u| u.starts_with("http://") && u.len() <= MAX_URL) else {
            return (400, format!("{{\"message\":\"value must be the member's peer URL (http://..., at most {MAX_URL} bytes)\"}}\n"));
        };
        if name.len() > MAX_NAME {
            return (400, format!("{{\"message\":\"member name longer than {MAX_NAME} bytes\"}}\n"));
        }
        let full = self.members >= self.max_members;
        let Some((_, s)) = self.tokens.get_mut(token) else { return not_found() };
        if let Some(m) = s.members.iter_mut().find(|m| m.name == name) {
            m.peer_url = url;
            return (200, state_json(s));
        }
        if s.members.len() >= s.size {
            return (409, "{\"message\":\"cluster is full\"}\n".into());
        }
        if full {
            return (503, "{\"message\":\"this service holds as many members as it keeps; try again later\"}\n".into());
        }
        s.members.push(Registered { name: name.to_string(), peer_url: url });
        let body = state_json(s);
        self.members += 1;
        (201, body)
    }

    /// Remove a stale entry.
    fn remove(&mut self, token: &str, name: &str) -> (u16, String) {
        let Some((_, s)) = self.tokens.get_mut(token) else { return not_found() };
        let before = s.members.len();
        s.members.retain(|m| m.name != name);
        if s.members.len() == before {
            return (404, "{\"message\":\"no such member\"}\n".into());
        }
        let body = state_json(s);
        self.members -= 1;
        (200, body)
    }

    fn get(&mut self, token: &str, now: std::time::Instant) -> (u16, String) {
        self.expire(now);
        match self.tokens.get(token) {
            Some((_, s)) => (200, state_json(s)),
            None => not_found(),
        }
    }
}

fn state_json(s: &TokenState) -> String {
    format!("{}\n", serde_json::to_string(s).unwrap_or_default())
}

fn not_found() -> (u16, String) {
    (404, "{\"message\":\"unknown discovery token (tokens expire after 7 days)\"}\n".into())
}

type Tokens = Arc<Mutex<Registry>>;

fn reply(status: u16, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", if body.starts_with('{') { "application/json" } else { "text/plain" })
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

async fn handle(tokens: Tokens, public: String, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().trim_matches('/').to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return reply(400, format!("reading body: {e}\n")),
    };
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let Ok(mut t) = tokens.lock() else { return reply(500, "lock poisoned\n".into()) };
    let now = std::time::Instant::now();
    let (status, body) = match (method.as_str(), parts.as_slice()) {
        ("GET", ["new"]) => {
            let size = form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "size")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(3);
            match t.create(size, now) {
                Ok(token) => (200, format!("{}/{token}\n", public.trim_end_matches('/'))),
                Err(e) => e,
            }
        }
        ("GET", [token]) => t.get(token, now),
        ("PUT", [token, name]) => {
            let url = form_urlencoded::parse(&body).chain(form_urlencoded::parse(query.as_bytes())).find(|(k, _)| k == "value").map(|(_, v)| v.into_owned());
            t.register(token, name, url, now)
        }
        ("DELETE", [token, name]) => t.remove(token, name),
        _ => (404, "{\"message\":\"not found; try GET /new?size=3\"}\n".into()),
    };
    reply(status, body)
}

/// Serve the discovery service on `addr`; token URLs are built from `public_url`. Connections beyond the
/// client budget of [`crate::connections`] are closed unread, and a failed `accept` (out of descriptors) is
/// logged and retried: a flood of connections or tokens slows the service down but cannot stop it.
pub async fn serve(addr: SocketAddr, public_url: String) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let tokens: Tokens = Arc::new(Mutex::new(Registry::new(MAX_TOKENS, MAX_MEMBERS, TOKEN_LIFETIME)));
    let limits = crate::connections::Limits::within(crate::connections::nofile_limit(), 1);
    let budgets = crate::connections::Budgets::new(limits);
    loop {
        let (stream, _, admitted) = crate::connections::accept(&listener, &budgets, false, |_, _| crate::api::access::Access::Full).await;
        let (tokens, public) = (tokens.clone(), public_url.clone());
        tokio::spawn(async move {
            let _admitted = admitted;
            let svc = hyper::service::service_fn(move |req| {
                let (tokens, public) = (tokens.clone(), public.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(tokens, public, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// Register `name`/`peer_url` under the token URL and wait (up to `timeout`) until the cluster is complete.
/// Returns the initial cluster, `name → peer URL`.
pub fn join(token_url: &str, name: &str, peer_url: &str, timeout: Duration) -> Result<Vec<Registered>, DiscoveryError> {
    use crate::client::{enc, request};
    let err = |detail: String| DiscoveryError::Service { url: token_url.to_string(), detail };
    let url = token_url.trim_end_matches('/');
    let r = request("PUT", &format!("{url}/{}", enc(name)), Some(&format!("value={}", enc(peer_url))), Duration::from_secs(5))
        .map_err(|e| err(e.to_string()))?;
    let deadline = std::time::Instant::now() + timeout;
    let state: TokenState = if r.status == 409 {
        serde_json::from_str(&request("GET", url, None, Duration::from_secs(5)).map_err(|e| err(e.to_string()))?.body)
            .map_err(|e| err(e.to_string()))?
    } else if r.status >= 400 {
        return Err(err(format!("registration refused ({}): {}", r.status, r.body.trim())));
    } else {
        serde_json::from_str(&r.body).map_err(|e| err(e.to_string()))?
    };
    let mut state = state;
    loop {
        if state.members.len() >= state.size {
            let members: Vec<Registered> = state.members.iter().take(state.size).cloned().collect();
            if !members.iter().any(|m| m.name == name) {
                return Err(DiscoveryError::Full { url: url.to_string(), size: state.size, name: name.to_string() });
            }
            return Ok(members);
        }
        if std::time::Instant::now() > deadline {
            return Err(err(format!("only {} of {} members registered before the timeout", state.members.len(), state.size)));
        }
        std::thread::sleep(Duration::from_millis(200));
        let r = request("GET", url, None, Duration::from_secs(5)).map_err(|e| err(e.to_string()))?;
        state = serde_json::from_str(&r.body).map_err(|e| err(format!("{e}: {}", r.body.trim())))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn url(i: usize) -> Option<String> {
        Some(format!("http://10.0.0.{i}:2380"))
    }

    #[test]
    fn tokens_are_random_128_bit_hex() {
        let mut r = Registry::new(10, 10, TOKEN_LIFETIME);
        let (a, b) = (r.create(3, Instant::now()).expect("token"), r.create(3, Instant::now()).expect("token"));
        assert_eq!(a.len(), 32, "{a}");
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
        assert_eq!(r.create(0, Instant::now()).unwrap_err().0, 400);
        assert_eq!(r.create(100, Instant::now()).unwrap_err().0, 400);
    }

    #[test]
    fn a_cluster_fills_up_and_stale_entries_can_be_removed() {
        let now = Instant::now();
        let mut r = Registry::new(10, 10, TOKEN_LIFETIME);
        let t = r.create(2, now).expect("token");
        assert_eq!(r.register(&t, "a", url(1), now).0, 201);
        assert_eq!(r.register(&t, "a", url(9), now).0, 200, "re-registering moves the entry");
        assert_eq!(r.register(&t, "b", url(2), now).0, 201);
        assert_eq!(r.register(&t, "c", url(3), now).0, 409);
        assert_eq!(r.remove(&t, "b").0, 200);
        assert_eq!(r.register(&t, "c", url(3), now).0, 201);
        let (s, body) = r.get(&t, now);
        assert!(s == 200 && body.contains("10.0.0.9") && body.contains("\"c\""), "{body}");
        assert_eq!(r.register("nope", "a", url(1), now).0, 404);
    }

    #[test]
    fn bad_or_oversized_entries_are_refused() {
        let now = Instant::now();
        let mut r = Registry::new(10, 10, TOKEN_LIFETIME);
        let t = r.create(3, now).expect("token");
        assert_eq!(r.register(&t, "a", None, now).0, 400);
        assert_eq!(r.register(&t, "a", Some("https://x".into()), now).0, 400);
        assert_eq!(r.register(&t, "a", Some(format!("http://{}", "x".repeat(MAX_URL))), now).0, 400);
        assert_eq!(r.register(&t, &"n".repeat(MAX_NAME + 1), url(1), now).0, 400);
        assert_eq!(r.members, 0);
    }

    #[test]
    fn memory_is_bounded_by_the_caps_and_tokens_expire() {
        let now = Instant::now();
        let mut r = Registry::new(2, 3, Duration::from_secs(60));
        let t1 = r.create(3, now).expect("token");
        let t2 = r.create(3, now).expect("token");
        assert_eq!(r.create(3, now).unwrap_err().0, 503, "token cap");
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            assert_eq!(r.register(&t1, name, url(i), now).0, 201);
        }
        assert_eq!(r.register(&t2, "d", url(4), now).0, 503, "member cap over all tokens");
        // A minute later both tokens are gone, with their members, and new ones can be made.
        let later = now + Duration::from_secs(61);
        assert_eq!(r.get(&t1, later).0, 404);
        assert_eq!(r.members, 0);
        let t3 = r.create(3, later).expect("room again");
        assert_eq!(r.register(&t3, "a", url(1), later).0, 201);
    }
}
