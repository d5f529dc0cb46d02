//! A small embedded migrator: one folder of SQL files per service and backend,
//! applied in order, each in its own transaction, recorded in `schema_migrations`.
//! On PostgreSQL an advisory lock keeps replicas starting together from racing.
//!
//! A SQLite migration that rebuilds a table other tables' foreign keys point at starts
//! with [`FOREIGN_KEYS_OFF`]: it runs with enforcement off (SQLite's procedure for
//! such changes; the pragma has no effect inside a transaction, so it is set before
//! it, on a connection closed afterwards), and must leave `PRAGMA foreign_key_check`
//! empty, or nothing of it commits.

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
    migration!(7, "auth", "0007_grants_by_user"),
    migration!(8, "auth", "0008_es256_rotation"),
    migration!(9, "auth", "0009_sessions_by_provider"),
    migration!(10, "auth", "0010_oauth_expiry_indexes"),
    migration!(11, "auth", "0011_oauth_fresh_login"),
    migration!(12, "auth", "0012_support_role_description"),
    migration!(13, "auth", "0013_keys_sign_from"),
];
const LEDGER: &[Migration] = &[
    migration!(1, "ledger", "0001_init"),
    migration!(2, "ledger", "0002_drop_unused_indexes"),
    migration!(3, "ledger", "0003_audit_filter_indexes"),
    migration!(4, "ledger", "0004_deferred_foreign_keys"),
    migration!(5, "ledger", "0005_drop_idempotency_key_index"),
    migration!(6, "ledger", "0006_postings_keyed_by_account"),
    migration!(7, "ledger", "0007_idempotency_body_lz4"),
    migration!(8, "ledger", "0008_posting_times_by_sequence"),
    migration!(9, "ledger", "0009_idempotency_body_compressed"),
    migration!(10, "ledger", "0010_failed_transfers_by_user"),
    migration!(11, "ledger", "0011_ledger_history_guarded"),
    migration!(12, "ledger", "0012_pending_holds_by_batch"),
    migration!(13, "ledger", "0013_hold_expiry_fixed"),
    migration!(14, "ledger", "0014_failed_transfers_hold_id"),
];

const LOCK_MIGRATIONS: i64 = 1;

impl Migration {
    fn failed(&self, source: sqlx::Error) -> StoreError {
        StoreError::Migration {
            version: self.version,
            name: self.name,
            source,
        }
    }

    /// Records this migration as applied, in the transaction that applied it.
    async fn record<'c>(
        &self,
        conn: &mut sqlx::Transaction<'c, sqlx::Any>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
        )
        .bind(self.version)
        .bind(self.name)
        .bind(vaultpay_core::time::now_micros())
        .execute(&mut **conn)
        .await?;
        Ok(())
    }
}

/// First line of a SQLite migration that runs with foreign-key enforcement off.
pub const FOREIGN_KEYS_OFF: &str = "-- vaultpay: foreign_keys=off";

impl Db {
    /// Applies every migration of this service not yet applied. Returns how many ran.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        let list = match self.service() {
            Service::Auth => AUTH,
            Service::Ledger => LEDGER,
        };
        // Under the migrations lock: two PostgreSQL servers starting together would
        // otherwise race to create the table (`CREATE TABLE IF NOT EXISTS` is not safe
        // against a concurrent one: the loser fails on `pg_type`'s unique index).
        let mut tx = self.begin().await?;
        self.lock(&mut tx, LOCK_MIGRATIONS).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
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
            if self.backend() == Backend::Sqlite && sql.starts_with(FOREIGN_KEYS_OFF) {
                // Only read so far; the migration gets a transaction of its own.
                tx.rollback().await?;
                if self.apply_without_foreign_keys(m).await? {
                    applied += 1;
                }
                continue;
            }
            sqlx::raw_sql(sql)
                .execute(&mut *tx)
                .await
                .map_err(|source| m.failed(source))?;
            m.record(&mut tx).await?;
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

    /// Applies a SQLite migration marked [`FOREIGN_KEYS_OFF`] on the writer connection:
    /// enforcement off, the migration and its `schema_migrations` row in one
    /// transaction that commits only if `PRAGMA foreign_key_check` finds nothing. The
    /// connection is then closed, never returned to the pool with enforcement off (the
    /// pool opens a fresh one). Returns whether it applied the migration (false:
    /// another process had, since `migrate` looked).
    async fn apply_without_foreign_keys(&self, m: &Migration) -> Result<bool, StoreError> {
        use sqlx::Connection;
        let mut conn = self.writer().acquire().await?;
        // Closed, never returned to the pool: a panic or a dropped future before
        // enforcement is back on must not leave the only writer connection without
        // foreign keys.
        conn.close_on_drop();
        sqlx::raw_sql("PRAGMA foreign_keys = OFF")
            .execute(&mut *conn)
            .await?;
        let applied = async {
            // The write lock first, then the version again: another process migrating
            // the same file may have applied it since `migrate` looked.
            let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
            let done = sqlx::query("SELECT COUNT(*) FROM schema_migrations WHERE version = $1")
                .bind(m.version)
                .fetch_one(&mut *tx)
                .await?
                .try_get::<i64, _>(0)?;
            if done > 0 {
                return Ok(false);
            }
            sqlx::raw_sql(m.sqlite)
                .execute(&mut *tx)
                .await
                .map_err(|source| m.failed(source))?;
            let broken = sqlx::query("PRAGMA foreign_key_check")
                .fetch_all(&mut *tx)
                .await?;
            if let Some(first) = broken.first() {
                let table: String = first.try_get(0)?;
                return Err(m.failed(sqlx::Error::Protocol(format!(
                    "{} rows break foreign keys afterwards (first in {table})",
                    broken.len()
                ))));
            }
            m.record(&mut tx).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(true)
        }
        .await;
        // Closed either way; the pool opens a fresh one with the usual pragmas,
        // enforcement on.
        let _ = conn.close().await;
        let applied = applied?;
        if applied {
            tracing::info!(
                service = self.service().name(),
                version = m.version,
                name = m.name,
                "migration applied (foreign keys off)"
            );
        }
        Ok(applied)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::DbOptions;

    /// The sweeps every OAuth authorization or device request runs (expired codes,
    /// device codes, revoked-token ids) search by index, not scan their tables.
    #[tokio::test]
    async fn oauth_expiry_sweeps_use_their_indexes() {
        let db = crate::testing::fresh_db(Service::Auth, Backend::Sqlite)
            .await
            .unwrap();
        for table in ["oauth_codes", "oauth_device_codes", "oauth_revoked_tokens"] {
            let plan: Vec<String> = sqlx::query(&format!(
                "EXPLAIN QUERY PLAN DELETE FROM {table} WHERE expires_at < 1"
            ))
            .fetch_all(db.read())
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>("detail"))
            .collect();
            let want = format!("INDEX {table}_expiry");
            assert!(plan.iter().any(|d| d.contains(&want)), "{table}: {plan:?}");
        }
    }

    async fn sqlite_ledger() -> Db {
        let loc = crate::testing::fresh_location(Backend::Sqlite)
            .await
            .unwrap();
        Db::connect(&loc, Service::Ledger, &DbOptions::default())
            .await
            .unwrap()
    }

    async fn count(db: &Db, sql: &str) -> i64 {
        sqlx::query(sql)
            .fetch_one(db.writer())
            .await
            .unwrap()
            .try_get(0)
            .unwrap()
    }

    /// The first column of every row of `sql`, as text.
    async fn strings(db: &Db, sql: &str) -> Vec<String> {
        sqlx::query(sql)
            .fetch_all(db.writer())
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get(0).unwrap())
            .collect()
    }

    async fn foreign_keys_on(db: &Db) -> bool {
        count(db, "PRAGMA foreign_keys").await == 1
    }

    /// Migration 0004 rebuilds SQLite's transfers and postings with deferred foreign
    /// keys: rows written at version 3 survive with their indexes, enforcement is on
    /// again afterwards, and an orphan posting is refused when its transaction commits.
    #[tokio::test]
    async fn ledger_foreign_keys_become_deferred_and_rows_survive() {
        let db = sqlite_ledger().await;
        sqlx::query(
            "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(db.writer())
        .await
        .unwrap();
        for m in &LEDGER[..3] {
            sqlx::raw_sql(m.sqlite).execute(db.writer()).await.unwrap();
            sqlx::query("INSERT INTO schema_migrations VALUES ($1, $2, 0)")
                .bind(m.version)
                .bind(m.name)
                .execute(db.writer())
                .await
                .unwrap();
        }
        sqlx::raw_sql(
            "INSERT INTO accounts (id, number, owner_id, kind, name, currency, status, balance, posting_seq, created_at, updated_at) VALUES \
             ('a1', 'n1', 'u', 'current', 'A', 'USD', 'active', -500, 1, 1, 9), \
             ('a2', 'n2', 'u', 'current', 'B', 'USD', 'active', 500, 1, 1, 9); \
             INSERT INTO transfers (id, kind, from_account_id, to_account_id, amount, currency, description, status, initiated_by, created_at, updated_at) \
             VALUES ('t1', 'transfer', 'a1', 'a2', 500, 'USD', 'rent', 'posted', 'u', 1, 1); \
             INSERT INTO postings (id, transfer_id, account_id, account_seq, amount, currency, balance_after, created_at) VALUES \
             ('p1', 't1', 'a1', 1, -500, 'USD', -500, 5), ('p2', 't1', 'a2', 1, 500, 'USD', 500, 6);",
        )
        .execute(db.writer())
        .await
        .unwrap();

        assert_eq!(db.migrate().await.unwrap(), LEDGER.len() - 3);
        assert!(foreign_keys_on(&db).await, "enforcement is back on");
        assert_eq!(
            count(&db, "SELECT COUNT(*) FROM transfers WHERE id = 't1' AND amount = 500 AND description = 'rent'").await,
            1
        );
        assert_eq!(
            count(
                &db,
                "SELECT COALESCE(SUM(amount), 99) FROM postings WHERE transfer_id = 't1'"
            )
            .await,
            0
        );
        assert_eq!(count(&db, "SELECT COUNT(*) FROM postings").await, 2);
        for (table, index) in [
            ("transfers", "transfers_pending"),
            ("postings", "sqlite_autoindex_postings_1"),
        ] {
            let sql: String = sqlx::query("SELECT sql FROM sqlite_schema WHERE name = $1")
                .bind(table)
                .fetch_one(db.writer())
                .await
                .unwrap()
                .try_get(0)
                .unwrap();
            assert_eq!(
                sql.matches("DEFERRABLE INITIALLY DEFERRED").count(),
                2,
                "{sql}"
            );
            assert_eq!(
                count(&db, &format!("SELECT COUNT(*) FROM sqlite_schema WHERE type = 'index' AND name = '{index}'")).await,
                1
            );
        }
        // 0008: the time index is gone, and each account's last posting time is kept.
        assert_eq!(
            count(
                &db,
                "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'postings_account_time'"
            )
            .await,
            0
        );
        assert_eq!(
            count(
                &db,
                "SELECT COUNT(*) FROM accounts WHERE (id, last_posted_at) IN (VALUES ('a1', 5), ('a2', 6))"
            )
            .await,
            2
        );
        // (account_id, account_seq) is still unique.
        let dup = sqlx::query(
            "INSERT INTO postings (id, transfer_id, account_id, account_seq, amount, currency, balance_after, created_at) \
             VALUES ('p3', 't1', 'a1', 1, 1, 'USD', 1, 1)",
        )
        .execute(db.writer())
        .await;
        assert!(dup.is_err(), "duplicate account_seq accepted");
        // Since 0006 that pair is the primary key, and `id` has no index of its own.
        let pk = strings(
            &db,
            "SELECT i.name FROM pragma_index_list('postings') l, pragma_index_info(l.name) i \
             WHERE l.origin = 'pk' ORDER BY i.seqno",
        )
        .await;
        assert_eq!(pk, ["account_id", "account_seq"]);
        assert_eq!(
            count(
                &db,
                "SELECT COUNT(*) FROM pragma_index_list('postings') l, pragma_index_info(l.name) i WHERE i.name = 'id'"
            )
            .await,
            0
        );

        // Deferred, still enforced: the statement passes, the COMMIT is refused.
        let mut tx = db.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO postings (id, transfer_id, account_id, account_seq, amount, currency, balance_after, created_at) \
             VALUES ('p4', 'no-such-transfer', 'a1', 2, 1, 'USD', 1, 1)",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        let refused = tx.commit().await.unwrap_err();
        assert!(
            matches!(&refused, sqlx::Error::Database(d) if d.kind() == sqlx::error::ErrorKind::ForeignKeyViolation),
            "{refused:?}"
        );
        assert_eq!(
            count(&db, "SELECT COUNT(*) FROM postings WHERE id = 'p4'").await,
            0
        );
    }

    /// On PostgreSQL, 0006 makes (account_id, account_seq) the postings' primary key
    /// (`id` keeps no index) and 0007 compresses stored responses with lz4 when the
    /// server has it (this machine's does: a table with an lz4 column can be created).
    #[tokio::test]
    async fn postgres_postings_key_and_lz4_bodies() {
        if !crate::testing::backends().contains(&Backend::Postgres) {
            return;
        }
        let db = crate::testing::fresh_db(Service::Ledger, Backend::Postgres)
            .await
            .unwrap();
        let pk = strings(
            &db,
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
             WHERE i.indrelid = 'postings'::regclass AND i.indisprimary ORDER BY a.attnum",
        )
        .await;
        assert_eq!(pk, ["account_id", "account_seq"]);
        assert_eq!(
            count(
                &db,
                "SELECT COUNT(*) FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid \
                 AND a.attnum = ANY (i.indkey) WHERE i.indrelid = 'postings'::regclass AND a.attname = 'id'"
            )
            .await,
            0
        );
        let mut probe = db.begin().await.unwrap();
        let lz4 = sqlx::raw_sql("CREATE TEMP TABLE lz4_probe (t TEXT COMPRESSION lz4)")
            .execute(&mut *probe)
            .await
            .is_ok();
        drop(probe); // rolled back: no temp table left on a pooled connection
        let method: String = sqlx::query(
            "SELECT attcompression::text FROM pg_attribute \
             WHERE attrelid = 'idempotency_keys'::regclass AND attname = 'body'",
        )
        .fetch_one(db.writer())
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
        assert_eq!(method, if lz4 { "l" } else { "" });
    }

    /// A foreign-keys-off migration that leaves a broken reference commits nothing,
    /// and the writer connection has enforcement on afterwards.
    #[tokio::test]
    async fn a_migration_that_breaks_a_foreign_key_commits_nothing() {
        let db = sqlite_ledger().await;
        db.migrate().await.unwrap();
        let bad = Migration {
            version: 999,
            name: "9999_orphan",
            sqlite: "-- vaultpay: foreign_keys=off\n\
                     CREATE TABLE scratch (x INTEGER);\n\
                     INSERT INTO transfers (id, kind, from_account_id, to_account_id, amount, currency, description, status, initiated_by, created_at, updated_at) \
                     VALUES ('t-orphan', 'transfer', 'nobody', 'nobody-else', 1, 'USD', '', 'posted', 'u', 1, 1);",
            postgres: "",
        };
        let err = db.apply_without_foreign_keys(&bad).await.unwrap_err();
        assert!(err.to_string().contains("break foreign keys"), "{err}");
        assert_eq!(count(&db, "SELECT COUNT(*) FROM transfers").await, 0);
        assert_eq!(
            count(
                &db,
                "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'scratch'"
            )
            .await,
            0
        );
        assert_eq!(
            count(
                &db,
                "SELECT COUNT(*) FROM schema_migrations WHERE version = 999"
            )
            .await,
            0
        );
        assert!(foreign_keys_on(&db).await);
    }
}
