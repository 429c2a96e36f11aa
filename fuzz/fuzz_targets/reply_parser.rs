//! Arbitrary bytes, read as a reply file (status line, headers, body), through
//! `parse_token_reply` and `parse_revoke_reply` under four profiles, and into a
//! machine waiting for the reply in the middle of a refresh.
#![no_main]

#[path = "../../core/tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::check_reply(data));
