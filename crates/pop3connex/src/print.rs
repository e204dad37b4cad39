//! How the CLI shows what admin operations return: tables and reports on
//! stdout, notes and skipped entries on stderr, names from files and
//! sources escaped for the terminal.

use std::path::Path;

use pop3connex_core::admin::admins::AdminInfo;
use pop3connex_core::admin::app_passwords::{AppPasswordEntry, Expiry};
use pop3connex_core::admin::connector::{AccountStatus, AccountSummary};
use pop3connex_core::admin::security::BanEntry;
use pop3connex_core::admin::tokens::TokenInfo;
use pop3connex_core::admin::users::{MailboxStat, PasswdImport};
use pop3connex_core::admin::AuditRecord;
use pop3connex_core::audit_log::VerifyReport;
use pop3connex_core::import::{escape_controls, ImportReport};
use pop3connex_core::rbac::Role;
use pop3connex_core::store::{StoredEvent, UserSummary};
use pop3connex_core::types::format_unix;

/// `user list` as a table whose columns fit the longest value, header
/// included. `UserName`'s `Display` ignores width and alignment, so names
/// are padded as `&str`.
pub fn user_table(users: &[UserSummary]) -> String {
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

/// Rows as a table whose columns fit the longest value, header included;
/// the last column is not padded.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    use std::fmt::Write;
    let header = header.map(str::to_owned);
    let all = || std::iter::once(&header).chain(rows);
    let widths: Vec<usize> = (0..N).map(|c| all().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in all() {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 < N {
                // Writing to a String cannot fail.
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            } else {
                line.push_str(cell);
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

fn time_or_never(t: Option<i64>) -> String {
    t.map_or_else(|| "never".to_owned(), format_unix)
}

/// `admin list`.
pub fn admin_table(admins: &[AdminInfo]) -> String {
    let rows: Vec<[String; 5]> = admins
        .iter()
        .map(|a| {
            let factors = if a.factors.is_empty() {
                "none (enrolment pending)".to_owned()
            } else {
                a.factors.iter().map(|f| format!("{}:{}", f.kind.as_str(), f.label)).collect::<Vec<_>>().join(", ")
            };
            let status = if a.enabled { "active" } else { "disabled" };
            [
                escape_controls(&a.name),
                a.roles.join(","),
                status.to_owned(),
                time_or_never(a.last_login_at),
                escape_controls(&factors),
            ]
        })
        .collect();
    table(["admin", "roles", "status", "last login", "factors"], &rows)
}

/// `admin roles`.
pub fn roles(roles: &[Role]) -> String {
    let rows: Vec<[String; 3]> = roles
        .iter()
        .map(|r| {
            let scope = r.domains.as_ref().map_or_else(|| "all users".to_owned(), |d| d.join(","));
            let kind = if r.builtin { "built-in" } else { "custom" };
            [r.name.clone(), format!("{kind}, {scope}"), r.permissions.names().join(" ")]
        })
        .collect();
    table(["role", "kind, scope", "permissions"], &rows)
}

/// `admin token list`.
pub fn token_table(tokens: &[TokenInfo]) -> String {
    let rows: Vec<[String; 7]> = tokens
        .iter()
        .map(|t| {
            let status = if t.revoked { "revoked" } else { "active" };
            let used = match (&t.last_used_at, &t.last_used_from) {
                (Some(at), Some(from)) => format!("{} from {from}", format_unix(*at)),
                (Some(at), None) => format_unix(*at),
                _ => "never".to_owned(),
            };
            let nets = if t.networks.is_empty() { "any".to_owned() } else { t.networks.join(",") };
            [
                t.id.clone(),
                escape_controls(&t.name),
                escape_controls(&t.creator),
                status.to_owned(),
                format_unix(t.expires_at),
                used,
                format!("{} [{}]", t.permissions.join(" "), nets),
            ]
        })
        .collect();
    table(["id", "name", "creator", "status", "expires", "last use", "permissions [networks]"], &rows)
}

pub fn mailbox_stat(stat: &MailboxStat) {
    println!("user: {}", stat.name);
    println!("messages: {}", stat.messages);
    println!("octets: {}", stat.octets);
    println!("disabled: {}", stat.disabled);
}

/// Lines that were not imported go to stderr as `file:line: user: reason`.
pub fn passwd_import(file: &Path, report: &PasswdImport) {
    for skip in &report.skipped {
        // The name comes from the file: never echo control characters to the terminal.
        let msg = escape_controls(&format!("{}: {}", skip.user, skip.error));
        eprintln!("{}:{}: {msg}", file.display(), skip.line);
    }
    println!("imported {} users, skipped {}", report.added, report.skipped.len());
}

pub fn app_passwords(entries: &[AppPasswordEntry]) {
    println!("{:>5}  {:<30} {:>12} {:>14}", "id", "label", "expires in", "last used ago");
    for a in entries {
        let exp = match a.expiry {
            Expiry::Never => "never".to_owned(),
            Expiry::InDays(d) => format!("{d}d"),
            Expiry::Expired => "expired".to_owned(),
        };
        let used = a.last_used_ago.map_or("never".into(), |s| format!("{s}s"));
        println!("{:>5}  {:<30} {:>12} {:>14}", a.id, a.label, exp, used);
    }
}

pub fn bans(bans: &[BanEntry]) {
    println!("{:<42} {:>10} {:>8}  reason", "network", "expires in", "offences");
    for b in bans {
        let left = b.expires_in.map_or("never".to_owned(), |s| format!("{s}s"));
        println!("{:<42} {:>10} {:>8}  {}", b.network.to_string(), left, b.offences, b.reason);
    }
}

pub fn connector_accounts(accounts: &[AccountSummary]) {
    for a in accounts {
        println!(
            "{}\t{}:{}\t{}\t{}\tseen={}\tlast_error={}",
            a.name,
            a.host,
            a.port,
            a.origin.as_str(),
            if a.enabled { "enabled" } else { "disabled" },
            a.seen,
            a.last_error.as_deref().unwrap_or("-")
        );
    }
}

pub fn connector_status(accounts: &[AccountStatus]) {
    for a in accounts {
        let s = &a.status;
        let t = |v: Option<i64>| v.map_or("never".to_string(), format_unix);
        println!("account: {}", a.name);
        println!("  last_run_at: {}", t(s.last_run_at));
        println!("  last_success_at: {}", t(s.last_success_at));
        println!("  last_error: {}", s.last_error.as_deref().unwrap_or("-"));
        println!("  consecutive_failures: {}", s.failures);
        println!("  fetched_total: {}", s.fetched_total);
        println!("  seen: {}", a.seen);
    }
}

/// Notes and skipped entries on stderr (escaped: they quote source names), the summary on stdout.
pub fn import_report(user: &str, report: &ImportReport) {
    for note in &report.notes {
        eprintln!("note: {}", escape_controls(note));
    }
    for skipped in &report.skipped {
        eprintln!("skipped: {}", escape_controls(skipped));
    }
    println!(
        "imported {} messages into {user}; {} were already present (resumed or repeated import); {} skipped",
        report.imported,
        report.already_present,
        report.skipped.len()
    );
}

/// `audit-log verify`: one line when intact, else every problem (first
/// bad record first) on stdout.
pub fn audit_verify(report: &VerifyReport) {
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let checkpoint = report.last_checkpoint.map_or_else(|| "none".to_owned(), |s| s.to_string());
    match report.first_problem() {
        None => println!("audit log intact: {} records, last checkpoint seq {checkpoint}", report.records),
        Some(first) => {
            println!("audit log NOT intact: first bad record {first}");
            for p in &report.problems[1..] {
                println!("  {p}");
            }
            if report.more_problems > 0 {
                println!("  ... and {} more", report.more_problems);
            }
            println!("{} records, last checkpoint seq {checkpoint}", report.records);
        }
    }
}

/// `audit-log show`: one record per line; values quoted from records are
/// escaped for the terminal.
pub fn audit_table(records: &[AuditRecord]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6}  {:<24}  {:<28}  {:<24}  {:<24}  {:<10}  change",
        "seq", "time", "actor", "action", "target", "outcome"
    );
    for r in records {
        let time = format_unix(r.time / 1000);
        let change = match (&r.before, &r.after) {
            (None, None) => String::new(),
            (b, a) => format!(
                "{} -> {}",
                b.as_ref().map_or_else(|| "-".to_owned(), |v| v.to_string()),
                a.as_ref().map_or_else(|| "-".to_owned(), |v| v.to_string())
            ),
        };
        let actor = match &r.source {
            Some(s) if !r.actor.contains('@') => format!("{} ({s})", r.actor),
            _ => r.actor.clone(),
        };
        let line = format!(
            "{:>6}  {:<24}  {:<28}  {:<24}  {:<24}  {:<10}  {change}",
            r.seq, time, actor, r.action, r.target, r.outcome
        );
        let _ = writeln!(out, "{}", escape_controls(&line));
    }
    out
}

/// `events catalogue`: one line per event.
pub fn event_catalogue(defs: &[pop3connex_core::telemetry::EventDef]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{:>4}  {:<32}  {:<9}  {:<5}  summary", "id", "name", "severity", "alert");
    for d in defs {
        let _ = writeln!(
            out,
            "{:>4}  {:<32}  {:<9}  {:<5}  {}",
            d.id,
            d.name,
            d.severity.as_str(),
            if d.alert { "yes" } else { "" },
            d.summary
        );
    }
    out
}

/// One stored event as a JSON object: ECS-style names, the event's own
/// fields under `fields`.
pub fn event_json(e: &StoredEvent) -> serde_json::Value {
    let fields: serde_json::Value = serde_json::from_str(&e.fields).unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "seq": e.seq,
        "@timestamp": format_unix(e.time / 1000),
        "time_ms": e.time,
        "event.code": e.code,
        "event.action": e.name,
        "event.severity": e.severity,
        "user.name": e.user,
        "source.ip": e.ip,
        "message": e.message,
        "fields": fields,
    })
}

/// `events search` as a table, newest first; text from the network is
/// escaped for the terminal.
pub fn events_table(events: &[StoredEvent]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{:<24}  {:<26}  {:<24}  {:<39}  details", "time", "event", "user", "address");
    for e in events {
        let line = format!(
            "{:<24}  {:<26}  {:<24}  {:<39}  {} {}",
            format_unix(e.time / 1000),
            e.name,
            e.user.as_deref().unwrap_or("-"),
            e.ip.as_deref().unwrap_or("-"),
            e.message,
            e.fields
        );
        let _ = writeln!(out, "{}", escape_controls(&line));
    }
    if events.is_empty() {
        out.push_str("(no events)\n");
    }
    out
}
