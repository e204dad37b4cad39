//! Security headers on every response and the CSRF check on every
//! state-changing request.
//!
//! Headers are set by one outermost middleware, so they are on pages, API
//! answers, errors and 404s alike. The CSRF rule uses Fetch Metadata: a
//! POST/PUT/PATCH/DELETE that a browser could send with our cookie must say
//! `Sec-Fetch-Site: same-origin`, or (older browsers, no Fetch Metadata)
//! carry an `Origin` equal to `public_origin`. Requests that authenticate
//! with `Authorization: Bearer` carry no ambient credential and are exempt;
//! everything else is checked, login included (no login CSRF).

use axum::extract::{Request, State};
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const FIXED: [(&str, &str); 7] = [
    ("strict-transport-security", "max-age=31536000"),
    ("content-security-policy", CSP),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("x-content-type-options", "nosniff"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
];

/// Adds the security headers to every response; `Cache-Control: no-store`
/// unless the handler chose a cache policy (static files).
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    for (name, value) in FIXED {
        h.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// Whether the method changes state (and so needs the CSRF check).
pub fn state_changing(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether the request authenticates with a bearer token.
pub fn has_bearer(headers: &HeaderMap) -> bool {
    headers.contains_key(header::AUTHORIZATION)
}

/// The CSRF decision for a state-changing request without a bearer token.
pub fn csrf_ok(headers: &HeaderMap, public_origin: &str) -> bool {
    let site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
    let origin = headers.get(header::ORIGIN).map(|o| o.as_bytes());
    // An Origin that names a site must be ours, whatever Fetch Metadata says
    // (a proxy or client that rewrites one header but not the other). The
    // opaque `null` is what a browser sends for its own same-origin form POST
    // under our `Referrer-Policy: no-referrer` (Fetch, "append a request
    // `Origin` header"), so it counts only together with `same-origin`.
    let named_origin = origin.filter(|o| *o != b"null");
    if named_origin.is_some_and(|o| o != public_origin.as_bytes()) {
        return false;
    }
    match site {
        Some(b"same-origin") => true,
        // `none`: a user-initiated request; absent: a browser without Fetch
        // Metadata. Either way the Origin must be ours.
        None | Some(b"none") => named_origin.is_some(),
        Some(_) => false,
    }
}

/// Refuses state-changing requests that fail [`csrf_ok`] with 403.
pub async fn csrf(State(public_origin): State<std::sync::Arc<str>>, req: Request, next: Next) -> Response {
    if state_changing(req.method()) && !has_bearer(req.headers()) && !csrf_ok(req.headers(), &public_origin) {
        tracing::info!(method = %req.method(), path = req.uri().path(), "cross-site request refused");
        return ApiError::new(axum::http::StatusCode::FORBIDDEN, "csrf", "cross-site request refused").into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn fetch_metadata_and_origin_rules() {
        let o = "https://admin.example:8443";
        assert!(csrf_ok(&headers(&[("sec-fetch-site", "same-origin")]), o));
        assert!(!csrf_ok(&headers(&[("sec-fetch-site", "cross-site"), ("origin", "https://admin.example:8443")]), o));
        assert!(!csrf_ok(&headers(&[("sec-fetch-site", "same-site")]), o));
        assert!(csrf_ok(&headers(&[("origin", "https://admin.example:8443")]), o));
        assert!(csrf_ok(&headers(&[("sec-fetch-site", "none"), ("origin", "https://admin.example:8443")]), o));
        assert!(!csrf_ok(&headers(&[("origin", "https://evil.example")]), o));
        assert!(!csrf_ok(&headers(&[("origin", "null")]), o));
        assert!(
            !csrf_ok(&headers(&[("sec-fetch-site", "same-origin"), ("origin", "https://evil.example")]), o),
            "a wrong Origin is refused even when Fetch Metadata says same-origin"
        );
        assert!(!csrf_ok(&HeaderMap::new(), o), "neither header: refused");
        assert!(
            csrf_ok(&headers(&[("sec-fetch-site", "same-origin"), ("origin", "null")]), o),
            "a browser's own form POST under Referrer-Policy: no-referrer carries Origin: null"
        );
        assert!(!csrf_ok(&headers(&[("sec-fetch-site", "none"), ("origin", "null")]), o));
        assert!(!csrf_ok(&headers(&[("sec-fetch-site", "cross-site"), ("origin", "null")]), o));
        assert!(state_changing(&Method::POST) && state_changing(&Method::DELETE) && !state_changing(&Method::GET));
    }
}
