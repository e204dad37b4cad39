//! The bearer-token SASL mechanisms: `OAUTHBEARER` (RFC 7628) and `XOAUTH2`
//! (the Google/Microsoft form). The exchanges, their message parsing and
//! the RFC 7628 error challenge live here; the token itself is checked by
//! [`crate::oauth::TokenValidator`], and whether the named account may log
//! in is asked of [`crate::auth::Authenticator::login_refusal`], the same
//! check every other mechanism goes through.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Mechanism, SaslContext, Step};
use crate::auth::AuthFailure;
use crate::oauth::TokenValidator;
use crate::store::UserRecord;

/// The SASL mechanisms of this module, in order of preference.
pub const MECHANISMS: [&str; 2] = ["OAUTHBEARER", "XOAUTH2"];

/// Starts `OAUTHBEARER` or `XOAUTH2` with `validator`; `None` for other names.
pub fn start(name: &str, validator: &Arc<TokenValidator>) -> Option<Box<dyn Mechanism>> {
    match name {
        "OAUTHBEARER" => Some(Box::new(OAuthBearer::new(validator.clone()))),
        "XOAUTH2" => Some(Box::new(XOAuth2::new(validator.clone()))),
        _ => None,
    }
}

/// Splits `key=value^A...^A` pairs (the part after the first `^A` of
/// OAUTHBEARER, the whole of XOAUTH2) into (key, value); the list must end
/// with an empty pair (`^A^A`).
fn kv_pairs(s: &str) -> Result<Vec<(&str, &str)>, &'static str> {
    let Some(body) = s.strip_suffix('\x01') else {
        return Err("message must end with ^A");
    };
    let mut out = Vec::new();
    if body.is_empty() {
        return Ok(out);
    }
    let Some(body) = body.strip_suffix('\x01') else {
        return Err("message must end with ^A^A");
    };
    for pair in body.split('\x01') {
        let (k, v) = pair.split_once('=').ok_or("key=value expected")?;
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err("bad key");
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err("duplicate key");
        }
        out.push((k, v));
    }
    Ok(out)
}

/// The token of an `auth` value: `Bearer` (any case), spaces, b64token.
fn bearer_token(auth: &str) -> Result<&str, &'static str> {
    let (scheme, token) = auth.split_once(' ').ok_or("auth must be `Bearer <token>`")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("only the Bearer scheme is supported");
    }
    let token = token.trim_start_matches(' ');
    let body = token.trim_end_matches('=');
    let ok = !body.is_empty()
        && body.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/'));
    if !ok {
        return Err("bearer token has characters outside b64token");
    }
    Ok(token)
}

/// RFC 5801 saslname (shared with SCRAM); an empty name is refused.
fn decode_saslname(s: &str) -> Result<String, &'static str> {
    match crate::scram::unescape_saslname(s) {
        Some(name) if !name.is_empty() => Ok(name),
        Some(_) => Err("empty authzid"),
        None => Err("bad escape in authzid"),
    }
}

/// Parses an OAUTHBEARER client response: `gs2-header ^A *(kv ^A) ^A`.
/// Returns the authzid (if any) and the bearer token.
fn parse_oauthbearer(msg: &[u8]) -> Result<(Option<String>, &str), &'static str> {
    let s = std::str::from_utf8(msg).map_err(|_| "OAUTHBEARER message is not UTF-8")?;
    let mut gs2 = s.splitn(3, ',');
    let (Some(flag), Some(authz), Some(rest)) = (gs2.next(), gs2.next(), gs2.next()) else {
        return Err("OAUTHBEARER message needs a GS2 header");
    };
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err("OAUTHBEARER does not support channel binding"),
        _ => return Err("bad GS2 channel-binding flag"),
    }
    let authz = match authz {
        "" => None,
        a => Some(decode_saslname(a.strip_prefix("a=").ok_or("bad GS2 authzid")?)?),
    };
    let rest = rest.strip_prefix('\x01').ok_or("GS2 header must be followed by ^A")?;
    let pairs = kv_pairs(rest)?;
    let auth = pairs.iter().find(|(k, _)| *k == "auth").map(|(_, v)| *v).ok_or("missing auth=")?;
    Ok((authz, bearer_token(auth)?))
}

/// Parses an XOAUTH2 client response: `user=U ^A auth=Bearer T ^A ^A`.
fn parse_xoauth2(msg: &[u8]) -> Result<(String, &str), &'static str> {
    let s = std::str::from_utf8(msg).map_err(|_| "XOAUTH2 message is not UTF-8")?;
    let pairs = kv_pairs(s)?;
    let user = pairs.iter().find(|(k, _)| *k == "user").map(|(_, v)| *v).ok_or("missing user=")?;
    let auth = pairs.iter().find(|(k, _)| *k == "auth").map(|(_, v)| *v).ok_or("missing auth=")?;
    if user.is_empty() {
        return Err("empty user=");
    }
    Ok((user.to_owned(), bearer_token(auth)?))
}

/// Validates the token and looks the user up. The error carries the user
/// name to report (the token's, or the claimed one).
async fn login(
    validator: &TokenValidator,
    ctx: &SaslContext<'_>,
    mechanism: &'static str,
    claimed: Option<&str>,
    token: &str,
) -> Result<UserRecord, (AuthFailure, Option<String>)> {
    let valid = match validator.validate(token).await {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(mechanism, reason = %e, "bearer token refused");
            return Err((e.auth_failure(), claimed.map(str::to_owned)));
        }
    };
    let name = valid.username;
    if let Some(c) = claimed {
        if !c.eq_ignore_ascii_case(name.as_str()) {
            tracing::info!(mechanism, token_user = %name, "bearer token is for another user than the one named");
            return Err((AuthFailure::BadPassword, Some(c.to_owned())));
        }
    }
    // An account that refuses logins answers exactly as an invalid token
    // does: the failure is reported for the name the client gave (none
    // for OAUTHBEARER without authzid), as for an invalid token, so the
    // final reply does not depend on the token being valid.
    let refused = |reason: AuthFailure| {
        tracing::info!(mechanism, user = %name, reason = reason.reason(), "valid bearer token for a refused account");
        Err((reason, claimed.map(str::to_owned)))
    };
    let locked = (ctx.locked)(name.as_str());
    // A locked name is refused without a store lookup.
    let record = if locked {
        None
    } else {
        match ctx.auth.mail().store().user(&name).await {
            Ok(Some(r)) => Some(r),
            Ok(None) => return Err((AuthFailure::UnknownUser, Some(name.to_string()))),
            Err(e) => {
                tracing::error!(error = %e, "user lookup failed");
                return Err((AuthFailure::Temporary, Some(name.to_string())));
            }
        }
    };
    match (ctx.auth.login_refusal(locked, record.as_ref()), record) {
        (Some(reason), _) => refused(reason),
        (None, Some(r)) => {
            tracing::debug!(mechanism, issuer = %valid.issuer, user = %name, "bearer token accepted");
            Ok(r)
        }
        // Not locked means the record was looked up and found.
        (None, None) => Err((AuthFailure::UnknownUser, Some(name.to_string()))),
    }
}

enum BearerState {
    Start,
    /// The error challenge was sent; the client's dummy response ends it.
    AwaitErrorAck {
        reason: AuthFailure,
        user: Option<String>,
    },
    Done,
}

/// The end of a failed login: immediate for temporary trouble, otherwise
/// the RFC 7628 error challenge first.
fn refuse(validator: &TokenValidator, state: &mut BearerState, reason: AuthFailure, user: Option<String>) -> Step {
    if reason == AuthFailure::Temporary {
        return Step::Failure { reason, user };
    }
    *state = BearerState::AwaitErrorAck { reason, user };
    Step::Challenge(validator.error_challenge().to_vec())
}

/// SASL OAUTHBEARER (RFC 7628). Host and port are ignored; channel binding
/// (`p=`) is refused; an authzid (`a=`), if sent, must name the token's user.
pub struct OAuthBearer {
    validator: Arc<TokenValidator>,
    state: BearerState,
}

impl OAuthBearer {
    pub fn new(validator: Arc<TokenValidator>) -> Self {
        Self { validator, state: BearerState::Start }
    }
}

/// Splits a client's first response into (named user, token).
type ParseBearer = fn(&[u8]) -> Result<(Option<String>, &str), &'static str>;

/// The exchange both bearer mechanisms share: the first response carries the
/// token (parsed by `parse` into an optional named user and the token); a
/// refusal sends the RFC 7628 error challenge, and the client's
/// acknowledgement (`ack`) is answered with the failure.
async fn bearer_step(
    validator: &TokenValidator,
    state: &mut BearerState,
    ctx: &SaslContext<'_>,
    response: Option<&[u8]>,
    name: &'static str,
    parse: ParseBearer,
    ack: &[u8],
) -> Step {
    match std::mem::replace(state, BearerState::Done) {
        BearerState::Start => {
            let Some(msg) = response else {
                *state = BearerState::Start;
                return Step::Challenge(Vec::new());
            };
            let (user, token) = match parse(msg) {
                Ok(p) => p,
                Err(why) => return Step::Malformed(why),
            };
            match login(validator, ctx, name, user.as_deref(), token).await {
                Ok(record) => Step::Success(record),
                Err((reason, user)) => refuse(validator, state, reason, user),
            }
        }
        BearerState::AwaitErrorAck { reason, user } => {
            if response != Some(ack) {
                tracing::debug!(mechanism = name, "client did not acknowledge the error challenge as specified");
            }
            Step::Failure { reason, user }
        }
        BearerState::Done => Step::Malformed("exchange already finished"),
    }
}

/// A bearer exchange abandoned after the error challenge still fails.
fn bearer_abandoned(state: &BearerState) -> Option<(AuthFailure, Option<String>)> {
    match state {
        BearerState::AwaitErrorAck { reason, user } => Some((*reason, user.clone())),
        _ => None,
    }
}

#[async_trait]
impl Mechanism for OAuthBearer {
    fn name(&self) -> &'static str {
        "OAUTHBEARER"
    }

    async fn step(&mut self, ctx: &SaslContext<'_>, response: Option<&[u8]>) -> Step {
        // RFC 7628 3.2.3: the client answers the error with a single ^A.
        bearer_step(&self.validator, &mut self.state, ctx, response, "OAUTHBEARER", parse_oauthbearer, b"\x01").await
    }

    fn abandoned(&self) -> Option<(AuthFailure, Option<String>)> {
        bearer_abandoned(&self.state)
    }
}

/// SASL XOAUTH2 (Google, Microsoft): `user=` is required and must name the
/// token's user (case-insensitive).
pub struct XOAuth2 {
    validator: Arc<TokenValidator>,
    state: BearerState,
}

impl XOAuth2 {
    pub fn new(validator: Arc<TokenValidator>) -> Self {
        Self { validator, state: BearerState::Start }
    }
}

#[async_trait]
impl Mechanism for XOAuth2 {
    fn name(&self) -> &'static str {
        "XOAUTH2"
    }

    async fn step(&mut self, ctx: &SaslContext<'_>, response: Option<&[u8]>) -> Step {
        // The client answers the error with an empty response.
        fn parse(msg: &[u8]) -> Result<(Option<String>, &str), &'static str> {
            parse_xoauth2(msg).map(|(user, token)| (Some(user), token))
        }
        bearer_step(&self.validator, &mut self.state, ctx, response, "XOAUTH2", parse, b"").await
    }

    fn abandoned(&self) -> Option<(AuthFailure, Option<String>)> {
        bearer_abandoned(&self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_message_parsing() {
        let t = "eyJ.eyJ.sig";
        let ok = parse_oauthbearer(
            b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer eyJ.eyJ.sig\x01\x01",
        );
        assert_eq!(ok, Ok((Some("user@example.com".into()), t)));
        assert_eq!(parse_oauthbearer(b"y,,\x01auth=bearer  eyJ.eyJ.sig\x01\x01"), Ok((None, t)));
        assert_eq!(parse_oauthbearer(b"n,a=a=2Cb=3Dc,\x01auth=Bearer x\x01\x01").unwrap().0.as_deref(), Some("a,b=c"));
        for bad in [
            &b"p=tls-exporter,,\x01auth=Bearer x\x01\x01"[..],
            b"n,,auth=Bearer x\x01\x01",
            b"n,,\x01auth=Bearer x\x01",
            b"n,,\x01auth=Basic eA==\x01\x01",
            b"n,,\x01auth=Bearer \x01\x01",
            b"n,,\x01auth=Bearer a b\x01\x01",
            b"n,,\x01host=x\x01\x01",
            b"n,,\x01auth=Bearer x\x01auth=Bearer y\x01\x01",
            b"n,a=bad=escape,\x01auth=Bearer x\x01\x01",
            b"n,u=x,\x01auth=Bearer x\x01\x01",
            b"\xff,,\x01auth=Bearer x\x01\x01",
        ] {
            assert!(parse_oauthbearer(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_xoauth2(b"user=alice@example.org\x01auth=Bearer eyJ.eyJ.sig\x01\x01"),
            Ok(("alice@example.org".into(), t))
        );
        for bad in [
            &b"user=a\x01auth=Bearer x\x01"[..],
            b"auth=Bearer x\x01\x01",
            b"user=\x01auth=Bearer x\x01\x01",
            b"user=a\x01\x01",
        ] {
            assert!(parse_xoauth2(bad).is_err(), "{bad:?}");
        }
    }
}
