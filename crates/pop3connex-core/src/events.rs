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
    }
}
