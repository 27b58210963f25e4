//! Which device nodes a container may open: a cgroup2 device program (BPF_PROG_TYPE_CGROUP_DEVICE) on the unit's
//! cgroup, as runc, crun and youki install one.
//!
//! Without it, any device node a container reaches is as good as the host's own: a node shipped in an image
//! (`b 8:0`), or made with `AddCapability=MKNOD`, opens the host's disk. With it, the kernel asks the program on
//! every open and mknod in the cgroup. Allowed: creating any node (opening it is what is checked), the usual
//! character devices (`null zero full random urandom tty ptmx`, every `pts`), and the device files the unit binds
//! in as volumes (read and write, or read only for a `:ro` volume). Everything else gets EPERM.
//!
//! Owns: the allow-list ([`Rule`], [`allowed`]), the program's instructions ([`program`], pure and tested with a
//! small interpreter of the instructions it uses), and loading and attaching it ([`confine`], the only
//! unsafe code: two bpf(2) calls). Does not: create or remove cgroups (the supervisor does, see `crate::cgroup`);
//! the program goes away with the cgroup.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::Volume;

/// The kind of device, as the kernel's `bpf_cgroup_dev_ctx` numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Block = 1,
    Char = 2,
}

/// Access bits, as in `bpf_cgroup_dev_ctx.access_type >> 16`.
pub const MKNOD: u32 = 1;
pub const READ: u32 = 2;
pub const WRITE: u32 = 4;

/// One allowed device: kind, major, minor (`None`: any), and the accesses allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub kind: Kind,
    pub major: u32,
    pub minor: Option<u32>,
    pub access: u32,
}

const fn chr(major: u32, minor: Option<u32>) -> Rule {
    Rule { kind: Kind::Char, major, minor, access: READ | WRITE }
}

/// The devices every container gets: what init creates in its /dev (see `Runtime::fs_ops`) plus the ptys.
pub const USUAL: &[Rule] = &[
    chr(1, Some(3)),   // null
    chr(1, Some(5)),   // zero
    chr(1, Some(7)),   // full
    chr(1, Some(8)),   // random
    chr(1, Some(9)),   // urandom
    chr(5, Some(0)),   // tty
    chr(5, Some(2)),   // ptmx
    chr(136, None),    // pts/*
];

/// The usual devices plus every volume whose host side is a device file.
pub fn allowed(volumes: &[Volume]) -> Vec<Rule> {
    let mut rules = USUAL.to_vec();
    for v in volumes {
        let Ok(meta) = std::fs::metadata(&v.host) else { continue };
        let kind = match meta.file_type() {
            t if t.is_block_device() => Kind::Block,
            t if t.is_char_device() => Kind::Char,
            _ => continue,
        };
        let rdev = meta.rdev();
        let access = if v.read_only { READ } else { READ | WRITE };
        rules.push(Rule { kind, major: libc::major(rdev), minor: Some(libc::minor(rdev)), access });
    }
    rules
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    /// dst register in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

// The opcodes used (class | op | source).
const LDX_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const MOV64_X: u8 = 0xbf; // dst = src
const AND32_K: u8 = 0x54; // dst = (u32)dst & imm
const RSH32_K: u8 = 0x74; // dst = (u32)dst >> imm
const JEQ_K: u8 = 0x15; // if dst == imm goto +off
const JNE_K: u8 = 0x55; // if dst != imm goto +off
const JSET_K: u8 = 0x45; // if dst & imm goto +off
const JA: u8 = 0x05; // goto +off
const MOV64_K: u8 = 0xb7; // dst = imm
const EXIT: u8 = 0x95;

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: dst | (src << 4), off, imm }
}

// Registers: r1 = context on entry; r2 = access, r3 = kind, r4 = major, r5 = minor.
const ACCESS: u8 = 2;
const KIND: u8 = 3;
const MAJOR: u8 = 4;
const MINOR: u8 = 5;

/// The program for `rules`: returns 1 (allow) for a mknod of anything and for an access every bit of which a
/// rule for that device allows, 0 (EPERM) otherwise.
pub fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, ACCESS, 1, 0, 0), // access_type = (access << 16) | kind
        insn(MOV64_X, KIND, ACCESS, 0, 0),
        insn(AND32_K, KIND, 0, 0, 0xffff),
        insn(RSH32_K, ACCESS, 0, 0, 16),
        insn(LDX_W, MAJOR, 1, 4, 0),
        insn(LDX_W, MINOR, 1, 8, 0),
    ];
    // Jumps to "allow" are patched once its position is known.
    let mut to_allow = vec![p.len()];
    p.push(insn(JEQ_K, ACCESS, 0, 0, MKNOD as i32));
    for r in rules {
        // Each check skips to the next rule on a mismatch: the rest of this rule's instructions.
        let checks: Vec<(u8, u8, i32)> = [
            Some((JNE_K, KIND, r.kind as i32)),
            Some((JNE_K, MAJOR, r.major as i32)),
            r.minor.map(|m| (JNE_K, MINOR, m as i32)),
            Some((JSET_K, ACCESS, (!r.access & (MKNOD | READ | WRITE)) as i32)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let n = checks.len();
        for (i, (code, reg, imm)) in checks.into_iter().enumerate() {
            // Skip the remaining checks and the jump to allow.
            p.push(insn(code, reg, 0, (n - i) as i16, imm));
        }
        to_allow.push(p.len());
        p.push(insn(JA, 0, 0, 0, 0));
    }
    p.push(insn(MOV64_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    let allow = p.len();
    p.push(insn(MOV64_K, 0, 0, 0, 1));
    p.push(insn(EXIT, 0, 0, 0, 0));
    for at in to_allow {
        p[at].off = (allow - at - 1) as i16;
    }
    p
}

/// Why the program could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot open the unit's cgroup {path}: {source}")]
    Cgroup { path: String, source: std::io::Error },
    #[error("the kernel refused the device program: {errno}{}", if .log.is_empty() { String::new() } else { format!(" ({})", .log) })]
    Load { errno: std::io::Error, log: String },
    #[error("cannot attach the device program to {path}: {errno} (a cgroup above it may hold a device program that allows none below it)")]
    Attach { path: String, errno: std::io::Error },
}

// bpf(2) commands, program and attach types, flags (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD (the kernel zero-fills the rest).
#[repr(C)]
#[derive(Default)]
struct LoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
}

/// The leading fields of `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// bpf(2), wrapped once.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> Result<i32, std::io::Error> {
    // SAFETY: `attr` is a live, initialised #[repr(C)] prefix of `union bpf_attr` of exactly the size passed; any
    // pointers in it point to buffers the caller keeps alive across the call. The kernel reads (and, for the
    // log, writes) only within those.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    i32::try_from(rc).map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))
}

fn load(insns: &[Insn]) -> Result<OwnedFd, DeviceError> {
    let license = c"Apache-2.0";
    let mut attr = LoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: a successful BPF_PROG_LOAD returns a new file descriptor that nothing else owns.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(errno) => {
            // Again with the verifier's log, for the message.
            let mut log = vec![0u8; 4096];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = bpf(BPF_PROG_LOAD, &mut attr);
            let text = String::from_utf8_lossy(&log).trim_end_matches('\0').trim().lines().last().unwrap_or("").to_string();
            Err(DeviceError::Load { errno, log: text })
        }
    }
}

/// The last program loaded and its rules: most containers get the same (the usual devices), and loading costs
/// ≈ 0.45 ms (the verifier) where attaching a loaded one is cheap.
static LAST: std::sync::Mutex<Option<(Vec<Rule>, OwnedFd)>> = std::sync::Mutex::new(None);

/// Load the program for `rules` (or reuse the last one, if it was for the same rules) and attach it to the
/// cgroup directory `cgroup`, before any process of the container runs there. The cgroup holds the program from
/// then on; the kernel frees it with the last cgroup that holds it.
pub fn confine(cgroup: &Path, rules: &[Rule]) -> Result<(), DeviceError> {
    let dir = std::fs::File::open(cgroup).map_err(|source| DeviceError::Cgroup { path: cgroup.display().to_string(), source })?;
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let prog = match last.take() {
        Some((r, fd)) if r == rules => fd,
        _ => load(&program(rules))?,
    };
    let mut attr = AttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        // No flags: one program per cgroup, and attaching again (a restart in the same cgroup) replaces it; nothing
        // below this cgroup may override it. Programs that cgroups above hold with BPF_F_ALLOW_MULTI (systemd's)
        // still run too: a device must pass all of them.
        attach_flags: 0,
    };
    let attached = bpf(BPF_PROG_ATTACH, &mut attr).map_err(|errno| DeviceError::Attach { path: cgroup.display().to_string(), errno });
    *last = Some((rules.to_vec(), prog));
    attached.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `p` the way the kernel would for one device access (only the instructions `program` emits).
    fn run(p: &[Insn], kind: Kind, major: u32, minor: u32, access: u32) -> u64 {
        let ctx = [(access << 16) | kind as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        for _ in 0..10_000 {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            let imm = i.imm as u32 as u64;
            let mut next = pc + 1;
            let jump = |cond: bool| if cond { (pc as i64 + 1 + i.off as i64) as usize } else { pc + 1 };
            match i.code {
                LDX_W => {
                    assert_eq!(src, 1, "loads only from the context");
                    r[dst] = ctx[i.off as usize / 4] as u64;
                }
                MOV64_X => r[dst] = r[src],
                AND32_K => r[dst] = (r[dst] as u32 & i.imm as u32) as u64,
                RSH32_K => r[dst] = ((r[dst] as u32) >> i.imm) as u64,
                JEQ_K => next = jump(r[dst] == imm),
                JNE_K => next = jump(r[dst] != imm),
                JSET_K => next = jump(r[dst] & imm != 0),
                JA => next = jump(true),
                MOV64_K => r[dst] = imm,
                EXIT => return r[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
            pc = next;
        }
        panic!("no exit");
    }

    #[test]
    fn the_usual_devices_open_and_nothing_else_does() {
        let p = program(USUAL);
        for (major, minor) in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2), (136, 0), (136, 77)] {
            assert_eq!(run(&p, Kind::Char, major, minor, READ | WRITE), 1, "c {major}:{minor} rw");
            assert_eq!(run(&p, Kind::Char, major, minor, READ), 1, "c {major}:{minor} r");
            assert_eq!(run(&p, Kind::Block, major, minor, READ), 0, "b {major}:{minor} is another device");
        }
        for (major, minor) in [(1, 1), (1, 11), (4, 1), (5, 1), (10, 200), (136 + 256, 0)] {
            assert_eq!(run(&p, Kind::Char, major, minor, READ), 0, "c {major}:{minor}");
            assert_eq!(run(&p, Kind::Char, major, minor, WRITE), 0, "c {major}:{minor}");
        }
        assert_eq!(run(&p, Kind::Block, 8, 0, READ), 0, "the host's disk");
        assert_eq!(run(&p, Kind::Block, 8, 0, MKNOD), 1, "making a node is allowed, opening it is not");
        assert_eq!(run(&p, Kind::Block, 8, 0, MKNOD | READ), 0);
    }

    #[test]
    fn a_read_only_rule_allows_reading_only() {
        let rules = [Rule { kind: Kind::Block, major: 7, minor: Some(3), access: READ }, chr(10, None)];
        let p = program(&rules);
        assert_eq!(run(&p, Kind::Block, 7, 3, READ), 1);
        assert_eq!(run(&p, Kind::Block, 7, 3, WRITE), 0);
        assert_eq!(run(&p, Kind::Block, 7, 3, READ | WRITE), 0);
        assert_eq!(run(&p, Kind::Block, 7, 4, READ), 0, "another minor");
        assert_eq!(run(&p, Kind::Char, 7, 3, READ), 0, "another kind");
        assert_eq!(run(&p, Kind::Char, 10, 200, READ | WRITE), 1, "any minor");
        assert_eq!(run(&program(&[]), Kind::Char, 1, 3, READ), 0, "no rules: nothing opens");
    }

    #[test]
    fn device_volumes_are_allowed_with_their_mode() {
        let vol = |host: &str, ro: bool| Volume { host: host.into(), container: "/x".into(), read_only: ro };
        let rules = allowed(&[vol("/dev/kmsg", true), vol("/dev/null", false), vol("/tmp", false), vol("/no/such", false)]);
        assert_eq!(rules.len(), USUAL.len() + 2, "directories and missing paths add nothing: {rules:?}");
        assert_eq!(rules[USUAL.len()], Rule { kind: Kind::Char, major: 1, minor: Some(11), access: READ });
        assert_eq!(rules[USUAL.len() + 1], Rule { kind: Kind::Char, major: 1, minor: Some(3), access: READ | WRITE });
    }

    #[test]
    fn the_kernel_takes_the_program_where_bpf_is_allowed() {
        // Loading needs CAP_BPF (root); the containers tests attach it for real.
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        match load(&program(&allowed(&[]))) {
            Ok(_) => {}
            Err(DeviceError::Load { errno, .. }) if errno.raw_os_error() == Some(libc::ENOSYS) => {}
            Err(e) => panic!("{e}"),
        }
    }
}
