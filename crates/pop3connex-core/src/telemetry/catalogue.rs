//! The event catalogue: every event name POP3conneX emits, with a stable
//! numeric id (never reused, never renumbered), a severity, the Elastic
//! Common Schema classification and the documented fields.
//!
//! `docs/events.md` is generated from this table
//! (`pop3connex events catalogue --markdown`) and a test checks that every
//! `event = "..."` in the source is listed here, so the code, the table and
//! the document cannot drift apart.

use serde::Serialize;

/// RFC 5424 severities (the numeric value is the syslog severity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Emergency = 0,
    Alert = 1,
    Critical = 2,
    Error = 3,
    Warning = 4,
    Notice = 5,
    Info = 6,
    Debug = 7,
}

impl Severity {
    pub fn from_level(level: tracing::Level) -> Severity {
        match level {
            tracing::Level::ERROR => Severity::Error,
            tracing::Level::WARN => Severity::Warning,
            tracing::Level::INFO => Severity::Info,
            _ => Severity::Debug,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Emergency => "emergency",
            Severity::Alert => "alert",
            Severity::Critical => "critical",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Notice => "notice",
            Severity::Info => "info",
            Severity::Debug => "debug",
        }
    }

    /// The RFC 5424 numeric severity.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// One catalogue entry.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EventDef {
    /// Stable id (SIEM rules may key on it).
    pub id: u16,
    pub name: &'static str,
    pub severity: Severity,
    /// ECS `event.category` values.
    pub category: &'static [&'static str],
    /// ECS `event.type` values.
    pub kind: &'static [&'static str],
    /// ECS `event.outcome`: `success`, `failure` or `unknown`.
    pub outcome: &'static str,
    /// Alerts by default (routed to the alert channels).
    pub alert: bool,
    /// The fields, each with what it holds.
    pub fields: &'static [(&'static str, &'static str)],
    pub summary: &'static str,
}

const PEER: (&str, &str) = ("peer", "client address (ECS source.ip)");
const USER: (&str, &str) = ("user", "mail account name (ECS user.name)");
const MECH: (&str, &str) = ("mechanism", "USER/PASS, APOP, PLAIN, SCRAM-SHA-256, XOAUTH2, ...");
const ACCOUNT: (&str, &str) = ("account", "connector account name");
const UIDL: (&str, &str) = ("uidl", "the upstream message's unique id");
const ADMIN: (&str, &str) = ("admin", "administrator name");
const ACTOR: (&str, &str) = ("actor", "who acted: admin:NAME@ADDRESS, token:ID or cli:OSUSER");

/// The fields of the geography alerts: both logins and the jump between them.
const GEO_FIELDS: &[(&str, &str)] = &[
    USER,
    ("peer", "this login's client address (ECS source.ip)"),
    ("country", "its ISO 3166 country code"),
    ("city", "its city (English name, when known)"),
    ("latitude", "its latitude (approximate)"),
    ("longitude", "its longitude (approximate)"),
    ("asn", "its autonomous system number (with asn_database)"),
    ("as_org", "the organisation of that AS (with asn_database)"),
    ("login_time", "this login's time (RFC 3339)"),
    MECH,
    ("tls", "whether this login's connection was TLS"),
    ("previous_peer", "the previous placed login's client address"),
    ("previous_country", "its country"),
    ("previous_city", "its city"),
    ("previous_latitude", "its latitude"),
    ("previous_longitude", "its longitude"),
    ("previous_asn", "its autonomous system number"),
    ("previous_as_org", "the organisation of that AS"),
    ("previous_login_time", "its time (RFC 3339)"),
    ("previous_mechanism", "its mechanism"),
    ("previous_tls", "whether it was TLS"),
    ("distance_km", "great-circle distance between the two places"),
    ("elapsed_secs", "seconds between the two logins"),
    ("speed_kmh", "the speed the jump needs"),
    ("known_countries", "countries the account used before (comma-separated)"),
    ("new_country", "whether this login's country is new to the account"),
];

macro_rules! def {
    ($id:expr, $name:expr, $sev:ident, [$($cat:expr),*], [$($kind:expr),*], $outcome:expr, $alert:expr,
     [$($field:expr),*], $summary:expr) => {
        def!($id, $name, $sev, [$($cat),*], [$($kind),*], $outcome, $alert, &[$($field),*], $summary)
    };
    ($id:expr, $name:expr, $sev:ident, [$($cat:expr),*], [$($kind:expr),*], $outcome:expr, $alert:expr,
     $fields:expr, $summary:expr) => {
        EventDef {
            id: $id,
            name: $name,
            severity: Severity::$sev,
            category: &[$($cat),*],
            kind: &[$($kind),*],
            outcome: $outcome,
            alert: $alert,
            fields: $fields,
            summary: $summary,
        }
    };
}

/// Every event. Ids: 1xx authentication, 2xx network and protocol, 3xx
/// store, 4xx connector, 5xx administration, 6xx telemetry itself, 7xx
/// anomalies.
#[rustfmt::skip]
pub static CATALOGUE: &[EventDef] = &[
    def!(100, "auth_success", Info, ["authentication"], ["start"], "success", false,
        [PEER, USER, MECH, ("tls", "whether the connection was TLS")], "A mail client logged in."),
    def!(101, "auth_failure", Warning, ["authentication"], ["start"], "failure", false,
        [PEER, USER, MECH, ("reason", "bad_credentials, unknown_user, policy, ...")], "A login failed."),
    def!(102, "plaintext_auth_refused", Warning, ["authentication"], ["denied"], "failure", false,
        [PEER], "Credentials were offered before TLS and refused."),
    def!(103, "account_locked", Warning, ["authentication", "iam"], ["change"], "success", false,
        [USER, ("seconds", "lock duration")], "An account was locked after repeated failures."),
    def!(104, "locked_out", Warning, ["authentication"], ["denied"], "failure", false,
        [PEER, USER], "A login was refused because the account is locked."),
    def!(200, "connection_refused", Warning, ["network"], ["denied"], "failure", false,
        [PEER, ("listener", "pop3, pop3s, lmtp or admin"), ("reason", "banned, limit, allow_networks, ...")],
        "A connection was refused before any command."),
    def!(201, "protocol_abuse", Warning, ["network", "intrusion_detection"], ["denied"], "failure", false,
        [PEER, ("protocol", "pop3 or lmtp"), ("reason", "line_too_long, too_many_errors, ...")],
        "A peer broke the protocol repeatedly and was disconnected."),
    def!(202, "starttls_injection", Warning, ["network", "intrusion_detection"], ["denied"], "failure", false,
        [PEER, ("discarded", "bytes of pipelined plaintext thrown away")],
        "Plaintext pipelined after STLS was discarded."),
    def!(203, "dnsbl_listed", Warning, ["network", "threat"], ["denied"], "failure", false,
        [PEER, ("zone", "the DNS blocklist")], "A connection was refused: the address is on a blocklist."),
    def!(204, "ban", Warning, ["network", "intrusion_detection"], ["denied", "creation"], "success", false,
        [PEER, ("reason", "why"), ("seconds", "ban duration")], "An address (or network) was banned."),
    def!(205, "tls_reloaded", Info, ["configuration"], ["change"], "success", false,
        [("detail", "what was reloaded")], "The TLS certificate was reloaded."),
    def!(206, "tls_reload_failed", Error, ["configuration"], ["change"], "failure", true,
        [("detail", "the error")], "A TLS reload failed; the old certificate stays in use."),
    def!(207, "suppressed", Warning, ["network"], ["info"], "unknown", false,
        [PEER, ("suppressed_event", "the event held back"), ("count", "how many"),
         ("scope", "address or connection")], "Repeated events from one peer were counted, not logged."),
    def!(300, "maildrop_in_use", Info, ["session"], ["denied"], "failure", false,
        [PEER, USER], "A login found the maildrop locked by another session."),
    def!(301, "integrity_failure", Critical, ["database", "intrusion_detection"], ["error"], "failure", true,
        [USER, ("message", "the message id")], "A stored record failed authentication: tampering or corruption."),
    def!(302, "store_read_only", Error, ["database"], ["change"], "failure", true,
        [("reason", "why the store stopped accepting writes")],
        "The store is read-only (disk full?): mail is served, deliveries wait."),
    def!(303, "store_writable_again", Info, ["database"], ["change"], "success", false,
        [], "The store accepts writes again."),
    def!(304, "lmtp_delivered", Info, ["email"], ["info", "creation"], "success", false,
        [PEER, ("recipients", "recipients accepted"), ("bytes", "message size"),
         ("uidl", "the first stored copy's UIDL")], "An LMTP delivery was stored (no addresses or content)."),
    def!(305, "mail_retrieved", Info, ["email", "session"], ["end"], "success", false,
        [PEER, USER, ("messages", "messages retrieved with RETR or TOP"), ("octets", "the octets sent of them"),
         ("deleted", "deletions committed at QUIT")],
        "A POP3 session that retrieved or deleted mail ended: its volume."),
    def!(400, "connector_fetched", Info, ["email"], ["info"], "success", false,
        [ACCOUNT, UIDL, ("size", "bytes"), ("outcome", "delivered, stored, ...")], "The connector fetched a message."),
    def!(401, "connector_duplicate", Info, ["email"], ["info"], "success", false,
        [ACCOUNT, UIDL, ("recipient", "the recipient")], "A message already delivered was skipped."),
    def!(402, "connector_quarantined", Warning, ["email"], ["info"], "failure", true,
        [ACCOUNT, UIDL, ("reason", "why")], "A message went to quarantine."),
    def!(403, "connector_loop", Warning, ["email"], ["denied"], "failure", true,
        [ACCOUNT, UIDL, ("hops", "Received headers counted")], "A mail loop was detected."),
    def!(404, "connector_oversize", Warning, ["email"], ["denied"], "failure", false,
        [ACCOUNT, UIDL, ("size", "bytes"), ("limit", "bytes"), ("action", "what was done")],
        "A message was above the size limit."),
    def!(405, "connector_upstream_error", Warning, ["email", "network"], ["error"], "failure", false,
        [ACCOUNT, ("kind", "connect, tls, auth, protocol, timeout, oauth"), ("detail", "sanitised reply")],
        "The upstream POP3 server failed (alerts for auth, tls, protocol and oauth)."),
    def!(406, "connector_deferred", Warning, ["email"], ["info"], "failure", false,
        [ACCOUNT, UIDL, ("recipient", "the recipient"), ("detail", "sanitised reply")],
        "Downstream delivery was deferred (retried later)."),
    def!(407, "connector_refused", Warning, ["email"], ["denied"], "failure", true,
        [ACCOUNT, UIDL, ("recipient", "the recipient"), ("detail", "sanitised reply")],
        "Downstream delivery was refused permanently (quarantined)."),
    def!(408, "connector_deleted", Info, ["email"], ["deletion"], "success", false,
        [ACCOUNT, ("count", "messages")], "Upstream copies were deleted after durable delivery."),
    def!(500, "admin_alert", Warning, ["iam", "configuration"], ["info"], "unknown", true,
        [], "An administrative event marked as an alert that has no catalogue name yet."),
    def!(501, "admin_login", Warning, ["authentication", "iam"], ["start"], "success", true,
        [ADMIN, PEER], "An administrator logged in to the admin plane (password and second factor)."),
    def!(502, "admin_enrolment_login", Warning, ["authentication", "iam"], ["start"], "success", true,
        [ADMIN, PEER], "An administrator without a second factor logged in; it can only enrol one."),
    def!(503, "admin_login_burst", Warning, ["authentication", "intrusion_detection"], ["denied"], "failure", true,
        [PEER, ("failures", "failed admin logins from the address")], "Failed admin logins from one address."),
    def!(504, "admin_roles_changed", Warning, ["iam"], ["change"], "success", true,
        [ADMIN, ACTOR, ("roles", "the new roles")], "An administrator's roles were changed."),
    def!(505, "config_reload_requested", Warning, ["configuration"], ["change"], "unknown", true,
        [ACTOR], "A configuration reload was requested through the admin plane."),
    def!(506, "admin_disabled", Warning, ["iam"], ["change"], "success", true,
        [ADMIN, ACTOR], "An administrator was disabled (its sessions and tokens end)."),
    def!(507, "admin_removed", Warning, ["iam"], ["deletion"], "success", true,
        [ADMIN, ACTOR], "An administrator was removed."),
    def!(508, "admin_factor_enrolled", Warning, ["iam"], ["creation"], "success", true,
        [ADMIN, ACTOR, ("kind", "totp or webauthn"), ("label", "the factor's label")],
        "A second factor was enrolled."),
    def!(509, "admin_factor_counter_regressed", Critical, ["authentication", "intrusion_detection"], ["indicator"],
        "failure", true, [("admin_id", "the administrator's id"), ("factor", "the factor's id")],
        "A WebAuthn signature counter did not grow: a cloned authenticator?"),
    def!(510, "admin_recovery_code_used", Warning, ["authentication"], ["info"], "success", true,
        [ADMIN, ("codes_left", "unused recovery codes")], "An administrator logged in with a recovery code."),
    def!(511, "admin_factor_removed", Warning, ["iam"], ["deletion"], "success", true,
        [ADMIN, ACTOR, ("factor", "the factor's id")], "A second factor was removed."),
    def!(512, "admin_recovery_codes_replaced", Warning, ["iam"], ["change"], "success", true,
        [ADMIN, ACTOR], "An administrator's recovery codes were replaced."),
    def!(513, "admin_mfa_reset", Warning, ["iam"], ["deletion"], "success", true,
        [ADMIN, ACTOR], "Every second factor of an administrator was removed (lost device)."),
    def!(514, "service_token_created", Warning, ["iam"], ["creation"], "success", true,
        [("token", "the token's id (never its secret)"), ("name", "its label"),
         ("creator", "the administrator it acts for"), ACTOR, ("permissions", "what it may do")],
        "A service token was created."),
    def!(515, "service_token_revoked", Warning, ["iam"], ["deletion"], "success", true,
        [("token", "the token's id"), ACTOR], "A service token was revoked."),
    def!(516, "config_reloaded", Warning, ["configuration"], ["change"], "success", true,
        [("trigger", "sighup or console"), ("changed", "how many keys differ from the file at start"),
         ("changed_keys", "their names (never values), e.g. pop3.max_connections"),
         ("error", "why the file could not be compared")],
        "A reload re-read certificates, list files, bans and lockouts; names the configuration keys changed since start."),
    def!(600, "sink_dropping", Warning, ["process"], ["error"], "failure", true,
        [("sink", "the sink's name"), ("dropped", "events dropped since the last report")],
        "An event sink's queue is full: events are dropped and counted (at most one report a minute)."),
    def!(601, "sink_recovered", Info, ["process"], ["info"], "success", false,
        [("sink", "the sink's name"), ("dropped", "events lost while it was dropping")],
        "An event sink that was dropping events delivers again."),
    def!(602, "sink_unavailable", Error, ["process", "network"], ["error"], "failure", true,
        [("sink", "the sink's name"), ("error", "why it cannot deliver"), ("attempts", "failed attempts so far")],
        "An event sink cannot reach its receiver (events wait in its queue)."),
    def!(603, "alert_undeliverable", Error, ["process", "network"], ["error"], "failure", true,
        [("channel", "the alert channel's name"), ("error", "the last failure, e.g. the receiver's status"),
         ("lost", "alerts not delivered since the last report")],
        "Alerts could not be delivered to a webhook or e-mail channel ([alerts]); at most one report every 5 minutes."),
    def!(700, "auth_failure_spike", Warning, ["authentication", "intrusion_detection"], ["indicator"], "unknown",
        true, [("scope", "server, account or network"), ("key", "the account or network (empty for the server)"),
        ("count", "failed logins in the minute"), ("baseline", "the key's usual failures per minute"),
        ("threshold", "the count that fired the alert"), ("window_secs", "60"),
        ("last_peer", "the last client address seen")],
        "Failed logins spiked above the absolute threshold or a multiple of their baseline ([anomaly])."),
    def!(701, "download_volume_spike", Warning, ["email", "intrusion_detection"], ["indicator"], "unknown", true,
        [USER, ("octets", "retrieved in the hour so far"), ("baseline", "the account's usual octets per hour"),
         ("threshold", "the amount that fired the alert"), ("window_secs", "3600"),
         ("last_peer", "the client address of the last session")],
        "An account retrieved far more than its own hourly baseline or the absolute cap ([anomaly.download])."),
    def!(702, "geo_new_country", Warning, ["authentication", "intrusion_detection"], ["indicator"], "unknown", true,
        GEO_FIELDS, "An account logged in from a country it never used before ([anomaly.geo]; alert only)."),
    def!(703, "geo_impossible_travel", Warning, ["authentication", "intrusion_detection"], ["indicator"], "unknown",
        true, GEO_FIELDS,
        "Two logins of an account were too far apart for the time between them ([anomaly.geo]; alert only)."),
    def!(704, "ban_burst", Warning, ["network", "intrusion_detection"], ["indicator"], "unknown", true,
        [("count", "addresses banned in the minute"), ("baseline", "usual bans per minute"),
         ("threshold", "the count that fired the alert"), ("window_secs", "60"),
         ("last_peer", "the last address banned")],
        "Many addresses were banned within a minute ([anomaly.bans]): a distributed attack, or a rule locking clients out."),
];

/// The entry for `name`.
pub fn lookup(name: &str) -> Option<&'static EventDef> {
    CATALOGUE.iter().find(|d| d.name == name)
}

/// `docs/events.md`: the catalogue as the operator reads it (generated by
/// `pop3connex events catalogue --markdown`; a test keeps the checked-in
/// file equal to this).
pub fn markdown() -> String {
    let mut out = String::from(
        "# Event catalogue\n\n\
         <!-- Generated by `pop3connex events catalogue --markdown`; a test checks this file against the code. -->\n\n\
         Every security and operational event POP3conneX emits, with a stable id (never reused or renumbered),\n\
         its name (the `event` field of JSON logs, the MSGID of syslog, `event.action` in ECS), its RFC 5424\n\
         severity, its Elastic Common Schema classification and the fields it carries. Events marked *alert*\n\
         go to the alert channels by default. Ids: 1xx authentication, 2xx network and protocol, 3xx store,\n\
         4xx connector, 5xx administration, 6xx telemetry itself, 7xx anomalies.\n\n\
         | Id | Name | Severity | ECS category / type / outcome | Alert | Fields | Meaning |\n\
         |---:|------|----------|-------------------------------|:-----:|--------|---------|\n",
    );
    for d in CATALOGUE {
        let fields: Vec<String> = d.fields.iter().map(|(n, what)| format!("`{n}`: {what}")).collect();
        out.push_str(&format!(
            "| {} | `{}` | {} | {} / {} / {} | {} | {} | {} |\n",
            d.id,
            d.name,
            d.severity.as_str(),
            d.category.join(", "),
            d.kind.join(", "),
            d.outcome,
            if d.alert { "alert" } else { "" },
            fields.join("<br>").replace('|', "\\|"),
            d.summary.replace('|', "\\|"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;

    #[test]
    fn ids_and_names_are_unique() {
        let ids: BTreeSet<_> = CATALOGUE.iter().map(|d| d.id).collect();
        let names: BTreeSet<_> = CATALOGUE.iter().map(|d| d.name).collect();
        assert_eq!(ids.len(), CATALOGUE.len());
        assert_eq!(names.len(), CATALOGUE.len());
        for d in CATALOGUE {
            assert!(["success", "failure", "unknown"].contains(&d.outcome), "{}", d.name);
            assert!(!d.category.is_empty() && !d.kind.is_empty() && !d.summary.is_empty(), "{}", d.name);
        }
    }

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// The checked-in `docs/events.md` is what the code generates (run
    /// `pop3connex events catalogue --markdown > docs/events.md` after a change).
    #[test]
    fn docs_events_md_is_generated_from_the_catalogue() {
        let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/events.md");
        let text = std::fs::read_to_string(&doc).unwrap_or_default();
        assert!(
            text == markdown(),
            "docs/events.md is out of date: run `pop3connex events catalogue --markdown > docs/events.md`"
        );
    }

    /// Every event name written (as `event = "..."`) anywhere in the workspace's sources is
    /// in the catalogue.
    #[test]
    fn every_emitted_event_is_catalogued() {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut files = Vec::new();
        sources(crates, &mut files);
        let mut missing = BTreeSet::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for (i, _) in text.match_indices("event = \"") {
                let rest = &text[i + 9..];
                let name = &rest[..rest.find('"').unwrap_or(0)];
                if !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
                    && lookup(name).is_none()
                {
                    missing.insert(format!("{name} ({})", f.display()));
                }
            }
        }
        assert!(missing.is_empty(), "events missing from the catalogue: {missing:?}");
    }
}
