//! Over-the-air updates under QEMU: a Keel VM on 1.0.0 talks Omaha to a real `updateserver` on the host's
//! loopback (QEMU user networking: the guest reaches 127.0.0.1 at 10.0.2.2) and updates itself.
//!
//! - an update to 2.0.0: check → download → verify → write slot B → UPDATED_NEED_REBOOT → reboot → B boots,
//!   its health gate blesses it (GPT successful = 1), the server records 3/2 with previousversion 1.0.0;
//! - 3.0.0, whose health gate fails (a required unit fails): the engine reboots by itself, the initramfs skips
//!   the unblessed slot, 1.0.0 runs again and its next check reports 3/0 with error code 44, which halts the
//!   server's group;
//! - the same update on a UEFI machine (OVMF, systemd-boot): B's boot-counted UKI is booted, then blessed;
//! - QEMU killed at random points while 2.0.0 is applied: every restart boots 1.0.0 from slot A, the
//!   download resumes, and the update completes.
//!
//! Images: 1.0.0 (a whole disk), 2.0.0 and 3.0.0 (only USR and the slot-independent UKI, signed into
//! payloads with 256 KiB chunks so the resume point moves every 4 MiB), all trusting one test key. They are
//! built with mkimage/mkpayload into target/keel-tests/update/ and reused while the binaries they come from
//! are unchanged. Boots are direct kernel boots without `keel.usr=`, so the initramfs picks the slot from the
//! GPT bits, exactly as after an update. Each VM has a raw copy of the disk so the test reads the GPT bits.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use keel_model::gpt::{self, SlotBits};
use keel_image::mkimage::Manifest;
use keel_tests::{image, wait_until};
use keel_tests::vm::{self, Disk, Vm, VmOptions};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(90);
const CMD: Duration = Duration::from_secs(30);
const APPLY: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------------------
// Builds, cached while their inputs are unchanged

struct Builds {
    keys: PathBuf,
    v1: Manifest,
    v2_payload: PathBuf,
    v3_payload: PathBuf,
    /// The UKI inside the 2.0.0 payload.
    v2_uki: PathBuf,
}

fn release(name: &str) -> PathBuf {
    image::release_dir().join(name)
}

/// What a cached build depends on: its arguments and every release binary's size and mtime.
fn input_key(args: &[String]) -> String {
    let mut k = args.join(" ");
    for b in ["mkimage", "mkpayload", "init", "initctl", "update-engine", "updatectl", "clusterd", "clusterctl"] {
        if let Ok(m) = std::fs::metadata(release(b)) {
            let t = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
            k.push_str(&format!("\n{b} {} {}.{}", m.len(), t.as_secs(), t.subsec_nanos()));
        }
    }
    k
}

fn run_tool(tool: &str, args: &[String]) -> Result<String, String> {
    let out = Command::new(release(tool)).args(args).output().map_err(|e| format!("running {tool}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `build` unless `stamp` holds `key` already; returns whether it built.
fn cached(stamp: &Path, key: &str, build: impl FnOnce() -> Result<(), String>) -> Result<bool, String> {
    if std::fs::read_to_string(stamp).is_ok_and(|k| k == key) {
        return Ok(false);
    }
    let _ = std::fs::remove_file(stamp);
    build()?;
    std::fs::write(stamp, key).map_err(|e| format!("writing {}: {e}", stamp.display()))?;
    Ok(true)
}

fn build_all() -> Result<Builds, String> {
    let root = image::work_dir("update");
    let keys = root.join("keys");
    let has_key = |d: &Path| std::fs::read_dir(d).is_ok_and(|rd| rd.flatten().any(|e| e.path().extension().is_some_and(|x| x == "key")));
    if !has_key(&keys) {
        run_tool("mkpayload", &["keygen".into(), "--out".into(), keys.display().to_string()])?;
    }
    let secret = std::fs::read_dir(&keys)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "key"))
        .ok_or("no key")?;
    // v3's health gate requires a unit that fails
    let broken = root.join("keel-selftest.service");
    std::fs::write(
        &broken,
        "[Unit]\nDescription=A self test that fails (makes the health gate of this test build fail)\n\n\
         [Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/false\n\n[Install]\nWantedBy=multi-user.target\n",
    )
    .map_err(|e| e.to_string())?;
    let mut payloads = Vec::new();
    let mut ukis = Vec::new();
    let mut v1 = None;
    for (version, extra) in [
        ("1.0.0", vec![]),
        ("2.0.0", vec![]),
        (
            "3.0.0",
            vec![
                "--unit".to_string(),
                broken.display().to_string(),
                "--health-unit".into(),
                "keel-loopback.service".into(),
                "--health-unit".into(),
                "keel-selftest.service".into(),
            ],
        ),
    ] {
        let out = root.join(version);
        let mut args: Vec<String> = vec![
            "--out".into(),
            out.display().to_string(),
            "--os-version".into(),
            version.into(),
            "--update-key".into(),
            keys.display().to_string(),
        ];
        args.extend(extra);
        let key = input_key(&args) + &format!("\nkey {}", secret.display());
        let t = Instant::now();
        std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
        if cached(&out.join(".test-key"), &key, || run_tool("mkimage", &args).map(drop))? {
            eprintln!("keel-tests: built image {version} in {:.1} s", t.elapsed().as_secs_f64());
        }
        let m = Manifest::load(&out).map_err(|e| e.to_string())?;
        if version == "1.0.0" {
            v1 = Some(m);
            continue;
        }
        let payload = root.join(format!("keel-{version}.payload"));
        let pargs: Vec<String> = vec![
            "build".into(),
            "--key".into(),
            secret.display().to_string(),
            "--version".into(),
            version.into(),
            "--channel".into(),
            "stable".into(),
            "--usr".into(),
            m.usr_image.display().to_string(),
            "--kernel".into(),
            m.uki.display().to_string(),
            "--chunk-size".into(),
            "262144".into(),
            "-o".into(),
            payload.display().to_string(),
        ];
        let t = Instant::now();
        if cached(&root.join(format!(".payload-{version}")), &(input_key(&pargs) + &key), || run_tool("mkpayload", &pargs).map(drop))? {
            eprintln!("keel-tests: built payload {version} in {:.1} s", t.elapsed().as_secs_f64());
        }
        payloads.push(payload);
        ukis.push(m.uki.clone());
    }
    let v1 = v1.ok_or("no 1.0.0 image")?;
    let v3_payload = payloads.pop().ok_or("no 3.0.0 payload")?;
    let v2_payload = payloads.pop().ok_or("no 2.0.0 payload")?;
    let v2_uki = ukis.into_iter().next().ok_or("no 2.0.0 UKI")?;
    Ok(Builds { keys, v1, v2_payload, v3_payload, v2_uki })
}

fn builds() -> &'static Builds {
    static B: OnceLock<Result<Builds, String>> = OnceLock::new();
    match B.get_or_init(build_all) {
        Ok(b) => b,
        Err(e) => panic!("building the test images and payloads: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// The update server on the host

struct Server {
    child: Child,
    url: String,
    port: u16,
}

impl Server {
    fn start(name: &str, keys: &Path) -> Server {
        let data = image::work_dir(&format!("update/server-{name}"));
        let _ = std::fs::remove_dir_all(&data);
        let mut child = Command::new(release("updateserver"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(&data)
            .arg("--keys")
            .arg(keys)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start updateserver");
        let err = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(err).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(u) = l.split(" on ").nth(1).filter(|_| l.contains("serving")) {
                        break u.trim().to_string();
                    }
                }
                _ => panic!("updateserver exited before listening"),
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let port = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in the server's URL");
        Server { child, url, port }
    }

    fn admin(&self, args: &[&str]) -> Value {
        let out = Command::new(release("updateserver"))
            .args(["--server", &self.url, "--json"])
            .args(args)
            .output()
            .expect("run updateserver");
        assert!(out.status.success(), "updateserver {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn publish(&self, payload: &Path) {
        self.admin(&["publish", "--channel", "stable", payload.to_str().expect("utf8 path")]);
    }

    /// The machine the server heard from last (tests run one VM per server; a power cut during the very
    /// first boot can lose the fresh /etc/machine-id, and the next boot reports under a new one).
    fn machine(&self) -> Value {
        let mut all = self.machines();
        all.sort_by_key(|m| m["last_seen"].as_u64().unwrap_or(0));
        all.pop().unwrap_or(Value::Null)
    }

    fn machines(&self) -> Vec<Value> {
        let v = self.admin(&["machines"]);
        let list: Vec<Value> = match v {
            Value::Array(a) => a,
            Value::Object(o) => o.get("machines").cloned().map_or_else(
                || o.values().cloned().collect(),
                |m| match m {
                    Value::Array(a) => a,
                    Value::Object(o) => o.values().cloned().collect(),
                    _ => Vec::new(),
                },
            ),
            _ => Vec::new(),
        };
        list
    }

    fn has_event(&self, t: u64, r: u64, pred: impl Fn(&Value) -> bool) -> bool {
        self.machine()["events"]
            .as_array()
            .is_some_and(|ev| ev.iter().any(|e| e["event_type"] == t && e["event_result"] == r && pred(e)))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------------------
// The VM

fn user_data(name: &str, server: &Server, extra: &str) -> PathBuf {
    let p = image::work_dir(&format!("vms/{name}")).join("user-data.yml");
    let text = format!(
        "#cloud-config\nhostname: {name}\nkeel:\n  network:\n    - address: 10.0.2.15/24\n      gateway: 10.0.2.2\n  \
         update:\n    server: http://10.0.2.2:{}/v1/update/\n    group: stable\n    first_check: 1s\n    interval: 30m\n    \
         health_hold: 3s\n{extra}",
        server.port
    );
    std::fs::write(&p, text).expect("write user-data");
    p
}

/// A sparse raw copy of the 1.0.0 disk for VM `name`.
fn fresh_disk(name: &str, m: &Manifest) -> Disk {
    let path = image::work_dir(&format!("vms/{name}")).join("disk.img");
    let _ = std::fs::remove_file(&path);
    let st = Command::new("cp").arg("--sparse=always").arg(&m.image).arg(&path).status().expect("cp");
    assert!(st.success(), "copying {}", m.image.display());
    Disk { path, format: "raw".into() }
}

fn opts(name: &str, disk: &Disk, ud: &Path) -> VmOptions {
    VmOptions {
        image: Some(builds().v1.clone()),
        slot: None, // no keel.usr=: the GPT bits choose, as after an update
        disk: Some(disk.clone()),
        user_data: Some(ud.to_path_buf()),
        user_net: true,
        ..VmOptions::direct(name)
    }
}

fn boot(o: &VmOptions, expect_slot: &str) -> (Vm, Duration) {
    let mut vm = Vm::start(o).expect("start VM");
    vm.wait_for(&format!("USR: {expect_slot}"), BOOT).unwrap_or_else(|e| panic!("expected the initramfs to pick {expect_slot}: {e}"));
    let t = vm.wait_ready(BOOT).unwrap_or_else(|e| panic!("boot never became ready: {e}"));
    (vm, t)
}

fn status(vm: &mut Vm) -> Value {
    let out = vm.run("updatectl status --json", CMD).expect("updatectl status");
    serde_json::from_str(out.stdout.trim()).unwrap_or(Value::Null)
}

/// Polls the engine's status until `pred` holds; returns it with the time it took.
fn wait_status(vm: &mut Vm, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> (Value, Duration) {
    let t = Instant::now();
    let deadline = t + timeout;
    loop {
        let s = status(vm);
        if pred(&s) {
            return (s, t.elapsed());
        }
        assert!(Instant::now() < deadline, "{what} did not happen within {timeout:?}; engine status: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest reboots through init; QEMU runs with -no-reboot, so it exits, and the test starts it again.
fn reboot(mut vm: Vm) -> Duration {
    let t = Instant::now();
    let _ = vm.run("sync; (sleep 0.2; initctl reboot) >/dev/null 2>&1 </dev/null &", CMD);
    vm.wait_exit(Duration::from_secs(60), "QEMU exit after `initctl reboot`").unwrap_or_else(|e| panic!("{e}"));
    t.elapsed()
}

fn slot_bits(disk: &Disk, label: &str) -> SlotBits {
    gpt::Disk::open(&disk.path).expect("read GPT").by_label(label).expect("USR partition").slot()
}

fn os_version(vm: &mut Vm) -> String {
    let out = vm.run("sed -n 's/^VERSION_ID=//p' /usr/lib/os-release", CMD).expect("os-release");
    out.stdout.trim().to_string()
}

/// After the scheduled check installed 2.0.0 into B: the engine waits for a reboot, B is preferred with one
/// try (GPT bits and boot-counted UKI) and the server heard 3/1. Returns the status and how long it took.
fn expect_installed_v2(vm: &mut Vm, disk: &Disk, server: &Server) -> (Value, Duration) {
    let (st, apply) = wait_status(vm, "UPDATED_NEED_REBOOT", APPLY, |s| s["state"] == "UPDATED_NEED_REBOOT");
    assert_eq!(st["new_version"], "2.0.0", "{st}");
    assert_eq!(slot_bits(disk, "USR-B"), SlotBits { priority: 2, tries: 1, successful: false }, "B after install");
    let esp = vm.run("ls /efi/EFI/Linux/", CMD).expect("ls ESP");
    assert!(esp.stdout.contains("keel-2.0.0-usr-b+1-0.efi"), "no boot-counted UKI for B on the ESP: {}", esp.stdout);
    assert!(server.has_event(3, 1, |_| true), "server never saw 3/1: {}", server.machine());
    (st, apply)
}

/// After the reboot into B: it runs 2.0.0, the health gate blesses it (GPT bits and the UKI's plain name) and
/// the server hears 3/2 from previous version 1.0.0. Returns how long the blessing took after boot.
fn expect_blessed_v2(vm: &mut Vm, disk: &Disk, server: &Server) -> Duration {
    assert_eq!(os_version(vm), "2.0.0", "the new slot does not run 2.0.0");
    let (st, bless) = wait_status(vm, "the health gate blessing B", Duration::from_secs(120), |s| s["health"] == "good");
    assert_eq!(st["current_version"], "2.0.0");
    assert_eq!(slot_bits(disk, "USR-B"), SlotBits { priority: 2, tries: 0, successful: true }, "B not blessed in the GPT");
    let esp = vm.run("ls /efi/EFI/Linux/", CMD).expect("ls ESP");
    assert!(esp.stdout.contains("keel-2.0.0-usr-b.efi"), "B's UKI still counts boots after the blessing: {}", esp.stdout);
    wait_until("the server seeing 3/2 with previousversion 1.0.0", Duration::from_secs(30), || {
        server.has_event(3, 2, |e| e["previous_version"] == "1.0.0")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    bless
}

// ---------------------------------------------------------------------------------------------------------
// Tests

#[test]
fn v1_updates_to_v2_reboots_and_blesses_it() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let b = builds();
    // the payload's UKI serves whichever slot it lands in: its command line must not name one
    let section = image::work_dir("update").join("cmdline-2.0.0");
    let st = Command::new("objcopy")
        .args(["-O", "binary", "--only-section=.cmdline"])
        .arg(&b.v2_uki)
        .arg(&section)
        .status()
        .expect("run objcopy (Debian package binutils)");
    assert!(st.success(), "objcopy could not read {}", b.v2_uki.display());
    let cmdline = std::fs::read_to_string(&section).expect("read .cmdline");
    assert!(!cmdline.contains("keel.usr="), "the payload's UKI hard-codes a slot: {cmdline}");
    let server = Server::start("a", &b.keys);
    server.publish(&b.v2_payload);
    let name = "update-a";
    let disk = fresh_disk(name, &b.v1);
    let o = opts(name, &disk, &user_data(name, &server, "    health_timeout: 90s\n"));

    let (mut vm, ready) = boot(&o, "USR-A");
    assert_eq!(os_version(&mut vm), "1.0.0");
    let unit = vm.run("initctl status update-engine.service", CMD).expect("unit status");
    assert!(unit.stdout.contains("running"), "update-engine.service is not running: {}", unit.stdout);
    let (_, download) = wait_status(&mut vm, "the scheduled check starting the download", APPLY, |s| {
        matches!(s["state"].as_str(), Some("DOWNLOADING" | "VERIFYING" | "FINALIZING" | "UPDATED_NEED_REBOOT"))
    });
    let (st, apply) = expect_installed_v2(&mut vm, &disk, &server);
    let bytes = st["bytes_total"].as_u64().unwrap_or(0);

    let rebooted = Instant::now();
    let down = reboot(vm);
    let (mut vm, ready2) = boot(&o, "USR-B");
    let bless = expect_blessed_v2(&mut vm, &disk, &server);
    let reboot_to_blessed = rebooted.elapsed();
    let m = server.machine();
    assert_eq!(m["version"], "2.0.0", "{m}");
    assert_eq!(m["state"], "complete", "{m}");
    eprintln!(
        "keel-tests: update 1.0.0 -> 2.0.0 ({:.1} MiB): ready {:.1} s, check->downloading {:.1} s, apply {:.1} s, \
         reboot {:.1} s, 2.0.0 ready {:.1} s, blessed {:.1} s after ready (hold 3 s); `initctl reboot` to blessed {:.1} s",
        bytes as f64 / 1048576.0,
        ready.as_secs_f64(),
        download.as_secs_f64(),
        apply.as_secs_f64(),
        down.as_secs_f64(),
        ready2.as_secs_f64(),
        bless.as_secs_f64(),
        reboot_to_blessed.as_secs_f64()
    );
    let _ = vm.shutdown(Duration::from_secs(30));
}

/// The same update on a machine that boots through OVMF and systemd-boot instead of direct kernel boot:
/// after the install, systemd-boot finds B's boot-counted UKI on the ESP and boots it (the UKI from the
/// payload names no slot, so the initramfs follows the GPT bits to USR-B), and blessing B gives its UKI the
/// plain name that systemd-boot then always prefers.
#[test]
fn a_uefi_machine_updates_to_v2_through_systemd_boot() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let b = builds();
    let server = Server::start("uefi", &b.keys);
    server.publish(&b.v2_payload);
    let name = "update-uefi";
    let disk = fresh_disk(name, &b.v1);
    let o = VmOptions { uefi: true, ..opts(name, &disk, &user_data(name, &server, "    health_timeout: 90s\n")) };

    let (mut vm, _) = boot(&o, "USR-A");
    assert_eq!(os_version(&mut vm), "1.0.0");
    expect_installed_v2(&mut vm, &disk, &server);
    let vars = vm.vars.clone();
    assert!(vars.is_some(), "a UEFI VM has OVMF vars");
    reboot(vm);

    // The same OVMF variables: systemd-boot must pick B's boot-counted UKI by itself.
    let o = VmOptions { vars, ..o };
    let (mut vm, _) = boot(&o, "USR-B");
    expect_blessed_v2(&mut vm, &disk, &server);
    let _ = vm.shutdown(Duration::from_secs(30));
}

#[test]
fn v3_with_a_failing_health_gate_falls_back_by_itself_and_reports_44() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let b = builds();
    let server = Server::start("b", &b.keys);
    server.publish(&b.v3_payload);
    let name = "update-b";
    let disk = fresh_disk(name, &b.v1);
    // The gate's timeout stays at its default (10 min): a required unit that failed for good must end it.
    let o = opts(name, &disk, &user_data(name, &server, ""));

    let (mut vm, _) = boot(&o, "USR-A");
    let (_, apply) = wait_status(&mut vm, "UPDATED_NEED_REBOOT", APPLY, |s| s["state"] == "UPDATED_NEED_REBOOT");
    reboot(vm);

    // Nobody touches the VM now (the journal tells afterwards what it ran): keel-selftest.service failed for
    // good at boot, so the gate gives up once it has stayed failed for the hold (3 s), long before its timeout,
    // and the engine reboots through init.
    let (mut vm, ready) = boot(&o, "USR-B");
    let t = Instant::now();
    vm.wait_exit(Duration::from_secs(120), "the engine rebooting after the failed health gate").unwrap_or_else(|e| panic!("{e}"));
    let fell = t.elapsed();
    drop(vm);
    assert_eq!(slot_bits(&disk, "USR-B"), SlotBits { priority: 2, tries: 0, successful: false }, "B after its failed try");

    let (mut vm, _) = boot(&o, "USR-A");
    assert_eq!(os_version(&mut vm), "1.0.0", "the fallback boot does not run 1.0.0");
    let waited = wait_until("the server seeing 3/0 with error code 44", Duration::from_secs(60), || {
        server.has_event(3, 0, |e| e["error_code"] == 44)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let m = server.machine();
    assert_eq!(m["state"], "rolled-back", "{m}");
    let groups = server.admin(&["groups"]);
    assert!(groups.to_string().contains("rollback"), "the group was not halted by the rollback: {groups}");
    let (st, _) = wait_status(&mut vm, "the engine's next check being refused", Duration::from_secs(30), |s| s["last_check"].is_u64());
    assert_eq!(slot_bits(&disk, "USR-B").priority, 0, "the failed slot was not cleared: {st}");
    assert_eq!(st["last_error_code"], 44, "{st}");
    assert!(
        st["last_error"].as_str().unwrap_or("").contains("keel-selftest.service"),
        "the fallback boot's status does not say which unit failed the gate: {st}"
    );
    let logs = vm.run("initctl logs --boot=-1 update-engine.service", CMD).expect("previous boot's journal");
    let gate = "health gate failed on USR-B (3.0.0): required unit keel-selftest.service is failed/failed";
    assert!(
        logs.stdout.contains(gate) && logs.stdout.contains("no restart pending"),
        "the failed gate (3.0.0 running, the unit failed for good) is not in the previous boot's journal: {}",
        logs.stdout
    );
    eprintln!(
        "keel-tests: 1.0.0 -> 3.0.0 with a failing gate: apply {:.1} s, 3.0.0 ready {:.1} s, engine rebooted {:.1} s \
         after ready (gate hold 3 s, timeout 10 min), 44 at the server {:.1} s after the fallback boot was ready; last check: {}",
        apply.as_secs_f64(),
        ready.as_secs_f64(),
        fell.as_secs_f64(),
        waited.as_secs_f64(),
        st["last_check_result"]
    );
    let _ = vm.shutdown(Duration::from_secs(30));
}

/// A small xorshift for kill points; the seed is printed (and taken from KEEL_TEST_SEED when set).
fn kill_points() -> (u64, Vec<f64>) {
    let seed = std::env::var("KEEL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7)
    });
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 1000) as f64 / 1000.0
    };
    // three points spread over the apply: early, middle, late
    let mut p = vec![0.05 + 0.25 * next(), 0.35 + 0.25 * next(), 0.7 + 0.25 * next()];
    p.sort_by(|a, b| a.total_cmp(b));
    (seed, p)
}

#[test]
fn killing_qemu_during_apply_always_leaves_a_bootable_machine_that_finishes_the_update() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let b = builds();
    let server = Server::start("c", &b.keys);
    server.publish(&b.v2_payload);
    let name = "update-c";
    let disk = fresh_disk(name, &b.v1);
    // slow the download down so the kill points fall inside the apply
    let o = opts(name, &disk, &user_data(name, &server, "    health_timeout: 90s\n    max_download_rate: 4194304\n"));
    let (seed, points) = kill_points();
    eprintln!("keel-tests: kill points {points:?} of the apply (KEEL_TEST_SEED={seed})");

    let mut vm = boot(&o, "USR-A").0;
    for (i, p) in points.iter().enumerate() {
        let (st, _) = wait_status(&mut vm, &format!("progress {p:.2}"), APPLY, |s| {
            s["progress"].as_f64().unwrap_or(0.0) >= *p || s["state"] == "UPDATED_NEED_REBOOT"
        });
        eprintln!(
            "keel-tests: kill {}: QEMU killed at {} progress {:.3} (resumed from {} bytes)",
            i + 1,
            st["state"],
            st["progress"].as_f64().unwrap_or(0.0),
            st["resumed_from"]
        );
        drop(vm); // kills QEMU: a power cut in the middle of writing slot B
        let bits = slot_bits(&disk, "USR-B");
        assert!(!bits.successful && (bits.priority == 0 || bits.tries == 1), "B after a kill: {bits:?}");
        let expect = if bits.priority == 0 { "USR-A" } else { "USR-B" };
        let (mut v, ready) = boot(&o, expect);
        let ver = os_version(&mut v);
        eprintln!("keel-tests: restart {}: booted {expect} ({ver}) in {:.1} s", i + 1, ready.as_secs_f64());
        if expect == "USR-A" {
            assert_eq!(ver, "1.0.0");
        }
        vm = v;
    }
    let (st, rest) = wait_status(&mut vm, "UPDATED_NEED_REBOOT after the kills", APPLY, |s| {
        s["state"] == "UPDATED_NEED_REBOOT" || s["health"] == "good" && s["current_version"] == "2.0.0"
    });
    eprintln!("keel-tests: the last apply resumed from {} bytes and finished in {:.1} s", st["resumed_from"], rest.as_secs_f64());
    if st["state"] == "UPDATED_NEED_REBOOT" {
        reboot(vm);
        vm = boot(&o, "USR-B").0;
    }
    assert_eq!(os_version(&mut vm), "2.0.0");
    wait_status(&mut vm, "the health gate blessing B", Duration::from_secs(120), |s| s["health"] == "good");
    assert_eq!(slot_bits(&disk, "USR-B"), SlotBits { priority: 2, tries: 0, successful: true });
    wait_until("the server hearing from 2.0.0", Duration::from_secs(30), || server.machine()["version"] == "2.0.0")
        .unwrap_or_else(|e| panic!("{e}"));
    let m = server.machine();
    assert_eq!(m["version"], "2.0.0", "{m}");
    let ids = server.machines().len();
    if ids > 1 {
        eprintln!("keel-tests: NOTE: the server saw {ids} machine ids: a kill during the first boot lost /etc/machine-id");
    }
    let _ = vm.shutdown(Duration::from_secs(30));
}
