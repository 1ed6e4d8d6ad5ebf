//! Fuzz target `modbus_map`: see `common::modbus_map` for the input format and what is checked.
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::modbus_map(data));
