//! A/B slot flags on a file-backed GPT disk (checked against sgdisk) and ESP kernel names.

use crate::common;

use common::*;
use keel_updater::slot::{KernelEntry, Slot, SlotBits, Slots};

fn esp(dir: &std::path::Path) -> std::path::PathBuf {
    let esp = dir.join("esp");
    std::fs::create_dir_all(esp.join("EFI/Linux")).expect("esp");
    std::fs::write(esp.join("EFI/Linux/keel-1.0.0-usr-a.efi"), b"uki a").expect("uki a");
    esp
}

/// A disk and ESP with 1.0.0 on USR-A (running) and 1.1.0 just installed on USR-B. The temp dir lives as long
/// as the fixture.
struct Installed {
    _dir: tempfile::TempDir,
    disk: std::path::PathBuf,
    esp: std::path::PathBuf,
    slots: Slots,
}

fn installed_b() -> Installed {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = make_disk(dir.path());
    let esp = esp(dir.path());
    let slots = Slots::new(&disk, &esp);
    std::fs::write(slots.staging_path(), b"uki b").expect("stage");
    slots.install(Slot::B, "1.1.0", &slots.staging_path()).expect("install");
    Installed { _dir: dir, disk, esp, slots }
}

impl Installed {
    /// What systemd-boot does when it boots B: count one try down (`+1-0` → `+0-1`).
    fn boot_b_once(&self) {
        std::fs::rename(
            self.esp.join("EFI/Linux/keel-1.1.0-usr-b+1-0.efi"),
            self.esp.join("EFI/Linux/keel-1.1.0-usr-b+0-1.efi"),
        )
        .expect("simulate boot");
    }
}

#[test]
fn reads_the_bits_sgdisk_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = make_disk(dir.path());
    let slots = Slots::new(&disk, esp(dir.path()));
    assert_eq!(
        slots.flags(Slot::A).expect("flags"),
        SlotBits {
            priority: 1,
            tries: 0,
            successful: true
        }
    );
    assert_eq!(
        slots.flags(Slot::B).expect("flags"),
        SlotBits {
            priority: 0,
            tries: 0,
            successful: false
        }
    );
}

#[test]
fn install_writes_both_gpt_copies_and_a_counted_kernel_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = make_disk(dir.path());
    let esp = esp(dir.path());
    let slots = Slots::new(&disk, &esp);
    slots.clear(Slot::B).expect("clear");
    std::fs::write(slots.staging_path(), b"uki b").expect("stage");
    let name = slots
        .install(Slot::B, "1.1.0", &slots.staging_path())
        .expect("install");
    assert_eq!(name, "keel-1.1.0-usr-b+1-0.efi");
    assert!(esp.join("EFI/Linux").join(&name).exists());
    // sgdisk reads what we wrote: priority 2 (bit 49), tries 1 (bit 52), not successful; CRCs valid.
    sgdisk_verify_clean(&disk);
    assert_eq!(
        sgdisk_attr_bits(&disk, 3),
        vec![49, 52],
        "USR-B attribute bits"
    );
    assert_eq!(
        sgdisk_attr_bits(&disk, 2),
        vec![48, 56],
        "USR-A must stay priority 1, successful"
    );
    // Backup copy alone must carry the same bits: destroy the primary and re-read.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 512], 512).expect("zap primary header");
    drop(f);
    let flags = Slots::new(&disk, &esp)
        .flags(Slot::B)
        .expect("flags from backup");
    assert_eq!(
        flags,
        SlotBits {
            priority: 2,
            tries: 1,
            successful: false
        },
        "backup GPT copy not updated"
    );
    assert_eq!(
        Slots::new(&disk, &esp)
            .detect_active("", "")
            .expect("active"),
        Slot::B
    );
}

#[test]
fn bless_removes_counter_and_sets_successful() {
    let f = installed_b();
    let (disk, esp, slots) = (&f.disk, &f.esp, &f.slots);
    f.boot_b_once();
    slots.bless(Slot::B).expect("bless");
    assert!(
        esp.join("EFI/Linux/keel-1.1.0-usr-b.efi").exists(),
        "blessed name missing"
    );
    assert_eq!(
        slots.flags(Slot::B).expect("flags"),
        SlotBits {
            priority: 2,
            tries: 0,
            successful: true
        }
    );
    sgdisk_verify_clean(disk);
}

#[test]
fn rollback_switches_slots_without_network() {
    let f = installed_b();
    let (disk, esp, slots) = (&f.disk, &f.esp, &f.slots);
    slots.bless(Slot::B).expect("bless");
    // Running B, roll back to A.
    assert_eq!(slots.rollback(Slot::B).expect("rollback"), Slot::A);
    assert_eq!(slots.flags(Slot::A).expect("a").priority, 2);
    assert_eq!(slots.flags(Slot::B).expect("b").priority, 1);
    assert!(
        esp.join("EFI/Linux/keel-1.1.0-usr-b+0-1.efi").exists(),
        "running slot's image not demoted"
    );
    assert!(esp.join("EFI/Linux/keel-1.0.0-usr-a.efi").exists());
    assert_eq!(slots.detect_active("", "").expect("active"), Slot::A);
    sgdisk_verify_clean(disk);
    // A cleared slot cannot be a rollback target.
    slots.clear(Slot::B).expect("clear");
    assert!(
        slots.rollback(Slot::A).is_err(),
        "rolled back to a cleared slot"
    );
}

#[test]
fn failed_update_is_detected_after_fallback() {
    let f = installed_b();
    let slots = &f.slots;
    // The boot of B never got blessed; systemd-boot counted it down and fell back to A.
    f.boot_b_once();
    assert_eq!(
        slots.detect_failed_update(Slot::A).expect("detect"),
        Some("1.1.0".to_string())
    );
    assert_eq!(
        slots.flags(Slot::B).expect("b").priority,
        0,
        "failed slot not cleared"
    );
    assert!(slots.kernels(Slot::B).expect("kernels").is_empty());
    assert_eq!(
        slots.detect_failed_update(Slot::A).expect("detect"),
        None,
        "reported twice"
    );
}

#[test]
fn kernel_names_round_trip() {
    for (name, version, slot, counter) in [
        ("keel-1.2.0-usr-a+1-0.efi", "1.2.0", Slot::A, Some((1, 0))),
        ("keel-1.2.0-rc.1-usr-b.efi", "1.2.0-rc.1", Slot::B, None),
        ("keel-2.0.0-usr-b+3.efi", "2.0.0", Slot::B, Some((3, 0))),
    ] {
        let k = KernelEntry::parse(name).expect(name);
        assert_eq!(
            (k.version.as_str(), k.slot, k.counter),
            (version, slot, counter),
            "{name}"
        );
    }
    assert!(KernelEntry::parse("vmlinuz.efi").is_none());
}

#[test]
fn active_slot_comes_from_boot_env_then_cmdline_then_gpt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = make_disk(dir.path());
    let slots = Slots::new(&disk, esp(dir.path()));
    let b_uuid = slots.status().expect("status")[1].partition_uuid.clone();
    assert_eq!(
        slots
            .detect_active("KEEL_USR=USR-B\n", "keel.usr=USR-A")
            .expect("env"),
        Slot::B
    );
    assert_eq!(
        slots
            .detect_active(&format!("KEEL_USR_PARTUUID={b_uuid}\n"), "")
            .expect("env uuid"),
        Slot::B
    );
    assert_eq!(
        slots
            .detect_active("", "quiet keel.usr=USR-B")
            .expect("cmdline"),
        Slot::B
    );
    assert_eq!(
        slots
            .detect_active("", "keel.usr=PARTLABEL=USR-B")
            .expect("partlabel"),
        Slot::B
    );
    assert_eq!(
        slots
            .detect_active("", &format!("keel.usr=PARTUUID={}", b_uuid.to_lowercase()))
            .expect("partuuid"),
        Slot::B
    );
    assert_eq!(
        slots.detect_active("", "").expect("gpt"),
        Slot::A,
        "GPT says A (priority 1, successful)"
    );
}
