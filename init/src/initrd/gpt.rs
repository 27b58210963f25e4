//! Raw GPT for the initramfs: read a disk's partition entries, choose a USR slot by its priority bits and
//! count a boot attempt down.
//!
//! Owns: parsing the GPT header and entries of a block device (primary, falling back to the backup copy),
//! the ChromeOS/Flatcar slot rule (priority bits 48–51, tries 52–55, successful 56: the highest priority
//! among slots with tries left or marked successful; a slot with tries left and not yet successful has its
//! tries decremented in both GPT copies before it is booted), and CRC32.
//! Does not: bless a slot (the updater's health gate sets `successful`), or mount anything.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// The discoverable-partitions type GUID of /usr on x86-64.
pub const TYPE_USR_X86_64: &str = "8484680C-9521-48C6-9C11-B0720656F69E";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub number: u32,
    pub type_guid: String,
    pub part_guid: String,
    pub attrs: u64,
    pub name: String,
}

impl Entry {
    pub fn priority(&self) -> u8 {
        ((self.attrs >> 48) & 0xf) as u8
    }
    pub fn tries(&self) -> u8 {
        ((self.attrs >> 52) & 0xf) as u8
    }
    pub fn successful(&self) -> bool {
        (self.attrs >> 56) & 1 == 1
    }
    pub fn is_usr(&self) -> bool {
        self.type_guid == TYPE_USR_X86_64 || self.name.starts_with("USR-")
    }
    pub fn bootable(&self) -> bool {
        self.priority() > 0 && (self.tries() > 0 || self.successful())
    }
    pub fn describe(&self) -> String {
        format!(
            "#{} {} priority={} tries={} successful={} partuuid={}",
            self.number,
            self.name,
            self.priority(),
            self.tries(),
            u8::from(self.successful()),
            self.part_guid
        )
    }
}

/// A disk's table, with where it came from so a tries update can be written back.
#[derive(Debug, Clone)]
pub struct Table {
    pub entries: Vec<Entry>,
    pub used_backup: bool,
    sector: u64,
    raw_entries: Vec<u8>,
    entry_size: usize,
    primary_lba: u64,
    backup_lba: u64,
}

static CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

/// CRC-32 (IEEE), as GPT uses it.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

pub fn guid_to_string(b: &[u8]) -> String {
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

fn read_at(f: &mut File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// Validate a header sector and read its entry array; `Err` says what is wrong.
pub(super) fn parse_copy(f: &mut File, sector: u64, header_lba: u64) -> Result<(Vec<u8>, Vec<u8>), String> {
    let at = header_lba.checked_mul(sector).ok_or_else(|| format!("header LBA {header_lba} is beyond any disk"))?;
    let h = read_at(f, at, sector as usize).map_err(|e| format!("read error: {e}"))?;
    if &h[0..8] != b"EFI PART" {
        return Err("no \"EFI PART\" signature".into());
    }
    let hsize = u32_at(&h, 12) as usize;
    if !(92..=sector as usize).contains(&hsize) {
        return Err(format!("header size {hsize} out of range"));
    }
    let mut hc = h[..hsize].to_vec();
    hc[16..20].fill(0);
    if crc32(&hc) != u32_at(&h, 16) {
        return Err("header CRC mismatch".into());
    }
    let count = u32_at(&h, 80) as usize;
    let esize = u32_at(&h, 84) as usize;
    if !(128..=4096).contains(&esize) || count == 0 || count > 1024 {
        return Err(format!("entry size {esize} / count {count} out of range"));
    }
    let entries_lba = u64_at(&h, 72);
    let at = entries_lba.checked_mul(sector).ok_or_else(|| format!("entry array LBA {entries_lba} is beyond any disk"))?;
    let entries = read_at(f, at, count * esize).map_err(|e| format!("read error: {e}"))?;
    if crc32(&entries) != u32_at(&h, 88) {
        return Err("entry array CRC mismatch".into());
    }
    Ok((h, entries))
}

impl Table {
    /// Read the GPT of `dev` (`sectors` = size in logical sectors, `sector` = logical sector size).
    /// Returns `Ok(None)` when the disk has no GPT at all, `Err` with a description when it is corrupt.
    pub fn read(dev: &Path, sector: u64, sectors: u64) -> Result<Option<Table>, String> {
        let mut f = File::open(dev).map_err(|e| format!("cannot open {}: {e}", dev.display()))?;
        let (header, raw, used_backup) = match parse_copy(&mut f, sector, 1) {
            Ok((h, e)) => (h, e, false),
            Err(primary) => {
                if sectors < 2 {
                    return Ok(None);
                }
                match parse_copy(&mut f, sector, sectors - 1) {
                    Ok((h, e)) => (h, e, true),
                    Err(_) if primary.starts_with("no ") => return Ok(None),
                    Err(backup) => return Err(format!("primary GPT: {primary}; backup GPT: {backup}")),
                }
            }
        };
        let esize = u32_at(&header, 84) as usize;
        let mut entries = Vec::new();
        for (i, e) in raw.chunks_exact(esize).enumerate() {
            if e[0..16].iter().all(|&b| b == 0) {
                continue;
            }
            let name: Vec<u16> =
                e[56..128].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&c| c != 0).collect();
            entries.push(Entry {
                number: i as u32 + 1,
                type_guid: guid_to_string(&e[0..16]),
                part_guid: guid_to_string(&e[16..32]),
                attrs: u64_at(e, 48),
                name: String::from_utf16_lossy(&name),
            });
        }
        let (primary_lba, backup_lba) =
            if used_backup { (u64_at(&header, 32), u64_at(&header, 24)) } else { (1, u64_at(&header, 32)) };
        Ok(Some(Table { entries, used_backup, sector, raw_entries: raw, entry_size: esize, primary_lba, backup_lba }))
    }

    /// The slot the GPT bits choose: highest priority among bootable USR partitions (lowest number on a tie).
    pub fn choose_usr(&self) -> Option<&Entry> {
        self.entries
            .iter()
            .filter(|e| e.is_usr() && e.bootable())
            .max_by(|a, b| a.priority().cmp(&b.priority()).then(b.number.cmp(&a.number)))
    }

    /// Count one boot attempt on `number` (tries - 1) in both copies. Returns the new tries value.
    pub fn decrement_tries(&mut self, dev: &Path, number: u32) -> Result<u8, String> {
        let idx = self.entries.iter().position(|e| e.number == number).ok_or("no such entry")?;
        let e = &mut self.entries[idx];
        let tries = e.tries().saturating_sub(1);
        e.attrs = (e.attrs & !(0xfu64 << 52)) | (u64::from(tries) << 52);
        let off = (number as usize - 1) * self.entry_size + 48;
        self.raw_entries[off..off + 8].copy_from_slice(&e.attrs.to_le_bytes());
        let ecrc = crc32(&self.raw_entries);
        let mut f = OpenOptions::new().read(true).write(true).open(dev).map_err(|e| format!("open for write: {e}"))?;
        for lba in [self.primary_lba, self.backup_lba] {
            let mut h = read_at(&mut f, lba * self.sector, self.sector as usize).map_err(|e| e.to_string())?;
            if &h[0..8] != b"EFI PART" {
                continue; // a damaged copy stays damaged; the good one is updated
            }
            let hsize = (u32_at(&h, 12) as usize).min(h.len());
            let elba = u64_at(&h, 72);
            h[88..92].copy_from_slice(&ecrc.to_le_bytes());
            h[16..20].fill(0);
            let c = crc32(&h[..hsize]);
            h[16..20].copy_from_slice(&c.to_le_bytes());
            f.seek(SeekFrom::Start(elba * self.sector)).map_err(|e| e.to_string())?;
            f.write_all(&self.raw_entries).map_err(|e| e.to_string())?;
            f.seek(SeekFrom::Start(lba * self.sector)).map_err(|e| e.to_string())?;
            f.write_all(&h).map_err(|e| e.to_string())?;
        }
        f.sync_all().map_err(|e| e.to_string())?;
        Ok(tries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(number: u32, name: &str, prio: u64, tries: u64, ok: u64) -> Entry {
        Entry {
            number,
            type_guid: TYPE_USR_X86_64.into(),
            part_guid: String::new(),
            attrs: (prio << 48) | (tries << 52) | (ok << 56),
            name: name.into(),
        }
    }

    fn table(entries: Vec<Entry>) -> Table {
        Table { entries, used_backup: false, sector: 512, raw_entries: vec![], entry_size: 128, primary_lba: 1, backup_lba: 0 }
    }

    /// A disk image whose LBA 1 holds a header (valid signature, size and CRC) with `edit` applied first.
    fn header_image(edit: impl FnOnce(&mut [u8])) -> tempfile::NamedTempFile {
        let mut h = vec![0u8; 512];
        h[0..8].copy_from_slice(b"EFI PART");
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&4u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        edit(&mut h);
        let crc = crc32(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        let mut img = vec![0u8; 8 * 512];
        img[512..1024].copy_from_slice(&h);
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), img).expect("write image");
        f
    }

    #[test]
    fn wild_header_fields_are_errors_not_panics_or_huge_reads() {
        let img = header_image(|h| h[72..80].copy_from_slice(&(u64::MAX / 256).to_le_bytes()));
        let err = parse_copy(&mut File::open(img.path()).expect("open"), 512, 1).expect_err("overflowing entry LBA");
        assert!(err.contains("beyond any disk"), "{err}");
        let img = header_image(|h| h[84..88].copy_from_slice(&0x8000_0000u32.to_le_bytes()));
        let err = parse_copy(&mut File::open(img.path()).expect("open"), 512, 1).expect_err("huge entry size");
        assert!(err.contains("out of range"), "{err}");
        let img = header_image(|_| {});
        let err = parse_copy(&mut File::open(img.path()).expect("open"), 512, u64::MAX / 2).expect_err("header LBA");
        assert!(err.contains("beyond any disk"), "{err}");
    }

    #[test]
    fn crc32_matches_ieee() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn exhausted_slot_falls_back() {
        let t = table(vec![entry(2, "USR-A", 1, 0, 1), entry(3, "USR-B", 2, 0, 0)]);
        assert_eq!(t.choose_usr().map(|e| e.name.as_str()), Some("USR-A"));
    }

    #[test]
    fn slot_with_tries_wins_by_priority() {
        let t = table(vec![entry(2, "USR-A", 1, 0, 1), entry(3, "USR-B", 2, 1, 0)]);
        assert_eq!(t.choose_usr().map(|e| e.name.as_str()), Some("USR-B"));
    }

    #[test]
    fn tie_prefers_lower_number_and_nothing_bootable_is_none() {
        let t = table(vec![entry(2, "USR-A", 1, 0, 1), entry(3, "USR-B", 1, 0, 1)]);
        assert_eq!(t.choose_usr().map(|e| e.number), Some(2));
        let t = table(vec![entry(2, "USR-A", 0, 0, 1), entry(3, "USR-B", 2, 0, 0)]);
        assert!(t.choose_usr().is_none());
    }
}
