//! Where a message goes: the configured `host` (a `unix:` socket, an
//! address, or a name resolved by the system), or for MX delivery the
//! recipient domain's MX hosts in order and each host's addresses, trying
//! the next one until a server gives a final answer. The TLS each host gets
//! is asked of [`super::policy`]; the exchange itself is [`super::client`].
//!
//! DNS answers: MX `Bogus` → temporary failure with no fallback (fail
//! closed); null MX or no such domain → permanent; other DNS errors →
//! temporary. Address records that are `Bogus` skip the host. At most 10
//! MX hosts and 4 addresses per host are tried; the next one is tried after
//! a connection/TLS/protocol failure or when every recipient was deferred
//! (4xx), never after a permanent (5xx) answer.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::super::dns::{DnsError, Security};
use super::client::{transaction, Io};
use super::policy::{self, MxTls, Sts, TlsMode};
use super::{perm, temp, Lookup, RcptOutcome, SmtpError};
use crate::config::connector::{DownstreamConfig, DownstreamTls};
use crate::logtext::sanitize;

/// MX hosts tried per domain and addresses tried per host (a hostile DNS
/// answer must not keep a delivery busy for hours; Postfix uses 5 sessions).
const MAX_MX_HOSTS: usize = 10;
const MAX_ADDRESSES: usize = 4;

async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<Box<dyn Io>, SmtpError> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
        Ok(Err(e)) => Err(temp(format!("cannot connect to {addr}: {e}"))),
        Err(_) => Err(temp(format!("timed out connecting to {addr}"))),
    }
}

/// Whether a host's answer ends the search for another server: something
/// other than "every recipient deferred".
fn is_final(outcomes: &[RcptOutcome]) -> bool {
    outcomes.iter().any(|o| !matches!(o, RcptOutcome::Temporary(_)))
}

/// Runs the transaction on each address in turn until one gives a final
/// answer. `Ok(None)` never happens with addresses present.
async fn try_addresses(
    d: &DownstreamConfig,
    helo: &str,
    addrs: &[SocketAddr],
    tls: &TlsMode,
    from: &str,
    rcpts: &[&str],
    message: &[u8],
) -> Result<Vec<RcptOutcome>, SmtpError> {
    let timeout = Duration::from_secs(d.timeout_secs);
    let mut last: Result<Vec<RcptOutcome>, SmtpError> = Err(temp("no address to connect to"));
    for &addr in addrs {
        let result = match connect_tcp(addr, timeout).await {
            Ok(io) => transaction(io, d, helo, tls, from, rcpts, message).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(o) if is_final(&o) => return Ok(o),
            Err(SmtpError::Permanent(m)) => return Err(SmtpError::Permanent(m)),
            Err(ref e) => tracing::debug!(%addr, error = %e, "downstream attempt failed"),
            Ok(_) => tracing::debug!(%addr, "downstream deferred every recipient"),
        }
        last = result;
    }
    last
}

/// Delivers to the configured `host`.
pub(super) async fn fixed_host(
    d: &DownstreamConfig,
    helo: &str,
    host: &str,
    from: &str,
    rcpts: &[&str],
    message: &[u8],
) -> Result<Vec<RcptOutcome>, SmtpError> {
    let timeout = Duration::from_secs(d.timeout_secs);
    if let Some(path) = host.strip_prefix("unix:") {
        if d.tls() != DownstreamTls::None {
            return Err(temp("a unix: socket takes tls = \"none\""));
        }
        let io: Box<dyn Io> = match tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path)).await {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => return Err(temp(format!("cannot connect to {host}: {e}"))),
            Err(_) => return Err(temp(format!("timed out connecting to {host}"))),
        };
        return transaction(io, d, helo, &TlsMode::Off, from, rcpts, message).await;
    }
    let tls = policy::fixed_tls(d, host)?;
    let port = d.port();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => match tokio::time::timeout(timeout, tokio::net::lookup_host((bare, port))).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => return Err(temp(format!("cannot resolve {host}: {e}"))),
            Err(_) => return Err(temp(format!("timed out resolving {host}"))),
        },
    };
    try_addresses(d, helo, &addrs, &tls, from, rcpts, message).await
}

/// Delivers to the MX hosts of `domain`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn mx_domain<L: Lookup>(
    d: &DownstreamConfig,
    helo: &str,
    lookup: &L,
    domain: &str,
    from: &str,
    rcpts: &[&str],
    message: &[u8],
) -> Result<Vec<RcptOutcome>, SmtpError> {
    if d.tls() == DownstreamTls::None {
        return Err(temp("tls = \"none\" is not allowed for MX delivery"));
    }
    let (mx_sec, hosts) = match lookup.mx(domain).await {
        Ok((Security::Bogus, _)) | Err(DnsError::Bogus(_)) => {
            return Err(temp(format!("DNSSEC validation failed for the MX records of {domain}")))
        }
        Err(DnsError::NotFound(m)) => return Err(perm(format!("{domain} accepts no mail: {}", sanitize(&m)))),
        Err(DnsError::Temporary(m)) => return Err(temp(format!("MX lookup for {domain} failed: {}", sanitize(&m)))),
        Ok((_, hosts)) if hosts.is_empty() => return Err(perm(format!("{domain} accepts no mail"))),
        Ok(found) => found,
    };
    let port = d.port();
    let mut sts = Sts::Unfetched;
    let mut last: Result<Vec<RcptOutcome>, SmtpError> = Err(temp(format!("no usable MX host for {domain}")));
    for host in hosts.into_iter().take(MAX_MX_HOSTS) {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let (addr_sec, ips) = match lookup.addresses(&host).await {
            Ok((Security::Bogus, _)) | Err(DnsError::Bogus(_)) => {
                last = Err(temp(format!("DNSSEC validation failed for the addresses of {host}")));
                continue;
            }
            Ok(found) => found,
            Err(e) => {
                last = Err(temp(sanitize(&format!("{host}: {e}"))));
                continue;
            }
        };
        let tls = match policy::mx_tls(d, lookup, domain, &host, port, mx_sec, addr_sec, &mut sts).await? {
            MxTls::Use(t) => t,
            MxTls::Skip(e) => {
                let m = match e {
                    SmtpError::Temporary(m) | SmtpError::Permanent(m) => m,
                };
                last = Err(temp(m));
                continue;
            }
        };
        let addrs: Vec<SocketAddr> = ips.into_iter().take(MAX_ADDRESSES).map(|ip| SocketAddr::new(ip, port)).collect();
        let result = try_addresses(d, helo, &addrs, &tls, from, rcpts, message).await;
        match result {
            Ok(o) if is_final(&o) => return Ok(o),
            Err(SmtpError::Permanent(m)) => return Err(SmtpError::Permanent(m)),
            r => last = r,
        }
    }
    last
}
