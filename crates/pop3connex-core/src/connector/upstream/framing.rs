//! Glue between the upstream session and the sans-IO client codec in
//! `pop3-proto`.
//!
//! The codec frames reply lines, parses status lines and listings and
//! encodes commands; this file turns its outcomes into [`UpstreamError`]s
//! with the texts the connector has always reported (they reach events and
//! the operator's status output), and keeps secrets in wiped buffers.

use base64::Engine as _;
use pop3_proto::client::{self, ClientCommand, ListingError};
use zeroize::Zeroizing;

use super::UpstreamError;
use crate::logtext::sanitize;

pub(super) use pop3_proto::client::Status;

pub(super) const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A status line, or a protocol violation for anything else.
pub(super) fn parse_status(line: Vec<u8>, allow_challenge: bool) -> Result<Status, UpstreamError> {
    client::parse_status(&line, allow_challenge).map_err(|e| UpstreamError::Protocol(e.to_string()))
}

/// A reply line over the limit the session read it with.
pub(super) fn line_too_long(max: usize) -> UpstreamError {
    UpstreamError::Protocol(format!("line longer than {max} octets"))
}

/// A listing line (or the listing as a whole) the codec refused.
pub(super) fn bad_listing(cmd: &ClientCommand<'_>, e: ListingError) -> UpstreamError {
    UpstreamError::Protocol(format!("{cmd} listing: {e}"))
}

/// The wire form of `cmd` in a buffer wiped when dropped (commands carry
/// passwords and tokens). Line breaks and NUL in arguments are refused by
/// the codec; login checks them earlier with a clearer message.
pub(super) fn encode(cmd: &ClientCommand<'_>) -> Result<Zeroizing<Vec<u8>>, UpstreamError> {
    let mut out = Zeroizing::new(Vec::with_capacity(cmd.encoded_len()));
    cmd.encode_into(&mut out)
        .map_err(|_| UpstreamError::Auth("a command argument contains a line break or NUL".into()))?;
    Ok(out)
}

/// Decodes a SASL challenge; a server sending bad base64 violates RFC 5034.
pub(super) fn decode_challenge(ch: &[u8]) -> Result<Vec<u8>, UpstreamError> {
    B64.decode(ch).map_err(|_| UpstreamError::Protocol("SASL challenge is not base64".into()))
}

/// `-ERR` to a login: RFC 3206 `[SYS/...]`, `[IN-USE]` and `[LOGIN-DELAY]`
/// are server conditions, not refused credentials.
pub(super) fn refused(text: &[u8]) -> UpstreamError {
    let t = sanitize(text);
    let upper = t.to_ascii_uppercase();
    if ["[SYS/", "[IN-USE]", "[LOGIN-DELAY]"].iter().any(|c| upper.starts_with(c)) {
        UpstreamError::Server(t)
    } else {
        UpstreamError::Auth(t)
    }
}
