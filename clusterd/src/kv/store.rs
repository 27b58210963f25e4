//! The etcd v2 store: a deterministic state machine applied identically on every member.
//!
//! Owns: the tree of nodes (files and directories), the store index (`X-Etcd-Index`), created/modified indexes,
//! TTL expiration instants, the watch history of the last [`HISTORY_LEN`] events, in-order (POST) keys, hidden
//! `_keys`, CAS/CAD and refresh — following etcd 3.4's `v2store` rule for rule.
//! Does not: read clocks (every command carries the proposer's `now`), talk to Raft, or speak HTTP.
//! Everything here is pure, so the unit tests replay etcd-v2-pairs.md against it directly.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::error::{code, EtcdError};
use super::time::{rfc3339_nanos, ttl_secs};

/// How many events the watch history keeps (etcd's value).
pub const HISTORY_LEN: usize = 1000;

/// A node in the tree. `value == None` means a directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Node {
    /// Store index of the write that created it.
    pub created: u64,
    /// Store index of its last write.
    pub modified: u64,
    /// Expiration instant (Unix nanoseconds), `None` when permanent.
    pub expire: Option<i64>,
    /// File content; `None` for a directory.
    pub value: Option<String>,
    /// Children of a directory, by name.
    #[serde(default)]
    pub children: BTreeMap<String, Node>,
}

impl Node {
    fn dir(index: u64, expire: Option<i64>) -> Node {
        Node { created: index, modified: index, expire, value: None, children: BTreeMap::new() }
    }
    fn file(index: u64, value: String, expire: Option<i64>) -> Node {
        Node { created: index, modified: index, expire, value: Some(value), children: BTreeMap::new() }
    }
    /// True for directories.
    pub fn is_dir(&self) -> bool {
        self.value.is_none()
    }
}

/// The JSON form of a node (etcd's `NodeExtern`); field order matches etcd's output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct NodeView {
    /// Full key; absent for the root.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key: Option<String>,
    /// Value of a file (absent for directories and in delete events).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub value: Option<String>,
    /// True for directories.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub dir: bool,
    /// RFC 3339 expiration.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expiration: Option<String>,
    /// Remaining seconds to live.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ttl: Option<i64>,
    /// Children (directories only, when listed).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub nodes: Option<Vec<NodeView>>,
    /// Index of the last write.
    #[serde(rename = "modifiedIndex", skip_serializing_if = "is_zero", default)]
    pub modified_index: u64,
    /// Index of the creating write.
    #[serde(rename = "createdIndex", skip_serializing_if = "is_zero", default)]
    pub created_index: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One store event, as returned to clients and kept in the watch history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// `get`, `set`, `create`, `update`, `delete`, `compareAndSwap`, `compareAndDelete`, `expire`.
    pub action: String,
    /// The node after the event.
    pub node: NodeView,
    /// The node before the event, if any.
    #[serde(rename = "prevNode", skip_serializing_if = "Option::is_none", default)]
    pub prev_node: Option<NodeView>,
}

impl Event {
    /// The store index the event happened at.
    pub fn index(&self) -> u64 {
        self.node.modified_index
    }
    /// The event as etcd's JSON body (with trailing newline).
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// A write, as decided by the API layer and replicated through the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct KvOp {
    /// What kind of write.
    pub kind: OpKind,
    /// Cleaned key, e.g. `/a/b` (`/` for the root).
    pub key: String,
    /// New value (files).
    pub value: String,
    /// Create or delete a directory.
    pub dir: bool,
    /// `prevExist` if given.
    pub prev_exist: Option<bool>,
    /// `prevValue` ("" when not given).
    pub prev_value: String,
    /// `prevIndex` (0 when not given).
    pub prev_index: u64,
    /// TTL in seconds, if given and non-empty.
    pub ttl: Option<u64>,
    /// `refresh=true`: update the TTL only, do not wake watchers.
    pub refresh: bool,
    /// `recursive=true` (delete).
    pub recursive: bool,
}

/// HTTP method class of a write.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum OpKind {
    /// PUT
    #[default]
    Put,
    /// POST (in-order key)
    Post,
    /// DELETE
    Delete,
}

/// Outcome of a successful write: the event and the store index after it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WriteOk {
    /// The event (action, node, prevNode).
    pub event: Event,
    /// Whether a new node was created (HTTP 201 rather than 200).
    pub created: bool,
    /// Store index after the write.
    pub etcd_index: u64,
}

/// The store itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Store {
    root: Node,
    index: u64,
    history: VecDeque<Event>,
    /// (expire, key) of every node with a TTL; derived from the tree.
    #[serde(skip)]
    ttls: BTreeSet<(i64, String)>,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

/// Clean a key the way etcd's `path.Clean(path.Join("/", key))` does. `None` if it climbs above the root.
pub fn clean_key(raw: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in raw.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

fn components(key: &str) -> Vec<&str> {
    key.split('/').filter(|s| !s.is_empty()).collect()
}

/// The key made of `comps` (`/` for none); built only for error causes, off the hot path.
fn path_of(comps: &[&str]) -> String {
    format!("/{}", comps.join("/"))
}

fn join(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// Is `key` hidden relative to a recursive watch on `watch_key` (a `_` component below it)?
fn hidden_below(watch_key: &str, key: &str) -> bool {
    let rest = key.strip_prefix(watch_key).unwrap_or(key);
    rest.contains("/_")
}

impl Store {
    /// An empty store at index 0.
    pub fn new() -> Store {
        Store { root: Node::dir(0, None), index: 0, history: VecDeque::new(), ttls: BTreeSet::new() }
    }

    /// An empty store whose index starts at `index` (to replay a recording made on a store that had
    /// already seen `index` internal writes, like etcd's).
    pub fn with_start_index(index: u64) -> Store {
        Store { index, ..Store::new() }
    }

    /// Current store index (`X-Etcd-Index`).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Rebuild derived indexes after deserializing.
    pub fn rebuild(&mut self) {
        let mut ttls = BTreeSet::new();
        fn walk(n: &Node, key: &str, out: &mut BTreeSet<(i64, String)>) {
            if let Some(e) = n.expire {
                out.insert((e, key.to_string()));
            }
            for (name, c) in &n.children {
                walk(c, &join(key, name), out);
            }
        }
        walk(&self.root, "/", &mut ttls);
        self.ttls = ttls;
    }

    /// Earliest expiration in the store, if any key has a TTL.
    pub fn next_expiry(&self) -> Option<i64> {
        self.ttls.iter().next().map(|(e, _)| *e)
    }

    /// Number of nodes (for metrics/tests).
    pub fn node_count(&self) -> usize {
        fn count(n: &Node) -> usize {
            1 + n.children.values().map(count).sum::<usize>()
        }
        count(&self.root) - 1
    }

    fn err(&self, c: u32, cause: impl Into<String>) -> EtcdError {
        EtcdError::new(c, cause, self.index)
    }

    fn lookup(&self, key: &str) -> Result<&Node, EtcdError> {
        let comps = components(key);
        let mut cur = &self.root;
        for (i, name) in comps.iter().enumerate() {
            if !cur.is_dir() {
                return Err(self.err(code::NOT_DIR, path_of(&comps[..i])));
            }
            match cur.children.get(*name) {
                Some(c) => cur = c,
                None => return Err(self.err(code::KEY_NOT_FOUND, path_of(&comps[..=i]))),
            }
        }
        Ok(cur)
    }

    fn lookup_mut(&mut self, key: &str) -> Result<&mut Node, EtcdError> {
        // Check first with the immutable walk so errors carry the right cause.
        self.lookup(key)?;
        let mut cur = &mut self.root;
        for name in components(key) {
            cur = cur.children.get_mut(name).ok_or_else(|| EtcdError::new(code::RAFT_INTERNAL, "tree", 0))?;
        }
        Ok(cur)
    }

    /// Render a node the way etcd's `Repr` does.
    fn view(key: &str, n: &Node, recursive: bool, sorted: bool, now: i64, list_children: bool) -> NodeView {
        let mut v = NodeView {
            key: if key == "/" { None } else { Some(key.to_string()) },
            value: n.value.clone(),
            dir: n.is_dir(),
            modified_index: n.modified,
            created_index: n.created,
            ..NodeView::default()
        };
        if let Some(e) = n.expire {
            v.expiration = Some(rfc3339_nanos(e));
            let t = ttl_secs(e, now);
            v.ttl = if t > 0 { Some(t) } else { None };
        }
        if n.is_dir() && list_children {
            let mut kids: Vec<(&String, &Node)> = n.children.iter().filter(|(name, _)| !name.starts_with('_')).collect();
            if !sorted {
                kids.sort_by_key(|(_, c)| c.created);
            }
            let nodes: Vec<NodeView> = kids
                .into_iter()
                .map(|(name, c)| Self::view(&join(key, name), c, recursive, sorted, now, recursive))
                .collect();
            if !nodes.is_empty() {
                v.nodes = Some(nodes);
            }
        }
        v
    }

    fn prev_view(key: &str, n: &Node, now: i64) -> NodeView {
        Self::view(key, n, false, false, now, false)
    }

    /// GET: the node (and children) at `key`.
    pub fn get(&self, key: &str, recursive: bool, sorted: bool, now: i64) -> Result<Event, EtcdError> {
        let n = self.lookup(key)?;
        let mut node = Self::view(key, n, recursive, sorted, now, true);
        if key == "/" {
            node.modified_index = 0;
            node.created_index = 0;
        }
        Ok(Event { action: "get".into(), node, prev_node: None })
    }

    /// Scan the history for the first event at or after `since` that a watch on `key` would see.
    /// `Ok(None)` means "nothing yet, wait"; 401 if `since` is older than the history.
    pub fn scan_history(&self, key: &str, recursive: bool, since: u64) -> Result<Option<Event>, EtcdError> {
        let Some(first) = self.history.front() else { return Ok(None) };
        let start = first.index();
        if since < start {
            return Err(self.err(
                code::EVENT_INDEX_CLEARED,
                format!("the requested history has been cleared [{start}/{since}]"),
            ));
        }
        let prefix = if key == "/" { "/".to_string() } else { format!("{key}/") };
        let skip = self.history.partition_point(|e| e.index() < since);
        for e in self.history.iter().skip(skip) {
            if e.index() < since {
                continue;
            }
            let ek = e.node.key.as_deref().unwrap_or("/");
            let mut ok = ek == key;
            if recursive && ek.starts_with(&prefix) && !hidden_below(key, ek) {
                ok = true;
            }
            if (e.action == "delete" || e.action == "expire" || e.action == "compareAndDelete")
                && e.prev_node.as_ref().is_some_and(|p| p.dir)
                && key.starts_with(&format!("{ek}/"))
            {
                ok = true;
            }
            if ok {
                return Ok(Some(e.clone()));
            }
        }
        Ok(None)
    }

    fn record(&mut self, e: &Event) {
        if self.history.len() >= HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(e.clone());
    }

    fn untrack_subtree(&mut self, key: &str, n: &Node) {
        if let Some(e) = n.expire {
            self.ttls.remove(&(e, key.to_string()));
        }
        for (name, c) in &n.children {
            self.untrack_subtree(&join(key, name), c);
        }
    }

    fn set_expire(&mut self, key: &str, expire: Option<i64>) -> Result<(), EtcdError> {
        let n = self.lookup_mut(key)?;
        let old = n.expire;
        n.expire = expire;
        if let Some(o) = old {
            self.ttls.remove(&(o, key.to_string()));
        }
        if let Some(e) = expire {
            self.ttls.insert((e, key.to_string()));
        }
        Ok(())
    }

    /// Remove the node at `key` from its parent (no checks).
    fn detach(&mut self, key: &str) -> Option<Node> {
        let comps = components(key);
        let (last, dirs) = comps.split_last()?;
        let mut cur = &mut self.root;
        for name in dirs {
            cur = cur.children.get_mut(*name)?;
        }
        let n = cur.children.remove(*last)?;
        self.untrack_subtree(key, &n);
        Some(n)
    }

    /// Apply one replicated write. `now` is the proposer's clock (Unix ns); expirations derive from it.
    pub fn apply(&mut self, op: &KvOp, now: i64) -> Result<WriteOk, EtcdError> {
        let expire = op.ttl.map(|t| now.saturating_add(i64::try_from(t).unwrap_or(i64::MAX).saturating_mul(1_000_000_000)));
        let res = match op.kind {
            OpKind::Post => self.create(&op.key, op.dir, &op.value, true, false, expire, "create", now),
            OpKind::Put => match op.prev_exist {
                Some(true) if op.prev_index == 0 && op.prev_value.is_empty() => {
                    self.update(&op.key, &op.value, expire, op.refresh, now)
                }
                Some(true) => self.cas(&op.key, &op.prev_value, op.prev_index, &op.value, expire, op.refresh, now),
                Some(false) => self.create(&op.key, op.dir, &op.value, false, false, expire, "create", now),
                None if op.prev_index > 0 || !op.prev_value.is_empty() => {
                    self.cas(&op.key, &op.prev_value, op.prev_index, &op.value, expire, op.refresh, now)
                }
                None => self.set(&op.key, op.dir, &op.value, expire, op.refresh, now),
            },
            OpKind::Delete => {
                if op.prev_index > 0 || !op.prev_value.is_empty() {
                    self.cad(&op.key, &op.prev_value, op.prev_index, now)
                } else {
                    self.delete(&op.key, op.dir, op.recursive, now)
                }
            }
        };
        res.map(|(event, created, notify)| {
            if notify {
                self.record(&event);
            }
            WriteOk { event, created, etcd_index: self.index }
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        key: &str,
        dir: bool,
        value: &str,
        unique: bool,
        replace: bool,
        expire: Option<i64>,
        action: &str,
        now: i64,
    ) -> Result<(Event, bool, bool), EtcdError> {
        let next = self.index + 1;
        let key = if unique { join(key, &format!("{next:020}")) } else { key.to_string() };
        if key == "/" {
            return Err(self.err(code::ROOT_RONLY, "/"));
        }
        let comps = components(&key);
        let Some((name, dirs)) = comps.split_last() else { return Err(self.err(code::ROOT_RONLY, "/")) };
        // Walk, checking that every ancestor is a directory (or missing, then created).
        {
            let mut cur = &self.root;
            for (i, d) in dirs.iter().enumerate() {
                match cur.children.get(*d) {
                    Some(c) if c.is_dir() => cur = c,
                    Some(_) => return Err(self.err(code::NOT_DIR, path_of(&comps[..=i]))),
                    None => break,
                }
            }
        }
        let mut prev = None;
        if let Ok(existing) = self.lookup(&key) {
            if !replace {
                return Err(self.err(code::NODE_EXIST, key));
            }
            if existing.is_dir() {
                return Err(self.err(code::NOT_FILE, key));
            }
            prev = Some(Self::prev_view(&key, existing, now));
        }
        let mut cur = &mut self.root;
        for d in dirs {
            if !cur.children.contains_key(*d) {
                cur.children.insert((*d).to_string(), Node::dir(next, None));
            }
            cur = cur.children.get_mut(*d).ok_or_else(|| EtcdError::new(code::RAFT_INTERNAL, "tree", 0))?;
        }
        let n = if dir { Node::dir(next, expire) } else { Node::file(next, value.to_string(), expire) };
        let node = Self::prev_view(&key, &n, now);
        // A replaced file is overwritten in place (no remove and re-insert in its parent's map).
        let replaced = match cur.children.get_mut(*name) {
            Some(slot) => Some(std::mem::replace(slot, n)),
            None => {
                cur.children.insert((*name).to_string(), n);
                None
            }
        };
        if let Some(old) = replaced {
            self.untrack_subtree(&key, &old);
        }
        if let Some(e) = expire {
            self.ttls.insert((e, key.clone()));
        }
        self.index = next;
        let created = prev.is_none();
        Ok((Event { action: action.into(), node, prev_node: prev }, created, true))
    }

    fn set(
        &mut self,
        key: &str,
        dir: bool,
        value: &str,
        expire: Option<i64>,
        refresh: bool,
        now: i64,
    ) -> Result<(Event, bool, bool), EtcdError> {
        let kept;
        let value = if refresh {
            kept = self.lookup(key)?.value.clone().unwrap_or_default();
            kept.as_str()
        } else {
            if let Err(e) = self.lookup(key) {
                if e.code != code::KEY_NOT_FOUND {
                    return Err(e);
                }
            }
            value
        };
        let (ev, created, _) = self.create(key, dir, value, false, true, expire, "set", now)?;
        Ok((ev, created, !refresh))
    }

    fn update(
        &mut self,
        key: &str,
        value: &str,
        expire: Option<i64>,
        refresh: bool,
        now: i64,
    ) -> Result<(Event, bool, bool), EtcdError> {
        if key == "/" {
            return Err(self.err(code::ROOT_RONLY, "/"));
        }
        let next = self.index + 1;
        let n = self.lookup(key)?;
        if n.is_dir() && !value.is_empty() {
            return Err(self.err(code::NOT_FILE, key));
        }
        let prev = Self::prev_view(key, n, now);
        let value = if refresh { n.value.clone() } else if n.is_dir() { None } else { Some(value.to_string()) };
        {
            let n = self.lookup_mut(key)?;
            n.value = value;
            n.modified = next;
        }
        self.set_expire(key, expire)?;
        let node = Self::prev_view(key, self.lookup(key)?, now);
        self.index = next;
        Ok((Event { action: "update".into(), node, prev_node: Some(prev) }, false, !refresh))
    }

    fn compare(&self, key: &str, n: &Node, prev_value: &str, prev_index: u64) -> Result<(), EtcdError> {
        let cur = n.value.as_deref().unwrap_or("");
        let index_ok = prev_index == 0 || n.modified == prev_index;
        let value_ok = prev_value.is_empty() || cur == prev_value;
        let _ = key;
        let cause = match (value_ok, index_ok) {
            (true, true) => return Ok(()),
            (false, true) => format!("[{prev_value} != {cur}]"),
            (true, false) => format!("[{prev_index} != {}]", n.modified),
            (false, false) => format!("[{prev_value} != {cur}] [{prev_index} != {}]", n.modified),
        };
        Err(self.err(code::TEST_FAILED, cause))
    }

    /// What compare-and-swap and compare-and-delete check first: `key` is a file (not the root, not a
    /// directory) whose value and index match the conditions. The node and its view before the write.
    fn compared_file(&self, key: &str, prev_value: &str, prev_index: u64, now: i64) -> Result<(&Node, NodeView), EtcdError> {
        if key == "/" {
            return Err(self.err(code::ROOT_RONLY, "/"));
        }
        let n = self.lookup(key)?;
        if n.is_dir() {
            return Err(self.err(code::NOT_FILE, key));
        }
        self.compare(key, n, prev_value, prev_index)?;
        Ok((n, Self::prev_view(key, n, now)))
    }

    #[allow(clippy::too_many_arguments)]
    fn cas(
        &mut self,
        key: &str,
        prev_value: &str,
        prev_index: u64,
        value: &str,
        expire: Option<i64>,
        refresh: bool,
        now: i64,
    ) -> Result<(Event, bool, bool), EtcdError> {
        let (n, prev) = self.compared_file(key, prev_value, prev_index, now)?;
        let value = if refresh { n.value.clone().unwrap_or_default() } else { value.to_string() };
        let next = self.index + 1;
        {
            let n = self.lookup_mut(key)?;
            n.value = Some(value);
            n.modified = next;
        }
        self.set_expire(key, expire)?;
        let node = Self::prev_view(key, self.lookup(key)?, now);
        self.index = next;
        Ok((Event { action: "compareAndSwap".into(), node, prev_node: Some(prev) }, false, !refresh))
    }

    fn cad(&mut self, key: &str, prev_value: &str, prev_index: u64, now: i64) -> Result<(Event, bool, bool), EtcdError> {
        let (n, prev) = self.compared_file(key, prev_value, prev_index, now)?;
        let created = n.created;
        self.index += 1;
        self.detach(key);
        let node = NodeView {
            key: Some(key.to_string()),
            modified_index: self.index,
            created_index: created,
            ..NodeView::default()
        };
        Ok((Event { action: "compareAndDelete".into(), node, prev_node: Some(prev) }, false, true))
    }

    fn delete(&mut self, key: &str, dir: bool, recursive: bool, now: i64) -> Result<(Event, bool, bool), EtcdError> {
        if key == "/" {
            return Err(self.err(code::ROOT_RONLY, "/"));
        }
        let dir = dir || recursive;
        let n = self.lookup(key)?;
        if n.is_dir() {
            if !dir {
                return Err(self.err(code::NOT_FILE, key));
            }
            if !n.children.is_empty() && !recursive {
                return Err(self.err(code::DIR_NOT_EMPTY, key));
            }
        }
        let prev = Self::prev_view(key, n, now);
        let is_dir = n.is_dir();
        let created = n.created;
        self.index += 1;
        self.detach(key);
        let node = NodeView {
            key: Some(key.to_string()),
            dir: is_dir,
            modified_index: self.index,
            created_index: created,
            ..NodeView::default()
        };
        Ok((Event { action: "delete".into(), node, prev_node: Some(prev) }, false, true))
    }

    /// Remove every node whose expiration is at or before `cutoff`, one `expire` event (and index) each,
    /// earliest first. Returns the events.
    pub fn expire(&mut self, cutoff: i64) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some((e, key)) = self.ttls.iter().next().cloned() {
            if e > cutoff {
                break;
            }
            let Ok(n) = self.lookup(&key) else {
                self.ttls.remove(&(e, key));
                continue;
            };
            let prev = Self::prev_view(&key, n, cutoff);
            let created = n.created;
            let is_dir = n.is_dir();
            self.index += 1;
            self.detach(&key);
            let ev = Event {
                action: "expire".into(),
                node: NodeView {
                    key: Some(key.clone()),
                    dir: is_dir,
                    modified_index: self.index,
                    created_index: created,
                    ..NodeView::default()
                },
                prev_node: Some(prev),
            };
            self.record(&ev);
            out.push(ev);
        }
        out
    }
}
