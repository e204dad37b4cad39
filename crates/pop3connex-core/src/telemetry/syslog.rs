//! RFC 5424 rendering of an [`EventRecord`], and the RFC 6587 / RFC 5425
//! octet-counting frame.
//!
//! Hand-written rather than taken from `fasyslog`: that crate's senders are
//! blocking `std::net` writers, while a sink here is a tokio task with
//! timeouts, reconnect back-off and our own rustls verifier (the
//! connector's root store and checks); and we need a size bound that keeps
//! the structured data well-formed when a message is too long, which a
//! generic formatter does not do. The format is small and fully tested
//! below.
//!
//! ```text
//! <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [pop3connex@32473 id="101" name="auth_failure" ...] MSG
//! ```
//!
//! - PRI = facility * 8 + the catalogue severity.
//! - TIMESTAMP in UTC with microseconds (RFC 5424 allows at most six
//!   fraction digits).
//! - MSGID is the event name, so receivers can filter without parsing SD.
//! - One SD element: `id`, `name`, `severity`, `alert` (when set), then
//!   every field of the event. PARAM-VALUE escapes `"`, `\` and `]`;
//!   control characters (never meaningful in a field, possibly hostile:
//!   user names come from clients) become U+FFFD. Each value is cut at
//!   1024 bytes.
//! - MSG is the human message; plain ASCII is sent as is (MSG-ANY), other
//!   text as MSG-UTF8 with the BOM RFC 5424 requires.
//! - Too long for `max` bytes: fields are left out from the end (the SD
//!   element then carries `truncated="1"`), then the message text is cut
//!   at a character boundary. The result is always well-formed.

use std::fmt::Write as _;

use serde_json::Value;

use super::hub::EventRecord;

/// The SD-ID of our element. 32473 is the private enterprise number RFC
/// 5612 reserves for documentation; see docs/specifications.md.
pub const SD_ID: &str = "pop3connex@32473";

/// Longest field value kept (bytes, before escaping).
const MAX_VALUE: usize = 1024;

/// What every message from one sink shares.
#[derive(Debug, Clone)]
pub struct Header {
    pub facility: u8,
    pub hostname: String,
    pub app_name: String,
    pub procid: String,
}

impl Header {
    pub fn new(facility: u8, hostname: &str, app_name: &str) -> Header {
        Header {
            facility: facility.min(23),
            hostname: header_field(hostname, 255),
            app_name: header_field(app_name, 48),
            procid: std::process::id().to_string(),
        }
    }
}

/// A header field: printable US-ASCII without spaces, at most `max`
/// characters, `-` (NILVALUE) when nothing is left.
fn header_field(s: &str, max: usize) -> String {
    let v: String = s.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
    if v.is_empty() {
        "-".into()
    } else {
        v
    }
}

/// An SD-NAME: 1..=32 printable ASCII except `=`, space, `]` and `"`.
fn sd_name(s: &str) -> Option<String> {
    let v: String = s.chars().filter(|c| c.is_ascii_graphic() && !matches!(c, '=' | ']' | '"')).take(32).collect();
    (!v.is_empty()).then_some(v)
}

/// Appends `v` as a PARAM-VALUE (without the quotes).
fn escape_into(out: &mut String, v: &str) {
    let v = cut(v, MAX_VALUE);
    for c in v.chars() {
        match c {
            '"' | '\\' | ']' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes ending on a character
/// boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// RFC 3339 in UTC with microseconds: `2026-12-06T02:16:03.123456Z`.
pub fn timestamp(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// One RFC 5424 message of at most `max` bytes (`max` >= 1024).
pub fn render(h: &Header, e: &EventRecord, max: usize) -> String {
    let pri = u16::from(h.facility) * 8 + u16::from(e.severity.code());
    let msgid = header_field(&e.name, 32);
    let mut out = format!("<{pri}>1 {} {} {} {} {msgid} ", timestamp(e.time), h.hostname, h.app_name, h.procid);
    let id = e.def().map(|d| d.id.to_string()).unwrap_or_default();
    let mut params: Vec<String> = Vec::with_capacity(e.fields.len() + 4);
    let mut param = |name: &str, value: &str| {
        if let Some(name) = sd_name(name) {
            let mut p = format!(" {name}=\"");
            escape_into(&mut p, value);
            p.push('"');
            params.push(p);
        }
    };
    if !id.is_empty() {
        param("id", &id);
    }
    param("name", &e.name);
    param("severity", e.severity.as_str());
    if e.alert {
        param("alert", "1");
    }
    for (k, v) in &e.fields {
        // The reserved names above are ours; a field of the same name is
        // kept under a prefix instead of shadowing them.
        let k = if matches!(k.as_str(), "id" | "name" | "severity" | "alert" | "truncated") {
            format!("f_{k}")
        } else {
            k.clone()
        };
        param(&k, &value_text(v));
    }
    // Room for the message: at least a little, so a cut is visible.
    const MIN_MSG: usize = 64;
    const TRUNCATED: &str = " truncated=\"1\"";
    let fixed = out.len() + 1 + SD_ID.len() + 1 + 1; // "[" SD_ID ... "]" " "
    let mut sd_len: usize = params.iter().map(String::len).sum();
    let mut kept = params.len();
    let budget = max.saturating_sub(fixed + MIN_MSG.min(e.message.len() + 3));
    if sd_len > budget {
        // Always keep id, name and severity.
        while kept > 3 && sd_len + TRUNCATED.len() > budget {
            kept -= 1;
            sd_len -= params[kept].len();
        }
    }
    out.push('[');
    out.push_str(SD_ID);
    for p in &params[..kept] {
        out.push_str(p);
    }
    if kept < params.len() {
        out.push_str(TRUNCATED);
    }
    out.push(']');
    if !e.message.is_empty() {
        out.push(' ');
        let room = max.saturating_sub(out.len());
        if e.message.is_ascii() {
            let m: String = e.message.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
            out.push_str(cut(&m, room));
        } else {
            let m: String = e.message.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
            if room > 3 {
                out.push('\u{FEFF}');
                out.push_str(cut(&m, room - 3));
            }
        }
    }
    if out.len() > max {
        // Only reachable with an absurdly small `max`; keep the bound.
        out = cut(&out, max).to_owned();
    }
    out
}

/// RFC 6587 section 3.4.1 / RFC 5425 section 4.3 octet counting:
/// `MSG-LEN SP SYSLOG-MSG`.
pub fn frame(msg: &str) -> Vec<u8> {
    let mut f = String::with_capacity(msg.len() + 6);
    let _ = write!(f, "{} ", msg.len());
    f.push_str(msg);
    f.into_bytes()
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map};
    use time::macros::datetime;

    use super::*;
    use crate::telemetry::Severity;

    fn rec(name: &str, sev: Severity, fields: Value, message: &str) -> EventRecord {
        let Value::Object(fields) = fields else { panic!() };
        EventRecord {
            time: datetime!(2026-12-06 02:16:03.123456789 UTC),
            target: "pop3connex::security",
            name: name.into(),
            severity: sev,
            message: message.into(),
            fields,
            alert: false,
        }
    }

    fn header() -> Header {
        Header { facility: 2, hostname: "mx.example.net".into(), app_name: "pop3connex".into(), procid: "42".into() }
    }

    #[test]
    fn header_pri_timestamp_msgid_and_sd() {
        let e = rec(
            "auth_failure",
            Severity::Warning,
            json!({"peer": "192.0.2.7", "user": "alice", "n": 3}),
            "authentication failed",
        );
        let m = render(&header(), &e, 8192);
        assert_eq!(
            m,
            "<20>1 2026-12-06T02:16:03.123456Z mx.example.net pop3connex 42 auth_failure \
             [pop3connex@32473 id=\"101\" name=\"auth_failure\" severity=\"warning\" n=\"3\" peer=\"192.0.2.7\" \
             user=\"alice\"] authentication failed"
        );
        // mail.warning = 2*8+4 = 20; auth(4).critical(2) = 34
        let h = Header { facility: 4, ..header() };
        let e = rec("integrity_failure", Severity::Critical, json!({}), "x");
        assert!(render(&h, &e, 8192).starts_with("<34>1 "));
    }

    #[test]
    fn sd_values_are_escaped_and_control_characters_replaced() {
        let e = rec("auth_failure", Severity::Warning, json!({"user": "a\"b\\c]d\r\ne"}), "m");
        let m = render(&header(), &e, 8192);
        assert!(m.contains(r#"user="a\"b\\c\]d��e""#), "{m}");
        // Exactly one unescaped `]` closes the element.
        let sd = &m[m.find('[').unwrap()..];
        let mut closes = 0;
        let mut esc = false;
        let mut in_q = false;
        for c in sd.chars() {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_q = !in_q,
                (false, ']') if !in_q => closes += 1,
                _ => {}
            }
        }
        assert_eq!(closes, 1, "{m}");
    }

    #[test]
    fn hostile_names_and_unknown_events_stay_well_formed() {
        let mut f = Map::new();
        f.insert("bad name=\"x".into(), json!("v"));
        f.insert("id".into(), json!("spoof"));
        let e = EventRecord { fields: f, ..rec("no such event", Severity::Info, json!({}), "") };
        let h = Header::new(2, "bad host\n", "app");
        let m = render(&h, &e, 8192);
        assert!(m.starts_with("<22>1 2026-12-06T02:16:03.123456Z badhost app "), "{m}");
        assert!(m.contains(" nosuchevent [pop3connex@32473 name=\"no such event\""), "{m}");
        assert!(m.contains(" badnamex=\"v\""), "{m}");
        assert!(m.contains(" f_id=\"spoof\""), "{m}");
        assert!(m.ends_with(']'), "no message, no trailing space: {m}");
    }

    #[test]
    fn non_ascii_messages_carry_the_bom() {
        let e = rec("ban", Severity::Warning, json!({}), "gesperrt für 60 s");
        let m = render(&header(), &e, 8192);
        assert!(m.ends_with("] \u{FEFF}gesperrt für 60 s"), "{m}");
    }

    #[test]
    fn long_events_are_cut_to_the_bound_and_stay_well_formed() {
        let mut f = Map::new();
        for i in 0..40 {
            f.insert(format!("f{i:02}"), json!("é".repeat(800)));
        }
        let e = EventRecord { fields: f, ..rec("ban", Severity::Warning, json!({}), &"x".repeat(5000)) };
        for max in [1024, 2048, 8192] {
            let m = render(&header(), &e, max);
            assert!(m.len() <= max, "{max}: {}", m.len());
            assert!(m.contains("name=\"ban\""));
            assert!(m.contains(" truncated=\"1\"]"), "{m}");
            assert!(m.contains("] xxx"), "some message text is kept: {max}");
        }
        // One long value is cut at MAX_VALUE bytes on a character boundary.
        let e = rec("ban", Severity::Warning, json!({"reason": "é".repeat(1000)}), "m");
        let m = render(&header(), &e, 65_000);
        assert!(m.contains(&format!("reason=\"{}\"", "é".repeat(512))), "{m}");
        assert!(!m.contains("truncated"));
    }

    #[test]
    fn octet_counting_frame_counts_bytes_not_characters() {
        assert_eq!(frame("<14>1 é"), "8 <14>1 é".as_bytes());
        assert_eq!(frame(""), b"0 ");
    }
}
