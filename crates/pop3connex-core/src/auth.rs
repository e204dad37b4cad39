//! Accounts and credential checks.
//!
//! Password hashing runs on the blocking pool behind a semaphore: Argon2id
//! takes ~19 MiB and a few milliseconds per attempt, so an unbounded number
//! of parallel attempts would let a login flood exhaust memory and starve
//! sessions that are already logged in.

use std::sync::Arc;

use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::config::AuthConfig;
use crate::mailstore::{MailStore, MailStoreError};
use crate::password::{dummy_hash, hash_password, verify_password, PasswordError};
use crate::store::{StoreError, UserRecord};
use crate::types::UserName;

/// Why a login failed. Clients see one generic reply for all of these;
/// logs and events get the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    UnknownUser,
    BadPassword,
    Disabled,
    /// Storage trouble: the client gets `[SYS/TEMP]`, not `[AUTH]`.
    Temporary,
}

impl AuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::UnknownUser => "unknown user",
            AuthFailure::BadPassword => "bad password",
            AuthFailure::Disabled => "account disabled",
            AuthFailure::Temporary => "temporary failure",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error(transparent)]
    Store(#[from] MailStoreError),
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error("no such user")]
    NoSuchUser,
    #[error("user already exists")]
    UserExists,
    #[error("password must be between 1 and 1024 bytes and must not contain NUL, CR or LF")]
    BadPassword,
}

impl From<StoreError> for AccountError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoSuchUser => AccountError::NoSuchUser,
            StoreError::UserExists => AccountError::UserExists,
            other => AccountError::Store(other.into()),
        }
    }
}

pub struct Authenticator {
    mail: Arc<MailStore>,
    cfg: AuthConfig,
    /// Verified against for unknown users so they take as long as known ones.
    dummy: String,
    hashing: Semaphore,
}

/// Parallel hash computations; beyond this, logins queue.
const MAX_PARALLEL_HASHES: usize = 4;
const MAX_PASSWORD_LEN: usize = 1024;

impl Authenticator {
    pub fn new(mail: Arc<MailStore>, cfg: AuthConfig) -> Result<Self, PasswordError> {
        let dummy = dummy_hash(&cfg)?;
        Ok(Self { mail, cfg, dummy, hashing: Semaphore::new(MAX_PARALLEL_HASHES) })
    }

    pub fn mail(&self) -> &Arc<MailStore> {
        &self.mail
    }

    /// Checks a user name and password.
    pub async fn verify_password(&self, user: &str, password: &[u8]) -> Result<UserRecord, AuthFailure> {
        let name = UserName::parse(user).ok();
        let record = match &name {
            Some(n) => self.mail.store().user(n).await.map_err(|_| AuthFailure::Temporary)?,
            None => None,
        };
        let stored = record.as_ref().map_or(self.dummy.clone(), |r| r.password_hash.clone());
        let password = Zeroizing::new(password.to_vec());
        let ok = {
            let _permit = self.hashing.acquire().await.map_err(|_| AuthFailure::Temporary)?;
            tokio::task::spawn_blocking(move || verify_password(&stored, &password))
                .await
                .map_err(|_| AuthFailure::Temporary)?
        };
        match record {
            None => Err(AuthFailure::UnknownUser),
            Some(_) if !ok => Err(AuthFailure::BadPassword),
            Some(r) if r.disabled => Err(AuthFailure::Disabled),
            Some(r) => Ok(r),
        }
    }

    fn check_password(password: &[u8]) -> Result<(), AccountError> {
        if password.is_empty()
            || password.len() > MAX_PASSWORD_LEN
            || password.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n'))
        {
            return Err(AccountError::BadPassword);
        }
        Ok(())
    }

    async fn hash(&self, password: &[u8]) -> Result<String, AccountError> {
        let cfg = self.cfg.clone();
        let password = Zeroizing::new(password.to_vec());
        tokio::task::spawn_blocking(move || hash_password(&cfg, &password))
            .await
            .map_err(|_| AccountError::Password(PasswordError::Hash))?
            .map_err(AccountError::from)
    }

    pub async fn add_user(&self, name: &UserName, password: &[u8]) -> Result<(), AccountError> {
        Self::check_password(password)?;
        let hash = self.hash(password).await?;
        match self.mail.create_user(name, &hash).await {
            Err(MailStoreError::Store(StoreError::UserExists)) => Err(AccountError::UserExists),
            other => Ok(other?),
        }
    }

    pub async fn set_password(&self, name: &UserName, password: &[u8]) -> Result<(), AccountError> {
        Self::check_password(password)?;
        let hash = self.hash(password).await?;
        Ok(self.mail.store().set_password(name, &hash).await?)
    }
}
