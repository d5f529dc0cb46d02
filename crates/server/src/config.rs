//! Server configuration: one TOML file plus `VAULTPAY_*` environment overrides.
//!
//! `VAULTPAY_LISTEN=…` sets `listen`; nested keys use a double underscore:
//! `VAULTPAY_AUTH__ACCESS_TOKEN_TTL_SECS=600` sets `[auth] access_token_ttl_secs`.
//! Values parse as TOML (numbers, booleans, arrays) and fall back to strings. A
//! variable ending in `_FILE` reads the value from that file (for secrets mounted as
//! files): `VAULTPAY_MASTER_KEY_FILE=/run/secrets/master`.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use vaultpay_auth::AuthConfig;
use vaultpay_core::secret::Secret;
use vaultpay_ledger::LedgerConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// 32-byte master key (hex or base64). In embedded mode a missing key is
    /// generated once into `<data_dir>/master.key` (mode 0600).
    pub master_key: Option<Secret>,
    pub master_key_file: Option<PathBuf>,
    pub log_format: LogFormat,
    pub log_level: String,
    /// Peers allowed to set the client address, in `forwarded_header`.
    pub trusted_proxies: Vec<String>,
    /// The header those proxies report the client in: `x-forwarded-for` (default) or
    /// `forwarded` (RFC 7239). Only that one is read.
    pub forwarded_header: String,
    pub body_limit_bytes: usize,
    pub request_timeout_secs: u64,
    /// A connection whose request head has not arrived this long after it began to
    /// wait for one (a slow client, or one idle between keep-alive requests) is closed.
    /// Behind a proxy that keeps idle upstream connections (nginx, load balancers: 60 s
    /// by default), keep it longer than the proxy's idle timeout, or a request sent as
    /// the server closes the connection fails at the proxy.
    pub header_read_timeout_secs: u64,
    /// When set, `GET /metrics` answers only `Authorization: Bearer <metrics_token>`
    /// (at least 16 characters): its counters show lockouts, reuse detections, rate
    /// limiting and admin activity. Unset: open, as on the default loopback listener.
    pub metrics_token: Option<Secret>,
    /// Redis for shared rate limits (needs the `redis` cargo feature).
    pub redis_url: Option<Secret>,
    /// NATS with JetStream, where the ledger's outbox relay publishes its events (needs
    /// the `nats` cargo feature); unset: in-process subscribers only.
    pub nats_url: Option<Secret>,
    /// Subjects are `<nats_subject_prefix>.<topic>`, e.g. `vaultpay.ledger.transfer.posted`.
    pub nats_subject_prefix: String,
    /// The JetStream stream the events are kept in (created if missing).
    pub nats_stream: String,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub ledger: LedgerConfig,
    /// The ledger process of a split deployment: where AuthShield is (https, or http
    /// to a loopback address: the introspection secret and users' tokens go there, and
    /// the keys that verify tokens come from there).
    pub auth_url: Option<String>,
    /// PEM certificates of the authorities to trust for `auth_url`'s TLS besides the
    /// public roots (an internal CA).
    pub auth_ca_path: Option<std::path::PathBuf>,
    /// PEM certificates of the authorities to trust for a `rediss://` `redis_url`
    /// instead of the system's roots (an internal CA).
    pub redis_ca_path: Option<std::path::PathBuf>,
    /// The ledger process of a split deployment: how often it reloads AuthShield's
    /// JWKS (so that a retired or rotated-out key stops verifying there too).
    pub jwks_refresh_secs: u64,
    /// Whether the config file or the environment named `auth.issuer` (a default issuer
    /// follows the listen address; a configured one is kept as it is).
    #[serde(skip)]
    pub issuer_configured: bool,
    /// `VAULTPAY_*` variables that name no setting (a misspelling such as
    /// `VAULTPAY_LISTN`), each with the setting it is probably meant to be: logged as
    /// warnings once logging is set up, instead of being dropped silently.
    #[serde(skip)]
    pub ignored_env: Vec<String>,
    /// The bootstrap administrator `VAULTPAY_BOOTSTRAP_ADMIN_EMAIL` and
    /// `VAULTPAY_BOOTSTRAP_ADMIN_PASSWORD` name (or their `_FILE` forms), read with the
    /// settings and used at first start only; never shown by `config show`.
    #[serde(skip)]
    pub bootstrap_admin_email: Option<String>,
    #[serde(skip)]
    pub bootstrap_admin_password: Option<Secret>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            master_key: None,
            master_key_file: None,
            log_format: LogFormat::Json,
            log_level: "info".into(),
            trusted_proxies: Vec::new(),
            forwarded_header: "x-forwarded-for".into(),
            body_limit_bytes: 64 * 1024,
            request_timeout_secs: 30,
            header_read_timeout_secs: 75,
            metrics_token: None,
            redis_url: None,
            nats_url: None,
            nats_subject_prefix: "vaultpay".into(),
            nats_stream: "VAULTPAY_LEDGER".into(),
            database: DatabaseConfig::default(),
            auth: AuthConfig::default(),
            ledger: LedgerConfig::default(),
            auth_url: None,
            auth_ca_path: None,
            redis_ca_path: None,
            jwks_refresh_secs: 15,
            issuer_configured: false,
            ignored_env: Vec::new(),
            bootstrap_admin_email: None,
            bootstrap_admin_password: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// AuthShield's database: a `postgres://` URL, or a SQLite path
    /// (default `<data_dir>/auth.db`).
    pub auth_url: Option<Secret>,
    /// The ledger's database (default `<data_dir>/ledger.db`). Never the same as auth's.
    pub ledger_url: Option<Secret>,
    pub max_connections: u32,
    /// SQLite `synchronous=FULL` (fsync every commit). Turning it off keeps commits
    /// safe across process crashes but not power loss.
    pub sqlite_synchronous_full: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            auth_url: None,
            ledger_url: None,
            max_connections: 16,
            sqlite_synchronous_full: true,
        }
    }
}

const TOP_LEVEL: &[&str] = &[
    "listen",
    "data_dir",
    "master_key",
    "master_key_file",
    "log_format",
    "log_level",
    "trusted_proxies",
    "forwarded_header",
    "body_limit_bytes",
    "request_timeout_secs",
    "header_read_timeout_secs",
    "metrics_token",
    "redis_url",
    "nats_url",
    "nats_subject_prefix",
    "nats_stream",
    "database",
    "auth",
    "ledger",
    "auth_url",
    "auth_ca_path",
    "redis_ca_path",
    "jwks_refresh_secs",
];

/// `VAULTPAY_*` variables (after the prefix) that are read elsewhere, not settings:
/// the config file's path (by the CLI) and the log filter (by the logger). The
/// bootstrap administrator's are read here, into `bootstrap_admin_*`.
const NOT_SETTINGS: &[&str] = &["CONFIG", "LOG"];

/// Prefixes of the variables the tests and benchmarks read.
const NOT_SETTINGS_PREFIXES: &[&str] = &["TEST_", "BENCH_", "CRASH_"];

/// The warning for variable `var` whose first key `key` is no setting, naming the
/// closest setting when one is a typo away.
fn unknown_variable(var: &str, key: &str) -> String {
    let closest = TOP_LEVEL
        .iter()
        .map(|t| (edit_distance(key, t), *t))
        .min()
        .filter(|(d, _)| *d <= 2);
    match closest {
        Some((_, t)) => format!(
            "{var} names no setting and is ignored (did you mean VAULTPAY_{}{}?)",
            t.to_uppercase(),
            if var.ends_with("_FILE") { "_FILE" } else { "" }
        ),
        None => format!("{var} names no setting and is ignored"),
    }
}

/// Levenshtein distance (the keys are short ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> anyhow::Result<()> {
    let (last, parents) = path.split_last().context("empty key")?;
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .with_context(|| format!("`{p}` is not a table"))?;
    }
    t.insert(last.clone(), value);
    Ok(())
}

/// Whether a setting's name makes it a secret (taken as written, never printed).
fn is_secret_key(key: &str) -> bool {
    ["password", "secret", "token", "key", "url"]
        .iter()
        .any(|s| key.ends_with(s))
}

/// Refuses a secret-named setting whose value is not a string, naming the setting only.
fn secrets_are_strings(table: &toml::Table, prefix: &str) -> anyhow::Result<()> {
    for (k, v) in table {
        let path = format!("{prefix}{k}");
        match v {
            toml::Value::Table(t) => secrets_are_strings(t, &format!("{path}."))?,
            toml::Value::String(_) => {}
            _ if is_secret_key(k) => bail!("{path} must be a string (in quotes)"),
            _ => {}
        }
    }
    Ok(())
}

impl Config {
    /// Reads the file (if any), applies `VAULTPAY_*` overrides from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let mut table = match file {
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading config file {}", f.display()))?;
                toml::from_str::<toml::Table>(&text).map_err(|e| {
                    // Not the error's own text: it quotes the offending line, which may
                    // hold a secret (an unquoted `master_key = 00ab…`).
                    let at = e.span().map_or(String::new(), |s| {
                        let before = text.get(..s.start).unwrap_or(&text);
                        let line = before.matches('\n').count() + 1;
                        let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                        format!(" at line {line}, column {col}")
                    });
                    anyhow::anyhow!("parsing config file {}{at}: {}", f.display(), e.message())
                })?
            }
            None => toml::Table::new(),
        };
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("VAULTPAY_"))
            .collect();
        vars.sort();
        let mut ignored_env = Vec::new();
        let (mut bootstrap_email, mut bootstrap_password) = (None, None);
        for (k, v) in vars {
            let rest = &k["VAULTPAY_".len()..];
            // `…_FILE`: the value is the file's text (without its final line break),
            // read as the variable's own value would be.
            let (rest, raw) = match rest.strip_suffix("_FILE") {
                Some(r) => {
                    let text =
                        std::fs::read_to_string(&v).with_context(|| format!("{k}: reading {v}"))?;
                    (r, text.trim_end_matches(['\n', '\r']).to_owned())
                }
                None => (rest, v),
            };
            // (sorted, a `_FILE` form comes after the plain one and wins)
            match rest {
                "BOOTSTRAP_ADMIN_EMAIL" => {
                    bootstrap_email = Some(raw).filter(|r| !r.is_empty());
                    continue;
                }
                "BOOTSTRAP_ADMIN_PASSWORD" => {
                    bootstrap_password = Some(raw).filter(|r| !r.is_empty()).map(Secret::new);
                    continue;
                }
                _ => {}
            }
            let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
            if !TOP_LEVEL.contains(&path[0].as_str()) {
                if !NOT_SETTINGS.contains(&rest)
                    && !NOT_SETTINGS_PREFIXES.iter().any(|p| rest.starts_with(p))
                {
                    ignored_env.push(unknown_variable(&k, &path[0]));
                }
                continue;
            }
            // secrets and addresses are taken as written, even when they look like a
            // number, a boolean or a quoted TOML string; other settings are TOML values
            let secret = path.last().is_some_and(|key| is_secret_key(key));
            let value = if secret {
                toml::Value::String(raw)
            } else {
                parse_env_value(&raw)
            };
            set_path(&mut table, &path, value).with_context(|| format!("applying {k}"))?;
        }
        // A secret that is not a string would be refused below by an error quoting
        // its value.
        secrets_are_strings(&table, "")?;
        let issuer_configured = table
            .get("auth")
            .and_then(|a| a.as_table())
            .is_some_and(|a| a.contains_key("issuer"));
        let mut cfg: Config = toml::Value::Table(table)
            .try_into()
            .context("invalid configuration")?;
        cfg.issuer_configured = issuer_configured;
        cfg.ignored_env = ignored_env;
        cfg.bootstrap_admin_email = bootstrap_email;
        cfg.bootstrap_admin_password = bootstrap_password;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.auth.argon2.validate().context("auth.argon2")?;
        self.auth
            .ip_trust
            .validate()
            .map_err(anyhow::Error::msg)
            .context("auth.ip_trust")?;
        if self.auth.access_token_ttl_secs < 30 || self.auth.access_token_ttl_secs > 3600 {
            bail!("auth.access_token_ttl_secs must be between 30 and 3600");
        }
        if self.auth.session_idle_ttl_secs <= 0 || self.auth.session_absolute_ttl_secs <= 0 {
            bail!("auth session lifetimes must be positive");
        }
        // A quota that limits nothing would switch brute-force protection off silently.
        for (name, q) in self.auth.rate_limits.all() {
            q.validate()
                .map_err(|e| anyhow::anyhow!("auth.rate_limits.{name}: {e}"))?;
        }
        if self.auth.hibp.enabled {
            self.auth
                .hibp
                .validate()
                .map_err(anyhow::Error::msg)
                .context("auth.hibp")?;
        }
        self.auth
            .mfa
            .email_send
            .validate()
            .map_err(|e| anyhow::anyhow!("auth.mfa.email_send: {e}"))?;
        let a = &self.auth;
        for (name, value, range) in [
            ("auth.leeway_secs", a.leeway_secs, 0..=300),
            ("auth.me_cache_ttl_ms", a.me_cache_ttl_ms, 0..=60_000),
            (
                "auth.password_policy.min_length",
                i64::try_from(a.password_policy.min_length).unwrap_or(i64::MAX),
                8..=128,
            ),
            (
                "auth.password_policy.max_length",
                i64::try_from(a.password_policy.max_length).unwrap_or(i64::MAX),
                i64::try_from(a.password_policy.min_length).unwrap_or(i64::MAX)..=1024,
            ),
            (
                "auth.password_policy.min_zxcvbn_score",
                i64::from(a.password_policy.min_zxcvbn_score),
                0..=4,
            ),
            (
                "auth.password_history",
                i64::try_from(a.password_history).unwrap_or(i64::MAX),
                0..=100,
            ),
            (
                "auth.refresh_reuse_grace_secs",
                a.refresh_reuse_grace_secs,
                0..=300,
            ),
            (
                "auth.permission_cache_ttl_secs",
                i64::try_from(a.permission_cache_ttl_secs).unwrap_or(i64::MAX),
                0..=3600,
            ),
            ("auth.lockout.threshold", a.lockout.threshold, 1..=1000),
            ("auth.lockout.base_secs", a.lockout.base_secs, 1..=86_400),
            (
                "auth.lockout.max_secs",
                a.lockout.max_secs,
                a.lockout.base_secs..=366 * 86_400,
            ),
            (
                "request_timeout_secs",
                i64::try_from(self.request_timeout_secs).unwrap_or(i64::MAX),
                1..=3600,
            ),
            (
                "database.max_connections",
                i64::from(self.database.max_connections),
                1..=1000,
            ),
            // 0 or less made every list request fail (an empty clamp range); a huge
            // page or statement is a memory bound gone.
            ("ledger.page_size_max", self.ledger.page_size_max, 1..=1000),
            (
                "ledger.statement_max_rows",
                i64::try_from(self.ledger.statement_max_rows).unwrap_or(i64::MAX),
                1..=1_000_000,
            ),
        ] {
            if !range.contains(&value) {
                bail!(
                    "{name} must be between {} and {}",
                    range.start(),
                    range.end()
                );
            }
        }
        // Publishing a key for less than the JWKS max-age plus a key reload protects
        // nobody: 0 (sign at once) or at least that.
        let ahead = a.key_publish_ahead_secs;
        use vaultpay_auth::keys::{JWKS_MAX_AGE_SECS, RELOAD_EVERY_SECS};
        let least = JWKS_MAX_AGE_SECS + RELOAD_EVERY_SECS;
        if ahead != 0 && !(least..=86_400).contains(&ahead) {
            bail!(
                "auth.key_publish_ahead_secs must be 0 (new keys sign at once) or between {least} \
                 (the JWKS max-age, {JWKS_MAX_AGE_SECS} s, plus the {RELOAD_EVERY_SECS} s key \
                 reload) and 86400"
            );
        }
        if self.body_limit_bytes < 1024 {
            bail!("body_limit_bytes must be at least 1024");
        }
        if self.ledger.batch_body_limit_bytes < 1024 {
            bail!("ledger.batch_body_limit_bytes must be at least 1024");
        }
        let o = &self.auth.oauth;
        for (name, value, range) in [
            ("code_ttl_secs", o.code_ttl_secs, 1..=600),
            ("request_ttl_secs", o.request_ttl_secs, 60..=3600),
            ("device_code_ttl_secs", o.device_code_ttl_secs, 60..=3600),
            (
                "device_poll_interval_secs",
                o.device_poll_interval_secs,
                0..=60,
            ),
            ("id_token_ttl_secs", o.id_token_ttl_secs, 30..=3600),
            (
                "client_credentials_ttl_secs",
                o.client_credentials_ttl_secs,
                0..=3600,
            ),
        ] {
            if !range.contains(&value) {
                bail!(
                    "auth.oauth.{name} must be between {} and {}",
                    range.start(),
                    range.end()
                );
            }
        }
        for (name, up) in &o.upstream {
            up.validate()
                .map_err(|e| anyhow::anyhow!("auth.oauth.upstream.{name}: {e}"))?;
        }
        if !(1..=3600).contains(&self.jwks_refresh_secs) {
            bail!("jwks_refresh_secs must be between 1 and 3600");
        }
        // The ledger's credential for AuthShield's introspection: anyone who has it
        // learns any token's subject, session and roles.
        if self
            .metrics_token
            .as_ref()
            .is_some_and(|t| t.expose().chars().count() < 16)
        {
            bail!("metrics_token must be at least 16 characters");
        }
        if let Some(s) = &self.auth.introspection_secret {
            if s.expose().chars().count() < 16 {
                bail!("auth.introspection_secret must be at least 16 characters");
            }
        }
        // A hold's timeout: the default within the maximum (else every hold without
        // `timeout_secs` is refused), and the maximum within a year (its expiry is a
        // timestamp in microseconds).
        let (hold_default, hold_max) = (
            self.ledger.hold_default_timeout_secs,
            self.ledger.hold_max_timeout_secs,
        );
        if !(1..=hold_max).contains(&hold_default) || hold_max > 366 * 86_400 {
            bail!(
                "ledger.hold_default_timeout_secs must be between 1 and \
                 ledger.hold_max_timeout_secs, which is at most 366 days"
            );
        }
        self.client_ip_config()?;
        let token_ok = |s: &str, stream: bool| {
            !s.is_empty()
                && s.split('.').all(|t| {
                    !t.is_empty()
                        && t.chars().all(|c| {
                            !c.is_whitespace() && !c.is_control() && !matches!(c, '*' | '>')
                        })
                })
                && !(stream && s.contains(['.', '/', '\\']))
        };
        if !token_ok(&self.nats_subject_prefix, false) {
            bail!("nats_subject_prefix must be dot-separated NATS tokens, without wildcards or spaces");
        }
        if !token_ok(&self.nats_stream, true) {
            bail!("nats_stream must be one NATS token (no dots, slashes, wildcards or spaces)");
        }
        Ok(())
    }

    /// Who may report the client address, and in which header.
    pub fn client_ip_config(&self) -> anyhow::Result<vaultpay_web::ClientIpConfig> {
        let header = vaultpay_web::ForwardedHeader::parse(&self.forwarded_header)
            .map_err(anyhow::Error::msg)?;
        Ok(vaultpay_web::ClientIpConfig::parse(&self.trusted_proxies)
            .map_err(anyhow::Error::msg)?
            .with_header(header))
    }

    pub fn auth_db(&self) -> String {
        match &self.database.auth_url {
            Some(u) => u.expose().to_owned(),
            None => self.data_dir.join("auth.db").display().to_string(),
        }
    }

    pub fn ledger_db(&self) -> String {
        match &self.database.ledger_url {
            Some(u) => u.expose().to_owned(),
            None => self.data_dir.join("ledger.db").display().to_string(),
        }
    }

    /// The effective configuration as TOML, secrets redacted. The database URLs show
    /// where they point (scheme, user, host, port, database), not their password or
    /// query.
    pub fn show(&self) -> anyhow::Result<String> {
        let mut v = toml::Value::try_from(self)?;
        if let Some(db) = v.get_mut("database").and_then(|d| d.as_table_mut()) {
            for (key, url) in [
                ("auth_url", &self.database.auth_url),
                ("ledger_url", &self.database.ledger_url),
            ] {
                if let Some(url) = url {
                    db.insert(
                        key.to_owned(),
                        toml::Value::String(vaultpay_store::redact_url(url.expose())),
                    );
                }
            }
        }
        Ok(toml::to_string_pretty(&v)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A `VAULTPAY_*` variable that names no setting is reported (with the setting a
    /// typo away, if any), not dropped silently; the variables read elsewhere are not.
    #[test]
    fn variables_that_name_no_setting_are_reported() {
        let c = Config::load(
            None,
            env(&[
                ("VAULTPAY_LISTN", "0.0.0.0:9000"),
                ("VAULTPAY_SMTP__PASSWORD", "hunter2"),
                ("VAULTPAY_LOG_FORMATT", "json"),
                ("VAULTPAY_CONFIGX", "x"),
                ("VAULTPAY_LISTEN", "127.0.0.1:9001"),
                ("VAULTPAY_CONFIG", "/etc/vaultpay.toml"),
                ("VAULTPAY_BOOTSTRAP_ADMIN_EMAIL", "a@example.com"),
                ("VAULTPAY_BOOTSTRAP_ADMIN_PASSWORD", "x"),
                ("VAULTPAY_LOG", "debug"),
                ("VAULTPAY_TEST_PG_URL", "postgres://x"),
                ("VAULTPAY_BENCH_SECS", "10"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.ignored_env,
            [
                "VAULTPAY_CONFIGX names no setting and is ignored",
                "VAULTPAY_LISTN names no setting and is ignored (did you mean VAULTPAY_LISTEN?)",
                "VAULTPAY_LOG_FORMATT names no setting and is ignored (did you mean VAULTPAY_LOG_FORMAT?)",
                "VAULTPAY_SMTP__PASSWORD names no setting and is ignored",
            ]
        );
        // the value is not in the warning (it may be a secret)
        assert!(!c.ignored_env.concat().contains("hunter2"));
        // the bootstrap administrator is read with the settings, not shown with them
        assert_eq!(c.bootstrap_admin_email.as_deref(), Some("a@example.com"));
        assert_eq!(
            c.bootstrap_admin_password.as_ref().map(|p| p.expose()),
            Some("x")
        );
        assert!(!c.show().unwrap().contains("a@example.com"));
        assert_eq!(c.listen.to_string(), "127.0.0.1:9001");
        assert_eq!(edit_distance("listn", "listen"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("redis_ur", "redis_url"), 1);
    }

    fn env(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// Every top-level key can be set from the environment (`jwks_refresh_secs` could
    /// not: it was missing from the list).
    #[test]
    fn every_top_level_key_takes_an_env_override() {
        let toml::Value::Table(t) = toml::Value::try_from(Config::default()).unwrap() else {
            panic!("config is a table");
        };
        for key in t.keys() {
            assert!(
                TOP_LEVEL.contains(&key.as_str()),
                "{key} is not overridable"
            );
        }
        let c = Config::load(None, env(&[("VAULTPAY_JWKS_REFRESH_SECS", "42")])).unwrap();
        assert_eq!(c.jwks_refresh_secs, 42);
    }

    #[test]
    fn env_overrides_nested_keys_and_keeps_secrets_as_strings() {
        let c = Config::load(
            None,
            env(&[
                ("VAULTPAY_LISTEN", "0.0.0.0:9000"),
                ("VAULTPAY_AUTH__ACCESS_TOKEN_TTL_SECS", "600"),
                ("VAULTPAY_AUTH__LOCKOUT__THRESHOLD", "3"),
                ("VAULTPAY_MASTER_KEY", "1234"),
                ("VAULTPAY_TEST_PG_URL", "ignored"),
                ("VAULTPAY_BOOTSTRAP_ADMIN_EMAIL", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.auth.access_token_ttl_secs, 600);
        assert_eq!(c.auth.lockout.threshold, 3);
        assert_eq!(c.master_key.unwrap().expose(), "1234");
    }

    #[test]
    fn oauth_lifetimes_are_bounded() {
        for (key, value) in [
            ("VAULTPAY_AUTH__OAUTH__CODE_TTL_SECS", "0"),
            ("VAULTPAY_AUTH__OAUTH__CODE_TTL_SECS", "86400"),
            ("VAULTPAY_AUTH__OAUTH__DEVICE_CODE_TTL_SECS", "-5"),
            ("VAULTPAY_AUTH__OAUTH__ID_TOKEN_TTL_SECS", "99999999"),
        ] {
            let e = Config::load(None, env(&[(key, value)])).unwrap_err();
            assert!(
                format!("{e:#}").contains("auth.oauth."),
                "{key}={value}: {e:#}"
            );
        }
        let c = Config::load(None, env(&[("VAULTPAY_AUTH__OAUTH__CODE_TTL_SECS", "30")])).unwrap();
        assert_eq!(c.auth.oauth.code_ttl_secs, 30);
    }

    #[test]
    fn quotas_and_limits_that_disable_protection_are_refused() {
        let quota = |name: &str, burst: &str, period: &str| {
            vec![
                (format!("VAULTPAY_{name}__BURST"), burst.to_owned()),
                (format!("VAULTPAY_{name}__PERIOD_SECS"), period.to_owned()),
            ]
        };
        let one = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        for (vars, names) in [
            (
                quota("AUTH__RATE_LIMITS__LOGIN_PER_ACCOUNT", "10", "0"),
                "login_per_account",
            ),
            (
                quota("AUTH__RATE_LIMITS__LOGIN_PER_IP", "0", "60"),
                "login_per_ip",
            ),
            (
                quota("AUTH__RATE_LIMITS__RESET_PER_IP", "4000000000", "1"),
                "reset_per_ip",
            ),
            (quota("AUTH__MFA__EMAIL_SEND", "3", "0"), "email_send"),
            (
                one("VAULTPAY_AUTH__LOCKOUT__THRESHOLD", "0"),
                "lockout.threshold",
            ),
            (
                one("VAULTPAY_AUTH__LOCKOUT__MAX_SECS", "1"),
                "lockout.max_secs",
            ),
            (one("VAULTPAY_AUTH__LEEWAY_SECS", "-1"), "leeway_secs"),
            (
                one("VAULTPAY_AUTH__KEY_PUBLISH_AHEAD_SECS", "30"),
                "key_publish_ahead_secs",
            ),
            (
                one("VAULTPAY_AUTH__KEY_PUBLISH_AHEAD_SECS", "-1"),
                "key_publish_ahead_secs",
            ),
            (
                one("VAULTPAY_AUTH__REFRESH_REUSE_GRACE_SECS", "86400"),
                "refresh_reuse_grace_secs",
            ),
            (
                one("VAULTPAY_REQUEST_TIMEOUT_SECS", "0"),
                "request_timeout_secs",
            ),
            (
                one("VAULTPAY_DATABASE__MAX_CONNECTIONS", "0"),
                "max_connections",
            ),
            (
                one("VAULTPAY_AUTH__ME_CACHE_TTL_MS", "3600000"),
                "me_cache_ttl_ms",
            ),
            (
                one("VAULTPAY_AUTH__PASSWORD_POLICY__MIN_LENGTH", "4"),
                "min_length",
            ),
            (
                one("VAULTPAY_AUTH__PASSWORD_POLICY__MAX_LENGTH", "10"),
                "max_length",
            ),
            (
                one("VAULTPAY_AUTH__PASSWORD_POLICY__MIN_ZXCVBN_SCORE", "5"),
                "min_zxcvbn_score",
            ),
            (
                one("VAULTPAY_AUTH__IP_TRUST__IPV4_PREFIX", "0"),
                "ipv4_prefix",
            ),
            (one("VAULTPAY_LEDGER__PAGE_SIZE_MAX", "0"), "page_size_max"),
            (
                one("VAULTPAY_LEDGER__STATEMENT_MAX_ROWS", "0"),
                "statement_max_rows",
            ),
            (
                vec![
                    ("VAULTPAY_AUTH__HIBP__ENABLED".to_owned(), "true".to_owned()),
                    (
                        "VAULTPAY_AUTH__HIBP__BASE_URL".to_owned(),
                        "http://hibp.example".to_owned(),
                    ),
                ],
                "hibp.base_url",
            ),
        ] {
            let e = Config::load(None, vars.clone()).unwrap_err();
            assert!(format!("{e:#}").contains(names), "{vars:?}: {e:#}");
        }
        let c = Config::load(None, quota("AUTH__RATE_LIMITS__LOGIN_PER_IP", "100", "60")).unwrap();
        assert_eq!(c.auth.rate_limits.login_per_ip.burst, 100);
    }

    #[test]
    fn config_errors_do_not_quote_secrets() {
        let dir = std::env::temp_dir().join(format!("vp-cfg-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        // A syntax error on a secret's line: the position, not the line.
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:1\"\nmaster_key = 00ab99ff-secret\n",
        )
        .unwrap();
        let e = format!("{:#}", Config::load(Some(&f), vec![]).unwrap_err());
        assert!(!e.contains("00ab99ff"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        // A secret of the wrong type: named, not quoted.
        std::fs::write(
            &f,
            "master_key = 1234567\n[auth]\nintrospection_secret = 98765432\n",
        )
        .unwrap();
        let e = format!("{:#}", Config::load(Some(&f), vec![]).unwrap_err());
        assert!(!e.contains("1234567") && !e.contains("98765432"), "{e}");
        assert!(e.contains("must be a string"), "{e}");
    }

    #[test]
    fn upstream_providers_are_checked_at_load() {
        let n = std::sync::atomic::AtomicUsize::new(0);
        let file = |body: &str| {
            let p = std::env::temp_dir().join(format!(
                "vaultpay-upstream-{}-{}.toml",
                std::process::id(),
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            std::fs::write(&p, body).unwrap();
            p
        };
        let provider = |extra: &str| {
            format!(
                "[auth.oauth.upstream.corp]\ndisplay_name = \"Corp\"\nclient_id = \"c\"\n\
                 client_secret = \"s\"\n{extra}\n"
            )
        };
        for (what, extra) in [
            (
                "unknown kind",
                "kind = \"saml\"\nissuer = \"https://idp.example\"",
            ),
            ("oidc without issuer", "kind = \"oidc\""),
            (
                "clear-text issuer",
                "kind = \"oidc\"\nissuer = \"http://idp.example\"",
            ),
            (
                "clear-text token url",
                "kind = \"github\"\ntoken_url = \"http://10.1.1.1/token\"",
            ),
        ] {
            let p = file(&provider(extra));
            let e = Config::load(Some(&p), env(&[])).unwrap_err();
            std::fs::remove_file(&p).unwrap();
            assert!(
                format!("{e:#}").contains("auth.oauth.upstream.corp"),
                "{what}: {e:#}"
            );
        }
        for extra in [
            "kind = \"oidc\"\nissuer = \"https://idp.example\"",
            "kind = \"oidc\"\nissuer = \"http://127.0.0.1:9000\"",
            "kind = \"github\"",
        ] {
            let p = file(&provider(extra));
            let c = Config::load(Some(&p), env(&[]));
            std::fs::remove_file(&p).unwrap();
            c.unwrap();
        }
    }

    #[test]
    fn a_metrics_token_is_a_secret_of_16_characters_or_more() {
        let c = Config::load(None, env(&[("VAULTPAY_METRICS_TOKEN", "1234567890123456")])).unwrap();
        assert_eq!(c.metrics_token.unwrap().expose(), "1234567890123456");
        let e = Config::load(None, env(&[("VAULTPAY_METRICS_TOKEN", "short")])).unwrap_err();
        assert!(format!("{e:#}").contains("metrics_token"), "{e:#}");
    }

    #[test]
    fn a_short_introspection_secret_is_refused() {
        for short in ["", "fifteen-chars!!"] {
            let e = Config::load(None, env(&[("VAULTPAY_AUTH__INTROSPECTION_SECRET", short)]))
                .unwrap_err();
            assert!(format!("{e:#}").contains("introspection_secret"), "{e:#}");
        }
        let c = Config::load(
            None,
            env(&[("VAULTPAY_AUTH__INTROSPECTION_SECRET", "sixteen-chars!!!")]),
        )
        .unwrap();
        assert!(c.auth.introspection_secret.is_some());
    }

    #[test]
    fn hold_timeouts_must_be_ordered_and_bounded() {
        for (default, max) in [("0", "60"), ("120", "60"), ("60", "99999999999")] {
            let e = Config::load(
                None,
                env(&[
                    ("VAULTPAY_LEDGER__HOLD_DEFAULT_TIMEOUT_SECS", default),
                    ("VAULTPAY_LEDGER__HOLD_MAX_TIMEOUT_SECS", max),
                ]),
            )
            .unwrap_err();
            assert!(
                format!("{e:#}").contains("hold_default_timeout_secs"),
                "{default}/{max}: {e:#}"
            );
        }
        let c = Config::load(
            None,
            env(&[
                ("VAULTPAY_LEDGER__HOLD_DEFAULT_TIMEOUT_SECS", "60"),
                ("VAULTPAY_LEDGER__HOLD_MAX_TIMEOUT_SECS", "3600"),
            ]),
        )
        .unwrap();
        assert_eq!(c.ledger.hold_max_timeout_secs, 3600);
    }

    #[test]
    fn show_redacts_secrets() {
        let c = Config::load(
            None,
            env(&[
                ("VAULTPAY_MASTER_KEY", "supersecretvalue"),
                ("VAULTPAY_DATABASE__AUTH_URL", "postgres://u:pw@h/db"),
            ]),
        )
        .unwrap();
        let shown = c.show().unwrap();
        assert!(
            !shown.contains("supersecretvalue") && !shown.contains("pw@h"),
            "{shown}"
        );
        assert!(shown.contains("**redacted**"));
        // where the database is stays readable
        assert!(
            shown.contains("auth_url = \"postgres://u:**redacted**@h/db\""),
            "{shown}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = std::env::temp_dir().join(format!("vp-cfg-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:1\"\n[auth]\naccess_token_ttl = 5\n",
        )
        .unwrap();
        assert!(Config::load(Some(&f), vec![]).is_err());
        std::fs::write(&f, "[auth.argon2]\nm_cost_kib = 1024\n").unwrap();
        assert!(
            Config::load(Some(&f), vec![]).is_err(),
            "weak argon2 refused"
        );
        let secret = dir.join("key");
        std::fs::write(&secret, "abcd\n").unwrap();
        let c = Config::load(
            None,
            env(&[("VAULTPAY_MASTER_KEY_FILE", secret.to_str().unwrap())]),
        )
        .unwrap();
        assert_eq!(c.master_key.unwrap().expose(), "abcd");
    }

    /// A `_FILE` variable is read as its plain variable would be: a number, a boolean
    /// or a list from a file configures the typed setting; a secret stays exactly the
    /// text written, whatever it looks like.
    #[test]
    fn file_variables_are_typed_like_plain_ones() {
        let dir = std::env::temp_dir().join(format!("vp-cfg-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let f = dir.join(name);
            std::fs::write(&f, text).unwrap();
            f.to_str().unwrap().to_owned()
        };
        let vars = [
            (
                "VAULTPAY_AUTH__ACCESS_TOKEN_TTL_SECS_FILE",
                file("ttl", "700\n"),
            ),
            ("VAULTPAY_AUTH__HIBP__ENABLED_FILE", file("hibp", "true\n")),
            (
                "VAULTPAY_TRUSTED_PROXIES_FILE",
                file("proxies", "[\"10.0.0.0/8\"]"),
            ),
            ("VAULTPAY_MASTER_KEY_FILE", file("key", "\"1234\"\n")),
            (
                "VAULTPAY_AUTH__INTROSPECTION_SECRET",
                "12345678901234567".to_owned(),
            ),
        ];
        let c = Config::load(None, vars.iter().map(|(k, v)| ((*k).to_owned(), v.clone()))).unwrap();
        assert_eq!(c.auth.access_token_ttl_secs, 700);
        assert!(c.auth.hibp.enabled);
        assert_eq!(c.trusted_proxies, vec!["10.0.0.0/8".to_owned()]);
        assert_eq!(c.master_key.unwrap().expose(), "\"1234\"");
        let secret = c.auth.introspection_secret.as_ref().map(|s| s.expose());
        assert_eq!(secret, Some("12345678901234567"));
    }
}
