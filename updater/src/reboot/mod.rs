//! The reboot manager: what `update-engine` does once an update is installed (UPDATED_NEED_REBOOT), and
//! what it owes the cluster after the reboot.
//!
//! Owns: the strategy decision (`reboot` now, `etcd-lock` = inside a window take the cluster semaphore,
//! drain fleet units away, then reboot, or `off`), the reboot request (init's control API, or a configured
//! command), `<state>/reboot-lock.json` (which group's lock this machine took and in which boot), releasing
//! that lock and deleting the drain marker once the next boot's health gate has finished (passed, or the
//! machine fell back), whatever the window, and the `reboot` part of `updatectl status`.
//! Does not: install updates or run the health gate's checks (see `engine`), parse the semaphore (see
//! `keel_model::lock`) or move units (fleet's engine does while the drain marker exists).
//!
//! Sub-modules: [`strategy`], [`window`] (reboot windows), [`kv`] (etcd v2 client), [`lock`] (semaphore by
//! compare-and-swap), [`drain`] (fleet drain marker and progress), [`config`] (cloud-config's files).

pub mod config;
pub mod drain;
pub mod kv;
pub mod lock;
pub mod strategy;
pub mod window;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_model::lock::LockError;
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineState};
use kv::Kv;
use lock::{LockClient, LockClientError};
pub use strategy::Strategy;
use window::Windows;

/// Settings of the reboot manager (flags over cloud-config, see `update-engine --help`).
#[derive(Debug, Clone)]
pub struct RebootConfig {
    pub strategy: Strategy,
    pub windows: Windows,
    /// The windows as configured, for status output.
    pub window_texts: Vec<String>,
    /// Semaphore group (`default`).
    pub group: String,
    /// clusterd client URLs.
    pub endpoints: Vec<String>,
    /// Max of the semaphore when this machine is the first to create it.
    pub initial_max: i64,
    /// Shell command that reboots; None: ask init (`{"cmd":"power","action":"reboot"}`).
    pub reboot_command: Option<String>,
    pub init_socket: PathBuf,
    /// Longest wait for fleet to move this machine's units before rebooting anyway.
    pub drain_timeout: Duration,
    /// How often to re-check the lock, window and engine state.
    pub poll: Duration,
    pub machine_id: String,
    pub boot_id: String,
    pub state_dir: PathBuf,
}

impl RebootConfig {
    /// Strategy `off` with every default: what runs when the configured settings are unusable.
    pub fn off(state_dir: PathBuf, init_socket: PathBuf) -> RebootConfig {
        RebootConfig {
            strategy: Strategy::Off,
            windows: Windows::default(),
            window_texts: Vec::new(),
            group: "default".into(),
            endpoints: vec!["http://127.0.0.1:2379".into()],
            initial_max: 1,
            reboot_command: None,
            init_socket,
            drain_timeout: Duration::from_secs(60),
            poll: Duration::from_secs(10),
            machine_id: String::new(),
            boot_id: String::new(),
            state_dir,
        }
    }
}

/// What the reboot manager is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Nothing to reboot for.
    #[default]
    Idle,
    /// An update is installed but the strategy is `off`.
    Off,
    WaitingForWindow,
    WaitingForLock,
    Draining,
    Rebooting,
    /// After a reboot: giving the lock back (retrying while the KV cannot be reached).
    ReleasingLock,
    /// Holding the lock while the health gate runs, or while falling back after it failed.
    HoldingLock,
    Error,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::serde_name(self))
    }
}

/// The reboot manager's part of `GET /v1/status` (`reboot`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RebootStatus {
    pub strategy: String,
    pub group: String,
    pub windows: Vec<String>,
    /// Whether a window is open now (always true without windows).
    pub window_open: bool,
    /// Unix time the next window opens (now while one is open; null without windows).
    pub next_window: Option<u64>,
    pub phase: Phase,
    /// Why, in words (who holds the lock, which units are still moving, what failed).
    pub detail: String,
    /// This machine holds a slot of the semaphore (as far as it last saw).
    pub holding_lock: bool,
    /// Unix time the phase began.
    pub since: u64,
}

/// `<state>/reboot-lock.json`: written before this machine takes the lock for a reboot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct LockRecord {
    group: String,
    id: String,
    /// The boot in which the lock was taken; a later boot releases it.
    boot_id: String,
    at: u64,
}

const RECORD: &str = "reboot-lock.json";

fn now() -> u64 {
    crate::server::now()
}

/// The reboot manager of one machine.
pub struct RebootManager {
    cfg: RebootConfig,
    engine: Arc<Engine>,
    kv: Kv,
    lock: LockClient,
    /// The reboot was requested; do not ask again in this process.
    rebooted: AtomicBool,
    /// Why the settings were not usable (then the strategy is `off`).
    problem: Option<String>,
}

impl RebootManager {
    /// A manager for `cfg`. `problem`: the settings could not be read; then (as when the group is invalid)
    /// the manager still runs the health gate and releases earlier locks, but its strategy is `off` and
    /// `updatectl status` shows the problem until the settings are fixed.
    pub fn new(cfg: RebootConfig, engine: Arc<Engine>, problem: Option<String>) -> RebootManager {
        let kv = Kv::new(&cfg.endpoints, Duration::from_secs(10));
        let (cfg, lock, problem) = match LockClient::new(kv.clone(), &cfg.group, cfg.initial_max) {
            Ok(lock) => (cfg, lock, problem),
            Err(e) => {
                let off = RebootConfig {
                    strategy: Strategy::Off,
                    group: "default".into(),
                    initial_max: 1,
                    ..cfg
                };
                (
                    off,
                    LockClient::default_group(kv.clone()),
                    Some(e.to_string()),
                )
            }
        };
        let problem = problem.map(|p| {
            let p = format!("{p}; the reboot manager is off until its settings are fixed");
            eprintln!("update-engine: reboot manager: {p}");
            p
        });
        let m = RebootManager {
            engine,
            kv,
            lock,
            rebooted: AtomicBool::new(false),
            cfg,
            problem,
        };
        m.set(Phase::Idle, String::new());
        m
    }

    fn set(&self, phase: Phase, detail: String) {
        let t = now();
        let open = self.cfg.windows.is_open(t as i64);
        let next = self.cfg.windows.next_open(t as i64).map(|n| n as u64);
        let mut changed = false;
        self.engine.set(|s| {
            let old = s.reboot.take().unwrap_or_default();
            changed = old.phase != phase || old.detail != detail;
            let holding = match phase {
                Phase::Draining | Phase::Rebooting | Phase::HoldingLock => true,
                Phase::WaitingForLock => false,
                _ => old.holding_lock,
            };
            s.reboot = Some(RebootStatus {
                strategy: self.cfg.strategy.name().into(),
                group: self.lock.group().into(),
                windows: self.cfg.window_texts.clone(),
                window_open: open,
                next_window: next,
                phase,
                since: if old.phase == phase && old.since > 0 {
                    old.since
                } else {
                    t
                },
                detail: detail.clone(),
                holding_lock: holding,
            });
        });
        if changed && (phase != Phase::Idle || !detail.is_empty()) {
            eprintln!(
                "update-engine: reboot manager: {phase}{}",
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                }
            );
        }
    }

    fn set_holding(&self, holding: bool) {
        self.engine.set(|s| {
            if let Some(r) = s.reboot.as_mut() {
                r.holding_lock = holding;
            }
        });
    }

    fn record_path(&self) -> PathBuf {
        self.cfg.state_dir.join(RECORD)
    }

    fn read_record(&self) -> Option<LockRecord> {
        std::fs::read(self.record_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    fn write_record(&self) -> Result<(), String> {
        let rec = LockRecord {
            group: self.lock.group().to_string(),
            id: self.cfg.machine_id.clone(),
            boot_id: self.cfg.boot_id.clone(),
            at: now(),
        };
        let b = serde_json::to_vec(&rec).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&self.cfg.state_dir).map_err(|e| e.to_string())?;
        crate::payload::apply::write_durable(&self.record_path(), &b)
            .map_err(|e| format!("writing {}: {e}", self.record_path().display()))
    }

    /// Runs forever on the calling (blocking) thread: the health gate if this boot needs it, then the
    /// release of a lock taken before the reboot, then the strategy loop.
    pub fn run(self, needs_gate: bool) {
        if needs_gate {
            if self
                .read_record()
                .is_some_and(|r| r.boot_id != self.cfg.boot_id)
            {
                self.set(
                    Phase::HoldingLock,
                    "health gate of the new boot is running; the lock is released when it finishes"
                        .into(),
                );
            }
            self.engine.gate_and_bless();
        }
        let health = self.engine.status().health;
        if health == "failed" {
            // The engine falls back to the previous slot (or waits for a reboot); this machine keeps its lock
            // until the fallback boot, so no other machine goes down meanwhile.
            if self
                .read_record()
                .is_some_and(|r| r.boot_id != self.cfg.boot_id)
            {
                self.set(Phase::HoldingLock, "health gate failed; keeping the lock until the machine is back on its previous slot".into());
            }
        } else {
            self.release_after_boot();
        }
        loop {
            let pause = self.tick();
            std::thread::sleep(pause);
        }
    }

    /// Gives back a lock taken in an earlier boot (and ends the drain), retrying until the KV answers.
    fn release_after_boot(&self) {
        let Some(rec) = self.read_record() else {
            return;
        };
        if rec.boot_id == self.cfg.boot_id {
            // Restarted in the boot that took the lock: the reboot is still to come.
            return;
        }
        let client = match LockClient::new(self.kv.clone(), &rec.group, self.cfg.initial_max) {
            Ok(c) => c,
            Err(e) => {
                self.set(
                    Phase::Error,
                    format!(
                        "cannot release the lock recorded in {}: {e}",
                        self.record_path().display()
                    ),
                );
                let _ = std::fs::remove_file(self.record_path());
                return;
            }
        };
        let started = Instant::now();
        loop {
            let r = client
                .release(&rec.id)
                .map_err(|e| e.to_string())
                .and_then(|_| drain::end(&self.kv, &rec.id).map_err(|e| e.to_string()));
            match r {
                Ok(_) => {
                    let _ = std::fs::remove_file(self.record_path());
                    self.set_holding(false);
                    self.set(
                        Phase::Idle,
                        format!(
                            "released the {} lock and ended the drain after the reboot ({:.1}s)",
                            rec.group,
                            started.elapsed().as_secs_f64()
                        ),
                    );
                    return;
                }
                Err(e) => {
                    self.set(
                        Phase::ReleasingLock,
                        format!(
                            "releasing the {} lock taken before the reboot: {e}; retrying",
                            rec.group
                        ),
                    );
                    std::thread::sleep(self.cfg.poll.min(Duration::from_secs(5)));
                }
            }
        }
    }

    /// One decision; returns how long to wait before the next.
    fn tick(&self) -> Duration {
        let poll = self.cfg.poll;
        if self.rebooted.load(Ordering::SeqCst) {
            return poll;
        }
        let st = self.engine.status();
        if st.state != EngineState::UpdatedNeedReboot {
            let cur = st.reboot.clone().unwrap_or_default();
            if cur.phase != Phase::HoldingLock {
                let detail = if cur.phase == Phase::Idle {
                    cur.detail
                } else {
                    String::new()
                };
                self.set(Phase::Idle, detail);
            }
            return poll;
        }
        let version = st.new_version.unwrap_or_else(|| "the other slot".into());
        let t = now() as i64;
        let wait_window = || {
            let next = self.cfg.windows.next_open(t).unwrap_or(t);
            self.set(
                Phase::WaitingForWindow,
                format!(
                    "{version} is installed; the next reboot window opens {}",
                    window::format_utc(next)
                ),
            );
            Duration::from_secs((next - t).max(1) as u64).min(poll)
        };
        match self.cfg.strategy {
            Strategy::Off => {
                match &self.problem {
                    Some(p) => self.set(Phase::Error, format!("{version} is installed; {p}")),
                    None => self.set(
                        Phase::Off,
                        format!("{version} is installed; reboot strategy is off: reboot by hand (initctl reboot)"),
                    ),
                }
                poll
            }
            Strategy::Reboot if !self.cfg.windows.is_open(t) => wait_window(),
            Strategy::Reboot => self.reboot(&format!("rebooting into {version}")),
            Strategy::EtcdLock if !self.cfg.windows.is_open(t) => {
                self.give_back_outside_window();
                wait_window()
            }
            Strategy::EtcdLock => self.lock_drain_reboot(&version),
        }
    }

    fn lock_drain_reboot(&self, version: &str) -> Duration {
        if let Err(e) = self.write_record() {
            self.set(
                Phase::Error,
                format!("{e}; not taking the lock without a record to release it by"),
            );
            return self.cfg.poll;
        }
        let id = &self.cfg.machine_id;
        match self.lock.lock(id) {
            Ok(_) => self.set_holding(true),
            Err(LockClientError::Lock(LockError::Full { max, holders })) => {
                let gone: Vec<String> = self
                    .lock
                    .status()
                    .map(|s| {
                        s.holders
                            .into_iter()
                            .filter(|h| h.left_cluster())
                            .map(|h| h.id)
                            .collect()
                    })
                    .unwrap_or_default();
                let hint = gone
                    .iter()
                    .map(|id| {
                        format!(
                            "; {id} has left the cluster (no fleet machine record, not a clusterd member): \
                             free its slot with `locksmithctl unlock {id}`"
                        )
                    })
                    .collect::<String>();
                self.set(
                    Phase::WaitingForLock,
                    format!(
                        "{version} is installed; the {} semaphore is full (max {max}, held by {}){hint}",
                        self.lock.group(),
                        holders.join(", ")
                    ),
                );
                return self.cfg.poll;
            }
            Err(e) => {
                self.set(
                    Phase::WaitingForLock,
                    format!("{version} is installed; cannot take the lock: {e}"),
                );
                return self.cfg.poll;
            }
        }
        self.drain(version);
        self.reboot(&format!(
            "rebooting into {version} holding the {} lock",
            self.lock.group()
        ))
    }

    /// A lock taken in this boot whose reboot did not happen before the window closed (the engine restarted,
    /// or the reboot command failed) is given back, so it never blocks the fleet until the next window.
    fn give_back_outside_window(&self) {
        let Some(rec) = self.read_record() else {
            return;
        };
        if rec.boot_id != self.cfg.boot_id || rec.group != self.lock.group() {
            return;
        }
        let r = self
            .lock
            .release(&rec.id)
            .map_err(|e| e.to_string())
            .and_then(|_| drain::end(&self.kv, &rec.id).map_err(|e| e.to_string()));
        match r {
            Ok(_) => {
                let _ = std::fs::remove_file(self.record_path());
                self.set_holding(false);
                eprintln!("update-engine: reboot manager: the window closed before the reboot; gave the lock back");
            }
            Err(e) => eprintln!("update-engine: reboot manager: giving the lock back outside the window: {e}; retrying"),
        }
    }

    /// Marks this machine drained and waits (bounded) until fleet reports its units running elsewhere.
    fn drain(&self, version: &str) {
        let id = &self.cfg.machine_id;
        let started = Instant::now();
        let deadline = started + self.cfg.drain_timeout;
        let mut begun = false;
        let mut last = String::from("nothing checked yet");
        let mut progress = keel_model::fleet::DrainProgress::default();
        while Instant::now() < deadline {
            if !begun {
                match drain::begin(&self.kv, id, &format!("reboot into {version}"), now()) {
                    Ok(()) => begun = true,
                    Err(e) => last = format!("cannot set the drain marker: {e}"),
                }
            }
            if begun {
                match drain::progress(&self.kv, id, &progress) {
                    Ok(p) if p.is_drained() => {
                        eprintln!(
                            "update-engine: reboot manager: drained in {:.1}s",
                            started.elapsed().as_secs_f64()
                        );
                        return;
                    }
                    Ok(p) => {
                        last = format!(
                            "{} unit(s) still to move: {}",
                            p.pending.len(),
                            p.pending.join(", ")
                        );
                        progress = p;
                    }
                    Err(e) => last = format!("cannot read fleet's state: {e}"),
                }
            }
            self.set(
                Phase::Draining,
                format!(
                    "waiting up to {:?} for fleet to move this machine's units: {last}",
                    self.cfg.drain_timeout
                ),
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!(
            "update-engine: reboot manager: drain gave up after {:?} ({last}); rebooting anyway",
            self.cfg.drain_timeout
        );
    }

    fn reboot(&self, why: &str) -> Duration {
        self.set(Phase::Rebooting, why.to_string());
        let r = match &self.cfg.reboot_command {
            Some(cmd) => std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .env("KEEL_MACHINE_ID", &self.cfg.machine_id)
                .env("KEEL_REBOOT_GROUP", self.lock.group())
                .status()
                .map_err(|e| format!("cannot run reboot command {cmd:?}: {e}"))
                .and_then(|s| {
                    if s.success() {
                        Ok(())
                    } else {
                        Err(format!("reboot command {cmd:?} exited with {s}"))
                    }
                }),
            None => crate::engine::fallback::ask_init_power(&self.cfg.init_socket, "reboot"),
        };
        match r {
            Ok(()) => {
                self.rebooted.store(true, Ordering::SeqCst);
                self.cfg.poll
            }
            Err(e) => {
                self.set(Phase::Error, format!("{why}: {e}; retrying"));
                self.cfg.poll
            }
        }
    }
}
