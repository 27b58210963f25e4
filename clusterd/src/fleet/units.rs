//! What a fleet unit asks of the scheduler: `[X-Fleet]` constraints and resource requests.
//!
//! Owns: turning a submitted unit's text into a [`FleetSpec`] with keel-model's parser (INI, specifiers with
//! the unit's own name, `MemoryMax=`/`CPUQuota=`), glob matching for `Conflicts=`, checking a machine's
//! metadata against `MachineMetadata=`, and parsing `key=value,…` metadata strings. Pure.
//! Does not: decide placement (see `scheduler`) or read the KV store.
//!
//! `[X-Fleet]` keys (fleet's older `X-Condition*` spellings are accepted too): `MachineID=` (one id),
//! `MachineOf=` (units to co-locate with), `MachineMetadata=` (`key=value` words; different keys AND, the
//! same key OR), `Conflicts=` (globs of units that must not share the machine), `Global=` (run on every
//! matching machine), `Replaces=` (take that unit's machine and push it elsewhere). List keys accumulate; an
//! empty value resets the key, as in systemd.

use std::collections::BTreeMap;
use std::path::Path;

use keel_model::values::{parse_bool, split_words};
use keel_model::{IniFile, Unit, UnitName};

/// CPU and memory a unit is expected to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// Used when scoring machines for a unit that declares no request (fleet only counted units; this keeps
/// request-less units spreading by count while declared requests weigh more). Never used to refuse a fit.
pub const DEFAULT_REQUEST: Resources = Resources { cpu_millis: 100, memory_bytes: 64 << 20 };

/// A unit's scheduling constraints, parsed once per unit text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetSpec {
    pub name: String,
    pub global: bool,
    pub machine_id: Option<String>,
    pub machine_of: Vec<String>,
    /// key → accepted values.
    pub metadata: BTreeMap<String, Vec<String>>,
    pub conflicts: Vec<String>,
    pub replaces: Vec<String>,
    /// `MemoryMax=` / `CPUQuota=` as declared (zero when absent).
    pub request: Resources,
    /// Warnings found while parsing (unknown keys), as `name: message`.
    pub warnings: Vec<String>,
}

impl FleetSpec {
    /// The request used for scoring: declared values, or [`DEFAULT_REQUEST`] for those not declared.
    pub fn score_request(&self) -> Resources {
        Resources {
            cpu_millis: if self.request.cpu_millis > 0 { self.request.cpu_millis } else { DEFAULT_REQUEST.cpu_millis },
            memory_bytes: if self.request.memory_bytes > 0 { self.request.memory_bytes } else { DEFAULT_REQUEST.memory_bytes },
        }
    }

    /// Does `machine` (its id and metadata) satisfy `MachineID=` and `MachineMetadata=`?
    pub fn matches_machine(&self, id: &str, metadata: &BTreeMap<String, String>) -> bool {
        if self.machine_id.as_deref().is_some_and(|m| m != id) {
            return false;
        }
        self.metadata
            .iter()
            .all(|(k, allowed)| metadata.get(k).is_some_and(|v| allowed.iter().any(|a| a == v)))
    }

    /// Must `self` and a unit named `other` (with spec `other_spec`) stay apart?
    pub fn conflicts_with(&self, other_spec: &FleetSpec) -> bool {
        self.name != other_spec.name
            && (self.conflicts.iter().any(|g| glob_match(g, &other_spec.name))
                || other_spec.conflicts.iter().any(|g| glob_match(g, &self.name)))
    }
}

/// Parse a submitted unit. Errors are the unit's diagnostics (`name:line: error: …`), one per entry.
pub fn parse_unit(name: &str, text: &str) -> Result<FleetSpec, Vec<String>> {
    let unit_name = UnitName::parse(name).map_err(|e| vec![e])?;
    let ini = IniFile::parse(Path::new(name), text).map_err(|d| vec![d.to_string()])?;
    let (unit, diags) = Unit::from_ini(unit_name, &[ini], "%H");
    let Some(unit) = unit else {
        return Err(diags.iter().filter(|d| d.is_error()).map(|d| d.to_string()).collect());
    };
    let mut spec = FleetSpec { name: name.to_string(), ..Default::default() };
    if let Some(svc) = &unit.service {
        spec.request.memory_bytes = svc.memory_max.unwrap_or(0);
        spec.request.cpu_millis = u64::from(svc.cpu_quota_percent.unwrap_or(0)) * 10;
    }
    let empty = Vec::new();
    let entries = unit.extra_sections.get("X-Fleet").unwrap_or(&empty);
    let mut errors = Vec::new();
    for (key, value) in entries {
        if let Err(e) = apply_key(&mut spec, key, value) {
            errors.push(format!("{name}: [X-Fleet] {key}={value}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(spec)
    } else {
        Err(errors)
    }
}

fn words(value: &str) -> Result<Vec<String>, String> {
    split_words(value)
}

fn apply_key(spec: &mut FleetSpec, key: &str, value: &str) -> Result<(), String> {
    let reset = value.trim().is_empty();
    match key {
        "MachineID" | "X-ConditionMachineID" => {
            spec.machine_id = if reset { None } else { Some(value.trim().to_string()) };
        }
        "MachineOf" | "X-ConditionMachineOf" => extend(&mut spec.machine_of, reset, words(value)?),
        "Conflicts" | "X-Conflicts" => extend(&mut spec.conflicts, reset, words(value)?),
        "Replaces" => extend(&mut spec.replaces, reset, words(value)?),
        "Global" => {
            spec.global = if reset { false } else { parse_bool(value).ok_or("expected a boolean")? };
        }
        "MachineMetadata" | "X-ConditionMachineMetadata" => {
            if reset {
                spec.metadata.clear();
            }
            for w in words(value)? {
                let (k, v) = w.split_once('=').ok_or_else(|| format!("'{w}' is not key=value"))?;
                spec.metadata.entry(k.trim().to_string()).or_default().push(v.trim().to_string());
            }
        }
        other => spec.warnings.push(format!("{}: unknown key {other}= in [X-Fleet], ignored", spec.name)),
    }
    Ok(())
}

fn extend(list: &mut Vec<String>, reset: bool, words: Vec<String>) {
    if reset {
        list.clear();
    }
    for w in words {
        if !list.contains(&w) {
            list.push(w);
        }
    }
}

/// Shell-style glob: `*` any run, `?` one character, everything else literal.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Parse `key=value,key2=value2` (as in `--fleet-metadata` and fleet.env's `METADATA=`).
pub fn parse_metadata(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut m = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("metadata entry '{part}' is not key=value (e.g. region=eu,disk=ssd)"))?;
        if k.trim().is_empty() {
            return Err(format!("metadata entry '{part}' has an empty key"));
        }
        m.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "[Service]\nExecStart=/bin/sleep 1000\n";

    #[test]
    fn x_fleet_keys_are_parsed_with_specifiers() {
        let text = format!(
            "{SVC}MemoryMax=256M\nCPUQuota=50%\n[X-Fleet]\nMachineOf=db@%i.service\nConflicts=web@*.service\n\
             MachineMetadata=region=eu region=us\nMachineMetadata=disk=ssd\nReplaces=old.service\n"
        );
        let s = parse_unit("web@3.service", &text).expect("parses");
        assert_eq!(s.machine_of, vec!["db@3.service"]);
        assert_eq!(s.conflicts, vec!["web@*.service"]);
        assert_eq!(s.replaces, vec!["old.service"]);
        assert_eq!(s.metadata["region"], vec!["eu", "us"]);
        assert_eq!(s.request, Resources { cpu_millis: 500, memory_bytes: 256 << 20 });
        assert!(!s.global);
    }

    #[test]
    fn metadata_same_key_or_different_keys_and() {
        let s = parse_unit("a.service", &format!("{SVC}[X-Fleet]\nMachineMetadata=region=eu region=us disk=ssd\n")).expect("ok");
        let md = |p: &[(&str, &str)]| p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(s.matches_machine("m", &md(&[("region", "us"), ("disk", "ssd")])));
        assert!(!s.matches_machine("m", &md(&[("region", "us")])));
        assert!(!s.matches_machine("m", &md(&[("region", "asia"), ("disk", "ssd")])));
    }

    #[test]
    fn bad_units_report_diagnostics() {
        let e = parse_unit("a.service", "[Service]\nRestart=sometimes\nExecStart=/bin/true\n").unwrap_err();
        assert!(e.iter().any(|l| l.contains("Restart")), "{e:?}");
        let e = parse_unit("a.service", &format!("{SVC}[X-Fleet]\nGlobal=perhaps\n")).unwrap_err();
        assert!(e[0].contains("Global"), "{e:?}");
        assert!(parse_unit("bad name", SVC).is_err());
    }

    #[test]
    fn globs() {
        assert!(glob_match("web@*.service", "web@1.service"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a?c*", "abcdef"));
        assert!(!glob_match("web@*.service", "db@1.service"));
        assert!(!glob_match("a", "ab"));
    }

    #[test]
    fn conflicts_are_symmetric() {
        let a = parse_unit("a.service", &format!("{SVC}[X-Fleet]\nConflicts=b*\n")).expect("a");
        let b = parse_unit("b.service", SVC).expect("b");
        assert!(a.conflicts_with(&b) && b.conflicts_with(&a));
        assert!(!a.conflicts_with(&a));
    }

    #[test]
    fn metadata_strings() {
        let m = parse_metadata("region=eu, disk=ssd").expect("ok");
        assert_eq!(m["disk"], "ssd");
        assert!(parse_metadata("oops").is_err());
    }
}
