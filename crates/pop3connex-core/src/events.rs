//! Security-relevant events, emitted in one stable, documented shape.
//!
//! Every decision that an administrator, a SIEM, fail2ban, metrics or the
//! audit log may care about goes through [`emit`]. Today the sink is the
//! `tracing` target `pop3connex::security` (human or JSON log lines, fields
//! `event`, `peer`, `user`, `mechanism`, `reason`); metrics, alerts and the
//! audit log subscribe to the same events later without touching callers.
//! Events never carry passwords, SASL payloads, tokens or keys: there is no
//! field for them.

use std::net::IpAddr;

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
}

const TARGET: &str = "pop3connex::security";

/// Emits an event to every subscriber.
pub fn emit(event: SecurityEvent<'_>) {
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
