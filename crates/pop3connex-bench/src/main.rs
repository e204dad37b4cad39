//! pop3connex-bench: a cheap load generator for comparing POP3 servers (POP3conneX, Dovecot).
//!
//! It runs on a single-threaded tokio runtime so that the client costs as little CPU as
//! possible on the machine it shares with the server, and it reports its own CPU time so that
//! the client's share of the machine can be stated next to the results.
//!
//! Every subcommand prints human-readable progress on stderr and one machine-readable line on
//! stdout that starts with `RESULT ` followed by `key=value` fields (`bench/run.sh` parses it).

mod corpus;
mod lmtp;
mod pop3;
mod procfs;
mod scram;
mod tls;
mod users;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use pop3::{AuthMode, Pop3Client};
use procfs::CpuSample;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tls::TlsTarget;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use users::User;

#[derive(Parser)]
#[command(name = "pop3connex-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Loop full POP3S sessions: TLS, login, STAT, LIST, UIDL, RETR every message, QUIT.
    Pop3sSessions(SessionArgs),
    /// Loop TLS handshake + login + QUIT (TLS logins per second).
    Logins(SessionArgs),
    /// Open many authenticated POP3S sessions and hold them idle (memory per session).
    Idle(IdleArgs),
    /// Brute-force attacker: many failed logins (wrong passwords) over TLS, several per
    /// connection, until --attempts are made or refused or --max-duration passes.
    Attack(AttackArgs),
    /// LMTP deliveries per second (LHLO once per connection; MAIL, RCPT, DATA per message).
    Lmtp(LmtpArgs),
    /// Write a deterministic corpus of messages (DIR/msg-NNNNN.eml).
    Corpus(CorpusArgs),
    /// Print CPU time and memory (RSS, PSS, USS) of a process and all its descendants.
    Proc(ProcArgs),
}

#[derive(Args)]
struct TlsArgs {
    /// POP3S (implicit TLS) address of the server under test.
    #[arg(long)]
    addr: SocketAddr,
    /// PEM file with the CA certificate(s) to trust.
    #[arg(long)]
    ca: PathBuf,
    /// Name to verify in the server certificate (SNI).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Login method (`--mech` is an alias).
    #[arg(long, alias = "mech", value_enum, default_value = "user")]
    auth: AuthMode,
    /// Local address to connect from (e.g. 127.0.0.2: another loopback client address).
    #[arg(long)]
    source: Option<std::net::IpAddr>,
    /// Time limit for one session (or one login in `idle`), seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// `name:password` per line.
    #[arg(long)]
    users_file: PathBuf,
    /// PID of the server (root of its process tree) whose CPU time is reported.
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(Args)]
struct SessionArgs {
    #[command(flatten)]
    tls: TlsArgs,
    /// Concurrent clients. Users are partitioned between clients, so no two clients use the
    /// same mailbox at the same time (as long as there are at least as many users).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Measurement window, seconds.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Load before the measurement window starts (not counted), seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Instead of a timed run: one session for every user, then stop (priming, validation).
    #[arg(long)]
    once: bool,
    /// Fail a session whose STAT does not report exactly this many messages.
    #[arg(long)]
    expect_messages: Option<u64>,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    tls: TlsArgs,
    /// Number of authenticated sessions to open (user i uses line i of the users file).
    #[arg(long, default_value_t = 2000)]
    sessions: usize,
    /// Logins in flight at once while establishing.
    #[arg(long, default_value_t = 16)]
    connect_concurrency: usize,
    /// Wait after the last session is established before measuring memory, seconds.
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// Keep the sessions this long after measuring (SIGTERM/SIGINT end the hold early), seconds.
    #[arg(long, default_value_t = 60.0)]
    hold: f64,
    /// Send NOOP on every session this often during the hold (0 = never), seconds.
    #[arg(long, default_value_t = 0.0)]
    noop_interval: f64,
}

#[derive(Args)]
struct AttackArgs {
    #[command(flatten)]
    tls: TlsArgs,
    /// Login attempts to make in total (a refused connection uses up one attempt).
    #[arg(long, default_value_t = 10_000)]
    attempts: u64,
    /// Parallel attacker connections.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Attempts per connection before reconnecting.
    #[arg(long, default_value_t = 50)]
    per_conn: u64,
    /// Stop after this many seconds even if attempts remain.
    #[arg(long, default_value_t = 60.0)]
    max_duration: f64,
}

#[derive(Args)]
struct LmtpArgs {
    /// LMTP address (TCP).
    #[arg(long)]
    addr: SocketAddr,
    /// One recipient address per line; message i goes to recipient i mod N (see --rcpts-per-msg).
    #[arg(long)]
    recipients_file: PathBuf,
    /// Concurrent LMTP connections.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Number of messages (transactions) to send.
    #[arg(long)]
    count: u64,
    /// Size of generated messages in octets (ignored with --corpus).
    #[arg(long, default_value_t = 4400)]
    size: usize,
    /// Send the .eml files of this directory instead of generated messages. Transaction t goes
    /// to recipients t*K .. t*K+K-1 (mod N) and carries file number (t*K / N) mod FILES, so
    /// with --count FILES*N/K every recipient receives every file exactly once.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Corpus seed for generated messages.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Recipients per transaction (K).
    #[arg(long, default_value_t = 1)]
    rcpts_per_msg: usize,
    /// Transactions per connection before QUIT and reconnect (0 = unlimited).
    #[arg(long, default_value_t = 100)]
    msgs_per_conn: u64,
    /// Envelope sender.
    #[arg(long, default_value = "bench-sender@bench.invalid")]
    mail_from: String,
    #[arg(long, default_value = "bench.localhost")]
    lhlo: String,
    /// Time limit for one transaction, seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Stop starting new transactions after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    max_duration: f64,
    /// PID of the server (root of its process tree) whose CPU time is reported.
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(Args)]
struct CorpusArgs {
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    count: u64,
    #[arg(long, default_value_t = 4400)]
    size: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct ProcArgs {
    /// Root of the process tree.
    #[arg(long)]
    pid: u32,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Corpus(a) => {
            corpus::write_corpus(&a.out, a.seed, a.count, a.size)?;
            eprintln!("wrote {} messages of {} octets to {}", a.count, a.size, a.out.display());
            println!("RESULT mode=corpus count={} size={} seed={}", a.count, a.size, a.seed);
            Ok(())
        }
        Cmd::Proc(a) => {
            let m = procfs::tree_mem(a.pid)?;
            let cpu = procfs::tree_cpu_secs(a.pid)?;
            println!(
                "RESULT mode=proc pid={} procs={} rss_kib={} pss_kib={} uss_kib={} cpu_s={cpu:.2} pss_by_comm={}",
                a.pid,
                m.procs,
                m.rss_kib,
                m.pss_kib,
                m.uss_kib,
                m.by_comm_field()
            );
            Ok(())
        }
        cmd => {
            // One thread: the load generator must stay cheap next to the server it measures.
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                match cmd {
                    Cmd::Pop3sSessions(a) => run_sessions(a, true).await,
                    Cmd::Logins(a) => run_sessions(a, false).await,
                    Cmd::Idle(a) => run_idle(a).await,
                    Cmd::Lmtp(a) => run_lmtp(a).await,
                    Cmd::Attack(a) => run_attack(a).await,
                    Cmd::Corpus(_) | Cmd::Proc(_) => unreachable!("handled above"),
                }
            })
        }
    }
}

fn secs(s: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("invalid {what}: {s}"))
}

/// Counters of one worker, merged at the end.
#[derive(Default)]
struct Tally {
    ok: u64,
    messages: u64,
    octets: u64,
    latencies_us: Vec<u64>,
    errors: u64,
    errors_total: u64,
    error_kinds: BTreeMap<String, u64>,
    tls: Option<String>,
}

impl Tally {
    fn error(&mut self, e: &anyhow::Error, counted: bool) {
        self.errors_total += 1;
        if counted {
            self.errors += 1;
        }
        let kind: String = format!("{e:#}").chars().take(200).collect();
        *self.error_kinds.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, o: Tally) {
        self.ok += o.ok;
        self.messages += o.messages;
        self.octets += o.octets;
        self.latencies_us.extend(o.latencies_us);
        self.errors += o.errors;
        self.errors_total += o.errors_total;
        for (k, v) in o.error_kinds {
            *self.error_kinds.entry(k).or_default() += v;
        }
        if self.tls.is_none() {
            self.tls = o.tls;
        }
    }

    /// p50/p90/p99/max latency fields in milliseconds.
    fn latency_fields(&mut self) -> String {
        let v = &mut self.latencies_us;
        if v.is_empty() {
            return "p50_ms=0 p90_ms=0 p99_ms=0 max_ms=0".into();
        }
        v.sort_unstable();
        let pick = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
        format!("p50_ms={:.1} p90_ms={:.1} p99_ms={:.1} max_ms={:.1}", pick(0.50), pick(0.90), pick(0.99), pick(1.0))
    }

    fn print_errors(&self) {
        for (kind, n) in self.error_kinds.iter().take(10) {
            eprintln!("  error x{n}: {kind}");
        }
    }
}

/// Where a timed run counts results.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
    once: bool,
}

impl Window {
    fn counts(&self, finished: Instant) -> bool {
        self.once || (finished >= self.start && finished <= self.end)
    }
}

async fn one_session(
    target: &TlsTarget,
    user: &User,
    auth: AuthMode,
    full: bool,
    expect: Option<u64>,
    want_tls: bool,
) -> Result<(pop3::SessionCounts, Option<String>)> {
    let mut c = Pop3Client::connect(target).await?;
    let tls = want_tls.then(|| c.tls_description());
    c.login(user, auth).await?;
    let counts = if full { c.download_all(expect).await? } else { pop3::SessionCounts::default() };
    c.quit().await?;
    Ok((counts, tls))
}

struct SessionCtx {
    target: TlsTarget,
    auth: AuthMode,
    full: bool,
    expect: Option<u64>,
    window: Window,
}

async fn session_worker(ctx: Arc<SessionCtx>, users: Vec<User>) -> Tally {
    let mut t = Tally::default();
    let mut i = 0usize;
    loop {
        if ctx.window.once {
            if i >= users.len() {
                break;
            }
        } else if Instant::now() >= ctx.window.end {
            break;
        }
        let user = &users[i % users.len()];
        i += 1;
        let started = Instant::now();
        let res = timeout(
            ctx.target.timeout,
            one_session(&ctx.target, user, ctx.auth, ctx.full, ctx.expect, t.tls.is_none()),
        )
        .await;
        let finished = Instant::now();
        let counted = ctx.window.counts(finished);
        match res {
            Ok(Ok((counts, tls))) => {
                if t.tls.is_none() {
                    t.tls = tls;
                }
                if counted {
                    t.ok += 1;
                    t.messages += counts.messages;
                    t.octets += counts.octets;
                    t.latencies_us.push((finished - started).as_micros().min(u64::MAX as u128) as u64);
                }
            }
            Ok(Err(e)) => {
                t.error(&e.context(format!("user {}", user.name)), counted);
                sleep(Duration::from_millis(20)).await;
            }
            Err(_) => {
                t.error(&anyhow::anyhow!("session timed out"), counted);
            }
        }
    }
    t
}

async fn run_sessions(a: SessionArgs, full: bool) -> Result<()> {
    let mode = if full { "pop3s-sessions" } else { "logins" };
    let users = users::load_users(&a.tls.users_file)?;
    let conc = a.concurrency.max(1);
    if users.len() < conc {
        eprintln!(
            "warning: {} users for {conc} clients: some mailboxes are used by several clients at once",
            users.len()
        );
    }
    // Client w gets users w, w+conc, w+2*conc, ... (or a shared one if there are too few).
    let mut parts: Vec<Vec<User>> = vec![Vec::new(); conc];
    for (i, u) in users.iter().enumerate() {
        parts[i % conc].push(u.clone());
    }
    for (w, part) in parts.iter_mut().enumerate() {
        if part.is_empty() {
            part.push(users[w % users.len()].clone());
        }
    }
    let mut target = TlsTarget::new(a.tls.addr, &a.tls.ca, &a.tls.server_name, secs(a.tls.timeout, "--timeout")?)?;
    target.source = a.tls.source;
    let t0 = Instant::now();
    let start = t0 + secs(a.warmup, "--warmup")?;
    let end = start + secs(a.duration, "--duration")?;
    let ctx = Arc::new(SessionCtx {
        target,
        auth: a.tls.auth,
        full,
        expect: a.expect_messages,
        window: Window { start: if a.once { t0 } else { start }, end, once: a.once },
    });
    let mut set = JoinSet::new();
    for part in parts {
        set.spawn(session_worker(ctx.clone(), part));
    }
    let mut total = Tally::default();
    let (cpu0, cpu1, window_s) = if a.once {
        let cpu0 = CpuSample::take(a.tls.server_pid)?;
        while let Some(r) = set.join_next().await {
            total.merge(r?);
        }
        (cpu0, CpuSample::take(a.tls.server_pid)?, t0.elapsed())
    } else {
        sleep_until(start).await;
        let cpu0 = CpuSample::take(a.tls.server_pid)?;
        sleep_until(end).await;
        let cpu1 = CpuSample::take(a.tls.server_pid)?;
        while let Some(r) = set.join_next().await {
            total.merge(r?);
        }
        (cpu0, cpu1, end - start)
    };
    let w = window_s.as_secs_f64();
    total.print_errors();
    let rate = total.ok as f64 / w;
    let latency = total.latency_fields();
    eprintln!("{mode}: {} sessions in {w:.1}s = {rate:.1}/s with {conc} clients, {} errors", total.ok, total.errors);
    println!(
        "RESULT mode={mode} concurrency={conc} window_s={w:.3} sessions={} rate={rate:.2} errors={} errors_total={} messages={} octets={} {} {} tls={} auth={:?} client_pbkdf2_runs={}",
        total.ok,
        total.errors,
        total.errors_total,
        total.messages,
        total.octets,
        latency,
        cpu0.fields_until(&cpu1),
        total.tls.as_deref().unwrap_or("none"),
        a.tls.auth,
        scram::pbkdf2_runs(),
    );
    Ok(())
}

async fn login_with_retries(target: &TlsTarget, user: &User, auth: AuthMode) -> Result<Pop3Client> {
    let mut last = None;
    for attempt in 0..3 {
        if attempt > 0 {
            sleep(Duration::from_millis(250)).await;
        }
        let r = timeout(target.timeout, async {
            let mut c = Pop3Client::connect(target).await?;
            c.login(user, auth).await?;
            Ok::<_, anyhow::Error>(c)
        })
        .await;
        match r {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(anyhow::anyhow!("login timed out")),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
}

async fn run_idle(a: IdleArgs) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let users = users::load_users(&a.tls.users_file)?;
    if users.len() < a.sessions {
        eprintln!("warning: {} users for {} sessions: users get several sessions", users.len(), a.sessions);
    }
    let target =
        Arc::new(TlsTarget::new(a.tls.addr, &a.tls.ca, &a.tls.server_name, secs(a.tls.timeout, "--timeout")?)?);
    if a.tls.source.is_some() {
        bail!("--source is supported by pop3s-sessions, logins and attack");
    }
    let mut term = signal(SignalKind::terminate())?;
    let mem0 = match a.tls.server_pid {
        Some(pid) => Some(procfs::tree_mem(pid)?),
        None => None,
    };
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(a.connect_concurrency.max(1)));
    let mut set = JoinSet::new();
    for i in 0..a.sessions {
        let user = users[i % users.len()].clone();
        let (sem, target, auth) = (sem.clone(), target.clone(), a.tls.auth);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            login_with_retries(&target, &user, auth).await.with_context(|| format!("user {}", user.name))
        });
    }
    let mut clients = Vec::with_capacity(a.sessions);
    let mut failures = Tally::default();
    while let Some(r) = set.join_next().await {
        match r? {
            Ok(c) => clients.push(c),
            Err(e) => failures.error(&e, true),
        }
    }
    let establish_s = t0.elapsed().as_secs_f64();
    failures.print_errors();
    let tls = clients.first().map(|c| c.tls_description()).unwrap_or_else(|| "none".into());
    println!("ESTABLISHED sessions={} failed={} establish_s={establish_s:.2}", clients.len(), failures.errors);
    std::io::stdout().flush()?;
    eprintln!("idle: {} sessions established in {establish_s:.1}s ({} failed)", clients.len(), failures.errors);
    sleep(secs(a.settle, "--settle")?).await;
    let n = clients.len() as f64;
    let mut line = format!(
        "RESULT mode=idle sessions={} failed={} establish_s={establish_s:.2} tls={tls}",
        clients.len(),
        failures.errors
    );
    if let (Some(pid), Some(m0)) = (a.tls.server_pid, mem0) {
        let m1 = procfs::tree_mem(pid)?;
        let per = |b: u64, a: u64| {
            if n > 0.0 {
                (a as f64 - b as f64) / n
            } else {
                0.0
            }
        };
        line.push_str(&format!(
            " procs_before={} procs_after={} rss_before_kib={} rss_after_kib={} pss_before_kib={} pss_after_kib={} uss_before_kib={} uss_after_kib={} rss_per_session_kib={:.1} pss_per_session_kib={:.1} uss_per_session_kib={:.1}",
            m0.procs, m1.procs, m0.rss_kib, m1.rss_kib, m0.pss_kib, m1.pss_kib, m0.uss_kib, m1.uss_kib,
            per(m0.rss_kib, m1.rss_kib), per(m0.pss_kib, m1.pss_kib), per(m0.uss_kib, m1.uss_kib),
        ));
        line.push_str(&format!(" pss_by_comm_after={}", m1.by_comm_field()));
    }
    println!("{line}");
    std::io::stdout().flush()?;

    // Hold, optionally with NOOPs, until the time is up or we are told to stop.
    let hold_end = Instant::now() + secs(a.hold, "--hold")?;
    let noop = if a.noop_interval > 0.0 { Some(secs(a.noop_interval, "--noop-interval")?) } else { None };
    loop {
        let next = match noop {
            Some(d) => (Instant::now() + d).min(hold_end),
            None => hold_end,
        };
        tokio::select! {
            _ = sleep_until(next) => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        if Instant::now() >= hold_end {
            break;
        }
        let mut noop_errors = 0u64;
        for c in clients.iter_mut() {
            if timeout(target.timeout, c.noop()).await.map_or(true, |r| r.is_err()) {
                noop_errors += 1;
            }
        }
        if noop_errors > 0 {
            eprintln!("idle: {noop_errors} NOOPs failed");
        }
    }
    let mut set = JoinSet::new();
    for c in clients {
        set.spawn(async move { timeout(Duration::from_secs(10), c.quit()).await });
    }
    let (mut quit_ok, mut quit_err) = (0u64, 0u64);
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(Ok(()))) => quit_ok += 1,
            _ => quit_err += 1,
        }
    }
    eprintln!("idle: closed sessions ({quit_ok} QUIT ok, {quit_err} failed)");
    Ok(())
}

struct LmtpCtx {
    addr: SocketAddr,
    lhlo: String,
    from: String,
    rcpts: Vec<String>,
    pool: Vec<Vec<u8>>,
    k: usize,
    count: u64,
    per_conn: u64,
    timeout: Duration,
    deadline: Instant,
    next: AtomicU64,
}

async fn lmtp_worker(ctx: Arc<LmtpCtx>) -> Tally {
    let mut t = Tally::default();
    let mut conn: Option<lmtp::LmtpClient> = None;
    let mut used = 0u64;
    loop {
        if Instant::now() >= ctx.deadline {
            break;
        }
        let i = ctx.next.fetch_add(1, Ordering::Relaxed);
        if i >= ctx.count {
            break;
        }
        if ctx.per_conn > 0 && used >= ctx.per_conn {
            if let Some(c) = conn.take() {
                if let Err(e) =
                    timeout(ctx.timeout, c.quit()).await.unwrap_or_else(|_| Err(anyhow::anyhow!("QUIT timed out")))
                {
                    t.error(&e, true);
                }
            }
        }
        let first = (i as usize).wrapping_mul(ctx.k);
        let rcpts: Vec<&str> = (0..ctx.k).map(|j| ctx.rcpts[(first + j) % ctx.rcpts.len()].as_str()).collect();
        let msg = &ctx.pool[(first / ctx.rcpts.len()) % ctx.pool.len()];
        let started = Instant::now();
        let res = timeout(ctx.timeout, async {
            if conn.is_none() {
                conn = Some(lmtp::LmtpClient::connect(ctx.addr, &ctx.lhlo).await?);
                used = 0;
            }
            let c = conn.as_mut().context("no LMTP connection (cannot happen)")?;
            c.deliver(&ctx.from, &rcpts, msg).await
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("LMTP transaction timed out")));
        used += 1;
        match res {
            Ok(()) => {
                t.ok += 1;
                t.messages += ctx.k as u64;
                t.octets += msg.len() as u64;
                t.latencies_us.push(started.elapsed().as_micros().min(u64::MAX as u128) as u64);
            }
            Err(e) => {
                t.error(&e, true);
                conn = None;
                sleep(Duration::from_millis(20)).await;
            }
        }
    }
    if let Some(c) = conn {
        if let Ok(Err(e)) = timeout(ctx.timeout, c.quit()).await {
            t.error(&e, true);
        }
    }
    t
}

async fn run_lmtp(a: LmtpArgs) -> Result<()> {
    let rcpts = users::load_recipients(&a.recipients_file)?;
    if a.rcpts_per_msg == 0 {
        bail!("--rcpts-per-msg must be at least 1");
    }
    let raw = match &a.corpus {
        Some(dir) => corpus::read_corpus(dir)?,
        None => (0..64).map(|i| corpus::message(a.seed, i, a.size)).collect::<Result<_>>()?,
    };
    let pool: Vec<Vec<u8>> = raw.iter().map(|m| corpus::dot_stuff(m)).collect();
    let conc = a.concurrency.max(1);
    let t0 = Instant::now();
    let ctx = Arc::new(LmtpCtx {
        addr: a.addr,
        lhlo: a.lhlo,
        from: a.mail_from,
        rcpts,
        pool,
        k: a.rcpts_per_msg,
        count: a.count,
        per_conn: a.msgs_per_conn,
        timeout: secs(a.timeout, "--timeout")?,
        deadline: t0 + secs(a.max_duration, "--max-duration")?,
        next: AtomicU64::new(0),
    });
    let cpu0 = CpuSample::take(a.server_pid)?;
    let mut set = JoinSet::new();
    for _ in 0..conc {
        set.spawn(lmtp_worker(ctx.clone()));
    }
    let mut total = Tally::default();
    while let Some(r) = set.join_next().await {
        total.merge(r?);
    }
    let cpu1 = CpuSample::take(a.server_pid)?;
    let w = t0.elapsed().as_secs_f64();
    total.print_errors();
    let deliveries = total.messages;
    let rate = deliveries as f64 / w;
    let latency = total.latency_fields();
    eprintln!(
        "lmtp: {} transactions, {deliveries} deliveries in {w:.1}s = {rate:.1} deliveries/s with {conc} connections, {} errors",
        total.ok, total.errors
    );
    println!(
        "RESULT mode=lmtp concurrency={conc} window_s={w:.3} transactions={} deliveries={deliveries} rate={rate:.2} errors={} errors_total={} octets={} rcpts_per_msg={} {} {}",
        total.ok,
        total.errors,
        total.errors_total,
        total.octets,
        ctx.k,
        latency,
        cpu0.fields_until(&cpu1),
    );
    Ok(())
}

/// What the attacker saw.
#[derive(Default)]
struct AttackTally {
    /// Attempts that got an answer (-ERR) from the server.
    answered: u64,
    /// Attempts that got +OK (must stay 0: the passwords are wrong).
    accepted: u64,
    /// Attempts lost because the connection broke or timed out before the answer.
    unanswered: u64,
    /// Connections that reached the POP3 greeting.
    conns_ok: u64,
    /// Connections refused: TCP connect failed, TLS handshake failed or closed, no +OK greeting.
    conns_refused: u64,
    /// Connections closed or reset by the server after the greeting.
    conns_dropped: u64,
    error_kinds: BTreeMap<String, u64>,
}

struct AttackCtx {
    target: TlsTarget,
    users: Vec<User>,
    auth: AuthMode,
    attempts: u64,
    per_conn: u64,
    deadline: Instant,
    next: AtomicU64,
}

impl AttackCtx {
    /// Claims the next attempt number, or None when the budget or the time is used up.
    fn claim(&self) -> Option<u64> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.attempts).then_some(i)
    }
}

async fn attack_worker(ctx: Arc<AttackCtx>) -> AttackTally {
    let mut t = AttackTally::default();
    let note = |t: &mut AttackTally, e: &anyhow::Error| {
        let kind: String = format!("{e:#}").chars().take(160).collect();
        *t.error_kinds.entry(kind).or_default() += 1;
    };
    'outer: while let Some(mut i) = ctx.claim() {
        let left = ctx.deadline.saturating_duration_since(Instant::now());
        let conn = match timeout(ctx.target.timeout.min(left), Pop3Client::connect(&ctx.target)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                t.conns_refused += 1;
                note(&mut t, &e);
                continue;
            }
            Err(_) => {
                t.conns_refused += 1;
                note(&mut t, &anyhow::anyhow!("connect/greeting timed out"));
                continue;
            }
        };
        t.conns_ok += 1;
        let mut conn = conn;
        let mut n = 0u64;
        loop {
            let user = &ctx.users[(i as usize) % ctx.users.len()];
            let left = ctx.deadline.saturating_duration_since(Instant::now());
            match timeout(ctx.target.timeout.min(left), conn.wrong_login(user, ctx.auth)).await {
                Ok(Ok(true)) => t.answered += 1,
                Ok(Ok(false)) => t.accepted += 1,
                Ok(Err(e)) => {
                    t.unanswered += 1;
                    t.conns_dropped += 1;
                    note(&mut t, &e);
                    continue 'outer;
                }
                Err(_) => {
                    t.unanswered += 1;
                    if Instant::now() < ctx.deadline {
                        note(&mut t, &anyhow::anyhow!("attempt timed out"));
                    }
                    continue 'outer;
                }
            }
            n += 1;
            if n >= ctx.per_conn {
                let _ = timeout(Duration::from_secs(2), conn.quit()).await;
                continue 'outer;
            }
            match ctx.claim() {
                Some(j) => i = j,
                None => break 'outer,
            }
        }
    }
    t
}

async fn run_attack(a: AttackArgs) -> Result<()> {
    let users = users::load_users(&a.tls.users_file)?;
    let mut target = TlsTarget::new(a.tls.addr, &a.tls.ca, &a.tls.server_name, secs(a.tls.timeout, "--timeout")?)?;
    target.source = a.tls.source;
    let t0 = Instant::now();
    let ctx = Arc::new(AttackCtx {
        target,
        users,
        auth: a.tls.auth,
        attempts: a.attempts,
        per_conn: a.per_conn.max(1),
        deadline: t0 + secs(a.max_duration, "--max-duration")?,
        next: AtomicU64::new(0),
    });
    let mut set = JoinSet::new();
    for _ in 0..a.concurrency.max(1) {
        set.spawn(attack_worker(ctx.clone()));
    }
    let mut t = AttackTally::default();
    while let Some(r) = set.join_next().await {
        let o = r?;
        t.answered += o.answered;
        t.accepted += o.accepted;
        t.unanswered += o.unanswered;
        t.conns_ok += o.conns_ok;
        t.conns_refused += o.conns_refused;
        t.conns_dropped += o.conns_dropped;
        for (k, v) in o.error_kinds {
            *t.error_kinds.entry(k).or_default() += v;
        }
    }
    let w = t0.elapsed().as_secs_f64();
    for (kind, n) in t.error_kinds.iter().take(10) {
        eprintln!("  attacker error x{n}: {kind}");
    }
    let made = t.answered + t.accepted + t.unanswered + t.conns_refused;
    eprintln!(
        "attack: {made} attempts in {w:.1}s: {} answered, {} accepted, {} unanswered, {} connections ok, {} refused, {} dropped",
        t.answered, t.accepted, t.unanswered, t.conns_ok, t.conns_refused, t.conns_dropped
    );
    println!(
        "RESULT mode=attack window_s={w:.3} attempts={made} answered={} accepted={} unanswered={} conns_ok={} conns_refused={} conns_dropped={} source={}",
        t.answered,
        t.accepted,
        t.unanswered,
        t.conns_ok,
        t.conns_refused,
        t.conns_dropped,
        a.tls.source.map(|s| s.to_string()).unwrap_or_else(|| "default".into()),
    );
    Ok(())
}
