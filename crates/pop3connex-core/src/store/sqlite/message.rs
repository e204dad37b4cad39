//! Messages, their sealed chunks and import records ([`MessageStore`]).

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{map_err, SqliteStore, WriteOp};
use crate::crypto::RecordId;
use crate::store::{FencingToken, MessageMeta, MessageSource, MessageStore, NewMessage, StoreError, StoreResult};
use crate::types::{unix_now, MailboxId, MessageId};

pub(super) fn deliver(conn: &Connection, msgs: &[NewMessage]) -> StoreResult<()> {
    let now = unix_now();
    for m in msgs {
        insert(conn, m, now)?;
    }
    Ok(())
}

/// Seals and inserts the source's messages one at a time: each sealed copy
/// is dropped before the next is sealed.
pub(super) fn deliver_sealed(conn: &Connection, source: &dyn MessageSource) -> StoreResult<()> {
    let now = unix_now();
    for i in 0..source.len() {
        let m = source.seal(i)?;
        insert(conn, &m, now)?;
    }
    Ok(())
}

fn insert(conn: &Connection, m: &NewMessage, now: i64) -> StoreResult<()> {
    let mut insert_msg = conn
        .prepare_cached(
            "INSERT INTO messages(mailbox_id, uid, size, chunk_count, received_at) VALUES(?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(map_err)?;
    let mut insert_chunk =
        conn.prepare_cached("INSERT INTO message_chunks(message_id, idx, data) VALUES(?1, ?2, ?3)").map_err(map_err)?;
    let mut insert_import =
        conn.prepare_cached("INSERT INTO imports(mailbox_id, source_key) VALUES(?1, ?2)").map_err(map_err)?;
    insert_msg
        .execute(params![m.mailbox_id.raw(), &m.uid[..], m.size as i64, m.chunks.len() as i64, now])
        .map_err(map_err)?;
    let id = conn.last_insert_rowid();
    for (i, c) in m.chunks.iter().enumerate() {
        insert_chunk.execute(params![id, i as i64, c]).map_err(map_err)?;
    }
    if let Some(key) = &m.import_key {
        insert_import.execute(params![m.mailbox_id.raw(), key]).map_err(map_err)?;
    }
    Ok(())
}

pub(super) fn delete(conn: &Connection, mailbox_id: MailboxId, ids: &[MessageId]) -> StoreResult<()> {
    let mut stmt = conn.prepare_cached("DELETE FROM messages WHERE mailbox_id = ?1 AND id = ?2").map_err(map_err)?;
    for id in ids {
        stmt.execute(params![mailbox_id.raw(), id.raw()]).map_err(map_err)?;
    }
    Ok(())
}

pub(super) fn list(conn: &Connection, mailbox_id: MailboxId) -> rusqlite::Result<Vec<MessageMeta>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, uid, size, chunk_count, received_at FROM messages WHERE mailbox_id = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([mailbox_id.raw()], |r| {
        let uid: Vec<u8> = r.get(1)?;
        Ok(MessageMeta {
            id: MessageId::from_raw(r.get(0)?),
            // A malformed uid cannot authenticate, so zeros are safe here:
            // decryption of such a message fails with an integrity error.
            uid: RecordId::try_from(uid.as_slice()).unwrap_or([0u8; 16]),
            size: r.get::<_, i64>(2)? as u64,
            chunk_count: r.get::<_, i64>(3)? as u32,
            received_at: r.get(4)?,
        })
    })?;
    rows.collect()
}

pub(super) fn chunk(conn: &Connection, message_id: MessageId, index: u32) -> rusqlite::Result<StoreResult<Vec<u8>>> {
    let data: Option<Vec<u8>> = conn
        .prepare_cached("SELECT data FROM message_chunks WHERE message_id = ?1 AND idx = ?2")?
        .query_row(params![message_id.raw(), index as i64], |r| r.get(0))
        .optional()?;
    Ok(data.ok_or_else(|| StoreError::Permanent(format!("message {message_id} chunk {index} is missing"))))
}

pub(super) fn imported(conn: &Connection, mailbox_id: MailboxId, keys: Vec<String>) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM imports WHERE mailbox_id = ?1 AND source_key = ?2")?;
    let mut out = Vec::new();
    for k in keys {
        if stmt.exists(params![mailbox_id.raw(), &k])? {
            out.push(k);
        }
    }
    Ok(out)
}

#[async_trait]
impl MessageStore for SqliteStore {
    async fn messages(&self, mailbox_id: MailboxId) -> StoreResult<Vec<MessageMeta>> {
        self.read(move |c| list(c, mailbox_id)).await
    }

    async fn chunk(&self, message_id: MessageId, index: u32) -> StoreResult<Vec<u8>> {
        self.read(move |c| chunk(c, message_id, index)).await?
    }

    async fn deliver(&self, messages: Vec<NewMessage>) -> StoreResult<()> {
        if messages.is_empty() {
            return Ok(());
        }
        self.write(WriteOp::Deliver(messages)).await
    }

    async fn deliver_sealed(&self, source: Arc<dyn MessageSource>) -> StoreResult<()> {
        if source.is_empty() {
            return Ok(());
        }
        self.write(WriteOp::DeliverSealed(source)).await
    }

    async fn delete_messages(
        &self,
        mailbox_id: MailboxId,
        ids: Vec<MessageId>,
        fence: FencingToken,
    ) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.write(WriteOp::Delete { mailbox_id, ids, fence }).await
    }

    async fn imported(&self, mailbox_id: MailboxId, keys: Vec<String>) -> StoreResult<Vec<String>> {
        self.read(move |c| imported(c, mailbox_id, keys)).await
    }
}
