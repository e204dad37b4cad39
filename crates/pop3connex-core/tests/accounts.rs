//! Password policy, history, expiry, app passwords and per-account
//! "modern authentication only", through the account API and POP3 sessions.

mod common;
#[path = "refused/mod.rs"]
mod refused;

use std::sync::Arc;

use common::{Fixture, PASSWORD};
use pop3connex_core::auth::{AccountError, Authenticator};
use pop3connex_core::config::AuthConfig;
use pop3connex_core::policy::{PasswordPolicy, PolicyViolation};
use pop3connex_core::pop3::ListenerKind;
use pop3connex_core::types::UserName;

fn name(s: &str) -> UserName {
    UserName::parse(s).unwrap()
}

fn auth_with(f: &Fixture, policy: PasswordPolicy) -> Authenticator {
    Authenticator::new(f.mail.clone(), AuthConfig { password_policy: policy, ..common::cheap_auth() }).unwrap()
}

#[tokio::test]
async fn policy_is_enforced_when_setting_passwords_including_reuse() {
    let f = Fixture::new("policy").await;
    let auth = auth_with(&f, PasswordPolicy { history: 3, ..PasswordPolicy::default() });
    let alice = name("alice");
    assert!(matches!(auth.add_user(&alice, b"short").await, Err(AccountError::Policy(PolicyViolation::TooShort(12)))));
    assert!(matches!(
        auth.add_user(&alice, b"alicealice12345").await,
        Err(AccountError::Policy(PolicyViolation::TooWeak { .. }))
    ));
    auth.add_user(&alice, PASSWORD.as_bytes()).await.unwrap();
    let second = "plum orbit canyon seventeen";
    let third = "violet harbor glacier wrench";
    assert!(matches!(
        auth.set_password(&alice, PASSWORD.as_bytes()).await,
        Err(AccountError::Policy(PolicyViolation::Reused))
    ));
    auth.set_password(&alice, second.as_bytes()).await.unwrap();
    auth.set_password(&alice, third.as_bytes()).await.unwrap();
    assert!(
        matches!(
            auth.set_password(&alice, PASSWORD.as_bytes()).await,
            Err(AccountError::Policy(PolicyViolation::Reused))
        ),
        "within the last 3"
    );
    auth.set_password(&alice, "quartz meadow lantern ferry".as_bytes()).await.unwrap();
    auth.set_password(&alice, PASSWORD.as_bytes()).await.expect("4 changes ago is outside a history of 3");
}

/// The expired password is refused exactly like a wrong one on the wire (a
/// distinct reply would confirm a guessed password); the reason reaches the
/// logs and events only.
#[tokio::test]
async fn expired_password_is_refused_like_a_wrong_one() {
    let f = Fixture::new("expiry").await;
    f.add_user("alice").await;
    let db = rusqlite::Connection::open(f.dir.join("t.db")).unwrap();
    db.execute("UPDATE users SET password_changed_at = password_changed_at - 3 * 86400", []).unwrap();
    let auth = Arc::new(auth_with(&f, PasswordPolicy { max_age_days: 2, ..PasswordPolicy::default() }));
    let mut ctx = Arc::try_unwrap(f.pop3_ctx(Fixture::trusting_cfg())).ok().unwrap();
    ctx.auth = auth.clone();
    let mut c = f.connect_pop3(Arc::new(ctx), ListenerKind::StartTls);
    c.line().await;
    c.cmd("USER alice").await;
    assert_eq!(c.cmd("PASS wrong").await, "-ERR [AUTH] Authentication failed", "no hint without the password");
    c.cmd("USER alice").await;
    assert_eq!(c.cmd(&format!("PASS {PASSWORD}")).await, "-ERR [AUTH] Authentication failed", "no hint with it");
    assert_eq!(
        auth.verify_password("alice", PASSWORD.as_bytes()).await.unwrap_err(),
        pop3connex_core::auth::AuthFailure::Expired,
        "the reason is still known to the server"
    );
}

#[tokio::test]
async fn app_passwords_and_modern_auth_only_accounts() {
    let f = Fixture::new("apppw").await;
    f.add_user("alice").await;
    let alice = name("alice");
    let (id, app_pw) = f.auth.add_app_password(&alice, "phone", None).await.unwrap();
    let (_, expired_pw) =
        f.auth.add_app_password(&alice, "old", Some(pop3connex_core::types::unix_now() - 1)).await.unwrap();
    assert_eq!(app_pw.len(), 23, "four groups of five, dash-separated: {}", *app_pw);
    let ctx = f.pop3_ctx(Fixture::trusting_cfg());
    let login = |pw: String| {
        let ctx = ctx.clone();
        let f = &f;
        async move {
            let mut c = f.connect_pop3(ctx, ListenerKind::StartTls);
            c.line().await;
            c.cmd("USER alice").await;
            c.cmd(&format!("PASS {pw}")).await
        }
    };
    assert!(login(app_pw.to_string()).await.starts_with("+OK"));
    assert!(login(expired_pw.to_string()).await.starts_with("-ERR [AUTH]"), "expired app password");
    let listed = f.mail.store().app_passwords(&alice).await.unwrap();
    assert!(listed.iter().any(|a| a.id == id && a.label == "phone" && a.last_used_at.is_some()));

    f.mail.store().set_require_modern_auth(&alice, true).await.unwrap();
    assert_eq!(
        login(PASSWORD.to_string()).await,
        "-ERR [AUTH] This account requires SCRAM, OAuth or an app password; update your client settings"
    );
    assert!(login(app_pw.to_string()).await.starts_with("+OK"), "app passwords still work");

    assert!(f.mail.store().revoke_app_password(&alice, id).await.unwrap());
    assert!(login(app_pw.to_string()).await.starts_with("-ERR [AUTH]"), "revoked");
    // The stored form is a keyed hash, never the password.
    let db = rusqlite::Connection::open(f.dir.join("t.db")).unwrap();
    let stored: Vec<Vec<u8>> = db
        .prepare("SELECT hash FROM app_passwords")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(stored.iter().all(|h| h.len() == 32 && !h.windows(4).any(|w| expired_pw.as_bytes().starts_with(w))));
}

#[tokio::test]
async fn credential_cache_never_outlives_a_password_change() {
    let f = Fixture::new("cache").await;
    f.add_user("alice").await;
    assert!(f.auth.verify_password("alice", PASSWORD.as_bytes()).await.is_ok());
    assert!(f.auth.verify_password("alice", PASSWORD.as_bytes()).await.is_ok(), "served from the cache");
    assert!(f.auth.verify_password("alice", b"wrong").await.is_err());
    f.auth.set_password(&name("alice"), "plum orbit canyon seventeen".as_bytes()).await.unwrap();
    assert!(f.auth.verify_password("alice", PASSWORD.as_bytes()).await.is_err(), "old password rejected at once");
    assert!(f.auth.verify_password("alice", b"plum orbit canyon seventeen").await.is_ok());
    f.mail.store().set_disabled(&name("alice"), true).await.unwrap();
    assert!(f.auth.verify_password("alice", b"plum orbit canyon seventeen").await.is_err(), "disabled despite cache");
}

#[tokio::test]
async fn maximum_age_per_account_class() {
    let f = Fixture::new("classes").await;
    f.add_user("alice").await;
    f.add_user("svc").await;
    let db = rusqlite::Connection::open(f.dir.join("t.db")).unwrap();
    db.execute("UPDATE users SET password_changed_at = password_changed_at - 30 * 86400", []).unwrap();
    let policy = PasswordPolicy {
        max_age_days: 20,
        max_age_days_by_class: [("service".to_owned(), 365), ("staff".to_owned(), 7)].into(),
        ..PasswordPolicy::default()
    };
    let auth = auth_with(&f, policy);
    assert!(matches!(
        auth.verify_password("alice", PASSWORD.as_bytes()).await,
        Err(pop3connex_core::auth::AuthFailure::Expired)
    ));
    f.mail.store().set_class(&name("svc"), Some("service".into())).await.unwrap();
    assert!(auth.verify_password("svc", PASSWORD.as_bytes()).await.is_ok(), "service accounts: 365 days");
    f.mail.store().set_class(&name("svc"), Some("staff".into())).await.unwrap();
    assert!(matches!(
        auth.verify_password("svc", PASSWORD.as_bytes()).await,
        Err(pop3connex_core::auth::AuthFailure::Expired)
    ));
}

/// USER/PASS and AUTH PLAIN transcript of one attempt.
async fn password_transcript(c: &mut common::Client<tokio::io::DuplexStream>, secret: &str) -> Vec<String> {
    use base64::Engine as _;
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0alice\0{secret}"));
    vec![c.cmd("USER alice").await, c.cmd(&format!("PASS {secret}")).await, c.cmd(&format!("AUTH PLAIN {plain}")).await]
}

#[tokio::test]
async fn locked_disabled_or_expired_account_answers_app_password_like_a_wrong_one() {
    for how in refused::ALL {
        let f = Fixture::new("apppw-refused").await;
        f.add_user("alice").await;
        let (_, app_pw) = f.auth.add_app_password(&name("alice"), "phone", None).await.unwrap();
        let (ctx, _) = refused::context(&f, "alice", how).await;
        let mut c = f.connect_pop3(ctx, ListenerKind::StartTls);
        c.line().await;
        let wrong = password_transcript(&mut c, "wrong-wrong-wrong-wrong").await;
        assert!(wrong[1].starts_with("-ERR [AUTH] Authentication failed"), "{how:?}: {wrong:?}");
        assert_eq!(password_transcript(&mut c, &app_pw).await, wrong, "{how:?}: app password");
        assert_eq!(password_transcript(&mut c, PASSWORD).await, wrong, "{how:?}: account password");
        // Not even marked used: a refused login writes nothing a wrong one does not.
        let listed = f.mail.store().app_passwords(&name("alice")).await.unwrap();
        assert!(listed.iter().all(|a| a.last_used_at.is_none()), "{how:?}");
    }
}

/// The base64 StoredKey and ServerKey of `user` (opened through the store).
async fn scram_key_texts(auth: &Authenticator, user: &str) -> [String; 4] {
    use base64::Engine as _;
    let (_, creds) = auth.scram_lookup(user).await.unwrap();
    let b64 = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
    [b64(&creds.stored_key), b64(&creds.server_key), b64(&creds.stored_key[..24]), b64(&creds.server_key[..24])]
}

/// The database and its WAL as bytes, after a checkpoint.
fn database_bytes(f: &Fixture) -> Vec<u8> {
    let db = rusqlite::Connection::open(f.dir.join("t.db")).unwrap();
    let _ = db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    let mut bytes = std::fs::read(f.dir.join("t.db")).unwrap();
    bytes.extend(std::fs::read(f.dir.join("t.db-wal")).unwrap_or_default());
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn scram_keys_are_sealed_in_the_database_file() {
    let f = Fixture::new("scram-sealed").await;
    f.add_user("alice").await;
    let texts = scram_key_texts(&f.auth, "alice").await;
    let bytes = database_bytes(&f);
    for t in &texts {
        assert!(!contains(&bytes, t), "{t} found in the database file");
    }
    let db = rusqlite::Connection::open(f.dir.join("t.db")).unwrap();
    let stored: String = db.query_row("SELECT scram FROM users WHERE name = 'alice'", [], |r| r.get(0)).unwrap();
    assert!(stored.starts_with("sealed:v1:") && !stored.contains("SCRAM-SHA-256$"), "{stored}");
}

#[tokio::test]
async fn plaintext_scram_of_an_earlier_release_is_sealed_at_open() {
    use pop3connex_core::crypto::MasterKey;
    use pop3connex_core::mailstore::MailStore;
    use pop3connex_core::scram::ScramCredentials;
    use pop3connex_core::store::sqlite::SqliteStore;
    let f = Fixture::new("scram-legacy").await;
    let key = MasterKey::generate_base64();
    let open = || async {
        let store = Arc::new(SqliteStore::open(&f.dir.join("legacy.db")).unwrap());
        let mail = Arc::new(MailStore::with_store(store, MasterKey::decode(key.as_bytes()).unwrap()).await.unwrap());
        Arc::new(Authenticator::new(mail, common::cheap_auth()).unwrap())
    };
    let auth = open().await;
    auth.add_user(&name("alice"), PASSWORD.as_bytes()).await.unwrap();
    // What earlier releases stored: the RFC 5803 text form in the clear.
    let legacy = ScramCredentials::derive(PASSWORD.as_bytes(), 4096).unwrap();
    let text = legacy.encode();
    let db = rusqlite::Connection::open(f.dir.join("legacy.db")).unwrap();
    db.execute("UPDATE users SET scram = ?1 WHERE name = 'alice'", [&text]).unwrap();
    drop(auth);

    let auth = open().await;
    let stored: String = db.query_row("SELECT scram FROM users WHERE name = 'alice'", [], |r| r.get(0)).unwrap();
    assert!(stored.starts_with("sealed:v1:"), "sealed at open: {stored}");
    let (_, creds) = auth.scram_lookup("alice").await.unwrap();
    assert_eq!(creds, legacy, "the same keys, now sealed: old clients keep logging in");
    let _ = db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    let mut bytes = std::fs::read(f.dir.join("legacy.db")).unwrap();
    bytes.extend(std::fs::read(f.dir.join("legacy.db-wal")).unwrap_or_default());
    let stored_key = text.split('$').nth(2).unwrap().split(':').next().unwrap();
    assert!(!contains(&bytes, stored_key), "the plaintext keys are gone from the file");

    // A password login re-derives keys with the configured iterations.
    assert!(auth.verify_password("alice", PASSWORD.as_bytes()).await.is_ok());
    let (_, creds) = auth.scram_lookup("alice").await.unwrap();
    assert_eq!(creds.iterations, pop3connex_core::scram::DEFAULT_ITERATIONS);
}
