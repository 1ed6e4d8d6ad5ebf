//! Serial ports, shared by the OTGW, Modbus and JSON-lines sources: opening a port exclusively
//! with the configured line settings, explaining why it cannot be opened, and the read loop of
//! the line-based protocols (reconnect with backoff, silence → OFFLINE, port loss → OFFLINE).
//!
//! Owns no protocol knowledge: a [`LineProtocol`] turns lines into observations. Each link state
//! change is logged once (not every retry). A port that cannot be opened never stops the daemon:
//! the source keeps retrying, its status says why, and the other sources run on.

use super::{Backoff, Envelope, Link, SharedStats, SourceStats};
use crate::channel::WriterMsg;
use crate::config::{Parity, SerialLine};
use crate::model::{Connectivity, Observation, Reported, UnixMs};
use crate::sources::otgw::{LineBuffer, LineError};
use crate::telemetry::now_ms;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_serial::{DataBits, FlowControl, SerialPortBuilderExt, SerialStream, StopBits};
use tokio_util::sync::CancellationToken;

/// Opens `line.port` exclusively (TIOCEXCL + flock: a second opener gets "busy") in raw mode
/// with the configured settings and no flow control.
///
/// # Errors
/// A message for the log and `hvac-edge sources` that names the path and the cause: missing
/// device (unplugged adapter), missing permission (with the group to join), port busy.
pub fn open(line: &SerialLine) -> Result<SerialStream, String> {
    let data_bits = match line.data_bits {
        5 => DataBits::Five,
        6 => DataBits::Six,
        7 => DataBits::Seven,
        _ => DataBits::Eight,
    };
    let parity = match line.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let stop_bits = if line.stop_bits == 2 {
        StopBits::Two
    } else {
        StopBits::One
    };
    let path = line.port.to_string_lossy().into_owned();
    tokio_serial::new(path, line.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(FlowControl::None)
        .open_native_async()
        .map_err(|e| explain_open_error(&line.port, &e))
}

/// Turns a failed open into a sentence a technician can act on.
fn explain_open_error(port: &Path, e: &tokio_serial::Error) -> String {
    use std::io::ErrorKind as Io;
    use tokio_serial::ErrorKind as K;
    let p = port.display();
    match e.kind() {
        K::Io(Io::NotFound) => format!(
            "{p} does not exist (adapter unplugged, or a wrong path; prefer /dev/serial/by-id/…); retrying"
        ),
        K::Io(Io::PermissionDenied) => {
            let group = owner_group(port).unwrap_or_else(|| "dialout".to_string());
            format!(
                "permission denied opening {p}: the service user needs read/write access; add it to the group {group:?} that owns the port (usermod -aG {group} hvac-edge) and restart"
            )
        }
        K::NoDevice => format!(
            "{p} is busy: another process holds it open exclusively (ModemManager, a console getty, another hvac-edge?)"
        ),
        _ => format!("cannot open {p}: {}", e.description),
    }
}

/// The name of the group owning `path` (via /etc/group), if it can be found.
fn owner_group(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let gid = std::fs::metadata(path).ok()?.gid();
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _pw = f.next()?;
        let id: u32 = f.next()?.parse().ok()?;
        (id == gid).then(|| name.to_string())
    })
}

/// What one line produced.
#[derive(Debug, Default)]
pub struct LineOutcome {
    /// The line was valid protocol output (it resets the silence timer).
    pub valid: bool,
    /// Observations to hand to the writer: (device, fields).
    pub observations: Vec<(String, Reported)>,
}

/// A line-based serial protocol (OTGW, JSON lines).
pub trait LineProtocol: Send {
    /// Source kind for status output (`otgw`, `jsonl`).
    fn kind(&self) -> &'static str;
    /// Bytes to write after each open (setup commands); empty for none.
    fn on_open(&mut self) -> Vec<u8>;
    /// Handles one line (or a line the buffer rejected), counting what it has to in `stats`.
    fn line(&mut self, line: Result<String, LineError>, now: UnixMs) -> LineOutcome;
    /// Devices to report OFFLINE when the port is lost or falls silent.
    fn devices(&self) -> Vec<String>;
}

/// Settings of a line source's read loop.
#[derive(Debug, Clone)]
pub struct LineSourceSettings {
    /// Source name (logs, observations).
    pub name: String,
    /// Port and line settings.
    pub line: SerialLine,
    /// Longest line accepted; longer ones are reported once as too long and dropped.
    pub max_line_bytes: usize,
    /// `None`: silence never makes devices OFFLINE.
    pub silence: Option<Duration>,
}

/// Sends one observation; false when the writer is gone (shutting down).
pub(crate) async fn send(
    tx: &mpsc::Sender<WriterMsg>,
    source: &str,
    device: String,
    reported: Reported,
    stats: &SourceStats,
) -> bool {
    SourceStats::inc(&stats.observations);
    let env = Envelope {
        obs: Observation {
            device,
            source: source.to_string(),
            observed_at: now_ms(),
            reported,
        },
        ack: None,
        receipt: None,
    };
    tx.send(WriterMsg::Observe(env)).await.is_ok()
}

/// Sends connectivity OFFLINE for every device; false when the writer is gone.
pub async fn send_offline(
    tx: &mpsc::Sender<WriterMsg>,
    source: &str,
    devices: Vec<String>,
    stats: &SourceStats,
) -> bool {
    for d in devices {
        let r = Reported {
            connectivity: Some(Connectivity::Offline),
            ..Reported::default()
        };
        if !send(tx, source, d, r, stats).await {
            return false;
        }
    }
    true
}

/// Opens the port for source `name`, keeping its status: on failure the link is
/// `disconnected` with the reason, logged once per distinct reason (`last_error` remembers it);
/// on success `connected`, counted and logged.
pub(crate) fn open_logged(
    name: &str,
    kind: &'static str,
    line: &SerialLine,
    stats: &SourceStats,
    last_error: &mut Option<String>,
) -> Option<SerialStream> {
    let port = line.port.display();
    match open(line) {
        Err(msg) => {
            let changed = stats.set_link(Link::Disconnected, now_ms(), Some(msg.clone()));
            if changed || last_error.as_deref() != Some(msg.as_str()) {
                tracing::warn!(source = %name, kind, port = %port, "{msg}");
            }
            *last_error = Some(msg);
            None
        }
        Ok(stream) => {
            *last_error = None;
            SourceStats::inc(&stats.connects);
            stats.set_link(Link::Connected, now_ms(), None);
            tracing::info!(source = %name, kind, port = %port, settings = %line.describe(), "Serial port opened");
            Some(stream)
        }
    }
}

/// Why a session on an open port ended.
enum SessionEnd {
    Cancelled,
    WriterGone,
    Lost(String),
}

/// Runs a line source until `token` is cancelled: open, read lines, reconnect on loss.
///
/// # Cancel safety
/// Cancellation is observed between reads and during waits; an observation handed to the writer
/// is never half-sent. Nothing needs acknowledging, so stopping loses at most the partial line.
pub async fn run_line_source<P: LineProtocol>(
    s: LineSourceSettings,
    mut proto: P,
    stats: SharedStats,
    tx: mpsc::Sender<WriterMsg>,
    token: CancellationToken,
) {
    let kind = proto.kind();
    let port = s.line.port.display().to_string();
    stats.detail().port = Some(format!("{port} ({})", s.line.describe()));
    let mut backoff = Backoff::new(
        Duration::from_millis(s.line.reconnect_min_ms),
        Duration::from_millis(s.line.reconnect_max_ms),
    );
    let mut last_error: Option<String> = None;
    loop {
        if token.is_cancelled() {
            return;
        }
        if let Some(stream) = open_logged(&s.name, kind, &s.line, &stats, &mut last_error) {
            match session(&s, &mut proto, stream, &stats, &tx, &token, &mut backoff).await {
                SessionEnd::Cancelled | SessionEnd::WriterGone => return,
                SessionEnd::Lost(why) => {
                    stats.set_link(Link::Disconnected, now_ms(), Some(why.clone()));
                    tracing::warn!(source = %s.name, kind, port = %port, reason = %why,
                        "Serial port lost; devices OFFLINE, reopening with backoff");
                    if !send_offline(&tx, &s.name, proto.devices(), &stats).await {
                        return;
                    }
                }
            }
        }
        let wait = backoff.next_delay();
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Reads lines from an open port until it is lost or the source is cancelled.
async fn session<P: LineProtocol>(
    s: &LineSourceSettings,
    proto: &mut P,
    mut stream: SerialStream,
    stats: &SharedStats,
    tx: &mpsc::Sender<WriterMsg>,
    token: &CancellationToken,
    backoff: &mut Backoff,
) -> SessionEnd {
    let setup = proto.on_open();
    if !setup.is_empty() {
        let write = tokio::time::timeout(Duration::from_secs(2), async {
            stream.write_all(&setup).await?;
            stream.flush().await
        })
        .await;
        match write {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return SessionEnd::Lost(format!("cannot write setup commands: {e}")),
            Err(_) => return SessionEnd::Lost("writing setup commands timed out".into()),
        }
    }
    let mut buf = LineBuffer::new(s.max_line_bytes);
    let mut chunk = vec![0u8; 1024];
    let mut last_valid = tokio::time::Instant::now();
    let mut silent = false;
    loop {
        let silence_at = s.silence.map(|d| last_valid + d);
        tokio::select! {
            _ = token.cancelled() => return SessionEnd::Cancelled,
            _ = async {
                match silence_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            }, if !silent => {
                silent = true;
                let secs = s.silence.map_or(0, |d| d.as_secs());
                stats.count("silences", 1);
                tracing::warn!(source = %s.name, silence_secs = secs,
                    "No valid data on the serial port; devices OFFLINE until it returns");
                if !send_offline(tx, &s.name, proto.devices(), stats).await {
                    return SessionEnd::WriterGone;
                }
            }
            r = stream.read(&mut chunk) => {
                let n = match r {
                    Ok(0) => return SessionEnd::Lost("end of file (the device went away)".into()),
                    Ok(n) => n,
                    Err(e) => return SessionEnd::Lost(format!("read error: {e}")),
                };
                stats.count("bytes", n as u64);
                for line in buf.push(&chunk[..n]) {
                    SourceStats::inc(&stats.received);
                    let now = now_ms();
                    let out = proto.line(line, now);
                    if out.valid {
                        last_valid = tokio::time::Instant::now();
                        stats.detail().last_valid_ms = Some(now);
                        backoff.reset();
                        if silent {
                            silent = false;
                            tracing::info!(source = %s.name, "Valid data again on the serial port");
                        }
                    }
                    for (device, mut reported) in out.observations {
                        reported.connectivity.get_or_insert(Connectivity::Online);
                        if !send(tx, &s.name, device, reported, stats).await {
                            return SessionEnd::WriterGone;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(port: &str) -> SerialLine {
        SerialLine {
            port: port.into(),
            baud: 9600,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
            reconnect_min_ms: 100,
            reconnect_max_ms: 1000,
        }
    }

    #[tokio::test]
    async fn missing_port_names_the_path() {
        let e = open(&line("/dev/hvac-edge-no-such-tty"))
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("/dev/hvac-edge-no-such-tty does not exist"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_file_without_permission_names_the_group() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("tty");
        std::fs::write(&p, b"").unwrap_or_else(|e| panic!("{e}"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000))
            .unwrap_or_else(|e| panic!("{e}"));
        let e = open(&line(&p.to_string_lossy())).err().unwrap_or_default();
        // root ignores file modes; then the open fails for not being a tty instead.
        if unsafe { libc::geteuid() } != 0 {
            assert!(e.contains("permission denied opening"), "{e}");
            assert!(e.contains("usermod -aG"), "{e}");
        } else {
            assert!(e.contains(&p.display().to_string()), "{e}");
        }
    }

    #[test]
    fn describe_is_the_usual_shorthand() {
        let mut l = line("/dev/ttyUSB0");
        assert_eq!(l.describe(), "9600 8N1");
        l.parity = Parity::Even;
        l.baud = 19200;
        assert_eq!(l.describe(), "19200 8E1");
    }
}
