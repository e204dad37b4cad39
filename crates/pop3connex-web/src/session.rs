//! Console sessions: server-side, bounded, bound to the client address.
//!
//! The browser holds only a random 256-bit id in the cookie
//! `__Host-p3x_session` (Secure, HttpOnly, SameSite=Strict, Path=/); the map
//! is keyed by the SHA-256 of that id, so a lookup never compares the
//! secret itself. A session moves through [`Stage`]s: the password was
//! right and a second factor is awaited (5 minutes), or the admin has no
//! factor yet and may only enrol one, or it is authenticated (read-only)
//! with a step-up window for destructive actions. The id is replaced at
//! login, at step-up and when a factor is enrolled (no fixation), and the
//! session dies at logout, at its idle or absolute timeout, when used from
//! another address, and when its admin is disabled.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub const COOKIE: &str = "__Host-p3x_session";
/// Sessions held at once: enough for every admin's browsers, bounded
/// against a flood of logins with a stolen password.
pub const MAX_SESSIONS: usize = 1024;
/// Sessions of one admin at once (the oldest goes beyond).
pub const MAX_SESSIONS_PER_ADMIN: usize = 16;
/// Between a right password and the second factor.
pub const MFA_WINDOW_SECS: u64 = 300;
/// Wrong second factors before the half-logged-in session is dropped.
pub const MAX_MFA_FAILURES: u32 = 5;

/// A pending TOTP enrolment: the secret is shown again on reload of the
/// enrol page until it is confirmed with a code.
#[derive(Clone)]
pub struct PendingTotp {
    pub pending_id: String,
    pub secret_base32: Zeroizing<String>,
    pub otpauth_uri: Zeroizing<String>,
}

/// Where a session stands.
#[derive(Clone)]
pub enum Stage {
    /// Password verified; a second factor is awaited.
    AwaitingMfa { failures: u32 },
    /// No factor enrolled yet: only enrolment is allowed.
    EnrolOnly,
    /// Logged in; destructive actions need `stepped_up_until > now`.
    Authenticated { stepped_up_until: u64 },
}

#[derive(Clone)]
pub struct Session {
    pub admin_id: i64,
    pub admin_name: String,
    /// The admin's roles at login (shown in the page header).
    pub roles: Vec<String>,
    pub address: IpAddr,
    pub stage: Stage,
    pub created_at: u64,
    pub last_seen: u64,
    /// WebAuthn ceremony state (opaque, kept server-side), by purpose.
    pub webauthn_state: Option<(WebAuthnPurpose, String)>,
    pub pending_totp: Option<PendingTotp>,
    /// Which second factors the admin has (the MFA and step-up pages offer them).
    pub has_totp: bool,
    pub has_passkey: bool,
    /// Recovery codes of a first enrolment, shown once on the next page.
    pub recovery_codes: Option<Vec<Zeroizing<String>>>,
    /// The admin's password binding at login
    /// ([`pop3connex_core::admin::Admin::admin_session_binding`]): a
    /// password change anywhere ends this session.
    pub password_stamp: [u8; 32],
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WebAuthnPurpose {
    Login,
    StepUp,
    Register,
}

impl Session {
    pub fn stepped_up(&self, now: u64) -> bool {
        matches!(self.stage, Stage::Authenticated { stepped_up_until } if stepped_up_until > now)
    }
}

/// A session id as sent in the cookie. Never logged.
#[derive(Clone)]
pub struct SessionId(Zeroizing<String>);

impl SessionId {
    fn random() -> SessionId {
        let mut bytes = Zeroizing::new([0u8; 32]);
        // A failing system RNG leaves no safe way to make a session.
        getrandom::getrandom(&mut *bytes).expect("system random number generator");
        SessionId(Zeroizing::new(URL_SAFE_NO_PAD.encode(*bytes)))
    }

    pub fn from_cookie(value: &str) -> SessionId {
        SessionId(Zeroizing::new(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn key(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }

    /// The `Set-Cookie` value that installs this id.
    pub fn set_cookie(&self) -> String {
        format!("{COOKIE}={}; Secure; HttpOnly; SameSite=Strict; Path=/", self.as_str())
    }
}

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionId(..)")
    }
}

/// The `Set-Cookie` value that removes the cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Secure; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// The session id in a `Cookie` header, if any.
pub fn cookie_id(headers: &axum::http::HeaderMap) -> Option<SessionId> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| SessionId::from_cookie(value))
}

/// Why a presented session is not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    Unknown,
    Expired,
    OtherAddress,
}

pub struct Sessions {
    idle_secs: u64,
    absolute_secs: u64,
    map: Mutex<HashMap<[u8; 32], Session>>,
}

impl Sessions {
    pub fn new(idle_secs: u64, absolute_secs: u64) -> Sessions {
        Sessions { idle_secs, absolute_secs, map: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn expired(&self, s: &Session, now: u64) -> bool {
        let idle = match s.stage {
            Stage::AwaitingMfa { .. } => MFA_WINDOW_SECS.min(self.idle_secs),
            _ => self.idle_secs,
        };
        now.saturating_sub(s.last_seen) >= idle || now.saturating_sub(s.created_at) >= self.absolute_secs
    }

    /// Stores `session` under a fresh id. When full, expired sessions go
    /// first, then the oldest half-logged-in one; `None` if still full.
    pub fn create(&self, session: Session, now: u64) -> Option<SessionId> {
        let mut map = self.lock();
        map.retain(|_, s| !self.expired(s, now));
        let mine: Vec<([u8; 32], u64)> =
            map.iter().filter(|(_, s)| s.admin_id == session.admin_id).map(|(k, s)| (*k, s.created_at)).collect();
        if mine.len() >= MAX_SESSIONS_PER_ADMIN {
            if let Some((k, _)) = mine.iter().min_by_key(|(_, t)| *t) {
                map.remove(k);
            }
        }
        if map.len() >= MAX_SESSIONS {
            let oldest_pending = map
                .iter()
                .filter(|(_, s)| matches!(s.stage, Stage::AwaitingMfa { .. }))
                .min_by_key(|(_, s)| s.created_at)
                .map(|(k, _)| *k);
            map.remove(&oldest_pending?);
        }
        let id = SessionId::random();
        map.insert(id.key(), session);
        Some(id)
    }

    /// The session for `id` used from `address`, touched (idle timer reset).
    /// An expired session, or one presented from another address, is
    /// deleted.
    pub fn get(&self, id: &SessionId, address: IpAddr, now: u64) -> Result<Session, Invalid> {
        let mut map = self.lock();
        let key = id.key();
        let Some(s) = map.get_mut(&key) else { return Err(Invalid::Unknown) };
        if self.expired(s, now) {
            map.remove(&key);
            return Err(Invalid::Expired);
        }
        if s.address != address {
            map.remove(&key);
            return Err(Invalid::OtherAddress);
        }
        s.last_seen = now;
        Ok(s.clone())
    }

    /// Changes the session `id` with `f`; `false` if it is gone.
    pub fn update(&self, id: &SessionId, f: impl FnOnce(&mut Session)) -> bool {
        match self.lock().get_mut(&id.key()) {
            Some(s) => {
                f(s);
                true
            }
            None => false,
        }
    }

    /// Moves the session to a fresh id (after `f` changed it); the old id
    /// stops working. `None` if it is gone.
    pub fn rotate(&self, id: &SessionId, f: impl FnOnce(&mut Session)) -> Option<SessionId> {
        let mut map = self.lock();
        let mut s = map.remove(&id.key())?;
        f(&mut s);
        let fresh = SessionId::random();
        map.insert(fresh.key(), s);
        Some(fresh)
    }

    pub fn remove(&self, id: &SessionId) -> Option<Session> {
        self.lock().remove(&id.key())
    }

    /// Ends every session of an admin (disabled, removed, MFA reset).
    pub fn remove_admin(&self, admin_id: i64) {
        self.lock().retain(|_, s| s.admin_id != admin_id);
    }

    /// Sessions held now (the dashboard shows it).
    pub fn count(&self, now: u64) -> usize {
        self.lock().values().filter(|s| !self.expired(s, now)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(admin_id: i64, now: u64, stage: Stage) -> Session {
        Session {
            admin_id,
            admin_name: format!("a{admin_id}"),
            roles: Vec::new(),
            address: "127.0.0.1".parse().unwrap(),
            stage,
            created_at: now,
            last_seen: now,
            webauthn_state: None,
            pending_totp: None,
            has_totp: false,
            has_passkey: false,
            recovery_codes: None,
            password_stamp: [0; 32],
        }
    }

    #[test]
    fn idle_absolute_mfa_window_address_binding_and_rotation() {
        let s = Sessions::new(900, 3600);
        let here: IpAddr = "127.0.0.1".parse().unwrap();
        let id = s.create(session(1, 1000, Stage::Authenticated { stepped_up_until: 0 }), 1000).unwrap();
        assert!(s.get(&id, here, 1899).is_ok(), "within idle time");
        assert!(s.get(&id, here, 2798).is_ok(), "touched: idle timer restarted");
        assert_eq!(s.get(&id, here, 3700).err(), Some(Invalid::Expired), "absolute timeout");
        assert_eq!(s.get(&id, here, 3700).err(), Some(Invalid::Unknown), "deleted when expired");

        let id = s.create(session(1, 5000, Stage::AwaitingMfa { failures: 0 }), 5000).unwrap();
        assert_eq!(s.get(&id, here, 5000 + MFA_WINDOW_SECS).err(), Some(Invalid::Expired), "MFA window is short");

        let id = s.create(session(1, 9000, Stage::EnrolOnly), 9000).unwrap();
        assert_eq!(s.get(&id, "127.0.0.2".parse().unwrap(), 9001).err(), Some(Invalid::OtherAddress));
        assert_eq!(s.get(&id, here, 9001).err(), Some(Invalid::Unknown), "a stolen cookie kills the session");

        let id = s.create(session(1, 9000, Stage::EnrolOnly), 9000).unwrap();
        let fresh = s.rotate(&id, |x| x.stage = Stage::Authenticated { stepped_up_until: 0 }).unwrap();
        assert!(s.get(&id, here, 9001).is_err(), "old id dead after rotation");
        assert!(s.get(&fresh, here, 9001).is_ok());
        assert_ne!(id.as_str(), fresh.as_str());
        assert_eq!(fresh.as_str().len(), 43, "256 bits, base64url");
        assert!(fresh.set_cookie().contains("; Secure; HttpOnly; SameSite=Strict; Path=/"));
    }

    #[test]
    fn bounded_per_admin() {
        let s = Sessions::new(900, 3600);
        for i in 0..(MAX_SESSIONS_PER_ADMIN as u64 + 5) {
            s.create(session(7, 100 + i, Stage::Authenticated { stepped_up_until: 0 }), 100 + i).unwrap();
        }
        assert_eq!(s.count(200), MAX_SESSIONS_PER_ADMIN);
    }
}
