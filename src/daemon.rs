//! Wiring: open the store, start the writer thread, the sources, the ticker and the sinks; map
//! signals; apply a reloaded config by component; tell systemd; shut down in order.
//!
//! Shutdown order (style.md §2.6): (1) `STOPPING=1`, cancel sources and ticker, which drop their
//! senders at a safe point; (2) the writer drains the channel, commits, acks, checkpoints and
//! exits; (3) sinks are cancelled: an in-flight request finishes within its own timeout, nothing
//! new starts; (4) wait at most `shutdown_grace_secs`, then exit anyway: committed data is safe.
//! Contains no SQL, parsing or protocol logic.

use crate::clock::ClockSteps;
use crate::config::Config;
use crate::sinks::SinkContext;

use crate::sources::{SharedStats, SourceStatus};
use crate::store::writer::{Writer, WriterMsg, WriterSettings, WriterStats};
use crate::store::{self, Options};
use crate::topology;
use anyhow::Context as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// How often the sources' status is compared and, when changed, stored.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// Store connection options from the config.
pub fn store_options(cfg: &Config) -> Options {
    Options {
        synchronous: cfg.store.synchronous,
        busy_timeout: Duration::from_millis(cfg.store.busy_timeout_ms),
    }
}

/// Handles the running daemon exposes (to the demo and tests).
#[derive(Clone)]
pub struct Handles {
    /// Writer counters.
    pub writer: Arc<WriterStats>,
    /// Latest committed event position.
    pub committed: watch::Receiver<i64>,
    /// Counters per source name.
    pub sources: Vec<(String, SharedStats)>,
}

/// How a running daemon is asked to reload its config (SIGHUP).
pub struct Reloads {
    /// One message per request.
    pub requests: mpsc::Receiver<()>,
    /// Reads and validates the config again.
    pub load: Box<dyn Fn() -> Result<Config, crate::config::LoadError> + Send + Sync>,
    /// The file `load` reads (for the outcome).
    pub path: std::path::PathBuf,
}

/// Runs the daemon until `shutdown` is cancelled (or a fatal error), without reloads.
///
/// # Errors
/// As [`run_with_reloads`].
pub async fn run(
    cfg: Config,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Handles>>,
) -> anyhow::Result<()> {
    run_with_reloads(cfg, shutdown, None, ready).await
}

/// Runs the daemon until `shutdown` is cancelled (or a fatal error), applying a reloaded config
/// on each request of `reloads` (see [`crate::reload`]).
///
/// `ready` receives the [`Handles`] once everything is started.
///
/// # Errors
/// Fatal problems only: the database cannot be opened or written, a component cannot be built.
pub async fn run_with_reloads(
    cfg: Config,
    shutdown: CancellationToken,
    mut reloads: Option<Reloads>,
    ready: Option<tokio::sync::oneshot::Sender<Handles>>,
) -> anyhow::Result<()> {
    for w in cfg.warnings() {
        tracing::warn!(key = %w.key, "Configuration: {}", w.problem);
    }
    let mut cfg = cfg;
    let mut ready = ready;
    let mut restarts = 0u32;
    loop {
        match run_once(&mut cfg, shutdown.clone(), reloads.as_mut(), ready.take()).await {
            Err(e)
                if is_corrupt(&e)
                    && !shutdown.is_cancelled()
                    && restarts < MAX_CORRUPT_RESTARTS =>
            {
                restarts += 1;
                tracing::error!(
                    error = format!("{e:#}"),
                    "The database became unreadable while running; moving it aside and restarting on a fresh one"
                );
                let path = cfg.store.path.clone();
                let moved =
                    tokio::task::spawn_blocking(move || store::quarantine(&path, "corrupt"))
                        .await
                        .context("the task moving the database aside failed")??;
                tracing::error!(moved_to = %moved.display(), "Damaged database kept for inspection");
            }
            r => return r,
        }
    }
}

/// Device ids configured for a source, with that source's name: serial devices (OTGW, Modbus
/// units) and MQTT allow-lists. Nobody else may report them.
fn reserved_devices(cfg: &Config) -> std::collections::HashMap<String, String> {
    let mut m = std::collections::HashMap::new();
    for s in &cfg.sources.mqtt {
        for d in &s.devices {
            m.insert(d.clone(), s.name.clone());
        }
    }
    for s in &cfg.sources.otgw {
        m.insert(s.device.clone(), s.name.clone());
    }
    for s in &cfg.sources.modbus {
        for u in &s.units {
            m.insert(u.device.clone(), s.name.clone());
        }
    }
    m.retain(|d, _| !d.is_empty());
    m
}

/// In-process restarts after a database turned corrupt while running; beyond them the daemon
/// exits (1) and systemd restarts it.
const MAX_CORRUPT_RESTARTS: u32 = 3;

/// Whether `e` comes from a damaged database file (SQLITE_CORRUPT / NOTADB).
fn is_corrupt(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<store::Error>().is_some_and(store::Error::is_corrupt)
            || matches!(c.downcast_ref::<crate::sinks::Error>(), Some(crate::sinks::Error::Store(s)) if s.is_corrupt())
    })
}

async fn run_once(
    cfg: &mut Config,
    shutdown: CancellationToken,
    mut reloads: Option<&mut Reloads>,
    ready: Option<tokio::sync::oneshot::Sender<Handles>>,
) -> anyhow::Result<()> {
    let (pipes, writer_parts) = Pipes::new(cfg);
    let components = build(cfg, &pipes)?;
    // Bound before the database is opened: a busy port fails the start like a bad secret.
    let listener = match cfg.metrics.addr() {
        Some(a) => Some(crate::metrics::bind(a).await?),
        None => None,
    };
    let mut writer = start_writer(cfg, writer_parts).await?;
    let (mut supervisor, mut failures) = topology::Supervisor::new();
    let sources = SourceList::default();
    let handles = start(&mut supervisor, components, &pipes.obs, &sources, &writer);
    if let Some(listener) = listener {
        let m = crate::metrics::Metrics::new(
            writer.stats.clone(),
            cfg.store.path.clone(),
            store_options(cfg),
            writer.committed.clone(),
            sources.clone(),
            &pipes.latencies,
        );
        tracing::info!(listen = %cfg.metrics.listen, "Serving /metrics and /healthz");
        supervisor.start_task(topology::Role::Sink, "metrics", move |tok| {
            crate::metrics::serve(m, listener, tok)
        });
    }
    record_start(cfg).await;
    announce(cfg, &writer, &handles, ready);
    let fatal = loop {
        match wait(
            &shutdown,
            &mut writer,
            &mut failures,
            reloads.as_deref_mut(),
        )
        .await
        {
            Wake::Stop(fatal) => break fatal,
            Wake::Reload => {
                if let Some(r) = reloads.as_deref() {
                    reload(cfg, r, &pipes, &mut supervisor, &sources).await;
                }
            }
        }
    };
    // From here only the sources (stopping) hold the writer's channel: it ends after them.
    drop(pipes);
    stop(
        &supervisor,
        writer,
        fatal,
        Duration::from_secs(cfg.pipeline.shutdown_grace_secs),
    )
    .await
}

/// The sources the status task and `/metrics` report, as a reload changes them.
type SourceList = crate::metrics::SourceList;

fn lock_sources(
    l: &SourceList,
) -> std::sync::MutexGuard<'_, Vec<(String, &'static str, SharedStats)>> {
    match l.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Records the daemon's pid in the database, so `hvac-edge reload` finds the process.
async fn record_start(cfg: &Config) {
    let (db, opts) = (cfg.store.path.clone(), store_options(cfg));
    let res = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let conn = store::open(&db, store::Mode::ReadWrite, &opts)?;
        store::reloads::record_daemon(&conn, &db, std::process::id(), crate::telemetry::now_ms())?;
        Ok(())
    })
    .await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(
            error = format!("{e:#}"),
            "Cannot record the daemon's pid; `hvac-edge reload` will need --pid"
        ),
        Err(e) => tracing::warn!(error = %e, "Cannot record the daemon's pid"),
    }
}

/// Re-reads the config and applies it (see [`crate::reload`]); tells systemd (`RELOADING=1`,
/// then `READY=1`), logs every problem with its key, and stores the outcome for
/// `hvac-edge reload`.
async fn reload(
    cfg: &mut Config,
    r: &Reloads,
    pipes: &Pipes,
    supervisor: &mut topology::Supervisor,
    sources: &SourceList,
) {
    let mut notify = vec![sd_notify::NotifyState::Reloading];
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        notify.push(now);
    }
    let _ = sd_notify::notify(&notify);
    tracing::info!(config = %r.path.display(), "Reloading the configuration");
    // Read before the file is: a request recorded later belongs to the next reload.
    let (db, opts) = (cfg.store.path.clone(), store_options(cfg));
    let request = tokio::task::spawn_blocking(move || {
        store::open(&db, store::Mode::ReadOnly, &opts)
            .and_then(|c| store::reloads::request(&c, &db))
            .ok()
    })
    .await
    .ok()
    .flatten()
    .filter(|n| *n != 0);
    let mut outcome = apply(cfg, r, pipes, supervisor, sources).await;
    outcome.request = request;
    if outcome.applied {
        tracing::info!("{}", outcome.summary());
        for p in &outcome.problems {
            tracing::error!(problem = %p, "Reload: a component could not be replaced");
        }
        for w in &outcome.warnings {
            tracing::warn!("Configuration: {w}");
        }
    } else {
        for p in &outcome.problems {
            tracing::error!(problem = %p, "Reload refused");
        }
        tracing::error!("{}", outcome.summary());
    }
    let (db, opts) = (cfg.store.path.clone(), store_options(cfg));
    let json = serde_json::to_string(&outcome).unwrap_or_default();
    let ok = outcome.applied;
    let stored = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let conn = store::open(&db, store::Mode::ReadWrite, &opts)?;
        store::reloads::record(
            &conn,
            &db,
            crate::telemetry::now_ms(),
            std::process::id(),
            ok,
            &json,
        )?;
        Ok(())
    })
    .await;
    if !matches!(stored, Ok(Ok(()))) {
        tracing::warn!("Cannot store the reload's outcome; `hvac-edge reload` will time out");
    }
    let summary = outcome.summary();
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&summary),
    ]);
}

/// The reload itself: validate, refuse what needs a restart, build, then stop the removed and
/// changed components, hand the writer its new settings, start the added and changed ones.
async fn apply(
    cfg: &mut Config,
    r: &Reloads,
    pipes: &Pipes,
    supervisor: &mut topology::Supervisor,
    sources: &SourceList,
) -> crate::reload::ReloadOutcome {
    use crate::reload::{ReloadOutcome, problems_of, restart_needed};
    use topology::Role;
    let path = r.path.display().to_string();
    let new = match (r.load)() {
        Ok(c) => c,
        Err(e) => return ReloadOutcome::refused(&path, problems_of(&e)),
    };
    let fixed = restart_needed(cfg, &new);
    if !fixed.is_empty() {
        return ReloadOutcome::refused(&path, fixed);
    }
    let built = match build(&new, pipes) {
        Ok(b) => b,
        Err(e) => return ReloadOutcome::refused(&path, vec![format!("{e:#}")]),
    };
    let plan = supervisor.plan(built);
    let mut outcome = ReloadOutcome {
        config: path,
        applied: true,
        started: plan.started,
        stopped: plan.stopped,
        restarted: plan.restarted,
        unchanged: plan.unchanged,
        writer_changed: settings_key(&writer_settings(cfg)) != settings_key(&writer_settings(&new)),
        problems: Vec::new(),
        warnings: new.warnings().iter().map(ToString::to_string).collect(),
        request: None,
    };
    // An in-flight request ends within its own timeout; a replacement must never run beside
    // the old instance (same cursor row, same MQTT client id): all told to stop at once, then
    // awaited under one deadline.
    let timeout = Duration::from_secs(new.pipeline.shutdown_grace_secs.max(10));
    let deadline = tokio::time::Instant::now() + timeout;
    for (role, name) in &plan.stop {
        if *role == Role::Source {
            lock_sources(sources).retain(|(n, _, _)| n != name);
        }
        supervisor.stop(*role, name);
    }
    for (role, name) in &plan.stop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // `stop` moved it out of the running set: wait on it as a stopping one.
        let _ = supervisor.stop_and_wait(*role, name, left).await;
    }
    let removed_sources: Vec<String> = plan
        .stop
        .iter()
        .filter(|(role, name)| {
            *role == Role::Source
                && !plan
                    .start
                    .iter()
                    .any(|c| c.role == Role::Source && &c.name == name)
        })
        .map(|(_, n)| n.clone())
        .collect();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let msg = WriterMsg::Reconfigure(Box::new(crate::channel::Reconfigure {
        settings: writer_settings(&new),
        removed_sources,
        applied: crate::channel::Ack::new(move || {
            let _ = tx.send(());
        }),
    }));
    // Bounded: a writer stuck on a disk that does not answer must not keep the daemon from
    // its other work (SIGTERM is looked at again once this returns).
    let taken = match tokio::time::timeout(timeout, pipes.obs.send(msg)).await {
        Ok(Ok(())) => matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(()))),
        _ => false,
    };
    if !taken {
        outcome.applied = false;
        outcome.problems.push(format!(
            "the writer did not take the new settings within {}s (a disk that does not answer?): sources and changed sinks were started again, added sinks were not; reload again later",
            timeout.as_secs()
        ));
    }
    for c in plan.start {
        if supervisor.still_stopping(c.role, &c.name) {
            let kind = if c.role == Role::Source {
                "source"
            } else {
                "sink"
            };
            outcome.problems.push(format!(
                "{kind} {}: its previous instance is still stopping (an in-flight request), so it was not started; reload again once it has ended, or restart the service",
                c.name
            ));
            outcome
                .started
                .retain(|x| x != &format!("{kind} {}", c.name));
            outcome
                .restarted
                .retain(|x| x != &format!("{kind} {}", c.name));
            continue;
        }
        let label = format!("sink {}", c.name);
        if !taken && c.role == Role::Sink && outcome.started.contains(&label) {
            // Garbage collection does not wait for its cursor yet: it must not start.
            outcome.started.retain(|x| x != &label);
            continue;
        }
        if let Some(st) = &c.stats {
            lock_sources(sources).push((c.name.clone(), c.kind, st.clone()));
        }
        supervisor.start(c);
    }
    if taken {
        *cfg = new;
    }
    outcome
}

/// The channels and shared state between the writer, the sources and the sinks (the daemon
/// keeps them to build components on a reload).
struct Pipes {
    obs: mpsc::Sender<WriterMsg>,
    committed: watch::Receiver<i64>,
    clock: Arc<ClockSteps>,
    latencies: crate::metrics::Latencies,
}

/// What the writer thread is started with.
struct WriterParts {
    rx: mpsc::Receiver<WriterMsg>,
    committed: watch::Sender<i64>,
    stats: Arc<WriterStats>,
    clock: Arc<ClockSteps>,
}

impl Pipes {
    fn new(cfg: &Config) -> (Pipes, WriterParts) {
        let (committed_tx, committed_rx) = watch::channel(0i64);
        let (obs_tx, obs_rx) = mpsc::channel::<WriterMsg>(cfg.pipeline.queue_len);
        let clock = Arc::new(ClockSteps::default());
        (
            Pipes {
                obs: obs_tx,
                committed: committed_rx,
                clock: clock.clone(),
                latencies: crate::metrics::Latencies::default(),
            },
            WriterParts {
                rx: obs_rx,
                committed: committed_tx,
                stats: Arc::new(WriterStats::default()),
                clock,
            },
        )
    }
}

/// Builds every source and sink before anything runs: a bad secret or port fails the start.
fn build(cfg: &Config, pipes: &Pipes) -> anyhow::Result<Vec<topology::Component>> {
    let (db, opts, committed, clock, clock_source, notes, latencies) = (
        cfg.store.path.clone(),
        store_options(cfg),
        pipes.committed.clone(),
        pipes.clock.clone(),
        cfg.gateway.clock,
        pipes.obs.downgrade(),
        pipes.latencies.clone(),
    );
    topology::build(
        cfg,
        &topology::Wiring {
            obs: pipes.obs.clone(),
            sink_context: Box::new(move |name: &str| SinkContext {
                db: db.clone(),
                opts: opts.clone(),
                committed: committed.clone(),
                clock: clock.clone(),
                clock_source,
                // Weak: the writer stops once the sources are gone, whatever the sinks hold.
                notes: Some(notes.clone()),
                delivery_latency: Some(latencies.for_sink(name)),
            }),
        },
    )
}

/// The running writer thread.
struct RunningWriter {
    stats: Arc<WriterStats>,
    committed: watch::Receiver<i64>,
    devices_at_start: usize,
    done: tokio::sync::oneshot::Receiver<Result<(), store::Error>>,
    result: Option<Result<Result<(), store::Error>, tokio::sync::oneshot::error::RecvError>>,
}

/// Opens (quarantining a damaged file), migrates and replays the database off the async
/// workers, then runs the writer on its own OS thread; it pets the watchdog after every commit.
async fn start_writer(cfg: &Config, parts: WriterParts) -> anyhow::Result<RunningWriter> {
    let (db, opts, settings) = (
        cfg.store.path.clone(),
        store_options(cfg),
        writer_settings(cfg),
    );
    let committed = parts.committed.subscribe();
    let (stats, clock, committed_tx) = (parts.stats.clone(), parts.clock, parts.committed);
    let open_stats = stats.clone();
    let mut writer = tokio::task::spawn_blocking(move || -> anyhow::Result<Writer> {
        let (conn, _quarantined) = store::open_for_daemon(&db, &opts)?;
        let mut w = Writer::open(conn, db, settings, committed_tx, open_stats)?;
        w.set_clock(clock);
        Ok(w)
    })
    .await
    .context("the task opening the database failed")??;
    let devices_at_start = writer.device_count();
    let mut last_status = Instant::now() - Duration::from_secs(60);
    writer.on_commit(move |st: &WriterStats| {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        if last_status.elapsed() >= Duration::from_secs(5) {
            last_status = Instant::now();
            let status = format!(
                "events committed {}, stored {}, evicted {}",
                st.events.load(Ordering::Relaxed),
                st.stored.load(Ordering::Relaxed),
                st.evicted.load(Ordering::Relaxed)
            );
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
        }
    });
    let rt = tokio::runtime::Handle::current();
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let rx = parts.rx;
    std::thread::Builder::new()
        .name("hvac-edge-writer".into())
        .spawn(move || {
            let _ = done_tx.send(writer.run(rx, rt));
        })
        .context("cannot start the writer thread")?;
    Ok(RunningWriter {
        stats,
        committed,
        devices_at_start,
        done,
        result: None,
    })
}

/// Starts every component and the daemon's own tasks (status, ticker); returns the handles.
/// The tasks hold clones of `obs`; the daemon keeps its own (for sources a reload adds) and
/// drops it before waiting for the writer.
fn start(
    supervisor: &mut topology::Supervisor,
    components: Vec<topology::Component>,
    obs: &mpsc::Sender<WriterMsg>,
    list: &SourceList,
    writer: &RunningWriter,
) -> Handles {
    let mut sources = Vec::new();
    for c in components {
        if let Some(st) = &c.stats {
            sources.push((c.name.clone(), st.clone()));
            lock_sources(list).push((c.name.clone(), c.kind, st.clone()));
        }
        supervisor.start(c);
    }
    // The sources' status, stored for `hvac-edge sources` when it changed (at most every
    // STATUS_EVERY; nothing is written while nothing changes).
    let tx = obs.clone();
    let named = list.clone();
    supervisor.start_task(topology::Role::Source, "status", |tok| async move {
        let mut iv = tokio::time::interval(STATUS_EVERY);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Vec<SourceStatus> = Vec::new();
        loop {
            tokio::select! {
                _ = iv.tick() => {}
                _ = tok.cancelled() => break,
            }
            let now: Vec<SourceStatus> = lock_sources(&named)
                .iter()
                .map(|(n, k, st)| st.snapshot(n, k))
                .collect();
            if now != last && tx.try_send(WriterMsg::Status(now.clone())).is_ok() {
                last = now;
            }
        }
    });
    let obs = obs.clone();
    supervisor.start_task(topology::Role::Source, "ticker", |tok| async move {
        let mut iv = tokio::time::interval(Duration::from_secs(1));
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = iv.tick() => { let _ = obs.try_send(WriterMsg::Tick); }
                _ = tok.cancelled() => break,
            }
        }
    });
    Handles {
        writer: writer.stats.clone(),
        committed: writer.committed.clone(),
        sources,
    }
}

/// `READY=1` (the database is open and migrated, every task started) and the start line.
fn announce(
    cfg: &Config,
    writer: &RunningWriter,
    handles: &Handles,
    ready: Option<tokio::sync::oneshot::Sender<Handles>>,
) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(
        gateway = %cfg.gateway.id, db = %cfg.store.path.display(), devices = writer.devices_at_start,
        sources = handles.sources.len(), sinks = cfg.sinks.len(), "hvac-edge running"
    );
    if let Some(r) = ready {
        let _ = r.send(handles.clone());
    }
}

/// Why [`wait`] returned.
enum Wake {
    /// Stop, with the fatal error if there is one.
    Stop(Option<anyhow::Error>),
    /// A reload was asked for.
    Reload,
}

/// Waits for a stop (`shutdown`, the writer ending, a component that stopped on its own: the
/// last two are fatal) or a reload request.
async fn wait(
    shutdown: &CancellationToken,
    writer: &mut RunningWriter,
    failures: &mut mpsc::Receiver<anyhow::Error>,
    reloads: Option<&mut Reloads>,
) -> Wake {
    let reload = async move {
        let asked = match reloads {
            Some(r) => r.requests.recv().await.is_some(),
            None => false,
        };
        if !asked {
            // No reloads, or nobody can ask any more: never.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        // A stop wins over a reload asked at the same moment.
        biased;
        _ = shutdown.cancelled() => Wake::Stop(None),
        r = &mut writer.done => {
            writer.result = Some(r);
            Wake::Stop(None)
        }
        Some(e) = failures.recv() => {
            tracing::error!(error = format!("{e:#}"), "A component stopped; shutting down so that systemd restarts the daemon");
            Wake::Stop(Some(e))
        }
        () = reload => Wake::Reload,
    }
}

/// The shutdown order: sources (and the daemon's tasks) stop; the writer drains, commits, acks
/// and exits; the sinks get `grace` to finish what is in flight.
async fn stop(
    supervisor: &topology::Supervisor,
    writer: RunningWriter,
    mut fatal: Option<anyhow::Error>,
    grace: Duration,
) -> anyhow::Result<()> {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("Shutting down: stopping sources, flushing the writer");
    if !supervisor.stop_sources(grace).await {
        tracing::error!(
            grace_secs = grace.as_secs(),
            "A source did not stop within the grace period; what it handed over is committed, the rest stays with the broker or device"
        );
    }
    let result = match writer.result {
        Some(r) => Some(r),
        // A source that never stopped still holds the writer's channel: do not wait forever.
        None => tokio::time::timeout(grace * 2, writer.done).await.ok(),
    };
    let Some(result) = result else {
        tracing::error!(
            "The writer did not finish within twice the grace period; exiting (committed events are safe)"
        );
        return Err(fatal.unwrap_or_else(|| anyhow::anyhow!("the writer did not finish in time")));
    };
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => fatal = fatal.or(Some(anyhow::Error::new(e).context("the writer failed"))),
        Err(_) => {
            fatal = fatal.or(Some(anyhow::anyhow!(
                "the writer thread ended unexpectedly"
            )))
        }
    }
    if !supervisor.stop_sinks(grace).await {
        tracing::error!(
            grace_secs = grace.as_secs(),
            "Sinks still delivering after the grace period; exiting anyway (committed events are safe and will be resent)"
        );
    }
    tracing::info!(
        events = writer.stats.events.load(Ordering::Relaxed),
        "hvac-edge stopped"
    );
    match fatal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The writer's settings as comparable text (maps sorted: a `HashMap`'s order is random).
fn settings_key(s: &WriterSettings) -> String {
    let devices: std::collections::BTreeMap<_, _> = s
        .devices
        .iter()
        .map(|(k, v)| (k, format!("{v:?}")))
        .collect();
    let reserved: std::collections::BTreeMap<_, _> = s.reserved.iter().collect();
    format!(
        "{devices:?}|{reserved:?}|{:?}|{}|{:?}|{}|{:?}|{:?}|{}|{}|{}|{}|{:?}|{:?}|{:?}",
        s.policy,
        s.batch_max,
        s.commit_delay,
        s.snapshot_interval_ms,
        s.checkpoint_interval,
        s.sinks,
        s.max_bytes,
        s.max_events,
        s.max_dead_letters,
        s.max_devices,
        s.device_expiry,
        s.clock_source,
        s.default_plant
    )
}

/// The writer's settings from the config.
fn writer_settings(cfg: &Config) -> WriterSettings {
    WriterSettings {
        gateway: cfg.gateway.id.clone(),
        default_plant: cfg.gateway.plant.clone(),
        devices: cfg.device_meta(),
        policy: cfg.diff_policy(),
        batch_max: cfg.pipeline.batch_max,
        commit_delay: Duration::from_millis(cfg.pipeline.commit_delay_ms),
        snapshot_interval_ms: (cfg.pipeline.snapshot_interval_secs as i64).saturating_mul(1000),
        checkpoint_interval: Duration::from_secs(cfg.pipeline.checkpoint_interval_secs),
        sinks: cfg.sinks.names(),
        max_bytes: cfg.store.max_bytes,
        max_events: cfg.store.max_events,
        max_devices: cfg.pipeline.max_devices,
        max_dead_letters: cfg.store.max_dead_letters,
        clock_source: cfg.gateway.clock,
        reserved: reserved_devices(cfg),
        device_expiry: Duration::from_secs(cfg.pipeline.device_expiry_secs),
    }
}

/// Cancels `token` on SIGTERM or SIGINT; forwards each SIGHUP to `reload` (a request that
/// arrives while one is waiting is merged with it).
///
/// # Errors
/// When the signal handlers cannot be installed.
pub fn spawn_signal_handler(
    token: CancellationToken,
    reload: Option<mpsc::Sender<()>>,
) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM received"); token.cancel(); break; }
                _ = int.recv() => { tracing::info!("SIGINT received"); token.cancel(); break; }
                _ = hup.recv() => match &reload {
                    Some(tx) => {
                        tracing::info!("SIGHUP received: reloading the configuration");
                        let _ = tx.try_send(());
                    }
                    None => tracing::warn!("SIGHUP received, but this process does not reload its configuration"),
                },
            }
        }
    });
    Ok(())
}
