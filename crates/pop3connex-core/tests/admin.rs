//! The admin service layer against a temporary store: every operation the
//! CLI offers, called through the admin functions, with its results, its
//! errors by kind, and the one record each operation leaves (with the
//! actor, never a secret).

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pop3connex_core::admin::app_passwords::{expires_at, expiry_at, Expiry};
use pop3connex_core::admin::classes::check_class_name;
use pop3connex_core::admin::connector::Origin;
use pop3connex_core::admin::import::ImportFormat;
use pop3connex_core::admin::security::parse_network;
use pop3connex_core::admin::users::Unlock;
use pop3connex_core::admin::{Actor, Admin, AdminError};
use pop3connex_core::config::{AuthConfig, Config, PasswordScheme};
use pop3connex_core::import::ImportOptions;
use pop3connex_core::store::LockoutRecord;
use pop3connex_core::types::UserName;

const PASSWORD: &str = "correct horse battery staple";

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
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// The admin records so far, one JSON object each.
    fn records(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["message"] == "admin action")
            .collect()
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
    let dir = std::env::temp_dir().join(format!("p3x-admin-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let report = pop3connex_core::init::init_data_dir(&dir, "localhost").unwrap();
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

fn user(name: &str) -> UserName {
    UserName::parse(name).unwrap()
}

/// Asserts the last record: operation, target, outcome and the actor.
fn assert_last(log: &Capture, op: &str, target: &str, outcome: &str) {
    let records = log.records();
    let last = records.last().expect("a record");
    assert_eq!(last["admin.action"], op, "{last}");
    assert_eq!(last["admin.target"], target, "{last}");
    assert_eq!(last["outcome"], outcome, "{last}");
    assert_eq!(last["actor"], "cli:operator", "{last}");
    assert_eq!(last["level"], "INFO", "{last}");
}

#[tokio::test]
async fn users_are_added_listed_changed_and_deleted() {
    let s = setup("users").await;
    let (a, alice) = (cli(), user("alice"));
    s.admin.add_user(&a, &alice, PASSWORD.as_bytes()).await.unwrap();
    assert_last(&s.log, "user.add", "alice", "ok");

    let dup = s.admin.add_user(&a, &alice, PASSWORD.as_bytes()).await.unwrap_err();
    assert!(matches!(dup, AdminError::Conflict(_)), "{dup:?}");
    assert_eq!(dup.to_string(), "user already exists: alice");
    assert_last(&s.log, "user.add", "alice", "conflict");

    let weak = s.admin.add_user(&a, &user("bob"), b"a").await.unwrap_err();
    assert!(matches!(weak, AdminError::Refused(_)), "{weak:?}");
    assert_last(&s.log, "user.add", "bob", "refused");

    let users = s.admin.list_users(&a).await.unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!((users[0].name.as_str(), users[0].messages, users[0].disabled), ("alice", 0, false));
    assert_last(&s.log, "user.list", "*", "ok");

    s.admin.set_password(&a, &alice, b"another long passphrase here").await.unwrap();
    assert_last(&s.log, "user.passwd", "alice", "ok");
    let missing = s.admin.set_password(&a, &user("nobody"), PASSWORD.as_bytes()).await.unwrap_err();
    assert!(matches!(missing, AdminError::NotFound(_)), "{missing:?}");
    assert_eq!(missing.to_string(), "no such user: nobody");

    s.admin.set_disabled(&a, &alice, true).await.unwrap();
    assert_last(&s.log, "user.disable", "alice", "ok");
    assert!(s.admin.list_users(&a).await.unwrap()[0].disabled);
    s.admin.set_disabled(&a, &alice, false).await.unwrap();
    assert_last(&s.log, "user.enable", "alice", "ok");
    let stat = s.admin.mailbox_stat(&a, &alice).await.unwrap();
    assert_eq!((stat.messages, stat.octets, stat.disabled), (0, 0, false));
    assert_last(&s.log, "mailbox.stat", "alice", "ok");
    let err = s.admin.set_disabled(&a, &user("nobody"), true).await.unwrap_err();
    assert_eq!((err.kind(), err.to_string().as_str()), ("not_found", "no such user: nobody"));

    s.admin.set_require_modern_auth(&a, &alice, true).await.unwrap();
    assert_last(&s.log, "user.require_modern_auth", "alice", "ok");
    let record = s.admin.mail().store().user(&alice).await.unwrap().unwrap();
    assert!(record.require_modern_auth);

    let unconfirmed = s.admin.delete_user(&a, &alice, false).await.unwrap_err();
    assert!(matches!(unconfirmed, AdminError::Refused(_)), "{unconfirmed:?}");
    assert!(unconfirmed.to_string().contains("repeat with --yes"));
    assert_eq!(s.admin.list_users(&a).await.unwrap().len(), 1, "nothing deleted without confirmation");
    s.admin.delete_user(&a, &alice, true).await.unwrap();
    assert_last(&s.log, "user.delete", "alice", "ok");
    assert!(s.admin.list_users(&a).await.unwrap().is_empty());
    let gone = s.admin.mailbox_stat(&a, &alice).await.unwrap_err();
    assert_eq!((gone.kind(), gone.to_string().as_str()), ("not_found", "no such user: alice"));
    let again = s.admin.delete_user(&a, &alice, true).await.unwrap_err();
    assert!(matches!(again, AdminError::NotFound(_)), "{again:?}");

    // One record per operation, and the passwords never in them (nor anywhere in the log).
    assert_eq!(s.log.records().len(), 18);
    let text = s.log.text();
    for secret in [PASSWORD, "another long passphrase here"] {
        assert!(!text.contains(secret), "secret {secret:?} in the log");
    }
}

#[tokio::test]
async fn class_names_are_checked_before_the_store() {
    let s = setup("classes").await;
    let (a, carol) = (cli(), user("carol"));
    s.admin.add_user(&a, &carol, PASSWORD.as_bytes()).await.unwrap();
    for bad in ["", "staff team", "staff;drop", "ünï"] {
        let e = s.admin.set_class(&a, &carol, Some(bad)).await.unwrap_err();
        assert!(matches!(e, AdminError::BadInput(_)), "{bad:?}: {e:?}");
        assert_eq!(e.to_string(), "class names use letters, digits, - and _");
        assert_last(&s.log, "user.set_class", "carol", "bad_input");
        assert!(check_class_name(bad).is_err());
    }
    assert_eq!(s.admin.mail().store().user(&carol).await.unwrap().unwrap().class, None);
    s.admin.set_class(&a, &carol, Some("staff_2-b")).await.unwrap();
    assert_last(&s.log, "user.set_class", "carol", "ok");
    assert_eq!(s.admin.mail().store().user(&carol).await.unwrap().unwrap().class.as_deref(), Some("staff_2-b"));
    s.admin.set_class(&a, &carol, None).await.unwrap();
    assert_eq!(s.admin.mail().store().user(&carol).await.unwrap().unwrap().class, None);
    let e = s.admin.set_class(&a, &user("nobody"), Some("staff")).await.unwrap_err();
    assert_eq!((e.kind(), e.to_string().as_str()), ("not_found", "no such user: nobody"));
}

#[test]
fn app_password_expiry_arithmetic() {
    assert_eq!(expires_at(1_000, 2), 1_000 + 2 * 86_400);
    assert_eq!(expires_at(1_000, 0), 1_000);
    assert_eq!(expires_at(1_000, u64::MAX), i64::MAX, "saturates instead of wrapping");
    let now = 1_700_000_000;
    assert_eq!(expiry_at(None, now), Expiry::Never);
    assert_eq!(expiry_at(Some(now + 3 * 86_400 + 5), now), Expiry::InDays(3));
    assert_eq!(expiry_at(Some(now + 86_399), now), Expiry::InDays(0));
    assert_eq!(expiry_at(Some(now + 1), now), Expiry::InDays(0));
    assert_eq!(expiry_at(Some(now), now), Expiry::Expired);
    assert_eq!(expiry_at(Some(now - 10), now), Expiry::Expired);
}

#[tokio::test]
async fn app_passwords_are_shown_once_listed_and_revoked() {
    let s = setup("apppw").await;
    let (a, dave) = (cli(), user("dave"));
    s.admin.add_user(&a, &dave, PASSWORD.as_bytes()).await.unwrap();
    let new = s.admin.add_app_password(&a, &dave, "phone", Some(10)).await.unwrap();
    assert_last(&s.log, "app_password.add", "dave", "ok");
    assert_eq!(new.password.len(), 23, "four groups of five and three dashes");
    let forever = s.admin.add_app_password(&a, &dave, "laptop", None).await.unwrap();

    let list = s.admin.list_app_passwords(&a, &dave).await.unwrap();
    assert_last(&s.log, "app_password.list", "dave", "ok");
    assert_eq!(list.len(), 2);
    let phone = list.iter().find(|e| e.id == new.id).unwrap();
    assert_eq!(phone.label, "phone");
    assert!(matches!(phone.expiry, Expiry::InDays(9 | 10)), "{phone:?}");
    assert_eq!(phone.last_used_ago, None);
    assert_eq!(list.iter().find(|e| e.id == forever.id).unwrap().expiry, Expiry::Never);

    s.admin.revoke_app_password(&a, &dave, new.id).await.unwrap();
    assert_last(&s.log, "app_password.revoke", &format!("dave/{}", new.id), "ok");
    assert_eq!(s.admin.list_app_passwords(&a, &dave).await.unwrap().len(), 1);
    let unknown = s.admin.revoke_app_password(&a, &dave, new.id).await.unwrap_err();
    assert!(matches!(unknown, AdminError::NotFound(_)), "{unknown:?}");
    assert_eq!(unknown.to_string(), format!("dave has no app password {}", new.id));
    assert_last(&s.log, "app_password.revoke", &format!("dave/{}", new.id), "not_found");

    let no_user = s.admin.add_app_password(&a, &user("nobody"), "x", None).await.unwrap_err();
    assert!(matches!(no_user, AdminError::NotFound(_)), "{no_user:?}");

    let text = s.log.text();
    for secret in [new.password.as_str(), forever.password.as_str(), PASSWORD] {
        assert!(!text.contains(secret), "secret {secret:?} in the log");
    }
    assert!(!format!("{new:?}").contains(new.password.as_str()), "Debug hides the password");
}

#[tokio::test]
async fn bans_are_parsed_added_listed_and_removed() {
    let s = setup("bans").await;
    let a = cli();
    let e = s.admin.add_ban(&a, "not-an-address", "x", None).await.unwrap_err();
    assert!(matches!(e, AdminError::BadInput(_)), "{e:?}");
    assert_eq!(e.to_string(), "not-an-address is not an address or CIDR network");
    assert_last(&s.log, "ban.add", "not-an-address", "bad_input");

    assert_eq!(s.admin.add_ban(&a, "192.0.2.77/24", "probe", Some(600)).await.unwrap().to_string(), "192.0.2.0/24");
    assert_last(&s.log, "ban.add", "192.0.2.77/24", "ok");
    assert_eq!(s.admin.add_ban(&a, "2001:db8::1", "manual", None).await.unwrap().to_string(), "2001:db8::1/128");
    assert_eq!(parse_network("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");

    let bans = s.admin.list_bans(&a).await.unwrap();
    assert_last(&s.log, "ban.list", "*", "ok");
    assert_eq!(bans.len(), 2);
    let probe = bans.iter().find(|b| b.reason == "probe").unwrap();
    assert!(probe.expires_in.is_some_and(|s| (590..=600).contains(&s)), "{probe:?}");
    assert_eq!(probe.offences, 1);
    assert_eq!(bans.iter().find(|b| b.reason == "manual").unwrap().expires_in, None);

    assert_eq!(s.admin.remove_ban(&a, "192.0.2.1/24").await.unwrap().to_string(), "192.0.2.0/24");
    assert_last(&s.log, "ban.remove", "192.0.2.1/24", "ok");
    let e = s.admin.remove_ban(&a, "192.0.2.0/24").await.unwrap_err();
    assert!(matches!(e, AdminError::NotFound(_)), "{e:?}");
    assert_eq!(e.to_string(), "no ban on 192.0.2.0/24");
    assert_eq!(s.admin.list_bans(&a).await.unwrap().len(), 1);
}

#[tokio::test]
async fn unlock_lifts_a_lockout_once() {
    let s = setup("unlock").await;
    let (a, erin) = (cli(), user("erin"));
    assert_eq!(s.admin.unlock(&a, &erin).await.unwrap(), Unlock::NotLocked);
    assert_last(&s.log, "user.unlock", "erin", "ok");
    let since = pop3connex_core::types::unix_now();
    s.admin
        .mail()
        .store()
        .put_lockout(LockoutRecord { user: "erin".into(), since, until: since + 600, count: 5 })
        .await
        .unwrap();
    assert_eq!(s.admin.unlock(&a, &erin).await.unwrap(), Unlock::Unlocked);
    assert_eq!(s.admin.unlock(&a, &erin).await.unwrap(), Unlock::NotLocked);
}

#[tokio::test]
async fn passwd_file_lines_are_imported_or_skipped_with_the_reason() {
    let s = setup("passwd").await;
    let a = cli();
    s.admin.add_user(&a, &user("taken"), PASSWORD.as_bytes()).await.unwrap();
    let sha = AuthConfig { password_scheme: PasswordScheme::Sha512Crypt, ..AuthConfig::default() };
    let hash = pop3connex_core::password::hash_password(&sha, b"imported secret").unwrap();
    let text = format!(
        "# comment\n\nfrank:{hash}::::\nno colon here\nbad name!:{hash}\ntaken:{hash}\n\
         grace:{{PLAIN}}plain-secret\nheidi:{{SHA512-CRYPT}}$6$rounds=999999999$salt$x\n"
    );
    let report = s.admin.import_passwd(&a, &text).await.unwrap();
    assert_eq!(report.added, 1);
    let skipped: Vec<(usize, &str, &str)> =
        report.skipped.iter().map(|k| (k.line, k.user.as_str(), k.error.kind())).collect();
    assert_eq!(
        skipped,
        [
            (4, "no colon here", "bad_input"),
            (5, "bad name!", "bad_input"),
            (6, "taken", "conflict"),
            (7, "grace", "bad_input"),
            (8, "heidi", "bad_input"),
        ]
    );
    assert_eq!(report.skipped[0].error.to_string(), "no ':' in the line (expected user:{SCHEME}hash)");
    assert_eq!(report.skipped[2].error.to_string(), "user already exists: taken");
    assert!(report.skipped[4].error.to_string().starts_with("hash refused: "), "{}", report.skipped[4].error);
    assert!(s.admin.mail().store().user(&user("frank")).await.unwrap().is_some());
    // One record for the whole file; neither hashes nor secrets in the log.
    assert_last(&s.log, "user.import_passwd", "passwd-file", "ok");
    assert_eq!(s.log.records().iter().filter(|r| r["admin.action"] == "user.import_passwd").count(), 1);
    let log = s.log.text();
    assert!(!log.contains(&hash) && !log.contains("plain-secret"), "hash in the log: {log}");
}

#[tokio::test]
async fn import_needs_an_existing_user_and_reports_what_it_did() {
    let s = setup("import").await;
    let (a, ivan) = (cli(), user("ivan"));
    let mbox = s.dir.join("in.mbox");
    std::fs::write(&mbox, "From a@example.org Mon Jan  1 00:00:00 2024\nSubject: one\n\nbody\n").unwrap();
    let mut progress = |_: u64, _: Option<u64>| {};
    let e = s
        .admin
        .import(&a, &ivan, ImportFormat::Mbox, &mbox, ImportOptions::default(), &mut progress)
        .await
        .unwrap_err();
    assert!(matches!(e, AdminError::NotFound(_)), "{e:?}");
    assert_eq!(e.to_string(), "no such user: ivan (add it first)");
    assert_last(&s.log, "import.mbox", "ivan", "not_found");

    s.admin.add_user(&a, &ivan, PASSWORD.as_bytes()).await.unwrap();
    let report =
        s.admin.import(&a, &ivan, ImportFormat::Mbox, &mbox, ImportOptions::default(), &mut progress).await.unwrap();
    assert_eq!((report.imported, report.already_present, report.skipped.len()), (1, 0, 0));
    assert_last(&s.log, "import.mbox", "ivan", "ok");
    let again =
        s.admin.import(&a, &ivan, ImportFormat::Mbox, &mbox, ImportOptions::default(), &mut progress).await.unwrap();
    assert_eq!((again.imported, again.already_present), (0, 1));
    assert_eq!(s.admin.mailbox_stat(&a, &ivan).await.unwrap().messages, 1);

    let not_maildir = s
        .admin
        .import(&a, &ivan, ImportFormat::Maildir, &s.dir, ImportOptions::default(), &mut progress)
        .await
        .unwrap_err();
    assert!(matches!(not_maildir, AdminError::BadInput(_)), "{not_maildir:?}");
    assert!(not_maildir.to_string().contains("is not a Maildir"), "{not_maildir}");
    assert_last(&s.log, "import.maildir", "ivan", "bad_input");
}

#[tokio::test]
async fn connector_accounts_are_added_listed_run_and_removed() {
    let s = setup("connector").await;
    let a = cli();
    let account = "name = \"upstream\"\nhost = \"127.0.0.1\"\nport = 1\ntls = \"implicit\"\nuser = \"u\"\n\
                   password = \"env:P3X_ADMIN_TEST_UNSET\"\nauth = \"user\"\ntimeout_secs = 5\n\
                   [route]\ndeliver_to = { local = \"judy\" }\n";
    assert!(s.admin.list_connector_accounts(&a).await.unwrap().is_empty());
    assert_last(&s.log, "connector.list", "*", "ok");

    let bad = s.admin.add_connector_account(&a, "acct.toml", "name = ", &s.dir).await.unwrap_err();
    assert!(matches!(bad, AdminError::BadInput(_)), "{bad:?}");
    assert!(bad.to_string().starts_with("acct.toml: "), "{bad}");
    let invalid = account.replace("host = \"127.0.0.1\"", "host = \"\"");
    let bad = s.admin.add_connector_account(&a, "acct.toml", &invalid, &s.dir).await.unwrap_err();
    assert!(matches!(bad, AdminError::BadInput(_)), "{bad:?}");

    assert_eq!(s.admin.add_connector_account(&a, "acct.toml", account, &s.dir).await.unwrap(), "upstream");
    assert_last(&s.log, "connector.add", "upstream", "ok");
    let dup = s.admin.add_connector_account(&a, "acct.toml", account, &s.dir).await.unwrap_err();
    assert!(matches!(dup, AdminError::Conflict(_)), "{dup:?}");
    assert_eq!(dup.to_string(), "`upstream` already exists");

    let list = s.admin.list_connector_accounts(&a).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].name.as_str(), list[0].host.as_str(), list[0].port, list[0].origin, list[0].seen),
        ("upstream", "127.0.0.1", 1, Origin::Cli, 0)
    );
    let shown = s.admin.show_connector_account(&a, "upstream").await.unwrap();
    assert!(shown.to_toml().contains("P3X_ADMIN_TEST_UNSET"), "secret references are shown");
    let e = s.admin.show_connector_account(&a, "other").await.unwrap_err();
    assert_eq!((e.kind(), e.to_string().as_str()), ("not_found", "no connector account `other`"));
    let e = s.admin.resync_connector_account(&a, "other").await.unwrap_err();
    assert!(matches!(e, AdminError::NotFound(_)), "{e:?}");

    let e = s.admin.run_connector_accounts(&a, &["other".into()]).await.unwrap_err();
    assert_eq!((e.kind(), e.to_string().as_str()), ("not_found", "no connector account `other`"));
    // A failed fetch is a result, recorded once for the operation.
    let runs = s.admin.run_connector_accounts(&a, &["upstream".into()]).await.unwrap();
    assert_last(&s.log, "connector.run_once", "upstream", "ok");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].account, "upstream");
    assert!(runs[0].result.is_err(), "nothing listens on port 1");
    let status = s.admin.connector_status(&a, Some("upstream")).await.unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].status.failures, 1);
    assert!(status[0].status.last_run_at.is_some() && status[0].status.last_error.is_some());
    assert!(s.admin.connector_status(&a, Some("other")).await.unwrap().is_empty());

    s.admin.remove_connector_account(&a, "upstream").await.unwrap();
    assert_last(&s.log, "connector.remove", "upstream", "ok");
    let e = s.admin.remove_connector_account(&a, "upstream").await.unwrap_err();
    assert!(matches!(e, AdminError::NotFound(_)), "{e:?}");
    assert_eq!(e.to_string(), "no CLI-added connector account `upstream`");
    assert!(s.admin.list_connector_accounts(&a).await.unwrap().is_empty());
}

#[test]
fn actors_are_shown_without_secrets() {
    assert_eq!(Actor::Cli { os_user: None }.to_string(), "cli");
    assert_eq!(Actor::Cli { os_user: Some("root".into()) }.to_string(), "cli:root");
    let admin = Actor::Admin { name: "ops".into(), address: "192.0.2.9".parse().unwrap() };
    assert_eq!(admin.to_string(), "admin:ops@192.0.2.9");
    assert_eq!(Actor::ServiceToken { id: "t1".into() }.to_string(), "token:t1");
}

/// The audit records of the store, oldest first.
async fn audit_records(admin: &Admin) -> Vec<pop3connex_core::admin::AuditRecord> {
    let mut out = Vec::new();
    admin
        .audit_log_export(&cli(), None, None, &mut |r| {
            out.push(r.clone());
            Ok(())
        })
        .await
        .unwrap();
    out
}

#[tokio::test]
async fn every_operation_is_in_the_audit_log_as_attempt_then_outcome() {
    let s = setup("audit-pairs").await;
    let alice = user("alice");
    s.admin.add_user(&cli(), &alice, PASSWORD.as_bytes()).await.unwrap();
    s.admin.set_class(&cli(), &alice, Some("staff")).await.unwrap();
    let err = s.admin.set_class(&cli(), &user("ghost"), Some("staff")).await.unwrap_err();
    assert_eq!(err.kind(), "not_found");
    let web = Actor::Admin { name: "root".into(), address: "192.0.2.9".parse().unwrap() };
    s.admin.add_ban(&web, "198.51.100.0/24", "test", None).await.unwrap();

    let records = audit_records(&s.admin).await;
    let seen: Vec<(&str, &str, &str)> =
        records.iter().map(|r| (r.action.as_str(), r.target.as_str(), r.outcome.as_str())).collect();
    assert_eq!(
        seen[..8],
        [
            ("user.add", "alice", "attempt"),
            ("user.add", "alice", "ok"),
            ("user.set_class", "alice", "attempt"),
            ("user.set_class", "alice", "ok"),
            ("user.set_class", "ghost", "attempt"),
            ("user.set_class", "ghost", "not_found"),
            ("ban.add", "198.51.100.0/24", "attempt"),
            ("ban.add", "198.51.100.0/24", "ok"),
        ]
    );
    assert_eq!(records[2].before, Some(serde_json::json!({ "class": null })));
    assert_eq!(records[2].after, Some(serde_json::json!({ "class": "staff" })));
    assert_eq!(records[6].actor, "admin:root@192.0.2.9");
    assert_eq!(records[6].source.as_deref(), Some("192.0.2.9"));
    assert!(!serde_json::to_string(&records).unwrap().contains(PASSWORD));

    // Events and reads of the log are recorded too.
    let details = pop3connex_core::admin::AuditDetails::default();
    s.admin.audit_event(&web, "admin.login", "root", "failed", details).await.unwrap();
    let query = pop3connex_core::admin::AuditQuery { action: Some("admin".into()), limit: 10, ..Default::default() };
    let read = s.admin.audit_log_read(&web, &query).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!((read[0].action.as_str(), read[0].outcome.as_str()), ("admin.login", "failed"));
    let last = audit_records(&s.admin).await;
    assert!(last.iter().any(|r| r.action == "audit.read" && r.actor == "admin:root@192.0.2.9" && r.outcome == "ok"));
    assert!(s.admin.audit_log().verify().await.unwrap().intact());
}

#[tokio::test]
async fn an_operation_whose_attempt_cannot_be_recorded_is_not_performed() {
    let s = setup("audit-fail-closed").await;
    s.admin.add_user(&cli(), &user("alice"), PASSWORD.as_bytes()).await.unwrap();
    let db = s.admin.config().store.path.clone();
    rusqlite::Connection::open(&db).unwrap().execute_batch("DROP TABLE audit_log").unwrap();

    let err = s.admin.add_user(&cli(), &user("bob"), PASSWORD.as_bytes()).await.unwrap_err();
    assert_eq!(err.kind(), "storage", "{err}");
    assert!(err.to_string().contains("audit log"), "{err}");
    let err = s.admin.set_disabled(&cli(), &user("alice"), true).await.unwrap_err();
    assert_eq!(err.kind(), "storage");
    assert_last(&s.log, "user.disable", "alice", "audit_failed");
    let details = pop3connex_core::admin::AuditDetails::default();
    assert!(s.admin.audit_event(&cli(), "admin.login", "x", "ok", details).await.is_err());

    let users = s.admin.mail().store().users().await.unwrap();
    assert_eq!(users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["alice"], "bob was added");
    assert!(!users[0].disabled, "alice was disabled without a record");
}
