//! Security state shared by sessions: today LOGIN-DELAY bookkeeping; the
//! authentication issue adds failure counters, lockouts and bans here.
//!
//! It is a trait so that a PostgreSQL-backed implementation can share the
//! state across nodes; [`MemorySecurityState`] serves a single node.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::types::UserName;

pub trait SecurityState: Send + Sync + 'static {
    /// Records a login of `user` now, unless the previous one was less than
    /// `min_interval` ago; returns whether the login may proceed.
    fn try_login(&self, user: &UserName, min_interval: Duration) -> bool;
}

/// Entries kept before old ones are swept, so a flood of distinct user
/// names cannot grow memory without bound.
const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
pub struct MemorySecurityState {
    last_login: Mutex<HashMap<UserName, Instant>>,
}

impl SecurityState for MemorySecurityState {
    fn try_login(&self, user: &UserName, min_interval: Duration) -> bool {
        let now = Instant::now();
        let mut map = self.last_login.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(prev) = map.get(user) {
            if now.duration_since(*prev) < min_interval {
                return false;
            }
        }
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, t| now.duration_since(*t) < min_interval);
        }
        map.insert(user.clone(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_delay() {
        let s = MemorySecurityState::default();
        let u = UserName::parse("alice").unwrap();
        assert!(s.try_login(&u, Duration::from_secs(60)));
        assert!(!s.try_login(&u, Duration::from_secs(60)));
        assert!(s.try_login(&u, Duration::ZERO));
    }
}
