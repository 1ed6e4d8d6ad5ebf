//! `hvac-edge check-config`: load and validate a config, print every problem with its key, and
//! warnings (legal but unwise settings, [`crate::config::Config::warnings`]) on stderr.

use crate::config::{self, LoadError};
use std::path::Path;

/// Prints the verdict; returns the exit code (0 valid, 78 invalid, 1 unreadable).
pub fn run(path: &Path) -> i32 {
    match config::load(path) {
        Ok(cfg) => {
            // Warnings do not change the verdict or the exit status.
            for w in cfg.warnings() {
                eprintln!("warning: {w}");
            }
            println!(
                "{} is valid: gateway {}, {} source(s), {} sink(s), database {}",
                path.display(),
                cfg.gateway.id,
                cfg.sources.mqtt.len()
                    + cfg.sources.otgw.len()
                    + cfg.sources.modbus.len()
                    + cfg.sources.jsonl.len()
                    + cfg.sources.simulator.len(),
                cfg.sinks.len(),
                cfg.store.path.display()
            );
            0
        }
        Err(e @ LoadError::Read { .. }) => {
            eprintln!("error: {e}");
            1
        }
        Err(e) => {
            eprintln!("error: {e}");
            super::EXIT_CONFIG
        }
    }
}
