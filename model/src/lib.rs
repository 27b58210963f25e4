//! Keel's unit-file model, shared by init (which runs units) and clusterd's fleet (which schedules them).
//!
//! Owns: systemd INI syntax (`ini`), time spans (`duration`), unit names and specifiers (`name`), the typed
//! meaning of `[Unit]`, `[Service]` and `[Install]` (`unit`), and finding unit files on disk with drop-ins and
//! templates (`load`), plus the shared value syntax (`values`: booleans, quoting, sizes) and fleet's KV
//! contract (`fleet`: key layout, records, `drain_progress`). Everything here is pure or read-only on the
//! filesystem but `gpt`. `lock` holds the cluster reboot lock's semaphore (locksmith's JSON value,
//! pure lock/unlock/set-max), shared by the updater's reboot manager and clusterd's FleetLock endpoints;
//! `kmod` reads a kernel's module index and orders module loads, shared by mkimage and init's initrd mode;
//! `gpt` reads a disk's partition table and rewrites the A/B slot bits in both copies (the one module here
//! that writes: mkimage, the updater and init's initramfs share it so there is one reader to get right), with
//! `crc32` beside it (also init's journal frames). `report` turns an error chain into the one line every
//! binary prints when it fails.
//! Does not: start processes, touch cgroups, or interpret `[Container]` / `[X-Fleet]` beyond keeping their raw
//! keys (those belong to init's runtime and clusterd's scheduler).

pub mod crc32;
pub mod duration;
pub mod fleet;
pub mod gpt;
pub mod ini;
pub mod kmod;
pub mod load;
pub mod lock;
pub mod name;
pub mod report;
pub mod unit;
pub mod values;

pub use duration::parse_timespan;
pub use ini::IniFile;
pub use load::{enable_link_dir, LoadReport, UnitLoader};
pub use name::{expand_specifiers, UnitKind, UnitName};
pub use unit::{
    Condition, ExecCommand, InstallSpec, KillMode, RestartPolicy, ServiceSpec, ServiceType, Unit,
};

use std::fmt;
use std::path::PathBuf;

/// How serious a diagnostic is: an `Error` makes the unit unusable, a `Warning` (unknown key, ignored value)
/// does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

/// One finding about a unit file, always pointing at `file:line`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based line number; 0 when the finding is about the file as a whole.
    pub line: usize,
    pub severity: Severity,
    pub message: String,
}

impl Diagnostic {
    /// An `Error` (the unit is unusable) rather than a `Warning`.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(
            f,
            "{}:{}: {sev}: {}",
            self.file.display(),
            self.line,
            self.message
        )
    }
}
