//! `pop3connex connector dns-check DOMAIN`: a human-readable report of what
//! MX delivery to a domain would see: MX hosts and their DNSSEC status, the
//! DANE TLSA records of each MX (port 25) and the MTA-STS policy.

use std::fmt::Write as _;

use super::dns::{DnsError, Resolver};
use super::mtasts::PolicyCache;

/// SMTP port whose TLSA records are shown.
const SMTP_PORT: u16 = 25;

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn failure(e: &DnsError) -> String {
    match e {
        DnsError::Bogus(what) => format!("REFUSED: DNSSEC bogus ({what}): validation failed, not used"),
        DnsError::NotFound(m) => format!("none ({m})"),
        DnsError::Temporary(m) => format!("lookup failed ({m})"),
    }
}

/// The report for `domain`; never fails (failures are part of the report).
pub async fn check_domain(resolver: &Resolver, sts: &PolicyCache, domain: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "domain {domain}");
    match resolver.mx(domain).await {
        Ok((sec, hosts)) => {
            let _ = writeln!(out, "MX: DNSSEC {sec}");
            for host in &hosts {
                let _ = writeln!(out, "  mx {host}");
                match resolver.addresses(host).await {
                    Ok((s, addrs)) => {
                        let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                        let _ = writeln!(out, "    addresses: DNSSEC {s}: {}", list.join(", "));
                    }
                    Err(e) => {
                        let _ = writeln!(out, "    addresses: {}", failure(&e));
                    }
                }
                match resolver.tlsa(host, SMTP_PORT).await {
                    Ok((s, records)) => {
                        let usable =
                            if s == super::dns::Security::Secure { "usable for DANE" } else { "NOT usable for DANE" };
                        let _ = writeln!(out, "    TLSA _{SMTP_PORT}._tcp.{host}: DNSSEC {s} ({usable})");
                        for r in records {
                            let _ = writeln!(
                                out,
                                "      usage {} selector {} matching {} data {}",
                                r.usage,
                                r.selector,
                                r.matching,
                                hex(&r.data)
                            );
                        }
                    }
                    Err(e) => {
                        let _ = writeln!(out, "    TLSA _{SMTP_PORT}._tcp.{host}: {}", failure(&e));
                    }
                }
            }
        }
        Err(e) => {
            let _ = writeln!(out, "MX: {}", failure(&e));
        }
    }
    match sts.policy(resolver, domain).await {
        Ok(Some(p)) => {
            let _ = writeln!(out, "MTA-STS: mode {} max_age {}", p.mode.as_str(), p.max_age);
            for m in &p.mx {
                let _ = writeln!(out, "  mx pattern {m}");
            }
        }
        Ok(None) => {
            let _ = writeln!(out, "MTA-STS: none (no v=STSv1 TXT record at _mta-sts.{domain})");
        }
        Err(e) => {
            let _ = writeln!(out, "MTA-STS: {e}");
        }
    }
    out
}
