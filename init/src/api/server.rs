//! The server side of the control API, driven by init's poll loop: non-blocking accept, read, dispatch, write.
//!
//! Owns: client connections, their buffers, requests waiting for a job to finish, and log followers.
//! A malformed, oversized or unauthorised request gets an error reply and never affects init. A slow client
//! never blocks init: its output is buffered up to a bound, past which it is disconnected.
//! Does not: change units except through the supervisor's public methods.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::{Reply, Request, MAX_REQUEST_BYTES};
use crate::journal::Query;
use crate::supervisor::{JobKind, SupEvent, Supervisor};
use crate::sys::{self, PowerAction};

/// Output buffered for one client before it is considered stuck and dropped.
const MAX_PENDING_OUTPUT: usize = 4 * 1024 * 1024;

struct Conn {
    stream: UnixStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    waiting: Option<(String, JobKind)>,
    follow: Option<(Query, u64)>,
    closing: bool,
}

/// What a request asked of init beyond the supervisor (handled by the loop).
#[derive(Debug, Default)]
pub struct Effects {
    pub power: Option<PowerAction>,
}

pub struct Server {
    listener: UnixListener,
    conns: Vec<Conn>,
    path: PathBuf,
    /// The directory `enable` writes links into (the first unit directory).
    admin_units: PathBuf,
    pub ready: bool,
}

impl Server {
    /// Bind the socket (replacing a stale one), owner-only.
    pub fn bind(path: &Path, admin_units: PathBuf) -> io::Result<Server> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Server { listener, conns: Vec::new(), path: path.to_path_buf(), admin_units, ready: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (fd, wants-write) of the listener and every connection, for poll.
    pub fn poll_fds(&self) -> Vec<(RawFd, bool)> {
        let mut v = vec![(self.listener.as_raw_fd(), false)];
        v.extend(self.conns.iter().map(|c| (c.stream.as_raw_fd(), !c.outbuf.is_empty())));
        v
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    pub fn accept_all(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            let me = nix::unistd::geteuid().as_raw();
            let allowed = sys::peer_uid(stream.as_fd()).is_some_and(|uid| uid == 0 || uid == me);
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let mut conn =
                Conn { stream, inbuf: Vec::new(), outbuf: Vec::new(), waiting: None, follow: None, closing: false };
            if !allowed {
                push(&mut conn, &Reply::error("permission", "the init socket is for root only"));
                conn.closing = true;
            }
            self.conns.push(conn);
        }
    }

    /// Service one connection fd that poll reported (readable, writable or hung up).
    pub fn on_ready(&mut self, fd: RawFd, sup: &mut Supervisor, fx: &mut Effects) {
        let Some(i) = self.conns.iter().position(|c| c.stream.as_raw_fd() == fd) else { return };
        let mut buf = [0u8; 4096];
        loop {
            match self.conns[i].stream.read(&mut buf) {
                Ok(0) => {
                    self.conns[i].closing = true;
                    self.conns[i].outbuf.clear();
                    break;
                }
                Ok(n) => self.conns[i].inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.conns[i].closing = true;
                    break;
                }
            }
            if self.conns[i].inbuf.len() > MAX_REQUEST_BYTES {
                break;
            }
        }
        self.process_input(i, sup, fx);
        self.flush(i);
    }

    fn process_input(&mut self, i: usize, sup: &mut Supervisor, fx: &mut Effects) {
        while self.conns[i].waiting.is_none() && self.conns[i].follow.is_none() {
            let conn = &mut self.conns[i];
            let Some(nl) = conn.inbuf.iter().position(|b| *b == b'\n') else {
                if conn.inbuf.len() > MAX_REQUEST_BYTES {
                    let msg = format!("request larger than {MAX_REQUEST_BYTES} bytes");
                    push(conn, &Reply::error("too-large", msg));
                    conn.inbuf.clear();
                    conn.closing = true;
                }
                return;
            };
            let line: Vec<u8> = conn.inbuf.drain(..=nl).collect();
            if line.len() > MAX_REQUEST_BYTES {
                push(conn, &Reply::error("too-large", format!("request larger than {MAX_REQUEST_BYTES} bytes")));
                conn.closing = true;
                return;
            }
            let reply = match serde_json::from_slice::<Request>(&line) {
                Ok(req) => self.dispatch(i, req, sup, fx),
                Err(e) => Some(Reply::error("bad-request", format!("malformed request: {e}"))),
            };
            if let Some(r) = reply {
                push(&mut self.conns[i], &r);
            }
        }
    }

    fn dispatch(&mut self, i: usize, req: Request, sup: &mut Supervisor, fx: &mut Effects) -> Option<Reply> {
        match req {
            Request::Ping => Some(Reply::Pong {
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id() as i32,
                ready: self.ready,
            }),
            Request::List => Some(Reply::Units { units: sup.list() }),
            Request::Status { unit, lines } => Some(match sup.status(&unit) {
                Some(status) => {
                    let logs = recent_logs(sup, &unit, lines);
                    Reply::Status { status: Box::new(status), logs }
                }
                None => unknown_unit(sup, &unit),
            }),
            Request::Start { unit, wait } => self.job(i, sup, &unit, JobKind::Start, wait),
            Request::Stop { unit, wait } => self.job(i, sup, &unit, JobKind::Stop, wait),
            Request::Restart { unit, wait } => self.job(i, sup, &unit, JobKind::Restart, wait),
            Request::Reload => {
                let diags = sup.reload();
                Some(Reply::Reloaded { units: sup.unit_names().len(), diagnostics: diags.iter().map(ToString::to_string).collect() })
            }
            Request::Enable { unit } => Some(self.enable(sup, &unit, true)),
            Request::Disable { unit } => Some(self.enable(sup, &unit, false)),
            Request::Logs { query, follow } => {
                let records = sup.journal_query(&query);
                if follow {
                    let last = records.last().map(|r| r.seq).unwrap_or_else(|| sup.journal_last_seq());
                    self.conns[i].follow = Some((query, last));
                }
                Some(Reply::Records { records })
            }
            Request::Run { spec } => match sup.add_run_unit(&spec) {
                Ok(unit) => self.job(i, sup, &unit, JobKind::Start, true),
                Err(e) => Some(Reply::error("bad-request", e)),
            },
            Request::Forget { unit } => Some(match sup.forget(&unit) {
                Ok(()) => Reply::Ok { message: None },
                Err(e) => Reply::error("bad-unit", e),
            }),
            Request::Power { action } => {
                fx.power = Some(action);
                Some(Reply::Ok { message: Some(format!("{action:?} requested; stopping all units").to_lowercase()) })
            }
        }
    }

    fn job(&mut self, i: usize, sup: &mut Supervisor, unit: &str, kind: JobKind, wait: bool) -> Option<Reply> {
        let res = match kind {
            JobKind::Start => sup.start(unit, true),
            JobKind::Stop => sup.stop(unit),
            JobKind::Restart => sup.restart(unit),
        };
        if let Err(e) = res {
            let suggestions = sup.close_matches(unit);
            let code = if sup.status(unit).is_some() { "bad-unit" } else { "unknown-unit" };
            return Some(Reply::Error { message: e.to_string(), code: code.into(), suggestions });
        }
        // Already in the requested state: no job was queued.
        let queued = sup.status(unit).is_some_and(|s| s.job.is_some());
        if !wait || !queued {
            return Some(job_reply(sup, unit, true, "done".into()));
        }
        self.conns[i].waiting = Some((unit.to_string(), kind));
        None
    }

    fn enable(&mut self, sup: &mut Supervisor, unit: &str, on: bool) -> Reply {
        if !sup.ensure_loaded(unit) {
            return unknown_unit(sup, unit);
        }
        let Some(def) = sup.def(unit).cloned() else { return unknown_unit(sup, unit) };
        let targets: Vec<(String, &str)> = def
            .install
            .wanted_by
            .iter()
            .map(|t| (t.clone(), "wants"))
            .chain(def.install.required_by.iter().map(|t| (t.clone(), "requires")))
            .collect();
        if targets.is_empty() {
            return Reply::error("no-install", format!("{unit} has no [Install] WantedBy= or RequiredBy=; nothing to enable"));
        }
        let Some(source) = def.sources.first().cloned() else { return unknown_unit(sup, unit) };
        let mut done = Vec::new();
        for (target, kind) in targets {
            let dir = self.admin_units.join(format!("{target}.{kind}"));
            let link = dir.join(unit);
            let res = if on {
                std::fs::create_dir_all(&dir).and_then(|_| {
                    let _ = std::fs::remove_file(&link);
                    std::os::unix::fs::symlink(&source, &link)
                })
            } else {
                match std::fs::remove_file(&link) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    r => r,
                }
            };
            if let Err(e) = res {
                return Reply::error("io", format!("{}: {e}", link.display()));
            }
            done.push(link.display().to_string());
        }
        sup.reload();
        let verb = if on { "created" } else { "removed" };
        Reply::Ok { message: Some(format!("{verb} {}", done.join(", "))) }
    }

    /// Deliver job completions to the clients waiting for them.
    pub fn on_events(&mut self, events: &[SupEvent], sup: &mut Supervisor) {
        for SupEvent::JobDone { unit, job, ok, message } in events {
            for i in 0..self.conns.len() {
                let matches = self.conns[i].waiting.as_ref().is_some_and(|(u, k)| {
                    u == unit && (k == job || (*k == JobKind::Restart && *job == JobKind::Start))
                });
                if matches {
                    self.conns[i].waiting = None;
                    let r = job_reply(sup, unit, *ok, message.clone());
                    push(&mut self.conns[i], &r);
                }
            }
        }
    }

    /// Push new journal records to followers; flush output; drop closed or stuck connections.
    pub fn pump(&mut self, sup: &mut Supervisor) {
        let last = sup.journal_last_seq();
        for i in 0..self.conns.len() {
            if let Some((q, seen)) = self.conns[i].follow.clone() {
                if last > seen {
                    let mut q2 = q.clone();
                    q2.after_seq = Some(seen);
                    q2.last = None;
                    let recs = sup.journal_query(&q2);
                    let new_seen = recs.last().map(|r| r.seq).unwrap_or(last);
                    for record in recs {
                        push(&mut self.conns[i], &Reply::Record { record });
                    }
                    self.conns[i].follow = Some((q, new_seen.max(seen)));
                }
            }
            self.flush(i);
        }
        self.conns.retain(|c| {
            !(c.closing && c.outbuf.is_empty()) && c.outbuf.len() <= MAX_PENDING_OUTPUT
        });
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        while !c.outbuf.is_empty() {
            match c.stream.write(&c.outbuf) {
                Ok(0) => break,
                Ok(n) => {
                    c.outbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    c.outbuf.clear();
                    c.closing = true;
                    break;
                }
            }
        }
    }

    /// Tell everyone connected that init is going down, then drop them.
    pub fn close_all(&mut self) {
        for i in 0..self.conns.len() {
            self.flush(i);
        }
        self.conns.clear();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn push(conn: &mut Conn, reply: &Reply) {
    if let Ok(mut line) = serde_json::to_vec(reply) {
        line.push(b'\n');
        conn.outbuf.extend_from_slice(&line);
    }
}

fn recent_logs(sup: &mut Supervisor, unit: &str, n: usize) -> Vec<crate::journal::Record> {
    if n == 0 {
        return Vec::new();
    }
    sup.journal_query(&Query { unit: Some(unit.into()), last: Some(n), ..Query::default() })
}

fn job_reply(sup: &mut Supervisor, unit: &str, ok: bool, message: String) -> Reply {
    let logs = if ok { Vec::new() } else { recent_logs(sup, unit, 10) };
    Reply::Job { unit: unit.into(), ok, message, status: sup.status(unit).map(Box::new), logs }
}

fn unknown_unit(sup: &Supervisor, unit: &str) -> Reply {
    let suggestions = sup.close_matches(unit);
    let hint = if suggestions.is_empty() { String::new() } else { format!(" (did you mean {}?)", suggestions.join(", ")) };
    Reply::Error { message: format!("unit {unit} not found{hint}"), code: "unknown-unit".into(), suggestions }
}
