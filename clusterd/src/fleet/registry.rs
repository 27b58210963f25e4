//! fleet's view of the KV store: one [`Snapshot`] of everything under `/_keel/fleet/`, and a small keys-API
//! client ([`Kv`]) for the agent and `fleetctl`.
//!
//! Owns: decoding the `/_keel/fleet` tree (machines with the index of their last heartbeat, units, schedule,
//! states, drains) from an etcd node, whether it came from the local state machine (engine) or over HTTP;
//! the HTTP calls fleet makes (get the tree, set with TTL, compare-and-set/delete). Records that do not
//! decode are skipped and counted, never fatal. Does not: decide anything.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_model::fleet::{self, DrainRecord, MachineRecord, Rollout, UnitRecord, UnitState};

use crate::client::{self, enc, ClientError, HttpResponse};
use crate::kv::NodeView;

/// A fleet KV failure.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The cluster could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The keys API refused the request.
    #[error("{method} {key}: the cluster answered {status}: {message}")]
    Refused {
        method: String,
        key: String,
        status: u16,
        message: String,
        /// etcd error code (0 when the body was not an etcd error).
        code: u64,
    },
    /// The answer was not what the keys API sends.
    #[error("{0}: malformed answer from the keys API")]
    Malformed(String),
}

/// A machine record and the store index of its last write (each heartbeat is a new index).
#[derive(Debug, Clone, PartialEq)]
pub struct MachineEntry {
    pub record: MachineRecord,
    pub modified: u64,
}

/// Everything fleet keeps in the KV store, at one store index.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub machines: BTreeMap<String, MachineEntry>,
    pub units: BTreeMap<String, UnitRecord>,
    /// unit → machine id.
    pub schedule: BTreeMap<String, String>,
    /// States of non-Global units.
    pub states: BTreeMap<String, UnitState>,
    /// Global unit → machine id → state.
    pub global_states: BTreeMap<String, BTreeMap<String, UnitState>>,
    pub drains: BTreeMap<String, DrainRecord>,
    /// Global units being replaced machine by machine.
    pub rollouts: BTreeMap<String, Rollout>,
    /// Records that did not decode (key: reason).
    pub skipped: Vec<String>,
}

fn last_component(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

fn children(n: &NodeView) -> &[NodeView] {
    n.nodes.as_deref().unwrap_or(&[])
}

impl Snapshot {
    /// Decode the `/_keel/fleet` node (listed recursively).
    pub fn from_node(root: &NodeView) -> Snapshot {
        let mut s = Snapshot::default();
        for dir in children(root) {
            s.add_dir(dir);
        }
        s
    }

    /// Decode one of the tree's directories (`machines`, `units`, …, listed recursively) into this snapshot.
    pub fn add_dir(&mut self, dir: &NodeView) {
        let s = self;
        {
            let key = dir.key.as_deref().unwrap_or("");
            match last_component(key) {
                "machines" => s.decode_files(dir, |s, name, v, n| {
                    let record: MachineRecord = serde_json::from_str(v)?;
                    s.machines.insert(name.to_string(), MachineEntry { record, modified: n.modified_index });
                    Ok(())
                }),
                "units" => s.decode_files(dir, |s, name, v, _| {
                    s.units.insert(name.to_string(), serde_json::from_str(v)?);
                    Ok(())
                }),
                "schedule" => s.decode_files(dir, |s, name, v, _| {
                    s.schedule.insert(name.to_string(), v.to_string());
                    Ok(())
                }),
                "drain" => s.decode_files(dir, |s, name, v, _| {
                    s.drains.insert(name.to_string(), serde_json::from_str(v)?);
                    Ok(())
                }),
                "rollout" => s.decode_files(dir, |s, name, v, _| {
                    s.rollouts.insert(name.to_string(), serde_json::from_str(v)?);
                    Ok(())
                }),
                "states" => s.decode_states(dir),
                _ => {}
            }
        }
    }

    fn decode_files(
        &mut self,
        dir: &NodeView,
        mut f: impl FnMut(&mut Snapshot, &str, &str, &NodeView) -> Result<(), serde_json::Error>,
    ) {
        for n in children(dir) {
            let key = n.key.as_deref().unwrap_or("");
            let Some(v) = n.value.as_deref() else { continue };
            if let Err(e) = f(self, last_component(key), v, n) {
                self.skipped.push(format!("{key}: {e}"));
            }
        }
    }

    fn decode_states(&mut self, dir: &NodeView) {
        for n in children(dir) {
            let key = n.key.as_deref().unwrap_or("");
            let unit = last_component(key).to_string();
            if n.dir {
                for m in children(n) {
                    let mkey = m.key.as_deref().unwrap_or("");
                    match m.value.as_deref().map(serde_json::from_str::<UnitState>) {
                        Some(Ok(st)) => {
                            self.global_states.entry(unit.clone()).or_default().insert(last_component(mkey).to_string(), st);
                        }
                        Some(Err(e)) => self.skipped.push(format!("{mkey}: {e}")),
                        None => {}
                    }
                }
            } else if let Some(v) = n.value.as_deref() {
                match serde_json::from_str(v) {
                    Ok(st) => {
                        self.states.insert(unit, st);
                    }
                    Err(e) => self.skipped.push(format!("{key}: {e}")),
                }
            }
        }
    }

    /// `keel_model::fleet::drain_progress` over this snapshot (a first look: nothing was pending before).
    pub fn drain_progress(&self, machine_id: &str) -> fleet::DrainProgress {
        self.drain_progress_after(machine_id, &fleet::DrainProgress::default())
    }

    /// `DrainProgress::next` over this snapshot: the next look at a drain being waited for.
    pub fn drain_progress_after(&self, machine_id: &str, before: &fleet::DrainProgress) -> fleet::DrainProgress {
        let units: Vec<UnitRecord> = self.units.values().cloned().collect();
        before.next(machine_id, &units, &self.schedule, &self.states)
    }
}

/// A keys-API client over HTTP (blocking), trying `endpoints` in order.
#[derive(Debug, Clone)]
pub struct Kv {
    pub endpoints: Vec<String>,
    pub timeout: Duration,
}

impl Kv {
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Kv {
        Kv { endpoints, timeout }
    }

    fn call(&self, method: &str, key: &str, query: &str, form: Option<&str>) -> Result<HttpResponse, FleetError> {
        let path = format!("/v2/keys{key}{}{query}", if query.is_empty() { "" } else { "?" });
        Ok(client::request_any(&self.endpoints, method, &path, form, self.timeout)?)
    }

    fn check(method: &str, key: &str, r: HttpResponse) -> Result<HttpResponse, FleetError> {
        if (200..300).contains(&r.status) {
            return Ok(r);
        }
        let j = r.json().unwrap_or_default();
        Err(FleetError::Refused {
            method: method.into(),
            key: key.into(),
            status: r.status,
            message: j["message"].as_str().map(|m| format!("{m} ({})", j["cause"].as_str().unwrap_or(""))).unwrap_or(r.body),
            code: j["errorCode"].as_u64().unwrap_or(0),
        })
    }

    /// The whole fleet tree (linearizable read); empty when nothing was ever written.
    pub fn snapshot(&self) -> Result<Snapshot, FleetError> {
        let r = self.call("GET", fleet::PREFIX, "recursive=true", None)?;
        if r.status == 404 {
            return Ok(Snapshot::default());
        }
        let r = Self::check("GET", fleet::PREFIX, r)?;
        let v: serde_json::Value = serde_json::from_str(&r.body).map_err(|_| FleetError::Malformed(fleet::PREFIX.into()))?;
        let node: NodeView = serde_json::from_value(v["node"].clone()).map_err(|_| FleetError::Malformed(fleet::PREFIX.into()))?;
        Ok(Snapshot::from_node(&node))
    }

    /// Set `key` to `value`, with an optional TTL in seconds.
    pub fn set(&self, key: &str, value: &str, ttl: Option<u64>) -> Result<(), FleetError> {
        let mut form = format!("value={}", enc(value));
        if let Some(t) = ttl {
            form.push_str(&format!("&ttl={t}"));
        }
        let r = self.call("PUT", key, "", Some(&form))?;
        Self::check("PUT", key, r).map(|_| ())
    }

    /// Create `key` only if it does not exist. `Ok(false)` when it already exists.
    pub fn create(&self, key: &str, value: &str) -> Result<bool, FleetError> {
        let form = format!("value={}&prevExist=false", enc(value));
        let r = self.call("PUT", key, "", Some(&form))?;
        match Self::check("PUT", key, r) {
            Ok(_) => Ok(true),
            Err(FleetError::Refused { code: 105, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Delete `key` (a missing key is fine). With `prev_value`, only if it still holds that value.
    pub fn delete(&self, key: &str, prev_value: Option<&str>) -> Result<(), FleetError> {
        let query = prev_value.map(|p| format!("prevValue={}", enc(p))).unwrap_or_default();
        let r = self.call("DELETE", key, &query, None)?;
        match Self::check("DELETE", key, r) {
            Ok(_) | Err(FleetError::Refused { code: 100 | 101, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::Store;

    fn put(store: &mut Store, key: &str, value: &str) {
        let op = crate::kv::KvOp { key: key.into(), value: value.into(), ..Default::default() };
        store.apply(&op, 0).expect("write");
    }

    #[test]
    fn the_fleet_tree_decodes_and_bad_records_are_skipped() {
        let mut s = Store::new();
        put(&mut s, &fleet::machine_key("m1"), r#"{"id":"m1","hostname":"h","metadata":{"disk":"ssd"}}"#);
        put(&mut s, &fleet::machine_key("bad"), "not json");
        put(&mut s, &fleet::unit_key("a.service"), r#"{"name":"a.service","text":"[Service]\nExecStart=/bin/true\n","desired":"launched"}"#);
        put(&mut s, &fleet::schedule_key("a.service"), "m1");
        put(&mut s, &fleet::state_key("a.service"), r#"{"machine":"m1","load":"loaded","active":"active","sub":"running","updated":1}"#);
        put(&mut s, &fleet::global_state_key("g.service", "m1"), r#"{"machine":"m1","load":"loaded","active":"active","sub":"running","updated":1}"#);
        put(&mut s, &fleet::drain_key("m1"), r#"{"reason":"r","since":5}"#);
        put(&mut s, &fleet::rollout_key("g.service"), r#"{"old":"x","done":["m1"]}"#);
        let ev = s.get(fleet::PREFIX, true, false, 0).expect("tree");
        let snap = Snapshot::from_node(&ev.node);
        assert_eq!(snap.machines["m1"].record.metadata["disk"], "ssd");
        assert!(snap.machines["m1"].modified > 0);
        assert_eq!(snap.units["a.service"].desired, keel_model::fleet::DesiredState::Launched);
        assert_eq!(snap.schedule["a.service"], "m1");
        assert_eq!(snap.states["a.service"].active, "active");
        assert_eq!(snap.global_states["g.service"]["m1"].sub, "running");
        assert_eq!(snap.drains["m1"].since, 5);
        assert_eq!(snap.rollouts["g.service"].done, vec!["m1"]);
        assert_eq!(snap.skipped.len(), 1, "{:?}", snap.skipped);
        assert_eq!(snap.drain_progress("m1").pending, vec!["a.service"]);
    }
}
