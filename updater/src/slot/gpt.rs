//! A small, careful GPT reader/writer for partition attribute bits.
//!
//! Owns: reading both GPT headers and entry arrays, checking their CRC32s, and rewriting one entry's
//! 64-bit attribute field in BOTH copies with fresh CRCs (primary first, then backup, each fsynced).
//! Does not: create, move or resize partitions (the image builder does), or interpret the bits (see `slot`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Errors reading or writing a GPT.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("{path}: {context}: {source}")]
    Io {
        path: PathBuf,
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no GPT found (no \"EFI PART\" at LBA 1 for 512- or 4096-byte sectors); is this the whole disk?")]
    NoGpt { path: PathBuf },
    #[error("{path}: both GPT copies are corrupt ({what}); repair with `sgdisk --verify` before updating")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: no partition labelled {label}; the disk was not built for A/B updates")]
    NoSuchLabel { path: PathBuf, label: String },
}

type Result<T> = std::result::Result<T, GptError>;

/// One partition entry as read from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 0-based index in the entry array (sgdisk numbers are index + 1).
    pub index: u32,
    pub name: String,
    pub type_guid: String,
    pub unique_guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
}

#[derive(Debug, Clone)]
struct Header {
    raw: Vec<u8>,
    my_lba: u64,
    entries_lba: u64,
    num_entries: u32,
    entry_size: u32,
}

/// A GPT disk (a block device or a disk image file).
pub struct GptDisk {
    path: PathBuf,
    file: File,
    sector: u64,
    primary: Header,
    backup: Header,
    entries: Vec<u8>,
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Mixed-endian GUID text as sgdisk prints it.
fn guid_string(b: &[u8]) -> String {
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

impl GptDisk {
    /// Opens `path` read-write and reads both GPT copies; at least one must be valid.
    pub fn open(path: &Path) -> Result<GptDisk> {
        let io = |context: &str, source| GptError::Io {
            path: path.into(),
            context: context.into(),
            source,
        };
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io("opening", e))?;
        let mut sig = [0u8; 8];
        let mut sector = 0;
        let disk_len = match file.metadata().map_err(|e| io("stat", e))?.len() {
            0 => block_device_len(&file).unwrap_or(0),
            n => n,
        };
        'probe: for at_end in [false, true] {
            for s in [512u64, 4096] {
                let off = if at_end {
                    (disk_len / s).saturating_sub(1) * s
                } else {
                    s
                };
                if file.read_exact_at(&mut sig, off).is_ok() && &sig == b"EFI PART" {
                    sector = s;
                    break 'probe;
                }
            }
        }
        if sector == 0 {
            return Err(GptError::NoGpt { path: path.into() });
        }
        let read_header = |lba: u64| -> std::result::Result<(Header, Vec<u8>), String> {
            let mut raw = vec![0u8; sector as usize];
            // The backup's LBA comes from the primary header: a wild value is an error, not an overflow.
            let at = lba.checked_mul(sector).ok_or_else(|| format!("header LBA {lba} is beyond any disk"))?;
            file.read_exact_at(&mut raw, at)
                .map_err(|e| format!("reading LBA {lba}: {e}"))?;
            if &raw[..8] != b"EFI PART" {
                return Err(format!("no signature at LBA {lba}"));
            }
            let hsize = le32(&raw, 12) as usize;
            if !(92..=sector as usize).contains(&hsize) {
                return Err(format!("header size {hsize} at LBA {lba}"));
            }
            let mut h = raw[..hsize].to_vec();
            let crc = le32(&h, 16);
            h[16..20].fill(0);
            if crc32fast::hash(&h) != crc {
                return Err(format!("header CRC mismatch at LBA {lba}"));
            }
            let hdr = Header {
                raw: raw[..hsize].to_vec(),
                my_lba: le64(&raw, 24),
                entries_lba: le64(&raw, 72),
                num_entries: le32(&raw, 80),
                entry_size: le32(&raw, 84),
            };
            if hdr.my_lba != lba
                || hdr.entry_size < 128
                || hdr.entry_size > 4096
                || hdr.num_entries > 1024
            {
                return Err(format!("implausible header fields at LBA {lba}"));
            }
            let len = hdr.num_entries as usize * hdr.entry_size as usize;
            let mut entries = vec![0u8; len];
            let at = hdr.entries_lba.checked_mul(sector).ok_or_else(|| {
                format!("entry array LBA {} (header at LBA {lba}) is beyond any disk", hdr.entries_lba)
            })?;
            file.read_exact_at(&mut entries, at)
                .map_err(|e| format!("reading entries at LBA {}: {e}", hdr.entries_lba))?;
            if crc32fast::hash(&entries) != le32(&hdr.raw, 88) {
                return Err(format!("entries CRC mismatch for header at LBA {lba}"));
            }
            Ok((hdr, entries))
        };
        let primary = read_header(1);
        let last = (disk_len / sector).saturating_sub(1);
        let alt = match &primary {
            Ok((h, _)) => le64(&h.raw, 32),
            Err(_) => last,
        };
        // A backup LBA outside the disk (the primary's field is only CRC-protected, not sane) is taken as the
        // last sector, where the spec puts it: a rewrite must never land at a wrapped or foreign offset.
        let alt = if alt <= 1 || alt > last { last } else { alt };
        let backup = read_header(alt);
        let (p, b, entries) = match (primary, backup) {
            (Ok((p, e)), Ok((b, _))) => (p, b, e),
            (Ok((p, e)), Err(_)) => {
                let b = synth_backup(&p, alt, sector);
                (p, b, e)
            }
            (Err(_), Ok((b, e))) => {
                let p = synth_primary(&b);
                (p, b, e)
            }
            (Err(a), Err(b)) => {
                return Err(GptError::Corrupt {
                    path: path.into(),
                    what: format!("{a}; {b}"),
                })
            }
        };
        Ok(GptDisk {
            path: path.into(),
            file,
            sector,
            primary: p,
            backup: b,
            entries,
        })
    }

    pub fn sector_size(&self) -> u64 {
        self.sector
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every non-empty partition entry.
    pub fn partitions(&self) -> Vec<Partition> {
        let es = self.primary.entry_size as usize;
        (0..self.primary.num_entries)
            .filter_map(|i| {
                let e = &self.entries[i as usize * es..(i as usize + 1) * es];
                if e[..16].iter().all(|&b| b == 0) {
                    return None;
                }
                let units: Vec<u16> = e[56..128]
                    .chunks(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|&u| u != 0)
                    .collect();
                Some(Partition {
                    index: i,
                    name: String::from_utf16_lossy(&units),
                    type_guid: guid_string(&e[..16]),
                    unique_guid: guid_string(&e[16..32]),
                    first_lba: le64(e, 32),
                    last_lba: le64(e, 40),
                    attributes: le64(e, 48),
                })
            })
            .collect()
    }

    /// The partition with GPT name `label`.
    pub fn by_label(&self, label: &str) -> Result<Partition> {
        self.partitions()
            .into_iter()
            .find(|p| p.name == label)
            .ok_or_else(|| GptError::NoSuchLabel {
                path: self.path.clone(),
                label: label.into(),
            })
    }

    /// Byte offset and length of a partition.
    pub fn byte_range(&self, p: &Partition) -> (u64, u64) {
        // Saturating: a partition that ends before it starts has no bytes, whatever the table says.
        (
            p.first_lba.saturating_mul(self.sector),
            p.last_lba.saturating_add(1).saturating_sub(p.first_lba).saturating_mul(self.sector),
        )
    }

    /// Sets entry `index`'s attributes in memory; call [`GptDisk::write`] to persist.
    pub fn set_attributes(&mut self, index: u32, attributes: u64) {
        let o = index as usize * self.primary.entry_size as usize + 48;
        self.entries[o..o + 8].copy_from_slice(&attributes.to_le_bytes());
    }

    /// Writes the entry array and both headers with fresh CRCs: primary, fsync, backup, fsync.
    pub fn write(&mut self) -> Result<()> {
        let crc = crc32fast::hash(&self.entries);
        for which in 0..2 {
            let hdr = if which == 0 {
                &mut self.primary
            } else {
                &mut self.backup
            };
            hdr.raw[88..92].copy_from_slice(&crc.to_le_bytes());
            hdr.raw[16..20].fill(0);
            let hcrc = crc32fast::hash(&hdr.raw);
            hdr.raw[16..20].copy_from_slice(&hcrc.to_le_bytes());
            let (entries_at, header_at) = (hdr.entries_lba * self.sector, hdr.my_lba * self.sector);
            let raw = hdr.raw.clone();
            let io = |context: &str, source| GptError::Io {
                path: self.path.clone(),
                context: context.into(),
                source,
            };
            self.file
                .write_all_at(&self.entries, entries_at)
                .map_err(|e| io("writing GPT entries", e))?;
            self.file
                .write_all_at(&raw, header_at)
                .map_err(|e| io("writing GPT header", e))?;
            self.file.sync_data().map_err(|e| io("syncing GPT", e))?;
        }
        Ok(())
    }
}

fn synth_backup(p: &Header, alt: u64, sector: u64) -> Header {
    let mut raw = p.raw.clone();
    let entries_sectors = (p.num_entries as u64 * p.entry_size as u64).div_ceil(sector);
    let entries_lba = alt - entries_sectors;
    raw[24..32].copy_from_slice(&alt.to_le_bytes());
    raw[32..40].copy_from_slice(&p.my_lba.to_le_bytes());
    raw[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    Header {
        raw,
        my_lba: alt,
        entries_lba,
        num_entries: p.num_entries,
        entry_size: p.entry_size,
    }
}

fn synth_primary(b: &Header) -> Header {
    let mut raw = b.raw.clone();
    raw[24..32].copy_from_slice(&1u64.to_le_bytes());
    raw[32..40].copy_from_slice(&b.my_lba.to_le_bytes());
    raw[72..80].copy_from_slice(&2u64.to_le_bytes());
    Header {
        raw,
        my_lba: 1,
        entries_lba: 2,
        num_entries: b.num_entries,
        entry_size: b.entry_size,
    }
}

fn block_device_len(file: &File) -> Option<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file.try_clone().ok()?;
    f.seek(SeekFrom::End(0)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-sector image: a primary header (valid CRCs) whose backup LBA is `backup_lba`, 4 empty entries.
    fn image(backup_lba: u64, entries_lba: u64) -> tempfile::NamedTempFile {
        let entries = vec![0u8; 512];
        let mut h = vec![0u8; 512];
        h[0..8].copy_from_slice(b"EFI PART");
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[32..40].copy_from_slice(&backup_lba.to_le_bytes());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&4u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        let mut img = vec![0u8; 64 * 512];
        img[512..1024].copy_from_slice(&h);
        img[1024..1536].copy_from_slice(&entries);
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), img).expect("write image");
        f
    }

    #[test]
    fn wild_lbas_are_errors_or_the_spec_location_never_a_wrapped_write() {
        // The backup LBA comes from the primary header: a wild one means "rebuild the backup at the last sector".
        let img = image(u64::MAX / 2, 2);
        let mut disk = GptDisk::open(img.path()).expect("a good primary opens");
        disk.write().expect("write both copies");
        let bytes = std::fs::read(img.path()).expect("read image");
        assert_eq!(&bytes[63 * 512..63 * 512 + 8], b"EFI PART", "backup not rebuilt at the last sector");
        assert_eq!(bytes.len(), 64 * 512, "something was written past the disk's end");
        // An entry array beyond any disk: the primary is unusable, and there is no backup to fall back on.
        assert!(GptDisk::open(image(63, u64::MAX / 256).path()).is_err());
    }
}
