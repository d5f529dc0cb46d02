//! Fresh databases for tests: a new SQLite file, or a new PostgreSQL database on the
//! server named by `VAULTPAY_TEST_PG_URL` (for example
//! `postgres://postgres@127.0.0.1:5432/postgres`). When that variable is set, the
//! PostgreSQL tests run and fail loudly if the server is unreachable; when it is not
//! set they are skipped with a notice (CI always sets it).

use crate::{Backend, Db, DbOptions, Service, StoreError};
use sqlx::Connection;

/// The environment variable naming the PostgreSQL server tests use.
pub const PG_URL_VAR: &str = "VAULTPAY_TEST_PG_URL";

/// The backends to run storage tests on.
pub fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::Sqlite];
    if std::env::var(PG_URL_VAR).is_ok_and(|u| !u.is_empty()) {
        v.push(Backend::Postgres);
    } else {
        eprintln!(
            "note: {PG_URL_VAR} is not set; PostgreSQL variants of storage tests are skipped"
        );
    }
    v
}

/// Test databases and files older than this (20 minutes) are removed by the next test
/// process (a whole test run or benchmark takes a few minutes), so repeated runs on one
/// machine neither fill its disk nor leave PostgreSQL's autovacuum hundreds of
/// databases to visit.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(1_200);

/// The creation time (Unix ms) in a `vp_test_<uuid v7, 32 hex>` name.
fn created_ms(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("vp_test_")?;
    if hex.len() != 32 {
        return None;
    }
    u64::from_str_radix(hex.get(..12)?, 16).ok()
}

/// Once per process: drops the PostgreSQL test databases, and deletes the test
/// files and directories under the temp dir, that earlier runs left [`STALE_AFTER`] ago.
async fn sweep_stale(backend: Backend, admin: Option<&str>) {
    static FILES: std::sync::Once = std::sync::Once::new();
    static PG: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    FILES.call_once(|| {
        let dir = std::env::temp_dir().join("vaultpay-tests");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_AFTER);
            if old {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    });
    let (Backend::Postgres, Some(admin)) = (backend, admin) else {
        return;
    };
    PG.get_or_init(|| async {
        let Ok(mut conn) = sqlx::AnyConnection::connect(admin).await else {
            return;
        };
        let names: Vec<String> =
            sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'vp_test_%'")
                .fetch_all(&mut conn)
                .await
                .unwrap_or_default();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let cutoff = now_ms.saturating_sub(STALE_AFTER.as_millis() as u64);
        for name in names {
            // only names this module made (vp_test_ + 32 hex digits), so the
            // interpolation below cannot carry anything else
            if created_ms(&name).is_some_and(|t| t < cutoff) {
                let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        }
        let _ = conn.close().await;
    })
    .await;
}

/// A location (file path or URL) for a new, empty database of `backend`.
pub async fn fresh_location(backend: Backend) -> Result<String, StoreError> {
    let name = format!("vp_test_{}", uuid::Uuid::now_v7().simple());
    // Before the sweep: it connects too, and may be this process's first connection.
    sqlx::any::install_default_drivers();
    sweep_stale(backend, std::env::var(PG_URL_VAR).ok().as_deref()).await;
    match backend {
        Backend::Sqlite => {
            let dir = std::env::temp_dir().join("vaultpay-tests");
            std::fs::create_dir_all(&dir).map_err(|e| StoreError::Audit(e.to_string()))?;
            Ok(dir.join(format!("{name}.db")).display().to_string())
        }
        Backend::Postgres => {
            let admin = std::env::var(PG_URL_VAR)
                .map_err(|_| StoreError::BadUrl(format!("{PG_URL_VAR} not set")))?;
            let mut conn = sqlx::AnyConnection::connect(&admin).await?;
            sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await?;
            conn.close().await?;
            Ok(with_database(&admin, &name))
        }
    }
}

/// `url` (a PostgreSQL URL) naming database `name` instead of its own, with its
/// query kept: `postgres://u@h:5432/postgres?sslmode=disable` and a Unix socket's
/// `postgres://u@localhost/postgres?host=/var/run/postgresql` (whose query holds a `/`).
fn with_database(url: &str, name: &str) -> String {
    let (path, query) = url.split_at(url.find('?').unwrap_or(url.len()));
    let authority = path.find("://").map_or(0, |i| i + 3);
    let base = match path[authority..].find('/') {
        Some(i) => &path[..authority + i],
        None => path,
    };
    format!("{base}/{name}{query}")
}

/// The error of a transaction that lost a race, from `backend` itself: on SQLite a
/// second writer refused at once (`SQLITE_BUSY`, no busy timeout), on PostgreSQL the
/// victim of a real deadlock between two transactions (`40P01`).
pub async fn lost_race(backend: Backend) -> Result<sqlx::Error, StoreError> {
    let loc = fresh_location(backend).await?;
    let (_, url) = crate::db::normalise_url(&loc)?;
    let mut a = sqlx::AnyConnection::connect(&url).await?;
    let mut b = sqlx::AnyConnection::connect(&url).await?;
    sqlx::raw_sql("CREATE TABLE race (id INTEGER PRIMARY KEY, n INTEGER NOT NULL); INSERT INTO race VALUES (1, 0), (2, 0)")
        .execute(&mut a)
        .await?;
    if backend == Backend::Sqlite {
        sqlx::raw_sql("PRAGMA busy_timeout = 0; BEGIN IMMEDIATE")
            .execute(&mut a)
            .await?;
        let err = sqlx::raw_sql("PRAGMA busy_timeout = 0; BEGIN IMMEDIATE")
            .execute(&mut b)
            .await
            .err()
            .ok_or_else(|| StoreError::Audit("the second writer was not refused".into()))?;
        return Ok(err);
    }
    // Each holds one row, then asks for the other's: PostgreSQL aborts one of them.
    sqlx::raw_sql("BEGIN; UPDATE race SET n = 1 WHERE id = 1")
        .execute(&mut a)
        .await?;
    sqlx::raw_sql("BEGIN; UPDATE race SET n = 1 WHERE id = 2")
        .execute(&mut b)
        .await?;
    let (ra, rb) = tokio::join!(
        sqlx::raw_sql("UPDATE race SET n = 2 WHERE id = 2").execute(&mut a),
        sqlx::raw_sql("UPDATE race SET n = 2 WHERE id = 1").execute(&mut b),
    );
    ra.err()
        .or(rb.err())
        .ok_or_else(|| StoreError::Audit("no deadlock".into()))
}

/// A new, migrated database for `service` on `backend`.
pub async fn fresh_db(service: Service, backend: Backend) -> Result<Db, StoreError> {
    let loc = fresh_location(backend).await?;
    let opts = DbOptions {
        max_connections: 8,
        sqlite_synchronous_full: false,
        ..DbOptions::default()
    };
    Db::open(&loc, service, &opts).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{created_ms, with_database};

    #[test]
    fn a_test_database_url_keeps_host_port_and_query() {
        let f = |u: &str| with_database(u, "vp_test_x");
        assert_eq!(
            f("postgres://postgres@127.0.0.1:5432/postgres"),
            "postgres://postgres@127.0.0.1:5432/vp_test_x"
        );
        assert_eq!(
            f("postgres://u:p@h/db?sslmode=disable"),
            "postgres://u:p@h/vp_test_x?sslmode=disable"
        );
        assert_eq!(
            f("postgres://postgres@localhost/postgres?host=/var/run/postgresql"),
            "postgres://postgres@localhost/vp_test_x?host=/var/run/postgresql"
        );
        assert_eq!(f("postgres://h:5432"), "postgres://h:5432/vp_test_x");
        assert_eq!(
            f("postgresql://h?host=/tmp"),
            "postgresql://h/vp_test_x?host=/tmp"
        );
    }

    #[test]
    fn creation_time_comes_from_the_uuid_v7_name() {
        let id = uuid::Uuid::now_v7();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let t = created_ms(&format!("vp_test_{}", id.simple())).unwrap();
        assert!(now_ms.abs_diff(t) < 5_000, "{t} vs {now_ms}");
        assert_eq!(created_ms("vp_test_short"), None);
        assert_eq!(created_ms("other_0123456789abcdef0123456789abcdef"), None);
        assert_eq!(created_ms(&format!("vp_test_{}", "z".repeat(32))), None);
    }
}
