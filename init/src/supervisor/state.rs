//! Per-unit runtime state: what a unit is doing now, why it last stopped, and its start history.
//!
//! Owns: the data the supervisor keeps for each unit and the names shown to users (`active`, `sub`, `result`).
//! Does not: change anything by itself; every transition is made in `lifecycle`.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant, SystemTime};

use keel_model::Unit;
use serde::{Deserialize, Serialize};

use crate::journal::LineSplitter;

/// systemd's ActiveState, as users know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Active {
    Inactive,
    Activating,
    Active,
    Deactivating,
    Failed,
}

/// Where in its lifecycle a unit is (systemd's SubState, simplified).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Dead,
    StartPre,
    /// Main process started, not yet ready (notify) or not yet finished (oneshot).
    Start,
    StartPost,
    Running,
    /// Main process exited cleanly and RemainAfterExit=yes (or a target is reached).
    Exited,
    /// ExecStop= commands are running.
    Stop,
    StopSigterm,
    StopSigkill,
    /// Waiting RestartSec before starting again.
    AutoRestart,
    Failed,
}

/// Why a unit last ended or failed (systemd's Result).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Success,
    ExitCode,
    Signal,
    Timeout,
    OomKill,
    StartLimitHit,
    ExecFailed,
    Dependency,
    Condition,
}

/// The job a unit has been asked to complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Start,
    Stop,
    Restart,
}

/// How a process ended, as reported by wait(2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub pid: i32,
    /// Exit code if it exited, `None` if killed by a signal.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    /// Seconds since the epoch.
    pub at: u64,
}

impl ExitInfo {
    pub fn clean(&self) -> bool {
        self.code == Some(0)
    }

    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => {
                let name = nix::sys::signal::Signal::try_from(s).map(|s| s.as_str()).unwrap_or("unknown signal");
                format!("killed by {name}{}", if self.oom_killed { " (out of memory)" } else { "" })
            }
            _ => "ended".into(),
        }
    }
}

/// Which process of a unit a pid is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Main,
    /// An ExecStartPre/ExecStartPost/ExecStop command, or a oneshot's ExecStart (index into its list).
    Control,
}

/// One output stream of a unit: a pipe whose write end every process of the unit shares.
pub struct OutPipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    pub splitter: LineSplitter,
}

pub struct UnitRuntime {
    /// The loaded definition, or why it could not be loaded.
    pub def: Result<Unit, String>,
    pub active: Active,
    pub phase: Phase,
    pub job: Option<JobKind>,
    /// Set when the job came from a user (API), so a start clears the start-limit history like `reset-failed`.
    pub main_pid: Option<i32>,
    pub control_pid: Option<i32>,
    /// Index of the command running in the current phase's command list.
    pub cmd_index: usize,
    pub since: SystemTime,
    pub started_mono: Option<Instant>,
    pub deadline: Option<Instant>,
    pub restarts: u32,
    pub start_history: VecDeque<Instant>,
    pub last_exit: Option<ExitInfo>,
    pub outcome: Option<Outcome>,
    pub error: Option<String>,
    pub status_text: Option<String>,
    pub stdout: Option<OutPipe>,
    pub stderr: Option<OutPipe>,
    pub enabled: bool,
    /// The outcome to report once the current stop finishes: a start that timed out or failed is stopped
    /// first (SIGTERM, then SIGKILL) and then shown as failed.
    pub failing: Option<Outcome>,
}

impl UnitRuntime {
    pub fn new(def: Result<Unit, String>) -> UnitRuntime {
        UnitRuntime {
            def,
            active: Active::Inactive,
            phase: Phase::Dead,
            job: None,
            main_pid: None,
            control_pid: None,
            cmd_index: 0,
            since: SystemTime::now(),
            started_mono: None,
            deadline: None,
            restarts: 0,
            start_history: VecDeque::new(),
            last_exit: None,
            outcome: None,
            error: None,
            status_text: None,
            stdout: None,
            stderr: None,
            enabled: false,
            failing: None,
        }
    }

    pub fn set(&mut self, active: Active, phase: Phase) {
        if self.active != active {
            self.since = SystemTime::now();
        }
        self.active = active;
        self.phase = phase;
    }

    pub fn is_up(&self) -> bool {
        matches!(self.active, Active::Active | Active::Activating | Active::Deactivating)
    }

    /// True when the unit is settled: no process starting or stopping, nothing pending.
    pub fn is_settled(&self) -> bool {
        matches!(self.active, Active::Active | Active::Inactive | Active::Failed) && self.phase != Phase::AutoRestart
    }

    /// Record a start attempt; false if it exceeds StartLimitBurst within StartLimitIntervalSec.
    pub fn admit_start(&mut self, now: Instant, interval: Duration, burst: u32) -> bool {
        while self.start_history.front().is_some_and(|t| now.duration_since(*t) > interval) {
            self.start_history.pop_front();
        }
        if burst > 0 && interval > Duration::ZERO && self.start_history.len() >= burst as usize {
            return false;
        }
        self.start_history.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_limit_admits_burst_then_refuses_within_interval() {
        let mut rt = UnitRuntime::new(Err("x".into()));
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(rt.admit_start(t0 + Duration::from_millis(i * 100), Duration::from_secs(10), 5), "start {i}");
        }
        assert!(!rt.admit_start(t0 + Duration::from_secs(1), Duration::from_secs(10), 5));
        assert!(rt.admit_start(t0 + Duration::from_secs(11), Duration::from_secs(10), 5), "window slid");
    }

    #[test]
    fn exit_descriptions_name_the_signal() {
        let e = ExitInfo { pid: 1, code: None, signal: Some(9), oom_killed: true, at: 0 };
        assert_eq!(e.describe(), "killed by SIGKILL (out of memory)");
        let c = ExitInfo { pid: 1, code: Some(3), signal: None, oom_killed: false, at: 0 };
        assert_eq!(c.describe(), "exited with status 3");
        assert!(!c.clean());
    }
}
