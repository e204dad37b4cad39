//! The connector end to end in one process: a POP3conneX server on a
//! loopback port plays the upstream (verified TLS with a test CA), a second
//! store is the connector's local store. Real Dovecot/Postfix peers, crash
//! tests and hostile upstreams are in tests/system.

mod common;

use std::sync::Arc;

use common::{Fixture, PASSWORD};
use pop3connex_core::config::Config;
use pop3connex_core::connector::engine::{Connector, RunReport};
use pop3connex_core::pop3::ListenerKind;
use pop3connex_core::types::UserName;

/// Serves POP3S from `fx` on 127.0.0.1; returns the port.
async fn upstream(fx: &Fixture) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let ctx = fx.pop3_ctx(pop3connex_core::config::Pop3Config::default());
    let rx = fx.shutdown.subscribe();
    tokio::spawn(async move {
        while let Ok((sock, peer)) = listener.accept().await {
            tokio::spawn(pop3connex_core::pop3::serve(ctx.clone(), sock, peer, ListenerKind::ImplicitTls, rx.clone()));
        }
    });
    port
}

struct Setup {
    up: Fixture,
    local: Fixture,
    connector: Connector,
}

/// Serves LMTP from `fx` on 127.0.0.1 (the forwarding target); returns the port.
async fn downstream_lmtp(fx: &Fixture) -> u16 {
    downstream_lmtp_on(fx, 0).await
}

async fn downstream_lmtp_on(fx: &Fixture, port: u16) -> u16 {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let ctx = Arc::new(pop3connex_core::lmtp::LmtpContext::new(
        pop3connex_core::config::LmtpConfig::default(),
        "downstream.test".into(),
        fx.auth.clone(),
    ));
    let rx = fx.shutdown.subscribe();
    tokio::spawn(async move {
        while let Ok((sock, peer)) = listener.accept().await {
            tokio::spawn(pop3connex_core::lmtp::serve(ctx.clone(), sock, peer.to_string(), rx.clone()));
        }
    });
    port
}

async fn setup(name: &str, account_extra: &str, route: &str) -> Setup {
    setup_with(name, account_extra, route, "").await
}

async fn setup_with(name: &str, account_extra: &str, route: &str, global: &str) -> Setup {
    let up = Fixture::new(&format!("{name}-up")).await;
    up.add_user("remote").await;
    let local = Fixture::new(&format!("{name}-local")).await;
    for u in ["alice", "bob", "quarantine"] {
        local.add_user(u).await;
    }
    let port = upstream(&up).await;
    let dir = &local.dir;
    std::fs::write(dir.join("ca.pem"), &up.ca_pem).unwrap();
    let pw = dir.join("upstream.pw");
    std::fs::write(&pw, PASSWORD).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "[store]\nbackend = \"sqlite\"\npath = \"unused.db\"\nmaster_key = \"file:unused.key\"\n\
         [tls]\ncertificate = \"c.pem\"\nprivate_key = \"file:k.pem\"\n{global}\
         [[connector.accounts]]\nname = \"isp\"\nhost = \"localhost\"\nport = {port}\ntls = \"implicit\"\n\
         ca_file = \"ca.pem\"\nuser = \"remote\"\npassword = \"file:upstream.pw\"\n{account_extra}\n\
         [connector.accounts.route]\n{route}\n"
    );
    let cfg = Config::parse(&text, &dir.join("c.toml")).unwrap();
    let connector = Connector::new(Arc::new(cfg), local.mail.clone()).unwrap();
    Setup { up, local, connector }
}

impl Setup {
    async fn run(&self) -> RunReport {
        let account = self.connector.account("isp").await.unwrap();
        self.connector.run_account(&account).await.unwrap()
    }

    async fn bodies(fx: &Fixture, user: &str) -> Vec<Vec<u8>> {
        let rec = fx.mail.store().user(&UserName::parse(user).unwrap()).await.unwrap().unwrap();
        let key = fx.mail.data_key(&rec.mailbox).unwrap();
        let mut out = Vec::new();
        for m in fx.mail.store().messages(rec.mailbox.id).await.unwrap() {
            let mut body = Vec::new();
            for i in 0..m.chunk_count {
                body.extend_from_slice(&fx.mail.read_chunk(&key, &m, i).await.unwrap());
            }
            out.push(body);
        }
        out
    }
}

fn message(tag: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "{extra_headers}From: a@example.org\r\nTo: b@example.com\r\nMessage-ID: <{tag}@example.org>\r\n\
         Subject: {tag}\r\n\r\nbody of {tag}\r\n.leading dot\r\n\r\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_on_server_fetches_each_message_once_byte_for_byte() {
    let s = setup("leave", "", "deliver_to = { local = \"alice\" }").await;
    let sent: Vec<_> = (0..3).map(|i| message(&format!("m{i}"), "")).collect();
    for m in &sent {
        s.up.deliver("remote", m).await;
    }
    let r = s.run().await;
    assert_eq!((r.fetched, r.delivered, r.deleted), (3, 3, 0), "{r}");
    assert_eq!(Setup::bodies(&s.local, "alice").await, sent);
    let r = s.run().await;
    assert_eq!(r.fetched, 0, "UIDL tracking: nothing new: {r}");
    assert_eq!(s.up.count("remote").await, 3);
    // A new upstream message is fetched on the next run.
    s.up.deliver("remote", &message("m3", "")).await;
    assert_eq!(s.run().await.fetched, 1);
    assert_eq!(s.local.count("alice").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_after_delivery_empties_upstream() {
    let s = setup("delete", "delete = \"after-delivery\"", "deliver_to = { local = \"alice\" }").await;
    for i in 0..4 {
        s.up.deliver("remote", &message(&format!("d{i}"), "")).await;
    }
    let r = s.run().await;
    assert_eq!((r.fetched, r.deleted), (4, 4), "{r}");
    assert_eq!(s.up.count("remote").await, 0);
    assert_eq!(s.local.count("alice").await, 4);
    let (status, seen) = s.connector.status("isp").await.unwrap();
    assert_eq!(seen, 0, "deleted UIDLs are forgotten");
    assert_eq!(status.unwrap().fetched_total, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_all_routes_quarantines_and_deduplicates() {
    let route = "envelope_header = \"X-Original-To\"\n\
                 addresses = { \"sales@example.com\" = { local = \"bob\" } }\n\
                 domains = { \"example.com\" = { local = \"*\" } }";
    let s = setup("catchall", "", route).await;
    let to_alice = message("c1", "X-Original-To: <alice@example.com>\r\n");
    let to_sales = message("c2", "X-Original-To: sales@example.com\r\n");
    let unknown_domain = message("c3", "X-Original-To: carol@elsewhere.example\r\n");
    let no_header = message("c4", "");
    let no_such_user = message("c5", "X-Original-To: zed@example.com\r\n");
    for m in [&to_alice, &to_sales, &unknown_domain, &no_header, &no_such_user, &to_alice] {
        s.up.deliver("remote", m).await;
    }
    let r = s.run().await;
    assert_eq!((r.fetched, r.delivered, r.quarantined, r.duplicates), (6, 2, 3, 1), "{r}");
    assert_eq!(Setup::bodies(&s.local, "alice").await, vec![to_alice.clone()]);
    assert_eq!(Setup::bodies(&s.local, "bob").await, vec![to_sales]);
    let q = Setup::bodies(&s.local, "quarantine").await;
    assert_eq!(q.len(), 3);
    assert!(q[0].starts_with(b"X-POP3conneX-Quarantine: no route for X-Original-To recipient carol@elsewhere.example"));
    assert!(q[0].ends_with(&unknown_domain));
    assert!(String::from_utf8_lossy(&q[1]).contains("no usable X-Original-To header"));
    assert!(String::from_utf8_lossy(&q[2]).contains("no local user `zed`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_is_skipped_and_remembered() {
    let s = setup("oversize", "max_message_size = 2048", "deliver_to = { local = \"alice\" }").await;
    let big = [message("big", "").as_slice(), &vec![b'x'; 4000], b"\r\n"].concat();
    s.up.deliver("remote", &big).await;
    s.up.deliver("remote", &message("small", "")).await;
    let r = s.run().await;
    assert_eq!((r.fetched, r.skipped, r.delivered), (1, 1, 1), "{r}");
    assert_eq!(s.run().await.skipped, 0, "the oversize message is remembered, not re-examined");
    assert_eq!(s.up.count("remote").await, 2, "oversize = skip leaves it upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_upstream_certificate_fetches_nothing() {
    let s = setup("untrusted", "", "deliver_to = { local = \"alice\" }").await;
    s.up.deliver("remote", &message("t", "")).await;
    let other = pop3connex_core::tls::generate_local_ca("localhost").unwrap();
    std::fs::write(s.local.dir.join("ca.pem"), other.ca_pem).unwrap();
    let account = s.connector.account("isp").await.unwrap();
    let e = s.connector.run_account(&account).await.unwrap_err();
    assert_eq!(e.kind(), "tls", "{e}");
    assert_eq!(s.local.count("alice").await, 0);
    let (status, _) = s.connector.status("isp").await.unwrap();
    let status = status.unwrap();
    assert_eq!(status.failures, 1);
    let last = status.last_error.unwrap();
    assert!(last.starts_with("tls:"), "{last}");
    assert!(!last.contains(PASSWORD) && !e.to_string().contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_over_lmtp_and_quarantines_permanent_refusals() {
    let down = Fixture::new("forward-down").await;
    down.add_user("carol").await;
    let port = downstream_lmtp(&down).await;
    let global = format!(
        "[[connector.downstreams]]\nname = \"corp\"\nprotocol = \"lmtp\"\nhost = \"127.0.0.1\"\nport = {port}\n\
         tls = \"none\"\n"
    );
    let route = "envelope_header = \"Delivered-To\"\n\
                 domains = { \"corp.example\" = { forward = \"*\", via = \"corp\" } }";
    let s = setup_with("forward", "delete = \"after-delivery\"", route, &global).await;
    let to_carol = message("f1", "Return-Path: <sender@example.org>\r\nDelivered-To: carol@corp.example\r\n");
    let to_nobody = message("f2", "Delivered-To: nobody@corp.example\r\n");
    s.up.deliver("remote", &to_carol).await;
    s.up.deliver("remote", &to_nobody).await;
    let r = s.run().await;
    assert_eq!((r.fetched, r.forwarded, r.quarantined, r.deleted), (2, 1, 1, 2), "{r}");
    // Downstream got the upstream bytes behind its own trace headers and ours.
    let got = Setup::bodies(&down, "carol").await;
    assert_eq!(got.len(), 1);
    let text = String::from_utf8_lossy(&got[0]);
    assert!(text.contains("(POP3conneX connector) with POP3S for <carol@corp.example>;"), "{text}");
    assert!(got[0].ends_with(&to_carol), "{text}");
    assert!(text.starts_with("Return-Path: <sender@example.org>"), "envelope sender kept: {text}");
    // 550 for the unknown recipient: quarantined locally, never bounced.
    let q = Setup::bodies(&s.local, "quarantine").await;
    assert_eq!(q.len(), 1);
    let qt = String::from_utf8_lossy(&q[0]);
    assert!(qt.starts_with("X-POP3conneX-Quarantine: nobody@corp.example refused by corp: 550"), "{qt}");
    assert!(q[0].ends_with(&to_nobody));
    assert_eq!(s.up.count("remote").await, 0, "both dealt with, both deleted upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_runs_accounts_independently_of_a_dead_upstream() {
    // "isp" is healthy; "dead" accepts TCP connections and never says a word.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = dead.accept().await {
            held.push(sock);
        }
    });
    let global = format!(
        "[connector]\nmax_concurrent = 2\njitter_percent = 5\n\
         [[connector.accounts]]\nname = \"dead\"\nhost = \"127.0.0.1\"\nport = {dead_port}\ntls = \"implicit\"\n\
         user = \"x\"\npassword = \"file:upstream.pw\"\ninterval_secs = 30\ntimeout_secs = 60\n\
         [connector.accounts.route]\ndeliver_to = {{ local = \"bob\" }}\n"
    );
    let s = setup_with("sched", "interval_secs = 30", "deliver_to = { local = \"alice\" }", &global).await;
    s.up.deliver("remote", &message("s1", "")).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let connector = Arc::new(s.connector);
    let sched = tokio::spawn(connector.clone().run_scheduler(stopped));
    // First runs start within the jitter (≤ 1.5 s here); the healthy account
    // must be done long before the dead one's 60 s timeout.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while s.local.count("alice").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "healthy account was not fetched while the other hangs");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (dead_status, _) = connector.status("dead").await.unwrap();
    assert!(dead_status.is_none(), "the dead upstream's run is still waiting, not finished");
    stop.send(true).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), sched).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_hook_receives_quarantine_events_as_json() {
    let out = std::env::temp_dir().join(format!("p3x-alert-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let global = format!("[connector]\nalert_command = [\"sh\", \"-c\", \"cat >> {}\"]\n", out.display());
    let route = "envelope_header = \"Delivered-To\"\ndomains = { \"example.com\" = { local = \"*\" } }";
    let s = setup_with("alert", "", route, &global).await;
    s.up.deliver("remote", &message("a1", "Delivered-To: x@unknown.example\r\n")).await;
    assert_eq!(s.run().await.quarantined, 1);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let line = loop {
        if let Ok(text) = std::fs::read_to_string(&out) {
            if text.ends_with('\n') {
                break text;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "alert hook did not run");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["event"], "connector_quarantined");
    assert_eq!(v["account"], "isp");
    assert!(v["reason"].as_str().unwrap().contains("x@unknown.example"));
    let _ = std::fs::remove_file(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_after_days_waits_for_the_age() {
    let mut s =
        setup("afterdays", "delete = \"after-days\"\ndelete_after_days = 7", "deliver_to = { local = \"alice\" }")
            .await;
    let now = Arc::new(std::sync::atomic::AtomicI64::new(1_800_000_000));
    let clock = now.clone();
    s.connector = s.connector.with_clock(Arc::new(move || clock.load(std::sync::atomic::Ordering::SeqCst)));
    s.up.deliver("remote", &message("old", "")).await;
    assert_eq!(s.run().await.deleted, 0);
    now.fetch_add(6 * 86_400, std::sync::atomic::Ordering::SeqCst);
    s.up.deliver("remote", &message("newer", "")).await;
    let r = s.run().await;
    assert_eq!((r.fetched, r.deleted), (1, 0), "{r}");
    assert_eq!(s.up.count("remote").await, 2);
    now.fetch_add(86_400, std::sync::atomic::Ordering::SeqCst);
    let r = s.run().await;
    assert_eq!((r.fetched, r.deleted), (0, 1), "only the 7-day-old copy goes: {r}");
    assert_eq!(s.up.count("remote").await, 1);
    assert_eq!(s.local.count("alice").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_run_caps_leave_the_rest_for_the_next_run() {
    let s =
        setup("caps", "max_messages_per_run = 2\nmax_bytes_per_run = 1024", "deliver_to = { local = \"alice\" }").await;
    let big = [message("big", "").as_slice(), &vec![b'y'; 1500], b"\r\n"].concat();
    s.up.deliver("remote", &big).await;
    for i in 0..3 {
        s.up.deliver("remote", &message(&format!("p{i}"), "")).await;
    }
    // The 1.6 KB message exceeds the byte cap alone: it is fetched as the
    // first of its run, and the cap ends that run.
    let fetched: Vec<u64> = [s.run().await, s.run().await, s.run().await].iter().map(|r| r.fetched).collect();
    assert_eq!(fetched, [1, 2, 1]);
    assert_eq!(s.run().await.fetched, 0);
    assert_eq!(s.local.count("alice").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_downstream_defers_and_ends_the_run_early() {
    let down = Fixture::new("deferred-down").await;
    down.add_user("carol").await;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let global = format!(
        "[[connector.downstreams]]\nname = \"corp\"\nprotocol = \"lmtp\"\nhost = \"127.0.0.1\"\nport = {port}\n\
         tls = \"none\"\ntimeout_secs = 5\n"
    );
    let route = "deliver_to = { forward = \"carol@corp.example\", via = \"corp\" }";
    let s = setup_with("deferred", "delete = \"after-delivery\"", route, &global).await;
    for i in 0..3 {
        s.up.deliver("remote", &message(&format!("q{i}"), "")).await;
    }
    let account = s.connector.account("isp").await.unwrap();
    let e = s.connector.run_account(&account).await.unwrap_err();
    assert_eq!(e.kind(), "downstream", "{e}");
    assert_eq!(s.up.count("remote").await, 3, "nothing deleted upstream");
    assert_eq!(s.local.count("quarantine").await, 0, "a temporary failure is not a quarantine");
    let (status, seen) = s.connector.status("isp").await.unwrap();
    assert_eq!((status.unwrap().fetched_total, seen), (0, 0), "the deferred message stays unseen");
    // The server comes back: everything is forwarded once and deleted upstream.
    downstream_lmtp_on(&down, port).await;
    let r = s.run().await;
    assert_eq!((r.fetched, r.forwarded, r.deleted, r.duplicates), (3, 3, 3, 0), "{r}");
    assert_eq!(down.count("carol").await, 3);
}
