//! AuthShield: accounts, passwords, tokens, sessions, RBAC and the audit log.
//!
//! Every change to security state runs in one database transaction that also writes
//! its audit entry. Handlers (in `routes`) parse, call one service function and map
//! the result; the services never see HTTP types beyond the shared request context.
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod accounts;
pub mod config;
mod custom_roles;
mod email_change;
mod error;
mod ext_routes;
mod hashpool;
pub mod hibp;
pub mod iptrust;
pub mod keys;
pub mod mail;
mod me_cache;
mod mfa;
pub mod oauth;
pub mod outbound;
mod rbac;
mod retry;
mod rotation;
mod routes;
mod service;
mod sessions;

pub use config::AuthConfig;
pub use custom_roles::InvalidationBus;
pub use error::AuthError;
pub use iptrust::{IpTrustConfig, Lookup, TrustBackend};
pub use mfa::{MfaConfig, StepUpConfig, StepUpOp};
pub use routes::{openapi, router};
pub use service::{AuthService, Bootstrap};
