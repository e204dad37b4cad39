//! The route table: every route of the console and the API with the access
//! it declares, and the router built from it.
//!
//! A route is public (login pages, static files), for a half-logged-in
//! session (the second-factor page), for enrolment, for any authenticated
//! admin (dashboard, own account), or needs one [`Permission`]. The
//! router wraps every route in [`crate::auth::enforce`] with its own
//! declaration, so a route cannot be added without one, and the tests
//! enumerate this table to prove each refuses a caller lacking it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::IntoResponse;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use pop3connex_core::rbac::Permission;
use tower_http::limit::RequestBodyLimitLayer;

use crate::error::ApiError;
use crate::state::AppState;
use crate::{api, headers, login, pages};

/// Request bodies: forms and JSON, never uploads (imports are a CLI job).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// A request (handler included) that takes longer is answered 503. Long
/// enough for a connector run of one account.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

pub use crate::auth::{Access, RouteSpec, Surface};

pub struct Route {
    pub spec: RouteSpec,
    handler: MethodRouter<Arc<AppState>>,
}

fn route<H, T>(method: Method, path: &'static str, access: Access, handler: H) -> Route
where
    H: Handler<T, Arc<AppState>>,
    T: 'static,
{
    let surface = if path.starts_with("/api/") { Surface::Api } else { Surface::Page };
    let filter = MethodFilter::try_from(method.clone()).unwrap_or(MethodFilter::GET);
    Route { spec: RouteSpec { method, path, access, surface }, handler: on(filter, handler) }
}

/// Every route, with its access.
pub fn table() -> Vec<Route> {
    use Access::{Authenticated, Enrol, Mfa, Perm, Public};
    use Method as M;
    use Permission as P;
    vec![
        // Login, second factor, enrolment, step-up, logout.
        route(M::GET, "/login", Public, login::login_page),
        route(M::POST, "/login", Public, login::login_submit),
        route(M::GET, "/login/mfa", Mfa, login::mfa_page),
        route(M::POST, "/login/mfa", Mfa, login::mfa_submit),
        route(M::POST, "/login/webauthn/begin", Mfa, login::webauthn_login_begin),
        route(M::POST, "/login/webauthn/finish", Mfa, login::webauthn_login_finish),
        route(M::GET, "/enrol", Enrol, login::enrol_page),
        route(M::POST, "/enrol/totp", Enrol, login::enrol_totp),
        route(M::POST, "/enrol/webauthn/begin", Enrol, login::enrol_webauthn_begin),
        route(M::POST, "/enrol/webauthn/finish", Enrol, login::enrol_webauthn_finish),
        route(M::GET, "/step-up", Authenticated, login::step_up_page),
        route(M::POST, "/step-up", Authenticated, login::step_up_submit),
        route(M::POST, "/step-up/webauthn/begin", Authenticated, login::step_up_webauthn_begin),
        route(M::POST, "/step-up/webauthn/finish", Authenticated, login::step_up_webauthn_finish),
        route(M::POST, "/logout", Public, login::logout),
        route(M::GET, "/recovery-codes", Authenticated, login::recovery_codes_page),
        route(M::GET, "/static/console.css", Public, pages::console_css),
        route(M::GET, "/static/webauthn.js", Public, pages::webauthn_js),
        // Console pages; forms post to the same paths.
        route(M::GET, "/", Authenticated, pages::dashboard),
        route(M::GET, "/account", Authenticated, pages::account),
        route(M::POST, "/account/factors/{id}/remove", Authenticated, pages::account_factor_remove),
        route(M::POST, "/account/recovery-codes", Authenticated, pages::account_recovery_codes),
        route(M::GET, "/users", Perm(P::UsersRead), pages::users),
        route(M::POST, "/users", Perm(P::UsersWrite), pages::users_add),
        route(M::GET, "/users/{name}", Perm(P::UsersRead), pages::user),
        route(M::POST, "/users/{name}/disabled", Perm(P::UsersWrite), pages::user_disabled),
        route(M::POST, "/users/{name}/unlock", Perm(P::UsersWrite), pages::user_unlock),
        route(M::POST, "/users/{name}/modern-auth", Perm(P::UsersWrite), pages::user_modern_auth),
        route(M::POST, "/users/{name}/password", Perm(P::UsersWrite), pages::user_passwd),
        route(M::POST, "/users/{name}/class", Perm(P::UsersWrite), pages::user_class),
        route(M::POST, "/users/{name}/app-passwords", Perm(P::UsersWrite), pages::user_app_password_add),
        route(M::POST, "/users/{name}/app-passwords/{id}/revoke", Perm(P::UsersWrite), pages::user_app_password_revoke),
        route(M::POST, "/users/{name}/delete", Perm(P::UsersDelete), pages::user_delete),
        route(M::GET, "/bans", Perm(P::BansRead), pages::bans),
        route(M::POST, "/bans", Perm(P::BansWrite), pages::bans_add),
        route(M::POST, "/bans/remove", Perm(P::BansWrite), pages::bans_remove),
        route(M::GET, "/connector", Perm(P::ConnectorRead), pages::connector),
        route(M::POST, "/connector/{name}/run", Perm(P::ConnectorWrite), pages::connector_run),
        route(M::GET, "/events", Perm(P::EventsRead), pages::events),
        route(M::GET, "/audit", Perm(P::AuditRead), pages::audit),
        route(M::GET, "/config", Perm(P::ConfigRead), pages::config),
        route(M::POST, "/reload", Perm(P::ConfigReload), pages::reload),
        route(M::GET, "/admins", Perm(P::AdminsRead), pages::admins),
        route(M::POST, "/admins", Perm(P::AdminsWrite), pages::admins_add),
        route(M::POST, "/admins/{name}/roles", Perm(P::AdminsWrite), pages::admin_roles),
        route(M::POST, "/admins/{name}/enabled", Perm(P::AdminsWrite), pages::admin_enabled),
        route(M::POST, "/admins/{name}/reset-mfa", Perm(P::AdminsWrite), pages::admin_reset_mfa),
        route(M::POST, "/admins/{name}/remove", Perm(P::AdminsWrite), pages::admin_remove),
        route(M::GET, "/tokens", Perm(P::AdminsRead), pages::tokens),
        route(M::POST, "/tokens", Perm(P::TokensWrite), pages::tokens_create),
        route(M::POST, "/tokens/{id}/revoke", Perm(P::TokensWrite), pages::token_revoke),
        // The API.
        route(M::GET, "/api/v1/openapi.json", Public, api::openapi),
        route(M::GET, "/api/v1/users", Perm(P::UsersRead), api::users_list),
        route(M::POST, "/api/v1/users", Perm(P::UsersWrite), api::users_add),
        route(M::GET, "/api/v1/users/{name}", Perm(P::UsersRead), api::user_show),
        route(M::DELETE, "/api/v1/users/{name}", Perm(P::UsersDelete), api::user_delete),
        route(M::PUT, "/api/v1/users/{name}/password", Perm(P::UsersWrite), api::user_passwd),
        route(M::POST, "/api/v1/users/{name}/disable", Perm(P::UsersWrite), api::user_disable),
        route(M::POST, "/api/v1/users/{name}/enable", Perm(P::UsersWrite), api::user_enable),
        route(M::POST, "/api/v1/users/{name}/unlock", Perm(P::UsersWrite), api::user_unlock),
        route(M::PUT, "/api/v1/users/{name}/class", Perm(P::UsersWrite), api::user_class),
        route(M::PUT, "/api/v1/users/{name}/modern-auth-only", Perm(P::UsersWrite), api::user_modern_auth),
        route(M::GET, "/api/v1/users/{name}/app-passwords", Perm(P::UsersRead), api::app_passwords_list),
        route(M::POST, "/api/v1/users/{name}/app-passwords", Perm(P::UsersWrite), api::app_passwords_add),
        route(M::DELETE, "/api/v1/users/{name}/app-passwords/{id}", Perm(P::UsersWrite), api::app_passwords_revoke),
        route(M::GET, "/api/v1/bans", Perm(P::BansRead), api::bans_list),
        route(M::POST, "/api/v1/bans", Perm(P::BansWrite), api::bans_add),
        route(M::DELETE, "/api/v1/bans", Perm(P::BansWrite), api::bans_remove),
        route(M::GET, "/api/v1/connector/accounts", Perm(P::ConnectorRead), api::connector_list),
        route(M::POST, "/api/v1/connector/accounts", Perm(P::ConnectorWrite), api::connector_add),
        route(M::GET, "/api/v1/connector/accounts/{name}", Perm(P::ConnectorRead), api::connector_show),
        route(M::DELETE, "/api/v1/connector/accounts/{name}", Perm(P::ConnectorWrite), api::connector_remove),
        route(M::POST, "/api/v1/connector/accounts/{name}/run", Perm(P::ConnectorWrite), api::connector_run),
        route(M::POST, "/api/v1/connector/run", Perm(P::ConnectorWrite), api::connector_run_all),
        route(M::GET, "/api/v1/admins", Perm(P::AdminsRead), api::admins_list),
        route(M::POST, "/api/v1/admins", Perm(P::AdminsWrite), api::admins_add),
        route(M::DELETE, "/api/v1/admins/{name}", Perm(P::AdminsWrite), api::admins_remove),
        route(M::POST, "/api/v1/admins/{name}/disable", Perm(P::AdminsWrite), api::admins_disable),
        route(M::POST, "/api/v1/admins/{name}/enable", Perm(P::AdminsWrite), api::admins_enable),
        route(M::PUT, "/api/v1/admins/{name}/roles", Perm(P::AdminsWrite), api::admins_roles),
        route(M::PUT, "/api/v1/admins/{name}/password", Perm(P::AdminsWrite), api::admins_passwd),
        route(M::POST, "/api/v1/admins/{name}/reset-mfa", Perm(P::AdminsWrite), api::admins_reset_mfa),
        route(M::GET, "/api/v1/roles", Perm(P::AdminsRead), api::roles_list),
        route(M::GET, "/api/v1/tokens", Perm(P::AdminsRead), api::tokens_list),
        route(M::POST, "/api/v1/tokens", Perm(P::TokensWrite), api::tokens_create),
        route(M::DELETE, "/api/v1/tokens/{id}", Perm(P::TokensWrite), api::tokens_revoke),
        route(M::GET, "/api/v1/audit", Perm(P::AuditRead), api::audit_read),
        route(M::GET, "/api/v1/events", Perm(P::EventsRead), api::events_search),
        route(M::GET, "/api/v1/config", Perm(P::ConfigRead), api::config_read),
        route(M::POST, "/api/v1/reload", Perm(P::ConfigReload), api::config_reload),
    ]
}

/// Every route's declaration (for the tests and the OpenAPI check).
pub fn specs() -> Vec<RouteSpec> {
    table().into_iter().map(|r| r.spec).collect()
}

async fn not_found(req: Request) -> axum::response::Response {
    if req.uri().path().starts_with("/api/") {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint").into_response()
    } else {
        (StatusCode::NOT_FOUND, pages::not_found_page()).into_response()
    }
}

/// The whole application: the table's routes, each behind its access
/// check, then (outermost first) security headers, the request timeout,
/// the CSRF check and the body limit.
pub fn router(state: Arc<AppState>) -> Router {
    let mut router: Router<Arc<AppState>> = Router::new();
    for Route { spec, handler } in table() {
        let (st, path) = (state.clone(), spec.path);
        let guarded = handler
            .layer(from_fn(move |req: Request, next: Next| crate::auth::enforce(st.clone(), spec.clone(), req, next)));
        router = router.route(path, guarded);
    }
    let origin: Arc<str> = Arc::from(state.settings.public_origin.as_str());
    router
        .fallback(not_found)
        .with_state(state)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(from_fn_with_state(origin, headers::csrf))
        .layer(from_fn(timeout))
        .layer(from_fn(headers::security_headers))
}

async fn timeout(req: Request, next: Next) -> axum::response::Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the request took too long").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{specs, Access, Surface};

    /// The OpenAPI document and the router list the same API operations,
    /// with the same permissions: neither can drift from the other.
    #[test]
    fn openapi_document_lists_exactly_the_api_routes_and_their_permissions() {
        let doc: serde_json::Value = serde_json::from_str(crate::api::OPENAPI).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for (method, op) in ops.as_object().expect("operations") {
                let perm = op["x-permission"].as_str().map(str::to_owned);
                documented.insert((method.to_uppercase(), path.clone(), perm));
            }
        }
        let routed: BTreeSet<_> = specs()
            .into_iter()
            .filter(|r| r.surface == Surface::Api)
            .map(|r| {
                let perm = match r.access {
                    Access::Perm(p) => Some(p.as_str().to_owned()),
                    _ => None,
                };
                (r.method.to_string(), r.path.to_owned(), perm)
            })
            .collect();
        let missing: Vec<_> = routed.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&routed).collect();
        assert!(missing.is_empty() && extra.is_empty(), "not documented: {missing:?}; not routed: {extra:?}");
    }

    #[test]
    fn routes_are_unique_and_the_api_is_never_open_to_half_logged_in_sessions() {
        let all = specs();
        let unique: BTreeSet<_> = all.iter().map(|r| (r.method.to_string(), r.path)).collect();
        assert_eq!(unique.len(), all.len(), "a (method, path) declared twice");
        for r in &all {
            if r.surface == Surface::Api {
                assert!(
                    matches!(r.access, Access::Perm(_)) || r.path == "/api/v1/openapi.json",
                    "{} {} must declare a permission",
                    r.method,
                    r.path
                );
            }
        }
    }
}
