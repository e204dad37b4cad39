//! TLS: rustls only, TLS 1.2 and 1.3, ECDHE key exchange with AEAD suites.
//!
//! There is deliberately no setting that enables SSLv3, TLS 1.0/1.1, RSA key
//! exchange or CBC suites: rustls does not implement them and the suite list
//! below is fixed. The server's suite order wins. ALPN `pop3` is selected
//! when a client offers it; clients that offer no ALPN, or other protocols
//! only, are served without ALPN rather than refused (some scanners and
//! older clients send unrelated ALPN lists).
//!
//! The certificate and key are re-read on [`TlsAcceptor::reload`] (SIGHUP);
//! a failed reload keeps the previous pair.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::ring as provider;
use rustls::server::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use crate::config::TlsConfig;
use crate::secret::{SecretError, SecretRef};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("private key: {0}")]
    Key(String),
    #[error("private key: {0}")]
    Secret(#[from] SecretError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The suites we offer, in our order of preference (all ECDHE + AEAD; TLS
/// 1.3 suites always use ephemeral key exchange).
fn cipher_suites() -> Vec<rustls::SupportedCipherSuite> {
    use provider::cipher_suite::*;
    vec![
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS13_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ]
}

struct Configs {
    with_alpn: Arc<ServerConfig>,
    without_alpn: Arc<ServerConfig>,
}

pub struct TlsAcceptor {
    certificate: PathBuf,
    private_key: SecretRef,
    configs: RwLock<Arc<Configs>>,
}

impl TlsAcceptor {
    pub fn load(cfg: &TlsConfig) -> Result<Self, TlsError> {
        let configs = build(&cfg.certificate, &cfg.private_key)?;
        Ok(Self {
            certificate: cfg.certificate.clone(),
            private_key: cfg.private_key.clone(),
            configs: RwLock::new(Arc::new(configs)),
        })
    }

    /// Re-reads certificate and key; on error the old ones stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = build(&self.certificate, &self.private_key)?;
        *self.configs.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(())
    }

    fn current(&self) -> Arc<Configs> {
        self.configs.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs the server handshake on `io`.
    pub async fn accept<IO>(&self, io: IO) -> std::io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
        let configs = self.current();
        let wants_pop3 = start.client_hello().alpn().is_some_and(|mut protocols| protocols.any(|p| p == b"pop3"));
        let config = if wants_pop3 { configs.with_alpn.clone() } else { configs.without_alpn.clone() };
        start.into_stream(config).await
    }
}

fn build(cert_path: &Path, key_ref: &SecretRef) -> Result<Configs, TlsError> {
    let mut config = server_config(cert_path, key_ref)?;
    let without_alpn = Arc::new(config.clone());
    config.alpn_protocols = vec![b"pop3".to_vec()];
    Ok(Configs { with_alpn: Arc::new(config), without_alpn })
}

/// A rustls server configuration under this module's rules (TLS 1.2/1.3,
/// the fixed ECDHE+AEAD suites, server order, no early data), without
/// ALPN: the POP3 listeners and the admin listener (ALPN h2, http/1.1) set
/// their own protocols on it.
pub fn server_config(cert_path: &Path, key_ref: &SecretRef) -> Result<ServerConfig, TlsError> {
    let cert_err = |reason: String| TlsError::Certificate { path: cert_path.to_owned(), reason };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no certificate in file".into()));
    }
    let key_pem = key_ref.load()?;
    // The error text of the PEM parser never includes key material.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Key(e.to_string()))?;

    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: cipher_suites(),
        kx_groups: vec![provider::kx_group::X25519, provider::kx_group::SECP256R1, provider::kx_group::SECP384R1],
        ..provider::default_provider()
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.ignore_client_order = true;
    config.max_early_data_size = 0;
    config.ticketer = provider::Ticketer::new()?;
    Ok(config)
}

/// Files written by [`generate_local_ca`].
pub struct GeneratedTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: zeroize::Zeroizing<String>,
}

/// Makes a local CA and an ECDSA P-256 server certificate signed by it, for
/// the embedded default and tests. Clients trust the CA file; production
/// sites replace both with a certificate from their own CA or ACME.
pub fn generate_local_ca(hostname: &str) -> Result<GeneratedTls, rcgen::Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    let year = 1970 + crate::types::unix_now() / 31_556_952;
    let year = i32::try_from(year).unwrap_or(2026);

    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, format!("POP3conneX local CA ({hostname})"));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    ca.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut names = vec![hostname.to_owned()];
    for extra in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|n| n == extra) {
            names.push(extra.to_owned());
        }
    }
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut leaf = CertificateParams::new(names)?;
    leaf.distinguished_name.push(DnType::CommonName, hostname);
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    leaf.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    Ok(GeneratedTls {
        ca_pem: ca_cert.pem(),
        cert_pem: format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
        key_pem: zeroize::Zeroizing::new(leaf_key.serialize_pem()),
    })
}
