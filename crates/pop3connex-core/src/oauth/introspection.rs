//! RFC 7662 token introspection: asks the issuer whether a token that
//! passed the local checks is still active (catches revoked tokens).

use base64::Engine as _;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use super::{TokenError, MAX_INTROSPECTION_BYTES, MAX_PARALLEL_INTROSPECTIONS};
use crate::https::{form_encode, form_encode_into, HttpsClient, HttpsError};

/// The introspection endpoint of one issuer.
pub(super) struct Introspection {
    url: String,
    client: HttpsClient,
    /// `Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 2.3.1).
    authorization: Zeroizing<String>,
    permits: tokio::sync::Semaphore,
}

impl Introspection {
    /// `secret` is the client secret as loaded (surrounding whitespace is
    /// ignored).
    pub(super) fn new(url: &str, client: HttpsClient, client_id: &str, secret: &[u8]) -> Self {
        let trimmed = secret.trim_ascii();
        let pair = Zeroizing::new(format!("{}:{}", form_encode(client_id.as_bytes()), form_encode(trimmed)));
        let b64 = base64::engine::general_purpose::STANDARD.encode(pair.as_bytes());
        Introspection {
            url: url.to_owned(),
            client,
            authorization: Zeroizing::new(format!("Basic {b64}")),
            permits: tokio::sync::Semaphore::new(MAX_PARALLEL_INTROSPECTIONS),
        }
    }

    pub(super) async fn check(&self, token: &str, issuer: &str, leeway: u64) -> Result<(), TokenError> {
        let _permit = self.permits.acquire().await.map_err(|_| TokenError::Unavailable("shutting down".into()))?;
        let url = &self.url;
        let mut form = Zeroizing::new(String::with_capacity(token.len() + 48));
        form.push_str("token=");
        form_encode_into(&mut form, token.as_bytes());
        form.push_str("&token_type_hint=access_token");
        let resp =
            self.client.post_form(url, Some(self.authorization.clone()), form, MAX_INTROSPECTION_BYTES).await.map_err(
                |e| match e {
                    HttpsError::Task(e) => TokenError::Unavailable(format!("introspection task failed: {e}")),
                    HttpsError::Request(e) | HttpsError::Body(e) | HttpsError::TooLarge(e) => {
                        TokenError::Unavailable(format!("POST {url}: {e}"))
                    }
                },
            )?;
        let resp: Map<String, Value> = serde_json::from_slice(&resp.body)
            .map_err(|_| TokenError::Unavailable("introspection response is not a JSON object".into()))?;
        if resp.get("active") != Some(&Value::Bool(true)) {
            return Err(TokenError::Inactive);
        }
        if let Some(exp) = resp.get("exp").and_then(Value::as_u64) {
            let now = u64::try_from(crate::types::unix_now()).unwrap_or(0);
            if exp.saturating_add(leeway) < now {
                return Err(TokenError::Inactive);
            }
        }
        if let Some(iss) = resp.get("iss").and_then(Value::as_str) {
            if iss != issuer {
                return Err(TokenError::WrongIssuer);
            }
        }
        Ok(())
    }
}
