//! Slot bookkeeping for the A/B USR partitions.
//!
//! Owns: the boot counter in each slot's kernel-image file name on the ESP
//! (`EFI/Linux/keel-<version>-usr-<a|b>[+left-done].efi`, systemd-boot boot counting) and the priority /
//! tries / successful bits of each USR partition's GPT entry (bits 48–51 / 52–55 / 56, as ChromeOS `cgpt`
//! and CoreOS define them). Both are always written together, here and nowhere else.
//! Does not: download, verify or write partition contents (see `payload`), or decide when to reboot or
//! whether the system is healthy (see `engine`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use keel_model::gpt::{Disk, GptError, Partition, SlotBits};

use crate::payload::apply::Window;

/// One of the two USR slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Slot::A => "USR-A",
            Slot::B => "USR-B",
        }
    }
    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
    pub fn parse(s: &str) -> Option<Slot> {
        match s.to_ascii_lowercase().as_str() {
            "a" | "usr-a" => Some(Slot::A),
            "b" | "usr-b" => Some(Slot::B),
            _ => None,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A kernel image on the ESP, parsed from its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelEntry {
    pub file: String,
    pub version: String,
    pub slot: Slot,
    /// `(tries_left, tries_done)` while not yet blessed.
    pub counter: Option<(u32, u32)>,
}

impl KernelEntry {
    /// Parses `keel-<version>-usr-<a|b>[+L[-D]].efi`.
    pub fn parse(file: &str) -> Option<KernelEntry> {
        let stem = file.strip_prefix("keel-")?.strip_suffix(".efi")?;
        let (base, counter) = match stem.rfind('+') {
            Some(i)
                if stem[i + 1..]
                    .split('-')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) =>
            {
                let mut it = stem[i + 1..].split('-');
                let left = it.next()?.parse().ok()?;
                let done = it.next().map(|d| d.parse().ok()).unwrap_or(Some(0))?;
                (&stem[..i], Some((left, done)))
            }
            _ => (stem, None),
        };
        let (version, slot) = base.rsplit_once("-usr-")?;
        Some(KernelEntry {
            file: file.to_string(),
            version: version.to_string(),
            slot: Slot::parse(slot)?,
            counter,
        })
    }

    pub fn name(version: &str, slot: Slot, counter: Option<(u32, u32)>) -> String {
        match counter {
            Some((l, d)) => format!("keel-{version}-usr-{}+{l}-{d}.efi", slot.letter()),
            None => format!("keel-{version}-usr-{}.efi", slot.letter()),
        }
    }
}

/// Errors from slot operations.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(transparent)]
    Gpt(#[from] GptError),
    #[error("ESP {path}: {context}: {source}")]
    Esp {
        path: PathBuf,
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot roll back to {slot}: {reason}")]
    CannotRollback { slot: Slot, reason: String },
    #[error(
        "version {0:?} cannot be used in a kernel image name (no '/', '+' or whitespace allowed)"
    )]
    BadVersion(String),
}

type Result<T> = std::result::Result<T, SlotError>;

/// State of one slot as both places describe it.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    pub slot: Slot,
    pub flags: SlotBits,
    pub partition_uuid: String,
    pub kernel: Option<KernelEntry>,
}

/// The disk with the USR partitions plus the mounted ESP.
pub struct Slots {
    disk: PathBuf,
    esp: PathBuf,
}

impl Slots {
    pub fn new(disk: impl Into<PathBuf>, esp: impl Into<PathBuf>) -> Slots {
        Slots {
            disk: disk.into(),
            esp: esp.into(),
        }
    }

    pub fn disk(&self) -> &Path {
        &self.disk
    }

    fn linux_dir(&self) -> PathBuf {
        self.esp.join("EFI").join("Linux")
    }

    fn esp_err(&self, context: impl Into<String>, source: std::io::Error) -> SlotError {
        SlotError::Esp {
            path: self.esp.clone(),
            context: context.into(),
            source,
        }
    }

    /// Kernel images for `slot` currently on the ESP (normally zero or one).
    pub fn kernels(&self, slot: Slot) -> Result<Vec<KernelEntry>> {
        let dir = self.linux_dir();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.esp_err(format!("listing {}", dir.display()), e)),
        };
        let mut out: Vec<KernelEntry> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| KernelEntry::parse(&e.file_name().to_string_lossy()))
            .filter(|k| k.slot == slot)
            .collect();
        out.sort_by(|a, b| a.file.cmp(&b.file));
        Ok(out)
    }

    pub fn status(&self) -> Result<Vec<SlotStatus>> {
        let disk = Disk::open(&self.disk)?;
        [Slot::A, Slot::B]
            .into_iter()
            .map(|s| {
                let p = disk.by_label(s.label())?;
                Ok(SlotStatus {
                    slot: s,
                    flags: SlotBits::from_attrs(p.attrs),
                    partition_uuid: p.part_guid.clone(),
                    kernel: self.kernels(s)?.into_iter().next(),
                })
            })
            .collect()
    }

    pub fn flags(&self, slot: Slot) -> Result<SlotBits> {
        let disk = Disk::open(&self.disk)?;
        Ok(SlotBits::from_attrs(
            disk.by_label(slot.label())?.attrs,
        ))
    }

    fn set_flags(&self, changes: &[(Slot, SlotBits)]) -> Result<()> {
        let mut disk = Disk::open_rw(&self.disk)?;
        for (slot, bits) in changes {
            disk.set_slot(slot.label(), *bits)?;
        }
        disk.write()?;
        Ok(())
    }

    /// A write window over `slot`'s partition (for [`crate::payload::apply`]).
    pub fn partition_window(&self, slot: Slot) -> Result<Window> {
        let disk = Disk::open(&self.disk)?;
        let p = disk.by_label(slot.label())?;
        let (start, len) = disk.byte_range(p);
        let f = std::fs::File::options()
            .write(true)
            .open(&self.disk)
            .map_err(|e| {
                SlotError::Gpt(GptError::Io {
                    path: self.disk.clone(),
                    context: "opening for write".into(),
                    source: e,
                })
            })?;
        Ok(Window::new(f, start, len))
    }

    /// Where the engine stages the new kernel image while a payload streams in.
    pub fn staging_path(&self) -> PathBuf {
        self.linux_dir().join(".keel-staging.efi")
    }

    /// Before writing `slot`: make it unbootable in both places (priority 0, no kernel image).
    pub fn clear(&self, slot: Slot) -> Result<()> {
        self.set_flags(&[(
            slot,
            SlotBits {
                priority: 0,
                tries: 0,
                successful: false,
            },
        )])?;
        for k in self.kernels(slot)? {
            let p = self.linux_dir().join(&k.file);
            std::fs::remove_file(&p)
                .map_err(|e| self.esp_err(format!("removing {}", p.display()), e))?;
        }
        self.sync_esp();
        Ok(())
    }

    /// After a payload for `slot` verified: move the staged kernel image to
    /// `keel-<version>-usr-<x>+1-0.efi` and set the slot to priority highest, tries 1, successful 0.
    pub fn install(&self, slot: Slot, version: &str, staged_kernel: &Path) -> Result<String> {
        if version.is_empty() || version.contains(['/', '+', ' ', '\n', '\t']) {
            return Err(SlotError::BadVersion(version.into()));
        }
        std::fs::create_dir_all(self.linux_dir())
            .map_err(|e| self.esp_err("creating EFI/Linux", e))?;
        for k in self.kernels(slot)? {
            let p = self.linux_dir().join(&k.file);
            let _ = std::fs::remove_file(p);
        }
        let name = KernelEntry::name(version, slot, Some((1, 0)));
        let dest = self.linux_dir().join(&name);
        if let Ok(f) = std::fs::File::open(staged_kernel) {
            let _ = f.sync_all();
        }
        std::fs::rename(staged_kernel, &dest).map_err(|e| {
            self.esp_err(
                format!("moving {} to {}", staged_kernel.display(), dest.display()),
                e,
            )
        })?;
        self.sync_esp();
        let other = self.flags(slot.other())?;
        let prio = (other.priority + 1).clamp(2, 15);
        let mut changes = vec![(
            slot,
            SlotBits {
                priority: prio,
                tries: 1,
                successful: false,
            },
        )];
        if other.priority >= prio {
            changes.push((
                slot.other(),
                SlotBits {
                    priority: prio - 1,
                    ..other
                },
            ));
        }
        self.set_flags(&changes)?;
        Ok(name)
    }

    /// The health gate passed on `slot`: drop the boot counter from its kernel image name and set
    /// successful = 1, tries = 0. Idempotent.
    pub fn bless(&self, slot: Slot) -> Result<()> {
        for k in self.kernels(slot)? {
            if k.counter.is_some() {
                let to = KernelEntry::name(&k.version, slot, None);
                let (a, b) = (self.linux_dir().join(&k.file), self.linux_dir().join(&to));
                std::fs::rename(&a, &b)
                    .map_err(|e| self.esp_err(format!("renaming {} to {to}", k.file), e))?;
            }
        }
        self.sync_esp();
        let f = self.flags(slot)?;
        self.set_flags(&[(
            slot,
            SlotBits {
                priority: f.priority.max(1),
                tries: 0,
                successful: true,
            },
        )])?;
        Ok(())
    }

    /// Switches to the other slot without network: it gets the highest priority and a bootable kernel
    /// name; the running slot's image is marked bad (`+0-1`) so systemd-boot sorts it last.
    pub fn rollback(&self, running: Slot) -> Result<Slot> {
        let target = running.other();
        let tf = self.flags(target)?;
        let Some(tk) = self.kernels(target)?.into_iter().next() else {
            return Err(SlotError::CannotRollback {
                slot: target,
                reason: "it has no kernel image on the ESP".into(),
            });
        };
        if tf.priority == 0 && !tf.successful {
            return Err(SlotError::CannotRollback {
                slot: target,
                reason: "it was cleared or never completed an update (priority 0, not successful)"
                    .into(),
            });
        }
        let tname = KernelEntry::name(
            &tk.version,
            target,
            if tf.successful { None } else { Some((1, 0)) },
        );
        if tname != tk.file {
            std::fs::rename(
                self.linux_dir().join(&tk.file),
                self.linux_dir().join(&tname),
            )
            .map_err(|e| self.esp_err(format!("renaming {}", tk.file), e))?;
        }
        for k in self.kernels(running)? {
            let bad = KernelEntry::name(&k.version, running, Some((0, 1)));
            if bad != k.file {
                std::fs::rename(self.linux_dir().join(&k.file), self.linux_dir().join(&bad))
                    .map_err(|e| self.esp_err(format!("renaming {}", k.file), e))?;
            }
        }
        self.sync_esp();
        let rf = self.flags(running)?;
        self.set_flags(&[
            (
                target,
                SlotBits {
                    priority: 2,
                    tries: if tf.successful { 0 } else { 1 },
                    successful: tf.successful,
                },
            ),
            (running, SlotBits { priority: 1, ..rf }),
        ])?;
        Ok(target)
    }

    /// After boot: did an update to the other slot fail and fall back to `running`? Returns the version
    /// that failed (its kernel image still carries a counter and the slot was never marked successful),
    /// and clears that slot so it is not retried.
    pub fn detect_failed_update(&self, running: Slot) -> Result<Option<String>> {
        let other = running.other();
        let f = self.flags(other)?;
        let k = self.kernels(other)?.into_iter().next();
        match k {
            Some(k) if !f.successful && k.counter.is_some() && f.priority > 0 => {
                let running_flags = self.flags(running)?;
                // Only a fallback if the failed slot had been preferred over the running one.
                if f.priority >= running_flags.priority || f.tries == 0 {
                    self.clear(other)?;
                    return Ok(Some(k.version));
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// The running slot, from (first match wins) the initramfs' `/run/keel/boot.env` contents
    /// (`KEEL_USR=USR-A`, `KEEL_USR_PARTUUID=<guid>`), the kernel command line (`keel.usr=USR-A|USR-B|
    /// PARTLABEL=<l>|PARTUUID=<guid>`, `keel.slot=a|b`, `[mount.]usr=PARTUUID=<guid>`), else the bootable
    /// slot with the highest priority. Call it once at start: after an install the GPT bits point at the
    /// new slot although the old one still runs.
    pub fn detect_active(&self, boot_env: &str, cmdline: &str) -> Result<Slot> {
        let status = self.status()?;
        let by_uuid = |u: &str| {
            status
                .iter()
                .find(|s| s.partition_uuid.eq_ignore_ascii_case(u.trim_matches('"')))
                .map(|s| s.slot)
        };
        let by_spec = |v: &str| -> Option<Slot> {
            let v = v.trim_matches('"');
            if let Some(u) = v.strip_prefix("PARTUUID=") {
                return by_uuid(u);
            }
            Slot::parse(v.strip_prefix("PARTLABEL=").unwrap_or(v))
        };
        for line in boot_env.lines() {
            if let Some(s) = line.strip_prefix("KEEL_USR=").and_then(by_spec) {
                return Ok(s);
            }
            if let Some(s) = line.strip_prefix("KEEL_USR_PARTUUID=").and_then(by_uuid) {
                return Ok(s);
            }
        }
        for word in cmdline.split_whitespace() {
            if let Some(s) = word.strip_prefix("keel.usr=").and_then(by_spec) {
                return Ok(s);
            }
            if let Some(s) = word.strip_prefix("keel.slot=").and_then(Slot::parse) {
                return Ok(s);
            }
            let uuid = word
                .strip_prefix("mount.usr=PARTUUID=")
                .or_else(|| word.strip_prefix("usr=PARTUUID="));
            if let Some(s) = uuid.and_then(by_uuid) {
                return Ok(s);
            }
        }
        Ok(status
            .iter()
            .filter(|s| s.flags.bootable())
            .max_by_key(|s| (s.flags.priority, s.flags.successful))
            .map(|s| s.slot)
            .unwrap_or(Slot::A))
    }

    fn sync_esp(&self) {
        if let Ok(d) = std::fs::File::open(self.linux_dir()) {
            let _ = d.sync_all();
        }
    }
}
