use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Map;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::*;
use crate::config::logsink::SinkConfig;

fn syslog_cfg(extra: &str) -> SyslogSinkConfig {
    #[derive(serde::Deserialize)]
    struct One {
        sink: SinkConfig,
    }
    let text = format!("[sink]\ntype = \"syslog\"\n{extra}\n");
    match toml::from_str::<One>(&text).unwrap().sink {
        SinkConfig::Syslog(s) => s,
        _ => unreachable!(),
    }
}

fn event(name: &str, user: &str) -> Arc<EventRecord> {
    let mut fields = Map::new();
    fields.insert("peer".into(), "192.0.2.7".into());
    fields.insert("user".into(), user.into());
    Arc::new(EventRecord {
        time: time::OffsetDateTime::now_utc(),
        target: "pop3connex::security",
        name: name.into(),
        severity: Severity::Warning,
        message: "authentication failed".into(),
        fields,
        alert: false,
    })
}

struct Running {
    queue: Queue,
    delivered: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn spawn(c: SyslogSinkConfig, capacity: usize) -> Running {
    let (queue, rx) = Queue::new(capacity);
    let delivered = Arc::new(AtomicU64::new(0));
    let dropped = queue.drop_counter();
    let tls = (c.transport == SyslogTransport::Tls).then(|| tls_config(&c).unwrap());
    let header = syslog::Header::new(c.facility, "mx.example.net", &c.app_name);
    let out = Out { name: c.name.clone(), rx, delivered: delivered.clone(), dropped: dropped.clone() };
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run_syslog(c, header, tls, out, stopped));
    Running { queue, delivered, dropped, stop, task }
}

/// Reads octet-counted frames until `n` messages arrived.
async fn read_frames<R: tokio::io::AsyncRead + Unpin>(r: &mut R, n: usize) -> Vec<String> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let mut chunk = [0u8; 4096];
        let k = tokio::time::timeout(Duration::from_secs(10), r.read(&mut chunk)).await.unwrap().unwrap();
        assert!(k > 0, "connection closed after {} messages", out.len());
        buf.extend_from_slice(&chunk[..k]);
        while let Some(sp) = buf.iter().position(|b| *b == b' ') {
            let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().unwrap();
            if buf.len() < sp + 1 + len {
                break;
            }
            out.push(String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap());
            buf.drain(..sp + 1 + len);
        }
    }
    out
}

#[tokio::test]
async fn tcp_sink_sends_octet_counted_rfc5424() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let r = spawn(syslog_cfg(&format!("transport = \"tcp\"\naddress = \"127.0.0.1:{port}\"")), 16);
    r.queue.accept(&event("auth_failure", "alice"));
    r.queue.accept(&event("auth_failure", "b\"ob]"));
    let (mut s, _) = l.accept().await.unwrap();
    let got = read_frames(&mut s, 2).await;
    assert!(got[0].starts_with("<20>1 "), "{}", got[0]);
    assert!(got[0].contains("[pop3connex@32473 id=\"101\" name=\"auth_failure\""), "{}", got[0]);
    assert!(got[1].contains(r#"user="b\"ob\]""#), "{}", got[1]);
    let _ = r.stop.send(true);
    tokio::time::timeout(Duration::from_secs(5), r.task).await.unwrap().unwrap();
    assert_eq!(r.delivered.load(Ordering::Relaxed), 2);
    assert_eq!(r.dropped.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_receiver_that_is_down_never_blocks_and_drops_are_counted_then_it_recovers() {
    // A port nobody listens on (bound, then closed).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = spawn(syslog_cfg(&format!("transport = \"tcp\"\naddress = \"127.0.0.1:{port}\"")), 4);
    let started = Instant::now();
    for _ in 0..100 {
        r.queue.accept(&event("auth_failure", "alice"));
    }
    assert!(started.elapsed() < Duration::from_millis(200), "accept waited");
    // The task holds at most one batch; the queue holds 4; the rest is dropped.
    let dropped = r.dropped.load(Ordering::Relaxed);
    assert!((95..=96).contains(&dropped), "dropped {dropped}");
    // The receiver comes up: what was held is delivered after the back-off.
    let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), l.accept()).await.unwrap().unwrap();
    let got = read_frames(&mut s, (100 - dropped) as usize).await;
    assert_eq!(got.len() as u64, 100 - dropped);
    let _ = r.stop.send(true);
    tokio::time::timeout(Duration::from_secs(5), r.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_with_the_receiver_away_ends_promptly_and_counts_the_loss() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = spawn(syslog_cfg(&format!("transport = \"tcp\"\naddress = \"127.0.0.1:{port}\"")), 8);
    for _ in 0..3 {
        r.queue.accept(&event("ban", "-"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = r.stop.send(true);
    tokio::time::timeout(Duration::from_secs(3), r.task).await.unwrap().unwrap();
    assert_eq!(r.dropped.load(Ordering::Relaxed), 3);
    assert_eq!(r.delivered.load(Ordering::Relaxed), 0);
}

struct Pki {
    _dir: std::path::PathBuf,
    ca_file: std::path::PathBuf,
    server: Arc<rustls::ServerConfig>,
}

fn pki(name: &str) -> Pki {
    let dir = std::env::temp_dir().join(format!("p3x-sink-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["siem.test".into()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    Pki { _dir: dir, ca_file, server: Arc::new(server) }
}

#[tokio::test]
async fn tls_sink_verifies_the_certificate_and_name() {
    let p = pki("tls");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(p.server.clone());
    let ca = p.ca_file.display();
    let good = spawn(
        syslog_cfg(&format!("address = \"127.0.0.1:{port}\"\nca_file = \"{ca}\"\nserver_name = \"siem.test\"")),
        8,
    );
    good.queue.accept(&event("auth_failure", "alice"));
    let (s, _) = l.accept().await.unwrap();
    let mut s = acceptor.accept(s).await.unwrap();
    let got = read_frames(&mut s, 1).await;
    assert!(got[0].contains("name=\"auth_failure\""), "{}", got[0]);

    // The same server under another name: the handshake fails, nothing is
    // delivered and the event stays queued (not dropped).
    let bad = spawn(
        syslog_cfg(&format!("address = \"127.0.0.1:{port}\"\nca_file = \"{ca}\"\nserver_name = \"other.test\"")),
        8,
    );
    bad.queue.accept(&event("auth_failure", "mallory"));
    let (s, _) = l.accept().await.unwrap();
    assert!(acceptor.accept(s).await.is_err(), "the client must abort the handshake");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bad.delivered.load(Ordering::Relaxed), 0);
    assert_eq!(bad.dropped.load(Ordering::Relaxed), 0);
    let _ = good.stop.send(true);
    let _ = bad.stop.send(true);
}

#[test]
fn tls_config_reports_an_unreadable_ca_file() {
    let c = syslog_cfg("address = \"h.example\"\nca_file = \"/nonexistent/ca.pem\"");
    let e = tls_config(&c).unwrap_err();
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
}

#[test]
fn drop_reports_start_once_remind_at_most_every_minute_and_recover() {
    let mut m = DropMonitor::default();
    let t0 = Instant::now();
    let s = |n: u64| t0 + Duration::from_secs(n);
    assert_eq!(m.tick(s(0), 0, 10), None);
    assert_eq!(m.tick(s(1), 5, 10), Some(DropReport::Dropping { dropped: 5 }));
    // Drops go on: no report for a minute, whatever the rate.
    for i in 2..61 {
        assert_eq!(m.tick(s(i), 5 + i * 1000, 10), None, "second {i}");
    }
    let Some(DropReport::Dropping { dropped }) = m.tick(s(61), 70_000, 10) else { panic!() };
    assert_eq!(dropped, 70_000 - 5);
    // Down, nothing delivered: no drops for a while is not a recovery.
    for i in 62..70 {
        assert_eq!(m.tick(s(i), 70_000, 10), None, "second {i}");
    }
    // Delivered again, but a drop in the same tick: not yet.
    assert_eq!(m.tick(s(70), 70_001, 11), None);
    // Clean ticks after deliveries since the episode began: recovered, with
    // the episode's total (the deliveries may all have happened before).
    assert_eq!(m.tick(s(71), 70_001, 11), None);
    assert_eq!(m.tick(s(72), 70_001, 11), None);
    assert_eq!(m.tick(s(73), 70_001, 11), Some(DropReport::Recovered { dropped: 70_001 }));
    assert_eq!(m.tick(s(74), 70_001, 30), None);
    // A new episode within the minute is not reported at once...
    assert_eq!(m.tick(s(75), 70_003, 30), None);
    // ...and if it ends before the minute is up, no recovery either; its
    // drops are carried into the next report.
    for i in 76..90 {
        assert_eq!(m.tick(s(i), 70_003, 40), None, "second {i}");
    }
    assert_eq!(m.tick(s(130), 70_004, 40), Some(DropReport::Dropping { dropped: 3 }));
}

#[tokio::test]
async fn the_filter_keeps_only_events_at_or_above_min_severity() {
    let (queue, mut rx) = Queue::new(8);
    let f = Filtered { min: Severity::Warning, queue };
    let mut info = (*event("auth_success", "a")).clone();
    info.severity = Severity::Info;
    f.accept(&Arc::new(info));
    f.accept(&event("auth_failure", "a"));
    let mut crit = (*event("integrity_failure", "a")).clone();
    crit.severity = Severity::Critical;
    f.accept(&Arc::new(crit));
    assert_eq!(rx.recv().await.unwrap().name, "auth_failure");
    assert_eq!(rx.recv().await.unwrap().name, "integrity_failure");
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn json_sink_appends_ecs_lines_and_reopens_a_rotated_file() {
    let dir = std::env::temp_dir().join(format!("p3x-json-sink-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("events.json");
    let _ = std::fs::remove_file(&path);
    let j = JsonSinkConfig { name: "j".into(), path: path.clone(), queue: 8, min_severity: Severity::Info };
    let (queue, rx) = Queue::new(8);
    let delivered = Arc::new(AtomicU64::new(0));
    let out = Out { name: "j".into(), rx, delivered: delivered.clone(), dropped: queue.drop_counter() };
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run_json(j, "mx.example.net".into(), out, stopped));
    queue.accept(&event("auth_failure", "alice"));
    let wait = |n: u64| {
        let d = delivered.clone();
        async move {
            for _ in 0..200 {
                if d.load(Ordering::Relaxed) >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("not delivered");
        }
    };
    wait(1).await;
    // logrotate (create mode): the file is renamed away; the next event
    // goes to a new file at the configured path.
    let rotated = dir.join("events.json.1");
    std::fs::rename(&path, &rotated).unwrap();
    queue.accept(&event("ban", "-"));
    wait(2).await;
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
    let old: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&rotated).unwrap().trim()).unwrap();
    assert_eq!(old["event"]["code"], "101");
    assert_eq!(old["user"]["name"], "alice");
    assert_eq!(old["source"]["ip"], "192.0.2.7");
    let new = std::fs::read_to_string(&path).unwrap();
    assert_eq!(new.lines().count(), 1);
    let new: serde_json::Value = serde_json::from_str(new.trim()).unwrap();
    assert_eq!(new["event"]["action"], "ban");
    let _ = std::fs::remove_dir_all(&dir);
}
