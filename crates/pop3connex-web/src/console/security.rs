//! Bans (`/bans`: list, add, remove) and security events (`/events`).
//!
//! Forms: `POST /bans`: `network`, `reason`, `hours` (empty: until removed)
//! (`#ban-network`, `#ban-reason`, `#ban-hours`, `#add-ban`);
//! `POST /bans/remove`: `network`.

use maud::{html, Markup};

use super::{button_form, layout, table, Column, Frame};

/// One active ban.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BanRow {
    /// The network, as the core prints it (`192.0.2.7/32`).
    pub network: String,
    pub reason: String,
    /// "until removed", "in 3 h 12 min".
    pub expires: String,
    pub offences: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BansView {
    pub bans: Vec<BanRow>,
    /// The admin holds `bans.write`.
    pub can_write: bool,
}

/// `GET /bans`.
pub fn bans(frame: &Frame, view: &BansView) -> Markup {
    let rows = view
        .bans
        .iter()
        .map(|b| {
            vec![
                html! { code { (b.network) } },
                html! { (b.reason) },
                html! { (b.expires) },
                html! { (b.offences) },
                html! {
                    @if view.can_write {
                        (button_form("/bans/remove", "Remove", &[("network", b.network.as_str())], "danger small"))
                    }
                },
            ]
        })
        .collect();
    let content = html! {
        @if view.can_write {
            section.panel {
                h2 { "Ban an address or network" }
                form.row method="post" action="/bans" {
                    div.field {
                        label for="ban-network" { "Address or CIDR" }
                        input #ban-network type="text" name="network" required maxlength="64" autocomplete="off"
                            spellcheck="false" placeholder="192.0.2.7 or 2001:db8::/48";
                    }
                    div.field.grow {
                        label for="ban-reason" { "Reason" }
                        input #ban-reason type="text" name="reason" required maxlength="200" autocomplete="off";
                    }
                    div.field {
                        label for="ban-hours" { "Hours" }
                        input #ban-hours type="number" name="hours" min="1" max="87600" placeholder="until removed";
                    }
                    button #add-ban type="submit" { "Ban" }
                }
            }
        }
        (table("bans-table", "Active bans", &[Column("Network"), Column("Reason"), Column("Expires"),
            Column("Offences"), Column("")], rows, "No active bans."))
    };
    layout(frame, "bans", "Bans", content)
}

/// One security event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventRow {
    /// Formatted time.
    pub time: String,
    /// `auth_failure`, `ban`, `connection_refused`, ...
    pub kind: String,
    pub address: String,
    pub user: String,
    /// The rest of the event, as text.
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventsView {
    /// Newest first.
    pub events: Vec<EventRow>,
    /// What the list covers ("the last 500 events since the server started").
    pub scope: String,
}

/// `GET /events`.
pub fn events(frame: &Frame, view: &EventsView) -> Markup {
    let rows = view
        .events
        .iter()
        .map(|e| {
            vec![
                html! { (e.time) },
                html! { span class={ "kind kind-" (e.kind) } { (e.kind) } },
                html! { code { (e.address) } },
                html! { (e.user) },
                html! { (e.detail) },
            ]
        })
        .collect();
    let content = html! {
        @if !view.scope.is_empty() { p.hint { (view.scope) } }
        (table("events-table", "Security events", &[Column("Time"), Column("Event"), Column("Address"),
            Column("User"), Column("Detail")], rows, "No events."))
    };
    layout(frame, "events", "Security events", content)
}
