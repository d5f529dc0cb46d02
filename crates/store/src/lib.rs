//! Database access for both backends.
//!
//! One `Db` type serves SQLite (embedded mode) and PostgreSQL (production) through
//! sqlx's `Any` driver, so each query is written once: placeholders are `$1…`, integer
//! columns are 64-bit, times are microseconds, ids are text. Where the dialects differ
//! (row locks, the audit chain lock) `Db` says what to use.
//!
//! Writes on SQLite go through a single connection that opens `BEGIN IMMEDIATE`
//! transactions: writers queue in the pool instead of failing with `SQLITE_BUSY`, and
//! every write transaction sees the latest committed state. Reads use their own pool
//! (WAL lets them run beside the writer).
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod audit;
mod db;
mod migrate;
pub mod params;
pub mod testing;

pub use db::{redact_url, sqlite_file, Backend, Db, DbOptions, Service, Tx};
pub use sqlx;

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("unsupported database url (expected sqlite:// or postgres://): {0}")]
    BadUrl(String),
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        version: i64,
        name: &'static str,
        source: sqlx::Error,
    },
    #[error("database schema is at version {found}, newer than this binary knows ({known})")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("audit log: {0}")]
    Audit(String),
}

impl StoreError {
    /// True when the error is a unique-constraint violation.
    pub fn is_unique_violation(&self) -> bool {
        is_unique_violation(self.sqlx())
    }

    /// True when the transaction lost a race with another one and may simply be run
    /// again (see [`is_transient`]).
    pub fn is_transient(&self) -> bool {
        is_transient(self.sqlx())
    }

    /// True when the database could not be reached (connection, pool, I/O), not that
    /// a statement was refused. On PostgreSQL that includes what the server says as it
    /// drops or refuses a connection: a connection exception (SQLSTATE `08000`-`08006`), a
    /// shutdown or restart (`57P01`, `57P02`, `57P03`: an administrator's
    /// `pg_terminate_backend`, a failover), no connection slots left (`53300`).
    pub fn is_unreachable(&self) -> bool {
        use sqlx::Error as E;
        match self.sqlx() {
            Some(
                E::Io(_)
                | E::Tls(_)
                | E::Protocol(_)
                | E::PoolTimedOut
                | E::PoolClosed
                | E::WorkerCrashed,
            ) => true,
            // connection exceptions, not `08P01` (protocol_violation), which is what a
            // malformed message (a client's bug) gets
            Some(E::Database(d)) => d.code().is_some_and(|c| {
                matches!(
                    &*c,
                    "08000"
                        | "08001"
                        | "08003"
                        | "08004"
                        | "08006"
                        | "57P01"
                        | "57P02"
                        | "57P03"
                        | "53300"
                )
            }),
            _ => false,
        }
    }

    fn sqlx(&self) -> Option<&sqlx::Error> {
        match self {
            StoreError::Sqlx(e) => Some(e),
            _ => None,
        }
    }
}

/// True when `e` means the transaction lost a race with a concurrent one and was
/// rolled back, so that running it again may succeed: a PostgreSQL deadlock (`40P01`)
/// or serialization failure (`40001`), or SQLite still busy after its busy timeout
/// (`SQLITE_BUSY` and its extended codes, as sqlx reports them: decimal extended
/// result codes). `SQLITE_LOCKED` is not: it is a conflict within one connection, a
/// bug a retry does not cure. Answered `503` with `Retry-After`, not `500`.
pub fn is_transient(e: Option<&sqlx::Error>) -> bool {
    let Some(sqlx::Error::Database(d)) = e else {
        return false;
    };
    matches!(
        d.code().as_deref(),
        Some("40P01" | "40001" | "5" | "261" | "517" | "773")
    )
}

/// True when `e` is a unique-constraint violation on either backend.
pub fn is_unique_violation(e: Option<&sqlx::Error>) -> bool {
    matches!(e, Some(sqlx::Error::Database(d)) if d.is_unique_violation())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A PostgreSQL connection the server ends (an administrator's
    /// `pg_terminate_backend`, as in a restart or failover) fails its next statement
    /// with an error that counts as unreachable (answered 503, retryable), not as a
    /// refused statement (500).
    #[tokio::test]
    async fn a_connection_the_server_ended_is_unreachable() {
        if !testing::backends().contains(&Backend::Postgres) {
            return;
        }
        let db = testing::fresh_db(Service::Auth, Backend::Postgres)
            .await
            .unwrap();
        let mut tx = db.begin().await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(db.read())
            .await
            .unwrap();
        assert!(ended);
        let e = sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap_err();
        assert!(StoreError::Sqlx(e).is_unreachable());
        // a statement the database refuses is not
        let refused = sqlx::query("SELECT * FROM no_such_table")
            .execute(db.read())
            .await
            .unwrap_err();
        assert!(!StoreError::Sqlx(refused).is_unreachable());
    }

    /// A real lost race on each backend is transient; a unique violation is not.
    #[tokio::test]
    async fn lost_races_are_transient_and_unique_violations_are_not() {
        for backend in testing::backends() {
            let e = testing::lost_race(backend).await.unwrap();
            assert!(is_transient(Some(&e)), "{backend:?}: {e}");
            assert!(StoreError::Sqlx(e).is_transient());
            let db = testing::fresh_db(Service::Auth, backend).await.unwrap();
            let insert =
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (1, 'again', 0)";
            let dup = sqlx::query(insert).execute(db.writer()).await.unwrap_err();
            assert!(is_unique_violation(Some(&dup)), "{dup}");
            assert!(!is_transient(Some(&dup)), "{backend:?}: {dup}");
        }
    }
}
