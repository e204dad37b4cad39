//! SASL PLAIN (RFC 4616): one message with the user name and password,
//! verified like USER/PASS (app passwords included).

use async_trait::async_trait;
use zeroize::Zeroizing;

use super::{Mechanism, SaslContext, Step};
use crate::auth::AuthFailure;

/// RFC 4616 PLAIN: `authzid NUL authcid NUL passwd`. Proxy authorisation
/// (an authzid different from the authcid) is refused.
pub struct Plain;

#[async_trait]
impl Mechanism for Plain {
    fn name(&self) -> &'static str {
        "PLAIN"
    }

    async fn step(&mut self, ctx: &SaslContext<'_>, response: Option<&[u8]>) -> Step {
        let Some(msg) = response else {
            return Step::Challenge(Vec::new());
        };
        let msg = Zeroizing::new(msg.to_vec());
        let mut parts = msg.split(|&b| b == 0);
        let (Some(authz), Some(authc), Some(pass), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Step::Malformed("PLAIN message must be authzid NUL authcid NUL password");
        };
        let Ok(authc) = std::str::from_utf8(authc) else {
            return Step::Malformed("PLAIN authcid is not UTF-8");
        };
        if authc.is_empty() || pass.is_empty() {
            return Step::Malformed("PLAIN needs a user name and a password");
        }
        if !authz.is_empty() && !authz.eq_ignore_ascii_case(authc.as_bytes()) {
            return Step::Failure { reason: AuthFailure::BadPassword, user: Some(authc.to_owned()) };
        }
        if let Some(reason) = ctx.auth.login_refusal((ctx.locked)(authc), None) {
            // Refused before hashing, whatever the password: as USER/PASS.
            return Step::Failure { reason, user: Some(authc.to_owned()) };
        }
        match ctx.auth.verify_password(authc, pass).await {
            Ok(user) => Step::Success(user),
            Err(reason) => Step::Failure { reason, user: Some(authc.to_owned()) },
        }
    }
}
