use crate::StoreError;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Executor};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// A write transaction on either backend.
pub type Tx = sqlx::Transaction<'static, Any>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Which service's schema a database holds. The two never share a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Auth,
    Ledger,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Auth => "auth",
            Service::Ledger => "ledger",
        }
    }

    /// Stable id of this service's advisory lock namespace on PostgreSQL.
    pub(crate) fn lock_base(self) -> i64 {
        match self {
            Service::Auth => 0x5641_5554_0000,
            Service::Ledger => 0x5641_4c44_0000,
        }
    }
}

/// Pool sizing.
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// SQLite `synchronous`: FULL fsyncs every commit (durable on power loss).
    pub sqlite_synchronous_full: bool,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
            sqlite_synchronous_full: true,
        }
    }
}

struct Inner {
    writer: AnyPool,
    reader: AnyPool,
    backend: Backend,
    service: Service,
    /// The last audit entry this process wrote (seq, hash): a hint, always re-checked.
    audit_head: parking_lot::Mutex<Option<(i64, String)>>,
}

/// A service's database: a write pool and a read pool (the same pool on PostgreSQL).
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Db({:?}, {:?})", self.inner.backend, self.inner.service)
    }
}

/// Turns a configured location into a connection URL: `postgres://…` and
/// `sqlite://…` pass through; anything else is a SQLite file path.
pub fn normalise_url(location: &str) -> Result<(Backend, String), StoreError> {
    if location.starts_with("postgres://") || location.starts_with("postgresql://") {
        return Ok((Backend::Postgres, location.to_owned()));
    }
    if let Some(rest) = location
        .strip_prefix("sqlite://")
        .or_else(|| location.strip_prefix("sqlite:"))
    {
        let sep = if rest.contains('?') { '&' } else { '?' };
        let url = if rest.contains("mode=") {
            format!("sqlite://{rest}")
        } else {
            format!("sqlite://{rest}{sep}mode=rwc")
        };
        return Ok((Backend::Sqlite, url));
    }
    if location.contains("://") {
        return Err(StoreError::BadUrl(redact_url(location)));
    }
    Ok((
        Backend::Sqlite,
        format!("sqlite://{}?mode=rwc", Path::new(location).display()),
    ))
}

/// The URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..s], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

impl Db {
    /// Connects and applies this service's migrations.
    pub async fn open(
        location: &str,
        service: Service,
        opts: &DbOptions,
    ) -> Result<Db, StoreError> {
        let db = Self::connect(location, service, opts).await?;
        db.migrate().await?;
        Ok(db)
    }

    /// Connects without migrating.
    pub async fn connect(
        location: &str,
        service: Service,
        opts: &DbOptions,
    ) -> Result<Db, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, url) = normalise_url(location)?;
        let inner = match backend {
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(opts.max_connections)
                    .acquire_timeout(opts.acquire_timeout)
                    .connect(&url)
                    .await?;
                Inner {
                    writer: pool.clone(),
                    reader: pool,
                    backend,
                    service,
                    audit_head: Default::default(),
                }
            }
            Backend::Sqlite => {
                let sync = if opts.sqlite_synchronous_full {
                    "FULL"
                } else {
                    "NORMAL"
                };
                let pragmas: Arc<str> = Arc::from(format!(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; \
                     PRAGMA busy_timeout = 10000; PRAGMA temp_store = MEMORY;"
                ));
                let p2 = pragmas.clone();
                // The single writer connection gets a larger page cache (64 MiB, grown
                // only as used): with the default 2 MiB, every group commit re-read the
                // index pages it updates through read(2).
                let pragmas: Arc<str> = Arc::from(format!("{pragmas} PRAGMA cache_size = -65536;"));
                let writer = AnyPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(opts.acquire_timeout.max(Duration::from_secs(30)))
                    .after_connect(move |conn, _| {
                        let p = pragmas.clone();
                        Box::pin(async move {
                            conn.execute(sqlx::raw_sql(&p)).await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?;
                let reader = AnyPoolOptions::new()
                    .max_connections(opts.max_connections.clamp(1, 8))
                    .acquire_timeout(opts.acquire_timeout)
                    .after_connect(move |conn, _| {
                        let p = p2.clone();
                        Box::pin(async move {
                            conn.execute(sqlx::raw_sql(&p)).await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?;
                Inner {
                    writer,
                    reader,
                    backend,
                    service,
                    audit_head: Default::default(),
                }
            }
        };
        Ok(Db {
            inner: Arc::new(inner),
        })
    }

    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    pub fn service(&self) -> Service {
        self.inner.service
    }

    /// The pool for reads outside a transaction.
    pub fn read(&self) -> &AnyPool {
        &self.inner.reader
    }

    /// The pool writes go through (one connection on SQLite).
    pub fn writer(&self) -> &AnyPool {
        &self.inner.writer
    }

    /// Starts a write transaction.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        let tx = match self.inner.backend {
            Backend::Sqlite => self.inner.writer.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.inner.writer.begin().await?,
        };
        Ok(tx)
    }

    /// Suffix that locks the selected rows until commit (`FOR UPDATE` on PostgreSQL;
    /// nothing on SQLite, where the write transaction already holds the database lock).
    pub fn for_update(&self) -> &'static str {
        match self.inner.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// Takes a transaction-scoped exclusive lock named by `key` within this service
    /// (a no-op on SQLite, where write transactions are already serialised).
    pub async fn lock(&self, tx: &mut Tx, key: i64) -> Result<(), StoreError> {
        if self.inner.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(self.inner.service.lock_base() + key)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    pub(crate) fn audit_head(&self) -> Option<(i64, String)> {
        self.inner.audit_head.lock().clone()
    }

    pub(crate) fn set_audit_head(&self, seq: i64, hash: String) {
        *self.inner.audit_head.lock() = Some((seq, hash));
    }

    /// Liveness of the database, for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: AnyRow = sqlx::query("SELECT 1")
            .fetch_one(&self.inner.reader)
            .await?;
        Ok(())
    }

    /// Closes both pools (flushing SQLite's WAL on the last connection).
    pub async fn close(&self) {
        self.inner.writer.close().await;
        self.inner.reader.close().await;
    }
}

impl FromStr for Backend {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        normalise_url(s).map(|(b, _)| b)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            normalise_url("data/auth.db").unwrap().1,
            "sqlite://data/auth.db?mode=rwc"
        );
        assert_eq!(
            normalise_url("sqlite::memory:").unwrap().1,
            "sqlite://:memory:?mode=rwc"
        );
        assert_eq!(
            normalise_url("postgres://u@h/db").unwrap().0,
            Backend::Postgres
        );
        assert!(normalise_url("mysql://x").is_err());
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
    }
}
