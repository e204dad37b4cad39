//! The admin plane end to end over real TLS: login with password and TOTP,
//! cookies and security headers, CSRF, step-up and its expiry, the admin
//! network restriction before TLS, service tokens (expiry, networks,
//! revocation, console refusal), every route's declared permission, HTTP/2,
//! body and header limits.

mod common;

use std::time::Duration;

use common::{start, Req, Server, ORIGIN, PASSWORD};
use pop3connex_core::admin::Actor;
use pop3connex_core::rbac::{Permission, PermissionSet};
use pop3connex_web::routes::{specs, Access, Surface};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECURITY_HEADERS: [(&str, &str); 6] = [
    ("strict-transport-security", "max-age=31536000"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("x-content-type-options", "nosniff"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cache-control", "no-store"),
];

fn assert_security_headers(a: &common::Answer, what: &str) {
    for (k, v) in SECURITY_HEADERS {
        assert_eq!(a.header(k), v, "{what}: {k}");
    }
    let csp = a.header("content-security-policy");
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
    assert!(!csp.contains("unsafe-inline"), "{what}: {csp}");
}

/// A service token for `perms`, created by superadmin `root`.
async fn token(s: &Server, perms: &PermissionSet, expires_in: u64, networks: &[&str]) -> String {
    let root = s.admin.admin_list(&cli()).await.unwrap().into_iter().find(|a| a.name == "root").unwrap();
    let principal = s.admin.principal_for_admin(root.id, "127.0.0.1".parse().unwrap()).await.unwrap();
    let nets: Vec<_> = networks.iter().map(|n| n.parse().unwrap()).collect();
    let expires = common::unix_now() + expires_in;
    let (_, t) = s.admin.token_create(&principal, "test", perms, expires, &nets).await.unwrap();
    t.to_string()
}

fn cli() -> Actor {
    Actor::Cli { os_user: Some("operator".into()) }
}

#[tokio::test(flavor = "multi_thread")]
async fn login_with_password_and_totp_sets_a_strict_cookie_and_headers_everywhere() {
    let s = start("login", "allow_networks = [\"127.0.0.0/8\"]", |_| {}).await;
    let (secret, _) = s.admin_with_totp("root", &["superadmin"]).await;

    // No oracle: unknown name, wrong password and a disabled admin get the
    // same answer.
    s.admin.admin_add(&cli(), "off", PASSWORD, &["auditor".into()]).await.unwrap();
    s.admin.admin_set_enabled(&cli(), "off", false).await.unwrap();
    let mut answers = Vec::new();
    for (name, pw) in [("nobody", PASSWORD), ("root", "wrong password here"), ("off", PASSWORD)] {
        let a = s.send(Req::new("POST", "/login").form(&[("name", name), ("password", pw)]).same_origin()).await;
        assert_eq!(a.status, 401, "{name}");
        assert!(a.session_cookie().is_none(), "{name}: no session");
        answers.push(a.text().replace(name, "NAME"));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "the three failures look alike");

    let a = s.send(Req::new("POST", "/login").form(&[("name", "root"), ("password", PASSWORD)]).same_origin()).await;
    assert_eq!(a.status, 303);
    let set = a.headers.get("set-cookie").unwrap().to_str().unwrap().to_owned();
    for flag in ["__Host-p3x_session=", "; Secure", "; HttpOnly", "; SameSite=Strict", "; Path=/"] {
        assert!(set.contains(flag), "{set}");
    }
    assert!(!set.contains("Domain="), "{set}");
    let pending = a.session_cookie().unwrap();
    // Half logged in: the console is closed, the MFA page open.
    let a = s.send(Req::new("GET", "/users").session(&pending)).await;
    assert_eq!((a.status, a.header("location")), (303, "/login/mfa"));
    let a = s.send(Req::new("POST", "/login/mfa").session(&pending).form(&[("code", "000000")])).await;
    assert_eq!(a.status, 401, "wrong code");

    let cookie = s.login("root", &secret).await;
    assert!(s.send(Req::new("GET", "/").session(&pending)).await.status == 303, "pre-MFA id is dead");
    let page = s.send(Req::new("GET", "/").session(&cookie)).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("id=\"page-dashboard\""));
    assert_security_headers(&page, "page");
    let api = s.send(Req::new("GET", "/api/v1/users").session(&cookie)).await;
    assert_eq!(api.status, 200);
    assert_security_headers(&api, "api");
    let missing = s.send(Req::new("GET", "/api/v1/nothing-here").session(&cookie)).await;
    assert_eq!(missing.status, 404);
    assert_security_headers(&missing, "404");
    assert_security_headers(&s.send(Req::new("GET", "/login")).await, "login page");
    let css = s.send(Req::new("GET", "/static/console.css")).await;
    assert_eq!(css.status, 200);
    assert!(css.header("cache-control").contains("max-age"), "static files are cacheable");

    // The cookie is bound to the address it was issued to.
    let elsewhere = s.send(Req::new("GET", "/").session(&cookie).tap_from("127.0.0.3")).await;
    assert_eq!(elsewhere.status, 303);
    assert_eq!(s.send(Req::new("GET", "/").session(&cookie)).await.status, 303, "a stolen cookie kills the session");

    // The audit log has the login, its failures and the MFA step.
    let records = s.admin.audit_log_read(&cli(), &audit_query()).await.unwrap();
    let has = |action: &str, outcome: &str| records.iter().any(|r| r.action == action && r.outcome == outcome);
    assert!(has("admin.login", "invalid") && has("admin.login", "refused") && has("admin.login", "password_ok"));
    assert!(has("admin.login.mfa", "failure") && has("admin.login.mfa", "totp"));
    assert!(records.iter().all(|r| !r.target.contains(PASSWORD) && !r.actor.contains(PASSWORD)));
}

fn audit_query() -> pop3connex_core::audit_log::AuditQuery {
    pop3connex_core::audit_log::AuditQuery {
        since: None,
        until: None,
        actor: None,
        action: None,
        limit: 1000,
        before_seq: None,
    }
}

trait From127 {
    fn tap_from(self, ip: &str) -> Self;
}
impl From127 for Req {
    fn tap_from(mut self, ip: &str) -> Req {
        self.from = Some(ip.parse().unwrap());
        self
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn csrf_refuses_cross_site_and_unmarked_state_changes_but_not_tokens() {
    let s = start("csrf", "allow_networks = [\"127.0.0.0/8\"]", |_| {}).await;
    let (secret, _) = s.admin_with_totp("root", &["superadmin"]).await;
    let cookie = s.login("root", &secret).await;
    let ban = serde_json::json!({ "network": "192.0.2.1" });
    let plain = |r: Req| r.header("cookie", &format!("__Host-p3x_session={cookie}"));
    for (what, req) in [
        ("no Sec-Fetch-Site, no Origin", plain(Req::new("POST", "/api/v1/bans").json(ban.clone()))),
        (
            "cross-site",
            plain(Req::new("POST", "/api/v1/bans").json(ban.clone())).header("sec-fetch-site", "cross-site"),
        ),
        ("same-site", plain(Req::new("POST", "/api/v1/bans").json(ban.clone())).header("sec-fetch-site", "same-site")),
        (
            "foreign Origin",
            plain(Req::new("POST", "/api/v1/bans").json(ban.clone())).header("origin", "https://evil.example"),
        ),
        ("login form without metadata", Req::new("POST", "/login").form(&[("name", "root"), ("password", PASSWORD)])),
    ] {
        let a = s.send(req).await;
        assert_eq!(a.status, 403, "{what}");
        assert_eq!(a.json()["error"], "csrf", "{what}");
        assert_security_headers(&a, what);
    }
    let a = s.send(plain(Req::new("POST", "/api/v1/bans").json(ban.clone())).header("origin", ORIGIN)).await;
    assert_eq!(a.status, 201, "our Origin without Fetch Metadata: {}", a.text());
    let a = s
        .send(Req::new("POST", "/api/v1/bans").session(&cookie).json(serde_json::json!({"network": "192.0.2.2"})))
        .await;
    assert_eq!(a.status, 201, "same-origin: {}", a.text());
    let t = token(&s, &[Permission::BansWrite].into_iter().collect(), 3600, &[]).await;
    let a = s.send(Req::new("POST", "/api/v1/bans").bearer(&t).json(serde_json::json!({"network": "192.0.2.3"}))).await;
    assert_eq!(a.status, 201, "a bearer token carries no ambient credential: {}", a.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn step_up_is_required_for_destructive_actions_and_expires() {
    let s = start("stepup", "", |c| c.admin.as_mut().unwrap().step_up_secs = 2).await;
    let (secret, codes) = s.admin_with_totp("root", &["superadmin"]).await;
    let cookie = s.login("root", &secret).await;
    let cli_actor = cli();
    let victim = pop3connex_core::types::UserName::parse("victim@example.org").unwrap();
    s.admin.add_user(&cli_actor, &victim, b"correct horse battery staple 2").await.unwrap();

    let del = || Req::new("DELETE", "/api/v1/users/victim@example.org");
    let a = s.send(del().session(&cookie)).await;
    assert_eq!((a.status, a.json()["error"].as_str()), (403, Some("step_up_required")));
    let a =
        s.send(Req::new("POST", "/users/victim@example.org/delete").session(&cookie).form(&[("confirm", "x")])).await;
    assert_eq!(a.status, 303);
    assert!(a.header("location").starts_with("/step-up?next=/users/victim"), "{}", a.header("location"));

    let a = s
        .send(Req::new("POST", "/step-up").session(&cookie).form(&[
            ("method", "recovery"),
            ("code", &codes[0]),
            ("next", "/users"),
        ]))
        .await;
    assert_eq!((a.status, a.header("location")), (303, "/users"), "{}", a.text());
    let elevated = a.session_cookie().expect("rotated at step-up");
    assert_ne!(elevated, cookie);
    assert_eq!(s.send(Req::new("GET", "/").session(&cookie)).await.status, 303, "old id dead");
    let a = s.send(Req::new("GET", "/").session(&elevated)).await;
    assert!(a.text().contains("elevated until"), "the badge shows the window");

    tokio::time::sleep(Duration::from_secs(3)).await;
    let a = s.send(del().session(&elevated)).await;
    assert_eq!(a.json()["error"], "step_up_required", "the window expired");
    let a = s
        .send(Req::new("POST", "/step-up").session(&elevated).form(&[
            ("method", "recovery"),
            ("code", &codes[0]),
            ("next", "/"),
        ]))
        .await;
    assert_eq!(a.status, 401, "a recovery code works once");
    let a = s
        .send(Req::new("POST", "/step-up").session(&elevated).form(&[
            ("method", "recovery"),
            ("code", &codes[1]),
            ("next", "//evil.example"),
        ]))
        .await;
    assert_eq!((a.status, a.header("location")), (303, "/"), "next never leaves the origin");
    let again = a.session_cookie().unwrap();
    let a = s.send(del().session(&again)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(s.admin.mail().store().user(&victim).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_outside_allow_networks_are_refused_before_tls() {
    let s = start("network", "allow_networks = [\"127.0.0.1/32\"]", |_| {}).await;
    assert_eq!(s.send(Req::new("GET", "/login")).await.status, 200, "127.0.0.1 is allowed");
    let refused = s.connect(false, Some("127.0.0.2".parse().unwrap())).await;
    assert!(refused.is_err(), "127.0.0.2 gets no TLS handshake");
    // Closed at once: a raw client reads end-of-file, no ServerHello.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut tcp = sock.connect(s.addr).await.unwrap();
    let _ = tcp.write_all(b"\x16\x03\x01\x00\x05hello").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "nothing is sent to a refused peer");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_expire_respect_networks_are_revocable_and_never_open_the_console() {
    let s = start("tokens", "", |_| {}).await;
    s.admin_with_totp("root", &["superadmin"]).await;
    let read: PermissionSet = [Permission::UsersRead].into_iter().collect();
    let t = token(&s, &read, 3600, &[]).await;
    let a = s.send(Req::new("GET", "/api/v1/users").bearer(&t)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let a = s.send(Req::new("GET", "/users").bearer(&t)).await;
    assert_eq!(a.status, 401, "a token never opens a console page");
    let a = s.send(Req::new("GET", "/api/v1/bans").bearer(&t)).await;
    assert_eq!((a.status, a.json()["error"].as_str()), (403, Some("forbidden")), "only its permissions");

    let far = token(&s, &read, 3600, &["10.0.0.0/8"]).await;
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").bearer(&far)).await.status, 401, "network restriction");

    let short = token(&s, &read, 2, &[]).await;
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").bearer(&short)).await.status, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").bearer(&short)).await.status, 401, "expired");

    let id = t.split('_').nth(1).unwrap().to_owned();
    s.admin.token_revoke(&cli(), &id).await.unwrap();
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").bearer(&t)).await.status, 401, "revoked");
    let forged = format!("{}x", t);
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").bearer(&forged)).await.status, 401);

    let records = s.admin.audit_log_read(&cli(), &audit_query()).await.unwrap();
    assert!(records.iter().any(|r| r.action == "token.use" && r.outcome == "ok"));
    assert!(records.iter().any(|r| r.action == "token.use" && r.outcome == "invalid"));
    assert!(records.iter().any(|r| r.action == "authz.denied"));
    assert!(records.iter().all(|r| !r.target.contains(&t[t.len() - 8..])), "no token secret in the log");
}

/// A concrete path for a route pattern.
fn concrete(path: &str) -> String {
    path.replace("{name}", "nobody@example.org").replace("{id}", "1")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_refuses_callers_without_its_permission() {
    // One role with each permission alone, one with all but it.
    let mut roles = String::new();
    for p in Permission::ALL {
        let all_but: Vec<String> =
            Permission::ALL.iter().filter(|q| *q != p).map(|q| format!("\"{}\"", q.as_str())).collect();
        let slug = p.as_str().replace('.', "-");
        roles.push_str(&format!("[admin.roles.only-{slug}]\npermissions = [\"{}\"]\n", p.as_str()));
        roles.push_str(&format!("[admin.roles.but-{slug}]\npermissions = [{}]\n", all_but.join(", ")));
    }
    let s = start("rbac", &roles, |_| {}).await;
    s.admin_with_totp("root", &["superadmin"]).await;
    let specs = specs();

    // The API, with tokens.
    for spec in specs.iter().filter(|r| r.surface == Surface::Api) {
        let Access::Perm(p) = spec.access else { continue };
        let lacking: PermissionSet = Permission::ALL.iter().copied().filter(|q| *q != p).collect();
        let holding: PermissionSet = [p].into_iter().collect();
        let path = concrete(spec.path);
        let body = serde_json::json!({});
        let t = token(&s, &lacking, 3600, &[]).await;
        let a =
            s.send(Req { method: method(&spec.method), ..Req::new("GET", &path) }.bearer(&t).json(body.clone())).await;
        assert_eq!(
            (a.status, a.json()["error"].as_str()),
            (403, Some("forbidden")),
            "{} {path} without {p:?}",
            spec.method
        );
        let t = token(&s, &holding, 3600, &[]).await;
        let a = s.send(Req { method: method(&spec.method), ..Req::new("GET", &path) }.bearer(&t).json(body)).await;
        assert!(
            !(a.status == 403 && a.json()["error"] == "forbidden"),
            "{} {path} with {p:?}: {}",
            spec.method,
            a.text()
        );
        assert_ne!(a.status, 401, "{} {path}", spec.method);
    }

    // Console pages and the API, with sessions.
    let mut sessions = std::collections::HashMap::new();
    for p in Permission::ALL {
        let slug = p.as_str().replace('.', "-");
        for kind in ["only", "but"] {
            let name = format!("{kind}-{slug}");
            let (secret, _) = s.admin_with_totp(&name, &[&name]).await;
            sessions.insert(name.clone(), s.login(&name, &secret).await);
        }
    }
    for spec in &specs {
        let path = concrete(spec.path);
        let req = || Req { method: method(&spec.method), ..Req::new("GET", &path) };
        match spec.access {
            Access::Perm(p) => {
                let slug = p.as_str().replace('.', "-");
                let a = s.send(req().session(&sessions[&format!("but-{slug}")]).form(&[])).await;
                assert_eq!(
                    (a.status, a.json()["error"].as_str()),
                    (403, Some("forbidden")),
                    "{} {path} with a session lacking {p:?}",
                    spec.method
                );
                // Holding it, the route may still want a step-up first
                // (403 step_up_required, or a redirect to /step-up): refused
                // for another reason, never for the permission.
                let a = s.send(req().session(&sessions[&format!("only-{slug}")]).form(&[])).await;
                assert!(
                    !(a.status == 403 && a.json()["error"] == "forbidden") && a.status != 401,
                    "{} {path} with a session holding {p:?}: {} {}",
                    spec.method,
                    a.status,
                    a.text()
                );
                if p.needs_step_up() {
                    let stepped =
                        a.json()["error"] == "step_up_required" || a.header("location").starts_with("/step-up");
                    assert!(stepped, "{} {path} needs a step-up: {} {}", spec.method, a.status, a.text());
                }
            }
            Access::Authenticated => {
                let a = s.send(req().same_origin().form(&[])).await;
                assert!(matches!(a.status, 303 | 401), "{} {path} without a session: {}", spec.method, a.status);
            }
            Access::Mfa | Access::Enrol | Access::Public => {}
        }
    }
    let records = s.admin.audit_log_read(&cli(), &audit_query()).await.unwrap();
    assert!(records.iter().filter(|r| r.action == "authz.denied").count() >= specs.len() / 2, "refusals are audited");
}

fn method(m: &hyper::Method) -> &'static str {
    match *m {
        hyper::Method::GET => "GET",
        hyper::Method::POST => "POST",
        hyper::Method::PUT => "PUT",
        hyper::Method::DELETE => "DELETE",
        _ => "PATCH",
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_oversize_bodies_and_slow_headers() {
    let s = start("limits", "", |_| {}).await;
    s.admin_with_totp("root", &["superadmin"]).await;
    let t = token(&s, &[Permission::UsersRead, Permission::UsersWrite].into_iter().collect(), 3600, &[]).await;
    let a = s.send(Req { h2: true, ..Req::new("GET", "/api/v1/users") }.bearer(&t)).await;
    assert_eq!((a.status, a.version), (200, hyper::Version::HTTP_2), "ALPN h2");
    assert_security_headers(&a, "h2");
    let a = s.send(Req::new("GET", "/api/v1/users").bearer(&t)).await;
    assert_eq!(a.version, hyper::Version::HTTP_11);

    // A declared body over the limit is refused from its head, before it is
    // read (sent raw: a client library still pushing the body may see the
    // connection close before it reads the answer).
    let mut tls = s.connect(false, None).await.unwrap();
    let head = format!(
        "POST /api/v1/users HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        2 * 1024 * 1024
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 413"), "{}", String::from_utf8_lossy(&buf[..n]));

    // A client that never finishes its request head is dropped.
    let mut tls = s.connect(false, None).await.unwrap();
    tls.write_all(b"GET /login HTTP/1.1\r\nHost: localhost\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "dropped before 20 s");
    assert!(started.elapsed() >= Duration::from_secs(5), "not before the header timeout");
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_needs_step_up_and_reaches_the_server() {
    let mut s = start("reload", "", |_| {}).await;
    let (secret, codes) = s.admin_with_totp("root", &["superadmin"]).await;
    let cookie = s.login("root", &secret).await;
    let a = s.send(Req::new("POST", "/api/v1/reload").session(&cookie)).await;
    assert_eq!(a.json()["error"], "step_up_required");
    let a = s
        .send(Req::new("POST", "/step-up").session(&cookie).form(&[
            ("method", "recovery"),
            ("code", &codes[0]),
            ("next", "/"),
        ]))
        .await;
    let cookie = a.session_cookie().unwrap();
    for path in ["/reload", "/api/v1/reload"] {
        for m in ["GET", "HEAD"] {
            let a = s.send(Req::new(m, path).session(&cookie)).await;
            assert_eq!(a.status, 405, "{m} {path} is not a way to reload");
        }
    }
    assert!(s.reloads.try_recv().is_err(), "no reload from a safe method");
    let a = s.send(Req::new("POST", "/api/v1/reload").session(&cookie)).await;
    assert_eq!(a.status, 202, "{}", a.text());
    assert!(s.reloads.try_recv().is_ok(), "the server got the reload request");
    let a = s.send(Req::new("GET", "/api/v1/config").session(&cookie)).await;
    assert_eq!(a.status, 200);
    assert!(a.text().contains("file:"), "secrets as references: {}", a.text());
    let logout = s.send(Req::new("POST", "/logout").session(&cookie)).await;
    assert_eq!(logout.status, 303);
    assert!(logout.header("set-cookie").contains("Max-Age=0"));
    assert_eq!(s.send(Req::new("GET", "/").session(&cookie)).await.status, 303, "logged out");
}

#[tokio::test(flavor = "multi_thread")]
async fn disabling_an_admin_ends_its_sessions_and_tokens() {
    let s = start("disable", "", |_| {}).await;
    s.admin_with_totp("root", &["superadmin"]).await;
    let (secret, _) = s.admin_with_totp("dora", &["superadmin"]).await;
    let cookie = s.login("dora", &secret).await;
    let t = token(&s, &[Permission::UsersRead].into_iter().collect(), 3600, &[]).await;
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").session(&cookie)).await.status, 200);
    let cli = cli();
    s.admin.admin_set_enabled(&cli, "dora", false).await.unwrap();
    assert_eq!(
        s.send(Req::new("GET", "/api/v1/users").session(&cookie)).await.status,
        401,
        "session of a disabled admin"
    );
    // Enabling again does not bring the session back: it is gone.
    s.admin.admin_set_enabled(&cli, "dora", true).await.unwrap();
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").session(&cookie)).await.status, 401, "the session was removed");
    // The token helper's creator is `root`; a disabled creator's token stops too.
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").bearer(&t)).await.status, 200);
    s.admin.admin_set_enabled(&cli, "root", false).await.unwrap();
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").bearer(&t)).await.status, 401, "token of a disabled creator");
}

#[tokio::test(flavor = "multi_thread")]
async fn events_api_searches_the_store_within_the_callers_domains() {
    use pop3connex_core::store::prelude::*;
    use pop3connex_core::store::StoredEvent;
    let roles =
        "[admin.roles.org-events]\npermissions = [\"events.read\", \"tokens.write\"]\ndomains = [\"example.org\"]\n";
    let s = start("events", roles, |_| {}).await;
    s.admin_with_totp("root", &["superadmin"]).await;
    s.admin_with_totp("orgadmin", &["org-events"]).await;
    let store = pop3connex_core::store::sqlite::SqliteStore::open(&s.dir.join("pop3connex.db")).unwrap();
    let ev = |time: i64, name: &str, user: Option<&str>, ip: &str| StoredEvent {
        seq: 0,
        time,
        code: 101,
        name: name.into(),
        severity: 4,
        user: user.map(Into::into),
        ip: Some(ip.into()),
        message: "<script>alert(1)</script>".into(),
        fields: r#"{"reason":"bad password"}"#.into(),
    };
    store
        .append_events(vec![
            ev(1_000, "auth_failure", Some("alice@example.org"), "192.0.2.7"),
            ev(2_000, "auth_failure", Some("bob@example.com"), "192.0.2.7"),
            ev(3_000, "ban", None, "192.0.2.7"),
        ])
        .await
        .unwrap();

    let all: PermissionSet = Permission::ALL.iter().copied().collect();
    let root = token(&s, &all, 600, &[]).await;
    let got = s.send(Req::new("GET", "/api/v1/events?ip=192.0.2.7&limit=10").bearer(&root)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let names: Vec<String> =
        got.json().as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().into()).collect();
    assert_eq!(names, ["ban", "auth_failure", "auth_failure"]);
    assert_eq!(got.json()[1]["fields"]["reason"], "bad password");
    assert_eq!(got.header("content-type"), "application/json", "data, never HTML");
    // The scheme is case-insensitive (RFC 9110); other schemes are refused.
    let lower = s.send(Req::new("GET", "/api/v1/events").header("authorization", &format!("bearer {root}"))).await;
    assert_eq!(lower.status, 200, "{}", lower.text());
    let basic = s.send(Req::new("GET", "/api/v1/events").header("authorization", "Basic cm9vdDpyb290")).await;
    assert_eq!((basic.status, basic.json()["message"].as_str()), (401, Some("only Authorization: Bearer is accepted")));
    let got = s.send(Req::new("GET", "/api/v1/events?type=auth_failure&user=bob@example.com").bearer(&root)).await;
    assert_eq!(got.json().as_array().unwrap().len(), 1);
    for bad in ["type=nope", "ip=not-an-ip", "user=%00", "since=abc", "extra=1"] {
        let got = s.send(Req::new("GET", &format!("/api/v1/events?{bad}")).bearer(&root)).await;
        assert_eq!(got.status, 400, "{bad}: {}", got.text());
    }

    // A domain-scoped administrator sees its domain's users only.
    let org = s.admin.admin_list(&cli()).await.unwrap().into_iter().find(|a| a.name == "orgadmin").unwrap();
    let principal = s.admin.principal_for_admin(org.id, "127.0.0.1".parse().unwrap()).await.unwrap();
    let perms: PermissionSet = [Permission::EventsRead].into_iter().collect();
    let (_, t) = s.admin.token_create(&principal, "org", &perms, common::unix_now() + 600, &[]).await.unwrap();
    let got = s.send(Req::new("GET", "/api/v1/events").bearer(&t)).await;
    let users: Vec<String> =
        got.json().as_array().unwrap().iter().map(|e| e["user"].as_str().unwrap_or("-").to_owned()).collect();
    assert_eq!(users, ["alice@example.org"]);
    // Every search is in the audit log.
    let query = pop3connex_core::admin::AuditQuery { limit: 100, ..Default::default() };
    let audit = s.admin.audit_log_read(&cli(), &query).await.unwrap();
    assert!(audit.iter().any(|r| r.action == "events.read" && r.target.contains("ip=192.0.2.7")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_password_change_or_mfa_reset_ends_the_admins_sessions() {
    let s = start("rebind", "", |_| {}).await;
    let cli = cli();
    let (secret, _) = s.admin_with_totp("mona", &["superadmin"]).await;
    let (other, _) = s.admin_with_totp("otto", &["superadmin"]).await;
    let mona = s.login("mona", &secret).await;
    let otto = s.login("otto", &other).await;
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").session(&mona)).await.status, 200);
    // A password change (here as the CLI does it, from another process's view) ends it.
    s.admin.admin_set_password(&cli, "mona", "a brand new long passphrase 42").await.unwrap();
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").session(&mona)).await.status, 401, "after the password change");
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").session(&otto)).await.status, 200, "others keep theirs");
    // An MFA reset ends the sessions that had passed a second factor.
    s.admin.admin_reset_mfa(&cli, "otto").await.unwrap();
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").session(&otto)).await.status, 401, "after the MFA reset");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_domain_limited_admin_sees_its_domain_in_the_audit_log_and_revokes_only_its_own_tokens() {
    let roles = "[admin.roles.helpdesk]\npermissions = [\"users.read\", \"users.write\", \"audit.read\", \
                 \"tokens.write\", \"admins.read\"]\ndomains = [\"example.org\"]\n";
    let s = start("scoped", roles, |_| {}).await;
    s.admin_with_totp("root", &["superadmin"]).await;
    s.admin_with_totp("carol", &["helpdesk"]).await;
    let cli = cli();
    for u in ["bob@example.org", "eve@other.org"] {
        s.admin
            .add_user(&cli, &pop3connex_core::types::UserName::parse(u).unwrap(), PASSWORD.as_bytes())
            .await
            .unwrap();
    }
    let all: PermissionSet = Permission::ALL.iter().copied().collect();
    let root_token = token(&s, &all, 600, &[]).await;
    let root_id = root_token.split('_').nth(1).unwrap().to_owned();
    let carol = s.admin.admin_list(&cli).await.unwrap().into_iter().find(|a| a.name == "carol").unwrap();
    let principal = s.admin.principal_for_admin(carol.id, "127.0.0.1".parse().unwrap()).await.unwrap();
    let perms: PermissionSet = [Permission::AuditRead, Permission::TokensWrite].into_iter().collect();
    let (own, carol_token) =
        s.admin.token_create(&principal, "mine", &perms, common::unix_now() + 600, &[]).await.unwrap();
    let carol_token = carol_token.to_string();

    let got = s.send(Req::new("GET", "/api/v1/audit?limit=1000").bearer(&carol_token)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let targets: Vec<String> =
        got.json().as_array().unwrap().iter().map(|r| r["target"].as_str().unwrap().to_owned()).collect();
    assert!(targets.iter().any(|t| t == "bob@example.org"), "{targets:?}");
    assert!(!targets.iter().any(|t| t.contains("other.org")), "another domain's user: {targets:?}");
    assert!(!targets.iter().any(|t| t == "root"), "another administrator: {targets:?}");
    let everything = s.send(Req::new("GET", "/api/v1/audit?limit=1000").bearer(&root_token)).await;
    assert!(everything.json().as_array().unwrap().iter().any(|r| r["target"] == "eve@other.org"));

    // Someone else's token: refused (and audited); its own: revoked.
    let got = s.send(Req::new("DELETE", &format!("/api/v1/tokens/{root_id}")).bearer(&carol_token)).await;
    assert_eq!(got.status, 403, "{}", got.text());
    assert_eq!(s.send(Req::new("GET", "/api/v1/users").bearer(&root_token)).await.status, 200, "still valid");
    let got = s.send(Req::new("DELETE", &format!("/api/v1/tokens/{}", own.id)).bearer(&carol_token)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    // A superadmin may revoke anyone's.
    let (other, _) = s.admin.token_create(&principal, "second", &perms, common::unix_now() + 600, &[]).await.unwrap();
    let got = s.send(Req::new("DELETE", &format!("/api/v1/tokens/{}", other.id)).bearer(&root_token)).await;
    assert_eq!(got.status, 200, "{}", got.text());
}
