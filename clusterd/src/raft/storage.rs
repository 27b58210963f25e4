//! Durable Raft storage in one redb file: the log, the vote, the committed id and the state-machine snapshot.
//!
//! Owns: `<data-dir>/clusterd.redb` (log, vote, committed hint, purge point) and `<data-dir>/snapshot.redb`
//! (the latest snapshot), and everything in them. Log appends go to a single writer thread that
//! drains every queued operation into ONE redb write transaction committed with `Durability::Immediate`
//! (group commit, like etcd's batched fsync) and only then fires openraft's `LogFlushed` callbacks.
//! Entries queued but not yet committed, and the last few hundred after that, are served to readers from memory.
//!
//! The state machine ([`SmData`]) lives in memory and is persisted, together with its last-applied log id and
//! membership, in one transaction of its own file whenever a snapshot is built or installed (a file of its
//! own so that writing a megabyte snapshot never holds up log appends, which share one redb writer lock
//! per file). A snapshot is durable before openraft compacts the log behind it. On restart it is
//! loaded from there and openraft re-applies the committed log after it, so replay is idempotent.
//! On open, the whole file is integrity-checked (redb page checksums) and every record is decoded; any
//! failure is a [`StorageError::Corrupt`] and the member refuses to start rather than serve wrong data.
//! Does not: decide what entries mean (see `kv`) or talk to peers (see `network`).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{codec, Member, Request, Response, TypeConfig};
use crate::kv::Store;

type StorageErr = openraft::StorageError<u64>;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// In `snapshot.redb`: "meta" → the snapshot's [`SnapshotMeta`] (JSON), "data" → the applied state
/// ([`SmData`] as JSON, zstd-compressed).
const SNAP: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// Errors opening or using the store file.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The file exists but cannot be trusted.
    #[error(
        "store {} is corrupt or truncated ({detail}); refusing to start. {}", .path.display(), readd_hint(.path)
    )]
    Corrupt {
        /// The redb file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// The data directory cannot be used.
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A redb operation failed.
    #[error("store {path}: {detail}")]
    Redb {
        /// The redb file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

/// The applied state, persisted as one blob with the snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SmData {
    /// Last applied log id.
    pub last_applied: Option<LogId<u64>>,
    /// Last applied membership.
    pub last_membership: StoredMembership<u64, Member>,
    /// The key space.
    pub store: Store,
    /// Published member attributes: id → (name, client URLs).
    pub attrs: BTreeMap<u64, (String, Vec<String>)>,
}

/// A snapshot as kept on disk and in memory. `data` is [`SmData`] as JSON, zstd-compressed (stores written
/// before snapshot.redb kept plain JSON; [`unpack`] reads both). Peers are sent plain JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, Member>,
    data: Vec<u8>,
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// Compress snapshot JSON for the disk. Level 1: a megabyte of JSON becomes ≈ 10× smaller in ≈ 2 ms, and
/// the smaller write keeps the disk free for the log's fsyncs.
fn pack(json: &[u8]) -> Result<Vec<u8>, String> {
    zstd::bulk::compress(json, 1).map_err(|e| format!("compressing snapshot: {e}"))
}

/// Snapshot JSON from stored (compressed) or plain bytes.
fn unpack(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, String> {
    if bytes.starts_with(&ZSTD_MAGIC) {
        zstd::stream::decode_all(bytes).map(std::borrow::Cow::Owned).map_err(|e| format!("decompressing snapshot: {e}"))
    } else {
        Ok(std::borrow::Cow::Borrowed(bytes))
    }
}

/// Decode the applied state from stored or plain snapshot bytes.
fn decode_state(bytes: &[u8]) -> Result<SmData, String> {
    let json = unpack(bytes)?;
    let mut data: SmData = serde_json::from_slice(&json).map_err(|e| format!("state machine: {e}"))?;
    data.store.rebuild();
    Ok(data)
}

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
pub struct StorageMetrics {
    /// Number of redb commits of the log writer.
    pub fsyncs: AtomicU64,
    /// Total commit time, microseconds.
    pub fsync_micros: AtomicU64,
    /// Commits that took <1ms, <5ms, <20ms, <100ms (cumulative buckets computed on export).
    pub fsync_buckets: [AtomicU64; 5],
    /// Entries appended.
    pub entries: AtomicU64,
    /// Last committed index reported by openraft.
    pub committed: AtomicU64,
    /// Last log index this member has on disk (entries above it are queued to the writer).
    pub durable: AtomicU64,
    /// First log index still in the file (purged entries are dropped a chunk at a time).
    pub log_front: AtomicU64,
    /// Encoded bytes of log entries appended since the last snapshot was built or installed (the server
    /// triggers a snapshot when this passes `--snapshot-log-mb`).
    pub log_bytes_since_snapshot: AtomicU64,
    /// Snapshots built or installed since start.
    pub snapshots: AtomicU64,
}

/// Bucket bounds of `fsync_buckets`, seconds (the last is +Inf).
pub const FSYNC_BUCKETS: [f64; 4] = [0.001, 0.005, 0.02, 0.1];

enum Op {
    Append { entries: Vec<(LogId<u64>, Vec<u8>)>, cb: LogFlushed<TypeConfig> },
    Vote { bytes: Vec<u8>, done: tokio::sync::oneshot::Sender<Result<(), String>> },
    Truncate { from: u64, done: tokio::sync::oneshot::Sender<Result<(), String>> },
    Purge { upto: u64, bytes: Vec<u8>, done: tokio::sync::oneshot::Sender<Result<(), String>> },
}

struct Shared {
    db: Database,
    path: PathBuf,
    /// `snapshot.redb`.
    snap_db: Database,
    /// Recent entries, decoded. Holds every entry queued to the writer and not yet committed to the file
    /// (readers see it at once) and, once durable, the last few (see [`RECENT_KEEP`]), so replication to
    /// followers reads memory instead of the file and skips decoding.
    recent: Mutex<Recent>,
    last_purged: Mutex<Option<LogId<u64>>>,
    last_log: Mutex<Option<LogId<u64>>>,
    /// The newest committed-index hint not yet in the file (JSON). openraft reports every commit; handing each
    /// one to the writer through its queue woke that thread (at nice −10, preempting request handling) once per
    /// commit on every member only for it to find nothing due. It takes the hint from here when it writes.
    committed_hint: Mutex<Option<Vec<u8>>>,
    metrics: Arc<StorageMetrics>,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn sterr(e: impl std::fmt::Display) -> StorageErr {
    StorageIOError::write(&io_err(e)).into()
}

fn rderr(e: impl std::fmt::Display) -> StorageErr {
    StorageIOError::read(&io_err(e)).into()
}

/// The Raft log store handle (cheap to clone).
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
}

/// The state machine handle (cheap to clone; shares the in-memory state with the API).
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
    /// The applied state; the API reads it directly.
    pub data: Arc<RwLock<SmData>>,
    snapshot: Arc<Mutex<Option<StoredSnapshot>>>,
    /// Sends the store index after every applied batch (watchers wait on it).
    pub applied_tx: Arc<tokio::sync::watch::Sender<u64>>,
}

/// What to do about a damaged store at `path`: both files go, the member comes back empty.
fn readd_hint(path: &Path) -> String {
    let dir = path.parent().unwrap_or(path);
    format!(
        "Move the data directory {} away (both clusterd.redb and snapshot.redb), then re-add this member empty: \
         `clusterctl member remove ID`, `clusterctl member add NAME PEER-URL`, and start it with \
         --initial-cluster-state existing",
        dir.display()
    )
}

/// Open (or create) a redb file, integrity-check it if it existed, and make sure its tables exist (`named`:
/// keyed by name, `indexed`: keyed by log index).
fn open_db(
    path: &Path,
    named: &[TableDefinition<&str, &[u8]>],
    indexed: &[TableDefinition<u64, &[u8]>],
) -> Result<Database, StorageError> {
    let corrupt = |detail: String| StorageError::Corrupt { path: path.to_path_buf(), detail };
    let existed = path.exists();
    if existed && std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) == 0 {
        return Err(corrupt("file is empty".into()));
    }
    let mut db = Database::builder().create(path).map_err(|e| corrupt(e.to_string()))?;
    if existed {
        match db.check_integrity() {
            Ok(true) => {}
            Ok(false) => return Err(corrupt("integrity check repaired damaged pages; data may be lost".into())),
            Err(e) => return Err(corrupt(format!("integrity check failed: {e}"))),
        }
    }
    let mut w = db.begin_write().map_err(|e| corrupt(e.to_string()))?;
    w.set_durability(Durability::Immediate);
    for t in named {
        w.open_table(*t).map_err(|e| corrupt(e.to_string()))?;
    }
    for t in indexed {
        w.open_table(*t).map_err(|e| corrupt(e.to_string()))?;
    }
    w.commit().map_err(|e| corrupt(e.to_string()))?;
    Ok(db)
}

/// Read the snapshot of `snapshot.redb`, or (stores from before that file) the one in clusterd.redb's `meta`.
fn read_snapshot(snap_db: &Database, snap_path: &Path, db: &Database, path: &Path) -> Result<Option<StoredSnapshot>, StorageError> {
    let corrupt = |p: &Path, detail: String| StorageError::Corrupt { path: p.to_path_buf(), detail };
    let r = snap_db.begin_read().map_err(|e| corrupt(snap_path, e.to_string()))?;
    let t = r.open_table(SNAP).map_err(|e| corrupt(snap_path, e.to_string()))?;
    let get = |k: &str| t.get(k).map(|v| v.map(|v| v.value().to_vec())).map_err(|e| corrupt(snap_path, e.to_string()));
    match (get("meta")?, get("data")?) {
        (Some(m), Some(data)) => {
            let meta = serde_json::from_slice(&m).map_err(|e| corrupt(snap_path, format!("snapshot meta: {e}")))?;
            return Ok(Some(StoredSnapshot { meta, data }));
        }
        (None, None) => {}
        _ => return Err(corrupt(snap_path, "snapshot meta or data missing".into())),
    }
    let r = db.begin_read().map_err(|e| corrupt(path, e.to_string()))?;
    let t = r.open_table(META).map_err(|e| corrupt(path, e.to_string()))?;
    let Some(v) = t.get("snapshot").map_err(|e| corrupt(path, e.to_string()))? else { return Ok(None) };
    serde_json::from_slice(v.value()).map(Some).map_err(|e| corrupt(path, format!("snapshot: {e}")))
}

/// Stores from before snapshot.redb kept the snapshot under `meta`/`snapshot` in clusterd.redb. Once
/// snapshot.redb holds one, that old copy is never read again: drop it (it can be megabytes). True if it was there.
/// A store without the old copy (every store but the first start after the upgrade) costs one read, no write.
fn drop_legacy_snapshot(db: &Database, path: &Path, snap_db: &Database, snap_path: &Path) -> Result<bool, StorageError> {
    let corrupt = |p: &Path, detail: String| StorageError::Corrupt { path: p.to_path_buf(), detail };
    let has_old = {
        let r = db.begin_read().map_err(|e| corrupt(path, e.to_string()))?;
        let t = r.open_table(META).map_err(|e| corrupt(path, e.to_string()))?;
        t.get("snapshot").map_err(|e| corrupt(path, e.to_string()))?.is_some()
    };
    if !has_old {
        return Ok(false);
    }
    let has_new = {
        let r = snap_db.begin_read().map_err(|e| corrupt(snap_path, e.to_string()))?;
        let t = r.open_table(SNAP).map_err(|e| corrupt(snap_path, e.to_string()))?;
        t.get("meta").map_err(|e| corrupt(snap_path, e.to_string()))?.is_some()
    };
    if !has_new {
        return Ok(false);
    }
    let mut w = db.begin_write().map_err(|e| corrupt(path, e.to_string()))?;
    w.set_durability(Durability::Immediate);
    let removed = {
        let mut meta = w.open_table(META).map_err(|e| corrupt(path, e.to_string()))?;
        let old = meta.remove("snapshot").map_err(|e| corrupt(path, e.to_string()))?;
        old.is_some()
    };
    w.commit().map_err(|e| corrupt(path, e.to_string()))?;
    Ok(removed)
}

/// Write `snap` to `snapshot.redb` in one durable transaction.
fn write_snapshot(db: &Database, snap: &StoredSnapshot) -> Result<(), String> {
    let meta = serde_json::to_vec(&snap.meta).map_err(|e| e.to_string())?;
    let mut w = db.begin_write().map_err(|e| e.to_string())?;
    w.set_durability(Durability::Immediate);
    {
        let mut t = w.open_table(SNAP).map_err(|e| e.to_string())?;
        t.insert("meta", meta.as_slice()).map_err(|e| e.to_string())?;
        t.insert("data", snap.data.as_slice()).map_err(|e| e.to_string())?;
    }
    w.commit().map_err(|e| e.to_string())
}

/// Open (or create) `<dir>/clusterd.redb` and `<dir>/snapshot.redb`, verify them, and return the log store
/// and state machine.
pub fn open(dir: &Path, metrics: Arc<StorageMetrics>) -> Result<(LogStore, StateMachine), StorageError> {
    std::fs::create_dir_all(dir).map_err(|source| StorageError::DataDir { path: dir.to_path_buf(), source })?;
    let path = dir.join("clusterd.redb");
    let snap_path = dir.join("snapshot.redb");
    let corrupt = |detail: String| StorageError::Corrupt { path: path.clone(), detail };
    // clusterd.redb is always created first; a snapshot file without it means the log and the vote were lost,
    // and a member that forgot its vote could vote twice in one term.
    if !path.exists() && snap_path.exists() {
        return Err(corrupt("the file is missing but snapshot.redb is there: this member's Raft log and vote are gone".into()));
    }
    let db = open_db(&path, &[META], &[LOG])?;
    let snap_db = open_db(&snap_path, &[SNAP], &[])?;
    // Decode everything once: a damaged record means we refuse to start.
    let first_index;
    let (last_purged, last_log, snapshot) = {
        let r = db.begin_read().map_err(|e| corrupt(e.to_string()))?;
        let meta = r.open_table(META).map_err(|e| corrupt(e.to_string()))?;
        let get = |k: &str| -> Result<Option<Vec<u8>>, StorageError> {
            Ok(meta.get(k).map_err(|e| corrupt(e.to_string()))?.map(|v| v.value().to_vec()))
        };
        let last_purged: Option<LogId<u64>> = match get("last_purged")? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| corrupt(format!("last_purged: {e}")))?,
            None => None,
        };
        if let Some(b) = get("vote")? {
            let _: Vote<u64> = serde_json::from_slice(&b).map_err(|e| corrupt(format!("vote: {e}")))?;
        }
        // The snapshot lives in snapshot.redb; stores written before it existed kept it in `meta`.
        let snapshot = read_snapshot(&snap_db, &snap_path, &db, &path)?;
        // Entries up to `last_purged` are gone from the log: the snapshot must cover them.
        let covered = snapshot.as_ref().and_then(|s| s.meta.last_log_id.map(|l| l.index));
        if let Some(p) = last_purged.filter(|p| covered < Some(p.index)) {
            return Err(StorageError::Corrupt {
                path: snap_path.clone(),
                detail: format!(
                    "the log was compacted up to index {} but the snapshot that replaces it {}",
                    p.index,
                    covered.map_or("is missing".to_string(), |c| format!("ends at {c}"))
                ),
            });
        }
        let log = r.open_table(LOG).map_err(|e| corrupt(e.to_string()))?;
        // Where the file's log starts; an empty log has nothing left to drop after the purge point.
        first_index = match log.first().map_err(|e| corrupt(e.to_string()))? {
            Some((k, _)) => k.value(),
            None => last_purged.map_or(0, |l| l.index + 1),
        };
        let mut last_log = last_purged;
        let mut expect: Option<u64> = None;
        for item in log.iter().map_err(|e| corrupt(e.to_string()))? {
            let (k, v) = item.map_err(|e| corrupt(e.to_string()))?;
            let ent = codec::decode_entry(v.value()).map_err(|e| corrupt(format!("log entry {}: {e}", k.value())))?;
            if ent.log_id.index != k.value() || expect.is_some_and(|x| x != k.value()) {
                return Err(corrupt(format!("log entry {} out of sequence", k.value())));
            }
            expect = Some(k.value() + 1);
            last_log = Some(ent.log_id);
        }
        (last_purged, last_log, snapshot)
    };
    if drop_legacy_snapshot(&db, &path, &snap_db, &snap_path)? {
        tracing::info!("dropped the old copy of the snapshot from {} (snapshot.redb holds the current one)", path.display());
    }
    let data = match &snapshot {
        Some(s) => decode_state(&s.data).map_err(|detail| StorageError::Corrupt { path: snap_path.clone(), detail })?,
        None => SmData::default(),
    };
    let index = data.store.index();
    metrics.durable.store(last_log.map_or(0, |l| l.index), Ordering::Relaxed);
    let shared = Arc::new(Shared {
        db,
        path,
        snap_db,
        recent: Mutex::new(Recent::default()),
        last_purged: Mutex::new(last_purged),
        last_log: Mutex::new(last_log),
        committed_hint: Mutex::new(None),
        metrics,
    });
    let (tx, rx) = mpsc::channel();
    let wshared = shared.clone();
    std::thread::Builder::new()
        .name("raft-log-writer".into())
        .spawn(move || {
            raise_writer_priority();
            writer(wshared, rx, first_index)
        })
        .map_err(|e| StorageError::Redb { path: dir.to_path_buf(), detail: format!("cannot start writer: {e}") })?;
    let (applied_tx, _) = tokio::sync::watch::channel(index);
    Ok((
        LogStore { shared: shared.clone(), tx },
        StateMachine {
            shared,
            data: Arc::new(RwLock::new(data)),
            snapshot: Arc::new(Mutex::new(snapshot)),
            applied_tx: Arc::new(applied_tx),
        },
    ))
}

/// Open and fully verify the store in `dir` without starting anything (used by `clusterd` in a child process).
pub fn verify(dir: &Path) -> Result<(), StorageError> {
    let rt = tokio::runtime::Builder::new_current_thread().build().map_err(|e| StorageError::Redb { path: dir.to_path_buf(), detail: e.to_string() })?;
    let _g = rt.enter();
    open(dir, Arc::new(StorageMetrics::default())).map(|_| ())
}

fn record_fsync(m: &StorageMetrics, el: std::time::Duration) {
    m.fsyncs.fetch_add(1, Ordering::Relaxed);
    m.fsync_micros.fetch_add(el.as_micros() as u64, Ordering::Relaxed);
    let secs = el.as_secs_f64();
    let b = FSYNC_BUCKETS.iter().position(|x| secs <= *x).unwrap_or(FSYNC_BUCKETS.len());
    m.fsync_buckets[b].fetch_add(1, Ordering::Relaxed);
}

/// Log entries a writer transaction deletes at most from the front of the log after a purge. Purged entries
/// are dropped a few at a time, in the transactions that append new ones (or in idle moments), so compaction
/// never holds up an append: deleting thousands of entries in one transaction stalled every write for 100+ ms,
/// and 64 per transaction still made 1 append in 64 carry ≈ 7 extra pages to its fsync (PUT p99 with 1
/// connection 1.7–1.8 ms; with 8: 0.8–1.0 ms, 64 connections 5.0 → 3.5–4.2 ms). Every append transaction
/// can carry a chunk, so even 8 drops entries far faster than any load appends them.
const PURGE_CHUNK: u64 = 8;

/// Durable entries kept decoded in memory after they reach the file (see `Shared::recent`): at most this
/// many, and at most [`RECENT_KEEP_BYTES`] of their encoded size.
const RECENT_KEEP: usize = 256;
const RECENT_KEEP_BYTES: usize = 8 << 20;

/// Recent log entries: index → (entry, durable, encoded size), and the total encoded size.
#[derive(Default)]
struct Recent {
    entries: BTreeMap<u64, (Entry<TypeConfig>, bool, usize)>,
    bytes: usize,
}

impl Recent {
    fn insert(&mut self, e: Entry<TypeConfig>, len: usize) {
        if let Some((_, _, old)) = self.entries.insert(e.log_id.index, (e, false, len)) {
            self.bytes -= old;
        }
        self.bytes += len;
    }

    /// Drop every entry with index >= `from`.
    fn truncate(&mut self, from: u64) {
        let gone = self.entries.split_off(&from);
        self.bytes -= gone.values().map(|(_, _, l)| l).sum::<usize>();
    }

    /// Drop every entry with index <= `upto`.
    fn purge(&mut self, upto: u64) {
        let keep = self.entries.split_off(&(upto + 1));
        let gone = std::mem::replace(&mut self.entries, keep);
        self.bytes -= gone.values().map(|(_, _, l)| l).sum::<usize>();
    }

    /// Mark entries as in the file (unless replaced meanwhile by a truncate and re-append), then forget the
    /// oldest durable ones beyond the limits.
    fn durable(&mut self, ids: impl Iterator<Item = LogId<u64>>) {
        for id in ids {
            if let Some((e, durable, _)) = self.entries.get_mut(&id.index) {
                if e.log_id == id {
                    *durable = true;
                }
            }
        }
        while self.entries.len() > RECENT_KEEP || self.bytes > RECENT_KEEP_BYTES {
            match self.entries.first_entry() {
                Some(f) if f.get().1 => {
                    self.bytes -= f.remove().2;
                }
                _ => break,
            }
        }
    }
}

/// How often at most the committed-index hint is written. openraft re-learns the committed index from the
/// leader, so the stored one may lag; writing it with every commit added a second transaction (and its
/// pages to the next fsync) to every write on every member.
const COMMITTED_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Nice value of the log writer thread. Every write waits on this thread's commits, and on a busy machine
/// the thread otherwise waits behind request handling for a core after each fsync (3 members + wrk on 2 cores,
/// 64 connections, interleaved runs: +3–10 % PUT throughput, p99 unchanged; 1 connection +3–7 %; −20 gave no more).
/// Like etcd's advice to give its WAL disk priority (`ionice`), but for the CPU.
const WRITER_NICE: i32 = -10;

/// Lower the calling thread's nice value to [`WRITER_NICE`]; without `CAP_SYS_NICE` it stays as it is.
fn raise_writer_priority() {
    // PRIO_PROCESS with a thread id applies to that thread only (Linux).
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), WRITER_NICE) {
        tracing::debug!("log writer keeps its default priority (nice {WRITER_NICE} refused: {e})");
    }
}

/// The single log writer: drain the queue, one transaction, commit, then acknowledge everything in it.
fn writer(shared: Arc<Shared>, rx: mpsc::Receiver<Op>, mut front: u64) {
    // Entries with index < `front` are gone from the file; `goal` is the last index openraft purged.
    let mut goal: Option<u64> = shared.last_purged.lock().ok().and_then(|p| p.map(|l| l.index));
    shared.metrics.log_front.store(front, Ordering::Relaxed);
    // When the committed-index hint was last written.
    let mut committed_at = Instant::now();
    loop {
        let backlog = goal.is_some_and(|g| front <= g);
        let hint_pending = shared.committed_hint.lock().is_ok_and(|h| h.is_some());
        // A pending hint is written once COMMITTED_EVERY has passed; otherwise look again after that long
        // (a hint reported meanwhile then waits at most twice COMMITTED_EVERY, or goes with the next append).
        let wait = if backlog {
            std::time::Duration::from_millis(10)
        } else if hint_pending {
            COMMITTED_EVERY.saturating_sub(committed_at.elapsed())
        } else {
            COMMITTED_EVERY
        };
        let first = match rx.recv_timeout(wait) {
            Ok(op) => Some(op),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch: Vec<Op> = first.into_iter().collect();
        while let Ok(op) = rx.try_recv() {
            batch.push(op);
            if batch.len() >= 4096 {
                break;
            }
        }
        for op in &batch {
            if let Op::Purge { upto, .. } = op {
                goal = Some(goal.map_or(*upto, |g| g.max(*upto)));
            }
        }
        // Physically drop the next chunk of purged entries (never more than PURGE_CHUNK per transaction).
        let drop_to = goal.filter(|g| front <= *g).map(|g| g.min(front + PURGE_CHUNK - 1));
        let write_committed = if committed_at.elapsed() >= COMMITTED_EVERY {
            shared.committed_hint.lock().ok().and_then(|mut h| h.take())
        } else {
            None
        };
        if batch.is_empty() && drop_to.is_none() && write_committed.is_none() {
            continue;
        }
        if write_committed.is_some() {
            committed_at = Instant::now();
        }
        // The committed-index hint alone does not cost an fsync; it becomes durable with the next write.
        let needs_sync = !batch.is_empty();
        let start = Instant::now();
        let mut new_front = None;
        let res = (|| -> Result<(), String> {
            let mut w = shared.db.begin_write().map_err(|e| e.to_string())?;
            w.set_durability(if needs_sync { Durability::Immediate } else { Durability::None });
            {
                let mut log = w.open_table(LOG).map_err(|e| e.to_string())?;
                // Most transactions only append: the meta table is opened on its first write.
                let mut meta = None;
                let mut meta_insert = |k: &str, v: &[u8]| -> Result<(), String> {
                    let m = match &mut meta {
                        Some(m) => m,
                        None => meta.insert(w.open_table(META).map_err(|e| e.to_string())?),
                    };
                    m.insert(k, v).map(|_| ()).map_err(|e| e.to_string())
                };
                if let Some(bytes) = &write_committed {
                    meta_insert("committed", bytes.as_slice())?;
                }
                for op in &batch {
                    match op {
                        Op::Append { entries, .. } => {
                            for (id, b) in entries {
                                log.insert(id.index, b.as_slice()).map_err(|e| e.to_string())?;
                            }
                        }
                        Op::Vote { bytes, .. } => meta_insert("vote", bytes.as_slice())?,
                        Op::Truncate { from, .. } => {
                            log.retain_in(*from.., |_, _| false).map_err(|e| e.to_string())?;
                        }
                        Op::Purge { bytes, .. } => meta_insert("last_purged", bytes.as_slice())?,
                    }
                }
                if let Some(to) = drop_to {
                    log.retain_in(front..=to, |_, _| false).map_err(|e| e.to_string())?;
                    // Where the log now starts (jumps over gaps, e.g. after a snapshot replaced the log).
                    let first = log.first().map_err(|e| e.to_string())?.map(|(k, _)| k.value());
                    new_front = Some(first.unwrap_or(to + 1).max(to + 1));
                }
            }
            w.commit().map_err(|e| e.to_string())
        })();
        let el = start.elapsed();
        if let (Ok(()), Some(f)) = (&res, new_front) {
            front = f;
            shared.metrics.log_front.store(front, Ordering::Relaxed);
        }
        let m = &shared.metrics;
        if needs_sync {
            record_fsync(m, el);
        }
        if let Err(e) = &res {
            tracing::error!("raft log write to {} failed: {e}", shared.path.display());
        }
        for op in batch {
            match op {
                Op::Append { entries, cb } => {
                    m.entries.fetch_add(entries.len() as u64, Ordering::Relaxed);
                    if let (Ok(()), Some((last, _))) = (&res, entries.last()) {
                        m.durable.store(last.index, Ordering::Relaxed);
                    }
                    if res.is_ok() {
                        if let Ok(mut r) = shared.recent.lock() {
                            r.durable(entries.iter().map(|(id, _)| *id));
                        }
                    }
                    cb.log_io_completed(res.clone().map_err(io_err));
                }
                Op::Vote { done, .. } | Op::Truncate { done, .. } | Op::Purge { done, .. } => {
                    let _ = done.send(res.clone());
                }
            }
        }
    }
}

impl LogStore {
    async fn call(&self, make: impl FnOnce(tokio::sync::oneshot::Sender<Result<(), String>>) -> Op) -> Result<(), StorageErr> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| sterr("log writer stopped"))?;
        rx.await.map_err(|_| sterr("log writer stopped"))?.map_err(sterr)
    }

    #[allow(clippy::result_large_err, reason = "openraft's StorageError, passed through to its storage traits unchanged")]
    fn read_range(&self, start: u64, end: Option<u64>) -> Result<Vec<Entry<TypeConfig>>, StorageErr> {
        let range: (Bound<u64>, Bound<u64>) = (Bound::Included(start), end.map(Bound::Excluded).unwrap_or(Bound::Unbounded));
        // The usual case (replication of what was just appended): everything is in memory.
        let mut from_memory: BTreeMap<u64, Entry<TypeConfig>> = BTreeMap::new();
        if let Ok(r) = self.shared.recent.lock() {
            for (k, (e, _, _)) in r.entries.range(range) {
                from_memory.insert(*k, e.clone());
            }
        }
        if from_memory.first_key_value().is_some_and(|(k, _)| *k == start) {
            return Ok(contiguous(start, from_memory));
        }
        let mut out: BTreeMap<u64, Entry<TypeConfig>> = BTreeMap::new();
        {
            let r = self.shared.db.begin_read().map_err(rderr)?;
            let log = r.open_table(LOG).map_err(rderr)?;
            let iter = match end {
                Some(e) => log.range(start..e),
                None => log.range(start..),
            }
            .map_err(rderr)?;
            let memory_from = from_memory.first_key_value().map(|(k, _)| *k);
            for item in iter {
                let (k, v) = item.map_err(rderr)?;
                if memory_from.is_some_and(|m| k.value() >= m) {
                    break;
                }
                out.insert(k.value(), codec::decode_entry(v.value()).map_err(rderr)?);
            }
        }
        out.extend(from_memory);
        Ok(contiguous(start, out))
    }
}

/// The entries from `start` on, up to the first gap.
fn contiguous(start: u64, m: BTreeMap<u64, Entry<TypeConfig>>) -> Vec<Entry<TypeConfig>> {
    m.into_iter().zip(start..).take_while(|((k, _), want)| k == want).map(|((_, e), _)| e).collect()
}

fn bounds(r: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match r.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match r.end_bound() {
        Bound::Included(e) => Some(e + 1),
        Bound::Excluded(e) => Some(*e),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageErr> {
        let (s, e) = bounds(&range);
        // A short read of the file (or of memory): cheaper inline than handing the worker thread off.
        self.read_range(s, e)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageErr> {
        let last_purged = *self.shared.last_purged.lock().map_err(rderr)?;
        let last = *self.shared.last_log.lock().map_err(rderr)?;
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last.or(last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageErr> {
        let bytes = serde_json::to_vec(vote).map_err(sterr)?;
        self.call(|done| Op::Vote { bytes, done }).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageErr> {
        let r = self.shared.db.begin_read().map_err(rderr)?;
        let meta = r.open_table(META).map_err(rderr)?;
        match meta.get("vote").map_err(rderr)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(rderr)?)),
            None => Ok(None),
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StorageErr> {
        if let Some(c) = committed {
            self.shared.metrics.committed.store(c.index, Ordering::Relaxed);
        }
        let bytes = serde_json::to_vec(&committed).map_err(sterr)?;
        *self.shared.committed_hint.lock().map_err(sterr)? = Some(bytes);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageErr> {
        let r = self.shared.db.begin_read().map_err(rderr)?;
        let meta = r.open_table(META).map_err(rderr)?;
        match meta.get("committed").map_err(rderr)? {
            Some(v) => Ok(serde_json::from_slice(v.value()).map_err(rderr)?),
            None => Ok(None),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = Vec::new();
        let mut last = None;
        {
            let mut r = self.shared.recent.lock().map_err(sterr)?;
            for e in entries {
                let b = codec::encode_entry(&e).map_err(sterr)?;
                last = Some(e.log_id);
                let id = e.log_id;
                r.insert(e, b.len());
                self.shared.metrics.log_bytes_since_snapshot.fetch_add(b.len() as u64, Ordering::Relaxed);
                batch.push((id, b));
            }
        }
        let Some(last) = last else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        *self.shared.last_log.lock().map_err(sterr)? = Some(last);
        self.tx
            .send(Op::Append { entries: batch, cb: callback })
            .map_err(|_| sterr("log writer stopped"))
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageErr> {
        {
            self.shared.recent.lock().map_err(sterr)?.truncate(log_id.index);
        }
        let from = log_id.index;
        self.call(|done| Op::Truncate { from, done }).await?;
        // New last log: the entry before `from`, or the purge point.
        let prev = if from == 0 { Vec::new() } else { self.read_range(from - 1, Some(from))? };
        let purged = *self.shared.last_purged.lock().map_err(sterr)?;
        *self.shared.last_log.lock().map_err(sterr)? = prev.last().map(|e| e.log_id).or(purged);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageErr> {
        let bytes = serde_json::to_vec(&Some(log_id)).map_err(sterr)?;
        let upto = log_id.index;
        {
            self.shared.recent.lock().map_err(sterr)?.purge(upto);
        }
        self.call(|done| Op::Purge { upto, bytes, done }).await?;
        *self.shared.last_purged.lock().map_err(sterr)? = Some(log_id);
        let mut last = self.shared.last_log.lock().map_err(sterr)?;
        if last.is_none_or(|l| l.index < log_id.index) {
            *last = Some(log_id);
        }
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    #[allow(clippy::result_large_err, reason = "openraft's StorageError, passed through to its storage traits unchanged")]
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageErr> {
        self.shared.metrics.log_bytes_since_snapshot.store(0, Ordering::Relaxed);
        self.shared.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        // Copying, encoding, compressing and writing a large state takes milliseconds of CPU: off the async
        // workers (there may be only one, see `--threads`), so that heartbeats and requests go on meanwhile.
        tokio::task::block_in_place(|| self.write_new_snapshot())
    }
}

impl StateMachine {
    /// Store index of the applied state.
    pub fn store_index(&self) -> u64 {
        self.data.read().map(|d| d.store.index()).unwrap_or(0)
    }

    /// Build a snapshot of the applied state, make it durable, keep it as the current one.
    #[allow(clippy::result_large_err, reason = "openraft's StorageError, passed through to its storage traits unchanged")]
    fn write_new_snapshot(&self) -> Result<Snapshot<TypeConfig>, StorageErr> {
        let started = Instant::now();
        let data = self.data.read().map_err(sterr)?.clone();
        let json = serde_json::to_vec(&data).map_err(sterr)?;
        let snapshot_id = match data.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta { last_log_id: data.last_applied, last_membership: data.last_membership.clone(), snapshot_id };
        let stored = StoredSnapshot { meta: meta.clone(), data: pack(&json).map_err(sterr)? };
        // Applied state + last-applied + membership, one transaction.
        write_snapshot(&self.shared.snap_db, &stored).map_err(sterr)?;
        tracing::info!(
            "snapshot {} written: {} bytes of state, {} on disk, in {:?}",
            meta.snapshot_id,
            json.len(),
            stored.data.len(),
            started.elapsed()
        );
        *self.snapshot.lock().map_err(sterr)? = Some(stored);
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(json)) })
    }
}

fn apply_request(d: &mut SmData, req: &Request) -> Response {
    match req {
        Request::Kv { op, now } => Response::Kv(Box::new(d.store.apply(op, *now))),
        Request::Expire { now } => Response::Expired(d.store.expire(*now).len()),
        Request::Attrs { id, name, client_urls } => {
            d.attrs.insert(*id, (name.clone(), client_urls.clone()));
            Response::Done
        }
        Request::Batch(reqs) => Response::Batch(reqs.iter().map(|r| apply_request(d, r)).collect()),
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, StoredMembership<u64, Member>), StorageErr> {
        let d = self.data.read().map_err(rderr)?;
        Ok((d.last_applied, d.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let index;
        {
            let mut d = self.data.write().map_err(sterr)?;
            for e in entries {
                d.last_applied = Some(e.log_id);
                let r = match e.payload {
                    EntryPayload::Blank => Response::Done,
                    EntryPayload::Membership(m) => {
                        d.last_membership = StoredMembership::new(Some(e.log_id), m);
                        Response::Done
                    }
                    EntryPayload::Normal(req) => apply_request(&mut d, &req),
                };
                out.push(r);
            }
            index = d.store.index();
        }
        self.applied_tx.send_replace(index);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageErr> {
        self.shared.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.log_bytes_since_snapshot.store(0, Ordering::Relaxed);
        let bytes = snapshot.into_inner();
        // Decoding, compressing and writing a large state: off the async workers, like building one.
        let (data, stored) = tokio::task::block_in_place(|| -> Result<_, String> {
            let mut data = decode_state(&bytes)?;
            data.last_applied = meta.last_log_id;
            data.last_membership = meta.last_membership.clone();
            let packed = if bytes.starts_with(&ZSTD_MAGIC) { bytes } else { pack(&bytes)? };
            let stored = StoredSnapshot { meta: meta.clone(), data: packed };
            write_snapshot(&self.shared.snap_db, &stored)?;
            Ok((data, stored))
        })
        .map_err(sterr)?;
        let index = data.store.index();
        *self.data.write().map_err(sterr)? = data;
        *self.snapshot.lock().map_err(sterr)? = Some(stored);
        self.applied_tx.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageErr> {
        let Some(s) = self.snapshot.lock().map_err(rderr)?.clone() else { return Ok(None) };
        // Peers get plain JSON (what every clusterd version reads).
        let json = unpack(&s.data).map_err(rderr)?.into_owned();
        Ok(Some(Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(json)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry { log_id: LogId::new(CommittedLeaderId::new(term, 1), index), payload: EntryPayload::Blank }
    }

    #[test]
    fn recent_entries_keep_undurable_ones_and_respect_the_limits() {
        let mut r = Recent::default();
        for i in 1..=300 {
            r.insert(entry(1, i), 10);
        }
        // Nothing is durable yet: nothing may be forgotten.
        r.durable(std::iter::empty());
        assert_eq!(r.entries.len(), 300);
        // 1..=100 durable: the oldest durable go until the count limit, the rest stay.
        r.durable((1..=100).map(|i| entry(1, i).log_id));
        assert_eq!(r.entries.len(), RECENT_KEEP);
        assert_eq!(r.entries.first_key_value().map(|(k, _)| *k), Some(300 - RECENT_KEEP as u64 + 1));
        assert_eq!(r.bytes, RECENT_KEEP * 10);
    }

    #[test]
    fn snapshot_state_reads_back_from_compressed_and_from_plain_json() {
        let mut d = SmData::default();
        d.attrs.insert(7, ("m7".into(), vec!["http://127.0.0.1:2379".into()]));
        let json = serde_json::to_vec(&d).expect("encode");
        let packed = pack(&json).expect("pack");
        assert!(packed.starts_with(&ZSTD_MAGIC));
        assert_eq!(unpack(&packed).expect("unpack").as_ref(), json.as_slice());
        // Stores from before snapshot.redb hold plain JSON; peers send plain JSON.
        assert_eq!(unpack(&json).expect("plain").as_ref(), json.as_slice());
        assert_eq!(decode_state(&packed).expect("decode").attrs[&7].0, "m7");
        assert!(decode_state(&packed[..packed.len() / 2]).is_err(), "a cut snapshot must not decode");
    }

    #[test]
    fn the_old_snapshot_copy_goes_once_snapshot_redb_has_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, snap_path) = (dir.path().join("clusterd.redb"), dir.path().join("snapshot.redb"));
        let db = open_db(&path, &[META], &[LOG]).expect("open");
        let snap_db = open_db(&snap_path, &[SNAP], &[]).expect("open snapshot");
        let w = db.begin_write().expect("write");
        w.open_table(META).expect("meta").insert("snapshot", b"{}".as_slice()).expect("insert");
        w.commit().expect("commit");
        // Only the old copy: it is the snapshot, so it stays.
        assert!(!drop_legacy_snapshot(&db, &path, &snap_db, &snap_path).expect("check"));
        let meta = SnapshotMeta::default();
        write_snapshot(&snap_db, &StoredSnapshot { meta, data: b"{}".to_vec() }).expect("write snapshot");
        assert!(drop_legacy_snapshot(&db, &path, &snap_db, &snap_path).expect("drop"));
        let r = db.begin_read().expect("read");
        assert!(r.open_table(META).expect("meta").get("snapshot").expect("get").is_none());
        assert!(!drop_legacy_snapshot(&db, &path, &snap_db, &snap_path).expect("again"), "nothing left to drop");
    }

    #[tokio::test]
    async fn a_reported_commit_reaches_the_file_without_another_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = LogId::new(CommittedLeaderId::new(3, 1), 42);
        let (mut log, _sm) = open(dir.path(), Arc::default()).expect("open");
        log.save_committed(Some(id)).await.expect("save");
        // Nothing else is written: the writer must still put the hint in the file (read_committed reads the file).
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while log.read_committed().await.expect("read") != Some(id) {
            assert!(Instant::now() < deadline, "committed hint not in the file after 5 s (written every {COMMITTED_EVERY:?})");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn a_replaced_entry_is_not_marked_durable_by_the_old_write() {
        let mut r = Recent::default();
        r.insert(entry(1, 5), 10);
        // Leader change: index 5 truncated and re-appended with term 2 before the term-1 write lands.
        r.truncate(5);
        r.insert(entry(2, 5), 20);
        r.durable(std::iter::once(entry(1, 5).log_id));
        assert!(!r.entries[&5].1, "the term-2 entry is not in the file yet");
        assert_eq!(r.bytes, 20);
        r.purge(5);
        assert!(r.entries.is_empty());
        assert_eq!(r.bytes, 0);
    }
}
