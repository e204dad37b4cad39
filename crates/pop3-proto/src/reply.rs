//! Status lines and extended response codes (RFC 2449 section 8, RFC 3206).

use std::fmt;

/// Extended response codes we send in `-ERR [CODE]` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespCode {
    /// RFC 2449: the maildrop is locked by another session.
    InUse,
    /// RFC 2449: the user logged in too recently.
    LoginDelay,
    /// RFC 3206: a temporary system problem; try later.
    SysTemp,
    /// RFC 3206: a permanent system problem.
    SysPerm,
    /// RFC 3206: the failure is about credentials or authorisation.
    Auth,
}

impl RespCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RespCode::InUse => "IN-USE",
            RespCode::LoginDelay => "LOGIN-DELAY",
            RespCode::SysTemp => "SYS/TEMP",
            RespCode::SysPerm => "SYS/PERM",
            RespCode::Auth => "AUTH",
        }
    }
}

/// A single-line POP3 status response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusLine {
    Ok(String),
    Err(Option<RespCode>, String),
}

impl StatusLine {
    pub fn ok(text: impl Into<String>) -> Self {
        StatusLine::Ok(text.into())
    }

    pub fn err(text: impl Into<String>) -> Self {
        StatusLine::Err(None, text.into())
    }

    pub fn err_code(code: RespCode, text: impl Into<String>) -> Self {
        StatusLine::Err(Some(code), text.into())
    }

    /// Wire form, CRLF-terminated. Text is sanitised so a reply can never
    /// carry a line break (and thereby a forged second response).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (prefix, code, text) = match self {
            StatusLine::Ok(t) => ("+OK", None, t),
            StatusLine::Err(c, t) => ("-ERR", *c, t),
        };
        out.extend_from_slice(prefix.as_bytes());
        if let Some(c) = code {
            out.extend_from_slice(b" [");
            out.extend_from_slice(c.as_str().as_bytes());
            out.push(b']');
        }
        if !text.is_empty() {
            out.push(b' ');
            out.extend(text.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
        }
        out.extend_from_slice(b"\r\n");
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, StatusLine::Ok(_))
    }
}

impl fmt::Display for StatusLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        f.write_str(String::from_utf8_lossy(&v).trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_codes_and_strips_line_breaks() {
        let mut v = Vec::new();
        StatusLine::err_code(RespCode::InUse, "locked\r\n+OK forged").encode_into(&mut v);
        assert_eq!(v, b"-ERR [IN-USE] locked  +OK forged\r\n");
        v.clear();
        StatusLine::ok("").encode_into(&mut v);
        assert_eq!(v, b"+OK\r\n");
        assert_eq!(StatusLine::err_code(RespCode::SysTemp, "x").to_string(), "-ERR [SYS/TEMP] x");
    }
}
