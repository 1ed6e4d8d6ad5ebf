//! Fuzz target `generic_mapping`: see `common::generic_mapping` for the input format and what is checked.
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::generic_mapping(data));
