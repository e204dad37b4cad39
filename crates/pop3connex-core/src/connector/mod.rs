//! The connector: fetches mail from upstream POP3 mailboxes and delivers it
//! into the local encrypted store or forwards it to a downstream SMTP/LMTP
//! server, never losing a message.
//!
//! Data flow of one account run ([`engine`]):
//! 1. [`upstream`] connects with verified TLS (implicit or mandatory STLS),
//!    logs in (SCRAM-SHA-256, XOAUTH2/OAUTHBEARER with tokens from
//!    [`oauth2`], PLAIN or USER over TLS only) and lists UIDLs.
//! 2. New UIDLs (not in the store's seen-list) are retrieved one at a time
//!    within the account's size, count and byte limits.
//! 3. [`route`] picks each recipient's target from the account's fixed
//!    target or an envelope header; loops and duplicates are detected.
//! 4. Local targets are sealed and committed together with the UIDL and the
//!    duplicate keys in one store transaction; forwarded mail goes through
//!    [`smtp`] (TLS policy per downstream, MX/DANE/MTA-STS via [`dns`],
//!    [`dane`] and [`mtasts`]) and the UIDL is committed after every
//!    recipient got 250.
//! 5. Only then is the upstream copy deleted (per the account's policy).
//!
//! Unroutable, looping or permanently refused mail goes to the quarantine
//! mailbox with an event; temporary failures leave the message upstream and
//! back the account off.

pub mod dane;
pub mod dns;
pub mod dnscheck;
pub mod engine;
pub mod mtasts;
pub mod oauth2;
pub mod route;
pub mod smtp;
pub mod tlsclient;
pub mod upstream;
