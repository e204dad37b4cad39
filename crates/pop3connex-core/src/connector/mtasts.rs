//! MTA-STS (RFC 8461) policy discovery, fetching and caching (API contract;
//! implementation pending).

use super::config::DnsConfig;
use super::dns::Resolver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// `mx:` patterns (`mail.example.com`, `*.example.net`).
    pub mx: Vec<String>,
    pub max_age: u64,
}

impl Policy {
    /// Whether an MX host name matches one of the policy's patterns.
    pub fn mx_matches(&self, _host: &str) -> bool {
        false
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MtaStsError {
    #[error("MTA-STS policy unavailable: {0}")]
    Temporary(String),
    #[error("invalid MTA-STS policy: {0}")]
    Invalid(String),
}

/// Looks up and caches MTA-STS policies.
pub struct PolicyCache {
    _private: (),
}

impl PolicyCache {
    pub fn new(_cfg: &DnsConfig) -> Self {
        PolicyCache { _private: () }
    }

    /// The domain's policy: `None` when it publishes none.
    pub async fn policy(&self, _resolver: &Resolver, _domain: &str) -> Result<Option<Policy>, MtaStsError> {
        Err(MtaStsError::Temporary("not implemented".into()))
    }
}
