//! Embedded SQLite backend (the default).
//!
//! - WAL journal with `synchronous = FULL`: a commit is on stable storage
//!   when it returns.
//! - One writer thread owns the only write connection and commits queued
//!   writes in groups (group commit): under concurrent LMTP load many
//!   deliveries share one fsync, yet every caller is answered only after the
//!   commit that contains its write. Each write runs in its own savepoint,
//!   so one failing write does not take the others down with it; a group
//!   that fails for want of space or I/O is rolled back whole and every
//!   write in it gets a temporary error.
//! - Read-only mode: when the database cannot be written (disk full, I/O
//!   errors) the store keeps serving reads and answers every write with a
//!   temporary error without touching the database. It starts that way
//!   when it opens on a full disk (an existing database at the current
//!   schema opens without writing anything), and enters it when a commit
//!   fails and the database cannot be written. The writer probes every
//!   [`PROBE_INTERVAL`] (free space, then a write transaction opened and
//!   rolled back) and returns to normal by itself. Both changes are
//!   events (`store_read_only`, `store_writable_again`).
//! - Space under pressure: the WAL is truncated back to
//!   [`WAL_SIZE_LIMIT`] after checkpoints, and to zero after every commit
//!   while less than [`LOW_SPACE_BYTES`] are free and after a failed
//!   commit, so freed space goes to mail instead of a WAL growing beside
//!   the database.
//! - Readers use a small pool of read-only connections on the blocking pool.
//! - Leases (maildrops, connector accounts) are `flock`s on one file per
//!   resource next to the database, exclusive across sessions and processes
//!   and released by the kernel if a process dies, plus a row in `leases`
//!   holding the fencing token and expiry, which fenced commits check in
//!   their own transaction (`lease.rs`).
//! - One file per role, each with its role trait's `impl`: `accounts.rs`,
//!   `message.rs`, `security.rs`, `connector.rs`, `lease.rs`, `audit.rs`, `admin.rs`; this file
//!   holds the schema, the writer thread and the reader pool.

mod accounts;
mod admin;
mod audit;
mod connector;
mod events;
mod lease;
mod message;
mod security;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use super::{
    BanRecord, ConnectorCommit, ConnectorStatus, FencingToken, KnownAddress, LockoutRecord, MessageSource, NewMessage,
    StoreError, StoreResult, StoredCredentials,
};
use crate::crypto::RecordId;
use crate::events::{emit, SecurityEvent};
use crate::types::{MailboxId, MessageId, UserName};

/// Most writes committed in one transaction; bounds the latency one
/// delivery can add to the others in its group.
const MAX_GROUP: usize = 256;
/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 8;
/// How long a connection waits for another process's lock before the
/// operation fails with a temporary error.
const BUSY_TIMEOUT_MS: u64 = 5000;
/// How often a read-only store checks whether it can write again.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Free bytes a read-only store waits for before it writes again: room for
/// a delivery and its WAL copy, so it does not fail again at once.
const RESUME_FREE_BYTES: u64 = 1 << 20;
/// Below this many free bytes every commit is followed by a truncating
/// checkpoint: the WAL then never holds space the next delivery needs.
const LOW_SPACE_BYTES: u64 = 64 << 20;
/// Bytes the WAL keeps after a checkpoint (SQLite `journal_size_limit`):
/// the default auto-checkpoint size, so one large transaction does not
/// leave a WAL of its size behind for good.
const WAL_SIZE_LIMIT: i64 = 4 << 20;

const SCHEMA_VERSION: i64 = 11;
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
CREATE TABLE IF NOT EXISTS audit_log(
    seq INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    actor TEXT NOT NULL,
    source TEXT,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    before TEXT,
    after TEXT,
    mac BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_by_time ON audit_log(time);
CREATE TABLE IF NOT EXISTS audit_checkpoints(
    seq INTEGER PRIMARY KEY,
    mac BLOB NOT NULL,
    time INTEGER NOT NULL,
    signature BLOB NOT NULL
);
";

/// A write, executed by the writer thread.
enum WriteOp {
    SetKeyCheck(Vec<u8>),
    CreateUser {
        name: UserName,
        credentials: StoredCredentials,
        uid: RecordId,
        wrapped_key: Vec<u8>,
    },
    SetPassword {
        name: UserName,
        credentials: StoredCredentials,
    },
    ReplaceScram {
        name: UserName,
        old: String,
        new: String,
    },
    SetDisabled {
        name: UserName,
        disabled: bool,
    },
    SetRequireModern {
        name: UserName,
        required: bool,
    },
    SetClass {
        name: UserName,
        class: Option<String>,
    },
    AddAppPassword {
        name: UserName,
        label: String,
        hash: Vec<u8>,
        expires_at: Option<i64>,
    },
    RevokeAppPassword {
        name: UserName,
        id: i64,
    },
    UseAppPassword {
        id: i64,
    },
    DeleteUser(UserName),
    Deliver(Vec<NewMessage>),
    DeliverSealed(Arc<dyn MessageSource>),
    Delete {
        mailbox_id: MailboxId,
        ids: Vec<MessageId>,
        fence: FencingToken,
    },
    PutBan(BanRecord),
    RemoveBan(String),
    PutLockout(LockoutRecord),
    RemoveLockout(String),
    PutKnownAddress(KnownAddress),
    PurgeSecurity {
        now: i64,
        known_before: i64,
    },
    ConnectorCommit(ConnectorCommit, FencingToken),
    ConnectorForget {
        account: String,
        uidls: Vec<String>,
        fence: FencingToken,
    },
    ConnectorResync {
        account: String,
        uidls: Vec<String>,
        fence: FencingToken,
    },
    DedupPrune(i64),
    PutConnectorStatus(ConnectorStatus, FencingToken),
    AddConnectorAccount {
        name: String,
        spec: String,
    },
    RemoveConnectorAccount(String),
    PutConnectorSecret {
        account: String,
        kind: String,
        sealed: Vec<u8>,
    },
    /// Records (or renews) a lease: see [`lease::record`].
    RecordLease {
        resource: String,
        token: FencingToken,
        holder: String,
        expires_at: i64,
    },
    ReleaseLease {
        resource: String,
        token: FencingToken,
    },
    /// Appends an audit record after the tail: see [`audit::append`].
    AppendAudit {
        record: super::StoredAuditRecord,
        chain: Arc<dyn super::AuditChain>,
        out: audit::AuditSlot,
    },
    PutAuditCheckpoint(super::AuditCheckpoint),
    /// A batch of telemetry events (`events.rs`).
    AppendEvents(Vec<super::StoredEvent>),
    /// Retention of the event store: before (unix ms), keep at most, and
    /// where the number of deleted rows goes.
    PruneEvents {
        before: i64,
        keep_at_most: u64,
        out: Arc<std::sync::atomic::AtomicU64>,
    },
    /// Administrators, factors, recovery codes, service tokens.
    Admin(admin::AdminWrite),
}

struct Job {
    op: WriteOp,
    reply: oneshot::Sender<StoreResult<()>>,
}

pub struct SqliteStore {
    lock_dir: PathBuf,
    writer: Arc<WriterHandle>,
    shared: Arc<Shared>,
}

/// The queue to the writer thread; shared with the lease guards, which
/// renew and release through it.
struct WriterHandle(Mutex<mpsc::Sender<Job>>);

impl WriterHandle {
    async fn write(&self, op: WriteOp) -> StoreResult<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Job { op, reply })?;
        rx.await.map_err(|_| StoreError::Permanent("store writer stopped".into()))?
    }

    /// Queues a write without waiting for its outcome.
    fn write_detached(&self, op: WriteOp) {
        let (reply, _) = oneshot::channel();
        let _ = self.send(Job { op, reply });
    }

    fn send(&self, job: Job) -> StoreResult<()> {
        let writer = self.0.lock().map_err(|_| StoreError::Permanent("writer poisoned".into()))?;
        writer.send(job).map_err(|_| StoreError::Permanent("store writer stopped".into()))
    }
}

/// Free bytes on the file system holding the database; `None` when
/// unknown. A function so tests can simulate a full disk.
type FreeSpace = Arc<dyn Fn(&Path) -> Option<u64> + Send + Sync>;

/// What the writer thread and the readers share.
struct Shared {
    path: PathBuf,
    /// False while the store refuses writes because it cannot write (disk
    /// full, I/O errors): reads go on, writes answer a temporary error
    /// without touching the database, and the writer probes until it can
    /// write again.
    writable: AtomicBool,
    readers: Mutex<ReaderPool>,
    free_space: FreeSpace,
}

/// Idle read connections.
struct ReaderPool {
    idle: Vec<Connection>,
    /// Readers open the database `immutable`: only after a read-only start
    /// on a full disk where the WAL index (`-shm`) cannot be created and the
    /// WAL is empty, so the database file alone is the whole state and no
    /// one can write it until space comes back.
    immutable: bool,
    /// Bumped when `immutable` changes, so a connection of the old kind is
    /// closed instead of pooled again.
    generation: u64,
}

impl Shared {
    fn writable(&self) -> bool {
        self.writable.load(Ordering::SeqCst)
    }

    fn free_space(&self) -> Option<u64> {
        (self.free_space)(&self.path)
    }

    fn reader(&self) -> StoreResult<(Connection, u64)> {
        // Immutable readers are right only while nothing writes. Another
        // process (a CLI command once space is back) writes to the WAL
        // first: from then on read through the WAL like everyone else.
        if self.readers_immutable() && !wal_is_empty(&self.path) {
            self.set_readers_immutable(false);
        }
        let (pooled, immutable, generation) = {
            let mut pool = self.readers.lock().map_err(|_| StoreError::Permanent("reader pool poisoned".into()))?;
            (pool.idle.pop(), pool.immutable, pool.generation)
        };
        match pooled {
            Some(c) => Ok((c, generation)),
            None => Ok((open_reader(&self.path, immutable)?, generation)),
        }
    }

    fn give_back(&self, conn: Connection, generation: u64) {
        if let Ok(mut pool) = self.readers.lock() {
            if pool.generation == generation && pool.idle.len() < MAX_IDLE_READERS {
                pool.idle.push(conn);
            }
        }
    }

    fn readers_immutable(&self) -> bool {
        self.readers.lock().map(|p| p.immutable).unwrap_or(false)
    }

    fn set_readers_immutable(&self, immutable: bool) {
        if let Ok(mut pool) = self.readers.lock() {
            if pool.immutable != immutable {
                pool.immutable = immutable;
                pool.generation += 1;
                pool.idle.clear();
            }
        }
    }
}

/// Free space reported by `statvfs` for unprivileged users.
fn statvfs_free(path: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    ///
    /// A database that exists and needs no schema change opens without a
    /// single write. When it cannot be written (disk full, read-only file
    /// system, I/O errors) the store starts read-only; a needed schema
    /// upgrade that cannot be written refuses to start instead.
    pub fn open(path: &Path) -> StoreResult<Self> {
        Self::open_with(path, Arc::new(statvfs_free))
    }

    fn open_with(path: &Path, free_space: FreeSpace) -> StoreResult<Self> {
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

        let shared = Arc::new(Shared {
            path: path.to_owned(),
            writable: AtomicBool::new(true),
            readers: Mutex::new(ReaderPool { idle: Vec::new(), immutable: false, generation: 0 }),
            free_space,
        });
        let (conn, version) = match open_connection(path, false).and_then(|c| {
            let v = schema_version(&c)?;
            Ok((c, v))
        }) {
            Ok((c, v)) => (Some(c), v),
            // Cannot open for writing (typically: the WAL index cannot be
            // created on a full disk): read what is there.
            Err(StoreError::Temporary(why)) => {
                tracing::warn!(error = %why, "store cannot be opened for writing");
                (None, startup_read(&shared, schema_version)?)
            }
            Err(e) => return Err(e),
        };
        if version > SCHEMA_VERSION {
            return Err(StoreError::Permanent(format!(
                "database schema {version} is newer than this program understands ({SCHEMA_VERSION})"
            )));
        }
        if version < SCHEMA_VERSION {
            // Data safety first: an upgrade is one transaction, and one that
            // cannot be written leaves the database as it was.
            let upgraded = match &conn {
                Some(c) => c.execute_batch(SCHEMA).map_err(map_err).and_then(|()| migrate(c, version)),
                None => Err(StoreError::Temporary("cannot open the database for writing".into())),
            };
            if let Err(e) = upgraded {
                return Err(StoreError::Permanent(format!(
                    "the database needs an upgrade from schema {version} to {SCHEMA_VERSION}, which could not be \
                     written ({e}); it is unchanged: free disk space on its file system and start again"
                )));
            }
        }
        let integrity = match &conn {
            Some(c) => quick_check(c)?,
            None => startup_read(&shared, quick_check)?,
        };
        if integrity != "ok" {
            return Err(StoreError::Permanent(format!("database integrity check failed: {integrity}")));
        }

        let mut writer = Writer { shared: shared.clone(), conn, apply, next_probe: Instant::now() };
        if let Err(why) = writer.can_write() {
            writer.enter_read_only(&why);
        }
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Permanent(format!("spawn writer: {e}")))?;
        Ok(Self { lock_dir, writer: Arc::new(WriterHandle(Mutex::new(tx))), shared })
    }

    async fn write(&self, op: WriteOp) -> StoreResult<()> {
        let started = Instant::now();
        let r = self.writer.write(op).await;
        crate::telemetry::metrics::Metrics::global().store_write(started.elapsed().as_secs_f64());
        r
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
        let shared = self.shared.clone();
        let started = Instant::now();
        let r = tokio::task::spawn_blocking(move || {
            let (conn, generation) = shared.reader()?;
            let result = f(&conn).map_err(map_err);
            shared.give_back(conn, generation);
            result
        })
        .await
        .map_err(|e| StoreError::Permanent(format!("reader task: {e}")))?;
        crate::telemetry::metrics::Metrics::global().store_read(started.elapsed().as_secs_f64());
        r
    }
}

fn schema_version(conn: &Connection) -> StoreResult<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(map_err)
}

fn quick_check(conn: &Connection) -> StoreResult<String> {
    conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(map_err)
}

/// A startup read through a read-only connection. On a full disk after a
/// clean stop even a reader cannot create the WAL index; when the WAL holds
/// nothing the database file is complete, and readers open it immutable.
fn startup_read<T>(shared: &Shared, f: impl Fn(&Connection) -> StoreResult<T>) -> StoreResult<T> {
    let attempt = |shared: &Shared| {
        let (conn, generation) = shared.reader()?;
        let r = f(&conn)?;
        shared.give_back(conn, generation);
        Ok(r)
    };
    match attempt(shared) {
        Err(StoreError::Temporary(why)) if wal_is_empty(&shared.path) => {
            tracing::warn!(error = %why, "the WAL index cannot be created; reading the database file as it is");
            shared.set_readers_immutable(true);
            attempt(shared)
        }
        other => other,
    }
}

fn wal_is_empty(path: &Path) -> bool {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    match std::fs::metadata(PathBuf::from(wal)) {
        Ok(m) => m.len() == 0,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
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
    (
        7,
        "CREATE TABLE known_addresses(user TEXT NOT NULL, network TEXT NOT NULL, last_seen INTEGER NOT NULL,
                                      PRIMARY KEY(user, network)) WITHOUT ROWID;
         CREATE INDEX known_addresses_by_time ON known_addresses(last_seen);
         CREATE INDEX bans_by_expiry ON bans(expires_at);
         CREATE INDEX lockouts_by_until ON lockouts(until);",
    ),
    (
        8,
        "CREATE TABLE leases(resource TEXT PRIMARY KEY, token INTEGER NOT NULL, holder TEXT NOT NULL,
                             expires_at INTEGER NOT NULL) WITHOUT ROWID;",
    ),
    // Administrators of the admin plane, their factors, recovery codes and
    // service tokens (`admin.rs` holds the statements).
    (9, admin::TABLES),
    // The audit log (`audit.rs`); `IF NOT EXISTS` because SCHEMA creates
    // the same tables for fresh databases.
    (
        10,
        "CREATE TABLE IF NOT EXISTS audit_log(seq INTEGER PRIMARY KEY, time INTEGER NOT NULL, actor TEXT NOT NULL,
                                            source TEXT, action TEXT NOT NULL, target TEXT NOT NULL,
                                            outcome TEXT NOT NULL, before TEXT, after TEXT, mac BLOB NOT NULL);
         CREATE INDEX IF NOT EXISTS audit_log_by_time ON audit_log(time);
         CREATE TABLE IF NOT EXISTS audit_checkpoints(seq INTEGER PRIMARY KEY, mac BLOB NOT NULL,
                                                      time INTEGER NOT NULL, signature BLOB NOT NULL);",
    ),
    // The local event store (`events.rs`).
    (11, events::TABLES),
];

fn migrate(conn: &Connection, from: i64) -> StoreResult<()> {
    let mut sql = String::from("BEGIN IMMEDIATE;");
    for (version, step) in MIGRATIONS {
        if *version > from.max(1) {
            sql.push_str(step);
        }
    }
    sql.push_str(&format!("PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"));
    conn.execute_batch(&sql).map_err(|e| {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        map_err(e)
    })
}

fn open_connection(path: &Path, read_only: bool) -> StoreResult<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags).map_err(map_err)?;
    configure(&conn, read_only)?;
    Ok(conn)
}

fn configure(conn: &Connection, read_only: bool) -> StoreResult<()> {
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS)).map_err(map_err)?;
    if !read_only {
        // Setting WAL mode writes only when the database is not in it yet.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};"
        ))
        .map_err(map_err)?;
    }
    conn.execute_batch("PRAGMA foreign_keys = ON;").map_err(map_err)
}

/// A read-only connection; `immutable` reads the database file alone,
/// without the WAL and its index (see [`ReaderPool::immutable`]).
fn open_reader(path: &Path, immutable: bool) -> StoreResult<Connection> {
    if !immutable {
        return open_connection(path, true);
    }
    let mut uri = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri.push_str("?immutable=1");
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(uri, flags).map_err(map_err)?;
    configure(&conn, true)?;
    Ok(conn)
}

/// The writer thread: owns the only write connection (none while it
/// cannot be opened) and the writable/read-only state.
struct Writer {
    shared: Arc<Shared>,
    conn: Option<Connection>,
    /// [`apply`]; a field so tests can inject the failures of a full disk.
    apply: ApplyFn,
    /// When a read-only store next checks whether it can write again.
    next_probe: Instant,
}

type ApplyFn = fn(&Connection, &WriteOp) -> StoreResult<()>;

/// What a refused write answers while the store is read-only.
const READ_ONLY: &str = "the store is read-only until disk space is available";

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            if !self.shared.writable() && Instant::now() >= self.next_probe {
                self.probe();
            }
            let first = if self.shared.writable() {
                match rx.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            } else {
                match rx.recv_timeout(self.next_probe.saturating_duration_since(Instant::now())) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            };
            let mut batch = vec![first];
            while batch.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&mut self, batch: Vec<Job>) {
        let conn = match &self.conn {
            Some(c) if self.shared.writable() => c,
            _ => {
                for job in batch {
                    let _ = job.reply.send(Err(StoreError::Temporary(READ_ONLY.into())));
                }
                return;
            }
        };
        let ops: Vec<&WriteOp> = batch.iter().map(|j| &j.op).collect();
        match commit_group(conn, &ops, self.apply) {
            Ok(results) => {
                for (job, r) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(r);
                }
                if self.shared.free_space().is_some_and(|f| f < LOW_SPACE_BYTES) {
                    self.truncate_wal();
                }
            }
            Err(cause) => {
                // Whatever the failed group left in the WAL goes back to
                // the file system before deciding whether we can go on.
                self.truncate_wal();
                match self.can_write() {
                    Ok(()) => tracing::error!(error = %cause, "store commit failed"),
                    Err(why) => self.enter_read_only(&format!("{cause}; {why}")),
                }
                for job in batch {
                    let _ = job.reply.send(Err(StoreError::Temporary(cause.clone())));
                }
            }
        }
    }

    /// Checkpoints the whole WAL into the database and truncates it to zero
    /// bytes, so the space it held is free again (best effort).
    fn truncate_wal(&self) {
        if let Some(c) = &self.conn {
            if let Err(e) = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                tracing::debug!(error = %e, "WAL checkpoint failed");
            }
        }
    }

    /// Whether a write can be committed now: enough free space, a write
    /// connection, and the write lock (a transaction opened and rolled
    /// back, which writes nothing).
    fn can_write(&mut self) -> Result<(), String> {
        if let Some(free) = self.shared.free_space() {
            if free < RESUME_FREE_BYTES {
                return Err(format!("{free} bytes free, {RESUME_FREE_BYTES} needed"));
            }
        }
        if self.conn.is_none() {
            self.conn = Some(open_connection(&self.shared.path, false).map_err(|e| e.to_string())?);
        }
        let conn = self.conn.as_ref().ok_or("no write connection")?;
        match conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;") {
            Ok(()) => Ok(()),
            // Another process holding the write lock (an import, a CLI
            // command) says nothing about space.
            Err(rusqlite::Error::SqliteFailure(f, _))
                if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) =>
            {
                Ok(())
            }
            Err(e) => {
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                Err(e.to_string())
            }
        }
    }

    fn probe(&mut self) {
        self.next_probe = Instant::now() + PROBE_INTERVAL;
        if self.can_write().is_ok() {
            self.shared.set_readers_immutable(false);
            self.truncate_wal();
            self.shared.writable.store(true, Ordering::SeqCst);
            emit(SecurityEvent::StoreWritableAgain);
        }
    }

    fn enter_read_only(&mut self, why: &str) {
        self.next_probe = Instant::now() + PROBE_INTERVAL;
        if self.shared.writable.swap(false, Ordering::SeqCst) {
            emit(SecurityEvent::StoreReadOnly { reason: why });
        }
    }
}

/// Commits `ops` in one transaction, each in its own savepoint so one
/// failing write does not take the others down with it. A temporary error
/// (disk full, I/O) or a failure of the transaction itself rolls back the
/// whole group, explicitly: SQLite may already have rolled the transaction
/// back on its own, taking every savepoint with it.
fn commit_group(
    conn: &Connection,
    ops: &[&WriteOp],
    apply: impl Fn(&Connection, &WriteOp) -> StoreResult<()>,
) -> Result<Vec<StoreResult<()>>, String> {
    fn abort(conn: &Connection, cause: String) -> String {
        if !conn.is_autocommit() {
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                tracing::warn!(error = %e, "rollback of a failed commit group failed");
            }
        }
        cause
    }
    conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| abort(conn, e.to_string()))?;
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        conn.execute_batch("SAVEPOINT op").map_err(|e| abort(conn, e.to_string()))?;
        match apply(conn, op) {
            Ok(()) => conn.execute_batch("RELEASE op").map_err(|e| abort(conn, e.to_string()))?,
            Err(e @ StoreError::Temporary(_)) => return Err(abort(conn, e.to_string())),
            Err(e) if conn.is_autocommit() => return Err(abort(conn, e.to_string())),
            Err(e) => {
                conn.execute_batch("ROLLBACK TO op; RELEASE op").map_err(|e| abort(conn, e.to_string()))?;
                results.push(Err(e));
                continue;
            }
        }
        results.push(Ok(()));
    }
    conn.execute_batch("COMMIT").map_err(|e| abort(conn, e.to_string()))?;
    Ok(results)
}

fn apply(conn: &Connection, op: &WriteOp) -> StoreResult<()> {
    match op {
        WriteOp::SetKeyCheck(v) => conn
            .execute("INSERT OR REPLACE INTO meta(key, value) VALUES('key_check', ?1)", [v])
            .map(drop)
            .map_err(map_err),
        WriteOp::CreateUser { name, credentials, uid, wrapped_key } => {
            accounts::create_user(conn, name, credentials, uid, wrapped_key)
        }
        WriteOp::SetPassword { name, credentials } => accounts::set_password(conn, name, credentials),
        WriteOp::ReplaceScram { name, old, new } => accounts::replace_scram(conn, name, old, new),
        WriteOp::SetDisabled { name, disabled } => accounts::set_disabled(conn, name, *disabled),
        WriteOp::SetRequireModern { name, required } => accounts::set_require_modern(conn, name, *required),
        WriteOp::SetClass { name, class } => accounts::set_class(conn, name, class.as_deref()),
        WriteOp::AddAppPassword { name, label, hash, expires_at } => {
            accounts::add_app_password(conn, name, label, hash, *expires_at)
        }
        WriteOp::RevokeAppPassword { name, id } => accounts::revoke_app_password(conn, name, *id),
        WriteOp::UseAppPassword { id } => conn
            .execute(
                "UPDATE app_passwords SET last_used_at = ?2 WHERE id = ?1",
                rusqlite::params![id, crate::types::unix_now()],
            )
            .map(drop)
            .map_err(map_err),
        WriteOp::DeleteUser(name) => accounts::delete_user(conn, name),
        WriteOp::Deliver(msgs) => message::deliver(conn, msgs),
        WriteOp::DeliverSealed(source) => message::deliver_sealed(conn, source.as_ref()),
        WriteOp::Delete { mailbox_id, ids, fence } => {
            lease::check(conn, &super::LeaseResource::Maildrop(*mailbox_id), *fence)?;
            message::delete(conn, *mailbox_id, ids)
        }
        WriteOp::PutBan(b) => security::put_ban(conn, b),
        WriteOp::RemoveBan(n) => security::remove(conn, "DELETE FROM bans WHERE network = ?1", n),
        WriteOp::PutLockout(l) => security::put_lockout(conn, l),
        WriteOp::RemoveLockout(u) => security::remove(conn, "DELETE FROM lockouts WHERE user = ?1", u),
        WriteOp::PutKnownAddress(k) => security::put_known(conn, k),
        WriteOp::PurgeSecurity { now, known_before } => security::purge(conn, *now, *known_before),
        WriteOp::ConnectorCommit(c, fence) => {
            lease::check_connector(conn, &c.account, *fence)?;
            connector::commit(conn, c)
        }
        WriteOp::ConnectorForget { account, uidls, fence } => {
            lease::check_connector(conn, account, *fence)?;
            connector::forget(conn, account, uidls)
        }
        WriteOp::ConnectorResync { account, uidls, fence } => {
            lease::check_connector(conn, account, *fence)?;
            connector::resync(conn, account, uidls)
        }
        WriteOp::DedupPrune(before) => {
            conn.execute("DELETE FROM connector_dedup WHERE at < ?1", [before]).map(drop).map_err(map_err)
        }
        WriteOp::PutConnectorStatus(s, fence) => {
            lease::check_connector(conn, &s.account, *fence)?;
            connector::put_status(conn, s)
        }
        WriteOp::AddConnectorAccount { name, spec } => connector::add_account(conn, name, spec),
        WriteOp::RemoveConnectorAccount(name) => connector::remove_account(conn, name),
        WriteOp::PutConnectorSecret { account, kind, sealed } => connector::put_secret(conn, account, kind, sealed),
        WriteOp::RecordLease { resource, token, holder, expires_at } => {
            lease::record(conn, resource, *token, holder, *expires_at)
        }
        WriteOp::ReleaseLease { resource, token } => lease::release(conn, resource, *token),
        WriteOp::AppendAudit { record, chain, out } => audit::append(conn, record, chain.as_ref(), out),
        WriteOp::PutAuditCheckpoint(c) => audit::put_checkpoint(conn, c),
        WriteOp::AppendEvents(batch) => events::append(conn, batch),
        WriteOp::PruneEvents { before, keep_at_most, out } => events::prune(conn, *before, *keep_at_most, out),
        WriteOp::Admin(w) => admin::apply(conn, w),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::prelude::*;
    use std::sync::atomic::AtomicU64;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("p3x-sqlite-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn db(&self) -> PathBuf {
            self.0.join("s.db")
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn name(n: &str) -> UserName {
        UserName::parse(n).unwrap()
    }

    fn message(mailbox_id: MailboxId, body: &[u8]) -> NewMessage {
        NewMessage {
            mailbox_id,
            uid: crate::crypto::random_id(),
            size: body.len() as u64,
            chunks: vec![body.to_vec()],
            import_key: None,
        }
    }

    /// What SQLite does on SQLITE_FULL in the middle of a write: it rolls
    /// the whole transaction back on its own (savepoints included) and the
    /// statement fails with "database or disk is full". `DedupPrune(-1)`
    /// is the write that meets the full disk.
    fn apply_on_full_disk(conn: &Connection, op: &WriteOp) -> StoreResult<()> {
        if let WriteOp::DedupPrune(-1) = op {
            conn.execute_batch("ROLLBACK").unwrap();
            return Err(map_err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                Some("database or disk is full".into()),
            )));
        }
        apply(conn, op)
    }

    fn writer_on(db: &Path) -> Writer {
        let shared = Arc::new(Shared {
            path: db.to_owned(),
            writable: AtomicBool::new(true),
            readers: Mutex::new(ReaderPool { idle: Vec::new(), immutable: false, generation: 0 }),
            free_space: Arc::new(|_: &Path| None),
        });
        let conn = open_connection(db, false).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        migrate(&conn, 0).unwrap();
        Writer { shared, conn: Some(conn), apply: apply_on_full_disk, next_probe: Instant::now() }
    }

    fn job(op: WriteOp) -> (Job, oneshot::Receiver<StoreResult<()>>) {
        let (reply, rx) = oneshot::channel();
        (Job { op, reply }, rx)
    }

    fn key_check(w: &Writer) -> Option<Vec<u8>> {
        use rusqlite::OptionalExtension;
        let conn = w.conn.as_ref().unwrap();
        conn.query_row("SELECT value FROM meta WHERE key = 'key_check'", [], |r| r.get(0)).optional().unwrap()
    }

    #[test]
    fn disk_full_group_is_rolled_back_without_no_such_savepoint() {
        let dir = TempDir::new("savepoint");
        let mut w = writer_on(&dir.db());
        let (a, ra) = job(WriteOp::SetKeyCheck(vec![1]));
        let (b, rb) = job(WriteOp::DedupPrune(-1));
        let (c, rc) = job(WriteOp::SetKeyCheck(vec![2]));
        w.commit(vec![a, b, c]);
        for mut rx in [ra, rb, rc] {
            match rx.try_recv().expect("every job in the group is answered") {
                Err(StoreError::Temporary(why)) => {
                    assert!(!why.contains("savepoint"), "{why}");
                    assert!(why.contains("full"), "{why}");
                }
                other => panic!("expected a temporary error (LMTP 451), got {other:?}"),
            }
        }
        let conn = w.conn.as_ref().unwrap();
        assert!(conn.is_autocommit(), "the failed group left a transaction open");
        assert_eq!(key_check(&w), None, "a write of the failed group was committed");

        // The next group commits normally.
        let (d, mut rd) = job(WriteOp::SetKeyCheck(vec![3]));
        w.commit(vec![d]);
        assert!(matches!(rd.try_recv(), Ok(Ok(()))));
        assert_eq!(key_check(&w), Some(vec![3]));
    }

    #[test]
    fn one_refused_write_leaves_the_rest_of_its_group() {
        let dir = TempDir::new("isolation");
        let mut w = writer_on(&dir.db());
        let (a, mut ra) = job(WriteOp::SetKeyCheck(vec![1]));
        let (b, mut rb) = job(WriteOp::SetDisabled { name: name("ghost"), disabled: true });
        let (c, mut rc) = job(WriteOp::SetKeyCheck(vec![2]));
        w.commit(vec![a, b, c]);
        assert!(matches!(ra.try_recv(), Ok(Ok(()))));
        assert!(matches!(rb.try_recv(), Ok(Err(StoreError::NoSuchUser))));
        assert!(matches!(rc.try_recv(), Ok(Ok(()))));
        assert_eq!(key_check(&w), Some(vec![2]));
    }

    #[test]
    fn reopening_a_current_store_writes_nothing() {
        let dir = TempDir::new("nowrite");
        let first = SqliteStore::open(&dir.db()).unwrap();
        let mut wal = dir.db().into_os_string();
        wal.push("-wal");
        let before = (std::fs::read(&wal).unwrap(), std::fs::read(dir.db()).unwrap());
        let second = SqliteStore::open(&dir.db()).unwrap();
        let after = (std::fs::read(&wal).unwrap(), std::fs::read(dir.db()).unwrap());
        assert!(before == after, "opening a store at the current schema wrote to the database");
        drop((first, second));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn immutable_readers_see_writes_made_after_space_came_back() {
        let dir = TempDir::new("immutable");
        let server = SqliteStore::open(&dir.db()).unwrap();
        server.set_key_check(vec![1]).await.unwrap();
        let plain = Connection::open(dir.db()).unwrap();
        plain.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
        drop(plain);
        // As after a read-only start on a full disk.
        server.shared.set_readers_immutable(true);
        assert_eq!(server.key_check().await.unwrap(), Some(vec![1]));
        // Space is back and another process (a CLI command) writes first.
        let cli = SqliteStore::open(&dir.db()).unwrap();
        cli.set_key_check(vec![2]).await.unwrap();
        assert_eq!(server.key_check().await.unwrap(), Some(vec![2]), "a reader missed a committed write");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn store_on_full_disk_starts_read_only_and_recovers() {
        let dir = TempDir::new("readonly");
        let store = SqliteStore::open(&dir.db()).unwrap();
        let alice = name("alice");
        store.create_user(&alice, &StoredCredentials::default(), crate::crypto::random_id(), vec![1]).await.unwrap();
        let mailbox = store.user(&alice).await.unwrap().unwrap().mailbox.id;
        store.deliver(vec![message(mailbox, b"kept")]).await.unwrap();
        let listed = store.messages(mailbox).await.unwrap();

        let free = Arc::new(AtomicU64::new(0));
        let space = free.clone();
        let full = SqliteStore::open_with(&dir.db(), Arc::new(move |_: &Path| Some(space.load(Ordering::SeqCst))))
            .expect("a store on a full disk opens");
        assert!(!full.writable());
        // A maildrop lease is granted on a read-only store (POP3 logins
        // work), recorded once the store can write again.
        let lease = full.lock_maildrop(mailbox).await.expect("a lease on a read-only store");
        assert_eq!(full.messages(mailbox).await.unwrap(), listed);
        assert_eq!(full.chunk(listed[0].id, 0).await.unwrap(), b"kept");
        let refused = full.deliver(vec![message(mailbox, b"refused")]).await;
        assert!(matches!(refused, Err(StoreError::Temporary(_))), "{refused:?}");
        let refused = full.delete_messages(mailbox, vec![listed[0].id], lease.token()).await;
        assert!(matches!(refused, Err(StoreError::Temporary(_))), "{refused:?}");
        assert_eq!(full.messages(mailbox).await.unwrap(), listed, "a refused write changed the mailbox");

        free.store(u64::MAX, Ordering::SeqCst);
        let deadline = Instant::now() + PROBE_INTERVAL * 3;
        while !full.writable() {
            assert!(Instant::now() < deadline, "the store did not return to writable");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        full.deliver(vec![message(mailbox, b"after")]).await.unwrap();
        full.renew_lease(&lease).await.expect("the lease is recorded once the store can write");
        full.delete_messages(mailbox, vec![listed[0].id], lease.token()).await.unwrap();
        assert_eq!(full.messages(mailbox).await.unwrap().len(), 1);
        drop(store);
    }
}
