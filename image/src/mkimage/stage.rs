//! Staging the trees and small file systems: USR, the initramfs, the ESP, OEM and ROOT.
//!
//! Owns: what goes where inside each file system (documented in docs/image.md) and the mkfs invocations with
//! their reproducibility flags. Does not: lay out the disk (`layout`, `mkimage::assemble_disk`) or build UKIs.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::content;
use super::cpio::Archive;
use super::kmod::{self, ModuleDb};
use super::layout;
use super::tools::{self, DEBUGFS, DEPMOD, MCOPY, MKFS_EXT4, MKFS_VFAT, MMD};
use super::{copy, write, Config, ImageError};

/// Keel binaries copied into /usr/bin when cargo built them (the others are optional).
pub const KEEL_BINARIES: &[&str] =
    &["init", "initctl", "clusterd", "clusterctl", "fleetctl", "locksmithctl", "update-engine", "updatectl"];

/// Bytes every init build with initramfs mode contains (init/src/initrd prints them in its banner).
pub const INITRD_MARKER: &[u8] = b"keel-initrd-mode";

pub struct Staged {
    pub binaries: Vec<String>,
    pub placeholder_init: bool,
}

fn werr(p: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Write { path: p.to_path_buf(), source }
}

fn mkdirs(p: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(p).map_err(werr(p))
}

fn link(target: &str, at: &Path) -> Result<(), ImageError> {
    symlink(target, at).map_err(werr(at))
}

fn write_mode(p: &Path, data: &[u8], mode: u32) -> Result<(), ImageError> {
    write(p, data)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(werr(p))
}

/// Refuse dynamically linked binaries: USR has no dynamic loader.
fn check_static(p: &Path) -> Result<(), ImageError> {
    let b = std::fs::read(p).map_err(|source| ImageError::Read { path: p.to_path_buf(), source })?;
    let rd = |o: usize, n: usize| -> Option<u64> {
        let s = b.get(o..o + n)?;
        Some(s.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    };
    if b.get(0..4) != Some(b"\x7fELF") {
        return Ok(()); // scripts are fine
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd(0x20, 8), rd(0x36, 2), rd(0x38, 2)) else {
        return Ok(());
    };
    for i in 0..phnum {
        if rd((phoff + i * phentsize) as usize, 4) == Some(3) {
            return Err(ImageError::ToolFailed {
                tool: "mkimage",
                command: format!("check {}", p.display()),
                status: "dynamically linked".into(),
                output: "Keel's binaries must be static (.cargo/config.toml sets +crt-static for the gnu target)".into(),
            });
        }
    }
    Ok(())
}

/// Stage /usr into `dir` (the tree becomes the erofs root, i.e. paths here are relative to /usr).
pub fn stage_usr(cfg: &Config, dir: &Path) -> Result<Staged, ImageError> {
    let bin = dir.join("bin");
    let lib_keel = dir.join("lib/keel");
    let units = lib_keel.join("units");
    mkdirs(&bin)?;
    mkdirs(&units.join("multi-user.target.wants"))?;
    link("bin", &dir.join("sbin"))?;

    let mut binaries = Vec::new();
    for name in KEEL_BINARIES {
        let src = cfg.bin_dir.join(name);
        if src.is_file() {
            check_static(&src)?;
            copy(&src, &bin.join(name))?;
            binaries.push(name.to_string());
        }
    }
    let placeholder_init = !bin.join("init").exists();
    if placeholder_init {
        write_mode(&bin.join("init"), content::PLACEHOLDER_INIT.as_bytes(), 0o755)?;
    }
    link("../../bin/init", &lib_keel.join("init"))?;

    // busybox toolbox: every applet as a symlink, Keel's own binaries win
    check_static(&cfg.busybox)?;
    copy(&cfg.busybox, &bin.join("busybox"))?;
    for applet in busybox_applets(&cfg.busybox)? {
        let at = bin.join(&applet);
        if !at.exists() && at.symlink_metadata().is_err() {
            link("busybox", &at)?;
        }
    }

    // units and their helpers
    write_mode(&lib_keel.join("debug-shell"), content::DEBUG_SHELL.as_bytes(), 0o755)?;
    write_mode(&lib_keel.join("console-shell"), content::CONSOLE_SHELL.as_bytes(), 0o755)?;
    write_mode(&lib_keel.join("autologin"), content::AUTOLOGIN.as_bytes(), 0o755)?;
    for (name, text) in [
        ("keel-debug-shell.service", content::DEBUG_SHELL_UNIT),
        ("keel-console-shell.service", content::CONSOLE_SHELL_UNIT),
        ("keel-loopback.service", content::LOOPBACK_UNIT),
    ] {
        write(&units.join(name), text.as_bytes())?;
        link(&format!("../{name}"), &units.join("multi-user.target.wants").join(name))?;
    }

    for unit in &cfg.extra_units {
        let Some(name) = unit.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
        copy(unit, &units.join(&name))?;
        link(&format!("../{name}"), &units.join("multi-user.target.wants").join(&name))?;
    }
    if binaries.iter().any(|b| b == "update-engine") {
        stage_updater(cfg, dir, &lib_keel, &units)?;
    }

    if binaries.iter().any(|b| b == "clusterd") {
        // shipped, not enabled: cloud-config starts it (`keel.units: [{name: clusterd.service, command: start}]`)
        write_mode(&lib_keel.join("clusterd-start"), content::CLUSTERD_START.as_bytes(), 0o755)?;
        write(&units.join("clusterd.service"), content::CLUSTERD_UNIT.as_bytes())?;
    }
    write(&units.join("multi-user.target"), content::MULTI_USER_TARGET.as_bytes())?;
    write(&units.join("default.target"), content::DEFAULT_TARGET.as_bytes())?;

    write(&dir.join("lib/os-release"), content::os_release(&cfg.os_version).as_bytes())?;

    // kernel modules Keel needs, with a depmod'ed database of just those
    let mut wanted: Vec<&str> = kmod::USR_MODULES.to_vec();
    wanted.extend(cfg.extra_modules.iter().map(String::as_str));
    let src_root = PathBuf::from(format!("/usr/lib/modules/{}", cfg.kernel_version));
    let mods = copy_modules(cfg, &src_root, &wanted, &dir.join("lib/modules"))?;
    let mut load_list = String::from("# Loaded by Keel's initramfs after mounting USR, in this order (deps resolved).\n");
    for m in &wanted {
        load_list.push_str(m);
        load_list.push('\n');
    }
    write(&dir.join("lib/modules-load.d/keel.conf"), load_list.as_bytes())?;
    eprintln!("mkimage:       {} kernel modules", mods.len());

    // /etc as shipped, copied to ROOT on first boot when ROOT has none
    stage_etc(&dir.join("share/factory/etc"))?;
    Ok(Staged { binaries, placeholder_init })
}

/// The updater's share of USR: the enabled update-engine.service and its start script, the health gate's
/// required units, and the trusted update keys (`/usr/share/keel/update-keys/*.pub`).
fn stage_updater(cfg: &Config, dir: &Path, lib_keel: &Path, units: &Path) -> Result<(), ImageError> {
    write_mode(&lib_keel.join("update-engine-start"), content::UPDATE_ENGINE_START.as_bytes(), 0o755)?;
    write(&units.join("update-engine.service"), content::UPDATE_ENGINE_UNIT.as_bytes())?;
    link("../update-engine.service", &units.join("multi-user.target.wants/update-engine.service"))?;
    let required: Vec<String> = if cfg.health_units.is_empty() {
        content::DEFAULT_HEALTH_UNITS.iter().map(|s| s.to_string()).collect()
    } else {
        cfg.health_units.clone()
    };
    write(&lib_keel.join("update-health-units"), content::health_units_file(&required).as_bytes())?;
    let keys = dir.join("share/keel/update-keys");
    mkdirs(&keys)?;
    for k in &cfg.update_keys {
        let key = keel_updater::payload::keys::load_public(k).map_err(|e| ImageError::BadKey {
            path: k.clone(),
            reason: e.to_string(),
        })?;
        let id = keel_updater::payload::keys::key_id(&key);
        copy(k, &keys.join(format!("{id}.pub")))?;
    }
    Ok(())
}

fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|source| ImageError::Spawn { tool: "busybox", source })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
        .map(String::from)
        .collect())
}

/// Copy the closure of `wanted` into `<modules_dir>/<kver>/` and run depmod there. Returns the module names.
fn copy_modules(cfg: &Config, src_root: &Path, wanted: &[&str], modules_dir: &Path) -> Result<Vec<String>, ImageError> {
    let db = ModuleDb::load(src_root)?;
    let order = db.closure(wanted)?;
    let dst_root = modules_dir.join(&cfg.kernel_version);
    for name in &order {
        if let Some(rel) = db.path_of(name) {
            copy(&src_root.join(rel), &dst_root.join(rel))?;
        }
    }
    for f in ["modules.builtin", "modules.builtin.modinfo", "modules.order"] {
        let s = src_root.join(f);
        if s.is_file() {
            copy(&s, &dst_root.join(f))?;
        }
    }
    // depmod -b BASE wants BASE/lib/modules/<kver>
    let abs = std::fs::canonicalize(modules_dir).map_err(|source| ImageError::Read { path: modules_dir.to_path_buf(), source })?;
    let base = abs.with_file_name(".depmod-base");
    mkdirs(&base.join("lib"))?;
    let lm = base.join("lib/modules");
    let _ = std::fs::remove_file(&lm);
    link(&abs.display().to_string(), &lm)?;
    DEPMOD.run(["-b", &base.display().to_string(), &cfg.kernel_version])?;
    std::fs::remove_dir_all(&base).map_err(werr(&base))?;
    Ok(order)
}

fn stage_etc(etc: &Path) -> Result<(), ImageError> {
    mkdirs(&etc.join("keel/units"))?;
    write(&etc.join("passwd"), content::PASSWD.as_bytes())?;
    write(&etc.join("group"), content::GROUP.as_bytes())?;
    write_mode(&etc.join("shadow"), content::SHADOW.as_bytes(), 0o600)?;
    write(&etc.join("hostname"), content::HOSTNAME.as_bytes())?;
    write(&etc.join("fstab"), content::FSTAB.as_bytes())?;
    write(&etc.join("profile"), content::PROFILE.as_bytes())?;
    let osr = etc.join("os-release");
    let _ = std::fs::remove_file(&osr);
    link("../usr/lib/os-release", &osr)
}

/// Give every file in `dir` the fixed mtime (mkfs.ext4 -d and mcopy -m copy mtimes from the source).
pub fn set_tree_mtime(dir: &Path) -> Result<(), ImageError> {
    use rustix::fs::{utimensat, AtFlags, Timespec, Timestamps, CWD};
    let t = Timespec { tv_sec: tools::FIXED_EPOCH as i64, tv_nsec: 0 };
    let ts = Timestamps { last_access: t, last_modification: t };
    let mut stack = vec![dir.to_path_buf()];
    let mut all = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|source| ImageError::Read { path: d.clone(), source })? {
            let e = e.map_err(|source| ImageError::Read { path: d.clone(), source })?;
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p.clone());
            }
            all.push(p);
        }
    }
    all.push(dir.to_path_buf());
    // children before parents is not needed: setting a file's mtime does not touch its directory's
    for p in all {
        utimensat(CWD, &p, &ts, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| ImageError::Write { path: p.clone(), source: e.into() })?;
    }
    Ok(())
}

/// Choose the binary that becomes the initramfs' /init.
pub fn pick_initrd_init(cfg: &Config) -> Result<PathBuf, ImageError> {
    if let Some(p) = &cfg.initrd_init {
        tools::require_file(p, "(your --initrd-init)")?;
        return Ok(p.clone());
    }
    let init = cfg.bin_dir.join("init");
    if let Ok(bytes) = std::fs::read(&init) {
        if bytes.windows(INITRD_MARKER.len()).any(|w| w == INITRD_MARKER) {
            return Ok(init);
        }
    }
    Err(ImageError::NoInitrdInit { init })
}

/// Build the initramfs: /init, /etc/initrd-release, the modules to reach USR and ROOT, busybox for rescue.
pub fn build_initramfs(cfg: &Config, init: &Path, scratch: &Path, out: &Path) -> Result<(), ImageError> {
    let mut a = Archive::default();
    for d in ["dev", "proc", "sys", "run", "tmp", "sysroot", "usr/bin"] {
        a.dir(d, 0o755);
    }
    a.char_dev("dev/console", 0o600, 5, 1);
    a.char_dev("dev/null", 0o666, 1, 3);
    a.symlink("bin", "usr/bin");
    a.symlink("sbin", "usr/bin");
    a.symlink("lib", "usr/lib");
    a.file_from("init", init)?;
    let mut rel = content::os_release(&cfg.os_version);
    rel.push_str("VARIANT_ID=initrd\n");
    a.file("etc/initrd-release", 0o644, rel.into_bytes());
    a.symlink("etc/os-release", "initrd-release");
    let mut wanted: Vec<&str> = kmod::INITRD_MODULES.to_vec();
    wanted.extend(cfg.extra_initrd_modules.iter().map(String::as_str));
    let mut list = String::from("# Loaded by Keel's init in initramfs mode, deps from modules.dep.\n");
    for m in &wanted {
        list.push_str(m);
        list.push('\n');
    }
    a.file("etc/keel/initrd-modules", 0o644, list.into_bytes());

    // modules: copy the closure to a scratch tree, depmod it, add the .ko files and text indexes
    let src_root = PathBuf::from(format!("/usr/lib/modules/{}", cfg.kernel_version));
    if scratch.exists() {
        std::fs::remove_dir_all(scratch).map_err(werr(scratch))?;
    }
    copy_modules(cfg, &src_root, &wanted, scratch)?;
    let kroot = scratch.join(&cfg.kernel_version);
    let mut stack = vec![kroot.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|source| ImageError::Read { path: d.clone(), source })? {
            let e = e.map_err(|source| ImageError::Read { path: d.clone(), source })?;
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(&kroot).unwrap_or(&p).display().to_string();
            let keep = rel.ends_with(".ko") || ["modules.dep", "modules.softdep", "modules.alias", "modules.builtin"].contains(&rel.as_str());
            if keep {
                a.file_from(&format!("usr/lib/modules/{}/{rel}", cfg.kernel_version), &p)?;
            }
        }
    }
    // busybox for the rescue shell
    a.file_from("usr/bin/busybox", &cfg.busybox)?;
    for applet in busybox_applets(&cfg.busybox)? {
        a.symlink(&format!("usr/bin/{applet}"), "busybox");
    }
    let raw = a.to_bytes(tools::FIXED_EPOCH);
    let zst = zstd::encode_all(&raw[..], 12).map_err(ImageError::Compress)?;
    write(out, &zst)
}

/// The ESP: systemd-boot as the removable-media loader, loader.conf, one UKI per slot in /EFI/Linux.
pub fn build_esp(work: &Path, esp: &Path, ukis: &[PathBuf]) -> Result<(), ImageError> {
    let tree = work.join("esp");
    mkdirs(&tree.join("EFI/BOOT"))?;
    mkdirs(&tree.join("EFI/systemd"))?;
    mkdirs(&tree.join("EFI/Linux"))?;
    mkdirs(&tree.join("loader/entries"))?;
    copy(Path::new(layout::SYSTEMD_BOOT), &tree.join("EFI/BOOT/BOOTX64.EFI"))?;
    copy(Path::new(layout::SYSTEMD_BOOT), &tree.join("EFI/systemd/systemd-bootx64.efi"))?;
    write(
        &tree.join("loader/loader.conf"),
        b"# Keel: boot the best UKI in /EFI/Linux at once; boot counting is in the UKI file names.\n\
          timeout 0\neditor no\nauto-entries no\nauto-firmware no\nconsole-mode keep\nrandom-seed-mode off\n",
    )?;
    for u in ukis {
        if let Some(name) = u.file_name() {
            copy(u, &tree.join("EFI/Linux").join(name))?;
        }
    }
    set_tree_mtime(&tree)?;
    let kib = layout::partitions().iter().find(|p| p.label == "EFI-SYSTEM").map_or(131072, |p| p.size_bytes() / 1024);
    if esp.exists() {
        std::fs::remove_file(esp).map_err(werr(esp))?;
    }
    MKFS_VFAT.run([
        "-F",
        "32",
        "-n",
        "EFI-SYSTEM",
        "--invariant",
        "-i",
        layout::ESP_VOLUME_ID,
        "-C",
        &esp.display().to_string(),
        &kib.to_string(),
    ])?;
    // one directory and one file at a time, in sorted order: mcopy -s follows readdir order, which makes
    // cluster allocation differ between runs
    let img = esp.display().to_string();
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut stack = vec![tree.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|source| ImageError::Read { path: d.clone(), source })? {
            let e = e.map_err(|source| ImageError::Read { path: d.clone(), source })?;
            let p = e.path();
            let rel = format!("::/{}", p.strip_prefix(&tree).unwrap_or(&p).display());
            if p.is_dir() {
                stack.push(p.clone());
                dirs.push(rel);
            } else {
                files.push((p.display().to_string(), rel));
            }
        }
    }
    dirs.sort();
    files.sort();
    for d in &dirs {
        MMD.run(["-i", &img, d])?;
    }
    for (src, dst) in &files {
        MCOPY.run(["-m", "-Q", "-i", &img, src, dst])?;
    }
    super::fatfix::pin_times(esp)
}

fn mkfs_ext4(label: &str, uuid: &str, tree: &Path, out: &Path, mib: u64) -> Result<(), ImageError> {
    set_tree_mtime(tree)?;
    if out.exists() {
        std::fs::remove_file(out).map_err(werr(out))?;
    }
    MKFS_EXT4.run([
        "-q",
        "-F",
        "-L",
        label,
        "-U",
        uuid,
        "-E",
        &format!("root_owner=0:0,hash_seed={}", layout::HASH_SEED),
        "-d",
        &tree.display().to_string(),
        &out.display().to_string(),
        &format!("{mib}M"),
    ])?;
    pin_ext4_times(tree, out)
}

/// mke2fs 1.47.0 stamps the inodes it touches while populating (/, lost+found, directories) with the
/// current ctime despite E2FSPROGS_FAKE_TIME; set every inode's times to the fixed epoch with debugfs.
fn pin_ext4_times(tree: &Path, img: &Path) -> Result<(), ImageError> {
    let mut paths = vec!["/".to_string(), "/lost+found".to_string()];
    let mut stack = vec![tree.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|source| ImageError::Read { path: d.clone(), source })? {
            let e = e.map_err(|source| ImageError::Read { path: d.clone(), source })?;
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p.clone());
            }
            paths.push(format!("/{}", p.strip_prefix(tree).unwrap_or(&p).display()));
        }
    }
    paths.sort();
    let mut cmds = String::new();
    for p in &paths {
        for field in ["atime", "ctime", "mtime", "crtime"] {
            cmds.push_str(&format!("set_inode_field \"{p}\" {field} 20200101000000\n"));
        }
    }
    let file = img.with_extension("debugfs");
    write(&file, cmds.as_bytes())?;
    DEBUGFS.run(["-w", "-f", &file.display().to_string(), &img.display().to_string()])
}

fn part_mib(label: &str) -> u64 {
    layout::partitions().iter().find(|p| p.label == label).map_or(32, |p| p.size_mib)
}

pub fn build_oem(work: &Path, out: &Path) -> Result<(), ImageError> {
    let tree = work.join("oem");
    mkdirs(&tree)?;
    write(
        &tree.join("README"),
        b"Keel OEM partition: platform defaults. A cloud-config placed here as user-data is read when no other\n\
          source (fw_cfg, CIDATA disk) provides one.\n",
    )?;
    mkfs_ext4("OEM", layout::OEM_FS_UUID, &tree, out, part_mib("OEM"))
}

/// ROOT: the writable state. Mount points, merged-/usr symlinks, /etc from the factory copy, /var.
pub fn build_root(work: &Path, out: &Path) -> Result<(), ImageError> {
    let tree = work.join("root");
    for d in ["usr", "proc", "sys", "dev", "run", "tmp", "root", "efi", "oem", "home", "var/lib/keel", "var/log", "var/tmp"] {
        mkdirs(&tree.join(d))?;
    }
    for d in ["tmp", "var/tmp"] {
        std::fs::set_permissions(tree.join(d), std::fs::Permissions::from_mode(0o1777)).map_err(werr(&tree.join(d)))?;
    }
    std::fs::set_permissions(tree.join("root"), std::fs::Permissions::from_mode(0o700)).map_err(werr(&tree.join("root")))?;
    for (name, target) in [("bin", "usr/bin"), ("sbin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib")] {
        link(target, &tree.join(name))?;
    }
    stage_etc(&tree.join("etc"))?;
    mkfs_ext4("ROOT", layout::ROOT_FS_UUID, &tree, out, part_mib("ROOT"))
}
