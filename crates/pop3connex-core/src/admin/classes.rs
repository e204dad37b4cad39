//! Account classes: which per-class policy (password age, ...) applies to
//! a user, and what a class name may look like.

use super::{Actor, Admin, AdminError, AuditDetails};
use crate::types::UserName;

/// Checks a class name: letters, digits, `-` and `_`, not empty.
pub fn check_class_name(class: &str) -> Result<(), AdminError> {
    if class.is_empty() || !class.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_') {
        return Err(AdminError::bad_input("class names use letters, digits, - and _"));
    }
    Ok(())
}

impl Admin {
    /// Puts a user in an account class; `None` clears it.
    pub async fn set_class(&self, actor: &Actor, name: &UserName, class: Option<&str>) -> Result<(), AdminError> {
        let before = self.user_value(name, |u| serde_json::json!({ "class": u.class })).await;
        let details = AuditDetails { before, after: Some(serde_json::json!({ "class": class })), ..Default::default() };
        self.audited_with(actor, "user.set_class", name.as_str(), details, async {
            if let Some(c) = class {
                check_class_name(c)?;
            }
            self.mail
                .store()
                .set_class(name, class.map(str::to_owned))
                .await
                .map_err(|e| AdminError::account(e.into(), name))
        })
        .await
    }
}
