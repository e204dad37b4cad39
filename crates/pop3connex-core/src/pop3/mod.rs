//! POP3 sessions (RFC 1939, 2449, 2595, 3206, 5034, 8314).
//!
//! # Layout
//! - [`connection`]: framing, buffered replies, timeouts, shutdown.
//! - `session`: the state machine, the one table of which command is
//!   allowed in which state, and dispatch.
//! - `authorization`: USER, PASS, AUTH, STLS, CAPA (AUTHORIZATION state).
//! - `listing`: STAT, LIST, UIDL.
//! - `retrieve`: RETR, TOP (streamed chunk by chunk).
//! - `update`: DELE, RSET, NOOP, QUIT (deletes applied atomically at QUIT).

mod authorization;
pub mod connection;
mod listing;
mod retrieve;
mod session;
mod update;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::Instrument;

use crate::auth::Authenticator;
use crate::config::Pop3Config;
use crate::security::SecurityState;
use crate::tls::TlsAcceptor;

pub use session::End;

/// How long a client gets to complete a TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Which kind of listener accepted the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// RFC 8314 implicit TLS (port 995).
    ImplicitTls,
    /// Plaintext with STLS (port 110).
    StartTls,
}

/// Everything a session needs, shared by all sessions.
pub struct Pop3Context {
    pub cfg: Pop3Config,
    pub auth: Arc<Authenticator>,
    pub tls: Arc<TlsAcceptor>,
    pub security: Arc<dyn SecurityState>,
    /// Command rate limit per connection.
    pub max_commands_per_second: u64,
    /// Bearer-token validator; `None` when `[oauth]` has no issuer.
    pub oauth: Option<Arc<crate::oauth::TokenValidator>>,
}

/// Serves one accepted connection to the end.
pub async fn serve<S>(
    ctx: Arc<Pop3Context>,
    stream: S,
    peer: SocketAddr,
    kind: ListenerKind,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let span =
        tracing::info_span!("pop3", session = id, %peer, tls = tracing::field::Empty, user = tracing::field::Empty);
    async move {
        tracing::debug!(listener = ?kind, "connected");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(ctx.cfg.preauth_timeout_secs);
        let result = match kind {
            ListenerKind::ImplicitTls => serve_tls(&ctx, stream, peer, shutdown, false, deadline).await,
            ListenerKind::StartTls => {
                let mut conn = connection::Connection::new(stream);
                let mut sess = session::Session::new(&ctx, peer, false, None, deadline, shutdown.clone());
                match sess.run(&mut conn, true).await {
                    Ok(End::StartTls) => serve_tls(&ctx, conn.into_inner(), peer, shutdown, true, deadline).await,
                    other => other.map(drop),
                }
            }
        };
        match result {
            Ok(()) => tracing::debug!("disconnected"),
            Err(e) => tracing::debug!(error = %e, "connection ended with an I/O error"),
        }
    }
    .instrument(span)
    .await
}

async fn serve_tls<S>(
    ctx: &Arc<Pop3Context>,
    stream: S,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    after_stls: bool,
    deadline: tokio::time::Instant,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let limit = TLS_HANDSHAKE_TIMEOUT.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
    let metrics = crate::telemetry::metrics::Metrics::global();
    let listener = if after_stls { "pop3" } else { "pop3s" };
    let tls = match tokio::time::timeout(limit, ctx.tls.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics.tls_failure(listener, "error");
            tracing::debug!(error = %e, "TLS handshake failed");
            return Ok(());
        }
        Err(_) => {
            metrics.tls_failure(listener, "timeout");
            tracing::debug!("TLS handshake timed out");
            return Ok(());
        }
    };
    let (_, conn_state) = tls.get_ref();
    let cipher = conn_state.negotiated_cipher_suite().and_then(|c| c.suite().as_str()).unwrap_or("unknown");
    let tls_version = conn_state.protocol_version().and_then(|v| v.as_str()).unwrap_or("unknown");
    metrics.tls_handshake(listener, tls_version, cipher);
    let version = conn_state.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
    // RFC 9266: tls-exporter channel binding is defined for TLS 1.3.
    let exporter = (conn_state.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3))
        .then(|| conn_state.export_keying_material(vec![0u8; 32], b"EXPORTER-Channel-Binding", None).ok())
        .flatten();
    tracing::Span::current().record("tls", version.as_str());
    let mut conn = connection::Connection::new(tls);
    let mut sess = session::Session::new(ctx, peer, true, exporter, deadline, shutdown);
    // After STLS the greeting is not repeated (RFC 2595 section 4).
    sess.run(&mut conn, !after_stls).await.map(drop)
}
