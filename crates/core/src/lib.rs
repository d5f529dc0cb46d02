//! Domain logic for VaultPay with no I/O: money, passwords, tokens, rate limits and
//! the audit hash chain. Everything here is plain Rust, tested with unit and property
//! tests; callers pass the current time in explicitly so rules are testable without
//! sleeping.
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod account_number;
pub mod audit;
pub mod crypto;
pub mod ed25519;
pub mod gcra;
pub mod jwt;
pub mod money;
pub mod password;
pub mod secret;
pub mod step_up;
pub mod time;
pub mod totp;
