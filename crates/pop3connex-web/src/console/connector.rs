//! Connector accounts (`/connector`): where each fetches from, its status
//! and last error; "fetch now" for admins with `connector.write`.
//!
//! Form: `POST /connector/{account}/run` (the account as one percent-encoded
//! path segment).

use maud::{html, Markup};

use super::{button_form, layout, path_segment, table, Column, Frame};

/// One connector account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectorRow {
    pub name: String,
    /// `host:port` of the upstream server.
    pub upstream: String,
    /// `config` or `cli`.
    pub origin: String,
    pub enabled: bool,
    /// `ok`, `error`, `never run`.
    pub state: String,
    pub last_run: String,
    pub last_success: String,
    /// Consecutive failed runs.
    pub failures: u32,
    pub fetched_total: u64,
    /// Upstream messages in the seen-list.
    pub seen: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectorView {
    pub accounts: Vec<ConnectorRow>,
    /// The admin holds `connector.write`.
    pub can_write: bool,
}

/// `GET /connector`.
pub fn connector(frame: &Frame, view: &ConnectorView) -> Markup {
    let rows = view
        .accounts
        .iter()
        .map(|a| {
            vec![
                html! { (a.name) },
                html! { code { (a.upstream) } },
                html! { (a.origin) @if !a.enabled { " (disabled)" } },
                html! { span class={ "state state-" (a.state.replace(' ', "-")) } { (a.state) } },
                html! { (a.last_run) },
                html! { (a.last_success) },
                html! { (a.failures) },
                html! { (a.fetched_total) " / " (a.seen) },
                html! { @if let Some(e) = &a.last_error { span.error-text { (e) } } @else { "—" } },
                html! {
                    @if view.can_write && a.enabled {
                        (button_form(&format!("/connector/{}/run", path_segment(&a.name)), "Fetch now", &[], "small"))
                    }
                },
            ]
        })
        .collect();
    let content = html! {
        (table("connector-table", "Connector accounts", &[Column("Account"), Column("Upstream"), Column("Origin"),
            Column("State"), Column("Last run"), Column("Last success"), Column("Failures"),
            Column("Fetched / seen"), Column("Last error"), Column("")], rows, "No connector accounts."))
    };
    layout(frame, "connector", "Connector accounts", content)
}
