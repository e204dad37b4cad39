//! Line framing for the POP3 command channel.
//!
//! The buffer keeps bytes across calls, so a read that is cancelled (for
//! example by a shutdown signal in `select!`) loses nothing: "incomplete" is a
//! normal answer, "too long" is an error the session turns into a reply.

/// Outcome of a failed framing attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineError {
    /// The peer sent more than `max` octets without a line terminator. The
    /// offending bytes up to the next LF are discarded so the session can
    /// answer and carry on (or disconnect) without buffering more.
    TooLong,
}

/// Accumulates bytes and yields complete lines (without their terminator).
///
/// Lines end in CRLF. A bare LF is accepted as a terminator for commands
/// (some clients are sloppy and it cannot smuggle anything on a command
/// channel where every line is parsed on its own); a bare CR inside a line is
/// kept and later rejected by the command parser.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// Hard cap on one line, terminator included.
    max: usize,
    /// Start of the unconsumed region in `buf`.
    start: usize,
    /// True while discarding the rest of an over-long line.
    discarding: bool,
}

impl LineBuffer {
    /// A buffer that refuses lines longer than `max` octets (terminator
    /// included).
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::with_capacity(256), max, start: 0, discarding: false }
    }

    /// Appends bytes read from the peer.
    pub fn extend(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// True if bytes are waiting that have not been returned as lines yet
    /// (the session flushes replies only when this is false).
    pub fn has_buffered(&self) -> bool {
        self.start < self.buf.len()
    }

    /// Drops everything buffered. Used after STLS: any plaintext the client
    /// pipelined behind the command must never be interpreted once TLS is up
    /// (CVE-2011-0411 class).
    pub fn discard(&mut self) -> usize {
        let n = self.buf.len() - self.start;
        self.buf.clear();
        self.start = 0;
        self.discarding = false;
        n
    }

    /// Removes and returns every buffered byte not yet returned as a line
    /// (used when a protocol switches from lines to a data stream, as LMTP
    /// does after DATA).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let rest = self.buf[self.start..].to_vec();
        self.buf.clear();
        self.start = 0;
        self.discarding = false;
        rest
    }

    /// Returns the next complete line, `Ok(None)` if more bytes are needed.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, LineError> {
        loop {
            let pending = &self.buf[self.start..];
            match pending.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let end = self.start + pos;
                    let line_start = self.start;
                    self.start = end + 1;
                    if self.discarding {
                        self.discarding = false;
                        self.compact();
                        continue;
                    }
                    if pos + 1 > self.max {
                        self.compact();
                        return Err(LineError::TooLong);
                    }
                    let mut line = self.buf[line_start..end].to_vec();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    self.compact();
                    return Ok(Some(line));
                }
                None => {
                    if pending.len() > self.max {
                        // Throw the partial line away now so memory stays
                        // bounded, and keep discarding up to the next LF.
                        self.buf.truncate(self.start);
                        self.compact();
                        let was = self.discarding;
                        self.discarding = true;
                        if !was {
                            return Err(LineError::TooLong);
                        }
                    } else if self.discarding {
                        self.buf.truncate(self.start);
                        self.compact();
                    }
                    return Ok(None);
                }
            }
        }
    }

    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 4096 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(input: &[u8], chunk: usize, max: usize) -> Vec<Result<Vec<u8>, LineError>> {
        let mut lb = LineBuffer::new(max);
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            lb.extend(c);
            loop {
                match lb.next_line() {
                    Ok(Some(l)) => out.push(Ok(l)),
                    Ok(None) => break,
                    Err(e) => out.push(Err(e)),
                }
            }
        }
        out
    }

    #[test]
    fn every_chunk_size_yields_same_lines() {
        let input = b"USER alice\r\nPASS secret word\r\nSTAT\nLIST 1\r\n";
        let expected: Vec<Result<Vec<u8>, LineError>> = vec![
            Ok(b"USER alice".to_vec()),
            Ok(b"PASS secret word".to_vec()),
            Ok(b"STAT".to_vec()),
            Ok(b"LIST 1".to_vec()),
        ];
        for chunk in 1..=input.len() {
            assert_eq!(feed_all(input, chunk, 255), expected, "chunk size {chunk}");
        }
    }

    #[test]
    fn too_long_is_reported_once_and_following_lines_survive() {
        let mut input = vec![b'A'; 1000];
        input.extend_from_slice(b"\r\nNOOP\r\n");
        for chunk in 1..=input.len() {
            let got = feed_all(&input, chunk, 64);
            assert_eq!(got, vec![Err(LineError::TooLong), Ok(b"NOOP".to_vec())], "chunk size {chunk}");
        }
    }

    #[test]
    fn memory_stays_bounded_without_terminator() {
        let mut lb = LineBuffer::new(64);
        let mut errors = 0;
        for _ in 0..10_000 {
            lb.extend(&[b'x'; 100]);
            if lb.next_line().is_err() {
                errors += 1;
            }
            assert!(lb.buf.len() <= 200);
        }
        assert_eq!(errors, 1);
    }

    #[test]
    fn discard_drops_pipelined_bytes() {
        let mut lb = LineBuffer::new(255);
        lb.extend(b"STLS\r\nUSER injected\r\n");
        assert_eq!(lb.next_line(), Ok(Some(b"STLS".to_vec())));
        assert_eq!(lb.discard(), b"USER injected\r\n".len());
        assert_eq!(lb.next_line(), Ok(None));
    }
}
