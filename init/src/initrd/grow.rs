//! First boot on a larger disk: ROOT grows to fill it.
//!
//! Owns: moving the backup GPT to the disk's new end and extending the last partition (ROOT) in both copies,
//! telling the kernel (BLKPG), and growing the mounted ext4 online (EXT4_IOC_RESIZE_FS). Does nothing unless
//! the disk grew and ROOT is the last partition. Every step is safe to repeat: a crash between the GPT write and
//! the filesystem resize is finished at the next boot. Does not: touch any partition but ROOT.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::gpt::{crc32, parse_copy};

/// 1 MiB alignment for the partition end, in 512-byte sectors (scaled for larger sectors below).
const ALIGN_BYTES: u64 = 1 << 20;

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn read_at(f: &mut File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(&mut buf)?;
    Ok(buf)
}

fn write_at(f: &mut File, off: u64, data: &[u8]) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(off))?;
    f.write_all(data)
}

fn seal(h: &mut [u8]) {
    let hsize = (u32_at(h, 12) as usize).min(h.len());
    h[16..20].fill(0);
    let c = crc32(&h[..hsize]);
    h[16..20].copy_from_slice(&c.to_le_bytes());
}

/// The outcome of a GPT grow: ROOT's new size in bytes and its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grown {
    pub start_bytes: u64,
    pub len_bytes: u64,
}

/// Extend partition `number` to the end of a disk that grew. `Ok(None)` when there is nothing to do.
pub fn grow_gpt(dev: &Path, sector: u64, sectors: u64, number: u32) -> Result<Option<Grown>, String> {
    let mut f = OpenOptions::new().read(true).write(true).open(dev).map_err(|e| format!("open {}: {e}", dev.display()))?;
    // The primary copy, validated like a read (Table::read may have used the backup when this one is damaged):
    // its fields decide where everything below is written.
    let (mut h, mut entries) = parse_copy(&mut f, sector, 1).map_err(|e| format!("primary GPT header: {e}"))?;
    let last_lba = sectors.checked_sub(1).ok_or("empty disk")?;
    let count = u32_at(&h, 80) as usize;
    let esize = u32_at(&h, 84) as usize;
    let entries_lba = u64_at(&h, 72);
    let idx = number.checked_sub(1).ok_or("bad partition number")? as usize;
    let e_off = idx * esize;
    if e_off + esize > entries.len() {
        return Err("partition number beyond the entry array".into());
    }
    let part_end = u64_at(&entries, e_off + 40);
    let is_last = entries.chunks_exact(esize).all(|e| e[0..16].iter().all(|b| *b == 0) || u64_at(e, 40) <= part_end);
    let entry_sectors = (count * esize).div_ceil(sector as usize) as u64;
    let backup_entries_lba = last_lba.checked_sub(entry_sectors).filter(|l| *l > 1).ok_or("disk too small for a backup GPT")?;
    let last_usable = backup_entries_lba - 1;
    let align = (ALIGN_BYTES / sector).max(1);
    let new_end = (last_usable + 1) / align * align - 1;
    if !is_last || new_end <= part_end {
        return Ok(None);
    }
    entries[e_off + 40..e_off + 48].copy_from_slice(&new_end.to_le_bytes());
    let ecrc = crc32(&entries);
    h[32..40].copy_from_slice(&last_lba.to_le_bytes());
    h[48..56].copy_from_slice(&last_usable.to_le_bytes());
    h[88..92].copy_from_slice(&ecrc.to_le_bytes());
    let mut b = h.clone();
    b[24..32].copy_from_slice(&last_lba.to_le_bytes());
    b[32..40].copy_from_slice(&1u64.to_le_bytes());
    b[72..80].copy_from_slice(&backup_entries_lba.to_le_bytes());
    seal(&mut h);
    seal(&mut b);
    // Backup first: until the primary is rewritten, firmware and tools still see the old, consistent table.
    write_at(&mut f, backup_entries_lba * sector, &entries).map_err(|e| e.to_string())?;
    write_at(&mut f, last_lba * sector, &b).map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| e.to_string())?;
    write_at(&mut f, entries_lba * sector, &entries).map_err(|e| e.to_string())?;
    write_at(&mut f, sector, &h).map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| e.to_string())?;
    let start = u64_at(&entries, e_off + 32);
    let grown = Grown { start_bytes: start.saturating_mul(sector), len_bytes: (new_end + 1).saturating_sub(start).saturating_mul(sector) };
    tell_kernel(&f, number, grown)?;
    Ok(Some(grown))
}

/// `struct blkpg_partition` from linux/blkpg.h.
#[repr(C)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: i32,
    devname: [u8; 64],
    volname: [u8; 64],
}

/// `struct blkpg_ioctl_arg` from linux/blkpg.h.
#[repr(C)]
struct BlkpgIoctlArg {
    op: i32,
    flags: i32,
    datalen: i32,
    data: *mut BlkpgPartition,
}

const BLKPG: libc::c_ulong = 0x1269;
const BLKPG_RESIZE_PARTITION: i32 = 3;
/// `_IOW('f', 16, __u64)`
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Resize the kernel's view of partition `number` (works while other partitions of the disk are in use).
fn tell_kernel(disk: &File, number: u32, g: Grown) -> Result<(), String> {
    let mut part = BlkpgPartition {
        start: i64::try_from(g.start_bytes).map_err(|_| "partition start overflows")?,
        length: i64::try_from(g.len_bytes).map_err(|_| "partition length overflows")?,
        pno: i32::try_from(number).map_err(|_| "partition number overflows")?,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as i32,
        data: &mut part,
    };
    // SAFETY: BLKPG reads a blkpg_ioctl_arg whose `data` points at a blkpg_partition; both live on this stack
    // frame for the duration of the call and have the kernel's layout (#[repr(C)]).
    let rc = unsafe { libc::ioctl(disk.as_raw_fd(), BLKPG, &mut arg) };
    if rc < 0 {
        return Err(format!("BLKPG resize: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Grow the ext4 on `dev` (mounted at `mountpoint`) to fill its partition, if it does not already.
/// Returns the new size in bytes, or `None` when the filesystem already fills the partition.
pub fn grow_ext4_to_partition(dev: &Path, mountpoint: &Path) -> Result<Option<u64>, String> {
    let name = dev.file_name().and_then(|n| n.to_str()).ok_or("bad device name")?;
    let sectors: u64 = std::fs::read_to_string(format!("/sys/class/block/{name}/size"))
        .map_err(|e| format!("size of {name}: {e}"))?
        .trim()
        .parse()
        .map_err(|_| "unreadable partition size")?;
    let part_bytes = sectors * 512;
    let mut f = File::open(dev).map_err(|e| format!("open {}: {e}", dev.display()))?;
    let sb = read_at(&mut f, 1024, 1024).map_err(|e| e.to_string())?;
    if u16::from_le_bytes([sb[56], sb[57]]) != 0xEF53 {
        return Err("no ext4 superblock".into());
    }
    let bsize = 1024u64 << u32_at(&sb, 24).min(6);
    let blocks = u64::from(u32_at(&sb, 4)) | (u64::from(u32_at(&sb, 0x150)) << 32);
    if part_bytes / bsize <= blocks {
        return Ok(None);
    }
    grow_ext4(mountpoint, part_bytes).map(Some)
}

/// Grow the ext4 mounted at `mountpoint` to fill `len_bytes`.
fn grow_ext4(mountpoint: &Path, len_bytes: u64) -> Result<u64, String> {
    let st = rustix::fs::statfs(mountpoint).map_err(|e| format!("statfs {}: {e}", mountpoint.display()))?;
    let bsize = u64::try_from(st.f_bsize).map_err(|_| "bad block size")?.max(1024);
    let blocks: u64 = len_bytes / bsize;
    let dir = File::open(mountpoint).map_err(|e| format!("open {}: {e}", mountpoint.display()))?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count) from the pointer, which is valid here.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks) };
    if rc < 0 {
        return Err(format!("EXT4_IOC_RESIZE_FS: {}", std::io::Error::last_os_error()));
    }
    Ok(blocks * bsize)
}
