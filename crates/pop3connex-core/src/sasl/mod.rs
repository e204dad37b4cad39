//! Pluggable SASL (RFC 4422) for POP3 AUTH (RFC 5034).
//!
//! A mechanism is a small state machine fed the client's decoded responses.
//! It either asks for another round, finishes with an authenticated user,
//! or fails. Implemented: PLAIN (RFC 4616), SCRAM-SHA-256 and
//! SCRAM-SHA-256-PLUS (RFC 5802/7677/9266) in [`scram`], and with `[oauth]`
//! configured OAUTHBEARER (RFC 7628) and XOAUTH2 in [`bearer`].
//!
//! Which mechanisms a connection offers, and in which order, is asked of
//! the registry ([`offered`], [`start`]) with the connection's facts
//! ([`ConnectionFacts`]): the CAPA SASL line, the AUTH listing and AUTH
//! dispatch all come from the one [`REGISTRY`] table.
//!
//! An account that refuses logins (locked out, disabled, password expired:
//! [`Authenticator::login_refusal`]) is refused by every mechanism *before*
//! it verifies anything and before
//! any server-final message, with the reply and the work of a wrong secret:
//! a correct guess is never confirmed. A client that abandons an exchange
//! after the mechanism answered its proof ([`Mechanism::abandoned`]) is
//! counted as a failed login.

use std::sync::Arc;

use async_trait::async_trait;

use crate::auth::{AuthFailure, Authenticator};
use crate::oauth::TokenValidator;
use crate::store::UserRecord;

pub mod bearer;
pub mod plain;
pub mod scram;

/// The result of one SASL step.
pub enum Step {
    /// Send this challenge (raw bytes; the session base64-encodes it).
    Challenge(Vec<u8>),
    /// Authenticated.
    Success(UserRecord),
    /// Failed. `user` is the claimed identity if one was parsed (for logs).
    Failure { reason: AuthFailure, user: Option<String> },
    /// The client's message was malformed.
    Malformed(&'static str),
}

/// Whether a claimed name is locked out for this connection's address.
pub type LockCheck<'a> = &'a (dyn Fn(&str) -> bool + Send + Sync);

/// What a mechanism may know about the connection.
pub struct SaslContext<'a> {
    pub auth: &'a Authenticator,
    /// `tls-exporter` channel-binding data when the connection is TLS 1.3.
    pub tls_exporter: Option<&'a [u8]>,
    /// The session's lockout check (per name and address), asked before
    /// any verification.
    pub locked: LockCheck<'a>,
}

/// A [`LockCheck`] for callers without lockouts (tests, tools).
pub fn never_locked(_: &str) -> bool {
    false
}

#[async_trait]
pub trait Mechanism: Send {
    fn name(&self) -> &'static str;
    /// Handles the next client response (`None` when AUTH carried no
    /// initial response and this is the start of the exchange).
    async fn step(&mut self, ctx: &SaslContext<'_>, response: Option<&[u8]>) -> Step;
    /// What abandoning the exchange now (the client cancels with `*`, sends
    /// something unreadable, or disconnects) counts as: the failure and the
    /// claimed user once the mechanism has answered a proof (SCRAM's
    /// server-final, a bearer mechanism's error challenge), `None` before.
    /// So walking away cannot keep a verified guess or a refused token off
    /// the failure counters.
    fn abandoned(&self) -> Option<(AuthFailure, Option<String>)> {
        None
    }
}

/// What decides which mechanisms a connection offers.
#[derive(Clone, Copy)]
pub struct ConnectionFacts<'a> {
    /// Whether credentials may be sent on this connection now (TLS, or
    /// plaintext allowed from this address). Without it nothing is offered
    /// and nothing starts, whatever the session checked before.
    pub credentials_allowed: bool,
    /// Whether TLS 1.3 `tls-exporter` channel-binding data is available
    /// (SCRAM-SHA-256-PLUS).
    pub tls_exporter: bool,
    /// The bearer-token validator when `[oauth]` has issuers.
    pub oauth: Option<&'a Arc<TokenValidator>>,
}

/// One mechanism the server implements.
pub struct Registered {
    pub name: &'static str,
    /// Whether it is offered on a connection with these facts.
    offered: fn(&ConnectionFacts<'_>) -> bool,
    /// Starts an exchange (only called when `offered`).
    start: fn(&ConnectionFacts<'_>) -> Option<Box<dyn Mechanism>>,
}

/// Every mechanism, in order of preference (the order of the CAPA SASL
/// line and of the AUTH listing).
pub static REGISTRY: [Registered; 5] = [
    Registered {
        name: "SCRAM-SHA-256-PLUS",
        offered: |f| f.tls_exporter,
        start: |_| Some(Box::new(scram::Scram::new(true))),
    },
    Registered { name: "SCRAM-SHA-256", offered: |_| true, start: |_| Some(Box::new(scram::Scram::new(false))) },
    Registered { name: "PLAIN", offered: |_| true, start: |_| Some(Box::new(plain::Plain)) },
    Registered {
        name: "OAUTHBEARER",
        offered: |f| f.oauth.is_some(),
        start: |f| f.oauth.and_then(|v| bearer::start("OAUTHBEARER", v)),
    },
    Registered {
        name: "XOAUTH2",
        offered: |f| f.oauth.is_some(),
        start: |f| f.oauth.and_then(|v| bearer::start("XOAUTH2", v)),
    },
];

/// Mechanisms offered on a connection, in order of preference.
pub fn offered(facts: &ConnectionFacts<'_>) -> Vec<&'static str> {
    if !facts.credentials_allowed {
        return Vec::new();
    }
    REGISTRY.iter().filter(|m| (m.offered)(facts)).map(|m| m.name).collect()
}

/// Starts the named mechanism if it is offered on this connection.
pub fn start(name: &str, facts: &ConnectionFacts<'_>) -> Option<Box<dyn Mechanism>> {
    if !facts.credentials_allowed {
        return None;
    }
    REGISTRY.iter().find(|m| m.name == name && (m.offered)(facts)).and_then(|m| (m.start)(facts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(credentials_allowed: bool, tls_exporter: bool) -> ConnectionFacts<'static> {
        ConnectionFacts { credentials_allowed, tls_exporter, oauth: None }
    }

    #[test]
    fn registry_offers_by_connection_facts_in_preference_order() {
        assert_eq!(offered(&facts(true, false)), ["SCRAM-SHA-256", "PLAIN"]);
        assert_eq!(offered(&facts(true, true)), ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN"]);
        assert!(offered(&facts(false, true)).is_empty());
        assert!(start("PLAIN", &facts(false, true)).is_none());
        assert!(start("SCRAM-SHA-256-PLUS", &facts(true, false)).is_none());
        assert_eq!(start("SCRAM-SHA-256-PLUS", &facts(true, true)).unwrap().name(), "SCRAM-SHA-256-PLUS");
        assert!(start("OAUTHBEARER", &facts(true, true)).is_none(), "no issuers, no bearer mechanisms");
        assert!(start("plain", &facts(true, true)).is_none(), "the session upper-cases names");
    }
}
