//! Importing existing mail (a Maildir INBOX or an mbox file) into a user's
//! mailbox. The import itself lives in [`crate::import`]; this checks the
//! user and records the operation.

use std::path::Path;

use super::{Actor, Admin, AdminError};
use crate::import::{import_maildir, import_mbox, ImportError, ImportOptions, ImportReport, Progress};
use crate::types::UserName;

/// The source format of an import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    /// A Maildir: its `cur/` and `new/` folders.
    Maildir,
    /// One mbox file.
    Mbox,
}

impl Admin {
    /// Imports `path` into `user`'s mailbox. A resumed or repeated import
    /// skips what is already there. Errors and the report quote names from
    /// the source: escape them for a terminal
    /// ([`crate::import::escape_controls`]).
    pub async fn import(
        &self,
        actor: &Actor,
        user: &UserName,
        format: ImportFormat,
        path: &Path,
        options: ImportOptions,
        progress: Progress<'_>,
    ) -> Result<ImportReport, AdminError> {
        let op = match format {
            ImportFormat::Maildir => "import.maildir",
            ImportFormat::Mbox => "import.mbox",
        };
        self.audited(actor, op, user.as_str(), async {
            let Some(record) = self.mail.store().user(user).await? else {
                return Err(AdminError::not_found(format!("no such user: {user} (add it first)")));
            };
            let report = match format {
                ImportFormat::Maildir => import_maildir(&self.mail, &record, path, options, progress).await,
                ImportFormat::Mbox => import_mbox(&self.mail, &record, path, options, progress).await,
            };
            report.map_err(import_error)
        })
        .await
    }
}

fn import_error(e: ImportError) -> AdminError {
    match e {
        ImportError::Store(_) => AdminError::Storage(Box::new(e)),
        // The path, its type or its content: what the caller pointed at.
        _ => AdminError::BadInput(Box::new(e)),
    }
}
