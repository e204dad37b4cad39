//! DNSSEC-validating resolver for MX, TLSA and MTA-STS lookups (API
//! contract; implementation pending).

use std::net::IpAddr;

use super::config::DnsConfig;

/// DNSSEC status of an answer (RFC 4035 section 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Signed and validated up to a trust anchor.
    Secure,
    /// Provably unsigned.
    Insecure,
    /// Validation failed: the answer must not be used.
    Bogus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsaRecord {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// DNSSEC validation failed: fail closed.
    #[error("DNSSEC validation failed for {0}")]
    Bogus(String),
    /// The name or record type does not exist (or a null MX).
    #[error("{0}")]
    NotFound(String),
    #[error("DNS lookup failed: {0}")]
    Temporary(String),
}

pub struct Resolver {
    _private: (),
}

impl Resolver {
    pub fn new(_cfg: &DnsConfig) -> Result<Resolver, DnsError> {
        Ok(Resolver { _private: () })
    }

    /// MX hosts by preference; the domain itself when it has no MX (RFC 5321
    /// section 5.1); `NotFound` for a null MX (RFC 7505).
    pub async fn mx(&self, _domain: &str) -> Result<(Security, Vec<String>), DnsError> {
        Err(DnsError::Temporary("not implemented".into()))
    }

    pub async fn addresses(&self, _host: &str) -> Result<(Security, Vec<IpAddr>), DnsError> {
        Err(DnsError::Temporary("not implemented".into()))
    }

    /// TLSA records at `_port._tcp.host`.
    pub async fn tlsa(&self, _host: &str, _port: u16) -> Result<(Security, Vec<TlsaRecord>), DnsError> {
        Err(DnsError::Temporary("not implemented".into()))
    }

    pub async fn txt(&self, _name: &str) -> Result<(Security, Vec<String>), DnsError> {
        Err(DnsError::Temporary("not implemented".into()))
    }
}

/// A human-readable report of a domain's mail-delivery security: MX hosts
/// with DNSSEC status, TLSA records, MTA-STS policy.
pub async fn check_domain(_resolver: &Resolver, _sts: &super::mtasts::PolicyCache, domain: &str) -> String {
    format!("{domain}: not implemented\n")
}
