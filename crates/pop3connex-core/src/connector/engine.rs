//! One account run, the scheduler, resync and account management.
//!
//! Ordering that makes the connector lossless:
//! 1. RETR into memory (bounded by `max_message_size`), never partially used.
//! 2. Local targets: the sealed messages, their duplicate keys and the UIDL
//!    are committed in ONE store transaction (fsync'ed). A crash before the
//!    commit re-fetches the message; after it, the UIDL says "done".
//! 3. Forward targets: the UIDL is committed only after the downstream
//!    answered 250 for every recipient; a crash in between forwards the
//!    message again, at most once more (SMTP has no idempotency; documented).
//! 4. DELE is sent only for UIDLs whose commit returned, and upstream applies
//!    it only at QUIT; a crash before QUIT leaves the copy upstream and the
//!    next run deletes it (it is in the seen-list).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Semaphore};
use zeroize::Zeroizing;

use super::oauth2::{OAuth2Error, RefreshTokenStore, TokenSource};
use super::route::{self, Decision, Destination};
use super::smtp::{self, Envelope, RcptOutcome, SmtpError};
use super::upstream::{Credential, Session, UpstreamError};
use super::{dns, mtasts, tlsclient};
use crate::config::connector::{AccountConfig, DeletePolicy, OversizePolicy, Target, UpstreamAuth};
use crate::config::Config;
use crate::events::{emit_connector, ConnectorEvent};
use crate::mailstore::MailStore;
use crate::store::{ConnectorCommit, ConnectorStatus, FencingToken, SeenState, StoreError};
use crate::types::{unix_now, UserName};

/// Counters of one run, printed by `connector run-once`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    pub account: String,
    pub fetched: u64,
    pub delivered: u64,
    pub forwarded: u64,
    pub duplicates: u64,
    pub quarantined: u64,
    pub deleted: u64,
    pub skipped: u64,
    pub deferred: u64,
    pub octets: u64,
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "account={} fetched={} delivered={} forwarded={} duplicates={} quarantined={} deleted={} skipped={} \
             deferred={} octets={}",
            self.account,
            self.fetched,
            self.delivered,
            self.forwarded,
            self.duplicates,
            self.quarantined,
            self.deleted,
            self.skipped,
            self.deferred,
            self.octets
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("OAuth 2.0: {0}")]
    OAuth(#[from] OAuth2Error),
    #[error("store: {0}")]
    Store(String),
    #[error("{0}")]
    Config(String),
    #[error("another run of this account is in progress")]
    Locked,
    #[error("downstream: {0}")]
    Downstream(String),
}

impl RunError {
    pub fn kind(&self) -> &'static str {
        match self {
            RunError::Upstream(e) => e.kind(),
            RunError::OAuth(_) => "oauth",
            RunError::Store(_) => "store",
            RunError::Config(_) => "config",
            RunError::Locked => "locked",
            RunError::Downstream(_) => "downstream",
        }
    }
}

impl From<StoreError> for RunError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Locked => RunError::Locked,
            e => RunError::Store(e.to_string()),
        }
    }
}

impl From<crate::crypto::CryptoError> for RunError {
    fn from(e: crate::crypto::CryptoError) -> Self {
        RunError::Store(e.to_string())
    }
}

impl From<crate::mailstore::MailStoreError> for RunError {
    fn from(e: crate::mailstore::MailStoreError) -> Self {
        RunError::Store(e.to_string())
    }
}

/// The connector service: shared by the scheduler and the CLI.
pub struct Connector {
    cfg: Arc<Config>,
    mail: Arc<MailStore>,
    resolver: dns::Resolver,
    sts: mtasts::PolicyCache,
    tokens: std::sync::Mutex<HashMap<String, Arc<TokenSource>>>,
    clock: Clock,
}

/// Unix time source (replaceable so tests can age the seen-list).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

impl Connector {
    /// Uses `clock` instead of the system time for delete-after-days,
    /// first-seen times and duplicate expiry.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }

    pub fn new(cfg: Arc<Config>, mail: Arc<MailStore>) -> Result<Self, RunError> {
        let resolver = dns::Resolver::new(&cfg.connector.dns).map_err(|e| RunError::Config(e.to_string()))?;
        let sts = mtasts::PolicyCache::new(&cfg.connector.dns);
        Ok(Self { cfg, mail, resolver, sts, tokens: Default::default(), clock: Arc::new(unix_now) })
    }

    pub fn resolver(&self) -> &dns::Resolver {
        &self.resolver
    }

    pub fn mta_sts(&self) -> &mtasts::PolicyCache {
        &self.sts
    }

    /// Accounts from the configuration file, then those added with the CLI.
    pub async fn accounts(&self) -> Result<Vec<AccountConfig>, RunError> {
        let mut out = self.cfg.connector.accounts.clone();
        for (name, spec) in self.mail.store().connector_accounts().await? {
            match AccountConfig::from_toml(&spec) {
                Ok(a) if !out.iter().any(|c| c.name == a.name) => out.push(a),
                Ok(_) => tracing::warn!(account = %name, "stored connector account shadowed by the config file"),
                Err(e) => tracing::error!(account = %name, error = %e, "stored connector account is invalid"),
            }
        }
        Ok(out)
    }

    pub async fn account(&self, name: &str) -> Result<AccountConfig, RunError> {
        self.accounts()
            .await?
            .into_iter()
            .find(|a| a.name == name)
            .ok_or_else(|| RunError::Config(format!("no connector account `{name}`")))
    }

    /// Adds a CLI account after the same checks as config accounts.
    pub async fn add_account(&self, mut account: AccountConfig, base: &std::path::Path) -> Result<(), RunError> {
        account.resolve_paths(base);
        self.cfg.connector.check_account(&account).map_err(RunError::Config)?;
        if self.cfg.connector.accounts.iter().any(|a| a.name == account.name) {
            return Err(RunError::Config(format!("`{}` is defined in the configuration file", account.name)));
        }
        match self.mail.store().add_connector_account(&account.name, &account.to_toml()).await {
            Err(StoreError::UserExists) => Err(RunError::Config(format!("`{}` already exists", account.name))),
            r => Ok(r?),
        }
    }

    pub async fn remove_account(&self, name: &str) -> Result<bool, RunError> {
        if self.cfg.connector.accounts.iter().any(|a| a.name == name) {
            return Err(RunError::Config(format!("`{name}` is defined in the configuration file; remove it there")));
        }
        Ok(self.mail.store().remove_connector_account(name).await?)
    }

    /// Runs one account once: takes its lock, fetches, records the status.
    pub async fn run_account(&self, account: &AccountConfig) -> Result<RunReport, RunError> {
        let store = self.mail.store().clone();
        let lease = store.lock_connector(&account.name).await?;
        let fence = lease.token();
        let started = self.now();
        let result = self.fetch(account, fence).await;
        let mut status = store
            .connector_status(&account.name)
            .await?
            .unwrap_or(ConnectorStatus { account: account.name.clone(), ..Default::default() });
        status.last_run_at = Some(started);
        match &result {
            Ok(r) => {
                status.last_success_at = Some(started);
                status.last_error = None;
                status.failures = 0;
                status.fetched_total += r.fetched;
            }
            Err(e) => {
                status.last_error = Some(format!("{}: {e}", e.kind()));
                status.failures = status.failures.saturating_add(1);
                if let RunError::Upstream(_) | RunError::OAuth(_) = e {
                    let detail = e.to_string();
                    self.event(ConnectorEvent::ConnectorUpstreamError {
                        account: &account.name,
                        kind: e.kind(),
                        detail: &detail,
                    });
                }
            }
        }
        store.put_connector_status(status, fence).await?;
        // Keys are only added by runs that fetched something; an idle run
        // (the common case) costs no extra write.
        if matches!(&result, Ok(r) if r.fetched > 0) {
            let days = self.cfg.connector.dedup_days as i64;
            store.dedup_prune(self.now() - days * 86_400).await?;
        }
        result
    }

    /// Marks everything upstream as already fetched, without downloading.
    pub async fn resync(&self, account: &AccountConfig) -> Result<usize, RunError> {
        let store = self.mail.store().clone();
        let lease = store.lock_connector(&account.name).await?;
        let mut session = self.login(account).await?;
        let uidls: Vec<String> = session.uidl_all().await?.into_iter().map(|(_, u)| u).collect();
        session.quit().await?;
        let n = uidls.len();
        store.connector_resync(&account.name, uidls, lease.token()).await?;
        Ok(n)
    }

    pub async fn status(&self, account: &str) -> Result<(Option<ConnectorStatus>, usize), RunError> {
        let store = self.mail.store();
        Ok((store.connector_status(account).await?, store.connector_seen(account).await?.len()))
    }

    fn event(&self, e: ConnectorEvent<'_>) {
        emit_connector(&e);
        if e.alert() && !self.cfg.connector.alert_command.is_empty() {
            if let Ok(json) = serde_json::to_vec(&e) {
                run_alert_hook(self.cfg.connector.alert_command.clone(), json);
            }
        }
    }

    async fn token_source(&self, account: &AccountConfig) -> Result<Option<Arc<TokenSource>>, RunError> {
        let Some(o) = &account.oauth2 else { return Ok(None) };
        let mut tokens = self.tokens.lock().map_err(|_| RunError::Config("token cache poisoned".into()))?;
        if let Some(t) = tokens.get(&account.name) {
            return Ok(Some(t.clone()));
        }
        let store = Arc::new(SealedTokens { mail: self.mail.clone() });
        let t = Arc::new(TokenSource::new(&account.name, o, store)?);
        tokens.insert(account.name.clone(), t.clone());
        Ok(Some(t))
    }

    async fn login(&self, account: &AccountConfig) -> Result<Session, RunError> {
        let roots = tlsclient::root_store(account.ca_file.as_deref()).map_err(|e| RunError::Config(e.to_string()))?;
        let tls = tlsclient::client_config(roots, &account.spki_pins, &[b"pop3"])
            .map_err(|e| RunError::Config(e.to_string()))?;
        let tls = Arc::new(tls);
        let tokens = self.token_source(account).await?;
        let use_oauth = tokens.is_some()
            && matches!(account.auth, UpstreamAuth::Auto | UpstreamAuth::Xoauth2 | UpstreamAuth::Oauthbearer);
        let cred = match (&tokens, use_oauth) {
            (Some(t), true) => Credential::AccessToken(t.access_token().await?),
            _ => {
                let r = account.password.as_ref().ok_or_else(|| RunError::Config("no password configured".into()))?;
                let raw = r.load().map_err(|e| RunError::Config(e.to_string()))?;
                let s = std::str::from_utf8(&raw).map_err(|_| RunError::Config(format!("{r} is not UTF-8")))?;
                Credential::Password(Zeroizing::new(s.trim_end_matches(['\r', '\n']).to_owned()))
            }
        };
        let mut session = Session::connect(account, tls).await?;
        match session.login(account, &cred).await {
            Ok(mechanism) => {
                tracing::debug!(account = %account.name, mechanism, "logged in upstream");
                Ok(session)
            }
            Err(e) => {
                if let (Some(t), UpstreamError::Auth(_)) = (&tokens, &e) {
                    t.invalidate();
                }
                Err(e.into())
            }
        }
    }

    async fn fetch(&self, account: &AccountConfig, fence: FencingToken) -> Result<RunReport, RunError> {
        let store = self.mail.store().clone();
        let mut report = RunReport { account: account.name.clone(), ..Default::default() };
        let mut session = self.login(account).await?;
        let listing = session.uidl_all().await?;
        let sizes: HashMap<u32, u64> = session.list_all().await?.into_iter().collect();
        let seen: HashMap<String, (i64, SeenState)> =
            store.connector_seen(&account.name).await?.into_iter().map(|s| (s.uidl, (s.first_seen, s.state))).collect();
        let on_server: HashSet<&str> = listing.iter().map(|(_, u)| u.as_str()).collect();
        let vanished: Vec<String> = seen.keys().filter(|u| !on_server.contains(u.as_str())).cloned().collect();
        store.connector_forget(&account.name, vanished, fence).await?;

        let now = self.now();
        let mut to_delete: Vec<(u32, String)> = Vec::new();
        for (n, uidl) in &listing {
            if let Some((first_seen, state)) = seen.get(uidl) {
                let due = match account.delete {
                    DeletePolicy::Never => false,
                    DeletePolicy::AfterDelivery => *state == SeenState::Delivered,
                    DeletePolicy::AfterDays => {
                        let days = account.delete_after_days.unwrap_or(u64::MAX / 86_400 - 1) as i64;
                        *state == SeenState::Delivered && now - first_seen >= days * 86_400
                    }
                };
                if due {
                    to_delete.push((*n, uidl.clone()));
                }
            }
        }

        let mut bytes = 0u64;
        let mut fetched = 0u64;
        let mut deferred_downstream = false;
        // Fixed-host downstreams that failed as a whole during this run: not
        // contacted again until the next run (a dead server would otherwise
        // cost a connect timeout per message).
        let mut down: HashSet<String> = HashSet::new();
        for (n, uidl) in listing.iter().filter(|(_, u)| !seen.contains_key(u)) {
            let size = sizes.get(n).copied().unwrap_or(0);
            if size > account.max_message_size {
                let action = if account.oversize == OversizePolicy::Delete { "deleted" } else { "left upstream" };
                self.event(ConnectorEvent::ConnectorOversize {
                    account: &account.name,
                    uidl,
                    size,
                    limit: account.max_message_size,
                    action,
                });
                store.connector_commit(self.oversize(account, uidl), fence).await?;
                report.skipped += 1;
                if account.oversize == OversizePolicy::Delete {
                    to_delete.push((*n, uidl.clone()));
                }
                continue;
            }
            // The first message of a run is always allowed, so one message
            // larger than max_bytes_per_run cannot stall the account.
            if fetched >= account.max_messages_per_run || (fetched > 0 && bytes + size > account.max_bytes_per_run) {
                tracing::info!(account = %account.name, "per-run limit reached; the rest waits for the next run");
                break;
            }
            let body = match session.retr(*n, account.max_message_size).await {
                Ok(b) => b,
                Err(e @ UpstreamError::TooLarge { .. }) => {
                    // LIST understated the size: remember the message as
                    // oversize (left upstream) and fail the run, since the
                    // session had to be abandoned mid-RETR.
                    self.event(ConnectorEvent::ConnectorOversize {
                        account: &account.name,
                        uidl,
                        size: account.max_message_size + 1,
                        limit: account.max_message_size,
                        action: "left upstream",
                    });
                    store.connector_commit(self.oversize(account, uidl), fence).await?;
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            };
            fetched += 1;
            bytes += body.len() as u64;
            report.fetched += 1;
            report.octets += body.len() as u64;
            match self.process(account, uidl, &body, &mut report, &mut down, fence).await? {
                Processed::Done => {
                    if account.delete == DeletePolicy::AfterDelivery {
                        to_delete.push((*n, uidl.clone()));
                    }
                }
                Processed::Deferred => deferred_downstream = true,
            }
            // With a fixed forward target whose server is unreachable, every
            // further message would be downloaded only to be deferred.
            if let Some(Target::Forward { via, .. }) = &account.route.deliver_to {
                if down.contains(via) {
                    tracing::info!(account = %account.name, downstream = %via, "downstream unavailable; run ends early");
                    break;
                }
            }
        }

        for (n, _) in &to_delete {
            session.dele(*n).await?;
        }
        session.quit().await?;
        if !to_delete.is_empty() {
            report.deleted = to_delete.len() as u64;
            self.event(ConnectorEvent::ConnectorDeleted { account: &account.name, count: to_delete.len() });
            store.connector_forget(&account.name, to_delete.into_iter().map(|(_, u)| u).collect(), fence).await?;
        }
        if deferred_downstream {
            return Err(RunError::Downstream(format!(
                "{} message(s) deferred by a downstream server",
                report.deferred
            )));
        }
        Ok(report)
    }

    /// Records a message that is not fetched because of its size.
    fn oversize(&self, account: &AccountConfig, uidl: &str) -> ConnectorCommit {
        ConnectorCommit {
            at: self.now(),
            account: account.name.clone(),
            uidl: Some(uidl.to_owned()),
            state: SeenState::Oversize,
            deliveries: Vec::new(),
            keys: Vec::new(),
        }
    }

    /// Routes and delivers one fetched message.
    async fn process(
        &self,
        account: &AccountConfig,
        uidl: &str,
        body: &[u8],
        report: &mut RunReport,
        down: &mut HashSet<String>,
        fence: FencingToken,
    ) -> Result<Processed, RunError> {
        let cfg = &self.cfg.connector;
        let msg = route::inspect(body, account.route.envelope_header);
        let mut commit = ConnectorCommit {
            at: self.now(),
            account: account.name.clone(),
            uidl: Some(uidl.to_owned()),
            state: SeenState::Delivered,
            deliveries: Vec::new(),
            keys: Vec::new(),
        };
        let mut quarantine: Vec<String> = Vec::new();
        let mut outcome = "delivered";
        let destinations = match route::route(&account.route, &msg, cfg.max_hops as usize) {
            Decision::Deliver(d) => d,
            Decision::Quarantine(reason) => {
                if msg.hops > cfg.max_hops as usize {
                    self.event(ConnectorEvent::ConnectorLoop { account: &account.name, uidl, hops: msg.hops });
                }
                quarantine.push(reason);
                Vec::new()
            }
        };
        let keys: Vec<_> = destinations.iter().map(|d| route::dedup_key(&msg, d)).collect();
        let known: HashSet<_> = self.mail.store().dedup_known(keys.clone()).await?.into_iter().collect();

        let mut forwards: HashMap<&str, Vec<(String, crate::store::DedupKey)>> = HashMap::new();
        for (dest, key) in destinations.iter().zip(keys) {
            if known.contains(&key) {
                report.duplicates += 1;
                self.event(ConnectorEvent::ConnectorDuplicate {
                    account: &account.name,
                    uidl,
                    recipient: &dest.recipient(),
                });
                continue;
            }
            match dest {
                Destination::Local { user } => match self.local_user(user).await? {
                    Some(rec) => {
                        commit.deliveries.push((Some(key), self.mail.seal(&rec, body, None)?));
                        report.delivered += 1;
                    }
                    None => quarantine.push(format!("no local user `{user}`")),
                },
                Destination::Forward { address, via } => {
                    forwards.entry(via.as_str()).or_default().push((address.clone(), key));
                }
            }
        }

        let mut deferred = false;
        for (via, rcpts) in forwards {
            let ds = cfg
                .downstreams
                .iter()
                .find(|d| d.name == via)
                .ok_or_else(|| RunError::Config(format!("no downstream `{via}`")))?;
            let envelope = Envelope {
                mail_from: msg.return_path.clone().unwrap_or_default(),
                recipients: rcpts.iter().map(|(a, _)| a.clone()).collect(),
            };
            let helo = ds.helo.clone().unwrap_or_else(|| self.cfg.server.hostname.clone());
            let with_trace = self.trace_header(account, &envelope.recipients, body);
            let outcomes = if down.contains(via) {
                vec![RcptOutcome::Temporary(format!("{via} was unavailable earlier in this run")); rcpts.len()]
            } else {
                match smtp::deliver(ds, &helo, &self.resolver, &self.sts, &envelope, &with_trace).await {
                    Ok(o) => o,
                    Err(SmtpError::Temporary(d)) => {
                        if ds.host.is_some() {
                            down.insert(via.to_owned());
                        }
                        vec![RcptOutcome::Temporary(d); rcpts.len()]
                    }
                    Err(SmtpError::Permanent(d)) => vec![RcptOutcome::Permanent(d); rcpts.len()],
                }
            };
            for ((address, key), o) in rcpts.iter().zip(outcomes) {
                match o {
                    RcptOutcome::Accepted => {
                        commit.keys.push(*key);
                        report.forwarded += 1;
                    }
                    RcptOutcome::Temporary(detail) => {
                        deferred = true;
                        report.deferred += 1;
                        self.event(ConnectorEvent::ConnectorDeferred {
                            account: &account.name,
                            uidl,
                            recipient: address,
                            detail: &detail,
                        });
                    }
                    RcptOutcome::Permanent(detail) => {
                        self.event(ConnectorEvent::ConnectorRefused {
                            account: &account.name,
                            uidl,
                            recipient: address,
                            detail: &detail,
                        });
                        quarantine.push(format!("{address} refused by {via}: {detail}"));
                    }
                }
            }
        }

        if !quarantine.is_empty() {
            let reason = quarantine.join("; ");
            let qname = &cfg.quarantine_user;
            let rec = self.local_user(qname).await?.ok_or_else(|| {
                RunError::Config(format!(
                    "quarantine user `{qname}` does not exist (create it with `pop3connex user add {qname}`); \
                     the message stays upstream"
                ))
            })?;
            let header = format!("X-POP3conneX-Quarantine: {}; account={}\r\n", one_line(&reason), account.name);
            let quarantined = [header.as_bytes(), body].concat();
            commit.deliveries.push((None, self.mail.seal(&rec, &quarantined, None)?));
            report.quarantined += 1;
            outcome = "quarantined";
            self.event(ConnectorEvent::ConnectorQuarantined { account: &account.name, uidl, reason: &reason });
        }
        if deferred {
            // Keep what was delivered (its keys make the retry skip those
            // recipients) but not the UIDL: the message is fetched again.
            commit.uidl = None;
            outcome = "deferred";
        }
        self.mail.store().connector_commit(commit, fence).await?;
        self.event(ConnectorEvent::ConnectorFetched { account: &account.name, uidl, size: body.len() as u64, outcome });
        Ok(if deferred { Processed::Deferred } else { Processed::Done })
    }

    async fn local_user(&self, name: &str) -> Result<Option<crate::store::UserRecord>, RunError> {
        let Ok(name) = UserName::parse(name) else { return Ok(None) };
        Ok(self.mail.store().user(&name).await?)
    }

    /// The message with our trace header in front (RFC 5321 section 4.4).
    fn trace_header(&self, account: &AccountConfig, rcpts: &[String], body: &[u8]) -> Vec<u8> {
        let date =
            time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc2822).unwrap_or_default();
        let rcpt = if rcpts.len() == 1 { format!(" for <{}>", rcpts[0]) } else { String::new() };
        // RFC 8314 section 7.3 registers POP3S for POP3 over TLS, either way.
        let line = format!(
            "Received: from {} by {} (POP3conneX connector) with POP3S{};\r\n\t{}\r\n",
            one_line(&account.host),
            one_line(&self.cfg.server.hostname),
            rcpt,
            date
        );
        [line.as_bytes(), body].concat()
    }

    /// Runs every account on its schedule until `shutdown` turns true.
    /// Each account runs at most once at a time, at most `max_concurrent`
    /// run together, and every run has its own deadline, so a slow or dead
    /// upstream only delays itself. Failed runs back off exponentially.
    pub async fn run_scheduler(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let cfg = &self.cfg.connector;
        let slots = Arc::new(Semaphore::new(cfg.max_concurrent as usize));
        // account -> when it is due; `None` while it runs.
        let next: Arc<std::sync::Mutex<HashMap<String, Option<tokio::time::Instant>>>> = Default::default();
        loop {
            let accounts = match self.accounts().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(error = %e, "cannot list connector accounts");
                    Vec::new()
                }
            };
            let now = tokio::time::Instant::now();
            for a in accounts.into_iter().filter(|a| a.enabled) {
                {
                    let Ok(mut next) = next.lock() else { return };
                    let due = next
                        .entry(a.name.clone())
                        .or_insert_with(|| Some(now + jitter(a.interval_secs, cfg.jitter_percent)));
                    match due {
                        Some(at) if *at <= now => *due = None,
                        _ => continue,
                    }
                }
                let (this, slots, next) = (self.clone(), slots.clone(), next.clone());
                tokio::spawn(async move {
                    let Ok(_slot) = slots.acquire_owned().await else { return };
                    let limit = Duration::from_secs(a.timeout_secs * 20 + a.max_bytes_per_run / 65_536);
                    let ok = match tokio::time::timeout(limit, this.run_account(&a)).await {
                        Ok(Ok(r)) => {
                            tracing::info!(account = %a.name, report = %r, "connector run finished");
                            true
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(account = %a.name, kind = e.kind(), error = %e, "connector run failed");
                            false
                        }
                        Err(_) => {
                            tracing::warn!(account = %a.name, "connector run exceeded its deadline");
                            false
                        }
                    };
                    let c = &this.cfg.connector;
                    let wait = if ok {
                        a.interval_secs + jitter(a.interval_secs, c.jitter_percent).as_secs()
                    } else {
                        let failures = this.status(&a.name).await.ok().and_then(|(s, _)| s).map_or(1, |s| s.failures);
                        backoff(c.retry_base_secs, c.retry_max_secs, failures)
                    };
                    if let Ok(mut next) = next.lock() {
                        next.insert(a.name.clone(), Some(tokio::time::Instant::now() + Duration::from_secs(wait)));
                    }
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}

/// Retry delay after `failures` consecutive failures: base, 2×base, ... max.
fn backoff(base: u64, max: u64, failures: u32) -> u64 {
    let shift = failures.clamp(1, 16) - 1;
    base.saturating_mul(1 << shift).min(max)
}

enum Processed {
    Done,
    Deferred,
}

fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(900).collect()
}

fn jitter(interval: u64, percent: u64) -> Duration {
    let spread = interval * percent / 100;
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    let r = if spread == 0 { 0 } else { u64::from_le_bytes(b) % (spread + 1) };
    Duration::from_secs(r.max(1))
}

/// Runs the alert hook with the event on stdin; never blocks the caller.
fn run_alert_hook(command: Vec<String>, json: Vec<u8>) {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let Some((prog, args)) = command.split_first() else { return };
        let child = tokio::process::Command::new(prog)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        match child {
            Ok(mut c) => {
                if let Some(mut stdin) = c.stdin.take() {
                    let _ = stdin.write_all(&json).await;
                    let _ = stdin.write_all(b"\n").await;
                }
                match tokio::time::timeout(Duration::from_secs(30), c.wait()).await {
                    Ok(Ok(s)) if s.success() => {}
                    Ok(Ok(s)) => tracing::warn!(status = %s, "alert hook failed"),
                    _ => tracing::warn!("alert hook did not finish"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot run alert hook"),
        }
    });
}

/// Rotated refresh tokens, sealed by the store's [`crate::crypto::TokenSealer`]
/// (a key derived from the master key, bound to the account name).
struct SealedTokens {
    mail: Arc<MailStore>,
}

const TOKEN_KIND: &str = "oauth2-refresh-token";

#[async_trait]
impl RefreshTokenStore for SealedTokens {
    async fn load(&self, account: &str) -> Option<Zeroizing<String>> {
        let sealed = self.mail.store().connector_secret(account, TOKEN_KIND).await.ok()??;
        let mut plain = self.mail.token_sealer().open(account, TOKEN_KIND, &sealed).ok()?;
        String::from_utf8(std::mem::take(&mut *plain)).ok().map(Zeroizing::new)
    }

    async fn save(&self, account: &str, token: Zeroizing<String>) -> Result<(), String> {
        let sealed = self.mail.token_sealer().seal(account, TOKEN_KIND, token.as_bytes());
        self.mail.store().put_connector_secret(account, TOKEN_KIND, sealed).await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        assert_eq!(backoff(60, 3600, 1), 60);
        assert_eq!(backoff(60, 3600, 2), 120);
        assert_eq!(backoff(60, 3600, 4), 480);
        assert_eq!(backoff(60, 3600, 30), 3600);
    }

    #[test]
    fn report_line_is_stable() {
        let r = RunReport { account: "isp".into(), fetched: 2, octets: 10, ..Default::default() };
        assert_eq!(
            r.to_string(),
            "account=isp fetched=2 delivered=0 forwarded=0 duplicates=0 quarantined=0 deleted=0 skipped=0 deferred=0 \
             octets=10"
                .replace("  ", " ")
        );
    }
}
