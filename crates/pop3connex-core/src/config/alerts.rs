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
//! # max_per_rule = 20        # alerts of one rule across its keys per window (an attack
//! #                          # on many accounts pages a bounded number of times)
//! # max_attempts = 6         # deliveries tried before the alert is given up
//! # queue = 1000
//! ```
//!
//! HTTPS only, the receiver's certificate verified; the key is a secret
//! reference, loaded at start.
//!
//! `[[alerts.email]]` mails alert events through a relay that is one of the
//! `[[connector.downstreams]]` (so its TLS policy, CA file and SMTP AUTH
//! are configured and checked in one place):
//!
//! ```toml
//! [[alerts.email]]
//! relay = "submission"             # a [[connector.downstreams]] name
//! from = "pop3connex@mail.example.org"
//! to = ["oncall@example.org"]
//! # events, max_per_key, window_minutes, max_attempts, queue: as for webhooks
//! ```
//!
//! Everything is checked while the file is parsed, so a mistake is
//! reported with the key it concerns.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::secret::SecretRef;

/// The `[alerts]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    #[serde(default)]
    pub webhook: Vec<WebhookConfig>,
    #[serde(default)]
    pub email: Vec<EmailConfig>,
}

/// One `[[alerts.email]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// Names the channel in its own events; default `email<N>`.
    #[serde(default)]
    pub name: String,
    /// The `[[connector.downstreams]]` entry the mail goes through.
    pub relay: String,
    /// Envelope sender and `From:`.
    pub from: String,
    /// Recipients (1 to 20).
    pub to: Vec<String>,
    #[serde(default)]
    pub events: Vec<String>,
    #[serde(default = "max_per_key")]
    pub max_per_key: u32,
    #[serde(default = "max_per_rule")]
    pub max_per_rule: u32,
    #[serde(default = "window_minutes")]
    pub window_minutes: u32,
    #[serde(default = "max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "queue")]
    pub queue: usize,
}

/// What every channel has: which alerts, how many, how hard to try.
#[derive(Debug, Clone)]
pub struct ChannelLimits {
    pub name: String,
    pub events: Vec<String>,
    pub max_per_key: u32,
    pub max_per_rule: u32,
    pub window_minutes: u32,
    pub max_attempts: u32,
    pub queue: usize,
}

macro_rules! limits_of {
    ($t:ty) => {
        impl $t {
            /// The settings every alert channel has.
            pub fn limits(&self) -> ChannelLimits {
                ChannelLimits {
                    name: self.name.clone(),
                    events: self.events.clone(),
                    max_per_key: self.max_per_key,
                    max_per_rule: self.max_per_rule,
                    window_minutes: self.window_minutes,
                    max_attempts: self.max_attempts,
                    queue: self.queue,
                }
            }
        }
    };
}
limits_of!(WebhookConfig);
limits_of!(EmailConfig);

impl ChannelLimits {
    fn check(&self) -> Result<(), String> {
        if !super::connector::valid_name(&self.name) {
            return Err("name: use at most 64 letters, digits, `-`, `_` or `.`".into());
        }
        if let Some(e) = self.events.iter().find(|e| crate::telemetry::catalogue::lookup(e).is_none()) {
            return Err(format!("events: `{e}` is not an event name (see docs/events.md)"));
        }
        if !(1..=1000).contains(&self.max_per_key) {
            return Err(format!("max_per_key: {} is out of range (1..=1000)", self.max_per_key));
        }
        if self.max_per_rule < self.max_per_key || self.max_per_rule > 100_000 {
            return Err(format!("max_per_rule: {} must be at least max_per_key and at most 100000", self.max_per_rule));
        }
        if !(1..=1440).contains(&self.window_minutes) {
            return Err(format!("window_minutes: {} is out of range (1..=1440)", self.window_minutes));
        }
        if !(1..=20).contains(&self.max_attempts) {
            return Err(format!("max_attempts: {} is out of range (1..=20)", self.max_attempts));
        }
        if !(1..=100_000).contains(&self.queue) {
            return Err(format!("queue: {} is out of range (1..=100000 alerts)", self.queue));
        }
        Ok(())
    }
}

/// A mailbox we put in an envelope and a header: `local@domain`, no
/// spaces, controls, angle brackets, quotes, commas or semicolons.
fn valid_mailbox(a: &str) -> bool {
    let ok_chars = a.chars().all(|c| !c.is_control() && !matches!(c, ' ' | '<' | '>' | '"' | ',' | ';' | '(' | ')'));
    ok_chars && a.len() <= 254 && a.split_once('@').is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
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
    #[serde(default = "max_per_rule")]
    pub max_per_rule: u32,
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
fn max_per_rule() -> u32 {
    20
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
        for (i, e) in self.email.iter_mut().enumerate() {
            if e.name.is_empty() {
                e.name = format!("email{}", i + 1);
            }
        }
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
    /// `relays` are the `[[connector.downstreams]]` names.
    pub fn check(&self, relays: &[&str]) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for w in &self.webhook {
            let err = |m: String| format!("[[alerts.webhook]] {}: {m}", w.name);
            if !names.insert(w.name.as_str()) {
                return Err(err("name: used by two alert channels".into()));
            }
            w.limits().check().map_err(err)?;
            check_url(&w.url).map_err(err)?;
        }
        for e in &self.email {
            let err = |m: String| format!("[[alerts.email]] {}: {m}", e.name);
            if !names.insert(e.name.as_str()) {
                return Err(err("name: used by two alert channels".into()));
            }
            e.limits().check().map_err(err)?;
            if !relays.contains(&e.relay.as_str()) {
                return Err(err(format!("relay: `{}` is not a [[connector.downstreams]] name", e.relay)));
            }
            if !valid_mailbox(&e.from) {
                return Err(err(format!("from: `{}` is not a plain address (local@domain)", e.from)));
            }
            if e.to.is_empty() || e.to.len() > 20 {
                return Err(err("to: give 1 to 20 addresses".into()));
            }
            if let Some(bad) = e.to.iter().find(|a| !valid_mailbox(a)) {
                return Err(err(format!("to: `{bad}` is not a plain address (local@domain)")));
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

    #[test]
    fn email_channels_name_a_downstream_relay_and_plain_addresses() {
        let relay =
            "[[connector.downstreams]]\nname = \"sub\"\nprotocol = \"smtp\"\nhost = \"smtp.test\"\nport = 587\n";
        let mail = |r: &str, extra: &str| format!("{relay}[[alerts.email]]\nrelay = \"{r}\"\n{extra}");
        let ok = "from = \"p@mail.test\"\nto = [\"ops@example.test\"]\n";
        let cfg = parse(&mail("sub", ok)).unwrap();
        assert_eq!((cfg.alerts.email[0].name.as_str(), cfg.alerts.email[0].max_attempts), ("email1", 6));
        assert!(parse(&mail("nope", ok)).unwrap_err().contains("`nope` is not a [[connector.downstreams]]"));
        let injected = "from = \"p@mail.test\"\nto = [\"ops@example.test\\r\\nBcc: x@evil.test\"]\n";
        assert!(parse(&mail("sub", injected)).unwrap_err().contains("not a plain address"));
        assert!(parse(&mail("sub", "from = \"p@mail.test\"\nto = []\n")).unwrap_err().contains("1 to 20"));
    }
}
