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

/// A location (file path or URL) for a new, empty database of `backend`.
pub async fn fresh_location(backend: Backend) -> Result<String, StoreError> {
    let name = format!("vp_test_{}", uuid::Uuid::now_v7().simple());
    match backend {
        Backend::Sqlite => {
            let dir = std::env::temp_dir().join("vaultpay-tests");
            std::fs::create_dir_all(&dir).map_err(|e| StoreError::Audit(e.to_string()))?;
            Ok(dir.join(format!("{name}.db")).display().to_string())
        }
        Backend::Postgres => {
            let admin = std::env::var(PG_URL_VAR)
                .map_err(|_| StoreError::BadUrl(format!("{PG_URL_VAR} not set")))?;
            sqlx::any::install_default_drivers();
            let mut conn = sqlx::AnyConnection::connect(&admin).await?;
            sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await?;
            conn.close().await?;
            let base = match admin.rfind('/') {
                Some(i) if admin[..i].contains("://") && i > admin.find("://").unwrap_or(0) + 2 => {
                    &admin[..i]
                }
                _ => admin.as_str(),
            };
            let query = admin.find('?').map(|q| &admin[q..]).unwrap_or("");
            Ok(format!("{base}/{name}{query}"))
        }
    }
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
