//! Login, the second factor, enrolment, step-up and logout.
//!
//! The password step answers the same way, after the same delay, whether
//! the name is unknown, the password wrong or the admin disabled (the
//! directory does the same hashing work for all three): no oracle. Every
//! attempt, success or failure, is an audit record; if it cannot be
//! written the request is refused. Failed passwords and codes count per
//! address and per name, grow the delay, and ban the address through the
//! abuse guard at `login_failures_before_ban`; admins are never locked out.

use std::sync::Arc;

use axum::extract::{Form, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Json};
use pop3connex_core::admin::admins::{AdminAuthError, FactorKind};
use pop3connex_core::admin::Actor;
use pop3connex_core::types::unix_now;
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::api::Body;
use crate::auth::{Caller, Client, PartialLogin};
use crate::console::auth as view;
use crate::console::{Frame, Notice};
use crate::error::ApiError;
use crate::pages::{frame, html, safe_next};
use crate::session::{
    clear_cookie, cookie_id, PendingTotp, Session, SessionId, Stage, WebAuthnPurpose, MAX_MFA_FAILURES,
};
use crate::state::AppState;

type St = State<Arc<AppState>>;

/// Longest name and password looked at (longer ones fail like wrong ones).
const MAX_NAME: usize = 256;
const MAX_PASSWORD: usize = 1024;

fn now() -> u64 {
    unix_now() as u64
}

fn with_cookie(id: &SessionId, resp: impl IntoResponse) -> Response {
    let mut resp = resp.into_response();
    if let Ok(v) = id.set_cookie().parse() {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

fn error_page(e: ApiError) -> Response {
    let page = view::login(&view::LoginView { name: String::new(), notice: Some(Notice::error(e.message.clone())) });
    (e.status, html(page)).into_response()
}

pub async fn login_page() -> Response {
    html(view::login(&view::LoginView::default())).into_response()
}

#[derive(Deserialize)]
pub struct LoginForm {
    name: String,
    password: Zeroizing<String>,
}

pub async fn login_submit(
    State(s): St,
    Extension(Client(ip)): Extension<Client>,
    Form(f): Form<LoginForm>,
) -> Response {
    let name: String = f.name.trim().chars().take(MAX_NAME).collect();
    let actor = Actor::Admin { name: name.clone(), address: ip };
    let verified = if f.name.len() > MAX_NAME || f.password.len() > MAX_PASSWORD {
        Err(AdminAuthError::Invalid)
    } else {
        s.admin.admin_verify_password(&name, &f.password).await
    };
    let info = match verified {
        Ok(info) => info,
        Err(AdminAuthError::Storage(cause)) => {
            tracing::error!(error = %cause, "admin login: directory failed");
            return error_page(ApiError::internal());
        }
        Err(e) => {
            let outcome = if matches!(e, AdminAuthError::Refused) { "refused" } else { "invalid" };
            let delay = s.login_failed(ip, &name);
            if let Err(e) = s.audit(&actor, "admin.login", &name, outcome, ip).await {
                return error_page(e);
            }
            tokio::time::sleep(delay).await;
            let notice = Some(Notice::error("Invalid name or password."));
            return (StatusCode::UNAUTHORIZED, html(view::login(&view::LoginView { name, notice }))).into_response();
        }
    };
    let no_factor = info.factors.is_empty();
    let outcome = if no_factor { "password_ok_enrol" } else { "password_ok" };
    if let Err(e) = s.audit(&actor, "admin.login", &info.name, outcome, ip).await {
        return error_page(e);
    }
    let password_stamp = match s.admin.admin_session_binding(info.id).await {
        Ok((stamp, _)) => stamp,
        Err(e) => {
            tracing::error!(error = ?e, "admin login: session binding failed");
            return error_page(ApiError::internal());
        }
    };
    let t = now();
    let session = Session {
        admin_id: info.id,
        admin_name: info.name.clone(),
        roles: info.roles.clone(),
        address: ip,
        stage: if no_factor { Stage::EnrolOnly } else { Stage::AwaitingMfa { failures: 0 } },
        created_at: t,
        last_seen: t,
        webauthn_state: None,
        pending_totp: None,
        has_totp: info.factors.iter().any(|f| matches!(f.kind, FactorKind::Totp)),
        has_passkey: info.factors.iter().any(|f| matches!(f.kind, FactorKind::WebAuthn)),
        recovery_codes: None,
        password_stamp,
    };
    // A new session, so a new id, at every login: a planted cookie is never upgraded.
    let Some(id) = s.sessions.create(session, t) else {
        return error_page(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "too many sessions; try later"));
    };
    if no_factor {
        tracing::warn!(alert = true, event = "admin_enrolment_login", admin = %info.name, peer = %ip, "admin without a second factor logged in to enrol one");
    }
    with_cookie(&id, see_other(if no_factor { "/enrol" } else { "/login/mfa" }))
}

fn mfa_view(p: &PartialLogin, notice: Option<Notice>) -> Html<String> {
    html(view::mfa(&view::MfaView {
        admin: p.session.admin_name.clone(),
        totp: p.session.has_totp,
        passkey: p.session.has_passkey,
        notice,
    }))
}

pub async fn mfa_page(Extension(p): Extension<PartialLogin>) -> Response {
    mfa_view(&p, None).into_response()
}

#[derive(Deserialize)]
pub struct CodeForm {
    #[serde(default)]
    method: String,
    code: Zeroizing<String>,
    #[serde(default)]
    next: String,
}

/// Checks a TOTP code or (method `recovery`) a recovery code.
async fn check_code(
    s: &AppState,
    admin_id: i64,
    method: &str,
    code: &str,
    address: std::net::IpAddr,
) -> Result<(), AdminAuthError> {
    let code = code.trim();
    if code.len() > 64 {
        return Err(AdminAuthError::Invalid);
    }
    if method == "recovery" {
        s.admin.recovery_code_use(admin_id, code, address).await
    } else {
        s.admin.totp_verify(admin_id, code, now()).await
    }
}

/// The session `p` passed its second factor: a fresh id, logged in
/// read-only.
async fn mfa_passed(s: &AppState, p: &PartialLogin, how: &str) -> Result<SessionId, ApiError> {
    let actor = Actor::Admin { name: p.session.admin_name.clone(), address: p.address };
    s.audit(&actor, "admin.login.mfa", &p.session.admin_name, how, p.address).await?;
    s.admin.record_login(p.session.admin_id).await?;
    let id = s
        .sessions
        .rotate(&p.id, |x| {
            x.stage = Stage::Authenticated { stepped_up_until: 0 };
            x.webauthn_state = None;
        })
        .ok_or_else(ApiError::unauthorized)?;
    tracing::warn!(alert = true, event = "admin_login", admin = %p.session.admin_name, peer = %p.address, "admin login");
    Ok(id)
}

/// A failed second factor: counted, audited, delayed; the half-logged-in
/// session ends after [`MAX_MFA_FAILURES`].
async fn mfa_failed(s: &AppState, p: &PartialLogin, op: &str) -> Result<bool, ApiError> {
    let actor = Actor::Admin { name: p.session.admin_name.clone(), address: p.address };
    let delay = s.login_failed(p.address, &p.session.admin_name);
    s.audit(&actor, op, &p.session.admin_name, "failure", p.address).await?;
    let mut failures = 0;
    s.sessions.update(&p.id, |x| {
        if let Stage::AwaitingMfa { failures: f } = &mut x.stage {
            *f += 1;
            failures = *f;
        }
    });
    let dead = failures >= MAX_MFA_FAILURES;
    if dead {
        s.sessions.remove(&p.id);
    }
    tokio::time::sleep(delay).await;
    Ok(dead)
}

pub async fn mfa_submit(State(s): St, Extension(p): Extension<PartialLogin>, Form(f): Form<CodeForm>) -> Response {
    match check_code(&s, p.session.admin_id, &f.method, &f.code, p.address).await {
        Ok(()) => match mfa_passed(&s, &p, if f.method == "recovery" { "recovery_code" } else { "totp" }).await {
            Ok(id) => with_cookie(&id, see_other("/")),
            Err(e) => error_page(e),
        },
        Err(AdminAuthError::Storage(cause)) => {
            tracing::error!(error = %cause, "second factor check failed");
            error_page(ApiError::internal())
        }
        Err(_) => match mfa_failed(&s, &p, "admin.login.mfa").await {
            Ok(true) => see_other("/login"),
            Ok(false) => (StatusCode::UNAUTHORIZED, mfa_view(&p, Some(Notice::error("Invalid code.")))).into_response(),
            Err(e) => error_page(e),
        },
    }
}

fn auth_err(e: AdminAuthError) -> ApiError {
    match e {
        AdminAuthError::Storage(cause) => {
            tracing::error!(error = %cause, "WebAuthn check failed");
            ApiError::internal()
        }
        _ => ApiError::new(StatusCode::UNAUTHORIZED, "invalid", "the passkey was not accepted"),
    }
}

fn take_state(s: &AppState, id: &SessionId, purpose: WebAuthnPurpose) -> Option<String> {
    let mut state = None;
    s.sessions.update(id, |x| {
        if let Some((p, st)) = x.webauthn_state.take() {
            if p == purpose {
                state = Some(st);
            }
        }
    });
    state
}

pub async fn webauthn_login_begin(
    State(s): St,
    Extension(p): Extension<PartialLogin>,
) -> Result<Json<Value>, ApiError> {
    let (options, state) = s.admin.webauthn_auth_begin(p.session.admin_id).await.map_err(auth_err)?;
    s.sessions.update(&p.id, |x| x.webauthn_state = Some((WebAuthnPurpose::Login, state)));
    Ok(Json(options))
}

pub async fn webauthn_login_finish(
    State(s): St,
    Extension(p): Extension<PartialLogin>,
    Body(response): Body<Value>,
) -> Result<Response, ApiError> {
    let Some(state) = take_state(&s, &p.id, WebAuthnPurpose::Login) else {
        return Err(ApiError::bad_input("no passkey ceremony in progress"));
    };
    match s.admin.webauthn_auth_finish(p.session.admin_id, &state, &response).await {
        Ok(()) => {
            let id = mfa_passed(&s, &p, "passkey").await?;
            Ok(with_cookie(&id, Json(json!({ "next": "/" }))))
        }
        Err(AdminAuthError::Storage(c)) => Err(auth_err(AdminAuthError::Storage(c))),
        Err(e) => {
            mfa_failed(&s, &p, "admin.login.mfa").await?;
            Err(auth_err(e))
        }
    }
}

// ---- enrolment ----

fn enrol_frame(s: &AppState, p: &PartialLogin, caller: Option<&Caller>, notice: Option<Notice>) -> Frame {
    match caller {
        Some(c) => frame(s, c, "/enrol", notice),
        None => Frame {
            admin: p.session.admin_name.clone(),
            roles: p.session.roles.clone(),
            elevated_until: None,
            nav: Vec::new(),
            path: "/enrol".into(),
            notice,
        },
    }
}

async fn enrol_view(s: &AppState, p: &PartialLogin, caller: Option<&Caller>, notice: Option<Notice>) -> Response {
    let pending = match &p.session.pending_totp {
        Some(t) => t.clone(),
        None => match s.admin.totp_begin(p.session.admin_id, "authenticator app").await {
            Ok(t) => {
                let pending = PendingTotp {
                    pending_id: t.pending_id.clone(),
                    secret_base32: Zeroizing::new(t.secret_base32.to_string()),
                    otpauth_uri: Zeroizing::new(t.otpauth_uri.to_string()),
                };
                s.sessions.update(&p.id, |x| x.pending_totp = Some(pending.clone()));
                pending
            }
            Err(e) => return error_page(e.into()),
        },
    };
    let first = matches!(p.session.stage, Stage::EnrolOnly);
    let v = view::EnrolView {
        totp: view::TotpEnrolView {
            pending_id: pending.pending_id.clone(),
            secret_base32: pending.secret_base32.to_string(),
            otpauth_uri: pending.otpauth_uri.to_string(),
        },
        first_factor: first,
        next: if first { "/recovery-codes".into() } else { "/account".into() },
    };
    let status = if notice.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    (status, html(view::enrol(&enrol_frame(s, p, caller, notice), &v))).into_response()
}

pub async fn enrol_page(
    State(s): St,
    Extension(p): Extension<PartialLogin>,
    caller: Option<Extension<Caller>>,
) -> Response {
    enrol_view(&s, &p, caller.as_ref().map(|c| &c.0), None).await
}

#[derive(Deserialize)]
pub struct TotpEnrolForm {
    pending_id: String,
    code: Zeroizing<String>,
}

/// A factor was enrolled: the session is logged in under a fresh id, and
/// a first factor's recovery codes wait in it to be shown once.
fn enrolled(s: &AppState, p: &PartialLogin, totp: bool, codes: Option<Vec<String>>) -> Option<SessionId> {
    s.sessions.rotate(&p.id, |x| {
        if matches!(x.stage, Stage::EnrolOnly) {
            x.stage = Stage::Authenticated { stepped_up_until: 0 };
        }
        x.pending_totp = None;
        x.webauthn_state = None;
        if totp {
            x.has_totp = true;
        } else {
            x.has_passkey = true;
        }
        x.recovery_codes = codes.map(|c| c.into_iter().map(Zeroizing::new).collect());
    })
}

pub async fn enrol_totp(
    State(s): St,
    Extension(p): Extension<PartialLogin>,
    caller: Option<Extension<Caller>>,
    Form(f): Form<TotpEnrolForm>,
) -> Response {
    let pending_matches = p.session.pending_totp.as_ref().is_some_and(|t| t.pending_id == f.pending_id);
    if !pending_matches {
        return enrol_view(
            &s,
            &p,
            caller.as_ref().map(|c| &c.0),
            Some(Notice::error("Reload the page and try again.")),
        )
        .await;
    }
    let actor = Actor::Admin { name: p.session.admin_name.clone(), address: p.address };
    match s.admin.totp_finish(&actor, p.session.admin_id, &f.pending_id, f.code.trim(), now()).await {
        Ok(codes) => {
            let first = codes.is_some();
            match enrolled(&s, &p, true, codes) {
                Some(id) => with_cookie(&id, see_other(if first { "/recovery-codes" } else { "/account" })),
                None => see_other("/login"),
            }
        }
        Err(e) => {
            let e = ApiError::from(e);
            if e.status.is_server_error() {
                return error_page(e);
            }
            s.login_failed(p.address, &p.session.admin_name);
            enrol_view(&s, &p, caller.as_ref().map(|c| &c.0), Some(Notice::error("That code was not accepted."))).await
        }
    }
}

#[derive(Deserialize)]
pub struct LabelBody {
    #[serde(default)]
    label: String,
}

pub async fn enrol_webauthn_begin(
    State(s): St,
    Extension(p): Extension<PartialLogin>,
    Body(b): Body<LabelBody>,
) -> Result<Json<Value>, ApiError> {
    let label = if b.label.trim().is_empty() { "passkey" } else { b.label.trim() };
    let (options, state) = s.admin.webauthn_register_begin(p.session.admin_id, label).await?;
    s.sessions.update(&p.id, |x| x.webauthn_state = Some((WebAuthnPurpose::Register, state)));
    Ok(Json(options))
}

pub async fn enrol_webauthn_finish(
    State(s): St,
    Extension(p): Extension<PartialLogin>,
    Body(response): Body<Value>,
) -> Result<Response, ApiError> {
    let Some(state) = take_state(&s, &p.id, WebAuthnPurpose::Register) else {
        return Err(ApiError::bad_input("no passkey ceremony in progress"));
    };
    let actor = Actor::Admin { name: p.session.admin_name.clone(), address: p.address };
    let codes = s.admin.webauthn_register_finish(&actor, p.session.admin_id, &state, &response).await?;
    let next = if codes.is_some() { "/recovery-codes" } else { "/account" };
    let id = enrolled(&s, &p, false, codes).ok_or_else(ApiError::unauthorized)?;
    Ok(with_cookie(&id, Json(json!({ "next": next }))))
}

/// Shows a first enrolment's recovery codes once, then forgets them.
pub async fn recovery_codes_page(State(s): St, Extension(c): Extension<Caller>) -> Response {
    let Some((id, _)) = &c.session else { return see_other("/") };
    let mut codes = None;
    s.sessions.update(id, |x| codes = x.recovery_codes.take());
    let Some(codes) = codes else { return see_other("/account") };
    let v = view::RecoveryCodesView { codes: codes.iter().map(|c| c.to_string()).collect(), next: "/".into() };
    html(view::recovery_codes(&frame(&s, &c, "/recovery-codes", None), &v)).into_response()
}

// ---- step-up ----

#[derive(Deserialize)]
pub struct NextQuery {
    #[serde(default)]
    next: String,
}

fn step_up_view(s: &AppState, c: &Caller, next: &str, notice: Option<Notice>) -> Html<String> {
    let (totp, passkey) = c.session.as_ref().map_or((false, false), |(_, x)| (x.has_totp, x.has_passkey));
    let v = view::StepUpView { next: safe_next(next).to_owned(), totp, passkey, secs: s.settings.step_up_secs };
    html(view::step_up(&frame(s, c, "/step-up", notice), &v))
}

pub async fn step_up_page(State(s): St, Extension(c): Extension<Caller>, Query(q): Query<NextQuery>) -> Response {
    step_up_view(&s, &c, &q.next, None).into_response()
}

/// A fresh second-factor check passed: elevated under a fresh id.
async fn stepped_up(s: &AppState, c: &Caller, how: &str) -> Result<SessionId, ApiError> {
    let (id, session) = c.session.as_ref().ok_or_else(ApiError::unauthorized)?;
    s.audit(c.actor(), "admin.step_up", &session.admin_name, how, c.address).await?;
    let until = now() + s.settings.step_up_secs;
    s.sessions
        .rotate(id, |x| {
            x.stage = Stage::Authenticated { stepped_up_until: until };
            x.webauthn_state = None;
        })
        .ok_or_else(ApiError::unauthorized)
}

async fn step_up_failed(s: &AppState, c: &Caller) -> Result<(), ApiError> {
    let name = c.session.as_ref().map_or("?", |(_, x)| x.admin_name.as_str());
    let delay = s.login_failed(c.address, name);
    s.audit(c.actor(), "admin.step_up", name, "failure", c.address).await?;
    tokio::time::sleep(delay).await;
    Ok(())
}

pub async fn step_up_submit(State(s): St, Extension(c): Extension<Caller>, Form(f): Form<CodeForm>) -> Response {
    let Some(admin_id) = c.principal.admin_id else { return see_other("/") };
    match check_code(&s, admin_id, &f.method, &f.code, c.address).await {
        Ok(()) => match stepped_up(&s, &c, if f.method == "recovery" { "recovery_code" } else { "totp" }).await {
            Ok(id) => with_cookie(&id, see_other(safe_next(&f.next))),
            Err(e) => error_page(e),
        },
        Err(AdminAuthError::Storage(cause)) => {
            tracing::error!(error = %cause, "step-up check failed");
            error_page(ApiError::internal())
        }
        Err(_) => match step_up_failed(&s, &c).await {
            Ok(()) => (StatusCode::UNAUTHORIZED, step_up_view(&s, &c, &f.next, Some(Notice::error("Invalid code."))))
                .into_response(),
            Err(e) => error_page(e),
        },
    }
}

pub async fn step_up_webauthn_begin(State(s): St, Extension(c): Extension<Caller>) -> Result<Json<Value>, ApiError> {
    let (Some(admin_id), Some((id, _))) = (c.principal.admin_id, &c.session) else {
        return Err(ApiError::unauthorized());
    };
    let (options, state) = s.admin.webauthn_auth_begin(admin_id).await.map_err(auth_err)?;
    s.sessions.update(id, |x| x.webauthn_state = Some((WebAuthnPurpose::StepUp, state)));
    Ok(Json(options))
}

pub async fn step_up_webauthn_finish(
    State(s): St,
    Extension(c): Extension<Caller>,
    Body(response): Body<Value>,
) -> Result<Response, ApiError> {
    let (Some(admin_id), Some((id, _))) = (c.principal.admin_id, &c.session) else {
        return Err(ApiError::unauthorized());
    };
    let Some(state) = take_state(&s, id, WebAuthnPurpose::StepUp) else {
        return Err(ApiError::bad_input("no passkey ceremony in progress"));
    };
    match s.admin.webauthn_auth_finish(admin_id, &state, &response).await {
        Ok(()) => {
            let id = stepped_up(&s, &c, "passkey").await?;
            Ok(with_cookie(&id, Json(json!({}))))
        }
        Err(AdminAuthError::Storage(cause)) => Err(auth_err(AdminAuthError::Storage(cause))),
        Err(e) => {
            step_up_failed(&s, &c).await?;
            Err(auth_err(e))
        }
    }
}

// ---- logout ----

pub async fn logout(
    State(s): St,
    Extension(Client(ip)): Extension<Client>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(id) = cookie_id(&headers) {
        if let Some(session) = s.sessions.remove(&id) {
            let actor = Actor::Admin { name: session.admin_name.clone(), address: ip };
            if let Err(e) = s.audit(&actor, "admin.logout", &session.admin_name, "ok", ip).await {
                return error_page(e);
            }
        }
    }
    let mut resp = see_other("/login");
    if let Ok(v) = clear_cookie().parse() {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}
