//! What every request handler shares: the admin service, the settings from
//! `[admin]`, the sessions, the login failure counters and the abuse guard.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use pop3connex_core::admin::{Actor, Admin};
use pop3connex_core::audit_log::AuditDetails;
use pop3connex_core::config::Config;
use pop3connex_core::limits::LruMap;
use pop3connex_core::rbac::Roles;
use pop3connex_core::secret::SecretRef;
use pop3connex_core::security::{Guard, SecurityState};
use pop3connex_core::types::unix_now;

use crate::error::ApiError;
use crate::session::Sessions;

/// The `[admin]` settings the web layer uses, read once at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Vec<SocketAddr>,
    pub allow_networks: Vec<IpNet>,
    pub trusted_proxies: Vec<IpNet>,
    pub public_origin: String,
    pub certificate: PathBuf,
    pub private_key: SecretRef,
    pub session_idle_secs: u64,
    pub session_absolute_secs: u64,
    pub step_up_secs: u64,
    pub login_failures_before_ban: u64,
    /// The abuse window the login failures are counted in.
    pub window_secs: u64,
}

/// Login failures kept per address and per admin name (LRU beyond).
const MAX_COUNTERS: usize = 10_000;
/// A failed-login burst alert is raised when one address reaches this many
/// failures within the window (before the ban threshold).
const BURST_ALERT_FAILURES: u64 = 5;
/// Upper bound on the delay before a failed login is answered.
const MAX_LOGIN_DELAY: Duration = Duration::from_secs(8);

pub struct AppState {
    pub admin: Arc<Admin>,
    pub cfg: Arc<Config>,
    pub settings: Settings,
    pub sessions: Sessions,
    pub guard: Arc<Guard>,
    pub roles: Roles,
    /// Asks the server to re-read what SIGHUP re-reads.
    pub reload: Option<tokio::sync::mpsc::Sender<()>>,
    failures: Mutex<Failures>,
}

struct Failures {
    by_address: LruMap<IpAddr, (u64, u64)>,
    by_name: LruMap<String, (u64, u64)>,
}

impl AppState {
    pub fn new(
        admin: Arc<Admin>,
        cfg: Arc<Config>,
        settings: Settings,
        guard: Arc<Guard>,
        roles: Roles,
        reload: Option<tokio::sync::mpsc::Sender<()>>,
    ) -> AppState {
        AppState {
            admin,
            cfg,
            sessions: Sessions::new(settings.session_idle_secs, settings.session_absolute_secs),
            settings,
            guard,
            roles,
            reload,
            failures: Mutex::new(Failures {
                by_address: LruMap::new(MAX_COUNTERS),
                by_name: LruMap::new(MAX_COUNTERS),
            }),
        }
    }

    /// Counts a failed login or second-factor check from `ip` for `name`
    /// and returns how long to wait before answering. The wait grows with
    /// the failures of the address and of the name, whether the name exists
    /// or not (no oracle); the address is banned through the abuse guard at
    /// `login_failures_before_ban`. Never a lockout of the admin: that
    /// would let anyone lock an administrator out, and reveal the name.
    pub fn login_failed(&self, ip: IpAddr, name: &str) -> Duration {
        let now = unix_now() as u64;
        let window = self.settings.window_secs;
        let outcome = self.guard.record_auth_failure(ip, None);
        let (by_address, by_name) = {
            let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            let a = hit(&mut f.by_address, ip, now, window);
            let n = hit(&mut f.by_name, name.to_ascii_lowercase(), now, window);
            (a, n)
        };
        if by_address == BURST_ALERT_FAILURES {
            tracing::warn!(alert = true, event = "admin_login_burst", peer = %ip, failures = by_address, "failed admin login burst");
        }
        if by_address >= self.settings.login_failures_before_ban {
            self.guard.ban_address(ip, "admin login failures");
        }
        let factor = 1u32 << by_address.max(by_name).saturating_sub(1).min(6);
        outcome.delay.max(Duration::from_millis(250).saturating_mul(factor)).min(MAX_LOGIN_DELAY)
    }

    /// Whether `ip` is banned now (a ban set during this connection).
    pub fn banned(&self, ip: IpAddr) -> bool {
        self.guard.check_connection(ip).is_some()
    }

    /// Writes one audit event; an error refuses the request (fail closed).
    pub async fn audit(
        &self,
        actor: &Actor,
        op: &str,
        target: &str,
        outcome: &str,
        source: IpAddr,
    ) -> Result<(), ApiError> {
        let details = AuditDetails { source: Some(source), before: None, after: None };
        self.admin.audit_event(actor, op, target, outcome, details).await.map_err(|e| {
            tracing::error!(error = %e, op, "audit record not written; request refused");
            ApiError::internal()
        })
    }
}

fn hit<K: std::hash::Hash + Eq + Clone>(map: &mut LruMap<K, (u64, u64)>, key: K, now: u64, window: u64) -> u64 {
    match map.get_mut(&key) {
        Some((start, count)) if now.saturating_sub(*start) < window => {
            *count += 1;
            *count
        }
        _ => {
            map.insert(key, (now, 1));
            1
        }
    }
}

/// The client address of a request: the TCP peer, or, when the peer is a
/// trusted proxy, the rightmost `X-Forwarded-For` hop that is not a trusted
/// proxy itself (hops left of it could be forged by the client). Never the
/// header otherwise.
pub fn client_address(peer: IpAddr, headers: &axum::http::HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        let Ok(v) = v.to_str() else { return peer };
        for hop in v.split(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(ip.to_canonical()),
                // A malformed list cannot be trusted at all.
                Err(_) => return peer,
            }
        }
    }
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        client = hop;
        if !is_trusted(&hop) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::client_address;
    use axum::http::{HeaderMap, HeaderValue};

    #[test]
    fn forwarded_for_only_from_trusted_proxies_rightmost_untrusted_hop() {
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.9, 192.0.2.7, 10.1.1.1"));
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(client_address(ip("10.0.0.1"), &h, &trusted), ip("192.0.2.7"), "spoofed left hop ignored");
        assert_eq!(
            client_address(ip("203.0.113.5"), &h, &trusted),
            ip("203.0.113.5"),
            "untrusted peer: header ignored"
        );
        assert_eq!(client_address(ip("10.0.0.1"), &HeaderMap::new(), &trusted), ip("10.0.0.1"));
        h.insert("x-forwarded-for", HeaderValue::from_static("garbage, 192.0.2.7"));
        assert_eq!(client_address(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.1"), "malformed: not believed");
        assert_eq!(client_address(ip("10.0.0.1"), &h, &[]), ip("10.0.0.1"), "no trusted proxies");
    }
}
