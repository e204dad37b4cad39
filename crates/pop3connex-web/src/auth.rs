//! Who is calling, and whether the route lets them: the one enforcement
//! point of the route table's declared access.
//!
//! A request authenticates with `Authorization: Bearer p3x_...` (service
//! tokens: API routes only, never console pages) or with the session
//! cookie. The route's [`Access`] decides what is enough; a missing
//! permission is 403 and is audited (`authz.denied`), a permission that
//! needs step-up without a fresh second-factor check is 403
//! `step_up_required` (pages: a redirect to `/step-up`).

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use pop3connex_core::admin::admins::{AdminAuthError, Principal};
use pop3connex_core::admin::Actor;
use pop3connex_core::rbac::Permission;
use pop3connex_core::types::unix_now;

use crate::error::ApiError;
use crate::listener::PeerAddr;
use crate::session::{cookie_id, Session, SessionId, Stage};
use crate::state::{client_address, AppState};

/// What a route requires of its caller (declared in `routes`, enforced here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone who reached the listener: login, static files, the API document.
    Public,
    /// A session whose password was right and whose second factor is awaited.
    Mfa,
    /// A session that may enrol a factor: without one yet, or logged in.
    Enrol,
    /// Any logged-in administrator (console sessions only).
    Authenticated,
    /// A session or a service token holding this permission.
    Perm(Permission),
}

/// Console pages (HTML, sessions only) or the API (JSON, tokens too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Page,
    Api,
}

#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub surface: Surface,
}

/// The client address of a request (after `trusted_proxies`).
#[derive(Debug, Clone, Copy)]
pub struct Client(pub IpAddr);

/// The authenticated caller of a request.
#[derive(Clone)]
pub struct Caller {
    pub principal: Principal,
    /// The console session, when not a token.
    pub session: Option<(SessionId, Session)>,
    pub address: IpAddr,
}

impl Caller {
    pub fn actor(&self) -> &Actor {
        &self.principal.actor
    }
}

/// A console session before full authentication (MFA and enrol pages).
#[derive(Clone)]
pub struct PartialLogin {
    pub id: SessionId,
    pub session: Session,
    pub address: IpAddr,
}

/// The id part of a presented token (`p3x_<id>_<secret>`), for the audit
/// record; never the secret.
fn token_id(presented: &str) -> &str {
    presented
        .strip_prefix("p3x_")
        .and_then(|rest| rest.split_once('_'))
        .map(|(id, _)| id)
        .filter(|id| id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .unwrap_or("?")
}

fn deny(spec: &RouteSpec, err: ApiError, login_page: &'static str) -> Response {
    match spec.surface {
        Surface::Api => err.into_response(),
        Surface::Page if err.status == StatusCode::UNAUTHORIZED => Redirect::to(login_page).into_response(),
        Surface::Page => err.into_response(),
    }
}

/// The middleware of one route: resolves the client address, then
/// authenticates and authorises as the route declares.
pub async fn enforce(state: Arc<AppState>, spec: RouteSpec, mut req: Request, next: Next) -> Response {
    let Some(peer) = req.extensions().get::<PeerAddr>().map(|p| p.0.ip()) else {
        return ApiError::internal().into_response();
    };
    let address = client_address(peer, req.headers(), &state.settings.trusted_proxies);
    if address != peer && (!state.settings.allow_networks.iter().any(|n| n.contains(&address)) || state.banned(address))
    {
        return ApiError::forbidden().into_response();
    }
    req.extensions_mut().insert(Client(address));
    if spec.access == Access::Public {
        return next.run(req).await;
    }
    let now = unix_now() as u64;

    // Service tokens: API routes that declare a permission, nothing else.
    if let Some(auth) = req.headers().get(header::AUTHORIZATION) {
        // The scheme name is case-insensitive (RFC 9110, section 11.1).
        let presented = auth
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        let Some(presented) = presented else {
            return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "only Authorization: Bearer is accepted")
                .into_response();
        };
        if spec.surface != Surface::Api {
            return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "bearer tokens are for the API only")
                .into_response();
        }
        let Access::Perm(_) = spec.access else {
            return ApiError::forbidden().into_response();
        };
        let id = token_id(presented).to_owned();
        let actor = Actor::ServiceToken { id: id.clone() };
        let principal = match state.admin.token_authenticate(presented, address).await {
            Ok(p) => p,
            Err(e) => {
                if let AdminAuthError::Storage(cause) = &e {
                    tracing::error!(error = %cause, "token check failed");
                    return ApiError::internal().into_response();
                }
                let delay = state.login_failed(address, &format!("token:{id}"));
                if let Err(e) = state.audit(&actor, "token.use", &id, "invalid", address).await {
                    return e.into_response();
                }
                tokio::time::sleep(delay).await;
                return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid token").into_response();
            }
        };
        if let Err(e) = state.audit(&principal.actor, "token.use", &id, "ok", address).await {
            return e.into_response();
        }
        let caller = Caller { principal, session: None, address };
        return authorise(&state, &spec, caller, req, next, now).await;
    }

    let Some(id) = cookie_id(req.headers()) else {
        return deny(&spec, ApiError::unauthorized(), "/login");
    };
    let session = match state.sessions.get(&id, address, now) {
        Ok(s) => s,
        Err(why) => {
            tracing::info!(peer = %address, reason = ?why, "admin session refused");
            return deny(&spec, ApiError::unauthorized(), "/login");
        }
    };
    // Bound to the password it was opened with, and (once past the
    // password) to the admin still having a second factor: a password change
    // or an MFA reset, from the CLI or another session, ends it at once.
    match state.admin.admin_session_binding(session.admin_id).await {
        Ok((stamp, has_factor)) => {
            let factor_gone = !has_factor && !matches!(session.stage, Stage::EnrolOnly);
            if stamp != session.password_stamp || factor_gone {
                state.sessions.remove(&id);
                tracing::info!(peer = %address, admin = %session.admin_name,
                    "admin session ended: password changed or second factors reset since it began");
                return deny(&spec, ApiError::unauthorized(), "/login");
            }
        }
        Err(AdminAuthError::Storage(cause)) => {
            tracing::error!(error = %cause, "admin lookup failed");
            return ApiError::internal().into_response();
        }
        Err(_) => {
            state.sessions.remove_admin(session.admin_id);
            return deny(&spec, ApiError::unauthorized(), "/login");
        }
    }
    match (spec.access, &session.stage) {
        (Access::Mfa, Stage::AwaitingMfa { .. }) | (Access::Enrol, Stage::EnrolOnly) => {
            req.extensions_mut().insert(PartialLogin { id, session, address });
            return next.run(req).await;
        }
        (Access::Mfa, Stage::Authenticated { .. }) => return Redirect::to("/").into_response(),
        (Access::Mfa, Stage::EnrolOnly) => return Redirect::to("/enrol").into_response(),
        (_, Stage::AwaitingMfa { .. }) => return deny(&spec, ApiError::unauthorized(), "/login/mfa"),
        (_, Stage::EnrolOnly) => {
            return match spec.surface {
                Surface::Page => Redirect::to("/enrol").into_response(),
                Surface::Api => {
                    ApiError::new(StatusCode::FORBIDDEN, "enrolment_required", "enrol a second factor first")
                        .into_response()
                }
            };
        }
        (_, Stage::Authenticated { .. }) => {}
    }
    let principal = match state.admin.principal_for_admin(session.admin_id, address).await {
        Ok(p) => p,
        Err(AdminAuthError::Storage(cause)) => {
            tracing::error!(error = %cause, "admin lookup failed");
            return ApiError::internal().into_response();
        }
        Err(_) => {
            // Disabled or removed since login: every session of it dies.
            state.sessions.remove_admin(session.admin_id);
            return deny(&spec, ApiError::unauthorized(), "/login");
        }
    };
    if spec.access == Access::Enrol {
        req.extensions_mut().insert(PartialLogin { id: id.clone(), session: session.clone(), address });
    }
    let caller = Caller { principal, session: Some((id, session)), address };
    authorise(&state, &spec, caller, req, next, now).await
}

async fn authorise(
    state: &AppState,
    spec: &RouteSpec,
    caller: Caller,
    mut req: Request,
    next: Next,
    now: u64,
) -> Response {
    // Adding a second factor to an account that has one is a privileged
    // change (it would let a stolen session keep a way in): it needs a
    // fresh second factor like the destructive actions.
    if spec.access == Access::Enrol {
        if let Some((_, session)) = &caller.session {
            if matches!(session.stage, Stage::Authenticated { .. }) && !session.stepped_up(now) {
                return match spec.surface {
                    Surface::Api => ApiError::step_up_required().into_response(),
                    Surface::Page => Redirect::to("/step-up?next=/enrol").into_response(),
                };
            }
        }
    }
    if let Access::Perm(p) = spec.access {
        if !caller.principal.can(p) {
            let target = format!("{} {} ({})", spec.method, spec.path, p.as_str());
            if let Err(e) = state.audit(caller.actor(), "authz.denied", &target, "denied", caller.address).await {
                return e.into_response();
            }
            return ApiError::forbidden().into_response();
        }
        if let Some(resp) = step_up_missing(spec, &caller, p, req.uri().path(), now) {
            return resp;
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// A refusal when `p` needs a fresh second factor that a session lacks.
/// Tokens were created with step-up and are the credential themselves.
fn step_up_missing(spec: &RouteSpec, caller: &Caller, p: Permission, path: &str, now: u64) -> Option<Response> {
    let (_, session) = caller.session.as_ref()?;
    if !p.needs_step_up() || session.stepped_up(now) {
        return None;
    }
    Some(match spec.surface {
        Surface::Api => ApiError::step_up_required().into_response(),
        Surface::Page => {
            // A form post returns to the page it was on, one level up.
            let back = if spec.method == axum::http::Method::GET {
                path
            } else {
                path.rsplit_once('/').map_or("/", |(p, _)| if p.is_empty() { "/" } else { p })
            };
            Redirect::to(&format!("/step-up?next={}", crate::console::query_value(back))).into_response()
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_id_never_includes_the_secret() {
        assert_eq!(super::token_id("p3x_ab12_sekret"), "ab12");
        assert_eq!(super::token_id("sekret"), "?");
        assert_eq!(super::token_id("p3x_a b_x"), "?");
    }
}
