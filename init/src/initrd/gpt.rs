//! The initramfs's use of the GPT: read a disk's table, choose a USR slot by its bits, count a boot attempt.
//!
//! Owns: the ChromeOS/Flatcar slot rule (the highest priority among USR partitions with tries left or marked
//! successful, the lower partition number on a tie), counting a try down in both GPT copies before a slot
//! that is not yet successful is booted, and rebuilding a damaged GPT copy from the good one at boot (then
//! asking the kernel to re-read the partitions, which it does not find without a valid primary).
//! Does not: parse or write the table itself (`keel_model::gpt`, shared with the updater and mkimage), bless a
//! slot (the updater's health gate sets `successful`), or mount anything.

use std::path::Path;

pub use keel_model::gpt::{Disk, GptError, Partition};

/// The GPT of `dev`: `Ok(None)` when the disk has none at all, `Err` saying what is wrong when it is corrupt.
pub fn read(dev: &Path) -> Result<Option<Disk>, String> {
    match Disk::open(dev) {
        Ok(d) => Ok(Some(d)),
        Err(GptError::NoGpt { .. }) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The slot the GPT bits choose: highest priority among bootable USR partitions (lowest number on a tie).
pub fn choose_usr(parts: &[Partition]) -> Option<&Partition> {
    parts
        .iter()
        .filter(|p| p.is_usr() && p.slot().bootable())
        .max_by(|a, b| a.slot().priority.cmp(&b.slot().priority).then(b.number.cmp(&a.number)))
}

/// One line for the console: number, label, the three bits and the partition UUID.
pub fn describe(p: &Partition) -> String {
    let s = p.slot();
    format!(
        "#{} {} priority={} tries={} successful={} partuuid={}",
        p.number,
        p.name,
        s.priority,
        s.tries,
        u8::from(s.successful),
        p.part_guid
    )
}

/// One copy of `table` (read from `dev`, named `disk` in messages) is damaged: rebuild it from the other, as
/// the UEFI spec asks of whoever finds it, and when it was the primary, have the kernel read the partitions
/// again (without a valid primary and without `gpt` on its command line, Linux creates no partition devices).
/// Returns the line to log.
pub fn repair(dev: &Path, disk: &str, table: &Disk) -> String {
    let which = if table.used_backup() { "primary" } else { "backup" };
    let rebuilt = Disk::open_rw(dev).and_then(|mut d| d.write().map(|()| d));
    match rebuilt {
        Err(e) => format!("/dev/{disk}: the {which} GPT copy is damaged and was not rebuilt: {e} (booting from the other)"),
        Ok(d) if which == "primary" => match reread_partitions(d.file()) {
            Ok(()) => format!("/dev/{disk}: the primary GPT copy was damaged: rebuilt from the backup, partitions re-read"),
            Err(e) => format!("/dev/{disk}: the primary GPT copy was damaged: rebuilt from the backup; re-reading partitions: {e}"),
        },
        Ok(_) => format!("/dev/{disk}: the backup GPT copy was damaged: rebuilt from the primary"),
    }
}

/// `BLKRRPART`: the kernel drops and re-reads the disk's partitions (fails with EBUSY while one is in use).
fn reread_partitions(disk: &std::fs::File) -> Result<(), std::io::Error> {
    const BLKRRPART: libc::c_ulong = 0x125F; // _IO(0x12, 95)
    // SAFETY: BLKRRPART takes no argument; the fd is an open block device for the duration of the call.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(disk), BLKRRPART) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Count one boot attempt on partition `number` of `dev` (tries - 1) in both GPT copies. Returns the tries left.
pub fn count_attempt(dev: &Path, number: u32) -> Result<u8, String> {
    let mut disk = Disk::open_rw(dev).map_err(|e| e.to_string())?;
    let p = disk.partitions().iter().find(|p| p.number == number).ok_or("no such partition")?;
    let mut bits = p.slot();
    bits.tries = bits.tries.saturating_sub(1);
    let attrs = bits.apply(p.attrs);
    disk.set_attrs(number, attrs).map_err(|e| e.to_string())?;
    disk.write().map_err(|e| e.to_string())?;
    Ok(bits.tries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_model::gpt::{SlotBits, TYPE_USR_X86_64};

    fn part(number: u32, name: &str, priority: u8, tries: u8, successful: bool) -> Partition {
        Partition {
            number,
            name: name.into(),
            type_guid: TYPE_USR_X86_64.into(),
            part_guid: String::new(),
            first_lba: 34,
            last_lba: 40,
            attrs: SlotBits { priority, tries, successful }.apply(0),
        }
    }

    fn chosen(parts: &[Partition]) -> Option<&str> {
        choose_usr(parts).map(|p| p.name.as_str())
    }

    #[test]
    fn exhausted_slot_falls_back() {
        assert_eq!(chosen(&[part(2, "USR-A", 1, 0, true), part(3, "USR-B", 2, 0, false)]), Some("USR-A"));
    }

    #[test]
    fn slot_with_tries_wins_by_priority() {
        assert_eq!(chosen(&[part(2, "USR-A", 1, 0, true), part(3, "USR-B", 2, 1, false)]), Some("USR-B"));
    }

    #[test]
    fn tie_prefers_lower_number_and_nothing_bootable_is_none() {
        assert_eq!(chosen(&[part(2, "USR-A", 1, 0, true), part(3, "USR-B", 1, 0, true)]), Some("USR-A"));
        assert_eq!(chosen(&[part(2, "USR-A", 0, 0, true), part(3, "USR-B", 2, 0, false)]), None);
    }

    #[test]
    fn describe_names_the_bits() {
        let d = describe(&part(3, "USR-B", 2, 1, false));
        assert_eq!(d, "#3 USR-B priority=2 tries=1 successful=0 partuuid=");
    }
}
