//! Routing: which targets a fetched message goes to.
//!
//! A POP3 mailbox has no envelope: once mail is in it, the SMTP recipient is
//! gone unless the upstream recorded it in a header (Delivered-To,
//! X-Original-To, Envelope-To). Catch-all accounts are therefore routed by
//! such a header, chosen explicitly by the operator, never guessed from
//! To/Cc (which would lose Bcc recipients and misroute list mail) unless
//! `guess_from_to_cc` is switched on.

use sha2::{Digest, Sha256};

use crate::config::connector::{EnvelopeHeader, Occurrence, RouteConfig, Target};
use crate::store::DedupKey;

/// What routing and duplicate detection need from a message's header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspected {
    pub message_id: Option<String>,
    /// Received headers (hops so far).
    pub hops: usize,
    /// Values of the envelope header, top (newest) first.
    pub envelope: Vec<String>,
    /// To and Cc addresses (only used when guessing is on).
    pub to_cc: Vec<String>,
    /// The reverse path from Return-Path, if it holds one address.
    pub return_path: Option<String>,
    /// SHA-256 of the message without its trace and envelope header fields
    /// (see [`content_hash`]).
    pub content_hash: [u8; 32],
}

/// Reads the header fields routing needs. Never fails: a message without a
/// parsable header simply has no envelope information.
pub fn inspect(raw: &[u8], header: Option<EnvelopeHeader>) -> Inspected {
    let content_hash = content_hash(raw);
    let Some(msg) = mail_parser::MessageParser::new().parse_headers(raw) else {
        return Inspected { content_hash, ..Default::default() };
    };
    let mut out = Inspected { content_hash, message_id: msg.message_id().map(str::to_owned), ..Default::default() };
    for (name, value) in msg.headers_raw() {
        if name.eq_ignore_ascii_case("Received") {
            out.hops += 1;
        } else if header.is_some_and(|h| name.eq_ignore_ascii_case(h.name())) {
            if let Some(a) = bare_address(value) {
                out.envelope.push(a);
            }
        } else if name.eq_ignore_ascii_case("Return-Path") && out.return_path.is_none() {
            out.return_path = Some(bare_address(value).unwrap_or_default());
        }
    }
    for list in [msg.to(), msg.cc()].into_iter().flatten() {
        for a in list.iter() {
            if let Some(addr) = a.address() {
                out.to_cc.push(addr.to_ascii_lowercase());
            }
        }
    }
    out
}

/// Header fields added on the way (per hop or per delivery), which differ
/// between two deliveries of the same message.
const TRACE_FIELDS: &[&str] =
    &["received", "return-path", "delivered-to", "x-original-to", "envelope-to", "x-pop3connex-quarantine"];

/// SHA-256 of the message minus its trace and envelope header fields: two
/// copies of one message that reached the upstream mailbox separately (a
/// catch-all receiving it for two aliases, a list and a direct copy) hash
/// the same, while messages that differ anywhere else do not.
pub fn content_hash(raw: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut rest = raw;
    let mut skipping = false;
    loop {
        let end = rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |i| i + 1);
        let (line, tail) = rest.split_at(end);
        if line.is_empty() || line == b"\r\n" || line == b"\n" {
            // End of the header (or of the message): the body is hashed whole.
            h.update(rest);
            break;
        }
        if !matches!(line[0], b' ' | b'\t') {
            let name = line.split(|&b| b == b':').next().unwrap_or_default();
            skipping = TRACE_FIELDS.iter().any(|f| name.trim_ascii().eq_ignore_ascii_case(f.as_bytes()));
        }
        if !skipping {
            h.update(line);
        }
        rest = tail;
    }
    h.finalize().into()
}

/// One address from a header value such as ` <Alice@Example.COM>` or
/// `alice@example.com`, lower-cased; `None` unless it looks like exactly
/// one plain address.
fn bare_address(value: &str) -> Option<String> {
    let v = value.trim();
    let v = v.strip_prefix('<').and_then(|s| s.strip_suffix('>')).unwrap_or(v).trim();
    let (local, domain) = v.rsplit_once('@')?;
    let ok = !local.is_empty()
        && !domain.is_empty()
        && v.len() <= 254
        && v.bytes().all(|b| b.is_ascii_graphic() && !b"<>(),;:\\\"[]".contains(&b));
    ok.then(|| v.to_ascii_lowercase())
}

/// A concrete destination for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Local { user: String },
    Forward { address: String, via: String },
}

impl Destination {
    /// The recipient identity used in duplicate keys and events.
    pub fn recipient(&self) -> String {
        match self {
            Destination::Local { user } => format!("local:{user}"),
            Destination::Forward { address, .. } => address.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Deliver(Vec<Destination>),
    /// Quarantine, with the reason recorded in the event and the header.
    Quarantine(String),
}

/// Routes one message. Duplicate destinations are merged.
pub fn route(cfg: &RouteConfig, msg: &Inspected, max_hops: usize) -> Decision {
    if msg.hops > max_hops {
        return Decision::Quarantine(format!("mail loop: {} Received headers (limit {max_hops})", msg.hops));
    }
    if let Some(t) = &cfg.deliver_to {
        return Decision::Deliver(vec![resolve(t, None)]);
    }
    let header = cfg.envelope_header.map_or("envelope header", EnvelopeHeader::name);
    let chosen = match cfg.header_occurrence {
        Occurrence::First => msg.envelope.first(),
        Occurrence::Last => msg.envelope.last(),
        Occurrence::Nth(n) => msg.envelope.get(n as usize - 1),
    };
    let mut out: Vec<Destination> = Vec::new();
    match chosen {
        Some(addr) => match lookup(cfg, addr) {
            Some(d) => out.push(d),
            None => return Decision::Quarantine(format!("no route for {header} recipient {addr}")),
        },
        None if cfg.guess_from_to_cc => {
            for d in msg.to_cc.iter().filter_map(|a| lookup(cfg, a)) {
                if !out.contains(&d) {
                    out.push(d);
                }
            }
            if out.is_empty() {
                return Decision::Quarantine(format!("no {header} and no routable To/Cc address"));
            }
        }
        None => return Decision::Quarantine(format!("no usable {header} header")),
    }
    Decision::Deliver(out)
}

fn lookup(cfg: &RouteConfig, addr: &str) -> Option<Destination> {
    if let Some(t) = cfg.addresses.get(addr) {
        return Some(resolve(t, Some(addr)));
    }
    let (_, domain) = addr.rsplit_once('@')?;
    cfg.domains.get(domain).map(|t| resolve(t, Some(addr)))
}

/// Substitutes `*` (only present in domain rules, so `addr` is set).
fn resolve(t: &Target, addr: Option<&str>) -> Destination {
    let addr = addr.unwrap_or_default();
    match t {
        Target::Local { local } if local == "*" => {
            Destination::Local { user: addr.rsplit_once('@').map_or(addr, |(l, _)| l).to_owned() }
        }
        Target::Local { local } => Destination::Local { user: local.clone() },
        Target::Forward { forward, via } if forward == "*" => {
            Destination::Forward { address: addr.to_owned(), via: via.clone() }
        }
        Target::Forward { forward, via } => Destination::Forward { address: forward.clone(), via: via.clone() },
    }
}

/// The duplicate key of a message for one recipient: Message-ID, recipient
/// and content hash, so a re-fetched or twice-delivered copy is recognised
/// while distinct messages sharing a Message-ID are not.
pub fn dedup_key(msg: &Inspected, dest: &Destination) -> DedupKey {
    let mut h = Sha256::new();
    h.update(msg.message_id.as_deref().unwrap_or("").as_bytes());
    h.update([0]);
    h.update(dest.recipient().as_bytes());
    h.update([0]);
    h.update(msg.content_hash);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const MSG: &[u8] = b"Return-Path: <bounce@list.example>\r\nDelivered-To: sales@example.com\r\n\
        Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
        Delivered-To: catchall@isp.example\r\nX-Original-To: Info@Example.com\r\n\
        To: Someone <someone@example.com>\r\nCc: bob@corp.example\r\nMessage-ID: <m1@x>\r\n\
        Subject: hi\r\n\r\nbody\r\n";

    fn catch_all(header: EnvelopeHeader, occ: Occurrence) -> RouteConfig {
        RouteConfig {
            deliver_to: None,
            envelope_header: Some(header),
            header_occurrence: occ,
            addresses: BTreeMap::from([("info@example.com".into(), Target::Local { local: "bob".into() })]),
            domains: BTreeMap::from([
                ("example.com".into(), Target::Local { local: "*".into() }),
                ("corp.example".into(), Target::Forward { forward: "*".into(), via: "ex".into() }),
            ]),
            guess_from_to_cc: false,
        }
    }

    #[test]
    fn inspects_envelope_headers_in_order() {
        let i = inspect(MSG, Some(EnvelopeHeader::DeliveredTo));
        assert_eq!(i.envelope, ["sales@example.com", "catchall@isp.example"]);
        assert_eq!(i.hops, 1);
        assert_eq!(i.message_id.as_deref(), Some("m1@x"));
        assert_eq!(i.return_path.as_deref(), Some("bounce@list.example"));
        assert_eq!(i.to_cc, ["someone@example.com", "bob@corp.example"]);
    }

    #[test]
    fn routes_by_chosen_occurrence_and_rules() {
        let i = inspect(MSG, Some(EnvelopeHeader::DeliveredTo));
        let r = route(&catch_all(EnvelopeHeader::DeliveredTo, Occurrence::First), &i, 30);
        assert_eq!(r, Decision::Deliver(vec![Destination::Local { user: "sales".into() }]));
        let r = route(&catch_all(EnvelopeHeader::DeliveredTo, Occurrence::Last), &i, 30);
        assert!(matches!(r, Decision::Quarantine(ref why) if why.contains("catchall@isp.example")), "{r:?}");
        let i = inspect(MSG, Some(EnvelopeHeader::XOriginalTo));
        let r = route(&catch_all(EnvelopeHeader::XOriginalTo, Occurrence::First), &i, 30);
        assert_eq!(r, Decision::Deliver(vec![Destination::Local { user: "bob".into() }]));
        let i = inspect(MSG, Some(EnvelopeHeader::EnvelopeTo));
        let r = route(&catch_all(EnvelopeHeader::EnvelopeTo, Occurrence::First), &i, 30);
        assert!(matches!(r, Decision::Quarantine(_)), "missing header must not be guessed: {r:?}");
        let mut guessing = catch_all(EnvelopeHeader::EnvelopeTo, Occurrence::First);
        guessing.guess_from_to_cc = true;
        assert_eq!(
            route(&guessing, &i, 30),
            Decision::Deliver(vec![
                Destination::Local { user: "someone".into() },
                Destination::Forward { address: "bob@corp.example".into(), via: "ex".into() },
            ])
        );
    }

    #[test]
    fn loops_are_quarantined() {
        let mut m = Vec::new();
        for _ in 0..31 {
            m.extend_from_slice(b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n");
        }
        m.extend_from_slice(b"Subject: loop\r\n\r\nx\r\n");
        let i = inspect(&m, None);
        let fixed = RouteConfig { deliver_to: Some(Target::Local { local: "a".into() }), ..catch_all_none() };
        assert!(matches!(route(&fixed, &i, 30), Decision::Quarantine(ref w) if w.contains("loop")));
        assert!(matches!(route(&fixed, &i, 31), Decision::Deliver(_)));
    }

    fn catch_all_none() -> RouteConfig {
        RouteConfig {
            deliver_to: None,
            envelope_header: None,
            header_occurrence: Occurrence::First,
            addresses: BTreeMap::new(),
            domains: BTreeMap::new(),
            guess_from_to_cc: false,
        }
    }

    #[test]
    fn dedup_keys_depend_on_all_three_parts() {
        let a = inspect(MSG, None);
        let d = Destination::Local { user: "x".into() };
        let k = dedup_key(&a, &d);
        assert_eq!(k, dedup_key(&inspect(MSG, None), &d));
        assert_ne!(k, dedup_key(&a, &Destination::Local { user: "y".into() }));
        let other = [MSG, b"more\r\n"].concat();
        assert_ne!(k, dedup_key(&inspect(&other, None), &d));
        // A second delivery of the same message carries other trace fields.
        let again = [b"Received: from elsewhere by isp; Tue, 2 Jan 2024 00:00:00 +0000\r\n\tid 42\r\n".as_slice(), MSG]
            .concat();
        let again = String::from_utf8(again).unwrap().replace("sales@example.com", "info@example.com");
        assert_eq!(k, dedup_key(&inspect(again.as_bytes(), None), &d));
        let edited = String::from_utf8(MSG.to_vec()).unwrap().replace("Subject: hi", "Subject: ho");
        assert_ne!(k, dedup_key(&inspect(edited.as_bytes(), None), &d));
        assert_eq!(bare_address(" <A@B.c> ").as_deref(), Some("a@b.c"));
        assert_eq!(bare_address("a@b, c@d"), None);
        assert_eq!(bare_address("<>"), None);
    }
}
