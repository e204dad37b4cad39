//! Bans (`/bans`: list, add, remove) and security events (`/events`).
//!
//! Forms: `POST /bans`: `network`, `reason`, `hours` (empty: until removed)
//! (`#ban-network`, `#ban-reason`, `#ban-hours`, `#add-ban`);
//! `POST /bans/remove`: `network`.

use maud::{html, Markup};

use super::{button_form, layout, query_value, table, Column, Frame};

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

/// The filters as the admin typed them (shown back in the form).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventsFilter {
    pub user: String,
    pub ip: String,
    /// A catalogue name.
    pub kind: String,
    /// `YYYY-MM-DD` (UTC).
    pub since: String,
    pub until: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventsView {
    /// Newest first.
    pub events: Vec<EventRow>,
    /// What the list covers, or why it is empty.
    pub scope: String,
    pub filter: EventsFilter,
    /// The catalogue names offered in the type list.
    pub kinds: Vec<String>,
    /// The lowest seq shown when more events follow (the "Older" link).
    pub more_before: Option<i64>,
}

/// `GET /events`: the local event store, filtered like `events search`.
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
                html! { code.wrap { (e.detail) } },
            ]
        })
        .collect();
    let f = &view.filter;
    let content = html! {
        form.row.filters method="get" action="/events" role="search" {
            div.field {
                label for="events-user" { "User" }
                input #events-user type="text" name="user" value=(f.user) maxlength="320" placeholder="alice@example.org";
            }
            div.field {
                label for="events-ip" { "Address" }
                input #events-ip type="text" name="ip" value=(f.ip) maxlength="45" placeholder="192.0.2.7";
            }
            div.field {
                label for="events-type" { "Event" }
                select #events-type name="type" {
                    option value="" selected[f.kind.is_empty()] { "any" }
                    @for k in &view.kinds {
                        option value=(k) selected[*k == f.kind] { (k) }
                    }
                }
            }
            div.field {
                label for="events-since" { "Since" }
                input #events-since type="date" name="since" value=(f.since);
            }
            div.field {
                label for="events-until" { "Until" }
                input #events-until type="date" name="until" value=(f.until);
            }
            button #events-filter type="submit" { "Filter" }
            a.button.secondary href="/events" { "Clear" }
        }
        @if !view.scope.is_empty() { p.hint { (view.scope) } }
        (table("events-table", "Security events", &[Column("Time"), Column("Event"), Column("Address"),
            Column("User"), Column("Detail")], rows, "No events match."))
        @if let Some(seq) = view.more_before {
            p {
                a #events-older href={ "/events?user=" (query_value(&f.user)) "&ip=" (query_value(&f.ip))
                    "&type=" (query_value(&f.kind)) "&since=" (query_value(&f.since)) "&until=" (query_value(&f.until))
                    "&before_seq=" (seq) } { "Older events →" }
            }
        }
    };
    layout(frame, "events", "Security events", content)
}
