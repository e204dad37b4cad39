//! Listeners, connection limits, signals and graceful shutdown.
//!
//! Connection limits are checked at accept time, before any TLS work. Every
//! session watches one shutdown signal; on shutdown the accept loops stop,
//! idle sessions get a protocol-correct goodbye, busy ones finish their
//! current command, and [`RunningServer::shutdown`] waits for them up to the
//! configured grace period.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::auth::Authenticator;
use crate::config::{Config, LmtpListen};
use crate::events::{emit, SecurityEvent};
use crate::limits::ConnectionLimiter;
use crate::lmtp::{self, LmtpContext};
use crate::mailstore::{MailStore, MailStoreError};
use crate::password::PasswordError;
use crate::pop3::{self, ListenerKind, Pop3Context};
use crate::security::{system_clock, Guard};
use crate::tls::{TlsAcceptor, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("store: {0}")]
    Store(#[from] MailStoreError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("password hashing: {0}")]
    Password(#[from] PasswordError),
    #[error(transparent)]
    OAuth(#[from] crate::oauth::OAuthError),
    #[error("{0}")]
    Dnsbl(String),
    #[error("network list: {0}")]
    Lists(String),
    #[error("connector: {0}")]
    Connector(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// A started server: bound addresses and the handles to stop or reload it.
pub struct RunningServer {
    pub pop3s: Vec<SocketAddr>,
    pub pop3: Vec<SocketAddr>,
    pub lmtp: Vec<String>,
    shutdown: watch::Sender<bool>,
    pop3_limiter: Arc<ConnectionLimiter>,
    lmtp_limiter: Arc<ConnectionLimiter>,
    tls: Arc<TlsAcceptor>,
    guard: Arc<Guard>,
    store: Arc<dyn crate::store::Store>,
    grace: Duration,
}

/// Opens the store, loads TLS, binds every listener and starts serving.
pub async fn start(cfg: &Config) -> Result<RunningServer, ServerError> {
    let mail = Arc::new(MailStore::open(cfg).await?);
    start_with_store(cfg, mail).await
}

/// Like [`start`], with an already opened store (tests, other backends).
pub async fn start_with_store(cfg: &Config, mail: Arc<MailStore>) -> Result<RunningServer, ServerError> {
    let tls = Arc::new(TlsAcceptor::load(&cfg.tls)?);
    let guard_store = mail.store().clone();
    let (shutdown, shutdown_rx) = watch::channel(false);
    if cfg.connector.enabled {
        // The scheduler idles cheaply when no account exists; accounts added
        // later with the CLI are picked up without a restart.
        let connector = crate::connector::engine::Connector::new(Arc::new(cfg.clone()), mail.clone())
            .map_err(|e| ServerError::Connector(e.to_string()))?;
        tokio::spawn(Arc::new(connector).run_scheduler(shutdown_rx.clone()));
    }
    let auth = Arc::new(Authenticator::new(mail, cfg.auth.clone())?);
    let guard = Guard::new(cfg.abuse.clone(), Duration::from_millis(cfg.auth.failure_delay_ms), system_clock())
        .with_store(auth.mail().store().clone());
    // Bans and list files in force before the first connection is accepted.
    guard.load_lists().map_err(ServerError::Lists)?;
    guard.refresh(&**auth.mail().store()).await;

    let oauth = if cfg.oauth.enabled() {
        let v = Arc::new(crate::oauth::TokenValidator::new(&cfg.oauth)?);
        let warm = v.clone();
        tokio::spawn(async move { warm.prefetch().await });
        Some(v)
    } else {
        None
    };
    let dnsbl = crate::dnsbl::Dnsbl::new(&cfg.abuse).map_err(ServerError::Dnsbl)?.map(Arc::new);
    let pop3_ctx = Arc::new(Pop3Context {
        cfg: cfg.pop3.clone(),
        auth: auth.clone(),
        tls: tls.clone(),
        security: guard.clone(),
        max_commands_per_second: cfg.abuse.max_commands_per_second,
        oauth,
    });
    let pop3_limiter =
        ConnectionLimiter::new(cfg.pop3.max_connections as usize, cfg.pop3.max_connections_per_ip as usize);
    let lmtp_ctx = Arc::new(LmtpContext::new(cfg.lmtp.clone(), cfg.server.hostname.clone(), auth));
    let lmtp_max = cfg.lmtp.max_connections as usize;
    let lmtp_limiter = ConnectionLimiter::new(lmtp_max, lmtp_max);

    let mut listeners = Vec::new();
    let mut pop3s = Vec::new();
    let mut pop3 = Vec::new();
    for (addrs, kind) in
        [(&cfg.pop3.implicit_tls, ListenerKind::ImplicitTls), (&cfg.pop3.starttls, ListenerKind::StartTls)]
    {
        for addr in addrs {
            let l = bind_tcp(*addr).await?;
            let local = l.local_addr().map_err(|source| ServerError::Bind { addr: addr.to_string(), source })?;
            match kind {
                ListenerKind::ImplicitTls => pop3s.push(local),
                ListenerKind::StartTls => pop3.push(local),
            }
            listeners.push((l, kind));
        }
    }
    let mut lmtp_bound = Vec::new();
    let mut lmtp_tcp = Vec::new();
    let mut lmtp_unix = Vec::new();
    for l in &cfg.lmtp.listen {
        match l {
            LmtpListen::Tcp(addr) => {
                let listener = bind_tcp(*addr).await?;
                let local =
                    listener.local_addr().map_err(|source| ServerError::Bind { addr: addr.to_string(), source })?;
                lmtp_bound.push(local.to_string());
                lmtp_tcp.push(listener);
            }
            LmtpListen::Unix(path) => {
                let bind_err = |source| ServerError::Bind { addr: l.to_string(), source };
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(bind_err(e)),
                }
                let listener = UnixListener::bind(path).map_err(bind_err)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
                lmtp_bound.push(l.to_string());
                lmtp_unix.push(listener);
            }
        }
    }

    for (listener, kind) in listeners {
        tokio::spawn(accept_pop3(
            listener,
            kind,
            pop3_ctx.clone(),
            pop3_limiter.clone(),
            dnsbl.clone(),
            shutdown_rx.clone(),
        ));
    }
    for listener in lmtp_tcp {
        let (ctx, limiter, mut sd) = (lmtp_ctx.clone(), lmtp_limiter.clone(), shutdown_rx.clone());
        tokio::spawn(async move {
            loop {
                let (sock, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((s, p)) => (s, canonical_peer(p)),
                        Err(e) => { accept_error(e).await; continue; }
                    },
                    _ = stopped(&mut sd) => break,
                };
                let Ok(permit) = limiter.try_acquire(peer.ip()) else {
                    crate::telemetry::metrics::Metrics::global().connection_refused("lmtp", "too_many_connections");
                    emit(SecurityEvent::ConnectionRefused {
                        peer: peer.ip(),
                        listener: "lmtp",
                        reason: "too many connections",
                    });
                    refuse(sock, b"421 4.3.2 Too many connections, try later\r\n");
                    continue;
                };
                let _ = sock.set_nodelay(true);
                let (ctx, sd) = (ctx.clone(), sd.clone());
                crate::telemetry::metrics::Metrics::global().connection_accepted("lmtp");
                tokio::spawn(async move {
                    let (_permit, _session) = (permit, crate::telemetry::metrics::Metrics::global().session("lmtp"));
                    lmtp::serve(ctx, sock, peer.to_string(), sd).await;
                });
            }
        });
    }
    for listener in lmtp_unix {
        let (ctx, limiter, mut sd) = (lmtp_ctx.clone(), lmtp_limiter.clone(), shutdown_rx.clone());
        tokio::spawn(async move {
            let local = std::net::IpAddr::from([127, 0, 0, 1]);
            loop {
                let sock = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(e) => { accept_error(e).await; continue; }
                    },
                    _ = stopped(&mut sd) => break,
                };
                let Ok(permit) = limiter.try_acquire(local) else {
                    continue;
                };
                let (ctx, sd) = (ctx.clone(), sd.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    lmtp::serve(ctx, sock, "unix".into(), sd).await;
                });
            }
        });
    }
    Ok(RunningServer {
        pop3s,
        pop3,
        lmtp: lmtp_bound,
        shutdown,
        pop3_limiter,
        lmtp_limiter,
        tls,
        store: guard_store,
        guard,
        grace: Duration::from_secs(cfg.server.shutdown_grace_secs),
    })
}

/// Resolves once shutdown has been signalled.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr: addr.to_string(), source })
}

/// The peer as every later check sees it: an IPv4 client on a dual-stack
/// (`[::]`) listener arrives as `::ffff:a.b.c.d` and is turned back into
/// `a.b.c.d` here, once, so bans, blocklists, connection limits,
/// `plaintext_auth_networks`, DNSBL, logs and events treat it exactly like the
/// same client on an IPv4 listener.
pub fn canonical_peer(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

/// Accept errors are usually EMFILE/ENFILE under a flood: pause briefly
/// instead of spinning, and keep serving the sessions we have.
async fn accept_error(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Best-effort refusal message on a plaintext connection, bounded in time.
fn refuse(mut sock: tokio::net::TcpStream, msg: &'static [u8]) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(2), sock.write_all(msg)).await;
    });
}

async fn accept_pop3(
    listener: TcpListener,
    kind: ListenerKind,
    ctx: Arc<Pop3Context>,
    limiter: Arc<ConnectionLimiter>,
    dnsbl: Option<Arc<crate::dnsbl::Dnsbl>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = match kind {
        ListenerKind::ImplicitTls => "pop3s",
        ListenerKind::StartTls => "pop3",
    };
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, p)) => (s, canonical_peer(p)),
                Err(e) => { accept_error(e).await; continue; }
            },
            _ = stopped(&mut shutdown) => break,
        };
        // Bans and blocklists first: a refused address costs no TLS work.
        if let Some(reason) = ctx.security.check_connection(peer.ip()) {
            crate::telemetry::metrics::Metrics::global().connection_refused(name, reason);
            tracing::debug!(%peer, reason, "connection refused");
            drop(sock);
            continue;
        }
        ctx.security.record_connection(peer.ip());
        let permit = match limiter.try_acquire(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                crate::telemetry::metrics::Metrics::global().connection_refused(name, why.reason());
                emit(SecurityEvent::ConnectionRefused { peer: peer.ip(), listener: name, reason: why.reason() });
                if kind == ListenerKind::StartTls {
                    refuse(sock, b"-ERR [SYS/TEMP] Too many connections, try again later\r\n");
                }
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let (ctx, sd, dnsbl) = (ctx.clone(), shutdown.clone(), dnsbl.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // In the connection's own task, so a slow lookup never holds up
            // the accept loop; bounded by the DNSBL timeout.
            if let Some(d) = dnsbl.filter(|_| !ctx.security.is_allowlisted(peer.ip())) {
                if let Some(zone) = d.listed(peer.ip()).await {
                    crate::telemetry::metrics::Metrics::global().connection_refused(name, "dnsbl");
                    emit(SecurityEvent::DnsblListed { peer: peer.ip(), zone: &zone });
                    if kind == ListenerKind::StartTls {
                        let mut sock = sock;
                        let msg = format!("-ERR Connection refused: your address is listed in {zone}\r\n");
                        let _ = tokio::time::timeout(Duration::from_secs(2), sock.write_all(msg.as_bytes())).await;
                    }
                    return;
                }
            }
            crate::telemetry::metrics::Metrics::global().connection_accepted(name);
            let _session = crate::telemetry::metrics::Metrics::global().session(name);
            pop3::serve(ctx, sock, peer, kind, sd).await;
        });
    }
}

impl RunningServer {
    /// SIGHUP: re-reads the TLS certificate and key, allow/block list files,
    /// bans and lockouts.
    pub async fn reload(&self) {
        self.reload_tls();
        self.guard.reload(&*self.store).await;
    }

    /// Re-reads the TLS certificate and key.
    pub fn reload_tls(&self) {
        match self.tls.reload() {
            Ok(()) => emit(SecurityEvent::TlsReloaded { ok: true, detail: "certificate and key re-read" }),
            Err(e) => emit(SecurityEvent::TlsReloaded { ok: false, detail: &e.to_string() }),
        }
    }

    /// Active POP3 connections.
    pub fn active_sessions(&self) -> usize {
        self.pop3_limiter.active()
    }

    /// Stops accepting, tells sessions to finish and waits for them up to
    /// the grace period. Returns the number of sessions still running.
    pub async fn shutdown(self) -> usize {
        let _ = self.shutdown.send(true);
        let drained = async {
            self.pop3_limiter.drained().await;
            self.lmtp_limiter.drained().await;
        };
        let _ = tokio::time::timeout(self.grace, drained).await;
        self.pop3_limiter.active() + self.lmtp_limiter.active()
    }
}

#[cfg(test)]
mod tests {
    use super::canonical_peer;

    #[test]
    fn ipv4_mapped_peers_are_seen_as_ipv4() {
        let mapped: std::net::SocketAddr = "[::ffff:192.0.2.7]:4242".parse().unwrap();
        assert_eq!(canonical_peer(mapped), "192.0.2.7:4242".parse().unwrap());
        let v6: std::net::SocketAddr = "[2001:db8::7]:4242".parse().unwrap();
        assert_eq!(canonical_peer(v6), v6, "real IPv6 peers are unchanged");
        let v4: std::net::SocketAddr = "192.0.2.7:1".parse().unwrap();
        assert_eq!(canonical_peer(v4), v4);
    }
}
