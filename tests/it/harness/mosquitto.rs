//! A real mosquitto broker per test, and a QoS 1 publisher that awaits every PUBACK.
//!
//! The broker listens on 127.0.0.1 at a free port with its config and log in its own temp dir,
//! logs everything (`log_type all`) so tests can prove what the broker sent and what was acked,
//! and is killed on drop. Sessions live in memory only (`persistence false`): the broker outlives
//! daemon restarts within a test, which is all the persistent MQTT session needs.

use super::wait::{POLL, wait_until_async};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What to tell a missing-broker machine; a silently skipped test cannot fail.
pub const MISSING: &str = "mosquitto not found: apt-get install -y mosquitto mosquitto-clients";

/// How long the broker may take to accept TCP connections after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many free ports are tried when the one picked was taken in between.
const START_ATTEMPTS: usize = 5;
/// How long a publish may wait for its PUBACK (or the first CONNACK).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Broker settings a test may change; [`Default`] is what [`Mosquitto::start`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MosquittoOptions {
    /// `max_inflight_messages`: QoS 1 messages sent to one client and not yet acknowledged.
    /// Default 1000. A small value proves that a subscriber acks: without acks it stalls.
    pub max_inflight_messages: u32,
}

impl Default for MosquittoOptions {
    fn default() -> Self {
        MosquittoOptions {
            max_inflight_messages: 1000,
        }
    }
}

/// A running mosquitto on 127.0.0.1; killed (SIGKILL) and reaped on drop.
pub struct Mosquitto {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    options: MosquittoOptions,
}

impl Mosquitto {
    /// Starts a broker with [`MosquittoOptions::default`] and waits until it accepts TCP connections.
    ///
    /// Panics with [`MISSING`] when mosquitto is not installed.
    pub fn start() -> Mosquitto {
        Mosquitto::start_with(MosquittoOptions::default())
    }

    /// Starts a broker with `options`; see [`Mosquitto::start`].
    pub fn start_with(options: MosquittoOptions) -> Mosquitto {
        let binary = find_mosquitto();
        let dir = tempfile::Builder::new()
            .prefix("it-mosquitto-")
            .tempdir()
            .expect("temp dir for mosquitto");
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match spawn_broker(&binary, dir.path(), port, options) {
                Ok(child) => {
                    return Mosquitto {
                        child,
                        port,
                        dir,
                        options,
                    };
                }
                Err(why) => last_failure = why,
            }
        }
        panic!("mosquitto did not start after {START_ATTEMPTS} attempts: {last_failure}");
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's log so far (one line per packet with `log_type all`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// How many log lines end with `suffix` (the broker ends packet lines with the client id).
    pub fn count_lines_ending_with(&self, suffix: &str) -> usize {
        self.log().lines().filter(|l| l.ends_with(suffix)).count()
    }

    /// How many log lines contain `needle`.
    pub fn count_lines_containing(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// QoS 1 PUBLISH packets the broker sent to `client_id` (redeliveries included).
    pub fn publishes_sent_to(&self, client_id: &str) -> usize {
        self.count_lines_containing(&format!("Sending PUBLISH to {client_id} ("))
    }

    /// PUBACK packets the broker received from `client_id`.
    pub fn pubacks_from(&self, client_id: &str) -> usize {
        self.count_lines_containing(&format!("Received PUBACK from {client_id} ("))
    }

    /// Waits until the broker has sent `n` SUBACKs in total to `client_id`, i.e. the client's
    /// subscriptions are in place and a publish made now will reach it.
    pub async fn wait_subscribed(&self, client_id: &str, n: usize, timeout: Duration) {
        let suffix = format!("Sending SUBACK to {client_id}");
        wait_until_async(
            &format!("{n} SUBACK(s) from mosquitto to {client_id}"),
            timeout,
            || self.count_lines_ending_with(&suffix) >= n,
        )
        .await;
    }

    /// Waits until `client_id` has connected `n` times in total (a CONNACK was sent each time).
    pub async fn wait_connected(&self, client_id: &str, n: usize, timeout: Duration) {
        let needle = format!("Sending CONNACK to {client_id} (");
        wait_until_async(
            &format!("{n} CONNACK(s) from mosquitto to {client_id}"),
            timeout,
            || self.count_lines_containing(&needle) >= n,
        )
        .await;
    }

    /// Kills the broker and starts it again on the same port (sessions and retained messages
    /// are lost: `persistence false`). For broker-outage tests.
    pub fn restart(&mut self) {
        self.kill();
        let binary = find_mosquitto();
        match spawn_broker(&binary, self.dir.path(), self.port, self.options) {
            Ok(child) => self.child = child,
            Err(why) => panic!("mosquitto did not restart on port {}: {why}", self.port),
        }
    }

    /// Kills the broker (SIGKILL) and reaps it; the port then refuses connections.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The mosquitto binary: on `PATH`, or in the sbin directories Debian installs it to.
fn find_mosquitto() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{MISSING}"))
}

/// A port that was free a moment ago on 127.0.0.1 (the caller retries if it is taken meanwhile).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn spawn_broker(
    binary: &Path,
    dir: &Path,
    port: u16,
    options: MosquittoOptions,
) -> Result<Child, String> {
    let log = dir.join("mosquitto.log");
    let conf = dir.join("mosquitto.conf");
    // As root, mosquitto 2 drops to the `mosquitto` user, which cannot write our temp dir.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root\n"
    } else {
        ""
    };
    let text = format!(
        "listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         max_inflight_messages {}\n\
         max_queued_messages 0\n\
         persistence false\n\
         log_dest file {}\n\
         log_type all\n\
         {user}",
        options.max_inflight_messages,
        log.display()
    );
    std::fs::write(&conf, text).map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
    let stderr = std::fs::File::create(dir.join("mosquitto.stderr"))
        .map_err(|e| format!("cannot create stderr file: {e}"))?;
    let mut child = Command::new(binary)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot spawn {}: {e}", binary.display()))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let err = std::fs::read_to_string(dir.join("mosquitto.stderr")).unwrap_or_default();
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "mosquitto exited with {status} on port {port}\nstderr: {err}\nlog: {log}"
            ));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "mosquitto did not accept connections on port {port} within {START_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(POLL);
    }
}

static PUBLISHERS: AtomicU64 = AtomicU64::new(0);

/// A QoS 1 MQTT publisher (rumqttc, clean session) that awaits the PUBACK of every message, so
/// when [`Publisher::publish`] returns the broker owns the message.
///
/// The rumqttc event loop runs on a background task, aborted on drop.
pub struct Publisher {
    client: AsyncClient,
    acks: mpsc::UnboundedReceiver<u16>,
    task: tokio::task::JoinHandle<()>,
    client_id: String,
}

impl Publisher {
    /// Connects to the broker on 127.0.0.1:`port` with a fresh client id and waits for CONNACK.
    pub async fn connect(port: u16) -> Publisher {
        let n = PUBLISHERS.fetch_add(1, Ordering::Relaxed);
        let client_id = format!("it-pub-{}-{n}", std::process::id());
        let mut opts = MqttOptions::new(client_id.clone(), "127.0.0.1", port);
        opts.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(60))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let (conn_tx, conn_rx) = oneshot::channel::<()>();
        // Runs until the publisher is dropped; on a connection error rumqttc reconnects on the
        // next poll (after a short pause), so a broker restart is survived.
        let task = tokio::spawn(async move {
            let mut conn_tx = Some(conn_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = conn_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let _ = ack_tx.send(a.pkid);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        match tokio::time::timeout(ACK_TIMEOUT, conn_rx).await {
            Ok(Ok(())) => {}
            _ => panic!(
                "publisher {client_id} got no CONNACK from 127.0.0.1:{port} within {ACK_TIMEOUT:?}"
            ),
        }
        Publisher {
            client,
            acks,
            task,
            client_id,
        }
    }

    /// The publisher's MQTT client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Publishes `payload` on `topic` at QoS 1 and waits for the broker's PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>, retain: bool) {
        let payload = payload.into();
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap_or_else(|e| panic!("cannot queue a publish on {topic}: {e}"));
        match tokio::time::timeout(ACK_TIMEOUT, self.acks.recv()).await {
            Ok(Some(_pkid)) => {}
            _ => panic!("no PUBACK for a publish on {topic} within {ACK_TIMEOUT:?}"),
        }
    }

    /// Clears the retained message of `topic` (an empty retained publish).
    pub async fn clear_retained(&mut self, topic: &str) {
        self.publish(topic, Vec::new(), true).await;
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
