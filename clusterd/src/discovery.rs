//! Cluster discovery, like discovery.etcd.io: a token names a cluster of N members; members register their
//! name and peer URL under it; once N have registered, each of them knows the initial cluster.
//!
//! Owns: the discovery service ([`serve`], `clusterd discovery`) and the member side ([`join`], `--discovery`).
//! The service keeps tokens in memory (a discovery service is a bootstrap aid, not a store of record).
//! Protocol: `GET /new?size=N` → `<public-url>/<token>`; `PUT /<token>/<name>` with form `value=<peer-url>`
//! → 201 (409 if the cluster is already full); `GET /<token>` → `{"size":N,"members":[{"name","peerURL"}]}`;
//! `DELETE /<token>/<name>` removes a stale entry.
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

type Tokens = Arc<Mutex<HashMap<String, TokenState>>>;

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
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["new"]) => {
            let size = form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "size")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(3);
            if size == 0 || size > 99 {
                return reply(400, "size must be between 1 and 99\n".into());
            }
            let token = format!(
                "{:016x}",
                crate::raft::fnv64(&[&crate::kv::time::now_nanos().to_string(), &t.len().to_string(), &std::process::id().to_string()])
            );
            t.insert(token.clone(), TokenState { size, members: Vec::new() });
            reply(200, format!("{}/{token}\n", public.trim_end_matches('/')))
        }
        ("GET", [token]) => match t.get(*token) {
            Some(s) => reply(200, format!("{}\n", serde_json::to_string(s).unwrap_or_default())),
            None => reply(404, "{\"message\":\"unknown discovery token\"}\n".into()),
        },
        ("PUT", [token, name]) => {
            let Some(s) = t.get_mut(*token) else { return reply(404, "{\"message\":\"unknown discovery token\"}\n".into()) };
            let url = form_urlencoded::parse(&body).chain(form_urlencoded::parse(query.as_bytes())).find(|(k, _)| k == "value").map(|(_, v)| v.into_owned());
            let Some(url) = url.filter(|u| u.starts_with("http://")) else {
                return reply(400, "{\"message\":\"value must be the member's peer URL (http://...)\"}\n".into());
            };
            if let Some(m) = s.members.iter_mut().find(|m| m.name == *name) {
                m.peer_url = url;
                return reply(200, format!("{}\n", serde_json::to_string(s).unwrap_or_default()));
            }
            if s.members.len() >= s.size {
                return reply(409, "{\"message\":\"cluster is full\"}\n".into());
            }
            s.members.push(Registered { name: (*name).to_string(), peer_url: url });
            reply(201, format!("{}\n", serde_json::to_string(s).unwrap_or_default()))
        }
        ("DELETE", [token, name]) => {
            let Some(s) = t.get_mut(*token) else { return reply(404, "{\"message\":\"unknown discovery token\"}\n".into()) };
            let before = s.members.len();
            s.members.retain(|m| m.name != *name);
            if s.members.len() == before {
                reply(404, "{\"message\":\"no such member\"}\n".into())
            } else {
                reply(200, format!("{}\n", serde_json::to_string(s).unwrap_or_default()))
            }
        }
        _ => reply(404, "{\"message\":\"not found; try GET /new?size=3\"}\n".into()),
    }
}

/// Serve the discovery service on `addr`; token URLs are built from `public_url`.
pub async fn serve(addr: SocketAddr, public_url: String) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let tokens: Tokens = Arc::default();
    loop {
        let (stream, _) = listener.accept().await?;
        let (tokens, public) = (tokens.clone(), public_url.clone());
        tokio::spawn(async move {
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
