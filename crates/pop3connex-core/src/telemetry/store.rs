//! The event store sink: every event the hub captures is kept in the store
//! (`[log.store]`, 90 days by default) for `pop3connex events search` and
//! the admin API's `/api/v1/events`.
//!
//! The hub hands events to a bounded [`Queue`]; one task drains it in
//! batches (one store write per batch, at most [`BATCH`] events, at least
//! every [`FLUSH`]) so a burst of events costs the mail path a few
//! transactions, never a wait. A full queue drops and counts; a failing
//! store (read-only disk) drops the batch and says so once per failure
//! streak. A second task applies retention every hour.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc::Receiver;
use tokio::task::JoinHandle;

use super::hub::{EventRecord, Queue};
use crate::config::events::EventStoreConfig;
use crate::store::{Store, StoredEvent};

/// Most events written in one transaction.
pub const BATCH: usize = 512;
/// Longest an event waits in the queue when events are rare.
pub const FLUSH: Duration = Duration::from_millis(500);
/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Longest message and fields text kept per event (bytes).
const MAX_MESSAGE: usize = 1024;
const MAX_FIELDS: usize = 4096;

/// The running event store sink: register [`EventStoreSink::queue`] with
/// the hub.
pub struct EventStoreSink {
    pub queue: Arc<Queue>,
    /// Events lost: queue full, or a batch the store refused.
    pub lost: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl EventStoreSink {
    /// Starts the writer and retention tasks on the current runtime.
    pub fn start(store: Arc<dyn Store>, cfg: &EventStoreConfig) -> EventStoreSink {
        let (queue, rx) = Queue::new(cfg.queue);
        let queue = Arc::new(queue);
        let lost = Arc::new(AtomicU64::new(0));
        let writer = tokio::spawn(write_loop(store.clone(), rx, lost.clone()));
        let (retention, max) = (cfg.retention_ms(), cfg.max_events);
        let pruner = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_EVERY);
            loop {
                tick.tick().await;
                let before = now_ms() - retention;
                match store.prune_events(before, max).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "event store retention applied"),
                    Err(e) => tracing::warn!(error = %e, "event store retention failed; retried in an hour"),
                }
            }
        });
        EventStoreSink { queue, lost, tasks: vec![writer, pruner] }
    }

    /// Writes what is queued and stops (at most `grace`). Call after
    /// [`super::Hub::clear`], so this holds the last sender of the queue.
    pub async fn finish(mut self, grace: Duration) {
        let writer = self.tasks.remove(0);
        self.queue = Arc::new(Queue::new(1).0);
        let _ = tokio::time::timeout(grace, writer).await;
    }

    /// Events lost so far (queue full or refused by the store).
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed) + self.queue.dropped()
    }
}

impl Drop for EventStoreSink {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn write_loop(store: Arc<dyn Store>, mut rx: Receiver<Arc<EventRecord>>, lost: Arc<AtomicU64>) {
    let mut failing = false;
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(stored(&first));
        // Gather what arrives within FLUSH, up to BATCH.
        let deadline = tokio::time::Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => batch.push(stored(&e)),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        match store.append_events(std::mem::take(&mut batch)).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("event store writable again");
            }
            Ok(()) => {}
            Err(e) => {
                lost.fetch_add(n, Ordering::Relaxed);
                if !failing {
                    failing = true;
                    // No `event` field: this must not feed back into the sink.
                    tracing::warn!(error = %e, "event store write failed; events are dropped until it recovers");
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// The address of a `peer` field: an IP, or the IP of `ip:port`.
fn address(v: &Value) -> Option<String> {
    let s = v.as_str()?;
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Some(ip.to_string());
    }
    s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip().to_string())
}

/// An event as the store keeps it: the account (`user`, or `admin` for
/// the admin plane's events) and the client address (`peer`) in indexed
/// columns, everything else as JSON.
pub fn stored(e: &EventRecord) -> StoredEvent {
    let user = e.str("user").or_else(|| e.str("admin")).filter(|u| !u.is_empty()).map(|u| truncate(u.to_owned(), 320));
    let ip = e.fields.get("peer").and_then(address);
    let fields = Value::Object(e.fields.clone()).to_string();
    // A cut object is no longer JSON: keep the cut text as a JSON string.
    let fields =
        if fields.len() > MAX_FIELDS { Value::String(truncate(fields, MAX_FIELDS)).to_string() } else { fields };
    StoredEvent {
        seq: 0,
        time: (e.time.unix_timestamp_nanos() / 1_000_000) as i64,
        code: e.def().map_or(0, |d| d.id),
        name: e.name.clone(),
        severity: e.severity.code(),
        user,
        ip,
        message: truncate(e.message.clone(), MAX_MESSAGE),
        fields,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Map;
    use time::OffsetDateTime;

    use super::*;
    use crate::telemetry::hub::Consumer;
    use crate::telemetry::Severity;

    fn record(name: &str, fields: &[(&str, Value)]) -> Arc<EventRecord> {
        let mut m = Map::new();
        for (k, v) in fields {
            m.insert((*k).into(), v.clone());
        }
        Arc::new(EventRecord {
            time: OffsetDateTime::now_utc(),
            target: "pop3connex::security",
            name: name.into(),
            severity: Severity::Warning,
            message: "authentication failed".into(),
            fields: m,
            alert: false,
        })
    }

    #[test]
    fn user_and_address_are_indexed_and_the_rest_kept_as_json() {
        let s = stored(&record(
            "auth_failure",
            &[("peer", "192.0.2.7".into()), ("user", "alice".into()), ("mechanism", "PLAIN".into())],
        ));
        assert_eq!((s.code, s.name.as_str(), s.severity), (101, "auth_failure", 4));
        assert_eq!((s.user.as_deref(), s.ip.as_deref()), (Some("alice"), Some("192.0.2.7")));
        let fields: Value = serde_json::from_str(&s.fields).unwrap();
        assert_eq!(fields["mechanism"], "PLAIN");
        let s = stored(&record("admin_login", &[("peer", "[2001:db8::1]:443".into()), ("admin", "root".into())]));
        assert_eq!((s.user.as_deref(), s.ip.as_deref()), (Some("root"), Some("2001:db8::1")));
        // Oversized input is cut, on a character boundary, and stays valid JSON.
        let s = stored(&record("auth_failure", &[("reason", "é".repeat(5000).into())]));
        assert!(s.fields.len() <= 2 * MAX_FIELDS, "{}", s.fields.len());
        assert!(serde_json::from_str::<Value>(&s.fields).is_ok());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn queued_events_reach_the_store_in_batches() {
        let dir = std::env::temp_dir().join(format!("p3x-evsink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::sqlite::SqliteStore::open(&dir.join("s.db")).unwrap());
        let sink = EventStoreSink::start(store.clone(), &EventStoreConfig::default());
        for i in 0..1200u32 {
            sink.queue.accept(&record("auth_failure", &[("user", format!("u{i}").into())]));
        }
        let mut found = 0;
        for _ in 0..100 {
            found = store
                .search_events(crate::store::EventFilter { limit: 5000, ..Default::default() })
                .await
                .unwrap()
                .len();
            if found == 1200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(found, 1200);
        assert_eq!(sink.lost(), 0);
        drop(sink);
        let _ = std::fs::remove_dir_all(dir);
    }
}
