//! Lockouts, bans and the command rate limit through real POP3 sessions.

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Fixture, PASSWORD};
use pop3connex_core::config::{AbuseConfig, Pop3Config};
use pop3connex_core::pop3::{ListenerKind, Pop3Context};
use pop3connex_core::security::{Guard, SecurityState};

fn ctx_with(f: &Fixture, abuse: AbuseConfig, clock: Arc<AtomicI64>) -> (Arc<Pop3Context>, Arc<Guard>) {
    let guard = Arc::new(Guard::new(abuse, Duration::ZERO, Arc::new(move || clock.load(Ordering::SeqCst))));
    let cfg = Pop3Config { max_auth_failures: 100, ..Fixture::trusting_cfg() };
    let ctx = Arc::new(Pop3Context {
        cfg,
        auth: f.auth.clone(),
        tls: f.tls.clone(),
        security: guard.clone(),
        max_commands_per_second: 1000,
        oauth: None,
    });
    (ctx, guard)
}

#[tokio::test]
async fn lockout_refuses_even_the_right_password_until_it_expires_or_from_a_known_address() {
    let f = Fixture::new("lockout").await;
    f.add_user("alice").await;
    let clock = Arc::new(AtomicI64::new(1_000_000));
    let abuse = AbuseConfig {
        lockout_after_failures: 3,
        lockout_secs: 60,
        ban_after_auth_failures: 100,
        ..AbuseConfig::default()
    };
    let (ctx, guard) = ctx_with(&f, abuse, clock.clone());
    let mut c = f.connect_pop3(ctx.clone(), ListenerKind::StartTls);
    c.line().await;
    for i in 0..3 {
        c.cmd("USER alice").await;
        let r = c.cmd("PASS wrong").await;
        // The third failure locks the name and says so.
        assert_eq!(r.contains("try again later"), i == 2, "{r}");
    }
    c.cmd("USER alice").await;
    let r = c.cmd(&format!("PASS {PASSWORD}")).await;
    assert!(r.starts_with("-ERR [AUTH]") && r.contains("try again later"), "{r}");
    // The same for a name that does not exist: no enumeration via lockouts.
    for _ in 0..3 {
        c.cmd("USER ghost").await;
        c.cmd("PASS wrong").await;
    }
    c.cmd("USER ghost").await;
    assert_eq!(c.cmd("PASS wrong").await, r);
    clock.fetch_add(61, Ordering::SeqCst);
    c.cmd("USER alice").await;
    assert!(c.cmd(&format!("PASS {PASSWORD}")).await.starts_with("+OK"), "lockout expired");
    drop(c);
    // From the test peer alice has now logged in: a new lockout spares it.
    for _ in 0..3 {
        guard.record_auth_failure("192.0.2.99".parse().unwrap(), Some("alice"));
    }
    assert!(guard.account_locked("alice", "192.0.2.99".parse().unwrap()));
    assert!(!guard.account_locked("alice", "127.0.0.1".parse().unwrap()));
}

#[tokio::test]
async fn ban_closes_the_connection_and_is_checked_at_accept() {
    let f = Fixture::new("ban").await;
    f.add_user("alice").await;
    let clock = Arc::new(AtomicI64::new(1_000_000));
    let abuse = AbuseConfig { ban_after_auth_failures: 3, ban_secs: 120, ..AbuseConfig::default() };
    let (ctx, guard) = ctx_with(&f, abuse, clock.clone());
    let mut c = f.connect_pop3(ctx, ListenerKind::StartTls);
    c.line().await;
    for i in 0..3 {
        c.cmd("USER alice").await;
        assert!(c.cmd("PASS wrong").await.starts_with("-ERR [AUTH]"), "attempt {i}");
    }
    assert_eq!(c.line().await, "", "banned: connection closed");
    let peer = "127.0.0.1".parse().unwrap();
    assert_eq!(guard.check_connection(peer), Some("banned"));
    assert_eq!(guard.check_connection("127.0.0.2".parse().unwrap()), None);
    clock.fetch_add(121, Ordering::SeqCst);
    assert_eq!(guard.check_connection(peer), None, "ban expired");
}

#[tokio::test(start_paused = true)]
async fn command_rate_is_limited() {
    let f = Fixture::new("rate").await;
    let guard = Arc::new(Guard::new(AbuseConfig::default(), Duration::ZERO, pop3connex_core::security::system_clock()));
    let ctx = Arc::new(Pop3Context {
        cfg: Pop3Config { max_bad_commands: 1000, ..Pop3Config::default() },
        auth: f.auth.clone(),
        tls: f.tls.clone(),
        security: guard,
        max_commands_per_second: 10,
        oauth: None,
    });
    let mut c = f.connect_pop3(ctx, ListenerKind::StartTls);
    c.line().await;
    let start = tokio::time::Instant::now();
    c.send(&"CAPA\r\n".repeat(40)).await;
    for _ in 0..40 {
        assert!(c.line().await.starts_with("+OK"));
        c.body().await;
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_secs(2), "40 commands at 10/s after a burst of 10 take 3 s, took {took:?}");
}

/// A context whose security state uses the system clock and no store.
fn ctx_cfg(f: &Fixture, cfg: Pop3Config, rate: u64) -> Arc<Pop3Context> {
    Arc::new(Pop3Context {
        cfg,
        auth: f.auth.clone(),
        tls: f.tls.clone(),
        security: Arc::new(Guard::new(
            AbuseConfig::default(),
            Duration::ZERO,
            pop3connex_core::security::system_clock(),
        )),
        max_commands_per_second: rate,
        oauth: None,
    })
}

/// Starts a session on a pipe and returns the client end and the session task.
fn spawn_session(f: &Fixture, ctx: Arc<Pop3Context>) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer = "127.0.0.1:40000".parse().unwrap();
    let task =
        tokio::spawn(pop3connex_core::pop3::serve(ctx, server, peer, ListenerKind::StartTls, f.shutdown.subscribe()));
    (client, task)
}

/// Regression (hardening item 5): buffered pipelined lines were served
/// without looking at the pre-auth deadline, so 40,000 pipelined CAPA read
/// slowly kept an unauthenticated connection busy well past it.
#[tokio::test(start_paused = true)]
async fn preauth_deadline_is_checked_before_each_pipelined_line() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::new("pipelined-preauth").await;
    let cfg = Pop3Config { preauth_timeout_secs: 60, ..Pop3Config::default() };
    let (client, _task) = spawn_session(&f, ctx_cfg(&f, cfg, 200));
    let (mut rd, mut wr) = tokio::io::split(client);
    let start = tokio::time::Instant::now();
    tokio::spawn(async move {
        let _ = wr.write_all("CAPA\r\n".repeat(40_000).as_bytes()).await;
        // Keep the write half open: only the server may end this.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(wr);
    });
    // A slow reader: 4 KiB every 100 ms.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(start.elapsed() < Duration::from_secs(300), "never closed");
    }
    let took = start.elapsed();
    assert!(took <= Duration::from_secs(63), "served for {took:?} with preauth_timeout_secs = 60");
    let text = String::from_utf8_lossy(&got);
    assert!(text.ends_with("-ERR Disconnected: no login in time\r\n"), "{}", &text[text.len().saturating_sub(200)..]);
}

/// Regression (hardening item 5): a client that pipelines and never reads
/// kept its socket (and the unsent output) for the 120 s write timeout,
/// past the pre-auth deadline.
#[tokio::test(start_paused = true)]
async fn preauth_deadline_bounds_writes_to_a_peer_that_never_reads() {
    use tokio::io::AsyncWriteExt;
    let f = Fixture::new("never-reads").await;
    let cfg = Pop3Config { preauth_timeout_secs: 60, ..Pop3Config::default() };
    let (client, task) = spawn_session(&f, ctx_cfg(&f, cfg, 1000));
    let (_rd, mut wr) = tokio::io::split(client);
    let start = tokio::time::Instant::now();
    tokio::spawn(async move {
        let _ = wr.write_all("CAPA\r\n".repeat(40_000).as_bytes()).await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(wr);
    });
    tokio::time::timeout(Duration::from_secs(100), task).await.expect("session still running after 100 s").unwrap();
    let took = start.elapsed();
    assert!(took <= Duration::from_secs(63), "session lasted {took:?} with preauth_timeout_secs = 60");
}

#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn lines_with(&self, what: &str) -> Vec<String> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines().filter(|l| l.contains(what)).map(str::to_owned).collect()
    }
}

/// Regression (hardening item 6): before STLS every USER/AUTH logged a WARN
/// event and did not count as a bad command, so one connection could write
/// thousands of log lines.
#[tokio::test(start_paused = true)]
async fn plaintext_credentials_before_stls_count_as_bad_commands_and_are_logged_at_a_bounded_rate() {
    use pop3connex_core::events::{flush_suppressed, ADDRESS_WINDOW, PER_ADDRESS_BURST, PER_CONNECTION_BURST};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).json().finish();
    let _log = tracing::subscriber::set_default(subscriber);

    let f = Fixture::new("plaintext-flood").await;
    let cfg = Pop3Config { max_bad_commands: 10, ..Pop3Config::default() };
    let ctx = ctx_cfg(&f, cfg, 1000);
    let (mut client, task) = spawn_session(&f, ctx.clone());
    let flood = "USER alice\r\n".repeat(2000) + &"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n".repeat(100);
    let _ = client.write_all(flood.as_bytes()).await;
    let mut out = Vec::new();
    let _ = client.read_to_end(&mut out).await;
    task.await.unwrap();
    let out = String::from_utf8(out).unwrap();
    let replies: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(replies.len(), 10, "closed at max_bad_commands: {replies:?}");
    assert!(replies[..9].iter().all(|r| r.starts_with("-ERR [AUTH]")), "{replies:?}");
    assert_eq!(replies[9], "-ERR Too many bad commands, closing connection");
    let refused = capture.lines_with("\"event\":\"plaintext_auth_refused\"");
    assert_eq!(refused.len(), PER_CONNECTION_BURST as usize, "per connection: {refused:?}");
    let summary = capture.lines_with("\"event\":\"suppressed\"");
    assert_eq!(summary.len(), 1, "{summary:?}");
    assert!(
        summary[0].contains("\"suppressed_event\":\"plaintext_auth_refused\"")
            && summary[0].contains("\"count\":7")
            && summary[0].contains("\"scope\":\"connection\""),
        "{}",
        summary[0]
    );

    // Many connections from one address: at most a burst per window.
    for _ in 0..20 {
        let (mut client, task) = spawn_session(&f, ctx.clone());
        let _ = client.write_all("USER alice\r\n".repeat(10).as_bytes()).await;
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out).await;
        task.await.unwrap();
    }
    let refused = capture.lines_with("\"event\":\"plaintext_auth_refused\"");
    assert_eq!(refused.len(), PER_ADDRESS_BURST as usize, "per address and window");
    tokio::time::advance(ADDRESS_WINDOW).await;
    flush_suppressed();
    // Each connection passes on its first few; the address lets the burst through.
    let held_back = 20 * PER_CONNECTION_BURST - (PER_ADDRESS_BURST - PER_CONNECTION_BURST);
    let by_address = capture.lines_with("\"scope\":\"address\"");
    assert!(
        by_address.iter().any(|l| l.contains("\"suppressed_event\":\"plaintext_auth_refused\"")
            && l.contains(&format!("\"count\":{held_back},"))),
        "{by_address:?}"
    );
    assert!(capture.lines_with("alice").iter().all(|l| !l.contains("AGFsaWNlAHNlY3JldA")), "no credentials logged");
}

/// Regression (hardening item 7): the addresses an account logged in from
/// were kept in memory only while lockouts persist, so after a restart the
/// owner was locked out together with the attacker.
#[tokio::test]
async fn owner_lockout_exemption_survives_a_restart() {
    let f = Fixture::new("known-restart").await;
    let store = f.mail.store().clone();
    let abuse = AbuseConfig { lockout_after_failures: 3, ban_after_auth_failures: 100, ..AbuseConfig::default() };
    let clock = pop3connex_core::security::system_clock;
    let home: std::net::IpAddr = "203.0.113.5".parse().unwrap();
    let home_same_64: std::net::IpAddr = "2001:db8:1:2::99".parse().unwrap();
    let attacker: std::net::IpAddr = "192.0.2.66".parse().unwrap();
    let alice = pop3connex_core::types::UserName::parse("alice").unwrap();
    {
        let before = Guard::new(abuse.clone(), Duration::ZERO, clock()).with_store(store.clone());
        before.record_auth_success(home, &alice);
        before.record_auth_success("2001:db8:1:2::1".parse().unwrap(), &alice);
        for _ in 0..3 {
            before.record_auth_failure(attacker, Some("alice"));
            before.record_auth_failure(attacker, Some("ghost"));
        }
        assert!(before.account_locked("alice", attacker));
        assert!(!before.account_locked("alice", home));
    }
    // A new process (or another node) on the same store.
    let after = Guard::new(abuse, Duration::ZERO, clock()).with_store(store.clone());
    let mut ready = false;
    for _ in 0..100 {
        after.refresh(&*store).await;
        if after.account_locked("alice", attacker) && !after.account_locked("alice", home) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "after a restart: alice locked for the attacker, not from her known address");
    assert!(!after.account_locked("alice", home_same_64), "IPv6 known per /64");
    assert!(after.account_locked("ghost", attacker));
    let now = pop3connex_core::types::unix_now();
    let known = store.locked_known_addresses(now, 0).await.unwrap();
    assert_eq!(known.len(), 2, "{known:?}");
    assert!(known.iter().all(|k| k.user == "alice"), "only the existing account that logged in: {known:?}");
}

/// Hardening item 18: allow/block list files were never loaded by a test.
/// Loading, the periodic re-read of a changed file, a forced re-read
/// (SIGHUP) and a malformed file (rejected whole, last good list kept).
#[tokio::test]
async fn blocklist_file_is_loaded_reread_and_a_malformed_one_keeps_the_last_good_list() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).finish();
    let _log = tracing::subscriber::set_default(subscriber);
    let f = Fixture::new("listfile").await;
    let store = f.mail.store().clone();
    let path = f.dir.join("block.txt");
    std::fs::write(&path, "# abuse\n203.0.113.0/24\n").unwrap();
    let abuse = AbuseConfig { blocklist_file: Some(path.clone()), ..AbuseConfig::default() };
    let g = Guard::new(abuse, Duration::ZERO, pop3connex_core::security::system_clock());
    let a: std::net::IpAddr = "203.0.113.9".parse().unwrap();
    let b: std::net::IpAddr = "198.51.100.7".parse().unwrap();
    assert_eq!(g.check_connection(a), None, "not loaded yet");
    g.load_lists().unwrap();
    assert_eq!(g.check_connection(a), Some("blocklisted"));
    g.refresh(&*store).await;
    assert_eq!(g.check_connection(a), Some("blocklisted"));
    assert_eq!(capture.lines_with("network list loaded").len(), 1, "an unchanged file is not parsed again");
    assert_eq!(g.check_connection(b), None);
    std::fs::write(&path, "198.51.100.7\n").unwrap();
    g.refresh(&*store).await;
    assert_eq!(g.check_connection(a), None, "changed file re-read");
    assert_eq!(g.check_connection(b), Some("blocklisted"));
    std::fs::write(&path, "203.0.113.0/24\nthis is not a network\n").unwrap();
    g.refresh(&*store).await;
    assert_eq!(g.check_connection(b), Some("blocklisted"), "last good list kept");
    assert_eq!(g.check_connection(a), None, "a malformed file is not applied in part");
    let errors = capture.lines_with("network list rejected");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("ERROR") && errors[0].contains("block.txt:2"), "{}", errors[0]);
    g.refresh(&*store).await;
    assert_eq!(capture.lines_with("network list rejected").len(), 1, "an unchanged file is not re-logged");
    g.reload(&*store).await;
    assert_eq!(capture.lines_with("network list rejected").len(), 2, "SIGHUP re-reads and says so again");
    std::fs::write(&path, "").unwrap();
    g.reload(&*store).await;
    assert_eq!(g.check_connection(b), None, "an empty file empties the list");
    // At start there is no previous list to keep: a malformed file is an error.
    std::fs::write(&path, "10.0.0.0/8\n10.0.0.300\n").unwrap();
    let e = g.load_lists().unwrap_err();
    assert!(e.contains("block.txt:2") && e.contains("10.0.0.300"), "{e}");
}
