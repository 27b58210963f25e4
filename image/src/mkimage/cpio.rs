//! A reproducible `newc` cpio archive (the initramfs format), built in memory.
//!
//! Owns: the archive bytes: entries sorted by path (parents first), owner root, fixed mtime, inode numbers
//! assigned in order, device nodes without needing privileges. Does not: compress (see `mkimage::initramfs`).

use std::collections::BTreeMap;
use std::path::Path;

use super::ImageError;

#[derive(Debug, Clone)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// An archive under construction; paths are relative, without a leading `/`.
#[derive(Debug, Default)]
pub struct Archive {
    nodes: BTreeMap<String, Node>,
}

impl Archive {
    fn insert(&mut self, path: &str, node: Node) {
        let path = path.trim_start_matches('/').to_string();
        // create missing parents as 0755 directories
        let mut parent = String::new();
        for comp in path.split('/').collect::<Vec<_>>().iter().rev().skip(1).rev() {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            self.nodes.entry(parent.clone()).or_insert(Node::Dir { mode: 0o755 });
        }
        self.nodes.insert(path, node);
    }

    pub fn dir(&mut self, path: &str, mode: u32) {
        self.insert(path, Node::Dir { mode });
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.insert(path, Node::File { mode, data });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Node::Symlink { target: target.to_string() });
    }

    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.insert(path, Node::CharDev { mode, major, minor });
    }

    /// Add a file from the host, keeping only whether it is executable.
    pub fn file_from(&mut self, path: &str, src: &Path) -> Result<(), ImageError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(src).map_err(|source| ImageError::Read { path: src.to_path_buf(), source })?;
        let data = std::fs::read(src).map_err(|source| ImageError::Read { path: src.to_path_buf(), source })?;
        let mode = if meta.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 };
        self.file(path, mode, data);
        Ok(())
    }

    /// Serialise with every mtime set to `mtime`.
    pub fn to_bytes(&self, mtime: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, node)) in self.nodes.iter().enumerate() {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match node {
                Node::Dir { mode } => (0o040000 | mode, &[], (0, 0)),
                Node::File { mode, data } => (0o100000 | mode, data, (0, 0)),
                Node::Symlink { target } => (0o120777, target.as_bytes(), (0, 0)),
                Node::CharDev { mode, major, minor } => (0o020000 | mode, &[], (*major, *minor)),
            };
            let nlink = if matches!(node, Node::Dir { .. }) { 2 } else { 1 };
            write_entry(&mut out, (ino + 1) as u32, mode, nlink, mtime as u32, path, data, rdev);
        }
        write_entry(&mut out, 0, 0, 1, 0, "TRAILER!!!", &[], (0, 0));
        out
    }
}

#[allow(clippy::too_many_arguments)]
fn write_entry(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, mtime: u32, name: &str, data: &[u8], rdev: (u32, u32)) {
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        mtime,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        (name.len() + 1) as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() & 3 != 0 {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first_and_output_is_stable() {
        let mut a = Archive::default();
        a.file("usr/bin/init", 0o755, b"x".to_vec());
        a.char_dev("dev/console", 0o600, 5, 1);
        let bytes = a.to_bytes(0);
        let text = String::from_utf8_lossy(&bytes);
        let usr = text.find("usr\0").expect("usr dir");
        let init = text.find("usr/bin/init\0").expect("init");
        assert!(usr < init);
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!"));
        assert_eq!(bytes, a.to_bytes(0));
        assert_eq!(bytes.len() % 4, 0);
    }
}
