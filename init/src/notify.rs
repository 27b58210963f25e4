//! The sd_notify socket: datagrams such as `READY=1`, with the sender's credentials checked by the kernel.
//!
//! Owns: binding the socket (SO_PASSCRED), receiving [`Notification`]s, and both sides of systemd's barrier
//! (`BARRIER=1` carrying the write end of a pipe, which the receiver closes once it has handled every earlier
//! message; the sender waits for that). The barrier is what makes a short-lived sender reliable: init finds a
//! sender's unit from its cgroup in /proc, which is gone once the sender exits. A datagram without credentials,
//! over the size limit or not UTF-8 is dropped; file descriptors other than a barrier's are closed at once.
//! Does not: decide what a message means (see `supervisor`).

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, UnixCredentials,
};

/// systemd accepts notifications up to this size.
pub const MAX_DATAGRAM: usize = 4096;
/// How long a sender waits for its barrier (systemd's default for `sd_notify_barrier`).
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// One received datagram.
#[derive(Debug)]
pub struct Notification {
    /// The sender's pid, as the kernel vouches for it.
    pub pid: i32,
    /// The assignments, one per line.
    pub text: String,
    /// For `BARRIER=1`: the pipe end to close once every earlier notification was handled.
    pub barrier: Option<OwnedFd>,
}

impl Notification {
    /// A barrier carries no assignments for a unit.
    pub fn is_barrier(&self) -> bool {
        self.text.trim_end() == "BARRIER=1"
    }
}

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

    /// Every pending datagram, in arrival order. The caller handles them in order and drops each one's
    /// barrier (closing it) after the notifications before it.
    pub fn recv_all(&self) -> Vec<Notification> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        for _ in 0..256 {
            let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials, [RawFd; 8]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
            let msg = match recvmsg::<()>(self.sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                Ok(m) => m,
                Err(_) => break,
            };
            let len = msg.bytes;
            let (mut pid, mut fds) = (None, Vec::new());
            for c in msg.cmsgs().into_iter().flatten() {
                match c {
                    ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
                    ControlMessageOwned::ScmRights(raw) => {
                        // SAFETY: the kernel just installed these descriptors in this process for us; nothing
                        // else owns them, so each is closed exactly once, when its OwnedFd drops.
                        fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                    _ => {}
                }
            }
            if len > MAX_DATAGRAM {
                continue;
            }
            if let (Some(pid), Ok(text)) = (pid, std::str::from_utf8(&buf[..len])) {
                let mut n = Notification { pid, text: text.to_string(), barrier: None };
                if n.is_barrier() && fds.len() == 1 {
                    n.barrier = fds.pop();
                }
                out.push(n);
            }
        }
        out
    }
}

/// Send `text` to the notify socket at `path` on behalf of `pid` (root may name another process, as
/// systemd-notify does for its parent; otherwise the kernel requires our own pid, which we fall back to), then
/// wait up to [`BARRIER_TIMEOUT`] until the receiver has handled it (a barrier), so that the message is not
/// judged after this process is gone. Returns whether the barrier was confirmed (a receiver that does not know
/// barriers confirms at once: it closes descriptors it does not expect).
pub fn send(path: &Path, text: &str, pid: i32) -> std::io::Result<bool> {
    let sock = UnixDatagram::unbound()?;
    let addr = UnixAddr::new(path).map_err(std::io::Error::from)?;
    let pid = send_as(&sock, &addr, text, pid, None)?;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    send_as(&sock, &addr, "BARRIER=1", pid, Some(write.as_raw_fd()))?;
    drop(write);
    wait_hangup(&read, BARRIER_TIMEOUT)
}

/// One datagram with our credentials claiming `pid` (our own if the kernel refuses that); the pid used.
fn send_as(sock: &UnixDatagram, addr: &UnixAddr, text: &str, pid: i32, fd: Option<RawFd>) -> std::io::Result<i32> {
    let iov = [std::io::IoSlice::new(text.as_bytes())];
    let fds = fd.map(|f| [f]);
    let try_as = |pid: i32| {
        let creds = UnixCredentials::from(libc::ucred {
            pid,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        });
        let mut cmsg = vec![ControlMessage::ScmCredentials(&creds)];
        if let Some(f) = &fds {
            cmsg.push(ControlMessage::ScmRights(f));
        }
        sendmsg(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(addr))
    };
    match try_as(pid) {
        Ok(_) => Ok(pid),
        Err(nix::errno::Errno::EPERM) => {
            let own = std::process::id() as i32;
            try_as(own).map(|_| own).map_err(Into::into)
        }
        Err(e) => Err(e.into()),
    }
}

/// Wait until every write end of the pipe whose read end is `read` is closed; false on timeout.
fn wait_hangup(read: &OwnedFd, timeout: Duration) -> std::io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLIN))),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
