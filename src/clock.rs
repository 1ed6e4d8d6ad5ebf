//! Wall-clock steps, for event ages that stay right when the clock jumps.
//!
//! A gateway without RTC boots with a guessed clock (1970, or fake-hwclock's last save) and NTP
//! later steps it. Event times (`observed_at`) and TTL ages come from the wall clock, so a step
//! forward of a day would make every held event look a day older, and expire it at once.
//!
//! The writer calls [`ClockSteps::check`] about once a second with the last committed `pos`: when
//! the wall clock moved by more than [`STEP_THRESHOLD_MS`] more (or less) than the monotonic clock
//! since the last check, the difference is recorded as a step that applies to every event at or
//! before that `pos`. Sinks then compute ages with [`ClockSteps::age_ms`], which re-bases an
//! event's time by the steps that happened after it was committed. Events committed within the
//! one check interval around a step may be counted on either side of it (at most one second of
//! error on their age). Steps live in memory: a step while the daemon is down cannot be seen.
//!
//! Pure apart from the clocks its caller passes in; no I/O.

use std::sync::Mutex;
use std::time::Instant;

/// A wall-clock jump larger than this (beyond the monotonic clock) is a step, not drift.
pub const STEP_THRESHOLD_MS: i64 = 2000;
/// Steps remembered; older ones are merged into the oldest kept (they then re-base a few more
/// events than they should, by the smaller amount: ages err on the young side).
const MAX_STEPS: usize = 32;

/// One observed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Events with `pos <= before_pos` were stamped before the step.
    pub before_pos: i64,
    /// How far the wall clock jumped, ms (positive: forward).
    pub delta_ms: i64,
}

#[derive(Debug)]
struct Inner {
    /// Wall time, monotonic time and last committed `pos` of the previous check.
    anchor: Option<(i64, Instant, i64)>,
    steps: Vec<Step>,
}

/// The steps seen by this process, shared by the writer (which records) and the sinks (which
/// compute ages).
#[derive(Debug)]
pub struct ClockSteps {
    inner: Mutex<Inner>,
}

impl Default for ClockSteps {
    fn default() -> Self {
        ClockSteps {
            inner: Mutex::new(Inner {
                anchor: None,
                steps: Vec::new(),
            }),
        }
    }
}

/// Appends `s`, merging a step at the same position and keeping at most [`MAX_STEPS`]: the two
/// oldest merge into one at the later boundary whose re-basing errs young (it takes the later
/// step plus the earlier one only if that was forward).
fn push_step(steps: &mut Vec<Step>, s: Step) {
    match steps.last_mut() {
        Some(last) if last.before_pos == s.before_pos => {
            last.delta_ms = last.delta_ms.saturating_add(s.delta_ms);
        }
        _ => steps.push(s),
    }
    if steps.len() > MAX_STEPS {
        let a = steps.remove(0);
        let b = &mut steps[0];
        b.delta_ms = b.delta_ms.saturating_add(a.delta_ms.max(0));
    }
}

impl ClockSteps {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Compares the wall clock `wall_ms` with the monotonic `mono` since the last check; records
    /// and returns a step larger than [`STEP_THRESHOLD_MS`], applying to events up to `last_pos`.
    pub fn check(&self, wall_ms: i64, mono: Instant, last_pos: i64) -> Option<Step> {
        let mut g = self.lock();
        let step = g.anchor.and_then(|(w0, m0, p0)| {
            let mono_ms =
                i64::try_from(mono.saturating_duration_since(m0).as_millis()).unwrap_or(i64::MAX);
            let delta = wall_ms.saturating_sub(w0.saturating_add(mono_ms));
            // Events committed between the previous check and this one may carry either clock.
            // Count them on the side that makes them look younger: a forward step re-bases them
            // (they are at most the step younger), a backward one leaves them (their stamps are
            // ahead). Ages err young, never old: nothing expires early.
            let before_pos = if delta > 0 { last_pos } else { p0 };
            (delta.unsigned_abs() > STEP_THRESHOLD_MS.unsigned_abs()).then_some(Step {
                before_pos,
                delta_ms: delta,
            })
        });
        g.anchor = Some((wall_ms, mono, last_pos));
        if let Some(s) = step {
            push_step(&mut g.steps, s);
        }
        step
    }

    /// Adds steps recorded earlier (e.g. by a previous run, from the database), oldest first.
    pub fn restore(&self, steps: &[Step]) {
        let mut g = self.lock();
        for s in steps {
            push_step(&mut g.steps, *s);
        }
    }

    /// Steps recorded so far, oldest first.
    pub fn steps(&self) -> Vec<Step> {
        self.lock().steps.clone()
    }

    /// Age of the event at `pos` stamped `observed_at`, at wall time `now_ms`, in the current
    /// clock's terms: the steps recorded after the event was committed are taken out.
    pub fn age_ms(&self, now_ms: i64, observed_at: i64, pos: i64) -> i64 {
        let g = self.lock();
        let shift: i64 = g
            .steps
            .iter()
            .filter(|s| pos <= s.before_pos)
            .fold(0i64, |acc, s| acc.saturating_add(s.delta_ms));
        now_ms.saturating_sub(observed_at).saturating_sub(shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DAY: i64 = 86_400_000;

    #[test]
    fn steady_clock_and_small_drift_record_no_step() {
        let c = ClockSteps::default();
        let t0 = Instant::now();
        assert_eq!(c.check(1_000_000, t0, 10), None);
        assert_eq!(c.check(1_001_000, t0 + Duration::from_secs(1), 20), None);
        // 1.5 s of slew over one second is under the threshold.
        assert_eq!(c.check(1_003_500, t0 + Duration::from_secs(2), 30), None);
        assert!(c.steps().is_empty());
        assert_eq!(c.age_ms(1_003_500, 1_000_000, 10), 3_500);
    }

    #[test]
    fn a_forward_step_of_a_day_does_not_age_earlier_events() {
        let c = ClockSteps::default();
        let t0 = Instant::now();
        let boot = 1_700_000_000_000;
        c.check(boot, t0, 0);
        // 5 events committed in the first minute, then NTP steps the clock forward by a day.
        let after = t0 + Duration::from_secs(60);
        let step = c.check(boot + 60_000 + DAY, after, 5);
        assert_eq!(
            step,
            Some(Step {
                before_pos: 5,
                delta_ms: DAY
            })
        );
        let now = boot + 120_000 + DAY;
        // An event of the first minute is two minutes old, not a day and two minutes.
        assert_eq!(c.age_ms(now, boot + 1_000, 3), 119_000);
        // An event committed after the step is aged with the new clock only.
        assert_eq!(c.age_ms(now, boot + DAY + 90_000, 6), 30_000);
    }

    #[test]
    fn a_backward_step_keeps_ages_right_too_and_steps_add_up() {
        let c = ClockSteps::default();
        let t0 = Instant::now();
        let w = 1_800_000_000_000;
        // Events 1-4 were committed before this check; a backward step re-bases only those
        // (the events between two checks keep their stamps, which are ahead: they look younger).
        c.check(w, t0, 4);
        let s1 = c.check(w + 1_000 - DAY, t0 + Duration::from_secs(1), 6);
        assert_eq!(
            s1,
            Some(Step {
                before_pos: 4,
                delta_ms: -DAY
            })
        );
        let s2 = c.check(w + 2_000 - DAY + 10_000, t0 + Duration::from_secs(2), 9);
        assert_eq!(s2.map(|s| s.delta_ms), Some(10_000));
        let now = w + 3_000 - DAY + 10_000;
        assert_eq!(c.age_ms(now, w, 1), 3_000, "before both steps");
        assert!(
            c.age_ms(now, w + 900, 5) < 0,
            "stamped just before the step, between two checks: young, never old"
        );
        assert_eq!(c.age_ms(now, w + 1_500 - DAY, 7), 1_500, "between them");
        assert_eq!(c.age_ms(now, now - 200, 10), 200, "after both");
    }

    #[test]
    fn steps_at_the_same_position_merge_and_the_list_stays_bounded() {
        let c = ClockSteps::default();
        let t0 = Instant::now();
        c.check(0, t0, 1);
        c.check(10_000, t0, 1);
        c.check(20_000, t0, 1);
        c.restore(&[]);
        assert_eq!(
            c.steps(),
            vec![Step {
                before_pos: 1,
                delta_ms: 20_000
            }]
        );
        let mut wall = 20_000;
        for pos in 2..200 {
            wall += 5_000;
            c.check(wall, t0, pos);
        }
        assert!(c.steps().len() <= MAX_STEPS);
        // Every merged step was forward: the oldest kept covers at least the later ones' total.
        let steps = c.steps();
        assert!(steps[0].delta_ms >= 5_000, "{:?}", steps[0]);
        // An event before every step is re-based by the sum of all of them (the merges kept the
        // forward parts): its age is not inflated.
        let total: i64 = 20_000 + 198 * 5_000;
        assert!(
            c.age_ms(wall, 0, 1) <= wall - total,
            "age {}",
            c.age_ms(wall, 0, 1)
        );
        // Saturating arithmetic: extreme readings never panic.
        c.check(i64::MAX, t0, i64::MAX);
        c.check(i64::MIN, t0, 0);
        let _ = c.age_ms(i64::MIN, i64::MAX, 0);
    }
}
