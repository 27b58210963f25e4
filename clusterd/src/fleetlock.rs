//! FleetLock (Zincati's reboot-lock protocol, as airlock serves it) on the client listener, backed by the same
//! locksmith semaphore that `locksmithctl` and Keel's reboot managers use.
//!
//! Owns: `POST /v1/pre-reboot` (take a slot, re-entrant) and `POST /v1/steady-state` (release a slot; releasing
//! one not held succeeds), the `fleet-lock-protocol: true` header check, the `{"client_params":{"id","group"}}`
//! body, and airlock-style errors `{"kind":"…","value":"…"}`. A follower forwards to the leader, which reads the
//! semaphore from its linearized state and writes it back through Raft with `prevIndex` (compare-and-swap), so a
//! FleetLock client never races an etcd-v2 client. Does not: define the semaphore (see `keel_model::lock`).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use keel_model::lock::{semaphore_key, LockError, Outcome, Semaphore};

use crate::api::Body;
use crate::kv::error::code;
use crate::kv::{KvOp, OpKind};
use crate::server::{Ctx, ProposeError};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Compare-and-swap rounds before answering "try again".
const MAX_ATTEMPTS: u32 = 100;

#[derive(serde::Deserialize)]
struct ClientParams {
    id: String,
    #[serde(default)]
    group: Option<String>,
}

#[derive(serde::Deserialize)]
struct FleetLockBody {
    client_params: ClientParams,
}

fn reply(ctx: &Ctx, status: u16, kind: &str, value: &str) -> Response<Body> {
    let body = format!("{}\n", serde_json::json!({ "kind": kind, "value": value }));
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-etcd-cluster-id", format!("{:x}", ctx.cluster_id))
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// Which operation a path asks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Lock,
    Unlock,
}

/// Handle `/v1/pre-reboot` or `/v1/steady-state`. `forwarded`: a follower proxied it (header already checked).
pub async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>, forwarded: bool) -> Response<Body> {
    let op = if req.uri().path() == "/v1/pre-reboot" { Op::Lock } else { Op::Unlock };
    if req.method() != hyper::Method::POST {
        return reply(&ctx, 405, "failed_method_check", "FleetLock endpoints only accept POST");
    }
    let header_ok = req
        .headers()
        .get("fleet-lock-protocol")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if !forwarded && !header_ok {
        return reply(&ctx, 400, "failed_header_validation", "missing header \"fleet-lock-protocol: true\"");
    }
    let path_and_query = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return reply(&ctx, 400, "failed_body_validation", &format!("reading the request body: {e}")),
    };
    let params = match serde_json::from_slice::<FleetLockBody>(&body) {
        Ok(b) => b.client_params,
        Err(e) => {
            return reply(
                &ctx,
                400,
                "failed_body_validation",
                &format!("body must be {{\"client_params\":{{\"id\":\"<node>\",\"group\":\"default\"}}}}: {e}"),
            )
        }
    };
    let group = params.group.unwrap_or_else(|| "default".into());
    let key = match semaphore_key(&group) {
        Ok(k) => k,
        Err(e) => return reply(&ctx, 400, "failed_body_validation", &e.to_string()),
    };
    if let Err(e) = keel_model::lock::valid_id(&params.id) {
        return reply(&ctx, 400, "failed_body_validation", &e.to_string());
    }
    if !forwarded {
        if let Some(url) = ctx.leader_peer_url_if_remote().await {
            return ctx.forward(&url, "POST", &path_and_query, &parts.headers, body).await;
        }
    }
    match update(&ctx, &key, op, &params.id).await {
        Ok(s) => {
            let (kind, what) = match op {
                Op::Lock => ("lock_granted", "holds a reboot slot"),
                Op::Unlock => ("lock_released", "holds no reboot slot"),
            };
            let value = format!("{} {what} in group {group} (max {}, {} free)", params.id, s.max, s.semaphore.max(0));
            reply(&ctx, 200, kind, &value)
        }
        Err(Failure::Full(e)) => reply(&ctx, 409, "failed_lock_semaphore_full", &format!("semaphore currently full: {e}")),
        Err(Failure::Corrupt(e)) => reply(&ctx, 500, "failed_lock_semaphore_invalid", &format!("{key}: {e}")),
        Err(Failure::NotLeader(Some(url))) if !forwarded => {
            ctx.forward(&url, "POST", &path_and_query, &parts.headers, body).await
        }
        Err(Failure::NotLeader(_)) => reply(&ctx, 503, "failed_lock_no_leader", "no Raft leader reachable; retry later"),
        Err(Failure::Store(m)) => reply(&ctx, 503, "failed_lock_store", &m),
    }
}

enum Failure {
    Full(LockError),
    Corrupt(LockError),
    NotLeader(Option<String>),
    Store(String),
}

impl From<ProposeError> for Failure {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader(u) => Failure::NotLeader(u),
            other => Failure::Store(other.to_string()),
        }
    }
}

/// Read → operate → compare-and-swap through Raft, until it sticks.
async fn update(ctx: &Ctx, key: &str, op: Op, id: &str) -> Result<Semaphore, Failure> {
    for attempt in 0..MAX_ATTEMPTS {
        ctx.linearize().await?;
        let now = crate::kv::time::now_nanos();
        let current = match ctx.sm.data.read() {
            Ok(d) => match d.store.get(key, false, false, now) {
                Ok(ev) => Some((ev.node.value.unwrap_or_default(), ev.node.modified_index)),
                Err(e) if e.code == code::KEY_NOT_FOUND => None,
                Err(e) => return Err(Failure::Store(e.to_string())),
            },
            Err(_) => return Err(Failure::Store("state machine lock poisoned".into())),
        };
        let (mut sem, prev_index) = match &current {
            Some((v, i)) => (Semaphore::parse(v).map_err(Failure::Corrupt)?, Some(*i)),
            None => (Semaphore::new(1), None),
        };
        let outcome = match op {
            Op::Lock => sem.lock(id).map_err(|e| match e {
                LockError::Full { .. } => Failure::Full(e),
                other => Failure::Corrupt(other),
            })?,
            // FleetLock's UnlockIfHeld: releasing a slot not held is a success.
            Op::Unlock => match sem.unlock(id) {
                Ok(o) => o,
                Err(LockError::NotHeld { .. }) => Outcome::Unchanged,
                Err(e) => return Err(Failure::Corrupt(e)),
            },
        };
        if outcome == Outcome::Unchanged {
            return Ok(sem);
        }
        let kv = KvOp {
            kind: OpKind::Put,
            key: key.to_string(),
            value: sem.to_json(),
            prev_exist: prev_index.is_none().then_some(false),
            prev_index: prev_index.unwrap_or(0),
            ..KvOp::default()
        };
        match ctx.propose_kv(kv).await? {
            Ok(_) => return Ok(sem),
            Err(e) if e.code == code::TEST_FAILED || e.code == code::NODE_EXIST => {
                tokio::time::sleep(std::time::Duration::from_millis(2 + u64::from(attempt.min(50)) * 2)).await;
            }
            Err(e) => return Err(Failure::Store(e.to_string())),
        }
    }
    Err(Failure::Store(format!("{key} kept changing ({MAX_ATTEMPTS} compare-and-swap attempts); retry")))
}
