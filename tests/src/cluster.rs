//! Several Keel VMs on a test bridge forming one cluster (clusterd members named after the machines), kept
//! running like a hypervisor would: when a guest reboots (QEMU runs with -no-reboot and exits), it is started
//! again from the same disk at once. Every start, ready, shutdown and exit is an [`Event`]; with the probe's
//! records they make the [`timeline`] a test prints.
//!
//! Owns: the per-machine cloud-config (static address, clusterd's initial cluster, `keel.update`,
//! `keel.locksmith`, extra units), starting and restarting the VMs, polling their state, rendering the
//! timeline, and an [`UpdateServer`] run inside the cluster's namespace. Does not: decide what a test asserts,
//! build images or payloads, or run the client (`probe`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::image;
use crate::net::{TestNet, BRIDGE_ADDR};
use crate::probe::{self, Kind, Record};
use keel_image::mkimage::Manifest;

use crate::vm::{Vm, VmOptions, READY_MARKERS};

/// What init prints when a shutdown starts (init/src/run.rs `request_shutdown`).
pub const SHUTDOWN_MARKER: &str = "requested: stopping all units";

/// `keel.update` of the machines' cloud-config.
#[derive(Debug, Clone)]
pub struct UpdateConfig {
    /// Omaha endpoint, e.g. `http://10.77.0.1:8000/v1/update/`.
    pub server: String,
    pub group: String,
    /// `reboot` | `etcd-lock` | `off`
    pub reboot_strategy: String,
}

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Prefix of the VM names (`<name>1`, `<name>2`, …): also their hostnames and clusterd member names.
    pub name: String,
    pub size: usize,
    pub memory_mib: u32,
    pub update: Option<UpdateConfig>,
    /// `keel.locksmith.max`
    pub locksmith_max: Option<u32>,
    /// YAML list items (indented 4 spaces, `- name: …`) appended to `keel.units` after clusterd.service.
    pub units: String,
    /// YAML list items (indented 2 spaces) for `write_files`.
    pub write_files: String,
    /// Extra lines (indented 4 spaces) for `keel.update`, e.g. `    interval: 20s`.
    pub update_extra: String,
    /// Boot this image instead of the one under test.
    pub image: Option<Manifest>,
}

impl ClusterSpec {
    pub fn new(name: &str, size: usize) -> ClusterSpec {
        ClusterSpec {
            name: name.into(),
            size,
            memory_mib: 512,
            update: None,
            locksmith_max: None,
            units: String::new(),
            write_files: String::new(),
            update_extra: String::new(),
            image: None,
        }
    }
}

/// One machine's cloud-config.
pub fn cloud_config(spec: &ClusterSpec, i: usize, addrs: &[String]) -> String {
    let name = format!("{}{}", spec.name, i + 1);
    let initial: Vec<String> =
        addrs.iter().enumerate().map(|(j, a)| format!("{}{}=http://{a}:2380", spec.name, j + 1)).collect();
    let addr = &addrs[i];
    let mut s = format!(
        "#cloud-config\nhostname: {name}\n\
         keel:\n  network:\n    - interface: eth0\n      address: {addr}/24\n      gateway: {BRIDGE_ADDR}\n\
         \x20 clusterd:\n    name: {name}\n    data_dir: /var/lib/keel/clusterd\n\
         \x20   initial_cluster: {}\n    listen_client_urls: http://{addr}:2379,http://127.0.0.1:2379\n\
         \x20   advertise_client_urls: http://{addr}:2379\n    listen_peer_urls: http://{addr}:2380\n\
         \x20   election_timeout: 600\n",
        initial.join(",")
    );
    if let Some(u) = &spec.update {
        let _ = write!(
            s,
            "  update:\n    server: {}\n    group: {}\n    reboot_strategy: {}\n",
            u.server, u.group, u.reboot_strategy
        );
        s.push_str(&spec.update_extra);
    }
    if let Some(max) = spec.locksmith_max {
        let _ = write!(s, "  locksmith:\n    max: {max}\n");
    }
    s.push_str("  units:\n    - name: clusterd.service\n      command: start\n");
    s.push_str(&spec.units);
    if !spec.write_files.is_empty() {
        s.push_str("write_files:\n");
        s.push_str(&spec.write_files);
    }
    s
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// QEMU started (first boot or after a reboot).
    Started,
    /// init reported all units ready; the slot (`USR-A`/`USR-B`) and os-release VERSION_ID it runs.
    Ready { slot: String, version: String },
    /// init began shutting down (a reboot or poweroff was requested).
    ShuttingDown,
    /// QEMU exited (the guest rebooted or powered off).
    Exited { status: String },
}

#[derive(Debug, Clone)]
pub struct Event {
    pub at_ms: u64,
    pub node: usize,
    pub what: What,
}

pub struct Node {
    pub name: String,
    pub addr: String,
    pub opts: VmOptions,
    pub vm: Option<Vm>,
    /// Every console log of this machine, one per boot.
    pub logs: Vec<PathBuf>,
    /// /etc/machine-id (the reboot lock's holder id), once known.
    pub machine_id: String,
    ready: bool,
    stopping: bool,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub events: Vec<Event>,
    pub spec: ClusterSpec,
    /// Last so the VMs (whose QEMU runs inside it) are gone before the namespace is deleted.
    pub net: TestNet,
}

fn vm_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Cluster {
    /// Make the network and write each machine's cloud-config; nothing runs yet (see [`Cluster::start_all`]).
    /// Direct kernel boot without a forced slot: the initramfs picks USR-A/USR-B by the GPT bits, as a
    /// firmware would, so updates take effect on reboot.
    pub fn create(spec: ClusterSpec) -> Result<Cluster, String> {
        let mut net = TestNet::new()?;
        let mut taps = Vec::new();
        for _ in 0..spec.size {
            taps.push(net.add_vm()?);
        }
        let addrs: Vec<String> = taps.iter().map(|t| t.2.clone()).collect();
        let mut nodes = Vec::new();
        for (i, (tap, mac, addr)) in taps.into_iter().enumerate() {
            let name = format!("{}{}", spec.name, i + 1);
            let dir = image::work_dir(&format!("vms/{name}"));
            let ud = dir.join("user-data.yml");
            std::fs::write(&ud, cloud_config(&spec, i, &addrs)).map_err(|e| format!("writing {}: {e}", ud.display()))?;
            let opts = VmOptions {
                user_data: Some(ud),
                tap: Some((net.ns.clone(), tap, mac)),
                memory_mib: spec.memory_mib,
                slot: None,
                image: spec.image.clone(),
                ..VmOptions::direct(&name)
            };
            nodes.push(Node { name, addr, opts, vm: None, logs: Vec::new(), machine_id: String::new(), ready: false, stopping: false });
        }
        Ok(Cluster { nodes, events: Vec::new(), spec, net })
    }

    /// Start every VM (they boot concurrently).
    pub fn start_all(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            self.boot(i)?;
        }
        Ok(())
    }

    /// [`Cluster::create`] and [`Cluster::start_all`].
    pub fn start(spec: ClusterSpec) -> Result<Cluster, String> {
        let mut c = Cluster::create(spec)?;
        c.start_all()?;
        Ok(c)
    }

    fn event(&mut self, node: usize, what: What) {
        self.events.push(Event { at_ms: probe::now_ms(), node, what });
    }

    fn boot(&mut self, i: usize) -> Result<(), String> {
        let n = &mut self.nodes[i];
        let vm = Vm::start(&n.opts).map_err(vm_err)?;
        // later boots reuse this boot's disk (and UEFI vars)
        n.opts.disk = Some(vm.disk.clone());
        n.opts.vars = vm.vars.clone();
        n.logs.push(vm.console_log().to_path_buf());
        n.vm = Some(vm);
        n.ready = false;
        n.stopping = false;
        self.event(i, What::Started);
        Ok(())
    }

    /// Notice what happened since the last call: shutdowns, exits (then start the machine again), and boots
    /// that became ready (then ask the machine which slot and version it runs). Call it often (≈ 4×/s).
    pub fn poll(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            let mut seen = Vec::new();
            let n = &mut self.nodes[i];
            let Some(vm) = n.vm.as_mut() else { continue };
            if let Some(status) = vm.exited() {
                n.vm = None;
                self.event(i, What::Exited { status });
                self.boot(i)?;
                continue;
            }
            let console = vm.console();
            if !n.ready && READY_MARKERS.iter().any(|m| console.contains(m)) {
                let slot = if console.contains("USR: USR-B") { "USR-B" } else { "USR-A" }.to_string();
                // a machine that is already going down again answers later or never: try at the next poll
                if let Ok(info) =
                    vm.run(". /usr/lib/os-release; echo \"$VERSION_ID $(cat /etc/machine-id)\"", Duration::from_secs(30))
                {
                    let mut words = info.stdout.split_whitespace();
                    let version = words.next().unwrap_or("?").to_string();
                    n.machine_id = words.next().unwrap_or("").to_string();
                    n.ready = true;
                    seen.push(What::Ready { slot, version });
                }
            }
            if !n.stopping && console.contains(SHUTDOWN_MARKER) {
                n.stopping = true;
                seen.push(What::ShuttingDown);
            }
            for w in seen {
                self.event(i, w);
            }
        }
        Ok(())
    }

    /// Poll until every machine is ready.
    pub fn wait_all_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !self.nodes.iter().all(|n| n.ready) {
            if Instant::now() >= deadline {
                let missing: Vec<&str> = self.nodes.iter().filter(|n| !n.ready).map(|n| n.name.as_str()).collect();
                return Err(format!("{missing:?} not ready within {} s; {}", timeout.as_secs(), self.log_list()));
            }
            self.poll()?;
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Poll until `probe_bin` gets 200 from every member's /health (a leader is known to all).
    pub fn wait_kv_healthy(&mut self, probe_bin: &Path, timeout: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let mut last = String::new();
            let all = self.kv_urls().iter().all(|u| match probe::probe_once(&self.net, probe_bin, &["http", "GET", &format!("{u}/health")]) {
                Ok(_) => true,
                Err(e) => {
                    last = e;
                    false
                }
            });
            if all {
                return Ok(started.elapsed());
            }
            if Instant::now() >= deadline {
                return Err(format!("the KV was not healthy on every member within {} s: {last}; {}", timeout.as_secs(), self.log_list()));
            }
            self.poll()?;
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn kv_urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("http://{}:2379", n.addr)).collect()
    }

    /// Run `script` on machine `i` (its current boot).
    pub fn run(&mut self, i: usize, script: &str, timeout: Duration) -> Result<crate::vm::Output, String> {
        let n = &mut self.nodes[i];
        let vm = n.vm.as_mut().ok_or_else(|| format!("{} is not running", n.name))?;
        vm.run(script, timeout).map_err(vm_err)
    }

    /// Which machine has this machine id.
    pub fn node_by_id(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| !n.machine_id.is_empty() && n.machine_id == id)
    }

    /// "console logs: <paths>" for failure messages.
    pub fn log_list(&self) -> String {
        let mut s = String::from("console logs:");
        for n in &self.nodes {
            for l in &n.logs {
                let _ = write!(s, "\n  {} {}", n.name, l.display());
            }
        }
        s
    }

    /// Per machine and moment: up (ready, not shutting down) or not, from the events.
    pub fn down_at(&self, node: usize, at_ms: u64) -> bool {
        let mut up = false;
        for e in self.events.iter().filter(|e| e.node == node && e.at_ms <= at_ms) {
            up = matches!(e.what, What::Ready { .. });
        }
        !up
    }

    /// Intervals (from, to) in which more than one machine was down (not ready, or shutting down).
    pub fn overlapping_downtime(&self, from_ms: u64, to_ms: u64) -> Vec<(u64, u64, Vec<usize>)> {
        let mut points: Vec<u64> = self.events.iter().map(|e| e.at_ms).filter(|t| *t >= from_ms && *t <= to_ms).collect();
        points.push(from_ms);
        points.sort_unstable();
        points.dedup();
        let mut out: Vec<(u64, u64, Vec<usize>)> = Vec::new();
        for (k, t) in points.iter().enumerate() {
            let down: Vec<usize> = (0..self.nodes.len()).filter(|i| self.down_at(*i, *t)).collect();
            if down.len() > 1 {
                let end = points.get(k + 1).copied().unwrap_or(to_ms);
                out.push((*t, end, down));
            }
        }
        out
    }
}

/// How the service's poll targets group into instances, for the timeline: `instances` instances, target `t`
/// belongs to instance `t % instances` (URLs listed machine by machine, one per instance port), or with one
/// port per machine, each machine is an instance (`per_machine`).
#[derive(Debug, Clone, Copy)]
pub struct ServiceShape {
    pub instances: usize,
    pub per_machine: bool,
}

impl ServiceShape {
    pub fn instance(&self, target: usize) -> usize {
        if self.per_machine {
            target
        } else {
            target % self.instances.max(1)
        }
    }
}

/// "ok" when every attempt succeeded, else "ok/tried".
fn ratio((ok, all): (u32, u32)) -> String {
    if ok == all && all > 0 {
        "ok".into()
    } else {
        format!("{ok}/{all}")
    }
}

/// The run second by second from `from_ms` to `to_ms`: KV writes and reads-after-write (`ok`, or
/// succeeded/tried), service instances that answered at least once (of how many), the lock's holders (as
/// machine names; `-` free), and each machine's state (`B:2.0.0` = up on USR-B running 2.0.0, `boot`,
/// `stop`, `off`). Identical consecutive seconds are folded into one line.
pub fn timeline(c: &Cluster, records: &[Record], svc: ServiceShape, from_ms: u64, to_ms: u64) -> String {
    let w = probe::per_second(records, Kind::Write, from_ms, to_ms);
    let r = probe::per_second(records, Kind::Read, from_ms, to_ms);
    let s = probe::per_second_groups(records, Kind::Service, from_ms, to_ms, |t| svc.instance(t));
    let mut lines: Vec<(u64, String)> = Vec::new();
    for sec in 0..w.len() {
        let end = from_ms + (sec as u64 + 1) * 1000;
        let lock = records
            .iter()
            .rev()
            .find(|x| x.kind == Kind::Lock && x.ok && x.at_ms < end)
            .map(|x| {
                x.detail
                    .split(',')
                    .map(|h| c.node_by_id(h).map(|i| c.nodes[i].name.clone()).unwrap_or_else(|| h.to_string()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_else(|| "?".into());
        let states: Vec<String> = (0..c.nodes.len()).map(|i| node_state(c, i, end)).collect();
        let row = format!(
            "W {:<5} R {:<5} svc {}/{}  lock {:<9} {}",
            ratio(w[sec]),
            ratio(r[sec]),
            s[sec],
            svc.instances,
            lock,
            states.join(" ")
        );
        lines.push((sec as u64, row));
    }
    let mut out = String::from("  second(s)  KV write, read-after-write, service instances answering, lock holders, machines\n");
    let mut k = 0;
    while k < lines.len() {
        let mut j = k;
        while j + 1 < lines.len() && lines[j + 1].1 == lines[k].1 {
            j += 1;
        }
        let span = if j > k { format!("{}-{}", lines[k].0, lines[j].0) } else { lines[k].0.to_string() };
        let _ = writeln!(out, "  {span:>9}  {}", lines[k].1);
        k = j + 1;
    }
    out
}

fn node_state(c: &Cluster, i: usize, at_ms: u64) -> String {
    let mut st = "off".to_string();
    for e in c.events.iter().filter(|e| e.node == i && e.at_ms < at_ms) {
        st = match &e.what {
            What::Started => "boot".into(),
            What::Ready { slot, version } => format!("{}:{version}", slot.trim_start_matches("USR-")),
            What::ShuttingDown => "stop".into(),
            What::Exited { .. } => "off".into(),
        };
    }
    format!("{}={st}", c.nodes[i].name)
}

/// `updateserver serve` inside the cluster's network namespace, listening on the bridge address, and its
/// admin verbs (run in the namespace too).
pub struct UpdateServer {
    child: std::process::Child,
    ns: String,
    /// `http://10.77.0.1:<port>`
    pub url: String,
    pub log: PathBuf,
}

impl UpdateServer {
    pub fn start(net: &TestNet, port: u16, data: &Path, keys: &Path) -> Result<UpdateServer, String> {
        let _ = std::fs::remove_dir_all(data);
        std::fs::create_dir_all(data).map_err(|e| format!("creating {}: {e}", data.display()))?;
        let log = data.with_extension("log");
        let logf = std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let bin = image::release_dir().join("updateserver");
        let child = net
            .exec(&bin.display().to_string())
            .args(["serve", "--listen", &format!("{BRIDGE_ADDR}:{port}"), "--data"])
            .arg(data)
            .arg("--keys")
            .arg(keys)
            .stdout(std::process::Stdio::null())
            .stderr(logf)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let s = UpdateServer { child, ns: net.ns.clone(), url: format!("http://{BRIDGE_ADDR}:{port}"), log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.admin(&["channels"]).is_err() {
            if Instant::now() >= deadline {
                return Err(format!("updateserver did not answer on {}; log {}", s.url, s.log.display()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(s)
    }

    /// `updateserver --server URL --json <args>`; its JSON output.
    pub fn admin(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let bin = image::release_dir().join("updateserver");
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&bin)
            .args(["--server", &self.url, "--json"])
            .args(args)
            .output()
            .map_err(|e| format!("running updateserver: {e}"))?;
        if !out.status.success() {
            return Err(format!("updateserver {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null))
    }

    /// Every machine the server knows, as a list.
    pub fn machines(&self) -> Result<Vec<serde_json::Value>, String> {
        Ok(match self.admin(&["machines"])? {
            serde_json::Value::Array(a) => a,
            serde_json::Value::Object(o) => match o.get("machines") {
                Some(serde_json::Value::Array(a)) => a.clone(),
                Some(serde_json::Value::Object(m)) => m.values().cloned().collect(),
                _ => o.values().cloned().collect(),
            },
            _ => Vec::new(),
        })
    }
}

impl Drop for UpdateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
