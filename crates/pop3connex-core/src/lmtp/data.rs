//! Sans-IO LMTP/SMTP DATA receiver (RFC 5321 section 4.1.1.4, 4.5.2).
//!
//! Hand-written rather than taken from an SMTP crate because the one
//! property that matters most here is narrow and must be exact: only
//! `<CRLF>.<CRLF>` ends the data. A bare LF never starts a new line for the
//! purpose of finding the terminator, so `\n.\n`, `\n.\r\n` and `\r\n.\n`
//! are ordinary data and whatever follows them can never run as a command
//! (SMTP smuggling). Bare CR or LF anywhere is recorded so the session can
//! refuse such a message. Leading dots are unstuffed; the size limit is
//! enforced while receiving, so an oversize message is consumed to its end
//! but never buffered past the limit.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    /// After CRLF (or at the very start).
    LineStart,
    /// After a '.' at line start.
    Dot,
    /// After ".\r" at line start.
    DotCr,
    /// Inside a line.
    Mid,
    /// After a '\r' inside a line (or after an empty line's '\r').
    Cr,
}

#[derive(Debug)]
pub struct DataReceiver {
    pos: Pos,
    max: usize,
    received: usize,
    /// Data exceeded `max`; the rest is discarded.
    pub oversize: bool,
    /// A CR or LF not part of a CRLF pair was seen.
    pub bare_line_ending: bool,
}

impl DataReceiver {
    pub fn new(max: usize) -> Self {
        Self { pos: Pos::LineStart, max, received: 0, oversize: false, bare_line_ending: false }
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        self.received += bytes.len();
        if self.received > self.max {
            self.oversize = true;
        }
        if !self.oversize {
            out.extend_from_slice(bytes);
        }
    }

    /// Feeds bytes; message bytes go to `out`. Returns `Some(n)` once the
    /// terminator has been consumed, `n` being the number of input bytes
    /// used (the rest belongs to the next command).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        for (i, &b) in input.iter().enumerate() {
            self.pos = match (self.pos, b) {
                (Pos::LineStart, b'.') => Pos::Dot,
                (Pos::LineStart | Pos::Mid, b'\r') => {
                    self.emit(out, b"\r");
                    Pos::Cr
                }
                (Pos::LineStart | Pos::Mid, b'\n') => {
                    self.bare_line_ending = true;
                    self.emit(out, b"\n");
                    Pos::Mid
                }
                (Pos::LineStart | Pos::Mid, c) => {
                    self.emit(out, &[c]);
                    Pos::Mid
                }
                (Pos::Dot, b'\r') => Pos::DotCr,
                (Pos::Dot, b'\n') => {
                    self.bare_line_ending = true;
                    self.emit(out, b".\n");
                    Pos::Mid
                }
                // Dot-stuffing: the leading dot is removed.
                (Pos::Dot, c) => {
                    self.emit(out, &[c]);
                    Pos::Mid
                }
                (Pos::DotCr, b'\n') => return Some(i + 1),
                (Pos::DotCr, c) => {
                    // ".\r" followed by something else: a bare CR.
                    self.bare_line_ending = true;
                    self.emit(out, b".\r");
                    self.emit(out, &[c]);
                    if c == b'\r' {
                        Pos::Cr
                    } else {
                        Pos::Mid
                    }
                }
                (Pos::Cr, b'\n') => {
                    self.emit(out, b"\n");
                    Pos::LineStart
                }
                (Pos::Cr, b'\r') => {
                    self.bare_line_ending = true;
                    self.emit(out, b"\r");
                    Pos::Cr
                }
                (Pos::Cr, c) => {
                    self.bare_line_ending = true;
                    self.emit(out, &[c]);
                    Pos::Mid
                }
            };
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in chunks of `chunk` bytes; returns (message, rest, receiver).
    fn run(input: &[u8], chunk: usize, max: usize) -> (Vec<u8>, Option<Vec<u8>>, DataReceiver) {
        let mut r = DataReceiver::new(max);
        let mut out = Vec::new();
        let mut offset = 0;
        for c in input.chunks(chunk) {
            if let Some(n) = r.feed(c, &mut out) {
                return (out, Some(input[offset + n..].to_vec()), r);
            }
            offset += c.len();
        }
        (out, None, r)
    }

    #[test]
    fn ends_only_at_crlf_dot_crlf_in_every_chunk_size() {
        let input = b"Subject: x\r\n\r\n..stuffed\r\nbody\r\n.\r\nQUIT\r\n";
        for chunk in 1..=input.len() {
            let (msg, rest, r) = run(input, chunk, 1 << 20);
            assert_eq!(msg, b"Subject: x\r\n\r\n.stuffed\r\nbody\r\n", "chunk {chunk}");
            assert_eq!(rest.as_deref(), Some(&b"QUIT\r\n"[..]));
            assert!(!r.bare_line_ending && !r.oversize);
        }
    }

    #[test]
    fn smuggling_sequences_do_not_end_data() {
        for evil in [
            &b"a\n.\nMAIL FROM:<x>\r\n"[..],
            b"a\n.\r\nMAIL FROM:<x>\r\n",
            b"a\r\n.\nMAIL FROM:<x>\r\n",
            b"a\r.\r\nRSET\r\n",
        ] {
            let mut input = evil.to_vec();
            input.extend_from_slice(b"tail\r\n.\r\nNOOP\r\n");
            for chunk in 1..=input.len() {
                let (msg, rest, r) = run(&input, chunk, 1 << 20);
                assert_eq!(rest.as_deref(), Some(&b"NOOP\r\n"[..]), "{evil:?} chunk {chunk}");
                assert!(r.bare_line_ending, "{evil:?}");
                assert!(msg.ends_with(b"tail\r\n"));
            }
        }
    }

    #[test]
    fn empty_message_and_oversize() {
        let (msg, rest, _) = run(b".\r\n", 1, 10);
        assert!(msg.is_empty());
        assert_eq!(rest.as_deref(), Some(&b""[..]));
        let big = [b"x".repeat(100), b"\r\n.\r\n".to_vec()].concat();
        let (msg, rest, r) = run(&big, 7, 10);
        assert!(r.oversize);
        assert!(msg.len() <= 10);
        assert!(rest.is_some());
    }
}
