//! `TestApp`: the real server, started in-process on a free port with fresh databases.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::PathBuf;
use vaultpay_server::{Config, Mode, Running};
use vaultpay_store::Backend;

pub const PASSWORD: &str = "correct-Horse-battery-staple-42";

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub cfg: Config,
    pub running: Option<Running>,
    /// The bootstrap admin's stepped-up tokens, once `admin_mfa` has enrolled TOTP.
    pub admin_mfa: tokio::sync::OnceCell<Tokens>,
}

/// A response read once: status, headers and JSON body (Null when not JSON).
pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an RFC 9457 problem with this status and code.
    #[track_caller]
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "body: {}",
            self.text
        );
        assert_eq!(self.body["code"], code, "body: {}", self.text);
        assert_eq!(self.body["status"], status);
        assert!(self.body["title"].is_string());
    }
}

pub fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir()
        .join("vaultpay-tests")
        .join(uuid::Uuid::now_v7().to_string());
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Two replicas sharing one PostgreSQL database, one master key and one Redis
/// (`redis_url`), each with `tweak` applied; `None` (with a notice) when the test
/// environment names no PostgreSQL or no Redis.
#[cfg(feature = "redis")]
pub async fn two_replicas(tweak: impl Fn(&mut Config)) -> Option<(TestApp, TestApp)> {
    let Ok(url) = std::env::var("VAULTPAY_TEST_REDIS_URL") else {
        eprintln!("note: VAULTPAY_TEST_REDIS_URL is not set; skipped");
        return None;
    };
    if !vaultpay_store::testing::backends().contains(&Backend::Postgres) {
        eprintln!("note: VAULTPAY_TEST_PG_URL is not set; skipped");
        return None;
    }
    let both = |c: &mut Config| {
        c.redis_url = Some(vaultpay_core::secret::Secret::new(url.clone()));
        tweak(c);
    };
    let one = TestApp::spawn_with(Backend::Postgres, both).await;
    let mut cfg2 = test_config(Backend::Postgres).await;
    both(&mut cfg2);
    cfg2.database = one.cfg.database.clone();
    cfg2.master_key = one.cfg.master_key.clone();
    let two = TestApp::start(cfg2).await;
    Some((one, two))
}

/// A test config: free port, fresh data dir and databases on `backend`.
pub async fn test_config(backend: Backend) -> Config {
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: temp_dir(),
        ..Config::default()
    };
    let auth = vaultpay_store::testing::fresh_location(backend)
        .await
        .unwrap();
    let ledger = vaultpay_store::testing::fresh_location(backend)
        .await
        .unwrap();
    cfg.database.auth_url = Some(vaultpay_core::secret::Secret::new(auth));
    cfg.database.ledger_url = Some(vaultpay_core::secret::Secret::new(ledger));
    cfg.database.sqlite_synchronous_full = false;
    cfg.database.max_connections = 8;
    if backend == Backend::Postgres {
        cfg.master_key = Some(vaultpay_core::secret::Secret::new(
            vaultpay_core::crypto::MasterKey::generate()
                .to_hex()
                .to_string(),
        ));
    }
    cfg
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, |_| {}).await
    }

    pub async fn spawn_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let mut cfg = test_config(backend).await;
        tweak(&mut cfg);
        Self::start(cfg).await
    }

    pub async fn start(cfg: Config) -> TestApp {
        let bootstrap = vaultpay_auth::Bootstrap {
            admin_email: Some("admin@example.com".into()),
            admin_password: Some(vaultpay_core::secret::Secret::new(PASSWORD)),
        };
        let running = vaultpay_server::start(cfg.clone(), Mode::All, bootstrap)
            .await
            .expect("server starts");
        let base = format!("http://{}", running.addr);
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        TestApp {
            base,
            http,
            cfg,
            running: Some(running),
            admin_mfa: Default::default(),
        }
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.unwrap();
        }
    }

    pub fn auth(&self) -> &vaultpay_auth::AuthService {
        self.running.as_ref().unwrap().auth.as_ref().unwrap()
    }

    pub fn auth_db(&self) -> &vaultpay_store::Db {
        self.auth().db()
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        read(req.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.send(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Resp {
        self.send(Method::POST, path, token, Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Resp {
        self.send(Method::DELETE, path, token, None).await
    }

    /// Sends a raw body with a content type.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Resp {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body);
        read(req.send().await.unwrap()).await
    }

    /// `POST /oauth/token` with form fields.
    pub async fn token_form(&self, fields: &[(&str, &str)]) -> Resp {
        let req = self
            .http
            .post(format!("{}/oauth/token", self.base))
            .form(fields);
        read(req.send().await.unwrap()).await
    }

    pub async fn register(&self, email: &str) -> Resp {
        self.post(
            "/v1/auth/register",
            None,
            json!({ "email": email, "password": PASSWORD, "name": "Test User" }),
        )
        .await
    }

    pub async fn login_device(&self, email: &str, password: &str, device: &str) -> Resp {
        self.post(
            "/v1/auth/login",
            None,
            json!({ "email": email, "password": password, "device": { "id": device, "name": format!("{device} laptop") } }),
        )
        .await
    }

    /// Opens a wallet in `currency` as the holder of `token`; returns its id.
    pub async fn open_wallet(&self, token: &str, currency: &str) -> String {
        let r = self
            .post(
                "/v1/accounts",
                Some(token),
                json!({ "currency": currency, "kind": "current", "name": "wallet" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.body["id"].as_str().unwrap().to_owned()
    }

    /// Registers (if needed) and logs in; returns (access, refresh, session id).
    pub async fn user(&self, email: &str) -> Tokens {
        let r = self.register(email).await;
        assert!(
            r.status == StatusCode::CREATED || r.status == StatusCode::CONFLICT,
            "{}",
            r.text
        );
        self.login(email, PASSWORD).await
    }

    pub async fn login(&self, email: &str, password: &str) -> Tokens {
        let r = self.login_device(email, password, "dev-1").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        Tokens {
            access: r.body["access_token"].as_str().unwrap().to_owned(),
            refresh: r.body["refresh_token"].as_str().unwrap().to_owned(),
            session: r.body["session_id"].as_str().unwrap().to_owned(),
        }
    }

    /// The bootstrap admin's tokens: a password sign-in, or the stepped-up session of
    /// `admin_mfa` once that has enrolled a second factor.
    pub async fn admin(&self) -> Tokens {
        if let Some(t) = self.admin_mfa.get() {
            return t.clone();
        }
        self.login("admin@example.com", PASSWORD).await
    }

    /// The bootstrap admin with a fresh second factor, as role changes require; the
    /// first call enrols it (`with_mfa`), later calls reuse that session (TOTP codes
    /// are single use per 30 s step, so signing in again at once would need a wait).
    pub async fn admin_mfa(&self) -> Tokens {
        self.admin_mfa
            .get_or_init(|| self.with_mfa("admin@example.com"))
            .await
            .clone()
    }

    /// Signs `email` in, enrols TOTP through the API and steps up with a recovery
    /// code: tokens showing a fresh second factor. Once per user: afterwards its
    /// logins need the second factor.
    pub async fn with_mfa(&self, email: &str) -> Tokens {
        use vaultpay_core::totp;
        let t = self.login(email, PASSWORD).await;
        let r = self.post("/v1/mfa/totp", Some(&t.access), json!({})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let secret = totp::base32_decode(r.body["secret"].as_str().unwrap()).unwrap();
        let now = vaultpay_core::time::now_micros() / 1_000_000;
        // the current step's code stays inside the server's ±1 window even if a step
        // boundary passes before the request arrives
        let code = totp::code_for_step(&secret, totp::step_of(now, 30), 6);
        let r = self
            .post(
                "/v1/mfa/totp/confirm",
                Some(&t.access),
                json!({ "code": code }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let recovery = r.body["recovery_codes"][0].as_str().unwrap().to_owned();
        let r = self
            .post(
                "/v1/auth/step-up",
                Some(&t.access),
                json!({ "code": recovery, "method": "recovery_code" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        Tokens {
            access: r.body["access_token"].as_str().unwrap().to_owned(),
            ..t
        }
    }

    /// Mail files written to the outbox, oldest first.
    pub fn mails(&self) -> Vec<String> {
        let dir = self.cfg.data_dir.join("mail");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "eml"));
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }

    /// Counts rows of a table in the auth database.
    pub async fn count(&self, table: &str) -> i64 {
        self.count_where(table, "1 = 1").await
    }

    /// Rows of an AuthShield table matching a (test-written) SQL condition.
    pub async fn count_where(&self, table: &str, condition: &str) -> i64 {
        use sqlx::Row;
        sqlx::query(&format!(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM {table} WHERE {condition}"
        ))
        .fetch_one(self.auth_db().read())
        .await
        .unwrap()
        .get::<i64, _>("n")
    }
}

#[derive(Debug, Clone)]
pub struct Tokens {
    pub access: String,
    pub refresh: String,
    pub session: String,
}

pub async fn read(res: reqwest::Response) -> Resp {
    let status = res.status();
    let headers = res.headers().clone();
    let text = res.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        body,
        text,
    }
}

/// Runs `f` once per configured backend.
#[macro_export]
macro_rules! each_backend {
    ($f:expr) => {
        for backend in vaultpay_store::testing::backends() {
            eprintln!("-- backend {backend:?}");
            $f(backend).await;
        }
    };
}

/// A ledger `POST` with a bearer token and an `Idempotency-Key`.
pub async fn ledger_post(
    app: &TestApp,
    path: &str,
    token: &str,
    key: &str,
    body: serde_json::Value,
) -> Resp {
    read(
        app.http
            .post(format!("{}{path}", app.base))
            .bearer_auth(token)
            .header("idempotency-key", key)
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// PostgreSQL: runs `sign_in` while the user's row is held by a transaction of the
/// test; once a statement of the sign-in whose text contains `blocked_at` waits for
/// that row (it has matched the old password by then), the password changes in that
/// transaction, which commits. Returns the sign-in's answer.
pub async fn sign_in_while_the_password_changes<F>(
    app: &TestApp,
    user_id: &str,
    blocked_at: &str,
    sign_in: F,
) -> Resp
where
    F: std::future::Future<Output = Resp>,
{
    let mut change = app.auth_db().writer().begin().await.unwrap();
    sqlx::query("SELECT id FROM users WHERE id = $1 FOR NO KEY UPDATE")
        .bind(user_id)
        .fetch_one(&mut *change)
        .await
        .unwrap();
    let change_when_blocked = async {
        until_waiting_at(app, blocked_at).await;
        sqlx::query("UPDATE users SET password_hash = 'changed-meanwhile' WHERE id = $1")
            .bind(user_id)
            .execute(&mut *change)
            .await
            .unwrap();
        change.commit().await.unwrap();
    };
    let (r, ()) = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        futures::future::join(sign_in, change_when_blocked),
    )
    .await
    .unwrap_or_else(|_| panic!("the sign-in never waited at {blocked_at:?}"));
    r
}

/// A `vaultpay` process started by a test; killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Option<std::process::Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts the real binary with `args` and `env`, appending its output to `log`.
    pub fn spawn(args: &[&str], env: &[(&str, String)], log: PathBuf) -> Proc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vaultpay"));
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc {
            child: Some(cmd.spawn().unwrap()),
            log,
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        c.wait().unwrap()
    }

    /// Polls `/readyz` until it answers 200 (bounded; fails if the process exits).
    pub async fn wait_ready(&mut self, http: &reqwest::Client, base: &str) {
        for _ in 0..600 {
            if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(c) = self.child.as_mut() {
                assert!(
                    c.try_wait().unwrap().is_none(),
                    "server exited; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("{base} never became ready; see {}", self.log.display());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// PostgreSQL: the text of this test's auth database's statements waiting for a lock
/// (tests run side by side on one server).
async fn waiting_statements(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity \
         WHERE wait_event_type = 'Lock' AND datname = current_database()",
    )
    .fetch_all(app.auth_db().read())
    .await
    .unwrap()
}

/// PostgreSQL: waits until a statement whose text contains `text` waits for a lock.
pub async fn until_waiting_at(app: &TestApp, text: &str) {
    while !waiting_statements(app)
        .await
        .iter()
        .any(|q| q.contains(text))
    {
        tokio::task::yield_now().await;
    }
}

/// PostgreSQL: runs `first` and then `second` in that order on `user_id`'s row. A
/// transaction of the test holds the row; `first` starts, and once it waits for a lock
/// (or has answered without waiting), `second` starts; once that waits too (or has
/// answered), the row is released, and PostgreSQL grants it to the waiters in the
/// order they queued. Returns both answers.
pub async fn one_after_the_other<A, B>(
    app: &TestApp,
    user_id: &str,
    first: A,
    second: B,
) -> (Resp, Resp)
where
    A: std::future::Future<Output = Resp>,
    B: std::future::Future<Output = Resp>,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut holder = app.auth_db().writer().begin().await.unwrap();
    sqlx::query("SELECT id FROM users WHERE id = $1 FOR NO KEY UPDATE")
        .bind(user_id)
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    // how many of the two have answered
    let answered = AtomicUsize::new(0);
    // until `n` steps wait for a lock or have answered
    let settled = |n: usize| {
        let answered = &answered;
        async move {
            while waiting_statements(app).await.len() + answered.load(Ordering::SeqCst) < n {
                tokio::task::yield_now().await;
            }
        }
    };
    let first = async {
        let r = first.await;
        answered.fetch_add(1, Ordering::SeqCst);
        r
    };
    let second = async {
        settled(1).await;
        let r = second.await;
        answered.fetch_add(1, Ordering::SeqCst);
        r
    };
    let release = async {
        settled(2).await;
        holder.rollback().await.unwrap();
    };
    let (a, b, ()) = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        futures::future::join3(first, second, release),
    )
    .await
    .expect("the steps neither waited nor answered");
    (a, b)
}

/// A form post of `fields` to `path` with `headers`.
async fn form_post_with(
    app: &TestApp,
    path: &str,
    headers: &[(&str, &str)],
    fields: &[(&str, &str)],
) -> Resp {
    let mut req = app.http.post(format!("{}{path}", app.base)).form(fields);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    read(req.send().await.unwrap()).await
}

/// A browser submitting one of the mailed links' pages: the form's fields, with the
/// headers of a browser's form submission (a navigation).
pub async fn browser_post(app: &TestApp, path: &str, fields: &[(&str, &str)]) -> Resp {
    let headers = [
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("sec-fetch-mode", "navigate"),
        ("sec-fetch-dest", "document"),
    ];
    form_post_with(app, path, &headers, fields).await
}

/// An HTTP library that asks for HTML by default (Java's `HttpURLConnection` does),
/// posting the same form: not a browser.
pub async fn html_accepting_client_post(
    app: &TestApp,
    path: &str,
    fields: &[(&str, &str)],
) -> Resp {
    let accept = (
        "accept",
        "text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2",
    );
    form_post_with(app, path, &[accept], fields).await
}

/// Asserts that `r` is a page (not JSON) with `status` and the heading `title`, served
/// with the pages' content security policy.
pub fn assert_page(r: &Resp, status: u16, title: &str) {
    assert_eq!(r.status.as_u16(), status, "{}", r.text);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{:?}",
        r.header("content-type")
    );
    assert!(r.header("content-security-policy").is_some());
    assert!(r.text.contains(&format!("<h1>{title}</h1>")), "{}", r.text);
}
