//! The QEMU command lines Keel's images boot with, shared by `keelvm` and the tests' harness.
//!
//! Owns: machine type, firmware files (OVMF code + a per-VM vars copy), the disk, serial console, the debug
//! shell's virtio-serial port, fw_cfg files, networking flags. TCG only: KVM does not work on the build
//! machines (see docs/image.md). Does not: start or watch processes (keelvm and tests/src do).

use std::path::{Path, PathBuf};

use crate::mkimage::content::SHELL_PORT;

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// fw_cfg name the cloud-config user-data is passed under.
pub const USER_DATA_FW_CFG: &str = "opt/keel/user-data";

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(
        "qemu-system-x86_64 not found; install qemu-system-x86 (this machine's qemu-utils comes from \
         bookworm-backports, so: apt-get install -t bookworm-backports qemu-system-x86)"
    )]
    NoQemu,
    #[error("{} not found; install the Debian package ovmf", path.display())]
    NoOvmf { path: PathBuf },
    #[error("qemu-img not found; install the Debian package qemu-utils")]
    NoQemuImg,
    #[error("qemu-img create failed for {}: {output}", path.display())]
    Overlay { path: PathBuf, output: String },
    #[error("cannot prepare {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// How the VM boots.
#[derive(Debug, Clone)]
pub enum Boot {
    /// `-kernel/-initrd/-append`: no firmware, no bootloader; the fastest path.
    Direct { kernel: PathBuf, initrd: PathBuf, cmdline: String },
    /// OVMF → systemd-boot → UKI on the ESP. `vars` is this VM's own copy of OVMF_VARS.
    Uefi { vars: PathBuf },
}

/// Where the serial console goes.
#[derive(Debug, Clone)]
pub enum Console {
    /// The terminal, with QEMU's monitor multiplexed (Ctrl-A X quits, Ctrl-A C monitor).
    Terminal,
    /// QEMU's stdout (a pipe the caller reads).
    Stdout,
}

#[derive(Debug, Clone)]
pub enum Net {
    None,
    /// A tap device (made by the caller, e.g. inside a test network namespace).
    Tap { ifname: String, mac: String },
    /// QEMU's user-mode network (slirp): the guest is 10.0.2.15/24 and reaches the host's loopback at
    /// 10.0.2.2 (e.g. an update server on 127.0.0.1). Nothing listens on the host for the guest.
    User,
}

#[derive(Debug, Clone)]
pub struct VmSpec {
    pub disk: PathBuf,
    /// "qcow2" or "raw"
    pub disk_format: String,
    pub boot: Boot,
    pub memory_mib: u32,
    pub cpus: u32,
    pub console: Console,
    /// Unix socket QEMU listens on for the debug shell port (`org.keel.shell`).
    pub shell_socket: Option<PathBuf>,
    /// `-fw_cfg name=…,file=…`
    pub fw_cfg_files: Vec<(String, PathBuf)>,
    /// `-fw_cfg name=…,string=…`
    pub fw_cfg_strings: Vec<(String, String)>,
    pub net: Net,
    pub extra: Vec<String>,
}

impl VmSpec {
    pub fn new(disk: PathBuf, boot: Boot) -> VmSpec {
        VmSpec {
            disk,
            disk_format: "qcow2".into(),
            boot,
            memory_mib: 512,
            cpus: 1,
            console: Console::Stdout,
            shell_socket: None,
            fw_cfg_files: Vec::new(),
            fw_cfg_strings: Vec::new(),
            net: Net::None,
            extra: Vec::new(),
        }
    }

    /// The arguments after `qemu-system-x86_64`.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
        push(&["-accel", "tcg", "-smp", &self.cpus.to_string(), "-m", &self.memory_mib.to_string()]);
        // -nodefaults: no default VGA, CD-ROM (OVMF would try to boot it first), floppy or NIC
        push(&["-nodefaults", "-display", "none", "-no-reboot"]);
        match &self.boot {
            Boot::Direct { kernel, initrd, cmdline } => {
                push(&["-machine", "pc"]);
                push(&["-kernel", &kernel.display().to_string(), "-initrd", &initrd.display().to_string()]);
                push(&["-append", cmdline]);
            }
            Boot::Uefi { vars } => {
                push(&["-machine", "q35"]);
                push(&["-drive", &format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}")]);
                push(&["-drive", &format!("if=pflash,format=raw,unit=1,file={}", vars.display())]);
            }
        }
        push(&["-drive", &format!("file={},format={},if=virtio", self.disk.display(), self.disk_format)]);
        match self.console {
            Console::Terminal => push(&["-serial", "mon:stdio"]),
            Console::Stdout => push(&["-serial", "stdio", "-monitor", "none"]),
        }
        if let Some(sock) = &self.shell_socket {
            push(&["-device", "virtio-serial-pci,id=vser0"]);
            push(&["-chardev", &format!("socket,id=keelsh,path={},server=on,wait=off", sock.display())]);
            push(&["-device", &format!("virtserialport,bus=vser0.0,chardev=keelsh,name={SHELL_PORT}")]);
        }
        for (name, file) in &self.fw_cfg_files {
            push(&["-fw_cfg", &format!("name={name},file={}", file.display())]);
        }
        for (name, s) in &self.fw_cfg_strings {
            push(&["-fw_cfg", &format!("name={name},string={s}")]);
        }
        match &self.net {
            Net::None => push(&["-nic", "none"]),
            Net::Tap { ifname, mac } => {
                push(&["-netdev", &format!("tap,id=n0,ifname={ifname},script=no,downscript=no")]);
                push(&["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")]);
            }
            Net::User => {
                push(&["-netdev", "user,id=n0,ipv6=off"]);
                push(&["-device", "virtio-net-pci,netdev=n0"]);
            }
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

pub fn qemu_binary() -> Result<PathBuf, QemuError> {
    find_on_path("qemu-system-x86_64").ok_or(QemuError::NoQemu)
}

/// Copy pristine OVMF vars for one VM (each VM needs its own: firmware writes boot entries there).
pub fn fresh_vars(dst: &Path) -> Result<(), QemuError> {
    for p in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(p).is_file() {
            return Err(QemuError::NoOvmf { path: p.into() });
        }
    }
    std::fs::copy(OVMF_VARS, dst).map_err(|source| QemuError::Io { path: dst.to_path_buf(), source })?;
    Ok(())
}

/// A qcow2 overlay on top of a raw base image, so the base stays pristine.
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<(), QemuError> {
    let qemu_img = find_on_path("qemu-img").ok_or(QemuError::NoQemuImg)?;
    let base_abs = std::fs::canonicalize(base).map_err(|source| QemuError::Io { path: base.to_path_buf(), source })?;
    if overlay.exists() {
        std::fs::remove_file(overlay).map_err(|source| QemuError::Io { path: overlay.to_path_buf(), source })?;
    }
    let out = std::process::Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base_abs)
        .arg(overlay)
        .output()
        .map_err(|source| QemuError::Io { path: overlay.to_path_buf(), source })?;
    if !out.status.success() {
        return Err(QemuError::Overlay {
            path: overlay.to_path_buf(),
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_boot_has_kernel_and_no_nic() {
        let spec = VmSpec::new(
            "d.qcow2".into(),
            Boot::Direct { kernel: "k".into(), initrd: "i".into(), cmdline: "console=ttyS0".into() },
        );
        let a = spec.args().join(" ");
        assert!(a.contains("-kernel k -initrd i -append console=ttyS0"));
        assert!(a.contains("-nic none"));
        assert!(a.contains("-accel tcg"));
    }

    #[test]
    fn uefi_uses_own_vars() {
        let spec = VmSpec::new("d.qcow2".into(), Boot::Uefi { vars: "/tmp/v.fd".into() });
        assert!(spec.args().iter().any(|x| x.ends_with("unit=1,file=/tmp/v.fd")));
    }
}
