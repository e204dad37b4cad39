//! The JSON API under `/api/v1`: one handler per operation of the CLI,
//! each calling the same `pop3connex_core::admin` function the CLI calls
//! (one implementation), with the caller as the actor. Permissions are
//! declared in the route table ([`crate::routes`]) and enforced before a
//! handler runs; handlers that target a user also check the caller's
//! domain scope.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use pop3connex_core::admin::app_passwords::Expiry;
use pop3connex_core::admin::Admin;
use pop3connex_core::audit_log::AuditQuery;
use pop3connex_core::rbac::PermissionSet;
use pop3connex_core::types::{unix_now, UserName};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

type St = State<Arc<AppState>>;
type Answer = Result<Response, ApiError>;

/// A JSON request body; a malformed one is a 400 in our error format.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(match e {
                JsonRejection::MissingJsonContentType(_) => {
                    ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "bad_input", "send application/json")
                }
                e => ApiError::bad_input(e.body_text()),
            }),
        }
    }
}

fn ok(v: Value) -> Answer {
    Ok(Json(v).into_response())
}

fn done() -> Answer {
    ok(json!({ "ok": true }))
}

fn user_name(s: &str) -> Result<UserName, ApiError> {
    UserName::parse(s).map_err(|e| ApiError::bad_input(e.to_string()))
}

/// Refuses (403, audited) a user outside the caller's domain scope.
pub async fn scope(state: &AppState, caller: &Caller, user: &UserName) -> Result<(), ApiError> {
    if caller.principal.may_touch_user(user.as_str()) {
        return Ok(());
    }
    state.audit(caller.actor(), "authz.denied", user.as_str(), "out_of_scope", caller.address).await?;
    Err(ApiError::forbidden())
}

fn expiry(e: Expiry) -> Value {
    match e {
        Expiry::Never => json!("never"),
        Expiry::InDays(d) => json!({ "days": d }),
        Expiry::Expired => json!("expired"),
    }
}

// ---- users ----

pub async fn users_list(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    let users = s.admin.list_users(c.actor()).await?;
    let list: Vec<Value> = users
        .into_iter()
        .filter(|u| c.principal.may_touch_user(u.name.as_str()))
        .map(|u| json!({ "name": u.name.as_str(), "disabled": u.disabled, "messages": u.messages, "octets": u.octets }))
        .collect();
    ok(json!(list))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    name: String,
    password: zeroize::Zeroizing<String>,
}

pub async fn users_add(State(s): St, Extension(c): Extension<Caller>, Body(b): Body<NewUser>) -> Answer {
    let name = user_name(&b.name)?;
    scope(&s, &c, &name).await?;
    s.admin.add_user(c.actor(), &name, b.password.as_bytes()).await?;
    Ok((StatusCode::CREATED, Json(json!({ "name": name.as_str() }))).into_response())
}

pub async fn user_show(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    let name = user_name(&name)?;
    scope(&s, &c, &name).await?;
    let stat = s.admin.mailbox_stat(c.actor(), &name).await?;
    ok(
        json!({ "name": stat.name.as_str(), "messages": stat.messages, "octets": stat.octets, "disabled": stat.disabled }),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPassword {
    password: zeroize::Zeroizing<String>,
}

pub async fn user_passwd(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Body(b): Body<NewPassword>,
) -> Answer {
    let name = user_name(&name)?;
    scope(&s, &c, &name).await?;
    s.admin.set_password(c.actor(), &name, b.password.as_bytes()).await?;
    done()
}

async fn set_disabled(s: &AppState, c: &Caller, name: &str, disabled: bool) -> Answer {
    let name = user_name(name)?;
    scope(s, c, &name).await?;
    s.admin.set_disabled(c.actor(), &name, disabled).await?;
    done()
}

pub async fn user_disable(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    set_disabled(&s, &c, &name, true).await
}

pub async fn user_enable(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    set_disabled(&s, &c, &name, false).await
}

pub async fn user_unlock(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    let name = user_name(&name)?;
    scope(&s, &c, &name).await?;
    let r = s.admin.unlock(c.actor(), &name).await?;
    ok(json!({ "unlocked": r == pop3connex_core::admin::users::Unlock::Unlocked }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetClass {
    class: Option<String>,
}

pub async fn user_class(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Body(b): Body<SetClass>,
) -> Answer {
    let name = user_name(&name)?;
    scope(&s, &c, &name).await?;
    s.admin.set_class(c.actor(), &name, b.class.as_deref()).await?;
    done()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRequired {
    required: bool,
}

pub async fn user_modern_auth(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Body(b): Body<SetRequired>,
) -> Answer {
    let name = user_name(&name)?;
    scope(&s, &c, &name).await?;
    s.admin.set_require_modern_auth(c.actor(), &name, b.required).await?;
    done()
}

pub async fn user_delete(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    let name = user_name(&name)?;
    scope(&s, &c, &name).await?;
    // The step-up this route requires is the confirmation.
    s.admin.delete_user(c.actor(), &name, true).await?;
    done()
}

pub async fn app_passwords_list(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    let name = user_name(&name)?;
    scope(&s, &c, &name).await?;
    let list = s.admin.list_app_passwords(c.actor(), &name).await?;
    let list: Vec<Value> = list
        .into_iter()
        .map(|a| json!({ "id": a.id, "label": a.label, "expiry": expiry(a.expiry), "last_used_ago": a.last_used_ago }))
        .collect();
    ok(json!(list))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAppPassword {
    label: String,
    expires_days: Option<u64>,
}

pub async fn app_passwords_add(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Body(b): Body<NewAppPassword>,
) -> Answer {
    let name = user_name(&name)?;
    scope(&s, &c, &name).await?;
    let new = s.admin.add_app_password(c.actor(), &name, &b.label, b.expires_days).await?;
    // Shown once: the response is not cached (Cache-Control: no-store).
    Ok((StatusCode::CREATED, Json(json!({ "id": new.id, "password": new.password.as_str() }))).into_response())
}

pub async fn app_passwords_revoke(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path((name, id)): Path<(String, i64)>,
) -> Answer {
    let name = user_name(&name)?;
    scope(&s, &c, &name).await?;
    s.admin.revoke_app_password(c.actor(), &name, id).await?;
    done()
}

// ---- bans ----

pub async fn bans_list(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    let bans = s.admin.list_bans(c.actor()).await?;
    let list: Vec<Value> = bans
        .into_iter()
        .map(|b| {
            json!({ "network": b.network.to_string(), "reason": b.reason, "expires_in": b.expires_in, "offences": b.offences })
        })
        .collect();
    ok(json!(list))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewBan {
    network: String,
    #[serde(default)]
    reason: String,
    seconds: Option<u64>,
}

pub async fn bans_add(State(s): St, Extension(c): Extension<Caller>, Body(b): Body<NewBan>) -> Answer {
    let reason = if b.reason.is_empty() { "set by an administrator" } else { b.reason.as_str() };
    let net = s.admin.add_ban(c.actor(), &b.network, reason, b.seconds).await?;
    Ok((StatusCode::CREATED, Json(json!({ "network": net.to_string() }))).into_response())
}

#[derive(Deserialize)]
pub struct NetworkQuery {
    network: String,
}

pub async fn bans_remove(State(s): St, Extension(c): Extension<Caller>, Query(q): Query<NetworkQuery>) -> Answer {
    let net = s.admin.remove_ban(c.actor(), &q.network).await?;
    ok(json!({ "network": net.to_string() }))
}

// ---- connector ----

pub async fn connector_list(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    let list = s.admin.list_connector_accounts(c.actor()).await?;
    let status = s.admin.connector_status(c.actor(), None).await?;
    let list: Vec<Value> = list
        .into_iter()
        .map(|a| {
            let st = status.iter().find(|x| x.name == a.name).map(|x| &x.status);
            json!({
                "name": a.name, "host": a.host, "port": a.port, "origin": a.origin.as_str(), "enabled": a.enabled,
                "seen": a.seen, "last_error": a.last_error,
                "last_run_at": st.and_then(|x| x.last_run_at), "last_success_at": st.and_then(|x| x.last_success_at),
                "failures": st.map_or(0, |x| x.failures), "fetched_total": st.map_or(0, |x| x.fetched_total),
            })
        })
        .collect();
    ok(json!(list))
}

pub async fn connector_show(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    let account = s.admin.show_connector_account(c.actor(), &name).await?;
    // Secrets in an account are references (env:/file:), never values.
    ok(serde_json::to_value(&account).map_err(|_| ApiError::internal())?)
}

pub async fn connector_add(State(s): St, Extension(c): Extension<Caller>, Body(b): Body<Value>) -> Answer {
    let toml = toml::to_string(&b).map_err(|e| ApiError::bad_input(format!("account: {e}")))?;
    let base = s.cfg.source.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let name = s.admin.add_connector_account(c.actor(), "request body", &toml, &base).await?;
    Ok((StatusCode::CREATED, Json(json!({ "name": name }))).into_response())
}

pub async fn connector_remove(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    s.admin.remove_connector_account(c.actor(), &name).await?;
    done()
}

async fn run(admin: &Admin, c: &Caller, names: &[String]) -> Answer {
    let runs = admin.run_connector_accounts(c.actor(), names).await?;
    let list: Vec<Value> = runs
        .into_iter()
        .map(|r| match r.result {
            Ok(rep) => json!({
                "account": r.account, "ok": true, "fetched": rep.fetched, "delivered": rep.delivered,
                "forwarded": rep.forwarded, "duplicates": rep.duplicates, "quarantined": rep.quarantined,
                "deleted": rep.deleted, "skipped": rep.skipped, "deferred": rep.deferred, "octets": rep.octets,
            }),
            Err(e) => json!({ "account": r.account, "ok": false, "error": e.to_string() }),
        })
        .collect();
    ok(json!(list))
}

pub async fn connector_run(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    run(&s.admin, &c, &[name]).await
}

pub async fn connector_run_all(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    run(&s.admin, &c, &[]).await
}

// ---- administrators and roles ----

pub async fn admins_list(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    let list = s.admin.admin_list(c.actor()).await?;
    ok(serde_json::to_value(&list).map_err(|_| ApiError::internal())?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAdmin {
    name: String,
    password: zeroize::Zeroizing<String>,
    roles: Vec<String>,
}

pub async fn admins_add(State(s): St, Extension(c): Extension<Caller>, Body(b): Body<NewAdmin>) -> Answer {
    let info = s.admin.admin_add(c.actor(), &b.name, &b.password, &b.roles).await?;
    Ok((StatusCode::CREATED, Json(serde_json::to_value(&info).map_err(|_| ApiError::internal())?)).into_response())
}

pub async fn admins_remove(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    s.admin.admin_remove(c.actor(), &name).await?;
    done()
}

pub async fn admins_disable(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    s.admin.admin_set_enabled(c.actor(), &name, false).await?;
    done()
}

pub async fn admins_enable(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    s.admin.admin_set_enabled(c.actor(), &name, true).await?;
    done()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRoles {
    roles: Vec<String>,
}

pub async fn admins_roles(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Body(b): Body<SetRoles>,
) -> Answer {
    s.admin.admin_set_roles(c.actor(), &name, &b.roles).await?;
    tracing::warn!(alert = true, event = "admin_roles_changed", actor = %c.actor(), admin = %name, "administrator roles changed");
    done()
}

pub async fn admins_reset_mfa(State(s): St, Extension(c): Extension<Caller>, Path(name): Path<String>) -> Answer {
    s.admin.admin_reset_mfa(c.actor(), &name).await?;
    done()
}

pub async fn admins_passwd(
    State(s): St,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
    Body(b): Body<NewPassword>,
) -> Answer {
    s.admin.admin_set_password(c.actor(), &name, &b.password).await?;
    done()
}

pub async fn roles_list(State(s): St) -> Answer {
    let list: Vec<Value> = s
        .roles
        .all()
        .iter()
        .map(|r| json!({ "name": r.name, "permissions": r.permissions.names(), "domains": r.domains, "builtin": r.builtin }))
        .collect();
    ok(json!(list))
}

// ---- service tokens ----

pub async fn tokens_list(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    let list = s.admin.token_list(c.actor()).await?;
    ok(serde_json::to_value(&list).map_err(|_| ApiError::internal())?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    name: String,
    permissions: Vec<String>,
    /// Days from now until the token expires.
    expires_days: u64,
    #[serde(default)]
    networks: Vec<String>,
}

pub async fn tokens_create(State(s): St, Extension(c): Extension<Caller>, Body(b): Body<NewToken>) -> Answer {
    let permissions = PermissionSet::parse_list(&b.permissions).map_err(ApiError::bad_input)?;
    let networks =
        b.networks.iter().map(|n| pop3connex_core::admin::security::parse_network(n)).collect::<Result<Vec<_>, _>>()?;
    let expires_at = (unix_now() as u64).saturating_add(b.expires_days.saturating_mul(86_400));
    let (info, token) = s.admin.token_create(&c.principal, &b.name, &permissions, expires_at, &networks).await?;
    let mut v = serde_json::to_value(&info).map_err(|_| ApiError::internal())?;
    // Shown once; only its hash is stored.
    v["token"] = json!(token.as_str());
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

pub async fn tokens_revoke(State(s): St, Extension(c): Extension<Caller>, Path(id): Path<String>) -> Answer {
    s.admin.token_revoke_by(&c.principal, &id).await?;
    done()
}

// ---- audit log, configuration, reload ----

/// Records returned by one audit log read when no limit is given, and at most.
const AUDIT_DEFAULT_LIMIT: usize = 100;
const AUDIT_MAX_LIMIT: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    since: Option<i64>,
    until: Option<i64>,
    actor: Option<String>,
    action: Option<String>,
    limit: Option<usize>,
    before_seq: Option<i64>,
}

pub fn audit_query(p: AuditParams) -> AuditQuery {
    AuditQuery {
        since: p.since,
        until: p.until,
        actor: p.actor,
        action: p.action,
        limit: p.limit.unwrap_or(AUDIT_DEFAULT_LIMIT).clamp(1, AUDIT_MAX_LIMIT),
        before_seq: p.before_seq,
    }
}

/// Whether `caller` may see an audit record: everything for an
/// administrator not limited to domains; for a domain-limited one, records
/// about users of its domains and its own actions (never other
/// administrators' logins, tokens or bans).
pub fn audit_visible(caller: &Caller, r: &pop3connex_core::admin::AuditRecord) -> bool {
    if caller.principal.domains.is_none() {
        return true;
    }
    // `admin:NAME@ADDRESS`: the address is after the last `@`.
    let who = |a: &str| -> String {
        match a.strip_prefix("admin:").and_then(|rest| rest.rsplit_once('@')) {
            Some((name, _)) => format!("admin:{name}"),
            None => a.to_owned(),
        }
    };
    who(&r.actor) == who(&caller.actor().to_string())
        || (r.target.contains('@') && caller.principal.may_touch_user(&r.target))
}

pub async fn audit_read(State(s): St, Extension(c): Extension<Caller>, Query(p): Query<AuditParams>) -> Answer {
    let mut records = s.admin.audit_log_read(c.actor(), &audit_query(p)).await?;
    records.retain(|r| audit_visible(&c, r));
    ok(serde_json::to_value(&records).map_err(|_| ApiError::internal())?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    since: Option<i64>,
    until: Option<i64>,
    user: Option<String>,
    ip: Option<String>,
    /// Catalogue names, comma-separated.
    #[serde(rename = "type")]
    types: Option<String>,
    limit: Option<usize>,
    before_seq: Option<i64>,
}

/// `GET /api/v1/events`: the local event store, newest first. A
/// domain-scoped caller sees only events about users of its domains (an
/// event without a user, such as a ban, is not in any domain).
pub async fn events_search(State(s): St, Extension(c): Extension<Caller>, Query(p): Query<EventParams>) -> Answer {
    let names: Vec<String> =
        p.types.as_deref().unwrap_or_default().split(',').filter(|t| !t.is_empty()).map(str::to_owned).collect();
    if names.len() > 64 {
        return Err(ApiError::bad_input("too many event types"));
    }
    if let Some(t) = names.iter().find(|t| pop3connex_core::telemetry::catalogue::lookup(t).is_none()) {
        return Err(ApiError::bad_input(format!("no such event type: {}", t.escape_debug())));
    }
    if p.user.as_ref().is_some_and(|u| u.is_empty() || u.len() > 320 || u.chars().any(char::is_control)) {
        return Err(ApiError::bad_input("not a user name"));
    }
    let ip = match p.ip {
        Some(a) => {
            Some(a.parse::<std::net::IpAddr>().map_err(|_| ApiError::bad_input("ip: not an IP address"))?.to_string())
        }
        None => None,
    };
    let filter = pop3connex_core::store::EventFilter {
        since: p.since,
        until: p.until,
        user: p.user,
        ip,
        names,
        before_seq: p.before_seq,
        limit: p.limit.unwrap_or(AUDIT_DEFAULT_LIMIT).clamp(1, AUDIT_MAX_LIMIT),
    };
    let found = s.admin.events_search(c.actor(), filter).await?;
    let list: Vec<Value> = found
        .into_iter()
        .filter(|e| c.principal.may_touch_user(e.user.as_deref().unwrap_or_default()))
        .map(|e| {
            json!({
                "seq": e.seq,
                "time": e.time,
                "code": e.code,
                "name": e.name,
                "severity": e.severity,
                "user": e.user,
                "ip": e.ip,
                "message": e.message,
                "fields": serde_json::from_str::<Value>(&e.fields).unwrap_or(Value::Null),
            })
        })
        .collect();
    ok(json!(list))
}

/// The configuration file as loaded, as JSON. Secrets in it are always
/// references (`env:NAME`, `file:/path`): literal secrets are refused when
/// the configuration is parsed, so nothing here is a secret value.
pub fn config_json(state: &AppState) -> Result<Value, ApiError> {
    let text = std::fs::read_to_string(&state.cfg.source).map_err(|e| {
        tracing::error!(error = %e, "cannot read the configuration file");
        ApiError::internal()
    })?;
    let parsed: toml::Value = toml::from_str(&text).map_err(|_| ApiError::internal())?;
    Ok(
        json!({ "source": state.cfg.source.display().to_string(), "config": serde_json::to_value(parsed).map_err(|_| ApiError::internal())? }),
    )
}

pub async fn config_read(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    s.audit(c.actor(), "config.read", "config", "ok", c.address).await?;
    ok(config_json(&s)?)
}

/// Asks the server to re-read what SIGHUP re-reads (TLS certificate, list
/// files, bans, lockouts).
pub async fn reload(state: &AppState, c: &Caller) -> Result<(), ApiError> {
    let Some(tx) = &state.reload else {
        state.audit(c.actor(), "config.reload", "server", "unavailable", c.address).await?;
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "reload is not wired here"));
    };
    state.audit(c.actor(), "config.reload", "server", "requested", c.address).await?;
    match tx.try_send(()) {
        // Full: a reload is already pending, and it will read the same files.
        Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {}
        Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => return Err(ApiError::internal()),
    }
    tracing::warn!(alert = true, event = "config_reload_requested", actor = %c.actor(), "configuration reload requested");
    Ok(())
}

pub async fn config_reload(State(s): St, Extension(c): Extension<Caller>) -> Answer {
    reload(&s, &c).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "ok": true }))).into_response())
}

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");

pub async fn openapi() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
