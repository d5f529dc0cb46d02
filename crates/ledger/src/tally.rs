//! Counters of committed work (transfers posted, transfers refused), recorded when the
//! transaction that did the work commits rather than when its statement runs. A group
//! whose commit is refused reruns its jobs one by one, and a job rolled back to its
//! savepoint posted nothing: counting at the statement counted those twice, or at all.

use metrics::SharedString;
use std::cell::RefCell;
use std::future::Future;

type Entry = (&'static str, &'static str, SharedString, u64);

/// Counts gathered inside [`collect`], not yet recorded.
#[derive(Default)]
#[must_use = "a tally is recorded by `flush` (after its commit) or `keep`"]
pub(crate) struct Tally(Vec<Entry>);

tokio::task_local! {
    static CURRENT: RefCell<Tally>;
}

/// Adds `n` to the counter `name` with one label: at once outside [`collect`], else
/// when the enclosing tally is flushed.
pub(crate) fn count(name: &'static str, key: &'static str, value: impl Into<SharedString>, n: u64) {
    let mut entry = Some((name, key, value.into(), n));
    let _ = CURRENT.try_with(|t| {
        if let Some(e) = entry.take() {
            t.borrow_mut().0.push(e);
        }
    });
    if let Some(e) = entry {
        record(e);
    }
}

fn record((name, key, value, n): Entry) {
    metrics::counter!(name, key => value).increment(n);
}

/// Runs `f`, gathering the counts it makes (its nested `collect`s gather their own).
pub(crate) async fn collect<F: Future>(f: F) -> (F::Output, Tally) {
    CURRENT
        .scope(RefCell::new(Tally::default()), async {
            let out = f.await;
            (out, CURRENT.with(|t| t.take()))
        })
        .await
}

impl Tally {
    /// Records the counts: their transaction committed.
    pub(crate) fn flush(self) {
        self.0.into_iter().for_each(record);
    }

    /// Hands the counts to the enclosing [`collect`] (a job's work kept inside its
    /// group's transaction), or records them outside one.
    pub(crate) fn keep(self) {
        let mut entries = Some(self.0);
        let _ = CURRENT.try_with(|t| {
            if let Some(e) = entries.take() {
                t.borrow_mut().0.extend(e);
            }
        });
        entries.into_iter().flatten().for_each(record);
    }

    #[cfg(test)]
    fn total(&self) -> u64 {
        self.0.iter().map(|e| e.3).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_wait_for_their_transaction_and_a_discarded_one_leaves_none() {
        let ((), outer) = collect(async {
            count("c", "k", "a", 1);
            // a job kept in the group
            let ((), kept) = collect(async { count("c", "k", "b", 2) }).await;
            kept.keep();
            // a job rolled back to its savepoint
            let ((), dropped) = collect(async { count("c", "k", "c", 4) }).await;
            drop(dropped);
        })
        .await;
        assert_eq!(outer.total(), 3);
        outer.flush();
    }
}
