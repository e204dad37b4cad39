//! Administrators (`/admins`), roles (on the same page and `/roles`),
//! service tokens (`/tokens`) and the admin's own account (`/account`).
//!
//! Forms (`{name}` one percent-encoded path segment; repeated fields are
//! sent once per checked box or selected option):
//! - `POST /admins`: `name`, `password`, `role` (repeated).
//! - `POST /admins/{name}/enabled`: `enabled` = `true` | `false`.
//! - `POST /admins/{name}/roles`: `role` (repeated).
//! - `POST /admins/{name}/reset-mfa`, `POST /admins/{name}/remove`.
//! - `POST /tokens`: `name`, `permission` (repeated), `days`, `networks`
//!   (comma- or space-separated CIDRs, empty: anywhere) (`#token-name`,
//!   `#token-days`, `#token-networks`, `#create-token`; the new token is
//!   shown once in `#new-token`).
//! - `POST /tokens/{id}/revoke`.
//! - `POST /account/factors/{id}/remove`, `POST /account/recovery-codes`
//!   (regenerate; the handler shows them with `auth::recovery_codes`).

use maud::{html, Markup};

use super::{button_form, layout, path_segment, table, Column, Frame};

/// One administrator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminRow {
    pub name: String,
    pub roles: Vec<String>,
    pub enabled: bool,
    /// Enrolled second factors.
    pub factors: usize,
    pub created: String,
    pub last_login: String,
}

/// One role, built in or from the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleRow {
    pub name: String,
    pub permissions: Vec<String>,
    /// `None`: every domain.
    pub domains: Option<Vec<String>>,
    pub builtin: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminsView {
    pub admins: Vec<AdminRow>,
    pub roles: Vec<RoleRow>,
    /// The admin holds `admins.write`.
    pub can_write: bool,
}

/// `GET /admins`.
pub fn admins(frame: &Frame, view: &AdminsView) -> Markup {
    let role_names: Vec<&str> = view.roles.iter().map(|r| r.name.as_str()).collect();
    let rows = view
        .admins
        .iter()
        .map(|a| {
            let base = format!("/admins/{}", path_segment(&a.name));
            vec![
                html! { (a.name) },
                html! { (a.roles.join(", ")) },
                html! { @if a.enabled { span.state.state-ok { "enabled" } } @else { span.state.state-disabled { "disabled" } } },
                html! { (a.factors) },
                html! { (a.created) },
                html! { (a.last_login) },
                html! {
                    @if view.can_write {
                        details.row-actions {
                            summary { "Manage" }
                            form.stack method="post" action={ (base) "/roles" } {
                                label for={ "roles-" (path_segment(&a.name)) } { "Roles" }
                                select id={ "roles-" (path_segment(&a.name)) } name="role" multiple size="5" {
                                    @for r in &role_names {
                                        option value=(r) selected[a.roles.iter().any(|x| x == r)] { (r) }
                                    }
                                }
                                button type="submit" { "Set roles" }
                            }
                            div.actions {
                                @if a.enabled {
                                    (button_form(&format!("{base}/enabled"), "Disable", &[("enabled", "false")], "secondary small"))
                                } @else {
                                    (button_form(&format!("{base}/enabled"), "Enable", &[("enabled", "true")], "small"))
                                }
                                (button_form(&format!("{base}/reset-mfa"), "Reset MFA", &[], "secondary small"))
                                (button_form(&format!("{base}/remove"), "Remove", &[], "danger small"))
                            }
                        }
                    }
                },
            ]
        })
        .collect();
    let content = html! {
        @if view.can_write {
            section.panel {
                h2 { "Add an administrator" }
                form.row method="post" action="/admins" {
                    div.field {
                        label for="new-admin-name" { "Name" }
                        input #new-admin-name type="text" name="name" required maxlength="64" autocomplete="off"
                            autocapitalize="none" spellcheck="false";
                    }
                    div.field {
                        label for="new-admin-password" { "Password" }
                        input #new-admin-password type="password" name="password" required maxlength="1024"
                            autocomplete="new-password";
                    }
                    fieldset.field.checks {
                        legend { "Roles" }
                        @for r in &role_names {
                            label.check { input type="checkbox" name="role" value=(r); " " (r) }
                        }
                    }
                    button #add-admin type="submit" { "Add administrator" }
                }
                p.hint { "The new administrator enrols a second factor at the first login." }
            }
        }
        (table("admins-table", "Administrators", &[Column("Name"), Column("Roles"), Column("State"), Column("Factors"),
            Column("Created"), Column("Last login"), Column("")], rows, "No administrators."))
        h2 #roles { "Roles" }
        (roles_table(&view.roles))
    };
    layout(frame, "admins", "Administrators", content)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolesView {
    pub roles: Vec<RoleRow>,
}

/// `GET /roles`: the roles and their permissions alone.
pub fn roles(frame: &Frame, view: &RolesView) -> Markup {
    let content = html! {
        p { "Custom roles are defined under " code { "[admin.roles.NAME]" } " in the configuration file." }
        (roles_table(&view.roles))
    };
    layout(frame, "roles", "Roles", content)
}

fn roles_table(roles: &[RoleRow]) -> Markup {
    let rows = roles
        .iter()
        .map(|r| {
            vec![
                html! { (r.name) },
                html! { @if r.builtin { "built in" } @else { "configuration" } },
                html! { ul.perms { @for p in &r.permissions { li { code { (p) } } } } },
                html! { @match &r.domains { Some(d) => (d.join(", ")), None => "all" } },
            ]
        })
        .collect();
    table(
        "roles-table",
        "Roles",
        &[Column("Role"), Column("Defined"), Column("Permissions"), Column("Domains")],
        rows,
        "No roles.",
    )
}

/// One service token (never its secret).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub creator: String,
    pub permissions: Vec<String>,
    /// Empty: usable from any allowed admin network.
    pub networks: Vec<String>,
    pub created: String,
    pub expires: String,
    pub last_used: String,
    pub last_used_from: String,
    pub revoked: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokensView {
    pub tokens: Vec<TokenRow>,
    /// Permissions the admin holds, offered for a new token (a token never
    /// gets more).
    pub grantable: Vec<String>,
    /// Upper bound on the expiry, in days (`admin.max_token_days`).
    pub max_days: u64,
    /// A just-created token, shown once.
    pub new_token: Option<String>,
    /// The admin holds `tokens.write`.
    pub can_write: bool,
}

/// `GET /tokens`.
pub fn tokens(frame: &Frame, view: &TokensView) -> Markup {
    let rows = view
        .tokens
        .iter()
        .map(|t| {
            vec![
                html! { code { (t.id) } },
                html! { (t.name) },
                html! { (t.creator) },
                html! { ul.perms { @for p in &t.permissions { li { code { (p) } } } } },
                html! { @if t.networks.is_empty() { "any" } @else { (t.networks.join(", ")) } },
                html! { (t.created) },
                html! { (t.expires) },
                html! { (t.last_used) @if !t.last_used_from.is_empty() { " from " code { (t.last_used_from) } } },
                html! {
                    @if t.revoked {
                        span.state.state-disabled { "revoked" }
                    } @else if view.can_write {
                        (button_form(&format!("/tokens/{}/revoke", path_segment(&t.id)), "Revoke", &[], "danger small"))
                    } @else {
                        span.state.state-ok { "active" }
                    }
                },
            ]
        })
        .collect();
    let content = html! {
        @if let Some(token) = &view.new_token {
            section.panel.once {
                h2 { "New token" }
                p { "Copy it now: it is stored hashed and not shown again." }
                p { code #new-token.big.wrap { (token) } }
            }
        }
        @if view.can_write {
            section.panel {
                h2 { "Create a service token" }
                form.stack method="post" action="/tokens" {
                    div.row {
                        div.field {
                            label for="token-name" { "Name" }
                            input #token-name type="text" name="name" required maxlength="64" placeholder="backup-script";
                        }
                        div.field {
                            label for="token-days" { "Expires after (days)" }
                            input #token-days type="number" name="days" required min="1" max=(view.max_days) value="30";
                        }
                        div.field.grow {
                            label for="token-networks" { "Source networks (optional)" }
                            input #token-networks type="text" name="networks" maxlength="1024" placeholder="192.0.2.0/24";
                        }
                    }
                    fieldset.checks {
                        legend { "Permissions" }
                        @for p in &view.grantable {
                            label.check { input type="checkbox" name="permission" value=(p); " " code { (p) } }
                        }
                    }
                    button #create-token type="submit" { "Create token" }
                }
                p.hint { "Tokens authenticate API calls only (" code { "Authorization: Bearer …" } "), never the console or POP3." }
            }
        }
        (table("tokens-table", "Service tokens", &[Column("Id"), Column("Name"), Column("Creator"),
            Column("Permissions"), Column("Networks"), Column("Created"), Column("Expires"), Column("Last used"),
            Column("")], rows, "No tokens."))
    };
    layout(frame, "tokens", "Service tokens", content)
}

/// One enrolled second factor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FactorRow {
    pub id: i64,
    /// `TOTP` or `passkey`.
    pub kind: String,
    pub label: String,
    pub created: String,
    pub last_used: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountView {
    pub name: String,
    pub roles: Vec<String>,
    pub permissions: Vec<String>,
    pub factors: Vec<FactorRow>,
}

/// `GET /account`: own factors and recovery codes.
pub fn account(frame: &Frame, view: &AccountView) -> Markup {
    let rows = view
        .factors
        .iter()
        .map(|f| {
            vec![
                html! { (f.kind) },
                html! { (f.label) },
                html! { (f.created) },
                html! { (f.last_used) },
                html! {
                    @if view.factors.len() > 1 {
                        (button_form(&format!("/account/factors/{}/remove", f.id), "Remove", &[], "danger small"))
                    }
                },
            ]
        })
        .collect();
    let content = html! {
        dl.facts {
            dt { "Name" } dd { (view.name) }
            dt { "Roles" } dd { (view.roles.join(", ")) }
            dt { "Permissions" } dd { ul.perms { @for p in &view.permissions { li { code { (p) } } } } }
        }
        h2 { "Second factors" }
        (table("factors-table", "Second factors", &[Column("Kind"), Column("Label"), Column("Added"),
            Column("Last used"), Column("")], rows, "No factors."))
        p { a.button #add-factor href="/enrol" { "Add an authenticator app or passkey" } }
        h2 { "Recovery codes" }
        p { "Recovery codes replace a lost second factor once each. Making new ones invalidates the old ones." }
        form.inline method="post" action="/account/recovery-codes" {
            button.secondary #regenerate-codes type="submit" { "Make new recovery codes" }
        }
    };
    layout(frame, "account", "My account", content)
}
