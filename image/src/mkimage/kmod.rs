//! Kernel module selection: which `.ko` files of the Debian kernel go into USR and the initramfs.
//!
//! Owns: the module lists (what USR and the initramfs get), finding the build host's kernel, and the closure
//! of a wanted list in load order over the kernel's module index (`keel_model::kmod`, which init's initrd
//! mode also uses to load them), where a module this kernel does not have is an error.
//! Does not: copy files or run depmod (see `mkimage`), or load anything (init's initrd mode does that at
//! boot, from the `modules.dep` that depmod writes for the copied subset).

use std::path::{Path, PathBuf};

use keel_model::kmod::{module_name, ModuleIndex};

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

/// The module index of the kernel an image is built from.
#[derive(Debug)]
pub struct ModuleDb(ModuleIndex);

impl ModuleDb {
    pub fn load(root: &Path) -> Result<ModuleDb, ImageError> {
        let index = ModuleIndex::load(root).map_err(|source| ImageError::Read { path: root.join("modules.dep"), source })?;
        Ok(ModuleDb(index))
    }

    pub fn path_of(&self, name: &str) -> Option<&str> {
        self.0.path_of(name)
    }

    /// The load-ordered closure of `wanted`. Built-in modules are skipped; an unknown one is an error.
    pub fn closure(&self, wanted: &[&str]) -> Result<Vec<String>, ImageError> {
        let plan = self.0.plan(wanted);
        match plan.unknown.first() {
            Some(name) => Err(ImageError::UnknownModule { name: module_name(name) }),
            None => Ok(plan.order),
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
}
