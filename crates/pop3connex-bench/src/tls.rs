//! TLS client setup shared by the POP3S subcommands.

use anyhow::{bail, Context, Result};
use rustls::client::Resumption;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Everything needed to open one verified TLS connection to the server under test.
pub struct TlsTarget {
    pub addr: SocketAddr,
    pub server_name: ServerName<'static>,
    pub connector: TlsConnector,
    pub timeout: Duration,
    /// Local address to connect from (e.g. 127.0.0.2 for a second loopback client).
    pub source: Option<IpAddr>,
}

impl TlsTarget {
    /// Trusts only the certificates in `ca` (PEM). Session resumption is disabled so that every
    /// connection pays for a full handshake on both servers alike.
    pub fn new(addr: SocketAddr, ca: &Path, server_name: &str, timeout: Duration) -> Result<Self> {
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca).with_context(|| format!("reading CA file {}", ca.display()))?;
        for cert in certs {
            let cert = cert.with_context(|| format!("parsing {}", ca.display()))?;
            roots.add(cert).context("adding CA certificate")?;
        }
        if roots.is_empty() {
            bail!("{}: no certificates", ca.display());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = Resumption::disabled();
        Ok(Self {
            addr,
            server_name: ServerName::try_from(server_name.to_owned()).context("invalid --server-name")?,
            connector: TlsConnector::from(Arc::new(config)),
            timeout,
            source: None,
        })
    }

    pub async fn connect(&self) -> Result<TlsStream<TcpStream>> {
        let tcp = match self.source {
            None => TcpStream::connect(self.addr).await,
            Some(ip) => {
                let sock = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                sock.bind(SocketAddr::new(ip, 0)).with_context(|| format!("bind {ip}"))?;
                sock.connect(self.addr).await
            }
        }
        .with_context(|| format!("connect {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let tls = self.connector.connect(self.server_name.clone(), tcp).await.context("TLS handshake")?;
        Ok(tls)
    }
}

/// "TLSv1_3/TLS13_AES_256_GCM_SHA384/X25519" for the report.
pub fn describe(stream: &TlsStream<TcpStream>) -> String {
    let (_, conn) = stream.get_ref();
    let version = conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_else(|| "?".into());
    let suite = conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_else(|| "?".into());
    let group = conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())).unwrap_or_else(|| "?".into());
    format!("{version}/{suite}/{group}")
}
