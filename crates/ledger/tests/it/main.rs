//! Integration tests of the ledger: the real axum router, real tokens, both backends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod accounts;
mod admin;
mod batch;
mod common;
mod concurrency;
mod holds;
mod idempotency;
mod openapi;
mod props;
mod transfers;
