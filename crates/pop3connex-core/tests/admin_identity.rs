//! Administrators of the admin plane against a temporary store: accounts
//! and password login, TOTP with a test clock, recovery codes, WebAuthn
//! with a software authenticator, service tokens, principals and roles, and
//! that no factor secret, token or recovery code reaches the database in
//! clear.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pop3connex_core::admin::admins::{AdminAuthError, FactorKind};
use pop3connex_core::admin::{Actor, Admin, AdminError};
use pop3connex_core::config::{AuthConfig, Config, PasswordScheme};
use pop3connex_core::rbac::{Permission, PermissionSet};
use webauthn_authenticator_rs::prelude::{CreationChallengeResponse, RequestChallengeResponse, Url};
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_authenticator_rs::WebauthnAuthenticator;

const PASSWORD: &str = "correct horse battery staple";
const ORIGIN: &str = "https://admin.example.org";

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

impl Capture {
    fn records(&self) -> Vec<serde_json::Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect()
    }

    /// Admin action records: (action, target, outcome).
    fn actions(&self) -> Vec<(String, String, String)> {
        self.records()
            .iter()
            .filter(|v| v["message"] == "admin action")
            .map(|v| {
                let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                (s("admin.action"), s("admin.target"), s("outcome"))
            })
            .collect()
    }

    fn alerts(&self) -> Vec<String> {
        self.records()
            .iter()
            .filter(|v| v["alert"] == true)
            .map(|v| v["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

struct Setup {
    admin: Admin,
    log: Capture,
    dir: PathBuf,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Setup {
    /// The database and its WAL, as bytes.
    fn db_bytes(&self) -> Vec<u8> {
        let db = &self.admin.config().store.path;
        let mut bytes = std::fs::read(db).unwrap();
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        if let Ok(w) = std::fs::read(PathBuf::from(wal)) {
            bytes.extend_from_slice(&w);
        }
        bytes
    }
}

async fn setup(name: &str) -> Setup {
    let log = Capture::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .json()
        .flatten_event(true)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let dir = std::env::temp_dir().join(format!("p3x-identity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let report = pop3connex_core::init::init_data_dir(&dir, "localhost").unwrap();
    let mut text = std::fs::read_to_string(&report.config).unwrap();
    text.push_str(&format!(
        "\n[admin]\nlisten = [\"127.0.0.1:8443\"]\npublic_origin = \"{ORIGIN}\"\nmax_token_days = 30\n\
         [admin.roles.helpdesk]\npermissions = [\"users.read\", \"users.write\"]\ndomains = [\"example.org\"]\n\
         [admin.roles.automation]\npermissions = [\"users.read\", \"bans.read\", \"tokens.write\"]\n"
    ));
    std::fs::write(&report.config, text).unwrap();
    let mut cfg = Config::load(&report.config).unwrap();
    cfg.auth = AuthConfig {
        password_scheme: PasswordScheme::Argon2id,
        argon2_memory_kib: 8192,
        argon2_iterations: 1,
        failure_delay_ms: 0,
        ..AuthConfig::default()
    };
    let admin = Admin::open(cfg).await.unwrap();
    Setup { admin, log, dir, _guard: guard }
}

fn cli() -> Actor {
    Actor::Cli { os_user: Some("operator".into()) }
}

fn roles(r: &[&str]) -> Vec<String> {
    r.iter().map(|s| s.to_string()).collect()
}

fn localhost() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn totp_at(secret_base32: &str, t: u64) -> String {
    let key = totp_rs::Secret::Encoded(secret_base32.to_owned()).to_bytes().unwrap();
    totp_rs::TOTP::new_unchecked(totp_rs::Algorithm::SHA1, 6, 0, 30, key).generate(t)
}

/// An administrator with a confirmed TOTP factor: (id, base32 secret,
/// recovery codes, the time step used to confirm).
async fn with_totp(s: &Setup, name: &str, role: &[&str]) -> (i64, String, Vec<String>, u64) {
    let info = s.admin.admin_add(&cli(), name, PASSWORD, &roles(role)).await.unwrap();
    let enrol = s.admin.totp_begin(info.id, "phone").await.unwrap();
    let t = now();
    let codes = s
        .admin
        .totp_finish(&cli(), info.id, &enrol.pending_id, &totp_at(&enrol.secret_base32, t), t)
        .await
        .unwrap()
        .expect("first factor: recovery codes");
    (info.id, enrol.secret_base32.to_string(), codes, t)
}

#[tokio::test]
async fn administrators_are_added_listed_changed_and_removed() {
    let s = setup("lifecycle").await;
    let a = &s.admin;
    let info = a.admin_add(&cli(), "Alice", PASSWORD, &roles(&["superadmin"])).await.unwrap();
    assert_eq!((info.name.as_str(), info.enabled, info.factors.len()), ("alice", true, 0));
    assert!(matches!(a.admin_add(&cli(), "alice", PASSWORD, &roles(&["auditor"])).await, Err(AdminError::Conflict(_))));
    assert!(matches!(a.admin_add(&cli(), "bob", PASSWORD, &roles(&["root"])).await, Err(AdminError::BadInput(_))));
    assert!(matches!(a.admin_add(&cli(), "bob", PASSWORD, &[]).await, Err(AdminError::BadInput(_))));
    assert!(matches!(a.admin_add(&cli(), "bo b", PASSWORD, &roles(&["auditor"])).await, Err(AdminError::BadInput(_))));
    // The users' password policy applies.
    assert!(matches!(a.admin_add(&cli(), "bob", "short", &roles(&["auditor"])).await, Err(AdminError::Refused(_))));
    a.admin_add(&cli(), "bob", PASSWORD, &roles(&["auditor", "helpdesk", "auditor"])).await.unwrap();

    let list = a.admin_list(&cli()).await.unwrap();
    assert_eq!(list.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["alice", "bob"]);
    assert_eq!(list[1].roles, ["auditor", "helpdesk"], "duplicates dropped, order kept");

    a.admin_set_roles(&cli(), "bob", &roles(&["mailbox-admin"])).await.unwrap();
    assert!(matches!(a.admin_set_roles(&cli(), "bob", &roles(&["nope"])).await, Err(AdminError::BadInput(_))));
    assert!(matches!(a.admin_set_roles(&cli(), "ghost", &roles(&["auditor"])).await, Err(AdminError::NotFound(_))));
    a.admin_set_enabled(&cli(), "bob", false).await.unwrap();
    let bob = a.admin_list(&cli()).await.unwrap().into_iter().find(|i| i.name == "bob").unwrap();
    assert_eq!((bob.roles.as_slice(), bob.enabled), (&["mailbox-admin".to_string()][..], false));
    a.admin_set_enabled(&cli(), "bob", true).await.unwrap();

    a.admin_set_password(&cli(), "bob", "another long passphrase here").await.unwrap();
    assert!(a.admin_verify_password("bob", PASSWORD).await.is_err());
    assert!(a.admin_verify_password("bob", "another long passphrase here").await.is_ok());

    a.admin_remove(&cli(), "bob").await.unwrap();
    assert!(matches!(a.admin_remove(&cli(), "bob").await, Err(AdminError::NotFound(_))));
    assert_eq!(a.admin_list(&cli()).await.unwrap().len(), 1);

    let actions = s.log.actions();
    for op in
        ["admin.add", "admin.list", "admin.roles", "admin.disable", "admin.enable", "admin.passwd", "admin.remove"]
    {
        assert!(actions.iter().any(|(a, t, o)| a == op && o == "ok" && (t == "bob" || t == "*")), "{op}: {actions:?}");
    }
    assert!(actions.iter().any(|(a, t, o)| a == "admin.add" && t == "alice" && o == "ok"));
    assert!(s.log.alerts().iter().any(|m| m == "administrator roles changed"));
    assert!(!s.log.text().contains(PASSWORD), "a password reached the log");
}

/// The fastest of ten wrong-password logins as `known` and as `unknown`,
/// interleaved so that load from other tests hits both alike.
async fn fastest(a: &Admin, known: &str, unknown: &str) -> (Duration, Duration) {
    let (mut k, mut u) = (Duration::MAX, Duration::MAX);
    for _ in 0..10 {
        for (name, best) in [(known, &mut k), (unknown, &mut u)] {
            let t = Instant::now();
            let _ = a.admin_verify_password(name, "wrong password").await;
            *best = (*best).min(t.elapsed());
        }
    }
    (k, u)
}

#[tokio::test]
async fn password_login_has_no_name_oracle() {
    let s = setup("login").await;
    let a = &s.admin;
    a.admin_add(&cli(), "alice", PASSWORD, &roles(&["auditor"])).await.unwrap();
    let info = a.admin_verify_password("ALICE", PASSWORD).await.unwrap();
    assert_eq!(info.name, "alice");
    assert!(matches!(a.admin_verify_password("alice", "wrong password").await, Err(AdminAuthError::Invalid)));
    assert!(matches!(a.admin_verify_password("nobody", PASSWORD).await, Err(AdminAuthError::Invalid)));
    assert!(matches!(a.admin_verify_password("bad name!", PASSWORD).await, Err(AdminAuthError::Invalid)));
    assert!(matches!(a.admin_verify_password("alice", &"x".repeat(5000)).await, Err(AdminAuthError::Invalid)));

    // An unknown name still costs a password hash: compare the fastest of
    // several tries (Argon2id at 8 MiB takes milliseconds; a lookup alone
    // takes microseconds).
    // Without the dummy hash an unknown name answers ~50 times faster.
    let (known, unknown) = fastest(a, "alice", "nobody").await;
    assert!(unknown * 4 >= known, "unknown name {unknown:?} vs known {known:?}: no hash for unknown names?");

    a.admin_set_enabled(&cli(), "alice", false).await.unwrap();
    assert!(matches!(a.admin_verify_password("alice", PASSWORD).await, Err(AdminAuthError::Refused)));
    assert!(matches!(a.admin_verify_password("alice", "wrong password").await, Err(AdminAuthError::Invalid)));
    assert!(matches!(a.principal_for_admin(info.id, localhost()).await, Err(AdminAuthError::Refused)));
}

#[tokio::test]
async fn totp_with_a_test_clock() {
    let s = setup("totp").await;
    let a = &s.admin;
    let (id, secret, codes, t0) = with_totp(&s, "alice", &["superadmin"]).await;
    assert_eq!(codes.len(), 10);
    assert!(s.log.alerts().iter().any(|m| m == "administrator second factor enrolled"));
    assert!(s.log.actions().iter().any(|(op, t, o)| op == "admin.mfa.enrol" && t == "alice" && o == "ok"));
    let info = a.admin_verify_password("alice", PASSWORD).await.unwrap();
    assert_eq!(info.factors.len(), 1);
    assert_eq!((info.factors[0].kind, info.factors[0].label.as_str()), (FactorKind::Totp, "phone"));

    // The confirming code's step is used up.
    let step0 = t0 / 30 * 30;
    assert!(matches!(a.totp_verify(id, &totp_at(&secret, step0), step0).await, Err(AdminAuthError::Invalid)));
    // The next step, then one step late: fine once each.
    let t1 = step0 + 30;
    a.totp_verify(id, &totp_at(&secret, t1), t1).await.unwrap();
    assert!(matches!(a.totp_verify(id, &totp_at(&secret, t1), t1).await, Err(AdminAuthError::Invalid)), "replay");
    let t2 = step0 + 60;
    a.totp_verify(id, &totp_at(&secret, t2), t2 + 30).await.unwrap();
    // One step early is accepted.
    let t4 = step0 + 120;
    a.totp_verify(id, &totp_at(&secret, t4), t4 - 30).await.unwrap();
    // An older step than the last accepted one is refused even inside the window.
    let t3 = step0 + 90;
    assert!(matches!(a.totp_verify(id, &totp_at(&secret, t3), t4).await, Err(AdminAuthError::Invalid)));
    // Out of the window: two steps away.
    let t6 = step0 + 180;
    assert!(matches!(a.totp_verify(id, &totp_at(&secret, t6), t6 + 60).await, Err(AdminAuthError::Invalid)));
    assert!(matches!(a.totp_verify(id, &totp_at(&secret, t6 + 90), t6).await, Err(AdminAuthError::Invalid)));
    a.totp_verify(id, &totp_at(&secret, t6), t6).await.unwrap();
    for bad in ["", "12345", "1234567", "abcdef"] {
        assert!(matches!(a.totp_verify(id, bad, t6 + 300).await, Err(AdminAuthError::Invalid)), "{bad}");
    }

    // A wrong code does not confirm an enrolment; a second factor brings no new codes.
    let enrol = a.totp_begin(id, "tablet").await.unwrap();
    assert!(enrol.otpauth_uri.starts_with("otpauth://totp/POP3conneX:alice?secret="), "{}", &*enrol.otpauth_uri);
    assert!(enrol.otpauth_uri.contains("&issuer=POP3conneX&algorithm=SHA1&digits=6&period=30"));
    let t = now();
    let wrong = if totp_at(&enrol.secret_base32, t) == "000000" { "111111" } else { "000000" };
    assert!(matches!(a.totp_finish(&cli(), id, &enrol.pending_id, wrong, t).await, Err(AdminError::Refused(_))));
    assert!(a.admin_verify_password("alice", PASSWORD).await.unwrap().factors.len() == 1, "pending is not a factor");
    let r = a.totp_finish(&cli(), id, &enrol.pending_id, &totp_at(&enrol.secret_base32, t), t).await.unwrap();
    assert_eq!(r, None);
    assert!(matches!(
        a.totp_finish(&cli(), id, &enrol.pending_id, &totp_at(&enrol.secret_base32, t), t).await,
        Err(AdminError::NotFound(_))
    ));
    let factors = a.admin_verify_password("alice", PASSWORD).await.unwrap().factors;
    assert_eq!(factors.len(), 2);

    // Disabled administrators are refused even with a right code.
    a.admin_set_enabled(&cli(), "alice", false).await.unwrap();
    let t8 = t6 + 600;
    assert!(matches!(a.totp_verify(id, &totp_at(&secret, t8), t8).await, Err(AdminAuthError::Refused)));
    a.admin_set_enabled(&cli(), "alice", true).await.unwrap();

    // Removing a factor and resetting all.
    a.factor_remove(&cli(), id, factors[1].id).await.unwrap();
    assert!(matches!(a.factor_remove(&cli(), id, factors[1].id).await, Err(AdminError::NotFound(_))));
    assert!(a.admin_has_factor(id).await.unwrap());
    a.admin_reset_mfa(&cli(), "alice").await.unwrap();
    assert!(!a.admin_has_factor(id).await.unwrap());
    assert_eq!(a.recovery_codes_left(id).await.unwrap(), 0);
    assert!(matches!(a.totp_verify(id, &totp_at(&secret, t8), t8).await, Err(AdminAuthError::Invalid)));
    // Without a factor the principal still exists (the web layer limits it to enrolment).
    let p = a.principal_for_admin(id, localhost()).await.unwrap();
    assert_eq!(p.permissions, PermissionSet::all());
    let alerts = s.log.alerts();
    assert!(alerts.iter().any(|m| m == "administrator second factor removed"));
    assert!(alerts.iter().any(|m| m == "administrator second factors reset"));
}

#[tokio::test]
async fn recovery_codes_work_once() {
    let s = setup("recovery").await;
    let a = &s.admin;
    let (id, _, codes, _) = with_totp(&s, "alice", &["auditor"]).await;
    assert_eq!(codes.iter().collect::<std::collections::HashSet<_>>().len(), 10);
    a.recovery_code_use(id, &codes[0], "192.0.2.9".parse().unwrap()).await.unwrap();
    assert!(
        matches!(a.recovery_code_use(id, &codes[0], "192.0.2.9".parse().unwrap()).await, Err(AdminAuthError::Invalid)),
        "one-time"
    );
    a.recovery_code_use(id, &codes[1].to_uppercase(), "192.0.2.9".parse().unwrap()).await.unwrap();
    assert!(matches!(
        a.recovery_code_use(id, "abcde-fghij", "192.0.2.9".parse().unwrap()).await,
        Err(AdminAuthError::Invalid)
    ));
    assert!(matches!(a.recovery_code_use(id, "", "192.0.2.9".parse().unwrap()).await, Err(AdminAuthError::Invalid)));
    assert_eq!(a.recovery_codes_left(id).await.unwrap(), 8);
    assert!(s.log.alerts().iter().any(|m| m == "administrator used a recovery code"));
    assert!(s.log.actions().iter().any(|(op, _, o)| op == "admin.recovery.use" && o == "ok"));
    let q = pop3connex_core::admin::AuditQuery { limit: 50, ..Default::default() };
    let audit = a.audit_log_read(&cli(), &q).await.unwrap();
    assert!(
        audit.iter().any(|r| r.action == "admin.recovery.use" && r.actor.ends_with("@192.0.2.9")),
        "the recovery code's audit record names the client's address"
    );

    let fresh = a.recovery_codes_regenerate(&cli(), id).await.unwrap();
    assert_eq!(a.recovery_codes_left(id).await.unwrap(), 10);
    assert!(
        matches!(a.recovery_code_use(id, &codes[2], "192.0.2.9".parse().unwrap()).await, Err(AdminAuthError::Invalid)),
        "old codes are gone"
    );
    a.recovery_code_use(id, &fresh[0], "192.0.2.9".parse().unwrap()).await.unwrap();
}

#[tokio::test]
async fn principals_carry_role_permissions_and_domain_scope() {
    let s = setup("principal").await;
    let a = &s.admin;
    let help = a.admin_add(&cli(), "helper", PASSWORD, &roles(&["helpdesk"])).await.unwrap();
    let p = a.principal_for_admin(help.id, localhost()).await.unwrap();
    assert_eq!(p.actor, Actor::Admin { name: "helper".into(), address: localhost() });
    assert_eq!((p.admin_id, p.token_id.as_deref()), (Some(help.id), None));
    assert!(p.can(Permission::UsersWrite) && !p.can(Permission::UsersDelete) && !p.can(Permission::AuditRead));
    assert!(p.may_touch_user("a@example.org") && !p.may_touch_user("a@example.com") && !p.may_touch_user("root"));

    let aud = a.admin_add(&cli(), "aud", PASSWORD, &roles(&["auditor"])).await.unwrap();
    let p = a.principal_for_admin(aud.id, localhost()).await.unwrap();
    assert!(p.can(Permission::AuditRead) && !p.can(Permission::UsersWrite) && p.may_touch_user("root"));
    // Role changes apply to the next principal.
    a.admin_set_roles(&cli(), "aud", &roles(&["key-custodian"])).await.unwrap();
    let p = a.principal_for_admin(aud.id, localhost()).await.unwrap();
    assert!(p.can(Permission::KeysRotate) && !p.can(Permission::UsersRead));
    assert!(matches!(a.principal_for_admin(9999, localhost()).await, Err(AdminAuthError::Invalid)));
}

#[tokio::test]
async fn service_tokens_are_least_privilege() {
    let s = setup("tokens").await;
    let a = &s.admin;
    let auto = a.admin_add(&cli(), "robot-owner", PASSWORD, &roles(&["automation"])).await.unwrap();
    let creator = a.principal_for_admin(auto.id, localhost()).await.unwrap();
    let read: PermissionSet = [Permission::UsersRead].into_iter().collect();
    let week = now() + 7 * 86_400;

    // More rights than the creator, no rights, bad expiries: refused.
    let more: PermissionSet = [Permission::UsersRead, Permission::UsersWrite].into_iter().collect();
    assert!(matches!(a.token_create(&creator, "t", &more, week, &[]).await, Err(AdminError::Refused(_))));
    assert!(matches!(
        a.token_create(&creator, "t", &PermissionSet::default(), week, &[]).await,
        Err(AdminError::BadInput(_))
    ));
    assert!(matches!(a.token_create(&creator, "t", &read, now() - 1, &[]).await, Err(AdminError::Refused(_))));
    assert!(matches!(
        a.token_create(&creator, "t", &read, now() + 31 * 86_400, &[]).await,
        Err(AdminError::Refused(_))
    ));
    // Without tokens.write nobody creates tokens.
    let aud = a.admin_add(&cli(), "aud", PASSWORD, &roles(&["auditor"])).await.unwrap();
    let aud_p = a.principal_for_admin(aud.id, localhost()).await.unwrap();
    assert!(matches!(a.token_create(&aud_p, "t", &read, week, &[]).await, Err(AdminError::Refused(_))));

    let (info, token) = a.token_create(&creator, "backup script", &read, week, &[]).await.unwrap();
    assert!(token.starts_with(&format!("p3x_{}_", info.id)), "{}", info.id);
    assert_eq!((info.creator.as_str(), info.permissions.as_slice()), ("robot-owner", &["users.read".to_string()][..]));
    let src: IpAddr = "192.0.2.7".parse().unwrap();
    let p = a.token_authenticate(&token, src).await.unwrap();
    assert_eq!(p.actor, Actor::ServiceToken { id: info.id.clone() });
    assert_eq!((p.admin_id, p.token_id.as_deref()), (None, Some(info.id.as_str())));
    assert_eq!(p.permissions, read);
    let listed = a.token_list(&cli()).await.unwrap();
    let row = listed.iter().find(|t| t.id == info.id).unwrap();
    assert_eq!(row.last_used_from.as_deref(), Some("192.0.2.7"));
    assert!(row.last_used_at.is_some());

    // A token principal never creates tokens, even holding tokens.write.
    let all_auto: PermissionSet = [Permission::UsersRead, Permission::TokensWrite].into_iter().collect();
    let (_, t2) = a.token_create(&creator, "creator", &all_auto, week, &[]).await.unwrap();
    let tp = a.token_authenticate(&t2, src).await.unwrap();
    assert!(tp.can(Permission::TokensWrite));
    assert!(matches!(a.token_create(&tp, "child", &read, week, &[]).await, Err(AdminError::Refused(_))));

    // Wrong secrets and malformed tokens.
    let mut wrong = token.to_string();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'A' { 'B' } else { 'A' });
    for bad in [wrong.as_str(), "p3x_0000000000000000_abc", "", "Bearer x", &token[..token.len() - 2]] {
        assert!(matches!(a.token_authenticate(bad, src).await, Err(AdminAuthError::Invalid)), "{bad}");
    }

    // Network restriction.
    let nets = ["10.0.0.0/8".parse().unwrap()];
    let (_, netted) = a.token_create(&creator, "lan only", &read, week, &nets).await.unwrap();
    assert!(matches!(a.token_authenticate(&netted, src).await, Err(AdminAuthError::Refused)));
    a.token_authenticate(&netted, "10.1.2.3".parse().unwrap()).await.unwrap();
    a.token_authenticate(&netted, "::ffff:10.1.2.3".parse().unwrap()).await.unwrap();

    // Revocation.
    a.token_revoke(&cli(), &info.id).await.unwrap();
    assert!(matches!(a.token_authenticate(&token, src).await, Err(AdminAuthError::Invalid)));
    assert!(matches!(a.token_revoke(&cli(), "0000000000000000").await, Err(AdminError::NotFound(_))));
    assert!(a.token_list(&cli()).await.unwrap().iter().find(|t| t.id == info.id).unwrap().revoked);

    // Expiry.
    let (_, short) = a.token_create(&creator, "short", &read, now() + 2, &[]).await.unwrap();
    a.token_authenticate(&short, src).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert!(matches!(a.token_authenticate(&short, src).await, Err(AdminAuthError::Invalid)));

    // A creator who loses a permission takes it from the token; a disabled
    // creator disables it.
    a.admin_set_roles(&cli(), "robot-owner", &roles(&["security-operator"])).await.unwrap();
    let tp = a.token_authenticate(&t2, src).await.unwrap();
    assert_eq!(tp.permissions, read, "tokens.write is gone with the role");
    a.admin_set_enabled(&cli(), "robot-owner", false).await.unwrap();
    assert!(matches!(a.token_authenticate(&t2, src).await, Err(AdminAuthError::Refused)));
    a.admin_set_enabled(&cli(), "robot-owner", true).await.unwrap();
    // Removing the creator removes its tokens.
    a.admin_remove(&cli(), "robot-owner").await.unwrap();
    assert!(matches!(a.token_authenticate(&t2, src).await, Err(AdminAuthError::Invalid)));

    let actions = s.log.actions();
    assert!(actions.iter().any(|(op, t, o)| op == "token.create" && t == "backup script" && o == "ok"));
    assert!(actions.iter().any(|(op, t, o)| op == "token.revoke" && *t == info.id && o == "ok"));
    assert!(actions.iter().any(|(op, _, o)| op == "token.create" && o == "refused"));
    assert!(s.log.alerts().iter().any(|m| m == "service token created"));
    assert!(!s.log.text().contains(token.as_str()), "a token reached the log");
}

#[tokio::test]
async fn webauthn_with_a_software_authenticator() {
    let s = setup("webauthn").await;
    let a = &s.admin;
    let info = a.admin_add(&cli(), "alice", PASSWORD, &roles(&["superadmin"])).await.unwrap();
    let origin = Url::parse(ORIGIN).unwrap();
    let mut key = WebauthnAuthenticator::new(SoftPasskey::new(true));

    let (options, state) = a.webauthn_register_begin(info.id, "yubikey").await.unwrap();
    let options: CreationChallengeResponse = serde_json::from_value(options).unwrap();
    let response = serde_json::to_value(key.do_registration(origin.clone(), options).unwrap()).unwrap();
    let codes = a.webauthn_register_finish(&cli(), info.id, &state, &response).await.unwrap();
    assert_eq!(codes.map(|c| c.len()), Some(10), "first factor: recovery codes");
    let factors = a.admin_verify_password("alice", PASSWORD).await.unwrap().factors;
    assert_eq!((factors.len(), factors[0].kind), (1, FactorKind::WebAuthn));
    // The same registration state cannot register again.
    assert!(a.webauthn_register_finish(&cli(), info.id, &state, &response).await.is_err());

    let (options, state) = a.webauthn_auth_begin(info.id).await.unwrap();
    let options: RequestChallengeResponse = serde_json::from_value(options).unwrap();
    let response = serde_json::to_value(key.do_authentication(origin.clone(), options).unwrap()).unwrap();
    a.webauthn_auth_finish(info.id, &state, &response).await.unwrap();
    // Replayed assertion (with its state): refused.
    assert!(matches!(a.webauthn_auth_finish(info.id, &state, &response).await, Err(AdminAuthError::Invalid)));

    // An assertion made on another origin (a subdomain, which the
    // authenticator accepts for this relying-party id): refused.
    let (options, state) = a.webauthn_auth_begin(info.id).await.unwrap();
    let options: RequestChallengeResponse = serde_json::from_value(options).unwrap();
    let evil = Url::parse("https://evil.admin.example.org").unwrap();
    let response = serde_json::to_value(key.do_authentication(evil, options).unwrap()).unwrap();
    assert!(matches!(a.webauthn_auth_finish(info.id, &state, &response).await, Err(AdminAuthError::Invalid)));

    // A state of another administrator, or garbage: refused.
    let (options, state) = a.webauthn_auth_begin(info.id).await.unwrap();
    let options: RequestChallengeResponse = serde_json::from_value(options).unwrap();
    let response = serde_json::to_value(key.do_authentication(origin.clone(), options).unwrap()).unwrap();
    assert!(matches!(a.webauthn_auth_finish(info.id + 1, &state, &response).await, Err(AdminAuthError::Invalid)));
    assert!(matches!(a.webauthn_auth_finish(info.id, "{}", &response).await, Err(AdminAuthError::Invalid)));
    a.webauthn_auth_finish(info.id, &state, &response).await.unwrap();
    let factors = a.admin_verify_password("alice", PASSWORD).await.unwrap().factors;
    assert!(factors[0].last_used_at.is_some());

    // No passkey: nothing to begin with.
    let bob = a.admin_add(&cli(), "bob", PASSWORD, &roles(&["auditor"])).await.unwrap();
    assert!(matches!(a.webauthn_auth_begin(bob.id).await, Err(AdminAuthError::Invalid)));
}

#[tokio::test]
async fn no_secret_reaches_the_database_in_clear() {
    let s = setup("at-rest").await;
    let a = &s.admin;
    let (id, secret, codes, _) = with_totp(&s, "alice", &["superadmin"]).await;
    let creator = a.principal_for_admin(id, localhost()).await.unwrap();
    let read: PermissionSet = [Permission::UsersRead].into_iter().collect();
    let (_, token) = a.token_create(&creator, "t", &read, now() + 86_400, &[]).await.unwrap();
    let token_secret = token.rsplit_once('_').map(|(_, s)| s.to_owned()).unwrap();
    let raw_totp = totp_rs::Secret::Encoded(secret.clone()).to_bytes().unwrap();

    let db = s.db_bytes();
    let contains = |needle: &[u8]| db.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"alice"), "the scan reads the database");
    assert!(!contains(&raw_totp), "TOTP key in clear");
    assert!(!contains(secret.as_bytes()), "TOTP key (base32) in clear");
    assert!(!contains(token.as_bytes()) && !contains(token_secret.as_bytes()), "token in clear");
    for c in &codes {
        assert!(!contains(c.as_bytes()) && !contains(c.replace('-', "").as_bytes()), "recovery code in clear");
    }
    assert!(!contains(PASSWORD.as_bytes()), "password in clear");
}
