//! Password hashing and verification.
//!
//! New hashes are Argon2id (PHC string) by default, or `{SHA512-CRYPT}` when
//! an operator needs Dovecot-compatible cost. Verification also accepts
//! Dovecot's `{SHA512-CRYPT}`, `{BLF-CRYPT}` and `{ARGON2ID}`, so hashes
//! imported from Dovecot keep working; they are replaced by the configured
//! scheme at the user's next successful login. Hashing is CPU- and
//! memory-heavy: callers run it on the blocking pool.

use argon2::{Algorithm, Argon2, Params, Version};
use password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use zeroize::Zeroizing;

use crate::config::{AuthConfig, PasswordScheme};

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password hashing failed")]
    Hash,
    #[error("invalid Argon2 parameters")]
    Params,
}

/// Hashes `password` with the configured scheme.
pub fn hash_password(cfg: &AuthConfig, password: &[u8]) -> Result<String, PasswordError> {
    match cfg.password_scheme {
        PasswordScheme::Argon2id => {
            let argon = argon2_for(cfg)?;
            let salt = SaltString::generate(&mut password_hash::rand_core::OsRng);
            argon.hash_password(password, &salt).map(|h| h.to_string()).map_err(|_| PasswordError::Hash)
        }
        PasswordScheme::Sha512Crypt => {
            // 5000 rounds: the glibc and Dovecot default, so costs match a
            // Dovecot deployment exactly.
            let params = sha_crypt::Sha512Params::new(5000).map_err(|_| PasswordError::Params)?;
            let pw = std::str::from_utf8(password).map_err(|_| PasswordError::Hash)?;
            sha_crypt::sha512_simple(pw, &params)
                .map(|h| format!("{{SHA512-CRYPT}}{h}"))
                .map_err(|_| PasswordError::Hash)
        }
    }
}

fn argon2_for(cfg: &AuthConfig) -> Result<Argon2<'static>, PasswordError> {
    let params =
        Params::new(cfg.argon2_memory_kib as u32, cfg.argon2_iterations as u32, cfg.argon2_parallelism as u32, None)
            .map_err(|_| PasswordError::Params)?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Whether `hash` is in a form [`verify_password`] understands (used to
/// validate imported hashes).
pub fn is_supported_hash(hash: &str) -> bool {
    ["{SHA512-CRYPT}$6$", "$6$", "{BLF-CRYPT}$2", "{ARGON2ID}$argon2id$", "$argon2id$"]
        .iter()
        .any(|p| hash.starts_with(p))
}

/// Checks `password` against a stored hash of any supported scheme.
/// Unknown or malformed hashes never verify.
pub fn verify_password(stored: &str, password: &[u8]) -> bool {
    let stored = stored.strip_prefix("{ARGON2ID}").unwrap_or(stored);
    if let Some(crypt) = stored.strip_prefix("{SHA512-CRYPT}").or_else(|| stored.strip_prefix("$6$").map(|_| stored)) {
        let Ok(pw) = std::str::from_utf8(password) else { return false };
        return sha_crypt::sha512_check(pw, crypt).is_ok();
    }
    if let Some(bcrypt_hash) = stored.strip_prefix("{BLF-CRYPT}") {
        let Ok(pw) = std::str::from_utf8(password) else { return false };
        return bcrypt::verify(pw, bcrypt_hash).unwrap_or(false);
    }
    if stored.starts_with("$argon2id$") {
        let Ok(parsed) = PasswordHash::new(stored) else { return false };
        return Argon2::default().verify_password(password, &parsed).is_ok();
    }
    false
}

/// A hash of a random password in the configured scheme, verified against
/// when the user does not exist, so unknown users cost the same time.
pub fn dummy_hash(cfg: &AuthConfig) -> Result<String, PasswordError> {
    let mut pw = Zeroizing::new([0u8; 24]);
    getrandom::getrandom(&mut *pw).map_err(|_| PasswordError::Hash)?;
    let pw: Zeroizing<Vec<u8>> = Zeroizing::new(pw.iter().map(|b| b'a' + b % 26).collect());
    hash_password(cfg, &pw)
}

/// Rounds of Dovecot's (and glibc's) default SHA512-CRYPT, the cost of the
/// compatibility dummy.
pub const COMPAT_SHA512_ROUNDS: usize = 5000;

/// A `{SHA512-CRYPT}` hash of a random password with
/// [`COMPAT_SHA512_ROUNDS`]: the stand-in for an imported hash in password
/// checks that have none (see `auth::verification_plan`).
pub fn dummy_compat_hash() -> Result<String, PasswordError> {
    let mut pw = Zeroizing::new([0u8; 24]);
    getrandom::getrandom(&mut *pw).map_err(|_| PasswordError::Hash)?;
    let pw: Zeroizing<String> = Zeroizing::new(pw.iter().map(|b| char::from(b'a' + b % 26)).collect());
    let params = sha_crypt::Sha512Params::new(COMPAT_SHA512_ROUNDS).map_err(|_| PasswordError::Params)?;
    sha_crypt::sha512_simple(&pw, &params).map(|h| format!("{{SHA512-CRYPT}}{h}")).map_err(|_| PasswordError::Hash)
}

/// The scheme and work factor of a stored hash (`argon2id m=19456 t=2
/// p=1`, `sha512-crypt rounds=5000`, `bcrypt cost=5`): what verifying it
/// costs. `None` for hashes [`verify_password`] does not understand.
pub fn hash_cost(stored: &str) -> Option<String> {
    let stored = stored.strip_prefix("{ARGON2ID}").unwrap_or(stored);
    if let Some(crypt) = stored.strip_prefix("{SHA512-CRYPT}").or_else(|| stored.starts_with("$6$").then_some(stored)) {
        let rest = crypt.strip_prefix("$6$")?;
        let rounds = rest
            .strip_prefix("rounds=")
            .and_then(|r| r.split('$').next())
            .map_or(Some(COMPAT_SHA512_ROUNDS), |r| r.parse().ok())?;
        return Some(format!("sha512-crypt rounds={rounds}"));
    }
    if let Some(bcrypt_hash) = stored.strip_prefix("{BLF-CRYPT}") {
        let cost = bcrypt_hash.split('$').nth(2)?;
        return Some(format!("bcrypt cost={}", cost.parse::<u32>().ok()?));
    }
    if stored.starts_with("$argon2id$") {
        let parsed = PasswordHash::new(stored).ok()?;
        let p = Params::try_from(&parsed).ok()?;
        return Some(format!("argon2id m={} t={} p={}", p.m_cost(), p.t_cost(), p.p_cost()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap(scheme: PasswordScheme) -> AuthConfig {
        AuthConfig { password_scheme: scheme, argon2_memory_kib: 8192, argon2_iterations: 1, ..AuthConfig::default() }
    }

    #[test]
    fn both_schemes_round_trip() {
        for scheme in [PasswordScheme::Argon2id, PasswordScheme::Sha512Crypt] {
            let h = hash_password(&cheap(scheme), b"correct horse battery").unwrap();
            assert!(verify_password(&h, b"correct horse battery"), "{h}");
            assert!(!verify_password(&h, b"correct horse batterx"));
            assert!(!h.contains("correct"));
        }
        assert!(!verify_password("plain", b"plain"));
        assert!(!verify_password("", b""));
    }

    #[test]
    fn accepts_hashes_made_by_doveadm() {
        // Both generated with `doveadm pw -s SCHEME -p test` (Dovecot 2.3).
        let sha = "{SHA512-CRYPT}$6$DAEBdnbM6x1qs1Zp$61UH.TYqGe1o4wPuELC1PJHFGN.eczraTrksAeTWd3Gpnaim7hyGbXA9b1rP4wGtu.AQHqM8B1R0wQa3Hyamc1";
        let argon = "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$NlT2VO6jUfKoLbL89cUmiA$tc6AOu37+6LQifp8HGtMMgeKfbyETSqJA6Jo0s649PU";
        let blf = "{BLF-CRYPT}$2y$05$9EEIy.4MYOsRqqq3U3lQ8uLOysSjbXYfEbyLOa3Gk8.I5O2n64.cu";
        for h in [sha, argon, blf] {
            assert!(verify_password(h, b"test"), "{h}");
            assert!(!verify_password(h, b"Test"), "{h}");
        }
        assert_eq!(hash_cost(sha).unwrap(), "sha512-crypt rounds=5000");
        assert_eq!(hash_cost(argon).unwrap(), "argon2id m=65536 t=3 p=1");
        assert_eq!(hash_cost(blf).unwrap(), "bcrypt cost=5");
        assert_eq!(hash_cost("$6$rounds=10000$salt$x").unwrap(), "sha512-crypt rounds=10000");
        assert_eq!(hash_cost("plain"), None);
        let compat = dummy_compat_hash().unwrap();
        assert_eq!(hash_cost(&compat).unwrap(), "sha512-crypt rounds=5000");
    }
}
