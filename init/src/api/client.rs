//! A blocking client for init's control socket, used by `initctl`, the fleet agent and the update engine.
//!
//! Owns: connecting, sending one request, and reading reply lines. Does not: format anything for people.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{Reply, Request};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to init at {path}: {source} (is init running? is this the right --socket? are you root?)")]
    Connect { path: String, source: std::io::Error },
    #[error("lost connection to init: {0}")]
    Io(#[from] std::io::Error),
    #[error("init sent a reply this initctl does not understand: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("init closed the connection without replying")]
    Closed,
}

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { path: path.display().to_string(), source })?;
        let writer = s.try_clone()?;
        Ok(Client { reader: BufReader::new(s), writer })
    }

    /// Give up waiting for a reply after `t` (None = wait as long as the job takes).
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<(), ClientError> {
        self.writer.set_read_timeout(t)?;
        Ok(())
    }

    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        Ok(())
    }

    /// The next reply line.
    pub fn recv(&mut self) -> Result<Reply, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Send and wait for the single reply.
    pub fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        self.send(req)?;
        self.recv()
    }
}
