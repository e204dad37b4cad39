//! Encryption at rest.
//!
//! Key hierarchy: a 32-byte master key (from a secret reference) wraps one
//! random data key per mailbox; the data key encrypts message chunks.
//! Everything uses XChaCha20-Poly1305: 192-bit random nonces make nonce reuse
//! a non-issue without a counter that would have to survive crashes.
//!
//! The associated data binds every ciphertext to where it belongs: a wrapped
//! key to its mailbox, a chunk to its mailbox, message, index and the total
//! chunk count. A swapped, truncated or edited record fails to decrypt and is
//! reported as an integrity error; it can never be returned as someone
//! else's mail.
//!
//! Per-user secret material that is not mail (SCRAM StoredKey/ServerKey) is
//! sealed under its own subkey derived from the master key, with the
//! normalised user name and a purpose label in the associated data: a copy
//! of the database alone does not reveal it, and a record copied onto
//! another user fails to open.
//!
//! The connector's per-account secrets (rotated OAuth refresh tokens) are
//! sealed the same way by a [`TokenSealer`]: their own subkey, the account
//! name and the kind of secret in the associated data.

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::{Zeroize, Zeroizing};

use crate::secret::{SecretError, SecretRef};
use crate::types::UserName;

/// Plaintext bytes per stored chunk. RETR reads and decrypts one chunk at a
/// time, so this bounds per-session memory while streaming.
pub const CHUNK_SIZE: usize = 64 * 1024;
const NONCE_LEN: usize = 24;
const KEY_AAD: &[u8] = b"pop3connex/mailbox-key/v1";
const CHUNK_AAD: &[u8] = b"pop3connex/message-chunk/v1";
const CHECK_AAD: &[u8] = b"pop3connex/key-check/v1";
const USER_SECRET_AAD: &[u8] = b"pop3connex/user-secret/v1";
/// Derivation label of the subkey for per-user secrets.
const USER_SECRET_KEY: &[u8] = b"user-secrets";
/// Derivation label of the subkey for the connector's per-account secrets.
/// Older than the `pop3connex/...` labels above and kept as it is: tokens
/// sealed on disk must keep opening.
const CONNECTOR_SECRET_KEY: &[u8] = b"pop3connex connector secrets v1";

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("master key: {0}")]
    Secret(#[from] SecretError),
    #[error("master key must be 32 bytes (raw, base64 or hex)")]
    BadMasterKey,
    #[error("integrity check failed: record altered, misplaced or wrong key")]
    Integrity,
}

/// 16 random bytes identifying a mailbox or message in associated data.
pub type RecordId = [u8; 16];

pub fn random_id() -> RecordId {
    let mut id = [0u8; 16];
    fill_random(&mut id);
    id
}

fn fill_random(buf: &mut [u8]) {
    // The OS RNG failing means the machine cannot do cryptography at all;
    // continuing with a predictable key or nonce would be worse than exiting.
    getrandom::getrandom(buf).expect("operating system random number generator failed");
}

/// The key-encryption key. Never leaves memory, wiped on drop.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    /// Loads and decodes the key behind a secret reference.
    pub fn load(secret: &SecretRef) -> Result<Self, CryptoError> {
        let raw = secret.load()?;
        Self::decode(&raw)
    }

    /// Accepts 32 raw bytes, or base64 / hex text of 32 bytes.
    pub fn decode(raw: &[u8]) -> Result<Self, CryptoError> {
        let mut key = Zeroizing::new([0u8; 32]);
        if raw.len() == 32 {
            key.copy_from_slice(raw);
            return Ok(MasterKey(key));
        }
        let text = std::str::from_utf8(raw).map_err(|_| CryptoError::BadMasterKey)?.trim();
        let decoded = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            Zeroizing::new(
                (0..32)
                    .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| CryptoError::BadMasterKey))
                    .collect::<Result<Vec<u8>, _>>()?,
            )
        } else {
            Zeroizing::new(
                base64::engine::general_purpose::STANDARD.decode(text).map_err(|_| CryptoError::BadMasterKey)?,
            )
        };
        if decoded.len() != 32 {
            return Err(CryptoError::BadMasterKey);
        }
        key.copy_from_slice(&decoded);
        Ok(MasterKey(key))
    }

    /// A fresh random key, base64-encoded for a key file.
    pub fn generate_base64() -> Zeroizing<String> {
        let mut k = Zeroizing::new([0u8; 32]);
        fill_random(&mut *k);
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(*k))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&*self.0).into())
    }

    /// A purpose-bound secret derived from the master key (HMAC-SHA256 with
    /// the purpose label), so features needing a server secret do not add
    /// another key to manage.
    pub fn derive(&self, purpose: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&*self.0).expect("HMAC takes any key length");
        mac.update(b"pop3connex/derive/v1/");
        mac.update(purpose);
        mac.finalize().into_bytes().into()
    }

    /// A value stored with the database so a wrong master key is reported
    /// at start-up instead of as a flood of per-message integrity errors.
    pub fn key_check(&self) -> Vec<u8> {
        seal(&self.cipher(), b"pop3connex", CHECK_AAD)
    }

    pub fn verify_key_check(&self, check: &[u8]) -> Result<(), CryptoError> {
        open(&self.cipher(), check, CHECK_AAD).map(drop)
    }

    /// Creates a new data key for `mailbox` and returns it with its wrapped
    /// (storable) form.
    pub fn new_data_key(&self, mailbox: &RecordId) -> (DataKey, Vec<u8>) {
        let mut k = Zeroizing::new([0u8; 32]);
        fill_random(&mut *k);
        let wrapped = seal(&self.cipher(), &*k, &key_aad(mailbox));
        (DataKey { key: k, mailbox: *mailbox }, wrapped)
    }

    /// Unwraps a stored data key; fails if it belongs to another mailbox.
    pub fn unwrap_data_key(&self, mailbox: &RecordId, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        let mut plain = open(&self.cipher(), wrapped, &key_aad(mailbox))?;
        if plain.len() != 32 {
            plain.zeroize();
            return Err(CryptoError::Integrity);
        }
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(&plain);
        plain.zeroize();
        Ok(DataKey { key: k, mailbox: *mailbox })
    }
}

impl MasterKey {
    fn user_secret_cipher(&self) -> XChaCha20Poly1305 {
        let key = Zeroizing::new(self.derive(USER_SECRET_KEY));
        XChaCha20Poly1305::new((&*key).into())
    }

    /// Seals `plain`, a secret of `user` for `purpose` (e.g. `scram`).
    pub fn seal_user_secret(&self, purpose: &str, user: &UserName, plain: &[u8]) -> Vec<u8> {
        seal(&self.user_secret_cipher(), plain, &user_secret_aad(purpose, user))
    }

    /// Opens what [`Self::seal_user_secret`] sealed; fails for another
    /// user, another purpose, an edited record or another master key.
    pub fn open_user_secret(
        &self,
        purpose: &str,
        user: &UserName,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        open(&self.user_secret_cipher(), sealed, &user_secret_aad(purpose, user)).map(Zeroizing::new)
    }
}

/// Seals the connector's per-account secrets (rotated OAuth refresh
/// tokens) under a subkey of the master key. The associated data is the
/// account name, a NUL and the kind of secret, so a record copied onto
/// another account or kind fails to open. On disk: the 24-byte nonce, then
/// the ciphertext with its tag.
pub struct TokenSealer {
    cipher: XChaCha20Poly1305,
}

impl TokenSealer {
    pub fn new(master: &MasterKey) -> Self {
        let key = Zeroizing::new(master.derive(CONNECTOR_SECRET_KEY));
        TokenSealer { cipher: XChaCha20Poly1305::new((&*key).into()) }
    }

    /// Seals `token`, a secret of `kind` (e.g. `oauth2-refresh-token`) of
    /// the connector account `account`.
    pub fn seal(&self, account: &str, kind: &str, token: &[u8]) -> Vec<u8> {
        seal(&self.cipher, token, &token_aad(account, kind))
    }

    /// Opens what [`Self::seal`] sealed; fails for another account, another
    /// kind, an edited record or another master key.
    pub fn open(&self, account: &str, kind: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        open(&self.cipher, sealed, &token_aad(account, kind)).map(Zeroizing::new)
    }
}

/// `account`, NUL, `kind`. (A NUL cannot occur in an account name, so no
/// two pairs give the same bytes.)
fn token_aad(account: &str, kind: &str) -> Vec<u8> {
    format!("{account}\0{kind}").into_bytes()
}

/// Label, purpose (length-prefixed) and the normalised user name.
fn user_secret_aad(purpose: &str, user: &UserName) -> Vec<u8> {
    let mut aad = Vec::with_capacity(USER_SECRET_AAD.len() + 2 + purpose.len() + user.as_str().len());
    aad.extend_from_slice(USER_SECRET_AAD);
    aad.push(u8::try_from(purpose.len()).unwrap_or(u8::MAX));
    aad.extend_from_slice(purpose.as_bytes());
    aad.extend_from_slice(user.as_str().as_bytes());
    aad
}

fn key_aad(mailbox: &RecordId) -> Vec<u8> {
    [KEY_AAD, mailbox].concat()
}

/// A mailbox's data key, wiped on drop.
pub struct DataKey {
    key: Zeroizing<[u8; 32]>,
    mailbox: RecordId,
}

impl DataKey {
    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&*self.key).into())
    }

    fn chunk_aad(&self, message: &RecordId, index: u32, count: u32) -> Vec<u8> {
        let mut aad = Vec::with_capacity(CHUNK_AAD.len() + 40);
        aad.extend_from_slice(CHUNK_AAD);
        aad.extend_from_slice(&self.mailbox);
        aad.extend_from_slice(message);
        aad.extend_from_slice(&index.to_be_bytes());
        aad.extend_from_slice(&count.to_be_bytes());
        aad
    }

    /// Splits `plain` into chunks and encrypts each for `message`.
    pub fn seal_message(&self, message: &RecordId, plain: &[u8]) -> Vec<Vec<u8>> {
        self.seal_message_parts(message, &[plain])
    }

    /// Seals the concatenation of `parts` as one message, chunk by chunk,
    /// without building the concatenation: a header prefix and a shared
    /// body need no per-message plaintext copy (only one chunk buffer).
    pub fn seal_message_parts(&self, message: &RecordId, parts: &[&[u8]]) -> Vec<Vec<u8>> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let count = total.div_ceil(CHUNK_SIZE).max(1);
        let count32 = u32::try_from(count).unwrap_or(u32::MAX);
        let cipher = self.cipher();
        let mut sealed = Vec::with_capacity(count);
        let mut buf = Zeroizing::new(Vec::with_capacity(CHUNK_SIZE.min(total)));
        let mut rest = parts.iter().copied().filter(|p| !p.is_empty());
        let mut current: &[u8] = rest.next().unwrap_or(&[]);
        for i in 0..count {
            buf.clear();
            while buf.len() < CHUNK_SIZE && !current.is_empty() {
                let take = (CHUNK_SIZE - buf.len()).min(current.len());
                buf.extend_from_slice(&current[..take]);
                current = &current[take..];
                if current.is_empty() {
                    current = rest.next().unwrap_or(&[]);
                }
            }
            sealed.push(seal(&cipher, &buf, &self.chunk_aad(message, i as u32, count32)));
        }
        sealed
    }

    /// Decrypts chunk `index` of `count` of `message`.
    pub fn open_chunk(
        &self,
        message: &RecordId,
        index: u32,
        count: u32,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        open(&self.cipher(), sealed, &self.chunk_aad(message, index, count)).map(Zeroizing::new)
    }
}

fn seal(cipher: &XChaCha20Poly1305, plain: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce);
    // Encryption only fails for inputs beyond 256 GiB, which chunking rules out.
    let ct = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
        .expect("XChaCha20-Poly1305 encryption of a bounded chunk cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

fn open(cipher: &XChaCha20Poly1305, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < NONCE_LEN + 16 {
        return Err(CryptoError::Integrity);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    cipher.decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad }).map_err(|_| CryptoError::Integrity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk() -> MasterKey {
        MasterKey::decode(MasterKey::generate_base64().as_bytes()).unwrap()
    }

    #[test]
    fn round_trip_and_binding() {
        let mk = mk();
        let (mb1, mb2) = (random_id(), random_id());
        let (dk, wrapped) = mk.new_data_key(&mb1);
        assert!(mk.unwrap_data_key(&mb2, &wrapped).is_err(), "key bound to its mailbox");
        let dk2 = mk.unwrap_data_key(&mb1, &wrapped).unwrap();
        let (m1, m2) = (random_id(), random_id());
        let body: Vec<u8> = (0..CHUNK_SIZE * 2 + 10).map(|i| (i % 251) as u8).collect();
        let sealed = dk.seal_message(&m1, &body);
        assert_eq!(sealed.len(), 3);
        let mut out = Vec::new();
        for (i, c) in sealed.iter().enumerate() {
            out.extend_from_slice(&dk2.open_chunk(&m1, i as u32, 3, c).unwrap());
        }
        assert_eq!(out, body);
        // Wrong message, wrong index, wrong count (truncation), other mailbox.
        assert!(dk2.open_chunk(&m2, 0, 3, &sealed[0]).is_err());
        assert!(dk2.open_chunk(&m1, 1, 3, &sealed[0]).is_err());
        assert!(dk2.open_chunk(&m1, 0, 2, &sealed[0]).is_err());
        let (other, _) = mk.new_data_key(&mb2);
        assert!(other.open_chunk(&m1, 0, 3, &sealed[0]).is_err());
        // A flipped bit.
        let mut bad = sealed[0].clone();
        bad[30] ^= 1;
        assert!(dk2.open_chunk(&m1, 0, 3, &bad).is_err());
        // Plaintext does not appear in the ciphertext.
        assert!(!sealed[0].windows(16).any(|w| w == &body[100..116]));
    }

    #[test]
    fn sealing_parts_equals_sealing_their_concatenation() {
        let mk = mk();
        let (dk, _) = mk.new_data_key(&random_id());
        let body: Vec<u8> = (0..CHUNK_SIZE * 2 + 7).map(|i| (i % 253) as u8).collect();
        let open_all = |m: &RecordId, sealed: &[Vec<u8>]| -> Vec<u8> {
            let n = sealed.len() as u32;
            sealed.iter().enumerate().flat_map(|(i, c)| dk.open_chunk(m, i as u32, n, c).unwrap().to_vec()).collect()
        };
        for split in [0, 1, 77, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, body.len()] {
            let (head, tail) = body.split_at(split);
            let m = random_id();
            let sealed = dk.seal_message_parts(&m, &[head, &[], tail]);
            assert_eq!(sealed.len(), 3, "split at {split}");
            assert_eq!(open_all(&m, &sealed), body, "split at {split}");
        }
        let m = random_id();
        let sealed = dk.seal_message_parts(&m, &[&[], &[]]);
        assert_eq!(sealed.len(), 1, "an empty message is one empty chunk");
        assert!(open_all(&m, &sealed).is_empty());
    }

    #[test]
    fn user_secrets_are_bound_to_user_purpose_and_key() {
        let mk = mk();
        let (alice, bob) = (UserName::parse("Alice").unwrap(), UserName::parse("bob").unwrap());
        let sealed = mk.seal_user_secret("scram", &alice, b"StoredKey and ServerKey");
        assert!(!sealed.windows(9).any(|w| w == b"StoredKey"));
        assert_eq!(
            &**mk.open_user_secret("scram", &UserName::parse("ALICE").unwrap(), &sealed).unwrap(),
            b"StoredKey and ServerKey"
        );
        assert!(mk.open_user_secret("scram", &bob, &sealed).is_err(), "swapped onto another user");
        assert!(mk.open_user_secret("other", &alice, &sealed).is_err(), "another purpose");
        assert!(self::mk().open_user_secret("scram", &alice, &sealed).is_err(), "another master key");
        let mut bad = sealed.clone();
        bad[30] ^= 1;
        assert!(mk.open_user_secret("scram", &alice, &bad).is_err());
    }

    #[test]
    fn connector_tokens_are_bound_to_account_kind_and_key() {
        let mk = mk();
        let sealer = TokenSealer::new(&mk);
        let kind = "oauth2-refresh-token";
        let sealed = sealer.seal("isp", kind, b"refresh-token-value");
        assert!(!sealed.windows(13).any(|w| w == b"refresh-token"));
        assert_eq!(&**sealer.open("isp", kind, &sealed).unwrap(), b"refresh-token-value");
        assert!(sealer.open("isp2", kind, &sealed).is_err(), "copied onto another account");
        assert!(sealer.open("isp", "other-kind", &sealed).is_err(), "another kind");
        assert!(TokenSealer::new(&self::mk()).open("isp", kind, &sealed).is_err(), "another master key");
        let mut bad = sealed.clone();
        bad[30] ^= 1;
        assert!(sealer.open("isp", kind, &bad).is_err());
        assert!(sealer.open("isp", kind, &sealed[..NONCE_LEN]).is_err());
    }

    /// Stores written before the sealing moved here keep opening: the
    /// subkey, the nonce || ciphertext layout and the AAD are unchanged.
    #[test]
    fn connector_tokens_keep_their_on_disk_format() {
        let mk = mk();
        let key = Zeroizing::new(mk.derive(b"pop3connex connector secrets v1"));
        let old = XChaCha20Poly1305::new((&*key).into());
        let nonce = [7u8; 24];
        let ct = old
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: b"tok".as_slice(), aad: b"acct\0oauth2-refresh-token" })
            .unwrap();
        let sealed = [&nonce[..], &ct].concat();
        let sealer = TokenSealer::new(&mk);
        assert_eq!(&**sealer.open("acct", "oauth2-refresh-token", &sealed).unwrap(), b"tok");
        let new = sealer.seal("acct", "oauth2-refresh-token", b"tok2");
        let (n, c) = new.split_at(24);
        let plain = old.decrypt(XNonce::from_slice(n), Payload { msg: c, aad: b"acct\0oauth2-refresh-token" }).unwrap();
        assert_eq!(plain, b"tok2");
    }

    #[test]
    fn key_formats_and_check() {
        let hex = "00".repeat(32);
        assert!(MasterKey::decode(hex.as_bytes()).is_ok());
        assert!(MasterKey::decode(b"short").is_err());
        let a = mk();
        let b = mk();
        assert!(a.verify_key_check(&a.key_check()).is_ok());
        assert!(b.verify_key_check(&a.key_check()).is_err());
    }
}
