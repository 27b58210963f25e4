//! The reboot-lock client: locksmith's semaphore in clusterd's KV, changed only by compare-and-swap.
//!
//! Owns: read → [`keel_model::lock::Semaphore`] operation → write back with `prevIndex` (or `prevExist=false`
//! when the key does not exist yet, created with the configured max), retried on a lost race; listing every
//! group's semaphore; and telling whether a holder is still part of the cluster (a fleet machine record at
//! `/_keel/fleet/machines/<id>` or a clusterd member by name or id). Used by the reboot manager and
//! `locksmithctl`. Does not: decide when to lock (see the parent module).

use std::time::Duration;

use keel_model::lock::{
    semaphore_key, valid_group, LockError, Outcome, Semaphore, DEFAULT_GROUP, LOCK_ROOT,
};
use serde::Serialize;

use super::kv::{Kv, KvError};

/// Where fleet agents keep their machine records (the fleet/KV contract, docs/locksmith.md).
pub const FLEET_MACHINES: &str = keel_model::fleet::MACHINES_DIR;

/// Most read-modify-write rounds before giving up on a hot key.
const MAX_ATTEMPTS: u32 = 200;

/// Why a lock operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LockClientError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Lost the compare-and-swap race too often.
    #[error("{key} kept changing under us ({attempts} attempts); try again")]
    Contended { key: String, attempts: u32 },
}

/// One group's semaphore as read, with the index to compare against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub semaphore: Semaphore,
    /// None when the key does not exist yet (then `semaphore` is the default a first lock would create).
    pub index: Option<u64>,
}

/// A holder and whether it is still part of the cluster.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Holder {
    pub id: String,
    /// A fleet machine record exists for it.
    pub fleet_machine: bool,
    /// A clusterd member has this name or id.
    pub cluster_member: bool,
}

impl Holder {
    /// Neither a fleet machine nor a clusterd member: it left the cluster and will never unlock by itself.
    pub fn left_cluster(&self) -> bool {
        !self.fleet_machine && !self.cluster_member
    }
}

/// A group's state for `locksmithctl status`.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub key: String,
    pub exists: bool,
    pub semaphore: i64,
    pub max: i64,
    pub holders: Vec<Holder>,
}

/// A client for one group's semaphore.
#[derive(Clone)]
pub struct LockClient {
    kv: Kv,
    group: String,
    key: String,
    /// Max of a semaphore created by the first lock.
    initial_max: i64,
}

fn backoff(attempt: u32) {
    // Small, growing, de-synchronised pause between compare-and-swap rounds.
    let base = 2u64.saturating_mul(attempt.min(50) as u64);
    let mut b = [0u8; 2];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    std::thread::sleep(Duration::from_millis(
        base + u16::from_le_bytes(b) as u64 % (base + 5),
    ));
}

impl LockClient {
    /// A client for `group` ("default" or "" for locksmith's default semaphore).
    pub fn new(kv: Kv, group: &str, initial_max: i64) -> Result<LockClient, LockClientError> {
        let key = semaphore_key(group)?;
        let group = if group.is_empty() { "default" } else { group };
        if initial_max < 0 {
            return Err(LockError::InvalidMax(initial_max).into());
        }
        Ok(LockClient {
            kv,
            group: group.to_string(),
            key,
            initial_max,
        })
    }

    /// A client for the `default` group with max 1 (cannot fail).
    pub fn default_group(kv: Kv) -> LockClient {
        LockClient {
            kv,
            group: DEFAULT_GROUP.to_string(),
            key: format!("{LOCK_ROOT}/semaphore"),
            initial_max: 1,
        }
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn kv(&self) -> &Kv {
        &self.kv
    }

    /// The semaphore now.
    pub fn read(&self) -> Result<Read, LockClientError> {
        match self.kv.get(&self.key)? {
            Some(n) => Ok(Read {
                semaphore: Semaphore::parse(&n.value)?,
                index: Some(n.modified_index),
            }),
            None => Ok(Read {
                semaphore: Semaphore::new(self.initial_max),
                index: None,
            }),
        }
    }

    /// Applies `op` with compare-and-swap until it sticks (or `op` refuses). Returns the semaphore written
    /// (or unchanged) and whether it changed.
    pub fn update(
        &self,
        op: impl Fn(&mut Semaphore) -> Result<Outcome, LockError>,
    ) -> Result<(Semaphore, Outcome), LockClientError> {
        for attempt in 0..MAX_ATTEMPTS {
            let Read {
                mut semaphore,
                index,
            } = self.read()?;
            let outcome = op(&mut semaphore)?;
            if outcome == Outcome::Unchanged {
                return Ok((semaphore, outcome));
            }
            let json = semaphore.to_json();
            let r = match index {
                Some(i) => self.kv.compare_and_swap(&self.key, &json, i),
                None => self.kv.create(&self.key, &json),
            };
            match r {
                Ok(_) => return Ok((semaphore, outcome)),
                Err(KvError::CompareFailed { .. } | KvError::Exists { .. }) => backoff(attempt),
                Err(e) => return Err(e.into()),
            }
        }
        Err(LockClientError::Contended {
            key: self.key.clone(),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Takes a slot for `id` (re-entrant).
    pub fn lock(&self, id: &str) -> Result<(Semaphore, Outcome), LockClientError> {
        self.update(|s| s.lock(id))
    }

    /// Frees `id`'s slot; `Err(Lock(NotHeld))` if it holds none.
    pub fn unlock(&self, id: &str) -> Result<(Semaphore, Outcome), LockClientError> {
        self.update(|s| s.unlock(id))
    }

    /// Frees `id`'s slot if it holds one; Ok either way (for releasing after a write that may have applied).
    pub fn release(&self, id: &str) -> Result<Semaphore, LockClientError> {
        match self.unlock(id) {
            Ok((s, _)) => Ok(s),
            Err(LockClientError::Lock(LockError::NotHeld { .. })) => Ok(self.read()?.semaphore),
            Err(e) => Err(e),
        }
    }

    /// Sets the number of slots (holders are kept).
    pub fn set_max(&self, max: i64) -> Result<(Semaphore, Outcome), LockClientError> {
        self.update(|s| s.set_max(max))
    }

    /// The group's semaphore with every holder checked against the fleet's machines and clusterd's members.
    pub fn status(&self) -> Result<GroupStatus, LockClientError> {
        let r = self.read()?;
        let machines: Vec<String> = self
            .kv
            .list(FLEET_MACHINES)?
            .into_iter()
            .filter_map(|n| n.key.rsplit('/').next().map(str::to_string))
            .collect();
        let members = self.kv.members().unwrap_or_default();
        let holders = r
            .semaphore
            .holders
            .iter()
            .map(|id| Holder {
                id: id.clone(),
                fleet_machine: machines.iter().any(|m| m == id),
                cluster_member: members
                    .iter()
                    .any(|m| m.name == *id || m.id.eq_ignore_ascii_case(id)),
            })
            .collect();
        Ok(GroupStatus {
            group: self.group.clone(),
            key: self.key.clone(),
            exists: r.index.is_some(),
            semaphore: r.semaphore.semaphore,
            max: r.semaphore.max,
            holders,
        })
    }
}

/// Every group that has a semaphore in the KV (always including `default`), sorted with `default` first.
pub fn groups(kv: &Kv) -> Result<Vec<String>, KvError> {
    let mut out = vec!["default".to_string()];
    let prefix = format!("{LOCK_ROOT}/groups/");
    for n in kv.list(LOCK_ROOT)? {
        let Some(rest) = n.key.strip_prefix(&prefix) else {
            continue;
        };
        if let Some(g) = rest.strip_suffix("/semaphore") {
            if valid_group(g).is_ok() && !out.iter().any(|x| x == g) {
                out.push(g.to_string());
            }
        }
    }
    out[1..].sort();
    Ok(out)
}
