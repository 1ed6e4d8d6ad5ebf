//! The daemon under test: in-process ([`Daemon`], `hvac_edge::daemon::run` on the test's tokio
//! runtime) for most tests, or the real binary ([`DaemonProcess`]) for signal, crash and CLI tests.

use super::wait::POLL;
use hvac_edge::config::Config;
use hvac_edge::daemon::Handles;
use hvac_edge::sources::SourceStats;
use hvac_edge::store::writer::WriterStats;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long the daemon may take to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Daemon::stop`] waits for `run` to return (sinks get `shutdown_grace_secs`).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Installs a tracing subscriber once per test process, writing through the test harness's
/// capture (shown only for failing tests). `RUST_LOG` overrides the default
/// `warn,hvac_edge=info`.
pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,hvac_edge=info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// `hvac_edge::daemon::run` spawned on the current tokio runtime (use a multi-thread test
/// runtime: the writer thread blocks on it). Cancelled on drop; [`Daemon::stop`] also awaits it.
pub struct Daemon {
    token: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    handles: Handles,
}

impl Daemon {
    /// Starts the daemon with `cfg` and waits until it reports ready (its [`Handles`]).
    /// Panics with the daemon's error if it fails to start.
    pub async fn start(cfg: Config) -> Daemon {
        init_logging();
        let token = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut task = tokio::spawn(hvac_edge::daemon::run(cfg, token.clone(), Some(tx)));
        let handles = tokio::select! {
            h = rx => match h {
                Ok(h) => h,
                Err(_) => match (&mut task).await {
                    Ok(Err(e)) => panic!("daemon failed to start: {e:#}"),
                    other => panic!("daemon ended before it was ready: {other:?}"),
                },
            },
            r = &mut task => panic!("daemon ended before it was ready: {r:?}"),
            _ = tokio::time::sleep(READY_TIMEOUT) => panic!("daemon not ready within {READY_TIMEOUT:?}"),
        };
        Daemon {
            token,
            task: Some(task),
            handles,
        }
    }

    /// The handles the daemon exposed when ready.
    pub fn handles(&self) -> &Handles {
        &self.handles
    }

    /// The writer's counters.
    pub fn writer(&self) -> &WriterStats {
        &self.handles.writer
    }

    /// The counters of source `name`; panics if there is no such source.
    pub fn source(&self, name: &str) -> &SourceStats {
        self.handles
            .sources
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.as_ref())
            .unwrap_or_else(|| panic!("the daemon has no source named {name:?}"))
    }

    /// The position of the latest committed event.
    pub fn committed(&self) -> i64 {
        *self.handles.committed.borrow()
    }

    /// Cancels the daemon and waits for `run` to return; returns its result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.token.cancel();
        let task = self.task.take().expect("daemon task");
        match tokio::time::timeout(STOP_TIMEOUT, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => panic!("daemon task panicked or was aborted: {join}"),
            Err(_) => panic!("daemon did not stop within {STOP_TIMEOUT:?}"),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Reads a counter of [`SourceStats`] / [`WriterStats`].
pub fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The real `hvac-edge` binary running `run -c <config>`, stdout and stderr to files in a
/// directory. Killed (SIGKILL) and reaped on drop if still running.
pub struct DaemonProcess {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl DaemonProcess {
    /// Spawns `hvac-edge run -c <config>`; output goes to `<log_dir>/daemon-<pid>.{stdout,stderr}`.
    /// `envs` are extra environment variables (e.g. `RUST_LOG`, secrets for `*_env` keys).
    pub fn spawn(config: &Path, log_dir: &Path, envs: &[(&str, &str)]) -> DaemonProcess {
        // Tests may run as root (containers): the daemon refuses that without --allow-root.
        Self::spawn_args(&["run", "--allow-root", "-c"], config, log_dir, envs)
    }

    /// Spawns the binary with `args` followed by `config`; see [`DaemonProcess::spawn`].
    pub fn spawn_args(
        args: &[&str],
        config: &Path,
        log_dir: &Path,
        envs: &[(&str, &str)],
    ) -> DaemonProcess {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let stdout = log_dir.join(format!("daemon-{n}.stdout"));
        let stderr = log_dir.join(format!("daemon-{n}.stderr"));
        let out = std::fs::File::create(&stdout).expect("daemon stdout file");
        let err = std::fs::File::create(&stderr).expect("daemon stderr file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hvac-edge"));
        cmd.args(args)
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn the hvac-edge binary");
        DaemonProcess {
            child,
            stdout,
            stderr,
            status: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process; does nothing once it was reaped
    /// (its pid may belong to someone else by then).
    pub fn signal(&mut self, signal: i32) {
        if self.try_status().is_some() {
            return;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on a child we spawned and have not reaped, so the pid is still ours.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// SIGTERM: asks for a clean shutdown.
    pub fn sigterm(&mut self) {
        self.signal(libc::SIGTERM);
    }

    /// SIGKILL: a crash, as far as the daemon is concerned.
    pub fn sigkill(&mut self) {
        self.signal(libc::SIGKILL);
    }

    /// The exit status if the process has exited (reaps it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait on the daemon");
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit (polling every 20 ms); `None` if it is
    /// still running. Blocks the thread: see [`DaemonProcess::wait_timeout_async`].
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Async variant of [`DaemonProcess::wait_timeout`].
    pub async fn wait_timeout_async(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything written to stderr so far (the log).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
