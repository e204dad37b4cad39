//! Encryption on top of a [`Store`]: what sessions, LMTP and import use.
//!
//! Plaintext exists only in memory: messages are sealed before they reach
//! the store and opened chunk by chunk when read. SCRAM keys are sealed per
//! user too ([`MailStore::seal_scram`]); stores written by releases that kept
//! them in the clear are sealed in place when they are opened.

use std::sync::Arc;

use zeroize::Zeroizing;

use crate::config::Config;
use crate::crypto::{random_id, CryptoError, DataKey, MasterKey, RecordId, TokenSealer};
use crate::scram::ScramCredentials;
use crate::store::{
    MailboxRef, MessageMeta, MessageSource, NewMessage, Store, StoreError, StoredCredentials, UserRecord,
};
use crate::types::{MailboxId, UserName};

#[derive(Debug, thiserror::Error)]
pub enum MailStoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("the master key does not match this store (wrong key file or wrong database)")]
    WrongMasterKey,
}

/// Purpose label of sealed SCRAM keys (in the associated data).
const SCRAM_PURPOSE: &str = "scram";
/// Marks a sealed value in the `users.scram` text column.
const SEALED_SCRAM_PREFIX: &str = "sealed:v1:";

pub struct MailStore {
    store: Arc<dyn Store>,
    master: MasterKey,
}

impl MailStore {
    /// Opens the configured backend and checks the master key against it.
    pub async fn open(cfg: &Config) -> Result<Self, MailStoreError> {
        let master = MasterKey::load(&cfg.store.master_key)?;
        let store = crate::store::open(&cfg.store)?;
        Self::with_store(store, master).await
    }

    /// Wraps an opened store; records the key check on first use.
    pub async fn with_store(store: Arc<dyn Store>, master: MasterKey) -> Result<Self, MailStoreError> {
        match store.key_check().await? {
            Some(check) => master.verify_key_check(&check).map_err(|_| MailStoreError::WrongMasterKey)?,
            None => store.set_key_check(master.key_check()).await?,
        }
        let mail = Self { store, master };
        mail.seal_plaintext_scram().await?;
        Ok(mail)
    }

    /// Seals SCRAM keys that earlier releases stored in the clear. Runs at
    /// every open; after the first it finds nothing.
    async fn seal_plaintext_scram(&self) -> Result<(), MailStoreError> {
        let plain = self.store.plaintext_scram().await?;
        for (name, text) in &plain {
            let sealed = self.seal_scram_text(name, text.as_bytes());
            self.store.replace_scram(name, text, &sealed).await?;
        }
        if !plain.is_empty() {
            tracing::info!(users = plain.len(), "SCRAM keys stored in the clear by an earlier release are now sealed");
        }
        Ok(())
    }

    /// The stored (sealed) form of `user`'s SCRAM keys: a prefix and the
    /// base64 of XChaCha20-Poly1305 over the RFC 5803 text, bound to the
    /// user name.
    pub fn seal_scram(&self, user: &UserName, credentials: &ScramCredentials) -> String {
        let text = Zeroizing::new(credentials.encode());
        self.seal_scram_text(user, text.as_bytes())
    }

    fn seal_scram_text(&self, user: &UserName, text: &[u8]) -> String {
        use base64::Engine as _;
        let sealed = self.master.seal_user_secret(SCRAM_PURPOSE, user, text);
        format!("{SEALED_SCRAM_PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(sealed))
    }

    /// Opens `user`'s stored SCRAM keys. Anything not sealed for this user
    /// under this master key (a record copied from another user, edited,
    /// or plaintext) is an integrity error.
    pub fn open_scram(&self, user: &UserName, stored: &str) -> Result<ScramCredentials, CryptoError> {
        use base64::Engine as _;
        let sealed = stored
            .strip_prefix(SEALED_SCRAM_PREFIX)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .ok_or(CryptoError::Integrity)?;
        let text = self.master.open_user_secret(SCRAM_PURPOSE, user, &sealed)?;
        std::str::from_utf8(&text).ok().and_then(ScramCredentials::decode).ok_or(CryptoError::Integrity)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Creates a user with a fresh mailbox and data key.
    pub async fn create_user(&self, name: &UserName, credentials: &StoredCredentials) -> Result<(), MailStoreError> {
        let mailbox_uid = random_id();
        let (_key, wrapped) = self.master.new_data_key(&mailbox_uid);
        self.store.create_user(name, credentials, mailbox_uid, wrapped).await?;
        Ok(())
    }

    /// A 32-byte secret for `purpose`, derived from the master key (e.g.
    /// the salt secret for SCRAM's fake credentials of unknown users).
    pub fn derived_secret(&self, purpose: &[u8]) -> [u8; 32] {
        self.master.derive(purpose)
    }

    /// The sealer of the connector's per-account secrets.
    pub fn token_sealer(&self) -> TokenSealer {
        TokenSealer::new(&self.master)
    }

    pub fn data_key(&self, mailbox: &MailboxRef) -> Result<DataKey, CryptoError> {
        self.master.unwrap_data_key(&mailbox.uid, &mailbox.wrapped_key)
    }

    /// Seals `body` for `user`'s mailbox; returns the message and its UIDL.
    pub fn seal(&self, user: &UserRecord, body: &[u8], import_key: Option<String>) -> Result<NewMessage, CryptoError> {
        let key = self.data_key(&user.mailbox)?;
        let uid = random_id();
        let chunks = key.seal_message(&uid, body);
        Ok(NewMessage { mailbox_id: user.mailbox.id, uid, size: body.len() as u64, chunks, import_key })
    }

    /// Commits sealed messages atomically and durably.
    pub async fn commit(&self, messages: Vec<NewMessage>) -> Result<(), MailStoreError> {
        Ok(self.store.deliver(messages).await?)
    }

    /// Delivers one body to several mailboxes, each copy behind its own
    /// prefix (LMTP's `Return-Path` and `Delivered-To`), atomically and
    /// durably. Returns the message ids in the order of `copies`.
    ///
    /// Memory stays at the body plus one sealed copy whatever the number of
    /// mailboxes: the store seals the copies one at a time where it writes
    /// them, and no copy's plaintext is ever assembled (the prefix and the
    /// shared body are sealed as one chunked stream).
    pub async fn deliver_copies(
        &self,
        body: Vec<u8>,
        copies: Vec<(UserRecord, Vec<u8>)>,
    ) -> Result<Vec<RecordId>, MailStoreError> {
        let mut planned = Vec::with_capacity(copies.len());
        for (user, prefix) in copies {
            let key = self.data_key(&user.mailbox)?;
            planned.push(Copy { key, mailbox_id: user.mailbox.id, uid: random_id(), prefix });
        }
        let ids = planned.iter().map(|c| c.uid).collect();
        self.store.deliver_sealed(Arc::new(SharedBody { body: Zeroizing::new(body), copies: planned })).await?;
        Ok(ids)
    }

    /// Reads and decrypts chunk `index` of a message.
    pub async fn read_chunk(
        &self,
        key: &DataKey,
        meta: &MessageMeta,
        index: u32,
    ) -> Result<Zeroizing<Vec<u8>>, MailStoreError> {
        let sealed = self.store.chunk(meta.id, index).await?;
        Ok(key.open_chunk(&meta.uid, index, meta.chunk_count, &sealed)?)
    }
}

/// One copy of a [`SharedBody`]: where it goes and what precedes the body.
struct Copy {
    key: DataKey,
    mailbox_id: MailboxId,
    /// Chosen before sealing so that sealing again (a retried write) yields
    /// the same message, and the caller knows the ids up front.
    uid: RecordId,
    prefix: Vec<u8>,
}

/// The body once, sealed per copy on demand by the store.
struct SharedBody {
    /// Wiped when the last reference (the store's write) is dropped.
    body: Zeroizing<Vec<u8>>,
    copies: Vec<Copy>,
}

impl MessageSource for SharedBody {
    fn len(&self) -> usize {
        self.copies.len()
    }

    fn seal(&self, index: usize) -> Result<NewMessage, StoreError> {
        let c = self
            .copies
            .get(index)
            .ok_or_else(|| StoreError::Permanent(format!("message source has no copy {index}")))?;
        let chunks = c.key.seal_message_parts(&c.uid, &[&c.prefix, &self.body]);
        let size = (c.prefix.len() + self.body.len()) as u64;
        Ok(NewMessage { mailbox_id: c.mailbox_id, uid: c.uid, size, chunks, import_key: None })
    }
}

/// The UIDL of a message: its random 128-bit id in hex. Unique across
/// stores and stable for the life of the message (RFC 1939 section 7).
pub fn uidl(uid: &RecordId) -> String {
    uid.iter().map(|b| format!("{b:02x}")).collect()
}
