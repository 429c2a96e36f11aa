//! # tokenfence-sim
//!
//! The proof and the laboratory for `tokenfence-core`:
//!
//! - [`provider`]: a sans-IO model of OAuth providers (Intuit first) with ghost state,
//!   answering the exact HTTP requests the core builds;
//! - [`store`]: an in-memory store with compare-and-swap on generation and leases;
//! - [`model`]: a stateright model in which several workers run the real
//!   `tokenfence_core::Connection` against that store and provider, with faults;
//! - [`check`]: running the checker and reporting verdicts and counterexamples;
//! - [`mock`]: the provider model served over real HTTP (`tokenfence-sim mock-provider`).
//!
//! See `sim/VERIFICATION.md` for what the checker proves and the figures.

pub mod check;
pub mod mock;
pub mod model;
pub mod provider;
pub mod store;
