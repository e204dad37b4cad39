//! The audit log (`/audit`): records newest first, filters, paging.
//!
//! The filter form is a `GET /audit` with `actor`, `action`, `since`,
//! `until` (dates `YYYY-MM-DD`, UTC) and `before_seq` for the next page;
//! reading the log is itself recorded by the handler.

use maud::{html, Markup};

use super::{layout, query_value, table, Column, Frame};

/// One audit record as shown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditRow {
    pub seq: i64,
    pub time: String,
    /// `admin:alice@192.0.2.1`, `token:…`, `cli:root`.
    pub actor: String,
    pub source: String,
    /// `user.add`, `admin.login`, ...
    pub action: String,
    pub target: String,
    /// `ok`, `refused`, `not_found`, ...
    pub outcome: String,
    /// The values before and after a change, as compact JSON (no secrets:
    /// the core never records one).
    pub before: Option<String>,
    pub after: Option<String>,
}

/// The filters as the admin typed them (shown back in the form).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub actor: String,
    pub action: String,
    pub since: String,
    pub until: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditView {
    /// Newest first.
    pub records: Vec<AuditRow>,
    pub filter: AuditFilter,
    /// The lowest `seq` shown when more records follow (the "Older" link).
    pub more_before: Option<i64>,
}

/// `GET /audit`.
pub fn audit(frame: &Frame, view: &AuditView) -> Markup {
    let rows = view
        .records
        .iter()
        .map(|r| {
            vec![
                html! { (r.seq) },
                html! { (r.time) },
                html! { (r.actor) },
                html! { code { (r.source) } },
                html! { code.action { (r.action) } },
                html! { (r.target) },
                html! { span class={ "outcome outcome-" (r.outcome) } { (r.outcome) } },
                html! {
                    @if r.before.is_some() || r.after.is_some() {
                        details.change {
                            summary { "change" }
                            @if let Some(b) = &r.before { p { "before: " code.wrap { (b) } } }
                            @if let Some(a) = &r.after { p { "after: " code.wrap { (a) } } }
                        }
                    }
                },
            ]
        })
        .collect();
    let f = &view.filter;
    let content = html! {
        form.row.filters method="get" action="/audit" role="search" {
            div.field {
                label for="audit-actor" { "Actor" }
                input #audit-actor type="text" name="actor" value=(f.actor) maxlength="256" placeholder="admin:alice";
            }
            div.field {
                label for="audit-action" { "Action" }
                input #audit-action type="text" name="action" value=(f.action) maxlength="64" placeholder="user.add";
            }
            div.field {
                label for="audit-since" { "Since" }
                input #audit-since type="date" name="since" value=(f.since);
            }
            div.field {
                label for="audit-until" { "Until" }
                input #audit-until type="date" name="until" value=(f.until);
            }
            button #audit-filter type="submit" { "Filter" }
            a.button.secondary href="/audit" { "Clear" }
        }
        p.hint { "Records are chained and signed; " code { "pop3connex audit-log verify" } " checks the chain." }
        (table("audit-table", "Audit records", &[Column("#"), Column("Time"), Column("Actor"), Column("Source"),
            Column("Action"), Column("Target"), Column("Outcome"), Column("Change")], rows, "No records match."))
        @if let Some(seq) = view.more_before {
            p {
                a #audit-older href={ "/audit?actor=" (query_value(&f.actor)) "&action=" (query_value(&f.action))
                    "&since=" (query_value(&f.since)) "&until=" (query_value(&f.until)) "&before_seq=" (seq) } { "Older records →" }
            }
        }
    };
    layout(frame, "audit", "Audit log", content)
}
