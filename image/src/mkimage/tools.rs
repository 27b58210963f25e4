//! External tools mkimage drives, each with the Debian package that provides it.
//!
//! Owns: finding a tool on PATH (plus /usr/sbin, /sbin), running it with a fixed environment (reproducible
//! timestamps, C locale) and turning a missing tool or a failed run into an error that says what to install
//! or what the tool printed. Does not: decide arguments (the callers in `mkimage` do).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ImageError;

/// A tool and the Debian package that ships it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

pub const SGDISK: Tool = Tool { name: "sgdisk", package: "gdisk" };
pub const MKFS_EROFS: Tool = Tool { name: "mkfs.erofs", package: "erofs-utils" };
pub const MKFS_VFAT: Tool = Tool { name: "mkfs.vfat", package: "dosfstools" };
pub const MMD: Tool = Tool { name: "mmd", package: "mtools" };
pub const MCOPY: Tool = Tool { name: "mcopy", package: "mtools" };
pub const MKFS_EXT4: Tool = Tool { name: "mkfs.ext4", package: "e2fsprogs" };
pub const OBJCOPY: Tool = Tool { name: "objcopy", package: "binutils" };
pub const DEPMOD: Tool = Tool { name: "depmod", package: "kmod" };
pub const DEBUGFS: Tool = Tool { name: "debugfs", package: "e2fsprogs" };

/// Every tool a full build needs, checked up front so a missing one fails before any work.
pub const ALL: &[Tool] = &[SGDISK, MKFS_EROFS, MKFS_VFAT, MMD, MCOPY, MKFS_EXT4, OBJCOPY, DEPMOD, DEBUGFS];

/// The fixed time every file system gets (1 January 2020 UTC), in the spirit of SOURCE_DATE_EPOCH.
pub const FIXED_EPOCH: u64 = 1_577_836_800;

impl Tool {
    /// Absolute path of the tool, or an error naming the package to install.
    pub fn find(&self) -> Result<PathBuf, ImageError> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let extra = [PathBuf::from("/usr/sbin"), PathBuf::from("/sbin"), PathBuf::from("/usr/bin")];
        std::env::split_paths(&path)
            .chain(extra)
            .map(|d| d.join(self.name))
            .find(|p| p.is_file())
            .ok_or(ImageError::MissingTool { tool: self.name, package: self.package })
    }

    /// A command for this tool with the reproducibility environment set.
    pub fn command(&self) -> Result<Command, ImageError> {
        let mut cmd = Command::new(self.find()?);
        cmd.env("LC_ALL", "C")
            .env("SOURCE_DATE_EPOCH", FIXED_EPOCH.to_string())
            .env("E2FSPROGS_FAKE_TIME", FIXED_EPOCH.to_string())
            .env("MTOOLS_SKIP_CHECK", "1")
            .env("TZ", "UTC")
            .stdin(Stdio::null());
        Ok(cmd)
    }

    /// Run with arguments; on failure the error carries the command line and what it printed.
    pub fn run<I, S>(&self, args: I) -> Result<(), ImageError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command()?;
        cmd.args(args);
        run_cmd(self.name, cmd)
    }
}

pub fn run_cmd(name: &'static str, mut cmd: Command) -> Result<(), ImageError> {
    let line = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| ImageError::Spawn { tool: name, source })?;
    if out.status.success() {
        Ok(())
    } else {
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        Err(ImageError::ToolFailed { tool: name, command: line, status: out.status.to_string(), output: text })
    }
}

/// Fail early, listing every missing tool and the packages that provide them.
pub fn check_all() -> Result<(), ImageError> {
    let missing: Vec<&Tool> = ALL.iter().filter(|t| t.find().is_err()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut pkgs: Vec<&str> = missing.iter().map(|t| t.package).collect();
    pkgs.sort_unstable();
    pkgs.dedup();
    Err(ImageError::MissingTools {
        tools: missing.iter().map(|t| t.name).collect::<Vec<_>>().join(", "),
        packages: pkgs.join(" "),
    })
}

/// A required input file, with the package that provides it when it is missing.
pub fn require_file(path: &Path, package: &'static str) -> Result<(), ImageError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(ImageError::MissingFile { path: path.to_path_buf(), package })
    }
}
