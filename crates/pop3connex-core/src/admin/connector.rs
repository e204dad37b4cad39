//! Connector accounts: list, show, add, remove, fetch now, status, resync,
//! and the DNS report of a forwarding domain. Fetching itself lives in
//! [`crate::connector`]; this chooses the accounts and records the
//! operations.

use std::path::Path;
use std::sync::Arc;

use super::{Actor, Admin, AdminError, AuditDetails};
use crate::config::connector::AccountConfig;
use crate::connector::engine::{RunError, RunReport};
use crate::store::ConnectorStatus;

/// Where a connector account is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file (removed there, not with the CLI).
    Config,
    /// Added with `connector add` (stored in the store).
    Cli,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Config => "config",
            Origin::Cli => "cli",
        }
    }
}

/// One account of `connector list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSummary {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub origin: Origin,
    pub enabled: bool,
    /// Upstream messages in the seen-list.
    pub seen: usize,
    pub last_error: Option<String>,
}

/// One account of `connector status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountStatus {
    pub name: String,
    /// Default (never run) when the account has no status yet.
    pub status: ConnectorStatus,
    pub seen: usize,
}

/// The outcome of fetching one account.
#[derive(Debug)]
pub struct AccountRun {
    pub account: String,
    pub result: Result<RunReport, RunError>,
}

impl Admin {
    fn origin(&self, name: &str) -> Origin {
        if self.cfg.connector.accounts.iter().any(|c| c.name == name) {
            Origin::Config
        } else {
            Origin::Cli
        }
    }

    async fn connector_account(&self, name: &str) -> Result<AccountConfig, AdminError> {
        self.connector()
            .await?
            .accounts()
            .await?
            .into_iter()
            .find(|a| a.name == name)
            .ok_or_else(|| AdminError::not_found(format!("no connector account `{name}`")))
    }

    /// Accounts (configuration file first, then CLI-added) with their state.
    pub async fn list_connector_accounts(&self, actor: &Actor) -> Result<Vec<AccountSummary>, AdminError> {
        self.audited(actor, "connector.list", "*", async {
            let conn = self.connector().await?;
            let mut out = Vec::new();
            for a in conn.accounts().await? {
                let (status, seen) = conn.status(&a.name).await?;
                out.push(AccountSummary {
                    origin: self.origin(&a.name),
                    host: a.host.clone(),
                    port: a.port(),
                    enabled: a.enabled,
                    seen,
                    last_error: status.and_then(|s| s.last_error),
                    name: a.name,
                });
            }
            Ok(out)
        })
        .await
    }

    /// One account's settings (secret references, never secrets).
    pub async fn show_connector_account(&self, actor: &Actor, name: &str) -> Result<AccountConfig, AdminError> {
        self.audited(actor, "connector.show", name, self.connector_account(name)).await
    }

    /// Adds an account from the TOML text of one account's keys; relative
    /// paths are taken from `base`. `source` names the text in errors (a
    /// file name). Returns the account's name.
    pub async fn add_connector_account(
        &self,
        actor: &Actor,
        source: &str,
        toml: &str,
        base: &Path,
    ) -> Result<String, AdminError> {
        let account = AccountConfig::from_toml(toml);
        let target = account.as_ref().map_or("?", |a| a.name.as_str()).to_owned();
        // The account's settings hold secret references, never secrets.
        let after = account.as_ref().ok().and_then(|a| serde_json::to_value(a).ok());
        let details = AuditDetails { after, ..Default::default() };
        self.audited_with(actor, "connector.add", &target, details, async {
            let mut account = account.map_err(|e| AdminError::bad_input(format!("{source}: {e}")))?;
            let conn = self.connector().await?;
            // The engine repeats these checks; here they decide who is at fault.
            account.resolve_paths(base);
            self.cfg.connector.check_account(&account).map_err(AdminError::bad_input)?;
            if self.origin(&account.name) == Origin::Config {
                return Err(AdminError::refused(format!("`{}` is defined in the configuration file", account.name)));
            }
            let name = account.name.clone();
            conn.add_account(account, base).await.map_err(|e| match e {
                // What is left after the checks above: the name is taken.
                RunError::Config(_) => AdminError::Conflict(Box::new(e)),
                e => e.into(),
            })?;
            Ok(name)
        })
        .await
    }

    /// Removes a CLI-added account and its state.
    pub async fn remove_connector_account(&self, actor: &Actor, name: &str) -> Result<(), AdminError> {
        let before = match self.origin(name) {
            Origin::Config => None,
            Origin::Cli => self.connector_account(name).await.ok().and_then(|a| serde_json::to_value(a).ok()),
        };
        let details = AuditDetails { before, ..Default::default() };
        self.audited_with(actor, "connector.remove", name, details, async {
            let conn = self.connector().await?;
            if self.origin(name) == Origin::Config {
                return Err(AdminError::refused(format!(
                    "`{name}` is defined in the configuration file; remove it there"
                )));
            }
            if !conn.remove_account(name).await? {
                return Err(AdminError::not_found(format!("no CLI-added connector account `{name}`")));
            }
            Ok(())
        })
        .await
    }

    /// Fetches now: every enabled account (`names` empty) or the named
    /// ones, at most `[connector] max_concurrent` at a time. Results come
    /// in account order; a failed fetch is a result, not an error.
    pub async fn run_connector_accounts(&self, actor: &Actor, names: &[String]) -> Result<Vec<AccountRun>, AdminError> {
        let target = if names.is_empty() { "*".to_owned() } else { names.join(",") };
        self.audited(actor, "connector.run_once", &target, async {
            let conn = self.connector().await?;
            let accounts = conn.accounts().await?;
            if let Some(n) = names.iter().find(|n| !accounts.iter().any(|a| &a.name == *n)) {
                return Err(AdminError::not_found(format!("no connector account `{n}`")));
            }
            let slots = Arc::new(tokio::sync::Semaphore::new(self.cfg.connector.max_concurrent as usize));
            let mut runs = tokio::task::JoinSet::new();
            let chosen =
                accounts.into_iter().filter(|a| if names.is_empty() { a.enabled } else { names.contains(&a.name) });
            for (i, a) in chosen.enumerate() {
                let (conn, slots) = (conn.clone(), slots.clone());
                runs.spawn(async move {
                    let _slot = slots.acquire_owned().await;
                    let result = conn.run_account(&a).await;
                    (i, AccountRun { account: a.name, result })
                });
            }
            let mut results = runs.join_all().await;
            results.sort_by_key(|(i, _)| *i);
            Ok(results.into_iter().map(|(_, r)| r).collect())
        })
        .await
    }

    /// Last run, last error and seen-list size of every account, or of `name`.
    pub async fn connector_status(&self, actor: &Actor, name: Option<&str>) -> Result<Vec<AccountStatus>, AdminError> {
        self.audited(actor, "connector.status", name.unwrap_or("*"), async {
            let conn = self.connector().await?;
            let mut out = Vec::new();
            for a in conn.accounts().await?.into_iter().filter(|a| name.is_none_or(|n| n == a.name)) {
                let (status, seen) = conn.status(&a.name).await?;
                out.push(AccountStatus { status: status.unwrap_or_default(), seen, name: a.name });
            }
            Ok(out)
        })
        .await
    }

    /// Marks everything upstream as already fetched, without downloading;
    /// returns how many messages were marked.
    pub async fn resync_connector_account(&self, actor: &Actor, name: &str) -> Result<usize, AdminError> {
        self.audited(actor, "connector.resync", name, async {
            let account = self.connector_account(name).await?;
            Ok(self.connector().await?.resync(&account).await?)
        })
        .await
    }

    /// A domain's MX, DNSSEC status, TLSA records and MTA-STS policy, as text.
    pub async fn dns_check(&self, actor: &Actor, domain: &str) -> Result<String, AdminError> {
        self.audited(actor, "connector.dns_check", domain, async {
            let conn = self.connector().await?;
            Ok(crate::connector::dnscheck::check_domain(conn.resolver(), conn.mta_sts(), domain).await)
        })
        .await
    }
}
