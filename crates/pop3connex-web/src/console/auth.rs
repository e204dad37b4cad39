//! Pages of signing in and of proving a second factor: login, the second
//! factor at login, enrolment of a factor, step-up, and the one-time display
//! of recovery codes.
//!
//! Forms and the fields the handlers read:
//! - `POST /login`: `name`, `password` (ids `#name`, `#password`, `#login`).
//! - `POST /login/mfa`: `method` = `totp` | `recovery`, `code` (TOTP form
//!   ids `#code`, `#verify`; recovery form `#recovery-code`,
//!   `#recovery-verify`). Passkey: `#use-passkey` runs `/static/webauthn.js`
//!   against `POST /login/webauthn/begin` and `/login/webauthn/finish`.
//! - `POST /enrol/totp`: `pending_id`, `code` (`#totp-code`, `#totp-enrol`;
//!   the secret is shown in `#totp-secret`, the URI in `#totp-uri`).
//!   Passkey: `#passkey-label`, `#passkey-enrol` against
//!   `POST /enrol/webauthn/begin` (JSON `{"label": ...}`) and `/enrol/webauthn/finish`.
//! - `POST /step-up`: `method` = `totp`, `code`, `next` (`#code`, `#verify`);
//!   passkey `#use-passkey` against `/step-up/webauthn/begin|finish`.
//!
//! The JSON endpoints: `begin` answers the options for
//! `navigator.credentials.create/get` (`{"publicKey": {...}}`); `finish`
//! takes the credential as JSON and answers `{"next": "/path"}` (or no
//! body: the button's `data-next` is used).

use maud::{html, Markup};

use super::{bare_page, layout_with_script, query_value, Frame, Notice};

/// The login page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginView {
    /// The name typed last time (kept after a failure), or empty.
    pub name: String,
    /// "Invalid name or password", "Too many attempts", "Signed out", ...
    pub notice: Option<Notice>,
}

/// `GET /login`.
pub fn login(view: &LoginView) -> Markup {
    let content = html! {
        form.stack method="post" action="/login" {
            label for="name" { "Name" }
            input #name type="text" name="name" value=(view.name) autocomplete="username" required
                autocapitalize="none" spellcheck="false" maxlength="256" autofocus;
            label for="password" { "Password" }
            input #password type="password" name="password" autocomplete="current-password" required maxlength="1024";
            button #login type="submit" { "Sign in" }
        }
        p.hint { "A second factor (authenticator app or passkey) is required after the password." }
    };
    bare_page("login", "Sign in", false, view.notice.as_ref(), content)
}

/// The second-factor page after a correct password.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MfaView {
    /// The admin whose password was accepted.
    pub admin: String,
    /// The admin has an authenticator app (TOTP) enrolled.
    pub totp: bool,
    /// The admin has a passkey or security key enrolled.
    pub passkey: bool,
    pub notice: Option<Notice>,
}

/// `GET /login/mfa`.
pub fn mfa(view: &MfaView) -> Markup {
    let content = html! {
        p { "Signed in as " strong { (view.admin) } ". Confirm with a second factor." }
        @if view.passkey {
            section.factor {
                h2 { "Passkey or security key" }
                (passkey_button("use-passkey", "get", "/login/webauthn/begin", "/login/webauthn/finish", "/", "Use passkey", None))
            }
        }
        @if view.totp {
            section.factor {
                h2 { "Authenticator app" }
                (code_form("/login/mfa", "totp", None))
            }
        }
        section.factor {
            details {
                summary { "Use a recovery code" }
                form.stack method="post" action="/login/mfa" {
                    input type="hidden" name="method" value="recovery";
                    label for="recovery-code" { "Recovery code" }
                    input #recovery-code type="text" name="code" autocomplete="off" autocapitalize="none"
                        spellcheck="false" maxlength="64" required;
                    button #recovery-verify type="submit" { "Use recovery code" }
                }
                p.hint { "Each recovery code works once. Using one alerts the operators." }
            }
        }
        form.inline method="post" action="/logout" {
            button.secondary type="submit" { "Cancel" }
        }
    };
    bare_page("mfa", "Second factor", view.passkey, view.notice.as_ref(), content)
}

/// A pending TOTP enrolment: the secret to type or scan into an
/// authenticator app.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TotpEnrolView {
    /// Opaque id of the pending enrolment (server-side state).
    pub pending_id: String,
    /// The shared secret, base32.
    pub secret_base32: String,
    /// `otpauth://totp/...`: the same secret as a URI for apps that import it.
    pub otpauth_uri: String,
}

/// The enrolment page: TOTP and passkey side by side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnrolView {
    pub totp: TotpEnrolView,
    /// The admin has no factor yet: explain that enrolment is required.
    pub first_factor: bool,
    /// Where the passkey button goes when the finish answer names no page.
    pub next: String,
}

/// `GET /enrol`. An admin without a factor sees only this page (`frame.nav`
/// empty); from `/account` it adds one more factor.
pub fn enrol(frame: &Frame, view: &EnrolView) -> Markup {
    let next = if view.next.is_empty() { "/" } else { view.next.as_str() };
    let content = html! {
        @if view.first_factor {
            p.lead { "Administrators need a second factor. Enrol an authenticator app or a passkey to continue." }
        }
        div.columns {
            section.factor {
                h2 { "Authenticator app (TOTP)" }
                p { "Add this secret to your authenticator app, then type the 6-digit code it shows." }
                dl.secret {
                    dt { "Secret" }
                    dd { code #totp-secret { (view.totp.secret_base32) } }
                    dt { "URI" }
                    dd { code #totp-uri.wrap { (view.totp.otpauth_uri) } }
                }
                form.stack method="post" action="/enrol/totp" {
                    input type="hidden" name="pending_id" value=(view.totp.pending_id);
                    label for="totp-code" { "Code from the app" }
                    input #totp-code type="text" name="code" inputmode="numeric" pattern="[0-9]{6}" maxlength="6"
                        autocomplete="one-time-code" required;
                    button #totp-enrol type="submit" { "Enrol authenticator app" }
                }
            }
            section.factor {
                h2 { "Passkey or security key" }
                div.stack {
                    label for="passkey-label" { "Name of this key" }
                    input #passkey-label type="text" name="label" value="passkey" maxlength="64" required;
                    (passkey_button("passkey-enrol", "create", "/enrol/webauthn/begin", "/enrol/webauthn/finish",
                        next, "Enrol passkey", Some("passkey-label")))
                }
            }
        }
    };
    layout_with_script(frame, "enrol", "Enrol a second factor", content)
}

/// The step-up page: a fresh second factor before a destructive action.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepUpView {
    /// Where to go afterwards (already checked by the handler: starts with
    /// `/`, not `//`).
    pub next: String,
    pub totp: bool,
    pub passkey: bool,
    /// How long the elevation lasts, in seconds (shown in words).
    pub secs: u64,
}

/// "10 minutes", "1 minute", "45 seconds", "1 minute 30 seconds".
pub fn duration_words(secs: u64) -> String {
    let unit = |n: u64, one: &str| if n == 1 { format!("1 {one}") } else { format!("{n} {one}s") };
    match (secs / 60, secs % 60) {
        (0, s) => unit(s, "second"),
        (m, 0) => unit(m, "minute"),
        (m, s) => format!("{} {}", unit(m, "minute"), unit(s, "second")),
    }
}

/// `GET /step-up?next=...`.
pub fn step_up(frame: &Frame, view: &StepUpView) -> Markup {
    let content = html! {
        p { "This action changes the server. Confirm with your second factor; your session stays elevated for "
            (duration_words(view.secs)) " from this address." }
        @if view.passkey {
            section.factor {
                h2 { "Passkey or security key" }
                (passkey_button("use-passkey", "get", "/step-up/webauthn/begin", "/step-up/webauthn/finish", &view.next,
                    "Use passkey", None))
            }
        }
        @if view.totp {
            section.factor {
                h2 { "Authenticator app" }
                (code_form("/step-up", "totp", Some(&view.next)))
            }
        }
        p { a href=(view.next) { "Back without elevating" } }
    };
    layout_with_script(frame, "step-up", "Confirm it is you", content)
}

/// The recovery codes, shown once after the first factor is enrolled or
/// after regenerating them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryCodesView {
    pub codes: Vec<String>,
    /// Where "Continue" goes.
    pub next: String,
}

/// The one-time display of recovery codes.
pub fn recovery_codes(frame: &Frame, view: &RecoveryCodesView) -> Markup {
    let content = html! {
        p.lead { "Store these recovery codes somewhere safe (a password manager or on paper). Each works once, "
            "in place of a second factor. They are not shown again." }
        ol #recovery-codes.codes {
            @for c in &view.codes { li { code { (c) } } }
        }
        p { a.button #continue href=(view.next) { "I have stored them — continue" } }
    };
    super::layout(frame, "recovery-codes", "Recovery codes", content)
}

/// The 6-digit code form (`#code`, `#verify`).
fn code_form(action: &str, method: &str, next: Option<&str>) -> Markup {
    html! {
        form.stack method="post" action=(action) {
            input type="hidden" name="method" value=(method);
            @if let Some(next) = next {
                input type="hidden" name="next" value=(next);
            }
            label for="code" { "Code from the app" }
            input #code type="text" name="code" inputmode="numeric" pattern="[0-9]{6}" maxlength="6"
                autocomplete="one-time-code" required autofocus;
            button #verify type="submit" { "Verify" }
        }
    }
}

/// A button `/static/webauthn.js` drives: `data-webauthn` is `create`
/// (register) or `get` (authenticate); the script shows errors in the
/// `role=alert` element after it.
fn passkey_button(
    id: &str,
    mode: &str,
    begin: &str,
    finish: &str,
    next: &str,
    label: &str,
    label_input: Option<&str>,
) -> Markup {
    html! {
        button id=(id) type="button" data-webauthn=(mode) data-begin=(begin) data-finish=(finish)
            data-next=(next) data-label-input=[label_input] { (label) }
        p.webauthn-error.notice.error role="alert" hidden {}
        noscript { p.hint { "Passkeys need JavaScript (one small script from this server)." } }
    }
}

/// The link to the step-up page for `next` (used by pages whose actions
/// need an elevated session).
pub fn step_up_href(next: &str) -> String {
    format!("/step-up?next={}", query_value(next))
}
