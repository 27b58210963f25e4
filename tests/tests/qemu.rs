//! Keel's image booted under QEMU (TCG, -smp 1 -m 512), one VM per host core at a time (`vm::slots`).
//!
//! The image is built by mkimage on first use (≈ 4 s); each test boots fresh overlays of it. Console logs
//! stay in target/keel-tests/vms/<test>/. The whole file takes ≈ 2–3 minutes on the 2-core build machine.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keel_model::gpt::{self, SlotBits};
use keel_tests::{image, readme};
use keel_tests::vm::{self, Vm, VmOptions};

const BOOT: Duration = Duration::from_secs(90);
const CMD: Duration = Duration::from_secs(30);
const DOWN: Duration = Duration::from_secs(30);

fn ready(vm: &mut Vm, how: &str) -> Duration {
    let t = vm.wait_ready(BOOT).unwrap_or_else(|e| panic!("{how} boot never became ready: {e}"));
    eprintln!("keel-tests: {} ({how}) ready {:.2} s after QEMU started", vm.name, t.as_secs_f64());
    t
}

#[test]
fn direct_boot_reaches_ready_with_usr_read_only() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let mut vm = Vm::start(&VmOptions::direct("direct-ready")).expect("start VM");
    ready(&mut vm, "direct");

    let mounts = vm.run("grep ' /usr ' /proc/mounts", CMD).expect("read mounts");
    assert!(mounts.stdout.contains("erofs ro"), "/usr is not a read-only erofs: {mounts:?}");
    let write = vm.run("touch /usr/keel-test-write", CMD).expect("try a write");
    assert_ne!(write.code, 0, "writing to /usr succeeded: {write:?}");
    assert!(write.stdout.contains("Read-only file system"), "unexpected error for a /usr write: {write:?}");

    let env = vm.run("cat /run/keel/boot.env", CMD).expect("boot.env");
    assert!(env.stdout.contains("KEEL_USR=USR-A"), "initramfs did not record slot A: {env:?}");
    let units = vm.run("initctl list", CMD).expect("initctl list");
    assert_eq!(units.code, 0, "initctl cannot talk to init: {units:?}");
    assert!(units.stdout.contains("keel-debug-shell.service"), "image units missing from initctl list: {units:?}");
    let code = vm.run("echo out; echo err >&2; exit 3", CMD).expect("exit code");
    assert_eq!(code, vm::Output { stdout: "out\nerr\n".into(), code: 3 });
    assert!(vm.shutdown(DOWN).expect("shutdown"), "QEMU did not exit after poweroff");
}

#[test]
fn uefi_boot_reaches_ready_through_systemd_boot() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let mut vm = Vm::start(&VmOptions::uefi("uefi-ready")).expect("start VM");
    ready(&mut vm, "UEFI");
    let cmdline = vm.run("cat /proc/cmdline", CMD).expect("cmdline");
    assert!(cmdline.stdout.contains("keel.usr=USR-A"), "UEFI did not boot the USR-A UKI: {cmdline:?}");
    let efi = vm.run("test -d /sys/firmware/efi", CMD).expect("efi check");
    assert_eq!(efi.code, 0, "no /sys/firmware/efi: not booted through UEFI");
    vm.shutdown(DOWN).expect("shutdown");
}

#[test]
fn a_file_on_root_persists_across_reboot() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let mut first = Vm::start(&VmOptions::direct("persist")).expect("start VM");
    ready(&mut first, "first");
    let stamp = format!("keel-{}", std::process::id());
    let w = first
        .run(&format!("mkdir -p /var/lib/keel-test && echo {stamp} > /var/lib/keel-test/stamp && sync"), CMD)
        .expect("write stamp");
    assert_eq!(w.code, 0, "cannot write on ROOT: {w:?}");
    let disk = first.disk.clone();
    first.shutdown(DOWN).expect("shutdown");

    let mut second = Vm::start(&VmOptions { disk: Some(disk), ..VmOptions::direct("persist") }).expect("restart VM");
    ready(&mut second, "second");
    let r = second.run("cat /var/lib/keel-test/stamp", CMD).expect("read stamp");
    assert_eq!(r.stdout.trim(), stamp, "ROOT lost the file written before the reboot: {r:?}");
    second.shutdown(DOWN).expect("shutdown");
}

#[test]
fn slot_b_with_tries_exhausted_falls_back_to_a_by_gpt_bits() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let disk = vm::raw_copy("gpt-fallback").expect("copy image");
    // an updated slot B, one try left, not yet blessed, preferred over A
    gpt::set_slot_bits(&disk.path, "USR-B", SlotBits { priority: 2, tries: 1, successful: false }).expect("set bits");
    let opts = VmOptions { slot: None, disk: Some(disk.clone()), ..VmOptions::direct("gpt-fallback") };

    let mut first = Vm::start(&opts).expect("start VM");
    first.wait_for("USR: USR-B", BOOT).expect("first boot takes slot B (priority 2, one try)");
    first.wait_for("USR-B: boot attempt counted, tries left 0", BOOT).expect("the try is counted");
    ready(&mut first, "B, unblessed");
    drop(first); // power cut: B never gets blessed

    let t = gpt::Disk::open(&disk.path).expect("read GPT");
    let b = t.by_label("USR-B").expect("USR-B").slot();
    assert_eq!(b, SlotBits { priority: 2, tries: 0, successful: false }, "tries not written back to the GPT");

    let mut second = Vm::start(&opts).expect("restart VM");
    second.wait_for("USR: USR-A (/dev/vda2, chosen by GPT priority)", BOOT).expect("second boot falls back to A");
    ready(&mut second, "fallback to A");
}

/// A damaged primary GPT (LBA 1 zeroed, as by a stray write): Linux then creates no partition devices (it reads
/// the backup only with `gpt` on its command line), so the initramfs rebuilds the primary from the backup (as the
/// UEFI spec asks), has the kernel re-read the partitions, and boots by the backup's slot bits.
#[test]
fn a_damaged_primary_gpt_boots_from_the_backup_copy_and_is_rebuilt() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let disk = vm::raw_copy("gpt-backup").expect("copy image");
    gpt::set_slot_bits(&disk.path, "USR-B", SlotBits { priority: 2, tries: 1, successful: false }).expect("set bits");
    let sector = gpt::Disk::open(&disk.path).expect("read GPT").sector_size();
    let f = std::fs::OpenOptions::new().write(true).open(&disk.path).expect("open copy");
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; sector as usize], sector).expect("zero the primary header");
    drop(f);
    assert!(gpt::Disk::open(&disk.path).expect("the backup copy reads").used_backup());
    let opts = VmOptions { slot: None, disk: Some(disk.clone()), ..VmOptions::direct("gpt-backup") };

    let mut vm = Vm::start(&opts).expect("start VM");
    vm.wait_for("the primary GPT copy was damaged: rebuilt from the backup, partitions re-read", BOOT)
        .expect("the initramfs rebuilds the primary");
    vm.wait_for("USR: USR-B", BOOT).expect("the backup's bits choose B (priority 2, one try)");
    vm.wait_for("USR-B: boot attempt counted, tries left 0", BOOT).expect("the try is counted");
    ready(&mut vm, "from the backup GPT");
    drop(vm); // power cut before anything could bless B

    let d = gpt::Disk::open(&disk.path).expect("read GPT");
    assert!(!d.damaged(), "the primary GPT was not rebuilt");
    let b = d.by_label("USR-B").expect("USR-B").slot();
    assert_eq!(b, SlotBits { priority: 2, tries: 0, successful: false }, "the counted try is not in the GPT");
}

fn esp_rename(disk: &Path, from: &str, to: &str) {
    let img = format!("{}@@1048576", disk.display());
    let out = Command::new("mmove")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", &img, &format!("::/EFI/Linux/{from}"), &format!("::/EFI/Linux/{to}")])
        .output()
        .expect("run mmove (Debian package mtools)");
    assert!(out.status.success(), "mmove {from} {to}: {}", String::from_utf8_lossy(&out.stderr));
}

fn esp_list(disk: &Path) -> String {
    let img = format!("{}@@1048576", disk.display());
    let out = Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-b", "-i", &img, "::/EFI/Linux"])
        .output()
        .expect("run mdir (Debian package mtools)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn uefi_boot_counting_falls_back_to_a_when_b_is_never_blessed() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let m = image::image().expect("image");
    let disk = vm::raw_copy("uefi-fallback").expect("copy image");
    // slot B as the updater leaves it: one try, newest entry; GPT bits mirror it
    esp_rename(&disk.path, &format!("keel-{}-usr-b+0-0.efi", m.version), &format!("keel-{}-usr-b+1-0.efi", m.version));
    gpt::set_slot_bits(&disk.path, "USR-B", SlotBits { priority: 2, tries: 1, successful: false }).expect("set bits");
    let opts = VmOptions { disk: Some(disk.clone()), ..VmOptions::uefi("uefi-fallback") };

    let mut first = Vm::start(&opts).expect("start VM");
    first.wait_for("USR: USR-B", BOOT).expect("systemd-boot picks B while it has a try left");
    ready(&mut first, "UEFI B");
    let vars = first.vars.clone();
    drop(first);
    let listing = esp_list(&disk.path);
    assert!(listing.contains("usr-b+0-1.efi"), "systemd-boot did not count the try: {listing}");

    let mut second = Vm::start(&VmOptions { vars, ..opts }).expect("restart VM");
    second.wait_for("USR: USR-A", BOOT).expect("systemd-boot falls back to A");
    ready(&mut second, "UEFI fallback to A");
}

fn user_data(name: &str, text: &str) -> std::path::PathBuf {
    let p = image::work_dir(&format!("vms/{name}")).join("user-data.yml");
    std::fs::write(&p, text).expect("write user-data");
    p
}

#[test]
fn cloud_config_from_fw_cfg_sets_hostname_and_starts_a_unit() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let ud = user_data(
        "cloud-config",
        "#cloud-config\nhostname: keel-test-1\nkeel:\n  units:\n    - name: hello.service\n      content: |\n        \
         [Service]\n        ExecStart=/usr/bin/sh -c 'echo hello-from-cloud-config > /run/hello; exec sleep 100000'\n      \
         command: start\n",
    );
    let mut vm = Vm::start(&VmOptions { user_data: Some(ud), ..VmOptions::direct("cloud-config") }).expect("start VM");
    ready(&mut vm, "cloud-config");
    let h = vm.run("hostname", CMD).expect("hostname");
    assert_eq!(h.stdout.trim(), "keel-test-1", "cloud-config hostname not applied: {h:?}");
    let mut last = None;
    for _ in 0..50 {
        let r = vm.run("cat /run/hello", CMD).expect("read /run/hello");
        if r.code == 0 {
            last = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = last.expect("hello.service from cloud-config never wrote /run/hello");
    assert_eq!(r.stdout.trim(), "hello-from-cloud-config");
    vm.shutdown(DOWN).expect("shutdown");
}

#[test]
fn malformed_cloud_config_is_reported_and_the_machine_still_boots() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let ud = user_data("bad-cloud-config", "#cloud-config\nhostname: [unclosed\nwrite_files: 3\n");
    let mut vm =
        Vm::start(&VmOptions { user_data: Some(ud), ..VmOptions::direct("bad-cloud-config") }).expect("start VM");
    vm.wait_for("user-data:", BOOT).expect("the console names the bad user-data with line and column");
    ready(&mut vm, "malformed cloud-config");
    let c = vm.console();
    assert!(
        c.lines().any(|l| l.contains("user-data:2:") || l.contains("user-data:3:")),
        "no line:column in the report:\n{c}"
    );
    vm.shutdown(DOWN).expect("shutdown");
}

#[test]
fn a_corrupt_usr_slot_is_named_on_the_console_with_a_way_out() {
    use std::io::{Seek, SeekFrom, Write};
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let disk = vm::raw_copy("corrupt-usr").expect("copy image");
    let t = gpt::Disk::open(&disk.path).expect("read GPT");
    let a = t.by_label("USR-A").expect("USR-A");
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk.path).expect("open copy");
    f.seek(SeekFrom::Start(t.byte_range(a).0)).expect("seek");
    f.write_all(&vec![0u8; 64 * 1024]).expect("zero the erofs superblock");
    drop(f);
    let mut vm = Vm::start(&VmOptions { disk: Some(disk), ..VmOptions::direct("corrupt-usr") }).expect("start VM");
    vm.wait_for("USR-A (/dev/vda2) cannot be mounted as erofs", BOOT).expect("the failure names the slot");
    vm.wait_for("keel.usr=USR-B", BOOT).expect("the message says how to boot the other slot");
    vm.wait_for("rescue shell", BOOT).expect("a rescue shell is offered");
}

#[test]
fn clusterd_from_the_image_serves_the_kv_api_when_cloud_config_starts_it() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let m = image::image().expect("image");
    let ud = image::workspace().join("image/examples/single-node.yml");
    let mut vm = Vm::start(&VmOptions { user_data: Some(ud), ..VmOptions::direct("single-node") }).expect("start VM");
    ready(&mut vm, "single-node");
    let has = vm.run("test -x /usr/bin/clusterd", CMD).expect("clusterd present");
    if has.code != 0 {
        eprintln!("keel-tests: clusterd not built into {}; nothing to check", m.image.display());
        return;
    }
    // clusterd.service is Type=notify and clusterd says READY=1 once it listens, so init's "ready" (all units
    // active) already means the API answers (no retry for that); a healthy member (a leader, its attributes
    // published through Raft) follows within moments.
    let version = vm.run("wget -q -O - http://127.0.0.1:2379/version 2>&1", CMD).expect("probe clusterd");
    let status = vm.run("initctl status clusterd.service", CMD).map(|o| o.stdout).unwrap_or_default();
    assert_eq!(version.code, 0, "clusterd did not answer on 127.0.0.1:2379 when init said ready ({version:?}):\n{status}");
    assert!(status.contains("active (running)"), "{status}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let h = vm.run("wget -q -O - http://127.0.0.1:2379/health 2>&1", CMD).expect("probe clusterd");
        if h.stdout.contains("\"health\":\"true\"") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "clusterd never became healthy: {h:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    vm.shutdown(DOWN).expect("shutdown");
}

#[test]
fn root_grows_to_fill_a_larger_disk_on_first_boot() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let disk = vm::raw_copy("grow").expect("copy the image");
    let before = std::fs::metadata(&disk.path).expect("disk").len();
    std::fs::OpenOptions::new().write(true).open(&disk.path).expect("open disk").set_len(before + (512 << 20)).expect("grow disk file");
    let mut v = Vm::start(&VmOptions { disk: Some(disk.clone()), ..VmOptions::direct("grow") }).expect("start VM");
    ready(&mut v, "grown disk");
    let df = v.run("df -k / | tail -n 1", CMD).expect("df");
    let total_kib: u64 = df.stdout.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
    assert!(total_kib > 600 * 1024, "ROOT (256 MiB in the image) did not grow into the extra 512 MiB: {df:?}\n{}", v.console());
    assert!(v.console().contains("ROOT extended"), "the grow is reported on the console");
    v.shutdown(DOWN).expect("shutdown");
    let check = Command::new("sgdisk").arg("-v").arg(&disk.path).output().expect("sgdisk -v");
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.contains("No problems found"), "both GPT copies valid after the grow:\n{text}");
}

#[test]
fn two_vms_on_a_test_bridge_reach_each_other_with_cloud_config_addresses() {
    let _vms = vm::slots(2);
    if !vm::qemu_available() {
        return;
    }
    let mut net = keel_tests::net::TestNet::new().expect("test network namespace");
    let mut vms = Vec::new();
    let mut addrs = Vec::new();
    for i in 1..=2 {
        let (tap, mac, addr) = net.add_vm().expect("tap");
        let ud = user_data(
            &format!("net{i}"),
            &format!("#cloud-config\nhostname: net{i}\nkeel:\n  network:\n    - interface: eth0\n      address: {addr}/24\n      gateway: {}\n", keel_tests::net::BRIDGE_ADDR),
        );
        let opts = VmOptions { user_data: Some(ud), tap: Some((net.ns.clone(), tap, mac)), ..VmOptions::direct(&format!("net{i}")) };
        vms.push(Vm::start(&opts).expect("start VM"));
        addrs.push(addr);
    }
    for (i, v) in vms.iter_mut().enumerate() {
        ready(v, &format!("net{}", i + 1));
    }
    let ping = vms[0].run(&format!("ping -c 1 -W 5 {}", addrs[1]), CMD).expect("ping from VM 1");
    assert_eq!(ping.code, 0, "VM 1 cannot reach VM 2 on the bridge: {ping:?}\n{}", vms[1].console());
    let from_ns = net.exec("busybox").args(["ping", "-c", "1", "-W", "5", &addrs[0]]).output().expect("ping from the namespace");
    assert!(from_ns.status.success(), "the bridge cannot reach VM 1: {}", String::from_utf8_lossy(&from_ns.stdout));
    let st = vms[1].run("initctl status keel-network.service", CMD).expect("status");
    assert!(st.stdout.contains("active"), "{st:?}");
    for v in vms {
        v.shutdown(DOWN).expect("shutdown");
    }
}

#[test]
fn cloud_config_from_a_nocloud_cidata_disk_is_applied() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let dir = image::work_dir("vms/cidata");
    let ud = dir.join("user-data");
    std::fs::write(&ud, "#cloud-config\nhostname: from-cidata\nwrite_files:\n  - path: /etc/keel-cidata-test\n    content: nocloud\n").expect("user-data");
    std::fs::write(dir.join("meta-data"), "instance-id: keel-test\nlocal-hostname: from-cidata\n").expect("meta-data");
    let disk = dir.join("cidata.img");
    let _ = std::fs::remove_file(&disk);
    let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    assert!(ok(Command::new("mkfs.vfat").args(["-n", "CIDATA", "-C"]).arg(&disk).arg("2048")), "mkfs.vfat (dosfstools)");
    for f in ["user-data", "meta-data"] {
        assert!(ok(Command::new("mcopy").arg("-i").arg(&disk).arg(dir.join(f)).arg(format!("::{f}"))), "mcopy {f} (mtools)");
    }
    let mut v = Vm::start(&VmOptions { extra_disks: vec![disk], ..VmOptions::direct("cidata") }).expect("start VM");
    ready(&mut v, "cidata");
    assert!(v.console().contains("applying cloud-config from NoCloud disk"), "{}", v.console());
    let h = v.run("hostname; cat /etc/keel-cidata-test", CMD).expect("run");
    assert_eq!(h.stdout.split_whitespace().collect::<Vec<_>>(), ["from-cidata", "nocloud"], "{h:?}");
    v.shutdown(DOWN).expect("shutdown");
}

/// The README's five-minute tour, read from README.md and typed line by line at the root prompt of the VM that
/// `make run` boots (single-node cloud-config), so the tour cannot drift from what the image does. Each line must
/// exit 0, or the code its comment names ("exits 1"); a line that fails is retried for a while, as a person
/// would, because the tour's order (start a unit, then read its journal) leaves work in flight. `initctl reboot`
/// goes last and must take the machine down (QEMU runs with -no-reboot).
#[test]
fn the_readme_tour_runs_as_written_on_the_make_run_machine() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let tour = readme::sh_block(&readme::read(&image::workspace()), "## A five-minute tour");
    assert!(tour.len() >= 10, "no tour found in README.md under '## A five-minute tour': {tour:?}");
    let ud = image::workspace().join("image/examples/single-node.yml");
    let mut vm = Vm::start(&VmOptions { user_data: Some(ud), ..VmOptions::direct("readme-tour") }).expect("start VM");
    ready(&mut vm, "make run");
    // The user's own cloud-config that the tour checks offline.
    let prep = vm.run("mkdir -p /root/tour && printf '#cloud-config\\nhostname: tour\\n' > /root/tour/my-user-data.yml", CMD);
    assert_eq!(prep.expect("prepare").code, 0);
    // (line prefix, text its output must contain): what the tour's comments promise.
    let promises = [
        ("cat /etc/os-release", "erofs (ro"),
        ("cat /etc/os-release", "Keel"),
        ("wget -qO- 127.0.0.1:2379/v2/keys/message", "\"value\":\"hello\""),
        ("fleetctl journal hi.service", "hi"),
        ("initctl run --rm busybox ps", "1 root"),
        ("initctl run --rm --net private", "\"value\":\"hello\""),
        ("initctl run --rm --net private", "401"),
        ("initctl status clusterd.servce", "did you mean clusterd.service?"),
        ("initctl logs -n 20 clusterd.service", "serving clients"),
    ];
    for line in tour.iter().filter(|l| !l.starts_with("initctl reboot")) {
        let want_code = readme::expected_code(line);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let out = loop {
            let out = vm.run(&format!("cd /root/tour && {line}"), CMD).unwrap_or_else(|e| panic!("tour line {line:?}: {e}"));
            if out.code == want_code || std::time::Instant::now() >= deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        eprintln!("keel-tests: tour $ {line}\n{}", out.stdout.trim_end());
        assert_eq!(out.code, want_code, "README tour line {line:?} exited {} (want {want_code}):\n{}", out.code, out.stdout);
        for (_, text) in promises.iter().filter(|(p, _)| line.starts_with(p)) {
            assert!(out.stdout.contains(text), "README tour line {line:?} printed no {text:?}:\n{}", out.stdout);
        }
    }
    let reboot = tour.iter().find(|l| l.starts_with("initctl reboot")).expect("the tour ends with initctl reboot");
    let _ = vm.run(&format!("(\n{reboot}\n) >/dev/null 2>&1 </dev/null &"), CMD);
    vm.wait_exit(DOWN, &format!("`{reboot}` taking the machine down")).unwrap_or_else(|e| panic!("{e}"));
}

/// `keelvm run` twice on the same output directory (say `make run` in a second terminal): the second is refused
/// with a message saying what to do, and the running VM keeps its disk (even with `--fresh`) and its debug
/// shell, which used to be unlinked from under it.
#[test]
fn a_second_keelvm_run_on_the_same_out_dir_is_refused_and_the_running_vm_keeps_its_disk_and_shell() {
    let _vm = vm::slots(1);
    if !vm::qemu_available() {
        return;
    }
    let m = image::image().expect("image");
    let out = image::work_dir("vms/keelvm-twice");
    let _ = std::fs::remove_dir_all(out.join("vm"));
    let manifest = m.image.parent().expect("image dir").join("keel.json");
    std::fs::copy(&manifest, out.join("keel.json")).expect("copy keel.json");
    let keelvm = image::release_dir().join("keelvm");
    let console = std::fs::File::create(out.join("console.log")).expect("console log");
    let mut first = KillOnDrop(
        Command::new(&keelvm)
            .args(["run", "--fresh", "--out"])
            .arg(&out)
            .stdin(std::process::Stdio::piped()) // the console stays open, as a terminal would
            .stdout(console.try_clone().expect("dup"))
            .stderr(console)
            .spawn()
            .expect("keelvm run"),
    );
    let log = || std::fs::read_to_string(out.join("console.log")).unwrap_or_default();
    let deadline = std::time::Instant::now() + BOOT;
    while !log().contains("all units ready") {
        assert!(first.0.try_wait().expect("wait").is_none(), "the first keelvm run exited:\n{}", log());
        assert!(std::time::Instant::now() < deadline, "the first VM never became ready:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let disk = out.join("vm/disk.qcow2");
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("stat"));
    let (disk_before, sock_before) = (inode(&disk), inode(&out.join("vm/shell.sock")));

    let mut second = KillOnDrop(
        Command::new(&keelvm)
            .args(["run", "--fresh", "--out"])
            .arg(&out)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("second keelvm run"),
    );
    let deadline = std::time::Instant::now() + CMD;
    let status = loop {
        if let Some(st) = second.0.try_wait().expect("wait") {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "a second keelvm run on the same --out started another VM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.0.stderr.take().expect("stderr"), &mut err).expect("read stderr");
    assert!(!status.success(), "a second keelvm run on the same --out succeeded: {err}");
    assert!(err.contains("already running") && err.contains("keelvm shell"), "the refusal does not say what to do: {err}");
    assert_eq!(inode(&disk), disk_before, "the running VM's disk was replaced");
    assert_eq!(inode(&out.join("vm/shell.sock")), sock_before, "the running VM's shell socket was replaced");
    let print = Command::new(&keelvm).args(["print", "--fresh", "--out"]).arg(&out).output().expect("keelvm print");
    assert!(print.status.success(), "keelvm print: {}", String::from_utf8_lossy(&print.stderr));
    assert_eq!(inode(&disk), disk_before, "keelvm print --fresh replaced the disk");

    let mut shell = Command::new(&keelvm)
        .args(["shell", "--socket"])
        .arg(out.join("vm/shell.sock"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("keelvm shell");
    let mut stdin = shell.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, b"echo shell-$((6*7)); initctl poweroff\n").expect("type into the shell");
    let deadline = std::time::Instant::now() + DOWN;
    while first.0.try_wait().expect("wait").is_none() {
        assert!(std::time::Instant::now() < deadline, "the VM did not power off from its debug shell:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(stdin);
    let _ = shell.kill();
    let said = shell.wait_with_output().expect("shell output");
    assert!(String::from_utf8_lossy(&said.stdout).contains("shell-42"), "the debug shell did not answer");
    // Once the first VM is gone the directory is free again.
    let lock = std::fs::OpenOptions::new().write(true).open(out.join("vm/lock")).expect("vm/lock");
    assert!(lock.try_lock().is_ok(), "out/vm/lock is still held after QEMU exited");
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
