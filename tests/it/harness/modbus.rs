//! A real Modbus RTU slave (pymodbus, `tests/support/modbus_slave.py`) on one end of a pty pair,
//! driven over its stdin: set registers, mute a unit, corrupt CRCs, count requests.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long the slave may take to start (Python import + port open).
const START: Duration = Duration::from_secs(30);
/// How long one command may take.
const REPLY: Duration = Duration::from_secs(10);

/// The running slave; killed on drop.
pub struct ModbusSlave {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

fn python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
}

impl ModbusSlave {
    /// Starts the slave on `port` serving `units` and waits for its `ready` line.
    pub fn start(port: &Path, units: &[u8]) -> ModbusSlave {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/modbus_slave.py");
        let units: Vec<String> = units.iter().map(u8::to_string).collect();
        let mut child = Command::new(python())
            .arg(&script)
            .arg("--port")
            .arg(port)
            .arg("--units")
            .arg(units.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (run scripts/test.sh, which creates the venv with pymodbus): {e}",
                    python().display()
                )
            });
        let stdin = child.stdin.take().expect("slave stdin");
        let stdout = child.stdout.take().expect("slave stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut slave = ModbusSlave {
            child,
            stdin,
            lines,
        };
        match slave.lines.recv_timeout(START) {
            Ok(l) if l == "ready" => {}
            other => {
                let status = slave.child.try_wait();
                panic!("the Modbus slave did not start: {other:?}, exit {status:?}")
            }
        }
        slave
    }

    /// Sends one command; returns the text after `ok`; panics on `err` or silence.
    pub fn command(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").expect("write to the slave");
        self.stdin.flush().expect("flush the slave's stdin");
        match self.lines.recv_timeout(REPLY) {
            Ok(l) if l == "ok" => String::new(),
            Ok(l) if l.starts_with("ok ") => l[3..].to_string(),
            other => panic!("slave command {cmd:?} failed: {other:?}"),
        }
    }

    /// Sets consecutive registers of `table` (`ir` input, `hr` holding) from `addr`.
    pub fn set(&mut self, unit: u8, table: &str, addr: u16, values: &[u16]) {
        let v: Vec<String> = values.iter().map(u16::to_string).collect();
        self.command(&format!("set {unit} {table} {addr} {}", v.join(" ")));
    }

    /// The unit stops answering.
    pub fn mute(&mut self, unit: u8) {
        self.command(&format!("mute {unit}"));
    }

    /// The unit answers again.
    pub fn unmute(&mut self, unit: u8) {
        self.command(&format!("unmute {unit}"));
    }

    /// The unit's next `n` answers carry a corrupted CRC.
    pub fn crc(&mut self, unit: u8, n: u32) {
        self.command(&format!("crc {unit} {n}"));
    }

    /// Requests received per unit id.
    pub fn requests(&mut self) -> std::collections::BTreeMap<String, u64> {
        let json = self.command("stats");
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("stats {json:?}: {e}"))
    }
}

impl Drop for ModbusSlave {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
