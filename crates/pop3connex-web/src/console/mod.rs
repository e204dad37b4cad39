//! The web console's pages: maud functions that turn plain view structs
//! (owned strings and numbers, filled in by the handlers) into HTML. No I/O,
//! no access checks and no state here: the handlers decide what an admin may
//! see and do, and say so through the view (`Frame::nav`, `can_write`, ...).
//!
//! Rules every page follows:
//! - maud escapes every interpolated value; nothing here uses `PreEscaped`
//!   on data (the only pre-escaped text is the fixed doctype).
//! - No inline script or style (the CSP forbids both): the look comes from
//!   `/static/console.css`, and the one script, `/static/webauthn.js`, finds
//!   its buttons by `data-` attributes.
//! - Every form that changes state is `POST`; GET forms only filter.
//! - Every page is `<main id="page-NAME">`, and the element ids the browser
//!   test relies on are fixed here (see the contract in the module docs of
//!   each page file).
//!
//! Files: [`auth`] (login, second factor, enrolment, step-up, recovery
//! codes), [`dashboard`], [`users`], [`security`] (bans, events),
//! [`connector`], [`audit`], [`settings`] (configuration), [`admins`]
//! (administrators, roles, tokens, own account).

pub mod admins;
pub mod audit;
pub mod auth;
pub mod connector;
pub mod dashboard;
pub mod security;
pub mod settings;
pub mod users;

use maud::{html, Markup, DOCTYPE};

/// Path of the stylesheet (served by the web layer from [`CONSOLE_CSS`]).
pub const CSS_PATH: &str = "/static/console.css";
/// Path of the WebAuthn script (served from [`WEBAUTHN_JS`]).
pub const WEBAUTHN_JS_PATH: &str = "/static/webauthn.js";
/// The stylesheet, embedded in the binary.
pub const CONSOLE_CSS: &str = include_str!("../../static/console.css");
/// The only script of the console, embedded in the binary.
pub const WEBAUTHN_JS: &str = include_str!("../../static/webauthn.js");

/// A section of the console, as listed in the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Dashboard,
    Users,
    Bans,
    Connector,
    Events,
    Audit,
    Config,
    Admins,
    Tokens,
    Account,
}

impl Section {
    /// Every section, in navigation order.
    pub const ALL: &'static [Section] = &[
        Section::Dashboard,
        Section::Users,
        Section::Bans,
        Section::Connector,
        Section::Events,
        Section::Audit,
        Section::Config,
        Section::Admins,
        Section::Tokens,
        Section::Account,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Section::Dashboard => "/",
            Section::Users => "/users",
            Section::Bans => "/bans",
            Section::Connector => "/connector",
            Section::Events => "/events",
            Section::Audit => "/audit",
            Section::Config => "/config",
            Section::Admins => "/admins",
            Section::Tokens => "/tokens",
            Section::Account => "/account",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Section::Dashboard => "Dashboard",
            Section::Users => "Users",
            Section::Bans => "Bans",
            Section::Connector => "Connector",
            Section::Events => "Events",
            Section::Audit => "Audit log",
            Section::Config => "Configuration",
            Section::Admins => "Admins",
            Section::Tokens => "Tokens",
            Section::Account => "My account",
        }
    }
}

/// Whether a notice reports success or a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    Info,
    Error,
}

/// A message shown at the top of a page after an action ("User added",
/// "No such user: x"). Its text is data: it is escaped like everything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub kind: NoticeKind,
    pub text: String,
}

impl Notice {
    pub fn info(text: impl Into<String>) -> Notice {
        Notice { kind: NoticeKind::Info, text: text.into() }
    }
    pub fn error(text: impl Into<String>) -> Notice {
        Notice { kind: NoticeKind::Error, text: text.into() }
    }
}

/// What every page of a logged-in admin shows around its content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frame {
    /// The admin's name, shown in the header.
    pub admin: String,
    /// The admin's roles, shown in the header.
    pub roles: Vec<String>,
    /// When the step-up window ends ("14:05", in the server's display
    /// zone); `None`: the session is read-only.
    pub elevated_until: Option<String>,
    /// The sections this admin may open (the handler derives them from the
    /// permissions); an empty list hides the navigation (enrolment).
    pub nav: Vec<Section>,
    /// The path of the current page, used as `next` of the step-up link.
    pub path: String,
    /// The message of the last action, if any.
    pub notice: Option<Notice>,
}

/// The whole HTML document of a logged-in page: header (name, roles,
/// read-only/elevated badge, logout), navigation, notice, then `content`
/// inside `<main id="page-{page}">`.
pub fn layout(frame: &Frame, page: &str, title: &str, content: Markup) -> Markup {
    document(frame, page, title, false, content)
}

/// [`layout`] for pages with WebAuthn buttons: loads `/static/webauthn.js`.
pub(crate) fn layout_with_script(frame: &Frame, page: &str, title: &str, content: Markup) -> Markup {
    document(frame, page, title, true, content)
}

fn document(frame: &Frame, page: &str, title: &str, with_script: bool, content: Markup) -> Markup {
    let current = Section::ALL.iter().copied().find(|s| s.path() == frame.path);
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, with_script))
            body {
                a.skip href="#content" { "Skip to content" }
                header.top {
                    span.brand { "POP3conneX" }
                    div.who {
                        span.admin-name { (frame.admin) }
                        @if !frame.roles.is_empty() {
                            span.roles { (frame.roles.join(", ")) }
                        }
                        @match &frame.elevated_until {
                            Some(until) => span.badge.elevated id="mode-badge" { "elevated until " (until) },
                            None => {
                                span.badge.readonly id="mode-badge" { "read-only" }
                                @if !frame.nav.is_empty() {
                                    a.elevate href={ "/step-up?next=" (query_value(&frame.path)) } { "Elevate" }
                                }
                            }
                        }
                        form.logout method="post" action="/logout" {
                            button type="submit" id="logout" { "Log out" }
                        }
                    }
                }
                @if !frame.nav.is_empty() {
                    nav.main aria-label="Sections" {
                        ul {
                            @for s in &frame.nav {
                                li {
                                    @if Some(*s) == current {
                                        a href=(s.path()) aria-current="page" { (s.title()) }
                                    } @else {
                                        a href=(s.path()) { (s.title()) }
                                    }
                                }
                            }
                        }
                    }
                }
                main id={ "page-" (page) } {
                    span id="content" {}
                    h1 { (title) }
                    (notice(frame.notice.as_ref()))
                    (content)
                }
            }
        }
    }
}

/// A page shown before login (login, second factor): no navigation.
pub(crate) fn bare_page(page: &str, title: &str, with_script: bool, note: Option<&Notice>, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, with_script))
            body.bare {
                header.top { span.brand { "POP3conneX" } span.subtitle { "administration" } }
                main id={ "page-" (page) } class="narrow" {
                    h1 { (title) }
                    (notice(note))
                    (content)
                }
            }
        }
    }
}

fn head(title: &str, with_script: bool) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            meta name="referrer" content="no-referrer";
            title { (title) " · POP3conneX" }
            link rel="stylesheet" href=(CSS_PATH);
            @if with_script {
                script src=(WEBAUTHN_JS_PATH) defer {}
            }
        }
    }
}

pub(crate) fn notice(n: Option<&Notice>) -> Markup {
    html! {
        @if let Some(n) = n {
            @match n.kind {
                NoticeKind::Info => p.notice.info role="status" id="notice" { (n.text) },
                NoticeKind::Error => p.notice.error role="alert" id="notice" { (n.text) },
            }
        }
    }
}

/// One column of a [`table`]: its heading, also the label a cell shows
/// when the table is stacked on a narrow screen.
pub(crate) struct Column(pub &'static str);

/// A table that scrolls horizontally at medium widths and stacks each row
/// as a card on a phone (the cells carry their heading in `data-label`).
pub(crate) fn table(id: &str, caption: &str, columns: &[Column], rows: Vec<Vec<Markup>>, empty: &str) -> Markup {
    html! {
        div.table-wrap {
            table.data.stack id=(id) {
                caption { (caption) }
                thead { tr { @for c in columns { th scope="col" { (c.0) } } } }
                tbody {
                    @if rows.is_empty() {
                        tr.empty { td colspan=(columns.len()) { (empty) } }
                    }
                    @for row in rows {
                        tr {
                            @for (i, cell) in row.into_iter().enumerate() {
                                td data-label=(columns.get(i).map(|c| c.0).unwrap_or("")) { (cell) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A `POST` form with a single button (enable, unlock, revoke, ...), with
/// hidden fields.
pub(crate) fn button_form(action: &str, label: &str, hidden: &[(&str, &str)], class: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            @for (name, value) in hidden {
                input type="hidden" name=(name) value=(value);
            }
            button type="submit" class=(class) { (label) }
        }
    }
}

/// Percent-encodes `s` as one path segment (user names hold `@` and `+`,
/// token ids are safe already): everything but RFC 3986 unreserved
/// characters is encoded, so a name can never add a segment or a query.
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes `s` as a query value (same rules as [`path_segment`];
/// `/` stays readable in a `next` path).
pub fn query_value(s: &str) -> String {
    path_segment(s).replace("%2F", "/")
}

/// A Unix time (seconds) as `YYYY-MM-DD HH:MM UTC`.
pub fn format_time(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", secs / 3600, secs % 3600 / 60)
}

/// A Unix time (seconds) as `HH:MM` (UTC), for the step-up badge.
pub fn format_clock(unix_secs: i64) -> String {
    let secs = unix_secs.rem_euclid(86_400);
    format!("{:02}:{:02} UTC", secs / 3600, secs % 3600 / 60)
}

/// An optional Unix time, "never" when absent.
pub fn format_time_opt(unix_secs: Option<i64>) -> String {
    unix_secs.map(format_time).unwrap_or_else(|| "never".to_owned())
}

/// A byte count for people (`1.5 MiB`).
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's
/// `civil_from_days`), so the console needs no date library.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests;
