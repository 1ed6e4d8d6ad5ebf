//! Waiting for conditions instead of sleeping: poll every [`POLL`] until a deadline, then panic
//! naming what was awaited (pueue `helper/wait.rs`, style.md §2.8).

use std::time::{Duration, Instant};

/// How often a condition is polled.
pub const POLL: Duration = Duration::from_millis(20);

/// A generous default deadline for conditions that should hold within a second or two on an
/// idle machine (CI machines are not idle: two cores shared with compilers).
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `cond` every 20 ms until it returns true; panics with `what` after `timeout`.
///
/// Blocks the calling thread: use [`wait_until_async`] inside async tests.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// Async variant of [`wait_until`]: polls `cond` every 20 ms with a tokio sleep in between.
pub async fn wait_until_async(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `f` every 20 ms until it returns `Some`, and returns the value; panics with `what`
/// after `timeout`.
pub async fn wait_for_async<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Asserts that `cond` holds during the whole of `period` (polled every 20 ms): for what must
/// *not* happen, e.g. a disabled sink sending nothing. Panics with `what` at the first breach.
pub async fn assert_holds_for(what: &str, period: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + period;
    loop {
        assert!(
            cond(),
            "{what}: broken after {:?}",
            period.saturating_sub(end.saturating_duration_since(Instant::now()))
        );
        if Instant::now() >= end {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}
