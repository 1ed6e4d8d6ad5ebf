//! Serial ports over socat pty pairs: the daemon opens [`PtyPair::device_path`], the test talks
//! to [`PtyPair::test_path`] through a [`TestEnd`] (or hands the path to pymodbus), and
//! [`PtyPair::unplug`] / [`PtyPair::replug`] pull the "USB adapter" out and plug it back in.
//!
//! What socat 1.7.4 on Linux does (checked with python3 experiments; the daemon relies on it):
//! - Ready: `socat -d -d` logs `N PTY is /dev/pts/X` per address, then `N starting data transfer
//!   loop` once both ptys are open with `raw,echo=0` applied; the links exist ~10 ms after spawn.
//!   [`PtyPair::start`] waits for that line (of this socat's pid) and for both links to resolve.
//! - `raw,echo=0`: bytes pass unchanged both ways (CR, LF, NUL, ^C, ^Q/^S, 0x7f, 0xff); no echo.
//! - socat holds both slave ends open itself, so closing the test end is no hang-up: bytes
//!   written while the other end is closed stay in the kernel's pty buffers (not dropped) and are
//!   read when it is opened again. If nobody reads the test end, the device end takes ~18-36 KiB,
//!   then a blocking write blocks forever (non-blocking: EAGAIN).
//! - socat killed (SIGTERM or SIGKILL alike): a holder of the device end gets
//!   POLLIN|POLLOUT|POLLERR|POLLHUP, `read` returns 0 (EOF) at once and keeps doing so (unread
//!   bytes are discarded), `write` and `tcgetattr` fail with EIO.
//! - SIGTERM: socat removes its `link=` symlinks and exits 143. SIGKILL leaves them dangling (a
//!   later pty may reuse the number), so the pair sends SIGTERM and removes leftovers itself.
//! - Replug while a process still holds the dead pty works: new /dev/pts numbers (the held one
//!   stays allocated), and socat replaces stale links at the same paths.
//!
//! Every call blocks the calling thread (bounded); in async tests use a multi-thread runtime.

use super::wait::POLL;
use std::fs::File;
use std::io::{ErrorKind, Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to tell a machine without socat; a silently skipped test cannot fail.
pub const MISSING: &str = "socat not found: apt-get install -y socat";

/// How long socat may take to open both ptys and create the links.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long socat may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`TestEnd::write_all`] waits for room in a full pty buffer (the daemon not reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a non-blocking read or write is retried.
const IO_POLL: Duration = Duration::from_millis(5);
/// What `socat -d -d` logs once both addresses are open and configured.
const READY_LINE: &str = "starting data transfer loop";

/// A socat pty pair (`pty,raw,echo=0` both sides) with links `<dir>/<name>.dev` (the daemon's
/// port) and `<dir>/<name>.test` (the test's side); socat logs to `<dir>/<name>.socat.log`.
/// socat is stopped and the links are removed on drop.
pub struct PtyPair {
    dir: PathBuf,
    name: String,
    child: Option<Child>,
}

impl PtyPair {
    /// Starts socat and waits until both links resolve and socat is transferring data.
    ///
    /// Panics with [`MISSING`] when socat is not installed, and with socat's log when it exits
    /// or is not ready within 10 s.
    pub fn start(dir: &Path, name: &str) -> PtyPair {
        let mut pair = PtyPair {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            child: None,
        };
        for p in [pair.device_path(), pair.test_path()] {
            let s = p.to_string_lossy();
            // socat's address syntax gives `,` `:` `!` quotes and brackets a meaning.
            assert!(
                s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c)),
                "link path {s:?} has characters socat would parse"
            );
        }
        pair.spawn();
        pair
    }

    /// The link the daemon opens (`<dir>/<name>.dev`).
    pub fn device_path(&self) -> PathBuf {
        self.dir.join(format!("{}.dev", self.name))
    }

    /// The link the test side opens (`<dir>/<name>.test`).
    pub fn test_path(&self) -> PathBuf {
        self.dir.join(format!("{}.test", self.name))
    }

    /// The pty the device link points to now (`/dev/pts/N`; changes on every replug).
    pub fn device_pts(&self) -> PathBuf {
        let link = self.device_path();
        std::fs::read_link(&link)
            .unwrap_or_else(|e| panic!("cannot read the link {}: {e}", link.display()))
    }

    /// socat's log so far (every start of this pair appends to it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Opens the test end read-write (`O_NOCTTY | O_NONBLOCK`).
    pub fn open_test_end(&self) -> TestEnd {
        let path = self.test_path();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open the test end {}: {e}", path.display()));
        TestEnd { file, path }
    }

    /// Pulls the adapter out: stops socat (SIGTERM, SIGKILL after 5 s) and removes any links
    /// left behind. A holder of the device end then reads EOF and gets EIO on write; opening
    /// [`PtyPair::device_path`] fails with "not found" until [`PtyPair::replug`].
    pub fn unplug(&mut self) {
        assert!(self.child.is_some(), "{}: unplugged twice", self.name);
        self.stop();
        for p in [self.device_path(), self.test_path()] {
            assert!(
                std::fs::symlink_metadata(&p).is_err(),
                "{} still exists after unplug",
                p.display()
            );
        }
    }

    /// Plugs the adapter back in: a new socat at the same link paths (new /dev/pts numbers).
    /// Unplugs first if still plugged. Test ends opened before are dead: open a new one.
    pub fn replug(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.spawn();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.socat.log", self.name))
    }

    fn spawn(&mut self) {
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));
        let (dev, test) = (self.device_path(), self.test_path());
        let mut child = Command::new("socat")
            .args(["-d", "-d"])
            .arg(format!("pty,raw,echo=0,link={}", dev.display()))
            .arg(format!("pty,raw,echo=0,link={}", test.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| match e.kind() {
                ErrorKind::NotFound => panic!("{MISSING}"),
                _ => panic!("cannot spawn socat: {e}"),
            });
        // Log lines look like `2026/01/02 03:04:05 socat[1234] N starting data transfer loop ...`.
        let ready = format!("[{}] N {READY_LINE}", child.id());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "socat for {} exited with {status} before it was ready\n{}",
                    self.name,
                    self.log()
                );
            }
            let linked = std::fs::metadata(&dev).is_ok() && std::fs::metadata(&test).is_ok();
            if linked && self.log().contains(&ready) {
                self.child = Some(child);
                return;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "socat for {} was not ready within {START_TIMEOUT:?}\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops and reaps socat if it runs, then removes leftover links. Never panics (for drop).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let terminated = match libc::pid_t::try_from(child.id()) {
                Ok(pid) => {
                    // SAFETY: kill(2) on a child we spawned and have not reaped: the pid is ours.
                    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
                    rc == 0
                }
                Err(_) => false,
            };
            let deadline = Instant::now() + STOP_TIMEOUT;
            let mut exited = false;
            while terminated && !exited && Instant::now() < deadline {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                if !exited {
                    std::thread::sleep(IO_POLL);
                }
            }
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for p in [self.device_path(), self.test_path()] {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The test's side of a [`PtyPair`], open read-write and non-blocking.
pub struct TestEnd {
    file: File,
    path: PathBuf,
}

impl TestEnd {
    /// The path it was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes all of `bytes` (they are in the pty when this returns); waits up to 10 s for room
    /// when the buffer is full and panics on any error.
    pub fn write_all(&mut self, bytes: &[u8]) {
        let deadline = Instant::now() + WRITE_TIMEOUT;
        let mut rest = bytes;
        while !rest.is_empty() {
            match self.file.write(rest) {
                Ok(0) => panic!("{} accepted no bytes", self.path.display()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(IO_POLL);
                }
                Err(e) => panic!(
                    "writing {} bytes to {} failed after {} ({e}); is socat gone or the daemon \
                     not reading?",
                    bytes.len(),
                    self.path.display(),
                    bytes.len() - rest.len()
                ),
            }
        }
    }

    /// Writes each line followed by `eol` (e.g. `"\r\n"`), in one write.
    pub fn write_lines(&mut self, lines: &[&str], eol: &str) {
        let mut buf = Vec::new();
        for line in lines {
            buf.extend_from_slice(line.as_bytes());
            buf.extend_from_slice(eol.as_bytes());
        }
        self.write_all(&buf);
    }

    /// Reads what the daemon wrote until `needle` appears or `timeout` passes, and returns all
    /// bytes read (including any that came after the needle in the same read). An empty needle
    /// never matches: it reads for the whole `timeout` (to drain, or to prove silence). Returns
    /// early on EOF/EIO, i.e. when the pair was unplugged.
    pub fn read_until(&mut self, needle: &[u8], timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if contains(&out, needle) {
                        return out;
                    }
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return out,
                Err(e) => panic!(
                    "reading {} failed: {e}; read so far: {:?}",
                    self.path.display(),
                    String::from_utf8_lossy(&out)
                ),
            }
            if Instant::now() >= deadline {
                return out;
            }
            std::thread::sleep(IO_POLL);
        }
    }
}

/// Whether `needle` (non-empty) occurs in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
