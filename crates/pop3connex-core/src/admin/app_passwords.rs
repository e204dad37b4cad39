//! Per-device app passwords: create (the password is returned once),
//! list (never with the secret), revoke; and the expiry arithmetic.

use zeroize::Zeroizing;

use super::{Actor, Admin, AdminError};
use crate::types::{unix_now, UserName};

const SECONDS_PER_DAY: i64 = 86_400;

/// A newly created app password. `password` is shown once and never again:
/// only a keyed hash is stored.
pub struct NewAppPassword {
    pub id: i64,
    pub password: Zeroizing<String>,
}

impl std::fmt::Debug for NewAppPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewAppPassword").field("id", &self.id).finish_non_exhaustive()
    }
}

/// An app password as listed, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppPasswordEntry {
    pub id: i64,
    pub label: String,
    pub expiry: Expiry,
    /// Seconds since the last login with it; `None`: never used.
    pub last_used_ago: Option<i64>,
}

/// When an app password expires, relative to the listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Never,
    /// Whole days left (0 on its last day).
    InDays(i64),
    Expired,
}

/// The expiry time of an app password created at `now` for `days` days.
pub fn expires_at(now: i64, days: u64) -> i64 {
    now.saturating_add(i64::try_from(days).unwrap_or(i64::MAX).saturating_mul(SECONDS_PER_DAY))
}

/// How an expiry time (`None`: never) looks at `now`.
pub fn expiry_at(expires_at: Option<i64>, now: i64) -> Expiry {
    match expires_at {
        None => Expiry::Never,
        Some(e) if e > now => Expiry::InDays((e - now) / SECONDS_PER_DAY),
        Some(_) => Expiry::Expired,
    }
}

impl Admin {
    /// Creates an app password for `name`, labelled for its device,
    /// optionally expiring after `expires_days` days.
    pub async fn add_app_password(
        &self,
        actor: &Actor,
        name: &UserName,
        label: &str,
        expires_days: Option<u64>,
    ) -> Result<NewAppPassword, AdminError> {
        self.audited(actor, "app_password.add", name.as_str(), async {
            let expires = expires_days.map(|d| expires_at(unix_now(), d));
            let (id, password) = self
                .auth()
                .await?
                .add_app_password(name, label, expires)
                .await
                .map_err(|e| AdminError::account(e, name))?;
            Ok(NewAppPassword { id, password })
        })
        .await
    }

    /// A user's app passwords, without their secrets.
    pub async fn list_app_passwords(
        &self,
        actor: &Actor,
        name: &UserName,
    ) -> Result<Vec<AppPasswordEntry>, AdminError> {
        self.audited(actor, "app_password.list", name.as_str(), async {
            let now = unix_now();
            Ok(self
                .mail
                .store()
                .app_passwords(name)
                .await?
                .into_iter()
                .map(|a| AppPasswordEntry {
                    id: a.id,
                    label: a.label,
                    expiry: expiry_at(a.expires_at, now),
                    last_used_ago: a.last_used_at.map(|t| now - t),
                })
                .collect())
        })
        .await
    }

    /// Revokes app password `id` of `name`.
    pub async fn revoke_app_password(&self, actor: &Actor, name: &UserName, id: i64) -> Result<(), AdminError> {
        self.audited(actor, "app_password.revoke", &format!("{name}/{id}"), async {
            if !self.mail.store().revoke_app_password(name, id).await? {
                return Err(AdminError::not_found(format!("{name} has no app password {id}")));
            }
            Ok(())
        })
        .await
    }
}
