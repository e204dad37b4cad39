//! STAT, LIST, UIDL.

use std::io::Write as _;

use pop3_proto::{MsgNum, StatusLine};
use tokio::io::{AsyncRead, AsyncWrite};

use super::connection::Connection;
use super::session::{Flow, Maildrop, Session};
use crate::mailstore::uidl;

impl Session<'_> {
    pub(super) fn stat<S: AsyncRead + AsyncWrite + Unpin>(&self, conn: &mut Connection<S>, m: &Maildrop) -> Flow {
        let (n, octets) = m.totals();
        conn.reply(StatusLine::ok(format!("{n} {octets}")));
        Flow::Continue
    }

    pub(super) async fn list<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Connection<S>,
        m: &Maildrop,
        n: Option<MsgNum>,
    ) -> std::io::Result<Flow> {
        self.scan(conn, m, n, |meta| meta.size.to_string()).await
    }

    pub(super) async fn uidl<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Connection<S>,
        m: &Maildrop,
        n: Option<MsgNum>,
    ) -> std::io::Result<Flow> {
        self.scan(conn, m, n, |meta| uidl(&meta.uid)).await
    }

    /// Shared shape of LIST and UIDL: one message, or all undeleted ones.
    async fn scan<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Connection<S>,
        m: &Maildrop,
        n: Option<MsgNum>,
        value: impl Fn(&crate::store::MessageMeta) -> String,
    ) -> std::io::Result<Flow> {
        match n {
            Some(n) => match m.get(n) {
                Ok(meta) => conn.reply(StatusLine::ok(format!("{n} {}", value(meta)))),
                Err(e) => conn.reply(e),
            },
            None => {
                let (count, octets) = m.totals();
                conn.reply(StatusLine::ok(format!("{count} messages ({octets} octets)")));
                for (i, (meta, deleted)) in m.messages.iter().zip(&m.deleted).enumerate() {
                    if !deleted {
                        // Writing into a Vec cannot fail.
                        let _ = write!(conn.raw(), "{} {}\r\n", i + 1, value(meta));
                        conn.flush_if_full().await?;
                    }
                }
                conn.raw().extend_from_slice(b".\r\n");
            }
        }
        Ok(Flow::Continue)
    }
}
