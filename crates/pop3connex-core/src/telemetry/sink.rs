//! The `[[log.sink]]` sinks at run time: each sink is a hub [`Consumer`]
//! that filters by severity and pushes the event into its own bounded
//! [`Queue`], and a tokio task that owns the connection (or file) and
//! writes what the queue holds. Nothing here ever waits on the thread
//! that emitted an event: a receiver that is down fills the queue, then
//! events are dropped and counted.
//!
//! A second task per sink watches the drop counter once a second and
//! reports `sink_dropping` when drops start (then at most once a minute
//! while they go on) and `sink_recovered` once the sink delivers again
//! without dropping. Those reports are ordinary events: they reach every
//! sink, including the dropping one, where they are dropped and counted
//! like any other: the rate limit, not the event path, ends the loop.
//!
//! A sink that cannot reach its receiver reports `sink_unavailable`
//! (first failure, then at most every five minutes) with the error, e.g.
//! the certificate check that failed, and retries with back-off from one
//! second to one minute.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::catalogue::Severity;
use super::hub::{Consumer, EventRecord, Hub, Queue};
use super::{ecs, syslog};
use crate::config::logsink::{JsonSinkConfig, SinkConfig, SyslogSinkConfig, SyslogTransport};
use crate::config::Config;

const TARGET: &str = "pop3connex::telemetry";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Events written in one go (one TLS record run, one `write`).
const BATCH: usize = 256;
/// How often drops are checked.
const WATCH_TICK: Duration = Duration::from_secs(1);
/// Least time between two `sink_dropping` reports of one sink.
pub const DROP_REPORT_EVERY: Duration = Duration::from_secs(60);
/// Least time between two `sink_unavailable` reports of one sink.
const UNAVAILABLE_REPORT_EVERY: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
#[error("[[log.sink]] {sink}: {detail}")]
pub struct SinkError {
    sink: String,
    detail: String,
}

/// The running sinks; [`Sinks::shutdown`] flushes and stops them.
pub struct Sinks {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    counters: Vec<(String, Arc<AtomicU64>, Arc<AtomicU64>)>,
}

/// Severity filter in front of a sink's queue.
struct Filtered {
    min: Severity,
    queue: Queue,
}

impl Consumer for Filtered {
    fn accept(&self, event: &Arc<EventRecord>) {
        if event.severity <= self.min {
            self.queue.accept(event);
        }
    }
}

impl Sinks {
    /// Starts every configured sink and registers it with the global hub.
    /// Must run inside the tokio runtime. Fails (before anything is
    /// registered) on a sink that cannot work at all: an unreadable CA
    /// file or client certificate.
    pub fn start(cfg: &Config) -> Result<Sinks, SinkError> {
        let (stop, stopped) = watch::channel(false);
        let mut prepared = Vec::new();
        for s in &cfg.log.sink {
            let err = |detail: String| SinkError { sink: s.name().to_owned(), detail };
            prepared.push(match s {
                SinkConfig::Syslog(c) => {
                    let tls = match c.transport {
                        SyslogTransport::Tls => Some(tls_config(c).map_err(err)?),
                        _ => None,
                    };
                    Prepared::Syslog(c.clone(), tls)
                }
                SinkConfig::Json(j) => Prepared::Json(j.clone()),
            });
        }
        let mut sinks = Sinks { stop, tasks: Vec::new(), counters: Vec::new() };
        for p in prepared {
            let (name, min, capacity) = match &p {
                Prepared::Syslog(c, _) => (c.name.clone(), c.min_severity, c.queue),
                Prepared::Json(j) => (j.name.clone(), j.min_severity, j.queue),
            };
            let (queue, rx) = Queue::new(capacity);
            let dropped = queue.drop_counter();
            let delivered = Arc::new(AtomicU64::new(0));
            let out = Out { name: name.clone(), rx, delivered: delivered.clone(), dropped: dropped.clone() };
            let writer = match p {
                Prepared::Syslog(c, tls) => {
                    let header = syslog::Header::new(c.facility, &cfg.server.hostname, &c.app_name);
                    tokio::spawn(run_syslog(c, header, tls, out, stopped.clone()))
                }
                Prepared::Json(j) => tokio::spawn(run_json(j, cfg.server.hostname.clone(), out, stopped.clone())),
            };
            sinks.tasks.push(writer);
            sinks.tasks.push(tokio::spawn(watch_drops(
                name.clone(),
                dropped.clone(),
                delivered.clone(),
                stopped.clone(),
            )));
            sinks.counters.push((name, dropped, delivered));
            Hub::global().register(Arc::new(Filtered { min, queue }));
        }
        Ok(sinks)
    }

    /// Each sink's drop counter (for `pop3connex_event_sink_dropped_total`).
    pub fn drop_counters(&self) -> Vec<(String, Arc<AtomicU64>)> {
        self.counters.iter().map(|(n, d, _)| (n.clone(), d.clone())).collect()
    }

    /// `(name, dropped, delivered)` per sink, for metrics.
    pub fn counters(&self) -> Vec<(String, u64, u64)> {
        self.counters
            .iter()
            .map(|(n, d, s)| (n.clone(), d.load(Ordering::Relaxed), s.load(Ordering::Relaxed)))
            .collect()
    }

    /// Asks every sink to write what it holds and stop; waits up to
    /// `grace`, then abandons the rest.
    pub async fn shutdown(self, grace: Duration) {
        super::hub::stop_tasks(&self.stop, self.tasks, grace).await;
    }
}

enum Prepared {
    Syslog(SyslogSinkConfig, Option<Arc<rustls::ClientConfig>>),
    Json(JsonSinkConfig),
}

/// What a writer task works with.
struct Out {
    name: String,
    rx: mpsc::Receiver<Arc<EventRecord>>,
    delivered: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

/// TLS 1.2/1.3 with chain and name verification against `ca_file` or the
/// system roots (the connector's root store), optionally a client
/// certificate.
fn tls_config(c: &SyslogSinkConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let roots = crate::connector::tlsclient::root_store(c.ca_file.as_deref()).map_err(|e| e.to_string())?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let cfg = match (&c.client_certificate, &c.client_key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("client_certificate {}: {e}", cert.display()))?;
            if certs.is_empty() {
                return Err(format!("client_certificate {}: no certificate in file", cert.display()));
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("client_key {}: {e}", key.display()))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| format!("client_certificate/client_key: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    /// Whether the receiver has closed the connection (a syslog receiver
    /// never sends; readable means EOF, close_notify or an error). Checked
    /// before each write so that events are not written into a socket the
    /// kernel would only then report as reset.
    async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 512];
        let read = match self {
            Conn::Udp(_) => return false,
            Conn::Tcp(s) => tokio::time::timeout(Duration::ZERO, s.read(&mut buf)).await,
            Conn::Tls(s) => tokio::time::timeout(Duration::ZERO, s.read(&mut buf)).await,
        };
        matches!(read, Ok(Ok(0)) | Ok(Err(_)))
    }

    async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Udp(s) => s.send(data).await.map(|_| ()),
            Conn::Tcp(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Conn::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
        }
    }
}

async fn connect(c: &SyslogSinkConfig, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Conn, String> {
    let where_ = format!("{}:{}", c.host, c.port);
    let addrs: Vec<std::net::SocketAddr> =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host((c.host.as_str(), c.port)))
            .await
            .map_err(|_| format!("resolving {where_} timed out"))?
            .map_err(|e| format!("cannot resolve {where_}: {e}"))?
            .collect();
    let first = *addrs.first().ok_or_else(|| format!("{where_} has no address"))?;
    if c.transport == SyslogTransport::Udp {
        let local: std::net::SocketAddr = if first.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = UdpSocket::bind(local).await.map_err(|e| format!("udp socket: {e}"))?;
        s.connect(first).await.map_err(|e| format!("udp {first}: {e}"))?;
        return Ok(Conn::Udp(s));
    }
    let mut last = String::new();
    let mut tcp = None;
    for a in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last = format!("cannot connect to {a}: {e}"),
            Err(_) => last = format!("connecting to {a} timed out"),
        }
    }
    let tcp = tcp.ok_or(last)?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Conn::Tcp(tcp));
    };
    let name = rustls::pki_types::ServerName::try_from(c.server_name.clone())
        .map_err(|e| format!("server_name {}: {e}", c.server_name))?;
    let connector = tokio_rustls::TlsConnector::from(tls.clone());
    match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(Conn::Tls(Box::new(s))),
        Ok(Err(e)) => Err(format!("TLS handshake with {where_} (server_name {}) failed: {e}", c.server_name)),
        Err(_) => Err(format!("TLS handshake with {where_} timed out")),
    }
}

/// Connection failures of one sink, reported with a rate limit.
struct Failures {
    count: u64,
    last_report: Option<Instant>,
    backoff: Duration,
}

impl Failures {
    fn new() -> Failures {
        Failures { count: 0, last_report: None, backoff: BACKOFF_MIN }
    }

    fn failed(&mut self, sink: &str, error: &str) -> Duration {
        self.count += 1;
        let now = Instant::now();
        if self.last_report.is_none_or(|t| now.duration_since(t) >= UNAVAILABLE_REPORT_EVERY) {
            self.last_report = Some(now);
            tracing::error!(target: TARGET, event = "sink_unavailable", sink, error, attempts = self.count,
                "event sink cannot deliver; events wait in its queue");
        } else {
            tracing::debug!(target: TARGET, sink, error, attempts = self.count, "event sink still unavailable");
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        wait
    }

    fn ok(&mut self, sink: &str) {
        if self.count > 0 {
            tracing::info!(target: TARGET, sink, attempts = self.count, "event sink connected again");
        }
        *self = Failures::new();
    }
}

/// Fills `pending` with what the queue holds, waiting for the first event
/// unless `stopping`. Returns false when there is nothing more to come.
async fn fill(
    out: &mut Out,
    pending: &mut Vec<Arc<EventRecord>>,
    stop: &mut watch::Receiver<bool>,
    stopping: &mut bool,
) -> bool {
    if pending.is_empty() && !*stopping {
        tokio::select! {
            biased;
            ev = out.rx.recv() => match ev {
                Some(ev) => pending.push(ev),
                None => *stopping = true,
            },
            _ = stop.wait_for(|s| *s) => *stopping = true,
        }
    }
    while pending.len() < BATCH {
        match out.rx.try_recv() {
            Ok(ev) => pending.push(ev),
            Err(_) => break,
        }
    }
    !pending.is_empty()
}

/// Sleeps `d` unless a stop comes first (returns true then).
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

async fn run_syslog(
    c: SyslogSinkConfig,
    header: syslog::Header,
    tls: Option<Arc<rustls::ClientConfig>>,
    mut out: Out,
    mut stop: watch::Receiver<bool>,
) {
    let mut conn: Option<Conn> = None;
    let mut pending: Vec<Arc<EventRecord>> = Vec::new();
    let mut failures = Failures::new();
    let mut stopping = false;
    let udp = c.transport == SyslogTransport::Udp;
    loop {
        if !fill(&mut out, &mut pending, &mut stop, &mut stopping).await {
            break;
        }
        if let Some(cn) = conn.as_mut() {
            if cn.closed().await {
                conn = None;
            }
        }
        if conn.is_none() {
            match connect(&c, tls.as_ref()).await {
                Ok(cn) => {
                    failures.ok(&out.name);
                    conn = Some(cn);
                }
                Err(e) => {
                    let wait = failures.failed(&out.name, &e);
                    if stopping || pause(wait, &mut stop).await {
                        // Shutting down with the receiver away: what is
                        // held is lost, and counted.
                        out.rx.close();
                        let mut lost = pending.len() as u64;
                        while out.rx.try_recv().is_ok() {
                            lost += 1;
                        }
                        out.dropped.fetch_add(lost, Ordering::Relaxed);
                        break;
                    }
                    continue;
                }
            }
        }
        let Some(cn) = conn.as_mut() else { continue };
        if udp {
            // One datagram per message; a failed send (ICMP unreachable)
            // loses that datagram, counted as a drop.
            for ev in pending.drain(..) {
                let msg = syslog::render(&header, &ev, c.max_message_bytes);
                match tokio::time::timeout(WRITE_TIMEOUT, cn.write(msg.as_bytes())).await {
                    Ok(Ok(())) => {
                        out.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        out.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            continue;
        }
        let mut data = Vec::with_capacity(pending.len() * 256);
        for ev in &pending {
            data.extend_from_slice(&syslog::frame(&syslog::render(&header, ev, c.max_message_bytes)));
        }
        match tokio::time::timeout(WRITE_TIMEOUT, cn.write(&data)).await {
            Ok(Ok(())) => {
                out.delivered.fetch_add(pending.len() as u64, Ordering::Relaxed);
                pending.clear();
            }
            Ok(Err(e)) => {
                conn = None;
                let wait = failures.failed(&out.name, &format!("write to {}:{} failed: {e}", c.host, c.port));
                if !stopping && pause(wait, &mut stop).await {
                    stopping = true;
                }
            }
            Err(_) => {
                conn = None;
                let wait = failures.failed(&out.name, &format!("write to {}:{} timed out", c.host, c.port));
                if !stopping && pause(wait, &mut stop).await {
                    stopping = true;
                }
            }
        }
    }
    if let Some(Conn::Tls(mut s)) = conn {
        let _ = tokio::time::timeout(Duration::from_secs(1), s.shutdown()).await;
    }
}

async fn open_append(path: &PathBuf) -> std::io::Result<tokio::fs::File> {
    let mut o = tokio::fs::OpenOptions::new();
    o.create(true).append(true).mode(0o640);
    o.open(path).await
}

async fn run_json(j: JsonSinkConfig, hostname: String, mut out: Out, mut stop: watch::Receiver<bool>) {
    let mut file: Option<tokio::fs::File> = None;
    let mut pending = Vec::new();
    let mut failures = Failures::new();
    let mut stopping = false;
    while fill(&mut out, &mut pending, &mut stop, &mut stopping).await {
        // A rotated file (renamed or removed) is reopened by path.
        if file.is_some() && tokio::fs::metadata(&j.path).await.is_err() {
            file = None;
        }
        if file.is_none() {
            match open_append(&j.path).await {
                Ok(f) => {
                    failures.ok(&out.name);
                    file = Some(f);
                }
                Err(e) => {
                    let wait = failures.failed(&out.name, &format!("cannot open {}: {e}", j.path.display()));
                    if stopping || pause(wait, &mut stop).await {
                        out.dropped.fetch_add(pending.len() as u64, Ordering::Relaxed);
                        pending.clear();
                        stopping = true;
                    }
                    continue;
                }
            }
        }
        let Some(f) = file.as_mut() else { continue };
        let mut data = Vec::new();
        for ev in &pending {
            if serde_json::to_writer(&mut data, &ecs::to_ecs(ev, &hostname)).is_ok() {
                data.push(b'\n');
            }
        }
        let written = async {
            f.write_all(&data).await?;
            f.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, written).await {
            Ok(Ok(())) => {
                out.delivered.fetch_add(pending.len() as u64, Ordering::Relaxed);
            }
            _ => {
                // A partial line may be in the file; lines after it parse.
                file = None;
                out.dropped.fetch_add(pending.len() as u64, Ordering::Relaxed);
                failures.failed(&out.name, &format!("cannot write {}", j.path.display()));
            }
        }
        pending.clear();
    }
}

/// What [`DropMonitor::tick`] asks to report.
#[derive(Debug, PartialEq, Eq)]
pub enum DropReport {
    Dropping { dropped: u64 },
    Recovered { dropped: u64 },
}

/// Clean ticks (seconds without a new drop) before a sink that delivered
/// again counts as recovered: a sink that drops in bursts stays in one
/// episode instead of flapping.
const RECOVER_TICKS: u32 = 3;

/// The drop alert's state: a report when drops start, a reminder while
/// they go on, never more than one `sink_dropping` per
/// [`DROP_REPORT_EVERY`] (drops not reported yet are carried into the
/// next report); `sink_recovered` once the sink has delivered since the
/// episode began and [`RECOVER_TICKS`] ticks passed without a drop, only
/// for an episode that was reported.
#[derive(Debug, Default)]
pub struct DropMonitor {
    dropping: bool,
    /// This episode was reported.
    announced: bool,
    /// Drop count at the last tick, at the last report, at the episode's start.
    seen: u64,
    reported: u64,
    episode_start: u64,
    delivered_at_start: u64,
    clean_ticks: u32,
    last_report: Option<Instant>,
}

impl DropMonitor {
    pub fn tick(&mut self, now: Instant, dropped: u64, delivered: u64) -> Option<DropReport> {
        let new_drops = dropped > self.seen;
        self.seen = dropped;
        if new_drops {
            self.clean_ticks = 0;
            if !self.dropping {
                self.dropping = true;
                self.announced = false;
                self.episode_start = self.reported;
                self.delivered_at_start = delivered;
            }
            if self.last_report.is_some_and(|t| now.duration_since(t) < DROP_REPORT_EVERY) {
                return None;
            }
            let n = dropped - self.reported;
            self.reported = dropped;
            self.last_report = Some(now);
            self.announced = true;
            return Some(DropReport::Dropping { dropped: n });
        }
        if !self.dropping {
            return None;
        }
        self.clean_ticks += 1;
        if self.clean_ticks < RECOVER_TICKS || delivered <= self.delivered_at_start {
            return None;
        }
        self.dropping = false;
        if !self.announced {
            // Carried into the next report.
            return None;
        }
        let n = dropped - self.episode_start;
        self.reported = dropped;
        Some(DropReport::Recovered { dropped: n })
    }
}

async fn watch_drops(
    sink: String,
    dropped: Arc<AtomicU64>,
    delivered: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut m = DropMonitor::default();
    let mut tick = tokio::time::interval(WATCH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let report = m.tick(Instant::now(), dropped.load(Ordering::Relaxed), delivered.load(Ordering::Relaxed));
        match report {
            Some(DropReport::Dropping { dropped }) => tracing::warn!(target: TARGET, event = "sink_dropping",
                alert = true, sink = sink.as_str(), dropped, "event sink queue full: events dropped"),
            Some(DropReport::Recovered { dropped }) => tracing::info!(target: TARGET, event = "sink_recovered",
                sink = sink.as_str(), dropped, "event sink delivers again"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests;
