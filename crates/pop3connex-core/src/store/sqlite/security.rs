//! Bans, lockouts and the known addresses that lockouts spare
//! ([`SecurityStore`]).
//!
//! Every periodic read is bounded ([`MAX_SECURITY_ROWS`], newest first) and
//! uses an index on the expiry column; expired rows are deleted by
//! [`purge`] instead of being skipped on every read.

use async_trait::async_trait;
use rusqlite::{params, Connection};

use super::{map_err, SqliteStore, WriteOp};
use crate::store::{
    BanRecord, KnownAddress, LockoutRecord, SecurityStore, StoreError, StoreResult, KNOWN_ADDRESSES_PER_ACCOUNT,
    MAX_SECURITY_ROWS,
};
use crate::types::normalise_user_name;

pub(super) fn put_ban(conn: &Connection, b: &BanRecord) -> StoreResult<()> {
    conn.execute(
        "INSERT OR REPLACE INTO bans(network, reason, created_at, expires_at, offences) VALUES(?1, ?2, ?3, ?4, ?5)",
        params![b.network.to_string(), b.reason, b.created_at, b.expires_at, b.offences],
    )
    .map(drop)
    .map_err(map_err)
}

pub(super) fn put_lockout(conn: &Connection, l: &LockoutRecord) -> StoreResult<()> {
    conn.execute(
        "INSERT OR REPLACE INTO lockouts(user, since, until, count) VALUES(?1, ?2, ?3, ?4)",
        params![l.user, l.since, l.until, l.count],
    )
    .map(drop)
    .map_err(map_err)
}

/// Runs a one-parameter DELETE; `NoSuchUser` stands for "nothing matched".
pub(super) fn remove(conn: &Connection, sql: &str, key: &str) -> StoreResult<()> {
    match conn.execute(sql, [key]).map_err(map_err)? {
        0 => Err(StoreError::NoSuchUser),
        _ => Ok(()),
    }
}

pub(super) fn bans(conn: &Connection) -> rusqlite::Result<Vec<BanRecord>> {
    let now = crate::types::unix_now();
    let mut stmt = conn.prepare_cached(
        "SELECT network, reason, created_at, expires_at, offences FROM bans
         WHERE expires_at IS NULL OR expires_at > ?1 ORDER BY created_at DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![now, MAX_SECURITY_ROWS as i64], |r| {
        Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (network, reason, created_at, expires_at, offences) = row?;
        // Rows are written from parsed networks; skip any that is not.
        if let Ok(network) = network.parse() {
            out.push(BanRecord { network, reason, created_at, expires_at, offences });
        }
    }
    out.reverse();
    Ok(out)
}

pub(super) fn lockouts(conn: &Connection) -> rusqlite::Result<Vec<LockoutRecord>> {
    let now = crate::types::unix_now();
    let mut stmt = conn.prepare_cached(
        "SELECT user, since, until, count FROM lockouts WHERE until > ?1 ORDER BY since DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![now, MAX_SECURITY_ROWS as i64], |r| {
        Ok(LockoutRecord { user: r.get(0)?, since: r.get(1)?, until: r.get(2)?, count: r.get(3)? })
    })?;
    let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    out.reverse();
    Ok(out)
}

pub(super) fn put_known(conn: &Connection, k: &KnownAddress) -> StoreResult<()> {
    conn.execute(
        "INSERT INTO known_addresses(user, network, last_seen) VALUES(?1, ?2, ?3)
         ON CONFLICT(user, network) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
        params![k.user, k.network.to_string(), k.last_seen],
    )
    .map_err(map_err)?;
    conn.execute(
        "DELETE FROM known_addresses WHERE user = ?1 AND network NOT IN
           (SELECT network FROM known_addresses WHERE user = ?1 ORDER BY last_seen DESC LIMIT ?2)",
        params![k.user, KNOWN_ADDRESSES_PER_ACCOUNT as i64],
    )
    .map(drop)
    .map_err(map_err)
}

pub(super) fn locked_known(conn: &Connection, now: i64, since: i64) -> rusqlite::Result<Vec<KnownAddress>> {
    let mut stmt = conn.prepare_cached(
        "SELECT k.user, k.network, k.last_seen FROM known_addresses k JOIN lockouts l ON l.user = k.user
         WHERE l.until > ?1 AND k.last_seen >= ?2 ORDER BY k.last_seen DESC LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![now, since, MAX_SECURITY_ROWS as i64], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (user, network, last_seen) = row?;
        if let Ok(network) = network.parse() {
            out.push(KnownAddress { user, network, last_seen });
        }
    }
    Ok(out)
}

/// Deletes expired bans and lockouts and stale known addresses.
pub(super) fn purge(conn: &Connection, now: i64, known_before: i64) -> StoreResult<()> {
    conn.execute("DELETE FROM bans WHERE expires_at IS NOT NULL AND expires_at <= ?1", [now]).map_err(map_err)?;
    conn.execute("DELETE FROM lockouts WHERE until <= ?1", [now]).map_err(map_err)?;
    conn.execute("DELETE FROM known_addresses WHERE last_seen < ?1", [known_before]).map(drop).map_err(map_err)
}

#[async_trait]
impl SecurityStore for SqliteStore {
    async fn bans(&self) -> StoreResult<Vec<BanRecord>> {
        self.read(bans).await
    }

    async fn put_ban(&self, ban: BanRecord) -> StoreResult<()> {
        self.write(WriteOp::PutBan(ban)).await
    }

    async fn remove_ban(&self, network: ipnet::IpNet) -> StoreResult<bool> {
        self.write_existed(WriteOp::RemoveBan(network.to_string())).await
    }

    async fn lockouts(&self) -> StoreResult<Vec<LockoutRecord>> {
        self.read(lockouts).await
    }

    async fn put_lockout(&self, lockout: LockoutRecord) -> StoreResult<()> {
        self.write(WriteOp::PutLockout(lockout)).await
    }

    async fn remove_lockout(&self, user: &str) -> StoreResult<bool> {
        self.write_existed(WriteOp::RemoveLockout(normalise_user_name(user))).await
    }

    async fn put_known_address(&self, known: KnownAddress) -> StoreResult<()> {
        self.write(WriteOp::PutKnownAddress(known)).await
    }

    async fn locked_known_addresses(&self, now: i64, since: i64) -> StoreResult<Vec<KnownAddress>> {
        self.read(move |c| locked_known(c, now, since)).await
    }

    async fn purge_security(&self, now: i64, known_before: i64) -> StoreResult<()> {
        self.write(WriteOp::PurgeSecurity { now, known_before }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(super::super::SCHEMA).unwrap();
        super::super::migrate(&conn, 1).unwrap();
        conn
    }

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_store_of_the_previous_schema_upgrades_in_place_to_known_addresses() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(super::super::SCHEMA).unwrap();
        for (_, step) in super::super::MIGRATIONS.iter().filter(|(v, _)| *v < 7) {
            conn.execute_batch(step).unwrap();
        }
        conn.execute_batch("PRAGMA user_version = 6").unwrap();
        let ban = BanRecord {
            network: "192.0.2.1/32".parse().unwrap(),
            reason: "old".into(),
            created_at: 1,
            expires_at: None,
            offences: 1,
        };
        put_ban(&conn, &ban).unwrap();
        super::super::migrate(&conn, 6).unwrap();
        assert_eq!(bans(&conn).unwrap(), vec![ban], "existing rows kept");
        let k = KnownAddress { user: "alice".into(), network: "192.0.2.1/32".parse().unwrap(), last_seen: 10 };
        put_known(&conn, &k).unwrap();
        put_lockout(&conn, &LockoutRecord { user: "alice".into(), since: 1, until: i64::MAX, count: 1 }).unwrap();
        assert_eq!(locked_known(&conn, 5, 0).unwrap(), vec![k]);
    }

    #[test]
    fn expired_ban_and_lockout_rows_are_purged_not_reread_forever() {
        let conn = db();
        let now = 1_000_000;
        for i in 0..50u8 {
            let network = format!("192.0.2.{i}/32").parse().unwrap();
            let expires_at = Some(if i < 40 { now - 1 } else { now + 100 });
            put_ban(&conn, &BanRecord { network, reason: "t".into(), created_at: now - 10, expires_at, offences: 1 })
                .unwrap();
            let until = if i < 40 { now } else { now + 100 };
            put_lockout(&conn, &LockoutRecord { user: format!("u{i}"), since: now - 10, until, count: 1 }).unwrap();
        }
        let permanent = BanRecord {
            network: "198.51.100.0/24".parse().unwrap(),
            reason: "cli".into(),
            created_at: now - 10,
            expires_at: None,
            offences: 1,
        };
        put_ban(&conn, &permanent).unwrap();
        put_known(&conn, &KnownAddress { user: "old".into(), network: "192.0.2.1/32".parse().unwrap(), last_seen: 5 })
            .unwrap();
        put_known(
            &conn,
            &KnownAddress { user: "new".into(), network: "192.0.2.1/32".parse().unwrap(), last_seen: now },
        )
        .unwrap();
        purge(&conn, now, now - 100).unwrap();
        assert_eq!(count(&conn, "bans"), 11, "10 active + 1 permanent ban rows left");
        assert_eq!(count(&conn, "lockouts"), 10);
        assert_eq!(count(&conn, "known_addresses"), 1, "stale known address purged");
    }

    #[test]
    fn periodic_reread_of_bans_and_lockouts_is_bounded_to_the_newest() {
        let conn = db();
        let future = crate::types::unix_now() + 86_400;
        conn.execute_batch("BEGIN").unwrap();
        for i in 0..MAX_SECURITY_ROWS as i64 + 5 {
            let network = std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32)).into();
            put_ban(
                &conn,
                &BanRecord { network, reason: "t".into(), created_at: i, expires_at: Some(future), offences: 1 },
            )
            .unwrap();
            put_lockout(&conn, &LockoutRecord { user: format!("u{i}"), since: i, until: future, count: 1 }).unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
        let bans = bans(&conn).unwrap();
        assert_eq!(bans.len(), MAX_SECURITY_ROWS);
        assert_eq!(bans[0].created_at, 5, "the oldest rows are left out");
        let lockouts = lockouts(&conn).unwrap();
        assert_eq!(lockouts.len(), MAX_SECURITY_ROWS);
        assert_eq!(lockouts.last().unwrap().since, MAX_SECURITY_ROWS as i64 + 4, "the newest are read");
    }

    #[test]
    fn known_addresses_are_bounded_per_account() {
        let conn = db();
        for i in 0..40i64 {
            let network = format!("192.0.2.{i}/32").parse().unwrap();
            put_known(&conn, &KnownAddress { user: "alice".into(), network, last_seen: 1000 + i }).unwrap();
        }
        put_known(&conn, &KnownAddress { user: "bob".into(), network: "192.0.2.1/32".parse().unwrap(), last_seen: 1 })
            .unwrap();
        assert_eq!(count(&conn, "known_addresses"), KNOWN_ADDRESSES_PER_ACCOUNT as i64 + 1);
        let oldest: i64 = conn
            .query_row("SELECT min(last_seen) FROM known_addresses WHERE user = 'alice'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(oldest, 1000 + 40 - KNOWN_ADDRESSES_PER_ACCOUNT as i64, "the newest are kept");
        // Only accounts under a lockout are re-read.
        assert!(locked_known(&conn, 2000, 0).unwrap().is_empty());
        put_lockout(&conn, &LockoutRecord { user: "alice".into(), since: 1, until: 3000, count: 1 }).unwrap();
        let read = locked_known(&conn, 2000, 1030).unwrap();
        assert_eq!(read.len(), 10, "locked account's addresses seen since 1030");
        assert!(read.iter().all(|k| k.user == "alice"));
    }
}
