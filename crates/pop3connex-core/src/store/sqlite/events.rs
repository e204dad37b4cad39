//! The local event store ([`EventStore`]): telemetry events kept for
//! investigations, indexed by time, account, address and name.
//!
//! Batches arrive from [`crate::telemetry::store`] through the writer
//! thread (one transaction per batch, grouped with other writes like every
//! write); retention deletes by age, then by count, in bounded steps so a
//! large backlog never holds the write lock for long.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{params, Connection};

use super::{map_err, SqliteStore, WriteOp};
use crate::store::{EventFilter, EventStore, StoreResult, StoredEvent};

/// Most events one search returns, whatever the caller asks.
pub const MAX_EVENT_ROWS: usize = 10_000;
/// Most rows one prune step deletes (one write transaction).
const PRUNE_STEP: i64 = 20_000;

pub(super) const TABLES: &str = "
CREATE TABLE IF NOT EXISTS events(seq INTEGER PRIMARY KEY AUTOINCREMENT, time INTEGER NOT NULL,
                                  code INTEGER NOT NULL, name TEXT NOT NULL, severity INTEGER NOT NULL,
                                  user TEXT, ip TEXT, message TEXT NOT NULL, fields TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_time ON events(time);
CREATE INDEX IF NOT EXISTS events_by_user ON events(user, seq) WHERE user IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_by_ip ON events(ip, seq) WHERE ip IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_by_name ON events(name, seq);
";

const COLUMNS: &str = "seq, time, code, name, severity, user, ip, message, fields";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        seq: r.get(0)?,
        time: r.get(1)?,
        code: r.get(2)?,
        name: r.get(3)?,
        severity: r.get(4)?,
        user: r.get(5)?,
        ip: r.get(6)?,
        message: r.get(7)?,
        fields: r.get(8)?,
    })
}

pub(super) fn append(conn: &Connection, batch: &[StoredEvent]) -> StoreResult<()> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO events(time, code, name, severity, user, ip, message, fields)
             VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .map_err(map_err)?;
    for e in batch {
        stmt.execute(params![e.time, e.code, e.name, e.severity, e.user, e.ip, e.message, e.fields])
            .map_err(map_err)?;
    }
    Ok(())
}

/// One bounded prune step: events older than `before`, then the oldest
/// beyond `keep_at_most`. The caller repeats while a step deleted a full
/// [`PRUNE_STEP`].
pub(super) fn prune(conn: &Connection, before: i64, keep_at_most: u64, out: &Arc<AtomicU64>) -> StoreResult<()> {
    let aged = conn
        .execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE time < ?1 ORDER BY seq LIMIT ?2)",
            params![before, PRUNE_STEP],
        )
        .map_err(map_err)?;
    let mut deleted = aged as u64;
    if (aged as i64) < PRUNE_STEP {
        // Rows beyond the cap: the one with `keep_at_most` newer rows and
        // everything older (NULL, so nothing, when there are fewer rows).
        let keep = i64::try_from(keep_at_most).unwrap_or(i64::MAX);
        let over = conn
            .execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE seq <=
                     (SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET ?1) ORDER BY seq LIMIT ?2)",
                params![keep, PRUNE_STEP - aged as i64],
            )
            .map_err(map_err)?;
        deleted += over as u64;
    }
    out.store(deleted, Ordering::Relaxed);
    Ok(())
}

fn search(conn: &Connection, f: &EventFilter) -> rusqlite::Result<Vec<StoredEvent>> {
    // Names are matched with a JSON array (any number of them, one statement).
    let names = if f.names.is_empty() { None } else { Some(serde_json::Value::from(f.names.clone()).to_string()) };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM events
         WHERE (?1 IS NULL OR time >= ?1) AND (?2 IS NULL OR time < ?2)
           AND (?3 IS NULL OR user = ?3) AND (?4 IS NULL OR ip = ?4)
           AND (?5 IS NULL OR name IN (SELECT value FROM json_each(?5)))
           AND (?6 IS NULL OR seq < ?6)
         ORDER BY seq DESC LIMIT ?7"
    ))?;
    let limit = f.limit.min(MAX_EVENT_ROWS) as i64;
    let rows = stmt.query_map(params![f.since, f.until, f.user, f.ip, names, f.before_seq, limit], row)?;
    rows.collect()
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn append_events(&self, events: Vec<StoredEvent>) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.write(WriteOp::AppendEvents(events)).await
    }

    async fn search_events(&self, filter: EventFilter) -> StoreResult<Vec<StoredEvent>> {
        self.read(move |c| search(c, &filter)).await
    }

    async fn prune_events(&self, before: i64, keep_at_most: u64) -> StoreResult<u64> {
        let mut total = 0;
        loop {
            let out = Arc::new(AtomicU64::new(0));
            self.write(WriteOp::PruneEvents { before, keep_at_most, out: out.clone() }).await?;
            let n = out.load(Ordering::Relaxed);
            total += n;
            if n < PRUNE_STEP as u64 {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(time: i64, name: &str, user: Option<&str>, ip: Option<&str>) -> StoredEvent {
        StoredEvent {
            seq: 0,
            time,
            code: 101,
            name: name.into(),
            severity: 4,
            user: user.map(Into::into),
            ip: ip.map(Into::into),
            message: "login failed".into(),
            fields: "{}".into(),
        }
    }

    fn temp_store(tag: &str) -> (std::path::PathBuf, SqliteStore) {
        let dir = std::env::temp_dir().join(format!("p3x-events-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = SqliteStore::open(&dir.join("s.db")).unwrap();
        (dir, store)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn search_filters_by_user_address_name_and_time_newest_first() {
        let (dir, store) = temp_store("search");
        store
            .append_events(vec![
                ev(1_000, "auth_failure", Some("alice"), Some("192.0.2.7")),
                ev(2_000, "auth_success", Some("alice"), Some("192.0.2.7")),
                ev(3_000, "auth_failure", Some("bob"), Some("198.51.100.1")),
                ev(4_000, "ban", None, Some("192.0.2.7")),
            ])
            .await
            .unwrap();
        let all = |f: EventFilter| {
            let s = &store;
            async move { s.search_events(EventFilter { limit: 100, ..f }).await.unwrap() }
        };
        let names = |v: Vec<StoredEvent>| v.into_iter().map(|e| (e.time, e.name)).collect::<Vec<_>>();
        assert_eq!(all(EventFilter::default()).await.len(), 4);
        assert_eq!(
            names(all(EventFilter { user: Some("alice".into()), ..Default::default() }).await),
            [(2_000, "auth_success".to_string()), (1_000, "auth_failure".to_string())]
        );
        assert_eq!(
            names(
                all(EventFilter { ip: Some("192.0.2.7".into()), names: vec!["ban".into()], ..Default::default() })
                    .await
            ),
            [(4_000, "ban".to_string())]
        );
        assert_eq!(all(EventFilter { since: Some(2_000), until: Some(4_000), ..Default::default() }).await.len(), 2);
        assert_eq!(
            all(EventFilter { names: vec!["auth_failure".into(), "ban".into()], ..Default::default() }).await.len(),
            3
        );
        // Paging backwards from the oldest seen.
        let page = store.search_events(EventFilter { limit: 2, ..Default::default() }).await.unwrap();
        let rest = all(EventFilter { before_seq: Some(page[1].seq), ..Default::default() }).await;
        assert_eq!(names(rest), [(2_000, "auth_success".to_string()), (1_000, "auth_failure".to_string())]);
        // Hostile input is data, not SQL.
        assert!(all(EventFilter { user: Some("x' OR '1'='1".into()), ..Default::default() }).await.is_empty());
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn retention_prunes_by_age_then_by_count() {
        let (dir, store) = temp_store("prune");
        store.append_events((0..50).map(|i| ev(i * 10, "auth_failure", None, None)).collect()).await.unwrap();
        // Age: everything before t=200 goes (20 events).
        assert_eq!(store.prune_events(200, 1_000).await.unwrap(), 20);
        // Count: at most 10 of the remaining 30 stay, the newest.
        assert_eq!(store.prune_events(0, 10).await.unwrap(), 20);
        let left = store.search_events(EventFilter { limit: 100, ..Default::default() }).await.unwrap();
        assert_eq!(left.iter().map(|e| e.time).collect::<Vec<_>>(), (40..50).rev().map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(store.prune_events(0, 10).await.unwrap(), 0, "nothing more to prune");
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_store_of_schema_10_upgrades_in_place_to_the_event_store() {
        let (dir, store) = temp_store("upgrade");
        drop(store);
        let db = dir.join("s.db");
        {
            // Back to version 10: as the previous release left it.
            let conn = Connection::open(&db).unwrap();
            conn.execute_batch("DROP TABLE events; PRAGMA user_version = 10;").unwrap();
        }
        let store = SqliteStore::open(&db).unwrap();
        let version: i64 = store.read(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0))).await.unwrap();
        assert_eq!(version, super::super::SCHEMA_VERSION);
        store.append_events(vec![ev(1, "ban", None, Some("192.0.2.1"))]).await.unwrap();
        assert_eq!(store.search_events(EventFilter { limit: 10, ..Default::default() }).await.unwrap().len(), 1);
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }
}
