//! Accounts and credential checks.
//!
//! Password hashing runs on the blocking pool behind a semaphore: Argon2id
//! takes ~19 MiB and a few milliseconds per attempt, so an unbounded number
//! of parallel attempts would let a login flood exhaust memory and starve
//! sessions that are already logged in.
//!
//! What a client can learn from a login attempt is limited to "it worked" or
//! "it failed": an account that refuses logins (locked, disabled, password
//! expired, see [`Authenticator::login_refusal`]) fails every mechanism
//! with the reply and the work of a wrong secret, and every password check
//! runs the same hash verifications whether the name is unknown, has a
//! hash of the configured scheme, or an imported one ([`verification_plan`]).

use std::sync::Arc;

use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::config::{AuthConfig, PasswordScheme};
use crate::mailstore::{MailStore, MailStoreError};
use crate::password::{dummy_hash, hash_password, verify_password, PasswordError};
use crate::scram::{fake_salt_name, ScramCredentials};
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
    /// The name is locked out (too many failures).
    Locked,
    /// The client abandoned an exchange after the mechanism had answered
    /// its proof (e.g. after SCRAM's server-final).
    Abandoned,
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
            AuthFailure::Locked => "account locked",
            AuthFailure::Abandoned => "exchange abandoned after the proof was answered",
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
    /// The compatibility-scheme dummy (see [`verification_plan`]).
    dummy_compat: String,
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
        let dummy_compat = crate::password::dummy_compat_hash()?;
        let scram_secret = mail.derived_secret(b"scram-unknown-user-salt");
        let app_secret = mail.derived_secret(b"app-passwords");
        // A fresh random key per process: cache entries mean nothing elsewhere.
        let mut cache_secret = [0u8; 32];
        getrandom::getrandom(&mut cache_secret).map_err(|_| PasswordError::Hash)?;
        Ok(Self {
            mail,
            cfg,
            dummy,
            dummy_compat,
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

    /// The one account-policy check of every login path (USER/PASS, PLAIN,
    /// SCRAM, OAUTHBEARER, XOAUTH2): why a login must be refused whatever
    /// secret is presented. `locked` is the session's lockout verdict for
    /// the claimed name and the peer's address (a per-address matter the
    /// session tracks); `user` is the account, if it exists. Mechanisms ask
    /// this before they verify anything and then answer exactly as for a
    /// wrong secret. (`require_modern_auth` is not here: it refuses only a
    /// *correct* password, so [`Self::verify_password`] applies it after
    /// verification.)
    pub fn login_refusal(&self, locked: bool, user: Option<&UserRecord>) -> Option<AuthFailure> {
        if locked {
            return Some(AuthFailure::Locked);
        }
        user.and_then(|u| self.account_refusal(u))
    }

    /// Why an existing account refuses every login: disabled, or its
    /// password expired.
    fn account_refusal(&self, user: &UserRecord) -> Option<AuthFailure> {
        if user.disabled {
            Some(AuthFailure::Disabled)
        } else if self.password_expired(user) {
            Some(AuthFailure::Expired)
        } else {
            None
        }
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
    /// or without SCRAM keys, upgrades the stored credentials; SCRAM keys
    /// with fewer iterations than configured are re-derived.
    ///
    /// Constant work where it matters: the same hash verifications for
    /// unknown names, imported hashes and refused accounts (an app password
    /// of a disabled or expired account costs what a wrong password costs),
    /// and the verified-credential cache serves only accounts that accept
    /// logins.
    pub async fn verify_password(&self, user: &str, password: &[u8]) -> Result<UserRecord, AuthFailure> {
        let name = UserName::parse(user).ok();
        let record = match &name {
            Some(n) => self.mail.store().user(n).await.map_err(|_| AuthFailure::Temporary)?,
            None => None,
        };
        // App passwords first: one keyed hash and an indexed lookup, done
        // for unknown names too so both take the same path. It is marked
        // used only when the login succeeds: a refused account's valid app
        // password costs no write a wrong password does not.
        let found = self
            .mail
            .store()
            .find_app_password(self.app_password_key(password))
            .await
            .map_err(|_| AuthFailure::Temporary)?;
        // The caller checked the lockout (before hashing anything).
        let refusal = self.login_refusal(false, record.as_ref());
        let app_password = match (&record, &found) {
            (Some(r), Some((id, owner))) if *owner == r.name => Some(*id),
            _ => None,
        };
        if let (Some(r), Some(id), None) = (&record, app_password, refusal) {
            self.mail.store().mark_app_password_used(id).await.map_err(|_| AuthFailure::Temporary)?;
            return Ok(r.clone());
        }
        let app_password = app_password.is_some();
        let stored = record.as_ref().map(|r| r.password_hash.as_str());
        let plan = verification_plan(stored, self.cfg.password_scheme, &self.dummy, &self.dummy_compat);
        let password = Zeroizing::new(password.to_vec());
        // Verified-credential cache: only successes of accounts that accept
        // logins are cached and served, so failed attempts and refused
        // accounts always pay the full hash (and time like unknown users).
        let cache_key = self.cache_key(user, stored.unwrap_or(&self.dummy), &password);
        let cached = record.is_some() && refusal.is_none() && self.cache_hit(&cache_key);
        let ok = cached || {
            let _permit = self.hashing.acquire().await.map_err(|_| AuthFailure::Temporary)?;
            let pw = password.clone();
            // Names the user in what verification logs (a refused stored hash).
            let span = tracing::error_span!("verify", user = record.as_ref().map_or("", |r| r.name.as_str()));
            tokio::task::spawn_blocking(move || span.in_scope(|| plan.run(&pw)))
                .await
                .map_err(|_| AuthFailure::Temporary)?
        };
        let r = match (record, refusal) {
            (None, _) => return Err(AuthFailure::UnknownUser),
            (Some(_), Some(reason)) if ok || app_password => return Err(reason),
            (Some(_), _) if !ok => return Err(AuthFailure::BadPassword),
            (Some(r), _) if r.require_modern_auth => return Err(AuthFailure::ModernAuthRequired),
            (Some(r), _) => r,
        };
        if !cached {
            self.cache_insert(cache_key);
        }
        self.upgrade_credentials(&r, &password).await;
        Ok(r)
    }

    /// After a successful password login: re-hash an imported or
    /// other-scheme hash and derive missing SCRAM keys (a password change
    /// in the store), or re-derive SCRAM keys with too few iterations
    /// (only the SCRAM column changes; the password's age does not).
    async fn upgrade_credentials(&self, r: &UserRecord, password: &[u8]) {
        if r.scram.is_none() || !is_scheme(&r.password_hash, self.cfg.password_scheme) {
            match self.credentials_for(&r.name, password).await {
                Ok(c) => match self.mail.store().set_password(&r.name, &c).await {
                    Ok(()) => tracing::info!(user = %r.name, "stored credentials upgraded"),
                    Err(e) => tracing::warn!(user = %r.name, error = %e, "credential upgrade failed"),
                },
                Err(e) => tracing::warn!(user = %r.name, error = %e, "credential upgrade failed"),
            }
            return;
        }
        let Some(old) = r.scram.as_deref() else { return };
        let wanted = self.scram_iterations();
        if self.mail.open_scram(&r.name, old).is_ok_and(|c| c.iterations >= wanted) {
            return;
        }
        let pw = Zeroizing::new(password.to_vec());
        let derived = tokio::task::spawn_blocking(move || ScramCredentials::derive(&pw, wanted)).await.ok().flatten();
        if let Some(c) = derived {
            match self.mail.store().replace_scram(&r.name, old, &self.mail.seal_scram(&r.name, &c)).await {
                Ok(()) => tracing::info!(user = %r.name, iterations = wanted, "SCRAM keys re-derived"),
                Err(e) => tracing::warn!(user = %r.name, error = %e, "SCRAM key upgrade failed"),
            }
        }
    }

    fn scram_iterations(&self) -> u32 {
        u32::try_from(self.cfg.scram_iterations).unwrap_or(u32::MAX)
    }

    /// SCRAM credentials for `user`: the real ones with the record when the
    /// user exists and has them, otherwise deterministic fakes (same salt on
    /// every attempt, derived from the normalised name exactly as for an
    /// unknown name) so the exchange looks the same either way. Keys that
    /// do not open (copied from another user, edited) are reported and
    /// replaced by fakes: the login fails.
    pub async fn scram_lookup(&self, user: &str) -> Result<(Option<UserRecord>, ScramCredentials), AuthFailure> {
        let record = match UserName::parse(user) {
            Ok(n) => self.mail.store().user(&n).await.map_err(|_| AuthFailure::Temporary)?,
            Err(_) => None,
        };
        let fake = || ScramCredentials::fake(&self.scram_secret, &fake_salt_name(user), self.scram_iterations());
        let Some(r) = record else { return Ok((None, fake())) };
        let Some(stored) = r.scram.as_deref() else {
            // Known user without SCRAM keys yet (imported): fail like an
            // unknown one.
            return Ok((Some(r), fake()));
        };
        match self.mail.open_scram(&r.name, stored) {
            Ok(creds) => Ok((Some(r), creds)),
            Err(e) => {
                crate::events::emit(crate::events::SecurityEvent::IntegrityFailure {
                    user: r.name.as_str(),
                    message: "SCRAM keys",
                });
                tracing::error!(user = %r.name, error = %e, "stored SCRAM keys do not open");
                Ok((Some(r), fake()))
            }
        }
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

    /// Hash and sealed SCRAM keys for a new password of `name` (hashing on
    /// the blocking pool).
    async fn credentials_for(&self, name: &UserName, password: &[u8]) -> Result<StoredCredentials, AccountError> {
        let cfg = self.cfg.clone();
        let iterations = self.scram_iterations();
        let password = Zeroizing::new(password.to_vec());
        let (hash, scram) = tokio::task::spawn_blocking(move || {
            let hash = hash_password(&cfg, &password)?;
            Ok::<_, PasswordError>((hash, ScramCredentials::derive(&password, iterations)))
        })
        .await
        .map_err(|_| AccountError::Password(PasswordError::Hash))??;
        Ok(StoredCredentials { hash, scram: scram.map(|c| self.mail.seal_scram(name, &c)) })
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
        let credentials = self.credentials_for(name, password).await?;
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
        let credentials = self.credentials_for(name, password).await?;
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

/// The two hash verifications of one password check, always both run: one
/// in the configured scheme (the account's hash if it is of that scheme,
/// else the dummy) and one in the compatibility scheme, `{SHA512-CRYPT}`
/// with Dovecot's default 5000 rounds (the account's hash if it is of
/// another scheme, typically imported from Dovecot, else a dummy of that
/// cost). An unknown name, a current account and an imported SHA512-CRYPT
/// account so run the same two verifications of the same cost, and a
/// failed PASS cannot tell them apart. Imported hashes of other costs
/// (BLF-CRYPT, other rounds or Argon2 parameters) are replaced at the
/// account's next login.
pub(crate) struct VerificationPlan {
    hashes: [String; 2],
    /// Which of `hashes` is the account's.
    real: Option<usize>,
}

pub(crate) fn verification_plan(
    stored: Option<&str>,
    scheme: PasswordScheme,
    dummy: &str,
    dummy_compat: &str,
) -> VerificationPlan {
    match stored {
        None => VerificationPlan { hashes: [dummy.to_owned(), dummy_compat.to_owned()], real: None },
        Some(h) if is_scheme(h, scheme) => {
            VerificationPlan { hashes: [h.to_owned(), dummy_compat.to_owned()], real: Some(0) }
        }
        Some(h) => VerificationPlan { hashes: [dummy.to_owned(), h.to_owned()], real: Some(1) },
    }
}

impl VerificationPlan {
    /// Runs both verifications; whether the account's hash matched.
    fn run(&self, password: &[u8]) -> bool {
        let results = [verify_password(&self.hashes[0], password), verify_password(&self.hashes[1], password)];
        std::hint::black_box(results);
        self.real.is_some_and(|i| results[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::password::{dummy_compat_hash, hash_cost};

    #[test]
    fn unknown_imported_and_current_accounts_run_the_same_verifications() {
        for scheme in [PasswordScheme::Argon2id, PasswordScheme::Sha512Crypt] {
            let cfg = AuthConfig {
                password_scheme: scheme,
                argon2_memory_kib: 8192,
                argon2_iterations: 1,
                ..AuthConfig::default()
            };
            let dummy = dummy_hash(&cfg).unwrap();
            let compat = dummy_compat_hash().unwrap();
            let current = hash_password(&cfg, b"a password").unwrap();
            // `doveadm pw -s SHA512-CRYPT` (Dovecot's default 5000 rounds).
            let imported = "{SHA512-CRYPT}$6$DAEBdnbM6x1qs1Zp$61UH.TYqGe1o4wPuELC1PJHFGN.eczraTrksAeTWd3Gpnaim7hyGbXA9b1rP4wGtu.AQHqM8B1R0wQa3Hyamc1";
            let costs = |stored: Option<&str>| {
                let p = verification_plan(stored, scheme, &dummy, &compat);
                (p.hashes.iter().map(|h| hash_cost(h).unwrap()).collect::<Vec<_>>(), p)
            };
            let (unknown, p) = costs(None);
            assert_eq!(p.real, None);
            assert_eq!(unknown[1], "sha512-crypt rounds=5000");
            let (known, p) = costs(Some(&current));
            assert_eq!(known, unknown, "{scheme:?}: a current account costs what an unknown name costs");
            assert_eq!(p.hashes[p.real.unwrap()], current);
            let (old, p) = costs(Some(imported));
            assert_eq!(old, unknown, "{scheme:?}: an imported SHA512-CRYPT account costs what an unknown name costs");
            assert_eq!(p.hashes[p.real.unwrap()], imported);
            assert!(p.run(b"test") && !p.run(b"Test"));
        }
    }
}
