//! Building and running the server in one of its modes.

use crate::config::Config;
use crate::{docs, middleware, remote, telemetry};
use anyhow::{bail, Context};
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_http::catch_panic::CatchPanicLayer;
use vaultpay_auth::{AuthService, Bootstrap};
use vaultpay_core::crypto::MasterKey;
use vaultpay_core::jwt::{KeySet, Rules};
use vaultpay_ledger::Ledger;
use vaultpay_store::{Db, DbOptions, Service};
use vaultpay_web::{ApiError, Introspector, RateLimiter, TokenVerifier};

/// Which services this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// AuthShield and the ledger in one process (the embedded default).
    All,
    Auth,
    Ledger,
}

impl Mode {
    fn auth(self) -> bool {
        matches!(self, Mode::All | Mode::Auth)
    }
    fn ledger(self) -> bool {
        matches!(self, Mode::All | Mode::Ledger)
    }
}

/// A started server.
pub struct Running {
    pub addr: SocketAddr,
    pub auth: Option<AuthService>,
    pub ledger: Option<Ledger>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    background: Vec<JoinHandle<()>>,
    dbs: Vec<Db>,
    /// The locks on this server's SQLite databases ([`lock_sqlite_databases`]), held
    /// until everything above has stopped.
    _locks: Vec<std::fs::File>,
}

impl Running {
    /// Stops accepting, finishes in-flight requests, stops background work.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.finish().await
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        shutdown_signal().await;
        tracing::info!("shutdown signal received; finishing in-flight requests");
        self.stop().await
    }

    async fn finish(self) -> anyhow::Result<()> {
        let res = self.server.await;
        for b in self.background {
            let _ = tokio::time::timeout(Duration::from_secs(5), b).await;
        }
        for db in &self.dbs {
            db.close().await;
        }
        res.context("server task")?.context("server")?;
        Ok(())
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Creates the data directory (0700 on unix).
pub fn ensure_data_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    Ok(())
}

/// Where the master key file is: `master_key_file`, or `<data_dir>/master.key`.
fn master_key_path(cfg: &Config) -> std::path::PathBuf {
    cfg.master_key_file
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("master.key"))
}

/// Refuses to start AuthShield on `db` with a master key about to be generated when
/// `db` already holds secrets sealed with one (signing keys): the key file is missing
/// (a partial restore, a moved data directory), and a new key would leave those
/// secrets unreadable and the keyed email index unable to find existing accounts.
pub(crate) async fn refuse_new_key_for_sealed_data(cfg: &Config, db: &Db) -> anyhow::Result<()> {
    let path = master_key_path(cfg);
    if cfg.master_key.is_some() || path.exists() {
        return Ok(());
    }
    if vaultpay_auth::keys::any(db)
        .await
        .context("reading AuthShield's signing keys")?
    {
        bail!(
            "no master key at {}, but AuthShield's database already holds secrets sealed with \
             one: restore master.key from the backup of this data directory (or set \
             VAULTPAY_MASTER_KEY); a new key would make them unreadable",
            path.display()
        );
    }
    Ok(())
}

/// The master-key refusals that need no database, made before any is opened (and
/// migrated): a key given that is no key, or none where none may be generated.
fn refuse_unusable_master_key(cfg: &Config) -> anyhow::Result<()> {
    match &cfg.master_key {
        Some(k) => MasterKey::parse(k.expose()).context("master_key").map(drop),
        None if !master_key_path(cfg).exists() && must_give_master_key(cfg) => {
            bail!(NO_MASTER_KEY)
        }
        None => Ok(()),
    }
}

const NO_MASTER_KEY: &str = "no master key: set VAULTPAY_MASTER_KEY (64 hex digits, e.g. from \
     `openssl rand -hex 32`) or master_key_file; it is only generated in embedded mode";

/// Whether the master key must be given (not generated): outside embedded mode, or
/// when a key file is named.
fn must_give_master_key(cfg: &Config) -> bool {
    cfg.master_key_file.is_some() || cfg.auth_db().starts_with("postgres")
}

/// The master key from config/env, or (embedded mode only) the one generated once
/// into `<data_dir>/master.key` with mode 0600.
pub fn master_key(cfg: &Config) -> anyhow::Result<MasterKey> {
    if let Some(k) = &cfg.master_key {
        return MasterKey::parse(k.expose()).context("master_key");
    }
    let path = master_key_path(cfg);
    if path.exists() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(&path) {
                if m.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), "the master key file is readable by other users; chmod 600 it");
                }
            }
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        return MasterKey::parse(&text)
            .with_context(|| format!("master key in {}", path.display()));
    }
    if must_give_master_key(cfg) {
        bail!(NO_MASTER_KEY);
    }
    ensure_data_dir(&cfg.data_dir)?;
    let key = MasterKey::generate();
    if !write_private(&path, key.to_hex().as_bytes())? {
        // Another process starting at the same moment generated one first: use it.
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        return MasterKey::parse(&text)
            .with_context(|| format!("master key in {}", path.display()));
    }
    tracing::warn!(path = %path.display(), "generated a new master key; back it up with the data directory");
    Ok(key)
}

/// Writes `data` to `path` (mode 0600) if nothing is there yet; false if something is.
/// The file appears whole or not at all: written and synced under a temporary name,
/// then linked into place (a crash before could otherwise leave an empty key file the
/// server would refuse to start with, and a second process read a half-written one).
fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<bool> {
    use std::io::Write;
    // A name no other process uses (two containers sharing the directory may both be
    // PID 1), never removed before use.
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::now_v7().simple()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = (|| {
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data)?;
        f.sync_all()?;
        anyhow::Ok(())
    })();
    let linked = written.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Ok(()) => Ok(Some(true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Some(false)),
        // A filesystem without hard links (FAT, some network mounts): written in place.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::Unsupported | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("creating {}", path.display()))),
    });
    let _ = std::fs::remove_file(&tmp);
    let linked = match linked? {
        Some(linked) => linked,
        None => match opts.open(path) {
            Ok(mut f) => {
                f.write_all(data)?;
                f.sync_all()?;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("creating {}", path.display())))
            }
        },
    };
    if let Some(dir) = path.parent() {
        // The new name is durable once its directory is.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(linked)
}

fn db_options(cfg: &Config) -> DbOptions {
    DbOptions {
        max_connections: cfg.database.max_connections,
        sqlite_synchronous_full: cfg.database.sqlite_synchronous_full,
        ..DbOptions::default()
    }
}

/// Opens and migrates the databases of `mode` (for `vaultpay migrate`).
pub async fn open_dbs(cfg: &Config, mode: Mode) -> anyhow::Result<(Option<Db>, Option<Db>)> {
    open_each(cfg, mode, false).await
}

/// Takes an exclusive lock on `<database>.lock` beside each SQLite database that
/// `mode` serves, so that a second server started on the same files (the same
/// `--data-dir` twice) refuses to start instead of running beside the first: a
/// server keeps state about its databases in memory (the audit chain's head, the
/// permission and session caches, one writer and its background tasks) that another
/// process writing the same files would leave stale. The operating system releases the
/// lock when the process ends however it ends (`SIGKILL` included), so a crash never
/// leaves a stale lock behind. PostgreSQL databases take no lock: several replicas
/// may share one. The commands that inspect a database (`ledger verify`, `audit
/// verify`, `keys`, `clients`) take none either and run beside a server.
pub fn lock_sqlite_databases(cfg: &Config, mode: Mode) -> anyhow::Result<Vec<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let mut locations = Vec::new();
    if mode.auth() {
        locations.push(cfg.auth_db());
    }
    if mode.ledger() {
        locations.push(cfg.ledger_db());
    }
    prepare_data_dir(cfg)?;
    let mut locks = Vec::new();
    let mut locked = Vec::new();
    for file in locations
        .iter()
        .filter_map(|l| vaultpay_store::sqlite_file(l))
    {
        let real = canonical_file(&file)?;
        // (the same text twice too: PostgreSQL's is refused by `open_each`)
        if locked.contains(&real) {
            bail!("AuthShield and the ledger must not share a database");
        }
        let mut name = real.clone().into_os_string();
        name.push(".lock");
        let path = std::path::PathBuf::from(name);
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                };
                bail!(
                    "{} is in use by another vaultpay server{holder}: one server per SQLite \
                     database (for several replicas, use PostgreSQL)",
                    file.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        // For the message above, in the next server that finds the lock taken.
        lock.set_len(0)
            .and_then(|()| lock.rewind())
            .and_then(|()| writeln!(lock, "{}", std::process::id()))
            .with_context(|| format!("writing {}", path.display()))?;
        locks.push(lock);
        locked.push(real);
    }
    Ok(locks)
}

/// One name for a database file however it is spelled (relative, a `sqlite:` URL,
/// through a symbolic link): the file itself once it exists, else its directory's.
fn canonical_file(file: &Path) -> anyhow::Result<std::path::PathBuf> {
    if let Ok(real) = std::fs::canonicalize(file) {
        return Ok(real);
    }
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("the directory of {}", file.display()))?;
    Ok(dir.join(file.file_name().unwrap_or_default()))
}

/// Creates the data directory when a database is a file path (SQLite creates its
/// files there, not the directories above them).
fn prepare_data_dir(cfg: &Config) -> anyhow::Result<()> {
    if !cfg.auth_db().contains("://") || !cfg.ledger_db().contains("://") {
        ensure_data_dir(&cfg.data_dir)?;
    }
    Ok(())
}

/// Opens the databases of `mode` that must already exist, for the commands that
/// inspect or administer them (`audit verify`, `ledger verify`, `keys`, `clients`): a
/// database file that is not there (a wrong `--data-dir`) or a database without
/// VaultPay's schema is an error, not a new empty database that then verifies as
/// intact or gets a key of its own.
pub async fn open_existing_dbs(
    cfg: &Config,
    mode: Mode,
) -> anyhow::Result<(Option<Db>, Option<Db>)> {
    open_each(cfg, mode, true).await
}

async fn open_each(
    cfg: &Config,
    mode: Mode,
    existing: bool,
) -> anyhow::Result<(Option<Db>, Option<Db>)> {
    if cfg.auth_db() == cfg.ledger_db() {
        bail!("AuthShield and the ledger must not share a database");
    }
    if !existing {
        prepare_data_dir(cfg)?;
    }
    let opts = db_options(cfg);
    let mut dbs = (None, None);
    if mode.auth() {
        let location = cfg.auth_db();
        dbs.0 = Some(open_one(&location, Service::Auth, "AuthShield", &opts, existing).await?);
    }
    if mode.ledger() {
        let location = cfg.ledger_db();
        dbs.1 = Some(open_one(&location, Service::Ledger, "the ledger", &opts, existing).await?);
    }
    Ok(dbs)
}

/// Opens (creating and migrating) the database at `location`; with `existing`, only
/// one that is there and has VaultPay's schema.
async fn open_one(
    location: &str,
    service: Service,
    what: &str,
    opts: &DbOptions,
    existing: bool,
) -> anyhow::Result<Db> {
    let opening = || {
        format!(
            "opening {what}'s database ({})",
            vaultpay_store::redact_url(location)
        )
    };
    if !existing {
        return Db::open(location, service, opts)
            .await
            .with_context(opening);
    }
    if let Some(file) = vaultpay_store::sqlite_file(location) {
        if !file.is_file() {
            // A split deployment's data dir holds one service's database: name the
            // flag that picks it rather than suggest creating an empty one.
            let (other_file, other) = match service {
                Service::Auth => ("ledger.db", "ledger"),
                Service::Ledger => ("auth.db", "auth"),
            };
            if file.with_file_name(other_file).is_file() {
                bail!(
                    "{what}'s database {} does not exist, but the {other} service's does: \
                     this looks like the data dir of a `serve {other}` process (`audit verify` \
                     takes --service {other}; `keys` and `clients` need AuthShield's data dir, \
                     `ledger verify` the ledger's)",
                    file.display()
                );
            }
            bail!(
                "{what}'s database {} does not exist (is --data-dir right? `vaultpay migrate` creates it)",
                file.display()
            );
        }
    }
    let db = Db::connect(location, service, opts)
        .await
        .with_context(opening)?;
    let applied: Result<i64, _> =
        vaultpay_store::sqlx::query_scalar("SELECT COUNT(*) FROM schema_migrations")
            .fetch_one(db.read())
            .await;
    if !matches!(applied, Ok(n) if n > 0) {
        bail!(
            "{what}'s database {} has no VaultPay schema (`vaultpay migrate` creates it)",
            vaultpay_store::redact_url(location)
        );
    }
    db.migrate()
        .await
        .with_context(|| format!("migrating {what}'s database"))?;
    Ok(db)
}

fn rate_limiter(cfg: &Config) -> anyhow::Result<Arc<dyn RateLimiter>> {
    match &cfg.redis_url {
        #[cfg(feature = "redis")]
        Some(url) => Ok(Arc::new(crate::redis_limiter::RedisRateLimiter::with_ca(
            url.expose(),
            cfg.redis_ca_path.as_deref(),
        )?)),
        #[cfg(not(feature = "redis"))]
        Some(_) => bail!("redis_url is set but this binary was built without the `redis` feature"),
        None => Ok(Arc::new(vaultpay_web::MemoryRateLimiter::default())),
    }
}

/// Builds everything and starts listening on `cfg.listen` (port 0 picks a free port).
pub async fn start(cfg: Config, mode: Mode, bootstrap: Bootstrap) -> anyhow::Result<Running> {
    // What can refuse the start without touching any state goes first: a ledger alone
    // without AuthShield's address, a listen address that is taken. A refused start
    // has then created no database, no master key and no bootstrap administrator.
    if mode == Mode::Ledger && cfg.auth_url.is_none() {
        bail!("the ledger alone needs --auth-url (where AuthShield runs)");
    }
    // The introspection secret and users' tokens go to AuthShield, and the keys that
    // verify every token come from it: never in clear text across a network.
    let mut auth_http = None;
    if mode == Mode::Ledger {
        if let Some(url) = cfg
            .auth_url
            .as_deref()
            .filter(|u| !vaultpay_auth::outbound::is_secure_url(u))
        {
            bail!("--auth-url must be https (http only to a loopback address), not {url:?}");
        }
        let ca = match &cfg.auth_ca_path {
            Some(f) => remote::load_ca(f)
                .map_err(anyhow::Error::msg)
                .context("auth_ca_path")?,
            None => Vec::new(),
        };
        auth_http = Some(remote::client(&ca).map_err(anyhow::Error::msg)?);
    }
    if mode == Mode::Ledger && !cfg.issuer_configured {
        bail!(
            "the ledger alone needs auth.issuer (VAULTPAY_AUTH__ISSUER): AuthShield's issuer, \
             as its /.well-known/openid-configuration gives it; set the same on both"
        );
    }
    if mode == Mode::Ledger && cfg.auth.introspection_secret.is_none() {
        bail!(
            "the ledger alone needs auth.introspection_secret (VAULTPAY_AUTH__INTROSPECTION_SECRET), \
             the same as AuthShield's"
        );
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let limiter = rate_limiter(&cfg)?;
    #[cfg(not(feature = "nats"))]
    if cfg.nats_url.is_some() && mode != Mode::Auth {
        bail!("nats_url is set but this binary was built without the `nats` feature");
    }
    if mode != Mode::Ledger {
        refuse_unusable_master_key(&cfg)?;
    }
    let prometheus = telemetry::prometheus();
    let locks = lock_sqlite_databases(&cfg, mode)?;
    let (auth_db, ledger_db) = open_dbs(&cfg, mode).await?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut background = Vec::new();
    let mut router = Router::new();
    let mut dbs = Vec::new();
    if mode == Mode::Auth && cfg.auth.introspection_secret.is_none() {
        tracing::warn!(
            "no auth.introspection_secret: a ledger run alone (serve ledger --auth-url) cannot \
             introspect here, and answers 503 for every sensitive operation"
        );
    }

    let auth = match &auth_db {
        Some(db) => {
            dbs.push(db.clone());
            refuse_new_key_for_sealed_data(&cfg, db).await?;
            let key = master_key(&cfg)?;
            let svc = AuthService::new(
                db.clone(),
                cfg.auth.clone(),
                &key,
                limiter.clone(),
                &cfg.data_dir,
            )
            .await
            .context("starting AuthShield")?;
            svc.normalise_stored_emails()
                .await
                .context("normalising stored email addresses")?;
            if let Some(done) = svc
                .bootstrap(bootstrap)
                .await
                .context("creating the bootstrap admin")?
            {
                match done.generated_password {
                    Some(pw) => println!(
                        "\n  Bootstrap administrator created.\n    email:    {}\n    password: {}\n  \
                         This password is shown only once; change it after signing in.\n",
                        done.email,
                        pw.expose()
                    ),
                    None => println!("Bootstrap administrator created: {}", done.email),
                }
            }
            background.extend(svc.spawn_background(shutdown_rx.clone()));
            #[cfg(feature = "redis")]
            background.extend(crate::redis_cluster::install(
                &cfg,
                &svc,
                shutdown_rx.clone(),
            )?);
            router = router.merge(vaultpay_auth::router(svc.clone()));
            Some(svc)
        }
        None => None,
    };

    // What a ledger run alone finds wrong at AuthShield (another issuer, its
    // introspection credentials refused): set while it lasts, `/readyz` then answers
    // 503 with the reason in the log.
    let mut faults: Vec<(Arc<std::sync::atomic::AtomicBool>, &'static str)> = Vec::new();
    let verifier: Arc<TokenVerifier> = match (&auth, &cfg.auth_url) {
        (Some(a), _) => a.verifier(),
        (None, Some(url)) => {
            let http = auth_http
                .clone()
                .context("the ledger alone needs --auth-url")?;
            let issuer = Arc::new(remote::IssuerProbe::new(
                url,
                &cfg.auth.issuer,
                http.clone(),
            ));
            faults.push((
                issuer.mismatch(),
                "AuthShield names another issuer than this ledger's auth.issuer, and every \
                 token is refused",
            ));
            // At start (the first tick is at once) and with every JWKS reload.
            background.push(vaultpay_web::every(
                "issuer_probe",
                std::time::Duration::from_secs(cfg.jwks_refresh_secs),
                shutdown_rx.clone(),
                move || {
                    let issuer = issuer.clone();
                    async move { issuer.probe().await }
                },
            ));
            let source = Arc::new(remote::JwksSource::new(url, http));
            let rules = Rules {
                issuer: cfg.auth.issuer.clone(),
                audience: cfg.auth.audience.clone(),
                leeway_secs: cfg.auth.leeway_secs,
            };
            let v = Arc::new(TokenVerifier::new(rules, source, KeySet::default()));
            // Fetched now and reloaded on a timer, as AuthShield reloads its own keys: an
            // unknown `kid` refetches, but a key AuthShield retired or rotated out would
            // otherwise verify here until the next restart.
            let keys = v.clone();
            let every = std::time::Duration::from_secs(cfg.jwks_refresh_secs);
            background.push(vaultpay_web::every(
                "jwks_reload",
                every,
                shutdown_rx.clone(),
                move || {
                    let keys = keys.clone();
                    async move { keys.refresh().await.map(|()| 0) }
                },
            ));
            v
        }
        (None, None) => bail!("the ledger alone needs --auth-url (where AuthShield runs)"),
    };

    let ledger = match &ledger_db {
        Some(db) => {
            dbs.push(db.clone());
            let introspector: Arc<dyn Introspector> = match (&auth, &cfg.auth_url) {
                (Some(a), _) => Arc::new(a.clone()),
                (None, Some(url)) => {
                    let secret = cfg
                        .auth
                        .introspection_secret
                        .clone()
                        .context("the ledger alone needs auth.introspection_secret (VAULTPAY_AUTH__INTROSPECTION_SECRET)")?;
                    let http = auth_http
                        .clone()
                        .context("the ledger alone needs --auth-url")?;
                    let remote = Arc::new(remote::HttpIntrospector::new(url, secret, http));
                    faults.push((
                        remote.credentials_refused(),
                        "AuthShield refuses this ledger's introspection credentials: \
                         auth.introspection_secret differs between the two processes, and \
                         every sensitive operation answers 503",
                    ));
                    // At start (the first tick is at once) and with every JWKS reload.
                    let probe = remote.clone();
                    background.push(vaultpay_web::every(
                        "introspection_credentials_probe",
                        std::time::Duration::from_secs(cfg.jwks_refresh_secs),
                        shutdown_rx.clone(),
                        move || {
                            let probe = probe.clone();
                            async move { probe.probe().await }
                        },
                    ));
                    remote
                }
                (None, None) => bail!("the ledger alone needs --auth-url"),
            };
            // the batch route's own limit is never below the server-wide one
            let mut ledger_cfg = cfg.ledger.clone();
            ledger_cfg.batch_body_limit_bytes =
                ledger_cfg.batch_body_limit_bytes.max(cfg.body_limit_bytes);
            let l = Ledger::new(db.clone(), ledger_cfg, introspector);
            if let Some(url) = &cfg.nats_url {
                #[cfg(feature = "nats")]
                {
                    let sink = crate::nats_sink::NatsSink::connect(
                        url.expose(),
                        &cfg.nats_subject_prefix,
                        &cfg.nats_stream,
                    )
                    .await
                    .context("connecting to NATS")?;
                    l.set_event_sink(Arc::new(sink));
                }
                #[cfg(not(feature = "nats"))]
                {
                    let _ = url;
                    bail!("nats_url is set but this binary was built without the `nats` feature");
                }
            }
            background.extend(l.spawn_background(shutdown_rx.clone()));
            router = router.merge(l.router());
            Some(l)
        }
        None => None,
    };

    let ready_dbs = dbs.clone();
    let faults: Arc<[_]> = faults.into();
    let metrics_token = cfg.metrics_token.clone();
    // A ledger run alone is ready once it holds AuthShield's keys as well.
    let ready_keys = auth.is_none().then(|| verifier.clone());
    // ... and has heard from it lately: keys held while every reload fails may include
    // one AuthShield retired since (a compromised key), so after three reload periods
    // without an answer the ledger stops calling itself ready.
    let keys_stale_after = std::time::Duration::from_secs(cfg.jwks_refresh_secs.saturating_mul(3));
    let system = Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({ "status": "ok" })) }),
        )
        .route(
            "/readyz",
            get(move || {
                readyz(
                    ready_dbs.clone(),
                    ready_keys.clone(),
                    keys_stale_after,
                    faults.clone(),
                )
            }),
        )
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let token = metrics_token.clone();
                async move {
                    match metrics_allowed(&headers, token.as_ref()) {
                        Ok(()) => metrics_text(prometheus),
                        Err(e) => e.into_response(),
                    }
                }
            }),
        )
        .route("/openapi.json", get(docs::openapi_json))
        .route("/docs", get(docs::page));
    let ip_cfg = Arc::new(cfg.client_ip_config()?);
    let app = router
        .merge(system)
        .fallback(middleware::not_found)
        .method_not_allowed_fallback(middleware::method_not_allowed)
        .layer(Extension(verifier))
        .layer(Extension(ip_cfg))
        .layer(DefaultBodyLimit::max(cfg.body_limit_bytes))
        .layer(CatchPanicLayer::custom(middleware::panic_response))
        .layer(axum::middleware::from_fn_with_state(
            middleware::Deadline(Duration::from_secs(cfg.request_timeout_secs)),
            middleware::request_context,
        ));

    let addr = listener.local_addr()?;
    let header_timeout = Duration::from_secs(cfg.header_read_timeout_secs.max(1));
    let drain = Duration::from_secs(cfg.request_timeout_secs.saturating_add(1));
    let server = tokio::spawn(serve_http(
        listener,
        app,
        header_timeout,
        drain,
        shutdown_rx.clone(),
    ));
    tracing::info!(%addr, ?mode, "listening");
    Ok(Running {
        addr,
        auth,
        ledger,
        shutdown,
        server,
        background,
        dbs,
        _locks: locks,
    })
}

async fn readyz(
    dbs: Vec<Db>,
    keys: Option<Arc<TokenVerifier>>,
    stale_after: std::time::Duration,
    faults: Arc<[(Arc<std::sync::atomic::AtomicBool>, &'static str)]>,
) -> Response {
    let fault = faults
        .iter()
        .find(|(set, _)| set.load(std::sync::atomic::Ordering::Relaxed));
    if let Some((_, why)) = fault {
        return ApiError::unavailable(*why).into_response();
    }
    for db in &dbs {
        if let Err(e) = db.ping().await {
            return ApiError::unavailable(format!("{} database: {e}", db.service().name()))
                .into_response();
        }
    }
    if let Some(k) = keys {
        if !k.has_keys() {
            return ApiError::unavailable("AuthShield's JWKS has not been fetched").into_response();
        }
        if let Some(age) = k.keys_age().filter(|a| *a > stale_after) {
            return ApiError::unavailable(format!(
                "AuthShield's JWKS last answered {} s ago: keys it retired since may still verify here",
                age.as_secs()
            ))
            .into_response();
        }
    }
    (
        StatusCode::OK,
        Json(serde_json::json!({ "status": "ready" })),
    )
        .into_response()
}

/// With `metrics_token` set, `/metrics` answers only a request bearing it (compared in
/// constant time).
fn metrics_allowed(
    headers: &axum::http::HeaderMap,
    token: Option<&vaultpay_core::secret::Secret>,
) -> Result<(), ApiError> {
    let Some(token) = token else {
        return Ok(());
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if vaultpay_core::crypto::ct_eq(g.as_bytes(), token.expose().as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::unauthorized(
            "invalid_token",
            "This is not the metrics token.",
        )),
        None => Err(ApiError::credentials_missing(
            "missing_token",
            "/metrics needs the metrics token (metrics_token) as a bearer token.",
        )),
    }
}

fn metrics_text(
    handle: Option<&'static metrics_exporter_prometheus::PrometheusHandle>,
) -> Response {
    match handle {
        Some(h) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            h.render(),
        )
            .into_response(),
        None => ApiError::internal("metrics recorder not installed").into_response(),
    }
}

/// Serves `app` on `listener` over HTTP/1.1 until `shutdown`, then lets the requests in
/// flight finish. Unlike `axum::serve`, each connection has a timer, so that a
/// connection whose request head has not fully arrived within `header_timeout` (a
/// client trickling its headers, or one idle between keep-alive requests) is closed
/// instead of held open for good.
/// `drain`: how long a connection answering a request may take to finish once shutdown
/// begins (a request in flight is cut off at the request timeout anyway). A connection
/// answering nothing, idle or still sending its request head (which hyper would wait
/// for up to the header timeout, 75 s by default), is closed at once.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: Router,
    header_timeout: Duration,
    drain: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    // Each connection holds a receiver; the server returns once all are dropped.
    let (open_tx, open_rx) = watch::channel(());
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // A connection that went away before it was accepted: next one.
                    // Anything else (out of file descriptors, say): wait a second
                    // instead of spinning on it, as axum::serve does.
                    use std::io::ErrorKind as K;
                    if !matches!(e.kind(), K::ConnectionAborted | K::ConnectionReset | K::ConnectionRefused) {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
            },
            _ = async { drop(shutdown.wait_for(|s| *s).await) } => break,
        };
        // Responses go out at once: no Nagle delay behind a client's delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let router = app.clone();
        // Requests of this connection being answered: at shutdown a connection with
        // none (idle, or still sending a request head) is closed at once.
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = busy.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo::<SocketAddr>(remote));
                let answer = tower::ServiceExt::oneshot(router.clone(), req);
                let counted = counted.clone();
                counted.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                async move {
                    let r = answer.await;
                    counted.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    r
                }
            });
        let mut stop = shutdown.clone();
        let open = open_rx.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    if busy.load(std::sync::atomic::Ordering::Acquire) == 0 {
                        // nothing being answered: a client between requests, or still
                        // sending one, may send it again elsewhere
                        drop(open);
                        return;
                    }
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(drain, conn).await {
                        Ok(Err(e)) => tracing::debug!(error = %e, "connection ended with an error"),
                        Ok(Ok(())) => {}
                        Err(_) => tracing::info!("closing a connection still open at the end of shutdown"),
                    }
                }
            }
            drop(open);
        });
    }
    drop(listener);
    drop(open_rx);
    open_tx.closed().await;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Each SQLite database is locked by the server that serves it: AuthShield alone
    /// and the ledger alone may share a data directory (each its own file), a third
    /// server wanting either file is refused while it is held, and PostgreSQL takes no
    /// lock (replicas share it).
    #[test]
    fn each_sqlite_database_is_served_by_one_server_at_a_time() {
        let dir = std::env::temp_dir().join(format!("vp-lock-{}", uuid::Uuid::now_v7()));
        let mut cfg = Config {
            data_dir: dir.clone(),
            ..Config::default()
        };
        let auth = lock_sqlite_databases(&cfg, Mode::Auth).unwrap();
        let ledger = lock_sqlite_databases(&cfg, Mode::Ledger).unwrap();
        assert_eq!((auth.len(), ledger.len()), (1, 1));
        let pid = format!("(pid {})", std::process::id());
        let err = format!("{:#}", lock_sqlite_databases(&cfg, Mode::All).unwrap_err());
        assert!(
            err.contains("auth.db is in use by another vaultpay server"),
            "{err}"
        );
        assert!(err.contains(&pid), "{err}");
        drop(auth);
        let err = format!("{:#}", lock_sqlite_databases(&cfg, Mode::All).unwrap_err());
        assert!(err.contains("ledger.db is in use"), "{err}");
        drop(ledger);
        let both = lock_sqlite_databases(&cfg, Mode::All).unwrap();
        assert_eq!(both.len(), 2);
        // another spelling of the same files (relative to a symbolic link of the
        // directory, and as a `sqlite:` URL) is the same database
        #[cfg(unix)]
        {
            let link = std::env::temp_dir().join(format!("vp-lock-link-{}", uuid::Uuid::now_v7()));
            std::os::unix::fs::symlink(&dir, &link).unwrap();
            let mut other = cfg.clone();
            other.data_dir = link.clone();
            other.database.ledger_url = Some(vaultpay_core::secret::Secret::new(format!(
                "sqlite://{}/ledger.db",
                link.display()
            )));
            for mode in [Mode::Auth, Mode::Ledger] {
                let err = format!("{:#}", lock_sqlite_databases(&other, mode).unwrap_err());
                assert!(err.contains("is in use"), "{mode:?}: {err}");
            }
            std::fs::remove_file(&link).unwrap();
        }
        drop(both);
        // both services on one file, however spelled, is refused as such
        let mut same = cfg.clone();
        same.database.ledger_url = Some(vaultpay_core::secret::Secret::new(format!(
            "sqlite://{}/./auth.db",
            dir.display()
        )));
        let err = format!("{:#}", lock_sqlite_databases(&same, Mode::All).unwrap_err());
        assert!(err.contains("must not share a database"), "{err}");
        // a database in a data dir not created yet (spelled differently from it)
        let fresh = std::env::temp_dir().join(format!("vp-lock-new-{}", uuid::Uuid::now_v7()));
        let mut later = cfg.clone();
        later.data_dir = fresh.clone();
        later.database.auth_url = Some(vaultpay_core::secret::Secret::new(format!(
            "{}/./auth.db",
            fresh.display()
        )));
        assert_eq!(lock_sqlite_databases(&later, Mode::Auth).unwrap().len(), 1);
        std::fs::remove_dir_all(&fresh).unwrap();
        let pg = |db: &str| {
            Some(vaultpay_core::secret::Secret::new(format!(
                "postgres://vaultpay@127.0.0.1/{db}"
            )))
        };
        cfg.database.auth_url = pg("auth");
        cfg.database.ledger_url = pg("ledger");
        let (one, two) = (
            lock_sqlite_databases(&cfg, Mode::All).unwrap(),
            lock_sqlite_databases(&cfg, Mode::All).unwrap(),
        );
        assert!(one.is_empty() && two.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_generated_master_key_appears_once_whole_and_private() {
        let dir = std::env::temp_dir().join(format!("vp-mk-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = Config {
            data_dir: dir.clone(),
            ..Config::default()
        };
        let first = master_key(&cfg).unwrap();
        let path = dir.join("master.key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Another start reads it; a second writer finds it taken and leaves it.
        assert_eq!(master_key(&cfg).unwrap().to_hex(), first.to_hex());
        assert!(!write_private(&path, b"other").unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), *first.to_hex());
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["master.key"], "no temporary file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
