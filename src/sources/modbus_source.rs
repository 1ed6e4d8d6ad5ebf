//! The Modbus RTU source: polls every configured unit on one RS-485 line, one request at a time
//! (the bus is a shared half-duplex medium), decodes each answer with the unit's register map
//! and hands the observation to the writer.
//!
//! Per unit: a request that gets no answer within `request_timeout_ms`, an answer with a bad CRC
//! or one that does not match the request fails the poll; `offline_after_failed_polls`
//! consecutive failures make the device OFFLINE, the next good poll ONLINE again. Exception
//! answers (the unit is there but refuses the map's address) fail the poll without making the
//! device OFFLINE. Losing the port makes every unit's device OFFLINE and reopens it with backoff.
//!
//! tokio-modbus does not report CRC errors (its decoder drops the bad frame and keeps waiting),
//! so the transport is wrapped to keep the bytes of the current answer: after a timeout, bytes
//! that end in a wrong CRC are counted as a CRC error, silence as a timeout.

use super::modbus::{RegisterMap, load_map};
use super::serial::{open_logged, send, send_offline};
use super::{Backoff, Link, SharedStats, SourceStats, UnitStatus};
use crate::channel::WriterMsg;
use crate::config::ModbusSourceConfig;
use crate::model::{Connectivity, Reported};
use crate::telemetry::{RateLimit, now_ms};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_modbus::client::Reader;
use tokio_modbus::slave::{Slave, SlaveContext};
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;

/// Longest answer kept for CRC classification (a 125-register answer is 255 bytes).
const SNIFF_MAX: usize = 300;
/// Extra quiet time after a failed request, for a late answer to finish arriving.
const LATE_ANSWER_WAIT: Duration = Duration::from_millis(50);
/// An unchanged observation is still sent this often, so the device's `last_seen` moves.
const RESEND_UNCHANGED: Duration = Duration::from_secs(60);

struct UnitPlan {
    unit_id: u8,
    device: String,
    map: RegisterMap,
    consecutive_failures: u32,
    online: Option<bool>,
    last_sent: Option<(Reported, tokio::time::Instant)>,
}

/// One Modbus RTU line and its units.
pub struct ModbusSource {
    cfg: ModbusSourceConfig,
    units: Vec<UnitPlan>,
    stats: SharedStats,
    log: RateLimit,
}

/// How one request ended.
#[derive(Debug)]
enum Failure {
    /// No answer within the request timeout.
    Timeout,
    /// Bytes arrived but no valid answer: bad CRC, or an answer that does not match the request.
    Crc,
    /// A Modbus exception answer.
    Exception(String),
    /// The port itself failed.
    PortLost(String),
}

/// How one poll of a unit ended.
enum PollEnd {
    Ok(Vec<Vec<u16>>),
    Failed(Failure),
}

impl ModbusSource {
    /// Loads every unit's map.
    ///
    /// # Errors
    /// A map that cannot be loaded (already reported by `check-config`, unless the file changed).
    pub fn new(cfg: ModbusSourceConfig, stats: SharedStats) -> Result<ModbusSource, String> {
        let mut units = Vec::new();
        for (i, u) in cfg.units.iter().enumerate() {
            let map = load_map(&u.map).map_err(|e| format!("units[{i}].map: {e}"))?;
            units.push(UnitPlan {
                unit_id: u.unit_id,
                device: u.device.clone(),
                map,
                consecutive_failures: 0,
                online: None,
                last_sent: None,
            });
        }
        {
            let mut d = stats.detail();
            d.port = Some(format!(
                "{} ({})",
                cfg.port.display(),
                cfg.line().describe()
            ));
            d.units = units
                .iter()
                .map(|u| UnitStatus {
                    unit_id: u.unit_id,
                    device: u.device.clone(),
                    ..UnitStatus::default()
                })
                .collect();
        }
        Ok(ModbusSource {
            cfg,
            units,
            stats,
            log: RateLimit::new(Duration::from_secs(60)),
        })
    }

    /// Silent interval between frames: 3.5 character times, 1.75 ms above 19200 baud (Modbus
    /// over serial line v1.02 §2.5.1.1).
    fn frame_gap(&self) -> Duration {
        if self.cfg.baud > 19_200 {
            return Duration::from_micros(1750);
        }
        let bits_per_char = 1
            + u64::from(self.cfg.data_bits)
            + u64::from(self.cfg.stop_bits)
            + u64::from(self.cfg.parity != crate::config::Parity::None);
        Duration::from_micros(3_500_000 * bits_per_char / u64::from(self.cfg.baud).max(1))
    }

    /// Polls until `token` is cancelled.
    pub async fn run(mut self, tx: mpsc::Sender<WriterMsg>, token: CancellationToken) {
        let line = self.cfg.line();
        let port = self.cfg.port.display().to_string();
        let mut backoff = Backoff::new(
            Duration::from_millis(line.reconnect_min_ms),
            Duration::from_millis(line.reconnect_max_ms),
        );
        let mut last_error: Option<String> = None;
        loop {
            if token.is_cancelled() {
                return;
            }
            let opened = open_logged(
                &self.cfg.name,
                "modbus",
                &line,
                &self.stats,
                &mut last_error,
            );
            if let Some(stream) = opened {
                match self.session(stream, &tx, &token, &mut backoff).await {
                    None => return,
                    Some(why) => {
                        self.stats
                            .set_link(Link::Disconnected, now_ms(), Some(why.clone()));
                        tracing::warn!(source = %self.cfg.name, port = %port, reason = %why,
                            "Serial port lost; devices OFFLINE, reopening with backoff");
                        let devices = self.units.iter().map(|u| u.device.clone()).collect();
                        for u in &mut self.units {
                            u.online = Some(false);
                            u.last_sent = None;
                        }
                        self.update_units(|s, _| s.online = false);
                        if !send_offline(&tx, &self.cfg.name, devices, &self.stats).await {
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

    /// Polls on an open port; `Some(reason)` when the port is lost, `None` when cancelled or the
    /// writer is gone.
    async fn session(
        &mut self,
        stream: SerialStream,
        tx: &mpsc::Sender<WriterMsg>,
        token: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Option<String> {
        let sniffed = Arc::new(Mutex::new(Vec::new()));
        let transport = Sniff {
            inner: stream,
            seen: sniffed.clone(),
        };
        let mut ctx = tokio_modbus::client::rtu::attach(transport);
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.poll_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout = Duration::from_millis(self.cfg.request_timeout_ms);
        let gap = self.frame_gap();
        loop {
            tokio::select! {
                _ = token.cancelled() => return None,
                _ = tick.tick() => {}
            }
            for i in 0..self.units.len() {
                if token.is_cancelled() {
                    return None;
                }
                let end = {
                    let u = &self.units[i];
                    ctx.set_slave(Slave(u.unit_id));
                    poll_unit(&mut ctx, &u.map, timeout, gap, &sniffed).await
                };
                match end {
                    PollEnd::Failed(Failure::PortLost(why)) => return Some(why),
                    PollEnd::Ok(words) => {
                        backoff.reset();
                        if !self.on_success(i, &words, tx).await {
                            return None;
                        }
                    }
                    PollEnd::Failed(f) => {
                        if !self.on_failure(i, f, tx).await {
                            return None;
                        }
                    }
                }
            }
        }
    }

    fn update_units(&self, mut f: impl FnMut(&mut UnitStatus, usize)) {
        let mut d = self.stats.detail();
        for (i, s) in d.units.iter_mut().enumerate() {
            f(s, i);
        }
    }

    fn update_unit(&self, i: usize, f: impl FnOnce(&mut UnitStatus)) {
        let mut d = self.stats.detail();
        if let Some(s) = d.units.get_mut(i) {
            f(s);
        }
    }

    async fn on_success(
        &mut self,
        i: usize,
        words: &[Vec<u16>],
        tx: &mpsc::Sender<WriterMsg>,
    ) -> bool {
        let now = now_ms();
        let (mut reported, bad) = self.units[i].map.decode(words);
        SourceStats::inc(&self.stats.received);
        {
            let mut d = self.stats.detail();
            d.last_valid_ms = Some(now);
        }
        let bad_n = bad.len() as u64;
        self.update_unit(i, |s| {
            s.polls += 1;
            s.ok += 1;
            s.bad_values += bad_n;
            s.consecutive_failures = 0;
            s.online = true;
            s.last_ok_ms = Some(now);
        });
        if let Some(b) = bad.first() {
            SourceStats::inc(&self.stats.malformed);
            let u = &self.units[i];
            // Keyed by kind, not unit: one line a minute per source (the `sources` table has
            // the per-unit counts).
            if let Some(suppressed) = self.log.check("bad_value") {
                tracing::warn!(source = %self.cfg.name, unit = u.unit_id, device = %u.device,
                    field = b.field.as_str(), address = b.address, raw = b.raw, why = b.why, suppressed,
                    "Register value not usable (field skipped, counted)");
            }
        }
        let u = &mut self.units[i];
        u.consecutive_failures = 0;
        if u.online != Some(true) {
            if u.online == Some(false) {
                tracing::info!(source = %self.cfg.name, unit = u.unit_id, device = %u.device, "Unit answers again; ONLINE");
            }
            u.online = Some(true);
        }
        reported.connectivity.get_or_insert(Connectivity::Online);
        let fresh = tokio::time::Instant::now();
        if let Some((last, at)) = &u.last_sent
            && *last == reported
            && at.elapsed() < RESEND_UNCHANGED
        {
            return true;
        }
        u.last_sent = Some((reported.clone(), fresh));
        let device = u.device.clone();
        self.send(device, reported, tx).await
    }

    async fn on_failure(&mut self, i: usize, f: Failure, tx: &mpsc::Sender<WriterMsg>) -> bool {
        let limit = self.cfg.offline_after_failed_polls;
        let counts_for_offline = !matches!(f, Failure::Exception(_));
        let text = match &f {
            Failure::Timeout => "no answer (timeout)".to_string(),
            Failure::Crc => "answer with a bad CRC or not matching the request".to_string(),
            Failure::Exception(e) => format!("exception answer: {e}"),
            Failure::PortLost(e) => e.clone(),
        };
        let failures = {
            let u = &mut self.units[i];
            if counts_for_offline {
                u.consecutive_failures = u.consecutive_failures.saturating_add(1);
            }
            u.consecutive_failures
        };
        self.update_unit(i, |s| {
            s.polls += 1;
            match f {
                Failure::Timeout => s.timeouts += 1,
                Failure::Crc => s.crc_errors += 1,
                Failure::Exception(_) => s.exceptions += 1,
                Failure::PortLost(_) => {}
            }
            s.consecutive_failures = failures;
            s.last_error = Some(text.clone());
        });
        let u = &self.units[i];
        let kind = match &f {
            Failure::Timeout => "timeout",
            Failure::Crc => "crc",
            Failure::Exception(_) => "exception",
            Failure::PortLost(_) => "port_lost",
        };
        if let Some(suppressed) = self.log.check(kind) {
            tracing::debug!(source = %self.cfg.name, unit = u.unit_id, device = %u.device,
                error = %text, failures, suppressed, "Modbus poll failed");
        }
        if failures >= limit && u.online != Some(false) {
            tracing::warn!(source = %self.cfg.name, unit = u.unit_id, device = %u.device, failures,
                last_error = %text, "Unit not answering; OFFLINE");
            let device = u.device.clone();
            let u = &mut self.units[i];
            u.online = Some(false);
            u.last_sent = None;
            self.update_unit(i, |s| s.online = false);
            let r = Reported {
                connectivity: Some(Connectivity::Offline),
                ..Reported::default()
            };
            return self.send(device, r, tx).await;
        }
        true
    }

    async fn send(&self, device: String, reported: Reported, tx: &mpsc::Sender<WriterMsg>) -> bool {
        send(tx, &self.cfg.name, device, reported, &self.stats).await
    }
}

/// Runs every read request of one unit's map.
async fn poll_unit(
    ctx: &mut tokio_modbus::client::Context,
    map: &RegisterMap,
    timeout: Duration,
    gap: Duration,
    sniffed: &Arc<Mutex<Vec<u8>>>,
) -> PollEnd {
    let mut words = Vec::with_capacity(map.requests.len());
    for req in &map.requests {
        let call = async {
            if req.function == 4 {
                ctx.read_input_registers(req.start, req.count).await
            } else {
                ctx.read_holding_registers(req.start, req.count).await
            }
        };
        let res = tokio::time::timeout(timeout, call).await;
        // Let the line fall silent before the next frame. After a failure, wait longer so that a
        // late answer has finished arriving; whatever arrived is flushed before the next request
        // is written (see `Sniff::poll_write`), so it cannot be taken for the next answer.
        let failed = !matches!(res, Ok(Ok(Ok(_))));
        tokio::time::sleep(if failed {
            gap.max(LATE_ANSWER_WAIT)
        } else {
            gap
        })
        .await;
        match res {
            Err(_elapsed) => {
                let bytes = sniffed.lock().map(|b| b.clone()).unwrap_or_default();
                return PollEnd::Failed(if bytes.is_empty() {
                    Failure::Timeout
                } else {
                    Failure::Crc
                });
            }
            Ok(Ok(Ok(w))) if w.len() == usize::from(req.count) => words.push(w),
            Ok(Ok(Ok(_))) => return PollEnd::Failed(Failure::Crc),
            Ok(Ok(Err(exc))) => {
                return PollEnd::Failed(Failure::Exception(format!(
                    "{exc:?} reading function {} address {} count {}",
                    req.function, req.start, req.count
                )));
            }
            Ok(Err(tokio_modbus::Error::Protocol(_))) => return PollEnd::Failed(Failure::Crc),
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                return PollEnd::Failed(match e.kind() {
                    std::io::ErrorKind::InvalidData => Failure::Crc,
                    std::io::ErrorKind::TimedOut => Failure::Timeout,
                    _ => Failure::PortLost(format!("serial I/O error: {e}")),
                });
            }
        }
    }
    PollEnd::Ok(words)
}

/// The serial stream, keeping the bytes received since the last request was written.
struct Sniff {
    inner: SerialStream,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl std::fmt::Debug for Sniff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sniff")
    }
}

impl AsyncRead for Sniff {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &res {
            let new = &buf.filled()[before..];
            if new.is_empty() {
                // EOF: the pty or USB adapter went away.
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "end of file (the device went away)",
                )));
            }
            if let Ok(mut seen) = self.seen.lock() {
                let room = SNIFF_MAX.saturating_sub(seen.len());
                seen.extend_from_slice(&new[..new.len().min(room)]);
            }
        }
        res
    }
}

impl AsyncWrite for Sniff {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.clear();
        }
        // A new request: drop whatever is still in the input queue (a late answer to an earlier
        // request would otherwise be read as the answer to this one).
        let _ = tokio_serial::SerialPort::clear(&self.inner, tokio_serial::ClearBuffer::Input);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(baud: u32, parity: &str) -> ModbusSource {
        let toml = format!(
            "name = \"fcu\"\nport = \"/dev/ttyUSB1\"\nbaud = {baud}\nparity = \"{parity}\"\n[[units]]\nunit_id = 1\ndevice = \"a\"\nmap = \"siemens-rdf302\"\n"
        );
        let cfg: ModbusSourceConfig = toml::from_str(&toml).unwrap_or_else(|e| panic!("{e}"));
        ModbusSource::new(cfg, SharedStats::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn frame_gap_is_three_and_a_half_characters() {
        // 9600 8N1: 10 bits a character, 3.5 × 10 / 9600 s = 3.646 ms.
        assert_eq!(
            source(9600, "none").frame_gap(),
            Duration::from_micros(3645)
        );
        // 8E1: 11 bits.
        assert_eq!(
            source(9600, "even").frame_gap(),
            Duration::from_micros(4010)
        );
        // Above 19200 baud the spec fixes 1.75 ms.
        assert_eq!(
            source(38400, "none").frame_gap(),
            Duration::from_micros(1750)
        );
    }

    #[test]
    fn units_start_unknown_in_status() {
        let s = source(9600, "none");
        let st = s.stats.snapshot("fcu", "modbus");
        assert_eq!(st.units.len(), 1);
        assert_eq!((st.units[0].unit_id, st.units[0].polls), (1, 0));
        assert_eq!(st.port.as_deref(), Some("/dev/ttyUSB1 (9600 8N1)"));
    }
}
