//! Jobs: which units a start or stop pulls in, and when each may begin.
//!
//! Owns: Requires/Wants/BindsTo/Conflicts expansion and After/Before ordering. A start job begins only when every
//! unit it is ordered after has settled; a stop job begins only when every unit ordered after it (that is also
//! stopping) is down — so shutdown runs in reverse dependency order. Does not: fork or kill (see `lifecycle`).

use std::time::Instant;

use super::state::{Active, JobKind, Outcome, Phase};
use super::{SupEvent, Supervisor};

/// Why a start request could not even be queued.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("unit {name} not found{}", suggestions(.close))]
    NotFound { name: String, close: Vec<String> },
    #[error("unit {name} cannot be loaded: {reason}")]
    Bad { name: String, reason: String },
}

fn suggestions(close: &[String]) -> String {
    if close.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", close.join(", "))
    }
}

impl Supervisor {
    /// Queue a start of `name` and everything it requires or wants. `manual` = asked by a user: like
    /// `systemctl reset-failed` + start, it clears the unit's start-limit history.
    pub fn start(&mut self, name: &str, manual: bool) -> Result<(), JobError> {
        self.check_loadable(name)?;
        if manual {
            if let Some(rt) = self.units.get_mut(name) {
                rt.start_history.clear();
            }
        }
        self.enqueue_start(name, 0);
        Ok(())
    }

    pub fn stop(&mut self, name: &str) -> Result<(), JobError> {
        if !self.units.contains_key(name) {
            return Err(JobError::NotFound { name: name.into(), close: self.close_matches(name) });
        }
        self.enqueue_stop(name);
        Ok(())
    }

    pub fn restart(&mut self, name: &str) -> Result<(), JobError> {
        self.check_loadable(name)?;
        let up = self.units.get(name).is_some_and(|rt| rt.is_up());
        if up {
            if let Some(rt) = self.units.get_mut(name) {
                rt.start_history.clear();
                rt.job = Some(JobKind::Restart);
            }
        } else {
            self.start(name, true)?;
        }
        Ok(())
    }

    /// Stop every unit (shutdown): reverse ordering is enforced by `step`.
    pub fn stop_all(&mut self) {
        let names: Vec<String> = self.units.keys().cloned().collect();
        for n in names {
            if let Some(rt) = self.units.get_mut(&n) {
                if rt.is_up() || rt.job.is_some() || rt.phase == Phase::AutoRestart {
                    self.finish_job_if(&n, JobKind::Start, false, "cancelled by shutdown");
                    if let Some(rt) = self.units.get_mut(&n) {
                        rt.job = Some(JobKind::Stop);
                    }
                }
            }
        }
    }

    fn check_loadable(&mut self, name: &str) -> Result<(), JobError> {
        if self.ensure_loaded(name) {
            return Ok(());
        }
        match self.units.get(name).map(|rt| rt.def.clone()) {
            Some(Err(reason)) if !reason.is_empty() && !reason.contains("not found") => {
                Err(JobError::Bad { name: name.into(), reason })
            }
            _ => Err(JobError::NotFound { name: name.into(), close: self.close_matches(name) }),
        }
    }

    fn enqueue_start(&mut self, name: &str, depth: usize) {
        if depth > 64 || !self.ensure_loaded(name) {
            return;
        }
        let Some(rt) = self.units.get_mut(name) else { return };
        if rt.job == Some(JobKind::Start) || (rt.active == Active::Active && rt.job.is_none()) {
            return;
        }
        rt.job = Some(JobKind::Start);
        let Some(unit) = self.def(name).cloned() else { return };
        for c in &unit.conflicts {
            if self.units.get(c).is_some_and(|rt| rt.is_up()) {
                self.enqueue_stop(c);
            }
        }
        let conflicting: Vec<String> = self
            .units
            .iter()
            .filter(|(_, rt)| rt.is_up() && rt.def.as_ref().is_ok_and(|u| u.conflicts.iter().any(|c| c == name)))
            .map(|(n, _)| n.clone())
            .collect();
        for c in conflicting {
            self.enqueue_stop(&c);
        }
        for dep in unit.requires.iter().chain(&unit.binds_to).chain(&unit.wants) {
            if !self.ensure_loaded(dep) && (unit.requires.contains(dep) || unit.binds_to.contains(dep)) {
                self.log(name, &format!("required unit {dep} not found"));
            }
            self.enqueue_start(dep, depth + 1);
        }
    }

    fn enqueue_stop(&mut self, name: &str) {
        let Some(rt) = self.units.get_mut(name) else { return };
        if !rt.is_up() && rt.phase != Phase::AutoRestart && rt.job != Some(JobKind::Start) {
            return;
        }
        if rt.job == Some(JobKind::Stop) {
            return;
        }
        self.finish_job_if(name, JobKind::Start, false, "cancelled by a stop request");
        if let Some(rt) = self.units.get_mut(name) {
            rt.job = Some(JobKind::Stop);
        }
        self.propagate_stop(name);
    }

    /// Units that Require or are BindsTo `name` stop with it.
    pub(crate) fn propagate_stop(&mut self, name: &str) {
        let dependents: Vec<String> = self
            .units
            .iter()
            .filter(|(_, rt)| {
                rt.def.as_ref().is_ok_and(|u| u.requires.iter().chain(&u.binds_to).any(|d| d == name))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for d in dependents {
            self.enqueue_stop(&d);
        }
    }

    /// Units bound to `name` (BindsTo=) stop when it goes away unexpectedly.
    pub(crate) fn propagate_binds_to(&mut self, name: &str) {
        let bound: Vec<String> = self
            .units
            .iter()
            .filter(|(_, rt)| rt.is_up() && rt.def.as_ref().is_ok_and(|u| u.binds_to.iter().any(|d| d == name)))
            .map(|(n, _)| n.clone())
            .collect();
        for b in bound {
            self.log(&b, &format!("stopping: bound unit {name} went away"));
            self.enqueue_stop(&b);
        }
    }

    /// Is `a` ordered after `b` (a.After contains b, or b.Before contains a)?
    fn ordered_after(&self, a: &str, b: &str) -> bool {
        self.def(a).is_some_and(|u| u.after.iter().any(|x| x == b))
            || self.def(b).is_some_and(|u| u.before.iter().any(|x| x == a))
    }

    /// Begin every job whose ordering constraints are met. Call after every event.
    pub fn step(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            let names: Vec<String> = self.units.keys().cloned().collect();
            for name in &names {
                progressed |= self.step_unit(name, &names, now);
            }
            if !progressed {
                break;
            }
        }
    }

    fn step_unit(&mut self, name: &str, names: &[String], now: Instant) -> bool {
        let Some(rt) = self.units.get(name) else { return false };
        match rt.job {
            Some(JobKind::Start) if matches!(rt.active, Active::Inactive | Active::Failed) && rt.phase != Phase::AutoRestart => {
                if let Some(blocker) = self.start_blocked_by(name, names) {
                    return self.fail_if_dependency_failed(name, &blocker);
                }
                self.begin_start(name, now);
                true
            }
            Some(JobKind::Start) if rt.phase == Phase::AutoRestart => {
                // A user start while waiting to restart: restart now.
                self.begin_start(name, now);
                true
            }
            Some(JobKind::Stop | JobKind::Restart) if rt.is_up() && !matches!(rt.phase, Phase::Stop | Phase::StopSigterm | Phase::StopSigkill) => {
                if names.iter().any(|o| o != name && self.stop_pending(o) && self.ordered_after(o, name)) {
                    return false;
                }
                self.begin_stop(name, now);
                true
            }
            Some(JobKind::Stop) if !rt.is_up() => {
                self.settle_stopped(name);
                true
            }
            Some(JobKind::Restart) if !rt.is_up() => {
                if let Some(rt) = self.units.get_mut(name) {
                    rt.job = Some(JobKind::Start);
                }
                true
            }
            _ => false,
        }
    }

    fn stop_pending(&self, name: &str) -> bool {
        self.units.get(name).is_some_and(|rt| matches!(rt.job, Some(JobKind::Stop | JobKind::Restart)) && rt.is_up())
    }

    /// The unit `name` must still wait for, if any.
    fn start_blocked_by(&self, name: &str, names: &[String]) -> Option<String> {
        let unit = self.def(name)?;
        let hard: Vec<&String> = unit.requires.iter().chain(&unit.binds_to).collect();
        for dep in hard {
            match self.units.get(dep) {
                None => return Some(dep.clone()),
                Some(rt) if rt.def.is_err() => return Some(dep.clone()),
                Some(rt) if rt.active == Active::Failed && rt.job.is_none() => return Some(dep.clone()),
                _ => {}
            }
        }
        names
            .iter()
            .filter(|o| o.as_str() != name && self.ordered_after(name, o))
            .find(|o| {
                self.units.get(o.as_str()).is_some_and(|rt| {
                    rt.job == Some(JobKind::Start) || matches!(rt.active, Active::Activating | Active::Deactivating)
                })
            })
            .cloned()
    }

    /// A hard dependency that failed (or is missing) fails the start job; an ordering wait does not.
    fn fail_if_dependency_failed(&mut self, name: &str, blocker: &str) -> bool {
        let hard = self.def(name).is_some_and(|u| u.requires.iter().chain(&u.binds_to).any(|d| d == blocker));
        let dep_bad = match self.units.get(blocker) {
            None => true,
            Some(rt) => rt.def.is_err() || (rt.active == Active::Failed && rt.job.is_none()),
        };
        if !(hard && dep_bad) {
            return false;
        }
        let msg = format!("dependency failed: {blocker}");
        self.log(name, &msg);
        if let Some(rt) = self.units.get_mut(name) {
            rt.set(Active::Failed, Phase::Failed);
            rt.outcome = Some(Outcome::Dependency);
            rt.error = Some(msg.clone());
        }
        self.finish_job_if(name, JobKind::Start, false, &msg);
        true
    }

    /// Complete `name`'s job if it is `kind`, and tell whoever waits for it.
    pub(crate) fn finish_job_if(&mut self, name: &str, kind: JobKind, ok: bool, message: &str) {
        let Some(rt) = self.units.get_mut(name) else { return };
        let matches = rt.job == Some(kind) || (kind == JobKind::Start && rt.job == Some(JobKind::Restart));
        if matches {
            rt.job = None;
            self.events.push(SupEvent::JobDone { unit: name.into(), job: kind, ok, message: message.into() });
        }
    }

    fn settle_stopped(&mut self, name: &str) {
        self.finish_job_if(name, JobKind::Stop, true, "stopped");
    }
}
