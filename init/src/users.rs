//! `User=`/`Group=` resolution from /etc/passwd and /etc/group.
//!
//! Keel's binaries are static, so glibc's NSS is not used: the files are read directly, which is also all an
//! appliance OS has. Owns: name → uid/gid/home/shell and supplementary groups. Does not: change credentials.

use std::fs;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("unknown user '{0}' (not in /etc/passwd and not a number)")]
    UnknownUser(String),
    #[error("unknown group '{0}' (not in /etc/group and not a number)")]
    UnknownGroup(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
    pub shell: String,
}

pub fn resolve(user: &str, group: Option<&str>) -> Result<Credentials, UserError> {
    resolve_in(&read("/etc/passwd"), &read("/etc/group"), user, group)
}

fn read(path: &str) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Pure resolution against the text of passwd and group files.
pub fn resolve_in(passwd: &str, group_db: &str, user: &str, group: Option<&str>) -> Result<Credentials, UserError> {
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && (f[0] == user || f[2] == user));
    let mut creds = match entry {
        Some(f) => Credentials {
            name: f[0].to_string(),
            uid: f[2].parse().map_err(|_| UserError::UnknownUser(user.into()))?,
            gid: f[3].parse().map_err(|_| UserError::UnknownUser(user.into()))?,
            groups: Vec::new(),
            home: f[5].to_string(),
            shell: f[6].to_string(),
        },
        None => {
            let uid: u32 = user.parse().map_err(|_| UserError::UnknownUser(user.into()))?;
            Credentials { name: user.into(), uid, gid: uid, groups: Vec::new(), home: "/".into(), shell: "/bin/sh".into() }
        }
    };
    if let Some(g) = group {
        creds.gid = lookup_group(group_db, g)?;
    }
    creds.groups = group_db
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4 && f[3].split(',').any(|m| m == creds.name))
        .filter_map(|f| f[2].parse().ok())
        .chain([creds.gid])
        .collect();
    creds.groups.sort_unstable();
    creds.groups.dedup();
    Ok(creds)
}

fn lookup_group(group_db: &str, g: &str) -> Result<u32, UserError> {
    group_db
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 3 && (f[0] == g || f[2] == g))
        .and_then(|f| f[2].parse().ok())
        .or_else(|| g.parse().ok())
        .ok_or_else(|| UserError::UnknownGroup(g.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\nweb:x:1000:1000::/home/web:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nnogroup:x:65534:\nweb:x:1000:\nadm:x:4:web\n";

    #[test]
    fn resolves_name_home_and_supplementary_groups() {
        let c = resolve_in(PASSWD, GROUP, "web", None).unwrap();
        assert_eq!((c.uid, c.gid, c.home.as_str()), (1000, 1000, "/home/web"));
        assert_eq!(c.groups, vec![4, 1000]);
    }

    #[test]
    fn group_override_and_numeric_ids() {
        let c = resolve_in(PASSWD, GROUP, "nobody", Some("adm")).unwrap();
        assert_eq!((c.uid, c.gid), (65534, 4));
        let n = resolve_in(PASSWD, GROUP, "4242", Some("4243")).unwrap();
        assert_eq!((n.uid, n.gid), (4242, 4243));
    }

    #[test]
    fn unknown_user_and_group_are_named() {
        assert_eq!(resolve_in(PASSWD, GROUP, "ghost", None).unwrap_err().to_string(), "unknown user 'ghost' (not in /etc/passwd and not a number)");
        assert!(resolve_in(PASSWD, GROUP, "web", Some("ghosts")).unwrap_err().to_string().contains("'ghosts'"));
    }
}
