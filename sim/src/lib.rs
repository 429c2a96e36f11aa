//! # tokenfence-sim
//!
//! The proof and the laboratory for `tokenfence-core`:
//!
//! - [`provider`]: a sans-IO model of OAuth providers (Intuit first) with ghost state,
//!   answering the exact HTTP requests the core builds;
//! - [`store`]: an in-memory store with compare-and-swap on generation and leases;
//! - [`model`]: a stateright model in which several workers run the real
//!   `tokenfence_core::Connection` against that store and provider, with faults;
//! - [`simulate`]: the deterministic simulator (a year of connections, races and
//!   faults, tokenfence against the naive baselines);
//! - [`check`]: running the checker and reporting verdicts and counterexamples;
//! - [`strategy`]: tokenfence and the naive baselines B1–B4 as driver strategies,
//!   shared by the model and the simulator;
//! - [`mock`]: the provider model served over real HTTP (`tokenfence-sim mock-provider`).
//!
//! See `sim/VERIFICATION.md` for what the checker proves and the figures.

pub mod check;
pub mod mock;
pub mod model;
pub mod provider;
pub mod simulate;
pub mod store;
pub mod strategy;
