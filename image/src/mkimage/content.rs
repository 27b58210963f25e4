//! Files the image ships that are not built binaries: units, helper scripts, /etc skeleton, os-release.
//!
//! Owns: their text. Does not: decide where they go (see `mkimage::stage`).

/// Name of the virtio-serial port that carries the debug shell (QEMU `virtserialport,name=…`).
pub const SHELL_PORT: &str = "org.keel.shell";

/// `fw_cfg` file that turns on the console autologin shell (`-fw_cfg name=opt/keel/autologin,string=1`).
pub const AUTOLOGIN_FW_CFG: &str = "opt/keel/autologin";

pub fn os_release(version: &str) -> String {
    format!(
        "NAME=\"Keel\"\nID=keel\nVERSION=\"{version}\"\nVERSION_ID={version}\nIMAGE_VERSION={version}\n\
         PRETTY_NAME=\"Keel {version}\"\nHOME_URL=\"https://example.invalid/keel\"\n"
    )
}

/// `/usr/lib/keel/debug-shell`: a root shell on the virtio-serial port, for tests and `keelvm --shell`.
pub const DEBUG_SHELL: &str = r#"#!/bin/sh
# Keel debug shell: serves /usr/bin/sh on the virtio-serial port named org.keel.shell
# (QEMU: -device virtio-serial-pci -device virtserialport,chardev=X,name=org.keel.shell).
# The test harness and `keelvm --shell` talk to it. Exits 0 when the port is absent (real machines).
export PATH=/usr/bin:/usr/sbin:/bin:/sbin HOME=/root
for d in /sys/class/virtio-ports/*; do
  [ "$(cat "$d/name" 2>/dev/null)" = org.keel.shell ] || continue
  dev=/dev/${d##*/}
  echo "keel: debug shell on $dev (virtio port org.keel.shell)" >/dev/console
  # a virtio port can be open only once: open it read-write once and share the descriptor
  while :; do /usr/bin/sh -i <>"$dev" >&0 2>&0; sleep 0.5; done
done
exit 0
"#;

/// `/usr/lib/keel/console-shell`: a root shell on the serial console when autologin was asked for.
pub const CONSOLE_SHELL: &str = r#"#!/bin/sh
# Keel console autologin: a root shell on ttyS0 when the kernel command line has keel.autologin
# or QEMU passes -fw_cfg name=opt/keel/autologin,string=1 (keelvm does). Otherwise exits 0:
# production machines are reached over ssh with keys from cloud-config.
export PATH=/usr/bin:/usr/sbin:/bin:/sbin HOME=/root
if grep -qw keel.autologin /proc/cmdline || [ -e /sys/firmware/qemu_fw_cfg/by_name/opt/keel/autologin ]; then
  while :; do /usr/bin/getty -n -l /usr/lib/keel/autologin -L 115200 ttyS0 vt100; sleep 1; done
fi
exit 0
"#;

pub const AUTOLOGIN: &str = "#!/bin/sh\n# getty's login program for keel.autologin: a root login shell, no password.\ncd /root 2>/dev/null\nexec /usr/bin/sh -l\n";

/// Stand-in for Keel's init when `init` was not built: mounts, starts the two helper scripts, prints the
/// placeholder ready marker and handles busybox's poweroff/reboot signals.
pub const PLACEHOLDER_INIT: &str = r#"#!/bin/sh
# PLACEHOLDER for Keel's init, installed by mkimage because target/.../release/init was missing.
export PATH=/usr/bin:/usr/sbin:/bin:/sbin HOME=/root
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts
mountpoint -q /run || mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname -F /etc/hostname 2>/dev/null
/usr/lib/keel/debug-shell &
/usr/lib/keel/console-shell &
down() { echo "keel: placeholder init: $1"; sync; umount -a -r 2>/dev/null; "$1" -f; }
trap 'down poweroff' USR2; trap 'down halt' USR1; trap 'down reboot' TERM
echo "keel-ready (placeholder init: Keel's init was not built)"
while :; do wait; sleep 1; done
"#;

pub const DEBUG_SHELL_UNIT: &str = "[Unit]\n\
Description=Root shell on the virtio-serial port org.keel.shell (tests, keelvm --shell)\n\n\
[Service]\nExecStart=/usr/lib/keel/debug-shell\nRestart=no\n\
# interactive shells ignore SIGTERM: do not hold up a shutdown for the default 90 s\n\
TimeoutStopSec=2\n\n\
[Install]\nWantedBy=multi-user.target\n";

pub const CONSOLE_SHELL_UNIT: &str = "[Unit]\n\
Description=Root shell on the serial console when keel.autologin is set\n\n\
[Service]\nExecStart=/usr/lib/keel/console-shell\nRestart=no\nTimeoutStopSec=2\n\n\
[Install]\nWantedBy=multi-user.target\n";

pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
pub const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
pub const SHADOW: &str = "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n";
pub const HOSTNAME: &str = "keel\n";
pub const FSTAB: &str = "# Keel mounts /usr (USR-A or USR-B, erofs, read-only) and / (ROOT, ext4) from the initramfs.\n";
pub const PROFILE: &str = "export PATH=/usr/bin:/usr/sbin:/bin:/sbin\nexport PS1='\\h:\\w# '\n";

pub const MULTI_USER_TARGET: &str = "[Unit]\n\
Description=Keel's normal running state: every enabled unit\n";

pub const DEFAULT_TARGET: &str = "[Unit]\n\
Description=What init starts at boot\n\
Wants=multi-user.target\nAfter=multi-user.target\n";

/// `/usr/lib/keel/clusterd-start`: clusterd with flags from cloud-config's `keel.clusterd` section.
pub const CLUSTERD_START: &str = r#"#!/bin/sh
# Start clusterd with its flags taken from cloud-config's keel.clusterd section, which init writes to
# /run/keel/config/clusterd.env as upper-cased keys: NAME=node1 -> --name node1,
# INITIAL_CLUSTER=a=http://... -> --initial-cluster a=http://... The member's name defaults to the hostname (members
# of one cluster need distinct names); without the file: a single member named after the host.
set --
named=
env=/run/keel/config/clusterd.env
if [ -r "$env" ]; then
  while IFS= read -r line; do
    case $line in ''|'#'*) continue;; esac
    k=${line%%=*}; v=${line#*=}
    v=$(printf '%s' "$v" | sed -e 's/^"//' -e 's/"$//')
    [ "$k" = NAME ] && named=1
    set -- "$@" "--$(echo "$k" | tr 'A-Z_' 'a-z-')" "$v"
  done < "$env"
fi
[ -n "$named" ] || set -- "$@" --name "$(hostname)"
ip link set lo up 2>/dev/null  # normally done by keel-loopback.service already
exec /usr/bin/clusterd "$@"
"#;

pub const CLUSTERD_UNIT: &str = "[Unit]\n\
Description=Keel cluster store (Raft-replicated KV, etcd v2 API) and fleet engine\n\
Wants=keel-loopback.service\nAfter=keel-loopback.service\n\n\
[Service]\nType=notify\nExecStart=/usr/lib/keel/clusterd-start\nRestart=always\nRestartSec=1\n\n\
[Install]\nWantedBy=multi-user.target\n";

pub const LOOPBACK_UNIT: &str = "[Unit]\n\
Description=Bring up the loopback interface (127.0.0.1, ::1)\n\n\
[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/ip link set lo up\n\n\
[Install]\nWantedBy=multi-user.target\n";

/// Units the update health gate requires when the image is built without `--health-unit`
/// (`/usr/lib/keel/update-health-units`; cloud-config's `keel.update.health_units` adds more).
pub const DEFAULT_HEALTH_UNITS: &[&str] = &["keel-loopback.service", "update-engine.service"];

/// `/usr/lib/keel/update-health-units`: one unit per line.
pub fn health_units_file(units: &[String]) -> String {
    let mut s = String::from(
        "# Units that must be active before update-engine blesses a freshly updated USR slot (its health gate).\n\
         # cloud-config's keel.update.health_units adds more (comma-separated). docs/updater.md\n",
    );
    for u in units {
        s.push_str(u);
        s.push('\n');
    }
    s
}

/// `/usr/lib/keel/update-engine-start`: update-engine with the settings of cloud-config's `keel.update`
/// section, after mounting the ESP at /efi.
pub const UPDATE_ENGINE_START: &str = r#"#!/bin/sh
# Start update-engine with the settings of cloud-config's keel.update section, which init writes to
# /run/keel/config/update.env as upper-cased keys (SERVER=..., GROUP=..., CHANNEL=...). Every key is also
# exported as KEEL_UPDATE_<KEY> for the engine. Mounts the ESP (PARTLABEL EFI-SYSTEM on the boot disk) at
# /efi first: the engine puts a new slot's kernel image there. Without SERVER there are no periodic
# checks (updatectl check/apply still work), but the health gate still blesses a freshly updated slot.
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
env=/run/keel/config/update.env
units=$(grep -v -e '^#' -e '^[[:space:]]*$' /usr/lib/keel/update-health-units 2>/dev/null | tr '\n' ',')
server= group= channel=
set --
if [ -r "$env" ]; then
  while IFS= read -r line; do
    case $line in ''|'#'*) continue;; esac
    k=${line%%=*}; v=${line#*=}
    case $k in *[!A-Z0-9_]*|'') continue;; esac
    v=$(printf '%s' "$v" | sed -e 's/^"//' -e 's/"$//' -e 's/\\"/"/g' -e 's/\\\\/\\/g')
    export "KEEL_UPDATE_$k=$v"
    case $k in
      SERVER) server=$v;;
      GROUP) group=$v;;
      CHANNEL) channel=$v;;
      HEALTH_UNITS) units="$units,$v";;
      FIRST_CHECK|INTERVAL|JITTER|MAX_BACKOFF|HEALTH_HOLD|HEALTH_TIMEOUT|HEALTH_CMD|HEALTH_FAILURE|MAX_DOWNLOAD_RATE)
        set -- "$@" "--$(echo "$k" | tr 'A-Z_' 'a-z-')" "$v";;
      ALLOW_DOWNGRADE) [ "$v" = true ] && set -- "$@" --allow-downgrade;;
    esac
  done < "$env"
fi
if [ -n "$server" ]; then set -- "$@" --server "$server"; else set -- "$@" --no-schedule; fi
track=${group:-$channel}
[ -n "$track" ] && set -- "$@" --channel "$track"
units=$(printf '%s' "$units" | tr -s ', ' ',' | sed -e 's/^,//' -e 's/,$//')
[ -n "$units" ] && set -- "$@" --health-units "$units"

# the boot disk: the parent of the ROOT partition the initramfs mounted
root=$(sed -n 's/^KEEL_ROOT_DEVICE=//p' /run/keel/boot.env 2>/dev/null)
part=${root##*/}
disk=vda
[ -n "$part" ] && [ -e "/sys/class/block/$part/partition" ] && disk=$(basename "$(dirname "$(readlink -f "/sys/class/block/$part")")")
esp=
for u in /sys/class/block/"$disk"/"$disk"*/uevent; do
  grep -qx 'PARTNAME=EFI-SYSTEM' "$u" 2>/dev/null && esp=/dev/$(sed -n 's/^DEVNAME=//p' "$u")
done
mkdir -p /efi
if ! mountpoint -q /efi; then
  if [ -z "$esp" ]; then
    echo "update-engine-start: no EFI-SYSTEM partition on /dev/$disk; new kernel images cannot be installed" >&2
  elif ! mount -t vfat -o noatime,umask=0077 "$esp" /efi; then
    echo "update-engine-start: cannot mount the ESP $esp at /efi (is the vfat module loaded?)" >&2
  fi
fi
exec /usr/bin/update-engine --disk "/dev/$disk" --esp /efi "$@"
"#;

pub const UPDATE_ENGINE_UNIT: &str = "[Unit]\n\
Description=Keel update engine: Omaha checks, signed A/B updates, the post-update health gate\n\
Wants=keel-loopback.service\nAfter=keel-loopback.service keel-network.service\n\n\
[Service]\nExecStart=/usr/lib/keel/update-engine-start\nRestart=always\nRestartSec=5\n\n\
[Install]\nWantedBy=multi-user.target\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_scripts_parse_with_sh() {
        for (name, script) in [
            ("debug-shell", DEBUG_SHELL),
            ("console-shell", CONSOLE_SHELL),
            ("clusterd-start", CLUSTERD_START),
            ("update-engine-start", UPDATE_ENGINE_START),
        ] {
            let out = std::process::Command::new("sh").args(["-n", "-c", script]).output().expect("run sh");
            assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    /// clusterd-start's argv for a clusterd.env (None: no file), with `clusterd` replaced by printing its args.
    fn clusterd_start_args(env: Option<&str>) -> Vec<String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("clusterd.env");
        if let Some(text) = env {
            std::fs::write(&path, text).expect("env");
        }
        let script = CLUSTERD_START
            .replace("/run/keel/config/clusterd.env", &path.display().to_string())
            .replace("ip link set lo up", ":")
            .replace("exec /usr/bin/clusterd \"$@\"", "printf '%s\\n' \"$@\"");
        let out = std::process::Command::new("sh").args(["-c", &script]).output().expect("run sh");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
    }

    #[test]
    fn clusterd_start_turns_the_section_into_flags_and_names_the_member_after_the_host() {
        let host = String::from_utf8_lossy(&std::process::Command::new("hostname").output().expect("hostname").stdout)
            .trim()
            .to_string();
        assert_eq!(clusterd_start_args(None), ["--name", host.as_str()]);
        // A section without `name:` (the docs' discovery example): still named after the host, not "default".
        let args = clusterd_start_args(Some("DISCOVERY=\"http://10.0.0.100:8087/abc\"\nLISTEN_PEER_URLS=http://10.0.0.5:2380\n"));
        assert_eq!(args, ["--discovery", "http://10.0.0.100:8087/abc", "--listen-peer-urls", "http://10.0.0.5:2380", "--name", host.as_str()]);
        let args = clusterd_start_args(Some("# from cloud-config\nNAME=node1\nINITIAL_CLUSTER=node1=http://10.0.0.5:2380\n"));
        assert_eq!(args, ["--name", "node1", "--initial-cluster", "node1=http://10.0.0.5:2380"]);
    }

    #[test]
    fn health_units_file_lists_one_unit_per_line_after_comments() {
        let text = health_units_file(&["a.service".into(), "b.service".into()]);
        let units: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(units, ["a.service", "b.service"]);
    }

    #[test]
    fn update_engine_unit_is_enabled_and_ordered_after_the_network() {
        assert!(UPDATE_ENGINE_UNIT.contains("WantedBy=multi-user.target"));
        assert!(UPDATE_ENGINE_UNIT.contains("After=keel-loopback.service keel-network.service"));
        assert!(DEFAULT_HEALTH_UNITS.contains(&"update-engine.service"));
    }
}
