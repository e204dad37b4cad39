//! Built-in anomaly detection: rules that watch the event stream and raise
//! alert events (catalogue 7xx), so a failed-login spike needs no SIEM rule
//! to be noticed.
//!
//! Failed-login spikes are counted per minute for the whole server, per
//! account and per network (IPv4 /24, IPv6 /64). Each key keeps its own
//! baseline: an exponentially weighted average of its per-minute counts
//! over `baseline_minutes`. A minute's count alerts when it reaches the
//! rule's absolute threshold, or `factor` times the baseline (once the key
//! has `learning_minutes` of history) and at least `min_count`; then the
//! rule is quiet for that key for `cooldown_minutes`. Exempt networks
//! (monitoring, a known NAT) never count. Keys live in LRU-bounded tables.
//!
//! [`Detector`] is pure (time is an argument, tests drive a clock); the
//! hub feeds it through a bounded [`Queue`] and one task, which emits the
//! alerts as ordinary events (they reach the log, the store, the syslog
//! sinks and the alert hook like every other event).

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::hub::{EventRecord, Queue};
use crate::config::anomaly::{AnomalyConfig, DownloadRule, SpikeRule};
use crate::limits::LruMap;

/// Which rule a spike broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Server,
    Account,
    Network,
    /// One account's retrieved octets per hour (the exfiltration signal).
    Download,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Server => "server",
            Scope::Account => "account",
            Scope::Network => "network",
            Scope::Download => "download",
        }
    }
}

/// One alert the detector raises.
#[derive(Debug, Clone, PartialEq)]
pub struct Spike {
    pub scope: Scope,
    /// The account or network; empty for the server.
    pub key: String,
    /// Failures in the current minute (octets in the current hour for
    /// [`Scope::Download`]) when the alert fired.
    pub count: u64,
    /// The key's baseline (failures per minute) before this minute.
    pub baseline: f64,
    /// The count that fired it (the smaller of absolute and factor × baseline).
    pub threshold: u64,
    /// The last address seen for the key.
    pub last_peer: Option<IpAddr>,
}

/// A rule's thresholds in one unit (failures per minute, octets per hour).
#[derive(Debug, Clone, Copy)]
struct Params {
    absolute: u64,
    factor: f64,
    min: u64,
    baseline_periods: u32,
    learning_periods: u32,
}

impl From<&SpikeRule> for Params {
    fn from(r: &SpikeRule) -> Params {
        Params {
            absolute: u64::from(r.absolute),
            factor: r.factor,
            min: u64::from(r.min_count),
            baseline_periods: r.baseline_minutes,
            learning_periods: r.learning_minutes,
        }
    }
}

impl From<&DownloadRule> for Params {
    fn from(r: &DownloadRule) -> Params {
        Params {
            absolute: r.absolute_octets,
            factor: r.factor,
            min: r.min_octets,
            baseline_periods: r.baseline_hours,
            learning_periods: r.learning_hours,
        }
    }
}

/// One key's amount in the current period and its baseline.
#[derive(Debug, Clone, Default)]
struct Counter {
    period: u64,
    count: u64,
    baseline: f64,
    periods_seen: u32,
    quiet_until: u64,
}

impl Counter {
    /// Moves to `period`, folding the finished periods into the baseline
    /// (periods without activity count as zeros).
    fn roll(&mut self, period: u64, p: &Params) {
        if self.periods_seen == 0 && self.count == 0 {
            self.period = period;
            return;
        }
        if period <= self.period {
            return;
        }
        let alpha = 2.0 / (f64::from(p.baseline_periods) + 1.0);
        // While the history is short the plain mean (an average that starts
        // at zero would call the first busy hour a spike).
        let step = alpha.max(1.0 / (f64::from(self.periods_seen) + 1.0));
        self.baseline += step * (self.count as f64 - self.baseline);
        let idle = (period - self.period - 1).min(u64::from(p.baseline_periods) * 4);
        self.baseline *= (1.0 - alpha).powi(idle as i32);
        self.periods_seen = self.periods_seen.saturating_add((period - self.period).min(u64::from(u32::MAX)) as u32);
        self.period = period;
        self.count = 0;
    }

    /// Adds `amount` at `period`; the threshold it crossed, if any.
    fn add(&mut self, period: u64, amount: u64, p: &Params, cooldown: u64) -> Option<u64> {
        self.roll(period, p);
        self.count = self.count.saturating_add(amount);
        let mut threshold = p.absolute;
        if self.periods_seen >= p.learning_periods {
            let relative = (p.factor * self.baseline.max(1.0)).ceil() as u64;
            threshold = threshold.min(relative.max(p.min));
        }
        if self.count >= threshold && period >= self.quiet_until {
            self.quiet_until = period + cooldown;
            return Some(threshold);
        }
        None
    }
}

/// The failed-login spike rules (pure: the caller passes the time).
pub struct Detector {
    cfg: AnomalyConfig,
    server: Counter,
    accounts: LruMap<String, (Counter, Option<IpAddr>)>,
    networks: LruMap<IpNet, Counter>,
    downloads: LruMap<String, Counter>,
}

/// The network a failure is counted under: IPv4 /24, IPv6 /64.
pub fn network_of(ip: IpAddr) -> IpNet {
    let prefix = match ip.to_canonical() {
        IpAddr::V4(_) => 24,
        IpAddr::V6(_) => 64,
    };
    IpNet::new(ip.to_canonical(), prefix).map(|n| n.trunc()).unwrap_or_else(|_| IpNet::from(ip))
}

impl Detector {
    pub fn new(cfg: AnomalyConfig) -> Detector {
        let cap = cfg.max_tracked;
        Detector {
            cfg,
            server: Counter::default(),
            accounts: LruMap::new(cap),
            networks: LruMap::new(cap),
            downloads: LruMap::new(cap),
        }
    }

    /// Looks at one event at `now` (Unix seconds); the spikes it completes.
    pub fn observe(&mut self, e: &EventRecord, now: u64) -> Vec<Spike> {
        if e.name != "auth_failure" && e.name != "mail_retrieved" {
            return Vec::new();
        }
        let peer = e.str("peer").and_then(|p| p.parse::<IpAddr>().ok());
        if peer.is_some_and(|ip| self.cfg.exempt_networks.iter().any(|n| n.contains(ip))) {
            return Vec::new();
        }
        let user = e.str("user").filter(|u| !u.is_empty() && *u != "<invalid>");
        match (e.name.as_str(), user) {
            ("mail_retrieved", Some(user)) => self.download(user, e.u64("octets").unwrap_or(0), peer, now),
            ("mail_retrieved", None) => Vec::new(),
            _ => self.failure(user, peer, now),
        }
    }

    /// Octets an account retrieved, against its hourly baseline.
    fn download(&mut self, user: &str, octets: u64, peer: Option<IpAddr>, now: u64) -> Vec<Spike> {
        let p = Params::from(&self.cfg.download);
        let hour = now / 3600;
        // The cooldown is in minutes; at least the rest of the hour.
        let cooldown = u64::from(self.cfg.cooldown_minutes).div_ceil(60).max(1);
        let key = user.to_owned();
        if self.downloads.get_mut(&key).is_none() {
            self.downloads.insert(key.clone(), Counter::default());
        }
        let Some(c) = self.downloads.get_mut(&key) else { return Vec::new() };
        let base = c.baseline;
        match c.add(hour, octets, &p, cooldown) {
            Some(t) => vec![Spike {
                scope: Scope::Download,
                key,
                count: c.count,
                baseline: base,
                threshold: t,
                last_peer: peer,
            }],
            None => Vec::new(),
        }
    }

    fn failure(&mut self, user: Option<&str>, peer: Option<IpAddr>, now: u64) -> Vec<Spike> {
        let minute = now / 60;
        let cooldown = u64::from(self.cfg.cooldown_minutes);
        let mut out = Vec::new();
        let base = self.server.baseline;
        let (server, account, network) =
            (Params::from(&self.cfg.server), Params::from(&self.cfg.account), Params::from(&self.cfg.network));
        if let Some(t) = self.server.add(minute, 1, &server, cooldown) {
            out.push(Spike {
                scope: Scope::Server,
                key: String::new(),
                count: self.server.count,
                baseline: base,
                threshold: t,
                last_peer: peer,
            });
        }
        if let Some(user) = user {
            let key = user.to_owned();
            if self.accounts.get_mut(&key).is_none() {
                self.accounts.insert(key.clone(), (Counter::default(), None));
            }
            if let Some((c, last)) = self.accounts.get_mut(&key) {
                *last = peer.or(*last);
                let base = c.baseline;
                if let Some(t) = c.add(minute, 1, &account, cooldown) {
                    out.push(Spike {
                        scope: Scope::Account,
                        key,
                        count: c.count,
                        baseline: base,
                        threshold: t,
                        last_peer: *last,
                    });
                }
            }
        }
        if let Some(ip) = peer {
            let net = network_of(ip);
            if self.networks.get_mut(&net).is_none() {
                self.networks.insert(net, Counter::default());
            }
            if let Some(c) = self.networks.get_mut(&net) {
                let base = c.baseline;
                if let Some(t) = c.add(minute, 1, &network, cooldown) {
                    out.push(Spike {
                        scope: Scope::Network,
                        key: net.to_string(),
                        count: c.count,
                        baseline: base,
                        threshold: t,
                        last_peer: peer,
                    });
                }
            }
        }
        out
    }
}

/// Emits a spike as its alert event: `download_volume_spike` for
/// [`Scope::Download`], `auth_failure_spike` for the others.
fn emit(s: &Spike) {
    if s.scope == Scope::Download {
        tracing::warn!(
            target: "pop3connex::anomaly",
            event = "download_volume_spike",
            alert = true,
            user = %s.key,
            octets = s.count,
            baseline = format!("{:.0}", s.baseline),
            threshold = s.threshold,
            window_secs = 3600u64,
            last_peer = %s.last_peer.map(|p| p.to_string()).unwrap_or_default(),
            "download volume spike"
        );
        return;
    }
    tracing::warn!(
        target: "pop3connex::anomaly",
        event = "auth_failure_spike",
        alert = true,
        scope = s.scope.as_str(),
        key = %s.key,
        count = s.count,
        baseline = format!("{:.1}", s.baseline),
        threshold = s.threshold,
        window_secs = 60u64,
        last_peer = %s.last_peer.map(|p| p.to_string()).unwrap_or_default(),
        "failed-login spike"
    );
}

/// Starts the detector task; register the returned queue with the hub.
pub fn start(cfg: AnomalyConfig) -> Arc<Queue> {
    let (queue, mut rx) = Queue::new(10_000);
    let mut detector = Detector::new(cfg);
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            let now = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or_default();
            for s in detector.observe(&e, now) {
                emit(&s);
            }
        }
    });
    Arc::new(queue)
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value};
    use time::OffsetDateTime;

    use super::*;
    use crate::telemetry::Severity;

    fn failure(user: &str, peer: &str) -> EventRecord {
        let mut fields = Map::new();
        fields.insert("user".into(), Value::from(user));
        fields.insert("peer".into(), Value::from(peer));
        EventRecord {
            time: OffsetDateTime::now_utc(),
            target: "pop3connex::security",
            name: "auth_failure".into(),
            severity: Severity::Warning,
            message: String::new(),
            fields,
            alert: false,
        }
    }

    /// `n` failures spread over the minute starting at `minute`.
    fn burst(
        d: &mut Detector,
        minute: u64,
        n: u32,
        user: impl Fn(u32) -> String,
        peer: impl Fn(u32) -> String,
    ) -> Vec<Spike> {
        (0..n).flat_map(|i| d.observe(&failure(&user(i), &peer(i)), minute * 60 + u64::from(i % 60))).collect()
    }

    #[test]
    fn an_absolute_spike_on_one_account_alerts_once_per_cooldown() {
        let mut d = Detector::new(AnomalyConfig::default());
        // 25 failures against alice from 25 networks in one minute.
        let got = burst(&mut d, 1000, 25, |_| "alice".into(), |i| format!("198.51.{i}.1"));
        assert_eq!(got.len(), 1, "{got:?}");
        let s = &got[0];
        assert_eq!((s.scope, s.key.as_str(), s.count, s.threshold), (Scope::Account, "alice", 20, 20));
        assert_eq!(s.last_peer, Some("198.51.19.1".parse().unwrap()));
        // Still within the cooldown: quiet; after it: alerts again.
        assert!(burst(&mut d, 1010, 25, |_| "alice".into(), |i| format!("198.51.{i}.1")).is_empty());
        assert_eq!(burst(&mut d, 1016, 25, |_| "alice".into(), |i| format!("198.51.{i}.1")).len(), 1);
    }

    #[test]
    fn a_network_spike_counts_a_whole_slash_24_and_slash_64() {
        let mut d = Detector::new(AnomalyConfig::default());
        let got = burst(&mut d, 5, 40, |i| format!("user{i}"), |i| format!("203.0.113.{}", i + 1));
        assert_eq!(
            got.iter().map(|s| (s.scope, s.key.as_str())).collect::<Vec<_>>(),
            [(Scope::Network, "203.0.113.0/24")]
        );
        let got = burst(&mut d, 5, 40, |i| format!("v6user{i}"), |i| format!("2001:db8:1:2::{:x}", i + 1));
        assert_eq!(got.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(), ["2001:db8:1:2::/64"]);
        // 40 + 40 in one minute reached the server's absolute 200? No.
        assert!(got.iter().all(|s| s.scope != Scope::Server));
    }

    #[test]
    fn the_baseline_is_learned_and_a_multiple_of_it_alerts() {
        let mut d = Detector::new(AnomalyConfig::default());
        let users = |i: u32| format!("u{}", i % 50);
        let peers = |i: u32| format!("10.{}.{}.1", i % 200, i / 200);
        // 30 quiet minutes at 12 failures/minute from scattered clients: normal here.
        for m in 0..30 {
            assert!(burst(&mut d, m, 12, users, peers).is_empty(), "minute {m}");
        }
        // Then 70 in one minute: below the absolute 200, above 5 × 12.
        let got = burst(&mut d, 30, 70, users, peers);
        let server: Vec<_> = got.iter().filter(|s| s.scope == Scope::Server).collect();
        assert_eq!(server.len(), 1, "{got:?}");
        assert_eq!(server[0].threshold, 60);
        assert!((server[0].baseline - 12.0).abs() < 1.5, "{}", server[0].baseline);
        // Without history the same 70 would not have alerted (absolute 200).
        let mut fresh = Detector::new(AnomalyConfig::default());
        assert!(burst(&mut fresh, 30, 70, users, peers).iter().all(|s| s.scope != Scope::Server));
    }

    fn retrieved(user: &str, octets: u64) -> EventRecord {
        let mut e = failure(user, "198.51.100.20");
        e.name = "mail_retrieved".into();
        e.fields.insert("octets".into(), Value::from(octets));
        e
    }

    #[test]
    fn a_download_far_above_the_accounts_own_hourly_baseline_alerts() {
        let mut d = Detector::new(AnomalyConfig::default());
        const MB: u64 = 1 << 20;
        // Two days of an ordinary client: 20 MB an hour, in three sessions.
        for h in 0..48u64 {
            for s in 0..3 {
                assert!(d.observe(&retrieved("carol", 20 * MB / 3), h * 3600 + s * 1200).is_empty(), "hour {h}");
            }
        }
        // Then 300 MB within an hour: 10 × the baseline is ~200 MB.
        let got: Vec<_> = (0..30).flat_map(|i| d.observe(&retrieved("carol", 10 * MB), 48 * 3600 + i * 60)).collect();
        assert_eq!(got.len(), 1, "{got:?}");
        let s = &got[0];
        assert_eq!((s.scope, s.key.as_str()), (Scope::Download, "carol"));
        assert!((s.baseline / MB as f64 - 20.0).abs() < 2.0, "{}", s.baseline);
        assert!(s.count >= s.threshold && s.threshold < 250 * MB, "{s:?}");
        // A new account downloading its whole old mailbox on day one is not
        // learned yet: only the absolute cap (2 GiB an hour) applies.
        assert!((0..30).all(|i| d.observe(&retrieved("dave", 10 * MB), 48 * 3600 + i * 60).is_empty()));
        let got: Vec<_> = (0..3).flat_map(|i| d.observe(&retrieved("dave", 1 << 30), 48 * 3600 + 1900 + i)).collect();
        assert_eq!(got.iter().map(|s| s.threshold).collect::<Vec<_>>(), [2 << 30]);
    }

    #[test]
    fn exempt_networks_never_count_and_tables_stay_bounded() {
        let cfg = AnomalyConfig {
            exempt_networks: vec![crate::config::Network("192.0.2.0/24".parse().unwrap())],
            max_tracked: 100,
            ..Default::default()
        };
        let mut d = Detector::new(cfg);
        assert!(burst(&mut d, 1, 300, |_| "alice".into(), |_| "192.0.2.9".into()).is_empty());
        // A distributed attack with a new name and network every time.
        burst(&mut d, 2, 5000, |i| format!("n{i}"), |i| format!("10.{}.{}.1", i / 256 % 256, i % 256));
        assert!(d.accounts.len() <= 100 && d.networks.len() <= 100);
        // Other events are not failures.
        let mut e = failure("bob", "198.51.100.1");
        e.name = "auth_success".into();
        assert!((0..100).all(|_| d.observe(&e, 200).is_empty()));
    }
}
