//! A private mosquitto on a free loopback port, with the limits the design asks the bench to use.

use super::{Deadline, check};
use anyhow::Context as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running mosquitto; killed on drop.
pub struct Broker {
    child: Child,
    /// Loopback port it listens on.
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Broker {
    /// Starts mosquitto (`max_inflight_messages 1000`, `max_queued_messages 0`) and waits until
    /// it accepts connections.
    pub fn start() -> anyhow::Result<Broker> {
        Broker::start_with("")
    }

    /// Like [`Broker::start`], with `extra` config lines (e.g. `set_tcp_nodelay true`).
    pub fn start_with(extra: &str) -> anyhow::Result<Broker> {
        let dir = tempfile::Builder::new()
            .prefix("hvac-bench-mosq-")
            .tempdir()?;
        let port = free_port()?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_inflight_messages 1000\nmax_queued_messages 0\n{extra}\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n"
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("mosquitto.log"))?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start mosquitto (is it installed? scripts/bench.sh installs it)")?;
        let mut b = Broker {
            child,
            port,
            _dir: dir,
        };
        let deadline = Deadline::after(Duration::from_secs(10));
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(b);
            }
            if let Some(status) = b.child.try_wait()? {
                anyhow::bail!("mosquitto exited at start ({status})");
            }
            check(deadline, "mosquitto to accept connections")?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
