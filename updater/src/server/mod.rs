//! The update server's model: channels → versions → payloads, groups with a rollout policy, and
//! per-machine state built from Omaha events. Pure logic plus a JSON state file; HTTP lives in [`http`].
//!
//! Owns: `<data>/state.json` and `<data>/payloads/`; the grant decision for an update check.
//! Does not: parse XML (see `omaha`), verify chunk hashes on machines (the client does), or touch disks.

pub mod http;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::omaha::{Request, Update};

/// One published payload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Release {
    pub version: String,
    /// File name under `<data>/payloads/`.
    pub file: String,
    pub size: u64,
    /// sha256 of the whole payload file (Omaha `hash_sha256`).
    pub sha256: String,
    pub key_id: String,
    pub published_at: u64,
}

/// A group: which channel its machines follow and how fast updates roll out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Group {
    pub channel: String,
    #[serde(default)]
    pub paused: bool,
    /// Grants allowed per period; 0 = unlimited.
    #[serde(default)]
    pub max_updates_per_period: u32,
    #[serde(default = "default_period")]
    pub period_secs: u64,
    /// Halt the rollout when a machine reports an error or a rollback.
    #[serde(default = "yes")]
    pub halt_on_error: bool,
    /// Set when halted: why. Cleared by `resume`.
    #[serde(default)]
    pub halted: Option<String>,
    /// Offer the channel's version even when it is older than a machine's (a fleet-wide rollback).
    /// Machines still refuse it unless their engine runs with --allow-downgrade.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Grant timestamps inside the current window.
    #[serde(default)]
    pub grants: Vec<u64>,
}

fn default_period() -> u64 {
    3600
}
fn yes() -> bool {
    true
}

impl Group {
    pub fn new(channel: &str) -> Group {
        Group {
            channel: channel.into(),
            paused: false,
            max_updates_per_period: 0,
            period_secs: 3600,
            halt_on_error: true,
            halted: None,
            allow_downgrade: false,
            grants: Vec::new(),
        }
    }
}

/// What the server knows about one machine.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Machine {
    pub id: String,
    pub version: String,
    pub group: String,
    /// idle, granted, downloading, downloaded, installed, complete, error, rolled-back
    pub state: String,
    pub target_version: Option<String>,
    pub last_error: Option<u32>,
    pub last_seen: u64,
    pub bootid: String,
    /// Most recent events, newest last (bounded).
    pub events: Vec<RecordedEvent>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordedEvent {
    pub at: u64,
    pub event_type: u32,
    pub event_result: u32,
    pub error_code: Option<u32>,
    pub previous_version: Option<String>,
    pub version: String,
}

const MAX_EVENTS_PER_MACHINE: usize = 50;

/// Everything the server persists.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub channels: BTreeMap<String, Vec<Release>>,
    pub groups: BTreeMap<String, Group>,
    pub machines: BTreeMap<String, Machine>,
}

/// The answer to an update check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    NoUpdate,
    /// Policy refusal: the Omaha status string (e.g. `error-updatesDisabled`).
    Refused(&'static str),
    Grant(Release),
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ver(s: &str) -> semver::Version {
    semver::Version::parse(s).unwrap_or(semver::Version::new(0, 0, 0))
}

impl State {
    pub fn load(data: &Path) -> std::io::Result<State> {
        match std::fs::read(data.join("state.json")) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", data.join("state.json").display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, data: &Path) -> std::io::Result<()> {
        let b = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::payload::apply::write_durable(&data.join("state.json"), &b)
    }

    /// Newest release on a channel.
    pub fn latest(&self, channel: &str) -> Option<&Release> {
        self.channels
            .get(channel)?
            .iter()
            .max_by(|a, b| ver(&a.version).cmp(&ver(&b.version)))
    }

    /// Adds a release; a group named after the channel is created if none follows it yet.
    pub fn publish(&mut self, channel: &str, rel: Release) {
        let list = self.channels.entry(channel.to_string()).or_default();
        list.retain(|r| r.version != rel.version);
        list.push(rel);
        if !self.groups.values().any(|g| g.channel == channel) {
            self.groups.insert(channel.to_string(), Group::new(channel));
        }
    }

    /// Records a request's events and decides an update check. `at` is the current unix time.
    pub fn handle(&mut self, req: &Request, at: u64) -> Decision {
        let group_name = req.track.clone();
        let m = self
            .machines
            .entry(req.machineid.clone())
            .or_insert_with(|| Machine {
                id: req.machineid.clone(),
                state: "idle".into(),
                ..Machine::default()
            });
        m.version = req.version.clone();
        m.group = group_name.clone();
        m.last_seen = at;
        m.bootid = req.bootid.clone();
        let mut halt_reason = None;
        for e in &req.events {
            m.events.push(RecordedEvent {
                at,
                event_type: e.event_type,
                event_result: e.event_result,
                error_code: e.error_code,
                previous_version: e.previous_version.clone(),
                version: req.version.clone(),
            });
            if m.events.len() > MAX_EVENTS_PER_MACHINE {
                m.events.remove(0);
            }
            m.state = match (e.event_type, e.event_result) {
                (13, 1) => "downloading",
                (14, 1) => "downloaded",
                (3, 1) => "installed",
                (3, 2) => "complete",
                (3, 0) if e.error_code == Some(44) => "rolled-back",
                (3, 0) => "error",
                _ => m.state.as_str(),
            }
            .to_string();
            if e.event_result == 0 {
                m.last_error = e.error_code;
                halt_reason = Some(format!(
                    "machine {} reported {} (error code {})",
                    req.machineid,
                    if e.error_code == Some(44) {
                        "a rollback"
                    } else {
                        "an error"
                    },
                    e.error_code.unwrap_or(0)
                ));
            }
            if (e.event_type, e.event_result) == (3, 2) {
                m.target_version = None;
                m.last_error = None;
            }
        }
        let machine_state = m.state.clone();
        let machine_target = m.target_version.clone();
        if let (Some(reason), Some(g)) = (halt_reason, self.groups.get_mut(&group_name)) {
            if g.halt_on_error && g.halted.is_none() {
                g.halted = Some(reason);
            }
        }
        if !req.updatecheck {
            return Decision::NoUpdate;
        }
        let Some(group) = self.groups.get(&group_name) else {
            return Decision::NoUpdate;
        };
        let Some(rel) = self.latest(&group.channel).cloned() else {
            return Decision::NoUpdate;
        };
        let (offered, running) = (ver(&rel.version), ver(&req.version));
        if offered == running || (offered < running && !group.allow_downgrade) {
            return Decision::NoUpdate;
        }
        // A machine already granted this version may continue (resume) whatever the policy says now,
        // unless it reported failing with it.
        let continuing = machine_target.as_deref() == Some(rel.version.as_str())
            && !matches!(machine_state.as_str(), "error" | "rolled-back");
        if !continuing {
            if matches!(machine_state.as_str(), "error" | "rolled-back")
                && machine_target.as_deref() == Some(rel.version.as_str())
            {
                // Never offer a version again to a machine that failed with it or rolled it back, halted or not:
                // it would download, fail and reboot in a loop. A newer release is offered as usual.
                if group.paused || group.halted.is_some() {
                    return Decision::Refused("error-updatesDisabled");
                }
                return Decision::NoUpdate;
            }
            if group.paused || group.halted.is_some() {
                return Decision::Refused("error-updatesDisabled");
            }
            if group.max_updates_per_period > 0 {
                let recent = group
                    .grants
                    .iter()
                    .filter(|&&t| t + group.period_secs > at)
                    .count();
                if recent as u32 >= group.max_updates_per_period {
                    return Decision::Refused("error-maxUpdatesPerPeriodLimitReached");
                }
            }
            if let Some(g) = self.groups.get_mut(&group_name) {
                g.grants.retain(|&t| t + g.period_secs > at);
                g.grants.push(at);
            }
        }
        if let Some(m) = self.machines.get_mut(&req.machineid) {
            m.target_version = Some(rel.version.clone());
            if !continuing {
                m.state = "granted".into();
            }
        }
        Decision::Grant(rel)
    }
}

/// Server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data: PathBuf,
    /// Public base URL of the payloads (`…/payloads/`); derived from the Host header when unset.
    pub base_url: Option<String>,
    /// Trusted keys: when set, publish refuses payloads that do not verify.
    pub keys: Option<PathBuf>,
    /// When set, admin API calls need `Authorization: Bearer <token>`.
    pub admin_token: Option<String>,
}

/// Builds the Omaha update description for a release.
pub fn update_for(rel: &Release, base_url: &str) -> Update {
    Update {
        urls: vec![base_url.to_string()],
        version: rel.version.clone(),
        package_name: rel.file.clone(),
        size: rel.size,
        hash_sha256: rel.sha256.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::omaha::{Event, Request};

    fn release(version: &str) -> Release {
        Release {
            version: version.into(),
            file: format!("keel-{version}.kpl"),
            size: 1,
            sha256: "00".into(),
            key_id: "k".into(),
            published_at: 0,
        }
    }

    fn check(version: &str, events: Vec<Event>) -> Request {
        Request {
            machineid: "m1".into(),
            version: version.into(),
            track: "stable".into(),
            updatecheck: true,
            events,
            ..Request::default()
        }
    }

    #[test]
    fn a_version_that_rolled_back_on_a_machine_is_not_offered_to_it_again_even_without_a_halt() {
        let mut st = State::default();
        st.publish("stable", release("2.0.0"));
        if let Some(g) = st.groups.get_mut("stable") {
            g.halt_on_error = false;
        }
        assert!(matches!(st.handle(&check("1.0.0", vec![]), 100), Decision::Grant(_)));
        let rollback = Event {
            event_type: 3,
            event_result: 0,
            error_code: Some(44),
            previous_version: None,
        };
        assert_eq!(st.handle(&check("1.0.0", vec![rollback]), 200), Decision::NoUpdate);
        assert_eq!(st.handle(&check("1.0.0", vec![]), 300), Decision::NoUpdate, "asked again: still not offered");
        st.publish("stable", release("2.0.1"));
        assert!(matches!(st.handle(&check("1.0.0", vec![]), 400), Decision::Grant(r) if r.version == "2.0.1"));
    }
}
