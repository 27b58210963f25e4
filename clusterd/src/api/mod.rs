//! The client API on `:2379`: etcd's v2 keys API plus `/v2/members`, `/v2/stats/self`, `/health`, `/version`,
//! `/metrics` and Keel's `/keel/status`.
//!
//! Owns: routing, etcd's headers (`X-Etcd-Cluster-Id`, `X-Etcd-Index`, `X-Raft-Index`, `X-Raft-Term`), status
//! codes, error JSON, long-poll and streaming (`stream=true`) watches, each dropped as soon as its client
//! disconnects, forwarding of writes and linearizable reads from a follower to the leader, and the body size
//! limit. Request parsing lives in [`params`]; [`local_keys`] is the pure
//! request→response path the unit tests replay etcd's recorded pairs against.
//! Does not: apply writes itself — every write is a Raft proposal (see `server::Ctx::propose`).

pub mod access;
pub mod params;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};

use crate::kv::error::code;
use crate::kv::{EtcdError, Store};
use crate::server::{Ctx, ProposeError};
use access::Access;
use params::KeysRequest;

/// Response body type of every handler.
pub type Body = BoxBody<Bytes, Infallible>;

/// A rendered reply of the pure keys path.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalReply {
    /// HTTP status.
    pub status: u16,
    /// JSON body (empty while a watch would still be waiting).
    pub body: String,
    /// `X-Etcd-Index`.
    pub etcd_index: u64,
}

/// Apply one keys request directly to a store (no Raft): the reference path for the unit tests.
/// Watches answer from the history, or with an empty body when they would wait.
pub fn local_keys(store: &mut Store, method: &str, key_path: &str, query: &str, form: Option<&[u8]>, now: i64) -> LocalReply {
    let err = |e: EtcdError| LocalReply { status: e.status(), body: e.to_json(), etcd_index: e.index };
    match params::parse(method, key_path, query, form) {
        Err(e) => err(e),
        Ok(KeysRequest::Write(op)) => match store.apply(&op, now) {
            Ok(w) => LocalReply { status: if w.created { 201 } else { 200 }, body: w.event.to_json(), etcd_index: w.etcd_index },
            Err(e) => err(e),
        },
        Ok(KeysRequest::Get { key, recursive, sorted, .. }) => match store.get(&key, recursive, sorted, now) {
            Ok(ev) => LocalReply { status: 200, body: ev.to_json(), etcd_index: store.index() },
            Err(e) => err(e),
        },
        Ok(KeysRequest::Watch { key, recursive, wait_index, .. }) => {
            let since = wait_index.unwrap_or(store.index() + 1);
            match store.scan_history(&key, recursive, since) {
                Ok(Some(ev)) => LocalReply { status: 200, body: ev.to_json(), etcd_index: store.index() },
                Ok(None) => LocalReply { status: 200, body: String::new(), etcd_index: store.index() },
                Err(e) => err(e),
            }
        }
    }
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

struct Reply {
    status: u16,
    body: Body,
    etcd_index: Option<u64>,
    raft_headers: bool,
    content_type: &'static str,
}

impl Reply {
    fn json(status: u16, body: String) -> Reply {
        Reply { status, body: full(body), etcd_index: None, raft_headers: false, content_type: "application/json" }
    }
    fn error(e: &EtcdError) -> Reply {
        Reply { etcd_index: Some(e.index), ..Reply::json(e.status(), e.to_json()) }
    }
    fn text(status: u16, body: &str) -> Reply {
        Reply { status, body: full(body.to_string()), etcd_index: None, raft_headers: false, content_type: "text/plain; charset=utf-8" }
    }
}

fn finish(ctx: &Ctx, r: Reply) -> Response<Body> {
    use hyper::header::{self, HeaderName, HeaderValue};
    let mut resp = Response::new(r.body);
    *resp.status_mut() = hyper::StatusCode::from_u16(r.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    // Static names and values: no per-request header parsing (this runs for every client request).
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(r.content_type));
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("accept, content-type, authorization"));
    if let Ok(v) = HeaderValue::try_from(format!("{:x}", ctx.cluster_id)) {
        h.insert(HeaderName::from_static("x-etcd-cluster-id"), v);
    }
    if let Some(i) = r.etcd_index {
        h.insert(HeaderName::from_static("x-etcd-index"), HeaderValue::from(i));
    }
    if r.raft_headers {
        let (applied, term) = {
            let m = ctx.raft.metrics();
            let m = m.borrow();
            (m.last_applied.map_or(0, |l| l.index), m.current_term)
        };
        h.insert(HeaderName::from_static("x-raft-index"), HeaderValue::from(applied));
        h.insert(HeaderName::from_static("x-raft-term"), HeaderValue::from(term));
    }
    resp
}

/// Handle one client request. `forwarded` is true when a follower proxied it here (never forward again; the
/// follower has checked `access`).
pub async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>, forwarded: bool, access: Access) -> Response<Body> {
    let path = req.uri().path().to_string();
    let is_keys = path == "/v2/keys" || path.starts_with("/v2/keys/");
    if access == Access::Container && !is_keys && !access::container_may_call(req.method().as_str(), &path) {
        let msg = format!("{} {path} is not served to containers (only to the host)", req.method());
        return finish(&ctx, Reply::json(403, format!("{}\n", serde_json::json!({ "message": msg }))));
    }
    if path.starts_with("/keel/fleet/") {
        return crate::fleet::http::handle(req).await;
    }
    if path == "/v1/pre-reboot" || path == "/v1/steady-state" {
        return crate::fleetlock::handle(ctx, req, forwarded).await;
    }
    let reply = if is_keys {
        return keys(ctx, req, forwarded, access).await;
    } else if path == "/v2/members" || path.starts_with("/v2/members/") {
        members(&ctx, req, forwarded).await
    } else {
        match path.as_str() {
            "/health" => {
                let m = ctx.raft.metrics().borrow().clone();
                let published = ctx.sm.data.read().map(|d| d.attrs.contains_key(&ctx.id)).unwrap_or(false);
                if m.current_leader.is_none() {
                    Reply::json(503, "{\"health\":\"false\",\"reason\":\"no leader\"}\n".into())
                } else if !published {
                    Reply::json(503, "{\"health\":\"false\",\"reason\":\"member attributes not yet published\"}\n".into())
                } else {
                    Reply::json(200, "{\"health\":\"true\"}\n".into())
                }
            }
            "/version" => Reply::json(200, format!("{{\"etcdserver\":\"3.4.23\",\"etcdcluster\":\"3.4.0\",\"keel\":\"{}\"}}\n", env!("CARGO_PKG_VERSION"))),
            "/metrics" => Reply { content_type: "text/plain; version=0.0.4", ..Reply::text(200, &metrics_text(&ctx)) },
            "/v2/stats/self" => Reply::json(200, stats_self(&ctx)),
            "/keel/status" => Reply::json(200, ctx.status_json()),
            _ => Reply::text(404, "404 page not found\n"),
        }
    };
    finish(&ctx, reply)
}

async fn read_body(req: Request<Incoming>) -> Result<(hyper::http::request::Parts, Bytes), Reply> {
    let (parts, body) = req.into_parts();
    if let Some(len) = parts.headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok()) {
        if len > params::MAX_BODY {
            return Err(too_large());
        }
    }
    match Limited::new(body, params::MAX_BODY).collect().await {
        Ok(c) => Ok((parts, c.to_bytes())),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                Err(too_large())
            } else {
                Err(Reply::error(&EtcdError::new(code::INVALID_FORM, format!("reading request body: {e}"), 0)))
            }
        }
    }
}

fn too_large() -> Reply {
    let e = EtcdError::new(code::INVALID_FORM, format!("request body larger than {} bytes", params::MAX_BODY), 0);
    Reply { status: 413, ..Reply::error(&e) }
}

async fn keys(ctx: Arc<Ctx>, req: Request<Incoming>, forwarded: bool, access: Access) -> Response<Body> {
    let method = req.method().as_str().to_string();
    if !matches!(method.as_str(), "GET" | "HEAD" | "PUT" | "POST" | "DELETE") {
        let mut r = finish(&ctx, Reply::text(405, "Method Not Allowed\n"));
        r.headers_mut().insert("allow", hyper::header::HeaderValue::from_static("HEAD,GET,PUT,POST,DELETE"));
        r.headers_mut().insert("x-content-type-options", hyper::header::HeaderValue::from_static("nosniff"));
        return r;
    }
    let path_and_query = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    let (parts, body) = match read_body(req).await {
        Ok(x) => x,
        Err(r) => return finish(&ctx, r),
    };
    let path = parts.uri.path();
    let key_path = path.strip_prefix("/v2/keys").unwrap_or("");
    let query = parts.uri.query().unwrap_or("");
    let is_form = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let mut parsed = params::parse(&method, key_path, query, if is_form { Some(&body) } else { None });
    if let (Access::Container, Ok(KeysRequest::Write(op))) = (access, &parsed) {
        if let Err(prefix) = access::container_may_write(&op.key, op.kind == crate::kv::OpKind::Post) {
            let cause = format!("{}: only the host writes under {prefix} (this client is a container)", op.key);
            parsed = Err(EtcdError::new(code::UNAUTHORIZED, cause, ctx.sm.store_index()));
        }
    }
    let reply = match parsed {
        Err(e) => Reply::error(&e),
        Ok(KeysRequest::Write(op)) => {
            if !forwarded {
                if let Some(url) = ctx.leader_peer_url_if_remote().await {
                    return ctx.forward(&url, &method, &path_and_query, &parts.headers, body).await;
                }
            }
            match ctx.propose_kv(op).await {
                Ok(Ok(w)) => Reply {
                    etcd_index: Some(w.etcd_index),
                    raft_headers: true,
                    ..Reply::json(if w.created { 201 } else { 200 }, w.event.to_json())
                },
                Ok(Err(e)) => Reply::error(&e),
                Err(ProposeError::NotLeader(Some(url))) if !forwarded => {
                    return ctx.forward(&url, &method, &path_and_query, &parts.headers, body).await;
                }
                Err(e) => Reply::error(&e.to_etcd(ctx.sm.store_index())),
            }
        }
        Ok(KeysRequest::Get { key, recursive, sorted, linearizable, head }) => {
            if linearizable {
                if !forwarded {
                    if let Some(url) = ctx.leader_peer_url_if_remote().await {
                        return ctx.forward(&url, &method, &path_and_query, &parts.headers, body).await;
                    }
                }
                if let Err(e) = ctx.linearize().await {
                    match e {
                        ProposeError::NotLeader(Some(url)) if !forwarded => {
                            return ctx.forward(&url, &method, &path_and_query, &parts.headers, body).await;
                        }
                        e => return finish(&ctx, Reply::error(&e.to_etcd(ctx.sm.store_index()))),
                    }
                }
            }
            let now = crate::kv::time::now_nanos();
            let res = match ctx.sm.data.read() {
                Ok(d) => d.store.get(&key, recursive, sorted, now).map(|ev| (ev, d.store.index())),
                Err(_) => Err(EtcdError::new(code::RAFT_INTERNAL, "state machine lock poisoned", 0)),
            };
            match res {
                Ok((ev, idx)) => {
                    let body = ev.to_json();
                    let mut r = Reply { etcd_index: Some(idx), raft_headers: true, ..Reply::json(200, body.clone()) };
                    if head {
                        r.body = full(Bytes::new());
                        let mut resp = finish(&ctx, r);
                        resp.headers_mut().insert("content-length", hyper::header::HeaderValue::from(body.len()));
                        return resp;
                    }
                    r
                }
                Err(e) => Reply::error(&e),
            }
        }
        Ok(KeysRequest::Watch { key, recursive, wait_index, stream }) => {
            return watch(ctx, WatchSpec { key, recursive, stream }, wait_index).await
        }
    };
    finish(&ctx, reply)
}

/// What one watch asked for.
struct WatchSpec {
    key: String,
    recursive: bool,
    /// `stream=true`: every event until the client leaves, not just the first.
    stream: bool,
}

async fn watch(ctx: Arc<Ctx>, spec: WatchSpec, wait_index: Option<u64>) -> Response<Body> {
    let applied = ctx.sm.applied_tx.subscribe();
    let (accepted, since) = match ctx.sm.data.read() {
        Ok(d) => {
            let idx = d.store.index();
            let since = wait_index.unwrap_or(idx + 1);
            // A waitIndex older than the history is refused before the response starts (etcd's 401).
            if let Err(e) = d.store.scan_history(&spec.key, spec.recursive, since) {
                return finish(&ctx, Reply::error(&e));
            }
            (idx, since)
        }
        Err(_) => return finish(&ctx, Reply::error(&EtcdError::new(code::RAFT_INTERNAL, "lock poisoned", 0))),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(WATCH_BUFFER);
    let reply = Reply { etcd_index: Some(accepted), raft_headers: true, ..Reply::json(200, String::new()) };
    let mut resp = finish(&ctx, Reply { body: WatchBody { rx }.boxed(), ..reply });
    resp.headers_mut().remove("content-length");
    tokio::spawn(watch_task(ctx, spec, since, tx, applied));
    resp
}

/// Events a streaming watch may have queued for a slow client before it waits (and the history may run out).
const WATCH_BUFFER: usize = 16;

/// A watch response body: the chunks the watch task hands over. hyper drops it as soon as the client's
/// connection closes, which is how the task learns that nobody is listening any more.
struct WatchBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|chunk| chunk.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// Counts a watch in `/metrics` for as long as its task lives.
struct Watching(Arc<Ctx>);

impl Watching {
    fn new(ctx: Arc<Ctx>) -> Watching {
        ctx.watchers.fetch_add(1, Ordering::Relaxed);
        Watching(ctx)
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Send the events a watch sees, from `since` on: the first one only, or with `stream` every one, each as its
/// own JSON line. Ends when the client disconnects (the body is dropped), even if no event ever comes.
async fn watch_task(
    ctx: Arc<Ctx>,
    spec: WatchSpec,
    mut since: u64,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    mut applied: tokio::sync::watch::Receiver<u64>,
) {
    let watching = Watching::new(ctx);
    loop {
        let scanned = match watching.0.sm.data.read() {
            Ok(d) => (d.store.scan_history(&spec.key, spec.recursive, since), d.store.index()),
            Err(_) => return,
        };
        match scanned {
            (Ok(Some(ev)), _) => {
                since = ev.index() + 1;
                if tx.send(Bytes::from(ev.to_json())).await.is_err() || !spec.stream {
                    return;
                }
                continue;
            }
            (Ok(None), idx) => since = since.max(idx + 1),
            // The client fell more than the history behind: say so and end, as etcd ends such a stream.
            (Err(e), _) => {
                let _ = tx.send(Bytes::from(e.to_json())).await;
                return;
            }
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

#[derive(serde::Deserialize)]
struct MemberAdd {
    #[serde(rename = "peerURLs")]
    peer_urls: Vec<String>,
    #[serde(default)]
    name: Option<String>,
}

async fn members(ctx: &Arc<Ctx>, req: Request<Incoming>, forwarded: bool) -> Reply {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    match method.as_str() {
        "GET" => Reply::json(200, ctx.members_json()),
        "POST" | "DELETE" => {
            let headers = req.headers().clone();
            let pq = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
            let (_, body) = match read_body(req).await {
                Ok(x) => x,
                Err(r) => return r,
            };
            if !forwarded {
                if let Some(url) = ctx.leader_peer_url_if_remote().await {
                    let resp = ctx.forward(&url, &method, &pq, &headers, body).await;
                    let status = resp.status().as_u16();
                    let b = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                    return Reply { body: full(b), ..Reply::json(status, String::new()) };
                }
            }
            if method == "POST" {
                let add: MemberAdd = match serde_json::from_slice(&body) {
                    Ok(a) => a,
                    Err(e) => return Reply::json(400, format!("{{\"message\":\"invalid member JSON: {}\"}}\n", e.to_string().replace('"', "'"))),
                };
                let Some(url) = add.peer_urls.first() else {
                    return Reply::json(400, "{\"message\":\"peerURLs is empty\"}\n".into());
                };
                match ctx.add_member(add.name.unwrap_or_default(), url.clone()).await {
                    Ok(json) => Reply::json(201, json),
                    Err(e) => Reply::json(500, format!("{{\"message\":\"{}\"}}\n", e.replace('"', "'"))),
                }
            } else {
                let id = path.trim_start_matches("/v2/members/").trim_matches('/');
                let Ok(id) = u64::from_str_radix(id, 16) else {
                    return Reply::json(400, format!("{{\"message\":\"invalid member id {id:?}\"}}\n"));
                };
                match ctx.remove_member(id).await {
                    Ok(()) => Reply { status: 204, ..Reply::json(204, String::new()) },
                    Err(e) => Reply::json(500, format!("{{\"message\":\"{}\"}}\n", e.replace('"', "'"))),
                }
            }
        }
        _ => Reply::text(405, "Method Not Allowed\n"),
    }
}

fn stats_self(ctx: &Ctx) -> String {
    let m = ctx.raft.metrics().borrow().clone();
    let leader = m.current_leader.map(|l| format!("{l:016x}")).unwrap_or_default();
    let state = if m.current_leader == Some(ctx.id) { "StateLeader" } else { "StateFollower" };
    let v = serde_json::json!({
        "name": ctx.name,
        "id": format!("{:016x}", ctx.id),
        "state": state,
        "startTime": crate::kv::time::rfc3339_nanos(ctx.start_nanos),
        "leaderInfo": {"leader": leader},
        "recvAppendRequestCnt": 0,
        "sendAppendRequestCnt": 0,
    });
    format!("{v}\n")
}

fn metrics_text(ctx: &Ctx) -> String {
    use std::fmt::Write;
    let m = ctx.raft.metrics().borrow().clone();
    let s = &ctx.storage_metrics;
    let mut o = String::new();
    let mut g = |name: &str, help: &str, kind: &str, v: String| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    g("keel_raft_term", "Current Raft term.", "gauge", m.current_term.to_string());
    g("keel_raft_is_leader", "1 if this member is the Raft leader.", "gauge", u8::from(m.current_leader == Some(ctx.id)).to_string());
    g("keel_raft_has_leader", "1 if a leader is known.", "gauge", u8::from(m.current_leader.is_some()).to_string());
    g("keel_raft_last_log_index", "Index of the last Raft log entry.", "gauge", m.last_log_index.unwrap_or(0).to_string());
    g("keel_raft_commit_index", "Committed Raft log index.", "gauge", s.committed.load(Ordering::Relaxed).to_string());
    g("keel_raft_applied_index", "Applied Raft log index.", "gauge", m.last_applied.map(|l| l.index).unwrap_or(0).to_string());
    g("keel_store_index", "etcd v2 store index (X-Etcd-Index).", "gauge", ctx.sm.store_index().to_string());
    g("keel_proposals_total", "Raft proposals made by this member.", "counter", ctx.proposals.load(Ordering::Relaxed).to_string());
    g("keel_proposals_failed_total", "Raft proposals that failed or timed out.", "counter", ctx.proposals_failed.load(Ordering::Relaxed).to_string());
    g("keel_forwarded_total", "Client requests forwarded to the leader.", "counter", ctx.forwarded.load(Ordering::Relaxed).to_string());
    g("keel_watchers", "Open long-poll watches.", "gauge", ctx.watchers.load(Ordering::Relaxed).to_string());
    g("keel_raft_log_entries_written_total", "Raft log entries made durable.", "counter", s.entries.load(Ordering::Relaxed).to_string());
    g("keel_raft_log_durable_index", "Last Raft log entry on this member's disk.", "gauge", s.durable.load(Ordering::Relaxed).to_string());
    g("keel_raft_log_first_index", "First Raft log entry still in the store file (older ones were compacted into the snapshot).", "gauge", s.log_front.load(Ordering::Relaxed).to_string());
    let c = ctx.connections.report();
    let _ = writeln!(o, "# HELP keel_connections Open connections by kind (peer port, all clients, containers' clients).\n# TYPE keel_connections gauge");
    for (kind, open, _, _) in c {
        let _ = writeln!(o, "keel_connections{{kind=\"{kind}\"}} {open}");
    }
    let _ = writeln!(o, "# HELP keel_connections_limit Connections of each kind held open at most.\n# TYPE keel_connections_limit gauge");
    for (kind, _, limit, _) in c {
        let _ = writeln!(o, "keel_connections_limit{{kind=\"{kind}\"}} {limit}");
    }
    let _ = writeln!(o, "# HELP keel_connections_refused_total Connections closed unread because their kind was at its limit.\n# TYPE keel_connections_refused_total counter");
    for (kind, _, _, refused) in c {
        let _ = writeln!(o, "keel_connections_refused_total{{kind=\"{kind}\"}} {refused}");
    }
    let _ = writeln!(o, "# HELP keel_wal_fsync_duration_seconds Latency of the redb commit (fsync) of a log batch.\n# TYPE keel_wal_fsync_duration_seconds histogram");
    let mut cum = 0;
    for (i, b) in crate::raft::storage::FSYNC_BUCKETS.iter().enumerate() {
        cum += s.fsync_buckets[i].load(Ordering::Relaxed);
        let _ = writeln!(o, "keel_wal_fsync_duration_seconds_bucket{{le=\"{b}\"}} {cum}");
    }
    cum += s.fsync_buckets[4].load(Ordering::Relaxed);
    let _ = writeln!(o, "keel_wal_fsync_duration_seconds_bucket{{le=\"+Inf\"}} {cum}");
    let _ = writeln!(o, "keel_wal_fsync_duration_seconds_sum {}", s.fsync_micros.load(Ordering::Relaxed) as f64 / 1e6);
    let _ = writeln!(o, "keel_wal_fsync_duration_seconds_count {}", s.fsyncs.load(Ordering::Relaxed));
    o
}

