//! AUTHORIZATION state: CAPA, STLS, USER/PASS, AUTH, APOP (refused), QUIT.

use std::time::Duration;

use base64::Engine as _;
use pop3_proto::{Command, RespCode, StatusLine};
use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

use super::connection::{Connection, Input};
use super::session::{Authorization, Flow, Maildrop, Session, State};
use crate::auth::AuthFailure;
use crate::events::{emit, SecurityEvent};
use crate::mailstore::MailStoreError;
use crate::sasl::{self, Step};
use crate::store::{StoreError, UserRecord};
use crate::types::UserName;

type Handled = std::io::Result<(State, Flow)>;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

impl Session<'_> {
    pub(super) async fn authorization<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        mut a: Authorization,
        cmd: Command,
    ) -> Handled {
        let flow = match cmd {
            Command::Capa => {
                self.capa(conn, true);
                Flow::Continue
            }
            Command::Quit => {
                conn.reply(StatusLine::ok("Bye"));
                Flow::Close
            }
            Command::Stls => {
                conn.reply(StatusLine::ok("Begin TLS negotiation"));
                Flow::StartTls
            }
            Command::Apop => {
                // APOP needs the cleartext password on the server; we never
                // have it. Not advertised, refused.
                conn.reply(StatusLine::err("APOP is not supported"));
                Flow::Continue
            }
            Command::User(name) => {
                if !self.credentials_allowed() {
                    return Ok((State::Authorization(a), self.refuse_plaintext(conn)));
                }
                // Same answer whether or not the user exists.
                a.user = Some(name);
                conn.reply(StatusLine::ok(""));
                Flow::Continue
            }
            Command::Pass(password) => {
                let password = Zeroizing::new(password);
                let Some(user) = a.user.take() else {
                    let f = self.bad_command(conn, StatusLine::err("Send USER first"), "PASS without USER");
                    return Ok((State::Authorization(a), f));
                };
                if !self.credentials_allowed() {
                    return Ok((State::Authorization(a), self.refuse_plaintext(conn)));
                }
                let locked = self.ctx.security.account_locked(&user, self.peer.ip());
                if self.ctx.auth.login_refusal(locked, None).is_some() {
                    // Refused before hashing: a locked name costs no CPU.
                    let name = UserName::parse(&user).map(|u| u.to_string()).unwrap_or_default();
                    emit(SecurityEvent::LockedOut { peer: self.peer.ip(), user: &name });
                    let flow = self.login_failed(conn, Some(&name), "Authentication failed").await;
                    return Ok((State::Authorization(a), flow));
                }
                let result = self.ctx.auth.verify_password(&user, &password).await;
                return self.finish_login(conn, a, result, Some(&user), "USER").await;
            }
            Command::Auth { mechanism: None, .. } => {
                conn.reply(StatusLine::ok("Supported mechanisms follow"));
                if self.credentials_allowed() {
                    for m in sasl::offered(&self.sasl_facts()) {
                        conn.raw().extend_from_slice(m.as_bytes());
                        conn.raw().extend_from_slice(b"\r\n");
                    }
                }
                conn.raw().extend_from_slice(b".\r\n");
                Flow::Continue
            }
            Command::Auth { mechanism: Some(mech), initial_response } => {
                let initial_response = initial_response.map(Zeroizing::new);
                if !self.credentials_allowed() {
                    return Ok((State::Authorization(a), self.refuse_plaintext(conn)));
                }
                return self.sasl(conn, a, &mech, initial_response).await;
            }
            _ => {
                conn.reply(StatusLine::err("Not logged in"));
                Flow::Continue
            }
        };
        Ok((State::Authorization(a), flow))
    }

    fn refuse_plaintext<S: AsyncRead + AsyncWrite + Unpin>(&mut self, conn: &mut Connection<S>) -> Flow {
        emit(SecurityEvent::PlaintextAuthRefused { peer: self.peer.ip() });
        conn.reply(StatusLine::err_code(RespCode::Auth, "Plaintext authentication disallowed, use STLS first"));
        Flow::Continue
    }

    async fn sasl<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        a: Authorization,
        mech_name: &str,
        initial: Option<Zeroizing<Vec<u8>>>,
    ) -> Handled {
        let Some(mut mech) = sasl::start(mech_name, &self.sasl_facts()) else {
            conn.reply(StatusLine::err("Unsupported authentication mechanism"));
            return Ok((State::Authorization(a), Flow::Continue));
        };
        // RFC 5034: "=" is an empty initial response.
        let mut response: Option<Zeroizing<Vec<u8>>> = match initial {
            None => None,
            Some(ir) if ir.as_slice() == b"=" => Some(Zeroizing::new(Vec::new())),
            Some(ir) => match B64.decode(&*ir) {
                Ok(d) => Some(Zeroizing::new(d)),
                Err(_) => {
                    conn.reply(StatusLine::err("Invalid base64 in initial response"));
                    return Ok((State::Authorization(a), Flow::Continue));
                }
            },
        };
        let (security, peer) = (self.ctx.security.clone(), self.peer.ip());
        let locked = move |user: &str| security.account_locked(user, peer);
        loop {
            let sasl_ctx =
                sasl::SaslContext { auth: &self.ctx.auth, tls_exporter: self.tls_exporter.as_deref(), locked: &locked };
            let step = mech.step(&sasl_ctx, response.as_ref().map(|r| r.as_slice())).await;
            match step {
                Step::Challenge(challenge) => {
                    conn.raw().extend_from_slice(b"+ ");
                    conn.raw().extend_from_slice(B64.encode(&challenge).as_bytes());
                    conn.raw().extend_from_slice(b"\r\n");
                    let idle = self.preauth_deadline.saturating_duration_since(tokio::time::Instant::now());
                    let line = match conn.read_line(idle, &mut self.shutdown).await? {
                        Input::Line(l) => Zeroizing::new(l),
                        Input::TooLong => {
                            if let Some((reason, user)) = mech.abandoned() {
                                return self.finish_login(conn, a, Err(reason), user.as_deref(), mech.name()).await;
                            }
                            conn.reply(StatusLine::err("Line too long, authentication aborted"));
                            return Ok((State::Authorization(a), Flow::Continue));
                        }
                        Input::Eof | Input::Timeout | Input::Shutdown => {
                            if let Some((reason, user)) = mech.abandoned() {
                                self.count_abandoned(reason, user.as_deref(), mech.name());
                            }
                            return Ok((State::Authorization(a), Flow::Close));
                        }
                    };
                    if line.as_slice() == b"*" {
                        // After the proof was answered, a cancel is a failure.
                        if let Some((reason, user)) = mech.abandoned() {
                            return self.finish_login(conn, a, Err(reason), user.as_deref(), mech.name()).await;
                        }
                        conn.reply(StatusLine::err("Authentication cancelled"));
                        return Ok((State::Authorization(a), Flow::Continue));
                    }
                    match B64.decode(&*line) {
                        Ok(d) => response = Some(Zeroizing::new(d)),
                        Err(_) => {
                            if let Some((reason, user)) = mech.abandoned() {
                                return self.finish_login(conn, a, Err(reason), user.as_deref(), mech.name()).await;
                            }
                            conn.reply(StatusLine::err("Invalid base64 in response, authentication aborted"));
                            return Ok((State::Authorization(a), Flow::Continue));
                        }
                    }
                }
                Step::Success(user) => return self.finish_login(conn, a, Ok(user), None, mech.name()).await,
                Step::Failure { reason, user } => {
                    return self.finish_login(conn, a, Err(reason), user.as_deref(), mech.name()).await
                }
                Step::Malformed(why) => {
                    tracing::debug!(mechanism = mech.name(), why, "malformed SASL message");
                    return self.finish_login(conn, a, Err(AuthFailure::BadPassword), None, mech.name()).await;
                }
            }
        }
    }

    /// Counts an exchange the client walked away from (disconnect, time-out)
    /// after the mechanism answered its proof: an event and a failure for
    /// the lockout and ban counters, no reply (nobody is listening).
    fn count_abandoned(&self, reason: AuthFailure, claimed: Option<&str>, mechanism: &str) {
        let peer = self.peer.ip();
        let shown = claimed.and_then(|c| UserName::parse(c).ok());
        emit(SecurityEvent::AuthFailure {
            peer,
            user: Some(shown.as_ref().map_or("<invalid>", |u| u.as_str())),
            mechanism,
            reason: reason.reason(),
        });
        self.ctx.security.record_auth_failure(peer, shown.as_ref().map(|u| u.as_str()));
    }

    /// Common end of every login attempt.
    async fn finish_login<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        a: Authorization,
        result: Result<UserRecord, AuthFailure>,
        claimed: Option<&str>,
        mechanism: &str,
    ) -> Handled {
        let peer = self.peer.ip();
        let user = match result {
            Ok(u) => u,
            Err(reason) => {
                let shown = claimed.and_then(|c| UserName::parse(c).ok());
                if reason == AuthFailure::Locked {
                    emit(SecurityEvent::LockedOut { peer, user: shown.as_ref().map_or("", |u| u.as_str()) });
                } else {
                    emit(SecurityEvent::AuthFailure {
                        peer,
                        user: Some(shown.as_ref().map_or("<invalid>", |u| u.as_str())),
                        mechanism,
                        reason: reason.reason(),
                    });
                }
                if reason == AuthFailure::Temporary {
                    conn.reply(StatusLine::err_code(RespCode::SysTemp, "Temporary authentication failure"));
                    return Ok((State::Authorization(a), Flow::Continue));
                }
                // A locked, disabled or expired account gets the reply of a
                // wrong password: anything else would confirm a guess.
                let text = match reason {
                    AuthFailure::ModernAuthRequired => {
                        "This account requires SCRAM, OAuth or an app password; update your client settings"
                    }
                    _ => "Authentication failed",
                };
                let flow = self.login_failed(conn, shown.as_ref().map(|u| u.as_str()), text).await;
                return Ok((State::Authorization(a), flow));
            }
        };
        if self.ctx.security.account_locked(user.name.as_str(), peer) {
            emit(SecurityEvent::LockedOut { peer, user: user.name.as_str() });
            let flow = self.login_failed(conn, Some(user.name.as_str()), "Authentication failed").await;
            return Ok((State::Authorization(a), flow));
        }
        self.ctx.security.record_auth_success(peer, &user.name);
        if let Some(delay) = self.ctx.cfg.login_delay_secs {
            if !self.ctx.security.try_login(&user.name, Duration::from_secs(delay)) {
                conn.reply(StatusLine::err_code(RespCode::LoginDelay, "Logged in too recently, try later"));
                return Ok((State::Authorization(a), Flow::Continue));
            }
        }
        let mail = self.ctx.auth.mail();
        let lock = match mail.store().lock_maildrop(user.mailbox.id).await {
            Ok(l) => l,
            Err(StoreError::Locked) => {
                emit(SecurityEvent::MaildropInUse { peer, user: user.name.as_str() });
                conn.reply(StatusLine::err_code(RespCode::InUse, "Mailbox is locked by another session"));
                return Ok((State::Authorization(a), Flow::Continue));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot lock maildrop");
                conn.reply(StatusLine::err_code(RespCode::SysTemp, "Mailbox temporarily unavailable"));
                return Ok((State::Authorization(a), Flow::Continue));
            }
        };
        let key = match mail.data_key(&user.mailbox) {
            Ok(k) => k,
            Err(e) => {
                emit(SecurityEvent::IntegrityFailure { user: user.name.as_str(), message: "mailbox key" });
                tracing::error!(error = %MailStoreError::from(e), "cannot unwrap mailbox key");
                conn.reply(StatusLine::err_code(RespCode::SysPerm, "Mailbox cannot be opened"));
                return Ok((State::Authorization(a), Flow::Continue));
            }
        };
        let messages = match mail.store().messages(user.mailbox.id).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot list maildrop");
                conn.reply(StatusLine::err_code(RespCode::SysTemp, "Mailbox temporarily unavailable"));
                return Ok((State::Authorization(a), Flow::Continue));
            }
        };
        tracing::Span::current().record("user", user.name.as_str());
        emit(SecurityEvent::AuthSuccess { peer, user: user.name.as_str(), mechanism, tls: self.tls });
        let deleted = vec![false; messages.len()];
        let volume = super::session::Volume::new(peer);
        let m = Maildrop { user, key, messages, deleted, lease: lock, volume };
        let (n, octets) = m.totals();
        conn.reply(StatusLine::ok(format!("Logged in, maildrop has {n} messages ({octets} octets)")));
        Ok((State::Transaction(Box::new(m)), Flow::Continue))
    }

    /// Counts a failed login: progressive delay, lockout and ban bookkeeping,
    /// one reply for every cause. Closes the connection when the per-
    /// connection limit is reached or the address has just been banned.
    async fn login_failed<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        user: Option<&str>,
        text: &str,
    ) -> Flow {
        let peer = self.peer.ip();
        self.auth_failures += 1;
        let outcome = self.ctx.security.record_auth_failure(peer, user);
        tokio::time::sleep(outcome.delay).await;
        let locked = user.is_some_and(|u| self.ctx.security.account_locked(u, peer));
        conn.reply(StatusLine::err_code(
            RespCode::Auth,
            if locked { "Authentication failed; too many failures, try again later" } else { text },
        ));
        if outcome.banned || self.auth_failures >= self.ctx.cfg.max_auth_failures {
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    /// What the SASL registry needs to know about this connection.
    fn sasl_facts(&self) -> sasl::ConnectionFacts<'_> {
        sasl::ConnectionFacts {
            credentials_allowed: self.credentials_allowed(),
            tls_exporter: self.tls_exporter.is_some(),
            oauth: self.ctx.oauth.as_ref(),
        }
    }

    /// CAPA (RFC 2449). Lists only what works on this connection now.
    pub(super) fn capa<S: AsyncRead + AsyncWrite + Unpin>(&self, conn: &mut Connection<S>, authorization: bool) {
        conn.reply(StatusLine::ok("Capability list follows"));
        let mut caps: Vec<String> =
            ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"].iter().map(|s| s.to_string()).collect();
        if authorization && self.credentials_allowed() {
            caps.push("USER".into());
            let mechanisms = sasl::offered(&self.sasl_facts());
            caps.push(format!("SASL {}", mechanisms.join(" ")));
        }
        if authorization && !self.tls {
            caps.push("STLS".into());
        }
        if let Some(d) = self.ctx.cfg.login_delay_secs {
            caps.push(format!("LOGIN-DELAY {d}"));
        }
        if let Some(d) = self.ctx.cfg.expire_days {
            caps.push(format!("EXPIRE {d}"));
        }
        let out = conn.raw();
        for c in caps {
            out.extend_from_slice(c.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}
