//! TLS client configurations for server-to-server connections.
//!
//! Certificates are always verified: against the system roots (Debian's
//! `/etc/ssl/certs`, via rustls-native-certs) or an operator-given CA bundle,
//! with the host name checked by rustls. An optional SPKI pin list narrows
//! that further; it never replaces chain verification. TLS 1.2 and 1.3 only.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsClientError {
    #[error("cannot read CA bundle {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("no trusted root certificates found (install ca-certificates or set ca_file)")]
    NoRoots,
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Trust anchors: the CA bundle at `ca_file`, or the system roots.
///
/// Loaded once and shared: every upstream run and every forwarded message
/// needs them, and parsing the system bundle costs far more than a
/// handshake. A CA file is read again when its size or modification time
/// changes, so a replaced bundle takes effect without a restart.
pub fn root_store(ca_file: Option<&Path>) -> Result<Arc<RootCertStore>, TlsClientError> {
    type Stamp = Option<(u64, std::time::SystemTime)>;
    type Entry = (Option<std::path::PathBuf>, Stamp, Arc<RootCertStore>);
    static CACHE: std::sync::Mutex<Vec<Entry>> = std::sync::Mutex::new(Vec::new());
    let stamp: Stamp =
        ca_file.and_then(|p| std::fs::metadata(p).ok()).and_then(|m| Some((m.len(), m.modified().ok()?)));
    let key = ca_file.map(Path::to_path_buf);
    if let Ok(cache) = CACHE.lock() {
        // System roots stay for the life of the process; a file entry only
        // while its size and mtime are unchanged (and readable).
        let fresh = |k: &Option<std::path::PathBuf>, st: &Stamp| {
            *k == key && (key.is_none() || (stamp.is_some() && *st == stamp))
        };
        if let Some((_, _, roots)) = cache.iter().find(|(k, st, _)| fresh(k, st)) {
            return Ok(roots.clone());
        }
    }
    let roots = Arc::new(load_roots(ca_file)?);
    if let Ok(mut cache) = CACHE.lock() {
        cache.retain(|(k, _, _)| *k != key);
        cache.push((key, stamp, roots.clone()));
    }
    Ok(roots)
}

fn load_roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsClientError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let err = |detail: String| TlsClientError::CaFile { path: path.display().to_string(), detail };
            let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
            let mut any = false;
            for cert in rustls_pemfile_certs(&pem).map_err(err)? {
                roots.add(cert).map_err(|e| err(e.to_string()))?;
                any = true;
            }
            if !any {
                return Err(err("no certificates in file".into()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsClientError::NoRoots);
            }
        }
    }
    Ok(roots)
}

fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo, the value pins compare.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    // EndEntityCert only parses here (no path building); it derefs to Cert.
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(Sha256::digest(parsed.subject_public_key_info().as_ref()).into())
}

/// Parses `sha256/<base64>` pins (validated by the config check).
pub fn parse_pins(pins: &[String]) -> Vec<[u8; 32]> {
    use base64::Engine as _;
    pins.iter()
        .filter_map(|p| p.strip_prefix("sha256/"))
        .filter_map(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .filter_map(|v| <[u8; 32]>::try_from(v).ok())
        .collect()
}

/// The certificate decision of a custom verifier. Handshake signatures are
/// always checked by [`Checked`] with rustls's own algorithms, so an
/// implementation only decides whether the presented chain is acceptable.
pub trait CertCheck: Send + Sync + std::fmt::Debug {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error>;
}

/// A [`ServerCertVerifier`] made of a [`CertCheck`] plus standard signature checks.
#[derive(Debug)]
pub struct Checked<C> {
    check: C,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl<C: CertCheck> Checked<C> {
    pub fn new(check: C) -> Self {
        Checked { check, algs: provider().signature_verification_algorithms }
    }
}

impl<C: CertCheck> ServerCertVerifier for Checked<C> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check.check(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Chain and name verification by rustls/webpki, then the pin check.
///
/// A pin must match a certificate of the *verified* path (leaf, the
/// intermediates actually used, trust anchor), never merely one the server
/// presents: anybody can append a copy of a pinned CA certificate to an
/// unrelated chain, since certificates are public.
#[derive(Debug)]
struct Pinned {
    inner: Arc<WebPkiServerVerifier>,
    /// The trust anchors the path is built to (the same as `inner`'s).
    roots: Arc<RootCertStore>,
    pins: Vec<[u8; 32]>,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn pinned(&self, spki: &[u8]) -> bool {
        let hash: [u8; 32] = Sha256::digest(spki).into();
        self.pins.iter().any(|p| p == &hash)
    }

    /// Whether a path from `end_entity` to a trust anchor exists that
    /// contains a pinned key. webpki tries every candidate path and keeps
    /// the first the callback accepts, so a valid cross-signed path through
    /// a pinned intermediate is found even when another path exists.
    fn verified_path_is_pinned(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> bool {
        let Ok(ee) = webpki::EndEntityCert::try_from(end_entity) else {
            return false;
        };
        let in_path = |path: &webpki::VerifiedPath<'_>| -> Result<(), webpki::Error> {
            let ee_pinned = self.pinned(path.end_entity().subject_public_key_info().as_ref());
            let ca_pinned = path.intermediate_certificates().any(|c| self.pinned(c.subject_public_key_info().as_ref()));
            let anchor_pinned = self.pinned(webpki::spki_for_anchor(path.anchor()).as_ref());
            if ee_pinned || ca_pinned || anchor_pinned {
                Ok(())
            } else {
                Err(webpki::Error::UnknownIssuer)
            }
        };
        ee.verify_for_usage(
            self.algs.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            Some(&in_path),
        )
        .is_ok()
    }
}

impl CertCheck for Pinned {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // rustls first: chain, validity, EKU and name, with its error texts.
        let verified = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        if !self.verified_path_is_pinned(end_entity, intermediates, now) {
            return Err(rustls::Error::General(
                "no certificate of the verified chain matches a configured SPKI pin".into(),
            ));
        }
        Ok(verified)
    }
}

/// A webpki verifier for `roots` (chain, validity, EKU and name checks).
pub fn webpki_verifier(roots: Arc<RootCertStore>) -> Result<Arc<WebPkiServerVerifier>, TlsClientError> {
    WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsClientError::Config(e.to_string()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config that verifies chains against `roots` and, when `pins` is
/// not empty, requires one certificate of the verified path (leaf, path
/// intermediates or trust anchor) to match a pin.
pub fn client_config(
    roots: Arc<RootCertStore>,
    pins: &[String],
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsClientError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsClientError::Config(e.to_string()))?;
    let mut cfg = if pins.is_empty() {
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        let inner = webpki_verifier(roots.clone())?;
        let algs = provider().signature_verification_algorithms;
        let verifier = Checked::new(Pinned { inner, roots, pins: parse_pins(pins), algs });
        builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// A client config with a caller-supplied verifier (DANE, MTA-STS).
pub fn client_config_with_verifier(verifier: Arc<dyn ServerCertVerifier>) -> Result<ClientConfig, TlsClientError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsClientError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_and_match_generated_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["pop.example.net".into()]).unwrap().self_signed(&key).unwrap();
        let der = cert.der().clone();
        let hash = spki_sha256(&der).unwrap();
        assert_eq!(hash, <[u8; 32]>::from(Sha256::digest(rcgen::PublicKeyData::subject_public_key_info(&key))));
        use base64::Engine as _;
        let pin = format!("sha256/{}", base64::engine::general_purpose::STANDARD.encode(hash));
        assert_eq!(parse_pins(&[pin, "junk".into()]), vec![hash]);
    }

    #[test]
    fn ca_file_errors_are_clear() {
        let e = root_store(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
