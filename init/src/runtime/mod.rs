//! The container runtime: a unit with a `[Container]` section runs an image from the store as an isolated
//! process tree, started by init itself (no daemon, no shim).
//!
//! Data flow: `[Container]` entries → [`ContainerSpec`] (`spec`, pure) → [`Runtime::plan`] (reads the image:
//! layers, config, /etc/passwd; allocates nothing on the system) → [`Runtime::start`] (directories, address,
//! clone, network, go-ahead) → the unit's main pid. [`Runtime::cleanup`] runs when the unit is down.
//!
//! Spawn design: init calls clone(2) with CLONE_NEWPID|NEWNS|NEWUTS|NEWIPC[|NEWNET] and SIGCHLD directly (see
//! `child`). The child is both init's child and PID 1 of the container, so init's reaper sees exactly the
//! container's exit status and no shim process sits in between (a fork-unshare-fork shim would cost a process per
//! container and relay statuses). The child sets up its mounts itself, inside its own mount namespace: every
//! mount (overlay rootfs, volumes, /proc, /sys, /dev) lives and dies with that namespace, so nothing is ever left
//! mounted on the host, whatever way the container ends. What remains on disk is the per-container directory
//! (`<containers>/<unit>/{upper,work,rootfs}`, the writable layer — discarded on exit, state belongs in
//! volumes), the image lease and the address lease; `cleanup` removes all three.
//!
//! Owns: `<containers root>` (default /var/lib/keel/containers) and image leases. Does not: create cgroups or
//! reap (the supervisor does, through `cgroup` and its loop), or change images (see `images`).

pub mod child;
pub mod cli;
pub mod devices;
pub mod net;
pub mod netlink;
pub mod seccomp;
pub mod spec;
pub mod unit;
pub mod v1;

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::images::{self, ImageRecord, Store};
use child::{ChildPlan, FsOp, InRoot, Stage, Target};
pub use spec::{ContainerSpec, Network, Volume};

pub const DEFAULT_CONTAINERS_ROOT: &str = "/var/lib/keel/containers";
pub const KV_PORT: u16 = 2379;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("[Container] {key}={value}: {why}")]
    BadKey { key: String, value: String, why: String },
    #[error("[Container] has unknown key {0}= (known: Image, Command, Environment, Volume, Network, Hostname, ReadOnly, User, WorkingDirectory, AddCapability)")]
    UnknownKey(String),
    #[error("[Container] needs Image=")]
    NoImage,
    #[error("image: {0}")]
    Image(#[from] images::ImageError),
    #[error("user {user:?} is not in /etc/passwd of image {image} (use a numeric uid[:gid], or add the user to the image)")]
    UnknownUser { user: String, image: String },
    #[error("group {group:?} is not in /etc/group of image {image}")]
    UnknownGroup { group: String, image: String },
    #[error("cannot restrict which devices the container opens: {0}")]
    Devices(#[from] devices::DeviceError),
    #[error("init has no cgroup2 for this unit, so it cannot restrict which devices the container opens; containers need cgroup2 (init's --cgroup-root) and a kernel with CONFIG_CGROUP_BPF")]
    NoCgroup,
    #[error("image {image} has no command: set Command= or ExecStart=")]
    NoCommand { image: String },
    #[error("volume {host}: {source} (the host path of Volume= must exist)")]
    VolumeSource { host: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Cgroup(String),
    #[error("layer {layer} of image {image} is not unpacked in the store; import or pull the image again")]
    LayerMissing { layer: String, image: String },
    #[error("private network: {0}")]
    Network(String),
    #[error("cannot create the container: clone: {0}")]
    Clone(Errno),
    #[error("{what}: {errno}")]
    Setup { what: String, errno: Errno },
    #[error("executable {program:?} not found in image {image} (searched {searched}): {errno}")]
    NotFound { program: String, image: String, searched: String, errno: Errno },
    #[error("argument or variable contains a NUL byte: {0:?}")]
    Nul(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ContainerError + '_ {
    move |source| ContainerError::Io { path: path.to_path_buf(), source }
}

fn cstr(s: impl AsRef<[u8]>) -> Result<CString, ContainerError> {
    CString::new(s.as_ref().to_vec()).map_err(|_| ContainerError::Nul(String::from_utf8_lossy(s.as_ref()).into_owned()))
}

fn cpath(p: &Path) -> Result<CString, ContainerError> {
    cstr(p.as_os_str().as_bytes())
}

/// `path` (inside the container, with or without a leading `/`) as the child resolves it: inside the root.
fn in_root(path: &str) -> Result<InRoot, ContainerError> {
    let rel = path.trim_matches('/');
    let (parent, name) = match rel.rsplit_once('/') {
        Some((p, n)) => (p, n),
        None => (".", if rel.is_empty() { "." } else { rel }),
    };
    Ok(InRoot { rel: cstr(if rel.is_empty() { "." } else { rel })?, parent: cstr(parent)?, name: cstr(name)? })
}

/// The child's filesystem steps before and after pivot_root, each with a description for error messages.
type FsSteps = (Vec<FsOp>, Vec<String>, Vec<FsOp>, Vec<String>);

/// Where images and containers live.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub images: PathBuf,
    pub containers: PathBuf,
}

/// What a container start needs from the supervisor.
pub struct StartRequest<'a> {
    pub unit: &'a str,
    pub spec: &'a ContainerSpec,
    /// `ExecStart=` argv (empty when the unit has none): the command when `Command=` is absent.
    pub exec_start: &'a [String],
    /// Variables from the unit's `[Service]` (Environment=, EnvironmentFile=) and init (KEEL_UNIT, …).
    pub service_env: &'a [(String, String)],
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    pub cgroup_procs: Option<RawFd>,
    /// The unit's cgroup2 directory, which gets the container's device program (see `devices`). Without one the
    /// container is not started: nothing would stop it opening the host's devices.
    pub cgroup_dir: Option<&'a Path>,
    /// `MemoryMax=` and `TasksMax=`, applied through cgroup v1 when those controllers are not in cgroup2 (see `v1`).
    pub memory_max: Option<u64>,
    pub tasks_max: Option<u64>,
}

/// Everything decided before any system change.
#[derive(Debug, Clone)]
pub struct Plan {
    pub unit: String,
    pub image: ImageRecord,
    pub image_name: String,
    /// Layer directories, top layer first (overlayfs lowerdir order).
    pub lowerdirs: Vec<PathBuf>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub candidates: Vec<String>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub hostname: String,
    pub workdir: String,
    pub caps: u64,
}

/// Find `rel` (e.g. "etc/passwd") in the layers, top first, as overlayfs would (a whiteout hides it). These are
/// host paths: a symlink on the way (`etc -> /etc`, `passwd -> /etc/shadow`) would read the host's file, so one
/// ends the search, as if the file were not there.
fn layered_file(lowerdirs: &[PathBuf], rel: &str) -> Option<String> {
    for l in lowerdirs {
        let mut p = l.clone();
        let mut parts = rel.split('/').peekable();
        while let Some(part) = parts.next() {
            p.push(part);
            let meta = fs::symlink_metadata(&p);
            match (&meta, parts.peek().is_none()) {
                (Err(_), _) => break,
                (Ok(m), _) if m.file_type().is_char_device() || m.file_type().is_symlink() => return None,
                (Ok(m), true) if m.is_file() => return fs::read_to_string(&p).ok(),
                (Ok(m), false) if m.is_dir() => continue,
                (Ok(_), _) => return None,
            }
        }
    }
    None
}

/// `name`, `uid`, `name:group`, `uid:gid` → (uid, gid, supplementary groups), from the image's files.
pub fn resolve_user(user: &str, passwd: &str, group: &str, image: &str) -> Result<(u32, u32, Vec<u32>), ContainerError> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entry = passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.len() >= 4 && (f[0] == u || f[2] == u));
    let (uid, name, mut gid) = match (entry, u.parse::<u32>()) {
        (Some(f), _) => {
            let uid = f[2].parse().map_err(|_| ContainerError::UnknownUser { user: user.into(), image: image.into() })?;
            (uid, Some(f[0].to_string()), f[3].parse().unwrap_or(uid))
        }
        (None, Ok(n)) => (n, None, n),
        (None, Err(_)) => return Err(ContainerError::UnknownUser { user: u.into(), image: image.into() }),
    };
    if let Some(g) = g {
        gid = match group.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.len() >= 3 && (f[0] == g || f[2] == g)) {
            Some(f) => f[2].parse().map_err(|_| ContainerError::UnknownGroup { group: g.into(), image: image.into() })?,
            None => g.parse().map_err(|_| ContainerError::UnknownGroup { group: g.into(), image: image.into() })?,
        };
    }
    let mut groups = vec![gid];
    if let Some(name) = name {
        for f in group.lines().map(|l| l.split(':').collect::<Vec<_>>()).filter(|f| f.len() >= 4) {
            if f[3].split(',').any(|m| m == name) {
                if let Ok(n) = f[2].parse::<u32>() {
                    if !groups.contains(&n) {
                        groups.push(n);
                    }
                }
            }
        }
    }
    Ok((uid, gid, groups))
}

fn highest_capability() -> u32 {
    fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
}

impl Runtime {
    /// Roots from `KEEL_IMAGES_ROOT` / `KEEL_CONTAINERS_ROOT`, else the defaults under /var/lib/keel.
    pub fn from_env() -> Runtime {
        let get = |k: &str, d: &str| std::env::var_os(k).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(d));
        Runtime {
            images: get("KEEL_IMAGES_ROOT", images::DEFAULT_ROOT),
            containers: get("KEEL_CONTAINERS_ROOT", DEFAULT_CONTAINERS_ROOT),
        }
    }

    pub fn container_dir(&self, unit: &str) -> PathBuf {
        self.containers.join(unit)
    }

    /// Decide everything about a start: image, layers, command, environment, user. Reads only.
    pub fn plan(&self, req: &StartRequest<'_>) -> Result<Plan, ContainerError> {
        let spec = req.spec;
        let store = Store::open(&self.images)?;
        let image = store.resolve(&spec.image)?;
        let config = store.config(&image)?;
        let exec = config.config.clone().unwrap_or_default();
        let mut lowerdirs = Vec::new();
        for l in image.layers.iter().rev() {
            // Layers are unpacked on import or pull (by initctl): init itself never links the decompressors.
            let dir = store.layer_dir(l)?;
            if !dir.exists() {
                return Err(ContainerError::LayerMissing { layer: l.clone(), image: spec.image.clone() });
            }
            lowerdirs.push(dir);
        }
        if lowerdirs.is_empty() {
            lowerdirs.push(store.empty_dir()?);
        }
        let argv: Vec<String> = match (&spec.command, req.exec_start.is_empty()) {
            (Some(c), _) => c.clone(),
            (None, false) => req.exec_start.to_vec(),
            (None, true) => exec.entrypoint.clone().unwrap_or_default().into_iter().chain(exec.cmd.clone().unwrap_or_default()).collect(),
        };
        if argv.is_empty() {
            return Err(ContainerError::NoCommand { image: spec.image.clone() });
        }
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: &str| {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        };
        set("PATH", crate::spawn::DEFAULT_PATH);
        for kv in exec.env.iter().flatten() {
            if let Some((k, v)) = kv.split_once('=') {
                set(k, v);
            }
        }
        for (k, v) in req.service_env.iter().chain(spec.environment.iter()) {
            set(k, v);
        }
        let hostname = spec.hostname.clone().unwrap_or_else(|| {
            let h: String = req.unit.trim_end_matches(".service").chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
            h.chars().take(63).collect()
        });
        set("HOSTNAME", &hostname);
        let kv_host = match spec.network {
            Network::Private => net::GATEWAY.to_string(),
            Network::Host => "127.0.0.1".to_string(),
        };
        set("KEEL_KV_URL", &format!("http://{kv_host}:{KV_PORT}"));
        let user = spec.user.clone().or_else(|| exec.user.clone().filter(|u| !u.is_empty()));
        let (uid, gid, groups) = match &user {
            Some(u) => {
                let passwd = layered_file(&lowerdirs, "etc/passwd").unwrap_or_default();
                let group = layered_file(&lowerdirs, "etc/group").unwrap_or_default();
                resolve_user(u, &passwd, &group, &spec.image)?
            }
            None => (0, 0, vec![0]),
        };
        if uid != 0 {
            set("HOME", "/");
        }
        let path = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.clone()).unwrap_or_default();
        let program = &argv[0];
        let candidates: Vec<String> = if program.contains('/') {
            vec![program.clone()]
        } else {
            path.split(':').filter(|d| d.starts_with('/')).map(|d| format!("{}/{program}", d.trim_end_matches('/'))).collect()
        };
        let mut caps = 0u64;
        for c in spec::default_capabilities().into_iter().chain(spec.add_capabilities.iter().copied()) {
            caps |= 1u64 << c;
        }
        let workdir = spec.working_directory.clone().or(exec.working_dir.clone()).filter(|w| !w.is_empty()).unwrap_or_else(|| "/".into());
        Ok(Plan {
            unit: req.unit.to_string(),
            image_name: spec.image.clone(),
            image,
            lowerdirs,
            argv,
            env,
            candidates,
            uid,
            gid,
            groups,
            hostname,
            workdir,
            caps,
        })
    }

    /// The filesystem steps the child runs, with a description of each for error messages. Every path inside
    /// the container's root filesystem is an [`InRoot`] (resolved by the kernel inside that root): the image's
    /// own symlinks must not lead a mkdir or a volume's mount point out to the host.
    fn fs_ops(&self, plan: &Plan, spec: &ContainerSpec, dir: &Path) -> Result<FsSteps, ContainerError> {
        let rootfs = dir.join("rootfs");
        let mut ops = Vec::new();
        let mut what = Vec::new();
        let mnt = |src: Option<&str>, target: Target, fstype: Option<&str>, flags: u64, data: Option<&str>| -> Result<FsOp, ContainerError> {
            Ok(FsOp::Mount { src: src.map(cstr).transpose()?, target, fstype: fstype.map(cstr).transpose()?, flags, data: data.map(cstr).transpose()? })
        };
        let host = |p: &Path| cpath(p).map(Target::Path);
        let inside = |p: &str| in_root(p).map(|at| Target::InRoot(at.rel));
        // Nothing below may propagate back to the host.
        ops.push(mnt(None, host(Path::new("/"))?, None, libc::MS_REC | libc::MS_PRIVATE, None)?);
        what.push("making the mount tree private".into());
        let lower = plan.lowerdirs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":");
        // Always with an upper layer, so mount points and volume targets can be created; ReadOnly=yes remounts the
        // root read-only once everything is in place (after pivot_root).
        let data = format!("lowerdir={lower},upperdir={},workdir={}", dir.join("upper").display(), dir.join("work").display());
        // nodev: device nodes from the image or the writable layer never open (the device program would refuse
        // most of them anyway); the container's devices are the ones below in /dev and its device volumes.
        ops.push(mnt(Some("overlay"), host(&rootfs)?, Some("overlay"), libc::MS_NODEV, Some(&data))?);
        what.push(format!("mounting the overlay root filesystem at {} ({} layers)", rootfs.display(), plan.lowerdirs.len()));
        let mkdir_p = |ops: &mut Vec<FsOp>, what: &mut Vec<String>, ctr: &Path| -> Result<(), ContainerError> {
            let mut cur = PathBuf::new();
            for c in ctr.components().filter(|c| matches!(c, std::path::Component::Normal(_))) {
                cur.push(c);
                ops.push(FsOp::Mkdir { at: in_root(&cur.display().to_string())?, mode: 0o755 });
                what.push(format!("creating /{} in the container", cur.display()));
            }
            Ok(())
        };
        let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mkdir_p(&mut ops, &mut what, Path::new("proc"))?;
        mkdir_p(&mut ops, &mut what, Path::new("sys"))?;
        mkdir_p(&mut ops, &mut what, Path::new("dev"))?;
        ops.push(mnt(Some("proc"), inside("proc")?, Some("proc"), nosuid_nodev_noexec, None)?);
        what.push("mounting /proc".into());
        ops.push(mnt(Some("sysfs"), inside("sys")?, Some("sysfs"), nosuid_nodev_noexec | libc::MS_RDONLY, None)?);
        what.push("mounting /sys read-only".into());
        ops.push(mnt(Some("tmpfs"), inside("dev")?, Some("tmpfs"), libc::MS_NOSUID | libc::MS_STRICTATIME, Some("mode=755,size=65536k"))?);
        what.push("mounting /dev".into());
        for (name, major, minor) in [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)] {
            ops.push(FsOp::Mknod { at: in_root(&format!("dev/{name}"))?, perm: 0o666, major, minor });
            what.push(format!("creating /dev/{name}"));
        }
        for (d, fstype, data, flags) in [
            ("dev/pts", "devpts", "newinstance,ptmxmode=0666,mode=0620", libc::MS_NOSUID | libc::MS_NOEXEC),
            ("dev/shm", "tmpfs", "mode=1777,size=65536k", nosuid_nodev_noexec),
            ("dev/mqueue", "mqueue", "", nosuid_nodev_noexec),
        ] {
            ops.push(FsOp::Mkdir { at: in_root(d)?, mode: 0o755 });
            what.push(format!("creating /{d}"));
            ops.push(mnt(Some(fstype), inside(d)?, Some(fstype), flags, (!data.is_empty()).then_some(data))?);
            what.push(format!("mounting /{d}"));
        }
        for (target, link) in [("pts/ptmx", "dev/ptmx"), ("/proc/self/fd", "dev/fd"), ("/proc/self/fd/0", "dev/stdin"), ("/proc/self/fd/1", "dev/stdout"), ("/proc/self/fd/2", "dev/stderr")] {
            ops.push(FsOp::Symlink { target: cstr(target)?, at: in_root(link)? });
            what.push(format!("linking /{link}"));
        }
        for v in &spec.volumes {
            let meta = fs::metadata(&v.host).map_err(|source| ContainerError::VolumeSource { host: v.host.clone(), source })?;
            let rel = v.container.display().to_string();
            if meta.is_dir() {
                mkdir_p(&mut ops, &mut what, &v.container)?;
            } else {
                if let Some(parent) = v.container.parent() {
                    mkdir_p(&mut ops, &mut what, parent)?;
                }
                ops.push(FsOp::Touch { at: in_root(&rel)? });
                what.push(format!("creating {} for a volume", v.container.display()));
            }
            ops.push(mnt(Some(&v.host.display().to_string()), inside(&rel)?, None, libc::MS_BIND | libc::MS_REC, None)?);
            what.push(format!("bind-mounting volume {} on {}", v.host.display(), v.container.display()));
            if v.read_only {
                ops.push(mnt(None, inside(&rel)?, None, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY, None)?);
                what.push(format!("making volume {} read-only", v.container.display()));
            }
        }
        // After pivot_root: read-only pieces of /proc, a masked /proc/kcore, and the read-only root.
        let mut after = Vec::new();
        let mut after_what = Vec::new();
        // Same kernel inside and out: what the host's /proc lacks, the container's lacks too.
        for p in ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"].into_iter().filter(|p| Path::new(p).exists()) {
            after.push(mnt(Some(p), host(Path::new(p))?, None, libc::MS_BIND | libc::MS_REC, None)?);
            after_what.push(format!("bind-mounting {p}"));
            after.push(mnt(None, host(Path::new(p))?, None, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | nosuid_nodev_noexec, None)?);
            after_what.push(format!("making {p} read-only"));
        }
        if Path::new("/proc/kcore").exists() {
            after.push(mnt(Some("/dev/null"), host(Path::new("/proc/kcore"))?, None, libc::MS_BIND, None)?);
            after_what.push("masking /proc/kcore".into());
        }
        if spec.read_only {
            after.push(mnt(None, host(Path::new("/"))?, None, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY, None)?);
            after_what.push("making the root filesystem read-only".into());
        }
        Ok((ops, what, after, after_what))
    }

    /// Start the container for `req`. Returns the pid of the container's first process (a child of the caller).
    pub fn start(&self, req: &StartRequest<'_>) -> Result<i32, ContainerError> {
        let plan = self.plan(req)?;
        let dir = self.container_dir(req.unit);
        if dir.exists() {
            // Left over from a crash: nothing can be mounted on it (mounts live in the dead container's namespace).
            let _ = fs::remove_dir_all(&dir);
        }
        let res = self.start_planned(req, &plan, &dir);
        if res.is_err() {
            self.cleanup(req.unit);
        }
        res
    }

    fn start_planned(&self, req: &StartRequest<'_>, plan: &Plan, dir: &Path) -> Result<i32, ContainerError> {
        let spec = req.spec;
        for d in ["upper", "work", "rootfs"] {
            let p = dir.join(d);
            fs::create_dir_all(&p).map_err(io(&p))?;
        }
        let store = Store::open(&self.images)?;
        store.add_lease(req.unit, &plan.image.manifest)?;
        let address = match spec.network {
            Network::Private => Some(net::allocate(&self.containers, req.unit)?),
            Network::Host => None,
        };
        let (fs_ops, fs_what, after, after_what) = self.fs_ops(plan, spec, dir)?;
        let mut env = plan.env.clone();
        if let Some(ip) = address {
            env.push(("KEEL_CONTAINER_IP".into(), ip.to_string()));
        }
        let argv_c: Vec<CString> = plan.argv.iter().map(cstr).collect::<Result<_, _>>()?;
        let env_c: Vec<CString> = env.iter().map(|(k, v)| cstr(format!("{k}={v}"))).collect::<Result<_, _>>()?;
        let mut flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if spec.network == Network::Private {
            flags |= libc::CLONE_NEWNET;
        }
        let cgroup = req.cgroup_dir.ok_or(ContainerError::NoCgroup)?;
        devices::confine(cgroup, &devices::allowed(&spec.volumes))?;
        let v1_joins = v1::prepare(req.unit, req.memory_max, req.tasks_max).map_err(ContainerError::Cgroup)?;
        let (go_r, go_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| ContainerError::Io { path: "pipe".into(), source: e.into() })?;
        let (rep_r, rep_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| ContainerError::Io { path: "pipe".into(), source: e.into() })?;
        let cplan = ChildPlan {
            clone_flags: flags,
            cgroup_procs: req.cgroup_procs,
            extra_cgroups: v1_joins.iter().map(|f| f.as_raw_fd()).collect(),
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            go: go_r.as_raw_fd(),
            report: rep_w.as_raw_fd(),
            fs: fs_ops,
            rootfs: cpath(&dir.join("rootfs"))?,
            hostname: Some(cstr(&plan.hostname)?),
            after_pivot: after,
            workdir: cstr(&plan.workdir)?,
            keep_caps: plan.caps,
            last_cap: highest_capability(),
            uid: plan.uid,
            gid: plan.gid,
            groups: plan.groups.clone(),
            seccomp: seccomp::program(plan.caps & (1u64 << 21) != 0),
            candidates: plan.candidates.iter().map(cstr).collect::<Result<_, _>>()?,
            argv: argv_c.iter().map(|c| c.as_ptr()).chain([std::ptr::null()]).collect(),
            envp: env_c.iter().map(|c| c.as_ptr()).chain([std::ptr::null()]).collect(),
        };
        let pid = child::clone_container(&cplan).map_err(ContainerError::Clone)?;
        let _ = fs::write(dir.join("pid"), pid.to_string());
        drop(go_r);
        drop(rep_w);
        let abort = |e: ContainerError| -> ContainerError {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            e
        };
        if let Some(ip) = address {
            if let Err(e) = net::setup(req.unit, pid, ip) {
                return Err(abort(e));
            }
        }
        if rustix::io::write(&go_w, b"g").is_err() {
            return Err(abort(ContainerError::Setup { what: "handing over to the container".into(), errno: Errno::EPIPE }));
        }
        drop(go_w);
        let mut report = fs::File::from(rep_r);
        let mut buf = [0u8; 6];
        let mut n = 0;
        while n < buf.len() {
            match report.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if n < buf.len() {
            // EOF: the program was exec'd.
            return Ok(pid);
        }
        // The child failed and exits 127; collect it here so nothing of it is left when we clean up.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        let errno = Errno::from_raw(i32::from_ne_bytes([buf[2], buf[3], buf[4], buf[5]]));
        let idx = buf[1] as usize;
        let what = match Stage::from_byte(buf[0]) {
            Some(Stage::Exec) => {
                return Err(ContainerError::NotFound {
                    program: plan.argv[0].clone(),
                    image: plan.image_name.clone(),
                    searched: plan.candidates.join(", "),
                    errno,
                })
            }
            Some(Stage::Fs) => fs_what.get(idx).cloned().unwrap_or_else(|| "setting up the filesystem".into()),
            Some(Stage::AfterPivot) => after_what.get(idx).cloned().unwrap_or_else(|| "finishing the filesystem".into()),
            Some(Stage::Chdir) => format!("changing to working directory {}", plan.workdir),
            Some(Stage::Credentials) => format!("switching to uid {} gid {}", plan.uid, plan.gid),
            Some(s) => format!("{s:?}").to_lowercase(),
            None => "starting".into(),
        };
        Err(ContainerError::Setup { what, errno })
    }

    /// The pid of the first process of `unit`'s container, if one was started and not cleaned up.
    pub fn pid_of(&self, unit: &str) -> Option<i32> {
        fs::read_to_string(self.container_dir(unit).join("pid")).ok()?.trim().parse().ok()
    }

    /// Remove what a container left on disk: its directory, image lease and address. Safe to call twice.
    pub fn cleanup(&self, unit: &str) {
        let dir = self.container_dir(unit);
        if dir.exists() {
            let _ = fs::remove_dir_all(&dir);
        }
        if let Ok(store) = Store::open(&self.images) {
            store.drop_lease(unit);
        }
        net::release(&self.containers, unit);
        v1::remove(unit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layered_files_are_read_from_the_top_layer_and_never_through_a_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (top, mid, low) = (dir.path().join("top"), dir.path().join("mid"), dir.path().join("low"));
        for l in [&top, &mid, &low] {
            fs::create_dir_all(l.join("etc")).expect("mkdir");
        }
        fs::write(low.join("etc/passwd"), "low").expect("write");
        fs::write(mid.join("etc/passwd"), "mid").expect("write");
        assert_eq!(layered_file(&[top.clone(), mid.clone(), low.clone()], "etc/passwd").as_deref(), Some("mid"));
        let secret = dir.path().join("host-secret");
        fs::write(&secret, "host").expect("write");
        std::os::unix::fs::symlink(&secret, top.join("etc/passwd")).expect("link");
        assert_eq!(layered_file(&[top.clone(), mid.clone()], "etc/passwd"), None, "a symlinked file is not followed");
        fs::remove_dir_all(&top).expect("rm");
        fs::create_dir_all(&top).expect("mkdir");
        std::os::unix::fs::symlink(dir.path(), top.join("etc")).expect("link");
        fs::write(dir.path().join("passwd"), "host").expect("write");
        assert_eq!(layered_file(&[top, mid], "etc/passwd"), None, "a symlinked directory is not followed");
    }

    #[test]
    fn users_resolve_from_the_image_files() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\nweb:x:1000:1000::/srv:/bin/sh\n";
        let group = "root:x:0:\nnogroup:x:65534:\nweb:x:1000:\nshared:x:2000:web,other\n";
        assert_eq!(resolve_user("web", passwd, group, "img").expect("web"), (1000, 1000, vec![1000, 2000]));
        assert_eq!(resolve_user("nobody:web", passwd, group, "img").expect("x").1, 1000);
        assert_eq!(resolve_user("4242", passwd, group, "img").expect("numeric"), (4242, 4242, vec![4242]));
        let err = resolve_user("mallory", passwd, group, "busybox").unwrap_err().to_string();
        assert!(err.contains("mallory") && err.contains("busybox"), "{err}");
    }
}
