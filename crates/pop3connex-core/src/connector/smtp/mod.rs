//! SMTP (RFC 5321) and LMTP (RFC 2033) client for forwarding to downstream
//! servers.
//!
//! A fixed `host` is one server (TCP, or `unix:/path` for LMTP); without it
//! the recipients are grouped by domain and each domain's MX hosts are tried
//! in order (and each host's addresses) until one takes the transaction.
//!
//! # TLS policies
//!
//! There is never a fallback to cleartext: with any policy but `none`,
//! STARTTLS must be offered and succeed, or the attempt fails temporarily.
//!
//! | policy    | delivery | certificate check                                                  |
//! |-----------|----------|--------------------------------------------------------------------|
//! | `none`    | fixed    | no TLS (loopback or `unix:` only, enforced by the config check)    |
//! | `verify`  | fixed    | chain (roots or `ca_file`), name = configured host                 |
//! | `verify`  | MX       | chain, name = MX host                                              |
//! | `secure`  | fixed    | chain, name = configured host                                      |
//! | `secure`  | MX       | chain, name = recipient domain, or the MX host when it lies inside |
//! |           |          | the domain (Postfix "nexthop:dot-nexthop")                         |
//! | `dane`    | MX       | MX RRset Secure, host addresses Secure, TLSA Secure with usable    |
//! |           |          | records (usage 2/3) → DANE ([`super::dane`]), mandatory            |
//! |           |          | TLSA Bogus or lookup failure → host skipped (temporary)            |
//! |           |          | no/insecure/unusable TLSA, or MX insecure → as `mta-sts`           |
//! | `mta-sts` | MX       | policy `enforce`: MX host must match the policy's `mx` patterns    |
//! |           |          | (else skipped), chain verified, name = MX host                     |
//! |           |          | policy `testing`/`none`, no policy, invalid policy: chain          |
//! |           |          | verified, name = MX host (never cleartext, never unverified)       |
//! |           |          | policy fetch failed temporarily → whole domain deferred            |
//!
//! DNS answers: MX `Bogus` → temporary failure with no fallback (fail
//! closed); null MX or no such domain → permanent; other DNS errors →
//! temporary. Address records that are `Bogus` skip the host. At most 10
//! MX hosts and 4 addresses per host are tried; the next one is tried after
//! a connection/TLS/protocol failure or when every recipient was deferred
//! (4xx), never after a permanent (5xx) answer.
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

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use super::dane::DaneVerifier;
use super::dns::{DnsError, Resolver, Security, TlsaRecord};
use super::mtasts::{Mode, MtaStsError, Policy, PolicyCache};
use super::tlsclient;
use crate::config::connector::{DownstreamConfig, DownstreamProtocol, DownstreamTls};
use crate::logtext::sanitize;

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

/// Lines of one multi-line reply we accept before calling it an attack.
const MAX_REPLY_LINES: usize = 100;
/// Octets of one reply line including CRLF.
const MAX_LINE: usize = 1024;
/// The DATA write phase gets `timeout_secs` plus one second per this many octets.
const DATA_BYTES_PER_SEC: u64 = 32 * 1024;
/// The reply to the final "." may take this many times `timeout_secs`
/// (servers scan the message first; RFC 5321 section 4.5.3.2.6).
const FINAL_REPLY_FACTOR: u32 = 5;
/// MX hosts tried per domain and addresses tried per host (a hostile DNS
/// answer must not keep a delivery busy for hours; Postfix uses 5 sessions).
const MAX_MX_HOSTS: usize = 10;
const MAX_ADDRESSES: usize = 4;

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
            (Some(host), _) => fixed_host(d, helo, host, &envelope.mail_from, &rcpts, message).await,
            (None, Some(domain)) => mx_domain(d, helo, lookup, domain, &envelope.mail_from, &rcpts, message).await,
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

/// How one connection gets TLS.
#[derive(Clone)]
enum TlsMode {
    Off,
    Required { config: Arc<ClientConfig>, name: ServerName<'static>, identity: Identity },
}

/// Where the server's identity comes from. It decides whether SMTP AUTH
/// credentials may be sent: only to a server the operator named or one
/// DNSSEC vouches for, never to a host whoever forges an unsigned DNS answer
/// could pick (a verified certificate for a name DNS handed us proves
/// nothing about who should get the relay password).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Identity {
    /// The configured `host`.
    Fixed,
    /// An MX host authenticated by DANE (signed MX, addresses and TLSA).
    Dane,
    /// An MX host found through DNS without DANE (`verify`, `secure`,
    /// `mta-sts`, or `dane` without usable TLSA records).
    UnsignedMx,
}

fn server_name(host: &str) -> Result<ServerName<'static>, SmtpError> {
    let h = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.');
    ServerName::try_from(h.to_owned()).map_err(|_| temp(format!("`{}` is not a valid host name", sanitize(host))))
}

fn roots(d: &DownstreamConfig) -> Result<Arc<rustls::RootCertStore>, SmtpError> {
    tlsclient::root_store(d.ca_file.as_deref()).map_err(|e| temp(e.to_string()))
}

/// Verified TLS (chain and name) to `name`.
fn verified(d: &DownstreamConfig, name: &str, identity: Identity) -> Result<TlsMode, SmtpError> {
    let config = tlsclient::client_config(roots(d)?, &[], &[]).map_err(|e| temp(e.to_string()))?;
    Ok(TlsMode::Required { config: Arc::new(config), name: server_name(name)?, identity })
}

/// Chain verified; the certificate must be valid for one of `names`.
#[derive(Debug)]
struct AnyName {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl tlsclient::CertCheck for AnyName {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = rustls::Error::General("no reference name".into());
        for name in &self.names {
            match self.inner.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// `secure` for MX delivery: the recipient domain, or the MX host if it is
/// the domain or inside it.
fn secure_mx(d: &DownstreamConfig, domain: &str, mx: &str) -> Result<TlsMode, SmtpError> {
    let mut names = vec![server_name(domain)?];
    if mx.ends_with(&format!(".{domain}")) {
        names.push(server_name(mx)?);
    }
    let inner = tlsclient::webpki_verifier(roots(d)?).map_err(|e| temp(e.to_string()))?;
    let verifier = Arc::new(tlsclient::Checked::new(AnyName { inner, names }));
    let config = tlsclient::client_config_with_verifier(verifier).map_err(|e| temp(e.to_string()))?;
    Ok(TlsMode::Required { config: Arc::new(config), name: server_name(mx)?, identity: Identity::UnsignedMx })
}

fn dane_tls(verifier: DaneVerifier, mx: &str) -> Result<TlsMode, SmtpError> {
    let verifier = Arc::new(tlsclient::Checked::new(verifier));
    let config = tlsclient::client_config_with_verifier(verifier).map_err(|e| temp(e.to_string()))?;
    Ok(TlsMode::Required { config: Arc::new(config), name: server_name(mx)?, identity: Identity::Dane })
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

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

async fn fixed_host(
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
    let tls = match d.tls() {
        DownstreamTls::None => TlsMode::Off,
        DownstreamTls::Verify | DownstreamTls::Secure => verified(d, host, Identity::Fixed)?,
        DownstreamTls::Dane | DownstreamTls::MtaSts => {
            return Err(temp("tls = \"dane\"/\"mta-sts\" apply to MX delivery only"))
        }
    };
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

/// What DANE says about one MX host.
enum Dane {
    Use(DaneVerifier),
    /// No usable TLSA records (or no DNSSEC): the MTA-STS rules apply.
    NotApplicable,
    /// The TLSA lookup failed or is bogus: the host must not be used.
    Unusable(String),
}

async fn dane_for<L: Lookup>(lookup: &L, secure_path: bool, host: &str, port: u16) -> Dane {
    if !secure_path {
        return Dane::NotApplicable;
    }
    match lookup.tlsa(host, port).await {
        Ok((Security::Secure, records)) => match DaneVerifier::new(&records, host) {
            Some(v) => Dane::Use(v),
            None => Dane::NotApplicable,
        },
        Ok((Security::Insecure, _)) | Err(DnsError::NotFound(_)) => Dane::NotApplicable,
        Ok((Security::Bogus, _)) | Err(DnsError::Bogus(_)) => {
            Dane::Unusable(format!("DNSSEC validation failed for the TLSA records of {host}"))
        }
        Err(DnsError::Temporary(m)) => Dane::Unusable(format!("TLSA lookup for {host} failed: {}", sanitize(&m))),
    }
}

/// The domain's MTA-STS policy, fetched once per delivery.
enum Sts {
    Unfetched,
    Enforce(Policy),
    /// No policy in force: verified TLS to the MX name.
    Relaxed,
}

async fn sts_state<L: Lookup>(lookup: &L, domain: &str, sts: &mut Sts) -> Result<(), SmtpError> {
    if matches!(sts, Sts::Unfetched) {
        *sts = match lookup.sts_policy(domain).await {
            Ok(Some(p)) if p.mode == Mode::Enforce => Sts::Enforce(p),
            Ok(_) | Err(MtaStsError::Invalid(_)) => Sts::Relaxed,
            Err(e @ MtaStsError::Temporary(_)) => return Err(temp(sanitize(&format!("{domain}: {e}")))),
        };
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn mx_domain<L: Lookup>(
    d: &DownstreamConfig,
    helo: &str,
    lookup: &L,
    domain: &str,
    from: &str,
    rcpts: &[&str],
    message: &[u8],
) -> Result<Vec<RcptOutcome>, SmtpError> {
    let policy = d.tls();
    if policy == DownstreamTls::None {
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
        let tls = match policy {
            DownstreamTls::None => unreachable!("checked above"),
            DownstreamTls::Verify => verified(d, &host, Identity::UnsignedMx),
            DownstreamTls::Secure => secure_mx(d, domain, &host),
            DownstreamTls::Dane | DownstreamTls::MtaSts => {
                let secure_path =
                    policy == DownstreamTls::Dane && mx_sec == Security::Secure && addr_sec == Security::Secure;
                match dane_for(lookup, secure_path, &host, port).await {
                    Dane::Use(v) => dane_tls(v, &host),
                    Dane::Unusable(m) => Err(temp(m)),
                    Dane::NotApplicable => {
                        // A policy that cannot be fetched defers the whole domain.
                        sts_state(lookup, domain, &mut sts).await?;
                        match &sts {
                            Sts::Enforce(p) if !p.mx_matches(&host) => {
                                Err(temp(format!("MX host {host} is not allowed by the MTA-STS policy")))
                            }
                            _ => verified(d, &host, Identity::UnsignedMx),
                        }
                    }
                }
            }
        };
        let tls = match tls {
            Ok(t) => t,
            Err(e) => {
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

/// One reply: the code and the text of every line.
#[derive(Debug)]
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn class(&self) -> u16 {
        self.code / 100
    }

    /// "code text" of the last line, sanitized, for errors.
    fn text(&self) -> String {
        format!("{} {}", self.code, sanitize(self.lines.last().map(String::as_str).unwrap_or("")))
    }

    fn outcome(&self) -> RcptOutcome {
        match self.class() {
            2 => RcptOutcome::Accepted,
            5 => RcptOutcome::Permanent(self.text()),
            _ => RcptOutcome::Temporary(self.text()),
        }
    }

    /// The error for an unexpected reply: 5xx permanent, anything else temporary.
    fn error(&self, during: &str) -> SmtpError {
        let m = format!("{during}: {}", self.text());
        if self.class() == 5 {
            SmtpError::Permanent(m)
        } else {
            SmtpError::Temporary(m)
        }
    }
}

/// EHLO keywords (upper case) and their parameters.
struct Extensions(Vec<(String, String)>);

impl Extensions {
    fn parse(reply: &Reply) -> Self {
        let ext = reply.lines.iter().skip(1).filter_map(|l| {
            let mut it = l.trim().splitn(2, [' ', '=']);
            let key = it.next()?.to_ascii_uppercase();
            (!key.is_empty()).then(|| (key, it.next().unwrap_or("").trim().to_owned()))
        });
        Extensions(ext.collect())
    }

    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    fn auth_plain(&self) -> bool {
        self.0
            .iter()
            .filter(|(k, _)| k == "AUTH")
            .any(|(_, p)| p.split_whitespace().any(|m| m.eq_ignore_ascii_case("PLAIN")))
    }

    /// The advertised SIZE limit; `None` without one (or `SIZE 0`).
    fn size(&self) -> Option<u64> {
        let (_, p) = self.0.iter().find(|(k, _)| k == "SIZE")?;
        p.parse::<u64>().ok().filter(|&n| n > 0)
    }
}

/// One connection's I/O with bounded, timed reads.
struct Conn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    timeout: Duration,
}

impl Conn {
    async fn fill(&mut self, deadline: tokio::time::Instant) -> Result<(), SmtpError> {
        let mut chunk = [0u8; 4096];
        let n = match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
            Ok(Ok(0)) => return Err(temp("connection closed by the server")),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(temp(format!("connection lost: {e}"))),
            Err(_) => return Err(temp("timed out waiting for the server's reply")),
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn line(&mut self, deadline: tokio::time::Instant) -> Result<String, SmtpError> {
        loop {
            if let Some(p) = self.buf.iter().position(|&b| b == b'\n') {
                if p + 1 > MAX_LINE {
                    return Err(temp("protocol error: reply line too long"));
                }
                let raw: Vec<u8> = self.buf.drain(..=p).collect();
                let raw = raw.strip_suffix(b"\n").unwrap_or(&raw);
                let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                return Ok(String::from_utf8_lossy(raw).into_owned());
            }
            if self.buf.len() >= MAX_LINE {
                return Err(temp("protocol error: reply line too long"));
            }
            self.fill(deadline).await?;
        }
    }

    async fn reply_within(&mut self, wait: Duration) -> Result<Reply, SmtpError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut code = None;
        let mut lines = Vec::new();
        loop {
            let line = self.line(deadline).await?;
            let b = line.as_bytes();
            let well_formed = b.len() >= 3
                && (b'2'..=b'5').contains(&b[0])
                && b[1..3].iter().all(u8::is_ascii_digit)
                && (b.len() == 3 || b[3] == b' ' || b[3] == b'-');
            if !well_formed {
                return Err(temp(format!("protocol error: malformed reply `{}`", sanitize(&line))));
            }
            let this: u16 = line[..3].parse().expect("three digits");
            if *code.get_or_insert(this) != this {
                return Err(temp("protocol error: reply code changed within a multi-line reply"));
            }
            lines.push(line.get(4..).unwrap_or("").to_owned());
            if lines.len() > MAX_REPLY_LINES {
                return Err(temp("protocol error: reply has too many lines"));
            }
            if b.len() == 3 || b[3] == b' ' {
                return Ok(Reply { code: this, lines });
            }
        }
    }

    async fn reply(&mut self) -> Result<Reply, SmtpError> {
        self.reply_within(self.timeout).await
    }

    async fn write_within(&mut self, data: &[u8], wait: Duration) -> Result<(), SmtpError> {
        let io = &mut self.io;
        match tokio::time::timeout(wait, async move {
            io.write_all(data).await?;
            io.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(temp(format!("connection lost: {e}"))),
            Err(_) => Err(temp("timed out sending to the server")),
        }
    }

    /// Sends one command line. The error never contains the line (AUTH).
    async fn send(&mut self, line: &str) -> Result<(), SmtpError> {
        let mut data = Zeroizing::new(Vec::with_capacity(line.len() + 2));
        data.extend_from_slice(line.as_bytes());
        data.extend_from_slice(b"\r\n");
        self.write_within(&data, self.timeout).await
    }

    async fn cmd(&mut self, line: &str) -> Result<Reply, SmtpError> {
        self.send(line).await?;
        self.reply().await
    }

    /// Polite end of the session; errors do not matter any more.
    async fn quit(mut self) {
        self.timeout = self.timeout.min(Duration::from_secs(5));
        let _ = self.cmd("QUIT").await;
        let _ = self.io.shutdown().await;
    }
}

/// The message with every line end made CRLF (bare CR and bare LF too, so
/// no receiver can see an end-of-data the next hop does not), an ending CRLF
/// added if missing, and no stuffing yet.
fn normalize(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 2);
    let mut i = 0;
    while i < message.len() {
        match message[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if message.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// DATA payload: `normalized` (from [`normalize`]) dot-stuffed and
/// terminated with ".CRLF".
fn stuff(normalized: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(normalized.len() + normalized.len() / 64 + 3);
    for line in normalized.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[allow(clippy::too_many_arguments)]
async fn transaction(
    io: Box<dyn Io>,
    d: &DownstreamConfig,
    helo: &str,
    tls: &TlsMode,
    from: &str,
    rcpts: &[&str],
    message: &[u8],
) -> Result<Vec<RcptOutcome>, SmtpError> {
    let mut conn = Conn { io, buf: Vec::new(), timeout: Duration::from_secs(d.timeout_secs) };
    let result = session(&mut conn, d, helo, tls, from, rcpts, message).await;
    conn.quit().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn session(
    conn: &mut Conn,
    d: &DownstreamConfig,
    helo: &str,
    tls: &TlsMode,
    from: &str,
    rcpts: &[&str],
    message: &[u8],
) -> Result<Vec<RcptOutcome>, SmtpError> {
    let lmtp = d.protocol == DownstreamProtocol::Lmtp;
    let greeting = conn.reply().await?;
    if greeting.code != 220 {
        return Err(temp(format!("greeting: {}", greeting.text())));
    }
    let hello = if lmtp { "LHLO" } else { "EHLO" };
    let mut ehlo = conn.cmd(&format!("{hello} {helo}")).await?;
    if ehlo.code != 250 {
        if lmtp || !matches!(tls, TlsMode::Off) || d.auth_user.is_some() {
            return Err(temp(format!("{hello}: {}", ehlo.text())));
        }
        // Plain SMTP on loopback: HELO has no extensions, which is fine.
        ehlo = conn.cmd(&format!("HELO {helo}")).await?;
        if ehlo.code != 250 {
            return Err(temp(format!("HELO: {}", ehlo.text())));
        }
        ehlo.lines.truncate(1);
    }
    let mut ext = Extensions::parse(&ehlo);
    let mut secured = false;
    if let TlsMode::Required { config, name, .. } = tls {
        if !ext.has("STARTTLS") {
            return Err(temp("the server does not offer STARTTLS, which this downstream requires"));
        }
        let r = conn.cmd("STARTTLS").await?;
        if r.code != 220 {
            return Err(temp(format!("STARTTLS refused: {}", r.text())));
        }
        if !conn.buf.is_empty() {
            // Bytes the server sent ahead of the handshake would be read as
            // if they came through TLS (CVE-2011-0411 style injection).
            return Err(temp("the server sent data after its STARTTLS reply (injection attempt)"));
        }
        let plain = std::mem::replace(&mut conn.io, Box::new(tokio::io::duplex(1).0));
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let stream = match tokio::time::timeout(conn.timeout, connector.connect(name.clone(), plain)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(temp(format!("TLS handshake failed: {e}"))),
            Err(_) => return Err(temp("TLS handshake timed out")),
        };
        conn.io = Box::new(stream);
        secured = true;
        let r = conn.cmd(&format!("{hello} {helo}")).await?;
        if r.code != 250 {
            return Err(temp(format!("{hello} after STARTTLS: {}", r.text())));
        }
        ext = Extensions::parse(&r);
    }
    if let (Some(user), Some(secret)) = (&d.auth_user, &d.auth_password) {
        if !secured {
            return Err(temp("refusing to send SMTP AUTH credentials without TLS"));
        }
        if let TlsMode::Required { identity: Identity::UnsignedMx, name, .. } = tls {
            // The config check refuses the obvious cases; this also covers
            // `dane` falling back to certificate checks for a domain
            // without usable TLSA records.
            return Err(temp(format!(
                "refusing to send SMTP AUTH credentials to {}, an MX host not authenticated by DANE",
                sanitize(&*name.to_str())
            )));
        }
        if !ext.auth_plain() {
            return Err(temp("the server does not offer AUTH PLAIN"));
        }
        let password = secret.load().map_err(|e| temp(format!("auth_password: {e}")))?;
        let mut raw = Zeroizing::new(Vec::with_capacity(user.len() + password.len() + 2));
        raw.push(0);
        raw.extend_from_slice(user.as_bytes());
        raw.push(0);
        raw.extend_from_slice(trim_newline(&password));
        use base64::Engine as _;
        let line = Zeroizing::new(format!("AUTH PLAIN {}", base64::engine::general_purpose::STANDARD.encode(&*raw)));
        let r = conn.cmd(&line).await?;
        if r.code == 334 {
            let _ = conn.cmd("*").await;
            return Err(temp("AUTH PLAIN: the server did not take the initial response"));
        }
        if r.code != 235 {
            return Err(temp(format!("AUTH PLAIN refused: {}", r.text())));
        }
    }

    let normalized = normalize(message);
    if let Some(limit) = ext.size() {
        if normalized.len() as u64 > limit {
            return Err(perm(format!(
                "message of {} octets exceeds the server's SIZE limit {limit}",
                normalized.len()
            )));
        }
    }
    let mut mail = format!("MAIL FROM:<{from}>");
    if ext.has("SIZE") {
        mail.push_str(&format!(" SIZE={}", normalized.len()));
    }
    if ext.has("8BITMIME") && normalized.iter().any(|&b| b >= 0x80) {
        mail.push_str(" BODY=8BITMIME");
    }
    if !from.is_ascii() || rcpts.iter().any(|r| !r.is_ascii()) {
        if !ext.has("SMTPUTF8") {
            return Err(perm("internationalized addresses need SMTPUTF8, which the server does not offer"));
        }
        mail.push_str(" SMTPUTF8");
    }
    let r = conn.cmd(&mail).await?;
    if r.class() != 2 {
        return Err(r.error("MAIL FROM"));
    }
    let mut outcomes = Vec::with_capacity(rcpts.len());
    for rcpt in rcpts {
        let r = conn.cmd(&format!("RCPT TO:<{rcpt}>")).await?;
        outcomes.push(r.outcome());
    }
    let accepted: Vec<usize> = (0..rcpts.len()).filter(|&i| outcomes[i] == RcptOutcome::Accepted).collect();
    if accepted.is_empty() {
        let _ = conn.cmd("RSET").await;
        return Ok(outcomes);
    }
    let r = conn.cmd("DATA").await?;
    if r.code != 354 {
        let o = match r.class() {
            5 => RcptOutcome::Permanent(format!("DATA: {}", r.text())),
            _ => RcptOutcome::Temporary(format!("DATA: {}", r.text())),
        };
        for &i in &accepted {
            outcomes[i] = o.clone();
        }
        return Ok(outcomes);
    }
    let payload = stuff(&normalized);
    let write_budget = conn.timeout + Duration::from_secs(payload.len() as u64 / DATA_BYTES_PER_SEC);
    if let Err(e) = conn.write_within(&payload, write_budget).await {
        return Err(temp(format!("sending the message: {e}")));
    }
    // From here on the server may have the message: unconfirmed recipients
    // become Temporary, never an error that hides confirmed ones.
    let final_wait = conn.timeout * FINAL_REPLY_FACTOR;
    let replies = if lmtp { accepted.len() } else { 1 };
    let mut finals = Vec::with_capacity(replies);
    for _ in 0..replies {
        match conn.reply_within(final_wait).await {
            Ok(r) => finals.push(r.outcome()),
            Err(e) => {
                let m = match e {
                    SmtpError::Temporary(m) | SmtpError::Permanent(m) => m,
                };
                let o = RcptOutcome::Temporary(format!("no final reply after the message: {m}"));
                finals.resize(replies, o);
                break;
            }
        }
    }
    if lmtp {
        for (&i, o) in accepted.iter().zip(finals) {
            outcomes[i] = o;
        }
    } else {
        let o = finals.pop().expect("one reply");
        for &i in &accepted {
            outcomes[i] = o.clone();
        }
    }
    Ok(outcomes)
}

fn trim_newline(s: &[u8]) -> &[u8] {
    let s = s.strip_suffix(b"\n").unwrap_or(s);
    s.strip_suffix(b"\r").unwrap_or(s)
}

#[cfg(test)]
mod tests;
