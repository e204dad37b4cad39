//! The session state machine and command dispatch.

use std::net::SocketAddr;
use std::time::Duration;

use pop3_proto::command::parse_command;
use pop3_proto::{Command, RespCode, StatusLine};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::connection::{Connection, Input};
use super::Pop3Context;
use crate::crypto::DataKey;
use crate::events::{ConnectionEvents, SecurityEvent};
use crate::store::{Lease, MessageMeta, UserRecord};

/// How long the goodbye after the pre-authentication deadline may take to
/// write; a peer that does not read is dropped after it.
const GOODBYE_GRACE: Duration = Duration::from_secs(2);

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Closed,
    /// The client asked for STLS and got `+OK`: the caller runs the TLS
    /// handshake on the same stream and starts a fresh session on it.
    StartTls,
}

/// What the dispatcher does after a command.
pub(super) enum Flow {
    Continue,
    Close,
    StartTls,
}

pub(super) enum State {
    Authorization(Authorization),
    Transaction(Box<Maildrop>),
}

/// AUTHORIZATION state data.
#[derive(Default)]
pub(super) struct Authorization {
    /// Name given by USER, waiting for PASS.
    pub user: Option<String>,
}

/// TRANSACTION state data: the maildrop as it was at login (message numbers
/// never change during a session) and the marks made since.
pub(super) struct Maildrop {
    pub user: UserRecord,
    pub key: DataKey,
    pub messages: Vec<MessageMeta>,
    pub deleted: Vec<bool>,
    /// The maildrop lease, held (and renewed) until the session ends;
    /// dropping it releases the maildrop. Its token fences the UPDATE.
    pub lease: Lease,
    /// What this session took and removed, reported once when it ends
    /// (the `mail_retrieved` event: per-session volume for investigations
    /// and the download-volume anomaly rule).
    pub volume: Volume,
}

/// RETR and committed DELE counts of one session.
#[derive(Debug)]
pub(super) struct Volume {
    pub peer: std::net::IpAddr,
    pub messages: std::sync::atomic::AtomicU64,
    pub octets: std::sync::atomic::AtomicU64,
    /// Set by QUIT once the deletions are committed.
    pub deleted: std::sync::atomic::AtomicU64,
}

impl Volume {
    pub fn new(peer: std::net::IpAddr) -> Volume {
        Volume { peer, messages: Default::default(), octets: Default::default(), deleted: Default::default() }
    }

    pub fn retrieved(&self, octets: u64) {
        self.messages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.octets.fetch_add(octets, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Maildrop {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let v = &self.volume;
        let (messages, octets, deleted) = (v.messages.load(Relaxed), v.octets.load(Relaxed), v.deleted.load(Relaxed));
        if messages > 0 || deleted > 0 {
            crate::events::emit(SecurityEvent::MailRetrieved {
                peer: v.peer,
                user: self.user.name.as_str(),
                messages,
                octets,
                deleted,
            });
        }
    }
}

impl Maildrop {
    /// Resolves a message number, refusing unknown and deleted messages.
    pub fn get(&self, n: pop3_proto::MsgNum) -> Result<&MessageMeta, StatusLine> {
        match self.messages.get(n.index()) {
            None => Err(StatusLine::err("No such message")),
            Some(_) if self.deleted[n.index()] => Err(StatusLine::err("Message already deleted")),
            Some(m) => Ok(m),
        }
    }

    /// (count, octets) of the messages not marked deleted.
    pub fn totals(&self) -> (usize, u64) {
        self.messages.iter().zip(&self.deleted).filter(|(_, d)| !**d).fold((0, 0), |(n, o), (m, _)| (n + 1, o + m.size))
    }
}

pub(crate) struct Session<'a> {
    pub ctx: &'a Pop3Context,
    pub peer: SocketAddr,
    pub tls: bool,
    /// RFC 9266 `tls-exporter` value (TLS 1.3 only), for SCRAM -PLUS.
    pub tls_exporter: Option<Vec<u8>>,
    pub bad_commands: u64,
    pub auth_failures: u64,
    /// When the connection must have logged in (set at accept).
    pub preauth_deadline: tokio::time::Instant,
    /// Command-rate token bucket: (tokens, last refill).
    bucket: (f64, tokio::time::Instant),
    pub shutdown: watch::Receiver<bool>,
    /// Rate-limited security events of this connection.
    pub events: ConnectionEvents,
}

impl<'a> Session<'a> {
    pub fn new(
        ctx: &'a Pop3Context,
        peer: SocketAddr,
        tls: bool,
        tls_exporter: Option<Vec<u8>>,
        preauth_deadline: tokio::time::Instant,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let bucket = (ctx.max_commands_per_second as f64, tokio::time::Instant::now());
        let events = ConnectionEvents::new(peer.ip());
        Self {
            ctx,
            peer,
            tls,
            tls_exporter,
            bad_commands: 0,
            auth_failures: 0,
            preauth_deadline,
            bucket,
            shutdown,
            events,
        }
    }

    /// May credentials be sent on this connection?
    pub fn credentials_allowed(&self) -> bool {
        self.tls || self.ctx.cfg.plaintext_auth_networks.iter().any(|n| n.contains(self.peer.ip()))
    }

    /// How long the next read may wait. Before login this is bounded by the
    /// connection's pre-authentication deadline as a whole, so a client
    /// that trickles bytes (slow-loris) cannot stay unauthenticated longer
    /// than `preauth_timeout_secs` from accept.
    pub fn idle_timeout(&self, state: &State) -> Duration {
        match state {
            State::Authorization(_) => self.preauth_deadline.saturating_duration_since(tokio::time::Instant::now()),
            State::Transaction(_) => Duration::from_secs(self.ctx.cfg.idle_timeout_secs),
        }
    }

    /// Counts a bad command; returns `Flow::Close` once the limit is hit.
    pub fn bad_command<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        reply: StatusLine,
        reason: &'static str,
    ) -> Flow {
        self.bad_commands += 1;
        if self.bad_commands >= self.ctx.cfg.max_bad_commands {
            self.events.emit(SecurityEvent::ProtocolAbuse {
                peer: &self.peer.ip().to_string(),
                protocol: "pop3",
                reason,
            });
            self.ctx.security.record_protocol_abuse(self.peer.ip());
            conn.reply(StatusLine::err("Too many bad commands, closing connection"));
            return Flow::Close;
        }
        conn.reply(reply);
        Flow::Continue
    }

    /// Command rate limit: a token bucket of `max_commands_per_second`
    /// tokens refilled continuously; an empty bucket delays the command.
    async fn throttle(&mut self) {
        let rate = self.ctx.max_commands_per_second.max(1) as f64;
        let now = tokio::time::Instant::now();
        let elapsed = now.duration_since(self.bucket.1).as_secs_f64();
        self.bucket = ((self.bucket.0 + elapsed * rate).min(rate), now);
        if self.bucket.0 < 1.0 {
            let wait = (1.0 - self.bucket.0) / rate;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            self.bucket = (1.0, tokio::time::Instant::now());
        }
        self.bucket.0 -= 1.0;
    }

    /// Runs the session until QUIT, disconnect, timeout, shutdown or STLS.
    pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        greet: bool,
    ) -> std::io::Result<End> {
        if greet {
            // No product name or version in the greeting (no disclosure).
            conn.reply(StatusLine::ok("POP3 server ready"));
        }
        let mut state = State::Authorization(Authorization::default());
        loop {
            let authorization = matches!(state, State::Authorization(_));
            // Before login no write may outlive the pre-authentication
            // deadline (a peer that pipelines and reads slowly, or not at all).
            conn.set_write_deadline(authorization.then_some(self.preauth_deadline));
            let idle = self.idle_timeout(&state);
            let line = match conn.read_line(idle, &mut self.shutdown).await? {
                Input::Line(l) => l,
                Input::TooLong => match self.bad_command(conn, StatusLine::err("Line too long"), "line too long") {
                    Flow::Continue => continue,
                    _ => break,
                },
                Input::Eof => return Ok(End::Closed),
                Input::Timeout => {
                    // RFC 1939 autologout: close without entering UPDATE.
                    conn.reply(StatusLine::err(match state {
                        State::Authorization(_) => "Disconnected: no login in time",
                        State::Transaction(_) => "Disconnected for inactivity",
                    }));
                    break;
                }
                Input::Shutdown => {
                    conn.reply(StatusLine::err_code(RespCode::SysTemp, "Server shutting down, try again later"));
                    break;
                }
            };
            self.throttle().await;
            if authorization && tokio::time::Instant::now() >= self.preauth_deadline {
                // Pipelined commands are served only while the deadline
                // lasts: it is for the connection, not for each read.
                conn.reply(StatusLine::err("Disconnected: no login in time"));
                break;
            }
            let cmd = match parse_command(&line) {
                Ok(c) => c,
                Err(e) => match self.bad_command(conn, StatusLine::err(e.to_string()), "malformed command") {
                    Flow::Continue => continue,
                    _ => break,
                },
            };
            if let Err(why) = allowed(&state, &cmd, self.tls) {
                match self.bad_command(conn, StatusLine::err(why), "command not allowed in state") {
                    Flow::Continue => continue,
                    _ => break,
                }
            }
            if authorization && sends_credentials(&cmd) && !self.credentials_allowed() {
                // Credentials before TLS: refused without looking at them,
                // counted as a bad command, logged at a bounded rate.
                discard_credentials(cmd);
                self.events.emit(SecurityEvent::PlaintextAuthRefused { peer: self.peer.ip() });
                let reply = StatusLine::err_code(RespCode::Auth, "Plaintext authentication disallowed, use STLS first");
                match self.bad_command(conn, reply, "credentials before TLS") {
                    Flow::Continue => continue,
                    _ => break,
                }
            }
            let (next, flow) = match state {
                State::Authorization(a) => self.authorization(conn, a, cmd).await?,
                State::Transaction(m) => self.transaction(conn, m, cmd).await?,
            };
            state = next;
            match flow {
                Flow::Continue => {}
                Flow::Close => break,
                Flow::StartTls => {
                    conn.flush().await?;
                    let discarded = conn.discard_buffered();
                    if discarded > 0 {
                        self.events.emit(SecurityEvent::StartTlsInjection { peer: self.peer.ip(), discarded });
                    }
                    return Ok(End::StartTls);
                }
            }
        }
        if matches!(state, State::Authorization(_)) {
            // The goodbye gets a short grace past the deadline, no more.
            conn.set_write_deadline(Some(self.preauth_deadline.max(tokio::time::Instant::now() + GOODBYE_GRACE)));
        }
        conn.flush().await?;
        Ok(End::Closed)
    }

    async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        mut m: Box<Maildrop>,
        cmd: Command,
    ) -> std::io::Result<(State, Flow)> {
        let flow = match cmd {
            Command::Stat => self.stat(conn, &m),
            Command::List(n) => self.list(conn, &m, n).await?,
            Command::Uidl(n) => self.uidl(conn, &m, n).await?,
            Command::Retr(n) => self.retr(conn, &m, n, None).await?,
            Command::Top(n, lines) => self.retr(conn, &m, n, Some(lines)).await?,
            Command::Dele(n) => self.dele(conn, &mut m, n),
            Command::Rset => self.rset(conn, &mut m),
            Command::Noop => {
                conn.reply(StatusLine::ok(""));
                Flow::Continue
            }
            Command::Capa => {
                self.capa(conn, false);
                Flow::Continue
            }
            Command::Quit => return self.quit(conn, m).await,
            // `allowed` has already refused everything else.
            _ => {
                conn.reply(StatusLine::err("Command not valid in this state"));
                Flow::Continue
            }
        };
        Ok((State::Transaction(m), flow))
    }
}

/// Commands that carry credentials (or start a SASL exchange that will).
fn sends_credentials(cmd: &Command) -> bool {
    matches!(cmd, Command::User(_) | Command::Pass(_) | Command::Auth { mechanism: Some(_), .. })
}

/// Wipes a refused command's secret before it is dropped.
fn discard_credentials(cmd: Command) {
    use zeroize::Zeroize;
    match cmd {
        Command::Pass(mut p) => p.zeroize(),
        Command::Auth { initial_response: Some(mut r), .. } => r.zeroize(),
        _ => {}
    }
}

/// The one place that decides whether a command may run in a state.
pub(super) fn allowed(state: &State, cmd: &Command, tls: bool) -> Result<(), &'static str> {
    use Command::*;
    match (state, cmd) {
        (_, Capa | Quit) => Ok(()),
        (State::Authorization(_), Stls) if tls => Err("Already using TLS"),
        (State::Authorization(_), User(_) | Pass(_) | Auth { .. } | Apop | Stls) => Ok(()),
        (State::Transaction(_), Stat | List(_) | Uidl(_) | Retr(_) | Top(..) | Dele(_) | Noop | Rset) => Ok(()),
        (State::Authorization(_), _) => Err("Not logged in"),
        (State::Transaction(_), _) => Err("Command not valid in this state"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_table() {
        let auth = State::Authorization(Authorization::default());
        assert!(allowed(&auth, &Command::Stls, false).is_ok());
        assert!(allowed(&auth, &Command::Stls, true).is_err());
        assert!(allowed(&auth, &Command::Stat, true).is_err());
        assert!(allowed(&auth, &Command::Noop, true).is_err());
        assert!(allowed(&auth, &Command::User("a".into()), true).is_ok());
        assert!(allowed(&auth, &Command::Quit, false).is_ok());
    }
}
