//! Setting up and running the server: `init` (a fresh data directory),
//! logging, and `serve` (listeners, reload on SIGHUP, graceful shutdown on
//! SIGTERM or SIGINT).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Result;
use pop3connex_core::config::{Config, LogConfig, LogFormat};
use pop3connex_core::init::init_data_dir;
use pop3connex_core::mailstore::MailStore;
use pop3connex_core::server;
use pop3connex_core::telemetry::store::EventStoreSink;
use pop3connex_core::telemetry::Hub;

use crate::alerts::{AlertLayer, Mode};
use crate::cli::DEFAULT_DATA_DIR;
use crate::{default_config, load, runtime};

pub fn init(dir: &Path, hostname: &str) -> Result<()> {
    let report = init_data_dir(dir, hostname)?;
    let cfg = Config::load(&report.config)?;
    runtime()?.block_on(MailStore::open(&cfg))?;
    for p in &report.created {
        println!("created {}", p.display());
    }
    for p in &report.kept {
        println!("kept    {}", p.display());
    }
    println!("store   {} (SQLite, mail encrypted with master.key)", cfg.store.path.display());
    Ok(())
}

pub fn init_logging(log: &LogConfig, default_level: &str) {
    init_logging_with_alerts(log, default_level, None)
}

/// Logging to stderr (human or JSON) and, when an alert hook is configured,
/// the admin plane's alerts to it ([`crate::alerts`]).
pub fn init_logging_with_alerts(log: &LogConfig, default_level: &str, alerts: Option<AlertLayer>) {
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_env("POP3CONNEX_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let fmt = match log.format {
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).boxed(),
        LogFormat::Human => fmt.boxed(),
    };
    // Alerts are warnings: the hook's filter never enables a quieter call
    // site, whatever the log level.
    // The telemetry hub sees POP3conneX's events whatever the log level
    // (sinks, metrics and alerts do not depend on what stderr shows).
    let _ = tracing_subscriber::registry()
        .with(Hub::layer().with_filter(Hub::filter()))
        .with(fmt.with_filter(filter))
        .with(alerts.map(|a| a.with_filter(LevelFilter::WARN)))
        .try_init();
}

pub fn serve(config: Option<PathBuf>) -> Result<()> {
    if config.is_none() && !default_config().exists() {
        println!("No configuration found: creating the embedded default in ./{DEFAULT_DATA_DIR}");
        init(Path::new(DEFAULT_DATA_DIR), "localhost")?;
        println!();
        println!("Add a user (in another terminal):  pop3connex user add alice");
        println!("Trust this CA in clients:          ./{DEFAULT_DATA_DIR}/tls/ca.pem");
        println!();
    }
    let cfg = load(&config)?;
    // hickory (connector DNS) logs whole DNS messages at warn when DNSSEC
    // validation fails; the connector's own events report those cases.
    let filter = format!("{},hickory_net=error,hickory_resolver=error,hickory_proto=error", cfg.log.level.as_str());
    init_logging_with_alerts(&cfg.log, &filter, AlertLayer::new(&cfg.connector.alert_command, Mode::Background));
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the open-files limit");
    }
    runtime()?.block_on(async move {
        // [[log.sink]]: syslog/JSON event sinks, registered with the hub.
        let sinks = pop3connex_core::telemetry::sink::Sinks::start(&cfg)?;
        // [[alerts.webhook]] and [[alerts.email]]: alert events routed to each channel.
        let alert_channels = pop3connex_core::telemetry::alerting::Channels::start(&cfg).map_err(anyhow::Error::msg)?;
        let mail = std::sync::Arc::new(MailStore::open(&cfg).await?);
        // Events kept for investigations (`events search`, /api/v1/events).
        let event_store = cfg.log.store.enabled.then(|| {
            let sink = EventStoreSink::start(mail.store().clone(), &cfg.log.store);
            Hub::global().register(sink.queue.clone());
            sink
        });
        // Built-in anomaly rules (failed-login and download spikes, login
        // geography) raise alert events.
        let anomaly = if cfg.anomaly.enabled {
            let a = pop3connex_core::telemetry::anomaly::start(cfg.anomaly.clone()).map_err(anyhow::Error::msg)?;
            Hub::global().register(a.queue.clone());
            Some(a)
        } else {
            None
        };
        let running = server::start_with_store(&cfg, mail.clone()).await?;
        let (stop_checkpoints, checkpoints) = start_audit_checkpoints(&cfg, &mail);
        // The admin plane (off unless [admin] is configured) shares the
        // store; its reload button asks this loop to do what SIGHUP does.
        let (web_stop, web_stopped) = tokio::sync::watch::channel(false);
        let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<()>(4);
        let web = match cfg.admin {
            Some(_) => {
                let shared = std::sync::Arc::new(cfg.clone());
                let admin = std::sync::Arc::new(pop3connex_core::admin::Admin::with_mail(shared.clone(), mail.clone()));
                let control = pop3connex_web::Control { shutdown: web_stopped, reload: Some(reload_tx) };
                let web = pop3connex_web::start(admin, shared, control).await?;
                for a in &web.addresses {
                    tracing::info!(address = %a, "listening https (admin API and console)");
                }
                Some(web)
            }
            None => None,
        };
        let (metrics_stop, metrics_stopped) = tokio::sync::watch::channel(false);
        let metrics = pop3connex_core::telemetry::metrics_http::start_configured(&cfg, &mail, metrics_stopped).await?;
        // Dropped events of every sink, as pop3connex_event_sink_dropped_total{sink}.
        let registry = pop3connex_core::telemetry::metrics::Metrics::global();
        for (name, counter) in sinks.drop_counters() {
            registry.register_sink_drops(&name, counter);
        }
        if let Some(store) = &event_store {
            registry.register_sink_drops("event_store", store.queue.drop_counter());
        }
        for a in &running.pop3s {
            tracing::info!(address = %a, "listening pop3s (implicit TLS)");
        }
        for a in &running.pop3 {
            tracing::info!(address = %a, "listening pop3 (STLS required before login)");
        }
        for a in &running.lmtp {
            tracing::info!(address = %a, "listening lmtp");
        }
        // The configuration as it was at start: a reload reports which keys
        // changed since (they take effect at the next restart).
        let startup = (cfg.source.clone(), std::fs::read_to_string(&cfg.source).unwrap_or_default());
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => reload(&running, web.as_ref(), anomaly.as_ref(), &startup, "sighup").await,
                Some(()) = reload_rx.recv() => {
                    reload(&running, web.as_ref(), anomaly.as_ref(), &startup, "console").await
                }
            }
        }
        let _ = web_stop.send(true);
        if let Some(web) = web {
            let _ = web.task.await;
        }
        let _ = metrics_stop.send(true);
        if let Some(m) = metrics {
            let _ = m.task.await;
        }
        tracing::info!(sessions = running.active_sessions(), "shutting down");
        let _ = stop_checkpoints.send(true);
        let _ = checkpoints.await;
        let left = running.shutdown().await;
        if left > 0 {
            tracing::warn!(sessions = left, "grace period over, closing remaining sessions");
        }
        Hub::global().clear();
        if let Some(sink) = event_store {
            sink.finish(std::time::Duration::from_secs(2)).await;
        }
        tracing::info!("stopped");
        alert_channels.shutdown(std::time::Duration::from_secs(2)).await;
        sinks.shutdown(std::time::Duration::from_secs(5)).await;
        Ok(())
    })
}

/// What SIGHUP (and the console's reload) re-reads: the POP3 side's TLS
/// certificate, list files, bans and lockouts, the admin listener's
/// certificate and the GeoIP databases. A certificate or database that
/// fails to load leaves the old one in use.
async fn reload(
    running: &server::RunningServer,
    web: Option<&pop3connex_web::RunningWeb>,
    anomaly: Option<&pop3connex_core::telemetry::anomaly::Running>,
    startup: &(PathBuf, String),
    trigger: &str,
) {
    let (path, at_start) = startup;
    let changed = match std::fs::read_to_string(path) {
        Ok(now) => pop3connex_core::config::diff::changed_keys(at_start, &now),
        Err(e) => Err(e.to_string()),
    };
    match changed {
        Ok(keys) => tracing::warn!(target: "pop3connex::config", alert = true, event = "config_reloaded", trigger,
            changed = keys.len(), changed_keys = %pop3connex_core::config::diff::summary(&keys),
            "reload: certificates, list files, bans and lockouts re-read; changed keys apply at the next restart"),
        Err(e) => tracing::warn!(target: "pop3connex::config", alert = true, event = "config_reloaded", trigger,
            error = %e, "reload: certificates, list files, bans and lockouts re-read; the configuration file \
            cannot be read or parsed (the running configuration stays)"),
    }
    running.reload().await;
    match anomaly.map(|a| a.reload_geo()) {
        Some(Ok(true)) => tracing::info!(target: "pop3connex::anomaly", "reload: GeoIP databases re-read"),
        Some(Err(e)) => tracing::warn!(target: "pop3connex::anomaly", alert = true, error = %e,
            "reload: the GeoIP databases could not be re-read; the ones in use stay"),
        Some(Ok(false)) | None => {}
    }
    if let Some(web) = web {
        use pop3connex_core::events::{emit, SecurityEvent};
        match web.reload_tls() {
            Ok(()) => {
                emit(SecurityEvent::TlsReloaded { ok: true, detail: "admin listener certificate and key re-read" })
            }
            Err(e) => emit(SecurityEvent::TlsReloaded { ok: false, detail: &format!("admin listener: {e}") }),
        }
    }
}

/// How often the server checks whether an audit checkpoint is due (one is
/// written at least hourly while records are added).
const AUDIT_CHECKPOINT_TICK: std::time::Duration = std::time::Duration::from_secs(60);

/// Starts the audit log's checkpoint task: checkpoints at least every hour
/// while records are added, and every checkpoint (CLI commands write some
/// too) emitted to this server's log.
fn start_audit_checkpoints(
    cfg: &Config,
    mail: &std::sync::Arc<MailStore>,
) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    use pop3connex_core::audit_log::{run_checkpoints, AuditLog};
    let log = std::sync::Arc::new(AuditLog::for_mail(mail, &cfg.store.path));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    (stop, tokio::spawn(run_checkpoints(log, AUDIT_CHECKPOINT_TICK, stopped)))
}
