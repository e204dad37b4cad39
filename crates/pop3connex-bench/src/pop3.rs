//! Minimal POP3 client over TLS, just what the benchmark sessions need.

use crate::scram::ScramClient;
use crate::tls::{self, TlsTarget};
use crate::users::User;
use anyhow::{bail, Context, Result};
use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// USER name / PASS password (RFC 1939)
    User,
    /// AUTH PLAIN with initial response (RFC 5034)
    Plain,
    /// AUTH SCRAM-SHA-256 with initial response (RFC 5034, RFC 5802, RFC 7677)
    #[value(name = "scram-sha-256")]
    ScramSha256,
}

pub struct Pop3Client {
    io: BufReader<TlsStream<TcpStream>>,
    line: Vec<u8>,
}

/// What one full session transferred.
#[derive(Default, Debug, Clone, Copy)]
pub struct SessionCounts {
    pub messages: u64,
    /// Octets of message data received by RETR (after removing the dot-stuffing framing).
    pub octets: u64,
}

/// Printable, shortened copy of a server line for error messages.
fn show(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(line);
    let s = s.trim_end();
    if s.chars().count() > 120 {
        format!("{}...", s.chars().take(120).collect::<String>())
    } else {
        s.to_owned()
    }
}

impl Pop3Client {
    /// TCP connect, TLS handshake and greeting.
    pub async fn connect(target: &TlsTarget) -> Result<Self> {
        let tls = target.connect().await?;
        let mut c = Self { io: BufReader::with_capacity(16 * 1024, tls), line: Vec::with_capacity(256) };
        c.status("greeting").await?;
        Ok(c)
    }

    pub fn tls_description(&self) -> String {
        tls::describe(self.io.get_ref())
    }

    async fn read_line(&mut self) -> Result<()> {
        self.line.clear();
        let n = self.io.read_until(b'\n', &mut self.line).await?;
        if n == 0 {
            bail!("connection closed by server");
        }
        Ok(())
    }

    /// Reads a status line; anything but +OK is an error.
    async fn status(&mut self, what: &str) -> Result<()> {
        self.read_line().await.with_context(|| what.to_owned())?;
        if !self.line.starts_with(b"+OK") {
            bail!("{what}: {}", show(&self.line));
        }
        Ok(())
    }

    async fn send(&mut self, cmd: &[u8]) -> Result<()> {
        let s = self.io.get_mut();
        s.write_all(cmd).await?;
        s.flush().await?;
        Ok(())
    }

    /// Reads the lines of a multi-line response up to the "." terminator, calling `f` with each
    /// line (dot-unstuffed, without CRLF).
    async fn multiline(&mut self, mut f: impl FnMut(&[u8])) -> Result<()> {
        loop {
            self.read_line().await?;
            let mut l: &[u8] = &self.line;
            l = l.strip_suffix(b"\n").unwrap_or(l);
            l = l.strip_suffix(b"\r").unwrap_or(l);
            if l == b"." {
                return Ok(());
            }
            if l.starts_with(b".") {
                l = &l[1..];
            }
            f(l);
        }
    }

    pub async fn login(&mut self, user: &User, mode: AuthMode) -> Result<()> {
        match mode {
            AuthMode::User => {
                self.send(format!("USER {}\r\n", user.name).as_bytes()).await?;
                self.status("USER").await?;
                self.send(format!("PASS {}\r\n", user.password).as_bytes()).await?;
                self.status("PASS").await
            }
            AuthMode::Plain => {
                let ir =
                    base64::engine::general_purpose::STANDARD.encode(format!("\0{}\0{}", user.name, user.password));
                self.send(format!("AUTH PLAIN {ir}\r\n").as_bytes()).await?;
                self.status("AUTH PLAIN").await
            }
            AuthMode::ScramSha256 => {
                let b64 = &base64::engine::general_purpose::STANDARD;
                let mut sc = ScramClient::new(&user.name, &user.password);
                self.send(format!("AUTH SCRAM-SHA-256 {}\r\n", b64.encode(sc.client_first())).as_bytes()).await?;
                let server_first = self.challenge("AUTH SCRAM-SHA-256 (server-first)").await?;
                let fin = sc.client_final(&server_first)?;
                self.send(format!("{}\r\n", b64.encode(fin)).as_bytes()).await?;
                let server_final = self.challenge("AUTH SCRAM-SHA-256 (server-final)").await?;
                sc.verify_server_final(&server_final)?;
                self.send(b"\r\n").await?;
                self.status("AUTH SCRAM-SHA-256").await
            }
        }
    }

    /// Reads a SASL continuation `+ BASE64` and returns the decoded text.
    async fn challenge(&mut self, what: &str) -> Result<String> {
        self.read_line().await.with_context(|| what.to_owned())?;
        let l = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        let Some(data) = l.strip_prefix(b"+ ").or_else(|| (l == b"+").then_some(&b""[..])) else {
            bail!("{what}: {}", show(&self.line));
        };
        let data =
            base64::engine::general_purpose::STANDARD.decode(data).with_context(|| format!("{what}: bad base64"))?;
        String::from_utf8(data).with_context(|| format!("{what}: not UTF-8"))
    }

    /// One failed login attempt with a wrong password (brute-force simulation). Ok(true): the
    /// server answered -ERR; Ok(false): the login unexpectedly succeeded. Err: the connection
    /// broke (closed by the server, reset, timed out).
    pub async fn wrong_login(&mut self, user: &User, mode: AuthMode) -> Result<bool> {
        let wrong = format!("{}-wrong", user.password);
        let reply_ok = |l: &[u8]| l.starts_with(b"+OK");
        match mode {
            AuthMode::User => {
                self.send(format!("USER {}\r\n", user.name).as_bytes()).await?;
                self.read_line().await?;
                if !reply_ok(&self.line) {
                    return Ok(true);
                }
                self.send(format!("PASS {wrong}\r\n").as_bytes()).await?;
            }
            AuthMode::Plain | AuthMode::ScramSha256 => {
                let ir = base64::engine::general_purpose::STANDARD.encode(format!("\0{}\0{wrong}", user.name));
                self.send(format!("AUTH PLAIN {ir}\r\n").as_bytes()).await?;
            }
        }
        self.read_line().await?;
        Ok(!reply_ok(&self.line))
    }

    /// STAT, LIST, UIDL, RETR of every message; checks that the three listings agree.
    pub async fn download_all(&mut self, expect: Option<u64>) -> Result<SessionCounts> {
        self.send(b"STAT\r\n").await?;
        self.status("STAT").await?;
        let stat_count: u64 = std::str::from_utf8(&self.line)
            .ok()
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("bad STAT reply: {}", show(&self.line)))?;
        if let Some(e) = expect {
            if stat_count != e {
                bail!("STAT reports {stat_count} messages, expected {e}");
            }
        }
        self.send(b"LIST\r\n").await?;
        self.status("LIST").await?;
        let mut list = 0u64;
        self.multiline(|_| list += 1).await?;
        self.send(b"UIDL\r\n").await?;
        self.status("UIDL").await?;
        let mut uidl = 0u64;
        self.multiline(|_| uidl += 1).await?;
        if list != stat_count || uidl != stat_count {
            bail!("STAT {stat_count}, LIST {list} and UIDL {uidl} entries disagree");
        }
        let mut counts = SessionCounts::default();
        for n in 1..=stat_count {
            self.send(format!("RETR {n}\r\n").as_bytes()).await?;
            self.status("RETR").await?;
            let mut octets = 0u64;
            self.multiline(|l| octets += l.len() as u64 + 2).await?;
            counts.messages += 1;
            counts.octets += octets;
        }
        Ok(counts)
    }

    pub async fn noop(&mut self) -> Result<()> {
        self.send(b"NOOP\r\n").await?;
        self.status("NOOP").await
    }

    /// QUIT, +OK, then a TLS close_notify. The server's own close is not awaited.
    pub async fn quit(mut self) -> Result<()> {
        self.send(b"QUIT\r\n").await?;
        self.status("QUIT").await?;
        // Best effort: the server may already have closed its side.
        let _ = self.io.get_mut().shutdown().await;
        Ok(())
    }
}
