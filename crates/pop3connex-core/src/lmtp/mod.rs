//! LMTP ingestion (RFC 2033) with PIPELINING, ENHANCEDSTATUSCODES (RFC
//! 2034/3463), 8BITMIME and SIZE (RFC 1870).
//!
//! Commands are parsed by the `smtp-proto` crate; the DATA phase uses our
//! own strict receiver ([`data`]) because end-of-data detection is where
//! smuggling attacks live. A message is acknowledged with 250 only after
//! it is sealed and committed durably; one reply per accepted recipient.

pub mod data;
mod session;

use std::sync::Arc;

use crate::auth::Authenticator;
use crate::config::LmtpConfig;

pub use session::serve;

pub struct LmtpContext {
    pub cfg: LmtpConfig,
    pub hostname: String,
    pub auth: Arc<Authenticator>,
}
