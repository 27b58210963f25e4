//! Building and signing payloads (used by `mkpayload` in the image crate).
//!
//! Owns: compressing each chunk independently, filling in the manifest and signing its exact bytes.
//! Does not: choose versions or channels (the caller does) or manage key files (see `keys`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{
    read_exact_or_truncated, Chunk, Header, KeyPair, Manifest, PayloadError, Result, Target,
    TargetKind, DEFAULT_CHUNK_SIZE, FORMAT_VERSION, SIG_BLOCK_LEN,
};

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub version: String,
    pub channel: String,
    pub min_version: Option<String>,
    pub chunk_size: u32,
    /// zstd level (1–19; 3 is zstd's default).
    pub level: i32,
}

impl BuildSpec {
    pub fn new(version: &str, channel: &str) -> BuildSpec {
        BuildSpec {
            version: version.to_string(),
            channel: channel.to_string(),
            min_version: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            level: 3,
        }
    }
}

/// Compresses `input` chunk by chunk into `scratch`, returning the target description.
fn compress_target(
    kind: TargetKind,
    input: &mut impl Read,
    size: u64,
    spec: &BuildSpec,
    scratch: &mut impl Write,
) -> Result<Target> {
    let mut comp = zstd::bulk::Compressor::new(spec.level).map_err(|e| {
        PayloadError::io(
            format!("creating zstd compressor at level {}", spec.level),
            e,
        )
    })?;
    let mut buf = vec![0u8; spec.chunk_size as usize];
    let mut out = Vec::with_capacity(super::max_compressed(spec.chunk_size) as usize);
    let mut remaining = size;
    let mut chunks = Vec::new();
    while remaining > 0 {
        let n = remaining.min(spec.chunk_size as u64) as usize;
        read_exact_or_truncated(input, &mut buf[..n], &format!("{kind} input"))?;
        out.clear();
        comp.compress_to_buffer(&buf[..n], &mut out).map_err(|e| {
            PayloadError::io(format!("compressing {kind} chunk {}", chunks.len()), e)
        })?;
        scratch
            .write_all(&out)
            .map_err(|e| PayloadError::io("writing scratch file", e))?;
        chunks.push(Chunk {
            sha256: hex::encode(Sha256::digest(&buf[..n])),
            csize: out.len() as u32,
        });
        remaining -= n as u64;
    }
    Ok(Target {
        name: kind,
        size,
        chunks,
    })
}

/// Writes header, manifest and signature block for `manifest_bytes` signed by `key`.
pub fn write_head(out: &mut impl Write, manifest_bytes: &[u8], key: &KeyPair) -> Result<()> {
    let hdr = Header {
        format: FORMAT_VERSION,
        manifest_len: manifest_bytes.len() as u32,
        sig_len: SIG_BLOCK_LEN,
    };
    let io = |e| PayloadError::io("writing payload head", e);
    out.write_all(&hdr.encode()).map_err(io)?;
    out.write_all(manifest_bytes).map_err(io)?;
    out.write_all(&key.id_bytes()).map_err(io)?;
    out.write_all(&key.sign(manifest_bytes)).map_err(io)?;
    Ok(())
}

/// Builds a signed payload at `out` from a USR image and a kernel image (UKI).
/// Uses `<out>.chunks.tmp` as scratch space; it is removed afterwards.
pub fn build_payload(
    spec: &BuildSpec,
    usr: &Path,
    kernel: &Path,
    key: &KeyPair,
    out: &Path,
) -> Result<Manifest> {
    let scratch_path = PathBuf::from(format!("{}.chunks.tmp", out.display()));
    let result = build_inner(spec, usr, kernel, key, out, &scratch_path);
    let _ = std::fs::remove_file(&scratch_path);
    if result.is_err() {
        let _ = std::fs::remove_file(out);
    }
    result
}

fn build_inner(
    spec: &BuildSpec,
    usr: &Path,
    kernel: &Path,
    key: &KeyPair,
    out: &Path,
    scratch_path: &Path,
) -> Result<Manifest> {
    let mut scratch = BufWriter::new(
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(scratch_path)
            .map_err(|e| PayloadError::io(format!("creating {}", scratch_path.display()), e))?,
    );
    let mut targets = Vec::new();
    for (kind, path) in [(TargetKind::Usr, usr), (TargetKind::Kernel, kernel)] {
        let f = File::open(path)
            .map_err(|e| PayloadError::io(format!("opening {kind} image {}", path.display()), e))?;
        let size = f
            .metadata()
            .map_err(|e| PayloadError::io(format!("stat {}", path.display()), e))?
            .len();
        targets.push(compress_target(
            kind,
            &mut BufReader::new(f),
            size,
            spec,
            &mut scratch,
        )?);
    }
    let manifest = Manifest {
        format: FORMAT_VERSION,
        version: spec.version.clone(),
        channel: spec.channel.clone(),
        min_version: spec.min_version.clone(),
        chunk_size: spec.chunk_size,
        targets,
    };
    manifest.validate()?;
    let bytes =
        serde_json::to_vec(&manifest).map_err(|e| PayloadError::ManifestSyntax(e.to_string()))?;
    if bytes.len() > super::MAX_MANIFEST_LEN as usize {
        return Err(PayloadError::ManifestTooLarge {
            len: bytes.len() as u32,
            max: super::MAX_MANIFEST_LEN,
        });
    }
    let mut scratch = scratch
        .into_inner()
        .map_err(|e| PayloadError::io("flushing scratch file", e.into_error()))?;
    scratch
        .seek(SeekFrom::Start(0))
        .map_err(|e| PayloadError::io("rewinding scratch file", e))?;
    let mut o = BufWriter::new(
        File::create(out)
            .map_err(|e| PayloadError::io(format!("creating {}", out.display()), e))?,
    );
    write_head(&mut o, &bytes, key)?;
    std::io::copy(&mut scratch, &mut o)
        .map_err(|e| PayloadError::io(format!("writing {}", out.display()), e))?;
    let f = o
        .into_inner()
        .map_err(|e| PayloadError::io(format!("flushing {}", out.display()), e.into_error()))?;
    f.sync_all()
        .map_err(|e| PayloadError::io(format!("syncing {}", out.display()), e))?;
    Ok(manifest)
}
