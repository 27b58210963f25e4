//! `keelvm`: boot a built Keel image in QEMU for development, console on the terminal.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use keel_image::mkimage::content::AUTOLOGIN_FW_CFG;
use keel_image::mkimage::Manifest;
use keel_image::qemu::{self, Boot, Console, VmSpec};

/// Boot Keel's image (built by mkimage into out/) in QEMU, serial console on
/// this terminal. TCG only (no KVM here), -smp 1 -m 512, no network unless
/// --user-net or --tap.
///
///   keelvm run          direct kernel boot (-kernel/-initrd/-append): fastest
///   keelvm run --uefi   the real path: OVMF -> systemd-boot -> UKI on the ESP
///                       (boot counting applies)
///
/// The VM writes to out/vm/disk.qcow2, an overlay on out/keel.img that
/// survives between runs (--fresh starts over); UEFI gets its own
/// out/vm/OVMF_VARS.fd. The console logs you in as root (fw_cfg
/// opt/keel/autologin; --no-autologin for the plain boot), so `initctl list`
/// works at once. QEMU keys: Ctrl-A X quits, Ctrl-A C toggles the monitor.
///
/// A second root shell runs on a virtio-serial port; from another terminal:
///   keelvm shell
///
/// One VM per output directory: while it runs, its QEMU holds out/vm/lock and
/// a second `keelvm run` on the same --out is refused (its disk and shell
/// socket stay untouched).
///
/// Examples:
///   keelvm run --user-data my.yml     # cloud-config via fw_cfg opt/keel/user-data
///   keelvm run --slot USR-B           # direct boot of one slot (default: gpt,
///                                     # the GPT slot bits decide, as after updates)
///   keelvm run --user-net             # network: the host's 127.0.0.1 is 10.0.2.2
///   keelvm run --append keel.rescue   # rescue shell in the initramfs
///   keelvm print --uefi               # show the QEMU command line only
#[derive(Parser, Debug)]
#[command(name = "keelvm", version, verbatim_doc_comment)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot the image (replaces this process with QEMU).
    Run(RunArgs),
    /// Attach this terminal to the debug shell of a running `keelvm run` (virtio-serial port).
    Shell {
        /// The socket `keelvm run` created.
        #[arg(long, default_value = "out/vm/shell.sock")]
        socket: PathBuf,
    },
    /// Print the QEMU command line `run` would execute (changes nothing on disk).
    Print(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// mkimage's output directory.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// Boot through OVMF + systemd-boot instead of direct kernel boot.
    #[arg(long)]
    uefi: bool,
    /// Discard out/vm/disk.qcow2 (and UEFI vars) first.
    #[arg(long)]
    fresh: bool,
    /// Direct boot only: "gpt" (the initramfs chooses from the GPT slot bits, so updates and fallbacks
    /// take effect), or USR-A / USR-B to force one slot.
    #[arg(long, default_value = "gpt")]
    slot: String,
    /// Direct boot only: extra kernel command line.
    #[arg(long, default_value = "")]
    append: String,
    /// cloud-config user-data file passed as fw_cfg opt/keel/user-data.
    #[arg(long)]
    user_data: Option<PathBuf>,
    /// Memory in MiB (UEFI needs at least 160).
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// Do not log in on the console.
    #[arg(long)]
    no_autologin: bool,
    /// Attach a tap device (NAME,MAC), e.g. inside a network namespace.
    #[arg(long, conflicts_with = "user_net")]
    tap: Option<String>,
    /// QEMU user-mode network: the guest is 10.0.2.15 (cloud-config keel.network) and reaches the
    /// host's loopback at 10.0.2.2, e.g. an updateserver on 127.0.0.1.
    #[arg(long)]
    user_net: bool,
}

/// The QEMU invocation for `a`, touching nothing on disk (`print` shows it; `run` prepares it first).
fn build_spec(a: &RunArgs, m: &Manifest) -> anyhow::Result<VmSpec> {
    let vm = a.out.join("vm");
    let boot = if a.uefi {
        Boot::Uefi { vars: vm.join("OVMF_VARS.fd") }
    } else {
        let mut cmdline = match a.slot.as_str() {
            "gpt" => m.cmdline.clone(),
            "USR-A" | "USR-B" => m.cmdline_for(&a.slot),
            other => bail!("--slot {other}: expected USR-A, USR-B or gpt"),
        };
        if !a.append.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&a.append);
        }
        Boot::Direct { kernel: m.kernel.clone(), initrd: m.initrd.clone(), cmdline }
    };
    let mut spec = VmSpec::new(vm.join("disk.qcow2"), boot);
    spec.memory_mib = a.mem;
    spec.console = Console::Terminal;
    spec.shell_socket = Some(vm.join("shell.sock"));
    if let Some(ud) = &a.user_data {
        spec.fw_cfg_files.push((qemu::USER_DATA_FW_CFG.into(), ud.clone()));
    }
    if !a.no_autologin {
        spec.fw_cfg_strings.push((AUTOLOGIN_FW_CFG.into(), "1".into()));
    }
    if let Some(t) = &a.tap {
        let (ifname, mac) = t.split_once(',').context("--tap wants NAME,MAC")?;
        spec.net = qemu::Net::Tap { ifname: ifname.into(), mac: mac.into() };
    }
    if a.user_net {
        spec.net = qemu::Net::User;
    }
    Ok(spec)
}

fn load_manifest(out: &Path) -> anyhow::Result<Manifest> {
    Manifest::load(out).with_context(|| {
        format!("no built image in {}: run mkimage first (target/x86_64-unknown-linux-gnu/release/mkimage)", out.display())
    })
}

/// Take `<out>/vm/lock` for as long as this VM runs: the lock is inherited by QEMU across `exec`, so a second
/// `keelvm run` on the same directory stops here instead of replacing the running VM's disk (`--fresh`) or
/// its debug-shell socket.
fn lock_vm_dir(vm: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(vm).with_context(|| format!("creating {}", vm.display()))?;
    let path = vm.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "a VM is already running from {} (its QEMU holds {}): attach to it with `keelvm shell`, stop it \
             (Ctrl-A X in its terminal, or `initctl poweroff` inside), or give this one another --out",
            vm.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
    }
    // Keep the lock across exec: QEMU holds it until it exits.
    rustix::io::fcntl_setfd(&f, rustix::io::FdFlags::empty()).with_context(|| format!("keeping {} open for QEMU", path.display()))?;
    Ok(f)
}

/// What `run` changes on disk before QEMU starts: a new overlay (and UEFI vars) when asked or missing, and
/// no stale debug-shell socket. Only called with the VM directory locked.
fn prepare(a: &RunArgs, m: &Manifest, spec: &VmSpec) -> anyhow::Result<()> {
    if a.fresh || !spec.disk.exists() {
        qemu::create_overlay(&m.image, &spec.disk)?;
    }
    if let Boot::Uefi { vars } = &spec.boot {
        if a.fresh || !vars.exists() {
            qemu::fresh_vars(vars)?;
        }
    }
    if let Some(sock) = &spec.shell_socket {
        let _ = std::fs::remove_file(sock);
    }
    Ok(())
}

/// Run; on failure one line on stderr (`keelvm: what failed: why`) and exit status 1.
fn main() -> std::process::ExitCode {
    keel_model::report::exit("keelvm", run())
}

fn run() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Run(a) => {
            let m = load_manifest(&a.out)?;
            let spec = build_spec(&a, &m)?;
            let q = qemu::qemu_binary()?;
            let _lock = lock_vm_dir(&a.out.join("vm"))?;
            prepare(&a, &m, &spec)?;
            eprintln!("keelvm: {} {}", q.display(), spec.args().join(" "));
            eprintln!("keelvm: Ctrl-A X quits; `keelvm shell` attaches a second root shell");
            let err = std::process::Command::new(&q).args(spec.args()).exec();
            Err(err).with_context(|| format!("executing {}", q.display()))
        }
        Cmd::Print(a) => {
            let spec = build_spec(&a, &load_manifest(&a.out)?)?;
            println!("{} {}", qemu::qemu_binary()?.display(), spec.args().join(" "));
            Ok(())
        }
        Cmd::Shell { socket } => {
            let mut s = std::os::unix::net::UnixStream::connect(&socket)
                .with_context(|| format!("connecting to {} (is `keelvm run` running?)", socket.display()))?;
            let mut r = s.try_clone().context("cloning the socket")?;
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut out = std::io::stdout();
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 || out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let _ = out.flush();
                }
            });
            eprintln!("keelvm: attached to the debug shell; Ctrl-D leaves");
            s.write_all(b"\n").context("writing to the shell")?;
            let mut buf = [0u8; 4096];
            let mut inp = std::io::stdin();
            loop {
                let n = inp.read(&mut buf).context("reading stdin")?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..n]).context("writing to the shell")?;
            }
        }
    }
}
