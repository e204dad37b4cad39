//! Console page handlers: each builds the view struct of a page from the
//! same admin functions the API and the CLI call, and renders it with the
//! templates in [`crate::console`]. Forms post to the page's own paths; a
//! post renders the page again with a notice saying how it went.

use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Extension;
use maud::Markup;
use pop3connex_core::admin::app_passwords::Expiry;
use pop3connex_core::audit_log::AuditQuery;
use pop3connex_core::rbac::{Permission, PermissionSet};
use pop3connex_core::types::{unix_now, UserName};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::api::scope;
use crate::auth::Caller;
use crate::console::{self, Frame, Notice, Section};
use crate::error::ApiError;
use crate::session::Stage;
use crate::state::AppState;

type St = State<Arc<AppState>>;

pub fn html(m: Markup) -> Html<String> {
    Html(m.into_string())
}

/// A `next` path we redirect to: a local path ("/x", never "//host",
/// "/\host" or a scheme), else the dashboard.
pub fn safe_next(next: &str) -> &str {
    let b = next.as_bytes();
    let local = b.first() == Some(&b'/')
        && !matches!(b.get(1), Some(b'/') | Some(b'\\'))
        && next.len() <= 512
        && !next.bytes().any(|c| c.is_ascii_control());
    if local {
        next
    } else {
        "/"
    }
}

/// What a section needs to be listed in the navigation.
fn section_permission(s: Section) -> Option<Permission> {
    match s {
        Section::Dashboard | Section::Account => None,
        Section::Users => Some(Permission::UsersRead),
        Section::Bans => Some(Permission::BansRead),
        Section::Connector => Some(Permission::ConnectorRead),
        Section::Events => Some(Permission::EventsRead),
        Section::Audit => Some(Permission::AuditRead),
        Section::Config => Some(Permission::ConfigRead),
        Section::Admins | Section::Tokens => Some(Permission::AdminsRead),
    }
}

/// The frame of a logged-in page for `caller`.
pub fn frame(_s: &AppState, c: &Caller, path: &str, notice: Option<Notice>) -> Frame {
    let (name, roles, until) = match &c.session {
        Some((_, x)) => (
            x.admin_name.clone(),
            x.roles.clone(),
            match x.stage {
                Stage::Authenticated { stepped_up_until } if stepped_up_until > unix_now() as u64 => {
                    Some(console::format_clock(stepped_up_until as i64))
                }
                _ => None,
            },
        ),
        None => (c.actor().to_string(), Vec::new(), None),
    };
    let nav =
        Section::ALL.iter().copied().filter(|s| section_permission(*s).is_none_or(|p| c.principal.can(p))).collect();
    Frame { admin: name, roles, elevated_until: until, nav, path: path.to_owned(), notice }
}

fn outcome<T>(r: Result<T, ApiError>, ok: impl FnOnce(T) -> String) -> (StatusCode, Option<Notice>) {
    match r {
        Ok(v) => (StatusCode::OK, Some(Notice::info(ok(v)))),
        Err(e) => (e.status, Some(Notice::error(e.message))),
    }
}

fn page(status: StatusCode, m: Markup) -> Response {
    (status, html(m)).into_response()
}

pub fn not_found_page() -> Html<String> {
    html(console::auth::login(&console::auth::LoginView {
        name: String::new(),
        notice: Some(Notice::error("There is no such page.")),
    }))
}

pub async fn console_css() -> Response {
    static_file("text/css; charset=utf-8", console::CONSOLE_CSS)
}

pub async fn webauthn_js() -> Response {
    static_file("text/javascript; charset=utf-8", console::WEBAUTHN_JS)
}

fn static_file(kind: &'static str, body: &'static str) -> Response {
    // Embedded in the binary, so they change only with it; a day keeps an
    // upgrade visible soon.
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "public, max-age=86400")], body).into_response()
}

// ---- dashboard and account ----

pub async fn dashboard(State(s): St, Extension(c): Extension<Caller>) -> Response {
    use console::dashboard::{ConnectorHealth, DashboardView, Stat};
    let stat = |label: &str, value: String, href: Option<&str>, warn: bool| Stat {
        label: label.into(),
        value,
        href: href.map(Into::into),
        warn,
    };
    let mut stats = vec![stat("Console sessions", s.sessions.count(unix_now() as u64).to_string(), None, false)];
    if c.principal.can(Permission::UsersRead) {
        if let Ok(users) = s.admin.list_users(c.actor()).await {
            let disabled = users.iter().filter(|u| u.disabled).count();
            stats.push(stat("Users", users.len().to_string(), Some("/users"), false));
            stats.push(stat("Disabled users", disabled.to_string(), Some("/users"), false));
        }
    }
    if c.principal.can(Permission::BansRead) {
        if let Ok(bans) = s.admin.list_bans(c.actor()).await {
            stats.push(stat("Active bans", bans.len().to_string(), Some("/bans"), !bans.is_empty()));
        }
    }
    let mut connector = Vec::new();
    if c.principal.can(Permission::ConnectorRead) && s.cfg.connector.enabled {
        if let Ok(list) = s.admin.connector_status(c.actor(), None).await {
            for a in list {
                connector.push(ConnectorHealth {
                    state: connector_state(a.status.last_error.is_some(), a.status.last_run_at),
                    last_run: console::format_time_opt(a.status.last_run_at),
                    last_error: a.status.last_error,
                    account: a.name,
                });
            }
        }
    }
    let m = console::dashboard::dashboard(&frame(&s, &c, "/", None), &DashboardView { stats, connector });
    page(StatusCode::OK, m)
}

fn connector_state(failed: bool, last_run: Option<i64>) -> String {
    match (failed, last_run) {
        (true, _) => "failing".into(),
        (false, None) => "never run".into(),
        (false, Some(_)) => "ok".into(),
    }
}

async fn account_page(s: &AppState, c: &Caller, status: StatusCode, notice: Option<Notice>) -> Response {
    use console::admins::{AccountView, FactorRow};
    let name = c.session.as_ref().map(|(_, x)| x.admin_name.clone()).unwrap_or_default();
    // Own factors: the admin's own entry of the directory, read without
    // needing admins.read.
    let own = s.admin.admin_list(c.actor()).await.map(|l| l.into_iter().find(|a| Some(a.id) == c.principal.admin_id));
    let factors = match own {
        Ok(info) => info
            .map(|i| i.factors)
            .unwrap_or_default()
            .into_iter()
            .map(|f| FactorRow {
                id: f.id,
                kind: f.kind.as_str().into(),
                label: f.label,
                created: console::format_time(f.created_at),
                last_used: console::format_time_opt(f.last_used_at),
            })
            .collect(),
        Err(e) => return page_error(e.into()),
    };
    let v = AccountView {
        name,
        roles: c.session.as_ref().map(|(_, x)| x.roles.clone()).unwrap_or_default(),
        permissions: c.principal.permissions.names().into_iter().map(Into::into).collect(),
        factors,
    };
    page(status, console::admins::account(&frame(s, c, "/account", notice), &v))
}

fn page_error(e: ApiError) -> Response {
    (e.status, not_found_like(&e.message)).into_response()
}

fn not_found_like(message: &str) -> Html<String> {
    html(console::auth::login(&console::auth::LoginView { name: String::new(), notice: Some(Notice::error(message)) }))
}

pub async fn account(State(s): St, Extension(c): Extension<Caller>) -> Response {
    account_page(&s, &c, StatusCode::OK, None).await
}

/// Removing a factor is an MFA change: it needs a fresh second factor.
fn require_step_up(c: &Caller, back: &str) -> Option<Response> {
    let (_, x) = c.session.as_ref()?;
    if x.stepped_up(unix_now() as u64) {
        return None;
    }
    Some(axum::response::Redirect::to(&console::auth::step_up_href(back)).into_response())
}

pub async fn account_factor_remove(State(s): St, Extension(c): Extension<Caller>, Path(id): Path<i64>) -> Response {
    if let Some(r) = require_step_up(&c, "/account") {
        return r;
    }
    let Some(admin_id) = c.principal.admin_id else { return page_error(ApiError::forbidden()) };
    let r = s.admin.factor_remove(c.actor(), admin_id, id).await.map_err(ApiError::from);
    let (status, notice) = outcome(r, |()| "Factor removed.".into());
    account_page(&s, &c, status, notice).await
}

pub async fn account_recovery_codes(State(s): St, Extension(c): Extension<Caller>) -> Response {
    if let Some(r) = require_step_up(&c, "/account") {
        return r;
    }
    let Some(admin_id) = c.principal.admin_id else { return page_error(ApiError::forbidden()) };
    match s.admin.recovery_codes_regenerate(c.actor(), admin_id).await {
        Ok(codes) => {
            let v = console::auth::RecoveryCodesView { codes, next: "/account".into() };
            page(StatusCode::OK, console::auth::recovery_codes(&frame(&s, &c, "/account", None), &v))
        }
        Err(e) => account_page(&s, &c, StatusCode::BAD_REQUEST, Some(Notice::error(ApiError::from(e).message))).await,
    }
}

// ---- users ----

async fn users_page(s: &AppState, c: &Caller, status: StatusCode, notice: Option<Notice>) -> Response {
    use console::users::{UserRow, UsersView};
    let users = match s.admin.list_users(c.actor()).await {
        Ok(u) => u,
        Err(e) => return page_error(e.into()),
    };
    let users = users
        .into_iter()
        .filter(|u| c.principal.may_touch_user(u.name.as_str()))
        .map(|u| UserRow {
            name: u.name.as_str().to_owned(),
            disabled: u.disabled,
            messages: u.messages,
            size: console::format_bytes(u.octets),
        })
        .collect();
    let v =
        UsersView { users, can_write: c.principal.can(Permission::UsersWrite), domains: c.principal.domains.clone() };
    page(status, console::users::users(&frame(s, c, "/users", notice), &v))
}

pub async fn users(State(s): St, Extension(c): Extension<Caller>) -> Response {
    users_page(&s, &c, StatusCode::OK, None).await
}

#[derive(Deserialize)]
pub struct NewUserForm {
    name: String,
    password: Zeroizing<String>,
}

pub async fn users_add(State(s): St, Extension(c): Extension<Caller>, Form(f): Form<NewUserForm>) -> Response {
    let r: Result<_, ApiError> = async {
        let name = UserName::parse(f.name.trim()).map_err(|e| ApiError::bad_input(e.to_string()))?;
        scope(&s, &c, &name).await?;
        s.admin.add_user(c.actor(), &name, f.password.as_bytes()).await?;
        Ok(name)
    }
    .await;
    let (status, notice) = outcome(r, |n| format!("User {n} added."));
    users_page(&s, &c, status, notice).await
}

async fn user_page(s: &AppState, c: &Caller, name: &str, status: StatusCode, notice: Option<Notice>) -> Response {
    user_page_with(s, c, name, status, notice, None).await
}

async fn user_page_with(
    s: &AppState,
    c: &Caller,
    name: &str,
    status: StatusCode,
    notice: Option<Notice>,
    new_app_password: Option<String>,
) -> Response {
    use console::users::{AppPasswordRow, UserView};
    let r: Result<Response, ApiError> = async {
        let name = UserName::parse(name).map_err(|e| ApiError::bad_input(e.to_string()))?;
        scope(s, c, &name).await?;
        let stat = s.admin.mailbox_stat(c.actor(), &name).await?;
        let record = s.admin.mail().store().user(&name).await.map_err(pop3connex_core::admin::AdminError::from)?;
        let app = s.admin.list_app_passwords(c.actor(), &name).await?;
        let v = UserView {
            name: name.as_str().to_owned(),
            disabled: stat.disabled,
            messages: stat.messages as u64,
            size: console::format_bytes(stat.octets),
            class: record.as_ref().and_then(|u| u.class.clone()),
            classes: s.cfg.auth.password_policy.max_age_days_by_class.keys().cloned().collect(),
            modern_auth_only: record.as_ref().is_some_and(|u| u.require_modern_auth),
            app_passwords: app
                .into_iter()
                .map(|a| AppPasswordRow {
                    id: a.id,
                    label: a.label,
                    expiry: match a.expiry {
                        Expiry::Never => "never".into(),
                        Expiry::InDays(d) => format!("in {d} days"),
                        Expiry::Expired => "expired".into(),
                    },
                    last_used: a.last_used_ago.map_or("never".into(), |s| format!("{} days ago", s / 86_400)),
                })
                .collect(),
            new_app_password,
            can_write: c.principal.can(Permission::UsersWrite),
            can_delete: c.principal.can(Permission::UsersDelete),
        };
        Ok(page(status, console::users::user(&frame(s, c, "/users", notice), &v)))
    }
    .await;
    r.unwrap_or_else(page_error)
}

pub async fn user(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Response {
    user_page(&s, &c, &name, StatusCode::OK, None).await
}

/// Runs a user action (after the scope check) and shows the user again.
async fn user_action<F, Fut>(s: &AppState, c: &Caller, name: &str, done: &str, action: F) -> Response
where
    F: FnOnce(UserName) -> Fut,
    Fut: std::future::Future<Output = Result<(), ApiError>>,
{
    let r: Result<_, ApiError> = async {
        let n = UserName::parse(name).map_err(|e| ApiError::bad_input(e.to_string()))?;
        scope(s, c, &n).await?;
        action(n).await
    }
    .await;
    let (status, notice) = outcome(r, |()| done.to_owned());
    user_page(s, c, name, status, notice).await
}

#[derive(Deserialize)]
pub struct DisabledForm {
    disabled: bool,
}

pub async fn user_disabled(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Form(f): Form<DisabledForm>,
) -> Response {
    let done = if f.disabled { "User disabled." } else { "User enabled." };
    let (st, ca) = (&*s, &c);
    user_action(st, ca, &name, done, |n| async move { Ok(st.admin.set_disabled(ca.actor(), &n, f.disabled).await?) })
        .await
}

pub async fn user_unlock(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Response {
    let (st, ca) = (&*s, &c);
    user_action(st, ca, &name, "Lockout lifted (if there was one).", |n| async move {
        st.admin.unlock(ca.actor(), &n).await?;
        Ok(())
    })
    .await
}

#[derive(Deserialize)]
pub struct RequiredForm {
    required: bool,
}

pub async fn user_modern_auth(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Form(f): Form<RequiredForm>,
) -> Response {
    let (st, ca) = (&*s, &c);
    user_action(st, ca, &name, "Login methods changed.", |n| async move {
        Ok(st.admin.set_require_modern_auth(ca.actor(), &n, f.required).await?)
    })
    .await
}

#[derive(Deserialize)]
pub struct PasswordForm {
    password: Zeroizing<String>,
}

pub async fn user_passwd(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Form(f): Form<PasswordForm>,
) -> Response {
    let (st, ca) = (&*s, &c);
    user_action(st, ca, &name, "Password changed.", |n| async move {
        Ok(st.admin.set_password(ca.actor(), &n, f.password.as_bytes()).await?)
    })
    .await
}

#[derive(Deserialize)]
pub struct ClassForm {
    #[serde(default)]
    class: String,
}

pub async fn user_class(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Form(f): Form<ClassForm>,
) -> Response {
    let (st, ca) = (&*s, &c);
    user_action(st, ca, &name, "Class set.", |n| async move {
        let class = Some(f.class.as_str()).filter(|c| !c.is_empty());
        Ok(st.admin.set_class(ca.actor(), &n, class).await?)
    })
    .await
}

#[derive(Deserialize)]
pub struct AppPasswordForm {
    label: String,
    #[serde(default)]
    days: String,
}

pub async fn user_app_password_add(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Form(f): Form<AppPasswordForm>,
) -> Response {
    let r: Result<_, ApiError> = async {
        let n = UserName::parse(&name).map_err(|e| ApiError::bad_input(e.to_string()))?;
        scope(&s, &c, &n).await?;
        let days = match f.days.trim() {
            "" => None,
            d => Some(d.parse::<u64>().map_err(|_| ApiError::bad_input("days: a whole number"))?),
        };
        Ok(s.admin.add_app_password(c.actor(), &n, &f.label, days).await?)
    }
    .await;
    match r {
        Ok(new) => {
            let notice = Some(Notice::info("App password created."));
            user_page_with(&s, &c, &name, StatusCode::OK, notice, Some(new.password.to_string())).await
        }
        Err(e) => user_page(&s, &c, &name, e.status, Some(Notice::error(e.message))).await,
    }
}

pub async fn user_app_password_revoke(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path((name, id)): Path<(String, i64)>,
) -> Response {
    let (st, ca) = (&*s, &c);
    user_action(st, ca, &name, "App password revoked.", |n| async move {
        Ok(st.admin.revoke_app_password(ca.actor(), &n, id).await?)
    })
    .await
}

#[derive(Deserialize)]
pub struct DeleteForm {
    #[serde(default)]
    confirm: String,
}

pub async fn user_delete(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Form(f): Form<DeleteForm>,
) -> Response {
    let r: Result<_, ApiError> = async {
        let n = UserName::parse(&name).map_err(|e| ApiError::bad_input(e.to_string()))?;
        scope(&s, &c, &n).await?;
        let confirmed = f.confirm.trim() == n.as_str();
        s.admin.delete_user(c.actor(), &n, confirmed).await?;
        Ok(n)
    }
    .await;
    match r {
        Ok(n) => users_page(&s, &c, StatusCode::OK, Some(Notice::info(format!("User {n} deleted.")))).await,
        Err(e) => user_page(&s, &c, &name, e.status, Some(Notice::error(e.message))).await,
    }
}

// ---- bans, events ----

async fn bans_page(s: &AppState, c: &Caller, status: StatusCode, notice: Option<Notice>) -> Response {
    use console::security::{BanRow, BansView};
    let bans = match s.admin.list_bans(c.actor()).await {
        Ok(b) => b,
        Err(e) => return page_error(e.into()),
    };
    let bans = bans
        .into_iter()
        .map(|b| BanRow {
            network: b.network.to_string(),
            reason: b.reason,
            expires: b.expires_in.map_or("until removed".into(), |secs| format!("in {} min", secs.max(0) / 60)),
            offences: b.offences,
        })
        .collect();
    let v = BansView { bans, can_write: c.principal.can(Permission::BansWrite) };
    page(status, console::security::bans(&frame(s, c, "/bans", notice), &v))
}

pub async fn bans(State(s): St, Extension(c): Extension<Caller>) -> Response {
    bans_page(&s, &c, StatusCode::OK, None).await
}

#[derive(Deserialize)]
pub struct BanForm {
    network: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    hours: String,
}

pub async fn bans_add(State(s): St, Extension(c): Extension<Caller>, Form(f): Form<BanForm>) -> Response {
    let r: Result<_, ApiError> = async {
        let seconds = match f.hours.trim() {
            "" => None,
            h => Some(h.parse::<u64>().map_err(|_| ApiError::bad_input("hours: a whole number"))?.saturating_mul(3600)),
        };
        let reason = if f.reason.trim().is_empty() { "set by an administrator" } else { f.reason.trim() };
        Ok(s.admin.add_ban(c.actor(), f.network.trim(), reason, seconds).await?)
    }
    .await;
    let (status, notice) = outcome(r, |n| format!("{n} banned."));
    bans_page(&s, &c, status, notice).await
}

#[derive(Deserialize)]
pub struct NetworkForm {
    network: String,
}

pub async fn bans_remove(State(s): St, Extension(c): Extension<Caller>, Form(f): Form<NetworkForm>) -> Response {
    let r = s.admin.remove_ban(c.actor(), f.network.trim()).await.map_err(ApiError::from);
    let (status, notice) = outcome(r, |n| format!("Ban on {n} removed."));
    bans_page(&s, &c, status, notice).await
}

#[derive(Deserialize)]
pub struct EventsPageQuery {
    #[serde(default)]
    user: String,
    #[serde(default)]
    ip: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    before_seq: Option<i64>,
}

/// Events shown per page.
const EVENTS_PAGE: usize = 100;

/// `GET /events`: the local event store. A domain-scoped administrator
/// sees only events about users of its domains.
pub async fn events(State(s): St, Extension(c): Extension<Caller>, Query(q): Query<EventsPageQuery>) -> Response {
    use console::security::{EventRow, EventsFilter, EventsView};
    let user = q.user.trim();
    let ip = q.ip.trim();
    let kind = q.kind.trim();
    let bad = |msg: &str| page_error(ApiError::bad_input(msg.to_owned()));
    if user.len() > 320 || user.chars().any(char::is_control) {
        return bad("not a user name");
    }
    let ip = match ip {
        "" => None,
        a => match a.parse::<std::net::IpAddr>() {
            Ok(a) => Some(a.to_string()),
            Err(_) => return bad("not an IP address"),
        },
    };
    if !kind.is_empty() && pop3connex_core::telemetry::catalogue::lookup(kind).is_none() {
        return bad("no such event type");
    }
    let filter = pop3connex_core::store::EventFilter {
        since: date_ms(&q.since),
        until: date_ms(&q.until).map(|t| t + 86_400_000),
        user: Some(user.to_owned()).filter(|u| !u.is_empty()),
        ip,
        names: if kind.is_empty() { Vec::new() } else { vec![kind.to_owned()] },
        before_seq: q.before_seq,
        limit: EVENTS_PAGE,
    };
    let found = match s.admin.events_search(c.actor(), filter).await {
        Ok(r) => r,
        Err(e) => return page_error(e.into()),
    };
    let more_before = if found.len() == EVENTS_PAGE { found.last().map(|e| e.seq) } else { None };
    let events = found
        .into_iter()
        .filter(|e| c.principal.may_touch_user(e.user.as_deref().unwrap_or_default()))
        .map(|e| EventRow {
            time: console::format_time(e.time / 1000),
            kind: e.name,
            address: e.ip.unwrap_or_default(),
            user: e.user.unwrap_or_default(),
            detail: format!("{} {}", e.message, e.fields),
        })
        .collect();
    let v = EventsView {
        events,
        scope: "Kept in the store for [log.store] retention_days; the same search as `pop3connex events search`."
            .into(),
        filter: EventsFilter {
            user: q.user.clone(),
            ip: q.ip.clone(),
            kind: q.kind.clone(),
            since: q.since.clone(),
            until: q.until.clone(),
        },
        kinds: pop3connex_core::telemetry::CATALOGUE.iter().map(|d| d.name.to_owned()).collect(),
        more_before,
    };
    page(StatusCode::OK, console::security::events(&frame(&s, &c, "/events", None), &v))
}

// ---- connector ----

async fn connector_page(s: &AppState, c: &Caller, status: StatusCode, notice: Option<Notice>) -> Response {
    use console::connector::{ConnectorRow, ConnectorView};
    let r: Result<Vec<ConnectorRow>, ApiError> = async {
        let list = s.admin.list_connector_accounts(c.actor()).await?;
        let status = s.admin.connector_status(c.actor(), None).await?;
        Ok(list
            .into_iter()
            .map(|a| {
                let st = status.iter().find(|x| x.name == a.name).map(|x| x.status.clone()).unwrap_or_default();
                ConnectorRow {
                    upstream: format!("{}:{}", a.host, a.port),
                    origin: a.origin.as_str().into(),
                    enabled: a.enabled,
                    state: connector_state(st.last_error.is_some(), st.last_run_at),
                    last_run: console::format_time_opt(st.last_run_at),
                    last_success: console::format_time_opt(st.last_success_at),
                    failures: st.failures,
                    fetched_total: st.fetched_total,
                    seen: a.seen as u64,
                    last_error: a.last_error,
                    name: a.name,
                }
            })
            .collect())
    }
    .await;
    match r {
        Ok(accounts) => {
            let v = ConnectorView { accounts, can_write: c.principal.can(Permission::ConnectorWrite) };
            page(status, console::connector::connector(&frame(s, c, "/connector", notice), &v))
        }
        Err(e) => page_error(e),
    }
}

pub async fn connector(State(s): St, Extension(c): Extension<Caller>) -> Response {
    if !s.cfg.connector.enabled {
        let v = console::connector::ConnectorView { accounts: Vec::new(), can_write: false };
        let notice = Some(Notice::info("The connector is not enabled in the configuration."));
        return page(StatusCode::OK, console::connector::connector(&frame(&s, &c, "/connector", notice), &v));
    }
    connector_page(&s, &c, StatusCode::OK, None).await
}

pub async fn connector_run(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Response {
    let r = s.admin.run_connector_accounts(c.actor(), std::slice::from_ref(&name)).await.map_err(ApiError::from);
    let (status, notice) = match r {
        Ok(runs) => match runs.into_iter().next().map(|r| r.result) {
            Some(Ok(rep)) => (StatusCode::OK, Some(Notice::info(format!("{name}: {} fetched.", rep.fetched)))),
            Some(Err(e)) => (StatusCode::OK, Some(Notice::error(format!("{name}: {e}")))),
            None => (StatusCode::OK, None),
        },
        Err(e) => (e.status, Some(Notice::error(e.message))),
    };
    connector_page(&s, &c, status, notice).await
}

// ---- audit, configuration, reload ----

#[derive(Deserialize, Default)]
pub struct AuditPageQuery {
    #[serde(default)]
    actor: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    before_seq: Option<i64>,
}

/// `YYYY-MM-DD` to Unix milliseconds at 00:00 UTC.
fn date_ms(d: &str) -> Option<i64> {
    let mut it = d.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (it.next()??, it.next()??, it.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from civil (H. Hinnant), inverse of the console's formatting.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400_000)
}

/// Audit records per page.
const AUDIT_PAGE: usize = 100;

pub async fn audit(State(s): St, Extension(c): Extension<Caller>, Query(q): Query<AuditPageQuery>) -> Response {
    use console::audit::{AuditFilter, AuditRow, AuditView};
    let query = AuditQuery {
        since: date_ms(&q.since),
        until: date_ms(&q.until).map(|t| t + 86_400_000),
        actor: Some(q.actor.trim().to_owned()).filter(|a| !a.is_empty()),
        action: Some(q.action.trim().to_owned()).filter(|a| !a.is_empty()),
        limit: AUDIT_PAGE,
        before_seq: q.before_seq,
    };
    let records = match s.admin.audit_log_read(c.actor(), &query).await {
        Ok(r) => r,
        Err(e) => return page_error(e.into()),
    };
    let more_before = if records.len() == AUDIT_PAGE { records.last().map(|r| r.seq) } else { None };
    let records = records
        .into_iter()
        .filter(|r| crate::api::audit_visible(&c, r))
        .map(|r| AuditRow {
            seq: r.seq,
            time: console::format_time(r.time / 1000),
            actor: r.actor,
            source: r.source.unwrap_or_default(),
            action: r.action,
            target: r.target,
            outcome: r.outcome,
            before: r.before.map(|v| v.to_string()),
            after: r.after.map(|v| v.to_string()),
        })
        .collect();
    let filter = AuditFilter { actor: q.actor, action: q.action, since: q.since, until: q.until };
    page(
        StatusCode::OK,
        console::audit::audit(&frame(&s, &c, "/audit", None), &AuditView { records, filter, more_before }),
    )
}

async fn config_page(s: &AppState, c: &Caller, status: StatusCode, notice: Option<Notice>) -> Response {
    let r: Result<_, ApiError> = async {
        s.audit(c.actor(), "config.read", "config", "ok", c.address).await?;
        crate::api::config_json(s)
    }
    .await;
    match r {
        Ok(v) => {
            let view = console::settings::ConfigView {
                effective: serde_json::to_string_pretty(&v["config"]).unwrap_or_default(),
                source: v["source"].as_str().unwrap_or_default().to_owned(),
                can_reload: c.principal.can(Permission::ConfigReload),
            };
            page(status, console::settings::config(&frame(s, c, "/config", notice), &view))
        }
        Err(e) => page_error(e),
    }
}

pub async fn config(State(s): St, Extension(c): Extension<Caller>) -> Response {
    config_page(&s, &c, StatusCode::OK, None).await
}

pub async fn reload(State(s): St, Extension(c): Extension<Caller>) -> Response {
    let (status, notice) = outcome(crate::api::reload(&s, &c).await, |()| "Reload requested.".into());
    if c.principal.can(Permission::ConfigRead) {
        config_page(&s, &c, status, notice).await
    } else {
        page(status, console::dashboard::dashboard(&frame(&s, &c, "/", notice), &Default::default()))
    }
}

// ---- admins and tokens ----

async fn admins_page(s: &AppState, c: &Caller, status: StatusCode, notice: Option<Notice>) -> Response {
    use console::admins::{AdminRow, AdminsView, RoleRow};
    let list = match s.admin.admin_list(c.actor()).await {
        Ok(l) => l,
        Err(e) => return page_error(e.into()),
    };
    let admins = list
        .into_iter()
        .map(|a| AdminRow {
            name: a.name,
            roles: a.roles,
            enabled: a.enabled,
            factors: a.factors.len(),
            created: console::format_time(a.created_at),
            last_login: console::format_time_opt(a.last_login_at),
        })
        .collect();
    let roles = s
        .roles
        .all()
        .iter()
        .map(|r| RoleRow {
            name: r.name.clone(),
            permissions: r.permissions.names().into_iter().map(Into::into).collect(),
            domains: r.domains.clone(),
            builtin: r.builtin,
        })
        .collect();
    let v = AdminsView { admins, roles, can_write: c.principal.can(Permission::AdminsWrite) };
    page(status, console::admins::admins(&frame(s, c, "/admins", notice), &v))
}

pub async fn admins(State(s): St, Extension(c): Extension<Caller>) -> Response {
    admins_page(&s, &c, StatusCode::OK, None).await
}

/// A form body with repeated fields (`role=a&role=b`) as pairs.
fn pairs(body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_bytes(body).map_err(|_| ApiError::bad_input("malformed form"))
}

fn field<'a>(pairs: &'a [(String, String)], name: &str) -> &'a str {
    pairs.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str())
}

fn fields(pairs: &[(String, String)], name: &str) -> Vec<String> {
    pairs.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
}

pub async fn admins_add(State(s): St, Extension(c): Extension<Caller>, body: axum::body::Bytes) -> Response {
    let r: Result<_, ApiError> = async {
        let p = pairs(&body)?;
        let password = Zeroizing::new(field(&p, "password").to_owned());
        let info = s.admin.admin_add(c.actor(), field(&p, "name").trim(), &password, &fields(&p, "role")).await?;
        Ok(info.name)
    }
    .await;
    let (status, notice) =
        outcome(r, |n| format!("Administrator {n} added; they enrol a second factor at first login."));
    admins_page(&s, &c, status, notice).await
}

pub async fn admin_roles(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let r: Result<_, ApiError> = async {
        let p = pairs(&body)?;
        s.admin.admin_set_roles(c.actor(), &name, &fields(&p, "role")).await?;
        tracing::warn!(alert = true, event = "admin_roles_changed", actor = %c.actor(), admin = %name, "administrator roles changed");
        Ok(())
    }
    .await;
    let (status, notice) = outcome(r, |()| format!("Roles of {name} changed."));
    admins_page(&s, &c, status, notice).await
}

#[derive(Deserialize)]
pub struct EnabledForm {
    enabled: bool,
}

pub async fn admin_enabled(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Form(f): Form<EnabledForm>,
) -> Response {
    let r = s.admin.admin_set_enabled(c.actor(), &name, f.enabled).await.map_err(ApiError::from);
    let (status, notice) = outcome(r, |()| format!("{name} {}.", if f.enabled { "enabled" } else { "disabled" }));
    admins_page(&s, &c, status, notice).await
}

pub async fn admin_reset_mfa(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Response {
    let r = s.admin.admin_reset_mfa(c.actor(), &name).await.map_err(ApiError::from);
    let (status, notice) =
        outcome(r, |()| format!("Second factors of {name} removed; they enrol again at next login."));
    admins_page(&s, &c, status, notice).await
}

pub async fn admin_remove(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Response {
    let r = s.admin.admin_remove(c.actor(), &name).await.map_err(ApiError::from);
    let (status, notice) = outcome(r, |()| format!("Administrator {name} removed."));
    admins_page(&s, &c, status, notice).await
}

async fn tokens_page(
    s: &AppState,
    c: &Caller,
    status: StatusCode,
    notice: Option<Notice>,
    new_token: Option<String>,
) -> Response {
    use console::admins::{TokenRow, TokensView};
    let list = match s.admin.token_list(c.actor()).await {
        Ok(l) => l,
        Err(e) => return page_error(e.into()),
    };
    let tokens = list
        .into_iter()
        .map(|t| TokenRow {
            id: t.id,
            name: t.name,
            creator: t.creator,
            permissions: t.permissions,
            networks: t.networks,
            created: console::format_time(t.created_at),
            expires: console::format_time(t.expires_at),
            last_used: console::format_time_opt(t.last_used_at),
            last_used_from: t.last_used_from.unwrap_or_default(),
            revoked: t.revoked,
        })
        .collect();
    let grantable = c.principal.permissions.names().into_iter().map(Into::into).collect();
    let max_days = s.cfg.admin.as_ref().map_or(365, |a| a.max_token_days);
    let v = TokensView { tokens, grantable, max_days, new_token, can_write: c.principal.can(Permission::TokensWrite) };
    page(status, console::admins::tokens(&frame(s, c, "/tokens", notice), &v))
}

pub async fn tokens(State(s): St, Extension(c): Extension<Caller>) -> Response {
    tokens_page(&s, &c, StatusCode::OK, None, None).await
}

pub async fn tokens_create(State(s): St, Extension(c): Extension<Caller>, body: axum::body::Bytes) -> Response {
    let r: Result<_, ApiError> = async {
        let p = pairs(&body)?;
        let permissions = PermissionSet::parse_list(&fields(&p, "permission")).map_err(ApiError::bad_input)?;
        let days: u64 = field(&p, "days").trim().parse().map_err(|_| ApiError::bad_input("days: a whole number"))?;
        let networks = field(&p, "networks")
            .split([',', ' '])
            .filter(|n| !n.is_empty())
            .map(pop3connex_core::admin::security::parse_network)
            .collect::<Result<Vec<_>, _>>()?;
        let expires_at = (unix_now() as u64).saturating_add(days.saturating_mul(86_400));
        Ok(s.admin.token_create(&c.principal, field(&p, "name").trim(), &permissions, expires_at, &networks).await?)
    }
    .await;
    match r {
        Ok((info, token)) => {
            let notice = Some(Notice::info(format!("Token {} created; copy it now, it is not shown again.", info.id)));
            tokens_page(&s, &c, StatusCode::CREATED, notice, Some(token.to_string())).await
        }
        Err(e) => tokens_page(&s, &c, e.status, Some(Notice::error(e.message)), None).await,
    }
}

pub async fn token_revoke(State(s): St, Extension(c): Extension<Caller>, Path(id): Path<String>) -> Response {
    let r = s.admin.token_revoke_by(&c.principal, &id).await.map_err(ApiError::from);
    let (status, notice) = outcome(r, |()| format!("Token {id} revoked."));
    tokens_page(&s, &c, status, notice, None).await
}

#[cfg(test)]
mod tests {
    use super::{date_ms, safe_next};

    #[test]
    fn next_paths_stay_on_this_origin() {
        for bad in ["//evil.example/x", "/\\evil.example", "https://evil.example", "", "javascript:alert(1)", "/a\r\nb"]
        {
            assert_eq!(safe_next(bad), "/", "{bad:?}");
        }
        assert_eq!(safe_next("/users?x=1"), "/users?x=1");
    }

    #[test]
    fn dates_to_unix_milliseconds() {
        assert_eq!(date_ms("1970-01-01"), Some(0));
        assert_eq!(date_ms("2026-12-05"), Some(1_796_428_800_000));
        assert_eq!(date_ms("2026-13-01"), None);
        assert_eq!(date_ms("x"), None);
    }
}
