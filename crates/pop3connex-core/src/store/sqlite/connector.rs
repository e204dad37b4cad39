//! Connector state: seen UIDLs, duplicate keys, run status, CLI accounts and
//! sealed per-account secrets ([`ConnectorStore`]). The writes of a run
//! are fenced by the account's lease (checked in `super::apply`).

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{map_err, message, SqliteStore, WriteOp};
use crate::store::{
    ConnectorCommit, ConnectorStatus, ConnectorStore, DedupKey, FencingToken, SeenState, SeenUid, StoreError,
    StoreResult,
};
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
            params![c.account, uidl, now, c.state.as_str()],
        )
        .map_err(map_err)?;
    }
    Ok(())
}

pub(super) fn seen(conn: &Connection, account: &str) -> rusqlite::Result<Vec<SeenUid>> {
    let mut stmt = conn.prepare_cached("SELECT uidl, first_seen, state FROM connector_seen WHERE account = ?1")?;
    let rows = stmt.query_map([account], |r| {
        let state: String = r.get(2)?;
        // Only this file writes states; an unknown one is kept as the
        // harmless choice (never deleted upstream by the delete policy).
        let state = SeenState::parse(&state).unwrap_or(SeenState::Oversize);
        Ok(SeenUid { uidl: r.get(0)?, first_seen: r.get(1)?, state })
    })?;
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

#[async_trait]
impl ConnectorStore for SqliteStore {
    async fn connector_seen(&self, account: &str) -> StoreResult<Vec<SeenUid>> {
        let account = account.to_owned();
        self.read(move |c| seen(c, &account)).await
    }

    async fn connector_commit(&self, commit: ConnectorCommit, fence: FencingToken) -> StoreResult<()> {
        self.write(WriteOp::ConnectorCommit(commit, fence)).await
    }

    async fn connector_forget(&self, account: &str, uidls: Vec<String>, fence: FencingToken) -> StoreResult<()> {
        if uidls.is_empty() {
            return Ok(());
        }
        self.write(WriteOp::ConnectorForget { account: account.to_owned(), uidls, fence }).await
    }

    async fn connector_resync(&self, account: &str, uidls: Vec<String>, fence: FencingToken) -> StoreResult<()> {
        self.write(WriteOp::ConnectorResync { account: account.to_owned(), uidls, fence }).await
    }

    async fn dedup_known(&self, keys: Vec<DedupKey>) -> StoreResult<Vec<DedupKey>> {
        self.read(move |c| dedup_known(c, keys)).await
    }

    async fn dedup_prune(&self, before: i64) -> StoreResult<()> {
        self.write(WriteOp::DedupPrune(before)).await
    }

    async fn connector_status(&self, account: &str) -> StoreResult<Option<ConnectorStatus>> {
        let account = account.to_owned();
        self.read(move |c| status(c, &account)).await
    }

    async fn put_connector_status(&self, status: ConnectorStatus, fence: FencingToken) -> StoreResult<()> {
        self.write(WriteOp::PutConnectorStatus(status, fence)).await
    }

    async fn connector_accounts(&self) -> StoreResult<Vec<(String, String)>> {
        self.read(accounts).await
    }

    async fn add_connector_account(&self, name: &str, toml: &str) -> StoreResult<()> {
        self.write(WriteOp::AddConnectorAccount { name: name.to_owned(), spec: toml.to_owned() }).await
    }

    async fn remove_connector_account(&self, name: &str) -> StoreResult<bool> {
        self.write_existed(WriteOp::RemoveConnectorAccount(name.to_owned())).await
    }

    async fn connector_secret(&self, account: &str, kind: &str) -> StoreResult<Option<Vec<u8>>> {
        let (account, kind) = (account.to_owned(), kind.to_owned());
        self.read(move |c| secret(c, &account, &kind)).await
    }

    async fn put_connector_secret(&self, account: &str, kind: &str, sealed: Vec<u8>) -> StoreResult<()> {
        self.write(WriteOp::PutConnectorSecret { account: account.to_owned(), kind: kind.to_owned(), sealed }).await
    }
}
