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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::prelude::*;

    struct Counting;
    impl AuditChain for Counting {
        fn mac(&self, prev: Option<&[u8]>, _: &StoredAuditRecord) -> Vec<u8> {
            vec![prev.map_or(0, |p| p[0] + 1)]
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_store_of_schema_8_upgrades_in_place_to_the_audit_log() {
        let dir = std::env::temp_dir().join(format!("p3x-audit-upgrade-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("s.db");
        {
            // A store as version 8 wrote it (no audit tables), with a user.
            let conn = Connection::open(&db).unwrap();
            let base = super::super::SCHEMA;
            conn.execute_batch(&base[..base.find("CREATE TABLE IF NOT EXISTS audit_log").unwrap()]).unwrap();
            for (_, step) in super::super::MIGRATIONS.iter().filter(|(v, _)| *v <= 8) {
                conn.execute_batch(step).unwrap();
            }
            conn.execute_batch(
                "PRAGMA user_version = 8;
                 INSERT INTO users(name, password_hash, disabled, created_at, password_changed_at)
                     VALUES('alice', 'h', 0, 1, 1);
                 INSERT INTO mailboxes(user_id, uid, wrapped_key) VALUES(1, zeroblob(16), x'01');",
            )
            .unwrap();
            let audit: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'audit_log'", [], |r| r.get(0))
                .unwrap();
            assert_eq!(audit, 0);
        }
        let store = SqliteStore::open(&db).unwrap();
        let version: i64 = store.read(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0))).await.unwrap();
        assert_eq!(version, super::super::SCHEMA_VERSION);
        assert!(store.user(&crate::types::UserName::parse("alice").unwrap()).await.unwrap().is_some());
        let record = StoredAuditRecord {
            seq: 0,
            time: 1,
            actor: "cli".into(),
            source: None,
            action: "user.add".into(),
            target: "bob".into(),
            outcome: "attempt".into(),
            before: None,
            after: None,
            mac: Vec::new(),
        };
        let stored = store.append_audit(record, Arc::new(Counting)).await.unwrap();
        assert_eq!((stored.seq, stored.mac), (1, vec![0]));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
