//! systemd INI syntax: sections, `key=value` lines with their line numbers, comments (`#`, `;`), and
//! backslash line continuation. Syntax only: values are kept as text. Pure.
//!
//! Rules: whitespace around keys and values is trimmed; an empty value is kept (it resets lists in systemd);
//! a line ending in `\` continues on the next line (the backslash becomes a space, comment lines inside a
//! continuation are skipped, as systemd does) and the entry keeps the line number it started on.

use std::path::{Path, PathBuf};

use crate::{Diagnostic, Severity};

/// One `key=value` entry with the line it started on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub section: String,
    pub key: String,
    pub value: String,
    /// 1-based line number of the first physical line of the entry.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IniFile {
    pub path: PathBuf,
    pub entries: Vec<Entry>,
}

impl IniFile {
    /// Parse `text`; a syntax error is returned as a `file:line` diagnostic (the first one found).
    pub fn parse(path: &Path, text: &str) -> Result<IniFile, Diagnostic> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut entries = Vec::new();
        let mut section: Option<String> = None;
        for (line_no, logical) in logical_lines(text) {
            let err = |message: String| Diagnostic {
                file: path.to_path_buf(),
                line: line_no,
                severity: Severity::Error,
                message,
            };
            if logical.starts_with('[') {
                section = Some(parse_header(&logical).map_err(err)?);
                continue;
            }
            let (key, value) = parse_assignment(&logical).map_err(err)?;
            let Some(section) = &section else {
                return Err(err(format!(
                    "key '{key}' outside of any section: '{logical}'"
                )));
            };
            entries.push(Entry {
                section: section.clone(),
                key,
                value,
                line: line_no,
            });
        }
        Ok(IniFile {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// Entries of one section, in file order.
    pub fn section<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries.iter().filter(move |e| e.section == name)
    }
}

fn is_comment(trimmed: &str) -> bool {
    trimmed.starts_with('#') || trimmed.starts_with(';')
}

/// Join continuation lines; yields (first line number, trimmed logical line), skipping blanks and comments.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (idx, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if let Some((start, mut acc)) = pending.take() {
            if is_comment(trimmed) {
                pending = Some((start, acc));
                continue;
            }
            match trimmed.strip_suffix('\\') {
                Some(head) => {
                    acc.push_str(head.trim_end());
                    acc.push(' ');
                    pending = Some((start, acc));
                }
                None => {
                    acc.push_str(trimmed);
                    out.push((start, acc.trim().to_string()));
                }
            }
            continue;
        }
        if trimmed.is_empty() || is_comment(trimmed) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => pending = Some((idx + 1, format!("{} ", head.trim_end()))),
            None => out.push((idx + 1, trimmed.to_string())),
        }
    }
    if let Some((start, acc)) = pending {
        out.push((start, acc.trim().to_string()));
    }
    out
}

fn parse_header(line: &str) -> Result<String, String> {
    let name = line
        .strip_prefix('[')
        .and_then(|l| l.strip_suffix(']'))
        .ok_or_else(|| format!("malformed section header '{line}'"))?;
    if name.is_empty() || name.contains(['[', ']']) || name.trim() != name {
        return Err(format!("malformed section header '{line}'"));
    }
    Ok(name.to_string())
}

fn parse_assignment(line: &str) -> Result<(String, String), String> {
    let (key, value) = line
        .split_once('=')
        .ok_or_else(|| format!("expected 'key=value', got '{line}'"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("missing key before '=' in '{line}'"));
    }
    if key.chars().any(char::is_whitespace) {
        return Err(format!(
            "invalid key '{key}' (contains whitespace) in '{line}'"
        ));
    }
    Ok((key.to_string(), value.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<IniFile, Diagnostic> {
        IniFile::parse(Path::new("/u/a.service"), text)
    }

    fn triples(f: &IniFile) -> Vec<(&str, &str, &str, usize)> {
        f.entries
            .iter()
            .map(|e| (e.section.as_str(), e.key.as_str(), e.value.as_str(), e.line))
            .collect()
    }

    #[test]
    fn sections_keys_and_line_numbers() {
        let f =
            parse("[Unit]\nDescription = Web server \n\n[Service]\nExecStart=/bin/web --port=80\n")
                .expect("parses");
        assert_eq!(f.path, PathBuf::from("/u/a.service"));
        assert_eq!(
            triples(&f),
            vec![
                ("Unit", "Description", "Web server", 2),
                ("Service", "ExecStart", "/bin/web --port=80", 5),
            ]
        );
    }

    #[test]
    fn comments_and_blank_lines_are_skipped() {
        let f =
            parse("# top\n; semi\n[Unit]\n  # indented\n\n   \nWants=a.service\n").expect("parses");
        assert_eq!(triples(&f), vec![("Unit", "Wants", "a.service", 7)]);
    }

    #[test]
    fn empty_value_is_kept() {
        let f = parse("[Service]\nExecStart=\nExecStart =  \n").expect("parses");
        assert_eq!(
            triples(&f),
            vec![
                ("Service", "ExecStart", "", 2),
                ("Service", "ExecStart", "", 3)
            ]
        );
    }

    #[test]
    fn continuation_joins_lines_and_keeps_first_line_number() {
        let text = "[Service]\nExecStart=/bin/echo \\\n  one \\\n# comment inside\n  two\nUser=x\n";
        let f = parse(text).expect("parses");
        assert_eq!(
            triples(&f),
            vec![
                ("Service", "ExecStart", "/bin/echo one two", 2),
                ("Service", "User", "x", 6)
            ]
        );
    }

    #[test]
    fn continuation_at_end_of_file() {
        let f = parse("[Service]\nExecStart=/bin/true \\").expect("parses");
        assert_eq!(triples(&f), vec![("Service", "ExecStart", "/bin/true", 2)]);
    }

    #[test]
    fn value_may_contain_equals_and_crlf_is_accepted() {
        let f = parse("[Service]\r\nEnvironment=A=1 B=2\r\n").expect("parses");
        assert_eq!(triples(&f), vec![("Service", "Environment", "A=1 B=2", 2)]);
    }

    #[test]
    fn key_outside_section_is_an_error_with_line() {
        let d = parse("\n# c\nDescription=x\n[Unit]\n").expect_err("fails");
        assert_eq!(d.line, 3);
        assert_eq!(d.severity, Severity::Error);
        assert_eq!(d.file, PathBuf::from("/u/a.service"));
        assert!(
            d.message.contains("outside of any section"),
            "{}",
            d.message
        );
        assert_eq!(
            d.to_string(),
            format!("/u/a.service:3: error: {}", d.message)
        );
    }

    #[test]
    fn malformed_header_quotes_the_line() {
        let d = parse("[Unit]\nA=b\n[Service\n").expect_err("fails");
        assert_eq!(d.line, 3);
        assert_eq!(d.message, "malformed section header '[Service'");
        assert!(parse("[]\n").is_err());
        assert!(parse("[A]]\n").is_err());
    }

    #[test]
    fn line_without_equals_quotes_the_line() {
        let d = parse("[Unit]\nDescription=x\nthis is junk\n").expect_err("fails");
        assert_eq!(d.line, 3);
        assert_eq!(d.message, "expected 'key=value', got 'this is junk'");
    }

    #[test]
    fn empty_key_is_an_error() {
        let d = parse("[Unit]\n=value\n").expect_err("fails");
        assert_eq!(d.line, 2);
        assert!(d.message.contains("missing key"));
    }

    #[test]
    fn section_helper_filters() {
        let f = parse("[A]\nx=1\n[B]\ny=2\n[A]\nz=3\n").expect("parses");
        let keys: Vec<_> = f.section("A").map(|e| e.key.as_str()).collect();
        assert_eq!(keys, vec!["x", "z"]);
    }

    #[test]
    fn bom_is_ignored() {
        let f = parse("\u{feff}[Unit]\nA=b\n").expect("parses");
        assert_eq!(f.entries.len(), 1);
    }
}
