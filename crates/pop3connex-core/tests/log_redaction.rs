//! A full session at TRACE level must not leave the password, the AUTH
//! payload or the master key in the logs.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use common::{Fixture, PASSWORD};
use pop3connex_core::pop3::ListenerKind;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .json()
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let f = Fixture::new("redact").await;
    f.add_user("alice").await;
    f.deliver("alice", b"Subject: s\r\n\r\nb\r\n").await;
    let ctx = f.pop3_ctx(Fixture::trusting_cfg());
    let payload = base64::engine::general_purpose::STANDARD.encode(format!("\0alice\0{PASSWORD}"));
    let wrong_payload = base64::engine::general_purpose::STANDARD.encode("\0alice\0Wrong-Pass-123");

    let mut c = f.connect_pop3(ctx.clone(), ListenerKind::StartTls);
    c.line().await;
    c.cmd("USER alice").await;
    assert!(c.cmd("PASS Wrong-Pass-123").await.starts_with("-ERR"));
    assert!(c.cmd(&format!("AUTH PLAIN {wrong_payload}")).await.starts_with("-ERR"));
    c.login("alice").await;
    c.cmd("QUIT").await;
    let mut c = f.connect_pop3(ctx, ListenerKind::StartTls);
    c.line().await;
    assert!(c.cmd(&format!("AUTH PLAIN {payload}")).await.starts_with("+OK"));
    c.cmd("QUIT").await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("auth_failure") && logs.contains("auth_success"), "the session was logged: {logs}");
    for secret in [PASSWORD, "Wrong-Pass-123", payload.as_str(), wrong_payload.as_str()] {
        assert!(!logs.contains(secret), "secret {secret:?} found in logs");
    }
}
