//! Overlapping the committer's CPU work with the database's.
//!
//! A group's statements run one after another on one connection, and between them the
//! committer thread builds the next one (binding thousands of parameters) and renders
//! replies (serialising and compressing a batch's ~400 KB answer). Done in turn, the two
//! add up: under batch load on SQLite, `perf` put the writer thread at 57% of the
//! wall time and the committer at 28%, each mostly waiting for the other. A statement
//! is handed to the database by its future's first poll (to SQLite's worker thread
//! through a channel, to PostgreSQL's socket), so the committer can do its next piece
//! of work while the database executes the statement, and only then wait for it. (On
//! PostgreSQL a statement not yet prepared on the connection takes a Parse round trip
//! first, so there the overlap starts later; the results are the same either way.)

use crate::error::LedgerError;
use crate::ops::AnyQuery;
use std::future::Future;
use std::task::Poll;
use vaultpay_store::Tx;

/// Executes `q` in `tx` and, while the database works on it, runs `work` on this
/// thread. The statement's error, if any, wins over `work`'s result.
pub(crate) async fn execute_while<'q, T>(
    tx: &mut Tx,
    q: AnyQuery<'q>,
    work: impl FnOnce() -> T,
) -> Result<T, LedgerError> {
    let mut exec = std::pin::pin!(q.execute(&mut **tx));
    // One poll hands the statement over (or finishes it).
    let first = std::future::poll_fn(|cx| Poll::Ready(exec.as_mut().poll(cx))).await;
    let out = work();
    match first {
        Poll::Ready(r) => r?,
        Poll::Pending => exec.await?,
    };
    Ok(out)
}

/// A statement to build when its turn comes (its parameters bound from rows the
/// caller holds).
pub(crate) type Build<'q> = Box<dyn FnOnce() -> AnyQuery<'q> + Send + 'q>;

/// Runs `statements` in order in `tx`, building each while the one before it
/// executes; `extra` runs beside the first (or alone when there is none). Stops at
/// the first error, as sequential execution would.
pub(crate) async fn run_pipelined<'q, T>(
    tx: &mut Tx,
    statements: Vec<Build<'q>>,
    extra: impl FnOnce() -> T,
) -> Result<T, LedgerError> {
    let mut builds = statements.into_iter();
    let Some(first) = builds.next() else {
        return Ok(extra());
    };
    let second = builds.next();
    let (out, mut next) = execute_while(tx, first(), || (extra(), second.map(|b| b()))).await?;
    while let Some(q) = next.take() {
        let following = builds.next();
        next = execute_while(tx, q, || following.map(|b| b())).await?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vaultpay_store::{testing, Service};

    /// Statements run in order, each built once, at most one ahead of the one running;
    /// `extra` runs once; the first failing statement stops the rest. Both backends.
    #[tokio::test]
    async fn statements_run_in_order_and_stop_at_the_first_error() {
        for backend in testing::backends() {
            let db = testing::fresh_db(Service::Ledger, backend).await.unwrap();
            sqlx::query("CREATE TABLE pipe (n BIGINT NOT NULL PRIMARY KEY)")
                .execute(db.writer())
                .await
                .unwrap();
            let built = AtomicUsize::new(0);
            let insert = |n: i64| -> Build<'_> {
                let built = &built;
                Box::new(move || {
                    built.fetch_add(1, Ordering::Relaxed);
                    sqlx::query("INSERT INTO pipe (n) VALUES ($1)").bind(n)
                })
            };
            let mut tx = db.begin().await.unwrap();
            let statements: Vec<Build<'_>> = (1..=5).map(insert).collect();
            let extra = run_pipelined(&mut tx, statements, || "rendered")
                .await
                .unwrap();
            assert_eq!(extra, "rendered");
            assert_eq!(built.load(Ordering::Relaxed), 5);
            // 2 again violates the key. 7 is built while 2 runs (building binds
            // parameters, nothing more), but neither it nor 8 runs, and 8 is not built.
            let statements: Vec<Build<'_>> = [2, 7, 8].into_iter().map(insert).collect();
            let mut extras = 0;
            let failed = run_pipelined(&mut tx, statements, || extras += 1).await;
            assert!(failed.is_err());
            assert_eq!(extras, 1);
            assert_eq!(built.load(Ordering::Relaxed), 7, "2 and 7 built, 8 not");
            tx.rollback().await.unwrap();
            let mut tx = db.begin().await.unwrap();
            let none = run_pipelined(&mut tx, Vec::new(), || 42).await.unwrap();
            assert_eq!(none, 42);
            run_pipelined(&mut tx, (1..=3).map(insert).collect(), || ())
                .await
                .unwrap();
            tx.commit().await.unwrap();
            let rows: Vec<i64> = sqlx::query_scalar("SELECT n FROM pipe ORDER BY n")
                .fetch_all(db.read())
                .await
                .unwrap();
            assert_eq!(rows, vec![1, 2, 3]);
        }
    }
}
