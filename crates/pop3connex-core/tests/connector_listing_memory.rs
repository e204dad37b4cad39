//! Peak memory of the connector reading a hostile upstream's listing: a
//! million short UIDL entries, and LIST lines near the line limit, are cut
//! by the listing byte budget (`MAX_LISTING_BYTES`) with bounded memory.
//!
//! Alone in its test binary so the process's peak resident size (VmHWM,
//! reset through /proc/self/clear_refs) belongs to this test only. The
//! hostile server runs in the same process but streams its listing in
//! 64 KiB batches, so nearly all of the peak is the client's. The LIST case
//! runs first: memory freed by one case is reused by the next and would hide
//! its growth.

use std::sync::Arc;
use std::time::Duration;

use pop3connex_core::config::connector::AccountConfig;
use pop3connex_core::connector::tlsclient;
use pop3connex_core::connector::upstream::{Credential, Session, MAX_LISTING, MAX_LISTING_BYTES, MAX_STATUS_LINE};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use zeroize::Zeroizing;

/// Peak growth allowed while one hostile listing is read: the budget
/// itself plus the vector's doubling and allocator slack. Reading the
/// million short entries in full, with hash-set duplicate checks, as the
/// connector did before the budget, grew the peak by about 174 MiB.
const PEAK_LIMIT: u64 = 48 << 20;

fn status_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = text.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Starts a TLS POP3 server that logs anybody in and answers `cmd` with
/// `entries` lines from `line`; returns its port and the CA (PEM).
async fn hostile(cmd: &'static str, entries: usize, line: fn(usize) -> String) -> (u16, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let (r, mut w) = tokio::io::split(tls);
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"+OK hostile\r\n").await.unwrap();
        while let Ok(Some(l)) = lines.next_line().await {
            // Anything goes: USER, PASS and the listing command get +OK.
            let reply: &[u8] = if l == "CAPA" { b"+OK\r\nUSER\r\n.\r\n" } else { b"+OK\r\n" };
            if w.write_all(reply).await.is_err() {
                return;
            }
            if l != cmd {
                continue;
            }
            let mut batch = Vec::with_capacity(70 * 1024);
            for i in 1..=entries {
                batch.extend_from_slice(line(i).as_bytes());
                if batch.len() >= 64 * 1024 {
                    if w.write_all(&batch).await.is_err() {
                        return;
                    }
                    batch.clear();
                }
            }
            batch.extend_from_slice(b".\r\n");
            let _ = w.write_all(&batch).await;
        }
    });
    (port, ca_pem)
}

/// Logs in to a hostile server, resets the peak, reads the listing;
/// returns the error text and the peak growth in octets.
async fn listing_peak(cmd: &'static str, entries: usize, line: fn(usize) -> String) -> (String, u64) {
    let (port, ca_pem) = hostile(cmd, entries, line).await;
    let dir = std::env::temp_dir().join(format!("p3x-listing-{}-{cmd}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let mut account = AccountConfig::from_toml(&format!(
        "name = \"hostile\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"implicit\"\nuser = \"victim\"\n\
         password = \"env:UNUSED\"\nauth = \"user\"\n[route]\ndeliver_to = {{ local = \"victim\" }}\n"
    ))
    .unwrap();
    account.timeout_secs = 30;
    let roots = tlsclient::root_store(Some(&ca_file)).unwrap();
    let tls = Arc::new(tlsclient::client_config(roots, &[], &[]).unwrap());
    let mut s = Session::connect(&account, tls).await.unwrap();
    s.login(&account, &Credential::Password(Zeroizing::new("pw".into()))).await.unwrap();

    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS (Linux 4.0+)");
    let before = status_kib("VmRSS:");
    let err = match cmd {
        "UIDL" => s.uidl_all().await.map(|v| v.len()),
        _ => s.list_all().await.map(|v| v.len()),
    }
    .expect_err("the listing must be refused")
    .to_string();
    let peak = status_kib("VmHWM:");
    assert!(!s.is_usable(), "the session is poisoned");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    (err, peak.saturating_sub(before) * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_listing_memory_stays_bounded() {
    let run = async {
        let (err, list_peak) =
            listing_peak("LIST", 20_000, |i| format!("{i} 100 {}\r\n", "x".repeat(MAX_STATUS_LINE - 40))).await;
        assert!(err.contains(&format!("LIST listing exceeds {} MiB", MAX_LISTING_BYTES >> 20)), "{err}");
        let (err, uidl_peak) = listing_peak("UIDL", MAX_LISTING, |i| format!("{i} u{i}\r\n")).await;
        assert!(err.contains(&format!("UIDL listing exceeds {} MiB", MAX_LISTING_BYTES >> 20)), "{err}");
        println!(
            "peak RSS growth: UIDL of {MAX_LISTING} short entries {:.1} MiB; LIST of near-limit lines {:.1} MiB",
            uidl_peak as f64 / 1048576.0,
            list_peak as f64 / 1048576.0
        );
        assert!(uidl_peak < PEAK_LIMIT, "UIDL listing peak {uidl_peak} octets");
        assert!(list_peak < PEAK_LIMIT, "LIST listing peak {list_peak} octets");
    };
    tokio::time::timeout(Duration::from_secs(120), run).await.expect("finished in time");
}
