//! Accounts and credential checks.
//!
//! Password hashing runs on the blocking pool behind a semaphore: Argon2id
//! takes ~19 MiB and a few milliseconds per attempt, so an unbounded number
//! of parallel attempts would let a login flood exhaust memory and starve
//! sessions that are already logged in.

use std::sync::Arc;

use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::config::{AuthConfig, PasswordScheme};
use crate::mailstore::{MailStore, MailStoreError};
use crate::password::{dummy_hash, hash_password, verify_password, PasswordError};
use crate::scram::ScramCredentials;
use crate::store::{StoreError, StoredCredentials, UserRecord};
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
    #[error("password must be 1 to 1024 bytes of UTF-8 without NUL, CR or LF")]
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
    /// Server secret for SCRAM's fake salts of unknown users.
    scram_secret: [u8; 32],
    hashing: Semaphore,
}

/// Parallel hash computations; beyond this, logins queue.
const MAX_PARALLEL_HASHES: usize = 4;
const MAX_PASSWORD_LEN: usize = 1024;

impl Authenticator {
    pub fn new(mail: Arc<MailStore>, cfg: AuthConfig) -> Result<Self, PasswordError> {
        let dummy = dummy_hash(&cfg)?;
        let scram_secret = mail.derived_secret(b"scram-unknown-user-salt");
        Ok(Self { mail, cfg, dummy, scram_secret, hashing: Semaphore::new(MAX_PARALLEL_HASHES) })
    }

    pub fn mail(&self) -> &Arc<MailStore> {
        &self.mail
    }

    /// Checks a user name and password. A successful login with a hash of
    /// another scheme than the configured one (e.g. imported from Dovecot),
    /// or without SCRAM keys, upgrades the stored credentials.
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
            let pw = password.clone();
            tokio::task::spawn_blocking(move || verify_password(&stored, &pw))
                .await
                .map_err(|_| AuthFailure::Temporary)?
        };
        match record {
            None => Err(AuthFailure::UnknownUser),
            Some(_) if !ok => Err(AuthFailure::BadPassword),
            Some(r) if r.disabled => Err(AuthFailure::Disabled),
            Some(r) => {
                if r.scram.is_none() || !is_scheme(&r.password_hash, self.cfg.password_scheme) {
                    match self.credentials_for(&password).await {
                        Ok(c) => match self.mail.store().set_password(&r.name, &c).await {
                            Ok(()) => tracing::info!(user = %r.name, "stored credentials upgraded"),
                            Err(e) => tracing::warn!(user = %r.name, error = %e, "credential upgrade failed"),
                        },
                        Err(e) => tracing::warn!(user = %r.name, error = %e, "credential upgrade failed"),
                    }
                }
                Ok(r)
            }
        }
    }

    /// SCRAM credentials for `user`: the real ones with the record when the
    /// user exists and has them, otherwise deterministic fakes (same salt on
    /// every attempt) so the exchange looks the same either way.
    pub async fn scram_lookup(&self, user: &str) -> Result<(Option<UserRecord>, ScramCredentials), AuthFailure> {
        let record = match UserName::parse(user) {
            Ok(n) => self.mail.store().user(&n).await.map_err(|_| AuthFailure::Temporary)?,
            Err(_) => None,
        };
        let iterations = self.cfg.scram_iterations as u32;
        if let Some(r) = record {
            if let Some(creds) = r.scram.as_deref().and_then(ScramCredentials::decode) {
                return Ok((Some(r), creds));
            }
            // Known user without SCRAM keys yet: fail like an unknown one.
            return Ok((Some(r), ScramCredentials::fake(&self.scram_secret, user, iterations)));
        }
        Ok((None, ScramCredentials::fake(&self.scram_secret, &user.to_ascii_lowercase(), iterations)))
    }

    fn check_password(password: &[u8]) -> Result<(), AccountError> {
        if password.is_empty()
            || password.len() > MAX_PASSWORD_LEN
            || password.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n'))
            || std::str::from_utf8(password).is_err()
        {
            return Err(AccountError::BadPassword);
        }
        Ok(())
    }

    /// Hash and SCRAM keys for a new password (on the blocking pool).
    async fn credentials_for(&self, password: &[u8]) -> Result<StoredCredentials, AccountError> {
        let cfg = self.cfg.clone();
        let password = Zeroizing::new(password.to_vec());
        tokio::task::spawn_blocking(move || {
            let hash = hash_password(&cfg, &password)?;
            let scram = ScramCredentials::derive(&password, cfg.scram_iterations as u32).map(|c| c.encode());
            Ok::<_, PasswordError>(StoredCredentials { hash, scram })
        })
        .await
        .map_err(|_| AccountError::Password(PasswordError::Hash))?
        .map_err(AccountError::from)
    }

    pub async fn add_user(&self, name: &UserName, password: &[u8]) -> Result<(), AccountError> {
        Self::check_password(password)?;
        let credentials = self.credentials_for(password).await?;
        match self.mail.create_user(name, &credentials).await {
            Err(MailStoreError::Store(StoreError::UserExists)) => Err(AccountError::UserExists),
            other => Ok(other?),
        }
    }

    pub async fn set_password(&self, name: &UserName, password: &[u8]) -> Result<(), AccountError> {
        Self::check_password(password)?;
        let credentials = self.credentials_for(password).await?;
        Ok(self.mail.store().set_password(name, &credentials).await?)
    }
}

/// Whether a stored hash is of the configured scheme.
fn is_scheme(hash: &str, scheme: PasswordScheme) -> bool {
    match scheme {
        PasswordScheme::Argon2id => hash.starts_with("$argon2id$"),
        PasswordScheme::Sha512Crypt => hash.starts_with("{SHA512-CRYPT}"),
    }
}
