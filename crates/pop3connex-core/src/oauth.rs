//! OAuth 2.0 bearer-token login: SASL `OAUTHBEARER` (RFC 7628) and
//! `XOAUTH2` (the Google/Microsoft form), with JWT access tokens checked
//! locally against the issuer's published keys (JWKS) and, optionally,
//! against the issuer's RFC 7662 introspection endpoint.
//!
//! # What a token must satisfy
//! - JWS compact serialisation (three parts), at most [`MAX_TOKEN_LEN`] octets.
//! - `alg` in the issuer's `algorithms` list (asymmetric only: `none` and
//!   HMAC `HS*` cannot even be configured) and matching the type, curve and
//!   `alg` of the key named by `kid` (algorithm confusion is refused).
//! - A signature that verifies with that key.
//! - `iss` exactly the configured issuer, `aud` containing one of the
//!   configured audiences, `exp` in the future and `nbf` (if present) in
//!   the past, both with `leeway_secs` of clock skew; all three claims are
//!   required, wrongly typed claims are refused.
//! - A string `username_claim` (default `email`) that is a valid local user
//!   name. There is deliberately **no fallback to `sub`**: `sub` is an
//!   opaque, issuer-scoped identifier that could collide with an unrelated
//!   local account name. With `email`, a token that carries
//!   `email_verified` counts as verified only if the claim is the JSON
//!   boolean `true` or the string `"true"` (Cognito sends strings);
//!   `false`, `"False"`, `"0"`, numbers and anything else are refused. A
//!   token without the claim is accepted (Microsoft Entra ID does not send
//!   it; the issuer is trusted to put only addresses it owns in `email`).
//! - The account must accept logins: a locked-out, disabled or
//!   password-expired account is refused with the same error challenge
//!   and reply as an invalid token.
//! - If introspection is configured: the endpoint says `"active": true`.
//!
//! # Keys (JWKS)
//! From a file (re-read whenever its mtime or size changes) or an HTTPS URL
//! (cached for the response's `Cache-Control: max-age`, bounded to
//! [`MIN_JWKS_TTL`]..=[`MAX_JWKS_TTL`], [`DEFAULT_JWKS_TTL`] without one).
//! A token naming an unknown `kid` triggers one immediate refresh (key
//! rotation), at most once per [`MIN_REFRESH_INTERVAL`] per issuer, so
//! forged `kid`s cannot turn the server into a request amplifier. A failed
//! refresh keeps serving the previous keys. Symmetric (`oct`) keys,
//! encryption keys and RSA keys under 2048 bits are ignored.
//!
//! # HTTP client
//! JWKS and introspection requests use [`ureq`] (blocking, run on tokio's
//! blocking pool): a small, widely used client whose `rustls` feature uses
//! the same rustls 0.23 + ring stack as the server, so no OpenSSL or aws-lc
//! enters the build. Requests are HTTPS only, follow no redirects, time out
//! after [`HTTP_TIMEOUT`], and read at most [`MAX_JWKS_BYTES`] of body. The
//! server is verified against Mozilla's roots (webpki-roots), or only
//! against the CAs of `ca_file` when it is set. `HTTPS_PROXY`/`ALL_PROXY`
//! and `NO_PROXY` from the environment are honoured.
//!
//! # Logging
//! Tokens are never logged, not even in part. Failures are logged with the
//! reason ([`TokenError`]'s messages carry no token content).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::auth::AuthFailure;
use crate::sasl::{Mechanism, SaslContext, Step};
use crate::secret::{SecretError, SecretRef};
use crate::store::UserRecord;
use crate::types::UserName;

/// The SASL mechanisms of this module, in order of preference.
pub const MECHANISMS: [&str; 2] = ["OAUTHBEARER", "XOAUTH2"];
/// Longest accepted token (real access tokens are 1-4 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Largest JWKS document read from a file or URL.
pub const MAX_JWKS_BYTES: u64 = 1024 * 1024;
/// Largest introspection response read.
pub const MAX_INTROSPECTION_BYTES: u64 = 64 * 1024;
/// Cache lifetime of fetched keys without `Cache-Control: max-age`.
pub const DEFAULT_JWKS_TTL: Duration = Duration::from_secs(3600);
/// Bounds applied to `Cache-Control: max-age`.
pub const MIN_JWKS_TTL: Duration = Duration::from_secs(60);
pub const MAX_JWKS_TTL: Duration = Duration::from_secs(24 * 3600);
/// Minimum time between two refreshes forced by an unknown `kid` or by a
/// failed fetch.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Whole-request timeout (connect, TLS, request, response) for HTTP calls.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent introspection requests per issuer; further logins wait.
const MAX_PARALLEL_INTROSPECTIONS: usize = 8;
/// Accepted RSA modulus sizes in bits.
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;
const DEFAULT_LEEWAY_SECS: u64 = 60;
const MAX_LEEWAY_SECS: u64 = 300;

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// The `[oauth]` table. OAuth login is off unless at least one
/// `[[oauth.issuer]]` is configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    /// Trusted token issuers (`[[oauth.issuer]]`), each with its own keys.
    #[serde(default, rename = "issuer")]
    pub issuers: Vec<IssuerConfig>,
    /// `scope` sent in the RFC 7628 error a client gets for a refused token,
    /// so it can request a token with the right scope. Omitted when unset.
    #[serde(default)]
    pub scope: Option<String>,
    /// `openid-configuration` URL sent in that error (RFC 7628 section
    /// 3.2.2), for clients that discover the issuer. Omitted when unset.
    #[serde(default)]
    pub openid_configuration: Option<HttpsUrl>,
}

/// One `[[oauth.issuer]]`: an authorization server whose tokens are trusted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Exact value of the tokens' `iss` claim (no normalisation: a trailing
    /// slash matters).
    pub issuer: String,
    /// Accepted audiences: the token's `aud` must contain at least one.
    pub audiences: Vec<String>,
    /// JWKS file (RFC 7517 key set). Re-read when its mtime or size
    /// changes. Exactly one of `jwks_file` and `jwks_url` is required.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL (`https://` only), e.g. the `jwks_uri` of the issuer's
    /// OpenID configuration.
    #[serde(default)]
    pub jwks_url: Option<HttpsUrl>,
    /// PEM file of CA certificates to trust for `jwks_url` and
    /// `introspection_url` instead of the built-in web PKI roots (for an
    /// issuer behind an internal CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Accepted signature algorithms: RS256, RS384, RS512, PS256, PS384,
    /// PS512, ES256, ES384, EdDSA. `none` and HMAC (`HS*`) are refused.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<JwsAlgorithm>,
    /// Claim holding the local user name (lower-cased). No fallback to
    /// another claim. With `email`, `email_verified: false` is refused.
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    /// Allowed clock skew in seconds for `exp` and `nbf` (0 to 300).
    #[serde(default = "default_leeway", deserialize_with = "leeway_secs")]
    pub leeway_secs: u64,
    /// RFC 7662 introspection endpoint (`https://` only). When set, every
    /// token that passed the local checks must also be reported
    /// `"active": true` by it (catches revoked tokens). Needs the two
    /// `introspection_client_*` keys.
    #[serde(default)]
    pub introspection_url: Option<HttpsUrl>,
    /// Client id for HTTP Basic authentication to `introspection_url`.
    #[serde(default)]
    pub introspection_client_id: Option<String>,
    /// Client secret for `introspection_url`, as `env:NAME` or `file:PATH`.
    #[serde(default)]
    pub introspection_client_secret: Option<SecretRef>,
}

fn default_algorithms() -> Vec<JwsAlgorithm> {
    vec![JwsAlgorithm(Algorithm::RS256), JwsAlgorithm(Algorithm::ES256)]
}

fn default_username_claim() -> String {
    "email".into()
}

fn default_leeway() -> u64 {
    DEFAULT_LEEWAY_SECS
}

fn leeway_secs<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = u64::deserialize(d)?;
    if v > MAX_LEEWAY_SECS {
        return Err(D::Error::custom(format!("must be between 0 and {MAX_LEEWAY_SECS} seconds, got {v}")));
    }
    Ok(v)
}

/// An asymmetric JWS algorithm allowed in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwsAlgorithm(pub Algorithm);

const ALGORITHM_NAMES: [(&str, Algorithm); 9] = [
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
];

fn algorithm_name(alg: Algorithm) -> &'static str {
    ALGORITHM_NAMES.iter().find(|(_, a)| *a == alg).map_or("unsupported", |(n, _)| n)
}

impl<'de> Deserialize<'de> for JwsAlgorithm {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Some((_, alg)) = ALGORITHM_NAMES.iter().find(|(n, _)| *n == s) {
            return Ok(JwsAlgorithm(*alg));
        }
        let why = if s.eq_ignore_ascii_case("none") || s.to_ascii_uppercase().starts_with("HS") {
            "unsigned and shared-secret (HMAC) tokens are never accepted"
        } else {
            "unknown algorithm"
        };
        Err(D::Error::custom(format!(
            "`{s}` is refused ({why}); use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA"
        )))
    }
}

/// An `https://` URL (no user info), checked while parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl(String);

impl HttpsUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: ureq::http::Uri = s.parse().map_err(|_| format!("`{s}` is not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("`{s}` is not an https:// URL (plain HTTP is refused)"));
        }
        match uri.authority() {
            Some(a) if !a.host().is_empty() && !a.as_str().contains('@') => Ok(HttpsUrl(s.to_owned())),
            Some(_) => Err(format!("`{s}`: credentials in the URL are not allowed")),
            None => Err(format!("`{s}` has no host")),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for HttpsUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HttpsUrl::parse(&s).map_err(D::Error::custom)
    }
}

impl OAuthConfig {
    /// Whether OAuth login is configured.
    pub fn enabled(&self) -> bool {
        !self.issuers.is_empty()
    }

    /// Makes relative `jwks_file`, `ca_file` and `file:` secret paths
    /// relative to `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        for i in &mut self.issuers {
            for p in [&mut i.jwks_file, &mut i.ca_file].into_iter().flatten() {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
            if let Some(s) = &mut i.introspection_client_secret {
                s.resolve_against(base);
            }
        }
    }

    /// Checks what the parser cannot: one key source per issuer, distinct
    /// issuers, complete introspection settings. The message names the key.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = HashSet::new();
        for i in &self.issuers {
            let name = &i.issuer;
            if name.is_empty() {
                return Err("[[oauth.issuer]] issuer must not be empty".into());
            }
            if !seen.insert(name.as_str()) {
                return Err(format!("[[oauth.issuer]] `{name}` is configured twice"));
            }
            if i.audiences.is_empty() || i.audiences.iter().any(String::is_empty) {
                return Err(format!("[[oauth.issuer]] `{name}`: audiences must list at least one non-empty audience"));
            }
            match (&i.jwks_file, &i.jwks_url) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => return Err(format!("[[oauth.issuer]] `{name}`: set exactly one of jwks_file and jwks_url")),
            }
            if i.algorithms.is_empty() {
                return Err(format!("[[oauth.issuer]] `{name}`: algorithms must not be empty"));
            }
            if i.username_claim.is_empty() {
                return Err(format!("[[oauth.issuer]] `{name}`: username_claim must not be empty"));
            }
            let parts = [
                i.introspection_url.is_some(),
                i.introspection_client_id.is_some(),
                i.introspection_client_secret.is_some(),
            ];
            if parts.iter().any(|&p| p) && !parts.iter().all(|&p| p) {
                return Err(format!(
                    "[[oauth.issuer]] `{name}`: introspection_url, introspection_client_id and \
                     introspection_client_secret must be set together"
                ));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Setting up the validator failed (bad configuration or key file).
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("[oauth] {0}")]
    Config(String),
    #[error("[oauth] JWKS file {path}: {reason}")]
    JwksFile { path: PathBuf, reason: String },
    #[error("[oauth] CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("[oauth] introspection_client_secret: {0}")]
    Secret(#[from] SecretError),
    #[error("[oauth] no JWT crypto provider is available (jsonwebtoken built without exactly one backend)")]
    NoCryptoProvider,
}

/// Why a token was refused. Messages never contain token material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not a well-formed signed JWT")]
    Malformed,
    #[error("token issuer is not configured")]
    UnknownIssuer,
    #[error("token algorithm `{0}` is not allowed")]
    AlgorithmNotAllowed(String),
    #[error("no key matches the token's key id and algorithm")]
    UnknownKey,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token audience is not accepted")]
    WrongAudience,
    #[error("token issuer does not match")]
    WrongIssuer,
    #[error("token claim `{0}` is missing or malformed")]
    BadClaim(String),
    #[error("token has no usable `{0}` claim for the user name")]
    NoUserName(String),
    #[error("token e-mail address is not verified")]
    EmailNotVerified,
    #[error("token is not active (introspection)")]
    Inactive,
    #[error("token cannot be checked now: {0}")]
    Unavailable(String),
}

impl TokenError {
    /// How the session reports it: transient trouble on our side is
    /// `Temporary` (`[SYS/TEMP]`), everything else a bad credential.
    pub fn auth_failure(&self) -> AuthFailure {
        match self {
            TokenError::Unavailable(_) => AuthFailure::Temporary,
            _ => AuthFailure::BadPassword,
        }
    }
}

fn map_jwt_error(e: &jsonwebtoken::errors::Error, alg: Algorithm) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidEddsaKey | K::InvalidRsaKey(_) | K::InvalidKeyFormat => {
            TokenError::BadSignature
        }
        K::ExpiredSignature => TokenError::Expired,
        K::ImmatureSignature => TokenError::NotYetValid,
        K::InvalidAudience => TokenError::WrongAudience,
        K::InvalidIssuer => TokenError::WrongIssuer,
        K::MissingRequiredClaim(c) | K::InvalidClaimFormat(c) => TokenError::BadClaim(c.clone()),
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::UnsupportedAlgorithm | K::MissingAlgorithm => {
            TokenError::AlgorithmNotAllowed(algorithm_name(alg).into())
        }
        _ => TokenError::Malformed,
    }
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyType {
    fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyType::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyType::P256 => alg == ES256,
            KeyType::P384 => alg == ES384,
            KeyType::Ed25519 => alg == EdDSA,
        }
    }
}

/// A usable verification key from a JWKS.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    kind: KeyType,
    /// The JWK's own `alg`, if it names one.
    alg: Option<Algorithm>,
    decoding: DecodingKey,
}

impl Key {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// Base64url, with or without padding (some JWKS publishers pad).
const B64URL: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

fn b64_field(v: &Option<String>, name: &str) -> Result<Vec<u8>, String> {
    let s = v.as_deref().ok_or_else(|| format!("missing `{name}`"))?;
    B64URL.decode(s).map_err(|_| format!("`{name}` is not base64url"))
}

/// One JWK to a key, `Ok(None)` for keys that are not for us (encryption,
/// symmetric, unsupported curve), `Err` for broken ones.
fn parse_jwk(raw: RawJwk) -> Result<Option<Key>, String> {
    if raw.use_.as_deref().is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    if raw.key_ops.as_ref().is_some_and(|ops| !ops.iter().any(|o| o == "verify")) {
        return Ok(None);
    }
    let alg = match raw.alg.as_deref() {
        None => None,
        Some(name) => match ALGORITHM_NAMES.iter().find(|(n, _)| *n == name) {
            Some((_, a)) => Some(*a),
            // HS*, RSA-OAEP and the like: not an asymmetric signing key.
            None => return Ok(None),
        },
    };
    let (kind, decoding) = match (raw.kty.as_str(), raw.crv.as_deref()) {
        ("RSA", _) => {
            let n = b64_field(&raw.n, "n")?;
            let e = b64_field(&raw.e, "e")?;
            let n_trim = n.iter().position(|&b| b != 0).map_or(&[][..], |p| &n[p..]);
            let bits = n_trim.first().map_or(0, |b| n_trim.len() * 8 - b.leading_zeros() as usize);
            if !RSA_BITS.contains(&bits) {
                return Err(format!("RSA modulus of {bits} bits is outside {RSA_BITS:?}"));
            }
            if e.iter().all(|&b| b == 0) || e.len() > 8 {
                return Err("bad RSA exponent".into());
            }
            (KeyType::Rsa, DecodingKey::from_rsa_raw_components(n_trim, &e))
        }
        ("EC", Some(crv @ ("P-256" | "P-384"))) => {
            let (kind, len) = if crv == "P-256" { (KeyType::P256, 32) } else { (KeyType::P384, 48) };
            let x = b64_field(&raw.x, "x")?;
            let y = b64_field(&raw.y, "y")?;
            if x.len() != len || y.len() != len {
                return Err(format!("{crv} coordinates must be {len} octets"));
            }
            let point = [&[0x04][..], &x, &y].concat();
            (kind, DecodingKey::from_ec_der(&point))
        }
        ("OKP", Some("Ed25519")) => {
            let x = b64_field(&raw.x, "x")?;
            if x.len() != 32 {
                return Err("Ed25519 key must be 32 octets".into());
            }
            (KeyType::Ed25519, DecodingKey::from_ed_der(&x))
        }
        _ => return Ok(None),
    };
    if let Some(a) = alg.filter(|a| !kind.fits(*a)) {
        return Err(format!("alg {} does not fit the key type", algorithm_name(a)));
    }
    Ok(Some(Key { kid: raw.kid, kind, alg, decoding }))
}

/// Parses a JWKS document; broken keys are skipped, a set without any
/// usable key is an error.
fn parse_jwks(doc: &[u8]) -> Result<Vec<Key>, String> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<Value>,
    }
    let set: Set = serde_json::from_slice(doc).map_err(|e| format!("not a JWK set: {e}"))?;
    let mut keys = Vec::new();
    for (i, v) in set.keys.into_iter().enumerate() {
        let parsed = serde_json::from_value::<RawJwk>(v).map_err(|e| e.to_string()).and_then(parse_jwk);
        match parsed {
            Ok(Some(k)) => keys.push(k),
            Ok(None) => {}
            Err(why) => tracing::warn!(key = i, reason = %why, "ignoring unusable JWK"),
        }
    }
    if keys.is_empty() {
        return Err("the key set has no usable signature key".into());
    }
    Ok(keys)
}

/// TTL from a `Cache-Control` header value.
fn cache_ttl(header: Option<&str>) -> Duration {
    let Some(h) = header else { return DEFAULT_JWKS_TTL };
    let mut ttl = None;
    for d in h.split(',').map(str::trim) {
        let lower = d.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return MIN_JWKS_TTL;
        }
        if let Some(v) = lower.strip_prefix("max-age=") {
            ttl = v.trim_matches('"').parse::<u64>().ok().map(Duration::from_secs);
        }
    }
    ttl.map_or(DEFAULT_JWKS_TTL, |t| t.clamp(MIN_JWKS_TTL, MAX_JWKS_TTL))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileStamp { modified: meta.modified().ok(), len: meta.len() }
    }
}

enum JwksSource {
    File(PathBuf),
    Url { url: String, agent: ureq::Agent },
}

struct JwksState {
    keys: Arc<[Key]>,
    /// URL: when the keys go stale.
    fresh_until: Option<Instant>,
    /// Last load attempt (successful or not).
    last_attempt: Option<Instant>,
    /// File: what the loaded file looked like.
    stamp: Option<FileStamp>,
    /// File: what it looked like when it last failed to load (not retried
    /// until it changes again, so a broken file is not re-read per login).
    failed_stamp: Option<FileStamp>,
}

/// The key set of one issuer, with its refresh policy.
struct Jwks {
    issuer: String,
    source: JwksSource,
    min_refresh: Duration,
    state: Mutex<JwksState>,
    /// One refresh at a time; others wait for its result.
    refreshing: tokio::sync::Mutex<()>,
}

/// What a load produced.
struct Loaded {
    keys: Vec<Key>,
    ttl: Option<Duration>,
    stamp: Option<FileStamp>,
}

impl Jwks {
    fn new(issuer: &str, source: JwksSource) -> Self {
        Jwks {
            issuer: issuer.to_owned(),
            source,
            min_refresh: MIN_REFRESH_INTERVAL,
            state: Mutex::new(JwksState {
                keys: Arc::from(Vec::new()),
                fresh_until: None,
                last_attempt: None,
                stamp: None,
                failed_stamp: None,
            }),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JwksState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads a JWKS file synchronously (at start-up, so a broken file stops
    /// the server with a clear error instead of failing every login).
    fn load_file_now(&self) -> Result<(), OAuthError> {
        let JwksSource::File(path) = &self.source else { return Ok(()) };
        let err = |reason: String| OAuthError::JwksFile { path: path.clone(), reason };
        let (doc, stamp) = read_capped(path).map_err(err)?;
        let keys = parse_jwks(&doc).map_err(err)?;
        self.install(Loaded { keys, ttl: None, stamp: Some(stamp) });
        Ok(())
    }

    fn install(&self, loaded: Loaded) {
        let mut st = self.lock();
        st.keys = Arc::from(loaded.keys);
        st.fresh_until = loaded.ttl.map(|t| Instant::now() + t);
        st.stamp = loaded.stamp;
    }

    async fn load(&self) -> Result<Loaded, String> {
        match &self.source {
            JwksSource::File(path) => {
                let path = path.clone();
                let read = tokio::task::spawn_blocking(move || read_capped(&path));
                let (doc, stamp) = read.await.map_err(|e| format!("read task failed: {e}"))??;
                let keys = parse_jwks(&doc).inspect_err(|_| self.lock().failed_stamp = Some(stamp))?;
                Ok(Loaded { keys, ttl: None, stamp: Some(stamp) })
            }
            JwksSource::Url { url, agent } => {
                let (agent, url) = (agent.clone(), url.clone());
                let (doc, ttl) = tokio::task::spawn_blocking(move || fetch_jwks(&agent, &url))
                    .await
                    .map_err(|e| format!("fetch task failed: {e}"))??;
                Ok(Loaded { keys: parse_jwks(&doc)?, ttl: Some(ttl), stamp: None })
            }
        }
    }

    /// Whether the cached keys should be reloaded before use.
    async fn stale(&self) -> bool {
        match &self.source {
            JwksSource::File(path) => {
                let now = tokio::fs::metadata(path).await.ok().map(|m| FileStamp::of(&m));
                let st = self.lock();
                // A vanished file keeps the old keys (and is retried at the
                // rate limit), a changed one is re-read at once.
                match now {
                    Some(s) => st.stamp != Some(s) && st.failed_stamp != Some(s),
                    None => self.may_retry(&st),
                }
            }
            JwksSource::Url { .. } => {
                let st = self.lock();
                let expired = st.fresh_until.is_none_or(|t| Instant::now() >= t);
                expired && self.may_retry(&st)
            }
        }
    }

    fn may_retry(&self, st: &JwksState) -> bool {
        st.last_attempt.is_none_or(|t| t.elapsed() >= self.min_refresh)
    }

    /// Reloads the keys unless another task tried while we waited for our
    /// turn. With `forced`, honours the rate limit.
    async fn refresh(&self, forced: bool) {
        let seen = self.lock().last_attempt;
        let _one_at_a_time = self.refreshing.lock().await;
        {
            let mut st = self.lock();
            if st.last_attempt != seen {
                return;
            }
            if forced && !self.may_retry(&st) {
                return;
            }
            st.last_attempt = Some(Instant::now());
        }
        match self.load().await {
            Ok(loaded) => {
                tracing::info!(issuer = %self.issuer, keys = loaded.keys.len(), "OAuth signing keys loaded");
                self.install(loaded);
            }
            Err(reason) => {
                tracing::warn!(issuer = %self.issuer, %reason, "OAuth key refresh failed, keeping the old keys");
            }
        }
    }

    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
        let keys = self.lock().keys.clone();
        let key = match kid {
            Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid) && k.accepts(alg)),
            None => {
                // Without a kid, only an unambiguous key will do.
                let mut fitting = keys.iter().filter(|k| k.accepts(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => Some(k),
                    _ => None,
                }
            }
        };
        key.map(|k| k.decoding.clone())
    }

    /// The key for a token: reloads stale keys, and once (rate-limited)
    /// when the `kid` is unknown, for key rotation.
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, TokenError> {
        if self.stale().await {
            self.refresh(false).await;
        }
        if let Some(k) = self.find(kid, alg) {
            return Ok(k);
        }
        self.refresh(true).await;
        if let Some(k) = self.find(kid, alg) {
            return Ok(k);
        }
        if self.lock().keys.is_empty() {
            return Err(TokenError::Unavailable("no signing keys could be loaded".into()));
        }
        Err(TokenError::UnknownKey)
    }
}

/// Reads at most [`MAX_JWKS_BYTES`] of a file, with the stamp of what was
/// read (metadata of the open handle, so both describe the same file).
fn read_capped(path: &Path) -> Result<(Vec<u8>, FileStamp), String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let stamp = FileStamp::of(&file.metadata().map_err(|e| e.to_string())?);
    let mut doc = Vec::new();
    file.take(MAX_JWKS_BYTES + 1).read_to_end(&mut doc).map_err(|e| e.to_string())?;
    if doc.len() as u64 > MAX_JWKS_BYTES {
        return Err(format!("larger than {MAX_JWKS_BYTES} octets"));
    }
    Ok((doc, stamp))
}

/// GETs a JWKS document (blocking; run on the blocking pool).
fn fetch_jwks(agent: &ureq::Agent, url: &str) -> Result<(Vec<u8>, Duration), String> {
    let mut resp = agent
        .get(url)
        .header("accept", "application/jwk-set+json, application/json")
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let ttl = cache_ttl(resp.headers().get("cache-control").and_then(|v| v.to_str().ok()));
    let body =
        resp.body_mut().with_config().limit(MAX_JWKS_BYTES).read_to_vec().map_err(|e| format!("GET {url}: {e}"))?;
    Ok((body, ttl))
}

/// An HTTPS-only agent: no redirects, bounded time and header size.
fn http_agent(roots: Option<&Arc<Vec<ureq::tls::Certificate<'static>>>>) -> ureq::Agent {
    use ureq::tls::{RootCerts, TlsConfig, TlsProvider};
    let roots = roots.map_or(RootCerts::WebPki, |r| RootCerts::Specific(r.clone()));
    let tls = TlsConfig::builder().provider(TlsProvider::Rustls).root_certs(roots).build();
    ureq::Agent::config_builder()
        .https_only(true)
        .max_redirects(0)
        .http_status_as_error(true)
        .timeout_global(Some(HTTP_TIMEOUT))
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .max_response_header_size(64 * 1024)
        .user_agent(concat!("pop3connex/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls)
        .build()
        .new_agent()
}

fn load_ca_file(path: &Path) -> Result<Arc<Vec<ureq::tls::Certificate<'static>>>, OAuthError> {
    use rustls_pki_types::pem::PemObject;
    let err = |reason: String| OAuthError::CaFile { path: path.to_owned(), reason };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut certs = Vec::new();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| err(e.to_string()))?;
        certs.push(ureq::tls::Certificate::from_der(c.as_ref()).to_owned());
    }
    if certs.is_empty() {
        return Err(err("no PEM certificate found".into()));
    }
    Ok(Arc::new(certs))
}

// ---------------------------------------------------------------------------
// Introspection (RFC 7662)
// ---------------------------------------------------------------------------

struct Introspection {
    url: String,
    agent: ureq::Agent,
    /// `Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 2.3.1).
    authorization: Zeroizing<String>,
    permits: tokio::sync::Semaphore,
}

/// application/x-www-form-urlencoded encoding of one value.
fn form_encode(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Introspection {
    async fn check(&self, token: &str, issuer: &str, leeway: u64) -> Result<(), TokenError> {
        let _permit = self.permits.acquire().await.map_err(|_| TokenError::Unavailable("shutting down".into()))?;
        let agent = self.agent.clone();
        let url = self.url.clone();
        let auth = self.authorization.clone();
        let token = Zeroizing::new(token.to_owned());
        let body = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
            let mut resp = agent
                .post(&url)
                .header("authorization", auth.as_str())
                .header("accept", "application/json")
                .send_form([("token", token.as_str()), ("token_type_hint", "access_token")])
                .map_err(|e| format!("POST {url}: {e}"))?;
            resp.body_mut()
                .with_config()
                .limit(MAX_INTROSPECTION_BYTES)
                .read_to_vec()
                .map_err(|e| format!("POST {url}: {e}"))
        })
        .await
        .map_err(|e| TokenError::Unavailable(format!("introspection task failed: {e}")))?
        .map_err(TokenError::Unavailable)?;
        let resp: Map<String, Value> = serde_json::from_slice(&body)
            .map_err(|_| TokenError::Unavailable("introspection response is not a JSON object".into()))?;
        if resp.get("active") != Some(&Value::Bool(true)) {
            return Err(TokenError::Inactive);
        }
        if let Some(exp) = resp.get("exp").and_then(Value::as_u64) {
            let now = u64::try_from(crate::types::unix_now()).unwrap_or(0);
            if exp.saturating_add(leeway) < now {
                return Err(TokenError::Inactive);
            }
        }
        if let Some(iss) = resp.get("iss").and_then(Value::as_str) {
            if iss != issuer {
                return Err(TokenError::WrongIssuer);
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The validator
// ---------------------------------------------------------------------------

struct Issuer {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    username_claim: String,
    leeway: u64,
    jwks: Jwks,
    introspection: Option<Introspection>,
}

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedToken {
    /// The local user the token names (`username_claim`, lower-cased).
    pub username: UserName,
    /// The token's `iss`.
    pub issuer: String,
    /// The token's `sub`, if any (for logs).
    pub subject: Option<String>,
}

/// Checks bearer tokens against the configured issuers. Build it once at
/// start-up and share it (`Arc`) between sessions.
pub struct TokenValidator {
    issuers: Vec<Issuer>,
    /// The RFC 7628 error challenge sent for every refused token.
    error_challenge: Vec<u8>,
}

impl std::fmt::Debug for TokenValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.issuers.iter().map(|i| i.issuer.as_str()).collect();
        f.debug_struct("TokenValidator").field("issuers", &names).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct PeekHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Deserialize)]
struct PeekClaims {
    iss: String,
}

fn peek<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, TokenError> {
    let json = B64URL.decode(part).map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)
}

impl TokenValidator {
    /// Builds the validator: checks the configuration, reads JWKS files and
    /// secrets now (so mistakes stop start-up); JWKS URLs are fetched on
    /// first use (or by [`TokenValidator::prefetch`]).
    pub fn new(cfg: &OAuthConfig) -> Result<Self, OAuthError> {
        cfg.check().map_err(OAuthError::Config)?;
        if !cfg.enabled() {
            return Err(OAuthError::Config("no [[oauth.issuer]] is configured".into()));
        }
        if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
            return Err(OAuthError::NoCryptoProvider);
        }
        let mut issuers = Vec::with_capacity(cfg.issuers.len());
        for i in &cfg.issuers {
            let roots = i.ca_file.as_deref().map(load_ca_file).transpose()?;
            let source = match (&i.jwks_file, &i.jwks_url) {
                (Some(path), _) => JwksSource::File(path.clone()),
                (None, Some(url)) => {
                    JwksSource::Url { url: url.as_str().to_owned(), agent: http_agent(roots.as_ref()) }
                }
                // check() guarantees one of the two.
                (None, None) => return Err(OAuthError::Config(format!("`{}` has no JWKS", i.issuer))),
            };
            let jwks = Jwks::new(&i.issuer, source);
            jwks.load_file_now()?;
            let introspection = match (&i.introspection_url, &i.introspection_client_id, &i.introspection_client_secret)
            {
                (Some(url), Some(id), Some(secret)) => {
                    let secret = secret.load()?;
                    let trimmed = secret.trim_ascii();
                    let pair = Zeroizing::new(format!("{}:{}", form_encode(id.as_bytes()), form_encode(trimmed)));
                    let b64 = base64::engine::general_purpose::STANDARD.encode(pair.as_bytes());
                    Some(Introspection {
                        url: url.as_str().to_owned(),
                        agent: http_agent(roots.as_ref()),
                        authorization: Zeroizing::new(format!("Basic {b64}")),
                        permits: tokio::sync::Semaphore::new(MAX_PARALLEL_INTROSPECTIONS),
                    })
                }
                _ => None,
            };
            issuers.push(Issuer {
                issuer: i.issuer.clone(),
                audiences: i.audiences.clone(),
                algorithms: i.algorithms.iter().map(|a| a.0).collect(),
                username_claim: i.username_claim.clone(),
                leeway: i.leeway_secs,
                jwks,
                introspection,
            });
        }
        let mut err = Map::new();
        err.insert("status".into(), "invalid_token".into());
        err.insert("schemes".into(), "bearer".into());
        if let Some(scope) = &cfg.scope {
            err.insert("scope".into(), scope.as_str().into());
        }
        if let Some(url) = &cfg.openid_configuration {
            err.insert("openid-configuration".into(), url.as_str().into());
        }
        let error_challenge = Value::Object(err).to_string().into_bytes();
        Ok(TokenValidator { issuers, error_challenge })
    }

    /// Loads the keys of every URL issuer now (e.g. at start-up, so a
    /// misconfigured URL shows in the log before the first login).
    pub async fn prefetch(&self) {
        for i in &self.issuers {
            if i.jwks.stale().await {
                i.jwks.refresh(false).await;
            }
        }
    }

    /// The RFC 7628 error JSON sent as the last challenge of a failed login.
    pub fn error_challenge(&self) -> &[u8] {
        &self.error_challenge
    }

    /// Checks a bearer token (see the module documentation for the rules).
    pub async fn validate(&self, token: &str) -> Result<ValidatedToken, TokenError> {
        if token.is_empty()
            || token.len() > MAX_TOKEN_LEN
            || !token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if sig.is_empty() {
            return Err(TokenError::Malformed);
        }
        // Unverified peeks, only to route the token to an issuer and key;
        // everything is checked again after the signature.
        let PeekHeader { alg, kid } = peek(header)?;
        let PeekClaims { iss } = peek(payload)?;
        let issuer = self.issuers.iter().find(|i| i.issuer == iss).ok_or(TokenError::UnknownIssuer)?;
        let alg = issuer
            .algorithms
            .iter()
            .copied()
            .find(|a| algorithm_name(*a) == alg)
            // Attacker-chosen text goes to the log: keep it short and tame.
            .ok_or_else(|| {
                TokenError::AlgorithmNotAllowed(alg.chars().filter(char::is_ascii_alphanumeric).take(16).collect())
            })?;
        let key = issuer.jwks.key_for(kid.as_deref(), alg).await?;

        let mut v = Validation::new(alg);
        v.leeway = issuer.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.validate_aud = true;
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.set_issuer(&[issuer.issuer.as_str()]);
        v.set_audience(&issuer.audiences);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v).map_err(|e| map_jwt_error(&e, alg))?;
        let claims = data.claims;
        if data.header.alg != alg {
            return Err(TokenError::AlgorithmNotAllowed(algorithm_name(data.header.alg).into()));
        }
        // Defence in depth: a single string issuer, exactly ours.
        if claims.get("iss").and_then(Value::as_str) != Some(issuer.issuer.as_str()) {
            return Err(TokenError::WrongIssuer);
        }
        let username = user_name_claim(&claims, &issuer.username_claim)?;
        if let Some(intro) = &issuer.introspection {
            intro.check(token, &issuer.issuer, issuer.leeway).await?;
        }
        Ok(ValidatedToken {
            username,
            issuer: issuer.issuer.clone(),
            subject: claims.get("sub").and_then(Value::as_str).map(str::to_owned),
        })
    }

    #[cfg(test)]
    fn set_min_refresh(&mut self, d: Duration) {
        for i in &mut self.issuers {
            i.jwks.min_refresh = d;
        }
    }
}

fn user_name_claim(claims: &Map<String, Value>, claim: &str) -> Result<UserName, TokenError> {
    let value = claims.get(claim).and_then(Value::as_str).ok_or_else(|| TokenError::NoUserName(claim.into()))?;
    if claim == "email" {
        let verified = match claims.get("email_verified") {
            None => true,
            Some(Value::Bool(b)) => *b,
            // Some issuers (e.g. Cognito) send the flag as a string; only
            // exactly "true" is true.
            Some(Value::String(s)) => s == "true",
            Some(_) => false,
        };
        if !verified {
            return Err(TokenError::EmailNotVerified);
        }
    }
    UserName::parse(value).map_err(|_| TokenError::NoUserName(claim.into()))
}

// ---------------------------------------------------------------------------
// SASL mechanisms
// ---------------------------------------------------------------------------

/// Starts `OAUTHBEARER` or `XOAUTH2` with `validator`; `None` for other names.
pub fn start(name: &str, validator: &Arc<TokenValidator>) -> Option<Box<dyn Mechanism>> {
    match name {
        "OAUTHBEARER" => Some(Box::new(OAuthBearer::new(validator.clone()))),
        "XOAUTH2" => Some(Box::new(XOAuth2::new(validator.clone()))),
        _ => None,
    }
}

/// Splits `key=value^A...^A` pairs (the part after the first `^A` of
/// OAUTHBEARER, the whole of XOAUTH2) into (key, value); the list must end
/// with an empty pair (`^A^A`).
fn kv_pairs(s: &str) -> Result<Vec<(&str, &str)>, &'static str> {
    let Some(body) = s.strip_suffix('\x01') else {
        return Err("message must end with ^A");
    };
    let mut out = Vec::new();
    if body.is_empty() {
        return Ok(out);
    }
    let Some(body) = body.strip_suffix('\x01') else {
        return Err("message must end with ^A^A");
    };
    for pair in body.split('\x01') {
        let (k, v) = pair.split_once('=').ok_or("key=value expected")?;
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err("bad key");
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err("duplicate key");
        }
        out.push((k, v));
    }
    Ok(out)
}

/// The token of an `auth` value: `Bearer` (any case), spaces, b64token.
fn bearer_token(auth: &str) -> Result<&str, &'static str> {
    let (scheme, token) = auth.split_once(' ').ok_or("auth must be `Bearer <token>`")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("only the Bearer scheme is supported");
    }
    let token = token.trim_start_matches(' ');
    let body = token.trim_end_matches('=');
    let ok = !body.is_empty()
        && body.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/'));
    if !ok {
        return Err("bearer token has characters outside b64token");
    }
    Ok(token)
}

/// RFC 5801 saslname (shared with SCRAM); an empty name is refused.
fn decode_saslname(s: &str) -> Result<String, &'static str> {
    match crate::scram::unescape_saslname(s) {
        Some(name) if !name.is_empty() => Ok(name),
        Some(_) => Err("empty authzid"),
        None => Err("bad escape in authzid"),
    }
}

/// Parses an OAUTHBEARER client response: `gs2-header ^A *(kv ^A) ^A`.
/// Returns the authzid (if any) and the bearer token.
fn parse_oauthbearer(msg: &[u8]) -> Result<(Option<String>, &str), &'static str> {
    let s = std::str::from_utf8(msg).map_err(|_| "OAUTHBEARER message is not UTF-8")?;
    let mut gs2 = s.splitn(3, ',');
    let (Some(flag), Some(authz), Some(rest)) = (gs2.next(), gs2.next(), gs2.next()) else {
        return Err("OAUTHBEARER message needs a GS2 header");
    };
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err("OAUTHBEARER does not support channel binding"),
        _ => return Err("bad GS2 channel-binding flag"),
    }
    let authz = match authz {
        "" => None,
        a => Some(decode_saslname(a.strip_prefix("a=").ok_or("bad GS2 authzid")?)?),
    };
    let rest = rest.strip_prefix('\x01').ok_or("GS2 header must be followed by ^A")?;
    let pairs = kv_pairs(rest)?;
    let auth = pairs.iter().find(|(k, _)| *k == "auth").map(|(_, v)| *v).ok_or("missing auth=")?;
    Ok((authz, bearer_token(auth)?))
}

/// Parses an XOAUTH2 client response: `user=U ^A auth=Bearer T ^A ^A`.
fn parse_xoauth2(msg: &[u8]) -> Result<(String, &str), &'static str> {
    let s = std::str::from_utf8(msg).map_err(|_| "XOAUTH2 message is not UTF-8")?;
    let pairs = kv_pairs(s)?;
    let user = pairs.iter().find(|(k, _)| *k == "user").map(|(_, v)| *v).ok_or("missing user=")?;
    let auth = pairs.iter().find(|(k, _)| *k == "auth").map(|(_, v)| *v).ok_or("missing auth=")?;
    if user.is_empty() {
        return Err("empty user=");
    }
    Ok((user.to_owned(), bearer_token(auth)?))
}

/// Validates the token and looks the user up. The error carries the user
/// name to report (the token's, or the claimed one).
async fn login(
    validator: &TokenValidator,
    ctx: &SaslContext<'_>,
    mechanism: &'static str,
    claimed: Option<&str>,
    token: &str,
) -> Result<UserRecord, (AuthFailure, Option<String>)> {
    let valid = match validator.validate(token).await {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(mechanism, reason = %e, "bearer token refused");
            return Err((e.auth_failure(), claimed.map(str::to_owned)));
        }
    };
    let name = valid.username;
    if let Some(c) = claimed {
        if !c.eq_ignore_ascii_case(name.as_str()) {
            tracing::info!(mechanism, token_user = %name, "bearer token is for another user than the one named");
            return Err((AuthFailure::BadPassword, Some(c.to_owned())));
        }
    }
    // An account that refuses logins answers exactly as an invalid token
    // does: the failure is reported for the name the client gave (none
    // for OAUTHBEARER without authzid), as for an invalid token, so the
    // final reply does not depend on the token being valid.
    let refused = |reason: AuthFailure| {
        tracing::info!(mechanism, user = %name, reason = reason.reason(), "valid bearer token for a refused account");
        Err((reason, claimed.map(str::to_owned)))
    };
    if (ctx.locked)(name.as_str()) {
        return refused(AuthFailure::Locked);
    }
    match ctx.auth.mail().store().user(&name).await {
        Ok(Some(r)) => match ctx.auth.account_refusal(&r) {
            Some(reason) => refused(reason),
            None => {
                tracing::debug!(mechanism, issuer = %valid.issuer, user = %name, "bearer token accepted");
                Ok(r)
            }
        },
        Ok(None) => Err((AuthFailure::UnknownUser, Some(name.to_string()))),
        Err(e) => {
            tracing::error!(error = %e, "user lookup failed");
            Err((AuthFailure::Temporary, Some(name.to_string())))
        }
    }
}

enum BearerState {
    Start,
    /// The error challenge was sent; the client's dummy response ends it.
    AwaitErrorAck {
        reason: AuthFailure,
        user: Option<String>,
    },
    Done,
}

/// The end of a failed login: immediate for temporary trouble, otherwise
/// the RFC 7628 error challenge first.
fn refuse(validator: &TokenValidator, state: &mut BearerState, reason: AuthFailure, user: Option<String>) -> Step {
    if reason == AuthFailure::Temporary {
        return Step::Failure { reason, user };
    }
    *state = BearerState::AwaitErrorAck { reason, user };
    Step::Challenge(validator.error_challenge().to_vec())
}

/// SASL OAUTHBEARER (RFC 7628). Host and port are ignored; channel binding
/// (`p=`) is refused; an authzid (`a=`), if sent, must name the token's user.
pub struct OAuthBearer {
    validator: Arc<TokenValidator>,
    state: BearerState,
}

impl OAuthBearer {
    pub fn new(validator: Arc<TokenValidator>) -> Self {
        Self { validator, state: BearerState::Start }
    }
}

/// Splits a client's first response into (named user, token).
type ParseBearer = fn(&[u8]) -> Result<(Option<String>, &str), &'static str>;

/// The exchange both bearer mechanisms share: the first response carries the
/// token (parsed by `parse` into an optional named user and the token); a
/// refusal sends the RFC 7628 error challenge, and the client's
/// acknowledgement (`ack`) is answered with the failure.
async fn bearer_step(
    validator: &TokenValidator,
    state: &mut BearerState,
    ctx: &SaslContext<'_>,
    response: Option<&[u8]>,
    name: &'static str,
    parse: ParseBearer,
    ack: &[u8],
) -> Step {
    match std::mem::replace(state, BearerState::Done) {
        BearerState::Start => {
            let Some(msg) = response else {
                *state = BearerState::Start;
                return Step::Challenge(Vec::new());
            };
            let (user, token) = match parse(msg) {
                Ok(p) => p,
                Err(why) => return Step::Malformed(why),
            };
            match login(validator, ctx, name, user.as_deref(), token).await {
                Ok(record) => Step::Success(record),
                Err((reason, user)) => refuse(validator, state, reason, user),
            }
        }
        BearerState::AwaitErrorAck { reason, user } => {
            if response != Some(ack) {
                tracing::debug!(mechanism = name, "client did not acknowledge the error challenge as specified");
            }
            Step::Failure { reason, user }
        }
        BearerState::Done => Step::Malformed("exchange already finished"),
    }
}

/// A bearer exchange abandoned after the error challenge still fails.
fn bearer_abandoned(state: &BearerState) -> Option<(AuthFailure, Option<String>)> {
    match state {
        BearerState::AwaitErrorAck { reason, user } => Some((*reason, user.clone())),
        _ => None,
    }
}

#[async_trait]
impl Mechanism for OAuthBearer {
    fn name(&self) -> &'static str {
        "OAUTHBEARER"
    }

    async fn step(&mut self, ctx: &SaslContext<'_>, response: Option<&[u8]>) -> Step {
        // RFC 7628 3.2.3: the client answers the error with a single ^A.
        bearer_step(&self.validator, &mut self.state, ctx, response, "OAUTHBEARER", parse_oauthbearer, b"\x01").await
    }

    fn abandoned(&self) -> Option<(AuthFailure, Option<String>)> {
        bearer_abandoned(&self.state)
    }
}

/// SASL XOAUTH2 (Google, Microsoft): `user=` is required and must name the
/// token's user (case-insensitive).
pub struct XOAuth2 {
    validator: Arc<TokenValidator>,
    state: BearerState,
}

impl XOAuth2 {
    pub fn new(validator: Arc<TokenValidator>) -> Self {
        Self { validator, state: BearerState::Start }
    }
}

#[async_trait]
impl Mechanism for XOAuth2 {
    fn name(&self) -> &'static str {
        "XOAUTH2"
    }

    async fn step(&mut self, ctx: &SaslContext<'_>, response: Option<&[u8]>) -> Step {
        // The client answers the error with an empty response.
        fn parse(msg: &[u8]) -> Result<(Option<String>, &str), &'static str> {
            parse_xoauth2(msg).map(|(user, token)| (Some(user), token))
        }
        bearer_step(&self.validator, &mut self.state, ctx, response, "XOAUTH2", parse, b"").await
    }

    fn abandoned(&self) -> Option<(AuthFailure, Option<String>)> {
        bearer_abandoned(&self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    const ISS: &str = "https://idp.example.org/realms/mail";
    const AUD: &str = "pop3connex";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    /// A test signing key with its public JWK.
    #[derive(Clone)]
    struct TestKey {
        alg: Algorithm,
        kid: String,
        enc: EncodingKey,
        jwk: Value,
        /// Raw public key material (for the HMAC confusion test).
        public: Vec<u8>,
    }

    /// Pure-Rust randomness for RSA key generation (rsa's RNG traits over
    /// the OS generator).
    struct OsRandom;

    impl rsa::rand_core::TryRng for OsRandom {
        type Error = std::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            let mut b = [0u8; 4];
            self.try_fill_bytes(&mut b)?;
            Ok(u32::from_le_bytes(b))
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            let mut b = [0u8; 8];
            self.try_fill_bytes(&mut b)?;
            Ok(u64::from_le_bytes(b))
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            getrandom::getrandom(dst).expect("OS RNG");
            Ok(())
        }
    }

    impl rsa::rand_core::TryCryptoRng for OsRandom {}

    /// RSA-2048 generation is slow in debug builds: once per test binary.
    fn rsa_material() -> &'static (Vec<u8>, Vec<u8>, Vec<u8>) {
        static KEY: OnceLock<(Vec<u8>, Vec<u8>, Vec<u8>)> = OnceLock::new();
        KEY.get_or_init(|| {
            use rsa::pkcs1::EncodeRsaPrivateKey;
            use rsa::traits::PublicKeyParts;
            let key = rsa::PrivateKey::new(&mut OsRandom, 2048).unwrap();
            let der = key.to_pkcs1_der().unwrap().as_bytes().to_vec();
            (der, key.n_bytes().to_vec(), key.e_bytes().to_vec())
        })
    }

    fn rsa_key(kid: &str) -> TestKey {
        let (der, n, e) = rsa_material();
        TestKey {
            alg: Algorithm::RS256,
            kid: kid.into(),
            enc: EncodingKey::from_rsa_der(der),
            jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                        "n": B64.encode(n), "e": B64.encode(e)}),
            public: n.clone(),
        }
    }

    fn ec_key(kid: &str) -> TestKey {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw().to_vec();
        assert_eq!(raw.len(), 65);
        TestKey {
            alg: Algorithm::ES256,
            kid: kid.into(),
            enc: EncodingKey::from_ec_der(&kp.serialize_der()),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid,
                        "x": B64.encode(&raw[1..33]), "y": B64.encode(&raw[33..])}),
            public: raw,
        }
    }

    fn jwks(keys: &[&TestKey]) -> String {
        json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
    }

    fn claims(email: &str) -> Value {
        json!({"iss": ISS, "aud": [AUD, "other"], "sub": "0f3c-77", "email": email,
               "email_verified": true, "iat": now(), "exp": now() + 300})
    }

    fn sign(key: &TestKey, claims: &Value) -> String {
        let mut h = Header::new(key.alg);
        h.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&h, claims, &key.enc).unwrap()
    }

    fn raw_token(header: &Value, claims: &Value, sig: &str) -> String {
        format!("{}.{}.{sig}", B64.encode(header.to_string()), B64.encode(claims.to_string()))
    }

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let d = std::env::temp_dir().join(format!("p3x-oauth-{name}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(toml_text: &str) -> Result<OAuthConfig, String> {
        #[derive(Deserialize)]
        struct Root {
            oauth: OAuthConfig,
        }
        toml::from_str::<Root>(toml_text).map(|r| r.oauth).map_err(|e| e.to_string())
    }

    fn file_validator(dir: &Dir, keys: &[&TestKey], extra: &str) -> TokenValidator {
        let path = dir.0.join("jwks.json");
        std::fs::write(&path, jwks(keys)).unwrap();
        let cfg = config(&format!(
            "[[oauth.issuer]]\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\njwks_file = \"{}\"\n{extra}",
            path.display()
        ))
        .unwrap();
        TokenValidator::new(&cfg).unwrap()
    }

    #[test]
    fn config_defaults_and_refusals() {
        let cfg = config(&format!(
            "[oauth]\nscope = \"email\"\n[[oauth.issuer]]\nissuer = \"{ISS}\"\naudiences = [\"a\"]\n\
             jwks_url = \"https://idp.example.org/certs\"\n"
        ))
        .unwrap();
        let i = &cfg.issuers[0];
        assert_eq!(i.algorithms, default_algorithms());
        assert_eq!((i.username_claim.as_str(), i.leeway_secs), ("email", 60));
        assert!(cfg.enabled() && cfg.check().is_ok());
        assert!(!OAuthConfig::default().enabled());

        let base = format!("[[oauth.issuer]]\nissuer = \"{ISS}\"\naudiences = [\"a\"]\njwks_file = \"k.json\"\n");
        for (extra, expect) in [
            ("algorithms = [\"none\"]", "never accepted"),
            ("algorithms = [\"HS256\"]", "never accepted"),
            ("algorithms = [\"RS1\"]", "unknown algorithm"),
            ("leeway_secs = 301", "between 0 and 300"),
            ("bogus = 1", "bogus"),
            ("introspection_url = \"http://idp/introspect\"", "plain HTTP is refused"),
            ("introspection_url = \"https://u:p@idp/introspect\"", "credentials"),
            ("introspection_client_secret = \"hunter2\"", "literal secrets"),
        ] {
            let e = config(&format!("{base}{extra}\n")).unwrap_err();
            assert!(e.contains(expect), "{extra}: {e}");
        }
        let e = config(&base.replace("jwks_file = \"k.json\"", "jwks_url = \"http://idp/certs\"")).unwrap_err();
        assert!(e.contains("plain HTTP"), "{e}");

        for (toml_text, expect) in [
            (format!("{base}jwks_url = \"https://idp/certs\"\n"), "exactly one"),
            (base.replace("jwks_file = \"k.json\"\n", ""), "exactly one"),
            (format!("{base}{base}"), "twice"),
            (base.replace("[\"a\"]", "[]"), "audiences"),
            (format!("{base}algorithms = []\n"), "algorithms"),
            (format!("{base}introspection_client_id = \"x\"\n"), "set together"),
        ] {
            let e = config(&toml_text).unwrap().check().unwrap_err();
            assert!(e.contains(expect), "{toml_text}: {e}");
        }
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let mut cfg = config(&format!(
            "[[oauth.issuer]]\nissuer = \"{ISS}\"\naudiences = [\"a\"]\njwks_file = \"k.json\"\nca_file = \"/abs/ca.pem\"\n\
             introspection_url = \"https://idp/i\"\nintrospection_client_id = \"c\"\n\
             introspection_client_secret = \"file:s.txt\"\n"
        ))
        .unwrap();
        cfg.resolve_paths(Path::new("/etc/p3x"));
        let i = &cfg.issuers[0];
        assert_eq!(i.jwks_file.as_deref(), Some(Path::new("/etc/p3x/k.json")));
        assert_eq!(i.ca_file.as_deref(), Some(Path::new("/abs/ca.pem")));
        assert_eq!(i.introspection_client_secret, Some(SecretRef::File("/etc/p3x/s.txt".into())));
    }

    #[tokio::test]
    async fn valid_rs256_and_es256_tokens() {
        let dir = Dir::new("valid");
        let (rsa, ec) = (rsa_key("rsa1"), ec_key("ec1"));
        let v = file_validator(&dir, &[&rsa, &ec], "");
        let ok = v.validate(&sign(&rsa, &claims("Alice@Example.org"))).await.unwrap();
        assert_eq!(ok.username.as_str(), "alice@example.org");
        assert_eq!((ok.issuer.as_str(), ok.subject.as_deref()), (ISS, Some("0f3c-77")));
        let ok = v.validate(&sign(&ec, &claims("bob@example.org"))).await.unwrap();
        assert_eq!(ok.username.as_str(), "bob@example.org");
        // A single string audience is fine too.
        let mut c = claims("bob@example.org");
        c["aud"] = json!(AUD);
        assert!(v.validate(&sign(&ec, &c)).await.is_ok());
    }

    #[tokio::test]
    async fn time_claims_with_leeway() {
        let dir = Dir::new("time");
        let key = ec_key("ec1");
        let v = file_validator(&dir, &[&key], "leeway_secs = 60");
        let with = |name: &str, value: Value| {
            let mut c = claims("alice@example.org");
            c[name] = value;
            sign(&key, &c)
        };
        assert_eq!(v.validate(&with("exp", json!(now() - 120))).await, Err(TokenError::Expired));
        assert!(v.validate(&with("exp", json!(now() - 30))).await.is_ok(), "inside the leeway");
        assert_eq!(v.validate(&with("nbf", json!(now() + 600))).await, Err(TokenError::NotYetValid));
        assert!(v.validate(&with("nbf", json!(now() + 30))).await.is_ok(), "inside the leeway");
        // Wrongly typed time claims are refused, not ignored.
        assert_eq!(v.validate(&with("exp", json!("9999999999"))).await, Err(TokenError::BadClaim("exp".into())));
        assert_eq!(v.validate(&with("nbf", json!("9999999999"))).await, Err(TokenError::BadClaim("nbf".into())));
        let mut c = claims("alice@example.org");
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(v.validate(&sign(&key, &c)).await, Err(TokenError::BadClaim("exp".into())));
    }

    #[tokio::test]
    async fn issuer_and_audience() {
        let dir = Dir::new("aud");
        let key = rsa_key("rsa1");
        let v = file_validator(&dir, &[&key], "");
        let mut c = claims("alice@example.org");
        c["aud"] = json!(["someone-else"]);
        assert_eq!(v.validate(&sign(&key, &c)).await, Err(TokenError::WrongAudience));
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(v.validate(&sign(&key, &c)).await, Err(TokenError::BadClaim("aud".into())));
        let mut c = claims("alice@example.org");
        c["iss"] = json!("https://evil.example");
        assert_eq!(v.validate(&sign(&key, &c)).await, Err(TokenError::UnknownIssuer));
        c["iss"] = json!(format!("{ISS}/"));
        assert_eq!(v.validate(&sign(&key, &c)).await, Err(TokenError::UnknownIssuer), "no normalisation");
        c["iss"] = json!([ISS]);
        assert_eq!(v.validate(&sign(&key, &c)).await, Err(TokenError::Malformed));
    }

    #[tokio::test]
    async fn alg_none_and_hmac_confusion_are_refused() {
        let dir = Dir::new("alg");
        let key = rsa_key("rsa1");
        let v = file_validator(&dir, &[&key], "");
        let c = claims("alice@example.org");
        let none = json!({"alg": "none", "kid": "rsa1"});
        assert_eq!(v.validate(&raw_token(&none, &c, "")).await, Err(TokenError::Malformed));
        assert_eq!(
            v.validate(&raw_token(&none, &c, "AAAA")).await,
            Err(TokenError::AlgorithmNotAllowed("none".into()))
        );
        assert_eq!(
            v.validate(&raw_token(&json!({"alg": "NONE"}), &c, "AAAA")).await,
            Err(TokenError::AlgorithmNotAllowed("NONE".into()))
        );
        // HS256 keyed with the public key (classic algorithm confusion),
        // in the forms a confused verifier might use.
        let jwk_text = key.jwk.to_string();
        for secret in [&key.public[..], jwk_text.as_bytes()] {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("rsa1".into());
            let t = jsonwebtoken::encode(&h, &c, &EncodingKey::from_secret(secret).unwrap()).unwrap();
            assert_eq!(v.validate(&t).await, Err(TokenError::AlgorithmNotAllowed("HS256".into())));
        }
        // An allowed algorithm of the wrong type for the named key.
        let ec = ec_key("rsa1");
        assert_eq!(v.validate(&sign(&ec, &c)).await, Err(TokenError::UnknownKey));
        // Allowed by the key but not by the issuer's list.
        let v = file_validator(&dir, &[&key, &ec_key("ec1")], "algorithms = [\"RS256\"]");
        assert_eq!(v.validate(&sign(&ec_key("ec1"), &c)).await, Err(TokenError::AlgorithmNotAllowed("ES256".into())));
        // A JWK pinned to RS256 refuses PS256 even though both are RSA.
        let v = file_validator(&dir, &[&key], "algorithms = [\"RS256\", \"PS256\"]");
        let mut h = Header::new(Algorithm::PS256);
        h.kid = Some("rsa1".into());
        let t = jsonwebtoken::encode(&h, &c, &key.enc).unwrap();
        assert_eq!(v.validate(&t).await, Err(TokenError::UnknownKey));
    }

    #[tokio::test]
    async fn tampered_tokens_are_refused() {
        let dir = Dir::new("tamper");
        let (rsa, ec) = (rsa_key("rsa1"), ec_key("ec1"));
        let v = file_validator(&dir, &[&rsa, &ec], "");
        for key in [&rsa, &ec] {
            let t = sign(key, &claims("alice@example.org"));
            let (head, sig) = t.rsplit_once('.').unwrap();
            let mid = sig.len() / 2;
            let flipped = if &sig[mid..=mid] == "A" { "B" } else { "A" };
            let bad_sig = format!("{head}.{}{flipped}{}", &sig[..mid], &sig[mid + 1..]);
            assert_eq!(v.validate(&bad_sig).await, Err(TokenError::BadSignature), "{:?}", key.alg);
            // Same signature over different claims.
            let mut parts: Vec<&str> = t.split('.').collect();
            let forged = B64.encode(claims("mallory@example.org").to_string());
            parts[1] = &forged;
            assert_eq!(v.validate(&parts.join(".")).await, Err(TokenError::BadSignature));
            // Signed by another key with the same kid.
            let other = if key.alg == Algorithm::ES256 { ec_key("ec1") } else { ec_key("x") };
            if key.alg == Algorithm::ES256 {
                assert_eq!(v.validate(&sign(&other, &claims("a@b.c"))).await, Err(TokenError::BadSignature));
            }
        }
        for junk in ["", "abc", "a.b", "a.b.c.d.e", "a b.c.d", &"A".repeat(MAX_TOKEN_LEN + 1)] {
            assert_eq!(v.validate(junk).await, Err(TokenError::Malformed), "{junk:.20}");
        }
    }

    #[tokio::test]
    async fn unknown_kid_rereads_the_file_once() {
        let dir = Dir::new("kid");
        let (k1, k2) = (ec_key("k1"), ec_key("k2"));
        let v = file_validator(&dir, &[&k1], "");
        assert_eq!(v.validate(&sign(&k2, &claims("a@b.c"))).await, Err(TokenError::UnknownKey));
        // Rotation: the file changes, the new key is picked up at once.
        std::fs::write(dir.0.join("jwks.json"), jwks(&[&k1, &k2])).unwrap();
        assert!(v.validate(&sign(&k2, &claims("a@b.c"))).await.is_ok());
        // A broken file keeps the previous keys, and is not re-read per
        // login until it changes again.
        std::fs::write(dir.0.join("jwks.json"), "{not json").unwrap();
        assert!(v.validate(&sign(&k1, &claims("a@b.c"))).await.is_ok());
        assert!(!v.issuers[0].jwks.stale().await);
        std::fs::write(dir.0.join("jwks.json"), jwks(&[&k1, &k2])).unwrap();
        assert!(v.issuers[0].jwks.stale().await);
        // Without a kid, only an unambiguous key is used.
        let mut h = Header::new(Algorithm::ES256);
        h.kid = None;
        let t = jsonwebtoken::encode(&h, &claims("a@b.c"), &k1.enc).unwrap();
        assert_eq!(v.validate(&t).await, Err(TokenError::UnknownKey));
        let single = file_validator(&Dir::new("kid1"), &[&k1], "");
        assert!(single.validate(&t).await.is_ok());
    }

    #[tokio::test]
    async fn user_name_claim_rules() {
        let dir = Dir::new("claim");
        let key = ec_key("ec1");
        let v = file_validator(&dir, &[&key], "");
        let mut c = claims("alice@example.org");
        c["email_verified"] = json!(false);
        assert_eq!(v.validate(&sign(&key, &c)).await, Err(TokenError::EmailNotVerified));
        c["email_verified"] = json!("false");
        assert_eq!(v.validate(&sign(&key, &c)).await, Err(TokenError::EmailNotVerified));
        c.as_object_mut().unwrap().remove("email");
        // No fallback to `sub`.
        c["sub"] = json!("alice");
        assert_eq!(v.validate(&sign(&key, &c)).await, Err(TokenError::NoUserName("email".into())));
        c["email"] = json!("not a valid name!");
        c["email_verified"] = json!(true);
        assert_eq!(v.validate(&sign(&key, &c)).await, Err(TokenError::NoUserName("email".into())));
        let v = file_validator(&Dir::new("claim2"), &[&key], "username_claim = \"preferred_username\"");
        c["preferred_username"] = json!("Carol");
        assert_eq!(v.validate(&sign(&key, &c)).await.unwrap().username.as_str(), "carol");
    }

    #[test]
    fn email_verified_counts_only_boolean_true_or_the_string_true() {
        let verdict = |flag: Option<Value>| {
            let mut c = json!({"email": "alice@example.org"});
            if let Some(f) = flag {
                c["email_verified"] = f;
            }
            user_name_claim(c.as_object().unwrap(), "email")
        };
        for yes in [json!(true), json!("true")] {
            assert_eq!(verdict(Some(yes.clone())).unwrap().as_str(), "alice@example.org", "{yes}");
        }
        for no in [
            json!(false),
            json!("false"),
            json!("False"),
            json!("FALSE"),
            json!("True"),
            json!("0"),
            json!("1"),
            json!("yes"),
            json!(""),
            json!(" true"),
            json!(1),
            json!(0),
            json!(null),
            json!([true]),
            json!({"value": true}),
        ] {
            assert_eq!(verdict(Some(no.clone())), Err(TokenError::EmailNotVerified), "{no}");
        }
        // Absent: accepted (issuers such as Entra ID do not send it).
        assert!(verdict(None).is_ok());
        // Only the email claim is subject to the flag.
        let c = json!({"preferred_username": "carol", "email_verified": "0"});
        assert_eq!(user_name_claim(c.as_object().unwrap(), "preferred_username").unwrap().as_str(), "carol");
    }

    #[test]
    fn jwks_parsing_skips_what_is_not_a_signature_key() {
        let ec = ec_key("ec1");
        let (_, n, e) = rsa_material();
        let small = json!({"kty": "RSA", "kid": "small", "n": B64.encode(&n[..128]), "e": B64.encode(e)});
        let zero = json!({"kty": "RSA", "kid": "zero", "n": "AAAA", "e": B64.encode(e)});
        let empty = json!({"kty": "RSA", "kid": "empty", "n": "", "e": ""});
        let doc = json!({"keys": [
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": B64.encode(n), "e": B64.encode(e)},
            {"kty": "RSA", "kid": "oaep", "alg": "RSA-OAEP", "n": B64.encode(n), "e": B64.encode(e)},
            {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"},
            {"kty": "EC", "kid": "mismatch", "crv": "P-256", "alg": "ES384", "x": ec.jwk["x"], "y": ec.jwk["y"]},
            small,
            zero,
            empty,
            {"kty": "RSA", "kid": "no-n"},
            {"kid": "no-kty"},
            ec.jwk,
        ]});
        let keys = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.iter().map(|k| k.kid.as_deref().unwrap()).collect::<Vec<_>>(), ["ec1"]);
        assert!(parse_jwks(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).is_err());
        assert!(parse_jwks(b"[]").is_err());
    }

    #[test]
    fn cache_control_bounds() {
        assert_eq!(cache_ttl(None), DEFAULT_JWKS_TTL);
        assert_eq!(cache_ttl(Some("public, max-age=7200")), Duration::from_secs(7200));
        assert_eq!(cache_ttl(Some("max-age=5")), MIN_JWKS_TTL);
        assert_eq!(cache_ttl(Some("max-age=99999999")), MAX_JWKS_TTL);
        assert_eq!(cache_ttl(Some("no-cache")), MIN_JWKS_TTL);
        assert_eq!(cache_ttl(Some("private")), DEFAULT_JWKS_TTL);
        assert_eq!(cache_ttl(Some("max-age=abc")), DEFAULT_JWKS_TTL);
    }

    #[test]
    fn sasl_message_parsing() {
        let t = "eyJ.eyJ.sig";
        let ok = parse_oauthbearer(
            b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer eyJ.eyJ.sig\x01\x01",
        );
        assert_eq!(ok, Ok((Some("user@example.com".into()), t)));
        assert_eq!(parse_oauthbearer(b"y,,\x01auth=bearer  eyJ.eyJ.sig\x01\x01"), Ok((None, t)));
        assert_eq!(parse_oauthbearer(b"n,a=a=2Cb=3Dc,\x01auth=Bearer x\x01\x01").unwrap().0.as_deref(), Some("a,b=c"));
        for bad in [
            &b"p=tls-exporter,,\x01auth=Bearer x\x01\x01"[..],
            b"n,,auth=Bearer x\x01\x01",
            b"n,,\x01auth=Bearer x\x01",
            b"n,,\x01auth=Basic eA==\x01\x01",
            b"n,,\x01auth=Bearer \x01\x01",
            b"n,,\x01auth=Bearer a b\x01\x01",
            b"n,,\x01host=x\x01\x01",
            b"n,,\x01auth=Bearer x\x01auth=Bearer y\x01\x01",
            b"n,a=bad=escape,\x01auth=Bearer x\x01\x01",
            b"n,u=x,\x01auth=Bearer x\x01\x01",
            b"\xff,,\x01auth=Bearer x\x01\x01",
        ] {
            assert!(parse_oauthbearer(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_xoauth2(b"user=alice@example.org\x01auth=Bearer eyJ.eyJ.sig\x01\x01"),
            Ok(("alice@example.org".into(), t))
        );
        for bad in [
            &b"user=a\x01auth=Bearer x\x01"[..],
            b"auth=Bearer x\x01\x01",
            b"user=\x01auth=Bearer x\x01\x01",
            b"user=a\x01\x01",
        ] {
            assert!(parse_xoauth2(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn form_encoding_for_basic_auth() {
        assert_eq!(form_encode(b"my client:1/x y"), "my+client%3A1%2Fx+y");
        assert_eq!(form_encode(b"A-z_0.9*"), "A-z_0.9*");
    }

    #[test]
    fn error_challenge_is_rfc7628_json() {
        let dir = Dir::new("challenge");
        let v = file_validator(&dir, &[&ec_key("k")], "");
        let j: Value = serde_json::from_slice(v.error_challenge()).unwrap();
        assert_eq!(j, json!({"status": "invalid_token", "schemes": "bearer"}));
        let path = dir.0.join("jwks.json");
        let cfg = config(&format!(
            "[oauth]\nscope = \"email \\\"x\\\"\"\nopenid_configuration = \"https://idp/.well-known/openid-configuration\"\n\
             [[oauth.issuer]]\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\njwks_file = \"{}\"\n",
            path.display()
        ))
        .unwrap();
        let v = TokenValidator::new(&cfg).unwrap();
        let j: Value = serde_json::from_slice(v.error_challenge()).unwrap();
        assert_eq!(j["scope"], "email \"x\"");
        assert_eq!(j["openid-configuration"], "https://idp/.well-known/openid-configuration");
    }

    #[test]
    fn bad_jwks_file_stops_start_up() {
        let dir = Dir::new("badfile");
        let path = dir.0.join("jwks.json");
        std::fs::write(&path, r#"{"keys": []}"#).unwrap();
        let cfg = config(&format!(
            "[[oauth.issuer]]\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\njwks_file = \"{}\"\n",
            path.display()
        ))
        .unwrap();
        let e = TokenValidator::new(&cfg).unwrap_err().to_string();
        assert!(e.contains("no usable signature key"), "{e}");
        std::fs::remove_file(&path).unwrap();
        assert!(TokenValidator::new(&cfg).is_err());
    }

    // -- HTTPS: JWKS URL and introspection against a local test server --

    type Handler = Arc<dyn Fn(&str) -> (u16, String, Vec<u8>) + Send + Sync>;

    /// A one-request-per-connection HTTPS server on 127.0.0.1 with a
    /// certificate for `localhost` from a fresh local CA. Returns the port
    /// and the CA file.
    async fn https_server(dir: &Dir, handler: Handler) -> (u16, PathBuf) {
        use rustls_pki_types::pem::PemObject;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let generated = crate::tls::generate_local_ca("localhost").unwrap();
        let ca = dir.0.join("ca.pem");
        std::fs::write(&ca, &generated.ca_pem).unwrap();
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(generated.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(generated.key_pem.as_bytes()).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, handler) = (acceptor.clone(), handler.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    let head_end = loop {
                        let Ok(n) = tls.read(&mut buf).await else { return };
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                        if let Some(p) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&req[..head_end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    while req.len() < head_end + len {
                        let Ok(n) = tls.read(&mut buf).await else { return };
                        if n == 0 {
                            break;
                        }
                        req.extend_from_slice(&buf[..n]);
                    }
                    let (status, headers, body) = handler(&String::from_utf8_lossy(&req));
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.write_all(&body).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (port, ca)
    }

    #[tokio::test]
    async fn jwks_url_caching_rotation_and_failures() {
        let dir = Dir::new("url");
        let (k1, k2) = (ec_key("k1"), ec_key("k2"));
        let hits = Arc::new(AtomicUsize::new(0));
        let reply: Arc<Mutex<(u16, Vec<u8>)>> = Arc::new(Mutex::new((200, jwks(&[&k1]).into_bytes())));
        let handler: Handler = {
            let (hits, reply) = (hits.clone(), reply.clone());
            Arc::new(move |req: &str| {
                assert!(req.starts_with("GET /certs HTTP/1.1\r\n"), "{req}");
                hits.fetch_add(1, Ordering::SeqCst);
                let (status, body) = reply.lock().unwrap().clone();
                (status, "cache-control: public, max-age=5\r\n".into(), body)
            })
        };
        let (port, ca) = https_server(&dir, handler).await;
        let cfg = config(&format!(
            "[[oauth.issuer]]\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\n\
             jwks_url = \"https://localhost:{port}/certs\"\nca_file = \"{}\"\n",
            ca.display()
        ))
        .unwrap();
        let v = TokenValidator::new(&cfg).unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 0, "URL keys are fetched lazily");
        assert!(v.validate(&sign(&k1, &claims("a@b.c"))).await.is_ok());
        assert!(v.validate(&sign(&k1, &claims("a@b.c"))).await.is_ok());
        assert_eq!(hits.load(Ordering::SeqCst), 1, "cached (max-age 5 is raised to 60 s)");
        // Unknown kid right after a load: no refetch within the rate limit.
        assert_eq!(v.validate(&sign(&k2, &claims("a@b.c"))).await, Err(TokenError::UnknownKey));
        assert_eq!(hits.load(Ordering::SeqCst), 1, "rate-limited");

        // With a short limit: one refetch per unknown kid once it has passed.
        let mut v = TokenValidator::new(&cfg).unwrap();
        v.set_min_refresh(Duration::from_millis(300));
        assert!(v.validate(&sign(&k1, &claims("a@b.c"))).await.is_ok());
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(v.validate(&sign(&k2, &claims("a@b.c"))).await, Err(TokenError::UnknownKey));
        assert_eq!(hits.load(Ordering::SeqCst), 3, "one refresh for the unknown kid");
        assert_eq!(v.validate(&sign(&k2, &claims("a@b.c"))).await, Err(TokenError::UnknownKey));
        assert_eq!(v.validate(&sign(&k2, &claims("a@b.c"))).await, Err(TokenError::UnknownKey));
        assert_eq!(hits.load(Ordering::SeqCst), 3, "then rate-limited");

        // Same with no rate limit: rotation is picked up, failures keep the old keys.
        let mut v = TokenValidator::new(&cfg).unwrap();
        v.set_min_refresh(Duration::ZERO);
        assert!(v.validate(&sign(&k1, &claims("a@b.c"))).await.is_ok());
        *reply.lock().unwrap() = (200, jwks(&[&k1, &k2]).into_bytes());
        assert!(v.validate(&sign(&k2, &claims("a@b.c"))).await.is_ok(), "new kid after rotation");
        let k3 = ec_key("k3");
        *reply.lock().unwrap() = (500, b"oops".to_vec());
        assert_eq!(v.validate(&sign(&k3, &claims("a@b.c"))).await, Err(TokenError::UnknownKey));
        assert!(v.validate(&sign(&k2, &claims("a@b.c"))).await.is_ok(), "old keys kept after a 500");
        let mut huge = jwks(&[&k3]).into_bytes();
        huge.truncate(huge.len() - 2);
        huge.extend(std::iter::repeat_n(b' ', 1 << 20));
        huge.extend_from_slice(b"]}");
        *reply.lock().unwrap() = (200, huge);
        assert_eq!(v.validate(&sign(&k3, &claims("a@b.c"))).await, Err(TokenError::UnknownKey), "over 1 MiB");
        assert!(v.validate(&sign(&k1, &claims("a@b.c"))).await.is_ok());

        // Never loaded and the server fails: a temporary error.
        let v = TokenValidator::new(&cfg).unwrap();
        *reply.lock().unwrap() = (503, Vec::new());
        let e = v.validate(&sign(&k1, &claims("a@b.c"))).await.unwrap_err();
        assert!(matches!(e, TokenError::Unavailable(_)), "{e:?}");
        assert_eq!(e.auth_failure(), AuthFailure::Temporary);
    }

    #[tokio::test]
    async fn jwks_url_verifies_the_server_certificate() {
        let dir = Dir::new("url-ca");
        let k1 = ec_key("k1");
        let body = jwks(&[&k1]).into_bytes();
        let (port, _ca) = https_server(&dir, Arc::new(move |_: &str| (200, String::new(), body.clone()))).await;
        // Trusting the web PKI roots only: the local CA is refused.
        let cfg = config(&format!(
            "[[oauth.issuer]]\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\njwks_url = \"https://localhost:{port}/certs\"\n"
        ))
        .unwrap();
        let v = TokenValidator::new(&cfg).unwrap();
        assert!(matches!(v.validate(&sign(&k1, &claims("a@b.c"))).await, Err(TokenError::Unavailable(_))));
    }

    #[tokio::test]
    async fn introspection_must_say_active() {
        let dir = Dir::new("intro");
        let k1 = ec_key("k1");
        let active = Arc::new(Mutex::new(json!({"active": true, "iss": ISS})));
        let seen = Arc::new(Mutex::new(String::new()));
        let handler: Handler = {
            let (active, seen) = (active.clone(), seen.clone());
            Arc::new(move |req: &str| {
                *seen.lock().unwrap() = req.to_owned();
                (200, "content-type: application/json\r\n".into(), active.lock().unwrap().to_string().into_bytes())
            })
        };
        let (port, ca) = https_server(&dir, handler).await;
        let secret = dir.0.join("secret");
        std::fs::write(&secret, "s3cr:et\n").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let extra = format!(
            "ca_file = \"{}\"\nintrospection_url = \"https://localhost:{port}/introspect\"\n\
             introspection_client_id = \"pop3 connex\"\nintrospection_client_secret = \"file:{}\"\n",
            ca.display(),
            secret.display()
        );
        let v = file_validator(&dir, &[&k1], &extra);
        let token = sign(&k1, &claims("a@b.c"));
        assert!(v.validate(&token).await.is_ok());
        let req = seen.lock().unwrap().clone();
        assert!(req.starts_with("POST /introspect HTTP/1.1\r\n"), "{req}");
        let basic = base64::engine::general_purpose::STANDARD.encode("pop3+connex:s3cr%3Aet");
        assert!(req.to_ascii_lowercase().contains(&format!("authorization: basic {}", basic.to_ascii_lowercase())));
        assert!(req.contains(&format!("token={token}")), "the token is posted");
        *active.lock().unwrap() = json!({"active": false});
        assert_eq!(v.validate(&token).await, Err(TokenError::Inactive));
        *active.lock().unwrap() = json!({"active": "true"});
        assert_eq!(v.validate(&token).await, Err(TokenError::Inactive), "only JSON true counts");
        *active.lock().unwrap() = json!({"active": true, "iss": "https://other"});
        assert_eq!(v.validate(&token).await, Err(TokenError::WrongIssuer));
        // Local checks come first: an expired token is not even posted.
        *seen.lock().unwrap() = String::new();
        let mut c = claims("a@b.c");
        c["exp"] = json!(now() - 3600);
        assert_eq!(v.validate(&sign(&k1, &c)).await, Err(TokenError::Expired));
        assert!(seen.lock().unwrap().is_empty());
    }
}
