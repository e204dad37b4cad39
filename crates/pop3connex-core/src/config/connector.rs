//! `[connector]`: upstream accounts, routing, downstream servers, DNS.
//!
//! Accounts come from the configuration file (`[[connector.accounts]]`) and
//! from the store (`pop3connex connector add`, same shape, serialised as
//! TOML). Credentials are secret references in both.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{de::Error as _, Deserialize, Deserializer, Serialize};

use super::bounded;
use crate::secret::SecretRef;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectorConfig {
    /// Run the account schedules inside `pop3connex serve`.
    pub enabled: bool,
    /// Accounts fetched at the same time.
    #[serde(deserialize_with = "count_1_64")]
    pub max_concurrent: u64,
    /// Random spread added to every interval, in percent of it.
    #[serde(deserialize_with = "percent_0_50")]
    pub jitter_percent: u64,
    /// Local user that receives mail that cannot be routed or was refused
    /// permanently downstream.
    pub quarantine_user: String,
    /// Received headers above which a message is treated as looping.
    #[serde(deserialize_with = "count_1_200")]
    pub max_hops: u64,
    /// How long duplicate keys are remembered.
    #[serde(deserialize_with = "count_1_3650")]
    pub dedup_days: u64,
    /// First retry delay after a temporary failure; doubles up to `retry_max_secs`.
    #[serde(deserialize_with = "secs_10_86400")]
    pub retry_base_secs: u64,
    #[serde(deserialize_with = "secs_10_86400")]
    pub retry_max_secs: u64,
    /// Program run for every alert-worthy event, with the event as one JSON
    /// object on standard input (empty: no hook).
    pub alert_command: Vec<String>,
    pub dns: DnsConfig,
    pub accounts: Vec<AccountConfig>,
    pub downstreams: Vec<DownstreamConfig>,
}

impl Default for ConnectorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_concurrent: 4,
            jitter_percent: 10,
            quarantine_user: "quarantine".into(),
            max_hops: 30,
            dedup_days: 30,
            retry_base_secs: 60,
            retry_max_secs: 3600,
            alert_command: Vec::new(),
            dns: DnsConfig::default(),
            accounts: Vec::new(),
            downstreams: Vec::new(),
        }
    }
}

/// The connector's DNS resolver (MX, TLSA, MTA-STS), validating DNSSEC.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Recursive resolvers (`IP:PORT`); empty: /etc/resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    /// DNSSEC trust anchors (DNSKEY or DS records in zone-file form); empty:
    /// the built-in root anchors.
    pub trust_anchor_file: Option<PathBuf>,
    #[serde(deserialize_with = "ms_100_30000")]
    pub timeout_ms: u64,
    /// Port of MTA-STS policy hosts (443; other values are for test set-ups).
    pub mta_sts_port: u16,
    /// CA bundle for MTA-STS policy hosts; empty: the system roots.
    pub mta_sts_ca_file: Option<PathBuf>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            trust_anchor_file: None,
            timeout_ms: 5000,
            mta_sts_port: 443,
            mta_sts_ca_file: None,
        }
    }
}

/// How the upstream connection gets TLS. There is no "TLS if available".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// TLS from the first byte (POP3S, port 995).
    Implicit,
    /// Plain connection upgraded with STLS, which must succeed (port 110).
    Starttls,
}

/// Which SASL mechanism or command logs in upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamAuth {
    /// SCRAM-SHA-256 when the server offers it, else PLAIN, else USER/PASS;
    /// XOAUTH2/OAUTHBEARER when the account has `oauth2`.
    #[default]
    Auto,
    #[serde(rename = "scram-sha-256", alias = "scram-sha256")]
    ScramSha256,
    Plain,
    User,
    Xoauth2,
    Oauthbearer,
}

/// OAuth 2.0 token endpoint presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OAuth2Preset {
    Microsoft365,
    Google,
}

/// Refresh-token grant (RFC 6749 section 6) for XOAUTH2/OAUTHBEARER upstream.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2ClientConfig {
    pub preset: Option<OAuth2Preset>,
    /// Token endpoint; required without a preset, overrides the preset's.
    pub token_url: Option<String>,
    pub client_id: String,
    #[serde(default, serialize_with = "ser_opt_secret")]
    pub client_secret: Option<SecretRef>,
    /// The initial refresh token; rotated tokens are kept sealed in the store.
    #[serde(serialize_with = "ser_secret")]
    pub refresh_token: SecretRef,
    /// Requested scope; the preset's default when unset.
    pub scope: Option<String>,
    /// CA bundle for the token endpoint; empty: system roots.
    pub ca_file: Option<PathBuf>,
}

/// When upstream copies are deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeletePolicy {
    /// Leave on the server for ever (UIDL tracking prevents re-fetching).
    Never,
    /// Delete once the message is durable locally or accepted downstream.
    AfterDelivery,
    /// Leave on the server, delete `delete_after_days` after the fetch.
    AfterDays,
}

/// What happens to a message above `max_message_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OversizePolicy {
    /// Leave it upstream, remember it, emit an event.
    Skip,
    /// Delete it upstream after emitting the event.
    Delete,
}

/// One upstream POP3 mailbox.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// Identifier (letters, digits, `-`, `_`, `.`); keys the UIDL state.
    pub name: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    pub host: String,
    /// Default: 995 for implicit TLS, 110 for STLS.
    pub port: Option<u16>,
    pub tls: UpstreamTls,
    /// CA bundle that verifies the upstream certificate; empty: system roots.
    pub ca_file: Option<PathBuf>,
    /// Optional pins: `sha256/<base64 of the SHA-256 of the SubjectPublicKeyInfo>`;
    /// when set, the certificate must also match one of them.
    #[serde(default)]
    pub spki_pins: Vec<String>,
    pub user: String,
    #[serde(default, serialize_with = "ser_opt_secret")]
    pub password: Option<SecretRef>,
    #[serde(default)]
    pub auth: UpstreamAuth,
    pub oauth2: Option<OAuth2ClientConfig>,
    #[serde(default = "default_interval", deserialize_with = "secs_30_86400")]
    pub interval_secs: u64,
    #[serde(default = "default_delete")]
    pub delete: DeletePolicy,
    pub delete_after_days: Option<u64>,
    #[serde(default = "default_max_size", deserialize_with = "size_1k_1g")]
    pub max_message_size: u64,
    #[serde(default = "default_oversize")]
    pub oversize: OversizePolicy,
    #[serde(default = "default_max_messages", deserialize_with = "count_1_1m")]
    pub max_messages_per_run: u64,
    #[serde(default = "default_max_bytes", deserialize_with = "size_1k_1t")]
    pub max_bytes_per_run: u64,
    /// Seconds of silence tolerated from the upstream server per response.
    #[serde(default = "default_timeout", deserialize_with = "secs_5_600")]
    pub timeout_secs: u64,
    pub route: RouteConfig,
}

fn yes() -> bool {
    true
}
fn default_interval() -> u64 {
    300
}
fn default_delete() -> DeletePolicy {
    DeletePolicy::Never
}
fn default_max_size() -> u64 {
    50 * 1024 * 1024
}
fn default_oversize() -> OversizePolicy {
    OversizePolicy::Skip
}
fn default_max_messages() -> u64 {
    1000
}
fn default_max_bytes() -> u64 {
    1 << 30
}
fn default_timeout() -> u64 {
    60
}

impl AccountConfig {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            UpstreamTls::Implicit => 995,
            UpstreamTls::Starttls => 110,
        })
    }
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Target {
    /// A local mailbox (`*` in a domain rule: the envelope local part).
    Local { local: String },
    /// An address at a downstream server (`*` in a domain rule: the envelope
    /// address itself).
    Forward { forward: String, via: String },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Local { local } => write!(f, "local:{local}"),
            Target::Forward { forward, via } => write!(f, "{forward} via {via}"),
        }
    }
}

/// Envelope headers a catch-all mailbox can be routed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum EnvelopeHeader {
    #[serde(rename = "Delivered-To")]
    DeliveredTo,
    #[serde(rename = "X-Original-To")]
    XOriginalTo,
    #[serde(rename = "Envelope-To")]
    EnvelopeTo,
}

impl EnvelopeHeader {
    pub fn name(self) -> &'static str {
        match self {
            EnvelopeHeader::DeliveredTo => "Delivered-To",
            EnvelopeHeader::XOriginalTo => "X-Original-To",
            EnvelopeHeader::EnvelopeTo => "Envelope-To",
        }
    }
}

/// Which occurrence of the envelope header counts. Headers are numbered
/// from the top (the newest, added by the last hop) starting at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occurrence {
    First,
    Last,
    Nth(u32),
}

impl Serialize for Occurrence {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Occurrence::First => s.serialize_str("first"),
            Occurrence::Last => s.serialize_str("last"),
            Occurrence::Nth(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Occurrence {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            N(u32),
        }
        match Raw::deserialize(d)? {
            Raw::S(s) if s == "first" => Ok(Occurrence::First),
            Raw::S(s) if s == "last" => Ok(Occurrence::Last),
            Raw::N(n) if n >= 1 => Ok(Occurrence::Nth(n)),
            _ => Err(D::Error::custom("must be \"first\", \"last\" or a position from 1")),
        }
    }
}

/// Per-account routing: a fixed target, or catch-all by envelope header.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Every message of the account goes here.
    pub deliver_to: Option<Target>,
    /// Catch-all: read the recipient from this header.
    pub envelope_header: Option<EnvelopeHeader>,
    #[serde(default = "first")]
    pub header_occurrence: Occurrence,
    /// Exact recipient addresses (lower-case) to targets.
    #[serde(default)]
    pub addresses: BTreeMap<String, Target>,
    /// Recipient domains (lower-case) to targets; `*` stands for the local
    /// part (local) or the whole address (forward).
    #[serde(default)]
    pub domains: BTreeMap<String, Target>,
    /// Fall back to To/Cc when the envelope header is missing. Unreliable
    /// (Bcc recipients are lost, lists misroute); off by default and
    /// reported by the audit when on.
    #[serde(default)]
    pub guess_from_to_cc: bool,
}

fn first() -> Occurrence {
    Occurrence::First
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DownstreamProtocol {
    Smtp,
    Lmtp,
}

/// TLS policy for a downstream server, after Postfix's security levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DownstreamTls {
    /// No TLS: only for a loopback address or a UNIX socket.
    None,
    /// STARTTLS required, certificate chain verified, name = the host connected to.
    Verify,
    /// STARTTLS required, chain verified, name = the configured host or the
    /// recipient domain (MX names are not trusted).
    Secure,
    /// MX delivery: DANE (RFC 7672) when the MX host has DNSSEC-valid TLSA
    /// records; otherwise as `mta-sts`.
    Dane,
    /// MX delivery: MTA-STS (RFC 8461) policy in enforce mode required.
    MtaSts,
}

/// A server messages are forwarded to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DownstreamConfig {
    pub name: String,
    pub protocol: DownstreamProtocol,
    /// A fixed host name or IP address, or `unix:/path` (LMTP). Without it
    /// the recipient domain's MX records are used.
    pub host: Option<String>,
    /// Default: 25 for SMTP, 24 for LMTP.
    pub port: Option<u16>,
    /// Default: `secure` with `host`, `dane` for MX delivery.
    pub tls: Option<DownstreamTls>,
    /// CA bundle; empty: system roots.
    pub ca_file: Option<PathBuf>,
    /// Name sent in EHLO/LHLO; default: `[server] hostname`.
    pub helo: Option<String>,
    /// SMTP AUTH (PLAIN), only ever sent after TLS.
    pub auth_user: Option<String>,
    #[serde(default, serialize_with = "ser_opt_secret")]
    pub auth_password: Option<SecretRef>,
    #[serde(default = "default_timeout", deserialize_with = "secs_5_600")]
    pub timeout_secs: u64,
}

impl DownstreamConfig {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.protocol {
            DownstreamProtocol::Smtp => 25,
            DownstreamProtocol::Lmtp => 24,
        })
    }

    pub fn tls(&self) -> DownstreamTls {
        self.tls.unwrap_or(if self.host.is_some() { DownstreamTls::Secure } else { DownstreamTls::Dane })
    }
}

fn ser_secret<S: serde::Serializer>(r: &SecretRef, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&r.to_string())
}

fn ser_opt_secret<S: serde::Serializer>(r: &Option<SecretRef>, s: S) -> Result<S::Ok, S::Error> {
    match r {
        Some(r) => s.serialize_some(&r.to_string()),
        None => s.serialize_none(),
    }
}

bounded! {
    count_1_64: 1, 64, "";
    count_1_200: 1, 200, "";
    count_1_3650: 1, 3650, "";
    count_1_1m: 1, 1_000_000, "";
    percent_0_50: 0, 50, " percent";
    secs_5_600: 5, 600, " seconds";
    secs_10_86400: 10, 86_400, " seconds";
    secs_30_86400: 30, 86_400, " seconds";
    ms_100_30000: 100, 30_000, " milliseconds";
    size_1k_1g: 1024, 1u64 << 30, " octets";
    size_1k_1t: 1024, 1u64 << 40, " octets";
}

pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn is_loopback_host(host: &str) -> bool {
    host.starts_with("unix:")
        || host.eq_ignore_ascii_case("localhost")
        || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl ConnectorConfig {
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for p in [&mut self.dns.trust_anchor_file, &mut self.dns.mta_sts_ca_file].into_iter().flatten() {
            abs(p);
        }
        for a in &mut self.accounts {
            a.resolve_paths(base);
        }
        for d in &mut self.downstreams {
            if let Some(p) = &mut d.ca_file {
                abs(p);
            }
            if let Some(r) = &mut d.auth_password {
                r.resolve_against(base);
            }
        }
    }

    /// Checks one account against the downstreams (config and CLI accounts).
    pub fn check_account(&self, a: &AccountConfig) -> Result<(), String> {
        let ctx = |m: String| format!("connector account `{}`: {m}", a.name);
        if !valid_name(&a.name) {
            return Err(format!("connector account name `{}`: use letters, digits, '-', '_', '.'", a.name));
        }
        if a.host.is_empty() || a.user.is_empty() {
            return Err(ctx("host and user are required".into()));
        }
        match (a.delete, a.delete_after_days) {
            (DeletePolicy::AfterDays, None) => {
                return Err(ctx("delete = \"after-days\" needs delete_after_days".into()))
            }
            (DeletePolicy::AfterDays, Some(0)) | (DeletePolicy::AfterDays, Some(3651..)) => {
                return Err(ctx("delete_after_days must be between 1 and 3650".into()))
            }
            (DeletePolicy::Never | DeletePolicy::AfterDelivery, Some(_)) => {
                return Err(ctx("delete_after_days needs delete = \"after-days\"".into()))
            }
            _ => {}
        }
        let oauth = matches!(a.auth, UpstreamAuth::Xoauth2 | UpstreamAuth::Oauthbearer);
        if oauth && a.oauth2.is_none() {
            return Err(ctx("XOAUTH2/OAUTHBEARER need an [oauth2] table".into()));
        }
        if a.oauth2.is_none() && a.password.is_none() {
            return Err(ctx("set password (a secret reference) or oauth2".into()));
        }
        if let Some(o) = &a.oauth2 {
            if o.preset.is_none() && o.token_url.is_none() {
                return Err(ctx("oauth2 needs a preset or token_url".into()));
            }
            if let Some(u) = &o.token_url {
                if !u.starts_with("https://") {
                    return Err(ctx("oauth2 token_url must be https://".into()));
                }
            }
        }
        for pin in &a.spki_pins {
            let ok = pin.strip_prefix("sha256/").is_some_and(|b| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.decode(b).is_ok_and(|v| v.len() == 32)
            });
            if !ok {
                return Err(ctx(format!("spki pin `{pin}` is not sha256/<base64 of 32 bytes>")));
            }
        }
        let r = &a.route;
        match (&r.deliver_to, r.envelope_header) {
            (Some(_), Some(_)) => return Err(ctx("route: set deliver_to or envelope_header, not both".into())),
            (None, None) => return Err(ctx("route: set deliver_to or envelope_header".into())),
            _ => {}
        }
        if r.deliver_to.is_some() && (!r.addresses.is_empty() || !r.domains.is_empty() || r.guess_from_to_cc) {
            return Err(ctx("route: addresses, domains and guess_from_to_cc need envelope_header".into()));
        }
        let targets = r.deliver_to.iter().chain(r.addresses.values()).map(|t| (t, false));
        for (t, wildcard_ok) in targets.chain(r.domains.values().map(|t| (t, true))) {
            match t {
                Target::Local { local } => {
                    if local == "*" && !wildcard_ok {
                        return Err(ctx("route: `*` is only allowed in domains".into()));
                    }
                }
                Target::Forward { forward, via } => {
                    if forward == "*" && !wildcard_ok {
                        return Err(ctx("route: `*` is only allowed in domains".into()));
                    }
                    if forward != "*" && !forward.contains('@') {
                        return Err(ctx(format!("route: `{forward}` is not an address")));
                    }
                    if !self.downstreams.iter().any(|d| &d.name == via) {
                        return Err(ctx(format!("route: no [[connector.downstreams]] named `{via}`")));
                    }
                }
            }
        }
        for k in r.addresses.keys().chain(r.domains.keys()) {
            if k.chars().any(|c| c.is_ascii_uppercase()) {
                return Err(ctx(format!("route: write `{k}` in lower case")));
            }
        }
        Ok(())
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for d in &self.downstreams {
            if !valid_name(&d.name) || !names.insert(d.name.clone()) {
                return Err(format!("downstream `{}`: names must be unique letters, digits, '-', '_', '.'", d.name));
            }
            let tls = d.tls();
            match (&d.host, tls) {
                (Some(h), DownstreamTls::None) if !is_loopback_host(h) => {
                    return Err(format!(
                        "downstream `{}`: tls = \"none\" is only allowed for loopback or unix:",
                        d.name
                    ))
                }
                (None, DownstreamTls::None) => {
                    return Err(format!(
                        "downstream `{}`: MX delivery (no host) needs TLS: dane, mta-sts, verify or secure",
                        d.name
                    ))
                }
                (Some(h), _) if h.starts_with("unix:") && d.protocol != DownstreamProtocol::Lmtp => {
                    return Err(format!("downstream `{}`: unix: sockets are for LMTP", d.name))
                }
                (Some(h), t) if h.starts_with("unix:") && t != DownstreamTls::None => {
                    return Err(format!("downstream `{}`: a unix: socket takes tls = \"none\"", d.name))
                }
                (Some(_), DownstreamTls::Dane | DownstreamTls::MtaSts) => {
                    return Err(format!("downstream `{}`: dane and mta-sts apply to MX delivery (no host)", d.name))
                }
                _ => {}
            }
            if d.auth_user.is_some() != d.auth_password.is_some() {
                return Err(format!("downstream `{}`: auth_user and auth_password go together", d.name));
            }
            if d.auth_user.is_some() && tls == DownstreamTls::None {
                return Err(format!("downstream `{}`: SMTP AUTH is only sent over TLS", d.name));
            }
            // Credentials go to a fixed host or a DANE-authenticated MX,
            // never to an MX host that unsigned DNS picked (the client
            // enforces this per host as well).
            if d.auth_user.is_some() && d.host.is_none() && tls != DownstreamTls::Dane {
                return Err(format!(
                    "downstream `{}`: SMTP AUTH to MX hosts needs tls = \"dane\" (credentials are only sent to a \
                     fixed host or a DANE-authenticated MX host)",
                    d.name
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for a in &self.accounts {
            if !names.insert(a.name.clone()) {
                return Err(format!("connector account `{}` is defined twice", a.name));
            }
            self.check_account(a)?;
        }
        if self.retry_base_secs > self.retry_max_secs {
            return Err("[connector] retry_base_secs exceeds retry_max_secs".into());
        }
        if self.accounts.iter().any(|a| a.route.guess_from_to_cc) {
            tracing::warn!(
                "a connector account guesses recipients from To/Cc: Bcc recipients and list mail will be misrouted"
            );
        }
        Ok(())
    }
}

impl AccountConfig {
    pub fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = &mut self.ca_file {
            abs(p);
        }
        if let Some(r) = &mut self.password {
            r.resolve_against(base);
        }
        if let Some(o) = &mut self.oauth2 {
            if let Some(p) = &mut o.ca_file {
                abs(p);
            }
            o.refresh_token.resolve_against(base);
            if let Some(r) = &mut o.client_secret {
                r.resolve_against(base);
            }
        }
    }

    /// Parses an account stored by `connector add` (TOML).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.message().to_owned())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("account serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConnectorConfig, String> {
        let c: ConnectorConfig = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        c.check()?;
        Ok(c)
    }

    const ACCOUNT: &str = "[[accounts]]\nname = \"isp\"\nhost = \"pop.example.net\"\ntls = \"implicit\"\n\
                           user = \"alice\"\npassword = \"env:ISP_PASSWORD\"\n";

    #[test]
    fn fixed_and_catch_all_routes() {
        let c = parse(&format!("{ACCOUNT}[accounts.route]\ndeliver_to = {{ local = \"alice\" }}\n")).unwrap();
        assert_eq!(c.accounts[0].port(), 995);
        assert_eq!(c.accounts[0].delete, DeletePolicy::Never);
        let c = parse(&format!(
            "[[downstreams]]\nname = \"exchange\"\nprotocol = \"smtp\"\nhost = \"ex.corp.example\"\n\
             {ACCOUNT}[accounts.route]\nenvelope_header = \"X-Original-To\"\nheader_occurrence = 2\n\
             addresses = {{ \"info@example.com\" = {{ local = \"bob\" }} }}\n\
             domains = {{ \"example.com\" = {{ local = \"*\" }}, \"corp.example\" = {{ forward = \"*\", via = \"exchange\" }} }}\n"
        ))
        .unwrap();
        let r = &c.accounts[0].route;
        assert_eq!(r.header_occurrence, Occurrence::Nth(2));
        assert_eq!(r.domains["corp.example"], Target::Forward { forward: "*".into(), via: "exchange".into() });
        assert_eq!(c.downstreams[0].tls(), DownstreamTls::Secure);
        // The account survives a round trip through the store's TOML form.
        let again = AccountConfig::from_toml(&c.accounts[0].to_toml()).unwrap();
        assert_eq!(again.route.domains, r.domains);
        assert_eq!(again.password, c.accounts[0].password);
    }

    #[test]
    fn refuses_unsafe_or_inconsistent_settings() {
        let route = "[accounts.route]\ndeliver_to = { local = \"alice\" }\n";
        for (extra, needle) in [
            ("[accounts.route]\n", "deliver_to or envelope_header"),
            ("[accounts.route]\ndeliver_to = { forward = \"a@b\", via = \"nope\" }\n", "no [[connector.downstreams]]"),
            ("[accounts.route]\ndeliver_to = { local = \"*\" }\n", "only allowed in domains"),
        ] {
            let e = parse(&format!("{ACCOUNT}{extra}")).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        let e = parse(&format!("{}{route}", ACCOUNT.replace("implicit", "may"))).unwrap_err();
        assert!(e.contains("unknown variant"), "{e}");
        let e = parse(&format!("{}{route}", ACCOUNT.replace("env:ISP_PASSWORD", "hunter2"))).unwrap_err();
        assert!(e.contains("literal secrets") && !e.contains("hunter2"), "{e}");
        let e = parse(&format!("{ACCOUNT}spki_pins = [\"md5/abc\"]\n{route}")).unwrap_err();
        assert!(e.contains("spki pin"), "{e}");
        let e = parse(&format!("{ACCOUNT}delete = \"after-days\"\n{route}")).unwrap_err();
        assert!(e.contains("delete_after_days"), "{e}");
        let e =
            parse("[[downstreams]]\nname = \"x\"\nprotocol = \"smtp\"\nhost = \"mx.example.net\"\ntls = \"none\"\n")
                .unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        let e = parse("[[downstreams]]\nname = \"x\"\nprotocol = \"smtp\"\ntls = \"none\"\n").unwrap_err();
        assert!(e.contains("MX delivery"), "{e}");
        parse("[[downstreams]]\nname = \"x\"\nprotocol = \"smtp\"\ntls = \"secure\"\n").unwrap();
        let e = parse(
            "[[downstreams]]\nname = \"x\"\nprotocol = \"lmtp\"\nhost = \"127.0.0.1\"\ntls = \"none\"\n\
             auth_user = \"u\"\nauth_password = \"env:P\"\n",
        )
        .unwrap_err();
        assert!(e.contains("only sent over TLS"), "{e}");
    }

    #[test]
    fn smtp_auth_to_mx_chosen_by_unsigned_dns_is_refused() {
        let auth = "auth_user = \"u\"\nauth_password = \"env:P\"\n";
        for tls in ["verify", "secure", "mta-sts"] {
            let e = parse(&format!("[[downstreams]]\nname = \"x\"\nprotocol = \"smtp\"\ntls = \"{tls}\"\n{auth}"))
                .unwrap_err();
            assert!(e.contains("needs tls = \"dane\"") && e.contains("`x`"), "{tls}: {e}");
        }
        // DANE MX (also the default without host) and fixed hosts may authenticate.
        parse(&format!("[[downstreams]]\nname = \"x\"\nprotocol = \"smtp\"\ntls = \"dane\"\n{auth}")).unwrap();
        parse(&format!("[[downstreams]]\nname = \"x\"\nprotocol = \"smtp\"\n{auth}")).unwrap();
        for tls in ["verify", "secure"] {
            parse(&format!(
                "[[downstreams]]\nname = \"x\"\nprotocol = \"smtp\"\nhost = \"relay.example.net\"\ntls = \"{tls}\"\n{auth}"
            ))
            .unwrap();
        }
    }
}
