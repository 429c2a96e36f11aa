//! The adapters' integration tests in one test binary: one link instead of eleven,
//! the largest part of the test build. Run one group with its module name, e.g.
//! `cargo test -p tokenfence --test suite connect::`.

mod common;

mod cli;
mod connect;
mod console;
mod dormant;
mod import;
mod manager;
mod providers;
mod quarantine;
mod reject;
mod store_conformance;
mod store_differential;
