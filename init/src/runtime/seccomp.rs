//! The default seccomp filter: a small classic-BPF program that answers EPERM to syscalls a container has no
//! business making (loading kernels and modules, rebooting, swap, bpf, perf, the kernel keyring, clock setting,
//! accounting, mount-namespace changes, new user namespaces) and allows everything else.
//!
//! Owns: building that program. Does not: install it (see `child`, which calls prctl right before exec).
//! Syscalls of a foreign architecture (32-bit on x86_64) are refused wholesale: their numbers differ.

/// seccomp return values and BPF opcodes (linux/seccomp.h, linux/filter.h).
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// Syscalls answered with EPERM.
pub fn denied() -> Vec<(&'static str, i64)> {
    use libc::*;
    let mut v = vec![
        ("kexec_load", SYS_kexec_load),
        ("kexec_file_load", SYS_kexec_file_load),
        ("init_module", SYS_init_module),
        ("finit_module", SYS_finit_module),
        ("delete_module", SYS_delete_module),
        ("reboot", SYS_reboot),
        ("swapon", SYS_swapon),
        ("swapoff", SYS_swapoff),
        ("bpf", SYS_bpf),
        ("perf_event_open", SYS_perf_event_open),
        ("keyctl", SYS_keyctl),
        ("add_key", SYS_add_key),
        ("request_key", SYS_request_key),
        ("acct", SYS_acct),
        ("settimeofday", SYS_settimeofday),
        ("clock_settime", SYS_clock_settime),
        ("clock_adjtime", SYS_clock_adjtime),
        ("adjtimex", SYS_adjtimex),
        ("open_by_handle_at", SYS_open_by_handle_at),
        ("mount", SYS_mount),
        ("umount2", SYS_umount2),
        ("pivot_root", SYS_pivot_root),
        ("unshare", SYS_unshare),
        ("setns", SYS_setns),
        ("quotactl", SYS_quotactl),
        ("userfaultfd", SYS_userfaultfd),
        ("lookup_dcookie", SYS_lookup_dcookie),
        ("fsopen", SYS_fsopen),
        ("fsmount", SYS_fsmount),
        ("move_mount", SYS_move_mount),
        ("open_tree", SYS_open_tree),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([("iopl", SYS_iopl), ("ioperm", SYS_ioperm)]);
    v
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Syscalls that only make sense with CAP_SYS_ADMIN: allowed (with namespace-creating `clone`) when a unit grants
/// it with `AddCapability=SYS_ADMIN`, as Docker does.
const ADMIN: &[&str] = &["mount", "umount2", "pivot_root", "unshare", "setns", "fsopen", "fsmount", "move_mount", "open_tree"];

/// The filter program; `sys_admin` relaxes it for containers granted CAP_SYS_ADMIN.
pub fn program(sys_admin: bool) -> Vec<libc::sock_filter> {
    let deny = RET_ERRNO | libc::EPERM as u32;
    let list: Vec<(&str, i64)> = denied().into_iter().filter(|(n, _)| !(sys_admin && ADMIN.contains(n))).collect();
    let mut p = vec![
        stmt(LD_W_ABS, 4), // seccomp_data.arch
        jump(JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(RET_K, deny),
        stmt(LD_W_ABS, 0), // seccomp_data.nr
    ];
    // clone3 cannot be filtered by flags (they are behind a pointer): ENOSYS makes libc fall back to clone.
    p.push(jump(JEQ_K, libc::SYS_clone3 as u32, 0, 1));
    p.push(stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32));
    // clone with CLONE_NEWUSER (or any other namespace flag) is refused; the flags are args[0] (low word).
    if !sys_admin {
        p.push(jump(JEQ_K, libc::SYS_clone as u32, 0, 4));
        p.push(stmt(LD_W_ABS, 16));
        let ns_flags = (libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWCGROUP) as u32;
        p.push(jump(JSET_K, ns_flags, 0, 1));
        p.push(stmt(RET_K, deny));
        p.push(stmt(RET_K, RET_ALLOW));
    }
    let n = list.len();
    for (i, (_, nr)) in list.iter().enumerate() {
        // Jump to the deny at the end when equal; otherwise fall through to the next test.
        let to_deny = (n - i) as u8; // instructions between here and the deny (the allow comes first)
        p.push(jump(JEQ_K, *nr as u32, to_deny, 0));
    }
    p.push(stmt(RET_K, RET_ALLOW));
    p.push(stmt(RET_K, deny));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for the instructions we emit, to check the jumps without installing anything.
    fn run(p: &[libc::sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            match i.code {
                LD_W_ABS => acc = match i.k { 0 => nr, 4 => arch, 16 => arg0, _ => panic!("offset {}", i.k) },
                JEQ_K => {
                    pc += if acc == i.k { i.jt as usize } else { i.jf as usize };
                }
                JSET_K => {
                    pc += if acc & i.k != 0 { i.jt as usize } else { i.jf as usize };
                }
                RET_K => return i.k,
                c => panic!("opcode {c}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn denies_the_list_and_allows_the_rest() {
        let p = program(false);
        let eperm = RET_ERRNO | libc::EPERM as u32;
        for (name, nr) in denied() {
            assert_eq!(run(&p, AUDIT_ARCH, nr as u32, 0), eperm, "{name} must be denied");
        }
        for nr in [libc::SYS_read, libc::SYS_write, libc::SYS_execve, libc::SYS_getpid, libc::SYS_openat] {
            assert_eq!(run(&p, AUDIT_ARCH, nr as u32, 0), RET_ALLOW, "syscall {nr} must be allowed");
        }
        assert_eq!(run(&p, AUDIT_ARCH, libc::SYS_clone as u32, libc::SIGCHLD as u32), RET_ALLOW, "plain fork");
        assert_eq!(run(&p, AUDIT_ARCH, libc::SYS_clone as u32, libc::CLONE_NEWUSER as u32), eperm, "new user ns");
        assert_eq!(run(&p, AUDIT_ARCH, libc::SYS_clone3 as u32, 0), RET_ERRNO | libc::ENOSYS as u32);
        assert_eq!(run(&p, 0x4000_0003, libc::SYS_read as u32, 0), eperm, "foreign arch");
        assert!(p.len() < 255, "jump offsets fit in a u8");
        let admin = program(true);
        assert_eq!(run(&admin, AUDIT_ARCH, libc::SYS_mount as u32, 0), RET_ALLOW, "SYS_ADMIN containers may mount");
        assert_eq!(run(&admin, AUDIT_ARCH, libc::SYS_clone as u32, libc::CLONE_NEWNS as u32), RET_ALLOW);
        assert_eq!(run(&admin, AUDIT_ARCH, libc::SYS_kexec_load as u32, 0), eperm, "never kexec");
    }
}
