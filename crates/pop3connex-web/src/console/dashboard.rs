//! The dashboard (`/`): the numbers the core can give (sessions,
//! deliveries, failed logins, active bans, ...) as cards, and the health of
//! each connector account.

use maud::{html, Markup};

use super::{layout, table, Column, Frame};

/// One number on the dashboard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stat {
    /// "Active POP3 sessions", "Failed logins (1 h)", ...
    pub label: String,
    pub value: String,
    /// A page with the details, if there is one (`/bans`, `/events`).
    pub href: Option<String>,
    /// Draw attention to it (failures above zero, an account in error).
    pub warn: bool,
}

/// Health of one connector account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectorHealth {
    pub account: String,
    /// `ok`, `error`, `never run`, `disabled`.
    pub state: String,
    pub last_run: String,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DashboardView {
    pub stats: Vec<Stat>,
    pub connector: Vec<ConnectorHealth>,
}

/// `GET /`.
pub fn dashboard(frame: &Frame, view: &DashboardView) -> Markup {
    let rows = view
        .connector
        .iter()
        .map(|c| {
            vec![
                html! { (c.account) },
                html! { span class={ "state state-" (c.state.replace(' ', "-")) } { (c.state) } },
                html! { (c.last_run) },
                html! { @if let Some(e) = &c.last_error { span.error-text { (e) } } @else { "—" } },
            ]
        })
        .collect();
    let content = html! {
        ul.cards #stats {
            @for s in &view.stats {
                li.card.warn[s.warn] {
                    span.value { (s.value) }
                    @if let Some(href) = &s.href {
                        a.label href=(href) { (s.label) }
                    } @else {
                        span.label { (s.label) }
                    }
                }
            }
        }
        h2 { "Connector health" }
        (table("connector-health", "Connector accounts", &[Column("Account"), Column("State"), Column("Last run"),
            Column("Last error")], rows, "No connector accounts."))
    };
    layout(frame, "dashboard", "Dashboard", content)
}
