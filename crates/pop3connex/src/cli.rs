//! The command line: every subcommand and option (clap definitions only;
//! `main.rs` dispatches them, `print.rs` shows the results).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Default data directory of the embedded setup.
pub const DEFAULT_DATA_DIR: &str = "pop3connex-data";

#[derive(Parser)]
#[command(name = "pop3connex", version, about = "Security-hardened POP3 server and POP3 connector")]
pub struct Cli {
    /// Configuration file [default: ./pop3connex-data/pop3connex.toml]
    #[arg(long, global = true, env = "POP3CONNEX_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
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
    /// Administrators of the HTTPS admin plane, their roles, second factors and service tokens.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Verify, show and export the tamper-evident audit log.
    #[command(subcommand)]
    AuditLog(AuditLogCmd),
    /// The event catalogue and the local event store.
    #[command(subcommand)]
    Events(EventsCmd),
}

#[derive(Subcommand)]
pub enum EventsCmd {
    /// Print every event with its id, severity, ECS classification and fields.
    Catalogue {
        /// As the Markdown of docs/events.md.
        #[arg(long, conflicts_with = "json")]
        markdown: bool,
        #[arg(long)]
        json: bool,
    },
    /// Search the stored events, newest first (itself recorded as events.read).
    Search {
        /// A mail account or administrator name.
        #[arg(long)]
        user: Option<String>,
        /// A client address.
        #[arg(long)]
        ip: Option<String>,
        /// An event name from the catalogue (repeatable, or comma-separated).
        #[arg(long = "type", value_delimiter = ',')]
        types: Vec<String>,
        /// From this time: Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC).
        #[arg(long)]
        since: Option<String>,
        /// Before this time (same forms).
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Add an administrator (password from a prompt or --password-stdin). The
    /// first console login can only enrol a second factor.
    Add {
        name: String,
        /// Role (repeatable): built-in or from [admin.roles]; see `admin roles`.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        #[arg(long)]
        password_stdin: bool,
    },
    /// List administrators with roles, factors and last login.
    List {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Refuse an administrator's logins and the service tokens it created.
    Disable { name: String },
    /// Undo `disable`.
    Enable { name: String },
    /// Remove an administrator, its factors, recovery codes and tokens.
    Remove { name: String },
    /// Remove every second factor and recovery code (lost device): the next
    /// login can only enrol a new factor.
    ResetMfa { name: String },
    /// List the built-in and custom roles with their permissions.
    Roles,
    /// Replace an administrator's roles.
    SetRoles {
        name: String,
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
    },
    /// Change an administrator's password.
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Service tokens of the admin API.
    #[command(subcommand)]
    Token(AdminTokenCmd),
}

#[derive(Subcommand)]
pub enum AdminTokenCmd {
    /// List service tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token at once.
    Revoke { id: String },
    /// Create a token for automation with an administrator's rights (at most
    /// theirs) and print it once.
    Create {
        /// The administrator the token acts for (needs tokens.write).
        #[arg(long)]
        admin: String,
        #[arg(long)]
        name: String,
        /// Permission (repeatable), e.g. users.read.
        #[arg(long = "permission", required = true)]
        permissions: Vec<String>,
        /// Days until it expires (at most [admin] max_token_days).
        #[arg(long)]
        expires_days: u64,
        /// Source network it may be used from (repeatable CIDR); default: any.
        #[arg(long = "network")]
        networks: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum AuditLogCmd {
    /// Check the chain, the checkpoints and the head file; exit 1 naming the first bad record.
    Verify,
    /// Show records, newest first (itself recorded as audit.read).
    Show {
        /// From this time: Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC).
        #[arg(long)]
        since: Option<String>,
        /// Before this time (same forms).
        #[arg(long)]
        until: Option<String>,
        /// An actor (`cli:root`) or its part before `@` (`admin:alice`).
        #[arg(long)]
        actor: Option<String>,
        /// An action (`user.add`) or its prefix before a dot (`user`).
        #[arg(long)]
        action: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Write records as JSON lines, oldest first, each with its MAC (itself recorded as audit.read).
    Export {
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
    },
    /// Print the Ed25519 key that verifies checkpoints (base64 and PEM).
    PublicKey,
    /// After investigating a head-file mismatch: accept the chain as it is (recorded).
    ResetHead {
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
pub enum ConnectorCmd {
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
pub enum BanCmd {
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
pub enum ConfigCmd {
    /// Parse and validate the configuration, load its secrets and certificate.
    Check,
    /// Print a commented example with every key.
    Example,
}

#[derive(Subcommand)]
pub enum UserCmd {
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
pub enum AppPasswordCmd {
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
pub enum ImportCmd {
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
pub enum MailboxCmd {
    /// Message count and size of a user's mailbox.
    Stat { name: String },
}
