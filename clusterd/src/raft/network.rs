//! Peer transport, client side: openraft RPCs over HTTP/1.1 to `<peer-url>/raft/*`, bodies in postcard
//! ([`codec::PEER_CONTENT_TYPE`]); other peer calls (`/keel/*`) in JSON.
//!
//! Owns: the pooled HTTP client used for Raft RPCs and for forwarding client requests to the leader, the
//! cluster-token header every peer request carries ([`TOKEN_HEADER`]), and mapping transport failures onto
//! openraft's `Unreachable`/`Network`/`RemoteError`. Does not: serve peer requests (see `server`).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{codec, Member, TypeConfig};

/// Header carrying the cluster token on every peer request.
pub const TOKEN_HEADER: &str = "x-keel-cluster-token";
/// Header naming the sending member (hex id), for logs and fault-injection proxies in tests.
pub const FROM_HEADER: &str = "x-keel-from";

/// The shared HTTP client type.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Build the pooled HTTP client.
pub fn http_client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(1)));
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(c)
}

/// Transport failures.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Could not connect or the connection broke.
    #[error("peer {url} unreachable: {detail}")]
    Unreachable {
        /// Peer URL.
        url: String,
        /// Cause.
        detail: String,
    },
    /// The peer answered with something unexpected.
    #[error("peer {url} answered {status}: {detail}")]
    Bad {
        /// Peer URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Body or decode error.
        detail: String,
    },
    /// No answer in time.
    #[error("peer {url} timed out")]
    Timeout {
        /// Peer URL.
        url: String,
    },
}

/// How a peer request body (and its answer) is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `application/json`: the `/keel/*` endpoints.
    Json,
    /// [`codec::PEER_CONTENT_TYPE`]: openraft's RPCs.
    Postcard,
}

impl Encoding {
    /// The `content-type` header value.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => "application/json",
            Encoding::Postcard => codec::PEER_CONTENT_TYPE,
        }
    }
    /// Encode a body in this encoding.
    pub fn encode<T: Serialize>(self, v: &T) -> Result<Vec<u8>, String> {
        match self {
            Encoding::Json => serde_json::to_vec(v).map_err(|e| e.to_string()),
            Encoding::Postcard => codec::encode(v),
        }
    }
    /// Decode a body in this encoding.
    pub fn decode<T: DeserializeOwned>(self, b: &[u8]) -> Result<T, String> {
        match self {
            Encoding::Json => serde_json::from_slice(b).map_err(|e| e.to_string()),
            Encoding::Postcard => codec::decode(b),
        }
    }
}

/// POST `req` to `url` in `enc` with the cluster token; decode the answer, which comes in the same encoding.
pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
    client: &HttpClient,
    url: &str,
    token: &str,
    from: u64,
    req: &Req,
    timeout: Duration,
    enc: Encoding,
) -> Result<Resp, TransportError> {
    let bad = |status: u16, detail: String| TransportError::Bad { url: url.into(), status, detail };
    let body = enc.encode(req).map_err(|e| bad(0, e))?;
    let request = hyper::Request::post(url)
        .header(TOKEN_HEADER, token)
        .header(FROM_HEADER, format!("{from:016x}"))
        .header("content-type", enc.content_type())
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| bad(0, e.to_string()))?;
    let fut = async {
        let resp = client
            .request(request)
            .await
            .map_err(|e| TransportError::Unreachable { url: url.into(), detail: e.to_string() })?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| TransportError::Unreachable { url: url.into(), detail: e.to_string() })?
            .to_bytes();
        if status != 200 {
            return Err(bad(status, String::from_utf8_lossy(&bytes).trim().to_string()));
        }
        enc.decode(&bytes).map_err(|e| bad(status, e))
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::Timeout { url: url.into() }),
    }
}

/// Creates one [`PeerClient`] per target.
#[derive(Clone)]
pub struct Network {
    /// HTTP client.
    pub client: HttpClient,
    /// Cluster token.
    pub token: String,
    /// This member's id.
    pub from: u64,
}

/// RPC client to one peer.
pub struct PeerClient {
    client: HttpClient,
    token: String,
    from: u64,
    target: u64,
    url: String,
    /// The peer could not read postcard (a clusterd from before the binary peer encoding, during a rolling
    /// upgrade): talk JSON to it from now on.
    json_only: bool,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &Member) -> PeerClient {
        PeerClient {
            client: self.client.clone(),
            token: self.token.clone(),
            from: self.from,
            target,
            url: node.peer_url.trim_end_matches('/').to_string(),
            json_only: false,
        }
    }
}

impl PeerClient {
    async fn rpc<Req: Serialize, Resp: DeserializeOwned, E: std::error::Error + DeserializeOwned>(
        &mut self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, Member, E>> {
        let url = format!("{}/raft/{path}", self.url);
        let enc = if self.json_only { Encoding::Json } else { Encoding::Postcard };
        let mut r: Result<Result<Resp, E>, TransportError> =
            post(&self.client, &url, &self.token, self.from, req, option.hard_ttl(), enc).await;
        if enc == Encoding::Postcard && is_decode_refusal(&r) {
            tracing::warn!(
                "peer {} cannot read the binary peer encoding (an older clusterd); using JSON with it until it is upgraded",
                self.url
            );
            self.json_only = true;
            r = post(&self.client, &url, &self.token, self.from, req, option.hard_ttl(), Encoding::Json).await;
        }
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(e @ TransportError::Unreachable { .. }) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

/// A peer's `400 {"message":"decode: …"}`: it read the body as JSON and could not.
fn is_decode_refusal<T>(r: &Result<T, TransportError>) -> bool {
    matches!(r, Err(TransportError::Bad { status: 400, detail, .. }) if detail.contains("\"decode: "))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        self.rpc("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, Member, RaftError<u64, InstallSnapshotError>>> {
        self.rpc("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        self.rpc("vote", &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(status: u16, detail: &str) -> Result<(), TransportError> {
        Err(TransportError::Bad { url: "http://p/raft/append".into(), status, detail: detail.into() })
    }

    #[test]
    fn only_a_peers_decode_refusal_switches_it_to_json() {
        // What a clusterd from before the binary encoding answers to a postcard body.
        assert!(is_decode_refusal(&bad(400, r#"{"message":"decode: expected value at line 1 column 1"}"#)));
        assert!(!is_decode_refusal(&bad(403, r#"{"message":"wrong or missing cluster token; …"}"#)));
        assert!(!is_decode_refusal(&bad(500, r#"{"message":"encode: …"}"#)));
        assert!(!is_decode_refusal(&bad(400, r#"{"message":"reading body: length limit exceeded"}"#)));
        assert!(!is_decode_refusal(&Ok(())));
    }
}
