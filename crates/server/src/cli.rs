//! The `vaultpay` command line: server and operator commands.

use crate::app::{self, Mode};
use crate::config::Config;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use vaultpay_auth::Bootstrap;
use vaultpay_store::audit::ChainReport;

#[derive(Parser, Debug)]
#[command(
    name = "vaultpay",
    version,
    about = "VaultPay: identity (AuthShield) and a double-entry ledger in one binary"
)]
pub struct Cli {
    /// Configuration file (TOML); `VAULTPAY_*` environment variables override it.
    #[arg(long, global = true, env = "VAULTPAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (SQLite files, master key, mail outbox); default `./data`, or
    /// `data_dir` in the configuration file, or `VAULTPAY_DATA_DIR`.
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (both services by default).
    Serve {
        #[arg(value_enum, default_value_t = ServeWhat::All)]
        what: ServeWhat,
        /// Address to listen on (default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Where AuthShield runs, for `serve ledger`.
        #[arg(long)]
        auth_url: Option<String>,
    },
    /// Apply database migrations and exit.
    Migrate {
        /// Which service's database (a split deployment's data dir holds one).
        #[arg(long, value_enum, default_value_t = Which::All)]
        service: Which,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Token signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The hash-chained audit logs.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// OAuth clients of AuthShield.
    Clients {
        #[command(subcommand)]
        command: ClientsCommand,
    },
    /// Ledger operations.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeWhat {
    All,
    Auth,
    Ledger,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the effective configuration, secrets redacted.
    Show,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Add a new signing key, published now and signing after
    /// `auth.key_publish_ahead_secs`; the old one signs until then and keeps verifying
    /// until its tokens expire.
    Rotate {
        /// Sign with the new key at once (a compromised key; then `keys retire` it).
        /// Relying parties that cached the JWKS refuse its tokens until they refetch.
        #[arg(long)]
        now: bool,
    },
    /// List signing keys.
    List,
    /// Stop a rotated-out key from verifying anything, now (key compromise).
    Retire { kid: String },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Auth,
    Ledger,
    All,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify the hash chain; names the first broken link and prints the head (seq and
    /// hash) to record elsewhere. Exit status 1 if broken or an --expect anchor is not
    /// in the chain.
    Verify {
        #[arg(long, value_enum, default_value_t = Which::All)]
        service: Which,
        /// A head printed by an earlier run, `SEQ:HASH`: the chain must still hold that
        /// entry with that hash (a chain cut short, or rewritten after it, verifies on
        /// its own). Needs `--service auth` or `--service ledger`.
        #[arg(long, value_name = "SEQ:HASH")]
        expect: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClientsCommand {
    /// Register a client; prints its id and (confidential clients) its secret, once.
    Create {
        /// The client's name, shown to users on the consent page.
        #[arg(long)]
        name: String,
        /// Exact redirect URI (repeatable).
        #[arg(long = "redirect-uri")]
        redirect_uris: Vec<String>,
        /// Grant type (repeatable; default authorization_code + refresh_token).
        #[arg(long = "grant-type")]
        grant_types: Vec<String>,
        /// Allowed scope (repeatable; default openid profile email offline_access; a
        /// client_credentials-only client takes none: its tokens carry no user).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// A public client (no secret; PKCE required).
        #[arg(long)]
        public: bool,
        /// ID token algorithm: EdDSA (default) or ES256.
        #[arg(long)]
        id_token_alg: Option<String>,
    },
    /// List clients (JSON lines).
    List,
    /// Delete a client and revoke its sessions.
    Delete { client_id: String },
}

#[derive(Subcommand, Debug)]
pub enum LedgerCommand {
    /// Check every ledger invariant. Exit status 1 on any violation.
    Verify,
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = Config::load(cli.config.as_deref(), std::env::vars())?;
    if let Some(d) = &cli.data_dir {
        cfg.data_dir = d.clone();
    }
    Ok(cfg)
}

/// Says which `VAULTPAY_*` variables name no setting: in the log (`logging`: the
/// server and `migrate`), or on standard error (the other commands, which log nothing).
fn warn_ignored_env(cfg: &Config, logging: bool) {
    for w in &cfg.ignored_env {
        if logging {
            tracing::warn!("{w}");
        } else {
            eprintln!("warning: {w}");
        }
    }
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut cfg = load_config(&cli)?;
    if !matches!(cli.command, Command::Serve { .. } | Command::Migrate { .. }) {
        warn_ignored_env(&cfg, false);
    }
    match cli.command {
        Command::Serve {
            what,
            listen,
            auth_url,
        } => {
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if auth_url.is_some() {
                cfg.auth_url = auth_url;
            }
            crate::telemetry::init_logging(&cfg);
            warn_ignored_env(&cfg, true);
            let mode = match what {
                ServeWhat::All => Mode::All,
                ServeWhat::Auth => Mode::Auth,
                ServeWhat::Ledger => Mode::Ledger,
            };
            // An issuer the configuration does not name: AuthShield's is its own listen
            // address (a concrete one). A ledger run alone cannot know AuthShield's, so
            // it must be told (`app::start` refuses to start it otherwise).
            if mode != Mode::Ledger {
                if let Some(issuer) = issuer_from_listen(&cfg) {
                    tracing::info!(%issuer, "auth.issuer not set: using the listen address");
                    cfg.auth.issuer = issuer;
                }
            }
            let bootstrap = Bootstrap {
                admin_email: cfg.bootstrap_admin_email.clone(),
                admin_password: cfg.bootstrap_admin_password.clone(),
            };
            let running = app::start(cfg, mode, bootstrap).await?;
            println!("VaultPay listening on http://{}", running.addr);
            running.run_until_signal().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { service } => {
            crate::telemetry::init_logging(&cfg);
            warn_ignored_env(&cfg, true);
            app::open_dbs(&cfg, which_mode(service)).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Show,
        } => {
            // the issuer `serve` would use: its listen address when none is set
            let mut cfg = cfg;
            if let Some(issuer) = issuer_from_listen(&cfg) {
                println!(
                    "# auth.issuer is not set: `serve` and `serve auth` use their listen address \
                     (`serve ledger` needs it set, to AuthShield's)"
                );
                cfg.auth.issuer = issuer;
            }
            print!("{}", cfg.show()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys { command } => keys(&cfg, command).await,
        Command::Clients { command } => clients(&cfg, command).await,
        Command::Audit {
            command: AuditCommand::Verify { service, expect },
        } => audit_verify(&cfg, service, expect.as_deref()).await,
        Command::Ledger {
            command: LedgerCommand::Verify,
        } => {
            let (_, ledger) = app::open_existing_dbs(&cfg, Mode::Ledger).await?;
            let db = ledger.context("ledger database")?;
            let report = vaultpay_ledger::verify(&db)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{report}");
            Ok(if report.is_consistent() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// How long a rotated-out key keeps verifying: (the Ed25519 key, the ES256 ID-token
/// key). Running servers sign with the old keys until their next key reload; the
/// Ed25519 key signs access tokens, client_credentials tokens and EdDSA ID tokens, so
/// it verifies until the longest-lived of them has expired.
fn rotation_overlaps(cfg: &Config) -> (i64, i64) {
    let reload = vaultpay_auth::keys::RELOAD_EVERY_SECS;
    let a = &cfg.auth;
    let longest = a
        .access_token_ttl_secs
        .max(a.oauth.client_credentials_ttl_secs)
        .max(a.oauth.id_token_ttl_secs);
    (
        longest + a.leeway_secs + reload,
        a.oauth.id_token_ttl_secs + a.leeway_secs + reload,
    )
}

async fn keys(cfg: &Config, command: KeysCommand) -> anyhow::Result<ExitCode> {
    // An existing database only: a mistyped --data-dir must not get a new database,
    // master key and signing key.
    let (auth, _) = app::open_existing_dbs(cfg, Mode::Auth).await?;
    let db = auth.context("auth database")?;
    let env = checked_master_key(cfg, &db).await?;
    vaultpay_auth::keys::ensure_key(&db, &env).await?;
    match command {
        KeysCommand::Rotate { now } => {
            let (overlap_secs, id_overlap_secs) = rotation_overlaps(cfg);
            let ahead = if now {
                0
            } else {
                cfg.auth.key_publish_ahead_secs
            };
            let r = vaultpay_auth::keys::Rotation {
                publish_ahead_secs: ahead,
                overlap_secs,
                id_overlap_secs,
            };
            // both keys in one transaction: both rotate, or neither does
            let (kid, id_kid, switch) =
                vaultpay_auth::keys::rotate_all(&db, &env, r, "cli").await?;
            let at = vaultpay_core::time::rfc3339(switch);
            let when = if ahead == 0 {
                "signs now".to_owned()
            } else {
                format!("is in the JWKS now and signs from {at} (in {ahead} s); the previous key signs until then")
            };
            println!(
                "new signing key {kid} {when}; previous keys verify for {overlap_secs} s after {at}"
            );
            if let Some(kid) = id_kid {
                println!(
                    "new ES256 ID-token key {kid} signs from {at}; the previous one stays in the JWKS for {id_overlap_secs} s after"
                );
            }
        }
        KeysCommand::List => {
            for k in vaultpay_auth::keys::list(&db).await? {
                println!("{}", serde_json::to_string(&k)?);
            }
        }
        KeysCommand::Retire { kid } => {
            if !vaultpay_auth::keys::retire(&db, &kid, "cli").await? {
                eprintln!(
                    "no key {kid} that has stopped signing (a key that signs, or signs until a \
                     rotation's switch, cannot be retired: `keys rotate --now` first)"
                );
                return Ok(ExitCode::FAILURE);
            }
            println!("key {kid} no longer verifies tokens");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The master key for a command that seals with it, refused before anything is sealed
/// or written when it is not the one the database's keys are sealed with: a missing
/// key file while the database holds sealed keys (a new one would be generated), or a
/// key (a wrong `VAULTPAY_MASTER_KEY`, another data dir's `master.key`) that does not
/// open the current signing key. A key sealed with another master key than the
/// server's stops AuthShield from starting again.
async fn checked_master_key(
    cfg: &Config,
    db: &vaultpay_store::Db,
) -> anyhow::Result<vaultpay_core::crypto::Envelope> {
    app::refuse_new_key_for_sealed_data(cfg, db).await?;
    let env = vaultpay_core::crypto::Envelope::new(&app::master_key(cfg)?);
    vaultpay_auth::keys::check_opens(db, &env)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "this master key does not open the database's signing key ({e}); use the \
             master key the server runs with (VAULTPAY_MASTER_KEY, or master.key in its data dir)"
            )
        })?;
    Ok(env)
}

async fn clients(cfg: &Config, command: ClientsCommand) -> anyhow::Result<ExitCode> {
    use vaultpay_auth::oauth::clients;
    let (auth, _) = app::open_existing_dbs(cfg, Mode::Auth).await?;
    let db = auth.context("auth database")?;
    let origin = vaultpay_store::audit::Origin::default();
    match command {
        ClientsCommand::Create {
            name,
            redirect_uris,
            grant_types,
            scopes,
            public,
            id_token_alg,
        } => {
            let new = clients::NewClient {
                name,
                redirect_uris,
                grant_types: (!grant_types.is_empty()).then_some(grant_types),
                scopes: (!scopes.is_empty()).then_some(scopes),
                public,
                id_token_alg,
            };
            let env = checked_master_key(cfg, &db).await?;
            let created = clients::create(&db, &env, &origin, "cli", new).await?;
            println!("{}", serde_json::to_string(&created)?);
        }
        ClientsCommand::List => {
            for c in clients::list(&db).await? {
                println!("{}", serde_json::to_string(&c.view())?);
            }
        }
        ClientsCommand::Delete { client_id } => {
            if !clients::delete(&db, &origin, "cli", &client_id).await? {
                eprintln!("no client {client_id}");
                return Ok(ExitCode::FAILURE);
            }
            println!("client {client_id} deleted; its sessions are revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn which_mode(which: Which) -> Mode {
    match which {
        Which::Auth => Mode::Auth,
        Which::Ledger => Mode::Ledger,
        Which::All => Mode::All,
    }
}

async fn audit_verify(
    cfg: &Config,
    which: Which,
    expect: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let anchor = match expect {
        None => None,
        Some(_) if which == Which::All => {
            anyhow::bail!("--expect names one chain: add --service auth or --service ledger")
        }
        Some(a) => {
            let (seq, hash) = a
                .split_once(':')
                .and_then(|(s, h)| Some((s.parse::<i64>().ok()?, h)))
                .filter(|(s, h)| {
                    *s > 0 && h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
                })
                .ok_or_else(|| {
                    anyhow::anyhow!("--expect must be SEQ:HASH (a head printed by audit verify)")
                })?;
            Some((seq, hash.to_ascii_lowercase()))
        }
    };
    let mode = which_mode(which);
    let (auth, ledger) = app::open_existing_dbs(cfg, mode).await?;
    let mut ok = true;
    for db in [auth, ledger].into_iter().flatten() {
        let name = db.service().name();
        let (report, head) = vaultpay_store::audit::verify_chain_to_head(&db).await?;
        match report {
            ChainReport::Intact { entries } => {
                let head = match head {
                    Some((seq, hash)) => format!("; head {seq}:{hash}"),
                    None => String::new(),
                };
                println!("{name}: audit chain intact ({entries} entries{head})");
                if let Some((seq, hash)) = &anchor {
                    match vaultpay_store::audit::hash_at(&db, *seq).await? {
                        // `hash` was lowercased when parsed, as stored hashes are.
                        Some(h) if h == *hash => {
                            println!("{name}: holds the expected entry {seq}:{hash}");
                        }
                        found => {
                            ok = false;
                            println!(
                                "{name}: AUDIT CHAIN DOES NOT HOLD {seq}:{hash} ({}): cut short or rewritten",
                                match found {
                                    Some(h) => format!("entry {seq} has hash {h}"),
                                    None => format!("no entry {seq}"),
                                }
                            );
                        }
                    }
                }
            }
            ChainReport::Broken { checked, link } => {
                ok = false;
                println!(
                    "{}: AUDIT CHAIN BROKEN at seq {}: {} ({checked} entries before it verified)",
                    db.service().name(),
                    link.seq,
                    link.reason
                );
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The issuer (`iss`, OIDC discovery, links in mails) of a server running AuthShield
/// whose configuration does not name one while it listens elsewhere than the default:
/// its own address, so discovery points at the port it serves. Not for a wildcard or
/// ephemeral address (set `auth.issuer` to the public URL there).
fn issuer_from_listen(cfg: &Config) -> Option<String> {
    let defaults = Config::default();
    let listen = cfg.listen;
    (!cfg.issuer_configured
        && listen != defaults.listen
        && !listen.ip().is_unspecified()
        && listen.port() != 0)
        .then(|| format!("http://{listen}"))
}

/// An error and its causes on one line, each cause once: a cause whose text ends the
/// cause before it (a database error that quotes its source, which quotes its own) is
/// not repeated.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut before = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !before.is_empty() && before.ends_with(&text) {
            before = text;
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        before = text;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {

    #[test]
    fn an_error_line_names_each_cause_once() {
        #[derive(Debug)]
        struct Inner;
        impl std::fmt::Display for Inner {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("role \"vp\" does not exist")
            }
        }
        impl std::error::Error for Inner {}
        #[derive(Debug)]
        struct Quoting(Inner);
        impl std::fmt::Display for Quoting {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "database error: {}", self.0)
            }
        }
        impl std::error::Error for Quoting {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Quoting(Inner)).context("opening AuthShield's database");
        assert_eq!(
            error_text(&e),
            "opening AuthShield's database: database error: role \"vp\" does not exist"
        );
        let plain = anyhow::anyhow!("refused").context("starting");
        assert_eq!(error_text(&plain), "starting: refused");
        // a cause that only happens to appear in an earlier one is kept
        let kept = anyhow::anyhow!("timed out").context("connecting (timed out once already)");
        assert_eq!(
            error_text(&kept),
            "connecting (timed out once already): timed out"
        );
    }

    #[test]
    fn a_rotated_key_verifies_as_long_as_anything_it_signed() {
        let mut cfg = Config::default();
        let reload = vaultpay_auth::keys::RELOAD_EVERY_SECS;
        let lee = cfg.auth.leeway_secs;
        cfg.auth.access_token_ttl_secs = 300;
        cfg.auth.oauth.id_token_ttl_secs = 600;
        cfg.auth.oauth.client_credentials_ttl_secs = 0;
        assert_eq!(
            rotation_overlaps(&cfg),
            (600 + lee + reload, 600 + lee + reload)
        );
        cfg.auth.oauth.client_credentials_ttl_secs = 3_600;
        assert_eq!(rotation_overlaps(&cfg).0, 3_600 + lee + reload);
        cfg.auth.oauth.client_credentials_ttl_secs = 0;
        cfg.auth.oauth.id_token_ttl_secs = 60;
        assert_eq!(
            rotation_overlaps(&cfg),
            (300 + lee + reload, 60 + lee + reload)
        );
    }
    use super::*;

    #[test]
    fn the_default_issuer_follows_a_concrete_listen_address_only() {
        let mut cfg = Config::default();
        assert_eq!(issuer_from_listen(&cfg), None, "defaults agree already");
        cfg.listen = "127.0.0.1:9000".parse().unwrap();
        assert_eq!(
            issuer_from_listen(&cfg).as_deref(),
            Some("http://127.0.0.1:9000")
        );
        // an issuer the configuration names is kept, even one equal to the default
        let named = Config::load(
            None,
            [(
                "VAULTPAY_AUTH__ISSUER".to_owned(),
                Config::default().auth.issuer,
            )],
        )
        .unwrap();
        assert!(named.issuer_configured);
        let mut named = named;
        named.listen = cfg.listen;
        assert_eq!(issuer_from_listen(&named), None);
        cfg.listen = "[::1]:9000".parse().unwrap();
        assert_eq!(
            issuer_from_listen(&cfg).as_deref(),
            Some("http://[::1]:9000")
        );
        for wild in ["0.0.0.0:9000", "[::]:9000", "127.0.0.1:0"] {
            cfg.listen = wild.parse().unwrap();
            assert_eq!(issuer_from_listen(&cfg), None, "{wild}");
        }
        cfg.listen = "127.0.0.1:9000".parse().unwrap();
        let file = std::env::temp_dir().join(format!("vp-issuer-{}.toml", uuid::Uuid::now_v7()));
        std::fs::write(&file, "[auth]\nissuer = \"https://id.example.com\"\n").unwrap();
        let mut named = Config::load(Some(&file), Vec::new()).unwrap();
        named.listen = cfg.listen;
        assert_eq!(issuer_from_listen(&named), None, "an explicit issuer wins");
    }
}
