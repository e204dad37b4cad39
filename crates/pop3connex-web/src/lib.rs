//! POP3conneX admin plane: the HTTPS admin API (`/api/v1`) and the web
//! console, served on the `[admin]` listeners.
//!
//! # Layout
//! - [`listener`]: accept, the admin network restriction and bans before
//!   TLS, TLS (ALPN h2 and http/1.1), HTTP/1.1 and HTTP/2 with bounds.
//! - [`headers`]: security headers on every response, the CSRF check.
//! - [`error`]: the one mapping from failures to HTTP answers.
//! - [`console`]: the page templates.
//!
//! Every request passes the same pipeline: peer address → security
//! headers → CSRF → authentication (session or bearer token) → the
//! route's declared permission → the handler, which calls the one
//! implementation of each operation in `pop3connex_core::admin`.
#![forbid(unsafe_code)]

pub mod console;
pub mod error;
pub mod headers;
pub mod listener;
