//! The engine's local control API (HTTP on loopback, default 127.0.0.1:9745) and the check scheduler.
//!
//! Routes: `GET /v1/status`, `POST /v1/check`, `POST /v1/apply`, `GET|POST /v1/channel`,
//! `POST /v1/rollback`, `GET /metrics` (with the reboot manager's phase). `updatectl` is its client. Documented in docs/updater.md.
//! Owns: HTTP framing and scheduling only; every decision is in the parent module.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::Arc;

use super::{Engine, EngineError, EngineState};

type Shared = Arc<Engine>;

pub fn router(engine: Shared) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/check", post(check))
        .route("/v1/apply", post(apply))
        .route("/v1/channel", get(get_channel).post(set_channel))
        .route("/v1/rollback", post(rollback))
        .route("/metrics", get(metrics))
        .with_state(engine)
}

fn error(code: StatusCode, msg: String) -> Response {
    (code, Json(serde_json::json!({ "error": msg }))).into_response()
}

async fn status(State(e): State<Shared>) -> Response {
    Json(e.status()).into_response()
}

async fn check(State(e): State<Shared>) -> Response {
    let e2 = e.clone();
    let r = tokio::task::spawn_blocking(move || {
        let r = e2.check("ondemandupdate");
        e2.set(|s| {
            if s.state == EngineState::Checking {
                s.state = EngineState::Idle;
            }
        });
        r
    })
    .await;
    match r {
        Ok(Ok(u)) => Json(serde_json::json!({ "update": u, "status": e.status() })).into_response(),
        Ok(Err(err)) => error(StatusCode::BAD_GATEWAY, err.to_string()),
        Err(j) => error(StatusCode::INTERNAL_SERVER_ERROR, j.to_string()),
    }
}

async fn apply(State(e): State<Shared>) -> Response {
    if e.busy.load(std::sync::atomic::Ordering::SeqCst) {
        return error(StatusCode::CONFLICT, EngineError::Busy.to_string());
    }
    let e2 = e.clone();
    tokio::task::spawn_blocking(move || {
        let _ = e2.check_and_apply("ondemandupdate");
    });
    (StatusCode::ACCEPTED, Json(e.status())).into_response()
}

async fn get_channel(State(e): State<Shared>) -> Response {
    Json(serde_json::json!({ "channel": e.status().channel })).into_response()
}

#[derive(Deserialize)]
struct ChannelBody {
    channel: String,
}

async fn set_channel(State(e): State<Shared>, Json(b): Json<ChannelBody>) -> Response {
    match e.set_channel(&b.channel) {
        Ok(()) => Json(serde_json::json!({ "channel": b.channel })).into_response(),
        Err(m) => error(StatusCode::BAD_REQUEST, m),
    }
}

async fn rollback(State(e): State<Shared>) -> Response {
    let e2 = e.clone();
    match tokio::task::spawn_blocking(move || e2.rollback()).await {
        Ok(Ok(slot)) => {
            Json(serde_json::json!({ "next_boot": slot, "status": e.status() })).into_response()
        }
        Ok(Err(err)) => error(StatusCode::CONFLICT, err.to_string()),
        Err(j) => error(StatusCode::INTERNAL_SERVER_ERROR, j.to_string()),
    }
}

async fn metrics(State(e): State<Shared>) -> Response {
    let s = e.status();
    let states = [
        EngineState::Idle,
        EngineState::Checking,
        EngineState::Downloading,
        EngineState::Verifying,
        EngineState::Finalizing,
        EngineState::UpdatedNeedReboot,
        EngineState::Error,
    ];
    let mut out = String::new();
    out.push_str("# TYPE keel_update_engine_state gauge\n");
    for st in states {
        out.push_str(&format!(
            "keel_update_engine_state{{state=\"{st}\"}} {}\n",
            (s.state == st) as u8
        ));
    }
    out.push_str(&format!(
        "# TYPE keel_update_engine_progress gauge\nkeel_update_engine_progress {}\n",
        s.progress
    ));
    out.push_str(&format!(
        "# TYPE keel_update_engine_checks_total counter\nkeel_update_engine_checks_total {}\n",
        s.checks
    ));
    out.push_str(&format!(
        "# TYPE keel_update_engine_updates_installed_total counter\nkeel_update_engine_updates_installed_total {}\n",
        s.updates_installed
    ));
    out.push_str(&format!(
        "# TYPE keel_update_engine_info gauge\nkeel_update_engine_info{{version=\"{}\",channel=\"{}\"}} 1\n",
        s.current_version, s.channel
    ));
    if let Some(r) = &s.reboot {
        use crate::reboot::Phase;
        out.push_str("# TYPE keel_reboot_manager_phase gauge\n");
        for p in [
            Phase::Idle,
            Phase::Off,
            Phase::WaitingForWindow,
            Phase::WaitingForLock,
            Phase::Draining,
            Phase::Rebooting,
            Phase::HoldingLock,
            Phase::ReleasingLock,
            Phase::Error,
        ] {
            out.push_str(&format!(
                "keel_reboot_manager_phase{{phase=\"{p}\",strategy=\"{}\"}} {}\n",
                r.strategy,
                (r.phase == p) as u8
            ));
        }
        out.push_str(&format!(
            "# TYPE keel_reboot_lock_held gauge\nkeel_reboot_lock_held{{group=\"{}\"}} {}\n",
            r.group, r.holding_lock as u8
        ));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

/// Runs boot tasks, then the periodic check loop, forever.
pub async fn schedule(engine: Shared) {
    let mut delay = engine.cfg.first_check_delay;
    loop {
        engine.note_next_check(delay);
        tokio::time::sleep(delay).await;
        let e = engine.clone();
        let _ = tokio::task::spawn_blocking(move || e.check_and_apply("scheduler")).await;
        delay = engine.next_delay();
    }
}
