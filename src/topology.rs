//! The daemon's topology: every source and sink is *built* from the config first (ports,
//! mappings, secrets, TLS files: a problem fails the start before anything runs), then
//! *started* under one [`Supervisor`] keyed by component name, each with its own cancellation
//! token (a child of its role's token), so one can be stopped or replaced without touching the
//! others (reload). Every task, component or internal, is reported the same way when it ends
//! on its own: an error or a panic goes to the supervisor's failure channel, which stops the
//! daemon (exit 1, systemd restarts it) rather than leave it running without a part.

use crate::channel::WriterMsg;
use crate::config::Config;
use crate::sinks::{HttpSink, MqttSink, SinkContext, WebhookSink};
use crate::sources::jsonl::JsonlLines;
use crate::sources::modbus_source::ModbusSource;
use crate::sources::mqtt::MqttSource;
use crate::sources::otgw_source::OtgwLines;
use crate::sources::serial;
use crate::sources::simulator::Simulator;
use crate::sources::{Link, SharedStats, SourceStats};
use anyhow::Context as _;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a component is to the daemon: sources stop first (their observations are committed),
/// sinks last (they deliver what was committed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Source,
    Sink,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Sink => "sink",
        }
    }
}

/// A started component's work.
pub type RunFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

type Run = Box<dyn FnOnce(CancellationToken) -> RunFuture + Send>;

/// A source or sink, built and ready to start.
pub struct Component {
    /// Its config name (unique per role).
    pub name: String,
    /// `mqtt`, `otgw`, `http`, `webhook`, …
    pub kind: &'static str,
    pub role: Role,
    /// A source's counters (what `hvac-edge sources` shows).
    pub stats: Option<SharedStats>,
    /// Digest of its config section: a reload restarts it only when this changed.
    pub digest: String,
    run: Run,
}

/// A short digest of a component's config section (its `Debug` form: settings and paths,
/// never secrets, which live in files).
fn digest(cfg: &impl std::fmt::Debug) -> String {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(format!("{cfg:?}").as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Component {
    fn source(
        name: String,
        kind: &'static str,
        digest: String,
        stats: SharedStats,
        run: Run,
    ) -> Component {
        Component {
            name,
            kind,
            role: Role::Source,
            stats: Some(stats),
            digest,
            run,
        }
    }

    fn sink(name: String, kind: &'static str, digest: String, run: Run) -> Component {
        Component {
            name,
            kind,
            role: Role::Sink,
            stats: None,
            digest,
            run,
        }
    }
}

/// What built components are wired to.
pub struct Wiring {
    /// The writer's channel (sources send observations on it).
    pub obs: mpsc::Sender<WriterMsg>,
    /// Each sink's context (database, commit mark, clock, notes, latency histogram), by name.
    pub sink_context: Box<dyn Fn(&str) -> SinkContext + Send + Sync>,
}

/// Builds every source and sink of `cfg`, in config order (sources, then sinks); nothing runs
/// yet.
///
/// # Errors
/// The first component that cannot be built, named (an unreadable secret, a bad mapping, …).
pub fn build(cfg: &Config, w: &Wiring) -> anyhow::Result<Vec<Component>> {
    let mut out = Vec::new();
    for s in cfg.sources.mqtt.clone() {
        let name = s.name.clone();
        let d = digest(&s);
        let stats: SharedStats = Arc::new(SourceStats::default());
        let src = MqttSource::new(s, stats.clone())
            .with_context(|| format!("cannot start source {name}"))?;
        let tx = w.obs.clone();
        out.push(Component::source(
            name,
            "mqtt",
            d,
            stats,
            Box::new(move |tok| Box::pin(async move { Ok(src.run(tx, tok).await?) })),
        ));
    }
    for s in cfg.sources.otgw.clone() {
        let d = digest(&s);
        let stats: SharedStats = Arc::new(SourceStats::default());
        let (proto, settings) = OtgwLines::new(&s, stats.clone());
        let (tx, st) = (w.obs.clone(), stats.clone());
        out.push(Component::source(
            s.name.clone(),
            "otgw",
            d,
            stats,
            Box::new(move |tok| {
                Box::pin(async move {
                    serial::run_line_source(settings, proto, st, tx, tok).await;
                    Ok(())
                })
            }),
        ));
    }
    for s in cfg.sources.jsonl.clone() {
        let name = s.name.clone();
        let d = digest(&s);
        let stats: SharedStats = Arc::new(SourceStats::default());
        let (proto, settings) = JsonlLines::new(&s, stats.clone())
            .map_err(|e| anyhow::anyhow!("cannot start source {name}: {e}"))?;
        let (tx, st) = (w.obs.clone(), stats.clone());
        out.push(Component::source(
            name,
            "jsonl",
            d,
            stats,
            Box::new(move |tok| {
                Box::pin(async move {
                    serial::run_line_source(settings, proto, st, tx, tok).await;
                    Ok(())
                })
            }),
        ));
    }
    for s in cfg.sources.modbus.clone() {
        let name = s.name.clone();
        let d = digest(&s);
        let stats: SharedStats = Arc::new(SourceStats::default());
        let src = ModbusSource::new(s, stats.clone())
            .map_err(|e| anyhow::anyhow!("cannot start source {name}: {e}"))?;
        let tx = w.obs.clone();
        out.push(Component::source(
            name,
            "modbus",
            d,
            stats,
            Box::new(move |tok| {
                Box::pin(async move {
                    src.run(tx, tok).await;
                    Ok(())
                })
            }),
        ));
    }
    for s in cfg.sources.simulator.clone() {
        let d = digest(&s);
        let stats: SharedStats = Arc::new(SourceStats::default());
        stats.set_link(Link::None, crate::telemetry::now_ms(), None);
        let name = s.name.clone();
        let sim = Simulator::new(s, stats.clone());
        let tx = w.obs.clone();
        out.push(Component::source(
            name,
            "simulator",
            d,
            stats,
            Box::new(move |tok| {
                Box::pin(async move {
                    sim.run(tx, tok).await;
                    Ok(())
                })
            }),
        ));
    }
    for s in cfg.sinks.http.clone() {
        let name = s.name.clone();
        let d = digest(&s);
        let sink = HttpSink::new(s, &cfg.gateway.id)
            .with_context(|| format!("cannot start sink {name}"))?
            .erase();
        let ctx = (w.sink_context)(&name);
        out.push(Component::sink(
            name,
            "http",
            d,
            Box::new(move |tok| Box::pin(async move { Ok(sink.run(ctx, tok).await?) })),
        ));
    }
    for s in cfg.sinks.webhook.clone() {
        let name = s.name.clone();
        let d = digest(&s);
        let sink = WebhookSink::new(s, &cfg.gateway.id)
            .with_context(|| format!("cannot start sink {name}"))?
            .erase();
        let ctx = (w.sink_context)(&name);
        out.push(Component::sink(
            name,
            "webhook",
            d,
            Box::new(move |tok| Box::pin(async move { Ok(sink.run(ctx, tok).await?) })),
        ));
    }
    for s in cfg.sinks.mqtt.clone() {
        let name = s.name.clone();
        let d = digest(&s);
        let sink = MqttSink::new(s, &cfg.gateway.id)
            .with_context(|| format!("cannot start sink {name}"))?
            .erase();
        let ctx = (w.sink_context)(&name);
        out.push(Component::sink(
            name,
            "mqtt",
            d,
            Box::new(move |tok| Box::pin(async move { Ok(sink.run(ctx, tok).await?) })),
        ));
    }
    Ok(out)
}

/// What a reload does to the running components.
pub struct Plan {
    /// Removed or changed: stop these (and wait until they ended) first.
    pub stop: Vec<(Role, String)>,
    /// Added or changed: start these after the writer took the new settings.
    pub start: Vec<Component>,
    /// For the outcome: `sink NAME`, `source NAME`.
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    pub restarted: Vec<String>,
    pub unchanged: usize,
}

/// Runs components and the daemon's own tasks, each under its own token, and reports every
/// task that ends on its own with an error or a panic.
pub struct Supervisor {
    sources: TaskTracker,
    sinks: TaskTracker,
    sources_token: CancellationToken,
    sinks_token: CancellationToken,
    fail: mpsc::Sender<anyhow::Error>,
    running: HashMap<(Role, String), Running>,
    /// Components told to stop that had not ended within the wait: never replaced while they
    /// still run (one cursor row, one MQTT client id).
    stopping: HashMap<(Role, String), tokio::task::JoinHandle<()>>,
}

/// A started component: how to stop it, how to know it ended, what config it runs.
struct Running {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    digest: String,
}

impl Supervisor {
    /// A supervisor and the receiving end of its failure reports.
    pub fn new() -> (Supervisor, mpsc::Receiver<anyhow::Error>) {
        let (fail, rx) = mpsc::channel(16);
        (
            Supervisor {
                sources: TaskTracker::new(),
                sinks: TaskTracker::new(),
                sources_token: CancellationToken::new(),
                sinks_token: CancellationToken::new(),
                fail,
                running: HashMap::new(),
                stopping: HashMap::new(),
            },
            rx,
        )
    }

    /// Starts `c` with a token of its own (cancelled by [`Supervisor::stop`] or its role's stop).
    pub fn start(&mut self, c: Component) {
        let token = self.role_token(c.role).child_token();
        let label = format!("{} {}", c.role.as_str(), c.name);
        let fut = (c.run)(token.clone());
        let handle = self.spawn(c.role, label, fut);
        self.running.insert(
            (c.role, c.name),
            Running {
                token,
                handle,
                digest: c.digest,
            },
        );
    }

    /// The config digest a running component was started with.
    pub fn digest(&self, role: Role, name: &str) -> Option<&str> {
        self.running
            .get(&(role, name.to_string()))
            .map(|r| r.digest.as_str())
    }

    /// Compares freshly built components with the running ones by (role, name, digest): the
    /// untouched ones are dropped from `built` and keep running.
    pub fn plan(&self, built: Vec<Component>) -> Plan {
        let mut plan = Plan {
            stop: Vec::new(),
            start: Vec::new(),
            started: Vec::new(),
            stopped: Vec::new(),
            restarted: Vec::new(),
            unchanged: 0,
        };
        let mut wanted = std::collections::HashSet::new();
        for c in built {
            let key = (c.role, c.name.clone());
            let label = format!("{} {}", c.role.as_str(), c.name);
            match self.running.get(&key) {
                Some(r) if r.digest == c.digest => plan.unchanged += 1,
                Some(_) => {
                    plan.stop.push(key.clone());
                    plan.restarted.push(label);
                    plan.start.push(c);
                }
                None => {
                    plan.started.push(label);
                    plan.start.push(c);
                }
            }
            wanted.insert(key);
        }
        let mut gone: Vec<&(Role, String)> = self
            .running
            .keys()
            .filter(|k| !wanted.contains(*k))
            .collect();
        gone.sort_by(|a, b| (a.0.as_str(), &a.1).cmp(&(b.0.as_str(), &b.1)));
        for (role, name) in gone {
            plan.stop.push((*role, name.clone()));
            plan.stopped.push(format!("{} {name}", role.as_str()));
        }
        plan
    }

    /// Stops one component and waits (at most `timeout`) until it has ended, so that a
    /// replacement never runs beside it (a sink's cursor row, an MQTT client id); returns
    /// whether it ended in time.
    pub async fn stop_and_wait(&mut self, role: Role, name: &str, timeout: Duration) -> bool {
        match self.running.remove(&(role, name.to_string())) {
            Some(mut r) => {
                r.token.cancel();
                if tokio::time::timeout(timeout, &mut r.handle).await.is_ok() {
                    true
                } else {
                    self.stopping.insert((role, name.to_string()), r.handle);
                    false
                }
            }
            None => {
                let key = (role, name.to_string());
                let Some(h) = self.stopping.get_mut(&key) else {
                    return true;
                };
                let ended = tokio::time::timeout(timeout, h).await.is_ok();
                if ended {
                    self.stopping.remove(&key);
                }
                ended
            }
        }
    }

    /// Whether a component told to stop has still not ended (then nothing may start under its
    /// name yet).
    pub fn still_stopping(&mut self, role: Role, name: &str) -> bool {
        let key = (role, name.to_string());
        match self.stopping.get(&key) {
            Some(h) if h.is_finished() => {
                self.stopping.remove(&key);
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// Starts one of the daemon's own tasks (status, ticker) under `role`'s token.
    pub fn start_task<F>(&self, role: Role, label: &str, f: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let fut = f(self.role_token(role).child_token());
        // Detached: the tracker waits for it at shutdown.
        drop(self.spawn(
            role,
            label.to_string(),
            Box::pin(async move {
                fut.await;
                Ok(())
            }),
        ));
    }

    /// Cancels one running component (it finishes on its own terms, e.g. an in-flight request);
    /// returns whether it was running.
    pub fn stop(&mut self, role: Role, name: &str) -> bool {
        match self.running.remove(&(role, name.to_string())) {
            Some(r) => {
                r.token.cancel();
                self.stopping.insert((role, name.to_string()), r.handle);
                true
            }
            None => false,
        }
    }

    /// Names of the running components of `role`.
    pub fn names(&self, role: Role) -> Vec<String> {
        let mut v: Vec<String> = self
            .running
            .keys()
            .filter(|(r, _)| *r == role)
            .map(|(_, n)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// Stops every source and the daemon's own tasks, and waits for them at most `grace`;
    /// returns whether they all stopped.
    pub async fn stop_sources(&self, grace: Duration) -> bool {
        self.sources_token.cancel();
        self.sources.close();
        tokio::time::timeout(grace, self.sources.wait())
            .await
            .is_ok()
    }

    /// Stops every sink and waits for them at most `grace`; returns whether they all stopped.
    pub async fn stop_sinks(&self, grace: Duration) -> bool {
        self.sinks_token.cancel();
        self.sinks.close();
        tokio::time::timeout(grace, self.sinks.wait()).await.is_ok()
    }

    fn role_token(&self, role: Role) -> &CancellationToken {
        match role {
            Role::Source => &self.sources_token,
            Role::Sink => &self.sinks_token,
        }
    }

    fn spawn(&self, role: Role, label: String, fut: RunFuture) -> tokio::task::JoinHandle<()> {
        let fail = self.fail.clone();
        let tracker = match role {
            Role::Source => &self.sources,
            Role::Sink => &self.sinks,
        };
        tracker.spawn(async move {
            // Its own task, so that a panic arrives here as a JoinError.
            let res = match tokio::spawn(fut).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(join) => anyhow::anyhow!("task ended abnormally: {join}"),
            };
            let _ = fail.send(res.context(format!("{label} stopped"))).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(name: &str, run: Run) -> Component {
        Component::sink(name.into(), "test", String::new(), run)
    }

    #[tokio::test]
    async fn an_error_and_a_panic_are_reported_alike_and_a_stopped_component_is_not() {
        let (mut sup, mut fails) = Supervisor::new();
        sup.start(component(
            "bad",
            Box::new(|_| Box::pin(async { Err(anyhow::anyhow!("secret unreadable")) })),
        ));
        let e = fails.recv().await.unwrap_or_else(|| panic!("a report"));
        assert_eq!(format!("{e:#}"), "sink bad stopped: secret unreadable");
        sup.start(component(
            "crash",
            Box::new(|_| Box::pin(async { panic!("boom") })),
        ));
        let e = fails.recv().await.unwrap_or_else(|| panic!("a report"));
        assert!(format!("{e:#}").starts_with("sink crash stopped: task ended abnormally"));
        sup.start(component(
            "calm",
            Box::new(|tok| {
                Box::pin(async move {
                    tok.cancelled().await;
                    Ok(())
                })
            }),
        ));
        assert_eq!(sup.names(Role::Sink), vec!["bad", "calm", "crash"]);
        assert!(sup.stop(Role::Sink, "calm"));
        assert!(!sup.stop(Role::Sink, "calm"));
        // Stopped and awaited: the replacement may start on the same name at once.
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ended.clone();
        sup.start(component(
            "slow",
            Box::new(move |tok| {
                Box::pin(async move {
                    tok.cancelled().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok(())
                })
            }),
        ));
        assert_eq!(sup.digest(Role::Sink, "slow"), Some(""));
        assert!(
            sup.stop_and_wait(Role::Sink, "slow", Duration::from_secs(5))
                .await
        );
        assert!(
            ended.load(std::sync::atomic::Ordering::SeqCst),
            "it ended before stop_and_wait returned"
        );
        assert_eq!(sup.digest(Role::Sink, "slow"), None);
        assert!(sup.stop_sinks(Duration::from_secs(5)).await);
        assert!(fails.try_recv().is_err(), "a stop is not a failure");
    }

    fn idle(name: &str, role: Role, digest: &str) -> Component {
        Component {
            name: name.into(),
            kind: "test",
            role,
            stats: None,
            digest: digest.into(),
            run: Box::new(|tok| {
                Box::pin(async move {
                    tok.cancelled().await;
                    Ok(())
                })
            }),
        }
    }

    #[tokio::test]
    async fn a_plan_keeps_untouched_components_and_restarts_only_changed_ones() {
        let (mut sup, _fails) = Supervisor::new();
        sup.start(idle("z2m", Role::Source, "s1"));
        sup.start(idle("otgw", Role::Source, "o1"));
        sup.start(idle("cloud", Role::Sink, "c1"));
        sup.start(idle("old", Role::Sink, "x1"));
        let plan = sup.plan(vec![
            idle("z2m", Role::Source, "s2"),
            idle("otgw", Role::Source, "o1"),
            idle("cloud", Role::Sink, "c1"),
            idle("new", Role::Sink, "n1"),
            // Same name, other role: a different component.
            idle("z2m", Role::Sink, "s1"),
        ]);
        assert_eq!(plan.unchanged, 2);
        assert_eq!(plan.restarted, vec!["source z2m"]);
        assert_eq!(plan.started, vec!["sink new", "sink z2m"]);
        assert_eq!(plan.stopped, vec!["sink old"]);
        assert_eq!(
            plan.stop,
            vec![
                (Role::Source, "z2m".to_string()),
                (Role::Sink, "old".to_string())
            ]
        );
        let starting: Vec<(Role, String, String)> = plan
            .start
            .iter()
            .map(|c| (c.role, c.name.clone(), c.digest.clone()))
            .collect();
        assert_eq!(
            starting,
            vec![
                (Role::Source, "z2m".into(), "s2".into()),
                (Role::Sink, "new".into(), "n1".into()),
                (Role::Sink, "z2m".into(), "s1".into()),
            ]
        );
        assert!(sup.stop_sinks(Duration::from_secs(5)).await);
    }
}
