//! One LMTP connection.

use std::sync::Arc;
use std::time::Duration;

use pop3_proto::{LineBuffer, LineError};
use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::Instrument;

use super::data::DataReceiver;
use super::LmtpContext;
use crate::events::{emit, SecurityEvent};
use crate::mailstore::uidl;
use crate::store::UserRecord;
use crate::types::UserName;

/// Command line cap (RFC 5321 section 4.5.3.1.4 requires 512; extensions
/// make lines longer, so allow a few KiB and no more).
const MAX_COMMAND_LINE: usize = 4096;
/// Syntax errors and unknown commands tolerated per connection.
const MAX_BAD_COMMANDS: u32 = 20;
const READ_CHUNK: usize = 16 * 1024;

struct Recipient {
    address: String,
    user: UserRecord,
}

#[derive(Default)]
struct Transaction {
    sender: Option<String>,
    recipients: Vec<Recipient>,
}

struct Io<S> {
    stream: S,
    lines: LineBuffer,
    out: Vec<u8>,
    timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            tokio::time::timeout(self.timeout, self.stream.write_all(&self.out))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timeout"))??;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads more bytes; `Ok(None)` on EOF, timeout or shutdown.
    async fn fill(&mut self, shutdown: &mut watch::Receiver<bool>) -> std::io::Result<Option<Vec<u8>>> {
        self.flush().await?;
        let mut buf = vec![0u8; READ_CHUNK];
        tokio::select! {
            r = tokio::time::timeout(self.timeout, self.stream.read(&mut buf)) => match r {
                Err(_) => {
                    self.reply("421 4.4.2 Timeout, closing connection");
                    Ok(None)
                }
                Ok(Ok(0)) => Ok(None),
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    Ok(Some(buf))
                }
                Ok(Err(e)) => Err(e),
            },
            _ = shutdown.changed() => {
                self.reply("421 4.3.2 Server shutting down");
                Ok(None)
            }
        }
    }
}

/// Serves one LMTP connection.
pub async fn serve<S>(ctx: Arc<LmtpContext>, stream: S, peer: String, shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let span = tracing::info_span!("lmtp", %peer);
    async move {
        if let Err(e) = run(&ctx, stream, &peer, shutdown).await {
            tracing::debug!(error = %e, "LMTP connection ended with an I/O error");
        }
    }
    .instrument(span)
    .await
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &LmtpContext,
    stream: S,
    peer: &str,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut io = Io {
        stream,
        lines: LineBuffer::new(MAX_COMMAND_LINE),
        out: Vec::new(),
        timeout: Duration::from_secs(ctx.cfg.timeout_secs),
    };
    io.reply(&format!("220 {} LMTP ready", ctx.hostname));
    let mut greeted = false;
    let mut txn: Option<Transaction> = None;
    let mut bad = 0u32;
    loop {
        let line = match io.lines.next_line() {
            Ok(Some(l)) => l,
            Ok(None) => {
                if *shutdown.borrow() {
                    io.reply("421 4.3.2 Server shutting down");
                    break;
                }
                match io.fill(&mut shutdown).await? {
                    Some(bytes) => {
                        io.lines.extend(&bytes);
                        continue;
                    }
                    None => break,
                }
            }
            Err(LineError::TooLong) => {
                bad += 1;
                io.reply("500 5.5.2 Line too long");
                if bad >= MAX_BAD_COMMANDS {
                    break;
                }
                continue;
            }
        };
        let mut with_crlf = line.clone();
        with_crlf.extend_from_slice(b"\r\n");
        let request = match Request::parse(&mut with_crlf.iter()) {
            Ok(r) => r,
            Err(e) => {
                bad += 1;
                if bad >= MAX_BAD_COMMANDS {
                    emit(SecurityEvent::ProtocolAbuse { peer, protocol: "lmtp", reason: "too many bad commands" });
                    io.reply("421 4.7.0 Too many errors, closing connection");
                    break;
                }
                let reply = match e {
                    smtp_proto::Error::UnknownCommand => "500 5.5.1 Command unrecognized".to_owned(),
                    smtp_proto::Error::InvalidSenderAddress => "501 5.1.7 Invalid sender address".to_owned(),
                    smtp_proto::Error::InvalidRecipientAddress => "501 5.1.3 Invalid recipient address".to_owned(),
                    smtp_proto::Error::SyntaxError { syntax } => format!("501 5.5.2 Syntax: {syntax}"),
                    smtp_proto::Error::UnsupportedParameter { .. } => "555 5.5.4 Unsupported parameter".to_owned(),
                    _ => "501 5.5.2 Syntax error".to_owned(),
                };
                io.reply(&reply);
                continue;
            }
        };
        match request {
            Request::Lhlo { .. } => {
                greeted = true;
                txn = None;
                io.reply(&format!("250-{}", ctx.hostname));
                io.reply("250-PIPELINING");
                io.reply("250-ENHANCEDSTATUSCODES");
                io.reply("250-8BITMIME");
                io.reply(&format!("250 SIZE {}", ctx.cfg.max_message_size));
            }
            Request::Ehlo { .. } | Request::Helo { .. } => io.reply("500 5.5.1 This is LMTP: use LHLO"),
            Request::Mail { from } => {
                if !greeted {
                    io.reply("503 5.5.1 Send LHLO first");
                } else if txn.is_some() {
                    io.reply("503 5.5.1 Nested MAIL command");
                } else if from.size as u64 > ctx.cfg.max_message_size {
                    io.reply("552 5.3.4 Message size exceeds fixed maximum message size");
                } else {
                    txn = Some(Transaction { sender: Some(from.address.into_owned()), recipients: Vec::new() });
                    io.reply("250 2.1.0 Sender OK");
                }
            }
            Request::Rcpt { to } => match &mut txn {
                None => io.reply("503 5.5.1 Send MAIL first"),
                Some(t) if t.recipients.len() as u64 >= ctx.cfg.max_recipients => {
                    io.reply("452 4.5.3 Too many recipients")
                }
                Some(t) => {
                    let address = to.address.into_owned();
                    match resolve(ctx, &address).await {
                        Ok(Some(user)) if user.disabled => io.reply("550 5.2.1 Mailbox disabled"),
                        Ok(Some(user)) => {
                            t.recipients.push(Recipient { address, user });
                            io.reply("250 2.1.5 Recipient OK");
                        }
                        Ok(None) => io.reply("550 5.1.1 User unknown"),
                        Err(()) => io.reply("451 4.3.0 Temporary lookup failure"),
                    }
                }
            },
            Request::Data => {
                let Some(t) = txn.take() else {
                    io.reply("503 5.5.1 Send MAIL first");
                    continue;
                };
                if t.recipients.is_empty() {
                    io.reply("503 5.5.1 No valid recipients");
                    continue;
                }
                io.reply("354 Start mail input; end with <CRLF>.<CRLF>");
                if !receive_and_deliver(ctx, &mut io, &mut shutdown, peer, t).await? {
                    break;
                }
            }
            Request::Rset => {
                txn = None;
                io.reply("250 2.0.0 OK");
            }
            Request::Noop { .. } => io.reply("250 2.0.0 OK"),
            Request::Quit => {
                io.reply("221 2.0.0 Bye");
                break;
            }
            Request::Vrfy { .. } => io.reply("252 2.5.2 Cannot VRFY user, but will accept message"),
            _ => io.reply("502 5.5.1 Command not implemented"),
        }
    }
    io.flush().await?;
    let _ = io.stream.shutdown().await;
    Ok(())
}

/// Maps an envelope address to a local user: the full address first, then
/// its local part without a `+detail` suffix.
async fn resolve(ctx: &LmtpContext, address: &str) -> Result<Option<UserRecord>, ()> {
    let store = ctx.auth.mail().store();
    let mut candidates = Vec::new();
    if let Ok(full) = UserName::parse(address) {
        candidates.push(full);
    }
    if let Some((local, _domain)) = address.rsplit_once('@') {
        let local = local.split_once('+').map_or(local, |(base, _)| base);
        if let Ok(n) = UserName::parse(local) {
            candidates.push(n);
        }
    }
    for name in candidates {
        match store.user(&name).await {
            Ok(Some(u)) => return Ok(Some(u)),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "recipient lookup failed");
                return Err(());
            }
        }
    }
    Ok(None)
}

/// Receives DATA and answers once per recipient. Returns false if the
/// connection must close.
async fn receive_and_deliver<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &LmtpContext,
    io: &mut Io<S>,
    shutdown: &mut watch::Receiver<bool>,
    peer: &str,
    t: Transaction,
) -> std::io::Result<bool> {
    let mut receiver = DataReceiver::new(ctx.cfg.max_message_size as usize);
    let mut body = Vec::new();
    let mut pending = io.lines.take_buffered();
    loop {
        if let Some(used) = receiver.feed(&pending, &mut body) {
            io.lines.extend(&pending[used..]);
            break;
        }
        match io.fill(shutdown).await? {
            Some(bytes) => pending = bytes,
            None => return Ok(false),
        }
    }
    let n = t.recipients.len();
    if receiver.oversize {
        for _ in 0..n {
            io.reply("552 5.3.4 Message size exceeds fixed maximum message size");
        }
        return Ok(true);
    }
    if receiver.bare_line_ending {
        emit(SecurityEvent::ProtocolAbuse { peer, protocol: "lmtp", reason: "bare CR or LF in DATA" });
        for _ in 0..n {
            io.reply("550 5.6.0 Message contains bare CR or LF; refused (SMTP smuggling protection)");
        }
        return Ok(true);
    }
    let sender = t.sender.unwrap_or_default();
    // One copy per mailbox even if two RCPTs map to it. The body is held
    // once; the store seals the copies one at a time (memory: the body plus
    // one sealed copy, whatever the recipient count).
    let mut seen = std::collections::HashSet::new();
    let copies: Vec<(UserRecord, Vec<u8>)> = t
        .recipients
        .into_iter()
        .filter(|r| seen.insert(r.user.mailbox.id))
        .map(|r| {
            let prefix = format!("Return-Path: <{sender}>\r\nDelivered-To: {}\r\n", r.address).into_bytes();
            (r.user, prefix)
        })
        .collect();
    let outcome = match ctx.auth.mail().deliver_copies(body, copies).await {
        Ok(ids) => Ok(ids.iter().map(uidl).collect::<Vec<String>>()),
        Err(e) => Err(e.to_string()),
    };
    match outcome {
        Ok(ids) => {
            tracing::info!(recipients = n, id = ids.first().map(String::as_str).unwrap_or(""), "delivered");
            let first = ids.first().cloned().unwrap_or_default();
            for _ in 0..n {
                io.reply(&format!("250 2.0.0 <{first}> Saved"));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "delivery failed");
            for _ in 0..n {
                io.reply("451 4.3.0 Temporary storage failure, try again later");
            }
        }
    }
    Ok(true)
}
