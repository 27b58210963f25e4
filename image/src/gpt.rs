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
        // `Table::read` refuses last < first; saturating anyway, so no table makes this wrap.
        self.last_lba.saturating_add(1).saturating_sub(self.first_lba).saturating_mul(SECTOR)
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

/// Byte offset of `lba`; a table pointing past what a u64 can address is corrupt.
fn lba_offset(path: &Path, lba: u64, what: &str) -> Result<u64, GptError> {
    lba.checked_mul(SECTOR)
        .ok_or_else(|| GptError::Corrupt { path: path.to_path_buf(), what: format!("{what} at LBA {lba}, beyond any disk") })
}

/// Largest partition entry the reader accepts (UEFI: 128 × 2^n bytes; every tool writes 128).
const MAX_ENTRY_SIZE: usize = 4096;

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
        let entries_at = lba_offset(path, le_u64(&header, 72), "partition entry array")?;
        let count = le_u32(&header, 80) as usize;
        let entry_size = le_u32(&header, 84) as usize;
        if !(128..=MAX_ENTRY_SIZE).contains(&entry_size) || !entry_size.is_multiple_of(128) || count > 1024 {
            return Err(corrupt("entry size or count out of range"));
        }
        let raw_entries = read_at(&mut f, path, entries_at, count * entry_size)?;
        if crc32fast::hash(&raw_entries) != le_u32(&header, 88) {
            return Err(corrupt("entry array CRC mismatch"));
        }
        let mut entries = Vec::new();
        for i in 0..count {
            let e = &raw_entries[i * entry_size..(i + 1) * entry_size];
            if e[0..16].iter().all(|&b| b == 0) {
                continue;
            }
            let (first_lba, last_lba) = (le_u64(e, 32), le_u64(e, 40));
            if last_lba < first_lba {
                return Err(corrupt(&format!("partition {} ends (LBA {last_lba}) before it starts (LBA {first_lba})", i + 1)));
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
                first_lba,
                last_lba,
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
    let backup_at = lba_offset(path, le_u64(&primary, 32), "backup header")?;
    let backup = read_at(&mut f, path, backup_at, SECTOR as usize)?;
    let corrupt = |what: &str| GptError::Corrupt { path: path.to_path_buf(), what: what.to_string() };
    if &backup[0..8] != b"EFI PART" {
        return Err(corrupt("backup header missing"));
    }
    // Plan both copies before writing either: a bad backup header must not leave the primary rewritten alone.
    let mut writes = Vec::new();
    for mut hdr in [primary, backup] {
        let hsize = le_u32(&hdr, 12) as usize;
        if !(92..=SECTOR as usize).contains(&hsize) {
            return Err(corrupt("header size out of range"));
        }
        let header_at = lba_offset(path, le_u64(&hdr, 24), "header")?;
        let entries_at = lba_offset(path, le_u64(&hdr, 72), "partition entry array")?;
        hdr[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        hdr[16..20].fill(0);
        let crc = crc32fast::hash(&hdr[..hsize]);
        hdr[16..20].copy_from_slice(&crc.to_le_bytes());
        writes.push((entries_at, header_at, hdr));
    }
    for (entries_at, header_at, hdr) in writes {
        f.seek(SeekFrom::Start(entries_at)).map_err(io_err(path))?;
        f.write_all(&entries).map_err(io_err(path))?;
        f.seek(SeekFrom::Start(header_at)).map_err(io_err(path))?;
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

    const DISK_SECTORS: u64 = 64;

    fn put_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Header CRCs for `entries` (the whole slice) and the header itself.
    fn seal(h: &mut [u8], entries: &[u8]) {
        put_u32(h, 88, crc32fast::hash(entries));
        put_u32(h, 16, 0);
        let hsize = (le_u32(h, 12) as usize).min(h.len());
        put_u32(h, 16, crc32fast::hash(&h[..hsize]));
    }

    /// A 64-sector disk with both GPT copies (4 entries; partition 1 "USR-B", LBA 34..=40), after `edit`
    /// changed the primary header and the entries; the CRCs are recomputed after the edit.
    fn disk(dir: &Path, edit: impl FnOnce(&mut [u8], &mut [u8])) -> PathBuf {
        let mut e = vec![0u8; 512];
        e[0] = 1;
        put_u64(&mut e, 32, 34);
        put_u64(&mut e, 40, 40);
        for (i, c) in "USR-B".encode_utf16().enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
        }
        let mut h = vec![0u8; 512];
        h[0..8].copy_from_slice(b"EFI PART");
        put_u32(&mut h, 8, 0x0001_0000);
        put_u32(&mut h, 12, 92);
        put_u64(&mut h, 24, 1);
        put_u64(&mut h, 32, DISK_SECTORS - 1);
        put_u64(&mut h, 72, 2);
        put_u32(&mut h, 80, 4);
        put_u32(&mut h, 84, 128);
        edit(&mut h, &mut e);
        seal(&mut h, &e);
        let mut b = h.clone();
        put_u64(&mut b, 24, DISK_SECTORS - 1);
        put_u64(&mut b, 32, 1);
        put_u64(&mut b, 72, DISK_SECTORS - 2);
        seal(&mut b, &e);
        let mut img = vec![0u8; (DISK_SECTORS * SECTOR) as usize];
        let at = |lba: u64| (lba * SECTOR) as usize;
        img[at(1)..at(2)].copy_from_slice(&h);
        img[at(2)..at(3)].copy_from_slice(&e);
        img[at(DISK_SECTORS - 2)..at(DISK_SECTORS - 1)].copy_from_slice(&e);
        img[at(DISK_SECTORS - 1)..].copy_from_slice(&b);
        let path = dir.join("disk.img");
        std::fs::write(&path, img).expect("write disk");
        path
    }

    fn corrupt_what(r: Result<Table, GptError>) -> String {
        match r {
            Err(GptError::Corrupt { what, .. }) => what,
            other => panic!("expected a corrupt-table error, got {other:?}"),
        }
    }

    #[test]
    fn slot_bits_are_written_to_both_copies_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = disk(dir.path(), |_, _| {});
        let t = Table::read(&path).expect("valid table");
        assert_eq!(t.by_label("USR-B").map(Entry::size_bytes), Some(7 * SECTOR));
        let bits = SlotBits { priority: 2, tries: 1, successful: false };
        set_slot_bits(&path, "USR-B", bits).expect("set bits");
        assert_eq!(Table::read(&path).expect("reread").by_label("USR-B").map(Entry::slot), Some(bits));
        // The backup copy: its header CRC and entry array must match what was written.
        let img = std::fs::read(&path).expect("read disk");
        let b = &img[((DISK_SECTORS - 1) * SECTOR) as usize..];
        let e = &img[((DISK_SECTORS - 2) * SECTOR) as usize..((DISK_SECTORS - 1) * SECTOR) as usize];
        assert_eq!(le_u32(b, 88), crc32fast::hash(e), "backup entry CRC");
        assert_eq!(SlotBits::from_attrs(le_u64(e, 48)), bits);
    }

    #[test]
    fn out_of_range_fields_are_corrupt_tables_not_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Found by the gpt_table fuzz target: an entry array LBA whose byte offset overflows.
        let what = corrupt_what(Table::read(&disk(dir.path(), |h, _| put_u64(h, 72, u64::MAX / 256))));
        assert!(what.contains("beyond any disk"), "{what}");
        // An entry size that would make the reader allocate gigabytes.
        let what = corrupt_what(Table::read(&disk(dir.path(), |h, _| put_u32(h, 84, 0x8000_0000))));
        assert!(what.contains("entry size"), "{what}");
        let what = corrupt_what(Table::read(&disk(dir.path(), |_, e| put_u64(e, 40, 10))));
        assert!(what.contains("ends (LBA 10) before it starts (LBA 34)"), "{what}");
    }

    #[test]
    fn a_bad_backup_header_leaves_the_disk_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = disk(dir.path(), |_, _| {});
        let mut img = std::fs::read(&path).expect("read disk");
        put_u32(&mut img, ((DISK_SECTORS - 1) * SECTOR) as usize + 12, 0xffff);
        std::fs::write(&path, &img).expect("write disk");
        let err = set_slot_bits(&path, "USR-B", SlotBits { priority: 2, tries: 1, successful: false });
        assert!(matches!(&err, Err(GptError::Corrupt { what, .. }) if what.contains("header size")), "{err:?}");
        assert_eq!(std::fs::read(&path).expect("reread"), img, "the primary copy was rewritten alone");
    }

    #[test]
    fn guid_text_is_mixed_endian() {
        let b = [0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b];
        assert_eq!(guid_to_string(&b), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    }
}
