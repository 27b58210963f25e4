//! The `update-engine` daemon's core: Omaha checks, downloads with resume, applying to the inactive
//! slot, event reporting, the post-boot health gate, and the check schedule.
//!
//! Owns: `<state>/channel`, `<state>/installed.json` (what was installed, to which slot, in which boot),
//! `<state>/pending-events.json` (events not yet delivered), `<state>/resume/` (payload resume point),
//! and the engine status a user reads with `updatectl status`.
//! Does not: parse the payload format (see `payload`), flip bits itself (see `slot`), or reboot the
//! machine (a reboot manager acts on UPDATED_NEED_REBOOT).

pub mod control;
pub mod fallback;

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::omaha::{event, Event, OmahaError, Request, Response, Update, KEEL_APPID};
use crate::payload::apply::{apply_chunks, ResumeStore, Sinks};
use crate::payload::{PayloadError, PayloadHead, TrustedKeys};
use crate::slot::{Slot, SlotError, Slots};

/// What the engine is doing, as `updatectl status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EngineState {
    Idle,
    Checking,
    Downloading,
    Verifying,
    Finalizing,
    UpdatedNeedReboot,
    Error,
}

impl std::fmt::Display for EngineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::serde_name(self))
    }
}

/// The status document (`GET /v1/status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub state: EngineState,
    pub current_version: String,
    pub channel: String,
    pub active_slot: Option<Slot>,
    pub new_version: Option<String>,
    pub progress: f64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub last_check: Option<u64>,
    pub next_check: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_code: Option<u32>,
    pub health: String,
    /// What the last check answered: `noupdate`, `update <version>`, or the server's refusal
    /// (e.g. `error-updatesDisabled` when the rollout is paused or halted).
    pub last_check_result: Option<String>,
    /// Byte offset (uncompressed) the current download resumed from, if it resumed.
    pub resumed_from: Option<u64>,
    pub checks: u64,
    pub updates_installed: u64,
    /// The reboot manager's state (strategy, windows, lock, drain); null when none runs.
    #[serde(default)]
    pub reboot: Option<crate::reboot::RebootStatus>,
}

/// Errors of one check/apply cycle.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("update server {url} answered HTTP {status}; check --server and the server's logs")]
    Http { url: String, status: u16 },
    #[error("cannot reach {url}: {reason}; will retry with backoff")]
    Transport { url: String, reason: String },
    #[error("bad Omaha response: {0}")]
    Omaha(#[from] OmahaError),
    #[error(
        "server offered {offered} but the payload is {payload}; refusing a mismatched payload"
    )]
    VersionMismatch { offered: String, payload: String },
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("an update operation is already running; see `updatectl status`")]
    Busy,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    /// Omaha `errorcode` for a 3/0 event.
    pub fn omaha_code(&self) -> u32 {
        match self {
            EngineError::Http { status, .. } => event::ERR_HTTP_BASE + *status as u32,
            EngineError::Transport { .. } => event::ERR_DOWNLOAD_TRANSFER,
            EngineError::Omaha(_) | EngineError::VersionMismatch { .. } => {
                event::ERR_OMAHA_RESPONSE
            }
            EngineError::Payload(p) => p.omaha_code(),
            _ => event::ERR_INSTALL,
        }
    }
}

type Result<T> = std::result::Result<T, EngineError>;

/// Health gate: how a freshly booted slot proves itself before it is blessed.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Shell command that exits 0 while the system is healthy (e.g. `initctl is-healthy --required`).
    /// None: healthy as soon as the engine runs.
    pub cmd: Option<String>,
    /// How long the command must keep succeeding.
    pub hold: Duration,
    /// Give up (leave the slot unblessed, so the next boot falls back) after this long.
    pub timeout: Duration,
    /// Units that must be active (running, or exited successfully for oneshots), asked from init's
    /// control socket (`{"cmd":"list"}`, docs/init-api.md).
    pub units: Vec<String>,
    /// init's control socket.
    pub init_socket: PathBuf,
    /// What to do when the gate gives up: reboot (fall back to the previous slot now) or stay.
    pub on_failure: fallback::FailureAction,
}

/// What init says of the units the health gate requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitsVerdict {
    /// Every required unit is up.
    Up,
    /// Not (yet): the message says which unit and why (starting, restarting, unknown, init unreachable).
    Waiting(String),
    /// A required unit has failed and nothing will start it again: no restart pending, no job queued.
    Failed(String),
}

/// Asks init for every unit's status and judges `units` by it.
pub fn units_verdict(socket: &std::path::Path, units: &[String]) -> UnitsVerdict {
    match list_units(socket) {
        Ok(list) => judge_units(&list, units),
        Err(why) => UnitsVerdict::Waiting(why),
    }
}

/// init's `{"cmd":"list"}` answer: one status object per unit (docs/init-api.md).
fn list_units(socket: &std::path::Path) -> std::result::Result<Vec<serde_json::Value>, String> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach init at {}: {e}", socket.display()))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    s.write_all(b"{\"cmd\":\"list\"}\n")
        .map_err(|e| format!("writing to init: {e}"))?;
    let mut line = String::new();
    std::io::BufReader::new(s.take(8 << 20))
        .read_line(&mut line)
        .map_err(|e| format!("reading from init: {e}"))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("init answered non-JSON: {e}"))?;
    match v["units"].take() {
        serde_json::Value::Array(list) => Ok(list),
        _ => Err(format!("init answered {}", v["type"])),
    }
}

/// The verdict on `units` from init's unit list: the first required unit that is not up decides.
fn judge_units(list: &[serde_json::Value], units: &[String]) -> UnitsVerdict {
    for u in units {
        let Some(st) = list.iter().find(|x| x["name"].as_str() == Some(u.as_str())) else {
            return UnitsVerdict::Waiting(format!("required unit {u} is unknown to init"));
        };
        let (active, sub) = (
            st["active"].as_str().unwrap_or(""),
            st["sub"].as_str().unwrap_or(""),
        );
        if active == "active" && matches!(sub, "running" | "exited") {
            continue;
        }
        let why = format!("required unit {u} is {active}/{sub}");
        // `failed/failed` is init's final state; a pending restart shows as activating/auto-restart.
        return if active == "failed" && sub == "failed" && st["job"].is_null() {
            UnitsVerdict::Failed(why)
        } else {
            UnitsVerdict::Waiting(why)
        };
    }
    UnitsVerdict::Up
}

/// Engine configuration (from `update-engine` flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// Omaha endpoint, e.g. `http://updates.example:8080/v1/update/`.
    pub server: String,
    pub default_channel: String,
    pub disk: PathBuf,
    pub esp: PathBuf,
    pub keys_dir: PathBuf,
    pub state_dir: PathBuf,
    pub machine_id: String,
    pub boot_id: String,
    pub running_version: String,
    pub active_slot: Option<Slot>,
    pub cmdline: String,
    /// The initramfs' record of what it booted (`/run/keel/boot.env`).
    pub boot_env: PathBuf,
    pub allow_downgrade: bool,
    pub first_check_delay: Duration,
    pub interval: Duration,
    pub jitter: Duration,
    pub max_backoff: Duration,
    pub max_download_rate: Option<u64>,
    pub health: HealthConfig,
    pub board: String,
    pub platform: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Installed {
    version: String,
    slot: Slot,
    previous_version: String,
    boot_id: String,
}

/// The engine.
pub struct Engine {
    pub cfg: Config,
    status: Mutex<Status>,
    pub(crate) busy: AtomicBool,
    cancel: AtomicBool,
    failures: AtomicU64,
    active: std::sync::OnceLock<Slot>,
}

fn now() -> u64 {
    crate::server::now()
}

impl Engine {
    pub fn new(cfg: Config) -> Engine {
        let channel = std::fs::read_to_string(cfg.state_dir.join("channel"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| crate::payload::valid_channel(s))
            .unwrap_or_else(|| cfg.default_channel.clone());
        let status = Status {
            state: EngineState::Idle,
            current_version: cfg.running_version.clone(),
            channel,
            active_slot: None,
            new_version: None,
            progress: 0.0,
            bytes_done: 0,
            bytes_total: 0,
            last_check: None,
            next_check: None,
            last_error: None,
            last_error_code: None,
            health: "unknown".into(),
            last_check_result: None,
            resumed_from: None,
            checks: 0,
            updates_installed: 0,
            reboot: None,
        };
        Engine {
            cfg,
            status: Mutex::new(status),
            busy: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            active: std::sync::OnceLock::new(),
        }
    }

    pub fn status(&self) -> Status {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub(crate) fn set(&self, f: impl FnOnce(&mut Status)) {
        let mut g = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
    }

    pub fn slots(&self) -> Slots {
        Slots::new(&self.cfg.disk, &self.cfg.esp)
    }

    /// The running slot, detected once (it cannot change without a reboot) and then cached.
    pub fn active_slot(&self) -> Result<Slot> {
        if let Some(s) = self.cfg.active_slot.or_else(|| self.active.get().copied()) {
            return Ok(s);
        }
        let boot_env = std::fs::read_to_string(&self.cfg.boot_env).unwrap_or_default();
        let s = self.slots().detect_active(&boot_env, &self.cfg.cmdline)?;
        Ok(*self.active.get_or_init(|| s))
    }

    pub fn set_channel(&self, channel: &str) -> std::result::Result<(), String> {
        if !crate::payload::valid_channel(channel) {
            return Err(format!(
                "channel {channel:?} must be 1-64 characters of [a-z0-9._-]"
            ));
        }
        std::fs::create_dir_all(&self.cfg.state_dir).map_err(|e| e.to_string())?;
        crate::payload::apply::write_durable(
            &self.cfg.state_dir.join("channel"),
            channel.as_bytes(),
        )
        .map_err(|e| format!("saving channel: {e}"))?;
        self.set(|s| s.channel = channel.to_string());
        Ok(())
    }

    fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("keel-update-engine/", env!("CARGO_PKG_VERSION")))
            .build()
    }

    fn pending_path(&self) -> PathBuf {
        self.cfg.state_dir.join("pending-events.json")
    }

    fn pending_events(&self) -> Vec<Event> {
        std::fs::read(self.pending_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn queue_event(&self, e: Event) {
        let mut v = self.pending_events();
        v.push(e);
        v.truncate(32);
        if let Ok(b) = serde_json::to_vec(&v) {
            let _ = std::fs::create_dir_all(&self.cfg.state_dir);
            let _ = crate::payload::apply::write_durable(&self.pending_path(), &b);
        }
    }

    fn request(&self, updatecheck: bool, events: Vec<Event>, installsource: &str) -> Request {
        Request {
            installsource: installsource.into(),
            os_version: "Keel".into(),
            platform: self.cfg.platform.clone(),
            arch: "amd64".into(),
            appid: KEEL_APPID.into(),
            version: self.cfg.running_version.clone(),
            track: self.status().channel,
            bootid: self.cfg.boot_id.clone(),
            machineid: self.cfg.machine_id.clone(),
            oem: String::new(),
            board: self.cfg.board.clone(),
            ping: updatecheck,
            updatecheck,
            events,
        }
    }

    fn post(&self, req: &Request) -> Result<Response> {
        let url = self.cfg.server.clone();
        let resp = self
            .agent()
            .post(&url)
            .set("Content-Type", "text/xml")
            .send_string(&req.to_xml())
            .map_err(|e| http_err(&url, e))?;
        let mut body = Vec::new();
        resp.into_reader()
            .take(crate::omaha::MAX_XML_LEN as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| EngineError::Transport {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        Ok(Response::parse(&body, KEEL_APPID)?)
    }

    /// Sends events now; queues them for the next check if the server cannot be reached.
    pub fn report(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        if self
            .post(&self.request(false, events.clone(), "scheduler"))
            .is_err()
        {
            for e in events {
                self.queue_event(e);
            }
        }
    }

    /// One update check. Delivers queued events with it.
    pub fn check(&self, installsource: &str) -> Result<Option<Update>> {
        self.set(|s| {
            s.state = EngineState::Checking;
            s.checks += 1;
        });
        let pending = self.pending_events();
        let r = self.post(&self.request(true, pending.clone(), installsource));
        self.set(|s| s.last_check = Some(now()));
        let r = r?;
        let result = match (&r.update, r.updatecheck_status.as_deref()) {
            (Some(u), _) => format!("update {}", u.version),
            (None, Some(st)) if r.app_status != "ok" => format!("{} ({st})", r.app_status),
            (None, Some(st)) => st.to_string(),
            (None, None) => r.app_status.clone(),
        };
        self.set(|s| s.last_check_result = Some(result));
        if !pending.is_empty() {
            let _ = std::fs::remove_file(self.pending_path());
        }
        Ok(r.update)
    }

    /// Check, and if an update is offered, download and install it. Returns the installed version.
    pub fn check_and_apply(&self, installsource: &str) -> Result<Option<String>> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(EngineError::Busy);
        }
        let r = self.check_and_apply_inner(installsource);
        self.busy.store(false, Ordering::SeqCst);
        match &r {
            Ok(v) => {
                self.failures.store(0, Ordering::Relaxed);
                self.set(|s| {
                    if s.state != EngineState::UpdatedNeedReboot {
                        s.state = EngineState::Idle;
                    }
                    if v.is_some() {
                        s.updates_installed += 1;
                    }
                    // a fallback (44) stays visible until the next update installs
                    if v.is_some() || s.last_error_code != Some(event::ERR_ROLLBACK) {
                        s.last_error = None;
                        s.last_error_code = None;
                    }
                });
            }
            Err(EngineError::Busy) => {}
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let msg = e.to_string();
                let code = e.omaha_code();
                self.set(|s| {
                    s.state = EngineState::Error;
                    s.last_error = Some(msg);
                    s.last_error_code = Some(code);
                });
            }
        }
        r
    }

    fn already_installed(&self) -> Option<Installed> {
        let b = std::fs::read(self.cfg.state_dir.join("installed.json")).ok()?;
        serde_json::from_slice(&b).ok()
    }

    fn check_and_apply_inner(&self, installsource: &str) -> Result<Option<String>> {
        if let Some(i) = self.already_installed() {
            if i.boot_id == self.cfg.boot_id {
                self.set(|s| {
                    s.state = EngineState::UpdatedNeedReboot;
                    s.new_version = Some(i.version.clone());
                });
                return Ok(None);
            }
        }
        let Some(update) = self.check(installsource)? else {
            self.set(|s| s.state = EngineState::Idle);
            return Ok(None);
        };
        self.set(|s| {
            s.state = EngineState::Downloading;
            s.new_version = Some(update.version.clone());
            s.progress = 0.0;
            s.bytes_done = 0;
        });
        self.report(vec![Event::download_started()]);
        match self.download_and_install(&update) {
            Ok(()) => {
                self.report(vec![Event::download_finished(), Event::installed()]);
                self.set(|s| {
                    s.state = EngineState::UpdatedNeedReboot;
                    s.progress = 1.0;
                });
                Ok(Some(update.version))
            }
            Err(e) => {
                self.report(vec![Event::error(e.omaha_code())]);
                Err(e)
            }
        }
    }

    fn get(&self, url: &str, range_from: Option<u64>) -> Result<ureq::Response> {
        let mut req = self.agent().get(url);
        if let Some(off) = range_from {
            req = req.set("Range", &format!("bytes={off}-"));
        }
        req.call().map_err(|e| http_err(url, e))
    }

    fn download_and_install(&self, update: &Update) -> Result<()> {
        let url = update
            .payload_url()
            .ok_or(OmahaError::Invalid("no payload URL".into()))?;
        let keys = TrustedKeys::load_dir(&self.cfg.keys_dir)?;
        let active = self.active_slot()?;
        let target = active.other();
        let slots = self.slots();
        let mut reader = self.throttled(self.get(&url, None)?.into_reader());
        let head = PayloadHead::read(&mut reader, &keys)?;
        let running = semver::Version::parse(&self.cfg.running_version).ok();
        head.check_version(running.as_ref(), self.cfg.allow_downgrade)?;
        if head.manifest.version != update.version {
            return Err(EngineError::VersionMismatch {
                offered: update.version.clone(),
                payload: head.manifest.version.clone(),
            });
        }
        let store = ResumeStore::new(self.cfg.state_dir.join("resume"));
        let point = store.load(&head);
        let start = point.next_chunk;
        let resumed_from = (start > 0).then(|| {
            head.manifest
                .targets
                .iter()
                .flat_map(|t| {
                    let cs = head.manifest.chunk_size as u64;
                    (0..t.chunks.len() as u64).map(move |i| (t.size - i * cs).min(cs))
                })
                .take(start as usize)
                .sum::<u64>()
        });
        self.set(|s| s.resumed_from = resumed_from);
        // Make the target slot unbootable in both places before its contents change.
        slots.clear(target)?;
        if start > 0 {
            drop(reader);
            let off = head.chunk_offset(start);
            let resp = self.get(&url, Some(off))?;
            let partial = resp.status() == 206;
            reader = self.throttled(resp.into_reader());
            if !partial {
                std::io::copy(&mut (&mut reader).take(off), &mut std::io::sink()).map_err(|e| {
                    EngineError::Transport {
                        url: url.clone(),
                        reason: e.to_string(),
                    }
                })?;
            }
        }
        let staging = slots.staging_path();
        if let Some(dir) = staging.parent() {
            std::fs::create_dir_all(dir).map_err(|e| EngineError::Io {
                context: format!("creating {}", dir.display()),
                source: e,
            })?;
        }
        if start == 0 {
            let _ = std::fs::remove_file(&staging);
        }
        let kernel = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&staging)
            .map_err(|e| EngineError::Io {
                context: format!("opening {}", staging.display()),
                source: e,
            })?;
        let usr = slots.partition_window(target)?;
        let mut sinks = Sinks {
            usr: Box::new(usr),
            kernel: Box::new(kernel),
        };
        let total = head.manifest.total_size();
        self.set(|s| s.bytes_total = total);
        let mut progress = |p: crate::payload::apply::Progress| {
            self.set(|s| {
                s.bytes_done = p.bytes_done;
                s.bytes_total = p.bytes_total;
                s.progress = p.bytes_done as f64 / p.bytes_total.max(1) as f64;
                if p.chunk == p.total_chunks {
                    s.state = EngineState::Verifying;
                }
            });
        };
        self.cancel.store(false, Ordering::Relaxed);
        let r = apply_chunks(
            &head,
            &mut reader,
            start,
            &mut sinks,
            Some(&store),
            &mut progress,
            &self.cancel,
        );
        drop(sinks);
        if let Err(e) = r {
            if !e.is_transient() {
                let _ = std::fs::remove_file(&staging);
            }
            return Err(e.into());
        }
        self.set(|s| s.state = EngineState::Finalizing);
        slots.install(target, &head.manifest.version, &staging)?;
        let inst = Installed {
            version: head.manifest.version.clone(),
            slot: target,
            previous_version: self.cfg.running_version.clone(),
            boot_id: self.cfg.boot_id.clone(),
        };
        let b = serde_json::to_vec(&inst).map_err(|e| EngineError::Io {
            context: "encoding installed.json".into(),
            source: e.into(),
        })?;
        crate::payload::apply::write_durable(&self.cfg.state_dir.join("installed.json"), &b)
            .map_err(|e| EngineError::Io {
                context: "writing installed.json".into(),
                source: e,
            })?;
        Ok(())
    }

    fn throttled(
        &self,
        r: Box<dyn Read + Send + Sync + 'static>,
    ) -> Box<dyn Read + Send + Sync + 'static> {
        let r = std::io::BufReader::with_capacity(256 << 10, r);
        match self.cfg.max_download_rate {
            Some(rate) if rate > 0 => Box::new(Throttle {
                inner: r,
                rate,
                start: Instant::now(),
                done: 0,
            }),
            _ => Box::new(r),
        }
    }

    /// Switches to the other slot on demand (no network).
    pub fn rollback(&self) -> Result<Slot> {
        let active = self.active_slot()?;
        let to = self.slots().rollback(active)?;
        let _ = std::fs::remove_file(self.cfg.state_dir.join("installed.json"));
        self.set(|s| {
            s.state = EngineState::UpdatedNeedReboot;
            s.new_version = None;
        });
        Ok(to)
    }

    /// Run once at start, before serving: learn what the last update did and queue its report.
    /// Returns whether the running slot still needs the health gate (then call [`Engine::gate_and_bless`]).
    pub fn boot_detect(&self) -> bool {
        let active = match self.active_slot() {
            Ok(a) => a,
            Err(e) => {
                self.set(|s| {
                    s.last_error = Some(e.to_string());
                    s.health = "slots unreadable".into();
                });
                return false;
            }
        };
        self.set(|s| s.active_slot = Some(active));
        let installed_path = self.cfg.state_dir.join("installed.json");
        let bless_needed = self
            .slots()
            .flags(active)
            .map(|f| !f.successful)
            .unwrap_or(false);
        if let Some(i) = self.already_installed() {
            if i.boot_id == self.cfg.boot_id {
                // Restarted before the reboot: the update is installed and waits.
                self.set(|s| {
                    s.state = EngineState::UpdatedNeedReboot;
                    s.new_version = Some(i.version.clone());
                    s.health = "good".into();
                });
                return false;
            }
            if i.slot == active {
                return true;
            }
            // We booted the old slot again: the new one failed to come up.
            let _ = self.slots().detect_failed_update(active);
            self.queue_event(Event::error(event::ERR_ROLLBACK));
            let _ = std::fs::remove_file(&installed_path);
            let why = self.take_gate_failure().map_or_else(
                || "it did not come up (or rebooted before its health gate passed)".to_string(),
                |g| format!("its health gate failed: {}", g.reason),
            );
            self.set(|s| {
                s.last_error = Some(format!(
                    "update to {} on {} was abandoned and the machine fell back to {active}: {why}; reported as error 44",
                    i.version, i.slot
                ));
                s.last_error_code = Some(event::ERR_ROLLBACK);
            });
        } else if let Ok(Some(_failed)) = self.slots().detect_failed_update(active) {
            self.queue_event(Event::error(event::ERR_ROLLBACK));
        }
        if !bless_needed {
            self.set(|s| s.health = "good".into());
        }
        bless_needed
    }

    /// The health gate for the running slot; on success bless it and report 3/2 if an update completed.
    pub fn gate_and_bless(&self) {
        let Ok(active) = self.active_slot() else {
            return;
        };
        let installed_path = self.cfg.state_dir.join("installed.json");
        let complete_event = self
            .already_installed()
            .filter(|i| i.slot == active && i.boot_id != self.cfg.boot_id)
            .map(|i| Event::complete_after_reboot(&i.previous_version));
        self.set(|s| s.health = "checking".into());
        match self.health_gate() {
            Ok(()) => {
                if let Err(e) = self.slots().bless(active) {
                    self.set(|s| {
                        s.health = "bless failed".into();
                        s.last_error = Some(e.to_string());
                    });
                    return;
                }
                self.set(|s| s.health = "good".into());
                let _ = std::fs::remove_file(&installed_path);
                if let Some(e) = complete_event {
                    self.report(vec![e]);
                }
            }
            Err(reason) => {
                self.set(|s| {
                    s.health = "failed".into();
                    s.state = EngineState::Error;
                    s.last_error = Some(format!(
                        "health gate failed: {reason}; this slot stays unblessed, the next boot falls back to the previous one"
                    ));
                });
                self.fall_back(active, &reason);
            }
        }
    }

    /// Waits until every required unit is up and `--health-cmd` succeeds, continuously for the hold. Gives up
    /// at the timeout, or sooner when a required unit has stayed failed for good (see [`UnitsVerdict::Failed`])
    /// for as long as the hold: nothing would bring it back before the timeout.
    fn health_gate(&self) -> std::result::Result<(), String> {
        let h = &self.cfg.health;
        if h.cmd.is_none() && h.units.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut healthy_since: Option<Instant> = None;
        let mut failed_since: Option<Instant> = None;
        let step = (h.hold / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut last = String::new();
        loop {
            let mut verdict = UnitsVerdict::Up;
            if !h.units.is_empty() {
                verdict = units_verdict(&h.init_socket, &h.units);
            }
            if let (UnitsVerdict::Up, Some(cmd)) = (&verdict, &h.cmd) {
                let ok = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if !ok {
                    verdict = UnitsVerdict::Waiting(format!("`{cmd}` failed"));
                }
            }
            let failed = matches!(verdict, UnitsVerdict::Failed(_));
            if !failed {
                failed_since = None;
            }
            match verdict {
                UnitsVerdict::Up => {
                    let since = *healthy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= h.hold {
                        return Ok(());
                    }
                }
                UnitsVerdict::Failed(why) | UnitsVerdict::Waiting(why) => {
                    healthy_since = None;
                    if failed && failed_since.get_or_insert_with(Instant::now).elapsed() >= h.hold {
                        return Err(format!(
                            "{why} (failed for {:?} with no restart pending; gave up before the {:?} timeout)",
                            h.hold, h.timeout
                        ));
                    }
                    self.set(|s| s.health = format!("checking: {why}"));
                    last = why;
                }
            }
            if started.elapsed() > h.timeout {
                return Err(if last.is_empty() {
                    format!("not healthy for {:?} within {:?}", h.hold, h.timeout)
                } else {
                    format!("{last} (gave up after {:?})", h.timeout)
                });
            }
            std::thread::sleep(step);
        }
    }

    /// Delay before the next scheduled check: interval ± jitter, or exponential backoff after failures.
    pub fn next_delay(&self) -> Duration {
        let failures = self.failures.load(Ordering::Relaxed);
        let jitter_ms = self.cfg.jitter.as_millis() as u64;
        let r = random_u64();
        if failures > 0 {
            let base = Duration::from_secs(30).saturating_mul(1u32 << failures.min(16) as u32);
            let d = base.min(self.cfg.max_backoff);
            return d + Duration::from_millis(if jitter_ms > 0 {
                r % jitter_ms.max(1)
            } else {
                0
            });
        }
        let j = if jitter_ms > 0 {
            (r % (2 * jitter_ms)) as i64 - jitter_ms as i64
        } else {
            0
        };
        let base = self.cfg.interval.as_millis() as i64;
        Duration::from_millis((base + j).max(1000) as u64)
    }

    pub fn note_next_check(&self, d: Duration) {
        self.set(|s| s.next_check = Some(now() + d.as_secs()));
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    u64::from_le_bytes(b)
}

fn http_err(url: &str, e: ureq::Error) -> EngineError {
    match e {
        ureq::Error::Status(status, _) => EngineError::Http {
            url: url.to_string(),
            status,
        },
        ureq::Error::Transport(t) => EngineError::Transport {
            url: url.to_string(),
            reason: t.to_string(),
        },
    }
}

/// Limits read rate to `rate` bytes per second (for slow links and tests).
struct Throttle<R> {
    inner: R,
    rate: u64,
    start: Instant,
    done: u64,
}

impl<R: Read> Read for Throttle<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let max = buf.len().min((self.rate / 20).max(1) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        self.done += n as u64;
        let due = Duration::from_secs_f64(self.done as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str, active: &str, sub: &str, job: Option<&str>) -> serde_json::Value {
        serde_json::json!({ "name": name, "active": active, "sub": sub, "job": job })
    }

    #[test]
    fn the_first_required_unit_not_up_decides_and_only_a_final_failure_is_failed() {
        let need = ["clusterd.service".to_string(), "web.service".to_string()];
        let up = unit("clusterd.service", "active", "running", None);
        let judge = |web| judge_units(&[up.clone(), web], &need);
        assert_eq!(judge(unit("web.service", "active", "exited", None)), UnitsVerdict::Up);
        assert_eq!(
            judge(unit("web.service", "failed", "failed", None)),
            UnitsVerdict::Failed("required unit web.service is failed/failed".into())
        );
        // A restart pending, a start queued, or still starting: it may yet come up.
        for (active, sub, job) in [("activating", "auto-restart", None), ("failed", "failed", Some("start")), ("activating", "start", None)] {
            assert!(matches!(judge(unit("web.service", active, sub, job)), UnitsVerdict::Waiting(_)), "{active}/{sub} {job:?}");
        }
        assert_eq!(
            judge_units(&[up], &need),
            UnitsVerdict::Waiting("required unit web.service is unknown to init".into())
        );
    }
}
