//! `[admin]`: the HTTPS admin plane (API and web console). Absent, the
//! admin plane is off. Parsed and checked here; the roles it defines are
//! [`crate::rbac`] roles.
//!
//! The listener is loopback-only by default: `allow_networks` is checked
//! before the TLS handshake, and `trusted_proxies` names the only peers
//! whose `X-Forwarded-For` is believed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{de::Error as _, Deserialize, Deserializer};

use super::{bounded, Network};
use crate::rbac::Roles;
use crate::secret::SecretRef;

pub use crate::rbac::RoleConfig;

/// The `[admin]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// HTTPS listeners of the admin plane (required, at least one).
    pub listen: Vec<SocketAddr>,
    /// Peers allowed to connect at all; others are dropped before TLS.
    /// Default: loopback only.
    #[serde(default = "loopback")]
    pub allow_networks: Vec<Network>,
    /// Reverse proxies whose `X-Forwarded-For` is believed (the rightmost
    /// address that is not a trusted proxy is the client). Empty: the
    /// header is ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<Network>,
    /// The origin browsers use (`https://host[:port]`): checked against
    /// `Origin` headers, the WebAuthn origin; its host is the WebAuthn
    /// relying-party id. Default `https://<server.hostname>:<first listen port>`
    /// (filled in by [`AdminConfig::finish`]).
    #[serde(default)]
    pub public_origin: String,
    /// Certificate chain for the admin listener; default: `[tls] certificate`.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    /// Its private key; default: `[tls] private_key`.
    #[serde(default)]
    pub private_key: Option<SecretRef>,
    /// A console session ends after this long without a request.
    #[serde(default = "default_idle", deserialize_with = "secs_60_86400")]
    pub session_idle_secs: u64,
    /// A console session ends this long after login, active or not.
    #[serde(default = "default_absolute", deserialize_with = "secs_300_604800")]
    pub session_absolute_secs: u64,
    /// How long a step-up (fresh second-factor check) allows destructive actions.
    #[serde(default = "default_step_up", deserialize_with = "secs_30_3600")]
    pub step_up_secs: u64,
    /// Failed admin logins from one address, within `[abuse] window_secs`,
    /// before that address is banned.
    #[serde(default = "default_failures", deserialize_with = "count_1_1000")]
    pub login_failures_before_ban: u64,
    /// Longest lifetime of a service token, in days.
    #[serde(default = "default_token_days", deserialize_with = "days_1_3650")]
    pub max_token_days: u64,
    /// Custom roles (`[admin.roles.NAME]`), besides the built-in ones.
    #[serde(default)]
    pub roles: BTreeMap<String, RoleConfig>,
}

fn loopback() -> Vec<Network> {
    vec![Network("127.0.0.1/32".parse().expect("literal CIDR")), Network("::1/128".parse().expect("literal CIDR"))]
}

fn default_idle() -> u64 {
    900
}
fn default_absolute() -> u64 {
    8 * 3600
}
fn default_step_up() -> u64 {
    600
}
fn default_failures() -> u64 {
    10
}
fn default_token_days() -> u64 {
    365
}

bounded! {
    secs_60_86400: 60, 86_400, " seconds";
    secs_300_604800: 300, 604_800, " seconds";
    secs_30_3600: 30, 3600, " seconds";
    count_1_1000: 1, 1000, "";
    days_1_3650: 1, 3650, " days";
}

impl AdminConfig {
    /// Makes relative paths relative to `base` and fills in the default
    /// `public_origin` from the server's host name.
    pub fn finish(&mut self, base: &Path, hostname: &str) {
        if let Some(p) = &mut self.certificate {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(k) = &mut self.private_key {
            k.resolve_against(base);
        }
        if self.public_origin.is_empty() {
            if let Some(first) = self.listen.first() {
                self.public_origin = format!("https://{hostname}:{}", first.port());
            }
        }
    }

    /// Checks what the parser cannot. The message names the key.
    pub fn check(&self) -> Result<(), String> {
        if self.listen.is_empty() {
            return Err("[admin] listen must name at least one address".into());
        }
        if self.allow_networks.is_empty() {
            return Err("[admin] allow_networks is empty: nobody could connect (leave it out for loopback only)".into());
        }
        if self.certificate.is_some() != self.private_key.is_some() {
            return Err("[admin] certificate and private_key must be set together".into());
        }
        if self.session_absolute_secs < self.session_idle_secs {
            return Err("[admin] session_absolute_secs is shorter than session_idle_secs".into());
        }
        self.origin().map_err(|e| format!("[admin] public_origin: {e}"))?;
        Roles::new(&self.roles).map_err(|e| format!("[admin.roles] {e}"))?;
        Ok(())
    }

    /// `public_origin` as a URL: `https`, a host, no user info, path,
    /// query or fragment.
    pub fn origin(&self) -> Result<url::Url, String> {
        let s = &self.public_origin;
        let u = url::Url::parse(s).map_err(|e| format!("`{}` is not a URL ({e})", s.escape_debug()))?;
        if u.scheme() != "https" {
            return Err(format!("`{s}` is not an https:// URL"));
        }
        if u.host_str().is_none_or(str::is_empty) {
            return Err(format!("`{s}` has no host"));
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err(format!("`{s}`: credentials in the URL are not allowed"));
        }
        if u.path() != "/" || u.query().is_some() || u.fragment().is_some() {
            return Err(format!("`{s}` must be an origin (scheme, host, optional port), without a path"));
        }
        Ok(u)
    }

    /// The origin in the form browsers send in `Origin` (no trailing slash).
    pub fn origin_text(&self) -> Result<String, String> {
        Ok(self.origin()?.origin().ascii_serialization())
    }

    /// The WebAuthn relying-party id: the origin's host.
    pub fn rp_id(&self) -> Result<String, String> {
        let u = self.origin()?;
        u.host_str().map(str::to_owned).ok_or_else(|| "public_origin has no host".into())
    }

    /// The built-in and custom roles (checked by [`AdminConfig::check`]).
    pub fn role_set(&self) -> Result<Roles, String> {
        Roles::new(&self.roles)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const MIN: &str = "[store]\nbackend = \"sqlite\"\npath = \"x.db\"\nmaster_key = \"file:master.key\"\n\
                       [tls]\ncertificate = \"c.pem\"\nprivate_key = \"file:k.pem\"\n";

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("{MIN}{extra}"), Path::new("/etc/p3x/c.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn absent_means_off_and_defaults_apply() {
        assert!(parse("").unwrap().admin.is_none());
        let cfg = parse("[server]\nhostname = \"mail.example.org\"\n[admin]\nlisten = [\"127.0.0.1:8443\"]\n").unwrap();
        let a = cfg.admin.unwrap();
        assert_eq!(a.public_origin, "https://mail.example.org:8443");
        assert_eq!(a.rp_id().unwrap(), "mail.example.org");
        assert_eq!(a.origin_text().unwrap(), "https://mail.example.org:8443");
        assert_eq!(a.allow_networks.len(), 2);
        assert!(a.allow_networks.iter().all(|n| n.0.addr().is_loopback()));
        assert!(a.trusted_proxies.is_empty());
        assert_eq!(
            (a.session_idle_secs, a.session_absolute_secs, a.step_up_secs, a.login_failures_before_ban),
            (900, 28_800, 600, 10)
        );
        assert_eq!(a.max_token_days, 365);
        assert!(a.certificate.is_none() && a.private_key.is_none());
        assert_eq!(a.role_set().unwrap().all().len(), 5);
    }

    #[test]
    fn full_section_parses() {
        let cfg = parse(
            "[admin]\nlisten = [\"127.0.0.1:8443\", \"[::1]:8443\"]\nallow_networks = [\"10.0.0.0/8\"]\n\
             trusted_proxies = [\"127.0.0.1\"]\npublic_origin = \"https://admin.example.org\"\n\
             certificate = \"admin.pem\"\nprivate_key = \"file:admin.key\"\nsession_idle_secs = 300\n\
             session_absolute_secs = 3600\nstep_up_secs = 120\nlogin_failures_before_ban = 5\nmax_token_days = 30\n\
             [admin.roles.helpdesk]\npermissions = [\"users.read\", \"users.write\"]\ndomains = [\"example.org\"]\n",
        )
        .unwrap();
        let a = cfg.admin.unwrap();
        assert_eq!(a.rp_id().unwrap(), "admin.example.org");
        assert_eq!(a.origin_text().unwrap(), "https://admin.example.org");
        assert_eq!(a.certificate, Some(PathBuf::from("/etc/p3x/admin.pem")));
        assert_eq!(a.private_key, Some(SecretRef::File("/etc/p3x/admin.key".into())));
        assert_eq!(a.role_set().unwrap().get("helpdesk").unwrap().permissions.names(), ["users.read", "users.write"]);
    }

    #[test]
    fn the_commented_example_section_parses_when_uncommented() {
        let example = crate::config::EXAMPLE;
        let start = example.find("# [admin]\n").expect("example has an [admin] section");
        let end = start + example[start..].find("\n[connector]").expect("[connector] follows");
        let section: String = example[start..end]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with("[admin") || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let a = parse(&section).unwrap().admin.unwrap();
        assert_eq!(a.public_origin, "https://localhost:8443");
        assert!(a.role_set().unwrap().get("helpdesk").is_some());
    }

    #[test]
    fn refusals_name_the_key() {
        let l = "[admin]\nlisten = [\"127.0.0.1:8443\"]\n";
        for (extra, expect) in [
            ("[admin]\nlisten = []\n".to_string(), "listen must name"),
            ("[admin]\n".to_string(), "listen"),
            (format!("{l}allow_networks = []\n"), "allow_networks is empty"),
            (format!("{l}allow_networks = [\"10.0.0.0/33\"]\n"), "not a CIDR"),
            (format!("{l}trusted_proxies = [\"proxy\"]\n"), "not a CIDR"),
            (format!("{l}public_origin = \"http://a.example\"\n"), "not an https"),
            (format!("{l}public_origin = \"https://u:p@a.example\"\n"), "credentials"),
            (format!("{l}public_origin = \"https://a.example/admin\"\n"), "without a path"),
            (format!("{l}public_origin = \"a.example\"\n"), "not a URL"),
            (format!("{l}session_idle_secs = 0\n"), "between 60 and 86400"),
            (format!("{l}session_absolute_secs = 0\n"), "between 300"),
            (format!("{l}session_idle_secs = 7200\nsession_absolute_secs = 3600\n"), "shorter than"),
            (format!("{l}step_up_secs = 0\n"), "between 30"),
            (format!("{l}login_failures_before_ban = 0\n"), "between 1"),
            (format!("{l}max_token_days = 0\n"), "between 1"),
            (format!("{l}certificate = \"a.pem\"\n"), "set together"),
            (format!("{l}private_key = \"secret\"\n"), "literal secrets"),
            (format!("{l}bogus = 1\n"), "bogus"),
            (format!("{l}[admin.roles.helpdesk]\npermissions = [\"users.root\"]\n"), "users.root"),
            (format!("{l}[admin.roles.superadmin]\npermissions = [\"users.read\"]\n"), "built in"),
            (format!("{l}[admin.roles.x]\npermissions = [\"users.read\"]\nextra = 1\n"), "extra"),
        ] {
            let e = parse(&extra).unwrap_err();
            assert!(e.contains(expect), "{extra}: {e}");
        }
    }
}
