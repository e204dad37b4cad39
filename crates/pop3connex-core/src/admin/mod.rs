//! The admin service layer: one async function per administrative
//! operation (users, app passwords, account classes, bans, unlock,
//! connector accounts, import), each taking the [`Actor`] who does it and
//! returning a typed result or an [`AdminError`].
//!
//! The CLI only parses arguments and prints what these functions return;
//! the HTTPS admin API will call the same functions. Every operation passes
//! through one hook, [`Admin::audited`] (or [`Admin::audited_with`] with a
//! source address and before/after values), which writes the attempt to the
//! tamper-evident [`crate::audit_log`] before the work runs (and refuses the
//! work if it cannot), then its outcome, and logs one `tracing` event
//! ([`record`]). Records never carry a secret: operations pass a target (a
//! user name, a network, an account name), never a password or a token.
//!
//! Files: [`users`] (accounts, passwd-file import, unlock, mailbox stats),
//! [`app_passwords`], [`classes`], [`security`] (bans), [`connector`]
//! (connector accounts and runs), [`import`] (Maildir and mbox).

pub mod admins;
pub mod app_passwords;
pub mod classes;
pub mod connector;
pub mod import;
pub mod mfa;
pub mod security;
pub mod tokens;
pub mod users;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::OnceCell;

pub use crate::audit_log::{AuditDetails, AuditQuery, AuditRecord};
use crate::audit_log::{AuditLog, NewRecord};
use crate::auth::{AccountError, Authenticator};
use crate::config::Config;
use crate::connector::engine::{Connector, RunError};
use crate::mailstore::{MailStore, MailStoreError};
use crate::password::PasswordError;
use crate::store::StoreError;
use crate::types::UserName;

/// Who performs an administrative operation: recorded with every operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// The command-line tool, run by a local operator. `os_user` is the
    /// login name the environment claims (not authenticated: whoever can run
    /// the CLI can read the master key anyway).
    Cli { os_user: Option<String> },
    /// An authenticated administrator of the HTTPS admin API.
    Admin { name: String, address: IpAddr },
    /// A service token of the HTTPS admin API (its id, never the token).
    ServiceToken { id: String },
}

impl Actor {
    /// The CLI actor, named after the `USER` (or `LOGNAME`) environment variable.
    pub fn cli_from_env() -> Actor {
        let os_user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).ok().filter(|u| !u.is_empty());
        Actor::Cli { os_user }
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Cli { os_user: Some(u) } => write!(f, "cli:{u}"),
            Actor::Cli { os_user: None } => f.write_str("cli"),
            Actor::Admin { name, address } => write!(f, "admin:{name}@{address}"),
            Actor::ServiceToken { id } => write!(f, "token:{id}"),
        }
    }
}

/// The cause carried by an [`AdminError`]: its text and source chain are
/// shown unchanged (the CLI prints them as it always did).
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an administrative operation failed, split by who is at fault.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request does not parse or breaks a format rule (a class name, a
    /// network, a passwd-file line, an account file): the caller fixes it.
    #[error(transparent)]
    BadInput(Cause),
    /// The user, app password, ban or connector account does not exist.
    #[error(transparent)]
    NotFound(Cause),
    /// It exists already, or someone else holds it (a running fetch).
    #[error(transparent)]
    Conflict(Cause),
    /// Refused by policy: the password policy, an account defined in the
    /// configuration file, a destructive operation without confirmation.
    #[error(transparent)]
    Refused(Cause),
    /// Storage or another system failed (database, hashing, upstream
    /// server, DNS): not the caller's fault; retry or call an operator.
    #[error(transparent)]
    Storage(Cause),
}

impl AdminError {
    pub(crate) fn bad_input(msg: impl Into<String>) -> Self {
        AdminError::BadInput(msg.into().into())
    }
    pub(crate) fn not_found(msg: impl Into<String>) -> Self {
        AdminError::NotFound(msg.into().into())
    }
    pub(crate) fn conflict(msg: impl Into<String>) -> Self {
        AdminError::Conflict(msg.into().into())
    }
    pub(crate) fn refused(msg: impl Into<String>) -> Self {
        AdminError::Refused(msg.into().into())
    }

    /// Short name of the kind, as recorded (`bad_input`, `not_found`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            AdminError::BadInput(_) => "bad_input",
            AdminError::NotFound(_) => "not_found",
            AdminError::Conflict(_) => "conflict",
            AdminError::Refused(_) => "refused",
            AdminError::Storage(_) => "storage",
        }
    }

    /// An account error about `name`, with the CLI's wording for the two
    /// cases an operator meets most ("no such user: x", "user already exists: x").
    pub(crate) fn account(e: AccountError, name: &UserName) -> Self {
        match e {
            AccountError::NoSuchUser => AdminError::not_found(format!("no such user: {name}")),
            AccountError::UserExists => AdminError::conflict(format!("user already exists: {name}")),
            e @ (AccountError::Policy(_) | AccountError::BadPassword) => AdminError::Refused(Box::new(e)),
            e @ AccountError::UnsupportedHash => AdminError::BadInput(Box::new(e)),
            e @ (AccountError::Store(_) | AccountError::Password(_)) => AdminError::Storage(Box::new(e)),
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoSuchUser => AdminError::NotFound(Box::new(e)),
            StoreError::UserExists | StoreError::Locked | StoreError::Fenced => AdminError::Conflict(Box::new(e)),
            StoreError::Temporary(_) | StoreError::Permanent(_) => AdminError::Storage(Box::new(e)),
        }
    }
}

impl From<MailStoreError> for AdminError {
    fn from(e: MailStoreError) -> Self {
        match e {
            MailStoreError::Store(e) => e.into(),
            e => AdminError::Storage(Box::new(e)),
        }
    }
}

impl From<PasswordError> for AdminError {
    fn from(e: PasswordError) -> Self {
        AdminError::Storage(Box::new(e))
    }
}

impl From<RunError> for AdminError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Config(_) => AdminError::BadInput(Box::new(e)),
            RunError::Locked => AdminError::Conflict(Box::new(e)),
            e => AdminError::Storage(Box::new(e)),
        }
    }
}

/// What administrative operations need, built once per process (the CLI)
/// or per server (the admin API). The authenticator and the connector are
/// built on first use: most operations need neither, and building them
/// costs a dummy password hash or a DNS resolver.
pub struct Admin {
    cfg: Arc<Config>,
    mail: Arc<MailStore>,
    auth: OnceCell<Authenticator>,
    connector: OnceCell<Arc<Connector>>,
    audit: Arc<AuditLog>,
}

impl Admin {
    /// Opens the configured store (and checks the master key against it).
    pub async fn open(cfg: Config) -> Result<Admin, AdminError> {
        let mail = MailStore::open(&cfg).await.map_err(|e| AdminError::Storage(Box::new(e)))?;
        Ok(Admin::with_mail(Arc::new(cfg), Arc::new(mail)))
    }

    /// Works on an already opened store (the server, tests).
    pub fn with_mail(cfg: Arc<Config>, mail: Arc<MailStore>) -> Admin {
        let audit = Arc::new(AuditLog::for_mail(&mail, &cfg.store.path));
        Admin { cfg, mail, auth: OnceCell::new(), connector: OnceCell::new(), audit }
    }

    /// The audit log (verification, checkpoints, the public key).
    pub fn audit_log(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    pub fn mail(&self) -> &Arc<MailStore> {
        &self.mail
    }

    pub(crate) async fn auth(&self) -> Result<&Authenticator, AdminError> {
        self.auth.get_or_try_init(|| async { Ok(Authenticator::new(self.mail.clone(), self.cfg.auth.clone())?) }).await
    }

    pub(crate) async fn connector(&self) -> Result<&Arc<Connector>, AdminError> {
        self.connector
            .get_or_try_init(|| async { Ok(Arc::new(Connector::new(self.cfg.clone(), self.mail.clone())?)) })
            .await
    }

    /// The one hook every operation passes: records the attempt, runs
    /// `work`, records how it ended. See [`Admin::audited_with`].
    pub(crate) async fn audited<T>(
        &self,
        actor: &Actor,
        op: &'static str,
        target: &str,
        work: impl Future<Output = Result<T, AdminError>>,
    ) -> Result<T, AdminError> {
        self.audited_with(actor, op, target, AuditDetails::default(), work).await
    }

    /// Fail closed: appends the attempt (outcome `attempt`, with `details`'
    /// before/after values) to the audit log BEFORE running `work`; if that
    /// append fails, `work` is not run and [`AdminError::Storage`] is
    /// returned. Then appends the outcome (`ok` or the error kind); if that
    /// append fails, it is logged at error and the work's result returned
    /// (the attempt is on record).
    pub(crate) async fn audited_with<T>(
        &self,
        actor: &Actor,
        op: &'static str,
        target: &str,
        details: AuditDetails,
        work: impl Future<Output = Result<T, AdminError>>,
    ) -> Result<T, AdminError> {
        let details = with_source(actor, details);
        let actor_text = actor.to_string();
        let attempt = NewRecord { actor: &actor_text, action: op, target, outcome: "attempt", details: &details };
        if let Err(e) = self.audit.append(attempt).await {
            record(actor, op, target, "audit_failed");
            tracing::error!(error = %e, admin.action = op, "audit log cannot be written: operation refused");
            return Err(AdminError::Storage(
                format!("the audit log cannot be written, so the operation was not performed: {e}").into(),
            ));
        }
        let result = work.await;
        let outcome = result.as_ref().map_or_else(|e| e.kind(), |_| "ok");
        record(actor, op, target, outcome);
        let source_only = AuditDetails { source: details.source, before: None, after: None };
        let done = NewRecord { actor: &actor_text, action: op, target, outcome, details: &source_only };
        if let Err(e) = self.audit.append(done).await {
            tracing::error!(error = %e, admin.action = op, outcome, "the outcome of an operation is not in the audit log");
        }
        result
    }

    /// Records an event that is not an operation: an admin login (success or
    /// failure), a failed MFA challenge, a refused authorisation, a service
    /// token's use. Fails closed too: on `Err` the caller refuses the
    /// request.
    pub async fn audit_event(
        &self,
        actor: &Actor,
        op: &str,
        target: &str,
        outcome: &str,
        details: AuditDetails,
    ) -> Result<(), AdminError> {
        let details = with_source(actor, details);
        let actor_text = actor.to_string();
        record(actor, op, target, outcome);
        let new = NewRecord { actor: &actor_text, action: op, target, outcome, details: &details };
        self.audit.append(new).await.map(drop).map_err(|e| {
            tracing::error!(error = %e, admin.action = op, "audit log cannot be written");
            AdminError::Storage(format!("the audit log cannot be written: {e}").into())
        })
    }

    /// Reads audit records (newest first), itself recorded as `audit.read`.
    pub async fn audit_log_read(&self, actor: &Actor, query: &AuditQuery) -> Result<Vec<AuditRecord>, AdminError> {
        self.audited(actor, "audit.read", &describe_query(query.since, query.until), async {
            self.audit.query(query).await.map_err(|e| AdminError::Storage(Box::new(e)))
        })
        .await
    }

    /// Searches the local event store (newest first), recorded in the audit
    /// log as `events.read`.
    pub async fn events_search(
        &self,
        actor: &Actor,
        filter: crate::store::EventFilter,
    ) -> Result<Vec<crate::store::StoredEvent>, AdminError> {
        let mut target = describe_query(filter.since, filter.until);
        for (k, v) in [("user", &filter.user), ("ip", &filter.ip)] {
            if let Some(v) = v {
                target.push_str(&format!(" {k}={v}"));
            }
        }
        if !filter.names.is_empty() {
            target.push_str(&format!(" type={}", filter.names.join(",")));
        }
        self.audited(actor, "events.read", &target, async {
            self.mail.store().search_events(filter).await.map_err(|e| AdminError::Storage(Box::new(e)))
        })
        .await
    }

    /// Hands every record with `since <= time < until` (Unix ms) to `sink`,
    /// oldest first; recorded as `audit.read` (target `export ...`). Returns
    /// how many records were exported.
    pub async fn audit_log_export(
        &self,
        actor: &Actor,
        since: Option<i64>,
        until: Option<i64>,
        sink: &mut (dyn FnMut(&AuditRecord) -> std::io::Result<()> + Send),
    ) -> Result<u64, AdminError> {
        let target = format!("export {}", describe_query(since, until));
        self.audited(actor, "audit.read", &target, async {
            self.audit.export(since, until, sink).await.map_err(|e| AdminError::Storage(Box::new(e)))
        })
        .await
    }

    /// Verifies the audit log, then records that it was verified
    /// (`audit.verify`, outcome `intact` or `failed`). The verification
    /// does not depend on that record: a log whose tail was deleted refuses
    /// new records, and is reported all the same.
    pub async fn audit_log_verify(
        &self,
        actor: &Actor,
    ) -> Result<(crate::audit_log::VerifyReport, Option<AdminError>), AdminError> {
        let report = self.audit.verify().await.map_err(|e| AdminError::Storage(Box::new(e)))?;
        let outcome = if report.intact() { "intact" } else { "failed" };
        let recorded = self.audit_event(actor, "audit.verify", "*", outcome, AuditDetails::default()).await.err();
        Ok((report, recorded))
    }

    /// Points the head file at the chain's tail after an investigated
    /// mismatch, recorded as `audit.head_reset` with the old head and the
    /// tail.
    pub async fn audit_log_reset_head(&self, actor: &Actor) -> Result<AuditRecord, AdminError> {
        record(actor, "audit.head_reset", "head", "ok");
        self.audit.reset_head(&actor.to_string()).await.map_err(|e| AdminError::Storage(Box::new(e)))
    }
}

/// The actor's address as the record's source when the caller gave none.
fn with_source(actor: &Actor, mut details: AuditDetails) -> AuditDetails {
    if details.source.is_none() {
        if let Actor::Admin { address, .. } = actor {
            details.source = Some(*address);
        }
    }
    details
}

/// A query's time range as a record target (`since=... until=...`, `*`).
fn describe_query(since: Option<i64>, until: Option<i64>) -> String {
    match (since, until) {
        (None, None) => "*".into(),
        (s, u) => [s.map(|s| format!("since={s}")), u.map(|u| format!("until={u}"))]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Logs one administrative operation: who (`actor`), what (`op`, e.g.
/// `user.add`), on what (`target`: a user name, a network, an account,
/// never a secret) and how it ended (`outcome`: `ok` or an
/// [`AdminError::kind`]), as one `tracing` event at info beside the audit
/// record. The target field is `admin.target`: a field named
/// `target` would collide with the event's own target (the module) in the
/// flattened JSON log format.
fn record(actor: &Actor, op: &str, target: &str, outcome: &str) {
    tracing::info!(admin.action = op, actor = %actor, admin.target = %target, outcome = outcome, "admin action");
}
