//! One conformance suite for every storage backend. Each backend adds one
//! line to `backends!` (PostgreSQL will join SQLite here).

use std::sync::Arc;
use std::time::Duration;

use pop3connex_core::crypto::random_id;
use pop3connex_core::store::sqlite::SqliteStore;
use pop3connex_core::store::{
    BanRecord, ConnectorCommit, ConnectorStatus, LeaseResource, LockoutRecord, MessageSource, NewMessage, SeenState,
    ServiceTokenRecord, Store, StoreError, StoredCredentials,
};
use pop3connex_core::types::{MailboxId, UserName};

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sqlite(name: &str) -> (Arc<dyn Store>, TempDir) {
    let dir = std::env::temp_dir().join(format!("p3x-conf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    (Arc::new(SqliteStore::open(&dir.join("s.db")).unwrap()), TempDir(dir))
}

fn msg(mailbox_id: MailboxId, body: &[u8], import_key: Option<&str>) -> NewMessage {
    NewMessage {
        mailbox_id,
        uid: random_id(),
        size: body.len() as u64,
        chunks: vec![body.to_vec()],
        import_key: import_key.map(str::to_owned),
    }
}

fn creds(hash: &str) -> StoredCredentials {
    StoredCredentials { hash: hash.into(), scram: Some(format!("scram-of-{hash}")) }
}

async fn user(store: &Arc<dyn Store>, name: &str) -> MailboxId {
    let n = UserName::parse(name).unwrap();
    store.create_user(&n, &creds("hash"), random_id(), vec![1, 2, 3]).await.unwrap();
    store.user(&n).await.unwrap().unwrap().mailbox.id
}

async fn users_and_accounts(store: Arc<dyn Store>) {
    let alice = UserName::parse("alice").unwrap();
    let mb = user(&store, "alice").await;
    assert!(matches!(store.create_user(&alice, &creds("h"), random_id(), vec![]).await, Err(StoreError::UserExists)));
    let rec = store.user(&alice).await.unwrap().unwrap();
    assert_eq!(rec.mailbox.id, mb);
    assert_eq!(rec.mailbox.wrapped_key, vec![1, 2, 3]);
    store.set_password(&alice, &creds("new")).await.unwrap();
    store.set_disabled(&alice, true).await.unwrap();
    let rec = store.user(&alice).await.unwrap().unwrap();
    assert_eq!((rec.password_hash.as_str(), rec.disabled), ("new", true));
    assert_eq!(rec.scram.as_deref(), Some("scram-of-new"));
    let ghost = UserName::parse("ghost").unwrap();
    assert!(matches!(store.set_password(&ghost, &creds("x")).await, Err(StoreError::NoSuchUser)));
    assert!(store.user(&ghost).await.unwrap().is_none());
    assert_eq!(store.users().await.unwrap().len(), 1);
}

async fn delivery_listing_and_deletes(store: Arc<dyn Store>) {
    let a = user(&store, "alice").await;
    let b = user(&store, "bob").await;
    store.deliver(vec![msg(a, b"one", None), msg(b, b"two", None), msg(a, b"three", None)]).await.unwrap();
    let list = store.messages(a).await.unwrap();
    assert_eq!(list.iter().map(|m| m.size).collect::<Vec<_>>(), vec![3, 5], "delivery order");
    assert_eq!(store.chunk(list[1].id, 0).await.unwrap(), b"three");
    assert!(store.chunk(list[1].id, 1).await.is_err());
    // Deleting only touches the named mailbox.
    let bob_msgs = store.messages(b).await.unwrap();
    let lease = store.lock_maildrop(a).await.unwrap();
    store.delete_messages(a, vec![list[0].id, bob_msgs[0].id], lease.token()).await.unwrap();
    assert_eq!(store.messages(a).await.unwrap().len(), 1);
    assert_eq!(store.messages(b).await.unwrap().len(), 1, "bob's message is not alice's to delete");
    // Delivery is all-or-nothing: a duplicate uid fails the whole batch.
    let dup = msg(a, b"x", None);
    let mut dup2 = msg(a, b"y", None);
    dup2.uid = dup.uid;
    assert!(store.deliver(vec![msg(a, b"z", None), dup, dup2]).await.is_err());
    assert_eq!(store.messages(a).await.unwrap().len(), 1);
}

/// A delivery of one message per listed mailbox, sealed on demand; the
/// copy at `fail_at` fails to seal.
struct Copies {
    mailboxes: Vec<MailboxId>,
    uids: Vec<pop3connex_core::crypto::RecordId>,
    fail_at: Option<usize>,
    sealed: std::sync::atomic::AtomicUsize,
}

impl Copies {
    fn new(mailboxes: Vec<MailboxId>, fail_at: Option<usize>) -> Arc<Self> {
        let uids = mailboxes.iter().map(|_| random_id()).collect();
        Arc::new(Copies { mailboxes, uids, fail_at, sealed: Default::default() })
    }
}

impl MessageSource for Copies {
    fn len(&self) -> usize {
        self.mailboxes.len()
    }

    fn seal(&self, index: usize) -> Result<NewMessage, StoreError> {
        self.sealed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.fail_at == Some(index) {
            return Err(StoreError::Permanent("seal failed".into()));
        }
        let body = format!("copy {index}").into_bytes();
        Ok(NewMessage {
            mailbox_id: self.mailboxes[index],
            uid: self.uids[index],
            size: body.len() as u64,
            chunks: vec![body[..4].to_vec(), body[4..].to_vec()],
            import_key: None,
        })
    }
}

async fn sealed_delivery_is_one_transaction(store: Arc<dyn Store>) {
    let a = user(&store, "alice").await;
    let b = user(&store, "bob").await;
    let copies = Copies::new(vec![a, b, a], None);
    store.deliver_sealed(copies.clone()).await.unwrap();
    assert_eq!(copies.sealed.load(std::sync::atomic::Ordering::SeqCst), 3, "each copy sealed by the store");
    let alice = store.messages(a).await.unwrap();
    assert_eq!(alice.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![copies.uids[0], copies.uids[2]]);
    assert_eq!(alice.iter().map(|m| (m.size, m.chunk_count)).collect::<Vec<_>>(), vec![(6, 2), (6, 2)]);
    assert_eq!(store.chunk(alice[1].id, 0).await.unwrap(), b"copy");
    assert_eq!(store.chunk(alice[1].id, 1).await.unwrap(), b" 2");
    let bob = store.messages(b).await.unwrap();
    assert_eq!(bob.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![copies.uids[1]]);
    // A copy that fails to seal fails the whole delivery, and only it: a
    // write committed alongside it lands.
    let failing = Copies::new(vec![a, b, a], Some(2));
    let (bad, good) = tokio::join!(store.deliver_sealed(failing.clone()), store.deliver(vec![msg(b, b"other", None)]));
    assert!(bad.is_err());
    good.unwrap();
    assert_eq!(store.messages(a).await.unwrap().len(), 2, "no copy of the failed delivery");
    assert_eq!(store.messages(b).await.unwrap().len(), 2, "bob: the first delivery and the other write");
    // Nothing to deliver is a no-op.
    store.deliver_sealed(Copies::new(Vec::new(), None)).await.unwrap();
}

async fn maildrop_lock_is_exclusive(store: Arc<dyn Store>) {
    let a = user(&store, "alice").await;
    let lock = store.lock_maildrop(a).await.unwrap();
    assert!(matches!(store.lock_maildrop(a).await, Err(StoreError::Locked)));
    let b = user(&store, "bob").await;
    let _other = store.lock_maildrop(b).await.unwrap();
    drop(lock);
    let _again = store.lock_maildrop(a).await.unwrap();
}

const SHORT_TTL: Duration = Duration::from_millis(300);

async fn lease_is_exclusive_and_tokens_grow(store: Arc<dyn Store>) {
    let a = user(&store, "alice").await;
    let first = store.acquire_lease(LeaseResource::Maildrop(a), "one", SHORT_TTL).await.unwrap();
    assert!(matches!(store.acquire_lease(LeaseResource::Maildrop(a), "two", SHORT_TTL).await, Err(StoreError::Locked)));
    // Another resource is independent.
    let other = store.acquire_lease(LeaseResource::ConnectorAccount("isp".into()), "one", SHORT_TTL).await.unwrap();
    let old = first.token();
    store.release_lease(first).await.unwrap();
    let second = store.acquire_lease(LeaseResource::Maildrop(a), "two", SHORT_TTL).await.unwrap();
    assert!(second.token() > old, "a new holder's token is greater");
    assert_eq!(second.holder(), "two");
    drop(other);
}

async fn a_lease_not_renewed_expires_and_fences_its_commit(store: Arc<dyn Store>) {
    let a = user(&store, "alice").await;
    store.deliver(vec![msg(a, b"one", None), msg(a, b"two", None)]).await.unwrap();
    let list = store.messages(a).await.unwrap();
    let mut lease = store.acquire_lease(LeaseResource::Maildrop(a), "paused", SHORT_TTL).await.unwrap();
    // A holder paused past its expiry: no renewal.
    lease.stop_renewing();
    tokio::time::sleep(SHORT_TTL * 2).await;
    let stale = store.delete_messages(a, vec![list[0].id], lease.token()).await;
    assert!(matches!(stale, Err(StoreError::Fenced)), "{stale:?}");
    assert_eq!(store.messages(a).await.unwrap(), list, "a fenced commit changed nothing");
    // Connector state is fenced the same way.
    let mut run = store.acquire_lease(LeaseResource::ConnectorAccount("isp".into()), "run", SHORT_TTL).await.unwrap();
    run.stop_renewing();
    tokio::time::sleep(SHORT_TTL * 2).await;
    let stale = store.connector_resync("isp", vec!["u1".into()], run.token()).await;
    assert!(matches!(stale, Err(StoreError::Fenced)), "{stale:?}");
    assert!(store.connector_seen("isp").await.unwrap().is_empty(), "a fenced commit changed nothing");
}

async fn a_held_lease_is_renewed(store: Arc<dyn Store>) {
    let a = user(&store, "alice").await;
    store.deliver(vec![msg(a, b"one", None)]).await.unwrap();
    let list = store.messages(a).await.unwrap();
    let lease = store.acquire_lease(LeaseResource::Maildrop(a), "live", SHORT_TTL).await.unwrap();
    let first_expiry = lease.expires_at();
    tokio::time::sleep(SHORT_TTL * 3).await;
    assert!(lease.expires_at() > first_expiry, "renewed in the background");
    assert!(!lease.is_lost());
    store.renew_lease(&lease).await.unwrap();
    store.delete_messages(a, vec![list[0].id], lease.token()).await.unwrap();
    assert!(store.messages(a).await.unwrap().is_empty());
}

async fn a_stale_token_is_refused_after_a_new_holder(store: Arc<dyn Store>) {
    let a = user(&store, "alice").await;
    store.deliver(vec![msg(a, b"one", None)]).await.unwrap();
    let list = store.messages(a).await.unwrap();
    let old = store.acquire_lease(LeaseResource::Maildrop(a), "old", SHORT_TTL).await.unwrap();
    let old_token = old.token();
    // Released (the guard dropped): its token commits nothing any more.
    store.release_lease(old).await.unwrap();
    let refused = store.delete_messages(a, vec![list[0].id], old_token).await;
    assert!(matches!(refused, Err(StoreError::Fenced)), "{refused:?}");
    let new = store.acquire_lease(LeaseResource::Maildrop(a), "new", SHORT_TTL).await.unwrap();
    let refused = store.delete_messages(a, vec![list[0].id], old_token).await;
    assert!(matches!(refused, Err(StoreError::Fenced)), "{refused:?}");
    assert_eq!(store.messages(a).await.unwrap(), list);
    store.delete_messages(a, vec![list[0].id], new.token()).await.unwrap();
    assert!(store.messages(a).await.unwrap().is_empty());
}

async fn imports_are_recorded_with_the_message(store: Arc<dyn Store>) {
    let a = user(&store, "alice").await;
    store.deliver(vec![msg(a, b"m", Some("maildir:1"))]).await.unwrap();
    let done = store.imported(a, vec!["maildir:1".into(), "maildir:2".into()]).await.unwrap();
    assert_eq!(done, vec!["maildir:1".to_owned()]);
}

async fn deleting_a_user_removes_everything(store: Arc<dyn Store>) {
    let a = user(&store, "alice").await;
    store.deliver(vec![msg(a, b"m", None)]).await.unwrap();
    let alice = UserName::parse("alice").unwrap();
    store.delete_user(&alice).await.unwrap();
    assert!(store.user(&alice).await.unwrap().is_none());
    assert!(store.messages(a).await.unwrap().is_empty());
    assert!(matches!(store.delete_user(&alice).await, Err(StoreError::NoSuchUser)));
}

async fn key_check_round_trip(store: Arc<dyn Store>) {
    assert!(store.key_check().await.unwrap().is_none());
    store.set_key_check(vec![9; 40]).await.unwrap();
    assert_eq!(store.key_check().await.unwrap(), Some(vec![9; 40]));
}

async fn concurrent_deliveries_all_land(store: Arc<dyn Store>) {
    let a = user(&store, "alice").await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move { s.deliver(vec![msg(a, format!("m{i}").as_bytes(), None)]).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(store.messages(a).await.unwrap().len(), 200);
}

async fn bans_and_lockouts(store: Arc<dyn Store>) {
    let now = pop3connex_core::types::unix_now();
    let net: pop3connex_core::ipnet::IpNet = "192.0.2.0/24".parse().unwrap();
    let ban = BanRecord { network: net, reason: "manual".into(), created_at: now, expires_at: None, offences: 1 };
    store.put_ban(ban.clone()).await.unwrap();
    let expired = BanRecord { network: "198.51.100.1/32".parse().unwrap(), expires_at: Some(now - 1), ..ban.clone() };
    store.put_ban(expired).await.unwrap();
    assert_eq!(store.bans().await.unwrap(), vec![ban.clone()], "expired bans are not listed");
    let longer = BanRecord { offences: 2, expires_at: Some(now + 100), ..ban };
    store.put_ban(longer.clone()).await.unwrap();
    assert_eq!(store.bans().await.unwrap(), vec![longer], "put replaces");
    assert!(store.remove_ban(net).await.unwrap());
    assert!(!store.remove_ban(net).await.unwrap());
    let l = LockoutRecord { user: "alice".into(), since: now, until: now + 60, count: 1 };
    store.put_lockout(l.clone()).await.unwrap();
    assert_eq!(store.lockouts().await.unwrap(), vec![l]);
    assert!(store.remove_lockout("ALICE").await.unwrap());
    assert!(store.lockouts().await.unwrap().is_empty());
}

async fn known_addresses_bounded_shared_and_purged(store: Arc<dyn Store>) {
    use pop3connex_core::store::{KnownAddress, KNOWN_ADDRESSES_PER_ACCOUNT};
    let now = pop3connex_core::types::unix_now();
    let known = |i: usize, last_seen: i64| KnownAddress {
        user: "alice".into(),
        network: format!("192.0.2.{i}/32").parse().unwrap(),
        last_seen,
    };
    for i in 0..KNOWN_ADDRESSES_PER_ACCOUNT + 4 {
        store.put_known_address(known(i, now - 100 + i as i64)).await.unwrap();
    }
    store.put_known_address(known(1, now - 10_000)).await.unwrap();
    assert!(store.locked_known_addresses(now, 0).await.unwrap().is_empty(), "alice is not locked");
    let lockout = LockoutRecord { user: "alice".into(), since: now, until: now + 60, count: 1 };
    store.put_lockout(lockout).await.unwrap();
    let mut read = store.locked_known_addresses(now, 0).await.unwrap();
    read.sort_by_key(|k| k.last_seen);
    assert_eq!(read.len(), KNOWN_ADDRESSES_PER_ACCOUNT, "bounded per account");
    assert_eq!(read[0], known(4, now - 96), "the newest kept; a put never moves last_seen back");
    assert_eq!(store.locked_known_addresses(now, now - 90).await.unwrap().len(), 10, "only those seen since");
    let expired = BanRecord {
        network: "198.51.100.1/32".parse().unwrap(),
        reason: "t".into(),
        created_at: now - 10,
        expires_at: Some(now - 1),
        offences: 1,
    };
    store.put_ban(expired.clone()).await.unwrap();
    store.purge_security(now + 61, now - 94).await.unwrap();
    assert!(store.lockouts().await.unwrap().is_empty());
    assert!(store.locked_known_addresses(now, 0).await.unwrap().is_empty(), "the lockout is gone");
    store.put_lockout(LockoutRecord { user: "alice".into(), since: now, until: now + 60, count: 1 }).await.unwrap();
    assert_eq!(store.locked_known_addresses(now, 0).await.unwrap().len(), 14, "stale known addresses purged");
    // The purged ban row is gone: putting it back is not a replace of an old row.
    assert!(!store.remove_ban(expired.network).await.unwrap(), "expired ban row purged");
}

async fn connector_state_commits_atomically(store: Arc<dyn Store>) {
    let mb = user(&store, "alice").await;
    let lease = store.lock_connector("isp").await.unwrap();
    let fence = lease.token();
    let commit = |uidl: Option<&str>, key: u8, body: &[u8]| ConnectorCommit {
        at: 1_700_000_000,
        account: "isp".into(),
        uidl: uidl.map(str::to_owned),
        state: SeenState::Delivered,
        deliveries: vec![(Some([key; 32]), msg(mb, body, None))],
        keys: vec![[key + 100; 32]],
    };
    store.connector_commit(commit(Some("u1"), 1, b"one"), fence).await.unwrap();
    // The same duplicate key again: the message is not stored twice, but the
    // second UIDL is recorded.
    store.connector_commit(commit(Some("u2"), 1, b"one again"), fence).await.unwrap();
    // A deferred message: keys and deliveries kept, UIDL not recorded.
    store.connector_commit(commit(None, 2, b"two"), fence).await.unwrap();
    assert_eq!(store.messages(mb).await.unwrap().len(), 2);
    let mut seen: Vec<String> = store.connector_seen("isp").await.unwrap().into_iter().map(|s| s.uidl).collect();
    seen.sort();
    assert_eq!(seen, ["u1", "u2"]);
    assert!(store.connector_seen("other").await.unwrap().is_empty());
    let known = store.dedup_known(vec![[1; 32], [101; 32], [2; 32], [3; 32]]).await.unwrap();
    assert_eq!(known, vec![[1; 32], [101; 32], [2; 32]]);
    store.connector_forget("isp", vec!["u1".into()], fence).await.unwrap();
    assert_eq!(store.connector_seen("isp").await.unwrap().len(), 1);
    store.connector_resync("isp", vec!["a".into(), "b".into(), "c".into()], fence).await.unwrap();
    assert_eq!(store.connector_seen("isp").await.unwrap().len(), 3);
    store.dedup_prune(i64::MAX).await.unwrap();
    assert!(store.dedup_known(vec![[1; 32]]).await.unwrap().is_empty());
    // A commit into a mailbox that does not exist fails as a whole.
    let bad = ConnectorCommit { uidl: Some("u9".into()), ..commit(None, 9, b"x") };
    let bad =
        ConnectorCommit { deliveries: vec![(None, msg(MailboxId::from_raw(mb.raw() + 1000), b"x", None))], ..bad };
    assert!(store.connector_commit(bad, fence).await.is_err());
    assert!(!store.connector_seen("isp").await.unwrap().iter().any(|s| s.uidl == "u9"));
    assert!(matches!(store.lock_connector("isp").await, Err(StoreError::Locked)));
    drop(lease);
    store.lock_connector("isp").await.unwrap();
}

async fn connector_accounts_status_and_secrets(store: Arc<dyn Store>) {
    store.add_connector_account("isp", "name = \"isp\"").await.unwrap();
    assert!(matches!(store.add_connector_account("isp", "x").await, Err(StoreError::UserExists)));
    assert_eq!(store.connector_accounts().await.unwrap(), vec![("isp".into(), "name = \"isp\"".into())]);
    let status =
        ConnectorStatus { account: "isp".into(), failures: 2, last_error: Some("tls".into()), ..Default::default() };
    let lease = store.lock_connector("isp").await.unwrap();
    store.put_connector_status(status.clone(), lease.token()).await.unwrap();
    drop(lease);
    assert_eq!(store.connector_status("isp").await.unwrap(), Some(status));
    store.put_connector_secret("isp", "k", vec![1, 2]).await.unwrap();
    store.put_connector_secret("isp", "k", vec![3]).await.unwrap();
    assert_eq!(store.connector_secret("isp", "k").await.unwrap(), Some(vec![3]));
    assert!(store.remove_connector_account("isp").await.unwrap());
    assert!(!store.remove_connector_account("isp").await.unwrap());
    assert_eq!(store.connector_status("isp").await.unwrap(), None);
    assert_eq!(store.connector_secret("isp", "k").await.unwrap(), None);
}

async fn administrators_factors_codes_and_tokens(store: Arc<dyn Store>) {
    let roles = vec!["auditor".to_string()];
    let id = store.create_admin("alice", "hash", &roles).await.unwrap();
    assert!(matches!(store.create_admin("alice", "h", &roles).await, Err(StoreError::UserExists)));
    let bob = store.create_admin("bob", "hash2", &[]).await.unwrap();
    let a = store.admin_by_name("alice").await.unwrap().unwrap();
    assert_eq!((a.id, a.roles.as_slice(), a.enabled, a.last_login_at), (id, &roles[..], true, None));
    assert_eq!(store.admin_by_id(bob).await.unwrap().unwrap().name, "bob");
    assert_eq!(store.admins().await.unwrap().iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["alice", "bob"]);
    assert!(store.set_admin_enabled(id, false).await.unwrap());
    assert!(store.set_admin_roles(id, &["superadmin".to_string()]).await.unwrap());
    assert!(store.set_admin_password(id, "new").await.unwrap());
    store.record_admin_login(id, 42).await.unwrap();
    let a = store.admin_by_id(id).await.unwrap().unwrap();
    assert_eq!(
        (a.enabled, a.roles[0].as_str(), a.password_hash.as_str(), a.last_login_at),
        (false, "superadmin", "new", Some(42))
    );
    assert!(!store.set_admin_enabled(999, true).await.unwrap());

    // Factors: pending until activated in time, steps only move forward.
    let now = pop3connex_core::types::unix_now();
    let f = store.add_admin_factor(id, "totp", "phone", vec![1, 2, 3], Some(now + 600)).await.unwrap();
    let late = store.add_admin_factor(id, "totp", "old", vec![4, 5, 6], Some(now + 600)).await.unwrap();
    assert!(!store.use_factor_step(f, 10, now).await.unwrap(), "a pending factor is not usable");
    assert!(!store.activate_admin_factor(id, late, now + 601).await.unwrap(), "expired enrolment");
    assert!(!store.activate_admin_factor(bob, f, now).await.unwrap(), "another admin's factor");
    assert!(store.activate_admin_factor(id, f, now).await.unwrap());
    assert!(store.use_factor_step(f, 10, now).await.unwrap());
    assert!(!store.use_factor_step(f, 10, now).await.unwrap(), "replayed step");
    assert!(!store.use_factor_step(f, 9, now).await.unwrap(), "older step");
    assert!(store.use_factor_step(f, 11, now + 30).await.unwrap());
    assert!(store.update_admin_factor(f, vec![7, 7], now + 31).await.unwrap());
    let factors = store.admin_factors(id).await.unwrap();
    let ff = factors.iter().find(|x| x.id == f).unwrap();
    assert_eq!(
        (ff.sealed.as_slice(), ff.last_step, ff.last_used_at, ff.pending_until),
        (&[7u8, 7][..], Some(11), Some(now + 31), None)
    );
    assert!(store.remove_admin_factor(id, late).await.unwrap());
    assert!(!store.remove_admin_factor(bob, f).await.unwrap());

    // Recovery codes: one-time.
    store.set_recovery_codes(id, vec![vec![1; 32], vec![2; 32]]).await.unwrap();
    assert_eq!(store.recovery_codes(id).await.unwrap().len(), 2);
    assert!(store.use_recovery_code(id, vec![1; 32]).await.unwrap());
    assert!(!store.use_recovery_code(id, vec![1; 32]).await.unwrap());
    assert!(!store.use_recovery_code(bob, vec![2; 32]).await.unwrap(), "another admin's code");
    store.reset_admin_factors(id).await.unwrap();
    assert!(store.admin_factors(id).await.unwrap().is_empty() && store.recovery_codes(id).await.unwrap().is_empty());

    // Tokens.
    let token = |tid: &str, creator: i64| ServiceTokenRecord {
        id: tid.into(),
        name: "n".into(),
        creator_id: creator,
        creator_name: String::new(),
        permissions: vec!["users.read".into()],
        networks: vec!["10.0.0.0/8".into()],
        secret_hash: vec![9; 32],
        created_at: now,
        expires_at: now + 60,
        last_used_at: None,
        last_used_from: None,
        revoked: false,
    };
    store.add_service_token(token("t1", id)).await.unwrap();
    assert!(matches!(store.add_service_token(token("t1", id)).await, Err(StoreError::UserExists)));
    assert!(matches!(store.add_service_token(token("t2", 999)).await, Err(StoreError::NoSuchUser)));
    store.add_service_token(token("t3", bob)).await.unwrap();
    store.mark_service_token_used("t1", now + 5, "10.1.1.1").await.unwrap();
    let t = store.service_token("t1").await.unwrap().unwrap();
    assert_eq!(
        (t.creator_name.as_str(), t.networks.as_slice(), t.last_used_at, t.last_used_from.as_deref()),
        ("alice", &["10.0.0.0/8".to_string()][..], Some(now + 5), Some("10.1.1.1"))
    );
    assert!(store.revoke_service_token("t1").await.unwrap());
    assert!(!store.revoke_service_token("nope").await.unwrap());
    assert!(store.service_token("t1").await.unwrap().unwrap().revoked);
    assert_eq!(store.service_tokens().await.unwrap().len(), 2);
    // Removing an administrator removes its tokens, factors and codes.
    store.add_admin_factor(bob, "webauthn", "key", vec![1], None).await.unwrap();
    assert!(store.remove_admin(bob).await.unwrap());
    assert!(!store.remove_admin(bob).await.unwrap());
    assert!(store.service_token("t3").await.unwrap().is_none());
    assert!(store.admin_factors(bob).await.unwrap().is_empty());
}

macro_rules! backends {
    ($($backend:ident),*) => {
        mod conformance {
            $(
            mod $backend {
                macro_rules! case {
                    ($name:ident) => {
                        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                        async fn $name() {
                            let (store, _dir) = super::super::$backend(stringify!($name));
                            super::super::$name(store).await;
                        }
                    };
                }
                case!(users_and_accounts);
                case!(delivery_listing_and_deletes);
                case!(sealed_delivery_is_one_transaction);
                case!(maildrop_lock_is_exclusive);
                case!(lease_is_exclusive_and_tokens_grow);
                case!(a_lease_not_renewed_expires_and_fences_its_commit);
                case!(a_held_lease_is_renewed);
                case!(a_stale_token_is_refused_after_a_new_holder);
                case!(imports_are_recorded_with_the_message);
                case!(deleting_a_user_removes_everything);
                case!(key_check_round_trip);
                case!(concurrent_deliveries_all_land);
                case!(bans_and_lockouts);
                case!(known_addresses_bounded_shared_and_purged);
                case!(connector_state_commits_atomically);
                case!(connector_accounts_status_and_secrets);
                case!(administrators_factors_codes_and_tokens);
            }
            )*
        }
    };
}

backends!(sqlite);
