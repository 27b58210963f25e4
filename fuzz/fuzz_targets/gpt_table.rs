//! Fuzzes the GPT reader (`keel_image::gpt::Table::read`): the updater reads the partition table of the disk
//! it runs from before it writes a slot, and a damaged or crafted table must be an error, never a panic or
//! an unbounded allocation. Input: the disk's first bytes from LBA 1 on (header, then entries). The harness
//! puts the "EFI PART" signature in place and fixes up both CRCs, so mutations reach the fields behind them.
#![no_main]

use keel_image::gpt::Table;
use libfuzzer_sys::fuzz_target;

const SECTOR: usize = 512;

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 92 || data.len() > 256 * 1024 {
        return;
    }
    let mut disk = vec![0u8; SECTOR];
    disk.extend_from_slice(data);
    disk.resize(disk.len().max(2 * SECTOR), 0);
    disk[SECTOR..SECTOR + 8].copy_from_slice(b"EFI PART");
    // Entry array CRC over what the header points at, when that lies inside the input.
    let h = SECTOR;
    let lba = u64::from_le_bytes(disk[h + 72..h + 80].try_into().unwrap_or([0; 8]));
    let len = (le_u32(&disk, h + 80) as u64).saturating_mul(le_u32(&disk, h + 84) as u64);
    let start = lba.saturating_mul(SECTOR as u64);
    if let (Ok(s), Ok(l)) = (usize::try_from(start), usize::try_from(len)) {
        if let Some(e) = s.checked_add(l).filter(|e| *e <= disk.len()) {
            let crc = crc32fast::hash(&disk[s..e]);
            disk[h + 88..h + 92].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let hsize = le_u32(&disk, h + 12) as usize;
    if (92..=SECTOR).contains(&hsize) {
        let mut hdr = disk[h..h + hsize].to_vec();
        hdr[16..20].fill(0);
        let crc = crc32fast::hash(&hdr);
        disk[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
    }
    let path = std::env::temp_dir().join(format!("keel-fuzz-gpt-{}.img", std::process::id()));
    if std::fs::write(&path, &disk).is_ok() {
        let _ = Table::read(&path);
    }
});
