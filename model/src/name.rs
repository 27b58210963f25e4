//! Unit names: `prefix[@instance].kind`, templates, and the specifiers `%n %N %p %i %I %H %%` (plus the
//! fixed system directories `%t %S %C %L %E %T %V`).
//!
//! Owns: validating and splitting names, systemd's instance escaping, and expanding specifiers. Does not:
//! look anything up on disk.
//!
//! Valid names use only `[A-Za-z0-9:_.\\@-]`, are at most 255 bytes, end in `.service` or `.target`, have a
//! non-empty prefix and at most one `@`. `web@.service` is a template (instance `Some("")`),
//! `web@8080.service` an instance of it.

use std::fmt;

use serde::Serialize;

/// Longest valid unit name, in bytes (systemd's `UNIT_NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// systemd unit types Keel does not run: files of these types are reported and skipped, and a dependency on
/// one is dropped with a warning, not an error.
pub(crate) const OTHER_SYSTEMD_TYPES: &[&str] =
    &["socket", "mount", "automount", "device", "swap", "path", "timer", "slice", "scope"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitKind {
    Service,
    Target,
}

impl UnitKind {
    /// The file-name suffix without the dot: `service`, `target`.
    pub fn suffix(self) -> &'static str {
        match self {
            UnitKind::Service => "service",
            UnitKind::Target => "target",
        }
    }

    fn from_suffix(s: &str) -> Option<UnitKind> {
        match s {
            "service" => Some(UnitKind::Service),
            "target" => Some(UnitKind::Target),
            _ => None,
        }
    }
}

/// A parsed unit name such as `web@8080.service`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct UnitName {
    /// The whole name, `web@8080.service`.
    pub full: String,
    /// `web`.
    pub prefix: String,
    /// `Some("8080")` for an instance, `Some("")` for the template `web@.service`, `None` otherwise.
    pub instance: Option<String>,
    pub kind: UnitKind,
}

fn valid_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '\\' | '@' | '-')
}

impl UnitName {
    /// Validate and split a unit name.
    pub fn parse(s: &str) -> Result<UnitName, String> {
        if s.is_empty() {
            return Err("empty unit name".to_string());
        }
        if s.len() > MAX_NAME_LEN {
            return Err(format!(
                "unit name '{s}' is longer than {MAX_NAME_LEN} characters"
            ));
        }
        if let Some(c) = s.chars().find(|c| !valid_char(*c)) {
            return Err(format!("invalid character '{c}' in unit name '{s}'"));
        }
        let (stem, suffix) = s
            .rsplit_once('.')
            .ok_or_else(|| format!("unit name '{s}' has no type suffix (.service or .target)"))?;
        let kind = UnitKind::from_suffix(suffix).ok_or_else(|| {
            format!(
                "unit name '{s}' has unsupported type '.{suffix}' (expected .service or .target)"
            )
        })?;
        let (prefix, instance) = match stem.split_once('@') {
            Some((p, i)) => (p, Some(i)),
            None => (stem, None),
        };
        if prefix.is_empty() {
            return Err(format!("unit name '{s}' has an empty prefix"));
        }
        if instance.is_some_and(|i| i.contains('@')) {
            return Err(format!("unit name '{s}' contains more than one '@'"));
        }
        Ok(UnitName {
            full: s.to_string(),
            prefix: prefix.to_string(),
            instance: instance.map(str::to_string),
            kind,
        })
    }

    /// `web@.service`.
    pub fn is_template(&self) -> bool {
        self.instance.as_deref() == Some("")
    }

    /// `web@8080.service`.
    pub fn is_instance(&self) -> bool {
        self.instance.as_deref().is_some_and(|i| !i.is_empty())
    }

    /// The template's name for an instance or a template (`web@1.service` → `web@.service`); `None` for a
    /// plain name.
    pub fn template_name(&self) -> Option<String> {
        self.instance.as_ref()?;
        Some(format!("{}@.{}", self.prefix, self.kind.suffix()))
    }

    /// `web@.service` + `8080` → `web@8080.service`. Works on templates and instances (replacing the
    /// instance); a plain name or an invalid instance is an error.
    pub fn instantiate(&self, instance: &str) -> Result<UnitName, String> {
        if self.instance.is_none() {
            return Err(format!("unit '{}' is not a template", self.full));
        }
        if instance.is_empty() {
            return Err(format!("empty instance for template '{}'", self.full));
        }
        UnitName::parse(&format!(
            "{}@{}.{}",
            self.prefix,
            instance,
            self.kind.suffix()
        ))
    }

    /// The name without its type suffix (`%N`): `web@8080`.
    pub fn without_suffix(&self) -> &str {
        let cut = self.full.len() - self.kind.suffix().len() - 1;
        self.full.get(..cut).unwrap_or(&self.full)
    }
}

impl fmt::Display for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl std::str::FromStr for UnitName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        UnitName::parse(s)
    }
}

/// systemd's instance unescaping (`%I`): `-` → `/`, `\xNN` → that byte. The result must be UTF-8.
pub fn unescape(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'-' => {
                out.push(b'/');
                i += 1;
            }
            b'\\' => {
                let hex = s
                    .get(i + 1..i + 4)
                    .and_then(|h| h.strip_prefix('x'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("invalid escape at '{}' in '{s}'", &s[i..]))?;
                out.push(hex);
                i += 4;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' unescapes to invalid UTF-8"))
}

/// systemd's instance escaping (inverse of [`unescape`], like `systemd-escape`): `/` → `-`, a leading `.`
/// and every byte outside `[A-Za-z0-9:_.]` → `\xNN`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b':' || b == b'_' || (b == b'.' && i > 0);
        if b == b'/' {
            out.push('-');
        } else if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The fixed directory a system-manager specifier stands for.
fn system_dir(c: char) -> Option<&'static str> {
    let dir = match c {
        't' => "/run",
        'S' => "/var/lib",
        'C' => "/var/cache",
        'L' => "/var/log",
        'E' => "/etc",
        'T' => "/tmp",
        'V' => "/var/tmp",
        _ => return None,
    };
    Some(dir)
}

/// Expand `%n` (full name), `%N` (name without suffix), `%p` (prefix), `%i` (instance), `%I` (unescaped
/// instance), `%H` (`hostname`) and `%%`; also systemd's fixed system-manager directories `%t` (`/run`),
/// `%S` (`/var/lib`), `%C` (`/var/cache`), `%L` (`/var/log`), `%E` (`/etc`), `%T` (`/tmp`), `%V`
/// (`/var/tmp`), which generated units (e.g. podman's) use. Any other specifier, or a trailing `%`, is an
/// error.
pub fn expand_specifiers(s: &str, name: &UnitName, hostname: &str) -> Result<String, String> {
    if !s.contains('%') {
        return Ok(s.to_string());
    }
    let instance = name.instance.as_deref().unwrap_or("");
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push_str(&name.full),
            Some('N') => out.push_str(name.without_suffix()),
            Some('p') => out.push_str(&name.prefix),
            Some('i') => out.push_str(instance),
            Some('I') => out.push_str(&unescape(instance)?),
            Some('H') => out.push_str(hostname),
            Some('%') => out.push('%'),
            Some(other) => {
                let dir = system_dir(other)
                    .ok_or_else(|| format!("unknown specifier '%{other}' in '{s}'"))?;
                out.push_str(dir);
            }
            None => {
                return Err(format!(
                    "trailing '%' in '{s}' (write '%%' for a literal '%')"
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> UnitName {
        UnitName::parse(s).expect(s)
    }

    #[test]
    fn plain_service_and_target() {
        let n = name("sshd.service");
        assert_eq!(
            (n.prefix.as_str(), n.instance.clone(), n.kind),
            ("sshd", None, UnitKind::Service)
        );
        assert!(!n.is_template() && !n.is_instance());
        assert_eq!(n.template_name(), None);
        let t = name("multi-user.target");
        assert_eq!(t.kind, UnitKind::Target);
        assert_eq!(t.to_string(), "multi-user.target");
    }

    #[test]
    fn template_and_instance() {
        let t = name("web@.service");
        assert!(t.is_template() && !t.is_instance());
        assert_eq!(t.instance.as_deref(), Some(""));
        assert_eq!(t.template_name().as_deref(), Some("web@.service"));
        let i = name("web@8080.service");
        assert!(i.is_instance() && !i.is_template());
        assert_eq!(i.instance.as_deref(), Some("8080"));
        assert_eq!(i.prefix, "web");
        assert_eq!(i.template_name().as_deref(), Some("web@.service"));
        let dotted = name("getty@tty1.dev.service");
        assert_eq!(dotted.instance.as_deref(), Some("tty1.dev"));
    }

    #[test]
    fn instantiate() {
        let t = name("web@.service");
        assert_eq!(t.instantiate("3").expect("ok"), name("web@3.service"));
        assert_eq!(
            name("web@1.service").instantiate("2").expect("ok").full,
            "web@2.service"
        );
        assert!(name("web.service").instantiate("3").is_err());
        assert!(t.instantiate("").is_err());
        assert!(t.instantiate("a b").is_err());
    }

    #[test]
    fn invalid_names() {
        for bad in [
            "",
            "web",
            "web.socket",
            ".service",
            "@x.service",
            "a@b@c.service",
            "we b.service",
            "wéb.service",
            "a/b.service",
        ] {
            assert!(UnitName::parse(bad).is_err(), "{bad:?} should be invalid");
        }
        let err = UnitName::parse("web.socket").expect_err("bad");
        assert!(err.contains("unsupported type '.socket'"), "{err}");
    }

    #[test]
    fn all_valid_characters_and_length_limit() {
        assert!(UnitName::parse("a-Z_0:9.x\\x2d@i.service").is_ok());
        let long = format!("{}.service", "a".repeat(MAX_NAME_LEN - 8));
        assert_eq!(long.len(), MAX_NAME_LEN);
        assert!(UnitName::parse(&long).is_ok());
        let too_long = format!("a{long}");
        assert!(UnitName::parse(&too_long)
            .expect_err("long")
            .contains("longer than 255"));
    }

    #[test]
    fn without_suffix() {
        assert_eq!(name("web@8080.service").without_suffix(), "web@8080");
        assert_eq!(name("basic.target").without_suffix(), "basic");
    }

    #[test]
    fn specifiers_expand() {
        let n = name("web@srv-www\\x20x.service");
        let got = expand_specifiers("%n|%N|%p|%i|%I|%H|100%%", &n, "node1").expect("ok");
        assert_eq!(
            got,
            "web@srv-www\\x20x.service|web@srv-www\\x20x|web|srv-www\\x20x|srv/www x|node1|100%"
        );
    }

    #[test]
    fn system_directory_specifiers() {
        let n = name("db.service");
        let got = expand_specifiers("%t/%n.pid %S %C %L %E %T %V", &n, "h").expect("ok");
        assert_eq!(
            got,
            "/run/db.service.pid /var/lib /var/cache /var/log /etc /tmp /var/tmp"
        );
    }

    #[test]
    fn specifiers_on_plain_name_have_empty_instance() {
        let n = name("db.service");
        assert_eq!(expand_specifiers("[%i][%I]", &n, "h").expect("ok"), "[][]");
        assert_eq!(
            expand_specifiers("no specifiers", &n, "h").expect("ok"),
            "no specifiers"
        );
    }

    #[test]
    fn unknown_or_trailing_specifier_is_an_error() {
        let n = name("db.service");
        let e = expand_specifiers("x %Z y", &n, "h").expect_err("bad");
        assert_eq!(e, "unknown specifier '%Z' in 'x %Z y'");
        assert!(expand_specifiers("50%", &n, "h")
            .expect_err("bad")
            .contains("trailing '%'"));
    }

    #[test]
    fn unescape_and_escape_round_trip() {
        assert_eq!(unescape("dev-sda1").expect("ok"), "dev/sda1");
        assert_eq!(unescape("a\\x2db").expect("ok"), "a-b");
        assert!(unescape("bad\\xZZ").is_err());
        assert!(unescape("bad\\x2").is_err());
        assert_eq!(escape("/dev/sda 1"), "-dev-sda\\x201");
        assert_eq!(escape(".hidden-x"), "\\x2ehidden\\x2dx");
        for s in ["/var/lib/a b", "x-y", "plain"] {
            assert_eq!(unescape(&escape(s)).expect("ok"), s);
        }
    }
}
