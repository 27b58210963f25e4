//! Kernel module selection: which `.ko` files of the Debian kernel go into USR and the initramfs.
//!
//! Owns: reading `modules.dep`, `modules.softdep`, `modules.alias` and `modules.builtin` of a kernel's module
//! tree and computing the closure of a wanted list in load order (soft `pre:` deps, then hard deps — the last
//! listed dependency first, as modprobe does — then the module, then soft `post:` deps).
//! Does not: copy files or run depmod (see `mkimage`), or load anything (init's initrd mode does that at
//! boot, from the `modules.dep` that depmod writes for the copied subset).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::ImageError;

/// The modules every Keel machine loads (boot-chain.md), in a sensible request order.
pub const USR_MODULES: &[&str] = &[
    // block + console + entropy on virtio
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_console",
    "virtio_rng",
    "virtio_net",
    // file systems: USR, ROOT, ESP, OEM, containers
    "erofs",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859_1",
    "overlay",
    "efivarfs",
    // per-VM configuration (cloud-config over fw_cfg)
    "qemu_fw_cfg",
    // container networking
    "veth",
    "bridge",
    "br_netfilter",
    "tun",
];

/// What the initramfs needs to find and mount USR and ROOT on virtio-blk; everything else loads after the
/// mounts, from USR. Disks behind virtio-scsi need `mkimage --initrd-module virtio_scsi` (scsi_mod costs
/// ≈ 100 ms of boot under TCG, so it is not in by default).
pub const INITRD_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "erofs", "ext4"];

/// The parsed module database of one kernel.
#[derive(Debug, Default)]
pub struct ModuleDb {
    /// module name → path relative to the module root (as in modules.dep)
    paths: BTreeMap<String, String>,
    /// module name → hard dependencies (module names), in modules.dep order
    deps: BTreeMap<String, Vec<String>>,
    /// module name → (pre, post) soft dependencies as written (names or aliases)
    soft: BTreeMap<String, (Vec<String>, Vec<String>)>,
    /// alias → module names
    aliases: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

/// Normalise a module file name or request: basename, no `.ko*` suffix, `-` → `_`.
pub fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = match base.find(".ko") {
        Some(i) => &base[..i],
        None => base,
    };
    stem.replace('-', "_")
}

impl ModuleDb {
    pub fn load(root: &Path) -> Result<ModuleDb, ImageError> {
        let read = |name: &str| -> Result<String, ImageError> {
            let p = root.join(name);
            std::fs::read_to_string(&p).map_err(|source| ImageError::Read { path: p, source })
        };
        let mut db = ModuleDb::default();
        for line in read("modules.dep")?.lines() {
            let Some((path, deps)) = line.split_once(':') else { continue };
            let name = module_name(path);
            db.paths.insert(name.clone(), path.to_string());
            db.deps.insert(name, deps.split_whitespace().map(module_name).collect());
        }
        if let Ok(text) = read("modules.softdep") {
            for line in text.lines() {
                let mut words = line.split_whitespace();
                if words.next() != Some("softdep") {
                    continue;
                }
                let Some(name) = words.next() else { continue };
                let entry = db.soft.entry(module_name(name)).or_default();
                let mut post = false;
                for w in words {
                    match w {
                        "pre:" => post = false,
                        "post:" => post = true,
                        dep if post => entry.1.push(dep.to_string()),
                        dep => entry.0.push(dep.to_string()),
                    }
                }
            }
        }
        if let Ok(text) = read("modules.alias") {
            for line in text.lines() {
                let mut w = line.split_whitespace();
                if let (Some("alias"), Some(alias), Some(m)) = (w.next(), w.next(), w.next()) {
                    db.aliases.entry(alias.to_string()).or_default().push(module_name(m));
                }
            }
        }
        if let Ok(text) = read("modules.builtin") {
            db.builtin = text.lines().map(module_name).collect();
        }
        Ok(db)
    }

    pub fn path_of(&self, name: &str) -> Option<&str> {
        self.paths.get(name).map(String::as_str)
    }

    /// Resolve a soft dependency (a module name or an alias such as `crypto-crc32c`) to module names.
    fn resolve_soft(&self, dep: &str) -> Vec<String> {
        let n = module_name(dep);
        if self.paths.contains_key(&n) {
            return vec![n];
        }
        self.aliases.get(dep).cloned().unwrap_or_default()
    }

    /// The load-ordered closure of `wanted`. Built-in modules are skipped; an unknown one is an error.
    pub fn closure(&self, wanted: &[&str]) -> Result<Vec<String>, ImageError> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for w in wanted {
            let n = module_name(w);
            if !self.paths.contains_key(&n) {
                if self.builtin.contains(&n) {
                    continue;
                }
                return Err(ImageError::UnknownModule { name: n });
            }
            self.visit(&n, &mut seen, &mut order);
        }
        Ok(order)
    }

    fn visit(&self, name: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(name.to_string()) || !self.paths.contains_key(name) {
            return;
        }
        let (pre, post) = self.soft.get(name).cloned().unwrap_or_default();
        for p in pre.iter().flat_map(|d| self.resolve_soft(d)) {
            self.visit(&p, seen, order);
        }
        if let Some(deps) = self.deps.get(name) {
            for d in deps.iter().rev() {
                self.visit(d, seen, order);
            }
        }
        order.push(name.to_string());
        for p in post.iter().flat_map(|d| self.resolve_soft(d)) {
            self.visit(&p, seen, order);
        }
    }
}

/// The newest kernel under /usr/lib/modules that also has /boot/vmlinuz-<version>.
pub fn default_kernel_version() -> Result<String, ImageError> {
    let dir = PathBuf::from("/usr/lib/modules");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|source| ImageError::Read { path: dir.clone(), source })?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|v| Path::new(&format!("/boot/vmlinuz-{v}")).is_file())
        .collect();
    found.sort();
    found.pop().ok_or(ImageError::NoKernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> ModuleDb {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/ext4/ext4.ko: kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko\n\
             kernel/fs/mbcache.ko:\nkernel/fs/jbd2/jbd2.ko:\nkernel/lib/crc16.ko:\n\
             kernel/crypto/crc32c_generic.ko:\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("modules.softdep"), "softdep ext4 pre: crypto-crc32c\n").expect("write");
        std::fs::write(dir.path().join("modules.alias"), "alias crypto-crc32c crc32c_generic\n").expect("write");
        std::fs::write(dir.path().join("modules.builtin"), "kernel/fs/fat/fat.ko\n").expect("write");
        ModuleDb::load(dir.path()).expect("load")
    }

    #[test]
    fn closure_puts_soft_then_hard_deps_first() {
        let order = db().closure(&["ext4", "fat"]).expect("closure");
        assert_eq!(order, ["crc32c_generic", "crc16", "jbd2", "mbcache", "ext4"]);
    }

    #[test]
    fn unknown_module_is_an_error() {
        assert!(db().closure(&["nosuch"]).is_err());
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(module_name("kernel/drivers/virtio/virtio-pci.ko.xz"), "virtio_pci");
    }
}
