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
    if let Err(e) = check_hash_parameters(stored) {
        tracing::error!(reason = %e, "stored password hash not verified: cost parameters out of bounds; set a new password");
        return false;
    }
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

// ---------------------------------------------------------------------------
// Bounds on the cost parameters a stored hash carries.
//
// Imported hashes (`user import-passwd`) bring their own cost; without a cap
// one hash with Argon2 m=4 GiB aborts the process at the first login attempt
// and one with SHA512-CRYPT rounds=999999999 ties a hashing slot up for
// minutes. The bounds are checked at import (the line is refused) and before
// every verification (the hash is never run). Budget: one verification costs
// at most about 8 times the default Argon2id (19 MiB, t=2), which is what
// Dovecot's own Argon2id default costs. Measured on a busy 2-core machine:
// default Argon2id 64 ms; Dovecot's (64 MiB, t=3) 460 ms; SHA512-CRYPT
// 5000 rounds 1.2 ms, 100000 rounds 79 ms; bcrypt cost 10 220 ms, cost 12
// 860 ms.
// ---------------------------------------------------------------------------

/// Largest Argon2 memory, KiB: 128 MiB. At most 4 hashes run at once, so
/// hashing never holds more than 512 MiB; Dovecot's default is 64 MiB.
pub const MAX_ARGON2_MEMORY_KIB: u64 = 128 * 1024;
/// Largest Argon2 pass count (Dovecot's default is 3).
pub const MAX_ARGON2_PASSES: u64 = 10;
/// Largest Argon2 lane count; the verifier runs lanes one after another,
/// so lanes only split the memory.
pub const MAX_ARGON2_LANES: u64 = 16;
/// Largest Argon2 work, memory (KiB) times passes: Dovecot's default
/// (64 MiB x 3), 5 times the work of ours (19456 KiB x 2).
pub const MAX_ARGON2_WORK: u64 = 64 * 1024 * 3;
/// Largest SHA512-CRYPT rounds: passlib's default, about 520 ms; glibc's
/// and Dovecot's default is 5000 (rounds=2000000 took 3.3 s per login).
pub const MAX_SHA512_ROUNDS: u64 = 656_000;
/// Largest bcrypt cost (2^cost rounds): 11, about 440 ms; Dovecot's
/// default is 5, common web defaults 10.
pub const MAX_BCRYPT_COST: u64 = 11;

/// Why a stored or imported hash is refused before it is ever run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashParamError {
    #[error("malformed {0} hash")]
    Malformed(&'static str),
    #[error("Argon2 memory m={0} KiB is above the limit of {MAX_ARGON2_MEMORY_KIB} KiB")]
    Argon2Memory(u64),
    #[error("Argon2 passes t={0} is above the limit of {MAX_ARGON2_PASSES}")]
    Argon2Passes(u64),
    #[error("Argon2 lanes p={0} is above the limit of {MAX_ARGON2_LANES}")]
    Argon2Lanes(u64),
    #[error("Argon2 work m*t={0} KiB is above the limit of {MAX_ARGON2_WORK}")]
    Argon2Work(u64),
    #[error("SHA512-CRYPT rounds={0} is above the limit of {MAX_SHA512_ROUNDS}")]
    Sha512Rounds(u64),
    #[error("bcrypt cost {0} is above the limit of {MAX_BCRYPT_COST}")]
    BcryptCost(u64),
}

/// Checks the cost parameters of a hash in any form [`verify_password`]
/// accepts, without running it. Forms it does not accept pass here (they
/// never verify anyway); [`is_supported_hash`] decides about those.
pub fn check_hash_parameters(hash: &str) -> Result<(), HashParamError> {
    let hash = hash.strip_prefix("{ARGON2ID}").unwrap_or(hash);
    if let Some(rest) = hash.strip_prefix("{SHA512-CRYPT}$6$").or_else(|| hash.strip_prefix("$6$")) {
        // "$6$rounds=N$salt$hash"; without "rounds=" glibc uses 5000.
        let Some(spec) = rest.strip_prefix("rounds=") else { return Ok(()) };
        let digits = spec.split('$').next().unwrap_or_default();
        if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HashParamError::Malformed("SHA512-CRYPT"));
        }
        let rounds: u64 = digits.parse().map_err(|_| HashParamError::Malformed("SHA512-CRYPT"))?;
        return if rounds > MAX_SHA512_ROUNDS { Err(HashParamError::Sha512Rounds(rounds)) } else { Ok(()) };
    }
    if let Some(rest) = hash.strip_prefix("{BLF-CRYPT}$2") {
        // "$2y$NN$<53 chars>"
        let mut parts = rest.splitn(3, '$');
        let (_variant, cost) = (parts.next(), parts.next().unwrap_or_default());
        if cost.len() != 2 || !cost.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HashParamError::Malformed("BLF-CRYPT"));
        }
        let cost: u64 = cost.parse().map_err(|_| HashParamError::Malformed("BLF-CRYPT"))?;
        return if cost > MAX_BCRYPT_COST { Err(HashParamError::BcryptCost(cost)) } else { Ok(()) };
    }
    if hash.starts_with("$argon2id$") {
        let parsed = PasswordHash::new(hash).map_err(|_| HashParamError::Malformed("Argon2id"))?;
        let param = |name: &str| -> Result<Option<u64>, HashParamError> {
            match parsed.params.get(name) {
                None => Ok(None),
                Some(v) => v.decimal().map(|d| Some(u64::from(d))).map_err(|_| HashParamError::Malformed("Argon2id")),
            }
        };
        // Absent parameters take the argon2 crate's defaults, all within bounds.
        let m = param("m")?.unwrap_or(u64::from(Params::DEFAULT_M_COST));
        let t = param("t")?.unwrap_or(u64::from(Params::DEFAULT_T_COST));
        let p = param("p")?.unwrap_or(u64::from(Params::DEFAULT_P_COST));
        if m > MAX_ARGON2_MEMORY_KIB {
            return Err(HashParamError::Argon2Memory(m));
        }
        if t > MAX_ARGON2_PASSES {
            return Err(HashParamError::Argon2Passes(t));
        }
        if p > MAX_ARGON2_LANES {
            return Err(HashParamError::Argon2Lanes(p));
        }
        if m * t > MAX_ARGON2_WORK {
            return Err(HashParamError::Argon2Work(m * t));
        }
    }
    Ok(())
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
