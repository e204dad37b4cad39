//! Security state: bans, lockouts, failure counters and LOGIN-DELAY
//! (seed practice 5).
//!
//! [`SecurityState`] is the interface sessions and listeners use; all of its
//! methods are synchronous and in-memory so they can run on every accept
//! and every failed login. [`Guard`] implements it for one node: counters
//! (failed logins, protocol abuse, connection rate) live in memory; bans and
//! lockouts are persisted through the [`Store`] and re-read periodically, so
//! `pop3connex ban ...` / `user unlock` from the CLI reach a running server
//! and a shared backend (PostgreSQL, later) shares them across nodes.
//!
//! Trade-offs, documented for operators:
//! - Lockouts are keyed by the claimed user name whether or not it exists,
//!   so they reveal nothing about which accounts exist.
//! - A lockout does not apply to addresses from which the account logged in
//!   successfully in the last 30 days: an attacker elsewhere cannot lock the
//!   owner out of their usual network. Bans stop the attacker's address.
//! - Allowlisted networks are never banned (office NAT, load balancers).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;

use crate::config::AbuseConfig;
use crate::events::{emit, SecurityEvent};
use crate::store::{BanRecord, LockoutRecord, Store};
use crate::types::{unix_now, UserName};

/// How long a successful login makes an address "known" for its account.
const KNOWN_ADDRESS_SECS: i64 = 30 * 86_400;
/// Entries per map before expired ones are swept; bounds memory under a
/// flood of distinct addresses or names.
const MAX_ENTRIES: usize = 100_000;
/// CLI removals of a ban or lockout are honoured after this long.
const REFRESH_GRACE_SECS: i64 = 15;

/// Wall clock in seconds; replaceable in tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(unix_now)
}

/// What a failed login leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureOutcome {
    /// Pause before answering.
    pub delay: Duration,
    /// The address has just been banned: close the connection.
    pub banned: bool,
}

pub trait SecurityState: Send + Sync + 'static {
    /// Called at accept, before TLS: `Some(reason)` refuses the connection.
    fn check_connection(&self, ip: IpAddr) -> Option<&'static str>;
    /// Whether `ip` is in an allowlisted network (never banned, never
    /// looked up in DNSBLs).
    fn is_allowlisted(&self, ip: IpAddr) -> bool;
    /// Counts a new connection (flood detection).
    fn record_connection(&self, ip: IpAddr);
    /// Whether logins for `user` from `ip` are refused by a lockout.
    fn account_locked(&self, user: &str, ip: IpAddr) -> bool;
    fn record_auth_failure(&self, ip: IpAddr, user: Option<&str>) -> FailureOutcome;
    fn record_auth_success(&self, ip: IpAddr, user: &UserName);
    /// A connection was closed for protocol abuse.
    fn record_protocol_abuse(&self, ip: IpAddr);
    /// LOGIN-DELAY: records a login of `user` unless the previous one was
    /// less than `min_interval` ago; returns whether it may proceed.
    fn try_login(&self, user: &UserName, min_interval: Duration) -> bool;
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: i64,
    count: u64,
}

impl Window {
    /// Adds one event; returns the count within the window.
    fn hit(slot: &mut Option<Window>, now: i64, window: i64) -> u64 {
        match slot {
            Some(w) if now - w.start < window => {
                w.count += 1;
                w.count
            }
            _ => {
                *slot = Some(Window { start: now, count: 1 });
                1
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    bans: HashMap<IpNet, BanRecord>,
    allow: Vec<IpNet>,
    block: Vec<IpNet>,
    ip_failures: HashMap<IpAddr, Window>,
    ip_abuse: HashMap<IpAddr, Window>,
    ip_connections: HashMap<IpAddr, Window>,
    /// Previous bans per address, for growing ban lengths.
    offences: HashMap<IpAddr, u32>,
    account_failures: HashMap<String, Window>,
    lockouts: HashMap<String, LockoutRecord>,
    /// (account, address) → last successful login.
    known: HashMap<(String, IpAddr), i64>,
    last_login: HashMap<UserName, i64>,
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn bounded<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, keep: impl Fn(&V) -> bool) {
    if map.len() >= MAX_ENTRIES {
        map.retain(|_, v| keep(v));
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
    }
}

/// What to persist, sent to the background writer.
pub enum Persist {
    Ban(BanRecord),
    Lockout(LockoutRecord),
}

pub struct Guard {
    cfg: AbuseConfig,
    base_delay: Duration,
    clock: Clock,
    inner: Mutex<Inner>,
    persist: Option<tokio::sync::mpsc::UnboundedSender<Persist>>,
}

impl Guard {
    pub fn new(cfg: AbuseConfig, base_delay: Duration, clock: Clock) -> Self {
        let inner = Inner { allow: cfg.allowlist.iter().map(|n| n.0).collect(), ..Inner::default() };
        Self { cfg, base_delay, clock, inner: Mutex::new(inner), persist: None }
    }

    /// Persists bans and lockouts through `store` and re-reads them (and the
    /// list files) every few seconds. Needs a Tokio runtime.
    pub fn with_store(mut self, store: Arc<dyn Store>) -> Arc<Self> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Persist>();
        self.persist = Some(tx);
        let guard = Arc::new(self);
        let writer_store = store.clone();
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                let r = match p {
                    Persist::Ban(b) => writer_store.put_ban(b).await,
                    Persist::Lockout(l) => writer_store.put_lockout(l).await,
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cannot persist security state");
                }
            }
        });
        let weak = Arc::downgrade(&guard);
        tokio::spawn(async move {
            loop {
                let Some(g) = weak.upgrade() else { break };
                g.refresh(&*store).await;
                drop(g);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        guard
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads bans, lockouts and list files.
    pub async fn refresh(&self, store: &dyn Store) {
        let now = (self.clock)();
        let (allow, block) =
            (self.read_list(self.cfg.allowlist_file.as_deref()), self.read_list(self.cfg.blocklist_file.as_deref()));
        let bans = store.bans().await;
        let lockouts = store.lockouts().await;
        let mut inner = self.lock();
        if let Some(mut allow) = allow {
            allow.extend(self.cfg.allowlist.iter().map(|n| n.0));
            inner.allow = allow;
        }
        if let Some(block) = block {
            inner.block = block;
        }
        if let Ok(bans) = bans {
            let stored: HashMap<IpNet, BanRecord> = bans.into_iter().map(|b| (b.network, b)).collect();
            inner.bans.retain(|net, b| stored.contains_key(net) || now - b.created_at < REFRESH_GRACE_SECS);
            for (net, b) in stored {
                inner.bans.insert(net, b);
            }
        }
        if let Ok(lockouts) = lockouts {
            let stored: HashMap<String, LockoutRecord> = lockouts.into_iter().map(|l| (l.user.clone(), l)).collect();
            inner.lockouts.retain(|u, l| stored.contains_key(u) || now - l.since < REFRESH_GRACE_SECS);
            for (u, l) in stored {
                inner.lockouts.insert(u, l);
            }
        }
    }

    /// Parses a list file; `None` if not configured or unreadable (the
    /// previous list stays in force).
    fn read_list(&self, path: Option<&std::path::Path>) -> Option<Vec<IpNet>> {
        let path = path?;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read network list");
                return None;
            }
        };
        Some(parse_networks(&text, path))
    }

    fn allowlisted(inner: &Inner, ip: IpAddr) -> bool {
        inner.allow.iter().any(|n| n.contains(&ip))
    }

    fn ban(&self, inner: &mut Inner, ip: IpAddr, reason: &'static str, now: i64) {
        if Self::allowlisted(inner, ip) {
            return;
        }
        let offences = inner.offences.get(&ip).copied().unwrap_or(0);
        let secs = self.cfg.ban_secs.saturating_mul(4u64.saturating_pow(offences)).min(self.cfg.ban_max_secs);
        bounded(&mut inner.offences, |_| false);
        inner.offences.insert(ip, offences + 1);
        let ban = BanRecord {
            network: host_net(ip),
            reason: reason.to_owned(),
            created_at: now,
            expires_at: Some(now + secs as i64),
            offences: offences + 1,
        };
        emit(SecurityEvent::Banned { peer: ip, reason, seconds: secs });
        inner.bans.insert(ban.network, ban.clone());
        inner.ip_failures.remove(&ip);
        inner.ip_abuse.remove(&ip);
        inner.ip_connections.remove(&ip);
        if let Some(p) = &self.persist {
            let _ = p.send(Persist::Ban(ban));
        }
    }

    fn delay_for(&self, failures: u64) -> Duration {
        let factor = 1u32.checked_shl(failures.saturating_sub(1).min(16) as u32).unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(Duration::from_millis(self.cfg.max_failure_delay_ms))
    }
}

/// Parses one CIDR or address per line; `#` starts a comment.
pub fn parse_networks(text: &str, source: &std::path::Path) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        match entry.parse::<IpNet>().or_else(|_| entry.parse::<IpAddr>().map(IpNet::from)) {
            Ok(n) => out.push(n.trunc()),
            Err(_) => tracing::warn!(path = %source.display(), line = i + 1, "not a network, ignored"),
        }
    }
    out
}

impl SecurityState for Guard {
    fn check_connection(&self, ip: IpAddr) -> Option<&'static str> {
        let now = (self.clock)();
        let inner = self.lock();
        if Self::allowlisted(&inner, ip) {
            return None;
        }
        if inner.block.iter().any(|n| n.contains(&ip)) {
            return Some("blocklisted");
        }
        let active = |b: &BanRecord| b.expires_at.is_none_or(|e| e > now);
        if inner.bans.get(&host_net(ip)).is_some_and(active) {
            return Some("banned");
        }
        if inner.bans.iter().any(|(n, b)| n.prefix_len() < n.max_prefix_len() && n.contains(&ip) && active(b)) {
            return Some("banned");
        }
        None
    }

    fn is_allowlisted(&self, ip: IpAddr) -> bool {
        Self::allowlisted(&self.lock(), ip)
    }

    fn record_connection(&self, ip: IpAddr) {
        let now = (self.clock)();
        let mut inner = self.lock();
        bounded(&mut inner.ip_connections, |w| now - w.start < 60);
        let mut slot = inner.ip_connections.get(&ip).copied();
        let n = Window::hit(&mut slot, now, 60);
        inner.ip_connections.insert(ip, slot.unwrap_or(Window { start: now, count: n }));
        if n >= self.cfg.ban_after_connections_per_minute {
            self.ban(&mut inner, ip, "connection flood", now);
        }
    }

    fn account_locked(&self, user: &str, ip: IpAddr) -> bool {
        let now = (self.clock)();
        let user = user.to_ascii_lowercase();
        let inner = self.lock();
        let locked = inner.lockouts.get(&user).is_some_and(|l| l.until > now);
        locked && inner.known.get(&(user, ip)).is_none_or(|t| now - t >= KNOWN_ADDRESS_SECS)
    }

    fn record_auth_failure(&self, ip: IpAddr, user: Option<&str>) -> FailureOutcome {
        let now = (self.clock)();
        let window = self.cfg.window_secs as i64;
        let mut inner = self.lock();
        bounded(&mut inner.ip_failures, |w| now - w.start < window);
        let mut slot = inner.ip_failures.get(&ip).copied();
        let ip_count = Window::hit(&mut slot, now, window);
        if let Some(w) = slot {
            inner.ip_failures.insert(ip, w);
        }
        let mut account_count = 0;
        if let Some(user) = user.map(str::to_ascii_lowercase) {
            bounded(&mut inner.account_failures, |w| now - w.start < window);
            let mut slot = inner.account_failures.get(&user).copied();
            account_count = Window::hit(&mut slot, now, window);
            if let Some(w) = slot {
                inner.account_failures.insert(user.clone(), w);
            }
            if account_count >= self.cfg.lockout_after_failures {
                let count = inner.lockouts.get(&user).map_or(0, |l| l.count);
                let secs =
                    self.cfg.lockout_secs.saturating_mul(2u64.saturating_pow(count)).min(self.cfg.lockout_max_secs);
                let record =
                    LockoutRecord { user: user.clone(), since: now, until: now + secs as i64, count: count + 1 };
                emit(SecurityEvent::AccountLocked { user: &user, seconds: secs });
                bounded(&mut inner.lockouts, |l| l.until > now);
                inner.lockouts.insert(user.clone(), record.clone());
                inner.account_failures.remove(&user);
                if let Some(p) = &self.persist {
                    let _ = p.send(Persist::Lockout(record));
                }
            }
        }
        let banned = ip_count >= self.cfg.ban_after_auth_failures && !Self::allowlisted(&inner, ip);
        if banned {
            self.ban(&mut inner, ip, "authentication failures", now);
        }
        FailureOutcome { delay: self.delay_for(ip_count.max(account_count)), banned }
    }

    fn record_auth_success(&self, ip: IpAddr, user: &UserName) {
        let now = (self.clock)();
        let mut inner = self.lock();
        inner.account_failures.remove(user.as_str());
        bounded(&mut inner.known, |t| now - t < KNOWN_ADDRESS_SECS);
        inner.known.insert((user.as_str().to_owned(), ip), now);
    }

    fn record_protocol_abuse(&self, ip: IpAddr) {
        let now = (self.clock)();
        let window = self.cfg.window_secs as i64;
        let mut inner = self.lock();
        bounded(&mut inner.ip_abuse, |w| now - w.start < window);
        let mut slot = inner.ip_abuse.get(&ip).copied();
        let n = Window::hit(&mut slot, now, window);
        if let Some(w) = slot {
            inner.ip_abuse.insert(ip, w);
        }
        if n >= self.cfg.ban_after_protocol_abuse {
            self.ban(&mut inner, ip, "protocol abuse", now);
        }
    }

    fn try_login(&self, user: &UserName, min_interval: Duration) -> bool {
        let now = (self.clock)();
        let min = min_interval.as_secs() as i64;
        let mut inner = self.lock();
        if inner.last_login.get(user).is_some_and(|prev| now - prev < min) {
            return false;
        }
        bounded(&mut inner.last_login, |t| now - t < min);
        inner.last_login.insert(user.clone(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    fn guard(cfg: AbuseConfig) -> (Guard, Arc<AtomicI64>) {
        let t = Arc::new(AtomicI64::new(1_000_000));
        let c = t.clone();
        (Guard::new(cfg, Duration::from_millis(100), Arc::new(move || c.load(Ordering::SeqCst))), t)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn progressive_delay_then_ban_with_growing_length_and_expiry() {
        let cfg = AbuseConfig { ban_after_auth_failures: 4, ban_secs: 100, ..AbuseConfig::default() };
        let (g, t) = guard(cfg);
        let a = ip("192.0.2.1");
        let delays: Vec<u64> = (0..3).map(|_| g.record_auth_failure(a, Some("x")).delay.as_millis() as u64).collect();
        assert_eq!(delays, vec![100, 200, 400]);
        assert!(g.check_connection(a).is_none());
        assert!(g.record_auth_failure(a, Some("x")).banned);
        assert_eq!(g.check_connection(a), Some("banned"));
        assert!(g.check_connection(ip("192.0.2.2")).is_none(), "other addresses unaffected");
        t.fetch_add(101, Ordering::SeqCst);
        assert!(g.check_connection(a).is_none(), "ban expired");
        for _ in 0..4 {
            g.record_auth_failure(a, None);
        }
        t.fetch_add(101, Ordering::SeqCst);
        assert_eq!(g.check_connection(a), Some("banned"), "second ban is 4x longer");
        t.fetch_add(300, Ordering::SeqCst);
        assert!(g.check_connection(a).is_none());
    }

    #[test]
    fn allowlisted_networks_are_never_banned() {
        let cfg = AbuseConfig {
            ban_after_auth_failures: 2,
            allowlist: vec![crate::config::Network("198.51.100.0/24".parse().unwrap())],
            ..AbuseConfig::default()
        };
        let (g, _) = guard(cfg);
        let office = ip("198.51.100.7");
        for _ in 0..50 {
            assert!(!g.record_auth_failure(office, None).banned);
            g.record_protocol_abuse(office);
            g.record_connection(office);
        }
        assert!(g.check_connection(office).is_none());
    }

    #[test]
    fn lockout_spares_known_addresses_and_unknown_names_lock_alike() {
        let cfg = AbuseConfig { lockout_after_failures: 3, lockout_secs: 60, ..AbuseConfig::default() };
        let (g, t) = guard(cfg);
        let home = ip("203.0.113.5");
        let attacker = ip("192.0.2.66");
        g.record_auth_success(home, &UserName::parse("alice").unwrap());
        for _ in 0..3 {
            g.record_auth_failure(attacker, Some("alice"));
            g.record_auth_failure(attacker, Some("nosuchuser"));
        }
        assert!(g.account_locked("alice", attacker));
        assert!(g.account_locked("NoSuchUser", attacker), "unknown names lock the same way");
        assert!(!g.account_locked("alice", home), "the owner's usual address still works");
        t.fetch_add(61, Ordering::SeqCst);
        assert!(!g.account_locked("alice", attacker), "lockout expires");
        for _ in 0..3 {
            g.record_auth_failure(attacker, Some("alice"));
        }
        t.fetch_add(61, Ordering::SeqCst);
        assert!(g.account_locked("alice", attacker), "second lockout is twice as long");
    }

    #[test]
    fn protocol_abuse_flood_and_blocklists() {
        let cfg =
            AbuseConfig { ban_after_protocol_abuse: 2, ban_after_connections_per_minute: 5, ..AbuseConfig::default() };
        let (g, t) = guard(cfg);
        let a = ip("192.0.2.10");
        g.record_protocol_abuse(a);
        assert!(g.check_connection(a).is_none());
        g.record_protocol_abuse(a);
        assert_eq!(g.check_connection(a), Some("banned"));
        let b = ip("2001:db8::1");
        for _ in 0..4 {
            g.record_connection(b);
        }
        assert!(g.check_connection(b).is_none());
        t.fetch_add(61, Ordering::SeqCst);
        for _ in 0..5 {
            g.record_connection(b);
        }
        assert_eq!(g.check_connection(b), Some("banned"));
        g.lock().block = parse_networks("# comment\n203.0.113.0/24\nnot-a-net\n", std::path::Path::new("x"));
        assert_eq!(g.check_connection(ip("203.0.113.9")), Some("blocklisted"));
    }

    #[test]
    fn login_delay() {
        let (g, t) = guard(AbuseConfig::default());
        let u = UserName::parse("alice").unwrap();
        assert!(g.try_login(&u, Duration::from_secs(60)));
        assert!(!g.try_login(&u, Duration::from_secs(60)));
        t.fetch_add(60, Ordering::SeqCst);
        assert!(g.try_login(&u, Duration::from_secs(60)));
    }
}
