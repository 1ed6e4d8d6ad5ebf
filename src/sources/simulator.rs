//! The simulator source: a seeded fleet of thermostats for the demo, benchmarks and site tests.
//!
//! Every step picks one device and changes something a real room would: the temperature drifts
//! towards the setpoint while the load runs, a user nudges the setpoint, the load switches with
//! hysteresis, humidity wanders, the mode changes now and then, a device drops off the network
//! and comes back. Each observation reports the device's whole state (like Zigbee2MQTT with
//! `cache_state`), so the diff engine decides what changed, exactly as in production.
//! The same seed gives the same sequence.

use super::{Envelope, SharedStats, SourceStats};
use crate::channel::WriterMsg;
use crate::config::SimulatorConfig;
use crate::model::{
    Connectivity, Fixed, Function, LoadState, Mode, Observation, Reported, TempUnit, Temperature,
};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
struct SimDevice {
    id: String,
    mode: Mode,
    setpoint: i64,
    temperature: i64,
    humidity: i64,
    active: bool,
    online: bool,
    program: u32,
}

/// A fleet of simulated thermostats.
pub struct Simulator {
    cfg: SimulatorConfig,
    devices: Vec<SimDevice>,
    rng: fastrand::Rng,
    stats: SharedStats,
}

impl Simulator {
    /// A fleet seeded from the config.
    pub fn new(cfg: SimulatorConfig, stats: SharedStats) -> Simulator {
        let mut rng = fastrand::Rng::with_seed(cfg.seed);
        let devices = (0..cfg.devices)
            .map(|i| SimDevice {
                id: format!("{}{:03}", cfg.device_prefix, i + 1),
                mode: if rng.bool() {
                    Mode::Automatic
                } else {
                    Mode::Manual
                },
                setpoint: 1900 + 50 * rng.i64(0..6),
                temperature: 1700 + 10 * rng.i64(0..40),
                humidity: 4000 + 100 * rng.i64(0..15),
                active: false,
                online: true,
                program: 1,
            })
            .collect();
        Simulator {
            cfg,
            devices,
            rng,
            stats,
        }
    }

    /// Advances one device by one realistic step and returns its observation.
    fn step(&mut self, now_ms: i64) -> Observation {
        let i = self.rng.usize(0..self.devices.len());
        let r = self.rng.u32(0..100);
        let rng = &mut self.rng;
        let d = &mut self.devices[i];
        if !d.online {
            d.online = true;
        } else if r < 50 {
            // Temperature moves by 0.2–0.5 °C: towards the setpoint while heating, away otherwise.
            let step = 20 + 10 * rng.i64(0..4);
            d.temperature += if d.active { step } else { -step };
        } else if r < 65 {
            d.humidity += if rng.bool() { 100 } else { -100 } * rng.i64(1..4);
            d.humidity = d.humidity.clamp(2000, 8000);
        } else if r < 80 {
            d.setpoint += if rng.bool() { 50 } else { -50 };
            d.setpoint = d.setpoint.clamp(1500, 2600);
        } else if r < 88 {
            d.active = !d.active;
        } else if r < 97 {
            d.mode = match d.mode {
                Mode::Automatic => Mode::Manual,
                Mode::Manual => Mode::Boost,
                Mode::Boost => Mode::Automatic,
                other => other,
            };
            if d.mode == Mode::Automatic {
                d.program = d.program % 3 + 1;
            }
        } else {
            d.online = false;
        }
        // Hysteresis keeps the simulated room plausible.
        if d.temperature < d.setpoint - 50 {
            d.active = true;
        } else if d.temperature > d.setpoint + 50 {
            d.active = false;
        }
        d.temperature = d.temperature.clamp(1000, 3000);
        Observation {
            device: d.id.clone(),
            source: self.cfg.name.clone(),
            observed_at: now_ms,
            reported: Reported {
                function: Some(Function::Heating),
                mode: Some(d.mode),
                setpoint: Some(Temperature {
                    value: Fixed(d.setpoint),
                    unit: TempUnit::C,
                }),
                program: Some(d.program),
                activation_time: None,
                load_state: Some(if d.active {
                    LoadState::Active
                } else {
                    LoadState::Inactive
                }),
                temperature: Some(Temperature {
                    value: Fixed(d.temperature),
                    unit: TempUnit::C,
                }),
                humidity: Some(Fixed(d.humidity)),
                connectivity: Some(if d.online {
                    Connectivity::Online
                } else {
                    Connectivity::Offline
                }),
            },
        }
    }

    /// Emits observations at `changes_per_sec` until `shutdown` or `max_observations`.
    pub async fn run(mut self, obs_tx: mpsc::Sender<WriterMsg>, shutdown: CancellationToken) {
        let start = Instant::now();
        let rate = self.cfg.changes_per_sec;
        let mut sent: u64 = 0;
        let max = self.cfg.max_observations;
        tracing::info!(source = %self.cfg.name, devices = self.devices.len(), rate, "Simulator started");
        loop {
            if max > 0 && sent >= max {
                break;
            }
            // Emit whatever is due by now (keeps the rate at any timer resolution).
            let due = (start.elapsed().as_secs_f64() * rate) as u64 + 1;
            while sent < due && (max == 0 || sent < max) {
                let obs = self.step(crate::telemetry::now_ms());
                SourceStats::inc(&self.stats.observations);
                let env = Envelope {
                    obs,
                    ack: None,
                    receipt: None,
                };
                tokio::select! {
                    r = obs_tx.send(WriterMsg::Observe(env)) => if r.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
                sent += 1;
            }
            let next_at = start + Duration::from_secs_f64(sent as f64 / rate);
            tokio::select! {
                _ = tokio::time::sleep_until(next_at.into()) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        tracing::info!(source = %self.cfg.name, sent, "Simulator finished");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SimulatorConfig {
        SimulatorConfig {
            name: "sim".into(),
            devices: 3,
            changes_per_sec: 1.0,
            seed: 7,
            device_prefix: "sim-".into(),
            max_observations: 0,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let mut a = Simulator::new(cfg(), Default::default());
        let mut b = Simulator::new(cfg(), Default::default());
        for t in 0..200 {
            assert_eq!(a.step(t), b.step(t));
        }
    }

    #[test]
    fn every_step_reports_the_whole_state_in_plausible_ranges() {
        let mut s = Simulator::new(cfg(), Default::default());
        for t in 0..1000 {
            let o = s.step(t);
            let r = o.reported;
            let temp = r.temperature.unwrap().value.0;
            assert!((1000..=3000).contains(&temp));
            assert!((2000..=8000).contains(&r.humidity.unwrap().0));
            assert!(r.mode.is_some() && r.load_state.is_some() && r.connectivity.is_some());
        }
    }
}
