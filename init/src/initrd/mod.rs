//! Init's initramfs mode: from the kernel's hand-off to `exec` of the real init on the real root.
//!
//! Owns, in order: mounting /proc, /sys, /dev, /run in the initramfs; loading the modules that reach the disk
//! (`/etc/keel/initrd-modules`, dependencies from `modules.dep` + soft deps, see `modload`); reading the
//! command line (`cmdline`); finding the disk and its GPT (`gpt`); choosing the USR slot (`keel.usr=`
//! first, else the GPT priority/tries/successful bits, counting a try down); mounting ROOT (ext4, rw) at
//! /sysroot and USR (erofs, ro) at /sysroot/usr; seeding /etc from /usr/share/factory/etc on a fresh ROOT;
//! loading the rest of USR's modules (`/usr/lib/modules-load.d/*.conf`); recording the choice in
//! /run/keel/boot.env; moving the mounts and switching root (chroot + exec of `keel.init=`, default
//! /usr/bin/init). On any failure it says which partition and what to do, then opens a busybox rescue shell
//! when the initramfs has one (exit it to retry), else waits and retries.
//! Does not: supervise anything, apply cloud-config, or bless a slot — that is init proper and the updater.
//!
//! Init calls [`run`] when it is PID 1 in an initramfs (`/etc/initrd-release` exists) or gets `--initrd`.

pub mod cmdline;
pub mod gpt;
mod grow;
pub mod modload;

use std::convert::Infallible;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use rustix::mount::{mount, mount_move, MountFlags};

use cmdline::{Cmdline, PartRef};

/// Printed first; mkimage looks for these bytes to know an init binary has initramfs mode.
pub const BANNER: &str = "keel-initrd-mode";

/// Where the rescue shell lives in the initramfs (mkimage puts busybox there).
const BUSYBOX: &str = "/usr/bin/busybox";

/// A failure the console message explains; the boot is retried after the rescue shell or a pause.
#[derive(Debug)]
struct Fatal {
    what: String,
    hint: String,
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\n  what to do: {}", self.what, self.hint)
    }
}

fn fatal(what: impl Into<String>, hint: impl Into<String>) -> Fatal {
    Fatal { what: what.into(), hint: hint.into() }
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into())
}

fn log(msg: &str) {
    println!("keel initrd: [{:>7}] {msg}", uptime());
}

/// The disk and partition device chosen for one boot.
#[derive(Debug, Clone)]
struct Found {
    disk: String,
    usr: gpt::Partition,
    usr_dev: PathBuf,
    root_dev: PathBuf,
    source: &'static str,
}

/// Run initramfs mode. Returns only an error that even the retry loop cannot handle (never, in practice).
pub fn run() -> anyhow::Result<Infallible> {
    mount_early();
    let kernel = rustix::system::uname().release().to_string_lossy().into_owned();
    log(&format!("{BANNER}: Keel initramfs on kernel {kernel}"));
    let cmd = Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if cmd.debug {
        log(&format!("command line: {cmd:?}"));
    }
    if cmd.rescue {
        log("keel.rescue on the command line: rescue shell before mounting anything");
        rescue_shell();
    }
    let t0 = Instant::now();
    let modroot = PathBuf::from(format!("/usr/lib/modules/{kernel}"));
    load_modules(&modroot, &modload::read_list(Path::new("/etc/keel/initrd-modules")), cmd.debug);
    log(&format!("initramfs modules loaded in {} ms", t0.elapsed().as_millis()));
    loop {
        match boot_once(&cmd, &kernel) {
            Ok(never) => match never {},
            Err(f) => {
                log(&format!("FATAL: {f}"));
                if Path::new(BUSYBOX).exists() {
                    log("starting a rescue shell; exit it to retry the boot");
                    rescue_shell();
                } else {
                    log("no rescue shell in this initramfs; retrying in 5 s");
                    std::thread::sleep(Duration::from_secs(5));
                }
                // undo partial mounts before the retry
                let _ = rustix::mount::unmount("/sysroot/usr", rustix::mount::UnmountFlags::DETACH);
                let _ = rustix::mount::unmount("/sysroot", rustix::mount::UnmountFlags::DETACH);
            }
        }
    }
}

fn mount_early() {
    let nosuid = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    for (src, target, fs, flags, data) in [
        ("proc", "/proc", "proc", nosuid, ""),
        ("sysfs", "/sys", "sysfs", nosuid, ""),
        ("devtmpfs", "/dev", "devtmpfs", MountFlags::NOSUID, "mode=0755"),
        ("tmpfs", "/run", "tmpfs", MountFlags::NOSUID | MountFlags::NODEV, "mode=0755"),
    ] {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(src, target, fs, flags, data) {
            if e != rustix::io::Errno::BUSY {
                // the console is all we have; say it and go on (later steps report what breaks)
                println!("keel initrd: cannot mount {fs} on {target}: {e}");
            }
        }
    }
}

fn load_modules(root: &Path, list: &[String], debug: bool) {
    if list.is_empty() {
        return;
    }
    let db = match modload::ModuleDb::load(root) {
        Ok(db) => db,
        Err(e) => {
            log(&format!("cannot read {}/modules.dep: {e}; not loading {}", root.display(), list.join(" ")));
            return;
        }
    };
    let r = db.load_all(list);
    if debug {
        log(&format!("modules loaded from {}: {}", root.display(), r.loaded.join(" ")));
    }
    for (m, e) in &r.failed {
        // e.g. crc32c_intel on a CPU without SSE4.2: the generic one is loaded as well
        if debug || !e.contains("No such device") {
            log(&format!("module {m}: {e}"));
        }
    }
    if !r.unknown.is_empty() && debug {
        log(&format!("not found as modules (built in?): {}", r.unknown.join(" ")));
    }
}

/// Whole disks in /sys/class/block (not partitions, not ram/loop).
fn disks() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/block")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.starts_with("loop") && !n.starts_with("ram") && !n.starts_with("zram"))
                .filter(|n| !Path::new("/sys/class/block").join(n).join("partition").exists())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// The device node of partition `number` of `disk`, once udev-less devtmpfs has it.
fn partition_dev(disk: &str, number: u32) -> Option<PathBuf> {
    let dir = Path::new("/sys/class/block").join(disk);
    let rd = std::fs::read_dir(&dir).ok()?;
    for e in rd.filter_map(|e| e.ok()) {
        let p = e.path();
        if read_u64(&p.join("partition")) == Some(u64::from(number)) {
            let dev = Path::new("/dev").join(e.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}

fn matches(e: &gpt::Partition, r: &PartRef) -> bool {
    match r {
        PartRef::Label(l) => e.name == *l,
        PartRef::Uuid(u) => e.part_guid.eq_ignore_ascii_case(u),
    }
}

/// Scan disks until one has the partitions we need or the deadline passes.
fn find(cmd: &Cmdline) -> Result<Found, Fatal> {
    let deadline = Instant::now() + Duration::from_secs(cmd.wait_secs);
    let mut reported = std::collections::BTreeSet::new();
    let mut last_problem = String::from("no disk appeared");
    loop {
        for disk in disks() {
            let dev = Path::new("/dev").join(&disk);
            let table = match gpt::read(&dev) {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(e) => {
                    last_problem = format!("/dev/{disk}: corrupt partition table: {e}");
                    if reported.insert(last_problem.clone()) {
                        log(&last_problem);
                    }
                    continue;
                }
            };
            let parts = table.partitions();
            let has_root = parts.iter().any(|e| matches(e, &cmd.root));
            let has_usr = parts.iter().any(gpt::Partition::is_usr);
            if !has_root && !has_usr {
                continue;
            }
            if table.damaged() && reported.insert(format!("damaged:{disk}")) {
                log(&gpt::repair(&dev, &disk, &table));
            }
            if reported.insert(format!("table:{disk}")) {
                for e in parts.iter().filter(|e| e.is_usr()) {
                    log(&format!("/dev/{disk} slot {}", gpt::describe(e)));
                }
            }
            let Some(root) = parts.iter().find(|e| matches(e, &cmd.root)).cloned() else {
                return Err(fatal(
                    format!("/dev/{disk} has USR partitions but no ROOT partition ({})", cmd.root),
                    "the disk is not a complete Keel disk: rewrite it from keel.img, or name the state \
                     partition with keel.root=PARTLABEL=<label>",
                ));
            };
            let (usr, source) = match &cmd.usr {
                Some(r) => match parts.iter().find(|e| matches(e, r)) {
                    Some(e) => (e.clone(), "command line"),
                    None => {
                        return Err(fatal(
                            format!("keel.usr={r}: no such partition on /dev/{disk}"),
                            "boot the other slot (keel.usr=USR-A or USR-B), or drop keel.usr= to let the GPT bits choose",
                        ))
                    }
                },
                None => match gpt::choose_usr(parts).cloned() {
                    Some(e) => (e, "GPT priority"),
                    None => {
                        return Err(fatal(
                            format!("/dev/{disk}: no bootable USR slot (every slot has priority 0, or no tries left and not successful)"),
                            "boot a slot explicitly with keel.usr=USR-A (or USR-B)",
                        ))
                    }
                },
            };
            match (partition_dev(&disk, usr.number), partition_dev(&disk, root.number)) {
                (Some(usr_dev), Some(root_dev)) => {
                    // Counted only now that the boot goes ahead: a pass that waits for device nodes must not
                    // spend the slot's one try. Only a slot the GPT bits chose (no keel.usr=) is counted.
                    if cmd.usr.is_none() && usr.slot().tries > 0 && !usr.slot().successful {
                        match gpt::count_attempt(&dev, usr.number) {
                            Ok(left) => log(&format!("{}: boot attempt counted, tries left {left}", usr.name)),
                            Err(err) => log(&format!("{}: cannot count the boot attempt: {err}", usr.name)),
                        }
                    }
                    match grow::grow_gpt(&dev, root.number) {
                        Ok(Some(g)) => log(&format!("disk grew: ROOT extended to {} MiB", g.len_bytes >> 20)),
                        Ok(None) => {}
                        Err(e) => log(&format!("cannot grow ROOT to the end of /dev/{disk}: {e} (booting as is)")),
                    }
                    return Ok(Found { disk: disk.clone(), usr, usr_dev, root_dev, source });
                }
                _ => last_problem = format!("/dev/{disk}: partition device nodes not there yet"),
            }
        }
        if Instant::now() >= deadline {
            return Err(fatal(
                format!("no Keel disk found after {} s ({last_problem})", cmd.wait_secs),
                "check that the disk is attached (virtio-blk: /dev/vda) and has partitions USR-A, USR-B and ROOT; \
                 a longer wait: keel.wait=<seconds>",
            ));
        }
        if reported.insert("waiting".into()) {
            log("waiting for the disk");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn errno_hint(e: rustix::io::Errno, fs: &str) -> String {
    match e {
        rustix::io::Errno::INVAL | rustix::io::Errno::NOENT => format!("not a valid {fs} file system (corrupt or overwritten)"),
        rustix::io::Errno::NODEV => format!("the kernel has no {fs} support (module missing from the initramfs)"),
        rustix::io::Errno::IO => "I/O error reading the disk".into(),
        e => e.to_string(),
    }
}

fn boot_once(cmd: &Cmdline, kernel: &str) -> Result<Infallible, Fatal> {
    let f = find(cmd)?;
    log(&format!(
        "USR: {} ({}, chosen by {}), ROOT: {}",
        f.usr.name,
        f.usr_dev.display(),
        f.source,
        f.root_dev.display()
    ));
    let _ = std::fs::create_dir_all("/sysroot");
    mount(&f.root_dev, "/sysroot", "ext4", MountFlags::NOATIME, "").map_err(|e| {
        fatal(
            format!("ROOT ({}) cannot be mounted as ext4: {}", f.root_dev.display(), errno_hint(e, "ext4")),
            "repair it from the rescue shell (e2fsck is not in the initramfs: boot another system), or reformat \
             ROOT: all local state is lost, /usr is untouched",
        )
    })?;
    match grow::grow_ext4_to_partition(&f.root_dev, Path::new("/sysroot")) {
        Ok(Some(bytes)) => log(&format!("ROOT file system grown to {} MiB", bytes >> 20)),
        Ok(None) => {}
        Err(e) => log(&format!("cannot grow the ROOT file system: {e} (booting with its current size)")),
    }
    let _ = std::fs::create_dir_all("/sysroot/usr");
    mount(&f.usr_dev, "/sysroot/usr", "erofs", MountFlags::RDONLY, "").map_err(|e| {
        fatal(
            format!("{} ({}) cannot be mounted as erofs: {}", f.usr.name, f.usr_dev.display(), errno_hint(e, "erofs")),
            "boot the other slot: keel.usr=USR-A or keel.usr=USR-B (UEFI: pick the other entry in systemd-boot)",
        )
    })?;
    let init = Path::new("/sysroot").join(cmd.init.trim_start_matches('/'));
    if !init.exists() {
        return Err(fatal(
            format!("{} has no {} (keel.init=)", f.usr.name, cmd.init),
            "the slot is incomplete: boot the other one (keel.usr=USR-A or USR-B)",
        ));
    }
    seed_etc();
    let t = Instant::now();
    let mut list = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sysroot/usr/lib/modules-load.d") {
        let mut files: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        for p in files.iter().filter(|p| p.extension().is_some_and(|x| x == "conf")) {
            list.extend(modload::read_list(p));
        }
    }
    load_modules(Path::new(&format!("/sysroot/usr/lib/modules/{kernel}")), &list, cmd.debug);
    log(&format!("{} USR modules loaded in {} ms", list.len(), t.elapsed().as_millis()));
    write_boot_env(&f);
    log(&format!("switching root to {} on {}, exec {}", f.root_dev.display(), f.disk, cmd.init));
    switch_root(&cmd.init).map_err(|e| {
        fatal(format!("switch_root failed: {}", keel_model::report::one_line(e.as_ref())), "report a bug; the rescue shell still works")
    })
}

/// First boot on an empty ROOT (or after a wipe): /etc comes from the image's factory copy.
fn seed_etc() {
    let etc = Path::new("/sysroot/etc");
    let empty = std::fs::read_dir(etc).map(|mut d| d.next().is_none()).unwrap_or(true);
    if !empty {
        return;
    }
    match copy_tree(Path::new("/sysroot/usr/share/factory/etc"), etc) {
        Ok(n) => log(&format!("ROOT had no /etc: {n} entries copied from /usr/share/factory/etc")),
        Err(e) => log(&format!("cannot seed /etc from /usr/share/factory/etc: {e}")),
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(to)?;
    let mut n = 0;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let ft = e.file_type()?;
        let dst = to.join(e.file_name());
        if ft.is_dir() {
            n += copy_tree(&e.path(), &dst)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path())?, &dst)?;
        } else {
            std::fs::copy(e.path(), &dst)?;
        }
        n += 1;
    }
    Ok(n)
}

/// /run/keel/boot.env: what the initramfs chose, for init and the updater (moved with /run).
fn write_boot_env(f: &Found) {
    let text = format!(
        "KEEL_USR={}\nKEEL_USR_PARTUUID={}\nKEEL_USR_DEVICE={}\nKEEL_ROOT_DEVICE={}\nKEEL_SLOT_SOURCE={}\n",
        f.usr.name,
        f.usr.part_guid,
        f.usr_dev.display(),
        f.root_dev.display(),
        if f.source == "command line" { "cmdline" } else { "gpt" }
    );
    let _ = std::fs::create_dir_all("/run/keel");
    if let Err(e) = std::fs::write("/run/keel/boot.env", text) {
        log(&format!("cannot write /run/keel/boot.env: {e}"));
    }
}

/// Delete the initramfs' files (they live in RAM), staying on its file system.
fn free_initramfs(dir: &Path, dev: u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.filter_map(|e| e.ok()) {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else { continue };
        if m.dev() != dev {
            continue; // a mount point (sysroot, dev, proc, sys, run)
        }
        if m.is_dir() {
            free_initramfs(&p, dev);
            let _ = std::fs::remove_dir(&p);
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Move /dev, /proc, /sys, /run under /sysroot, make /sysroot the root, exec init.
fn switch_root(init: &str) -> anyhow::Result<Infallible> {
    use std::os::unix::fs::MetadataExt;
    for m in ["/dev", "/proc", "/sys", "/run"] {
        let target = format!("/sysroot{m}");
        let _ = std::fs::create_dir_all(&target);
        mount_move(m, &target).with_context(|| format!("moving {m} to {target}"))?;
    }
    let root_dev = std::fs::symlink_metadata("/").context("stat /")?.dev();
    free_initramfs(Path::new("/"), root_dev);
    std::env::set_current_dir("/sysroot").context("chdir /sysroot")?;
    mount_move(".", "/").context("moving /sysroot to /")?;
    rustix::process::chroot(".").context("chroot")?;
    std::env::set_current_dir("/").context("chdir /")?;
    let err = std::process::Command::new(init).arg0(init).env("PATH", "/usr/bin:/usr/sbin:/bin:/sbin").exec();
    Err(anyhow!("exec {init}: {err}"))
}

/// busybox sh on the console; returns when the shell exits.
fn rescue_shell() {
    if !Path::new(BUSYBOX).exists() {
        log("no busybox in this initramfs: no rescue shell");
        return;
    }
    println!("keel initrd: rescue shell (busybox). The real root would be mounted at /sysroot. Exit to continue.");
    let status = std::process::Command::new(BUSYBOX)
        .args(["sh", "-l"])
        .env("PATH", "/usr/bin:/bin")
        .env("PS1", "(keel initrd) # ")
        .status();
    if let Err(e) = status {
        log(&format!("cannot start the rescue shell: {e}"));
    }
}
