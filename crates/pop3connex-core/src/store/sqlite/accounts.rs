//! Accounts: users and their mailboxes, passwords, app passwords and
//! classes, and the master key check ([`AccountStore`]).

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{map_err, SqliteStore, WriteOp};
use crate::crypto::RecordId;
use crate::store::{
    AccountStore, AppPasswordInfo, MailboxRef, StoreError, StoreResult, StoredCredentials, UserRecord, UserSummary,
};
use crate::types::{unix_now, MailboxId, UserName};

pub(super) fn create_user(
    conn: &Connection,
    name: &UserName,
    credentials: &StoredCredentials,
    uid: &RecordId,
    wrapped_key: &[u8],
) -> StoreResult<()> {
    let now = unix_now();
    let inserted = conn
        .execute(
            "INSERT INTO users(name, password_hash, scram, disabled, created_at, password_changed_at)
             VALUES(?1, ?2, ?3, 0, ?4, ?4) ON CONFLICT(name) DO NOTHING",
            params![name.as_str(), credentials.hash, credentials.scram, now],
        )
        .map_err(map_err)?;
    if inserted == 0 {
        return Err(StoreError::UserExists);
    }
    let user_id = conn.last_insert_rowid();
    conn.execute(
        "INSERT INTO mailboxes(user_id, uid, wrapped_key) VALUES(?1, ?2, ?3)",
        params![user_id, &uid[..], wrapped_key],
    )
    .map_err(map_err)?;
    Ok(())
}

pub(super) fn user(conn: &Connection, name: &UserName) -> rusqlite::Result<StoreResult<Option<UserRecord>>> {
    let row = conn
        .query_row(
            "SELECT u.password_hash, u.disabled, m.id, m.uid, m.wrapped_key, u.scram,
                    u.password_changed_at, u.require_modern_auth, u.class
             FROM users u JOIN mailboxes m ON m.user_id = u.id WHERE u.name = ?1",
            [name.as_str()],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, bool>(7)?,
                    r.get::<_, Option<String>>(8)?,
                ))
            },
        )
        .optional()?;
    let Some((password_hash, disabled, id, uid, wrapped_key, scram, password_changed_at, require_modern_auth, class)) =
        row
    else {
        return Ok(Ok(None));
    };
    let Ok(uid) = RecordId::try_from(uid.as_slice()) else {
        return Ok(Err(StoreError::Permanent(format!("mailbox {id} has a malformed uid"))));
    };
    Ok(Ok(Some(UserRecord {
        name: name.clone(),
        password_hash,
        scram,
        disabled,
        password_changed_at,
        require_modern_auth,
        class,
        mailbox: MailboxRef { id: MailboxId::from_raw(id), uid, wrapped_key },
    })))
}

pub(super) fn users(conn: &Connection) -> rusqlite::Result<StoreResult<Vec<UserSummary>>> {
    let mut stmt = conn.prepare(
        "SELECT u.name, u.disabled, COUNT(msg.id), COALESCE(SUM(msg.size), 0)
         FROM users u JOIN mailboxes m ON m.user_id = u.id
         LEFT JOIN messages msg ON msg.mailbox_id = m.id
         GROUP BY u.id ORDER BY u.name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (name, disabled, messages, octets) = row?;
        let Ok(name) = UserName::parse(&name) else {
            return Ok(Err(StoreError::Permanent(format!("stored user name {name:?} is invalid"))));
        };
        out.push(UserSummary { name, disabled, messages: messages as u64, octets: octets as u64 });
    }
    Ok(Ok(out))
}

pub(super) fn set_password(conn: &Connection, name: &UserName, credentials: &StoredCredentials) -> StoreResult<()> {
    // Keep the previous hash for the reuse check (last 24 at most).
    conn.execute(
        "INSERT INTO password_history(user_id, hash, changed_at)
         SELECT id, password_hash, password_changed_at FROM users WHERE name = ?1",
        [name.as_str()],
    )
    .map_err(map_err)?;
    conn.execute(
        "DELETE FROM password_history WHERE user_id = (SELECT id FROM users WHERE name = ?1)
         AND rowid NOT IN (SELECT h.rowid FROM password_history h JOIN users u ON u.id = h.user_id
                           WHERE u.name = ?1 ORDER BY h.changed_at DESC, h.rowid DESC LIMIT 24)",
        [name.as_str()],
    )
    .map_err(map_err)?;
    let n = conn
        .execute(
            "UPDATE users SET password_hash = ?2, scram = ?3, password_changed_at = ?4 WHERE name = ?1",
            params![name.as_str(), credentials.hash, credentials.scram, unix_now()],
        )
        .map_err(map_err)?;
    if n == 0 {
        Err(StoreError::NoSuchUser)
    } else {
        Ok(())
    }
}

/// SCRAM keys still in the RFC 5803 text form of earlier releases.
pub(super) fn plaintext_scram(conn: &Connection) -> rusqlite::Result<StoreResult<Vec<(UserName, String)>>> {
    let mut stmt = conn.prepare("SELECT name, scram FROM users WHERE scram LIKE 'SCRAM-SHA-256$%'")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (name, scram) = row?;
        let Ok(name) = UserName::parse(&name) else {
            return Ok(Err(StoreError::Permanent(format!("stored user name {name:?} is invalid"))));
        };
        out.push((name, scram));
    }
    Ok(Ok(out))
}

/// Compare-and-swap of the SCRAM column: a concurrent password change wins.
/// With `secure_delete` for this statement, so the replaced value (keys in
/// the clear, from an earlier release) is zeroed in the page, not left in
/// its free space.
pub(super) fn replace_scram(conn: &Connection, name: &UserName, old: &str, new: &str) -> StoreResult<()> {
    conn.pragma_update(None, "secure_delete", true).map_err(map_err)?;
    let result = conn
        .execute("UPDATE users SET scram = ?3 WHERE name = ?1 AND scram = ?2", params![name.as_str(), old, new])
        .map_err(map_err);
    conn.pragma_update(None, "secure_delete", false).map_err(map_err)?;
    result.map(drop)
}

pub(super) fn set_disabled(conn: &Connection, name: &UserName, disabled: bool) -> StoreResult<()> {
    let n = conn
        .execute("UPDATE users SET disabled = ?2 WHERE name = ?1", params![name.as_str(), disabled])
        .map_err(map_err)?;
    if n == 0 {
        Err(StoreError::NoSuchUser)
    } else {
        Ok(())
    }
}

pub(super) fn delete_user(conn: &Connection, name: &UserName) -> StoreResult<()> {
    // Cascades remove the mailbox (and with it the wrapped data key: its
    // mail is unreadable from then on), messages, chunks and import records.
    let n = conn.execute("DELETE FROM users WHERE name = ?1", [name.as_str()]).map_err(map_err)?;
    if n == 0 {
        Err(StoreError::NoSuchUser)
    } else {
        Ok(())
    }
}

fn changed(n: usize) -> StoreResult<()> {
    if n == 0 {
        Err(StoreError::NoSuchUser)
    } else {
        Ok(())
    }
}

pub(super) fn set_require_modern(conn: &Connection, name: &UserName, required: bool) -> StoreResult<()> {
    changed(
        conn.execute("UPDATE users SET require_modern_auth = ?2 WHERE name = ?1", params![name.as_str(), required])
            .map_err(map_err)?,
    )
}

pub(super) fn password_history(conn: &Connection, name: &UserName) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT h.hash FROM password_history h JOIN users u ON u.id = h.user_id
         WHERE u.name = ?1 ORDER BY h.changed_at DESC, h.rowid DESC",
    )?;
    let rows = stmt.query_map([name.as_str()], |r| r.get(0))?;
    rows.collect()
}

pub(super) fn add_app_password(
    conn: &Connection,
    name: &UserName,
    label: &str,
    hash: &[u8],
    expires_at: Option<i64>,
) -> StoreResult<()> {
    changed(
        conn.execute(
            "INSERT INTO app_passwords(user_id, label, hash, created_at, expires_at)
             SELECT id, ?2, ?3, ?4, ?5 FROM users WHERE name = ?1",
            params![name.as_str(), label, hash, unix_now(), expires_at],
        )
        .map_err(map_err)?,
    )
}

pub(super) fn app_passwords(conn: &Connection, name: &UserName) -> rusqlite::Result<Vec<AppPasswordInfo>> {
    let mut stmt = conn.prepare_cached(
        "SELECT a.id, a.label, a.created_at, a.expires_at, a.last_used_at FROM app_passwords a
         JOIN users u ON u.id = a.user_id WHERE u.name = ?1 ORDER BY a.id",
    )?;
    let rows = stmt.query_map([name.as_str()], |r| {
        Ok(AppPasswordInfo {
            id: r.get(0)?,
            label: r.get(1)?,
            created_at: r.get(2)?,
            expires_at: r.get(3)?,
            last_used_at: r.get(4)?,
        })
    })?;
    rows.collect()
}

pub(super) fn revoke_app_password(conn: &Connection, name: &UserName, id: i64) -> StoreResult<()> {
    changed(
        conn.execute(
            "DELETE FROM app_passwords WHERE id = ?2 AND user_id = (SELECT id FROM users WHERE name = ?1)",
            params![name.as_str(), id],
        )
        .map_err(map_err)?,
    )
}

pub(super) fn find_app_password(conn: &Connection, hash: &[u8]) -> rusqlite::Result<Option<(i64, String)>> {
    conn.query_row(
        "SELECT a.id, u.name FROM app_passwords a JOIN users u ON u.id = a.user_id
         WHERE a.hash = ?1 AND (a.expires_at IS NULL OR a.expires_at > ?2)",
        params![hash, unix_now()],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
}

pub(super) fn set_class(conn: &Connection, name: &UserName, class: Option<&str>) -> StoreResult<()> {
    changed(
        conn.execute("UPDATE users SET class = ?2 WHERE name = ?1", params![name.as_str(), class]).map_err(map_err)?,
    )
}

#[async_trait]
impl AccountStore for SqliteStore {
    fn writable(&self) -> bool {
        self.shared.writable()
    }

    async fn key_check(&self) -> StoreResult<Option<Vec<u8>>> {
        self.read(|c| {
            use rusqlite::OptionalExtension;
            c.query_row("SELECT value FROM meta WHERE key = 'key_check'", [], |r| r.get(0)).optional()
        })
        .await
    }

    async fn set_key_check(&self, check: Vec<u8>) -> StoreResult<()> {
        self.write(WriteOp::SetKeyCheck(check)).await
    }

    async fn create_user(
        &self,
        name: &UserName,
        credentials: &StoredCredentials,
        uid: RecordId,
        wrapped_key: Vec<u8>,
    ) -> StoreResult<()> {
        self.write(WriteOp::CreateUser { name: name.clone(), credentials: credentials.clone(), uid, wrapped_key }).await
    }

    async fn user(&self, name: &UserName) -> StoreResult<Option<UserRecord>> {
        let name = name.clone();
        self.read(move |c| user(c, &name)).await?
    }

    async fn users(&self) -> StoreResult<Vec<UserSummary>> {
        self.read(users).await?
    }

    async fn set_password(&self, name: &UserName, credentials: &StoredCredentials) -> StoreResult<()> {
        self.write(WriteOp::SetPassword { name: name.clone(), credentials: credentials.clone() }).await
    }

    async fn plaintext_scram(&self) -> StoreResult<Vec<(UserName, String)>> {
        self.read(plaintext_scram).await?
    }

    async fn replace_scram(&self, name: &UserName, old: &str, new: &str) -> StoreResult<()> {
        self.write(WriteOp::ReplaceScram { name: name.clone(), old: old.to_owned(), new: new.to_owned() }).await
    }

    async fn set_disabled(&self, name: &UserName, disabled: bool) -> StoreResult<()> {
        self.write(WriteOp::SetDisabled { name: name.clone(), disabled }).await
    }

    async fn set_require_modern_auth(&self, name: &UserName, required: bool) -> StoreResult<()> {
        self.write(WriteOp::SetRequireModern { name: name.clone(), required }).await
    }

    async fn set_class(&self, name: &UserName, class: Option<String>) -> StoreResult<()> {
        self.write(WriteOp::SetClass { name: name.clone(), class }).await
    }

    async fn password_history(&self, name: &UserName) -> StoreResult<Vec<String>> {
        let name = name.clone();
        self.read(move |c| password_history(c, &name)).await
    }

    async fn add_app_password(
        &self,
        name: &UserName,
        label: &str,
        keyed_hash: Vec<u8>,
        expires_at: Option<i64>,
    ) -> StoreResult<i64> {
        let op = WriteOp::AddAppPassword {
            name: name.clone(),
            label: label.to_owned(),
            hash: keyed_hash.clone(),
            expires_at,
        };
        self.write(op).await?;
        self.read(move |c| c.query_row("SELECT id FROM app_passwords WHERE hash = ?1", [keyed_hash], |r| r.get(0)))
            .await
    }

    async fn app_passwords(&self, name: &UserName) -> StoreResult<Vec<AppPasswordInfo>> {
        let name = name.clone();
        self.read(move |c| app_passwords(c, &name)).await
    }

    async fn revoke_app_password(&self, name: &UserName, id: i64) -> StoreResult<bool> {
        self.write_existed(WriteOp::RevokeAppPassword { name: name.clone(), id }).await
    }

    async fn use_app_password(&self, keyed_hash: Vec<u8>) -> StoreResult<Option<UserName>> {
        let found = self.read(move |c| find_app_password(c, &keyed_hash)).await?;
        let Some((id, name)) = found else { return Ok(None) };
        // The last-use time is bookkeeping: a store that cannot write
        // (read-only on a full disk) still lets the device read its mail.
        if let Err(e) = self.write(WriteOp::UseAppPassword { id }).await {
            tracing::warn!(error = %e, "app password last-use time not recorded");
        }
        Ok(UserName::parse(&name).ok())
    }

    async fn find_app_password(&self, keyed_hash: Vec<u8>) -> StoreResult<Option<(i64, UserName)>> {
        let found = self.read(move |c| find_app_password(c, &keyed_hash)).await?;
        Ok(found.and_then(|(id, name)| UserName::parse(&name).ok().map(|n| (id, n))))
    }

    async fn mark_app_password_used(&self, id: i64) -> StoreResult<()> {
        self.write(WriteOp::UseAppPassword { id }).await
    }

    async fn delete_user(&self, name: &UserName) -> StoreResult<()> {
        self.write(WriteOp::DeleteUser(name.clone())).await
    }
}
