//! The one mapping from failures to HTTP answers.
//!
//! API errors are `{"error": kind, "message": text}` with a status chosen by
//! who is at fault ([`AdminError`] kinds: bad input 400, not found 404,
//! conflict 409, refused 403, storage 500). A storage failure's cause goes
//! to the log only: the client gets a generic message, since causes can
//! name paths and internals. No message ever carries a secret: the admin
//! layer's errors name users, networks and accounts, never passwords.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pop3connex_core::admin::AdminError;

/// An error answer of the API (and the JSON endpoints of the console).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, message: message.into() }
    }
    pub fn unauthorized() -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "authentication required")
    }
    pub fn forbidden() -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", "permission denied")
    }
    pub fn step_up_required() -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "step_up_required", "re-check a second factor at /step-up first")
    }
    pub fn bad_input(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_input", message)
    }
    pub fn internal() -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", "internal error; see the server log")
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let status = match &e {
            AdminError::BadInput(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Refused(_) => StatusCode::FORBIDDEN,
            AdminError::Storage(_) => {
                tracing::error!(error = %e, "admin operation failed");
                return ApiError::internal();
            }
        };
        ApiError { status, kind: e.kind(), message: e.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.kind, "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_error_kinds_map_to_statuses_and_storage_causes_stay_in_the_log() {
        let cases = [
            (AdminError::BadInput("x".into()), StatusCode::BAD_REQUEST, "bad_input"),
            (AdminError::NotFound("x".into()), StatusCode::NOT_FOUND, "not_found"),
            (AdminError::Conflict("x".into()), StatusCode::CONFLICT, "conflict"),
            (AdminError::Refused("x".into()), StatusCode::FORBIDDEN, "refused"),
        ];
        for (e, status, kind) in cases {
            let a = ApiError::from(e);
            assert_eq!((a.status, a.kind, a.message.as_str()), (status, kind, "x"));
        }
        let a = ApiError::from(AdminError::Storage("/var/lib/secret/path: disk I/O".into()));
        assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!a.message.contains("/var/lib"), "{}", a.message);
    }
}
