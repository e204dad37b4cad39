//! POP3 client for upstream mailboxes (API contract; implementation pending).

use std::sync::Arc;

use zeroize::Zeroizing;

use super::config::AccountConfig;

/// What the account logs in with.
pub enum Credential {
    Password(Zeroizing<String>),
    /// An OAuth 2.0 access token for XOAUTH2/OAUTHBEARER.
    AccessToken(Zeroizing<String>),
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("login refused: {0}")]
    Auth(String),
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("message {msg} exceeds {limit} octets")]
    TooLarge { msg: u32, limit: u64 },
    #[error("server error: {0}")]
    Server(String),
    #[error("connection lost: {0}")]
    Io(String),
}

impl UpstreamError {
    /// Short stable name for events and status.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Tls(_) => "tls",
            UpstreamError::Auth(_) => "auth",
            UpstreamError::Protocol(_) => "protocol",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::TooLarge { .. } => "too_large",
            UpstreamError::Server(_) => "server",
            UpstreamError::Io(_) => "io",
        }
    }
}

/// An authenticated-or-not POP3 session with an upstream server.
pub struct Session {
    _private: (),
}

impl Session {
    /// Connects, reads the greeting, establishes verified TLS (implicit or
    /// mandatory STLS) and reads CAPA.
    pub async fn connect(_account: &AccountConfig, _tls: Arc<rustls::ClientConfig>) -> Result<Session, UpstreamError> {
        Err(UpstreamError::Connect("not implemented".into()))
    }

    /// Logs in per `account.auth`; returns the mechanism used.
    pub async fn login(&mut self, _account: &AccountConfig, _cred: &Credential) -> Result<&'static str, UpstreamError> {
        Err(UpstreamError::Auth("not implemented".into()))
    }

    /// `UIDL`: (message number, unique id) for every message.
    pub async fn uidl_all(&mut self) -> Result<Vec<(u32, String)>, UpstreamError> {
        Err(UpstreamError::Protocol("not implemented".into()))
    }

    /// `LIST`: (message number, size in octets) for every message.
    pub async fn list_all(&mut self) -> Result<Vec<(u32, u64)>, UpstreamError> {
        Err(UpstreamError::Protocol("not implemented".into()))
    }

    /// `RETR`: the message with dot-stuffing removed, CRLF line ends; fails
    /// with `TooLarge` (closing the session) beyond `max_size` octets.
    pub async fn retr(&mut self, _msg: u32, _max_size: u64) -> Result<Vec<u8>, UpstreamError> {
        Err(UpstreamError::Protocol("not implemented".into()))
    }

    pub async fn dele(&mut self, _msg: u32) -> Result<(), UpstreamError> {
        Err(UpstreamError::Protocol("not implemented".into()))
    }

    /// `QUIT`: `Ok` only on `+OK`, which commits the deletions upstream.
    pub async fn quit(self) -> Result<(), UpstreamError> {
        Err(UpstreamError::Protocol("not implemented".into()))
    }
}
