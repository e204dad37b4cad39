//! `[oauth]`: the trusted token issuers for OAUTHBEARER/XOAUTH2 logins,
//! parsed and checked here; the validator that uses them is
//! [`crate::oauth::TokenValidator`].
//!
//! Only asymmetric signature algorithms can be configured (`none` and HMAC
//! are refused while parsing, see [`JwsAlgorithm`]), and every URL is
//! `https://` without user info ([`HttpsUrl`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use jsonwebtoken::Algorithm;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use crate::secret::SecretRef;

/// Default and largest allowed clock skew for `exp` and `nbf`.
const DEFAULT_LEEWAY_SECS: u64 = 60;
const MAX_LEEWAY_SECS: u64 = 300;

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

pub(crate) const ALGORITHM_NAMES: [(&str, Algorithm); 9] = [
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

/// The configuration name of an algorithm (`RS256`, ...), for matching
/// token headers and for messages.
pub(crate) fn algorithm_name(alg: Algorithm) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;

    const ISS: &str = "https://idp.example.org/realms/mail";

    fn config(toml_text: &str) -> Result<OAuthConfig, String> {
        #[derive(Deserialize)]
        struct Root {
            oauth: OAuthConfig,
        }
        toml::from_str::<Root>(toml_text).map(|r| r.oauth).map_err(|e| e.to_string())
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
}
