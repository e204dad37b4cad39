//! Streaming transforms for multi-line responses (RFC 1939 section 3).
//!
//! Messages are stored exactly as delivered (CRLF line ends, no stuffing).
//! On the way out every line that starts with "." gets one more ".", and the
//! response ends with ".CRLF". Both transforms work chunk by chunk so a
//! message is never held in memory whole.

/// Adds dot-stuffing to a byte stream split at arbitrary points.
#[derive(Debug)]
pub struct DotStuffer {
    at_line_start: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl DotStuffer {
    pub fn new() -> Self {
        Self { at_line_start: true }
    }

    /// Appends the stuffed form of `chunk` to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + 8);
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.at_line_start && rest[0] == b'.' {
                out.push(b'.');
            }
            match rest.iter().position(|&b| b == b'\n') {
                Some(p) => {
                    out.extend_from_slice(&rest[..=p]);
                    self.at_line_start = true;
                    rest = &rest[p + 1..];
                }
                None => {
                    out.extend_from_slice(rest);
                    self.at_line_start = false;
                    rest = &[];
                }
            }
        }
    }

    /// Ends the multi-line response, closing an unterminated last line first.
    pub fn finish(self, out: &mut Vec<u8>) {
        if !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// Passes the header, the blank line and the first `n` body lines (TOP).
#[derive(Debug)]
pub struct TopFilter {
    body_lines_wanted: u32,
    body_lines_seen: u32,
    in_header: bool,
    /// Octets of the current line before its LF, not counting a CR.
    line_len: usize,
    done: bool,
}

impl TopFilter {
    pub fn new(body_lines: u32) -> Self {
        Self { body_lines_wanted: body_lines, body_lines_seen: 0, in_header: true, line_len: 0, done: false }
    }

    /// True once everything TOP asked for has been passed on.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Appends the part of `chunk` that TOP returns to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        for (i, &b) in chunk.iter().enumerate() {
            if self.done {
                return;
            }
            out.push(b);
            if b == b'\n' {
                if self.in_header {
                    if self.line_len == 0 {
                        self.in_header = false;
                    }
                } else {
                    self.body_lines_seen += 1;
                }
                self.line_len = 0;
                if !self.in_header && self.body_lines_seen >= self.body_lines_wanted {
                    self.done = true;
                    let _ = i;
                }
            } else if b != b'\r' {
                self.line_len += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuff(input: &[u8], chunk: usize) -> Vec<u8> {
        let mut s = DotStuffer::new();
        let mut out = Vec::new();
        for c in input.chunks(chunk.max(1)) {
            s.push(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn stuffing_in_every_chunk_size() {
        let input = b".leading\r\nmid.dle\r\n..two\r\n.\r\nlast";
        let expected = b"..leading\r\nmid.dle\r\n...two\r\n..\r\nlast\r\n.\r\n";
        for chunk in 1..=input.len() {
            assert_eq!(stuff(input, chunk), expected, "chunk {chunk}");
        }
        assert_eq!(stuff(b"", 1), b".\r\n");
        assert_eq!(stuff(b"a\r\n", 1), b"a\r\n.\r\n");
    }

    fn top(input: &[u8], n: u32, chunk: usize) -> Vec<u8> {
        let mut t = TopFilter::new(n);
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            t.push(c, &mut out);
        }
        out
    }

    #[test]
    fn top_in_every_chunk_size() {
        let msg = b"Subject: x\r\nFrom: y\r\n\r\nline1\r\nline2\r\nline3\r\n";
        for chunk in 1..=msg.len() {
            assert_eq!(top(msg, 0, chunk), b"Subject: x\r\nFrom: y\r\n\r\n");
            assert_eq!(top(msg, 2, chunk), b"Subject: x\r\nFrom: y\r\n\r\nline1\r\nline2\r\n");
            assert_eq!(top(msg, 99, chunk), msg);
        }
        // No body separator: the whole message is header.
        assert_eq!(top(b"A: b\r\n", 0, 1), b"A: b\r\n");
    }
}
