//! The connector's LMTP client against our own LMTP server (in process, on
//! 127.0.0.1 and on a UNIX socket): per-recipient replies and exact bodies.

mod common;

use std::sync::Arc;

use common::Fixture;
use pop3connex_core::config::connector::{DnsConfig, DownstreamConfig, DownstreamProtocol, DownstreamTls};
use pop3connex_core::config::LmtpConfig;
use pop3connex_core::connector::dns::Resolver;
use pop3connex_core::connector::mtasts::PolicyCache;
use pop3connex_core::connector::smtp::{deliver, Envelope, RcptOutcome};
use pop3connex_core::lmtp::LmtpContext;
use pop3connex_core::types::UserName;

fn downstream(host: String, port: Option<u16>) -> DownstreamConfig {
    DownstreamConfig {
        name: "local-lmtp".into(),
        protocol: DownstreamProtocol::Lmtp,
        host: Some(host),
        port,
        tls: Some(DownstreamTls::None),
        ca_file: None,
        helo: None,
        auth_user: None,
        auth_password: None,
        timeout_secs: 10,
    }
}

async fn body_of(f: &Fixture, user: &str, n: usize) -> String {
    let rec = f.mail.store().user(&UserName::parse(user).unwrap()).await.unwrap().unwrap();
    let metas = f.mail.store().messages(rec.mailbox.id).await.unwrap();
    let key = f.mail.data_key(&rec.mailbox).unwrap();
    String::from_utf8(f.mail.read_chunk(&key, &metas[n], 0).await.unwrap().to_vec()).unwrap()
}

fn ctx(f: &Fixture) -> Arc<LmtpContext> {
    Arc::new(LmtpContext::new(LmtpConfig::default(), "mx.test".into(), f.auth.clone()))
}

#[tokio::test]
async fn lmtp_over_tcp_per_recipient_outcomes_and_exact_body() {
    let f = Fixture::new("smtp-client-tcp").await;
    f.add_user("alice").await;
    f.add_user("bob").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (c, rx) = (ctx(&f), f.shutdown.subscribe());
    tokio::spawn(async move {
        let (s, peer) = listener.accept().await.unwrap();
        pop3connex_core::lmtp::serve(c, s, peer.to_string(), rx).await;
    });
    let resolver = Resolver::new(&DnsConfig::default()).unwrap();
    let sts = PolicyCache::new(&DnsConfig::default());
    let env = Envelope {
        mail_from: "s@example.org".into(),
        recipients: vec!["alice@x".into(), "nobody@x".into(), "bob@x".into()],
    };
    // Bare LF line ends and lines starting with "." survive the trip exactly.
    let msg = b"Subject: dots\n\n.leading dot\n..two\n.\nend";
    let out =
        deliver(&downstream("127.0.0.1".into(), Some(port)), "client.test", &resolver, &sts, &env, msg).await.unwrap();
    assert_eq!(out[0], RcptOutcome::Accepted);
    assert!(matches!(&out[1], RcptOutcome::Permanent(m) if m.starts_with("550")), "{out:?}");
    assert_eq!(out[2], RcptOutcome::Accepted);
    assert_eq!(f.count("alice").await, 1);
    assert_eq!(f.count("bob").await, 1);
    assert_eq!(
        body_of(&f, "alice", 0).await,
        "Return-Path: <s@example.org>\r\nDelivered-To: alice@x\r\nSubject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n"
    );
}

#[tokio::test]
async fn lmtp_over_unix_socket() {
    let f = Fixture::new("smtp-client-unix").await;
    f.add_user("alice").await;
    let path = f.dir.join("lmtp.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (c, rx) = (ctx(&f), f.shutdown.subscribe());
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        pop3connex_core::lmtp::serve(c, s, "unix".into(), rx).await;
    });
    let resolver = Resolver::new(&DnsConfig::default()).unwrap();
    let sts = PolicyCache::new(&DnsConfig::default());
    let env = Envelope { mail_from: String::new(), recipients: vec!["alice@x".into()] };
    let d = downstream(format!("unix:{}", path.display()), None);
    let out =
        deliver(&d, "client.test", &resolver, &sts, &env, "Subject: ü\r\n\r\nGrüße\r\n".as_bytes()).await.unwrap();
    assert_eq!(out, vec![RcptOutcome::Accepted]);
    assert_eq!(f.count("alice").await, 1);
    assert!(body_of(&f, "alice", 0).await.ends_with("Subject: ü\r\n\r\nGrüße\r\n"));
}
