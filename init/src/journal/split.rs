//! Splitting a unit's stdout/stderr byte stream into journal lines.

/// Longest line (in input bytes) emitted in one piece; matches the journal's message cap.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Splits a byte stream (a unit's stdout pipe) into lines.
///
/// Holds a partial trailing line between `push` calls; a line longer than
/// [`MAX_LINE_BYTES`] is emitted in pieces of at most that many input bytes (cut
/// on a UTF-8 character boundary when possible); invalid UTF-8 is replaced
/// lossily with U+FFFD. The `\n` terminator is not included; a `\r` before it
/// is kept (the journal strips it). Memory held: at most one partial line; the
/// buffer is released when it empties after growing large.
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    pub fn new() -> Self {
        LineSplitter {
            partial: Vec::new(),
        }
    }

    /// Bytes currently held as an unterminated line.
    pub fn pending_bytes(&self) -> usize {
        self.partial.len()
    }

    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<String>) {
        while !bytes.is_empty() {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.partial.extend_from_slice(&bytes[..i]);
                    self.emit_long_pieces(out);
                    out.push(String::from_utf8_lossy(&self.partial).into_owned());
                    self.partial.clear();
                    bytes = &bytes[i + 1..];
                }
                None => {
                    self.partial.extend_from_slice(bytes);
                    self.emit_long_pieces(out);
                    bytes = &[];
                }
            }
        }
        self.release();
    }

    /// End of stream: emits the held partial line, if any.
    pub fn finish(&mut self, out: &mut Vec<String>) {
        self.emit_long_pieces(out);
        if !self.partial.is_empty() {
            out.push(String::from_utf8_lossy(&self.partial).into_owned());
            self.partial.clear();
        }
        self.partial = Vec::new();
    }

    /// While the partial line exceeds the cap, emit a leading piece.
    fn emit_long_pieces(&mut self, out: &mut Vec<String>) {
        while self.partial.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            // Back off (at most 3 bytes) so a multi-byte character is not split.
            let mut back = 0;
            while back < 3 && cut > 0 && (self.partial[cut] & 0xC0) == 0x80 {
                cut -= 1;
                back += 1;
            }
            if (self.partial[cut] & 0xC0) == 0x80 || cut == 0 {
                cut = MAX_LINE_BYTES; // not valid UTF-8 anyway; cut hard
            }
            out.push(String::from_utf8_lossy(&self.partial[..cut]).into_owned());
            self.partial.drain(..cut);
        }
    }

    fn release(&mut self) {
        if self.partial.is_empty() && self.partial.capacity() > 4096 {
            self.partial = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_lines_are_held() {
        let mut s = LineSplitter::new();
        let mut out = Vec::new();
        s.push(b"hel", &mut out);
        assert!(out.is_empty());
        s.push(b"lo\nwor", &mut out);
        assert_eq!(out, vec!["hello"]);
        s.push(b"ld\n\nx", &mut out);
        assert_eq!(out, vec!["hello", "world", ""]);
        s.finish(&mut out);
        assert_eq!(out, vec!["hello", "world", "", "x"]);
        s.finish(&mut out);
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn long_lines_come_in_pieces() {
        let mut s = LineSplitter::new();
        let mut out = Vec::new();
        let line = vec![b'a'; MAX_LINE_BYTES * 2 + 10];
        for chunk in line.chunks(1000) {
            s.push(chunk, &mut out);
        }
        assert_eq!(out.len(), 2);
        assert!(s.pending_bytes() <= MAX_LINE_BYTES);
        s.push(b"\n", &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(out.iter().map(|l| l.len()).sum::<usize>(), line.len());
        assert!(out.iter().all(|l| l.len() <= MAX_LINE_BYTES));
    }

    #[test]
    fn long_line_cut_on_char_boundary() {
        let mut s = LineSplitter::new();
        let mut out = Vec::new();
        let mut line = vec![b'a'; MAX_LINE_BYTES - 1];
        line.extend_from_slice("é".as_bytes()); // straddles the cap
        line.extend_from_slice(b"zz\n");
        s.push(&line, &mut out);
        assert_eq!(out.len(), 2);
        assert!(!out.concat().contains('\u{FFFD}'));
        assert_eq!(out[1], "ézz");
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let mut s = LineSplitter::new();
        let mut out = Vec::new();
        s.push(b"ok \xff\xfe bad\n", &mut out);
        assert_eq!(out, vec!["ok \u{FFFD}\u{FFFD} bad"]);
        // A valid multi-byte char split across pushes survives.
        s.push(&"ü".as_bytes()[..1], &mut out);
        s.push(&"ü".as_bytes()[1..], &mut out);
        s.push(b"\n", &mut out);
        assert_eq!(out[1], "ü");
    }
}
