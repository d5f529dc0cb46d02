//! Periodic background work shared by the services.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;

/// Runs `step` every `every` (the first time at once) until `shutdown` turns true;
/// a failed step is logged and the next one runs on time. `step` returns how much it
/// did, logged at debug level when not zero.
pub fn every<F, Fut, E>(
    name: &'static str,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut step: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<u64, E>> + Send,
    E: Display,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                _ = tick.tick() => {}
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() { break; }
                    continue;
                }
            }
            match step().await {
                Ok(n) if n > 0 => tracing::debug!(task = name, n, "background step"),
                Ok(_) => {}
                Err(e) => tracing::warn!(task = name, error = %e, "background step failed"),
            }
        }
        tracing::debug!(task = name, "stopped");
    })
}
