//! The image store: OCI images on local disk, content-addressed, with every layer unpacked once for overlayfs.
//!
//! Owns: everything under the store root (default `/var/lib/keel/images`):
//! - `blobs/sha256/<hex>`: manifests, configs and layer tarballs, named by the sha256 of their bytes. A blob is
//!   only ever written through [`Store::put_blob`], which hashes while copying and refuses content whose digest
//!   differs from the one it was announced with.
//! - `layers/<hex>/`: the unpacked tree of layer blob `<hex>` (whiteouts already in overlayfs form), shared by
//!   every image with that layer and used as an overlayfs lowerdir. Unpacked into `tmp/` and renamed, so a
//!   directory there is always complete.
//! - `images.json`: the image records (names, manifest, config, layers), replaced atomically.
//! - `leases/<unit>`: the image a running container uses (written by `runtime`), so `rm`/`prune` keep it.
//! - `lock`: an flock taken for every change.
//!
//! Does not: run containers (see `runtime`) or parse archives and registries (see `import` and `pull`,
//! which only call `put_blob` and `register`).

pub mod cli;
pub mod import;
pub mod oci;
pub mod pull;
pub mod unpack;

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use oci::{ImageConfig, Manifest};

pub const DEFAULT_ROOT: &str = "/var/lib/keel/images";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("blob {expected} ({what}) is corrupt: its content hashes to {actual}; the image is damaged, export or pull it again")]
    DigestMismatch { expected: String, actual: String, what: String },
    #[error("{0:?} is not a sha256 digest (expected sha256:<64 hex digits>)")]
    BadDigest(String),
    #[error("{what} references blob {digest}, which is missing from {source_name}")]
    MissingBlob { what: String, digest: String, source_name: String },
    #[error("{what} is not valid JSON: {err}")]
    Json { what: String, err: serde_json::Error },
    #[error("no image named {0:?} in the store; `initctl image list` shows what is there, `initctl image import|pull` adds one")]
    UnknownImage(String),
    #[error("{0:?} matches more than one image; give more of the id or the full name")]
    Ambiguous(String),
    #[error("image {image} is used by running container {unit}; stop it first")]
    InUse { image: String, unit: String },
    #[error("{path}: not an OCI image layout, oci-archive or docker-save tarball ({why})")]
    UnknownFormat { path: PathBuf, why: String },
    #[error("layer {digest}: {why}")]
    Layer { digest: String, why: String },
    #[error("no manifest for {platform} in the image index of {image}")]
    NoPlatform { image: String, platform: String },
    #[error("registry {registry}: {why}")]
    Registry { registry: String, why: String },
    #[error("{0:?} is not an image reference (expected [registry/]name[:tag][@sha256:digest])")]
    BadReference(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_path_buf(), source }
}

/// One image in the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// `name:tag` references that point at this image (may be empty for an untagged image).
    pub names: Vec<String>,
    /// Digest of the manifest blob.
    pub manifest: String,
    /// Digest of the config blob; its first 12 hex digits are the image id.
    pub config: String,
    /// Layer blob digests, bottom first.
    pub layers: Vec<String>,
    /// Total size of the blobs in bytes.
    pub size: u64,
    /// When it was added (seconds since the epoch).
    pub added: u64,
}

impl ImageRecord {
    pub fn id(&self) -> &str {
        let hex = self.config.strip_prefix("sha256:").unwrap_or(&self.config);
        &hex[..hex.len().min(12)]
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IndexFile {
    images: Vec<ImageRecord>,
}

/// What `prune` removed.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PruneReport {
    pub blobs: usize,
    pub layers: usize,
    pub bytes: u64,
}

pub struct Store {
    root: PathBuf,
}

/// `sha256:<hex>` → `<hex>`, checking the shape (it becomes a file name).
pub fn digest_hex(d: &str) -> Result<&str, ImageError> {
    let hex = d.strip_prefix("sha256:").ok_or_else(|| ImageError::BadDigest(d.to_string()))?;
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        Ok(hex)
    } else {
        Err(ImageError::BadDigest(d.to_string()))
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `busybox` → `busybox:latest`; references with a tag or digest are kept as they are.
pub fn normalize_name(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if name.contains('@') || last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

impl Store {
    /// Open (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Store, ImageError> {
        for d in ["blobs/sha256", "layers", "tmp", "leases"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Store { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.exists())
    }

    pub fn layer_dir(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("layers").join(digest_hex(digest)?))
    }

    /// An empty directory, used as an extra overlayfs lower layer when an image has a single layer.
    pub fn empty_dir(&self) -> Result<PathBuf, ImageError> {
        let p = self.root.join("empty");
        fs::create_dir_all(&p).map_err(io_err(&p))?;
        Ok(p)
    }

    /// Take the store's lock (exclusive) for the life of the returned file.
    pub fn lock(&self) -> Result<fs::File, ImageError> {
        let p = self.root.join("lock");
        let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).map_err(io_err(&p))?;
        rustix::fs::flock(f.as_fd(), rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| ImageError::Io { path: p.clone(), source: e.into() })?;
        Ok(f)
    }

    /// Copy `reader` into the store while hashing it. With `expected`, content whose digest differs is refused
    /// (and not kept); `what` names the blob's origin for that message. Returns (digest, size).
    pub fn put_blob(&self, reader: &mut dyn Read, expected: Option<&str>, what: &str) -> Result<(String, u64), ImageError> {
        if let Some(e) = expected {
            digest_hex(e)?;
        }
        let tmp = self.root.join("tmp").join(format!("blob-{}-{}", std::process::id(), unique()));
        let mut out = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 128 * 1024];
        let mut size = 0u64;
        let res: Result<(), ImageError> = (|| {
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source) => return Err(ImageError::Io { path: PathBuf::from(what), source }),
                };
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io_err(&tmp))?;
                size += n as u64;
            }
            Ok(())
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let digest = format!("sha256:{}", hex(&hasher.finalize()));
        if let Some(e) = expected {
            if e != digest {
                let _ = fs::remove_file(&tmp);
                return Err(ImageError::DigestMismatch { expected: e.to_string(), actual: digest, what: what.to_string() });
            }
        }
        let dst = self.blob_path(&digest)?;
        fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
        Ok((digest, size))
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let p = self.blob_path(digest)?;
        fs::read(&p).map_err(io_err(&p))
    }

    fn read_index(&self) -> Result<IndexFile, ImageError> {
        let p = self.root.join("images.json");
        match fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| ImageError::Json { what: p.display().to_string(), err }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(IndexFile::default()),
            Err(e) => Err(ImageError::Io { path: p, source: e }),
        }
    }

    fn write_index(&self, idx: &IndexFile) -> Result<(), ImageError> {
        let p = self.root.join("images.json");
        let tmp = self.root.join("tmp/images.json");
        let bytes = serde_json::to_vec_pretty(idx).map_err(|err| ImageError::Json { what: "image index".into(), err })?;
        fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &p).map_err(io_err(&p))
    }

    /// Record an image whose manifest blob (and everything it references) is already in the store: check the
    /// blobs, unpack the layers, and point `names` at it (moving those names off other images).
    pub fn register(&self, names: &[String], manifest_digest: &str, source_name: &str) -> Result<ImageRecord, ImageError> {
        let manifest = self.manifest(manifest_digest)?;
        let what = format!("manifest {manifest_digest}");
        let mut size = 0;
        for d in std::iter::once(&manifest.config).chain(manifest.layers.iter()) {
            let p = self.blob_path(&d.digest)?;
            match fs::metadata(&p) {
                Ok(m) => size += m.len(),
                Err(_) => {
                    return Err(ImageError::MissingBlob { what, digest: d.digest.clone(), source_name: source_name.into() })
                }
            }
        }
        for l in &manifest.layers {
            self.ensure_layer(&l.digest)?;
        }
        let names: Vec<String> = names.iter().map(|n| normalize_name(n)).collect();
        let rec = ImageRecord {
            names: names.clone(),
            manifest: manifest_digest.to_string(),
            config: manifest.config.digest.clone(),
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            size,
            added: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        };
        let _lock = self.lock()?;
        let mut idx = self.read_index()?;
        for other in idx.images.iter_mut() {
            other.names.retain(|n| !names.contains(n));
        }
        let rec = match idx.images.iter_mut().find(|r| r.manifest == rec.manifest) {
            Some(existing) => {
                for n in names {
                    if !existing.names.contains(&n) {
                        existing.names.push(n);
                    }
                }
                existing.clone()
            }
            None => {
                idx.images.push(rec.clone());
                rec
            }
        };
        self.write_index(&idx)?;
        Ok(rec)
    }

    pub fn manifest(&self, digest: &str) -> Result<Manifest, ImageError> {
        let bytes = self.read_blob(digest)?;
        serde_json::from_slice(&bytes).map_err(|err| ImageError::Json { what: format!("manifest {digest}"), err })
    }

    pub fn config(&self, rec: &ImageRecord) -> Result<ImageConfig, ImageError> {
        let bytes = self.read_blob(&rec.config)?;
        serde_json::from_slice(&bytes).map_err(|err| ImageError::Json { what: format!("image config {}", rec.config), err })
    }

    /// Unpack layer blob `digest` into `layers/<hex>` unless that is already there.
    pub fn ensure_layer(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let dst = self.layer_dir(digest)?;
        if dst.exists() {
            return Ok(dst);
        }
        let blob = self.blob_path(digest)?;
        let tmp = self.root.join("tmp").join(format!("layer-{}-{}", std::process::id(), unique()));
        let res = unpack::unpack_layer(&blob, &tmp).map_err(|why| ImageError::Layer { digest: digest.into(), why });
        if let Err(e) = res {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if let Err(e) = fs::rename(&tmp, &dst) {
            let _ = fs::remove_dir_all(&tmp);
            if !dst.exists() {
                return Err(ImageError::Io { path: dst, source: e });
            }
        }
        Ok(dst)
    }

    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        Ok(self.read_index()?.images)
    }

    /// Find an image by name (`busybox` means `busybox:latest`), id prefix, or manifest/config digest.
    pub fn resolve(&self, reference: &str) -> Result<ImageRecord, ImageError> {
        let images = self.read_index()?.images;
        let full = normalize_name(reference);
        // `docker save` and skopeo record Docker Hub names in full; `keel/web:1` finds `docker.io/keel/web:1`.
        let short = |n: &str| -> String {
            n.strip_prefix("docker.io/library/").or_else(|| n.strip_prefix("docker.io/")).unwrap_or(n).to_string()
        };
        if let Some(r) = images.iter().find(|r| r.names.iter().any(|n| *n == full || n == reference || short(n) == short(&full))) {
            return Ok(r.clone());
        }
        let needle = reference.strip_prefix("sha256:").unwrap_or(reference);
        if needle.len() >= 4 && needle.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<&ImageRecord> = images
                .iter()
                .filter(|r| {
                    r.config.trim_start_matches("sha256:").starts_with(needle)
                        || r.manifest.trim_start_matches("sha256:").starts_with(needle)
                })
                .collect();
            match hits.len() {
                1 => return Ok(hits[0].clone()),
                0 => {}
                _ => return Err(ImageError::Ambiguous(reference.into())),
            }
        }
        Err(ImageError::UnknownImage(reference.into()))
    }

    /// Units whose running container uses the image with manifest `manifest`.
    pub fn leases_of(&self, manifest: &str) -> Vec<String> {
        let dir = self.root.join("leases");
        fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| fs::read_to_string(e.path()).is_ok_and(|s| s.trim() == manifest))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    pub fn add_lease(&self, unit: &str, manifest: &str) -> Result<(), ImageError> {
        let p = self.root.join("leases").join(unit);
        fs::write(&p, manifest).map_err(io_err(&p))
    }

    pub fn drop_lease(&self, unit: &str) {
        let _ = fs::remove_file(self.root.join("leases").join(unit));
    }

    /// Remove an image record (its blobs go at the next `prune`). A name removes only that name when the image
    /// has others.
    pub fn remove(&self, reference: &str) -> Result<ImageRecord, ImageError> {
        let rec = self.resolve(reference)?;
        if let Some(unit) = self.leases_of(&rec.manifest).into_iter().next() {
            return Err(ImageError::InUse { image: reference.into(), unit });
        }
        let _lock = self.lock()?;
        let mut idx = self.read_index()?;
        let full = normalize_name(reference);
        let by_name = rec.names.len() > 1 && rec.names.contains(&full);
        if by_name {
            if let Some(r) = idx.images.iter_mut().find(|r| r.manifest == rec.manifest) {
                r.names.retain(|n| *n != full);
            }
        } else {
            idx.images.retain(|r| r.manifest != rec.manifest);
        }
        self.write_index(&idx)?;
        Ok(rec)
    }

    /// Remove untagged images no container uses, then every blob and unpacked layer no image references.
    pub fn prune(&self) -> Result<PruneReport, ImageError> {
        let _lock = self.lock()?;
        let mut idx = self.read_index()?;
        let leased: Vec<String> = fs::read_dir(self.root.join("leases"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| fs::read_to_string(e.path()).ok())
            .map(|s| s.trim().to_string())
            .collect();
        idx.images.retain(|r| !r.names.is_empty() || leased.contains(&r.manifest));
        self.write_index(&idx)?;
        let mut keep = std::collections::HashSet::new();
        for r in &idx.images {
            keep.insert(r.manifest.clone());
            keep.insert(r.config.clone());
            keep.extend(r.layers.iter().cloned());
        }
        let mut report = PruneReport::default();
        let blobs = self.root.join("blobs/sha256");
        for e in fs::read_dir(&blobs).map_err(io_err(&blobs))?.flatten() {
            let d = format!("sha256:{}", e.file_name().to_string_lossy());
            if !keep.contains(&d) {
                report.bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                if fs::remove_file(e.path()).is_ok() {
                    report.blobs += 1;
                }
            }
        }
        let layers = self.root.join("layers");
        for e in fs::read_dir(&layers).map_err(io_err(&layers))?.flatten() {
            let d = format!("sha256:{}", e.file_name().to_string_lossy());
            if !keep.contains(&d) && fs::remove_dir_all(e.path()).is_ok() {
                report.layers += 1;
            }
        }
        // Leftovers of interrupted imports.
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let _ = if e.path().is_dir() { fs::remove_dir_all(e.path()) } else { fs::remove_file(e.path()) };
        }
        Ok(report)
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    (u64::from(t) << 16) ^ N.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_latest_unless_tagged() {
        assert_eq!(normalize_name("busybox"), "busybox:latest");
        assert_eq!(normalize_name("localhost:5000/busybox"), "localhost:5000/busybox:latest");
        assert_eq!(normalize_name("localhost:5000/busybox:1"), "localhost:5000/busybox:1");
        assert_eq!(normalize_name("x@sha256:00"), "x@sha256:00");
    }

    #[test]
    fn corrupt_blob_is_refused_and_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let good = format!("sha256:{}", sha256_hex(b"hello"));
        let (d, n) = store.put_blob(&mut &b"hello"[..], Some(&good), "test").expect("good blob");
        assert_eq!((d.as_str(), n), (good.as_str(), 5));
        let err = store.put_blob(&mut &b"hellO"[..], Some(&good), "blobs/sha256/x in a.tar").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&good) && msg.contains("a.tar") && msg.contains("corrupt"), "{msg}");
        assert!(digest_hex("sha256:../../etc").is_err());
    }
}
