//! `mkimage`: build Keel's bootable disk image (out/keel.img) from the workspace's static binaries.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use keel_image::mkimage::{self, kmod, Config};

/// Build Keel's bootable x86_64 disk image (raw GPT):
///   1 EFI-SYSTEM  FAT32: systemd-boot + one unified kernel image (UKI) per slot
///   2 USR-A       erofs, read-only /usr: Keel's binaries, busybox, modules
///   3 USR-B       the other slot (same content at install time)
///   4 OEM         ext4, platform defaults
///   5 ROOT        ext4, writable state: /etc, /var
///
/// Inputs: Keel's static binaries (init, initctl; clusterd, clusterctl,
/// update-engine, updatectl when built), Debian's kernel and modules
/// (linux-image-amd64), busybox-static, systemd-boot-efi.
///
/// Outputs in --out:
///   keel.img       the disk
///   keel.json      manifest: layout, GUIDs, sizes, kernel command line
///   keel.vmlinuz   kernel and initramfs, for direct kernel boot (keelvm)
///   keel.initrd
///   usr.erofs      the USR file system (input of update payloads)
///   keel.efi       UKI without keel.usr= (the other input of payloads)
///
/// The updater ships in USR when update-engine was built: the enabled
/// update-engine.service (settings from cloud-config's keel.update), the
/// trusted payload keys (--update-key) in /usr/share/keel/update-keys, and
/// the units its health gate requires (--health-unit) in
/// /usr/lib/keel/update-health-units. --os-version is the version machines
/// report (VERSION_ID in /usr/lib/os-release).
///
/// The same inputs give the same bytes: GUIDs, UUIDs, volume ids, hash
/// seeds and time stamps are fixed. Layout and boot flow: docs/image.md.
///
/// Examples:
///   cargo build --release --workspace --bins
///   target/x86_64-unknown-linux-gnu/release/mkimage
///   mkimage --out /tmp/img --cmdline keel.debug   # extra kernel arguments
///   mkimage --initrd-module virtio_scsi           # disks behind virtio-scsi
///   keelvm run                                    # boot it (keelvm --help)
///
///   # an image that trusts a key, and a payload for version 1.1.0 signed with it
///   mkpayload keygen --out out/keys
///   mkimage --os-version 1.0.0 --update-key out/keys
///   mkimage --os-version 1.1.0 --update-key out/keys --out out/1.1.0
///   mkpayload build --key out/keys/<id>.key --version 1.1.0 --channel stable \
///       --usr out/1.1.0/usr.erofs --kernel out/1.1.0/keel.efi -o keel-1.1.0.payload
#[derive(Parser, Debug)]
#[command(name = "mkimage", version, verbatim_doc_comment)]
struct Args {
    /// Output directory.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// Directory holding Keel's static binaries [default: the directory mkimage itself is in].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Kernel version under /usr/lib/modules with /boot/vmlinuz-<version> [default: the newest].
    #[arg(long)]
    kernel_version: Option<String>,
    /// Keel version written to os-release and the UKI names.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    os_version: String,
    /// Binary to use as the initramfs' /init; it must have initramfs mode (Keel's init does)
    /// [default: <bin-dir>/init].
    #[arg(long)]
    initrd_init: Option<PathBuf>,
    /// Extra kernel command line for both UKIs (and keel.json, which keelvm uses for direct boot).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Extra kernel module for USR (repeatable); dependencies are added.
    #[arg(long = "module")]
    modules: Vec<String>,
    /// Extra kernel module for the initramfs (repeatable), e.g. virtio_scsi, nvme, ahci.
    #[arg(long = "initrd-module")]
    initrd_modules: Vec<String>,
    /// busybox binary (static) for the toolbox and the initramfs rescue shell.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Keep <out>/.work (staged trees and file system images) for inspection.
    #[arg(long)]
    keep_work: bool,
    /// Public key trusted for update payloads (repeatable): a .pub file from `mkpayload keygen`, or a
    /// directory whose *.pub files are all taken. Ship the next key beside the current one to rotate.
    #[arg(long = "update-key", value_name = "FILE|DIR")]
    update_keys: Vec<PathBuf>,
    /// Unit the update health gate requires before blessing a new slot (repeatable)
    /// [default: keel-loopback.service, update-engine.service].
    #[arg(long = "health-unit", value_name = "UNIT")]
    health_units: Vec<String>,
    /// Extra unit file to ship in /usr/lib/keel/units, enabled (repeatable).
    #[arg(long = "unit", value_name = "FILE")]
    units: Vec<PathBuf>,
}

/// `--update-key` arguments: files as given, directories expanded to their *.pub files (sorted).
fn expand_keys(args: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for a in args {
        if a.is_dir() {
            let mut pubs: Vec<PathBuf> = std::fs::read_dir(a)
                .with_context(|| format!("listing --update-key directory {}", a.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "pub"))
                .collect();
            anyhow::ensure!(!pubs.is_empty(), "--update-key {}: no *.pub files in it (mkpayload keygen --out DIR)", a.display());
            pubs.sort();
            out.extend(pubs);
        } else {
            out.push(a.clone());
        }
    }
    Ok(out)
}

/// Run; on failure one line on stderr (`mkimage: what failed: why`) and exit status 1.
fn main() -> std::process::ExitCode {
    keel_model::report::exit("mkimage", run())
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = std::time::Instant::now();
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()
            .context("cannot find mkimage's own path; pass --bin-dir")?
            .parent()
            .map(PathBuf::from)
            .context("mkimage has no parent directory; pass --bin-dir")?,
    };
    let kernel_version = match args.kernel_version {
        Some(v) => v,
        None => kmod::default_kernel_version()?,
    };
    let cfg = Config {
        bin_dir,
        out_dir: args.out,
        kernel_version,
        os_version: args.os_version,
        initrd_init: args.initrd_init,
        extra_cmdline: args.cmdline,
        extra_modules: args.modules,
        extra_initrd_modules: args.initrd_modules,
        busybox: args.busybox,
        keep_work: args.keep_work,
        update_keys: expand_keys(&args.update_keys)?,
        health_units: args.health_units,
        extra_units: args.units,
    };
    let m = mkimage::build(&cfg).context("building the Keel image")?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "mkimage: done in {:.1}s: {} ({:.0} MiB, {:.1} MiB allocated); USR {:.1} MiB; initramfs {:.1} MiB; UKI {:.1} MiB",
        started.elapsed().as_secs_f64(),
        m.image.display(),
        mib(m.image_bytes),
        mib(m.image_allocated_bytes),
        mib(m.usr_bytes),
        mib(m.initrd_bytes),
        mib(m.uki_bytes)
    );
    Ok(())
}
