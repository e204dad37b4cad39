//! Tests of the audit log against a real SQLite store: a round trip, and
//! every kind of tampering (edit, delete, truncate, reorder, forged
//! checkpoint, wrong key) detected and named by seq.

use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::crypto::MasterKey;
use crate::store::sqlite::SqliteStore;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("p3x-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn db(&self) -> PathBuf {
        self.0.join("s.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn keys(seed: u8) -> AuditKeys {
    let master = MasterKey::decode(&[seed; 32]).unwrap();
    AuditKeys::derive(|p| master.derive(p))
}

fn log_on(dir: &TempDir, seed: u8) -> (AuditLog, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.db()).unwrap());
    (AuditLog::new(store.clone(), keys(seed), head_path(&dir.db())), store)
}

/// Appends `n` records whose times strictly increase.
async fn fill(log: &AuditLog, n: usize) {
    for i in 0..n {
        let details = AuditDetails {
            source: Some("192.0.2.7".parse().unwrap()),
            before: Some(serde_json::json!({ "class": null })),
            after: Some(serde_json::json!({ "class": format!("c{i}") })),
        };
        let target = format!("user{i}");
        let new = NewRecord {
            actor: "cli:root",
            action: "user.set_class",
            target: &target,
            outcome: "ok",
            details: &details,
        };
        log.append(new).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

fn sql(dir: &TempDir, statements: &str) {
    let conn = rusqlite::Connection::open(dir.db()).unwrap();
    conn.execute_batch(statements).unwrap();
}

fn first(report: &VerifyReport) -> &Problem {
    report.first_problem().unwrap_or_else(|| panic!("tampering not detected: {report:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn append_then_verify_round_trip() {
    let dir = TempDir::new("roundtrip");
    let (log, _store) = log_on(&dir, 1);
    fill(&log, 5).await;
    let report = log.verify().await.unwrap();
    assert!(report.intact(), "{report:?}");
    assert_eq!((report.records, report.last_seq), (5, 5));
    // The first append found no checkpoint: one was written at seq 1.
    assert_eq!(report.last_checkpoint, Some(1));
    let read = log.query(&AuditQuery { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(read.iter().map(|r| r.seq).collect::<Vec<_>>(), [5, 4, 3, 2, 1]);
    assert_eq!(read[0].after, Some(serde_json::json!({ "class": "c4" })));
    assert_eq!(read[0].source.as_deref(), Some("192.0.2.7"));
    let filtered = log
        .query(&AuditQuery {
            action: Some("user".into()),
            actor: Some("cli:root".into()),
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(filtered.len(), 2);
    let none = log.query(&AuditQuery { action: Some("use".into()), limit: 10, ..Default::default() }).await.unwrap();
    assert!(none.is_empty(), "an action prefix matches only up to a dot");
    let mut exported = Vec::new();
    let n = log
        .export(None, None, &mut |r| {
            exported.push(r.seq);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!((n, exported), (5, vec![1, 2, 3, 4, 5]));
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_every_hundred_records_and_they_verify() {
    let dir = TempDir::new("checkpoints");
    let (log, store) = log_on(&dir, 1);
    let details = AuditDetails::default();
    for _ in 0..(CHECKPOINT_EVERY + 1) {
        let new = NewRecord { actor: "cli", action: "user.list", target: "*", outcome: "ok", details: &details };
        log.append(new).await.unwrap();
    }
    let seqs: Vec<i64> = store.audit_checkpoints().await.unwrap().iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [1, 1 + CHECKPOINT_EVERY]);
    assert!(log.verify().await.unwrap().intact());
    // Not due again right away.
    assert!(log.checkpoint_if_due(None).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edited_middle_record_is_named() {
    let dir = TempDir::new("edit");
    let (log, _store) = log_on(&dir, 1);
    fill(&log, 6).await;
    sql(&dir, "UPDATE audit_log SET target = 'mallory' WHERE seq = 3");
    let report = log.verify().await.unwrap();
    let p = first(&report);
    assert_eq!((p.seq, p.kind), (3, ProblemKind::MacMismatch), "{report:?}");
    assert_eq!(report.problems.len(), 1, "only the edited record is bad: {report:?}");
    // The before/after values are authenticated too.
    sql(&dir, "UPDATE audit_log SET target = 'user2' WHERE seq = 3; UPDATE audit_log SET after = '{}' WHERE seq = 4");
    assert_eq!(first(&log.verify().await.unwrap()).seq, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_middle_record_is_a_gap() {
    let dir = TempDir::new("delete");
    let (log, _store) = log_on(&dir, 1);
    fill(&log, 6).await;
    sql(&dir, "DELETE FROM audit_log WHERE seq = 4");
    let report = log.verify().await.unwrap();
    let p = first(&report);
    assert_eq!((p.seq, p.kind), (4, ProblemKind::Gap), "{report:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_newest_records_is_caught_by_the_head_file_and_blocks_appends() {
    let dir = TempDir::new("truncate");
    let (log, _store) = log_on(&dir, 1);
    fill(&log, 8).await;
    sql(&dir, "DELETE FROM audit_log WHERE seq > 5");
    let report = log.verify().await.unwrap();
    let p = first(&report);
    assert_eq!((p.seq, p.kind), (6, ProblemKind::TailShorterThanHead), "{report:?}");
    // Appending would make the chain whole again and hide the deletion.
    let details = AuditDetails::default();
    let new = NewRecord { actor: "cli", action: "user.list", target: "*", outcome: "ok", details: &details };
    assert!(matches!(log.append(new.clone()).await, Err(AuditError::HeadMismatch(_))));
    // Deleting the head file as well does not help.
    std::fs::remove_file(log.head_path()).unwrap();
    let report = log.verify().await.unwrap();
    assert_eq!(first(&report).kind, ProblemKind::HeadMissing, "{report:?}");
    assert!(matches!(log.append(new.clone()).await, Err(AuditError::HeadMismatch(_))));
    // An operator's reset is recorded in the chain, and appends go on.
    let reset = log.reset_head("cli:root").await.unwrap();
    assert_eq!((reset.seq, reset.action.as_str()), (6, "audit.head_reset"));
    assert_eq!(reset.before, Some(serde_json::json!({ "head": "missing" })));
    log.append(new).await.unwrap();
    assert!(log.verify().await.unwrap().intact());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_head_file_is_reported() {
    let dir = TempDir::new("forgedhead");
    let (log, _store) = log_on(&dir, 1);
    fill(&log, 3).await;
    let text = std::fs::read_to_string(log.head_path()).unwrap();
    std::fs::write(log.head_path(), text.replacen(" 3 ", " 2 ", 1)).unwrap();
    assert_eq!(first(&log.verify().await.unwrap()).kind, ProblemKind::HeadInvalid);
}

#[tokio::test(flavor = "multi_thread")]
async fn swapped_records_are_reported_as_reordered() {
    let dir = TempDir::new("reorder");
    let (log, _store) = log_on(&dir, 1);
    fill(&log, 6).await;
    sql(
        &dir,
        "UPDATE audit_log SET seq = -1 WHERE seq = 3; UPDATE audit_log SET seq = 3 WHERE seq = 4;
         UPDATE audit_log SET seq = 4 WHERE seq = -1;",
    );
    let report = log.verify().await.unwrap();
    let p = first(&report);
    assert_eq!((p.seq, p.kind), (3, ProblemKind::Reordered), "{report:?}");
    assert_eq!(report.problems[1].seq, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_checkpoint_signature_is_reported() {
    let dir = TempDir::new("forgedcp");
    let (log, _store) = log_on(&dir, 1);
    fill(&log, 3).await;
    sql(&dir, "UPDATE audit_checkpoints SET signature = zeroblob(64) WHERE seq = 1");
    let p = first(&log.verify().await.unwrap()).clone();
    assert_eq!((p.seq, p.kind), (1, ProblemKind::CheckpointSignature));
    // A checkpoint signed by another key is refused too.
    let other = keys(9).sign_checkpoint(2, &[0u8; 32], 1);
    sql(&dir, "DELETE FROM audit_checkpoints");
    let conn = rusqlite::Connection::open(dir.db()).unwrap();
    conn.execute(
        "INSERT INTO audit_checkpoints(seq, mac, time, signature) VALUES(?1, ?2, ?3, ?4)",
        rusqlite::params![other.seq, other.mac, other.time, other.signature],
    )
    .unwrap();
    let report = log.verify().await.unwrap();
    assert_eq!(first(&report).kind, ProblemKind::CheckpointSignature, "{report:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_beyond_the_tail_is_reported() {
    let dir = TempDir::new("cptail");
    let (log, _store) = log_on(&dir, 1);
    fill(&log, 4).await;
    // Truncated to before the checkpoint at seq 1, head file gone too.
    sql(&dir, "DELETE FROM audit_log");
    std::fs::remove_file(log.head_path()).unwrap();
    let report = log.verify().await.unwrap();
    assert_eq!(first(&report).kind, ProblemKind::TailShorterThanCheckpoint, "{report:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_wrong_master_key_every_record_is_bad() {
    let dir = TempDir::new("wrongkey");
    let (log, store) = log_on(&dir, 1);
    fill(&log, 4).await;
    let wrong = AuditLog::new(store, keys(2), head_path(&dir.db()));
    let report = wrong.verify().await.unwrap();
    let bad_records: Vec<i64> =
        report.problems.iter().filter(|p| p.kind == ProblemKind::MacMismatch).map(|p| p.seq).collect();
    assert_eq!(bad_records, [1, 2, 3, 4], "{report:?}");
    assert!(report.problems.iter().any(|p| p.kind == ProblemKind::CheckpointSignature));
    assert!(report.problems.iter().any(|p| p.kind == ProblemKind::HeadInvalid));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_logs_on_one_database_build_one_chain() {
    // The server and a CLI command append at the same time.
    let dir = TempDir::new("concurrent");
    let (a, _sa) = log_on(&dir, 1);
    let (b, _sb) = log_on(&dir, 1);
    let (a, b) = (Arc::new(a), Arc::new(b));
    let mut tasks = Vec::new();
    for log in [a.clone(), b.clone(), a.clone(), b.clone()] {
        tasks.push(tokio::spawn(async move {
            let details = AuditDetails::default();
            for _ in 0..10 {
                let new = NewRecord { actor: "cli", action: "ban.list", target: "*", outcome: "ok", details: &details };
                log.append(new).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let report = a.verify().await.unwrap();
    assert!(report.intact(), "{report:?}");
    assert_eq!(report.last_seq, 40);
}
