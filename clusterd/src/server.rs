//! One cluster member: configuration, bootstrap, the peer and client HTTP servers, proposals and leader duties.
//!
//! Owns: [`Config`] (etcd-like flags, already parsed), [`run`] (open storage → start Raft → bootstrap a new
//! static cluster or rejoin with existing data → serve), [`Ctx`] (what handlers share: Raft handle, state
//! machine, counters), the peer listener (Raft RPCs and forwarded client requests, refused without the right
//! cluster token), proposal timeouts, forwarding to the leader, TTL expiry proposals (leader only) and the
//! publication of this member's client URLs. Does not: parse keys requests (see `api`) or persist (see `raft`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, SnapshotPolicy};
use tokio::net::TcpListener;

use crate::api::access::{Access, Subnet};
use crate::api::{self, Body};
use crate::kv::error::code;
use crate::kv::{EtcdError, KvOp, WriteOk};
use crate::raft::network::{http_client, post, Encoding, HttpClient, Network, FROM_HEADER, TOKEN_HEADER};
use crate::raft::storage::{self, StateMachine, StorageMetrics};
use crate::raft::{codec, member_id, Member, Raft, Request as RaftRequest, Response as RaftResponse};

/// How long a proposal may wait for commit before the client gets an error.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors starting or running a member.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Storage could not be opened or is corrupt.
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    /// A flag value is wrong.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Raft failed to start or stopped.
    #[error("raft: {0}")]
    Raft(String),
}

/// Whether this member bootstraps a new cluster or joins an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    /// Initialize with `--initial-cluster` if storage is empty.
    New,
    /// Wait to be added by the existing cluster.
    Existing,
}

/// A member's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Member name.
    pub name: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Client listen addresses.
    pub client_addrs: Vec<SocketAddr>,
    /// Client listen addresses that may not exist yet (the container bridge's 10.88.0.1, created with the
    /// first private container): bound with IP_FREEBIND so they answer once the address appears; a failure
    /// to bind one is logged, not fatal.
    pub late_client_addrs: Vec<SocketAddr>,
    /// Client URLs advertised to others.
    pub advertise_client_urls: Vec<String>,
    /// Peer listen address.
    pub peer_addr: SocketAddr,
    /// This member's peer URL as others reach it.
    pub peer_url: String,
    /// `name → peer URL` of the initial cluster.
    pub initial_cluster: BTreeMap<String, String>,
    /// New or existing cluster.
    pub state: ClusterState,
    /// Cluster token (peer authentication).
    pub token: String,
    /// Raft log entries between snapshots.
    pub snapshot_count: u64,
    /// Also snapshot once this many bytes of log entries were written since the last snapshot (an entry can
    /// carry a batch of up to 512 writes, so the entry count alone does not bound the log's size).
    pub snapshot_log_bytes: u64,
    /// Leader heartbeat period, milliseconds.
    pub heartbeat_ms: u64,
    /// Base election timeout, milliseconds: a follower that hears nothing from the leader for
    /// 2× this (openraft's leader lease) plus a random 1–2× this starts an election.
    pub election_timeout_ms: u64,
    /// Source addresses of containers (`--container-subnet`): their requests get [`Access::Container`].
    pub container_subnet: Option<Subnet>,
    /// Client connections from containers held open at once (`--max-container-connections`; see
    /// [`crate::connections`]).
    pub max_container_connections: usize,
}

/// Parse `http://host:port` into a socket address.
pub fn parse_url_addr(url: &str) -> Result<SocketAddr, ServerError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ServerError::Config(format!("URL {url:?} must start with http://")))?;
    let hostport = rest.trim_end_matches('/');
    use std::net::ToSocketAddrs;
    hostport
        .to_socket_addrs()
        .map_err(|e| ServerError::Config(format!("URL {url:?}: {e}")))?
        .next()
        .ok_or_else(|| ServerError::Config(format!("URL {url:?} resolves to no address")))
}

/// Parse `a=http://..,b=http://..`.
pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<String, String>, ServerError> {
    let mut m = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (n, u) = part
            .split_once('=')
            .ok_or_else(|| ServerError::Config(format!("--initial-cluster entry {part:?} is not name=peer-url")))?;
        parse_url_addr(u)?;
        if m.insert(n.to_string(), u.trim_end_matches('/').to_string()).is_some() {
            return Err(ServerError::Config(format!("--initial-cluster names {n:?} twice")));
        }
    }
    Ok(m)
}

/// Errors of a proposal or linearizable read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// This member is not the leader; the leader's peer URL if known. The proposal certainly had no effect:
    /// openraft says so before appending it, or after truncating it from the log as uncommitted.
    #[error("not the leader")]
    NotLeader(Option<String>),
    /// No commit within [`PROPOSE_TIMEOUT`] (no quorum?).
    #[error("timed out waiting for a quorum")]
    Timeout,
    /// Raft stopped or failed.
    #[error("raft: {0}")]
    Fatal(String),
}

impl ProposeError {
    /// The etcd error a client sees.
    pub fn to_etcd(&self, index: u64) -> EtcdError {
        match self {
            ProposeError::NotLeader(_) => EtcdError::new(code::LEADER_ELECT, "no leader reachable", index),
            ProposeError::Timeout => {
                EtcdError::new(code::RAFT_INTERNAL, "timed out waiting for a quorum of members", index)
            }
            ProposeError::Fatal(m) => EtcdError::new(code::RAFT_INTERNAL, m.clone(), index),
        }
    }
}

/// Why a request forwarded to the leader got no answer from it.
#[derive(Debug)]
enum ForwardError {
    /// The request never reached the leader (no connection): it has no effect.
    NotSent(String),
    /// The request may have reached the leader, but its answer was lost or late: a write may or may not have
    /// been applied (the client must read to find out, as after an etcd `request timed out`).
    NoAnswer(String),
}

impl ForwardError {
    /// 301 only when the request certainly had no effect; otherwise 300, like etcd's `request timed out`.
    fn to_etcd(&self, index: u64) -> EtcdError {
        match self {
            ForwardError::NotSent(cause) => EtcdError::new(code::LEADER_ELECT, format!("no leader reachable: {cause}"), index),
            ForwardError::NoAnswer(cause) => EtcdError::new(
                code::RAFT_INTERNAL,
                format!("{cause}; the request may or may not have taken effect"),
                index,
            ),
        }
    }
}

/// Shared state of a running member.
pub struct Ctx {
    /// Member id.
    pub id: u64,
    /// Member name.
    pub name: String,
    /// Raft handle.
    pub raft: Raft,
    /// State machine (applied KV state).
    pub sm: StateMachine,
    /// Pooled HTTP client.
    pub client: HttpClient,
    /// Cluster token.
    pub token: String,
    /// Cluster id (`X-Etcd-Cluster-Id`).
    pub cluster_id: u64,
    /// Advertised client URLs.
    pub client_urls: Vec<String>,
    /// Own peer URL.
    pub peer_url: String,
    /// Storage counters.
    pub storage_metrics: Arc<StorageMetrics>,
    /// Proposals made.
    pub proposals: AtomicU64,
    /// Proposals failed.
    pub proposals_failed: AtomicU64,
    /// Requests forwarded to the leader.
    pub forwarded: AtomicU64,
    /// Open watches.
    pub watchers: AtomicI64,
    /// Start time (Unix ns).
    pub start_nanos: i64,
    /// Source addresses of containers (see [`crate::api::access`]).
    pub container_subnet: Option<Subnet>,
    /// Connection budgets of the listeners.
    pub connections: Arc<crate::connections::Budgets>,
    /// Linearizable reads waiting for a shared leadership check.
    reads: Arc<std::sync::Mutex<ReadQueue>>,
    /// Queue of the proposal batcher.
    batch_tx: tokio::sync::mpsc::UnboundedSender<(RaftRequest, tokio::sync::oneshot::Sender<Result<RaftResponse, ProposeError>>)>,
    /// Proposal slots shared by the batcher and [`Ctx::propose`]'s direct path ([`BATCHES_IN_FLIGHT`]).
    batch_slots: Arc<tokio::sync::Semaphore>,
}

/// Most proposals carried by one log entry.
const MAX_BATCH: usize = 512;
/// Batches in flight at once. One: everything that queues while a batch commits makes the next, larger batch
/// (64 connections, interleaved runs: 1 gave ≈ 29.4k req/s, p99 3.6–3.7 ms; 2 gave ≈ 28.2k, p99 3.8–4.1 ms;
/// the same at 1 connection).
const BATCHES_IN_FLIGHT: usize = 1;

type Pending = (RaftRequest, tokio::sync::oneshot::Sender<Result<RaftResponse, ProposeError>>);

/// Group proposals: take whatever queued while earlier batches were committing, propose it as one entry.
async fn batcher(raft: Raft, slots: Arc<tokio::sync::Semaphore>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let (reqs, txs): (Vec<RaftRequest>, Vec<_>) = batch.into_iter().unzip();
            let single = reqs.len() == 1;
            let req = if single { reqs.into_iter().next().unwrap_or(RaftRequest::Batch(Vec::new().into())) } else { RaftRequest::Batch(reqs.into()) };
            let r = write(&raft, req, permit).await;
            match r {
                Ok(RaftResponse::Batch(rs)) if !single => {
                    for (tx, r) in txs.into_iter().zip(rs) {
                        let _ = tx.send(Ok(r));
                    }
                }
                Ok(r) => {
                    for tx in txs {
                        let _ = tx.send(Ok(r.clone()));
                    }
                }
                Err(e) => {
                    for tx in txs {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

/// Propose one entry holding a proposal slot; the slot is free again once the entry is applied (or failed).
async fn write(raft: &Raft, req: RaftRequest, slot: tokio::sync::OwnedSemaphorePermit) -> Result<RaftResponse, ProposeError> {
    let r = tokio::time::timeout(PROPOSE_TIMEOUT, raft.client_write(req)).await;
    drop(slot);
    match r {
        Err(_) => Err(ProposeError::Timeout),
        Ok(Ok(resp)) => Ok(resp.data),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(map_forward(Some(&f))),
        Ok(Err(e)) => Err(ProposeError::Fatal(e.to_string())),
    }
}

/// Linearizable reads waiting for a leadership check (see [`Ctx::linearize`]).
#[derive(Default)]
pub struct ReadQueue {
    waiting: Vec<tokio::sync::oneshot::Sender<Result<(), ProposeError>>>,
    checking: bool,
}

/// Run leadership checks until no read is waiting; each check answers the reads queued before it started.
async fn read_checker(raft: Raft, q: Arc<std::sync::Mutex<ReadQueue>>) {
    loop {
        let batch = {
            let mut q = q.lock().unwrap_or_else(|e| e.into_inner());
            if q.waiting.is_empty() {
                q.checking = false;
                return;
            }
            std::mem::take(&mut q.waiting)
        };
        let r = match tokio::time::timeout(PROPOSE_TIMEOUT, raft.ensure_linearizable()).await {
            Err(_) => Err(ProposeError::Timeout),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => Err(map_forward(Some(&f))),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => Err(ProposeError::Timeout),
            Ok(Err(e)) => Err(ProposeError::Fatal(e.to_string())),
        };
        for tx in batch {
            let _ = tx.send(r.clone());
        }
    }
}

/// Log entries kept behind a snapshot for followers that lag a little (more lag gets the snapshot).
const LOG_KEPT_AFTER_SNAPSHOT: u64 = 200;

/// Trigger a snapshot whenever `limit` bytes of log were written since the last one. openraft's policy counts
/// entries only; with group commit one entry can hold hundreds of writes, and the store file lives on a small
/// partition (Keel's ROOT is 256 MiB).
async fn snapshot_by_size(raft: Raft, metrics: Arc<StorageMetrics>, limit: u64) {
    // (when, snapshot count then) of the last request.
    let mut asked: Option<(tokio::time::Instant, u64)> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if metrics.log_bytes_since_snapshot.load(Ordering::Relaxed) < limit {
            continue;
        }
        // Ask again only once the last request was served, or after 10 s if it was not.
        let built = metrics.snapshots.load(Ordering::Relaxed);
        if asked.is_some_and(|(t, n)| n == built && t.elapsed() < Duration::from_secs(10)) {
            continue;
        }
        tracing::info!("{} bytes of log since the last snapshot: building one", metrics.log_bytes_since_snapshot.load(Ordering::Relaxed));
        if raft.trigger().snapshot().await.is_err() {
            return;
        }
        asked = Some((tokio::time::Instant::now(), built));
    }
}

/// One entry of `/v2/members`, in etcd's field order.
#[derive(serde::Serialize)]
struct MemberJson {
    id: String,
    name: String,
    #[serde(rename = "peerURLs")]
    peer_urls: Vec<String>,
    #[serde(rename = "clientURLs")]
    client_urls: Vec<String>,
}

#[derive(serde::Serialize)]
struct MembersJson {
    members: Vec<MemberJson>,
}

fn map_forward(f: Option<&openraft::error::ForwardToLeader<u64, Member>>) -> ProposeError {
    ProposeError::NotLeader(f.and_then(|f| f.leader_node.as_ref()).map(|n| n.peer_url.clone()))
}

impl Ctx {
    /// The leader's peer URL if the leader is another member; waits up to 3 s for an election.
    pub async fn leader_peer_url_if_remote(&self) -> Option<String> {
        let mut rx = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            {
                let m = rx.borrow_and_update();
                if let Some(l) = m.current_leader {
                    if l == self.id {
                        return None;
                    }
                    return m.membership_config.membership().get_node(&l).map(|n| n.peer_url.clone());
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return None;
            }
        }
    }

    /// Propose a raw command; returns the applied response.
    pub async fn propose(&self, req: RaftRequest) -> Result<RaftResponse, ProposeError> {
        self.proposals.fetch_add(1, Ordering::Relaxed);
        // Nothing in flight and nobody waiting for a slot: propose from here, saving the two task hops through the
        // batcher (a slot that frees while proposals wait goes to the batcher first: the semaphore is fair).
        let r = if let Ok(slot) = self.batch_slots.clone().try_acquire_owned() {
            write(&self.raft, req, slot).await
        } else {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if self.batch_tx.send((req, tx)).is_err() {
                Err(ProposeError::Fatal("proposal queue closed".into()))
            } else {
                rx.await.unwrap_or_else(|_| Err(ProposeError::Fatal("proposal dropped".into())))
            }
        };
        if r.is_err() {
            self.proposals_failed.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Propose a keys write stamped with this member's clock.
    pub async fn propose_kv(&self, op: KvOp) -> Result<Result<WriteOk, EtcdError>, ProposeError> {
        let now = crate::kv::time::now_nanos();
        match self.propose(RaftRequest::Kv { op, now }).await? {
            RaftResponse::Kv(r) => Ok(*r),
            other => Err(ProposeError::Fatal(format!("unexpected response {other:?}"))),
        }
    }

    /// Confirm leadership with a quorum and wait until the local state has applied the read index.
    ///
    /// Concurrent reads share one check (like etcd's ReadIndex batching): a read joins the queue, and the next
    /// check to *start* after it joined answers it, so every write acknowledged before the read arrived is in
    /// the state it then reads. One check at a time; reads arriving meanwhile wait for the next.
    pub async fn linearize(&self) -> Result<(), ProposeError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start_checker = {
            let mut q = self.reads.lock().unwrap_or_else(|e| e.into_inner());
            q.waiting.push(tx);
            !std::mem::replace(&mut q.checking, true)
        };
        if start_checker {
            tokio::spawn(read_checker(self.raft.clone(), self.reads.clone()));
        }
        rx.await.unwrap_or_else(|_| Err(ProposeError::Fatal("read check stopped".into())))
    }

    /// Proxy a client request to the leader's peer listener.
    pub async fn forward(
        &self,
        leader_peer_url: &str,
        method: &str,
        path_and_query: &str,
        headers: &hyper::HeaderMap,
        body: Bytes,
    ) -> Response<Body> {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        let url = format!("{}/keel/client{}", leader_peer_url.trim_end_matches('/'), path_and_query);
        let mut b = Request::builder()
            .method(method)
            .uri(&url)
            .header(TOKEN_HEADER, &self.token)
            .header(FROM_HEADER, format!("{:016x}", self.id));
        if let Some(ct) = headers.get("content-type") {
            b = b.header("content-type", ct);
        }
        let err = |e: ForwardError| {
            let e = e.to_etcd(self.sm.store_index());
            Response::builder()
                .status(e.status())
                .header("content-type", "application/json")
                .header("x-etcd-cluster-id", format!("{:x}", self.cluster_id))
                .header("x-etcd-index", e.index.to_string())
                .body(Full::new(Bytes::from(e.to_json())).boxed())
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
        };
        let req = match b.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => return err(ForwardError::NotSent(format!("cannot build forwarded request: {e}"))),
        };
        let fut = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let cause = format!("forwarding to leader {leader_peer_url}: {e}");
                if e.is_connect() { ForwardError::NotSent(cause) } else { ForwardError::NoAnswer(cause) }
            })?;
            let (parts, body) = resp.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|e| ForwardError::NoAnswer(format!("reading the answer of leader {leader_peer_url}: {e}")))?
                .to_bytes();
            Ok::<_, ForwardError>(Response::from_parts(parts, Full::new(bytes).boxed()))
        };
        match tokio::time::timeout(PROPOSE_TIMEOUT + Duration::from_secs(2), fut).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => err(e),
            Err(_) => err(ForwardError::NoAnswer(format!("leader {leader_peer_url} did not answer in time"))),
        }
    }

    fn member_list(&self) -> Vec<(u64, Member, bool)> {
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership().clone();
        let voters: BTreeSet<u64> = mem.voter_ids().collect();
        mem.nodes().map(|(id, n)| (*id, n.clone(), voters.contains(id))).collect()
    }

    /// `/v2/members` body.
    pub fn members_json(&self) -> String {
        let attrs = self.sm.data.read().map(|d| d.attrs.clone()).unwrap_or_default();
        let members: Vec<MemberJson> = self
            .member_list()
            .into_iter()
            .map(|(id, n, _)| {
                let (name, urls) = attrs.get(&id).cloned().unwrap_or((n.name.clone(), Vec::new()));
                MemberJson { id: format!("{id:016x}"), name, peer_urls: vec![n.peer_url], client_urls: urls }
            })
            .collect();
        format!("{}\n", serde_json::to_string(&MembersJson { members }).unwrap_or_default())
    }

    /// `/keel/status` body: leader, term, indexes, members.
    pub fn status_json(&self) -> String {
        let m = self.raft.metrics().borrow().clone();
        let attrs = self.sm.data.read().map(|d| d.attrs.clone()).unwrap_or_default();
        let members: Vec<serde_json::Value> = self
            .member_list()
            .into_iter()
            .map(|(id, n, voter)| {
                let (name, urls) = attrs.get(&id).cloned().unwrap_or((n.name.clone(), Vec::new()));
                serde_json::json!({"id": format!("{id:016x}"), "name": name, "peerURL": n.peer_url, "clientURLs": urls,
                    "voter": voter, "leader": m.current_leader == Some(id)})
            })
            .collect();
        let v = serde_json::json!({
            "id": format!("{:016x}", self.id),
            "name": self.name,
            "leader": m.current_leader.map(|l| format!("{l:016x}")),
            "isLeader": m.current_leader == Some(self.id),
            "term": m.current_term,
            "lastLogIndex": m.last_log_index.unwrap_or(0),
            "commitIndex": self.storage_metrics.committed.load(Ordering::Relaxed),
            "appliedIndex": m.last_applied.map(|l| l.index).unwrap_or(0),
            "storeIndex": self.sm.store_index(),
            "snapshotIndex": m.snapshot.map(|l| l.index),
            "purgedIndex": m.purged.map(|l| l.index),
            "members": members,
        });
        format!("{v}\n")
    }

    /// Add a member: as a learner first (catches up, possibly via snapshot), then promote to voter.
    pub async fn add_member(&self, name: String, peer_url: String) -> Result<String, String> {
        let peer_url = peer_url.trim_end_matches('/').to_string();
        parse_url_addr(&peer_url).map_err(|e| e.to_string())?;
        let id = member_id(&peer_url, &self.token);
        let node = Member { name: name.clone(), peer_url: peer_url.clone() };
        tokio::time::timeout(Duration::from_secs(60), self.raft.add_learner(id, node, true))
            .await
            .map_err(|_| "timed out adding learner".to_string())?
            .map_err(|e| e.to_string())?;
        let voters: BTreeSet<u64> = [id].into_iter().collect();
        tokio::time::timeout(Duration::from_secs(30), self.raft.change_membership(ChangeMembers::AddVoterIds(voters), false))
            .await
            .map_err(|_| "timed out promoting member".to_string())?
            .map_err(|e| e.to_string())?;
        let m = MemberJson { id: format!("{id:016x}"), name, peer_urls: vec![peer_url], client_urls: Vec::new() };
        Ok(format!("{}\n", serde_json::to_string(&m).unwrap_or_default()))
    }

    /// Remove a member (voter or learner).
    pub async fn remove_member(&self, id: u64) -> Result<(), String> {
        let list = self.member_list();
        let Some((_, _, voter)) = list.iter().find(|(i, _, _)| *i == id) else {
            return Err(format!("member {id:016x} not found"));
        };
        let ids: BTreeSet<u64> = [id].into_iter().collect();
        if *voter {
            tokio::time::timeout(Duration::from_secs(30), self.raft.change_membership(ChangeMembers::RemoveVoters(ids.clone()), false))
                .await
                .map_err(|_| "timed out removing voter".to_string())?
                .map_err(|e| e.to_string())?;
        }
        let still = self.member_list().iter().any(|(i, _, _)| *i == id);
        if still {
            tokio::time::timeout(Duration::from_secs(30), self.raft.change_membership(ChangeMembers::RemoveNodes(ids), false))
                .await
                .map_err(|_| "timed out removing learner".to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn simple(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    reply(status, "application/json", body)
}

fn reply(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

async fn peer_handle(ctx: Arc<Ctx>, mut req: Request<Incoming>) -> Response<Body> {
    let token_ok = req.headers().get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) == Some(ctx.token.as_str());
    if !token_ok {
        return simple(403, "{\"message\":\"wrong or missing cluster token; this member belongs to another cluster\"}\n");
    }
    let path = req.uri().path().to_string();
    if let Some(rest) = path.strip_prefix("/keel/client") {
        let pq = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
        let new = pq.strip_prefix("/keel/client").unwrap_or(rest).to_string();
        match new.parse() {
            Ok(u) => *req.uri_mut() = u,
            Err(_) => return simple(400, "{\"message\":\"bad forwarded URI\"}\n"),
        }
        return api::handle(ctx, req, true, Access::Full).await;
    }
    let req_content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = match Limited::new(req.into_body(), 512 * 1024 * 1024).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return simple(400, format!("{{\"message\":\"reading body: {e}\"}}\n")),
    };
    let enc = match req_content_type.as_deref() {
        Some(codec::PEER_CONTENT_TYPE) => Encoding::Postcard,
        _ => Encoding::Json,
    };
    fn answer<T: serde::Serialize>(enc: Encoding, v: &T) -> Response<Body> {
        match enc.encode(v) {
            Ok(b) => reply(200, enc.content_type(), b),
            Err(e) => simple(500, format!("{{\"message\":\"encode: {e}\"}}\n")),
        }
    }
    macro_rules! decode {
        ($t:ty) => {
            match enc.decode::<$t>(&body) {
                Ok(v) => v,
                Err(e) => return simple(400, format!("{{\"message\":\"decode: {e}\"}}\n")),
            }
        };
    }
    match path.as_str() {
        "/raft/append" => answer(enc, &ctx.raft.append_entries(decode!(openraft::raft::AppendEntriesRequest<crate::raft::TypeConfig>)).await),
        "/raft/vote" => answer(enc, &ctx.raft.vote(decode!(openraft::raft::VoteRequest<u64>)).await),
        "/raft/snapshot" => answer(enc, &ctx.raft.install_snapshot(decode!(openraft::raft::InstallSnapshotRequest<crate::raft::TypeConfig>)).await),
        "/keel/elect" => {
            // Leader transfer: the old leader asks this (caught-up) follower to campaign now.
            let r: Result<(), String> = ctx.raft.trigger().elect().await.map_err(|e| e.to_string());
            answer(enc, &r)
        }
        "/keel/propose" => {
            let req = decode!(RaftRequest);
            let r: Result<RaftResponse, String> = ctx.propose(req).await.map_err(|e| e.to_string());
            answer(enc, &r)
        }
        _ => simple(404, "{\"message\":\"no such peer endpoint\"}\n"),
    }
}

async fn serve(listener: TcpListener, ctx: Arc<Ctx>, peer: bool) {
    loop {
        let (stream, access, admitted) = crate::connections::accept(&listener, &ctx.connections, peer, |stream, from| {
            let local = stream.local_addr().map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
            crate::api::access::of(ctx.container_subnet.as_ref(), from.ip(), local)
        })
        .await;
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move {
                    let r = match (peer, access) {
                        // The cluster token is the peer port's only guard, and it has a well-known default
                        // (a second guard: `connections::admit` already closes containers' peer connections).
                        (true, Access::Container) => simple(403, "{\"message\":\"the peer port does not serve containers\"}\n"),
                        (true, Access::Full) => peer_handle(ctx, req).await,
                        (false, _) => api::handle(ctx, req, false, access).await,
                    };
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Listen on `addr` whether or not it is (yet) an address of this machine: connections are accepted as soon
/// as it is (IP_FREEBIND, as systemd's `FreeBind=`).
fn bind_freebind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    if addr.is_ipv4() {
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::IpFreebind, &true).map_err(std::io::Error::from)?;
    }
    sock.bind(addr)?;
    sock.listen(1024)
}

/// Leader duty: propose expiry of keys whose TTL has passed. Every member runs it; only the leader acts.
async fn expiry_loop(ctx: Arc<Ctx>) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let is_leader = ctx.raft.metrics().borrow().current_leader == Some(ctx.id);
        if !is_leader {
            continue;
        }
        let next = ctx.sm.data.read().ok().and_then(|d| d.store.next_expiry());
        let now = crate::kv::time::now_nanos();
        if next.is_some_and(|n| n <= now) {
            if let Err(e) = ctx.propose(RaftRequest::Expire { now }).await {
                tracing::debug!("expiry proposal failed: {e}");
            }
        }
    }
}

/// Publish this member's name and client URLs through the log (retried until applied).
async fn publish_attrs(ctx: Arc<Ctx>) {
    let want = (ctx.name.clone(), ctx.client_urls.clone());
    loop {
        let have = ctx.sm.data.read().ok().and_then(|d| d.attrs.get(&ctx.id).cloned());
        if have.as_ref() == Some(&want) {
            return;
        }
        let req = RaftRequest::Attrs { id: ctx.id, name: want.0.clone(), client_urls: want.1.clone() };
        let leader = ctx.raft.metrics().borrow().current_leader;
        match leader {
            Some(l) if l == ctx.id => {
                let _ = ctx.propose(req).await;
            }
            Some(_) => {
                if let Some(url) = ctx.leader_peer_url_if_remote().await {
                    let url = format!("{url}/keel/propose");
                    let _: Result<Result<RaftResponse, String>, _> =
                        post(&ctx.client, &url, &ctx.token, ctx.id, &req, Duration::from_secs(5), Encoding::Json).await;
                }
            }
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A started member.
pub struct Running {
    /// Shared state.
    pub ctx: Arc<Ctx>,
}

/// Start a member: open storage, start Raft, bind listeners, bootstrap if new. Returns once serving.
pub async fn start(cfg: Config) -> Result<Running, ServerError> {
    let metrics = Arc::new(StorageMetrics::default());
    let (log, sm) = storage::open(&cfg.data_dir, metrics.clone())?;
    let has_state = {
        let d = sm.data.read().map_err(|_| ServerError::Raft("lock poisoned".into()))?;
        d.last_applied.is_some()
    };
    let mut log_probe = log.clone();
    let log_state = openraft::storage::RaftLogStorage::get_log_state(&mut log_probe)
        .await
        .map_err(|e| ServerError::Raft(e.to_string()))?;
    let has_state = has_state || log_state.last_log_id.is_some();

    let id = member_id(&cfg.peer_url, &cfg.token);
    let raft_cfg = openraft::Config {
        cluster_name: "keel".into(),
        heartbeat_interval: cfg.heartbeat_ms,
        election_timeout_min: cfg.election_timeout_ms,
        election_timeout_max: cfg.election_timeout_ms * 2,
        install_snapshot_timeout: 5000,
        max_payload_entries: 512,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_count),
        max_in_snapshot_log_to_keep: (cfg.snapshot_count / 2).min(LOG_KEPT_AFTER_SNAPSHOT),
        ..Default::default()
    }
    .validate()
    .map_err(|e| ServerError::Config(e.to_string()))?;
    let client = http_client();
    let network = Network { client: client.clone(), token: cfg.token.clone(), from: id };
    let raft = Raft::new(id, Arc::new(raft_cfg), network, log, sm.clone())
        .await
        .map_err(|e| ServerError::Raft(e.to_string()))?;

    let (batch_tx, batch_rx) = tokio::sync::mpsc::unbounded_channel();
    let batch_slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    tokio::spawn(batcher(raft.clone(), batch_slots.clone(), batch_rx));
    tokio::spawn(snapshot_by_size(raft.clone(), metrics.clone(), cfg.snapshot_log_bytes));
    let ctx = Arc::new(Ctx {
        batch_tx,
        batch_slots,
        id,
        name: cfg.name.clone(),
        raft: raft.clone(),
        sm,
        client,
        token: cfg.token.clone(),
        cluster_id: crate::raft::fnv64(&["keel-cluster", &cfg.token]),
        client_urls: cfg.advertise_client_urls.clone(),
        peer_url: cfg.peer_url.clone(),
        storage_metrics: metrics,
        proposals: AtomicU64::new(0),
        proposals_failed: AtomicU64::new(0),
        reads: Arc::default(),
        forwarded: AtomicU64::new(0),
        watchers: AtomicI64::new(0),
        start_nanos: crate::kv::time::now_nanos(),
        container_subnet: cfg.container_subnet,
        connections: Arc::new(crate::connections::Budgets::new(crate::connections::Limits::within(
            crate::connections::nofile_limit(),
            cfg.max_container_connections,
        ))),
    });

    let peer = TcpListener::bind(cfg.peer_addr).await.map_err(|source| ServerError::Bind { addr: cfg.peer_addr, source })?;
    tokio::spawn(serve(peer, ctx.clone(), true));
    for a in &cfg.client_addrs {
        let l = TcpListener::bind(a).await.map_err(|source| ServerError::Bind { addr: *a, source })?;
        tokio::spawn(serve(l, ctx.clone(), false));
    }
    for a in &cfg.late_client_addrs {
        match bind_freebind(*a) {
            Ok(l) => {
                tokio::spawn(serve(l, ctx.clone(), false));
            }
            Err(e) => tracing::warn!("not serving clients on {a}: {e}"),
        }
    }

    if !has_state && cfg.state == ClusterState::New {
        let members: BTreeMap<u64, Member> = cfg
            .initial_cluster
            .iter()
            .map(|(n, u)| (member_id(u, &cfg.token), Member { name: n.clone(), peer_url: u.clone() }))
            .collect();
        if !members.contains_key(&id) {
            return Err(ServerError::Config(format!(
                "this member's peer URL {} is not in --initial-cluster (by name {:?}); check the flags",
                cfg.peer_url, cfg.name
            )));
        }
        // Every member initializes with the identical membership; openraft accepts this.
        if let Err(e) = raft.initialize(members).await {
            tracing::info!("initialize: {e}");
        }
    } else if has_state {
        tracing::info!("rejoining with existing data in {}", cfg.data_dir.display());
    }
    tokio::spawn(expiry_loop(ctx.clone()));
    tokio::spawn(publish_attrs(ctx.clone()));
    Ok(Running { ctx })
}

impl Running {
    /// If leader, hand leadership to the most caught-up voter before stopping (openraft 0.9 has no transfer
    /// API: the chosen follower is asked to campaign; its log is at least as long, so it wins).
    async fn transfer_leadership(&self) {
        let ctx = &self.ctx;
        let m = ctx.raft.metrics().borrow().clone();
        if m.current_leader != Some(ctx.id) {
            return;
        }
        let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
        let best = m
            .replication
            .as_ref()
            .and_then(|r| r.iter().filter(|(id, _)| **id != ctx.id && voters.contains(id)).max_by_key(|(_, l)| l.map(|l| l.index)).map(|(id, _)| *id));
        let Some(target) = best else { return };
        let Some(node) = m.membership_config.membership().get_node(&target).cloned() else { return };
        let url = format!("{}/keel/elect", node.peer_url);
        let _: Result<Result<(), String>, _> = post(&ctx.client, &url, &ctx.token, ctx.id, &(), Duration::from_secs(2), Encoding::Json).await;
        let _ = ctx
            .raft
            .wait(Some(Duration::from_secs(3)))
            .metrics(|m| m.current_leader.is_some_and(|l| l != ctx.id), "leader transferred")
            .await;
    }

    /// Stop Raft (on SIGTERM).
    pub async fn shutdown(self) -> Result<(), ServerError> {
        // Take a final snapshot so a restart replays little.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ctx.raft.trigger().snapshot()).await;
        self.transfer_leadership().await;
        self.ctx.raft.shutdown().await.map_err(|e| ServerError::Raft(e.to_string()))
    }
}

