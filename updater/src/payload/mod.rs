//! Keel update payloads: the on-disk format, signing keys, building and verifying.
//!
//! Owns: the byte layout documented in `docs/payload-format.md` (header, manifest, signature block,
//! independently zstd-compressed chunks), the ed25519 key files and the trusted-keys directory, and the
//! version policy (downgrade refusal, previous-version floor).
//! Does not: decide which partition is inactive or flip boot flags (see `slot`), talk to a server
//! (see `omaha` / `engine`). Streaming application lives in [`apply`].

pub mod apply;
pub mod build;
pub mod keys;

use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use keys::{KeyPair, TrustedKeys};

/// First eight bytes of every payload.
pub const MAGIC: &[u8; 8] = b"KEELPAY\0";
/// The only header format this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Fixed header length: magic, format, manifest length, signature-block length, reserved.
pub const HEADER_LEN: usize = 24;
/// Largest manifest accepted (1 MiB).
pub const MAX_MANIFEST_LEN: u32 = 1 << 20;
/// Signature block: 8-byte key id followed by a 64-byte ed25519 signature.
pub const SIG_BLOCK_LEN: u32 = 8 + 64;
/// Smallest and largest chunk sizes accepted (64 KiB ..= 16 MiB, powers of two).
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Default chunk size used by `mkpayload` (2 MiB: keeps the apply pipeline under 32 MiB RSS).
pub const DEFAULT_CHUNK_SIZE: u32 = 2 << 20;
/// Largest target accepted (64 GiB).
pub const MAX_TARGET_SIZE: u64 = 64 << 30;

/// What a payload target is written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// The USR filesystem image, written to the inactive USR partition.
    Usr,
    /// The slot's kernel image (UKI), written to the ESP by the slot module.
    Kernel,
}

impl std::fmt::Display for TargetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TargetKind::Usr => "usr",
            TargetKind::Kernel => "kernel",
        })
    }
}

/// One compressed chunk: `csize` bytes of zstd frame that decompress to a chunk whose sha256 is `sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    pub sha256: String,
    pub csize: u32,
}

/// One target of the payload (USR image or kernel image).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub name: TargetKind,
    /// Uncompressed size in bytes.
    pub size: u64,
    pub chunks: Vec<Chunk>,
}

/// The signed description of a payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Must equal [`FORMAT_VERSION`]; signed so that the header's format cannot be swapped.
    pub format: u32,
    /// Semantic version of the OS this payload installs.
    pub version: String,
    /// Channel the payload was built for (e.g. `stable`).
    pub channel: String,
    /// Oldest running version that may install this payload (a migration floor), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
    /// Uncompressed chunk size; every chunk but a target's last is exactly this long.
    pub chunk_size: u32,
    /// `usr` first, then `kernel`; chunks are stored in this order.
    pub targets: Vec<Target>,
}

/// Everything that can be wrong with a payload. Each message says what and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("payload truncated while reading {what}: expected {expected} more bytes; the download was cut short, retry (it resumes)")]
    Truncated { what: String, expected: u64 },
    #[error("not a Keel payload (bad magic {found}); check the URL or file given")]
    BadMagic { found: String },
    #[error("payload format {found} is not supported (this updater reads format {FORMAT_VERSION}); update the updater first")]
    UnsupportedFormat { found: u32 },
    #[error("payload header invalid: {0}; the file is corrupt or not a Keel payload")]
    BadHeader(String),
    #[error("manifest is {len} bytes, larger than the {max}-byte limit; rebuild with a larger chunk size")]
    ManifestTooLarge { len: u32, max: u32 },
    #[error("manifest is not valid JSON: {0}; rebuild the payload with mkpayload")]
    ManifestSyntax(String),
    #[error("manifest invalid: {0}; rebuild the payload with mkpayload")]
    ManifestInvalid(String),
    #[error(
        "payload signed by unknown key {key_id}; trusted keys are the *.pub files in {keys_dir}"
    )]
    UnknownKey { key_id: String, keys_dir: String },
    #[error("signature by key {key_id} does not verify; the payload was altered or signed with another key, refusing it")]
    BadSignature { key_id: String },
    #[error("refusing downgrade from {running} to {offered}; pass --allow-downgrade to force")]
    Downgrade { running: String, offered: String },
    #[error("payload {offered} requires running at least {floor} (running {running}); install {floor} first")]
    BelowFloor {
        running: String,
        offered: String,
        floor: String,
    },
    #[error("{target} chunk {index} hash mismatch (expected {expected}, got {actual}); the download is corrupt, retry it")]
    ChunkHash {
        target: TargetKind,
        index: u32,
        expected: String,
        actual: String,
    },
    #[error(
        "{target} chunk {index} does not decompress: {reason}; the download is corrupt, retry it"
    )]
    ChunkDecompress {
        target: TargetKind,
        index: u32,
        reason: String,
    },
    #[error("{target} target is {need} bytes but the destination holds only {have}; the partition is too small for this image")]
    TargetTooSmall {
        target: TargetKind,
        need: u64,
        have: u64,
    },
    #[error("payload has {0} unexpected bytes after the last chunk; the file is corrupt or was built wrongly")]
    TrailingData(u64),
    #[error("key file {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("apply cancelled")]
    Cancelled,
}

impl PayloadError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        PayloadError::Io {
            context: context.into(),
            source,
        }
    }

    /// Omaha error code to report for this failure (see docs/updater.md).
    pub fn omaha_code(&self) -> u32 {
        match self {
            PayloadError::Io { .. } | PayloadError::Truncated { .. } => 9,
            PayloadError::ChunkHash { .. }
            | PayloadError::ChunkDecompress { .. }
            | PayloadError::TrailingData(_) => 10,
            PayloadError::UnknownKey { .. } | PayloadError::BadSignature { .. } => 12,
            PayloadError::Downgrade { .. } | PayloadError::BelowFloor { .. } => 20,
            _ => 11,
        }
    }

    /// True when retrying the same download may succeed (resume point is kept).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            PayloadError::Io { .. } | PayloadError::Truncated { .. } | PayloadError::Cancelled
        )
    }
}

pub type Result<T, E = PayloadError> = std::result::Result<T, E>;

/// Reads exactly `buf.len()` bytes, mapping a short read to [`PayloadError::Truncated`].
pub(crate) fn read_exact_or_truncated(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(PayloadError::Truncated {
                    what: what.to_string(),
                    expected: (buf.len() - filled) as u64,
                })
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PayloadError::io(format!("reading {what}"), e)),
        }
    }
    Ok(())
}

/// Largest compressed size accepted for a chunk of `chunk_size` bytes (zstd's compress bound).
pub fn max_compressed(chunk_size: u32) -> u32 {
    let n = chunk_size as u64;
    let bound = n
        + (n >> 8)
        + if n < (128 << 10) {
            ((128 << 10) - n) >> 11
        } else {
            0
        }
        + 64;
    bound.min(u32::MAX as u64) as u32
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Channel names: 1–64 of `[a-z0-9._-]`.
pub fn valid_channel(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

impl Manifest {
    /// Parses and validates manifest bytes (strict: unknown fields, bad sizes or hashes are errors).
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        if bytes.len() > MAX_MANIFEST_LEN as usize {
            return Err(PayloadError::ManifestTooLarge {
                len: bytes.len() as u32,
                max: MAX_MANIFEST_LEN,
            });
        }
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| PayloadError::ManifestSyntax(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// Checks every invariant the apply path relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(PayloadError::ManifestInvalid(s));
        if self.format != FORMAT_VERSION {
            return bad(format!(
                "format {} (expected {FORMAT_VERSION})",
                self.format
            ));
        }
        if let Err(e) = semver::Version::parse(&self.version) {
            return bad(format!("version {:?} is not semver: {e}", self.version));
        }
        if let Some(floor) = &self.min_version {
            if let Err(e) = semver::Version::parse(floor) {
                return bad(format!("min_version {floor:?} is not semver: {e}"));
            }
        }
        if !valid_channel(&self.channel) {
            return bad(format!(
                "channel {:?} must be 1-64 characters of [a-z0-9._-]",
                self.channel
            ));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
            || !self.chunk_size.is_power_of_two()
        {
            return bad(format!(
                "chunk_size {} must be a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                self.chunk_size
            ));
        }
        let kinds: Vec<TargetKind> = self.targets.iter().map(|t| t.name).collect();
        if kinds != [TargetKind::Usr, TargetKind::Kernel] {
            return bad(format!(
                "targets must be [usr, kernel] in that order, found {kinds:?}"
            ));
        }
        let cmax = max_compressed(self.chunk_size);
        for t in &self.targets {
            if t.size == 0 || t.size > MAX_TARGET_SIZE {
                return bad(format!(
                    "{} size {} must be in 1..={MAX_TARGET_SIZE}",
                    t.name, t.size
                ));
            }
            let want = t.size.div_ceil(self.chunk_size as u64);
            if t.chunks.len() as u64 != want {
                return bad(format!(
                    "{} has {} chunks, size {} needs {want}",
                    t.name,
                    t.chunks.len(),
                    t.size
                ));
            }
            for (i, c) in t.chunks.iter().enumerate() {
                if !is_hex64(&c.sha256) {
                    return bad(format!(
                        "{} chunk {i} sha256 is not 64 lowercase hex digits",
                        t.name
                    ));
                }
                if c.csize == 0 || c.csize > cmax {
                    return bad(format!(
                        "{} chunk {i} compressed size {} not in 1..={cmax}",
                        t.name, c.csize
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn target(&self, kind: TargetKind) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == kind)
    }

    /// Total number of chunks over all targets.
    pub fn total_chunks(&self) -> u32 {
        self.targets.iter().map(|t| t.chunks.len() as u32).sum()
    }

    /// Total uncompressed bytes over all targets.
    pub fn total_size(&self) -> u64 {
        self.targets.iter().map(|t| t.size).sum()
    }

    /// Total compressed bytes over all chunks.
    pub fn compressed_size(&self) -> u64 {
        self.targets
            .iter()
            .flat_map(|t| t.chunks.iter())
            .map(|c| c.csize as u64)
            .sum()
    }

    pub fn semver(&self) -> semver::Version {
        // validate() guarantees this parses; fall back to 0.0.0 rather than panic.
        semver::Version::parse(&self.version).unwrap_or(semver::Version::new(0, 0, 0))
    }
}

/// The verified start of a payload: header, manifest and signature have all been checked.
#[derive(Debug, Clone)]
pub struct PayloadHead {
    pub manifest: Manifest,
    /// sha256 of the exact manifest bytes: the payload's identity for resume state.
    pub manifest_sha256: String,
    pub key_id: String,
    /// Byte offset of the first chunk in the payload file.
    pub data_offset: u64,
}

/// Parsed fixed header.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub format: u32,
    pub manifest_len: u32,
    pub sig_len: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&self.format.to_le_bytes());
        h[12..16].copy_from_slice(&self.manifest_len.to_le_bytes());
        h[16..20].copy_from_slice(&self.sig_len.to_le_bytes());
        h
    }

    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<Header> {
        if &h[..8] != MAGIC {
            return Err(PayloadError::BadMagic {
                found: hex::encode(&h[..8]),
            });
        }
        let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let hdr = Header {
            format: word(8),
            manifest_len: word(12),
            sig_len: word(16),
        };
        if hdr.format != FORMAT_VERSION {
            return Err(PayloadError::UnsupportedFormat { found: hdr.format });
        }
        if word(20) != 0 {
            return Err(PayloadError::BadHeader("reserved field is not zero".into()));
        }
        if hdr.manifest_len == 0 || hdr.manifest_len > MAX_MANIFEST_LEN {
            return Err(PayloadError::ManifestTooLarge {
                len: hdr.manifest_len,
                max: MAX_MANIFEST_LEN,
            });
        }
        if hdr.sig_len != SIG_BLOCK_LEN {
            return Err(PayloadError::BadHeader(format!(
                "signature block is {} bytes, expected {SIG_BLOCK_LEN}",
                hdr.sig_len
            )));
        }
        Ok(hdr)
    }
}

impl PayloadHead {
    /// Reads header, manifest and signature block from `r` and verifies the signature against `keys`
    /// before parsing the manifest. Reads at most `HEADER_LEN + 1 MiB + 72` bytes.
    pub fn read(r: &mut impl Read, keys: &TrustedKeys) -> Result<PayloadHead> {
        let mut h = [0u8; HEADER_LEN];
        read_exact_or_truncated(r, &mut h, "payload header")?;
        let hdr = Header::decode(&h)?;
        let mut manifest = vec![0u8; hdr.manifest_len as usize];
        read_exact_or_truncated(r, &mut manifest, "manifest")?;
        let mut sig = [0u8; SIG_BLOCK_LEN as usize];
        read_exact_or_truncated(r, &mut sig, "signature block")?;
        let key_id = hex::encode(&sig[..8]);
        let key = keys.get(&key_id).ok_or_else(|| PayloadError::UnknownKey {
            key_id: key_id.clone(),
            keys_dir: keys.source().to_string(),
        })?;
        let mut sig_bytes = [0u8; 64];
        sig_bytes.copy_from_slice(&sig[8..]);
        let signature = ed25519_dalek::Signature::from_bytes(&sig_bytes);
        key.verify_strict(&manifest, &signature)
            .map_err(|_| PayloadError::BadSignature {
                key_id: key_id.clone(),
            })?;
        let m = Manifest::parse(&manifest)?;
        Ok(PayloadHead {
            manifest: m,
            manifest_sha256: hex::encode(Sha256::digest(&manifest)),
            key_id,
            data_offset: (HEADER_LEN + hdr.manifest_len as usize + SIG_BLOCK_LEN as usize) as u64,
        })
    }

    /// Version policy: refuses a downgrade (unless allowed) and a payload whose floor is above `running`.
    pub fn check_version(
        &self,
        running: Option<&semver::Version>,
        allow_downgrade: bool,
    ) -> Result<()> {
        let offered = self.manifest.semver();
        let Some(running) = running else {
            return Ok(());
        };
        if offered < *running && !allow_downgrade {
            return Err(PayloadError::Downgrade {
                running: running.to_string(),
                offered: offered.to_string(),
            });
        }
        if let Some(floor) = &self.manifest.min_version {
            let f = semver::Version::parse(floor).unwrap_or(semver::Version::new(0, 0, 0));
            if *running < f && !allow_downgrade {
                return Err(PayloadError::BelowFloor {
                    running: running.to_string(),
                    offered: offered.to_string(),
                    floor: floor.clone(),
                });
            }
        }
        Ok(())
    }

    /// Absolute payload offset of global chunk `index` (chunks numbered across targets in order).
    pub fn chunk_offset(&self, index: u32) -> u64 {
        let mut off = self.data_offset;
        for c in self
            .manifest
            .targets
            .iter()
            .flat_map(|t| t.chunks.iter())
            .take(index as usize)
        {
            off += c.csize as u64;
        }
        off
    }

    /// Total payload length in bytes.
    pub fn total_len(&self) -> u64 {
        self.data_offset + self.manifest.compressed_size()
    }
}

/// Verifies a whole payload without writing anything: signature, then every chunk's hash.
pub fn verify_stream(r: &mut (impl Read + Send), keys: &TrustedKeys) -> Result<PayloadHead> {
    let head = PayloadHead::read(r, keys)?;
    let mut sinks = apply::Sinks::discard();
    apply::apply_chunks(
        &head,
        r,
        0,
        &mut sinks,
        None,
        &mut |_| {},
        &apply::never_cancel(),
    )?;
    Ok(head)
}
