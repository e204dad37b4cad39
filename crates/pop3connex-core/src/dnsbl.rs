//! DNS blocklist (DNSBL, RFC 5782) lookups at accept.
//!
//! For address a.b.c.d and zone Z the query is `d.c.b.a.Z` (IPv6: 32
//! reversed nibbles). An A record in 127.0.0.0/8 means "listed", except
//! 127.255.255.0/24, which blocklist operators use for errors (such as
//! "queries through public resolvers are refused") and which must never
//! block anyone. Lookups are bounded by a timeout and fail open; results,
//! positive and negative, are cached per address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use crate::config::AbuseConfig;

/// How long a lookup result is reused.
const CACHE_SECS: i64 = 600;
/// Cached addresses before the cache is swept.
const MAX_CACHED: usize = 50_000;

pub struct Dnsbl {
    zones: Vec<String>,
    resolver: TokioResolver,
    timeout: Duration,
    /// Address → (listing zone if listed, expiry).
    cache: Mutex<HashMap<IpAddr, (Option<String>, i64)>>,
}

impl Dnsbl {
    /// `Ok(None)` when no zone is configured.
    pub fn new(cfg: &AbuseConfig) -> Result<Option<Self>, String> {
        if cfg.dnsbl.is_empty() {
            return Ok(None);
        }
        let mut builder = match cfg.dnsbl_resolver {
            Some(addr) => TokioResolver::builder_with_config(resolver_at(addr), TokioRuntimeProvider::default()),
            None => TokioResolver::builder_tokio().map_err(|e| format!("DNSBL resolver: {e}"))?,
        };
        let timeout = Duration::from_millis(cfg.dnsbl_timeout_ms);
        builder.options_mut().timeout = timeout;
        builder.options_mut().attempts = 1;
        let resolver = builder.build().map_err(|e| format!("DNSBL resolver: {e}"))?;
        let zones = cfg.dnsbl.iter().map(|z| z.trim_end_matches('.').to_ascii_lowercase()).collect();
        Ok(Some(Self { zones, resolver, timeout, cache: Mutex::new(HashMap::new()) }))
    }

    /// The first zone listing `ip`, if any. Never waits longer than the
    /// configured timeout; errors and timeouts count as "not listed".
    pub async fn listed(&self, ip: IpAddr) -> Option<String> {
        let now = crate::types::unix_now();
        if let Some((zone, until)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&ip) {
            if *until > now {
                return zone.clone();
            }
        }
        let lookups = async {
            for zone in &self.zones {
                if let Ok(answer) = self.resolver.ipv4_lookup(query_name(ip, zone)).await {
                    let listing = |r: &hickory_resolver::proto::rr::Record| matches!(&r.data, hickory_resolver::proto::rr::RData::A(a) if is_listing(a.0));
                    if answer.answers().iter().any(listing) {
                        return Some(zone.clone());
                    }
                }
            }
            None
        };
        let result = match tokio::time::timeout(self.timeout * self.zones.len() as u32, lookups).await {
            Ok(r) => r,
            Err(_) => {
                tracing::debug!(%ip, "DNSBL lookup timed out; allowing");
                return None;
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(ip, (result.clone(), now + CACHE_SECS));
        result
    }
}

fn resolver_at(addr: SocketAddr) -> ResolverConfig {
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    ResolverConfig::from_parts(None, vec![], vec![NameServerConfig::new(addr.ip(), true, vec![udp, tcp])])
}

/// A listing answer: 127.0.0.0/8 except the 127.255.255.0/24 error codes.
fn is_listing(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 127 && !(o[1] == 255 && o[2] == 255)
}

/// `d.c.b.a.zone.` or the reversed IPv6 nibbles, fully qualified.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.{zone}.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut labels = String::with_capacity(64 + zone.len());
            for byte in v6.octets().iter().rev() {
                labels.push_str(&format!("{:x}.{:x}.", byte & 0x0f, byte >> 4));
            }
            format!("{labels}{zone}.")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_follow_rfc5782() {
        assert_eq!(query_name("192.0.2.99".parse().unwrap(), "dnsbl.example"), "99.2.0.192.dnsbl.example.");
        // RFC 5782 section 2.4 example address.
        assert_eq!(
            query_name("2001:db8:1:2:3:4:567:89ab".parse().unwrap(), "ugly.example.com"),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com."
        );
        assert!(is_listing("127.0.0.2".parse().unwrap()));
        assert!(!is_listing("127.255.255.254".parse().unwrap()), "operator error codes never block");
        assert!(!is_listing("10.0.0.2".parse().unwrap()));
    }
}
