//! In-process POP3 session tests: raw transcripts over in-memory pipes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::{Client, Fixture, PASSWORD};
use pop3connex_core::config::Pop3Config;
use pop3connex_core::pop3::ListenerKind;

const MSG1: &str =
    "Subject: one\r\nFrom: a@example.org\r\n\r\nfirst body\r\n.hidden dot line\r\n..two dots\r\nlast\r\n";
const MSG2: &str = "Subject: two\r\n\r\nline1\r\nline2\r\nline3\r\n";

async fn fixture_with_mail(name: &str) -> Fixture {
    let f = Fixture::new(name).await;
    f.add_user("alice").await;
    f.deliver("alice", MSG1.as_bytes()).await;
    f.deliver("alice", MSG2.as_bytes()).await;
    f
}

fn unstuff(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{}\r\n", l.strip_prefix('.').unwrap_or(l))).collect()
}

#[tokio::test]
async fn full_transcript_with_exact_sizes_stuffing_top_and_quit_update() {
    let f = fixture_with_mail("full").await;
    let mut c = f.connect_pop3(f.pop3_ctx(Fixture::trusting_cfg()), ListenerKind::StartTls);
    let greeting = c.line().await;
    assert_eq!(greeting, "+OK POP3 server ready", "no product or version disclosed");
    c.login("alice").await;
    let total = MSG1.len() + MSG2.len();
    assert_eq!(c.cmd("STAT").await, format!("+OK 2 {total}"));
    assert!(c.cmd("LIST").await.starts_with("+OK 2 messages"));
    assert_eq!(c.body().await, vec![format!("1 {}", MSG1.len()), format!("2 {}", MSG2.len())]);
    assert_eq!(c.cmd("LIST 2").await, format!("+OK 2 {}", MSG2.len()));
    assert!(c.cmd("LIST 3").await.starts_with("-ERR"));
    assert!(c.cmd("UIDL").await.starts_with("+OK"));
    let uidls = c.body().await;
    assert_eq!(uidls.len(), 2);
    let u1 = uidls[0].split(' ').nth(1).unwrap().to_owned();
    assert!(u1.len() <= 70 && u1.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    assert_eq!(c.cmd("UIDL 1").await, format!("+OK 1 {u1}"));

    assert_eq!(c.cmd("RETR 1").await, format!("+OK {} octets", MSG1.len()));
    let body = c.body().await;
    assert!(body.contains(&"..hidden dot line".to_owned()), "dot-stuffed on the wire: {body:?}");
    assert!(body.contains(&"...two dots".to_owned()));
    assert_eq!(unstuff(&body), MSG1, "bytes match after unstuffing");

    assert!(c.cmd("TOP 2 1").await.starts_with("+OK"));
    assert_eq!(c.body().await, vec!["Subject: two", "", "line1"]);
    assert!(c.cmd("TOP 2 0").await.starts_with("+OK"));
    assert_eq!(c.body().await, vec!["Subject: two", ""]);

    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    assert!(c.cmd("DELE 1").await.starts_with("-ERR"), "already deleted");
    assert!(c.cmd("RETR 1").await.starts_with("-ERR"));
    assert_eq!(c.cmd("STAT").await, format!("+OK 1 {}", MSG2.len()));
    assert!(c.cmd("RSET").await.starts_with("+OK"));
    assert_eq!(c.cmd("STAT").await, format!("+OK 2 {total}"));
    assert!(c.cmd("DELE 2").await.starts_with("+OK"));
    assert_eq!(f.count("alice").await, 2, "nothing deleted before QUIT");
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    assert_eq!(c.line().await, "", "server closes after QUIT");
    assert_eq!(f.count("alice").await, 1);

    // UIDL of the remaining message is unchanged in a new session.
    let mut c = f.connect_pop3(f.pop3_ctx(Fixture::trusting_cfg()), ListenerKind::StartTls);
    c.line().await;
    c.login("alice").await;
    assert_eq!(c.cmd("UIDL 1").await, format!("+OK 1 {u1}"));
}

#[tokio::test]
async fn dropped_connection_deletes_nothing_and_releases_the_lock() {
    let f = fixture_with_mail("drop").await;
    let ctx = f.pop3_ctx(Fixture::trusting_cfg());
    let mut c = f.connect_pop3(ctx.clone(), ListenerKind::StartTls);
    c.line().await;
    c.login("alice").await;
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    assert!(c.cmd("DELE 2").await.starts_with("+OK"));

    // A second session while the first holds the maildrop.
    let mut c2 = f.connect_pop3(ctx.clone(), ListenerKind::StartTls);
    c2.line().await;
    c2.cmd("USER alice").await;
    let r = c2.cmd(&format!("PASS {PASSWORD}")).await;
    assert!(r.starts_with("-ERR [IN-USE]"), "{r}");

    drop(c);
    // The lock goes when the session task notices the EOF.
    let mut ok = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        c2.cmd("USER alice").await;
        if c2.cmd(&format!("PASS {PASSWORD}")).await.starts_with("+OK") {
            ok = true;
            break;
        }
    }
    assert!(ok, "lock released after the first session dropped");
    assert_eq!(c2.cmd("STAT").await.split(' ').nth(1), Some("2"), "no deletes applied");
}

#[tokio::test]
async fn unknown_user_and_wrong_password_get_identical_replies() {
    let f = fixture_with_mail("enum").await;
    let cfg = Pop3Config { max_auth_failures: 10, ..Fixture::trusting_cfg() };
    let mut c = f.connect_pop3(f.pop3_ctx(cfg), ListenerKind::StartTls);
    c.line().await;
    let u1 = c.cmd("USER alice").await;
    let p1 = c.cmd("PASS wrong").await;
    let u2 = c.cmd("USER nobody").await;
    let p2 = c.cmd("PASS wrong").await;
    assert_eq!(u1, u2);
    assert_eq!(p1, p2);
    assert_eq!(p1, "-ERR [AUTH] Authentication failed");
}

#[tokio::test]
async fn plaintext_credentials_refused_without_tls() {
    let f = fixture_with_mail("plain").await;
    let mut c = f.connect_pop3(f.pop3_ctx(Pop3Config::default()), ListenerKind::StartTls);
    c.line().await;
    assert!(c.cmd("CAPA").await.starts_with("+OK"));
    let caps = c.body().await;
    assert!(caps.contains(&"STLS".to_owned()));
    assert!(!caps.iter().any(|l| l == "USER" || l.starts_with("SASL")), "{caps:?}");
    assert!(!caps.iter().any(|l| l.starts_with("IMPLEMENTATION")));
    assert!(c.cmd("USER alice").await.starts_with("-ERR [AUTH]"));
    assert!(c.cmd(&format!("AUTH PLAIN {}", plain("alice", PASSWORD))).await.starts_with("-ERR [AUTH]"));
    assert!(c.cmd("STAT").await.starts_with("-ERR"));
    assert!(c.cmd("APOP alice 0123456789abcdef0123456789abcdef").await.starts_with("-ERR"));
}

fn plain(user: &str, pass: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"))
}

#[tokio::test]
async fn auth_plain_initial_response_continuation_cancel_and_bad_base64() {
    let f = fixture_with_mail("sasl").await;
    let cfg = Pop3Config { max_auth_failures: 10, max_bad_commands: 50, ..Fixture::trusting_cfg() };
    let ctx = f.pop3_ctx(cfg);
    let mut c = f.connect_pop3(ctx.clone(), ListenerKind::StartTls);
    c.line().await;
    assert!(c.cmd("AUTH").await.starts_with("+OK"));
    assert_eq!(c.body().await, vec!["SCRAM-SHA-256", "PLAIN"], "no -PLUS without TLS 1.3");
    assert!(c.cmd("AUTH PLAIN !!!notbase64").await.starts_with("-ERR"));
    assert_eq!(c.cmd("AUTH PLAIN").await, "+ ");
    assert!(c.cmd("*").await.starts_with("-ERR"), "cancel");
    assert_eq!(c.cmd("AUTH PLAIN =").await, "-ERR [AUTH] Authentication failed", "empty response is a failed login");
    assert_eq!(c.cmd("AUTH PLAIN").await, "+ ");
    assert!(c.cmd("%%%").await.starts_with("-ERR"), "bad base64 in continuation");
    assert!(c.cmd("AUTH CRAM-MD5").await.starts_with("-ERR"));
    assert_eq!(c.cmd(&format!("AUTH PLAIN {}", plain("alice", "nope"))).await, "-ERR [AUTH] Authentication failed");
    assert_eq!(c.cmd("AUTH PLAIN").await, "+ ");
    let r = c.cmd(&plain("alice", PASSWORD)).await;
    assert!(r.starts_with("+OK"), "{r}");
    assert!(c.cmd("STAT").await.starts_with("+OK 2 "));

    // authzid different from authcid (proxy login) is refused.
    let mut c = f.connect_pop3(ctx, ListenerKind::StartTls);
    c.line().await;
    let proxy = base64::engine::general_purpose::STANDARD.encode(format!("bob\0alice\0{PASSWORD}"));
    assert!(c.cmd(&format!("AUTH PLAIN {proxy}")).await.starts_with("-ERR [AUTH]"));
}

#[tokio::test]
async fn strict_message_numbers_and_bad_command_limit() {
    let f = fixture_with_mail("strict").await;
    let cfg = Pop3Config { max_bad_commands: 5, ..Fixture::trusting_cfg() };
    let mut c = f.connect_pop3(f.pop3_ctx(cfg), ListenerKind::StartTls);
    c.line().await;
    c.login("alice").await;
    for bad in ["RETR 0", "RETR -1", "RETR 1x", "DELE", "XYZZY"] {
        let r = c.cmd(bad).await;
        assert!(r.starts_with("-ERR"), "{bad}: {r}");
    }
    assert_eq!(c.line().await, "", "disconnected after too many bad commands");
    assert_eq!(f.count("alice").await, 2);
}

#[tokio::test]
async fn oversize_line_and_binary_garbage_are_answered() {
    let f = fixture_with_mail("garbage").await;
    let mut c = f.connect_pop3(f.pop3_ctx(Fixture::trusting_cfg()), ListenerKind::StartTls);
    c.line().await;
    c.send(&format!("{}\r\n", "A".repeat(100_000))).await;
    assert_eq!(c.line().await, "-ERR Line too long");
    c.io.get_mut().write_all(b"\x00\x01\xff\xfe\x80\r\n").await.unwrap();
    assert!(c.line().await.starts_with("-ERR"));
    c.login("alice").await;
}

use tokio::io::AsyncWriteExt;

#[tokio::test(start_paused = true)]
async fn preauth_timeout_closes_the_connection() {
    let f = Fixture::new("timeout").await;
    let cfg = Pop3Config { preauth_timeout_secs: 30, ..Pop3Config::default() };
    let mut c = f.connect_pop3(f.pop3_ctx(cfg), ListenerKind::StartTls);
    c.line().await;
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(c.line().await, "-ERR Disconnected: no login in time");
    assert_eq!(c.line().await, "");
}

/// Regression: the pre-auth limit used to restart on every read, so a
/// client trickling bytes (slow-loris) could stay unauthenticated forever.
#[tokio::test(start_paused = true)]
async fn preauth_deadline_counts_from_accept_not_from_the_last_byte() {
    let f = Fixture::new("slowloris").await;
    let cfg = Pop3Config { preauth_timeout_secs: 30, max_bad_commands: 100, ..Pop3Config::default() };
    let mut c = f.connect_pop3(f.pop3_ctx(cfg), ListenerKind::StartTls);
    c.line().await;
    let start = tokio::time::Instant::now();
    let mut closed = false;
    for _ in 0..60 {
        // Writes fail once the server has hung up; the goodbye is still
        // waiting to be read.
        let _ = c.io.get_mut().write_all(b"C").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = c.io.get_mut().write_all(b"APA\r\n").await;
        let l = c.line().await;
        if l == "-ERR Disconnected: no login in time" {
            closed = true;
            break;
        }
        assert!(l.starts_with("+OK"), "{l}");
        c.body().await;
    }
    assert!(closed, "still connected after a minute of trickling");
    assert!(start.elapsed() <= Duration::from_secs(32), "{:?}", start.elapsed());
}

#[tokio::test]
async fn shutdown_says_goodbye_and_applies_no_deletes() {
    let f = fixture_with_mail("shutdown").await;
    let mut c = f.connect_pop3(f.pop3_ctx(Fixture::trusting_cfg()), ListenerKind::StartTls);
    c.line().await;
    c.login("alice").await;
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    f.shutdown.send(true).unwrap();
    assert_eq!(c.line().await, "-ERR [SYS/TEMP] Server shutting down, try again later");
    assert_eq!(f.count("alice").await, 2);
}

#[tokio::test]
async fn tampered_record_is_an_error_never_other_mail() {
    let f = fixture_with_mail("tamper").await;
    // Swap the ciphertexts of the two messages, as an attacker with write
    // access to the database file might.
    let db = rusqlite::Connection::open(f.dir.join("t.db")).unwrap();
    let rows: Vec<(i64, Vec<u8>)> = db
        .prepare("SELECT message_id, data FROM message_chunks ORDER BY message_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    db.execute("UPDATE message_chunks SET data = ?1 WHERE message_id = ?2", rusqlite::params![rows[1].1, rows[0].0])
        .unwrap();
    db.execute("UPDATE message_chunks SET data = ?1 WHERE message_id = ?2", rusqlite::params![rows[0].1, rows[1].0])
        .unwrap();
    drop(db);
    let mut c = f.connect_pop3(f.pop3_ctx(Fixture::trusting_cfg()), ListenerKind::StartTls);
    c.line().await;
    c.login("alice").await;
    assert_eq!(c.cmd("RETR 1").await, "-ERR [SYS/PERM] Message cannot be read");
    assert_eq!(c.cmd("RETR 2").await, "-ERR [SYS/PERM] Message cannot be read");
    assert!(c.cmd("NOOP").await.starts_with("+OK"), "session survives");
}

#[tokio::test]
async fn retr_streams_a_multi_chunk_message() {
    let f = Fixture::new("big").await;
    f.add_user("alice").await;
    let mut big = String::from("Subject: big\r\n\r\n");
    for i in 0..20_000 {
        big.push_str(&format!(".line {i} with some padding to make it longer\r\n"));
    }
    f.deliver("alice", big.as_bytes()).await;
    let mut c = f.connect_pop3(f.pop3_ctx(Fixture::trusting_cfg()), ListenerKind::StartTls);
    c.line().await;
    c.login("alice").await;
    assert_eq!(c.cmd("RETR 1").await, format!("+OK {} octets", big.len()));
    assert_eq!(unstuff(&c.body().await), big);
}

#[tokio::test]
async fn stls_discards_pipelined_plaintext_and_is_refused_under_tls() {
    let f = fixture_with_mail("stls").await;
    let mut c = f.connect_pop3(f.pop3_ctx(Pop3Config::default()), ListenerKind::StartTls);
    c.line().await;
    // The injected CAPA and USER must never be answered.
    c.send("STLS\r\nCAPA\r\nUSER alice\r\n").await;
    assert_eq!(c.line().await, "+OK Begin TLS negotiation");
    let stream = c.io.into_inner();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(f.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, stream).await.expect("TLS handshake after STLS");
    let mut c = Client::new(tls);
    // First thing over TLS is the answer to our next command: nothing queued.
    assert!(c.cmd("NOOP").await.starts_with("-ERR"), "NOOP is not valid before login");
    assert!(c.cmd("CAPA").await.starts_with("+OK"));
    let caps = c.body().await;
    assert!(!caps.contains(&"STLS".to_owned()), "{caps:?}");
    assert!(caps.contains(&"USER".to_owned()));
    assert!(c.cmd("STLS").await.starts_with("-ERR"));
    c.login("alice").await;
}

use rustls_pki_types::pem::PemObject;

/// Regression: a line trickled one byte at a time, never completed, must not
/// keep the connection open past the pre-auth deadline either.
#[tokio::test(start_paused = true)]
async fn preauth_deadline_holds_within_an_unfinished_line() {
    let f = Fixture::new("slowline").await;
    let cfg = Pop3Config { preauth_timeout_secs: 10, ..Pop3Config::default() };
    let mut c = f.connect_pop3(f.pop3_ctx(cfg), ListenerKind::StartTls);
    c.line().await;
    let start = tokio::time::Instant::now();
    for _ in 0..40 {
        if c.io.get_mut().write_all(b"a").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if start.elapsed() > Duration::from_secs(11) {
            break;
        }
    }
    assert_eq!(c.line().await, "-ERR Disconnected: no login in time");
    assert!(start.elapsed() <= Duration::from_secs(12), "{:?}", start.elapsed());
}
