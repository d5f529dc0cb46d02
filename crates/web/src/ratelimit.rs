use crate::error::ApiError;
use axum::http::{HeaderName, StatusCode};
use futures::future::BoxFuture;
use vaultpay_core::gcra::{Decision, MemoryLimiter, Quota};

/// A GCRA limiter over string keys (in memory, or shared through Redis).
pub trait RateLimiter: Send + Sync + 'static {
    fn check<'a>(&'a self, key: &'a str, quota: Quota) -> BoxFuture<'a, Result<Decision, String>>;
    fn reset<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), String>>;
}

/// Checks `key`; a refused request becomes a 429 problem with `Retry-After` and the
/// `RateLimit-*` headers. A limiter that cannot answer fails closed (503).
pub async fn enforce(
    limiter: &dyn RateLimiter,
    key: &str,
    quota: Quota,
) -> Result<Decision, ApiError> {
    let d = limiter
        .check(key, quota)
        .await
        .map_err(ApiError::unavailable)?;
    if d.allowed {
        return Ok(d);
    }
    metrics::counter!("rate_limited_total", "scope" => key.split(':').next().unwrap_or("").to_owned()).increment(1);
    Err(ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "Too many requests",
    )
    .detail(format!(
        "Too many requests; retry in {} seconds.",
        d.retry_after_secs
    ))
    .with("retry_after", d.retry_after_secs)
    .header(HeaderName::from_static("retry-after"), d.retry_after_secs)
    .header(HeaderName::from_static("ratelimit-limit"), d.limit)
    .header(HeaderName::from_static("ratelimit-remaining"), 0)
    .header(HeaderName::from_static("ratelimit-reset"), d.reset_secs))
}

/// The in-process limiter (embedded mode and single-node deployments). Its clock is
/// monotonic: a wall clock stepped back (NTP) would keep every recently active key
/// refused for as long as the step.
pub struct MemoryRateLimiter {
    limiter: MemoryLimiter,
    start: std::time::Instant,
}

impl Default for MemoryRateLimiter {
    fn default() -> Self {
        Self {
            limiter: MemoryLimiter::default(),
            start: std::time::Instant::now(),
        }
    }
}

impl MemoryRateLimiter {
    fn now(&self) -> i64 {
        i64::try_from(self.start.elapsed().as_micros()).unwrap_or(i64::MAX)
    }
}

impl RateLimiter for MemoryRateLimiter {
    fn check<'a>(&'a self, key: &'a str, quota: Quota) -> BoxFuture<'a, Result<Decision, String>> {
        let d = self.limiter.check(key, quota, self.now());
        Box::pin(async move { Ok(d) })
    }

    fn reset<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), String>> {
        self.limiter.reset(key);
        Box::pin(async { Ok(()) })
    }
}
