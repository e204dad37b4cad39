//! SCRAM-SHA-256 and -PLUS through real POP3 sessions, with a client
//! written from RFC 5802 in this file (independent of the server code).

mod common;
#[path = "refused/mod.rs"]
mod refused;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::{Client, Fixture, PASSWORD};
use hmac::{Hmac, Mac};
use pop3connex_core::config::AbuseConfig;
use pop3connex_core::config::Pop3Config;
use pop3connex_core::pop3::{ListenerKind, Pop3Context};
use pop3connex_core::security::{system_clock, Guard, SecurityState};
use pop3connex_core::types::UserName;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

/// Runs an AUTH exchange; returns the final status line.
async fn scram_login<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    mech: &str,
    user: &str,
    password: &str,
    gs2: &str,
    cb: &[u8],
    tamper: bool,
) -> String {
    let bare = format!("n={user},r=clientnonce123");
    let first = c.cmd(&format!("AUTH {mech} {}", B64.encode(format!("{gs2}{bare}")))).await;
    let Some(server_first) = first.strip_prefix("+ ") else { return first };
    let server_first = String::from_utf8(B64.decode(server_first).unwrap()).unwrap();
    let f: Vec<&str> = server_first.split(',').collect();
    let nonce = &f[0][2..];
    assert!(nonce.starts_with("clientnonce123"));
    let salt = B64.decode(&f[1][2..]).unwrap();
    let iter: u32 = f[2][2..].parse().unwrap();
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iter, &mut salted);
    let client_key = hmac(&salted, b"Client Key");
    let stored = Sha256::digest(&client_key);
    let without = format!("c={},r={nonce}", B64.encode([gs2.as_bytes(), cb].concat()));
    let auth = format!("{bare},{server_first},{without}");
    let sig = hmac(&stored, auth.as_bytes());
    let mut proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
    if tamper {
        proof[0] ^= 1;
    }
    let r = c.cmd(&B64.encode(format!("{without},p={}", B64.encode(&proof)))).await;
    let Some(server_final) = r.strip_prefix("+ ") else { return r };
    let server_key = hmac(&salted, b"Server Key");
    let expected = format!("v={}", B64.encode(hmac(&server_key, auth.as_bytes())));
    assert_eq!(String::from_utf8(B64.decode(server_final).unwrap()).unwrap(), expected, "server proves the key");
    c.cmd("").await
}

#[tokio::test]
async fn scram_sha_256_login_wrong_password_unknown_user_and_tampered_proof() {
    let f = Fixture::new("scram").await;
    f.add_user("alice").await;
    let cfg = Pop3Config { max_auth_failures: 10, ..Fixture::trusting_cfg() };
    let mut c = f.connect_pop3(f.pop3_ctx(cfg), ListenerKind::StartTls);
    c.line().await;
    let m = "SCRAM-SHA-256";
    assert_eq!(scram_login(&mut c, m, "alice", "wrong", "n,,", b"", false).await, "-ERR [AUTH] Authentication failed");
    assert_eq!(scram_login(&mut c, m, "ghost", "x", "n,,", b"", false).await, "-ERR [AUTH] Authentication failed");
    assert_eq!(scram_login(&mut c, m, "alice", PASSWORD, "n,,", b"", true).await, "-ERR [AUTH] Authentication failed");
    // A "p=" flag on the non-PLUS mechanism is refused.
    assert!(scram_login(&mut c, m, "alice", PASSWORD, "p=tls-exporter,,", b"", false).await.starts_with("-ERR"));
    let ok = scram_login(&mut c, m, "alice", PASSWORD, "n,,", b"", false).await;
    assert!(ok.starts_with("+OK"), "{ok}");
}

#[tokio::test]
async fn unknown_user_gets_a_stable_salt() {
    let f = Fixture::new("scram-salt").await;
    let mut salts = Vec::new();
    for _ in 0..2 {
        let mut c = f.connect_pop3(f.pop3_ctx(Fixture::trusting_cfg()), ListenerKind::StartTls);
        c.line().await;
        let r = c.cmd(&format!("AUTH SCRAM-SHA-256 {}", B64.encode("n,,n=ghost,r=abc"))).await;
        let sf = String::from_utf8(B64.decode(r.strip_prefix("+ ").unwrap()).unwrap()).unwrap();
        salts.push(sf.split(',').nth(1).unwrap().to_owned());
    }
    assert_eq!(salts[0], salts[1]);
}

/// A TLS 1.3 session (implicit TLS) and its `tls-exporter` binding data.
async fn tls13_client(
    f: &Fixture,
    ctx: Arc<Pop3Context>,
) -> (Client<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>>, Vec<u8>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(pop3connex_core::pop3::serve(
        ctx,
        server,
        "127.0.0.1:4000".parse().unwrap(),
        ListenerKind::ImplicitTls,
        f.shutdown.subscribe(),
    ));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(f.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), client)
        .await
        .unwrap();
    let exporter = tls.get_ref().1.export_keying_material(vec![0u8; 32], b"EXPORTER-Channel-Binding", None).unwrap();
    let mut c = Client::new(tls);
    c.line().await;
    (c, exporter)
}

#[tokio::test]
async fn scram_plus_with_tls_exporter_and_downgrade_detection() {
    let f = Fixture::new("scram-plus").await;
    f.add_user("alice").await;
    let cfg = Pop3Config { max_auth_failures: 10, ..Pop3Config::default() };
    let ctx = f.pop3_ctx(cfg);
    let (mut c, exporter) = tls13_client(&f, ctx).await;
    assert!(c.cmd("CAPA").await.starts_with("+OK"));
    let caps = c.body().await;
    assert!(caps.contains(&"SASL SCRAM-SHA-256-PLUS SCRAM-SHA-256 PLAIN".to_owned()), "{caps:?}");
    let plus = "SCRAM-SHA-256-PLUS";
    let gs2 = "p=tls-exporter,,";
    // Wrong binding data (as a man in the middle would have) fails.
    assert!(scram_login(&mut c, plus, "alice", PASSWORD, gs2, &[0u8; 32], false).await.starts_with("-ERR [AUTH]"));
    // "y": client supports binding but believes the server does not.
    assert!(scram_login(&mut c, "SCRAM-SHA-256", "alice", PASSWORD, "y,,", b"", false).await.starts_with("-ERR"));
    let ok = scram_login(&mut c, plus, "alice", PASSWORD, gs2, &exporter, false).await;
    assert!(ok.starts_with("+OK"), "{ok}");
}

/// Every line the server sends during a SCRAM exchange, with the random
/// server part of the nonce masked (it differs on every run by design).
/// Stops after server-final when `stop_at_server_final`.
async fn scram_transcript<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    mech: &str,
    user: &str,
    password: &str,
    gs2: &str,
    cb: &[u8],
    stop_at_server_final: bool,
) -> Vec<String> {
    let bare = format!("n={user},r=clientnonce123");
    let first = c.cmd(&format!("AUTH {mech} {}", B64.encode(format!("{gs2}{bare}")))).await;
    let Some(server_first) = first.strip_prefix("+ ") else { return vec![first] };
    let server_first = String::from_utf8(B64.decode(server_first).unwrap()).unwrap();
    let f: Vec<&str> = server_first.split(',').collect();
    let nonce = &f[0][2..];
    let masked = format!("+ r=clientnonce123<server nonce>,{}", f[1..].join(","));
    let salt = B64.decode(&f[1][2..]).unwrap();
    let iter: u32 = f[2][2..].parse().unwrap();
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iter, &mut salted);
    let client_key = hmac(&salted, b"Client Key");
    let stored = Sha256::digest(&client_key);
    let without = format!("c={},r={nonce}", B64.encode([gs2.as_bytes(), cb].concat()));
    let auth = format!("{bare},{server_first},{without}");
    let sig = hmac(&stored, auth.as_bytes());
    let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
    let r = c.cmd(&B64.encode(format!("{without},p={}", B64.encode(&proof)))).await;
    let mut lines = vec![masked, r.clone()];
    if r.starts_with("+ ") && !stop_at_server_final {
        lines.push(c.cmd("").await);
    }
    lines
}

#[tokio::test]
async fn scram_locked_disabled_or_expired_account_answers_like_wrong_proof() {
    for how in refused::ALL {
        let f = Fixture::new("scram-refused").await;
        f.add_user("alice").await;
        let (ctx, _) = refused::context(&f, "alice", how).await;
        let mut c = f.connect_pop3(ctx.clone(), ListenerKind::StartTls);
        c.line().await;
        let m = "SCRAM-SHA-256";
        let right = scram_transcript(&mut c, m, "alice", PASSWORD, "n,,", b"", false).await;
        let wrong = scram_transcript(&mut c, m, "alice", "wrong password", "n,,", b"", false).await;
        assert_eq!(right, wrong, "{how:?}: the correct password is answered like a wrong one");
        assert_eq!(right.len(), 2, "{how:?}: no server-final: {right:?}");
        assert!(right[1].starts_with("-ERR [AUTH] Authentication failed"), "{how:?}: {right:?}");

        // The same over TLS 1.3 with SCRAM-SHA-256-PLUS.
        let (mut c, exporter) = tls13_client(&f, ctx).await;
        let (plus, gs2) = ("SCRAM-SHA-256-PLUS", "p=tls-exporter,,");
        let right = scram_transcript(&mut c, plus, "alice", PASSWORD, gs2, &exporter, false).await;
        let wrong = scram_transcript(&mut c, plus, "alice", "wrong password", gs2, &exporter, false).await;
        assert_eq!(right, wrong, "{how:?} (-PLUS)");
        assert_eq!(right.len(), 2, "{how:?} (-PLUS): {right:?}");
    }
}

#[tokio::test]
async fn scram_abandoned_after_server_signature_counts_as_failure() {
    let f = Fixture::new("scram-abandon").await;
    f.add_user("alice").await;
    let peer = "127.0.0.1".parse().unwrap();
    let ctx_with_guard = || {
        let abuse = AbuseConfig { lockout_after_failures: 1, ban_after_auth_failures: 1000, ..AbuseConfig::default() };
        let guard = Arc::new(Guard::new(abuse, Duration::ZERO, system_clock()));
        let ctx = Arc::new(Pop3Context {
            cfg: Pop3Config { max_auth_failures: 100, ..Fixture::trusting_cfg() },
            auth: f.auth.clone(),
            tls: f.tls.clone(),
            security: guard.clone(),
            max_commands_per_second: 1000,
            oauth: None,
        });
        (ctx, guard)
    };
    let m = "SCRAM-SHA-256";

    // Cancelled with "*" after server-final.
    let (ctx, guard) = ctx_with_guard();
    let mut c = f.connect_pop3(ctx, ListenerKind::StartTls);
    c.line().await;
    let t = scram_transcript(&mut c, m, "alice", PASSWORD, "n,,", b"", true).await;
    assert!(t[1].starts_with("+ "), "server-final expected: {t:?}");
    let r = c.cmd("*").await;
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    assert!(guard.account_locked("alice", peer), "the cancelled attempt counted as a failure");

    // Disconnected after server-final.
    let (ctx, guard) = ctx_with_guard();
    let mut c = f.connect_pop3(ctx, ListenerKind::StartTls);
    c.line().await;
    let t = scram_transcript(&mut c, m, "alice", PASSWORD, "n,,", b"", true).await;
    assert!(t[1].starts_with("+ "), "server-final expected: {t:?}");
    drop(c);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !guard.account_locked("alice", peer) {
        assert!(tokio::time::Instant::now() < deadline, "the abandoned attempt was not counted as a failure");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Cancelling before any proof was answered is not a failure.
    let (ctx, guard) = ctx_with_guard();
    let mut c = f.connect_pop3(ctx, ListenerKind::StartTls);
    c.line().await;
    assert!(c.cmd(&format!("AUTH {m} {}", B64.encode("n,,n=alice,r=abc"))).await.starts_with("+ "));
    assert_eq!(c.cmd("*").await, "-ERR Authentication cancelled");
    assert!(!guard.account_locked("alice", peer));
}

/// The salt announced in server-first for `user` (the exchange is then
/// cancelled, which is not a failure).
async fn announced_salt<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Client<S>, user: &str) -> String {
    let r = c.cmd(&format!("AUTH SCRAM-SHA-256 {}", B64.encode(format!("n,,n={user},r=abc")))).await;
    let sf = String::from_utf8(B64.decode(r.strip_prefix("+ ").unwrap()).unwrap()).unwrap();
    assert_eq!(c.cmd("*").await, "-ERR Authentication cancelled");
    sf.split(',').nth(1).unwrap().to_owned()
}

#[tokio::test]
async fn imported_user_fake_salt_is_derived_from_the_normalised_name() {
    let f = Fixture::new("scram-salt-imported").await;
    let carol = UserName::parse("carol").unwrap();
    // Imported from Dovecot: a hash, no SCRAM keys yet.
    let hash = "{SHA512-CRYPT}$6$DAEBdnbM6x1qs1Zp$61UH.TYqGe1o4wPuELC1PJHFGN.eczraTrksAeTWd3Gpnaim7hyGbXA9b1rP4wGtu.AQHqM8B1R0wQa3Hyamc1";
    f.auth.import_user(&carol, hash).await.unwrap();
    let mut c = f.connect_pop3(f.pop3_ctx(Fixture::trusting_cfg()), ListenerKind::StartTls);
    c.line().await;
    let known = [
        announced_salt(&mut c, "carol").await,
        announced_salt(&mut c, "CAROL").await,
        announced_salt(&mut c, "Carol").await,
    ];
    assert!(known.iter().all(|s| *s == known[0]), "one salt for every spelling: {known:?}");
    // Unknown names follow the same rule: once carol is gone, every spelling
    // of "carol" still gets exactly the salt the imported account showed.
    f.mail.store().delete_user(&carol).await.unwrap();
    for spelling in ["carol", "CAROL", "cArOl"] {
        assert_eq!(announced_salt(&mut c, spelling).await, known[0], "{spelling}");
    }
}

#[tokio::test]
async fn scram_record_copied_onto_another_user_fails_to_open() {
    let f = Fixture::new("scram-swap").await;
    f.add_user("alice").await;
    f.add_user("bob").await;
    let cfg = Pop3Config { max_auth_failures: 10, ..Fixture::trusting_cfg() };
    let mut c = f.connect_pop3(f.pop3_ctx(cfg.clone()), ListenerKind::StartTls);
    c.line().await;
    let ok = scram_login(&mut c, "SCRAM-SHA-256", "bob", PASSWORD, "n,,", b"", false).await;
    assert!(ok.starts_with("+OK"), "{ok}");
    drop(c);
    // Both have the same password; alice's keys on bob's row must not open.
    let db = rusqlite::Connection::open(f.dir.join("t.db")).unwrap();
    db.execute("UPDATE users SET scram = (SELECT scram FROM users WHERE name = 'alice') WHERE name = 'bob'", [])
        .unwrap();
    let mut c = f.connect_pop3(f.pop3_ctx(cfg), ListenerKind::StartTls);
    c.line().await;
    let r = scram_login(&mut c, "SCRAM-SHA-256", "bob", PASSWORD, "n,,", b"", false).await;
    assert_eq!(r, "-ERR [AUTH] Authentication failed");
    let ok = scram_login(&mut c, "SCRAM-SHA-256", "alice", PASSWORD, "n,,", b"", false).await;
    assert!(ok.starts_with("+OK"), "alice's own record still opens: {ok}");
}
