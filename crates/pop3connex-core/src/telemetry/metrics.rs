//! Prometheus/OpenMetrics metrics: one registry per process, fed by the
//! event hub (the [`Metrics`] consumer) and, where no event exists (accepted
//! connections, TLS handshakes, LMTP deliveries, RETR volume), by direct
//! calls that are one atomic increment each.
//!
//! Names are `pop3connex_*` (process metrics use the standard `process_*`
//! names), in base units, counters end in `_total`. Labels are bounded:
//! never a user name or an address; every label value is reduced to a safe
//! character set and length, and a family that reaches [`MAX_SERIES`]
//! label sets counts new ones under `other`.
//!
//! The endpoint that serves the registry is [`super::metrics_http`].

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use super::hub::{Consumer, EventRecord};

/// Label sets one family may hold; beyond it new sets count as `other`.
pub const MAX_SERIES: usize = 200;
/// Longest label value kept (bytes).
const MAX_LABEL: usize = 48;

type Labels = Vec<(&'static str, String)>;
type Family2 = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge>;

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    connections: Counters,
    refusals: Counters,
    sessions: Gauges,
    tls_handshakes: Counters,
    tls_failures: Counters,
    logins: Counters,
    login_failures: Counters,
    plaintext_refused: Counter,
    lockouts: Counter,
    locked_out: Counter,
    bans: Counters,
    dnsbl: Counters,
    protocol_abuse: Counters,
    starttls_injection: Counter,
    integrity_failures: Counter,
    store_writable: Gauge,
    events: Counters,
    suppressed: Counters,
    lmtp_deliveries: Counters,
    lmtp_bytes: Counter,
    retr_messages: Counter,
    retr_bytes: Counter,
    connector_messages: Counters,
    connector_bytes: Counters,
    connector_failures: Counters,
    store_messages: Gauge,
    store_bytes: Gauge,
    store_mailboxes: Gauge,
    bans_active: Gauge,
    lockouts_active: Gauge,
    sink_drops: Arc<SinkDrops>,
    store_read: Histogram,
    store_write: Histogram,
}

/// Store latency buckets: 100 µs to 6.6 s, ×4 (a read from the page cache
/// lands in the first, an fsync on a slow disk in the middle, a stalled
/// disk at the top).
fn store_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 4.0, 9))
}

/// A reduced, bounded label value.
fn label(v: &str) -> String {
    let mut out: String = v
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '_') { c } else { '_' })
        .collect();
    if out.len() > MAX_LABEL {
        out.truncate(MAX_LABEL);
    }
    if out.is_empty() {
        out.push_str("none");
    }
    out
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, label(v))).collect()
}

/// A counter family with at most [`MAX_SERIES`] label sets (plus `other`).
struct Counters {
    family: Family2,
    series: AtomicUsize,
}

/// Registers a bounded counter family.
fn counters(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> Counters {
    let family = Family2::default();
    match unit {
        Some(u) => r.register_with_unit(name, help, u, family.clone()),
        None => r.register(name, help, family.clone()),
    }
    Counters { family, series: AtomicUsize::new(0) }
}

/// Adds `by` to the series of `pairs`, or to `other` once the family is full.
fn bump(f: &Counters, pairs: &[(&'static str, &str)], by: u64) {
    let mut l = labels(pairs);
    if let Some(c) = f.family.get(&l) {
        c.inc_by(by);
        return;
    }
    if f.series.fetch_add(1, Ordering::Relaxed) >= MAX_SERIES {
        f.series.fetch_sub(1, Ordering::Relaxed);
        l.iter_mut().for_each(|(_, v)| *v = "other".to_owned());
    }
    f.family.get_or_create(&l).inc_by(by);
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry (the server uses [`Metrics::global`]; tests make
    /// their own).
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let sink_drops = Arc::new(SinkDrops::default());
        let r = root.sub_registry_with_prefix("pop3connex");
        r.register_collector(Box::new(sink_drops.clone()));
        macro_rules! reg {
            ($name:expr, $help:expr, $m:expr) => {{
                let m = $m;
                r.register($name, $help, m.clone());
                m
            }};
            ($name:expr, $help:expr, $unit:expr, $m:expr) => {{
                let m = $m;
                r.register_with_unit($name, $help, $unit, m.clone());
                m
            }};
        }
        let store_latency = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(store_histogram);
        let store_read = store_latency.get_or_create(&vec![("op", "read".to_owned())]).clone();
        let store_write = store_latency.get_or_create(&vec![("op", "write".to_owned())]).clone();
        r.register_with_unit(
            "store_operation_duration",
            "Store operations as the caller waits for them (queue, SQLite, fsync), by op (read, write)",
            Unit::Seconds,
            store_latency,
        );
        let build = Family::<Labels, Gauge>::default();
        build.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())]).set(1);
        r.register("build_info", "Version of the running server (value 1)", build);
        let m = Metrics {
            connections: counters(
                r,
                "connections",
                "Connections by listener (pop3, pop3s, lmtp) and outcome (accepted, refused)",
                None,
            ),
            refusals: counters(
                r,
                "connection_refusals",
                "Connections refused before any command, by listener and reason",
                None,
            ),
            sessions: reg!("sessions", "Sessions open now, by listener", Gauges::default()),
            tls_handshakes: counters(
                r,
                "tls_handshakes",
                "Completed TLS handshakes by listener, protocol version and cipher suite",
                None,
            ),
            tls_failures: counters(
                r,
                "tls_handshake_failures",
                "Failed TLS handshakes by listener and reason (error, timeout)",
                None,
            ),
            logins: counters(r, "logins", "Login attempts by mechanism and outcome (success, failure)", None),
            login_failures: counters(r, "login_failures", "Failed logins by mechanism and reason", None),
            plaintext_refused: reg!(
                "plaintext_auth_refused",
                "Credentials offered before TLS and refused",
                Counter::default()
            ),
            lockouts: reg!("account_lockouts", "Accounts locked after repeated failures", Counter::default()),
            locked_out: reg!("locked_out_logins", "Logins refused because the account is locked", Counter::default()),
            bans: counters(r, "bans", "Addresses or networks banned, by reason", None),
            dnsbl: counters(r, "dnsbl_refusals", "Connections refused by a DNS blocklist, by zone", None),
            protocol_abuse: counters(
                r,
                "protocol_abuse",
                "Peers disconnected for protocol abuse, by protocol and reason",
                None,
            ),
            starttls_injection: reg!(
                "starttls_injections",
                "Plaintext pipelined after STLS and discarded",
                Counter::default()
            ),
            integrity_failures: reg!(
                "integrity_failures",
                "Stored records that failed authentication (tampering or corruption)",
                Counter::default()
            ),
            store_writable: reg!(
                "store_writable",
                "1 while the store accepts writes, 0 while it is read-only (disk full?)",
                Gauge::default()
            ),
            events: counters(r, "events", "Catalogued events seen by the telemetry hub, by name and severity", None),
            suppressed: counters(
                r,
                "events_suppressed",
                "Rate-limited events counted but not logged, by event name",
                None,
            ),
            lmtp_deliveries: counters(
                r,
                "lmtp_deliveries",
                "LMTP recipients by outcome (delivered, temp_failure, too_large, refused)",
                None,
            ),
            lmtp_bytes: reg!(
                "lmtp_delivered",
                "Message octets accepted over LMTP (once per message)",
                Unit::Bytes,
                Counter::default()
            ),
            retr_messages: reg!("retr_messages", "Messages sent whole by RETR", Counter::default()),
            retr_bytes: reg!("retr", "Message octets sent by RETR and TOP", Unit::Bytes, Counter::default()),
            connector_messages: counters(
                r,
                "connector_messages",
                "Connector messages by account and outcome (fetched, duplicate, quarantined, loop, oversize, \
                 deferred, refused, deleted)",
                None,
            ),
            connector_bytes: counters(
                r,
                "connector_fetched",
                "Octets fetched by the connector, by account",
                Some(Unit::Bytes),
            ),
            connector_failures: counters(
                r,
                "connector_failures",
                "Upstream failures of the connector by account and kind",
                None,
            ),
            store_messages: reg!("store_messages", "Messages in the store (refreshed every minute)", {
                Gauge::default()
            }),
            store_bytes: reg!(
                "store_messages_size",
                "Octets of the messages in the store (refreshed every minute)",
                Unit::Bytes,
                Gauge::default()
            ),
            store_mailboxes: reg!("store_mailboxes", "Mailboxes in the store (refreshed every minute)", {
                Gauge::default()
            }),
            bans_active: reg!("bans_active", "Bans in force (refreshed every minute)", Gauge::default()),
            lockouts_active: reg!("lockouts_active", "Account lockouts in force (refreshed every minute)", {
                Gauge::default()
            }),
            sink_drops,
            store_read,
            store_write,
            registry: Registry::default(),
        };
        m.store_writable.set(1);
        // Series with a known, fixed label set start at zero, so that
        // `increase()` in alert rules sees their first event.
        for listener in ["pop3", "pop3s", "lmtp"] {
            for outcome in ["accepted", "refused"] {
                bump(&m.connections, &[("listener", listener), ("outcome", outcome)], 0);
            }
        }
        for outcome in ["delivered", "temp_failure", "too_large", "refused"] {
            bump(&m.lmtp_deliveries, &[("outcome", outcome)], 0);
        }
        Metrics { registry: root, ..m }
    }

    /// The process-wide registry.
    pub fn global() -> &'static Arc<Metrics> {
        static M: OnceLock<Arc<Metrics>> = OnceLock::new();
        M.get_or_init(|| Arc::new(Metrics::new()))
    }

    /// OpenMetrics text (ends with `# EOF`).
    pub fn encode_openmetrics(&self) -> String {
        let mut s = String::with_capacity(16 * 1024);
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    /// Prometheus text format 0.0.4 (for scrapers that do not ask for
    /// OpenMetrics).
    pub fn encode_prometheus(&self) -> String {
        let mut s = String::with_capacity(16 * 1024);
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut s, &self.registry);
        s
    }

    /// Exposes the drop counter of an event sink (`sink` is the operator's
    /// sink name or kind) as `pop3connex_event_sink_dropped_total{sink}`.
    /// Registering a name again replaces its counter (reload).
    pub fn register_sink_drops(&self, sink: &str, counter: Arc<AtomicU64>) {
        let mut list = self.sink_drops.0.write().unwrap_or_else(|p| p.into_inner());
        let name = label(sink);
        list.retain(|(n, _)| *n != name);
        if list.len() < MAX_SERIES {
            list.push((name, counter));
        }
    }

    /// A store read took `secs` (seconds, as the caller waited).
    pub fn store_read(&self, secs: f64) {
        self.store_read.observe(secs);
    }

    /// A store write took `secs` (queued, committed and synced).
    pub fn store_write(&self, secs: f64) {
        self.store_write.observe(secs);
    }

    /// A connection was accepted on `listener`.
    pub fn connection_accepted(&self, listener: &str) {
        bump(&self.connections, &[("listener", listener), ("outcome", "accepted")], 1);
    }

    /// A connection was refused on `listener` before any command.
    pub fn connection_refused(&self, listener: &str, reason: &str) {
        bump(&self.connections, &[("listener", listener), ("outcome", "refused")], 1);
        bump(&self.refusals, &[("listener", listener), ("reason", reason)], 1);
    }

    /// Counts an open session until the guard is dropped.
    pub fn session(&self, listener: &str) -> SessionGuard {
        let l = labels(&[("listener", listener)]);
        let g = self.sessions.get_or_create_owned(&l);
        g.inc();
        SessionGuard(g)
    }

    /// A TLS handshake completed.
    pub fn tls_handshake(&self, listener: &str, version: &str, cipher: &str) {
        bump(&self.tls_handshakes, &[("listener", listener), ("version", version), ("cipher", cipher)], 1);
    }

    /// A TLS handshake failed (`reason`: error or timeout).
    pub fn tls_failure(&self, listener: &str, reason: &str) {
        bump(&self.tls_failures, &[("listener", listener), ("reason", reason)], 1);
    }

    /// An LMTP transaction ended: `recipients` recipients got `outcome`;
    /// `bytes` counted when delivered.
    pub fn lmtp_delivery(&self, outcome: &str, recipients: usize, bytes: u64) {
        bump(&self.lmtp_deliveries, &[("outcome", outcome)], recipients as u64);
        if outcome == "delivered" {
            self.lmtp_bytes.inc_by(bytes);
        }
    }

    /// A whole message was sent by RETR.
    pub fn retr(&self, bytes: u64) {
        self.retr_messages.inc();
        self.retr_bytes.inc_by(bytes);
    }

    /// A TOP sent `bytes` of a message: counted in the RETR octets (a TOP
    /// with a large line count downloads the whole message), not in the
    /// RETR messages.
    pub fn top(&self, bytes: u64) {
        self.retr_bytes.inc_by(bytes);
    }

    /// Bans and lockouts in force (from a periodic count).
    pub fn set_security_totals(&self, bans: u64, lockouts: u64) {
        self.bans_active.set(i64::try_from(bans).unwrap_or(i64::MAX));
        self.lockouts_active.set(i64::try_from(lockouts).unwrap_or(i64::MAX));
    }

    /// The store totals (from a periodic count).
    pub fn set_store_totals(&self, mailboxes: u64, messages: u64, bytes: u64) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.store_mailboxes.set(g(mailboxes));
        self.store_messages.set(g(messages));
        self.store_bytes.set(g(bytes));
    }
}

/// Decrements the session gauge on drop.
pub struct SessionGuard(Gauge);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Drop counters of the event sinks, read at scrape time.
#[derive(Default)]
struct SinkDrops(RwLock<Vec<(String, Arc<AtomicU64>)>>);

impl std::fmt::Debug for SinkDrops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SinkDrops")
    }
}

impl Collector for SinkDrops {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let list = self.0.read().unwrap_or_else(|p| p.into_inner());
        let counter = ConstCounter::new(0u64);
        let mut m = encoder.encode_descriptor(
            "event_sink_dropped",
            "Events an event sink dropped (queue full or sink down), by sink",
            None,
            counter.metric_type(),
        )?;
        for (name, n) in list.iter() {
            let l = [("sink", name.as_str())];
            ConstCounter::new(n.load(Ordering::Relaxed)).encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }
}

impl Consumer for Metrics {
    fn accept(&self, e: &Arc<EventRecord>) {
        let s = |k: &str| e.str(k).unwrap_or("");
        let name = e.name.as_str();
        // Names come from the code; an unknown one is counted under `other`.
        let known = e.def().map_or("other", |d| d.name);
        bump(&self.events, &[("event", known), ("severity", e.severity.as_str())], 1);
        match name {
            "auth_success" => bump(&self.logins, &[("mechanism", s("mechanism")), ("outcome", "success")], 1),
            "auth_failure" => {
                bump(&self.logins, &[("mechanism", s("mechanism")), ("outcome", "failure")], 1);
                bump(&self.login_failures, &[("mechanism", s("mechanism")), ("reason", s("reason"))], 1);
            }
            "locked_out" => {
                self.locked_out.inc();
            }
            "plaintext_auth_refused" => {
                self.plaintext_refused.inc();
            }
            "account_locked" => {
                self.lockouts.inc();
            }
            "ban" => bump(&self.bans, &[("reason", s("reason"))], 1),
            "dnsbl_listed" => bump(&self.dnsbl, &[("zone", s("zone"))], 1),
            "protocol_abuse" => bump(&self.protocol_abuse, &[("protocol", s("protocol")), ("reason", s("reason"))], 1),
            "starttls_injection" => {
                self.starttls_injection.inc();
            }
            "integrity_failure" => {
                self.integrity_failures.inc();
            }
            "store_read_only" => {
                self.store_writable.set(0);
            }
            "store_writable_again" => {
                self.store_writable.set(1);
            }
            "suppressed" => {
                let event = e.str("suppressed_event").and_then(super::catalogue::lookup).map_or("other", |d| d.name);
                bump(&self.suppressed, &[("event", event)], e.u64("count").unwrap_or(0));
            }
            _ => {}
        }
        if let Some(kind) = name.strip_prefix("connector_") {
            let account = s("account");
            match kind {
                "upstream_error" => bump(&self.connector_failures, &[("account", account), ("kind", s("kind"))], 1),
                "deleted" => bump(
                    &self.connector_messages,
                    &[("account", account), ("outcome", "deleted")],
                    e.u64("count").unwrap_or(0),
                ),
                "fetched" => {
                    bump(&self.connector_messages, &[("account", account), ("outcome", "fetched")], 1);
                    bump(&self.connector_bytes, &[("account", account)], e.u64("size").unwrap_or(0));
                }
                "duplicate" | "quarantined" | "loop" | "oversize" | "deferred" | "refused" => {
                    bump(&self.connector_messages, &[("account", account), ("outcome", kind)], 1)
                }
                _ => {}
            }
        }
    }
}

/// `process_*` metrics from `/proc/self` (Linux), read at scrape time.
#[derive(Debug)]
struct ProcessCollector;

struct ProcStat {
    cpu_seconds: f64,
    start_time: f64,
    virtual_bytes: u64,
    resident_bytes: u64,
    threads: u64,
}

fn proc_stat() -> Option<ProcStat> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is f[n - 3].
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let ticks = rustix::param::clock_ticks_per_second().max(1) as f64;
    let page = rustix::param::page_size().max(1) as u64;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok()))?;
    Some(ProcStat {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        start_time: boot as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page),
        threads: field(20)?,
    })
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

fn max_fds() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(p) = proc_stat() {
            let c = ConstCounter::new(p.cpu_seconds);
            c.encode(encoder.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?)?;
            let gauges = [
                ("process_start_time", "Start time of the process since the Unix epoch", Some(Unit::Seconds), {
                    p.start_time
                }),
                ("process_virtual_memory", "Virtual memory size", Some(Unit::Bytes), p.virtual_bytes as f64),
                ("process_resident_memory", "Resident memory size", Some(Unit::Bytes), p.resident_bytes as f64),
                ("process_threads", "Threads of the process", None, p.threads as f64),
            ];
            for (name, help, unit, v) in gauges {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?)?;
            }
        }
        for (name, help, v) in [
            ("process_open_fds", "Open file descriptors", open_fds()),
            ("process_max_fds", "File descriptor limit", max_fds()),
        ] {
            if let Some(v) = v {
                let g = ConstGauge::new(v as i64);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value};
    use time::OffsetDateTime;

    use super::*;
    use crate::telemetry::catalogue::lookup;

    fn event(name: &str, fields: &[(&str, Value)]) -> Arc<EventRecord> {
        let mut map = Map::new();
        for (k, v) in fields {
            map.insert((*k).to_owned(), v.clone());
        }
        Arc::new(EventRecord {
            time: OffsetDateTime::now_utc(),
            target: "pop3connex::security",
            name: name.to_owned(),
            severity: lookup(name).map_or(super::super::Severity::Warning, |d| d.severity),
            message: String::new(),
            fields: map,
            alert: false,
        })
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix)).map(|l| l.rsplit(' ').next().unwrap())
    }

    #[test]
    fn events_move_the_counters_with_bounded_labels_and_no_user_names() {
        let m = Metrics::new();
        let j = |s: &str| Value::String(s.into());
        m.accept(&event("auth_success", &[("user", j("alice")), ("mechanism", j("PLAIN")), ("peer", j("192.0.2.1"))]));
        for _ in 0..3 {
            m.accept(&event(
                "auth_failure",
                &[("user", j("mallory")), ("mechanism", j("USER")), ("reason", j("bad password"))],
            ));
        }
        m.accept(&event("ban", &[("reason", j("auth failures")), ("seconds", Value::from(600))]));
        m.accept(&event("account_locked", &[("user", j("bob")), ("seconds", Value::from(60))]));
        m.accept(&event("suppressed", &[("suppressed_event", j("connection_refused")), ("count", Value::from(7))]));
        m.accept(&event("store_read_only", &[("reason", j("disk full"))]));
        m.accept(&event("connector_fetched", &[("account", j("isp")), ("size", Value::from(1234))]));
        m.accept(&event("connector_upstream_error", &[("account", j("isp")), ("kind", j("auth"))]));
        m.accept(&event("connector_deleted", &[("account", j("isp")), ("count", Value::from(4))]));
        let t = m.encode_prometheus();
        let get = |p: &str| line(&t, p).unwrap_or_else(|| panic!("{p} missing in\n{t}")).to_owned();
        assert_eq!(get("pop3connex_logins_total{mechanism=\"PLAIN\",outcome=\"success\"}"), "1");
        assert_eq!(get("pop3connex_logins_total{mechanism=\"USER\",outcome=\"failure\"}"), "3");
        assert_eq!(get("pop3connex_login_failures_total{mechanism=\"USER\",reason=\"bad_password\"}"), "3");
        assert_eq!(get("pop3connex_bans_total{reason=\"auth_failures\"}"), "1");
        assert_eq!(get("pop3connex_account_lockouts_total "), "1");
        assert_eq!(get("pop3connex_events_suppressed_total{event=\"connection_refused\"}"), "7");
        assert_eq!(get("pop3connex_store_writable "), "0");
        assert_eq!(get("pop3connex_connector_messages_total{account=\"isp\",outcome=\"fetched\"}"), "1");
        assert_eq!(get("pop3connex_connector_messages_total{account=\"isp\",outcome=\"deleted\"}"), "4");
        assert_eq!(get("pop3connex_connector_fetched_bytes_total{account=\"isp\"}"), "1234");
        assert_eq!(get("pop3connex_connector_failures_total{account=\"isp\",kind=\"auth\"}"), "1");
        assert_eq!(get("pop3connex_events_total{event=\"auth_failure\",severity=\"warning\"}"), "3");
        assert!(!t.contains("alice") && !t.contains("mallory") && !t.contains("192.0.2.1"), "{t}");
        m.accept(&event("store_writable_again", &[]));
        assert_eq!(line(&m.encode_prometheus(), "pop3connex_store_writable ").unwrap(), "1");
        let om = m.encode_openmetrics();
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE pop3connex_logins counter"), "{om}");
    }

    /// Every metric the shipped alert rules and Grafana dashboard use is
    /// one this registry exposes (once each family has a series).
    #[test]
    fn contrib_rules_and_dashboard_use_only_exposed_metrics() {
        let m = Metrics::new();
        let j = |s: &str| Value::String(s.into());
        for name in [
            "auth_success",
            "auth_failure",
            "locked_out",
            "plaintext_auth_refused",
            "account_locked",
            "ban",
            "dnsbl_listed",
            "protocol_abuse",
            "starttls_injection",
            "integrity_failure",
            "suppressed",
            "connector_fetched",
            "connector_upstream_error",
        ] {
            m.accept(&event(name, &[("suppressed_event", j("ban")), ("count", Value::from(1))]));
        }
        m.connection_refused("pop3", "banned");
        let _s = m.session("pop3");
        m.tls_handshake("pop3s", "TLSv1_3", "x");
        m.tls_failure("pop3s", "error");
        m.lmtp_delivery("delivered", 1, 1);
        m.retr(1);
        m.register_sink_drops("syslog", Arc::new(AtomicU64::new(0)));
        let text = m.encode_prometheus();
        let exposed: std::collections::BTreeSet<&str> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut used = std::collections::BTreeSet::new();
        for f in ["contrib/prometheus/alerts.yml", "contrib/grafana/pop3connex.json"] {
            let t = std::fs::read_to_string(root.join(f)).unwrap();
            for prefix in ["pop3connex_", "process_"] {
                for (i, _) in t.match_indices(prefix) {
                    if i > 0 && (t.as_bytes()[i - 1].is_ascii_alphanumeric() || t.as_bytes()[i - 1] == b'_') {
                        continue;
                    }
                    let from = i + prefix.len();
                    let end =
                        t[from..].find(|c: char| !(c.is_ascii_lowercase() || c == '_')).map_or(t.len(), |e| from + e);
                    used.insert(t[i..end].to_owned());
                }
            }
        }
        assert!(used.len() > 20, "{used:?}");
        // A histogram's series are its name plus _bucket, _sum or _count.
        let is_exposed = |u: &str| {
            exposed.contains(u)
                || ["_bucket", "_sum", "_count"].iter().any(|s| u.strip_suffix(s).is_some_and(|b| exposed.contains(b)))
        };
        let missing: Vec<_> = used.iter().filter(|u| !is_exposed(u)).collect();
        assert!(missing.is_empty(), "used in contrib/ but not exposed: {missing:?}");
    }

    #[test]
    fn hostile_label_values_are_reduced_and_families_capped() {
        let m = Metrics::new();
        let j = |s: String| Value::String(s);
        for i in 0..(MAX_SERIES + 50) {
            m.accept(&event(
                "auth_failure",
                &[("mechanism", j(format!("X{i}\"}}\n# {}", "a".repeat(500)))), ("reason", j("r".into()))],
            ));
        }
        let t = m.encode_prometheus();
        let series = t.lines().filter(|l| l.starts_with("pop3connex_login_failures_total{")).count();
        assert_eq!(series, MAX_SERIES + 1, "capped plus `other`");
        let other = line(&t, "pop3connex_login_failures_total{mechanism=\"other\",reason=\"other\"}").unwrap();
        assert_eq!(other, "50");
        assert!(t.lines().all(|l| l.len() < 400), "values truncated");
        assert!(!t.contains("\"}\n#"), "no injected lines");
    }

    #[test]
    fn direct_counters_sessions_sink_drops_and_process_metrics() {
        let m = Metrics::new();
        m.connection_accepted("pop3s");
        m.connection_refused("pop3", "banned");
        let s = m.session("lmtp");
        m.tls_handshake("pop3s", "TLSv1_3", "TLS13_AES_256_GCM_SHA384");
        m.tls_failure("pop3s", "timeout");
        m.lmtp_delivery("delivered", 2, 100);
        m.lmtp_delivery("temp_failure", 3, 999);
        m.retr(42);
        m.set_store_totals(2, 5, 5000);
        m.set_security_totals(3, 1);
        m.store_read(0.00005);
        m.store_write(0.003);
        m.store_write(0.5);
        let drops = Arc::new(AtomicU64::new(0));
        m.register_sink_drops("syslog tls", drops.clone());
        drops.fetch_add(9, Ordering::Relaxed);
        let t = m.encode_prometheus();
        let get = |p: &str| line(&t, p).unwrap_or_else(|| panic!("{p} missing in\n{t}")).to_owned();
        assert_eq!(get("pop3connex_connections_total{listener=\"pop3s\",outcome=\"accepted\"}"), "1");
        assert_eq!(get("pop3connex_connections_total{listener=\"pop3\",outcome=\"refused\"}"), "1");
        assert_eq!(get("pop3connex_connection_refusals_total{listener=\"pop3\",reason=\"banned\"}"), "1");
        assert_eq!(get("pop3connex_sessions{listener=\"lmtp\"}"), "1");
        assert_eq!(
            get("pop3connex_tls_handshakes_total{listener=\"pop3s\",version=\"TLSv1_3\",cipher=\"TLS13_AES_256_GCM_SHA384\"}"),
            "1"
        );
        assert_eq!(get("pop3connex_tls_handshake_failures_total{listener=\"pop3s\",reason=\"timeout\"}"), "1");
        assert_eq!(get("pop3connex_lmtp_deliveries_total{outcome=\"delivered\"}"), "2");
        assert_eq!(get("pop3connex_lmtp_deliveries_total{outcome=\"temp_failure\"}"), "3");
        assert_eq!(get("pop3connex_lmtp_delivered_bytes_total "), "100");
        assert_eq!(get("pop3connex_retr_messages_total "), "1");
        assert_eq!(get("pop3connex_retr_bytes_total "), "42");
        assert_eq!(get("pop3connex_store_messages_size_bytes "), "5000");
        assert_eq!(get("pop3connex_bans_active "), "3");
        assert_eq!(get("pop3connex_lockouts_active "), "1");
        assert_eq!(get("pop3connex_event_sink_dropped_total{sink=\"syslog_tls\"}"), "9");
        assert_eq!(get("pop3connex_store_operation_duration_seconds_count{op=\"write\"}"), "2");
        assert_eq!(get("pop3connex_store_operation_duration_seconds_bucket{op=\"read\",le=\"0.0001\"}"), "1");
        assert_eq!(get("pop3connex_store_operation_duration_seconds_bucket{op=\"write\",le=\"0.0064\"}"), "1");
        assert_eq!(get("pop3connex_store_operation_duration_seconds_bucket{op=\"write\",le=\"1.6384\"}"), "2");
        assert_eq!(get("pop3connex_build_info{version=\""), "1");
        assert!(get("process_resident_memory_bytes ").parse::<f64>().unwrap() > 0.0);
        assert!(get("process_open_fds ").parse::<u64>().unwrap() > 0);
        assert!(get("process_start_time_seconds ").parse::<f64>().unwrap() > 1.6e9);
        drop(s);
        assert_eq!(line(&m.encode_prometheus(), "pop3connex_sessions{listener=\"lmtp\"}").unwrap(), "0");
    }
}
