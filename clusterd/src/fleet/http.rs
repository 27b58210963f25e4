//! The agent's HTTP surface on clusterd's client listener, so `fleetctl journal` and `fleetctl status` can
//! reach the init of whichever machine runs a unit.
//!
//! Owns: `GET /keel/fleet/journal?unit=U[&lines=N][&after_seq=S]` → `{"machine","records":[…]}` (init's
//! journal records) and `GET /keel/fleet/status?unit=U[&lines=N]` → init's status reply, both answered from
//! this machine's init. Read-only; 503 when this clusterd runs no agent. Does not: serve the keys API.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::json;

use crate::api::Body;

fn reply(status: u16, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn error(status: u16, message: &str) -> Response<Body> {
    reply(status, format!("{}\n", json!({ "message": message })))
}

/// Handle a request under `/keel/fleet/`.
pub async fn handle(req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query: Vec<(String, String)> = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.clone());
    let Some(unit) = get("unit") else {
        return error(400, "missing ?unit=NAME");
    };
    let lines = get("lines").and_then(|v| v.parse::<usize>().ok()).unwrap_or(10);
    let after_seq = get("after_seq").and_then(|v| v.parse::<u64>().ok());
    let Some(init) = super::agent::local_init() else {
        return error(503, "this clusterd runs no fleet agent (start it with --fleet-agent)");
    };
    let init = init.clone();
    let which = path.clone();
    let res = tokio::task::spawn_blocking(move || match which.as_str() {
        "/keel/fleet/journal" => init.logs(&unit, lines, after_seq).map(|r| json!({ "records": r })),
        "/keel/fleet/status" => init.status(&unit, lines),
        _ => Ok(serde_json::Value::Null),
    })
    .await;
    match res {
        Ok(Ok(serde_json::Value::Null)) => error(404, "no such fleet endpoint (journal, status)"),
        Ok(Ok(v)) => reply(200, format!("{v}\n")),
        Ok(Err(e)) => error(502, &e.to_string()),
        Err(e) => error(500, &e.to_string()),
    }
}
