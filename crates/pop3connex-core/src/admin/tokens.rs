//! Service tokens for automation against the admin API (never POP3, never
//! the console): least privilege, mandatory expiry, optional source
//! networks, revocable.
//!
//! A token reads `p3x_<id>_<secret>`: the id (16 hex digits) finds the row,
//! the secret (32 random bytes, base64url) is stored as SHA-256 and
//! compared in constant time. It is shown once, at creation. A token never
//! holds more than its creator: at creation its permissions must be a
//! subset of the creator's, and at every use they are cut down to what the
//! creator holds now (a creator who lost a role, or was disabled or
//! removed, takes the token's rights with them).

use std::net::IpAddr;

use base64::Engine;
use ipnet::IpNet;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::admins::{AdminAuthError, Principal};
use super::{Actor, Admin, AdminError};
use crate::rbac::{Permission, PermissionSet};
use crate::store::{ServiceTokenRecord, StoreError};
use crate::types::unix_now;

/// Prefix of every token (lets secret scanners recognise leaked ones).
const PREFIX: &str = "p3x_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;
/// Longest token text accepted for checking (a real one is 64 characters).
const MAX_TOKEN_LEN: usize = 128;
const MAX_NAME: usize = 64;
/// Most source networks on one token.
const MAX_NETWORKS: usize = 32;
/// Default upper bound on a token's lifetime without an `[admin]` section.
const DEFAULT_MAX_DAYS: u64 = 365;

/// A service token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    /// Name of the administrator who created it.
    pub creator: String,
    pub permissions: Vec<String>,
    pub networks: Vec<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub last_used_at: Option<i64>,
    pub last_used_from: Option<String>,
    pub revoked: bool,
}

fn info(r: ServiceTokenRecord) -> TokenInfo {
    TokenInfo {
        id: r.id,
        name: r.name,
        creator: r.creator_name,
        permissions: r.permissions,
        networks: r.networks,
        created_at: r.created_at,
        expires_at: r.expires_at,
        last_used_at: r.last_used_at,
        last_used_from: r.last_used_from,
        revoked: r.revoked,
    }
}

/// Splits `p3x_<id>_<secret>`; `None` for anything else.
fn split(presented: &str) -> Option<(&str, &str)> {
    if presented.len() > MAX_TOKEN_LEN {
        return None;
    }
    let (id, secret) = presented.strip_prefix(PREFIX)?.split_once('_')?;
    let id_ok = id.len() == ID_BYTES * 2 && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    (id_ok && !secret.is_empty()).then_some((id, secret))
}

fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Admin {
    fn max_token_days(&self) -> u64 {
        self.cfg.admin.as_ref().map_or(DEFAULT_MAX_DAYS, |a| a.max_token_days)
    }

    /// Creates a service token for `creator`. Refused: a service token as
    /// creator, permissions the creator does not hold (or none), an expiry
    /// in the past or beyond `[admin] max_token_days`. Returns the token
    /// text once; only its hash is stored.
    pub async fn token_create(
        &self,
        creator: &Principal,
        name: &str,
        permissions: &PermissionSet,
        expires_at: u64,
        networks: &[IpNet],
    ) -> Result<(TokenInfo, Zeroizing<String>), AdminError> {
        let target = crate::logtext::sanitize(name);
        self.audited(&creator.actor, "token.create", &target, async {
            if creator.token_id.is_some() || matches!(creator.actor, Actor::ServiceToken { .. }) {
                return Err(AdminError::refused("a service token cannot create service tokens"));
            }
            let Some(admin_id) = creator.admin_id else {
                return Err(AdminError::refused("only an administrator can create service tokens"));
            };
            let rec = self.admin_record_by_id(admin_id).await?;
            if !rec.enabled {
                return Err(AdminError::refused(format!("administrator {} is disabled", rec.name)));
            }
            // The creator's rights now, not when the principal was built.
            let (held, _) = self.roles().effective(&rec.roles);
            let held = PermissionSet::from_iter(held.iter().filter(|p| creator.permissions.contains(*p)));
            if !held.contains(Permission::TokensWrite) {
                return Err(AdminError::refused("creating service tokens needs the tokens.write permission"));
            }
            if permissions.is_empty() {
                return Err(AdminError::bad_input("a service token needs at least one permission"));
            }
            if !permissions.is_subset(&held) {
                let extra: Vec<&str> = permissions.iter().filter(|p| !held.contains(*p)).map(|p| p.as_str()).collect();
                return Err(AdminError::refused(format!(
                    "a token cannot hold more than its creator: {} not held by {}",
                    extra.join(", "),
                    rec.name
                )));
            }
            let name = name.trim();
            if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
                return Err(AdminError::bad_input(format!("a token name is 1 to {MAX_NAME} printable characters")));
            }
            if networks.len() > MAX_NETWORKS {
                return Err(AdminError::bad_input(format!("at most {MAX_NETWORKS} networks per token")));
            }
            let now = unix_now();
            let max = now.saturating_add((self.max_token_days() * 86_400) as i64);
            let expires = i64::try_from(expires_at).unwrap_or(i64::MAX);
            if expires <= now {
                return Err(AdminError::refused("the expiry is in the past"));
            }
            if expires > max {
                return Err(AdminError::refused(format!(
                    "the expiry is beyond the longest token lifetime ({} days, [admin] max_token_days)",
                    self.max_token_days()
                )));
            }
            let mut id_bytes = [0u8; ID_BYTES];
            let mut secret_bytes = Zeroizing::new([0u8; SECRET_BYTES]);
            getrandom::getrandom(&mut id_bytes).map_err(|e| AdminError::Storage(Box::new(e)))?;
            getrandom::getrandom(&mut *secret_bytes).map_err(|e| AdminError::Storage(Box::new(e)))?;
            let id: String = id_bytes.iter().map(|b| format!("{b:02x}")).collect();
            let secret = Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(*secret_bytes));
            let record = ServiceTokenRecord {
                id: id.clone(),
                name: name.to_owned(),
                creator_id: rec.id,
                creator_name: rec.name.clone(),
                permissions: permissions.names().into_iter().map(str::to_owned).collect(),
                networks: networks.iter().map(|n| n.trunc().to_string()).collect(),
                secret_hash: secret_hash(&secret).to_vec(),
                created_at: now,
                expires_at: expires,
                last_used_at: None,
                last_used_from: None,
                revoked: false,
            };
            self.mail.store().add_service_token(record.clone()).await?;
            let token = Zeroizing::new(format!("{PREFIX}{id}_{}", &*secret));
            tracing::warn!(alert = true, event = "service_token_created", token = %id, name = %name, creator = %rec.name, actor = %creator.actor,
                permissions = ?record.permissions, "service token created");
            Ok((info(record), token))
        })
        .await
    }

    /// Every service token, newest first (revoked and expired ones too).
    pub async fn token_list(&self, actor: &Actor) -> Result<Vec<TokenInfo>, AdminError> {
        self.audited(actor, "token.list", "*", async {
            Ok(self.mail.store().service_tokens().await?.into_iter().map(info).collect())
        })
        .await
    }

    /// Revokes a token at once (it stays listed as revoked).
    pub async fn token_revoke(&self, actor: &Actor, id: &str) -> Result<(), AdminError> {
        let target = crate::logtext::sanitize(id);
        self.audited(actor, "token.revoke", &target, async {
            if !self.mail.store().revoke_service_token(id).await? {
                return Err(AdminError::not_found(format!("no such token: {target}")));
            }
            tracing::warn!(alert = true, event = "service_token_revoked", token = %target, actor = %actor, "service token revoked");
            Ok(())
        })
        .await
    }

    /// Revokes a token on behalf of an administrator or token of the admin
    /// plane: its own tokens (those its administrator created), or any
    /// token for a caller that may manage administrators and is not
    /// limited to domains. Anything else is refused (and audited): a
    /// domain helpdesk cannot cut a superadmin's automation.
    pub async fn token_revoke_by(&self, principal: &Principal, id: &str) -> Result<(), AdminError> {
        let store = self.mail.store();
        let acting_admin = match (principal.admin_id, &principal.token_id) {
            (Some(a), _) => Some(a),
            (None, Some(t)) => store.service_token(t).await?.map(|r| r.creator_id),
            (None, None) => None,
        };
        let creator = store.service_token(id).await?.map(|r| r.creator_id);
        let manages_all = principal.domains.is_none() && principal.can(Permission::AdminsWrite);
        if creator.is_some() && creator != acting_admin && !manages_all {
            let target = crate::logtext::sanitize(id);
            return self
                .audited(&principal.actor, "token.revoke", &target, async {
                    Err(AdminError::refused("only your own tokens, unless you may manage administrators"))
                })
                .await;
        }
        self.token_revoke(&principal.actor, id).await
    }

    /// Authenticates an API call made with a token from `source`: the
    /// secret (constant time), not revoked, not expired, `source` inside
    /// its networks, its creator still enabled. Records the use. The
    /// principal holds the token's permissions that its creator still
    /// holds, within the creator's domain scope.
    pub async fn token_authenticate(&self, presented: &str, source: IpAddr) -> Result<Principal, AdminAuthError> {
        let Some((id, secret)) = split(presented) else { return Err(AdminAuthError::Invalid) };
        let rec = self.mail.store().service_token(id).await?;
        let presented_hash = secret_hash(secret);
        // The id is not secret; the secret is compared in constant time.
        let Some(rec) = rec else { return Err(AdminAuthError::Invalid) };
        if !bool::from(rec.secret_hash.as_slice().ct_eq(&presented_hash)) {
            return Err(AdminAuthError::Invalid);
        }
        if rec.revoked || rec.expires_at <= unix_now() {
            return Err(AdminAuthError::Invalid);
        }
        let source = source.to_canonical();
        if !rec.networks.is_empty()
            && !rec.networks.iter().filter_map(|n| n.parse::<IpNet>().ok()).any(|n| n.contains(&source))
        {
            return Err(AdminAuthError::Refused);
        }
        let creator = self.mail.store().admin_by_id(rec.creator_id).await?.ok_or(AdminAuthError::Refused)?;
        if !creator.enabled {
            return Err(AdminAuthError::Refused);
        }
        let (held, domains) = self.roles().effective(&creator.roles);
        let granted = PermissionSet::parse_list(&rec.permissions).unwrap_or_default();
        let permissions = PermissionSet::from_iter(granted.iter().filter(|p| held.contains(*p)));
        match self.mail.store().mark_service_token_used(&rec.id, unix_now(), &source.to_string()).await {
            Ok(()) | Err(StoreError::NoSuchUser) => {}
            Err(e) => tracing::warn!(error = %e, token = %rec.id, "service token last use not recorded"),
        }
        Ok(Principal {
            actor: Actor::ServiceToken { id: rec.id.clone() },
            admin_id: None,
            token_id: Some(rec.id),
            permissions,
            domains,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_text_is_split_strictly() {
        assert_eq!(split("p3x_0123456789abcdef_sec_ret"), Some(("0123456789abcdef", "sec_ret")));
        for bad in [
            "",
            "p3x_",
            "p3x_0123456789abcdef",
            "p3x_0123456789abcdef_",
            "p3x_0123456789ABCDEF_x",
            "p3x_0123456789abcde_x",
            "P3X_0123456789abcdef_x",
            "Bearer p3x_0123456789abcdef_x",
        ] {
            assert_eq!(split(bad), None, "{bad}");
        }
        assert_eq!(split(&format!("p3x_0123456789abcdef_{}", "a".repeat(200))), None);
    }
}
