//! # tokenfence
//!
//! Keeps OAuth 2.0 connections alive and correct: a tokio driver, transports and
//! stores around the sans-IO state machine of [`tokenfence_core`].

pub mod callback;
pub mod clock;
pub mod connect;
pub mod console;
pub mod crypto;
mod gate;
pub mod import;
mod manager;
pub mod store;
pub mod transport;

pub use connect::{AuthorizationUrl, ConnectOutcome};
pub use import::{ImportError, ImportOptions, ImportReport, Imported};
pub use manager::{
    ApiResult, BuildError, ConnectionStatus, LifecycleEvent, ManagerError, Provider, Remedy, Sweep,
    TokenManager, TokenManagerBuilder,
};

pub use tokenfence_core as core;
/// What a user of the manager names, so that `tokenfence` is the one dependency.
pub use tokenfence_core::{
    AccessError, AccessToken, ClientCredentials, ClientSecret, ConfigError, ConnectError,
    ConnectOptions, ConnectionId, Environment, Event, ExistingGrant, FailureKind, Generation,
    ProviderProfile, ReauthReason, RefreshToken, SecretString, Settings, Status, Timestamp,
};
