//! LMTP ingestion (RFC 2033) with PIPELINING, ENHANCEDSTATUSCODES (RFC
//! 2034/3463), 8BITMIME and SIZE (RFC 1870).
//!
//! Commands are parsed by the `smtp-proto` crate; the DATA phase uses our
//! own strict receiver ([`data`]) because end-of-data detection is where
//! smuggling attacks live. A message is acknowledged with 250 only after
//! it is sealed and committed durably; one reply per accepted recipient.
//!
//! Resource limits live in the session ([`session`]): a deadline per command
//! line, a minimum rate for DATA, shorter idle deadlines when every
//! connection slot is taken, and the shared in-flight DATA byte budget
//! ([`budget`]).

pub mod budget;
pub mod data;
mod session;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::auth::Authenticator;
use crate::config::LmtpConfig;

pub use session::serve;

pub struct LmtpContext {
    pub cfg: LmtpConfig,
    pub hostname: String,
    pub auth: Arc<Authenticator>,
    /// Bytes of DATA all connections may buffer together
    /// (`[lmtp] max_inflight_data`).
    pub data_budget: budget::DataBudget,
    /// Sessions running now; at `max_connections` idle sessions get the
    /// short busy deadline so a few silent clients cannot lock out the MTA.
    active: AtomicUsize,
    /// Woken when the last connection slot is taken, so sessions already
    /// waiting re-check their deadline.
    pressure: Notify,
}

impl LmtpContext {
    pub fn new(cfg: LmtpConfig, hostname: String, auth: Arc<Authenticator>) -> Self {
        let data_budget = budget::DataBudget::new(cfg.max_inflight_data);
        Self { cfg, hostname, auth, data_budget, active: AtomicUsize::new(0), pressure: Notify::new() }
    }

    /// True while every connection slot is taken.
    fn at_capacity(&self) -> bool {
        self.active.load(Ordering::Acquire) as u64 >= self.cfg.max_connections
    }
}
