//! The client side of POP3: server replies into typed values, client
//! commands into bytes.
//!
//! The connector's upstream session speaks to servers it must treat as
//! hostile. Everything that session needs to understand the server lives
//! here, without I/O, so it can be fed in every chunk size:
//!
//! - [`ReplyBuffer`]: reply-line framing with a hard per-line limit the
//!   caller picks per read (status lines are short, message lines long).
//!   "Incomplete" is normal flow; "too long" is an error, raised as soon as
//!   the limit can no longer be met, so memory stays bounded.
//! - [`parse_status`]: `+OK` / `-ERR` (and `+ ` SASL challenges during AUTH),
//!   with [`resp_code`] for RFC 2449 `[CODE]`s.
//! - [`body_line`]: dot-unstuffing and the terminating "." of multi-line
//!   responses.
//! - [`parse_list_line`], [`parse_uidl_line`], [`parse_stat`]: listings into
//!   typed values ([`MsgNum`], [`Uidl`]) with RFC 1939 validation, and
//!   [`uidl_duplicate`] for repeated numbers or ids.
//! - [`sasl_mechanisms`]: the `SASL` line of a CAPA response.
//! - [`ClientCommand`]: command encoding, refusing line breaks and NUL in
//!   arguments so nothing can smuggle a second command.

use std::fmt;

use crate::command::MsgNum;

/// A reply line exceeded the limit the caller gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong;

/// Bytes received from a server but not yet returned as lines.
///
/// Lines end in CRLF; a bare LF is accepted as a terminator too (the
/// session normalises message lines to CRLF). The buffer survives a
/// cancelled read: nothing is lost between calls.
#[derive(Debug, Default)]
pub struct ReplyBuffer {
    data: Vec<u8>,
    /// Start of the unconsumed region in `data`.
    start: usize,
}

/// Consumed bytes are dropped from the front of the buffer once this many
/// have accumulated (and always when everything is consumed), so a long
/// multi-line response does not keep the whole of it in memory.
const COMPACT_AFTER: usize = 64 * 1024;

impl ReplyBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the server.
    pub fn extend(&mut self, data: &[u8]) {
        self.data.extend_from_slice(data);
    }

    /// Octets received and not yet returned as lines. Non-zero before a
    /// command is sent means the server sent data nobody asked for.
    pub fn pending(&self) -> usize {
        self.data.len() - self.start
    }

    /// The next line without its terminator, `Ok(None)` if more bytes are
    /// needed. A line (terminator included) longer than `max` octets is an
    /// error, reported as soon as `max` octets arrived without a line end.
    pub fn next_line(&mut self, max: usize) -> Result<Option<Vec<u8>>, LineTooLong> {
        let pending = &self.data[self.start..];
        match pending.iter().position(|&b| b == b'\n') {
            Some(pos) if pos < max => {
                let mut line = pending[..pos].to_vec();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.start += pos + 1;
                if self.start == self.data.len() {
                    self.data.clear();
                    self.start = 0;
                } else if self.start >= COMPACT_AFTER {
                    self.data.drain(..self.start);
                    self.start = 0;
                }
                Ok(Some(line))
            }
            Some(_) => Err(LineTooLong),
            None if pending.len() >= max => Err(LineTooLong),
            None => Ok(None),
        }
    }
}

/// A server status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// `+OK` and the text after it (without the separating space).
    Ok(Vec<u8>),
    /// `-ERR` and the text after it, response code included.
    Err(Vec<u8>),
    /// `+ <base64>`: a SASL challenge (only during AUTH).
    Challenge(Vec<u8>),
}

/// A line that is not a status line (`+OKAY`, `HELLO`, `+ x` outside AUTH).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAStatus;

impl fmt::Display for NotAStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The line itself is not quoted: it could echo anything.
        f.write_str("response starts with neither +OK nor -ERR")
    }
}

/// Parses a status line; `allow_challenge` admits `+ ` (SASL, RFC 5034).
pub fn parse_status(line: &[u8], allow_challenge: bool) -> Result<Status, NotAStatus> {
    let rest = |prefix: &[u8]| -> Option<Vec<u8>> {
        let r = line.strip_prefix(prefix)?;
        match r.first() {
            None => Some(Vec::new()),
            Some(b' ') => Some(r[1..].to_vec()),
            Some(_) => None,
        }
    };
    if let Some(r) = rest(b"+OK") {
        return Ok(Status::Ok(r));
    }
    if let Some(r) = rest(b"-ERR") {
        return Ok(Status::Err(r));
    }
    if allow_challenge {
        if let Some(r) = rest(b"+") {
            return Ok(Status::Challenge(r));
        }
    }
    Err(NotAStatus)
}

/// The RFC 2449 response code at the start of a status text
/// (`[SYS/TEMP] busy` gives `SYS/TEMP`), if any.
pub fn resp_code(text: &[u8]) -> Option<&[u8]> {
    let inner = text.strip_prefix(b"[")?;
    let end = inner.iter().position(|&b| b == b']')?;
    let code = &inner[..end];
    (!code.is_empty() && code.iter().all(|b| (0x21..=0x7e).contains(b))).then_some(code)
}

/// One line of a multi-line response with the dot-stuffing removed; `None`
/// for the terminating ".".
pub fn body_line(mut line: Vec<u8>) -> Option<Vec<u8>> {
    if line.first() == Some(&b'.') {
        if line.len() == 1 {
            return None;
        }
        line.remove(0);
    }
    Some(line)
}

/// Why a listing line (or a STAT reply) was refused. The texts end up in
/// the connector's protocol errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListingError {
    MissingField,
    TooManyFields,
    BadMessageNumber,
    MessageNumberOutOfRange,
    BadUidl,
    UidlNotAscii,
    NoSize,
    BadSize,
    DuplicateMessageNumber,
    DuplicateUidl,
}

impl ListingError {
    pub fn as_str(self) -> &'static str {
        match self {
            ListingError::MissingField => "missing field",
            ListingError::TooManyFields => "too many fields",
            ListingError::BadMessageNumber => "bad message number",
            ListingError::MessageNumberOutOfRange => "message number out of range",
            ListingError::BadUidl => "a unique id is not 1 to 70 printable characters",
            ListingError::UidlNotAscii => "a unique id is not ASCII",
            ListingError::NoSize => "no size",
            ListingError::BadSize => "bad size",
            ListingError::DuplicateMessageNumber => "duplicate message number",
            ListingError::DuplicateUidl => "duplicate unique id",
        }
    }
}

impl fmt::Display for ListingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message number sent by a server: decimal digits, 1 to 2^32-1. Leading
/// zeros are tolerated (unlike in commands we receive: a server's listing
/// is read, not judged).
pub fn parse_msg_number(n: &[u8]) -> Result<MsgNum, ListingError> {
    if n.is_empty() || n.len() > 10 || !n.iter().all(u8::is_ascii_digit) {
        return Err(ListingError::BadMessageNumber);
    }
    let v = n.iter().fold(0u64, |v, &d| v * 10 + u64::from(d - b'0'));
    u32::try_from(v).ok().and_then(MsgNum::new).ok_or(ListingError::MessageNumberOutOfRange)
}

/// A size in octets: 1 to 19 decimal digits that fit a `u64`.
fn parse_size(size: &[u8]) -> Result<u64, ListingError> {
    if size.is_empty() || size.len() > 19 || !size.iter().all(u8::is_ascii_digit) {
        return Err(ListingError::BadSize);
    }
    std::str::from_utf8(size).ok().and_then(|s| s.parse().ok()).ok_or(ListingError::BadSize)
}

/// A unique id as RFC 1939 section 7 defines it: 1 to 70 characters in
/// 0x21 to 0x7E.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Uidl(String);

/// Longest unique id (RFC 1939 section 7).
pub const MAX_UIDL: usize = 70;

impl Uidl {
    pub fn parse(uid: &[u8]) -> Result<Self, ListingError> {
        if uid.is_empty() || uid.len() > MAX_UIDL || !uid.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(ListingError::BadUidl);
        }
        String::from_utf8(uid.to_vec()).map(Uidl).map_err(|_| ListingError::UidlNotAscii)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Uidl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Splits `a SP b` (trailing blanks tolerated) into exactly two words.
fn split_pair(line: &[u8]) -> Result<(&[u8], &[u8]), ListingError> {
    let end = line.iter().rposition(|b| !matches!(b, b' ' | b'\t')).map_or(0, |p| p + 1);
    let line = &line[..end];
    let sp = line.iter().position(|&b| b == b' ').ok_or(ListingError::MissingField)?;
    let (a, b) = (&line[..sp], &line[sp + 1..]);
    if b.contains(&b' ') {
        return Err(ListingError::TooManyFields);
    }
    Ok((a, b))
}

/// One line of a `UIDL` listing: `msg uid`.
pub fn parse_uidl_line(line: &[u8]) -> Result<(MsgNum, Uidl), ListingError> {
    let (n, uid) = split_pair(line)?;
    Ok((parse_msg_number(n)?, Uidl::parse(uid)?))
}

/// One line of a `LIST` listing: `msg size`; RFC 1939 allows more after the
/// size, which is ignored.
pub fn parse_list_line(line: &[u8]) -> Result<(MsgNum, u64), ListingError> {
    let mut words = line.split(|&b| b == b' ');
    let n = parse_msg_number(words.next().unwrap_or_default())?;
    let size = words.next().ok_or(ListingError::NoSize)?;
    Ok((n, parse_size(size)?))
}

/// The text of a `+OK` answer to `STAT`: `count size`, more ignored.
pub fn parse_stat(text: &[u8]) -> Result<(u32, u64), ListingError> {
    let mut words = text.split(|&b| b == b' ');
    let count = words.next().unwrap_or_default();
    if count.is_empty() || count.len() > 10 || !count.iter().all(u8::is_ascii_digit) {
        return Err(ListingError::BadMessageNumber);
    }
    let count = count.iter().fold(0u64, |v, &d| v * 10 + u64::from(d - b'0'));
    let count = u32::try_from(count).map_err(|_| ListingError::MessageNumberOutOfRange)?;
    let size = words.next().ok_or(ListingError::NoSize)?;
    Ok((count, parse_size(size)?))
}

/// A repeated message number or unique id in a UIDL listing. Found by
/// sorting (numbers, then borrowed ids) rather than hash sets that would
/// hold a second copy of every id while the listing is read.
pub fn uidl_duplicate<S: AsRef<str>>(entries: &[(u32, S)]) -> Option<ListingError> {
    let mut numbers: Vec<u32> = entries.iter().map(|(n, _)| *n).collect();
    numbers.sort_unstable();
    if numbers.windows(2).any(|w| w[0] == w[1]) {
        return Some(ListingError::DuplicateMessageNumber);
    }
    drop(numbers);
    let mut ids: Vec<&str> = entries.iter().map(|(_, u)| u.as_ref()).collect();
    ids.sort_unstable();
    ids.windows(2).any(|w| w[0] == w[1]).then_some(ListingError::DuplicateUidl)
}

/// The SASL mechanisms a CAPA response offers (upper case), from its
/// `SASL` lines (RFC 2449 section 6.3, RFC 5034).
pub fn sasl_mechanisms<S: AsRef<str>>(capabilities: &[S]) -> Vec<String> {
    capabilities
        .iter()
        .filter_map(|c| {
            let mut words = c.as_ref().split_ascii_whitespace();
            words.next().filter(|w| w.eq_ignore_ascii_case("SASL")).map(|_| words)
        })
        .flatten()
        .map(|w| w.to_ascii_uppercase())
        .collect()
}

/// A command the client sends. Arguments that carry secrets (`PASS`, SASL
/// responses) are redacted by `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub enum ClientCommand<'a> {
    User(&'a str),
    Pass(&'a str),
    /// `AUTH <mechanism> [<initial response, base64>]`.
    Auth {
        mechanism: &'a str,
        initial_response: Option<&'a str>,
    },
    /// One SASL response line (base64, or empty).
    AuthResponse(&'a str),
    /// `*`: cancels a SASL exchange.
    AuthCancel,
    Stls,
    Capa,
    Stat,
    List,
    Uidl,
    Retr(u32),
    Top(u32, u32),
    Dele(u32),
    Noop,
    Rset,
    Quit,
}

/// An argument contains CR, LF or NUL, which would end the command line
/// early (and let the rest be read as another command).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsafeArgument;

impl ClientCommand<'_> {
    /// Octets [`Self::encode_into`] appends, so a caller holding secrets can
    /// size (and later wipe) the buffer without reallocation.
    pub fn encoded_len(&self) -> usize {
        let args: usize = self.args().iter().map(|a| a.len() + 1).sum();
        self.keyword().len() + args + 2
    }

    /// The keyword (empty for SASL response lines).
    pub fn keyword(&self) -> &'static str {
        match self {
            ClientCommand::User(_) => "USER",
            ClientCommand::Pass(_) => "PASS",
            ClientCommand::Auth { .. } => "AUTH",
            ClientCommand::AuthResponse(_) => "",
            ClientCommand::AuthCancel => "*",
            ClientCommand::Stls => "STLS",
            ClientCommand::Capa => "CAPA",
            ClientCommand::Stat => "STAT",
            ClientCommand::List => "LIST",
            ClientCommand::Uidl => "UIDL",
            ClientCommand::Retr(_) => "RETR",
            ClientCommand::Top(..) => "TOP",
            ClientCommand::Dele(_) => "DELE",
            ClientCommand::Noop => "NOOP",
            ClientCommand::Rset => "RSET",
            ClientCommand::Quit => "QUIT",
        }
    }

    fn args(&self) -> Vec<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        match self {
            ClientCommand::User(a) | ClientCommand::Pass(a) => vec![Cow::Borrowed(*a)],
            ClientCommand::Auth { mechanism, initial_response } => {
                let mut v = vec![Cow::Borrowed(*mechanism)];
                v.extend(initial_response.map(Cow::Borrowed));
                v
            }
            ClientCommand::Retr(n) | ClientCommand::Dele(n) => vec![Cow::Owned(n.to_string())],
            ClientCommand::Top(n, l) => vec![Cow::Owned(n.to_string()), Cow::Owned(l.to_string())],
            _ => Vec::new(),
        }
    }

    /// Appends the wire form, CRLF-terminated.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), UnsafeArgument> {
        if let ClientCommand::AuthResponse(r) = self {
            if !safe(r) {
                return Err(UnsafeArgument);
            }
            out.extend_from_slice(r.as_bytes());
            out.extend_from_slice(b"\r\n");
            return Ok(());
        }
        let args = self.args();
        if !args.iter().all(|a| safe(a)) {
            return Err(UnsafeArgument);
        }
        out.extend_from_slice(self.keyword().as_bytes());
        for a in &args {
            out.push(b' ');
            out.extend_from_slice(a.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        Ok(())
    }
}

fn safe(arg: &str) -> bool {
    !arg.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// The command as it may appear in errors and logs: secrets replaced.
impl fmt::Display for ClientCommand<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientCommand::Pass(_) => f.write_str("PASS <redacted>"),
            ClientCommand::Auth { mechanism, initial_response: Some(_) } => write!(f, "AUTH {mechanism} <redacted>"),
            ClientCommand::AuthResponse(_) => f.write_str("<redacted SASL response>"),
            other => {
                f.write_str(other.keyword())?;
                for a in other.args() {
                    write!(f, " {a}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for ClientCommand<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientCommand({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reader of one transcript saw, reply by reply.
    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Status(Status),
        Body(Vec<Vec<u8>>),
        TooLong,
    }

    /// The shape of the next reply in a transcript.
    #[derive(Clone, Copy)]
    enum Expect {
        Status,
        MultiLine,
    }

    /// Feeds `input` in chunks of `chunk` octets and reads the replies the
    /// `script` says come next, as the connector does. Stops at the first
    /// error or when the input runs out.
    fn read_transcript(input: &[u8], chunk: usize, max: usize, script: &[Expect]) -> Vec<Seen> {
        let mut buf = ReplyBuffer::new();
        let mut chunks = input.chunks(chunk);
        let mut out = Vec::new();
        let mut next_line = |buf: &mut ReplyBuffer| loop {
            match buf.next_line(max) {
                Ok(Some(l)) => return Ok(Some(l)),
                Err(e) => return Err(e),
                Ok(None) => match chunks.next() {
                    Some(c) => buf.extend(c),
                    None => return Ok(None),
                },
            }
        };
        for step in script {
            let Ok(Some(line)) = next_line(&mut buf) else {
                out.push(Seen::TooLong);
                return out;
            };
            let status = parse_status(&line, false).unwrap();
            let ok = matches!(status, Status::Ok(_));
            out.push(Seen::Status(status));
            if let (Expect::MultiLine, true) = (step, ok) {
                let mut lines = Vec::new();
                loop {
                    match next_line(&mut buf) {
                        Ok(Some(l)) => match body_line(l) {
                            Some(l) => lines.push(l),
                            None => break,
                        },
                        _ => {
                            out.push(Seen::TooLong);
                            return out;
                        }
                    }
                }
                out.push(Seen::Body(lines));
            }
        }
        out
    }

    #[test]
    fn every_reply_in_every_chunk_size() {
        let input: &[u8] = b"+OK POP3 ready\r\n\
            +OK\r\nUSER\r\nSASL PLAIN SCRAM-SHA-256\r\n.\r\n\
            -ERR [AUTH] no\r\n\
            +OK 2 300\r\n\
            +OK\r\n1 abc\r\n2 d-e\r\n.\r\n\
            +OK 1 octets\r\nSubject: x\r\n\r\n..dot\r\nbare lf\n.\r\n\
            +OK\r\n";
        use Expect::*;
        let script = [Status, MultiLine, Status, Status, MultiLine, MultiLine, Status];
        let expected = vec![
            Seen::Status(super::Status::Ok(b"POP3 ready".to_vec())),
            Seen::Status(super::Status::Ok(Vec::new())),
            Seen::Body(vec![b"USER".to_vec(), b"SASL PLAIN SCRAM-SHA-256".to_vec()]),
            Seen::Status(super::Status::Err(b"[AUTH] no".to_vec())),
            Seen::Status(super::Status::Ok(b"2 300".to_vec())),
            Seen::Status(super::Status::Ok(Vec::new())),
            Seen::Body(vec![b"1 abc".to_vec(), b"2 d-e".to_vec()]),
            Seen::Status(super::Status::Ok(b"1 octets".to_vec())),
            Seen::Body(vec![b"Subject: x".to_vec(), Vec::new(), b".dot".to_vec(), b"bare lf".to_vec()]),
            Seen::Status(super::Status::Ok(Vec::new())),
        ];
        for chunk in 1..=input.len() {
            assert_eq!(read_transcript(input, chunk, 1024, &script), expected, "chunk size {chunk}");
        }
    }

    #[test]
    fn over_long_and_endless_lines_in_every_chunk_size() {
        // A status line one octet over the limit (CRLF included).
        let mut input = b"+OK ".to_vec();
        input.extend(vec![b'a'; 60]);
        input.extend_from_slice(b"\r\n");
        assert_eq!(input.len(), 66);
        for chunk in 1..=input.len() {
            assert_eq!(read_transcript(&input, chunk, 65, &[Expect::Status]), vec![Seen::TooLong], "chunk {chunk}");
            assert_eq!(read_transcript(&input, chunk, 66, &[Expect::Status]).len(), 1, "fits at 66, chunk {chunk}");
        }
        // Endless: the error comes once `max` octets are buffered, not later.
        let mut buf = ReplyBuffer::new();
        buf.extend(&[b'x'; 63]);
        assert_eq!(buf.next_line(64), Ok(None));
        buf.extend(b"x");
        assert_eq!(buf.next_line(64), Err(LineTooLong));
        // An over-long line inside a body.
        let mut body = b"+OK\r\n".to_vec();
        body.extend(vec![b'z'; 200]);
        body.extend_from_slice(b"\r\n.\r\n");
        for chunk in 1..=body.len() {
            let seen = read_transcript(&body, chunk, 100, &[Expect::MultiLine]);
            assert_eq!(seen, vec![Seen::Status(Status::Ok(Vec::new())), Seen::TooLong], "chunk {chunk}");
        }
    }

    #[test]
    fn missing_crlf_and_unterminated_bodies_stay_incomplete() {
        for input in [&b"+OK no line end"[..], b"+OK\r\nbody\r\n", b"+OK\r\nbody\r\n.", b"+OK\r\n.\r"] {
            let mut buf = ReplyBuffer::new();
            buf.extend(input);
            let mut lines = Vec::new();
            while let Ok(Some(l)) = buf.next_line(1024) {
                lines.push(l);
            }
            assert!(!lines.iter().skip(1).any(|l| l == b"."), "{input:?} must not look terminated");
            assert_eq!(buf.next_line(1024), Ok(None));
        }
    }

    #[test]
    fn pending_counts_unsolicited_bytes() {
        let mut buf = ReplyBuffer::new();
        buf.extend(b"+OK\r\n+OK injected\r\n");
        assert_eq!(buf.next_line(1024), Ok(Some(b"+OK".to_vec())));
        assert_eq!(buf.pending(), b"+OK injected\r\n".len());
        assert_eq!(buf.next_line(1024), Ok(Some(b"+OK injected".to_vec())));
        assert_eq!(buf.pending(), 0);
    }

    #[test]
    fn status_lines_and_codes() {
        assert_eq!(parse_status(b"+OK", false), Ok(Status::Ok(Vec::new())));
        assert_eq!(parse_status(b"-ERR x", false), Ok(Status::Err(b"x".to_vec())));
        assert_eq!(parse_status(b"+ abc", false), Err(NotAStatus));
        assert_eq!(parse_status(b"+ abc", true), Ok(Status::Challenge(b"abc".to_vec())));
        assert_eq!(parse_status(b"+", true), Ok(Status::Challenge(Vec::new())));
        for bad in [&b"-ERROR"[..], b"+OKAY", b"HELLO there", b"", b"\0+OK", b"ok"] {
            assert_eq!(parse_status(bad, true), Err(NotAStatus), "{bad:?}");
        }
        // NUL and controls in the text are the caller's to sanitise.
        assert_eq!(parse_status(b"+OK a\0b", false), Ok(Status::Ok(b"a\0b".to_vec())));
        assert_eq!(resp_code(b"[SYS/TEMP] busy"), Some(&b"SYS/TEMP"[..]));
        assert_eq!(resp_code(b"[IN-USE]"), Some(&b"IN-USE"[..]));
        assert_eq!(resp_code(b"[] x"), None);
        assert_eq!(resp_code(b"[SYS/TEMP busy"), None);
        assert_eq!(resp_code(b"no code"), None);
        assert_eq!(NotAStatus.to_string(), "response starts with neither +OK nor -ERR");
    }

    #[test]
    fn dot_unstuffing() {
        assert_eq!(body_line(b".".to_vec()), None);
        assert_eq!(body_line(b"..".to_vec()), Some(b".".to_vec()));
        assert_eq!(body_line(b"..x".to_vec()), Some(b".x".to_vec()));
        assert_eq!(body_line(b".x".to_vec()), Some(b"x".to_vec()));
        assert_eq!(body_line(b"x.".to_vec()), Some(b"x.".to_vec()));
        assert_eq!(body_line(Vec::new()), Some(Vec::new()));
    }

    #[test]
    fn listing_lines() {
        let n = |v| MsgNum::new(v).unwrap();
        assert_eq!(parse_uidl_line(b"1 abc"), Ok((n(1), Uidl::parse(b"abc").unwrap())));
        assert_eq!(parse_uidl_line(b"01 abc \t"), Ok((n(1), Uidl::parse(b"abc").unwrap())));
        assert_eq!(parse_uidl_line(b"4294967295 x").unwrap().0, n(u32::MAX));
        assert_eq!(parse_list_line(b"2 200 extra"), Ok((n(2), 200)));
        assert_eq!(parse_list_line(b"3 9999999999999999999"), Ok((n(3), 9_999_999_999_999_999_999)));
        for (line, err) in [
            (&b"0 abc"[..], ListingError::MessageNumberOutOfRange),
            (b"4294967296 abc", ListingError::MessageNumberOutOfRange),
            (b"99999999999 abc", ListingError::BadMessageNumber),
            (b"-1 abc", ListingError::BadMessageNumber),
            (b"x abc", ListingError::BadMessageNumber),
            (b"1", ListingError::MissingField),
            (b"1 has space", ListingError::TooManyFields),
            (b"1 \x01ctl", ListingError::BadUidl),
            (b"1 a\0b", ListingError::BadUidl),
            (b"1 \xc3\xa9", ListingError::BadUidl),
        ] {
            assert_eq!(parse_uidl_line(line), Err(err), "{line:?}");
        }
        assert_eq!(parse_uidl_line(format!("1 {}", "u".repeat(70)).as_bytes()).unwrap().1.as_str().len(), 70);
        assert_eq!(parse_uidl_line(format!("1 {}", "u".repeat(71)).as_bytes()), Err(ListingError::BadUidl));
        for (line, err) in [
            (&b"1"[..], ListingError::NoSize),
            (b"1 ", ListingError::BadSize),
            (b"1 -5", ListingError::BadSize),
            (b"1 18446744073709551616", ListingError::BadSize),
            (b"1 99999999999999999999", ListingError::BadSize),
            (b"0 5", ListingError::MessageNumberOutOfRange),
        ] {
            assert_eq!(parse_list_line(line), Err(err), "{line:?}");
        }
        assert_eq!(parse_stat(b"2 300"), Ok((2, 300)));
        assert_eq!(parse_stat(b"0 0 more"), Ok((0, 0)));
        assert_eq!(parse_stat(b"4294967296 1"), Err(ListingError::MessageNumberOutOfRange));
        assert_eq!(parse_stat(b"x 1"), Err(ListingError::BadMessageNumber));
        assert_eq!(parse_stat(b"1"), Err(ListingError::NoSize));
    }

    #[test]
    fn duplicate_numbers_and_ids() {
        assert_eq!(uidl_duplicate(&[(1, "a"), (2, "b")]), None);
        assert_eq!(uidl_duplicate(&[(1, "a"), (1, "b")]), Some(ListingError::DuplicateMessageNumber));
        assert_eq!(uidl_duplicate(&[(1, "a"), (2, "a")]), Some(ListingError::DuplicateUidl));
        assert_eq!(uidl_duplicate::<&str>(&[]), None);
    }

    #[test]
    fn capa_sasl_mechanisms() {
        let caps = ["USER", "sasl plain Scram-Sha-256", "SASLX nope", "SASL XOAUTH2"];
        assert_eq!(sasl_mechanisms(&caps), ["PLAIN", "SCRAM-SHA-256", "XOAUTH2"]);
        assert!(sasl_mechanisms::<&str>(&[]).is_empty());
    }

    #[test]
    fn command_encoding_refuses_smuggling_and_redacts() {
        let enc = |c: ClientCommand<'_>| {
            let mut v = Vec::new();
            c.encode_into(&mut v).map(|()| {
                assert_eq!(v.len(), c.encoded_len(), "{c}");
                v
            })
        };
        assert_eq!(enc(ClientCommand::User("alice")).unwrap(), b"USER alice\r\n");
        assert_eq!(enc(ClientCommand::Pass("pw")).unwrap(), b"PASS pw\r\n");
        assert_eq!(
            enc(ClientCommand::Auth { mechanism: "PLAIN", initial_response: Some("AGEAYg==") }).unwrap(),
            b"AUTH PLAIN AGEAYg==\r\n"
        );
        assert_eq!(
            enc(ClientCommand::Auth { mechanism: "XOAUTH2", initial_response: None }).unwrap(),
            b"AUTH XOAUTH2\r\n"
        );
        assert_eq!(enc(ClientCommand::AuthResponse("")).unwrap(), b"\r\n");
        assert_eq!(enc(ClientCommand::AuthCancel).unwrap(), b"*\r\n");
        assert_eq!(enc(ClientCommand::Retr(7)).unwrap(), b"RETR 7\r\n");
        assert_eq!(enc(ClientCommand::Top(7, 0)).unwrap(), b"TOP 7 0\r\n");
        assert_eq!(enc(ClientCommand::Dele(1)).unwrap(), b"DELE 1\r\n");
        for (c, w) in [
            (ClientCommand::Stls, "STLS"),
            (ClientCommand::Capa, "CAPA"),
            (ClientCommand::Stat, "STAT"),
            (ClientCommand::List, "LIST"),
            (ClientCommand::Uidl, "UIDL"),
            (ClientCommand::Noop, "NOOP"),
            (ClientCommand::Rset, "RSET"),
            (ClientCommand::Quit, "QUIT"),
        ] {
            assert_eq!(enc(c).unwrap(), format!("{w}\r\n").as_bytes());
        }
        for bad in ["a\r\nDELE 1", "a\nb", "a\0b", "a\rb"] {
            assert_eq!(enc(ClientCommand::User(bad)), Err(UnsafeArgument));
            assert_eq!(enc(ClientCommand::Pass(bad)), Err(UnsafeArgument));
            assert_eq!(enc(ClientCommand::AuthResponse(bad)), Err(UnsafeArgument));
        }
        assert_eq!(ClientCommand::Pass("secret").to_string(), "PASS <redacted>");
        assert_eq!(format!("{:?}", ClientCommand::Pass("secret")), "ClientCommand(PASS <redacted>)");
        let auth = ClientCommand::Auth { mechanism: "PLAIN", initial_response: Some("c2VjcmV0") };
        assert!(!auth.to_string().contains("c2VjcmV0"));
        assert!(!ClientCommand::AuthResponse("c2VjcmV0").to_string().contains("c2VjcmV0"));
        assert_eq!(ClientCommand::Retr(9).to_string(), "RETR 9");
    }
}
