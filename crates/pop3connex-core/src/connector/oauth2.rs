//! OAuth 2.0 refresh-token client for XOAUTH2/OAUTHBEARER upstream logins
//! (RFC 6749 section 6).
//!
//! The token endpoint is called with the shared hardened client
//! ([`crate::https`]): HTTPS only, no redirects, [`HTTP_TIMEOUT`] for the
//! whole request, at most [`MAX_RESPONSE_BYTES`] of body. The endpoint is verified against the CAs
//! of `ca_file`, or else the system roots (Mozilla's bundled roots if the
//! system has none). Access tokens are cached until [`EXPIRY_MARGIN`] before
//! they expire; concurrent callers share one refresh. A rotated refresh
//! token is saved in the [`RefreshTokenStore`].
//!
//! Tokens and the client secret never appear in errors, logs or `Debug`
//! output; the endpoint's `error`/`error_description` do, sanitized and cut.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::config::connector::{OAuth2ClientConfig, OAuth2Preset};
use crate::https::{form_encode_into, load_ca_file, CaFileError, DefaultRoots, HttpsClient, HttpsError, HttpsOptions};
use crate::logtext::sanitize;
use crate::secret::SecretRef;

/// Whole-request timeout (connect, TLS, request, response).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest token endpoint response read.
pub const MAX_RESPONSE_BYTES: u64 = 64 * 1024;
/// A cached token is refreshed when it expires within this margin.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// Lifetime assumed when the endpoint sends no `expires_in`.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// Longest lifetime believed.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Longest access or refresh token accepted.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

pub const MICROSOFT365_TOKEN_URL: &str = "https://login.microsoftonline.com/common/oauth2/v2.0/token";
pub const MICROSOFT365_SCOPE: &str = "https://outlook.office.com/POP.AccessAsUser.All offline_access";
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
pub const GOOGLE_SCOPE: &str = "https://mail.google.com/";

#[derive(Debug, thiserror::Error)]
pub enum OAuth2Error {
    /// The grant was refused (`invalid_grant`, revoked token): an operator must act.
    #[error("token endpoint refused the refresh token: {0}")]
    Refused(String),
    #[error("token endpoint unavailable: {0}")]
    Temporary(String),
    #[error("OAuth 2.0 configuration: {0}")]
    Config(String),
}

/// Where rotated refresh tokens are kept (sealed in the store in production).
#[async_trait]
pub trait RefreshTokenStore: Send + Sync {
    async fn load(&self, account: &str) -> Option<Zeroizing<String>>;
    async fn save(&self, account: &str, token: Zeroizing<String>) -> Result<(), String>;
}

/// An in-memory [`RefreshTokenStore`] (tests, CLI dry runs).
#[derive(Default)]
pub struct MemoryTokenStore {
    tokens: Mutex<HashMap<String, Zeroizing<String>>>,
}

impl MemoryTokenStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl fmt::Debug for MemoryTokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("MemoryTokenStore").field("accounts", &tokens.keys().collect::<Vec<_>>()).finish()
    }
}

#[async_trait]
impl RefreshTokenStore for MemoryTokenStore {
    async fn load(&self, account: &str) -> Option<Zeroizing<String>> {
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner).get(account).cloned()
    }

    async fn save(&self, account: &str, token: Zeroizing<String>) -> Result<(), String> {
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner).insert(account.to_owned(), token);
        Ok(())
    }
}

struct Cached {
    token: Zeroizing<String>,
    expires: Instant,
}

/// Hands out access tokens, refreshing them before they expire.
pub struct TokenSource {
    account: String,
    token_url: String,
    client_id: String,
    client_secret: Option<SecretRef>,
    refresh_token: SecretRef,
    scope: Option<String>,
    client: HttpsClient,
    store: Arc<dyn RefreshTokenStore>,
    cache: Mutex<Option<Cached>>,
    /// Held during a refresh. Holds a rotated refresh token the store
    /// failed to save, which then takes precedence.
    refreshing: tokio::sync::Mutex<Option<Zeroizing<String>>>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("account", &self.account)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

fn valid_token(t: &str) -> bool {
    !t.is_empty() && t.len() <= MAX_TOKEN_LEN && t.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn load_secret(r: &SecretRef, what: &str) -> Result<Zeroizing<String>, OAuth2Error> {
    let raw = r.load().map_err(|e| OAuth2Error::Config(format!("{what}: {e}")))?;
    let s = std::str::from_utf8(&raw).map_err(|_| OAuth2Error::Config(format!("{what} ({r}) is not UTF-8")))?;
    Ok(Zeroizing::new(s.trim().to_owned()))
}

/// The shared HTTPS client for the token endpoint: `ca_file` or else the
/// system roots; statuses are inspected here (400/401/403 are refusals).
fn client(ca_file: Option<&std::path::Path>) -> Result<HttpsClient, OAuth2Error> {
    let ca = match ca_file {
        Some(path) => Some(load_ca_file(path).map_err(|e| {
            let d = match e {
                CaFileError::Unreadable(d) => d,
                CaFileError::Empty => "no certificates in file".into(),
            };
            OAuth2Error::Config(format!("CA bundle {}: {d}", path.display()))
        })?),
        None => None,
    };
    Ok(HttpsClient::new(&HttpsOptions {
        connect_timeout: CONNECT_TIMEOUT,
        total_timeout: HTTP_TIMEOUT,
        ca,
        default_roots: DefaultRoots::System,
        status_as_error: false,
    }))
}

/// The parts of a token endpoint response we use.
#[derive(serde::Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

impl Drop for TokenResponse {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        self.access_token.zeroize();
        self.refresh_token.zeroize();
    }
}

impl TokenResponse {
    fn error_text(&self) -> String {
        match (&self.error, &self.error_description) {
            (Some(e), Some(d)) => sanitize(&format!("{e}: {d}")),
            (Some(e), None) => sanitize(e),
            (None, _) => "no error code".into(),
        }
    }
}

impl TokenSource {
    pub fn new(
        account: &str,
        cfg: &OAuth2ClientConfig,
        store: Arc<dyn RefreshTokenStore>,
    ) -> Result<TokenSource, OAuth2Error> {
        let (preset_url, preset_scope) = match cfg.preset {
            Some(OAuth2Preset::Microsoft365) => (Some(MICROSOFT365_TOKEN_URL), Some(MICROSOFT365_SCOPE)),
            Some(OAuth2Preset::Google) => (Some(GOOGLE_TOKEN_URL), Some(GOOGLE_SCOPE)),
            None => (None, None),
        };
        let token_url = cfg
            .token_url
            .clone()
            .or(preset_url.map(str::to_owned))
            .ok_or_else(|| OAuth2Error::Config("set a preset or token_url".into()))?;
        let uri: ureq::http::Uri =
            token_url.parse().map_err(|_| OAuth2Error::Config(format!("token_url `{token_url}` is not a URL")))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(OAuth2Error::Config(format!("token_url `{token_url}` must be https://")));
        }
        if cfg.client_id.is_empty() {
            return Err(OAuth2Error::Config("client_id is empty".into()));
        }
        Ok(TokenSource {
            account: account.to_owned(),
            token_url,
            client_id: cfg.client_id.clone(),
            client_secret: cfg.client_secret.clone(),
            refresh_token: cfg.refresh_token.clone(),
            scope: cfg.scope.clone().or(preset_scope.map(str::to_owned)),
            client: client(cfg.ca_file.as_deref())?,
            store,
            cache: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(None),
        })
    }

    /// The token endpoint in use.
    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    fn cached(&self) -> Option<Zeroizing<String>> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.as_ref().filter(|c| c.expires > Instant::now() + EXPIRY_MARGIN).map(|c| c.token.clone())
    }

    /// A valid access token (cached; refreshed when it expires within 60 s).
    pub async fn access_token(&self) -> Result<Zeroizing<String>, OAuth2Error> {
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let mut unsaved = self.refreshing.lock().await;
        // Another caller may have refreshed while we waited.
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let refresh = match unsaved.clone() {
            Some(t) => t,
            None => match self.store.load(&self.account).await {
                Some(t) => t,
                None => load_secret(&self.refresh_token, "refresh_token")?,
            },
        };
        let (access, lifetime, rotated) = self.request(&refresh).await?;
        if let Some(new) = rotated.filter(|n| **n != *refresh) {
            match self.store.save(&self.account, new.clone()).await {
                Ok(()) => *unsaved = None,
                Err(e) => {
                    tracing::warn!(account = %self.account, error = %e,
                        "cannot save the rotated OAuth 2.0 refresh token; keeping it in memory");
                    *unsaved = Some(new);
                }
            }
        }
        *self.cache.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Cached { token: access.clone(), expires: Instant::now() + lifetime });
        Ok(access)
    }

    /// Calls the token endpoint: (access token, lifetime, new refresh token).
    async fn request(
        &self,
        refresh: &str,
    ) -> Result<(Zeroizing<String>, Duration, Option<Zeroizing<String>>), OAuth2Error> {
        let mut body = Zeroizing::new(String::with_capacity(512));
        body.push_str("grant_type=refresh_token&refresh_token=");
        form_encode_into(&mut body, refresh.as_bytes());
        body.push_str("&client_id=");
        form_encode_into(&mut body, self.client_id.as_bytes());
        if let Some(r) = &self.client_secret {
            let secret = load_secret(r, "client_secret")?;
            body.push_str("&client_secret=");
            form_encode_into(&mut body, secret.as_bytes());
        }
        if let Some(scope) = &self.scope {
            body.push_str("&scope=");
            form_encode_into(&mut body, scope.as_bytes());
        }
        let url = &self.token_url;
        let resp = self.client.post_form(url, None, body, MAX_RESPONSE_BYTES).await.map_err(|e| match e {
            HttpsError::Task(e) => OAuth2Error::Temporary(format!("token request task failed: {e}")),
            HttpsError::Request(e) => OAuth2Error::Temporary(format!("POST {url}: {e}")),
            HttpsError::Body(e) | HttpsError::TooLarge(e) => {
                OAuth2Error::Temporary(format!("POST {url}: reading the response: {e}"))
            }
        })?;
        let (status, raw) = (resp.status, resp.body);
        let parsed: Option<TokenResponse> = serde_json::from_slice(&raw).ok();
        match status {
            200 => {}
            400 | 401 | 403 => {
                let text = parsed.map_or_else(|| "response is not JSON".into(), |r| r.error_text());
                return Err(OAuth2Error::Refused(format!("HTTP {status}: {text}")));
            }
            _ => {
                let text = parsed.map_or_else(String::new, |r| format!(": {}", r.error_text()));
                return Err(OAuth2Error::Temporary(format!("HTTP {status}{text}")));
            }
        }
        let mut resp = parsed.ok_or_else(|| OAuth2Error::Temporary("token response is not JSON".into()))?;
        if let Some(t) = &resp.token_type {
            if !t.eq_ignore_ascii_case("bearer") {
                return Err(OAuth2Error::Temporary(format!("token_type `{}` is not Bearer", sanitize(t))));
            }
        }
        let access = Zeroizing::new(resp.access_token.take().unwrap_or_default());
        if !valid_token(&access) {
            return Err(OAuth2Error::Temporary("the response has no usable access_token".into()));
        }
        let lifetime = match &resp.expires_in {
            None => DEFAULT_LIFETIME,
            // Some endpoints send the number as a string.
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .map(Duration::from_secs)
                .ok_or_else(|| OAuth2Error::Temporary("expires_in is not a number".into()))?,
        }
        .min(MAX_LIFETIME);
        let rotated = match resp.refresh_token.take().map(Zeroizing::new) {
            Some(t) if valid_token(&t) => Some(t),
            Some(_) => return Err(OAuth2Error::Temporary("the response has an unusable refresh_token".into())),
            None => None,
        };
        Ok((access, lifetime, rotated))
    }

    /// Forgets the cached access token (after the upstream refused it).
    pub fn invalidate(&self) {
        *self.cache.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::upstream::tests::{pki, Pki};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A minimal HTTPS token endpoint: answers request n with
    /// `responses[min(n, last)]` and records the request bodies.
    struct Endpoint {
        port: u16,
        bodies: Arc<Mutex<Vec<String>>>,
    }

    impl Endpoint {
        fn hits(&self) -> usize {
            self.bodies.lock().unwrap().len()
        }

        fn body(&self, n: usize) -> String {
            self.bodies.lock().unwrap()[n].clone()
        }
    }

    async fn endpoint(p: &Pki, responses: Vec<(u16, &'static str)>) -> Endpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(p.server.clone());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = bodies.clone();
        let next = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
                let mut req = Vec::new();
                let head_end = loop {
                    let mut chunk = [0u8; 4096];
                    let n = tls.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break None;
                    }
                    req.extend_from_slice(&chunk[..n]);
                    if let Some(p) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                        break Some(p + 4);
                    }
                };
                let Some(head_end) = head_end else { continue };
                let head = String::from_utf8_lossy(&req[..head_end]).to_ascii_lowercase();
                assert!(head.starts_with("post /token http/1.1\r\n"), "{head}");
                assert!(head.contains("content-type: application/x-www-form-urlencoded"), "{head}");
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap();
                while req.len() < head_end + len {
                    let mut chunk = [0u8; 4096];
                    let n = tls.read(&mut chunk).await.unwrap();
                    assert!(n > 0);
                    req.extend_from_slice(&chunk[..n]);
                }
                seen.lock().unwrap().push(String::from_utf8(req[head_end..].to_vec()).unwrap());
                let i = next.fetch_add(1, Ordering::SeqCst).min(responses.len() - 1);
                let (status, body) = responses[i];
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        Endpoint { port, bodies }
    }

    fn secret_file(p: &Pki, name: &str, value: &str) -> SecretRef {
        let path = p.dir.join(name);
        std::fs::write(&path, format!("{value}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        SecretRef::File(path)
    }

    fn config(p: &Pki, port: u16) -> OAuth2ClientConfig {
        OAuth2ClientConfig {
            preset: None,
            token_url: Some(format!("https://localhost:{port}/token")),
            client_id: "client 1".into(),
            client_secret: Some(secret_file(p, "client-secret", "CS-very-secret")),
            refresh_token: secret_file(p, "refresh-token", "RT1/initial+"),
            scope: Some("a b".into()),
            ca_file: Some(p.ca_file.clone()),
        }
    }

    const OK_ROTATE: &str = r#"{"access_token":"AT1","token_type":"Bearer","expires_in":3600,"refresh_token":"RT2"}"#;

    #[tokio::test]
    async fn refresh_fields_caching_and_rotation() {
        let p = pki(&["localhost"]);
        let ep = endpoint(&p, vec![(200, OK_ROTATE), (200, r#"{"access_token":"AT2","token_type":"bearer"}"#)]).await;
        let store = Arc::new(MemoryTokenStore::new());
        let src = TokenSource::new("acct", &config(&p, ep.port), store.clone()).unwrap();
        // Concurrent callers share one refresh.
        let (a, b, c) = tokio::join!(src.access_token(), src.access_token(), src.access_token());
        for t in [a, b, c] {
            assert_eq!(t.unwrap().as_str(), "AT1");
        }
        assert_eq!(ep.hits(), 1);
        assert_eq!(
            ep.body(0),
            "grant_type=refresh_token&refresh_token=RT1%2Finitial%2B&client_id=client+1\
             &client_secret=CS-very-secret&scope=a+b"
        );
        assert_eq!(src.access_token().await.unwrap().as_str(), "AT1");
        assert_eq!(ep.hits(), 1, "cached");
        assert_eq!(store.load("acct").await.unwrap().as_str(), "RT2", "rotated token saved");
        src.invalidate();
        assert_eq!(src.access_token().await.unwrap().as_str(), "AT2");
        assert_eq!(ep.hits(), 2);
        assert!(ep.body(1).contains("refresh_token=RT2&"), "{}", ep.body(1));
        assert_eq!(store.load("acct").await.unwrap().as_str(), "RT2", "no rotation: unchanged");
        let dbg = format!("{src:?} {store:?}");
        assert!(!dbg.contains("RT") && !dbg.contains("AT") && !dbg.contains("CS-"), "{dbg}");
    }

    #[tokio::test]
    async fn refreshes_when_near_expiry() {
        let p = pki(&["localhost"]);
        let ep = endpoint(&p, vec![(200, r#"{"access_token":"AT1","token_type":"Bearer","expires_in":"59"}"#)]).await;
        let src = TokenSource::new("acct", &config(&p, ep.port), Arc::new(MemoryTokenStore::new())).unwrap();
        src.access_token().await.unwrap();
        src.access_token().await.unwrap();
        assert_eq!(ep.hits(), 2, "a token expiring within 60 s is refreshed");
    }

    #[tokio::test]
    async fn refused_temporary_and_untrusted() {
        let p = pki(&["localhost"]);
        let ep = endpoint(
            &p,
            vec![
                (400, r#"{"error":"invalid_grant","error_description":"AADSTS70000: token \u0007revoked"}"#),
                (503, "<html>down</html>"),
                (200, "not json"),
                (200, r#"{"access_token":"bad token","token_type":"Bearer"}"#),
                (200, r#"{"access_token":"AT","token_type":"mac"}"#),
            ],
        )
        .await;
        let src = TokenSource::new("acct", &config(&p, ep.port), Arc::new(MemoryTokenStore::new())).unwrap();
        let mut errors = Vec::new();
        let e = src.access_token().await.unwrap_err();
        assert!(matches!(e, OAuth2Error::Refused(_)), "{e}");
        assert!(e.to_string().contains("invalid_grant: AADSTS70000: token ?revoked"), "{e}");
        errors.push(e);
        for _ in 0..4 {
            let e = src.access_token().await.unwrap_err();
            assert!(matches!(e, OAuth2Error::Temporary(_)), "{e}");
            errors.push(e);
        }
        assert!(errors[1].to_string().contains("HTTP 503"), "{}", errors[1]);

        let other = pki(&["localhost"]);
        let mut cfg = config(&p, ep.port);
        cfg.ca_file = Some(other.ca_file.clone());
        let src = TokenSource::new("acct", &cfg, Arc::new(MemoryTokenStore::new())).unwrap();
        let e = src.access_token().await.unwrap_err();
        assert!(matches!(e, OAuth2Error::Temporary(_)), "{e}");
        errors.push(e);
        assert_eq!(ep.hits(), 5, "the untrusted endpoint never got the request");
        for e in errors {
            let text = format!("{e} {e:?}");
            assert!(!text.contains("RT1") && !text.contains("CS-very") && !text.contains("AT"), "{text}");
        }
    }

    #[test]
    fn presets_and_configuration_checks() {
        let p = pki(&["localhost"]);
        let store: Arc<dyn RefreshTokenStore> = Arc::new(MemoryTokenStore::new());
        let mut cfg = config(&p, 1);
        cfg.token_url = None;
        cfg.scope = None;
        assert!(matches!(TokenSource::new("a", &cfg, store.clone()), Err(OAuth2Error::Config(_))));
        cfg.preset = Some(OAuth2Preset::Google);
        let src = TokenSource::new("a", &cfg, store.clone()).unwrap();
        assert_eq!((src.token_url(), src.scope.as_deref()), (GOOGLE_TOKEN_URL, Some(GOOGLE_SCOPE)));
        cfg.preset = Some(OAuth2Preset::Microsoft365);
        let src = TokenSource::new("a", &cfg, store.clone()).unwrap();
        assert_eq!((src.token_url(), src.scope.as_deref()), (MICROSOFT365_TOKEN_URL, Some(MICROSOFT365_SCOPE)));
        cfg.token_url = Some("https://login.example/t".into());
        assert_eq!(TokenSource::new("a", &cfg, store.clone()).unwrap().token_url(), "https://login.example/t");
        cfg.token_url = Some("http://login.example/t".into());
        assert!(matches!(TokenSource::new("a", &cfg, store), Err(OAuth2Error::Config(_))));
    }
}
