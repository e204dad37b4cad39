//! In-process tests for the SMTP/LMTP client: a scripted fake server on
//! 127.0.0.1:0 (with TLS from a generated CA) and a mock DNS/MTA-STS lookup.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::client::{normalize, stuff, Conn, Io, Reply};
use super::*;
use crate::config::connector::{DownstreamProtocol, DownstreamTls};
use crate::connector::mtasts::Mode;
use crate::secret::SecretRef;

// ---------------------------------------------------------------- PKI ----

struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    file: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn temp_path(name: &str) -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("p3x-smtp-{}-{n}-{name}", std::process::id()))
}

impl TestCa {
    fn new() -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "SMTP test CA");
        let cert = params.self_signed(&key).unwrap();
        let file = temp_path("ca.pem");
        std::fs::write(&file, cert.pem()).unwrap();
        TestCa { issuer: Issuer::new(params, key), file }
    }

    /// A server config for a leaf with `names`, and the leaf's SPKI.
    fn server(&self, names: &[&str]) -> (Arc<rustls::ServerConfig>, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        (Arc::new(cfg), spki)
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

// -------------------------------------------------------- fake server ----

#[derive(Clone)]
struct Script {
    lmtp: bool,
    greeting: String,
    exts: Vec<String>,
    /// Extensions after STARTTLS (default: `exts`).
    exts_tls: Option<Vec<String>>,
    tls: Option<Arc<rustls::ServerConfig>>,
    starttls_reply: String,
    inject_after_starttls: bool,
    auth_reply: String,
    mail_reply: String,
    /// RCPT replies by address (default 250).
    rcpt: HashMap<String, String>,
    data_reply: String,
    /// Final replies: SMTP uses the first, LMTP one per accepted recipient.
    finals: Vec<String>,
    /// Raw bytes answered to EHLO/LHLO instead of the generated reply.
    raw_ehlo: Option<String>,
    /// Never says anything.
    silent: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            lmtp: false,
            greeting: "220 fake.test ESMTP".into(),
            exts: vec!["PIPELINING".into(), "8BITMIME".into()],
            exts_tls: None,
            tls: None,
            starttls_reply: "220 2.0.0 go ahead".into(),
            inject_after_starttls: false,
            auth_reply: "235 2.7.0 ok".into(),
            mail_reply: "250 2.1.0 ok".into(),
            rcpt: HashMap::new(),
            data_reply: "354 go".into(),
            finals: Vec::new(),
            raw_ehlo: None,
            silent: false,
        }
    }
}

#[derive(Debug, Default)]
struct Transcript {
    commands: Vec<String>,
    /// Commands received after the TLS handshake.
    tls_commands: Vec<String>,
    /// The DATA payload as received (stuffed), without the final ".CRLF".
    data: Vec<u8>,
    tls: bool,
}

impl Transcript {
    fn sent(&self, prefix: &str) -> bool {
        self.commands.iter().any(|c| c.to_ascii_uppercase().starts_with(prefix))
    }
}

async fn read_line(io: &mut Box<dyn Io>, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(p) = buf.iter().position(|&b| b == b'\n') {
            return Some(buf.drain(..=p).collect());
        }
        let mut chunk = [0u8; 4096];
        match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn put(io: &mut Box<dyn Io>, text: &str) {
    let _ = io.write_all(text.as_bytes()).await;
    let _ = io.flush().await;
}

fn multiline(code: &str, lines: &[String]) -> String {
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        out.push_str(&format!("{code}{sep}{l}\r\n"));
    }
    out
}

async fn serve(listener: TcpListener, s: Script) -> Transcript {
    let mut t = Transcript::default();
    let Ok((tcp, _)) = listener.accept().await else { return t };
    let mut io: Box<dyn Io> = Box::new(tcp);
    if s.silent {
        tokio::time::sleep(Duration::from_secs(30)).await;
        return t;
    }
    let mut buf = Vec::new();
    put(&mut io, &format!("{}\r\n", s.greeting)).await;
    let mut accepted = 0;
    while let Some(raw) = read_line(&mut io, &mut buf).await {
        let line = String::from_utf8_lossy(&raw).trim_end().to_owned();
        t.commands.push(line.clone());
        if t.tls {
            t.tls_commands.push(line.clone());
        }
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") || upper.starts_with("LHLO") || upper.starts_with("HELO") {
            if let Some(r) = &s.raw_ehlo {
                put(&mut io, r).await;
                continue;
            }
            let exts = if t.tls { s.exts_tls.clone().unwrap_or(s.exts.clone()) } else { s.exts.clone() };
            let mut lines = vec!["fake.test hello".to_owned()];
            lines.extend(exts);
            put(&mut io, &multiline("250", &lines)).await;
        } else if upper == "STARTTLS" {
            let mut r = format!("{}\r\n", s.starttls_reply);
            if s.inject_after_starttls {
                r.push_str("250 injected\r\n");
            }
            put(&mut io, &r).await;
            if !s.starttls_reply.starts_with("220") || s.inject_after_starttls {
                continue;
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(s.tls.clone().expect("tls config"));
            match acceptor.accept(io).await {
                Ok(tls) => io = Box::new(tls),
                Err(_) => return t,
            }
            buf.clear();
            t.tls = true;
        } else if upper.starts_with("AUTH") {
            put(&mut io, &format!("{}\r\n", s.auth_reply)).await;
        } else if upper.starts_with("MAIL") {
            accepted = 0;
            put(&mut io, &format!("{}\r\n", s.mail_reply)).await;
        } else if upper.starts_with("RCPT") {
            let addr = line[line.find('<').unwrap() + 1..line.rfind('>').unwrap()].to_owned();
            let r = s.rcpt.get(&addr).cloned().unwrap_or("250 2.1.5 ok".into());
            if r.starts_with('2') {
                accepted += 1;
            }
            put(&mut io, &format!("{r}\r\n")).await;
        } else if upper == "DATA" {
            put(&mut io, &format!("{}\r\n", s.data_reply)).await;
            if !s.data_reply.starts_with("354") {
                continue;
            }
            while let Some(l) = read_line(&mut io, &mut buf).await {
                if l == b".\r\n" {
                    break;
                }
                t.data.extend_from_slice(&l);
            }
            let n = if s.lmtp { accepted } else { 1 };
            let mut out = String::new();
            for i in 0..n {
                out.push_str(s.finals.get(i).map(String::as_str).unwrap_or("250 2.0.0 queued"));
                out.push_str("\r\n");
            }
            put(&mut io, &out).await;
        } else if upper == "QUIT" {
            put(&mut io, "221 bye\r\n").await;
            break;
        } else if upper == "RSET" {
            put(&mut io, "250 ok\r\n").await;
        } else {
            put(&mut io, "500 unknown\r\n").await;
        }
    }
    t
}

async fn start(script: Script) -> (u16, JoinHandle<Transcript>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (port, tokio::spawn(serve(listener, script)))
}

async fn transcript(h: JoinHandle<Transcript>) -> Transcript {
    tokio::time::timeout(Duration::from_secs(20), h).await.expect("server finished").unwrap()
}

// ------------------------------------------------------------ lookups ----

type Answer<T> = Result<(Security, T), DnsError>;
type Host<T> = Box<dyn Fn(&str) -> T + Sync>;

struct Mock {
    mx: Host<Answer<Vec<String>>>,
    addresses: Host<Answer<Vec<IpAddr>>>,
    tlsa: Host<Answer<Vec<TlsaRecord>>>,
    sts: Host<Result<Option<Policy>, MtaStsError>>,
}

impl Default for Mock {
    fn default() -> Self {
        Mock {
            mx: Box::new(|d| Ok((Security::Insecure, vec![format!("mx.{d}")]))),
            addresses: Box::new(|_| Ok((Security::Insecure, vec!["127.0.0.1".parse().unwrap()]))),
            tlsa: Box::new(|h| Err(DnsError::NotFound(h.into()))),
            sts: Box::new(|_| Ok(None)),
        }
    }
}

impl Lookup for Mock {
    async fn mx(&self, domain: &str) -> Result<(Security, Vec<String>), DnsError> {
        (self.mx)(domain)
    }
    async fn addresses(&self, host: &str) -> Result<(Security, Vec<IpAddr>), DnsError> {
        (self.addresses)(host)
    }
    async fn tlsa(&self, host: &str, port: u16) -> Result<(Security, Vec<TlsaRecord>), DnsError> {
        (self.tlsa)(&format!("_{port}._tcp.{host}"))
    }
    async fn sts_policy(&self, domain: &str) -> Result<Option<Policy>, MtaStsError> {
        (self.sts)(domain)
    }
}

// ------------------------------------------------------------ helpers ----

fn downstream(host: Option<&str>, port: u16, tls: DownstreamTls, ca: Option<&TestCa>) -> DownstreamConfig {
    DownstreamConfig {
        name: "test".into(),
        protocol: DownstreamProtocol::Smtp,
        host: host.map(str::to_owned),
        port: Some(port),
        tls: Some(tls),
        ca_file: ca.map(|c| c.file.clone()),
        helo: None,
        auth_user: None,
        auth_password: None,
        timeout_secs: 5,
    }
}

fn envelope(rcpts: &[&str]) -> Envelope {
    Envelope { mail_from: "sender@origin.test".into(), recipients: rcpts.iter().map(|s| s.to_string()).collect() }
}

const MSG: &[u8] = b"Subject: test\r\n\r\nHello\r\n";

async fn run(d: &DownstreamConfig, env: &Envelope, msg: &[u8]) -> Result<Vec<RcptOutcome>, SmtpError> {
    deliver_inner(d, "client.test", &Mock::default(), env, msg).await
}

fn starttls_script(ca: &TestCa, names: &[&str]) -> Script {
    let (tls, _) = ca.server(names);
    Script { exts: vec!["STARTTLS".into(), "SIZE 100000".into()], tls: Some(tls), ..Script::default() }
}

fn is_temp(r: &Result<Vec<RcptOutcome>, SmtpError>, needle: &str) -> bool {
    matches!(r, Err(SmtpError::Temporary(m)) if m.contains(needle))
}

// -------------------------------------------------------------- tests ----

#[tokio::test]
async fn verified_starttls_with_per_recipient_outcomes() {
    let ca = TestCa::new();
    let mut script = starttls_script(&ca, &["127.0.0.1"]);
    script.rcpt.insert("b@x.test".into(), "450 4.2.1 later".into());
    script.rcpt.insert("c@x.test".into(), "550 5.1.1 no such user".into());
    let (port, h) = start(script).await;
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::Verify, Some(&ca));
    let env = envelope(&["a@x.test", "b@x.test", "c@x.test", "d@x.test"]);
    let out = run(&d, &env, MSG).await.unwrap();
    assert_eq!(out[0], RcptOutcome::Accepted);
    assert!(matches!(&out[1], RcptOutcome::Temporary(m) if m.contains("450")), "{out:?}");
    assert!(matches!(&out[2], RcptOutcome::Permanent(m) if m.contains("550")), "{out:?}");
    assert_eq!(out[3], RcptOutcome::Accepted);
    let t = transcript(h).await;
    assert!(t.tls);
    assert_eq!(t.commands[0], "EHLO client.test");
    assert_eq!(t.commands[1], "STARTTLS");
    assert_eq!(t.tls_commands[0], "EHLO client.test", "EHLO again after TLS");
    assert_eq!(t.tls_commands[1], format!("MAIL FROM:<sender@origin.test> SIZE={}", MSG.len()));
    assert_eq!(t.data, MSG);
    assert!(t.sent("QUIT"));
}

#[tokio::test]
async fn starttls_not_offered_is_temporary_and_nothing_is_sent() {
    let (port, h) = start(Script::default()).await;
    let ca = TestCa::new();
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::Secure, Some(&ca));
    let r = run(&d, &envelope(&["a@x.test"]), MSG).await;
    assert!(is_temp(&r, "STARTTLS"), "{r:?}");
    let t = transcript(h).await;
    assert!(!t.sent("MAIL") && !t.sent("RCPT") && !t.sent("DATA") && !t.sent("AUTH"), "{t:?}");
}

#[tokio::test]
async fn starttls_refused_is_temporary() {
    let ca = TestCa::new();
    let mut script = starttls_script(&ca, &["127.0.0.1"]);
    script.starttls_reply = "454 4.7.0 TLS not available".into();
    let (port, h) = start(script).await;
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::Verify, Some(&ca));
    let r = run(&d, &envelope(&["a@x.test"]), MSG).await;
    assert!(is_temp(&r, "STARTTLS refused"), "{r:?}");
    assert!(!transcript(h).await.sent("MAIL"));
}

#[tokio::test]
async fn starttls_injection_is_refused() {
    let ca = TestCa::new();
    let mut script = starttls_script(&ca, &["127.0.0.1"]);
    script.inject_after_starttls = true;
    let (port, h) = start(script).await;
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::Verify, Some(&ca));
    let r = run(&d, &envelope(&["a@x.test"]), MSG).await;
    assert!(matches!(r, Err(SmtpError::Temporary(_))), "{r:?}");
    let t = transcript(h).await;
    assert!(!t.sent("MAIL") && !t.tls, "{t:?}");
}

#[tokio::test]
async fn certificate_name_and_issuer_are_verified() {
    let ca = TestCa::new();
    let (port, h) = start(starttls_script(&ca, &["other.test"])).await;
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::Verify, Some(&ca));
    let r = run(&d, &envelope(&["a@x.test"]), MSG).await;
    assert!(is_temp(&r, "TLS handshake failed"), "{r:?}");
    assert!(!transcript(h).await.sent("MAIL"));

    let stranger = TestCa::new();
    let (port, h) = start(starttls_script(&stranger, &["127.0.0.1"])).await;
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::Secure, Some(&ca));
    let r = run(&d, &envelope(&["a@x.test"]), MSG).await;
    assert!(is_temp(&r, "TLS handshake failed"), "{r:?}");
    assert!(!transcript(h).await.sent("MAIL"));
}

#[tokio::test]
async fn lmtp_gives_one_final_reply_per_accepted_recipient() {
    let mut script = Script { lmtp: true, ..Script::default() };
    script.rcpt.insert("b@x.test".into(), "550 5.1.1 unknown".into());
    script.finals = vec!["250 2.0.0 a stored".into(), "452 4.2.2 mailbox full".into(), "552 5.2.2 over quota".into()];
    let (port, h) = start(script).await;
    let mut d = downstream(Some("127.0.0.1"), port, DownstreamTls::None, None);
    d.protocol = DownstreamProtocol::Lmtp;
    let env = envelope(&["a@x.test", "b@x.test", "c@x.test", "d@x.test"]);
    let out = run(&d, &env, MSG).await.unwrap();
    assert_eq!(out[0], RcptOutcome::Accepted);
    assert!(matches!(&out[1], RcptOutcome::Permanent(m) if m.contains("unknown")), "{out:?}");
    assert!(matches!(&out[2], RcptOutcome::Temporary(m) if m.contains("full")), "{out:?}");
    assert!(matches!(&out[3], RcptOutcome::Permanent(m) if m.contains("quota")), "{out:?}");
    let t = transcript(h).await;
    assert_eq!(t.commands[0], "LHLO client.test");
    assert!(!t.sent("STARTTLS"));
}

#[tokio::test]
async fn smtp_final_reply_applies_to_every_accepted_recipient() {
    let script = Script { finals: vec!["451 4.3.0 try later".into()], ..Script::default() };
    let (port, _h) = start(script).await;
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::None, None);
    let out = run(&d, &envelope(&["a@x.test", "b@x.test"]), MSG).await.unwrap();
    assert!(out.iter().all(|o| matches!(o, RcptOutcome::Temporary(m) if m.contains("451"))), "{out:?}");
}

#[tokio::test]
async fn no_accepted_recipient_skips_data() {
    let mut script = Script::default();
    script.rcpt.insert("a@x.test".into(), "550 5.1.1 no".into());
    script.rcpt.insert("b@x.test".into(), "450 4.1.1 later".into());
    let (port, h) = start(script).await;
    let mut d = downstream(Some("127.0.0.1"), port, DownstreamTls::None, None);
    d.helo = Some("relay.example".into());
    let out = run(&d, &envelope(&["a@x.test", "b@x.test"]), MSG).await.unwrap();
    assert!(matches!(out[0], RcptOutcome::Permanent(_)) && matches!(out[1], RcptOutcome::Temporary(_)));
    let t = transcript(h).await;
    assert_eq!(t.commands[0], "EHLO relay.example", "the downstream's helo wins");
    assert!(!t.sent("DATA") && t.sent("RSET"), "{t:?}");
}

#[tokio::test]
async fn mail_from_refusal_fails_the_transaction() {
    for (reply, permanent) in [("550 5.7.1 sender refused", true), ("451 4.7.1 greylisted", false)] {
        let (port, h) = start(Script { mail_reply: reply.into(), ..Script::default() }).await;
        let d = downstream(Some("127.0.0.1"), port, DownstreamTls::None, None);
        let r = run(&d, &envelope(&["a@x.test"]), MSG).await;
        match r {
            Err(SmtpError::Permanent(m)) if permanent => assert!(m.contains("refused")),
            Err(SmtpError::Temporary(m)) if !permanent => assert!(m.contains("greylisted")),
            other => panic!("{reply}: {other:?}"),
        }
        assert!(!transcript(h).await.sent("RCPT"));
    }
}

#[tokio::test]
async fn size_limit_is_permanent_and_size_and_body_params_are_sent() {
    let script = Script { exts: vec!["SIZE 100".into()], ..Script::default() };
    let (port, h) = start(script).await;
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::None, None);
    let big = vec![b'x'; 200];
    let r = run(&d, &envelope(&["a@x.test"]), &big).await;
    assert!(matches!(&r, Err(SmtpError::Permanent(m)) if m.contains("SIZE")), "{r:?}");
    assert!(!transcript(h).await.sent("MAIL"));

    let script = Script { exts: vec!["SIZE 1000".into(), "8BITMIME".into()], ..Script::default() };
    let (port, h) = start(script).await;
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::None, None);
    let msg = "Subject: é\r\n\r\nGrüße\r\n".as_bytes();
    assert_eq!(run(&d, &envelope(&["a@x.test"]), msg).await.unwrap(), vec![RcptOutcome::Accepted]);
    let t = transcript(h).await;
    assert!(t.commands.contains(&format!("MAIL FROM:<sender@origin.test> SIZE={} BODY=8BITMIME", msg.len())));
}

const PW_VAR: &str = "P3X_SMTP_TEST_AUTH_PASSWORD";
const PW: &str = "s3cret-Pa55";

fn with_auth(mut d: DownstreamConfig) -> DownstreamConfig {
    std::env::set_var(PW_VAR, PW);
    d.auth_user = Some("relay-user".into());
    d.auth_password = Some(SecretRef::Env(PW_VAR.into()));
    d
}

#[tokio::test]
async fn auth_plain_only_after_tls_and_only_when_advertised() {
    use base64::Engine as _;
    let ca = TestCa::new();
    let mut script = starttls_script(&ca, &["127.0.0.1"]);
    script.exts_tls = Some(vec!["AUTH LOGIN PLAIN".into()]);
    let (port, h) = start(script).await;
    let d = with_auth(downstream(Some("127.0.0.1"), port, DownstreamTls::Verify, Some(&ca)));
    assert_eq!(run(&d, &envelope(&["a@x.test"]), MSG).await.unwrap(), vec![RcptOutcome::Accepted]);
    let t = transcript(h).await;
    let auth = t.tls_commands.iter().find(|c| c.starts_with("AUTH PLAIN ")).expect("AUTH after TLS");
    let raw = base64::engine::general_purpose::STANDARD.decode(&auth["AUTH PLAIN ".len()..]).unwrap();
    assert_eq!(raw, format!("\0relay-user\0{PW}").as_bytes());
    assert_eq!(t.commands.iter().filter(|c| c.starts_with("AUTH")).count(), 1, "never in plaintext");

    // Not advertised: no credentials, no mail.
    let (port, h) = start(starttls_script(&ca, &["127.0.0.1"])).await;
    let d = with_auth(downstream(Some("127.0.0.1"), port, DownstreamTls::Verify, Some(&ca)));
    let r = run(&d, &envelope(&["a@x.test"]), MSG).await;
    assert!(is_temp(&r, "AUTH PLAIN"), "{r:?}");
    let t = transcript(h).await;
    assert!(!t.sent("AUTH") && !t.sent("MAIL"));

    // Refused: the error carries the server text, never the secret.
    let mut script = starttls_script(&ca, &["127.0.0.1"]);
    script.exts_tls = Some(vec!["AUTH PLAIN".into()]);
    script.auth_reply = "535 5.7.8 bad credentials".into();
    let (port, _h) = start(script).await;
    let d = with_auth(downstream(Some("127.0.0.1"), port, DownstreamTls::Verify, Some(&ca)));
    let e = run(&d, &envelope(&["a@x.test"]), MSG).await.unwrap_err().to_string();
    assert!(e.contains("535") && !e.contains(PW), "{e}");
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("\0relay-user\0{PW}"));
    assert!(!e.contains(&b64));

    // Without TLS (a config the checker refuses): never sent.
    let script = Script { exts: vec!["AUTH PLAIN".into()], ..Script::default() };
    let (port, h) = start(script).await;
    let d = with_auth(downstream(Some("127.0.0.1"), port, DownstreamTls::None, None));
    let r = run(&d, &envelope(&["a@x.test"]), MSG).await;
    assert!(is_temp(&r, "without TLS"), "{r:?}");
    assert!(!transcript(h).await.sent("AUTH"));
}

#[tokio::test]
async fn dot_stuffing_and_line_ends_on_the_wire() {
    let (port, h) = start(Script::default()).await;
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::None, None);
    let msg = b"Subject: dots\n\n.hidden\r\n..two\r\n.\r\nbare\rcr\n\r\n.\r\nend\n.";
    assert_eq!(run(&d, &envelope(&["a@x.test"]), msg).await.unwrap(), vec![RcptOutcome::Accepted]);
    let t = transcript(h).await;
    let expected = b"Subject: dots\r\n\r\n..hidden\r\n...two\r\n..\r\nbare\r\ncr\r\n\r\n..\r\nend\r\n..\r\n";
    assert_eq!(String::from_utf8_lossy(&t.data), String::from_utf8_lossy(expected));
}

#[test]
fn normalize_and_stuff_edge_cases() {
    assert_eq!(stuff(&normalize(b"")), b".\r\n");
    assert_eq!(stuff(&normalize(b".")), b"..\r\n.\r\n");
    assert_eq!(normalize(b"a\r\r\nb"), b"a\r\n\r\nb\r\n");
    // SMTP smuggling shapes: "\n.\r\n" and "\r.\r" cannot end the data early.
    assert_eq!(stuff(&normalize(b"x\n.\r\ny")), b"x\r\n..\r\ny\r\n.\r\n");
    assert_eq!(stuff(&normalize(b"x\r.\ry")), b"x\r\n..\r\ny\r\n.\r\n");
}

async fn parse_reply(bytes: &[u8]) -> Result<Reply, SmtpError> {
    let (mut server, client) = tokio::io::duplex(64 * 1024);
    server.write_all(bytes).await.unwrap();
    drop(server);
    let mut conn = Conn { io: Box::new(client), buf: Vec::new(), timeout: Duration::from_secs(2) };
    conn.reply().await
}

#[tokio::test]
async fn malformed_replies_are_protocol_errors() {
    let r = parse_reply(b"250-first\r\n250-SIZE 10\r\n250 last\r\n").await.unwrap();
    assert_eq!((r.code, r.lines.len()), (250, 3));
    assert_eq!(parse_reply(b"354\r\n").await.unwrap().code, 354);
    for bad in
        [&b"hello\r\n"[..], b"25O ok\r\n", b"150 what\r\n", b"600 what\r\n", b"250_ok\r\n", b"250-a\r\n251 b\r\n", b""]
    {
        let r = parse_reply(bad).await;
        assert!(matches!(r, Err(SmtpError::Temporary(_))), "{:?}: {r:?}", String::from_utf8_lossy(bad));
    }
    let long = format!("250 {}\r\n", "x".repeat(2000));
    assert!(matches!(parse_reply(long.as_bytes()).await, Err(SmtpError::Temporary(m)) if m.contains("too long")));
    let many = "250-x\r\n".repeat(150) + "250 end\r\n";
    assert!(matches!(parse_reply(many.as_bytes()).await, Err(SmtpError::Temporary(m)) if m.contains("too many")));
    // Control characters in server text are neutralised in errors.
    let r = parse_reply(b"550 evil\x1b[31m text\r\n").await.unwrap();
    assert_eq!(r.text(), "550 evil?[31m text");
}

#[tokio::test]
async fn malformed_session_replies_fail_temporarily() {
    let script = Script { raw_ehlo: Some("250-fake\r\n99 broken\r\n".into()), ..Script::default() };
    let (port, h) = start(script).await;
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::None, None);
    let r = run(&d, &envelope(&["a@x.test"]), MSG).await;
    assert!(is_temp(&r, "protocol error"), "{r:?}");
    assert!(!transcript(h).await.sent("MAIL"));

    let (port, _h) = start(Script { greeting: "554 go away".into(), ..Script::default() }).await;
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::None, None);
    let r = run(&d, &envelope(&["a@x.test"]), MSG).await;
    assert!(is_temp(&r, "greeting"), "{r:?}");
}

#[tokio::test]
async fn silent_server_times_out() {
    let (port, h) = start(Script { silent: true, ..Script::default() }).await;
    let mut d = downstream(Some("127.0.0.1"), port, DownstreamTls::None, None);
    d.timeout_secs = 1;
    let started = std::time::Instant::now();
    let r = run(&d, &envelope(&["a@x.test"]), MSG).await;
    assert!(is_temp(&r, "timed out"), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    h.abort();
}

#[tokio::test]
async fn connection_refused_is_temporary_and_bad_addresses_are_refused() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::None, None);
    assert!(is_temp(&run(&d, &envelope(&["a@x.test"]), MSG).await, "cannot connect"));
    // CR/LF or angle brackets in addresses never reach the wire.
    let env = Envelope { mail_from: "a@b\r\nRCPT TO:<x@y>".into(), recipients: vec!["c@d".into()] };
    assert!(matches!(run(&d, &env, MSG).await, Err(SmtpError::Permanent(_))));
    let (port, h) = start(Script::default()).await;
    let d = downstream(Some("127.0.0.1"), port, DownstreamTls::None, None);
    let out = run(&d, &envelope(&["ok@x.test", "bad>@x.test"]), MSG).await.unwrap();
    assert_eq!(out[0], RcptOutcome::Accepted);
    assert!(matches!(out[1], RcptOutcome::Permanent(_)));
    assert_eq!(transcript(h).await.commands.iter().filter(|c| c.starts_with("RCPT")).count(), 1);
}

#[tokio::test]
async fn lmtp_over_unix_socket() {
    let path = temp_path("lmtp.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut io: Box<dyn Io> = Box::new(s);
        let mut buf = Vec::new();
        put(&mut io, "220 lmtp ready\r\n").await;
        let mut seen = Vec::new();
        while let Some(l) = read_line(&mut io, &mut buf).await {
            let l = String::from_utf8_lossy(&l).trim_end().to_owned();
            let reply = match l.as_str() {
                "DATA" => "354 go",
                "." => "250 stored",
                "QUIT" => "221 bye",
                _ if l.starts_with("LHLO") || l.starts_with("MAIL") || l.starts_with("RCPT") => "250 ok",
                _ => {
                    seen.push(l);
                    continue;
                }
            };
            put(&mut io, &format!("{reply}\r\n")).await;
            if reply.starts_with("221") {
                break;
            }
        }
        seen
    });
    let mut d = downstream(Some(&format!("unix:{}", path.display())), 0, DownstreamTls::None, None);
    d.protocol = DownstreamProtocol::Lmtp;
    assert_eq!(run(&d, &envelope(&["a@x.test"]), MSG).await.unwrap(), vec![RcptOutcome::Accepted]);
    let body = server.await.unwrap();
    assert_eq!(body, vec!["Subject: test", "", "Hello"]);
    let _ = std::fs::remove_file(&path);
}

// --------------------------------------------------------- MX delivery ----

async fn run_mx(d: &DownstreamConfig, lookup: &Mock, rcpts: &[&str]) -> Result<Vec<RcptOutcome>, SmtpError> {
    deliver_inner(d, "client.test", lookup, &envelope(rcpts), MSG).await
}

#[tokio::test]
async fn mx_bogus_fails_closed_and_null_mx_is_permanent() {
    let d = downstream(None, 1, DownstreamTls::Dane, None);
    let m = Mock { mx: Box::new(|d| Err(DnsError::Bogus(d.into()))), ..Mock::default() };
    assert!(is_temp(&run_mx(&d, &m, &["a@x.test"]).await, "DNSSEC"));
    let m = Mock { mx: Box::new(|d| Ok((Security::Bogus, vec![format!("mx.{d}")]))), ..Mock::default() };
    assert!(is_temp(&run_mx(&d, &m, &["a@x.test"]).await, "DNSSEC"));
    let m = Mock { mx: Box::new(|_| Err(DnsError::NotFound("null MX".into()))), ..Mock::default() };
    assert!(matches!(run_mx(&d, &m, &["a@x.test"]).await, Err(SmtpError::Permanent(_))));
    let m = Mock { mx: Box::new(|_| Err(DnsError::Temporary("SERVFAIL".into()))), ..Mock::default() };
    assert!(is_temp(&run_mx(&d, &m, &["a@x.test"]).await, "SERVFAIL"));
}

#[tokio::test]
async fn mx_hosts_are_tried_in_order_with_verified_tls_to_the_mx_name() {
    let ca = TestCa::new();
    let (port, h) = start(starttls_script(&ca, &["mx2.x.test"])).await;
    let d = downstream(None, port, DownstreamTls::MtaSts, Some(&ca));
    let m = Mock {
        mx: Box::new(|_| Ok((Security::Insecure, vec!["mx1.x.test.".into(), "mx2.x.test".into()]))),
        // mx1 has nothing listening on 127.0.0.2.
        addresses: Box::new(|h| {
            let ip = if h == "mx1.x.test" { "127.0.0.2" } else { "127.0.0.1" };
            Ok((Security::Insecure, vec![ip.parse().unwrap()]))
        }),
        ..Mock::default()
    };
    assert_eq!(run_mx(&d, &m, &["a@x.test"]).await.unwrap(), vec![RcptOutcome::Accepted]);
    assert!(transcript(h).await.tls);
}

#[tokio::test]
async fn mta_sts_fetch_failure_defers_and_wrong_mx_certificate_fails() {
    let ca = TestCa::new();
    let d = downstream(None, 1, DownstreamTls::MtaSts, Some(&ca));
    let m = Mock { sts: Box::new(|_| Err(MtaStsError::Temporary("fetch failed".into()))), ..Mock::default() };
    assert!(is_temp(&run_mx(&d, &m, &["a@x.test"]).await, "MTA-STS"));

    let (port, h) = start(starttls_script(&ca, &["attacker.test"])).await;
    let d = downstream(None, port, DownstreamTls::MtaSts, Some(&ca));
    assert!(is_temp(&run_mx(&d, &Mock::default(), &["a@x.test"]).await, "TLS handshake"));
    assert!(!transcript(h).await.sent("MAIL"));
}

#[tokio::test]
async fn secure_mx_accepts_the_domain_name_only() {
    let ca = TestCa::new();
    let (port, h) = start(starttls_script(&ca, &["x.test"])).await;
    let d = downstream(None, port, DownstreamTls::Secure, Some(&ca));
    assert_eq!(run_mx(&d, &Mock::default(), &["a@x.test"]).await.unwrap(), vec![RcptOutcome::Accepted]);
    assert!(transcript(h).await.tls);
    // An MX outside the domain with a certificate for its own name: refused.
    let (port, h) = start(starttls_script(&ca, &["mx.elsewhere.test"])).await;
    let d = downstream(None, port, DownstreamTls::Secure, Some(&ca));
    let m = Mock { mx: Box::new(|_| Ok((Security::Insecure, vec!["mx.elsewhere.test".into()]))), ..Mock::default() };
    assert!(is_temp(&run_mx(&d, &m, &["a@x.test"]).await, "TLS handshake"));
    assert!(!transcript(h).await.sent("MAIL"));
}

fn dane_mock(records: Vec<TlsaRecord>, tlsa_security: Security) -> Mock {
    Mock {
        mx: Box::new(|d| Ok((Security::Secure, vec![format!("mx.{d}")]))),
        addresses: Box::new(|_| Ok((Security::Secure, vec!["127.0.0.1".parse().unwrap()]))),
        tlsa: Box::new(move |name| {
            assert!(name.starts_with('_') && name.ends_with("._tcp.mx.x.test"), "{name}");
            Ok((tlsa_security, records.clone()))
        }),
        sts: Box::new(|_| panic!("MTA-STS must not be consulted when DANE applies")),
    }
}

#[tokio::test]
async fn dane_authenticates_without_the_web_pki_and_is_mandatory() {
    let ca = TestCa::new();
    let untrusted = TestCa::new();
    // The server's chain is not trusted by ca_file: only DANE can pass it.
    let (tls, spki) = untrusted.server(&["whatever.test"]);
    let script = Script { exts: vec!["STARTTLS".into()], tls: Some(tls), ..Script::default() };
    let (port, h) = start(script.clone()).await;
    let d = downstream(None, port, DownstreamTls::Dane, Some(&ca));
    let good = TlsaRecord { usage: 3, selector: 1, matching: 1, data: Sha256::digest(&spki).to_vec() };
    let m = dane_mock(vec![good], Security::Secure);
    assert_eq!(run_mx(&d, &m, &["a@x.test"]).await.unwrap(), vec![RcptOutcome::Accepted]);
    assert!(transcript(h).await.tls);

    // A TLSA record for another key: no fallback to anything weaker.
    let (port, h) = start(script.clone()).await;
    let d = downstream(None, port, DownstreamTls::Dane, Some(&ca));
    let wrong = TlsaRecord { usage: 3, selector: 1, matching: 1, data: vec![7; 32] };
    let r = run_mx(&d, &dane_mock(vec![wrong], Security::Secure), &["a@x.test"]).await;
    assert!(is_temp(&r, "TLS handshake"), "{r:?}");
    assert!(!transcript(h).await.sent("MAIL"));

    // Bogus TLSA: the host is not used at all.
    let d = downstream(None, 1, DownstreamTls::Dane, Some(&ca));
    let r = run_mx(&d, &dane_mock(vec![], Security::Bogus), &["a@x.test"]).await;
    assert!(is_temp(&r, "DNSSEC validation failed for the TLSA"), "{r:?}");
}

#[tokio::test]
async fn dane_without_usable_tlsa_falls_back_to_verified_tls() {
    let ca = TestCa::new();
    let (port, h) = start(starttls_script(&ca, &["mx.x.test"])).await;
    let d = downstream(None, port, DownstreamTls::Dane, Some(&ca));
    let pkix = TlsaRecord { usage: 1, selector: 1, matching: 1, data: vec![1; 32] };
    let mut m = dane_mock(vec![pkix], Security::Secure);
    m.sts = Box::new(|_| Ok(None));
    assert_eq!(run_mx(&d, &m, &["a@x.test"]).await.unwrap(), vec![RcptOutcome::Accepted]);
    assert!(transcript(h).await.tls);
}

#[tokio::test]
async fn recipients_of_several_domains_are_merged_in_order() {
    let ca = TestCa::new();
    let (port, h) = start(starttls_script(&ca, &["mx.good.test"])).await;
    let d = downstream(None, port, DownstreamTls::MtaSts, Some(&ca));
    let m = Mock {
        mx: Box::new(|d| {
            if d == "good.test" {
                Ok((Security::Insecure, vec!["mx.good.test".into()]))
            } else {
                Err(DnsError::NotFound("null MX".into()))
            }
        }),
        ..Mock::default()
    };
    let out = run_mx(&d, &m, &["a@good.test", "b@gone.test", "c@GOOD.test", "nodomain"]).await.unwrap();
    assert_eq!(out[0], RcptOutcome::Accepted);
    assert!(matches!(&out[1], RcptOutcome::Permanent(m) if m.contains("gone.test")), "{out:?}");
    assert_eq!(out[2], RcptOutcome::Accepted);
    assert!(matches!(out[3], RcptOutcome::Permanent(_)));
    let t = transcript(h).await;
    assert_eq!(t.commands.iter().filter(|c| c.starts_with("RCPT")).count(), 2, "one transaction for good.test");
}

#[allow(dead_code)]
fn deliver_futures_are_send(d: &DownstreamConfig, r: &Resolver, sts: &PolicyCache, e: &Envelope) {
    fn is_send<T: Send>(_: &T) {}
    is_send(&deliver(d, "h", r, sts, e, b""));
}

#[tokio::test]
async fn mta_sts_enforce_skips_mx_hosts_outside_the_policy() {
    let ca = TestCa::new();
    // Would be deliverable (valid certificate for the MX name) but for the policy.
    let (port, h) = start(starttls_script(&ca, &["mx.x.test"])).await;
    let d = downstream(None, port, DownstreamTls::MtaSts, Some(&ca));
    let m = Mock {
        sts: Box::new(|_| Ok(Some(Policy { mode: Mode::Enforce, mx: vec!["mail.other.test".into()], max_age: 86400 }))),
        ..Mock::default()
    };
    let r = run_mx(&d, &m, &["a@x.test"]).await;
    assert!(is_temp(&r, "not allowed by the MTA-STS policy"), "{r:?}");
    h.abort();
}

#[tokio::test]
async fn smtp_auth_is_never_sent_to_an_mx_chosen_by_unsigned_dns() {
    let ca = TestCa::new();
    let auth_script = |names: &[&str]| {
        let mut s = starttls_script(&ca, names);
        s.exts_tls = Some(vec!["AUTH PLAIN".into()]);
        s
    };
    // Certificate checks pass in every case: only the source of the MX name differs.
    let mut fallback =
        dane_mock(vec![TlsaRecord { usage: 1, selector: 1, matching: 1, data: vec![1; 32] }], Security::Secure);
    fallback.sts = Box::new(|_| Ok(None));
    let cases: [(DownstreamTls, &[&str], Mock); 4] = [
        (DownstreamTls::MtaSts, &["mx.x.test"], Mock::default()),
        (DownstreamTls::Verify, &["mx.x.test"], Mock::default()),
        (DownstreamTls::Secure, &["x.test"], Mock::default()),
        // `dane` without usable TLSA records falls back to certificate checks.
        (DownstreamTls::Dane, &["mx.x.test"], fallback),
    ];
    for (policy, names, lookup) in cases {
        let (port, h) = start(auth_script(names)).await;
        let d = with_auth(downstream(None, port, policy, Some(&ca)));
        let r = run_mx(&d, &lookup, &["a@x.test"]).await;
        assert!(is_temp(&r, "not authenticated by DANE"), "{policy:?}: {r:?}");
        let t = transcript(h).await;
        assert!(!t.sent("AUTH") && !t.sent("MAIL"), "{policy:?}: {:?}", t.commands);
    }

    // A DANE-authenticated MX gets the credentials.
    let untrusted = TestCa::new();
    let (tls, spki) = untrusted.server(&["whatever.test"]);
    let script = Script {
        exts: vec!["STARTTLS".into()],
        exts_tls: Some(vec!["AUTH PLAIN".into()]),
        tls: Some(tls),
        ..Script::default()
    };
    let (port, h) = start(script).await;
    let d = with_auth(downstream(None, port, DownstreamTls::Dane, Some(&ca)));
    let good = TlsaRecord { usage: 3, selector: 1, matching: 1, data: Sha256::digest(&spki).to_vec() };
    assert_eq!(
        run_mx(&d, &dane_mock(vec![good], Security::Secure), &["a@x.test"]).await.unwrap(),
        vec![RcptOutcome::Accepted]
    );
    assert!(transcript(h).await.tls_commands.iter().any(|c| c.starts_with("AUTH PLAIN ")));
}
