//! The cluster reboot lock: locksmith's semaphore, its JSON value and its key paths.
//!
//! Owns: [`Semaphore`] (`{"semaphore":N,"max":N,"holders":[…]}`, byte-compatible with CoreOS locksmith), the
//! pure operations [`Semaphore::lock`], [`Semaphore::unlock`] and [`Semaphore::set_max`], and the key of each
//! group's semaphore in the etcd-v2 key space ([`semaphore_key`]). Everything here is pure.
//! Does not: read or write the KV store. Callers (the updater's reboot manager and `locksmithctl`, clusterd's
//! FleetLock endpoints) read the value with its modified index, apply one operation here and write the result
//! back with compare-and-swap (`prevIndex`), retrying on a lost race.
//!
//! Semantics (the fixes over locksmith): locking a lock you already hold succeeds without taking a second slot;
//! lowering `max` below the number of holders keeps every holder (nobody is kicked out) and simply gives no new
//! slots until enough of them unlock. `semaphore` is always `max - holders` and, as in locksmith, goes negative
//! in that case, so an old locksmith client that only counts `semaphore` also sees no free slot.

use serde::{Deserialize, Serialize};

/// Directory under which every reboot-lock key lives (locksmith's path, without the leading slash in locksmith).
pub const LOCK_ROOT: &str = "/coreos.com/updateengine/rebootlock";
/// The group whose semaphore lives directly at `LOCK_ROOT/semaphore`.
pub const DEFAULT_GROUP: &str = "default";
/// Longest holder id accepted (machine ids are 32 hex digits; FleetLock node ids are host names).
pub const MAX_ID_LEN: usize = 253;

/// Why a lock operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// Every slot is taken.
    #[error("semaphore is full: max {max}, held by {}; wait for a holder to unlock, or raise the limit with `locksmithctl set-max`", holders.join(", "))]
    Full { max: i64, holders: Vec<String> },
    /// `unlock` of an id that holds nothing.
    #[error("{id} does not hold the lock (holders: {})", if holders.is_empty() { "none".to_string() } else { holders.join(", ") })]
    NotHeld { id: String, holders: Vec<String> },
    /// A negative max.
    #[error("max must be 0 or more, not {0}")]
    InvalidMax(i64),
    /// An empty, too long or non-printable holder id.
    #[error("holder id {0:?} is invalid: use 1-253 printable characters without spaces")]
    InvalidId(String),
    /// An unusable group name.
    #[error("group {0:?} is invalid: use 1-64 characters of [A-Za-z0-9._-]")]
    InvalidGroup(String),
    /// The stored value is not a semaphore.
    #[error("stored semaphore is not valid JSON of the form {{\"semaphore\":N,\"max\":N,\"holders\":[…]}}: {0}")]
    Corrupt(String),
}

/// Whether an operation changed the value (and so needs writing back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The value changed: write it back with compare-and-swap.
    Changed,
    /// Nothing to write (re-entrant lock, or max unchanged).
    Unchanged,
}

/// locksmith's semaphore value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Semaphore {
    /// Free slots: `max - holders.len()` (negative after `set_max` below the number of holders).
    pub semaphore: i64,
    /// Most holders at once.
    pub max: i64,
    /// Holder ids (machine ids or FleetLock node ids), in the order they locked.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub holders: Vec<String>,
}

/// locksmith (Go) writes an empty holder list as `null`.
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

impl Default for Semaphore {
    fn default() -> Self {
        Semaphore::new(1)
    }
}

/// Checks a holder id: 1-253 printable ASCII characters, no whitespace.
pub fn valid_id(id: &str) -> Result<(), LockError> {
    let ok = !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(LockError::InvalidId(id.to_string()))
    }
}

/// Checks a group name: 1-64 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn valid_group(group: &str) -> Result<(), LockError> {
    let ok = !group.is_empty()
        && group.len() <= 64
        && group != "."
        && group != ".."
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(LockError::InvalidGroup(group.to_string()))
    }
}

/// The key of a group's semaphore: `LOCK_ROOT/semaphore` for `default` (and the empty name), else
/// `LOCK_ROOT/groups/<group>/semaphore`.
pub fn semaphore_key(group: &str) -> Result<String, LockError> {
    if group.is_empty() || group == DEFAULT_GROUP {
        return Ok(format!("{LOCK_ROOT}/semaphore"));
    }
    valid_group(group)?;
    Ok(format!("{LOCK_ROOT}/groups/{group}/semaphore"))
}

impl Semaphore {
    /// An empty semaphore with `max` slots.
    pub fn new(max: i64) -> Semaphore {
        Semaphore {
            semaphore: max,
            max,
            holders: Vec::new(),
        }
    }

    /// Parses a stored value. A stale `semaphore` count is recomputed from `max` and `holders`, and duplicate
    /// holders (written by a buggy client) are collapsed.
    pub fn parse(text: &str) -> Result<Semaphore, LockError> {
        let mut s: Semaphore =
            serde_json::from_str(text).map_err(|e| LockError::Corrupt(e.to_string()))?;
        if s.max < 0 {
            return Err(LockError::Corrupt(format!("negative max {}", s.max)));
        }
        let mut seen = std::collections::BTreeSet::new();
        s.holders.retain(|h| seen.insert(h.clone()));
        s.recount();
        Ok(s)
    }

    /// The value as stored (compact JSON, locksmith's field order).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    fn recount(&mut self) {
        self.semaphore = self.max - self.holders.len() as i64;
    }

    /// Whether `id` holds a slot.
    pub fn holds(&self, id: &str) -> bool {
        self.holders.iter().any(|h| h == id)
    }

    /// Takes a slot for `id`. Re-entrant: a holder locking again gets `Ok(Unchanged)`.
    pub fn lock(&mut self, id: &str) -> Result<Outcome, LockError> {
        valid_id(id)?;
        if self.holds(id) {
            return Ok(Outcome::Unchanged);
        }
        if (self.holders.len() as i64) >= self.max {
            return Err(LockError::Full {
                max: self.max,
                holders: self.holders.clone(),
            });
        }
        self.holders.push(id.to_string());
        self.recount();
        Ok(Outcome::Changed)
    }

    /// Frees `id`'s slot. `Err(NotHeld)` if it holds none (callers that treat that as success may).
    pub fn unlock(&mut self, id: &str) -> Result<Outcome, LockError> {
        valid_id(id)?;
        if !self.holds(id) {
            return Err(LockError::NotHeld {
                id: id.to_string(),
                holders: self.holders.clone(),
            });
        }
        self.holders.retain(|h| h != id);
        self.recount();
        Ok(Outcome::Changed)
    }

    /// Sets the number of slots. Holders are never removed: below their count there are simply no free slots.
    pub fn set_max(&mut self, max: i64) -> Result<Outcome, LockError> {
        if max < 0 {
            return Err(LockError::InvalidMax(max));
        }
        if max == self.max {
            return Ok(Outcome::Unchanged);
        }
        self.max = max;
        self.recount();
        Ok(Outcome::Changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_locksmiths() {
        let mut s = Semaphore::new(1);
        assert_eq!(s.to_json(), r#"{"semaphore":1,"max":1,"holders":[]}"#);
        s.lock("m1").expect("lock");
        assert_eq!(s.to_json(), r#"{"semaphore":0,"max":1,"holders":["m1"]}"#);
        let back = Semaphore::parse(r#"{"semaphore":0,"max":1,"holders":["m1"]}"#).expect("parse");
        assert_eq!(back, s);
        // locksmith wrote `holders: null` for an empty list.
        let empty =
            Semaphore::parse(r#"{"semaphore":2,"max":2,"holders":null}"#).expect("null holders");
        assert!(empty.holders.is_empty());
        let missing = Semaphore::parse(r#"{"semaphore":2,"max":2}"#).expect("no holders field");
        assert!(missing.holders.is_empty());
    }

    #[test]
    fn parse_repairs_counts_and_rejects_garbage() {
        let s =
            Semaphore::parse(r#"{"semaphore":7,"max":2,"holders":["a","a","b"]}"#).expect("parse");
        assert_eq!(s.holders, vec!["a", "b"]);
        assert_eq!(s.semaphore, 0);
        assert!(matches!(
            Semaphore::parse("nope"),
            Err(LockError::Corrupt(_))
        ));
        assert!(matches!(
            Semaphore::parse(r#"{"semaphore":1,"max":-1,"holders":[]}"#),
            Err(LockError::Corrupt(_))
        ));
    }

    #[test]
    fn lock_until_full_then_refuse() {
        let mut s = Semaphore::new(2);
        assert_eq!(s.lock("a"), Ok(Outcome::Changed));
        assert_eq!(s.lock("b"), Ok(Outcome::Changed));
        assert_eq!(s.semaphore, 0);
        let e = s.lock("c").expect_err("full");
        assert_eq!(
            e,
            LockError::Full {
                max: 2,
                holders: vec!["a".into(), "b".into()]
            }
        );
        assert!(e.to_string().contains("held by a, b"), "{e}");
    }

    #[test]
    fn lock_is_reentrant() {
        let mut s = Semaphore::new(1);
        assert_eq!(s.lock("a"), Ok(Outcome::Changed));
        assert_eq!(s.lock("a"), Ok(Outcome::Unchanged));
        assert_eq!(s.holders, vec!["a"]);
        assert_eq!(s.semaphore, 0);
    }

    #[test]
    fn unlock_frees_the_slot_and_refuses_strangers() {
        let mut s = Semaphore::new(1);
        s.lock("a").expect("lock");
        assert!(matches!(s.unlock("b"), Err(LockError::NotHeld { .. })));
        assert_eq!(s.unlock("a"), Ok(Outcome::Changed));
        assert_eq!(s, Semaphore::new(1));
        assert!(matches!(s.unlock("a"), Err(LockError::NotHeld { .. })));
        assert_eq!(s.lock("b"), Ok(Outcome::Changed));
    }

    #[test]
    fn set_max_below_holders_keeps_them_and_gives_no_slot() {
        let mut s = Semaphore::new(3);
        for id in ["a", "b", "c"] {
            s.lock(id).expect("lock");
        }
        assert_eq!(s.set_max(1), Ok(Outcome::Changed));
        assert_eq!(s.holders, vec!["a", "b", "c"]);
        assert_eq!(s.semaphore, -2);
        assert!(matches!(s.lock("d"), Err(LockError::Full { .. })));
        assert_eq!(
            s.lock("a"),
            Ok(Outcome::Unchanged),
            "a holder stays re-entrant"
        );
        s.unlock("a").expect("unlock");
        s.unlock("b").expect("unlock");
        assert!(
            matches!(s.lock("d"), Err(LockError::Full { .. })),
            "still c holds the one slot"
        );
        s.unlock("c").expect("unlock");
        assert_eq!(s.lock("d"), Ok(Outcome::Changed));
        assert_eq!(s.set_max(1), Ok(Outcome::Unchanged));
        assert_eq!(s.set_max(-1), Err(LockError::InvalidMax(-1)));
        assert_eq!(s.set_max(0), Ok(Outcome::Changed));
        assert_eq!(s.semaphore, -1);
    }

    #[test]
    fn ids_and_groups_are_checked() {
        let mut s = Semaphore::new(5);
        assert!(matches!(s.lock(""), Err(LockError::InvalidId(_))));
        assert!(matches!(s.lock("a b"), Err(LockError::InvalidId(_))));
        assert!(matches!(
            s.lock(&"x".repeat(254)),
            Err(LockError::InvalidId(_))
        ));
        assert_eq!(
            semaphore_key("default").expect("key"),
            "/coreos.com/updateengine/rebootlock/semaphore"
        );
        assert_eq!(
            semaphore_key("").expect("key"),
            "/coreos.com/updateengine/rebootlock/semaphore"
        );
        assert_eq!(
            semaphore_key("canary").expect("key"),
            "/coreos.com/updateengine/rebootlock/groups/canary/semaphore"
        );
        for bad in ["a/b", "..", "x y", &"g".repeat(65)] {
            assert!(semaphore_key(bad).is_err(), "{bad:?} accepted");
        }
    }
}
