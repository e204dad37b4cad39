//! `[[log.sink]]`: where events go besides stderr. Several sinks at once;
//! each has its own bounded queue (see [`crate::telemetry::sink`]).
//!
//! ```toml
//! [[log.sink]]
//! type = "syslog"                  # RFC 5424
//! transport = "tls"                # RFC 5425 (default); "tcp" (RFC 6587) or "udp" (RFC 5426)
//! address = "siem.example.net:6514"
//! ca_file = "/etc/pop3connex/siem-ca.pem"   # default: the system roots
//!
//! [[log.sink]]
//! type = "json"                    # ECS JSON lines appended to a file
//! path = "/var/log/pop3connex/events.json"
//! ```
//!
//! The secure default is TLS with certificate verification. Plain TCP or
//! UDP is accepted to a loopback address (a local relay); elsewhere only
//! with `insecure_plaintext = true`, because events carry user names and
//! client addresses.
//!
//! Everything is checked while the file is parsed, so a mistake is
//! reported with its line and the key it concerns.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::telemetry::Severity;

/// One `[[log.sink]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    Syslog(SyslogSinkConfig),
    Json(JsonSinkConfig),
}

impl SinkConfig {
    /// The name used in this sink's own events (`sink` field).
    pub fn name(&self) -> &str {
        match self {
            SinkConfig::Syslog(s) => &s.name,
            SinkConfig::Json(j) => &j.name,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyslogTransport {
    Udp,
    Tcp,
    Tls,
}

impl SyslogTransport {
    pub fn as_str(self) -> &'static str {
        match self {
            SyslogTransport::Udp => "udp",
            SyslogTransport::Tcp => "tcp",
            SyslogTransport::Tls => "tls",
        }
    }
}

/// `type = "syslog"`, checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawSyslog")]
pub struct SyslogSinkConfig {
    pub name: String,
    pub transport: SyslogTransport,
    /// Host name or address (without brackets) and port.
    pub host: String,
    pub port: u16,
    /// Trust anchors for TLS; `None`: the system roots.
    pub ca_file: Option<PathBuf>,
    /// The name the certificate must carry (default: the host).
    pub server_name: String,
    /// Client certificate chain and key (PEM) for mutual TLS.
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// RFC 5424 facility code (0..=23).
    pub facility: u8,
    pub app_name: String,
    pub queue: usize,
    pub min_severity: Severity,
    /// Largest message sent (bytes, without the TCP length prefix); longer
    /// ones lose fields from the end, then message text.
    pub max_message_bytes: usize,
}

/// `type = "json"`, checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawJson")]
pub struct JsonSinkConfig {
    pub name: String,
    pub path: PathBuf,
    pub queue: usize,
    pub min_severity: Severity,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSyslog {
    name: Option<String>,
    #[serde(default = "tls")]
    transport: SyslogTransport,
    address: String,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    client_certificate: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default = "mail")]
    facility: String,
    #[serde(default = "app")]
    app_name: String,
    #[serde(default = "queue")]
    queue: usize,
    #[serde(default = "info")]
    min_severity: String,
    #[serde(default)]
    insecure_plaintext: bool,
    max_message_bytes: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJson {
    name: Option<String>,
    path: PathBuf,
    #[serde(default = "queue")]
    queue: usize,
    #[serde(default = "info")]
    min_severity: String,
}

fn tls() -> SyslogTransport {
    SyslogTransport::Tls
}
fn mail() -> String {
    "mail".into()
}
fn app() -> String {
    "pop3connex".into()
}
fn queue() -> usize {
    10_000
}
fn info() -> String {
    "info".into()
}

const FACILITIES: &[&str] = &[
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp", "ntp",
    "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
];

const SEVERITIES: &[(&str, Severity)] = &[
    ("emergency", Severity::Emergency),
    ("alert", Severity::Alert),
    ("critical", Severity::Critical),
    ("error", Severity::Error),
    ("warning", Severity::Warning),
    ("notice", Severity::Notice),
    ("info", Severity::Info),
    ("debug", Severity::Debug),
];

fn severity(s: &str) -> Result<Severity, String> {
    SEVERITIES.iter().find(|(n, _)| *n == s).map(|(_, v)| *v).ok_or_else(|| {
        let names: Vec<_> = SEVERITIES.iter().map(|(n, _)| *n).collect();
        format!("min_severity: `{s}` is not one of {}", names.join(", "))
    })
}

fn check_queue(q: usize) -> Result<usize, String> {
    if (1..=1_000_000).contains(&q) {
        Ok(q)
    } else {
        Err(format!("queue: {q} is out of range (1..=1000000 events)"))
    }
}

/// Splits `host:port`, `[v6]:port`, `host` or a bare IPv6 address.
fn split_address(a: &str, default_port: u16) -> Result<(String, u16), String> {
    let bad = |why: &str| format!("address: `{a}` {why} (expected host:port)");
    if a.is_empty() {
        return Err(bad("is empty"));
    }
    if let Ok(ip) = a.parse::<std::net::IpAddr>() {
        return Ok((ip.to_string(), default_port));
    }
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(|| bad("has no closing `]`"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(bad("has text after `]`")),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("has an invalid port"))?,
        None => default_port,
    };
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && (host.parse::<std::net::IpAddr>().is_ok()
            || host
                .split('.')
                .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')));
    if !name_ok {
        return Err(bad("is not a host name or address"));
    }
    Ok((host.to_owned(), port))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl TryFrom<RawSyslog> for SyslogSinkConfig {
    type Error = String;

    fn try_from(r: RawSyslog) -> Result<Self, String> {
        let default_port = if r.transport == SyslogTransport::Tls { 6514 } else { 514 };
        let (host, port) = split_address(r.address.trim(), default_port)?;
        let plain = r.transport != SyslogTransport::Tls;
        if plain && !is_loopback(&host) && !r.insecure_plaintext {
            return Err(format!(
                "transport = \"{}\" sends events (user names, client addresses) unencrypted to {host}: \
                 use transport = \"tls\", or set insecure_plaintext = true to accept that",
                r.transport.as_str()
            ));
        }
        if plain {
            for (key, set) in [
                ("ca_file", r.ca_file.is_some()),
                ("server_name", r.server_name.is_some()),
                ("client_certificate", r.client_certificate.is_some()),
                ("client_key", r.client_key.is_some()),
            ] {
                if set {
                    return Err(format!("{key} applies to transport = \"tls\" only"));
                }
            }
        }
        if r.client_certificate.is_some() != r.client_key.is_some() {
            return Err("client_certificate and client_key go together (mutual TLS)".into());
        }
        let server_name = r.server_name.unwrap_or_else(|| host.clone());
        if rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err() {
            return Err(format!("server_name: `{server_name}` is not a DNS name or IP address"));
        }
        let facility = FACILITIES
            .iter()
            .position(|f| *f == r.facility)
            .ok_or_else(|| format!("facility: `{}` is not one of {}", r.facility, FACILITIES.join(", ")))?;
        let app_ok = (1..=48).contains(&r.app_name.len()) && r.app_name.bytes().all(|b| (33..=126).contains(&b));
        if !app_ok {
            return Err(format!("app_name: `{}` must be 1 to 48 printable ASCII characters", r.app_name));
        }
        let max = r.max_message_bytes.unwrap_or(if plain && r.transport == SyslogTransport::Udp { 2048 } else { 8192 });
        if !(1024..=65_000).contains(&max) {
            return Err(format!("max_message_bytes: {max} is out of range (1024..=65000)"));
        }
        Ok(SyslogSinkConfig {
            name: r.name.unwrap_or_else(|| format!("syslog-{}:{}:{port}", r.transport.as_str(), host)),
            transport: r.transport,
            host,
            port,
            ca_file: r.ca_file,
            server_name,
            client_certificate: r.client_certificate,
            client_key: r.client_key,
            facility: facility as u8,
            app_name: r.app_name,
            queue: check_queue(r.queue)?,
            min_severity: severity(&r.min_severity)?,
            max_message_bytes: max,
        })
    }
}

impl TryFrom<RawJson> for JsonSinkConfig {
    type Error = String;

    fn try_from(r: RawJson) -> Result<Self, String> {
        if r.path.as_os_str().is_empty() {
            return Err("path: must name a file".into());
        }
        Ok(JsonSinkConfig {
            name: r.name.unwrap_or_else(|| format!("json:{}", r.path.display())),
            path: r.path,
            queue: check_queue(r.queue)?,
            min_severity: severity(&r.min_severity)?,
        })
    }
}

/// Makes the sinks' relative paths relative to the configuration file's
/// directory, like every other path in the file.
pub fn resolve_paths(sinks: &mut [SinkConfig], base: &Path) {
    let abs = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    for s in sinks {
        match s {
            SinkConfig::Syslog(s) => {
                s.ca_file.iter_mut().for_each(abs);
                s.client_certificate.iter_mut().for_each(abs);
                s.client_key.iter_mut().for_each(abs);
            }
            SinkConfig::Json(j) => abs(&mut j.path),
        }
    }
}

/// Checks across sinks: names are unique (they identify a sink in its
/// events and metrics).
pub fn check(sinks: &[SinkConfig]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for s in sinks {
        if !seen.insert(s.name()) {
            return Err(format!("[[log.sink]] name `{}` is used twice (set name = \"...\")", s.name()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Log {
        #[serde(default)]
        sink: Vec<SinkConfig>,
    }
    #[derive(Deserialize)]
    struct Doc {
        log: Log,
    }

    fn parse(toml_text: &str) -> Result<Vec<SinkConfig>, String> {
        toml::from_str::<Doc>(toml_text).map(|d| d.log.sink).map_err(|e| e.message().to_owned())
    }

    fn syslog(s: &SinkConfig) -> &SyslogSinkConfig {
        match s {
            SinkConfig::Syslog(s) => s,
            _ => panic!("not syslog"),
        }
    }

    #[test]
    fn defaults_are_tls_on_6514_mail_info() {
        let s = parse("[[log.sink]]\ntype = \"syslog\"\naddress = \"siem.example.net\"\n").unwrap();
        let s = syslog(&s[0]);
        assert_eq!(s.transport, SyslogTransport::Tls);
        assert_eq!((s.host.as_str(), s.port), ("siem.example.net", 6514));
        assert_eq!(s.server_name, "siem.example.net");
        assert_eq!(s.facility, 2);
        assert_eq!(s.app_name, "pop3connex");
        assert_eq!(s.queue, 10_000);
        assert_eq!(s.min_severity, Severity::Info);
        assert_eq!(s.max_message_bytes, 8192);
        assert!(s.ca_file.is_none());
    }

    #[test]
    fn addresses_parse_with_and_without_port() {
        assert_eq!(split_address("[::1]:601", 514).unwrap(), ("::1".into(), 601));
        assert_eq!(split_address("::1", 514).unwrap(), ("::1".into(), 514));
        assert_eq!(split_address("127.0.0.1:1514", 514).unwrap(), ("127.0.0.1".into(), 1514));
        assert!(split_address("host:0", 514).is_err());
        assert!(split_address("host:99999", 514).is_err());
        assert!(split_address("bad host:1", 514).is_err());
        assert!(split_address("[::1", 514).is_err());
    }

    #[test]
    fn udp_and_tcp_default_to_514_on_loopback() {
        let s = parse("[[log.sink]]\ntype = \"syslog\"\ntransport = \"udp\"\naddress = \"127.0.0.1\"\n").unwrap();
        let s = syslog(&s[0]);
        assert_eq!((s.port, s.max_message_bytes), (514, 2048));
        let s = parse("[[log.sink]]\ntype = \"syslog\"\ntransport = \"tcp\"\naddress = \"localhost:5140\"\n").unwrap();
        assert_eq!(syslog(&s[0]).port, 5140);
    }

    #[test]
    fn plaintext_to_a_remote_host_needs_explicit_consent() {
        for t in ["tcp", "udp"] {
            let text = format!("[[log.sink]]\ntype = \"syslog\"\ntransport = \"{t}\"\naddress = \"192.0.2.1:514\"\n");
            let e = parse(&text).unwrap_err();
            assert!(e.contains("insecure_plaintext") && e.contains("unencrypted"), "{e}");
            let ok = parse(&format!("{text}insecure_plaintext = true\n")).unwrap();
            assert_eq!(syslog(&ok[0]).transport.as_str(), t);
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("facility = \"mial\"", "facility"),
            ("min_severity = \"loud\"", "min_severity"),
            ("queue = 0", "queue"),
            ("app_name = \"two words\"", "app_name"),
            ("max_message_bytes = 100", "max_message_bytes"),
            ("client_key = \"k.pem\"", "client_certificate and client_key"),
            ("server_name = \"not a name!\"", "server_name"),
            ("colour = \"blue\"", "colour"),
        ];
        for (line, key) in cases {
            let e = parse(&format!("[[log.sink]]\ntype = \"syslog\"\naddress = \"h.example\"\n{line}\n")).unwrap_err();
            assert!(e.contains(key), "{line}: {e}");
        }
        let e = parse("[[log.sink]]\ntype = \"syslog\"\ntransport = \"tcp\"\naddress = \"::1\"\nca_file = \"x\"\n")
            .unwrap_err();
        assert!(e.contains("ca_file"), "{e}");
        let e = parse("[[log.sink]]\ntype = \"carrier-pigeon\"\n").unwrap_err();
        assert!(e.contains("carrier-pigeon"), "{e}");
    }

    #[test]
    fn json_sink_and_paths_relative_to_the_config() {
        let mut s = parse(
            "[[log.sink]]\ntype = \"json\"\npath = \"events.json\"\nmin_severity = \"warning\"\n\
             [[log.sink]]\ntype = \"syslog\"\naddress = \"h.example\"\nca_file = \"ca.pem\"\n",
        )
        .unwrap();
        resolve_paths(&mut s, Path::new("/etc/p"));
        match &s[0] {
            SinkConfig::Json(j) => {
                assert_eq!(j.path, Path::new("/etc/p/events.json"));
                assert_eq!(j.min_severity, Severity::Warning);
            }
            _ => panic!(),
        }
        assert_eq!(syslog(&s[1]).ca_file.as_deref(), Some(Path::new("/etc/p/ca.pem")));
        check(&s).unwrap();
        let twice = parse("[[log.sink]]\ntype = \"json\"\npath = \"a\"\n[[log.sink]]\ntype = \"json\"\npath = \"a\"\n")
            .unwrap();
        assert!(check(&twice).unwrap_err().contains("used twice"));
    }
}
