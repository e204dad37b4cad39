//! The SMTP/LMTP protocol exchange on one connection: greeting, EHLO/LHLO
//! (HELO on plain loopback SMTP), STARTTLS as the [`TlsMode`] from
//! [`super::policy`] demands, AUTH PLAIN, MAIL/RCPT/DATA with line ends
//! normalised and dots stuffed, and reply parsing with bounded, timed reads.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use super::policy::{Identity, TlsMode};
use super::{perm, temp, RcptOutcome, SmtpError};
use crate::config::connector::{DownstreamConfig, DownstreamProtocol};
use crate::logtext::sanitize;

/// Lines of one multi-line reply we accept before calling it an attack.
const MAX_REPLY_LINES: usize = 100;
/// Octets of one reply line including CRLF.
const MAX_LINE: usize = 1024;
/// The DATA write phase gets `timeout_secs` plus one second per this many octets.
const DATA_BYTES_PER_SEC: u64 = 32 * 1024;
/// The reply to the final "." may take this many times `timeout_secs`
/// (servers scan the message first; RFC 5321 section 4.5.3.2.6).
const FINAL_REPLY_FACTOR: u32 = 5;

/// A connection: TCP, a `unix:` socket, or TLS over either.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One reply: the code and the text of every line.
#[derive(Debug)]
pub(super) struct Reply {
    pub(super) code: u16,
    pub(super) lines: Vec<String>,
}

impl Reply {
    fn class(&self) -> u16 {
        self.code / 100
    }

    /// "code text" of the last line, sanitized, for errors.
    pub(super) fn text(&self) -> String {
        format!("{} {}", self.code, sanitize(self.lines.last().map(String::as_str).unwrap_or("")))
    }

    fn outcome(&self) -> RcptOutcome {
        match self.class() {
            2 => RcptOutcome::Accepted,
            5 => RcptOutcome::Permanent(self.text()),
            _ => RcptOutcome::Temporary(self.text()),
        }
    }

    /// The error for an unexpected reply: 5xx permanent, anything else temporary.
    fn error(&self, during: &str) -> SmtpError {
        let m = format!("{during}: {}", self.text());
        if self.class() == 5 {
            SmtpError::Permanent(m)
        } else {
            SmtpError::Temporary(m)
        }
    }
}

/// EHLO keywords (upper case) and their parameters.
struct Extensions(Vec<(String, String)>);

impl Extensions {
    fn parse(reply: &Reply) -> Self {
        let ext = reply.lines.iter().skip(1).filter_map(|l| {
            let mut it = l.trim().splitn(2, [' ', '=']);
            let key = it.next()?.to_ascii_uppercase();
            (!key.is_empty()).then(|| (key, it.next().unwrap_or("").trim().to_owned()))
        });
        Extensions(ext.collect())
    }

    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    fn auth_plain(&self) -> bool {
        self.0
            .iter()
            .filter(|(k, _)| k == "AUTH")
            .any(|(_, p)| p.split_whitespace().any(|m| m.eq_ignore_ascii_case("PLAIN")))
    }

    /// The advertised SIZE limit; `None` without one (or `SIZE 0`).
    fn size(&self) -> Option<u64> {
        let (_, p) = self.0.iter().find(|(k, _)| k == "SIZE")?;
        p.parse::<u64>().ok().filter(|&n| n > 0)
    }
}

/// One connection's I/O with bounded, timed reads.
pub(super) struct Conn {
    pub(super) io: Box<dyn Io>,
    pub(super) buf: Vec<u8>,
    pub(super) timeout: Duration,
}

impl Conn {
    async fn fill(&mut self, deadline: tokio::time::Instant) -> Result<(), SmtpError> {
        let mut chunk = [0u8; 4096];
        let n = match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
            Ok(Ok(0)) => return Err(temp("connection closed by the server")),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(temp(format!("connection lost: {e}"))),
            Err(_) => return Err(temp("timed out waiting for the server's reply")),
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn line(&mut self, deadline: tokio::time::Instant) -> Result<String, SmtpError> {
        loop {
            if let Some(p) = self.buf.iter().position(|&b| b == b'\n') {
                if p + 1 > MAX_LINE {
                    return Err(temp("protocol error: reply line too long"));
                }
                let raw: Vec<u8> = self.buf.drain(..=p).collect();
                let raw = raw.strip_suffix(b"\n").unwrap_or(&raw);
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                return Ok(String::from_utf8_lossy(raw).into_owned());
            }
            if self.buf.len() >= MAX_LINE {
                return Err(temp("protocol error: reply line too long"));
            }
            self.fill(deadline).await?;
        }
    }

    async fn reply_within(&mut self, wait: Duration) -> Result<Reply, SmtpError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut code = None;
        let mut lines = Vec::new();
        loop {
            let line = self.line(deadline).await?;
            let b = line.as_bytes();
            let well_formed = b.len() >= 3
                && (b'2'..=b'5').contains(&b[0])
                && b[1..3].iter().all(u8::is_ascii_digit)
                && (b.len() == 3 || b[3] == b' ' || b[3] == b'-');
            if !well_formed {
                return Err(temp(format!("protocol error: malformed reply `{}`", sanitize(&line))));
            }
            let this: u16 = line[..3].parse().expect("three digits");
            if *code.get_or_insert(this) != this {
                return Err(temp("protocol error: reply code changed within a multi-line reply"));
            }
            lines.push(line.get(4..).unwrap_or("").to_owned());
            if lines.len() > MAX_REPLY_LINES {
                return Err(temp("protocol error: reply has too many lines"));
            }
            if b.len() == 3 || b[3] == b' ' {
                return Ok(Reply { code: this, lines });
            }
        }
    }

    pub(super) async fn reply(&mut self) -> Result<Reply, SmtpError> {
        self.reply_within(self.timeout).await
    }

    async fn write_within(&mut self, data: &[u8], wait: Duration) -> Result<(), SmtpError> {
        let io = &mut self.io;
        match tokio::time::timeout(wait, async move {
            io.write_all(data).await?;
            io.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(temp(format!("connection lost: {e}"))),
            Err(_) => Err(temp("timed out sending to the server")),
        }
    }

    /// Sends one command line. The error never contains the line (AUTH).
    async fn send(&mut self, line: &str) -> Result<(), SmtpError> {
        let mut data = Zeroizing::new(Vec::with_capacity(line.len() + 2));
        data.extend_from_slice(line.as_bytes());
        data.extend_from_slice(b"\r\n");
        self.write_within(&data, self.timeout).await
    }

    async fn cmd(&mut self, line: &str) -> Result<Reply, SmtpError> {
        self.send(line).await?;
        self.reply().await
    }

    /// Polite end of the session; errors do not matter any more.
    async fn quit(mut self) {
        self.timeout = self.timeout.min(Duration::from_secs(5));
        let _ = self.cmd("QUIT").await;
        let _ = self.io.shutdown().await;
    }
}

/// The message with every line end made CRLF (bare CR and bare LF too, so
/// no receiver can see an end-of-data the next hop does not), an ending CRLF
/// added if missing, and no stuffing yet: the same conversion the import
/// does, [`crate::import::to_crlf`].
pub(super) fn normalize(message: &[u8]) -> Vec<u8> {
    crate::import::to_crlf(message)
}

/// DATA payload: `normalized` (from [`normalize`]) dot-stuffed and
/// terminated with ".CRLF".
pub(super) fn stuff(normalized: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(normalized.len() + normalized.len() / 64 + 3);
    for line in normalized.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn transaction(
    io: Box<dyn Io>,
    d: &DownstreamConfig,
    helo: &str,
    tls: &TlsMode,
    from: &str,
    rcpts: &[&str],
    message: &[u8],
) -> Result<Vec<RcptOutcome>, SmtpError> {
    let mut conn = Conn { io, buf: Vec::new(), timeout: Duration::from_secs(d.timeout_secs) };
    let result = session(&mut conn, d, helo, tls, from, rcpts, message).await;
    conn.quit().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn session(
    conn: &mut Conn,
    d: &DownstreamConfig,
    helo: &str,
    tls: &TlsMode,
    from: &str,
    rcpts: &[&str],
    message: &[u8],
) -> Result<Vec<RcptOutcome>, SmtpError> {
    let lmtp = d.protocol == DownstreamProtocol::Lmtp;
    let greeting = conn.reply().await?;
    if greeting.code != 220 {
        return Err(temp(format!("greeting: {}", greeting.text())));
    }
    let hello = if lmtp { "LHLO" } else { "EHLO" };
    let mut ehlo = conn.cmd(&format!("{hello} {helo}")).await?;
    if ehlo.code != 250 {
        if lmtp || !matches!(tls, TlsMode::Off) || d.auth_user.is_some() {
            return Err(temp(format!("{hello}: {}", ehlo.text())));
        }
        // Plain SMTP on loopback: HELO has no extensions, which is fine.
        ehlo = conn.cmd(&format!("HELO {helo}")).await?;
        if ehlo.code != 250 {
            return Err(temp(format!("HELO: {}", ehlo.text())));
        }
        ehlo.lines.truncate(1);
    }
    let mut ext = Extensions::parse(&ehlo);
    let mut secured = false;
    if let TlsMode::Required { config, name, .. } = tls {
        if !ext.has("STARTTLS") {
            return Err(temp("the server does not offer STARTTLS, which this downstream requires"));
        }
        let r = conn.cmd("STARTTLS").await?;
        if r.code != 220 {
            return Err(temp(format!("STARTTLS refused: {}", r.text())));
        }
        if !conn.buf.is_empty() {
            // Bytes the server sent ahead of the handshake would be read as
            // if they came through TLS (CVE-2011-0411 style injection).
            return Err(temp("the server sent data after its STARTTLS reply (injection attempt)"));
        }
        let plain = std::mem::replace(&mut conn.io, Box::new(tokio::io::duplex(1).0));
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let stream = match tokio::time::timeout(conn.timeout, connector.connect(name.clone(), plain)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(temp(format!("TLS handshake failed: {e}"))),
            Err(_) => return Err(temp("TLS handshake timed out")),
        };
        conn.io = Box::new(stream);
        secured = true;
        let r = conn.cmd(&format!("{hello} {helo}")).await?;
        if r.code != 250 {
            return Err(temp(format!("{hello} after STARTTLS: {}", r.text())));
        }
        ext = Extensions::parse(&r);
    }
    if let (Some(user), Some(secret)) = (&d.auth_user, &d.auth_password) {
        if !secured {
            return Err(temp("refusing to send SMTP AUTH credentials without TLS"));
        }
        if let TlsMode::Required { identity: Identity::UnsignedMx, name, .. } = tls {
            // The config check refuses the obvious cases; this also covers
            // `dane` falling back to certificate checks for a domain
            // without usable TLSA records.
            return Err(temp(format!(
                "refusing to send SMTP AUTH credentials to {}, an MX host not authenticated by DANE",
                sanitize(&*name.to_str())
            )));
        }
        if !ext.auth_plain() {
            return Err(temp("the server does not offer AUTH PLAIN"));
        }
        let password = secret.load().map_err(|e| temp(format!("auth_password: {e}")))?;
        let mut raw = Zeroizing::new(Vec::with_capacity(user.len() + password.len() + 2));
        raw.push(0);
        raw.extend_from_slice(user.as_bytes());
        raw.push(0);
        raw.extend_from_slice(trim_newline(&password));
        use base64::Engine as _;
        let line = Zeroizing::new(format!("AUTH PLAIN {}", base64::engine::general_purpose::STANDARD.encode(&*raw)));
        let r = conn.cmd(&line).await?;
        if r.code == 334 {
            let _ = conn.cmd("*").await;
            return Err(temp("AUTH PLAIN: the server did not take the initial response"));
        }
        if r.code != 235 {
            return Err(temp(format!("AUTH PLAIN refused: {}", r.text())));
        }
    }

    let normalized = normalize(message);
    if let Some(limit) = ext.size() {
        if normalized.len() as u64 > limit {
            return Err(perm(format!(
                "message of {} octets exceeds the server's SIZE limit {limit}",
                normalized.len()
            )));
        }
    }
    let mut mail = format!("MAIL FROM:<{from}>");
    if ext.has("SIZE") {
        mail.push_str(&format!(" SIZE={}", normalized.len()));
    }
    if ext.has("8BITMIME") && normalized.iter().any(|&b| b >= 0x80) {
        mail.push_str(" BODY=8BITMIME");
    }
    if !from.is_ascii() || rcpts.iter().any(|r| !r.is_ascii()) {
        if !ext.has("SMTPUTF8") {
            return Err(perm("internationalized addresses need SMTPUTF8, which the server does not offer"));
        }
        mail.push_str(" SMTPUTF8");
    }
    let r = conn.cmd(&mail).await?;
    if r.class() != 2 {
        return Err(r.error("MAIL FROM"));
    }
    let mut outcomes = Vec::with_capacity(rcpts.len());
    for rcpt in rcpts {
        let r = conn.cmd(&format!("RCPT TO:<{rcpt}>")).await?;
        outcomes.push(r.outcome());
    }
    let accepted: Vec<usize> = (0..rcpts.len()).filter(|&i| outcomes[i] == RcptOutcome::Accepted).collect();
    if accepted.is_empty() {
        let _ = conn.cmd("RSET").await;
        return Ok(outcomes);
    }
    let r = conn.cmd("DATA").await?;
    if r.code != 354 {
        let o = match r.class() {
            5 => RcptOutcome::Permanent(format!("DATA: {}", r.text())),
            _ => RcptOutcome::Temporary(format!("DATA: {}", r.text())),
        };
        for &i in &accepted {
            outcomes[i] = o.clone();
        }
        return Ok(outcomes);
    }
    let payload = stuff(&normalized);
    let write_budget = conn.timeout + Duration::from_secs(payload.len() as u64 / DATA_BYTES_PER_SEC);
    if let Err(e) = conn.write_within(&payload, write_budget).await {
        return Err(temp(format!("sending the message: {e}")));
    }
    // From here on the server may have the message: unconfirmed recipients
    // become Temporary, never an error that hides confirmed ones.
    let final_wait = conn.timeout * FINAL_REPLY_FACTOR;
    let replies = if lmtp { accepted.len() } else { 1 };
    let mut finals = Vec::with_capacity(replies);
    for _ in 0..replies {
        match conn.reply_within(final_wait).await {
            Ok(r) => finals.push(r.outcome()),
            Err(e) => {
                let m = match e {
                    SmtpError::Temporary(m) | SmtpError::Permanent(m) => m,
                };
                let o = RcptOutcome::Temporary(format!("no final reply after the message: {m}"));
                finals.resize(replies, o);
                break;
            }
        }
    }
    if lmtp {
        for (&i, o) in accepted.iter().zip(finals) {
            outcomes[i] = o;
        }
    } else {
        let o = finals.pop().expect("one reply");
        for &i in &accepted {
            outcomes[i] = o.clone();
        }
    }
    Ok(outcomes)
}

fn trim_newline(s: &[u8]) -> &[u8] {
    let s = s.strip_suffix(b"\n").unwrap_or(s);
    s.strip_suffix(b"\r").unwrap_or(s)
}
