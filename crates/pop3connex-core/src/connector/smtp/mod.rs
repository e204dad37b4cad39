//! SMTP (RFC 5321) and LMTP (RFC 2033) client for forwarding to downstream
//! servers.
//!
//! A fixed `host` is one server (TCP, or `unix:/path` for LMTP); without it
//! the recipients are grouped by domain and each domain's MX hosts are tried
//! in order (and each host's addresses) until one takes the transaction.
//!
//! This file holds the public API ([`deliver`], [`Envelope`],
//! [`RcptOutcome`], [`SmtpError`]) and groups the recipients into
//! transactions. The rest is split by concern:
//! - `policy`: the TLS policy decision (`none`, `verify`, `secure`,
//!   `dane`, `mta-sts`) and the table of what each one checks;
//! - `targets`: the configured host or the MX hosts and addresses, in
//!   order, and when to try the next one;
//! - `client`: the SMTP/LMTP exchange on one connection.
//!
//! # Outcomes
//!
//! [`deliver`] returns one [`RcptOutcome`] per recipient, in order, whenever
//! a server answered the recipients (even if it refused all of them). An
//! `Err` means the whole transaction failed before that: connection, TLS,
//! greeting, EHLO, AUTH, SIZE, `MAIL FROM` or DNS. A connection lost after
//! the message was sent marks the unconfirmed recipients `Temporary`.
//! When the recipients span several domains, a domain's `Err` becomes that
//! domain's recipients' outcomes.

mod client;
mod policy;
mod targets;

use std::net::IpAddr;

use super::dns::{DnsError, Resolver, Security, TlsaRecord};
use super::mtasts::{MtaStsError, Policy, PolicyCache};
use crate::config::connector::DownstreamConfig;

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

fn temp(m: impl Into<String>) -> SmtpError {
    SmtpError::Temporary(m.into())
}

fn perm(m: impl Into<String>) -> SmtpError {
    SmtpError::Permanent(m.into())
}

/// Delivers one message to every recipient through `downstream`; returns one
/// outcome per recipient, in order. `helo` is the default EHLO/LHLO name
/// (`downstream.helo` overrides it); `sts` is the MTA-STS policy cache built
/// from the configured `[connector.dns]`.
pub async fn deliver(
    downstream: &DownstreamConfig,
    helo: &str,
    resolver: &Resolver,
    sts: &PolicyCache,
    envelope: &Envelope,
    message: &[u8],
) -> Result<Vec<RcptOutcome>, SmtpError> {
    deliver_inner(downstream, helo, &Live { resolver, sts }, envelope, message).await
}

/// The DNS and MTA-STS lookups delivery needs (a seam for tests).
trait Lookup {
    async fn mx(&self, domain: &str) -> Result<(Security, Vec<String>), DnsError>;
    async fn addresses(&self, host: &str) -> Result<(Security, Vec<IpAddr>), DnsError>;
    async fn tlsa(&self, host: &str, port: u16) -> Result<(Security, Vec<TlsaRecord>), DnsError>;
    async fn sts_policy(&self, domain: &str) -> Result<Option<Policy>, MtaStsError>;
}

struct Live<'a> {
    resolver: &'a Resolver,
    sts: &'a PolicyCache,
}

impl Lookup for Live<'_> {
    async fn mx(&self, domain: &str) -> Result<(Security, Vec<String>), DnsError> {
        self.resolver.mx(domain).await
    }
    async fn addresses(&self, host: &str) -> Result<(Security, Vec<IpAddr>), DnsError> {
        self.resolver.addresses(host).await
    }
    async fn tlsa(&self, host: &str, port: u16) -> Result<(Security, Vec<TlsaRecord>), DnsError> {
        self.resolver.tlsa(host, port).await
    }
    async fn sts_policy(&self, domain: &str) -> Result<Option<Policy>, MtaStsError> {
        self.sts.policy(self.resolver, domain).await
    }
}

/// An address we are willing to put between `<` and `>`: no controls,
/// spaces or angle brackets (no command injection), bounded length.
fn valid_path(addr: &str) -> bool {
    addr.len() <= 512 && addr.chars().all(|c| !c.is_control() && !matches!(c, ' ' | '<' | '>'))
}

fn domain_of(addr: &str) -> Option<String> {
    let (_, d) = addr.rsplit_once('@')?;
    let d = d.trim_end_matches('.');
    (!d.is_empty()).then(|| d.to_ascii_lowercase())
}

async fn deliver_inner<L: Lookup>(
    d: &DownstreamConfig,
    helo: &str,
    lookup: &L,
    envelope: &Envelope,
    message: &[u8],
) -> Result<Vec<RcptOutcome>, SmtpError> {
    if !valid_path(&envelope.mail_from) {
        return Err(perm("invalid sender address"));
    }
    // The downstream's own `helo` wins over the server-wide default.
    let helo = d.helo.as_deref().unwrap_or(helo);
    if !valid_path(helo) || helo.is_empty() {
        return Err(temp("invalid EHLO name (check `helo`)"));
    }
    let n = envelope.recipients.len();
    let mut out: Vec<Option<RcptOutcome>> = vec![None; n];
    // Groups of recipient indices sharing one transaction.
    let mut groups: Vec<(Option<String>, Vec<usize>)> = Vec::new();
    for (i, r) in envelope.recipients.iter().enumerate() {
        if r.is_empty() || !valid_path(r) {
            out[i] = Some(RcptOutcome::Permanent("invalid recipient address".into()));
            continue;
        }
        let key = match &d.host {
            Some(_) => None,
            None => match domain_of(r) {
                Some(dom) => Some(dom),
                None => {
                    out[i] = Some(RcptOutcome::Permanent("recipient address has no domain".into()));
                    continue;
                }
            },
        };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, idx)) => idx.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    let whole = groups.len() == 1 && groups[0].1.len() == n;
    for (key, idx) in groups {
        let rcpts: Vec<&str> = idx.iter().map(|&i| envelope.recipients[i].as_str()).collect();
        let result = match (&d.host, &key) {
            (Some(host), _) => targets::fixed_host(d, helo, host, &envelope.mail_from, &rcpts, message).await,
            (None, Some(domain)) => {
                targets::mx_domain(d, helo, lookup, domain, &envelope.mail_from, &rcpts, message).await
            }
            (None, None) => unreachable!("MX groups always have a domain"),
        };
        match result {
            Ok(outcomes) => {
                for (&i, o) in idx.iter().zip(outcomes) {
                    out[i] = Some(o);
                }
            }
            Err(e) if whole => return Err(e),
            Err(e) => {
                let o = match e {
                    SmtpError::Temporary(m) => RcptOutcome::Temporary(m),
                    SmtpError::Permanent(m) => RcptOutcome::Permanent(m),
                };
                for &i in &idx {
                    out[i] = Some(o.clone());
                }
            }
        }
    }
    Ok(out.into_iter().map(|o| o.unwrap_or_else(|| RcptOutcome::Temporary("not attempted".into()))).collect())
}

#[cfg(test)]
mod tests;
