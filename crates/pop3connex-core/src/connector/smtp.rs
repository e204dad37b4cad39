//! SMTP/LMTP client for forwarding to downstream servers (API contract;
//! implementation pending).

use super::config::DownstreamConfig;
use super::dns::Resolver;
use super::mtasts::PolicyCache;

/// The SMTP envelope of one forwarded message.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Reverse path; empty for the null sender.
    pub mail_from: String,
    pub recipients: Vec<String>,
}

/// The downstream server's verdict for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    Accepted,
    /// 4xx: try again later.
    Temporary(String),
    /// 5xx: will never be accepted.
    Permanent(String),
}

/// A failure of the whole transaction (no recipient accepted).
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("temporary failure: {0}")]
    Temporary(String),
    #[error("permanent failure: {0}")]
    Permanent(String),
}

/// Delivers one message to every recipient through `downstream`; returns one
/// outcome per recipient, in order.
pub async fn deliver(
    _downstream: &DownstreamConfig,
    _helo: &str,
    _resolver: &Resolver,
    _envelope: &Envelope,
    _message: &[u8],
) -> Result<Vec<RcptOutcome>, SmtpError> {
    Err(SmtpError::Temporary("not implemented".into()))
}

/// As [`deliver`], with the MTA-STS policy cache the engine keeps.
pub async fn deliver_with(
    _downstream: &DownstreamConfig,
    _helo: &str,
    _resolver: &Resolver,
    _sts: &PolicyCache,
    _envelope: &Envelope,
    _message: &[u8],
) -> Result<Vec<RcptOutcome>, SmtpError> {
    Err(SmtpError::Temporary("not implemented".into()))
}
