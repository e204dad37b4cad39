//! Pluggable SASL (RFC 4422) for POP3 AUTH (RFC 5034).
//!
//! A mechanism is a small state machine fed the client's decoded responses.
//! It either asks for another round, finishes with an authenticated user,
//! or fails. Implemented: PLAIN (RFC 4616), SCRAM-SHA-256 and
//! SCRAM-SHA-256-PLUS (RFC 5802/7677/9266), and with `[oauth]` configured
//! OAUTHBEARER (RFC 7628) and XOAUTH2 (in [`crate::oauth`]).
//!
//! An account that refuses logins (locked out, disabled, password expired)
//! is refused by every mechanism *before* it verifies anything and before
//! any server-final message, with the reply and the work of a wrong secret:
//! a correct guess is never confirmed. A client that abandons an exchange
//! after the mechanism answered its proof ([`Mechanism::abandoned`]) is
//! counted as a failed login.

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::auth::{AuthFailure, Authenticator};
use crate::scram::{parse_client_first, ChannelBinding, ScramServer};
use crate::store::UserRecord;

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

/// Mechanisms offered on a connection, in order of preference.
pub fn mechanisms(tls_exporter: bool, oauth: bool) -> Vec<&'static str> {
    let mut m = Vec::with_capacity(5);
    if tls_exporter {
        m.push("SCRAM-SHA-256-PLUS");
    }
    m.extend(["SCRAM-SHA-256", "PLAIN"]);
    if oauth {
        m.extend(crate::oauth::MECHANISMS);
    }
    m
}

/// Starts the named mechanism if it is offered on this connection.
pub fn start(
    name: &str,
    tls_exporter: bool,
    oauth: Option<&std::sync::Arc<crate::oauth::TokenValidator>>,
) -> Option<Box<dyn Mechanism>> {
    match name {
        "PLAIN" => Some(Box::new(Plain)),
        "SCRAM-SHA-256" => Some(Box::new(Scram { plus: false, state: ScramState::Start })),
        "SCRAM-SHA-256-PLUS" if tls_exporter => Some(Box::new(Scram { plus: true, state: ScramState::Start })),
        _ => oauth.and_then(|v| crate::oauth::start(name, v)),
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

    async fn step(&mut self, ctx: &SaslContext<'_>, response: Option<&[u8]>) -> Step {
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
        if (ctx.locked)(authc) {
            // Refused before hashing, whatever the password: as USER/PASS.
            return Step::Failure { reason: AuthFailure::Locked, user: Some(authc.to_owned()) };
        }
        match ctx.auth.verify_password(authc, pass).await {
            Ok(user) => Step::Success(user),
            Err(reason) => Step::Failure { reason, user: Some(authc.to_owned()) },
        }
    }
}

enum ScramState {
    Start,
    /// server-first sent; `record` is `None` for unknown users.
    AwaitFinal {
        server: Box<ScramServer>,
        record: Option<UserRecord>,
    },
    /// server-final sent; waiting for the client's empty response.
    AwaitAck(Box<UserRecord>),
    Done,
}

struct Scram {
    plus: bool,
    state: ScramState,
}

#[async_trait]
impl Mechanism for Scram {
    fn name(&self) -> &'static str {
        if self.plus {
            "SCRAM-SHA-256-PLUS"
        } else {
            "SCRAM-SHA-256"
        }
    }

    async fn step(&mut self, ctx: &SaslContext<'_>, response: Option<&[u8]>) -> Step {
        let cb = ChannelBinding { plus: self.plus, exporter: ctx.tls_exporter.map(<[u8]>::to_vec) };
        match std::mem::replace(&mut self.state, ScramState::Done) {
            ScramState::Start => {
                let Some(first) = response else {
                    self.state = ScramState::Start;
                    return Step::Challenge(Vec::new());
                };
                let (gs2, bare, user, nonce) = match parse_client_first(first, &cb) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::debug!(error = ?e, "SCRAM client-first refused");
                        return Step::Failure { reason: AuthFailure::BadPassword, user: None };
                    }
                };
                let (record, creds) = match ctx.auth.scram_lookup(&user).await {
                    Ok(x) => x,
                    Err(reason) => return Step::Failure { reason, user: Some(user) },
                };
                let (server, server_first) = ScramServer::start(gs2, bare, user, &nonce, creds, &cb);
                self.state = ScramState::AwaitFinal { server: Box::new(server), record };
                Step::Challenge(server_first)
            }
            ScramState::AwaitFinal { mut server, record } => {
                let user = server.user.clone();
                let Some(msg) = response else { return Step::Malformed("missing client-final") };
                // Decided before the proof is looked at. A refused account's
                // proof is then checked against random keys: it fails with
                // the same checks, work and reply as a wrong one, and no
                // server signature is computed.
                let refusal = if (ctx.locked)(&user) {
                    Some(AuthFailure::Locked)
                } else {
                    record.as_ref().and_then(|r| ctx.auth.account_refusal(r))
                };
                if refusal.is_some() {
                    server.blind();
                }
                match (server.finish(msg), record) {
                    (Ok(server_final), Some(r)) if r.scram.is_some() => {
                        self.state = ScramState::AwaitAck(Box::new(r));
                        Step::Challenge(server_final)
                    }
                    (Ok(_), _) => Step::Failure { reason: AuthFailure::UnknownUser, user: Some(user) },
                    (Err(e), record) => {
                        tracing::debug!(error = ?e, "SCRAM client-final refused");
                        let reason = match (refusal, record) {
                            (Some(reason), _) => reason,
                            (None, Some(_)) => AuthFailure::BadPassword,
                            (None, None) => AuthFailure::UnknownUser,
                        };
                        Step::Failure { reason, user: Some(user) }
                    }
                }
            }
            ScramState::AwaitAck(r) => match response {
                Some([]) => Step::Success(*r),
                _ => Step::Malformed("expected an empty response after server-final"),
            },
            ScramState::Done => Step::Malformed("exchange already finished"),
        }
    }

    fn abandoned(&self) -> Option<(AuthFailure, Option<String>)> {
        match &self.state {
            ScramState::AwaitAck(r) => Some((AuthFailure::Abandoned, Some(r.name.to_string()))),
            _ => None,
        }
    }
}
