//! MTA-STS (RFC 8461) policy discovery, fetching and caching.
//!
//! Discovery: the TXT RRset at `_mta-sts.<domain>` must contain exactly one
//! record starting with `v=STSv1` (section 3.1); its `id` says when a cached
//! policy is stale. The policy is fetched from
//! `https://mta-sts.<domain>/.well-known/mta-sts.txt` and cached until its
//! `max_age` runs out (section 5.1); a failed refresh keeps using an
//! unexpired cached policy.
//!
//! The HTTPS GET goes through the shared client ([`crate::https`]): the
//! policy host is resolved with the connector's own (DNSSEC-validating,
//! configurable) [`Resolver`] and the connection is pinned to that address
//! ([`HttpsClient::get_pinned`]) while the certificate is verified for
//! `mta-sts.<domain>` (system roots or `mta_sts_ca_file`). The exchange is
//! fully bounded: status 200 only (redirects are errors, section 3.3),
//! `Content-Type: text/plain`, at most 64 KiB of body, 10 seconds in all;
//! a body cut short is a (temporary) transfer failure.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::dns::{check_name, DnsError, Resolver};
use crate::config::connector::DnsConfig;
use crate::https::{load_ca_file, CaFileError, DefaultRoots, HttpsClient, HttpsError, HttpsOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// `mx:` patterns (`mail.example.com`, `*.example.net`).
    pub mx: Vec<String>,
    pub max_age: u64,
}

/// Largest `max_age` allowed (one year, section 3.2).
pub const MAX_AGE_LIMIT: u64 = 31_557_600;
/// Largest policy body fetched.
pub const MAX_POLICY_SIZE: usize = 64 * 1024;
/// Time allowed for one policy fetch, connection to last byte.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Domains whose policies are remembered before expired entries are swept.
const MAX_CACHED: usize = 10_000;

impl Policy {
    /// Whether an MX host name matches one of the policy's patterns
    /// (section 4.1): exact, case-insensitive, or `*.suffix` matching exactly
    /// one left-most label.
    pub fn mx_matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        if host.is_empty() {
            return false;
        }
        self.mx.iter().any(|pattern| {
            let pattern = pattern.to_ascii_lowercase();
            match pattern.strip_prefix("*.") {
                Some(suffix) => host.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
                None => host == pattern,
            }
        })
    }

    /// Parses a policy body (section 3.2). Unknown fields are ignored; for
    /// fields other than `mx` only the first occurrence counts.
    pub fn parse(text: &str) -> Result<Policy, MtaStsError> {
        let bad = |m: String| MtaStsError::Invalid(m);
        if text.len() > MAX_POLICY_SIZE {
            return Err(bad(format!("policy larger than {MAX_POLICY_SIZE} octets")));
        }
        let (mut version, mut mode, mut max_age) = (None, None, None);
        let mut mx = Vec::new();
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            let (key, value) =
                line.split_once(':').ok_or_else(|| bad(format!("line without ':': `{}`", line.escape_debug())))?;
            let value = value.trim_matches([' ', '\t']);
            match key {
                "version" => {
                    version.get_or_insert(value);
                }
                "mode" => {
                    mode.get_or_insert(value);
                }
                "max_age" => {
                    max_age.get_or_insert(value);
                }
                "mx" => mx.push(value),
                k if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') => {}
                k => return Err(bad(format!("malformed field name `{}`", k.escape_debug()))),
            }
        }
        if version != Some("STSv1") {
            return Err(bad(format!("version must be STSv1, got {:?}", version.unwrap_or(""))));
        }
        let mode = match mode {
            Some("enforce") => Mode::Enforce,
            Some("testing") => Mode::Testing,
            Some("none") => Mode::None,
            other => return Err(bad(format!("mode must be enforce, testing or none, got {:?}", other.unwrap_or("")))),
        };
        let max_age = max_age.ok_or_else(|| bad("max_age is missing".into()))?;
        if max_age.is_empty() || max_age.len() > 10 || !max_age.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!("max_age `{}` is not 1 to 10 digits", max_age.escape_debug())));
        }
        let max_age: u64 = max_age.parse().map_err(|_| bad("max_age is not a number".into()))?;
        if max_age > MAX_AGE_LIMIT {
            return Err(bad(format!("max_age {max_age} exceeds {MAX_AGE_LIMIT}")));
        }
        let mut patterns = Vec::with_capacity(mx.len());
        for p in mx {
            let rest = p.strip_prefix("*.").unwrap_or(p);
            check_name(rest, false)
                .map_err(|_| bad(format!("mx pattern `{}` is not a host name", p.escape_debug())))?;
            patterns.push(p.to_ascii_lowercase());
        }
        if patterns.is_empty() && mode != Mode::None {
            return Err(bad("no mx patterns".into()));
        }
        Ok(Policy { mode, mx: patterns, max_age })
    }
}

/// The `id` of the single `v=STSv1` record among a domain's `_mta-sts` TXT
/// records (section 3.1): `Ok(None)` when there is none, an error when
/// there are several or the one is malformed.
pub fn sts_record_id(records: &[String]) -> Result<Option<String>, MtaStsError> {
    let sts: Vec<&String> = records.iter().filter(|r| r.starts_with("v=STSv1")).collect();
    match sts.as_slice() {
        [] => Ok(None),
        [one] => parse_sts_record(one).map(Some),
        _ => Err(MtaStsError::Invalid(format!("{} v=STSv1 TXT records (exactly one is allowed)", sts.len()))),
    }
}

/// Parses `v=STSv1; id=<1-32 letters and digits>[; ext=value]...`.
pub fn parse_sts_record(record: &str) -> Result<String, MtaStsError> {
    let bad = |m: &str| MtaStsError::Invalid(format!("TXT record `{}`: {m}", record.escape_debug()));
    let mut fields = record.split(';').map(|f| f.trim_matches([' ', '\t']));
    if fields.next() != Some("v=STSv1") {
        return Err(bad("must start with v=STSv1"));
    }
    let mut id = None;
    for field in fields {
        if field.is_empty() {
            continue;
        }
        let (key, value) = field.split_once('=').ok_or_else(|| bad("field without '='"))?;
        if key.is_empty()
            || key.len() > 32
            || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return Err(bad("malformed field name"));
        }
        if key == "id" && id.is_none() {
            if value.is_empty() || value.len() > 32 || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(bad("id must be 1 to 32 letters and digits"));
            }
            id = Some(value.to_owned());
        } else if !value.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'=' && b != b';') {
            return Err(bad("malformed field value"));
        }
    }
    id.ok_or_else(|| bad("no id"))
}

#[derive(Debug, thiserror::Error)]
pub enum MtaStsError {
    #[error("MTA-STS policy unavailable: {0}")]
    Temporary(String),
    #[error("invalid MTA-STS policy: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone)]
struct Cached {
    id: String,
    policy: Policy,
    expires: Instant,
}

/// Looks up and caches MTA-STS policies.
pub struct PolicyCache {
    port: u16,
    /// The client trusting `mta_sts_ca_file` or the system roots; the error
    /// (an unusable CA file) is reported at each fetch.
    https: Result<HttpsClient, String>,
    cache: Mutex<HashMap<String, Cached>>,
}

impl PolicyCache {
    pub fn new(cfg: &DnsConfig) -> Self {
        let ca = match cfg.mta_sts_ca_file.as_deref() {
            None => Ok(None),
            Some(path) => load_ca_file(path).map(Some).map_err(|e| {
                let detail = match e {
                    CaFileError::Unreadable(m) => m,
                    CaFileError::Empty => "no certificates in file".to_owned(),
                };
                format!("cannot read CA bundle {}: {detail}", path.display())
            }),
        };
        let https = ca.map(|ca| {
            HttpsClient::new(&HttpsOptions {
                connect_timeout: FETCH_TIMEOUT,
                total_timeout: FETCH_TIMEOUT,
                ca,
                default_roots: DefaultRoots::System,
                status_as_error: false,
            })
        });
        PolicyCache { port: cfg.mta_sts_port, https, cache: Mutex::new(HashMap::new()) }
    }

    fn cached(&self, domain: &str) -> Option<Cached> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(domain).filter(|c| c.expires > Instant::now()).cloned()
    }

    fn store(&self, domain: &str, id: String, policy: &Policy) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            let now = Instant::now();
            cache.retain(|_, c| c.expires > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        let expires = Instant::now() + Duration::from_secs(policy.max_age);
        cache.insert(domain.to_owned(), Cached { id, policy: policy.clone(), expires });
    }

    /// The domain's policy: `None` when it publishes none. A policy that
    /// cannot be discovered or fetched is `Temporary` unless an unexpired
    /// copy is cached (RFC 8461 section 3.3 lets senders then deliver as if
    /// there were no policy; that choice is the caller's).
    pub async fn policy(&self, resolver: &Resolver, domain: &str) -> Result<Option<Policy>, MtaStsError> {
        let domain = check_name(domain, false).map_err(|e| MtaStsError::Invalid(e.to_string()))?;
        let id = match resolver.txt(&format!("_mta-sts.{domain}")).await {
            Ok((_, records)) => sts_record_id(&records),
            Err(DnsError::NotFound(_)) => Ok(None),
            Err(e) => Err(MtaStsError::Temporary(e.to_string())),
        };
        let id = match next_step(id, self.cached(&domain)) {
            Step::Use(policy) => return Ok(policy),
            Step::Fail(e) => return Err(e),
            Step::Fetch(id) => id,
        };
        match self.fetch(resolver, &domain).await {
            Ok(policy) => {
                self.store(&domain, id, &policy);
                Ok(Some(policy))
            }
            Err(e) => match self.cached(&domain) {
                Some(c) => {
                    tracing::warn!(%domain, error = %e, "MTA-STS policy refresh failed; using the cached policy");
                    Ok(Some(c.policy))
                }
                None => Err(e),
            },
        }
    }

    async fn fetch(&self, resolver: &Resolver, domain: &str) -> Result<Policy, MtaStsError> {
        let tmp = |m: String| MtaStsError::Temporary(m);
        let https = self.https.as_ref().map_err(|e| tmp(format!("TLS configuration: {e}")))?;
        let host = format!("mta-sts.{domain}");
        let body = tokio::time::timeout(FETCH_TIMEOUT, async {
            let (_, addrs) = resolver.addresses(&host).await.map_err(|e| tmp(e.to_string()))?;
            let mut last = tmp(format!("{host}: no addresses"));
            for ip in addrs {
                match fetch_from(https, &host, SocketAddr::new(ip, self.port)).await {
                    Ok(body) => return Ok(body),
                    // A reachable server that answered wrongly is final.
                    Err(e @ MtaStsError::Invalid(_)) => return Err(e),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
        .await
        .map_err(|_| tmp(format!("fetching the policy from {host} took longer than {FETCH_TIMEOUT:?}")))??;
        Policy::parse(&body)
    }
}

enum Step {
    /// The answer, without fetching.
    Use(Option<Policy>),
    Fail(MtaStsError),
    /// Fetch the policy with this id.
    Fetch(String),
}

/// What to do with the TXT lookup's outcome and the unexpired cached
/// policy, if any (section 5.1).
fn next_step(id: Result<Option<String>, MtaStsError>, cached: Option<Cached>) -> Step {
    match (id, cached) {
        // Same id: the cached policy is current.
        (Ok(Some(id)), Some(c)) if c.id == id => Step::Use(Some(c.policy)),
        (Ok(Some(id)), _) => Step::Fetch(id),
        // No (valid) record now: an unexpired policy stays in force until
        // max_age (removal is done by publishing mode none, section 8.3).
        (Ok(None) | Err(_), Some(c)) => Step::Use(Some(c.policy)),
        (Ok(None), None) => Step::Use(None),
        (Err(e), None) => Step::Fail(e),
    }
}

/// One bounded HTTPS GET of the policy from `addr`, verified for `host`.
async fn fetch_from(https: &HttpsClient, host: &str, addr: SocketAddr) -> Result<String, MtaStsError> {
    let tmp = |m: String| MtaStsError::Temporary(format!("{host} ({addr}): {m}"));
    let authority = if addr.port() == 443 { host.to_owned() } else { format!("{host}:{}", addr.port()) };
    let url = format!("https://{authority}/.well-known/mta-sts.txt");
    let response = match https.get_pinned(&url, &[addr], "text/plain", MAX_POLICY_SIZE as u64).await {
        Ok(r) => r,
        Err(HttpsError::TooLarge(_)) => {
            return Err(MtaStsError::Invalid(format!("{host}: policy larger than {MAX_POLICY_SIZE} octets")))
        }
        Err(HttpsError::Request(m) | HttpsError::Body(m) | HttpsError::Task(m)) => return Err(tmp(m)),
    };
    check_response(response.status, response.content_type.as_deref(), &response.body).map_err(|e| match e {
        MtaStsError::Invalid(m) => MtaStsError::Invalid(format!("{host}: {m}")),
        MtaStsError::Temporary(m) => tmp(m),
    })
}

/// Checks a response's status, media type and body and returns the body
/// (section 3.3).
fn check_response(status: u16, content_type: Option<&str>, body: &[u8]) -> Result<String, MtaStsError> {
    let bad = |m: String| MtaStsError::Invalid(m);
    if status != 200 {
        return Err(bad(format!("HTTP status {status} (redirects are not followed)")));
    }
    let media = content_type.map(|c| c.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
    if media.as_deref() != Some("text/plain") {
        return Err(bad(format!("Content-Type is {:?}, not text/plain", content_type.unwrap_or_default())));
    }
    if body.len() > MAX_POLICY_SIZE {
        return Err(bad(format!("policy larger than {MAX_POLICY_SIZE} octets")));
    }
    String::from_utf8(body.to_vec()).map_err(|_| bad("policy is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n\
                        mx: backupmx.example.com\r\nmax_age: 604800\r\n";

    /// Largest response header block the transcript front end accepts.
    const MAX_HEADER_SIZE: usize = 8 * 1024;

    /// A raw HTTP/1.x front end to [`check_response`], as the fetch had
    /// before it went through [`crate::https`] (which now does the framing,
    /// Content-Length and close_notify checks): it keeps the transcript
    /// tests below pinning the status, media type and size rules.
    fn parse_response(buf: &[u8], clean_eof: bool) -> Result<String, MtaStsError> {
        let bad = |m: String| MtaStsError::Invalid(m);
        let end = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| MtaStsError::Temporary("incomplete HTTP response header".into()))?;
        if end > MAX_HEADER_SIZE {
            return Err(bad("HTTP response header too large".into()));
        }
        let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("HTTP response header is not text".into()))?;
        let body = &buf[end + 4..];
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or_default();
        let mut parts = status.splitn(3, ' ');
        let (proto, code) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        if !proto.starts_with("HTTP/1.") {
            return Err(bad(format!("not an HTTP/1 response: `{}`", status.escape_debug())));
        }
        let (mut content_type, mut content_length) = (None, None);
        for line in lines {
            let (name, value) = line.split_once(':').ok_or_else(|| bad("malformed HTTP header line".into()))?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-type") {
                content_type = Some(value.to_owned());
            } else if name.eq_ignore_ascii_case("content-length") {
                let n: usize = value.parse().map_err(|_| bad("malformed Content-Length".into()))?;
                if content_length.is_some_and(|m| m != n) {
                    return Err(bad("conflicting Content-Length headers".into()));
                }
                content_length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(bad("Transfer-Encoding in a response to HTTP/1.0".into()));
            }
        }
        let policy = check_response(code.parse().unwrap_or(0), content_type.as_deref(), body)?;
        match content_length {
            Some(n) if n != body.len() => Err(MtaStsError::Temporary(format!("body has {} of {n} octets", body.len()))),
            None if !clean_eof => Err(MtaStsError::Temporary("connection closed without TLS close_notify".into())),
            _ => Ok(policy),
        }
    }

    #[test]
    fn parses_good_policies() {
        let p = Policy::parse(GOOD).unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx, ["mail.example.com", "*.example.net", "backupmx.example.com"]);
        assert_eq!(p.max_age, 604800);
        // LF line ends, blanks after ':', unknown fields, first occurrence wins.
        let p = Policy::parse(
            "version:STSv1\nmode:  testing\nmax_age: 86400\nmx: MX.Example.org\n\
                               mode: none\nfuture_ext: whatever\n",
        )
        .unwrap();
        assert_eq!((p.mode, p.max_age, p.mx.as_slice()), (Mode::Testing, 86400, &["mx.example.org".to_owned()][..]));
        // Mode none needs no mx.
        let p = Policy::parse("version: STSv1\nmode: none\nmax_age: 31557600").unwrap();
        assert_eq!((p.mode, p.mx.len(), p.max_age), (Mode::None, 0, MAX_AGE_LIMIT));
    }

    #[test]
    fn refuses_bad_policies() {
        for (text, needle) in [
            ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
            ("mode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
            ("version: STSv1\nmode: enforce\nmax_age: 86400\n", "no mx"),
            ("version: STSv1\nmode: testing\nmax_age: 86400\n", "no mx"),
            ("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", "mode"),
            ("version: STSv1\nmode: enforce\nmx: a.example\n", "max_age is missing"),
            ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n", "exceeds"),
            ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n", "digits"),
            ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -5\n", "digits"),
            ("version: STSv1\nmode: enforce\nmx: a b.example\nmax_age: 1\n", "mx pattern"),
            ("version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n", "mx pattern"),
            ("version: STSv1\nmode enforce\nmx: a.example\nmax_age: 1\n", "without ':'"),
        ] {
            let e = Policy::parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
        let long = format!("{GOOD}{}", "x: y\n".repeat(MAX_POLICY_SIZE / 5 + 1));
        assert!(Policy::parse(&long).unwrap_err().to_string().contains("larger than"));
    }

    #[test]
    fn mx_patterns_match_per_section_4_1() {
        let p = Policy::parse(GOOD).unwrap();
        for host in ["mail.example.com", "MAIL.example.com.", "mx1.example.net", "backupmx.example.com"] {
            assert!(p.mx_matches(host), "{host}");
        }
        for host in ["example.net", "a.b.example.net", ".example.net", "mail.example.com.evil", "example.com", ""] {
            assert!(!p.mx_matches(host), "{host}");
        }
    }

    #[test]
    fn txt_records() {
        let id = |rs: &[&str]| sts_record_id(&rs.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(id(&["v=STSv1; id=20160831085700Z;"]).unwrap().as_deref(), Some("20160831085700Z"));
        assert_eq!(id(&["v=spf1 -all", "v=STSv1;id=abc"]).unwrap().as_deref(), Some("abc"));
        assert_eq!(id(&["v=STSv1; id=abc; ext=1"]).unwrap().as_deref(), Some("abc"));
        assert_eq!(id(&[]).unwrap(), None);
        assert_eq!(id(&["v=spf1 -all"]).unwrap(), None);
        assert!(id(&["v=STSv1; id=a", "v=STSv1; id=b"]).is_err());
        for bad in [
            "v=STSv1",
            "v=STSv1; id=",
            "v=STSv1; id=a-b",
            "v=STSv1; id=a b",
            "v=STSv10; id=a",
            &format!("v=STSv1; id={}", "a".repeat(33)),
        ] {
            assert!(parse_sts_record(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cache_decisions_follow_section_5_1() {
        let policy = Policy::parse(GOOD).unwrap();
        let cached = || Some(Cached { id: "a1".into(), policy: policy.clone(), expires: Instant::now() });
        let tmp = || Err(MtaStsError::Temporary("SERVFAIL".into()));
        assert!(matches!(next_step(Ok(Some("a1".into())), cached()), Step::Use(Some(p)) if p == policy));
        assert!(matches!(next_step(Ok(Some("b2".into())), cached()), Step::Fetch(id) if id == "b2"));
        assert!(matches!(next_step(Ok(Some("b2".into())), None), Step::Fetch(id) if id == "b2"));
        assert!(matches!(next_step(Ok(None), cached()), Step::Use(Some(_))));
        assert!(matches!(next_step(tmp(), cached()), Step::Use(Some(_))));
        assert!(matches!(next_step(Ok(None), None), Step::Use(None)));
        assert!(matches!(next_step(tmp(), None), Step::Fail(_)));
    }

    #[test]
    fn cached_policies_expire_after_max_age() {
        let cache = PolicyCache::new(&DnsConfig::default());
        let mut p = Policy::parse(GOOD).unwrap();
        cache.store("example.com", "a1".into(), &p);
        assert_eq!(cache.cached("example.com").map(|c| c.id), Some("a1".to_owned()));
        assert!(cache.cached("example.org").is_none());
        p.max_age = 0;
        cache.store("example.com", "a2".into(), &p);
        assert!(cache.cached("example.com").is_none());
    }

    #[test]
    fn http_responses() {
        let ok = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_response(ok, true).unwrap(), "hello");
        // Without close_notify the Content-Length must vouch for completeness.
        assert_eq!(parse_response(ok, false).unwrap(), "hello");
        let no_len = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello";
        assert!(parse_response(no_len, true).is_ok());
        assert!(matches!(parse_response(no_len, false), Err(MtaStsError::Temporary(_))));
        let short = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nhello";
        assert!(matches!(parse_response(short, true), Err(MtaStsError::Temporary(_))));
        for bad in [
            &b"HTTP/1.0 301 Moved\r\nLocation: https://evil.example/\r\nContent-Type: text/plain\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\nhello",
            b"HTTP/1.0 200 OK\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"SMTP 200 OK\r\nContent-Type: text/plain\r\n\r\nhello",
        ] {
            assert!(
                matches!(parse_response(bad, true), Err(MtaStsError::Invalid(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
