//! Hostile imports: what an attack on the import path found, pinned.
//! Hashes with absurd cost parameters (refused at import, never run at
//! verification), Maildirs with symbolic links and FIFOs, mbox files that
//! are not mbox files, and names that collide.

mod common;

use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Fixture;
use pop3connex_core::auth::AuthFailure;
use pop3connex_core::import::{escape_controls, import_maildir, import_mbox, to_crlf, ImportError, ImportOptions};
use pop3connex_core::password::{check_hash_parameters, verify_password, HashParamError};
use pop3connex_core::types::UserName;

const HOSTILE_ARGON2: &str = "{ARGON2ID}$argon2id$v=19$m=4294967295,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";

#[test]
fn hostile_argon2_hash_parameters_are_refused() {
    assert_eq!(check_hash_parameters(HOSTILE_ARGON2), Err(HashParamError::Argon2Memory(4294967295)));
    let t = "$argon2id$v=19$m=8192,t=4294967295,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
    assert_eq!(check_hash_parameters(t), Err(HashParamError::Argon2Passes(4294967295)));
    let p = "$argon2id$v=19$m=8192,t=1,p=255$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
    assert_eq!(check_hash_parameters(p), Err(HashParamError::Argon2Lanes(255)));
    let m = "$argon2id$v=19$m=262144,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
    assert_eq!(check_hash_parameters(m), Err(HashParamError::Argon2Memory(262144)));
    let work = "$argon2id$v=19$m=65536,t=4,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
    assert_eq!(check_hash_parameters(work), Err(HashParamError::Argon2Work(262144)));
    let garbage = "$argon2id$v=19$m=99999999999,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
    assert_eq!(check_hash_parameters(garbage), Err(HashParamError::Malformed("Argon2id")));
    // What Dovecot and POP3conneX itself produce by default stays accepted.
    let doveadm =
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$NlT2VO6jUfKoLbL89cUmiA$tc6AOu37+6LQifp8HGtMMgeKfbyETSqJA6Jo0s649PU";
    assert_eq!(check_hash_parameters(doveadm), Ok(()));
    let own = pop3connex_core::password::hash_password(&Default::default(), b"pw").unwrap();
    assert_eq!(check_hash_parameters(&own), Ok(()), "{own}");
}

#[test]
fn imported_hash_cost_is_capped() {
    let sha = |rounds: &str| format!("{{SHA512-CRYPT}}$6${rounds}saltsalt$AAAA");
    assert_eq!(check_hash_parameters(&sha("rounds=999999999$")), Err(HashParamError::Sha512Rounds(999999999)));
    assert_eq!(check_hash_parameters(&sha("rounds=2000000$")), Err(HashParamError::Sha512Rounds(2000000)));
    assert_eq!(check_hash_parameters(&sha("rounds=99999999999999$")), Err(HashParamError::Malformed("SHA512-CRYPT")));
    assert_eq!(check_hash_parameters(&sha("rounds=$")), Err(HashParamError::Malformed("SHA512-CRYPT")));
    assert_eq!(check_hash_parameters("$6$rounds=656001$s$h"), Err(HashParamError::Sha512Rounds(656001)));
    assert_eq!(check_hash_parameters("$6$rounds=656000$s$h"), Ok(()), "passlib's default");
    assert_eq!(check_hash_parameters(&sha("rounds=5000$")), Ok(()));
    assert_eq!(check_hash_parameters(&sha("")), Ok(()), "no rounds= means glibc's 5000");
    assert_eq!(check_hash_parameters("{BLF-CRYPT}$2y$31$abc"), Err(HashParamError::BcryptCost(31)));
    assert_eq!(check_hash_parameters("{BLF-CRYPT}$2y$12$abc"), Err(HashParamError::BcryptCost(12)));
    assert_eq!(check_hash_parameters("{BLF-CRYPT}$2b$11$abc"), Ok(()));
    assert_eq!(check_hash_parameters("{BLF-CRYPT}$2y$x1$abc"), Err(HashParamError::Malformed("BLF-CRYPT")));
    assert_eq!(
        check_hash_parameters("{BLF-CRYPT}$2y$05$9EEIy.4MYOsRqqq3U3lQ8uLOysSjbXYfEbyLOa3Gk8.I5O2n64.cu"),
        Ok(())
    );
    // A capped hash never runs: the rounds=999999999 hash answers at once.
    let t = Instant::now();
    assert!(!verify_password(&sha("rounds=999999999$"), b"pw"));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

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

/// A hash already in the store (written by an earlier release's import)
/// must not abort the process: the login fails like a wrong password and
/// an ERROR names the user and the reason.
#[tokio::test]
async fn stored_hostile_argon2_hash_fails_verification_without_crash() {
    let capture = Capture::default();
    let writer = capture.clone();
    // Global: verification logs from the blocking pool's threads.
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let f = Fixture::new("hostile-hash").await;
    // The store API does not check cost (an earlier release's import did not either).
    f.auth.import_user(&UserName::parse("victim").unwrap(), HOSTILE_ARGON2).await.unwrap();
    let t = Instant::now();
    assert_eq!(f.auth.verify_password("victim", b"anything").await.unwrap_err(), AuthFailure::BadPassword);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let line = logs.lines().find(|l| l.contains("cost parameters out of bounds")).unwrap_or_else(|| panic!("{logs}"));
    assert!(line.contains("ERROR") && line.contains("victim") && line.contains("m=4294967295"), "{line}");
}

async fn user_mailbox_sizes(f: &Fixture, user: &str) -> Vec<u64> {
    let rec = f.mail.store().user(&UserName::parse(user).unwrap()).await.unwrap().unwrap();
    f.mail.store().messages(rec.mailbox.id).await.unwrap().iter().map(|m| m.size).collect()
}

async fn setup(name: &str) -> (Fixture, pop3connex_core::store::UserRecord, std::path::PathBuf) {
    let f = Fixture::new(name).await;
    f.add_user("mallory").await;
    let rec = f.mail.store().user(&UserName::parse("mallory").unwrap()).await.unwrap().unwrap();
    let src = f.dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    (f, rec, src)
}

fn maildir(root: &Path) {
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
}

fn mkfifo(path: &Path) {
    let st = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success());
}

#[tokio::test]
async fn maildir_symlinked_cur_is_refused() {
    let (f, rec, src) = setup("md-symlink").await;
    let secret = src.join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("1.key.host"), "-----BEGIN PRIVATE KEY-----\n").unwrap();
    for sub in ["cur", "new", "tmp"] {
        let md = src.join(format!("md-{sub}"));
        maildir(&md);
        std::fs::remove_dir(md.join(sub)).unwrap();
        symlink(&secret, md.join(sub)).unwrap();
        let err = import_maildir(&f.mail, &rec, &md, ImportOptions::default(), &mut |_, _| {}).await.unwrap_err();
        assert!(matches!(&err, ImportError::Symlink(p, _) if p.ends_with(sub)), "{sub}: {err}");
    }
    assert_eq!(f.count("mallory").await, 0, "nothing imported through a link");
    // A symlinked root only when asked to; links below it never.
    let real = src.join("real");
    maildir(&real);
    std::fs::write(real.join("new/1.a.host"), "Subject: a\n\nx\n").unwrap();
    symlink(secret.join("1.key.host"), real.join("new/2.b.host")).unwrap();
    let link = src.join("link");
    symlink(&real, &link).unwrap();
    let err = import_maildir(&f.mail, &rec, &link, ImportOptions::default(), &mut |_, _| {}).await.unwrap_err();
    assert!(matches!(err, ImportError::Symlink(..)), "{err}");
    let follow = ImportOptions { follow_symlinks: true };
    let r = import_maildir(&f.mail, &rec, &link, follow, &mut |_, _| {}).await.unwrap();
    assert_eq!((r.imported, r.already_present), (1, 0));
    assert_eq!(r.skipped, vec!["new/2.b.host: symbolic link, not imported".to_owned()]);
    assert_eq!(user_mailbox_sizes(&f, "mallory").await, vec![to_crlf(b"Subject: a\n\nx\n").len() as u64]);
}

#[tokio::test]
async fn maildir_fifo_and_directories_are_skipped_quickly() {
    let (f, rec, src) = setup("md-fifo").await;
    let md = src.join("md");
    maildir(&md);
    mkfifo(&md.join("new/3000.F.host"));
    std::fs::create_dir(md.join("new/4000.dir")).unwrap();
    std::fs::write(md.join("new/3001.G.host"), "Subject: g\n\ng\n").unwrap();
    let t = Instant::now();
    let mut progress = |_, _| {};
    let import = import_maildir(&f.mail, &rec, &md, ImportOptions::default(), &mut progress);
    let r = tokio::time::timeout(Duration::from_secs(10), import).await.expect("a FIFO hangs the import").unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!((r.imported, r.already_present), (1, 0));
    let mut skipped = r.skipped.clone();
    skipped.sort();
    assert_eq!(skipped, vec!["new/3000.F.host: FIFO, not imported", "new/4000.dir: directory, not imported"]);
}

#[tokio::test]
async fn maildir_same_unique_name_different_content_all_imported() {
    let (f, rec, src) = setup("md-collide").await;
    let md = src.join("md");
    maildir(&md);
    std::fs::write(md.join("cur/100.X:2,RS"), "Subject: one\n\nfirst\n").unwrap();
    std::fs::write(md.join("cur/100.X:2,S"), "Subject: two\n\nsecond\n").unwrap();
    std::fs::write(md.join("cur/100.X;2,S"), "Subject: three\n\nthird\n").unwrap();
    std::fs::write(md.join("new/100.X"), "Subject: four\n\nfourth message\n").unwrap();
    let opts = ImportOptions::default();
    let r = import_maildir(&f.mail, &rec, &md, opts, &mut |_, _| {}).await.unwrap();
    assert_eq!((r.imported, r.already_present), (4, 0));
    assert!(r.skipped.is_empty());
    // Resumable: a re-run, and one after a client changed a flag, import nothing.
    let r = import_maildir(&f.mail, &rec, &md, opts, &mut |_, _| {}).await.unwrap();
    assert_eq!((r.imported, r.already_present), (0, 4));
    std::fs::rename(md.join("new/100.X"), md.join("cur/100.X:2,T")).unwrap();
    let r = import_maildir(&f.mail, &rec, &md, opts, &mut |_, _| {}).await.unwrap();
    assert_eq!((r.imported, r.already_present), (0, 4));
    assert_eq!(f.count("mallory").await, 4);
}

#[tokio::test]
async fn maildir_import_resumes_from_keys_of_the_previous_release() {
    let (f, rec, src) = setup("md-legacy").await;
    let md = src.join("md");
    maildir(&md);
    std::fs::write(md.join("cur/1.A.host:2,S"), "Subject: a\n\na\n").unwrap();
    std::fs::write(md.join("new/2.B.host"), "Subject: b\n\nb\n").unwrap();
    // The previous release recorded "maildir:<unique part>".
    let old = f.mail.seal(&rec, b"Subject: a\r\n\r\na\r\n", Some("maildir:1.A.host".to_owned())).unwrap();
    f.mail.commit(vec![old]).await.unwrap();
    let r = import_maildir(&f.mail, &rec, &md, ImportOptions::default(), &mut |_, _| {}).await.unwrap();
    assert_eq!((r.imported, r.already_present), (1, 1));
    assert_eq!(f.count("mallory").await, 2);
}

#[tokio::test]
async fn mbox_without_from_line_is_refused() {
    let (f, rec, src) = setup("mbox-nofrom").await;
    let path = src.join("m2.mbox");
    std::fs::write(&path, "Subject: no From_ line at all\n\nbody\n").unwrap();
    let err = import_mbox(&f.mail, &rec, &path, ImportOptions::default(), &mut |_, _| {}).await.unwrap_err();
    assert!(matches!(err, ImportError::NotMbox(_)), "{err}");
    assert!(err.to_string().contains("not an mbox file"), "{err}");
    // An empty file is an empty mbox.
    let empty = src.join("empty.mbox");
    std::fs::write(&empty, "").unwrap();
    let r = import_mbox(&f.mail, &rec, &empty, ImportOptions::default(), &mut |_, _| {}).await.unwrap();
    assert_eq!((r.imported, r.already_present), (0, 0));
    assert_eq!(f.count("mallory").await, 0);
}

#[tokio::test]
async fn mbox_symlink_refused_unless_follow_and_fifo_refused_quickly() {
    let (f, rec, src) = setup("mbox-link").await;
    let target = src.join("target.mbox");
    std::fs::write(&target, "From x@y Thu Dec  3 10:00:00 2026\nSubject: via symlink\n\nsecret\n").unwrap();
    let link = src.join("link.mbox");
    symlink(&target, &link).unwrap();
    let err = import_mbox(&f.mail, &rec, &link, ImportOptions::default(), &mut |_, _| {}).await.unwrap_err();
    assert!(matches!(err, ImportError::Symlink(..)) && err.to_string().contains("--follow-symlinks"), "{err}");
    assert_eq!(f.count("mallory").await, 0);
    let follow = ImportOptions { follow_symlinks: true };
    let r = import_mbox(&f.mail, &rec, &link, follow, &mut |_, _| {}).await.unwrap();
    assert_eq!((r.imported, r.already_present), (1, 0));

    let fifo = src.join("fifo.mbox");
    mkfifo(&fifo);
    let mut progress = |_, _| {};
    let import = import_mbox(&f.mail, &rec, &fifo, follow, &mut progress);
    let err =
        tokio::time::timeout(Duration::from_secs(10), import).await.expect("a FIFO hangs the import").unwrap_err();
    assert!(matches!(err, ImportError::FileType(_, "regular file", "FIFO")), "{err}");
}

#[tokio::test]
async fn mbox_bare_cr_becomes_crlf_and_nul_is_reported() {
    let (f, rec, src) = setup("mbox-cr").await;
    let path = src.join("m.mbox");
    std::fs::write(&path, b"From x@y Thu Dec  3 10:00:00 2026\nSubject: nul\0\n\nbo\0dy\rbare cr\n").unwrap();
    let r = import_mbox(&f.mail, &rec, &path, ImportOptions::default(), &mut |_, _| {}).await.unwrap();
    assert_eq!((r.imported, r.already_present), (1, 0));
    assert_eq!(r.notes, vec!["message 1 (line 1): contains NUL bytes; imported unchanged".to_owned()]);
    let stored = b"Subject: nul\0\r\n\r\nbo\0dy\r\nbare cr\r\n";
    assert_eq!(user_mailbox_sizes(&f, "mallory").await, vec![stored.len() as u64]);
    assert_eq!(to_crlf(b"Subject: nul\0\n\nbo\0dy\rbare cr\n"), stored);
    assert_eq!(to_crlf(b"a\r\rb\r\n\nc\r"), b"a\r\n\r\nb\r\n\r\nc\r\n");
}

#[test]
fn import_messages_escape_control_characters() {
    assert_eq!(escape_controls("esc\x1b[31mred"), "esc\\u{1b}[31mred");
    assert_eq!(escape_controls("a\r\nb\u{202e}c"), "a\\r\\nb\\u{202e}c");
    assert_eq!(escape_controls("grüße"), "grüße");
}
