//! The audit log's records and signed checkpoints ([`AuditStore`]).
//!
//! An append reads the tail and inserts the next record in the same write
//! transaction (the writer thread's, under SQLite's write lock), so two
//! processes appending at once (the server and a CLI command) still build
//! one chain without gaps. The MAC is computed by the caller's
//! [`AuditChain`]: the key never reaches the backend.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{map_err, SqliteStore, WriteOp};
use crate::store::{AuditChain, AuditCheckpoint, AuditFilter, AuditStore, StoreError, StoreResult, StoredAuditRecord};

/// Most records one query or range read returns, whatever the caller asks.
pub const MAX_AUDIT_ROWS: usize = 10_000;

/// Where the writer thread leaves the record it appended.
pub(super) type AuditSlot = Arc<Mutex<Option<StoredAuditRecord>>>;

const COLUMNS: &str = "seq, time, actor, source, action, target, outcome, before, after, mac";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredAuditRecord> {
    Ok(StoredAuditRecord {
        seq: r.get(0)?,
        time: r.get(1)?,
        actor: r.get(2)?,
        source: r.get(3)?,
        action: r.get(4)?,
        target: r.get(5)?,
        outcome: r.get(6)?,
        before: r.get(7)?,
        after: r.get(8)?,
        mac: r.get(9)?,
    })
}

pub(super) fn append(
    conn: &Connection,
    record: &StoredAuditRecord,
    chain: &dyn AuditChain,
    out: &AuditSlot,
) -> StoreResult<()> {
    let tail: Option<(i64, Vec<u8>)> = conn
        .query_row("SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(map_err)?;
    let mut record = record.clone();
    record.seq = tail.as_ref().map_or(1, |(seq, _)| seq + 1);
    record.mac = Vec::new();
    record.mac = chain.mac(tail.as_ref().map(|(_, mac)| mac.as_slice()), &record);
    conn.execute(
        &format!("INSERT INTO audit_log({COLUMNS}) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
        params![
            record.seq,
            record.time,
            record.actor,
            record.source,
            record.action,
            record.target,
            record.outcome,
            record.before,
            record.after,
            record.mac
        ],
    )
    .map_err(map_err)?;
    *out.lock().map_err(|_| StoreError::Permanent("audit slot poisoned".into()))? = Some(record);
    Ok(())
}

pub(super) fn put_checkpoint(conn: &Connection, c: &AuditCheckpoint) -> StoreResult<()> {
    conn.execute(
        "INSERT OR IGNORE INTO audit_checkpoints(seq, mac, time, signature) VALUES(?1, ?2, ?3, ?4)",
        params![c.seq, c.mac, c.time, c.signature],
    )
    .map(drop)
    .map_err(map_err)
}

fn checkpoint(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditCheckpoint> {
    Ok(AuditCheckpoint { seq: r.get(0)?, mac: r.get(1)?, time: r.get(2)?, signature: r.get(3)? })
}

fn query(conn: &Connection, f: &AuditFilter) -> rusqlite::Result<Vec<StoredAuditRecord>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM audit_log
         WHERE (?1 IS NULL OR time >= ?1) AND (?2 IS NULL OR time < ?2)
           AND (?3 IS NULL OR actor = ?3 OR substr(actor, 1, length(?3) + 1) = ?3 || '@')
           AND (?4 IS NULL OR action = ?4 OR substr(action, 1, length(?4) + 1) = ?4 || '.')
           AND (?5 IS NULL OR seq < ?5)
         ORDER BY seq DESC LIMIT ?6"
    ))?;
    let limit = f.limit.min(MAX_AUDIT_ROWS) as i64;
    let rows = stmt.query_map(params![f.since, f.until, f.actor, f.action, f.before_seq, limit], row)?;
    rows.collect()
}

#[async_trait]
impl AuditStore for SqliteStore {
    async fn append_audit(
        &self,
        record: StoredAuditRecord,
        chain: Arc<dyn AuditChain>,
    ) -> StoreResult<StoredAuditRecord> {
        let out: AuditSlot = Arc::new(Mutex::new(None));
        self.write(WriteOp::AppendAudit { record, chain, out: out.clone() }).await?;
        let stored = out.lock().map_err(|_| StoreError::Permanent("audit slot poisoned".into()))?.take();
        stored.ok_or_else(|| StoreError::Permanent("audit append committed no record".into()))
    }

    async fn audit_tail(&self) -> StoreResult<Option<(i64, Vec<u8>)>> {
        self.read(|c| {
            c.query_row("SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .await
    }

    async fn audit_range(&self, after_seq: i64, limit: usize) -> StoreResult<Vec<StoredAuditRecord>> {
        let limit = limit.min(MAX_AUDIT_ROWS) as i64;
        self.read(move |c| {
            let mut stmt =
                c.prepare_cached(&format!("SELECT {COLUMNS} FROM audit_log WHERE seq > ?1 ORDER BY seq LIMIT ?2"))?;
            let rows = stmt.query_map(params![after_seq, limit], row)?;
            rows.collect()
        })
        .await
    }

    async fn audit_query(&self, filter: AuditFilter) -> StoreResult<Vec<StoredAuditRecord>> {
        self.read(move |c| query(c, &filter)).await
    }

    async fn put_audit_checkpoint(&self, checkpoint: AuditCheckpoint) -> StoreResult<()> {
        self.write(WriteOp::PutAuditCheckpoint(checkpoint)).await
    }

    async fn audit_checkpoints(&self) -> StoreResult<Vec<AuditCheckpoint>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT seq, mac, time, signature FROM audit_checkpoints ORDER BY seq")?;
            let rows = stmt.query_map([], checkpoint)?;
            rows.collect()
        })
        .await
    }

    async fn last_audit_checkpoint(&self) -> StoreResult<Option<AuditCheckpoint>> {
        self.read(|c| {
            c.query_row(
                "SELECT seq, mac, time, signature FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
                [],
                checkpoint,
            )
            .optional()
        })
        .await
    }
}
