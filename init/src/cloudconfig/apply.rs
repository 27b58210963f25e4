//! Applying a parsed cloud-config to a root directory, idempotently: a file is written only when its content
//! differs, a user is added only when missing, so applying the same config at every boot changes nothing twice.
//!
//! Owns: /etc/hostname, users in /etc/passwd, /etc/group, /etc/shadow, authorized_keys, `write_files`, unit
//! files and drop-ins under /run/keel/units (or /etc/keel/units), and /run/keel/config/ (the `keel:` sections
//! for clusterd, fleet and the updater, as JSON and env files). Does not: start or stop units (it returns the
//! commands) or touch anything else.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{CloudConfig, UnitEntry, User};

#[derive(Debug, Default)]
pub struct Report {
    /// What changed, one line each (for the console).
    pub changed: Vec<String>,
    /// (unit, command) for the supervisor to run once units are reloaded.
    pub commands: Vec<(String, String)>,
    pub errors: Vec<String>,
}

/// Apply `cfg` under `root` ("/" on a machine; a temporary directory in tests).
pub fn apply(cfg: &CloudConfig, root: &Path) -> Report {
    let mut r = Report::default();
    if let Some(h) = &cfg.hostname {
        write_if_changed(&mut r, &root.join("etc/hostname"), format!("{h}\n").as_bytes(), 0o644);
    }
    let mut users = cfg.users.clone();
    if !cfg.ssh_authorized_keys.is_empty() {
        match users.iter_mut().find(|u| u.name == "core") {
            Some(core) => core.ssh_authorized_keys.extend(cfg.ssh_authorized_keys.iter().cloned()),
            None => users.push(User { name: "core".into(), ssh_authorized_keys: cfg.ssh_authorized_keys.clone(), ..User::default() }),
        }
    }
    for u in &users {
        if let Err(e) = ensure_user(&mut r, root, u) {
            r.errors.push(format!("user {}: {e}", u.name));
        }
    }
    for f in &cfg.write_files {
        if let Err(e) = write_file(&mut r, root, f) {
            r.errors.push(format!("write_files {}: {e}", f.path));
        }
    }
    for u in &cfg.keel.units {
        if let Err(e) = write_unit(&mut r, root, u) {
            r.errors.push(format!("unit {}: {e}", u.name));
        }
    }
    write_network_unit(&mut r, root, cfg);
    write_component_config(&mut r, root, cfg);
    r
}

/// `keel.network` becomes a oneshot unit, `keel-network.service`, wanted by default.target and ordered before
/// everything that needs an address (clusterd orders itself after it).
fn write_network_unit(r: &mut Report, root: &Path, cfg: &CloudConfig) {
    if cfg.keel.network.is_empty() {
        return;
    }
    let mut unit = String::from(
        "[Unit]\nDescription=Static network from cloud-config\nBefore=clusterd.service\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\n",
    );
    for n in &cfg.keel.network {
        unit.push_str(&format!("ExecStart=/usr/bin/ip link set dev {} up\n", n.interface));
        unit.push_str(&format!("ExecStart=-/usr/bin/ip addr add {} dev {}\n", n.address, n.interface));
        if let Some(g) = &n.gateway {
            unit.push_str(&format!("ExecStart=-/usr/bin/ip route add default via {g} dev {}\n", n.interface));
        }
    }
    unit.push_str("\n[Install]\nWantedBy=default.target\n");
    let dir = unit_dir(root, true);
    write_if_changed(r, &dir.join("keel-network.service"), unit.as_bytes(), 0o644);
    let wants = dir.join("default.target.wants");
    let link = wants.join("keel-network.service");
    if std::fs::symlink_metadata(&link).is_err() {
        let res = fs::create_dir_all(&wants).and_then(|_| std::os::unix::fs::symlink("../keel-network.service", &link));
        if let Err(e) = res {
            r.errors.push(format!("{}: {e}", link.display()));
        }
    }
}

fn write_if_changed(r: &mut Report, path: &Path, content: &[u8], mode: u32) -> bool {
    if fs::read(path).is_ok_and(|old| old == content) {
        return false;
    }
    let res = path
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|_| atomic_write(path, content, mode));
    match res {
        Ok(()) => {
            r.changed.push(format!("wrote {}", path.display()));
            true
        }
        Err(e) => {
            r.errors.push(format!("{}: {e}", path.display()));
            false
        }
    }
}

/// Write to a temporary file beside `path`, then rename: a crash leaves the old or the new content, never half.
fn atomic_write(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension("keel-tmp");
    fs::write(&tmp, content)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path)
}

fn ensure_user(r: &mut Report, root: &Path, u: &User) -> io::Result<()> {
    let passwd_path = root.join("etc/passwd");
    let passwd = fs::read_to_string(&passwd_path).unwrap_or_default();
    let existing = passwd.lines().find(|l| l.split(':').next() == Some(u.name.as_str())).map(str::to_string);
    let (uid, gid, home) = match existing {
        Some(line) => {
            let f: Vec<&str> = line.split(':').collect();
            let id = |i: usize| f.get(i).and_then(|x| x.parse::<u32>().ok()).unwrap_or(0);
            (id(2), id(3), f.get(5).map_or_else(|| format!("/home/{}", u.name), |h| h.to_string()))
        }
        None => {
            let uid = u.uid.unwrap_or_else(|| next_id(&passwd));
            let home = format!("/home/{}", u.name);
            let shell = u.shell.clone().unwrap_or_else(|| "/bin/sh".into());
            append_line(&passwd_path, &format!("{}:x:{uid}:{uid}::{home}:{shell}", u.name))?;
            append_line(&root.join("etc/group"), &format!("{}:x:{uid}:", u.name))?;
            let hash = u.password_hash.clone().unwrap_or_else(|| "!".into());
            append_line(&root.join("etc/shadow"), &format!("{}:{hash}:19000:0:99999:7:::", u.name))?;
            r.changed.push(format!("added user {} (uid {uid})", u.name));
            (uid, uid, home)
        }
    };
    for g in &u.groups {
        add_to_group(r, root, g, &u.name)?;
    }
    if !u.ssh_authorized_keys.is_empty() {
        let ssh = root.join(home.trim_start_matches('/')).join(".ssh");
        fs::create_dir_all(&ssh)?;
        fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700))?;
        let keys = u.ssh_authorized_keys.join("\n") + "\n";
        let path = ssh.join("authorized_keys");
        write_if_changed(r, &path, keys.as_bytes(), 0o600);
        for p in [ssh.parent().map(Path::to_path_buf), Some(ssh.clone()), Some(path)].into_iter().flatten() {
            let _ = std::os::unix::fs::chown(&p, Some(uid), Some(gid));
        }
    }
    Ok(())
}

fn next_id(passwd: &str) -> u32 {
    passwd
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse::<u32>().ok())
        .filter(|id| (1000..60000).contains(id))
        .max()
        .map_or(1000, |m| m + 1)
}

fn append_line(path: &Path, line: &str) -> io::Result<()> {
    use std::io::Write;
    if let Some(d) = path.parent() {
        fs::create_dir_all(d)?;
    }
    let mut f = fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "{line}")
}

fn add_to_group(r: &mut Report, root: &Path, group: &str, user: &str) -> io::Result<()> {
    let path = root.join("etc/group");
    let text = fs::read_to_string(&path).unwrap_or_default();
    let mut found = false;
    let mut changed = false;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            let mut f: Vec<String> = l.split(':').map(str::to_string).collect();
            if f.first().map(String::as_str) == Some(group) && f.len() >= 4 {
                found = true;
                let members: Vec<&str> = f[3].split(',').filter(|m| !m.is_empty()).collect();
                if !members.contains(&user) {
                    f[3] = members.into_iter().chain([user]).collect::<Vec<_>>().join(",");
                    changed = true;
                }
            }
            f.join(":")
        })
        .collect();
    if !found {
        r.errors.push(format!("group {group} does not exist; {user} not added to it"));
        return Ok(());
    }
    if changed {
        write_if_changed(r, &path, (lines.join("\n") + "\n").as_bytes(), 0o644);
    }
    Ok(())
}

fn write_file(r: &mut Report, root: &Path, f: &super::WriteFile) -> Result<(), String> {
    let content = match f.encoding.as_deref() {
        None | Some("text/plain") => f.content.clone().into_bytes(),
        Some("b64" | "base64") => decode_b64(&f.content).ok_or("content is not valid base64")?,
        Some(other) => return Err(format!("encoding {other:?} is not supported (use b64)")),
    };
    let mode = f.permissions.as_deref().map_or(Ok(0o644), |p| u32::from_str_radix(p.trim_start_matches("0o"), 8))
        .map_err(|_| "permissions must be octal".to_string())?;
    let path = root.join(f.path.trim_start_matches('/'));
    let content = if f.append {
        let old = fs::read(&path).unwrap_or_default();
        if old.ends_with(&content) {
            return Ok(());
        }
        [old, content].concat()
    } else {
        content
    };
    if write_if_changed(r, &path, &content, mode) {
        if let Some((user, group)) = f.owner.as_deref().and_then(|o| o.split_once(':').or(Some((o, o)))) {
            let uid = crate::users::resolve_in(&read(root, "etc/passwd"), &read(root, "etc/group"), user, Some(group))
                .map_err(|e| e.to_string())?;
            std::os::unix::fs::chown(&path, Some(uid.uid), Some(uid.gid)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn read(root: &Path, rel: &str) -> String {
    fs::read_to_string(root.join(rel)).unwrap_or_default()
}

fn unit_dir(root: &Path, runtime: bool) -> PathBuf {
    root.join(if runtime { "run/keel/units" } else { "etc/keel/units" })
}

fn write_unit(r: &mut Report, root: &Path, u: &UnitEntry) -> io::Result<()> {
    let dir = unit_dir(root, u.runtime);
    fs::create_dir_all(&dir)?;
    let path = dir.join(&u.name);
    if u.mask {
        if fs::read_link(&path).ok().as_deref() != Some(Path::new("/dev/null")) {
            let _ = fs::remove_file(&path);
            std::os::unix::fs::symlink("/dev/null", &path)?;
            r.changed.push(format!("masked {}", u.name));
        }
        return Ok(());
    }
    if let Some(content) = &u.content {
        write_if_changed(r, &path, content.as_bytes(), 0o644);
    }
    for d in &u.drop_ins {
        let p = dir.join(format!("{}.d", u.name)).join(&d.name);
        write_if_changed(r, &p, d.content.as_bytes(), 0o644);
    }
    if u.enable {
        let text = u.content.clone().unwrap_or_else(|| read_unit_anywhere(root, &u.name));
        for target in wanted_by(&text) {
            let wants = dir.join(format!("{target}.wants"));
            fs::create_dir_all(&wants)?;
            let link = wants.join(&u.name);
            if fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("../{}", u.name), &link)?;
                r.changed.push(format!("enabled {} (wanted by {target})", u.name));
            }
        }
    }
    if let Some(c) = &u.command {
        r.commands.push((u.name.clone(), c.clone()));
    }
    Ok(())
}

fn read_unit_anywhere(root: &Path, name: &str) -> String {
    ["etc/keel/units", "run/keel/units", "usr/lib/keel/units"]
        .iter()
        .find_map(|d| fs::read_to_string(root.join(d).join(name)).ok())
        .unwrap_or_default()
}

fn wanted_by(unit_text: &str) -> Vec<String> {
    unit_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("WantedBy="))
        .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// `NAME=value` lines of one env file.
type EnvPairs = Vec<(String, String)>;

/// `/run/keel/config/cloud-config.json` (everything, for components) and one env file per `keel:` section
/// (`clusterd.env`: `NAME=node1`, `INITIAL_CLUSTER=…`) for units to load with `EnvironmentFile=`.
fn write_component_config(r: &mut Report, root: &Path, cfg: &CloudConfig) {
    let dir = root.join("run/keel/config");
    if let Ok(json) = serde_json::to_vec_pretty(cfg) {
        write_if_changed(r, &dir.join("cloud-config.json"), &json, 0o600);
    }
    let sections: [(&str, Option<EnvPairs>); 4] = [
        ("clusterd", cfg.keel.clusterd.as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())),
        ("fleet", cfg.keel.fleet.as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())),
        ("update", cfg.keel.update.as_ref().map(yaml_scalars)),
        ("locksmith", cfg.keel.locksmith.as_ref().map(yaml_scalars)),
    ];
    for (name, kv) in sections {
        let Some(kv) = kv else { continue };
        let text: String = kv.iter().map(|(k, v)| format!("{}={}\n", k.to_uppercase(), shell_quote(v))).collect();
        write_if_changed(r, &dir.join(format!("{name}.env")), text.as_bytes(), 0o600);
    }
}

fn yaml_scalars(m: &std::collections::BTreeMap<String, serde_yaml::Value>) -> Vec<(String, String)> {
    m.iter()
        .filter_map(|(k, v)| {
            let s = match v {
                serde_yaml::Value::String(s) => s.clone(),
                serde_yaml::Value::Number(n) => n.to_string(),
                serde_yaml::Value::Bool(b) => b.to_string(),
                other => serde_json::to_string(other).ok()?,
            };
            Some((k.clone(), s))
        })
        .collect()
}

fn shell_quote(v: &str) -> String {
    if v.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:,=@+".contains(c)) {
        v.to_string()
    } else {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len().max(1)]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Vars};
    use super::*;

    const CFG: &str = "#cloud-config\nhostname: node1\nusers:\n  - name: ops\n    ssh_authorized_keys: [ssh-ed25519 AAAA ops]\nwrite_files:\n  - path: /etc/motd\n    content: hello\n  - path: /etc/b64\n    encoding: b64\n    content: aGk=\nkeel:\n  network:\n    - address: 10.77.0.11/24\n      gateway: 10.77.0.1\n  clusterd:\n    name: node1\n  units:\n    - name: web.service\n      enable: true\n      command: start\n      content: |\n        [Service]\n        ExecStart=/bin/sleep 1\n        [Install]\n        WantedBy=default.target\n      drop_ins:\n        - name: 10-env.conf\n          content: \"[Service]\\nEnvironment=A=1\\n\"\n";

    #[test]
    fn applying_twice_changes_nothing_the_second_time() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        let (cfg, problems) = parse(CFG, &Vars::new());
        assert!(problems.is_empty(), "{problems:?}");
        let first = apply(&cfg, root.path());
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        assert_eq!(first.commands, vec![("web.service".to_string(), "start".to_string())]);
        let r = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(r("etc/hostname"), "node1\n");
        assert_eq!(r("etc/motd"), "hello");
        assert_eq!(r("etc/b64"), "hi");
        assert!(r("etc/passwd").contains("ops:x:1000:1000::/home/ops:/bin/sh"));
        assert_eq!(r("home/ops/.ssh/authorized_keys"), "ssh-ed25519 AAAA ops\n");
        assert!(root.path().join("run/keel/units/default.target.wants/web.service").exists());
        assert!(r("run/keel/units/web.service.d/10-env.conf").contains("A=1"));
        assert_eq!(r("run/keel/config/clusterd.env"), "NAME=node1\n");
        assert!(r("run/keel/units/keel-network.service").contains("ip addr add 10.77.0.11/24 dev eth0"));
        assert!(root.path().join("run/keel/units/default.target.wants/keel-network.service").exists());
        let second = apply(&cfg, root.path());
        assert!(second.changed.is_empty(), "idempotent: {:?}", second.changed);
        assert_eq!(r("etc/passwd").lines().filter(|l| l.starts_with("ops:")).count(), 1);
    }

    #[test]
    fn base64_decodes() {
        assert_eq!(decode_b64("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
        assert!(decode_b64("!!!").is_none());
    }
}
