//! Second factors of administrators: TOTP (RFC 6238: SHA-1, 6 digits,
//! 30 s, what authenticator apps support), WebAuthn passkeys, and one-time
//! recovery codes.
//!
//! - Factor secrets (TOTP keys, WebAuthn credentials) are sealed with
//!   XChaCha20-Poly1305 under a key derived from the master key
//!   (`admin-totp`), bound to the administrator and the kind of factor.
//! - A TOTP code is accepted one step either side of `now`, and a step once
//!   accepted is never accepted again (the store advances the factor's last
//!   step atomically).
//! - A WebAuthn ceremony's state is opaque to the caller (the web layer
//!   keeps it server-side in the session); an authentication state is
//!   single-use: its issue time must be later than that of the last one
//!   accepted for the credential, and a signature counter that does not
//!   grow is refused.
//! - Recovery codes: ten codes of 50 random bits, shown once, stored as
//!   SHA-256 (random codes need no slow hash), compared in constant time.
//!
//! Enrolling or removing a factor, using a recovery code and a reset emit
//! alerts (`alert = true`) besides the audit record.

use std::net::IpAddr;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use webauthn_rs::prelude::{
    Passkey, PasskeyAuthentication, PasskeyRegistration, PublicKeyCredential, RegisterPublicKeyCredential, Url, Uuid,
};
use webauthn_rs::{Webauthn, WebauthnBuilder};
use zeroize::Zeroizing;

use super::admins::{AdminAuthError, FactorKind};
use super::{Actor, Admin, AdminError};
use crate::store::AdminFactorRecord;
use crate::types::unix_now;

/// TOTP parameters every authenticator app supports.
const TOTP_DIGITS: usize = 6;
const TOTP_STEP: u64 = 30;
/// Steps accepted either side of now (clock drift, typing time).
const TOTP_SKEW_STEPS: i64 = 1;
/// 160-bit TOTP keys (RFC 4226 recommends 160 bits).
const TOTP_SECRET_BYTES: usize = 20;
/// How long an unconfirmed TOTP enrolment may be finished.
const ENROLMENT_SECS: i64 = 600;
/// How long a WebAuthn ceremony's state is accepted (the browser's own
/// timeout is 5 minutes).
const CEREMONY_SECS: i64 = 300;
/// Recovery codes per administrator.
const RECOVERY_CODES: usize = 10;
/// Characters of a recovery code: 10 base-32 characters = 50 bits.
const RECOVERY_CODE_CHARS: usize = 10;
/// Lower-case base 32 without 0/1/l/o (no confusion when typed).
const CODE_ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";
/// Longest label of a factor (shown in lists).
const MAX_LABEL: usize = 64;
/// Largest WebAuthn response or state accepted (real ones are a few KiB).
const MAX_CEREMONY_JSON: usize = 64 * 1024;
/// Issuer shown by authenticator apps.
const ISSUER: &str = "POP3conneX";
/// Key derivation label of the factor sealing key.
const SEAL_PURPOSE: &[u8] = b"admin-totp";

/// A TOTP enrolment in progress: show the secret (and the otpauth URI, as
/// text or QR code) once, then confirm with [`Admin::totp_finish`].
#[derive(Clone)]
pub struct TotpEnrolment {
    pub pending_id: String,
    pub secret_base32: Zeroizing<String>,
    pub otpauth_uri: Zeroizing<String>,
}

impl std::fmt::Debug for TotpEnrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TotpEnrolment").field("pending_id", &self.pending_id).finish_non_exhaustive()
    }
}

fn random_bytes<const N: usize>() -> Zeroizing<[u8; N]> {
    let mut b = Zeroizing::new([0u8; N]);
    // The OS RNG failing means no cryptography is possible at all.
    getrandom::getrandom(&mut *b).expect("operating system random number generator failed");
    b
}

/// The sealer of factor secrets.
struct FactorSealer(XChaCha20Poly1305);

impl FactorSealer {
    fn aad(admin_id: i64, kind: FactorKind) -> Vec<u8> {
        format!("pop3connex/admin-factor/v1\0{admin_id}\0{}", kind.as_str()).into_bytes()
    }

    fn seal(&self, admin_id: i64, kind: FactorKind, plain: &[u8]) -> Vec<u8> {
        let nonce = random_bytes::<24>();
        let aad = Self::aad(admin_id, kind);
        // Encryption only fails beyond 256 GiB of input.
        let ct = self
            .0
            .encrypt(XNonce::from_slice(&*nonce), Payload { msg: plain, aad: &aad })
            .expect("XChaCha20-Poly1305 encryption of a small secret cannot fail");
        [&nonce[..], &ct].concat()
    }

    fn open(&self, admin_id: i64, kind: FactorKind, sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < 24 + 16 {
            return None;
        }
        let (nonce, ct) = sealed.split_at(24);
        let aad = Self::aad(admin_id, kind);
        self.0.decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &aad }).ok().map(Zeroizing::new)
    }
}

/// The TOTP code of `secret` at time step `step`.
fn totp_code(secret: &[u8], step: u64) -> Option<Zeroizing<String>> {
    let totp = totp_rs::TOTP::new_unchecked(totp_rs::Algorithm::SHA1, TOTP_DIGITS, 0, TOTP_STEP, secret.to_vec());
    Some(Zeroizing::new(totp.generate(step.checked_mul(TOTP_STEP)?)))
}

/// The time step within ±1 of `now` whose code is `code`, compared in
/// constant time (every candidate is computed and compared).
fn totp_match(secret: &[u8], code: &str, now: u64) -> Option<i64> {
    if code.len() != TOTP_DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let current = (now / TOTP_STEP) as i64;
    let mut found = None;
    for step in current - TOTP_SKEW_STEPS..=current + TOTP_SKEW_STEPS {
        let Ok(s) = u64::try_from(step) else { continue };
        let Some(expected) = totp_code(secret, s) else { continue };
        if bool::from(expected.as_bytes().ct_eq(code.as_bytes())) && found.is_none() {
            found = Some(step);
        }
    }
    found
}

fn base32(bytes: &[u8]) -> Zeroizing<String> {
    const RFC4648: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = Zeroizing::new(String::with_capacity(bytes.len() * 8 / 5 + 1));
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            out.push(RFC4648[((buf >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(RFC4648[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// A recovery code as shown: `xxxxx-xxxxx`.
fn new_recovery_code() -> Zeroizing<String> {
    let raw = random_bytes::<RECOVERY_CODE_CHARS>();
    let mut s = Zeroizing::new(String::with_capacity(RECOVERY_CODE_CHARS + 1));
    for (i, b) in raw.iter().enumerate() {
        if i == RECOVERY_CODE_CHARS / 2 {
            s.push('-');
        }
        // 256 is a multiple of 32: no modulo bias.
        s.push(CODE_ALPHABET[usize::from(*b) % 32] as char);
    }
    s
}

/// SHA-256 of a recovery code as typed: case and separators ignored.
fn recovery_hash(code: &str) -> Option<[u8; 32]> {
    let norm: Zeroizing<String> =
        Zeroizing::new(code.chars().filter(|c| !matches!(c, '-' | ' ')).flat_map(char::to_lowercase).collect());
    if norm.len() != RECOVERY_CODE_CHARS || !norm.bytes().all(|b| CODE_ALPHABET.contains(&b)) {
        return None;
    }
    Some(Sha256::digest(norm.as_bytes()).into())
}

fn check_label(label: &str) -> Result<String, AdminError> {
    let l = label.trim();
    if l.is_empty() || l.chars().count() > MAX_LABEL || l.chars().any(char::is_control) {
        return Err(AdminError::bad_input(format!("a factor label is 1 to {MAX_LABEL} printable characters")));
    }
    Ok(l.to_owned())
}

/// What the opaque registration state holds.
#[derive(Serialize, Deserialize)]
struct RegistrationState {
    admin_id: i64,
    label: String,
    issued_at: i64,
    reg: PasskeyRegistration,
}

/// What the opaque authentication state holds.
#[derive(Serialize, Deserialize)]
struct AuthenticationState {
    admin_id: i64,
    /// Milliseconds: orders states, so an accepted one cannot be used again.
    issued_at_ms: i64,
    auth: PasskeyAuthentication,
}

fn storage_error(msg: impl Into<String>) -> AdminError {
    AdminError::Storage(msg.into().into())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Admin {
    fn factor_sealer(&self) -> FactorSealer {
        let key = Zeroizing::new(self.mail.derived_secret(SEAL_PURPOSE));
        FactorSealer(XChaCha20Poly1305::new((&*key).into()))
    }

    /// The WebAuthn relying party of `[admin] public_origin`.
    fn webauthn(&self) -> Result<Webauthn, AdminError> {
        let admin = self.cfg.admin.as_ref().ok_or_else(|| AdminError::refused("the admin plane is not configured"))?;
        let origin: Url = admin.origin().map_err(AdminError::bad_input)?;
        let rp_id = admin.rp_id().map_err(AdminError::bad_input)?;
        WebauthnBuilder::new(&rp_id, &origin)
            .and_then(|b| b.rp_name(ISSUER).build())
            .map_err(|e| AdminError::bad_input(format!("[admin] public_origin cannot be used for WebAuthn: {e}")))
    }

    async fn factors_of(&self, admin_id: i64, kind: FactorKind) -> Result<Vec<AdminFactorRecord>, AdminAuthError> {
        Ok(self
            .mail
            .store()
            .admin_factors(admin_id)
            .await?
            .into_iter()
            .filter(|f| f.pending_until.is_none() && f.kind == kind.as_str())
            .collect())
    }

    /// The administrator, if it exists and is enabled (login steps).
    async fn enabled_admin(&self, admin_id: i64) -> Result<crate::store::AdminRecord, AdminAuthError> {
        let rec = self.mail.store().admin_by_id(admin_id).await?.ok_or(AdminAuthError::Invalid)?;
        if !rec.enabled {
            return Err(AdminAuthError::Refused);
        }
        Ok(rec)
    }

    /// New recovery codes when the administrator has none (first factor).
    async fn first_recovery_codes(&self, admin_id: i64) -> Result<Option<Vec<String>>, AdminError> {
        if !self.mail.store().recovery_codes(admin_id).await?.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.new_recovery_codes(admin_id).await?))
    }

    async fn new_recovery_codes(&self, admin_id: i64) -> Result<Vec<String>, AdminError> {
        let codes: Vec<Zeroizing<String>> = (0..RECOVERY_CODES).map(|_| new_recovery_code()).collect();
        let hashes = codes.iter().filter_map(|c| recovery_hash(c)).map(|h| h.to_vec()).collect();
        self.mail.store().set_recovery_codes(admin_id, hashes).await?;
        Ok(codes.iter().map(|c| c.to_string()).collect())
    }

    /// Starts a TOTP enrolment: a fresh 160-bit key, sealed and stored as a
    /// pending factor for 10 minutes.
    pub async fn totp_begin(&self, admin_id: i64, label: &str) -> Result<TotpEnrolment, AdminError> {
        let label = check_label(label)?;
        let rec = self.admin_record_by_id(admin_id).await?;
        let secret = random_bytes::<TOTP_SECRET_BYTES>();
        let sealed = self.factor_sealer().seal(admin_id, FactorKind::Totp, &*secret);
        let id = self
            .mail
            .store()
            .add_admin_factor(admin_id, FactorKind::Totp.as_str(), &label, sealed, Some(unix_now() + ENROLMENT_SECS))
            .await?;
        let secret_base32 = base32(&*secret);
        let mut uri = Url::parse("otpauth://totp/").map_err(|e| AdminError::Storage(Box::new(e)))?;
        uri.set_path(&format!("{ISSUER}:{}", rec.name));
        uri.query_pairs_mut()
            .append_pair("secret", &secret_base32)
            .append_pair("issuer", ISSUER)
            .append_pair("algorithm", "SHA1")
            .append_pair("digits", &TOTP_DIGITS.to_string())
            .append_pair("period", &TOTP_STEP.to_string());
        Ok(TotpEnrolment { pending_id: id.to_string(), secret_base32, otpauth_uri: Zeroizing::new(uri.to_string()) })
    }

    /// Confirms a TOTP enrolment with a code from the app (which also uses
    /// up that step). Returns the recovery codes, shown once, when this is
    /// the administrator's first factor.
    pub async fn totp_finish(
        &self,
        actor: &Actor,
        admin_id: i64,
        pending_id: &str,
        code: &str,
        now: u64,
    ) -> Result<Option<Vec<String>>, AdminError> {
        let rec = self.admin_record_by_id(admin_id).await?;
        self.audited(actor, "admin.mfa.enrol", &rec.name, async {
            let id: i64 = pending_id.parse().map_err(|_| AdminError::bad_input("unknown enrolment"))?;
            let factors = self.mail.store().admin_factors(admin_id).await?;
            let f = factors
                .iter()
                .find(|f| f.id == id && f.kind == FactorKind::Totp.as_str() && f.pending_until.is_some())
                .ok_or_else(|| AdminError::not_found("unknown or expired enrolment"))?;
            let secret = self
                .factor_sealer()
                .open(admin_id, FactorKind::Totp, &f.sealed)
                .ok_or_else(|| storage_error("a sealed factor does not open under this master key"))?;
            let step = totp_match(&secret, code, now).ok_or_else(|| AdminError::refused("wrong code"))?;
            if !self.mail.store().activate_admin_factor(admin_id, id, unix_now()).await? {
                return Err(AdminError::not_found("unknown or expired enrolment"));
            }
            self.mail.store().use_factor_step(id, step, now as i64).await?;
            // After the factor is active: codes made for a failed enrolment
            // would be stored but never shown.
            let codes = self.first_recovery_codes(admin_id).await?;
            tracing::warn!(alert = true, event = "admin_factor_enrolled", admin = %rec.name, actor = %actor, kind = "totp", label = %f.label,
                "administrator second factor enrolled");
            Ok(codes)
        })
        .await
    }

    /// Checks a TOTP code against every TOTP factor of the administrator:
    /// ±1 step around `now`, and a step already used is refused (replay).
    pub async fn totp_verify(&self, admin_id: i64, code: &str, now: u64) -> Result<(), AdminAuthError> {
        self.enabled_admin(admin_id).await?;
        let sealer = self.factor_sealer();
        for f in self.factors_of(admin_id, FactorKind::Totp).await? {
            let Some(secret) = sealer.open(admin_id, FactorKind::Totp, &f.sealed) else {
                tracing::error!(factor = f.id, "a sealed TOTP factor does not open under this master key");
                continue;
            };
            if let Some(step) = totp_match(&secret, code, now) {
                return if self.mail.store().use_factor_step(f.id, step, now as i64).await? {
                    Ok(())
                } else {
                    Err(AdminAuthError::Invalid)
                };
            }
        }
        Err(AdminAuthError::Invalid)
    }

    /// Starts registering a passkey: the options for
    /// `navigator.credentials.create` and the opaque state to keep
    /// server-side until [`Admin::webauthn_register_finish`].
    pub async fn webauthn_register_begin(
        &self,
        admin_id: i64,
        label: &str,
    ) -> Result<(serde_json::Value, String), AdminError> {
        let label = check_label(label)?;
        let rec = self.admin_record_by_id(admin_id).await?;
        let wa = self.webauthn()?;
        let sealer = self.factor_sealer();
        let exclude = self
            .factors_of(admin_id, FactorKind::WebAuthn)
            .await
            .map_err(|e| storage_error(e.to_string()))?
            .iter()
            .filter_map(|f| sealer.open(admin_id, FactorKind::WebAuthn, &f.sealed))
            .filter_map(|p| serde_json::from_slice::<Passkey>(&p).ok())
            .map(|p| p.cred_id().clone())
            .collect::<Vec<_>>();
        let (options, reg) = wa
            .start_passkey_registration(Uuid::from_u64_pair(0, admin_id as u64), &rec.name, &rec.name, Some(exclude))
            .map_err(|e| storage_error(format!("WebAuthn registration: {e}")))?;
        let state = RegistrationState { admin_id, label, issued_at: unix_now(), reg };
        let state = serde_json::to_string(&state).map_err(|e| AdminError::Storage(Box::new(e)))?;
        let options = serde_json::to_value(options).map_err(|e| AdminError::Storage(Box::new(e)))?;
        Ok((options, state))
    }

    /// Finishes registering a passkey with the browser's response. Returns
    /// the recovery codes, shown once, when this is the first factor.
    pub async fn webauthn_register_finish(
        &self,
        actor: &Actor,
        admin_id: i64,
        state: &str,
        response: &serde_json::Value,
    ) -> Result<Option<Vec<String>>, AdminError> {
        let rec = self.admin_record_by_id(admin_id).await?;
        self.audited(actor, "admin.mfa.enrol", &rec.name, async {
            if state.len() > MAX_CEREMONY_JSON || response.to_string().len() > MAX_CEREMONY_JSON {
                return Err(AdminError::bad_input("WebAuthn data too large"));
            }
            let st: RegistrationState =
                serde_json::from_str(state).map_err(|_| AdminError::bad_input("invalid registration state"))?;
            if st.admin_id != admin_id || unix_now() - st.issued_at > CEREMONY_SECS || st.issued_at > unix_now() + 5 {
                return Err(AdminError::refused("the registration expired; start again"));
            }
            let cred: RegisterPublicKeyCredential = serde_json::from_value(response.clone())
                .map_err(|_| AdminError::bad_input("invalid WebAuthn registration response"))?;
            let passkey = self
                .webauthn()?
                .finish_passkey_registration(&cred, &st.reg)
                .map_err(|e| AdminError::refused(format!("WebAuthn registration refused: {e}")))?;
            let sealer = self.factor_sealer();
            for f in self.mail.store().admin_factors(admin_id).await? {
                if f.kind != FactorKind::WebAuthn.as_str() || f.pending_until.is_some() {
                    continue;
                }
                let known = sealer
                    .open(admin_id, FactorKind::WebAuthn, &f.sealed)
                    .and_then(|p| serde_json::from_slice::<Passkey>(&p).ok())
                    .is_some_and(|p| p.cred_id() == passkey.cred_id());
                if known {
                    return Err(AdminError::conflict("this passkey is registered already"));
                }
            }
            let plain = Zeroizing::new(serde_json::to_vec(&passkey).map_err(|e| AdminError::Storage(Box::new(e)))?);
            let sealed = sealer.seal(admin_id, FactorKind::WebAuthn, &plain);
            self.mail
                .store()
                .add_admin_factor(admin_id, FactorKind::WebAuthn.as_str(), &st.label, sealed, None)
                .await?;
            let codes = self.first_recovery_codes(admin_id).await?;
            tracing::warn!(alert = true, event = "admin_factor_enrolled", admin = %rec.name, actor = %actor, kind = "webauthn", label = %st.label,
                "administrator second factor enrolled");
            Ok(codes)
        })
        .await
    }

    /// Starts a passkey login: options for `navigator.credentials.get` and
    /// the opaque state. [`AdminAuthError::Invalid`] without a passkey.
    pub async fn webauthn_auth_begin(&self, admin_id: i64) -> Result<(serde_json::Value, String), AdminAuthError> {
        self.enabled_admin(admin_id).await?;
        let wa = self.webauthn().map_err(|e| AdminAuthError::Storage(e.to_string()))?;
        let sealer = self.factor_sealer();
        let passkeys: Vec<Passkey> = self
            .factors_of(admin_id, FactorKind::WebAuthn)
            .await?
            .iter()
            .filter_map(|f| sealer.open(admin_id, FactorKind::WebAuthn, &f.sealed))
            .filter_map(|p| serde_json::from_slice(&p).ok())
            .collect();
        if passkeys.is_empty() {
            return Err(AdminAuthError::Invalid);
        }
        let (options, auth) =
            wa.start_passkey_authentication(&passkeys).map_err(|e| AdminAuthError::Storage(e.to_string()))?;
        let state = AuthenticationState { admin_id, issued_at_ms: now_ms(), auth };
        let state = serde_json::to_string(&state).map_err(|e| AdminAuthError::Storage(e.to_string()))?;
        let options = serde_json::to_value(options).map_err(|e| AdminAuthError::Storage(e.to_string()))?;
        Ok((options, state))
    }

    /// Verifies a passkey assertion against the state of
    /// [`Admin::webauthn_auth_begin`]; the state cannot be used twice and a
    /// signature counter that did not grow is refused (a cloned key).
    pub async fn webauthn_auth_finish(
        &self,
        admin_id: i64,
        state: &str,
        response: &serde_json::Value,
    ) -> Result<(), AdminAuthError> {
        self.enabled_admin(admin_id).await?;
        if state.len() > MAX_CEREMONY_JSON || response.to_string().len() > MAX_CEREMONY_JSON {
            return Err(AdminAuthError::Invalid);
        }
        let st: AuthenticationState = serde_json::from_str(state).map_err(|_| AdminAuthError::Invalid)?;
        let age = now_ms() - st.issued_at_ms;
        if st.admin_id != admin_id || !(-5_000..=CEREMONY_SECS * 1000).contains(&age) {
            return Err(AdminAuthError::Invalid);
        }
        let cred: PublicKeyCredential =
            serde_json::from_value(response.clone()).map_err(|_| AdminAuthError::Invalid)?;
        let wa = self.webauthn().map_err(|e| AdminAuthError::Storage(e.to_string()))?;
        let result = wa.finish_passkey_authentication(&cred, &st.auth).map_err(|e| {
            tracing::info!(error = %e, "WebAuthn assertion refused");
            AdminAuthError::Invalid
        })?;
        let sealer = self.factor_sealer();
        for f in self.factors_of(admin_id, FactorKind::WebAuthn).await? {
            let Some(plain) = sealer.open(admin_id, FactorKind::WebAuthn, &f.sealed) else { continue };
            let Ok(mut passkey) = serde_json::from_slice::<Passkey>(&plain) else { continue };
            if passkey.cred_id() != result.cred_id() {
                continue;
            }
            // The stored counter, not the one captured in the state: an
            // assertion replayed with its state is caught here too.
            let stored = passkey_counter(&passkey);
            if (result.counter() != 0 || stored != 0) && result.counter() <= stored {
                tracing::warn!(
                    alert = true,
                    event = "admin_factor_counter_regressed",
                    admin_id,
                    factor = f.id,
                    "WebAuthn signature counter did not grow"
                );
                return Err(AdminAuthError::Invalid);
            }
            passkey.update_credential(&result);
            // Single use: a state issued before the last accepted one is refused.
            if !self.mail.store().use_factor_step(f.id, st.issued_at_ms, unix_now()).await? {
                return Err(AdminAuthError::Invalid);
            }
            let plain =
                Zeroizing::new(serde_json::to_vec(&passkey).map_err(|e| AdminAuthError::Storage(e.to_string()))?);
            let sealed = sealer.seal(admin_id, FactorKind::WebAuthn, &plain);
            self.mail.store().update_admin_factor(f.id, sealed, unix_now()).await?;
            return Ok(());
        }
        Err(AdminAuthError::Invalid)
    }

    /// Logs in with a recovery code instead of a factor; each code works
    /// once. Emits an alert.
    pub async fn recovery_code_use(&self, admin_id: i64, code: &str, address: IpAddr) -> Result<(), AdminAuthError> {
        let rec = self.enabled_admin(admin_id).await?;
        let Some(hash) = recovery_hash(code) else { return Err(AdminAuthError::Invalid) };
        let stored = self.mail.store().recovery_codes(admin_id).await?;
        let mut found = subtle::Choice::from(0);
        for h in &stored {
            found |= h.as_slice().ct_eq(&hash);
        }
        if !bool::from(found) || !self.mail.store().use_recovery_code(admin_id, hash.to_vec()).await? {
            return Err(AdminAuthError::Invalid);
        }
        let left = stored.len() - 1;
        tracing::warn!(alert = true, event = "admin_recovery_code_used", admin = %rec.name, peer = %address,
            codes_left = left, "administrator used a recovery code");
        let actor = Actor::Admin { name: rec.name.clone(), address };
        self.audited(&actor, "admin.recovery.use", &rec.name, async { Ok(()) })
            .await
            .map_err(|e| AdminAuthError::Storage(e.to_string()))
    }

    /// Removes one factor. The last factor can be removed (the next login
    /// can then only enrol one).
    pub async fn factor_remove(&self, actor: &Actor, admin_id: i64, factor_id: i64) -> Result<(), AdminError> {
        let rec = self.admin_record_by_id(admin_id).await?;
        self.audited(actor, "admin.mfa.remove", &format!("{}/{factor_id}", rec.name), async {
            if !self.mail.store().remove_admin_factor(admin_id, factor_id).await? {
                return Err(AdminError::not_found(format!("no factor #{factor_id} of {}", rec.name)));
            }
            tracing::warn!(alert = true, event = "admin_factor_removed", admin = %rec.name, actor = %actor, factor = factor_id,
                "administrator second factor removed");
            Ok(())
        })
        .await
    }

    /// Replaces the recovery codes with ten new ones (shown once).
    pub async fn recovery_codes_regenerate(&self, actor: &Actor, admin_id: i64) -> Result<Vec<String>, AdminError> {
        let rec = self.admin_record_by_id(admin_id).await?;
        self.audited(actor, "admin.recovery.regenerate", &rec.name, async {
            let codes = self.new_recovery_codes(admin_id).await?;
            tracing::warn!(alert = true, event = "admin_recovery_codes_replaced", admin = %rec.name, actor = %actor, "administrator recovery codes replaced");
            Ok(codes)
        })
        .await
    }

    /// Removes every factor and recovery code of an administrator (lost
    /// phone and codes): the next login can only enrol a factor.
    pub async fn admin_reset_mfa(&self, actor: &Actor, name: &str) -> Result<(), AdminError> {
        self.audited(actor, "admin.mfa.reset", &super::admins::target_name(name), async {
            let rec = self.admin_record(name).await?;
            self.mail.store().reset_admin_factors(rec.id).await?;
            tracing::warn!(alert = true, event = "admin_mfa_reset", admin = %rec.name, actor = %actor, "administrator second factors reset");
            Ok(())
        })
        .await
    }

    /// How many unused recovery codes the administrator has left.
    pub async fn recovery_codes_left(&self, admin_id: i64) -> Result<usize, AdminError> {
        Ok(self.mail.store().recovery_codes(admin_id).await?.len())
    }
}

/// The signature counter stored with a passkey.
fn passkey_counter(p: &Passkey) -> u32 {
    // `Passkey` exposes its counter only through its serialised credential.
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.get("cred")?.get("counter")?.as_u64())
        .and_then(|c| u32::try_from(c).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_sha1_vectors() {
        // RFC 6238 appendix B, SHA-1 key, truncated to 6 digits.
        let key = b"12345678901234567890";
        for (t, code) in
            [(59u64, "287082"), (1_111_111_109, "081804"), (1_234_567_890, "005924"), (2_000_000_000, "279037")]
        {
            assert_eq!(totp_code(key, t / 30).unwrap().as_str(), code, "t={t}");
            assert_eq!(totp_match(key, code, t), Some((t / 30) as i64));
        }
        assert_eq!(totp_match(key, "287082", 59 + 30), Some(1), "one step late is accepted");
        assert_eq!(totp_match(key, "287082", 59 + 60), None, "two steps late is refused");
        assert_eq!(totp_match(key, "28708", 59), None);
        assert_eq!(totp_match(key, "28708a", 59), None);
    }

    #[test]
    fn base32_matches_rfc4648() {
        assert_eq!(base32(b"foobar").as_str(), "MZXW6YTBOI");
        assert_eq!(base32(b"f").as_str(), "MY");
        assert_eq!(base32(&[0u8; 20]).len(), 32);
    }

    #[test]
    fn recovery_codes_have_50_bits_and_normalise() {
        let c = new_recovery_code();
        assert_eq!(c.len(), 11);
        assert_eq!(c.as_bytes()[5], b'-');
        let h = recovery_hash(&c).unwrap();
        assert_eq!(recovery_hash(&c.to_uppercase()), Some(h));
        assert_eq!(recovery_hash(&c.replace('-', " ")), Some(h));
        assert_eq!(recovery_hash("short"), None);
        assert_eq!(recovery_hash("0000000000"), None, "0 is not in the alphabet");
        assert_ne!(new_recovery_code(), c);
    }

    #[test]
    fn sealed_factors_are_bound_to_admin_and_kind() {
        let s = FactorSealer(XChaCha20Poly1305::new((&[7u8; 32]).into()));
        let sealed = s.seal(1, FactorKind::Totp, b"secret");
        assert_eq!(&**s.open(1, FactorKind::Totp, &sealed).unwrap(), b"secret");
        assert!(s.open(2, FactorKind::Totp, &sealed).is_none());
        assert!(s.open(1, FactorKind::WebAuthn, &sealed).is_none());
        assert!(s.open(1, FactorKind::Totp, &sealed[..20]).is_none());
    }
}
