//! `updateserver`'s HTTP service: Omaha at `POST /v1/update/`, payloads with Range at `GET /payloads/<file>`,
//! the admin API under `/api/`, and `/metrics`.
//!
//! Owns: HTTP framing, Range handling, uploads into `<data>/payloads/`. Policy is in the parent module.

use std::io::Read;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::Mutex;

use super::{now, update_for, Config, Decision, Group, Release, State};
use crate::omaha::{Request, Response as OmahaResponse, KEEL_APPID, MAX_XML_LEN};
use crate::payload::{PayloadHead, TrustedKeys};

/// Shared server state.
pub struct Server {
    pub config: Config,
    pub state: Mutex<State>,
    pub requests: std::sync::atomic::AtomicU64,
}

type Shared = Arc<Server>;

fn err(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// Builds the router.
pub fn router(server: Shared) -> Router {
    Router::new()
        .route("/v1/update/", post(omaha))
        .route("/v1/update", post(omaha))
        .route("/payloads/:file", get(payload))
        .route("/api/channels", get(channels))
        .route("/api/channels/:channel/payloads", put(publish))
        .route("/api/groups", get(groups))
        .route("/api/groups/:group", put(set_group))
        .route("/api/groups/:group/pause", post(pause))
        .route("/api/groups/:group/resume", post(resume))
        .route("/api/machines", get(machines))
        .route("/metrics", get(metrics))
        .with_state(server)
}

/// Opens the data directory and loads state.
pub fn open(config: Config) -> anyhow::Result<Shared> {
    std::fs::create_dir_all(config.data.join("payloads"))?;
    let state = State::load(&config.data)?;
    Ok(Arc::new(Server {
        config,
        state: Mutex::new(state),
        requests: Default::default(),
    }))
}

async fn omaha(
    AxState(s): AxState<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    s.requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if body.len() > MAX_XML_LEN {
        return err(StatusCode::PAYLOAD_TOO_LARGE, "request over 1 MiB");
    }
    let req = match Request::parse(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let xml_resp = if !req.appid.eq_ignore_ascii_case(KEEL_APPID) {
        OmahaResponse::xml(
            &req.appid,
            "error-unknownApplication",
            None,
            None,
            req.ping,
            0,
        )
    } else {
        let mut st = s.state.lock().await;
        let decision = st.handle(&req, now());
        let _ = st.save(&s.config.data);
        drop(st);
        let base = s.config.base_url.clone().unwrap_or_else(|| {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost");
            format!("http://{host}/payloads/")
        });
        let check = req.updatecheck;
        match decision {
            Decision::Grant(rel) => OmahaResponse::xml(
                &req.appid,
                "ok",
                Some("ok"),
                Some(&update_for(&rel, &base)),
                req.ping,
                req.events.len(),
            ),
            Decision::NoUpdate => OmahaResponse::xml(
                &req.appid,
                "ok",
                check.then_some("noupdate"),
                None,
                req.ping,
                req.events.len(),
            ),
            Decision::Refused(status) => OmahaResponse::xml(
                &req.appid,
                "ok",
                check.then_some(status),
                None,
                req.ping,
                req.events.len(),
            ),
        }
    };
    (
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        xml_resp,
    )
        .into_response()
}

/// Parses a single `bytes=a-b` / `bytes=a-` / `bytes=-n` range against `len`.
pub fn parse_range(h: &str, len: u64) -> Option<(u64, u64)> {
    let spec = h.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        (len.checked_sub(n.min(len))?, len.checked_sub(1)?)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            len.checked_sub(1)?
        } else {
            b.parse::<u64>().ok()?.min(len.checked_sub(1)?)
        };
        (start, end)
    };
    (start <= end && start < len).then_some((start, end))
}

async fn payload(
    AxState(s): AxState<Shared>,
    UrlPath(file): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if file.contains('/') || file.starts_with('.') {
        return err(StatusCode::BAD_REQUEST, "bad payload name");
    }
    let path = s.config.data.join("payloads").join(&file);
    let mut f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => return err(StatusCode::NOT_FOUND, format!("no payload {file}")),
    };
    let len = match f.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len.saturating_sub(1)),
        Some(r) => match parse_range(r, len) {
            Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b),
            None => {
                return (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{len}"))],
                )
                    .into_response()
            }
        },
    };
    if f.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "seek failed");
    }
    let count = if len == 0 { 0 } else { end - start + 1 };
    let stream = tokio_util::io::ReaderStream::with_capacity(f.take(count), 256 << 10);
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, count.into());
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = header::HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    resp
}

fn authorized(s: &Server, headers: &HeaderMap) -> bool {
    match &s.config.admin_token {
        None => true,
        Some(t) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.strip_prefix("Bearer ") == Some(t.as_str())),
    }
}

macro_rules! admin {
    ($s:expr, $h:expr) => {
        if !authorized(&$s, &$h) {
            return err(
                StatusCode::UNAUTHORIZED,
                "admin API needs Authorization: Bearer <token> (see --admin-token)",
            );
        }
    };
}

async fn channels(AxState(s): AxState<Shared>, h: HeaderMap) -> Response {
    admin!(s, h);
    Json(s.state.lock().await.channels.clone()).into_response()
}

async fn groups(AxState(s): AxState<Shared>, h: HeaderMap) -> Response {
    admin!(s, h);
    Json(s.state.lock().await.groups.clone()).into_response()
}

async fn machines(AxState(s): AxState<Shared>, h: HeaderMap) -> Response {
    admin!(s, h);
    Json(s.state.lock().await.machines.clone()).into_response()
}

#[derive(Deserialize)]
struct GroupUpdate {
    channel: Option<String>,
    max_updates_per_period: Option<u32>,
    period_secs: Option<u64>,
    halt_on_error: Option<bool>,
    allow_downgrade: Option<bool>,
}

async fn set_group(
    AxState(s): AxState<Shared>,
    h: HeaderMap,
    UrlPath(group): UrlPath<String>,
    Json(u): Json<GroupUpdate>,
) -> Response {
    admin!(s, h);
    let mut st = s.state.lock().await;
    let g = st
        .groups
        .entry(group.clone())
        .or_insert_with(|| Group::new(u.channel.as_deref().unwrap_or(&group)));
    if let Some(c) = u.channel {
        g.channel = c;
    }
    if let Some(m) = u.max_updates_per_period {
        g.max_updates_per_period = m;
    }
    if let Some(p) = u.period_secs {
        g.period_secs = p.max(1);
    }
    if let Some(x) = u.halt_on_error {
        g.halt_on_error = x;
    }
    if let Some(x) = u.allow_downgrade {
        g.allow_downgrade = x;
    }
    let out = g.clone();
    let _ = st.save(&s.config.data);
    Json(out).into_response()
}

async fn pause_resume(s: Shared, h: HeaderMap, group: String, paused: bool) -> Response {
    admin!(s, h);
    let mut st = s.state.lock().await;
    let Some(g) = st.groups.get_mut(&group) else {
        return err(
            StatusCode::NOT_FOUND,
            format!("no group {group}; `updateserver groups` lists them"),
        );
    };
    g.paused = paused;
    if !paused {
        g.halted = None;
    }
    let out = g.clone();
    let _ = st.save(&s.config.data);
    Json(out).into_response()
}

async fn pause(
    AxState(s): AxState<Shared>,
    h: HeaderMap,
    UrlPath(group): UrlPath<String>,
) -> Response {
    pause_resume(s, h, group, true).await
}

async fn resume(
    AxState(s): AxState<Shared>,
    h: HeaderMap,
    UrlPath(group): UrlPath<String>,
) -> Response {
    pause_resume(s, h, group, false).await
}

#[derive(Deserialize)]
struct PublishQuery {
    name: String,
}

/// `PUT /api/channels/<channel>/payloads?name=<file>`: body is the payload. The signature is checked
/// against the server's trusted keys (when configured) and the manifest's channel must match.
async fn publish(
    AxState(s): AxState<Shared>,
    h: HeaderMap,
    UrlPath(channel): UrlPath<String>,
    Query(q): Query<PublishQuery>,
    body: Body,
) -> Response {
    admin!(s, h);
    if q.name.contains('/') || q.name.starts_with('.') || q.name.is_empty() {
        return err(
            StatusCode::BAD_REQUEST,
            "payload name must be a plain file name",
        );
    }
    let dir = s.config.data.join("payloads");
    let tmp = dir.join(format!(".upload-{}", q.name));
    let fin = dir.join(&q.name);
    let mut f = match tokio::fs::File::create(&tmp).await {
        Ok(f) => f,
        Err(e) => {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("creating {}: {e}", tmp.display()),
            )
        }
    };
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return err(StatusCode::BAD_REQUEST, format!("upload interrupted: {e}")),
        };
        hasher.update(&chunk);
        size += chunk.len() as u64;
        if let Err(e) = f.write_all(&chunk).await {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("writing upload: {e}"),
            );
        }
    }
    if let Err(e) = f.sync_all().await {
        return err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("syncing upload: {e}"),
        );
    }
    drop(f);
    let keys = s.config.keys.clone();
    let tmp2 = tmp.clone();
    let verified = tokio::task::spawn_blocking(move || -> Result<PayloadHead, String> {
        let file = std::fs::File::open(&tmp2).map_err(|e| e.to_string())?;
        let mut r = std::io::BufReader::with_capacity(1 << 20, file);
        match keys {
            Some(k) => {
                let trusted = TrustedKeys::load_dir(&k).map_err(|e| e.to_string())?;
                crate::payload::verify_stream(&mut r, &trusted).map_err(|e| e.to_string())
            }
            None => read_head_unverified(&mut r),
        }
    })
    .await;
    let head = match verified {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return err(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("payload refused: {e}"),
            );
        }
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if head.manifest.channel != channel {
        let _ = tokio::fs::remove_file(&tmp).await;
        return err(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("payload was built for channel {} but published to {channel}; rebuild or publish to {}", head.manifest.channel, head.manifest.channel),
        );
    }
    if let Err(e) = tokio::fs::rename(&tmp, &fin).await {
        return err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("renaming upload: {e}"),
        );
    }
    let rel = Release {
        version: head.manifest.version.clone(),
        file: q.name.clone(),
        size,
        sha256: hex::encode(hasher.finalize()),
        key_id: head.key_id.clone(),
        published_at: now(),
    };
    let mut st = s.state.lock().await;
    st.publish(&channel, rel.clone());
    let _ = st.save(&s.config.data);
    (StatusCode::CREATED, Json(rel)).into_response()
}

/// Reads the head without a trusted key set: only the format is checked (server without `--keys`).
fn read_head_unverified(r: &mut impl Read) -> Result<PayloadHead, String> {
    let mut h = [0u8; crate::payload::HEADER_LEN];
    r.read_exact(&mut h)
        .map_err(|e| format!("reading header: {e}"))?;
    let hdr = crate::payload::Header::decode(&h).map_err(|e| e.to_string())?;
    let mut m = vec![0u8; hdr.manifest_len as usize];
    r.read_exact(&mut m)
        .map_err(|e| format!("reading manifest: {e}"))?;
    let mut sig = [0u8; crate::payload::SIG_BLOCK_LEN as usize];
    r.read_exact(&mut sig)
        .map_err(|e| format!("reading signature: {e}"))?;
    let manifest = crate::payload::Manifest::parse(&m).map_err(|e| e.to_string())?;
    Ok(PayloadHead {
        manifest,
        manifest_sha256: hex::encode(Sha256::digest(&m)),
        key_id: hex::encode(&sig[..8]),
        data_offset: (crate::payload::HEADER_LEN + m.len() + sig.len()) as u64,
    })
}

async fn metrics(AxState(s): AxState<Shared>) -> Response {
    let st = s.state.lock().await;
    let mut out = String::new();
    out.push_str("# TYPE keel_updateserver_requests_total counter\n");
    out.push_str(&format!(
        "keel_updateserver_requests_total {}\n",
        s.requests.load(std::sync::atomic::Ordering::Relaxed)
    ));
    out.push_str("# TYPE keel_updateserver_machines gauge\n");
    let mut by: std::collections::BTreeMap<(String, String), u64> = Default::default();
    for m in st.machines.values() {
        *by.entry((m.version.clone(), m.state.clone())).or_default() += 1;
    }
    for ((v, state), n) in by {
        out.push_str(&format!(
            "keel_updateserver_machines{{version=\"{v}\",state=\"{state}\"}} {n}\n"
        ));
    }
    out.push_str("# TYPE keel_updateserver_group_halted gauge\n");
    for (name, g) in &st.groups {
        out.push_str(&format!(
            "keel_updateserver_group_halted{{group=\"{name}\"}} {}\n",
            (g.halted.is_some() || g.paused) as u8
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
