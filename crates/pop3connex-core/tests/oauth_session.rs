//! OAUTHBEARER (RFC 7628) and XOAUTH2 logins against a real store: the
//! mechanisms driven step by step with a real `SaslContext`, and (module
//! `wired`) full POP3 `AUTH` exchanges through `pop3::serve`.
//!
//! Tokens are ES256 JWTs signed with a key generated here; the issuer's
//! keys are a JWKS file.

mod common;
#[path = "refused/mod.rs"]
mod refused;

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use common::Fixture;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pop3connex_core::auth::AuthFailure;
use pop3connex_core::config::oauth::OAuthConfig;
use pop3connex_core::oauth::TokenValidator;
use pop3connex_core::sasl::bearer::{OAuthBearer, XOAuth2};
use pop3connex_core::sasl::{Mechanism, SaslContext, Step};
use pop3connex_core::types::UserName;
use serde_json::{json, Value};

const ISS: &str = "https://idp.example.org";
const AUD: &str = "pop3connex";
const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A test identity provider: one ES256 key published as a JWKS file.
struct Idp {
    key: EncodingKey,
    jwks: PathBuf,
}

impl Idp {
    fn new(f: &Fixture) -> Idp {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
                         "x": B64URL.encode(&raw[1..33]), "y": B64URL.encode(&raw[33..])});
        let jwks = f.dir.join("jwks.json");
        std::fs::write(&jwks, json!({"keys": [jwk]}).to_string()).unwrap();
        Idp { key: EncodingKey::from_ec_der(&kp.serialize_der()), jwks }
    }

    fn config(&self) -> OAuthConfig {
        #[derive(serde::Deserialize)]
        struct Root {
            oauth: OAuthConfig,
        }
        let text = format!(
            "[oauth]\nscope = \"email\"\n[[oauth.issuer]]\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\n\
             jwks_file = \"{}\"\n",
            self.jwks.display()
        );
        toml::from_str::<Root>(&text).unwrap().oauth
    }

    fn validator(&self) -> Arc<TokenValidator> {
        Arc::new(TokenValidator::new(&self.config()).unwrap())
    }

    fn token_with(&self, claims: Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, &claims, &self.key).unwrap()
    }

    fn token(&self, email: &str) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        self.token_with(json!({"iss": ISS, "aud": AUD, "sub": "s-1", "email": email, "exp": now + 300}))
    }

    fn expired(&self, email: &str) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        self.token_with(json!({"iss": ISS, "aud": AUD, "email": email, "exp": now - 3600}))
    }
}

fn oauthbearer_msg(authz: Option<&str>, token: &str) -> Vec<u8> {
    let a = authz.map_or(String::new(), |u| format!("a={u}"));
    format!("n,{a},\x01host=pop.example.org\x01port=995\x01auth=Bearer {token}\x01\x01").into_bytes()
}

fn xoauth2_msg(user: &str, token: &str) -> Vec<u8> {
    format!("user={user}\x01auth=Bearer {token}\x01\x01").into_bytes()
}

fn describe(s: &Step) -> String {
    match s {
        Step::Challenge(c) => format!("Challenge({})", String::from_utf8_lossy(c)),
        Step::Success(r) => format!("Success({})", r.name),
        Step::Failure { reason, user } => format!("Failure({reason:?}, {user:?})"),
        Step::Malformed(why) => format!("Malformed({why})"),
    }
}

fn expect_error_challenge(s: &Step) {
    let Step::Challenge(c) = s else { panic!("expected the error challenge, got {}", describe(s)) };
    let j: Value = serde_json::from_slice(c).unwrap();
    assert_eq!(j, json!({"status": "invalid_token", "schemes": "bearer", "scope": "email"}));
}

fn expect_failure(s: &Step, want: AuthFailure, user: Option<&str>) {
    match s {
        Step::Failure { reason, user: u } => {
            assert_eq!(*reason, want);
            assert_eq!(u.as_deref(), user);
        }
        other => panic!("expected Failure({want:?}), got {}", describe(other)),
    }
}

/// Runs a whole exchange: initial response, and the client's answer to an
/// error challenge if one comes. Returns every step.
async fn run(mech: &mut dyn Mechanism, ctx: &SaslContext<'_>, initial: &[u8], ack: &[u8]) -> Vec<Step> {
    let first = mech.step(ctx, Some(initial)).await;
    if matches!(first, Step::Challenge(_)) {
        let second = mech.step(ctx, Some(ack)).await;
        return vec![first, second];
    }
    vec![first]
}

#[tokio::test]
async fn oauthbearer_steps() {
    let f = Fixture::new("oauthbearer").await;
    f.add_user("alice@example.org").await;
    let idp = Idp::new(&f);
    let v = idp.validator();
    let ctx = SaslContext { auth: &f.auth, tls_exporter: None, locked: &pop3connex_core::sasl::never_locked };

    // No initial response: an empty challenge first, then the message.
    let mut m = OAuthBearer::new(v.clone());
    assert_eq!(m.name(), "OAUTHBEARER");
    assert!(matches!(m.step(&ctx, None).await, Step::Challenge(ref c) if c.is_empty()));
    let s = m.step(&ctx, Some(&oauthbearer_msg(None, &idp.token("Alice@Example.org")))).await;
    assert!(matches!(s, Step::Success(ref r) if r.name.as_str() == "alice@example.org"), "{}", describe(&s));

    // With a matching authzid (case-insensitive).
    let mut m = OAuthBearer::new(v.clone());
    let s = m.step(&ctx, Some(&oauthbearer_msg(Some("ALICE@example.org"), &idp.token("alice@example.org")))).await;
    assert!(matches!(s, Step::Success(_)), "{}", describe(&s));

    // Bad token: RFC 7628 error challenge, the client's ^A, then failure.
    let mut m = OAuthBearer::new(v.clone());
    let steps = run(&mut m, &ctx, &oauthbearer_msg(None, &idp.expired("alice@example.org")), b"\x01").await;
    assert_eq!(steps.len(), 2);
    expect_error_challenge(&steps[0]);
    expect_failure(&steps[1], AuthFailure::BadPassword, None);
    assert!(matches!(m.step(&ctx, Some(b"\x01")).await, Step::Malformed(_)), "finished exchanges stay finished");

    // A token for alice cannot log in as bob.
    f.add_user("bob@example.org").await;
    let mut m = OAuthBearer::new(v.clone());
    let steps =
        run(&mut m, &ctx, &oauthbearer_msg(Some("bob@example.org"), &idp.token("alice@example.org")), b"\x01").await;
    expect_error_challenge(&steps[0]);
    expect_failure(&steps[1], AuthFailure::BadPassword, Some("bob@example.org"));

    // Malformed messages.
    for bad in [&b"p=tls-exporter,,\x01auth=Bearer x\x01\x01"[..], b"n,,\x01auth=Basic YTpi\x01\x01", b""] {
        let mut m = OAuthBearer::new(v.clone());
        let s = m.step(&ctx, Some(bad)).await;
        assert!(matches!(s, Step::Malformed(_)), "{bad:?}: {}", describe(&s));
    }
}

#[tokio::test]
async fn xoauth2_steps() {
    let f = Fixture::new("xoauth2").await;
    f.add_user("alice@example.org").await;
    let idp = Idp::new(&f);
    let v = idp.validator();
    let ctx = SaslContext { auth: &f.auth, tls_exporter: None, locked: &pop3connex_core::sasl::never_locked };

    let mut m = XOAuth2::new(v.clone());
    assert_eq!(m.name(), "XOAUTH2");
    let s = m.step(&ctx, Some(&xoauth2_msg("alice@example.org", &idp.token("alice@example.org")))).await;
    assert!(matches!(s, Step::Success(ref r) if r.name.as_str() == "alice@example.org"), "{}", describe(&s));

    // Failure: JSON error challenge, the client's empty response, failure.
    let mut m = XOAuth2::new(v.clone());
    let steps = run(&mut m, &ctx, &xoauth2_msg("alice@example.org", &idp.expired("alice@example.org")), b"").await;
    expect_error_challenge(&steps[0]);
    expect_failure(&steps[1], AuthFailure::BadPassword, Some("alice@example.org"));

    // user= must name the token's user.
    let mut m = XOAuth2::new(v.clone());
    let steps = run(&mut m, &ctx, &xoauth2_msg("mallory@example.org", &idp.token("alice@example.org")), b"").await;
    expect_error_challenge(&steps[0]);
    expect_failure(&steps[1], AuthFailure::BadPassword, Some("mallory@example.org"));

    // user= is required.
    let mut m = XOAuth2::new(v.clone());
    let s = m.step(&ctx, Some(format!("auth=Bearer {}\x01\x01", idp.token("a@b.c")).as_bytes())).await;
    assert!(matches!(s, Step::Malformed(_)), "{}", describe(&s));
}

#[tokio::test]
async fn unknown_and_disabled_accounts() {
    let f = Fixture::new("oauth-accounts").await;
    f.add_user("carol@example.org").await;
    f.mail.store().set_disabled(&UserName::parse("carol@example.org").unwrap(), true).await.unwrap();
    let idp = Idp::new(&f);
    let v = idp.validator();
    let ctx = SaslContext { auth: &f.auth, tls_exporter: None, locked: &pop3connex_core::sasl::never_locked };

    let mut m = OAuthBearer::new(v.clone());
    let steps = run(&mut m, &ctx, &oauthbearer_msg(None, &idp.token("ghost@example.org")), b"\x01").await;
    expect_error_challenge(&steps[0]);
    expect_failure(&steps[1], AuthFailure::UnknownUser, Some("ghost@example.org"));

    let mut m = XOAuth2::new(v.clone());
    let steps = run(&mut m, &ctx, &xoauth2_msg("carol@example.org", &idp.token("carol@example.org")), b"").await;
    expect_error_challenge(&steps[0]);
    expect_failure(&steps[1], AuthFailure::Disabled, Some("carol@example.org"));

    // The module's dispatcher knows exactly its two mechanisms.
    assert_eq!(pop3connex_core::sasl::bearer::MECHANISMS, ["OAUTHBEARER", "XOAUTH2"]);
    for name in pop3connex_core::sasl::bearer::MECHANISMS {
        assert_eq!(pop3connex_core::sasl::bearer::start(name, &v).unwrap().name(), name);
    }
    assert!(pop3connex_core::sasl::bearer::start("PLAIN", &v).is_none());
}

/// Full POP3 `AUTH` exchanges through `pop3::serve`.
///
/// These need the validator wired into the session: `Pop3Context.oauth`
/// and `sasl::ConnectionFacts.oauth`, which the mechanism registry
/// (`sasl::offered`/`sasl::start`) asks (see the integration notes). Remove the `cfg` line below once that is merged.
mod wired {
    use super::*;
    use common::Client;
    use pop3connex_core::config::Pop3Config;
    use pop3connex_core::pop3::ListenerKind;
    use tokio::io::DuplexStream;

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    async fn connect(f: &Fixture, oauth: Option<Arc<TokenValidator>>) -> Client<DuplexStream> {
        let cfg = Pop3Config { max_auth_failures: 10, ..Fixture::trusting_cfg() };
        let mut ctx = Arc::into_inner(f.pop3_ctx(cfg)).unwrap();
        ctx.oauth = oauth;
        let mut c = f.connect_pop3(Arc::new(ctx), ListenerKind::StartTls);
        assert!(c.line().await.starts_with("+OK"));
        c
    }

    #[tokio::test]
    async fn auth_oauthbearer_and_xoauth2_over_pop3() {
        let f = Fixture::new("oauth-pop3").await;
        f.add_user("alice@example.org").await;
        f.deliver("alice@example.org", b"Subject: hi\r\n\r\nhello\r\n").await;
        let idp = Idp::new(&f);
        let v = idp.validator();

        let mut c = connect(&f, Some(v.clone())).await;
        assert!(c.cmd("CAPA").await.starts_with("+OK"));
        let caps = c.body().await;
        assert!(caps.iter().any(|l| l.starts_with("SASL ") && l.ends_with(" OAUTHBEARER XOAUTH2")), "{caps:?}");
        assert!(c.cmd("AUTH").await.starts_with("+OK"));
        let mechs = c.body().await;
        assert!(mechs.contains(&"OAUTHBEARER".to_owned()) && mechs.contains(&"XOAUTH2".to_owned()), "{mechs:?}");

        // Failed OAUTHBEARER: error challenge, ^A, -ERR [AUTH].
        let r = c
            .cmd(&format!("AUTH OAUTHBEARER {}", B64.encode(oauthbearer_msg(None, &idp.expired("alice@example.org")))))
            .await;
        let challenge = r.strip_prefix("+ ").unwrap_or_else(|| panic!("{r}"));
        let j: Value = serde_json::from_slice(&B64.decode(challenge).unwrap()).unwrap();
        assert_eq!(j["status"], "invalid_token");
        assert_eq!(c.cmd(&B64.encode(b"\x01")).await, "-ERR [AUTH] Authentication failed");

        // Failed XOAUTH2: error challenge, empty line, -ERR [AUTH].
        let r = c
            .cmd(&format!(
                "AUTH XOAUTH2 {}",
                B64.encode(xoauth2_msg("bob@example.org", &idp.token("alice@example.org")))
            ))
            .await;
        assert!(r.starts_with("+ "), "{r}");
        assert_eq!(c.cmd("").await, "-ERR [AUTH] Authentication failed");

        // Successful OAUTHBEARER with an initial response.
        let r = c
            .cmd(&format!(
                "AUTH OAUTHBEARER {}",
                B64.encode(oauthbearer_msg(Some("alice@example.org"), &idp.token("alice@example.org")))
            ))
            .await;
        assert!(r.starts_with("+OK Logged in, maildrop has 1 messages"), "{r}");
        assert!(c.cmd("QUIT").await.starts_with("+OK"));

        // Successful XOAUTH2 without an initial response.
        let mut c = connect(&f, Some(v.clone())).await;
        assert_eq!(c.cmd("AUTH XOAUTH2").await, "+ ");
        let r = c.cmd(&B64.encode(xoauth2_msg("alice@example.org", &idp.token("alice@example.org")))).await;
        assert!(r.starts_with("+OK Logged in"), "{r}");
        assert!(c.cmd("QUIT").await.starts_with("+OK"));
    }

    /// Every line of one bearer exchange: the first reply and, after an
    /// error challenge, the reply to the client's acknowledgement.
    async fn bearer_transcript(c: &mut Client<DuplexStream>, mech: &str, msg: Vec<u8>, ack: &[u8]) -> Vec<String> {
        let first = c.cmd(&format!("AUTH {mech} {}", B64.encode(msg))).await;
        if !first.starts_with("+ ") {
            return vec![first];
        }
        let ack = if ack.is_empty() { String::new() } else { B64.encode(ack) };
        vec![first, c.cmd(&ack).await]
    }

    #[tokio::test]
    async fn bearer_locked_disabled_or_expired_account_answers_like_an_invalid_token() {
        for how in super::refused::ALL {
            let f = Fixture::new("oauth-refused").await;
            let user = "alice@example.org";
            f.add_user(user).await;
            let idp = Idp::new(&f);
            let (ctx, _) = super::refused::context(&f, user, how).await;
            let mut ctx = Arc::into_inner(ctx).unwrap();
            ctx.oauth = Some(idp.validator());
            let mut c = f.connect_pop3(Arc::new(ctx), ListenerKind::StartTls);
            assert!(c.line().await.starts_with("+OK"));
            let (valid, invalid) = (idp.token(user), idp.expired(user));
            for authz in [None, Some(user)] {
                let right = bearer_transcript(&mut c, "OAUTHBEARER", oauthbearer_msg(authz, &valid), b"\x01").await;
                let wrong = bearer_transcript(&mut c, "OAUTHBEARER", oauthbearer_msg(authz, &invalid), b"\x01").await;
                assert_eq!(right, wrong, "{how:?}: OAUTHBEARER, authzid {authz:?}");
                assert!(right[1].starts_with("-ERR [AUTH] Authentication failed"), "{how:?}: {right:?}");
            }
            let right = bearer_transcript(&mut c, "XOAUTH2", xoauth2_msg(user, &valid), b"").await;
            let wrong = bearer_transcript(&mut c, "XOAUTH2", xoauth2_msg(user, &invalid), b"").await;
            assert_eq!(right, wrong, "{how:?}: XOAUTH2");
            assert_eq!(right.len(), 2, "{how:?}: error challenge, then -ERR: {right:?}");
        }
    }

    #[tokio::test]
    async fn bearer_abandoned_after_error_challenge_counts_as_failure() {
        use pop3connex_core::config::AbuseConfig;
        use pop3connex_core::security::{system_clock, Guard, SecurityState};
        let f = Fixture::new("oauth-abandon").await;
        f.add_user("alice@example.org").await;
        let idp = Idp::new(&f);
        let abuse = AbuseConfig { lockout_after_failures: 1, ban_after_auth_failures: 1000, ..AbuseConfig::default() };
        let guard = Arc::new(Guard::new(abuse, std::time::Duration::ZERO, system_clock()));
        let mut ctx =
            Arc::into_inner(f.pop3_ctx(Pop3Config { max_auth_failures: 10, ..Fixture::trusting_cfg() })).unwrap();
        ctx.oauth = Some(idp.validator());
        ctx.security = guard.clone();
        let mut c = f.connect_pop3(Arc::new(ctx), ListenerKind::StartTls);
        assert!(c.line().await.starts_with("+OK"));
        let msg = xoauth2_msg("alice@example.org", &idp.expired("alice@example.org"));
        assert!(c.cmd(&format!("AUTH XOAUTH2 {}", B64.encode(msg))).await.starts_with("+ "));
        assert!(c.cmd("*").await.starts_with("-ERR [AUTH]"));
        assert!(guard.account_locked("alice@example.org", "127.0.0.1".parse().unwrap()));
    }

    #[tokio::test]
    async fn not_offered_without_oauth_config() {
        let f = Fixture::new("oauth-off").await;
        f.add_user("alice@example.org").await;
        let idp = Idp::new(&f);
        let mut c = connect(&f, None).await;
        assert!(c.cmd("CAPA").await.starts_with("+OK"));
        let caps = c.body().await;
        assert!(!caps.iter().any(|l| l.contains("OAUTHBEARER") || l.contains("XOAUTH2")), "{caps:?}");
        let r = c
            .cmd(&format!("AUTH OAUTHBEARER {}", B64.encode(oauthbearer_msg(None, &idp.token("alice@example.org")))))
            .await;
        assert_eq!(r, "-ERR Unsupported authentication mechanism");
    }
}
