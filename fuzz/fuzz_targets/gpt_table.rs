//! Fuzzes Keel's three GPT readers on the same disk: mkimage's (`keel_image::gpt`), the updater's
//! (`keel_updater::slot::GptDisk`, which also rewrites the table when it changes slot bits) and the initramfs's
//! (`keel_init::initrd::gpt`). A damaged or crafted table must be an error, never a panic or an unbounded
//! allocation, and the updater's rewrite must stay inside the disk. Input: the disk's first bytes from LBA 1 on
//! (header, then entries). The harness puts the "EFI PART" signature in place and fixes up both CRCs, so
//! mutations reach the fields behind them.
#![no_main]

use keel_image::gpt::Table;
use keel_updater::slot::GptDisk;
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
    if std::fs::write(&path, &disk).is_err() {
        return;
    }
    let _ = Table::read(&path);
    let sectors = (disk.len() / SECTOR) as u64;
    if let Ok(Some(t)) = keel_init::initrd::gpt::Table::read(&path, SECTOR as u64, sectors) {
        let _ = t.choose_usr();
    }
    if let Ok(mut d) = GptDisk::open(&path) {
        for p in d.partitions() {
            let _ = d.byte_range(&p);
        }
        if d.write().is_ok() {
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            assert_eq!(len, disk.len() as u64, "the updater's GPT rewrite wrote outside the disk");
        }
    }
});
