//! Connector state: seen UIDLs, duplicate keys, run status, CLI accounts and
//! sealed per-account secrets.

use rusqlite::{params, Connection, OptionalExtension};

use super::{map_err, message};
use crate::store::{ConnectorCommit, ConnectorStatus, DedupKey, SeenUid, StoreError, StoreResult};
use crate::types::unix_now;

pub(super) fn commit(conn: &Connection, c: &ConnectorCommit) -> StoreResult<()> {
    let now = c.at;
    let mut known = conn.prepare_cached("SELECT 1 FROM connector_dedup WHERE key = ?1").map_err(map_err)?;
    let mut remember =
        conn.prepare_cached("INSERT OR IGNORE INTO connector_dedup(key, at) VALUES(?1, ?2)").map_err(map_err)?;
    for (key, msg) in &c.deliveries {
        if let Some(k) = key {
            if known.exists([&k[..]]).map_err(map_err)? {
                continue;
            }
            remember.execute(params![&k[..], now]).map_err(map_err)?;
        }
        message::deliver(conn, std::slice::from_ref(msg))?;
    }
    for k in &c.keys {
        remember.execute(params![&k[..], now]).map_err(map_err)?;
    }
    if let Some(uidl) = &c.uidl {
        conn.execute(
            "INSERT INTO connector_seen(account, uidl, first_seen, state) VALUES(?1, ?2, ?3, ?4)
             ON CONFLICT(account, uidl) DO UPDATE SET state = excluded.state",
            params![c.account, uidl, now, c.state],
        )
        .map_err(map_err)?;
    }
    Ok(())
}

pub(super) fn seen(conn: &Connection, account: &str) -> rusqlite::Result<Vec<SeenUid>> {
    let mut stmt = conn.prepare_cached("SELECT uidl, first_seen, state FROM connector_seen WHERE account = ?1")?;
    let rows =
        stmt.query_map([account], |r| Ok(SeenUid { uidl: r.get(0)?, first_seen: r.get(1)?, state: r.get(2)? }))?;
    rows.collect()
}

pub(super) fn forget(conn: &Connection, account: &str, uidls: &[String]) -> StoreResult<()> {
    let mut stmt =
        conn.prepare_cached("DELETE FROM connector_seen WHERE account = ?1 AND uidl = ?2").map_err(map_err)?;
    for u in uidls {
        stmt.execute(params![account, u]).map_err(map_err)?;
    }
    Ok(())
}

pub(super) fn resync(conn: &Connection, account: &str, uidls: &[String]) -> StoreResult<()> {
    conn.execute("DELETE FROM connector_seen WHERE account = ?1", [account]).map_err(map_err)?;
    let now = unix_now();
    let mut stmt = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO connector_seen(account, uidl, first_seen, state) VALUES(?1, ?2, ?3, 'delivered')",
        )
        .map_err(map_err)?;
    for u in uidls {
        stmt.execute(params![account, u, now]).map_err(map_err)?;
    }
    Ok(())
}

pub(super) fn dedup_known(conn: &Connection, keys: Vec<DedupKey>) -> rusqlite::Result<Vec<DedupKey>> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM connector_dedup WHERE key = ?1")?;
    let mut out = Vec::new();
    for k in keys {
        if stmt.exists([&k[..]])? {
            out.push(k);
        }
    }
    Ok(out)
}

pub(super) fn status(conn: &Connection, account: &str) -> rusqlite::Result<Option<ConnectorStatus>> {
    conn.query_row(
        "SELECT last_run_at, last_success_at, last_error, failures, fetched_total FROM connector_status
         WHERE account = ?1",
        [account],
        |r| {
            Ok(ConnectorStatus {
                account: account.to_owned(),
                last_run_at: r.get(0)?,
                last_success_at: r.get(1)?,
                last_error: r.get(2)?,
                failures: r.get(3)?,
                fetched_total: r.get::<_, i64>(4)? as u64,
            })
        },
    )
    .optional()
}

pub(super) fn put_status(conn: &Connection, s: &ConnectorStatus) -> StoreResult<()> {
    conn.execute(
        "INSERT OR REPLACE INTO connector_status(account, last_run_at, last_success_at, last_error, failures,
                                                 fetched_total) VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
        params![s.account, s.last_run_at, s.last_success_at, s.last_error, s.failures, s.fetched_total as i64],
    )
    .map(drop)
    .map_err(map_err)
}

pub(super) fn accounts(conn: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached("SELECT name, spec FROM connector_accounts ORDER BY name")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

pub(super) fn add_account(conn: &Connection, name: &str, spec: &str) -> StoreResult<()> {
    match conn.execute(
        "INSERT INTO connector_accounts(name, spec, created_at) VALUES(?1, ?2, ?3)",
        params![name, spec, unix_now()],
    ) {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            Err(StoreError::UserExists)
        }
        Err(e) => Err(map_err(e)),
    }
}

pub(super) fn remove_account(conn: &Connection, name: &str) -> StoreResult<()> {
    let n = conn.execute("DELETE FROM connector_accounts WHERE name = ?1", [name]).map_err(map_err)?;
    if n == 0 {
        return Err(StoreError::NoSuchUser);
    }
    for table in ["connector_seen", "connector_status", "connector_secrets"] {
        conn.execute(&format!("DELETE FROM {table} WHERE account = ?1"), [name]).map_err(map_err)?;
    }
    Ok(())
}

pub(super) fn secret(conn: &Connection, account: &str, kind: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row(
        "SELECT sealed FROM connector_secrets WHERE account = ?1 AND kind = ?2",
        params![account, kind],
        |r| r.get(0),
    )
    .optional()
}

pub(super) fn put_secret(conn: &Connection, account: &str, kind: &str, sealed: &[u8]) -> StoreResult<()> {
    conn.execute(
        "INSERT OR REPLACE INTO connector_secrets(account, kind, sealed, updated_at) VALUES(?1, ?2, ?3, ?4)",
        params![account, kind, sealed, unix_now()],
    )
    .map(drop)
    .map_err(map_err)
}
