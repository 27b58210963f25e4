//! A kernel's module index, read the way modprobe reads it, shared by the image builder and init.
//!
//! Owns: parsing `modules.dep`, `modules.softdep`, `modules.alias` and `modules.builtin` of one module tree
//! and ordering a request the way modprobe loads it: soft `pre:` deps, then hard deps (the last listed
//! first), then the module, then soft `post:` deps. mkimage uses the order to pick which `.ko` files go into
//! USR and the initramfs; init's initrd mode uses it to load them at boot.
//! Does not: copy or load modules (see `keel-image`'s `mkimage::kmod` and `keel-init`'s `initrd::modload`),
//! or write any index (depmod does that).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Normalise a module file name or request: basename, no `.ko*` suffix, `-` → `_`.
pub fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = match base.find(".ko") {
        Some(i) => &base[..i],
        None => base,
    };
    stem.replace('-', "_")
}

/// The parsed module index of one kernel.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// module name → path relative to the module root (as in modules.dep)
    paths: BTreeMap<String, String>,
    /// module name → hard dependencies (module names), in modules.dep order
    deps: BTreeMap<String, Vec<String>>,
    /// module name → (pre, post) soft dependencies as written (names or aliases)
    soft: BTreeMap<String, (Vec<String>, Vec<String>)>,
    /// alias → module names
    aliases: BTreeMap<String, Vec<String>>,
    /// modules compiled into the kernel
    builtin: BTreeSet<String>,
}

/// What a request comes to: the modules to load in order, and the requests that name nothing here.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LoadPlan {
    pub order: Vec<String>,
    /// Requests that are neither a module file, an alias nor a built-in module of this kernel.
    pub unknown: Vec<String>,
}

impl ModuleIndex {
    /// Read the indexes under `root` (a `/usr/lib/modules/<version>` directory). A missing `modules.dep` is
    /// an error (the tree is not a module tree); the other three are optional.
    pub fn load(root: &Path) -> std::io::Result<ModuleIndex> {
        let optional = |name: &str| std::fs::read_to_string(root.join(name)).unwrap_or_default();
        let dep = std::fs::read_to_string(root.join("modules.dep"))?;
        Ok(ModuleIndex::parse(&dep, &optional("modules.softdep"), &optional("modules.alias"), &optional("modules.builtin")))
    }

    /// Parse the four index texts (pure).
    pub fn parse(dep: &str, softdep: &str, alias: &str, builtin: &str) -> ModuleIndex {
        let mut ix = ModuleIndex::default();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else { continue };
            let name = module_name(path);
            ix.paths.insert(name.clone(), path.trim().to_string());
            ix.deps.insert(name, deps.split_whitespace().map(module_name).collect());
        }
        for line in softdep.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(name) = words.next() else { continue };
            let entry = ix.soft.entry(module_name(name)).or_default();
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
        for line in alias.lines() {
            let mut w = line.split_whitespace();
            if let (Some("alias"), Some(a), Some(m)) = (w.next(), w.next(), w.next()) {
                ix.aliases.entry(a.to_string()).or_default().push(module_name(m));
            }
        }
        ix.builtin = builtin.lines().filter(|l| !l.trim().is_empty()).map(module_name).collect();
        ix
    }

    /// The module's file, relative to the module root.
    pub fn path_of(&self, name: &str) -> Option<&str> {
        self.paths.get(name).map(String::as_str)
    }

    /// A module name or an alias (such as `crypto-crc32c` or `fs-vfat`) → module names.
    fn resolve(&self, request: &str) -> Vec<String> {
        let n = module_name(request);
        if self.paths.contains_key(&n) {
            return vec![n];
        }
        self.aliases.get(request).cloned().unwrap_or_default()
    }

    /// The load order for `requests` and their dependencies (pure). Built-in modules need nothing.
    pub fn plan<S: AsRef<str>>(&self, requests: &[S]) -> LoadPlan {
        let mut plan = LoadPlan::default();
        let mut seen = BTreeSet::new();
        for r in requests.iter().map(AsRef::as_ref) {
            let names = self.resolve(r);
            if names.is_empty() && !self.builtin.contains(&module_name(r)) {
                plan.unknown.push(r.to_string());
            }
            for n in names {
                self.visit(&n, &mut seen, &mut plan.order);
            }
        }
        plan
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> ModuleIndex {
        ModuleIndex::parse(
            "kernel/fs/ext4/ext4.ko: kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko\n\
             kernel/fs/mbcache.ko:\nkernel/fs/jbd2/jbd2.ko:\nkernel/lib/crc16.ko:\n\
             kernel/crypto/crc32c_generic.ko:\nkernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko\nkernel/fs/fat/fat.ko:\n\
             kernel/fs/nls/nls_cp437.ko:\n",
            "softdep ext4 pre: crypto-crc32c\nsoftdep vfat post: nls_cp437\n",
            "alias crypto-crc32c crc32c_generic\nalias fs-vfat vfat\n",
            "kernel/drivers/block/loop.ko\n",
        )
    }

    #[test]
    fn soft_pre_then_hard_deps_last_first() {
        let plan = index().plan(&["ext4"]);
        assert_eq!(plan.order, ["crc32c_generic", "crc16", "jbd2", "mbcache", "ext4"]);
        assert!(plan.unknown.is_empty());
    }

    #[test]
    fn aliases_post_deps_builtins_and_unknown() {
        let plan = index().plan(&["fs-vfat", "nosuch", "vfat", "loop"]);
        assert_eq!(plan.order, ["fat", "vfat", "nls_cp437"]);
        assert_eq!(plan.unknown, ["nosuch"], "a built-in module is not unknown");
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(module_name("kernel/drivers/virtio/virtio-pci.ko.xz"), "virtio_pci");
        assert_eq!(index().path_of("crc16"), Some("kernel/lib/crc16.ko"));
    }

    #[test]
    fn a_tree_without_modules_dep_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(ModuleIndex::load(dir.path()).is_err());
        std::fs::write(dir.path().join("modules.dep"), "kernel/lib/crc16.ko:\n").expect("write");
        assert_eq!(ModuleIndex::load(dir.path()).expect("load").plan(&["crc16"]).order, ["crc16"]);
    }
}
