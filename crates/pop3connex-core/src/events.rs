//! Security-relevant events, emitted in one stable, documented shape.
//!
//! Every decision that an administrator, a SIEM, fail2ban, metrics or the
//! audit log may care about goes through [`emit`]. Today the sink is the
//! `tracing` target `pop3connex::security` (human or JSON log lines, fields
//! `event`, `peer`, `user`, `mechanism`, `reason`); metrics, alerts and the
//! audit log subscribe to the same events later without touching callers.
//! Events never carry passwords, SASL payloads, tokens or keys: there is no
//! field for them.
//!
//! Events an unauthenticated peer can trigger at no cost (credentials
//! before TLS, refused connections, protocol abuse, STLS injection, DNSBL
//! hits) are rate-limited so nobody can flood the log: per address (IPv6 per
//! /64) at most [`PER_ADDRESS_BURST`] of each kind per [`ADDRESS_WINDOW`],
//! and through [`ConnectionEvents`] at most [`PER_CONNECTION_BURST`] of each
//! kind per connection. What is held back is counted and reported in one
//! `suppressed` event (`suppressed_event`, `count`, `scope`), per connection
//! when it ends and per address when its window is over. Failed logins and
//! lockouts are never suppressed: they already cost the attacker a growing
//! delay, and fail2ban counts them.

use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::limits::{aggregate, LruMap};

/// Events of one rate-limited kind logged per address and window.
pub const PER_ADDRESS_BURST: u32 = 10;
/// The per-address window.
pub const ADDRESS_WINDOW: Duration = Duration::from_secs(60);
/// Events of one rate-limited kind logged per connection.
pub const PER_CONNECTION_BURST: u32 = 3;
/// Addresses whose event counts are remembered (least recently used evicted).
const MAX_ADDRESSES: usize = 10_000;

/// The events. Field values are already safe to log.
#[derive(Debug, Clone)]
pub enum SecurityEvent<'a> {
    AuthSuccess {
        peer: IpAddr,
        user: &'a str,
        mechanism: &'a str,
        tls: bool,
    },
    AuthFailure {
        peer: IpAddr,
        user: Option<&'a str>,
        mechanism: &'a str,
        reason: &'a str,
    },
    /// Credentials offered before TLS on a connection that may not use them.
    PlaintextAuthRefused {
        peer: IpAddr,
    },
    ConnectionRefused {
        peer: IpAddr,
        listener: &'a str,
        reason: &'a str,
    },
    /// Too many bad commands, over-long lines and the like.
    ProtocolAbuse {
        peer: &'a str,
        protocol: &'a str,
        reason: &'a str,
    },
    /// Plaintext pipelined after STLS was thrown away.
    StartTlsInjection {
        peer: IpAddr,
        discarded: usize,
    },
    MaildropInUse {
        peer: IpAddr,
        user: &'a str,
    },
    /// A stored record failed authentication: tampering or corruption.
    IntegrityFailure {
        user: &'a str,
        message: &'a str,
    },
    /// A connection was refused because a DNS blocklist lists its address.
    DnsblListed {
        peer: IpAddr,
        zone: &'a str,
    },
    /// An address was banned automatically.
    Banned {
        peer: IpAddr,
        reason: &'a str,
        seconds: u64,
    },
    /// An account name was locked after repeated failures.
    AccountLocked {
        user: &'a str,
        seconds: u64,
    },
    /// A login was refused because the account name is locked.
    LockedOut {
        peer: IpAddr,
        user: &'a str,
    },
    TlsReloaded {
        ok: bool,
        detail: &'a str,
    },
    /// The store cannot write (disk full, I/O errors): mail is still served,
    /// deliveries get 451 and POP3 deletions `[SYS/TEMP]` until it can.
    StoreReadOnly {
        reason: &'a str,
    },
    /// The store writes again after [`SecurityEvent::StoreReadOnly`].
    StoreWritableAgain,
    /// A POP3 session that retrieved or deleted mail ended: its volume
    /// (RETR messages and octets, deletions committed at QUIT).
    MailRetrieved {
        peer: IpAddr,
        user: &'a str,
        messages: u64,
        octets: u64,
        deleted: u64,
    },
    /// `count` events of kind `event` from `peer` were rate-limited and not
    /// logged; `scope` is `connection` or `address`.
    Suppressed {
        peer: IpAddr,
        event: &'a str,
        count: u64,
        scope: &'a str,
    },
}

impl SecurityEvent<'_> {
    /// The `event` field of the log line.
    pub fn name(&self) -> &'static str {
        use SecurityEvent::*;
        match self {
            AuthSuccess { .. } => "auth_success",
            AuthFailure { .. } => "auth_failure",
            PlaintextAuthRefused { .. } => "plaintext_auth_refused",
            ConnectionRefused { .. } => "connection_refused",
            ProtocolAbuse { .. } => "protocol_abuse",
            StartTlsInjection { .. } => "starttls_injection",
            MaildropInUse { .. } => "maildrop_in_use",
            IntegrityFailure { .. } => "integrity_failure",
            DnsblListed { .. } => "dnsbl_listed",
            Banned { .. } => "ban",
            AccountLocked { .. } => "account_locked",
            LockedOut { .. } => "locked_out",
            TlsReloaded { ok: true, .. } => "tls_reloaded",
            TlsReloaded { ok: false, .. } => "tls_reload_failed",
            Suppressed { .. } => "suppressed",
            StoreReadOnly { .. } => "store_read_only",
            StoreWritableAgain => "store_writable_again",
            MailRetrieved { .. } => "mail_retrieved",
        }
    }

    /// The peer of an event that is rate-limited, `None` for the others.
    fn limited_peer(&self) -> Option<IpAddr> {
        use SecurityEvent::*;
        match self {
            PlaintextAuthRefused { peer }
            | ConnectionRefused { peer, .. }
            | StartTlsInjection { peer, .. }
            | DnsblListed { peer, .. }
            | Suppressed { peer, .. } => Some(*peer),
            ProtocolAbuse { peer, .. } => peer.parse().ok(),
            _ => None,
        }
    }
}

/// One address's count of one event kind in the current window.
#[derive(Debug, Clone, Copy)]
struct Slot {
    start: Instant,
    emitted: u32,
    suppressed: u64,
}

/// Per-address rate limit of repeated identical events.
struct AddressLimiter {
    slots: LruMap<(IpAddr, &'static str), Slot>,
}

impl AddressLimiter {
    /// `None`: suppress this event. `Some(n)`: log it, after a summary of
    /// the `n` suppressed in the window that just ended.
    fn admit(&mut self, peer: IpAddr, kind: &'static str, now: Instant) -> Option<u64> {
        let key = (aggregate(peer, 64).addr(), kind);
        match self.slots.get_mut(&key) {
            Some(s) if now.duration_since(s.start) < ADDRESS_WINDOW => {
                if s.emitted < PER_ADDRESS_BURST {
                    s.emitted += 1;
                    Some(0)
                } else {
                    s.suppressed += 1;
                    None
                }
            }
            Some(s) => {
                let before = s.suppressed;
                *s = Slot { start: now, emitted: 1, suppressed: 0 };
                Some(before)
            }
            None => {
                self.slots.insert(key, Slot { start: now, emitted: 1, suppressed: 0 });
                Some(0)
            }
        }
    }

    /// Takes the suppressed counts of windows that are over.
    fn take_finished(&mut self, now: Instant) -> Vec<(IpAddr, &'static str, u64)> {
        let mut out = Vec::new();
        let finished: Vec<_> = self
            .slots
            .iter()
            .filter(|(_, s)| s.suppressed > 0 && now.duration_since(s.start) >= ADDRESS_WINDOW)
            .map(|(k, _)| *k)
            .collect();
        for key in finished {
            if let Some(s) = self.slots.remove(&key) {
                out.push((key.0, key.1, s.suppressed));
            }
        }
        out
    }
}

fn limiter() -> std::sync::MutexGuard<'static, AddressLimiter> {
    static LIMITER: OnceLock<Mutex<AddressLimiter>> = OnceLock::new();
    LIMITER
        .get_or_init(|| Mutex::new(AddressLimiter { slots: LruMap::new(MAX_ADDRESSES) }))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Logs the `suppressed` summary of every per-address window that is over
/// (called periodically by the security state's refresh loop).
pub fn flush_suppressed() {
    let finished = limiter().take_finished(Instant::now());
    for (peer, event, count) in finished {
        log(SecurityEvent::Suppressed { peer, event, count, scope: "address" });
    }
}

/// Emits an event to every subscriber, unless its per-address rate limit
/// holds it back.
pub fn emit(event: SecurityEvent<'_>) {
    if let Some(peer) = event.limited_peer() {
        let kind = event.name();
        let admitted = limiter().admit(peer, kind, Instant::now());
        match admitted {
            None => return,
            Some(0) => {}
            Some(count) => log(SecurityEvent::Suppressed { peer, event: kind, count, scope: "address" }),
        }
    }
    log(event)
}

/// The rate-limited events of one connection: each kind is logged at most
/// [`PER_CONNECTION_BURST`] times; the rest are counted and reported in one
/// `suppressed` event when the connection ends (on drop).
pub struct ConnectionEvents {
    peer: IpAddr,
    /// (kind, logged, suppressed); a handful of kinds at most.
    kinds: Vec<(&'static str, u32, u64)>,
}

impl ConnectionEvents {
    pub fn new(peer: IpAddr) -> Self {
        Self { peer, kinds: Vec::new() }
    }

    pub fn emit(&mut self, event: SecurityEvent<'_>) {
        let kind = event.name();
        let i = match self.kinds.iter().position(|k| k.0 == kind) {
            Some(i) => i,
            None => {
                self.kinds.push((kind, 0, 0));
                self.kinds.len() - 1
            }
        };
        let slot = &mut self.kinds[i];
        if slot.1 < PER_CONNECTION_BURST {
            slot.1 += 1;
            emit(event);
        } else {
            slot.2 += 1;
        }
    }
}

impl Drop for ConnectionEvents {
    fn drop(&mut self) {
        for (event, _, count) in std::mem::take(&mut self.kinds) {
            if count > 0 {
                emit(SecurityEvent::Suppressed { peer: self.peer, event, count, scope: "connection" });
            }
        }
    }
}

const TARGET: &str = "pop3connex::security";

fn log(event: SecurityEvent<'_>) {
    use SecurityEvent::*;
    match event {
        AuthSuccess { peer, user, mechanism, tls } => {
            tracing::info!(target: TARGET, event = "auth_success", %peer, user, mechanism, tls, "login")
        }
        AuthFailure { peer, user, mechanism, reason } => tracing::warn!(
            target: TARGET, event = "auth_failure", %peer, user = user.unwrap_or("-"), mechanism, reason,
            "authentication failed"
        ),
        PlaintextAuthRefused { peer } => tracing::warn!(
            target: TARGET, event = "plaintext_auth_refused", %peer, "credentials refused before TLS"
        ),
        ConnectionRefused { peer, listener, reason } => tracing::warn!(
            target: TARGET, event = "connection_refused", %peer, listener, reason, "connection refused"
        ),
        ProtocolAbuse { peer, protocol, reason } => tracing::warn!(
            target: TARGET, event = "protocol_abuse", peer, protocol, reason, "protocol abuse"
        ),
        StartTlsInjection { peer, discarded } => tracing::warn!(
            target: TARGET, event = "starttls_injection", %peer, discarded, "plaintext pipelined after STLS discarded"
        ),
        MaildropInUse { peer, user } => {
            tracing::info!(target: TARGET, event = "maildrop_in_use", %peer, user, "maildrop locked")
        }
        IntegrityFailure { user, message } => tracing::error!(
            target: TARGET, event = "integrity_failure", user, message, "stored message failed its integrity check"
        ),
        DnsblListed { peer, zone } => tracing::warn!(
            target: TARGET, event = "dnsbl_listed", %peer, zone, "connection refused: address on a DNS blocklist"
        ),
        Banned { peer, reason, seconds } => tracing::warn!(
            target: TARGET, event = "ban", %peer, reason, seconds, "address banned"
        ),
        MailRetrieved { peer, user, messages, octets, deleted } => tracing::info!(
            target: TARGET, event = "mail_retrieved", %peer, user, messages, octets, deleted, "session volume"
        ),
        AccountLocked { user, seconds } => tracing::warn!(
            target: TARGET, event = "account_locked", user, seconds, "account locked after repeated failures"
        ),
        LockedOut { peer, user } => tracing::warn!(
            target: TARGET, event = "locked_out", %peer, user, "login refused: account locked"
        ),
        TlsReloaded { ok: true, detail } => {
            tracing::info!(target: TARGET, event = "tls_reloaded", detail, "TLS certificate reloaded")
        }
        TlsReloaded { ok: false, detail } => tracing::error!(
            target: TARGET, event = "tls_reload_failed", detail, "TLS reload failed; keeping the old certificate"
        ),
        StoreReadOnly { reason } => tracing::error!(
            target: TARGET, event = "store_read_only", reason,
            "store is read-only: mail is served, deliveries and deletions wait for disk space"
        ),
        StoreWritableAgain => {
            tracing::info!(target: TARGET, event = "store_writable_again", "store is writable again")
        }
        Suppressed { peer, event, count, scope } => tracing::warn!(
            target: TARGET, event = "suppressed", %peer, suppressed_event = event, count, scope,
            "repeated events suppressed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_events_per_address_are_limited_and_summarised() {
        let mut l = AddressLimiter { slots: LruMap::new(100) };
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::2".parse().unwrap();
        let admitted = (0..100).filter(|i| l.admit(if i % 2 == 0 { a } else { same_64 }, "x", t0).is_some()).count();
        assert_eq!(admitted, PER_ADDRESS_BURST as usize, "one /64 shares one budget");
        assert_eq!(l.admit("192.0.2.1".parse().unwrap(), "x", t0), Some(0), "other addresses unaffected");
        assert_eq!(l.admit(a, "y", t0), Some(0), "other kinds unaffected");
        assert!(l.take_finished(t0 + Duration::from_secs(1)).is_empty(), "window not over");
        let later = t0 + ADDRESS_WINDOW;
        assert_eq!(l.take_finished(later), vec![("2001:db8::".parse().unwrap(), "x", 90)]);
        assert_eq!(l.admit(a, "x", later), Some(0), "a new window, nothing left to report");
        for _ in 0..15 {
            l.admit(a, "x", later);
        }
        assert_eq!(l.admit(a, "x", later + ADDRESS_WINDOW), Some(6), "summary before the next event");
    }
}

/// Connector events (target `pop3connex::connector`). Values are safe to
/// log: upstream/downstream replies are sanitised before they get here and
/// no credential has a field.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ConnectorEvent<'a> {
    /// A message was fetched and dealt with.
    ConnectorFetched {
        account: &'a str,
        uidl: &'a str,
        size: u64,
        outcome: &'a str,
    },
    ConnectorDuplicate {
        account: &'a str,
        uidl: &'a str,
        recipient: &'a str,
    },
    ConnectorQuarantined {
        account: &'a str,
        uidl: &'a str,
        reason: &'a str,
    },
    ConnectorLoop {
        account: &'a str,
        uidl: &'a str,
        hops: usize,
    },
    ConnectorOversize {
        account: &'a str,
        uidl: &'a str,
        size: u64,
        limit: u64,
        action: &'a str,
    },
    /// The upstream failed (connect, TLS, login, protocol, timeout).
    ConnectorUpstreamError {
        account: &'a str,
        kind: &'a str,
        detail: &'a str,
    },
    /// A downstream server answered 4xx or could not be reached: retried later.
    ConnectorDeferred {
        account: &'a str,
        uidl: &'a str,
        recipient: &'a str,
        detail: &'a str,
    },
    /// A downstream server answered 5xx: the message went to quarantine.
    ConnectorRefused {
        account: &'a str,
        uidl: &'a str,
        recipient: &'a str,
        detail: &'a str,
    },
    ConnectorDeleted {
        account: &'a str,
        count: usize,
    },
}

impl ConnectorEvent<'_> {
    /// Events an operator should be alerted to (the alert hook runs for these).
    pub fn alert(&self) -> bool {
        matches!(
            self,
            ConnectorEvent::ConnectorQuarantined { .. }
                | ConnectorEvent::ConnectorRefused { .. }
                | ConnectorEvent::ConnectorLoop { .. }
                | ConnectorEvent::ConnectorUpstreamError { kind: "auth" | "tls" | "protocol" | "oauth", .. }
        )
    }
}

const CONNECTOR_TARGET: &str = "pop3connex::connector";

/// Emits a connector event as one log line with its fields.
pub fn emit_connector(event: &ConnectorEvent<'_>) {
    use ConnectorEvent::*;
    match *event {
        ConnectorFetched { account, uidl, size, outcome } => tracing::info!(
            target: CONNECTOR_TARGET, event = "connector_fetched", account, uidl, size, outcome, "message fetched"
        ),
        ConnectorDuplicate { account, uidl, recipient } => tracing::info!(
            target: CONNECTOR_TARGET, event = "connector_duplicate", account, uidl, recipient, "duplicate skipped"
        ),
        ConnectorQuarantined { account, uidl, reason } => tracing::warn!(
            target: CONNECTOR_TARGET, event = "connector_quarantined", account, uidl, reason, "message quarantined"
        ),
        ConnectorLoop { account, uidl, hops } => tracing::warn!(
            target: CONNECTOR_TARGET, event = "connector_loop", account, uidl, hops, "mail loop detected"
        ),
        ConnectorOversize { account, uidl, size, limit, action } => tracing::warn!(
            target: CONNECTOR_TARGET, event = "connector_oversize", account, uidl, size, limit, action,
            "message above the size limit"
        ),
        ConnectorUpstreamError { account, kind, detail } => tracing::warn!(
            target: CONNECTOR_TARGET, event = "connector_upstream_error", account, kind, detail, "upstream failed"
        ),
        ConnectorDeferred { account, uidl, recipient, detail } => tracing::warn!(
            target: CONNECTOR_TARGET, event = "connector_deferred", account, uidl, recipient, detail,
            "delivery deferred"
        ),
        ConnectorRefused { account, uidl, recipient, detail } => tracing::warn!(
            target: CONNECTOR_TARGET, event = "connector_refused", account, uidl, recipient, detail,
            "delivery refused permanently"
        ),
        ConnectorDeleted { account, count } => tracing::info!(
            target: CONNECTOR_TARGET, event = "connector_deleted", account, count, "upstream copies deleted"
        ),
    }
}
