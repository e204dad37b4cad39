//! Pluggable SASL (RFC 4422) for POP3 AUTH (RFC 5034).
//!
//! A mechanism is a small state machine fed the client's decoded responses.
//! It either asks for another round, finishes with an authenticated user,
//! or fails. PLAIN (RFC 4616) is here now; SCRAM-SHA-256(-PLUS), OAUTHBEARER
//! and XOAUTH2 plug in as further implementations of [`Mechanism`] without
//! changes to the session code.

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::auth::{AuthFailure, Authenticator};
use crate::store::UserRecord;

/// The result of one SASL step.
pub enum Step {
    /// Send this challenge (raw bytes; the session base64-encodes it).
    Challenge(Vec<u8>),
    /// Authenticated. `user_hint` is the name the client claimed, for logs.
    Success(UserRecord),
    /// Failed. `user` is the claimed identity if one was parsed (for logs).
    Failure { reason: AuthFailure, user: Option<String> },
    /// The client's message was malformed.
    Malformed(&'static str),
}

#[async_trait]
pub trait Mechanism: Send {
    fn name(&self) -> &'static str;
    /// Handles the next client response (`None` when AUTH carried no
    /// initial response and this is the start of the exchange).
    async fn step(&mut self, auth: &Authenticator, response: Option<&[u8]>) -> Step;
}

/// Mechanisms offered, in CAPA order.
pub const MECHANISMS: &[&str] = &["PLAIN"];

/// Starts the named mechanism, if we have it.
pub fn start(name: &str) -> Option<Box<dyn Mechanism>> {
    match name {
        "PLAIN" => Some(Box::new(Plain)),
        _ => None,
    }
}

/// RFC 4616 PLAIN: `authzid NUL authcid NUL passwd`. Proxy authorisation
/// (an authzid different from the authcid) is refused.
struct Plain;

#[async_trait]
impl Mechanism for Plain {
    fn name(&self) -> &'static str {
        "PLAIN"
    }

    async fn step(&mut self, auth: &Authenticator, response: Option<&[u8]>) -> Step {
        let Some(msg) = response else {
            return Step::Challenge(Vec::new());
        };
        let msg = Zeroizing::new(msg.to_vec());
        let mut parts = msg.split(|&b| b == 0);
        let (Some(authz), Some(authc), Some(pass), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Step::Malformed("PLAIN message must be authzid NUL authcid NUL password");
        };
        let Ok(authc) = std::str::from_utf8(authc) else {
            return Step::Malformed("PLAIN authcid is not UTF-8");
        };
        if authc.is_empty() || pass.is_empty() {
            return Step::Malformed("PLAIN needs a user name and a password");
        }
        if !authz.is_empty() && !authz.eq_ignore_ascii_case(authc.as_bytes()) {
            return Step::Failure { reason: AuthFailure::BadPassword, user: Some(authc.to_owned()) };
        }
        match auth.verify_password(authc, pass).await {
            Ok(user) => Step::Success(user),
            Err(reason) => Step::Failure { reason, user: Some(authc.to_owned()) },
        }
    }
}
