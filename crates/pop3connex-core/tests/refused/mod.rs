//! Accounts that refuse logins (locked out, disabled, password expired),
//! for the tests that check such an account answers a correct secret
//! exactly as it answers a wrong one.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use pop3connex_core::auth::Authenticator;
use pop3connex_core::config::{AbuseConfig, AuthConfig, Pop3Config};
use pop3connex_core::policy::PasswordPolicy;
use pop3connex_core::pop3::Pop3Context;
use pop3connex_core::security::{system_clock, Guard, SecurityState};
use pop3connex_core::types::UserName;

use crate::common::{cheap_auth, Fixture};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Locked out by failures from other addresses (so no per-IP ban).
    Locked,
    Disabled,
    /// Password older than the policy's maximum age.
    Expired,
}

pub const ALL: [Refusal; 3] = [Refusal::Locked, Refusal::Disabled, Refusal::Expired];

/// A POP3 context in which `user` (already created) refuses logins as
/// `how` says; plaintext credentials allowed from the test peer.
pub async fn context(f: &Fixture, user: &str, how: Refusal) -> (Arc<Pop3Context>, Arc<Guard>) {
    // Only the Locked case may lock: the others make many failed attempts.
    let lockout_after_failures = if how == Refusal::Locked { 3 } else { 1000 };
    let abuse = AbuseConfig { lockout_after_failures, ban_after_auth_failures: 1000, ..AbuseConfig::default() };
    let guard = Arc::new(Guard::new(abuse, Duration::ZERO, system_clock()));
    let mut auth = f.auth.clone();
    match how {
        Refusal::Locked => {
            for i in 1..=3 {
                guard.record_auth_failure(format!("192.0.2.{i}").parse().unwrap(), Some(user));
            }
            assert!(guard.account_locked(user, "127.0.0.1".parse().unwrap()));
        }
        Refusal::Disabled => f.mail.store().set_disabled(&UserName::parse(user).unwrap(), true).await.unwrap(),
        Refusal::Expired => {
            let db = rusqlite::Connection::open(f.dir.join("t.db")).unwrap();
            db.execute("UPDATE users SET password_changed_at = password_changed_at - 30 * 86400", []).unwrap();
            let cfg = AuthConfig {
                password_policy: PasswordPolicy { max_age_days: 20, ..PasswordPolicy::default() },
                ..cheap_auth()
            };
            auth = Arc::new(Authenticator::new(f.mail.clone(), cfg).unwrap());
        }
    }
    let ctx = Arc::new(Pop3Context {
        cfg: Pop3Config { max_auth_failures: 100, ..Fixture::trusting_cfg() },
        auth,
        tls: f.tls.clone(),
        security: guard.clone(),
        max_commands_per_second: 1000,
        oauth: None,
    });
    (ctx, guard)
}
