//! The event hub: a `tracing` layer that captures POP3conneX events as
//! owned records and fans them out to consumers.
//!
//! An event is captured when its target starts with `pop3connex` and it
//! carries an `event` field (its catalogue name) or `alert = true`. The
//! consumer list is global (one process, one pipeline) and can be set after
//! logging starts: `serve` installs the layer first, reads the
//! configuration, then registers the sinks it names. With no consumer the
//! layer returns before building anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use serde_json::{Map, Value};
use time::OffsetDateTime;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use super::catalogue::{self, Severity};

/// One event, owned, as every consumer sees it.
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub time: OffsetDateTime,
    /// The `tracing` target (`pop3connex::security`, ...).
    pub target: &'static str,
    /// The catalogue name (`auth_failure`); `admin_alert` for an
    /// `alert = true` event that has no name yet.
    pub name: String,
    /// From the catalogue when the name is known, else from the level.
    pub severity: Severity,
    /// The human message of the log line.
    pub message: String,
    /// Every other field, by its name in the code (`peer`, `user`, ...).
    pub fields: Map<String, Value>,
    /// Marked `alert = true` by the code (or alerting by catalogue default).
    pub alert: bool,
}

impl EventRecord {
    /// A string field, if present.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.fields.get(key).and_then(Value::as_str)
    }

    /// An unsigned field, if present (numbers recorded as text parse too).
    pub fn u64(&self, key: &str) -> Option<u64> {
        match self.fields.get(key)? {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }

    /// The catalogue entry of this event, when it has one.
    pub fn def(&self) -> Option<&'static catalogue::EventDef> {
        catalogue::lookup(&self.name)
    }
}

/// Something that receives every event. `accept` runs on the thread that
/// emitted the event: it must not block (count, or push to a [`Queue`]).
pub trait Consumer: Send + Sync {
    fn accept(&self, event: &Arc<EventRecord>);
}

/// The global consumer list.
pub struct Hub {
    consumers: RwLock<Arc<[Arc<dyn Consumer>]>>,
}

impl Hub {
    pub fn global() -> &'static Hub {
        static HUB: OnceLock<Hub> = OnceLock::new();
        HUB.get_or_init(|| Hub { consumers: RwLock::new(Arc::from(Vec::new())) })
    }

    /// Adds a consumer; it sees events emitted from now on.
    pub fn register(&self, consumer: Arc<dyn Consumer>) {
        let mut list = self.consumers.write().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = list.iter().cloned().collect();
        v.push(consumer);
        *list = Arc::from(v);
    }

    /// Removes every consumer (a reload re-registers what the new
    /// configuration names; tests start clean).
    pub fn clear(&self) {
        *self.consumers.write().unwrap_or_else(|p| p.into_inner()) = Arc::from(Vec::new());
    }

    fn snapshot(&self) -> Arc<[Arc<dyn Consumer>]> {
        self.consumers.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Hands a record to every consumer (also used by code that has a
    /// record already, and by tests).
    pub fn publish(&self, record: EventRecord) {
        let consumers = self.snapshot();
        if consumers.is_empty() {
            return;
        }
        let record = Arc::new(record);
        for c in consumers.iter() {
            c.accept(&record);
        }
    }

    /// The `tracing` layer that feeds this hub; install it with
    /// [`Hub::filter`] as its per-layer filter, so that other crates'
    /// debug and trace call sites stay disabled.
    pub fn layer() -> HubLayer {
        HubLayer
    }

    /// POP3conneX's own targets, info and above.
    pub fn filter() -> tracing_subscriber::filter::Targets {
        tracing_subscriber::filter::Targets::new().with_target("pop3connex", tracing::Level::INFO)
    }
}

/// Tells a consumer's tasks to stop (`stop` set to true) and waits for
/// them until `grace` has passed; the ones still running are aborted.
pub async fn stop_tasks(
    stop: &tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    grace: std::time::Duration,
) {
    let _ = stop.send(true);
    let deadline = tokio::time::Instant::now() + grace;
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout_at(deadline, t).await.is_err() {
            abort.abort();
        }
    }
}

/// See [`Hub::layer`].
pub struct HubLayer;

impl<S: Subscriber> Layer<S> for HubLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if !meta.target().starts_with("pop3connex") {
            return;
        }
        let hub = Hub::global();
        if hub.snapshot().is_empty() {
            return;
        }
        let mut v = Collect::default();
        event.record(&mut v);
        if v.name.is_none() && !v.alert {
            return;
        }
        let name = v.name.unwrap_or_else(|| "admin_alert".to_owned());
        let def = catalogue::lookup(&name);
        let severity = def.map(|d| d.severity).unwrap_or_else(|| Severity::from_level(*meta.level()));
        let alert = v.alert || def.is_some_and(|d| d.alert);
        hub.publish(EventRecord {
            time: OffsetDateTime::now_utc(),
            target: meta.target(),
            name,
            severity,
            message: v.message,
            fields: v.fields,
            alert,
        });
    }
}

#[derive(Default)]
struct Collect {
    name: Option<String>,
    alert: bool,
    message: String,
    fields: Map<String, Value>,
}

impl Collect {
    fn put(&mut self, field: &Field, value: Value) {
        match (field.name(), value) {
            ("event", Value::String(s)) => self.name = Some(s),
            ("alert", Value::Bool(b)) => self.alert = b,
            ("message", Value::String(s)) => self.message = s,
            (name, value) => {
                self.fields.insert(name.to_owned(), value);
            }
        }
    }
}

impl Visit for Collect {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()))
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value))
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value))
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value))
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value))
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%x` fields arrive here formatted with Display.
        self.put(field, Value::String(format!("{value:?}")))
    }
}

/// A bounded queue in front of a slow consumer (a network sink, the event
/// store): `accept` never waits; when the queue is full the event is
/// dropped and counted, and the owner reports the count.
pub struct Queue {
    tx: tokio::sync::mpsc::Sender<Arc<EventRecord>>,
    dropped: Arc<AtomicU64>,
}

impl Queue {
    /// A queue of `capacity` events and its receiving end (for the task
    /// that does the slow work).
    pub fn new(capacity: usize) -> (Queue, tokio::sync::mpsc::Receiver<Arc<EventRecord>>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        (Queue { tx, dropped: Arc::new(AtomicU64::new(0)) }, rx)
    }

    /// Events dropped so far because the queue was full or closed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A handle on the drop counter (for metrics).
    pub fn drop_counter(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

impl Consumer for Queue {
    fn accept(&self, event: &Arc<EventRecord>) {
        if self.tx.try_send(event.clone()).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;

    use super::*;

    #[derive(Default)]
    struct Keep(Mutex<Vec<Arc<EventRecord>>>);
    impl Consumer for Keep {
        fn accept(&self, event: &Arc<EventRecord>) {
            self.0.lock().unwrap().push(event.clone());
        }
    }

    #[test]
    fn named_and_alert_events_reach_consumers_with_their_fields() {
        let keep = Arc::new(Keep::default());
        Hub::global().register(keep.clone());
        let sub = tracing_subscriber::registry().with(Hub::layer().with_filter(Hub::filter()));
        tracing::subscriber::with_default(sub, || {
            let peer: std::net::IpAddr = "192.0.2.7".parse().unwrap();
            tracing::warn!(target: "pop3connex::security", event = "auth_failure", %peer, user = "alice",
                mechanism = "PLAIN", reason = "bad_password", "authentication failed");
            tracing::warn!(target: "pop3connex_web::login", alert = true, admin = "root", "admin login");
            tracing::info!(target: "pop3connex::security", "no event name: not captured");
            tracing::warn!(target: "other_crate", event = "auth_failure", "not ours");
        });
        Hub::global().clear();
        let got = keep.0.lock().unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].name, "auth_failure");
        assert_eq!(got[0].str("peer"), Some("192.0.2.7"));
        assert_eq!(got[0].str("user"), Some("alice"));
        assert_eq!(got[0].message, "authentication failed");
        assert_eq!(got[0].severity, Severity::Warning);
        assert!(got[0].def().is_some());
        assert_eq!(got[1].name, "admin_alert");
        assert!(got[1].alert);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (q, mut rx) = Queue::new(2);
        let rec = Arc::new(EventRecord {
            time: OffsetDateTime::now_utc(),
            target: "pop3connex::security",
            name: "ban".into(),
            severity: Severity::Warning,
            message: String::new(),
            fields: Map::new(),
            alert: false,
        });
        for _ in 0..5 {
            q.accept(&rec);
        }
        assert_eq!(q.dropped(), 3);
        assert!(rx.recv().await.is_some());
    }
}
