//! The SASL exchange of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS
//! (RFC 5802/7677/9266): client-first, server-first, client-final,
//! server-final, the client's empty acknowledgement. The SCRAM crypto and
//! message parsing are in [`crate::scram`].

use async_trait::async_trait;

use super::{Mechanism, SaslContext, Step};
use crate::auth::AuthFailure;
use crate::scram::{parse_client_first, ChannelBinding, ScramServer};
use crate::store::UserRecord;

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

/// SCRAM-SHA-256, or with `plus` SCRAM-SHA-256-PLUS (`tls-exporter`
/// channel binding).
pub struct Scram {
    plus: bool,
    state: ScramState,
}

impl Scram {
    pub fn new(plus: bool) -> Self {
        Scram { plus, state: ScramState::Start }
    }
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
                let refusal = ctx.auth.login_refusal((ctx.locked)(&user), record.as_ref());
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
