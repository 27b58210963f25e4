//! GPT: a Keel disk's partition table and the A/B slot bits kept in its entries.
//!
//! Owns: reading both GPT copies of a disk or disk image (512- or 4096-byte sectors) and checking everything a
//! later write or partition access relies on: signatures and CRC32s, that each header sits where it says, that
//! its entry array lies on the disk and outside the usable area, that every partition lies inside that area;
//! rewriting entries (slot bits, growing the last partition) in both copies with fresh CRCs, backup copy first,
//! rebuilding a damaged copy from the good one where the spec puts it; and the ChromeOS/Flatcar slot bits in an
//! entry's attributes (priority 48–51, tries 52–55, successful 56).
//! One reader for mkimage (initial bits, tests), the updater (slot changes, payload windows) and init's initramfs
//! (choosing and counting a boot, growing ROOT): every field here comes from a disk that may be damaged or
//! crafted, so it is checked once, here.
//! Does not: create tables (mkimage uses `sgdisk`), touch partition contents, or decide which slot boots (the
//! initramfs and the updater do).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::crc32::crc32;

/// The discoverable-partitions type GUID of /usr on x86-64.
pub const TYPE_USR_X86_64: &str = "8484680C-9521-48C6-9C11-B0720656F69E";

/// Largest entry array the reader accepts: 1024 entries (tools write 128) of at most 4 KiB each.
const MAX_ENTRIES: u32 = 1024;
const MAX_ENTRY_SIZE: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("{path}: {context}: {source}")]
    Io {
        path: PathBuf,
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no GPT (no \"EFI PART\" at LBA 1 or at the end, for 512- or 4096-byte sectors); is this the whole disk?")]
    NoGpt { path: PathBuf },
    #[error("{path}: both GPT copies are unusable ({what}); check the disk with `sgdisk --verify`")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: no partition labelled {label}; the disk was not built by Keel's mkimage")]
    NoSuchLabel { path: PathBuf, label: String },
    #[error("{path}: no partition number {number}")]
    NoSuchPartition { path: PathBuf, number: u32 },
    #[error("{path}: cannot rebuild the damaged {which} GPT copy: {what}; repair it with `sgdisk --verify`")]
    NoRoom { path: PathBuf, which: &'static str, what: String },
    #[error("{path}: not rewriting a GPT laid out like this: {what}; check it with `sgdisk --verify`")]
    Layout { path: PathBuf, what: String },
}

type Result<T> = std::result::Result<T, GptError>;

/// The A/B slot state kept in a USR partition's GPT attributes (as ChromeOS `cgpt` and Flatcar define it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SlotBits {
    /// 0 = never boot; higher wins. 0..=15.
    pub priority: u8,
    /// Boot attempts left before the slot stops being eligible. 0..=15.
    pub tries: u8,
    /// Set once the slot booted and passed its health check.
    pub successful: bool,
}

const PRIO_SHIFT: u32 = 48;
const TRIES_SHIFT: u32 = 52;
const SUCCESS_BIT: u32 = 56;
const SLOT_MASK: u64 = (0xff << PRIO_SHIFT) | (1 << SUCCESS_BIT);

impl SlotBits {
    pub fn from_attrs(attrs: u64) -> SlotBits {
        SlotBits {
            priority: ((attrs >> PRIO_SHIFT) & 0xf) as u8,
            tries: ((attrs >> TRIES_SHIFT) & 0xf) as u8,
            successful: (attrs >> SUCCESS_BIT) & 1 == 1,
        }
    }

    /// These bits merged into an attribute word, every other bit kept. Priority and tries are 4-bit fields:
    /// callers pass 0..=15 (higher bits are dropped).
    pub fn apply(self, attrs: u64) -> u64 {
        debug_assert!(self.priority <= 15 && self.tries <= 15, "{self:?}");
        (attrs & !SLOT_MASK)
            | ((u64::from(self.priority) & 0xf) << PRIO_SHIFT)
            | ((u64::from(self.tries) & 0xf) << TRIES_SHIFT)
            | (u64::from(self.successful) << SUCCESS_BIT)
    }

    /// Eligible to boot: priority > 0 and (tries left or known good), Flatcar's `gptprio.next` rule.
    pub fn bootable(self) -> bool {
        self.priority > 0 && (self.tries > 0 || self.successful)
    }
}

/// One used GPT entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based partition number (what Linux appends to the disk name, what sgdisk prints).
    pub number: u32,
    pub name: String,
    pub type_guid: String,
    pub part_guid: String,
    pub first_lba: u64,
    /// Inclusive; never below `first_lba` and never outside the usable area (checked when read).
    pub last_lba: u64,
    pub attrs: u64,
}

impl Partition {
    pub fn slot(&self) -> SlotBits {
        SlotBits::from_attrs(self.attrs)
    }
    /// A /usr partition: the discoverable-partitions type, or a `USR-` label.
    pub fn is_usr(&self) -> bool {
        self.type_guid == TYPE_USR_X86_64 || self.name.starts_with("USR-")
    }
    pub fn sectors(&self) -> u64 {
        self.last_lba - self.first_lba + 1
    }
}

/// A GPT header's fields, with its raw bytes (header size long) for what Keel does not interpret.
#[derive(Debug, Clone)]
struct Header {
    raw: Vec<u8>,
    my_lba: u64,
    alt_lba: u64,
    first_usable: u64,
    last_usable: u64,
    entries_lba: u64,
    count: u32,
    entry_size: u32,
}

impl Header {
    fn entries_len(&self) -> usize {
        self.count as usize * self.entry_size as usize
    }
    fn entry_sectors(&self, sector: u64) -> u64 {
        (self.entries_len() as u64).div_ceil(sector)
    }
    /// The header as written: its fields put back and both CRCs fresh.
    fn encode(&self, entries_crc: u32) -> Vec<u8> {
        let mut h = self.raw.clone();
        h[24..32].copy_from_slice(&self.my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&self.alt_lba.to_le_bytes());
        h[40..48].copy_from_slice(&self.first_usable.to_le_bytes());
        h[48..56].copy_from_slice(&self.last_usable.to_le_bytes());
        h[72..80].copy_from_slice(&self.entries_lba.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        h[16..20].fill(0);
        let crc = crc32(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// A GUID stored in GPT's mixed-endian layout, as the usual upper-case text (as sgdisk prints it).
pub fn guid_to_string(b: &[u8]) -> String {
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

/// Check a header sector read from `lba` of a disk of `sectors` sectors; `Err` says what is wrong.
fn parse_header(raw: &[u8], lba: u64, sector: u64, sectors: u64) -> std::result::Result<Header, String> {
    if &raw[..8] != b"EFI PART" {
        return Err(format!("no \"EFI PART\" signature at LBA {lba}"));
    }
    let hsize = le32(raw, 12) as usize;
    if !(92..=sector as usize).contains(&hsize) {
        return Err(format!("header size {hsize} at LBA {lba}"));
    }
    let mut h = raw[..hsize].to_vec();
    h[16..20].fill(0);
    if crc32(&h) != le32(raw, 16) {
        return Err(format!("header CRC mismatch at LBA {lba}"));
    }
    let hdr = Header {
        raw: raw[..hsize].to_vec(),
        my_lba: le64(raw, 24),
        alt_lba: le64(raw, 32),
        first_usable: le64(raw, 40),
        last_usable: le64(raw, 48),
        entries_lba: le64(raw, 72),
        count: le32(raw, 80),
        entry_size: le32(raw, 84),
    };
    if hdr.my_lba != lba {
        return Err(format!("the header at LBA {lba} says it is at LBA {}", hdr.my_lba));
    }
    let es = hdr.entry_size;
    if !(128..=MAX_ENTRY_SIZE).contains(&es) || !es.is_multiple_of(128) || hdr.count == 0 || hdr.count > MAX_ENTRIES {
        return Err(format!("entry size {es} / count {} out of range (header at LBA {lba})", hdr.count));
    }
    if hdr.first_usable > hdr.last_usable || hdr.last_usable >= sectors {
        return Err(format!(
            "usable area LBA {}..={} does not fit a disk of {sectors} sectors (header at LBA {lba})",
            hdr.first_usable, hdr.last_usable
        ));
    }
    let in_usable = |l: u64| (hdr.first_usable..=hdr.last_usable).contains(&l);
    let entries_end = hdr.entries_lba.checked_add(hdr.entry_sectors(sector)).filter(|e| *e <= sectors);
    let Some(entries_end) = entries_end else {
        return Err(format!("entry array at LBA {} lies beyond the disk (header at LBA {lba})", hdr.entries_lba));
    };
    let overlaps_usable = hdr.entries_lba <= hdr.last_usable && entries_end > hdr.first_usable;
    if in_usable(lba) || overlaps_usable || (hdr.entries_lba..entries_end).contains(&lba) {
        return Err(format!("header at LBA {lba} or its entry array overlaps the usable area or each other"));
    }
    Ok(hdr)
}

/// The used entries of an entry array, each checked against the header's usable area.
fn parse_entries(raw: &[u8], hdr: &Header) -> std::result::Result<Vec<Partition>, String> {
    let mut out = Vec::new();
    for (i, e) in raw.chunks_exact(hdr.entry_size as usize).enumerate() {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let number = i as u32 + 1;
        let (first_lba, last_lba) = (le64(e, 32), le64(e, 40));
        if last_lba < first_lba {
            return Err(format!("partition {number} ends (LBA {last_lba}) before it starts (LBA {first_lba})"));
        }
        if first_lba < hdr.first_usable || last_lba > hdr.last_usable {
            return Err(format!(
                "partition {number} (LBA {first_lba}..={last_lba}) lies outside the usable area LBA {}..={}",
                hdr.first_usable, hdr.last_usable
            ));
        }
        let name: Vec<u16> =
            e[56..128].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&c| c != 0).collect();
        out.push(Partition {
            number,
            name: String::from_utf16_lossy(&name),
            type_guid: guid_to_string(&e[..16]),
            part_guid: guid_to_string(&e[16..32]),
            first_lba,
            last_lba,
            attrs: le64(e, 48),
        });
    }
    Ok(out)
}

/// Which GPT copies read clean (at least one always does, or there is no `Disk`).
#[derive(Debug, Clone)]
enum Copies {
    Both { primary: Header, backup: Header },
    /// The backup is damaged, missing, or of another shape than the primary.
    Primary(Header),
    /// The primary is damaged: the table was read from the backup.
    Backup(Header),
}

/// One checked copy: header, raw entry array, and its partitions.
type CheckedCopy = (Header, Vec<u8>, Vec<Partition>);

/// A disk (block device or image file) with its GPT read and checked.
#[derive(Debug)]
pub struct Disk {
    path: PathBuf,
    file: File,
    sector: u64,
    sectors: u64,
    /// The copies that read clean: [`Disk::write`] rebuilds a missing one from the other.
    copies: Copies,
    /// Where a rebuilt backup goes: the primary's alternate LBA if on the disk, else the last sector.
    backup_lba: u64,
    entries: Vec<u8>,
    partitions: Vec<Partition>,
}

impl Disk {
    /// Read the GPT of `path` (read-only).
    pub fn open(path: &Path) -> Result<Disk> {
        Self::open_mode(path, false)
    }

    /// Read the GPT of `path`, opened for [`Disk::write`].
    pub fn open_rw(path: &Path) -> Result<Disk> {
        Self::open_mode(path, true)
    }

    fn open_mode(path: &Path, write: bool) -> Result<Disk> {
        let io = |context: &str| {
            let context = context.to_string();
            move |source| GptError::Io { path: path.into(), context, source }
        };
        let mut file = File::options().read(true).write(write).open(path).map_err(io("opening"))?;
        let len = file.seek(SeekFrom::End(0)).map_err(io("finding the size"))?;
        let sector = probe_sector(&file, len).ok_or_else(|| GptError::NoGpt { path: path.into() })?;
        let sectors = len / sector;
        let last = sectors.saturating_sub(1);
        let read_copy = |lba: u64| -> std::result::Result<CheckedCopy, String> {
            let mut raw = vec![0u8; sector as usize];
            let at = lba.checked_mul(sector).ok_or_else(|| format!("header LBA {lba} is beyond any disk"))?;
            file.read_exact_at(&mut raw, at).map_err(|e| format!("reading LBA {lba}: {e}"))?;
            let hdr = parse_header(&raw, lba, sector, sectors)?;
            let mut entries = vec![0u8; hdr.entries_len()];
            file.read_exact_at(&mut entries, hdr.entries_lba * sector)
                .map_err(|e| format!("reading the entry array at LBA {}: {e}", hdr.entries_lba))?;
            if crc32(&entries) != le32(&hdr.raw, 88) {
                return Err(format!("entry array CRC mismatch (header at LBA {lba})"));
            }
            let parts = parse_entries(&entries, &hdr)?;
            Ok((hdr, entries, parts))
        };
        let primary = read_copy(1);
        // The alternate LBA is only CRC-protected, not sane: one off the disk means "the last sector", where
        // the spec puts the backup, so a rewrite never lands at a wrapped or foreign offset.
        let alt = primary.as_ref().map(|(h, _, _)| h.alt_lba).unwrap_or(last);
        let backup_lba = if alt <= 1 || alt > last { last } else { alt };
        let backup = read_copy(backup_lba);
        let (copies, entries, partitions) = match (primary, backup) {
            (Ok((p, e, parts)), b) => match b {
                // A backup that disagrees on the array's shape or the usable area cannot take the primary's
                // entries: it counts as damaged and is rebuilt from the primary at the next write.
                Ok((b, _, _)) if same_shape(&p, &b) => (Copies::Both { primary: p, backup: b }, e, parts),
                _ => (Copies::Primary(p), e, parts),
            },
            (Err(_), Ok((b, e, parts))) => (Copies::Backup(b), e, parts),
            (Err(a), Err(b)) => {
                return Err(GptError::Corrupt { path: path.into(), what: format!("primary: {a}; backup: {b}") })
            }
        };
        Ok(Disk { path: path.into(), file, sector, sectors, copies, backup_lba, entries, partitions })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Logical sector size in bytes (512 or 4096).
    pub fn sector_size(&self) -> u64 {
        self.sector
    }

    /// Disk size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The primary copy is damaged and the table was read from the backup.
    pub fn used_backup(&self) -> bool {
        matches!(self.copies, Copies::Backup(_))
    }

    /// One of the two copies is damaged ([`Disk::write`] rebuilds it).
    pub fn damaged(&self) -> bool {
        !matches!(self.copies, Copies::Both { .. })
    }

    /// Every used entry, in entry-array order.
    pub fn partitions(&self) -> &[Partition] {
        &self.partitions
    }

    /// The partition with GPT name `label`.
    pub fn by_label(&self, label: &str) -> Result<&Partition> {
        self.partitions
            .iter()
            .find(|p| p.name == label)
            .ok_or_else(|| GptError::NoSuchLabel { path: self.path.clone(), label: label.into() })
    }

    /// Byte offset and length of a partition of this disk.
    pub fn byte_range(&self, p: &Partition) -> (u64, u64) {
        // Partitions lie inside the usable area, which lies on the disk: neither product can overflow.
        (p.first_lba * self.sector, p.sectors() * self.sector)
    }

    /// Set partition `number`'s attribute word in memory; [`Disk::write`] persists it.
    pub fn set_attrs(&mut self, number: u32, attrs: u64) -> Result<()> {
        let es = self.header().entry_size as usize;
        let Some(p) = self.partitions.iter_mut().find(|p| p.number == number) else {
            return Err(GptError::NoSuchPartition { path: self.path.clone(), number });
        };
        p.attrs = attrs;
        let o = (number as usize - 1) * es + 48;
        self.entries[o..o + 8].copy_from_slice(&attrs.to_le_bytes());
        Ok(())
    }

    /// Set the slot bits of the partition labelled `label` in memory; [`Disk::write`] persists them.
    pub fn set_slot(&mut self, label: &str, bits: SlotBits) -> Result<()> {
        let p = self.by_label(label)?;
        let (number, attrs) = (p.number, bits.apply(p.attrs));
        self.set_attrs(number, attrs)
    }

    /// The header the table was read from (the primary unless it is damaged).
    fn header(&self) -> &Header {
        match &self.copies {
            Copies::Both { primary: h, .. } | Copies::Primary(h) | Copies::Backup(h) => h,
        }
    }

    /// Both headers, a damaged one rebuilt from the good one where the spec puts it, each pointing at the other.
    fn pair(&self) -> Result<(Header, Header)> {
        let (mut p, mut b) = self.pair_as_read()?;
        p.alt_lba = b.my_lba;
        b.alt_lba = p.my_lba;
        // Each copy is checked on its own when read; writing one must not land on the other.
        let n = p.entry_sectors(self.sector);
        let regions = [(p.my_lba, 1), (p.entries_lba, n), (b.my_lba, 1), (b.entries_lba, n)];
        let overlap = |(a, la): (u64, u64), (c, lc): (u64, u64)| a < c + lc && c < a + la;
        if overlap(regions[0], regions[2])
            || overlap(regions[0], regions[3])
            || overlap(regions[1], regions[2])
            || overlap(regions[1], regions[3])
        {
            return Err(GptError::Layout {
                path: self.path.clone(),
                what: format!(
                    "the primary (LBA {}, entries at {}) and the backup (LBA {}, entries at {}) overlap",
                    p.my_lba, p.entries_lba, b.my_lba, b.entries_lba
                ),
            });
        }
        Ok((p, b))
    }

    fn pair_as_read(&self) -> Result<(Header, Header)> {
        let no_room = |which, what: String| GptError::NoRoom { path: self.path.clone(), which, what };
        match &self.copies {
            Copies::Both { primary, backup } => Ok((primary.clone(), backup.clone())),
            Copies::Primary(p) => {
                let at = self.backup_lba;
                let entries_lba = at.checked_sub(p.entry_sectors(self.sector)).filter(|l| *l > p.last_usable);
                let Some(entries_lba) = entries_lba else {
                    return Err(no_room("backup", format!("its entry array does not fit before LBA {at}")));
                };
                let b = Header { my_lba: at, entries_lba, ..p.clone() };
                Ok((p.clone(), b))
            }
            Copies::Backup(b) => {
                if 2 + b.entry_sectors(self.sector) > b.first_usable {
                    return Err(no_room("primary", format!("its entry array does not fit before LBA {}", b.first_usable)));
                }
                let p = Header { my_lba: 1, entries_lba: 2, ..b.clone() };
                Ok((p, b.clone()))
            }
        }
    }

    /// Write the entry array and both headers with fresh CRCs: backup, fsync, primary, fsync. Until the
    /// primary is rewritten, firmware and tools read the old, consistent table.
    pub fn write(&mut self) -> Result<()> {
        let (p, b) = self.pair()?;
        let crc = crc32(&self.entries);
        for h in [&b, &p] {
            let io = |context: String| {
                let path = self.path.clone();
                move |source| GptError::Io { path, context, source }
            };
            self.file
                .write_all_at(&self.entries, h.entries_lba * self.sector)
                .map_err(io(format!("writing the GPT entry array at LBA {}", h.entries_lba)))?;
            self.file
                .write_all_at(&h.encode(crc), h.my_lba * self.sector)
                .map_err(io(format!("writing the GPT header at LBA {}", h.my_lba)))?;
            self.file.sync_data().map_err(io("syncing the GPT".into()))?;
        }
        self.copies = Copies::Both { primary: p, backup: b };
        Ok(())
    }

    /// After the disk grew: move the backup copy to the new last sector and extend partition `number` to the
    /// end of the new usable area, its end aligned down to `align_bytes`, in both copies. Returns the
    /// partition's new (first, last) LBA, or `None` when it is not the last partition or would not grow.
    pub fn grow_to_end(&mut self, number: u32, align_bytes: u64) -> Result<Option<(u64, u64)>> {
        let (mut p, mut b) = self.pair()?;
        let Some(part) = self.partitions.iter().find(|x| x.number == number) else {
            return Err(GptError::NoSuchPartition { path: self.path.clone(), number });
        };
        let is_last = self.partitions.iter().all(|x| x.last_lba <= part.last_lba);
        if p.entries_lba + p.entry_sectors(self.sector) > p.first_usable {
            let what = format!("the primary entry array (LBA {}) lies after the usable area", p.entries_lba);
            return Err(GptError::Layout { path: self.path.clone(), what });
        }
        let last = self.sectors - 1;
        let Some(backup_entries) = last.checked_sub(p.entry_sectors(self.sector)).filter(|l| *l > p.first_usable) else {
            return Ok(None);
        };
        let last_usable = backup_entries - 1;
        let align = (align_bytes / self.sector).max(1);
        let new_end = ((last_usable + 1) / align * align).saturating_sub(1);
        if !is_last || new_end <= part.last_lba {
            return Ok(None);
        }
        let first = part.first_lba;
        let es = p.entry_size as usize;
        let o = (number as usize - 1) * es + 40;
        self.entries[o..o + 8].copy_from_slice(&new_end.to_le_bytes());
        if let Some(x) = self.partitions.iter_mut().find(|x| x.number == number) {
            x.last_lba = new_end;
        }
        p.last_usable = last_usable;
        b = Header { my_lba: last, entries_lba: backup_entries, last_usable, ..b };
        self.copies = Copies::Both { primary: p, backup: b };
        self.backup_lba = last;
        self.write()?;
        Ok(Some((first, new_end)))
    }
}

/// Two headers that describe the same entry array and usable area (they may differ in where they sit).
fn same_shape(a: &Header, b: &Header) -> bool {
    (a.count, a.entry_size, a.first_usable, a.last_usable) == (b.count, b.entry_size, b.first_usable, b.last_usable)
}

/// The logical sector size whose LBA 1 (or last sector) holds a GPT signature.
fn probe_sector(file: &File, len: u64) -> Option<u64> {
    let mut sig = [0u8; 8];
    for at_end in [false, true] {
        for s in [512u64, 4096] {
            let off = if at_end { (len / s).saturating_sub(1) * s } else { s };
            if off > 0 && file.read_exact_at(&mut sig, off).is_ok() && &sig == b"EFI PART" {
                return Some(s);
            }
        }
    }
    None
}

/// Rewrite the slot bits of the partition labelled `label` in both GPT copies of `path`.
pub fn set_slot_bits(path: &Path, label: &str, bits: SlotBits) -> Result<()> {
    let mut disk = Disk::open_rw(path)?;
    disk.set_slot(label, bits)?;
    disk.write()
}

#[cfg(test)]
mod tests;
