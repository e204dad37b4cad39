//! OAuth 2.0 bearer-token validation for the SASL `OAUTHBEARER` (RFC 7628)
//! and `XOAUTH2` logins (the exchanges are in `sasl::bearer`): JWT access
//! tokens checked locally against the issuer's published keys (JWKS,
//! [`jwks`]) and, optionally, against the issuer's RFC 7662 introspection
//! endpoint ([`introspection`]). The `[oauth]` configuration is in
//! [`crate::config::oauth`].
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
//! - The account must accept logins (checked by `sasl::bearer` with
//!   [`crate::auth::Authenticator::login_refusal`]): a locked-out, disabled
//!   or password-expired account is refused with the same error challenge
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
//! JWKS and introspection requests go through the shared hardened client
//! ([`crate::https`]): HTTPS only, no redirects, connect timeout
//! [`CONNECT_TIMEOUT`], whole-request timeout [`HTTP_TIMEOUT`], at most
//! [`MAX_JWKS_BYTES`] (JWKS) or [`MAX_INTROSPECTION_BYTES`] of body. The
//! server is verified against Mozilla's roots (webpki-roots), or only
//! against the CAs of `ca_file` when it is set.
//!
//! # Logging
//! Tokens are never logged, not even in part. Failures are logged with the
//! reason ([`TokenError`]'s messages carry no token content).

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::auth::AuthFailure;
use crate::config::oauth::algorithm_name;
use crate::config::oauth::OAuthConfig;
use crate::https::{load_ca_file, CaCerts, CaFileError, DefaultRoots, HttpsClient, HttpsOptions};
use crate::secret::SecretError;
use crate::types::UserName;

pub mod introspection;
pub mod jwks;

use introspection::Introspection;
use jwks::{Jwks, JwksSource, B64URL};

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
/// Connect timeout for HTTP calls.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent introspection requests per issuer; further logins wait.
pub(crate) const MAX_PARALLEL_INTROSPECTIONS: usize = 8;
/// Accepted RSA modulus sizes in bits.
pub(crate) const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

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
            let ca = i.ca_file.as_deref().map(ca_file).transpose()?;
            let client = HttpsClient::new(&HttpsOptions {
                connect_timeout: CONNECT_TIMEOUT,
                total_timeout: HTTP_TIMEOUT,
                ca,
                default_roots: DefaultRoots::WebPki,
                status_as_error: true,
            });
            let source = match (&i.jwks_file, &i.jwks_url) {
                (Some(path), _) => JwksSource::File(path.clone()),
                (None, Some(url)) => JwksSource::Url { url: url.as_str().to_owned(), client: client.clone() },
                // check() guarantees one of the two.
                (None, None) => return Err(OAuthError::Config(format!("`{}` has no JWKS", i.issuer))),
            };
            let jwks = Jwks::new(&i.issuer, source);
            jwks.load_file_now()?;
            let introspection = match (&i.introspection_url, &i.introspection_client_id, &i.introspection_client_secret)
            {
                (Some(url), Some(id), Some(secret)) => {
                    Some(Introspection::new(url.as_str(), client.clone(), id, &secret.load()?))
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

/// Loads an issuer's `ca_file`.
fn ca_file(path: &Path) -> Result<CaCerts, OAuthError> {
    load_ca_file(path).map_err(|e| OAuthError::CaFile {
        path: path.to_owned(),
        reason: match e {
            CaFileError::Unreadable(reason) => reason,
            CaFileError::Empty => "no PEM certificate found".into(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::jwks::{cache_ttl, parse_jwks};
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;
    use std::sync::{Arc, Mutex};

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
