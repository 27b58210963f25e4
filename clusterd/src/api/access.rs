//! What a client in a container may do: the client API is open to containers (they find it at
//! `KEEL_KV_URL`, the bridge address 10.88.0.1), but the keys that make the host act are the host's.
//!
//! Owns: telling a container's connection from the host's (its source address lies in `--container-subnet`,
//! Keel's bridge `10.88.0.0/16` by default), and the rules for one: reads and watches of every key, writes
//! anywhere except the host-only keys ([`HOST_ONLY`]: fleet's units, states and machines, which every machine's
//! init runs as root, and the reboot semaphore), no member changes, no fleet journals or reboot-lock (FleetLock)
//! calls, and nothing on the peer port.
//! Does not: authenticate anyone else. Clients on the host or on other machines keep etcd v2's open access, and a
//! container on the host's network (`Network=host`) shares the host's addresses and is not told apart.

use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

/// Key prefixes that only the host may write (also what lies inside them and the directories above them).
pub const HOST_ONLY: &[&str] = &["/_keel", "/coreos.com/updateengine/rebootlock"];

/// Who sent a request, as far as the API cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The host, another machine, or a member forwarding a request it has already checked.
    Full,
    /// A container on a private network.
    Container,
}

/// An IPv4 subnet, `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    net: u32,
    len: u8,
}

impl FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv4 subnet like 10.88.0.0/16");
        let (ip, len) = s.trim().split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(bad)?;
        Ok(Subnet { net: u32::from(ip) & mask(len), len })
    }
}

fn mask(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

impl Subnet {
    /// Whether `ip` (IPv4, or IPv4-mapped IPv6) lies in this subnet.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let v4 = match ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => return false,
            },
        };
        u32::from(v4) & mask(self.len) == self.net
    }
}

/// The access of a connection from `peer` to this machine's address `local`. A connection from one of the
/// machine's own addresses is the host's, even from the bridge address 10.88.0.1 (a host process connecting to
/// 10.88.0.1 has it as its source too); the kernel drops packets that arrive from outside with a local source.
pub fn of(containers: Option<&Subnet>, peer: IpAddr, local: IpAddr) -> Access {
    match containers {
        Some(s) if s.contains(peer) && peer != local => Access::Container,
        _ => Access::Full,
    }
}

/// Whether a container may write `key` (cleaned, e.g. `/a/b`); `post` for an in-order create, which writes a
/// new key inside `key`. Returns the host-only prefix the write would touch. A directory above a host-only
/// prefix is refused too: a TTL on it, or deleting it recursively, would take the host's keys with it. (The root
/// itself is left to the store, which refuses every write to it.)
pub fn container_may_write(key: &str, post: bool) -> Result<(), &'static str> {
    for p in HOST_ONLY {
        let inside = key == *p || key.strip_prefix(p).is_some_and(|rest| rest.starts_with('/'));
        let above = !post && key != "/" && p.strip_prefix(key).is_some_and(|rest| rest.starts_with('/'));
        if inside || above {
            return Err(p);
        }
    }
    Ok(())
}

/// Whether a container may call this non-keys endpoint with this method.
pub fn container_may_call(method: &str, path: &str) -> bool {
    let read = matches!(method, "GET" | "HEAD");
    if path.starts_with("/keel/fleet/") || path.starts_with("/v1/") {
        return false;
    }
    read || !(path == "/v2/members" || path.starts_with("/v2/members/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_contain_what_they_should() {
        let s: Subnet = "10.88.0.0/16".parse().unwrap();
        assert!(s.contains("10.88.3.4".parse().unwrap()));
        assert!(s.contains("::ffff:10.88.0.9".parse().unwrap()));
        assert!(!s.contains("10.89.0.1".parse().unwrap()));
        assert!(!s.contains("127.0.0.1".parse().unwrap()));
        assert!(!s.contains("::1".parse().unwrap()));
        let one: Subnet = "127.0.0.9/32".parse().unwrap();
        assert!(one.contains("127.0.0.9".parse().unwrap()) && !one.contains("127.0.0.8".parse().unwrap()));
        let all: Subnet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        // Host bits are ignored, as in `ip route`.
        assert_eq!("10.88.7.7/16".parse::<Subnet>(), Ok(s));
        for bad in ["10.88.0.0", "10.88.0.0/33", "10.88/16", "fe80::/10", ""] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn containers_write_their_keys_but_not_the_hosts() {
        for ok in ["/app/config", "/_keelx", "/_keel_not", "/coreos.com/other", "/coreos.com/updateengine/rebootlockx"] {
            assert_eq!(container_may_write(ok, false), Ok(()), "{ok}");
        }
        for (key, prefix) in [
            ("/_keel", "/_keel"),
            ("/_keel/fleet/units/web.service", "/_keel"),
            ("/coreos.com/updateengine/rebootlock/semaphore", "/coreos.com/updateengine/rebootlock"),
            ("/coreos.com", "/coreos.com/updateengine/rebootlock"),
            ("/coreos.com/updateengine", "/coreos.com/updateengine/rebootlock"),
        ] {
            assert_eq!(container_may_write(key, false), Err(prefix), "{key}");
        }
        // An in-order create under a directory above a host-only prefix makes a new sibling: allowed.
        assert_eq!(container_may_write("/coreos.com", true), Ok(()));
        assert_eq!(container_may_write("/", true), Ok(()));
        assert!(container_may_write("/_keel/fleet", true).is_err());
    }

    #[test]
    fn containers_read_members_but_do_not_change_them_or_reach_fleet_or_fleetlock() {
        assert!(container_may_call("GET", "/v2/members"));
        assert!(container_may_call("GET", "/health") && container_may_call("GET", "/metrics"));
        assert!(!container_may_call("POST", "/v2/members"));
        assert!(!container_may_call("DELETE", "/v2/members/8e9e05c52164694d"));
        assert!(!container_may_call("GET", "/keel/fleet/journal"));
        assert!(!container_may_call("POST", "/v1/pre-reboot"));
    }

    #[test]
    fn a_connection_is_a_containers_only_inside_the_subnet() {
        let s: Subnet = "10.88.0.0/16".parse().unwrap();
        let bridge: IpAddr = "10.88.0.1".parse().unwrap();
        assert_eq!(of(Some(&s), "10.88.0.5".parse().unwrap(), bridge), Access::Container);
        assert_eq!(of(Some(&s), bridge, bridge), Access::Full, "the host itself, connecting to the bridge address");
        assert_eq!(of(Some(&s), "127.0.0.1".parse().unwrap(), "127.0.0.1".parse().unwrap()), Access::Full);
        assert_eq!(of(None, "10.88.0.5".parse().unwrap(), bridge), Access::Full);
    }
}
