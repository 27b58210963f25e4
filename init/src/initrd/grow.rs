//! First boot on a larger disk: ROOT grows to fill it.
//!
//! Owns: moving the backup GPT to the disk's new end and extending the last partition (ROOT) in both copies,
//! telling the kernel (BLKPG), and growing the mounted ext4 online (EXT4_IOC_RESIZE_FS). Does nothing unless
//! the disk grew and ROOT is the last partition. Every step is safe to repeat: a crash between the GPT write and
//! the filesystem resize is finished at the next boot. Does not: touch any partition but ROOT.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::gpt::Disk;

/// ROOT's new end is aligned down to 1 MiB.
const ALIGN_BYTES: u64 = 1 << 20;

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn read_at(f: &mut File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// The outcome of a GPT grow: ROOT's new size in bytes and its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grown {
    pub start_bytes: u64,
    pub len_bytes: u64,
}

/// Extend partition `number` to the end of a disk that grew (the backup GPT moves to the new end; both copies
/// are checked and rewritten by `keel_model::gpt`), then tell the kernel. `Ok(None)` when there is nothing to do.
pub fn grow_gpt(dev: &Path, number: u32) -> Result<Option<Grown>, String> {
    let mut disk = Disk::open_rw(dev).map_err(|e| e.to_string())?;
    let Some((first, last)) = disk.grow_to_end(number, ALIGN_BYTES).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let sector = disk.sector_size();
    let grown = Grown { start_bytes: first * sector, len_bytes: (last - first + 1) * sector };
    tell_kernel(disk.file(), number, grown)?;
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
