//! # tokenfence
//!
//! Keeps OAuth 2.0 connections alive and correct: a tokio driver, transports and
//! stores around the sans-IO state machine of [`tokenfence_core`].

pub mod store;

pub use tokenfence_core as core;
