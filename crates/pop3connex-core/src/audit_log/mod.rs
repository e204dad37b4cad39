//! The tamper-evident audit log: one chained record per administrative
//! operation, login, failed authorisation or read of the log itself.
//!
//! # What is recorded
//! A record holds seq (1, 2, 3, ... without gaps), time (Unix ms), actor
//! (`cli:root`, `admin:alice@192.0.2.1`, `token:ab12`), source address,
//! action (`user.add`, `audit.read`, ...), target (a user name, a network,
//! an account: never a secret), outcome (`attempt`, then `ok` or an error
//! kind) and, where cheap and meaningful, the value before and after as
//! JSON. Operations are recorded twice: the attempt before the work runs
//! (if that cannot be written the work does not run: fail closed) and its
//! outcome after.
//!
//! # How tampering shows
//! - Chain: `mac_n = HMAC-SHA256(K, mac_{n-1} || encode(record n))`
//!   ([`chain`]), `K` derived from the master key and never stored. Editing
//!   a record breaks its MAC; deleting one leaves a gap in seq; reordering
//!   breaks the MACs (seq is authenticated).
//! - Head file ([`head`]): the newest seq and MAC next to the database,
//!   tagged with another derived key, rewritten after every append.
//!   Deleting the newest records leaves the chain intact, but shorter than
//!   the head file says. An append refuses to continue a chain that is
//!   shorter than its head file (so the evidence is not overwritten), until
//!   an operator resets the head, which is itself recorded.
//! - Checkpoints: every [`CHECKPOINT_EVERY`] records, and at least every
//!   [`CHECKPOINT_MAX_AGE`] while there are new records, the seq and MAC of
//!   the tail, signed with Ed25519 (key derived from the master key; the
//!   public key is printed by `pop3connex audit-log public-key`), stored in
//!   the database and emitted as an `audit checkpoint` log event (target
//!   `pop3connex::audit`), so a copy lives in the log sink or SIEM.
//!
//! # Limits
//! Whoever holds the master key can compute every MAC, tag and signature:
//! they can rewrite the database and the head file consistently. What they
//! cannot rewrite is the copies of the checkpoints already shipped to the
//! log sink: those are the outside anchor, and an auditor checks them
//! against the database with the public key alone. Someone without the
//! master key who deletes the newest records AND the head file is caught by
//! the last checkpoint (in the database, if left, and in the log sink);
//! records newer than the last shipped checkpoint are protected only by
//! the head file.

pub mod chain;
pub mod head;
pub mod verify;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::mailstore::MailStore;
use crate::store::{AuditCheckpoint, AuditFilter, Store, StoreError, StoredAuditRecord};

pub use chain::AuditKeys;
pub use head::{head_path, Head, HeadState};
pub use verify::{Problem, ProblemKind, VerifyReport};

/// A checkpoint is due after this many records...
pub const CHECKPOINT_EVERY: i64 = 100;
/// ...or when the last one is this old and records were added since.
pub const CHECKPOINT_MAX_AGE: Duration = Duration::from_secs(3600);
/// Largest `limit` of one query.
pub const MAX_QUERY_LIMIT: usize = 10_000;
/// The `tracing` target of checkpoint events (the log sink's copy).
pub const LOG_TARGET: &str = "pop3connex::audit";

/// Who, from where, and the values before and after: what callers add to
/// a record besides actor, action, target and outcome.
#[derive(Debug, Clone, Default)]
pub struct AuditDetails {
    pub source: Option<IpAddr>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

/// Which records to read: newest first, at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditQuery {
    /// Unix ms, inclusive.
    pub since: Option<i64>,
    /// Unix ms, exclusive.
    pub until: Option<i64>,
    /// A whole actor (`cli:root`) or its part before `@` (`admin:alice`).
    pub actor: Option<String>,
    /// A whole action (`user.add`) or its prefix before a dot (`user`).
    pub action: Option<String>,
    pub limit: usize,
    /// Only records older than this seq (paging).
    pub before_seq: Option<i64>,
}

/// One record as shown and exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: i64,
    /// Unix ms.
    pub time: i64,
    pub actor: String,
    pub source: Option<String>,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    /// Hex of the chain MAC.
    pub mac: String,
}

impl From<StoredAuditRecord> for AuditRecord {
    fn from(r: StoredAuditRecord) -> Self {
        // Stored values are written from `serde_json::Value`s; one that no
        // longer parses (edited) is shown as the text it holds.
        let json = |t: Option<String>| t.map(|t| serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)));
        AuditRecord {
            seq: r.seq,
            time: r.time,
            actor: r.actor,
            source: r.source,
            action: r.action,
            target: r.target,
            outcome: r.outcome,
            before: json(r.before),
            after: json(r.after),
            mac: head::hex_encode(&r.mac),
        }
    }
}

/// What one append writes (the log adds seq, time and MAC).
#[derive(Debug, Clone)]
pub struct NewRecord<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub outcome: &'a str,
    pub details: &'a AuditDetails,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log storage: {0}")]
    Store(#[from] StoreError),
    #[error("audit head file {path}: {source}")]
    HeadIo { path: String, source: std::io::Error },
    /// The chain is shorter than (or differs from) what the head file
    /// records: the newest records were deleted or replaced.
    #[error(
        "the audit log does not reach its head file ({0}): records were deleted or replaced; run `pop3connex \
         audit-log verify`, and `audit-log reset-head` once investigated"
    )]
    HeadMismatch(String),
}

/// The audit log of one store.
pub struct AuditLog {
    store: Arc<dyn Store>,
    keys: Arc<AuditKeys>,
    head_path: PathBuf,
    /// Appends of this process one at a time (the head-file `flock`
    /// serialises processes; this keeps tasks from blocking threads on it).
    appending: tokio::sync::Mutex<()>,
}

impl AuditLog {
    pub fn new(store: Arc<dyn Store>, keys: AuditKeys, head_path: PathBuf) -> Self {
        AuditLog { store, keys: Arc::new(keys), head_path, appending: tokio::sync::Mutex::new(()) }
    }

    /// The audit log of `mail`'s store, whose database is at `db` (the head
    /// file goes next to it), with keys derived from its master key.
    pub fn for_mail(mail: &MailStore, db: &Path) -> Self {
        Self::new(mail.store().clone(), AuditKeys::derive(|p| mail.derived_secret(p)), head_path(db))
    }

    pub fn head_path(&self) -> &Path {
        &self.head_path
    }

    /// The checkpoint verification key, base64 of its 32 bytes.
    pub fn public_key_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.keys.public_key().as_bytes())
    }

    /// The checkpoint verification key as a PEM public key (SPKI), for
    /// `openssl pkeyutl -verify`.
    pub fn public_key_pem(&self) -> String {
        // SubjectPublicKeyInfo for Ed25519 (RFC 8410): a fixed DER prefix
        // followed by the 32 key bytes.
        const SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.keys.public_key().as_bytes());
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n")
    }

    /// Appends one record, durably (database, then head file), and writes a
    /// checkpoint when one is due. Refuses when the chain does not reach
    /// the head file ([`AuditError::HeadMismatch`]).
    pub async fn append(&self, new: NewRecord<'_>) -> Result<AuditRecord, AuditError> {
        self.append_checked(new, true).await
    }

    async fn append_checked(&self, new: NewRecord<'_>, check_head: bool) -> Result<AuditRecord, AuditError> {
        let _appending = self.appending.lock().await;
        let path = self.head_path.clone();
        let _lock = tokio::task::spawn_blocking(move || head::lock(&path))
            .await
            .map_err(|e| StoreError::Permanent(format!("audit lock task: {e}")))?
            .map_err(|e| self.head_io(e))?;
        if check_head {
            self.check_head().await?;
        }
        let details = new.details;
        let json = |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string());
        let record = StoredAuditRecord {
            seq: 0,
            time: now_ms(),
            actor: new.actor.to_owned(),
            source: details.source.map(|a| a.to_string()),
            action: new.action.to_owned(),
            target: new.target.to_owned(),
            outcome: new.outcome.to_owned(),
            before: json(&details.before),
            after: json(&details.after),
            mac: Vec::new(),
        };
        let stored = self.store.append_audit(record, self.keys.clone()).await?;
        let head = Head { seq: stored.seq, mac: stored.mac.clone() };
        let (keys, path) = (self.keys.clone(), self.head_path.clone());
        tokio::task::spawn_blocking(move || head::write(&path, &keys, &head))
            .await
            .map_err(|e| StoreError::Permanent(format!("audit head task: {e}")))?
            .map_err(|e| self.head_io(e))?;
        // The record is committed: a failed checkpoint is logged, not
        // reported as a failed append (the next append or the hourly task
        // tries again).
        if let Err(e) = self.checkpoint_if_due(Some((stored.seq, &stored.mac, stored.time))).await {
            tracing::error!(target: LOG_TARGET, error = %e, "audit checkpoint failed");
        }
        Ok(stored.into())
    }

    fn head_io(&self, source: std::io::Error) -> AuditError {
        AuditError::HeadIo { path: self.head_path.display().to_string(), source }
    }

    /// Refuses to append when the chain's tail is not what the head file
    /// records (or the head file is missing while records exist).
    async fn check_head(&self) -> Result<(), AuditError> {
        let tail = self.store.audit_tail().await?;
        let state = self.read_head().await?;
        match (&state, &tail) {
            (HeadState::Missing, None) => Ok(()),
            (HeadState::Missing, Some((seq, _))) => {
                Err(AuditError::HeadMismatch(format!("the head file is missing, the database holds {seq} records")))
            }
            (HeadState::Invalid(why), _) => Err(AuditError::HeadMismatch(format!("invalid head file: {why}"))),
            (HeadState::Valid(h), None) => {
                Err(AuditError::HeadMismatch(format!("head at seq {}, the database holds no record", h.seq)))
            }
            (HeadState::Valid(h), Some((seq, mac))) => {
                if h.seq > *seq {
                    Err(AuditError::HeadMismatch(format!("head at seq {}, the database ends at {seq}", h.seq)))
                } else if h.seq == *seq && h.mac != *mac {
                    Err(AuditError::HeadMismatch(format!("record {seq} differs from the head file")))
                } else {
                    // A head behind the tail: a process stopped between its
                    // commit and its head update. The chain covers the rest.
                    Ok(())
                }
            }
        }
    }

    async fn read_head(&self) -> Result<HeadState, AuditError> {
        let (keys, path) = (self.keys.clone(), self.head_path.clone());
        tokio::task::spawn_blocking(move || head::read(&path, &keys))
            .await
            .map_err(|e| StoreError::Permanent(format!("audit head task: {e}")))?
            .map_err(|e| self.head_io(e))
    }

    /// Records that an operator accepted the chain as it is (after a
    /// head-file mismatch was investigated) and points the head file at its
    /// tail. The record carries the old head and the tail it replaces, so
    /// the reset itself stays in the chain.
    pub async fn reset_head(&self, actor: &str) -> Result<AuditRecord, AuditError> {
        let state = self.read_head().await?;
        let tail = self.store.audit_tail().await?;
        let before = match &state {
            HeadState::Missing => serde_json::json!({ "head": "missing" }),
            HeadState::Invalid(why) => serde_json::json!({ "head": "invalid", "why": why }),
            HeadState::Valid(h) => serde_json::json!({ "head_seq": h.seq, "head_mac": head::hex_encode(&h.mac) }),
        };
        let after = serde_json::json!({ "tail_seq": tail.as_ref().map_or(0, |t| t.0) });
        let details = AuditDetails { source: None, before: Some(before), after: Some(after) };
        let new = NewRecord { actor, action: "audit.head_reset", target: "head", outcome: "ok", details: &details };
        self.append_checked(new, false).await
    }

    /// Writes a checkpoint of the tail when one is due: [`CHECKPOINT_EVERY`]
    /// records since the last, or the last older than
    /// [`CHECKPOINT_MAX_AGE`] with records added since. `tail` is the tail
    /// if the caller knows it. Returns the checkpoint written, if any.
    pub async fn checkpoint_if_due(
        &self,
        tail: Option<(i64, &[u8], i64)>,
    ) -> Result<Option<AuditCheckpoint>, AuditError> {
        let tail = match tail {
            Some((seq, mac, _)) => (seq, mac.to_vec()),
            None => match self.store.audit_tail().await? {
                Some(t) => t,
                None => return Ok(None),
            },
        };
        let last = self.store.last_audit_checkpoint().await?;
        let (last_seq, last_time) = last.as_ref().map_or((0, 0), |c| (c.seq, c.time));
        let new_records = tail.0 - last_seq;
        let age_ms = now_ms().saturating_sub(last_time);
        let due =
            new_records >= CHECKPOINT_EVERY || (new_records > 0 && age_ms >= CHECKPOINT_MAX_AGE.as_millis() as i64);
        if !due {
            return Ok(None);
        }
        Ok(Some(self.checkpoint(tail.0, &tail.1).await?))
    }

    /// Signs, stores and logs a checkpoint of the chain at `seq`.
    pub async fn checkpoint(&self, seq: i64, mac: &[u8]) -> Result<AuditCheckpoint, AuditError> {
        let cp = self.keys.sign_checkpoint(seq, mac, now_ms());
        self.store.put_audit_checkpoint(cp.clone()).await?;
        emit_checkpoint(&cp);
        Ok(cp)
    }

    /// Emits the stored checkpoints newer than `after` (only the newest
    /// when `after` is `None`) as log events; returns the newest seq.
    pub async fn emit_checkpoints_after(&self, after: Option<i64>) -> Result<Option<i64>, AuditError> {
        let all = self.store.audit_checkpoints().await?;
        let newer: Vec<&AuditCheckpoint> = match after {
            Some(seq) => all.iter().filter(|c| c.seq > seq).collect(),
            None => all.last().into_iter().collect(),
        };
        for cp in &newer {
            emit_checkpoint(cp);
        }
        Ok(newer.last().map(|c| c.seq).or(after))
    }

    /// Records matching `query`, newest first (`limit` capped at
    /// [`MAX_QUERY_LIMIT`]).
    pub async fn query(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, AuditError> {
        let filter = AuditFilter {
            since: query.since,
            until: query.until,
            actor: query.actor.clone(),
            action: query.action.clone(),
            before_seq: query.before_seq,
            limit: query.limit.min(MAX_QUERY_LIMIT),
        };
        Ok(self.store.audit_query(filter).await?.into_iter().map(AuditRecord::from).collect())
    }

    /// Every record with `since <= time < until`, oldest first, handed to
    /// `sink` one page at a time (the log is never held in memory whole).
    pub async fn export(
        &self,
        since: Option<i64>,
        until: Option<i64>,
        sink: &mut (dyn FnMut(&AuditRecord) -> std::io::Result<()> + Send),
    ) -> Result<u64, AuditError> {
        let mut after = 0;
        let mut count = 0;
        loop {
            let page = self.store.audit_range(after, verify::PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for r in page {
                if since.is_some_and(|s| r.time < s) || until.is_some_and(|u| r.time >= u) {
                    continue;
                }
                sink(&r.into()).map_err(|e| AuditError::HeadIo { path: "export output".into(), source: e })?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// Checks the whole chain, the checkpoints and the head file.
    pub async fn verify(&self) -> Result<VerifyReport, AuditError> {
        let head = self.read_head().await?;
        verify::verify(self.store.as_ref(), &self.keys, &head).await
    }
}

/// Parses a time given on the command line as Unix ms: Unix seconds,
/// `YYYY-MM-DD` (midnight UTC) or `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn parse_time(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<i64>() {
        return secs.checked_mul(1000);
    }
    let (date, time) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z').unwrap_or(t))),
        None => (text, None),
    };
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i32>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let month = time::Month::try_from(u8::try_from(month).ok()?).ok()?;
    let date = time::Date::from_calendar_date(year, month, u8::try_from(day).ok()?).ok()?;
    let (h, m, s) = match time {
        None => (0, 0, 0),
        Some(t) => {
            let mut p = t.splitn(3, ':').map(|p| p.parse::<u8>().ok());
            (p.next()??, p.next()??, p.next().unwrap_or(Some(0))?)
        }
    };
    let at = date.with_hms(h, m, s).ok()?.assume_utc();
    Some(at.unix_timestamp() * 1000)
}

/// The `audit checkpoint` log event: everything needed to check the
/// checkpoint offline with the public key (see docs/audit-log.md).
fn emit_checkpoint(cp: &AuditCheckpoint) {
    tracing::info!(
        target: LOG_TARGET,
        seq = cp.seq,
        mac = %head::hex_encode(&cp.mac),
        time = cp.time,
        signature = %base64::engine::general_purpose::STANDARD.encode(&cp.signature),
        "audit checkpoint"
    );
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Writes a checkpoint whenever one is due, checking every `interval`,
/// until `shutdown` becomes true (the server's hourly guarantee; appends
/// write the per-[`CHECKPOINT_EVERY`] ones themselves). Checkpoints written
/// by other processes (CLI commands, whose log is a terminal) are emitted
/// here as well, so every checkpoint reaches the server's log sink; at
/// start the newest one is emitted again.
pub async fn run_checkpoints(log: Arc<AuditLog>, interval: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut logged: Option<i64> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match log.checkpoint_if_due(None).await {
                    Ok(Some(cp)) => logged = Some(cp.seq),
                    Ok(None) => {}
                    Err(e) => tracing::error!(target: LOG_TARGET, error = %e, "audit checkpoint failed"),
                }
                match log.emit_checkpoints_after(logged).await {
                    Ok(Some(seq)) => logged = Some(seq),
                    Ok(None) => {}
                    Err(e) => tracing::error!(target: LOG_TARGET, error = %e, "reading audit checkpoints failed"),
                }
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
