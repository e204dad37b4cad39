//! Messages and their sealed chunks.

use rusqlite::{params, Connection, OptionalExtension};

use super::map_err;
use crate::crypto::RecordId;
use crate::store::{MessageMeta, MessageSource, NewMessage, StoreError, StoreResult};
use crate::types::unix_now;

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
        .execute(params![m.mailbox_id, &m.uid[..], m.size as i64, m.chunks.len() as i64, now])
        .map_err(map_err)?;
    let id = conn.last_insert_rowid();
    for (i, c) in m.chunks.iter().enumerate() {
        insert_chunk.execute(params![id, i as i64, c]).map_err(map_err)?;
    }
    if let Some(key) = &m.import_key {
        insert_import.execute(params![m.mailbox_id, key]).map_err(map_err)?;
    }
    Ok(())
}

pub(super) fn delete(conn: &Connection, mailbox_id: i64, ids: &[i64]) -> StoreResult<()> {
    let mut stmt = conn.prepare_cached("DELETE FROM messages WHERE mailbox_id = ?1 AND id = ?2").map_err(map_err)?;
    for id in ids {
        stmt.execute(params![mailbox_id, id]).map_err(map_err)?;
    }
    Ok(())
}

pub(super) fn list(conn: &Connection, mailbox_id: i64) -> rusqlite::Result<Vec<MessageMeta>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, uid, size, chunk_count, received_at FROM messages WHERE mailbox_id = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([mailbox_id], |r| {
        let uid: Vec<u8> = r.get(1)?;
        Ok(MessageMeta {
            id: r.get(0)?,
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

pub(super) fn chunk(conn: &Connection, message_id: i64, index: u32) -> rusqlite::Result<StoreResult<Vec<u8>>> {
    let data: Option<Vec<u8>> = conn
        .prepare_cached("SELECT data FROM message_chunks WHERE message_id = ?1 AND idx = ?2")?
        .query_row(params![message_id, index as i64], |r| r.get(0))
        .optional()?;
    Ok(data.ok_or_else(|| StoreError::Permanent(format!("message {message_id} chunk {index} is missing"))))
}

pub(super) fn imported(conn: &Connection, mailbox_id: i64, keys: Vec<String>) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM imports WHERE mailbox_id = ?1 AND source_key = ?2")?;
    let mut out = Vec::new();
    for k in keys {
        if stmt.exists(params![mailbox_id, &k])? {
            out.push(k);
        }
    }
    Ok(out)
}
