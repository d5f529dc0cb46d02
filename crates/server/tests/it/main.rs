//! One integration-test binary for the server (link time dominates on small machines).
//! Each test starts the real server on port 0 with fresh databases, on every backend
//! `vaultpay_store::testing::backends()` names (SQLite always; PostgreSQL when
//! `VAULTPAY_TEST_PG_URL` is set, as CI does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_fuzz;
mod audit;
mod auth_attacks;
mod auth_flows;
mod bad_input;
mod crash;
mod email_change;
mod helpers;
mod hibp;
mod iptrust;
mod me_cache;
mod mfa;
#[cfg(feature = "nats")]
mod nats;
mod oauth;
mod oauth_interop;
mod platform;
#[cfg(feature = "redis")]
mod redis;
mod revocation_order;
mod roles;
mod split;
mod upstream_sig;
