//! The admin plane against a temporary store: the real server on
//! 127.0.0.1:0 with real TLS, and a small HTTPS client (hyper over
//! tokio-rustls, HTTP/1.1 or HTTP/2 by ALPN) that shows every status,
//! header and cookie as sent.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pop3connex_core::admin::{Actor, Admin};
use pop3connex_core::config::{AuthConfig, Config, PasswordScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, watch};

pub const PASSWORD: &str = "correct horse battery staple";
pub const ORIGIN: &str = "https://localhost:8443";

pub struct Server {
    pub addr: SocketAddr,
    pub admin: Arc<Admin>,
    pub dir: PathBuf,
    pub reloads: mpsc::Receiver<()>,
    stop: watch::Sender<bool>,
    tls: Arc<rustls::ClientConfig>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the admin plane with `[admin]` extra keys `admin_toml` (after
/// `listen` and `public_origin`); `tweak` may change the parsed config.
pub async fn start(name: &str, admin_toml: &str, tweak: impl FnOnce(&mut Config)) -> Server {
    let dir = std::env::temp_dir().join(format!("p3x-web-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let report = pop3connex_core::init::init_data_dir(&dir, "localhost").unwrap();
    let mut text = std::fs::read_to_string(&report.config).unwrap();
    text.push_str(&format!("\n[admin]\nlisten = [\"127.0.0.1:0\"]\npublic_origin = \"{ORIGIN}\"\n{admin_toml}\n"));
    std::fs::write(&report.config, text).unwrap();
    let mut cfg = Config::load(&report.config).unwrap();
    cfg.auth = AuthConfig {
        password_scheme: PasswordScheme::Argon2id,
        argon2_memory_kib: 8192,
        argon2_iterations: 1,
        failure_delay_ms: 0,
        ..AuthConfig::default()
    };
    // Every request of these tests is a new connection from 127.0.0.1.
    cfg.abuse.ban_after_connections_per_minute = 1_000_000;
    cfg.abuse.max_failure_delay_ms = 0;
    tweak(&mut cfg);
    let cfg = Arc::new(cfg);
    let admin = Arc::new(Admin::open((*cfg).clone()).await.unwrap());
    let (stop, stopped) = watch::channel(false);
    let (reload_tx, reloads) = mpsc::channel(4);
    let control = pop3connex_web::Control { shutdown: stopped, reload: Some(reload_tx) };
    let running = pop3connex_web::start(admin.clone(), cfg, control).await.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("tls/ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Server { addr: running.addresses[0], admin, dir, reloads, stop, tls: Arc::new(tls) }
}

/// An answer as received.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub version: hyper::Version,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    /// The session cookie this answer sets (`None`: none or cleared).
    pub fn session_cookie(&self) -> Option<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("__Host-p3x_session="))
            .map(|v| v.split(';').next().unwrap_or("").to_owned())
            .find(|v| !v.is_empty())
    }
}

/// One request to build.
#[derive(Clone, Default)]
pub struct Req {
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub h2: bool,
    pub from: Option<IpAddr>,
}

impl Req {
    pub fn new(method: &'static str, path: &str) -> Req {
        Req { method, path: path.to_owned(), ..Req::default() }
    }
    pub fn header(mut self, k: &str, v: &str) -> Req {
        self.headers.push((k.to_owned(), v.to_owned()));
        self
    }
    /// The session cookie, and the browser's same-origin Fetch Metadata.
    pub fn session(self, cookie: &str) -> Req {
        self.header("cookie", &format!("__Host-p3x_session={cookie}")).header("sec-fetch-site", "same-origin")
    }
    pub fn bearer(self, token: &str) -> Req {
        self.header("authorization", &format!("Bearer {token}"))
    }
    pub fn form(mut self, pairs: &[(&str, &str)]) -> Req {
        self.body = serde_urlencoded::to_string(pairs).unwrap().into_bytes();
        self.header("content-type", "application/x-www-form-urlencoded")
    }
    pub fn json(mut self, v: serde_json::Value) -> Req {
        self.body = serde_json::to_vec(&v).unwrap();
        self.header("content-type", "application/json")
    }
}

impl Server {
    /// Opens a TLS connection (ALPN h2 or http/1.1) from `from`.
    pub async fn connect(
        &self,
        h2: bool,
        from: Option<IpAddr>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = from {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let tcp = socket.connect(self.addr).await?;
        let mut cfg = (*self.tls).clone();
        cfg.alpn_protocols = if h2 { vec![b"h2".to_vec()] } else { vec![b"http/1.1".to_vec()] };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
    }

    pub async fn send(&self, r: Req) -> Answer {
        let tls = self.connect(r.h2, r.from).await.expect("TLS connection");
        let mut builder = hyper::Request::builder().method(r.method);
        builder = if r.h2 {
            builder.uri(format!("https://localhost:{}{}", self.addr.port(), r.path))
        } else {
            builder.uri(&r.path).header("host", format!("localhost:{}", self.addr.port()))
        };
        for (k, v) in &r.headers {
            builder = builder.header(k, v);
        }
        let req = builder.body(Full::new(Bytes::from(r.body))).unwrap();
        let resp = if r.h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
        Answer { status: parts.status.as_u16(), version: parts.version, headers: parts.headers, body }
    }

    /// Adds an administrator with `roles` and enrols a TOTP factor; returns
    /// the TOTP secret (base32) and the recovery codes.
    pub async fn admin_with_totp(&self, name: &str, roles: &[&str]) -> (String, Vec<String>) {
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        let cli = Actor::Cli { os_user: Some("operator".into()) };
        let info = self.admin.admin_add(&cli, name, PASSWORD, &roles).await.unwrap();
        let enrol = self.admin.totp_begin(info.id, "test app").await.unwrap();
        let secret = enrol.secret_base32.to_string();
        let now = unix_now();
        let codes = self.admin.totp_finish(&cli, info.id, &enrol.pending_id, &totp(&secret, now), now).await.unwrap();
        (secret, codes.expect("first factor: recovery codes"))
    }

    /// Logs in with password and TOTP (at the next TOTP step, so a code
    /// used at enrolment is not replayed); returns the session cookie.
    pub async fn login(&self, name: &str, secret: &str) -> String {
        let a =
            self.send(Req::new("POST", "/login").form(&[("name", name), ("password", PASSWORD)]).same_origin()).await;
        assert_eq!(a.status, 303, "{}", a.text());
        assert_eq!(a.header("location"), "/login/mfa");
        let pending = a.session_cookie().expect("a session after the password");
        let code = totp(secret, unix_now() + 30);
        let a = self
            .send(Req::new("POST", "/login/mfa").session(&pending).form(&[("method", "totp"), ("code", &code)]))
            .await;
        assert_eq!(a.status, 303, "{}", a.text());
        let cookie = a.session_cookie().expect("a new session id after the second factor");
        assert_ne!(cookie, pending, "rotated at login");
        cookie
    }
}

impl Req {
    pub fn same_origin(self) -> Req {
        self.header("sec-fetch-site", "same-origin")
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// The RFC 6238 code of `secret` (base32) at `time`, by totp-rs.
pub fn totp(secret: &str, time: u64) -> String {
    let bytes = totp_rs::Secret::Encoded(secret.to_owned()).to_bytes().unwrap();
    totp_rs::TOTP::new_unchecked(totp_rs::Algorithm::SHA1, 6, 1, 30, bytes).generate(time)
}
