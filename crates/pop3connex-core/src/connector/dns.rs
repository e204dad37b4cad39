//! DNSSEC-validating resolver for MX, TLSA and MTA-STS lookups.
//!
//! Built on hickory-resolver 0.26 with `ResolverOpts::validate` on: every
//! response goes through hickory's `DnssecDnsHandle`, which fetches the
//! DNSKEY/DS chain from the configured resolvers (they are asked with RD and
//! DO set, as a stub resolver would) and stamps each answer record with a
//! `Proof` (`record.proof`): `Secure`, `Insecure` (provably unsigned, e.g. a
//! delegation without DS proven by NSEC/NSEC3), `Bogus` or `Indeterminate`.
//! hickory's caching client turns a response with any bogus answer into
//! `DnsError::DnssecBogus`, and a negative answer whose denial of existence
//! does not validate into `DnsError::Nsec { proof: Bogus }`. This module maps
//! those to [`Security`] and [`DnsError::Bogus`], failing closed: a record
//! whose proof is `Indeterminate` counts as bogus too. Proofs of
//! non-existence are validated the same way, so a forged "no TLSA" or "no
//! AAAA" in a signed zone is `Bogus`, not `NotFound`. Because the chain is
//! built from NS, DS and DNSKEY queries to the same servers, an
//! authoritative server hosting the parent and child zones also works as
//! the "resolver" (tests/system/test_connector_dns.py does this with NSD).
//!
//! Trust anchors: the file at `trust_anchor_file` holds DNSKEY and/or DS
//! records in zone-file form (`owner [ttl] [IN] DNSKEY|DS rdata`, `;`
//! comments, parentheses spanning lines). DNSKEY anchors are used directly;
//! DS anchors are turned into DNSKEY anchors on first use by fetching the
//! owner's DNSKEY RRset and keeping the keys whose digest matches (the RRset
//! itself is then validated by hickory against those keys). Without a file,
//! hickory's built-in root KSKs (2017 and 2024) are the anchors.
//!
//! Names: only ASCII LDH host names (RFC 952/1123 labels, at most 63 octets
//! each and 253 in all) are looked up; `_` is allowed in the first labels of
//! TXT names (`_mta-sts.`). Internationalised names must be given in their
//! A-label (`xn--`) form; U-labels are refused rather than converted.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as HDnsError, NetError};
use hickory_resolver::proto::dnssec::rdata::{DNSSECRData, DS};
use hickory_resolver::proto::dnssec::{Algorithm, DigestType, Proof, TrustAnchors};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{LowerName, Name, RData, RecordType};
use hickory_resolver::TokioResolver;

use crate::config::connector::DnsConfig;

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

impl Security {
    /// The weaker of two statuses (a chain is only as secure as its weakest link).
    pub fn min(self, other: Security) -> Security {
        use Security::*;
        match (self, other) {
            (Bogus, _) | (_, Bogus) => Bogus,
            (Insecure, _) | (_, Insecure) => Insecure,
            _ => Secure,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Security::Secure => "secure",
            Security::Insecure => "insecure",
            Security::Bogus => "bogus",
        }
    }
}

impl std::fmt::Display for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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

/// Lookups that may take this many resolver timeouts in all (the validation
/// chain needs several queries).
const TIMEOUTS_PER_LOOKUP: u32 = 4;
/// Largest trust anchor file read.
const MAX_ANCHOR_FILE: u64 = 1 << 20;

/// A DS trust anchor waiting to be turned into DNSKEY anchors.
#[derive(Debug, Clone)]
struct DsAnchor {
    owner: Name,
    ds: DS,
}

/// Parsed contents of a trust anchor file.
#[derive(Debug, Default)]
struct AnchorFile {
    /// DNSKEY records in the canonical `owner IN DNSKEY rdata` form hickory parses.
    dnskeys: Vec<String>,
    ds: Vec<DsAnchor>,
}

pub struct Resolver {
    config: ResolverConfig,
    opts: ResolverOpts,
    timeout: Duration,
    /// Anchors known so far (DNSKEY anchors; DS anchors added on first use).
    anchors: TrustAnchors,
    ds: Vec<DsAnchor>,
    validating: tokio::sync::OnceCell<TokioResolver>,
    /// Why no resolver can be built (no usable /etc/resolv.conf): reported
    /// by every lookup instead of failing at start, so a server without
    /// MX-delivering accounts does not need DNS at all.
    unavailable: Option<String>,
}

impl Resolver {
    pub fn new(cfg: &DnsConfig) -> Result<Resolver, DnsError> {
        let mut unavailable = None;
        let (config, mut opts) = if cfg.nameservers.is_empty() {
            hickory_resolver::system_conf::read_system_conf().unwrap_or_else(|e| {
                unavailable =
                    Some(format!("no resolver: reading /etc/resolv.conf: {e}; set [connector.dns] nameservers"));
                (ResolverConfig::from_parts(None, vec![], vec![]), ResolverOpts::default())
            })
        } else {
            let servers = cfg
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            (ResolverConfig::from_parts(None, vec![], servers), ResolverOpts::default())
        };
        let timeout = Duration::from_millis(cfg.timeout_ms);
        opts.timeout = timeout;
        opts.attempts = 2;
        opts.validate = true;
        opts.edns0 = true;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.try_tcp_on_error = true;
        opts.recursion_desired = true;
        opts.ndots = 0;
        let (anchors, ds) = match &cfg.trust_anchor_file {
            None => (TrustAnchors::default(), Vec::new()),
            Some(path) => {
                let text = read_anchor_file(path)?;
                let parsed = parse_anchor_file(&text)
                    .map_err(|e| DnsError::Temporary(format!("trust anchor file {}: {e}", path.display())))?;
                let anchors = if parsed.dnskeys.is_empty() {
                    TrustAnchors::empty()
                } else {
                    TrustAnchors::from_str(&parsed.dnskeys.join("\n")).map_err(|e| {
                        DnsError::Temporary(format!("trust anchor file {}: DNSKEY: {e}", path.display()))
                    })?
                };
                (anchors, parsed.ds)
            }
        };
        Ok(Resolver { config, opts, timeout, anchors, ds, validating: tokio::sync::OnceCell::new(), unavailable })
    }

    fn builder(&self) -> hickory_resolver::ResolverBuilder<TokioRuntimeProvider> {
        TokioResolver::builder_with_config(self.config.clone(), TokioRuntimeProvider::default())
            .with_options(self.opts.clone())
    }

    /// The validating resolver, built on first use (DS anchors need a lookup).
    async fn resolver(&self) -> Result<&TokioResolver, DnsError> {
        if let Some(why) = &self.unavailable {
            return Err(DnsError::Temporary(why.clone()));
        }
        self.validating
            .get_or_try_init(|| async {
                let mut anchors = self.anchors.clone();
                if !self.ds.is_empty() {
                    self.add_ds_anchors(&mut anchors).await?;
                }
                self.builder()
                    .with_trust_anchor(Arc::new(anchors))
                    .build()
                    .map_err(|e| DnsError::Temporary(format!("resolver: {e}")))
            })
            .await
    }

    /// Fetches the DNSKEYs of each DS anchor's owner (without validation:
    /// the DS digest is what authenticates them) and trusts the matching ones.
    async fn add_ds_anchors(&self, anchors: &mut TrustAnchors) -> Result<(), DnsError> {
        let mut opts = self.opts.clone();
        opts.validate = false;
        let plain = TokioResolver::builder_with_config(self.config.clone(), TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| DnsError::Temporary(format!("resolver: {e}")))?;
        let mut owners: Vec<&Name> = self.ds.iter().map(|d| &d.owner).collect();
        owners.dedup();
        for owner in owners {
            let lookup = self.bounded(plain.lookup(owner.clone(), RecordType::DNSKEY)).await;
            let lookup = lookup.map_err(|e| DnsError::Temporary(format!("DNSKEY of trust anchor {owner}: {e}")))?;
            let mut matched = 0;
            for r in lookup.answers() {
                let RData::DNSSEC(DNSSECRData::DNSKEY(key)) = &r.data else { continue };
                let covered =
                    self.ds.iter().filter(|d| &d.owner == owner).any(|d| d.ds.covers(owner, key).unwrap_or(false));
                if covered && !key.revoke() {
                    anchors.insert_with_name(key.public_key(), LowerName::new(owner));
                    matched += 1;
                }
            }
            if matched == 0 {
                return Err(DnsError::Bogus(format!("trust anchor {owner}: no DNSKEY matches the DS anchor")));
            }
        }
        Ok(())
    }

    async fn bounded<T>(&self, f: impl std::future::Future<Output = Result<T, NetError>>) -> Result<T, NetError> {
        match tokio::time::timeout(self.timeout * TIMEOUTS_PER_LOOKUP, f).await {
            Ok(r) => r,
            Err(_) => Err(NetError::Timeout),
        }
    }

    /// One validated lookup: the answer records of `rtype` with their
    /// combined security, or the mapped error.
    async fn query(&self, name: &str, rtype: RecordType) -> Result<(Security, Vec<RData>), DnsError> {
        let fqdn = Name::from_ascii(format!("{name}."))
            .map_err(|e| DnsError::NotFound(format!("`{name}` is not a valid domain name: {e}")))?;
        let resolver = self.resolver().await?;
        let result = self.bounded(resolver.lookup(fqdn, rtype)).await;
        answer_of(name, rtype, result)
    }

    /// MX hosts by preference; the domain itself when it has no MX (RFC 5321
    /// section 5.1); `NotFound` for a null MX (RFC 7505).
    pub async fn mx(&self, domain: &str) -> Result<(Security, Vec<String>), DnsError> {
        let domain = check_name(domain, false)?;
        match self.query(&domain, RecordType::MX).await {
            Ok((sec, rdata)) => {
                let mut mx: Vec<(u16, Name)> = rdata
                    .into_iter()
                    .filter_map(|r| match r {
                        RData::MX(mx) => Some((mx.preference, mx.exchange)),
                        _ => None,
                    })
                    .collect();
                if mx.iter().any(|(_, host)| host.is_root()) {
                    return Err(DnsError::NotFound(format!("{domain} does not accept mail (null MX)")));
                }
                mx.sort_by_key(|(pref, _)| *pref);
                let hosts: Vec<String> =
                    mx.iter().filter_map(|(_, host)| check_name(&host.to_ascii(), false).ok()).collect();
                if hosts.is_empty() {
                    return Err(DnsError::NotFound(format!("{domain} has no usable MX host")));
                }
                Ok((sec, hosts))
            }
            Err(DnsError::NotFound(_)) => {
                // No MX RRset (NODATA): the implicit MX is the domain itself
                // if it has addresses. A forged NODATA in a signed zone would
                // have failed validation (Bogus) above, so the address
                // lookup's status is the status of the whole answer.
                let (sec, _) = self.addresses(&domain).await?;
                Ok((sec, vec![domain]))
            }
            Err(e) => Err(e),
        }
    }

    /// A and AAAA records (IPv6 first as returned; NotFound when neither exists).
    pub async fn addresses(&self, host: &str) -> Result<(Security, Vec<IpAddr>), DnsError> {
        let host = check_name(host, false)?;
        let (v4, v6) = tokio::join!(self.query(&host, RecordType::A), self.query(&host, RecordType::AAAA));
        let mut sec = None::<Security>;
        let mut addrs = Vec::new();
        let mut not_found = None;
        for result in [v4, v6] {
            match result {
                Ok((s, rdata)) => {
                    sec = Some(sec.map_or(s, |x| x.min(s)));
                    addrs.extend(rdata.into_iter().filter_map(|r| r.ip_addr()));
                }
                Err(e @ (DnsError::Bogus(_) | DnsError::Temporary(_))) => return Err(e),
                Err(e @ DnsError::NotFound(_)) => not_found = Some(e),
            }
        }
        match (sec, not_found) {
            (Some(s), _) if !addrs.is_empty() => Ok((s, addrs)),
            (_, Some(e)) => Err(e),
            _ => Err(DnsError::NotFound(format!("{host} has no addresses"))),
        }
    }

    /// TLSA records at `_port._tcp.host`.
    pub async fn tlsa(&self, host: &str, port: u16) -> Result<(Security, Vec<TlsaRecord>), DnsError> {
        let host = check_name(host, false)?;
        let name = format!("_{port}._tcp.{host}");
        let (sec, rdata) = self.query(&name, RecordType::TLSA).await?;
        let records: Vec<TlsaRecord> = rdata
            .into_iter()
            .filter_map(|r| match r {
                RData::TLSA(t) => Some(TlsaRecord {
                    usage: t.cert_usage.into(),
                    selector: t.selector.into(),
                    matching: t.matching.into(),
                    data: t.cert_data,
                }),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return Err(DnsError::NotFound(format!("no TLSA records at {name}")));
        }
        Ok((sec, records))
    }

    /// TXT records, each the concatenation of its character-strings (RFC
    /// 7208 section 3.3 style); strings that are not UTF-8 are converted lossily.
    pub async fn txt(&self, name: &str) -> Result<(Security, Vec<String>), DnsError> {
        let name = check_name(name, true)?;
        let (sec, rdata) = self.query(&name, RecordType::TXT).await?;
        let texts: Vec<String> = rdata
            .into_iter()
            .filter_map(|r| match r {
                RData::TXT(t) => {
                    let bytes: Vec<u8> = t.txt_data.iter().flat_map(|s| s.iter().copied()).collect();
                    Some(String::from_utf8_lossy(&bytes).into_owned())
                }
                _ => None,
            })
            .collect();
        if texts.is_empty() {
            return Err(DnsError::NotFound(format!("no TXT records at {name}")));
        }
        Ok((sec, texts))
    }
}

/// Maps a hickory lookup result to the answer's security and record data.
fn answer_of(
    name: &str,
    rtype: RecordType,
    result: Result<Lookup, NetError>,
) -> Result<(Security, Vec<RData>), DnsError> {
    let what = format!("{name} {rtype}");
    match result {
        Ok(lookup) => {
            let mut sec = Security::Secure;
            let mut data = Vec::new();
            for r in lookup.answers() {
                let t = r.record_type();
                if t == RecordType::RRSIG {
                    continue;
                }
                // CNAMEs on the way count towards the status too.
                sec = sec.min(security_of(r.proof));
                if t == rtype {
                    data.push(r.data.clone());
                }
            }
            if sec == Security::Bogus {
                return Err(DnsError::Bogus(what));
            }
            if data.is_empty() {
                return Err(DnsError::NotFound(format!("no {rtype} records for {name}")));
            }
            Ok((sec, data))
        }
        Err(NetError::Dns(HDnsError::DnssecBogus)) => Err(DnsError::Bogus(what)),
        Err(NetError::Dns(HDnsError::Nsec { proof, .. })) => match proof {
            Proof::Secure | Proof::Insecure => Err(DnsError::NotFound(format!("no {rtype} records for {name}"))),
            Proof::Bogus | Proof::Indeterminate => Err(DnsError::Bogus(what)),
        },
        Err(NetError::Dns(HDnsError::NoRecordsFound(nr))) => {
            if nr.response_code == ResponseCode::NXDomain {
                Err(DnsError::NotFound(format!("{name} does not exist")))
            } else {
                Err(DnsError::NotFound(format!("no {rtype} records for {name}")))
            }
        }
        Err(e) => Err(DnsError::Temporary(format!("{what}: {e}"))),
    }
}

fn security_of(p: Proof) -> Security {
    match p {
        Proof::Secure => Security::Secure,
        Proof::Insecure => Security::Insecure,
        // Unvalidated data is treated like data that failed validation.
        Proof::Bogus | Proof::Indeterminate => Security::Bogus,
    }
}

/// Checks and normalises a domain name: ASCII LDH labels, lower case, no
/// trailing dot. `underscore_labels` allows leading `_label`s (TXT names).
pub fn check_name(name: &str, underscore_labels: bool) -> Result<String, DnsError> {
    let bad = |why: &str| DnsError::NotFound(format!("`{}` is not a valid host name: {why}", name.escape_debug()));
    let n = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if n.is_empty() || n.len() > 253 {
        return Err(bad("empty or longer than 253 characters"));
    }
    let mut leading = true;
    for label in n.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("empty label or label longer than 63 characters"));
        }
        let body = match label.strip_prefix('_') {
            Some(rest) if underscore_labels && leading => rest,
            _ => {
                leading = false;
                label
            }
        };
        if body.is_empty() || body.starts_with('-') || body.ends_with('-') {
            return Err(bad("labels must not start or end with '-'"));
        }
        if !body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(bad("only letters, digits and '-' are allowed (IDNs in xn-- form)"));
        }
    }
    if !n.contains('.') {
        return Err(bad("not a fully qualified name"));
    }
    if n.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err(bad("an address literal or an all-numeric top-level label"));
    }
    Ok(n)
}

fn read_anchor_file(path: &std::path::Path) -> Result<String, DnsError> {
    use std::io::Read;
    let err = |e: String| DnsError::Temporary(format!("trust anchor file {}: {e}", path.display()));
    let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut text = String::new();
    f.take(MAX_ANCHOR_FILE + 1).read_to_string(&mut text).map_err(|e| err(e.to_string()))?;
    if text.len() as u64 > MAX_ANCHOR_FILE {
        return Err(err("larger than 1 MiB".into()));
    }
    Ok(text)
}

/// Splits zone-file text into records (tokens), dropping comments and
/// joining parenthesised continuations.
fn zone_records(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut records = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut depth = 0usize;
    for line in text.lines() {
        let line = match line.find(';') {
            Some(i) => &line[..i],
            None => line,
        };
        if line.contains('"') {
            return Err("quoted strings are not allowed in trust anchor files".into());
        }
        let spaced = line.replace('(', " ( ").replace(')', " ) ");
        for tok in spaced.split_whitespace() {
            match tok {
                "(" => depth += 1,
                ")" => depth = depth.checked_sub(1).ok_or("unbalanced ')'")?,
                t => current.push(t.to_owned()),
            }
        }
        if depth == 0 && !current.is_empty() {
            records.push(std::mem::take(&mut current));
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    Ok(records)
}

fn parse_anchor_file(text: &str) -> Result<AnchorFile, String> {
    let mut out = AnchorFile::default();
    for rec in zone_records(text)? {
        if rec[0].starts_with('$') {
            return Err(format!("directive {} is not supported", rec[0]));
        }
        let owner = Name::from_ascii(&rec[0]).map_err(|e| format!("owner `{}`: {e}", rec[0]))?;
        if !owner.is_fqdn() {
            return Err(format!("owner `{}` must end with '.'", rec[0]));
        }
        // Skip an optional TTL and class, in either order.
        let mut i = 1;
        while i < rec.len() && (rec[i].eq_ignore_ascii_case("IN") || rec[i].bytes().all(|b| b.is_ascii_digit())) {
            i += 1;
        }
        let rtype = rec.get(i).map(|t| t.to_ascii_uppercase()).unwrap_or_default();
        let rdata = &rec[(i + 1).min(rec.len())..];
        match rtype.as_str() {
            "DNSKEY" => out.dnskeys.push(format!("{owner} IN DNSKEY {}", rdata.join(" "))),
            "DS" => {
                if rdata.len() < 4 {
                    return Err(format!("DS record for {owner} needs key tag, algorithm, digest type and digest"));
                }
                let num =
                    |s: &str| s.parse::<u16>().map_err(|_| format!("DS record for {owner}: `{s}` is not a number"));
                let key_tag = num(&rdata[0])?;
                let alg = u8::try_from(num(&rdata[1])?).map_err(|_| format!("DS for {owner}: bad algorithm"))?;
                let dt = u8::try_from(num(&rdata[2])?).map_err(|_| format!("DS for {owner}: bad digest type"))?;
                let hex: String = rdata[3..].concat();
                let digest = decode_hex(&hex).ok_or_else(|| format!("DS record for {owner}: digest is not hex"))?;
                let digest_type = DigestType::from(dt);
                if !digest_type.is_supported() {
                    return Err(format!("DS record for {owner}: digest type {dt} is not supported"));
                }
                out.ds.push(DsAnchor { owner, ds: DS::new(key_tag, Algorithm::from_u8(alg), digest_type, digest) });
            }
            other => return Err(format!("only DNSKEY and DS records are allowed, found `{other}`")),
        }
    }
    if out.dnskeys.is_empty() && out.ds.is_empty() {
        return Err("no DNSKEY or DS records".into());
    }
    Ok(out)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_normalised() {
        assert_eq!(check_name("Mail.Example.COM.", false).unwrap(), "mail.example.com");
        assert_eq!(check_name("xn--bcher-kva.example", false).unwrap(), "xn--bcher-kva.example");
        assert_eq!(check_name("_mta-sts.example.com", true).unwrap(), "_mta-sts.example.com");
        assert_eq!(check_name("_25._tcp.mx.example.com", true).unwrap(), "_25._tcp.mx.example.com");
        for bad in [
            "",
            ".",
            "localhost",
            "a..b",
            "-a.example",
            "a-.example",
            "a b.example",
            "bücher.example",
            "x\u{0}.example",
            "192.0.2.1",
            "_mta-sts.example.com",
            "mx._x.example",
            &format!("{}.example", "a".repeat(64)),
            &format!("{}example", "a.".repeat(127)),
        ] {
            assert!(check_name(bad, false).is_err(), "{bad:?} accepted");
        }
        assert!(check_name("mx._x.example", true).is_err());
        assert!(check_name("_.example", true).is_err());
    }

    #[test]
    fn security_min() {
        use Security::*;
        assert_eq!(Secure.min(Secure), Secure);
        assert_eq!(Secure.min(Insecure), Insecure);
        assert_eq!(Insecure.min(Bogus), Bogus);
        assert_eq!(security_of(Proof::Indeterminate), Bogus);
    }

    #[test]
    fn anchor_file_with_dnskey_and_ds() {
        let text = "; test anchors\n\
            test. 3600 IN DNSKEY 257 3 13 ( mdsswUyr3DPW132mOi8V9xESWE8jTo0d\n\
                xCjjnopKl+GqJxpVXckHAeF+KkxLbxILfDLUT0rAK9iUzy1L53eKGQ== ) ; KSK\n\
            example. IN 86400 DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D\n";
        let a = parse_anchor_file(text).unwrap();
        assert_eq!(a.dnskeys.len(), 1);
        assert!(TrustAnchors::from_str(&a.dnskeys.join("\n")).is_ok());
        assert_eq!(a.ds.len(), 1);
        assert_eq!(a.ds[0].owner.to_ascii(), "example.");
        assert_eq!(a.ds[0].ds.key_tag(), 20326);
        assert_eq!(a.ds[0].ds.digest().len(), 32);
        for bad in [
            "",
            "; nothing\n",
            "test. IN A 127.0.0.1\n",
            "test IN DS 1 8 2 00\n",
            "test. IN DS 1 8 2 0g\n",
            "test. IN DS 1 8 9 00\n",
            "test. IN DNSKEY ( 257 3 13\n",
            "$ORIGIN test.\n",
        ] {
            assert!(parse_anchor_file(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn resolver_reads_anchor_file() {
        let dir = std::env::temp_dir().join(format!("pop3connex-dns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("anchor.key");
        std::fs::write(&path, "test. IN DNSKEY 257 3 13 mdsswUyr3DPW132mOi8V9xESWE8jTo0dxCjjnopKl+GqJxpVXckHAeF+KkxLbxILfDLUT0rAK9iUzy1L53eKGQ==\n").unwrap();
        let cfg = DnsConfig {
            nameservers: vec!["127.0.0.1:53".parse().unwrap()],
            trust_anchor_file: Some(path.clone()),
            ..DnsConfig::default()
        };
        assert!(Resolver::new(&cfg).is_ok());
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(Resolver::new(&cfg).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn garbage_names_are_refused_without_a_query() {
        // A server that never answers: the lookups must fail on the name.
        let cfg = DnsConfig { nameservers: vec!["127.0.0.1:9".parse().unwrap()], ..DnsConfig::default() };
        let r = Resolver::new(&cfg).unwrap();
        assert!(matches!(r.mx("exa mple.com").await, Err(DnsError::NotFound(_))));
        assert!(matches!(r.addresses("a..b").await, Err(DnsError::NotFound(_))));
        assert!(matches!(r.tlsa("-x.example", 25).await, Err(DnsError::NotFound(_))));
        assert!(matches!(r.txt("x\n.example").await, Err(DnsError::NotFound(_))));
    }
}
