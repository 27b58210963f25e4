//! Private container networks: the `keel0` bridge (10.88.0.1/16) on the host side, one veth pair per container
//! (`kv<hash>` on the bridge, `eth0` inside), an address from 10.88.0.0/16 and a default route via the bridge.
//!
//! Owns: address allocation (deterministic: a hash of the unit name, probing forward on collision; each lease
//! is a file `<containers>/net/<address>` naming its unit, created with O_EXCL so two starts never share one),
//! and the order of the wiring steps, each an rtnetlink request ([`netlink`]). No `ip` command: Keel's image has
//! only busybox's, which has no batch mode and ignores a veth peer's name and namespace. The veth and the
//! container's namespace vanish with the container's last process, so cleanup is only the address lease.
//! Does not: NAT to other networks (containers reach the host, e.g. clusterd at 10.88.0.1:2379, only).

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::{netlink, ContainerError};

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

/// Wire up the container whose first process is `pid` (in a new, empty network namespace) with address `ip`:
/// the bridge (made by the first container), a veth pair with `eth0` in the container, its address and route.
pub fn setup(unit: &str, pid: i32, ip: Ipv4Addr) -> Result<(), ContainerError> {
    let veth = veth_name(unit);
    host_side(&veth, pid).map_err(|e| ContainerError::Network(format!("{veth} on {BRIDGE}: {e}")))?;
    netlink::in_netns(pid, |nl| {
        nl.set_up(netlink::index("lo").map_err(step("lo"))?, None).map_err(step("setting lo up"))?;
        let eth0 = netlink::index("eth0").map_err(step("eth0"))?;
        nl.add_address(eth0, ip, PREFIX).map_err(step(&format!("adding {ip}/{PREFIX} to eth0")))?;
        nl.set_up(eth0, None).map_err(step("setting eth0 up"))?;
        nl.add_default_route(eth0, GATEWAY).map_err(step(&format!("adding the default route via {GATEWAY}")))
    })
    .map_err(|e| ContainerError::Network(format!("configuring eth0 with {ip} in the container: {e}")))
}

/// The error of a failed step, naming it.
fn step(what: &str) -> impl FnOnce(Errno) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// `r`, with `expected` (the state is already as wanted) counting as success.
fn except(r: Result<(), Errno>, expected: Errno) -> Result<(), Errno> {
    match r {
        Err(e) if e == expected => Ok(()),
        r => r,
    }
}

/// The bridge with the gateway address (kept from earlier starts), and a fresh veth pair on it.
fn host_side(veth: &str, pid: i32) -> Result<(), String> {
    let mut nl = netlink::Socket::open().map_err(step("netlink socket"))?;
    except(nl.add_bridge(BRIDGE), Errno::EEXIST).map_err(step(&format!("creating the bridge {BRIDGE}")))?;
    let bridge = netlink::index(BRIDGE).map_err(step(BRIDGE))?;
    except(nl.add_address(bridge, GATEWAY, PREFIX), Errno::EEXIST).map_err(step(&format!("adding {GATEWAY}/{PREFIX} to {BRIDGE}")))?;
    nl.set_up(bridge, None).map_err(step("setting the bridge up"))?;
    // Left over from a container whose namespace is still going away.
    except(nl.del_link(veth), Errno::ENODEV).map_err(step(&format!("removing an old {veth}")))?;
    nl.add_veth(veth, "eth0", pid).map_err(step("creating the veth pair"))?;
    let index = netlink::index(veth).map_err(step("the new veth"))?;
    nl.set_up(index, Some(bridge)).map_err(step("putting the veth on the bridge"))
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
