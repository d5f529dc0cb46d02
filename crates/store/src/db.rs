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

impl Backend {
    /// The verb of a multi-row insert whose failure the caller answers by rolling back
    /// its transaction or savepoint (every write path here does): `INSERT OR FAIL` on
    /// SQLite, plain `INSERT` on PostgreSQL. OR FAIL keeps the rows before a failing
    /// one instead of undoing the statement alone, so SQLite opens no statement journal
    /// for it (where the table's foreign keys are deferred, see the ledger's migration
    /// 0004): a multi-row INSERT otherwise copies every page it touches into the
    /// journal first, and frees it all at its end.
    pub fn insert_or_fail(self) -> &'static str {
        match self {
            Backend::Sqlite => "INSERT OR FAIL",
            Backend::Postgres => "INSERT",
        }
    }
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
    /// Shared with the handles [`Db::with_own_writer`] derives.
    audit_head: Arc<parking_lot::Mutex<Option<(i64, String)>>>,
    /// SQLite: stops the background checkpointer (see [`checkpointer`]).
    checkpointer: parking_lot::Mutex<Option<Checkpointer>>,
}

struct Checkpointer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// How often the background checkpointer runs on SQLite.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);
/// WAL bytes after which the writer checkpoints by itself, should the background
/// checkpointer fall behind (SQLite's default is 1,000 frames, 4 MiB of 4 KiB pages);
/// set in frames of the file's page size. Under the ledger's batch load, 32 MiB still
/// had the writer checkpointing inside its commits (1.4% of its thread in `perf`), and
/// three alternating rounds gave 3-15% fewer transfers/s (single and batch) than
/// 128 MiB (BENCHMARKS.md, 2026-12-07 afternoon). The cost is disk: the WAL file may grow to about this size, and
/// recovery after a crash reads it.
const WRITER_AUTOCHECKPOINT_BYTES: u32 = 128 << 20;

/// A pooled PostgreSQL connection idle for at least this long is pinged before use.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(10);

/// When a pool checks a connection before handing it out. sqlx's default pings every
/// connection on every acquire: one more round trip to the database (and, on SQLite,
/// two thread switches) in front of every query and transaction. Here a PostgreSQL
/// connection is pinged only after [`PING_IF_IDLE_FOR`] idle (a restarted server or a
/// dropped socket is found there, and a dead connection is replaced); one in steady use
/// that dies fails its query, and sqlx's ping on release then drops it. SQLite
/// connections live in this process and are never pinged.
fn acquire_policy(opts: AnyPoolOptions, backend: Backend) -> AnyPoolOptions {
    ping_if_idle(opts, backend, PING_IF_IDLE_FOR)
}

fn ping_if_idle(opts: AnyPoolOptions, backend: Backend, idle: Duration) -> AnyPoolOptions {
    let opts = opts.test_before_acquire(false);
    match backend {
        Backend::Sqlite => opts,
        Backend::Postgres => opts.before_acquire(move |conn, meta| {
            Box::pin(async move {
                if meta.idle_for < idle {
                    return Ok(true);
                }
                match sqlx::Connection::ping(conn).await {
                    Ok(()) => Ok(true),
                    Err(e) => {
                        tracing::info!(error = %e, "dropping a pooled connection that failed its ping");
                        Ok(false)
                    }
                }
            })
        }),
    }
}

/// Copies committed WAL frames into the database file from a connection of its own
/// (`PRAGMA wal_checkpoint(PASSIVE)`: never blocks the writer or readers), so that the
/// single writer connection does not do it inside its commits. With the default
/// auto-checkpoint, `perf` put the checkpoint (reading WAL frames, writing them to the
/// database file and fsyncing it) at 16% of the SQLite writer thread's time under batch
/// load. Durability is unchanged: every commit is still fsynced in the WAL
/// (`synchronous` applies to this connection's checkpoints as well). The writer keeps
/// an auto-checkpoint at [`WRITER_AUTOCHECKPOINT_BYTES`] as a backstop.
async fn checkpointer(
    url: String,
    pragmas: Arc<str>,
    owner: std::sync::Weak<Inner>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use sqlx::Connection;
    let mut conn = match sqlx::AnyConnection::connect(&url).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "sqlite checkpointer: could not connect; the writer checkpoints alone");
            return;
        }
    };
    if let Err(e) = conn.execute(sqlx::raw_sql(&pragmas)).await {
        tracing::warn!(error = %e, "sqlite checkpointer: pragmas failed; the writer checkpoints alone");
        return;
    }
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep(CHECKPOINT_EVERY) => {}
        }
        if *stop.borrow() || owner.strong_count() == 0 {
            break;
        }
        if let Err(e) = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").await {
            tracing::debug!(error = %e, "sqlite checkpointer: checkpoint failed");
        }
    }
    let _ = conn.close().await;
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

/// The file of a configured SQLite location (a path, `sqlite:PATH` or `sqlite://PATH`,
/// as [`normalise_url`] reads it, query string dropped); `None` for PostgreSQL,
/// in-memory databases and locations that are no database.
pub fn sqlite_file(location: &str) -> Option<std::path::PathBuf> {
    let (Backend::Sqlite, url) = normalise_url(location).ok()? else {
        return None;
    };
    let rest = url.strip_prefix("sqlite://").unwrap_or(&url);
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path == ":memory:" || url.contains("mode=memory") {
        return None;
    }
    Some(std::path::PathBuf::from(path))
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

/// A database location as messages and `config show` print it: a SQLite path as it is;
/// a URL as `scheme://user:**redacted**@host:port/database`, rebuilt from its parsed
/// parts (as sqlx reads it), its password and any query (which may hold one:
/// `?password=`, `sslpassword=`) redacted, a fragment dropped. A URL that does not
/// parse is redacted whole.
pub fn redact_url(location: &str) -> String {
    use vaultpay_core::secret::REDACTED;
    let Some((scheme, _)) = location.split_once(':') else {
        return location.to_owned(); // a path
    };
    let looks_like_scheme = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !looks_like_scheme {
        return location.to_owned(); // a path with a ':' in it
    }
    let Ok(u) = url::Url::parse(location) else {
        return REDACTED.to_owned();
    };
    let mut out = format!("{}://", u.scheme());
    if !u.username().is_empty() || u.password().is_some() {
        out.push_str(u.username());
        if u.password().is_some() {
            out.push(':');
            out.push_str(REDACTED);
        }
        out.push('@');
    }
    if let Some(host) = u.host_str() {
        out.push_str(host);
    }
    if let Some(port) = u.port() {
        out.push_str(&format!(":{port}"));
    }
    out.push_str(u.path());
    if u.query().is_some() {
        out.push('?');
        out.push_str(REDACTED);
    }
    out
}

/// Why the PostgreSQL server at `url` cannot be reached: one direct connection attempt
/// (bounded by `timeout`, at most 5 s), after a pool's attempts ran out of time without
/// saying. Still "pool timed out" when the attempt connects or times out too.
async fn why_unreachable(url: &str, timeout: Duration) -> StoreError {
    use sqlx::Connection;
    let attempt = sqlx::AnyConnection::connect(url);
    match tokio::time::timeout(timeout.min(Duration::from_secs(5)), attempt).await {
        Ok(Err(e)) => e.into(),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            sqlx::Error::PoolTimedOut.into()
        }
        Err(_) => sqlx::Error::PoolTimedOut.into(),
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
                let pool = match acquire_policy(AnyPoolOptions::new(), backend)
                    .max_connections(opts.max_connections)
                    .acquire_timeout(opts.acquire_timeout)
                    .connect(&url)
                    .await
                {
                    Ok(pool) => pool,
                    // The pool retried until its timeout and says only that: one
                    // direct attempt says why (connection refused, no route, ...).
                    Err(sqlx::Error::PoolTimedOut) => {
                        return Err(why_unreachable(&url, opts.acquire_timeout).await)
                    }
                    Err(e) => return Err(e.into()),
                };
                Inner {
                    writer: pool.clone(),
                    reader: pool,
                    backend,
                    service,
                    audit_head: Default::default(),
                    checkpointer: Default::default(),
                }
            }
            Backend::Sqlite => {
                let sync = if opts.sqlite_synchronous_full {
                    "FULL"
                } else {
                    "NORMAL"
                };
                // recursive_triggers: a REPLACE that deletes a row to make room fires its
                // DELETE triggers only with it, so without it `INSERT OR REPLACE` could
                // overwrite a row of the append-only audit log.
                let pragmas: Arc<str> = Arc::from(format!(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; \
                     PRAGMA busy_timeout = 10000; PRAGMA temp_store = MEMORY; PRAGMA recursive_triggers = ON;"
                ));
                let p2 = pragmas.clone();
                // The single writer connection gets a larger page cache (64 MiB, grown
                // only as used): with the default 2 MiB, every group commit re-read the
                // index pages it updates through read(2).
                let pragmas: Arc<str> = Arc::from(format!("{pragmas} PRAGMA cache_size = -65536;"));
                let p3 = p2.clone();
                let writer = acquire_policy(AnyPoolOptions::new(), backend)
                    .max_connections(1)
                    .acquire_timeout(opts.acquire_timeout.max(Duration::from_secs(30)))
                    .after_connect(move |conn, _| {
                        let p = pragmas.clone();
                        Box::pin(async move {
                            conn.execute(sqlx::raw_sql(&p)).await?;
                            // In frames of the file's page size (SQLite's default for a
                            // new file; an existing one keeps the size it was made with).
                            let page: i64 = sqlx::query_scalar("PRAGMA page_size")
                                .fetch_one(&mut *conn)
                                .await?;
                            let frames = i64::from(WRITER_AUTOCHECKPOINT_BYTES) / page.max(512);
                            conn.execute(sqlx::raw_sql(&format!(
                                "PRAGMA wal_autocheckpoint = {frames};"
                            )))
                            .await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?;
                let reader = acquire_policy(AnyPoolOptions::new(), backend)
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
                let inner = Arc::new(Inner {
                    writer,
                    reader,
                    backend,
                    service,
                    audit_head: Default::default(),
                    checkpointer: Default::default(),
                });
                // A private in-memory database has nothing to checkpoint (and another
                // connection would not see it).
                if !url.contains(":memory:") && !url.contains("mode=memory") {
                    let (stop, rx) = tokio::sync::watch::channel(false);
                    let task =
                        tokio::spawn(checkpointer(url.clone(), p3, Arc::downgrade(&inner), rx));
                    *inner.checkpointer.lock() = Some(Checkpointer { stop, task });
                }
                return Ok(Db { inner });
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

    /// Starts a write transaction holding the locks named by `exclusive` and (shared
    /// mode) by `shared`, taken in that order (see [`Db::lock`]). On PostgreSQL the
    /// `BEGIN` and the locks go out as one simple query: one round trip.
    pub async fn begin_locked(&self, exclusive: &[i64], shared: &[i64]) -> Result<Tx, StoreError> {
        match self.inner.backend {
            Backend::Sqlite => self.begin().await,
            Backend::Postgres => {
                use std::fmt::Write as _;
                let base = self.inner.service.lock_base();
                let mut sql = String::from("BEGIN;");
                for key in exclusive {
                    let _ = write!(sql, " SELECT pg_advisory_xact_lock({});", base + key);
                }
                for key in shared {
                    let _ = write!(sql, " SELECT pg_advisory_xact_lock_shared({});", base + key);
                }
                Ok(self.inner.writer.begin_with(sql).await?)
            }
        }
    }

    /// A handle to the same database whose writes go through a small pool of their own,
    /// created lazily by the runtime that first uses it (PostgreSQL; on SQLite, with its
    /// one writer connection, this same handle). A connection's socket is driven by the
    /// runtime it was opened on: the ledger's committer, which has a thread and a runtime
    /// of its own, would otherwise get each database reply only when the busy shared
    /// runtime next polls its IO driver (~0.5 ms per round trip under load, measured).
    /// Must be called inside the runtime that will use it. Close it with
    /// [`Db::close_writer`] (the reader and the rest stay the parent's).
    pub fn with_own_writer(&self, max_connections: u32) -> Db {
        if self.inner.backend == Backend::Sqlite {
            return self.clone();
        }
        let opts = self.inner.writer.options();
        // No ping before each acquire (a round trip per transaction): these connections
        // are in constant use, and a dead one fails its transaction, which the pool then
        // drops; the ledger answers such a failure as retryable, nothing committed.
        let writer = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(opts.get_acquire_timeout())
            .test_before_acquire(false)
            .connect_lazy_with((*self.inner.writer.connect_options()).clone());
        Db {
            inner: Arc::new(Inner {
                writer,
                reader: self.inner.reader.clone(),
                backend: self.inner.backend,
                service: self.inner.service,
                audit_head: self.inner.audit_head.clone(),
                checkpointer: Default::default(),
            }),
        }
    }

    /// Closes the write pool only (for a handle from [`Db::with_own_writer`]).
    pub async fn close_writer(&self) {
        if self.inner.backend == Backend::Postgres {
            self.inner.writer.close().await;
        }
    }

    /// ` FOR NO KEY UPDATE` on PostgreSQL (nothing on SQLite, whose write transactions
    /// do not overlap): the row lock an `UPDATE` of non-key columns takes. It orders
    /// transactions that lock or update the row, and unlike `FOR UPDATE` it does not
    /// block the `FOR KEY SHARE` lock a foreign-key check takes on the row when another
    /// table's row that references it is inserted (which, waited for by a transaction
    /// that holds a row the locker then needs, deadlocks).
    pub fn for_no_key_update(&self) -> &'static str {
        match self.inner.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR NO KEY UPDATE",
        }
    }

    /// Suffix that locks the selected rows until commit (`FOR UPDATE` on PostgreSQL;
    /// nothing on SQLite, where the write transaction already holds the database lock).
    pub fn for_update(&self) -> &'static str {
        match self.inner.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// See [`Backend::insert_or_fail`].
    pub fn insert_or_fail(&self) -> &'static str {
        self.inner.backend.insert_or_fail()
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

    /// Like [`Db::lock`] but does not wait: false when another transaction holds it
    /// (always true on SQLite).
    pub async fn try_lock(&self, tx: &mut Tx, key: i64) -> Result<bool, StoreError> {
        if self.inner.backend != Backend::Postgres {
            return Ok(true);
        }
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(self.inner.service.lock_base() + key)
            .fetch_one(&mut **tx)
            .await?;
        Ok(got)
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
        let checkpointer = self.inner.checkpointer.lock().take();
        if let Some(c) = checkpointer {
            let _ = c.stop.send(true);
            let _ = c.task.await;
        }
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
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_files_of_each_location_form() {
        let f = |l: &str| sqlite_file(l).map(|p| p.display().to_string());
        assert_eq!(f("data/auth.db").as_deref(), Some("data/auth.db"));
        assert_eq!(f("sqlite:/x/a.db").as_deref(), Some("/x/a.db"));
        assert_eq!(f("sqlite:///x/a.db?mode=rw").as_deref(), Some("/x/a.db"));
        assert_eq!(f("postgres://u@h/db"), None);
        assert_eq!(f("sqlite::memory:"), None);
        assert_eq!(f("mysql://h/db"), None);
    }

    /// The bundled SQLite is built with the options `.cargo/config.toml` sets (see its
    /// comments): a build that lost them (the file moved, the variable renamed by a
    /// libsqlite3-sys upgrade) would be correct but measurably slower.
    #[tokio::test]
    async fn sqlite_is_built_with_the_workspace_compile_options() {
        sqlx::any::install_default_drivers();
        let mut c = <sqlx::AnyConnection as sqlx::Connection>::connect("sqlite::memory:")
            .await
            .unwrap();
        let options: Vec<String> = sqlx::query_scalar("PRAGMA compile_options")
            .fetch_all(&mut c)
            .await
            .unwrap();
        // Cargo reads `.cargo/config.toml` only when run inside the checkout, and a
        // LIBSQLITE3_FLAGS in the environment replaces it: either builds a SQLite
        // that is correct but slower, which this test is here to notice.
        let why = "SQLite was built without the workspace's LIBSQLITE3_FLAGS \
                   (.cargo/config.toml): was cargo run from outside the checkout, or is \
                   LIBSQLITE3_FLAGS set in the environment?";
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "{why} {options:?}"
        );
        assert!(
            options.iter().any(|o| o == "DEFAULT_LOOKASIDE=200,6000"),
            "{why} {options:?}"
        );
        assert!(
            !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "{why} {options:?}"
        );
        // Still what libsqlite3-sys and this project rely on.
        assert!(options.iter().any(|o| o == "THREADSAFE=1"), "{options:?}");
    }

    /// A PostgreSQL connection that died (server restart, dropped socket) is replaced:
    /// after an idle spell before use (no failed query), and in steady use after at
    /// most one failed query per pooled connection.
    #[tokio::test]
    async fn killed_postgres_connections_are_replaced() {
        if !crate::testing::backends().contains(&Backend::Postgres) {
            return;
        }
        sqlx::any::install_default_drivers();
        let url = crate::testing::fresh_location(Backend::Postgres)
            .await
            .unwrap();
        let kill_others = || async {
            let mut c = <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
                .await
                .unwrap();
            sqlx::query(
                "SELECT CAST(COUNT(pg_terminate_backend(pid)) AS BIGINT) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .fetch_one(&mut c)
            .await
            .unwrap();
        };
        for (idle, allowed_failures) in [(Duration::ZERO, 0), (PING_IF_IDLE_FOR, 2)] {
            let pool = ping_if_idle(AnyPoolOptions::new(), Backend::Postgres, idle)
                .max_connections(2)
                .connect(&url)
                .await
                .unwrap();
            // two live connections in the pool
            let (a, b) = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
            drop((a, b));
            kill_others().await;
            let mut failures = 0;
            let mut streak = 0;
            for _ in 0..20 {
                match sqlx::query("SELECT 1").execute(&pool).await {
                    Ok(_) => streak += 1,
                    Err(_) => {
                        failures += 1;
                        streak = 0;
                    }
                }
                if streak == 5 {
                    break;
                }
            }
            assert_eq!(streak, 5, "the pool recovers (idle ping after {idle:?})");
            assert!(
                failures <= allowed_failures,
                "{failures} failed queries with a ping after {idle:?} idle"
            );
            pool.close().await;
        }
    }

    /// The background checkpointer copies committed WAL frames into the database file
    /// without the writer doing it, and `close` stops it.
    #[tokio::test]
    async fn sqlite_checkpointer_backfills_the_wal_and_stops_on_close() {
        let dir = std::env::temp_dir().join("vaultpay-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("ckpt_{}.db", uuid::Uuid::now_v7().simple()));
        let location = path.display().to_string();
        let db = Db::connect(&location, Service::Ledger, &DbOptions::default())
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (x TEXT)")
            .execute(db.writer())
            .await
            .unwrap();
        for i in 0..100 {
            sqlx::query("INSERT INTO t (x) VALUES ($1)")
                .bind(format!("{i:0>500}"))
                .execute(db.writer())
                .await
                .unwrap();
        }
        let db_file_len = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        // Far below the writer's own auto-checkpoint threshold: only the background
        // checkpointer moves these pages into the database file.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while db_file_len() < 8 * 4096 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            db_file_len() >= 8 * 4096,
            "WAL not checkpointed: db file {} bytes",
            db_file_len()
        );
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(db.read())
            .await
            .unwrap();
        assert_eq!(n, 100);
        let task = db
            .inner
            .checkpointer
            .lock()
            .as_ref()
            .map(|c| c.task.abort_handle());
        let task = task.expect("a file database gets a checkpointer");
        assert!(!task.is_finished());
        db.close().await;
        // close() waited for the task, which closed its connection before ending.
        assert!(task.is_finished());
        assert!(db.inner.checkpointer.lock().is_none());
        let _ = std::fs::remove_file(&path);
    }

    /// The writer's backstop checkpoint is the same number of bytes whatever the
    /// file's page size (SQLite counts it in pages).
    #[tokio::test]
    async fn the_writers_checkpoint_threshold_is_counted_in_the_files_pages() {
        let dir = std::env::temp_dir().join("vaultpay-tests");
        std::fs::create_dir_all(&dir).unwrap();
        for page in [None, Some(8192_i64), Some(1024)] {
            let path = dir.join(format!("pages_{}.db", uuid::Uuid::now_v7().simple()));
            let location = path.display().to_string();
            if let Some(page) = page {
                // A file made elsewhere with another page size.
                use sqlx::Connection;
                let mut c =
                    sqlx::SqliteConnection::connect(&format!("sqlite://{location}?mode=rwc"))
                        .await
                        .unwrap();
                sqlx::raw_sql(&format!(
                    "PRAGMA page_size = {page}; CREATE TABLE t (x TEXT);"
                ))
                .execute(&mut c)
                .await
                .unwrap();
                c.close().await.unwrap();
            }
            let db = Db::connect(&location, Service::Ledger, &DbOptions::default())
                .await
                .unwrap();
            let q = |sql: &'static str| {
                let db = db.clone();
                async move {
                    sqlx::query_scalar::<_, i64>(sql)
                        .fetch_one(db.writer())
                        .await
                        .unwrap()
                }
            };
            let size = q("PRAGMA page_size").await;
            assert_eq!(size, page.unwrap_or(4096));
            assert_eq!(
                q("PRAGMA wal_autocheckpoint").await,
                i64::from(WRITER_AUTOCHECKPOINT_BYTES) / size
            );
            db.close().await;
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{location}{suffix}"));
            }
        }
    }

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
            "postgres://u:**redacted**@h/db"
        );
    }

    /// A PostgreSQL server that refuses the connection is named as such, not as a pool
    /// that timed out.
    #[tokio::test]
    async fn an_unreachable_postgres_says_why() {
        // a port nothing listens on
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let opts = DbOptions {
            acquire_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let Err(e) = Db::connect(
            &format!("postgres://u@127.0.0.1:{port}/db"),
            Service::Auth,
            &opts,
        )
        .await
        else {
            panic!("connected to a closed port");
        };
        let text = e.to_string();
        assert!(text.to_lowercase().contains("refused"), "{text}");
        assert!(e.is_unreachable(), "{text}");
    }

    #[test]
    fn database_urls_are_printed_without_their_secrets() {
        for (url, shown) in [
            (
                "postgres://vp:hunter2@db.internal:5432/vaultpay_auth",
                "postgres://vp:**redacted**@db.internal:5432/vaultpay_auth",
            ),
            (
                "postgresql://postgres@127.0.0.1:5432/auth",
                "postgresql://postgres@127.0.0.1:5432/auth",
            ),
            (
                "postgres://h/db?user=vp&password=hunter2",
                "postgres://h/db?**redacted**",
            ),
            // a query password with an '@' (or ':') after a user without one
            (
                "postgres://vp@db/vaultpay?password=hunter2@x",
                "postgres://vp@db/vaultpay?**redacted**",
            ),
            (
                "postgres://vp@db/v?password=hunter2:x@y",
                "postgres://vp@db/v?**redacted**",
            ),
            // read as sqlx reads it: the host ends at the first '/'
            (
                "postgres://vp:hunter2@n/t?e:r2@h/db",
                "postgres://vp:**redacted**@n/t?**redacted**",
            ),
            (
                "postgres://vp:hu%40nter2@h/db#hunter2",
                "postgres://vp:**redacted**@h/db",
            ),
            ("postgres://[::1]:5432/db", "postgres://[::1]:5432/db"),
            (
                "sqlite:///var/lib/vp/auth.db",
                "sqlite:///var/lib/vp/auth.db",
            ),
            ("/var/lib/vp/auth.db", "/var/lib/vp/auth.db"),
            ("data/auth.db", "data/auth.db"),
            // what does not parse (nor would for sqlx) is redacted whole
            ("postgres://vp:hunter2@h:port/db", "**redacted**"),
            (
                "postgres://u:hunter2@/db?host=/var/run/postgresql",
                "**redacted**",
            ),
            ("postgre://h:99999/db?password=hunter2", "**redacted**"),
        ] {
            let got = redact_url(url);
            assert!(
                !got.contains("hunter2") && !got.contains("e:r2"),
                "{url}: {got}"
            );
            assert_eq!(got, shown, "{url}");
        }
    }
}
