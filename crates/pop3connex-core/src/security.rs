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
//! Addresses are aggregated before they are counted or banned: an IPv4
//! address stands for itself, an IPv6 address for its `[abuse] ipv6_prefix`
//! (default /64), since one host usually owns a whole /64 and can rotate
//! through it. Every in-memory table is an [`LruMap`]: when full it evicts
//! the least recently used entry, so a flood of new keys never resets the
//! counters (or the ban escalation) of an attacker that is still active.
//!
//! Trade-offs, documented for operators:
//! - Lockouts are keyed by the claimed user name whether or not it exists,
//!   so they reveal nothing about which accounts exist.
//! - A lockout does not apply to addresses from which the account logged in
//!   successfully in the last 30 days: an attacker elsewhere cannot lock the
//!   owner out of their usual network. These known addresses are stored
//!   (newest 16 per account, existing accounts only) and shared like bans,
//!   so the exemption survives a restart and holds on every node. Bans stop
//!   the attacker's address.
//! - Allowlisted networks are never banned (office NAT, load balancers).
//! - A list file with a line that is not a network is rejected as a whole;
//!   the previous list stays in force and the error names file and line.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;

use crate::config::AbuseConfig;
use crate::events::{emit, SecurityEvent};
use crate::limits::{aggregate, LruMap};
use crate::store::{BanRecord, KnownAddress, LockoutRecord, Store};
use crate::types::{unix_now, UserName};

/// How long a successful login makes an address "known" for its account.
pub const KNOWN_ADDRESS_SECS: i64 = 30 * 86_400;
/// A known address is written to the store again only after this long, so
/// a busy account does not cost a write per login.
const KNOWN_ADDRESS_REWRITE_SECS: i64 = 3600;
/// Entries per in-memory table; the least recently used is evicted beyond.
/// Bounds memory under a flood of distinct addresses or names.
pub const MAX_ENTRIES: usize = 100_000;
/// CLI removals of a ban or lockout are honoured after this long.
const REFRESH_GRACE_SECS: i64 = 15;
/// Expired rows are purged from the store every this many re-reads.
const PURGE_EVERY_REFRESHES: u64 = 60;

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
    /// Adds one event to `key`'s window in `map`; returns the count within
    /// the window.
    fn hit<K: std::hash::Hash + Eq + Clone>(map: &mut LruMap<K, Window>, key: K, now: i64, window: i64) -> u64 {
        match map.get_mut(&key) {
            Some(w) if now - w.start < window => {
                w.count += 1;
                w.count
            }
            _ => {
                map.insert(key, Window { start: now, count: 1 });
                1
            }
        }
    }
}

struct Inner {
    bans: HashMap<IpNet, BanRecord>,
    /// Bans wider than one aggregation key (set with `pop3connex ban add`),
    /// scanned at accept; rebuilt whenever `bans` changes wholesale.
    wide_bans: Vec<IpNet>,
    allow: Vec<IpNet>,
    block: Vec<IpNet>,
    /// Content hash of each list file as last applied (or rejected), so an
    /// unchanged file is not parsed, nor its error logged, every re-read.
    list_seen: HashMap<PathBuf, u64>,
    ip_failures: LruMap<IpNet, Window>,
    ip_abuse: LruMap<IpNet, Window>,
    ip_connections: LruMap<IpNet, Window>,
    /// Previous bans per address, for growing ban lengths.
    offences: LruMap<IpNet, u32>,
    account_failures: LruMap<String, Window>,
    lockouts: HashMap<String, LockoutRecord>,
    /// (account, aggregated address) → last successful login.
    known: LruMap<(String, IpNet), i64>,
    last_login: LruMap<UserName, i64>,
    refreshes: u64,
}

impl Inner {
    fn new(capacity: usize, allow: Vec<IpNet>) -> Self {
        Self {
            bans: HashMap::new(),
            wide_bans: Vec::new(),
            allow,
            block: Vec::new(),
            list_seen: HashMap::new(),
            ip_failures: LruMap::new(capacity),
            ip_abuse: LruMap::new(capacity),
            ip_connections: LruMap::new(capacity),
            offences: LruMap::new(capacity),
            account_failures: LruMap::new(capacity),
            lockouts: HashMap::new(),
            known: LruMap::new(capacity),
            last_login: LruMap::new(capacity),
            refreshes: 0,
        }
    }
}

/// What to persist, sent to the background writer.
pub enum Persist {
    Ban(BanRecord),
    Lockout(LockoutRecord),
    Known(KnownAddress),
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
        Self::with_capacity(cfg, base_delay, clock, MAX_ENTRIES)
    }

    /// Like [`Guard::new`] with `capacity` entries per in-memory table.
    pub fn with_capacity(cfg: AbuseConfig, base_delay: Duration, clock: Clock, capacity: usize) -> Self {
        let inner = Inner::new(capacity, cfg.allowlist.iter().map(|n| n.0).collect());
        Self { cfg, base_delay, clock, inner: Mutex::new(inner), persist: None }
    }

    /// Persists bans, lockouts and known addresses through `store` and
    /// re-reads them (and the list files) every `refresh_secs`. Needs a
    /// Tokio runtime.
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
                    Persist::Known(k) => writer_store.put_known_address(k).await,
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cannot persist security state");
                }
            }
        });
        let weak = Arc::downgrade(&guard);
        let every = Duration::from_secs(guard.cfg.refresh_secs.max(1));
        tokio::spawn(async move {
            loop {
                let Some(g) = weak.upgrade() else { break };
                g.refresh(&*store).await;
                drop(g);
                crate::events::flush_suppressed();
                tokio::time::sleep(every).await;
            }
        });
        guard
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, ip: IpAddr) -> IpNet {
        aggregate(ip, self.cfg.ipv6_prefix.min(128) as u8)
    }

    /// Whether `net` is one aggregation key (checked by lookup, not scan).
    fn is_key(&self, net: &IpNet) -> bool {
        match net {
            IpNet::V4(n) => n.prefix_len() == 32,
            IpNet::V6(n) => n.prefix_len() == 128 || u64::from(n.prefix_len()) == self.cfg.ipv6_prefix,
        }
    }

    /// SIGHUP: re-reads list files even if unchanged, then everything else.
    pub async fn reload(&self, store: &dyn Store) {
        self.lock().list_seen.clear();
        self.refresh(store).await;
    }

    /// Re-reads bans, lockouts, known addresses and changed list files;
    /// purges expired rows from the store now and then.
    pub async fn refresh(&self, store: &dyn Store) {
        let now = (self.clock)();
        let allow = self.read_list(self.cfg.allowlist_file.as_deref());
        let block = self.read_list(self.cfg.blocklist_file.as_deref());
        let purge = {
            let mut inner = self.lock();
            inner.refreshes += 1;
            inner.refreshes % PURGE_EVERY_REFRESHES == 1
        };
        if purge {
            if let Err(e) = store.purge_security(now, now - KNOWN_ADDRESS_SECS).await {
                tracing::warn!(error = %e, "cannot purge expired bans and lockouts");
            }
        }
        let bans = store.bans().await;
        let lockouts = store.lockouts().await;
        let known = store.locked_known_addresses(now, now - KNOWN_ADDRESS_SECS).await;
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
            inner.wide_bans = inner.bans.keys().filter(|n| !self.is_key(n)).copied().collect();
        }
        if let Ok(lockouts) = lockouts {
            let stored: HashMap<String, LockoutRecord> = lockouts.into_iter().map(|l| (l.user.clone(), l)).collect();
            inner.lockouts.retain(|u, l| stored.contains_key(u) || now - l.since < REFRESH_GRACE_SECS);
            for (u, l) in stored {
                inner.lockouts.insert(u, l);
            }
        }
        if let Ok(known) = known {
            for k in known {
                let key = (k.user, k.network);
                if inner.known.peek(&key).is_none_or(|t| *t < k.last_seen) {
                    inner.known.insert(key, k.last_seen);
                }
            }
        }
    }

    /// Loads the list files at start. Unlike a re-read, an unreadable or
    /// malformed file is an error: there is no previous list to keep.
    pub fn load_lists(&self) -> Result<(), String> {
        let files = [(self.cfg.allowlist_file.as_deref(), true), (self.cfg.blocklist_file.as_deref(), false)];
        for (path, allow) in files {
            let Some(path) = path else { continue };
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut list = parse_networks(&text, path).map_err(|e| e.to_string())?;
            tracing::info!(path = %path.display(), networks = list.len(), "network list loaded");
            let mut inner = self.lock();
            inner.list_seen.insert(path.to_owned(), content_hash(&text));
            if allow {
                list.extend(self.cfg.allowlist.iter().map(|n| n.0));
                inner.allow = list;
            } else {
                inner.block = list;
            }
        }
        Ok(())
    }

    /// Reads and parses a list file if it changed since it was last seen;
    /// `None` if not configured, unchanged, unreadable or malformed (the
    /// previous list stays in force).
    fn read_list(&self, path: Option<&Path>) -> Option<Vec<IpNet>> {
        let path = path?;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                let mut inner = self.lock();
                // Logged once per failure, not every re-read.
                if inner.list_seen.insert(path.to_owned(), 0) != Some(0) {
                    tracing::error!(path = %path.display(), error = %e, "cannot read network list; keeping the previous list");
                }
                return None;
            }
        };
        let hash = content_hash(&text);
        if self.lock().list_seen.insert(path.to_owned(), hash) == Some(hash) {
            return None;
        }
        match parse_networks(&text, path) {
            Ok(list) => {
                tracing::info!(path = %path.display(), networks = list.len(), "network list loaded");
                Some(list)
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "network list rejected; keeping the previous list");
                None
            }
        }
    }

    fn allowlisted(inner: &Inner, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        inner.allow.iter().any(|n| n.contains(&ip))
    }

    fn ban(&self, inner: &mut Inner, ip: IpAddr, reason: &'static str, now: i64) {
        if Self::allowlisted(inner, ip) {
            return;
        }
        let key = self.key(ip);
        let offences = inner.offences.peek(&key).copied().unwrap_or(0);
        let secs = self.cfg.ban_secs.saturating_mul(4u64.saturating_pow(offences)).min(self.cfg.ban_max_secs);
        inner.offences.insert(key, offences + 1);
        let ban = BanRecord {
            network: key,
            reason: reason.to_owned(),
            created_at: now,
            expires_at: Some(now + secs as i64),
            offences: offences + 1,
        };
        emit(SecurityEvent::Banned { peer: ip, reason, seconds: secs });
        inner.bans.insert(ban.network, ban.clone());
        inner.ip_failures.remove(&key);
        inner.ip_abuse.remove(&key);
        inner.ip_connections.remove(&key);
        if let Some(p) = &self.persist {
            let _ = p.send(Persist::Ban(ban));
        }
    }

    /// Bans `ip` now, with the same growing ban length as the automatic
    /// bans, for a limit counted elsewhere (the admin listener's
    /// `login_failures_before_ban`). Allowlisted addresses are never banned.
    pub fn ban_address(&self, ip: IpAddr, reason: &'static str) {
        let now = (self.clock)();
        let mut inner = self.lock();
        self.ban(&mut inner, ip, reason, now);
    }

    fn delay_for(&self, failures: u64) -> Duration {
        let factor = 1u32.checked_shl(failures.saturating_sub(1).min(16) as u32).unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(Duration::from_millis(self.cfg.max_failure_delay_ms))
    }
}

/// Identifies a list file's content (never 0, which marks "unreadable").
fn content_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish() | 1
}

/// A list file line that is not a network.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: `{entry}` is not a network (CIDR or address)")]
pub struct ListError {
    pub path: String,
    pub line: usize,
    pub entry: String,
}

/// Parses one CIDR or address per line; `#` starts a comment. Any other
/// line rejects the whole file: half a blocklist is worse than the last
/// good one.
pub fn parse_networks(text: &str, source: &Path) -> Result<Vec<IpNet>, ListError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        match entry.parse::<IpNet>().or_else(|_| entry.parse::<IpAddr>().map(IpNet::from)) {
            Ok(n) => out.push(n.trunc()),
            Err(_) => {
                let shown: String = entry.chars().take(64).filter(|c| !c.is_control()).collect();
                return Err(ListError { path: source.display().to_string(), line: i + 1, entry: shown });
            }
        }
    }
    Ok(out)
}

impl SecurityState for Guard {
    fn check_connection(&self, ip: IpAddr) -> Option<&'static str> {
        let now = (self.clock)();
        let inner = self.lock();
        if Self::allowlisted(&inner, ip) {
            return None;
        }
        let canonical = ip.to_canonical();
        if inner.block.iter().any(|n| n.contains(&canonical)) {
            return Some("blocklisted");
        }
        let active = |b: &BanRecord| b.expires_at.is_none_or(|e| e > now);
        let key = self.key(ip);
        if inner.bans.get(&key).is_some_and(active) || inner.bans.get(&IpNet::from(canonical)).is_some_and(active) {
            return Some("banned");
        }
        let wide = inner.wide_bans.iter().filter(|n| n.contains(&canonical));
        if wide.filter_map(|n| inner.bans.get(n)).any(active) {
            return Some("banned");
        }
        None
    }

    fn is_allowlisted(&self, ip: IpAddr) -> bool {
        Self::allowlisted(&self.lock(), ip)
    }

    fn record_connection(&self, ip: IpAddr) {
        let now = (self.clock)();
        let key = self.key(ip);
        let mut inner = self.lock();
        let n = Window::hit(&mut inner.ip_connections, key, now, 60);
        if n >= self.cfg.ban_after_connections_per_minute {
            self.ban(&mut inner, ip, "connection flood", now);
        }
    }

    fn account_locked(&self, user: &str, ip: IpAddr) -> bool {
        let now = (self.clock)();
        let user = user.to_ascii_lowercase();
        let key = self.key(ip);
        let inner = self.lock();
        let locked = inner.lockouts.get(&user).is_some_and(|l| l.until > now);
        locked && inner.known.peek(&(user, key)).is_none_or(|t| now - t >= KNOWN_ADDRESS_SECS)
    }

    fn record_auth_failure(&self, ip: IpAddr, user: Option<&str>) -> FailureOutcome {
        let now = (self.clock)();
        let window = self.cfg.window_secs as i64;
        let key = self.key(ip);
        let mut inner = self.lock();
        let ip_count = Window::hit(&mut inner.ip_failures, key, now, window);
        let mut account_count = 0;
        if let Some(user) = user.map(str::to_ascii_lowercase) {
            account_count = Window::hit(&mut inner.account_failures, user.clone(), now, window);
            if account_count >= self.cfg.lockout_after_failures {
                let count = inner.lockouts.get(&user).map_or(0, |l| l.count);
                let secs =
                    self.cfg.lockout_secs.saturating_mul(2u64.saturating_pow(count)).min(self.cfg.lockout_max_secs);
                let record =
                    LockoutRecord { user: user.clone(), since: now, until: now + secs as i64, count: count + 1 };
                emit(SecurityEvent::AccountLocked { user: &user, seconds: secs });
                if inner.lockouts.len() >= MAX_ENTRIES {
                    inner.lockouts.retain(|_, l| l.until > now);
                }
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
        let key = (user.as_str().to_ascii_lowercase(), self.key(ip));
        let mut inner = self.lock();
        inner.account_failures.remove(&key.0);
        let previous = inner.known.peek(&key).copied();
        inner.known.insert(key.clone(), now);
        if previous.is_none_or(|t| now - t >= KNOWN_ADDRESS_REWRITE_SECS) {
            if let Some(p) = &self.persist {
                let _ = p.send(Persist::Known(KnownAddress { user: key.0, network: key.1, last_seen: now }));
            }
        }
    }

    fn record_protocol_abuse(&self, ip: IpAddr) {
        let now = (self.clock)();
        let window = self.cfg.window_secs as i64;
        let key = self.key(ip);
        let mut inner = self.lock();
        let n = Window::hit(&mut inner.ip_abuse, key, now, window);
        if n >= self.cfg.ban_after_protocol_abuse {
            self.ban(&mut inner, ip, "protocol abuse", now);
        }
    }

    fn try_login(&self, user: &UserName, min_interval: Duration) -> bool {
        let now = (self.clock)();
        let min = min_interval.as_secs() as i64;
        let mut inner = self.lock();
        if inner.last_login.peek(user).is_some_and(|prev| now - prev < min) {
            return false;
        }
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
        g.lock().block = parse_networks("# comment\n203.0.113.0/24\n", std::path::Path::new("x")).unwrap();
        assert_eq!(g.check_connection(ip("203.0.113.9")), Some("blocklisted"));
    }

    #[test]
    fn ipv6_failures_in_one_64_count_together_and_the_ban_covers_the_64() {
        let cfg = AbuseConfig { ban_after_auth_failures: 4, ..AbuseConfig::default() };
        let (g, _) = guard(cfg);
        for i in 1..=3 {
            assert!(!g.record_auth_failure(ip(&format!("2001:db8::{i}")), None).banned);
        }
        assert!(g.record_auth_failure(ip("2001:db8::ffff:1"), None).banned, "the fourth failure in the /64 bans");
        assert_eq!(g.check_connection(ip("2001:db8::abcd")), Some("banned"), "the ban covers the /64");
        assert_eq!(g.check_connection(ip("2001:db8:0:1::1")), None, "the next /64 is not banned");
        assert_eq!(g.lock().bans.keys().copied().collect::<Vec<_>>(), vec!["2001:db8::/64".parse().unwrap()]);
        // IPv4, also mapped into IPv6, stays per address.
        let (g, _) = guard(AbuseConfig { ban_after_auth_failures: 2, ..AbuseConfig::default() });
        g.record_auth_failure(ip("192.0.2.1"), None);
        assert!(!g.record_auth_failure(ip("192.0.2.2"), None).banned);
        assert!(g.record_auth_failure(ip("::ffff:192.0.2.1"), None).banned);
        assert_eq!(g.check_connection(ip("192.0.2.1")), Some("banned"));
        assert_eq!(g.check_connection(ip("192.0.2.3")), None);
        // The prefix is configurable; /128 counts single addresses.
        let (g, _) = guard(AbuseConfig { ban_after_auth_failures: 2, ipv6_prefix: 128, ..AbuseConfig::default() });
        g.record_auth_failure(ip("2001:db8::1"), None);
        assert!(!g.record_auth_failure(ip("2001:db8::2"), None).banned);
    }

    #[test]
    fn lru_eviction_keeps_the_hot_attackers_counters_when_the_map_is_full() {
        let cfg = AbuseConfig { ban_after_auth_failures: 5, ..AbuseConfig::default() };
        let (g, _) = guard(cfg);
        let attacker = ip("198.51.100.66");
        let mut others = (0u32..).map(|n| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n)));
        // The map fills up with one-off failures from other addresses while
        // the attacker keeps going.
        for _ in 0..4 {
            assert!(!g.record_auth_failure(attacker, None).banned);
            for o in others.by_ref().take(MAX_ENTRIES / 3) {
                g.record_auth_failure(o, None);
            }
        }
        assert!(g.lock().ip_failures.len() <= MAX_ENTRIES, "bounded");
        assert!(g.record_auth_failure(attacker, None).banned, "the attacker's count survived the flood");
        // Ban escalation of a repeat offender survives a flood of other bans.
        let (g, _) = guard(AbuseConfig { ban_after_auth_failures: 1, ..AbuseConfig::default() });
        for _ in 0..2 {
            g.record_auth_failure(attacker, None);
            for o in others.by_ref().take(MAX_ENTRIES * 3 / 5) {
                g.record_auth_failure(o, None);
            }
        }
        g.record_auth_failure(attacker, None);
        assert_eq!(g.lock().bans[&IpNet::from(attacker)].offences, 3, "third ban, 16x as long");
        assert!(g.lock().offences.len() <= MAX_ENTRIES, "bounded");
    }

    #[test]
    fn malformed_list_file_is_rejected_whole_with_file_and_line() {
        let e = parse_networks("203.0.113.0/24\n\n# fine\n198.51.100.1 # host\nnot-a-net\n", Path::new("/x/block.txt"))
            .unwrap_err();
        assert_eq!(e.to_string(), "/x/block.txt:5: `not-a-net` is not a network (CIDR or address)");
        let ok = parse_networks("203.0.113.7/24\n198.51.100.1 # host\n", Path::new("x")).unwrap();
        assert_eq!(ok, vec!["203.0.113.0/24".parse::<IpNet>().unwrap(), "198.51.100.1/32".parse().unwrap()]);
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
