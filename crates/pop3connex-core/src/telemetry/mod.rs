//! Telemetry: the one pipeline every security and operational event goes
//! through on its way to the operator.
//!
//! Code emits events as `tracing` events under a `pop3connex::` target with
//! an `event` field holding its catalogue name (see [`crate::events`] for the security and
//! connector events). The [`hub`] is a `tracing` layer that turns each such
//! event into one owned [`EventRecord`] and hands it to every registered
//! [`Consumer`]: log sinks (JSON/ECS, RFC 5424 syslog), the local event
//! store, metrics, anomaly detection and alert routing all see the same
//! record. The [`catalogue`] gives every event name a stable id, a
//! severity, an ECS category and its documented fields.
//!
//! Consumers never block the code that emitted the event: slow ones sit
//! behind a [`hub::Queue`] (bounded, drops counted).

pub mod alerting;
pub mod anomaly;
pub mod catalogue;
pub mod ecs;
pub mod geo;
pub mod hub;
pub mod metrics;
pub mod metrics_http;
pub mod sink;
pub mod store;
pub mod syslog;

pub use catalogue::{EventDef, Severity, CATALOGUE};
pub use hub::{Consumer, EventRecord, Hub, Queue};
