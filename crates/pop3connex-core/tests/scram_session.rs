//! SCRAM-SHA-256 and -PLUS through real POP3 sessions, with a client
//! written from RFC 5802 in this file (independent of the server code).

mod common;

use std::sync::Arc;

use base64::Engine as _;
use common::{Client, Fixture, PASSWORD};
use hmac::{Hmac, Mac};
use pop3connex_core::config::Pop3Config;
use pop3connex_core::pop3::ListenerKind;
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

#[tokio::test]
async fn scram_plus_with_tls_exporter_and_downgrade_detection() {
    let f = Fixture::new("scram-plus").await;
    f.add_user("alice").await;
    let cfg = Pop3Config { max_auth_failures: 10, ..Pop3Config::default() };
    let ctx = f.pop3_ctx(cfg);
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
