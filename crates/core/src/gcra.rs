//! Generic cell rate algorithm (GCRA) rate limiting.
//!
//! One stored number per key, the theoretical arrival time (TAT), makes a limiter that
//! allows `burst` requests at once and refills at `burst` per `period`. The decision is
//! a pure function so the in-memory limiter here and the Redis script elsewhere share
//! one definition.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

/// `burst` requests per `period_secs`, all of which may arrive at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Quota {
    pub burst: u32,
    pub period_secs: u32,
}

impl Quota {
    pub const fn new(burst: u32, period_secs: u32) -> Self {
        Self { burst, period_secs }
    }

    /// Microseconds between two conforming requests at the steady rate.
    pub fn emission_interval(&self) -> i64 {
        i64::from(self.period_secs) * 1_000_000 / i64::from(self.burst.max(1))
    }

    /// How far ahead of `now` the TAT may run: the burst size in time.
    pub fn tolerance(&self) -> i64 {
        self.emission_interval() * i64::from(self.burst.max(1))
    }
}

/// The outcome of one check, with what the `RateLimit-*` headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
    /// Seconds until a request would be allowed (0 when allowed).
    pub retry_after_secs: u64,
}

fn ceil_secs(micros: i64) -> u64 {
    u64::try_from((micros.max(0) + 999_999) / 1_000_000).unwrap_or(0)
}

/// Decides one request given the stored TAT; returns the TAT to store when allowed.
pub fn decide(stored_tat: Option<i64>, now: i64, quota: Quota) -> (Decision, Option<i64>) {
    let t = quota.emission_interval();
    let tau = quota.tolerance();
    let tat = stored_tat.unwrap_or(now).max(now);
    let new_tat = tat + t;
    let allow_at = new_tat - tau;
    if allow_at > now {
        let d = Decision {
            allowed: false,
            limit: quota.burst,
            remaining: 0,
            reset_secs: ceil_secs(tat - now),
            retry_after_secs: ceil_secs(allow_at - now).max(1),
        };
        return (d, None);
    }
    let remaining = u32::try_from((tau - (new_tat - now)) / t.max(1)).unwrap_or(0);
    let d = Decision {
        allowed: true,
        limit: quota.burst,
        remaining,
        reset_secs: ceil_secs(new_tat - now),
        retry_after_secs: 0,
    };
    (d, Some(new_tat))
}

const SHARDS: usize = 32;
const MAX_KEYS_PER_SHARD: usize = 50_000;

/// A process-local limiter over many keys, sharded to keep lock hold times tiny.
pub struct MemoryLimiter {
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<String, i64>>>,
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl MemoryLimiter {
    pub fn check(&self, key: &str, quota: Quota, now: i64) -> Decision {
        let idx = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut shard = self.shards[idx].lock();
        if shard.len() >= MAX_KEYS_PER_SHARD {
            // Expired entries carry no state: a TAT in the past equals no entry.
            shard.retain(|_, tat| *tat > now);
        }
        let (decision, new_tat) = decide(shard.get(key).copied(), now, quota);
        if let Some(tat) = new_tat {
            shard.insert(key.to_owned(), tat);
        }
        decision
    }

    /// Forgets a key (e.g. after a successful login resets the failure budget).
    pub fn reset(&self, key: &str) {
        let idx = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[idx].lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn allows_burst_then_refuses_then_refills() {
        let q = Quota::new(5, 60); // one every 12 s
        let lim = MemoryLimiter::default();
        let now = 1_000 * S;
        for i in 0..5 {
            let d = lim.check("k", q, now);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 4 - i);
        }
        let d = lim.check("k", q, now);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_secs, 12);
        assert!(!lim.check("k", q, now + 11 * S).allowed);
        assert!(lim.check("k", q, now + 12 * S).allowed);
        assert!(!lim.check("k", q, now + 12 * S).allowed);
        // other keys are independent
        assert!(lim.check("other", q, now).allowed);
        lim.reset("k");
        assert!(lim.check("k", q, now + 12 * S).allowed);
    }

    #[test]
    fn refused_requests_do_not_consume() {
        let q = Quota::new(1, 10);
        let (d, tat) = decide(None, 0, q);
        assert!(d.allowed);
        let tat = tat.unwrap_or_default();
        for _ in 0..100 {
            let (d, new) = decide(Some(tat), 5 * S, q);
            assert!(!d.allowed && new.is_none());
        }
        assert!(decide(Some(tat), 10 * S, q).0.allowed);
    }

    proptest::proptest! {
        #[test]
        fn never_more_than_burst_plus_rate(burst in 1u32..50, period in 1u32..600, gaps in proptest::collection::vec(0i64..5_000_000, 1..300)) {
            let q = Quota::new(burst, period);
            let mut tat = None;
            let mut now = 0i64;
            let mut allowed = 0u64;
            for g in gaps {
                now += g;
                let (d, new) = decide(tat, now, q);
                if d.allowed { allowed += 1; tat = new; }
            }
            let bound = u64::from(burst) + (now / q.emission_interval()) as u64;
            proptest::prop_assert!(allowed <= bound);
        }
    }
}
