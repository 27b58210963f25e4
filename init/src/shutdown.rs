//! The end of shutdown, after every unit has stopped: kill what is left, unmount, sync, reboot(2).
//!
//! Owns: the bounded final sequence. Every step has a deadline, so shutdown completes even when processes
//! ignore SIGTERM or a filesystem is busy. Does not: stop units (the supervisor does that first, in reverse
//! dependency order).

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::boot;
use crate::sys::{self, PowerAction};

/// Upper bound on waiting for one unit to stop when its TimeoutStopSec is infinity.
pub const MAX_STOP_WAIT: Duration = Duration::from_secs(90);
/// How long remaining processes get between SIGTERM and SIGKILL.
pub const FINAL_TERM_GRACE: Duration = Duration::from_secs(5);

/// Processes other than ourselves that we can still see (in our PID namespace).
fn remaining_pids() -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| *p != me && !is_kernel_thread(*p))
                .collect()
        })
        .unwrap_or_default()
}

fn is_kernel_thread(pid: i32) -> bool {
    // Kernel threads have an empty cmdline and are children of kthreadd (pid 2).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse::<i32>().ok());
    pid == 2 || ppid == Some(2)
}

/// Our direct children (for supervisor mode, where kill(-1) would reach the whole host).
fn children() -> Vec<i32> {
    let me = std::process::id() as i32;
    remaining_pids()
        .into_iter()
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|x| x.parse::<i32>().ok())
                == Some(me)
        })
        .collect()
}

fn reap_all() {
    while let Ok(st) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if st == WaitStatus::StillAlive {
            break;
        }
    }
}

/// SIGTERM everything left, wait up to the grace period, SIGKILL the rest. `pid1` selects kill(-1);
/// otherwise only our own children (re-parented orphans included) are signalled.
pub fn kill_remaining(pid1: bool, log: &mut dyn FnMut(&str)) {
    let targets = |pid1: bool| if pid1 { remaining_pids() } else { children() };
    let left = targets(pid1);
    if left.is_empty() {
        return;
    }
    log(&format!("sending SIGTERM to {} remaining processes", left.len()));
    signal_all(pid1, &left, Signal::SIGTERM);
    let deadline = Instant::now() + FINAL_TERM_GRACE;
    while Instant::now() < deadline {
        reap_all();
        if targets(pid1).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = targets(pid1);
    log(&format!("sending SIGKILL to {} processes that ignored SIGTERM", left.len()));
    signal_all(pid1, &left, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && !targets(pid1).is_empty() {
        reap_all();
        std::thread::sleep(Duration::from_millis(20));
    }
    reap_all();
}

fn signal_all(pid1: bool, pids: &[i32], sig: Signal) {
    if pid1 {
        let _ = kill(Pid::from_raw(-1), sig);
    } else {
        for p in pids {
            let _ = kill(Pid::from_raw(*p), sig);
        }
    }
}

/// Unmount everything we can (deepest first), remount the rest read-only, and sync.
pub fn unmount_all(log: &mut dyn FnMut(&str)) {
    let keep = ["/", "/proc", "/sys", "/dev", "/run"];
    let mut mounts: Vec<String> = boot::mounted().into_iter().map(|(t, _)| t).collect();
    mounts.reverse();
    for t in &mounts {
        if keep.contains(&t.as_str()) || t.starts_with("/proc/") || t.starts_with("/sys/") || t.starts_with("/dev/") {
            continue;
        }
        if nix::mount::umount2(t.as_str(), nix::mount::MntFlags::empty()).is_err() {
            let ro = nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY;
            if nix::mount::mount(None::<&str>, t.as_str(), None::<&str>, ro, None::<&str>).is_err() {
                log(&format!("{t} is busy: neither unmounted nor remounted read-only"));
            }
        }
    }
    nix::unistd::sync();
    let ro = nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY;
    let _ = nix::mount::mount(None::<&str>, "/", None::<&str>, ro, None::<&str>);
    nix::unistd::sync();
}

/// The last act of PID 1. Never returns: if reboot(2) fails, we say why and keep reaping.
pub fn final_power(action: PowerAction) -> ! {
    eprintln!("keel: {}", match action {
        PowerAction::Reboot => "rebooting",
        PowerAction::Poweroff => "powering off",
        PowerAction::Halt => "halting",
    });
    let err = sys::reboot(action);
    eprintln!("keel: reboot(2) failed: {err}; halting here and reaping children");
    loop {
        reap_all();
        std::thread::sleep(Duration::from_secs(1));
    }
}
