//! Where user-data comes from: QEMU's fw_cfg (`opt/keel/user-data`), then a NoCloud disk labelled `CIDATA`
//! (vfat or iso9660 holding `user-data` and `meta-data`), as cloud-init's conventions have it.
//!
//! Owns: reading those sources (mounting a CIDATA disk read-only on a private directory and unmounting it again)
//! and the platform variables (`$private_ipv4`, `$public_ipv4`, `$hostname`). Does not: parse or apply.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::Vars;

pub const FW_CFG_NAME: &str = "opt/keel/user-data";
const FW_CFG_ROOT: &str = "/sys/firmware/qemu_fw_cfg/by_name";

/// The user-data text and where it came from.
#[derive(Debug, Clone)]
pub struct Found {
    pub origin: String,
    pub user_data: String,
    pub meta_data: Option<String>,
}

/// Look in every source, first hit wins.
pub fn find() -> Option<Found> {
    from_fw_cfg().or_else(from_cidata)
}

fn from_fw_cfg() -> Option<Found> {
    let p = Path::new(FW_CFG_ROOT).join(FW_CFG_NAME).join("raw");
    let user_data = fs::read_to_string(&p).ok()?;
    let meta = Path::new(FW_CFG_ROOT).join("opt/keel/meta-data/raw");
    Some(Found { origin: format!("fw_cfg {FW_CFG_NAME}"), user_data, meta_data: fs::read_to_string(meta).ok() })
}

/// Block devices whose filesystem label is CIDATA (vfat: label in the boot sector; iso9660: volume id).
fn cidata_devices() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir("/sys/class/block").into_iter().flatten().flatten() {
        let dev = PathBuf::from("/dev").join(e.file_name());
        let mut buf = vec![0u8; 0x8028];
        let Ok(mut f) = fs::File::open(&dev) else { continue };
        let n = f.read(&mut buf).unwrap_or(0);
        let label_at = |off: usize| buf.get(off..off + 6) == Some(b"CIDATA".as_slice()) || buf.get(off..off + 6) == Some(b"cidata".as_slice());
        if n >= 0x60 && (label_at(0x47) || label_at(0x2B)) || n >= 0x8028 && label_at(0x8028) {
            out.push(dev);
        }
    }
    out
}

fn from_cidata() -> Option<Found> {
    for dev in cidata_devices() {
        let mnt = Path::new("/run/keel/cidata");
        let _ = fs::create_dir_all(mnt);
        let flags = nix::mount::MsFlags::MS_RDONLY | nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC;
        let mounted = ["vfat", "iso9660"].iter().any(|fs| nix::mount::mount(Some(&dev), mnt, Some(*fs), flags, None::<&str>).is_ok());
        if !mounted {
            continue;
        }
        let user_data = fs::read_to_string(mnt.join("user-data")).ok();
        let meta_data = fs::read_to_string(mnt.join("meta-data")).ok();
        let _ = nix::mount::umount(mnt);
        if let Some(user_data) = user_data {
            return Some(Found { origin: format!("NoCloud disk {}", dev.display()), user_data, meta_data });
        }
    }
    None
}

/// `$private_ipv4` = the first non-loopback IPv4 address in a private range, `$public_ipv4` = the first other
/// one (or the private one when there is none), `$hostname` from meta-data's `local-hostname`.
pub fn variables(meta_data: Option<&str>) -> Vars {
    let mut vars = Vars::new();
    let mut private = None;
    let mut public = None;
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(ip) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()) else { continue };
            if ip.is_loopback() || a.interface_name.starts_with("keel") || a.interface_name.starts_with("veth") {
                continue;
            }
            if ip.is_private() {
                private.get_or_insert(ip.to_string());
            } else {
                public.get_or_insert(ip.to_string());
            }
        }
    }
    if let Some(p) = private.clone().or(public.clone()) {
        vars.insert("private_ipv4".into(), p);
    }
    if let Some(p) = public.or(private) {
        vars.insert("public_ipv4".into(), p);
    }
    if let Some(h) = meta_data.and_then(|m| m.lines().find_map(|l| l.trim().strip_prefix("local-hostname:")).map(|h| h.trim().to_string())) {
        vars.insert("hostname".into(), h);
    }
    vars
}
