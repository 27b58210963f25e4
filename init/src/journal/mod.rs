//! The journal: stdout/stderr of every unit (and init's own messages),
//! timestamped, in a bounded, persistent, rotating store.
//!
//! Owns: the journal directory given to [`Journal::open`] (segment files
//! `seg-<first_seq:020>.log`, their index sidecars `seg-<first_seq:020>.idx`
//! and `*.tmp` files) and nothing else. It must not touch any other path,
//! spawn threads, install signal handlers or block: `append` only copies into
//! a bounded in-memory buffer and occasionally issues one `write(2)`; it never
//! fsyncs (that is [`Journal::sync`], called by the supervisor loop).
//! The on-disk format is documented in `docs/journal.md`.
//!
//! Exactly one process may hold a `Journal` open for a directory at a time
//! (init). `open` performs crash recovery, which may truncate the newest segment.

mod format;
mod split;

pub use split::{LineSplitter, MAX_LINE_BYTES};

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use format::{encode_frame, DiskRecordRef, Frame, FrameReader, FILE_MAGIC};

/// Messages longer than this (bytes, after stripping the trailing newline) are truncated.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// Appended to a truncated message; the result is at most [`MAX_MESSAGE_BYTES`].
pub const TRUNCATION_MARKER: &str = "…[truncated]";
/// Pending (not yet written) bytes that trigger a `write(2)` from `append`.
const FLUSH_AT: usize = 16 * 1024;
/// Per-segment index bounds (keep init's memory small). Past them the
/// segment's unit/boot set is "unknown" and queries simply scan it.
const MAX_INDEX_UNITS: usize = 128;
const MAX_INDEX_BOOTS: usize = 16;
/// Corruption notes kept per segment scan.
const MAX_NOTES_PER_SEGMENT: usize = 8;
const IDX_VERSION: u32 = 1;
/// Seek marks per segment (seq -> byte offset), so follow (`after_seq`) and
/// `last` read only the tail of a segment instead of all of it.
const MAX_MARKS: usize = 256;
const MIN_MARK_EVERY: u64 = 64 * 1024;

/// Size bounds of the journal directory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Oldest segments are deleted while the journal exceeds this.
    pub max_total_bytes: u64,
    /// The active segment is closed and a new one started before it would exceed this.
    pub max_segment_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total_bytes: 64 * 1024 * 1024,
            max_segment_bytes: 4 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
    Init,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Strictly increasing across the journal's life (also across restarts); may have gaps.
    pub seq: u64,
    /// Realtime clock, µs since the Unix epoch (may go backwards if the clock is set).
    pub ts_us: u64,
    pub boot: String,
    pub unit: String,
    pub stream: Stream,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Query {
    pub unit: Option<String>,
    pub boot: Option<BootSel>,
    /// Records with `ts_us >= since_us`.
    pub since_us: Option<u64>,
    /// Keep only the newest N records that pass the other filters.
    pub last: Option<usize>,
    /// Records with `seq > after_seq` (follow: pass the last seq seen).
    pub after_seq: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootSel {
    Current,
    Id(String),
    /// 0 = current, -1 = previous, ...; 1 = oldest recorded, 2 = the one after (like `journalctl -b`).
    Offset(i32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootInfo {
    pub id: String,
    pub first_ts_us: u64,
    pub last_ts_us: u64,
    /// Oldest retained record of this boot.
    pub first_seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal: cannot {op} {path}: {source}; check that the journal filesystem is mounted read-write, has free space and the path is a directory")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("journal: writing {path} failed: {source}; {lost} record(s) were dropped; free space on the journal filesystem (the journal retries on the next append)")]
    Write {
        path: PathBuf,
        lost: usize,
        source: io::Error,
    },
    #[error("journal: invalid limits for {path}: {reason}")]
    InvalidLimits { path: PathBuf, reason: String },
    #[error("journal: invalid boot id {boot_id:?} for {path}: it must be non-empty, at most 128 bytes, without control characters (use /proc/sys/kernel/random/boot_id)")]
    InvalidBootId { path: PathBuf, boot_id: String },
    #[error("journal: no boot {sel} in {path} ({known} boot(s) recorded); list them with `boots`")]
    NoSuchBoot {
        path: PathBuf,
        sel: String,
        known: usize,
    },
    #[error("journal: cannot encode record for {path}: {source}")]
    Encode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl JournalError {
    /// Records lost by a failed `append` (the one being appended plus any
    /// buffered ones that could not be written). 0 for non-append errors.
    pub fn lost_records(&self) -> usize {
        match self {
            JournalError::Write { lost, .. } => *lost,
            _ => 0,
        }
    }
}

/// A contiguous run of one boot inside a segment.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BootSpan {
    id: String,
    first_ts: u64,
    last_ts: u64,
    first_seq: u64,
}

/// Small summary of one segment, used to skip segments during queries.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SegIdx {
    count: u64,
    first_seq: u64,
    last_seq: u64,
    min_ts: u64,
    max_ts: u64,
    /// `None` = too many to track; the segment must be scanned.
    units: Option<Vec<String>>,
    boots: Option<Vec<BootSpan>>,
    /// `(seq, offset of its frame)`, ascending, roughly every `mark_every` bytes.
    #[serde(default)]
    marks: Vec<(u64, u64)>,
}

impl SegIdx {
    fn empty() -> SegIdx {
        SegIdx {
            count: 0,
            first_seq: 0,
            last_seq: 0,
            min_ts: u64::MAX,
            max_ts: 0,
            units: Some(Vec::new()),
            boots: Some(Vec::new()),
            marks: Vec::new(),
        }
    }

    fn note(&mut self, seq: u64, ts: u64, boot: &str, unit: &str, offset: u64, mark_every: u64) {
        if self.count == 0 {
            self.first_seq = seq;
        }
        let due = self
            .marks
            .last()
            .is_none_or(|&(_, o)| offset >= o.saturating_add(mark_every));
        if due && self.marks.len() < MAX_MARKS && seq >= self.last_seq {
            self.marks.push((seq, offset));
        }
        self.count += 1;
        self.last_seq = self.last_seq.max(seq);
        self.min_ts = self.min_ts.min(ts);
        self.max_ts = self.max_ts.max(ts);
        if let Some(units) = &mut self.units {
            if !units.iter().any(|u| u == unit) {
                if units.len() >= MAX_INDEX_UNITS {
                    self.units = None;
                } else {
                    units.push(unit.to_owned());
                }
            }
        }
        if let Some(boots) = &mut self.boots {
            match boots.last_mut() {
                Some(span) if span.id == boot => span.last_ts = ts,
                _ => {
                    if boots.len() >= MAX_INDEX_BOOTS {
                        self.boots = None;
                    } else {
                        boots.push(BootSpan {
                            id: boot.to_owned(),
                            first_ts: ts,
                            last_ts: ts,
                            first_seq: seq,
                        });
                    }
                }
            }
        }
    }

    fn may_contain_unit(&self, unit: &str) -> bool {
        self.units
            .as_ref()
            .is_none_or(|us| us.iter().any(|u| u == unit))
    }

    fn may_contain_boot(&self, boot: &str) -> bool {
        self.boots
            .as_ref()
            .is_none_or(|bs| bs.iter().any(|b| b.id == boot))
    }

    /// Byte ranges `[start, end)` covering every record with seq > `after`
    /// (all records if `None`), split at the seek marks, oldest first.
    fn regions(&self, after: Option<u64>) -> Vec<(u64, u64)> {
        let start = after
            .and_then(|a| self.marks.iter().rev().find(|m| m.0 <= a.saturating_add(1)))
            .map_or(0, |m| m.1);
        let mut cuts = vec![start];
        cuts.extend(self.marks.iter().map(|m| m.1).filter(|&o| o > start));
        cuts.push(u64::MAX);
        cuts.windows(2).map(|w| (w[0], w[1])).collect()
    }
}

/// Sidecar file content (`seg-N.idx`), a cache: ignored unless `seg_len` matches.
#[derive(Serialize, Deserialize)]
struct IdxFile {
    version: u32,
    seg_len: u64,
    idx: SegIdx,
}

struct Segment {
    name_seq: u64,
    path: PathBuf,
    /// Bytes on disk (for the active segment: bytes successfully written).
    len: u64,
    idx: SegIdx,
}

struct Active {
    file: File,
    /// A write failed: the next append starts a new segment.
    broken: bool,
}

/// What one scan of a segment found.
struct ScanReport {
    header_ok: bool,
    /// Offset just past the last valid frame (or the header).
    good_end: u64,
    /// Bytes after `good_end` hold no valid frame (torn or corrupt tail).
    bad_tail: bool,
    problems: Vec<(u64, &'static str)>,
    problem_count: usize,
}

/// The unit log store. Single writer; not thread-safe by design (init is single-threaded).
pub struct Journal {
    dir: PathBuf,
    limits: Limits,
    boot_id: String,
    /// Ascending by first seq; the last one is the active segment when `active` is set.
    segs: Vec<Segment>,
    active: Option<Active>,
    /// Complete frames not yet written to the active segment.
    pending: Vec<u8>,
    pending_records: usize,
    scratch: Vec<u8>,
    next_seq: u64,
    notes: Vec<String>,
    dir_dirty: bool,
    mark_every: u64,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros().min(u64::MAX as u128) as u64)
}

fn seg_name(seq: u64) -> String {
    format!("seg-{seq:020}.log")
}

fn parse_seg_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn idx_path(seg_path: &Path) -> PathBuf {
    seg_path.with_extension("idx")
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Strips one trailing `\n` (and a `\r` before it) and caps the length.
fn normalize_message(msg: &str) -> Cow<'_, str> {
    let m = msg.strip_suffix('\n').unwrap_or(msg);
    let m = m.strip_suffix('\r').unwrap_or(m);
    if m.len() <= MAX_MESSAGE_BYTES {
        return Cow::Borrowed(m);
    }
    let cut = floor_char_boundary(m, MAX_MESSAGE_BYTES - TRUNCATION_MARKER.len());
    Cow::Owned(format!("{}{}", &m[..cut], TRUNCATION_MARKER))
}

/// Reads the records of the segment at `path` whose frames start in the
/// logical byte range `[start, stop)`, calling `f(record, frame_offset)` in
/// order; skips corrupt regions by re-synchronising on the frame magic.
/// The logical range covers the file up to `file_limit` (whole file if
/// `None`) followed by the frames in `extra` (buffered, not yet written).
fn scan_segment(
    path: &Path,
    file_limit: Option<u64>,
    extra: &[u8],
    start: u64,
    stop: u64,
    f: &mut dyn FnMut(Record, u64),
) -> io::Result<ScanReport> {
    let mut rep = ScanReport {
        header_ok: false,
        good_end: 0,
        bad_tail: false,
        problems: Vec::new(),
        problem_count: 0,
    };
    let mut file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let end = file_limit.map_or(file_len, |l| l.min(file_len));
    let header = FILE_MAGIC.len() as u64;
    if end < header {
        return Ok(rep);
    }
    let mut magic = [0u8; 8];
    file.read_exact(&mut magic)?;
    if &magic != FILE_MAGIC {
        return Ok(rep);
    }
    rep.header_ok = true;
    rep.good_end = header;
    let (from, to) = (start.max(header), stop.min(end));
    if from < to {
        let mut rd = FrameReader::new(BufReader::with_capacity(32 * 1024, file), from, to)?;
        scan_frames(&mut rd, 0, &mut rep, true, f)?;
    }
    let (xfrom, xto) = (
        start.saturating_sub(end).min(extra.len() as u64),
        stop.saturating_sub(end).min(extra.len() as u64),
    );
    if xfrom < xto {
        let mut rd = FrameReader::new(Cursor::new(extra), xfrom, xto)?;
        let mut rep2 = ScanReport {
            header_ok: true,
            good_end: 0,
            bad_tail: false,
            problems: Vec::new(),
            problem_count: 0,
        };
        scan_frames(&mut rd, end, &mut rep2, false, f)?;
    }
    Ok(rep)
}

fn scan_frames<R: Read + io::Seek>(
    rd: &mut FrameReader<R>,
    base: u64,
    rep: &mut ScanReport,
    track: bool,
    f: &mut dyn FnMut(Record, u64),
) -> io::Result<()> {
    loop {
        let at = rd.pos();
        match rd.next_frame()? {
            Frame::Rec(r) => {
                if track {
                    rep.good_end = rd.pos();
                    rep.bad_tail = false;
                }
                f(r, base + at);
            }
            Frame::Bad { offset, reason } => {
                rep.problem_count += 1;
                if rep.problems.len() < MAX_NOTES_PER_SEGMENT {
                    rep.problems.push((offset, reason));
                }
                rep.bad_tail = true;
                if !rd.resync(offset + 1)? {
                    return Ok(());
                }
            }
            Frame::End => return Ok(()),
        }
    }
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir` for boot `boot_id`.
    ///
    /// Recovers after a crash: a torn or corrupt tail of the newest segment is
    /// truncated; corrupt records in the middle of a segment are skipped. What
    /// was done is reported by [`Journal::recovery_notes`]. Never fails because
    /// of corrupt content, only on I/O errors or invalid arguments.
    pub fn open(dir: &Path, limits: Limits, boot_id: &str) -> Result<Journal, JournalError> {
        if limits.max_segment_bytes < 1024
            || limits.max_total_bytes < limits.max_segment_bytes.saturating_mul(2)
        {
            return Err(JournalError::InvalidLimits {
                path: dir.to_path_buf(),
                reason: format!(
                    "need max_segment_bytes >= 1024 and max_total_bytes >= 2 * max_segment_bytes (got segment {} total {})",
                    limits.max_segment_bytes, limits.max_total_bytes
                ),
            });
        }
        if boot_id.is_empty() || boot_id.len() > 128 || boot_id.chars().any(char::is_control) {
            return Err(JournalError::InvalidBootId {
                path: dir.to_path_buf(),
                boot_id: boot_id.to_owned(),
            });
        }
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let mut j = Journal {
            dir: dir.to_path_buf(),
            limits,
            boot_id: boot_id.to_owned(),
            segs: Vec::new(),
            active: None,
            pending: Vec::new(),
            pending_records: 0,
            scratch: Vec::new(),
            next_seq: 1,
            notes: Vec::new(),
            dir_dirty: false,
            mark_every: (limits.max_segment_bytes / (MAX_MARKS as u64 / 2)).max(MIN_MARK_EVERY),
        };
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
            let entry = entry.map_err(io_err("read directory", dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(seq) = parse_seg_name(name) {
                found.push((seq, entry.path()));
            } else if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
        found.sort();
        let n = found.len();
        for (i, (name_seq, path)) in found.into_iter().enumerate() {
            let newest = i + 1 == n;
            let before = j.segs.len();
            if let Err(e) = j.load_segment(name_seq, path, newest) {
                // One unreadable segment must not cost the whole journal.
                j.notes.push(format!("{e}; segment ignored"));
                j.segs.truncate(before);
                j.active = None;
            }
            if j.segs.len() == before {
                // Ignored (foreign) file: never reuse its name.
                j.next_seq = j.next_seq.max(name_seq.saturating_add(1));
            }
        }
        for s in &j.segs {
            if s.idx.count > 0 {
                j.next_seq = j.next_seq.max(s.idx.last_seq.saturating_add(1));
            }
            j.next_seq = j.next_seq.max(s.name_seq);
        }
        j.enforce_total();
        Ok(j)
    }

    fn load_segment(
        &mut self,
        name_seq: u64,
        path: PathBuf,
        newest: bool,
    ) -> Result<(), JournalError> {
        let meta = fs::metadata(&path).map_err(io_err("stat segment", &path))?;
        let file_len = meta.len();
        if !newest {
            if let Some(idx) = read_idx(&path, file_len) {
                self.segs.push(Segment {
                    name_seq,
                    path,
                    len: file_len,
                    idx,
                });
                return Ok(());
            }
        }
        let mut idx = SegIdx::empty();
        let every = self.mark_every;
        let rep = scan_segment(&path, None, &[], 0, u64::MAX, &mut |r: Record, off| {
            idx.note(r.seq, r.ts_us, &r.boot, &r.unit, off, every)
        })
        .map_err(io_err("read segment", &path))?;
        let shown = path.display();
        for (off, reason) in &rep.problems {
            self.notes.push(format!(
                "{shown}: corrupt record at offset {off} ({reason}); skipped"
            ));
        }
        if rep.problem_count > rep.problems.len() {
            self.notes.push(format!(
                "{shown}: {} more corrupt regions skipped",
                rep.problem_count - rep.problems.len()
            ));
        }
        if !rep.header_ok {
            if newest && file_len < FILE_MAGIC.len() as u64 {
                // Crash right after creating the file: rewrite it empty with a header.
                let mut f = OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(io_err("reinitialise segment", &path))?;
                f.write_all(FILE_MAGIC)
                    .map_err(io_err("reinitialise segment", &path))?;
                if file_len > 0 {
                    self.notes
                        .push(format!("{shown}: incomplete segment header rewritten"));
                }
                self.segs.push(Segment {
                    name_seq,
                    path,
                    len: FILE_MAGIC.len() as u64,
                    idx,
                });
                return self.reopen_active();
            }
            self.notes.push(format!("{shown}: not a journal segment (bad header); ignored, remove it by hand if unwanted"));
            return Ok(());
        }
        let mut len = file_len;
        let mut newest = newest;
        if newest && rep.bad_tail {
            let truncated = OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(rep.good_end));
            match truncated {
                Ok(()) => {
                    self.notes.push(format!(
                        "{shown}: truncated torn/corrupt tail at offset {} ({} bytes dropped)",
                        rep.good_end,
                        file_len - rep.good_end
                    ));
                    len = rep.good_end;
                }
                Err(e) => {
                    // Keep it read-only (readers skip the bad tail); appends go to a new segment.
                    self.notes.push(format!("{shown}: cannot truncate torn tail at offset {}: {e}; starting a new segment", rep.good_end));
                    newest = false;
                }
            }
        }
        if !newest {
            write_idx(&path, len, &idx);
        }
        self.segs.push(Segment {
            name_seq,
            path,
            len,
            idx,
        });
        if newest {
            if let Err(e) = self.reopen_active() {
                self.notes
                    .push(format!("{e}; appends will start a new segment"));
            }
        }
        Ok(())
    }

    fn reopen_active(&mut self) -> Result<(), JournalError> {
        let Some(seg) = self.segs.last() else {
            return Ok(());
        };
        let file = OpenOptions::new()
            .append(true)
            .open(&seg.path)
            .map_err(io_err("open segment for appending", &seg.path))?;
        self.active = Some(Active {
            file,
            broken: false,
        });
        Ok(())
    }

    /// What crash recovery at `open` found and did (empty after a clean shutdown).
    pub fn recovery_notes(&self) -> &[String] {
        &self.notes
    }

    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes used by segments (including not yet written buffered records).
    pub fn disk_usage(&self) -> u64 {
        self.segs.iter().map(|s| s.len).sum::<u64>() + self.pending.len() as u64
    }

    /// Seq of the newest record appended (0 if none ever).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    /// Appends one line with the current realtime clock. Returns its seq.
    /// On `Err` the record is dropped ([`JournalError::lost_records`] tells how many).
    pub fn append(
        &mut self,
        unit: &str,
        stream: Stream,
        message: &str,
    ) -> Result<u64, JournalError> {
        self.append_at(unit, stream, message, now_us())
    }

    /// [`Journal::append`] with an explicit timestamp (µs since the epoch), e.g.
    /// for records relayed from containers or another machine.
    pub fn append_at(
        &mut self,
        unit: &str,
        stream: Stream,
        message: &str,
        ts_us: u64,
    ) -> Result<u64, JournalError> {
        let msg = normalize_message(message);
        let seq = self.next_seq;
        self.scratch.clear();
        let rec = DiskRecordRef {
            q: seq,
            t: ts_us,
            b: &self.boot_id,
            u: unit,
            s: stream,
            m: &msg,
        };
        encode_frame(&mut self.scratch, &rec).map_err(|source| JournalError::Encode {
            path: self.dir.clone(),
            source,
        })?;
        let frame_len = self.scratch.len() as u64;

        let need_new = match (&self.active, self.segs.last()) {
            (Some(a), Some(seg)) => {
                a.broken
                    || (seg.idx.count > 0
                        && seg.len + self.pending.len() as u64 + frame_len
                            > self.limits.max_segment_bytes)
            }
            _ => true,
        };
        if need_new {
            if let Err(e) = self.flush() {
                self.next_seq += 1;
                return Err(add_lost(e, 1));
            }
            if let Err(source) = self.start_segment() {
                self.next_seq += 1;
                let path = self.dir.join(seg_name(seq));
                return Err(JournalError::Write {
                    path,
                    lost: 1,
                    source,
                });
            }
            self.enforce_total();
        }
        let offset = self.segs.last().map_or(0, |s| s.len) + self.pending.len() as u64;
        self.pending.extend_from_slice(&self.scratch);
        self.pending_records += 1;
        if self.scratch.capacity() > 64 * 1024 {
            self.scratch = Vec::new();
        }
        if let Some(seg) = self.segs.last_mut() {
            seg.idx
                .note(seq, ts_us, &self.boot_id, unit, offset, self.mark_every);
        }
        self.next_seq += 1;
        if self.pending.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(seq)
    }

    /// Closes the active segment (writing its index sidecar) and starts a new
    /// one named after the next seq.
    fn start_segment(&mut self) -> io::Result<()> {
        if let Some(a) = self.active.take() {
            if let Some(seg) = self.segs.last_mut() {
                if a.broken {
                    // Re-read its true length; the index may over-count lost records.
                    if let Ok(m) = fs::metadata(&seg.path) {
                        seg.len = m.len();
                    }
                } else {
                    write_idx(&seg.path, seg.len, &seg.idx);
                }
            }
        }
        let name_seq = self.next_seq;
        if self.segs.last().is_some_and(|s| s.name_seq == name_seq) {
            // Same name: the previous attempt holds no record >= name_seq; replace it.
            if let Some(old) = self.segs.pop() {
                let _ = fs::remove_file(idx_path(&old.path));
            }
        }
        let path = self.dir.join(seg_name(name_seq));
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)?;
        if let Err(e) = file.write_all(FILE_MAGIC) {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        drop(file);
        let file = OpenOptions::new().append(true).open(&path)?;
        self.segs.push(Segment {
            name_seq,
            path,
            len: FILE_MAGIC.len() as u64,
            idx: SegIdx::empty(),
        });
        self.active = Some(Active {
            file,
            broken: false,
        });
        self.dir_dirty = true;
        Ok(())
    }

    /// Deletes oldest segments (never the active one) until the closed
    /// segments plus a full active segment fit in `max_total_bytes`, so the
    /// directory stays within the bound until the next rotation.
    fn enforce_total(&mut self) {
        loop {
            let Some(active) = self.segs.last() else {
                return;
            };
            let active_room =
                (active.len + self.pending.len() as u64).max(self.limits.max_segment_bytes);
            let closed: u64 = self.segs[..self.segs.len() - 1].iter().map(|s| s.len).sum();
            if self.segs.len() <= 1 || closed + active_room <= self.limits.max_total_bytes {
                return;
            }
            let old = self.segs.remove(0);
            if let Err(e) = fs::remove_file(&old.path) {
                if e.kind() != io::ErrorKind::NotFound && self.notes.len() < 64 {
                    self.notes.push(format!(
                        "{}: could not delete old segment: {e}",
                        old.path.display()
                    ));
                }
            }
            let _ = fs::remove_file(idx_path(&old.path));
            self.dir_dirty = true;
        }
    }

    /// Writes buffered records to the active segment (no fsync). Cheap when
    /// nothing is pending. Other processes reading the files see records only
    /// after this; `query` on this `Journal` always sees them.
    pub fn flush(&mut self) -> Result<(), JournalError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let (Some(a), Some(seg)) = (self.active.as_mut(), self.segs.last_mut()) else {
            let lost = self.pending_records;
            self.pending.clear();
            self.pending_records = 0;
            return Err(JournalError::Write {
                path: self.dir.clone(),
                lost,
                source: io::Error::other("no active segment"),
            });
        };
        match a.file.write_all(&self.pending) {
            Ok(()) => {
                seg.len += self.pending.len() as u64;
                self.pending.clear();
                self.pending_records = 0;
                if self.pending.capacity() > 2 * FLUSH_AT {
                    self.pending = Vec::new();
                }
                Ok(())
            }
            Err(source) => {
                // Cut off any partial frame; the next append starts a fresh segment.
                let _ = a.file.set_len(seg.len);
                a.broken = true;
                let lost = self.pending_records;
                self.pending.clear();
                self.pending_records = 0;
                Err(JournalError::Write {
                    path: seg.path.clone(),
                    lost,
                    source,
                })
            }
        }
    }

    /// Flushes buffered records and fdatasyncs the active segment (and the
    /// directory if segments were created or deleted).
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.flush()?;
        if let (Some(a), Some(seg)) = (self.active.as_ref(), self.segs.last()) {
            a.file.sync_data().map_err(io_err("fdatasync", &seg.path))?;
        }
        if self.dir_dirty {
            let d = File::open(&self.dir).map_err(io_err("open directory", &self.dir))?;
            d.sync_all().map_err(io_err("fsync directory", &self.dir))?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Boots present in the journal, oldest → newest.
    pub fn boots(&self) -> Result<Vec<BootInfo>, JournalError> {
        let mut out: Vec<BootInfo> = Vec::new();
        let mut add = |id: &str, first_ts: u64, last_ts: u64, first_seq: u64| match out
            .iter_mut()
            .find(|b| b.id == id)
        {
            Some(b) => b.last_ts_us = last_ts,
            None => out.push(BootInfo {
                id: id.to_owned(),
                first_ts_us: first_ts,
                last_ts_us: last_ts,
                first_seq,
            }),
        };
        for (i, seg) in self.segs.iter().enumerate() {
            match &seg.idx.boots {
                Some(spans) => {
                    for s in spans {
                        add(&s.id, s.first_ts, s.last_ts, s.first_seq);
                    }
                }
                None => {
                    let mut overflow: Vec<BootSpan> = Vec::new();
                    self.scan(
                        i,
                        (0, u64::MAX),
                        &mut |r: Record, _| match overflow.last_mut() {
                            Some(s) if s.id == r.boot => s.last_ts = r.ts_us,
                            _ => overflow.push(BootSpan {
                                id: r.boot,
                                first_ts: r.ts_us,
                                last_ts: r.ts_us,
                                first_seq: r.seq,
                            }),
                        },
                    )?;
                    for s in &overflow {
                        add(&s.id, s.first_ts, s.last_ts, s.first_seq);
                    }
                }
            }
        }
        Ok(out)
    }

    fn resolve_boot(&self, sel: &BootSel) -> Result<String, JournalError> {
        let no_such = |known: usize| JournalError::NoSuchBoot {
            path: self.dir.clone(),
            sel: format!("{sel:?}"),
            known,
        };
        match sel {
            BootSel::Current | BootSel::Offset(0) => Ok(self.boot_id.clone()),
            BootSel::Id(id) => Ok(id.clone()),
            BootSel::Offset(k) if *k < 0 => {
                let past: Vec<BootInfo> = self
                    .boots()?
                    .into_iter()
                    .filter(|b| b.id != self.boot_id)
                    .collect();
                let back = k.unsigned_abs() as usize;
                if back > past.len() {
                    return Err(no_such(past.len()));
                }
                Ok(past[past.len() - back].id.clone())
            }
            BootSel::Offset(k) => {
                let all = self.boots()?;
                let i = (*k as usize) - 1;
                all.get(i)
                    .map(|b| b.id.clone())
                    .ok_or_else(|| no_such(all.len()))
            }
        }
    }

    /// Scans the byte range `region` of segment `i` (including buffered records if it is the active one).
    fn scan(
        &self,
        i: usize,
        region: (u64, u64),
        f: &mut dyn FnMut(Record, u64),
    ) -> Result<(), JournalError> {
        let Some(seg) = self.segs.get(i) else {
            return Ok(());
        };
        let is_active = i + 1 == self.segs.len() && self.active.is_some();
        let (limit, extra): (Option<u64>, &[u8]) = if is_active {
            (Some(seg.len), &self.pending)
        } else {
            (None, &[])
        };
        match scan_segment(&seg.path, limit, extra, region.0, region.1, f) {
            Ok(_) => Ok(()),
            // Deleted behind our back: nothing to read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(JournalError::Io {
                op: "read segment",
                path: seg.path.clone(),
                source: e,
            }),
        }
    }

    /// Records matching `q`, ascending by seq. With `last`, scans newest segments first.
    pub fn query(&self, q: &Query) -> Result<Vec<Record>, JournalError> {
        let boot = match &q.boot {
            Some(sel) => Some(self.resolve_boot(sel)?),
            None => None,
        };
        let matches = |r: &Record| {
            q.unit.as_ref().is_none_or(|u| &r.unit == u)
                && boot.as_ref().is_none_or(|b| &r.boot == b)
                && q.since_us.is_none_or(|s| r.ts_us >= s)
                && q.after_seq.is_none_or(|a| r.seq > a)
        };
        let candidates: Vec<usize> = (0..self.segs.len())
            .filter(|&i| {
                let idx = &self.segs[i].idx;
                let is_active = i + 1 == self.segs.len();
                (idx.count > 0 || is_active)
                    && q.after_seq.is_none_or(|a| idx.last_seq > a || is_active)
                    && q.since_us.is_none_or(|s| idx.max_ts >= s || is_active)
                    && q.unit.as_ref().is_none_or(|u| idx.may_contain_unit(u))
                    && boot.as_ref().is_none_or(|b| idx.may_contain_boot(b))
            })
            .collect();
        match q.last {
            Some(0) => Ok(Vec::new()),
            Some(n) => {
                // Newest segment and newest region first; stop once N are found.
                let mut chunks: Vec<VecDeque<Record>> = Vec::new();
                let mut have = 0usize;
                'segs: for &i in candidates.iter().rev() {
                    for region in self.segs[i].idx.regions(q.after_seq).into_iter().rev() {
                        let want = n - have;
                        let mut got: VecDeque<Record> = VecDeque::new();
                        self.scan(i, region, &mut |r: Record, _| {
                            if matches(&r) {
                                if got.len() == want {
                                    got.pop_front();
                                }
                                got.push_back(r);
                            }
                        })?;
                        have += got.len();
                        chunks.push(got);
                        if have >= n {
                            break 'segs;
                        }
                    }
                }
                Ok(chunks.into_iter().rev().flatten().collect())
            }
            None => {
                let mut out = Vec::new();
                for &i in &candidates {
                    let start = self.segs[i]
                        .idx
                        .regions(q.after_seq)
                        .first()
                        .map_or(0, |r| r.0);
                    self.scan(i, (start, u64::MAX), &mut |r: Record, _| {
                        if matches(&r) {
                            out.push(r);
                        }
                    })?;
                }
                Ok(out)
            }
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

fn add_lost(e: JournalError, n: usize) -> JournalError {
    match e {
        JournalError::Write { path, lost, source } => JournalError::Write {
            path,
            lost: lost + n,
            source,
        },
        other => other,
    }
}

fn read_idx(seg_path: &Path, seg_len: u64) -> Option<SegIdx> {
    let data = fs::read(idx_path(seg_path)).ok()?;
    let f: IdxFile = serde_json::from_slice(&data).ok()?;
    (f.version == IDX_VERSION && f.seg_len == seg_len).then_some(f.idx)
}

/// Best effort: the sidecar is only a cache.
fn write_idx(seg_path: &Path, seg_len: u64, idx: &SegIdx) {
    let f = IdxFile {
        version: IDX_VERSION,
        seg_len,
        idx: idx.clone(),
    };
    let Ok(data) = serde_json::to_vec(&f) else {
        return;
    };
    let tmp = seg_path.with_extension("idx.tmp");
    if fs::write(&tmp, &data).is_ok() && fs::rename(&tmp, idx_path(seg_path)).is_err() {
        let _ = fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests;
