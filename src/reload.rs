//! What a configuration reload may change, and how its outcome is reported.
//!
//! A reload (SIGHUP, `hvac-edge reload`, `systemctl reload hvac-edge`) re-reads the config file
//! and applies it by component: sources and sinks added, removed or whose section changed are
//! started, stopped or restarted; the others keep running untouched. The writer takes the new
//! device metadata, deadbands, limits and timings. The identity (`[gateway]`), the database
//! (`[store]`), logging (`[log]`), the metrics endpoint (`[metrics]`) and the channel size (`pipeline.queue_len`) are fixed for the
//! life of the process: a reload that changes them is refused as a whole, with the keys, and the
//! old config keeps running. So is a config that does not validate or whose components cannot
//! be built (an unreadable secret file, a bad mapping).

use crate::config::{Config, LoadError};
use serde::{Deserialize, Serialize};

/// The outcome of one reload, as stored in `reloads.outcome` and printed by `hvac-edge reload`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// The file that was read.
    pub config: String,
    /// The new config is running (possibly with `problems` about single components that could
    /// not be stopped in time).
    pub applied: bool,
    /// `source NAME` / `sink NAME` started because they are new.
    #[serde(default)]
    pub started: Vec<String>,
    /// Removed from the config and stopped.
    #[serde(default)]
    pub stopped: Vec<String>,
    /// Their section changed: stopped, then started with the new settings.
    #[serde(default)]
    pub restarted: Vec<String>,
    /// How many components kept running untouched.
    #[serde(default)]
    pub unchanged: usize,
    /// The writer's settings changed (devices metadata, deadbands, limits, timings, sinks).
    #[serde(default)]
    pub writer_changed: bool,
    /// Every problem, each with its key where there is one.
    #[serde(default)]
    pub problems: Vec<String>,
    /// Warnings of the new config (as `check-config` prints them).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The request nonce `hvac-edge reload` recorded before signalling (see
    /// `store::reloads::set_request`), as read when this reload began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<i64>,
}

impl ReloadOutcome {
    /// A refused reload: the old config keeps running.
    pub fn refused(config: &str, problems: Vec<String>) -> ReloadOutcome {
        ReloadOutcome {
            config: config.to_string(),
            applied: false,
            problems,
            ..ReloadOutcome::default()
        }
    }

    /// One line for the journal and `STATUS=`.
    pub fn summary(&self) -> String {
        if !self.applied {
            return format!(
                "reload refused ({} problem{}); the previous configuration keeps running",
                self.problems.len(),
                if self.problems.len() == 1 { "" } else { "s" }
            );
        }
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        format!(
            "reloaded: started {}; stopped {}; restarted {}; {} unchanged{}{}",
            list(&self.started),
            list(&self.stopped),
            list(&self.restarted),
            self.unchanged,
            if self.writer_changed {
                "; writer settings updated"
            } else {
                ""
            },
            if self.problems.is_empty() {
                String::new()
            } else {
                format!("; {} problem(s)", self.problems.len())
            }
        )
    }
}

/// Each problem of a config that did not load, with its key where there is one.
pub fn problems_of(e: &LoadError) -> Vec<String> {
    match e {
        LoadError::Invalid { problems, .. } => problems.iter().map(ToString::to_string).collect(),
        other => vec![other.to_string()],
    }
}

/// Sections a running daemon cannot take over, with the key of each that changed.
pub fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |key: &str, a: String, b: String| {
        if a != b {
            out.push(format!(
                "{key}: changed, but it is fixed while the daemon runs; restart the service to apply it (systemctl restart hvac-edge)"
            ));
        }
    };
    check(
        "gateway",
        format!("{:?}", old.gateway),
        format!("{:?}", new.gateway),
    );
    check(
        "store",
        format!("{:?}", old.store),
        format!("{:?}", new.store),
    );
    check("log", format!("{:?}", old.log), format!("{:?}", new.log));
    check(
        "metrics",
        format!("{:?}", old.metrics),
        format!("{:?}", new.metrics),
    );
    check(
        "pipeline.queue_len",
        old.pipeline.queue_len.to_string(),
        new.pipeline.queue_len.to_string(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            "[gateway]\nid = \"gw-1\"\n[store]\npath = \"/tmp/x.db\"\n{extra}\n[[sources.simulator]]\nname = \"sim\"\n"
        );
        crate::config::parse(&text, std::path::Path::new("t.toml"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn only_identity_store_log_and_channel_size_need_a_restart() {
        let a = cfg("");
        assert!(restart_needed(&a, &cfg("")).is_empty());
        assert!(restart_needed(&a, &cfg("[pipeline]\nbatch_max = 10")).is_empty());
        let b = cfg("[pipeline]\nqueue_len = 99\n[log]\nlevel = \"debug\"");
        let keys: Vec<String> = restart_needed(&a, &b)
            .iter()
            .map(|p| p.split(':').next().unwrap_or_default().to_string())
            .collect();
        assert_eq!(keys, vec!["log", "pipeline.queue_len"]);
    }

    #[test]
    fn a_summary_names_what_changed_and_a_refusal_counts_its_problems() {
        let o = ReloadOutcome {
            applied: true,
            started: vec!["sink b".into()],
            restarted: vec!["source z2m".into()],
            unchanged: 2,
            ..ReloadOutcome::default()
        };
        assert_eq!(
            o.summary(),
            "reloaded: started sink b; stopped none; restarted source z2m; 2 unchanged"
        );
        let r = ReloadOutcome::refused("c.toml", vec!["a: x".into(), "b: y".into()]);
        assert_eq!(
            r.summary(),
            "reload refused (2 problems); the previous configuration keeps running"
        );
    }
}
