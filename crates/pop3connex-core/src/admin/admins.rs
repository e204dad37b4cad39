//! Administrators of the admin plane (not mail users): accounts with an
//! Argon2id password under the users' password policy and a set of roles,
//! password login without a name oracle, and the [`Principal`] a verified
//! administrator or service token acts as.
//!
//! Second factors live in [`super::mfa`], service tokens in
//! [`super::tokens`]. Every change passes through [`Admin::audited`]; login
//! steps do not (there is no actor yet): the web layer records them.

use std::net::IpAddr;

use serde::Serialize;
use tokio::sync::OnceCell;

use super::{Actor, Admin, AdminError};
use crate::config::{AuthConfig, PasswordScheme};
use crate::rbac::{in_domain_scope, Permission, PermissionSet, Roles};
use crate::store::{AdminFactorRecord, AdminRecord};
use crate::types::unix_now;

/// Longest administrator name.
const MAX_ADMIN_NAME: usize = 64;
/// Longest password accepted for hashing (Argon2 takes any length; a
/// megabyte password must not cost a megabyte of hashing input per try).
pub(crate) const MAX_PASSWORD_BYTES: usize = 1024;

/// Who is calling the admin API or console: an administrator who passed
/// password and second factor, or a service token. Built by
/// [`Admin::principal_for_admin`] and [`Admin::token_authenticate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub actor: Actor,
    /// The administrator (for a token: `None`).
    pub admin_id: Option<i64>,
    /// The service token's id (for an administrator: `None`).
    pub token_id: Option<String>,
    pub permissions: PermissionSet,
    /// Domain scope: `None` every user, `Some` only users of these domains.
    pub domains: Option<Vec<String>>,
}

impl Principal {
    pub fn can(&self, p: Permission) -> bool {
        self.permissions.contains(p)
    }

    /// Whether the principal's domain scope covers mail user `user`.
    pub fn may_touch_user(&self, user: &str) -> bool {
        in_domain_scope(self.domains.as_deref(), user)
    }
}

/// Kind of a second factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FactorKind {
    /// RFC 6238 time-based one-time passwords (authenticator apps).
    Totp,
    /// A WebAuthn passkey or security key.
    #[serde(rename = "webauthn")]
    WebAuthn,
}

impl FactorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FactorKind::Totp => "totp",
            FactorKind::WebAuthn => "webauthn",
        }
    }

    pub fn parse(s: &str) -> Option<FactorKind> {
        match s {
            "totp" => Some(FactorKind::Totp),
            "webauthn" => Some(FactorKind::WebAuthn),
            _ => None,
        }
    }
}

/// A confirmed second factor, listed without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FactorInfo {
    pub id: i64,
    pub kind: FactorKind,
    pub label: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

/// An administrator as listed (no password hash, no factor secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminInfo {
    pub id: i64,
    pub name: String,
    pub roles: Vec<String>,
    pub enabled: bool,
    /// Confirmed factors only; empty: the administrator can only enrol one.
    pub factors: Vec<FactorInfo>,
    pub created_at: i64,
    pub last_login_at: Option<i64>,
}

/// Why a login step failed. One variant for every wrong credential (name,
/// password, code, token), so a caller cannot tell which part was wrong.
#[derive(Debug, thiserror::Error)]
pub enum AdminAuthError {
    #[error("invalid credentials")]
    Invalid,
    /// Credentials were right but the account or token may not be used
    /// (disabled administrator, disabled creator).
    #[error("access refused")]
    Refused,
    #[error("storage failure: {0}")]
    Storage(String),
}

impl From<crate::store::StoreError> for AdminAuthError {
    fn from(e: crate::store::StoreError) -> Self {
        AdminAuthError::Storage(e.to_string())
    }
}

/// Checks and normalises an administrator name: 1 to 64 of `a-z 0-9 . _ -`,
/// starting with a letter or digit, case-folded.
pub fn check_admin_name(name: &str) -> Result<String, AdminError> {
    let n = name.trim().to_ascii_lowercase();
    let ok = !n.is_empty()
        && n.len() <= MAX_ADMIN_NAME
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(n)
    } else {
        Err(AdminError::bad_input(format!(
            "invalid administrator name `{}`: 1 to {MAX_ADMIN_NAME} of a-z, 0-9, '.', '_', '-'",
            crate::logtext::sanitize(name)
        )))
    }
}

/// The audit target for an administrator name: its normalised form, or
/// the sanitised text when it is not a valid name.
pub(crate) fn target_name(name: &str) -> String {
    check_admin_name(name).unwrap_or_else(|_| crate::logtext::sanitize(name))
}

pub(crate) fn factor_info(f: &AdminFactorRecord) -> Option<FactorInfo> {
    if f.pending_until.is_some() {
        return None;
    }
    Some(FactorInfo {
        id: f.id,
        kind: FactorKind::parse(&f.kind)?,
        label: f.label.clone(),
        created_at: f.created_at,
        last_used_at: f.last_used_at,
    })
}

/// A hash of a random password, verified against when the name is unknown
/// so that an unknown name costs what a wrong password costs. One per
/// process: computing it per attempt would make unknown names slower.
static DUMMY_HASH: OnceCell<String> = OnceCell::const_new();

/// Admin passwords are always Argon2id, whatever `[auth] password_scheme`
/// says for mail users (which may be SHA512-CRYPT for Dovecot imports).
fn admin_hash_config(auth: &AuthConfig) -> AuthConfig {
    AuthConfig { password_scheme: PasswordScheme::Argon2id, ..auth.clone() }
}

impl Admin {
    /// The built-in roles and the configured custom roles.
    pub fn roles(&self) -> Roles {
        let custom = self.cfg.admin.as_ref().map(|a| a.roles.clone()).unwrap_or_default();
        // Checked when the configuration was loaded; a failure here means a
        // configuration built by hand: fall back to the built-in roles.
        Roles::new(&custom).unwrap_or_else(|_| Roles::new(&Default::default()).expect("built-in roles are valid"))
    }

    fn check_roles(&self, roles: &[String]) -> Result<Vec<String>, AdminError> {
        if roles.is_empty() {
            return Err(AdminError::bad_input("an administrator needs at least one role"));
        }
        let known = self.roles();
        let mut out: Vec<String> = Vec::with_capacity(roles.len());
        for r in roles {
            if known.get(r).is_none() {
                return Err(AdminError::bad_input(format!(
                    "unknown role `{}` (see `pop3connex admin roles`)",
                    crate::logtext::sanitize(r)
                )));
            }
            if !out.contains(r) {
                out.push(r.clone());
            }
        }
        Ok(out)
    }

    /// The password policy of mail users, then an Argon2id hash (off the
    /// async threads).
    async fn hash_admin_password(&self, name: &str, password: &str) -> Result<String, AdminError> {
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(AdminError::refused(format!("password longer than {MAX_PASSWORD_BYTES} bytes")));
        }
        self.cfg.auth.password_policy.check(password, name).map_err(|e| AdminError::Refused(Box::new(e)))?;
        let cfg = admin_hash_config(&self.cfg.auth);
        let pw = zeroize::Zeroizing::new(password.as_bytes().to_vec());
        tokio::task::spawn_blocking(move || crate::password::hash_password(&cfg, &pw))
            .await
            .map_err(|e| AdminError::Storage(Box::new(e)))?
            .map_err(AdminError::from)
    }

    pub(crate) async fn admin_record(&self, name: &str) -> Result<AdminRecord, AdminError> {
        let n = check_admin_name(name)?;
        self.mail
            .store()
            .admin_by_name(&n)
            .await?
            .ok_or_else(|| AdminError::not_found(format!("no such administrator: {n}")))
    }

    pub(crate) async fn admin_record_by_id(&self, id: i64) -> Result<AdminRecord, AdminError> {
        self.mail.store().admin_by_id(id).await?.ok_or_else(|| AdminError::not_found(format!("no administrator #{id}")))
    }

    async fn admin_info(&self, rec: AdminRecord) -> Result<AdminInfo, AdminError> {
        let factors = self.mail.store().admin_factors(rec.id).await?;
        Ok(AdminInfo {
            id: rec.id,
            name: rec.name,
            roles: rec.roles,
            enabled: rec.enabled,
            factors: factors.iter().filter_map(factor_info).collect(),
            created_at: rec.created_at,
            last_login_at: rec.last_login_at,
        })
    }

    /// Creates an administrator (enabled, without a factor: the first login
    /// can only enrol one).
    pub async fn admin_add(
        &self,
        actor: &Actor,
        name: &str,
        password: &str,
        roles: &[String],
    ) -> Result<AdminInfo, AdminError> {
        self.audited(actor, "admin.add", &target_name(name), async {
            let name = check_admin_name(name)?;
            let roles = self.check_roles(roles)?;
            let hash = self.hash_admin_password(&name, password).await?;
            let id = match self.mail.store().create_admin(&name, &hash, &roles).await {
                Err(crate::store::StoreError::UserExists) => {
                    return Err(AdminError::conflict(format!("administrator already exists: {name}")))
                }
                other => other?,
            };
            self.admin_info(self.admin_record_by_id(id).await?).await
        })
        .await
    }

    /// Every administrator, by name.
    pub async fn admin_list(&self, actor: &Actor) -> Result<Vec<AdminInfo>, AdminError> {
        self.audited(actor, "admin.list", "*", async {
            let mut out = Vec::new();
            for rec in self.mail.store().admins().await? {
                out.push(self.admin_info(rec).await?);
            }
            Ok(out)
        })
        .await
    }

    /// Disables (refuses every login and every token it created) or
    /// enables an administrator.
    pub async fn admin_set_enabled(&self, actor: &Actor, name: &str, enabled: bool) -> Result<(), AdminError> {
        let op = if enabled { "admin.enable" } else { "admin.disable" };
        self.audited(actor, op, &target_name(name), async {
            let rec = self.admin_record(name).await?;
            self.mail.store().set_admin_enabled(rec.id, enabled).await?;
            if !enabled {
                tracing::warn!(alert = true, event = "admin_disabled", admin = %rec.name, actor = %actor, "administrator disabled");
            }
            Ok(())
        })
        .await
    }

    /// Removes an administrator with its factors, recovery codes and the
    /// service tokens it created.
    pub async fn admin_remove(&self, actor: &Actor, name: &str) -> Result<(), AdminError> {
        self.audited(actor, "admin.remove", &target_name(name), async {
            let rec = self.admin_record(name).await?;
            if !self.mail.store().remove_admin(rec.id).await? {
                return Err(AdminError::not_found(format!("no such administrator: {}", rec.name)));
            }
            tracing::warn!(alert = true, event = "admin_removed", admin = %rec.name, actor = %actor, "administrator removed");
            Ok(())
        })
        .await
    }

    /// Replaces an administrator's roles (known role names, at least one).
    pub async fn admin_set_roles(&self, actor: &Actor, name: &str, roles: &[String]) -> Result<(), AdminError> {
        self.audited(actor, "admin.roles", &target_name(name), async {
            let rec = self.admin_record(name).await?;
            let roles = self.check_roles(roles)?;
            self.mail.store().set_admin_roles(rec.id, &roles).await?;
            tracing::warn!(alert = true, event = "admin_roles_changed", admin = %rec.name, actor = %actor, roles = ?roles, "administrator roles changed");
            Ok(())
        })
        .await
    }

    /// Sets an administrator's password (password policy, Argon2id).
    pub async fn admin_set_password(&self, actor: &Actor, name: &str, password: &str) -> Result<(), AdminError> {
        self.audited(actor, "admin.passwd", &target_name(name), async {
            let rec = self.admin_record(name).await?;
            let hash = self.hash_admin_password(&rec.name, password).await?;
            self.mail.store().set_admin_password(rec.id, &hash).await?;
            Ok(())
        })
        .await
    }

    /// The first login step. Unknown names cost one Argon2id verification
    /// like a wrong password, and both answer [`AdminAuthError::Invalid`];
    /// a disabled administrator with the right password gets
    /// [`AdminAuthError::Refused`] (after the same work).
    pub async fn admin_verify_password(&self, name: &str, password: &str) -> Result<AdminInfo, AdminAuthError> {
        let rec = match check_admin_name(name) {
            Ok(n) if password.len() <= MAX_PASSWORD_BYTES => self.mail.store().admin_by_name(&n).await?,
            _ => None,
        };
        let stored = match &rec {
            Some(r) => r.password_hash.clone(),
            None => {
                let cfg = admin_hash_config(&self.cfg.auth);
                DUMMY_HASH
                    .get_or_try_init(|| async move {
                        tokio::task::spawn_blocking(move || crate::password::dummy_hash(&cfg))
                            .await
                            .map_err(|e| AdminAuthError::Storage(e.to_string()))?
                            .map_err(|e| AdminAuthError::Storage(e.to_string()))
                    })
                    .await?
                    .clone()
            }
        };
        // Bounded before the hash: an over-long password is verified as an
        // empty one (same work, certain failure).
        let pw = zeroize::Zeroizing::new(if password.len() <= MAX_PASSWORD_BYTES {
            password.as_bytes().to_vec()
        } else {
            Vec::new()
        });
        let ok = tokio::task::spawn_blocking(move || crate::password::verify_password(&stored, &pw))
            .await
            .map_err(|e| AdminAuthError::Storage(e.to_string()))?;
        let Some(rec) = rec.filter(|_| ok && password.len() <= MAX_PASSWORD_BYTES) else {
            return Err(AdminAuthError::Invalid);
        };
        if !rec.enabled {
            return Err(AdminAuthError::Refused);
        }
        self.admin_info(rec).await.map_err(|e| AdminAuthError::Storage(e.to_string()))
    }

    /// Records a successful login (last login time shown in `admin list`).
    pub async fn record_login(&self, admin_id: i64) -> Result<(), AdminError> {
        Ok(self.mail.store().record_admin_login(admin_id, unix_now()).await?)
    }

    /// What a logged-in administrator may do, from their roles now (a role
    /// change applies at the next request). Refused for a disabled or
    /// removed administrator.
    ///
    /// An administrator without a confirmed second factor still gets a
    /// principal: the web layer must check [`AdminInfo::factors`] (or
    /// [`Admin::admin_has_factor`]) and restrict such a session to
    /// enrolling a factor. There is no exemption from the second factor.
    pub async fn principal_for_admin(&self, admin_id: i64, address: IpAddr) -> Result<Principal, AdminAuthError> {
        let rec = self.mail.store().admin_by_id(admin_id).await?.ok_or(AdminAuthError::Invalid)?;
        if !rec.enabled {
            return Err(AdminAuthError::Refused);
        }
        let (permissions, domains) = self.roles().effective(&rec.roles);
        Ok(Principal {
            actor: Actor::Admin { name: rec.name, address },
            admin_id: Some(rec.id),
            token_id: None,
            permissions,
            domains,
        })
    }

    /// The principal the CLI acts as when it needs an administrator's rights
    /// (creating a service token for automation): the CLI actor with the
    /// named administrator's permissions. Refused for a disabled one.
    pub async fn principal_for_cli(&self, actor: &Actor, admin_name: &str) -> Result<Principal, AdminError> {
        let rec = self.admin_record(admin_name).await?;
        if !rec.enabled {
            return Err(AdminError::refused(format!("administrator {} is disabled", rec.name)));
        }
        let (permissions, domains) = self.roles().effective(&rec.roles);
        Ok(Principal { actor: actor.clone(), admin_id: Some(rec.id), token_id: None, permissions, domains })
    }

    /// What a console session is bound to: a digest of the administrator's
    /// password hash (a password change, by any process, ends the sessions
    /// opened with the old one) and whether it still has a confirmed second
    /// factor (an MFA reset ends the sessions that had passed one). Refused
    /// like [`Admin::principal_for_admin`] for a disabled or removed admin.
    pub async fn admin_session_binding(&self, admin_id: i64) -> Result<([u8; 32], bool), AdminAuthError> {
        use sha2::{Digest, Sha256};
        let rec = self.mail.store().admin_by_id(admin_id).await?.ok_or(AdminAuthError::Invalid)?;
        if !rec.enabled {
            return Err(AdminAuthError::Refused);
        }
        let stamp: [u8; 32] = Sha256::new_with_prefix(b"pop3connex admin session v1\0")
            .chain_update(rec.password_hash.as_bytes())
            .finalize()
            .into();
        let has_factor = self.mail.store().admin_factors(admin_id).await?.iter().any(|f| f.pending_until.is_none());
        Ok((stamp, has_factor))
    }

    /// Whether the administrator has at least one confirmed second factor.
    pub async fn admin_has_factor(&self, admin_id: i64) -> Result<bool, AdminError> {
        Ok(self.mail.store().admin_factors(admin_id).await?.iter().any(|f| f.pending_until.is_none()))
    }
}
