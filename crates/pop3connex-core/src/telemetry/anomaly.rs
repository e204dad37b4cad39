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
//! The geography rules (`[anomaly.geo]`, on when a GeoIP City database is
//! configured) look at successful logins: per account they remember the
//! countries seen and the last login's place. A login from a country the
//! account never used raises `geo_new_country` (the account's first login
//! only teaches); a login too far from the previous one for the time
//! between them (at least `min_distance_km`, faster than `max_speed_kmh`)
//! raises `geo_impossible_travel`. Addresses the database does not place
//! (private, loopback) and exempt networks and users are skipped and not
//! remembered. Learned places live in memory (LRU-bounded): a restart
//! forgets them.
//!
//! [`Detector`] is pure (time is an argument, tests drive a clock); the
//! hub feeds it through a bounded [`Queue`] and one task, which emits the
//! alerts as ordinary events (they reach the log, the store, the syslog
//! sinks and the alert hook like every other event).

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::geo::{haversine_km, GeoDb, Place};
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
    /// Addresses banned per minute across the server.
    Bans,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Server => "server",
            Scope::Account => "account",
            Scope::Network => "network",
            Scope::Download => "download",
            Scope::Bans => "bans",
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

/// Which geography rule fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeoRule {
    NewCountry,
    ImpossibleTravel,
}

impl GeoRule {
    /// The alert's event name.
    pub fn event(self) -> &'static str {
        match self {
            GeoRule::NewCountry => "geo_new_country",
            GeoRule::ImpossibleTravel => "geo_impossible_travel",
        }
    }
}

/// One successful login, placed.
#[derive(Debug, Clone, PartialEq)]
pub struct Login {
    pub peer: IpAddr,
    pub place: Place,
    /// Unix seconds.
    pub time: u64,
    pub mechanism: String,
    /// Whether the connection was TLS, when the event said.
    pub tls: Option<bool>,
}

/// A geography alert: both logins and how far apart they are.
#[derive(Debug, Clone, PartialEq)]
pub struct GeoAlert {
    pub rule: GeoRule,
    pub user: String,
    pub previous: Login,
    pub current: Login,
    /// Great-circle distance between the two places, when both have coordinates.
    pub distance_km: Option<f64>,
    /// `distance_km` over the time between the logins (at least one second).
    pub speed_kmh: Option<f64>,
    /// The countries the account had used before this login.
    pub known_countries: Vec<String>,
    /// The current country is new to the account (also set on an
    /// impossible-travel alert, which then stands for both rules).
    pub new_country: bool,
}

/// Countries remembered per account (the oldest are forgotten first).
const MAX_COUNTRIES: usize = 32;

/// What the geography rules remember of one account.
#[derive(Debug, Clone, Default)]
struct GeoAccount {
    countries: Vec<String>,
    last: Option<Login>,
    /// Unix seconds until which each rule is quiet for the account.
    quiet_country: u64,
    quiet_travel: u64,
}

/// The anomaly rules (pure: the caller passes the time).
pub struct Detector {
    cfg: AnomalyConfig,
    server: Counter,
    bans: Counter,
    accounts: LruMap<String, (Counter, Option<IpAddr>)>,
    networks: LruMap<IpNet, Counter>,
    downloads: LruMap<String, Counter>,
    geo: Option<Arc<GeoDb>>,
    places: LruMap<String, GeoAccount>,
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
        Detector::with_geo(cfg, None)
    }

    /// A detector whose geography rules use `geo` (off when `None`).
    pub fn with_geo(cfg: AnomalyConfig, geo: Option<Arc<GeoDb>>) -> Detector {
        let cap = cfg.max_tracked;
        Detector {
            cfg,
            server: Counter::default(),
            bans: Counter::default(),
            accounts: LruMap::new(cap),
            networks: LruMap::new(cap),
            downloads: LruMap::new(cap),
            geo,
            places: LruMap::new(cap),
        }
    }

    /// Looks at a successful login at `now` (Unix seconds): the geography
    /// alert it raises, if any. Other events are ignored.
    pub fn login(&mut self, e: &EventRecord, now: u64) -> Option<GeoAlert> {
        if e.name != "auth_success" {
            return None;
        }
        let g = &self.cfg.geo;
        let geo = self.geo.as_ref()?;
        let peer = e.str("peer").and_then(|p| p.parse::<IpAddr>().ok())?.to_canonical();
        let user = e.str("user").filter(|u| !u.is_empty() && *u != "-")?;
        let exempt_net = |n: &crate::config::Network| n.contains(peer);
        if self.cfg.exempt_networks.iter().any(exempt_net)
            || g.exempt_networks.iter().any(exempt_net)
            || g.exempt_users.iter().any(|u| u == user)
        {
            return None;
        }
        // Not placed (private, loopback, unknown): no alert, not remembered.
        let place = geo.lookup(peer)?;
        let current = Login {
            peer,
            place,
            time: now,
            mechanism: e.str("mechanism").unwrap_or_default().to_owned(),
            tls: e.fields.get("tls").and_then(serde_json::Value::as_bool),
        };
        let key = user.to_owned();
        if self.places.get_mut(&key).is_none() {
            self.places.insert(key.clone(), GeoAccount::default());
        }
        let acct = self.places.get_mut(&key)?;
        let cooldown = u64::from(self.cfg.cooldown_minutes) * 60;
        let mut alert = None;
        if let Some(previous) = &acct.last {
            let new_country = current
                .place
                .country
                .as_ref()
                .is_some_and(|c| !acct.countries.is_empty() && !acct.countries.contains(c));
            let distance = match (previous.place.coords, current.place.coords) {
                (Some(a), Some(b)) => Some(haversine_km(a, b)),
                _ => None,
            };
            let hours = now.saturating_sub(previous.time).max(1) as f64 / 3600.0;
            let speed = distance.map(|d| d / hours);
            // A clock stepped back says nothing about the speed.
            let travel = g.impossible_travel
                && now >= previous.time
                && now >= acct.quiet_travel
                && distance.is_some_and(|d| d >= g.min_distance_km)
                && speed.is_some_and(|v| v > g.max_speed_kmh);
            let rule = if travel {
                acct.quiet_travel = now + cooldown;
                Some(GeoRule::ImpossibleTravel)
            } else if g.new_country && new_country && now >= acct.quiet_country {
                acct.quiet_country = now + cooldown;
                Some(GeoRule::NewCountry)
            } else {
                None
            };
            alert = rule.map(|rule| GeoAlert {
                rule,
                user: key.clone(),
                previous: previous.clone(),
                current: current.clone(),
                distance_km: distance,
                speed_kmh: speed,
                known_countries: acct.countries.clone(),
                new_country,
            });
        }
        if let Some(c) = &current.place.country {
            if let Some(i) = acct.countries.iter().position(|k| k == c) {
                acct.countries.remove(i);
            } else if acct.countries.len() >= MAX_COUNTRIES {
                acct.countries.remove(0);
            }
            acct.countries.push(c.clone());
        }
        acct.last = Some(current);
        alert
    }

    /// Looks at one event at `now` (Unix seconds); the spikes it completes.
    pub fn observe(&mut self, e: &EventRecord, now: u64) -> Vec<Spike> {
        if e.name == "ban" {
            return self.ban(e.str("peer").and_then(|p| p.parse::<IpAddr>().ok()), now);
        }
        // A login refused because the account is locked is a failed guess
        // too: without it, the lockout would hide a spray from the rules.
        if !matches!(e.name.as_str(), "auth_failure" | "locked_out" | "mail_retrieved") {
            return Vec::new();
        }
        let peer = e.str("peer").and_then(|p| p.parse::<IpAddr>().ok());
        if peer.is_some_and(|ip| self.cfg.exempt_networks.iter().any(|n| n.contains(ip))) {
            return Vec::new();
        }
        // A name that is no account (often a password typed into the user
        // field) is never an alert key: the network and server rules count
        // those failures, the account rule only real accounts'.
        let unknown = e.str("reason") == Some("unknown user");
        let user = e.str("user").filter(|u| !u.is_empty() && *u != "<invalid>" && !unknown);
        match (e.name.as_str(), user) {
            ("mail_retrieved", Some(user)) => self.download(user, e.u64("octets").unwrap_or(0), peer, now),
            ("mail_retrieved", None) => Vec::new(),
            _ => self.failure(user, peer, now),
        }
    }

    /// One address (or network) banned: many in a minute is a burst.
    fn ban(&mut self, peer: Option<IpAddr>, now: u64) -> Vec<Spike> {
        let base = self.bans.baseline;
        match self.bans.add(now / 60, 1, &Params::from(&self.cfg.bans), u64::from(self.cfg.cooldown_minutes)) {
            Some(t) => vec![Spike {
                scope: Scope::Bans,
                key: String::new(),
                count: self.bans.count,
                baseline: base,
                threshold: t,
                last_peer: peer,
            }],
            None => Vec::new(),
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
    if s.scope == Scope::Bans {
        tracing::warn!(
            target: "pop3connex::anomaly",
            event = "ban_burst",
            alert = true,
            count = s.count,
            baseline = format!("{:.1}", s.baseline),
            threshold = s.threshold,
            window_secs = 60u64,
            last_peer = %s.last_peer.map(|p| p.to_string()).unwrap_or_default(),
            "many addresses banned at once"
        );
        return;
    }
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

fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// Emits a geography alert (`geo_new_country`, `geo_impossible_travel`)
/// with both logins.
fn emit_geo(g: &GeoAlert) {
    let (p, c) = (&g.previous, &g.current);
    let (pp, cp) = (&p.place, &c.place);
    let message = match g.rule {
        GeoRule::NewCountry => "login from a new country",
        GeoRule::ImpossibleTravel => "impossible travel between two logins",
    };
    tracing::warn!(
        target: "pop3connex::anomaly",
        event = g.rule.event(),
        alert = true,
        user = %g.user,
        peer = %c.peer,
        country = cp.country.as_deref(),
        city = cp.city.as_deref(),
        latitude = cp.coords.map(|c| c.0),
        longitude = cp.coords.map(|c| c.1),
        asn = cp.asn,
        as_org = cp.as_org.as_deref(),
        login_time = %rfc3339(c.time),
        mechanism = %c.mechanism,
        tls = c.tls,
        previous_peer = %p.peer,
        previous_country = pp.country.as_deref(),
        previous_city = pp.city.as_deref(),
        previous_latitude = pp.coords.map(|c| c.0),
        previous_longitude = pp.coords.map(|c| c.1),
        previous_asn = pp.asn,
        previous_as_org = pp.as_org.as_deref(),
        previous_login_time = %rfc3339(p.time),
        previous_mechanism = %p.mechanism,
        previous_tls = p.tls,
        distance_km = g.distance_km.map(|d| d.round() as u64),
        elapsed_secs = c.time.saturating_sub(p.time),
        speed_kmh = g.speed_kmh.map(|v| v.round() as u64),
        known_countries = %g.known_countries.join(","),
        new_country = g.new_country,
        "{message}"
    );
}

/// The running detector: its queue (register it with the hub) and what a
/// reload re-reads.
pub struct Running {
    pub queue: Arc<Queue>,
    geo_cfg: crate::config::anomaly::GeoConfig,
    geo: tokio::sync::watch::Sender<Option<Arc<GeoDb>>>,
}

impl Running {
    /// Re-reads the `[anomaly.geo]` databases from the paths configured at
    /// start (SIGHUP, after `geoipupdate`): `Ok(false)` when the rules are
    /// off; on an error the databases in use stay.
    pub fn reload_geo(&self) -> Result<bool, String> {
        match GeoDb::open(&self.geo_cfg)? {
            Some(db) => {
                self.geo.send_replace(Some(Arc::new(db)));
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Starts the detector task. Opens the `[anomaly.geo]` databases (an error
/// names the key).
pub fn start(cfg: AnomalyConfig) -> Result<Running, String> {
    let geo = GeoDb::open(&cfg.geo)?.map(Arc::new);
    let geo_cfg = cfg.geo.clone();
    let (queue, geo) = start_with(Detector::with_geo(cfg, geo), || {
        u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or_default()
    });
    Ok(Running { queue, geo_cfg, geo })
}

/// The detector task with its clock (tests pass their own); the sender
/// swaps the GeoIP databases it uses.
fn start_with(
    mut detector: Detector,
    clock: impl Fn() -> u64 + Send + 'static,
) -> (Arc<Queue>, tokio::sync::watch::Sender<Option<Arc<GeoDb>>>) {
    let (queue, mut rx) = Queue::new(10_000);
    let (geo_tx, mut geo_rx) = tokio::sync::watch::channel(detector.geo.clone());
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            if geo_rx.has_changed().unwrap_or(false) {
                detector.geo = geo_rx.borrow_and_update().clone();
            }
            let now = clock();
            for s in detector.observe(&e, now) {
                emit(&s);
            }
            if let Some(g) = detector.login(&e, now) {
                emit_geo(&g);
            }
        }
    });
    (Arc::new(queue), geo_tx)
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
    fn failures_for_names_that_are_no_account_never_become_an_alert_key() {
        let mut d = Detector::new(AnomalyConfig::default());
        let got: Vec<Spike> = (0..30)
            .flat_map(|i| {
                let mut e = failure("correct-horse-battery", &format!("198.51.{i}.1"));
                e.fields.insert("reason".into(), Value::from("unknown user"));
                d.observe(&e, 1000)
            })
            .collect();
        assert!(got.iter().all(|s| !s.key.contains("horse")), "{got:?}");
        assert!(got.iter().all(|s| s.scope != Scope::Account), "{got:?}");
    }

    #[test]
    fn logins_refused_by_a_lockout_count_as_failures() {
        let mut d = Detector::new(AnomalyConfig::default());
        let got: Vec<Spike> = (0..20)
            .flat_map(|i| {
                let mut e = failure("alice", &format!("198.51.{i}.1"));
                if i >= 10 {
                    e.name = "locked_out".into();
                }
                d.observe(&e, 1000)
            })
            .collect();
        assert_eq!(got.iter().map(|s| (s.scope, s.key.as_str())).collect::<Vec<_>>(), [(Scope::Account, "alice")]);
    }

    #[test]
    fn many_bans_in_a_minute_alert_once_per_cooldown() {
        let mut d = Detector::new(AnomalyConfig::default());
        let ban = |d: &mut Detector, now: u64, n: u32| -> Vec<Spike> {
            (0..n)
                .flat_map(|i| {
                    let mut e = failure("-", &format!("198.51.100.{i}"));
                    e.name = "ban".into();
                    d.observe(&e, now)
                })
                .collect()
        };
        assert!(ban(&mut d, 60, 9).is_empty(), "nine bans in a minute stay under the absolute 10");
        let got = ban(&mut d, 120, 12);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].scope, got[0].count, got[0].threshold), (Scope::Bans, 10, 10));
        assert_eq!(got[0].last_peer, Some("198.51.100.9".parse().unwrap()));
        assert!(ban(&mut d, 180, 12).is_empty(), "cooldown");
        assert_eq!(ban(&mut d, 120 + 16 * 60, 12).len(), 1, "after the cooldown");
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

    // --- the geography rules ---

    use crate::telemetry::geo::testdb::{asn, build, city};

    const LONDON: &str = "81.2.69.10";
    const CROYDON: &str = "81.2.70.10";
    const PARIS: &str = "90.0.1.10";
    const NEW_YORK: &str = "24.0.1.10";
    const LOS_ANGELES: &str = "24.1.1.10";
    const SYDNEY: &str = "1.128.1.10";
    const VPN: &str = "185.0.0.5";
    const HOUR: u64 = 3600;
    const T0: u64 = 1_800_000_000;

    fn geo_db() -> Arc<GeoDb> {
        let cities = build(
            "GeoLite2-City",
            &[
                ("81.2.69.0/24", city("GB", "London", 51.5074, -0.1278)),
                ("81.2.70.0/24", city("GB", "Croydon", 51.3762, -0.0982)),
                ("90.0.0.0/16", city("FR", "Paris", 48.8566, 2.3522)),
                ("24.0.0.0/16", city("US", "New York", 40.7128, -74.0060)),
                ("24.1.0.0/16", city("US", "Los Angeles", 34.0522, -118.2437)),
                ("1.128.0.0/16", city("AU", "Sydney", -33.8688, 151.2093)),
                ("185.0.0.0/24", city("NL", "Amsterdam", 52.3676, 4.9041)),
            ],
        );
        let asns = build(
            "GeoLite2-ASN",
            &[("81.2.69.0/24", asn(64500, "Example Broadband")), ("90.0.0.0/16", asn(64501, "Example Mobile"))],
        );
        Arc::new(GeoDb::from_bytes(cities, Some(asns)).unwrap())
    }

    fn geo_detector(f: impl FnOnce(&mut AnomalyConfig)) -> Detector {
        let mut cfg = AnomalyConfig::default();
        f(&mut cfg);
        Detector::with_geo(cfg, Some(geo_db()))
    }

    fn success(user: &str, peer: &str) -> EventRecord {
        let mut e = failure(user, peer);
        e.name = "auth_success".into();
        e.severity = Severity::Info;
        e.fields.insert("mechanism".into(), Value::from("PLAIN"));
        e.fields.insert("tls".into(), Value::from(true));
        e
    }

    /// Logins of `user` as (peer, Unix seconds); the alerts they raise.
    fn logins(d: &mut Detector, user: &str, steps: &[(&str, u64)]) -> Vec<GeoAlert> {
        steps.iter().filter_map(|(peer, t)| d.login(&success(user, peer), *t)).collect()
    }

    #[test]
    fn a_new_country_alerts_once_with_both_places() {
        let mut d = geo_detector(|_| {});
        // The first login teaches; the same country again is normal.
        assert!(logins(&mut d, "alice", &[(LONDON, T0), (CROYDON, T0 + HOUR), (LONDON, T0 + 2 * HOUR)]).is_empty());
        // Two days later from Paris: new country, not impossible travel.
        let got =
            logins(&mut d, "alice", &[(PARIS, T0 + 48 * HOUR), (PARIS, T0 + 49 * HOUR), (LONDON, T0 + 50 * HOUR)]);
        assert_eq!(got.len(), 1, "{got:?}");
        let a = &got[0];
        assert_eq!((a.rule, a.user.as_str(), a.new_country), (GeoRule::NewCountry, "alice", true));
        assert_eq!(a.known_countries, ["GB"]);
        let (p, c) = (&a.previous, &a.current);
        assert_eq!(
            (p.peer.to_string(), p.time, p.mechanism.as_str(), p.tls),
            (LONDON.into(), T0 + 2 * HOUR, "PLAIN", Some(true))
        );
        assert_eq!((p.place.country.as_deref(), p.place.city.as_deref()), (Some("GB"), Some("London")));
        assert_eq!((p.place.asn, p.place.as_org.as_deref()), (Some(64500), Some("Example Broadband")));
        assert_eq!(p.place.coords, Some((51.5074, -0.1278)));
        assert_eq!((c.peer.to_string(), c.time), (PARIS.into(), T0 + 48 * HOUR));
        assert_eq!(
            (c.place.country.as_deref(), c.place.city.as_deref(), c.place.asn),
            (Some("FR"), Some("Paris"), Some(64501))
        );
        let km = a.distance_km.unwrap();
        assert!((km - 343.5).abs() < 2.0, "{km}");
        assert!((a.speed_kmh.unwrap() - km / 46.0).abs() < 0.01);
        // Both countries are known now.
        assert!(logins(&mut d, "alice", &[(PARIS, T0 + 100 * HOUR), (LONDON, T0 + 200 * HOUR)]).is_empty());
    }

    #[test]
    fn an_impossible_jump_alerts_once_and_a_slow_trip_or_a_short_hop_does_not() {
        let mut d = geo_detector(|_| {});
        // New York, then Los Angeles (3936 km) an hour later.
        let got = logins(&mut d, "bob", &[(NEW_YORK, T0), (LOS_ANGELES, T0 + HOUR)]);
        assert_eq!(got.len(), 1, "{got:?}");
        let a = &got[0];
        assert_eq!((a.rule, a.new_country), (GeoRule::ImpossibleTravel, false));
        assert_eq!(
            (a.previous.place.city.as_deref(), a.current.place.city.as_deref()),
            (Some("New York"), Some("Los Angeles"))
        );
        let (km, speed) = (a.distance_km.unwrap(), a.speed_kmh.unwrap());
        assert!((km - 3936.0).abs() < 10.0 && (speed - km).abs() < 0.01, "{km} {speed}");
        // The same trip: more logins there, and the jump back within the
        // cooldown, raise nothing more.
        assert!(logins(&mut d, "bob", &[(LOS_ANGELES, T0 + HOUR + 60), (NEW_YORK, T0 + HOUR + 600)]).is_empty());

        // Six hours for the same distance (656 km/h) is a flight.
        let mut d = geo_detector(|_| {});
        assert!(logins(&mut d, "carol", &[(NEW_YORK, T0), (LOS_ANGELES, T0 + 6 * HOUR)]).is_empty());
        // London to Sydney in 30 hours, with the new-country rule off.
        let mut d = geo_detector(|c| c.geo.new_country = false);
        assert!(logins(&mut d, "carol", &[(LONDON, T0), (SYDNEY, T0 + 30 * HOUR)]).is_empty());
        // A clock stepped back between two logins judges no speed.
        let mut d = geo_detector(|_| {});
        assert!(logins(&mut d, "carol", &[(NEW_YORK, T0), (LOS_ANGELES, T0 - 5)]).is_empty());
        // London to Croydon (15 km) ten seconds apart: under min_distance_km.
        let mut d = geo_detector(|_| {});
        assert!(logins(&mut d, "carol", &[(LONDON, T0), (CROYDON, T0 + 10), (LONDON, T0 + 20)]).is_empty());
    }

    #[test]
    fn a_jump_to_a_new_country_is_one_impossible_travel_alert() {
        let mut d = geo_detector(|_| {});
        let got = logins(&mut d, "erin", &[(LONDON, T0), (SYDNEY, T0 + HOUR)]);
        assert_eq!(
            got.iter().map(|a| (a.rule, a.new_country)).collect::<Vec<_>>(),
            [(GeoRule::ImpossibleTravel, true)]
        );
        // With impossible travel off, the same login is a new country.
        let mut d = geo_detector(|c| c.geo.impossible_travel = false);
        let got = logins(&mut d, "erin", &[(LONDON, T0), (SYDNEY, T0 + HOUR)]);
        assert_eq!(got.iter().map(|a| a.rule).collect::<Vec<_>>(), [GeoRule::NewCountry]);
    }

    #[test]
    fn exempt_networks_and_users_and_unplaced_addresses_never_alert_nor_teach() {
        let mut d = geo_detector(|c| {
            c.geo.exempt_networks = vec![crate::config::Network("185.0.0.0/24".parse().unwrap())];
            c.geo.exempt_users = vec!["shared".into()];
        });
        // Through the VPN from London, a minute later: exempt, not remembered.
        assert!(logins(&mut d, "dave", &[(LONDON, T0), (VPN, T0 + 60), (LONDON, T0 + 120)]).is_empty());
        // Private and loopback addresses have no place: skipped.
        assert!(
            logins(&mut d, "dave", &[("10.1.2.3", T0 + 130), ("127.0.0.1", T0 + 140), ("::1", T0 + 150)]).is_empty()
        );
        let acct = d.places.peek(&"dave".to_owned()).unwrap();
        assert_eq!(acct.countries, ["GB"]);
        assert_eq!(acct.last.as_ref().map(|l| (l.peer.to_string(), l.time)), Some((LONDON.into(), T0 + 120)));
        // An exempt user is not even tracked.
        assert!(logins(&mut d, "shared", &[(LONDON, T0), (SYDNEY, T0 + 60), (PARIS, T0 + 120)]).is_empty());
        assert!(d.places.peek(&"shared".to_owned()).is_none());
        // [anomaly] exempt_networks apply to the geography rules too.
        let mut d = geo_detector(|c| c.exempt_networks = vec![crate::config::Network("1.128.0.0/16".parse().unwrap())]);
        assert!(logins(&mut d, "dave", &[(LONDON, T0), (SYDNEY, T0 + 60)]).is_empty());
        // Without a database the rules are off; failures are not logins.
        let mut d = Detector::new(AnomalyConfig::default());
        assert!(logins(&mut d, "dave", &[(LONDON, T0), (SYDNEY, T0 + 60)]).is_empty());
        let mut d = geo_detector(|_| {});
        assert!(d.login(&failure("dave", LONDON), T0).is_none() && d.places.is_empty());
    }

    #[test]
    fn learned_places_stay_bounded() {
        let mut d = geo_detector(|c| c.max_tracked = 100);
        for i in 0..1000u64 {
            d.login(&success(&format!("u{i}"), LONDON), T0 + i);
        }
        assert_eq!(d.places.len(), 100);
    }

    /// Collects every event's fields (name → value as text).
    #[derive(Clone, Default)]
    struct Capture(Arc<std::sync::Mutex<Vec<std::collections::BTreeMap<String, String>>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            struct V(std::collections::BTreeMap<String, String>);
            impl tracing::field::Visit for V {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    self.0.insert(f.name().to_owned(), format!("{v:?}"));
                }
            }
            let mut v = V(Default::default());
            event.record(&mut v);
            self.0.lock().unwrap().push(v.0);
        }
    }

    /// Through the detector task (a queue, as the hub feeds it): the alert
    /// event carries exactly the catalogue's documented fields.
    #[tokio::test]
    async fn the_task_emits_geo_alerts_with_the_documented_fields() {
        use tracing_subscriber::layer::SubscriberExt;

        use crate::telemetry::Consumer;

        let capture = Capture::default();
        let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
        let clock = Arc::new(std::sync::atomic::AtomicU64::new(T0));
        let c = clock.clone();
        let (queue, _geo) = start_with(geo_detector(|_| {}), move || c.load(std::sync::atomic::Ordering::Relaxed));
        for (peer, t) in [(LONDON, T0), (PARIS, T0 + HOUR / 4)] {
            clock.store(t, std::sync::atomic::Ordering::Relaxed);
            queue.accept(&Arc::new(success("frank", peer)));
            for _ in 0..200 {
                tokio::task::yield_now().await;
            }
        }
        let got = capture.0.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        let e = &got[0];
        assert_eq!(e["event"], "\"geo_impossible_travel\"");
        assert_eq!((e["alert"].as_str(), e["user"].as_str(), e["peer"].as_str()), ("true", "frank", PARIS));
        assert_eq!((e["country"].as_str(), e["previous_country"].as_str()), ("\"FR\"", "\"GB\""));
        assert_eq!((e["previous_peer"].as_str(), e["previous_asn"].as_str()), (LONDON, "64500"));
        assert_eq!((e["login_time"].as_str(), e["new_country"].as_str()), ("2027-01-15T08:15:00Z", "true"));
        let documented: std::collections::BTreeSet<&str> =
            crate::telemetry::catalogue::lookup("geo_impossible_travel").unwrap().fields.iter().map(|f| f.0).collect();
        let emitted: std::collections::BTreeSet<&str> =
            e.keys().map(String::as_str).filter(|k| !["event", "alert", "message"].contains(k)).collect();
        assert_eq!(emitted, documented);
    }

    /// A reload swaps the databases the running task uses.
    #[tokio::test]
    async fn swapped_databases_are_used_from_the_next_event() {
        use crate::telemetry::Consumer;

        let capture = Capture::default();
        let _guard = tracing::subscriber::set_default({
            use tracing_subscriber::layer::SubscriberExt;
            tracing_subscriber::registry().with(capture.clone())
        });
        let clock = Arc::new(std::sync::atomic::AtomicU64::new(T0));
        let c = clock.clone();
        // Started with a database that knows nothing.
        let empty = Arc::new(GeoDb::from_bytes(build("GeoLite2-City", &[]), None).unwrap());
        let (queue, geo) = start_with(Detector::with_geo(AnomalyConfig::default(), Some(empty)), move || {
            c.load(std::sync::atomic::Ordering::Relaxed)
        });
        let login = async |peer: &str, t: u64| {
            clock.store(t, std::sync::atomic::Ordering::Relaxed);
            queue.accept(&Arc::new(success("gina", peer)));
            for _ in 0..200 {
                tokio::task::yield_now().await;
            }
        };
        login(LONDON, T0).await;
        login(SYDNEY, T0 + 60).await;
        assert!(capture.0.lock().unwrap().is_empty());
        geo.send_replace(Some(geo_db()));
        login(LONDON, T0 + 120).await;
        login(SYDNEY, T0 + 180).await;
        let got = capture.0.lock().unwrap().clone();
        assert_eq!(got.iter().map(|e| e["event"].as_str()).collect::<Vec<_>>(), ["\"geo_impossible_travel\""]);
    }
}
