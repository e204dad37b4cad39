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
