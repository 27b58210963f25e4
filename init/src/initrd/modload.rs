//! Loading kernel modules in dependency order, modprobe-style, without modprobe.
//!
//! Owns: loading a request's modules from one module tree (the initramfs' or USR's `/usr/lib/modules/<kernel>`)
//! with finit_module(2), in the order `keel_model::kmod` plans (soft `pre:` deps, hard deps with the last
//! listed loaded first, the module, soft `post:` deps), and reading modules-load.d style lists.
//! Does not: choose which modules to load (lists in /etc/keel/initrd-modules and
//! /usr/lib/modules-load.d/*.conf, written by mkimage), or unload anything.

use std::fs::File;
use std::path::{Path, PathBuf};

use keel_model::kmod::{LoadPlan, ModuleIndex};

/// A module tree on disk and its index.
#[derive(Debug)]
pub struct ModuleDb {
    root: PathBuf,
    index: ModuleIndex,
}

/// What loading a list did.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    pub already: Vec<String>,
    /// (module, reason) — e.g. crc32c_intel on a CPU without SSE4.2 fails with ENODEV, which is harmless.
    pub failed: Vec<(String, String)>,
    /// Requested names that are neither files, aliases nor built-in modules here.
    pub unknown: Vec<String>,
}

impl ModuleDb {
    /// Read the indexes under `root`. A missing modules.dep is an error; the others are optional.
    pub fn load(root: &Path) -> std::io::Result<ModuleDb> {
        Ok(ModuleDb { root: root.to_path_buf(), index: ModuleIndex::load(root)? })
    }

    /// Load `requests` and their dependencies into the running kernel.
    pub fn load_all(&self, requests: &[String]) -> LoadReport {
        let LoadPlan { order, unknown } = self.index.plan(requests);
        let mut report = LoadReport { unknown, ..LoadReport::default() };
        for name in order {
            if Path::new("/sys/module").join(&name).exists() {
                report.already.push(name);
                continue;
            }
            let Some(rel) = self.index.path_of(&name) else { continue };
            match load_file(&self.root.join(rel)) {
                Ok(()) => report.loaded.push(name),
                Err(e) if e.raw_os_error() == Some(libc_eexist()) => report.already.push(name),
                Err(e) => report.failed.push((name, e.to_string())),
            }
        }
        report
    }
}

const fn libc_eexist() -> i32 {
    17 // EEXIST on Linux
}

/// finit_module(2) on one file; compressed modules are handed to the kernel to decompress.
fn load_file(path: &Path) -> std::io::Result<()> {
    const MODULE_INIT_COMPRESSED_FILE: i32 = 4;
    let f = File::open(path)?;
    let compressed = path.extension().is_some_and(|e| e == "xz" || e == "zst" || e == "gz");
    let flags = if compressed { MODULE_INIT_COMPRESSED_FILE } else { 0 };
    rustix::system::finit_module(&f, c"", flags).map_err(std::io::Error::from)
}

/// Module names listed in a modules-load.d style file (one per line, `#` comments).
pub fn read_list(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_files_skip_comments() {
        let dir = std::env::temp_dir().join(format!("keel-modlist-{}", std::process::id()));
        std::fs::write(&dir, "# c\nvirtio_blk\n\n ext4 # fs\n").expect("write");
        assert_eq!(read_list(&dir), ["virtio_blk", "ext4"]);
        let _ = std::fs::remove_file(&dir);
    }
}
