//! The `[Container]` section of a unit: parsing and validating it into a [`ContainerSpec`]. Pure: no I/O.
//!
//! Owns: the meaning of every `[Container]` key (documented in docs/containers.md). Does not: look at images
//! or the system (see `plan`).

use std::path::PathBuf;

use super::ContainerError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// The host's network namespace.
    Host,
    /// A private network namespace with a veth on the `keel0` bridge.
    Private,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub host: PathBuf,
    pub container: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    pub image: String,
    /// `Command=`: replaces the image's entrypoint and cmd. (`ExecStart=` does the same when this is absent.)
    pub command: Option<Vec<String>>,
    pub environment: Vec<(String, String)>,
    pub volumes: Vec<Volume>,
    pub network: Network,
    pub hostname: Option<String>,
    pub read_only: bool,
    pub user: Option<String>,
    pub add_capabilities: Vec<u32>,
    pub working_directory: Option<String>,
}

/// Docker's default capability set (names without the `CAP_` prefix) less `MKNOD`, one privilege fewer (the
/// device program, see `devices`, keeps what a node opens to the allowed devices either way).
/// `AddCapability=MKNOD` gives it back.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "NET_RAW", "SETGID", "SETUID", "SETFCAP", "SETPCAP",
    "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
];

const CAPS: &[(&str, u32)] = &[
    ("CHOWN", 0), ("DAC_OVERRIDE", 1), ("DAC_READ_SEARCH", 2), ("FOWNER", 3), ("FSETID", 4), ("KILL", 5),
    ("SETGID", 6), ("SETUID", 7), ("SETPCAP", 8), ("LINUX_IMMUTABLE", 9), ("NET_BIND_SERVICE", 10),
    ("NET_BROADCAST", 11), ("NET_ADMIN", 12), ("NET_RAW", 13), ("IPC_LOCK", 14), ("IPC_OWNER", 15),
    ("SYS_MODULE", 16), ("SYS_RAWIO", 17), ("SYS_CHROOT", 18), ("SYS_PTRACE", 19), ("SYS_PACCT", 20),
    ("SYS_ADMIN", 21), ("SYS_BOOT", 22), ("SYS_NICE", 23), ("SYS_RESOURCE", 24), ("SYS_TIME", 25),
    ("SYS_TTY_CONFIG", 26), ("MKNOD", 27), ("LEASE", 28), ("AUDIT_WRITE", 29), ("AUDIT_CONTROL", 30),
    ("SETFCAP", 31), ("MAC_OVERRIDE", 32), ("MAC_ADMIN", 33), ("SYSLOG", 34), ("WAKE_ALARM", 35),
    ("BLOCK_SUSPEND", 36), ("AUDIT_READ", 37), ("PERFMON", 38), ("BPF", 39), ("CHECKPOINT_RESTORE", 40),
];

/// `NET_ADMIN`, `CAP_NET_ADMIN` or `net_admin` → 12.
pub fn capability(name: &str) -> Option<u32> {
    let up = name.trim().to_ascii_uppercase();
    let bare = up.strip_prefix("CAP_").unwrap_or(&up);
    CAPS.iter().find(|(n, _)| *n == bare).map(|(_, v)| *v)
}

pub fn default_capabilities() -> Vec<u32> {
    DEFAULT_CAPABILITIES.iter().filter_map(|n| capability(n)).collect()
}

/// Split a command line into words: whitespace separates, '…' and "…" quote, backslash escapes.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut have = false;
    let mut chars = s.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => match chars.next() {
                Some(n) => cur.push(n),
                None => return Err("trailing backslash".into()),
            },
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                have = true;
            }
            (None, c) if c.is_whitespace() => {
                if have || !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if quote.is_some() {
        return Err("unterminated quote".into());
    }
    if have || !cur.is_empty() {
        words.push(cur);
    }
    Ok(words)
}

fn bad(key: &str, value: &str, why: impl Into<String>) -> ContainerError {
    ContainerError::BadKey { key: key.into(), value: value.into(), why: why.into() }
}

fn yes_no(key: &str, v: &str) -> Result<bool, ContainerError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "yes" | "true" | "1" | "on" => Ok(true),
        "no" | "false" | "0" | "off" | "" => Ok(false),
        _ => Err(bad(key, v, "expected yes or no")),
    }
}

impl ContainerSpec {
    /// Parse the raw `[Container]` entries of a unit.
    pub fn parse(entries: &[(String, String)]) -> Result<ContainerSpec, ContainerError> {
        let mut spec = ContainerSpec {
            image: String::new(),
            command: None,
            environment: Vec::new(),
            volumes: Vec::new(),
            network: Network::Host,
            hostname: None,
            read_only: false,
            user: None,
            add_capabilities: Vec::new(),
            working_directory: None,
        };
        for (k, v) in entries {
            let v = v.trim();
            match k.as_str() {
                "Image" => spec.image = v.to_string(),
                "Command" => {
                    let words = split_words(v).map_err(|e| bad(k, v, e))?;
                    spec.command = (!words.is_empty()).then_some(words);
                }
                "Environment" => {
                    for w in split_words(v).map_err(|e| bad(k, v, e))? {
                        let (name, val) = w.split_once('=').ok_or_else(|| bad(k, v, format!("{w:?} is not NAME=value")))?;
                        spec.environment.push((name.to_string(), val.to_string()));
                    }
                }
                "Volume" => {
                    if v.is_empty() {
                        spec.volumes.clear();
                        continue;
                    }
                    let parts: Vec<&str> = v.split(':').collect();
                    let (host, ctr, ro) = match parts.as_slice() {
                        [h, c] => (*h, *c, false),
                        [h, c, "ro"] => (*h, *c, true),
                        [h, c, "rw"] => (*h, *c, false),
                        _ => return Err(bad(k, v, "expected HOST:CONTAINER[:ro]")),
                    };
                    if !host.starts_with('/') || !ctr.starts_with('/') {
                        return Err(bad(k, v, "both paths must be absolute"));
                    }
                    if ctr.split('/').any(|c| c == "..") {
                        return Err(bad(k, v, "the container path must not contain '..'"));
                    }
                    spec.volumes.push(Volume { host: host.into(), container: ctr.into(), read_only: ro });
                }
                "Network" => {
                    spec.network = match v {
                        "host" | "" => Network::Host,
                        "private" => Network::Private,
                        _ => return Err(bad(k, v, "expected host or private")),
                    }
                }
                "Hostname" => {
                    let ok = !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                    if !ok {
                        return Err(bad(k, v, "a hostname is 1-64 letters, digits, '-' and '.'"));
                    }
                    spec.hostname = Some(v.to_string());
                }
                "ReadOnly" => spec.read_only = yes_no(k, v)?,
                "User" => spec.user = (!v.is_empty()).then(|| v.to_string()),
                "WorkingDirectory" => {
                    if !v.starts_with('/') {
                        return Err(bad(k, v, "must be an absolute path inside the container"));
                    }
                    spec.working_directory = Some(v.to_string());
                }
                "AddCapability" => {
                    for name in v.split_whitespace() {
                        let cap = capability(name).ok_or_else(|| bad(k, v, format!("unknown capability {name}")))?;
                        spec.add_capabilities.push(cap);
                    }
                }
                other => return Err(ContainerError::UnknownKey(other.to_string())),
            }
        }
        if spec.image.is_empty() {
            return Err(ContainerError::NoImage);
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_key_parses() {
        let s = ContainerSpec::parse(&e(&[
            ("Image", "busybox"),
            ("Command", "sh -c 'echo hi; sleep 1'"),
            ("Environment", "A=1 \"B=two words\""),
            ("Volume", "/srv/data:/data"),
            ("Volume", "/etc/hosts:/etc/hosts:ro"),
            ("Network", "private"),
            ("Hostname", "web-1"),
            ("ReadOnly", "yes"),
            ("User", "nobody"),
            ("AddCapability", "NET_ADMIN cap_sys_time"),
        ]))
        .expect("parse");
        assert_eq!(s.command, Some(vec!["sh".into(), "-c".into(), "echo hi; sleep 1".into()]));
        assert_eq!(s.environment, vec![("A".into(), "1".into()), ("B".into(), "two words".into())]);
        assert_eq!(s.volumes.len(), 2);
        assert!(s.volumes[1].read_only);
        assert_eq!(s.network, Network::Private);
        assert!(s.read_only);
        assert_eq!(s.add_capabilities, vec![12, 25]);
    }

    #[test]
    fn mistakes_are_named() {
        let err = ContainerSpec::parse(&e(&[("Image", "x"), ("Volume", "data:/data")])).unwrap_err();
        assert!(err.to_string().contains("Volume=data:/data"), "{err}");
        let err = ContainerSpec::parse(&e(&[("Command", "true")])).unwrap_err();
        assert!(err.to_string().contains("Image="), "{err}");
        let err = ContainerSpec::parse(&e(&[("Image", "x"), ("AddCapability", "FLY")])).unwrap_err();
        assert!(err.to_string().contains("FLY"), "{err}");
        let err = ContainerSpec::parse(&e(&[("Image", "x"), ("Colour", "red")])).unwrap_err();
        assert!(err.to_string().contains("Colour"), "{err}");
    }

    #[test]
    fn docker_default_capabilities_less_mknod() {
        assert_eq!(default_capabilities().len(), 13);
        assert!(!default_capabilities().contains(&27), "no MKNOD unless asked for");
    }
}
