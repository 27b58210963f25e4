//! Pin every time stamp in a FAT32 image's directory entries (mtools 4.0.32 stamps creation and access
//! times with the current time and ignores SOURCE_DATE_EPOCH).
//!
//! Owns: walking the directory tree of a FAT32 file system image (root cluster, cluster chains through the
//! first FAT) and rewriting the create/access/modify fields of each entry. Does not: change names, sizes,
//! clusters or anything else.

use std::path::Path;

use super::ImageError;

/// 2020-01-01 as a FAT date: (year - 1980) << 9 | month << 5 | day.
const FAT_DATE: u16 = (40 << 9) | (1 << 5) | 1;

fn u16_at(b: &[u8], o: usize) -> usize {
    usize::from(u16::from_le_bytes([b[o], b[o + 1]]))
}
fn u32_at(b: &[u8], o: usize) -> usize {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as usize
}

pub fn pin_times(path: &Path) -> Result<(), ImageError> {
    let mut img = std::fs::read(path).map_err(|source| ImageError::Read { path: path.to_path_buf(), source })?;
    let bad = || ImageError::ToolFailed {
        tool: "mkimage",
        command: format!("pin FAT times in {}", path.display()),
        status: "not a FAT32 image".into(),
        output: String::new(),
    };
    if img.len() < 512 || u32_at(&img, 36) == 0 {
        return Err(bad());
    }
    let bps = u16_at(&img, 11);
    let spc = usize::from(img[13]);
    let rsvd = u16_at(&img, 14);
    let nfats = usize::from(img[16]);
    let fatsz = u32_at(&img, 36);
    let root = u32_at(&img, 44);
    if bps == 0 || spc == 0 {
        return Err(bad());
    }
    let fat_off = rsvd * bps;
    let data = (rsvd + nfats * fatsz) * bps;
    let csize = spc * bps;
    let next = |img: &[u8], c: usize| -> Option<usize> {
        let o = fat_off + c * 4;
        let v = u32_at(img, o) & 0x0FFF_FFFF;
        (2..0x0FFF_FFF8).contains(&v).then_some(v)
    };
    let mut stack = vec![root];
    let mut visited = std::collections::BTreeSet::new();
    while let Some(first) = stack.pop() {
        let mut cluster = Some(first);
        while let Some(c) = cluster {
            if !visited.insert(c) {
                break; // a loop in the chain: stop rather than spin
            }
            let start = data + (c - 2) * csize;
            if start + csize > img.len() {
                return Err(bad());
            }
            for e in (start..start + csize).step_by(32) {
                let first_byte = img[e];
                if first_byte == 0 {
                    break;
                }
                let attr = img[e + 11];
                if first_byte == 0xE5 || attr == 0x0F {
                    continue;
                }
                img[e + 13] = 0;
                img[e + 14..e + 16].fill(0);
                img[e + 16..e + 18].copy_from_slice(&FAT_DATE.to_le_bytes());
                img[e + 18..e + 20].copy_from_slice(&FAT_DATE.to_le_bytes());
                img[e + 22..e + 24].fill(0);
                img[e + 24..e + 26].copy_from_slice(&FAT_DATE.to_le_bytes());
                let is_dot = img[e] == b'.';
                if attr & 0x10 != 0 && !is_dot {
                    let hi = u16_at(&img, e + 20);
                    let lo = u16_at(&img, e + 26);
                    let sub = (hi << 16) | lo;
                    if sub >= 2 {
                        stack.push(sub);
                    }
                }
            }
            cluster = next(&img, c);
        }
    }
    std::fs::write(path, &img).map_err(|source| ImageError::Write { path: path.to_path_buf(), source })
}
