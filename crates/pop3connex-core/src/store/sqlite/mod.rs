//! Embedded SQLite backend (the default).
//!
//! - WAL journal with `synchronous = FULL`: a commit is on stable storage
//!   when it returns.
//! - One writer thread owns the only write connection and commits queued
//!   writes in groups (group commit): under concurrent LMTP load many
//!   deliveries share one fsync, yet every caller is answered only after the
//!   commit that contains its write. Each write runs in its own savepoint,
//!   so one failing write does not take the others down with it.
//! - Readers use a small pool of read-only connections on the blocking pool.
//! - Maildrop locks are `flock`s on one file per mailbox next to the
//!   database: exclusive across sessions and processes, released by the
//!   kernel if a process dies.

mod connector;
mod mailbox;
mod message;
mod security;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use super::{
    BanRecord, ConnectorCommit, ConnectorStatus, DedupKey, LockoutRecord, MaildropLock, MessageMeta, NewMessage,
    SeenUid, Store, StoreError, StoreResult, StoredCredentials, UserRecord, UserSummary,
};
use crate::crypto::RecordId;
use crate::types::UserName;

/// Most writes committed in one transaction; bounds the latency one
/// delivery can add to the others in its group.
const MAX_GROUP: usize = 256;
/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 8;
/// How long a connection waits for another process's lock before the
/// operation fails with a temporary error.
const BUSY_TIMEOUT_MS: u64 = 5000;

const SCHEMA_VERSION: i64 = 6;
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS users(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    password_changed_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mailboxes(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL UNIQUE REFERENCES users(id) ON DELETE CASCADE,
    uid BLOB NOT NULL UNIQUE,
    wrapped_key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS messages(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox_id INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid BLOB NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_mailbox ON messages(mailbox_id, id);
CREATE TABLE IF NOT EXISTS message_chunks(
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY(message_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS imports(
    mailbox_id INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    source_key TEXT NOT NULL,
    PRIMARY KEY(mailbox_id, source_key)
) WITHOUT ROWID;
";

/// A write, executed by the writer thread.
enum WriteOp {
    SetKeyCheck(Vec<u8>),
    CreateUser { name: UserName, credentials: StoredCredentials, uid: RecordId, wrapped_key: Vec<u8> },
    SetPassword { name: UserName, credentials: StoredCredentials },
    ReplaceScram { name: UserName, old: String, new: String },
    SetDisabled { name: UserName, disabled: bool },
    SetRequireModern { name: UserName, required: bool },
    SetClass { name: UserName, class: Option<String> },
    AddAppPassword { name: UserName, label: String, hash: Vec<u8>, expires_at: Option<i64> },
    RevokeAppPassword { name: UserName, id: i64 },
    UseAppPassword { id: i64 },
    DeleteUser(UserName),
    Deliver(Vec<NewMessage>),
    Delete { mailbox_id: i64, ids: Vec<i64> },
    PutBan(BanRecord),
    RemoveBan(String),
    PutLockout(LockoutRecord),
    RemoveLockout(String),
    ConnectorCommit(ConnectorCommit),
    ConnectorForget { account: String, uidls: Vec<String> },
    ConnectorResync { account: String, uidls: Vec<String> },
    DedupPrune(i64),
    PutConnectorStatus(ConnectorStatus),
    AddConnectorAccount { name: String, spec: String },
    RemoveConnectorAccount(String),
    PutConnectorSecret { account: String, kind: String, sealed: Vec<u8> },
}

struct Job {
    op: WriteOp,
    reply: oneshot::Sender<StoreResult<()>>,
}

pub struct SqliteStore {
    path: PathBuf,
    lock_dir: PathBuf,
    writer: Mutex<mpsc::Sender<Job>>,
    readers: Arc<Mutex<Vec<Connection>>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> StoreResult<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Permanent(format!("create {}: {e}", dir.display())))?;
        }
        // Create the file owner-only before SQLite does, so the database
        // (ciphertext, but also hashes and metadata) is never world-readable.
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::Permanent(format!("open {}: {e}", path.display())))?;
        let lock_dir = path.with_extension("locks");
        std::fs::create_dir_all(&lock_dir)
            .map_err(|e| StoreError::Permanent(format!("create {}: {e}", lock_dir.display())))?;

        let conn = open_connection(path, false)?;
        conn.execute_batch(SCHEMA).map_err(map_err)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(map_err)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Permanent(format!(
                "database schema {version} is newer than this program understands ({SCHEMA_VERSION})"
            )));
        }
        migrate(&conn, version)?;
        let integrity: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(map_err)?;
        if integrity != "ok" {
            return Err(StoreError::Permanent(format!("database integrity check failed: {integrity}")));
        }

        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| StoreError::Permanent(format!("spawn writer: {e}")))?;
        Ok(Self { path: path.to_owned(), lock_dir, writer: Mutex::new(tx), readers: Arc::new(Mutex::new(Vec::new())) })
    }

    async fn write(&self, op: WriteOp) -> StoreResult<()> {
        let (reply, rx) = oneshot::channel();
        {
            let writer = self.writer.lock().map_err(|_| StoreError::Permanent("writer poisoned".into()))?;
            writer.send(Job { op, reply }).map_err(|_| StoreError::Permanent("store writer stopped".into()))?;
        }
        rx.await.map_err(|_| StoreError::Permanent("store writer stopped".into()))?
    }

    /// A delete that reports `NoSuchUser` when nothing matched.
    async fn write_existed(&self, op: WriteOp) -> StoreResult<bool> {
        match self.write(op).await {
            Ok(()) => Ok(true),
            Err(StoreError::NoSuchUser) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().ok().and_then(|mut r| r.pop());
            let conn = match pooled {
                Some(c) => c,
                None => open_connection(&path, true)?,
            };
            let result = f(&conn).map_err(map_err);
            if let Ok(mut r) = readers.lock() {
                if r.len() < MAX_IDLE_READERS {
                    r.push(conn);
                }
            }
            result
        })
        .await
        .map_err(|e| StoreError::Permanent(format!("reader task: {e}")))?
    }
}

/// Schema changes after version 1, applied in order in one transaction.
const MIGRATIONS: &[(i64, &str)] = &[
    (2, "ALTER TABLE users ADD COLUMN scram TEXT;"),
    (
        3,
        "CREATE TABLE bans(network TEXT PRIMARY KEY, reason TEXT NOT NULL, created_at INTEGER NOT NULL,
                           expires_at INTEGER, offences INTEGER NOT NULL);
         CREATE TABLE lockouts(user TEXT PRIMARY KEY, since INTEGER NOT NULL, until INTEGER NOT NULL,
                               count INTEGER NOT NULL);",
    ),
    (
        4,
        "ALTER TABLE users ADD COLUMN require_modern_auth INTEGER NOT NULL DEFAULT 0;
         CREATE TABLE password_history(user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                                       hash TEXT NOT NULL, changed_at INTEGER NOT NULL);
         CREATE INDEX password_history_by_user ON password_history(user_id, changed_at);
         CREATE TABLE app_passwords(id INTEGER PRIMARY KEY AUTOINCREMENT,
                                    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                                    label TEXT NOT NULL, hash BLOB NOT NULL UNIQUE, created_at INTEGER NOT NULL,
                                    expires_at INTEGER, last_used_at INTEGER);",
    ),
    (5, "ALTER TABLE users ADD COLUMN class TEXT;"),
    (
        6,
        "CREATE TABLE connector_seen(account TEXT NOT NULL, uidl TEXT NOT NULL, first_seen INTEGER NOT NULL,
                                     state TEXT NOT NULL, PRIMARY KEY(account, uidl)) WITHOUT ROWID;
         CREATE TABLE connector_dedup(key BLOB PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
         CREATE INDEX connector_dedup_by_time ON connector_dedup(at);
         CREATE TABLE connector_status(account TEXT PRIMARY KEY, last_run_at INTEGER, last_success_at INTEGER,
                                       last_error TEXT, failures INTEGER NOT NULL, fetched_total INTEGER NOT NULL);
         CREATE TABLE connector_accounts(name TEXT PRIMARY KEY, spec TEXT NOT NULL, created_at INTEGER NOT NULL);
         CREATE TABLE connector_secrets(account TEXT NOT NULL, kind TEXT NOT NULL, sealed BLOB NOT NULL,
                                        updated_at INTEGER NOT NULL, PRIMARY KEY(account, kind));",
    ),
];

fn migrate(conn: &Connection, from: i64) -> StoreResult<()> {
    let mut sql = String::from("BEGIN IMMEDIATE;");
    for (version, step) in MIGRATIONS {
        if *version > from.max(1) {
            sql.push_str(step);
        }
    }
    sql.push_str(&format!("PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"));
    conn.execute_batch(&sql).map_err(map_err)
}

fn open_connection(path: &Path, read_only: bool) -> StoreResult<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags).map_err(map_err)?;
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS)).map_err(map_err)?;
    if !read_only {
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;").map_err(map_err)?;
    }
    conn.execute_batch("PRAGMA foreign_keys = ON;").map_err(map_err)?;
    Ok(conn)
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let outcome = commit_group(&mut conn, &batch);
        match outcome {
            Ok(results) => {
                for (job, r) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed");
                for job in batch {
                    let _ = job.reply.send(Err(StoreError::Temporary(e.to_string())));
                }
            }
        }
    }
}

fn commit_group(conn: &mut Connection, batch: &[Job]) -> rusqlite::Result<Vec<StoreResult<()>>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        tx.execute_batch("SAVEPOINT op")?;
        let r = apply(&tx, &job.op);
        if r.is_ok() {
            tx.execute_batch("RELEASE op")?;
        } else {
            tx.execute_batch("ROLLBACK TO op; RELEASE op")?;
        }
        results.push(r);
    }
    tx.commit()?;
    Ok(results)
}

fn apply(conn: &Connection, op: &WriteOp) -> StoreResult<()> {
    match op {
        WriteOp::SetKeyCheck(v) => conn
            .execute("INSERT OR REPLACE INTO meta(key, value) VALUES('key_check', ?1)", [v])
            .map(drop)
            .map_err(map_err),
        WriteOp::CreateUser { name, credentials, uid, wrapped_key } => {
            mailbox::create_user(conn, name, credentials, uid, wrapped_key)
        }
        WriteOp::SetPassword { name, credentials } => mailbox::set_password(conn, name, credentials),
        WriteOp::ReplaceScram { name, old, new } => mailbox::replace_scram(conn, name, old, new),
        WriteOp::SetDisabled { name, disabled } => mailbox::set_disabled(conn, name, *disabled),
        WriteOp::SetRequireModern { name, required } => mailbox::set_require_modern(conn, name, *required),
        WriteOp::SetClass { name, class } => mailbox::set_class(conn, name, class.as_deref()),
        WriteOp::AddAppPassword { name, label, hash, expires_at } => {
            mailbox::add_app_password(conn, name, label, hash, *expires_at)
        }
        WriteOp::RevokeAppPassword { name, id } => mailbox::revoke_app_password(conn, name, *id),
        WriteOp::UseAppPassword { id } => conn
            .execute(
                "UPDATE app_passwords SET last_used_at = ?2 WHERE id = ?1",
                rusqlite::params![id, crate::types::unix_now()],
            )
            .map(drop)
            .map_err(map_err),
        WriteOp::DeleteUser(name) => mailbox::delete_user(conn, name),
        WriteOp::Deliver(msgs) => message::deliver(conn, msgs),
        WriteOp::Delete { mailbox_id, ids } => message::delete(conn, *mailbox_id, ids),
        WriteOp::PutBan(b) => security::put_ban(conn, b),
        WriteOp::RemoveBan(n) => security::remove(conn, "DELETE FROM bans WHERE network = ?1", n),
        WriteOp::PutLockout(l) => security::put_lockout(conn, l),
        WriteOp::RemoveLockout(u) => security::remove(conn, "DELETE FROM lockouts WHERE user = ?1", u),
        WriteOp::ConnectorCommit(c) => connector::commit(conn, c),
        WriteOp::ConnectorForget { account, uidls } => connector::forget(conn, account, uidls),
        WriteOp::ConnectorResync { account, uidls } => connector::resync(conn, account, uidls),
        WriteOp::DedupPrune(before) => {
            conn.execute("DELETE FROM connector_dedup WHERE at < ?1", [before]).map(drop).map_err(map_err)
        }
        WriteOp::PutConnectorStatus(s) => connector::put_status(conn, s),
        WriteOp::AddConnectorAccount { name, spec } => connector::add_account(conn, name, spec),
        WriteOp::RemoveConnectorAccount(name) => connector::remove_account(conn, name),
        WriteOp::PutConnectorSecret { account, kind, sealed } => connector::put_secret(conn, account, kind, sealed),
    }
}

/// Busy, locked, full or I/O trouble is temporary; anything else needs an
/// operator.
pub(crate) fn map_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, DatabaseBusy | DatabaseLocked | SystemIoFailure | DiskFull | OutOfMemory) =>
        {
            StoreError::Temporary(e.to_string())
        }
        _ => StoreError::Permanent(e.to_string()),
    }
}

#[async_trait]
impl Store for SqliteStore {
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
        self.read(move |c| mailbox::user(c, &name)).await?
    }

    async fn users(&self) -> StoreResult<Vec<UserSummary>> {
        self.read(mailbox::users).await?
    }

    async fn set_password(&self, name: &UserName, credentials: &StoredCredentials) -> StoreResult<()> {
        self.write(WriteOp::SetPassword { name: name.clone(), credentials: credentials.clone() }).await
    }

    async fn plaintext_scram(&self) -> StoreResult<Vec<(UserName, String)>> {
        self.read(mailbox::plaintext_scram).await?
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
        self.read(move |c| mailbox::password_history(c, &name)).await
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

    async fn app_passwords(&self, name: &UserName) -> StoreResult<Vec<crate::store::AppPasswordInfo>> {
        let name = name.clone();
        self.read(move |c| mailbox::app_passwords(c, &name)).await
    }

    async fn revoke_app_password(&self, name: &UserName, id: i64) -> StoreResult<bool> {
        self.write_existed(WriteOp::RevokeAppPassword { name: name.clone(), id }).await
    }

    async fn use_app_password(&self, keyed_hash: Vec<u8>) -> StoreResult<Option<UserName>> {
        let found = self.read(move |c| mailbox::find_app_password(c, &keyed_hash)).await?;
        let Some((id, name)) = found else { return Ok(None) };
        self.write(WriteOp::UseAppPassword { id }).await?;
        Ok(UserName::parse(&name).ok())
    }

    async fn find_app_password(&self, keyed_hash: Vec<u8>) -> StoreResult<Option<(i64, UserName)>> {
        let found = self.read(move |c| mailbox::find_app_password(c, &keyed_hash)).await?;
        Ok(found.and_then(|(id, name)| UserName::parse(&name).ok().map(|n| (id, n))))
    }

    async fn mark_app_password_used(&self, id: i64) -> StoreResult<()> {
        self.write(WriteOp::UseAppPassword { id }).await
    }

    async fn delete_user(&self, name: &UserName) -> StoreResult<()> {
        self.write(WriteOp::DeleteUser(name.clone())).await
    }

    async fn lock_maildrop(&self, mailbox_id: i64) -> StoreResult<MaildropLock> {
        mailbox::lock(&self.lock_dir, mailbox_id)
    }

    async fn messages(&self, mailbox_id: i64) -> StoreResult<Vec<MessageMeta>> {
        self.read(move |c| message::list(c, mailbox_id)).await
    }

    async fn chunk(&self, message_id: i64, index: u32) -> StoreResult<Vec<u8>> {
        self.read(move |c| message::chunk(c, message_id, index)).await?
    }

    async fn deliver(&self, messages: Vec<NewMessage>) -> StoreResult<()> {
        if messages.is_empty() {
            return Ok(());
        }
        self.write(WriteOp::Deliver(messages)).await
    }

    async fn delete_messages(&self, mailbox_id: i64, ids: Vec<i64>) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.write(WriteOp::Delete { mailbox_id, ids }).await
    }

    async fn imported(&self, mailbox_id: i64, keys: Vec<String>) -> StoreResult<Vec<String>> {
        self.read(move |c| message::imported(c, mailbox_id, keys)).await
    }

    async fn bans(&self) -> StoreResult<Vec<BanRecord>> {
        self.read(security::bans).await
    }

    async fn put_ban(&self, ban: BanRecord) -> StoreResult<()> {
        self.write(WriteOp::PutBan(ban)).await
    }

    async fn remove_ban(&self, network: ipnet::IpNet) -> StoreResult<bool> {
        self.write_existed(WriteOp::RemoveBan(network.to_string())).await
    }

    async fn lockouts(&self) -> StoreResult<Vec<LockoutRecord>> {
        self.read(security::lockouts).await
    }

    async fn put_lockout(&self, lockout: LockoutRecord) -> StoreResult<()> {
        self.write(WriteOp::PutLockout(lockout)).await
    }

    async fn remove_lockout(&self, user: &str) -> StoreResult<bool> {
        self.write_existed(WriteOp::RemoveLockout(user.to_ascii_lowercase())).await
    }

    async fn lock_connector(&self, account: &str) -> StoreResult<MaildropLock> {
        mailbox::lock_named(&self.lock_dir, &format!("connector-{account}"))
    }

    async fn connector_seen(&self, account: &str) -> StoreResult<Vec<SeenUid>> {
        let account = account.to_owned();
        self.read(move |c| connector::seen(c, &account)).await
    }

    async fn connector_commit(&self, commit: ConnectorCommit) -> StoreResult<()> {
        self.write(WriteOp::ConnectorCommit(commit)).await
    }

    async fn connector_forget(&self, account: &str, uidls: Vec<String>) -> StoreResult<()> {
        if uidls.is_empty() {
            return Ok(());
        }
        self.write(WriteOp::ConnectorForget { account: account.to_owned(), uidls }).await
    }

    async fn connector_resync(&self, account: &str, uidls: Vec<String>) -> StoreResult<()> {
        self.write(WriteOp::ConnectorResync { account: account.to_owned(), uidls }).await
    }

    async fn dedup_known(&self, keys: Vec<DedupKey>) -> StoreResult<Vec<DedupKey>> {
        self.read(move |c| connector::dedup_known(c, keys)).await
    }

    async fn dedup_prune(&self, before: i64) -> StoreResult<()> {
        self.write(WriteOp::DedupPrune(before)).await
    }

    async fn connector_status(&self, account: &str) -> StoreResult<Option<ConnectorStatus>> {
        let account = account.to_owned();
        self.read(move |c| connector::status(c, &account)).await
    }

    async fn put_connector_status(&self, status: ConnectorStatus) -> StoreResult<()> {
        self.write(WriteOp::PutConnectorStatus(status)).await
    }

    async fn connector_accounts(&self) -> StoreResult<Vec<(String, String)>> {
        self.read(connector::accounts).await
    }

    async fn add_connector_account(&self, name: &str, toml: &str) -> StoreResult<()> {
        self.write(WriteOp::AddConnectorAccount { name: name.to_owned(), spec: toml.to_owned() }).await
    }

    async fn remove_connector_account(&self, name: &str) -> StoreResult<bool> {
        self.write_existed(WriteOp::RemoveConnectorAccount(name.to_owned())).await
    }

    async fn connector_secret(&self, account: &str, kind: &str) -> StoreResult<Option<Vec<u8>>> {
        let (account, kind) = (account.to_owned(), kind.to_owned());
        self.read(move |c| connector::secret(c, &account, &kind)).await
    }

    async fn put_connector_secret(&self, account: &str, kind: &str, sealed: Vec<u8>) -> StoreResult<()> {
        self.write(WriteOp::PutConnectorSecret { account: account.to_owned(), kind: kind.to_owned(), sealed }).await
    }
}
