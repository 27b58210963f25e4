//! Containers as units, end to end: a real init (PID 1 of fresh PID, mount, UTS and network namespaces, so the
//! `keel0` bridge and every veth live in a namespace the test made) runs `[Container]` units from a busybox
//! image the test builds from Debian's busybox-static; `initctl image …` and `initctl run` drive it.
//! Needs root, overlayfs, iproute2 and util-linux (nsenter); the registry test also skopeo and docker-registry.

use crate::common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

const LONG: Duration = Duration::from_secs(30);
static N: AtomicUsize = AtomicUsize::new(0);

/// A test init plus the image store and containers root it was given.
struct Cbox {
    t: TestInit,
    images: PathBuf,
    containers: PathBuf,
}

fn busybox() -> &'static str {
    ["/bin/busybox", "/usr/bin/busybox"].into_iter().find(|p| Path::new(p).exists()).expect("busybox-static is installed")
}

/// An OCI layout of busybox, made once per test process in cargo's target/tmp. A process cannot remove its own at
/// exit (statics are never dropped), so each run first removes the layouts of runs whose process is gone.
fn busybox_layout() -> PathBuf {
    static ONCE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_layouts_of_finished_runs(root);
        let dir = root.join(format!("busybox-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        keel_init::images::import::write_busybox_layout(&dir, Path::new(busybox()), "latest").expect("busybox layout");
        dir
    })
    .clone()
}

fn remove_layouts_of_finished_runs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("busybox-layout-") else { continue };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Cbox {
    /// Start init (PID 1 of new pid/mount/uts/net namespaces) with `units`, after importing busybox.
    fn start(units: &[(&str, &str)], wanted: &[&str]) -> Cbox {
        let mut t = TestInit::prepare(units, wanted);
        let images = t.dir.path().join("images");
        let containers = t.dir.path().join("containers");
        let out = initctl_images(&images, &["image", "import", "--name", "busybox", &busybox_layout().display().to_string()]);
        assert!(out.status.success(), "import busybox: {}", String::from_utf8_lossy(&out.stderr));
        launch(&mut t, &images, &containers);
        let b = Cbox { t, images, containers };
        b.t.wait_ready();
        b
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(INITCTL)
            .arg("--socket")
            .arg(self.t.socket())
            .args(args)
            .env("KEEL_IMAGES_ROOT", &self.images)
            .output()
            .expect("run initctl")
    }

    fn logs(&self, unit: &str) -> String {
        self.t.logs(unit)
    }

    fn error(&self, unit: &str) -> String {
        self.t.status(unit)["status"]["error"].as_str().unwrap_or("").to_string()
    }

    fn init_pid(&self) -> i32 {
        self.t.init_host_pid().expect("init pid")
    }

    /// Mounts anywhere on the host that mention this test's directories.
    fn host_mounts(&self) -> Vec<String> {
        let me = self.t.dir.path().display().to_string();
        let mut v: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().filter(|l| l.contains(&me)).map(String::from).collect();
        // …and in init's own mount namespace.
        v.extend(std::fs::read_to_string(format!("/proc/{}/mountinfo", self.init_pid())).unwrap_or_default().lines().filter(|l| l.contains(&me)).map(String::from));
        v
    }

    fn leftovers(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.containers)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "net")
            .collect();
        v.extend(std::fs::read_dir(self.containers.join("net")).into_iter().flatten().flatten().map(|e| format!("net/{}", e.file_name().to_string_lossy())));
        v.extend(std::fs::read_dir(self.images.join("leases")).into_iter().flatten().flatten().map(|e| format!("lease/{}", e.file_name().to_string_lossy())));
        v
    }

    /// Interfaces in init's network namespace.
    fn links(&self) -> Vec<String> {
        let o = Command::new("nsenter").arg(format!("--net=/proc/{}/ns/net", self.init_pid())).args(["ip", "-o", "link"]).output().expect("nsenter ip");
        String::from_utf8_lossy(&o.stdout).lines().map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()).collect()
    }

    fn cgroups(&self) -> usize {
        let Some(cg) = &self.t.cgroup else { return 0 };
        let mut n = 0;
        let mut stack = vec![cg.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    n += 1;
                    stack.push(e.path());
                }
            }
        }
        n
    }

    /// What init's open descriptors point at (`pipe:[…]`, `socket:[…]`, a path), sorted: a failed comparison
    /// names the kind of descriptor that leaked.
    fn init_fds(&self) -> Vec<String> {
        let dir = format!("/proc/{}/fd", self.init_pid());
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| std::fs::read_link(e.path()).map(|t| t.display().to_string()).unwrap_or_else(|_| "?".into()))
            .collect();
        v.sort();
        v
    }

    /// How many of init's descriptors are control connections (initctl's): init closes its end when it sees the
    /// client's, which can be just after the client has its reply. They are the sockets missing from init's
    /// /proc/net/unix, which lists its bound sockets (the control socket, the notify socket) but not accepted ones.
    fn init_connections(&self) -> usize {
        let table = std::fs::read_to_string(format!("/proc/{}/net/unix", self.init_pid())).unwrap_or_default();
        // Num RefCount Protocol Flags Type St Inode [Path]
        let bound: Vec<String> = table.lines().skip(1).filter_map(|l| l.split_whitespace().nth(6)).map(|i| format!("socket:[{i}]")).collect();
        self.init_fds().iter().filter(|t| t.starts_with("socket:") && !bound.contains(t)).count()
    }
}

/// initctl's image commands work on the store directly (no init needed).
fn initctl_images(images: &Path, args: &[&str]) -> Output {
    Command::new(INITCTL).args(args).env("KEEL_IMAGES_ROOT", images).output().expect("run initctl")
}

/// Like `TestInit::launch(true)`, plus a network namespace and the store roots.
fn launch(t: &mut TestInit, images: &Path, containers: &Path) {
    launch_in(t, images, containers, cgroup2_root());
}

/// `launch` with init's cgroup2 root `root` (None: init runs without cgroups).
fn launch_in(t: &mut TestInit, images: &Path, containers: &Path, root: Option<PathBuf>) {
    let n = N.fetch_add(1, Ordering::SeqCst);
    let cg = root.as_ref().map(|r| r.join(format!("keel-ctest-{}-{n}", std::process::id())));
    if let Some(cg) = &cg {
        std::fs::create_dir_all(cg).expect("create test cgroup");
    }
    let log = t.dir.path().join(format!("console-{n}.log"));
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child", "--mount-proc", "--uts", "--net", "--"])
        .arg(INIT)
        .arg("--units-dir")
        .arg(t.units_dir())
        .arg("--state-dir")
        .arg(t.state_dir())
        .arg("--cgroup-root")
        .arg(root.clone().unwrap_or_else(|| PathBuf::from("/nonexistent")))
        .env("KEEL_IMAGES_ROOT", images)
        .env("KEEL_CONTAINERS_ROOT", containers)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&log).expect("log")))
        .stderr(Stdio::from(std::fs::OpenOptions::new().append(true).open(&log).expect("log")));
    if let Some(cg) = &cg {
        let procs = std::ffi::CString::new(cg.join("cgroup.procs").display().to_string()).expect("path");
        // SAFETY: pre_exec runs in the forked child before exec; it only makes raw open/write/close syscalls on a
        // path prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
                Ok(())
            });
        }
    }
    t.child = Some(cmd.spawn().expect("spawn init"));
    t.cgroup = cg;
    t.namespace = true;
    let sock = t.socket();
    wait_until("init's control socket", Duration::from_secs(10), || sock.exists());
}

/// A container unit running `sh -c CMD` in busybox, with extra `[Service]` and `[Container]` lines.
fn unit(cmd: &str, service: &str, container: &str) -> String {
    format!("[Service]\nExecStart=/bin/sh -c '{cmd}'\n{service}\n[Container]\nImage=busybox\n{container}\n")
}

#[test]
fn container_is_pid_1_with_its_own_hostname_no_host_processes_and_few_privileges() {
    let u = unit(
        "echo pid=$$; echo host=$(hostname); ps -o pid,comm | tail -n +2 | wc -l > /tmp/n; echo procs=$(cat /tmp/n); \
         grep -E \"^(CapBnd|CapEff|NoNewPrivs|Seccomp):\" /proc/self/status; swapoff /dev/null; touch /sys/x; echo done; sleep 1000 & wait",
        "",
        "Hostname=web-1",
    );
    let b = Cbox::start(&[("web.service", &u)], &["web.service"]);
    wait_until("container output", LONG, || b.logs("web.service").contains("done"));
    let logs = b.logs("web.service");
    assert!(logs.contains("pid=1"), "the container's first process is PID 1:\n{logs}");
    assert!(logs.contains("host=web-1"), "Hostname= is the container's hostname:\n{logs}");
    // sh, ps, tail, wc (and a subshell): a handful, never init or the test runner.
    let procs: usize = logs.lines().find_map(|l| l.split("procs=").nth(1)).and_then(|n| n.trim().parse().ok()).expect("procs line");
    assert!(procs <= 5, "host processes are invisible, saw {procs}:\n{logs}");
    // Docker's default capabilities less MKNOD, no_new_privs, a seccomp filter that refuses swapoff, read-only /sys.
    for line in ["CapBnd:\t00000000a00425fb", "CapEff:\t00000000a00425fb", "NoNewPrivs:\t1", "Seccomp:\t2", "Operation not permitted", "Read-only file system"] {
        assert!(logs.contains(line), "expected {line:?} in the container's output:\n{logs}");
    }
    assert_eq!(b.t.active("web.service"), "active");
    let o = b.ctl(&["stop", "web.service"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(b.host_mounts().is_empty(), "mounts left: {:?}", b.host_mounts());
    assert!(b.leftovers().is_empty(), "files left: {:?}", b.leftovers());
}

#[test]
fn read_only_rootfs_refuses_writes_and_volumes_are_visible() {
    let u = unit(
        "touch /x 2>&1 && echo wrote-root; cat /data/hello; echo from-ctr > /rw/out; touch /data/nope 2>/dev/null && echo wrote-ro; echo finished",
        "Type=oneshot",
        "ReadOnly=yes\nVolume=@WORK@/ro:/data:ro\nVolume=@WORK@/rw:/rw",
    );
    let mut t = TestInit::prepare(&[], &[]);
    let work = t.work();
    std::fs::create_dir_all(work.join("ro")).expect("mkdir");
    std::fs::create_dir_all(work.join("rw")).expect("mkdir");
    std::fs::write(work.join("ro/hello"), "hello-from-host\n").expect("write");
    let u = u.replace("@WORK@", &work.display().to_string());
    std::fs::write(t.units_dir().join("vol.service"), u).expect("unit");
    let images = t.dir.path().join("images");
    let containers = t.dir.path().join("containers");
    let out = initctl_images(&images, &["image", "import", "--name", "busybox", &busybox_layout().display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    launch(&mut t, &images, &containers);
    let b = Cbox { t, images, containers };
    b.t.wait_ready();
    let o = b.ctl(&["start", "vol.service"]);
    let logs = b.logs("vol.service");
    assert!(logs.contains("finished"), "container ran: {}\n{logs}\n{}", String::from_utf8_lossy(&o.stderr), b.t.console());
    assert!(logs.contains("Read-only file system") && !logs.contains("wrote-root"), "a write to the read-only rootfs fails:\n{logs}");
    assert!(logs.contains("hello-from-host"), "the volume is visible:\n{logs}");
    assert!(!logs.contains("wrote-ro"), "a :ro volume refuses writes:\n{logs}");
    assert_eq!(std::fs::read_to_string(work.join("rw/out")).unwrap_or_default(), "from-ctr\n", "a rw volume writes through to the host");
    wait_until("cleanup", LONG, || b.leftovers().is_empty());
    assert!(b.host_mounts().is_empty(), "mounts left: {:?}", b.host_mounts());
}

#[test]
fn initctl_run_shows_output_and_propagates_the_exit_code() {
    let b = Cbox::start(&[], &[]);
    let o = b.ctl(&["run", "--rm", "busybox", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(7), "exit code propagated\nstdout:{out}\nstderr:{err}\n{}", b.t.console());
    assert!(out.contains("to-stdout"), "stdout: {out}");
    assert!(err.contains("to-stderr"), "stderr: {err}");
    // --rm freed the name run-1.service: the next run gets it, and shows only its own output.
    let o = b.ctl(&["run", "--rm", "busybox", "echo", "second"]);
    assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()), (Some(0), "second\n"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = b.ctl(&["run", "busybox", "no-such-program"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no-such-program") && err.contains("not found"), "{err}");
    wait_until("cleanup", LONG, || b.leftovers().is_empty());
}

#[test]
fn private_network_container_reaches_a_server_on_the_bridge() {
    let server = "[Service]\nExecStart=/bin/busybox httpd -f -p 2379 -h @WORK@\n";
    let client = unit("echo ip=$KEEL_CONTAINER_IP; wget -q -O - $KEEL_KV_URL/greeting.txt; echo rc=$?", "Type=oneshot", "Network=private");
    let mut t = TestInit::prepare(&[("kv.service", server), ("client.service", &client)], &["kv.service"]);
    std::fs::write(t.work().join("greeting.txt"), "hello over the bridge\n").expect("write");
    let images = t.dir.path().join("images");
    let containers = t.dir.path().join("containers");
    assert!(initctl_images(&images, &["image", "import", "--name", "busybox", &busybox_layout().display().to_string()]).status.success());
    launch(&mut t, &images, &containers);
    let b = Cbox { t, images, containers };
    b.t.wait_ready();
    let o = b.ctl(&["start", "client.service"]);
    let logs = b.logs("client.service");
    assert!(logs.contains("hello over the bridge"), "the container reached 10.88.0.1:2379\n{}\n{logs}\n{}", String::from_utf8_lossy(&o.stderr), b.t.console());
    assert!(logs.contains("ip=10.88."), "{logs}");
    assert!(b.links().iter().any(|l| l == "keel0"), "bridge exists: {:?}", b.links());
    // docs/containers.md's one-off line: `initctl run --rm --net private -v HOST:CTR:ro …`.
    let vol = format!("{}:/srv:ro", b.t.work().display());
    let o = b.ctl(&["run", "--rm", "--net", "private", "-v", &vol, "busybox", "sh", "-c", "ls /srv; wget -qO- $KEEL_KV_URL/greeting.txt; touch /srv/x"]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("greeting.txt") && out.contains("hello over the bridge"), "stdout: {out}\nstderr: {err}\n{}", b.t.console());
    assert!(err.contains("Read-only file system"), "the :ro volume refuses writes: {err}");
    assert_eq!(o.status.code(), Some(1), "touch's failure is the container's exit code\n{err}");
    wait_until("the veth to go with the container", LONG, || !b.links().iter().any(|l| l.starts_with("kv")));
    wait_until("cleanup", LONG, || b.leftovers().is_empty());
}

#[test]
fn bad_input_fails_saying_which_and_leaves_nothing_mounted() {
    let cases = [
        ("noimage.service", unit("true", "", "").replace("Image=busybox", "Image=no-such-image"), "no-such-image"),
        ("baddigest.service", unit("true", "", "").replace("Image=busybox", &format!("Image=sha256:{}", "0".repeat(64))), "0000000000"),
        ("nouser.service", unit("true", "", "User=mallory"), "mallory"),
        ("noexec.service", "[Service]\nExecStart=/bin/no-such-program\n[Container]\nImage=busybox\n".to_string(), "no-such-program"),
        ("badkey.service", unit("true", "", "Volume=relative:/x"), "Volume="),
    ];
    let units: Vec<(&str, &str)> = cases.iter().map(|(n, u, _)| (*n, u.as_str())).collect();
    let b = Cbox::start(&units, &[]);
    for (name, _, needle) in &cases {
        let o = b.ctl(&["start", name]);
        assert!(!o.status.success(), "{name} must fail to start");
        let err = b.error(name);
        assert!(err.contains(needle), "{name}: the error names {needle}: {err:?}\n{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(b.t.active(name), "failed", "{name}");
    }
    assert!(b.host_mounts().is_empty(), "mounts left: {:?}", b.host_mounts());
    assert!(b.leftovers().is_empty(), "files left: {:?}", b.leftovers());
}

#[test]
fn a_corrupt_blob_is_refused_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("layout");
    copy_dir(&busybox_layout(), &layout);
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index")).expect("json");
    let mdigest = index["manifests"][0]["digest"].as_str().expect("digest").to_string();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(&mdigest[7..])).expect("m")).expect("json");
    let layer = manifest["layers"][0]["digest"].as_str().expect("layer").to_string();
    let path = layout.join("blobs/sha256").join(&layer[7..]);
    let mut bytes = std::fs::read(&path).expect("layer");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes).expect("corrupt");
    let images = dir.path().join("images");
    let o = initctl_images(&images, &["image", "import", &layout.display().to_string()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a corrupt layer is refused");
    assert!(err.contains(&layer) && err.contains("corrupt"), "the message names the blob: {err}");
    let list = initctl_images(&images, &["image", "list"]);
    assert!(!String::from_utf8_lossy(&list.stdout).contains("layout"), "nothing was recorded");
}

/// Tries to open each argument for reading (or, after `-w`, for writing) and prints `<path><mode> open` or
/// `<path><mode> refused: <the shell's error>`. Run as `sh /p/probe.sh PATH…` with the test's directory on /p.
const OPEN_PROBE: &str = r#"m='<'
for d in "$@"; do
  if [ "$d" = -w ]; then m='>'; continue; fi
  if [ "$m" = '<' ]; then (exec 3<"$d") 2>/tmp/e; else (exec 3>"$d") 2>/tmp/e; fi
  if [ $? = 0 ]; then echo "$d$m open"; else echo "$d$m refused: $(cat /tmp/e)"; fi
done
"#;

/// A tar header of `kind` with no data, owned by root, mtime 0.
fn empty_entry(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// A tar layer holding device nodes `(path, 'c'|'b', major, minor)`, mode 0666.
fn device_layer(nodes: &[(&str, char, u32, u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, major, minor) in nodes {
        let mut h = empty_entry(if *kind == 'b' { tar::EntryType::Block } else { tar::EntryType::Char }, 0o666);
        h.set_device_major(*major).expect("major");
        h.set_device_minor(*minor).expect("minor");
        b.append_data(&mut h, path, std::io::empty()).expect("node");
    }
    b.into_inner().expect("tar")
}

/// The block device under the test's own files (the host's disk), when they are on one.
fn host_block_device(dir: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    (major != 0 && Path::new(&format!("/sys/dev/block/{major}:{minor}")).exists()).then_some((major, minor))
}

/// No way into the host's devices: a container opens only the usual ones (/dev/null, zero, full, random,
/// urandom, tty, ptmx, pts) and device files its unit binds in as volumes (`:ro` ones only for reading; here
/// /dev/fuse and /dev/net/tun, which open without capabilities). Not a node it makes with
/// `AddCapability=MKNOD` (the host's disk, kernel log and fuse, in /dev and in its root), not one under a
/// directory volume (`-v /dev:/hostdev`), and a node in an image layer is not a device at all.
#[test]
fn a_container_opens_only_the_usual_devices_and_the_device_volumes_it_is_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("probe.sh"), OPEN_PROBE).expect("probe");
    let p = format!("{}:/p:ro", dir.path().display());
    let (major, minor) = host_block_device(dir.path()).unwrap_or((1, 1)); // else /dev/mem
    let layout = dir.path().join("devnodes");
    let layers = [keel_init::images::import::busybox_layer(Path::new(busybox())).expect("busybox layer"), device_layer(&[("hostdisk", 'b', major, minor)])];
    keel_init::images::import::write_oci_layout(&layout, "latest", &keel_init::images::import::busybox_config(), &layers).expect("layout");
    let mknod = format!(
        "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'mknod /dev/disk b {major} {minor} && mknod /dev/k c 1 11 && mknod /dev/f c 10 229 && mknod /k c 10 229 && echo made; \
         sh /p/probe.sh /dev/disk /dev/f /k /dev/null -w /dev/k /dev/f; dd if=/dev/disk bs=512 count=1 | wc -c'\n\
         [Container]\nImage=busybox\nAddCapability=MKNOD\nVolume={p}\n"
    );
    let b = Cbox::start(&[("mknod.service", &mknod)], &[]);

    let o = b.ctl(&["start", "mknod.service"]);
    let logs = b.logs("mknod.service");
    assert!(logs.contains("made"), "with MKNOD given back, mknod works: {}\n{logs}\n{}", String::from_utf8_lossy(&o.stderr), b.t.console());
    for dev in ["/dev/disk<", "/dev/f<", "/k<", "/dev/k>", "/dev/f>"] {
        assert!(logs.contains(&format!("{dev} refused")), "a node the container made must not open ({dev}):\n{logs}");
    }
    assert!(logs.contains("/dev/null< open"), "{logs}");
    assert!(!logs.lines().any(|l| l.trim() == "512"), "the host's disk was read from the container:\n{logs}");

    let usual = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/ptmx"];
    let mut args = vec!["run", "--rm", "-v", &p, "-v", "/dev:/hostdev", "-v", "/dev/fuse:/dev/fuse:ro", "-v", "/dev/net/tun:/dev/tun", "busybox", "sh", "/p/probe.sh"];
    args.extend(usual);
    args.extend(["/dev/fuse", "/dev/tun", "/hostdev/loop-control", "/hostdev/null", "-w", "/dev/null", "/dev/tun", "/dev/fuse", "/hostdev/kmsg"]);
    let o = b.ctl(&args);
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr));
    let opens = usual.iter().map(|d| format!("{d}<")).chain(["/dev/fuse<", "/dev/tun<", "/hostdev/null<", "/dev/null>", "/dev/tun>"].map(String::from));
    for dev in opens {
        assert!(out.contains(&format!("{dev} open")), "{dev} opens:\n{out}\nstderr: {err}\n{}", b.t.console());
    }
    assert!(out.contains("/dev/fuse> refused"), "a read-only device volume does not open for writing:\n{out}");
    for dev in ["/hostdev/loop-control<", "/hostdev/kmsg>"] {
        assert!(out.contains(&format!("{dev} refused")), "a device under a directory volume is not given ({dev}):\n{out}");
    }

    let o = initctl_images(&b.images, &["image", "import", "--name", "devnodes", &layout.display().to_string()]);
    assert!(o.status.success(), "import: {}", String::from_utf8_lossy(&o.stderr));
    let o = b.ctl(&["run", "--rm", "devnodes", "sh", "-c", "test -b /hostdisk && echo is-a-device; wc -c < /hostdisk"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.trim(), "0", "a device node in an image layer is an empty file:\n{out}");
    wait_until("cleanup", LONG, || b.leftovers().is_empty());
}

/// A tar layer of symlinks `(name, target)`.
fn symlink_layer(links: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, target) in links {
        b.append_link(&mut empty_entry(tar::EntryType::Symlink, 0o777), name, target).expect("link");
    }
    b.into_inner().expect("tar")
}

/// An image's symlinks are the container's own: a volume whose container path runs through one (`data -> /tmp`,
/// `conf -> /tmp/<name>`) lands inside the container's root filesystem, as the path reads inside the container,
/// and init creates nothing on the host where the links would point from the host's root.
#[test]
fn volumes_through_an_image_symlink_stay_inside_the_container() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tag = format!("keel-escape-{}", std::process::id());
    let host_dir = Path::new("/tmp").join(&tag);
    let host_file = Path::new("/tmp").join(format!("{tag}.conf"));
    let _ = std::fs::remove_dir_all(&host_dir);
    let _ = std::fs::remove_file(&host_file);
    std::fs::create_dir_all(dir.path().join("vol")).expect("mkdir");
    std::fs::write(dir.path().join("vol/hello"), "from the volume\n").expect("write");
    std::fs::write(dir.path().join("file.conf"), "from the file volume\n").expect("write");
    let layout = dir.path().join("linky");
    let conf_target = format!("/tmp/{tag}.conf");
    let layers = [
        keel_init::images::import::busybox_layer(Path::new(busybox())).expect("busybox layer"),
        symlink_layer(&[("data", "/tmp"), ("conf", &conf_target)]),
    ];
    keel_init::images::import::write_oci_layout(&layout, "latest", &keel_init::images::import::busybox_config(), &layers).expect("layout");
    let u = format!(
        "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'cat /data/{tag}/hello /conf; ls /tmp; echo done'\n\
         [Container]\nImage=linky\nVolume={}:/data/{tag}\nVolume={}:/conf:ro\n",
        dir.path().join("vol").display(),
        dir.path().join("file.conf").display()
    );
    let b = Cbox::start(&[("linky.service", &u)], &[]);
    let o = initctl_images(&b.images, &["image", "import", "--name", "linky", &layout.display().to_string()]);
    assert!(o.status.success(), "import: {}", String::from_utf8_lossy(&o.stderr));
    let o = b.ctl(&["start", "linky.service"]);
    let logs = b.logs("linky.service");
    let escaped = (host_dir.exists(), host_file.exists());
    let _ = std::fs::remove_dir_all(&host_dir);
    let _ = std::fs::remove_file(&host_file);
    assert_eq!(escaped, (false, false), "init created {} / {} on the host through the image's symlinks\n{logs}", host_dir.display(), host_file.display());
    assert!(
        logs.contains("from the volume") && logs.contains("from the file volume") && logs.contains("done"),
        "the volumes are where the container's own paths lead: {}\n{logs}\n{}",
        String::from_utf8_lossy(&o.stderr),
        b.t.console()
    );
    wait_until("cleanup", LONG, || b.leftovers().is_empty());
}

/// Without a cgroup of its own a container could open any device: init refuses to start it, and says why.
#[test]
fn without_cgroup2_a_container_is_refused_with_the_reason() {
    let mut t = TestInit::prepare(&[], &[]);
    let images = t.dir.path().join("images");
    let containers = t.dir.path().join("containers");
    assert!(initctl_images(&images, &["image", "import", "--name", "busybox", &busybox_layout().display().to_string()]).status.success());
    launch_in(&mut t, &images, &containers, None);
    let b = Cbox { t, images, containers };
    b.t.wait_ready();
    let o = b.ctl(&["run", "--rm", "busybox", "true"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}\n{}", b.t.console());
    assert!(err.contains("no cgroup2") && err.contains("devices"), "the reason is given: {err}");
    wait_until("cleanup", LONG, || b.leftovers().is_empty());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read").flatten() {
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn images_import_from_layout_oci_archive_and_docker_save_and_pull_from_a_registry() {
    assert!(have("skopeo") && have("docker-registry"), "skopeo and docker-registry are needed (init/debian-packages.txt)");
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("images");
    let layout = busybox_layout();
    let oci_archive = dir.path().join("bb-oci.tar");
    let docker_archive = dir.path().join("bb-docker.tar");
    for (dest, what) in [(format!("oci-archive:{}:latest", oci_archive.display()), "oci-archive"), (format!("docker-archive:{}:keel/bb:saved", docker_archive.display()), "docker-archive")] {
        let o = Command::new("skopeo").args(["copy", "--quiet"]).arg(format!("oci:{}:latest", layout.display())).arg(&dest).output().expect("skopeo");
        assert!(o.status.success(), "skopeo → {what}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let o = initctl_images(&images, &["image", "import", "--name", "bb:oci", &oci_archive.display().to_string()]);
    assert!(o.status.success(), "oci-archive: {}", String::from_utf8_lossy(&o.stderr));
    let o = initctl_images(&images, &["image", "import", &docker_archive.display().to_string()]);
    assert!(o.status.success(), "docker save: {}", String::from_utf8_lossy(&o.stderr));
    let list = String::from_utf8_lossy(&initctl_images(&images, &["image", "list"]).stdout).into_owned();
    assert!(list.contains("bb:oci") && list.contains("keel/bb:saved"), "{list}");
    let inspect = initctl_images(&images, &["--json", "image", "inspect", "keel/bb:saved"]);
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap_or_else(|e| panic!("inspect: {e}: {}", String::from_utf8_lossy(&inspect.stderr)));
    assert_eq!(v["config"]["config"]["Cmd"][0], "sh", "{v}");

    // A registry on loopback, fed by skopeo with a gzip and a zstd layer.
    let port = 15000 + (std::process::id() % 1000) as u16;
    let cfg = format!("version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n", dir.path().join("registry").display());
    std::fs::write(dir.path().join("registry.yml"), cfg).expect("config");
    let mut registry = Command::new("docker-registry").arg("serve").arg(dir.path().join("registry.yml")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("docker-registry");
    let base = format!("127.0.0.1:{port}/keel/busybox");
    let zstd_layout = dir.path().join("zstd-layout");
    zstd_busybox(&layout, &zstd_layout);
    let deadline = Instant::now() + LONG;
    for (src, tag) in [(&layout, "gz"), (&zstd_layout, "zst")] {
        loop {
            let o = Command::new("skopeo").args(["copy", "--quiet", "--dest-tls-verify=false"]).arg(format!("oci:{}:latest", src.display())).arg(format!("docker://{base}:{tag}")).output().expect("skopeo");
            if o.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "push to the registry: {}", String::from_utf8_lossy(&o.stderr));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let pulled = dir.path().join("pulled");
    for tag in ["gz", "zst"] {
        let o = initctl_images(&pulled, &["image", "pull", &format!("{base}:{tag}")]);
        assert!(o.status.success(), "pull {tag}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let digest = String::from_utf8_lossy(&Command::new("skopeo").args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"]).arg(format!("docker://{base}:gz")).output().expect("skopeo").stdout).trim().to_string();
    let o = initctl_images(&pulled, &["image", "pull", &format!("{base}@{digest}")]);
    assert!(o.status.success(), "pull by digest {digest}: {}", String::from_utf8_lossy(&o.stderr));
    let _ = registry.kill();
    let _ = registry.wait();
    let list = String::from_utf8_lossy(&initctl_images(&pulled, &["image", "list"]).stdout).into_owned();
    assert!(list.contains(&format!("{base}:gz")) && list.contains(&format!("{base}:zst")), "{list}");
    // rm + prune leave only what the remaining images use.
    assert!(initctl_images(&pulled, &["image", "rm", &format!("{base}:zst")]).status.success());
    assert!(initctl_images(&pulled, &["image", "prune"]).status.success());
    let layers = std::fs::read_dir(pulled.join("layers")).expect("layers").count();
    assert_eq!(layers, 1, "one layer left after removing the zstd image");
}

/// The busybox layout with its layer recompressed with zstd.
fn zstd_busybox(from: &Path, to: &Path) {
    use std::io::Read;
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(from.join("index.json")).expect("index")).expect("json");
    let m = index["manifests"][0]["digest"].as_str().expect("digest");
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(from.join("blobs/sha256").join(&m[7..])).expect("m")).expect("json");
    let c = manifest["config"]["digest"].as_str().expect("config");
    let config: keel_init::images::oci::ImageConfig = serde_json::from_slice(&std::fs::read(from.join("blobs/sha256").join(&c[7..])).expect("c")).expect("json");
    let l = manifest["layers"][0]["digest"].as_str().expect("layer");
    let gz = std::fs::read(from.join("blobs/sha256").join(&l[7..])).expect("layer");
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut plain).expect("gunzip");
    let zst = zstd::encode_all(&plain[..], 3).expect("zstd");
    keel_init::images::import::write_oci_layout(to, "latest", &config, &[zst]).expect("layout");
}

fn cycle_without_leaks(cycles: usize) {
    // The shell is PID 1 of the container: without a handler it would never see SIGTERM (see docs/containers.md).
    let u = unit("trap \"exit 0\" TERM; echo up; sleep 1000 & wait", "TimeoutStopSec=5", "Network=private");
    let b = Cbox::start(&[("cycle.service", &u)], &[]);
    // One warm-up cycle creates the bridge and the journal's files; count after it.
    assert!(b.ctl(&["start", "cycle.service"]).status.success(), "{}", b.t.console());
    assert!(b.ctl(&["stop", "cycle.service"]).status.success());
    wait_until("init to close the last initctl connection", LONG, || b.init_connections() == 0);
    let fds = b.init_fds();
    let cgroups = b.cgroups();
    let t0 = Instant::now();
    for i in 0..cycles {
        let o = b.ctl(&["start", "cycle.service"]);
        assert!(o.status.success(), "start {i}: {}\n{}", String::from_utf8_lossy(&o.stderr), b.t.console());
        let o = b.ctl(&["stop", "cycle.service"]);
        assert!(o.status.success(), "stop {i}: {}", String::from_utf8_lossy(&o.stderr));
    }
    eprintln!("{cycles} start/stop cycles in {:?}", t0.elapsed());
    assert!(b.host_mounts().is_empty(), "mounts left: {:?}", b.host_mounts());
    assert!(b.leftovers().is_empty(), "files left: {:?}", b.leftovers());
    let settled = eventually(LONG, || b.init_connections() == 0 && b.init_fds().len() == fds.len());
    assert!(settled, "init's open fds, before the cycles and now:\n{fds:?}\n{:?}", b.init_fds());
    wait_until(&format!("the cgroups back to {cgroups}"), LONG, || b.cgroups() == cgroups);
    wait_until("veths to go with their containers", LONG, || b.links().iter().filter(|l| l.starts_with("kv")).count() == 0);
}

#[test]
fn two_hundred_start_stop_cycles_leak_nothing() {
    cycle_without_leaks(200);
}

#[test]
#[ignore = "long: 1000 cycles (40 s release, 100 s debug); run with --ignored"]
fn a_thousand_start_stop_cycles_leak_nothing() {
    cycle_without_leaks(1000);
}

fn cgroup2_has(controller: &str) -> bool {
    cgroup2_root().and_then(|r| std::fs::read_to_string(r.join("cgroup.controllers")).ok()).is_some_and(|c| c.split_whitespace().any(|x| x == controller))
}

/// cgroup2's memory controller, or a v1 memory hierarchy the runtime falls back to (hybrid hosts).
fn can_limit(controller: &str) -> bool {
    cgroup2_has(controller) || Path::new("/sys/fs/cgroup").join(controller).join("cgroup.procs").exists()
}

#[test]
fn memory_max_kills_a_hog_and_the_unit_reports_oom() {
    assert!(can_limit("memory"), "no memory controller, neither in cgroup2 nor as a v1 hierarchy");
    // The shell itself (PID 1 of the container) holds 100 MB: it is what the OOM killer picks.
    let u = unit("echo start; x=$(head -c 100000000 /dev/zero | tr -c a b); echo survived ${#x}", "MemoryMax=32M", "");
    let b = Cbox::start(&[("hog.service", &u)], &["hog.service"]);
    b.t.wait_active("hog.service", "failed", LONG);
    let st = b.t.status("hog.service");
    assert_eq!(st["status"]["result"], "oom-kill", "{st}\n{}", b.logs("hog.service"));
    assert!(!b.logs("hog.service").contains("survived"), "{}", b.logs("hog.service"));
    wait_until("cleanup", LONG, || b.leftovers().is_empty());
}

#[test]
fn tasks_max_stops_a_fork_bomb() {
    assert!(can_limit("pids"), "no pids controller, neither in cgroup2 nor as a v1 hierarchy");
    // The shell counts its children with builtins only; busybox sh gives up (exit 2, "can't fork") when fork fails.
    let u = unit("n=0; for i in $(seq 200); do sleep 100 & n=$((n+1)); echo forked=$n; done; echo loop-done; wait", "TasksMax=20", "");
    let b = Cbox::start(&[("bomb.service", &u)], &["bomb.service"]);
    wait_until("the bomb to be stopped", LONG, || b.t.active("bomb.service") == "failed");
    let logs = b.logs("bomb.service");
    let forked = logs.lines().filter_map(|l| l.split("forked=").nth(1)).filter_map(|n| n.trim().parse::<usize>().ok()).max().unwrap_or(0);
    assert!((5..20).contains(&forked), "TasksMax=20 holds: {forked} children ran\n{logs}");
    assert!(logs.contains("can't fork") && !logs.contains("loop-done"), "{logs}");
    wait_until("cleanup", LONG, || b.leftovers().is_empty());
}
