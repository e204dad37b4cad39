//! `[anomaly]`: built-in anomaly detection on the event stream.

use std::path::PathBuf;

use serde::Deserialize;

use super::Network;

/// `[anomaly]`: rules that watch the events and raise alert events
/// (catalogue 7xx). On by default with conservative thresholds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    pub enabled: bool,
    /// Failed logins from these networks never count (monitoring probes,
    /// a known office NAT), nor do their logins for the geography rules;
    /// they are still logged and stored.
    pub exempt_networks: Vec<Network>,
    /// Failed-login spikes across the whole server.
    pub server: SpikeRule,
    /// Failed-login spikes against one account (password spraying at one
    /// name is also slowed by lockouts; this tells someone).
    pub account: SpikeRule,
    /// Failed-login spikes from one network (IPv4 /24, IPv6 /64).
    pub network: SpikeRule,
    /// Addresses banned per minute across the server: many at once is a
    /// distributed attack (or a misfiring rule locking clients out).
    pub bans: SpikeRule,
    /// Octets one account retrieves per hour (the exfiltration signal).
    pub download: DownloadRule,
    /// Minutes between two alerts for the same rule and key.
    pub cooldown_minutes: u32,
    /// Distinct accounts and networks tracked at once (least recently
    /// seen forgotten first): bounds memory under a distributed attack.
    pub max_tracked: usize,
    /// `[anomaly.geo]`: where successful logins come from (new country,
    /// impossible travel); off unless `city_database` is set.
    pub geo: GeoConfig,
}

/// `[anomaly.geo]`: the geography rules on successful logins. They need a
/// GeoIP2/GeoLite2 City database (`city_database`); without one they are
/// off. Learned locations are kept in memory only (a restart forgets them).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GeoConfig {
    /// A GeoIP2 or GeoLite2 City database (`.mmdb`), read once at start.
    pub city_database: Option<PathBuf>,
    /// Optional GeoLite2 ASN (or GeoIP2 ISP) database: the alerts then name
    /// the network operator of both addresses.
    pub asn_database: Option<PathBuf>,
    /// Two logins further apart than this speed allows are impossible
    /// travel (900 km/h: an airliner).
    pub max_speed_kmh: f64,
    /// Jumps shorter than this never count (GeoIP locations are approximate).
    pub min_distance_km: f64,
    /// Logins from these networks (VPN egress, the office) never alert and
    /// are not remembered as locations.
    pub exempt_networks: Vec<Network>,
    /// Accounts the geography rules ignore (shared or service accounts).
    pub exempt_users: Vec<String>,
    /// Alert when an account logs in from a country it never used before.
    pub new_country: bool,
    /// Alert when two logins are too far apart for the time between them.
    pub impossible_travel: bool,
}

impl Default for GeoConfig {
    fn default() -> Self {
        GeoConfig {
            city_database: None,
            asn_database: None,
            max_speed_kmh: 900.0,
            min_distance_km: 50.0,
            exempt_networks: Vec::new(),
            exempt_users: Vec::new(),
            new_country: true,
            impossible_travel: true,
        }
    }
}

impl GeoConfig {
    /// Whether the geography rules run (a City database is configured and
    /// at least one rule is on).
    pub fn active(&self) -> bool {
        self.city_database.is_some() && (self.new_country || self.impossible_travel)
    }

    /// Resolves relative database paths against the configuration's folder.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        for p in [&mut self.city_database, &mut self.asn_database].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    pub fn check(&self) -> Result<(), String> {
        if !(self.max_speed_kmh.is_finite() && self.max_speed_kmh > 0.0) {
            return Err("[anomaly.geo] max_speed_kmh must be a positive number".into());
        }
        if !(self.min_distance_km.is_finite() && self.min_distance_km > 0.0) {
            return Err("[anomaly.geo] min_distance_km must be a positive number".into());
        }
        if self.asn_database.is_some() && self.city_database.is_none() {
            return Err("[anomaly.geo] asn_database needs city_database (the rules are off without it)".into());
        }
        if self.exempt_users.iter().any(|u| u.trim().is_empty()) {
            return Err("[anomaly.geo] exempt_users has an empty name".into());
        }
        for (key, path) in [("city_database", &self.city_database), ("asn_database", &self.asn_database)] {
            let Some(path) = path else { continue };
            let readable = std::fs::File::open(path).and_then(|f| f.metadata()).and_then(|m| {
                if m.is_file() {
                    Ok(())
                } else {
                    Err(std::io::Error::other("not a regular file"))
                }
            });
            if let Err(e) = readable {
                return Err(format!("[anomaly.geo] {key}: cannot read {}: {e}", path.display()));
            }
        }
        Ok(())
    }
}

/// One spike rule: an alert when the failures of the current minute reach
/// `absolute`, or reach `factor` times the key's own baseline (the
/// exponentially weighted average of its last `baseline_minutes` minutes,
/// used once it has `learning_minutes` of history) and at least
/// `min_count`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpikeRule {
    pub absolute: u32,
    pub factor: f64,
    pub min_count: u32,
    pub baseline_minutes: u32,
    pub learning_minutes: u32,
}

impl SpikeRule {
    const fn new(absolute: u32, min_count: u32) -> SpikeRule {
        SpikeRule { absolute, factor: 5.0, min_count, baseline_minutes: 60, learning_minutes: 10 }
    }
}

impl Default for SpikeRule {
    fn default() -> Self {
        SpikeRule::new(100, 20)
    }
}

/// The download-volume rule: an alert when an account's retrieved octets
/// in the current hour reach `absolute_octets`, or `factor` times its own
/// hourly baseline (over `baseline_hours`, once it has `learning_hours` of
/// history) and at least `min_octets`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadRule {
    pub absolute_octets: u64,
    pub factor: f64,
    pub min_octets: u64,
    pub baseline_hours: u32,
    pub learning_hours: u32,
}

impl Default for DownloadRule {
    fn default() -> Self {
        DownloadRule {
            absolute_octets: 2 << 30,
            factor: 10.0,
            min_octets: 100 << 20,
            baseline_hours: 168,
            learning_hours: 24,
        }
    }
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            exempt_networks: Vec::new(),
            server: SpikeRule::new(200, 30),
            account: SpikeRule::new(20, 8),
            network: SpikeRule::new(40, 15),
            bans: SpikeRule::new(10, 5),
            download: DownloadRule::default(),
            cooldown_minutes: 15,
            max_tracked: 20_000,
            geo: GeoConfig::default(),
        }
    }
}

impl AnomalyConfig {
    pub fn check(&self) -> Result<(), String> {
        let rules =
            [("server", &self.server), ("account", &self.account), ("network", &self.network), ("bans", &self.bans)];
        for (name, r) in rules {
            let bad = |why: &str| Err(format!("[anomaly.{name}] {why}"));
            if r.absolute == 0 {
                return bad("absolute must be at least 1");
            }
            if !(r.factor.is_finite() && r.factor >= 1.0) {
                return bad("factor must be a number of at least 1");
            }
            if !(1..=10_080).contains(&r.baseline_minutes) || r.learning_minutes > r.baseline_minutes {
                return bad("baseline_minutes must be 1 to 10080 and learning_minutes at most that");
            }
        }
        let d = &self.download;
        if d.absolute_octets == 0 || !(d.factor.is_finite() && d.factor >= 1.0) {
            return Err("[anomaly.download] absolute_octets must be at least 1 and factor at least 1".into());
        }
        if !(1..=8760).contains(&d.baseline_hours) || d.learning_hours > d.baseline_hours {
            return Err("[anomaly.download] baseline_hours must be 1 to 8760 and learning_hours at most that".into());
        }
        if !(1..=10_080).contains(&self.cooldown_minutes) {
            return Err("[anomaly] cooldown_minutes must be 1 to 10080".into());
        }
        if !(100..=10_000_000).contains(&self.max_tracked) {
            return Err("[anomaly] max_tracked must be 100 to 10000000".into());
        }
        self.geo.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_nonsense_is_refused() {
        let d = AnomalyConfig::default();
        assert!(d.enabled && d.check().is_ok());
        let mut c = d.clone();
        c.account.factor = 0.5;
        assert!(c.check().unwrap_err().contains("[anomaly.account] factor"));
        let mut c = d.clone();
        c.network.absolute = 0;
        assert!(c.check().is_err());
        let mut c = d.clone();
        c.server.learning_minutes = 100;
        assert!(c.check().is_err());
        let mut c = d;
        c.max_tracked = 1;
        assert!(c.check().is_err());
    }

    #[test]
    fn geo_is_off_by_default_and_its_keys_are_checked() {
        let g = GeoConfig::default();
        assert!(!g.active() && g.check().is_ok());
        assert_eq!((g.max_speed_kmh, g.min_distance_km, g.new_country, g.impossible_travel), (900.0, 50.0, true, true));
        let c: AnomalyConfig = toml::from_str(
            "[geo]\ncity_database = \"GeoLite2-City.mmdb\"\nmax_speed_kmh = 1000\n\
             exempt_networks = [\"192.0.2.0/24\"]\nexempt_users = [\"shared\"]\nnew_country = false\n",
        )
        .unwrap();
        assert!(c.geo.active() && !c.geo.new_country && c.geo.impossible_travel);
        assert_eq!(c.geo.max_speed_kmh, 1000.0);
        // The database must be readable at start; the error names the key.
        let err = c.check().unwrap_err();
        assert!(err.contains("[anomaly.geo] city_database") && err.contains("GeoLite2-City.mmdb"), "{err}");
        let bad = |f: fn(&mut GeoConfig)| {
            let mut g = GeoConfig::default();
            f(&mut g);
            g.check().unwrap_err()
        };
        assert!(bad(|g| g.max_speed_kmh = 0.0).contains("max_speed_kmh"));
        assert!(bad(|g| g.min_distance_km = f64::NAN).contains("min_distance_km"));
        assert!(bad(|g| g.asn_database = Some("asn.mmdb".into())).contains("asn_database needs city_database"));
        assert!(toml::from_str::<AnomalyConfig>("[geo]\nmax_speed = 3\n").is_err());
    }
}
