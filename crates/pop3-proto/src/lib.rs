//! Sans-IO POP3 (RFC 1939, RFC 2449) protocol pieces.
//!
//! Nothing in this crate touches a socket, a clock or a file. It turns bytes
//! into typed values and typed values into bytes, so the session layer in
//! `pop3connex-core` can own I/O, timeouts and state, and so every piece here
//! can be tested by feeding it input in every chunk size.
//!
//! # Layout
//! - [`line`]: CRLF line framing with a hard length cap ([`line::LineBuffer`]).
//! - [`command`]: command lines into [`command::Command`], with strict
//!   message-number parsing ([`command::MsgNum`]).
//! - [`reply`]: status lines and RFC 2449/3206 response codes.
//! - [`stuff`]: streaming dot-stuffing for multi-line responses, and the
//!   TOP header/body-line filter.
//! - [`client`]: the client side, for the connector's upstream session:
//!   reply-line framing ([`client::ReplyBuffer`]), status lines, dot-unstuffing,
//!   LIST/UIDL/STAT/CAPA parsing into typed values, and command encoding.
#![forbid(unsafe_code)]

pub mod client;
pub mod command;
pub mod line;
pub mod reply;
pub mod stuff;

pub use client::{ClientCommand, ReplyBuffer, Uidl};
pub use command::{Command, CommandError, MsgNum};
pub use line::{LineBuffer, LineError};
pub use reply::{RespCode, StatusLine};
pub use stuff::{DotStuffer, TopFilter};
