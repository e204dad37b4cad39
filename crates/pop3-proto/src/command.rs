//! POP3 command lines into typed commands.
//!
//! Keywords are case-insensitive (RFC 1939 section 3). Arguments are
//! separated by single spaces; message numbers are parsed strictly: decimal
//! digits only, no sign, no leading zero, at most `u32::MAX`. Anything else is
//! a [`CommandError`], which the session answers with `-ERR` and counts
//! towards its bad-command limit.

use std::fmt;
use std::num::NonZeroU32;

/// A 1-based message number as used on the wire. Valid only within the
/// session that issued the scan listing (numbers never change in a session).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsgNum(NonZeroU32);

impl MsgNum {
    /// Parses a message number strictly (see module docs).
    pub fn parse(s: &[u8]) -> Result<Self, CommandError> {
        if s.is_empty() || s.len() > 10 || s[0] == b'0' || !s.iter().all(u8::is_ascii_digit) {
            return Err(CommandError::BadMessageNumber);
        }
        let mut n: u64 = 0;
        for &d in s {
            n = n * 10 + u64::from(d - b'0');
        }
        u32::try_from(n).ok().and_then(NonZeroU32::new).map(MsgNum).ok_or(CommandError::BadMessageNumber)
    }

    /// Builds a number from a 1-based index.
    pub fn new(n: u32) -> Option<Self> {
        NonZeroU32::new(n).map(MsgNum)
    }

    /// The 1-based number.
    pub fn get(self) -> u32 {
        self.0.get()
    }

    /// The 0-based index into a scan listing.
    pub fn index(self) -> usize {
        (self.0.get() - 1) as usize
    }
}

impl fmt::Display for MsgNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A parsed POP3 command.
///
/// Credentials (`PASS`, SASL responses) are carried as raw bytes and must
/// never be logged; `Debug` for this type redacts them.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    User(String),
    Pass(Vec<u8>),
    Auth {
        /// `None` for a bare `AUTH`, which lists mechanisms (RFC 1734 usage
        /// some clients still rely on).
        mechanism: Option<String>,
        /// The RFC 5034 initial response, still base64-encoded; `=` means
        /// an empty initial response.
        initial_response: Option<Vec<u8>>,
    },
    Apop,
    Stls,
    Capa,
    Stat,
    List(Option<MsgNum>),
    Uidl(Option<MsgNum>),
    Retr(MsgNum),
    Top(MsgNum, u32),
    Dele(MsgNum),
    Noop,
    Rset,
    Quit,
}

impl Command {
    /// The keyword, for logs and the state table.
    pub fn keyword(&self) -> &'static str {
        match self {
            Command::User(_) => "USER",
            Command::Pass(_) => "PASS",
            Command::Auth { .. } => "AUTH",
            Command::Apop => "APOP",
            Command::Stls => "STLS",
            Command::Capa => "CAPA",
            Command::Stat => "STAT",
            Command::List(_) => "LIST",
            Command::Uidl(_) => "UIDL",
            Command::Retr(_) => "RETR",
            Command::Top(..) => "TOP",
            Command::Dele(_) => "DELE",
            Command::Noop => "NOOP",
            Command::Rset => "RSET",
            Command::Quit => "QUIT",
        }
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Pass(_) => f.write_str("Pass(<redacted>)"),
            Command::Auth { mechanism, initial_response } => f
                .debug_struct("Auth")
                .field("mechanism", mechanism)
                .field("initial_response", &initial_response.as_ref().map(|_| "<redacted>"))
                .finish(),
            Command::User(u) => f.debug_tuple("User").field(u).finish(),
            Command::List(n) => f.debug_tuple("List").field(n).finish(),
            Command::Uidl(n) => f.debug_tuple("Uidl").field(n).finish(),
            Command::Retr(n) => f.debug_tuple("Retr").field(n).finish(),
            Command::Top(n, l) => f.debug_tuple("Top").field(n).field(l).finish(),
            Command::Dele(n) => f.debug_tuple("Dele").field(n).finish(),
            other => f.write_str(other.keyword()),
        }
    }
}

/// Why a command line was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandError {
    Empty,
    UnknownCommand,
    /// Wrong number of arguments or malformed argument.
    Syntax(&'static str),
    BadMessageNumber,
    /// Control characters (CR, NUL, ...) or non-ASCII where not allowed.
    InvalidCharacters,
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::Empty => f.write_str("Empty command"),
            CommandError::UnknownCommand => f.write_str("Unknown command"),
            CommandError::Syntax(usage) => write!(f, "Syntax: {usage}"),
            CommandError::BadMessageNumber => f.write_str("Invalid message number"),
            CommandError::InvalidCharacters => f.write_str("Invalid characters in command"),
        }
    }
}

/// Longest user name accepted on the wire; longer ones cannot exist in the
/// store either, so refusing early costs nothing and bounds log lines.
pub const MAX_USER_NAME: usize = 255;

/// Parses one command line (terminator already stripped).
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    if line.is_empty() {
        return Err(CommandError::Empty);
    }
    let (keyword, rest) = match line.iter().position(|&b| b == b' ') {
        Some(p) => (&line[..p], Some(&line[p + 1..])),
        None => (line, None),
    };
    if keyword.len() > 4 || !keyword.iter().all(u8::is_ascii_alphabetic) {
        return Err(CommandError::UnknownCommand);
    }
    let mut kw = [0u8; 4];
    for (d, s) in kw.iter_mut().zip(keyword) {
        *d = s.to_ascii_uppercase();
    }
    let kw = &kw[..keyword.len()];

    // PASS takes the rest of the line verbatim (RFC 1939: spaces may be part
    // of the password). Everything else is printable ASCII only.
    if kw == b"PASS" {
        let pw = rest.ok_or(CommandError::Syntax("PASS password"))?;
        if pw.is_empty() || pw.iter().any(|&b| b == b'\r' || b == 0) {
            return Err(CommandError::Syntax("PASS password"));
        }
        return Ok(Command::Pass(pw.to_vec()));
    }
    if let Some(r) = rest {
        if r.iter().any(|&b| !(0x20..0x7f).contains(&b)) {
            return Err(CommandError::InvalidCharacters);
        }
    }
    let args: Vec<&[u8]> = match rest {
        None => Vec::new(),
        Some(r) => r.split(|&b| b == b' ').collect(),
    };
    if args.iter().any(|a| a.is_empty()) {
        return Err(CommandError::Syntax("arguments are separated by one space"));
    }
    let text = |a: &[u8]| String::from_utf8_lossy(a).into_owned();
    let opt_num = |usage| match args.as_slice() {
        [] => Ok(None),
        [n] => MsgNum::parse(n).map(Some),
        _ => Err(CommandError::Syntax(usage)),
    };
    let one_num = |usage| match args.as_slice() {
        [n] => MsgNum::parse(n),
        _ => Err(CommandError::Syntax(usage)),
    };
    let none = |cmd: Command, usage| {
        if args.is_empty() {
            Ok(cmd)
        } else {
            Err(CommandError::Syntax(usage))
        }
    };
    match kw {
        b"USER" => match args.as_slice() {
            [u] if u.len() <= MAX_USER_NAME => Ok(Command::User(text(u))),
            _ => Err(CommandError::Syntax("USER name")),
        },
        b"AUTH" => match args.as_slice() {
            [] => Ok(Command::Auth { mechanism: None, initial_response: None }),
            [m] if m.len() <= 20 => {
                Ok(Command::Auth { mechanism: Some(text(m).to_ascii_uppercase()), initial_response: None })
            }
            [m, ir] if m.len() <= 20 => {
                Ok(Command::Auth { mechanism: Some(text(m).to_ascii_uppercase()), initial_response: Some(ir.to_vec()) })
            }
            _ => Err(CommandError::Syntax("AUTH mechanism [initial-response]")),
        },
        b"APOP" => Ok(Command::Apop),
        b"STLS" => none(Command::Stls, "STLS"),
        b"CAPA" => none(Command::Capa, "CAPA"),
        b"STAT" => none(Command::Stat, "STAT"),
        b"NOOP" => none(Command::Noop, "NOOP"),
        b"RSET" => none(Command::Rset, "RSET"),
        b"QUIT" => none(Command::Quit, "QUIT"),
        b"LIST" => opt_num("LIST [msg]").map(Command::List),
        b"UIDL" => opt_num("UIDL [msg]").map(Command::Uidl),
        b"RETR" => one_num("RETR msg").map(Command::Retr),
        b"DELE" => one_num("DELE msg").map(Command::Dele),
        b"TOP" => match args.as_slice() {
            [n, lines] => {
                let n = MsgNum::parse(n)?;
                let lines = parse_count(lines).ok_or(CommandError::Syntax("TOP msg lines"))?;
                Ok(Command::Top(n, lines))
            }
            _ => Err(CommandError::Syntax("TOP msg lines")),
        },
        _ => Err(CommandError::UnknownCommand),
    }
}

/// Non-negative decimal (TOP's line count may be 0).
fn parse_count(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 10 || !s.iter().all(u8::is_ascii_digit) || (s.len() > 1 && s[0] == b'0') {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(x: u32) -> MsgNum {
        MsgNum::new(x).unwrap()
    }

    #[test]
    fn parses_every_command() {
        let table: &[(&[u8], Command)] = &[
            (b"USER alice", Command::User("alice".into())),
            (b"user alice", Command::User("alice".into())),
            (b"PASS with spaces  inside", Command::Pass(b"with spaces  inside".to_vec())),
            (b"STAT", Command::Stat),
            (b"LIST", Command::List(None)),
            (b"LIST 3", Command::List(Some(n(3)))),
            (b"UIDL", Command::Uidl(None)),
            (b"uidl 12", Command::Uidl(Some(n(12)))),
            (b"RETR 1", Command::Retr(n(1))),
            (b"TOP 1 0", Command::Top(n(1), 0)),
            (b"TOP 2 10", Command::Top(n(2), 10)),
            (b"DELE 4294967295", Command::Dele(n(u32::MAX))),
            (b"NOOP", Command::Noop),
            (b"RSET", Command::Rset),
            (b"QUIT", Command::Quit),
            (b"CAPA", Command::Capa),
            (b"STLS", Command::Stls),
            (b"APOP x y", Command::Apop),
            (b"AUTH", Command::Auth { mechanism: None, initial_response: None }),
            (b"AUTH plain", Command::Auth { mechanism: Some("PLAIN".into()), initial_response: None }),
            (
                b"AUTH PLAIN AGFsaWNlAHB3",
                Command::Auth { mechanism: Some("PLAIN".into()), initial_response: Some(b"AGFsaWNlAHB3".to_vec()) },
            ),
        ];
        for (line, cmd) in table {
            assert_eq!(&parse_command(line).unwrap(), cmd, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn strict_message_numbers() {
        for bad in [
            &b"RETR 0"[..],
            b"RETR -1",
            b"RETR +1",
            b"RETR 01",
            b"RETR 1a",
            b"RETR 4294967296",
            b"RETR 99999999999",
            b"RETR ",
            b"RETR",
            b"RETR 1 2",
            b"DELE 0x1",
            b"LIST  1",
            b"TOP 1 -1",
            b"TOP 1",
            b"TOP 1 01",
        ] {
            assert!(parse_command(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn rejects_garbage() {
        for bad in
            [&b""[..], b"\x00\x01\x02", b"HELLO", b"ST\xffT", b"USER a\rb", b"STAT extra", b"XYZZY 1", b"USER \xc3\xa9"]
        {
            assert!(parse_command(bad).is_err(), "{:?}", bad);
        }
    }

    #[test]
    fn debug_redacts_credentials() {
        let s = format!("{:?}", parse_command(b"PASS hunter2").unwrap());
        assert!(!s.contains("hunter2"));
        let s = format!("{:?}", parse_command(b"AUTH PLAIN AGFsaWNlAGh1bnRlcjI=").unwrap());
        assert!(!s.contains("AGFsaWNlAGh1bnRlcjI="));
    }
}
