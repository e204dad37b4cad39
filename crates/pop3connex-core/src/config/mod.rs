//! The configuration file: one TOML document, every key documented in
//! [`EXAMPLE`] (printed by `pop3connex config example`).
//!
//! Unknown keys and out-of-range values are rejected while parsing, so the
//! error carries the file, line and column of the offending key. Relative
//! paths are resolved against the folder of the config file. Credentials and
//! keys are [`SecretRef`]s, never literals.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{de::Error as _, Deserialize, Deserializer};

use crate::secret::SecretRef;

pub mod admin;
pub mod alerts;
pub mod anomaly;
pub mod connector;
pub mod diff;
pub mod events;
pub mod logsink;
pub mod metrics;
pub mod oauth;

use admin::AdminConfig;
use connector::ConnectorConfig;
use oauth::OAuthConfig;

/// The commented example configuration. A test checks that it parses and
/// that it mentions every key the parser accepts.
pub const EXAMPLE: &str = include_str!("../../../../docs/pop3connex.example.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub tls: TlsConfig,
    #[serde(default)]
    pub pop3: Pop3Config,
    #[serde(default)]
    pub lmtp: LmtpConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub abuse: AbuseConfig,
    #[serde(default)]
    pub oauth: OAuthConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// `[alerts]`: channels alert events are routed to (webhooks).
    #[serde(default)]
    pub alerts: alerts::AlertsConfig,
    /// `[anomaly]`: built-in detection rules on the event stream.
    #[serde(default)]
    pub anomaly: anomaly::AnomalyConfig,
    #[serde(default)]
    pub connector: ConnectorConfig,
    /// `[admin]`: the HTTPS admin plane; `None` (absent): off.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// `[metrics]`: the Prometheus endpoint; `None` (absent): off.
    #[serde(default)]
    pub metrics: Option<metrics::MetricsConfig>,
    /// The file this was read from (for messages), not a config key.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Name used in the LMTP greeting and generated certificates.
    pub hostname: String,
    /// How long in-flight sessions get to finish after SIGTERM.
    #[serde(deserialize_with = "secs_1_300")]
    pub shutdown_grace_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { hostname: "localhost".into(), shutdown_grace_secs: 10 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Sqlite,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub path: PathBuf,
    pub master_key: SecretRef,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub certificate: PathBuf,
    pub private_key: SecretRef,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pop3Config {
    pub implicit_tls: Vec<SocketAddr>,
    pub starttls: Vec<SocketAddr>,
    #[serde(deserialize_with = "count_1_1m")]
    pub max_connections: u64,
    #[serde(deserialize_with = "count_1_1m")]
    pub max_connections_per_ip: u64,
    pub plaintext_auth_networks: Vec<Network>,
    #[serde(deserialize_with = "secs_5_600")]
    pub preauth_timeout_secs: u64,
    #[serde(deserialize_with = "secs_600_86400")]
    pub idle_timeout_secs: u64,
    #[serde(deserialize_with = "count_1_100")]
    pub max_bad_commands: u64,
    #[serde(deserialize_with = "count_1_100")]
    pub max_auth_failures: u64,
    pub login_delay_secs: Option<u64>,
    pub expire_days: Option<u64>,
}

impl Default for Pop3Config {
    fn default() -> Self {
        Self {
            implicit_tls: vec![SocketAddr::from(([127, 0, 0, 1], 9950))],
            starttls: vec![SocketAddr::from(([127, 0, 0, 1], 1100))],
            max_connections: 4096,
            max_connections_per_ip: 64,
            plaintext_auth_networks: Vec::new(),
            preauth_timeout_secs: 60,
            idle_timeout_secs: 600,
            max_bad_commands: 10,
            max_auth_failures: 3,
            login_delay_secs: None,
            expire_days: None,
        }
    }
}

/// An LMTP listening endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LmtpListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl<'de> Deserialize<'de> for LmtpListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(D::Error::custom("unix: needs a socket path"));
            }
            return Ok(LmtpListen::Unix(PathBuf::from(p)));
        }
        s.parse().map(LmtpListen::Tcp).map_err(|_| D::Error::custom(format!("`{s}` is neither IP:PORT nor unix:/path")))
    }
}

impl fmt::Display for LmtpListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LmtpListen::Tcp(a) => a.fmt(f),
            LmtpListen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmtpConfig {
    pub listen: Vec<LmtpListen>,
    #[serde(deserialize_with = "size_1k_1g")]
    pub max_message_size: u64,
    #[serde(deserialize_with = "count_1_1000")]
    pub max_recipients: u64,
    #[serde(deserialize_with = "count_1_1000")]
    pub max_connections: u64,
    /// Deadline for each command line, and the grace period of DATA.
    #[serde(deserialize_with = "secs_5_3600")]
    pub timeout_secs: u64,
    /// Slowest DATA accepted, in octets per second: DATA must end within
    /// `timeout_secs + received / data_min_rate`, so a client dripping
    /// bytes cannot hold a connection slot (and its buffer) for hours.
    #[serde(deserialize_with = "rate_1_1g")]
    pub data_min_rate: u64,
    /// Octets of message data all LMTP connections may buffer together
    /// before the final dot; bounds memory under many large or slow
    /// transactions. At least `max_message_size`.
    #[serde(deserialize_with = "size_64k_64g")]
    pub max_inflight_data: u64,
}

impl Default for LmtpConfig {
    fn default() -> Self {
        Self {
            listen: vec![LmtpListen::Tcp(SocketAddr::from(([127, 0, 0, 1], 2400)))],
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_connections: 64,
            timeout_secs: 300,
            // 16 KiB/s: a local MTA sends orders of magnitude faster; a
            // 25 MiB message may still take 300 s + 26 min.
            data_min_rate: 16 * 1024,
            // Ten maximum-size messages at the default limits.
            max_inflight_data: 256 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PasswordScheme {
    Argon2id,
    Sha512Crypt,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub password_scheme: PasswordScheme,
    #[serde(deserialize_with = "argon_memory")]
    pub argon2_memory_kib: u64,
    #[serde(deserialize_with = "count_1_100")]
    pub argon2_iterations: u64,
    #[serde(deserialize_with = "count_1_16")]
    pub argon2_parallelism: u64,
    #[serde(deserialize_with = "ms_0_10000")]
    pub failure_delay_ms: u64,
    #[serde(deserialize_with = "scram_iterations")]
    pub scram_iterations: u64,
    /// Seconds a successful password verification is remembered (0: off).
    #[serde(deserialize_with = "secs_0_3600")]
    pub credential_cache_secs: u64,
    /// `[auth.password_policy]`.
    pub password_policy: crate::policy::PasswordPolicy,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            password_scheme: PasswordScheme::Argon2id,
            argon2_memory_kib: 19456,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            failure_delay_ms: 1000,
            scram_iterations: crate::scram::DEFAULT_ITERATIONS as u64,
            credential_cache_secs: 300,
            password_policy: crate::policy::PasswordPolicy::default(),
        }
    }
}

/// Brute-force and abuse protection (seed practice 5).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AbuseConfig {
    /// Networks never banned automatically (offices, load balancers, monitoring).
    pub allowlist: Vec<Network>,
    /// Optional file with more allowlisted networks, one CIDR per line.
    pub allowlist_file: Option<PathBuf>,
    /// Optional file of networks refused at accept, one CIDR per line.
    pub blocklist_file: Option<PathBuf>,
    #[serde(deserialize_with = "secs_60_86400")]
    pub window_secs: u64,
    #[serde(deserialize_with = "count_1_1000")]
    pub ban_after_auth_failures: u64,
    #[serde(deserialize_with = "count_1_1000")]
    pub ban_after_protocol_abuse: u64,
    #[serde(deserialize_with = "count_1_1m")]
    pub ban_after_connections_per_minute: u64,
    #[serde(deserialize_with = "secs_60_31536000")]
    pub ban_secs: u64,
    #[serde(deserialize_with = "secs_60_31536000")]
    pub ban_max_secs: u64,
    #[serde(deserialize_with = "count_1_1000")]
    pub lockout_after_failures: u64,
    #[serde(deserialize_with = "secs_60_31536000")]
    pub lockout_secs: u64,
    #[serde(deserialize_with = "secs_60_31536000")]
    pub lockout_max_secs: u64,
    #[serde(deserialize_with = "ms_0_60000")]
    pub max_failure_delay_ms: u64,
    #[serde(deserialize_with = "count_1_1m")]
    pub max_commands_per_second: u64,
    /// DNS blocklist zones queried at accept (empty: none).
    pub dnsbl: Vec<String>,
    /// Resolver for DNSBL queries (`IP:PORT`); default: /etc/resolv.conf.
    pub dnsbl_resolver: Option<SocketAddr>,
    #[serde(deserialize_with = "ms_50_10000")]
    pub dnsbl_timeout_ms: u64,
    /// IPv6 addresses are counted and banned per prefix of this length: one
    /// host usually owns a whole /64 and can rotate through it.
    #[serde(deserialize_with = "prefix_32_128")]
    pub ipv6_prefix: u64,
    /// How often bans, lockouts, known addresses and the list files are
    /// re-read (SIGHUP re-reads them at once).
    #[serde(deserialize_with = "secs_1_300")]
    pub refresh_secs: u64,
}

impl Default for AbuseConfig {
    fn default() -> Self {
        Self {
            allowlist: Vec::new(),
            allowlist_file: None,
            blocklist_file: None,
            window_secs: 600,
            ban_after_auth_failures: 10,
            ban_after_protocol_abuse: 5,
            ban_after_connections_per_minute: 300,
            ban_secs: 3600,
            ban_max_secs: 7 * 86_400,
            lockout_after_failures: 10,
            lockout_secs: 900,
            lockout_max_secs: 86_400,
            max_failure_delay_ms: 8000,
            max_commands_per_second: 200,
            dnsbl: Vec::new(),
            dnsbl_resolver: None,
            dnsbl_timeout_ms: 1000,
            ipv6_prefix: 64,
            refresh_secs: 5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: LogLevel,
    /// `[log.store]`: the local event store.
    pub store: events::EventStoreConfig,
    /// `[[log.sink]]`: syslog and JSON event sinks ([`logsink`]).
    pub sink: Vec<logsink::SinkConfig>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: LogLevel::Info,
            store: events::EventStoreConfig::default(),
            sink: Vec::new(),
        }
    }
}

/// A CIDR network (`192.0.2.0/24`, `2001:db8::/32`, or a bare address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network(pub IpNet);

impl Network {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.0.contains(&ip)
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(n) = s.parse::<IpNet>() {
            return Ok(Network(n.trunc()));
        }
        s.parse::<std::net::IpAddr>()
            .map(|ip| Network(IpNet::from(ip)))
            .map_err(|_| D::Error::custom(format!("`{s}` is not a CIDR network")))
    }
}

macro_rules! bounded {
    ($($name:ident: $min:expr, $max:expr, $unit:expr;)*) => {$(
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
            let v = u64::deserialize(d)?;
            if !($min..=$max).contains(&v) {
                return Err(D::Error::custom(format!(
                    "must be between {} and {}{}, got {}", $min, $max, $unit, v
                )));
            }
            Ok(v)
        }
    )*};
}

/// Used by the connector's config module too.
use bounded;

bounded! {
    secs_1_300: 1, 300, " seconds";
    secs_0_3600: 0, 3600, " seconds";
    secs_5_600: 5, 600, " seconds";
    // RFC 1939 section 3: the autologout timer MUST be at least 10 minutes.
    secs_600_86400: 600, 86_400, " seconds (RFC 1939 requires at least 10 minutes)";
    secs_5_3600: 5, 3600, " seconds";
    ms_0_10000: 0, 10_000, " milliseconds";
    ms_0_60000: 0, 60_000, " milliseconds";
    ms_50_10000: 50, 10_000, " milliseconds";
    secs_60_86400: 60, 86_400, " seconds";
    secs_60_31536000: 60, 31_536_000, " seconds";
    count_1_16: 1, 16, "";
    prefix_32_128: 32, 128, " bits";
    count_1_100: 1, 100, "";
    count_1_1000: 1, 1000, "";
    count_1_1m: 1, 1_000_000, "";
    size_1k_1g: 1024, 1u64 << 30, " octets";
    size_64k_64g: 65_536, 1u64 << 36, " octets";
    rate_1_1g: 1, 1u64 << 30, " octets per second";
    argon_memory: 8192, 4_194_304, " KiB";
    // RFC 7677: at least 4096.
    scram_iterations: 4096, 10_000_000, " (RFC 7677 requires at least 4096)";
}

/// A configuration problem, located in the file where possible.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{path}: {message}")]
    Semantic { path: PathBuf, message: String },
}

impl Config {
    /// Reads, parses and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses configuration text; `path` names the source in errors and is
    /// the base for relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Invalid { path: path.to_owned(), line, column, message: e.message().trim().to_owned() }
        })?;
        cfg.source = path.to_owned();
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut cfg.store.path);
        abs(&mut cfg.tls.certificate);
        for p in [
            &mut cfg.abuse.allowlist_file,
            &mut cfg.abuse.blocklist_file,
            &mut cfg.auth.password_policy.breached_hashes_file,
        ]
        .into_iter()
        .flatten()
        {
            abs(p);
        }
        cfg.store.master_key.resolve_against(&base);
        cfg.tls.private_key.resolve_against(&base);
        for l in &mut cfg.lmtp.listen {
            if let LmtpListen::Unix(p) = l {
                abs(p);
            }
        }
        cfg.oauth.resolve_paths(&base);
        cfg.connector.resolve_paths(&base);
        cfg.anomaly.geo.resolve_paths(&base);
        logsink::resolve_paths(&mut cfg.log.sink, &base);
        if let Some(a) = &mut cfg.admin {
            a.finish(&base, &cfg.server.hostname);
        }
        if let Some(m) = &mut cfg.metrics {
            m.finish(&base);
        }
        cfg.alerts.finish(&base);
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let err = |message: String| ConfigError::Semantic { path: self.source.clone(), message };
        self.oauth.check().map_err(err)?;
        self.connector.check().map_err(err)?;
        self.log.store.check().map_err(err)?;
        self.anomaly.check().map_err(err)?;
        let relays: Vec<&str> = self.connector.downstreams.iter().map(|d| d.name.as_str()).collect();
        self.alerts.check(&relays).map_err(err)?;
        logsink::check(&self.log.sink).map_err(err)?;
        if let Some(a) = &self.admin {
            a.check().map_err(err)?;
        }
        if let Some(m) = &self.metrics {
            m.check().map_err(err)?;
        }
        for zone in &self.abuse.dnsbl {
            let ok = !zone.is_empty()
                && zone.len() < 200
                && zone.split('.').all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
            if !ok {
                return Err(err(format!("[abuse] dnsbl: `{zone}` is not a DNS zone name")));
            }
        }
        if self.pop3.implicit_tls.is_empty() && self.pop3.starttls.is_empty() {
            return Err(err("[pop3] has no listener: set implicit_tls and/or starttls".into()));
        }
        if self.pop3.max_connections_per_ip > self.pop3.max_connections {
            return Err(err("[pop3] max_connections_per_ip exceeds max_connections".into()));
        }
        if self.lmtp.max_inflight_data < self.lmtp.max_message_size {
            return Err(err("[lmtp] max_inflight_data is smaller than max_message_size".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for a in self.pop3.implicit_tls.iter().chain(&self.pop3.starttls) {
            if a.port() != 0 && !seen.insert(*a) {
                return Err(err(format!("address {a} is used by two listeners")));
            }
        }
        for l in &self.lmtp.listen {
            if let LmtpListen::Tcp(a) = l {
                if a.port() != 0 && !seen.insert(*a) {
                    return Err(err(format!("address {a} is used by two listeners")));
                }
                if !a.ip().is_loopback() {
                    tracing::warn!(address = %a, "LMTP listens on a non-loopback address; restrict it with a firewall");
                }
            }
        }
        Ok(())
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |p| before.len() - p - 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[store]\nbackend = \"sqlite\"\npath = \"x.db\"\nmaster_key = \"file:master.key\"\n\
                       [tls]\ncertificate = \"c.pem\"\nprivate_key = \"file:k.pem\"\n";

    #[test]
    fn example_parses_and_documents_every_key() {
        let cfg = Config::parse(EXAMPLE, Path::new("/etc/pop3connex/pop3connex.toml")).unwrap();
        assert_eq!(cfg.store.path, PathBuf::from("/etc/pop3connex/pop3connex.db"));
        for key in [
            "hostname",
            "shutdown_grace_secs",
            "backend",
            "path",
            "master_key",
            "certificate",
            "private_key",
            "implicit_tls",
            "starttls",
            "max_connections",
            "max_connections_per_ip",
            "plaintext_auth_networks",
            "preauth_timeout_secs",
            "idle_timeout_secs",
            "max_bad_commands",
            "max_auth_failures",
            "login_delay_secs",
            "expire_days",
            "listen",
            "max_message_size",
            "max_recipients",
            "timeout_secs",
            "data_min_rate",
            "max_inflight_data",
            "password_scheme",
            "argon2_memory_kib",
            "argon2_iterations",
            "argon2_parallelism",
            "failure_delay_ms",
            "scram_iterations",
            "credential_cache_secs",
            "min_length",
            "min_strength",
            "breached_hashes_file",
            "history",
            "max_age_days",
            "max_age_days_by_class",
            "allowlist",
            "allowlist_file",
            "blocklist_file",
            "window_secs",
            "ban_after_auth_failures",
            "ban_after_protocol_abuse",
            "ban_after_connections_per_minute",
            "ban_secs",
            "ban_max_secs",
            "lockout_after_failures",
            "lockout_secs",
            "lockout_max_secs",
            "max_failure_delay_ms",
            "max_commands_per_second",
            "dnsbl",
            "dnsbl_resolver",
            "dnsbl_timeout_ms",
            "ipv6_prefix",
            "refresh_secs",
            "issuer",
            "audiences",
            "jwks_url",
            "jwks_file",
            "ca_file",
            "algorithms",
            "username_claim",
            "leeway_secs",
            "introspection_url",
            "introspection_client_id",
            "introspection_client_secret",
            "scope",
            "openid_configuration",
            "format",
            "level",
            "enabled",
            "max_concurrent",
            "jitter_percent",
            "quarantine_user",
            "max_hops",
            "dedup_days",
            "retry_base_secs",
            "retry_max_secs",
            "alert_command",
            "nameservers",
            "trust_anchor_file",
            "timeout_ms",
            "mta_sts_port",
            "mta_sts_ca_file",
            "name",
            "host",
            "port",
            "tls",
            "spki_pins",
            "user",
            "password",
            "auth",
            "interval_secs",
            "delete",
            "delete_after_days",
            "oversize",
            "max_messages_per_run",
            "max_bytes_per_run",
            "preset",
            "token_url",
            "client_id",
            "client_secret",
            "refresh_token",
            "deliver_to",
            "envelope_header",
            "header_occurrence",
            "addresses",
            "domains",
            "guess_from_to_cc",
            "protocol",
            "helo",
            "auth_user",
            "auth_password",
            "allow_networks",
            "trusted_proxies",
            "public_origin",
            "session_idle_secs",
            "session_absolute_secs",
            "step_up_secs",
            "login_failures_before_ban",
            "max_token_days",
            "permissions",
        ] {
            assert!(EXAMPLE.contains(&format!("{key} =")), "example does not document {key}");
        }
    }

    #[test]
    fn minimal_config_resolves_relative_paths() {
        let cfg = Config::parse(MIN, Path::new("/srv/p/c.toml")).unwrap();
        assert_eq!(cfg.tls.certificate, PathBuf::from("/srv/p/c.pem"));
        assert_eq!(cfg.tls.private_key, SecretRef::File("/srv/p/k.pem".into()));
        assert_eq!(cfg.pop3.idle_timeout_secs, 600);
    }

    fn error_of(extra: &str) -> String {
        Config::parse(&format!("{MIN}{extra}"), Path::new("c.toml")).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        let e = error_of("[pop3]\nidle_timeout_secs = 30\n");
        assert!(e.starts_with("c.toml:9:"), "{e}");
        assert!(e.contains("RFC 1939"), "{e}");
        let e = error_of("[pop3]\nbogus_key = 1\n");
        assert!(e.starts_with("c.toml:9:") && e.contains("bogus_key"), "{e}");
        let e = Config::parse(&MIN.replace("file:master.key", "s3cr3t-literal"), Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml:4:") && e.contains("literal secrets"), "{e}");
        assert!(!e.contains("s3cr3t-literal"), "error must not echo the secret: {e}");
        let e = error_of("[log]\nformat = \"xml\"\n");
        assert!(e.contains("c.toml:9:"), "{e}");
        let e = error_of("[pop3]\nplaintext_auth_networks = [\"10.0.0.0/33\"]\n");
        assert!(e.contains("not a CIDR"), "{e}");
        let e = error_of("[store.extra]\n");
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn lmtp_inflight_budget_must_hold_one_maximum_message() {
        let e = error_of("[lmtp]\nmax_inflight_data = 65536\n");
        assert!(e.contains("max_inflight_data is smaller than max_message_size"), "{e}");
        let e = error_of("[lmtp]\ndata_min_rate = 0\n");
        assert!(e.contains("octets per second"), "{e}");
        let cfg = Config::parse(
            &format!("{MIN}[lmtp]\nmax_message_size = 65536\nmax_inflight_data = 65536\n"),
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!((cfg.lmtp.max_inflight_data, cfg.lmtp.data_min_rate), (65536, 16 * 1024));
    }
}
