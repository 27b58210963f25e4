//! Shared fixtures: file-backed GPT disks made with sgdisk, an ESP directory, payload builders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use keel_updater::payload::build::{build_payload, BuildSpec};
use keel_updater::payload::KeyPair;

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 96 MiB disk image: EFI-SYSTEM 8 MiB, USR-A 32 MiB, USR-B 32 MiB, ROOT rest. USR-A is the running
/// slot (priority 1, successful), USR-B empty (priority 0).
pub fn make_disk(dir: &Path) -> PathBuf {
    assert!(
        have("sgdisk"),
        "sgdisk missing: apt-get install gdisk (listed in updater/debian-packages.txt)"
    );
    let disk = dir.join("disk.img");
    let f = std::fs::File::create(&disk).expect("create disk");
    f.set_len(96 << 20).expect("size disk");
    drop(f);
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:+8M", "-c", "1:EFI-SYSTEM", "-t", "1:EF00"])
        .args(["-n", "2:0:+32M", "-c", "2:USR-A"])
        .args(["-n", "3:0:+32M", "-c", "3:USR-B"])
        .args(["-n", "4:0:0", "-c", "4:ROOT"])
        .args(["-A", "2:set:48", "-A", "2:set:56"])
        .arg(&disk));
    disk
}

/// `sgdisk -A N:show` output for partition `n` (1-based), e.g. "2:48:priority bit ..." lines.
pub fn sgdisk_attr_bits(disk: &Path, n: u32) -> Vec<u32> {
    let out = run(Command::new("sgdisk")
        .arg("-A")
        .arg(format!("{n}:show"))
        .arg(disk));
    out.lines()
        .filter_map(|l| {
            let mut it = l.trim().split(':');
            let part: u32 = it.next()?.trim().parse().ok()?;
            let bit: u32 = it.next()?.trim().parse().ok()?;
            (part == n).then_some(bit)
        })
        .collect()
}

pub fn sgdisk_verify_clean(disk: &Path) {
    let out = run(Command::new("sgdisk").arg("-v").arg(disk));
    assert!(
        out.contains("No problems found"),
        "sgdisk -v found problems after our write:\n{out}"
    );
}

pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (i / 4096) % 2 == 0 {
                (x & 0xff) as u8
            } else {
                b'a' + (i % 7) as u8
            }
        })
        .collect()
}

/// Builds a signed payload with a pseudo-random USR image and kernel; returns (payload path, usr, kernel).
pub fn make_payload(
    dir: &Path,
    version: &str,
    key: &KeyPair,
    usr_len: usize,
    seed: u64,
) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let usr = pseudo_random(usr_len, seed);
    let kernel = pseudo_random(200_000, seed + 1);
    let u = dir.join(format!("usr-{version}-{seed}.img"));
    let k = dir.join(format!("uki-{version}-{seed}.efi"));
    std::fs::write(&u, &usr).expect("write usr");
    std::fs::write(&k, &kernel).expect("write kernel");
    let mut spec = BuildSpec::new(version, "stable");
    spec.chunk_size = 256 << 10;
    let out = dir.join(format!("keel-{version}-{seed}.payload"));
    build_payload(&spec, &u, &k, key, &out).expect("build payload");
    (out, usr, kernel)
}

/// Waits for `cond` up to `timeout`, polling.
pub fn wait_until(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    cond()
}

/// A child process killed and reaped on drop, with the URL it said it listens on.
pub struct Proc {
    pub child: std::process::Child,
    pub url: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a binary that prints `... http://ADDR` on stderr once listening; the rest of its stderr goes to
/// `log` when given (appended), else is drained.
pub fn spawn<S: AsRef<std::ffi::OsStr>>(bin: &str, args: &[S], log: Option<PathBuf>) -> Proc {
    use std::io::{BufRead, BufReader, Write};
    let mut child = Command::new(bin)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {bin}: {e}"));
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{bin} exited before listening"))
            .expect("stderr line");
        if let Some(i) = line.find("http://") {
            break line[i..].trim().to_string();
        }
    };
    std::thread::spawn(move || {
        let mut f = log.and_then(|l| std::fs::OpenOptions::new().create(true).append(true).open(l).ok());
        for l in lines.map_while(Result::ok) {
            if let Some(f) = f.as_mut() {
                let _ = f.write_all(format!("{l}\n").as_bytes());
            }
        }
    });
    Proc { child, url }
}

/// The machine under test as version 1.0.0 booted it: an ESP directory holding slot A's kernel image, and the
/// trusted key (a fixed seed, so payloads built by the test verify) written to `<dir>/keys`.
pub fn booted_esp_and_keys(dir: &Path) -> (PathBuf, KeyPair, PathBuf) {
    let esp = dir.join("esp");
    std::fs::create_dir_all(esp.join("EFI/Linux")).expect("esp");
    std::fs::write(esp.join("EFI/Linux/keel-1.0.0-usr-a.efi"), b"uki 1.0.0").expect("uki");
    let key = KeyPair::from_seed([7; 32]);
    let keys = dir.join("keys");
    key.write_to_dir(&keys).expect("keys");
    (esp, key, keys)
}
