//! The disk layout of a Keel image: partitions, sizes, fixed GUIDs, initial slot bits, ESP file names.
//!
//! Owns: every constant that fixes where things are on the disk (documented in docs/image.md). Changing one
//! changes every image's bytes. Does not: write anything (see `mkimage`).

use serde::{Deserialize, Serialize};

use keel_model::gpt::SlotBits;

pub const MIB: u64 = 1024 * 1024;
/// The first partition starts at 1 MiB; the backup GPT takes the last MiB.
pub const ALIGN_LBA: u64 = 2048;

/// Fixed disk GUID ("KEEL" in the first field). Same on every machine until first boot rewrites it (future).
pub const DISK_GUID: &str = "4B45454C-0000-4000-8000-000000000000";
/// erofs UUID of USR (both slots hold the same image at install time).
pub const USR_FS_UUID: &str = "4b45454c-0002-4000-8000-0000000000fe";
pub const ROOT_FS_UUID: &str = "4b45454c-0005-4000-8000-0000000000fe";
pub const OEM_FS_UUID: &str = "4b45454c-0004-4000-8000-0000000000fe";
/// ext4 directory hash seed (fixed, for reproducible ext4).
pub const HASH_SEED: &str = "4b45454c-ffff-4000-8000-000000000000";
/// FAT volume id of the ESP.
pub const ESP_VOLUME_ID: &str = "4B45454C";

pub const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// Discoverable Partitions Specification type GUIDs.
pub const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub use keel_model::gpt::TYPE_USR_X86_64;
pub const TYPE_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
pub const TYPE_LINUX_DATA: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// GPT attribute bit 60: read-only (set on the USR partitions).
pub const ATTR_READ_ONLY: u64 = 1 << 60;

/// The A/B USR slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn label(self) -> &'static str {
        match self {
            Slot::A => "USR-A",
            Slot::B => "USR-B",
        }
    }
    pub fn letter(self) -> char {
        match self {
            Slot::A => 'a',
            Slot::B => 'b',
        }
    }
    /// Initial slot bits: A is the booted, known-good slot; B holds the same USR but is not eligible
    /// (priority 0) until the updater writes a new version there (Flatcar's convention).
    pub fn initial_bits(self) -> SlotBits {
        match self {
            Slot::A => SlotBits { priority: 1, tries: 0, successful: true },
            Slot::B => SlotBits { priority: 0, tries: 0, successful: false },
        }
    }
    /// The UKI's file name in /EFI/Linux. systemd-boot counts boots in the `+LEFT-DONE` suffix: A starts
    /// blessed (no counter), B starts with `+0-0` (no tries left: sorts last, like its priority 0).
    pub fn uki_name(self, version: &str) -> String {
        match self {
            Slot::A => format!("keel-{version}-usr-a.efi"),
            Slot::B => format!("keel-{version}-usr-b+0-0.efi"),
        }
    }
}

/// One partition of the layout.
#[derive(Debug, Clone)]
pub struct PartitionSpec {
    pub label: &'static str,
    pub guid: &'static str,
    pub type_guid: &'static str,
    pub size_mib: u64,
    pub attrs: u64,
    start_mib: u64,
}

/// What keel.json records per partition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionInfo {
    pub number: u32,
    pub label: String,
    pub guid: String,
    pub type_guid: String,
    pub start_lba: u64,
    pub size_bytes: u64,
}

impl PartitionSpec {
    pub fn start_lba(&self) -> u64 {
        self.start_mib * (MIB / 512)
    }
    pub fn end_lba(&self) -> u64 {
        self.start_lba() + self.size_mib * (MIB / 512) - 1
    }
    pub fn size_bytes(&self) -> u64 {
        self.size_mib * MIB
    }
    pub fn info(&self) -> PartitionInfo {
        let number = partitions().iter().position(|p| p.label == self.label).map_or(0, |i| i as u32 + 1);
        PartitionInfo {
            number,
            label: self.label.to_string(),
            guid: self.guid.to_string(),
            type_guid: self.type_guid.to_string(),
            start_lba: self.start_lba(),
            size_bytes: self.size_bytes(),
        }
    }
}

fn usr_attrs(slot: Slot) -> u64 {
    // apply() only fails for values > 15; the constants above are in range.
    slot.initial_bits().apply(ATTR_READ_ONLY)
}

/// The partitions in disk order: 1 EFI-SYSTEM, 2 USR-A, 3 USR-B, 4 OEM, 5 ROOT.
pub fn partitions() -> Vec<PartitionSpec> {
    let specs: [(&'static str, &'static str, &'static str, u64, u64); 5] = [
        ("EFI-SYSTEM", "4B45454C-0001-4000-8000-000000000001", TYPE_ESP, 128, 0),
        ("USR-A", "4B45454C-0002-4000-8000-000000000002", TYPE_USR_X86_64, 128, usr_attrs(Slot::A)),
        ("USR-B", "4B45454C-0003-4000-8000-000000000003", TYPE_USR_X86_64, 128, usr_attrs(Slot::B)),
        ("OEM", "4B45454C-0004-4000-8000-000000000004", TYPE_LINUX_DATA, 32, 0),
        ("ROOT", "4B45454C-0005-4000-8000-000000000005", TYPE_ROOT_X86_64, 256, 0),
    ];
    let mut start = 1;
    specs
        .into_iter()
        .map(|(label, guid, type_guid, size_mib, attrs)| {
            let p = PartitionSpec { label, guid, type_guid, size_mib, attrs, start_mib: start };
            start += size_mib;
            p
        })
        .collect()
}

/// Disk size: the partitions plus 1 MiB at each end (protective MBR + GPTs).
pub fn disk_bytes(parts: &[PartitionSpec]) -> u64 {
    let end = parts.iter().map(|p| p.start_mib + p.size_mib).max().unwrap_or(1);
    (end + 1) * MIB
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_contiguous_and_aligned() {
        let p = partitions();
        assert_eq!(p[0].start_lba(), ALIGN_LBA);
        for w in p.windows(2) {
            assert_eq!(w[0].end_lba() + 1, w[1].start_lba());
        }
        assert_eq!(disk_bytes(&p), (1 + 128 + 128 + 128 + 32 + 256 + 1) * MIB);
    }

    #[test]
    fn initial_slot_bits() {
        let p = partitions();
        assert_eq!(SlotBits::from_attrs(p[1].attrs), SlotBits { priority: 1, tries: 0, successful: true });
        assert!(!SlotBits::from_attrs(p[2].attrs).bootable());
        assert_eq!(p[1].attrs & ATTR_READ_ONLY, ATTR_READ_ONLY);
    }
}
