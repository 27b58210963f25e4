//! Connection budgets: how many connections each kind of client may hold open at once, so that no client can
//! take the file descriptors that Raft, the store files and the connections to other members need.
//!
//! Owns: the process's open-file limit (raised from the soft to the hard limit at start, as Go's runtime does
//! for etcd) and three counting budgets: peer-port connections, client connections, and, within those,
//! connections from containers (`--container-subnet`), which get no peer-port connections at all. A connection
//! over its budget is closed as soon as it is accepted. Without this, a container opening connections in a loop made `accept` fail with EMFILE for every
//! client and left Raft without descriptors for its own connections. Counters are exported on `/metrics`.
//! Does not: read requests, tell containers from the host (see `api::access`), or time out idle connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::access::Access;

/// File descriptors kept back from every budget: the store and snapshot files, the connections this member
/// opens to the others, snapshot transfers, and the listeners themselves.
pub const FD_RESERVE: u64 = 256;
/// Connections the peer port holds at once. Each other member keeps a small pool of connections here.
pub const PEER_CONNECTIONS: usize = 256;
/// Default `--max-container-connections`.
pub const DEFAULT_CONTAINER_CONNECTIONS: u32 = 512;

/// Raise this process's soft open-file limit to the hard limit ([`nofile_limit`] then reads the new one).
pub fn raise_nofile_limit() {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let (Some(cur), Some(max)) = (lim.current, lim.maximum) else { return }; // a limit of unlimited stays
    if max > cur {
        let raised = rustix::process::Rlimit { current: Some(max), maximum: Some(max) };
        if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Nofile, raised) {
            tracing::warn!("open-file limit stays at {cur} (raising it to {max}: {e})");
        }
    }
}

/// Accept the next connection within its budget. A failed `accept` (out of descriptors, say) is logged and
/// retried after 50 ms instead of ending the listener; a connection over its budget is dropped, which closes it
/// unread. `access_of` says who a connection comes from.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    budgets: &Budgets,
    peer: bool,
    access_of: impl Fn(&tokio::net::TcpStream, std::net::SocketAddr) -> Access,
) -> (tokio::net::TcpStream, Access, Admitted) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let access = access_of(&stream, from);
        if let Some(admitted) = budgets.admit(peer, access) {
            return (stream, access, admitted);
        }
    }
}

/// This process's soft open-file limit (`u64::MAX`: unlimited).
pub fn nofile_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// How many connections of each kind may be open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Peer-port connections.
    pub peers: usize,
    /// Client connections, the host's and the containers' together.
    pub clients: usize,
    /// Client connections from containers (a part of `clients`).
    pub containers: usize,
}

impl Limits {
    /// Budgets under an open-file limit of `nofile`: the reserve and the peer port first, clients get the rest,
    /// containers at most `containers` of them and never more than half, so the host's clients always have room.
    pub fn within(nofile: u64, containers: usize) -> Limits {
        let left = usize::try_from(nofile.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
        let peers = PEER_CONNECTIONS.min(left / 4).max(1);
        let clients = left.saturating_sub(peers).max(2);
        Limits { peers, clients, containers: containers.min(clients / 2).max(1) }
    }
}

/// Whose budget a connection counts against; also the index of its refusal counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Peer = 0,
    Client = 1,
    Container = 2,
}

/// The budgets of a running member, shared by its listeners.
#[derive(Debug)]
pub struct Budgets {
    limits: Limits,
    peers: Arc<Semaphore>,
    clients: Arc<Semaphore>,
    containers: Arc<Semaphore>,
    /// Connections closed at once for want of budget, by [`Kind`]: peer port, host clients, containers.
    refused: [AtomicU64; 3],
}

/// Held for as long as a connection is open; dropping it gives the budget back.
#[derive(Debug)]
pub struct Admitted {
    _all: OwnedSemaphorePermit,
    _container: Option<OwnedSemaphorePermit>,
}

impl Budgets {
    /// Budgets with these limits.
    pub fn new(limits: Limits) -> Budgets {
        Budgets {
            limits,
            peers: Arc::new(Semaphore::new(limits.peers)),
            clients: Arc::new(Semaphore::new(limits.clients)),
            containers: Arc::new(Semaphore::new(limits.containers)),
            refused: Default::default(),
        }
    }

    /// Admit a connection accepted on the peer port (`peer`) or a client port from a client of `access`;
    /// `None`: over budget, close it.
    pub fn admit(&self, peer: bool, access: Access) -> Option<Admitted> {
        let kind = match (peer, access) {
            // The peer port answers containers nothing but 403: they may not hold its connections either, or a
            // container could fill the peer budget and shut the other members out.
            (true, Access::Container) => return self.refuse(Kind::Container),
            (true, Access::Full) => Kind::Peer,
            (false, Access::Full) => Kind::Client,
            (false, Access::Container) => Kind::Container,
        };
        let container = match kind {
            Kind::Container => match self.containers.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => return self.refuse(kind),
            },
            Kind::Peer | Kind::Client => None,
        };
        let pool = if kind == Kind::Peer { &self.peers } else { &self.clients };
        match pool.clone().try_acquire_owned() {
            Ok(all) => Some(Admitted { _all: all, _container: container }),
            Err(_) => self.refuse(kind),
        }
    }

    fn refuse(&self, kind: Kind) -> Option<Admitted> {
        let n = self.refused[kind as usize].fetch_add(1, Ordering::Relaxed);
        // Say so on the first refusal and then every 1000th, not once per connection of a flood.
        if n.is_multiple_of(1000) {
            let (what, limit) = match kind {
                Kind::Peer => ("peer-port", self.limits.peers),
                Kind::Client => ("client", self.limits.clients),
                Kind::Container => ("container client", self.limits.containers),
            };
            tracing::warn!("{what} connections at their limit of {limit}: closing new ones ({} so far)", n + 1);
        }
        None
    }

    /// (open, limit, refused) per kind, for `/metrics`: peer port, clients, containers.
    pub fn report(&self) -> [(&'static str, usize, usize, u64); 3] {
        let l = self.limits;
        let open = |s: &Semaphore, limit: usize| limit - s.available_permits();
        let r = |k: Kind| self.refused[k as usize].load(Ordering::Relaxed);
        [
            ("peer", open(&self.peers, l.peers), l.peers, r(Kind::Peer)),
            ("client", open(&self.clients, l.clients), l.clients, r(Kind::Client) + r(Kind::Container)),
            ("container", open(&self.containers, l.containers), l.containers, r(Kind::Container)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_leave_the_reserve_and_give_containers_at_most_half_of_the_clients() {
        assert_eq!(Limits::within(1024, 512), Limits { peers: 192, clients: 576, containers: 288 });
        assert_eq!(Limits::within(4096, 512), Limits { peers: 256, clients: 3584, containers: 512 });
        assert_eq!(Limits::within(u64::MAX, 512).containers, 512);
        let tiny = Limits::within(10, 512);
        assert!(tiny.peers >= 1 && tiny.clients >= 2 && tiny.containers >= 1, "{tiny:?}");
    }

    #[test]
    fn a_container_over_its_budget_is_refused_while_the_host_still_gets_in() {
        let b = Budgets::new(Limits { peers: 1, clients: 3, containers: 2 });
        let held: Vec<_> = (0..2).map(|_| b.admit(false, Access::Container).expect("within budget")).collect();
        assert!(b.admit(false, Access::Container).is_none(), "third container connection");
        let host = b.admit(false, Access::Full).expect("the host has room");
        assert!(b.admit(true, Access::Full).is_some(), "the peer port has a budget of its own");
        assert!(b.admit(true, Access::Container).is_none(), "containers hold no peer-port connections");
        drop(held);
        assert!(b.admit(false, Access::Container).is_some(), "budget given back on close");
        let _second = b.admit(false, Access::Full).expect("second host client");
        let _third = b.admit(false, Access::Full).expect("third host client");
        assert!(b.admit(false, Access::Full).is_none(), "clients at their limit");
        drop(host);
        let r = b.report();
        assert_eq!((r[1].1, r[1].3, r[2].3), (2, 3, 2), "{r:?}");
    }
}
