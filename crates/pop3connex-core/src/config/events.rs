//! `[log.store]`: the local event store kept for investigations.

use serde::Deserialize;

/// `[log.store]`: security and operational events kept in the store,
/// searchable with `pop3connex events search` and the admin API.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EventStoreConfig {
    /// Keep events at all (on by default).
    pub enabled: bool,
    /// Days an event is kept (1..=3650; default 90, what investigations
    /// usually need; raise it where a regulation asks for more).
    pub retention_days: u32,
    /// At most this many events are kept; the oldest go first. Bounds the
    /// disk an attack generating events can take (default 5,000,000,
    /// roughly 1–2 GB).
    pub max_events: u64,
    /// Events waiting to be written; beyond this they are dropped and
    /// counted, never waited for (default 10,000).
    pub queue: usize,
}

impl Default for EventStoreConfig {
    fn default() -> Self {
        Self { enabled: true, retention_days: 90, max_events: 5_000_000, queue: 10_000 }
    }
}

impl EventStoreConfig {
    pub fn check(&self) -> Result<(), String> {
        if !(1..=3650).contains(&self.retention_days) {
            return Err(format!("[log.store] retention_days = {}: must be 1 to 3650", self.retention_days));
        }
        if !(1_000..=1_000_000_000).contains(&self.max_events) {
            return Err(format!("[log.store] max_events = {}: must be 1000 to 1000000000", self.max_events));
        }
        if !(100..=1_000_000).contains(&self.queue) {
            return Err(format!("[log.store] queue = {}: must be 100 to 1000000", self.queue));
        }
        Ok(())
    }

    /// Retention in milliseconds.
    pub fn retention_ms(&self) -> i64 {
        i64::from(self.retention_days) * 86_400_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let d = EventStoreConfig::default();
        assert!(d.enabled && d.retention_days == 90 && d.check().is_ok());
        assert_eq!(d.retention_ms(), 90 * 86_400_000);
        for bad in [
            EventStoreConfig { retention_days: 0, ..d.clone() },
            EventStoreConfig { retention_days: 4000, ..d.clone() },
            EventStoreConfig { max_events: 10, ..d.clone() },
            EventStoreConfig { queue: 0, ..d.clone() },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
