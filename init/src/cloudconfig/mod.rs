//! `#cloud-config`: the YAML a machine is configured with at every boot (schema in docs/cloud-config.md).
//!
//! Owns: finding the user-data (QEMU fw_cfg or a NoCloud `CIDATA` disk, see `source`), parsing it section by
//! section so one bad section does not lose the others (each problem reported with line and column),
//! `$private_ipv4`-style substitution, and applying it idempotently (`apply`). Does not: start units itself —
//! it returns the unit commands for the supervisor to run after its unit reload.

pub mod apply;
pub mod source;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole document. Unknown top-level keys are warnings, not errors (cloud-init has many we ignore).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CloudConfig {
    pub hostname: Option<String>,
    pub users: Vec<User>,
    /// CoreOS style: keys for the default user `core`.
    pub ssh_authorized_keys: Vec<String>,
    pub write_files: Vec<WriteFile>,
    pub keel: KeelSection,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default, alias = "ssh-authorized-keys")]
    pub ssh_authorized_keys: Vec<String>,
    #[serde(default)]
    pub shell: Option<String>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default, alias = "passwd")]
    pub password_hash: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFile {
    pub path: String,
    #[serde(default)]
    pub content: String,
    /// Octal, e.g. "0644".
    #[serde(default)]
    pub permissions: Option<String>,
    /// `user:group` (names or numbers).
    #[serde(default)]
    pub owner: Option<String>,
    /// `b64`/`base64` to decode `content`.
    #[serde(default)]
    pub encoding: Option<String>,
    #[serde(default)]
    pub append: bool,
}

/// A `key: value` section whose values are flags: strings, numbers and booleans are all taken as their text
/// (`election_timeout: 300` and `election_timeout: "300"` mean the same); lists and maps are refused.
fn scalar_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    use serde::de::Error;
    let Some(m) = Option::<BTreeMap<String, serde_yaml::Value>>::deserialize(d)? else { return Ok(None) };
    let mut out = BTreeMap::new();
    for (k, v) in m {
        let text = match v {
            serde_yaml::Value::String(s) => s,
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            serde_yaml::Value::Null => String::new(),
            _ => return Err(D::Error::custom(format!("`{k}` must be a single value (a string, number or boolean), not a list or map"))),
        };
        out.insert(k, text);
    }
    Ok(Some(out))
}

/// Keel's own section, `keel:` (CoreOS configs' `coreos:` is accepted as the same thing).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeelSection {
    #[serde(default)]
    pub units: Vec<UnitEntry>,
    #[serde(default, alias = "etcd", alias = "etcd2", deserialize_with = "scalar_map")]
    pub clusterd: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "scalar_map")]
    pub fleet: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub update: Option<BTreeMap<String, serde_yaml::Value>>,
    #[serde(default)]
    pub locksmith: Option<BTreeMap<String, serde_yaml::Value>>,
    /// Static addresses (the platform has no DHCP server, e.g. VMs on a test bridge).
    #[serde(default)]
    pub network: Vec<NetInterface>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetInterface {
    /// Kernel interface name (`eth0`, the first virtio NIC without udev renaming).
    #[serde(default = "eth0")]
    pub interface: String,
    /// `10.0.0.2/24`
    pub address: String,
    #[serde(default)]
    pub gateway: Option<String>,
}

fn eth0() -> String {
    "eth0".into()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitEntry {
    pub name: String,
    #[serde(default)]
    pub content: Option<String>,
    /// start | stop | restart
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub enable: bool,
    /// Write to /run/keel/units (gone at the next boot) instead of /etc/keel/units. Default true: cloud-config
    /// is applied at every boot anyway.
    #[serde(default = "yes")]
    pub runtime: bool,
    #[serde(default)]
    pub mask: bool,
    #[serde(default, alias = "drop-ins")]
    pub drop_ins: Vec<DropIn>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropIn {
    pub name: String,
    pub content: String,
}

/// A problem found in the document, with its position (1-based; 0 when unknown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub fatal: bool,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.fatal { "error" } else { "warning" };
        write!(f, "user-data:{}:{}: {kind}: {}", self.line, self.column, self.message)
    }
}

/// Values the platform provides for `$name` substitution.
pub type Vars = BTreeMap<String, String>;

/// At boot (PID 1 of a machine): find user-data, report every problem on the console (`log`), apply what is
/// valid to `/`, and return the unit commands to run once units are loaded.
pub fn boot(log: &mut dyn FnMut(&str)) -> Vec<(String, String)> {
    let Some(found) = source::find() else {
        log("no cloud-config found (fw_cfg opt/keel/user-data or a CIDATA disk); booting with the image defaults");
        return Vec::new();
    };
    log(&format!("applying cloud-config from {}", found.origin));
    let mut vars = source::variables(found.meta_data.as_deref());
    // A static address from `keel.network` is this machine's $private_ipv4 when no interface has one yet.
    if let Some(n) = parse(&found.user_data, &vars).0.keel.network.first() {
        let ip = n.address.split('/').next().unwrap_or_default().to_string();
        vars.entry("private_ipv4".into()).or_insert_with(|| ip.clone());
        vars.entry("public_ipv4".into()).or_insert(ip);
    }
    let (cfg, problems) = parse(&found.user_data, &vars);
    for p in &problems {
        log(&p.to_string());
    }
    let report = apply::apply(&cfg, std::path::Path::new("/"));
    if let Some(h) = &cfg.hostname {
        if let Err(e) = nix::unistd::sethostname(h) {
            log(&format!("cannot set hostname {h}: {e}"));
        }
    }
    for c in &report.changed {
        log(c);
    }
    for e in &report.errors {
        log(&format!("cloud-config: {e}"));
    }
    report.commands
}

/// Parse a `#cloud-config` document. Returns what was valid plus every problem; a section with an error is
/// dropped, the others are kept.
pub fn parse(text: &str, vars: &Vars) -> (CloudConfig, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut cfg = CloudConfig::default();
    if !text.trim_start().starts_with("#cloud-config") {
        problems.push(Problem { line: 1, column: 1, message: "user-data does not start with #cloud-config; ignored".into(), fatal: true });
        return (cfg, problems);
    }
    let text = substitute(text, vars);
    let doc: serde_yaml::Value = match serde_yaml::from_str(&text) {
        Ok(serde_yaml::Value::Null) => return (cfg, problems),
        Ok(v) => v,
        Err(e) => {
            let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
            problems.push(Problem { line, column, message: format!("not valid YAML: {e}"), fatal: true });
            return (cfg, problems);
        }
    };
    let serde_yaml::Value::Mapping(map) = doc else {
        problems.push(Problem { line: 1, column: 1, message: "the document must be a mapping of sections".into(), fatal: true });
        return (cfg, problems);
    };
    for (k, v) in map {
        let key = k.as_str().unwrap_or_default().to_string();
        let line = line_of_key(&text, &key);
        let mut take = |what: &str, res: Result<(), serde_yaml::Error>| {
            if let Err(e) = res {
                problems.push(Problem { line, column: 1, message: format!("section `{what}` ignored: {e}"), fatal: true });
            }
        };
        match key.as_str() {
            "hostname" => take("hostname", from(v).map(|h| cfg.hostname = Some(h))),
            "users" => take("users", from(v).map(|u| cfg.users = u)),
            "ssh_authorized_keys" | "ssh-authorized-keys" => take(&key, from(v).map(|k| cfg.ssh_authorized_keys = k)),
            "write_files" | "write-files" => take(&key, from(v).map(|w| cfg.write_files = w)),
            "keel" | "coreos" => take(&key, from(normalize_keys(v)).map(|s| cfg.keel = s)),
            other => problems.push(Problem { line, column: 1, message: format!("unknown section `{other}` ignored"), fatal: false }),
        }
    }
    validate(&cfg, &text, &mut problems);
    (cfg, problems)
}

fn from<T: serde::de::DeserializeOwned>(v: serde_yaml::Value) -> Result<T, serde_yaml::Error> {
    serde_yaml::from_value(v)
}

/// `reboot-strategy` and `reboot_strategy` mean the same; so do `drop-ins` and `drop_ins` one level down.
fn normalize_keys(v: serde_yaml::Value) -> serde_yaml::Value {
    match v {
        serde_yaml::Value::Mapping(m) => serde_yaml::Value::Mapping(
            m.into_iter()
                .map(|(k, v)| {
                    let k = match k {
                        serde_yaml::Value::String(s) if s != "drop-ins" => serde_yaml::Value::String(s.replace('-', "_")),
                        other => other,
                    };
                    (k, normalize_keys(v))
                })
                .collect(),
        ),
        serde_yaml::Value::Sequence(s) => serde_yaml::Value::Sequence(s.into_iter().map(normalize_keys).collect()),
        other => other,
    }
}

/// Meaning checks serde cannot do: unit names, commands, absolute paths, permissions.
fn validate(cfg: &CloudConfig, text: &str, problems: &mut Vec<Problem>) {
    for u in &cfg.keel.units {
        let line = line_of_value(text, &u.name);
        if keel_model::UnitName::parse(&u.name).is_err() {
            problems.push(Problem { line, column: 1, message: format!("unit name {:?} is not a .service or .target name", u.name), fatal: true });
        }
        if let Some(c) = &u.command {
            if !["start", "stop", "restart", "reload-or-restart", "try-restart"].contains(&c.as_str()) {
                problems.push(Problem { line, column: 1, message: format!("unit {}: command {c:?} is not start, stop or restart", u.name), fatal: true });
            }
        }
    }
    for n in &cfg.keel.network {
        let line = line_of_value(text, &n.address);
        let valid = n.address.split_once('/').is_some_and(|(ip, len)| {
            ip.parse::<std::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
        });
        if !valid {
            problems.push(Problem { line, column: 1, message: format!("network: address {:?} is not IPv4/prefix (e.g. 10.0.0.2/24)", n.address), fatal: true });
        }
        if n.gateway.as_deref().is_some_and(|g| g.parse::<std::net::Ipv4Addr>().is_err()) {
            problems.push(Problem { line, column: 1, message: format!("network: gateway {:?} is not an IPv4 address", n.gateway), fatal: true });
        }
        if !n.interface.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
            problems.push(Problem { line, column: 1, message: format!("network: bad interface name {:?}", n.interface), fatal: true });
        }
    }
    for f in &cfg.write_files {
        let line = line_of_value(text, &f.path);
        if !f.path.starts_with('/') {
            problems.push(Problem { line, column: 1, message: format!("write_files: path {:?} must be absolute", f.path), fatal: true });
        }
        if let Some(p) = &f.permissions {
            if u32::from_str_radix(p.trim_start_matches("0o"), 8).is_err() {
                problems.push(Problem { line, column: 1, message: format!("write_files {}: permissions {p:?} is not octal", f.path), fatal: true });
            }
        }
    }
}

/// Replace `$private_ipv4`, `$public_ipv4`, `$hostname`, … (longest names first).
pub fn substitute(text: &str, vars: &Vars) -> String {
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut out = text.to_string();
    for n in names {
        out = out.replace(&format!("${n}"), &vars[n]).replace(&format!("${{{n}}}"), &vars[n]);
    }
    out
}

fn line_of_key(text: &str, key: &str) -> usize {
    text.lines().position(|l| l.starts_with(&format!("{key}:"))).map(|i| i + 1).unwrap_or(0)
}

fn line_of_value(text: &str, value: &str) -> usize {
    text.lines().position(|l| l.contains(value)).map(|i| i + 1).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        [("private_ipv4".to_string(), "10.0.0.5".to_string())].into_iter().collect()
    }

    #[test]
    fn parses_the_seed_example_translated_to_keel() {
        let text = "#cloud-config\nhostname: node1\nssh_authorized_keys:\n  - ssh-ed25519 AAAA test\ncoreos:\n  etcd2:\n    name: node1\n    listen-client-urls: http://$private_ipv4:2379\n  fleet:\n    metadata: region=eu\n  update:\n    reboot-strategy: etcd-lock\n  units:\n    - name: web.service\n      command: start\n      content: |\n        [Service]\n        ExecStart=/bin/sleep 1000\n";
        let (cfg, problems) = parse(text, &vars());
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(cfg.hostname.as_deref(), Some("node1"));
        let cd = cfg.keel.clusterd.expect("clusterd section");
        assert_eq!(cd["listen_client_urls"], "http://10.0.0.5:2379");
        assert_eq!(cfg.keel.units[0].command.as_deref(), Some("start"));
        assert_eq!(cfg.keel.fleet.expect("fleet")["metadata"], "region=eu");
    }

    #[test]
    fn clusterd_and_fleet_values_may_be_numbers_or_booleans_but_not_lists() {
        let text = "#cloud-config\nkeel:\n  clusterd:\n    name: n1\n    election_timeout: 600\n    snapshot_count: 5000\n  fleet:\n    agent: true\n";
        let (cfg, problems) = parse(text, &vars());
        assert!(problems.is_empty(), "{problems:?}");
        let cd = cfg.keel.clusterd.expect("clusterd section");
        assert_eq!((cd["election_timeout"].as_str(), cd["snapshot_count"].as_str()), ("600", "5000"));
        assert_eq!(cfg.keel.fleet.expect("fleet")["agent"], "true");
        let (cfg, problems) = parse("#cloud-config\nkeel:\n  clusterd:\n    name: [a, b]\n", &vars());
        assert!(cfg.keel.clusterd.is_none() && problems.iter().any(|p| p.message.contains("single value")), "{problems:?}");
    }

    #[test]
    fn a_bad_section_is_reported_with_its_line_and_the_rest_is_kept() {
        let text = "#cloud-config\nhostname: ok-host\nwrite_files:\n  - path: /etc/x\n    mode: 7\n";
        let (cfg, problems) = parse(text, &Vars::new());
        assert_eq!(cfg.hostname.as_deref(), Some("ok-host"));
        assert!(cfg.write_files.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, 3);
        assert!(problems[0].message.contains("write_files"), "{}", problems[0]);
    }

    #[test]
    fn broken_yaml_reports_line_and_column() {
        let (_, problems) = parse("#cloud-config\nhostname: [unclosed\nusers: 3\n", &Vars::new());
        assert_eq!(problems.len(), 1);
        assert!(problems[0].line >= 2 && problems[0].column > 0, "{}", problems[0]);
        assert!(problems[0].to_string().starts_with("user-data:"), "{}", problems[0]);
    }

    #[test]
    fn missing_header_and_bad_values_are_refused() {
        assert!(parse("hostname: x\n", &Vars::new()).1[0].message.contains("#cloud-config"));
        let (_, p) = parse("#cloud-config\nwrite_files:\n  - path: relative/path\n    permissions: '999'\n", &Vars::new());
        assert_eq!(p.len(), 2, "{p:?}");
        let (_, p) = parse("#cloud-config\nkeel:\n  units:\n    - name: web.service\n      command: launch\n", &Vars::new());
        assert!(p[0].message.contains("launch"), "{p:?}");
    }
}
