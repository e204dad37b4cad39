//! Elastic Common Schema rendering of an [`EventRecord`]: one JSON object
//! per event, as the JSON file sink writes it (one per line) and as
//! Elastic, Splunk and Sentinel ingest it without a parser.
//!
//! ECS fields: `@timestamp`, `event.code` (the catalogue id),
//! `event.action` (the name), `event.category`, `event.type`,
//! `event.kind` (`alert` or `event`), `event.outcome`, `event.severity`
//! (the syslog severity number), `log.level`, `log.logger` (the target),
//! `message`, `source.ip`/`source.port` (from `peer`), `user.name` (from
//! `user`), `host.hostname`, `service.name`; every other field goes under
//! `pop3connex.*` by its name in the code.

use serde_json::{json, Map, Value};

use super::hub::EventRecord;
use super::syslog::timestamp;

/// The ECS version these names follow.
pub const ECS_VERSION: &str = "8.11.0";

/// The ECS document for `e`, from a server named `hostname`.
pub fn to_ecs(e: &EventRecord, hostname: &str) -> Value {
    let def = e.def();
    let mut event = Map::new();
    if let Some(d) = def {
        event.insert("code".into(), json!(d.id.to_string()));
        event.insert("category".into(), json!(d.category));
        event.insert("type".into(), json!(d.kind));
        event.insert("outcome".into(), json!(d.outcome));
    }
    event.insert("action".into(), json!(e.name));
    event.insert("kind".into(), json!(if e.alert { "alert" } else { "event" }));
    event.insert("severity".into(), json!(e.severity.code()));
    event.insert("dataset".into(), json!(e.target.replace("::", ".")));

    let mut doc = Map::new();
    doc.insert("@timestamp".into(), json!(timestamp(e.time)));
    doc.insert("ecs".into(), json!({ "version": ECS_VERSION }));
    doc.insert("event".into(), Value::Object(event));
    doc.insert("log".into(), json!({ "level": e.severity.as_str(), "logger": e.target }));
    doc.insert("message".into(), json!(e.message));
    doc.insert("host".into(), json!({ "hostname": hostname }));
    doc.insert("service".into(), json!({ "name": "pop3connex", "type": "mail" }));

    let mut own = Map::new();
    for (k, v) in &e.fields {
        match k.as_str() {
            "peer" => match v.as_str().and_then(parse_peer) {
                Some((ip, port)) => {
                    let mut source = json!({ "ip": ip.to_string(), "address": ip.to_string() });
                    if let Some(port) = port {
                        source["port"] = json!(port);
                    }
                    doc.insert("source".into(), source);
                }
                None => {
                    own.insert(k.clone(), v.clone());
                }
            },
            "user" if v.as_str().is_some_and(|u| u != "-") => {
                doc.insert("user".into(), json!({ "name": v }));
            }
            _ => {
                own.insert(k.clone(), v.clone());
            }
        }
    }
    if !own.is_empty() {
        doc.insert("pop3connex".into(), Value::Object(own));
    }
    Value::Object(doc)
}

fn parse_peer(s: &str) -> Option<(std::net::IpAddr, Option<u16>)> {
    if let Ok(ip) = s.parse() {
        return Some((ip, None));
    }
    s.parse::<std::net::SocketAddr>().ok().map(|a| (a.ip(), Some(a.port())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Severity;

    fn rec(name: &str, fields: Value) -> EventRecord {
        let Value::Object(fields) = fields else { panic!() };
        EventRecord {
            time: time::macros::datetime!(2026-12-06 02:16:03.5 UTC),
            target: "pop3connex::security",
            name: name.into(),
            severity: Severity::Warning,
            message: "authentication failed".into(),
            fields,
            alert: false,
        }
    }

    #[test]
    fn catalogued_event_maps_to_ecs_names() {
        let e =
            rec("auth_failure", json!({"peer": "192.0.2.7", "user": "alice", "mechanism": "PLAIN", "reason": "bad"}));
        let d = to_ecs(&e, "mx.example.net");
        assert_eq!(d["@timestamp"], "2026-12-06T02:16:03.500000Z");
        assert_eq!(d["event"]["code"], "101");
        assert_eq!(d["event"]["action"], "auth_failure");
        assert_eq!(d["event"]["category"], json!(["authentication"]));
        assert_eq!(d["event"]["type"], json!(["start"]));
        assert_eq!(d["event"]["kind"], "event");
        assert_eq!(d["event"]["outcome"], "failure");
        assert_eq!(d["event"]["severity"], 4);
        assert_eq!(d["log"]["level"], "warning");
        assert_eq!(d["message"], "authentication failed");
        assert_eq!(d["source"]["ip"], "192.0.2.7");
        assert_eq!(d["user"]["name"], "alice");
        assert_eq!(d["host"]["hostname"], "mx.example.net");
        assert_eq!(d["pop3connex"], json!({"mechanism": "PLAIN", "reason": "bad"}));
    }

    #[test]
    fn socket_peers_unknown_events_and_placeholders() {
        let mut e = rec("made_up", json!({"peer": "[2001:db8::1]:110", "user": "-"}));
        e.alert = true;
        let d = to_ecs(&e, "h");
        assert_eq!(d["source"], json!({"ip": "2001:db8::1", "address": "2001:db8::1", "port": 110}));
        assert!(d.get("user").is_none());
        assert_eq!(d["pop3connex"]["user"], "-");
        assert!(d["event"].get("code").is_none());
        assert_eq!(d["event"]["kind"], "alert");
        let d = to_ecs(&rec("ban", json!({"peer": "unix"})), "h");
        assert!(d.get("source").is_none());
        assert_eq!(d["pop3connex"]["peer"], "unix");
    }
}
