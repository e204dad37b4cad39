//! Address bans set by an operator: list, add, remove. Running servers
//! pick changes up from the store (within 15 seconds).

use ipnet::IpNet;

use super::{Actor, Admin, AdminError, AuditDetails};
use crate::store::BanRecord;
use crate::types::unix_now;

/// A ban as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanEntry {
    pub network: IpNet,
    pub reason: String,
    /// Seconds left; `None`: until removed.
    pub expires_in: Option<i64>,
    pub offences: u32,
}

/// Parses an address (`192.0.2.1`) or a network (`2001:db8::/32`); host
/// bits of a network are cleared.
pub fn parse_network(s: &str) -> Result<IpNet, AdminError> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| AdminError::bad_input(format!("{s} is not an address or CIDR network")))
}

impl Admin {
    /// Active bans.
    pub async fn list_bans(&self, actor: &Actor) -> Result<Vec<BanEntry>, AdminError> {
        self.audited(actor, "ban.list", "*", async {
            let now = unix_now();
            Ok(self
                .mail
                .store()
                .bans()
                .await?
                .into_iter()
                .map(|b| BanEntry {
                    network: b.network,
                    reason: b.reason,
                    expires_in: b.expires_at.map(|e| e - now),
                    offences: b.offences,
                })
                .collect())
        })
        .await
    }

    /// Bans `network` (as [`parse_network`] reads it) for `seconds`, or
    /// until removed; returns the network banned.
    pub async fn add_ban(
        &self,
        actor: &Actor,
        network: &str,
        reason: &str,
        seconds: Option<u64>,
    ) -> Result<IpNet, AdminError> {
        let before = self.ban_value(network).await;
        let after = Some(serde_json::json!({ "reason": reason, "seconds": seconds }));
        let details = AuditDetails { before, after, ..Default::default() };
        self.audited_with(actor, "ban.add", network, details, async {
            let network = parse_network(network)?;
            let now = unix_now();
            let expires_at = seconds.map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX)));
            let ban = BanRecord { network, reason: reason.to_owned(), created_at: now, expires_at, offences: 1 };
            self.mail.store().put_ban(ban).await?;
            Ok(network)
        })
        .await
    }

    /// Removes the ban on `network`; returns the network unbanned.
    pub async fn remove_ban(&self, actor: &Actor, network: &str) -> Result<IpNet, AdminError> {
        let details = AuditDetails { before: self.ban_value(network).await, ..Default::default() };
        self.audited_with(actor, "ban.remove", network, details, async {
            let network = parse_network(network)?;
            if !self.mail.store().remove_ban(network).await? {
                return Err(AdminError::not_found(format!("no ban on {network}")));
            }
            Ok(network)
        })
        .await
    }
}

impl Admin {
    /// The ban on exactly `network` as an audit before-value (`None` when
    /// there is none or the network does not parse).
    async fn ban_value(&self, network: &str) -> Option<serde_json::Value> {
        let network = parse_network(network).ok()?;
        let bans = self.mail.store().bans().await.ok()?;
        bans.into_iter()
            .find(|b| b.network == network)
            .map(|b| serde_json::json!({ "reason": b.reason, "expires_at": b.expires_at, "offences": b.offences }))
    }
}
