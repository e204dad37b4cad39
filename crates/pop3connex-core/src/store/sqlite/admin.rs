//! Administrators of the admin plane: accounts, second factors (sealed
//! above the store), recovery code hashes and service tokens
//! ([`AdminStore`]). Writes go through the writer thread as
//! [`AdminWrite`]s; a write that matched no row answers `NoSuchUser`, which
//! the trait methods turn into `false`.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{map_err, SqliteStore, WriteOp};
use crate::store::{AdminFactorRecord, AdminRecord, AdminStore, ServiceTokenRecord, StoreError, StoreResult};
use crate::types::unix_now;

/// The tables (schema version 9).
pub(super) const TABLES: &str = "
CREATE TABLE IF NOT EXISTS admins(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    roles TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL,
    last_login_at INTEGER
);
CREATE TABLE IF NOT EXISTS admin_factors(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    admin_id INTEGER NOT NULL REFERENCES admins(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    label TEXT NOT NULL,
    sealed BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    last_used_at INTEGER,
    last_step INTEGER,
    pending_until INTEGER
);
CREATE INDEX IF NOT EXISTS admin_factors_by_admin ON admin_factors(admin_id);
CREATE TABLE IF NOT EXISTS admin_recovery_codes(
    admin_id INTEGER NOT NULL REFERENCES admins(id) ON DELETE CASCADE,
    hash BLOB NOT NULL,
    PRIMARY KEY(admin_id, hash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS service_tokens(
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    creator_id INTEGER NOT NULL REFERENCES admins(id) ON DELETE CASCADE,
    permissions TEXT NOT NULL,
    networks TEXT NOT NULL,
    secret_hash BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    last_used_at INTEGER,
    last_used_from TEXT,
    revoked INTEGER NOT NULL DEFAULT 0
);
";

/// An admin-plane write, executed by the writer thread.
pub(super) enum AdminWrite {
    Create { name: String, hash: String, roles: String },
    SetEnabled { id: i64, enabled: bool },
    SetRoles { id: i64, roles: String },
    SetPassword { id: i64, hash: String },
    Login { id: i64, at: i64 },
    Remove(i64),
    AddFactor { admin_id: i64, kind: String, label: String, sealed: Vec<u8>, pending_until: Option<i64> },
    ActivateFactor { admin_id: i64, factor_id: i64, now: i64 },
    RemoveFactor { admin_id: i64, factor_id: i64 },
    ResetFactors(i64),
    UseStep { factor_id: i64, step: i64, at: i64 },
    UpdateFactor { factor_id: i64, sealed: Vec<u8>, at: i64 },
    SetRecovery { admin_id: i64, hashes: Vec<Vec<u8>> },
    UseRecovery { admin_id: i64, hash: Vec<u8> },
    AddToken(ServiceTokenRecord, String, String),
    RevokeToken(String),
    TokenUsed { id: String, at: i64, from: String },
}

fn changed(n: usize) -> StoreResult<()> {
    if n == 0 {
        Err(StoreError::NoSuchUser)
    } else {
        Ok(())
    }
}

pub(super) fn apply(conn: &Connection, w: &AdminWrite) -> StoreResult<()> {
    let exec = |sql: &str, p: &[&dyn rusqlite::ToSql]| conn.execute(sql, p).map_err(map_err).and_then(changed);
    match w {
        AdminWrite::Create { name, hash, roles } => {
            let n = conn
                .execute(
                    "INSERT INTO admins(name, password_hash, roles, enabled, created_at) VALUES(?1, ?2, ?3, 1, ?4)
                     ON CONFLICT(name) DO NOTHING",
                    params![name, hash, roles, unix_now()],
                )
                .map_err(map_err)?;
            if n == 0 {
                return Err(StoreError::UserExists);
            }
            Ok(())
        }
        AdminWrite::SetEnabled { id, enabled } => {
            exec("UPDATE admins SET enabled = ?2 WHERE id = ?1", params![id, enabled])
        }
        AdminWrite::SetRoles { id, roles } => exec("UPDATE admins SET roles = ?2 WHERE id = ?1", params![id, roles]),
        AdminWrite::SetPassword { id, hash } => {
            exec("UPDATE admins SET password_hash = ?2 WHERE id = ?1", params![id, hash])
        }
        AdminWrite::Login { id, at } => exec("UPDATE admins SET last_login_at = ?2 WHERE id = ?1", params![id, at]),
        AdminWrite::Remove(id) => {
            // Explicit deletes: the cascade needs foreign keys on, which
            // this must not depend on.
            conn.execute("DELETE FROM service_tokens WHERE creator_id = ?1", [id]).map_err(map_err)?;
            conn.execute("DELETE FROM admin_recovery_codes WHERE admin_id = ?1", [id]).map_err(map_err)?;
            conn.execute("DELETE FROM admin_factors WHERE admin_id = ?1", [id]).map_err(map_err)?;
            exec("DELETE FROM admins WHERE id = ?1", params![id])
        }
        AdminWrite::AddFactor { admin_id, kind, label, sealed, pending_until } => {
            // Pending enrolments that were never confirmed go with the next one.
            conn.execute(
                "DELETE FROM admin_factors WHERE pending_until IS NOT NULL AND pending_until < ?1",
                [unix_now()],
            )
            .map_err(map_err)?;
            exec(
                "INSERT INTO admin_factors(admin_id, kind, label, sealed, created_at, pending_until)
                 SELECT id, ?2, ?3, ?4, ?5, ?6 FROM admins WHERE id = ?1",
                params![admin_id, kind, label, sealed, unix_now(), pending_until],
            )
        }
        AdminWrite::ActivateFactor { admin_id, factor_id, now } => exec(
            "UPDATE admin_factors SET pending_until = NULL, created_at = ?3
             WHERE id = ?2 AND admin_id = ?1 AND pending_until IS NOT NULL AND pending_until >= ?3",
            params![admin_id, factor_id, now],
        ),
        AdminWrite::RemoveFactor { admin_id, factor_id } => {
            exec("DELETE FROM admin_factors WHERE id = ?2 AND admin_id = ?1", params![admin_id, factor_id])
        }
        AdminWrite::ResetFactors(id) => {
            conn.execute("DELETE FROM admin_recovery_codes WHERE admin_id = ?1", [id]).map_err(map_err)?;
            conn.execute("DELETE FROM admin_factors WHERE admin_id = ?1", [id]).map_err(map_err)?;
            Ok(())
        }
        AdminWrite::UseStep { factor_id, step, at } => exec(
            "UPDATE admin_factors SET last_step = ?2, last_used_at = ?3
             WHERE id = ?1 AND pending_until IS NULL AND (last_step IS NULL OR last_step < ?2)",
            params![factor_id, step, at],
        ),
        AdminWrite::UpdateFactor { factor_id, sealed, at } => exec(
            "UPDATE admin_factors SET sealed = ?2, last_used_at = ?3 WHERE id = ?1 AND pending_until IS NULL",
            params![factor_id, sealed, at],
        ),
        AdminWrite::SetRecovery { admin_id, hashes } => {
            conn.execute("DELETE FROM admin_recovery_codes WHERE admin_id = ?1", [admin_id]).map_err(map_err)?;
            let mut stmt = conn
                .prepare_cached("INSERT OR IGNORE INTO admin_recovery_codes(admin_id, hash) VALUES(?1, ?2)")
                .map_err(map_err)?;
            for h in hashes {
                stmt.execute(params![admin_id, h]).map_err(map_err)?;
            }
            Ok(())
        }
        AdminWrite::UseRecovery { admin_id, hash } => {
            exec("DELETE FROM admin_recovery_codes WHERE admin_id = ?1 AND hash = ?2", params![admin_id, hash])
        }
        AdminWrite::AddToken(t, permissions, networks) => {
            let creator: Option<i64> = conn
                .query_row("SELECT id FROM admins WHERE id = ?1", [t.creator_id], |r| r.get(0))
                .optional()
                .map_err(map_err)?;
            if creator.is_none() {
                return Err(StoreError::NoSuchUser);
            }
            let n = conn
                .execute(
                    "INSERT INTO service_tokens(id, name, creator_id, permissions, networks, secret_hash, created_at,
                                                expires_at, revoked)
                     VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0) ON CONFLICT(id) DO NOTHING",
                    params![
                        t.id,
                        t.name,
                        t.creator_id,
                        permissions,
                        networks,
                        t.secret_hash,
                        t.created_at,
                        t.expires_at
                    ],
                )
                .map_err(map_err)?;
            if n == 0 {
                return Err(StoreError::UserExists);
            }
            Ok(())
        }
        AdminWrite::RevokeToken(id) => exec("UPDATE service_tokens SET revoked = 1 WHERE id = ?1", params![id]),
        AdminWrite::TokenUsed { id, at, from } => exec(
            "UPDATE service_tokens SET last_used_at = ?2, last_used_from = ?3 WHERE id = ?1",
            params![id, at, from],
        ),
    }
}

fn json_list(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn parse_list(s: &str) -> rusqlite::Result<Vec<String>> {
    serde_json::from_str(s)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into()))
}

const ADMIN_COLUMNS: &str = "id, name, password_hash, roles, enabled, created_at, last_login_at";

fn admin_row(r: &Row<'_>) -> rusqlite::Result<AdminRecord> {
    Ok(AdminRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        password_hash: r.get(2)?,
        roles: parse_list(&r.get::<_, String>(3)?)?,
        enabled: r.get(4)?,
        created_at: r.get(5)?,
        last_login_at: r.get(6)?,
    })
}

fn factor_row(r: &Row<'_>) -> rusqlite::Result<AdminFactorRecord> {
    Ok(AdminFactorRecord {
        id: r.get(0)?,
        admin_id: r.get(1)?,
        kind: r.get(2)?,
        label: r.get(3)?,
        sealed: r.get(4)?,
        created_at: r.get(5)?,
        last_used_at: r.get(6)?,
        last_step: r.get(7)?,
        pending_until: r.get(8)?,
    })
}

const TOKEN_COLUMNS: &str =
    "t.id, t.name, t.creator_id, a.name, t.permissions, t.networks, t.secret_hash, t.created_at,
     t.expires_at, t.last_used_at, t.last_used_from, t.revoked";

fn token_row(r: &Row<'_>) -> rusqlite::Result<ServiceTokenRecord> {
    Ok(ServiceTokenRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        creator_id: r.get(2)?,
        creator_name: r.get(3)?,
        permissions: parse_list(&r.get::<_, String>(4)?)?,
        networks: parse_list(&r.get::<_, String>(5)?)?,
        secret_hash: r.get(6)?,
        created_at: r.get(7)?,
        expires_at: r.get(8)?,
        last_used_at: r.get(9)?,
        last_used_from: r.get(10)?,
        revoked: r.get(11)?,
    })
}

impl SqliteStore {
    async fn admin_write(&self, w: AdminWrite) -> StoreResult<()> {
        self.write(WriteOp::Admin(w)).await
    }

    async fn admin_write_existed(&self, w: AdminWrite) -> StoreResult<bool> {
        self.write_existed(WriteOp::Admin(w)).await
    }
}

#[async_trait]
impl AdminStore for SqliteStore {
    async fn create_admin(&self, name: &str, password_hash: &str, roles: &[String]) -> StoreResult<i64> {
        self.admin_write(AdminWrite::Create {
            name: name.to_owned(),
            hash: password_hash.to_owned(),
            roles: json_list(roles),
        })
        .await?;
        self.admin_by_name(name)
            .await?
            .map(|a| a.id)
            .ok_or_else(|| StoreError::Permanent("administrator vanished after it was added".into()))
    }

    async fn admin_by_name(&self, name: &str) -> StoreResult<Option<AdminRecord>> {
        let name = name.to_owned();
        self.read(move |c| {
            c.query_row(&format!("SELECT {ADMIN_COLUMNS} FROM admins WHERE name = ?1"), [name], admin_row).optional()
        })
        .await
    }

    async fn admin_by_id(&self, id: i64) -> StoreResult<Option<AdminRecord>> {
        self.read(move |c| {
            c.query_row(&format!("SELECT {ADMIN_COLUMNS} FROM admins WHERE id = ?1"), [id], admin_row).optional()
        })
        .await
    }

    async fn admins(&self) -> StoreResult<Vec<AdminRecord>> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!("SELECT {ADMIN_COLUMNS} FROM admins ORDER BY name"))?;
            let rows = stmt.query_map([], admin_row)?;
            rows.collect()
        })
        .await
    }

    async fn set_admin_enabled(&self, id: i64, enabled: bool) -> StoreResult<bool> {
        self.admin_write_existed(AdminWrite::SetEnabled { id, enabled }).await
    }

    async fn set_admin_roles(&self, id: i64, roles: &[String]) -> StoreResult<bool> {
        self.admin_write_existed(AdminWrite::SetRoles { id, roles: json_list(roles) }).await
    }

    async fn set_admin_password(&self, id: i64, password_hash: &str) -> StoreResult<bool> {
        self.admin_write_existed(AdminWrite::SetPassword { id, hash: password_hash.to_owned() }).await
    }

    async fn record_admin_login(&self, id: i64, at: i64) -> StoreResult<()> {
        self.admin_write_existed(AdminWrite::Login { id, at }).await.map(drop)
    }

    async fn remove_admin(&self, id: i64) -> StoreResult<bool> {
        self.admin_write_existed(AdminWrite::Remove(id)).await
    }

    async fn add_admin_factor(
        &self,
        admin_id: i64,
        kind: &str,
        label: &str,
        sealed: Vec<u8>,
        pending_until: Option<i64>,
    ) -> StoreResult<i64> {
        let op = AdminWrite::AddFactor {
            admin_id,
            kind: kind.to_owned(),
            label: label.to_owned(),
            sealed: sealed.clone(),
            pending_until,
        };
        // Sealed secrets carry a random nonce: the ciphertext finds the row.
        self.admin_write(op).await?;
        self.read(move |c| {
            c.query_row(
                "SELECT id FROM admin_factors WHERE admin_id = ?1 AND sealed = ?2 ORDER BY id DESC LIMIT 1",
                params![admin_id, sealed],
                |r| r.get::<_, i64>(0),
            )
            .optional()
        })
        .await?
        .ok_or_else(|| StoreError::Permanent("factor vanished after it was added".into()))
    }

    async fn admin_factors(&self, admin_id: i64) -> StoreResult<Vec<AdminFactorRecord>> {
        self.read(move |c| {
            let mut stmt = c.prepare(
                "SELECT id, admin_id, kind, label, sealed, created_at, last_used_at, last_step, pending_until
                 FROM admin_factors WHERE admin_id = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map([admin_id], factor_row)?;
            rows.collect()
        })
        .await
    }

    async fn activate_admin_factor(&self, admin_id: i64, factor_id: i64, now: i64) -> StoreResult<bool> {
        self.admin_write_existed(AdminWrite::ActivateFactor { admin_id, factor_id, now }).await
    }

    async fn remove_admin_factor(&self, admin_id: i64, factor_id: i64) -> StoreResult<bool> {
        self.admin_write_existed(AdminWrite::RemoveFactor { admin_id, factor_id }).await
    }

    async fn reset_admin_factors(&self, admin_id: i64) -> StoreResult<()> {
        self.admin_write(AdminWrite::ResetFactors(admin_id)).await
    }

    async fn use_factor_step(&self, factor_id: i64, step: i64, at: i64) -> StoreResult<bool> {
        self.admin_write_existed(AdminWrite::UseStep { factor_id, step, at }).await
    }

    async fn update_admin_factor(&self, factor_id: i64, sealed: Vec<u8>, at: i64) -> StoreResult<bool> {
        self.admin_write_existed(AdminWrite::UpdateFactor { factor_id, sealed, at }).await
    }

    async fn set_recovery_codes(&self, admin_id: i64, hashes: Vec<Vec<u8>>) -> StoreResult<()> {
        self.admin_write(AdminWrite::SetRecovery { admin_id, hashes }).await
    }

    async fn recovery_codes(&self, admin_id: i64) -> StoreResult<Vec<Vec<u8>>> {
        self.read(move |c| {
            let mut stmt = c.prepare("SELECT hash FROM admin_recovery_codes WHERE admin_id = ?1")?;
            let rows = stmt.query_map([admin_id], |r| r.get::<_, Vec<u8>>(0))?;
            rows.collect()
        })
        .await
    }

    async fn use_recovery_code(&self, admin_id: i64, hash: Vec<u8>) -> StoreResult<bool> {
        self.admin_write_existed(AdminWrite::UseRecovery { admin_id, hash }).await
    }

    async fn add_service_token(&self, token: ServiceTokenRecord) -> StoreResult<()> {
        let permissions = json_list(&token.permissions);
        let networks = json_list(&token.networks);
        self.admin_write(AdminWrite::AddToken(token, permissions, networks)).await
    }

    async fn service_token(&self, id: &str) -> StoreResult<Option<ServiceTokenRecord>> {
        let id = id.to_owned();
        self.read(move |c| {
            c.query_row(
                &format!(
                    "SELECT {TOKEN_COLUMNS} FROM service_tokens t JOIN admins a ON a.id = t.creator_id WHERE t.id = ?1"
                ),
                [id],
                token_row,
            )
            .optional()
        })
        .await
    }

    async fn service_tokens(&self) -> StoreResult<Vec<ServiceTokenRecord>> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {TOKEN_COLUMNS} FROM service_tokens t JOIN admins a ON a.id = t.creator_id
                 ORDER BY t.created_at DESC, t.id"
            ))?;
            let rows = stmt.query_map([], token_row)?;
            rows.collect()
        })
        .await
    }

    async fn revoke_service_token(&self, id: &str) -> StoreResult<bool> {
        self.admin_write_existed(AdminWrite::RevokeToken(id.to_owned())).await
    }

    async fn mark_service_token_used(&self, id: &str, at: i64, from: &str) -> StoreResult<()> {
        self.admin_write_existed(AdminWrite::TokenUsed { id: id.to_owned(), at, from: from.to_owned() }).await.map(drop)
    }
}
