//! The GPT reader and writer against small disk images built here byte by byte.

use super::*;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Both CRCs of a header whose entry array is `entries`.
fn seal(h: &mut [u8], entries: &[u8]) {
    put32(h, 88, crc32(entries));
    put32(h, 16, 0);
    let hsize = (le32(h, 12) as usize).min(h.len());
    let crc = crc32(&h[..hsize]);
    put32(h, 16, crc);
}

fn entry(e: &mut [u8], number: usize, name: &str, first: u64, last: u64, attrs: u64) {
    let o = (number - 1) * 128;
    e[o] = 0xAF; // any non-zero type GUID
    e[o + 16] = number as u8;
    put64(e, o + 32, first);
    put64(e, o + 40, last);
    put64(e, o + 48, attrs);
    for (i, c) in name.encode_utf16().enumerate() {
        e[o + 56 + 2 * i..o + 58 + 2 * i].copy_from_slice(&c.to_le_bytes());
    }
}

const A_BITS: SlotBits = SlotBits { priority: 1, tries: 0, successful: true };

/// A disk of `sectors` sectors with both GPT copies: 4 entries (one sector), usable LBA 3..=sectors-3,
/// partitions 1 "USR-A" 3..=10 (priority 1, successful), 2 "USR-B" 11..=18, 3 "ROOT" 19..=30. `edit` changes
/// the primary header and the entries before the CRCs are sealed; the backup is derived from the result.
fn disk_with(sector: u64, sectors: u64, edit: impl FnOnce(&mut [u8], &mut [u8])) -> tempfile::NamedTempFile {
    let mut e = vec![0u8; 512];
    entry(&mut e, 1, "USR-A", 3, 10, A_BITS.apply(1 << 60));
    entry(&mut e, 2, "USR-B", 11, 18, 1 << 60);
    entry(&mut e, 3, "ROOT", 19, 30, 0);
    let mut h = vec![0u8; sector as usize];
    h[0..8].copy_from_slice(b"EFI PART");
    put32(&mut h, 8, 0x0001_0000);
    put32(&mut h, 12, 92);
    put64(&mut h, 24, 1);
    put64(&mut h, 32, sectors - 1);
    put64(&mut h, 40, 3);
    put64(&mut h, 48, sectors - 3);
    h[56..72].copy_from_slice(&[0x4B; 16]);
    put64(&mut h, 72, 2);
    put32(&mut h, 80, 4);
    put32(&mut h, 84, 128);
    edit(&mut h, &mut e);
    seal(&mut h, &e);
    let mut b = h.clone();
    put64(&mut b, 24, sectors - 1);
    put64(&mut b, 32, 1);
    put64(&mut b, 72, sectors - 2);
    seal(&mut b, &e);
    let at = |lba: u64| (lba * sector) as usize;
    let mut img = vec![0u8; at(sectors)];
    img[at(1)..at(1) + h.len()].copy_from_slice(&h);
    img[at(2)..at(2) + e.len()].copy_from_slice(&e);
    img[at(sectors - 2)..at(sectors - 2) + e.len()].copy_from_slice(&e);
    img[at(sectors - 1)..at(sectors - 1) + b.len()].copy_from_slice(&b);
    let f = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(f.path(), img).expect("write image");
    f
}

fn disk() -> tempfile::NamedTempFile {
    disk_with(512, 64, |_, _| {})
}

fn poke(path: &Path, at: usize, bytes: &[u8]) {
    let mut img = std::fs::read(path).expect("read image");
    img[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, img).expect("write image");
}

fn corrupt_what(r: Result<Disk>) -> String {
    match r {
        Err(GptError::Corrupt { what, .. }) => what,
        other => panic!("expected a corrupt-table error, got {other:?}"),
    }
}

#[test]
fn slot_bits_round_trip_keep_other_bits_and_follow_the_gptprio_rule() {
    let attrs = (1u64 << 60) | 1; // read-only + required
    let bits = SlotBits { priority: 2, tries: 3, successful: true };
    let a = bits.apply(attrs);
    assert_eq!(SlotBits::from_attrs(a), bits);
    assert_eq!(a & ((1u64 << 60) | 1), (1u64 << 60) | 1);
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

#[test]
fn partitions_are_read_and_slot_bits_reach_both_copies() {
    let img = disk();
    let d = Disk::open(img.path()).expect("valid table");
    let names: Vec<&str> = d.partitions().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["USR-A", "USR-B", "ROOT"]);
    assert!(!d.damaged());
    assert_eq!(d.by_label("USR-A").map(Partition::slot).ok(), Some(A_BITS));
    assert_eq!(d.by_label("USR-B").map(|p| d.byte_range(p)).ok(), Some((11 * 512, 8 * 512)));
    assert!(matches!(d.by_label("OEM"), Err(GptError::NoSuchLabel { .. })));

    let bits = SlotBits { priority: 2, tries: 1, successful: false };
    set_slot_bits(img.path(), "USR-B", bits).expect("set bits");
    let d = Disk::open(img.path()).expect("reread");
    assert!(!d.damaged());
    let b = d.by_label("USR-B").expect("USR-B");
    assert_eq!(b.slot(), bits);
    assert_eq!(b.attrs & (1 << 60), 1 << 60, "other attribute bits kept");
    // The backup copy alone carries the new bits too.
    poke(img.path(), 512, &[0; 8]);
    let d = Disk::open(img.path()).expect("backup copy");
    assert!(d.used_backup());
    assert_eq!(d.by_label("USR-B").map(Partition::slot).ok(), Some(bits));
    let mut d = Disk::open_rw(img.path()).expect("rw");
    assert!(matches!(d.set_attrs(4, 0), Err(GptError::NoSuchPartition { number: 4, .. })));
}

#[test]
fn a_damaged_copy_is_read_from_the_other_and_rebuilt_as_it_was() {
    let pristine = std::fs::read(disk().path()).expect("read image");
    for (at, primary_damaged) in [(512 + 56, true), (63 * 512 + 56, false)] {
        let img = disk();
        poke(img.path(), at, &[0; 4]); // the disk GUID: the header CRC no longer matches
        let mut d = Disk::open_rw(img.path()).expect("one good copy");
        assert!(d.damaged());
        assert_eq!(d.used_backup(), primary_damaged);
        assert_eq!(d.partitions().len(), 3);
        d.write().expect("rebuild");
        assert_eq!(std::fs::read(img.path()).expect("reread"), pristine, "primary damaged: {primary_damaged}");
    }
}

#[test]
fn a_wild_backup_lba_is_taken_as_the_last_sector() {
    // The backup is where the spec puts it: the write corrects the primary's pointer.
    let img = disk_with(512, 64, |h, _| put64(h, 32, u64::MAX / 2));
    let mut d = Disk::open_rw(img.path()).expect("open");
    assert!(!d.damaged());
    d.write().expect("write");
    let bytes = std::fs::read(img.path()).expect("read image");
    assert_eq!(le64(&bytes, 512 + 32), 63);
    // No backup at all: it is rebuilt at the last sector, and nothing lands past the disk's end.
    let img = disk_with(512, 64, |h, _| put64(h, 32, u64::MAX / 2));
    poke(img.path(), 63 * 512, &[0; 512]);
    let mut d = Disk::open_rw(img.path()).expect("open");
    assert!(d.damaged() && !d.used_backup());
    d.write().expect("write");
    let bytes = std::fs::read(img.path()).expect("read image");
    assert_eq!(bytes.len(), 64 * 512, "something was written past the disk's end");
    assert_eq!(&bytes[63 * 512..63 * 512 + 8], b"EFI PART");
    assert!(!Disk::open(img.path()).expect("reopen").damaged());
}

/// Why a primary header edited by `edit` is refused (the backup is removed so the reason surfaces).
fn primary_problem(edit: impl FnOnce(&mut [u8])) -> String {
    let img = disk_with(512, 64, |h, _| edit(h));
    poke(img.path(), 63 * 512, &[0; 512]);
    corrupt_what(Disk::open(img.path()))
}

#[test]
fn header_fields_that_would_misdirect_a_read_or_write_make_the_copy_unusable() {
    type Edit = Box<dyn FnOnce(&mut [u8])>;
    let cases: [(&str, Edit); 8] = [
        ("beyond the disk", Box::new(|h| put64(h, 72, u64::MAX / 256))),
        ("entry size", Box::new(|h| put32(h, 84, 0x8000_0000))),
        ("entry size", Box::new(|h| put32(h, 84, 200))),
        ("count 0", Box::new(|h| put32(h, 80, 0))),
        ("does not fit a disk", Box::new(|h| put64(h, 48, u64::MAX))),
        ("overlaps the usable area", Box::new(|h| put64(h, 72, 5))),
        ("says it is at LBA 7", Box::new(|h| put64(h, 24, 7))),
        ("header size 65535", Box::new(|h| put32(h, 12, 0xffff))),
    ];
    for (want, edit) in cases {
        let what = primary_problem(edit);
        assert!(what.contains(want) && what.contains("backup: no \"EFI PART\""), "want {want:?}: {what}");
    }
}

#[test]
fn partitions_outside_the_usable_area_make_both_copies_unusable() {
    let what = corrupt_what(Disk::open(disk_with(512, 64, |_, e| put64(e, 40, 2)).path()));
    assert!(what.contains("partition 1 ends (LBA 2) before it starts (LBA 3)"), "{what}");
    let what = corrupt_what(Disk::open(disk_with(512, 64, |_, e| put64(e, 256 + 40, 62)).path()));
    assert!(what.contains("partition 3 (LBA 19..=62) lies outside the usable area LBA 3..=61"), "{what}");
}

#[test]
fn a_disk_without_gpt_is_told_apart_from_a_corrupt_one() {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(f.path(), vec![0u8; 64 * 512]).expect("write");
    assert!(matches!(Disk::open(f.path()), Err(GptError::NoGpt { .. })));
    let img = disk();
    poke(img.path(), 512 + 56, &[0; 4]);
    poke(img.path(), 63 * 512 + 56, &[0; 4]);
    assert!(corrupt_what(Disk::open(img.path())).contains("header CRC mismatch at LBA 1"));
}

#[test]
fn four_kib_sectors_are_found() {
    let img = disk_with(4096, 64, |_, _| {});
    let d = Disk::open(img.path()).expect("4K disk");
    assert_eq!(d.sector_size(), 4096);
    assert_eq!(d.by_label("ROOT").map(|p| d.byte_range(p)).ok(), Some((19 * 4096, 12 * 4096)));
}

#[test]
fn growing_moves_the_backup_to_the_end_and_extends_only_the_last_partition() {
    let img = disk();
    std::fs::OpenOptions::new().write(true).open(img.path()).and_then(|f| f.set_len(256 * 512)).expect("grow");
    let mut d = Disk::open_rw(img.path()).expect("open grown disk");
    assert!(!d.damaged(), "the old backup is still valid where the primary says");
    assert_eq!(d.grow_to_end(1, 4096).expect("not last"), None);
    // New usable end 253 (backup entries at 254, header at 255), aligned down to 8 sectors: 247.
    assert_eq!(d.grow_to_end(3, 4096).expect("grow"), Some((19, 247)));
    let mut d = Disk::open_rw(img.path()).expect("reopen");
    assert!(!d.damaged());
    assert_eq!(d.by_label("ROOT").map(|p| p.last_lba).ok(), Some(247));
    let bytes = std::fs::read(img.path()).expect("read image");
    assert_eq!(&bytes[255 * 512..255 * 512 + 8], b"EFI PART");
    assert_eq!(le64(&bytes, 512 + 48), 253, "primary's last usable LBA");
    assert_eq!(d.grow_to_end(3, 4096).expect("again"), None, "growing twice does nothing");
}

#[test]
fn a_copy_that_cannot_be_rebuilt_in_place_is_an_error_and_the_disk_is_untouched() {
    // Usable from LBA 2: the primary's own entry array overlaps it (so the primary is refused), and a rebuilt
    // primary would have nowhere to put its entry array.
    let img = disk_with(512, 64, |h, _| put64(h, 40, 2));
    let before = std::fs::read(img.path()).expect("read image");
    let mut d = Disk::open_rw(img.path()).expect("the backup is usable");
    assert!(d.used_backup());
    assert!(matches!(d.write(), Err(GptError::NoRoom { which: "primary", .. })));
    assert_eq!(std::fs::read(img.path()).expect("reread"), before);
}

#[test]
fn copies_that_would_overwrite_each_other_are_not_rewritten() {
    // Both entry arrays at LBA 62: each copy reads fine on its own, but a write of one lands on the other.
    let img = disk_with(512, 64, |h, _| put64(h, 72, 62));
    let before = std::fs::read(img.path()).expect("read image");
    let mut d = Disk::open_rw(img.path()).expect("each copy is valid");
    assert!(!d.damaged());
    d.set_slot("USR-B", SlotBits { priority: 2, tries: 1, successful: false }).expect("in memory");
    assert!(matches!(d.write(), Err(GptError::Layout { .. })));
    assert!(matches!(d.grow_to_end(3, 4096), Err(GptError::Layout { .. })));
    assert_eq!(std::fs::read(img.path()).expect("reread"), before);
}

#[test]
fn a_backup_of_another_shape_is_rebuilt_from_the_primary() {
    // Found by the gpt_table fuzz target: a primary with 3 entries and a backup with 4 both read fine, and the
    // write put the primary's 3 entries under the backup's header for 4, which then read back damaged.
    let img = disk();
    let mut bytes = std::fs::read(img.path()).expect("read image");
    put32(&mut bytes[512..1024], 80, 3);
    let entries = bytes[1024..1024 + 384].to_vec();
    seal(&mut bytes[512..1024], &entries);
    std::fs::write(img.path(), &bytes).expect("write image");
    let mut d = Disk::open_rw(img.path()).expect("open");
    assert!(d.damaged() && !d.used_backup());
    d.write().expect("write");
    let d = Disk::open(img.path()).expect("reopen");
    assert!(!d.damaged());
    assert_eq!(le32(&std::fs::read(img.path()).expect("read image"), 63 * 512 + 80), 3, "backup's entry count");
}
