//! Leases ([`LeaseStore`]): a `flock` per resource for the exclusion across
//! sessions and processes, and a `leases` row per resource holding the
//! current fencing token, its holder and its expiry.
//!
//! Acquiring takes the `flock`, then records the next token. A store that
//! cannot write (disk full) still grants the lease, as it granted the
//! maildrop lock before leases existed, so a POP3 client can read its mail;
//! the lease's renewal records it once the store can write again, and until
//! then its fenced commits are refused (they would be anyway: the store is
//! read-only). Fenced commits call [`check`] in their own transaction.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{map_err, SqliteStore, WriteOp, WriterHandle};
use crate::store::lease::{expiry_after, now_millis, LeaseKeeper};
use crate::store::{FencingToken, Lease, LeaseResource, LeaseStore, StoreError, StoreResult};

/// An open, locked lock file; closing it releases the lock.
struct FileLock(#[allow(dead_code)] File);

/// The lock file of a resource: `<id>.lock` for a maildrop and
/// `connector-<account>.lock` for a connector account (the names of the
/// maildrop and run locks before leases, so an older process running
/// beside this one is still excluded).
fn lock_file_name(resource: &LeaseResource) -> String {
    match resource {
        LeaseResource::Maildrop(id) => format!("{id}.lock"),
        LeaseResource::ConnectorAccount(account) => format!("connector-{account}.lock"),
    }
}

/// An exclusive `flock` on `<dir>/<name>` (names are validated
/// identifiers: digits or `connector-<account>`).
fn flock(dir: &Path, name: &str) -> StoreResult<FileLock> {
    let path = dir.join(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::Temporary(format!("open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(FileLock(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Temporary(format!("lock {}: {e}", path.display()))),
    }
}

/// The last token recorded for `resource` (0: never leased).
fn current_token(conn: &Connection, resource: &str) -> rusqlite::Result<u64> {
    let token: Option<i64> =
        conn.query_row("SELECT token FROM leases WHERE resource = ?1", [resource], |r| r.get(0)).optional()?;
    Ok(token.unwrap_or(0) as u64)
}

/// Records `token` for `resource` until `expires_at`: a renewal of the
/// current token, or the recording of the next one (an acquisition, or a
/// lease granted while the store could not write). Anything else means a
/// newer holder recorded a greater token: [`StoreError::Fenced`].
pub(super) fn record(
    conn: &Connection,
    resource: &str,
    token: FencingToken,
    holder: &str,
    expires_at: i64,
) -> StoreResult<()> {
    let token = token.get() as i64;
    let n = conn
        .execute(
            "INSERT INTO leases(resource, token, holder, expires_at) VALUES(?1, ?2, ?3, ?4)
             ON CONFLICT(resource) DO UPDATE SET token = excluded.token, holder = excluded.holder,
                                                 expires_at = excluded.expires_at
             WHERE leases.token = excluded.token OR leases.token = excluded.token - 1",
            params![resource, token, holder, expires_at],
        )
        .map_err(map_err)?;
    if n == 0 {
        Err(StoreError::Fenced)
    } else {
        Ok(())
    }
}

/// Ends the lease if `token` is still the current one.
pub(super) fn release(conn: &Connection, resource: &str, token: FencingToken) -> StoreResult<()> {
    conn.execute(
        "UPDATE leases SET expires_at = 0 WHERE resource = ?1 AND token = ?2",
        params![resource, token.get() as i64],
    )
    .map(drop)
    .map_err(map_err)
}

/// Whether a fenced commit may go ahead: `token` is the current token of
/// `resource` and has not expired. Runs inside the commit's transaction.
pub(super) fn check(conn: &Connection, resource: &LeaseResource, token: FencingToken) -> StoreResult<()> {
    let row: Option<(i64, i64)> = conn
        .query_row("SELECT token, expires_at FROM leases WHERE resource = ?1", [resource.key()], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(map_err)?;
    match row {
        Some((current, expires_at)) if current == token.get() as i64 && expires_at > now_millis() => Ok(()),
        _ => Err(StoreError::Fenced),
    }
}

/// [`check`] for a connector account's lease.
pub(super) fn check_connector(conn: &Connection, account: &str, token: FencingToken) -> StoreResult<()> {
    check(conn, &LeaseResource::ConnectorAccount(account.to_owned()), token)
}

#[async_trait]
impl LeaseKeeper for WriterHandle {
    async fn renew(
        &self,
        resource: &LeaseResource,
        token: FencingToken,
        holder: &str,
        expires_at: i64,
    ) -> StoreResult<()> {
        self.write(WriteOp::RecordLease { resource: resource.key(), token, holder: holder.to_owned(), expires_at })
            .await
    }

    async fn release(&self, resource: &LeaseResource, token: FencingToken) -> StoreResult<()> {
        self.write(WriteOp::ReleaseLease { resource: resource.key(), token }).await
    }

    fn release_detached(&self, resource: &LeaseResource, token: FencingToken) {
        self.write_detached(WriteOp::ReleaseLease { resource: resource.key(), token });
    }
}

#[async_trait]
impl LeaseStore for SqliteStore {
    async fn acquire_lease(&self, resource: LeaseResource, holder: &str, ttl: Duration) -> StoreResult<Lease> {
        let exclusion = flock(&self.lock_dir, &lock_file_name(&resource))?;
        // While the flock is held no one else records a token for this
        // resource, so the next one is the current one plus one.
        let key = resource.key();
        let current = self.read(move |c| current_token(c, &key)).await?;
        let token = FencingToken::new(current + 1);
        let expires_at = expiry_after(ttl);
        let op = WriteOp::RecordLease { resource: resource.key(), token, holder: holder.to_owned(), expires_at };
        let recorded = match self.write(op).await {
            Ok(()) => true,
            Err(StoreError::Fenced) => return Err(StoreError::Locked),
            // Read-only (disk full) or busy: granted all the same, recorded
            // by the renewal once the store can write.
            Err(StoreError::Temporary(why)) => {
                tracing::debug!(resource = %resource, error = %why, "lease granted but not recorded yet");
                false
            }
            Err(e) => return Err(e),
        };
        let keeper: Arc<dyn LeaseKeeper> = self.writer.clone();
        Ok(Lease::start(resource, token, holder, ttl, expires_at, recorded, keeper, exclusion))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::prelude::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_store_of_schema_7_upgrades_in_place_to_leases() {
        let dir = std::env::temp_dir().join(format!("p3x-sqlite-lease-migration-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("s.db");
        {
            // A store as version 7 wrote it, with a user.
            let conn = Connection::open(&db).unwrap();
            conn.execute_batch(super::super::SCHEMA).unwrap();
            for (_, step) in super::super::MIGRATIONS.iter().filter(|(v, _)| *v <= 7) {
                conn.execute_batch(step).unwrap();
            }
            conn.execute_batch(
                "PRAGMA user_version = 7;
                 INSERT INTO users(name, password_hash, disabled, created_at, password_changed_at)
                     VALUES('alice', 'h', 0, 1, 1);
                 INSERT INTO mailboxes(user_id, uid, wrapped_key) VALUES(1, zeroblob(16), x'01');",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&db).unwrap();
        let version: i64 = store.read(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0))).await.unwrap();
        assert_eq!(version, super::super::SCHEMA_VERSION, "upgraded to the current schema");
        let alice = store.user(&crate::types::UserName::parse("alice").unwrap()).await.unwrap().expect("kept");
        let lease = store.lock_maildrop(alice.mailbox.id).await.unwrap();
        assert_eq!(lease.token(), FencingToken::new(1));
        drop((lease, store));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
