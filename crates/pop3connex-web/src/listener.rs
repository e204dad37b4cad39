//! The admin listeners: accept, refuse before TLS, TLS, HTTP/1.1 and HTTP/2.
//!
//! Order per connection, cheapest refusal first: the peer must be in
//! `[admin] allow_networks` (else the socket is closed at once), must not be
//! banned or blocklisted (the abuse [`Guard`] shared with POP3 through the
//! store), and must get a connection slot. Only then does any TLS work
//! happen. The TLS configuration follows the POP3 listeners' rules
//! (`pop3connex_core::tls::server_config`) with ALPN `h2` and `http/1.1`;
//! hyper-util's auto builder then serves either protocol with bounded
//! headers, streams and time.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ipnet::IpNet;
use pop3connex_core::events::{emit, SecurityEvent};
use pop3connex_core::limits::ConnectionLimiter;
use pop3connex_core::security::{Guard, SecurityState};
use pop3connex_core::server::canonical_peer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Simultaneous admin connections: a console is a handful of browsers and
/// scripts; more is a flood.
pub const MAX_CONNECTIONS: usize = 256;
/// Simultaneous connections from one address (a browser opens about six).
pub const MAX_CONNECTIONS_PER_IP: usize = 32;
/// A TLS handshake that takes longer than this is a stalled or hostile peer.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/1.1: the whole request head must arrive within this (slow-header
/// clients are dropped); it also bounds an idle keep-alive connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/1.1 read buffer, which bounds the request head (hyper's minimum is 8 KiB).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// HTTP/2: concurrent streams per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 32;
/// HTTP/2: the decoded header list of one request.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// HTTP/2: a ping every this long, and the connection closes when one is
/// not answered within [`KEEP_ALIVE_TIMEOUT`].
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer than this (then it is closed gracefully):
/// bounds an idle HTTP/2 connection kept open by pings.
pub const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// After shutdown, in-flight requests get this long to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Resolves once shutdown has been signalled (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// The TCP peer of a request, put in its extensions by the listener.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Who may connect: the admin network restriction and the abuse guard.
pub struct Gate {
    pub allow_networks: Vec<IpNet>,
    pub guard: Arc<Guard>,
}

impl Gate {
    /// `Some(reason)` when the connection is refused before TLS.
    pub fn refuse(&self, ip: IpAddr) -> Option<&'static str> {
        if !self.allow_networks.iter().any(|n| n.contains(&ip)) {
            return Some("not in admin allow_networks");
        }
        self.guard.check_connection(ip)
    }
}

/// Accepts on `listener` until `shutdown`, serving `router` on each
/// connection that passes the gate. Returns once every connection ended (or
/// the grace period after shutdown passed).
/// The admin listener's TLS set-up, swapped whole by a reload (SIGHUP or
/// the console's reload): connections accepted afterwards get the new
/// certificate, those running keep theirs.
pub type SharedTls = Arc<std::sync::RwLock<TlsAcceptor>>;

pub async fn accept_loop(
    listener: TcpListener,
    tls: SharedTls,
    gate: Arc<Gate>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let limiter = ConnectionLimiter::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, p)) => (s, canonical_peer(p)),
                Err(e) => {
                    // EMFILE/ENFILE under a flood: pause instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        if let Some(reason) = gate.refuse(peer.ip()) {
            emit(SecurityEvent::ConnectionRefused { peer: peer.ip(), listener: "admin", reason });
            drop(sock);
            continue;
        }
        gate.guard.record_connection(peer.ip());
        let permit = match limiter.try_acquire(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                emit(SecurityEvent::ConnectionRefused { peer: peer.ip(), listener: "admin", reason: why.reason() });
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let current = tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        let (tls, router, sd) = (current, router.clone(), shutdown.clone());
        connections.spawn(async move {
            let _permit = permit;
            serve_connection(sock, peer, tls, router, sd).await;
        });
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async { while connections.join_next().await.is_some() {} }).await;
    connections.abort_all();
}

async fn serve_connection(
    sock: TcpStream,
    peer: SocketAddr,
    tls: TlsAcceptor,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(sock)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "admin TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "admin TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(PeerAddr(peer));
        router.clone().oneshot(req.map(axum::body::Body::new))
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .max_pending_accept_reset_streams(Some(16))
        .max_local_error_reset_streams(Some(64));
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let lifetime = tokio::time::sleep(MAX_CONNECTION_LIFETIME);
    tokio::pin!(lifetime);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "admin connection ended with an error");
                }
                return;
            }
            _ = stopped(&mut shutdown), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut lifetime, if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
