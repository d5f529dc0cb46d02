//! AuthShield: accounts, passwords, tokens, sessions, RBAC and the audit log.
//!
//! Every change to security state runs in one database transaction that also writes
//! its audit entry. Handlers (in `routes`) parse, call one service function and map
//! the result; the services never see HTTP types beyond the shared request context.
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod accounts;
pub mod config;
mod error;
pub mod hibp;
pub mod keys;
pub mod mail;
pub mod oauth;
mod rbac;
mod routes;
mod service;
mod sessions;

pub use config::AuthConfig;
pub use error::AuthError;
pub use routes::{openapi, router};
pub use service::{AuthService, Bootstrap};
