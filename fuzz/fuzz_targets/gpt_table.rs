//! Fuzzes Keel's GPT reader and writer (`keel_model::gpt`, shared by mkimage, the updater and the initramfs,
//! whose slot choice runs on what it reads). A damaged or crafted table must be an error, never a panic or an
//! unbounded allocation; every partition it reports lies on the disk; a rewrite (which rebuilds a damaged copy)
//! and a grow onto a larger disk stay inside the disk, and what was written reads back undamaged. Input: the disk's first bytes from LBA 1 on
//! (header, then entries). The harness puts the "EFI PART" signature in place and fixes up both CRCs, so
//! mutations reach the fields behind them.
#![no_main]

use keel_model::crc32::crc32;
use keel_model::gpt::Disk;
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
            let crc = crc32(&disk[s..e]);
            disk[h + 88..h + 92].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let hsize = le_u32(&disk, h + 12) as usize;
    if (92..=SECTOR).contains(&hsize) {
        let mut hdr = disk[h..h + hsize].to_vec();
        hdr[16..20].fill(0);
        let crc = crc32(&hdr);
        disk[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
    }
    let path = std::env::temp_dir().join(format!("keel-fuzz-gpt-{}.img", std::process::id()));
    if std::fs::write(&path, &disk).is_err() {
        return;
    }
    let sectors = (disk.len() / SECTOR) as u64;
    if let Ok(Some(d)) = keel_init::initrd::gpt::read(&path) {
        let _ = keel_init::initrd::gpt::choose_usr(d.partitions());
    }
    let Ok(mut d) = Disk::open_rw(&path) else { return };
    for p in d.partitions() {
        let (start, len) = d.byte_range(p);
        assert!(start + len <= sectors * SECTOR as u64, "partition {} lies past the disk's end", p.number);
    }
    let last = d.partitions().last().map(|p| p.number);
    if d.write().is_ok() {
        assert_eq!(file_len(&path), disk.len() as u64, "the GPT rewrite wrote outside the disk");
        // What was written reads back, undamaged.
        let again = Disk::open(&path).expect("a table just written must read back");
        assert!(!again.damaged(), "a table just written reads back damaged");
    }
    // Growing onto a larger disk stays inside it too.
    if let (Some(n), Ok(f)) = (last, std::fs::OpenOptions::new().write(true).open(&path)) {
        if f.set_len(disk.len() as u64 + 64 * SECTOR as u64).is_ok() {
            if let Ok(mut d) = Disk::open_rw(&path) {
                if d.grow_to_end(n, 4096).is_ok() {
                    assert_eq!(file_len(&path), disk.len() as u64 + 64 * SECTOR as u64, "grow wrote past the end");
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
});

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}
