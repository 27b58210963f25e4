//! The few rtnetlink requests private container networks need, written by hand: create a bridge or a veth pair
//! (its peer straight into a container's network namespace), delete a link, set a link up (optionally under a
//! bridge), add an IPv4 address, add a default route; each one acknowledged by the kernel before the next.
//!
//! Owns: the message layout (`nlmsghdr`, then `ifinfomsg`, `ifaddrmsg` or `rtmsg`, then attributes, nested ones
//! for link kinds) and reading the kernel's acknowledgement, and entering another network namespace on a
//! short-lived thread ([`in_netns`]) so init's own threads never change namespace.
//! Does not: choose names or addresses (`net` does) or query links (names map to indexes with
//! `if_nametoindex`, in the namespace of the calling thread).

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};

// linux/rtnetlink.h, linux/netlink.h, linux/if_link.h, linux/veth.h, linux/if_addr.h
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_PID: u16 = 19;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 1;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

/// One request being built: a 16-byte header (filled in by [`Msg::finish`]), then 4-byte-aligned parts.
struct Msg {
    buf: Vec<u8>,
    open: Vec<usize>,
}

impl Msg {
    fn new(kind: u16, flags: u16) -> Msg {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        Msg { buf, open: Vec::new() }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// `ifinfomsg`: family, type, index, flags, change.
    fn link(mut self, index: u32, flags: u32, change: u32) -> Msg {
        self.buf.extend_from_slice(&[0, 0, 0, 0]);
        self.buf.extend_from_slice(&index.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&change.to_ne_bytes());
        self
    }

    fn attr(mut self, kind: u16, payload: &[u8]) -> Msg {
        let len = (4 + payload.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    fn name(self, kind: u16, name: &str) -> Msg {
        let mut z = name.as_bytes().to_vec();
        z.push(0);
        self.attr(kind, &z)
    }

    /// Open a nested attribute; [`Msg::end`] closes the innermost one.
    fn begin(mut self, kind: u16) -> Msg {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self
    }

    fn end(mut self) -> Msg {
        if let Some(at) = self.open.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// A NETLINK_ROUTE socket in the namespace of the thread that opened it.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open() -> Result<Socket, Errno> {
        let fd = socket::socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Socket { fd, seq: 0 })
    }

    /// Send `msg` and wait for its acknowledgement: Ok, or the kernel's errno.
    fn call(&mut self, msg: Msg) -> Result<(), Errno> {
        self.seq = self.seq.wrapping_add(1);
        let bytes = msg.finish(self.seq);
        let raw = self.fd.as_raw_fd();
        socket::send(raw, &bytes, MsgFlags::empty())?;
        let mut buf = [0u8; 4096];
        loop {
            let n = socket::recv(raw, &mut buf, MsgFlags::empty())?;
            if let Some(result) = ack(&buf[..n], self.seq) {
                return result;
            }
        }
    }

    /// Create a bridge named `name`.
    pub fn add_bridge(&mut self, name: &str) -> Result<(), Errno> {
        let m = Msg::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL).link(0, 0, 0).name(IFLA_IFNAME, name);
        self.call(m.begin(IFLA_LINKINFO).name(IFLA_INFO_KIND, "bridge").end())
    }

    /// Create a veth pair: `name` here, `peer` in the network namespace of process `pid`.
    pub fn add_veth(&mut self, name: &str, peer: &str, pid: i32) -> Result<(), Errno> {
        let m = Msg::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL).link(0, 0, 0).name(IFLA_IFNAME, name);
        let m = m.begin(IFLA_LINKINFO).name(IFLA_INFO_KIND, "veth").begin(IFLA_INFO_DATA).begin(VETH_INFO_PEER);
        let m = m.link(0, 0, 0).name(IFLA_IFNAME, peer).attr(IFLA_NET_NS_PID, &(pid as u32).to_ne_bytes());
        self.call(m.end().end().end())
    }

    /// Delete the link named `name` (ENODEV when there is none).
    pub fn del_link(&mut self, name: &str) -> Result<(), Errno> {
        self.call(Msg::new(RTM_DELLINK, 0).link(0, 0, 0).name(IFLA_IFNAME, name))
    }

    /// Set link `index` up, under bridge `master` if given.
    pub fn set_up(&mut self, index: u32, master: Option<u32>) -> Result<(), Errno> {
        let m = Msg::new(RTM_NEWLINK, 0).link(index, IFF_UP, IFF_UP);
        self.call(match master {
            Some(b) => m.attr(IFLA_MASTER, &b.to_ne_bytes()),
            None => m,
        })
    }

    /// Add `ip/prefix` to link `index` (EEXIST when it is there already).
    pub fn add_address(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), Errno> {
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL);
        m.buf.extend_from_slice(&[AF_INET, prefix, 0, RT_SCOPE_UNIVERSE]);
        m.buf.extend_from_slice(&index.to_ne_bytes());
        self.call(m.attr(IFA_LOCAL, &ip.octets()).attr(IFA_ADDRESS, &ip.octets()))
    }

    /// Add the default route via `gateway` on link `index`.
    pub fn add_default_route(&mut self, index: u32, gateway: Ipv4Addr) -> Result<(), Errno> {
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL);
        m.buf.extend_from_slice(&[AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST]);
        m.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.call(m.attr(RTA_GATEWAY, &gateway.octets()).attr(RTA_OIF, &index.to_ne_bytes()))
    }
}

/// The result in an acknowledgement for request `seq` among the messages in `buf`, if there is one.
fn ack(buf: &[u8], seq: u32) -> Option<Result<(), Errno>> {
    let mut at = 0;
    while at + 20 <= buf.len() {
        let word = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let len = word(at) as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if kind == NLMSG_ERROR && word(at + 8) == seq {
            let code = word(at + 16) as i32;
            return Some(if code == 0 { Ok(()) } else { Err(Errno::from_raw(-code)) });
        }
        if len < 16 {
            return None;
        }
        at += len.div_ceil(4) * 4;
    }
    None
}

/// The index of link `name` in the calling thread's network namespace.
pub fn index(name: &str) -> Result<u32, Errno> {
    nix::net::if_::if_nametoindex(name)
}

/// Run `f` with a netlink socket in the network namespace of process `pid`, on a thread of its own (a thread
/// that changed namespace ends with `f`).
pub fn in_netns<T: Send>(pid: i32, f: impl FnOnce(&mut Socket) -> Result<T, String> + Send) -> Result<T, String> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|e| format!("the container's network namespace: {e}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| format!("entering the container's network namespace: {e}"))?;
            let mut nl = Socket::open().map_err(|e| format!("netlink socket: {e}"))?;
            f(&mut nl)
        })
        .join()
        .unwrap_or_else(|_| Err("the network setup thread panicked".into()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attributes_carry_their_lengths_and_the_header_the_total() {
        let m = Msg::new(RTM_NEWLINK, NLM_F_CREATE).link(0, 0, 0).name(IFLA_IFNAME, "kv1");
        let bytes = m.begin(IFLA_LINKINFO).name(IFLA_INFO_KIND, "veth").end().finish(7);
        // header 16 + ifinfomsg 16 + IFNAME (4 + "kv1\0") 8 + LINKINFO (4 + KIND (4 + "veth\0" = 9, padded 12)) 16
        assert_eq!(bytes.len(), 56);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 56);
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 7);
        assert_eq!(u16::from_ne_bytes([bytes[40], bytes[41]]), 16, "LINKINFO spans its nested KIND");
        assert_eq!(u16::from_ne_bytes([bytes[44], bytes[45]]), 9, "KIND's length excludes its padding");
        assert_eq!(&bytes[48..53], b"veth\0");
    }

    #[test]
    fn acknowledgements_are_matched_by_sequence() {
        let reply = |seq: u32, code: i32| {
            let mut b = vec![0u8; 36];
            b[0..4].copy_from_slice(&36u32.to_ne_bytes());
            b[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
            b[8..12].copy_from_slice(&seq.to_ne_bytes());
            b[16..20].copy_from_slice(&code.to_ne_bytes());
            b
        };
        assert_eq!(ack(&reply(3, 0), 3), Some(Ok(())));
        assert_eq!(ack(&reply(3, -17), 3), Some(Err(Errno::EEXIST)));
        assert_eq!(ack(&reply(2, 0), 3), None, "an older request's answer");
        let two = [reply(2, 0), reply(3, -19)].concat();
        assert_eq!(ack(&two, 3), Some(Err(Errno::ENODEV)));
        assert_eq!(ack(&[0u8; 8], 3), None);
    }
}
