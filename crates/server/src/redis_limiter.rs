//! Rate limits shared by every replica, kept in Redis (cargo feature `redis`).
//!
//! The same GCRA as `vaultpay_core::gcra`, run atomically in a Lua script against the
//! Redis server's clock, so replicas with skewed clocks still agree.

use crate::redis_conn::SharedConn;
use futures::future::BoxFuture;
use redis::Script;
use vaultpay_core::gcra::{Decision, Quota};

const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, new_tat - now, 0}
"#;

pub struct RedisRateLimiter {
    conn: SharedConn,
    script: Script,
    prefix: String,
}

impl RedisRateLimiter {
    /// A limiter on the Redis at `url` (see [`crate::redis_conn::client`]).
    pub fn new(url: &str) -> anyhow::Result<Self> {
        Self::with_ca(url, None)
    }

    /// As [`Self::new`], trusting the PEM authorities in `ca` for `rediss://`.
    pub fn with_ca(url: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Self> {
        Ok(Self {
            conn: SharedConn::new(crate::redis_conn::client(url, ca)?),
            script: Script::new(GCRA),
            prefix: "vaultpay:rl:".into(),
        })
    }

    /// Keys under a different prefix (tests use one per run).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

fn secs_ceil(micros: i64) -> u64 {
    u64::try_from((micros.max(0) + 999_999) / 1_000_000).unwrap_or(0)
}

impl vaultpay_web::RateLimiter for RedisRateLimiter {
    fn check<'a>(&'a self, key: &'a str, quota: Quota) -> BoxFuture<'a, Result<Decision, String>> {
        Box::pin(async move {
            // Fail fast: a limiter that cannot answer makes the request fail closed (503).
            let mut conn = self.conn.get().await?;
            let t = quota.emission_interval();
            let tau = quota.tolerance();
            let r = self
                .script
                .key(format!("{}{key}", self.prefix))
                .arg(t)
                .arg(tau)
                .invoke_async(&mut conn.manager)
                .await;
            let (allowed, ahead, retry): (i64, i64, i64) = self.conn.done(&conn, r)?;
            let remaining = if allowed == 1 {
                u32::try_from((tau - ahead) / t.max(1)).unwrap_or(0)
            } else {
                0
            };
            Ok(Decision {
                allowed: allowed == 1,
                limit: quota.burst,
                remaining,
                reset_secs: secs_ceil(ahead),
                retry_after_secs: if allowed == 1 {
                    0
                } else {
                    secs_ceil(retry).max(1)
                },
            })
        })
    }

    fn reset<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self.conn.get().await?;
            let r = redis::cmd("DEL")
                .arg(format!("{}{key}", self.prefix))
                .query_async::<()>(&mut conn.manager)
                .await;
            self.conn.done(&conn, r)
        })
    }
}
