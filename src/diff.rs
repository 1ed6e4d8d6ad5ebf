//! The diff engine: previous state + one observation → next state + the changes to emit.
//!
//! Pure: no I/O, no logging, no clock, no ids (the writer passes the observation time in and
//! mints ids and sequence numbers). Invariants, each property-tested below:
//! - the first observation of a device yields exactly one `snapshot`;
//! - re-observing the current state yields nothing, nor does a move inside a deadband;
//! - applying the emitted changes to the previous state yields the next state;
//! - a measurement is compared with the last *emitted* value, so a slow drift is never hidden:
//!   once it adds up to the deadband it is emitted.

use crate::model::{Change, ChangeKind, DeviceState, Field, Fixed, Measurement, Reported, UnixMs};

/// Thresholds that decide whether a measurement moved enough to be worth an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffPolicy {
    /// Smallest temperature change emitted, in the device's unit (hundredths).
    pub temperature_deadband: Fixed,
    /// Smallest humidity change emitted, %RH (hundredths).
    pub humidity_deadband: Fixed,
    /// Minimum time between two events of the same measurement; 0 = no limit.
    pub measurement_min_interval_ms: i64,
}

impl Default for DiffPolicy {
    fn default() -> Self {
        DiffPolicy {
            temperature_deadband: Fixed(20),
            humidity_deadband: Fixed(100),
            measurement_min_interval_ms: 0,
        }
    }
}

/// Diff bookkeeping kept per device next to its state (cached by the writer, rebuilt at start).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceRecord {
    pub state: DeviceState,
    /// Last sequence number assigned (0 = none yet).
    pub seq: u64,
    /// When the last `snapshot` event was observed.
    pub last_snapshot_at: UnixMs,
    /// Whether any change was emitted since the last snapshot.
    pub changed_since_snapshot: bool,
}

impl DeviceRecord {
    /// Updates the bookkeeping after the writer emitted `kind` at `at`.
    pub fn note_emitted(&mut self, kind: ChangeKind, at: UnixMs) {
        match kind {
            ChangeKind::Snapshot => {
                self.last_snapshot_at = at;
                self.changed_since_snapshot = false;
            }
            ChangeKind::Field(_) => self.changed_since_snapshot = true,
        }
    }
}

/// True when a periodic self-healing snapshot is due: something changed since the last one and
/// at least `interval_ms` passed.
pub fn snapshot_due(rec: &DeviceRecord, now: UnixMs, interval_ms: i64) -> bool {
    rec.changed_since_snapshot && now.saturating_sub(rec.last_snapshot_at) >= interval_ms
}

/// Diffs one observation against the previous state (`None`: first sight of the device).
///
/// Returns the next state and the changes in a deterministic order (the order of [`Field::ALL`]).
pub fn diff(
    prev: Option<&DeviceState>,
    rep: &Reported,
    policy: &DiffPolicy,
    observed_at: UnixMs,
) -> (DeviceState, Vec<Change>) {
    let Some(prev) = prev else {
        let mut next = DeviceState::default();
        for f in Field::ALL {
            set_reported(&mut next, rep, f, observed_at);
        }
        let snapshot = Change {
            kind: ChangeKind::Snapshot,
            previous: serde_json::Value::Null,
            current: serde_json::Value::Null,
        };
        return (next, vec![snapshot]);
    };
    let mut next = prev.clone();
    let mut changes = Vec::new();
    for f in Field::ALL {
        if field_changes(prev, rep, f, policy, observed_at) {
            set_reported(&mut next, rep, f, observed_at);
            changes.push(Change {
                kind: ChangeKind::Field(f),
                previous: prev.field_json(f),
                current: next.field_json(f),
            });
        }
    }
    (next, changes)
}

/// Does the reported value of `f` differ enough from `prev` to emit a change?
fn field_changes(prev: &DeviceState, rep: &Reported, f: Field, p: &DiffPolicy, at: UnixMs) -> bool {
    match f {
        Field::Function => rep.function.is_some_and(|v| prev.function != Some(v)),
        Field::Mode => rep.mode.is_some_and(|v| prev.mode != Some(v)),
        Field::Setpoint => rep.setpoint.is_some_and(|v| prev.setpoint != Some(v)),
        Field::Program => rep.program.is_some_and(|v| prev.program != Some(v)),
        Field::ActivationTime => rep
            .activation_time
            .is_some_and(|v| prev.activation_time != Some(v)),
        Field::LoadState => rep.load_state.is_some_and(|v| prev.load_state != Some(v)),
        Field::Connectivity => rep
            .connectivity
            .is_some_and(|v| prev.connectivity != Some(v)),
        Field::Temperature => rep.temperature.is_some_and(|t| {
            measurement_moved(
                prev.temperature.as_ref(),
                t.value,
                t.unit.as_str(),
                p.temperature_deadband,
                p,
                at,
            )
        }),
        Field::Humidity => rep.humidity.is_some_and(|h| {
            measurement_moved(prev.humidity.as_ref(), h, "%", p.humidity_deadband, p, at)
        }),
    }
}

fn measurement_moved(
    prev: Option<&Measurement>,
    value: Fixed,
    unit: &str,
    deadband: Fixed,
    p: &DiffPolicy,
    at: UnixMs,
) -> bool {
    let Some(prev) = prev else { return true };
    if prev.unit != unit {
        return true;
    }
    let delta = prev.value.abs_diff(value);
    if delta == 0 || delta < deadband.0.unsigned_abs() {
        return false;
    }
    at.saturating_sub(prev.time) >= p.measurement_min_interval_ms
}

/// Copies one field from `src` to `dst` (used to build the state after each single change).
pub fn copy_field(dst: &mut DeviceState, src: &DeviceState, f: Field) {
    match f {
        Field::Function => dst.function = src.function,
        Field::Mode => dst.mode = src.mode,
        Field::Setpoint => dst.setpoint = src.setpoint,
        Field::Program => dst.program = src.program,
        Field::ActivationTime => dst.activation_time = src.activation_time,
        Field::LoadState => dst.load_state = src.load_state,
        Field::Temperature => dst.temperature.clone_from(&src.temperature),
        Field::Humidity => dst.humidity.clone_from(&src.humidity),
        Field::Connectivity => dst.connectivity = src.connectivity,
    }
}

fn set_reported(next: &mut DeviceState, rep: &Reported, f: Field, at: UnixMs) {
    match f {
        Field::Function => set(&mut next.function, rep.function),
        Field::Mode => set(&mut next.mode, rep.mode),
        Field::Setpoint => set(&mut next.setpoint, rep.setpoint),
        Field::Program => set(&mut next.program, rep.program),
        Field::ActivationTime => set(&mut next.activation_time, rep.activation_time),
        Field::LoadState => set(&mut next.load_state, rep.load_state),
        Field::Connectivity => set(&mut next.connectivity, rep.connectivity),
        Field::Temperature => {
            if let Some(t) = rep.temperature {
                next.temperature = Some(Measurement {
                    value: t.value,
                    unit: t.unit.as_str().to_string(),
                    time: at,
                });
            }
        }
        Field::Humidity => {
            if let Some(h) = rep.humidity {
                next.humidity = Some(Measurement {
                    value: h,
                    unit: "%".to_string(),
                    time: at,
                });
            }
        }
    }
}

fn set<T: Copy>(slot: &mut Option<T>, v: Option<T>) {
    if let Some(v) = v {
        *slot = Some(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Connectivity, Function, LoadState, Mode, TempUnit, Temperature};
    use proptest::prelude::*;

    fn c(v: i64) -> Temperature {
        Temperature {
            value: Fixed(v),
            unit: TempUnit::C,
        }
    }

    /// Applies one field change to a state, the way a receiver would (wire JSON → state).
    fn apply(state: &mut DeviceState, ch: &Change, at: UnixMs) {
        let ChangeKind::Field(f) = ch.kind else {
            return;
        };
        let cur = &ch.current;
        let s = |v: &serde_json::Value| v.as_str().unwrap().to_string();
        match f {
            Field::Function => state.function = Function::parse(&s(cur)),
            Field::Mode => state.mode = Mode::parse(&s(cur)),
            Field::Setpoint => {
                state.setpoint = Some(Temperature {
                    value: Fixed::parse(&s(&cur["value"])).unwrap(),
                    unit: TempUnit::parse(&s(&cur["unit"])).unwrap(),
                })
            }
            Field::Program => state.program = Some(cur.as_u64().unwrap() as u32),
            Field::ActivationTime => {
                state.activation_time = crate::model::parse_rfc3339_ms(&s(cur))
            }
            Field::LoadState => state.load_state = LoadState::parse(&s(cur)),
            Field::Connectivity => state.connectivity = Connectivity::parse(&s(cur)),
            Field::Temperature | Field::Humidity => {
                let m = Measurement {
                    value: Fixed::parse(&s(&cur["value"])).unwrap(),
                    unit: s(&cur["unit"]),
                    time: at,
                };
                if f == Field::Temperature {
                    state.temperature = Some(m)
                } else {
                    state.humidity = Some(m)
                }
            }
        }
    }

    #[test]
    fn first_observation_yields_one_snapshot_with_the_reported_state() {
        let rep = Reported {
            setpoint: Some(c(2100)),
            mode: Some(Mode::Manual),
            ..Default::default()
        };
        let (next, ch) = diff(None, &rep, &DiffPolicy::default(), 5);
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].kind, ChangeKind::Snapshot);
        assert_eq!(next.setpoint, Some(c(2100)));
        assert_eq!(next.mode, Some(Mode::Manual));
    }

    #[test]
    fn setpoint_change_reports_previous_and_current() {
        let prev = DeviceState {
            setpoint: Some(c(2050)),
            ..Default::default()
        };
        let rep = Reported {
            setpoint: Some(c(2100)),
            ..Default::default()
        };
        let (_, ch) = diff(Some(&prev), &rep, &DiffPolicy::default(), 0);
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].kind, ChangeKind::Field(Field::Setpoint));
        assert_eq!(
            ch[0].previous,
            serde_json::json!({"value": "20.5", "unit": "C"})
        );
        assert_eq!(
            ch[0].current,
            serde_json::json!({"value": "21.0", "unit": "C"})
        );
    }

    #[test]
    fn temperature_inside_deadband_is_not_emitted_but_drift_is() {
        let p = DiffPolicy::default();
        let (s1, _) = diff(
            None,
            &Reported {
                temperature: Some(c(2000)),
                ..Default::default()
            },
            &p,
            0,
        );
        let (s2, ch) = diff(
            Some(&s1),
            &Reported {
                temperature: Some(c(2010)),
                ..Default::default()
            },
            &p,
            1,
        );
        assert!(ch.is_empty());
        assert_eq!(s2, s1, "state keeps the last emitted value");
        let (_, ch) = diff(
            Some(&s2),
            &Reported {
                temperature: Some(c(2020)),
                ..Default::default()
            },
            &p,
            2,
        );
        assert_eq!(ch.len(), 1);
        assert_eq!(
            ch[0].current,
            serde_json::json!({"value": "20.2", "unit": "C", "time": "1970-01-01T00:00:00.002Z"})
        );
    }

    #[test]
    fn unit_change_is_emitted_even_inside_deadband() {
        let p = DiffPolicy::default();
        let prev = DeviceState {
            temperature: Some(Measurement {
                value: Fixed(2000),
                unit: "C".into(),
                time: 0,
            }),
            ..Default::default()
        };
        let rep = Reported {
            temperature: Some(Temperature {
                value: Fixed(2000),
                unit: TempUnit::F,
            }),
            ..Default::default()
        };
        let (_, ch) = diff(Some(&prev), &rep, &p, 1);
        assert_eq!(ch.len(), 1);
    }

    #[test]
    fn minimum_interval_holds_back_measurements() {
        let p = DiffPolicy {
            measurement_min_interval_ms: 60_000,
            ..Default::default()
        };
        let prev = DeviceState {
            humidity: Some(Measurement {
                value: Fixed(4000),
                unit: "%".into(),
                time: 0,
            }),
            ..Default::default()
        };
        let rep = Reported {
            humidity: Some(Fixed(4500)),
            ..Default::default()
        };
        assert!(diff(Some(&prev), &rep, &p, 59_999).1.is_empty());
        assert_eq!(diff(Some(&prev), &rep, &p, 60_000).1.len(), 1);
    }

    #[test]
    fn snapshot_is_due_only_after_a_change_and_the_interval() {
        let mut r = DeviceRecord {
            last_snapshot_at: 0,
            ..Default::default()
        };
        assert!(!snapshot_due(&r, 1_000_000, 900_000));
        r.note_emitted(ChangeKind::Field(Field::Mode), 10);
        assert!(!snapshot_due(&r, 899_999, 900_000));
        assert!(snapshot_due(&r, 900_000, 900_000));
        r.note_emitted(ChangeKind::Snapshot, 900_000);
        assert!(!snapshot_due(&r, 2_000_000, 900_000));
    }

    fn arb_reported() -> impl Strategy<Value = Reported> {
        (
            proptest::option::of(prop_oneof![
                Just(Function::Heating),
                Just(Function::Cooling)
            ]),
            proptest::option::of(proptest::sample::select(Mode::ALL.to_vec())),
            proptest::option::of((500i64..3500).prop_map(c)),
            proptest::option::of(0u32..8),
            proptest::option::of(0i64..4_000_000_000_000),
            proptest::option::of(prop_oneof![
                Just(LoadState::Active),
                Just(LoadState::Inactive)
            ]),
            proptest::option::of(
                (
                    -1000i64..5000,
                    prop_oneof![Just(TempUnit::C), Just(TempUnit::F)],
                )
                    .prop_map(|(v, u)| Temperature {
                        value: Fixed(v),
                        unit: u,
                    }),
            ),
            proptest::option::of((0i64..10_000).prop_map(Fixed)),
            proptest::option::of(prop_oneof![
                Just(Connectivity::Online),
                Just(Connectivity::Offline)
            ]),
        )
            .prop_map(
                |(
                    function,
                    mode,
                    setpoint,
                    program,
                    activation_time,
                    load_state,
                    temperature,
                    humidity,
                    connectivity,
                )| Reported {
                    function,
                    mode,
                    setpoint,
                    program,
                    activation_time,
                    load_state,
                    temperature,
                    humidity,
                    connectivity,
                },
            )
    }

    fn arb_policy() -> impl Strategy<Value = DiffPolicy> {
        (0i64..100, 0i64..300, prop_oneof![Just(0i64), 1i64..5_000]).prop_map(|(t, h, i)| {
            DiffPolicy {
                temperature_deadband: Fixed(t),
                humidity_deadband: Fixed(h),
                measurement_min_interval_ms: i,
            }
        })
    }

    proptest! {
        #[test]
        fn applying_the_changes_to_the_previous_state_yields_the_next(
            first in arb_reported(), second in arb_reported(), p in arb_policy(), dt in 0i64..10_000,
        ) {
            let (s1, _) = diff(None, &first, &p, 1_000);
            let (s2, changes) = diff(Some(&s1), &second, &p, 1_000 + dt);
            let mut applied = s1.clone();
            for ch in &changes {
                apply(&mut applied, ch, 1_000 + dt);
            }
            prop_assert_eq!(applied, s2);
        }

        #[test]
        fn copying_the_changed_fields_one_by_one_ends_at_the_next_state(
            first in arb_reported(), second in arb_reported(), p in arb_policy(),
        ) {
            let (s1, _) = diff(None, &first, &p, 0);
            let (s2, changes) = diff(Some(&s1), &second, &p, 5);
            let mut cur = s1.clone();
            for ch in &changes {
                if let ChangeKind::Field(f) = ch.kind {
                    prop_assert_eq!(cur.field_json(f), ch.previous.clone());
                    copy_field(&mut cur, &s2, f);
                    prop_assert_eq!(cur.field_json(f), ch.current.clone());
                }
            }
            prop_assert_eq!(cur, s2);
        }

        #[test]
        fn re_observing_the_same_state_emits_nothing(first in arb_reported(), p in arb_policy(), dt in 0i64..10_000) {
            let (s1, _) = diff(None, &first, &p, 0);
            let (s2, changes) = diff(Some(&s1), &first, &p, dt);
            prop_assert!(changes.is_empty());
            prop_assert_eq!(s2, s1);
        }

        #[test]
        fn first_observation_is_exactly_one_snapshot(first in arb_reported(), p in arb_policy()) {
            let (_, changes) = diff(None, &first, &p, 0);
            prop_assert_eq!(changes.len(), 1);
            prop_assert_eq!(changes[0].kind, ChangeKind::Snapshot);
        }

        #[test]
        fn deadband_never_hides_a_cumulative_drift(
            start in 1000i64..3000, steps in proptest::collection::vec(-30i64..30, 1..200), band in 1i64..100,
        ) {
            let p = DiffPolicy { temperature_deadband: Fixed(band), ..Default::default() };
            let (mut s, _) = diff(None, &Reported { temperature: Some(c(start)), ..Default::default() }, &p, 0);
            let mut v = start;
            for (i, d) in steps.iter().enumerate() {
                v += d;
                let (n, _) = diff(Some(&s), &Reported { temperature: Some(c(v)), ..Default::default() }, &p, i as i64 + 1);
                s = n;
                let emitted = s.temperature.as_ref().unwrap().value.0;
                prop_assert!((v - emitted).abs() < band, "true {v}, emitted {emitted}, band {band}");
            }
        }

        #[test]
        fn change_order_is_deterministic_and_follows_field_order(first in arb_reported(), second in arb_reported()) {
            let p = DiffPolicy::default();
            let (s1, _) = diff(None, &first, &p, 0);
            let (_, a) = diff(Some(&s1), &second, &p, 1);
            let (_, b) = diff(Some(&s1), &second, &p, 1);
            prop_assert_eq!(&a, &b);
            let order: Vec<_> = a.iter().map(|c| match c.kind { ChangeKind::Field(f) => f, ChangeKind::Snapshot => unreachable!() }).collect();
            let mut sorted = order.clone();
            sorted.sort();
            prop_assert_eq!(order, sorted);
        }
    }
}
