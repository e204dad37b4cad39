//! `[[alerts.webhook]]`: where alert events go besides the log, the event
//! store, the syslog sinks and `[connector] alert_command`.
//!
//! ```toml
//! [[alerts.webhook]]
//! name = "oncall"
//! url = "https://hooks.example.net/pop3connex"
//! secret = "file:/etc/pop3connex/webhook.secret"   # HMAC-SHA256 key, at least 16 bytes
//! # ca_file = "/etc/pop3connex/hooks-ca.pem"        # default: the system roots
//! # events = ["admin_login", "auth_failure_spike"]  # default: every alert event
//! # max_per_key = 5          # alerts of one rule for one key (user, network) ...
//! # window_minutes = 15      # ... per this window; the rest are counted, not sent
//! # max_attempts = 6         # deliveries tried before the alert is given up
//! # queue = 1000
//! ```
//!
//! HTTPS only, the receiver's certificate verified; the key is a secret
//! reference, loaded at start. Everything else is checked while the file is
//! parsed, so a mistake is reported with the key it concerns.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::secret::SecretRef;

/// The `[alerts]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    #[serde(default)]
    pub webhook: Vec<WebhookConfig>,
}

/// One `[[alerts.webhook]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the channel in its own events; default `webhook<N>`.
    #[serde(default)]
    pub name: String,
    /// `https://host[:port]/path`.
    pub url: String,
    /// The HMAC-SHA256 signing key.
    pub secret: SecretRef,
    /// Trust anchors instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Catalogue names of the alert events sent; empty: every alert.
    #[serde(default)]
    pub events: Vec<String>,
    #[serde(default = "max_per_key")]
    pub max_per_key: u32,
    #[serde(default = "window_minutes")]
    pub window_minutes: u32,
    #[serde(default = "max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "queue")]
    pub queue: usize,
}

fn max_per_key() -> u32 {
    5
}
fn window_minutes() -> u32 {
    15
}
fn max_attempts() -> u32 {
    6
}
fn queue() -> usize {
    1000
}

impl AlertsConfig {
    /// Default names, and relative paths made relative to `base`.
    pub fn finish(&mut self, base: &Path) {
        for (i, w) in self.webhook.iter_mut().enumerate() {
            if w.name.is_empty() {
                w.name = format!("webhook{}", i + 1);
            }
            w.secret.resolve_against(base);
            if let Some(p) = &mut w.ca_file {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
    }

    /// Checks what the parser cannot; the message names the key.
    pub fn check(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for w in &self.webhook {
            let err = |m: String| format!("[[alerts.webhook]] {}: {m}", w.name);
            if !names.insert(w.name.as_str()) {
                return Err(err("name: used by two webhooks".into()));
            }
            let valid_name =
                w.name.len() <= 64 && w.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid_name {
                return Err(err("name: use at most 64 letters, digits, `-`, `_` or `.`".into()));
            }
            check_url(&w.url).map_err(err)?;
            if let Some(e) = w.events.iter().find(|e| crate::telemetry::catalogue::lookup(e).is_none()) {
                return Err(err(format!("events: `{e}` is not an event name (see docs/events.md)")));
            }
            if !(1..=1000).contains(&w.max_per_key) {
                return Err(err(format!("max_per_key: {} is out of range (1..=1000)", w.max_per_key)));
            }
            if !(1..=1440).contains(&w.window_minutes) {
                return Err(err(format!("window_minutes: {} is out of range (1..=1440)", w.window_minutes)));
            }
            if !(1..=20).contains(&w.max_attempts) {
                return Err(err(format!("max_attempts: {} is out of range (1..=20)", w.max_attempts)));
            }
            if !(1..=100_000).contains(&w.queue) {
                return Err(err(format!("queue: {} is out of range (1..=100000 alerts)", w.queue)));
            }
        }
        Ok(())
    }
}

/// An `https://` URL with a host; no user information (credentials in a
/// URL end up in logs), no fragment.
fn check_url(url: &str) -> Result<(), String> {
    let rest = url.strip_prefix("https://").ok_or("url: must start with https:// (alerts carry user names)")?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if authority.is_empty() {
        return Err("url: has no host".into());
    }
    if authority.contains('@') {
        return Err("url: must not carry credentials (the request is signed with `secret`)".into());
    }
    if url.contains('#') || url.chars().any(|c| c.is_ascii_control() || c == ' ') {
        return Err("url: must not contain a fragment, spaces or control characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const MIN: &str = "[store]\nbackend = \"sqlite\"\npath = \"x.db\"\nmaster_key = \"file:master.key\"\n\
                       [tls]\ncertificate = \"c.pem\"\nprivate_key = \"file:k.pem\"\n";

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("{MIN}{extra}"), Path::new("/etc/p/c.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn webhooks_parse_with_defaults_and_reject_unsafe_settings() {
        let cfg = parse("[[alerts.webhook]]\nurl = \"https://hooks.test/a\"\nsecret = \"file:hook.key\"\n").unwrap();
        let w = &cfg.alerts.webhook[0];
        assert_eq!((w.name.as_str(), w.max_per_key, w.window_minutes, w.max_attempts), ("webhook1", 5, 15, 6));
        assert_eq!(w.secret, SecretRef::File("/etc/p/hook.key".into()));
        let bad = |extra: &str| parse(&format!("[[alerts.webhook]]\nsecret = \"env:K\"\n{extra}")).unwrap_err();
        assert!(bad("url = \"http://hooks.test/a\"\n").contains("https://"));
        assert!(bad("url = \"https://u:p@hooks.test/a\"\n").contains("credentials"));
        assert!(bad("url = \"https:///a\"\n").contains("no host"));
        assert!(bad("url = \"https://h.test/\"\nevents = [\"nope\"]\n").contains("`nope` is not an event"));
        assert!(bad("url = \"https://h.test/\"\nmax_attempts = 0\n").contains("max_attempts"));
        let literal = parse("[[alerts.webhook]]\nurl = \"https://h.test/\"\nsecret = \"hunter2-literal\"\n");
        let e = literal.unwrap_err();
        assert!(e.contains("literal secrets") && !e.contains("hunter2"), "{e}");
        let two = "[[alerts.webhook]]\nname = \"a\"\nurl = \"https://h.test/\"\nsecret = \"env:K\"\n";
        assert!(parse(&format!("{two}{two}")).unwrap_err().contains("used by two"));
    }
}
