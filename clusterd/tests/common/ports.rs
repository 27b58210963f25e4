//! Free TCP ports for test processes that start servers on loopback addresses.
//!
//! Owns one thing: handing out a port per call that no earlier call in this test process handed out. Asking
//! the kernel for `bind(ip, 0)` and closing the socket is not enough on its own: once the socket is closed
//! the kernel may give the same port to the next `bind(ip, 0)`, and it did (a member's client and peer port
//! came out equal, and the member could not listen: "Address already in use"). Shared by clusterd's and the
//! updater's multi-process tests (the updater includes this file by path); it must not start anything.
//! Its test lives in single_node.rs, so that it runs once rather than in every binary that includes this file.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// Every (address, port) handed out by this process.
static GIVEN: Mutex<BTreeSet<(String, u16)>> = Mutex::new(BTreeSet::new());

/// A listener on `ip` whose port this process has not handed out before (kept open by the caller, e.g. a
/// proxy, or closed at once by [`free_port`]).
pub fn bind_unused(ip: &str) -> TcpListener {
    let mut given = GIVEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // Ports already given out stay bound here until a new one comes, so the kernel must pick another.
    let mut already_given = Vec::new();
    loop {
        let listener = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
        let port = listener.local_addr().expect("local addr of a bound listener").port();
        if given.insert((ip.to_string(), port)) {
            return listener;
        }
        already_given.push(listener);
    }
}

/// A TCP port on `ip` that is free now and that no earlier call in this process returned.
pub fn free_port(ip: &str) -> u16 {
    bind_unused(ip).local_addr().expect("local addr of a bound listener").port()
}
