//! Boot-time figures for docs/benchmarks.md ("image"): QEMU start → init's "all units ready", direct and
//! UEFI, beside a Debian + systemd rootfs booted with the same kernel and QEMU settings (TCG, -smp 1 -m 512).
//!
//! Ignored by default (≈ 2–3 minutes). Run:
//!   cargo test --release -p keel-tests --test integration -- --ignored --nocapture bench_boot::
//! Baseline: set KEEL_BENCH_DEBIAN_IMG to an ext4 image of
//!   debootstrap --variant=minbase --include=systemd,systemd-sysv,udev,kmod bookworm DIR
//! (mkfs.ext4 -d DIR img 1G); it boots with Debian's own /boot/initrd.img-<kver>, root=/dev/vda.
//! KEEL_BENCH_RUNS sets the runs per configuration (default 3).

use std::path::PathBuf;
use std::time::Duration;

use keel_tests::image;
use keel_tests::vm::{self, Disk, Vm, VmOptions};

const LIMIT: Duration = Duration::from_secs(120);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn runs() -> usize {
    std::env::var("KEEL_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3)
}

fn measure(label: &str, mut opts: impl FnMut(usize) -> VmOptions, markers: &[&str]) -> Vec<f64> {
    let mut times = Vec::new();
    for i in 0..runs() {
        let mut vm = Vm::start(&opts(i)).expect("start VM");
        let (_, t) = vm.wait_for_any(markers, LIMIT).unwrap_or_else(|e| panic!("{label} run {i}: {e}"));
        eprintln!("bench: {label} run {i}: {:.2} s", t.as_secs_f64());
        times.push(t.as_secs_f64());
    }
    times
}

#[test]
#[ignore = "benchmark: boots ~9 VMs, run explicitly (see the file header)"]
fn boot_time_to_ready() {
    let _all = vm::exclusive();
    if !vm::qemu_available() {
        return;
    }
    let m = image::image().expect("image");
    let mut rows = Vec::new();
    let direct = measure("keel direct", |i| VmOptions::direct(&format!("bench-direct-{i}")), vm::READY_MARKERS);
    rows.push(("Keel, direct kernel boot", direct));
    let uefi = measure("keel uefi", |i| VmOptions::uefi(&format!("bench-uefi-{i}")), vm::READY_MARKERS);
    rows.push(("Keel, UEFI (OVMF + systemd-boot + UKI)", uefi));
    if let Some(img) = std::env::var_os("KEEL_BENCH_DEBIAN_IMG") {
        let kernel = PathBuf::from(format!("/boot/vmlinuz-{}", m.kernel_version));
        let initrd = PathBuf::from(format!("/boot/initrd.img-{}", m.kernel_version));
        let deb = measure(
            "debian systemd",
            |i| {
                let dir = image::work_dir(&format!("vms/bench-debian-{i}"));
                let overlay = dir.join("disk.qcow2");
                keel_image::qemu::create_overlay(std::path::Path::new(&img), &overlay).expect("overlay");
                VmOptions {
                    disk: Some(Disk { path: overlay, format: "qcow2".into() }),
                    foreign: Some((
                        kernel.clone(),
                        initrd.clone(),
                        "console=ttyS0 panic=-1 quiet root=/dev/vda rw systemd.show_status=1".into(),
                    )),
                    ..VmOptions::direct(&format!("bench-debian-{i}"))
                }
            },
            &["- Multi-User System."],
        );
        rows.push(("Debian 12 + systemd (minbase), direct boot, to multi-user.target", deb));
    }
    println!("\n| boot (TCG, -smp 1 -m 512) | median s | runs |\n|---|---|---|");
    for (label, t) in &rows {
        println!("| {label} | {:.2} | {} |", median(t.clone()), t.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", "));
    }
    println!(
        "\nimage {:.0} MiB ({:.1} MiB allocated), USR {:.1} MiB, initramfs {:.1} MiB, UKI {:.1} MiB",
        m.image_bytes as f64 / 1048576.0,
        m.image_allocated_bytes as f64 / 1048576.0,
        m.usr_bytes as f64 / 1048576.0,
        m.initrd_bytes as f64 / 1048576.0,
        m.uki_bytes as f64 / 1048576.0
    );
}
