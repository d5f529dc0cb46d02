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

    /// Refuses a quota that would limit nothing or everything: no burst, no period, or
    /// a rate so high that the emission interval rounds to zero (every request allowed).
    pub fn validate(&self) -> Result<(), String> {
        if self.burst == 0 || self.period_secs == 0 {
            return Err("burst and period_secs must be at least 1".into());
        }
        if self.emission_interval() < 1 {
            return Err("burst may be at most 1,000,000 per second of period_secs".into());
        }
        Ok(())
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
/// A shard is swept when it has grown to this many keys (and then at twice what the
/// sweep left), so a sweep's cost is spread over the inserts since the last one.
const FIRST_SWEEP: usize = 1024;

/// One shard's keys (each with its TAT and its quota's tolerance) and the size at
/// which it is next swept.
#[derive(Default)]
struct Shard {
    tats: HashMap<String, (i64, i64)>,
    sweep_at: usize,
}

impl Shard {
    /// Drops the keys whose TAT has passed (a TAT in the past equals no entry). If the
    /// shard is still near its cap (more live keys than it holds: someone spraying
    /// addresses or emails), it also drops the keys with the least of their quota's
    /// budget spent, down to three quarters of the cap: those are the ones closest to
    /// a full budget anyway, so the memory stays bounded at the cost of a little budget
    /// for the least limited keys. Measured against each key's own quota: a spent
    /// login budget (60 s) outlives one request under a 10-minute registration quota.
    fn sweep(&mut self, now: i64, max: usize) {
        self.tats.retain(|_, (tat, _)| *tat > now);
        if self.tats.len() >= max - max / 10 {
            let spent = |tat: i64, tau: i64| (tat - now) as f64 / tau.max(1) as f64;
            let excess = self.tats.len() - (max - max / 4);
            let mut ranks: Vec<f64> = self.tats.values().map(|&(t, tau)| spent(t, tau)).collect();
            let (_, cutoff, _) = ranks.select_nth_unstable_by(excess, f64::total_cmp);
            let cutoff = *cutoff;
            self.tats.retain(|_, &mut (t, tau)| spent(t, tau) > cutoff);
        }
        self.sweep_at = (self.tats.len() * 2).clamp(FIRST_SWEEP.min(max), max);
    }
}

/// A process-local limiter over many keys, sharded to keep lock hold times tiny. At
/// most `MAX_KEYS_PER_SHARD` keys per shard (1.6 million in all, ~100 MB at most).
pub struct MemoryLimiter {
    hasher: RandomState,
    shards: Vec<Mutex<Shard>>,
    max_per_shard: usize,
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        Self::with_max_keys(MAX_KEYS_PER_SHARD)
    }
}

impl MemoryLimiter {
    fn with_max_keys(max_per_shard: usize) -> Self {
        let max_per_shard = max_per_shard.max(8);
        Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        tats: HashMap::new(),
                        sweep_at: FIRST_SWEEP.min(max_per_shard),
                    })
                })
                .collect(),
            max_per_shard,
        }
    }

    pub fn check(&self, key: &str, quota: Quota, now: i64) -> Decision {
        let idx = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut shard = self.shards[idx].lock();
        let stored = shard.tats.get(key).map(|&(tat, _)| tat);
        let (decision, new_tat) = decide(stored, now, quota);
        if let Some(tat) = new_tat {
            if stored.is_none() && shard.tats.len() >= shard.sweep_at {
                shard.sweep(now, self.max_per_shard);
            }
            shard.tats.insert(key.to_owned(), (tat, quota.tolerance()));
        }
        decision
    }

    /// Forgets a key (e.g. after a successful login resets the failure budget).
    pub fn reset(&self, key: &str) {
        let idx = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[idx].lock().tats.remove(key);
    }

    /// Keys held, over all shards.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().tats.len()).sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    fn a_spray_of_live_keys_stays_within_the_cap_and_keeps_the_most_limited() {
        let lim = MemoryLimiter::with_max_keys(200);
        let q = Quota::new(5, 60);
        let now = 1_000 * S;
        // A key with its whole budget spent: the one an attacker would like dropped.
        for _ in 0..5 {
            assert!(lim.check("victim", q, now).allowed);
        }
        assert!(!lim.check("victim", q, now).allowed);
        // 100,000 distinct live keys (one request each), far beyond 32 × 200.
        for i in 0..100_000 {
            assert!(lim.check(&format!("spray-{i}"), q, now + i).allowed);
        }
        assert!(lim.len() <= SHARDS * 200, "{} keys", lim.len());
        // The spent key outlived the spray: its TAT is the furthest ahead.
        assert!(!lim.check("victim", q, now + 100_000).allowed);
    }

    #[test]
    fn a_spent_short_budget_outlives_single_hits_on_long_quotas() {
        let lim = MemoryLimiter::with_max_keys(200);
        let login = Quota::new(10, 60); // spent: TAT 60 s ahead, all of its budget
        let register = Quota::new(5, 600); // one hit: TAT 120 s ahead, a fifth of it
        let now = 1_000 * S;
        for _ in 0..10 {
            assert!(lim.check("login:victim", login, now).allowed);
        }
        for i in 0..50_000 {
            assert!(lim.check(&format!("register:{i}"), register, now).allowed);
        }
        assert!(lim.len() <= SHARDS * 200, "{} keys", lim.len());
        assert!(!lim.check("login:victim", login, now).allowed);
    }

    #[test]
    fn expired_keys_are_swept_without_losing_live_ones() {
        let lim = MemoryLimiter::with_max_keys(50_000);
        let q = Quota::new(1, 1);
        for i in 0..20_000 {
            lim.check(&format!("old-{i}"), q, 0);
        }
        let later = 10 * S;
        for i in 0..20_000 {
            lim.check(&format!("new-{i}"), q, later);
        }
        // Every old key expired at 1 s; the sweeps on the way dropped them.
        assert!(lim.len() < 40_000, "{} keys", lim.len());
        assert!(!lim.check("new-7", q, later).allowed);
    }

    #[test]
    fn quotas_that_limit_nothing_are_refused() {
        assert!(Quota::new(10, 60).validate().is_ok());
        assert!(Quota::new(1_000_000, 1).validate().is_ok());
        for q in [
            Quota::new(0, 60),
            Quota::new(5, 0),
            Quota::new(2_000_000, 1),
        ] {
            assert!(q.validate().is_err(), "{q:?}");
        }
        // What such a quota did: an interval of 0 allowed every request.
        let q = Quota::new(2_000_000, 1);
        let mut tat = None;
        for _ in 0..10_000 {
            let (d, new) = decide(tat, 0, q);
            assert!(d.allowed);
            tat = new;
        }
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
