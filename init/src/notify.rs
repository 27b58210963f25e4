//! The sd_notify socket: datagrams such as `READY=1`, with the sender's credentials checked by the kernel.
//!
//! Owns: binding the socket (SO_PASSCRED) and receiving `(pid, text)` pairs. A datagram without credentials,
//! over the size limit or not UTF-8 is dropped. Does not: decide what a message means (see `supervisor`).

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};

/// systemd accepts notifications up to this size.
pub const MAX_DATAGRAM: usize = 4096;

pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    pub fn bind(path: &Path) -> std::io::Result<NotifySocket> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path)?;
        sock.set_nonblocking(true)?;
        setsockopt(&sock, sockopt::PassCred, &true).map_err(std::io::Error::from)?;
        Ok(NotifySocket { sock, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Every pending datagram as (sender pid, text).
    pub fn recv_all(&self) -> Vec<(i32, String)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        for _ in 0..256 {
            let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(self.sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT) {
                Ok(m) => m,
                Err(_) => break,
            };
            let len = msg.bytes;
            let pid = msg.cmsgs().ok().and_then(|mut c| {
                c.find_map(|m| match m {
                    ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                    _ => None,
                })
            });
            if len > MAX_DATAGRAM {
                continue;
            }
            if let (Some(pid), Ok(text)) = (pid, std::str::from_utf8(&buf[..len])) {
                out.push((pid, text.to_string()));
            }
        }
        out
    }
}

/// Send `text` to the notify socket at `path` on behalf of `pid` (root may name another process, as
/// systemd-notify does for its parent; otherwise the kernel requires our own pid, which we fall back to).
pub fn send(path: &Path, text: &str, pid: i32) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, UnixAddr, UnixCredentials};
    let sock = UnixDatagram::unbound()?;
    let addr = UnixAddr::new(path).map_err(std::io::Error::from)?;
    let iov = [std::io::IoSlice::new(text.as_bytes())];
    let try_as = |pid: i32| {
        let creds = UnixCredentials::from(libc::ucred {
            pid,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        });
        let cmsg = [ControlMessage::ScmCredentials(&creds)];
        sendmsg(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&addr))
    };
    match try_as(pid) {
        Ok(_) => Ok(()),
        Err(nix::errno::Errno::EPERM) => try_as(std::process::id() as i32).map(|_| ()).map_err(Into::into),
        Err(e) => Err(e.into()),
    }
}
