//! Users: the list with the add form (`/users`) and one user's page
//! (`/users/{name}`) with every operation the CLI has.
//!
//! Forms (`{name}` is the user name as one percent-encoded path segment):
//! - `POST /users`: `name`, `password` (`#new-user-name`, `#new-user-password`, `#add-user`).
//! - `POST /users/{name}/disabled`: `disabled` = `true` | `false`.
//! - `POST /users/{name}/unlock`.
//! - `POST /users/{name}/password`: `password`.
//! - `POST /users/{name}/class`: `class` (empty: the default class).
//! - `POST /users/{name}/modern-auth`: `required` = `true` | `false`.
//! - `POST /users/{name}/app-passwords`: `label`, `days` (empty: no expiry).
//! - `POST /users/{name}/app-passwords/{id}/revoke`.
//! - `POST /users/{name}/delete`: `confirm` (must repeat the user name).

use maud::{html, Markup};

use super::{button_form, layout, path_segment, table, Column, Frame};

/// One user in the list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserRow {
    pub name: String,
    pub disabled: bool,
    pub messages: u64,
    /// Mailbox size, formatted (`1.5 MiB`).
    pub size: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsersView {
    pub users: Vec<UserRow>,
    /// The admin holds `users.write`: the add form is shown.
    pub can_write: bool,
    /// The admin's role is limited to these domains (shown as a hint).
    pub domains: Option<Vec<String>>,
}

/// `GET /users`.
pub fn users(frame: &Frame, view: &UsersView) -> Markup {
    let rows = view
        .users
        .iter()
        .map(|u| {
            vec![
                html! { a href={ "/users/" (path_segment(&u.name)) } { (u.name) } },
                html! { @if u.disabled { span.state.state-disabled { "disabled" } } @else { span.state.state-ok { "active" } } },
                html! { (u.messages) },
                html! { (u.size) },
            ]
        })
        .collect();
    let content = html! {
        @if let Some(domains) = &view.domains {
            p.hint { "Your role covers the domains " (domains.join(", ")) "." }
        }
        @if view.can_write {
            section.panel {
                h2 { "Add a user" }
                form.row method="post" action="/users" {
                    div.field {
                        label for="new-user-name" { "Name" }
                        input #new-user-name type="text" name="name" required maxlength="256" autocomplete="off"
                            autocapitalize="none" spellcheck="false" placeholder="alice@example.org";
                    }
                    div.field {
                        label for="new-user-password" { "Password" }
                        input #new-user-password type="password" name="password" required maxlength="1024"
                            autocomplete="new-password";
                    }
                    button #add-user type="submit" { "Add user" }
                }
            }
        }
        (table("users-table", "Mail users", &[Column("Name"), Column("State"), Column("Messages"), Column("Size")],
            rows, "No users yet."))
    };
    layout(frame, "users", "Users", content)
}

/// An app password as listed (never its secret).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppPasswordRow {
    pub id: i64,
    pub label: String,
    /// "never", "in 12 days", "expired".
    pub expiry: String,
    /// "never", "3 days ago".
    pub last_used: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserView {
    pub name: String,
    pub disabled: bool,
    pub messages: u64,
    pub size: String,
    /// The account class, `None`: the default.
    pub class: Option<String>,
    /// Classes defined in the configuration, offered in the class form.
    pub classes: Vec<String>,
    /// Password logins refused; only OAuth (modern authentication) accepted.
    pub modern_auth_only: bool,
    pub app_passwords: Vec<AppPasswordRow>,
    /// A just-created app password, shown once.
    pub new_app_password: Option<String>,
    /// The admin holds `users.write`.
    pub can_write: bool,
    /// The admin holds `users.delete`.
    pub can_delete: bool,
}

/// `GET /users/{name}`.
pub fn user(frame: &Frame, view: &UserView) -> Markup {
    let base = format!("/users/{}", path_segment(&view.name));
    let app_rows = view
        .app_passwords
        .iter()
        .map(|a| {
            vec![
                html! { (a.id) },
                html! { (a.label) },
                html! { (a.expiry) },
                html! { (a.last_used) },
                html! {
                    @if view.can_write {
                        (button_form(&format!("{base}/app-passwords/{}/revoke", a.id), "Revoke", &[], "danger small"))
                    }
                },
            ]
        })
        .collect();
    let content = html! {
        dl.facts #user-facts {
            dt { "State" } dd { @if view.disabled { "disabled" } @else { "active" } }
            dt { "Messages" } dd { (view.messages) }
            dt { "Mailbox size" } dd { (view.size) }
            dt { "Class" } dd { (view.class.as_deref().unwrap_or("default")) }
            dt { "Login" } dd { @if view.modern_auth_only { "modern authentication (OAuth) only" } @else { "password or OAuth" } }
        }
        @if let Some(pw) = &view.new_app_password {
            section.panel.once {
                h2 { "New app password" }
                p { "Give it to the device now: it is not shown again." }
                p { code #new-app-password.big { (pw) } }
            }
        }
        @if view.can_write {
            section.panel {
                h2 { "Account" }
                div.actions {
                    @if view.disabled {
                        (button_form(&format!("{base}/disabled"), "Enable", &[("disabled", "false")], ""))
                    } @else {
                        (button_form(&format!("{base}/disabled"), "Disable", &[("disabled", "true")], "secondary"))
                    }
                    (button_form(&format!("{base}/unlock"), "Unlock", &[], "secondary"))
                    @if view.modern_auth_only {
                        (button_form(&format!("{base}/modern-auth"), "Allow passwords again", &[("required", "false")], "secondary"))
                    } @else {
                        (button_form(&format!("{base}/modern-auth"), "Require modern auth", &[("required", "true")], "secondary"))
                    }
                }
                form.row method="post" action={ (base) "/password" } {
                    div.field {
                        label for="user-password" { "New password" }
                        input #user-password type="password" name="password" required maxlength="1024" autocomplete="new-password";
                    }
                    button type="submit" { "Reset password" }
                }
                form.row method="post" action={ (base) "/class" } {
                    div.field {
                        label for="user-class" { "Class" }
                        select #user-class name="class" {
                            option value="" selected[view.class.is_none()] { "default" }
                            @for c in &view.classes {
                                option value=(c) selected[view.class.as_deref() == Some(c.as_str())] { (c) }
                            }
                        }
                    }
                    button type="submit" { "Set class" }
                }
            }
        }
        section.panel {
            h2 { "App passwords" }
            (table("app-passwords-table", "App passwords", &[Column("Id"), Column("Label"), Column("Expires"),
                Column("Last used"), Column("")], app_rows, "No app passwords."))
            @if view.can_write {
                form.row method="post" action={ (base) "/app-passwords" } {
                    div.field {
                        label for="app-password-label" { "Device" }
                        input #app-password-label type="text" name="label" required maxlength="64" placeholder="phone";
                    }
                    div.field {
                        label for="app-password-days" { "Expires after (days)" }
                        input #app-password-days type="number" name="days" min="1" max="3650" placeholder="never";
                    }
                    button type="submit" { "Create app password" }
                }
            }
        }
        @if view.can_delete {
            section.panel.danger-zone {
                h2 { "Delete" }
                p { "Deletes the account and all its mail. This cannot be undone." }
                form.row method="post" action={ (base) "/delete" } {
                    div.field {
                        label for="delete-confirm" { "Type the user name to confirm" }
                        input #delete-confirm type="text" name="confirm" required maxlength="256" autocomplete="off";
                    }
                    button.danger #delete-user type="submit" { "Delete user" }
                }
            }
        }
        p { a href="/users" { "← All users" } }
    };
    layout(frame, "user", &view.name, content)
}
