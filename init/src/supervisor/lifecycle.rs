//! Process transitions of one unit: start (pre → main → post), readiness, exit, restart, timeouts, stop.
//!
//! Owns: every change of a unit's `active`/`phase`, spawning its commands, and signalling its processes.
//! Does not: order units against each other (see `jobs`) or reap (the loop passes exit statuses in).

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use keel_model::{Condition, ExecCommand, KillMode, RestartPolicy, ServiceSpec, ServiceType};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::state::{Active, ExitInfo, JobKind, OutPipe, Outcome, Phase, Role};
use super::{now_secs, Supervisor};
use crate::journal::{LineSplitter, Stream};
use crate::runtime;
use crate::spawn::{self, ProcessContext};

/// How long to wait for processes to vanish after SIGKILL before giving up on them.
const SIGKILL_GRACE: Duration = Duration::from_secs(5);

impl Supervisor {
    fn spec(&self, name: &str) -> Option<ServiceSpec> {
        self.def(name).and_then(|u| u.service.clone())
    }

    pub(crate) fn begin_start(&mut self, name: &str, now: Instant) {
        let Some(unit) = self.def(name).cloned() else { return };
        if let Some(failed) = unit.conditions.iter().find(|c| !condition_holds(c)) {
            let Condition::PathExists { path, negate } = failed;
            let msg = format!("skipped: ConditionPathExists={}{} not met", if *negate { "!" } else { "" }, path.display());
            self.log(name, &msg);
            if let Some(rt) = self.units.get_mut(name) {
                rt.set(Active::Inactive, Phase::Dead);
                rt.outcome = Some(Outcome::Condition);
            }
            self.finish_job_if(name, JobKind::Start, true, &msg);
            return;
        }
        let Some(spec) = unit.service else {
            // A target: reached as soon as its ordering allows.
            if let Some(rt) = self.units.get_mut(name) {
                rt.set(Active::Active, Phase::Exited);
                rt.started_mono = Some(now);
            }
            self.finish_job_if(name, JobKind::Start, true, "reached");
            return;
        };
        let admitted = self
            .units
            .get_mut(name)
            .is_some_and(|rt| rt.admit_start(now, spec.start_limit_interval, spec.start_limit_burst));
        if !admitted {
            let msg = format!(
                "start request repeated too quickly ({} starts within {:?}); refusing to start. \
                 Fix the unit, then `initctl start {name}`",
                spec.start_limit_burst, spec.start_limit_interval
            );
            self.fail_now(name, Outcome::StartLimitHit, &msg);
            return;
        }
        if let Err(e) = self.prepare_unit(name, &spec) {
            self.fail_now(name, Outcome::ExecFailed, &e);
            return;
        }
        if let Some(rt) = self.units.get_mut(name) {
            rt.set(Active::Activating, Phase::StartPre);
            rt.cmd_index = 0;
            rt.outcome = None;
            rt.error = None;
            rt.failing = None;
            rt.status_text = None;
            rt.deadline = spec.timeout_start.map(|t| now + t);
        }
        self.run_phase(name, now);
    }

    /// Create output pipes and the cgroup the unit's processes will join.
    fn prepare_unit(&mut self, name: &str, spec: &ServiceSpec) -> Result<(), String> {
        let Some(rt) = self.units.get_mut(name) else { return Err("unit vanished".into()) };
        if rt.stdout.is_none() {
            rt.stdout = Some(out_pipe().map_err(|e| format!("cannot create output pipe: {e}"))?);
            rt.stderr = Some(out_pipe().map_err(|e| format!("cannot create output pipe: {e}"))?);
        }
        if let Some(cg) = &self.cgroups {
            let warnings = cg.prepare_unit(name, spec).map_err(|e| e.to_string())?;
            // Container units get MemoryMax=/TasksMax= from cgroup v1 where cgroup2 lacks the controller
            // (runtime::v1): no warning for the limits that fallback enforces.
            let container = self.def(name).is_some_and(runtime::unit::is_container);
            let enforced = |w: &String| {
                container
                    && [("MemoryMax=", "memory"), ("TasksMax=", "pids")]
                        .iter()
                        .any(|(key, ctl)| w.starts_with(key) && runtime::v1::dir(ctl, name).is_some())
            };
            for w in warnings.iter().filter(|w| !enforced(w)) {
                self.log(name, w);
            }
        }
        Ok(())
    }

    /// Run the command at `cmd_index` of the current phase, or move to the next phase when none is left.
    fn run_phase(&mut self, name: &str, now: Instant) {
        let Some(spec) = self.spec(name) else { return };
        let Some(rt) = self.units.get(name) else { return };
        let (phase, idx) = (rt.phase, rt.cmd_index);
        let list = match phase {
            Phase::StartPre => &spec.exec_start_pre,
            Phase::Start if spec.kind == ServiceType::Oneshot => &spec.exec_start,
            Phase::StartPost => &spec.exec_start_post,
            Phase::Stop => &spec.exec_stop,
            _ => return,
        };
        if let Some(cmd) = list.get(idx) {
            let cmd = cmd.clone();
            self.spawn_or_fail(name, &cmd, Role::Control, now);
            return;
        }
        match phase {
            Phase::StartPre => self.start_main(name, &spec, now),
            Phase::Start => self.enter_start_post(name, now),
            Phase::StartPost => self.become_running(name, &spec, now),
            Phase::Stop => self.begin_kill(name, now),
            _ => {}
        }
    }

    fn start_main(&mut self, name: &str, spec: &ServiceSpec, now: Instant) {
        if let Some(rt) = self.units.get_mut(name) {
            rt.set(Active::Activating, Phase::Start);
            rt.cmd_index = 0;
        }
        if spec.kind == ServiceType::Oneshot {
            self.run_phase(name, now);
            return;
        }
        let container = self.def(name).is_some_and(runtime::unit::is_container);
        let cmd = match spec.exec_start.first().cloned() {
            Some(c) => c,
            // A container without ExecStart= runs its image's command.
            None if container => ExecCommand { argv: Vec::new(), ignore_failure: false },
            None => {
                self.fail_now(name, Outcome::ExecFailed, "service has no ExecStart=");
                return;
            }
        };
        if !self.spawn_or_fail(name, &cmd, Role::Main, now) {
            return;
        }
        if spec.kind != ServiceType::Notify {
            self.enter_start_post(name, now);
        }
    }

    fn enter_start_post(&mut self, name: &str, now: Instant) {
        if let Some(rt) = self.units.get_mut(name) {
            rt.phase = Phase::StartPost;
            rt.cmd_index = 0;
        }
        self.run_phase(name, now);
    }

    fn become_running(&mut self, name: &str, spec: &ServiceSpec, now: Instant) {
        let oneshot = spec.kind == ServiceType::Oneshot;
        let Some(rt) = self.units.get_mut(name) else { return };
        rt.deadline = None;
        rt.started_mono = Some(now);
        if oneshot && !spec.remain_after_exit {
            rt.set(Active::Inactive, Phase::Dead);
            rt.outcome = Some(Outcome::Success);
        } else if oneshot || (rt.main_pid.is_none() && spec.remain_after_exit) {
            rt.set(Active::Active, Phase::Exited);
        } else {
            rt.set(Active::Active, Phase::Running);
        }
        self.finish_job_if(name, JobKind::Start, true, "started");
    }

    /// Spawn `cmd` for `name`. On failure the unit fails (unless the command is `-`-prefixed).
    fn spawn_or_fail(&mut self, name: &str, cmd: &ExecCommand, role: Role, now: Instant) -> bool {
        match self.spawn_cmd(name, cmd) {
            Ok(pid) => {
                self.pids.insert(pid, (name.to_string(), role));
                if let Some(rt) = self.units.get_mut(name) {
                    match role {
                        Role::Main => rt.main_pid = Some(pid),
                        Role::Control => rt.control_pid = Some(pid),
                    }
                }
                true
            }
            Err(e) if cmd.ignore_failure && role == Role::Control => {
                self.log(name, &format!("{e} (ignored: command is prefixed with '-')"));
                if let Some(rt) = self.units.get_mut(name) {
                    rt.cmd_index += 1;
                }
                self.run_phase(name, now);
                false
            }
            Err(e) => {
                let stopping = self.units.get(name).is_some_and(|rt| rt.phase == Phase::Stop);
                if stopping {
                    self.log(name, &format!("ExecStop failed: {e}"));
                    self.begin_kill(name, now);
                } else {
                    self.fail_start(name, Outcome::ExecFailed, &e, now);
                }
                false
            }
        }
    }

    fn spawn_cmd(&mut self, name: &str, cmd: &ExecCommand) -> Result<i32, String> {
        let spec = self.spec(name).ok_or("unit has no [Service] section")?;
        let cgroup_procs = match &self.cgroups {
            Some(cg) => Some(cg.procs_file(name).map_err(|e| e.to_string())?),
            None => None,
        };
        let rt = self.units.get(name).ok_or("unit vanished")?;
        let (Some(out), Some(err)) = (&rt.stdout, &rt.stderr) else { return Err("output pipes missing".into()) };
        let mut extra = vec![("KEEL_UNIT".to_string(), name.to_string())];
        if spec.kind == ServiceType::Notify {
            extra.push(("NOTIFY_SOCKET".into(), self.cfg.notify_socket.display().to_string()));
        }
        if let Some(pid) = rt.main_pid {
            extra.push(("MAINPID".into(), pid.to_string()));
        }
        if rt.phase == Phase::Start {
            if let Some(def) = self.def(name).filter(|u| runtime::unit::is_container(u)) {
                let dir = self.cgroups.as_ref().map(|cg| cg.unit_path(name));
                let cgroup = cgroup_procs.as_ref().zip(dir.as_deref());
                return runtime::unit::start(def, name, &cmd.argv, &extra, &out.write, &err.write, cgroup);
            }
        }
        let ctx = ProcessContext {
            unit: name,
            spec: &spec,
            stdout: &out.write,
            stderr: &err.write,
            cgroup_procs: cgroup_procs.as_ref(),
            extra_env: &extra,
        };
        spawn::spawn(cmd, &ctx).map(Pid::as_raw).map_err(|e| e.to_string())
    }

    /// A start that cannot continue: processes already started are stopped first, then the unit is failed.
    fn fail_start(&mut self, name: &str, outcome: Outcome, msg: &str, now: Instant) {
        self.log(name, &format!("failed to start: {msg}"));
        let has_procs = self.units.get(name).is_some_and(|rt| rt.main_pid.is_some() || rt.control_pid.is_some())
            || self.cgroups.as_ref().is_some_and(|cg| !cg.is_empty(name));
        if let Some(rt) = self.units.get_mut(name) {
            rt.error = Some(msg.to_string());
            rt.failing = Some(outcome);
        }
        if has_procs {
            self.begin_kill(name, now);
        } else {
            self.after_down(name, now);
        }
    }

    /// Fail a unit that has no processes.
    fn fail_now(&mut self, name: &str, outcome: Outcome, msg: &str) {
        self.log(name, msg);
        if let Some(rt) = self.units.get_mut(name) {
            rt.set(Active::Failed, Phase::Failed);
            rt.outcome = Some(outcome);
            rt.error = Some(msg.to_string());
            rt.deadline = None;
        }
        self.finish_job_if(name, JobKind::Start, false, msg);
    }

    /// sd_notify from `pid`: READY=1, STATUS=, STOPPING=1, MAINPID=.
    pub fn on_notify(&mut self, pid: i32, payload: &str, now: Instant) {
        let Some(name) = self.unit_for_pid(pid) else {
            self.log("init", &format!("ignoring sd_notify from pid {pid}: it belongs to no unit"));
            return;
        };
        for line in payload.lines() {
            let (k, v) = line.split_once('=').unwrap_or((line, ""));
            match k {
                "READY" if v == "1" => self.on_ready(&name, now),
                "STATUS" => {
                    if let Some(rt) = self.units.get_mut(&name) {
                        rt.status_text = Some(v.to_string());
                    }
                }
                "STOPPING" if v == "1" => {
                    if let Some(rt) = self.units.get_mut(&name) {
                        if rt.active == Active::Active {
                            rt.set(Active::Deactivating, rt.phase);
                        }
                    }
                }
                "MAINPID" => self.on_mainpid(&name, v),
                _ => {}
            }
        }
    }

    fn unit_for_pid(&self, pid: i32) -> Option<String> {
        if let Some((name, _)) = self.pids.get(&pid) {
            return Some(name.clone());
        }
        self.cgroups.as_ref().and_then(|cg| cg.unit_of_pid(pid)).filter(|n| self.units.contains_key(n))
    }

    fn on_ready(&mut self, name: &str, now: Instant) {
        let waiting = self.units.get(name).is_some_and(|rt| rt.phase == Phase::Start);
        let notify = self.spec(name).is_some_and(|s| s.kind == ServiceType::Notify);
        if waiting && notify {
            self.enter_start_post(name, now);
        }
    }

    fn on_mainpid(&mut self, name: &str, v: &str) {
        let Ok(pid) = v.trim().parse::<i32>() else { return };
        let in_unit = self.cgroups.as_ref().is_none_or(|cg| cg.unit_of_pid(pid).as_deref() == Some(name));
        if !in_unit {
            self.log(name, &format!("ignoring MAINPID={pid}: not a process of this unit"));
            return;
        }
        if let Some(rt) = self.units.get_mut(name) {
            if let Some(old) = rt.main_pid.replace(pid) {
                self.pids.remove(&old);
            }
        }
        self.pids.insert(pid, (name.to_string(), Role::Main));
    }

    /// A child was reaped. Unknown pids (orphans re-parented to us) are only counted.
    pub fn on_exit(&mut self, status: WaitStatus, now: Instant) {
        let (pid, code, signal) = match status {
            WaitStatus::Exited(p, c) => (p.as_raw(), Some(c), None),
            WaitStatus::Signaled(p, s, _) => (p.as_raw(), None, Some(s as i32)),
            _ => return,
        };
        let Some((name, role)) = self.pids.remove(&pid) else { return };
        // A container's first process: its namespaces are gone; clean up before anything starts a new one.
        let container_oom = self.def(&name).is_some_and(runtime::unit::is_container) && runtime::unit::on_exit(&name, pid);
        let oom = (container_oom || self.cgroups.as_ref().is_some_and(|cg| cg.events(&name).oom_kills > 0)) && signal == Some(9);
        let exit = ExitInfo { pid, code, signal, oom_killed: oom, at: now_secs() };
        match role {
            Role::Control => self.on_control_exit(&name, exit, now),
            Role::Main => self.on_main_exit(&name, exit, now),
        }
        self.check_stopped(&name, now);
    }

    fn on_control_exit(&mut self, name: &str, exit: ExitInfo, now: Instant) {
        let Some(rt) = self.units.get_mut(name) else { return };
        if rt.control_pid != Some(exit.pid) {
            return;
        }
        rt.control_pid = None;
        let phase = rt.phase;
        let idx = rt.cmd_index;
        let Some(spec) = self.spec(name) else { return };
        let cmd = match phase {
            Phase::StartPre => spec.exec_start_pre.get(idx),
            Phase::Start => spec.exec_start.get(idx),
            Phase::StartPost => spec.exec_start_post.get(idx),
            Phase::Stop => spec.exec_stop.get(idx),
            _ => return,
        };
        let ignore = cmd.is_some_and(|c| c.ignore_failure) || phase == Phase::Stop;
        if !exit.clean() && !ignore {
            let what = cmd.map(|c| c.argv.join(" ")).unwrap_or_default();
            let outcome = if exit.signal.is_some() { Outcome::Signal } else { Outcome::ExitCode };
            if let Some(rt) = self.units.get_mut(name) {
                rt.last_exit = Some(exit);
            }
            self.fail_start(name, outcome, &format!("`{what}` {}", exit.describe()), now);
            return;
        }
        if phase == Phase::Start {
            if let Some(rt) = self.units.get_mut(name) {
                rt.last_exit = Some(exit);
            }
        }
        if let Some(rt) = self.units.get_mut(name) {
            rt.cmd_index += 1;
        }
        self.run_phase(name, now);
    }

    fn on_main_exit(&mut self, name: &str, exit: ExitInfo, now: Instant) {
        let Some(spec) = self.spec(name) else { return };
        let Some(rt) = self.units.get_mut(name) else { return };
        if rt.main_pid != Some(exit.pid) {
            return;
        }
        rt.main_pid = None;
        rt.last_exit = Some(exit);
        let phase = rt.phase;
        if matches!(phase, Phase::Stop | Phase::StopSigterm | Phase::StopSigkill) {
            return;
        }
        self.log(name, &format!("main process {}", exit.describe()));
        if matches!(phase, Phase::Start | Phase::StartPre) {
            let outcome = outcome_of(&exit);
            self.fail_start(name, outcome, &format!("main process {} before it was ready", exit.describe()), now);
            return;
        }
        if exit.clean() && spec.remain_after_exit {
            if let Some(rt) = self.units.get_mut(name) {
                rt.set(Active::Active, Phase::Exited);
            }
            return;
        }
        if let Some(rt) = self.units.get_mut(name) {
            rt.failing = Some(if exit.clean() { Outcome::Success } else { outcome_of(&exit) });
        }
        // Leftover processes of the unit go with its main process (KillMode=control-group).
        self.begin_kill(name, now);
    }

    /// Deadlines: restart delays, start timeouts, stop escalation.
    pub fn on_timers(&mut self, now: Instant) {
        let due: Vec<String> =
            self.units.iter().filter(|(_, rt)| rt.deadline.is_some_and(|d| d <= now)).map(|(n, _)| n.clone()).collect();
        for name in due {
            let Some(rt) = self.units.get_mut(&name) else { continue };
            rt.deadline = None;
            match rt.phase {
                Phase::AutoRestart => {
                    rt.restarts += 1;
                    rt.set(Active::Inactive, Phase::Dead);
                    if rt.job.is_none() {
                        rt.job = Some(JobKind::Start);
                    }
                }
                Phase::StartPre | Phase::Start | Phase::StartPost => {
                    let t = self.spec(&name).and_then(|s| s.timeout_start).unwrap_or_default();
                    self.fail_start(&name, Outcome::Timeout, &format!("did not finish starting within TimeoutStartSec={t:?}"), now);
                }
                Phase::Stop => {
                    self.log(&name, "ExecStop did not finish within TimeoutStopSec, killing");
                    self.begin_kill(&name, now);
                }
                Phase::StopSigterm => self.escalate_kill(&name, now),
                Phase::StopSigkill => {
                    self.log(&name, "processes remain after SIGKILL; giving up on them");
                    self.after_down(&name, now);
                }
                _ => {}
            }
        }
    }

    pub(crate) fn begin_stop(&mut self, name: &str, now: Instant) {
        let Some(rt) = self.units.get_mut(name) else { return };
        if rt.phase == Phase::AutoRestart {
            rt.deadline = None;
            rt.set(Active::Inactive, Phase::Dead);
            self.finish_job_if(name, JobKind::Stop, true, "stopped");
            return;
        }
        let Some(spec) = self.spec(name) else {
            // A target: nothing to kill.
            if let Some(rt) = self.units.get_mut(name) {
                rt.set(Active::Inactive, Phase::Dead);
            }
            self.finish_job_if(name, JobKind::Stop, true, "stopped");
            return;
        };
        if let Some(rt) = self.units.get_mut(name) {
            rt.set(Active::Deactivating, Phase::Stop);
            rt.cmd_index = 0;
            rt.deadline = spec.timeout_stop.map(|t| now + t);
        }
        self.run_phase(name, now);
    }

    /// SIGTERM according to KillMode, then wait (TimeoutStopSec) for the unit to empty.
    fn begin_kill(&mut self, name: &str, now: Instant) {
        let Some(spec) = self.spec(name) else { return };
        let Some(rt) = self.units.get_mut(name) else { return };
        if rt.active != Active::Deactivating {
            rt.set(Active::Deactivating, Phase::StopSigterm);
        }
        rt.phase = Phase::StopSigterm;
        rt.deadline = Some(now + spec.timeout_stop.unwrap_or(crate::shutdown::MAX_STOP_WAIT));
        let main = rt.main_pid;
        let control = rt.control_pid;
        self.send(name, spec.kill_mode, main, control, Signal::SIGTERM);
        self.check_stopped(name, now);
    }

    fn escalate_kill(&mut self, name: &str, now: Instant) {
        let Some(spec) = self.spec(name) else { return };
        self.log(name, "did not stop within TimeoutStopSec, sending SIGKILL");
        let Some(rt) = self.units.get_mut(name) else { return };
        rt.phase = Phase::StopSigkill;
        rt.deadline = Some(now + SIGKILL_GRACE);
        rt.failing.get_or_insert(Outcome::Timeout);
        let (main, control) = (rt.main_pid, rt.control_pid);
        let mode = if spec.kill_mode == KillMode::None { KillMode::None } else { KillMode::ControlGroup };
        self.send(name, mode, main, control, Signal::SIGKILL);
        self.check_stopped(name, now);
    }

    fn send(&self, name: &str, mode: KillMode, main: Option<i32>, control: Option<i32>, sig: Signal) {
        let own = [main, control].into_iter().flatten();
        match (mode, &self.cgroups) {
            (KillMode::None, _) => {}
            (KillMode::ControlGroup, Some(cg)) => {
                cg.signal_all(name, sig);
                if sig != Signal::SIGKILL {
                    cg.signal_all(name, Signal::SIGCONT);
                }
            }
            (KillMode::ControlGroup, None) => {
                // No cgroup: the process group each command leads (setsid) is the best approximation.
                for pid in own {
                    let _ = nix::sys::signal::kill(Pid::from_raw(-pid), sig);
                }
            }
            (KillMode::Mixed | KillMode::Process, _) => {
                for pid in own {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
                }
            }
        }
    }

    /// During a stop: done once the main and control processes are reaped and the cgroup is empty.
    pub fn check_stopped(&mut self, name: &str, now: Instant) {
        let Some(rt) = self.units.get(name) else { return };
        if !matches!(rt.phase, Phase::StopSigterm | Phase::StopSigkill) {
            return;
        }
        if rt.main_pid.is_some() || rt.control_pid.is_some() {
            return;
        }
        let mode = self.spec(name).map(|s| s.kill_mode).unwrap_or(KillMode::ControlGroup);
        let empty = mode != KillMode::ControlGroup || self.cgroups.as_ref().is_none_or(|cg| cg.is_empty(name));
        if empty {
            self.after_down(name, now);
        }
    }

    /// Called on a short tick while some unit waits for its cgroup to empty.
    pub fn poll_stopping(&mut self, now: Instant) {
        let names: Vec<String> = self
            .units
            .iter()
            .filter(|(_, rt)| matches!(rt.phase, Phase::StopSigterm | Phase::StopSigkill))
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            self.check_stopped(&n, now);
        }
    }

    /// The unit has no processes left: decide between inactive, failed and a scheduled restart.
    fn after_down(&mut self, name: &str, now: Instant) {
        if self.def(name).is_some_and(runtime::unit::is_container) {
            runtime::unit::cleanup(name);
        }
        if let Some(cg) = &self.cgroups {
            cg.remove(name);
        }
        let spec = self.spec(name);
        let Some(rt) = self.units.get_mut(name) else { return };
        rt.deadline = None;
        rt.main_pid = None;
        rt.control_pid = None;
        let by_request = matches!(rt.job, Some(JobKind::Stop | JobKind::Restart));
        let ended = rt.failing.take();
        let policy = spec.as_ref().map_or(RestartPolicy::No, |s| s.restart);
        if !by_request && should_restart(policy, ended) {
            let delay = spec.map(|s| s.restart_sec).unwrap_or_default();
            rt.set(Active::Activating, Phase::AutoRestart);
            rt.outcome = ended;
            rt.deadline = Some(now + delay);
            if ended != Some(Outcome::Success) {
                let msg = rt.error.clone().unwrap_or_else(|| "main process failed".into());
                self.finish_job_if(name, JobKind::Start, false, &msg);
            }
            self.log(name, &format!("scheduling restart in {delay:?}"));
            return;
        }
        match ended {
            Some(outcome) if outcome != Outcome::Success && !by_request => {
                rt.set(Active::Failed, Phase::Failed);
                rt.outcome = Some(outcome);
                let msg = rt.error.clone().unwrap_or_else(|| format!("failed ({outcome:?})"));
                self.finish_job_if(name, JobKind::Start, false, &msg);
                self.propagate_binds_to(name);
            }
            _ => {
                if ended == Some(Outcome::Success) {
                    rt.outcome = Some(Outcome::Success);
                }
                rt.set(Active::Inactive, Phase::Dead);
                self.finish_job_if(name, JobKind::Stop, true, "stopped");
                if !by_request {
                    self.propagate_binds_to(name);
                }
            }
        }
    }

    /// Output fds to poll: (fd, unit, stream).
    pub fn output_fds(&self) -> Vec<(i32, String, Stream)> {
        let mut v = Vec::new();
        for (name, rt) in &self.units {
            if let Some(p) = &rt.stdout {
                v.push((p.read.as_raw_fd(), name.clone(), Stream::Stdout));
            }
            if let Some(p) = &rt.stderr {
                v.push((p.read.as_raw_fd(), name.clone(), Stream::Stderr));
            }
        }
        v
    }

    /// Read everything available on a unit's pipe into the journal. Never blocks.
    pub fn drain_output(&mut self, name: &str, stream: Stream) {
        let mut lines = Vec::new();
        let Some(rt) = self.units.get_mut(name) else { return };
        let pipe = match stream {
            Stream::Stdout => rt.stdout.as_mut(),
            _ => rt.stderr.as_mut(),
        };
        let Some(pipe) = pipe else { return };
        let mut buf = [0u8; 8192];
        for _ in 0..16 {
            match rustix::io::read(pipe.read.as_fd(), &mut buf) {
                Ok(0) => break,
                Ok(n) => pipe.splitter.push(&buf[..n], &mut lines),
                Err(_) => break,
            }
        }
        for line in lines {
            if self.cfg.forward_to_console {
                eprintln!("{name}: {line}");
            }
            self.journal_append(name, stream, &line);
        }
    }
}

/// Where transient units (`initctl run`) say they come from; no file is written there.
pub const TRANSIENT_DIR: &str = "/run/keel/transient";

impl Supervisor {
    /// Add a transient container unit for `initctl run`; returns its name (`run-N.service`).
    pub fn add_run_unit(&mut self, spec: &runtime::unit::RunSpec) -> Result<String, String> {
        let name = (1..).map(|n| format!("run-{n}.service")).find(|n| !self.units.contains_key(n)).unwrap_or_default();
        let text = runtime::unit::run_unit_text(spec)?;
        let uname = keel_model::UnitName::parse(&name)?;
        let path = std::path::PathBuf::from(TRANSIENT_DIR).join(&name);
        let ini = keel_model::IniFile::parse(&path, &text).map_err(|d| d.to_string())?;
        let (unit, diags) = keel_model::Unit::from_ini(uname, &[ini], &self.cfg.hostname);
        let unit = unit.ok_or_else(|| diags.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))?;
        let entries = unit.extra_sections.get(runtime::unit::SECTION).cloned().unwrap_or_default();
        runtime::ContainerSpec::parse(&entries).map_err(|e| e.to_string())?;
        self.units.insert(name.clone(), super::state::UnitRuntime::new(Ok(unit)));
        Ok(name)
    }

    /// Drop a transient unit that has finished (`initctl run --rm`).
    pub fn forget(&mut self, name: &str) -> Result<(), String> {
        let rt = self.units.get(name).ok_or_else(|| format!("unit {name} not found"))?;
        let transient = rt.def.as_ref().is_ok_and(|u| u.sources.iter().all(|s| s.starts_with(TRANSIENT_DIR)));
        if !transient {
            return Err(format!("{name} is not a transient unit"));
        }
        if rt.is_up() || rt.job.is_some() {
            return Err(format!("{name} is still running"));
        }
        self.units.remove(name);
        Ok(())
    }
}

fn outcome_of(exit: &ExitInfo) -> Outcome {
    if exit.oom_killed {
        Outcome::OomKill
    } else if exit.signal.is_some() {
        Outcome::Signal
    } else {
        Outcome::ExitCode
    }
}

fn condition_holds(c: &Condition) -> bool {
    match c {
        Condition::PathExists { path, negate } => path.exists() != *negate,
    }
}

fn out_pipe() -> std::io::Result<OutPipe> {
    use rustix::pipe::{pipe_with, PipeFlags};
    let (read, write) = pipe_with(PipeFlags::CLOEXEC).map_err(std::io::Error::from)?;
    rustix::fs::fcntl_setfl(&read, rustix::fs::OFlags::NONBLOCK).map_err(std::io::Error::from)?;
    Ok(OutPipe { read, write, splitter: LineSplitter::new() })
}

/// Restart= semantics: `always` after any end, `on-failure` after an unclean one; never after the start limit,
/// a failed dependency or an unmet condition.
fn should_restart(policy: RestartPolicy, ended: Option<Outcome>) -> bool {
    let Some(o) = ended else { return false };
    if matches!(o, Outcome::StartLimitHit | Outcome::Dependency | Outcome::Condition) {
        return false;
    }
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => o != Outcome::Success,
        RestartPolicy::No => false,
    }
}
