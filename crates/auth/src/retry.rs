//! Background retries of an idempotent step that tells other nodes about a change
//! (a permission invalidation on the bus, dropping a user's shared trusted-network
//! set): one task per key however many changes fail meanwhile, with backoff, until
//! the step succeeds or what it protects would have lapsed anyway.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The wait before the first retry; each failure doubles it, up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(250);
const MAX_WAIT: Duration = Duration::from_secs(5);

/// Keys being retried, each with whether a change came since its current attempt
/// began (then the step runs once more after that attempt, even if it succeeds: the
/// attempt may have been sent before the change).
#[derive(Default, Clone)]
pub(crate) struct Retrier {
    pending: Arc<Mutex<HashMap<String, bool>>>,
}

impl Retrier {
    /// `step` has just failed for `key`: runs it again in the background (after
    /// 250 ms, then backing off to 5 s between attempts) until it succeeds with no
    /// change since that attempt began, or `for_at_most` has passed. When a task for
    /// `key` is already running, it is only told to run its step once more (so a
    /// key's step must not depend on which change failed: it tells the current state).
    pub(crate) fn retry<F, Fut, E>(
        &self,
        key: String,
        for_at_most: Duration,
        what: &'static str,
        step: F,
    ) where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send,
        E: std::fmt::Display,
    {
        {
            let mut pending = self.pending.lock();
            if let Some(changed) = pending.get_mut(&key) {
                *changed = true;
                return;
            }
            pending.insert(key.clone(), false);
        }
        let pending = self.pending.clone();
        let now = Instant::now();
        let give_up = now + for_at_most;
        let mut next = now + FIRST_WAIT;
        tokio::spawn(async move {
            let mut wait = FIRST_WAIT;
            loop {
                tokio::time::sleep_until(next.min(give_up)).await;
                if Instant::now() >= give_up {
                    break;
                }
                pending.lock().insert(key.clone(), false);
                match step().await {
                    Ok(()) => {
                        let mut p = pending.lock();
                        if p.get(&key) == Some(&false) {
                            p.remove(&key);
                            return;
                        }
                        // changed while this attempt ran: once more, at once
                        next = Instant::now();
                        wait = FIRST_WAIT;
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e, key = %key, "{what}: still failing"),
                }
                wait = (wait * 2).min(MAX_WAIT);
                next = Instant::now() + wait;
            }
            pending.lock().remove(&key);
            tracing::error!(key = %key, "{what}: gave up retrying");
        });
    }

    /// Whether a task for `key` is still running.
    #[cfg(test)]
    fn is_retrying(&self, key: &str) -> bool {
        self.pending.lock().contains_key(key)
    }

    /// How many tasks are running (one per key).
    #[cfg(test)]
    pub(crate) fn tasks(&self) -> usize {
        self.pending.lock().len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A step that fails its first `failures` calls, counting every call.
    fn flaky(
        failures: u32,
    ) -> (
        Arc<AtomicU32>,
        impl Fn() -> std::future::Ready<Result<(), String>> + Send + 'static,
    ) {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let step = move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            std::future::ready(if n < failures {
                Err(format!("down ({n})"))
            } else {
                Ok(())
            })
        };
        (calls, step)
    }

    /// Lets the spawned task run until it waits on (paused) time again.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_step_is_retried_with_backoff_until_it_succeeds() {
        let r = Retrier::default();
        let (calls, step) = flaky(3);
        r.retry("u1".into(), Duration::from_secs(600), "test", step);
        assert!(r.is_retrying("u1"));
        // attempts after 250 ms, then 500 ms and 1 s more (paused time: exact)
        for (after_ms, want) in [
            (249, 0),
            (1, 1),
            (499, 1),
            (1, 2),
            (999, 2),
            (1, 3),
            (1_999, 3),
            (1, 4),
        ] {
            tokio::time::advance(Duration::from_millis(after_ms)).await;
            settle().await;
            assert_eq!(calls.load(Ordering::SeqCst), want, "after +{after_ms} ms");
        }
        assert!(!r.is_retrying("u1"), "done once the step succeeded");
        tokio::time::advance(Duration::from_secs(60)).await;
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 4, "no attempt after success");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_of_a_key_being_retried_share_its_task_and_run_the_step_once_more() {
        let r = Retrier::default();
        let (calls, step) = flaky(1);
        r.retry("u1".into(), Duration::from_secs(600), "test", step);
        // two more failures meanwhile: no second task, the running one is told
        let (other_calls, other) = flaky(0);
        r.retry("u1".into(), Duration::from_secs(600), "test", other);
        let (more_calls, more) = flaky(0);
        r.retry("u1".into(), Duration::from_secs(600), "test", more);
        tokio::time::advance(Duration::from_millis(250)).await;
        settle().await;
        // the first attempt failed (call 0); the change is pending, not yet run
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_millis(500)).await;
        settle().await;
        // the next attempt succeeded; it began after both changes, so it covered
        // them, and the two later failures never started tasks of their own
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(other_calls.load(Ordering::SeqCst), 0);
        assert_eq!(more_calls.load(Ordering::SeqCst), 0);
        assert!(!r.is_retrying("u1"));
        // another key has a task of its own
        let (k2, step) = flaky(0);
        r.retry("u2".into(), Duration::from_secs(600), "test", step);
        tokio::time::advance(Duration::from_millis(250)).await;
        settle().await;
        assert_eq!(k2.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_during_an_attempt_runs_the_step_again_after_it() {
        let r = Retrier::default();
        let gate = Arc::new(tokio::sync::Notify::new());
        let calls = Arc::new(AtomicU32::new(0));
        let (g, c) = (gate.clone(), calls.clone());
        r.retry("u1".into(), Duration::from_secs(600), "test", move || {
            let (g, c) = (g.clone(), c.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                g.notified().await; // the attempt is in flight until released
                Ok::<(), String>(())
            }
        });
        tokio::time::advance(Duration::from_millis(250)).await;
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // a change fails while that attempt is in flight
        let (unused, step) = flaky(0);
        r.retry("u1".into(), Duration::from_secs(600), "test", step);
        gate.notify_one();
        settle().await;
        // the first attempt succeeded but began before the change: the step runs again
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(r.is_retrying("u1"));
        gate.notify_one();
        settle().await;
        assert!(!r.is_retrying("u1"));
        assert_eq!(unused.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn it_gives_up_when_what_it_protects_has_lapsed() {
        let r = Retrier::default();
        let (calls, step) = flaky(u32::MAX);
        r.retry("u1".into(), Duration::from_secs(60), "test", step);
        for _ in 0..610 {
            tokio::time::advance(Duration::from_millis(100)).await;
            settle().await;
        }
        assert!(!r.is_retrying("u1"));
        // at 0.25, 0.75, 1.75, 3.75 and 7.75 s, then every 5 s to 57.75 s
        let n = calls.load(Ordering::SeqCst);
        assert_eq!(n, 15, "{n} attempts");
        tokio::time::advance(Duration::from_secs(60)).await;
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), n);
    }
}
