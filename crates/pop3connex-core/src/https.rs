//! The one hardened outbound HTTPS client: JWKS and introspection
//! ([`crate::oauth`]), the connector's OAuth 2.0 token refresh
//! (`connector::oauth2`) and the connector's MTA-STS policy fetch
//! (`connector::mtasts`) all go through [`HttpsClient`].
//!
//! Built on [`ureq`] (blocking, run on tokio's blocking pool): a small,
//! widely used client whose `rustls` feature uses the same rustls 0.23 + ring
//! stack as the server, so no OpenSSL or aws-lc enters the build. Every
//! client is HTTPS only, follows no redirects, has a connect timeout and a
//! whole-request timeout ([`HttpsOptions`]), caps response headers at
//! [`MAX_HEADER_BYTES`] and reads at most the caller's limit of body. The
//! server is verified against the CAs of a CA file ([`load_ca_file`]) when
//! one is configured, otherwise against the web PKI roots or the system
//! roots ([`DefaultRoots`]). `HTTPS_PROXY`/`ALL_PROXY` and `NO_PROXY` from
//! the environment are honoured. Form bodies are encoded here
//! ([`form_encode`]) and kept in [`Zeroizing`] buffers, because they carry
//! tokens and client secrets.
//!
//! # Pinned addresses
//! MTA-STS resolves the policy host with the connector's own
//! (DNSSEC-validating, configurable) resolver, so the connection must go to
//! that already-resolved address while the certificate is verified for the
//! URL's host (`mta-sts.<domain>`). [`HttpsClient::get_pinned`] does that: it
//! hands ureq a resolver that answers with the caller's addresses, whatever
//! the name, and uses no proxy (a proxy would resolve the name again).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};
use zeroize::Zeroizing;

/// Largest response header block accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Trusted CA certificates loaded from a PEM file.
pub type CaCerts = Arc<Vec<ureq::tls::Certificate<'static>>>;

/// Why a CA file could not be used. Callers word the message (their texts
/// are part of their error contracts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaFileError {
    /// Reading or PEM-decoding the file failed.
    Unreadable(String),
    /// The file holds no PEM certificate.
    Empty,
}

/// Reads every PEM certificate of `path`.
pub fn load_ca_file(path: &Path) -> Result<CaCerts, CaFileError> {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| CaFileError::Unreadable(e.to_string()))?;
    let mut certs = Vec::new();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| CaFileError::Unreadable(e.to_string()))?;
        certs.push(ureq::tls::Certificate::from_der(c.as_ref()).to_owned());
    }
    if certs.is_empty() {
        return Err(CaFileError::Empty);
    }
    Ok(Arc::new(certs))
}

/// The roots trusted when no CA file is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultRoots {
    /// Mozilla's roots bundled in the binary (webpki-roots).
    WebPki,
    /// The system's roots, or the bundled ones if the system has none.
    System,
}

/// How a client is built.
#[derive(Debug, Clone)]
pub struct HttpsOptions {
    /// Time to establish the TCP connection.
    pub connect_timeout: Duration,
    /// Whole-request time (connect, TLS, request, response).
    pub total_timeout: Duration,
    /// CAs to trust instead of the default roots.
    pub ca: Option<CaCerts>,
    /// Roots trusted without `ca`.
    pub default_roots: DefaultRoots,
    /// Whether a non-2xx status is an error ([`HttpsError::Request`]) or a
    /// response the caller inspects.
    pub status_as_error: bool,
}

/// A response: status, the one header callers use, the (capped) body.
pub struct Response {
    pub status: u16,
    /// `Cache-Control`, if present and printable.
    pub cache_control: Option<String>,
    /// `Content-Type`, if present and printable.
    pub content_type: Option<String>,
    pub body: Zeroizing<Vec<u8>>,
}

/// Why a request failed. The texts are ureq's, without the URL: callers
/// prefix `GET url:`/`POST url:` as their messages always did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpsError {
    /// Connecting, TLS, sending, or (with `status_as_error`) the status.
    Request(String),
    /// Reading the response body.
    Body(String),
    /// The body is longer than the caller's limit (a property of the
    /// resource, where [`HttpsError::Body`] is a failed transfer).
    TooLarge(String),
    /// The blocking task could not run (e.g. shutting down).
    Task(String),
}

/// A hardened HTTPS client (cheap to clone: the connection pool is shared).
#[derive(Clone)]
pub struct HttpsClient {
    agent: ureq::Agent,
    /// The same settings without a proxy, for [`HttpsClient::get_pinned`]
    /// (each pinned request gets an agent of its own). Shared, as it is
    /// large and clients are cloned.
    pinned: Arc<ureq::config::Config>,
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsClient").finish_non_exhaustive()
    }
}

impl HttpsClient {
    /// An HTTPS-only client: no redirects, bounded time and header size.
    pub fn new(opts: &HttpsOptions) -> Self {
        use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
        let roots = match (&opts.ca, opts.default_roots) {
            (Some(ca), _) => RootCerts::Specific(ca.clone()),
            (None, DefaultRoots::WebPki) => RootCerts::WebPki,
            (None, DefaultRoots::System) => {
                let found = rustls_native_certs::load_native_certs().certs;
                if found.is_empty() {
                    RootCerts::WebPki
                } else {
                    RootCerts::Specific(Arc::new(
                        found.iter().map(|c| Certificate::from_der(c.as_ref()).to_owned()).collect(),
                    ))
                }
            }
        };
        let tls = TlsConfig::builder().provider(TlsProvider::Rustls).root_certs(roots).build();
        let config = || {
            ureq::Agent::config_builder()
                .https_only(true)
                .max_redirects(0)
                .http_status_as_error(opts.status_as_error)
                .timeout_global(Some(opts.total_timeout))
                .timeout_connect(Some(opts.connect_timeout))
                .max_response_header_size(MAX_HEADER_BYTES)
                .user_agent(concat!("pop3connex/", env!("CARGO_PKG_VERSION")))
                .tls_config(tls.clone())
        };
        let agent = config().build().new_agent();
        let pinned = Arc::new(config().proxy(None).build());
        HttpsClient { agent, pinned }
    }

    /// GETs `url` with an `Accept` header, reading at most `limit` octets.
    pub async fn get(&self, url: &str, accept: &'static str, limit: u64) -> Result<Response, HttpsError> {
        let (agent, url) = (self.agent.clone(), url.to_owned());
        run(move || read(agent.get(&url).header("accept", accept).call(), limit)).await
    }

    /// GETs `url` like [`HttpsClient::get`], but connects only to `addrs`
    /// (tried in order; at most 16) instead of resolving the URL's host, and
    /// never through a proxy. The certificate is still verified for the
    /// URL's host. A TLS failure's text starts with `TLS: `, as the caller
    /// cannot tell it from a connection failure otherwise.
    pub async fn get_pinned(
        &self,
        url: &str,
        addrs: &[SocketAddr],
        accept: &'static str,
        limit: u64,
    ) -> Result<Response, HttpsError> {
        let resolver = PinnedResolver(addrs.to_vec());
        let agent = ureq::Agent::with_parts((*self.pinned).clone(), DefaultConnector::new(), resolver);
        let url = url.to_owned();
        run(move || {
            let resp = agent.get(&url).header("accept", accept).call().map_err(|e| match tls_failure(&e) {
                true => HttpsError::Request(format!("TLS: {e}")),
                false => HttpsError::Request(e.to_string()),
            })?;
            read(Ok(resp), limit)
        })
        .await
    }

    /// POSTs an `application/x-www-form-urlencoded` body (built with
    /// [`form_encode`]), accepting JSON, reading at most `limit` octets.
    pub async fn post_form(
        &self,
        url: &str,
        authorization: Option<Zeroizing<String>>,
        form: Zeroizing<String>,
        limit: u64,
    ) -> Result<Response, HttpsError> {
        let (agent, url) = (self.agent.clone(), url.to_owned());
        run(move || {
            let mut req = agent
                .post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("accept", "application/json");
            if let Some(a) = &authorization {
                req = req.header("authorization", a.as_str());
            }
            read(req.send(form.as_bytes()), limit)
        })
        .await
    }

    /// POSTs a JSON body with extra headers (a webhook delivery), reading
    /// at most `limit` octets of the answer.
    pub async fn post_json(
        &self,
        url: &str,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
        limit: u64,
    ) -> Result<Response, HttpsError> {
        let (agent, url) = (self.agent.clone(), url.to_owned());
        run(move || {
            let mut req = agent.post(&url).header("content-type", "application/json");
            for (name, value) in &headers {
                req = req.header(*name, value.as_str());
            }
            read(req.send(&body[..]), limit)
        })
        .await
    }
}

/// Runs a blocking request on tokio's blocking pool.
async fn run<F>(f: F) -> Result<Response, HttpsError>
where
    F: FnOnce() -> Result<Response, HttpsError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| HttpsError::Task(e.to_string()))?
}

fn read(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>, limit: u64) -> Result<Response, HttpsError> {
    let mut resp = resp.map_err(|e| HttpsError::Request(e.to_string()))?;
    let status = resp.status().as_u16();
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (cache_control, content_type) = (header("cache-control"), header("content-type"));
    let body = resp.body_mut().with_config().limit(limit).read_to_vec().map_err(|e| match e {
        ureq::Error::BodyExceedsLimit(_) => HttpsError::TooLarge(e.to_string()),
        e => HttpsError::Body(e.to_string()),
    })?;
    Ok(Response { status, cache_control, content_type, body: Zeroizing::new(body) })
}

/// Whether a request failed in the TLS handshake (certificate, protocol).
fn tls_failure(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Rustls(_) | ureq::Error::Tls(_) | ureq::Error::TlsRequired => true,
        ureq::Error::Io(io) => io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()),
        _ => false,
    }
}

/// A "resolver" that answers every name with the caller's addresses.
#[derive(Debug)]
struct PinnedResolver(Vec<SocketAddr>);

impl Resolver for PinnedResolver {
    fn resolve(
        &self,
        _uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let mut out = self.empty();
        for &addr in &self.0 {
            if out.try_push(addr).is_err() {
                break;
            }
        }
        if out.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(out)
    }
}

/// application/x-www-form-urlencoded encoding of one value, appended.
pub fn form_encode_into(out: &mut String, s: &[u8]) {
    for &b in s {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(b as char),
            b' ' => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 15)] as char);
            }
        }
    }
}

/// application/x-www-form-urlencoded encoding of one value.
pub fn form_encode(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    form_encode_into(&mut out, s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA file and an HTTPS server on 127.0.0.1 whose certificate names
    /// `pinned.test` only, answering one request with `body`.
    async fn pinned_server(body: &'static str) -> (std::path::PathBuf, SocketAddr) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let file = std::env::temp_dir().join(format!("p3x-https-{}-ca.pem", std::process::id()));
        std::fs::write(&file, ca_cert.pem()).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["pinned.test".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], der)
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
                let mut request = Vec::new();
                let mut chunk = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        (file, addr)
    }

    #[tokio::test]
    async fn pinned_get_connects_to_the_given_address_and_verifies_the_url_host() {
        let (ca_file, addr) = pinned_server("policy").await;
        let client = HttpsClient::new(&HttpsOptions {
            connect_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(10),
            ca: Some(load_ca_file(&ca_file).unwrap()),
            default_roots: DefaultRoots::WebPki,
            status_as_error: false,
        });
        let _ = std::fs::remove_file(&ca_file);
        // `pinned.test` resolves nowhere: only the pinned address is used.
        let url = format!("https://pinned.test:{}/x", addr.port());
        let r = client.get_pinned(&url, &[addr], "text/plain", 100).await.unwrap();
        assert_eq!((r.status, r.content_type.as_deref(), &r.body[..]), (200, Some("text/plain"), &b"policy"[..]));
        // The certificate is checked against the URL's host, not the address.
        let url = format!("https://other.test:{}/x", addr.port());
        match client.get_pinned(&url, &[addr], "text/plain", 100).await {
            Err(HttpsError::Request(m)) => assert!(m.starts_with("TLS: "), "{m}"),
            other => panic!("{:?}", other.map(|r| r.status)),
        }
        // A body over the limit is its own error.
        let url = format!("https://pinned.test:{}/x", addr.port());
        assert!(matches!(client.get_pinned(&url, &[addr], "text/plain", 3).await, Err(HttpsError::TooLarge(_))));
        assert!(matches!(client.get_pinned(&url, &[], "text/plain", 100).await, Err(HttpsError::Request(_))));
    }

    #[test]
    fn form_encoding_for_basic_auth() {
        assert_eq!(form_encode(b"my client:1/x y"), "my+client%3A1%2Fx+y");
        assert_eq!(form_encode(b"A-z_0.9*"), "A-z_0.9*");
    }
}
