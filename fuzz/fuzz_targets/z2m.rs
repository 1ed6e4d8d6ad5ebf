//! Fuzz target `z2m`: see `common::z2m` for the input format and what is checked.
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::z2m(data));
