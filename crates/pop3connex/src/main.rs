//! `pop3connex`: the command-line front end. Parses arguments, loads the
//! configuration and calls into `pop3connex-core`; no protocol or storage
//! logic lives here.
#![forbid(unsafe_code)]

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use pop3connex_core::auth::{AccountError, Authenticator};
use pop3connex_core::config::{Config, LogConfig, LogFormat, EXAMPLE};
use pop3connex_core::import::{escape_controls, import_maildir, import_mbox, ImportOptions};
use pop3connex_core::init::{init_data_dir, CONFIG_FILE};
use pop3connex_core::mailstore::MailStore;
use pop3connex_core::password;
use pop3connex_core::server;
use pop3connex_core::types::UserName;
use zeroize::Zeroizing;

/// jemalloc instead of glibc malloc: glibc keeps freed memory of a load
/// spike in its arenas (RSS stayed at 8x the idle figure after a burst of
/// sessions), jemalloc's background threads return it to the kernel within
/// seconds. Measurements: docs/BENCHMARKS.md, "Memory after load".
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Default data directory of the embedded setup.
const DEFAULT_DATA_DIR: &str = "pop3connex-data";

#[derive(Parser)]
#[command(name = "pop3connex", version, about = "Security-hardened POP3 server and POP3 connector")]
struct Cli {
    /// Configuration file [default: ./pop3connex-data/pop3connex.toml]
    #[arg(long, global = true, env = "POP3CONNEX_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a data directory: config, local CA and certificate, master key, database.
    Init {
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Host name for the certificate and the LMTP greeting.
        #[arg(long, default_value = "localhost")]
        hostname: String,
    },
    /// Run the POP3 and LMTP listeners (creates ./pop3connex-data on first run without --config).
    Serve,
    /// Check or print the configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Manage users.
    #[command(subcommand)]
    User(UserCmd),
    /// Import existing mail.
    #[command(subcommand)]
    Import(ImportCmd),
    /// Inspect mailboxes.
    #[command(subcommand)]
    Mailbox(MailboxCmd),
    /// Manage address bans (shared with running servers through the store).
    #[command(subcommand)]
    Ban(BanCmd),
    /// Fetch mail from upstream POP3 mailboxes (accounts, runs, state).
    #[command(subcommand)]
    Connector(ConnectorCmd),
}

#[derive(Subcommand)]
enum ConnectorCmd {
    /// List accounts (configuration file and CLI-added) with their state.
    List,
    /// Show one account's settings (secret references, never secrets).
    Show { name: String },
    /// Add an account from a TOML file holding one account's keys.
    Add {
        #[arg(long)]
        file: PathBuf,
    },
    /// Remove a CLI-added account and its state.
    Remove { name: String },
    /// Fetch now: every enabled account, or the named ones.
    RunOnce { names: Vec<String> },
    /// Last run, last error and seen-list size.
    Status { name: Option<String> },
    /// Mark everything upstream as already fetched, without downloading.
    Resync { name: String },
    /// Report a domain's MX, DNSSEC status, TLSA records and MTA-STS policy.
    DnsCheck { domain: String },
}

#[derive(Subcommand)]
enum BanCmd {
    /// List active bans.
    List,
    /// Ban an address or network (CIDR).
    Add {
        network: String,
        /// Why (shown in `ban list` and logs).
        #[arg(long, default_value = "manual")]
        reason: String,
        /// Seconds; without it the ban lasts until removed.
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Remove a ban (takes effect in running servers within 15 seconds).
    Remove { network: String },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Parse and validate the configuration, load its secrets and certificate.
    Check,
    /// Print a commented example with every key.
    Example,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user (password from a prompt or --password-stdin).
    Add {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users with their message counts.
    List,
    /// Change a user's password.
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Refuse logins and deliveries for a user.
    Disable { name: String },
    /// Undo `disable`.
    Enable { name: String },
    /// Lift a lockout after repeated failed logins.
    Unlock { name: String },
    /// Create users from a Dovecot passwd-file (`user:{SCHEME}hash:...`);
    /// hashes are kept and upgraded at each user's next login.
    ImportPasswd { file: PathBuf },
    /// Per-device POP3 passwords (shown once, revocable, optional expiry).
    #[command(subcommand)]
    AppPassword(AppPasswordCmd),
    /// Put a user in an account class (per-class password policy); "-" clears it.
    SetClass { name: String, class: String },
    /// Require SCRAM, OAuth or app passwords (refuse the account password over PLAIN/USER).
    RequireModernAuth {
        name: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Delete a user, the mailbox and its key: the mail is unrecoverable.
    Delete {
        name: String,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum AppPasswordCmd {
    /// Create one; the password is printed once and never again.
    Add {
        name: String,
        /// What it is for, e.g. "Thunderbird on laptop".
        label: String,
        #[arg(long)]
        expires_days: Option<u64>,
    },
    List {
        name: String,
    },
    Revoke {
        name: String,
        id: i64,
    },
}

#[derive(Subcommand)]
enum ImportCmd {
    /// Import the INBOX of a Maildir (cur/ and new/); links below it are never followed.
    Maildir {
        user: String,
        path: PathBuf,
        /// Accept PATH itself being a symbolic link (never links below it).
        #[arg(long)]
        follow_symlinks: bool,
    },
    /// Import an mbox file.
    Mbox {
        user: String,
        path: PathBuf,
        /// Accept PATH being a symbolic link (refused otherwise).
        #[arg(long)]
        follow_symlinks: bool,
    },
}

#[derive(Subcommand)]
enum MailboxCmd {
    /// Message count and size of a user's mailbox.
    Stat { name: String },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

fn default_config() -> PathBuf {
    Path::new(DEFAULT_DATA_DIR).join(CONFIG_FILE)
}

fn load(cli_config: &Option<PathBuf>) -> Result<Config> {
    let path = cli_config.clone().unwrap_or_else(default_config);
    if cli_config.is_none() && !path.exists() {
        bail!(
            "no configuration at {}: run `pop3connex init` or `pop3connex serve` first, or pass --config",
            path.display()
        );
    }
    Ok(Config::load(&path)?)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Init { data_dir, hostname } => {
            init_logging(&LogConfig::default(), "warn");
            init(&data_dir, &hostname)
        }
        Cmd::Serve => serve(cli.config),
        Cmd::Config(ConfigCmd::Example) => {
            print!("{EXAMPLE}");
            Ok(())
        }
        Cmd::Config(ConfigCmd::Check) => {
            init_logging(&LogConfig::default(), "warn");
            let cfg = load(&cli.config)?;
            cfg.store.master_key.load().context("store.master_key")?;
            pop3connex_core::tls::TlsAcceptor::load(&cfg.tls).context("tls")?;
            println!("{}: OK", cfg.source.display());
            Ok(())
        }
        Cmd::User(cmd) => {
            init_logging(&LogConfig::default(), "warn");
            let cfg = load(&cli.config)?;
            runtime()?.block_on(user(cfg, cmd))
        }
        Cmd::Import(cmd) => {
            init_logging(&LogConfig::default(), "warn");
            let cfg = load(&cli.config)?;
            runtime()?.block_on(import(cfg, cmd))
        }
        Cmd::Ban(cmd) => {
            init_logging(&LogConfig::default(), "warn");
            let cfg = load(&cli.config)?;
            runtime()?.block_on(ban(cfg, cmd))
        }
        Cmd::Connector(cmd) => {
            let cfg = load(&cli.config)?;
            // hickory logs whole DNS messages at warn on validation failures;
            // the connector reports those itself.
            init_logging(
                &cfg.log,
                "warn,pop3connex::connector=info,hickory_net=error,hickory_resolver=error,hickory_proto=error",
            );
            runtime()?.block_on(connector(cfg, cmd))
        }
        Cmd::Mailbox(MailboxCmd::Stat { name }) => {
            init_logging(&LogConfig::default(), "warn");
            let cfg = load(&cli.config)?;
            runtime()?.block_on(async {
                let name = UserName::parse(&name)?;
                let mail = MailStore::open(&cfg).await?;
                let Some(user) = mail.store().user(&name).await? else { bail!("no such user: {name}") };
                let messages = mail.store().messages(user.mailbox.id).await?;
                println!("user: {name}");
                println!("messages: {}", messages.len());
                println!("octets: {}", messages.iter().map(|m| m.size).sum::<u64>());
                println!("disabled: {}", user.disabled);
                Ok(())
            })
        }
    }
}

fn init(dir: &Path, hostname: &str) -> Result<()> {
    let report = init_data_dir(dir, hostname)?;
    let cfg = Config::load(&report.config)?;
    runtime()?.block_on(MailStore::open(&cfg))?;
    for p in &report.created {
        println!("created {}", p.display());
    }
    for p in &report.kept {
        println!("kept    {}", p.display());
    }
    println!("store   {} (SQLite, mail encrypted with master.key)", cfg.store.path.display());
    Ok(())
}

fn init_logging(log: &LogConfig, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("POP3CONNEX_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

fn serve(config: Option<PathBuf>) -> Result<()> {
    if config.is_none() && !default_config().exists() {
        println!("No configuration found: creating the embedded default in ./{DEFAULT_DATA_DIR}");
        init(Path::new(DEFAULT_DATA_DIR), "localhost")?;
        println!();
        println!("Add a user (in another terminal):  pop3connex user add alice");
        println!("Trust this CA in clients:          ./{DEFAULT_DATA_DIR}/tls/ca.pem");
        println!();
    }
    let cfg = load(&config)?;
    // hickory (connector DNS) logs whole DNS messages at warn when DNSSEC
    // validation fails; the connector's own events report those cases.
    let filter = format!("{},hickory_net=error,hickory_resolver=error,hickory_proto=error", cfg.log.level.as_str());
    init_logging(&cfg.log, &filter);
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the open-files limit");
    }
    runtime()?.block_on(async move {
        let running = server::start(&cfg).await?;
        for a in &running.pop3s {
            tracing::info!(address = %a, "listening pop3s (implicit TLS)");
        }
        for a in &running.pop3 {
            tracing::info!(address = %a, "listening pop3 (STLS required before login)");
        }
        for a in &running.lmtp {
            tracing::info!(address = %a, "listening lmtp");
        }
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => running.reload().await,
            }
        }
        tracing::info!(sessions = running.active_sessions(), "shutting down");
        let left = running.shutdown().await;
        if left > 0 {
            tracing::warn!(sessions = left, "grace period over, closing remaining sessions");
        }
        tracing::info!("stopped");
        Ok(())
    })
}

/// Reads a new password from stdin (one line) or an interactive prompt.
fn read_password(from_stdin: bool) -> Result<Zeroizing<String>> {
    if from_stdin || !std::io::stdin().is_terminal() {
        let mut line = Zeroizing::new(String::new());
        std::io::stdin().lock().read_line(&mut line).context("reading password from stdin")?;
        let trimmed = Zeroizing::new(line.trim_end_matches(['\r', '\n']).to_owned());
        return Ok(trimmed);
    }
    let first = Zeroizing::new(rpassword::prompt_password("New password: ")?);
    let second = Zeroizing::new(rpassword::prompt_password("Repeat password: ")?);
    if *first != *second {
        bail!("passwords do not match");
    }
    Ok(first)
}

async fn accounts(cfg: &Config) -> Result<Authenticator> {
    let mail = Arc::new(MailStore::open(cfg).await?);
    Ok(Authenticator::new(mail, cfg.auth.clone())?)
}

fn account_err(e: AccountError, name: &UserName) -> anyhow::Error {
    match e {
        AccountError::NoSuchUser => anyhow::anyhow!("no such user: {name}"),
        AccountError::UserExists => anyhow::anyhow!("user already exists: {name}"),
        other => other.into(),
    }
}

async fn user(cfg: Config, cmd: UserCmd) -> Result<()> {
    let auth = accounts(&cfg).await?;
    let store = auth.mail().store().clone();
    match cmd {
        UserCmd::Add { name, password_stdin } => {
            let name = UserName::parse(&name)?;
            let pw = read_password(password_stdin)?;
            auth.add_user(&name, pw.as_bytes()).await.map_err(|e| account_err(e, &name))?;
            println!("added {name}");
        }
        UserCmd::Passwd { name, password_stdin } => {
            let name = UserName::parse(&name)?;
            let pw = read_password(password_stdin)?;
            auth.set_password(&name, pw.as_bytes()).await.map_err(|e| account_err(e, &name))?;
            println!("password changed for {name}");
        }
        UserCmd::List => print!("{}", user_table(&store.users().await?)),
        UserCmd::Disable { name } => {
            let name = UserName::parse(&name)?;
            store.set_disabled(&name, true).await.map_err(|e| account_err(e.into(), &name))?;
            println!("disabled {name}");
        }
        UserCmd::Enable { name } => {
            let name = UserName::parse(&name)?;
            store.set_disabled(&name, false).await.map_err(|e| account_err(e.into(), &name))?;
            println!("enabled {name}");
        }
        UserCmd::AppPassword(AppPasswordCmd::Add { name, label, expires_days }) => {
            let name = UserName::parse(&name)?;
            let expires = expires_days.map(|d| pop3connex_core::types::unix_now() + (d * 86_400) as i64);
            let (id, pw) = auth.add_app_password(&name, &label, expires).await.map_err(|e| account_err(e, &name))?;
            println!("app password {id} for {name} ({label}): {}", *pw);
            println!("It is shown only now. Use it instead of the account password in one POP3 client.");
        }
        UserCmd::AppPassword(AppPasswordCmd::List { name }) => {
            let name = UserName::parse(&name)?;
            let now = pop3connex_core::types::unix_now();
            println!("{:>5}  {:<30} {:>12} {:>14}", "id", "label", "expires in", "last used ago");
            for a in store.app_passwords(&name).await? {
                let exp = a.expires_at.map_or("never".into(), |e| {
                    if e > now {
                        format!("{}d", (e - now) / 86_400)
                    } else {
                        "expired".into()
                    }
                });
                let used = a.last_used_at.map_or("never".into(), |t| format!("{}s", now - t));
                println!("{:>5}  {:<30} {:>12} {:>14}", a.id, a.label, exp, used);
            }
        }
        UserCmd::AppPassword(AppPasswordCmd::Revoke { name, id }) => {
            let name = UserName::parse(&name)?;
            if !store.revoke_app_password(&name, id).await? {
                bail!("{name} has no app password {id}");
            }
            println!("revoked app password {id} of {name}");
        }
        UserCmd::SetClass { name, class } => {
            let name = UserName::parse(&name)?;
            let class = (class != "-").then_some(class);
            if class.as_deref().is_some_and(|c| {
                c.is_empty() || !c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
            }) {
                bail!("class names use letters, digits, - and _");
            }
            store.set_class(&name, class.clone()).await.map_err(|e| account_err(e.into(), &name))?;
            println!("{name}: class {}", class.as_deref().unwrap_or("(none)"));
        }
        UserCmd::RequireModernAuth { name, state } => {
            let name = UserName::parse(&name)?;
            store.set_require_modern_auth(&name, state == "on").await.map_err(|e| account_err(e.into(), &name))?;
            println!("{name}: modern authentication required: {state}");
        }
        UserCmd::ImportPasswd { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let (mut added, mut skipped) = (0, 0);
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let mut fields = line.splitn(3, ':');
                let user = fields.next().unwrap_or_default();
                let outcome = match (fields.next(), UserName::parse(user)) {
                    (None, _) => Err(anyhow!("no ':' in the line (expected user:{{SCHEME}}hash)")),
                    (Some(_), Err(e)) => Err(e.into()),
                    (Some(hash), Ok(name)) => match password::check_hash_parameters(hash) {
                        Err(e) => Err(anyhow!("hash refused: {e}")),
                        Ok(()) => auth.import_user(&name, hash).await.map_err(|e| account_err(e, &name)),
                    },
                };
                match outcome {
                    Ok(()) => added += 1,
                    Err(e) => {
                        skipped += 1;
                        // The name comes from the file: never echo control characters to the terminal.
                        let msg = escape_controls(&format!("{user}: {e}"));
                        eprintln!("{}:{}: {msg}", file.display(), i + 1);
                    }
                }
            }
            println!("imported {added} users, skipped {skipped}");
        }
        UserCmd::Unlock { name } => {
            let name = UserName::parse(&name)?;
            if store.remove_lockout(name.as_str()).await? {
                println!("unlocked {name}");
            } else {
                println!("{name} was not locked");
            }
        }
        UserCmd::Delete { name, yes } => {
            let name = UserName::parse(&name)?;
            if !yes {
                bail!("deleting {name} destroys the mailbox key and all its mail; repeat with --yes");
            }
            store.delete_user(&name).await.map_err(|e| account_err(e.into(), &name))?;
            println!("deleted {name} and all their mail");
        }
    }
    Ok(())
}

/// `user list` as a table whose columns fit the longest value, header
/// included. `UserName`'s `Display` ignores width and alignment, so names
/// are padded as `&str`.
fn user_table(users: &[pop3connex_core::store::UserSummary]) -> String {
    use std::fmt::Write;
    let rows: Vec<[String; 4]> = users
        .iter()
        .map(|u| {
            let status = if u.disabled { "disabled" } else { "active" };
            [u.name.as_str().to_owned(), u.messages.to_string(), u.octets.to_string(), status.to_owned()]
        })
        .collect();
    let header = ["user", "messages", "octets", "status"].map(str::to_owned);
    let width =
        |col: usize| rows.iter().chain(std::iter::once(&header)).map(|r| r[col].chars().count()).max().unwrap_or(0);
    let (w0, w1, w2) = (width(0), width(1), width(2));
    let mut out = String::new();
    for [name, messages, octets, status] in std::iter::once(&header).chain(&rows) {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{name:<w0$}  {messages:>w1$}  {octets:>w2$}  {status}");
    }
    out
}

async fn connector(cfg: Config, cmd: ConnectorCmd) -> Result<()> {
    use pop3connex_core::config::connector::AccountConfig;
    use pop3connex_core::connector::engine::Connector;
    let cfg = Arc::new(cfg);
    let mail = Arc::new(MailStore::open(&cfg).await?);
    let conn = Connector::new(cfg.clone(), mail)?;
    match cmd {
        ConnectorCmd::List => {
            for a in conn.accounts().await? {
                let origin = if cfg.connector.accounts.iter().any(|c| c.name == a.name) { "config" } else { "cli" };
                let (status, seen) = conn.status(&a.name).await?;
                let last = status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_else(|| "-".into());
                println!(
                    "{}\t{}:{}\t{}\t{}\tseen={}\tlast_error={}",
                    a.name,
                    a.host,
                    a.port(),
                    origin,
                    if a.enabled { "enabled" } else { "disabled" },
                    seen,
                    last
                );
            }
        }
        ConnectorCmd::Show { name } => print!("{}", conn.account(&name).await?.to_toml()),
        ConnectorCmd::Add { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let account = AccountConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let base = std::env::current_dir()?;
            let name = account.name.clone();
            conn.add_account(account, &base).await?;
            println!("added connector account {name}");
        }
        ConnectorCmd::Remove { name } => {
            if !conn.remove_account(&name).await? {
                bail!("no CLI-added connector account `{name}`");
            }
            println!("removed connector account {name}");
        }
        ConnectorCmd::RunOnce { names } => {
            let accounts = conn.accounts().await?;
            for n in &names {
                if !accounts.iter().any(|a| &a.name == n) {
                    bail!("no connector account `{n}`");
                }
            }
            // Accounts run concurrently, at most [connector] max_concurrent at a time.
            let conn = Arc::new(conn);
            let slots = Arc::new(tokio::sync::Semaphore::new(cfg.connector.max_concurrent as usize));
            let mut runs = tokio::task::JoinSet::new();
            let chosen =
                accounts.into_iter().filter(|a| if names.is_empty() { a.enabled } else { names.contains(&a.name) });
            for (i, a) in chosen.enumerate() {
                let (conn, slots) = (conn.clone(), slots.clone());
                runs.spawn(async move {
                    let _slot = slots.acquire_owned().await;
                    (i, a.name.clone(), conn.run_account(&a).await)
                });
            }
            let mut results = runs.join_all().await;
            results.sort_by_key(|(i, _, _)| *i);
            let mut failed = false;
            for (_, name, r) in results {
                match r {
                    Ok(r) => println!("{r}"),
                    Err(e) => {
                        failed = true;
                        eprintln!("account={name} error={}: {e}", e.kind());
                    }
                }
            }
            if failed {
                std::process::exit(1);
            }
        }
        ConnectorCmd::Status { name } => {
            let accounts = conn.accounts().await?;
            for a in accounts.iter().filter(|a| name.as_ref().is_none_or(|n| n == &a.name)) {
                let (s, seen) = conn.status(&a.name).await?;
                let s = s.unwrap_or_default();
                let t = |v: Option<i64>| v.map_or("never".to_string(), pop3connex_core::types::format_unix);
                println!("account: {}", a.name);
                println!("  last_run_at: {}", t(s.last_run_at));
                println!("  last_success_at: {}", t(s.last_success_at));
                println!("  last_error: {}", s.last_error.as_deref().unwrap_or("-"));
                println!("  consecutive_failures: {}", s.failures);
                println!("  fetched_total: {}", s.fetched_total);
                println!("  seen: {seen}");
            }
        }
        ConnectorCmd::Resync { name } => {
            let a = conn.account(&name).await?;
            let n = conn.resync(&a).await?;
            println!("account={name} marked {n} upstream message(s) as fetched");
        }
        ConnectorCmd::DnsCheck { domain } => {
            print!(
                "{}",
                pop3connex_core::connector::dnscheck::check_domain(conn.resolver(), conn.mta_sts(), &domain).await
            );
        }
    }
    Ok(())
}

async fn ban(cfg: Config, cmd: BanCmd) -> Result<()> {
    let mail = MailStore::open(&cfg).await?;
    let store = mail.store();
    let parse = |s: &str| -> Result<pop3connex_core::ipnet::IpNet> {
        s.parse::<pop3connex_core::ipnet::IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(pop3connex_core::ipnet::IpNet::from))
            .map(|n| n.trunc())
            .map_err(|_| anyhow::anyhow!("{s} is not an address or CIDR network"))
    };
    match cmd {
        BanCmd::List => {
            let now = pop3connex_core::types::unix_now();
            println!("{:<42} {:>10} {:>8}  reason", "network", "expires in", "offences");
            for b in store.bans().await? {
                let left = b.expires_at.map_or("never".to_owned(), |e| format!("{}s", e - now));
                println!("{:<42} {:>10} {:>8}  {}", b.network.to_string(), left, b.offences, b.reason);
            }
        }
        BanCmd::Add { network, reason, seconds } => {
            let network = parse(&network)?;
            let now = pop3connex_core::types::unix_now();
            let expires_at = seconds.map(|s| now + s as i64);
            store
                .put_ban(pop3connex_core::store::BanRecord {
                    network,
                    reason,
                    created_at: now,
                    expires_at,
                    offences: 1,
                })
                .await?;
            println!("banned {network}");
        }
        BanCmd::Remove { network } => {
            let network = parse(&network)?;
            if store.remove_ban(network).await? {
                println!("removed ban on {network}");
            } else {
                bail!("no ban on {network}");
            }
        }
    }
    Ok(())
}

async fn import(cfg: Config, cmd: ImportCmd) -> Result<()> {
    let mail = MailStore::open(&cfg).await?;
    let (user, path, maildir, follow_symlinks) = match cmd {
        ImportCmd::Maildir { user, path, follow_symlinks } => (user, path, true, follow_symlinks),
        ImportCmd::Mbox { user, path, follow_symlinks } => (user, path, false, follow_symlinks),
    };
    let options = ImportOptions { follow_symlinks };
    let name = UserName::parse(&user)?;
    let Some(record) = mail.store().user(&name).await? else { bail!("no such user: {name} (add it first)") };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} messages [{elapsed_precise}] {wide_bar}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut progress = |done: u64, total: Option<u64>| {
        if let Some(t) = total {
            bar.set_length(t);
        } else {
            bar.set_length(done);
        }
        bar.set_position(done);
    };
    let report = if maildir {
        import_maildir(&mail, &record, &path, options, &mut progress).await
    } else {
        import_mbox(&mail, &record, &path, options, &mut progress).await
    };
    bar.finish_and_clear();
    // Errors and reports quote names from the source: escape them for the terminal.
    let report = report.map_err(|e| anyhow!(escape_controls(&e.to_string())))?;
    for note in &report.notes {
        eprintln!("note: {}", escape_controls(note));
    }
    for skipped in &report.skipped {
        eprintln!("skipped: {}", escape_controls(skipped));
    }
    println!(
        "imported {} messages into {name}; {} were already present (resumed or repeated import); {} skipped",
        report.imported,
        report.already_present,
        report.skipped.len()
    );
    if !report.skipped.is_empty() {
        bail!("{} entries were not imported (listed above)", report.skipped.len());
    }
    Ok(())
}
