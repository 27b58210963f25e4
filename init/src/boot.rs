//! Early boot for PID 1: the pseudo-filesystems, `/` shared, hostname, console, machine-id.
//!
//! Owns: mounting proc, sysfs, devtmpfs, devpts, /dev/shm, /run and cgroup2 — each only if not already
//! mounted, so the same code serves a real boot and a test namespace. Does not: mount /usr or the state
//! partition (the initramfs does that, see `initrd`).

use std::fs;
use std::path::Path;

use nix::mount::{mount, MsFlags};

/// One early mount: (source, target, fstype, flags, data).
type MountSpec = (&'static str, &'static str, &'static str, MsFlags, Option<&'static str>);

fn early_mounts() -> Vec<MountSpec> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    vec![
        ("proc", "/proc", "proc", nosuid_nodev_noexec, None),
        ("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None),
        ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755")),
        ("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("gid=5,mode=620,ptmxmode=000")),
        ("tmpfs", "/dev/shm", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777")),
        ("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755")),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_nodev_noexec, Some("nsdelegate")),
    ]
}

/// Mount points currently mounted with their fs type, from /proc/self/mountinfo.
pub fn mounted() -> Vec<(String, String)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((f.get(4)?.to_string(), f.get(sep + 1)?.to_string()))
        })
        .collect()
}

/// Mount what is missing; each failure is reported and boot continues.
pub fn mount_early() -> Vec<String> {
    let mut notes = Vec::new();
    for (src, target, fstype, flags, data) in early_mounts() {
        let present = mounted().iter().any(|(t, f)| t == target && f == fstype);
        if present {
            continue;
        }
        let _ = fs::create_dir_all(target);
        let res = mount(Some(src), target, Some(fstype), flags, data)
            .or_else(|_| mount(Some(src), target, Some(fstype), flags, None::<&str>));
        if let Err(e) = res {
            notes.push(format!("cannot mount {fstype} on {target}: {e}"));
        }
    }
    // Mount events propagate into container mount namespaces that ask for them (systemd does the same).
    if let Err(e) = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>) {
        notes.push(format!("cannot make / shared: {e}"));
    }
    notes
}

/// Set the hostname from `name`, or /etc/hostname, or leave it.
pub fn set_hostname(name: Option<&str>) -> Option<String> {
    let from_file = fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let name = name.map(str::to_string).or(from_file)?;
    nix::unistd::sethostname(&name).ok()?;
    Some(name)
}

pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

/// Point stdin/stdout/stderr at /dev/console when PID 1 was started without them.
pub fn attach_console() {
    let Ok(console) = fs::OpenOptions::new().read(true).write(true).open("/dev/console") else { return };
    use std::os::fd::AsRawFd;
    for fd in 0..3 {
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            let _ = nix::unistd::dup2(console.as_raw_fd(), fd);
        }
    }
}

/// A fresh random 128-bit id as 32 hex digits (boot id, machine id).
///
/// Read from /proc/sys/kernel/random/uuid, which never blocks: /dev/urandom waits for the kernel's CRNG to be
/// seeded, which under emulation takes over a second of early boot.
pub fn random_id() -> String {
    if let Ok(u) = fs::read_to_string("/proc/sys/kernel/random/uuid") {
        let hex: String = u.trim().chars().filter(char::is_ascii_hexdigit).collect();
        if hex.len() == 32 {
            return hex;
        }
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:032x}", t ^ u128::from(std::process::id()))
}

/// A machine's stable identity: the VM's or board's DMI product UUID where the platform sets one (as systemd
/// does in VMs), otherwise random. Mixed with the NICs' MAC addresses so identical clones of one image that boot
/// before the kernel's entropy is seeded still differ.
fn new_machine_id() -> String {
    let dmi = fs::read_to_string("/sys/class/dmi/id/product_uuid").unwrap_or_default();
    let dmi: String = dmi.trim().chars().filter(char::is_ascii_hexdigit).collect::<String>().to_lowercase();
    if dmi.len() == 32 && dmi.chars().any(|c| c != '0') && dmi.chars().any(|c| c != 'f') {
        return dmi;
    }
    let mut id: Vec<u8> = (0..16).filter_map(|i| u8::from_str_radix(random_id().get(2 * i..2 * i + 2)?, 16).ok()).collect();
    for e in fs::read_dir("/sys/class/net").into_iter().flatten().flatten() {
        let mac = fs::read_to_string(e.path().join("address")).unwrap_or_default();
        for (i, b) in mac.trim().split(':').filter_map(|x| u8::from_str_radix(x, 16).ok()).enumerate() {
            if let Some(slot) = id.get_mut(i % 16) {
                *slot ^= b;
            }
        }
    }
    id.iter().map(|x| format!("{x:02x}")).collect()
}

/// /etc/machine-id, generated on first boot if missing or empty.
pub fn ensure_machine_id(path: &Path) -> Option<String> {
    if let Ok(s) = fs::read_to_string(path) {
        let s = s.trim();
        if s.len() == 32 {
            return Some(s.to_string());
        }
    }
    let id = new_machine_id();
    let text = format!("{id}\n");
    // A bind-mounted /etc/machine-id cannot be renamed over: write it in place then.
    write_durably(path, text.as_bytes()).or_else(|_| fs::write(path, &text)).ok()?;
    Some(id)
}

/// Write `path` so a power cut leaves either the old file or the whole new one: a temporary file in the same
/// directory, fsync, rename, fsync the directory. The machine id must survive a kill during the first boot,
/// or the update server and the cluster would see a second machine.
fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("machine-id")
    ));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod machine_id_tests {
    use super::*;

    #[test]
    fn a_new_machine_id_is_written_whole_and_kept_on_the_next_boot() {
        let dir = std::env::temp_dir().join(format!("keel-mid-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("machine-id");
        let first = ensure_machine_id(&path).expect("id written");
        assert_eq!(first.len(), 32);
        assert_eq!(fs::read_to_string(&path).expect("read back"), format!("{first}\n"));
        assert!(!dir.join(".machine-id.tmp").exists(), "no temporary file left behind");
        assert_eq!(ensure_machine_id(&path), Some(first), "an existing id is kept");
        let _ = fs::remove_dir_all(&dir);
    }
}
