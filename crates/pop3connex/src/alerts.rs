//! Alerts from the admin plane through the operator's alert hook.
//!
//! The core and the web server mark alert-worthy log events with the field
//! `alert = true` (admin logins, failed admin login bursts, second factors
//! enrolled, removed or reset, recovery codes used, role and token changes,
//! configuration reloads) and the anomaly rules mark theirs (failed-login
//! spikes). This layer hands each such event, as one JSON
//! object on stdin, to `[connector] alert_command`, the same hook the
//! connector's alerts use, so one program pages the operator for both. The
//! connector runs the hook for its own events itself, so its events are
//! skipped here.
//!
//! In `serve` the hook runs in the background (never blocking a request),
//! at most [`MAX_RUNNING`] at a time; an alert arriving while that many are
//! still running is not sent to the hook and is counted in a warning (it is
//! in the log all the same). A CLI command waits for its hooks (at most
//! [`HOOK_TIMEOUT`]) so that they run before the process exits.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// Hooks running at once in `serve`.
pub const MAX_RUNNING: usize = 8;
/// How long one hook may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the caller waits for the hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `serve`: in the background, bounded.
    Background,
    /// A CLI command: before returning from the event.
    Wait,
}

pub struct AlertLayer {
    command: Arc<Vec<String>>,
    mode: Mode,
    running: Arc<Semaphore>,
    dropped: Arc<AtomicU64>,
}

impl AlertLayer {
    /// `None` when no hook is configured.
    pub fn new(command: &[String], mode: Mode) -> Option<Self> {
        if command.is_empty() {
            return None;
        }
        Some(AlertLayer {
            command: Arc::new(command.to_vec()),
            mode,
            running: Arc::new(Semaphore::new(MAX_RUNNING)),
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }
}

#[derive(Default)]
struct Fields {
    alert: bool,
    map: Map<String, Value>,
}

impl Visit for Fields {
    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "alert" {
            self.alert = value;
        } else {
            self.map.insert(field.name().into(), value.into());
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.map.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.map.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.map.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.map.insert(field.name().into(), format!("{value:?}").into());
    }
}

impl<S: Subscriber> Layer<S> for AlertLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if meta.target().starts_with("pop3connex_core::connector") || meta.target().starts_with("pop3connex::connector")
        {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if !fields.alert {
            return;
        }
        let mut map = fields.map;
        let source = if meta.target().starts_with("pop3connex::anomaly") { "anomaly" } else { "admin" };
        map.insert("source".into(), source.into());
        map.insert("level".into(), meta.level().as_str().into());
        map.insert("time".into(), pop3connex_core::types::unix_now().into());
        let mut json = Value::Object(map).to_string().into_bytes();
        json.push(b'\n');
        match self.mode {
            Mode::Wait => run(&self.command, &json),
            Mode::Background => {
                let Ok(permit) = self.running.clone().try_acquire_owned() else {
                    let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    // Not marked as an alert: this must not recurse.
                    tracing::warn!(dropped_total = n, "alert hook busy: alert not sent to the hook (it is in the log)");
                    return;
                };
                let command = self.command.clone();
                // A plain thread: the event may come from any thread, with or
                // without a runtime, and the hook's wait must not hold a
                // runtime worker.
                let spawned = std::thread::Builder::new().name("alert-hook".into()).spawn(move || {
                    run(&command, &json);
                    drop(permit);
                });
                if spawned.is_err() {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Runs the hook with `json` on stdin and waits at most [`HOOK_TIMEOUT`].
/// Failures are printed to stderr, not logged (logging here would re-enter
/// the subscriber).
fn run(command: &[String], json: &[u8]) {
    let Some((prog, args)) = command.split_first() else { return };
    let mut child = match Command::new(prog).args(args).stdin(Stdio::piped()).stdout(Stdio::null()).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pop3connex: cannot run the alert hook: {e}");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(json);
    }
    let deadline = std::time::Instant::now() + HOOK_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                if !status.success() {
                    eprintln!("pop3connex: the alert hook failed: {status}");
                }
                return;
            }
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("pop3connex: the alert hook did not finish in {} s", HOOK_TIMEOUT.as_secs());
                return;
            }
        }
    }
}
