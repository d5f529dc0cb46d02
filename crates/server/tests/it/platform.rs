//! The platform: health, metrics, OpenAPI, docs, request ids, problem documents.

use crate::each_backend;
use crate::helpers::*;
use vaultpay_store::Backend;

#[tokio::test]
async fn health_ready_metrics_openapi_docs() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        assert_eq!(app.get("/healthz", None).await.body["status"], "ok");
        assert_eq!(app.get("/readyz", None).await.body["status"], "ready");
        let doc = app.get("/openapi.json", None).await;
        assert!(doc.body["openapi"].as_str().unwrap().starts_with("3.1"));
        assert!(doc.body["paths"]["/v1/auth/login"].is_object());
        assert!(doc.body["paths"]["/v1/auth/login/complete"].is_object());
        assert!(doc.body["paths"]["/v1/me/trusted-networks"].is_object());
        // error responses are documented as the problem documents they are
        let transfer_422 = &doc.body["paths"]["/v1/transfers"]["post"]["responses"]["422"];
        assert!(
            transfer_422["content"]["application/problem+json"].is_object(),
            "{transfer_422}"
        );
        let mut problems = 0;
        for item in doc.body["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                for (status, r) in op["responses"].as_object().into_iter().flatten() {
                    assert!(
                        r["description"].as_str().is_some_and(|d| !d.is_empty()),
                        "{status}: no description"
                    );
                    let json = &r["content"]["application/json"]["schema"]["$ref"];
                    assert!(
                        !json.as_str().is_some_and(|s| s.ends_with("/Problem")),
                        "{status}: a Problem documented as application/json"
                    );
                    problems += r["content"]["application/problem+json"].is_object() as usize;
                }
            }
        }
        assert!(problems > 90, "{problems}");
        // the ledger's routes say they need a bearer token, and document its 401
        let accounts = &doc.body["paths"]["/v1/accounts"]["get"];
        assert_eq!(
            accounts["security"][0]["bearer"],
            serde_json::json!([]),
            "{accounts}"
        );
        assert!(accounts["responses"]["401"].is_object(), "{accounts}");
        // query parameters are documented as query parameters, optional where they are
        let limit = doc.body["paths"]["/v1/admin/audit"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "limit")
            .cloned()
            .unwrap();
        assert_eq!(limit["in"], "query", "{limit}");
        assert_ne!(limit["required"], true, "{limit}");
        let docs = app.get("/docs", None).await;
        assert!(docs.text.contains("<title>VaultPay API</title>"));
        app.login_device("nobody@example.com", "wrong-password-123", "d")
            .await;
        let m = app.get("/metrics", None).await;
        assert!(m.text.contains("http_requests_total"), "{}", m.text);
        assert!(m.text.contains("auth_logins_total"), "{}", m.text);
        assert!(
            m.text.contains("http_request_duration_seconds_bucket"),
            "{}",
            m.text
        );
        app.stop().await;
    });
}

/// The ledger's counters of committed work reach `/metrics` through the tally flushed
/// at commit: a posted deposit and transfer, a refused transfer.
#[tokio::test]
async fn ledger_counters_reach_metrics() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let admin = app.admin().await.access;
    let u = app.user("counted@example.com").await;
    let open = |token: String| {
        let app = &app;
        async move {
            let r = app
                .post(
                    "/v1/accounts",
                    Some(&token),
                    serde_json::json!({ "currency": "USD", "kind": "current", "name": "m" }),
                )
                .await;
            assert_eq!(r.status, reqwest::StatusCode::CREATED, "{}", r.text);
            r.body["id"].as_str().unwrap().to_owned()
        }
    };
    let a = open(u.access.clone()).await;
    let b = open(app.user("payee2@example.com").await.access).await;
    let r = ledger_post(
        &app,
        "/v1/admin/deposits",
        &admin,
        "c-dep",
        serde_json::json!({ "account_id": a, "amount": 100, "currency": "USD", "reference": "r" }),
    )
    .await;
    assert_eq!(r.status, reqwest::StatusCode::CREATED, "{}", r.text);
    let transfer = |amount: i64, key: &'static str| {
        ledger_post(
            &app,
            "/v1/transfers",
            &u.access,
            key,
            serde_json::json!({ "from_account_id": a, "to_account_id": b, "amount": amount, "currency": "USD", "description": "" }),
        )
    };
    assert_eq!(
        transfer(40, "c-t1").await.status,
        reqwest::StatusCode::CREATED
    );
    transfer(1_000, "c-t2")
        .await
        .assert_problem(422, "insufficient_funds");
    let m = app.get("/metrics", None).await.text;
    for line in [
        "ledger_transfers_total{kind=\"deposit\"}",
        "ledger_transfers_total{kind=\"transfer\"}",
        "ledger_failed_transfers_total{reason=\"insufficient_funds\"}",
    ] {
        assert!(m.contains(line), "{line} missing from {m}");
    }
    // every metric served says what it counts
    let helped: std::collections::HashSet<&str> = m
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let typed: Vec<&str> = m
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(typed.len() >= 5, "{m}");
    for name in typed {
        assert!(helped.contains(name), "{name} has no # HELP line in {m}");
    }
    app.stop().await;
}

#[tokio::test]
async fn request_id_is_echoed_and_in_problems() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let res = app
        .http
        .get(format!("{}/nope", app.base))
        .header("x-request-id", "my-req-123")
        .send()
        .await
        .unwrap();
    let r = read(res).await;
    r.assert_problem(404, "route_not_found");
    assert_eq!(r.header("x-request-id"), Some("my-req-123"));
    assert_eq!(r.body["request_id"], "my-req-123");
    // generated when absent or invalid
    let res = app
        .http
        .get(format!("{}/healthz", app.base))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    let id = res
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(id, "bad id with spaces");
    assert_eq!(id.len(), 36);
    assert_eq!(
        res.headers().get("x-content-type-options").unwrap(),
        "nosniff"
    );
    let r = app
        .send(reqwest::Method::PUT, "/v1/auth/login", None, None)
        .await;
    r.assert_problem(405, "method_not_allowed");
    app.stop().await;
}

/// AuthShield's database cannot be reached: a sign-in answers 503
/// `service_unavailable` with `Retry-After` (not 500), and `/readyz` says so.
#[tokio::test]
async fn an_unreachable_database_answers_503() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.register("down@example.com").await;
    app.auth_db().close().await;
    let r = app
        .login_device("down@example.com", PASSWORD, "laptop-1")
        .await;
    r.assert_problem(503, "service_unavailable");
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    assert_eq!(app.get("/readyz", None).await.status.as_u16(), 503);
}

/// A request with a method of its own invention is counted under `method="other"`:
/// label values are series kept for the process's lifetime, so a client inventing
/// methods must not be able to add them.
#[tokio::test]
async fn invented_methods_do_not_grow_the_metrics() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    for i in 0..20 {
        let m = reqwest::Method::from_bytes(format!("FOO{i}").as_bytes()).unwrap();
        let r = app
            .http
            .request(m, format!("{}/healthz", app.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    app.get("/healthz", None).await;
    let m = app.get("/metrics", None).await.text;
    assert!(!m.contains("FOO"), "{m}");
    assert!(m.contains("method=\"other\""), "{m}");
    assert!(m.contains("method=\"GET\""), "{m}");
}

/// Embedded mode generates the master key once; a restart that finds the key file gone
/// while the database holds secrets sealed with it refuses to start (a new key would
/// leave the signing keys unreadable and existing accounts unfindable) and writes no
/// new key. With the file back, it starts.
#[tokio::test]
async fn a_lost_master_key_is_not_silently_replaced() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let cfg = app.cfg.clone();
    app.stop().await;
    let key = cfg.data_dir.join("master.key");
    let saved = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    let bootstrap = vaultpay_auth::Bootstrap {
        admin_email: None,
        admin_password: None,
    };
    let err = match vaultpay_server::start(cfg.clone(), vaultpay_server::Mode::All, bootstrap).await
    {
        Ok(_) => panic!("started with a new master key over sealed data"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("restore master.key"), "{err}");
    assert!(!key.exists(), "no new key was written");
    std::fs::write(&key, saved).unwrap();
    TestApp::start(cfg).await.stop().await;
}

/// One server per SQLite database: a second server started on the same data directory
/// refuses to start, naming the database and the first server's pid, while the first
/// goes on serving; once the first has stopped, the next one starts. (A killed
/// server's lock goes with its process: the crash test restarts after `SIGKILL`.)
#[tokio::test]
async fn a_second_server_on_the_same_sqlite_files_refuses_to_start() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let cfg = app.cfg.clone();
    let bootstrap = || vaultpay_auth::Bootstrap {
        admin_email: None,
        admin_password: None,
    };
    for mode in [vaultpay_server::Mode::All, vaultpay_server::Mode::Auth] {
        let err = match vaultpay_server::start(cfg.clone(), mode, bootstrap()).await {
            Ok(_) => panic!("a second server started on the same SQLite files ({mode:?})"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("is in use by another vaultpay server"),
            "{err}"
        );
        assert!(
            err.contains(&format!("(pid {})", std::process::id())),
            "{err}"
        );
    }
    assert_eq!(app.get("/healthz", None).await.status, 200);
    app.stop().await;
    TestApp::start(cfg).await.stop().await;
}

/// Shutdown does not wait on a client still sending its request head: a connection
/// answering no request is closed at once, whatever the header and request timeouts
/// (an hour each here). (The 60 s bound keeps a regression, which would wait the
/// hour, from hanging the suite.)
#[tokio::test]
async fn shutdown_does_not_wait_for_a_half_sent_request_head() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn_with(Backend::Sqlite, |c| {
        c.header_read_timeout_secs = 3600;
        c.request_timeout_secs = 3600;
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // the server has the connection (a request after it on another is answered)
    assert_eq!(app.get("/healthz", None).await.status.as_u16(), 200);
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(60), app.stop()).await;
    assert!(stopped.is_ok(), "shutdown waited on the half-sent head");
    drop(slow);
}

/// A client that opens a connection and trickles an incomplete request head (or goes
/// idle between keep-alive requests) is disconnected after `header_read_timeout_secs`
/// instead of holding the connection for good; a whole request on a fresh connection
/// is answered. (The 30 s bound only keeps a regression from hanging the suite.)
#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(Backend::Sqlite, |c| c.header_read_timeout_secs = 1).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        slow.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "the connection is still open");
    assert!(
        buf.is_empty() || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    // idle after one request on a keep-alive connection: closed as well
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        idle.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "the idle connection is still open");
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    app.stop().await;
}

/// Personal and financial answers are not kept by caches: `/v1/me`, an account, its
/// history and its CSV statement say `Cache-Control: no-store`; the public key set
/// keeps the caching it asks for.
#[tokio::test]
async fn personal_answers_are_not_cached() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let u = app.user("uncached@example.com").await;
    let a = app.open_wallet(&u.access, "USD").await;
    for path in [
        "/v1/me".to_owned(),
        "/v1/sessions".to_owned(),
        format!("/v1/accounts/{a}"),
        "/v1/accounts".to_owned(),
        format!("/v1/accounts/{a}/transactions"),
        format!("/v1/accounts/{a}/statement.csv"),
    ] {
        let r = app.get(&path, Some(&u.access)).await;
        assert!(r.status.is_success(), "{path}: {}", r.text);
        assert_eq!(r.header("cache-control"), Some("no-store"), "{path}");
    }
    let jwks = app.get("/.well-known/jwks.json", None).await;
    assert_eq!(jwks.header("cache-control"), Some("public, max-age=60"));
    app.stop().await;
}

/// With `metrics_token` set, `/metrics` (lockouts, reuse detections, admin activity)
/// answers only a request bearing that token.
#[tokio::test]
async fn metrics_can_require_a_token() {
    let token = "metrics-token-0123456789";
    let app = TestApp::spawn_with(Backend::Sqlite, |c| {
        c.metrics_token = Some(vaultpay_core::secret::Secret::new(token));
    })
    .await;
    app.get("/metrics", None)
        .await
        .assert_problem(401, "missing_token");
    app.get("/metrics", Some("metrics-token-0123456780"))
        .await
        .assert_problem(401, "invalid_token");
    let m = app.get("/metrics", Some(token)).await;
    assert_eq!(m.status, reqwest::StatusCode::OK, "{}", m.text);
    assert!(m.text.contains("http_requests_total"), "{}", m.text);
    // health and readiness stay open
    assert_eq!(
        app.get("/healthz", None).await.status,
        reqwest::StatusCode::OK
    );
    assert_eq!(
        app.get("/readyz", None).await.status,
        reqwest::StatusCode::OK
    );
    app.stop().await;
}

/// The bootstrap administrator's credentials can come from files, as every secret can
/// (`VAULTPAY_BOOTSTRAP_ADMIN_PASSWORD_FILE`, e.g. a mounted secret ending in a line
/// break): the server signs in with the file's password, not a generated one.
#[tokio::test]
async fn the_bootstrap_password_can_come_from_a_file() {
    let dir = temp_dir();
    let secret = dir.join("admin-password");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&secret, format!("{PASSWORD}\n")).unwrap();
    let port = free_port();
    let mut server = Proc::spawn(
        &["serve", "--listen", &format!("127.0.0.1:{port}")],
        &[
            ("VAULTPAY_DATA_DIR", dir.join("data").display().to_string()),
            ("VAULTPAY_DATABASE__SQLITE_SYNCHRONOUS_FULL", "false".into()),
            ("VAULTPAY_BOOTSTRAP_ADMIN_EMAIL", "boot@example.com".into()),
            (
                "VAULTPAY_BOOTSTRAP_ADMIN_PASSWORD_FILE",
                secret.display().to_string(),
            ),
            ("VAULTPAY_LOG_FORMAT", "pretty".into()),
        ],
        dir.join("server.log"),
    );
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    server.wait_ready(&http, &base).await;
    let r = read(
        http.post(format!("{base}/v1/auth/login"))
            .json(&serde_json::json!({
                "email": "boot@example.com", "password": PASSWORD,
                "device": {"id": "d", "name": "d"}
            }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, reqwest::StatusCode::OK, "{}", r.text);
    assert!(server.terminate().success());
}
