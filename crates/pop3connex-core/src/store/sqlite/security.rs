//! Bans and lockouts.

use rusqlite::{params, Connection};

use super::map_err;
use crate::store::{BanRecord, LockoutRecord, StoreError, StoreResult};

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
         WHERE expires_at IS NULL OR expires_at > ?1 ORDER BY created_at",
    )?;
    let rows = stmt.query_map([now], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (network, reason, created_at, expires_at, offences) = row?;
        // Rows are written from parsed networks; skip any that is not.
        if let Ok(network) = network.parse() {
            out.push(BanRecord { network, reason, created_at, expires_at, offences });
        }
    }
    Ok(out)
}

pub(super) fn lockouts(conn: &Connection) -> rusqlite::Result<Vec<LockoutRecord>> {
    let now = crate::types::unix_now();
    let mut stmt =
        conn.prepare_cached("SELECT user, since, until, count FROM lockouts WHERE until > ?1 ORDER BY since")?;
    let rows = stmt.query_map([now], |r| {
        Ok(LockoutRecord { user: r.get(0)?, since: r.get(1)?, until: r.get(2)?, count: r.get(3)? })
    })?;
    rows.collect()
}
