//! Connection limits (global and per source address) and [`LruMap`], the
//! bounded map every per-address or per-name table uses.
//!
//! A permit is taken at accept time, before any TLS work, and released when
//! the connection ends (RAII). The same counters tell graceful shutdown when
//! every session has finished.
//!
//! [`LruMap`] holds at most a fixed number of entries and evicts the least
//! recently used one to make room: a flood of new keys (rotating IPv6
//! addresses, invented user names) pushes out cold entries, never the
//! counters of the attacker that is hitting us right now.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;

use ipnet::IpNet;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitExceeded {
    Global,
    PerIp,
}

impl LimitExceeded {
    pub fn reason(self) -> &'static str {
        match self {
            LimitExceeded::Global => "too many connections",
            LimitExceeded::PerIp => "too many connections from this address",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
pub struct ConnectionLimiter {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
    idle: Notify,
}

impl ConnectionLimiter {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self { max_total, max_per_ip, counts: Mutex::default(), idle: Notify::new() })
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, LimitExceeded> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.max_total {
            return Err(LimitExceeded::Global);
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(LimitExceeded::PerIp);
        }
        *n += 1;
        c.total += 1;
        Ok(ConnPermit { limiter: self.clone(), ip })
    }

    pub fn active(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    /// Resolves when no connection is active.
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Held for the lifetime of one connection.
#[derive(Debug)]
pub struct ConnPermit {
    limiter: Arc<ConnectionLimiter>,
    ip: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = self.limiter.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total -= 1;
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
        if c.total == 0 {
            self.limiter.idle.notify_waiters();
        }
    }
}

/// The key an address is counted, rate-limited and banned under: an IPv4
/// address (also one mapped into IPv6) as itself, an IPv6 address as its
/// `v6_prefix` network, since one host usually owns a whole /64.
pub fn aggregate(ip: IpAddr, v6_prefix: u8) -> IpNet {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpNet::from(IpAddr::V4(v4)),
        IpAddr::V6(v6) => IpNet::new(IpAddr::V6(v6), v6_prefix.clamp(1, 128)).map_or(IpNet::from(ip), |n| n.trunc()),
    }
}

/// A map bounded to `capacity` entries with least-recently-used eviction.
/// Reads through [`LruMap::get_mut`] and writes count as use; [`LruMap::peek`]
/// does not. Every operation is O(log n).
#[derive(Debug)]
pub struct LruMap<K, V> {
    capacity: usize,
    /// key → (value, tick of its last use).
    entries: HashMap<K, (V, u64)>,
    /// tick of last use → key; the first entry is the eviction candidate.
    order: BTreeMap<u64, K>,
    tick: u64,
}

impl<K: Hash + Eq + Clone, V> LruMap<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), entries: HashMap::new(), order: BTreeMap::new(), tick: 0 }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn touch(&mut self, key: &K) {
        self.tick += 1;
        if let Some((_, t)) = self.entries.get_mut(key) {
            self.order.remove(t);
            *t = self.tick;
            self.order.insert(self.tick, key.clone());
        }
    }

    /// The value without marking it used.
    pub fn peek(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|(v, _)| v)
    }

    /// The value, marked as most recently used.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.touch(key);
        self.entries.get_mut(key).map(|(v, _)| v)
    }

    /// Inserts or replaces `key`, evicting the least recently used entry if
    /// the map is full.
    pub fn insert(&mut self, key: K, value: V) {
        if let Some((v, _)) = self.entries.get_mut(&key) {
            *v = value;
            self.touch(&key);
            return;
        }
        while self.entries.len() >= self.capacity {
            let Some((_, old)) = self.order.pop_first() else { break };
            self.entries.remove(&old);
        }
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.entries.insert(key, (value, self.tick));
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (v, t) = self.entries.remove(key)?;
        self.order.remove(&t);
        Some(v)
    }

    /// Keeps only the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        let order = &mut self.order;
        self.entries.retain(|k, (v, t)| {
            let kept = keep(k, v);
            if !kept {
                order.remove(t);
            }
            kept
        });
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, (v, _))| (k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_map_evicts_the_least_recently_used() {
        let mut m = LruMap::new(3);
        m.insert("a", 1);
        m.insert("b", 2);
        m.insert("c", 3);
        *m.get_mut(&"a").unwrap() += 10;
        m.insert("d", 4);
        assert_eq!(m.len(), 3);
        assert_eq!(m.peek(&"a"), Some(&11), "recently used survives");
        assert_eq!(m.peek(&"b"), None, "least recently used evicted");
        m.retain(|_, v| *v != 3);
        assert_eq!(m.len(), 2);
        m.insert("e", 5);
        m.insert("f", 6);
        assert_eq!(m.len(), 3);
        assert_eq!(m.peek(&"a"), None);
        assert_eq!(m.remove(&"f"), Some(6));
        assert_eq!(m.order.len(), m.entries.len());
    }

    #[test]
    fn limits_and_release() {
        let l = ConnectionLimiter::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = l.try_acquire(a).unwrap();
        let _p2 = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(a).unwrap_err(), LimitExceeded::PerIp);
        let _p3 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(b).unwrap_err(), LimitExceeded::Global);
        drop(p1);
        let _p4 = l.try_acquire(a).unwrap();
        assert_eq!(l.active(), 3);
    }
}
