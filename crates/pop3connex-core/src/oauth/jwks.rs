//! The key sets (JWKS, RFC 7517) of the trusted issuers: parsing, the
//! file and URL sources, caching and the rate-limited refresh on an unknown
//! `kid` (see the rules in [`super`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::Value;

use super::{
    OAuthError, TokenError, DEFAULT_JWKS_TTL, MAX_JWKS_BYTES, MAX_JWKS_TTL, MIN_JWKS_TTL, MIN_REFRESH_INTERVAL,
    RSA_BITS,
};
use crate::config::oauth::{algorithm_name, ALGORITHM_NAMES};
use crate::https::{HttpsClient, HttpsError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyType {
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
pub(super) struct Key {
    pub(super) kid: Option<String>,
    pub(super) kind: KeyType,
    /// The JWK's own `alg`, if it names one.
    pub(super) alg: Option<Algorithm>,
    pub(super) decoding: DecodingKey,
}

impl Key {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// Base64url, with or without padding (some JWKS publishers pad).
pub(super) const B64URL: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
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
pub(super) fn parse_jwks(doc: &[u8]) -> Result<Vec<Key>, String> {
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
pub(super) fn cache_ttl(header: Option<&str>) -> Duration {
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

pub(super) enum JwksSource {
    File(PathBuf),
    Url { url: String, client: HttpsClient },
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
pub(super) struct Jwks {
    issuer: String,
    source: JwksSource,
    pub(super) min_refresh: Duration,
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
    pub(super) fn new(issuer: &str, source: JwksSource) -> Self {
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
    pub(super) fn load_file_now(&self) -> Result<(), OAuthError> {
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
            JwksSource::Url { url, client } => {
                let resp = client
                    .get(url, "application/jwk-set+json, application/json", MAX_JWKS_BYTES)
                    .await
                    .map_err(|e| match e {
                        HttpsError::Task(e) => format!("fetch task failed: {e}"),
                        HttpsError::Request(e) | HttpsError::Body(e) | HttpsError::TooLarge(e) => {
                            format!("GET {url}: {e}")
                        }
                    })?;
                let ttl = cache_ttl(resp.cache_control.as_deref());
                Ok(Loaded { keys: parse_jwks(&resp.body)?, ttl: Some(ttl), stamp: None })
            }
        }
    }

    /// Whether the cached keys should be reloaded before use.
    pub(super) async fn stale(&self) -> bool {
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
    pub(super) async fn refresh(&self, forced: bool) {
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
    pub(super) async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, TokenError> {
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
