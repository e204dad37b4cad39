//! Connection limits: global and per source address.
//!
//! A permit is taken at accept time, before any TLS work, and released when
//! the connection ends (RAII). The same counters tell graceful shutdown when
//! every session has finished.

use std::collections::HashMap;
use std::net::IpAddr;
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

#[cfg(test)]
mod tests {
    use super::*;

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
