//! mkimage: assemble Keel's bootable raw GPT disk from the workspace's static binaries and Debian's kernel.
//!
//! Owns: the build pipeline (stage USR → erofs, initramfs → cpio.zst, UKIs, ESP, OEM, ROOT, GPT disk), the
//! disk layout and its fixed GUIDs (`layout`), and the manifest `keel.json` that keelvm and the tests read.
//! Does not: build Keel's binaries (cargo does), sign payloads (mkpayload), or boot anything (see `qemu`).
//! Every step is reproducible: fixed GUIDs, UUIDs, volume ids, hash seeds and timestamps.

pub mod content;
pub mod cpio;
pub mod fatfix;
pub mod kmod;
pub mod layout;
pub mod stage;
pub mod tools;
pub mod uki;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{tool} not found; install the Debian package {package} (apt-get install {package}, or make deps)")]
    MissingTool { tool: &'static str, package: &'static str },
    #[error("missing tools: {tools}; install them with: apt-get install {packages} (or make deps)")]
    MissingTools { tools: String, packages: String },
    #[error("{} not found; it comes with the Debian package {package}", path.display())]
    MissingFile { path: PathBuf, package: &'static str },
    #[error("cannot start {tool}: {source}")]
    Spawn { tool: &'static str, source: std::io::Error },
    #[error("{tool} failed ({status}): {command}\n{output}")]
    ToolFailed { tool: &'static str, command: String, status: String, output: String },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("no kernel found: need /usr/lib/modules/<version> and /boot/vmlinuz-<version>; apt-get install linux-image-amd64")]
    NoKernel,
    #[error("kernel module {name} is neither in modules.dep nor built in")]
    UnknownModule { name: String },
    #[error("{} is not a PE32+ EFI stub", path.display())]
    BadStub { path: PathBuf },
    #[error("{what} is {size} bytes, larger than its {limit}-byte partition; raise the size in mkimage::layout")]
    TooBig { what: String, size: u64, limit: u64 },
    #[error(
        "no init with initramfs mode: {} is missing or lacks it; build init (cargo build --release -p keel-init) \
         or pass --initrd-init",
        init.display()
    )]
    NoInitrdInit { init: PathBuf },
    #[error("update key {}: {reason}; pass a .pub file written by `mkpayload keygen`", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("compressing the initramfs: {0}")]
    Compress(std::io::Error),
}

/// What to build.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where Keel's static binaries are (target/x86_64-unknown-linux-gnu/release).
    pub bin_dir: PathBuf,
    /// Output directory (keel.img, keel.json, keel.vmlinuz, keel.initrd, usr.erofs, keel.efi).
    pub out_dir: PathBuf,
    pub kernel_version: String,
    pub os_version: String,
    /// The init binary put into the initramfs as /init; `None` = pick (see `stage::pick_initrd_init`).
    pub initrd_init: Option<PathBuf>,
    /// Extra kernel command line appended to the UKIs' and keel.json's.
    pub extra_cmdline: String,
    /// Extra kernel modules for USR (names).
    pub extra_modules: Vec<String>,
    /// Extra kernel modules for the initramfs (e.g. virtio_scsi for disks behind virtio-scsi).
    pub extra_initrd_modules: Vec<String>,
    pub busybox: PathBuf,
    pub keep_work: bool,
    /// Public keys (`mkpayload keygen`'s `.pub` files) the machine trusts for update payloads; installed as
    /// `/usr/share/keel/update-keys/<id>.pub`.
    pub update_keys: Vec<PathBuf>,
    /// Units the update health gate requires (`/usr/lib/keel/update-health-units`); empty = the defaults.
    pub health_units: Vec<String>,
    /// Extra unit files shipped in `/usr/lib/keel/units` and enabled (wanted by multi-user.target).
    pub extra_units: Vec<PathBuf>,
}

/// The description of a built image, written to `<out>/keel.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub version: String,
    pub kernel_version: String,
    pub image: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub usr_image: PathBuf,
    /// Kernel command line shared by every boot (no slot).
    pub cmdline: String,
    pub disk_guid: String,
    pub partitions: Vec<layout::PartitionInfo>,
    pub image_bytes: u64,
    pub image_allocated_bytes: u64,
    pub usr_bytes: u64,
    pub initrd_bytes: u64,
    pub uki_bytes: u64,
    /// `init` = Keel's init; `placeholder` = busybox stand-in because init was not built.
    pub usr_init: String,
    pub initrd_init: PathBuf,
    /// The slot-independent UKI (no `keel.usr=`: the initramfs follows the GPT bits): the kernel target of
    /// update payloads (`mkpayload build --kernel`).
    #[serde(default)]
    pub uki: PathBuf,
}

impl Manifest {
    pub fn load(out_dir: &Path) -> Result<Manifest, ImageError> {
        let p = out_dir.join("keel.json");
        let text = std::fs::read_to_string(&p).map_err(|source| ImageError::Read { path: p.clone(), source })?;
        serde_json::from_str(&text).map_err(|e| ImageError::Read {
            path: p,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// The command line for booting `slot` ("USR-A" / "USR-B") directly.
    pub fn cmdline_for(&self, slot: &str) -> String {
        format!("{} keel.usr={slot}", self.cmdline)
    }
}

/// The kernel command line every Keel boot gets (the slot is added per UKI).
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// Progress on stderr: one line per step.
pub fn progress(step: usize, total: usize, what: &str) {
    eprintln!("mkimage: [{step}/{total}] {what}");
}

const STEPS: usize = 8;

/// Build everything; returns the manifest (also written to `<out>/keel.json`).
pub fn build(cfg: &Config) -> Result<Manifest, ImageError> {
    tools::check_all()?;
    let kernel = PathBuf::from(format!("/boot/vmlinuz-{}", cfg.kernel_version));
    tools::require_file(&kernel, "linux-image-amd64")?;
    tools::require_file(&cfg.busybox, "busybox-static")?;
    tools::require_file(Path::new(uki::STUB), "systemd-boot-efi")?;
    tools::require_file(Path::new(layout::SYSTEMD_BOOT), "systemd-boot-efi")?;
    let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(|source| ImageError::Write { path: p.to_path_buf(), source });
    mkdir(&cfg.out_dir)?;
    // absolute paths in keel.json, so keelvm and the tests work from any directory
    let abs_out = std::fs::canonicalize(&cfg.out_dir).map_err(|source| ImageError::Read { path: cfg.out_dir.clone(), source })?;
    let cfg = &Config { out_dir: abs_out, ..cfg.clone() };
    let work = cfg.out_dir.join(".work");
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(|source| ImageError::Write { path: work.clone(), source })?;
    }
    mkdir(&work)?;

    progress(1, STEPS, &format!("staging USR (Keel {}, kernel {})", cfg.os_version, cfg.kernel_version));
    let usr_dir = work.join("usr");
    let staged = stage::stage_usr(cfg, &usr_dir)?;
    for b in &staged.binaries {
        eprintln!("mkimage:       /usr/bin/{b}");
    }
    if staged.binaries.iter().any(|b| b == "update-engine") {
        if cfg.update_keys.is_empty() {
            eprintln!("mkimage: WARNING: no --update-key: this image trusts no key and will refuse every update payload");
        }
        for k in &cfg.update_keys {
            eprintln!("mkimage:       update key {}", k.display());
        }
    }
    if staged.placeholder_init {
        eprintln!("mkimage: WARNING: {} missing: /usr/bin/init is a busybox PLACEHOLDER", cfg.bin_dir.join("init").display());
    }

    progress(2, STEPS, "building USR (erofs, lz4hc)");
    let usr_img = cfg.out_dir.join("usr.erofs");
    stage::set_tree_mtime(&usr_dir)?;
    tools::MKFS_EROFS.run([
        "-zlz4hc".as_ref(),
        "-T".as_ref(),
        tools::FIXED_EPOCH.to_string().as_ref(),
        format!("-U{}", layout::USR_FS_UUID).as_ref(),
        "--all-root".as_ref(),
        "--quiet".as_ref(),
        usr_img.as_os_str(),
        usr_dir.as_os_str(),
    ] as [&std::ffi::OsStr; 8])?;
    let usr_bytes = file_len(&usr_img)?;

    progress(3, STEPS, "building the initramfs (cpio + zstd)");
    let initrd_init = stage::pick_initrd_init(cfg)?;
    eprintln!("mkimage:       /init = {}", initrd_init.display());
    let initrd = cfg.out_dir.join("keel.initrd");
    stage::build_initramfs(cfg, &initrd_init, &work.join("initrd-modules"), &initrd)?;
    let initrd_bytes = file_len(&initrd)?;

    progress(4, STEPS, "building the unified kernel images (one per slot)");
    let kernel_out = cfg.out_dir.join("keel.vmlinuz");
    copy(&kernel, &kernel_out)?;
    let cmdline = if cfg.extra_cmdline.trim().is_empty() {
        BASE_CMDLINE.to_string()
    } else {
        format!("{BASE_CMDLINE} {}", cfg.extra_cmdline.trim())
    };
    let osrel = work.join("osrel");
    write(&osrel, content::os_release(&cfg.os_version).as_bytes())?;
    let mut ukis = Vec::new();
    for slot in [layout::Slot::A, layout::Slot::B] {
        let cl = work.join(format!("cmdline-{}", slot.letter()));
        write(&cl, format!("{cmdline} keel.usr={}", slot.label()).as_bytes())?;
        let out = work.join(slot.uki_name(&cfg.os_version));
        uki::build(
            Path::new(uki::STUB),
            &uki::UkiParts { osrel: &osrel, cmdline: &cl, kernel: &kernel, initrd: &initrd },
            &out,
        )?;
        ukis.push(out);
    }
    let uki_bytes = file_len(&ukis[0])?;
    // for payloads: one UKI for whichever slot it lands in, so no keel.usr=
    let payload_uki = cfg.out_dir.join("keel.efi");
    let cl = work.join("cmdline-any");
    write(&cl, cmdline.as_bytes())?;
    uki::build(
        Path::new(uki::STUB),
        &uki::UkiParts { osrel: &osrel, cmdline: &cl, kernel: &kernel, initrd: &initrd },
        &payload_uki,
    )?;

    progress(5, STEPS, "building the ESP (FAT32, systemd-boot, loader.conf, UKIs)");
    let esp = work.join("esp.img");
    stage::build_esp(&work, &esp, &ukis)?;

    progress(6, STEPS, "building OEM and ROOT (ext4)");
    let oem = work.join("oem.img");
    let root = work.join("root.img");
    stage::build_oem(&work, &oem)?;
    stage::build_root(&work, &root)?;

    progress(7, STEPS, "assembling the GPT disk");
    let image = cfg.out_dir.join("keel.img");
    let parts = layout::partitions();
    let contents: [(&str, &Path); 5] =
        [("EFI-SYSTEM", &esp), ("USR-A", &usr_img), ("USR-B", &usr_img), ("OEM", &oem), ("ROOT", &root)];
    assemble_disk(&image, &parts, &contents)?;

    progress(8, STEPS, "writing keel.json");
    let manifest = Manifest {
        version: cfg.os_version.clone(),
        kernel_version: cfg.kernel_version.clone(),
        image: image.clone(),
        kernel: kernel_out,
        initrd,
        usr_image: usr_img,
        cmdline,
        disk_guid: layout::DISK_GUID.to_string(),
        partitions: parts.iter().map(layout::PartitionSpec::info).collect(),
        image_bytes: file_len(&image)?,
        image_allocated_bytes: allocated(&image)?,
        usr_bytes,
        initrd_bytes,
        uki_bytes,
        usr_init: if staged.placeholder_init { "placeholder".into() } else { "init".into() },
        initrd_init,
        uki: payload_uki,
    };
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| ImageError::Write {
        path: cfg.out_dir.join("keel.json"),
        source: std::io::Error::other(e),
    })?;
    write(&cfg.out_dir.join("keel.json"), json.as_bytes())?;
    if !cfg.keep_work {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(manifest)
}

/// Create the disk file, partition it with sgdisk (fixed GUIDs, slot bits) and copy each file system in,
/// leaving holes where the source is zero.
fn assemble_disk(image: &Path, parts: &[layout::PartitionSpec], contents: &[(&str, &Path)]) -> Result<(), ImageError> {
    if image.exists() {
        std::fs::remove_file(image).map_err(|source| ImageError::Write { path: image.to_path_buf(), source })?;
    }
    let f = std::fs::File::create(image).map_err(|source| ImageError::Write { path: image.to_path_buf(), source })?;
    f.set_len(layout::disk_bytes(parts)).map_err(|source| ImageError::Write { path: image.to_path_buf(), source })?;
    drop(f);
    let mut args: Vec<String> = vec![format!("--disk-guid={}", layout::DISK_GUID)];
    for (i, p) in parts.iter().enumerate() {
        let n = i + 1;
        args.push(format!("--new={n}:{}:{}", p.start_lba(), p.end_lba()));
        args.push(format!("--typecode={n}:{}", p.type_guid));
        args.push(format!("--partition-guid={n}:{}", p.guid));
        args.push(format!("--change-name={n}:{}", p.label));
        if p.attrs != 0 {
            args.push(format!("--attributes={n}:=:{:016x}", p.attrs));
        }
    }
    args.push(image.display().to_string());
    tools::SGDISK.run(&args)?;

    let mut disk = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(|source| ImageError::Write { path: image.to_path_buf(), source })?;
    for (label, src) in contents {
        let Some(p) = parts.iter().find(|p| p.label == *label) else { continue };
        let size = file_len(src)?;
        if size > p.size_bytes() {
            return Err(ImageError::TooBig { what: format!("{label} ({})", src.display()), size, limit: p.size_bytes() });
        }
        copy_sparse(src, &mut disk, p.start_lba() * 512, image)?;
    }
    disk.sync_all().map_err(|source| ImageError::Write { path: image.to_path_buf(), source })?;
    Ok(())
}

fn copy_sparse(src: &Path, dst: &mut std::fs::File, offset: u64, dst_path: &Path) -> Result<(), ImageError> {
    let mut f = std::fs::File::open(src).map_err(|source| ImageError::Read { path: src.to_path_buf(), source })?;
    let mut buf = vec![0u8; 1 << 16];
    let mut pos = offset;
    loop {
        let n = read_full(&mut f, &mut buf).map_err(|source| ImageError::Read { path: src.to_path_buf(), source })?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(pos)).map_err(|source| ImageError::Write { path: dst_path.to_path_buf(), source })?;
            dst.write_all(&buf[..n]).map_err(|source| ImageError::Write { path: dst_path.to_path_buf(), source })?;
        }
        pos += n as u64;
    }
    Ok(())
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

pub(crate) fn file_len(p: &Path) -> Result<u64, ImageError> {
    Ok(std::fs::metadata(p).map_err(|source| ImageError::Read { path: p.to_path_buf(), source })?.len())
}

fn allocated(p: &Path) -> Result<u64, ImageError> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(p).map_err(|source| ImageError::Read { path: p.to_path_buf(), source })?.blocks() * 512)
}

pub(crate) fn write(p: &Path, data: &[u8]) -> Result<(), ImageError> {
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ImageError::Write { path: parent.to_path_buf(), source })?;
    }
    std::fs::write(p, data).map_err(|source| ImageError::Write { path: p.to_path_buf(), source })
}

pub(crate) fn copy(from: &Path, to: &Path) -> Result<(), ImageError> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ImageError::Write { path: parent.to_path_buf(), source })?;
    }
    std::fs::copy(from, to).map_err(|source| ImageError::Read { path: from.to_path_buf(), source })?;
    Ok(())
}
