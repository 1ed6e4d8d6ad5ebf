//! Fuzz target `jsonl`: see `common::jsonl` for the input format and what is checked.
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::jsonl(data));
