//! Tests of the console pages: the element ids the browser test and the
//! handlers rely on, escaping of every kind of data, no inline script or
//! style, state changes only by POST, and the small formatting helpers.

use super::admins::*;
use super::audit::*;
use super::auth::*;
use super::connector::*;
use super::dashboard::*;
use super::security::*;
use super::settings::*;
use super::users::*;
use super::*;

const HOSTILE: &str = "<script>alert(1)</script>\"'&";

fn frame(path: &str) -> Frame {
    Frame {
        admin: "alice".into(),
        roles: vec!["superadmin".into()],
        elevated_until: None,
        nav: Section::ALL.to_vec(),
        path: path.into(),
        notice: None,
    }
}

fn hostile_frame() -> Frame {
    Frame {
        admin: HOSTILE.into(),
        roles: vec![HOSTILE.into()],
        elevated_until: Some(HOSTILE.into()),
        nav: Section::ALL.to_vec(),
        path: "/users".into(),
        notice: Some(Notice::error(HOSTILE)),
    }
}

/// Every page, rendered with `text` in every string field.
fn all_pages(f: &Frame, text: &str) -> Vec<(&'static str, String)> {
    let s = || text.to_owned();
    let role = RoleRow { name: s(), permissions: vec![s()], domains: Some(vec![s()]), builtin: false };
    vec![
        ("login", login(&LoginView { name: s(), notice: Some(Notice::error(s())) }).into_string()),
        ("mfa", mfa(&MfaView { admin: s(), totp: true, passkey: true, notice: Some(Notice::info(s())) }).into_string()),
        (
            "enrol",
            enrol(
                f,
                &EnrolView {
                    totp: TotpEnrolView { pending_id: s(), secret_base32: s(), otpauth_uri: s() },
                    first_factor: true,
                    next: "/".into(),
                },
            )
            .into_string(),
        ),
        (
            "step-up",
            step_up(f, &StepUpView { next: "/users".into(), totp: true, passkey: true, secs: 600 }).into_string(),
        ),
        ("recovery-codes", recovery_codes(f, &RecoveryCodesView { codes: vec![s()], next: "/".into() }).into_string()),
        (
            "dashboard",
            dashboard(
                f,
                &DashboardView {
                    stats: vec![Stat { label: s(), value: s(), href: Some("/bans".into()), warn: true }],
                    connector: vec![ConnectorHealth { account: s(), state: s(), last_run: s(), last_error: Some(s()) }],
                },
            )
            .into_string(),
        ),
        (
            "users",
            users(
                f,
                &UsersView {
                    users: vec![UserRow { name: s(), disabled: false, messages: 3, size: s() }],
                    can_write: true,
                    domains: Some(vec![s()]),
                },
            )
            .into_string(),
        ),
        (
            "user",
            user(
                f,
                &UserView {
                    name: s(),
                    disabled: true,
                    messages: 1,
                    size: s(),
                    class: Some(s()),
                    classes: vec![s()],
                    modern_auth_only: true,
                    app_passwords: vec![AppPasswordRow { id: 4, label: s(), expiry: s(), last_used: s() }],
                    new_app_password: Some(s()),
                    can_write: true,
                    can_delete: true,
                },
            )
            .into_string(),
        ),
        (
            "bans",
            bans(
                f,
                &BansView {
                    bans: vec![BanRow { network: s(), reason: s(), expires: s(), offences: 2 }],
                    can_write: true,
                },
            )
            .into_string(),
        ),
        (
            "events",
            events(
                f,
                &EventsView {
                    events: vec![EventRow { time: s(), kind: s(), address: s(), user: s(), detail: s() }],
                    scope: s(),
                    filter: EventsFilter { user: s(), ip: s(), kind: s(), since: s(), until: s() },
                    kinds: vec![s()],
                    more_before: Some(7),
                },
            )
            .into_string(),
        ),
        (
            "connector",
            connector(
                f,
                &ConnectorView {
                    accounts: vec![ConnectorRow {
                        name: s(),
                        upstream: s(),
                        origin: s(),
                        enabled: true,
                        state: s(),
                        last_run: s(),
                        last_success: s(),
                        failures: 1,
                        fetched_total: 2,
                        seen: 3,
                        last_error: Some(s()),
                    }],
                    can_write: true,
                },
            )
            .into_string(),
        ),
        (
            "audit",
            audit(
                f,
                &AuditView {
                    records: vec![AuditRow {
                        seq: 7,
                        time: s(),
                        actor: s(),
                        source: s(),
                        action: s(),
                        target: s(),
                        outcome: s(),
                        before: Some(s()),
                        after: Some(s()),
                    }],
                    filter: AuditFilter { actor: s(), action: s(), since: s(), until: s() },
                    more_before: Some(7),
                },
            )
            .into_string(),
        ),
        ("config", config(f, &ConfigView { effective: s(), source: s(), can_reload: true }).into_string()),
        (
            "admins",
            admins(
                f,
                &AdminsView {
                    admins: vec![AdminRow {
                        name: s(),
                        roles: vec![s()],
                        enabled: true,
                        factors: 2,
                        created: s(),
                        last_login: s(),
                    }],
                    roles: vec![role.clone()],
                    can_write: true,
                },
            )
            .into_string(),
        ),
        ("roles", roles(f, &RolesView { roles: vec![role] }).into_string()),
        (
            "tokens",
            tokens(
                f,
                &TokensView {
                    tokens: vec![TokenRow {
                        id: s(),
                        name: s(),
                        creator: s(),
                        permissions: vec![s()],
                        networks: vec![s()],
                        created: s(),
                        expires: s(),
                        last_used: s(),
                        last_used_from: s(),
                        revoked: false,
                    }],
                    grantable: vec![s()],
                    max_days: 365,
                    new_token: Some(s()),
                    can_write: true,
                },
            )
            .into_string(),
        ),
        (
            "account",
            account(
                f,
                &AccountView {
                    name: s(),
                    roles: vec![s()],
                    permissions: vec![s()],
                    factors: vec![
                        FactorRow { id: 1, kind: s(), label: s(), created: s(), last_used: s() },
                        FactorRow { id: 2, kind: s(), label: s(), created: s(), last_used: s() },
                    ],
                },
            )
            .into_string(),
        ),
    ]
}

#[test]
fn every_page_has_its_main_id() {
    for (page, html) in all_pages(&frame("/"), "x") {
        assert!(html.starts_with("<!DOCTYPE html>"), "{page}");
        assert!(html.contains(&format!("<main id=\"page-{page}\"")), "{page}: {html}");
        assert!(html.contains("href=\"/static/console.css\""), "{page}");
    }
}

#[test]
fn contract_element_ids_are_present() {
    let pages: std::collections::HashMap<_, _> = all_pages(&frame("/"), "x").into_iter().collect();
    let expect: &[(&str, &[&str])] = &[
        ("login", &["id=\"name\"", "id=\"password\"", "id=\"login\""]),
        ("mfa", &["id=\"code\"", "id=\"verify\"", "id=\"use-passkey\"", "id=\"recovery-code\""]),
        (
            "enrol",
            &[
                "id=\"totp-secret\"",
                "id=\"totp-code\"",
                "id=\"totp-enrol\"",
                "id=\"passkey-label\"",
                "id=\"passkey-enrol\"",
            ],
        ),
        ("step-up", &["id=\"code\"", "id=\"verify\"", "id=\"use-passkey\""]),
        ("users", &["id=\"new-user-name\"", "id=\"new-user-password\"", "id=\"add-user\"", "id=\"users-table\""]),
        ("bans", &["id=\"ban-network\"", "id=\"ban-reason\"", "id=\"add-ban\"", "id=\"bans-table\""]),
        ("audit", &["id=\"audit-table\""]),
        ("tokens", &["id=\"new-token\"", "id=\"create-token\""]),
    ];
    for (page, ids) in expect {
        for id in *ids {
            assert!(pages[page].contains(id), "{page} lacks {id}");
        }
    }
}

#[test]
fn data_is_escaped_everywhere() {
    for (page, html) in all_pages(&hostile_frame(), HOSTILE) {
        assert!(!html.contains("<script>alert"), "{page} lets markup through: {html}");
        assert!(!html.contains("\"'&\""), "{page}: an attribute value ends early");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{page} does not show the data");
    }
}

#[test]
fn no_inline_script_or_style() {
    for (page, html) in all_pages(&frame("/users"), "x") {
        for (i, _) in html.match_indices("<script") {
            let tag_end = html[i..].find('>').map(|e| i + e).unwrap_or(html.len());
            assert!(html[i..tag_end].contains("src=\"/static/webauthn.js\""), "{page}: inline script");
            assert!(html[tag_end..].starts_with("></script>"), "{page}: script with a body");
        }
        assert!(!html.contains("<style"), "{page}: style element");
        assert!(!html.contains(" style="), "{page}: style attribute");
        assert!(!html.contains(" onclick=") && !html.contains(" onload=") && !html.contains(" onsubmit="), "{page}");
        assert!(!html.contains("javascript:"), "{page}");
    }
}

#[test]
fn state_changes_are_posted() {
    for (page, html) in all_pages(&frame("/"), "x") {
        for (i, _) in html.match_indices("<form") {
            let tag = &html[i..i + html[i..].find('>').unwrap_or(0)];
            if tag.contains("method=\"get\"") {
                assert!(
                    tag.contains("action=\"/audit\"") || tag.contains("action=\"/events\""),
                    "{page}: only the audit and event filters are GET forms: {tag}"
                );
            } else {
                assert!(tag.contains("method=\"post\""), "{page}: form without POST: {tag}");
            }
        }
    }
}

#[test]
fn user_names_stay_one_path_segment() {
    let html = users(
        &frame("/users"),
        &UsersView {
            users: vec![UserRow {
                name: "a/../b?x=1#y@ex.org".into(),
                disabled: false,
                messages: 0,
                size: "0 B".into(),
            }],
            can_write: false,
            domains: None,
        },
    )
    .into_string();
    assert!(html.contains("href=\"/users/a%2F..%2Fb%3Fx%3D1%23y%40ex.org\""), "{html}");
    assert!(!html.contains("id=\"add-user\""), "the add form needs users.write");
    assert_eq!(path_segment("alice+tag@example.org"), "alice%2Btag%40example.org");
    assert_eq!(path_segment("p3x_AbC-9"), "p3x_AbC-9");
    assert_eq!(query_value("/users/a b"), "/users/a%20b");
}

#[test]
fn badge_shows_read_only_or_elevated() {
    let mut f = frame("/bans");
    let html = bans(&f, &BansView::default()).into_string();
    assert!(html.contains("read-only"));
    assert!(html.contains("href=\"/step-up?next=/bans\""), "{html}");
    f.elevated_until = Some("14:05 UTC".into());
    let html = bans(&f, &BansView::default()).into_string();
    assert!(html.contains("elevated until 14:05 UTC"));
    assert!(!html.contains("read-only"));
    assert_eq!(step_up_href("/users/a b"), "/step-up?next=/users/a%20b");
}

#[test]
fn navigation_lists_only_the_given_sections() {
    let mut f = frame("/users");
    f.nav = vec![Section::Dashboard, Section::Users];
    let html = users(&f, &UsersView::default()).into_string();
    assert!(html.contains("<a href=\"/users\" aria-current=\"page\">Users</a>"), "{html}");
    assert!(!html.contains("href=\"/audit\""));
    f.nav.clear();
    let html = enrol(&f, &EnrolView::default()).into_string();
    assert!(!html.contains("<nav"), "enrolment shows no navigation");
    assert!(html.contains("src=\"/static/webauthn.js\""));
}

#[test]
fn one_time_secrets_only_when_given() {
    let f = frame("/tokens");
    let html = tokens(&f, &TokensView { can_write: true, max_days: 90, ..Default::default() }).into_string();
    assert!(!html.contains("id=\"new-token\""));
    assert!(html.contains("max=\"90\""));
    let html = tokens(&f, &TokensView { new_token: Some("p3x_id_secret".into()), ..Default::default() }).into_string();
    assert!(html.contains("p3x_id_secret"));
    assert!(!html.contains("id=\"create-token\""), "creating needs tokens.write");
}

#[test]
fn formats_times_and_sizes() {
    assert_eq!(format_time(0), "1970-01-01 00:00 UTC");
    assert_eq!(format_time(951_782_400), "2000-02-29 00:00 UTC");
    assert_eq!(format_time(1_796_459_399), "2026-12-05 08:29 UTC");
    assert_eq!(format_time(-60), "1969-12-31 23:59 UTC");
    assert_eq!(format_clock(1_796_459_399), "08:29 UTC");
    assert_eq!(format_time_opt(None), "never");
    assert_eq!(format_bytes(512), "512 B");
    assert_eq!(format_bytes(1536), "1.5 KiB");
    assert_eq!(format_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
}

#[test]
fn static_files_are_embedded() {
    assert!(CONSOLE_CSS.contains("@media (max-width: 720px)"));
    assert!(WEBAUTHN_JS.contains("navigator.credentials.create"));
    assert!(WEBAUTHN_JS.contains("credentials: \"same-origin\""));
}

#[test]
fn step_up_window_is_said_in_words() {
    assert_eq!(duration_words(600), "10 minutes");
    assert_eq!(duration_words(60), "1 minute");
    assert_eq!(duration_words(45), "45 seconds");
    assert_eq!(duration_words(1), "1 second");
    assert_eq!(duration_words(90), "1 minute 30 seconds");
}
