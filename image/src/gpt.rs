//! Raw GPT access for disk images: read the partition table and rewrite the A/B slot bits.
//!
//! Owns: parsing the primary GPT header (LBA 1) and entry array of a disk image file, the ChromeOS/Flatcar
//! slot bits in each entry's attributes (priority 48–51, tries 52–55, successful 56), and rewriting those bits
//! in both the primary and the backup table with fixed CRCs.
//! Does not: create partitions (mkimage uses `sgdisk`), or touch partition contents. The initramfs has its own
//! minimal reader (init/src/initrd) so that init does not depend on this crate.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Sector size of Keel images (512-byte logical sectors, as QEMU's virtio-blk presents them).
pub const SECTOR: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("cannot access {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} has no GPT (no \"EFI PART\" signature at LBA 1)")]
    NoGpt { path: PathBuf },
    #[error("{path}: corrupt GPT: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: no partition labelled {label}")]
    NoSuchLabel { path: PathBuf, label: String },
    #[error("slot value out of range: {what} (priority and tries are 0..=15)")]
    Range { what: String },
}

/// The A/B slot state kept in a USR partition's GPT attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotBits {
    /// 0 = never boot; higher wins.
    pub priority: u8,
    /// Boot attempts left before the slot stops being eligible.
    pub tries: u8,
    /// Set once the slot booted and passed its health check.
    pub successful: bool,
}

impl SlotBits {
    pub fn from_attrs(attrs: u64) -> Self {
        SlotBits {
            priority: ((attrs >> 48) & 0xf) as u8,
            tries: ((attrs >> 52) & 0xf) as u8,
            successful: (attrs >> 56) & 1 == 1,
        }
    }

    /// Merge these bits into an attribute word, keeping every other bit.
    pub fn apply(self, attrs: u64) -> Result<u64, GptError> {
        if self.priority > 15 || self.tries > 15 {
            return Err(GptError::Range { what: format!("{self:?}") });
        }
        let cleared = attrs & !(0x1ffu64 << 48);
        Ok(cleared
            | (u64::from(self.priority) << 48)
            | (u64::from(self.tries) << 52)
            | (u64::from(self.successful) << 56))
    }

    /// Eligible to boot: priority > 0 and (tries left or known good) — Flatcar's `gptprio.next` rule.
    pub fn bootable(self) -> bool {
        self.priority > 0 && (self.tries > 0 || self.successful)
    }
}

/// One used GPT entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1-based partition number (what Linux appends to the disk name).
    pub number: u32,
    pub type_guid: String,
    pub part_guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attrs: u64,
    pub name: String,
}

impl Entry {
    pub fn slot(&self) -> SlotBits {
        SlotBits::from_attrs(self.attrs)
    }
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
}

/// A parsed table plus what is needed to write it back.
#[derive(Debug, Clone)]
pub struct Table {
    pub disk_guid: String,
    pub entries: Vec<Entry>,
    header: Vec<u8>,
    raw_entries: Vec<u8>,
    entry_size: usize,
}

/// Format a GUID stored in GPT's mixed-endian layout as the usual upper-case text.
pub fn guid_to_string(b: &[u8]) -> String {
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GptError + '_ {
    move |source| GptError::Io { path: path.to_path_buf(), source }
}

fn read_at(f: &mut File, path: &Path, off: u64, len: usize) -> Result<Vec<u8>, GptError> {
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(off)).map_err(io_err(path))?;
    f.read_exact(&mut buf).map_err(io_err(path))?;
    Ok(buf)
}

impl Table {
    /// Read the primary GPT of a raw disk image.
    pub fn read(path: &Path) -> Result<Table, GptError> {
        let mut f = File::open(path).map_err(io_err(path))?;
        let header = read_at(&mut f, path, SECTOR, SECTOR as usize)?;
        if &header[0..8] != b"EFI PART" {
            return Err(GptError::NoGpt { path: path.to_path_buf() });
        }
        let corrupt = |what: &str| GptError::Corrupt { path: path.to_path_buf(), what: what.to_string() };
        let hsize = le_u32(&header, 12) as usize;
        if !(92..=SECTOR as usize).contains(&hsize) {
            return Err(corrupt("header size out of range"));
        }
        let mut h = header[..hsize].to_vec();
        h[16..20].fill(0);
        if crc32fast::hash(&h) != le_u32(&header, 16) {
            return Err(corrupt("header CRC mismatch"));
        }
        let entries_lba = le_u64(&header, 72);
        let count = le_u32(&header, 80) as usize;
        let entry_size = le_u32(&header, 84) as usize;
        if entry_size < 128 || count > 1024 {
            return Err(corrupt("entry size or count out of range"));
        }
        let raw_entries = read_at(&mut f, path, entries_lba * SECTOR, count * entry_size)?;
        if crc32fast::hash(&raw_entries) != le_u32(&header, 88) {
            return Err(corrupt("entry array CRC mismatch"));
        }
        let mut entries = Vec::new();
        for i in 0..count {
            let e = &raw_entries[i * entry_size..(i + 1) * entry_size];
            if e[0..16].iter().all(|&b| b == 0) {
                continue;
            }
            let name_u16: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&c| c != 0)
                .collect();
            entries.push(Entry {
                number: (i + 1) as u32,
                type_guid: guid_to_string(&e[0..16]),
                part_guid: guid_to_string(&e[16..32]),
                first_lba: le_u64(e, 32),
                last_lba: le_u64(e, 40),
                attrs: le_u64(e, 48),
                name: String::from_utf16_lossy(&name_u16),
            });
        }
        Ok(Table { disk_guid: guid_to_string(&header[56..72]), entries, header, raw_entries, entry_size })
    }

    pub fn by_label(&self, label: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == label)
    }
}

/// Rewrite the slot bits of the partition labelled `label` in both GPT copies of a raw image.
pub fn set_slot_bits(path: &Path, label: &str, bits: SlotBits) -> Result<(), GptError> {
    let table = Table::read(path)?;
    let entry = table
        .by_label(label)
        .ok_or_else(|| GptError::NoSuchLabel { path: path.to_path_buf(), label: label.to_string() })?;
    let new_attrs = bits.apply(entry.attrs)?;
    let mut entries = table.raw_entries.clone();
    let off = (entry.number as usize - 1) * table.entry_size + 48;
    entries[off..off + 8].copy_from_slice(&new_attrs.to_le_bytes());
    let entries_crc = crc32fast::hash(&entries);

    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io_err(path))?;
    let primary = table.header.clone();
    let backup_lba = le_u64(&primary, 32);
    let backup = read_at(&mut f, path, backup_lba * SECTOR, SECTOR as usize)?;
    if &backup[0..8] != b"EFI PART" {
        return Err(GptError::Corrupt { path: path.to_path_buf(), what: "backup header missing".into() });
    }
    for mut hdr in [primary, backup] {
        let hsize = le_u32(&hdr, 12) as usize;
        let my_lba = le_u64(&hdr, 24);
        let entries_lba = le_u64(&hdr, 72);
        hdr[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        hdr[16..20].fill(0);
        let crc = crc32fast::hash(&hdr[..hsize]);
        hdr[16..20].copy_from_slice(&crc.to_le_bytes());
        f.seek(SeekFrom::Start(entries_lba * SECTOR)).map_err(io_err(path))?;
        f.write_all(&entries).map_err(io_err(path))?;
        f.seek(SeekFrom::Start(my_lba * SECTOR)).map_err(io_err(path))?;
        f.write_all(&hdr).map_err(io_err(path))?;
    }
    f.sync_all().map_err(io_err(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_bits_round_trip_and_keep_other_bits() {
        let attrs = (1u64 << 60) | 1; // read-only + required
        let bits = SlotBits { priority: 2, tries: 3, successful: true };
        let a = bits.apply(attrs).expect("in range");
        assert_eq!(SlotBits::from_attrs(a), bits);
        assert_eq!(a & ((1u64 << 60) | 1), (1u64 << 60) | 1);
    }

    #[test]
    fn bootable_follows_gptprio_rule() {
        assert!(!SlotBits { priority: 0, tries: 3, successful: true }.bootable());
        assert!(!SlotBits { priority: 2, tries: 0, successful: false }.bootable());
        assert!(SlotBits { priority: 1, tries: 0, successful: true }.bootable());
        assert!(SlotBits { priority: 1, tries: 1, successful: false }.bootable());
    }

    #[test]
    fn guid_text_is_mixed_endian() {
        let b = [0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b];
        assert_eq!(guid_to_string(&b), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    }
}
