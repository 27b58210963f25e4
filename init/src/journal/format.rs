//! On-disk framing of journal segments (see docs/journal.md).
//!
//! A segment file is `FILE_MAGIC` followed by frames. A frame is
//! `FRAME_MAGIC (4) | payload length u32 LE (4) | CRC-32/IEEE of payload u32 LE (4) | payload`,
//! where the payload is one compact JSON object ([`DiskRecord`]).
//! This module knows nothing about segments, rotation or queries.

use std::io::{self, Read, Seek, SeekFrom};

use serde::{Deserialize, Serialize};

use super::{Record, Stream};

/// First 8 bytes of every segment file.
pub(super) const FILE_MAGIC: &[u8; 8] = b"KEELJNL1";
/// First 4 bytes of every frame; lets a reader re-synchronise after corruption.
pub(super) const FRAME_MAGIC: [u8; 4] = [0x1E, b'K', b'J', 0x01];
/// Frame header length: magic + length + crc.
pub(super) const FRAME_HDR: usize = 12;
/// Largest payload a reader accepts. A 16 KiB message of control characters
/// escapes to at most 6x in JSON, plus a long unit name; anything larger is corruption.
pub(super) const MAX_PAYLOAD: u32 = 256 * 1024;

/// Frames carry a CRC-32/IEEE of their payload (`keel_model::crc32`, the one GPT headers use too).
pub(super) use keel_model::crc32::crc32;

/// The record as written (short keys keep segments compact).
#[derive(Serialize)]
pub(super) struct DiskRecordRef<'a> {
    pub q: u64,
    pub t: u64,
    pub b: &'a str,
    pub u: &'a str,
    pub s: Stream,
    pub m: &'a str,
}

/// The record as read back.
#[derive(Deserialize)]
pub(super) struct DiskRecord {
    q: u64,
    t: u64,
    b: String,
    u: String,
    s: Stream,
    m: String,
}

impl From<DiskRecord> for Record {
    fn from(d: DiskRecord) -> Record {
        Record {
            seq: d.q,
            ts_us: d.t,
            boot: d.b,
            unit: d.u,
            stream: d.s,
            message: d.m,
        }
    }
}

/// Appends one complete frame for `rec` to `out`; returns the frame length.
pub(super) fn encode_frame(
    out: &mut Vec<u8>,
    rec: &DiskRecordRef<'_>,
) -> Result<usize, serde_json::Error> {
    let start = out.len();
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&[0u8; 8]);
    if let Err(e) = serde_json::to_writer(&mut *out, rec) {
        out.truncate(start);
        return Err(e);
    }
    let payload_len = out.len() - start - FRAME_HDR;
    let crc = crc32(&out[start + FRAME_HDR..]);
    out[start + 4..start + 8].copy_from_slice(&(payload_len as u32).to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    Ok(out.len() - start)
}

pub(super) enum Frame {
    Rec(Record),
    /// The bytes at `offset` are not a valid frame. The reader position is
    /// unspecified afterwards: call [`FrameReader::resync`] or stop.
    Bad {
        offset: u64,
        reason: &'static str,
    },
    End,
}

/// Sequential frame reader over `[start, end)` of a seekable source.
pub(super) struct FrameReader<R: Read + Seek> {
    r: R,
    pos: u64,
    end: u64,
    payload: Vec<u8>,
}

impl<R: Read + Seek> FrameReader<R> {
    pub(super) fn new(mut r: R, start: u64, end: u64) -> io::Result<Self> {
        r.seek(SeekFrom::Start(start))?;
        Ok(FrameReader {
            r,
            pos: start,
            end,
            payload: Vec::new(),
        })
    }

    /// Offset just past the last frame returned as `Rec`.
    pub(super) fn pos(&self) -> u64 {
        self.pos
    }

    pub(super) fn next_frame(&mut self) -> io::Result<Frame> {
        if self.pos >= self.end {
            return Ok(Frame::End);
        }
        let offset = self.pos;
        let remaining = self.end - self.pos;
        if remaining < FRAME_HDR as u64 {
            return Ok(Frame::Bad {
                offset,
                reason: "truncated frame header",
            });
        }
        let mut hdr = [0u8; FRAME_HDR];
        self.r.read_exact(&mut hdr)?;
        if hdr[0..4] != FRAME_MAGIC {
            return Ok(Frame::Bad {
                offset,
                reason: "bad frame magic",
            });
        }
        let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        let crc = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        if !(2..=MAX_PAYLOAD).contains(&len) {
            return Ok(Frame::Bad {
                offset,
                reason: "implausible frame length",
            });
        }
        if FRAME_HDR as u64 + len as u64 > remaining {
            return Ok(Frame::Bad {
                offset,
                reason: "frame extends past end of segment (torn write)",
            });
        }
        self.payload.resize(len as usize, 0);
        self.r.read_exact(&mut self.payload)?;
        if crc32(&self.payload) != crc {
            return Ok(Frame::Bad {
                offset,
                reason: "checksum mismatch",
            });
        }
        let rec: DiskRecord = match serde_json::from_slice(&self.payload) {
            Ok(r) => r,
            Err(_) => {
                return Ok(Frame::Bad {
                    offset,
                    reason: "undecodable record",
                })
            }
        };
        self.pos = offset + FRAME_HDR as u64 + len as u64;
        if self.payload.capacity() > 64 * 1024 {
            self.payload = Vec::new();
        }
        Ok(Frame::Rec(rec.into()))
    }

    /// Scans forward from `from` for the next valid frame. Returns true and
    /// positions the reader on it, or false (reader at end) if there is none.
    pub(super) fn resync(&mut self, from: u64) -> io::Result<bool> {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut off = from;
        while off + FRAME_HDR as u64 <= self.end {
            self.r.seek(SeekFrom::Start(off))?;
            let want = (chunk.len() as u64).min(self.end - off) as usize;
            let n = read_full(&mut self.r, &mut chunk[..want])?;
            if n < FRAME_MAGIC.len() {
                break;
            }
            let candidates: Vec<u64> = chunk[..n]
                .windows(FRAME_MAGIC.len())
                .enumerate()
                .filter(|(_, w)| *w == FRAME_MAGIC)
                .map(|(i, _)| off + i as u64)
                .collect();
            for cand in candidates {
                self.r.seek(SeekFrom::Start(cand))?;
                self.pos = cand;
                if let Frame::Rec(_) = self.next_frame()? {
                    self.pos = cand;
                    self.r.seek(SeekFrom::Start(cand))?;
                    return Ok(true);
                }
            }
            off += (n - (FRAME_MAGIC.len() - 1)) as u64;
        }
        self.pos = self.end;
        Ok(false)
    }
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip_and_resync() {
        let mut buf = Vec::new();
        for i in 1..=3u64 {
            let r = DiskRecordRef {
                q: i,
                t: 10 * i,
                b: "b",
                u: "u",
                s: Stream::Stdout,
                m: "hello",
            };
            encode_frame(&mut buf, &r).expect("encode");
        }
        // Corrupt a byte in the middle frame's payload.
        let third = buf.len() / 3;
        buf[third + FRAME_HDR + 3] ^= 0xFF;
        let end = buf.len() as u64;
        let mut rd = FrameReader::new(io::Cursor::new(&buf[..]), 0, end).expect("reader");
        let mut seqs = Vec::new();
        let mut bad = 0;
        loop {
            match rd.next_frame().expect("io") {
                Frame::Rec(r) => seqs.push(r.seq),
                Frame::Bad { offset, .. } => {
                    bad += 1;
                    if !rd.resync(offset + 1).expect("io") {
                        break;
                    }
                }
                Frame::End => break,
            }
        }
        assert_eq!(seqs, vec![1, 3]);
        assert_eq!(bad, 1);
    }
}
