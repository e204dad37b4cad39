//! POP3conneX admin plane: the HTTPS admin API (`/api/v1`) and the web
//! console, served on the `[admin]` listeners.
//!
//! # Layout
//! - [`listener`]: accept, the admin network restriction and bans before
//!   TLS, TLS (ALPN h2 and http/1.1), HTTP/1.1 and HTTP/2 with bounds.
//! - [`headers`]: security headers on every response, the CSRF check.
//! - [`routes`]: the route table (each route's declared access) and the
//!   router built from it; [`auth`] enforces the declarations (sessions,
//!   service tokens, permissions, step-up).
//! - [`session`]: server-side console sessions.
//! - [`login`]: password, second factor, enrolment, step-up, logout.
//! - [`api`]: the JSON API; [`pages`]: the console's page handlers, which
//!   render the templates of [`console`].
//! - [`state`]: what handlers share; [`error`]: the one mapping from
//!   failures to HTTP answers.
//!
//! Every request passes the same pipeline: peer address → security
//! headers → CSRF → authentication (session or bearer token) → the
//! route's declared permission → the handler, which calls the one
//! implementation of each operation in `pop3connex_core::admin`.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod console;
pub mod error;
pub mod headers;
pub mod listener;
pub mod login;
pub mod pages;
pub mod routes;
pub mod session;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pop3connex_core::admin::Admin;
use pop3connex_core::config::Config;
use pop3connex_core::security::{system_clock, Guard};
use tokio::sync::{mpsc, watch};

use crate::listener::Gate;
use crate::state::{AppState, Settings};

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("[admin] is not configured")]
    NotConfigured,
    #[error("[admin]: {0}")]
    Config(String),
    #[error("admin TLS: {0}")]
    Tls(#[from] pop3connex_core::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

impl Settings {
    /// The web layer's view of `[admin]` (and the abuse window).
    pub fn from_config(cfg: &Config) -> Result<Settings, WebError> {
        let a = cfg.admin.as_ref().ok_or(WebError::NotConfigured)?;
        Ok(Settings {
            listen: a.listen.clone(),
            allow_networks: a.allow_networks.iter().map(|n| n.0).collect(),
            trusted_proxies: a.trusted_proxies.iter().map(|n| n.0).collect(),
            public_origin: a.origin_text().map_err(WebError::Config)?,
            certificate: a.certificate.clone().unwrap_or_else(|| cfg.tls.certificate.clone()),
            private_key: a.private_key.clone().unwrap_or_else(|| cfg.tls.private_key.clone()),
            session_idle_secs: a.session_idle_secs,
            session_absolute_secs: a.session_absolute_secs,
            step_up_secs: a.step_up_secs,
            login_failures_before_ban: a.login_failures_before_ban,
            window_secs: cfg.abuse.window_secs,
        })
    }
}

/// How the server controls the admin plane.
pub struct Control {
    /// `true` stops the listeners; in-flight requests get a short grace.
    pub shutdown: watch::Receiver<bool>,
    /// Where `POST /reload` sends its request (what SIGHUP does); `None`:
    /// reload answers 503.
    pub reload: Option<mpsc::Sender<()>>,
}

/// A started admin plane: its bound addresses and the task serving them.
pub struct RunningWeb {
    pub addresses: Vec<SocketAddr>,
    pub task: tokio::task::JoinHandle<()>,
    tls: listener::SharedTls,
    certificate: std::path::PathBuf,
    private_key: pop3connex_core::secret::SecretRef,
}

impl RunningWeb {
    /// Re-reads the admin certificate and key (what SIGHUP does for the
    /// POP3 listeners); on an error the old ones stay in use.
    pub fn reload_tls(&self) -> Result<(), WebError> {
        let fresh = acceptor(&self.certificate, &self.private_key)?;
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }
}

/// The admin listener's TLS: the shared server settings, ALPN `h2` and
/// `http/1.1`.
fn acceptor(
    certificate: &std::path::Path,
    private_key: &pop3connex_core::secret::SecretRef,
) -> Result<tokio_rustls::TlsAcceptor, WebError> {
    let mut tls = pop3connex_core::tls::server_config(certificate, private_key)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

/// Binds every `[admin] listen` address and starts serving. Bans and
/// lockouts are shared with POP3 through the store (a ban set here reaches
/// the POP3 listeners at their next re-read, and theirs reach this one).
pub async fn start(admin: Arc<Admin>, cfg: Arc<Config>, control: Control) -> Result<RunningWeb, WebError> {
    let settings = Settings::from_config(&cfg)?;
    let roles = cfg.admin.as_ref().ok_or(WebError::NotConfigured)?.role_set().map_err(WebError::Config)?;
    let tls: listener::SharedTls =
        Arc::new(std::sync::RwLock::new(acceptor(&settings.certificate, &settings.private_key)?));
    let guard = Guard::new(cfg.abuse.clone(), Duration::from_millis(cfg.auth.failure_delay_ms), system_clock())
        .with_store(admin.mail().store().clone());
    guard.refresh(&**admin.mail().store()).await;
    let gate = Arc::new(Gate { allow_networks: settings.allow_networks.clone(), guard: guard.clone() });
    let state = Arc::new(AppState::new(admin, cfg, settings.clone(), guard, roles, control.reload));
    let router = routes::router(state);

    let mut listeners = Vec::new();
    let mut addresses = Vec::new();
    for addr in &settings.listen {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|source| WebError::Bind { addr: *addr, source })?;
        addresses.push(l.local_addr().map_err(|source| WebError::Bind { addr: *addr, source })?);
        listeners.push(l);
    }
    let mut loops = tokio::task::JoinSet::new();
    for l in listeners {
        loops.spawn(listener::accept_loop(l, tls.clone(), gate.clone(), router.clone(), control.shutdown.clone()));
    }
    let task = tokio::spawn(async move {
        loops.join_all().await;
    });
    Ok(RunningWeb {
        addresses,
        task,
        tls,
        certificate: settings.certificate.clone(),
        private_key: settings.private_key.clone(),
    })
}

/// [`start`], then serves until `control.shutdown`.
pub async fn serve(admin: Arc<Admin>, cfg: Arc<Config>, control: Control) -> Result<(), WebError> {
    let running = start(admin, cfg, control).await?;
    for a in &running.addresses {
        tracing::info!(address = %a, "listening https (admin API and console)");
    }
    let _ = running.task.await;
    Ok(())
}
