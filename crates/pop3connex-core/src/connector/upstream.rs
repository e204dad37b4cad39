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

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use crate::config::connector::{AccountConfig, UpstreamAuth, UpstreamTls};
use crate::scram::{ScramClient, ScramError};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

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
pub const MAX_ERROR_TEXT: usize = 200;

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

/// Printable-ASCII, length-capped form of server text for errors and logs.
pub(crate) fn sanitize(text: &[u8]) -> String {
    let mut out: String =
        text.iter().take(MAX_ERROR_TEXT).map(|&b| if (0x20..0x7f).contains(&b) { b as char } else { '?' }).collect();
    if text.len() > MAX_ERROR_TEXT {
        out.push_str("...");
    }
    out
}

/// Bytes received but not yet consumed as lines.
#[derive(Default)]
struct RecvBuf {
    data: Vec<u8>,
    start: usize,
}

impl RecvBuf {
    fn pending(&self) -> usize {
        self.data.len() - self.start
    }

    /// The next line without its terminator (CRLF, or a bare LF); `Err` when
    /// the line (terminator included) is longer than `max` octets.
    fn take_line(&mut self, max: usize) -> Result<Option<Vec<u8>>, ()> {
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
                } else if self.start >= 64 * 1024 {
                    self.data.drain(..self.start);
                    self.start = 0;
                }
                Ok(Some(line))
            }
            Some(_) => Err(()),
            None if pending.len() >= max => Err(()),
            None => Ok(None),
        }
    }
}

/// A server status line.
enum Status {
    Ok(Vec<u8>),
    Err(Vec<u8>),
    /// `+ <base64>`: a SASL challenge (only during AUTH).
    Challenge(Vec<u8>),
}

fn parse_status(line: Vec<u8>, allow_challenge: bool) -> Result<Status, UpstreamError> {
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
    // The line itself is not quoted: it could echo anything.
    Err(UpstreamError::Protocol("response starts with neither +OK nor -ERR".into()))
}

/// One connection (plain before STLS, TLS after) with bounded reads.
struct Conn<S> {
    stream: S,
    buf: RecvBuf,
    timeout: Duration,
    /// When the current response started (after its command was sent) and
    /// how many octets of it arrived: the response deadline is
    /// `timeout + received / MIN_RATE` after `started`.
    started: Instant,
    received: u64,
}

const TOO_SLOW: &str = "before the response deadline (the server sends too slowly)";

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S, timeout: Duration) -> Self {
        Self { stream, buf: RecvBuf::default(), timeout, started: Instant::now(), received: 0 }
    }

    /// Sends one command line (CRLF included) and starts its response clock.
    async fn send(&mut self, line: &[u8]) -> Result<(), UpstreamError> {
        if self.buf.pending() > 0 {
            return Err(UpstreamError::Protocol("the server sent data nobody asked for".into()));
        }
        let write = async {
            self.stream.write_all(line).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Err(_) => return Err(UpstreamError::Timeout("sending to the server")),
            Ok(Err(e)) => return Err(UpstreamError::Io(e.to_string())),
            Ok(Ok(())) => {}
        }
        self.started = Instant::now();
        self.received = 0;
        Ok(())
    }

    async fn fill(&mut self) -> Result<(), UpstreamError> {
        let allowed = self.timeout + Duration::from_millis(self.received.saturating_mul(1000) / MIN_RATE);
        let deadline = self.started + allowed;
        let now = Instant::now();
        if now >= deadline {
            return Err(UpstreamError::Timeout(if self.received == 0 { "waiting for the server" } else { TOO_SLOW }));
        }
        // With nothing received yet the response deadline equals the
        // inactivity timeout: report plain silence.
        let (wait, what) = if deadline - now < self.timeout {
            (deadline - now, if self.received == 0 { "waiting for the server" } else { TOO_SLOW })
        } else {
            (self.timeout, "waiting for the server")
        };
        if self.buf.data.capacity() - self.buf.data.len() < 4096 {
            self.buf.data.reserve(16 * 1024);
        }
        match tokio::time::timeout(wait, self.stream.read_buf(&mut self.buf.data)).await {
            Err(_) => Err(UpstreamError::Timeout(what)),
            Ok(Err(e)) => Err(UpstreamError::Io(e.to_string())),
            Ok(Ok(0)) => Err(UpstreamError::Io("the server closed the connection".into())),
            Ok(Ok(n)) => {
                self.received += n as u64;
                Ok(())
            }
        }
    }

    async fn read_line(&mut self, max: usize) -> Result<Vec<u8>, UpstreamError> {
        loop {
            match self.buf.take_line(max) {
                Ok(Some(line)) => return Ok(line),
                Ok(None) => self.fill().await?,
                Err(()) => return Err(UpstreamError::Protocol(format!("line longer than {max} octets"))),
            }
        }
    }

    async fn status(&mut self, allow_challenge: bool) -> Result<Status, UpstreamError> {
        let line = self.read_line(MAX_STATUS_LINE).await?;
        parse_status(line, allow_challenge)
    }

    /// One line of a multi-line response with the dot-stuffing removed;
    /// `None` at the terminating ".".
    async fn data_line(&mut self, max: usize) -> Result<Option<Vec<u8>>, UpstreamError> {
        let mut line = self.read_line(max).await?;
        if line.first() == Some(&b'.') {
            if line.len() == 1 {
                return Ok(None);
            }
            line.remove(0);
        }
        Ok(Some(line))
    }

    async fn greeting(&mut self) -> Result<(), UpstreamError> {
        match self.status(false).await? {
            Status::Ok(_) => Ok(()),
            Status::Err(t) => Err(UpstreamError::Connect(format!("the server refused the session: {}", sanitize(&t)))),
            Status::Challenge(_) => unreachable!("challenges are not allowed here"),
        }
    }

    /// `CAPA`; a server without it (`-ERR`) has no capabilities.
    async fn capa(&mut self) -> Result<Vec<String>, UpstreamError> {
        self.send(b"CAPA\r\n").await?;
        if let Status::Err(_) = self.status(false).await? {
            return Ok(Vec::new());
        }
        let mut caps = Vec::new();
        while let Some(line) = self.data_line(MAX_STATUS_LINE).await? {
            if caps.len() >= MAX_CAPA_LINES {
                return Err(UpstreamError::Protocol(format!("more than {MAX_CAPA_LINES} CAPA lines")));
            }
            caps.push(sanitize(&line));
        }
        Ok(caps)
    }
}

async fn handshake(
    connector: &TlsConnector,
    name: ServerName<'static>,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, UpstreamError> {
    match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Err(_) => Err(UpstreamError::Timeout("in the TLS handshake")),
        Ok(Err(e)) => Err(UpstreamError::Tls(e.to_string())),
        Ok(Ok(s)) => Ok(s),
    }
}

/// Decodes a SASL challenge; a server sending bad base64 violates RFC 5034.
fn decode_challenge(ch: &[u8]) -> Result<Vec<u8>, UpstreamError> {
    B64.decode(ch).map_err(|_| UpstreamError::Protocol("SASL challenge is not base64".into()))
}

/// `-ERR` to a login: RFC 3206 `[SYS/...]`, `[IN-USE]` and `[LOGIN-DELAY]`
/// are server conditions, not refused credentials.
fn refused(text: &[u8]) -> UpstreamError {
    let t = sanitize(text);
    let upper = t.to_ascii_uppercase();
    if ["[SYS/", "[IN-USE]", "[LOGIN-DELAY]"].iter().any(|c| upper.starts_with(c)) {
        UpstreamError::Server(t)
    } else {
        UpstreamError::Auth(t)
    }
}

fn scram_error(e: ScramError) -> String {
    match e {
        ScramError::Malformed(what) | ScramError::ChannelBinding(what) => format!("SCRAM-SHA-256: {what}"),
        ScramError::NonceMismatch => "SCRAM-SHA-256: the server nonce does not extend ours".into(),
        ScramError::InvalidProof => "SCRAM-SHA-256: the server signature is wrong (not the real server?)".into(),
    }
}

/// Refuses CR, LF and NUL in anything put on a command line.
fn check_arg(what: &str, value: &str) -> Result<(), UpstreamError> {
    if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(UpstreamError::Auth(format!("the {what} contains a line break or NUL")));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    Scram,
    Plain,
    User,
    Xoauth2,
    Oauthbearer,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Scram => "SCRAM-SHA-256",
            Method::Plain => "PLAIN",
            Method::User => "USER",
            Method::Xoauth2 => "XOAUTH2",
            Method::Oauthbearer => "OAUTHBEARER",
        }
    }
}

/// An authenticated-or-not POP3 session with an upstream server.
pub struct Session {
    conn: Conn<TlsStream<TcpStream>>,
    capabilities: Vec<String>,
    host: String,
    port: u16,
    poisoned: bool,
    logged_in: bool,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("capabilities", &self.capabilities)
            .field("poisoned", &self.poisoned)
            .field("logged_in", &self.logged_in)
            .finish()
    }
}

impl Session {
    /// Connects, reads the greeting, establishes verified TLS (implicit or
    /// mandatory STLS) and reads CAPA.
    pub async fn connect(account: &AccountConfig, tls: Arc<rustls::ClientConfig>) -> Result<Session, UpstreamError> {
        let timeout = Duration::from_secs(account.timeout_secs);
        let port = account.port();
        let host = account.host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let name = ServerName::try_from(host.clone())
            .map_err(|_| UpstreamError::Connect(format!("`{host}` is not a valid host name or address")))?;
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), port))).await {
            Err(_) => return Err(UpstreamError::Timeout("connecting")),
            Ok(Err(e)) => return Err(UpstreamError::Connect(format!("{host} port {port}: {e}"))),
            Ok(Ok(s)) => s,
        };
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(tls);
        let (stream, greeted) = match account.tls {
            UpstreamTls::Implicit => (handshake(&connector, name, tcp, timeout).await?, false),
            UpstreamTls::Starttls => {
                let mut plain = Conn::new(tcp, timeout);
                plain.greeting().await?;
                plain.send(b"STLS\r\n").await?;
                match plain.status(false).await? {
                    Status::Ok(_) => {}
                    Status::Err(t) => {
                        return Err(UpstreamError::Tls(format!("the server refused STLS: {}", sanitize(&t))))
                    }
                    Status::Challenge(_) => unreachable!("challenges are not allowed here"),
                }
                // Anything already received after "+OK" was sent in the
                // clear and would be read as if it came over TLS.
                if plain.buf.pending() > 0 {
                    return Err(UpstreamError::Protocol(
                        "plaintext data after the STLS response (response injection)".into(),
                    ));
                }
                (handshake(&connector, name, plain.stream, timeout).await?, true)
            }
        };
        let mut conn = Conn::new(stream, timeout);
        if !greeted {
            conn.greeting().await?;
        }
        let capabilities = conn.capa().await?;
        Ok(Session { conn, capabilities, host, port, poisoned: false, logged_in: false })
    }

    /// The CAPA lines read after TLS was established (empty if the server
    /// does not support CAPA).
    pub fn capabilities(&self) -> &[String] {
        &self.capabilities
    }

    /// False once an error left the connection in an unknown state.
    pub fn is_usable(&self) -> bool {
        !self.poisoned
    }

    fn sasl_mechanisms(&self) -> Vec<String> {
        self.capabilities
            .iter()
            .filter_map(|c| {
                let mut words = c.split_ascii_whitespace();
                words.next().filter(|w| w.eq_ignore_ascii_case("SASL")).map(|_| words)
            })
            .flatten()
            .map(|w| w.to_ascii_uppercase())
            .collect()
    }

    fn usable(&self) -> Result<(), UpstreamError> {
        if self.poisoned {
            return Err(UpstreamError::Io("session abandoned after an earlier error".into()));
        }
        Ok(())
    }

    /// Poisons the session on errors that leave the connection in an
    /// unknown state.
    fn guard<T>(&mut self, r: Result<T, UpstreamError>) -> Result<T, UpstreamError> {
        if let Err(e) = &r {
            if !matches!(e, UpstreamError::Server(_)) {
                self.poisoned = true;
            }
        }
        r
    }

    /// Logs in per `account.auth`; returns the mechanism used.
    pub async fn login(&mut self, account: &AccountConfig, cred: &Credential) -> Result<&'static str, UpstreamError> {
        self.usable()?;
        if self.logged_in {
            return Err(UpstreamError::Auth("already logged in".into()));
        }
        let r = self.login_inner(account, cred).await;
        if r.is_err() {
            // The server may be in any state, even logged in (a SCRAM
            // server that failed verification): never go on.
            self.poisoned = true;
        } else {
            self.logged_in = true;
        }
        r
    }

    async fn login_inner(&mut self, account: &AccountConfig, cred: &Credential) -> Result<&'static str, UpstreamError> {
        let mechs = self.sasl_mechanisms();
        let offered = |m: &str| mechs.iter().any(|x| x == m);
        let method = match (account.auth, cred) {
            (UpstreamAuth::Auto, Credential::Password(_)) if offered("SCRAM-SHA-256") => Method::Scram,
            (UpstreamAuth::Auto, Credential::Password(_)) if offered("PLAIN") => Method::Plain,
            (UpstreamAuth::Auto, Credential::Password(_)) => Method::User,
            (UpstreamAuth::Auto, Credential::AccessToken(_)) if offered("XOAUTH2") => Method::Xoauth2,
            (UpstreamAuth::Auto, Credential::AccessToken(_)) => Method::Oauthbearer,
            (UpstreamAuth::ScramSha256, Credential::Password(_)) => Method::Scram,
            (UpstreamAuth::Plain, Credential::Password(_)) => Method::Plain,
            (UpstreamAuth::User, Credential::Password(_)) => Method::User,
            (UpstreamAuth::Xoauth2, Credential::AccessToken(_)) => Method::Xoauth2,
            (UpstreamAuth::Oauthbearer, Credential::AccessToken(_)) => Method::Oauthbearer,
            (UpstreamAuth::Xoauth2 | UpstreamAuth::Oauthbearer, Credential::Password(_)) => {
                return Err(UpstreamError::Auth("XOAUTH2/OAUTHBEARER need an access token, not a password".into()))
            }
            (_, Credential::AccessToken(_)) => {
                return Err(UpstreamError::Auth("an access token needs auth = xoauth2, oauthbearer or auto".into()))
            }
        };
        let user = account.user.as_str();
        check_arg("user name", user)?;
        match cred {
            Credential::Password(pw) => {
                check_arg("password", pw)?;
                match method {
                    Method::Scram => self.scram(user, pw).await?,
                    Method::Plain => self.plain(user, pw).await?,
                    _ => self.user_pass(user, pw).await?,
                }
            }
            Credential::AccessToken(token) => {
                if token.is_empty() || !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                    return Err(UpstreamError::Auth("the access token is empty or has invalid characters".into()));
                }
                if user.contains('\x01') {
                    return Err(UpstreamError::Auth("the user name contains ^A".into()));
                }
                self.oauth(method, user, token).await?
            }
        }
        Ok(method.name())
    }

    /// `AUTH <mech>` with an initial response: inline when the command
    /// stays within 255 octets (RFC 5034 section 4), else after an empty
    /// challenge. Returns the server's answer to it.
    async fn auth_start(&mut self, mech: &str, initial: &[u8]) -> Result<Status, UpstreamError> {
        let encoded = Zeroizing::new(B64.encode(initial));
        let line = Zeroizing::new(format!("AUTH {mech} {}\r\n", encoded.as_str()));
        if line.len() <= 255 {
            self.conn.send(line.as_bytes()).await?;
        } else {
            self.conn.send(format!("AUTH {mech}\r\n").as_bytes()).await?;
            match self.conn.status(true).await? {
                Status::Challenge(c) if c.is_empty() => {}
                Status::Err(t) => return Err(refused(&t)),
                _ => return Err(UpstreamError::Protocol("expected an empty SASL challenge".into())),
            }
            let line = Zeroizing::new(format!("{}\r\n", encoded.as_str()));
            self.conn.send(line.as_bytes()).await?;
        }
        self.conn.status(true).await
    }

    /// Cancels an exchange with "*" and reads the server's (-ERR) answer.
    async fn auth_cancel(&mut self, err: UpstreamError) -> UpstreamError {
        if self.conn.send(b"*\r\n").await.is_ok() {
            let _ = self.conn.status(true).await;
        }
        err
    }

    async fn plain(&mut self, user: &str, pw: &str) -> Result<(), UpstreamError> {
        let payload = Zeroizing::new(format!("\0{user}\0{pw}"));
        match self.auth_start("PLAIN", payload.as_bytes()).await? {
            Status::Ok(_) => Ok(()),
            Status::Err(t) => Err(refused(&t)),
            Status::Challenge(_) => {
                Err(self.auth_cancel(UpstreamError::Protocol("unexpected challenge to AUTH PLAIN".into())).await)
            }
        }
    }

    async fn user_pass(&mut self, user: &str, pw: &str) -> Result<(), UpstreamError> {
        self.conn.send(format!("USER {user}\r\n").as_bytes()).await?;
        if let Status::Err(t) = self.conn.status(false).await? {
            return Err(refused(&t));
        }
        let line = Zeroizing::new(format!("PASS {pw}\r\n"));
        self.conn.send(line.as_bytes()).await?;
        match self.conn.status(false).await? {
            Status::Ok(_) => Ok(()),
            Status::Err(t) => Err(refused(&t)),
            Status::Challenge(_) => unreachable!("challenges are not allowed here"),
        }
    }

    async fn scram(&mut self, user: &str, pw: &str) -> Result<(), UpstreamError> {
        let (client, first) = ScramClient::new(user, pw).map_err(|e| UpstreamError::Auth(scram_error(e)))?;
        let server_first = match self.auth_start("SCRAM-SHA-256", &first).await? {
            Status::Challenge(c) => decode_challenge(&c)?,
            Status::Err(t) => return Err(refused(&t)),
            Status::Ok(_) => return Err(UpstreamError::Protocol("+OK before the SCRAM exchange finished".into())),
        };
        // PBKDF2 with up to a million iterations: off the executor.
        let computed = tokio::task::spawn_blocking(move || client.server_first(&server_first))
            .await
            .map_err(|_| UpstreamError::Auth("SCRAM-SHA-256: computation failed".into()))?;
        let (verifier, client_final) = match computed {
            Ok(v) => v,
            Err(e) => return Err(self.auth_cancel(UpstreamError::Auth(scram_error(e))).await),
        };
        let line = Zeroizing::new(format!("{}\r\n", B64.encode(&client_final)));
        self.conn.send(line.as_bytes()).await?;
        match self.conn.status(true).await? {
            Status::Challenge(c) => {
                let server_final = decode_challenge(&c)?;
                if let Err(e) = verifier.verify(&server_final) {
                    return Err(self.auth_cancel(UpstreamError::Auth(scram_error(e))).await);
                }
                self.conn.send(b"\r\n").await?;
                match self.conn.status(true).await? {
                    Status::Ok(_) => Ok(()),
                    Status::Err(t) => Err(refused(&t)),
                    Status::Challenge(_) => Err(UpstreamError::Protocol("challenge after SCRAM server-final".into())),
                }
            }
            Status::Err(t) => Err(refused(&t)),
            Status::Ok(_) => Err(UpstreamError::Auth(
                "SCRAM-SHA-256: the server did not prove it knows the credentials (no server signature)".into(),
            )),
        }
    }

    async fn oauth(&mut self, method: Method, user: &str, token: &str) -> Result<(), UpstreamError> {
        let (payload, dummy): (Zeroizing<String>, &[u8]) = if method == Method::Xoauth2 {
            (Zeroizing::new(format!("user={user}\x01auth=Bearer {token}\x01\x01")), b"\r\n")
        } else {
            let gs2 = format!("n,a={},", crate::scram::escape_saslname(user));
            let port = self.port;
            let host = &self.host;
            (Zeroizing::new(format!("{gs2}\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01")), b"AQ==\r\n")
        };
        match self.auth_start(method.name(), payload.as_bytes()).await? {
            Status::Ok(_) => Ok(()),
            Status::Err(t) => Err(refused(&t)),
            Status::Challenge(c) => {
                // The error details come as a challenge (RFC 7628 3.2.2);
                // the client answers with a dummy response, then gets -ERR.
                let detail = B64.decode(&c).map(|d| sanitize(&d)).unwrap_or_default();
                self.conn.send(dummy).await?;
                match self.conn.status(true).await? {
                    Status::Ok(_) => {
                        Err(UpstreamError::Protocol(format!("{} succeeded after an error", method.name())))
                    }
                    Status::Err(t) if detail.is_empty() => Err(refused(&t)),
                    Status::Err(t) => Err(UpstreamError::Auth(format!("{} ({detail})", sanitize(&t)))),
                    Status::Challenge(_) => Err(UpstreamError::Protocol("second challenge after an error".into())),
                }
            }
        }
    }

    /// Sends a command and reads a single-line answer: `+OK` text or
    /// `Server` error.
    async fn simple(&mut self, cmd: &str) -> Result<Vec<u8>, UpstreamError> {
        self.conn.send(format!("{cmd}\r\n").as_bytes()).await?;
        match self.conn.status(false).await? {
            Status::Ok(t) => Ok(t),
            Status::Err(t) => Err(UpstreamError::Server(format!("{}: {}", cmd, sanitize(&t)))),
            Status::Challenge(_) => unreachable!("challenges are not allowed here"),
        }
    }

    /// Reads a listing, calling `parse` on every line.
    async fn listing<T>(
        &mut self,
        cmd: &str,
        mut parse: impl FnMut(&[u8]) -> Result<T, &'static str>,
    ) -> Result<Vec<T>, UpstreamError> {
        self.simple(cmd).await?;
        let mut out = Vec::new();
        let mut cost = 0usize;
        while let Some(line) = self.conn.data_line(MAX_STATUS_LINE).await? {
            if out.len() >= MAX_LISTING {
                return Err(UpstreamError::Protocol(format!("{cmd} listing has more than {MAX_LISTING} entries")));
            }
            cost += line.len() + 2 + LISTING_ENTRY_COST;
            if cost > MAX_LISTING_BYTES {
                return Err(UpstreamError::Protocol(format!(
                    "{cmd} listing exceeds {} MiB after {} entries",
                    MAX_LISTING_BYTES >> 20,
                    out.len()
                )));
            }
            out.push(parse(&line).map_err(|e| UpstreamError::Protocol(format!("{cmd} listing: {e}")))?);
        }
        Ok(out)
    }

    /// `UIDL`: (message number, unique id) for every message.
    pub async fn uidl_all(&mut self) -> Result<Vec<(u32, String)>, UpstreamError> {
        self.usable()?;
        let r = self
            .listing("UIDL", |line| {
                let (n, uid) = split_pair(line)?;
                let n = parse_msg_number(n)?;
                if uid.is_empty() || uid.len() > 70 || !uid.iter().all(|b| (0x21..=0x7e).contains(b)) {
                    return Err("a unique id is not 1 to 70 printable characters");
                }
                let uid = String::from_utf8(uid.to_vec()).map_err(|_| "a unique id is not ASCII")?;
                Ok((n, uid))
            })
            .await
            .and_then(|entries| match uidl_duplicate(&entries) {
                Some(e) => Err(UpstreamError::Protocol(format!("UIDL listing: {e}"))),
                None => Ok(entries),
            });
        self.guard(r)
    }

    /// `LIST`: (message number, size in octets) for every message.
    pub async fn list_all(&mut self) -> Result<Vec<(u32, u64)>, UpstreamError> {
        self.usable()?;
        let mut numbers = std::collections::HashSet::new();
        let r = self
            .listing("LIST", |line| {
                // RFC 1939 allows more after the size; it is ignored.
                let mut words = line.split(|&b| b == b' ');
                let n = parse_msg_number(words.next().unwrap_or_default())?;
                let size = words.next().ok_or("no size")?;
                if size.is_empty() || size.len() > 19 || !size.iter().all(u8::is_ascii_digit) {
                    return Err("bad size");
                }
                let size: u64 = std::str::from_utf8(size).ok().and_then(|s| s.parse().ok()).ok_or("bad size")?;
                if !numbers.insert(n) {
                    return Err("duplicate message number");
                }
                Ok((n, size))
            })
            .await;
        self.guard(r)
    }

    /// `RETR`: the message with dot-stuffing removed, CRLF line ends; fails
    /// with `TooLarge` (closing the session) beyond `max_size` octets.
    pub async fn retr(&mut self, msg: u32, max_size: u64) -> Result<Vec<u8>, UpstreamError> {
        self.usable()?;
        let r = self.retr_inner(msg, max_size).await;
        self.guard(r)
    }

    async fn retr_inner(&mut self, msg: u32, max_size: u64) -> Result<Vec<u8>, UpstreamError> {
        self.simple(&format!("RETR {msg}")).await?;
        let mut out = Vec::new();
        while let Some(line) = self.conn.data_line(MAX_MESSAGE_LINE).await.map_err(|e| match e {
            UpstreamError::Protocol(_) => {
                UpstreamError::Protocol(format!("message {msg} has a line longer than {MAX_MESSAGE_LINE} octets"))
            }
            e => e,
        })? {
            if (out.len() + line.len() + 2) as u64 > max_size {
                return Err(UpstreamError::TooLarge { msg, limit: max_size });
            }
            out.extend_from_slice(&line);
            out.extend_from_slice(b"\r\n");
        }
        Ok(out)
    }

    pub async fn dele(&mut self, msg: u32) -> Result<(), UpstreamError> {
        self.usable()?;
        let r = self.simple(&format!("DELE {msg}")).await.map(drop);
        self.guard(r)
    }

    /// `QUIT`: `Ok` only on `+OK`, which commits the deletions upstream.
    pub async fn quit(mut self) -> Result<(), UpstreamError> {
        self.usable()?;
        self.simple("QUIT").await?;
        // Best effort close_notify; the server's +OK already committed.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.stream.shutdown()).await;
        Ok(())
    }
}

/// A repeated message number or unique id in a UIDL listing. Found by
/// sorting (numbers, then borrowed ids) rather than hash sets that would
/// hold a second copy of every id while the listing is read.
fn uidl_duplicate(entries: &[(u32, String)]) -> Option<&'static str> {
    let mut numbers: Vec<u32> = entries.iter().map(|(n, _)| *n).collect();
    numbers.sort_unstable();
    if numbers.windows(2).any(|w| w[0] == w[1]) {
        return Some("duplicate message number");
    }
    drop(numbers);
    let mut ids: Vec<&str> = entries.iter().map(|(_, u)| u.as_str()).collect();
    ids.sort_unstable();
    ids.windows(2).any(|w| w[0] == w[1]).then_some("duplicate unique id")
}

/// Splits `a SP b` (trailing blanks tolerated) into exactly two words.
fn split_pair(line: &[u8]) -> Result<(&[u8], &[u8]), &'static str> {
    let end = line.iter().rposition(|b| !matches!(b, b' ' | b'\t')).map_or(0, |p| p + 1);
    let line = &line[..end];
    let sp = line.iter().position(|&b| b == b' ').ok_or("missing field")?;
    let (a, b) = (&line[..sp], &line[sp + 1..]);
    if b.contains(&b' ') {
        return Err("too many fields");
    }
    Ok((a, b))
}

/// A message number: decimal digits, 1 to 2^32-1.
fn parse_msg_number(n: &[u8]) -> Result<u32, &'static str> {
    if n.is_empty() || n.len() > 10 || !n.iter().all(u8::is_ascii_digit) {
        return Err("bad message number");
    }
    match std::str::from_utf8(n).ok().and_then(|s| s.parse::<u32>().ok()) {
        Some(0) | None => Err("message number out of range"),
        Some(v) => Ok(v),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::connector::tlsclient;
    use crate::scram::{parse_client_first, ChannelBinding, ScramCredentials, ScramServer};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;
    use tokio_rustls::server::TlsStream as ServerTls;
    use tokio_rustls::TlsAcceptor;

    /// A CA, a server certificate for `names` and the CA file clients trust.
    pub(crate) struct Pki {
        pub(crate) dir: PathBuf,
        pub(crate) ca_file: PathBuf,
        pub(crate) server: Arc<rustls::ServerConfig>,
        pub(crate) pin: String,
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    pub(crate) fn pki(names: &[&str]) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, format!("test CA {n}"));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        let dir = std::env::temp_dir().join(format!("p3x-upstream-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        let chain = vec![leaf_cert.der().clone(), ca_cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let hash = tlsclient::spki_sha256(&CertificateDer::from(leaf_cert.der().to_vec())).unwrap();
        let pin = format!("sha256/{}", B64.encode(hash));
        Pki { dir, ca_file, server: Arc::new(server), pin }
    }

    fn client_tls(p: &Pki, pins: &[String]) -> Arc<rustls::ClientConfig> {
        let roots = tlsclient::root_store(Some(&p.ca_file)).unwrap();
        Arc::new(tlsclient::client_config(roots, pins, &[]).unwrap())
    }

    fn account(port: u16, tls: UpstreamTls, auth: &str) -> AccountConfig {
        let tls = match tls {
            UpstreamTls::Implicit => "implicit",
            UpstreamTls::Starttls => "starttls",
        };
        let mut a = AccountConfig::from_toml(&format!(
            "name = \"t\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"{tls}\"\nuser = \"alice\"\n\
             password = \"env:UNUSED\"\nauth = \"{auth}\"\n[route]\ndeliver_to = {{ local = \"alice\" }}\n"
        ))
        .unwrap();
        a.timeout_secs = 5;
        a
    }

    fn password(p: &str) -> Credential {
        Credential::Password(Zeroizing::new(p.into()))
    }

    /// The server end of a test connection.
    struct Peer {
        plain: Option<TcpStream>,
        tls: Option<ServerTls<TcpStream>>,
        acceptor: TlsAcceptor,
        buf: Vec<u8>,
    }

    impl Peer {
        async fn send(&mut self, data: &[u8]) {
            let r = match (&mut self.tls, &mut self.plain) {
                (Some(t), _) => t.write_all(data).await.and(t.flush().await),
                (None, Some(p)) => p.write_all(data).await,
                _ => unreachable!(),
            };
            let _ = r;
        }

        /// The next line from the client without CRLF; "" at EOF.
        async fn line(&mut self) -> String {
            loop {
                if let Some(p) = self.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=p).collect();
                    return String::from_utf8(line).unwrap().trim_end_matches(['\r', '\n']).to_owned();
                }
                let mut chunk = [0u8; 4096];
                let n = match (&mut self.tls, &mut self.plain) {
                    (Some(t), _) => t.read(&mut chunk).await.unwrap_or(0),
                    (None, Some(p)) => p.read(&mut chunk).await.unwrap_or(0),
                    _ => unreachable!(),
                };
                if n == 0 {
                    return String::new();
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        async fn expect(&mut self, want: &str) {
            assert_eq!(self.line().await, want);
        }

        async fn starttls(&mut self) {
            let tcp = self.plain.take().unwrap();
            self.tls = Some(self.acceptor.accept(tcp).await.unwrap());
        }

        /// Greeting and CAPA for implicit TLS.
        async fn hello(&mut self, capa: &str) {
            self.send(b"+OK POP3 ready\r\n").await;
            self.expect("CAPA").await;
            self.send(format!("+OK\r\n{capa}.\r\n").as_bytes()).await;
        }
    }

    /// Runs `script` as the server of one connection (TLS first for
    /// implicit mode); returns the port.
    async fn serve<F, Fut>(p: &Pki, implicit: bool, script: F) -> (u16, tokio::task::JoinHandle<()>)
    where
        F: FnOnce(Peer) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = TlsAcceptor::from(p.server.clone());
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut peer = Peer { plain: Some(tcp), tls: None, acceptor, buf: Vec::new() };
            if implicit {
                let tcp = peer.plain.take().unwrap();
                match peer.acceptor.accept(tcp).await {
                    Ok(t) => peer.tls = Some(t),
                    Err(_) => return,
                }
            }
            script(peer).await;
        });
        (port, task)
    }

    /// A logged-in session (USER/PASS) against a server running `script`
    /// after the login.
    async fn logged_in<F, Fut>(script: F) -> (Session, tokio::task::JoinHandle<()>, Pki)
    where
        F: FnOnce(Peer) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let p = pki(&["localhost", "127.0.0.1"]);
        let (port, task) = serve(&p, true, |mut peer| async move {
            peer.hello("USER\r\n").await;
            peer.expect("USER alice").await;
            peer.send(b"+OK\r\n").await;
            peer.expect("PASS secret").await;
            peer.send(b"+OK logged in\r\n").await;
            script(peer).await;
        })
        .await;
        let a = account(port, UpstreamTls::Implicit, "auto");
        let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
        assert_eq!(s.login(&a, &password("secret")).await.unwrap(), "USER");
        (s, task, p)
    }

    #[tokio::test]
    async fn implicit_tls_user_pass_list_retr_dele_quit() {
        let (mut s, task, _p) = logged_in(|mut peer| async move {
            peer.expect("UIDL").await;
            peer.send(b"+OK\r\n1 abc\r\n2 d-e_f\r\n.\r\n").await;
            peer.expect("LIST").await;
            peer.send(b"+OK 2 messages\r\n1 10\r\n2 200 extra\r\n.\r\n").await;
            peer.expect("RETR 1").await;
            peer.send(b"+OK 10 octets\r\nSubject: x\r\n\r\n..dot\r\nbare lf\n.\r\n").await;
            peer.expect("DELE 1").await;
            peer.send(b"+OK\r\n").await;
            peer.expect("QUIT").await;
            peer.send(b"+OK bye\r\n").await;
        })
        .await;
        assert_eq!(s.uidl_all().await.unwrap(), vec![(1, "abc".into()), (2, "d-e_f".into())]);
        assert_eq!(s.list_all().await.unwrap(), vec![(1, 10), (2, 200)]);
        assert_eq!(s.retr(1, 1024).await.unwrap(), b"Subject: x\r\n\r\n.dot\r\nbare lf\r\n");
        s.dele(1).await.unwrap();
        s.quit().await.unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn starttls_then_plain_and_errors_hide_the_password() {
        let p = pki(&["localhost", "127.0.0.1"]);
        let (port, task) = serve(&p, false, |mut peer| async move {
            peer.send(b"+OK plaintext greeting\r\n").await;
            peer.expect("STLS").await;
            peer.send(b"+OK begin TLS\r\n").await;
            peer.starttls().await;
            peer.expect("CAPA").await;
            peer.send(b"+OK\r\nSASL PLAIN\r\nUSER\r\n.\r\n").await;
            let line = peer.line().await;
            let b64 = line.strip_prefix("AUTH PLAIN ").unwrap();
            assert_eq!(B64.decode(b64).unwrap(), b"\0alice\0s3cr\xc3\xa9t");
            peer.send(b"-ERR [AUTH] wrong\x07 password\r\n").await;
        })
        .await;
        let a = account(port, UpstreamTls::Starttls, "auto");
        let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
        assert!(s.capabilities().iter().any(|c| c == "SASL PLAIN"));
        let e = s.login(&a, &password("s3cr\u{e9}t")).await.unwrap_err();
        assert_eq!(e.kind(), "auth");
        let text = e.to_string();
        assert!(text.contains("[AUTH] wrong? password") && !text.contains("s3cr"), "{text}");
        assert_eq!(s.uidl_all().await.unwrap_err().kind(), "io", "poisoned after a failed login");
        task.await.unwrap();
    }

    /// Runs a SCRAM-SHA-256 server from `crate::scram` (optionally with a
    /// forged server signature).
    async fn scram_server(mut peer: Peer, forge: bool) {
        peer.hello("SASL SCRAM-SHA-256 PLAIN\r\n").await;
        let line = peer.line().await;
        let first = B64.decode(line.strip_prefix("AUTH SCRAM-SHA-256 ").unwrap()).unwrap();
        let cb = ChannelBinding { plus: false, exporter: None };
        let (gs2, bare, user, nonce) = parse_client_first(&first, &cb).unwrap();
        assert_eq!(user, "alice");
        let creds = ScramCredentials::derive(b"pencil", 4096).unwrap();
        let (server, server_first) = ScramServer::start(gs2, bare, user, &nonce, creds, &cb);
        peer.send(format!("+ {}\r\n", B64.encode(server_first)).as_bytes()).await;
        let client_final = B64.decode(peer.line().await).unwrap();
        let mut server_final = server.finish(&client_final).unwrap();
        if forge {
            server_final = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".to_vec();
        }
        peer.send(format!("+ {}\r\n", B64.encode(server_final)).as_bytes()).await;
        let answer = peer.line().await;
        if forge {
            assert_eq!(answer, "*");
            peer.send(b"-ERR cancelled\r\n").await;
        } else {
            assert_eq!(answer, "");
            peer.send(b"+OK welcome\r\n").await;
        }
    }

    #[tokio::test]
    async fn scram_sha_256_against_our_server_and_forged_signature() {
        for forge in [false, true] {
            let p = pki(&["localhost", "127.0.0.1"]);
            let (port, task) = serve(&p, true, move |peer| scram_server(peer, forge)).await;
            let a = account(port, UpstreamTls::Implicit, "auto");
            let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
            let r = s.login(&a, &password("pencil")).await;
            if forge {
                let e = r.unwrap_err();
                assert_eq!(e.kind(), "auth");
                assert!(e.to_string().contains("server signature"), "{e}");
            } else {
                assert_eq!(r.unwrap(), "SCRAM-SHA-256");
            }
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn xoauth2_and_oauthbearer() {
        let token = "ya29.a0AfH6SM-token_~+/=";
        // XOAUTH2 accepted, with a long token sent after an empty challenge.
        let long = format!("{token}{}", "x".repeat(300));
        let p = pki(&["localhost", "127.0.0.1"]);
        let expect = format!("user=alice\x01auth=Bearer {long}\x01\x01");
        let (port, task) = serve(&p, true, move |mut peer| async move {
            peer.hello("SASL PLAIN XOAUTH2 OAUTHBEARER\r\n").await;
            peer.expect("AUTH XOAUTH2").await;
            peer.send(b"+ \r\n").await;
            assert_eq!(B64.decode(peer.line().await).unwrap(), expect.as_bytes());
            peer.send(b"+OK\r\n").await;
        })
        .await;
        let a = account(port, UpstreamTls::Implicit, "auto");
        let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
        let cred = Credential::AccessToken(Zeroizing::new(long.clone()));
        assert_eq!(s.login(&a, &cred).await.unwrap(), "XOAUTH2");
        task.await.unwrap();

        // XOAUTH2 refused: JSON error challenge, empty response, -ERR.
        let (port, task) = serve(&p, true, move |mut peer| async move {
            peer.hello("SASL XOAUTH2\r\n").await;
            assert!(peer.line().await.starts_with("AUTH XOAUTH2 "));
            peer.send(format!("+ {}\r\n", B64.encode(br#"{"status":"401","schemes":"bearer"}"#)).as_bytes()).await;
            peer.expect("").await;
            peer.send(b"-ERR invalid credentials\r\n").await;
        })
        .await;
        let a = account(port, UpstreamTls::Implicit, "auto");
        let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
        let cred = Credential::AccessToken(Zeroizing::new(token.into()));
        let e = s.login(&a, &cred).await.unwrap_err().to_string();
        assert!(e.contains("invalid credentials") && e.contains("401") && !e.contains("ya29"), "{e}");
        task.await.unwrap();

        // OAUTHBEARER (forced) refused with the AQ== dummy response.
        let (port, task) = serve(&p, true, move |mut peer| async move {
            peer.hello("USER\r\n").await;
            let port = peer.tls.as_ref().unwrap().get_ref().0.local_addr().unwrap().port();
            let line = peer.line().await;
            let payload = B64.decode(line.strip_prefix("AUTH OAUTHBEARER ").unwrap()).unwrap();
            let want = format!("n,a=alice,\x01host=127.0.0.1\x01port={port}\x01auth=Bearer {token}\x01\x01");
            assert_eq!(String::from_utf8(payload).unwrap(), want);
            peer.send(format!("+ {}\r\n", B64.encode(br#"{"status":"invalid_token"}"#)).as_bytes()).await;
            peer.expect("AQ==").await;
            peer.send(b"-ERR no\r\n").await;
        })
        .await;
        let a = account(port, UpstreamTls::Implicit, "oauthbearer");
        let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
        let e = s.login(&a, &cred).await.unwrap_err().to_string();
        assert!(e.contains("invalid_token") && !e.contains("ya29"), "{e}");
        task.await.unwrap();
        assert_eq!(format!("{cred:?}"), "AccessToken(<redacted>)");
    }

    async fn connect_err(p: &Pki, client: Arc<rustls::ClientConfig>, host: &str) -> UpstreamError {
        let (port, _task) = serve(p, true, |mut peer| async move { peer.hello("").await }).await;
        let mut a = account(port, UpstreamTls::Implicit, "auto");
        a.host = host.into();
        Session::connect(&a, client).await.unwrap_err()
    }

    #[tokio::test]
    async fn certificate_name_trust_and_pins_are_enforced() {
        let p = pki(&["pop.example.net"]);
        let e = connect_err(&p, client_tls(&p, &[]), "127.0.0.1").await;
        assert_eq!(e.kind(), "tls", "{e}");
        assert!(e.to_string().contains("not valid for name"), "{e}");

        let p = pki(&["localhost", "127.0.0.1"]);
        let other = pki(&["localhost", "127.0.0.1"]);
        let e = connect_err(&p, client_tls(&other, &[]), "127.0.0.1").await;
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");

        let e = connect_err(&p, client_tls(&p, std::slice::from_ref(&other.pin)), "127.0.0.1").await;
        assert!(e.to_string().contains("SPKI pin"), "{e}");

        // The matching pin is accepted, also with a host name.
        let (port, _task) = serve(&p, true, |mut peer| async move { peer.hello("").await }).await;
        let mut a = account(port, UpstreamTls::Implicit, "auto");
        a.host = "localhost".into();
        Session::connect(&a, client_tls(&p, std::slice::from_ref(&p.pin))).await.unwrap();
    }

    /// A CA for the pin tests: its certificate, signer and SPKI pin.
    fn pin_ca(name: &str) -> (CertificateDer<'static>, rcgen::Issuer<'static, rcgen::KeyPair>, String) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let der = params.self_signed(&key).unwrap().der().clone();
        let pin = format!("sha256/{}", B64.encode(tlsclient::spki_sha256(&der).unwrap()));
        (der, Issuer::new(params, key), pin)
    }

    #[tokio::test]
    async fn spki_pin_on_a_certificate_outside_the_verified_chain_is_refused() {
        let (ca1, issuer1, pin_ca1) = pin_ca("pin test CA1");
        let (ca2, _issuer2, pin_ca2) = pin_ca("pin test CA2 (unrelated)");
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer1)
            .unwrap();
        let pin_leaf = format!("sha256/{}", B64.encode(tlsclient::spki_sha256(leaf.der()).unwrap()));
        // The leaf chains to CA1; the server appends CA2, which is not on
        // its path. Both CAs are trusted, as with system roots.
        let presented = vec![leaf.der().clone(), ca2.clone()];
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(presented, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())))
            .unwrap();
        let mut p = pki(&["unused.example"]);
        p.server = Arc::new(server);
        let pem = |der: &CertificateDer<'_>| {
            format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", B64.encode(der))
        };
        std::fs::write(&p.ca_file, format!("{}{}", pem(&ca1), pem(&ca2))).unwrap();

        for (pin, accepted) in [(&pin_ca2, false), (&pin_ca1, true), (&pin_leaf, true)] {
            let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
            let log = seen.clone();
            let (port, task) = serve(&p, true, move |mut peer| async move {
                peer.hello("USER\r\n").await;
                loop {
                    let line = peer.line().await;
                    if line.is_empty() {
                        break;
                    }
                    log.lock().unwrap().push(line);
                    peer.send(b"+OK\r\n").await;
                }
            })
            .await;
            let a = account(port, UpstreamTls::Implicit, "user");
            let result = match Session::connect(&a, client_tls(&p, std::slice::from_ref(pin))).await {
                Ok(mut s) => s.login(&a, &password("secret")).await.map(drop),
                Err(e) => Err(e),
            };
            if accepted {
                result.unwrap();
            } else {
                let e = result.unwrap_err();
                assert_eq!(e.kind(), "tls", "{e}");
                assert!(e.to_string().contains("SPKI pin"), "{e}");
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            let seen = seen.lock().unwrap().clone();
            if accepted {
                assert_eq!(seen, ["USER alice", "PASS secret"], "pin {pin}");
            } else {
                assert!(seen.is_empty(), "credentials sent to an unpinned server: {seen:?}");
            }
        }
    }

    #[tokio::test]
    async fn stls_refused_or_injected_fails() {
        let p = pki(&["localhost", "127.0.0.1"]);
        let (port, _task) = serve(&p, false, |mut peer| async move {
            peer.send(b"+OK hi\r\n").await;
            peer.expect("STLS").await;
            peer.send(b"-ERR not here\r\n").await;
            peer.line().await;
        })
        .await;
        let e = Session::connect(&account(port, UpstreamTls::Starttls, "auto"), client_tls(&p, &[])).await;
        assert_eq!(e.unwrap_err().kind(), "tls");

        let (port, _task) = serve(&p, false, |mut peer| async move {
            peer.send(b"+OK hi\r\n").await;
            peer.expect("STLS").await;
            peer.send(b"+OK go ahead\r\n+OK injected\r\n").await;
            peer.line().await;
        })
        .await;
        let e = Session::connect(&account(port, UpstreamTls::Starttls, "auto"), client_tls(&p, &[])).await;
        let e = e.unwrap_err();
        assert_eq!(e.kind(), "protocol");
        assert!(e.to_string().contains("injection"), "{e}");
    }

    #[tokio::test]
    async fn bogus_oversize_and_endless_status_lines() {
        let p = pki(&["localhost", "127.0.0.1"]);
        for reply in [
            b"HELLO there\r\n".to_vec(),
            b"+OKAY\r\n".to_vec(),
            [b"+OK ".to_vec(), vec![b'a'; 2000], b"\r\n".to_vec()].concat(),
        ] {
            let (port, _task) = serve(&p, true, move |mut peer| async move {
                peer.send(&reply).await;
                peer.line().await;
            })
            .await;
            let e = Session::connect(&account(port, UpstreamTls::Implicit, "auto"), client_tls(&p, &[])).await;
            assert_eq!(e.unwrap_err().kind(), "protocol");
        }
        // Endless: megabytes without a line end, connection kept open.
        let (port, _task) = serve(&p, true, |mut peer| async move {
            peer.send(b"+OK ").await;
            for _ in 0..256 {
                peer.send(&[b'x'; 4096]).await;
            }
            peer.line().await;
        })
        .await;
        let e = Session::connect(&account(port, UpstreamTls::Implicit, "auto"), client_tls(&p, &[])).await;
        assert!(e.unwrap_err().to_string().contains("line longer than 1024"));
    }

    #[tokio::test]
    async fn bad_listings_are_protocol_errors_and_poison() {
        for listing in [
            &b"1 abc\r\n1 def\r\n"[..],
            b"1 abc\r\n2 abc\r\n",
            b"0 abc\r\n",
            b"-1 abc\r\n",
            b"1 has space\r\n",
            b"1 \x01ctl\r\n",
            b"1\r\n",
            b"x abc\r\n",
            b"4294967296 abc\r\n",
        ] {
            let listing = listing.to_vec();
            let (mut s, _task, _p) = logged_in(move |mut peer| async move {
                peer.expect("UIDL").await;
                peer.send(&[b"+OK\r\n".to_vec(), listing, b".\r\n".to_vec()].concat()).await;
                peer.line().await;
            })
            .await;
            assert_eq!(s.uidl_all().await.unwrap_err().kind(), "protocol");
            assert_eq!(s.list_all().await.unwrap_err().kind(), "io", "poisoned");
        }
        let long = format!("1 {}\r\n", "u".repeat(71));
        let (mut s, _task, _p) = logged_in(move |mut peer| async move {
            peer.expect("UIDL").await;
            peer.send(format!("+OK\r\n{long}.\r\n").as_bytes()).await;
            peer.line().await;
        })
        .await;
        assert_eq!(s.uidl_all().await.unwrap_err().kind(), "protocol");
        let (mut s, _task, _p) = logged_in(|mut peer| async move {
            peer.expect("LIST").await;
            peer.send(b"+OK\r\n1 10\r\n1 20\r\n.\r\n").await;
            peer.line().await;
        })
        .await;
        assert_eq!(s.list_all().await.unwrap_err().kind(), "protocol");
    }

    /// A listing of `entries` lines made by `line`, sent in 64 KiB batches
    /// (the server stops when the client gives up).
    async fn send_listing(peer: &mut Peer, entries: usize, line: impl Fn(usize) -> String) {
        peer.send(b"+OK\r\n").await;
        let mut batch = Vec::with_capacity(70 * 1024);
        for i in 1..=entries {
            batch.extend_from_slice(line(i).as_bytes());
            if batch.len() >= 64 * 1024 {
                peer.send(&batch).await;
                batch.clear();
            }
        }
        batch.extend_from_slice(b".\r\n");
        peer.send(&batch).await;
    }

    #[tokio::test]
    async fn hostile_listing_of_a_million_entries_is_cut_by_the_byte_budget() {
        // A million short UIDL entries: within MAX_LISTING, over the budget.
        let (mut s, _task, _p) = logged_in(|mut peer| async move {
            peer.expect("UIDL").await;
            send_listing(&mut peer, MAX_LISTING, |i| format!("{i} u{i}\r\n")).await;
            peer.line().await;
        })
        .await;
        let e = s.uidl_all().await.unwrap_err();
        assert_eq!(e.kind(), "protocol", "{e}");
        assert!(e.to_string().contains("UIDL listing exceeds 16 MiB"), "{e}");
        assert!(!s.is_usable(), "poisoned");
        assert_eq!(s.list_all().await.unwrap_err().kind(), "io");

        // A few huge-ish entries: LIST lines near the line limit (the text
        // after the size is ignored, but it still counts).
        let pad = "x".repeat(MAX_STATUS_LINE - 40);
        let (mut s, _task, _p) = logged_in(move |mut peer| async move {
            peer.expect("LIST").await;
            send_listing(&mut peer, 20_000, |i| format!("{i} 100 {pad}\r\n")).await;
            peer.line().await;
        })
        .await;
        let e = s.list_all().await.unwrap_err();
        assert!(e.to_string().contains("LIST listing exceeds 16 MiB"), "{e}");
        assert!(!s.is_usable(), "poisoned");
    }

    #[tokio::test]
    async fn large_honest_listing_fits_the_byte_budget() {
        // 100 000 messages with 40-octet unique ids: well within the budget.
        let n = 100_000;
        let (mut s, task, _p) = logged_in(move |mut peer| async move {
            peer.expect("UIDL").await;
            send_listing(&mut peer, n, |i| format!("{i} {i:0>40}\r\n")).await;
            peer.expect("QUIT").await;
            peer.send(b"+OK\r\n").await;
        })
        .await;
        let listing = s.uidl_all().await.unwrap();
        assert_eq!(listing.len(), n);
        assert_eq!(listing[n - 1], (n as u32, format!("{n:0>40}")));
        s.quit().await.unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn server_err_does_not_poison_but_quit_needs_ok() {
        let (mut s, task, _p) = logged_in(|mut peer| async move {
            peer.expect("RETR 9").await;
            peer.send(b"-ERR no such message\r\n").await;
            peer.expect("DELE 1").await;
            peer.send(b"+OK\r\n").await;
            peer.expect("QUIT").await;
            peer.send(b"-ERR [SYS/TEMP] could not delete\r\n").await;
        })
        .await;
        assert_eq!(s.retr(9, 100).await.unwrap_err().kind(), "server");
        s.dele(1).await.unwrap();
        assert_eq!(s.quit().await.unwrap_err().kind(), "server");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn silence_and_slow_drip_time_out() {
        let (mut s, _task, _p) = logged_in(|mut peer| async move {
            peer.expect("UIDL").await;
            peer.line().await;
        })
        .await;
        s.conn.timeout = Duration::from_secs(1);
        let started = std::time::Instant::now();
        let e = s.uidl_all().await.unwrap_err();
        assert_eq!(e.to_string(), "timed out waiting for the server");
        assert!(started.elapsed() < Duration::from_secs(3));

        let (mut s, _task, _p) = logged_in(|mut peer| async move {
            peer.expect("RETR 1").await;
            peer.send(b"+OK\r\n").await;
            loop {
                peer.send(b"a").await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        s.conn.timeout = Duration::from_secs(1);
        let started = std::time::Instant::now();
        let e = s.retr(1, 1 << 20).await.unwrap_err();
        assert_eq!(e.kind(), "timeout");
        assert!(e.to_string().contains("too slowly"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(s.dele(1).await.unwrap_err().kind(), "io");
    }

    #[tokio::test]
    async fn disconnect_mid_retr_and_oversize_messages() {
        let (mut s, _task, _p) = logged_in(|mut peer| async move {
            peer.expect("RETR 1").await;
            peer.send(b"+OK\r\nSubject: half\r\n\r\nbody").await;
        })
        .await;
        assert_eq!(s.retr(1, 1 << 20).await.unwrap_err().kind(), "io");

        let (mut s, _task, _p) = logged_in(|mut peer| async move {
            peer.expect("RETR 1").await;
            peer.send(b"+OK\r\n").await;
            for _ in 0..100 {
                peer.send(&[b"y".repeat(998), b"\r\n".to_vec()].concat()).await;
            }
            peer.send(b".\r\n").await;
            peer.line().await;
        })
        .await;
        let e = s.retr(1, 50_000).await.unwrap_err();
        assert!(matches!(e, UpstreamError::TooLarge { msg: 1, limit: 50_000 }), "{e}");
        assert!(!s.is_usable());
        assert_eq!(s.quit().await.unwrap_err().kind(), "io");

        // Exactly at the limit is fine; one over-long line is not.
        let (mut s, _task, _p) = logged_in(|mut peer| async move {
            peer.expect("RETR 1").await;
            peer.send(b"+OK\r\n12345678\r\n.\r\n").await;
            peer.expect("RETR 2").await;
            peer.send(&[b"+OK\r\n".to_vec(), vec![b'z'; MAX_MESSAGE_LINE + 10], b"\r\n.\r\n".to_vec()].concat()).await;
            peer.line().await;
        })
        .await;
        assert_eq!(s.retr(1, 10).await.unwrap(), b"12345678\r\n");
        let e = s.retr(2, 1 << 20).await.unwrap_err();
        assert!(e.to_string().contains("line longer than"), "{e}");
    }

    #[tokio::test]
    async fn capa_flood_unsolicited_data_and_unproven_scram() {
        let p = pki(&["localhost", "127.0.0.1"]);
        let (port, _task) = serve(&p, true, |mut peer| async move {
            peer.hello(&"X-CAP\r\n".repeat(MAX_CAPA_LINES + 1)).await;
            peer.line().await;
        })
        .await;
        let e = Session::connect(&account(port, UpstreamTls::Implicit, "auto"), client_tls(&p, &[])).await;
        assert_eq!(e.unwrap_err().kind(), "protocol");

        // A server without CAPA has no capabilities; data nobody asked
        // for (here a second +OK behind the greeting) is refused.
        let (port, _task) = serve(&p, true, |mut peer| async move {
            peer.send(b"+OK hi\r\n").await;
            peer.expect("CAPA").await;
            peer.send(b"-ERR what\r\n").await;
            peer.expect("USER alice").await;
            peer.send(b"+OK\r\n+OK extra\r\n").await;
            peer.line().await;
        })
        .await;
        let a = account(port, UpstreamTls::Implicit, "auto");
        let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
        assert!(s.capabilities().is_empty());
        let e = s.login(&a, &password("secret")).await.unwrap_err();
        assert!(e.to_string().contains("nobody asked for"), "{e}");

        // SCRAM: "+OK" without the server signature is not accepted.
        let (port, _task) = serve(&p, true, |mut peer| async move {
            peer.hello("SASL SCRAM-SHA-256\r\n").await;
            let line = peer.line().await;
            let first = B64.decode(line.strip_prefix("AUTH SCRAM-SHA-256 ").unwrap()).unwrap();
            let nonce = String::from_utf8(first).unwrap().rsplit_once("r=").unwrap().1.to_owned();
            let server_first = format!("r={nonce}xyz,s=c2FsdA==,i=4096");
            peer.send(format!("+ {}\r\n", B64.encode(server_first)).as_bytes()).await;
            peer.line().await;
            peer.send(b"+OK trust me\r\n").await;
            peer.line().await;
        })
        .await;
        let a = account(port, UpstreamTls::Implicit, "scram-sha256");
        let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
        let e = s.login(&a, &password("pencil")).await.unwrap_err();
        assert_eq!(e.kind(), "auth");
        assert!(e.to_string().contains("did not prove"), "{e}");
        assert!(!s.is_usable());
    }

    #[test]
    fn sanitize_and_status_parsing() {
        assert_eq!(sanitize(b"ok\r\n\x00\xff"), "ok????");
        assert_eq!(sanitize(&[b'a'; 300]).len(), MAX_ERROR_TEXT + 3);
        assert!(matches!(parse_status(b"+OK".to_vec(), false), Ok(Status::Ok(t)) if t.is_empty()));
        assert!(matches!(parse_status(b"-ERR x".to_vec(), false), Ok(Status::Err(t)) if t == b"x"));
        assert!(parse_status(b"+ abc".to_vec(), false).is_err());
        assert!(matches!(parse_status(b"+ abc".to_vec(), true), Ok(Status::Challenge(t)) if t == b"abc"));
        assert!(parse_status(b"-ERROR".to_vec(), true).is_err());
        assert!(matches!(refused(b"[SYS/TEMP] busy"), UpstreamError::Server(_)));
        assert!(matches!(refused(b"[AUTH] no"), UpstreamError::Auth(_)));
    }
}
