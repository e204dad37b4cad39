//! The metrics endpoint: `GET /metrics` over plain HTTP/1.1 (`[metrics]`).
//!
//! Bounded like every other listener: peers outside `allow_networks` are
//! dropped before a byte is read, at most [`MAX_CONNECTIONS`] connections
//! at once, request headers limited in size and time, every connection
//! closed after [`CONNECTION_LIFETIME`]. Only `GET` (and `HEAD`) of
//! `/metrics` is served; everything else is 404. With a `bearer_token` a
//! request without `Authorization: Bearer <token>` gets 401; the token is
//! compared in constant time (as SHA-256 digests, so its length does not
//! leak either) and never logged.
//!
//! Store totals are counted by a background task every
//! [`STORE_REFRESH`], not per scrape, so scraping costs no store reads.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::metrics::Metrics;
use crate::config::metrics::MetricsConfig;
use crate::mailstore::MailStore;

/// Scrape connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one (keep-alive) connection.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// Largest request head accepted (hyper's minimum buffer).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How often the store totals are recounted.
pub const STORE_REFRESH: Duration = Duration::from_secs(60);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the endpoint could not start. Never holds the token.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("[metrics] bearer_token: {0}")]
    Token(#[from] crate::secret::SecretError),
    #[error("[metrics] cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A running endpoint.
pub struct MetricsServer {
    /// The bound addresses (port 0 resolved).
    pub addresses: Vec<SocketAddr>,
    /// Ends after the shutdown signal.
    pub task: JoinHandle<()>,
}

struct State {
    metrics: Arc<Metrics>,
    /// SHA-256 of the expected token.
    token: Option<[u8; 32]>,
}

/// Binds the listeners of `cfg` and serves `metrics` until `shutdown` turns
/// true. With `mail`, the store totals are kept up to date.
pub async fn start(
    cfg: &MetricsConfig,
    metrics: Arc<Metrics>,
    mail: Option<Arc<MailStore>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<MetricsServer, MetricsError> {
    let token = match &cfg.bearer_token {
        Some(r) => {
            let raw = r.load()?;
            let trimmed = raw.trim_ascii();
            Some(Sha256::digest(trimmed).into())
        }
        None => None,
    };
    let mut listeners = Vec::new();
    let mut addresses = Vec::new();
    for &addr in &cfg.listen {
        let l = TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
        addresses.push(l.local_addr().map_err(|source| MetricsError::Bind { addr, source })?);
        listeners.push(l);
    }
    let state = Arc::new(State { metrics: metrics.clone(), token });
    let cfg = Arc::new(cfg.clone());
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        for l in listeners {
            tasks.spawn(accept_loop(l, cfg.clone(), state.clone(), limit.clone()));
        }
        if let Some(mail) = mail {
            tasks.spawn(refresh_store_totals(mail, metrics));
        }
        let _ = shutdown.wait_for(|v| *v).await;
        // Aborts the accept loops, which abort their connections.
        tasks.shutdown().await;
    });
    Ok(MetricsServer { addresses, task })
}

/// What `serve` calls: with `[metrics]` configured, registers the metrics
/// consumer on the event hub, starts the endpoint (store totals included)
/// and logs its addresses; without, does nothing.
pub async fn start_configured(
    cfg: &crate::config::Config,
    mail: &Arc<MailStore>,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<MetricsServer>, MetricsError> {
    let Some(m) = &cfg.metrics else { return Ok(None) };
    let metrics = Metrics::global().clone();
    let server = start(m, metrics.clone(), Some(mail.clone()), shutdown).await?;
    super::Hub::global().register(metrics);
    for a in &server.addresses {
        tracing::info!(address = %a, "listening metrics (GET /metrics)");
    }
    Ok(Some(server))
}

async fn accept_loop(listener: TcpListener, cfg: Arc<MetricsConfig>, state: Arc<State>, limit: Arc<Semaphore>) {
    let mut conns = JoinSet::new();
    loop {
        // Reap finished connections so the set stays small.
        while conns.try_join_next().is_some() {}
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !cfg.allows(peer.ip()) {
            tracing::debug!(%peer, "metrics: peer not in [metrics] allow_networks, dropped");
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: too many scrape connections, dropped");
            continue;
        };
        let state = state.clone();
        conns.spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .serve_connection(TokioIo::new(sock), svc);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// The whole request handling: route, authorise, encode.
fn respond<B>(state: &State, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" || !(req.method() == Method::GET || req.method() == Method::HEAD) {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if let Some(expected) = &state.token {
        if !authorised(req.headers().get(AUTHORIZATION), expected) {
            let mut r = plain(StatusCode::UNAUTHORIZED, "bearer token required\n");
            r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"metrics\""));
            return r;
        }
    }
    let openmetrics = req
        .headers()
        .get_all(ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains("application/openmetrics-text")));
    let (body, ctype) = if openmetrics {
        (state.metrics.encode_openmetrics(), OPENMETRICS)
    } else {
        (state.metrics.encode_prometheus(), prometheus_client::encoding::prometheus_text::CONTENT_TYPE)
    };
    let body = if req.method() == Method::HEAD { Bytes::new() } else { Bytes::from(body) };
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `Authorization: Bearer <token>` with the right token.
fn authorised(header: Option<&HeaderValue>, expected: &[u8; 32]) -> bool {
    let Some(v) = header else { return false };
    let v = v.as_bytes();
    if v.len() < 7 || !v[..7].eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    let presented: [u8; 32] = Sha256::digest(v[7..].trim_ascii()).into();
    bool::from(presented.ct_eq(expected))
}

/// Recounts mailboxes, messages, octets, bans and lockouts in force every
/// [`STORE_REFRESH`].
async fn refresh_store_totals(mail: Arc<MailStore>, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(STORE_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match tokio::time::timeout(STORE_REFRESH, mail.store().users()).await {
            Ok(Ok(users)) => {
                let (messages, octets) = users
                    .iter()
                    .fold((0u64, 0u64), |(m, o), u| (m.saturating_add(u.messages), o.saturating_add(u.octets)));
                metrics.set_store_totals(users.len() as u64, messages, octets);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics: cannot count the store"),
            Err(_) => tracing::warn!("metrics: counting the store timed out"),
        }
        let store = mail.store();
        let security = async { Ok::<_, crate::store::StoreError>((store.bans().await?, store.lockouts().await?)) };
        match tokio::time::timeout(STORE_REFRESH, security).await {
            Ok(Ok((bans, lockouts))) => {
                let now = crate::types::unix_now();
                let bans = bans.iter().filter(|b| b.expires_at.is_none_or(|e| e > now)).count();
                let lockouts = lockouts.iter().filter(|l| l.until > now).count();
                metrics.set_security_totals(bans as u64, lockouts as u64);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics: cannot count bans and lockouts"),
            Err(_) => tracing::warn!("metrics: counting bans and lockouts timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::secret::SecretRef;

    fn cfg(token: Option<&str>) -> MetricsConfig {
        MetricsConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            allow_networks: Vec::new(),
            bearer_token: token.map(|t| SecretRef::Env(t.to_owned())),
        }
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.unwrap().unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_metrics_only_with_the_token_and_only_at_metrics() {
        // This test alone uses this variable.
        std::env::set_var("P3X_TEST_METRICS_TOKEN", "right-token\n");
        let m = Arc::new(Metrics::new());
        m.retr(7);
        let (stop, stopped) = watch::channel(false);
        let srv = start(&cfg(Some("P3X_TEST_METRICS_TOKEN")), m, None, stopped).await.unwrap();
        let a = srv.addresses[0];
        let close = "Connection: close\r\n\r\n";
        let r = get(a, &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        assert!(r.contains("www-authenticate: Bearer"), "{r}");
        assert!(!r.contains("right-token"));
        let r = get(a, &format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n{close}")).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        let r =
            get(a, &format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer right-token\r\n{close}")).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("pop3connex_retr_bytes_total 7"), "{r}");
        let r = get(
            a,
            &format!(
                "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\
                 Authorization: bearer right-token\r\n{close}"
            ),
        )
        .await;
        assert!(r.contains("application/openmetrics-text") && r.contains("# EOF"), "{r}");
        let r = get(a, &format!("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer right-token\r\n{close}")).await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get(a, &format!("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{close}")).await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        // An oversized request head is refused, not buffered.
        let big = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n{close}", "a".repeat(64 * 1024));
        let r = get(a, &big).await;
        assert!(!r.contains("200 OK"), "{r}");
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), srv.task).await.unwrap().unwrap();
        assert!(tokio::net::TcpStream::connect(a).await.is_err(), "listener closed after shutdown");
    }

    #[tokio::test]
    async fn a_missing_token_is_an_error_that_names_the_key_not_the_value() {
        let (_stop, stopped) = watch::channel(false);
        let e = start(&cfg(Some("P3X_TEST_METRICS_TOKEN_UNSET")), Arc::new(Metrics::new()), None, stopped)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("[metrics] bearer_token"), "{e}");
    }

    #[test]
    fn bearer_parsing() {
        let want: [u8; 32] = Sha256::digest(b"t0k").into();
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(authorised(Some(&h("Bearer t0k")), &want));
        assert!(authorised(Some(&h("BEARER t0k")), &want));
        assert!(!authorised(Some(&h("Bearer t0k2")), &want));
        assert!(!authorised(Some(&h("Basic t0k")), &want));
        assert!(!authorised(Some(&h("Bearer")), &want));
        assert!(!authorised(None, &want));
    }
}
