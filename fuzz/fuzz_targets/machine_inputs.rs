//! Arbitrary bytes decoded into a run of inputs for one or two `Connection`s sharing
//! an in-memory store, with the invariants checked after every input.
#![no_main]

#[path = "../../core/tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::check_machine(data));
