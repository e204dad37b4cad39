//! The audit log's keys and the byte strings they authenticate: the
//! canonical encoding of a record, the chain MAC, the head-file tag and the
//! checkpoint signature.
//!
//! Every key is derived from the master key with its own purpose label and
//! lives only in memory; none is stored in the database. The canonical
//! encoding is length-prefixed fields, not JSON text, so two different
//! records can never encode to the same bytes.

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use hmac::Mac;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::store::{AuditChain, AuditCheckpoint, StoredAuditRecord};

/// Derivation label of the chain's HMAC key.
pub const CHAIN_KEY_PURPOSE: &[u8] = b"audit-log-chain";
/// Derivation label of the Ed25519 checkpoint signing key's seed.
pub const CHECKPOINT_KEY_PURPOSE: &[u8] = b"audit-log-checkpoint";
/// Derivation label of the head file's HMAC key.
pub const HEAD_KEY_PURPOSE: &[u8] = b"audit-log-head";

/// Domain separation of the three authenticated byte strings.
const RECORD_TAG: &[u8] = b"pop3connex/audit-record/v1";
const CHECKPOINT_TAG: &[u8] = b"pop3connex/audit-checkpoint/v1";
const HEAD_TAG: &[u8] = b"pop3connex/audit-head/v1";

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The keys of the audit log, derived from the master key.
pub struct AuditKeys {
    chain: Zeroizing<[u8; 32]>,
    head: Zeroizing<[u8; 32]>,
    signing: SigningKey,
}

impl AuditKeys {
    /// Derives the keys through `derive` (the master key's
    /// [`crate::crypto::MasterKey::derive`]).
    pub fn derive(derive: impl Fn(&[u8]) -> [u8; 32]) -> Self {
        let seed = Zeroizing::new(derive(CHECKPOINT_KEY_PURPOSE));
        AuditKeys {
            chain: Zeroizing::new(derive(CHAIN_KEY_PURPOSE)),
            head: Zeroizing::new(derive(HEAD_KEY_PURPOSE)),
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// The public half of the checkpoint signing key.
    pub fn public_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// `mac_n = HMAC(K, mac_{n-1} || encode(record n))`; the first record
    /// chains to 32 zero bytes.
    pub fn record_mac(&self, prev: Option<&[u8]>, record: &StoredAuditRecord) -> Vec<u8> {
        let mut mac = hmac(&self.chain);
        mac.update(prev.unwrap_or(&[0u8; 32]));
        mac.update(&encode_record(record));
        mac.finalize().into_bytes().to_vec()
    }

    /// Whether `record.mac` is the MAC of `record` after `prev`.
    pub fn record_mac_ok(&self, prev: Option<&[u8]>, record: &StoredAuditRecord) -> bool {
        let expected = self.record_mac(prev, record);
        bool::from(expected.ct_eq(&record.mac))
    }

    /// The tag of a head file naming `seq` and `mac`.
    pub fn head_tag(&self, seq: i64, mac: &[u8]) -> Vec<u8> {
        let mut h = hmac(&self.head);
        h.update(HEAD_TAG);
        h.update(&seq.to_be_bytes());
        field(&mut |b| h.update(b), mac);
        h.finalize().into_bytes().to_vec()
    }

    pub fn head_tag_ok(&self, seq: i64, mac: &[u8], tag: &[u8]) -> bool {
        bool::from(self.head_tag(seq, mac).ct_eq(tag))
    }

    /// Signs a checkpoint of the chain at `seq` (whose record has `mac`).
    pub fn sign_checkpoint(&self, seq: i64, mac: &[u8], time: i64) -> AuditCheckpoint {
        let signature = self.signing.sign(&checkpoint_message(seq, mac, time)).to_bytes().to_vec();
        AuditCheckpoint { seq, mac: mac.to_vec(), time, signature }
    }
}

/// Whether `checkpoint` carries a valid signature by `key`.
pub fn checkpoint_signature_ok(key: &VerifyingKey, checkpoint: &AuditCheckpoint) -> bool {
    let Ok(signature) = ed25519_dalek::Signature::from_slice(&checkpoint.signature) else {
        return false;
    };
    key.verify(&checkpoint_message(checkpoint.seq, &checkpoint.mac, checkpoint.time), &signature).is_ok()
}

/// What a checkpoint signature covers: the tag, then seq and time as 8-byte
/// big-endian integers, then the 32-byte MAC. Documented in
/// docs/audit-log.md so an auditor can check a logged checkpoint with any
/// Ed25519 tool.
pub fn checkpoint_message(seq: i64, mac: &[u8], time: i64) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_TAG.len() + 16 + mac.len());
    m.extend_from_slice(CHECKPOINT_TAG);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&time.to_be_bytes());
    m.extend_from_slice(mac);
    m
}

fn hmac(key: &[u8; 32]) -> HmacSha256 {
    // HMAC accepts keys of any length: this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length")
}

/// A field as a 4-byte big-endian length and its bytes.
fn field(out: &mut impl FnMut(&[u8]), bytes: &[u8]) {
    out(&(bytes.len() as u32).to_be_bytes());
    out(bytes);
}

/// An optional field: one byte 0 (absent) or 1 followed by the field.
fn optional(out: &mut impl FnMut(&[u8]), bytes: Option<&[u8]>) {
    match bytes {
        None => out(&[0]),
        Some(b) => {
            out(&[1]);
            field(out, b);
        }
    }
}

/// The canonical encoding of a record (its MAC excluded): a version tag,
/// seq and time as 8-byte big-endian integers, then every text field
/// length-prefixed, optional ones with a presence byte. `before`/`after`
/// are authenticated as the JSON text stored.
pub fn encode_record(r: &StoredAuditRecord) -> Vec<u8> {
    let mut buf = Vec::with_capacity(128);
    let mut out = |b: &[u8]| buf.extend_from_slice(b);
    field(&mut out, RECORD_TAG);
    out(&r.seq.to_be_bytes());
    out(&r.time.to_be_bytes());
    field(&mut out, r.actor.as_bytes());
    optional(&mut out, r.source.as_deref().map(str::as_bytes));
    field(&mut out, r.action.as_bytes());
    field(&mut out, r.target.as_bytes());
    field(&mut out, r.outcome.as_bytes());
    optional(&mut out, r.before.as_deref().map(str::as_bytes));
    optional(&mut out, r.after.as_deref().map(str::as_bytes));
    buf
}

impl AuditChain for AuditKeys {
    fn mac(&self, prev: Option<&[u8]>, record: &StoredAuditRecord) -> Vec<u8> {
        self.record_mac(prev, record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(actor: &str, target: &str) -> StoredAuditRecord {
        StoredAuditRecord {
            seq: 1,
            time: 5,
            actor: actor.into(),
            source: None,
            action: "user.add".into(),
            target: target.into(),
            outcome: "ok".into(),
            before: None,
            after: None,
            mac: Vec::new(),
        }
    }

    #[test]
    fn moving_bytes_between_fields_changes_the_encoding() {
        assert_ne!(encode_record(&record("ab", "c")), encode_record(&record("a", "bc")));
        let mut absent = record("a", "b");
        let mut empty = absent.clone();
        empty.before = Some(String::new());
        assert_ne!(encode_record(&absent), encode_record(&empty));
        absent.source = Some(String::new());
        assert_ne!(encode_record(&absent), encode_record(&record("a", "b")));
    }

    #[test]
    fn keys_differ_by_purpose_and_checkpoints_verify() {
        let keys = AuditKeys::derive(|p| {
            let mut k = [0u8; 32];
            k[..p.len().min(32)].copy_from_slice(&p[..p.len().min(32)]);
            k
        });
        let r = record("a", "b");
        let mac = keys.record_mac(None, &r);
        assert_ne!(mac, keys.record_mac(Some(&[1u8; 32]), &r));
        assert_ne!(keys.head_tag(1, &mac), mac);
        let mut cp = keys.sign_checkpoint(1, &mac, 7);
        assert!(checkpoint_signature_ok(&keys.public_key(), &cp));
        cp.time += 1;
        assert!(!checkpoint_signature_ok(&keys.public_key(), &cp));
    }
}
