//! Leases with fencing tokens: how one holder at a time owns a maildrop (a
//! POP3 session) or a connector account (a connector run), across sessions,
//! processes and, with a shared backend, machines.
//!
//! A lease is taken with [`super::LeaseStore::acquire_lease`] and held as a
//! [`Lease`] guard. It expires unless renewed; the guard renews it in the
//! background (a task it owns, stopped when it is dropped) and releases it
//! when dropped. Every acquisition of a resource gets a [`FencingToken`]
//! greater than any earlier one for that resource, and the commits only
//! the holder may make carry the token: the backend refuses them
//! ([`super::StoreError::Fenced`]) unless the token is the current one and
//! the lease has not expired, checked in the same transaction as the
//! change. A holder that was paused or partitioned past its expiry, or was
//! superseded, therefore never applies a stale commit, even if it still
//! believes it holds the lease.
//!
//! The exclusion itself is the backend's: SQLite takes a `flock` per
//! resource (released by the kernel if the process dies) and records the
//! token in a `leases` row; PostgreSQL would take an advisory lock and a row.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{StoreError, StoreResult};
use crate::types::MailboxId;

/// Time to live of the leases taken by `lock_maildrop` and
/// `lock_connector`: long enough that a busy store never lets a live
/// holder's lease lapse between renewals, short enough that a vanished
/// holder's lease ends soon.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// How often a held lease is renewed, as a fraction of its time to live:
/// two renewals may fail (a busy store) before it lapses.
const RENEWALS_PER_TTL: u32 = 3;

/// How soon a renewal that failed for a temporary reason, or a lease not
/// yet recorded (taken while the store could not write), is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// What a lease is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LeaseResource {
    /// A mailbox, held by a POP3 session from login to the end of UPDATE.
    Maildrop(MailboxId),
    /// A connector account, held by one run (or resync) of it.
    ConnectorAccount(String),
}

impl LeaseResource {
    /// The resource's stable name in a backend (`maildrop:42`,
    /// `connector:isp`).
    pub fn key(&self) -> String {
        match self {
            LeaseResource::Maildrop(id) => format!("maildrop:{id}"),
            LeaseResource::ConnectorAccount(name) => format!("connector:{name}"),
        }
    }
}

impl std::fmt::Display for LeaseResource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// Grows with every acquisition of a resource: the current holder's token
/// is the greatest, and commits carrying a smaller one are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    pub const fn new(token: u64) -> Self {
        Self(token)
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for FencingToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

/// The holder name of this process, for leases taken without a more
/// specific one.
pub fn process_holder() -> String {
    format!("pid {}", std::process::id())
}

/// Milliseconds since the Unix epoch: the clock of lease expiries.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The expiry of a lease renewed now for `ttl`.
pub fn expiry_after(ttl: Duration) -> i64 {
    now_millis().saturating_add(ttl.as_millis().min(i64::MAX as u128) as i64)
}

/// What a backend does for a held lease: renew and release its record.
/// The [`Lease`] guard calls it from its renewal task and when dropped.
#[async_trait]
pub trait LeaseKeeper: Send + Sync + 'static {
    /// Records `token` as `holder`'s lease on `resource` until `expires_at`
    /// (Unix ms). Succeeds while `token` is the current token; also records
    /// a lease taken while the store could not write, as long as no newer
    /// one was recorded since. [`StoreError::Fenced`] when it was lost.
    async fn renew(
        &self,
        resource: &LeaseResource,
        token: FencingToken,
        holder: &str,
        expires_at: i64,
    ) -> StoreResult<()>;
    /// Ends the lease if `token` is still current, and waits for it.
    async fn release(&self, resource: &LeaseResource, token: FencingToken) -> StoreResult<()>;
    /// Like [`LeaseKeeper::release`] without waiting (from `Drop`): best
    /// effort, since the backend's exclusion ends with the guard anyway.
    fn release_detached(&self, resource: &LeaseResource, token: FencingToken);
}

/// What the guard and its renewal task share.
struct LeaseState {
    /// Expiry as last recorded (Unix ms).
    expires_at: AtomicI64,
    /// Whether the backend has recorded the token (a lease taken while the
    /// store could not write is recorded by the renewal task later; until
    /// then its commits are fenced).
    recorded: AtomicBool,
    /// Set when a renewal found the token superseded: commits will fail.
    lost: AtomicBool,
}

/// A held lease. Renewed in the background while it lives; dropping it
/// stops the renewal, releases the lease and ends the backend's exclusion.
pub struct Lease {
    resource: LeaseResource,
    token: FencingToken,
    holder: String,
    ttl: Duration,
    state: Arc<LeaseState>,
    keeper: Arc<dyn LeaseKeeper>,
    renewal: Option<tokio::task::JoinHandle<()>>,
    /// The backend's exclusion (a `flock` for SQLite); ends when dropped.
    _exclusion: Box<dyn Send + Sync>,
    released: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("resource", &self.resource)
            .field("token", &self.token)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// A lease a backend has just granted: `recorded` says whether its
    /// token is already stored with expiry `expires_at`. Starts the
    /// background renewal (needs a Tokio runtime).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        resource: LeaseResource,
        token: FencingToken,
        holder: &str,
        ttl: Duration,
        expires_at: i64,
        recorded: bool,
        keeper: Arc<dyn LeaseKeeper>,
        exclusion: impl Send + Sync + 'static,
    ) -> Self {
        let state = Arc::new(LeaseState {
            expires_at: AtomicI64::new(expires_at),
            recorded: AtomicBool::new(recorded),
            lost: AtomicBool::new(false),
        });
        let renewal = tokio::spawn(renew_while_held(
            resource.clone(),
            token,
            holder.to_owned(),
            ttl,
            state.clone(),
            keeper.clone(),
        ));
        Self {
            resource,
            token,
            holder: holder.to_owned(),
            ttl,
            state,
            keeper,
            renewal: Some(renewal),
            _exclusion: Box::new(exclusion),
            released: false,
        }
    }

    /// The token the holder's fenced commits carry.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    pub fn resource(&self) -> &LeaseResource {
        &self.resource
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Expiry as last recorded (Unix ms).
    pub fn expires_at(&self) -> i64 {
        self.state.expires_at.load(Ordering::SeqCst)
    }

    /// Whether a renewal found the lease taken over: its commits fail.
    pub fn is_lost(&self) -> bool {
        self.state.lost.load(Ordering::SeqCst)
    }

    /// Stops the background renewal: the lease lapses at its expiry while
    /// the guard (and the backend's exclusion) lives on. What a paused
    /// holder looks like to the store; for tests and drills.
    pub fn stop_renewing(&mut self) {
        if let Some(task) = self.renewal.take() {
            task.abort();
        }
    }

    /// Extends the lease by its time to live now.
    pub async fn renew(&self) -> StoreResult<()> {
        renew_once(&self.resource, self.token, &self.holder, self.ttl, &self.state, self.keeper.as_ref()).await
    }

    /// Releases the lease and waits until the release is recorded.
    pub async fn release(mut self) -> StoreResult<()> {
        self.stop_renewing();
        self.released = true;
        self.keeper.release(&self.resource, self.token).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop_renewing();
        if !self.released {
            self.keeper.release_detached(&self.resource, self.token);
        }
    }
}

async fn renew_once(
    resource: &LeaseResource,
    token: FencingToken,
    holder: &str,
    ttl: Duration,
    state: &LeaseState,
    keeper: &dyn LeaseKeeper,
) -> StoreResult<()> {
    let expires_at = expiry_after(ttl);
    match keeper.renew(resource, token, holder, expires_at).await {
        Ok(()) => {
            state.expires_at.store(expires_at, Ordering::SeqCst);
            state.recorded.store(true, Ordering::SeqCst);
            Ok(())
        }
        Err(StoreError::Fenced) => {
            state.lost.store(true, Ordering::SeqCst);
            Err(StoreError::Fenced)
        }
        Err(e) => Err(e),
    }
}

/// The renewal task of a held lease: renews every `ttl / 3`, sooner while
/// renewals fail or the lease is not recorded yet; ends when the lease is
/// lost (or the guard aborts it).
async fn renew_while_held(
    resource: LeaseResource,
    token: FencingToken,
    holder: String,
    ttl: Duration,
    state: Arc<LeaseState>,
    keeper: Arc<dyn LeaseKeeper>,
) {
    let interval = ttl / RENEWALS_PER_TTL;
    let mut wait = if state.recorded.load(Ordering::SeqCst) { interval } else { RETRY.min(interval) };
    loop {
        tokio::time::sleep(wait).await;
        wait = match renew_once(&resource, token, &holder, ttl, &state, keeper.as_ref()).await {
            Ok(()) => interval,
            Err(StoreError::Fenced) => {
                tracing::warn!(resource = %resource, token = token.get(), "lease lost to a newer holder");
                return;
            }
            Err(e) => {
                tracing::debug!(resource = %resource, error = %e, "lease renewal failed; retrying");
                RETRY.min(interval)
            }
        };
    }
}
