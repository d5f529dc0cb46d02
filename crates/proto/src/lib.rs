//! Wire types of the VaultPay HTTP API: requests, responses and the RFC 9457 problem
//! document, with OpenAPI schemas. Shared by the services, the client and the CLI.
//!
//! Request types refuse unknown fields, so a typo in a field name is an error, not a
//! silently ignored value.

pub mod auth;
pub mod iptrust;
pub mod ledger;
pub mod mfa;
mod problem;

pub use problem::{Problem, PROBLEM_CONTENT_TYPE};
