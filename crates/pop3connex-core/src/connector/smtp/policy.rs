//! The TLS policy decision for one downstream connection: from the
//! configured `tls` mode and what DNS (DANE) and MTA-STS say about the
//! destination, what the client must require of the server (no TLS,
//! verified TLS to which name, DANE) and whose identity that proves. A new
//! policy gets its row in the table below and its arm in [`fixed_tls`] or
//! [`mx_tls`]; the protocol exchange in [`super::client`] only obeys the
//! resulting [`TlsMode`].
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
//! |           |          | records (usage 2/3) → DANE ([`crate::connector::dane`]), mandatory            |
//! |           |          | TLSA Bogus or lookup failure → host skipped (temporary)            |
//! |           |          | no/insecure/unusable TLSA, or MX insecure → as `mta-sts`           |
//! | `mta-sts` | MX       | policy `enforce`: MX host must match the policy's `mx` patterns    |
//! |           |          | (else skipped), chain verified, name = MX host                     |
//! |           |          | policy `testing`/`none`, no policy, invalid policy: chain          |
//! |           |          | verified, name = MX host (never cleartext, never unverified)       |
//! |           |          | policy fetch failed temporarily → whole domain deferred            |

use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::ClientConfig;

use super::super::dane::DaneVerifier;
use super::super::dns::{DnsError, Security};
use super::super::mtasts::{Mode, MtaStsError, Policy};
use super::super::tlsclient;
use super::{temp, Lookup, SmtpError};
use crate::config::connector::{DownstreamConfig, DownstreamTls};
use crate::logtext::sanitize;

/// How one connection gets TLS.
#[derive(Clone)]
pub(super) enum TlsMode {
    Off,
    Required { config: Arc<ClientConfig>, name: ServerName<'static>, identity: Identity },
}

/// Where the server's identity comes from. It decides whether SMTP AUTH
/// credentials may be sent: only to a server the operator named or one
/// DNSSEC vouches for, never to a host whoever forges an unsigned DNS answer
/// could pick (a verified certificate for a name DNS handed us proves
/// nothing about who should get the relay password).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Identity {
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
pub(super) enum Sts {
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

/// The TLS for the configured `host` (not a `unix:` socket).
pub(super) fn fixed_tls(d: &DownstreamConfig, host: &str) -> Result<TlsMode, SmtpError> {
    match d.tls() {
        DownstreamTls::None => Ok(TlsMode::Off),
        DownstreamTls::Verify | DownstreamTls::Secure => verified(d, host, Identity::Fixed),
        DownstreamTls::Dane | DownstreamTls::MtaSts => {
            Err(temp("tls = \"dane\"/\"mta-sts\" apply to MX delivery only"))
        }
    }
}

/// What the policy makes of one MX host.
pub(super) enum MxTls {
    /// Connect with this TLS.
    Use(TlsMode),
    /// This host must not be used; the next one may.
    Skip(SmtpError),
}

/// The TLS for MX host `host` (lower case, no trailing dot) of `domain`;
/// `mx_sec` and `addr_sec` are the DNSSEC states of the MX and the host's
/// address answers, `sts` the domain's MTA-STS state (fetched at most once
/// per delivery). `Err` defers the whole domain (an MTA-STS policy that
/// cannot be fetched).
#[allow(clippy::too_many_arguments)]
pub(super) async fn mx_tls<L: Lookup>(
    d: &DownstreamConfig,
    lookup: &L,
    domain: &str,
    host: &str,
    port: u16,
    mx_sec: Security,
    addr_sec: Security,
    sts: &mut Sts,
) -> Result<MxTls, SmtpError> {
    let policy = d.tls();
    let tls = match policy {
        // Refused for MX delivery before any lookup; kept here so the match
        // stays exhaustive without a panic.
        DownstreamTls::None => Err(temp("tls = \"none\" is not allowed for MX delivery")),
        DownstreamTls::Verify => verified(d, host, Identity::UnsignedMx),
        DownstreamTls::Secure => secure_mx(d, domain, host),
        DownstreamTls::Dane | DownstreamTls::MtaSts => {
            let secure_path =
                policy == DownstreamTls::Dane && mx_sec == Security::Secure && addr_sec == Security::Secure;
            match dane_for(lookup, secure_path, host, port).await {
                Dane::Use(v) => dane_tls(v, host),
                Dane::Unusable(m) => Err(temp(m)),
                Dane::NotApplicable => {
                    // A policy that cannot be fetched defers the whole domain.
                    sts_state(lookup, domain, sts).await?;
                    match &*sts {
                        Sts::Enforce(p) if !p.mx_matches(host) => {
                            Err(temp(format!("MX host {host} is not allowed by the MTA-STS policy")))
                        }
                        _ => verified(d, host, Identity::UnsignedMx),
                    }
                }
            }
        }
    };
    Ok(match tls {
        Ok(t) => MxTls::Use(t),
        Err(e) => MxTls::Skip(e),
    })
}
