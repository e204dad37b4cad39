//! The upstream session over any byte stream.
//!
//! [`Session`] is generic over `AsyncRead + AsyncWrite`, so the same code
//! runs over TLS to a real server and over `tokio::io::duplex` in tests. It
//! owns the reply buffer (the codec's [`ReplyBuffer`]), the read timeouts
//! and response deadlines, the listing budget and the poisoning rule; what
//! the bytes mean is the codec's business ([`super::framing`]).

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use pop3_proto::client::{self, ClientCommand, ReplyBuffer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use super::framing::{self, Status};
use super::{
    UpstreamError, LISTING_ENTRY_COST, MAX_CAPA_LINES, MAX_LISTING, MAX_LISTING_BYTES, MAX_MESSAGE_LINE,
    MAX_STATUS_LINE, MIN_RATE,
};
use crate::logtext::sanitize;

/// Octets asked of the stream per read; also the free space kept in the
/// scratch buffer.
const READ_CHUNK: usize = 16 * 1024;

/// One connection (plain before STLS, TLS after) with bounded reads.
pub(super) struct Conn<S> {
    pub(super) stream: S,
    pub(super) buf: ReplyBuffer,
    /// Reused for every read, so a read allocates nothing.
    scratch: Vec<u8>,
    pub(super) timeout: Duration,
    /// When the current response started (after its command was sent) and
    /// how many octets of it arrived: the response deadline is
    /// `timeout + received / MIN_RATE` after `started`.
    started: Instant,
    received: u64,
}

const TOO_SLOW: &str = "before the response deadline (the server sends too slowly)";

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub(super) fn new(stream: S, timeout: Duration) -> Self {
        Self {
            stream,
            buf: ReplyBuffer::new(),
            scratch: vec![0; READ_CHUNK],
            timeout,
            started: Instant::now(),
            received: 0,
        }
    }

    /// Sends one command and starts its response clock.
    pub(super) async fn send(&mut self, cmd: &ClientCommand<'_>) -> Result<(), UpstreamError> {
        let line = framing::encode(cmd)?;
        if self.buf.pending() > 0 {
            return Err(UpstreamError::Protocol("the server sent data nobody asked for".into()));
        }
        let write = async {
            self.stream.write_all(&line).await?;
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
        match tokio::time::timeout(wait, self.stream.read(&mut self.scratch)).await {
            Err(_) => Err(UpstreamError::Timeout(what)),
            Ok(Err(e)) => Err(UpstreamError::Io(e.to_string())),
            Ok(Ok(0)) => Err(UpstreamError::Io("the server closed the connection".into())),
            Ok(Ok(n)) => {
                self.buf.extend(&self.scratch[..n]);
                self.received += n as u64;
                Ok(())
            }
        }
    }

    async fn read_line(&mut self, max: usize) -> Result<Vec<u8>, UpstreamError> {
        loop {
            match self.buf.next_line(max) {
                Ok(Some(line)) => return Ok(line),
                Ok(None) => self.fill().await?,
                Err(client::LineTooLong) => return Err(framing::line_too_long(max)),
            }
        }
    }

    pub(super) async fn status(&mut self, allow_challenge: bool) -> Result<Status, UpstreamError> {
        let line = self.read_line(MAX_STATUS_LINE).await?;
        framing::parse_status(line, allow_challenge)
    }

    /// One line of a multi-line response with the dot-stuffing removed;
    /// `None` at the terminating ".".
    async fn data_line(&mut self, max: usize) -> Result<Option<Vec<u8>>, UpstreamError> {
        Ok(client::body_line(self.read_line(max).await?))
    }

    pub(super) async fn greeting(&mut self) -> Result<(), UpstreamError> {
        match self.status(false).await? {
            Status::Ok(_) => Ok(()),
            Status::Err(t) => Err(UpstreamError::Connect(format!("the server refused the session: {}", sanitize(&t)))),
            Status::Challenge(_) => unreachable!("challenges are not allowed here"),
        }
    }

    /// `CAPA`; a server without it (`-ERR`) has no capabilities.
    async fn capa(&mut self) -> Result<Vec<String>, UpstreamError> {
        self.send(&ClientCommand::Capa).await?;
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

/// An authenticated-or-not POP3 session with an upstream server, over TLS
/// in production (`S` defaults to the connector's TLS stream).
pub struct Session<S = TlsStream<TcpStream>> {
    pub(super) conn: Conn<S>,
    pub(super) capabilities: Vec<String>,
    /// Host and port as configured: quoted in OAUTHBEARER (RFC 7628).
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) poisoned: bool,
    pub(super) logged_in: bool,
}

impl<S> fmt::Debug for Session<S> {
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

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// A session over an established (secure) stream: reads the greeting
    /// unless `greeted` (STLS read it in the clear), then CAPA.
    pub(super) async fn open(mut conn: Conn<S>, greeted: bool, host: String, port: u16) -> Result<Self, UpstreamError> {
        if !greeted {
            conn.greeting().await?;
        }
        let capabilities = conn.capa().await?;
        Ok(Session { conn, capabilities, host, port, poisoned: false, logged_in: false })
    }

    /// A session over `stream`, which must already be as secure as the
    /// account demands: reads the greeting and CAPA. `host` and `port` are
    /// what OAUTHBEARER quotes.
    pub async fn over_stream(stream: S, timeout: Duration, host: &str, port: u16) -> Result<Self, UpstreamError> {
        Self::open(Conn::new(stream, timeout), false, host.to_owned(), port).await
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

    pub(super) fn usable(&self) -> Result<(), UpstreamError> {
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

    /// Sends a command and reads a single-line answer: `+OK` text or
    /// `Server` error.
    async fn simple(&mut self, cmd: &ClientCommand<'_>) -> Result<Vec<u8>, UpstreamError> {
        self.conn.send(cmd).await?;
        match self.conn.status(false).await? {
            Status::Ok(t) => Ok(t),
            Status::Err(t) => Err(UpstreamError::Server(format!("{}: {}", cmd, sanitize(&t)))),
            Status::Challenge(_) => unreachable!("challenges are not allowed here"),
        }
    }

    /// Reads a listing, calling `parse` on every line.
    async fn listing<T>(
        &mut self,
        cmd: ClientCommand<'_>,
        mut parse: impl FnMut(&[u8]) -> Result<T, client::ListingError>,
    ) -> Result<Vec<T>, UpstreamError> {
        self.simple(&cmd).await?;
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
            out.push(parse(&line).map_err(|e| framing::bad_listing(&cmd, e))?);
        }
        Ok(out)
    }

    /// `UIDL`: (message number, unique id) for every message.
    pub async fn uidl_all(&mut self) -> Result<Vec<(u32, String)>, UpstreamError> {
        self.usable()?;
        let r = self
            .listing(ClientCommand::Uidl, |line| {
                let (n, uid) = client::parse_uidl_line(line)?;
                Ok((n.get(), uid.into_string()))
            })
            .await
            .and_then(|entries| match client::uidl_duplicate(&entries) {
                Some(e) => Err(framing::bad_listing(&ClientCommand::Uidl, e)),
                None => Ok(entries),
            });
        self.guard(r)
    }

    /// `LIST`: (message number, size in octets) for every message.
    pub async fn list_all(&mut self) -> Result<Vec<(u32, u64)>, UpstreamError> {
        self.usable()?;
        let mut numbers = HashSet::new();
        let r = self
            .listing(ClientCommand::List, |line| {
                let (n, size) = client::parse_list_line(line)?;
                if !numbers.insert(n) {
                    return Err(client::ListingError::DuplicateMessageNumber);
                }
                Ok((n.get(), size))
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
        self.simple(&ClientCommand::Retr(msg)).await?;
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
        let r = self.simple(&ClientCommand::Dele(msg)).await.map(drop);
        self.guard(r)
    }

    /// `QUIT`: `Ok` only on `+OK`, which commits the deletions upstream.
    pub async fn quit(mut self) -> Result<(), UpstreamError> {
        self.usable()?;
        self.simple(&ClientCommand::Quit).await?;
        // Best effort close_notify; the server's +OK already committed.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.stream.shutdown()).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The session over `tokio::io::duplex`: a scripted fake server on the
    //! other end, no sockets, no TLS, tokio's paused clock for timeouts.

    use tokio::io::{duplex, AsyncBufReadExt, BufReader, DuplexStream};
    use tokio::task::JoinHandle;
    use zeroize::Zeroizing;

    use super::*;
    use crate::config::connector::AccountConfig;
    use crate::connector::upstream::Credential;

    /// The server end of a duplex pipe, writing replies in `chunk`-octet
    /// pieces so the client sees every split.
    struct Fake {
        io: BufReader<DuplexStream>,
        chunk: usize,
    }

    impl Fake {
        async fn send(&mut self, data: &[u8]) {
            for c in data.chunks(self.chunk) {
                if self.io.get_mut().write_all(c).await.is_err() {
                    return;
                }
                let _ = self.io.get_mut().flush().await;
                tokio::task::yield_now().await;
            }
        }

        /// The next command line without CRLF; "" at EOF.
        async fn line(&mut self) -> String {
            let mut line = String::new();
            let _ = self.io.read_line(&mut line).await;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }

        async fn expect(&mut self, want: &str) {
            assert_eq!(self.line().await, want);
        }
    }

    fn account() -> AccountConfig {
        AccountConfig::from_toml(
            "name = \"t\"\nhost = \"pop.example.net\"\ntls = \"implicit\"\nuser = \"alice\"\npassword = \"env:UNUSED\"\n\
             [route]\ndeliver_to = { local = \"alice\" }\n",
        )
        .unwrap()
    }

    /// A session logged in with USER/PASS over a duplex pipe whose server
    /// end runs `script` after the login.
    async fn logged_in<F, Fut>(chunk: usize, script: F) -> (Session<DuplexStream>, JoinHandle<()>)
    where
        F: FnOnce(Fake) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let (client, server) = duplex(256 * 1024);
        let task = tokio::spawn(async move {
            let mut fake = Fake { io: BufReader::new(server), chunk };
            fake.send(b"+OK POP3 ready\r\n").await;
            fake.expect("CAPA").await;
            fake.send(b"+OK\r\nUSER\r\nUIDL\r\n.\r\n").await;
            fake.expect("USER alice").await;
            fake.send(b"+OK\r\n").await;
            fake.expect("PASS secret").await;
            fake.send(b"+OK logged in\r\n").await;
            script(fake).await;
        });
        let mut s = Session::over_stream(client, Duration::from_secs(5), "pop.example.net", 995).await.unwrap();
        assert_eq!(s.capabilities(), ["USER", "UIDL"]);
        let cred = Credential::Password(Zeroizing::new("secret".into()));
        assert_eq!(s.login(&account(), &cred).await.unwrap(), "USER");
        (s, task)
    }

    #[tokio::test]
    async fn login_uidl_list_retr_dele_quit_in_every_chunk_size() {
        for chunk in [1, 2, 3, 5, 8, 13, 64, 1 << 20] {
            let (mut s, task) = logged_in(chunk, |mut fake| async move {
                fake.expect("UIDL").await;
                fake.send(b"+OK\r\n1 abc\r\n2 d-e_f\r\n.\r\n").await;
                fake.expect("LIST").await;
                fake.send(b"+OK 2 messages\r\n1 10\r\n2 200 extra\r\n.\r\n").await;
                fake.expect("RETR 1").await;
                fake.send(b"+OK 10 octets\r\nSubject: x\r\n\r\n..dot\r\nbare lf\n.\r\n").await;
                fake.expect("DELE 1").await;
                fake.send(b"+OK\r\n").await;
                fake.expect("QUIT").await;
                fake.send(b"+OK bye\r\n").await;
            })
            .await;
            assert_eq!(s.uidl_all().await.unwrap(), vec![(1, "abc".into()), (2, "d-e_f".into())], "chunk {chunk}");
            assert_eq!(s.list_all().await.unwrap(), vec![(1, 10), (2, 200)], "chunk {chunk}");
            assert_eq!(s.retr(1, 1024).await.unwrap(), b"Subject: x\r\n\r\n.dot\r\nbare lf\r\n", "chunk {chunk}");
            s.dele(1).await.unwrap();
            s.quit().await.unwrap();
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn too_long_status_line_is_a_protocol_error_and_poisons() {
        let (mut s, _task) = logged_in(4096, |mut fake| async move {
            fake.expect("UIDL").await;
            fake.send(&[b"+OK ".to_vec(), vec![b'a'; MAX_STATUS_LINE], b"\r\n".to_vec()].concat()).await;
            fake.line().await;
        })
        .await;
        let e = s.uidl_all().await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("protocol violation by the server: line longer than {MAX_STATUS_LINE} octets")
        );
        assert!(!s.is_usable());
        assert_eq!(s.dele(1).await.unwrap_err().kind(), "io");
    }

    #[tokio::test]
    async fn too_long_message_line_names_the_message() {
        let (mut s, _task) = logged_in(4096, |mut fake| async move {
            fake.expect("RETR 3").await;
            fake.send(&[b"+OK\r\n".to_vec(), vec![b'z'; MAX_MESSAGE_LINE + 1], b"\r\n.\r\n".to_vec()].concat()).await;
            fake.line().await;
        })
        .await;
        let e = s.retr(3, 1 << 20).await.unwrap_err();
        assert_eq!(e.kind(), "protocol");
        assert!(e.to_string().contains("message 3 has a line longer than 65536 octets"), "{e}");
    }

    #[tokio::test]
    async fn unterminated_body_closed_is_io_error() {
        let (mut s, task) = logged_in(7, |mut fake| async move {
            fake.expect("RETR 1").await;
            fake.send(b"+OK\r\nSubject: half\r\n\r\nbody\r\n").await;
        })
        .await;
        let e = s.retr(1, 1 << 20).await.unwrap_err();
        assert_eq!(e.to_string(), "connection lost: the server closed the connection");
        assert!(!s.is_usable());
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn unterminated_body_left_open_times_out() {
        let (mut s, _task) = logged_in(7, |mut fake| async move {
            fake.expect("RETR 1").await;
            fake.send(b"+OK\r\nSubject: half\r\n\r\nbody").await;
            fake.line().await;
        })
        .await;
        let e = s.retr(1, 1 << 20).await.unwrap_err();
        assert_eq!(e.kind(), "timeout", "{e}");
        assert_eq!(e.to_string(), "timed out waiting for the server");
    }

    #[tokio::test]
    async fn bad_uidl_listings_are_refused_with_the_reason() {
        for (listing, reason) in [
            (&b"1 has space\r\n"[..], "UIDL listing: too many fields"),
            (b"1 \x00nul\r\n", "UIDL listing: a unique id is not 1 to 70 printable characters"),
            (b"99999999999 abc\r\n", "UIDL listing: bad message number"),
            (b"4294967296 abc\r\n", "UIDL listing: message number out of range"),
            (b"1 abc\r\n1 def\r\n", "UIDL listing: duplicate message number"),
            (b"1 abc\r\n2 abc\r\n", "UIDL listing: duplicate unique id"),
        ] {
            let listing = listing.to_vec();
            let (mut s, _task) = logged_in(3, move |mut fake| async move {
                fake.expect("UIDL").await;
                fake.send(&[b"+OK\r\n".to_vec(), listing, b".\r\n".to_vec()].concat()).await;
                fake.line().await;
            })
            .await;
            let e = s.uidl_all().await.unwrap_err();
            assert_eq!(e.to_string(), format!("protocol violation by the server: {reason}"));
            assert!(!s.is_usable(), "{reason}: poisoned");
        }
    }

    #[tokio::test]
    async fn unsolicited_reply_and_bogus_status_are_refused() {
        // Sent in one write, so the extra line arrives with the +OK.
        let (mut s, _task) = logged_in(4096, |mut fake| async move {
            fake.expect("DELE 1").await;
            fake.send(b"+OK\r\n+OK extra\r\n").await;
            fake.line().await;
        })
        .await;
        s.dele(1).await.unwrap();
        let e = s.dele(2).await.unwrap_err();
        assert_eq!(e.to_string(), "protocol violation by the server: the server sent data nobody asked for");

        let (mut s, _task) = logged_in(2, |mut fake| async move {
            fake.expect("LIST").await;
            fake.send(b"OK fine\r\n").await;
            fake.line().await;
        })
        .await;
        let e = s.list_all().await.unwrap_err();
        assert_eq!(e.to_string(), "protocol violation by the server: response starts with neither +OK nor -ERR");
    }
}
