//! `updater-bench`: apply rate of a payload vs `zstd -dc | dd conv=fsync` into the same file, and
//! the apply path's peak RSS. Results go to docs/benchmarks.md ("updater").

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use keel_updater::payload::apply::{apply, never_cancel, ApplyOptions, Sinks};
use keel_updater::payload::build::{build_payload, BuildSpec};
use keel_updater::payload::{KeyPair, TrustedKeys};

#[derive(Parser)]
#[command(
    name = "updater-bench",
    about = "Benchmark payload apply against zstd -dc | dd conv=fsync",
    long_about = "Benchmark payload apply against `zstd -dc | dd conv=fsync` into the same file.\n\n\
Builds a USR image of --size MiB from files under /usr (real binaries and libraries, so the\n\
compression ratio is realistic), a signed payload and a plain .zst of it, then alternates the two\n\
apply paths --runs times and prints a Markdown table (median rates, peak RSS of the apply process).\n\n\
Example:\n  updater-bench --size 256 --runs 3 --dir /var/tmp/keel-bench"
)]
struct Args {
    /// USR image size in MiB
    #[arg(long, default_value_t = 256)]
    size: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Scratch directory (needs ~3x size free)
    #[arg(long, default_value = "/var/tmp/keel-updater-bench")]
    dir: PathBuf,
    /// zstd level for both the payload and the baseline
    #[arg(long, default_value_t = 3)]
    level: i32,
    #[command(subcommand)]
    child: Option<Child>,
}

#[derive(Subcommand)]
enum Child {
    /// (internal) apply one payload into a file and print seconds and VmHWM
    ApplyChild {
        payload: PathBuf,
        pubkey_seed: String,
        target: PathBuf,
    },
}

fn fill_image(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut written = 0u64;
    let mut stack = vec![PathBuf::from("/usr")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                if let Ok(b) = std::fs::read(&p) {
                    let n = (b.len() as u64).min(size - written) as usize;
                    out.write_all(&b[..n])?;
                    written += n as u64;
                    if written >= size {
                        return Ok(out.flush()?);
                    }
                }
            }
        }
    }
    // Not enough files: pad with zeros (compresses well, noted in the output).
    let zeros = vec![0u8; 1 << 20];
    while written < size {
        let n = (size - written).min(zeros.len() as u64) as usize;
        out.write_all(&zeros[..n])?;
        written += n as u64;
    }
    Ok(out.flush()?)
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn apply_child(payload: &Path, seed: &str, target: &Path) -> Result<()> {
    let seed: [u8; 32] = hex::decode(seed)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("seed must be 32 bytes"))?;
    let keys = TrustedKeys::from_keys([KeyPair::from_seed(seed).public()], "bench");
    let t = Instant::now();
    let f = std::fs::File::open(payload)?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    let usr = std::fs::OpenOptions::new().write(true).open(target)?;
    let kernel = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(target.with_extension("efi"))?;
    let mut sinks = Sinks {
        usr: Box::new(usr),
        kernel: Box::new(kernel),
    };
    let cancel = never_cancel();
    apply(
        &mut r,
        &mut sinks,
        ApplyOptions {
            keys: &keys,
            running_version: None,
            allow_downgrade: false,
            progress: &mut |_| {},
            cancel: &cancel,
        },
    )?;
    println!("{} {}", t.elapsed().as_secs_f64(), vm_hwm_kib());
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(Child::ApplyChild {
        payload,
        pubkey_seed,
        target,
    }) = &a.child
    {
        return apply_child(payload, pubkey_seed, target);
    }
    std::fs::create_dir_all(&a.dir)?;
    let size = a.size << 20;
    let usr = a.dir.join("usr.img");
    let uki = a.dir.join("uki.efi");
    let payload = a.dir.join("bench.payload");
    let zst = a.dir.join("usr.img.zst");
    let target = a.dir.join("target.img");
    eprintln!("building a {} MiB image from /usr ...", a.size);
    fill_image(&usr, size)?;
    std::fs::write(&uki, vec![0x5au8; 1 << 20])?;
    let seed = [42u8; 32];
    let key = KeyPair::from_seed(seed);
    let mut spec = BuildSpec::new("1.0.0", "bench");
    spec.level = a.level;
    let t = Instant::now();
    build_payload(&spec, &usr, &uki, &key, &payload)?;
    let build_s = t.elapsed().as_secs_f64();
    let st = Command::new("zstd")
        .arg(format!("-{}", a.level))
        .args(["-q", "-f", "-T1", "-o"])
        .arg(&zst)
        .arg(&usr)
        .status()
        .context("running zstd (apt-get install zstd)")?;
    if !st.success() {
        bail!("zstd failed");
    }
    std::fs::File::create(&target)?.set_len(size)?;
    let self_exe = std::env::current_exe()?;
    let (mut base, mut ours, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..a.runs {
        let t = Instant::now();
        let cmd = format!(
            "zstd -dc '{}' | dd of='{}' bs=1M conv=fsync,notrunc status=none",
            zst.display(),
            target.display()
        );
        if !Command::new("sh").arg("-c").arg(&cmd).status()?.success() {
            bail!("baseline failed: {cmd}");
        }
        base.push(t.elapsed().as_secs_f64());
        let out = Command::new(&self_exe)
            .arg("apply-child")
            .arg(&payload)
            .arg(hex::encode(seed))
            .arg(&target)
            .output()?;
        if !out.status.success() {
            bail!("apply failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace();
        ours.push(it.next().context("child output")?.parse::<f64>()?);
        rss.push(it.next().context("child output")?.parse::<f64>()?);
        eprintln!(
            "run {run}: zstd|dd {:.3}s, apply {:.3}s",
            base[run], ours[run]
        );
    }
    let mib = a.size as f64;
    let (b, o) = (median(base), median(ours));
    let psize = std::fs::metadata(&payload)?.len();
    let zsize = std::fs::metadata(&zst)?.len();
    println!("| measure | value |\n|---|---|");
    println!("| USR image | {} MiB from /usr files |", a.size);
    println!(
        "| payload size (level {}, 2 MiB chunks) | {:.1} MiB ({:.1}% of USR) |",
        a.level,
        psize as f64 / 1048576.0,
        100.0 * psize as f64 / size as f64
    );
    println!(
        "| plain .zst of the same image | {:.1} MiB |",
        zsize as f64 / 1048576.0
    );
    println!(
        "| payload build (mkpayload, 1 thread) | {:.2} s ({:.0} MiB/s) |",
        build_s,
        mib / build_s
    );
    println!(
        "| `zstd -dc \\| dd conv=fsync` (median of {}) | {:.3} s = {:.0} MiB/s |",
        a.runs,
        b,
        mib / b
    );
    println!(
        "| Keel apply, signature + every chunk hash + fsync (median) | {:.3} s = {:.0} MiB/s |",
        o,
        mib / o
    );
    println!("| ratio apply / baseline | {:.2}x |", b / o);
    println!(
        "| peak RSS of the apply process (VmHWM, max) | {:.1} MiB |",
        rss.iter().cloned().fold(0.0, f64::max) / 1024.0
    );
    for p in [&usr, &uki, &payload, &zst, &target] {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_file(target.with_extension("efi"));
    Ok(())
}
