//! Host end-to-end: updateserver + update-engine processes, a file-backed GPT disk and an ESP directory.
//! check → download → verify → write → slot flags; kill mid-write and resume; every refusal reported.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use keel_updater::payload::KeyPair;
use keel_updater::slot::{Slot, SlotBits, Slots};
use serde_json::Value;
use sha2::{Digest, Sha256};

const USR_LEN: usize = 24 << 20;


struct World {
    dir: tempfile::TempDir,
    disk: PathBuf,
    esp: PathBuf,
    keys: PathBuf,
    server: Proc,
    key: KeyPair,
    usr_a_sha: String,
}

fn partition_bytes(disk: &Path, slot: Slot) -> Vec<u8> {
    let d = keel_updater::slot::Disk::open(disk).expect("gpt");
    let p = d.by_label(slot.label()).expect("label");
    let (start, len) = d.byte_range(p);
    let mut buf = vec![0u8; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(d.file(), &mut buf, start).expect("read partition");
    buf
}

fn world() -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = make_disk(dir.path());
    // The running slot A holds a recognisable image.
    {
        let d = keel_updater::slot::Disk::open_rw(&disk).expect("gpt");
        let p = d.by_label("USR-A").expect("usr-a");
        let (start, len) = d.byte_range(p);
        std::os::unix::fs::FileExt::write_all_at(
            d.file(),
            &pseudo_random(len as usize, 1234),
            start,
        )
        .expect("fill A");
    }
    let (esp, key, keys) = booted_esp_and_keys(dir.path());
    let data = dir.path().join("server");
    let server = spawn(
        env!("CARGO_BIN_EXE_updateserver"),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().expect("utf8"),
        ],
        None,
    );
    let usr_a_sha = hex::encode(Sha256::digest(partition_bytes(&disk, Slot::A)));
    World {
        dir,
        disk,
        esp,
        keys,
        server,
        key,
        usr_a_sha,
    }
}

impl World {
    fn publish(&self, payload: &Path) {
        let out = Command::new(env!("CARGO_BIN_EXE_updateserver"))
            .args([
                "--server",
                &self.server.url,
                "publish",
                "--channel",
                "stable",
            ])
            .arg(payload)
            .output()
            .expect("publish");
        assert!(
            out.status.success(),
            "publish failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An engine on a machine that booted `version` from `slot` in boot `boot_id`, plus `extra` flags.
    fn booted(&self, version: &str, slot: &str, boot_id: &str, extra: &[&str]) -> Proc {
        let mut args = vec!["--running-version", version, "--active-slot", slot, "--boot-id", boot_id];
        args.extend_from_slice(extra);
        self.engine(&args)
    }

    fn engine(&self, extra: &[&str]) -> Proc {
        let state = self.dir.path().join("state");
        let server = format!("{}/v1/update/", self.server.url);
        let server = if extra.contains(&"--server") {
            None
        } else {
            Some(server)
        };
        let mut args = vec![];
        if let Some(s) = &server {
            args.extend_from_slice(&["--server", s.as_str()]);
        }
        args.extend_from_slice(&[
            "--disk",
            self.disk.to_str().expect("utf8"),
            "--esp",
            self.esp.to_str().expect("utf8"),
            "--keys",
            self.keys.to_str().expect("utf8"),
            "--state-dir",
            state.to_str().expect("utf8"),
            "--listen",
            "127.0.0.1:0",
            "--machine-id",
            "machine-1",
            "--no-schedule",
        ]);
        args.extend_from_slice(extra);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn(env!("CARGO_BIN_EXE_update-engine"), &refs, None)
    }

    fn machine(&self) -> Value {
        let v: Value = ureq::get(&format!("{}/api/machines", self.server.url))
            .call()
            .expect("machines")
            .into_json()
            .expect("json");
        v.get("machine-1").cloned().unwrap_or(Value::Null)
    }

    fn events(&self) -> Vec<(u64, u64, Option<u64>)> {
        self.machine()["events"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["event_type"].as_u64().unwrap_or(0),
                    e["event_result"].as_u64().unwrap_or(0),
                    e["error_code"].as_u64(),
                )
            })
            .collect()
    }

    fn assert_old_slot_untouched(&self) {
        let now = hex::encode(Sha256::digest(partition_bytes(&self.disk, Slot::A)));
        assert_eq!(now, self.usr_a_sha, "running slot USR-A was modified");
        assert!(
            self.esp.join("EFI/Linux/keel-1.0.0-usr-a.efi").exists(),
            "running slot's UKI disappeared"
        );
    }
}

fn status(engine: &Proc) -> Value {
    ureq::get(&format!("{}/v1/status", engine.url))
        .call()
        .expect("status")
        .into_json()
        .expect("json")
}

fn apply_and_wait(engine: &Proc) -> Value {
    let before = status(engine)["checks"].as_u64().unwrap_or(0);
    ureq::post(&format!("{}/v1/apply", engine.url))
        .call()
        .expect("apply");
    let mut last = Value::Null;
    let done = wait_until(Duration::from_secs(120), || {
        last = status(engine);
        matches!(
            last["state"].as_str(),
            Some("UPDATED_NEED_REBOOT" | "ERROR" | "IDLE")
        ) && last["checks"].as_u64() > Some(before)
    });
    assert!(done, "engine never finished: {last}");
    last
}

#[test]
fn update_end_to_end_then_reboot_and_bless() {
    let w = world();
    let (payload, usr, kernel) = make_payload(w.dir.path(), "1.1.0", &w.key, USR_LEN, 42);
    w.publish(&payload);
    let engine = w.booted("1.0.0", "a", "boot-1", &[]);
    let st = apply_and_wait(&engine);
    assert_eq!(st["state"], "UPDATED_NEED_REBOOT", "{st}");
    // Partition B holds the new image; the UKI is on the ESP with a boot counter; GPT says try B once.
    assert_eq!(
        &partition_bytes(&w.disk, Slot::B)[..usr.len()],
        &usr[..],
        "USR-B content differs from the payload"
    );
    let uki = w.esp.join("EFI/Linux/keel-1.1.0-usr-b+1-0.efi");
    assert_eq!(std::fs::read(&uki).expect("new UKI with counter"), kernel);
    let slots = Slots::new(&w.disk, &w.esp);
    assert_eq!(
        slots.flags(Slot::B).expect("flags"),
        SlotBits {
            priority: 2,
            tries: 1,
            successful: false
        }
    );
    sgdisk_verify_clean(&w.disk);
    w.assert_old_slot_untouched();
    let ev = w.events();
    for want in [(13, 1, None), (14, 1, None), (3, 1, None)] {
        assert!(
            ev.contains(&want),
            "server never got event {want:?}: {ev:?}"
        );
    }
    assert_eq!(w.machine()["state"], "installed");
    drop(engine);

    // "Reboot" into B: the engine starts on the new slot, the health gate passes, B is blessed, 3/2 reported.
    let engine = w.booted(
        "1.1.0", "b", "boot-2",
        &[
            "--health-cmd", "true",
            "--health-hold", "200ms",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(20), || status(&engine)["health"]
            == "good"),
        "health gate never passed: {}",
        status(&engine)
    );
    assert!(
        w.esp.join("EFI/Linux/keel-1.1.0-usr-b.efi").exists(),
        "UKI not blessed"
    );
    assert_eq!(
        slots.flags(Slot::B).expect("flags"),
        SlotBits {
            priority: 2,
            tries: 0,
            successful: true
        }
    );
    assert!(
        wait_until(Duration::from_secs(10), || w.machine()["state"]
            == "complete"),
        "3/2 not reported: {}",
        w.machine()
    );
    let prev = w.machine()["events"]
        .as_array()
        .and_then(|a| a.last().cloned())
        .unwrap_or(Value::Null);
    assert_eq!(prev["previous_version"], "1.0.0", "{prev}");
}

#[test]
fn killed_mid_write_resumes_and_old_slot_is_untouched() {
    let w = world();
    let (payload, usr, _) = make_payload(w.dir.path(), "1.1.0", &w.key, USR_LEN, 43);
    w.publish(&payload);
    let args = ["--max-download-rate", "4000000"];
    let engine = w.booted("1.0.0", "a", "boot-1", &args);
    ureq::post(&format!("{}/v1/apply", engine.url))
        .call()
        .expect("apply");
    let resume = w.dir.path().join("state/resume/resume.json");
    let mid = wait_until(Duration::from_secs(60), || {
        std::fs::read(&resume)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v["next_chunk"].as_u64() > Some(0))
            && status(&engine)["progress"].as_f64() < Some(0.8)
    });
    assert!(
        mid,
        "never saw a checkpoint mid-download: {}",
        status(&engine)
    );
    drop(engine); // SIGKILL
    let saved: Value =
        serde_json::from_slice(&std::fs::read(&resume).expect("resume state")).expect("json");
    // Nothing bootable was left behind, and the header of B is still zero.
    let slots = Slots::new(&w.disk, &w.esp);
    assert_eq!(
        slots.flags(Slot::B).expect("flags").priority,
        0,
        "half-written slot is bootable"
    );
    assert!(
        partition_bytes(&w.disk, Slot::B)[..1 << 20]
            .iter()
            .all(|&b| b == 0),
        "USR-B header visible mid-write"
    );
    w.assert_old_slot_untouched();

    let engine = w.booted("1.0.0", "a", "boot-1", &[]);
    let st = apply_and_wait(&engine);
    assert_eq!(
        st["state"], "UPDATED_NEED_REBOOT",
        "{st}; resume point was {saved}"
    );
    assert!(
        st["resumed_from"].as_u64() > Some(0),
        "second run restarted from zero instead of resuming: {st}"
    );
    assert_eq!(
        &partition_bytes(&w.disk, Slot::B)[..usr.len()],
        &usr[..],
        "USR-B differs after resume"
    );
    assert!(!resume.exists(), "resume state left after success");
    w.assert_old_slot_untouched();
    sgdisk_verify_clean(&w.disk);
}

fn refused(w: &World, payload: &Path, want_code: u64, running: &str, tweak: impl FnOnce(&World)) {
    w.publish(payload);
    tweak(w);
    let engine = w.booted(running, "a", "boot-1", &[]);
    let st = apply_and_wait(&engine);
    assert_eq!(st["state"], "ERROR", "{st}");
    assert_eq!(st["last_error_code"].as_u64(), Some(want_code), "{st}");
    assert!(
        wait_until(Duration::from_secs(5), || w.events().contains(&(
            3,
            0,
            Some(want_code)
        ))),
        "server has no 3/0 event with code {want_code}: {:?}",
        w.events()
    );
    assert_eq!(w.machine()["state"], "error");
    let slots = Slots::new(&w.disk, &w.esp);
    assert_eq!(
        slots.flags(Slot::B).expect("flags").priority,
        0,
        "refused payload left B bootable"
    );
    assert!(
        slots.kernels(Slot::B).expect("kernels").is_empty(),
        "refused payload left a UKI for B"
    );
    w.assert_old_slot_untouched();
    // The group halts after an error report: nobody else gets this update.
    let groups: Value = ureq::get(&format!("{}/api/groups", w.server.url))
        .call()
        .expect("groups")
        .into_json()
        .expect("json");
    assert!(
        groups["stable"]["halted"].is_string(),
        "group not halted after an error: {groups}"
    );
}

#[test]
fn flipped_byte_is_refused_and_reported() {
    let w = world();
    let (payload, _, _) = make_payload(w.dir.path(), "1.1.0", &w.key, USR_LEN, 44);
    let mut b = std::fs::read(&payload).expect("read");
    let n = b.len();
    b[n - 5000] ^= 0x01;
    std::fs::write(&payload, b).expect("write");
    refused(&w, &payload, 10, "1.0.0", |_| {});
}

#[test]
fn wrong_key_is_refused_and_reported() {
    let w = world();
    let (payload, _, _) = make_payload(
        w.dir.path(),
        "1.1.0",
        &KeyPair::from_seed([99; 32]),
        1 << 20,
        45,
    );
    refused(&w, &payload, 12, "1.0.0", |_| {});
}

#[test]
fn truncated_body_is_refused_and_reported() {
    let w = world();
    let (payload, _, _) = make_payload(w.dir.path(), "1.1.0", &w.key, USR_LEN, 46);
    refused(&w, &payload, 9, "1.0.0", |w| {
        let served = w
            .dir
            .path()
            .join("server/payloads")
            .join(payload.file_name().expect("name"));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&served)
            .expect("served payload");
        let len = f.metadata().expect("meta").len();
        f.set_len(len / 2).expect("truncate");
    });
}

#[test]
fn downgrade_is_refused_and_reported() {
    let w = world();
    let (payload, _, _) = make_payload(w.dir.path(), "0.9.0", &w.key, 1 << 20, 47);
    refused(&w, &payload, 20, "1.0.0", |w| {
        ureq::put(&format!("{}/api/groups/stable", w.server.url))
            .send_json(serde_json::json!({ "allow_downgrade": true }))
            .expect("allow downgrade on the server");
    });
}

#[test]
fn failed_boot_falls_back_and_reports_rollback() {
    let w = world();
    let (payload, _, _) = make_payload(w.dir.path(), "1.1.0", &w.key, 1 << 20, 48);
    w.publish(&payload);
    let engine = w.booted("1.0.0", "a", "boot-1", &[]);
    assert_eq!(apply_and_wait(&engine)["state"], "UPDATED_NEED_REBOOT");
    drop(engine);
    // B was tried once, never blessed; systemd-boot counted it down and the machine came back on A.
    std::fs::rename(
        w.esp.join("EFI/Linux/keel-1.1.0-usr-b+1-0.efi"),
        w.esp.join("EFI/Linux/keel-1.1.0-usr-b+0-1.efi"),
    )
    .expect("count down");
    let engine = w.booted("1.0.0", "a", "boot-3", &[]);
    // The next check carries 3/0/44; the server marks the machine rolled back and halts the group.
    ureq::post(&format!("{}/v1/check", engine.url))
        .call()
        .expect("check");
    assert!(
        w.events().contains(&(3, 0, Some(44))),
        "no rollback event: {:?}",
        w.events()
    );
    assert_eq!(w.machine()["state"], "rolled-back");
    let slots = Slots::new(&w.disk, &w.esp);
    assert_eq!(
        slots.flags(Slot::B).expect("flags").priority,
        0,
        "failed slot not cleared"
    );
    w.assert_old_slot_untouched();
}

#[test]
fn updatectl_rollback_switches_slot_without_network() {
    let w = world();
    let (payload, _, _) = make_payload(w.dir.path(), "1.1.0", &w.key, 1 << 20, 49);
    w.publish(&payload);
    let engine = w.booted("1.0.0", "a", "boot-1", &[]);
    assert_eq!(apply_and_wait(&engine)["state"], "UPDATED_NEED_REBOOT");
    drop(engine);
    let engine = w.booted("1.1.0", "b", "boot-2", &["--server", "http://127.0.0.1:9/v1/update/"]);
    assert!(wait_until(Duration::from_secs(10), || status(&engine)
        ["health"]
        == "good"));
    let out = Command::new(env!("CARGO_BIN_EXE_updatectl"))
        .args(["--endpoint", &engine.url, "rollback"])
        .output()
        .expect("updatectl");
    assert!(
        out.status.success(),
        "updatectl rollback failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let slots = Slots::new(&w.disk, &w.esp);
    assert!(
        slots.flags(Slot::A).expect("a").priority > slots.flags(Slot::B).expect("b").priority,
        "A not preferred after rollback"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_updatectl"))
        .args(["--endpoint", &engine.url, "status", "--json"])
        .output()
        .expect("status");
    let v: Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(v["state"], "UPDATED_NEED_REBOOT");
}

#[test]
fn paused_group_is_visible_from_the_machine_and_the_cli() {
    let w = world();
    let (payload, _, _) = make_payload(w.dir.path(), "1.1.0", &w.key, 1 << 20, 50);
    w.publish(&payload);
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_updateserver"))
            .args(["--server", &w.server.url])
            .args(args)
            .output()
            .expect("cli");
        assert!(
            out.status.success(),
            "updateserver {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["pause", "stable"]);
    let engine = w.booted("1.0.0", "a", "boot-1", &[]);
    let st = apply_and_wait(&engine);
    assert_eq!(st["state"], "IDLE", "{st}");
    assert!(
        st["last_check_result"]
            .as_str()
            .unwrap_or("")
            .contains("error-updatesDisabled"),
        "why no update is invisible: {st}"
    );
    let machines = cli(&["machines"]);
    assert!(
        machines.contains("machine-1") && machines.contains("1.0.0"),
        "machines table: {machines}"
    );
    cli(&["resume", "stable"]);
    assert_eq!(apply_and_wait(&engine)["state"], "UPDATED_NEED_REBOOT");
    let channels = cli(&["channels"]);
    assert!(channels.contains("1.1.0"), "channels table: {channels}");
}

/// A stand-in for init's control socket: answers `{"cmd":"list"}` with the given unit states.
fn fake_init(path: &Path, units: std::sync::Arc<std::sync::Mutex<Value>>) {
    let l = std::os::unix::net::UnixListener::bind(path).expect("bind fake init socket");
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut line = String::new();
            let _ = BufReader::new(&c).read_line(&mut line);
            let reply = serde_json::json!({ "type": "units", "units": units.lock().map(|u| u.clone()).unwrap_or(Value::Null) });
            let _ = std::io::Write::write_all(&mut c, format!("{reply}\n").as_bytes());
        }
    });
}

fn unit(name: &str, active: &str, sub: &str) -> Value {
    serde_json::json!({ "name": name, "active": active, "sub": sub })
}

fn installed_world(seed: u64) -> World {
    let w = world();
    let (payload, _, _) = make_payload(w.dir.path(), "1.1.0", &w.key, 1 << 20, seed);
    w.publish(&payload);
    let engine = w.booted("1.0.0", "a", "boot-1", &[]);
    assert_eq!(apply_and_wait(&engine)["state"], "UPDATED_NEED_REBOOT");
    w
}

#[test]
fn health_gate_waits_for_every_required_unit_before_blessing() {
    let w = installed_world(51);
    let units = std::sync::Arc::new(std::sync::Mutex::new(serde_json::json!([
        unit("clusterd.service", "active", "running"),
        unit("web.service", "activating", "start"),
    ])));
    let sock = w.dir.path().join("init.sock");
    fake_init(&sock, units.clone());
    let engine = w.booted(
        "1.1.0", "b", "boot-2",
        &[
            "--init-socket", sock.to_str().expect("utf8"),
            "--health-units", "clusterd.service,web.service",
            "--health-hold", "400ms",
            "--health-timeout", "30s",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(10), || status(&engine)["health"]
            .as_str()
            .unwrap_or("")
            .contains("web.service is activating")),
        "gate does not say which unit it waits for: {}",
        status(&engine)
    );
    let slots = Slots::new(&w.disk, &w.esp);
    assert!(
        !slots.flags(Slot::B).expect("flags").successful,
        "blessed while a required unit was starting"
    );
    *units.lock().expect("lock") = serde_json::json!([
        unit("clusterd.service", "active", "running"),
        unit("web.service", "active", "running")
    ]);
    assert!(
        wait_until(Duration::from_secs(15), || status(&engine)["health"]
            == "good"),
        "never blessed: {}",
        status(&engine)
    );
    assert_eq!(
        slots.flags(Slot::B).expect("flags"),
        SlotBits {
            priority: 2,
            tries: 0,
            successful: true
        }
    );
    assert!(w.esp.join("EFI/Linux/keel-1.1.0-usr-b.efi").exists());
}

/// Boots 1.1.0 on B with `web.service` required and in state `web` forever; returns the engine's status once
/// its gate has failed, after checking that the slot stayed unblessed and kept its boot counter.
fn failing_gate(seed: u64, web: Value, timeout: &str) -> Value {
    let w = installed_world(seed);
    let sock = w.dir.path().join("init.sock");
    fake_init(&sock, std::sync::Arc::new(std::sync::Mutex::new(serde_json::json!([web]))));
    let engine = w.booted(
        "1.1.0", "b", "boot-2",
        &[
            "--init-socket", sock.to_str().expect("utf8"),
            "--health-units", "web.service",
            "--health-hold", "200ms",
            "--health-timeout", timeout,
        ],
    );
    assert!(
        wait_until(Duration::from_secs(15), || status(&engine)["health"]
            == "failed"),
        "{}",
        status(&engine)
    );
    let st = status(&engine);
    assert_eq!(st["state"], "ERROR");
    let slots = Slots::new(&w.disk, &w.esp);
    assert!(
        !slots.flags(Slot::B).expect("flags").successful,
        "failed gate blessed the slot"
    );
    assert!(
        w.esp.join("EFI/Linux/keel-1.1.0-usr-b+1-0.efi").exists(),
        "boot counter removed by a failed gate"
    );
    st
}

#[test]
fn a_required_unit_that_stays_failed_fails_the_gate_long_before_its_timeout() {
    // Timeout 10 min: the gate must give up once the unit has been failed (no restart pending) for the hold.
    let st = failing_gate(52, unit("web.service", "failed", "failed"), "10m");
    let err = st["last_error"].as_str().unwrap_or("");
    assert!(
        err.contains("web.service is failed/failed") && err.contains("no restart pending"),
        "{st}"
    );
}

#[test]
fn a_required_unit_that_never_comes_up_fails_the_gate_at_its_timeout() {
    // Restarting over and over: it might come up, so only the timeout ends the wait.
    let st = failing_gate(53, unit("web.service", "activating", "auto-restart"), "1s");
    let err = st["last_error"].as_str().unwrap_or("");
    assert!(
        err.contains("web.service is activating/auto-restart") && err.contains("gave up after 1s"),
        "{st}"
    );
}
