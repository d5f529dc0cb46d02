//! The audit log: every auth event recorded with who, what, outcome, IP, user agent
//! and request id; filters and cursor pagination of `GET /v1/admin/audit`; the
//! database refusing UPDATE and DELETE; tampering found by `verify_chain` and by
//! `vaultpay audit verify`.

use crate::auth_flows::{
    id_of, jwt_part, mail_token, send_with, token_form_rid, NEW_PASSWORD, THIRD_PASSWORD, UA,
};
use crate::each_backend;
use crate::helpers::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use vaultpay_store::audit::{verify_chain, ChainReport};
use vaultpay_store::Backend;

/// Entries with request id `rid`, newest first.
async fn by_request(app: &TestApp, admin: &str, rid: &str) -> Vec<Value> {
    crate::auth_flows::audit(app, admin, &format!("request_id={rid}")).await
}

fn login_body(email: &str, password: &str, device: &str) -> Value {
    json!({ "email": email, "password": password, "device": { "id": device, "name": format!("{device} phone") } })
}

#[tokio::test]
async fn every_auth_event_is_audited_with_its_origin() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn_with(backend, |cfg| cfg.auth.lockout.threshold = 2).await;
        let email = "ivy@example.com";
        let post = |path: &'static str, token: Option<String>, body: Value, rid: &'static str| {
            let app = &app;
            async move {
                send_with(
                    app,
                    Method::POST,
                    path,
                    token.as_deref(),
                    Some(body),
                    Some(rid),
                )
                .await
            }
        };
        let ok = |r: &Resp| assert!(r.status.is_success(), "{}", r.text);

        let r = post(
            "/v1/auth/register",
            None,
            json!({ "email": email, "password": PASSWORD, "name": "Ivy" }),
            "r-register",
        )
        .await;
        let ivy = id_of(&r);
        let token = mail_token(&app, email, "verify-email?token=");
        ok(&send_with(
            &app,
            Method::POST,
            "/v1/auth/verify-email",
            None,
            Some(json!({ "token": token })),
            Some("r-verify"),
        )
        .await);
        let r = post(
            "/v1/auth/login",
            None,
            login_body(email, PASSWORD, "dev-1"),
            "r-login",
        )
        .await;
        ok(&r);
        let s1 = r.body["session_id"].as_str().unwrap().to_owned();
        let rt1 = r.body["refresh_token"].as_str().unwrap().to_owned();
        post(
            "/v1/auth/login",
            None,
            login_body("ghost@example.com", PASSWORD, "d"),
            "r-fail-unknown",
        )
        .await
        .assert_problem(401, "invalid_credentials");
        post(
            "/v1/auth/login",
            None,
            login_body(email, "Wrong-password-1!", "d"),
            "r-fail-1",
        )
        .await
        .assert_problem(401, "invalid_credentials");
        post(
            "/v1/auth/login",
            None,
            login_body(email, "Wrong-password-2!", "d"),
            "r-fail-2",
        )
        .await
        .assert_problem(401, "invalid_credentials");
        let r = post(
            "/v1/auth/login",
            None,
            login_body("admin@example.com", PASSWORD, "adm"),
            "r-admin-login",
        )
        .await;
        ok(&r);
        let admin = r.body["access_token"].as_str().unwrap().to_owned();
        let admin_id = jwt_part(&admin, 1)["sub"].as_str().unwrap().to_owned();
        ok(&send_with(
            &app,
            Method::POST,
            &format!("/v1/admin/users/{ivy}/unlock"),
            Some(&admin),
            None,
            Some("r-unlock"),
        )
        .await);
        let fields = [
            ("grant_type", "refresh_token"),
            ("refresh_token", rt1.as_str()),
            ("device_id", "dev-1"),
        ];
        ok(&token_form_rid(&app, &fields, "r-refresh").await);
        assert_eq!(
            token_form_rid(&app, &fields, "r-reuse").await.status,
            StatusCode::BAD_REQUEST
        );
        let r = post(
            "/v1/auth/login",
            None,
            login_body(email, PASSWORD, "dev-2"),
            "r-login-2",
        )
        .await;
        let at2 = r.body["access_token"].as_str().unwrap().to_owned();
        let s2 = r.body["session_id"].as_str().unwrap().to_owned();
        let r = post(
            "/v1/auth/login",
            None,
            login_body(email, PASSWORD, "dev-3"),
            "r-login-3",
        )
        .await;
        let s3 = r.body["session_id"].as_str().unwrap().to_owned();
        let r = send_with(
            &app,
            Method::DELETE,
            &format!("/v1/sessions/{s3}"),
            Some(&at2),
            None,
            Some("r-revoke"),
        )
        .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let change = json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD });
        ok(&post(
            "/v1/auth/password/change",
            Some(at2.clone()),
            change,
            "r-change",
        )
        .await);
        ok(&post(
            "/v1/auth/password/forgot",
            None,
            json!({ "email": email }),
            "r-forgot",
        )
        .await);
        let token = mail_token(&app, email, "password/reset?token=");
        ok(&post(
            "/v1/auth/password/reset",
            None,
            json!({ "token": token, "new_password": THIRD_PASSWORD }),
            "r-reset",
        )
        .await);
        // role changes need the admin's fresh second factor
        let stepped = app.admin_mfa().await.access;
        let grant = send_with(
            &app,
            Method::POST,
            &format!("/v1/admin/users/{ivy}/roles"),
            Some(&stepped),
            Some(json!({ "role": "support" })),
            Some("r-grant"),
        )
        .await;
        ok(&grant);
        ok(&send_with(
            &app,
            Method::DELETE,
            &format!("/v1/admin/users/{ivy}/roles/support"),
            Some(&stepped),
            None,
            Some("r-ungrant"),
        )
        .await);
        let r = post(
            "/v1/auth/login",
            None,
            login_body(email, THIRD_PASSWORD, "dev-4"),
            "r-login-4",
        )
        .await;
        let at4 = r.body["access_token"].as_str().unwrap().to_owned();
        let s4 = r.body["session_id"].as_str().unwrap().to_owned();
        ok(&post("/v1/auth/logout", Some(at4), json!({}), "r-logout").await);

        let ivy = ivy.as_str();
        let admin_id = admin_id.as_str();
        // the first login also trusted its network (IP trust)
        let network: String =
            sqlx::query_scalar("SELECT id FROM trusted_networks WHERE user_id = $1")
                .bind(ivy)
                .fetch_one(app.auth_db().read())
                .await
                .unwrap();
        // (request id, [(action, actor, resource, outcome)] newest first)
        type Row<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a str);
        let expected: Vec<(&str, Vec<Row>)> = vec![
            (
                "r-register",
                vec![
                    ("email.verification_sent", Some(ivy), Some(ivy), "success"),
                    ("user.registered", Some(ivy), Some(ivy), "success"),
                ],
            ),
            (
                "r-verify",
                vec![("user.email_verified", Some(ivy), Some(ivy), "success")],
            ),
            (
                "r-login",
                vec![
                    ("login.succeeded", Some(ivy), Some(&s1), "success"),
                    ("ip_trust.added", Some(ivy), Some(&network), "success"),
                ],
            ),
            (
                "r-fail-unknown",
                vec![("login.failed", None, None, "failure")],
            ),
            (
                "r-fail-1",
                vec![("login.failed", Some(ivy), Some(ivy), "failure")],
            ),
            (
                "r-fail-2",
                vec![
                    ("account.locked", Some("system"), Some(ivy), "success"),
                    ("login.failed", Some(ivy), Some(ivy), "failure"),
                ],
            ),
            (
                "r-unlock",
                vec![("account.unlocked", Some(admin_id), Some(ivy), "success")],
            ),
            (
                "r-refresh",
                vec![("token.refreshed", Some(ivy), Some(&s1), "success")],
            ),
            (
                "r-reuse",
                vec![("refresh.reuse_detected", Some(ivy), Some(&s1), "failure")],
            ),
            (
                "r-login-2",
                vec![("login.succeeded", Some(ivy), Some(&s2), "success")],
            ),
            (
                "r-revoke",
                vec![("session.revoked", Some(ivy), Some(&s3), "success")],
            ),
            (
                "r-change",
                vec![("password.changed", Some(ivy), Some(ivy), "success")],
            ),
            (
                "r-forgot",
                vec![("password.reset_requested", None, Some(ivy), "success")],
            ),
            (
                "r-reset",
                vec![("password.reset", Some(ivy), Some(ivy), "success")],
            ),
            (
                "r-grant",
                vec![("role.granted", Some(admin_id), Some(ivy), "success")],
            ),
            (
                "r-ungrant",
                vec![("role.revoked", Some(admin_id), Some(ivy), "success")],
            ),
            (
                "r-login-4",
                vec![("login.succeeded", Some(ivy), Some(&s4), "success")],
            ),
            (
                "r-logout",
                vec![("logout", Some(ivy), Some(&s4), "success")],
            ),
        ];
        for (rid, rows) in expected {
            let got = by_request(&app, &admin, rid).await;
            assert_eq!(got.len(), rows.len(), "{rid}: {got:#?}");
            for (e, (action, actor, resource, outcome)) in got.iter().zip(rows) {
                assert_eq!(e["action"], action, "{rid}: {e}");
                assert_eq!(e["actor"].as_str(), actor, "{rid}: {e}");
                assert_eq!(e["resource"].as_str(), resource, "{rid}: {e}");
                assert_eq!(e["outcome"], outcome, "{rid}: {e}");
                assert_eq!(e["ip"], "127.0.0.1", "{rid}: {e}");
                assert_eq!(e["user_agent"], UA, "{rid}: {e}");
                assert_eq!(e["request_id"], rid, "{rid}: {e}");
                assert!(
                    vaultpay_core::time::parse_rfc3339(e["at"].as_str().unwrap()).is_some(),
                    "{e}"
                );
                assert_eq!(e["hash"].as_str().unwrap().len(), 64, "{e}");
                assert_eq!(e["prev_hash"].as_str().unwrap().len(), 64, "{e}");
            }
        }
        // details that matter to an investigator
        let unknown = &by_request(&app, &admin, "r-fail-unknown").await[0];
        assert_eq!(unknown["metadata"]["email"], "ghost@example.com");
        let locked = &by_request(&app, &admin, "r-fail-2").await[0];
        assert!(locked["metadata"]["seconds"].as_i64().unwrap() > 0);
        let reuse = &by_request(&app, &admin, "r-reuse").await[0];
        assert_eq!(reuse["metadata"]["session_revoked"], true);
        let grant = &by_request(&app, &admin, "r-grant").await[0];
        assert_eq!(grant["metadata"]["role"], "support");
        // no secret ever lands in the log
        let all = crate::auth_flows::audit(&app, &admin, "limit=500").await;
        let text = serde_json::to_string(&all).unwrap();
        for secret in [
            PASSWORD,
            NEW_PASSWORD,
            THIRD_PASSWORD,
            rt1.as_str(),
            token.as_str(),
            at2.as_str(),
        ] {
            assert!(!text.contains(secret), "a secret in the audit log");
        }
        assert_eq!(
            verify_chain(app.auth_db()).await.unwrap(),
            ChainReport::Intact {
                entries: app.count("audit_log").await as u64
            }
        );
        app.stop().await;
    });
}

#[tokio::test]
async fn audit_filters_and_cursor_pagination() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let mut ids = Vec::new();
        for (i, email) in ["p1@example.com", "p2@example.com", "p3@example.com"]
            .iter()
            .enumerate()
        {
            let body = json!({ "email": email, "password": PASSWORD, "name": "P" });
            let r = send_with(
                &app,
                Method::POST,
                "/v1/auth/register",
                None,
                Some(body),
                Some(&format!("reg-{i}")),
            )
            .await;
            ids.push(id_of(&r));
        }
        let admin = app.admin_mfa().await.access;
        let q = |query: String| {
            let app = &app;
            let admin = admin.clone();
            async move { crate::auth_flows::audit(app, &admin, &query).await }
        };
        let seqs = |v: &[Value]| {
            v.iter()
                .map(|e| e["seq"].as_i64().unwrap())
                .collect::<Vec<_>>()
        };

        let regs = q("action=user.registered".into()).await;
        assert_eq!(regs.len(), 4, "bootstrap admin + 3: {regs:#?}");
        let s = seqs(&regs);
        assert!(s.windows(2).all(|w| w[0] > w[1]), "newest first: {s:?}");
        assert_eq!(regs[0]["actor"], ids[2].as_str());

        // registering also mailed a verification link, audited under the same request
        let by_actor = q(format!("actor={}", ids[1])).await;
        assert_eq!(
            by_actor
                .iter()
                .map(|e| e["action"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["email.verification_sent", "user.registered"],
            "{by_actor:#?}"
        );
        assert_eq!(
            q(format!("actor={}&action=login.succeeded", ids[1]))
                .await
                .len(),
            0
        );
        let by_rid = q("request_id=reg-2".into()).await;
        assert_eq!(by_rid.len(), 2);
        assert!(by_rid.iter().all(|e| e["actor"] == ids[2].as_str()));
        assert_eq!(q("request_id=no-such-request".into()).await.len(), 0);

        // time range: from is inclusive, to exclusive
        let at = by_actor[1]["at"].as_str().unwrap().to_owned();
        let from = q(format!("action=user.registered&from={at}")).await;
        assert_eq!(
            from.iter()
                .map(|e| e["actor"].as_str().unwrap())
                .collect::<Vec<_>>(),
            vec![ids[2].as_str(), ids[1].as_str()]
        );
        let to = q(format!("action=user.registered&to={at}")).await;
        assert_eq!(to.len(), 2, "{to:#?}");
        assert!(to
            .iter()
            .all(|e| e["actor"] != ids[1].as_str() && e["actor"] != ids[2].as_str()));
        let between = q(format!("from={at}&to={at}")).await;
        assert_eq!(between.len(), 0);

        // cursor pagination over everything: pages of 2, no overlap, nothing missed
        let total = app.count("audit_log").await;
        let mut seen: Vec<i64> = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/admin/audit?limit=2&cursor={c}"),
                None => "/v1/admin/audit?limit=2".to_owned(),
            };
            let r = app.get(&path, Some(&admin)).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            let page = seqs(r.body["entries"].as_array().unwrap());
            assert!(page.len() <= 2);
            if let Some(last) = seen.last() {
                assert!(
                    page.iter().all(|s| s < last),
                    "older page, no overlap: {seen:?} then {page:?}"
                );
            }
            seen.extend(&page);
            pages += 1;
            assert!(pages <= total + 1, "pagination does not end");
            match r.body["next_cursor"].as_str() {
                Some(c) => {
                    assert_eq!(c, page.last().unwrap().to_string());
                    cursor = Some(c.to_owned());
                }
                None => break,
            }
        }
        assert_eq!(seen.len() as i64, total);
        assert_eq!(
            seen.iter().copied().collect::<BTreeSet<_>>(),
            (1..=total).collect::<BTreeSet<_>>()
        );

        // pagination with a filter
        let r = app
            .get(
                "/v1/admin/audit?action=user.registered&limit=3",
                Some(&admin),
            )
            .await;
        let p1 = seqs(r.body["entries"].as_array().unwrap());
        let c = r.body["next_cursor"].as_str().unwrap().to_owned();
        let r = app
            .get(
                &format!("/v1/admin/audit?action=user.registered&limit=3&cursor={c}"),
                Some(&admin),
            )
            .await;
        let p2 = seqs(r.body["entries"].as_array().unwrap());
        assert_eq!((p1.len(), p2.len()), (3, 1));
        assert!(r.body["next_cursor"].is_null(), "{}", r.text);
        assert_eq!([p1, p2].concat(), s);

        // compliance may read the log; support may not
        let r = app
            .post(
                &format!("/v1/admin/users/{}/roles", ids[0]),
                Some(&admin),
                json!({ "role": "compliance" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let r = app
            .post(
                &format!("/v1/admin/users/{}/roles", ids[1]),
                Some(&admin),
                json!({ "role": "support" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let c = app.login("p1@example.com", PASSWORD).await;
        assert_eq!(
            app.get("/v1/admin/audit?limit=1", Some(&c.access))
                .await
                .status,
            StatusCode::OK
        );
        let s = app.login("p2@example.com", PASSWORD).await;
        let started = std::time::Instant::now();
        app.get("/v1/admin/audit?limit=1", Some(&s.access))
            .await
            .assert_problem(403, "forbidden");
        // the refusal is audited: who, which permission, from where
        let denied = crate::auth_flows::audit_action(&app, &c.access, "access.denied").await;
        assert_eq!(denied.len(), 1, "{denied:?}");
        assert_eq!(denied[0]["actor"], ids[1].as_str());
        assert_eq!(denied[0]["resource"], "audit:read");
        assert_eq!(denied[0]["outcome"], "failure");
        assert_eq!(denied[0]["metadata"]["permission"], "audit:read");
        assert!(denied[0]["ip"].is_string(), "{}", denied[0]);
        // hammering an admin route does not write an entry per refusal
        for path in ["/v1/admin/roles", "/v1/admin/clients", "/v1/admin/audit"] {
            for _ in 0..6 {
                app.get(path, Some(&s.access))
                    .await
                    .assert_problem(403, "forbidden");
            }
        }
        let n = crate::auth_flows::audit_action(&app, &c.access, "access.denied")
            .await
            .len() as u64;
        let per_actor = u64::from(vaultpay_store::audit::DenialLog::PER_ACTOR);
        let refilled = started.elapsed().as_secs() * per_actor / 60 + 1;
        assert!(n >= per_actor && n <= per_actor + refilled, "{n} entries");
        assert!(n < 19, "every refusal was written ({n})");
        assert_eq!(
            verify_chain(app.auth_db()).await.unwrap(),
            ChainReport::Intact {
                entries: app.count("audit_log").await as u64
            }
        );
        app.stop().await;
    });
}

#[tokio::test]
async fn the_database_refuses_update_and_delete_on_the_audit_log() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        app.user("append@example.com").await;
        let db = app.auth_db();
        let n = app.count("audit_log").await;
        for sql in [
            "UPDATE audit_log SET outcome = 'success' WHERE seq = 1",
            "UPDATE audit_log SET actor = NULL",
            "DELETE FROM audit_log WHERE seq = (SELECT MAX(seq) FROM audit_log)",
            "DELETE FROM audit_log",
        ] {
            let res = sqlx::query(sql).execute(db.writer()).await;
            let err = res.expect_err(sql).to_string();
            assert!(err.contains("append-only"), "{sql}: {err}");
        }
        // Overwriting a row by insertion: SQLite's REPLACE deletes the old row first
        // (its DELETE trigger fires only with recursive_triggers, which every
        // connection sets), and an upsert updates it.
        let overwrite: &[&str] = match backend {
            Backend::Sqlite => &[
                "INSERT OR REPLACE INTO audit_log SELECT * FROM audit_log WHERE seq = 1",
                "REPLACE INTO audit_log SELECT * FROM audit_log WHERE seq = 1",
            ],
            Backend::Postgres => &[
                "INSERT INTO audit_log SELECT * FROM audit_log WHERE seq = 1 \
                 ON CONFLICT (seq) DO UPDATE SET outcome = 'success'",
            ],
        };
        for sql in overwrite {
            let res = sqlx::query(sql).execute(db.writer()).await;
            let err = res.expect_err(sql).to_string();
            assert!(err.contains("append-only"), "{sql}: {err}");
        }
        if backend == Backend::Postgres {
            let err = sqlx::query("TRUNCATE audit_log")
                .execute(db.writer())
                .await
                .expect_err("TRUNCATE")
                .to_string();
            assert!(err.contains("append-only"), "TRUNCATE: {err}");
        }
        assert_eq!(app.count("audit_log").await, n);
        assert_eq!(
            verify_chain(db).await.unwrap(),
            ChainReport::Intact { entries: n as u64 }
        );
        app.stop().await;
    });
}

/// Runs `vaultpay audit verify --service <which>` against the app's databases.
fn cli_audit_verify(cfg: &vaultpay_server::Config, which: &str) -> (i32, String) {
    cli_audit_verify_with(cfg, &["--service", which])
}

/// `vaultpay audit verify` with `args` against the app's databases.
fn cli_audit_verify_with(cfg: &vaultpay_server::Config, args: &[&str]) -> (i32, String) {
    let mut env = vec![
        ("VAULTPAY_DATABASE__AUTH_URL", cfg.auth_db()),
        ("VAULTPAY_DATABASE__LEDGER_URL", cfg.ledger_db()),
        ("VAULTPAY_DATA_DIR", cfg.data_dir.display().to_string()),
    ];
    if let Some(k) = &cfg.master_key {
        env.push(("VAULTPAY_MASTER_KEY", k.expose().to_owned()));
    }
    let mut all = vec!["audit", "verify"];
    all.extend_from_slice(args);
    run_cli(&all, &env)
}

/// `audit verify` prints the head to record elsewhere; `--expect` a recorded head
/// then finds a chain cut short below it (which verifies on its own), and a wrong hash.
#[tokio::test]
async fn a_recorded_head_finds_a_chain_cut_short() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.user("anchor@example.com").await;
    let (code, text) = cli_audit_verify(&app.cfg, "auth");
    assert_eq!(code, 0, "{text}");
    let head = text
        .split("; head ")
        .nth(1)
        .and_then(|t| t.split(')').next())
        .unwrap_or_else(|| panic!("no head in {text}"))
        .to_owned();
    let (seq, hash) = head.split_once(':').unwrap();
    let seq: i64 = seq.parse().unwrap();
    // more entries later: the recorded head is still held
    app.user("anchor2@example.com").await;
    let (code, text) = cli_audit_verify_with(&app.cfg, &["--service", "auth", "--expect", &head]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("holds the expected entry"), "{text}");
    // a wrong hash, or the anchor without a single service: refused
    let wrong = format!("{seq}:{}", "0".repeat(64));
    let (code, text) = cli_audit_verify_with(&app.cfg, &["--service", "auth", "--expect", &wrong]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("DOES NOT HOLD"), "{text}");
    let (code, _) = cli_audit_verify_with(&app.cfg, &["--expect", &head]);
    assert_ne!(code, 0);
    // someone who can write the table cuts the chain short below the recorded head
    let db = app.auth_db().clone();
    sqlx::query("DROP TRIGGER audit_log_no_delete")
        .execute(db.writer())
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit_log WHERE seq >= $1")
        .bind(seq - 1)
        .execute(db.writer())
        .await
        .unwrap();
    let (code, text) = cli_audit_verify(&app.cfg, "auth");
    assert_eq!(code, 0, "a prefix verifies on its own: {text}");
    let (code, text) = cli_audit_verify_with(&app.cfg, &["--service", "auth", "--expect", &head]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&format!("no entry {seq}")), "{text}");
    assert!(
        !text.contains(hash) || text.contains("DOES NOT HOLD"),
        "{text}"
    );
    app.stop().await;
}

/// Runs the `vaultpay` binary with `args` and only the environment `env`; returns its
/// exit code and its stdout and stderr together.
fn run_cli(args: &[&str], env: &[(&str, String)]) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vaultpay"));
    cmd.env_clear().args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn a_tampered_row_is_found_at_its_seq() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        app.user("tamper@example.com").await;
        app.login_device("tamper@example.com", "Wrong-password-123!", "d")
            .await
            .assert_problem(401, "invalid_credentials");
        app.user("later@example.com").await;
        let admin = app.admin().await;
        let db = app.auth_db().clone();
        let n = app.count("audit_log").await;
        assert_eq!(
            verify_chain(&db).await.unwrap(),
            ChainReport::Intact { entries: n as u64 }
        );

        let failed = crate::auth_flows::audit_action(&app, &admin.access, "login.failed").await;
        assert_eq!(failed.len(), 1);
        let seq = failed[0]["seq"].as_i64().unwrap();
        assert!(seq > 1 && seq < n, "a row in the middle: {seq} of {n}");

        // an attacker with database access hides the failed login
        let bypass = match backend {
            Backend::Sqlite => "DROP TRIGGER audit_log_no_update",
            Backend::Postgres => "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update",
        };
        sqlx::query(bypass).execute(db.writer()).await.unwrap();
        let changed = sqlx::query("UPDATE audit_log SET outcome = 'success' WHERE seq = $1")
            .bind(seq)
            .execute(db.writer())
            .await
            .unwrap();
        assert_eq!(changed.rows_affected(), 1);

        match verify_chain(&db).await.unwrap() {
            ChainReport::Broken { checked, link } => {
                assert_eq!(link.seq, seq);
                assert_eq!(checked, (seq - 1) as u64);
                assert!(link.reason.contains("hash"), "{}", link.reason);
            }
            other => panic!("tampering not found: {other:?}"),
        }

        let cfg = app.cfg.clone();
        app.stop().await;
        let (code, out) = cli_audit_verify(&cfg, "auth");
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(&format!("seq {seq}")), "{out}");
        assert!(out.contains("BROKEN"), "{out}");
        // the ledger's chain is untouched: exit status 0
        let (code, out) = cli_audit_verify(&cfg, "ledger");
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("intact"), "{out}");
    });
}

/// A start that cannot succeed (the listen address is taken; the ledger alone without
/// AuthShield's address, or with one in clear text across a network) fails before it creates anything: no data dir, no database, no
/// master key, no bootstrap administrator whose password would be printed and lost.
#[tokio::test]
async fn a_refused_start_creates_nothing() {
    let missing = temp_dir().join("not-here");
    let dir = missing.display().to_string();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let ledger = [
        "serve",
        "ledger",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &dir,
    ];
    let pointed = [&ledger[..], &["--auth-url", "http://127.0.0.1:1"]].concat();
    let issuer = [("VAULTPAY_AUTH__ISSUER", "http://127.0.0.1:1".to_owned())];
    // AuthShield over clear text across a network (its keys, the secret, users'
    // tokens), or a CA file that is not there
    let clear = [&ledger[..], &["--auth-url", "http://auth.example:8080"]].concat();
    let no_ca = [
        ("VAULTPAY_AUTH__ISSUER", "https://auth.example".to_owned()),
        (
            "VAULTPAY_AUTH__INTROSPECTION_SECRET",
            "sixteen-chars-and-more".to_owned(),
        ),
        (
            "VAULTPAY_AUTH_CA_PATH",
            missing.join("ca.pem").display().to_string(),
        ),
    ];
    let tls = [&ledger[..], &["--auth-url", "https://auth.example"]].concat();
    for (args, env, says) in [
        (
            &["serve", "--listen", &listen, "--data-dir", &dir][..],
            &[][..],
            "binding",
        ),
        (&ledger[..], &[][..], "--auth-url"),
        (&pointed[..], &[][..], "auth.issuer"),
        // with the issuer, still no introspection secret
        (&pointed[..], &issuer[..], "introspection_secret"),
        (&clear[..], &issuer[..], "--auth-url must be https"),
        (&tls[..], &no_ca[..], "auth_ca_path"),
    ] {
        let (code, text) = run_cli(args, env);
        assert_ne!(code, 0, "{args:?}: {text}");
        assert!(text.contains(says), "{args:?}: {text}");
        assert!(!text.contains("password"), "{args:?}: {text}");
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }
}

/// `migrate --service ledger` migrates the ledger's database only (a split
/// deployment's ledger data dir gets no AuthShield database), and `audit verify
/// --service ledger` then checks it.
#[tokio::test]
async fn migrate_one_service() {
    let dir = temp_dir().join("ledger-only");
    let d = dir.display().to_string();
    let (code, text) = run_cli(&["migrate", "--service", "ledger", "--data-dir", &d], &[]);
    assert_eq!(code, 0, "{text}");
    assert!(dir.join("ledger.db").is_file());
    assert!(
        !dir.join("auth.db").exists(),
        "an AuthShield database was created"
    );
    let (code, text) = run_cli(
        &["audit", "verify", "--service", "ledger", "--data-dir", &d],
        &[],
    );
    assert_eq!(code, 0, "{text}");
}

/// `audit verify` and `ledger verify` pointed at no database (a wrong `--data-dir`) or
/// at one without VaultPay's schema fail, naming it; they do not create an empty
/// database and call it intact.
#[tokio::test]
async fn verify_commands_refuse_a_missing_or_empty_database() {
    let missing = temp_dir().join("not-here");
    let dir = missing.display().to_string();
    for args in [
        &["audit", "verify", "--data-dir", &dir][..],
        &["ledger", "verify", "--data-dir", &dir][..],
        &["keys", "list", "--data-dir", &dir][..],
        &["keys", "rotate", "--data-dir", &dir][..],
        &["clients", "list", "--data-dir", &dir][..],
        &[
            "clients",
            "create",
            "--name",
            "x",
            "--grant-type",
            "client_credentials",
            "--data-dir",
            &dir,
        ][..],
    ] {
        let (code, text) = run_cli(args, &[]);
        assert_ne!(code, 0, "{args:?}: {text}");
        assert!(text.contains("does not exist"), "{args:?}: {text}");
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }
    // a split ledger's data dir (its database only): the hint names the flag that
    // picks it, and no empty AuthShield database appears
    let split = temp_dir();
    let d = split.display().to_string();
    let (code, text) = run_cli(&["migrate", "--service", "ledger", "--data-dir", &d], &[]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = run_cli(&["audit", "verify", "--data-dir", &d], &[]);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("`audit verify` takes --service ledger"),
        "{text}"
    );
    assert!(!split.join("auth.db").exists(), "{text}");
    // a sqlite: URL naming a file that is not there: refused, and not created
    let url = format!("sqlite://{}/auth.db", missing.display());
    let (code, text) = run_cli(
        &["audit", "verify", "--service", "auth"],
        &[("VAULTPAY_DATABASE__AUTH_URL", url)],
    );
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("does not exist"), "{text}");
    assert!(!missing.exists(), "nothing created");
    if std::env::var(vaultpay_store::testing::PG_URL_VAR).is_ok() {
        let empty = vaultpay_store::testing::fresh_location(Backend::Postgres)
            .await
            .unwrap();
        let other = vaultpay_store::testing::fresh_location(Backend::Postgres)
            .await
            .unwrap();
        let env = [
            ("VAULTPAY_DATABASE__AUTH_URL", empty.clone()),
            ("VAULTPAY_DATABASE__LEDGER_URL", other),
            ("VAULTPAY_DATA_DIR", dir.clone()),
        ];
        for args in [
            &["audit", "verify", "--service", "auth"][..],
            &["ledger", "verify"][..],
            &["keys", "list"][..],
            &["clients", "list"][..],
        ] {
            let (code, text) = run_cli(args, &env);
            assert_ne!(code, 0, "{args:?}: {text}");
            assert!(text.contains("has no VaultPay schema"), "{args:?}: {text}");
        }
    }
}

/// `keys rotate` and `clients create` with a master key other than the one the
/// database's keys are sealed with are refused before they seal anything: a signing
/// key sealed with the wrong master key stopped AuthShield from starting again.
#[tokio::test]
async fn key_commands_refuse_a_master_key_that_does_not_open_the_keys() {
    let dir = temp_dir().join("keys");
    let d = dir.display().to_string();
    let (code, text) = run_cli(&["keys", "list", "--data-dir", &d], &[]);
    assert_eq!(code, 1, "{text}"); // no database yet
    let (code, text) = run_cli(&["migrate", "--data-dir", &d], &[]);
    assert_eq!(code, 0, "{text}");
    let (code, before) = run_cli(&["keys", "list", "--data-dir", &d], &[]);
    assert_eq!(code, 0, "{before}");
    let wrong = vaultpay_core::crypto::MasterKey::generate()
        .to_hex()
        .to_string();
    let env = [("VAULTPAY_MASTER_KEY", wrong)];
    for args in [
        &["keys", "rotate", "--data-dir", &d][..],
        &[
            "clients",
            "create",
            "--name",
            "x",
            "--grant-type",
            "client_credentials",
            "--data-dir",
            &d,
        ][..],
    ] {
        let (code, text) = run_cli(args, &env);
        assert_ne!(code, 0, "{args:?}: {text}");
        assert!(text.contains("does not open"), "{args:?}: {text}");
    }
    let (code, after) = run_cli(&["keys", "list", "--data-dir", &d], &[]);
    assert_eq!(code, 0, "{after}");
    assert_eq!(after, before, "nothing rotated");
    // the key file gone (a partial restore): refused, and no new key file written
    let file = dir.join("master.key");
    let saved = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    for args in [
        &["keys", "list", "--data-dir", &d][..],
        &["keys", "rotate", "--data-dir", &d][..],
    ] {
        let (code, text) = run_cli(args, &[]);
        assert_ne!(code, 0, "{args:?}: {text}");
        assert!(text.contains("no master key"), "{args:?}: {text}");
        assert!(!file.exists(), "{args:?} wrote a new master key");
    }
    std::fs::write(&file, saved).unwrap();
    let (code, text) = run_cli(&["keys", "rotate", "--data-dir", &d], &[]);
    assert_eq!(code, 0, "the right key rotates: {text}");
}

/// `vaultpay keys rotate` publishes the new key first (it signs after
/// `auth.key_publish_ahead_secs`), so the key still signing cannot be retired; `--now`
/// switches at once, after which the old key can be retired.
#[tokio::test]
async fn keys_rotate_publishes_before_it_signs_and_now_skips_the_wait() {
    let dir = temp_dir().join("stage");
    let d = dir.display().to_string();
    let (code, text) = run_cli(&["migrate", "--data-dir", &d], &[]);
    assert_eq!(code, 0, "{text}");
    let list = || {
        let (code, text) = run_cli(&["keys", "list", "--data-dir", &d], &[]);
        assert_eq!(code, 0, "{text}");
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect::<Vec<_>>()
    };
    let first = list();
    assert_eq!(first.len(), 1, "{first:?}");
    let old = first[0]["kid"].as_str().unwrap().to_owned();

    let (code, text) = run_cli(&["keys", "rotate", "--data-dir", &d], &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("signs from") && text.contains("in 90 s"),
        "{text}"
    );
    let keys = list();
    let staged = &keys[0];
    assert_eq!(staged["signing"], false, "{keys:?}");
    assert!(staged["signs_from"].is_string(), "{keys:?}");
    assert_eq!(keys[1]["kid"], old.as_str());
    assert_eq!(
        keys[1]["signs_until"], staged["signs_from"],
        "the old key signs until the new one starts"
    );
    assert_eq!(
        keys[1]["signing"], true,
        "the old key signs until the switch"
    );
    let (code, text) = run_cli(&["keys", "retire", &old, "--data-dir", &d], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("keys rotate --now"), "{text}");

    let (code, text) = run_cli(&["keys", "rotate", "--now", "--data-dir", &d], &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("signs now"), "{text}");
    let keys = list();
    assert_eq!(keys.len(), 3);
    assert_eq!(keys[0]["signing"], true, "{keys:?}");
    assert!(keys[1..].iter().all(|k| k["signing"] == false), "{keys:?}");
    let (code, text) = run_cli(&["keys", "retire", &old, "--data-dir", &d], &[]);
    assert_eq!(code, 0, "{text}");
}

/// `config show` prints the issuer `serve` uses: its listen address when no issuer is
/// set (an operator copies it into a separately run ledger's `auth.issuer`), and the
/// one set when there is one.
#[test]
fn config_show_prints_the_issuer_serve_uses() {
    let listen = ("VAULTPAY_LISTEN", "127.0.0.1:18081".to_owned());
    let (code, text) = run_cli(&["config", "show"], std::slice::from_ref(&listen));
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("issuer = \"http://127.0.0.1:18081\""),
        "{text}"
    );
    let named = ("VAULTPAY_AUTH__ISSUER", "https://id.example.com".to_owned());
    let (code, text) = run_cli(&["config", "show"], &[listen, named]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("issuer = \"https://id.example.com\""),
        "{text}"
    );
}

/// `serve` refuses an unusable master key (none given outside embedded mode, or one
/// that is no key) before it opens, and so migrates, any database.
#[tokio::test]
async fn serve_refuses_a_bad_master_key_before_touching_the_databases() {
    // SQLite: a master key file named but missing (a key is generated only when none
    // is named)
    // (`master_key_file` in the config file: the variable VAULTPAY_MASTER_KEY_FILE
    // would read `master_key` from that file, refused at load)
    let dir = temp_dir().join("missing-key");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("vaultpay.toml");
    std::fs::write(
        &config,
        format!("master_key_file = {:?}\n", dir.join("nowhere.key")),
    )
    .unwrap();
    let (code, text) = run_cli(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            &config.display().to_string(),
        ],
        &[("VAULTPAY_DATA_DIR", dir.display().to_string())],
    );
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("no master key"), "{text}");
    assert!(!dir.join("auth.db").exists(), "{text}");
    if !vaultpay_store::testing::backends().contains(&Backend::Postgres) {
        return;
    }
    let auth = vaultpay_store::testing::fresh_location(Backend::Postgres)
        .await
        .unwrap();
    let ledger = vaultpay_store::testing::fresh_location(Backend::Postgres)
        .await
        .unwrap();
    let dir = temp_dir().join("nokey");
    let base = vec![
        ("VAULTPAY_DATABASE__AUTH_URL", auth.clone()),
        ("VAULTPAY_DATABASE__LEDGER_URL", ledger.clone()),
        ("VAULTPAY_DATA_DIR", dir.display().to_string()),
        ("VAULTPAY_LISTEN", "127.0.0.1:0".to_owned()),
    ];
    let mut bad = base.clone();
    bad.push(("VAULTPAY_MASTER_KEY", "hunter2".to_owned()));
    for (env, says) in [
        (&base, "no master key"),
        (&bad, "master key must be 32 bytes"),
    ] {
        let (code, text) = run_cli(&["serve"], env);
        assert_ne!(code, 0, "{text}");
        assert!(text.contains(says), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
    for url in [&auth, &ledger] {
        let db =
            vaultpay_store::Db::connect(url, vaultpay_store::Service::Auth, &Default::default())
                .await
                .unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_one(db.read())
        .await
        .unwrap();
        assert_eq!(tables, 0, "{url} was migrated");
    }
}
