//! OAuth 2.0 refresh-token client for XOAUTH2/OAUTHBEARER upstream logins
//! (API contract; implementation pending).

use std::sync::Arc;

use async_trait::async_trait;
use zeroize::Zeroizing;

use super::config::OAuth2ClientConfig;

#[derive(Debug, thiserror::Error)]
pub enum OAuth2Error {
    /// The grant was refused (`invalid_grant`, revoked token): an operator must act.
    #[error("token endpoint refused the refresh token: {0}")]
    Refused(String),
    #[error("token endpoint unavailable: {0}")]
    Temporary(String),
    #[error("OAuth 2.0 configuration: {0}")]
    Config(String),
}

/// Where rotated refresh tokens are kept (sealed in the store in production).
#[async_trait]
pub trait RefreshTokenStore: Send + Sync {
    async fn load(&self, account: &str) -> Option<Zeroizing<String>>;
    async fn save(&self, account: &str, token: Zeroizing<String>) -> Result<(), String>;
}

/// Hands out access tokens, refreshing them before they expire.
pub struct TokenSource {
    _private: (),
}

impl TokenSource {
    pub fn new(
        _account: &str,
        _cfg: &OAuth2ClientConfig,
        _store: Arc<dyn RefreshTokenStore>,
    ) -> Result<TokenSource, OAuth2Error> {
        Err(OAuth2Error::Config("not implemented".into()))
    }

    /// A valid access token (cached; refreshed when it expires within 60 s).
    pub async fn access_token(&self) -> Result<Zeroizing<String>, OAuth2Error> {
        Err(OAuth2Error::Config("not implemented".into()))
    }

    /// Forgets the cached access token (after the upstream refused it).
    pub fn invalidate(&self) {}
}
