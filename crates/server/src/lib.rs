//! The VaultPay server: configuration, wiring of AuthShield and the ledger,
//! middleware (request ids, metrics, limits, security headers), and the CLI.
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod app;
pub mod cli;
pub mod config;
mod docs;
mod middleware;
#[cfg(feature = "nats")]
pub mod nats_sink;
#[cfg(feature = "redis")]
pub mod redis_cluster;
#[cfg(feature = "redis")]
mod redis_conn;
#[cfg(feature = "redis")]
pub mod redis_limiter;
#[cfg(feature = "redis")]
#[doc(hidden)]
pub mod redis_test_support;
pub mod remote;
mod telemetry;

pub use app::{start, Mode, Running};
pub use config::Config;
