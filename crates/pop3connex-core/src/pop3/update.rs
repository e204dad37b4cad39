//! DELE, RSET and QUIT. Deletes are marks until QUIT; QUIT applies them in
//! one durable transaction (RFC 1939 UPDATE state). A session that ends any
//! other way deletes nothing.
//!
//! On a read-only store (disk full) DELE still marks, as it changes nothing
//! stored; QUIT then answers `-ERR [SYS/TEMP]` (RFC 2449) and the maildrop
//! stays as it was, so the client deletes again at its next session.

use pop3_proto::{MsgNum, RespCode, StatusLine};
use tokio::io::{AsyncRead, AsyncWrite};

use super::connection::Connection;
use super::session::{Flow, Maildrop, Session, State};
use crate::types::MessageId;

impl Session<'_> {
    pub(super) fn dele<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Connection<S>,
        m: &mut Maildrop,
        n: MsgNum,
    ) -> Flow {
        match m.get(n) {
            Ok(_) => {
                m.deleted[n.index()] = true;
                conn.reply(StatusLine::ok(format!("Message {n} deleted")));
            }
            Err(e) => conn.reply(e),
        }
        Flow::Continue
    }

    pub(super) fn rset<S: AsyncRead + AsyncWrite + Unpin>(&self, conn: &mut Connection<S>, m: &mut Maildrop) -> Flow {
        m.deleted.iter_mut().for_each(|d| *d = false);
        let (n, octets) = m.totals();
        conn.reply(StatusLine::ok(format!("Maildrop has {n} messages ({octets} octets)")));
        Flow::Continue
    }

    pub(super) async fn quit<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Connection<S>,
        m: Box<Maildrop>,
    ) -> std::io::Result<(State, Flow)> {
        let ids: Vec<MessageId> =
            m.messages.iter().zip(&m.deleted).filter(|(_, d)| **d).map(|(meta, _)| meta.id).collect();
        let count = ids.len();
        let store = self.ctx.auth.mail().store();
        // Fenced by the maildrop lease: a session that lost it (paused past
        // its expiry) is refused like a storage failure and deletes nothing.
        let result = store.delete_messages(m.user.mailbox.id, ids, m.lease.token()).await;
        let (left, _) = m.totals();
        if result.is_ok() {
            m.volume.deleted.store(count as u64, std::sync::atomic::Ordering::Relaxed);
        }
        // The update is committed (or failed): release the maildrop before
        // answering, so a client that reconnects at once never meets its
        // own lock ([IN-USE]).
        drop(m);
        match result {
            Ok(()) => {
                if count > 0 {
                    tracing::info!(deleted = count, "maildrop updated");
                }
                conn.reply(StatusLine::ok(format!("Bye, {count} messages deleted, {left} left")));
            }
            // A read-only store (disk full) refuses at once and has
            // already said why: a warning per session, not an error.
            Err(e) if !store.writable() => {
                tracing::warn!(error = %e, "QUIT could not apply deletes: the store is read-only");
                conn.reply(StatusLine::err_code(RespCode::SysTemp, "Deleted messages were not removed, try again"));
            }
            Err(e) => {
                tracing::error!(error = %e, "QUIT could not apply deletes");
                conn.reply(StatusLine::err_code(RespCode::SysTemp, "Deleted messages were not removed, try again"));
            }
        }
        conn.flush().await?;
        Ok((State::Authorization(Default::default()), Flow::Close))
    }
}
