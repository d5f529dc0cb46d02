//! HTTP glue shared by AuthShield and the ledger.
//!
//! - [`ApiError`]: the one error response type; renders RFC 9457 problem+json with a
//!   stable `code` and the request id, and logs internal errors without showing them.
//! - [`ApiJson`], [`ApiQuery`], [`ApiForm`]: extractors whose rejections are 4xx
//!   problems (never a 500, never a plain-text body).
//! - [`Ctx`]: request id, client IP and user agent of the request, as the audit log
//!   records them.
//! - [`Principal`]: the caller, from a verified `Authorization: Bearer` access token.
//! - [`RateLimiter`]: GCRA limits with `RateLimit-*` and `Retry-After` headers.
#![deny(clippy::unwrap_used, clippy::expect_used)]

mod authn;
mod background;
mod error;
mod extract;
mod ratelimit;
mod step_up;

pub use authn::{bearer_token, Introspector, KeySource, MaybePrincipal, Principal, TokenVerifier};
pub use background::every;
pub use error::{current_request_id, ApiError, REQUEST_ID};
pub use extract::{
    client_ip, json_has_nul, limit_param, nul_refused, path_is_utf8, path_not_utf8, time_param,
    urlencoded_has_nul, ApiForm, ApiJson, ApiQuery, ClientIpConfig, Ctx, ForwardedHeader,
    OptionalJson,
};
pub use ratelimit::{enforce, MemoryRateLimiter, RateLimiter};
pub use step_up::{reauthentication_required, require_step_up, step_up_required};
