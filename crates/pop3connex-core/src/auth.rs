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
    /// The password is older than the policy's maximum age.
    Expired,
    /// The account accepts only SCRAM, OAuth or app passwords.
    ModernAuthRequired,
    /// Storage trouble: the client gets `[SYS/TEMP]`, not `[AUTH]`.
    Temporary,
}

impl AuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::UnknownUser => "unknown user",
            AuthFailure::BadPassword => "bad password",
            AuthFailure::Disabled => "account disabled",
            AuthFailure::Expired => "password expired",
            AuthFailure::ModernAuthRequired => "password mechanism not allowed for account",
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
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyViolation),
    #[error("unsupported password hash scheme (supported: SHA512-CRYPT, BLF-CRYPT, ARGON2ID)")]
    UnsupportedHash,
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
    /// Key for app-password hashes.
    app_secret: [u8; 32],
    /// Key for the verified-credential cache.
    cache_secret: [u8; 32],
    /// Verified-credential cache: keyed hash → expiry (unix seconds).
    cache: std::sync::Mutex<std::collections::HashMap<[u8; 32], i64>>,
    hashing: Semaphore,
}

/// Parallel hash computations; beyond this, logins queue.
const MAX_PARALLEL_HASHES: usize = 4;
const MAX_PASSWORD_LEN: usize = 1024;
/// Bound on the verified-credential cache.
const MAX_CACHED_CREDENTIALS: usize = 100_000;

impl Authenticator {
    pub fn new(mail: Arc<MailStore>, cfg: AuthConfig) -> Result<Self, PasswordError> {
        let dummy = dummy_hash(&cfg)?;
        let scram_secret = mail.derived_secret(b"scram-unknown-user-salt");
        let app_secret = mail.derived_secret(b"app-passwords");
        // A fresh random key per process: cache entries mean nothing elsewhere.
        let mut cache_secret = [0u8; 32];
        getrandom::getrandom(&mut cache_secret).map_err(|_| PasswordError::Hash)?;
        Ok(Self {
            mail,
            cfg,
            dummy,
            scram_secret,
            app_secret,
            cache_secret,
            cache: std::sync::Mutex::new(std::collections::HashMap::new()),
            hashing: Semaphore::new(MAX_PARALLEL_HASHES),
        })
    }

    pub fn mail(&self) -> &Arc<MailStore> {
        &self.mail
    }

    /// Keyed hash under which an app password is stored and looked up.
    fn app_password_key(&self, password: &[u8]) -> Vec<u8> {
        use hmac::Mac;
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.app_secret).expect("HMAC takes any key length");
        mac.update(password);
        mac.finalize().into_bytes().to_vec()
    }

    /// Key of the verified-credential cache: a keyed hash of the name, the
    /// stored hash and the password. The password itself is never kept,
    /// and a password change (new stored hash) invalidates the entry.
    fn cache_key(&self, user: &str, stored: &str, password: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.cache_secret).expect("HMAC takes any key length");
        for part in [user.to_ascii_lowercase().as_bytes(), stored.as_bytes(), password] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    fn cache_hit(&self, key: &[u8; 32]) -> bool {
        if self.cfg.credential_cache_secs == 0 {
            return false;
        }
        let now = crate::types::unix_now();
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(key).is_some_and(|until| *until > now)
    }

    fn cache_insert(&self, key: [u8; 32]) {
        if self.cfg.credential_cache_secs == 0 {
            return;
        }
        let now = crate::types::unix_now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_CREDENTIALS {
            cache.retain(|_, until| *until > now);
            if cache.len() >= MAX_CACHED_CREDENTIALS {
                cache.clear();
            }
        }
        cache.insert(key, now + self.cfg.credential_cache_secs as i64);
    }

    /// Forgets every cached credential (e.g. after an administrator action).
    pub fn clear_credential_cache(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Whether the account password is older than the policy allows.
    pub fn password_expired(&self, user: &UserRecord) -> bool {
        let days = self.cfg.password_policy.max_age_for(user.class.as_deref());
        days > 0 && crate::types::unix_now() - user.password_changed_at > (days * 86_400) as i64
    }

    /// Creates an app password for `name`; returns (id, the password). The
    /// password is shown once and stored only as a keyed hash: it is random
    /// (about 100 bits), so a fast keyed hash is as safe as a slow one and
    /// lets logins find it with one indexed lookup.
    pub async fn add_app_password(
        &self,
        name: &UserName,
        label: &str,
        expires_at: Option<i64>,
    ) -> Result<(i64, Zeroizing<String>), AccountError> {
        const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
        // 20 characters from 31 (~99 bits); rejection sampling avoids bias.
        let mut chars = Vec::with_capacity(20);
        while chars.len() < 20 {
            let mut raw = [0u8; 32];
            getrandom::getrandom(&mut raw).map_err(|_| AccountError::Password(PasswordError::Hash))?;
            let limit = 256 - 256 % ALPHABET.len();
            chars.extend(raw.iter().filter(|b| (**b as usize) < limit).map(|b| ALPHABET[*b as usize % ALPHABET.len()]));
        }
        chars.truncate(20);
        let password = Zeroizing::new(
            chars.chunks(5).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join("-"),
        );
        let id = self
            .mail
            .store()
            .add_app_password(name, label, self.app_password_key(password.as_bytes()), expires_at)
            .await?;
        Ok((id, password))
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
        // App passwords first: one keyed hash and an indexed lookup, done
        // for unknown names too so both take the same path.
        let owner = self
            .mail
            .store()
            .use_app_password(self.app_password_key(password))
            .await
            .map_err(|_| AuthFailure::Temporary)?;
        if let Some(r) = &record {
            if owner.as_ref() == Some(&r.name) {
                return if r.disabled { Err(AuthFailure::Disabled) } else { Ok(r.clone()) };
            }
        }
        let stored = record.as_ref().map_or(self.dummy.clone(), |r| r.password_hash.clone());
        let password = Zeroizing::new(password.to_vec());
        // Verified-credential cache: only successes are cached, so failed
        // attempts always pay the full hash (and time like unknown users).
        let cache_key = self.cache_key(user, &stored, &password);
        let cached = record.is_some() && self.cache_hit(&cache_key);
        let ok = cached || {
            let _permit = self.hashing.acquire().await.map_err(|_| AuthFailure::Temporary)?;
            let pw = password.clone();
            // Names the user in what verification logs (a refused stored hash).
            let span = tracing::error_span!("verify", user = record.as_ref().map_or("", |r| r.name.as_str()));
            tokio::task::spawn_blocking(move || span.in_scope(|| verify_password(&stored, &pw)))
                .await
                .map_err(|_| AuthFailure::Temporary)?
        };
        if ok && !cached && record.is_some() {
            self.cache_insert(cache_key);
        }
        match record {
            None => Err(AuthFailure::UnknownUser),
            Some(_) if !ok => Err(AuthFailure::BadPassword),
            Some(r) if r.disabled => Err(AuthFailure::Disabled),
            Some(r) if r.require_modern_auth => Err(AuthFailure::ModernAuthRequired),
            Some(r) if self.password_expired(&r) => Err(AuthFailure::Expired),
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

    /// Applies the password policy, including reuse of the current and
    /// recent passwords.
    async fn check_policy(
        &self,
        name: &UserName,
        password: &[u8],
        current: Option<String>,
    ) -> Result<(), AccountError> {
        let policy = &self.cfg.password_policy;
        let text = std::str::from_utf8(password).map_err(|_| AccountError::BadPassword)?;
        policy.check(text, name.as_str())?;
        if policy.history == 0 {
            return Ok(());
        }
        let mut previous: Vec<String> = current.into_iter().collect();
        previous.extend(self.mail.store().password_history(name).await?.into_iter().take(policy.history - 1));
        let password = Zeroizing::new(password.to_vec());
        let reused = tokio::task::spawn_blocking(move || previous.iter().any(|h| verify_password(h, &password)))
            .await
            .map_err(|_| AccountError::Password(PasswordError::Hash))?;
        if reused {
            return Err(crate::policy::PolicyViolation::Reused.into());
        }
        Ok(())
    }

    pub async fn add_user(&self, name: &UserName, password: &[u8]) -> Result<(), AccountError> {
        Self::check_password(password)?;
        self.check_policy(name, password, None).await?;
        let credentials = self.credentials_for(password).await?;
        match self.mail.create_user(name, &credentials).await {
            Err(MailStoreError::Store(StoreError::UserExists)) => Err(AccountError::UserExists),
            other => Ok(other?),
        }
    }

    /// Creates a user from a hash exported by another server (Dovecot
    /// passwd-file). No SCRAM keys exist until the first password login,
    /// which also re-hashes with the configured scheme.
    pub async fn import_user(&self, name: &UserName, hash: &str) -> Result<(), AccountError> {
        if !crate::password::is_supported_hash(hash) {
            return Err(AccountError::UnsupportedHash);
        }
        let credentials = StoredCredentials { hash: hash.to_owned(), scram: None };
        match self.mail.create_user(name, &credentials).await {
            Err(MailStoreError::Store(StoreError::UserExists)) => Err(AccountError::UserExists),
            other => Ok(other?),
        }
    }

    pub async fn set_password(&self, name: &UserName, password: &[u8]) -> Result<(), AccountError> {
        Self::check_password(password)?;
        let current = self.mail.store().user(name).await?.ok_or(AccountError::NoSuchUser)?;
        self.check_policy(name, password, Some(current.password_hash)).await?;
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
