//! Loading kernel modules in dependency order, modprobe-style, without modprobe.
//!
//! Owns: reading `modules.dep`, `modules.softdep` and `modules.alias` of one module tree (the initramfs' or
//! USR's `/usr/lib/modules/<kernel>`), ordering a request (soft `pre:` deps, hard deps with the last listed
//! loaded first, the module, soft `post:` deps) and loading each file with finit_module(2).
//! Does not: choose which modules to load (lists in /etc/keel/initrd-modules and
//! /usr/lib/modules-load.d/*.conf, written by mkimage), or unload anything.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Normalise a module file name or request: basename, no `.ko*` suffix, `-` → `_`.
pub fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = match base.find(".ko") {
        Some(i) => &base[..i],
        None => base,
    };
    stem.replace('-', "_")
}

#[derive(Debug, Default)]
pub struct ModuleDb {
    root: PathBuf,
    paths: BTreeMap<String, String>,
    deps: BTreeMap<String, Vec<String>>,
    soft: BTreeMap<String, (Vec<String>, Vec<String>)>,
    aliases: BTreeMap<String, Vec<String>>,
}

/// What loading a list did.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    pub already: Vec<String>,
    /// (module, reason) — e.g. crc32c_intel on a CPU without SSE4.2 fails with ENODEV, which is harmless.
    pub failed: Vec<(String, String)>,
    /// Requested names that are neither files nor aliases here (maybe built into the kernel).
    pub unknown: Vec<String>,
}

impl ModuleDb {
    /// Parse the text indexes under `root`. A missing modules.dep is an error; the others are optional.
    pub fn load(root: &Path) -> std::io::Result<ModuleDb> {
        let mut db = ModuleDb { root: root.to_path_buf(), ..ModuleDb::default() };
        let dep = std::fs::read_to_string(root.join("modules.dep"))?;
        db.parse_dep(&dep);
        if let Ok(t) = std::fs::read_to_string(root.join("modules.softdep")) {
            db.parse_softdep(&t);
        }
        if let Ok(t) = std::fs::read_to_string(root.join("modules.alias")) {
            db.parse_alias(&t);
        }
        Ok(db)
    }

    fn parse_dep(&mut self, text: &str) {
        for line in text.lines() {
            let Some((path, deps)) = line.split_once(':') else { continue };
            let name = module_name(path);
            self.paths.insert(name.clone(), path.trim().to_string());
            self.deps.insert(name, deps.split_whitespace().map(module_name).collect());
        }
    }

    fn parse_softdep(&mut self, text: &str) {
        for line in text.lines() {
            let mut w = line.split_whitespace();
            if w.next() != Some("softdep") {
                continue;
            }
            let Some(name) = w.next() else { continue };
            let entry = self.soft.entry(module_name(name)).or_default();
            let mut post = false;
            for d in w {
                match d {
                    "pre:" => post = false,
                    "post:" => post = true,
                    d if post => entry.1.push(d.to_string()),
                    d => entry.0.push(d.to_string()),
                }
            }
        }
    }

    fn parse_alias(&mut self, text: &str) {
        for line in text.lines() {
            let mut w = line.split_whitespace();
            if let (Some("alias"), Some(a), Some(m)) = (w.next(), w.next(), w.next()) {
                self.aliases.entry(a.to_string()).or_default().push(module_name(m));
            }
        }
    }

    fn resolve(&self, req: &str) -> Vec<String> {
        let n = module_name(req);
        if self.paths.contains_key(&n) {
            return vec![n];
        }
        self.aliases.get(req).cloned().unwrap_or_default()
    }

    /// The load order for `requests` (pure: no kernel involved). Unknown requests are returned separately.
    pub fn plan(&self, requests: &[String]) -> (Vec<String>, Vec<String>) {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut unknown = Vec::new();
        for r in requests {
            let names = self.resolve(r);
            if names.is_empty() {
                unknown.push(r.clone());
            }
            for n in names {
                self.visit(&n, &mut seen, &mut order);
            }
        }
        (order, unknown)
    }

    fn visit(&self, name: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !self.paths.contains_key(name) || !seen.insert(name.to_string()) {
            return;
        }
        let (pre, post) = self.soft.get(name).cloned().unwrap_or_default();
        for p in pre.iter().flat_map(|d| self.resolve(d)) {
            self.visit(&p, seen, order);
        }
        for d in self.deps.get(name).into_iter().flatten().rev() {
            self.visit(d, seen, order);
        }
        order.push(name.to_string());
        for p in post.iter().flat_map(|d| self.resolve(d)) {
            self.visit(&p, seen, order);
        }
    }

    /// Load `requests` and their dependencies into the running kernel.
    pub fn load_all(&self, requests: &[String]) -> LoadReport {
        let (order, unknown) = self.plan(requests);
        let mut report = LoadReport { unknown, ..LoadReport::default() };
        for name in order {
            if Path::new("/sys/module").join(&name).exists() {
                report.already.push(name);
                continue;
            }
            let Some(rel) = self.paths.get(&name) else { continue };
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

    fn db() -> ModuleDb {
        let mut db = ModuleDb::default();
        db.parse_dep(
            "kernel/fs/ext4/ext4.ko: kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko\n\
             kernel/fs/mbcache.ko:\nkernel/fs/jbd2/jbd2.ko:\nkernel/lib/crc16.ko:\n\
             kernel/crypto/crc32c_generic.ko:\nkernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko\nkernel/fs/fat/fat.ko:\n\
             kernel/fs/nls/nls_cp437.ko:\n",
        );
        db.parse_softdep("softdep ext4 pre: crypto-crc32c\nsoftdep vfat post: nls_cp437\n");
        db.parse_alias("alias crypto-crc32c crc32c_generic\nalias fs-vfat vfat\n");
        db
    }

    #[test]
    fn soft_pre_then_hard_deps_last_first() {
        let (order, unknown) = db().plan(&["ext4".into()]);
        assert_eq!(order, ["crc32c_generic", "crc16", "jbd2", "mbcache", "ext4"]);
        assert!(unknown.is_empty());
    }

    #[test]
    fn aliases_post_deps_and_unknown() {
        let (order, unknown) = db().plan(&["fs-vfat".into(), "nosuch".into(), "vfat".into()]);
        assert_eq!(order, ["fat", "vfat", "nls_cp437"]);
        assert_eq!(unknown, ["nosuch"]);
    }

    #[test]
    fn list_files_skip_comments() {
        let dir = std::env::temp_dir().join(format!("keel-modlist-{}", std::process::id()));
        std::fs::write(&dir, "# c\nvirtio_blk\n\n ext4 # fs\n").expect("write");
        assert_eq!(read_list(&dir), ["virtio_blk", "ext4"]);
        let _ = std::fs::remove_file(&dir);
    }
}
