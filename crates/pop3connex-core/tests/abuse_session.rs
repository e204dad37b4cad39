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
