//! Replays the committed fuzz corpus on stable Rust, as an ordinary test (issue 11, "Fuzzing").
//!
//! Every file under `fuzz/corpus/<target>/` goes through the same function as the libFuzzer
//! target of that name (`fuzz/fuzz_targets/common.rs`, included here by path), so an input that
//! once crashed a fuzzer, or that covers a path the fuzzer found, fails CI if it regresses. A
//! crash's reproducer is kept in the corpus under a name starting with `crash-` or `timeout-`.
//! Deterministic: no clock, no randomness, files in name order.

#[path = "../fuzz/fuzz_targets/common.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest a single corpus input may take in this (debug) build before it counts as a hang.
const SLOW_INPUT: Duration = Duration::from_secs(2);

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the corpus {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| {
            e.unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every corpus file of `target`, collecting each one that panics or is slow.
fn replay(target: &str) {
    let run = common::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|&(_, run)| run)
        .unwrap_or_else(|| panic!("no fuzz target {target} in common::TARGETS"));
    let files = corpus_files(target);
    assert!(!files.is_empty(), "the corpus of {target} is empty");
    let mut failures = Vec::new();
    for file in &files {
        let data =
            std::fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(|| run(&data));
        let took = started.elapsed();
        if outcome.is_err() {
            failures.push(format!("{} panicked (message above)", file.display()));
        } else if took > SLOW_INPUT {
            failures.push(format!("{} took {took:?}", file.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} corpus inputs of {target} failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn every_corpus_folder_belongs_to_a_target_and_every_target_has_one() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut folders: Vec<String> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", root.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("{}: {e}", root.display()))
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    folders.sort();
    let mut targets: Vec<String> = common::TARGETS
        .iter()
        .map(|(n, _)| (*n).to_owned())
        .collect();
    targets.sort();
    assert_eq!(folders, targets);
}

#[test]
fn z2m_corpus_replays_without_panic() {
    replay("z2m");
}

#[test]
fn generic_mapping_corpus_replays_without_panic() {
    replay("generic_mapping");
}

#[test]
fn otgw_corpus_replays_without_panic() {
    replay("otgw");
}

#[test]
fn jsonl_corpus_replays_without_panic() {
    replay("jsonl");
}

#[test]
fn modbus_map_corpus_replays_without_panic() {
    replay("modbus_map");
}

#[test]
fn config_corpus_replays_without_panic() {
    replay("config");
}
