//! The syscall boundary of the container runtime: `clone` into new namespaces and everything the container's
//! first process does before it execs the container's program.
//!
//! Owns: the child-side sequence — join the unit's cgroup, stdio, wait for the parent's go-ahead (network set
//! up), make the mount tree private, mount the rootfs and volumes, /proc, /sys (read-only), a minimal /dev,
//! hostname, pivot_root, read-only remounts, bounding/effective capabilities, credentials, no_new_privs,
//! seccomp, exec. Until pivot_root the host's `/` is still this process's root, so every path inside the
//! container's root filesystem is an [`InRoot`], resolved by the kernel inside that root. Everything is prepared by the parent (`plan`), so the child only makes syscalls on memory it
//! was handed and never allocates (init is single-threaded, but tests and `initctl` may not be).
//! Does not: decide anything; on the first failing step it writes `[stage, index, errno]` into the report pipe
//! and exits 127, and the parent turns that into a message.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

use nix::errno::Errno;

/// A path inside the container's root filesystem, resolved by the kernel as if that root were `/` (openat2's
/// RESOLVE_IN_ROOT) although the child still runs in the host's root: an image's symlinks (`data -> /etc`) and
/// `..` lead where they lead inside the container, never out to the host. `parent` and `name` split `rel` for
/// the calls that create the last component (mkdirat, mknodat, symlinkat), which never follow it.
pub struct InRoot {
    /// Relative to the root filesystem (`dev/pts`); `.` is the root itself.
    pub rel: CString,
    /// `rel` without its last component (`.` at the top).
    pub parent: CString,
    pub name: CString,
}

/// Where a mount goes.
pub enum Target {
    /// A path as this process sees it (the host's, or the container's once pivot_root is done).
    Path(CString),
    /// A path inside the container's root filesystem (before pivot_root).
    InRoot(CString),
}

/// One step of building the container's filesystem, run in order.
pub enum FsOp {
    /// mkdir, ignoring EEXIST.
    Mkdir { at: InRoot, mode: u32 },
    /// Create an empty file unless something exists there (a bind-mount target for a file volume).
    Touch { at: InRoot },
    Mount { src: Option<CString>, target: Target, fstype: Option<CString>, flags: u64, data: Option<CString> },
    /// A character device node.
    Mknod { at: InRoot, perm: u32, major: u32, minor: u32 },
    Symlink { target: CString, at: InRoot },
}

/// Which step failed (first byte of the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    Cgroup = 1,
    Stdio = 2,
    Sync = 3,
    Fs = 4,
    Hostname = 5,
    Pivot = 6,
    AfterPivot = 7,
    Chdir = 8,
    Capabilities = 9,
    Credentials = 10,
    NoNewPrivs = 11,
    Seccomp = 12,
    Exec = 13,
}

impl Stage {
    pub fn from_byte(b: u8) -> Option<Stage> {
        use Stage::*;
        [Cgroup, Stdio, Sync, Fs, Hostname, Pivot, AfterPivot, Chdir, Capabilities, Credentials, NoNewPrivs, Seccomp, Exec]
            .into_iter()
            .find(|s| *s as u8 == b)
    }
}

pub struct ChildPlan {
    pub clone_flags: libc::c_int,
    pub cgroup_procs: Option<RawFd>,
    /// cgroup v1 `cgroup.procs` files to join as well (hybrid hosts, see `v1`).
    pub extra_cgroups: Vec<RawFd>,
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// Read end of the go-ahead pipe: one byte means continue, EOF means the parent gave up.
    pub go: RawFd,
    /// Write end of the close-on-exec report pipe.
    pub report: RawFd,
    pub fs: Vec<FsOp>,
    pub rootfs: CString,
    pub hostname: Option<CString>,
    /// Run inside the new root: read-only remounts and masks.
    pub after_pivot: Vec<FsOp>,
    pub workdir: CString,
    /// Capabilities kept (bit n = capability n), and the highest capability number the kernel knows.
    pub keep_caps: u64,
    pub last_cap: u32,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub seccomp: Vec<libc::sock_filter>,
    /// Paths to try for the program, in order (PATH lookup done up front).
    pub candidates: Vec<CString>,
    pub argv: Vec<*const libc::c_char>,
    pub envp: Vec<*const libc::c_char>,
}

/// clone(2) into new namespaces, like fork: the child runs `plan` and never returns; the parent gets its pid.
pub fn clone_container(plan: &ChildPlan) -> Result<i32, Errno> {
    let flags = (plan.clone_flags | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: raw clone without CLONE_VM and with a null stack behaves like fork(2): the child gets a copy-on-write
    // copy of this address space and continues on its own copy of the stack. The caller is single-threaded or
    // the child only makes raw syscalls on memory prepared before the call (see `run_child`), so no lock held
    // by another thread is needed.
    let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match rc {
        -1 => Err(Errno::last()),
        0 => run_child(plan),
        pid => Ok(pid as i32),
    }
}

fn fail(plan: &ChildPlan, stage: Stage, index: usize, err: Errno) -> ! {
    let e = (err as i32).to_ne_bytes();
    let msg = [stage as u8, index.min(255) as u8, e[0], e[1], e[2], e[3]];
    // SAFETY: `report` is a pipe fd of this process; writing a 6-byte stack buffer is sound.
    unsafe { libc::write(plan.report, msg.as_ptr().cast(), msg.len()) };
    // SAFETY: _exit is always sound; it skips atexit handlers inherited from the parent.
    unsafe { libc::_exit(127) }
}

fn check(rc: libc::c_int) -> Result<(), Errno> {
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

fn opt_ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

fn errno(e: rustix::io::Errno) -> Errno {
    Errno::from_raw(e.raw_os_error())
}

/// Open `rel` inside the root filesystem `rootfs` (see [`InRoot`]).
fn open_in_root(rootfs: &CStr, rel: &CStr, flags: OFlags, mode: u32) -> Result<OwnedFd, Errno> {
    let root = rustix::fs::open(rootfs, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(errno)?;
    rustix::fs::openat2(&root, rel, flags | OFlags::CLOEXEC, Mode::from_raw_mode(mode), ResolveFlags::IN_ROOT).map_err(errno)
}

fn parent_in_root(rootfs: &CStr, at: &InRoot) -> Result<OwnedFd, Errno> {
    open_in_root(rootfs, &at.parent, OFlags::PATH | OFlags::DIRECTORY, 0)
}

/// `/proc/self/fd/<fd>` in `buf`: mount(2) takes a path, and this one names exactly the file `fd` resolved to.
fn fd_path<'a>(buf: &'a mut [u8; 32], fd: &OwnedFd) -> &'a CStr {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let (mut n, mut len) = (fd.as_raw_fd() as u32, 0);
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
    CStr::from_bytes_until_nul(&buf[..]).unwrap_or(c"/proc/self/fd")
}

fn ignore_exists(r: rustix::io::Result<()>) -> Result<(), Errno> {
    match r {
        Err(rustix::io::Errno::EXIST) => Ok(()),
        r => r.map_err(errno),
    }
}

fn run_op(op: &FsOp, rootfs: &CStr) -> Result<(), Errno> {
    match op {
        FsOp::Mkdir { at, mode } => {
            let dir = parent_in_root(rootfs, at)?;
            ignore_exists(rustix::fs::mkdirat(&dir, at.name.as_c_str(), Mode::from_raw_mode(*mode)))
        }
        FsOp::Touch { at } => open_in_root(rootfs, &at.rel, OFlags::CREATE | OFlags::RDONLY, 0o644).map(drop),
        FsOp::Mount { src, target, fstype, flags, data } => {
            let mut buf = [0u8; 32];
            let resolved;
            let target = match target {
                Target::Path(p) => p.as_c_str(),
                Target::InRoot(rel) => {
                    resolved = open_in_root(rootfs, rel, OFlags::PATH, 0)?;
                    fd_path(&mut buf, &resolved)
                }
            };
            // SAFETY: every pointer is a NUL-terminated string owned by the plan or this frame, or null where
            // mount(2) accepts null; this changes only the mount table of the child's own (new) mount namespace.
            check(unsafe { libc::mount(opt_ptr(src), target.as_ptr(), opt_ptr(fstype), *flags, opt_ptr(data).cast()) })
        }
        FsOp::Mknod { at, perm, major, minor } => {
            let dir = parent_in_root(rootfs, at)?;
            let dev = rustix::fs::makedev(*major, *minor);
            rustix::fs::mknodat(&dir, at.name.as_c_str(), FileType::CharacterDevice, Mode::from_raw_mode(*perm), dev).map_err(errno)
        }
        FsOp::Symlink { target, at } => {
            let dir = parent_in_root(rootfs, at)?;
            ignore_exists(rustix::fs::symlinkat(target.as_c_str(), &dir, at.name.as_c_str()))
        }
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

fn run_child(plan: &ChildPlan) -> ! {
    // Signals blocked for init's signalfd must not stay blocked in the container; dispositions go back to default.
    // SAFETY: sigprocmask/signal with a zeroed set and SIG_DFL touch only this process's signal state.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in [libc::SIGPIPE, libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGCHLD] {
            libc::signal(sig, libc::SIG_DFL);
        }
        libc::setsid();
    }
    if let Some(fd) = plan.cgroup_procs {
        // SAFETY: `fd` is an open cgroup.procs; writing "0" moves this process into the unit's cgroup.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } < 0 {
            fail(plan, Stage::Cgroup, 0, Errno::last());
        }
    }
    for (i, fd) in plan.extra_cgroups.iter().enumerate() {
        // SAFETY: as above, for a cgroup v1 cgroup.procs.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } < 0 {
            fail(plan, Stage::Cgroup, i + 1, Errno::last());
        }
    }
    for (from, to) in [(plan.stdin, 0), (plan.stdout, 1), (plan.stderr, 2)] {
        // SAFETY: dup2 onto this process's standard descriptors; both are valid fds.
        if unsafe { libc::dup2(from, to) } < 0 {
            fail(plan, Stage::Stdio, to as usize, Errno::last());
        }
    }
    let mut byte = [0u8; 1];
    // SAFETY: reading one byte into a stack buffer from a pipe fd of this process.
    let n = unsafe { libc::read(plan.go, byte.as_mut_ptr().cast(), 1) };
    if n != 1 {
        // The parent gave up (it reports why); leave quietly.
        // SAFETY: _exit is always sound.
        unsafe { libc::_exit(127) }
    }
    // SAFETY: umask only changes this process's file-creation mask (device nodes need 0666).
    unsafe { libc::umask(0) };
    for (i, op) in plan.fs.iter().enumerate() {
        if let Err(e) = run_op(op, &plan.rootfs) {
            fail(plan, Stage::Fs, i, e);
        }
    }
    if let Some(h) = &plan.hostname {
        // SAFETY: `h` is a NUL-terminated string of the given length; this is our own UTS namespace.
        if unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) } < 0 {
            fail(plan, Stage::Hostname, 0, Errno::last());
        }
    }
    let dot = c".";
    // SAFETY: chdir/pivot_root/umount2 on NUL-terminated paths; the old root is stacked under "." by pivot_root(".",
    // ".") and detached right away, leaving the rootfs as this mount namespace's only tree.
    let pivot = unsafe {
        check(libc::chdir(plan.rootfs.as_ptr()))
            .and_then(|_| check(libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int))
            .and_then(|_| check(libc::umount2(dot.as_ptr(), libc::MNT_DETACH)))
            .and_then(|_| check(libc::chdir(c"/".as_ptr())))
    };
    if let Err(e) = pivot {
        fail(plan, Stage::Pivot, 0, e);
    }
    for (i, op) in plan.after_pivot.iter().enumerate() {
        if let Err(e) = run_op(op, c"/") {
            fail(plan, Stage::AfterPivot, i, e);
        }
    }
    // SAFETY: umask and chdir on this process with a NUL-terminated path.
    unsafe { libc::umask(0o022) };
    // SAFETY: as above.
    if unsafe { libc::chdir(plan.workdir.as_ptr()) } < 0 {
        fail(plan, Stage::Chdir, 0, Errno::last());
    }
    for cap in 0..=plan.last_cap.min(63) {
        if plan.keep_caps & (1u64 << cap) == 0 {
            // SAFETY: PR_CAPBSET_DROP takes an integer capability number and touches no memory.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } < 0 {
                fail(plan, Stage::Capabilities, cap as usize, Errno::last());
            }
        }
    }
    // SAFETY: credential syscalls on this process with parent-prepared arguments (groups outlives the call).
    let creds = unsafe {
        check(libc::setgroups(plan.groups.len(), plan.groups.as_ptr()))
            .and_then(|_| check(libc::setresgid(plan.gid, plan.gid, plan.gid)))
            .and_then(|_| check(libc::setresuid(plan.uid, plan.uid, plan.uid)))
    };
    if let Err(e) = creds {
        fail(plan, Stage::Credentials, 0, e);
    }
    if plan.uid == 0 {
        let lo = plan.keep_caps as u32;
        let hi = (plan.keep_caps >> 32) as u32;
        let hdr = CapHeader { version: CAP_VERSION_3, pid: 0 };
        let data = [
            CapData { effective: lo, permitted: lo, inheritable: lo },
            CapData { effective: hi, permitted: hi, inheritable: hi },
        ];
        // SAFETY: capset(2) with a version-3 header and two data words, both on this stack frame.
        if unsafe { libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) } < 0 {
            fail(plan, Stage::Capabilities, 64, Errno::last());
        }
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        fail(plan, Stage::NoNewPrivs, 0, Errno::last());
    }
    if !plan.seccomp.is_empty() {
        let prog = libc::sock_fprog { len: plan.seccomp.len() as u16, filter: plan.seccomp.as_ptr() as *mut libc::sock_filter };
        // SAFETY: the filter program lives in the plan for the rest of this process; the kernel copies it.
        if unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog) } < 0 {
            fail(plan, Stage::Seccomp, 0, Errno::last());
        }
    }
    let mut last = Errno::ENOENT;
    for c in &plan.candidates {
        // SAFETY: path, argv and envp are NUL-terminated and the arrays end with a null pointer (built by the parent).
        unsafe { libc::execve(c.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
        let e = Errno::last();
        // Keep the most telling error: a file that exists but cannot run beats "not found" elsewhere in PATH.
        if last == Errno::ENOENT || e != Errno::ENOENT {
            last = e;
        }
    }
    fail(plan, Stage::Exec, 0, last)
}
