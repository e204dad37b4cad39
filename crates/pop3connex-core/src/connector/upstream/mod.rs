//! POP3 client for upstream mailboxes (RFC 1939, CAPA RFC 2449, STLS
//! RFC 2595, AUTH RFC 5034, implicit TLS RFC 8314).
//!
//! TLS is never optional: implicit TLS, or STLS that must succeed before
//! anything else is sent. APOP is never used. The server is treated as
//! hostile:
//!
//! * every line is bounded: [`MAX_STATUS_LINE`] for status and listing
//!   lines, [`MAX_MESSAGE_LINE`] for message lines (RFC 5322's 998 octets
//!   are exceeded by real mail, so 64 KiB is allowed);
//! * a status line that starts with neither `+OK` nor `-ERR` (or `+ ` during
//!   AUTH) is a protocol violation;
//! * every read waits at most `timeout_secs`, and every response has an
//!   overall deadline of `timeout_secs` plus one second per
//!   [`MIN_RATE`] octets received, so a server dripping bytes cannot hold a
//!   session open;
//! * listings hold at most [`MAX_LISTING`] entries and
//!   [`MAX_LISTING_BYTES`] (lines plus a per-entry cost), with strictly
//!   positive, unique message numbers and unique, RFC 1939-valid UIDLs;
//! * `RETR` stops at the caller's size limit.
//!
//! After a protocol violation, a timeout, an I/O error or an over-size
//! message the session is poisoned: the connection is in an unknown state,
//! so every later call fails at once and `quit` does not commit deletions.
//!
//! Message lines are returned with CRLF ends; a bare LF from the server is
//! normalised to CRLF, dot-stuffing is removed.
//!
//! Secrets (passwords, tokens, SASL payloads) never appear in errors or
//! logs; server `-ERR` texts are included, cut to [`MAX_ERROR_TEXT`]
//! characters of printable ASCII.
//!
//! # Layout
//! - [`framing`]: glue to the sans-IO client codec in `pop3-proto` (reply
//!   lines, status lines, listings, command encoding) that keeps today's
//!   error texts.
//! - [`io`]: the session over any `AsyncRead + AsyncWrite` stream: bounded,
//!   timed reads, the listing budget, RETR/DELE/QUIT, poisoning.
//! - [`login`]: connecting (TCP, implicit TLS, STLS) and logging in
//!   (USER/PASS, AUTH PLAIN, SCRAM-SHA-256, XOAUTH2, OAUTHBEARER).

use std::fmt;

use zeroize::Zeroizing;

mod framing;
mod io;
mod login;
#[cfg(test)]
pub(crate) mod tests;

pub use io::Session;

/// Longest status, CAPA, AUTH challenge or listing line, CRLF included.
pub const MAX_STATUS_LINE: usize = 1024;
/// Longest message line (RETR), CRLF included.
pub const MAX_MESSAGE_LINE: usize = 64 * 1024;
/// Most entries a UIDL or LIST response may have.
pub const MAX_LISTING: usize = 1_000_000;
/// What a whole UIDL or LIST response may cost: every entry counts its line
/// (CRLF included) plus [`LISTING_ENTRY_COST`]. The entry limit alone let a
/// hostile server make the connector hold a million entries and their
/// duplicate checks (about 170 MiB measured); 16 MiB still fits about 160 000
/// messages with 30-octet unique ids, far more than a POP3 maildrop
/// serves, and keeps one listing's memory to a few tens of MiB.
pub const MAX_LISTING_BYTES: usize = 16 * 1024 * 1024;
/// Octets one listing entry costs in memory beyond its text: the parsed
/// tuple in a growing vector, a unique id's allocation and header, and the
/// duplicate check.
pub const LISTING_ENTRY_COST: usize = 64;
/// Most CAPA lines.
pub const MAX_CAPA_LINES: usize = 100;
/// Minimum average rate (octets per second) a response must arrive at once
/// the `timeout_secs` grace period is used up.
pub const MIN_RATE: u64 = 16 * 1024;
/// Longest server text quoted in an error.
pub const MAX_ERROR_TEXT: usize = crate::logtext::MAX_LOG_TEXT;

/// What the account logs in with.
pub enum Credential {
    Password(Zeroizing<String>),
    /// An OAuth 2.0 access token for XOAUTH2/OAUTHBEARER.
    AccessToken(Zeroizing<String>),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Password(_) => f.write_str("Password(<redacted>)"),
            Credential::AccessToken(_) => f.write_str("AccessToken(<redacted>)"),
        }
    }
}
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("login refused: {0}")]
    Auth(String),
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("message {msg} exceeds {limit} octets")]
    TooLarge { msg: u32, limit: u64 },
    #[error("server error: {0}")]
    Server(String),
    #[error("connection lost: {0}")]
    Io(String),
}

impl UpstreamError {
    /// Short stable name for events and status.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Tls(_) => "tls",
            UpstreamError::Auth(_) => "auth",
            UpstreamError::Protocol(_) => "protocol",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::TooLarge { .. } => "too_large",
            UpstreamError::Server(_) => "server",
            UpstreamError::Io(_) => "io",
        }
    }
}
