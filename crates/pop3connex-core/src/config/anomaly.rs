//! `[anomaly]`: built-in anomaly detection on the event stream.

use serde::Deserialize;

use super::Network;

/// `[anomaly]`: rules that watch the events and raise alert events
/// (catalogue 7xx). On by default with conservative thresholds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    pub enabled: bool,
    /// Failed logins from these networks never count (monitoring probes,
    /// a known office NAT); they are still logged and stored.
    pub exempt_networks: Vec<Network>,
    /// Failed-login spikes across the whole server.
    pub server: SpikeRule,
    /// Failed-login spikes against one account (password spraying at one
    /// name is also slowed by lockouts; this tells someone).
    pub account: SpikeRule,
    /// Failed-login spikes from one network (IPv4 /24, IPv6 /64).
    pub network: SpikeRule,
    /// Octets one account retrieves per hour (the exfiltration signal).
    pub download: DownloadRule,
    /// Minutes between two alerts for the same rule and key.
    pub cooldown_minutes: u32,
    /// Distinct accounts and networks tracked at once (least recently
    /// seen forgotten first): bounds memory under a distributed attack.
    pub max_tracked: usize,
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
            download: DownloadRule::default(),
            cooldown_minutes: 15,
            max_tracked: 20_000,
        }
    }
}

impl AnomalyConfig {
    pub fn check(&self) -> Result<(), String> {
        for (name, r) in [("server", &self.server), ("account", &self.account), ("network", &self.network)] {
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
        Ok(())
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
}
