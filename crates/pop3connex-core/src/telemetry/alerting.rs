//! Alert routing at run time: `[[alerts.webhook]]` (signed JSON over
//! HTTPS) and `[[alerts.email]]` (a plain-text mail through a
//! `[[connector.downstreams]]` relay).
//!
//! Each channel is a hub [`Consumer`] that keeps the alert events it is
//! configured for and pushes them into its own bounded [`Queue`] (a full
//! queue drops and counts, never blocks the code that raised the alert);
//! one task per channel delivers them in order. Rate limits, retries and
//! the failure report below are the same for both kinds.
//!
//! **Webhook body**: the event's Elastic Common Schema document (as the JSON sink
//! writes it) plus `alert`: `{"delivery": <id>, "channel": <name>,
//! "suppressed": <n>, "suppressed_rule": <m>}` (see the rate limit).
//!
//! **Signature**: `X-POP3conneX-Timestamp: <unix seconds>` and
//! `X-POP3conneX-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`.
//! A receiver recomputes the HMAC over the raw body, compares in constant
//! time and refuses timestamps older than a few minutes (replay).
//! `X-POP3conneX-Delivery` is the same on every retry of one alert, so a
//! receiver can drop the duplicate of a delivery whose answer was lost.
//!
//! **E-mail**: `Subject: [POP3conneX] <severity> <event> on <host>`,
//! `Auto-Submitted: auto-generated` (RFC 3834, so vacation responders stay
//! quiet), a text body with the message and every field (controls
//! replaced, long values cut), through the relay's TLS policy and AUTH.
//! A 4xx or a connection failure is retried; a 5xx is final.
//!
//! **Rate limit**: per rule (event name) and key (`user`, else `key`, else
//! the peer's address), at most `max_per_key` alerts in `window_minutes`,
//! and per rule at most `max_per_rule` across its keys (an attacker failing
//! logins on thousands of accounts must not send thousands of pages, and
//! must not use up the budget of other rules either: a flood of
//! `auth_failure_spike` leaves `config_reloaded` or `sink_dropping`
//! untouched). `alert.suppressed` counts what the key's limit held back
//! since its last alert, `alert.suppressed_rule` what the rule's limit
//! held back. Alerts of the admin plane and the configuration (ids 500 to
//! 599, except `admin_login_burst`) are caused by authenticated
//! administrators and are never rate-limited.
//!
//! **Retries** (webhooks): a connection failure, a timeout, 408, 429 or a
//! 5xx answer is retried with back-off (2 s doubling, at most 2 minutes) up to
//! `max_attempts` deliveries; another 4xx is final. An alert given up, or
//! dropped from a full queue, is reported as `alert_undeliverable` (an
//! alert itself: it reaches the log, the store, the syslog sinks, the
//! alert command and the other channels, never the failing one) at most
//! every five minutes per channel, with how many alerts were lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use super::ecs;
use super::hub::{Consumer, EventRecord, Hub, Queue};
use crate::config::alerts::{ChannelLimits, EmailConfig};
use crate::config::connector::DownstreamConfig;
use crate::config::Config;
use crate::connector::{dns, mtasts, smtp};
use crate::https::{HttpsClient, HttpsOptions};
use crate::limits::LruMap;

const TARGET: &str = "pop3connex::telemetry";
/// The event this module raises about itself.
pub const UNDELIVERABLE: &str = "alert_undeliverable";
const BACKOFF_FIRST: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(120);
/// Least time between two `alert_undeliverable` reports of one webhook.
const REPORT_EVERY: Duration = Duration::from_secs(300);
/// Rule/key pairs whose rate is tracked (least recently used dropped).
const TRACKED_KEYS: usize = 10_000;
/// Shortest signing key accepted.
pub const MIN_SECRET_BYTES: usize = 16;
/// Most of a receiver's answer read.
const ANSWER_LIMIT: u64 = 16 * 1024;
/// Longest field value written into an alert mail.
const MAIL_VALUE_MAX: usize = 500;

/// The running alert channels; [`Channels::shutdown`] stops them.
pub struct Channels {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// The filter in front of one channel's queue.
struct Route {
    name: String,
    events: Vec<String>,
    queue: Queue,
}

impl Consumer for Route {
    fn accept(&self, event: &Arc<EventRecord>) {
        if accepts(&self.name, &self.events, event) {
            self.queue.accept(event);
        }
    }
}

/// Whether the channel `name` (configured for `events`, empty: all) sends `e`.
fn accepts(name: &str, events: &[String], e: &EventRecord) -> bool {
    if !e.alert {
        return false;
    }
    // Its own failure report would fail again: the others carry it.
    if e.name == UNDELIVERABLE && e.str("channel") == Some(name) {
        return false;
    }
    events.is_empty() || events.contains(&e.name)
}

impl Channels {
    /// Loads every channel's key and CA file, then starts them and
    /// registers them with the hub. Must run inside the tokio runtime.
    /// Fails, before anything is registered, on a key, CA file or relay
    /// that cannot be used.
    pub fn start(cfg: &Config) -> Result<Channels, String> {
        let mut prepared: Vec<(ChannelLimits, Sender)> = Vec::new();
        for w in &cfg.alerts.webhook {
            let err = |m: String| format!("[[alerts.webhook]] {}: {m}", w.name);
            let secret = w.secret.load().map_err(|e| err(format!("secret: {e}")))?;
            if secret.len() < MIN_SECRET_BYTES {
                return Err(err(format!("secret: {} holds fewer than {MIN_SECRET_BYTES} bytes", w.secret)));
            }
            let ca = match &w.ca_file {
                Some(p) => Some(crate::https::load_ca_file(p).map_err(|e| {
                    let why = match e {
                        crate::https::CaFileError::Unreadable(why) => why,
                        crate::https::CaFileError::Empty => "no PEM certificate in the file".into(),
                    };
                    err(format!("ca_file {}: {why}", p.display()))
                })?),
                None => None,
            };
            let client = HttpsClient::new(&HttpsOptions {
                connect_timeout: Duration::from_secs(10),
                total_timeout: Duration::from_secs(20),
                ca,
                default_roots: crate::https::DefaultRoots::System,
                status_as_error: false,
            });
            prepared.push((w.limits(), Sender::Webhook { url: w.url.clone(), secret, client }));
        }
        if !cfg.alerts.email.is_empty() {
            let resolver =
                Arc::new(dns::Resolver::new(&cfg.connector.dns).map_err(|e| format!("[connector.dns]: {e}"))?);
            let sts = Arc::new(mtasts::PolicyCache::new(&cfg.connector.dns));
            for e in &cfg.alerts.email {
                let relay = cfg.connector.downstreams.iter().find(|d| d.name == e.relay).cloned();
                let relay =
                    relay.ok_or_else(|| format!("[[alerts.email]] {}: relay `{}` is not defined", e.name, e.relay))?;
                let mail = Mail { cfg: e.clone(), relay, resolver: resolver.clone(), sts: sts.clone() };
                prepared.push((e.limits(), Sender::Email(Box::new(mail))));
            }
        }
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        for (limits, sender) in prepared {
            let (queue, rx) = Queue::new(limits.queue);
            let out = Delivery {
                hostname: cfg.server.hostname.clone(),
                limiter: Limiter::new(limits.max_per_key, limits.max_per_rule, u64::from(limits.window_minutes) * 60),
                cfg: limits.clone(),
                sender,
                dropped: queue.drop_counter(),
                dropped_seen: 0,
                lost: 0,
                last_error: String::new(),
                last_report: None,
            };
            tasks.push(tokio::spawn(out.run(rx, stopped.clone())));
            Hub::global().register(Arc::new(Route { name: limits.name, events: limits.events, queue }));
        }
        Ok(Channels { stop, tasks })
    }

    /// Stops delivering: what is in flight gets up to `grace`.
    pub async fn shutdown(self, grace: Duration) {
        super::hub::stop_tasks(&self.stop, self.tasks, grace).await;
    }
}

/// Per rule and key at most `max` alerts per window, and per rule at most
/// `per_rule` across its keys; the rest counted.
struct Limiter {
    max: u32,
    per_rule: u32,
    window_secs: u64,
    /// (rule, key) → (window start, sent in it, suppressed since last sent).
    seen: LruMap<(String, String), (u64, u32, u64)>,
    /// rule → the same, across the rule's keys (rule names come from the
    /// code: a bounded set).
    rules: std::collections::HashMap<String, (u64, u32, u64)>,
}

/// What an admitted alert reports about the ones held back before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    /// Of the same rule and key.
    key: u64,
    /// Of the same rule, by its limit across keys.
    rule: u64,
}

/// Alerts no outsider can cause: the admin plane's and the configuration's
/// (catalogue 500 to 599), except failed admin login bursts.
fn unlimited(e: &EventRecord) -> bool {
    e.def().is_some_and(|d| (500..600).contains(&d.id) && d.name != "admin_login_burst")
}

impl Limiter {
    fn new(max: u32, per_rule: u32, window_secs: u64) -> Limiter {
        Limiter { max, per_rule, window_secs, seen: LruMap::new(TRACKED_KEYS), rules: Default::default() }
    }

    /// `Some` (with what was held back before it) when `e` may be sent at `now`.
    fn admit(&mut self, e: &EventRecord, now: u64) -> Option<Held> {
        if unlimited(e) {
            return Some(Held { key: 0, rule: 0 });
        }
        let window = self.window_secs;
        let roll = |w: &mut (u64, u32, u64)| {
            if now >= w.0 + window {
                w.0 = now;
                w.1 = 0;
            }
        };
        let key = (e.name.clone(), rate_key(e));
        if self.seen.get_mut(&key).is_none() {
            self.seen.insert(key.clone(), (now, 0, 0));
        }
        let entry = self.seen.get_mut(&key).expect("just inserted");
        roll(entry);
        if entry.1 >= self.max {
            entry.2 += 1;
            return None;
        }
        let rule = self.rules.entry(e.name.clone()).or_insert((now, 0, 0));
        roll(rule);
        if rule.1 >= self.per_rule {
            rule.2 += 1;
            return None;
        }
        entry.1 += 1;
        rule.1 += 1;
        Some(Held { key: std::mem::take(&mut entry.2), rule: std::mem::take(&mut rule.2) })
    }
}

/// What one alert is about: the account, else the rule's key (a network),
/// else the client address without its port.
fn rate_key(e: &EventRecord) -> String {
    if let Some(u) = e.str("user").filter(|u| !u.is_empty() && *u != "-") {
        return format!("user:{u}");
    }
    if let Some(k) = e.str("key").filter(|k| !k.is_empty()) {
        return format!("key:{k}");
    }
    match e.str("peer") {
        Some(p) => {
            let ip = p.parse::<std::net::SocketAddr>().map(|a| a.ip().to_string()).unwrap_or_else(|_| p.to_owned());
            format!("peer:{ip}")
        }
        None => String::new(),
    }
}

/// `v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut s = String::with_capacity(3 + 2 * tag.len());
    s.push_str("v1=");
    for b in tag {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn delivery_id() -> String {
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).expect("the system's random source");
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// How one attempt ended.
enum Outcome {
    Delivered,
    /// Worth another attempt (network, timeout, 408, 429, 5xx).
    Retry(String),
    /// The receiver refused it for good.
    Final(String),
}

/// How one channel sends.
enum Sender {
    Webhook { url: String, secret: Zeroizing<Vec<u8>>, client: HttpsClient },
    Email(Box<Mail>),
}

/// An e-mail channel: its settings, its relay and the look-ups it needs.
struct Mail {
    cfg: EmailConfig,
    relay: DownstreamConfig,
    resolver: Arc<dns::Resolver>,
    sts: Arc<mtasts::PolicyCache>,
}

/// One channel's delivery task.
struct Delivery {
    cfg: ChannelLimits,
    hostname: String,
    sender: Sender,
    limiter: Limiter,
    dropped: Arc<AtomicU64>,
    /// Queue drops already counted into `lost`.
    dropped_seen: u64,
    /// Alerts lost since the last report.
    lost: u64,
    /// The failure behind them, when the report was held back.
    last_error: String,
    last_report: Option<tokio::time::Instant>,
}

impl Delivery {
    async fn run(mut self, mut rx: mpsc::Receiver<Arc<EventRecord>>, mut stopped: watch::Receiver<bool>) {
        // Losses held back by the report interval are reported when it has
        // passed, even if no further alert fails.
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let e = tokio::select! {
                e = rx.recv() => match e { Some(e) => e, None => return },
                _ = stopped.changed() => return,
                _ = tick.tick() => {
                    self.count_drops();
                    if self.lost > 0 {
                        let error = match self.last_error.is_empty() {
                            true => "the channel's queue is full (deliveries are slower than alerts arrive)".to_owned(),
                            false => std::mem::take(&mut self.last_error),
                        };
                        self.report(&error);
                    }
                    continue;
                }
            };
            let now = e.time.unix_timestamp().max(0) as u64;
            let Some(held) = self.limiter.admit(&e, now) else { continue };
            let mut doc = ecs::to_ecs(&e, &self.hostname);
            doc["alert"] = json!({ "delivery": delivery_id(), "channel": self.cfg.name, "suppressed": held.key,
                                   "suppressed_rule": held.rule });
            if let Err(error) = self.deliver(&e, &doc, &mut stopped).await {
                self.lost += 1;
                self.report(&error);
            }
            if self.count_drops() {
                self.report("the channel's queue is full (deliveries are slower than alerts arrive)");
            }
        }
    }

    /// Adds queue drops not yet counted to `lost`; whether there were any.
    fn count_drops(&mut self) -> bool {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > self.dropped_seen {
            self.lost += dropped - self.dropped_seen;
            self.dropped_seen = dropped;
            return true;
        }
        false
    }

    /// Up to `max_attempts` deliveries of `doc`; the last error otherwise.
    async fn deliver(&self, e: &EventRecord, doc: &Value, stopped: &mut watch::Receiver<bool>) -> Result<(), String> {
        let delivery = doc["alert"]["delivery"].as_str().unwrap_or_default().to_owned();
        let body = match &self.sender {
            Sender::Webhook { .. } => serde_json::to_vec(doc).map_err(|e| e.to_string())?,
            Sender::Email(m) => mail_message(&m.cfg, e, doc, &self.hostname, &delivery),
        };
        let mut wait = BACKOFF_FIRST;
        let mut error = String::new();
        for attempt in 1..=self.cfg.max_attempts {
            let outcome = match &self.sender {
                Sender::Webhook { url, secret, client } => post(client, url, secret, &body, &delivery, attempt).await,
                Sender::Email(m) => send_mail(m, &self.hostname, &body).await,
            };
            match outcome {
                Outcome::Delivered => return Ok(()),
                Outcome::Final(e) => return Err(e),
                Outcome::Retry(e) => error = e,
            }
            if attempt == self.cfg.max_attempts {
                break;
            }
            tracing::debug!(target: TARGET, channel = %self.cfg.name, attempt, error = %error, "webhook delivery failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopped.changed() => return Err(format!("{error} (shutting down)")),
            }
            wait = (wait * 2).min(BACKOFF_MAX);
        }
        Err(format!("{error} (after {} attempts)", self.cfg.max_attempts))
    }

    /// `alert_undeliverable`, at most every [`REPORT_EVERY`].
    fn report(&mut self, error: &str) {
        let now = tokio::time::Instant::now();
        if self.last_report.is_some_and(|t| now.duration_since(t) < REPORT_EVERY) {
            tracing::debug!(target: TARGET, channel = %self.cfg.name, error, "alert not delivered");
            self.last_error = error.to_owned();
            return;
        }
        self.last_report = Some(now);
        let lost = std::mem::take(&mut self.lost);
        tracing::error!(target: TARGET, alert = true, event = UNDELIVERABLE, channel = %self.cfg.name, error, lost,
            "alerts could not be delivered to an alert channel");
    }
}

/// One signed webhook POST.
async fn post(client: &HttpsClient, url: &str, secret: &[u8], body: &[u8], delivery: &str, attempt: u32) -> Outcome {
    let timestamp = crate::types::unix_now().max(0) as u64;
    let headers = vec![
        ("x-pop3connex-timestamp", timestamp.to_string()),
        ("x-pop3connex-signature", signature(secret, timestamp, body)),
        ("x-pop3connex-delivery", delivery.to_owned()),
        ("x-pop3connex-attempt", attempt.to_string()),
    ];
    match client.post_json(url, headers, body.to_vec(), ANSWER_LIMIT).await {
        Ok(r) if (200..300).contains(&r.status) => Outcome::Delivered,
        Ok(r) if r.status == 408 || r.status == 429 || r.status >= 500 => {
            Outcome::Retry(format!("the receiver answered {}", r.status))
        }
        Ok(r) => Outcome::Final(format!("the receiver refused the alert with {}", r.status)),
        Err(
            crate::https::HttpsError::Request(why)
            | crate::https::HttpsError::Body(why)
            | crate::https::HttpsError::TooLarge(why)
            | crate::https::HttpsError::Task(why),
        ) => Outcome::Retry(why),
    }
}

/// One mail through the relay: delivered when every recipient took it.
async fn send_mail(m: &Mail, hostname: &str, message: &[u8]) -> Outcome {
    let envelope = smtp::Envelope { mail_from: m.cfg.from.clone(), recipients: m.cfg.to.clone() };
    match smtp::deliver(&m.relay, hostname, &m.resolver, &m.sts, &envelope, message).await {
        Ok(outcomes) => {
            let mut temporary = None;
            for (rcpt, o) in m.cfg.to.iter().zip(&outcomes) {
                match o {
                    smtp::RcptOutcome::Accepted => {}
                    smtp::RcptOutcome::Temporary(why) => temporary = Some(format!("{rcpt}: {why}")),
                    smtp::RcptOutcome::Permanent(why) => return Outcome::Final(format!("{rcpt}: {why}")),
                }
            }
            match temporary {
                None => Outcome::Delivered,
                Some(why) => Outcome::Retry(why),
            }
        }
        Err(smtp::SmtpError::Temporary(why)) => Outcome::Retry(why),
        Err(smtp::SmtpError::Permanent(why)) => Outcome::Final(why),
    }
}

/// Text fit for one header or body line: controls become spaces, at most
/// `max` characters; for headers (`ascii`) anything else non-ASCII
/// becomes `?` (no RFC 2047 encoding needed, no header injection).
fn clean(s: &str, max: usize, ascii: bool) -> String {
    let mut out: String = s
        .chars()
        .map(|c| match c {
            c if c.is_control() => ' ',
            c if ascii && !c.is_ascii() => '?',
            c => c,
        })
        .take(max)
        .collect();
    if s.chars().count() > max {
        out.push_str(" [...]");
    }
    out
}

/// The alert mail: RFC 5322 headers and a plain-text body.
fn mail_message(cfg: &EmailConfig, e: &EventRecord, doc: &Value, hostname: &str, delivery: &str) -> Vec<u8> {
    use std::fmt::Write;
    let date = e.time.format(&time::format_description::well_known::Rfc2822).unwrap_or_default();
    let id = e.def().map(|d| d.id.to_string()).unwrap_or_else(|| "-".into());
    let host = clean(hostname, 200, true);
    let mut m = String::with_capacity(2048);
    let _ = write!(m, "From: POP3conneX <{}>\r\n", cfg.from);
    let _ = write!(m, "To: {}\r\n", cfg.to.join(", "));
    let _ = write!(m, "Subject: [POP3conneX] {} {} on {host}\r\n", e.severity.as_str(), clean(&e.name, 64, true));
    let _ = write!(m, "Date: {date}\r\nMessage-ID: <{delivery}@{host}>\r\nAuto-Submitted: auto-generated\r\n");
    m.push_str(
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
    );
    let _ = write!(m, "{}\r\n\r\n", clean(&e.message, MAIL_VALUE_MAX, false));
    let _ = write!(m, "event:    {} (id {id})\r\nseverity: {}\r\n", clean(&e.name, 64, false), e.severity.as_str());
    let _ = write!(m, "time:     {}\r\nhost:     {host}\r\n", doc["@timestamp"].as_str().unwrap_or_default());
    for (k, v) in &e.fields {
        let v = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let _ = write!(m, "{}: {}\r\n", clean(k, 64, false), clean(&v, MAIL_VALUE_MAX, false));
    }
    if let Some(n) = doc["alert"]["suppressed"].as_u64().filter(|n| *n > 0) {
        let _ = write!(m, "\r\n{n} more alerts of this rule and key were held back by the rate limit.\r\n");
    }
    if let Some(n) = doc["alert"]["suppressed_rule"].as_u64().filter(|n| *n > 0) {
        let _ = write!(
            m,
            "\r\n{n} alerts of this rule were held back by its limit (max_per_rule): see the event store.\r\n"
        );
    }
    let _ = write!(m, "\r\nDelivery {delivery}. Fields are described in docs/events.md.\r\n");
    m.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn event(name: &str, alert: bool, fields: &[(&str, &str)]) -> EventRecord {
        let mut map = Map::new();
        for (k, v) in fields {
            map.insert((*k).into(), json!(v));
        }
        EventRecord {
            time: time::OffsetDateTime::now_utc(),
            target: "pop3connex::test",
            name: name.into(),
            severity: super::super::Severity::Warning,
            message: "m".into(),
            fields: map,
            alert,
        }
    }

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        // The value a receiver computes with Python's hmac module:
        // hmac.new(b"k" * 16, b"1700000000.{}", "sha256").hexdigest()
        let s = signature(&[b'k'; 16], 1_700_000_000, b"{}");
        assert_eq!(s, "v1=6d58fb78491a4cd45b0a5944663cf2020c2185a67defd8caec14059846f09e3d");
        assert_ne!(s, signature(&[b'k'; 16], 1_700_000_001, b"{}"));
        assert_ne!(s, signature(&[b'j'; 16], 1_700_000_000, b"{}"));
    }

    #[test]
    fn alert_mail_headers_cannot_be_injected_through_event_fields() {
        let cfg: EmailConfig =
            toml::from_str("relay = \"r\"\nfrom = \"p@h.test\"\nto = [\"a@h.test\", \"b@h.test\"]\n").unwrap();
        let mut e = event("auth_failure_spike", true, &[("key", "x\r\nBcc: evil@attacker.test"), ("user", "élodie")]);
        e.message = "failed logins spiked\r\nX-Injected: 1".into();
        let doc = json!({ "@timestamp": "2026-12-06T04:00:00Z", "alert": { "suppressed": 3 } });
        let m = String::from_utf8(mail_message(&cfg, &e, &doc, "mail\r\nX-Host: 1", "d1")).unwrap();
        let (head, body) = m.split_once("\r\n\r\n").unwrap();
        let names: Vec<&str> = head.split("\r\n").map(|l| l.split(':').next().unwrap()).collect();
        assert_eq!(
            names,
            [
                "From",
                "To",
                "Subject",
                "Date",
                "Message-ID",
                "Auto-Submitted",
                "MIME-Version",
                "Content-Type",
                "Content-Transfer-Encoding"
            ]
        );
        assert!(
            head.contains("To: a@h.test, b@h.test\r\n") && head.contains("Subject: [POP3conneX] warning"),
            "{head}"
        );
        assert!(!body.contains("\r\nBcc:") && !body.contains("\r\nX-Injected"), "{body}");
        assert!(body.contains("key: x  Bcc: evil@attacker.test\r\n") && body.contains("user: élodie\r\n"), "{body}");
        assert!(body.contains("3 more alerts of this rule and key were held back"), "{body}");
        assert!(clean(&"x".repeat(600), MAIL_VALUE_MAX, false).ends_with(" [...]"));
    }

    #[test]
    fn routes_alerts_only_and_never_its_own_failure() {
        let spike = event("auth_failure_spike", true, &[("key", "10.0.0.0/24")]);
        assert!(accepts("a", &[], &spike));
        assert!(!accepts("a", &[], &event("auth_success", false, &[])));
        assert!(!accepts("a", &["admin_login".into()], &spike));
        let own = event(UNDELIVERABLE, true, &[("channel", "a")]);
        assert!(!accepts("a", &[], &own) && accepts("b", &[], &own));
    }

    #[test]
    fn limiter_counts_per_rule_and_key_and_reports_suppressed() {
        let held = |key, rule| Some(Held { key, rule });
        let mut l = Limiter::new(2, 100, 600);
        let alice = event("download_volume_spike", true, &[("user", "alice")]);
        let bob = event("download_volume_spike", true, &[("user", "bob")]);
        assert_eq!(l.admit(&alice, 1000), held(0, 0));
        assert_eq!(l.admit(&alice, 1001), held(0, 0));
        assert_eq!(l.admit(&alice, 1002), None);
        assert_eq!(l.admit(&alice, 1003), None);
        assert_eq!(l.admit(&bob, 1003), held(0, 0), "another key has its own budget");
        assert_eq!(l.admit(&alice, 1600), held(2, 0), "a new window; the two held back are reported");
        let net = event("auth_failure_spike", true, &[("peer", "192.0.2.7:4711")]);
        assert_eq!(rate_key(&net), "peer:192.0.2.7");
    }

    #[test]
    fn an_attack_on_many_accounts_pages_a_bounded_number_of_times_and_starves_no_other_rule() {
        let mut l = Limiter::new(5, 3, 600);
        let sent = (0..1000)
            .filter(|i| {
                let e = event("auth_failure_spike", true, &[("key", &format!("user{i}"))]);
                l.admit(&e, 1000).is_some()
            })
            .count();
        assert_eq!(sent, 3);
        // Other rules keep their own budget during the flood.
        assert_eq!(l.admit(&event("sink_dropping", true, &[("sink", "siem")]), 1001), Some(Held { key: 0, rule: 0 }));
        // The admin plane's and the configuration's alerts are never limited.
        for _ in 0..10 {
            assert!(l.admit(&event("config_reloaded", true, &[]), 1002).is_some());
        }
        let next = l.admit(&event("auth_failure_spike", true, &[("key", "late")]), 1600);
        assert_eq!(next, Some(Held { key: 0, rule: 997 }), "the next window reports what was held back");
    }
}
