//! Storage: the role traits a backend implements, [`open`] to choose the
//! configured backend, and the backends themselves.
//!
//! A backend implements six role traits, one per kind of state, so it can
//! be written and reviewed role by role (the `sqlite/` files mirror them):
//!
//! - [`AccountStore`]: users, passwords, app passwords, classes, key check;
//! - [`MessageStore`]: messages, chunks, delivery, deletes, imports;
//! - [`SecurityStore`]: bans, lockouts, known addresses;
//! - [`ConnectorStore`]: seen-lists, commits, duplicate keys, status,
//!   accounts and secrets of the connector;
//! - [`LeaseStore`]: leases with fencing tokens ([`lease`]);
//! - [`AuditStore`]: the chained records and signed checkpoints of the
//!   audit log (the chaining and signing keys live above, in
//!   [`crate::audit_log`]).
//! - [`AdminStore`]: administrators of the admin plane, their second
//!   factors and recovery codes, and service tokens.
//!
//! [`Store`] is all six at once, implemented for every type that
//! implements them, so `Arc<dyn Store>` is what the rest of the core holds.
//! Code that calls role methods on a concrete backend adds
//! `use crate::store::prelude::*`.
//!
//! Backends store ciphertext and wrapped keys only; encryption lives above
//! them in [`crate::mailstore`], so a second backend (PostgreSQL, planned)
//! implements persistence and leases, not cryptography. The conformance
//! suite in `tests/store_conformance.rs` runs against every backend.
//!
//! Durability contract: when [`MessageStore::deliver`],
//! [`MessageStore::deliver_sealed`] or [`MessageStore::delete_messages`]
//! returns `Ok`, the change is committed and synced to stable storage.
//! Either all items of one call become visible or none do.
//!
//! Fencing: the commits that only the holder of a lease may make (the
//! POP3 UPDATE's deletes, the connector's state) take the lease's
//! [`FencingToken`], and the backend checks it in the same transaction as
//! the change: a holder that lost its lease (paused past its expiry,
//! partitioned, superseded) gets [`StoreError::Fenced`] and changes nothing.

pub mod lease;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{StoreBackend, StoreConfig};
use crate::crypto::RecordId;
use crate::types::{MailboxId, MessageId, UserName};

pub use lease::{FencingToken, Lease, LeaseResource};

/// The role traits, for code that calls store methods on a concrete
/// backend or a generic `S: Store` (`Arc<dyn Store>` needs no import).
pub mod prelude {
    pub use super::{
        AccountStore, AdminStore, AuditStore, ConnectorStore, EventStore, LeaseStore, MessageStore, SecurityStore,
        Store,
    };
}

/// Opens the configured backend.
pub fn open(cfg: &StoreConfig) -> StoreResult<Arc<dyn Store>> {
    Ok(match cfg.backend {
        StoreBackend::Sqlite => Arc::new(sqlite::SqliteStore::open(&cfg.path)?),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another holder has the lease (for a maildrop: POP3 `[IN-USE]`).
    #[error("maildrop is locked by another session")]
    Locked,
    /// A fenced commit whose lease is no longer current (expired, released
    /// or taken over by a newer holder): refused, nothing changed. Callers
    /// answer as for a storage failure.
    #[error("lease lost: the fencing token is not current for this resource")]
    Fenced,
    #[error("no such user")]
    NoSuchUser,
    #[error("user already exists")]
    UserExists,
    /// Temporary trouble (busy database, I/O error, disk full, a read-only
    /// store): the caller may retry.
    #[error("storage temporarily unavailable: {0}")]
    Temporary(String),
    /// Corruption or an impossible state: needs an operator.
    #[error("storage failure: {0}")]
    Permanent(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What is stored to verify a user's password: a password hash (PHC or
/// `{SCHEME}` form) and SCRAM-SHA-256 keys (RFC 5803 form) derived from the
/// same password. Neither allows recovering the password.
#[derive(Clone, Default)]
pub struct StoredCredentials {
    pub hash: String,
    pub scram: Option<String>,
}

/// A user with the mailbox key material needed to read or deliver mail.
#[derive(Clone)]
pub struct UserRecord {
    pub name: UserName,
    pub password_hash: String,
    /// SCRAM-SHA-256 keys; `None` for users whose password was imported as
    /// a hash (derived at their next password login).
    pub scram: Option<String>,
    pub disabled: bool,
    /// Unix time of the last password change (for maximum age).
    pub password_changed_at: i64,
    /// Refuse the account password over PLAIN/USER: SCRAM, OAuth or app
    /// passwords only.
    pub require_modern_auth: bool,
    /// Account class, selecting per-class policy such as password age.
    pub class: Option<String>,
    pub mailbox: MailboxRef,
}

impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord").field("name", &self.name).field("disabled", &self.disabled).finish_non_exhaustive()
    }
}

/// Identifies a mailbox and carries its wrapped data key.
#[derive(Debug, Clone)]
pub struct MailboxRef {
    /// Backend row id, used for queries.
    pub id: MailboxId,
    /// Random id bound into the associated data of every ciphertext.
    pub uid: RecordId,
    pub wrapped_key: Vec<u8>,
}

/// Listing information for one stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    pub id: MessageId,
    pub uid: RecordId,
    /// Exact octets as transmitted by RETR without dot-stuffing (RFC 1939).
    pub size: u64,
    pub chunk_count: u32,
    pub received_at: i64,
}

/// A sealed message ready to commit.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub mailbox_id: MailboxId,
    pub uid: RecordId,
    pub size: u64,
    pub chunks: Vec<Vec<u8>>,
    /// For imports: the source's identity, recorded in the same transaction
    /// so a resumed import skips exactly what was committed.
    pub import_key: Option<String>,
}

/// The copies of one delivery, sealed one at a time by the backend where
/// it writes them (see [`MessageStore::deliver_sealed`]).
///
/// A message for a hundred mailboxes would otherwise be a hundred sealed
/// copies in memory at once; through a source the backend holds one sealed
/// copy at a time and drops it once written. Sealing happens above the
/// backend ([`crate::mailstore`]), so the backend still sees only ciphertext.
pub trait MessageSource: Send + Sync {
    /// How many messages the delivery holds.
    fn len(&self) -> usize;
    /// Whether the delivery holds no message.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Seals message `index` (`< len()`). Sealing the same index again
    /// yields the same message id and size with fresh nonces, so a backend
    /// that has to retry a write may call it again.
    fn seal(&self, index: usize) -> StoreResult<NewMessage>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSummary {
    pub name: UserName,
    pub disabled: bool,
    pub messages: u64,
    pub octets: u64,
}

/// A per-device POP3 password, listed without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppPasswordInfo {
    pub id: i64,
    pub label: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

/// An address or network refused at accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanRecord {
    pub network: ipnet::IpNet,
    pub reason: String,
    pub created_at: i64,
    /// `None`: until removed by an administrator.
    pub expires_at: Option<i64>,
    /// How many times this address has been banned (ban lengths grow).
    pub offences: u32,
}

/// A temporarily locked account name (it need not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockoutRecord {
    pub user: String,
    pub since: i64,
    pub until: i64,
    pub count: u32,
}

/// An address (IPv4) or aggregated IPv6 prefix from which an account logged
/// in successfully: lockouts of that account spare it. Only written after a
/// successful login, so only names of existing accounts are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownAddress {
    pub user: String,
    pub network: ipnet::IpNet,
    pub last_seen: i64,
}

/// Known addresses kept per account (the newest by `last_seen`); older ones
/// are dropped when a new one is recorded.
pub const KNOWN_ADDRESSES_PER_ACCOUNT: usize = 16;
/// Most ban, lockout or known-address rows one periodic re-read returns (the
/// newest); bounds the memory and time of a re-read under a flood of rows.
pub const MAX_SECURITY_ROWS: usize = 100_000;

/// A 32-byte duplicate-detection key (Message-ID + recipient + content hash).
pub type DedupKey = [u8; 32];

/// An upstream message the connector has dealt with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenUid {
    pub uidl: String,
    /// When it was first fetched (for delete-after-days).
    pub first_seen: i64,
    pub state: SeenState,
}

/// What the connector did with an upstream message it remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeenState {
    /// Delivered, forwarded, quarantined or a duplicate: may be deleted
    /// upstream by the account's delete policy.
    Delivered,
    /// Too large: left upstream (or deleted there by the oversize policy).
    Oversize,
}

impl SeenState {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            SeenState::Delivered => "delivered",
            SeenState::Oversize => "oversize",
        }
    }

    /// Parses the stored form; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "delivered" => Some(SeenState::Delivered),
            "oversize" => Some(SeenState::Oversize),
            _ => None,
        }
    }
}

impl std::fmt::Display for SeenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one fetched message produced, committed in one transaction: local
/// deliveries (each skipped if its duplicate key is already known), the keys
/// of recipients served elsewhere (forwarded), and the upstream UIDL.
#[derive(Debug, Clone)]
pub struct ConnectorCommit {
    /// Unix time recorded as the UIDL's first-seen and the keys' age.
    pub at: i64,
    pub account: String,
    /// `None`: record keys and deliveries but not the UIDL (a recipient was
    /// deferred, so the message must be fetched again).
    pub uidl: Option<String>,
    /// The state recorded with the UIDL.
    pub state: SeenState,
    pub deliveries: Vec<(Option<DedupKey>, NewMessage)>,
    pub keys: Vec<DedupKey>,
}

/// Scheduling and health of one connector account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectorStatus {
    pub account: String,
    pub last_run_at: Option<i64>,
    pub last_success_at: Option<i64>,
    pub last_error: Option<String>,
    /// Consecutive failed runs (drives the retry back-off).
    pub failures: u32,
    pub fetched_total: u64,
}

/// Users and their credentials, app passwords and classes, and the master
/// key check.
#[async_trait]
pub trait AccountStore: Send + Sync + 'static {
    /// False while the store cannot write (disk full, I/O errors): reads
    /// work, every write fails with [`StoreError::Temporary`] and changes
    /// nothing. A backend returns to writable by itself when it can.
    fn writable(&self) -> bool {
        true
    }

    /// Value stored at initialisation to detect a wrong master key.
    async fn key_check(&self) -> StoreResult<Option<Vec<u8>>>;
    async fn set_key_check(&self, check: Vec<u8>) -> StoreResult<()>;

    async fn create_user(
        &self,
        name: &UserName,
        credentials: &StoredCredentials,
        mailbox_uid: RecordId,
        wrapped_key: Vec<u8>,
    ) -> StoreResult<()>;
    async fn user(&self, name: &UserName) -> StoreResult<Option<UserRecord>>;
    async fn users(&self) -> StoreResult<Vec<UserSummary>>;
    async fn set_password(&self, name: &UserName, credentials: &StoredCredentials) -> StoreResult<()>;
    /// Users whose SCRAM keys are still stored in the clear (RFC 5803 text
    /// written by earlier releases), for sealing in place.
    async fn plaintext_scram(&self) -> StoreResult<Vec<(UserName, String)>>;
    /// Replaces `name`'s SCRAM column if it still holds `old` (a password
    /// change in between wins); changes nothing else.
    async fn replace_scram(&self, name: &UserName, old: &str, new: &str) -> StoreResult<()>;
    async fn set_disabled(&self, name: &UserName, disabled: bool) -> StoreResult<()>;
    async fn set_require_modern_auth(&self, name: &UserName, required: bool) -> StoreResult<()>;
    async fn set_class(&self, name: &UserName, class: Option<String>) -> StoreResult<()>;
    /// Previous password hashes, newest first (`set_password` records them).
    async fn password_history(&self, name: &UserName) -> StoreResult<Vec<String>>;

    /// Stores an app password by its keyed hash; returns its id.
    async fn add_app_password(
        &self,
        name: &UserName,
        label: &str,
        keyed_hash: Vec<u8>,
        expires_at: Option<i64>,
    ) -> StoreResult<i64>;
    async fn app_passwords(&self, name: &UserName) -> StoreResult<Vec<AppPasswordInfo>>;
    async fn revoke_app_password(&self, name: &UserName, id: i64) -> StoreResult<bool>;
    /// The owner of an unexpired app password with this keyed hash; marks
    /// it used.
    async fn use_app_password(&self, keyed_hash: Vec<u8>) -> StoreResult<Option<UserName>>;
    /// The id and owner of an unexpired app password with this keyed hash;
    /// writes nothing (a login that is then refused must not cost a write
    /// a wrong password does not).
    async fn find_app_password(&self, keyed_hash: Vec<u8>) -> StoreResult<Option<(i64, UserName)>>;
    /// Records that app password `id` was just used for a login.
    async fn mark_app_password_used(&self, id: i64) -> StoreResult<()>;
    /// Deletes the user, the mailbox, its key and all its mail.
    async fn delete_user(&self, name: &UserName) -> StoreResult<()>;
}

/// Messages of the mailboxes: listing, sealed chunks, delivery, deletes and
/// import records.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// The maildrop listing in delivery order.
    async fn messages(&self, mailbox_id: MailboxId) -> StoreResult<Vec<MessageMeta>>;
    /// One sealed chunk of a message.
    async fn chunk(&self, message_id: MessageId, index: u32) -> StoreResult<Vec<u8>>;
    /// Commits all messages atomically and durably.
    async fn deliver(&self, messages: Vec<NewMessage>) -> StoreResult<()>;
    /// Commits every message of `source` atomically and durably, like
    /// [`MessageStore::deliver`], but seals them one at a time where they
    /// are written and holds at most one sealed message at a time. A
    /// failing `seal` fails the whole delivery and commits none of it.
    async fn deliver_sealed(&self, source: Arc<dyn MessageSource>) -> StoreResult<()>;
    /// Removes the listed messages of one mailbox atomically and durably,
    /// fenced by the maildrop lease ([`LeaseResource::Maildrop`]): with a
    /// token that is not current, [`StoreError::Fenced`] and nothing is
    /// removed.
    async fn delete_messages(&self, mailbox_id: MailboxId, ids: Vec<MessageId>, fence: FencingToken)
        -> StoreResult<()>;
    /// Which of `keys` were already imported into the mailbox.
    async fn imported(&self, mailbox_id: MailboxId, keys: Vec<String>) -> StoreResult<Vec<String>>;
}

/// Bans, lockouts and known addresses, shared by every process using the
/// store.
#[async_trait]
pub trait SecurityStore: Send + Sync + 'static {
    async fn bans(&self) -> StoreResult<Vec<BanRecord>>;
    async fn put_ban(&self, ban: BanRecord) -> StoreResult<()>;
    /// Returns whether a ban for exactly `network` existed.
    async fn remove_ban(&self, network: ipnet::IpNet) -> StoreResult<bool>;
    async fn lockouts(&self) -> StoreResult<Vec<LockoutRecord>>;
    async fn put_lockout(&self, lockout: LockoutRecord) -> StoreResult<()>;
    /// Returns whether a lockout for `user` (normalised with
    /// [`crate::types::normalise_user_name`]) existed.
    async fn remove_lockout(&self, user: &str) -> StoreResult<bool>;
    /// Records (or refreshes) a known address of an existing account and
    /// keeps only its [`KNOWN_ADDRESSES_PER_ACCOUNT`] newest.
    async fn put_known_address(&self, known: KnownAddress) -> StoreResult<()>;
    /// Known addresses seen since `since` of the accounts under an active
    /// lockout at `now` (the only ones a lockout check needs), at most
    /// [`MAX_SECURITY_ROWS`].
    async fn locked_known_addresses(&self, now: i64, since: i64) -> StoreResult<Vec<KnownAddress>>;
    /// Deletes bans and lockouts that have expired by `now` and known
    /// addresses last seen before `known_before`.
    async fn purge_security(&self, now: i64, known_before: i64) -> StoreResult<()>;
}

/// The connector's state. The writes a run makes are fenced by the
/// account's lease ([`LeaseResource::ConnectorAccount`]): with a token that
/// is not current they fail with [`StoreError::Fenced`] and change nothing.
#[async_trait]
pub trait ConnectorStore: Send + Sync + 'static {
    /// The UIDLs already dealt with for `account`.
    async fn connector_seen(&self, account: &str) -> StoreResult<Vec<SeenUid>>;
    /// Commits a fetched message's outcome atomically and durably.
    async fn connector_commit(&self, commit: ConnectorCommit, fence: FencingToken) -> StoreResult<()>;
    /// Forgets UIDLs (deleted upstream or no longer listed).
    async fn connector_forget(&self, account: &str, uidls: Vec<String>, fence: FencingToken) -> StoreResult<()>;
    /// Replaces the seen-list with `uidls`, all marked delivered now.
    async fn connector_resync(&self, account: &str, uidls: Vec<String>, fence: FencingToken) -> StoreResult<()>;
    /// Which of `keys` are known duplicates.
    async fn dedup_known(&self, keys: Vec<DedupKey>) -> StoreResult<Vec<DedupKey>>;
    /// Forgets duplicate keys recorded before `before` (Unix time).
    async fn dedup_prune(&self, before: i64) -> StoreResult<()>;
    async fn connector_status(&self, account: &str) -> StoreResult<Option<ConnectorStatus>>;
    async fn put_connector_status(&self, status: ConnectorStatus, fence: FencingToken) -> StoreResult<()>;
    /// Accounts added with the CLI: (name, TOML).
    async fn connector_accounts(&self) -> StoreResult<Vec<(String, String)>>;
    /// Adds an account; `UserExists` when the name is taken.
    async fn add_connector_account(&self, name: &str, toml: &str) -> StoreResult<()>;
    /// Removes a CLI account with its state; whether it existed.
    async fn remove_connector_account(&self, name: &str) -> StoreResult<bool>;
    /// A sealed per-account secret (e.g. a rotated OAuth refresh token).
    async fn connector_secret(&self, account: &str, kind: &str) -> StoreResult<Option<Vec<u8>>>;
    async fn put_connector_secret(&self, account: &str, kind: &str, sealed: Vec<u8>) -> StoreResult<()>;
}

/// Leases: exclusive, expiring, renewed while held, with a fencing token
/// per resource that grows with every new holder (see [`lease`]).
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Takes the lease on `resource` for `holder` (a name for logs and
    /// operators), valid for `ttl` and renewed in the background while the
    /// returned guard lives; dropping the guard releases it.
    /// [`StoreError::Locked`] while another holder has it.
    async fn acquire_lease(
        &self,
        resource: LeaseResource,
        holder: &str,
        ttl: std::time::Duration,
    ) -> StoreResult<Lease>;

    /// Extends `lease` by its time to live now (the background renewal does
    /// this by itself); [`StoreError::Fenced`] when it was lost.
    async fn renew_lease(&self, lease: &Lease) -> StoreResult<()> {
        lease.renew().await
    }

    /// Releases `lease` and waits until the release is recorded; commits
    /// with its token are refused from then on.
    async fn release_lease(&self, lease: Lease) -> StoreResult<()> {
        lease.release().await
    }

    /// The maildrop lease of a POP3 session: exclusive across sessions and
    /// processes (POP3 `[IN-USE]` on [`StoreError::Locked`]).
    async fn lock_maildrop(&self, mailbox_id: MailboxId) -> StoreResult<Lease> {
        self.acquire_lease(LeaseResource::Maildrop(mailbox_id), &lease::process_holder(), lease::DEFAULT_TTL).await
    }

    /// The connector's per-account run lease: one run per account at a
    /// time, across processes.
    async fn lock_connector(&self, account: &str) -> StoreResult<Lease> {
        self.acquire_lease(
            LeaseResource::ConnectorAccount(account.to_owned()),
            &lease::process_holder(),
            lease::DEFAULT_TTL,
        )
        .await
    }
}

/// One record of the audit log as stored. Its `mac` chains it to the
/// record before it (see [`crate::audit_log`]); `before` and `after` are
/// JSON text, authenticated as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAuditRecord {
    /// 1, 2, 3, ... without gaps: a gap is a deleted record.
    pub seq: i64,
    /// Unix time in milliseconds.
    pub time: i64,
    pub actor: String,
    pub source: Option<String>,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub before: Option<String>,
    pub after: Option<String>,
    pub mac: Vec<u8>,
}

/// Computes the MAC of the next audit record from the MAC of the current
/// tail (`None` for the first record). Called by the backend inside the
/// append transaction, so the tail it sees is the one it appends to, even
/// with several processes appending.
pub trait AuditChain: Send + Sync {
    /// `record.mac` is empty when this is called.
    fn mac(&self, prev: Option<&[u8]>, record: &StoredAuditRecord) -> Vec<u8>;
}

/// A signed statement "the chain had `seq` records, the last with `mac`".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCheckpoint {
    pub seq: i64,
    pub mac: Vec<u8>,
    /// Unix time in milliseconds.
    pub time: i64,
    /// Ed25519 over the checkpoint's canonical encoding.
    pub signature: Vec<u8>,
}

/// Which audit records a query returns: newest first, at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Unix ms, inclusive.
    pub since: Option<i64>,
    /// Unix ms, exclusive.
    pub until: Option<i64>,
    /// The whole actor (`cli:root`), or its part before `@` (`admin:alice`).
    pub actor: Option<String>,
    /// The whole action (`user.add`) or a prefix up to a dot (`user`).
    pub action: Option<String>,
    /// Only records with a smaller seq (paging backwards).
    pub before_seq: Option<i64>,
    pub limit: usize,
}

/// The audit log's records and checkpoints. Records are only ever
/// appended; nothing in the program updates or deletes them.
#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Appends `record` after the current tail with the next seq and the
    /// MAC `chain` computes from the tail's MAC, in one transaction: when it
    /// returns `Ok` the record is committed and synced. Returns the record
    /// as stored (seq and MAC filled in).
    async fn append_audit(
        &self,
        record: StoredAuditRecord,
        chain: Arc<dyn AuditChain>,
    ) -> StoreResult<StoredAuditRecord>;
    /// The newest record's seq and MAC.
    async fn audit_tail(&self) -> StoreResult<Option<(i64, Vec<u8>)>>;
    /// Up to `limit` records with seq greater than `after_seq`, oldest first
    /// (for walking the whole chain page by page).
    async fn audit_range(&self, after_seq: i64, limit: usize) -> StoreResult<Vec<StoredAuditRecord>>;
    /// Records matching `filter`, newest first.
    async fn audit_query(&self, filter: AuditFilter) -> StoreResult<Vec<StoredAuditRecord>>;
    /// Stores a checkpoint; one already stored for the same seq is kept.
    async fn put_audit_checkpoint(&self, checkpoint: AuditCheckpoint) -> StoreResult<()>;
    /// Every checkpoint, oldest first (one per many records: small).
    async fn audit_checkpoints(&self) -> StoreResult<Vec<AuditCheckpoint>>;
    /// The checkpoint with the highest seq.
    async fn last_audit_checkpoint(&self) -> StoreResult<Option<AuditCheckpoint>>;
}

/// An administrator of the admin plane (not a mail user).
#[derive(Clone, PartialEq, Eq)]
pub struct AdminRecord {
    pub id: i64,
    pub name: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// Role names (built-in or `[admin.roles]`); unknown ones grant nothing.
    pub roles: Vec<String>,
    pub enabled: bool,
    pub created_at: i64,
    pub last_login_at: Option<i64>,
}

impl std::fmt::Debug for AdminRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("roles", &self.roles)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// A second factor of an administrator. The secret (a TOTP key, a WebAuthn
/// credential) is sealed above the store; the backend sees ciphertext.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminFactorRecord {
    pub id: i64,
    pub admin_id: i64,
    /// `totp` or `webauthn`.
    pub kind: String,
    pub label: String,
    pub sealed: Vec<u8>,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    /// TOTP: the last time step accepted (a step is never accepted twice).
    pub last_step: Option<i64>,
    /// `Some(t)`: an enrolment not confirmed yet, discarded after `t`.
    /// Pending factors never authenticate.
    pub pending_until: Option<i64>,
}

impl std::fmt::Debug for AdminFactorRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminFactorRecord")
            .field("id", &self.id)
            .field("admin_id", &self.admin_id)
            .field("kind", &self.kind)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// A service token of the admin API, stored by the SHA-256 of its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceTokenRecord {
    /// Public lookup id (the `<id>` of `p3x_<id>_<secret>`).
    pub id: String,
    pub name: String,
    pub creator_id: i64,
    /// The creator's name (filled in by reads; ignored when adding).
    pub creator_name: String,
    pub permissions: Vec<String>,
    /// CIDR networks it may be used from; empty: anywhere the admin
    /// listener accepts.
    pub networks: Vec<String>,
    pub secret_hash: Vec<u8>,
    pub created_at: i64,
    pub expires_at: i64,
    pub last_used_at: Option<i64>,
    pub last_used_from: Option<String>,
    pub revoked: bool,
}

impl std::fmt::Debug for ServiceTokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTokenRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("creator_id", &self.creator_id)
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

/// Administrators, their factors and recovery codes, and service tokens.
/// Methods that change one row by id answer whether it existed.
#[async_trait]
pub trait AdminStore: Send + Sync + 'static {
    /// Adds an administrator; [`StoreError::UserExists`] when the name is
    /// taken. Returns its id.
    async fn create_admin(&self, name: &str, password_hash: &str, roles: &[String]) -> StoreResult<i64>;
    async fn admin_by_name(&self, name: &str) -> StoreResult<Option<AdminRecord>>;
    async fn admin_by_id(&self, id: i64) -> StoreResult<Option<AdminRecord>>;
    /// Every administrator, by name.
    async fn admins(&self) -> StoreResult<Vec<AdminRecord>>;
    async fn set_admin_enabled(&self, id: i64, enabled: bool) -> StoreResult<bool>;
    async fn set_admin_roles(&self, id: i64, roles: &[String]) -> StoreResult<bool>;
    async fn set_admin_password(&self, id: i64, password_hash: &str) -> StoreResult<bool>;
    async fn record_admin_login(&self, id: i64, at: i64) -> StoreResult<()>;
    /// Removes the administrator with its factors, recovery codes and the
    /// service tokens it created.
    async fn remove_admin(&self, id: i64) -> StoreResult<bool>;

    /// Adds a factor (pending until confirmed when `pending_until` is set);
    /// returns its id.
    async fn add_admin_factor(
        &self,
        admin_id: i64,
        kind: &str,
        label: &str,
        sealed: Vec<u8>,
        pending_until: Option<i64>,
    ) -> StoreResult<i64>;
    /// The administrator's factors, pending ones included, oldest first.
    async fn admin_factors(&self, admin_id: i64) -> StoreResult<Vec<AdminFactorRecord>>;
    /// Confirms a pending factor whose `pending_until` is not before `now`.
    async fn activate_admin_factor(&self, admin_id: i64, factor_id: i64, now: i64) -> StoreResult<bool>;
    async fn remove_admin_factor(&self, admin_id: i64, factor_id: i64) -> StoreResult<bool>;
    /// Removes every factor and recovery code of the administrator.
    async fn reset_admin_factors(&self, admin_id: i64) -> StoreResult<()>;
    /// Records `step` (a TOTP time step, a WebAuthn challenge's issue time)
    /// as used at `at`, atomically and only if it is later than the last
    /// step recorded for the factor: `false` means a replay.
    async fn use_factor_step(&self, factor_id: i64, step: i64, at: i64) -> StoreResult<bool>;
    /// Replaces an active factor's sealed secret (a WebAuthn credential's
    /// new signature counter) and records its use at `at`.
    async fn update_admin_factor(&self, factor_id: i64, sealed: Vec<u8>, at: i64) -> StoreResult<bool>;

    /// Replaces the administrator's recovery codes (their hashes).
    async fn set_recovery_codes(&self, admin_id: i64, hashes: Vec<Vec<u8>>) -> StoreResult<()>;
    /// The hashes of the unused recovery codes.
    async fn recovery_codes(&self, admin_id: i64) -> StoreResult<Vec<Vec<u8>>>;
    /// Consumes one recovery code; `false` when it was already used (a
    /// concurrent use won).
    async fn use_recovery_code(&self, admin_id: i64, hash: Vec<u8>) -> StoreResult<bool>;

    /// Adds a token; [`StoreError::UserExists`] when the id is taken,
    /// [`StoreError::NoSuchUser`] when its creator does not exist.
    async fn add_service_token(&self, token: ServiceTokenRecord) -> StoreResult<()>;
    async fn service_token(&self, id: &str) -> StoreResult<Option<ServiceTokenRecord>>;
    /// Every token, newest first.
    async fn service_tokens(&self) -> StoreResult<Vec<ServiceTokenRecord>>;
    async fn revoke_service_token(&self, id: &str) -> StoreResult<bool>;
    async fn mark_service_token_used(&self, id: &str, at: i64, from: &str) -> StoreResult<()>;
}

/// One security or operational event kept for investigations (see
/// [`crate::telemetry::store`]). Events carry no secrets and no message
/// content: names, addresses, counts, reasons.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredEvent {
    /// Increasing (gaps are pruned or dropped events).
    pub seq: i64,
    /// Unix time in milliseconds.
    pub time: i64,
    /// The catalogue id (0 for an uncatalogued event).
    pub code: u16,
    /// The catalogue name.
    pub name: String,
    /// RFC 5424 severity (0 emergency .. 7 debug).
    pub severity: u8,
    /// The account or administrator the event is about, if any.
    pub user: Option<String>,
    /// The client address, if any.
    pub ip: Option<String>,
    pub message: String,
    /// The other fields as one JSON object.
    pub fields: String,
}

/// Which events a search returns: newest first, at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Unix ms, inclusive.
    pub since: Option<i64>,
    /// Unix ms, exclusive.
    pub until: Option<i64>,
    pub user: Option<String>,
    /// An exact address (`192.0.2.7`, `2001:db8::1`).
    pub ip: Option<String>,
    /// Catalogue names (any of them); empty: every event.
    pub names: Vec<String>,
    /// Only events with a smaller seq (paging backwards).
    pub before_seq: Option<i64>,
    pub limit: usize,
}

/// The local event store: appended in batches, searched, pruned by age and
/// size. Not a tamper-evident record (that is the audit log): a bounded,
/// indexed history for investigations.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` in one transaction (their `seq` is assigned).
    async fn append_events(&self, events: Vec<StoredEvent>) -> StoreResult<()>;
    /// Newest first, at most [`EventFilter::limit`] (capped by the backend).
    async fn search_events(&self, filter: EventFilter) -> StoreResult<Vec<StoredEvent>>;
    /// Deletes events older than `before` (unix ms) and, beyond that, the
    /// oldest ones until at most `keep_at_most` remain; how many went.
    async fn prune_events(&self, before: i64, keep_at_most: u64) -> StoreResult<u64>;
}

/// Everything a backend stores: all role traits at once. Implemented for
/// every type that implements them, so `Arc<dyn Store>` works as before.
pub trait Store:
    AccountStore + MessageStore + SecurityStore + ConnectorStore + LeaseStore + AuditStore + AdminStore + EventStore
{
}

impl<
        T: AccountStore
            + MessageStore
            + SecurityStore
            + ConnectorStore
            + LeaseStore
            + AuditStore
            + AdminStore
            + EventStore,
    > Store for T
{
}
