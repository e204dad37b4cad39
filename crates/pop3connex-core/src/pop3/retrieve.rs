//! RETR and TOP, streamed: one chunk is read, decrypted, dot-stuffed and
//! written at a time, so memory per session stays at a chunk or two
//! whatever the message size.

use pop3_proto::{DotStuffer, MsgNum, RespCode, StatusLine, TopFilter};
use tokio::io::{AsyncRead, AsyncWrite};

use super::connection::Connection;
use super::session::{Flow, Maildrop, Session};
use crate::events::{emit, SecurityEvent};
use crate::mailstore::{uidl, MailStoreError};

impl Session<'_> {
    /// RETR when `top` is `None`, TOP otherwise.
    pub(super) async fn retr<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Connection<S>,
        m: &Maildrop,
        n: MsgNum,
        top: Option<u32>,
    ) -> std::io::Result<Flow> {
        let meta = match m.get(n) {
            Ok(meta) => meta,
            Err(e) => {
                conn.reply(e);
                return Ok(Flow::Continue);
            }
        };
        let mail = self.ctx.auth.mail();
        // Read the first chunk before answering +OK, so the common failure
        // (a one-chunk message that cannot be read) gets a proper -ERR.
        let first = match mail.read_chunk(&m.key, meta, 0).await {
            Ok(c) => c,
            Err(e) => {
                self.report_read_error(m, meta, &e);
                conn.reply(read_error_reply(&e));
                return Ok(Flow::Continue);
            }
        };
        conn.reply(match top {
            None => StatusLine::ok(format!("{} octets", meta.size)),
            Some(_) => StatusLine::ok("Top of message follows"),
        });
        let mut stuffer = DotStuffer::new();
        let mut filter = top.map(TopFilter::new);
        let mut scratch = Vec::new();
        let mut chunk = first;
        let mut index = 0u32;
        // What TOP sent of the message (a TOP with a large line count is a
        // whole download, and counts as one for the volume rules).
        let mut top_octets = 0u64;
        loop {
            match &mut filter {
                None => stuffer.push(&chunk, conn.raw()),
                Some(f) => {
                    scratch.clear();
                    f.push(&chunk, &mut scratch);
                    top_octets += scratch.len() as u64;
                    stuffer.push(&scratch, conn.raw());
                }
            }
            conn.flush_if_full().await?;
            index += 1;
            if index >= meta.chunk_count || filter.as_ref().is_some_and(TopFilter::is_done) {
                break;
            }
            chunk = match mail.read_chunk(&m.key, meta, index).await {
                Ok(c) => c,
                Err(e) => {
                    // Mid-response there is no way to say -ERR: the only
                    // safe move is to drop the connection so the client
                    // never takes a truncated message for a whole one.
                    self.report_read_error(m, meta, &e);
                    return Err(std::io::Error::other("message chunk unreadable, connection dropped"));
                }
            };
        }
        stuffer.finish(conn.raw());
        match top {
            None => {
                m.volume.retrieved(meta.size);
                crate::telemetry::metrics::Metrics::global().retr(meta.size);
            }
            Some(_) => {
                m.volume.retrieved(top_octets);
                crate::telemetry::metrics::Metrics::global().top(top_octets);
            }
        }
        Ok(Flow::Continue)
    }

    fn report_read_error(&self, m: &Maildrop, meta: &crate::store::MessageMeta, e: &MailStoreError) {
        if matches!(e, MailStoreError::Crypto(_)) {
            emit(SecurityEvent::IntegrityFailure { user: m.user.name.as_str(), message: &uidl(&meta.uid) });
        } else {
            tracing::error!(error = %e, message = %uidl(&meta.uid), "cannot read message");
        }
    }
}

fn read_error_reply(e: &MailStoreError) -> StatusLine {
    match e {
        MailStoreError::Store(crate::store::StoreError::Temporary(_)) => {
            StatusLine::err_code(RespCode::SysTemp, "Message temporarily unavailable")
        }
        _ => StatusLine::err_code(RespCode::SysPerm, "Message cannot be read"),
    }
}
