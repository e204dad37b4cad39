//! In-process LMTP session tests.

mod common;

use common::Fixture;
use pop3connex_core::config::LmtpConfig;

async fn fixture(name: &str) -> Fixture {
    let f = Fixture::new(name).await;
    f.add_user("alice").await;
    f.add_user("bob").await;
    f
}

#[tokio::test]
async fn lhlo_capabilities_and_per_recipient_replies() {
    let f = fixture("lmtp-caps").await;
    let mut c = f.connect_lmtp(LmtpConfig::default());
    assert_eq!(c.line().await, "220 mx.test LMTP ready");
    assert_eq!(c.cmd("EHLO client").await, "500 5.5.1 This is LMTP: use LHLO");
    c.send("LHLO client\r\n").await;
    let mut caps = Vec::new();
    loop {
        let l = c.line().await;
        caps.push(l[4..].to_owned());
        if l.as_bytes()[3] == b' ' {
            break;
        }
    }
    for cap in ["PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME"] {
        assert!(caps.iter().any(|c| c == cap), "{caps:?}");
    }
    assert!(caps.iter().any(|c| c.starts_with("SIZE ")));
    // Pipelined transaction: one write, replies in order.
    c.send(concat!(
        "MAIL FROM:<sender@example.org> BODY=8BITMIME\r\n",
        "RCPT TO:<alice@example.org>\r\n",
        "RCPT TO:<nobody@example.org>\r\n",
        "RCPT TO:<bob+detail@example.org>\r\n",
        "DATA\r\n"
    ))
    .await;
    assert!(c.line().await.starts_with("250 2.1.0"));
    assert!(c.line().await.starts_with("250 2.1.5"));
    assert_eq!(c.line().await, "550 5.1.1 User unknown");
    assert!(c.line().await.starts_with("250 2.1.5"));
    assert!(c.line().await.starts_with("354"));
    c.send("Subject: hi\r\n\r\nbody\r\n..dot\r\n.\r\n").await;
    assert!(c.line().await.starts_with("250 2.0.0"), "alice");
    assert!(c.line().await.starts_with("250 2.0.0"), "bob");
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    assert_eq!(f.count("alice").await, 1);
    assert_eq!(f.count("bob").await, 1);
}

#[tokio::test]
async fn smuggling_sequences_neither_end_data_nor_run_as_commands() {
    let f = fixture("lmtp-smuggle").await;
    for evil in ["\n.\n", "\n.\r\n", "\r\n.\n"] {
        let mut c = f.connect_lmtp(LmtpConfig::default());
        c.line().await;
        c.send("LHLO x\r\n").await;
        while c.line().await.starts_with("250-") {}
        assert!(c.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
        assert!(c.cmd("RCPT TO:<alice@x>").await.starts_with("250"));
        assert!(c.cmd("DATA").await.starts_with("354"));
        c.send(&format!(
            "Subject: x\r\n\r\nhello{evil}MAIL FROM:<evil@example.org>\r\nRCPT TO:<bob@x>\r\nDATA\r\nspoofed\r\n.\r\n"
        ))
        .await;
        let r = c.line().await;
        assert!(r.starts_with("550 5.6.0"), "{evil:?}: {r}");
        assert_eq!(c.cmd("NOOP").await, "250 2.0.0 OK", "{evil:?}: the smuggled commands were never run");
    }
    assert_eq!(f.count("alice").await, 0);
    assert_eq!(f.count("bob").await, 0, "nothing smuggled into bob's mailbox");
}

#[tokio::test]
async fn oversize_message_gets_552_and_session_continues() {
    let f = fixture("lmtp-size").await;
    let cfg = LmtpConfig { max_message_size: 1024, ..LmtpConfig::default() };
    let mut c = f.connect_lmtp(cfg);
    c.line().await;
    c.send("LHLO x\r\n").await;
    while c.line().await.starts_with("250-") {}
    assert!(c.cmd("MAIL FROM:<a@example.org> SIZE=5000").await.starts_with("552"));
    assert!(c.cmd("MAIL FROM:<a@example.org>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@x>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<bob@x>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(&format!("{}\r\n.\r\n", "x".repeat(5000))).await;
    assert!(c.line().await.starts_with("552 5.3.4"));
    assert!(c.line().await.starts_with("552 5.3.4"));
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 OK");
    assert_eq!(f.count("alice").await, 0);
}

#[tokio::test]
async fn sequence_errors_and_garbage() {
    let f = fixture("lmtp-seq").await;
    let mut c = f.connect_lmtp(LmtpConfig::default());
    c.line().await;
    assert!(c.cmd("MAIL FROM:<a@b>").await.starts_with("503"), "LHLO first");
    c.send("LHLO x\r\n").await;
    while c.line().await.starts_with("250-") {}
    assert!(c.cmd("RCPT TO:<alice@x>").await.starts_with("503"));
    assert!(c.cmd("DATA").await.starts_with("503"));
    assert!(c.cmd("\u{1}\u{2}garbage").await.starts_with("500"));
    assert!(c.cmd("MAIL FROM:<a@b>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("503"), "no recipients");
    assert!(c.cmd("RSET").await.starts_with("250"));
    assert!(c.cmd("STARTTLS").await.starts_with("502"));
}

#[tokio::test]
async fn delivered_message_has_return_path_and_exact_body() {
    let f = fixture("lmtp-body").await;
    let mut c = f.connect_lmtp(LmtpConfig::default());
    c.line().await;
    c.send("LHLO x\r\n").await;
    while c.line().await.starts_with("250-") {}
    c.cmd("MAIL FROM:<s@example.org>").await;
    c.cmd("RCPT TO:<alice@x>").await;
    c.cmd("DATA").await;
    c.send("A: b\r\n\r\n..x\r\n\r\n.\r\n").await;
    assert!(c.line().await.starts_with("250 2.0.0"));
    let rec = f.mail.store().user(&pop3connex_core::types::UserName::parse("alice").unwrap()).await.unwrap().unwrap();
    let metas = f.mail.store().messages(rec.mailbox.id).await.unwrap();
    let key = f.mail.data_key(&rec.mailbox).unwrap();
    let body = f.mail.read_chunk(&key, &metas[0], 0).await.unwrap();
    assert_eq!(
        String::from_utf8(body.to_vec()).unwrap(),
        "Return-Path: <s@example.org>\r\nDelivered-To: alice@x\r\nA: b\r\n\r\n.x\r\n\r\n"
    );
    assert_eq!(metas[0].size as usize, body.len());
}

// ---- Limits found by an outside attack: slowloris, in-flight memory, SIZE
// ---- overflow, `+` in user names.

use std::sync::Arc;
use std::time::Duration;

use common::Client;
use pop3connex_core::lmtp::LmtpContext;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::time::Instant;

async fn greeted(c: &mut Client<DuplexStream>) {
    assert_eq!(c.line().await, "220 mx.test LMTP ready");
    c.send("LHLO x\r\n").await;
    while c.line().await.starts_with("250-") {}
}

/// Sends one byte every `every` (never a line end) until the server answers;
/// returns that answer, how long after the call it came, and whether the
/// server then closed the connection.
async fn drip_until_answered(c: Client<DuplexStream>, every: Duration) -> (String, Duration, bool) {
    let start = Instant::now();
    let (r, mut w) = tokio::io::split(c.io);
    let dripper = tokio::spawn(async move {
        // 200 drips: far beyond any deadline under test.
        for _ in 0..200 {
            tokio::time::sleep(every).await;
            if w.write_all(b"x").await.is_err() {
                break;
            }
        }
        w
    });
    let mut r = BufReader::new(r);
    let mut answer = String::new();
    r.read_line(&mut answer).await.unwrap();
    let at = start.elapsed();
    let mut rest = String::new();
    let closed = r.read_line(&mut rest).await.unwrap() == 0;
    dripper.abort();
    (answer.trim_end().to_owned(), at, closed)
}

fn slow_cfg() -> LmtpConfig {
    LmtpConfig { timeout_secs: 300, ..LmtpConfig::default() }
}

#[tokio::test(start_paused = true)]
async fn slowloris_partial_command_line_is_closed_at_the_deadline() {
    let f = fixture("lmtp-slow-cmd").await;
    let mut c = f.connect_lmtp(slow_cfg());
    greeted(&mut c).await;
    let (answer, at, closed) = drip_until_answered(c, Duration::from_secs(10)).await;
    assert!(answer.starts_with("421 4.4.2"), "{answer}");
    assert!(at >= Duration::from_secs(299) && at <= Duration::from_secs(301), "closed after {at:?}, not at 300 s");
    assert!(closed, "connection closed after the 421");
}

#[tokio::test(start_paused = true)]
async fn slowloris_data_drip_is_closed_at_the_rate_deadline() {
    let f = fixture("lmtp-slow-data").await;
    let mut c = f.connect_lmtp(slow_cfg());
    greeted(&mut c).await;
    assert!(c.cmd("MAIL FROM:<s@example.org>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@x>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    let (answer, at, closed) = drip_until_answered(c, Duration::from_secs(10)).await;
    // 30 bytes at the default 16 KiB/s minimum rate add about 2 ms.
    assert!(answer.starts_with("421 4.4.2"), "{answer}");
    assert!(at >= Duration::from_secs(299) && at <= Duration::from_secs(301), "closed after {at:?}, not at 300 s");
    assert!(closed);
    assert_eq!(f.count("alice").await, 0, "nothing delivered from a timed-out DATA");
}

#[tokio::test(start_paused = true)]
async fn slow_but_steady_data_may_outlast_the_timeout() {
    let f = fixture("lmtp-steady").await;
    let cfg = LmtpConfig { timeout_secs: 300, data_min_rate: 1024, ..LmtpConfig::default() };
    let mut c = f.connect_lmtp(cfg);
    greeted(&mut c).await;
    c.cmd("MAIL FROM:<s@example.org>").await;
    c.cmd("RCPT TO:<alice@x>").await;
    assert!(c.cmd("DATA").await.starts_with("354"));
    let start = Instant::now();
    // 2 KiB a second for 400 s: twice the minimum rate, longer than timeout_secs.
    let line = format!("{}\r\n", "y".repeat(2046));
    for _ in 0..400 {
        c.send(&line).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(start.elapsed() > Duration::from_secs(300));
    // Real time for the commit: the store's own threads do not hold the
    // paused clock back.
    tokio::time::resume();
    c.send(".\r\n").await;
    let r = c.line().await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    assert_eq!(f.count("alice").await, 1);
}

#[tokio::test(start_paused = true)]
async fn idle_sessions_are_closed_first_at_the_connection_limit() {
    let f = fixture("lmtp-busy").await;
    let ctx = f.lmtp_ctx(LmtpConfig { timeout_secs: 300, max_connections: 2, ..LmtpConfig::default() });
    let mut idle = f.connect_lmtp_to(ctx.clone());
    greeted(&mut idle).await;
    let idle_since = Instant::now();
    // Below the limit an idle session keeps its full timeout.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let mut newcomer = f.connect_lmtp_to(ctx.clone());
    assert_eq!(newcomer.line().await, "220 mx.test LMTP ready");
    // The last slot is taken: the session idle for 30 s goes now.
    assert!(idle.line().await.starts_with("421 4.4.2"));
    let at = idle_since.elapsed();
    assert!(at >= Duration::from_secs(30) && at <= Duration::from_secs(31), "idle session closed after {at:?}");
    assert_eq!(idle.line().await, "", "closed");
    // The newcomer works normally.
    newcomer.send("LHLO x\r\n").await;
    while newcomer.line().await.starts_with("250-") {}
    assert_eq!(newcomer.cmd("NOOP").await, "250 2.0.0 OK");
}

/// Waits (briefly, on the paused clock's terms) until the budget has less
/// than `below` octets left.
async fn budget_drops_below(ctx: &Arc<LmtpContext>, below: u64) {
    for _ in 0..1000 {
        if ctx.data_budget.available() < below {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("budget still at {}", ctx.data_budget.available());
}

async fn budget_back_to(ctx: &Arc<LmtpContext>, full: u64) {
    for _ in 0..1000 {
        if ctx.data_budget.available() == full {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("budget not released: {} of {full}", ctx.data_budget.available());
}

#[tokio::test]
async fn inflight_data_budget_answers_452_while_another_transaction_holds_it() {
    let f = fixture("lmtp-budget").await;
    const BUDGET: u64 = 100_000;
    let ctx = f.lmtp_ctx(LmtpConfig { max_message_size: 80_000, max_inflight_data: BUDGET, ..LmtpConfig::default() });
    let mut first = f.connect_lmtp_to(ctx.clone());
    greeted(&mut first).await;
    first.cmd("MAIL FROM:<s@example.org>").await;
    first.cmd("RCPT TO:<alice@x>").await;
    assert!(first.cmd("DATA").await.starts_with("354"));
    let chunk = format!("{}\r\n", "a".repeat(998));
    first.send(&chunk.repeat(70)).await;
    budget_drops_below(&ctx, BUDGET - 70_000).await;

    let mut second = f.connect_lmtp_to(ctx.clone());
    greeted(&mut second).await;
    // Announced size that does not fit now: refused at MAIL.
    assert_eq!(second.cmd("MAIL FROM:<s@example.org> SIZE=40000").await, "452 4.3.1 Insufficient system storage");
    // Unannounced: refused per recipient after the data, never buffered.
    assert!(second.cmd("MAIL FROM:<s@example.org>").await.starts_with("250"));
    assert!(second.cmd("RCPT TO:<bob@x>").await.starts_with("250"));
    assert!(second.cmd("RCPT TO:<alice@x>").await.starts_with("250"));
    assert!(second.cmd("DATA").await.starts_with("354"));
    second.send(&format!("{}.\r\n", chunk.repeat(40))).await;
    assert_eq!(second.line().await, "452 4.3.1 Insufficient system storage");
    assert_eq!(second.line().await, "452 4.3.1 Insufficient system storage");
    assert_eq!(second.cmd("NOOP").await, "250 2.0.0 OK", "the session continues");

    first.send(".\r\n").await;
    assert!(first.line().await.starts_with("250 2.0.0"));
    budget_back_to(&ctx, BUDGET).await;

    // Now the second succeeds, announced or not.
    assert!(second.cmd("MAIL FROM:<s@example.org> SIZE=40000").await.starts_with("250"));
    assert!(second.cmd("RCPT TO:<bob@x>").await.starts_with("250"));
    assert!(second.cmd("DATA").await.starts_with("354"));
    second.send(&format!("{}.\r\n", chunk.repeat(40))).await;
    assert!(second.line().await.starts_with("250 2.0.0"));
    budget_back_to(&ctx, BUDGET).await;
    assert_eq!(f.count("alice").await, 1);
    assert_eq!(f.count("bob").await, 1);

    // A client that disconnects inside DATA gives its share back.
    let mut quitter = f.connect_lmtp_to(ctx.clone());
    greeted(&mut quitter).await;
    quitter.cmd("MAIL FROM:<s@example.org>").await;
    quitter.cmd("RCPT TO:<alice@x>").await;
    assert!(quitter.cmd("DATA").await.starts_with("354"));
    quitter.send(&chunk.repeat(50)).await;
    budget_drops_below(&ctx, BUDGET - 50_000).await;
    drop(quitter);
    budget_back_to(&ctx, BUDGET).await;
    assert_eq!(f.count("alice").await, 1);
}

#[tokio::test]
async fn mail_with_overflowing_size_gets_552() {
    let f = fixture("lmtp-size-overflow").await;
    let mut c = f.connect_lmtp(LmtpConfig::default());
    greeted(&mut c).await;
    for size in [
        "999999999999999999999999999",
        "18446744073709551616",
        "18446744073709551615",
        "99999999999999999999999999999999999999999999999999",
    ] {
        assert_eq!(
            c.cmd(&format!("MAIL FROM:<s@x> SIZE={size}")).await,
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "SIZE={size}"
        );
    }
    assert!(c.cmd("MAIL FROM:<s@x> SIZE=1000").await.starts_with("250"), "no transaction was left open");
}

#[tokio::test]
async fn plus_in_user_names_resolves_exact_match_before_detail() {
    let f = fixture("lmtp-plus").await;
    for u in ["sales", "sales+eu", "ceo", "ceo@corp.example"] {
        f.add_user(u).await;
    }
    let mut c = f.connect_lmtp(LmtpConfig::default());
    greeted(&mut c).await;
    let deliver = |rcpt: &'static str| format!("MAIL FROM:<s@example.net>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n");
    for (rcpt, expect) in [
        ("sales+eu@example.com", "250 2.1.5"),
        ("ceo+x@corp.example", "250 2.1.5"),
        ("ceo+y@other.example", "250 2.1.5"),
        ("sales+asia@example.com", "250 2.1.5"),
    ] {
        c.send(&deliver(rcpt)).await;
        assert!(c.line().await.starts_with("250 2.1.0"));
        assert!(c.line().await.starts_with(expect), "{rcpt}");
        assert!(c.line().await.starts_with("354"));
        c.send(&format!("Subject: for {rcpt}\r\n\r\nx\r\n.\r\n")).await;
        assert!(c.line().await.starts_with("250 2.0.0"), "{rcpt}");
    }
    // sales+eu@… reaches the user `sales+eu`, not `sales` (confidentiality).
    assert_eq!(f.count("sales+eu").await, 1);
    // ceo+x@corp.example -> ceo@corp.example before ceo; ceo+y@other.example -> ceo.
    assert_eq!(f.count("ceo@corp.example").await, 1);
    assert_eq!(f.count("ceo").await, 1);
    // sales+asia has no user of its own: detail stripping reaches `sales`.
    assert_eq!(f.count("sales").await, 1);
}
