//! Private container networks: the `keel0` bridge (10.88.0.1/16) on the host side, one veth pair per container
//! (`kv<hash>` on the bridge, `eth0` inside), an address from 10.88.0.0/16 and a default route via the bridge.
//!
//! Owns: address allocation (deterministic: a hash of the unit name, probing forward on collision; each lease
//! is a file `<containers>/net/<address>` naming its unit, created with O_EXCL so two starts never share one),
//! and the `ip` commands. iproute2's `ip` is used rather than hand-written rtnetlink: it is on every Keel image
//! already (busybox's or Debian's), its batch mode does the host side in one exec and the container side in a
//! second one (`nsenter --net`), and its error messages name the failing step. The veth and the container's
//! namespace vanish with the container's last process, so cleanup is only the address lease.
//! Does not: NAT to other networks (containers reach the host, e.g. clusterd at 10.88.0.1:2379, only).

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ContainerError;

pub const BRIDGE: &str = "keel0";
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
pub const PREFIX: u8 = 16;

/// FNV-1a, stable across builds (std's hasher is not).
pub fn fnv(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The host-side interface name for `unit` (at most 15 bytes).
pub fn veth_name(unit: &str) -> String {
    format!("kv{:08x}", fnv(unit))
}

/// Candidate `n` (0, 1, …) for `unit`: 10.88.0.2 … 10.88.255.254.
pub fn candidate(unit: &str, n: u32) -> Ipv4Addr {
    let space = 65_533u32; // .0.2 through .255.254
    let host = 2 + (fnv(unit).wrapping_add(n) % space);
    Ipv4Addr::new(10, 88, (host >> 8) as u8, (host & 0xff) as u8)
}

fn leases(root: &Path) -> PathBuf {
    root.join("net")
}

/// Reserve an address for `unit` (the one it already holds, if any).
pub fn allocate(root: &Path, unit: &str) -> Result<Ipv4Addr, ContainerError> {
    let dir = leases(root);
    fs::create_dir_all(&dir).map_err(|e| ContainerError::Io { path: dir.clone(), source: e })?;
    for n in 0..1024 {
        let ip = candidate(unit, n);
        let p = dir.join(ip.to_string());
        match fs::OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(mut f) => {
                f.write_all(unit.as_bytes()).map_err(|e| ContainerError::Io { path: p.clone(), source: e })?;
                return Ok(ip);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if fs::read_to_string(&p).is_ok_and(|owner| owner == unit) {
                    return Ok(ip);
                }
            }
            Err(e) => return Err(ContainerError::Io { path: p, source: e }),
        }
    }
    Err(ContainerError::Network("no free address in 10.88.0.0/16 after 1024 tries; stale leases in the net/ directory?".into()))
}

pub fn release(root: &Path, unit: &str) {
    for e in fs::read_dir(leases(root)).into_iter().flatten().flatten() {
        if fs::read_to_string(e.path()).is_ok_and(|owner| owner == unit) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Addresses currently leased (for leak checks).
pub fn leased(root: &Path) -> usize {
    fs::read_dir(leases(root)).map(|d| d.count()).unwrap_or(0)
}

fn run_batch(cmd: &mut Command, script: &str) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e} (is iproute2 installed?)", cmd.get_program()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status.success() {
        Ok(err)
    } else {
        Err(err)
    }
}

/// Wire up the container whose first process is `pid` (in a new, empty network namespace) with address `ip`.
pub fn setup(unit: &str, pid: i32, ip: Ipv4Addr) -> Result<(), ContainerError> {
    let veth = veth_name(unit);
    // -force: keep going past "File exists" for the bridge and its address (already set up by an earlier start).
    let host = format!(
        "link add {BRIDGE} type bridge\naddr add {GATEWAY}/{PREFIX} dev {BRIDGE}\nlink set {BRIDGE} up\n\
         link del {veth}\nlink add {veth} type veth peer name eth0 netns {pid}\nlink set {veth} master {BRIDGE} up\n"
    );
    let host_res = run_batch(Command::new("ip").args(["-force", "-batch", "-"]), &host);
    let inside = format!("link set lo up\naddr add {ip}/{PREFIX} dev eth0\nlink set eth0 up\nroute add default via {GATEWAY}\n");
    let ns = format!("--net=/proc/{pid}/ns/net");
    run_batch(Command::new("nsenter").args([ns.as_str(), "ip", "-batch", "-"]), &inside).map_err(|inside_err| {
        let host_err = match &host_res {
            Ok(s) | Err(s) => s.lines().filter(|l| !l.contains("File exists") && !l.contains("Cannot find device")).collect::<Vec<_>>().join("; "),
        };
        ContainerError::Network(format!("configuring {veth}/eth0 with {ip}: {inside_err} {host_err}").trim().to_string())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_deterministic_stay_in_the_subnet_and_never_shared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = allocate(dir.path(), "web.service").expect("a");
        assert_eq!(allocate(dir.path(), "web.service").expect("again"), a, "same unit, same address");
        let mut seen = std::collections::HashSet::new();
        for i in 0..200 {
            let ip = allocate(dir.path(), &format!("u{i}.service")).expect("alloc");
            let o = ip.octets();
            assert!(o[0] == 10 && o[1] == 88 && ip != GATEWAY && !(o[2] == 0 && o[3] < 2) && !(o[2] == 255 && o[3] == 255));
            assert!(seen.insert(ip) && ip != a, "{ip} handed out twice");
        }
        release(dir.path(), "web.service");
        assert_eq!(leased(dir.path()), 200);
        assert!(veth_name("some-very-long-unit-name@instance.service").len() <= 15);
    }
}
