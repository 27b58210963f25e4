//! The syscall boundary: the few calls that no safe wrapper covers, each wrapped once with a `// SAFETY:` line.
//!
//! Owns: fork, signal-mask reset in a child, subreaper, reboot(2), the child-side exec sequence, and handing
//! start-up-only pages back to the kernel once boot is over (`release_startup_pages`).
//! Does not: decide what to run or when (see `spawn` and `supervisor`).

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;

/// What the child must do between fork and exec. Everything is prepared by the parent, so the child
/// only makes syscalls and never allocates.
pub struct ChildPlan<'a> {
    pub path: &'a CString,
    pub argv: &'a [*const libc::c_char],
    pub envp: &'a [*const libc::c_char],
    pub cwd: Option<&'a CString>,
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// An open `cgroup.procs` to write "0" into (joins the unit's cgroup before exec).
    pub cgroup_procs: Option<RawFd>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub groups: &'a [libc::gid_t],
    /// Write end of a close-on-exec pipe: on failure the child writes `[stage, errno(4 bytes)]` into it.
    pub report: RawFd,
}

/// Stages reported back on exec failure, so the message can say which step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChildStage {
    Cgroup = 1,
    Stdio = 2,
    Chdir = 3,
    Credentials = 4,
    Exec = 5,
}

impl ChildStage {
    pub fn from_byte(b: u8) -> Option<ChildStage> {
        Some(match b {
            1 => ChildStage::Cgroup,
            2 => ChildStage::Stdio,
            3 => ChildStage::Chdir,
            4 => ChildStage::Credentials,
            5 => ChildStage::Exec,
            _ => return None,
        })
    }

    pub fn describe(self) -> &'static str {
        match self {
            ChildStage::Cgroup => "joining the unit's cgroup",
            ChildStage::Stdio => "setting up stdin/stdout/stderr",
            ChildStage::Chdir => "changing to WorkingDirectory",
            ChildStage::Credentials => "switching to User/Group",
            ChildStage::Exec => "executing the program",
        }
    }
}

/// Fork and run `plan` in the child. Returns the child's pid in the parent; never returns in the child.
pub fn fork_exec(plan: &ChildPlan<'_>) -> Result<Pid, Errno> {
    // SAFETY: init is single-threaded when it forks (no other thread can hold a lock the child needs), and the
    // child only performs raw syscalls on memory prepared by the parent before it calls _exit or execve.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(child),
        nix::unistd::ForkResult::Child => child_exec(plan),
    }
}

fn child_exec(plan: &ChildPlan<'_>) -> ! {
    let fail = |stage: ChildStage, err: Errno| -> ! {
        let e = (err as i32).to_ne_bytes();
        let msg = [stage as u8, e[0], e[1], e[2], e[3]];
        // SAFETY: `report` is a pipe fd owned by this process; writing a fixed 5-byte buffer is sound.
        unsafe { libc::write(plan.report, msg.as_ptr().cast(), msg.len()) };
        // SAFETY: _exit is always safe to call; it does not run atexit handlers inherited from the parent.
        unsafe { libc::_exit(127) }
    };
    // Signals blocked for init's signalfd must not stay blocked in the service.
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in [Signal::SIGPIPE, Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: restoring the default disposition is always sound.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
    }
    let _ = nix::unistd::setsid();
    if let Some(fd) = plan.cgroup_procs {
        // SAFETY: `fd` is an open cgroup.procs file; writing "0" moves the calling process into that cgroup.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } < 0 {
            fail(ChildStage::Cgroup, Errno::last());
        }
    }
    for (from, to) in [(plan.stdin, 0), (plan.stdout, 1), (plan.stderr, 2)] {
        // SAFETY: dup2 onto the standard descriptors of this (child) process; both fds are valid.
        if unsafe { libc::dup2(from, to) } < 0 {
            fail(ChildStage::Stdio, Errno::last());
        }
    }
    if let Some(cwd) = plan.cwd {
        // SAFETY: `cwd` is a valid NUL-terminated string prepared by the parent.
        if unsafe { libc::chdir(cwd.as_ptr()) } < 0 {
            fail(ChildStage::Chdir, Errno::last());
        }
    }
    if let Some(gid) = plan.gid {
        // SAFETY: plain credential syscalls on this process with parent-prepared arguments.
        let rc = unsafe {
            if libc::setgroups(plan.groups.len(), plan.groups.as_ptr()) < 0 {
                -1
            } else {
                libc::setgid(gid)
            }
        };
        if rc < 0 {
            fail(ChildStage::Credentials, Errno::last());
        }
    }
    if let Some(uid) = plan.uid {
        // SAFETY: plain credential syscall on this process.
        if unsafe { libc::setuid(uid) } < 0 {
            fail(ChildStage::Credentials, Errno::last());
        }
    }
    // SAFETY: path, argv and envp are NUL-terminated and the arrays end with a null pointer (built by the parent).
    unsafe { libc::execve(plan.path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
    fail(ChildStage::Exec, Errno::last())
}

/// Become a child subreaper so that orphans of our units are re-parented to us (supervisor mode).
pub fn set_child_subreaper() -> Result<(), Errno> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    Errno::result(rc).map(|_| ())
}

/// What PID 1 asks the kernel to do at the very end of shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    Reboot,
    Poweroff,
    Halt,
}

/// reboot(2). Inside a PID namespace this ends the namespace (its init is killed) instead of the machine.
pub fn reboot(action: PowerAction) -> Errno {
    let mode = match action {
        PowerAction::Reboot => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
        PowerAction::Poweroff => nix::sys::reboot::RebootMode::RB_POWER_OFF,
        PowerAction::Halt => nix::sys::reboot::RebootMode::RB_HALT_SYSTEM,
    };
    match nix::sys::reboot::reboot(mode) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Make Ctrl-Alt-Del send SIGINT to PID 1 instead of rebooting at once.
pub fn disable_cad() {
    let _ = nix::sys::reboot::set_cad_enabled(false);
}

/// The peer's uid on a connected unix socket. (The peer's pid may read 0 when it lives outside our PID
/// namespace, so only the uid is used.)
pub fn peer_uid(fd: BorrowedFd<'_>) -> Option<u32> {
    nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials).ok().map(|c| c.uid())
}

/// Raw fd helper for logging.
pub fn raw<F: AsRawFd>(f: &F) -> RawFd {
    f.as_raw_fd()
}

/// Bring the loopback interface up (SIOCGIFFLAGS / SIOCSIFFLAGS), as every init does before any unit runs.
pub fn loopback_up() -> Result<(), Errno> {
    // SAFETY: socket(2) with constant arguments; the returned fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming "lo"; SIOCGIFFLAGS fills ifru_flags, SIOCSIFFLAGS reads it.
    let rc = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            -1
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req)
        }
    };
    let err = Errno::last();
    // SAFETY: closing the fd we opened above.
    unsafe { libc::close(fd) };
    if rc < 0 {
        Err(err)
    } else {
        Ok(())
    }
}

/// What `release_startup_pages` handed back.
#[derive(Debug, Default, Clone, Copy)]
pub struct Released {
    /// Bytes of init's own read-only mappings (code, read-only data) unmapped.
    pub image_bytes: usize,
}

/// Unmap the pages of init's own executable that start-up touched (code and read-only data that only boot,
/// unit parsing or cgroup setup needed) and return free heap pages to the kernel. The pages stay in the page
/// cache, so code that runs again is mapped back on its first use (a minor fault); what the steady state never
/// runs stops counting in init's resident set and can be reclaimed by the kernel.
///
/// Only the executable's file-backed, never-written mappings below its code are touched: the relocated
/// read-only data (RELRO), .data, .bss, heap and stack are left alone, so no state can be lost.
pub fn release_startup_pages() -> Released {
    let mut out = Released::default();
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return out };
    let here = release_startup_pages as fn() -> Released as usize;
    let vmas: Vec<(usize, usize, &str, (&str, &str))> = maps.lines().filter_map(parse_maps_line).collect();
    let Some(&(text_start, _, _, text_id)) = vmas.iter().find(|v| v.0 <= here && here < v.1) else { return out };
    for &(start, end, perms, id) in &vmas {
        if id != text_id || start > text_start || perms.contains('w') {
            continue;
        }
        // SAFETY: [start, end) is a whole mapping of our own executable file that is never written (no 'w'
        // permission; it is the code or lies below it, and the static-PIE is linked with `-z text`, so no
        // relocation writes there); MADV_DONTNEED on such a private file mapping only drops page-table entries,
        // and the next access maps the same file page again.
        if unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) } == 0 {
            out.image_bytes += end - start;
        }
    }
    // SAFETY: malloc_trim only returns free memory at the top of glibc's heap and in its arenas to the kernel.
    unsafe { libc::malloc_trim(0) };
    out
}

/// `start-end perms offset dev inode path` → (start, end, perms, (dev, inode)) for file-backed mappings.
fn parse_maps_line(line: &str) -> Option<(usize, usize, &str, (&str, &str))> {
    let mut it = line.split_ascii_whitespace();
    let range = it.next()?;
    let perms = it.next()?;
    let _offset = it.next()?;
    let dev = it.next()?;
    let inode = it.next()?;
    if inode == "0" {
        return None;
    }
    let (a, b) = range.split_once('-')?;
    let start = usize::from_str_radix(a, 16).ok()?;
    let end = usize::from_str_radix(b, 16).ok()?;
    Some((start, end, perms, (dev, inode)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse_file_backed_only() {
        let l = "7f00a000-7f00b000 r-xp 000b5000 fe:01 1234567    /usr/bin/init";
        assert_eq!(parse_maps_line(l), Some((0x7f00a000, 0x7f00b000, "r-xp", ("fe:01", "1234567"))));
        assert_eq!(parse_maps_line("55aa0000-55ab0000 rw-p 00000000 00:00 0    [heap]"), None);
    }

    #[test]
    fn releasing_start_up_pages_keeps_the_process_working() {
        let before: Vec<String> = (0..100).map(|i| format!("line {i}")).collect();
        let r = release_startup_pages();
        assert!(r.image_bytes > 0, "the test binary's own code mappings should have been released");
        // Code and read-only data come back on use; heap data is untouched.
        let after: Vec<String> = (0..100).map(|i| format!("line {i}")).collect();
        assert_eq!(before, after);
    }
}
