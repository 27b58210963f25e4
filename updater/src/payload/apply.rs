//! Streaming application of a verified payload to the inactive slot.
//!
//! Owns: decompressing chunk by chunk, checking each chunk's sha256 before it is written, the
//! "held header" (the first MiB of the USR target is kept zero until every chunk has verified, so a
//! half-written slot never mounts), resume state (`resume.json` + `held-header.bin` in a state directory),
//! and wiping the header again on failure.
//! Does not: verify the signature (done by [`PayloadHead::read`] before this runs), fetch bytes over the
//! network (the engine hands in a reader), or flip boot flags (see `slot`).
//!
//! Memory: two decompressed chunk buffers, one compressed buffer and one zstd context are alive at once;
//! with the default 2 MiB chunks the apply path stays well under 32 MiB RSS.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{read_exact_or_truncated, PayloadError, PayloadHead, Result, TargetKind, TrustedKeys};

/// Bytes at the start of the USR target that stay zero until the whole payload has verified.
pub const HOLD_LEN: u64 = 1 << 20;
/// Most uncompressed data written between resume checkpoints (fdatasync + state file); a checkpoint is
/// also taken every [`CHECKPOINT_CHUNKS`] chunks and at the end of each target.
pub const CHECKPOINT_BYTES: u64 = 64 << 20;
pub const CHECKPOINT_CHUNKS: u32 = 16;

/// A destination for one target: positional writes plus a durability barrier.
pub trait Sink: Send {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
    /// Bytes the destination can hold, when bounded (a partition).
    fn capacity(&self) -> Option<u64> {
        None
    }
}

impl Sink for File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        FileExt::write_all_at(self, data, offset)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }
}

/// A byte range of a file or block device: a partition of a disk image, addressed from 0.
pub struct Window {
    file: File,
    start: u64,
    len: u64,
}

impl Window {
    pub fn new(file: File, start: u64, len: u64) -> Window {
        Window { file, start, len }
    }
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Sink for Window {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = offset.saturating_add(data.len() as u64);
        if end > self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("write past end of partition ({end} > {})", self.len),
            ));
        }
        FileExt::write_all_at(&self.file, data, self.start + offset)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
    fn capacity(&self) -> Option<u64> {
        Some(self.len)
    }
}

/// Adapter for any `Write + Seek` (e.g. an in-memory cursor).
pub struct SeekSink<W>(pub W);

impl<W: Write + Seek + Send> Sink for SeekSink<W> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.seek(SeekFrom::Start(offset))?;
        self.0.write_all(data)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Throws everything away (verification only).
pub struct Discard;

impl Sink for Discard {
    fn write_at(&mut self, _: u64, _: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where the two targets go.
pub struct Sinks<'a> {
    pub usr: Box<dyn Sink + 'a>,
    pub kernel: Box<dyn Sink + 'a>,
}

impl<'a> Sinks<'a> {
    pub fn discard() -> Sinks<'static> {
        Sinks {
            usr: Box::new(Discard),
            kernel: Box::new(Discard),
        }
    }
    fn get(&mut self, kind: TargetKind) -> &mut (dyn Sink + 'a) {
        match kind {
            TargetKind::Usr => &mut *self.usr,
            TargetKind::Kernel => &mut *self.kernel,
        }
    }
}

/// Progress report, called after every chunk.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Progress {
    pub chunk: u32,
    pub total_chunks: u32,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// A cancellation flag that is never set.
pub fn never_cancel() -> AtomicBool {
    AtomicBool::new(false)
}

/// Where an interrupted apply continues.
#[derive(Debug, Clone, Default)]
pub struct ResumePoint {
    /// Global index of the first chunk still to apply.
    pub next_chunk: u32,
    /// The held first bytes of the USR target, once every chunk covering them has verified.
    pub held: Option<Vec<u8>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ResumeFile {
    manifest_sha256: String,
    next_chunk: u32,
    held: bool,
}

/// Resume state in a directory (e.g. `/var/lib/keel/update`).
pub struct ResumeStore {
    dir: PathBuf,
}

impl ResumeStore {
    pub fn new(dir: impl Into<PathBuf>) -> ResumeStore {
        ResumeStore { dir: dir.into() }
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("resume.json")
    }
    fn held_path(&self) -> PathBuf {
        self.dir.join("held-header.bin")
    }

    /// The resume point for this payload, or a fresh start if the state is missing, for another
    /// payload, or inconsistent.
    pub fn load(&self, head: &PayloadHead) -> ResumePoint {
        let Ok(text) = std::fs::read(self.state_path()) else {
            return ResumePoint::default();
        };
        let Ok(st) = serde_json::from_slice::<ResumeFile>(&text) else {
            return ResumePoint::default();
        };
        if st.manifest_sha256 != head.manifest_sha256
            || st.next_chunk > head.manifest.total_chunks()
        {
            return ResumePoint::default();
        }
        let held = if st.held {
            std::fs::read(self.held_path()).ok()
        } else {
            None
        };
        match held {
            // Resuming needs the held USR header bytes: they are never on the target until the end.
            Some(h) if st.next_chunk > 0 && h.len() as u64 == hold_len(head) => ResumePoint {
                next_chunk: st.next_chunk,
                held: Some(h),
            },
            _ => ResumePoint::default(),
        }
    }

    fn save(
        &self,
        head: &PayloadHead,
        next_chunk: u32,
        held: Option<&[u8]>,
    ) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        if let Some(h) = held {
            if !self.held_path().exists() {
                write_durable(&self.held_path(), h)?;
            }
        }
        let st = ResumeFile {
            manifest_sha256: head.manifest_sha256.clone(),
            next_chunk,
            held: held.is_some(),
        };
        let bytes = serde_json::to_vec(&st).map_err(std::io::Error::other)?;
        write_durable(&self.state_path(), &bytes)
    }

    /// Forgets any resume state.
    pub fn clear(&self) {
        let _ = std::fs::remove_file(self.state_path());
        let _ = std::fs::remove_file(self.held_path());
    }
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync directory).
pub fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn hold_len(head: &PayloadHead) -> u64 {
    head.manifest
        .target(TargetKind::Usr)
        .map(|t| t.size.min(HOLD_LEN))
        .unwrap_or(0)
}

fn chunks_covering_hold(head: &PayloadHead) -> u32 {
    hold_len(head).div_ceil(head.manifest.chunk_size as u64) as u32
}

/// Location of global chunk `index`: target, index within target, byte offset in target, length.
struct ChunkLoc {
    kind: TargetKind,
    index: u32,
    offset: u64,
    len: usize,
    csize: u32,
    sha256: String,
}

fn chunk_list(head: &PayloadHead) -> Vec<ChunkLoc> {
    let cs = head.manifest.chunk_size as u64;
    let mut out = Vec::with_capacity(head.manifest.total_chunks() as usize);
    for t in &head.manifest.targets {
        for (i, c) in t.chunks.iter().enumerate() {
            let offset = i as u64 * cs;
            out.push(ChunkLoc {
                kind: t.name,
                index: i as u32,
                offset,
                len: (t.size - offset).min(cs) as usize,
                csize: c.csize,
                sha256: c.sha256.clone(),
            });
        }
    }
    out
}

/// Everything in one call: verify the head, check the version policy, resume if state says so, apply.
/// `reader` must be positioned at the start of the payload.
pub struct ApplyOptions<'a> {
    pub keys: &'a TrustedKeys,
    pub running_version: Option<semver::Version>,
    pub allow_downgrade: bool,
    pub progress: &'a mut dyn FnMut(Progress),
    pub cancel: &'a AtomicBool,
}

/// Applies a whole payload from the beginning of `reader`. Nothing is written before the signature and the
/// version policy have been checked.
pub fn apply(
    reader: &mut (impl Read + Send),
    sinks: &mut Sinks<'_>,
    opts: ApplyOptions<'_>,
) -> Result<PayloadHead> {
    let head = PayloadHead::read(reader, opts.keys)?;
    head.check_version(opts.running_version.as_ref(), opts.allow_downgrade)?;
    apply_chunks(&head, reader, 0, sinks, None, opts.progress, opts.cancel)?;
    Ok(head)
}

/// Applies chunks starting at global chunk `start`; `data` must be positioned at that chunk's offset
/// ([`PayloadHead::chunk_offset`]). With a `store`, progress is checkpointed there and resumed from it
/// (the caller passes `store.load(head).next_chunk` as `start` and positions the reader accordingly).
pub fn apply_chunks(
    head: &PayloadHead,
    data: &mut (impl Read + Send),
    start: u32,
    sinks: &mut Sinks<'_>,
    store: Option<&ResumeStore>,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
) -> Result<()> {
    let resume = match store {
        Some(s) => {
            let p = s.load(head);
            if p.next_chunk != start {
                ResumePoint {
                    next_chunk: start,
                    held: if start == 0 { None } else { p.held },
                }
            } else {
                p
            }
        }
        None => ResumePoint {
            next_chunk: start,
            held: None,
        },
    };
    if resume.next_chunk > 0 && resume.held.is_none() {
        return Err(PayloadError::BadHeader(format!(
            "cannot resume at chunk {} without the held USR header; restart the download from 0",
            resume.next_chunk
        )));
    }
    for t in &head.manifest.targets {
        if let Some(cap) = sinks.get(t.name).capacity() {
            if cap < t.size {
                return Err(PayloadError::TargetTooSmall {
                    target: t.name,
                    need: t.size,
                    have: cap,
                });
            }
        }
    }
    let hold = hold_len(head) as usize;
    // The held region is zero on disk for the whole apply, whatever it contained before.
    let zeros = vec![0u8; hold];
    sinks
        .usr
        .write_at(0, &zeros)
        .map_err(|e| PayloadError::io("clearing the inactive USR header", e))?;
    sinks
        .usr
        .sync()
        .map_err(|e| PayloadError::io("syncing the inactive USR partition", e))?;

    let result = run_pipeline(head, data, resume, sinks, store, progress, cancel, hold);
    if result.is_err() {
        // Never leave a mountable half-written slot behind.
        let _ = sinks.usr.write_at(0, &zeros);
        let _ = sinks.usr.sync();
    } else if let Some(s) = store {
        s.clear();
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn run_pipeline(
    head: &PayloadHead,
    data: &mut (impl Read + Send),
    resume: ResumePoint,
    sinks: &mut Sinks<'_>,
    store: Option<&ResumeStore>,
    progress: &mut dyn FnMut(Progress),
    cancel: &AtomicBool,
    hold: usize,
) -> Result<()> {
    let chunks = chunk_list(head);
    let total_chunks = chunks.len() as u32;
    let bytes_total = head.manifest.total_size();
    let chunk_size = head.manifest.chunk_size as usize;
    let start = resume.next_chunk;
    let mut held = resume.held.unwrap_or_else(|| vec![0u8; hold]);
    let mut held_complete = start > 0 && start >= chunks_covering_hold(head);
    let mut bytes_done: u64 = chunks[..start as usize].iter().map(|c| c.len as u64).sum();

    // Stage 1 (thread): read + decompress. Stage 2 (here): hash + write. Buffers circulate.
    let (full_tx, full_rx) = mpsc::sync_channel::<Result<(u32, Vec<u8>)>>(1);
    let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(2);
    for _ in 0..2 {
        let _ = empty_tx.send(Vec::with_capacity(chunk_size));
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<()> {
        let chunks_ref = &chunks;
        let stop_ref = &stop;
        scope.spawn(move || {
            let mut dec = match zstd::bulk::Decompressor::new() {
                Ok(d) => d,
                Err(e) => {
                    let _ = full_tx.send(Err(PayloadError::io("creating zstd decompressor", e)));
                    return;
                }
            };
            let mut cbuf = Vec::new();
            for (gi, c) in chunks_ref.iter().enumerate().skip(start as usize) {
                if stop_ref.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed) {
                    let _ = full_tx.send(Err(PayloadError::Cancelled));
                    return;
                }
                let Ok(mut buf) = empty_rx.recv() else { return };
                cbuf.resize(c.csize as usize, 0);
                if let Err(e) = read_exact_or_truncated(
                    data,
                    &mut cbuf,
                    &format!("{} chunk {}", c.kind, c.index),
                ) {
                    let _ = full_tx.send(Err(e));
                    return;
                }
                buf.clear();
                let r = match dec.decompress_to_buffer(&cbuf[..], &mut buf) {
                    Ok(n) if n == c.len => Ok((gi as u32, buf)),
                    Ok(n) => Err(PayloadError::ChunkDecompress {
                        target: c.kind,
                        index: c.index,
                        reason: format!("decompressed to {n} bytes, manifest says {}", c.len),
                    }),
                    Err(e) => Err(PayloadError::ChunkDecompress {
                        target: c.kind,
                        index: c.index,
                        reason: e.to_string(),
                    }),
                };
                let failed = r.is_err();
                if full_tx.send(r).is_err() || failed {
                    return;
                }
            }
            // Anything after the last chunk means the payload is not what the manifest describes.
            let mut one = [0u8; 1];
            let trailing = loop {
                match data.read(&mut one) {
                    Ok(0) => break Ok(()),
                    Ok(_) => {
                        let mut rest = 1u64;
                        let mut sink = [0u8; 8192];
                        while let Ok(n) = data.read(&mut sink) {
                            if n == 0 || rest > (1 << 30) {
                                break;
                            }
                            rest += n as u64;
                        }
                        break Err(PayloadError::TrailingData(rest));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(PayloadError::io("reading the end of the payload", e)),
                }
            };
            if let Err(e) = trailing {
                let _ = full_tx.send(Err(e));
            }
        });

        let result = (|| -> Result<()> {
            let mut since_checkpoint = 0u64;
            let mut chunks_since = 0u32;
            for expected in start..total_chunks {
                let (gi, buf) = match full_rx.recv() {
                    Ok(r) => r?,
                    Err(_) => return Err(PayloadError::Cancelled),
                };
                debug_assert_eq!(gi, expected);
                let c = &chunks[gi as usize];
                let actual = Sha256::digest(&buf);
                if hex::encode(actual) != c.sha256 {
                    return Err(PayloadError::ChunkHash {
                        target: c.kind,
                        index: c.index,
                        expected: c.sha256.clone(),
                        actual: hex::encode(actual),
                    });
                }
                let mut off = c.offset;
                let mut slice = &buf[..];
                if c.kind == TargetKind::Usr && (off as usize) < hold {
                    let n = (hold - off as usize).min(slice.len());
                    held[off as usize..off as usize + n].copy_from_slice(&slice[..n]);
                    slice = &slice[n..];
                    off += n as u64;
                    if off as usize >= hold {
                        held_complete = true;
                    }
                }
                if !slice.is_empty() {
                    sinks.get(c.kind).write_at(off, slice).map_err(|e| {
                        PayloadError::io(format!("writing {} at offset {off}", c.kind), e)
                    })?;
                }
                bytes_done += c.len as u64;
                since_checkpoint += c.len as u64;
                chunks_since += 1;
                let _ = empty_tx.send(buf);
                progress(Progress {
                    chunk: gi + 1,
                    total_chunks,
                    bytes_done,
                    bytes_total,
                });
                let target_end = chunks.get(gi as usize + 1).is_none_or(|n| n.kind != c.kind);
                if let Some(store) = store {
                    if since_checkpoint >= CHECKPOINT_BYTES
                        || chunks_since >= CHECKPOINT_CHUNKS
                        || target_end
                    {
                        sinks
                            .usr
                            .sync()
                            .map_err(|e| PayloadError::io("syncing USR target", e))?;
                        sinks
                            .kernel
                            .sync()
                            .map_err(|e| PayloadError::io("syncing kernel target", e))?;
                        store
                            .save(head, gi + 1, held_complete.then_some(&held[..]))
                            .map_err(|e| PayloadError::io("saving resume state", e))?;
                        since_checkpoint = 0;
                        chunks_since = 0;
                    }
                }
            }
            // The sender reports trailing data (or nothing) before closing the channel.
            if let Ok(r) = full_rx.recv() {
                r?;
            }
            // Every chunk verified: now, and only now, the USR header becomes real.
            sinks
                .kernel
                .sync()
                .map_err(|e| PayloadError::io("syncing kernel target", e))?;
            sinks
                .usr
                .sync()
                .map_err(|e| PayloadError::io("syncing USR target", e))?;
            sinks
                .usr
                .write_at(0, &held)
                .map_err(|e| PayloadError::io("writing the USR header", e))?;
            sinks
                .usr
                .sync()
                .map_err(|e| PayloadError::io("syncing USR target", e))?;
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        // Unblock the decompressor if it waits on a buffer or the full channel.
        drop(full_rx);
        let _ = empty_tx.send(Vec::new());
        drop(empty_tx);
        result
    })
}
