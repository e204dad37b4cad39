//! POP3conneX server library.
//!
//! # Layout
//! - [`config`]: the TOML configuration and its validation, every section's
//!   types included (`config::oauth`, `config::connector`); it imports
//!   nothing above it.
//! - [`secret`]: secret references (`env:`, `file:`) for every credential.
//! - [`crypto`]: encryption at rest (master key, per-mailbox data keys,
//!   chunked AEAD bound to mailbox and message, sealed per-user secrets and
//!   the connector's sealed refresh tokens).
//! - [`password`]: password hashing (Argon2id, SHA512-CRYPT) and verification.
//! - [`store`]: the storage role traits, fenced leases, `store::open` and the SQLite backend.
//! - [`mailstore`]: encryption on top of a store: deliver, list, read.
//! - [`policy`]: password policy (length, classes, reuse, maximum age).
//! - [`scram`]: SCRAM-SHA-256 credentials, messages and proofs.
//! - [`auth`]: account management, credential verification and the one
//!   account-policy check of every login path.
//! - [`https`]: the one hardened outbound HTTPS client (JWKS, introspection,
//!   the connector's OAuth token refresh, MTA-STS policies over addresses
//!   the connector resolved).
//! - [`oauth`]: bearer-token validation (JWKS keys, introspection).
//! - [`sasl`]: the SASL mechanism registry and the mechanisms: PLAIN,
//!   SCRAM-SHA-256(-PLUS), OAUTHBEARER and XOAUTH2 (`sasl::bearer`).
//! - [`rbac`]: admin-plane permissions, built-in and custom roles.
//! - [`admin`]: one function per admin operation (CLI, admin API), each recorded with its actor.
//! - [`audit_log`]: the tamper-evident audit log (HMAC chain, head file, signed checkpoints, verify).
//! - [`tls`]: rustls configuration, hot reload, local CA generation.
//! - [`pop3`]: POP3 sessions (connection framing, state machine, commands).
//! - [`lmtp`]: LMTP ingestion sessions, their deadlines and the shared
//!   in-flight DATA budget (`lmtp::budget`).
//! - [`server`]: listeners, connection limits, signals, graceful shutdown.
//! - [`connector`]: fetching from upstream POP3 mailboxes, routing, forwarding.
//! - [`import`]: Maildir and mbox import.
//! - [`init`]: creating a fresh data directory.
//! - [`events`]: structured security events, rate-limited per connection and address.
//! - [`dnsbl`]: DNS blocklist checks of connecting addresses.
//! - [`logtext`]: the one sanitiser for peer text quoted in errors, events and logs.
//! - [`security`]: bans, lockouts, known addresses, failure counters, LOGIN-DELAY.
//! - [`limits`]: connection limits, LRU-bounded maps, address aggregation.
//! - [`types`]: newtypes shared by the layers.
#![forbid(unsafe_code)]

pub use ipnet;

pub mod admin;
pub mod audit_log;
pub mod auth;
pub mod config;
pub mod connector;
pub mod crypto;
pub mod dnsbl;
pub mod events;
pub mod https;
pub mod import;
pub mod init;
pub mod limits;
pub mod lmtp;
pub mod logtext;
pub mod mailstore;
pub mod oauth;
pub mod password;
pub mod policy;
pub mod pop3;
pub mod rbac;
pub mod sasl;
pub mod scram;
pub mod secret;
pub mod security;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod types;
