//! Tests of the upstream session against scripted servers over real TCP
//! and TLS: certificates, pins, STLS, every login mechanism, hostile
//! replies and timeouts.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use super::framing::{parse_status, refused, Status, B64};
use super::*;
use crate::config::connector::{AccountConfig, UpstreamTls};
use crate::connector::tlsclient;
use crate::logtext::sanitize;
use crate::scram::{parse_client_first, ChannelBinding, ScramCredentials, ScramServer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;
use tokio_rustls::server::TlsStream as ServerTls;
use tokio_rustls::TlsAcceptor;

/// A CA, a server certificate for `names` and the CA file clients trust.
pub(crate) struct Pki {
    pub(crate) dir: PathBuf,
    pub(crate) ca_file: PathBuf,
    pub(crate) server: Arc<rustls::ServerConfig>,
    pub(crate) pin: String,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn pki(names: &[&str]) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, format!("test CA {n}"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let dir = std::env::temp_dir().join(format!("p3x-upstream-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let chain = vec![leaf_cert.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let hash = tlsclient::spki_sha256(&CertificateDer::from(leaf_cert.der().to_vec())).unwrap();
    let pin = format!("sha256/{}", B64.encode(hash));
    Pki { dir, ca_file, server: Arc::new(server), pin }
}

fn client_tls(p: &Pki, pins: &[String]) -> Arc<rustls::ClientConfig> {
    let roots = tlsclient::root_store(Some(&p.ca_file)).unwrap();
    Arc::new(tlsclient::client_config(roots, pins, &[]).unwrap())
}

fn account(port: u16, tls: UpstreamTls, auth: &str) -> AccountConfig {
    let tls = match tls {
        UpstreamTls::Implicit => "implicit",
        UpstreamTls::Starttls => "starttls",
    };
    let mut a = AccountConfig::from_toml(&format!(
        "name = \"t\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"{tls}\"\nuser = \"alice\"\n\
         password = \"env:UNUSED\"\nauth = \"{auth}\"\n[route]\ndeliver_to = {{ local = \"alice\" }}\n"
    ))
    .unwrap();
    a.timeout_secs = 5;
    a
}

fn password(p: &str) -> Credential {
    Credential::Password(Zeroizing::new(p.into()))
}

/// The server end of a test connection.
struct Peer {
    plain: Option<TcpStream>,
    tls: Option<ServerTls<TcpStream>>,
    acceptor: TlsAcceptor,
    buf: Vec<u8>,
}

impl Peer {
    async fn send(&mut self, data: &[u8]) {
        let r = match (&mut self.tls, &mut self.plain) {
            (Some(t), _) => t.write_all(data).await.and(t.flush().await),
            (None, Some(p)) => p.write_all(data).await,
            _ => unreachable!(),
        };
        let _ = r;
    }

    /// The next line from the client without CRLF; "" at EOF.
    async fn line(&mut self) -> String {
        loop {
            if let Some(p) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=p).collect();
                return String::from_utf8(line).unwrap().trim_end_matches(['\r', '\n']).to_owned();
            }
            let mut chunk = [0u8; 4096];
            let n = match (&mut self.tls, &mut self.plain) {
                (Some(t), _) => t.read(&mut chunk).await.unwrap_or(0),
                (None, Some(p)) => p.read(&mut chunk).await.unwrap_or(0),
                _ => unreachable!(),
            };
            if n == 0 {
                return String::new();
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn expect(&mut self, want: &str) {
        assert_eq!(self.line().await, want);
    }

    async fn starttls(&mut self) {
        let tcp = self.plain.take().unwrap();
        self.tls = Some(self.acceptor.accept(tcp).await.unwrap());
    }

    /// Greeting and CAPA for implicit TLS.
    async fn hello(&mut self, capa: &str) {
        self.send(b"+OK POP3 ready\r\n").await;
        self.expect("CAPA").await;
        self.send(format!("+OK\r\n{capa}.\r\n").as_bytes()).await;
    }
}

/// Runs `script` as the server of one connection (TLS first for
/// implicit mode); returns the port.
async fn serve<F, Fut>(p: &Pki, implicit: bool, script: F) -> (u16, tokio::task::JoinHandle<()>)
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = TlsAcceptor::from(p.server.clone());
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut peer = Peer { plain: Some(tcp), tls: None, acceptor, buf: Vec::new() };
        if implicit {
            let tcp = peer.plain.take().unwrap();
            match peer.acceptor.accept(tcp).await {
                Ok(t) => peer.tls = Some(t),
                Err(_) => return,
            }
        }
        script(peer).await;
    });
    (port, task)
}

/// A logged-in session (USER/PASS) against a server running `script`
/// after the login.
async fn logged_in<F, Fut>(script: F) -> (Session, tokio::task::JoinHandle<()>, Pki)
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let p = pki(&["localhost", "127.0.0.1"]);
    let (port, task) = serve(&p, true, |mut peer| async move {
        peer.hello("USER\r\n").await;
        peer.expect("USER alice").await;
        peer.send(b"+OK\r\n").await;
        peer.expect("PASS secret").await;
        peer.send(b"+OK logged in\r\n").await;
        script(peer).await;
    })
    .await;
    let a = account(port, UpstreamTls::Implicit, "auto");
    let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
    assert_eq!(s.login(&a, &password("secret")).await.unwrap(), "USER");
    (s, task, p)
}

#[tokio::test]
async fn implicit_tls_user_pass_list_retr_dele_quit() {
    let (mut s, task, _p) = logged_in(|mut peer| async move {
        peer.expect("UIDL").await;
        peer.send(b"+OK\r\n1 abc\r\n2 d-e_f\r\n.\r\n").await;
        peer.expect("LIST").await;
        peer.send(b"+OK 2 messages\r\n1 10\r\n2 200 extra\r\n.\r\n").await;
        peer.expect("RETR 1").await;
        peer.send(b"+OK 10 octets\r\nSubject: x\r\n\r\n..dot\r\nbare lf\n.\r\n").await;
        peer.expect("DELE 1").await;
        peer.send(b"+OK\r\n").await;
        peer.expect("QUIT").await;
        peer.send(b"+OK bye\r\n").await;
    })
    .await;
    assert_eq!(s.uidl_all().await.unwrap(), vec![(1, "abc".into()), (2, "d-e_f".into())]);
    assert_eq!(s.list_all().await.unwrap(), vec![(1, 10), (2, 200)]);
    assert_eq!(s.retr(1, 1024).await.unwrap(), b"Subject: x\r\n\r\n.dot\r\nbare lf\r\n");
    s.dele(1).await.unwrap();
    s.quit().await.unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn starttls_then_plain_and_errors_hide_the_password() {
    let p = pki(&["localhost", "127.0.0.1"]);
    let (port, task) = serve(&p, false, |mut peer| async move {
        peer.send(b"+OK plaintext greeting\r\n").await;
        peer.expect("STLS").await;
        peer.send(b"+OK begin TLS\r\n").await;
        peer.starttls().await;
        peer.expect("CAPA").await;
        peer.send(b"+OK\r\nSASL PLAIN\r\nUSER\r\n.\r\n").await;
        let line = peer.line().await;
        let b64 = line.strip_prefix("AUTH PLAIN ").unwrap();
        assert_eq!(B64.decode(b64).unwrap(), b"\0alice\0s3cr\xc3\xa9t");
        peer.send(b"-ERR [AUTH] wrong\x07 password\r\n").await;
    })
    .await;
    let a = account(port, UpstreamTls::Starttls, "auto");
    let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
    assert!(s.capabilities().iter().any(|c| c == "SASL PLAIN"));
    let e = s.login(&a, &password("s3cr\u{e9}t")).await.unwrap_err();
    assert_eq!(e.kind(), "auth");
    let text = e.to_string();
    assert!(text.contains("[AUTH] wrong? password") && !text.contains("s3cr"), "{text}");
    assert_eq!(s.uidl_all().await.unwrap_err().kind(), "io", "poisoned after a failed login");
    task.await.unwrap();
}

/// Runs a SCRAM-SHA-256 server from `crate::scram` (optionally with a
/// forged server signature).
async fn scram_server(mut peer: Peer, forge: bool) {
    peer.hello("SASL SCRAM-SHA-256 PLAIN\r\n").await;
    let line = peer.line().await;
    let first = B64.decode(line.strip_prefix("AUTH SCRAM-SHA-256 ").unwrap()).unwrap();
    let cb = ChannelBinding { plus: false, exporter: None };
    let (gs2, bare, user, nonce) = parse_client_first(&first, &cb).unwrap();
    assert_eq!(user, "alice");
    let creds = ScramCredentials::derive(b"pencil", 4096).unwrap();
    let (server, server_first) = ScramServer::start(gs2, bare, user, &nonce, creds, &cb);
    peer.send(format!("+ {}\r\n", B64.encode(server_first)).as_bytes()).await;
    let client_final = B64.decode(peer.line().await).unwrap();
    let mut server_final = server.finish(&client_final).unwrap();
    if forge {
        server_final = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".to_vec();
    }
    peer.send(format!("+ {}\r\n", B64.encode(server_final)).as_bytes()).await;
    let answer = peer.line().await;
    if forge {
        assert_eq!(answer, "*");
        peer.send(b"-ERR cancelled\r\n").await;
    } else {
        assert_eq!(answer, "");
        peer.send(b"+OK welcome\r\n").await;
    }
}

#[tokio::test]
async fn scram_sha_256_against_our_server_and_forged_signature() {
    for forge in [false, true] {
        let p = pki(&["localhost", "127.0.0.1"]);
        let (port, task) = serve(&p, true, move |peer| scram_server(peer, forge)).await;
        let a = account(port, UpstreamTls::Implicit, "auto");
        let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
        let r = s.login(&a, &password("pencil")).await;
        if forge {
            let e = r.unwrap_err();
            assert_eq!(e.kind(), "auth");
            assert!(e.to_string().contains("server signature"), "{e}");
        } else {
            assert_eq!(r.unwrap(), "SCRAM-SHA-256");
        }
        task.await.unwrap();
    }
}

#[tokio::test]
async fn xoauth2_and_oauthbearer() {
    let token = "ya29.a0AfH6SM-token_~+/=";
    // XOAUTH2 accepted, with a long token sent after an empty challenge.
    let long = format!("{token}{}", "x".repeat(300));
    let p = pki(&["localhost", "127.0.0.1"]);
    let expect = format!("user=alice\x01auth=Bearer {long}\x01\x01");
    let (port, task) = serve(&p, true, move |mut peer| async move {
        peer.hello("SASL PLAIN XOAUTH2 OAUTHBEARER\r\n").await;
        peer.expect("AUTH XOAUTH2").await;
        peer.send(b"+ \r\n").await;
        assert_eq!(B64.decode(peer.line().await).unwrap(), expect.as_bytes());
        peer.send(b"+OK\r\n").await;
    })
    .await;
    let a = account(port, UpstreamTls::Implicit, "auto");
    let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
    let cred = Credential::AccessToken(Zeroizing::new(long.clone()));
    assert_eq!(s.login(&a, &cred).await.unwrap(), "XOAUTH2");
    task.await.unwrap();

    // XOAUTH2 refused: JSON error challenge, empty response, -ERR.
    let (port, task) = serve(&p, true, move |mut peer| async move {
        peer.hello("SASL XOAUTH2\r\n").await;
        assert!(peer.line().await.starts_with("AUTH XOAUTH2 "));
        peer.send(format!("+ {}\r\n", B64.encode(br#"{"status":"401","schemes":"bearer"}"#)).as_bytes()).await;
        peer.expect("").await;
        peer.send(b"-ERR invalid credentials\r\n").await;
    })
    .await;
    let a = account(port, UpstreamTls::Implicit, "auto");
    let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
    let cred = Credential::AccessToken(Zeroizing::new(token.into()));
    let e = s.login(&a, &cred).await.unwrap_err().to_string();
    assert!(e.contains("invalid credentials") && e.contains("401") && !e.contains("ya29"), "{e}");
    task.await.unwrap();

    // OAUTHBEARER (forced) refused with the AQ== dummy response.
    let (port, task) = serve(&p, true, move |mut peer| async move {
        peer.hello("USER\r\n").await;
        let port = peer.tls.as_ref().unwrap().get_ref().0.local_addr().unwrap().port();
        let line = peer.line().await;
        let payload = B64.decode(line.strip_prefix("AUTH OAUTHBEARER ").unwrap()).unwrap();
        let want = format!("n,a=alice,\x01host=127.0.0.1\x01port={port}\x01auth=Bearer {token}\x01\x01");
        assert_eq!(String::from_utf8(payload).unwrap(), want);
        peer.send(format!("+ {}\r\n", B64.encode(br#"{"status":"invalid_token"}"#)).as_bytes()).await;
        peer.expect("AQ==").await;
        peer.send(b"-ERR no\r\n").await;
    })
    .await;
    let a = account(port, UpstreamTls::Implicit, "oauthbearer");
    let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
    let e = s.login(&a, &cred).await.unwrap_err().to_string();
    assert!(e.contains("invalid_token") && !e.contains("ya29"), "{e}");
    task.await.unwrap();
    assert_eq!(format!("{cred:?}"), "AccessToken(<redacted>)");
}

async fn connect_err(p: &Pki, client: Arc<rustls::ClientConfig>, host: &str) -> UpstreamError {
    let (port, _task) = serve(p, true, |mut peer| async move { peer.hello("").await }).await;
    let mut a = account(port, UpstreamTls::Implicit, "auto");
    a.host = host.into();
    Session::connect(&a, client).await.unwrap_err()
}

#[tokio::test]
async fn certificate_name_trust_and_pins_are_enforced() {
    let p = pki(&["pop.example.net"]);
    let e = connect_err(&p, client_tls(&p, &[]), "127.0.0.1").await;
    assert_eq!(e.kind(), "tls", "{e}");
    assert!(e.to_string().contains("not valid for name"), "{e}");

    let p = pki(&["localhost", "127.0.0.1"]);
    let other = pki(&["localhost", "127.0.0.1"]);
    let e = connect_err(&p, client_tls(&other, &[]), "127.0.0.1").await;
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");

    let e = connect_err(&p, client_tls(&p, std::slice::from_ref(&other.pin)), "127.0.0.1").await;
    assert!(e.to_string().contains("SPKI pin"), "{e}");

    // The matching pin is accepted, also with a host name.
    let (port, _task) = serve(&p, true, |mut peer| async move { peer.hello("").await }).await;
    let mut a = account(port, UpstreamTls::Implicit, "auto");
    a.host = "localhost".into();
    Session::connect(&a, client_tls(&p, std::slice::from_ref(&p.pin))).await.unwrap();
}

/// A CA for the pin tests: its certificate, signer and SPKI pin.
fn pin_ca(name: &str) -> (CertificateDer<'static>, rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let der = params.self_signed(&key).unwrap().der().clone();
    let pin = format!("sha256/{}", B64.encode(tlsclient::spki_sha256(&der).unwrap()));
    (der, Issuer::new(params, key), pin)
}

#[tokio::test]
async fn spki_pin_on_a_certificate_outside_the_verified_chain_is_refused() {
    let (ca1, issuer1, pin_ca1) = pin_ca("pin test CA1");
    let (ca2, _issuer2, pin_ca2) = pin_ca("pin test CA2 (unrelated)");
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer1)
        .unwrap();
    let pin_leaf = format!("sha256/{}", B64.encode(tlsclient::spki_sha256(leaf.der()).unwrap()));
    // The leaf chains to CA1; the server appends CA2, which is not on
    // its path. Both CAs are trusted, as with system roots.
    let presented = vec![leaf.der().clone(), ca2.clone()];
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(presented, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())))
        .unwrap();
    let mut p = pki(&["unused.example"]);
    p.server = Arc::new(server);
    let pem = |der: &CertificateDer<'_>| {
        format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", B64.encode(der))
    };
    std::fs::write(&p.ca_file, format!("{}{}", pem(&ca1), pem(&ca2))).unwrap();

    for (pin, accepted) in [(&pin_ca2, false), (&pin_ca1, true), (&pin_leaf, true)] {
        let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let log = seen.clone();
        let (port, task) = serve(&p, true, move |mut peer| async move {
            peer.hello("USER\r\n").await;
            loop {
                let line = peer.line().await;
                if line.is_empty() {
                    break;
                }
                log.lock().unwrap().push(line);
                peer.send(b"+OK\r\n").await;
            }
        })
        .await;
        let a = account(port, UpstreamTls::Implicit, "user");
        let result = match Session::connect(&a, client_tls(&p, std::slice::from_ref(pin))).await {
            Ok(mut s) => s.login(&a, &password("secret")).await.map(drop),
            Err(e) => Err(e),
        };
        if accepted {
            result.unwrap();
        } else {
            let e = result.unwrap_err();
            assert_eq!(e.kind(), "tls", "{e}");
            assert!(e.to_string().contains("SPKI pin"), "{e}");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        let seen = seen.lock().unwrap().clone();
        if accepted {
            assert_eq!(seen, ["USER alice", "PASS secret"], "pin {pin}");
        } else {
            assert!(seen.is_empty(), "credentials sent to an unpinned server: {seen:?}");
        }
    }
}

#[tokio::test]
async fn stls_refused_or_injected_fails() {
    let p = pki(&["localhost", "127.0.0.1"]);
    let (port, _task) = serve(&p, false, |mut peer| async move {
        peer.send(b"+OK hi\r\n").await;
        peer.expect("STLS").await;
        peer.send(b"-ERR not here\r\n").await;
        peer.line().await;
    })
    .await;
    let e = Session::connect(&account(port, UpstreamTls::Starttls, "auto"), client_tls(&p, &[])).await;
    assert_eq!(e.unwrap_err().kind(), "tls");

    let (port, _task) = serve(&p, false, |mut peer| async move {
        peer.send(b"+OK hi\r\n").await;
        peer.expect("STLS").await;
        peer.send(b"+OK go ahead\r\n+OK injected\r\n").await;
        peer.line().await;
    })
    .await;
    let e = Session::connect(&account(port, UpstreamTls::Starttls, "auto"), client_tls(&p, &[])).await;
    let e = e.unwrap_err();
    assert_eq!(e.kind(), "protocol");
    assert!(e.to_string().contains("injection"), "{e}");
}

#[tokio::test]
async fn bogus_oversize_and_endless_status_lines() {
    let p = pki(&["localhost", "127.0.0.1"]);
    for reply in [
        b"HELLO there\r\n".to_vec(),
        b"+OKAY\r\n".to_vec(),
        [b"+OK ".to_vec(), vec![b'a'; 2000], b"\r\n".to_vec()].concat(),
    ] {
        let (port, _task) = serve(&p, true, move |mut peer| async move {
            peer.send(&reply).await;
            peer.line().await;
        })
        .await;
        let e = Session::connect(&account(port, UpstreamTls::Implicit, "auto"), client_tls(&p, &[])).await;
        assert_eq!(e.unwrap_err().kind(), "protocol");
    }
    // Endless: megabytes without a line end, connection kept open.
    let (port, _task) = serve(&p, true, |mut peer| async move {
        peer.send(b"+OK ").await;
        for _ in 0..256 {
            peer.send(&[b'x'; 4096]).await;
        }
        peer.line().await;
    })
    .await;
    let e = Session::connect(&account(port, UpstreamTls::Implicit, "auto"), client_tls(&p, &[])).await;
    assert!(e.unwrap_err().to_string().contains("line longer than 1024"));
}

#[tokio::test]
async fn bad_listings_are_protocol_errors_and_poison() {
    for listing in [
        &b"1 abc\r\n1 def\r\n"[..],
        b"1 abc\r\n2 abc\r\n",
        b"0 abc\r\n",
        b"-1 abc\r\n",
        b"1 has space\r\n",
        b"1 \x01ctl\r\n",
        b"1\r\n",
        b"x abc\r\n",
        b"4294967296 abc\r\n",
    ] {
        let listing = listing.to_vec();
        let (mut s, _task, _p) = logged_in(move |mut peer| async move {
            peer.expect("UIDL").await;
            peer.send(&[b"+OK\r\n".to_vec(), listing, b".\r\n".to_vec()].concat()).await;
            peer.line().await;
        })
        .await;
        assert_eq!(s.uidl_all().await.unwrap_err().kind(), "protocol");
        assert_eq!(s.list_all().await.unwrap_err().kind(), "io", "poisoned");
    }
    let long = format!("1 {}\r\n", "u".repeat(71));
    let (mut s, _task, _p) = logged_in(move |mut peer| async move {
        peer.expect("UIDL").await;
        peer.send(format!("+OK\r\n{long}.\r\n").as_bytes()).await;
        peer.line().await;
    })
    .await;
    assert_eq!(s.uidl_all().await.unwrap_err().kind(), "protocol");
    let (mut s, _task, _p) = logged_in(|mut peer| async move {
        peer.expect("LIST").await;
        peer.send(b"+OK\r\n1 10\r\n1 20\r\n.\r\n").await;
        peer.line().await;
    })
    .await;
    assert_eq!(s.list_all().await.unwrap_err().kind(), "protocol");
}

/// A listing of `entries` lines made by `line`, sent in 64 KiB batches
/// (the server stops when the client gives up).
async fn send_listing(peer: &mut Peer, entries: usize, line: impl Fn(usize) -> String) {
    peer.send(b"+OK\r\n").await;
    let mut batch = Vec::with_capacity(70 * 1024);
    for i in 1..=entries {
        batch.extend_from_slice(line(i).as_bytes());
        if batch.len() >= 64 * 1024 {
            peer.send(&batch).await;
            batch.clear();
        }
    }
    batch.extend_from_slice(b".\r\n");
    peer.send(&batch).await;
}

#[tokio::test]
async fn hostile_listing_of_a_million_entries_is_cut_by_the_byte_budget() {
    // A million short UIDL entries: within MAX_LISTING, over the budget.
    let (mut s, _task, _p) = logged_in(|mut peer| async move {
        peer.expect("UIDL").await;
        send_listing(&mut peer, MAX_LISTING, |i| format!("{i} u{i}\r\n")).await;
        peer.line().await;
    })
    .await;
    let e = s.uidl_all().await.unwrap_err();
    assert_eq!(e.kind(), "protocol", "{e}");
    assert!(e.to_string().contains("UIDL listing exceeds 16 MiB"), "{e}");
    assert!(!s.is_usable(), "poisoned");
    assert_eq!(s.list_all().await.unwrap_err().kind(), "io");

    // A few huge-ish entries: LIST lines near the line limit (the text
    // after the size is ignored, but it still counts).
    let pad = "x".repeat(MAX_STATUS_LINE - 40);
    let (mut s, _task, _p) = logged_in(move |mut peer| async move {
        peer.expect("LIST").await;
        send_listing(&mut peer, 20_000, |i| format!("{i} 100 {pad}\r\n")).await;
        peer.line().await;
    })
    .await;
    let e = s.list_all().await.unwrap_err();
    assert!(e.to_string().contains("LIST listing exceeds 16 MiB"), "{e}");
    assert!(!s.is_usable(), "poisoned");
}

#[tokio::test]
async fn large_honest_listing_fits_the_byte_budget() {
    // 100 000 messages with 40-octet unique ids: well within the budget.
    let n = 100_000;
    let (mut s, task, _p) = logged_in(move |mut peer| async move {
        peer.expect("UIDL").await;
        send_listing(&mut peer, n, |i| format!("{i} {i:0>40}\r\n")).await;
        peer.expect("QUIT").await;
        peer.send(b"+OK\r\n").await;
    })
    .await;
    let listing = s.uidl_all().await.unwrap();
    assert_eq!(listing.len(), n);
    assert_eq!(listing[n - 1], (n as u32, format!("{n:0>40}")));
    s.quit().await.unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn server_err_does_not_poison_but_quit_needs_ok() {
    let (mut s, task, _p) = logged_in(|mut peer| async move {
        peer.expect("RETR 9").await;
        peer.send(b"-ERR no such message\r\n").await;
        peer.expect("DELE 1").await;
        peer.send(b"+OK\r\n").await;
        peer.expect("QUIT").await;
        peer.send(b"-ERR [SYS/TEMP] could not delete\r\n").await;
    })
    .await;
    assert_eq!(s.retr(9, 100).await.unwrap_err().kind(), "server");
    s.dele(1).await.unwrap();
    assert_eq!(s.quit().await.unwrap_err().kind(), "server");
    task.await.unwrap();
}

#[tokio::test]
async fn silence_and_slow_drip_time_out() {
    let (mut s, _task, _p) = logged_in(|mut peer| async move {
        peer.expect("UIDL").await;
        peer.line().await;
    })
    .await;
    s.conn.timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let e = s.uidl_all().await.unwrap_err();
    assert_eq!(e.to_string(), "timed out waiting for the server");
    assert!(started.elapsed() < Duration::from_secs(3));

    let (mut s, _task, _p) = logged_in(|mut peer| async move {
        peer.expect("RETR 1").await;
        peer.send(b"+OK\r\n").await;
        loop {
            peer.send(b"a").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    s.conn.timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let e = s.retr(1, 1 << 20).await.unwrap_err();
    assert_eq!(e.kind(), "timeout");
    assert!(e.to_string().contains("too slowly"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(s.dele(1).await.unwrap_err().kind(), "io");
}

#[tokio::test]
async fn disconnect_mid_retr_and_oversize_messages() {
    let (mut s, _task, _p) = logged_in(|mut peer| async move {
        peer.expect("RETR 1").await;
        peer.send(b"+OK\r\nSubject: half\r\n\r\nbody").await;
    })
    .await;
    assert_eq!(s.retr(1, 1 << 20).await.unwrap_err().kind(), "io");

    let (mut s, _task, _p) = logged_in(|mut peer| async move {
        peer.expect("RETR 1").await;
        peer.send(b"+OK\r\n").await;
        for _ in 0..100 {
            peer.send(&[b"y".repeat(998), b"\r\n".to_vec()].concat()).await;
        }
        peer.send(b".\r\n").await;
        peer.line().await;
    })
    .await;
    let e = s.retr(1, 50_000).await.unwrap_err();
    assert!(matches!(e, UpstreamError::TooLarge { msg: 1, limit: 50_000 }), "{e}");
    assert!(!s.is_usable());
    assert_eq!(s.quit().await.unwrap_err().kind(), "io");

    // Exactly at the limit is fine; one over-long line is not.
    let (mut s, _task, _p) = logged_in(|mut peer| async move {
        peer.expect("RETR 1").await;
        peer.send(b"+OK\r\n12345678\r\n.\r\n").await;
        peer.expect("RETR 2").await;
        peer.send(&[b"+OK\r\n".to_vec(), vec![b'z'; MAX_MESSAGE_LINE + 10], b"\r\n.\r\n".to_vec()].concat()).await;
        peer.line().await;
    })
    .await;
    assert_eq!(s.retr(1, 10).await.unwrap(), b"12345678\r\n");
    let e = s.retr(2, 1 << 20).await.unwrap_err();
    assert!(e.to_string().contains("line longer than"), "{e}");
}

#[tokio::test]
async fn capa_flood_unsolicited_data_and_unproven_scram() {
    let p = pki(&["localhost", "127.0.0.1"]);
    let (port, _task) = serve(&p, true, |mut peer| async move {
        peer.hello(&"X-CAP\r\n".repeat(MAX_CAPA_LINES + 1)).await;
        peer.line().await;
    })
    .await;
    let e = Session::connect(&account(port, UpstreamTls::Implicit, "auto"), client_tls(&p, &[])).await;
    assert_eq!(e.unwrap_err().kind(), "protocol");

    // A server without CAPA has no capabilities; data nobody asked
    // for (here a second +OK behind the greeting) is refused.
    let (port, _task) = serve(&p, true, |mut peer| async move {
        peer.send(b"+OK hi\r\n").await;
        peer.expect("CAPA").await;
        peer.send(b"-ERR what\r\n").await;
        peer.expect("USER alice").await;
        peer.send(b"+OK\r\n+OK extra\r\n").await;
        peer.line().await;
    })
    .await;
    let a = account(port, UpstreamTls::Implicit, "auto");
    let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
    assert!(s.capabilities().is_empty());
    let e = s.login(&a, &password("secret")).await.unwrap_err();
    assert!(e.to_string().contains("nobody asked for"), "{e}");

    // SCRAM: "+OK" without the server signature is not accepted.
    let (port, _task) = serve(&p, true, |mut peer| async move {
        peer.hello("SASL SCRAM-SHA-256\r\n").await;
        let line = peer.line().await;
        let first = B64.decode(line.strip_prefix("AUTH SCRAM-SHA-256 ").unwrap()).unwrap();
        let nonce = String::from_utf8(first).unwrap().rsplit_once("r=").unwrap().1.to_owned();
        let server_first = format!("r={nonce}xyz,s=c2FsdA==,i=4096");
        peer.send(format!("+ {}\r\n", B64.encode(server_first)).as_bytes()).await;
        peer.line().await;
        peer.send(b"+OK trust me\r\n").await;
        peer.line().await;
    })
    .await;
    let a = account(port, UpstreamTls::Implicit, "scram-sha256");
    let mut s = Session::connect(&a, client_tls(&p, &[])).await.unwrap();
    let e = s.login(&a, &password("pencil")).await.unwrap_err();
    assert_eq!(e.kind(), "auth");
    assert!(e.to_string().contains("did not prove"), "{e}");
    assert!(!s.is_usable());
}

#[test]
fn sanitize_and_status_parsing() {
    assert_eq!(sanitize(b"ok\r\n\x00\xff"), "ok????");
    assert_eq!(sanitize(&[b'a'; 300]).len(), MAX_ERROR_TEXT + 3);
    assert!(matches!(parse_status(b"+OK".to_vec(), false), Ok(Status::Ok(t)) if t.is_empty()));
    assert!(matches!(parse_status(b"-ERR x".to_vec(), false), Ok(Status::Err(t)) if t == b"x"));
    assert!(parse_status(b"+ abc".to_vec(), false).is_err());
    assert!(matches!(parse_status(b"+ abc".to_vec(), true), Ok(Status::Challenge(t)) if t == b"abc"));
    assert!(parse_status(b"-ERROR".to_vec(), true).is_err());
    assert!(matches!(refused(b"[SYS/TEMP] busy"), UpstreamError::Server(_)));
    assert!(matches!(refused(b"[AUTH] no"), UpstreamError::Auth(_)));
}
