//! A private network for several VMs: a network namespace made by the test, a bridge in it and one tap per VM.
//! Nothing leaves the machine: the namespace has no route out, and QEMU runs inside it (`ip netns exec`).
//!
//! Owns: creating and deleting the namespace, bridge and taps (Debian's iproute2). Does not: start VMs.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The bridge's own address inside the namespace (the VMs' gateway); VMs get 10.77.0.11, .12, ….
pub const BRIDGE_ADDR: &str = "10.77.0.1";

pub struct TestNet {
    pub ns: String,
    taps: u32,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl TestNet {
    /// A namespace `keelnet-<pid>-<n>` with bridge `br0` at 10.77.0.1/24.
    pub fn new() -> Result<TestNet, String> {
        let ns = format!("keelnet-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst));
        ip(&["netns", "add", &ns])?;
        let net = TestNet { ns, taps: 0 };
        ip(&["-n", &net.ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &net.ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &net.ns, "addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", "br0"])?;
        ip(&["-n", &net.ns, "link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// A new tap on the bridge, for one VM: (ifname, MAC, the address to give the VM).
    pub fn add_vm(&mut self) -> Result<(String, String, String), String> {
        self.taps += 1;
        let n = self.taps;
        let tap = format!("tap{n}");
        ip(&["-n", &self.ns, "tuntap", "add", &tap, "mode", "tap"])?;
        ip(&["-n", &self.ns, "link", "set", &tap, "master", "br0"])?;
        ip(&["-n", &self.ns, "link", "set", &tap, "up"])?;
        Ok((tap, format!("52:54:00:77:00:{:02x}", 10 + n), format!("10.77.0.{}", 10 + n)))
    }

    /// A command run inside the namespace (e.g. ping a VM from the bridge).
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}
