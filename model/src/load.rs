//! Finding unit files: search order (first directory wins: /etc over /run over /usr/lib), templates
//! (`web@1.service` from `web@.service`), drop-ins (`name.d/*.conf`, `prefix@.kind.d/*.conf`, lexical order), and
//! `*.wants/` / `*.requires/` directories created by `enable`.
//!
//! Owns: reading unit files. Does not: act on units.
//!
//! Rules:
//! - A unit file `N` is taken from the first directory that has an entry named `N`. If that entry is a
//!   symlink to `/dev/null` (or resolves to a character device) or an empty file, the unit is masked, even if
//!   a later directory has a real file. A dangling symlink is reported as a warning and skipped.
//! - A unit file that is a symlink to another file is read through, under the link's name (aliases are not
//!   merged into one unit).
//! - An instance `p@i.kind` without its own file uses the template `p@.kind` (found by the same rules; a
//!   masked instance name or a masked template masks the instance). Templates are never units themselves.
//! - Drop-ins: every `*.conf` in `<template>.d/` (instances only) and `<name>.d/` of every directory. For
//!   each (file name, level) the first directory wins (a masked or empty `.conf` there hides later ones).
//!   They are applied sorted by file name; for equal file names the template's drop-in comes before the
//!   instance's.
//! - `<name>.wants/` and `<name>.requires/` (and, for instances, the template's) add `Wants=`/`Requires=`
//!   entries named after the directory entries (symlinks or plain files; the target is not read). The same
//!   entry name in an earlier directory overrides later ones; a symlink to `/dev/null` removes it. `[Install]`
//!   is not applied here: enabling a unit means creating these links (see [`enable_link_dir`]).
//! - `load_all` loads every non-template unit file name in any directory, then every unit named by the
//!   `Requires=`, `Wants=` or `BindsTo=` of a loaded unit (this is how instances such as `web@3.service`
//!   get loaded). A missing `Requires=`/`BindsTo=` target is a warning; a missing `Wants=` target is not.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::ini::IniFile;
use crate::name::{UnitName, OTHER_SYSTEMD_TYPES};
use crate::{Diagnostic, Severity, Unit};

/// The directories units are searched in, highest priority first.
pub const DEFAULT_DIRS: [&str; 3] = ["/etc/keel/units", "/run/keel/units", "/usr/lib/keel/units"];

#[derive(Debug, Clone)]
pub struct UnitLoader {
    pub dirs: Vec<PathBuf>,
}

/// The outcome of loading every unit: the usable units and every diagnostic (errors made a unit unusable,
/// warnings did not).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadReport {
    pub units: BTreeMap<String, Unit>,
    pub diagnostics: Vec<Diagnostic>,
    /// Units that exist but are masked (symlink to `/dev/null` or empty file); they are not in `units`.
    pub masked: BTreeSet<String>,
}

/// `<dir>/<unit>.<kind>`, the directory whose entries add `Wants=` (`kind` = `"wants"`) or `Requires=`
/// (`kind` = `"requires"`) to `unit`. Enabling `a.service` for `multi-user.target` means creating
/// `enable_link_dir(dir, "multi-user.target", "wants")/a.service`.
pub fn enable_link_dir(dir: &Path, unit: &str, kind: &str) -> PathBuf {
    dir.join(format!("{unit}.{kind}"))
}

/// What one directory entry is.
enum Probe {
    Missing,
    Masked,
    File,
    /// A dangling symlink or unreadable entry, with the reason.
    Broken(String),
}

fn links_to_dev_null(path: &Path) -> bool {
    fs::read_link(path).is_ok_and(|t| t == Path::new("/dev/null"))
}

fn probe(path: &Path) -> Probe {
    if fs::symlink_metadata(path).is_err() {
        return Probe::Missing;
    }
    if links_to_dev_null(path) {
        return Probe::Masked;
    }
    match fs::metadata(path) {
        Err(e) => Probe::Broken(e.to_string()),
        Ok(m) if m.is_dir() => Probe::Missing,
        Ok(m) if m.file_type().is_char_device() || m.len() == 0 => Probe::Masked,
        Ok(_) => Probe::File,
    }
}

/// Where a unit's main file is.
enum Located {
    File(PathBuf),
    Masked(PathBuf),
    NotFound,
}

/// The result of loading one unit (diagnostics travel separately).
enum Outcome {
    Loaded(Box<Unit>),
    Masked(PathBuf),
    NotFound,
    Failed,
}

fn diag(file: &Path, line: usize, severity: Severity, message: String) -> Diagnostic {
    Diagnostic {
        file: file.to_path_buf(),
        line,
        severity,
        message,
    }
}

/// UTF-8 names of the entries of `dir` (none when it does not exist).
fn entry_names(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

fn read_ini(path: &Path) -> Result<IniFile, Diagnostic> {
    let text = fs::read_to_string(path).map_err(|e| {
        diag(
            path,
            0,
            Severity::Error,
            format!("cannot read unit file: {e}"),
        )
    })?;
    IniFile::parse(path, &text)
}

impl UnitLoader {
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        UnitLoader { dirs }
    }

    /// `/etc/keel/units`, `/run/keel/units`, `/usr/lib/keel/units` (first wins).
    pub fn default_dirs() -> Vec<PathBuf> {
        DEFAULT_DIRS.iter().map(PathBuf::from).collect()
    }

    /// A loader over [`UnitLoader::default_dirs`].
    pub fn system() -> Self {
        UnitLoader::new(UnitLoader::default_dirs())
    }

    fn dirs_list(&self) -> String {
        let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        dirs.join(", ")
    }

    /// Load one unit (instantiating its template when it has no file of its own). Warnings are dropped;
    /// use [`UnitLoader::load_unit`] to keep them.
    pub fn load(&self, name: &str, hostname: &str) -> Result<Unit, Vec<Diagnostic>> {
        let (unit, diags) = self.load_unit(name, hostname);
        unit.ok_or(diags)
    }

    /// Load one unit; returns it when usable, and every diagnostic (a masked or missing unit is an error).
    pub fn load_unit(&self, name: &str, hostname: &str) -> (Option<Unit>, Vec<Diagnostic>) {
        let parsed = match UnitName::parse(name) {
            Ok(n) => n,
            Err(m) => return (None, vec![diag(Path::new(name), 0, Severity::Error, m)]),
        };
        let mut diags = Vec::new();
        let outcome = self.load_name(&parsed, hostname, &mut diags);
        let unit = match outcome {
            Outcome::Loaded(unit) => Some(*unit),
            Outcome::Masked(path) => {
                diags.push(diag(
                    &path,
                    0,
                    Severity::Error,
                    format!("unit {name} is masked"),
                ));
                None
            }
            Outcome::NotFound => {
                let message = format!("unit {name} not found in {}", self.dirs_list());
                diags.push(diag(Path::new(name), 0, Severity::Error, message));
                None
            }
            Outcome::Failed => None,
        };
        (unit, diags)
    }

    /// Load every unit (see the module documentation for which ones). A bad unit only produces
    /// diagnostics; every other unit still loads.
    pub fn load_all(&self, hostname: &str) -> LoadReport {
        let mut report = LoadReport::default();
        let mut queue: VecDeque<String> = self
            .list_unit_names(&mut report.diagnostics)
            .into_iter()
            .collect();
        let mut seen = BTreeSet::new();
        let mut not_found = BTreeSet::new();
        while let Some(name) = queue.pop_front() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let Ok(parsed) = UnitName::parse(&name) else {
                continue;
            };
            match self.load_name(&parsed, hostname, &mut report.diagnostics) {
                Outcome::Loaded(unit) => {
                    let deps = unit
                        .requires
                        .iter()
                        .chain(&unit.wants)
                        .chain(&unit.binds_to);
                    queue.extend(deps.filter(|d| !seen.contains(*d)).cloned());
                    report.units.insert(name, *unit);
                }
                Outcome::Masked(_) => {
                    report.masked.insert(name);
                }
                Outcome::NotFound => {
                    not_found.insert(name);
                }
                Outcome::Failed => {}
            }
        }
        self.report_missing_hard_deps(&mut report, &not_found);
        report
    }

    fn report_missing_hard_deps(&self, report: &mut LoadReport, not_found: &BTreeSet<String>) {
        for unit in report.units.values() {
            let file = unit.sources.first().cloned().unwrap_or_default();
            let hard = [("Requires", &unit.requires), ("BindsTo", &unit.binds_to)];
            for (key, list) in hard {
                for dep in list.iter().filter(|d| not_found.contains(*d)) {
                    let message =
                        format!("{key}={dep}: unit {dep} not found in {}", self.dirs_list());
                    report
                        .diagnostics
                        .push(diag(&file, 0, Severity::Warning, message));
                }
            }
        }
    }

    /// Every non-template unit file name in any directory; other systemd unit types and invalid
    /// `.service`/`.target` names are reported as warnings.
    fn list_unit_names(&self, diags: &mut Vec<Diagnostic>) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for dir in &self.dirs {
            for file_name in entry_names(dir) {
                let path = dir.join(&file_name);
                if path.is_dir() {
                    continue;
                }
                match UnitName::parse(&file_name) {
                    Ok(n) if n.is_template() => {}
                    Ok(n) => {
                        names.insert(n.full);
                    }
                    Err(m) => {
                        if let Some(message) = unusable_file_message(&file_name, &m) {
                            diags.push(diag(&path, 0, Severity::Warning, message));
                        }
                    }
                }
            }
        }
        names
    }

    fn locate(&self, file_name: &str, diags: &mut Vec<Diagnostic>) -> Located {
        for dir in &self.dirs {
            let path = dir.join(file_name);
            match probe(&path) {
                Probe::Missing => {}
                Probe::Masked => return Located::Masked(path),
                Probe::File => return Located::File(path),
                Probe::Broken(why) => {
                    diags.push(diag(
                        &path,
                        0,
                        Severity::Warning,
                        format!("ignoring unit file: {why}"),
                    ));
                }
            }
        }
        Located::NotFound
    }

    /// The main file of `name`: its own, or for an instance its template's.
    fn locate_unit(&self, name: &UnitName, diags: &mut Vec<Diagnostic>) -> Located {
        let own = self.locate(&name.full, diags);
        match (&own, name.template_name()) {
            (Located::NotFound, Some(template)) if name.is_instance() => {
                self.locate(&template, diags)
            }
            _ => own,
        }
    }

    fn load_name(&self, name: &UnitName, hostname: &str, diags: &mut Vec<Diagnostic>) -> Outcome {
        if name.is_template() {
            let message = format!(
                "unit {} is a template; load an instance such as {}",
                name.full,
                example(name)
            );
            diags.push(diag(Path::new(&name.full), 0, Severity::Error, message));
            return Outcome::Failed;
        }
        let main = match self.locate_unit(name, diags) {
            Located::File(path) => path,
            Located::Masked(path) => return Outcome::Masked(path),
            Located::NotFound => return Outcome::NotFound,
        };
        let paths: Vec<PathBuf> = std::iter::once(main)
            .chain(self.dropin_paths(name))
            .collect();
        let mut files = Vec::with_capacity(paths.len());
        for path in &paths {
            match read_ini(path) {
                Ok(f) => files.push(f),
                Err(d) => diags.push(d),
            }
        }
        if files.len() != paths.len() {
            return Outcome::Failed;
        }
        let (unit, unit_diags) = Unit::from_ini(name.clone(), &files, hostname);
        diags.extend(unit_diags);
        match unit {
            Some(mut unit) => {
                self.add_link_deps(&mut unit, diags);
                Outcome::Loaded(Box::new(unit))
            }
            None => Outcome::Failed,
        }
    }

    /// Directory names searched for `name`'s extra files (`<template><suffix>` first for instances).
    fn own_and_template(name: &UnitName, suffix: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(template) = name.template_name().filter(|_| name.is_instance()) {
            out.push(format!("{template}{suffix}"));
        }
        out.push(format!("{}{suffix}", name.full));
        out
    }

    /// The drop-ins to apply, in order (see the module documentation).
    fn dropin_paths(&self, name: &UnitName) -> Vec<PathBuf> {
        let levels = UnitLoader::own_and_template(name, ".d");
        let mut chosen: BTreeMap<(String, usize), Option<PathBuf>> = BTreeMap::new();
        for dir in &self.dirs {
            for (level, sub) in levels.iter().enumerate() {
                let dropin_dir = dir.join(sub);
                for file_name in entry_names(&dropin_dir)
                    .into_iter()
                    .filter(|n| n.ends_with(".conf"))
                {
                    let path = dropin_dir.join(&file_name);
                    chosen
                        .entry((file_name, level))
                        .or_insert_with(|| matches!(probe(&path), Probe::File).then_some(path));
                }
            }
        }
        chosen.into_values().flatten().collect()
    }

    /// Add the entries of `.wants/` and `.requires/` directories to the unit's dependencies.
    fn add_link_deps(&self, unit: &mut Unit, diags: &mut Vec<Diagnostic>) {
        for (kind, key) in [("wants", "Wants"), ("requires", "Requires")] {
            let names = self.link_entries(&unit.name, kind, key, diags);
            let list = if kind == "wants" {
                &mut unit.wants
            } else {
                &mut unit.requires
            };
            for n in names {
                if !list.contains(&n) {
                    list.push(n);
                }
            }
        }
    }

    fn link_entries(
        &self,
        name: &UnitName,
        kind: &str,
        key: &str,
        diags: &mut Vec<Diagnostic>,
    ) -> Vec<String> {
        let subs = UnitLoader::own_and_template(name, &format!(".{kind}"));
        // Entry name → (path, masked); the first directory wins.
        let mut chosen: BTreeMap<String, (PathBuf, bool)> = BTreeMap::new();
        for dir in &self.dirs {
            for sub in &subs {
                let link_dir = dir.join(sub);
                for entry in entry_names(&link_dir) {
                    let path = link_dir.join(&entry);
                    chosen.entry(entry).or_insert_with(|| {
                        let masked = links_to_dev_null(&path);
                        (path, masked)
                    });
                }
            }
        }
        let mut out = Vec::new();
        for (entry, (path, masked)) in chosen {
            let message = match UnitName::parse(&entry) {
                _ if masked => continue,
                Ok(n) if n.is_template() => {
                    format!(
                        "{key}= on template {entry} ignored: link an instance such as {}",
                        example(&n)
                    )
                }
                Ok(n) => {
                    out.push(n.full);
                    continue;
                }
                Err(m) => format!("{key}= entry ignored: {m}"),
            };
            diags.push(diag(&path, 0, Severity::Warning, message));
        }
        out
    }
}

/// `web@.service` → `web@1.service`, for messages.
fn example(template: &UnitName) -> String {
    format!("{}@1.{}", template.prefix, template.kind.suffix())
}

/// Why a directory entry that is not a valid unit name is worth a warning; `None` for unrelated files.
fn unusable_file_message(file_name: &str, parse_error: &str) -> Option<String> {
    let suffix = file_name.rsplit_once('.').map(|(_, s)| s)?;
    if OTHER_SYSTEMD_TYPES.contains(&suffix) {
        return Some(format!(
            "ignoring {file_name}: .{suffix} units are not supported by Keel"
        ));
    }
    if suffix == "service" || suffix == "target" {
        return Some(format!("ignoring {file_name}: {parse_error}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const SVC: &str = "[Service]\nExecStart=/bin/true\n";

    /// Three unit directories standing in for /etc, /run and /usr/lib.
    struct Tree {
        _tmp: tempfile::TempDir,
        dirs: Vec<PathBuf>,
    }

    impl Tree {
        fn new() -> Tree {
            let tmp = tempfile::tempdir().expect("tempdir");
            let dirs: Vec<PathBuf> = ["etc", "run", "usr"]
                .iter()
                .map(|d| tmp.path().join(d))
                .collect();
            for d in &dirs {
                fs::create_dir_all(d).expect("mkdir");
            }
            Tree { _tmp: tmp, dirs }
        }

        /// Write `rel` (may contain subdirectories) under dir `i`.
        fn write(&self, i: usize, rel: &str, text: &str) -> PathBuf {
            let path = self.dirs[i].join(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).expect("mkdir");
            }
            fs::write(&path, text).expect("write");
            path
        }

        fn link(&self, i: usize, rel: &str, target: &str) -> PathBuf {
            let path = self.dirs[i].join(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).expect("mkdir");
            }
            symlink(target, &path).expect("symlink");
            path
        }

        fn loader(&self) -> UnitLoader {
            UnitLoader::new(self.dirs.clone())
        }

        fn load(&self, name: &str) -> Unit {
            self.loader()
                .load(name, "node1")
                .unwrap_or_else(|d| panic!("{name}: {d:?}"))
        }

        fn load_err(&self, name: &str) -> Vec<Diagnostic> {
            match self.loader().load(name, "node1") {
                Ok(u) => panic!("{name} loaded: {u:?}"),
                Err(d) => d,
            }
        }
    }

    fn exec_start(u: &Unit) -> Vec<Vec<String>> {
        u.service
            .as_ref()
            .map(|s| s.exec_start.iter().map(|c| c.argv.clone()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn default_dirs_order() {
        assert_eq!(
            UnitLoader::default_dirs(),
            vec![
                PathBuf::from("/etc/keel/units"),
                PathBuf::from("/run/keel/units"),
                PathBuf::from("/usr/lib/keel/units")
            ]
        );
        assert_eq!(UnitLoader::system().dirs, UnitLoader::default_dirs());
    }

    #[test]
    fn loads_a_unit_and_records_its_source() {
        let t = Tree::new();
        let p = t.write(
            2,
            "a.service",
            "[Unit]\nDescription=A\n[Service]\nExecStart=/bin/a\n",
        );
        let u = t.load("a.service");
        assert_eq!(u.description, "A");
        assert_eq!(u.sources, vec![p]);
    }

    #[test]
    fn earlier_directory_wins() {
        let t = Tree::new();
        let etc = t.write(0, "a.service", "[Service]\nExecStart=/bin/etc\n");
        t.write(
            2,
            "a.service",
            "[Service]\nExecStart=/bin/usr\nUser=ignored\n",
        );
        let u = t.load("a.service");
        assert_eq!(exec_start(&u), vec![vec!["/bin/etc".to_string()]]);
        assert_eq!(u.sources, vec![etc]);
        assert_eq!(u.service.and_then(|s| s.user), None, "files are not merged");
    }

    #[test]
    fn dev_null_symlink_masks() {
        let t = Tree::new();
        t.write(2, "a.service", SVC);
        let mask = t.link(0, "a.service", "/dev/null");
        let d = t.load_err("a.service");
        assert_eq!(
            (d[0].file.clone(), d[0].message.as_str()),
            (mask, "unit a.service is masked")
        );
        let report = t.loader().load_all("h");
        assert!(report.units.is_empty());
        assert!(report.masked.contains("a.service"));
        assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
    }

    #[test]
    fn empty_file_masks() {
        let t = Tree::new();
        t.write(2, "a.service", SVC);
        t.write(1, "a.service", "");
        assert!(t.load_err("a.service")[0].message.contains("masked"));
    }

    #[test]
    fn not_found_lists_the_directories() {
        let t = Tree::new();
        let d = t.load_err("nope.service");
        let dirs: Vec<String> = t.dirs.iter().map(|d| d.display().to_string()).collect();
        assert_eq!(
            d[0].message,
            format!("unit nope.service not found in {}", dirs.join(", "))
        );
        assert_eq!(d[0].severity, Severity::Error);
    }

    #[test]
    fn invalid_name_and_template_cannot_be_loaded() {
        let t = Tree::new();
        t.write(0, "web@.service", SVC);
        assert!(t.load_err("bad name.service")[0]
            .message
            .contains("invalid character"));
        assert!(t.load_err("web@.service")[0]
            .message
            .contains("is a template"));
    }

    #[test]
    fn template_instantiation_expands_instance() {
        let t = Tree::new();
        let tpl = t.write(
            2,
            "web@.service",
            "[Unit]\nDescription=Web %i\n[Service]\nExecStart=/bin/web --port=%i\n",
        );
        let u = t.load("web@8080.service");
        assert_eq!(u.name.full, "web@8080.service");
        assert_eq!(u.description, "Web 8080");
        assert_eq!(
            exec_start(&u),
            vec![vec!["/bin/web".to_string(), "--port=8080".to_string()]]
        );
        assert_eq!(u.sources, vec![tpl]);
    }

    #[test]
    fn instance_file_wins_over_template() {
        let t = Tree::new();
        t.write(0, "web@.service", "[Service]\nExecStart=/bin/template\n");
        t.write(2, "web@1.service", "[Service]\nExecStart=/bin/own\n");
        assert_eq!(
            exec_start(&t.load("web@1.service")),
            vec![vec!["/bin/own".to_string()]]
        );
        assert_eq!(
            exec_start(&t.load("web@2.service")),
            vec![vec!["/bin/template".to_string()]]
        );
    }

    #[test]
    fn masked_template_masks_instances() {
        let t = Tree::new();
        t.write(2, "web@.service", SVC);
        t.link(0, "web@.service", "/dev/null");
        assert!(t.load_err("web@1.service")[0].message.contains("masked"));
        t.link(0, "db@1.service", "/dev/null");
        t.write(1, "db@.service", SVC);
        assert!(t.load_err("db@1.service")[0].message.contains("masked"));
        assert!(t.loader().load("db@2.service", "h").is_ok());
    }

    #[test]
    fn drop_ins_from_all_dirs_sorted_and_overridden_by_name() {
        let t = Tree::new();
        let main = t.write(2, "a.service", "[Service]\nExecStart=/bin/old\nUser=u0\n");
        t.write(2, "a.service.d/10-user.conf", "[Service]\nUser=usr-10\n");
        let etc10 = t.write(0, "a.service.d/10-user.conf", "[Service]\nUser=etc-10\n");
        let run20 = t.write(
            1,
            "a.service.d/20-exec.conf",
            "[Service]\nExecStart=\nExecStart=/bin/new\n",
        );
        let usr05 = t.write(
            2,
            "a.service.d/05-first.conf",
            "[Service]\nUser=first\nGroup=g\n",
        );
        t.write(0, "a.service.d/README", "not a drop-in");
        let u = t.load("a.service");
        assert_eq!(u.sources, vec![main, usr05, etc10, run20]);
        let s = u.service.expect("service");
        assert_eq!(s.user.as_deref(), Some("etc-10"));
        assert_eq!(s.group.as_deref(), Some("g"));
        assert_eq!(s.exec_start.len(), 1);
        assert_eq!(s.exec_start[0].argv, vec!["/bin/new"]);
    }

    #[test]
    fn drop_in_masked_in_earlier_dir() {
        let t = Tree::new();
        t.write(2, "a.service", SVC);
        t.write(2, "a.service.d/10.conf", "[Service]\nUser=vendor\n");
        t.link(0, "a.service.d/10.conf", "/dev/null");
        let u = t.load("a.service");
        assert_eq!(u.sources.len(), 1);
        assert_eq!(u.service.and_then(|s| s.user), None);
    }

    #[test]
    fn template_and_instance_drop_ins() {
        let t = Tree::new();
        t.write(2, "web@.service", "[Service]\nExecStart=/bin/web %i\n");
        let tpl10 = t.write(
            2,
            "web@.service.d/10.conf",
            "[Service]\nUser=template\nEnvironment=PORT=%i\n",
        );
        let inst10 = t.write(0, "web@2.service.d/10.conf", "[Service]\nUser=instance\n");
        let tpl20 = t.write(1, "web@.service.d/20.conf", "[Service]\nGroup=g-%i\n");
        let u = t.load("web@2.service");
        assert_eq!(u.sources[1..], [tpl10, inst10, tpl20]);
        let s = u.service.expect("service");
        assert_eq!(
            (s.user.as_deref(), s.group.as_deref()),
            (Some("instance"), Some("g-2"))
        );
        assert_eq!(s.environment, vec![("PORT".to_string(), "2".to_string())]);
        let other = t.load("web@3.service");
        assert_eq!(
            other.service.and_then(|s| s.user).as_deref(),
            Some("template")
        );
    }

    #[test]
    fn wants_and_requires_dirs_add_dependencies() {
        let t = Tree::new();
        t.write(
            2,
            "multi-user.target",
            "[Unit]\nDescription=MU\nWants=base.service\n",
        );
        t.write(2, "base.service", SVC);
        t.write(2, "a.service", SVC);
        t.write(2, "b.service", SVC);
        t.link(0, "multi-user.target.wants/a.service", "../a.service");
        t.write(2, "multi-user.target.wants/base.service", "");
        t.link(
            1,
            "multi-user.target.requires/b.service",
            "/usr/lib/keel/units/b.service",
        );
        t.link(0, "a.service.wants/b.service", "../b.service");
        let mu = t.load("multi-user.target");
        assert_eq!(mu.wants, vec!["base.service", "a.service"]);
        assert_eq!(mu.requires, vec!["b.service"]);
        assert_eq!(t.load("a.service").wants, vec!["b.service"]);
    }

    #[test]
    fn wants_entry_masked_in_earlier_dir() {
        let t = Tree::new();
        t.write(2, "x.target", "[Unit]\n");
        t.link(2, "x.target.wants/a.service", "../a.service");
        t.link(2, "x.target.wants/b.service", "../b.service");
        t.link(0, "x.target.wants/a.service", "/dev/null");
        assert_eq!(t.load("x.target").wants, vec!["b.service"]);
    }

    #[test]
    fn bad_wants_entries_warn() {
        let t = Tree::new();
        t.write(2, "x.target", "[Unit]\n");
        t.link(0, "x.target.wants/web@.service", "../web@.service");
        t.write(0, "x.target.wants/not a unit", "");
        let (u, d) = t.loader().load_unit("x.target", "h");
        assert_eq!(u.expect("usable").wants, Vec::<String>::new());
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d.iter()
                .any(|d| d.message.contains("link an instance such as web@1.service")),
            "{d:?}"
        );
    }

    #[test]
    fn load_all_loads_units_and_referenced_instances_only() {
        let t = Tree::new();
        t.write(2, "web@.service", "[Service]\nExecStart=/bin/web %i\n");
        t.write(2, "multi-user.target", "[Unit]\nWants=web@1.service\n");
        t.link(
            0,
            "multi-user.target.wants/web@2.service",
            "/usr/lib/keel/units/web@.service",
        );
        t.write(
            1,
            "app.service",
            "[Unit]\nRequires=web@3.service\n[Service]\nExecStart=/bin/app\n",
        );
        let report = t.loader().load_all("node1");
        let names: Vec<&str> = report.units.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            vec![
                "app.service",
                "multi-user.target",
                "web@1.service",
                "web@2.service",
                "web@3.service"
            ]
        );
        assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
        assert_eq!(
            exec_start(&report.units["web@3.service"]),
            vec![vec!["/bin/web".to_string(), "3".to_string()]]
        );
    }

    #[test]
    fn load_all_keeps_going_after_bad_files() {
        let t = Tree::new();
        t.write(2, "good.service", SVC);
        let syntax = t.write(
            2,
            "syntax.service",
            "[Service]\nExecStart=/bin/x\nthis line is junk\n",
        );
        let semantic = t.write(
            1,
            "semantic.service",
            "[Service]\nExecStart=/bin/x\nRestart=sometimes\n",
        );
        let dropin = t.write(0, "good2.service.d/bad.conf", "[Service\n");
        t.write(0, "good2.service", SVC);
        let report = t.loader().load_all("h");
        assert_eq!(
            report.units.keys().collect::<Vec<_>>(),
            vec!["good.service"]
        );
        let errs: Vec<(PathBuf, usize)> = report
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| (d.file.clone(), d.line))
            .collect();
        assert_eq!(errs, vec![(dropin, 1), (semantic, 3), (syntax, 3)]);
        let syntax_msg = report
            .diagnostics
            .iter()
            .find(|d| d.line == 3 && d.message.contains("junk"));
        assert!(syntax_msg.is_some(), "{:?}", report.diagnostics);
    }

    #[test]
    fn load_all_warns_about_missing_hard_dependencies_only() {
        let t = Tree::new();
        let a = t.write(2, "a.service", "[Unit]\nRequires=gone.service\nWants=also-gone.service\nBindsTo=web@9.service\n[Service]\nExecStart=/a\n");
        let report = t.loader().load_all("h");
        assert!(report.units.contains_key("a.service"));
        let msgs: Vec<String> = report
            .diagnostics
            .iter()
            .map(|d| d.message.clone())
            .collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(
            msgs[0].starts_with("Requires=gone.service: unit gone.service not found in "),
            "{msgs:?}"
        );
        assert!(msgs[1].starts_with("BindsTo=web@9.service"), "{msgs:?}");
        assert!(report
            .diagnostics
            .iter()
            .all(|d| d.severity == Severity::Warning && d.file == a));
    }

    #[test]
    fn load_all_reports_unsupported_files_and_ignores_others() {
        let t = Tree::new();
        t.write(2, "a.service", SVC);
        let sock = t.write(2, "a.socket", "[Socket]\n");
        t.write(2, "README", "hello");
        t.write(2, "notes.txt", "hello");
        fs::create_dir_all(t.dirs[2].join("a.service.d")).expect("mkdir");
        let report = t.loader().load_all("h");
        assert_eq!(report.units.len(), 1);
        assert_eq!(report.diagnostics.len(), 1, "{:?}", report.diagnostics);
        assert_eq!(report.diagnostics[0].file, sock);
        assert!(report.diagnostics[0]
            .message
            .contains(".socket units are not supported"));
    }

    #[test]
    fn dangling_symlink_warns_and_falls_through() {
        let t = Tree::new();
        let broken = t.link(0, "a.service", "/nonexistent/a.service");
        let real = t.write(2, "a.service", SVC);
        let (u, d) = t.loader().load_unit("a.service", "h");
        assert_eq!(u.expect("usable").sources, vec![real]);
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].file.clone(), d[0].severity),
            (broken, Severity::Warning)
        );
    }

    #[test]
    fn symlinked_unit_file_is_read_through() {
        let t = Tree::new();
        let real = t.write(
            2,
            "real.service",
            "[Unit]\nDescription=real\n[Service]\nExecStart=/r\n",
        );
        t.link(0, "alias.service", real.to_str().expect("utf8"));
        let u = t.load("alias.service");
        assert_eq!(
            (u.name.full.as_str(), u.description.as_str()),
            ("alias.service", "real")
        );
    }

    #[test]
    fn hostname_reaches_specifiers() {
        let t = Tree::new();
        t.write(0, "a.service", "[Service]\nExecStart=/bin/echo %H\n");
        assert_eq!(exec_start(&t.load("a.service"))[0][1], "node1");
    }

    #[test]
    fn enable_link_dir_paths() {
        let d = Path::new("/etc/keel/units");
        assert_eq!(
            enable_link_dir(d, "multi-user.target", "wants"),
            d.join("multi-user.target.wants")
        );
        assert_eq!(
            enable_link_dir(d, "a.service", "requires"),
            d.join("a.service.requires")
        );
    }
}
