//! User accounts: add, change password, list, disable/enable, require
//! modern authentication, delete, unlock, mailbox statistics, and the
//! creation of users from a Dovecot passwd-file.

use super::{Actor, Admin, AdminError, AuditDetails};
use crate::store::UserSummary;
use crate::types::UserName;

/// `mailbox stat`: a user's mailbox at a glance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxStat {
    pub name: UserName,
    pub messages: usize,
    pub octets: u64,
    pub disabled: bool,
}

/// Whether `unlock` lifted a lockout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unlock {
    Unlocked,
    /// There was no lockout on the name.
    NotLocked,
}

/// What `import_passwd` did.
#[derive(Debug, Default)]
pub struct PasswdImport {
    pub added: usize,
    /// Lines not imported, in file order.
    pub skipped: Vec<PasswdSkip>,
}

/// A passwd-file line that was not imported.
#[derive(Debug)]
pub struct PasswdSkip {
    /// 1-based line number.
    pub line: usize,
    /// The name field as written in the file: it comes from the file, so
    /// escape it before showing it on a terminal.
    pub user: String,
    pub error: AdminError,
}

impl Admin {
    /// Creates a user with a password (checked against the password policy).
    pub async fn add_user(&self, actor: &Actor, name: &UserName, password: &[u8]) -> Result<(), AdminError> {
        self.audited(actor, "user.add", name.as_str(), async {
            self.auth().await?.add_user(name, password).await.map_err(|e| AdminError::account(e, name))
        })
        .await
    }

    /// Changes a user's password (checked against the policy and history).
    pub async fn set_password(&self, actor: &Actor, name: &UserName, password: &[u8]) -> Result<(), AdminError> {
        self.audited(actor, "user.passwd", name.as_str(), async {
            self.auth().await?.set_password(name, password).await.map_err(|e| AdminError::account(e, name))
        })
        .await
    }

    /// Every user with message count and size, by name.
    pub async fn list_users(&self, actor: &Actor) -> Result<Vec<UserSummary>, AdminError> {
        self.audited(actor, "user.list", "*", async { Ok(self.mail.store().users().await?) }).await
    }

    /// Refuses (`true`) or allows again (`false`) logins and deliveries.
    pub async fn set_disabled(&self, actor: &Actor, name: &UserName, disabled: bool) -> Result<(), AdminError> {
        let op = if disabled { "user.disable" } else { "user.enable" };
        let before = self.user_value(name, |u| serde_json::json!({ "disabled": u.disabled })).await;
        let details =
            AuditDetails { before, after: Some(serde_json::json!({ "disabled": disabled })), ..Default::default() };
        self.audited_with(actor, op, name.as_str(), details, async {
            self.mail.store().set_disabled(name, disabled).await.map_err(|e| AdminError::account(e.into(), name))
        })
        .await
    }

    /// Refuses (`true`) the account password over PLAIN/USER: SCRAM, OAuth
    /// or app passwords only.
    pub async fn set_require_modern_auth(
        &self,
        actor: &Actor,
        name: &UserName,
        required: bool,
    ) -> Result<(), AdminError> {
        let before =
            self.user_value(name, |u| serde_json::json!({ "require_modern_auth": u.require_modern_auth })).await;
        let after = Some(serde_json::json!({ "require_modern_auth": required }));
        let details = AuditDetails { before, after, ..Default::default() };
        self.audited_with(actor, "user.require_modern_auth", name.as_str(), details, async {
            self.mail
                .store()
                .set_require_modern_auth(name, required)
                .await
                .map_err(|e| AdminError::account(e.into(), name))
        })
        .await
    }

    /// Deletes a user, the mailbox and its key: the mail is unrecoverable,
    /// so it is refused unless `confirmed`.
    pub async fn delete_user(&self, actor: &Actor, name: &UserName, confirmed: bool) -> Result<(), AdminError> {
        self.audited(actor, "user.delete", name.as_str(), async {
            if !confirmed {
                return Err(AdminError::refused(format!(
                    "deleting {name} destroys the mailbox key and all its mail; repeat with --yes"
                )));
            }
            self.mail.store().delete_user(name).await.map_err(|e| AdminError::account(e.into(), name))
        })
        .await
    }

    /// Lifts a lockout after repeated failed logins.
    pub async fn unlock(&self, actor: &Actor, name: &UserName) -> Result<Unlock, AdminError> {
        self.audited(actor, "user.unlock", name.as_str(), async {
            Ok(if self.mail.store().remove_lockout(name.as_str()).await? {
                Unlock::Unlocked
            } else {
                Unlock::NotLocked
            })
        })
        .await
    }

    /// Message count and size of a user's mailbox.
    pub async fn mailbox_stat(&self, actor: &Actor, name: &UserName) -> Result<MailboxStat, AdminError> {
        self.audited(actor, "mailbox.stat", name.as_str(), async {
            let store = self.mail.store();
            let Some(user) = store.user(name).await? else {
                return Err(AdminError::not_found(format!("no such user: {name}")));
            };
            let messages = store.messages(user.mailbox.id).await?;
            Ok(MailboxStat {
                name: name.clone(),
                messages: messages.len(),
                octets: messages.iter().map(|m| m.size).sum(),
                disabled: user.disabled,
            })
        })
        .await
    }

    /// Creates users from a Dovecot passwd-file (`user:{SCHEME}hash:...`,
    /// blank lines and `#` comments ignored). Hashes are kept and upgraded
    /// at each user's next login. A bad line is skipped with its reason;
    /// the others are imported.
    pub async fn import_passwd(&self, actor: &Actor, text: &str) -> Result<PasswdImport, AdminError> {
        self.audited(actor, "user.import_passwd", "passwd-file", async {
            let auth = self.auth().await?;
            let mut report = PasswdImport::default();
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut fields = line.splitn(3, ':');
                let user = fields.next().unwrap_or_default();
                let outcome = match (fields.next(), UserName::parse(user)) {
                    (None, _) => Err(AdminError::bad_input("no ':' in the line (expected user:{SCHEME}hash)")),
                    (Some(_), Err(e)) => Err(AdminError::BadInput(Box::new(e))),
                    (Some(hash), Ok(name)) => match crate::password::check_hash_parameters(hash) {
                        Err(e) => Err(AdminError::bad_input(format!("hash refused: {e}"))),
                        Ok(()) => auth.import_user(&name, hash).await.map_err(|e| AdminError::account(e, &name)),
                    },
                };
                match outcome {
                    Ok(()) => report.added += 1,
                    Err(error) => report.skipped.push(PasswdSkip { line: i + 1, user: user.to_owned(), error }),
                }
            }
            Ok(report)
        })
        .await
    }
}

impl Admin {
    /// A value taken from `name`'s stored record for an audit record's
    /// before/after (`None` when the user does not exist or cannot be read:
    /// the operation then reports that itself).
    pub(crate) async fn user_value(
        &self,
        name: &UserName,
        value: impl FnOnce(&crate::store::UserRecord) -> serde_json::Value,
    ) -> Option<serde_json::Value> {
        self.mail.store().user(name).await.ok().flatten().map(|u| value(&u))
    }
}
