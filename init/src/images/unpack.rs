//! Unpacking one layer tarball into a directory that overlayfs can use as a lower layer.
//!
//! Owns: decompression (gzip, zstd or none, recognised by magic bytes, not by media type), path safety (no
//! entry lands outside the destination), and whiteout conversion: `.wh.NAME` becomes a 0/0 character device
//! `NAME` and `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory — the form overlayfs understands.
//! Ownership, modes, mtimes and xattrs are kept. Does not: decide where layers live (see `Store`).

use std::fs;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

/// Wrap `r` in the right decompressor for its first bytes.
pub fn decompressed<'a>(mut r: BufReader<Box<dyn Read + 'a>>) -> Result<Box<dyn Read + 'a>, String> {
    use std::io::BufRead;
    let head = r.fill_buf().map_err(|e| format!("cannot read: {e}"))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(r).map_err(|e| format!("zstd: {e}"))?))
    } else {
        Ok(Box::new(r))
    }
}

/// An error with its causes (the tar crate puts the useful part in the source).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn safe_rel(p: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::CurDir | Component::RootDir => {}
            _ => return Err(format!("entry {} leaves the layer", p.display())),
        }
    }
    Ok(out)
}

/// The directory `dest/rel` for a whiteout entry `entry`, made one component at a time without following any
/// symlink: an earlier entry may have made a component a symlink to anywhere on the host (`etc -> /`), and
/// `create_dir_all` would create directories there. A whiteout below a symlink or a file is refused.
fn whiteout_dir(dest: &Path, rel: &Path, entry: &Path) -> Result<PathBuf, String> {
    let mut cur = dest.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!("whiteout {} lies behind a symlink ({}); refusing a path that may leave the layer", entry.display(), cur.display()))
            }
            Ok(_) => return Err(format!("whiteout {} lies below a file ({})", entry.display(), cur.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::create_dir(&cur).map_err(|e| format!("{}: {e}", cur.display()))?,
            Err(e) => return Err(format!("{}: {e}", cur.display())),
        }
    }
    Ok(cur)
}

/// Unpack the layer blob at `blob` into the (new) directory `dest`.
pub fn unpack_layer(blob: &Path, dest: &Path) -> Result<(), String> {
    let f = fs::File::open(blob).map_err(|e| format!("{}: {e}", blob.display()))?;
    fs::create_dir_all(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let reader = decompressed(BufReader::with_capacity(256 * 1024, Box::new(f) as Box<dyn Read>))?;
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(true);
    ar.set_overwrite(true);
    let entries = ar.entries().map_err(|e| format!("not a tar archive: {e}"))?;
    let mut opaque = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("damaged tar stream: {e}"))?;
        let path = entry.path().map_err(|e| format!("bad entry name: {e}"))?.into_owned();
        let rel = safe_rel(&path)?;
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let parent = whiteout_dir(dest, rel.parent().unwrap_or(Path::new("")), &path)?;
            if hidden == ".wh..opq" {
                opaque.push(parent);
            } else {
                let target = parent.join(hidden);
                let _ = fs::remove_file(&target);
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &target,
                    rustix::fs::FileType::CharacterDevice,
                    rustix::fs::Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )
                .map_err(|e| format!("whiteout {}: {e}", target.display()))?;
            }
            continue;
        }
        entry.unpack_in(dest).map_err(|e| format!("{}: {}", path.display(), chain(&e)))?;
    }
    // After the directory entries themselves (whose unpacking would not remove the xattr, but keep it simple).
    for dir in opaque {
        // lsetxattr: should a later entry have put a symlink there, it marks the link, not where it points.
        rustix::fs::lsetxattr(&dir, "trusted.overlay.opaque", b"y", rustix::fs::XattrFlags::empty())
            .map_err(|e| format!("opaque directory {}: {e}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, *data).expect("append");
        }
        b.into_inner().expect("tar")
    }

    #[test]
    fn whiteouts_become_overlay_devices_and_opaque_dirs_in_every_compression() {
        let plain = layer(&[("etc/keep", b"k"), ("etc/.wh.gone", b""), ("var/.wh..wh..opq", b""), ("var/new", b"n")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &plain).expect("gz");
        let gz = gz.finish().expect("gz");
        let zst = zstd::encode_all(&plain[..], 1).expect("zstd");
        for (kind, bytes) in [("plain", plain.clone()), ("gzip", gz), ("zstd", zst)] {
            let dir = tempfile::tempdir().expect("tempdir");
            let blob = dir.path().join("blob");
            fs::write(&blob, bytes).expect("write");
            let dest = dir.path().join("out");
            unpack_layer(&blob, &dest).unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert_eq!(fs::read(dest.join("etc/keep")).expect("keep"), b"k", "{kind}");
            let wh = fs::symlink_metadata(dest.join("etc/gone")).expect("whiteout");
            assert!(wh.file_type().is_char_device(), "{kind}: whiteout is a char device");
            let x = rustix::fs::getxattr(dest.join("var"), "trusted.overlay.opaque", &mut [0u8; 4]);
            assert_eq!(x.ok(), Some(1), "{kind}: opaque xattr");
            assert!(dest.join("var/new").exists());
        }
    }

    /// Unpack a layer of `etc -> <dir>/outside` followed by empty `entries`; returns the error and what appeared
    /// in `outside`.
    fn unpack_behind_symlink(entries: &[&str]) -> (String, Vec<std::ffi::OsString>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).expect("mkdir");
        let mut b = tar::Builder::new(Vec::new());
        let header = |kind: tar::EntryType, mode: u32| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(0);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h
        };
        b.append_link(&mut header(tar::EntryType::Symlink, 0o777), "etc", &outside).expect("link");
        for e in entries {
            b.append_data(&mut header(tar::EntryType::Regular, 0o644), e, std::io::empty()).expect("entry");
        }
        let blob = dir.path().join("blob");
        fs::write(&blob, b.into_inner().expect("tar")).expect("write");
        let err = unpack_layer(&blob, &dir.path().join("out")).unwrap_err();
        (err, fs::read_dir(&outside).expect("read").flatten().map(|e| e.file_name()).collect())
    }

    #[test]
    fn whiteouts_behind_a_symlink_cannot_leave_the_layer() {
        let (err, made) = unpack_behind_symlink(&["etc/.wh.passwd"]);
        assert!(err.contains("behind a symlink"), "{err}");
        assert!(made.is_empty(), "created outside the layer: {made:?}");
    }

    #[test]
    fn a_whiteout_deeper_behind_a_symlink_creates_nothing_outside() {
        let (err, made) = unpack_behind_symlink(&["etc/made/by/layer/.wh.x", "etc/opq/.wh..wh..opq"]);
        assert!(err.contains("behind a symlink"), "{err}");
        assert!(made.is_empty(), "directories created outside the layer: {made:?}");
    }

    #[test]
    fn entries_escaping_the_layer_are_refused() {
        assert!(safe_rel(Path::new("../x/.wh.y")).is_err());
        assert_eq!(safe_rel(Path::new("./a/b")).ok(), Some(PathBuf::from("a/b")));
    }
}
