//! `audit-log verify`: walks the chain page by page and checks every MAC,
//! the seq sequence, every checkpoint's signature and MAC, and the tail
//! against the head file and the last checkpoint.
//!
//! After a bad record the walk goes on from the MAC stored in it, so each
//! altered record is reported on its own (with a wrong master key, every
//! record is); the first problem by seq is the one to look at.

use std::collections::BTreeMap;

use super::chain::{checkpoint_signature_ok, AuditKeys};
use super::head::{hex_encode, HeadState};
use super::AuditError;
use crate::store::{AuditCheckpoint, Store};

/// Records read per page.
pub const PAGE: usize = 1000;
/// Problems kept in a report; more are only counted.
const MAX_PROBLEMS: usize = 10_000;

/// What is wrong at one place of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The record's MAC does not match its content and its predecessor:
    /// edited, or written under another master key.
    MacMismatch,
    /// The record's time is older than its predecessor's and its MAC does
    /// not match: records were moved (seq values swapped).
    Reordered,
    /// Records are missing before this seq.
    Gap,
    CheckpointSignature,
    /// A checkpoint names a MAC the record at its seq does not have.
    CheckpointMismatch,
    /// The last checkpoint is beyond the end of the chain.
    TailShorterThanCheckpoint,
    /// The head file is beyond the end of the chain, or names another MAC
    /// for its seq.
    TailShorterThanHead,
    HeadMissing,
    HeadInvalid,
}

impl ProblemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::MacMismatch => "MAC mismatch",
            ProblemKind::Reordered => "reordered",
            ProblemKind::Gap => "gap in seq",
            ProblemKind::CheckpointSignature => "checkpoint signature bad",
            ProblemKind::CheckpointMismatch => "checkpoint does not match the record",
            ProblemKind::TailShorterThanCheckpoint => "tail shorter than checkpoint",
            ProblemKind::TailShorterThanHead => "tail shorter than head",
            ProblemKind::HeadMissing => "head file missing",
            ProblemKind::HeadInvalid => "head file invalid",
        }
    }
}

/// One problem: where (`seq`) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub seq: i64,
    pub kind: ProblemKind,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq {}: {}: {}", self.seq, self.kind.as_str(), self.detail)
    }
}

/// The result of a verification.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Records in the database.
    pub records: u64,
    /// Seq of the newest record.
    pub last_seq: i64,
    /// Seq of the newest checkpoint.
    pub last_checkpoint: Option<i64>,
    /// Ordered by seq; empty when the log is intact.
    pub problems: Vec<Problem>,
    /// Problems found beyond those kept.
    pub more_problems: u64,
    /// Findings that are not tampering (a head file behind the tail).
    pub warnings: Vec<String>,
}

impl VerifyReport {
    pub fn intact(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn first_problem(&self) -> Option<&Problem> {
        self.problems.first()
    }

    fn problem(&mut self, seq: i64, kind: ProblemKind, detail: impl Into<String>) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(Problem { seq, kind, detail: detail.into() });
        } else {
            self.more_problems += 1;
        }
    }
}

pub(super) async fn verify(store: &dyn Store, keys: &AuditKeys, head: &HeadState) -> Result<VerifyReport, AuditError> {
    let mut report = VerifyReport::default();
    let checkpoints: BTreeMap<i64, AuditCheckpoint> =
        store.audit_checkpoints().await?.into_iter().map(|c| (c.seq, c)).collect();
    let public = keys.public_key();
    for cp in checkpoints.values() {
        if !checkpoint_signature_ok(&public, cp) {
            report.problem(cp.seq, ProblemKind::CheckpointSignature, "the signature does not verify");
        }
    }
    report.last_checkpoint = checkpoints.keys().next_back().copied();
    let head_seq = match head {
        HeadState::Valid(h) => Some((h.seq, h.mac.clone())),
        _ => None,
    };

    let mut prev_mac: Option<Vec<u8>> = None;
    let mut prev_time = i64::MIN;
    let mut expected = 1;
    let mut after = 0;
    loop {
        let page = store.audit_range(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in page {
            report.records += 1;
            let mut checkable = true;
            if r.seq != expected {
                let missing = if r.seq == expected + 1 {
                    format!("record {expected} is missing")
                } else {
                    format!("records {expected} to {} are missing", r.seq - 1)
                };
                report.problem(expected, ProblemKind::Gap, missing);
                // Its predecessor is gone: its MAC cannot be checked.
                checkable = false;
            }
            if checkable && !keys.record_mac_ok(prev_mac.as_deref(), &r) {
                if r.time < prev_time {
                    // The record before it, newer than this one and with a
                    // bad MAC too, was moved as well: report the pair.
                    if let Some(p) = report.problems.last_mut() {
                        if p.seq == r.seq - 1 && p.kind == ProblemKind::MacMismatch {
                            p.kind = ProblemKind::Reordered;
                            p.detail = format!("newer than record {} after it, and its MAC does not match", r.seq);
                        }
                    }
                    report.problem(
                        r.seq,
                        ProblemKind::Reordered,
                        "older than the record before it, and its MAC does not match",
                    );
                } else {
                    report.problem(
                        r.seq,
                        ProblemKind::MacMismatch,
                        "the record was altered, or the master key is not the one it was written with",
                    );
                }
            }
            if let Some(cp) = checkpoints.get(&r.seq) {
                if cp.mac != r.mac {
                    report.problem(r.seq, ProblemKind::CheckpointMismatch, "the checkpoint names another MAC");
                }
            }
            if let Some((seq, mac)) = &head_seq {
                if *seq == r.seq && *mac != r.mac {
                    report.problem(r.seq, ProblemKind::TailShorterThanHead, "the head file names another MAC");
                }
            }
            prev_time = r.time;
            expected = r.seq + 1;
            report.last_seq = r.seq;
            prev_mac = Some(r.mac);
        }
    }

    let tail = report.last_seq;
    if let Some(cp) = checkpoints.values().next_back() {
        if cp.seq > tail {
            report.problem(
                tail + 1,
                ProblemKind::TailShorterThanCheckpoint,
                format!("checkpoint at seq {} but the log ends at {tail}", cp.seq),
            );
        }
    }
    match head {
        HeadState::Missing if tail > 0 => {
            report.problem(tail, ProblemKind::HeadMissing, "records exist but the head file does not")
        }
        HeadState::Missing => {}
        HeadState::Invalid(why) => report.problem(tail, ProblemKind::HeadInvalid, why.clone()),
        HeadState::Valid(h) if h.seq > tail => report.problem(
            tail + 1,
            ProblemKind::TailShorterThanHead,
            format!("the head file is at seq {} (mac {}) but the log ends at {tail}", h.seq, hex_encode(&h.mac)),
        ),
        HeadState::Valid(h) if h.seq < tail => report.warnings.push(format!(
            "the head file is at seq {}, behind the log's {tail} (a process stopped between commit and head \
             update, or the file was restored from a backup)",
            h.seq
        )),
        HeadState::Valid(_) => {}
    }
    report.problems.sort_by_key(|p| p.seq);
    Ok(report)
}
