//! `[metrics]`: the Prometheus/OpenMetrics endpoint (`GET /metrics`, plain
//! HTTP). Absent, there is no endpoint.
//!
//! Safe by default: the listener is `127.0.0.1:9465`. A listener on a
//! non-loopback address is refused unless `allow_networks` names the
//! networks that may scrape (every other peer is dropped before a byte is
//! read). An optional `bearer_token` (a secret reference, compared in
//! constant time) is required from every scraper when set.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use super::Network;
use crate::secret::SecretRef;

/// The `[metrics]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Plain-HTTP listeners of `GET /metrics`.
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// Peers that may scrape. Empty (the default): loopback peers only,
    /// and only loopback listeners are allowed.
    #[serde(default)]
    pub allow_networks: Vec<Network>,
    /// `Authorization: Bearer <token>` required from scrapers when set.
    #[serde(default)]
    pub bearer_token: Option<SecretRef>,
}

fn default_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], 9465))]
}

impl MetricsConfig {
    /// Makes a relative `file:` token path relative to `base`.
    pub fn finish(&mut self, base: &Path) {
        if let Some(t) = &mut self.bearer_token {
            t.resolve_against(base);
        }
    }

    /// Checks what the parser cannot. The message names the key and never
    /// holds the token.
    pub fn check(&self) -> Result<(), String> {
        if self.listen.is_empty() {
            return Err("[metrics] listen must name at least one address (leave it out for 127.0.0.1:9465)".into());
        }
        if self.allow_networks.is_empty() {
            if let Some(a) = self.listen.iter().find(|a| !a.ip().is_loopback()) {
                return Err(format!(
                    "[metrics] listen: {a} is not a loopback address; list the networks that may scrape in \
                     [metrics] allow_networks"
                ));
            }
        }
        Ok(())
    }

    /// Whether `peer` may scrape.
    pub fn allows(&self, peer: std::net::IpAddr) -> bool {
        let peer = peer.to_canonical();
        if self.allow_networks.is_empty() {
            peer.is_loopback()
        } else {
            self.allow_networks.iter().any(|n| n.contains(peer))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const MIN: &str = "[store]\nbackend = \"sqlite\"\npath = \"x.db\"\nmaster_key = \"file:master.key\"\n\
                       [tls]\ncertificate = \"c.pem\"\nprivate_key = \"file:k.pem\"\n";

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("{MIN}{extra}"), Path::new("/etc/p3x/c.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn absent_means_off_and_an_empty_section_listens_on_loopback() {
        assert!(parse("").unwrap().metrics.is_none());
        let m = parse("[metrics]\n").unwrap().metrics.unwrap();
        assert_eq!(m.listen, vec!["127.0.0.1:9465".parse::<SocketAddr>().unwrap()]);
        assert!(m.bearer_token.is_none());
        assert!(m.allows("127.0.0.1".parse().unwrap()));
        assert!(m.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!m.allows("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn a_public_listener_needs_allow_networks() {
        let e = parse("[metrics]\nlisten = [\"0.0.0.0:9465\"]\n").unwrap_err();
        assert!(e.contains("[metrics] listen") && e.contains("allow_networks"), "{e}");
        let m = parse("[metrics]\nlisten = [\"0.0.0.0:9465\"]\nallow_networks = [\"192.0.2.0/24\"]\n")
            .unwrap()
            .metrics
            .unwrap();
        assert!(m.allows("192.0.2.9".parse().unwrap()));
        assert!(!m.allows("198.51.100.1".parse().unwrap()));
        assert!(!m.allows("127.0.0.1".parse().unwrap()), "an explicit list is the whole list");
        let e = parse("[metrics]\nlisten = []\n").unwrap_err();
        assert!(e.contains("[metrics] listen"), "{e}");
    }

    #[test]
    fn the_token_is_a_reference_resolved_against_the_config_folder() {
        let e = parse("[metrics]\nbearer_token = \"s3cret-literal\"\n").unwrap_err();
        assert!(e.contains("bearer_token") || e.contains("secret reference"), "{e}");
        assert!(!e.contains("s3cret-literal"), "the literal never shows: {e}");
        let m = parse("[metrics]\nbearer_token = \"file:metrics.token\"\n").unwrap().metrics.unwrap();
        assert_eq!(m.bearer_token, Some(SecretRef::File("/etc/p3x/metrics.token".into())));
        let e = parse("[metrics]\nport = 1\n").unwrap_err();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn the_example_documents_the_section_and_it_parses_uncommented() {
        let ex = crate::config::EXAMPLE;
        let start = ex.find("# [metrics]").expect("[metrics] in the example");
        let block: String = ex[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter(|l| l.starts_with("# [") || l.starts_with("# listen") || l.contains(" = "))
            .map(|l| l.trim_start_matches("# "))
            .collect::<Vec<_>>()
            .join("\n");
        for key in ["listen", "allow_networks", "bearer_token"] {
            assert!(block.contains(key), "{key} not documented: {block}");
        }
        let m = parse(&format!("{block}\n")).unwrap().metrics.unwrap();
        assert!(m.bearer_token.is_some());
    }
}
