//! A small embedded migrator: one folder of SQL files per service and backend,
//! applied in order, each in its own transaction, recorded in `schema_migrations`.
//! On PostgreSQL an advisory lock keeps replicas starting together from racing.

use crate::{Backend, Db, Service, StoreError};
use sqlx::Row;

struct Migration {
    version: i64,
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

macro_rules! migration {
    ($version:literal, $service:literal, $file:literal) => {
        Migration {
            version: $version,
            name: $file,
            sqlite: include_str!(concat!(
                "../migrations/",
                $service,
                "/sqlite/",
                $file,
                ".sql"
            )),
            postgres: include_str!(concat!(
                "../migrations/",
                $service,
                "/postgres/",
                $file,
                ".sql"
            )),
        }
    };
}

const AUTH: &[Migration] = &[
    migration!(1, "auth", "0001_init"),
    migration!(2, "auth", "0002_mfa"),
    migration!(3, "auth", "0003_iptrust"),
    migration!(4, "auth", "0004_oauth"),
    migration!(5, "auth", "0005_email_change"),
    migration!(6, "auth", "0006_oauth_acr"),
];
const LEDGER: &[Migration] = &[
    migration!(1, "ledger", "0001_init"),
    migration!(2, "ledger", "0002_drop_unused_indexes"),
    migration!(3, "ledger", "0003_audit_filter_indexes"),
];

const LOCK_MIGRATIONS: i64 = 1;

impl Db {
    /// Applies every migration of this service not yet applied. Returns how many ran.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        let list = match self.service() {
            Service::Auth => AUTH,
            Service::Ledger => LEDGER,
        };
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(self.writer())
        .await?;
        let known = list.last().map(|m| m.version).unwrap_or(0);
        let mut applied = 0;
        for m in list {
            let mut tx = self.begin().await?;
            self.lock(&mut tx, LOCK_MIGRATIONS).await?;
            // Set-based: a version missing below the newest applied one (branches
            // merged in another order) is still applied.
            let rows = sqlx::query("SELECT version FROM schema_migrations")
                .fetch_all(&mut *tx)
                .await?;
            let mut done = std::collections::HashSet::with_capacity(rows.len());
            for r in &rows {
                done.insert(r.try_get::<i64, _>("version")?);
            }
            if let Some(&current) = done.iter().filter(|v| **v > known).max() {
                return Err(StoreError::SchemaTooNew {
                    found: current,
                    known,
                });
            }
            if done.contains(&m.version) {
                continue;
            }
            let sql = match self.backend() {
                Backend::Sqlite => m.sqlite,
                Backend::Postgres => m.postgres,
            };
            sqlx::raw_sql(sql)
                .execute(&mut *tx)
                .await
                .map_err(|source| StoreError::Migration {
                    version: m.version,
                    name: m.name,
                    source,
                })?;
            sqlx::query(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(m.version)
            .bind(m.name)
            .bind(vaultpay_core::time::now_micros())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(
                service = self.service().name(),
                version = m.version,
                name = m.name,
                "migration applied"
            );
            applied += 1;
        }
        Ok(applied)
    }
}
