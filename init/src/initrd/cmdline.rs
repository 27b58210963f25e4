//! The kernel command line as the initramfs reads it.
//!
//! Owns: the `keel.*` parameters (documented in docs/image.md):
//! - `keel.usr=USR-A|USR-B|PARTLABEL=<label>|PARTUUID=<guid>`: the USR slot (absent: GPT priority bits decide)
//! - `keel.root=<same syntax>`: the state partition (default `PARTLABEL=ROOT`)
//! - `keel.init=<path>`: the init to execute after switch_root (default `/usr/bin/init`)
//! - `keel.rescue`: open the rescue shell before mounting anything
//! - `keel.wait=<seconds>`: how long to wait for the disk (default 30)
//! - `keel.debug`: more messages (every module, every GPT entry)
//!
//! Does not: act on any of them.

/// How a partition is named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartRef {
    Label(String),
    Uuid(String),
}

impl PartRef {
    pub fn parse(v: &str) -> PartRef {
        if let Some(l) = v.strip_prefix("PARTLABEL=") {
            PartRef::Label(l.to_string())
        } else if let Some(u) = v.strip_prefix("PARTUUID=") {
            PartRef::Uuid(u.to_ascii_uppercase())
        } else {
            PartRef::Label(v.to_string())
        }
    }
}

impl std::fmt::Display for PartRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartRef::Label(l) => write!(f, "PARTLABEL={l}"),
            PartRef::Uuid(u) => write!(f, "PARTUUID={u}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    pub usr: Option<PartRef>,
    pub root: PartRef,
    pub init: String,
    pub rescue: bool,
    pub wait_secs: u64,
    pub debug: bool,
}

pub const DEFAULT_INIT: &str = "/usr/bin/init";

impl Cmdline {
    pub fn parse(text: &str) -> Cmdline {
        let mut c = Cmdline {
            usr: None,
            root: PartRef::Label("ROOT".into()),
            init: DEFAULT_INIT.into(),
            rescue: false,
            wait_secs: 30,
            debug: false,
        };
        for w in text.split_whitespace() {
            let (k, v) = w.split_once('=').unwrap_or((w, ""));
            match k {
                "keel.usr" if !v.is_empty() => c.usr = Some(PartRef::parse(v)),
                "keel.root" if !v.is_empty() => c.root = PartRef::parse(v),
                "keel.init" if v.starts_with('/') => c.init = v.to_string(),
                "keel.rescue" => c.rescue = true,
                "keel.debug" => c.debug = true,
                "keel.wait" => c.wait_secs = v.parse().unwrap_or(c.wait_secs),
                _ => {}
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_slot_forms() {
        let c = Cmdline::parse("console=ttyS0 keel.usr=USR-B quiet");
        assert_eq!(c.usr, Some(PartRef::Label("USR-B".into())));
        let c = Cmdline::parse("keel.usr=PARTUUID=4b45454c-0002-4000-8000-000000000002 keel.root=PARTLABEL=STATE");
        assert_eq!(c.usr, Some(PartRef::Uuid("4B45454C-0002-4000-8000-000000000002".into())));
        assert_eq!(c.root, PartRef::Label("STATE".into()));
    }

    #[test]
    fn defaults() {
        let c = Cmdline::parse("console=ttyS0");
        assert_eq!(c.usr, None);
        assert_eq!(c.root, PartRef::Label("ROOT".into()));
        assert_eq!(c.init, DEFAULT_INIT);
        assert!(!c.rescue);
        assert_eq!(c.wait_secs, 30);
    }

    #[test]
    fn flags_and_bad_values() {
        let c = Cmdline::parse("keel.rescue keel.debug keel.wait=x keel.init=relative keel.usr=");
        assert!(c.rescue && c.debug);
        assert_eq!(c.wait_secs, 30);
        assert_eq!(c.init, DEFAULT_INIT);
        assert_eq!(c.usr, None);
    }
}
