//! One LMTP connection.
//!
//! Time limits are deadlines, not per-read timeouts, so dripping bytes
//! cannot keep a connection alive:
//! - a command line must be complete `timeout_secs` after the session
//!   starts waiting for it;
//! - DATA must end by `start + timeout_secs + received / data_min_rate`;
//! - while every connection slot is taken, a command line must arrive
//!   within [`BUSY_TIMEOUT`] instead, so idle sessions make room first.
//!
//! All expire with `421 4.4.2` and the connection is closed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pop3_proto::{LineBuffer, LineError};
use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
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
/// Deadline for a command line while all `max_connections` slots are in
/// use: idle sessions are closed first so the MTA can still connect. Ten
/// seconds is what Postfix's smtpd uses under stress for the same reason.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Smallest growth step of the DATA buffer. Without SIZE the buffer doubles
/// (capped at the maximum message size): every outgrown buffer is freed
/// memory the allocator returns only after its decay time, so small steps
/// (x1.25 was measured) leave about five times the message in freed pages
/// against about two for doubling (measured: a 25 MiB delivery to 100
/// recipients peaked at +104 MiB with x1.25, above the 4x bound of
/// tests/system/test_memory.py; within it with doubling).
const DATA_GROWTH_MIN: usize = 64 * 1024;

struct Recipient {
    address: String,
    user: UserRecord,
}

#[derive(Default)]
struct Transaction {
    sender: Option<String>,
    /// SIZE= from MAIL, already checked against the limits.
    size: Option<u64>,
    recipients: Vec<Recipient>,
}

/// What a session waiting for a command watches besides its own deadline.
struct Busy<'a> {
    ctx: &'a LmtpContext,
    /// When the wait for this command line started plus [`BUSY_TIMEOUT`].
    deadline: Instant,
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

    /// Reads more bytes before `deadline` (earlier under connection
    /// pressure when `busy` is given); `Ok(None)` on EOF, timeout or
    /// shutdown.
    async fn fill(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        deadline: Instant,
        busy: Option<&Busy<'_>>,
    ) -> std::io::Result<Option<Vec<u8>>> {
        self.flush().await?;
        let mut buf = vec![0u8; READ_CHUNK];
        let mut deadline = deadline;
        loop {
            // Created before the check: `notify_waiters` reaches a `Notified`
            // from its creation, so a slot taken in between still wakes us.
            let pressure = busy.map(|b| b.ctx.pressure.notified());
            if let Some(b) = busy {
                if b.ctx.at_capacity() {
                    deadline = deadline.min(b.deadline);
                }
            }
            let pressure = async {
                match pressure {
                    Some(n) => n.await,
                    None => std::future::pending().await,
                }
            };
            // `read` is cancel-safe: losing the race to `pressure` loses no bytes.
            tokio::select! {
                r = tokio::time::timeout_at(deadline, self.stream.read(&mut buf)) => return match r {
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
                    return Ok(None);
                }
                () = pressure => {}
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
        let _slot = Slot::take(&ctx);
        if let Err(e) = run(&ctx, stream, &peer, shutdown).await {
            tracing::debug!(error = %e, "LMTP connection ended with an I/O error");
        }
    }
    .instrument(span)
    .await
}

/// Counts a running session in `LmtpContext::active` until dropped.
struct Slot<'a>(&'a LmtpContext);

impl<'a> Slot<'a> {
    fn take(ctx: &'a LmtpContext) -> Self {
        let now = ctx.active.fetch_add(1, Ordering::AcqRel) + 1;
        if now as u64 >= ctx.cfg.max_connections {
            ctx.pressure.notify_waiters();
        }
        Slot(ctx)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
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
    // When the wait for the current command line began; the deadline runs
    // from there across all the reads that make up the line.
    let mut waiting_since: Option<Instant> = None;
    loop {
        let line = match io.lines.next_line() {
            Ok(Some(l)) => {
                waiting_since = None;
                l
            }
            Ok(None) => {
                if *shutdown.borrow() {
                    io.reply("421 4.3.2 Server shutting down");
                    break;
                }
                let since = *waiting_since.get_or_insert_with(Instant::now);
                let busy = Busy { ctx, deadline: since + BUSY_TIMEOUT };
                match io.fill(&mut shutdown, since + io.timeout, Some(&busy)).await? {
                    Some(bytes) => {
                        io.lines.extend(&bytes);
                        continue;
                    }
                    None => break,
                }
            }
            Err(LineError::TooLong) => {
                waiting_since = None;
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
            // smtp-proto refuses some huge SIZE values as a syntax error;
            // they are still a size the server will not accept.
            Err(_) if is_mail(&line) && declared_size(&line).is_some_and(|s| s > ctx.cfg.max_message_size) => {
                io.reply("552 5.3.4 Message size exceeds fixed maximum message size");
                continue;
            }
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
                // Our own reading of SIZE: smtp-proto wraps digit strings
                // beyond usize to a small number.
                let size = declared_size(&line).or((from.size > 0).then_some(from.size as u64));
                if !greeted {
                    io.reply("503 5.5.1 Send LHLO first");
                } else if txn.is_some() {
                    io.reply("503 5.5.1 Nested MAIL command");
                } else if size.is_some_and(|s| s > ctx.cfg.max_message_size) {
                    io.reply("552 5.3.4 Message size exceeds fixed maximum message size");
                } else if size.is_some_and(|s| s > ctx.data_budget.available()) {
                    io.reply("452 4.3.1 Insufficient system storage");
                } else {
                    txn = Some(Transaction { sender: Some(from.address.into_owned()), size, recipients: Vec::new() });
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

/// True for a `MAIL` command line.
fn is_mail(line: &[u8]) -> bool {
    line.get(..5).is_some_and(|verb| verb.eq_ignore_ascii_case(b"MAIL "))
}

/// The `SIZE=` parameter of a MAIL line as written, saturating at
/// `u64::MAX`; `None` if absent or not all digits.
fn declared_size(line: &[u8]) -> Option<u64> {
    // Parameters follow the reverse-path, which ends at the last '>'.
    let start = line.iter().rposition(|&b| b == b'>')? + 1;
    line[start..].split(|&b| b == b' ').find_map(|param| {
        let digits = param.get(..5).filter(|k| k.eq_ignore_ascii_case(b"SIZE=")).map(|_| &param[5..])?;
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(digits.iter().fold(0u64, |n, d| n.saturating_mul(10).saturating_add(u64::from(d - b'0'))))
    })
}

/// The user names an envelope address may belong to, in the order they are
/// tried: exact matches first (the full address, then its local part), then
/// the same without a `+detail` suffix. So `sales+eu@example.com` reaches a
/// user `sales+eu` if there is one, and `ceo+x@corp.example` reaches
/// `ceo@corp.example` before `ceo`.
fn candidates(address: &str) -> Vec<UserName> {
    let mut forms = vec![address.to_owned()];
    let (local, domain) = match address.rsplit_once('@') {
        Some((local, domain)) => (local, Some(domain)),
        None => (address, None),
    };
    if domain.is_some() {
        forms.push(local.to_owned());
    }
    if let Some((base, _detail)) = local.split_once('+') {
        if let Some(domain) = domain {
            forms.push(format!("{base}@{domain}"));
        }
        forms.push(base.to_owned());
    }
    let mut names: Vec<UserName> = Vec::new();
    for form in forms {
        if let Ok(name) = UserName::parse(&form) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// Maps an envelope address to a local user (see [`candidates`]).
async fn resolve(ctx: &LmtpContext, address: &str) -> Result<Option<UserRecord>, ()> {
    let store = ctx.auth.mail().store();
    for name in candidates(address) {
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
    let max = ctx.cfg.max_message_size as usize;
    let mut receiver = DataReceiver::new(max);
    let started = Instant::now();
    let mut received: u64 = 0;
    // Every byte buffered in `body` is first reserved here; released on
    // every return path by drop.
    let mut held = ctx.data_budget.hold();
    let mut body = Vec::new();
    if let Some(size) = t.size.map(|s| s as usize).filter(|&s| s > 0 && s <= max) {
        // Announced size: one allocation of the right size, no growth. The
        // slack of one read keeps the check below from growing the buffer
        // for the last read, which also carries the final dot.
        let want = (size + READ_CHUNK + 2).min(max + 2);
        if held.grow_to(want as u64) {
            body.reserve_exact(want);
        }
    }
    // Set once the budget cannot cover the message: the rest is consumed
    // into `discard` (one read at a time) and the transaction gets 452.
    let mut over_budget = false;
    let mut discard = Vec::new();
    let mut pending = io.lines.take_buffered();
    loop {
        // The receiver never outputs more than its input plus one held-back
        // byte, and never more than `max` in all.
        let needed = (body.len() + pending.len() + 2).min(max + 2);
        if !over_budget && !receiver.oversize && needed > body.capacity() {
            let roomy = needed.saturating_mul(2).max(needed + DATA_GROWTH_MIN).min(max + 2);
            if let Some(target) = [roomy, needed].into_iter().find(|&n| held.grow_to(n as u64)) {
                body.reserve_exact(target - body.len());
            } else {
                over_budget = true;
                body = Vec::new();
                held.release();
            }
        }
        let sink = if over_budget { &mut discard } else { &mut body };
        let done = receiver.feed(&pending, sink);
        discard.clear();
        if let Some(used) = done {
            io.lines.extend(&pending[used..]);
            break;
        }
        received += pending.len() as u64;
        // The slowest DATA we wait for: `timeout_secs` of grace plus one
        // second per `data_min_rate` octets received.
        let allowance = Duration::from_millis(received.saturating_mul(1000) / ctx.cfg.data_min_rate.max(1));
        match io.fill(shutdown, started + io.timeout + allowance, None).await? {
            Some(bytes) => pending = bytes,
            None => return Ok(false),
        }
    }
    if over_budget && !receiver.oversize {
        tracing::warn!(recipients = t.recipients.len(), "in-flight DATA budget exhausted; answered 452");
        crate::telemetry::metrics::Metrics::global().lmtp_delivery("temp_failure", t.recipients.len(), 0);
        for _ in 0..t.recipients.len() {
            io.reply("452 4.3.1 Insufficient system storage");
        }
        return Ok(true);
    }
    let n = t.recipients.len();
    if receiver.oversize {
        crate::telemetry::metrics::Metrics::global().lmtp_delivery("too_large", n, 0);
        for _ in 0..n {
            io.reply("552 5.3.4 Message size exceeds fixed maximum message size");
        }
        return Ok(true);
    }
    if receiver.bare_line_ending {
        emit(SecurityEvent::ProtocolAbuse { peer, protocol: "lmtp", reason: "bare CR or LF in DATA" });
        crate::telemetry::metrics::Metrics::global().lmtp_delivery("refused", n, 0);
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
    let bytes = body.len();
    let outcome = match ctx.auth.mail().deliver_copies(body, copies).await {
        Ok(ids) => Ok(ids.iter().map(uidl).collect::<Vec<String>>()),
        Err(e) => Err(e.to_string()),
    };
    match outcome {
        Ok(ids) => {
            let uidl = ids.first().map(String::as_str).unwrap_or("");
            tracing::info!(target: "pop3connex::lmtp", event = "lmtp_delivered", peer, recipients = n, bytes, uidl,
                "delivered");
            crate::telemetry::metrics::Metrics::global().lmtp_delivery("delivered", n, bytes as u64);
            let first = ids.first().cloned().unwrap_or_default();
            for _ in 0..n {
                io.reply(&format!("250 2.0.0 <{first}> Saved"));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "delivery failed");
            crate::telemetry::metrics::Metrics::global().lmtp_delivery("temp_failure", n, 0);
            for _ in 0..n {
                io.reply("451 4.3.0 Temporary storage failure, try again later");
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipient_candidates_try_exact_names_before_detail_stripping() {
        let names = |a: &str| candidates(a).iter().map(|n| n.as_str().to_owned()).collect::<Vec<_>>();
        assert_eq!(names("Ceo+X@Corp.Example"), ["ceo+x@corp.example", "ceo+x", "ceo@corp.example", "ceo"]);
        assert_eq!(names("sales+eu@example.com"), ["sales+eu@example.com", "sales+eu", "sales@example.com", "sales"]);
        assert_eq!(names("alice@x"), ["alice@x", "alice"]);
        assert_eq!(names("postmaster"), ["postmaster"]);
        assert_eq!(names("a+b"), ["a+b", "a"]);
    }

    #[test]
    fn declared_size_saturates_instead_of_wrapping() {
        assert_eq!(declared_size(b"MAIL FROM:<s@x> SIZE=1000"), Some(1000));
        assert_eq!(declared_size(b"MAIL FROM:<s@x> BODY=8BITMIME size=7"), Some(7));
        assert_eq!(declared_size(b"MAIL FROM:<s@x> SIZE=999999999999999999999999999"), Some(u64::MAX));
        assert_eq!(declared_size(b"MAIL FROM:<s@x> SIZE=18446744073709551616"), Some(u64::MAX));
        assert_eq!(declared_size(b"MAIL FROM:<s@x> SIZE=12a"), None);
        assert_eq!(declared_size(b"MAIL FROM:<s@x>"), None);
        assert_eq!(declared_size(b"MAIL FROM:<size=5@x>"), None, "inside the address is not a parameter");
    }
}
