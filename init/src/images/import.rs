//! Importing images from files: an OCI image layout directory, an `oci-archive` tarball (`skopeo copy …
//! oci-archive:x.tar`), or a `docker save` tarball (old layout with `manifest.json` and `<id>/layer.tar`, or the
//! OCI-layout form newer Docker writes). Tarballs may be gzip- or zstd-compressed.
//!
//! Owns: reading those formats in one pass. Every blob goes through [`Store::put_blob`] with the digest its path
//! announces (`blobs/sha256/<hex>`, `<hex>.json`) or, for docker-save layers, checked against the config's
//! `rootfs.diff_ids`; a mismatch refuses the import and names the blob. Does not: unpack layers or keep records
//! (see `Store::register`).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::oci::{self, DockerSaveEntry, ImageConfig, Index, Manifest};
use super::{io_err, ImageError, ImageRecord, Store};

/// What one pass over the source left: small JSON documents by path, and blob digests by path.
#[derive(Default)]
struct Pass {
    docs: BTreeMap<String, Vec<u8>>,
    blobs: BTreeMap<String, String>,
}

const MAX_DOC: u64 = 4 * 1024 * 1024;

fn clean(p: &str) -> String {
    p.trim_start_matches("./").trim_start_matches('/').to_string()
}

/// The digest a path announces: `blobs/sha256/<hex>` or docker-save's `<hex>.json`.
fn announced(path: &str) -> Option<String> {
    if let Some(hex) = path.strip_prefix("blobs/sha256/") {
        return Some(format!("sha256:{hex}"));
    }
    let hex = path.strip_suffix(".json")?;
    (hex.len() == 64 && !hex.contains('/')).then(|| format!("sha256:{hex}"))
}

fn take(store: &Store, pass: &mut Pass, path: String, size: u64, r: &mut dyn Read, source: &str) -> Result<(), ImageError> {
    let is_doc = matches!(path.as_str(), "index.json" | "manifest.json" | "oci-layout" | "repositories");
    if is_doc {
        let mut buf = Vec::new();
        r.take(MAX_DOC).read_to_end(&mut buf).map_err(io_err(Path::new(source)))?;
        pass.docs.insert(path, buf);
        return Ok(());
    }
    let expected = announced(&path);
    if let Some(e) = &expected {
        // Already stored blobs were verified when they were written.
        if store.has_blob(e) && super::digest_hex(e).is_ok() {
            pass.blobs.insert(path, e.clone());
            return Ok(());
        }
    }
    let _ = size;
    let (digest, _) = store.put_blob(r, expected.as_deref(), &format!("{path} in {source}"))?;
    pass.blobs.insert(path, digest);
    Ok(())
}

/// Import every image in `path`. `name` overrides the names found in the source (for a single image).
pub fn import(store: &Store, path: &Path, name: Option<&str>) -> Result<Vec<ImageRecord>, ImageError> {
    let source = path.display().to_string();
    let mut pass = Pass::default();
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if meta.is_dir() {
        let mut files = Vec::new();
        walk(path, path, &mut files).map_err(io_err(path))?;
        for rel in files {
            let full = path.join(&rel);
            let mut f = fs::File::open(&full).map_err(io_err(&full))?;
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            take(store, &mut pass, clean(&rel.to_string_lossy()), size, &mut f, &source)?;
        }
    } else {
        let f = fs::File::open(path).map_err(io_err(path))?;
        let r = super::unpack::decompressed(BufReader::with_capacity(256 * 1024, Box::new(f) as Box<dyn Read>))
            .map_err(|why| ImageError::UnknownFormat { path: path.into(), why })?;
        let mut ar = tar::Archive::new(r);
        let entries = ar.entries().map_err(|e| ImageError::UnknownFormat { path: path.into(), why: e.to_string() })?;
        for entry in entries {
            let mut entry = entry.map_err(|e| ImageError::UnknownFormat { path: path.into(), why: e.to_string() })?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let p = entry.path().map(|p| clean(&p.to_string_lossy())).unwrap_or_default();
            let size = entry.size();
            take(store, &mut pass, p, size, &mut entry, &source)?;
        }
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    if let Some(idx) = pass.docs.get("index.json") {
        from_oci_index(store, &pass, idx, name, &stem, &source)
    } else if let Some(m) = pass.docs.get("manifest.json") {
        from_docker_save(store, &pass, m, name, &source)
    } else {
        Err(ImageError::UnknownFormat { path: path.into(), why: "it has neither index.json nor manifest.json".into() })
    }
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            walk(base, &e.path(), out)?;
        } else if t.is_file() {
            if let Ok(rel) = e.path().strip_prefix(base) {
                out.push(rel.to_path_buf());
            }
        }
    }
    Ok(())
}

fn json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|err| ImageError::Json { what: what.into(), err })
}

/// Follow an index entry down to an image manifest (through nested indexes, picking this platform).
pub fn resolve_manifest(store: &Store, digest: &str, image: &str) -> Result<String, ImageError> {
    let mut digest = digest.to_string();
    for _ in 0..4 {
        let bytes = store.read_blob(&digest)?;
        let doc: serde_json::Value = json(&bytes, &format!("manifest {digest}"))?;
        let mt = doc.get("mediaType").and_then(|v| v.as_str()).unwrap_or("");
        if !oci::is_index(mt, &doc) {
            return Ok(digest);
        }
        let idx: Index = json(&bytes, &format!("index {digest}"))?;
        let d = oci::pick_platform(&idx).ok_or_else(|| ImageError::NoPlatform {
            image: image.into(),
            platform: format!("linux/{}", oci::host_arch()),
        })?;
        digest = d.digest.clone();
    }
    Err(ImageError::Layer { digest, why: "image indexes nested too deeply".into() })
}

fn from_oci_index(
    store: &Store,
    pass: &Pass,
    idx: &[u8],
    name: Option<&str>,
    stem: &str,
    source: &str,
) -> Result<Vec<ImageRecord>, ImageError> {
    let index: Index = json(idx, &format!("index.json of {source}"))?;
    let mut out = Vec::new();
    for d in &index.manifests {
        if !store.has_blob(&d.digest) {
            return Err(ImageError::MissingBlob { what: "index.json".into(), digest: d.digest.clone(), source_name: source.into() });
        }
        let manifest = resolve_manifest(store, &d.digest, source)?;
        let ref_name = d
            .annotations
            .get("io.containerd.image.name")
            .cloned()
            .or_else(|| d.annotations.get("org.opencontainers.image.ref.name").map(|t| {
                if t.contains(':') || t.contains('/') { t.clone() } else { format!("{stem}:{t}") }
            }));
        let names: Vec<String> = match (name, ref_name) {
            (Some(n), _) => vec![n.to_string()],
            (None, Some(r)) => vec![r],
            (None, None) => vec![stem.to_string()],
        };
        out.push(store.register(&names, &manifest, source)?);
    }
    let _ = pass;
    Ok(out)
}

fn from_docker_save(store: &Store, pass: &Pass, m: &[u8], name: Option<&str>, source: &str) -> Result<Vec<ImageRecord>, ImageError> {
    let entries: Vec<DockerSaveEntry> = json(m, &format!("manifest.json of {source}"))?;
    let mut out = Vec::new();
    for e in entries {
        let lookup = |p: &str| {
            pass.blobs.get(&clean(p)).cloned().ok_or_else(|| ImageError::MissingBlob {
                what: "manifest.json".into(),
                digest: p.to_string(),
                source_name: source.into(),
            })
        };
        let config = lookup(&e.config)?;
        let cfg: ImageConfig = json(&store.read_blob(&config)?, &format!("config {}", e.config))?;
        let mut layers = Vec::new();
        for (i, l) in e.layers.iter().enumerate() {
            let digest = lookup(l)?;
            let blob = store.blob_path(&digest)?;
            let head = head_bytes(&blob);
            let compressed = head.starts_with(&[0x1f, 0x8b]) || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
            // An uncompressed layer's digest is its diff id: the config vouches for it.
            if !compressed {
                if let Some(diff) = cfg.rootfs.diff_ids.get(i) {
                    if *diff != digest {
                        return Err(ImageError::DigestMismatch {
                            expected: diff.clone(),
                            actual: digest,
                            what: format!("layer {l} in {source}"),
                        });
                    }
                }
            }
            let size = fs::metadata(&blob).map(|m| m.len()).unwrap_or(0);
            let media_type = if compressed { oci::OCI_LAYER_GZIP } else { "application/vnd.oci.image.layer.v1.tar" };
            layers.push(oci::Descriptor { media_type: media_type.into(), digest, size, ..Default::default() });
        }
        let config_size = fs::metadata(store.blob_path(&config)?).map(|m| m.len()).unwrap_or(0);
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(oci::OCI_MANIFEST.into()),
            config: oci::Descriptor { media_type: oci::OCI_CONFIG.into(), digest: config, size: config_size, ..Default::default() },
            layers,
        };
        let bytes = serde_json::to_vec(&manifest).map_err(|err| ImageError::Json { what: "manifest".into(), err })?;
        let (mdigest, _) = store.put_blob(&mut &bytes[..], None, "generated manifest")?;
        let names: Vec<String> = match name {
            Some(n) => vec![n.to_string()],
            None => e.repo_tags.clone().unwrap_or_default(),
        };
        out.push(store.register(&names, &mdigest, source)?);
    }
    Ok(out)
}

fn head_bytes(p: &Path) -> Vec<u8> {
    let mut buf = vec![0u8; 4];
    let n = fs::File::open(p).and_then(|mut f| f.read(&mut buf)).unwrap_or(0);
    buf.truncate(n);
    buf
}

/// Write a single-image OCI layout (`index.json`, `oci-layout`, `blobs/`) for `layers` (uncompressed or
/// compressed tar bytes) and `config`, tagged `tag`. Used by tests and benchmarks to make images without a
/// registry; `skopeo` reads the result as `oci:DIR:TAG`.
pub fn write_oci_layout(dir: &Path, tag: &str, config: &ImageConfig, layers: &[Vec<u8>]) -> std::io::Result<String> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> std::io::Result<(String, u64)> {
        let hex = super::sha256_hex(bytes);
        fs::write(blobs.join(&hex), bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len() as u64))
    };
    let mut cfg = config.clone();
    cfg.rootfs.kind = "layers".into();
    cfg.rootfs.diff_ids.clear();
    let mut descs = Vec::new();
    for l in layers {
        let (digest, size) = put(l)?;
        let head = l.get(..2).unwrap_or_default();
        let mut plain = Vec::new();
        let (mt, diff) = if head == [0x1f, 0x8b] {
            flate2::read::GzDecoder::new(&l[..]).read_to_end(&mut plain)?;
            (oci::OCI_LAYER_GZIP.to_string(), format!("sha256:{}", super::sha256_hex(&plain)))
        } else if l.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            plain = zstd::decode_all(&l[..])?;
            ("application/vnd.oci.image.layer.v1.tar+zstd".to_string(), format!("sha256:{}", super::sha256_hex(&plain)))
        } else {
            ("application/vnd.oci.image.layer.v1.tar".to_string(), digest.clone())
        };
        cfg.rootfs.diff_ids.push(diff);
        descs.push(oci::Descriptor { media_type: mt, digest, size, ..Default::default() });
    }
    let cfg_bytes = serde_json::to_vec(&cfg)?;
    let (cd, cs) = put(&cfg_bytes)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(oci::OCI_MANIFEST.into()),
        config: oci::Descriptor { media_type: oci::OCI_CONFIG.into(), digest: cd, size: cs, ..Default::default() },
        layers: descs,
    };
    let mbytes = serde_json::to_vec(&manifest)?;
    let (md, ms) = put(&mbytes)?;
    let mut ann = BTreeMap::new();
    ann.insert("org.opencontainers.image.ref.name".to_string(), tag.to_string());
    let index = Index {
        schema_version: 2,
        media_type: Some(oci::OCI_INDEX.into()),
        manifests: vec![oci::Descriptor { media_type: oci::OCI_MANIFEST.into(), digest: md.clone(), size: ms, annotations: ann, platform: None }],
    };
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(md)
}

/// A one-layer image of a static busybox: `/bin/busybox`, a link per applet, `/etc/passwd` (root, nobody),
/// `/etc/group`, and empty `/proc /sys /dev /tmp`. Written as an OCI layout in `dir`. For tests, benchmarks and
/// as a minimal base image (`initctl image busybox`).
pub fn write_busybox_layout(dir: &Path, busybox: &Path, tag: &str) -> std::io::Result<String> {
    write_oci_layout(dir, tag, &busybox_config(), &[busybox_layer(busybox)?])
}

/// The config of [`write_busybox_layout`]'s image: `PATH=/bin`, command `sh`.
pub fn busybox_config() -> ImageConfig {
    ImageConfig {
        architecture: oci::host_arch().into(),
        os: "linux".into(),
        config: Some(oci::ExecConfig { env: Some(vec!["PATH=/bin".into()]), cmd: Some(vec!["sh".into()]), ..Default::default() }),
        ..Default::default()
    }
}

/// The gzip-compressed layer of [`write_busybox_layout`]'s image (tests stack layers of their own on it).
pub fn busybox_layer(busybox: &Path) -> std::io::Result<Vec<u8>> {
    let applets = std::process::Command::new(busybox).arg("--list").output()?;
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h
    };
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root", "home"] {
        let mode = if d == "tmp" { 0o1777 } else { 0o755 };
        b.append_data(&mut header(tar::EntryType::Directory, mode, 0), d, std::io::empty())?;
    }
    let bin = fs::read(busybox)?;
    b.append_data(&mut header(tar::EntryType::Regular, 0o755, bin.len() as u64), "bin/busybox", &bin[..])?;
    for a in String::from_utf8_lossy(&applets.stdout).lines().map(str::trim).filter(|a| !a.is_empty() && *a != "busybox") {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("bin/{a}"), "busybox")?;
    }
    let files: [(&str, &[u8]); 3] = [
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        ("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hostname", b"busybox\n"),
    ];
    for (name, data) in files {
        b.append_data(&mut header(tar::EntryType::Regular, 0o644, data.len() as u64), name, data)?;
    }
    let layer = b.into_inner()?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &layer)?;
    gz.finish()
}
