//! Unified kernel images: systemd's EFI stub + os-release + command line + kernel + initramfs, one PE file.
//!
//! Owns: reading the stub's PE layout (image base, section alignment, end of the last section), placing the
//! `.osrel`, `.cmdline`, `.linux`, `.initrd` sections after it with `objcopy`, and pinning the COFF time stamp
//! so the same inputs give the same bytes. Does not: sign anything, or decide the command line.

use std::path::Path;

use super::tools::{self, OBJCOPY};
use super::ImageError;

/// Debian's `systemd-boot-efi` stub.
pub const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

#[derive(Debug, PartialEq, Eq)]
struct PeLayout {
    image_base: u64,
    section_alignment: u64,
    /// First free relative virtual address after the last section.
    end_rva: u64,
    /// File offset of the COFF header's TimeDateStamp.
    timestamp_offset: usize,
    /// File offset of the optional header's CheckSum.
    checksum_offset: usize,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

fn pe_layout(b: &[u8]) -> Option<PeLayout> {
    let pe = u32_at(b, 0x3c)? as usize;
    if b.get(pe..pe + 4)? != b"PE\0\0" {
        return None;
    }
    let coff = pe + 4;
    let nsections = u16_at(b, coff + 2)? as usize;
    let opt_size = u16_at(b, coff + 16)? as usize;
    let opt = coff + 20;
    if u16_at(b, opt)? != 0x20b {
        return None; // not PE32+
    }
    let image_base = u64_at(b, opt + 24)?;
    let section_alignment = u64::from(u32_at(b, opt + 32)?);
    let table = opt + opt_size;
    let mut end_rva = 0u64;
    for i in 0..nsections {
        let s = table + i * 40;
        let vsize = u64::from(u32_at(b, s + 8)?);
        let va = u64::from(u32_at(b, s + 12)?);
        end_rva = end_rva.max(va + vsize);
    }
    Some(PeLayout { image_base, section_alignment, end_rva, timestamp_offset: coff + 4, checksum_offset: opt + 64 })
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// The inputs of one UKI.
pub struct UkiParts<'a> {
    pub osrel: &'a Path,
    pub cmdline: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
}

/// Build `out` from the stub and the parts.
pub fn build(stub: &Path, parts: &UkiParts<'_>, out: &Path) -> Result<(), ImageError> {
    tools::require_file(stub, "systemd-boot-efi")?;
    let bytes = std::fs::read(stub).map_err(|source| ImageError::Read { path: stub.to_path_buf(), source })?;
    let layout = pe_layout(&bytes).ok_or_else(|| ImageError::BadStub { path: stub.to_path_buf() })?;
    let mut args: Vec<String> = Vec::new();
    let mut next = align_up(layout.end_rva, layout.section_alignment);
    for (name, file) in
        [(".osrel", parts.osrel), (".cmdline", parts.cmdline), (".linux", parts.kernel), (".initrd", parts.initrd)]
    {
        let size = std::fs::metadata(file)
            .map_err(|source| ImageError::Read { path: file.to_path_buf(), source })?
            .len();
        args.push("--add-section".into());
        args.push(format!("{name}={}", file.display()));
        args.push("--change-section-vma".into());
        args.push(format!("{name}=0x{:x}", layout.image_base + next));
        next = align_up(next + size, layout.section_alignment);
    }
    args.push(stub.display().to_string());
    args.push(out.display().to_string());
    OBJCOPY.run(&args)?;
    // objcopy stamps the current time into the COFF header; pin it for reproducible output.
    let mut built = std::fs::read(out).map_err(|source| ImageError::Read { path: out.to_path_buf(), source })?;
    if let Some(l) = pe_layout(&built) {
        built[l.timestamp_offset..l.timestamp_offset + 4].copy_from_slice(&(tools::FIXED_EPOCH as u32).to_le_bytes());
        let sum = pe_checksum(&built, l.checksum_offset);
        built[l.checksum_offset..l.checksum_offset + 4].copy_from_slice(&sum.to_le_bytes());
        std::fs::write(out, &built).map_err(|source| ImageError::Write { path: out.to_path_buf(), source })?;
    }
    Ok(())
}

/// The PE image checksum (imagehlp's CheckSumMappedFile): 16-bit one's-complement-style sum of the file
/// with the CheckSum field taken as zero, plus the file length.
fn pe_checksum(b: &[u8], checksum_offset: usize) -> u32 {
    let mut sum: u64 = 0;
    for (i, c) in b.chunks(2).enumerate() {
        let off = i * 2;
        if off >= checksum_offset && off < checksum_offset + 4 {
            continue;
        }
        let w = u64::from(c[0]) | (u64::from(*c.get(1).unwrap_or(&0)) << 8);
        sum += w;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u32).wrapping_add(b.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_debian_stub_when_installed() {
        let Ok(b) = std::fs::read(STUB) else { return };
        let l = pe_layout(&b).expect("stub is PE32+");
        assert!(l.section_alignment.is_power_of_two());
        assert!(l.end_rva > 0);
    }

    #[test]
    fn rejects_non_pe() {
        assert_eq!(pe_layout(b"not a pe file at all, definitely too short"), None);
    }
}
