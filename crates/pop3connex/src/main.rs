//! `pop3connex`: the command-line front end. Parses arguments, loads the
//! configuration, calls one operation of `pop3connex-core` (the `admin`
//! service layer for everything administrative) and prints its result; no
//! protocol, storage or admin rules live here.
#![forbid(unsafe_code)]

mod alerts;
mod cli;
mod print;
mod serve;

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use cli::{
    AdminCmd, AdminTokenCmd, AppPasswordCmd, AuditLogCmd, BanCmd, Cli, Cmd, ConfigCmd, ConnectorCmd, EventsCmd,
    ImportCmd, MailboxCmd, UserCmd, DEFAULT_DATA_DIR,
};
use pop3connex_core::admin::import::ImportFormat;
use pop3connex_core::admin::users::Unlock;
use pop3connex_core::admin::{Actor, Admin, AuditQuery};
use pop3connex_core::audit_log::parse_time;
use pop3connex_core::config::{Config, LogConfig, EXAMPLE};
use pop3connex_core::import::{escape_controls, ImportOptions};
use pop3connex_core::init::CONFIG_FILE;
use pop3connex_core::types::UserName;
use zeroize::Zeroizing;

/// jemalloc instead of glibc malloc: glibc keeps freed memory of a load
/// spike in its arenas (RSS stayed at 8x the idle figure after a burst of
/// sessions), jemalloc's background threads return it to the kernel within
/// seconds. Measurements: docs/BENCHMARKS.md, "Memory after load".
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
            serve::init_logging(&LogConfig::default(), "warn");
            serve::init(&data_dir, &hostname)
        }
        Cmd::Serve => serve::serve(cli.config),
        Cmd::Config(ConfigCmd::Example) => {
            print!("{EXAMPLE}");
            Ok(())
        }
        Cmd::Config(ConfigCmd::Check) => {
            serve::init_logging(&LogConfig::default(), "warn");
            let cfg = load(&cli.config)?;
            cfg.store.master_key.load().context("store.master_key")?;
            pop3connex_core::tls::TlsAcceptor::load(&cfg.tls).context("tls")?;
            println!("{}: OK", cfg.source.display());
            Ok(())
        }
        Cmd::Connector(cmd) => {
            let cfg = load(&cli.config)?;
            // hickory logs whole DNS messages at warn on validation failures;
            // the connector reports those itself.
            serve::init_logging_with_alerts(
                &cfg.log,
                "warn,pop3connex::connector=info,hickory_net=error,hickory_resolver=error,hickory_proto=error",
                alerts::AlertLayer::new(&cfg.connector.alert_command, alerts::Mode::Wait),
            );
            with_admin(cfg, async |admin, actor| connector(admin, actor, cmd).await)
        }
        Cmd::User(cmd) => with_admin(load_quiet(&cli.config)?, async |admin, actor| user(admin, actor, cmd).await),
        Cmd::Import(cmd) => with_admin(load_quiet(&cli.config)?, async |admin, actor| import(admin, actor, cmd).await),
        Cmd::Ban(cmd) => with_admin(load_quiet(&cli.config)?, async |admin, actor| ban(admin, actor, cmd).await),
        Cmd::Admin(cmd) => with_admin(load_quiet(&cli.config)?, async |admin, actor| admins(admin, actor, cmd).await),
        Cmd::AuditLog(cmd) => {
            with_admin(load_quiet(&cli.config)?, async |admin, actor| audit_log(admin, actor, cmd).await)
        }
        Cmd::Events(EventsCmd::Catalogue { markdown, json }) => {
            use pop3connex_core::telemetry::catalogue;
            if markdown {
                print!("{}", catalogue::markdown());
            } else if json {
                println!("{}", serde_json::to_string_pretty(catalogue::CATALOGUE)?);
            } else {
                print!("{}", print::event_catalogue(catalogue::CATALOGUE));
            }
            Ok(())
        }
        Cmd::Events(cmd) => with_admin(load_quiet(&cli.config)?, async |admin, actor| events(admin, actor, cmd).await),
        Cmd::Mailbox(MailboxCmd::Stat { name }) => with_admin(load_quiet(&cli.config)?, async |admin, actor| {
            print::mailbox_stat(&admin.mailbox_stat(actor, &UserName::parse(&name)?).await?);
            Ok(())
        }),
    }
}

/// Logging at warn (admin commands report on stdout and stderr
/// themselves), then the configuration.
fn load_quiet(cli_config: &Option<PathBuf>) -> Result<Config> {
    let cfg = load(cli_config)?;
    let alerts = alerts::AlertLayer::new(&cfg.connector.alert_command, alerts::Mode::Wait);
    serve::init_logging_with_alerts(&LogConfig::default(), "warn", alerts);
    Ok(cfg)
}

/// Opens the admin context on `cfg` and runs one operation of the
/// command-line user on it.
fn with_admin(cfg: Config, op: impl AsyncFnOnce(&Admin, &Actor) -> Result<()>) -> Result<()> {
    runtime()?.block_on(async {
        let admin = Admin::open(cfg).await?;
        op(&admin, &Actor::cli_from_env()).await
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

async fn user(admin: &Admin, actor: &Actor, cmd: UserCmd) -> Result<()> {
    match cmd {
        UserCmd::Add { name, password_stdin } => {
            let name = UserName::parse(&name)?;
            let pw = read_password(password_stdin)?;
            admin.add_user(actor, &name, pw.as_bytes()).await?;
            println!("added {name}");
        }
        UserCmd::Passwd { name, password_stdin } => {
            let name = UserName::parse(&name)?;
            let pw = read_password(password_stdin)?;
            admin.set_password(actor, &name, pw.as_bytes()).await?;
            println!("password changed for {name}");
        }
        UserCmd::List => print!("{}", print::user_table(&admin.list_users(actor).await?)),
        UserCmd::Disable { name } => {
            let name = UserName::parse(&name)?;
            admin.set_disabled(actor, &name, true).await?;
            println!("disabled {name}");
        }
        UserCmd::Enable { name } => {
            let name = UserName::parse(&name)?;
            admin.set_disabled(actor, &name, false).await?;
            println!("enabled {name}");
        }
        UserCmd::AppPassword(AppPasswordCmd::Add { name, label, expires_days }) => {
            let name = UserName::parse(&name)?;
            let new = admin.add_app_password(actor, &name, &label, expires_days).await?;
            println!("app password {} for {name} ({label}): {}", new.id, *new.password);
            println!("It is shown only now. Use it instead of the account password in one POP3 client.");
        }
        UserCmd::AppPassword(AppPasswordCmd::List { name }) => {
            print::app_passwords(&admin.list_app_passwords(actor, &UserName::parse(&name)?).await?);
        }
        UserCmd::AppPassword(AppPasswordCmd::Revoke { name, id }) => {
            let name = UserName::parse(&name)?;
            admin.revoke_app_password(actor, &name, id).await?;
            println!("revoked app password {id} of {name}");
        }
        UserCmd::SetClass { name, class } => {
            let name = UserName::parse(&name)?;
            // "-" on the command line clears the class.
            let class = (class != "-").then_some(class);
            admin.set_class(actor, &name, class.as_deref()).await?;
            println!("{name}: class {}", class.as_deref().unwrap_or("(none)"));
        }
        UserCmd::RequireModernAuth { name, state } => {
            let name = UserName::parse(&name)?;
            admin.set_require_modern_auth(actor, &name, state == "on").await?;
            println!("{name}: modern authentication required: {state}");
        }
        UserCmd::ImportPasswd { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            print::passwd_import(&file, &admin.import_passwd(actor, &text).await?);
        }
        UserCmd::Unlock { name } => {
            let name = UserName::parse(&name)?;
            match admin.unlock(actor, &name).await? {
                Unlock::Unlocked => println!("unlocked {name}"),
                Unlock::NotLocked => println!("{name} was not locked"),
            }
        }
        UserCmd::Delete { name, yes } => {
            let name = UserName::parse(&name)?;
            admin.delete_user(actor, &name, yes).await?;
            println!("deleted {name} and all their mail");
        }
    }
    Ok(())
}

async fn connector(admin: &Admin, actor: &Actor, cmd: ConnectorCmd) -> Result<()> {
    match cmd {
        ConnectorCmd::List => print::connector_accounts(&admin.list_connector_accounts(actor).await?),
        ConnectorCmd::Show { name } => print!("{}", admin.show_connector_account(actor, &name).await?.to_toml()),
        ConnectorCmd::Add { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let base = std::env::current_dir()?;
            let name = admin.add_connector_account(actor, &file.display().to_string(), &text, &base).await?;
            println!("added connector account {name}");
        }
        ConnectorCmd::Remove { name } => {
            admin.remove_connector_account(actor, &name).await?;
            println!("removed connector account {name}");
        }
        ConnectorCmd::RunOnce { names } => {
            let mut failed = false;
            for run in admin.run_connector_accounts(actor, &names).await? {
                match run.result {
                    Ok(r) => println!("{r}"),
                    Err(e) => {
                        failed = true;
                        eprintln!("account={} error={}: {e}", run.account, e.kind());
                    }
                }
            }
            if failed {
                std::process::exit(1);
            }
        }
        ConnectorCmd::Status { name } => {
            print::connector_status(&admin.connector_status(actor, name.as_deref()).await?)
        }
        ConnectorCmd::Resync { name } => {
            let n = admin.resync_connector_account(actor, &name).await?;
            println!("account={name} marked {n} upstream message(s) as fetched");
        }
        ConnectorCmd::DnsCheck { domain } => print!("{}", admin.dns_check(actor, &domain).await?),
    }
    Ok(())
}

async fn admins(admin: &Admin, actor: &Actor, cmd: AdminCmd) -> Result<()> {
    match cmd {
        AdminCmd::Add { name, roles, password_stdin } => {
            let pw = read_password(password_stdin)?;
            let info = admin.admin_add(actor, &name, &pw, &roles).await?;
            println!(
                "added administrator {} ({}); the first login enrols a second factor",
                info.name,
                info.roles.join(", ")
            );
        }
        AdminCmd::List { json } => {
            let list = admin.admin_list(actor).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", print::admin_table(&list));
            }
        }
        AdminCmd::Disable { name } => {
            admin.admin_set_enabled(actor, &name, false).await?;
            println!("disabled administrator {name}");
        }
        AdminCmd::Enable { name } => {
            admin.admin_set_enabled(actor, &name, true).await?;
            println!("enabled administrator {name}");
        }
        AdminCmd::Remove { name } => {
            admin.admin_remove(actor, &name).await?;
            println!("removed administrator {name}");
        }
        AdminCmd::ResetMfa { name } => {
            admin.admin_reset_mfa(actor, &name).await?;
            println!("removed every second factor and recovery code of {name}; the next login enrols a new factor");
        }
        AdminCmd::Roles => print!("{}", print::roles(admin.roles().all())),
        AdminCmd::SetRoles { name, roles } => {
            admin.admin_set_roles(actor, &name, &roles).await?;
            println!("roles of {name}: {}", roles.join(", "));
        }
        AdminCmd::Passwd { name, password_stdin } => {
            let pw = read_password(password_stdin)?;
            admin.admin_set_password(actor, &name, &pw).await?;
            println!("password changed for administrator {name}");
        }
        AdminCmd::Token(AdminTokenCmd::List { json }) => {
            let list = admin.token_list(actor).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", print::token_table(&list));
            }
        }
        AdminCmd::Token(AdminTokenCmd::Revoke { id }) => {
            admin.token_revoke(actor, &id).await?;
            println!("revoked token {id}");
        }
        AdminCmd::Token(AdminTokenCmd::Create { admin: owner, name, permissions, expires_days, networks }) => {
            let permissions = pop3connex_core::rbac::PermissionSet::parse_list(&permissions).map_err(|e| anyhow!(e))?;
            let networks = networks
                .iter()
                .map(|n| n.parse::<pop3connex_core::ipnet::IpNet>().map_err(|_| anyhow!("`{n}` is not a CIDR network")))
                .collect::<Result<Vec<_>>>()?;
            let expires_at = pop3connex_core::types::unix_now().max(0) as u64 + expires_days.saturating_mul(86_400);
            let creator = admin.principal_for_cli(actor, &owner).await?;
            let (info, token) = admin.token_create(&creator, &name, &permissions, expires_at, &networks).await?;
            eprintln!("token {} created; it is shown once, store it now:", info.id);
            println!("{}", &*token);
        }
    }
    Ok(())
}

async fn ban(admin: &Admin, actor: &Actor, cmd: BanCmd) -> Result<()> {
    match cmd {
        BanCmd::List => print::bans(&admin.list_bans(actor).await?),
        BanCmd::Add { network, reason, seconds } => {
            println!("banned {}", admin.add_ban(actor, &network, &reason, seconds).await?);
        }
        BanCmd::Remove { network } => println!("removed ban on {}", admin.remove_ban(actor, &network).await?),
    }
    Ok(())
}

async fn import(admin: &Admin, actor: &Actor, cmd: ImportCmd) -> Result<()> {
    let (user, path, format, follow_symlinks) = match cmd {
        ImportCmd::Maildir { user, path, follow_symlinks } => (user, path, ImportFormat::Maildir, follow_symlinks),
        ImportCmd::Mbox { user, path, follow_symlinks } => (user, path, ImportFormat::Mbox, follow_symlinks),
    };
    let name = UserName::parse(&user)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} messages [{elapsed_precise}] {wide_bar}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut progress = |done: u64, total: Option<u64>| {
        bar.set_length(total.unwrap_or(done));
        bar.set_position(done);
    };
    let options = ImportOptions { follow_symlinks };
    let report = admin.import(actor, &name, format, &path, options, &mut progress).await;
    bar.finish_and_clear();
    // Errors and reports quote names from the source: escape them for the terminal.
    let report = report.map_err(|e| anyhow!(escape_controls(&e.to_string())))?;
    print::import_report(name.as_str(), &report);
    if !report.skipped.is_empty() {
        bail!("{} entries were not imported (listed above)", report.skipped.len());
    }
    Ok(())
}

/// A `--since`/`--until` value as Unix ms.
fn time_arg(name: &str, value: Option<String>) -> Result<Option<i64>> {
    value
        .map(|v| {
            parse_time(&v)
                .ok_or_else(|| anyhow!("--{name} {v:?}: expected Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ"))
        })
        .transpose()
}

async fn audit_log(admin: &Admin, actor: &Actor, cmd: AuditLogCmd) -> Result<()> {
    match cmd {
        AuditLogCmd::Verify => {
            let (report, unrecorded) = admin.audit_log_verify(actor).await?;
            if let Some(e) = unrecorded {
                eprintln!("note: this verification could not be recorded: {e}");
            }
            print::audit_verify(&report);
            if !report.intact() {
                std::process::exit(1);
            }
        }
        AuditLogCmd::Show { since, until, actor: who, action, limit } => {
            let query = AuditQuery {
                since: time_arg("since", since)?,
                until: time_arg("until", until)?,
                actor: who,
                action,
                limit,
                before_seq: None,
            };
            print!("{}", print::audit_table(&admin.audit_log_read(actor, &query).await?));
        }
        AuditLogCmd::Export { since, until } => {
            use std::io::Write;
            let (since, until) = (time_arg("since", since)?, time_arg("until", until)?);
            let mut out = std::io::BufWriter::new(std::io::stdout());
            let mut sink = |r: &pop3connex_core::admin::AuditRecord| -> std::io::Result<()> {
                serde_json::to_writer(&mut out, r)?;
                out.write_all(b"\n")
            };
            let n = admin.audit_log_export(actor, since, until, &mut sink).await?;
            out.flush()?;
            eprintln!("exported {n} records");
        }
        AuditLogCmd::PublicKey => {
            let log = admin.audit_log();
            println!("ed25519 {}", log.public_key_base64());
            print!("{}", log.public_key_pem());
        }
        AuditLogCmd::ResetHead { yes } => {
            if !yes {
                bail!("reset-head accepts the audit log as it is now (recorded); confirm with --yes");
            }
            let r = admin.audit_log_reset_head(actor).await?;
            println!("head file reset at seq {} (recorded as audit.head_reset)", r.seq);
        }
    }
    Ok(())
}

async fn events(admin: &Admin, actor: &Actor, cmd: EventsCmd) -> Result<()> {
    let EventsCmd::Search { user, ip, types, since, until, limit, json } = cmd else { return Ok(()) };
    if let Some(u) = &user {
        // Mail accounts and administrators: either name form.
        if u.is_empty() || u.len() > 320 || u.chars().any(|c| c.is_control() || c.is_whitespace()) {
            bail!("--user: not a user name");
        }
    }
    let ip = ip
        .map(|a| a.parse::<std::net::IpAddr>().map(|a| a.to_string()))
        .transpose()
        .map_err(|_| anyhow::anyhow!("--ip: not an IP address"))?;
    for t in &types {
        if pop3connex_core::telemetry::catalogue::lookup(t).is_none() {
            bail!("--type {t}: no such event (see `pop3connex events catalogue`)");
        }
    }
    let filter = pop3connex_core::store::EventFilter {
        since: time_arg("since", since)?,
        until: time_arg("until", until)?,
        user,
        ip,
        names: types,
        before_seq: None,
        limit: limit.clamp(1, 10_000),
    };
    let found = admin.events_search(actor, filter).await?;
    if json {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::io::stdout());
        for e in &found {
            serde_json::to_writer(&mut out, &print::event_json(e))?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    } else {
        print!("{}", print::events_table(&found));
    }
    Ok(())
}
