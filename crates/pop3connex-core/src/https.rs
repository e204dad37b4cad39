//! The one hardened outbound HTTPS client: JWKS and introspection
//! ([`crate::oauth`]) and the connector's OAuth 2.0 token refresh
//! (`connector::oauth2`) all go through [`HttpsClient`].
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
//! # The exception: MTA-STS
//! `connector::mtasts` fetches its policy with its own tokio-rustls GET, not
//! with this client: the policy host is resolved with the connector's own
//! (DNSSEC-validating, configurable) resolver and the connection must go to
//! that already-resolved address while the certificate is verified for
//! `mta-sts.<domain>` (system roots or `mta_sts_ca_file`). ureq resolves
//! names itself; pinning the address would need a custom resolver and a
//! thread per fetch, for an exchange that is one bounded HTTP/1.0 request.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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
    pub body: Zeroizing<Vec<u8>>,
}

/// Why a request failed. The texts are ureq's, without the URL: callers
/// prefix `GET url:`/`POST url:` as their messages always did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpsError {
    /// Connecting, TLS, sending, or (with `status_as_error`) the status.
    Request(String),
    /// Reading the response body (including the size cap).
    Body(String),
    /// The blocking task could not run (e.g. shutting down).
    Task(String),
}

/// A hardened HTTPS client (cheap to clone: the connection pool is shared).
#[derive(Clone)]
pub struct HttpsClient {
    agent: ureq::Agent,
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
        let agent = ureq::Agent::config_builder()
            .https_only(true)
            .max_redirects(0)
            .http_status_as_error(opts.status_as_error)
            .timeout_global(Some(opts.total_timeout))
            .timeout_connect(Some(opts.connect_timeout))
            .max_response_header_size(MAX_HEADER_BYTES)
            .user_agent(concat!("pop3connex/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls)
            .build()
            .new_agent();
        HttpsClient { agent }
    }

    /// GETs `url` with an `Accept` header, reading at most `limit` octets.
    pub async fn get(&self, url: &str, accept: &'static str, limit: u64) -> Result<Response, HttpsError> {
        let (agent, url) = (self.agent.clone(), url.to_owned());
        run(move || read(agent.get(&url).header("accept", accept).call(), limit)).await
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
    let cache_control = resp.headers().get("cache-control").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = resp.body_mut().with_config().limit(limit).read_to_vec().map_err(|e| HttpsError::Body(e.to_string()))?;
    Ok(Response { status, cache_control, body: Zeroizing::new(body) })
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

    #[test]
    fn form_encoding_for_basic_auth() {
        assert_eq!(form_encode(b"my client:1/x y"), "my+client%3A1%2Fx+y");
        assert_eq!(form_encode(b"A-z_0.9*"), "A-z_0.9*");
    }
}
