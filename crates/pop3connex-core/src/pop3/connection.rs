//! A POP3 connection: framing in, buffered replies out, timeouts, shutdown.
//!
//! Generic over the stream so the same code runs on TCP, TLS and in-memory
//! duplex pipes in tests. The read buffer lives here, not in a future, so a
//! read cancelled by the shutdown signal loses nothing.
//!
//! Output is bounded: replies to pipelined commands are queued, but once
//! [`FLUSH_THRESHOLD`] octets are waiting they are written before the next
//! buffered command is handed out, so a peer that pipelines and never reads
//! cannot make us queue more. Every write is bounded by [`WRITE_TIMEOUT`]
//! and, before login, by the pre-authentication deadline
//! ([`Connection::set_write_deadline`]).

use std::time::Duration;

use pop3_proto::{LineBuffer, LineError, StatusLine};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// Hard cap on one command line, CRLF included. RFC 2449 requires at least
/// 255 octets; SASL responses (OAuth bearer tokens later) need a few KiB.
pub const MAX_LINE: usize = 8 * 1024;
/// Replies are flushed once this much is queued (e.g. while streaming RETR).
pub const FLUSH_THRESHOLD: usize = 32 * 1024;
/// How long a peer may take to accept queued output before we give up.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(120);

/// What a read produced.
pub enum Input {
    Line(Vec<u8>),
    TooLong,
    Eof,
    Timeout,
    Shutdown,
}

pub struct Connection<S> {
    stream: S,
    lines: LineBuffer,
    out: Vec<u8>,
    /// No write may last past this (the pre-authentication deadline before
    /// login), whatever is left of [`WRITE_TIMEOUT`].
    write_deadline: Option<tokio::time::Instant>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S) -> Self {
        Self { stream, lines: LineBuffer::new(MAX_LINE), out: Vec::new(), write_deadline: None }
    }

    /// Bounds every later flush by `deadline` (`None`: [`WRITE_TIMEOUT`] only).
    pub fn set_write_deadline(&mut self, deadline: Option<tokio::time::Instant>) {
        self.write_deadline = deadline;
    }

    /// Queues a status line.
    pub fn reply(&mut self, status: StatusLine) {
        status.encode_into(&mut self.out);
    }

    /// Queues raw bytes (multi-line bodies, already CRLF-terminated).
    pub fn raw(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await
        };
        let mut limit = tokio::time::Instant::now() + WRITE_TIMEOUT;
        if let Some(d) = self.write_deadline {
            limit = limit.min(d);
        }
        match tokio::time::timeout_at(limit, write).await {
            Ok(r) => r?,
            Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "peer does not read")),
        }
        self.out.clear();
        if self.out.capacity() > FLUSH_THRESHOLD * 2 {
            // Do not keep a RETR-sized buffer around for an idle session.
            self.out = Vec::new();
        }
        Ok(())
    }

    /// Flushes if enough output is queued.
    pub async fn flush_if_full(&mut self) -> std::io::Result<()> {
        if self.out.len() >= FLUSH_THRESHOLD {
            self.flush().await?;
        }
        Ok(())
    }

    /// Returns the next command line. Queued replies are flushed only when
    /// no further pipelined command is already buffered (RFC 2449
    /// PIPELINING: one write for a batch of replies).
    /// `idle` bounds the time until a complete line has arrived, not the gap
    /// between bytes: a client trickling one byte at a time cannot hold the
    /// connection open past it (slow-loris).
    pub async fn read_line(&mut self, idle: Duration, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<Input> {
        let deadline = tokio::time::Instant::now() + idle;
        loop {
            if self.out.len() >= FLUSH_THRESHOLD {
                // The peer pipelines faster than it reads: make it read
                // before it gets another command served.
                self.flush().await?;
            }
            match self.lines.next_line() {
                Ok(Some(line)) => return Ok(Input::Line(line)),
                Err(LineError::TooLong) => return Ok(Input::TooLong),
                Ok(None) => {}
            }
            if *shutdown.borrow() {
                return Ok(Input::Shutdown);
            }
            self.flush().await?;
            let mut buf = [0u8; 1024];
            tokio::select! {
                r = tokio::time::timeout_at(deadline, self.stream.read(&mut buf)) => match r {
                    Err(_) => return Ok(Input::Timeout),
                    Ok(Ok(0)) => return Ok(Input::Eof),
                    Ok(Ok(n)) => self.lines.extend(&buf[..n]),
                    Ok(Err(e)) => return Err(e),
                },
                _ = shutdown.changed() => return Ok(Input::Shutdown),
            }
        }
    }

    /// Drops any bytes the peer pipelined behind the current command and
    /// returns how many there were (used by STLS).
    pub fn discard_buffered(&mut self) -> usize {
        self.lines.discard()
    }

    pub fn into_inner(self) -> S {
        self.stream
    }
}
