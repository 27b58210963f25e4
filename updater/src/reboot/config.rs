//! The reboot manager's settings from cloud-config, as init writes them to `/run/keel/config/`.
//!
//! Owns: reading `clusterd.env` (where the local clusterd listens), `update.env` (`REBOOT_STRATEGY`, `REBOOT_WINDOWS`), `locksmith.env` (`GROUP`, `MAX`,
//! `ENDPOINT`, and CoreOS's single `WINDOW_START` + `WINDOW_LENGTH`) and the `reboot_windows` list of
//! `cloud-config.json`, into [`FileSettings`]. Missing files are no settings; a malformed value is an error
//! naming the file and key. Does not: apply flags (the binary lets flags win) or act.

use std::collections::BTreeMap;
use std::path::Path;

use super::window::{Window, WindowSpec};

/// What cloud-config said, before flags are applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileSettings {
    pub strategy: Option<String>,
    /// Windows and the text each came from.
    pub windows: Vec<(String, Window)>,
    pub group: Option<String>,
    pub max: Option<i64>,
    pub endpoints: Option<String>,
}

/// Parses an env file init wrote (`KEY=value`, values possibly double-quoted with `\"` and `\\` escapes).
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), unquote(v.trim())))
        .collect()
}

fn unquote(v: &str) -> String {
    let Some(inner) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return v.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A window list entry: `{days, start, length, timezone}` or the compact string `"Mon 04:00 1h UTC"`.
pub fn parse_windows(v: &serde_json::Value) -> Result<Vec<(String, Window)>, String> {
    let items = match v {
        serde_json::Value::Array(a) => a.clone(),
        serde_json::Value::Null => Vec::new(),
        other => vec![other.clone()],
    };
    items
        .iter()
        .map(|item| match item {
            serde_json::Value::String(s) => Window::parse(s)
                .map(|w| (s.trim().to_string(), w))
                .map_err(|e| e.to_string()),
            obj => {
                let spec: WindowSpec = serde_json::from_value(obj.clone()).map_err(|e| {
                    format!("reboot window {obj}: {e} (expected {{days, start, length, timezone}})")
                })?;
                let text = format!(
                    "{} {} {} {}",
                    spec.days, spec.start, spec.length, spec.timezone
                );
                Window::from_spec(&spec)
                    .map(|w| (text.trim().to_string(), w))
                    .map_err(|e| e.to_string())
            }
        })
        .collect()
}

fn read_env(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .map(|t| parse_env(&t))
        .unwrap_or_default()
}

/// The client URLs of the local clusterd from `clusterd.env` (`ADVERTISE_CLIENT_URLS`, else
/// `LISTEN_CLIENT_URLS` with a wildcard address replaced by loopback), then `http://127.0.0.1:2379`.
pub fn clusterd_client_urls(dir: &Path) -> Vec<String> {
    let env = read_env(&dir.join("clusterd.env"));
    let listed = env
        .get("ADVERTISE_CLIENT_URLS")
        .or_else(|| env.get("LISTEN_CLIENT_URLS"))
        .cloned()
        .unwrap_or_default();
    let mut out: Vec<String> = listed
        .split(',')
        .map(|u| {
            u.trim()
                .replace("://0.0.0.0", "://127.0.0.1")
                .replace("://[::]", "://127.0.0.1")
        })
        .filter(|u| u.starts_with("http://"))
        .collect();
    let local = "http://127.0.0.1:2379".to_string();
    if !out.contains(&local) {
        out.push(local);
    }
    out
}

/// Reads `dir` (normally `/run/keel/config`).
pub fn load(dir: &Path) -> Result<FileSettings, String> {
    let update = read_env(&dir.join("update.env"));
    let locksmith = read_env(&dir.join("locksmith.env"));
    let mut s = FileSettings {
        strategy: update
            .get("REBOOT_STRATEGY")
            .or_else(|| locksmith.get("REBOOT_STRATEGY"))
            .cloned(),
        group: locksmith.get("GROUP").cloned(),
        endpoints: locksmith
            .get("ENDPOINT")
            .or_else(|| locksmith.get("ENDPOINTS"))
            .cloned(),
        ..FileSettings::default()
    };
    if let Some(m) = locksmith.get("MAX") {
        let n = m.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            format!(
                "{}: MAX={m:?} is not a number of 0 or more",
                dir.join("locksmith.env").display()
            )
        })?;
        s.max = Some(n);
    }
    let json: Option<serde_json::Value> = std::fs::read(dir.join("cloud-config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let listed = json
        .as_ref()
        .map(|j| &j["keel"]["update"]["reboot_windows"])
        .filter(|v| !v.is_null());
    if let Some(v) = listed {
        s.windows = parse_windows(v)
            .map_err(|e| format!("{}: {e}", dir.join("cloud-config.json").display()))?;
    } else if let Some(text) = update.get("REBOOT_WINDOWS") {
        let v =
            serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.clone()));
        s.windows =
            parse_windows(&v).map_err(|e| format!("{}: {e}", dir.join("update.env").display()))?;
    }
    if let (Some(start), Some(len)) = (
        locksmith.get("WINDOW_START"),
        locksmith.get("WINDOW_LENGTH"),
    ) {
        let text = format!("{start} {len}");
        let w = Window::parse(&text)
            .map_err(|e| format!("{}: {e}", dir.join("locksmith.env").display()))?;
        s.windows.push((text, w));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_as_init_writes_them() {
        let env = parse_env("REBOOT_STRATEGY=etcd-lock\nGROUP=default\nREBOOT_WINDOWS=\"[{\\\"days\\\":\\\"Mon\\\",\\\"start\\\":\\\"04:00\\\",\\\"length\\\":\\\"1h\\\"}]\"\n");
        assert_eq!(env["REBOOT_STRATEGY"], "etcd-lock");
        assert_eq!(
            env["REBOOT_WINDOWS"],
            r#"[{"days":"Mon","start":"04:00","length":"1h"}]"#
        );
    }

    #[test]
    fn load_reads_all_three_files() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            d.path().join("update.env"),
            "REBOOT_STRATEGY=etcd-lock\nSERVER=http://x/\n",
        )
        .expect("w");
        std::fs::write(
            d.path().join("locksmith.env"),
            "MAX=2\nGROUP=canary\nWINDOW_START=\"Thu 23:00\"\nWINDOW_LENGTH=1h30m\n",
        )
        .expect("w");
        std::fs::write(
            d.path().join("cloud-config.json"),
            r#"{"keel":{"update":{"reboot_windows":[{"days":"Sat,Sun","start":"02:00","length":"2h","timezone":"+01:00"},"Wed 03:00 1h"]}}}"#,
        )
        .expect("w");
        let s = load(d.path()).expect("load");
        assert_eq!(s.strategy.as_deref(), Some("etcd-lock"));
        assert_eq!(s.max, Some(2));
        assert_eq!(s.group.as_deref(), Some("canary"));
        let texts: Vec<&str> = s.windows.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            texts,
            ["Sat,Sun 02:00 2h +01:00", "Wed 03:00 1h", "Thu 23:00 1h30m"]
        );
        std::fs::write(d.path().join("locksmith.env"), "MAX=lots\n").expect("w");
        assert!(load(d.path()).unwrap_err().contains("MAX=\"lots\""));
        assert_eq!(load(&d.path().join("none")), Ok(FileSettings::default()));
    }

    #[test]
    fn clusterd_urls_come_from_its_env_file() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(clusterd_client_urls(d.path()), ["http://127.0.0.1:2379"]);
        std::fs::write(
            d.path().join("clusterd.env"),
            "LISTEN_CLIENT_URLS=http://0.0.0.0:2379,http://10.0.0.1:2379\n",
        )
        .expect("w");
        assert_eq!(
            clusterd_client_urls(d.path()),
            ["http://127.0.0.1:2379", "http://10.0.0.1:2379"]
        );
        std::fs::write(
            d.path().join("clusterd.env"),
            "ADVERTISE_CLIENT_URLS=http://10.0.0.2:2379\n",
        )
        .expect("w");
        assert_eq!(
            clusterd_client_urls(d.path()),
            ["http://10.0.0.2:2379", "http://127.0.0.1:2379"]
        );
    }
}
