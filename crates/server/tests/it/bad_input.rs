//! Bad input: every class answers a 4xx problem document, never a 5xx, and writes
//! nothing (no user, no audit entry, no session).
#![allow(clippy::type_complexity)] // tables of cases read best inline

use crate::each_backend;
use crate::helpers::*;
use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use vaultpay_store::Backend;

/// Row counts of the tables a request could write to.
async fn counts(app: &TestApp) -> [i64; 4] {
    [
        app.count("users").await,
        app.count("audit_log").await,
        app.count("sessions").await,
        app.count("email_tokens").await,
    ]
}

#[track_caller]
fn assert_clean_refusal(what: &str, r: &Resp, status: u16, code: Option<&str>) {
    assert!(!r.status.is_server_error(), "{what}: {}", r.text);
    assert_eq!(r.status.as_u16(), status, "{what}: {}", r.text);
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "{what}: {}",
        r.text
    );
    assert_eq!(r.body["status"], status, "{what}: {}", r.text);
    assert!(
        r.body["title"].is_string() && r.body["request_id"].is_string(),
        "{what}: {}",
        r.text
    );
    if let Some(code) = code {
        assert_eq!(r.body["code"], code, "{what}: {}", r.text);
    }
    // internal details never leak
    for leak in ["sqlx", "panicked", "argon2", "SELECT", "serde"] {
        assert!(!r.text.contains(leak), "{what} leaks {leak}: {}", r.text);
    }
}

fn reg(email: &str, password: &str, name: &str) -> Value {
    json!({ "email": email, "password": password, "name": name })
}

#[tokio::test]
async fn bad_registration_input_is_refused_and_writes_nothing() {
    each_backend!(|backend: Backend| async move {
        // many attempts from one address: lift the registration rate limit
        let app = TestApp::spawn_with(backend, |cfg| {
            cfg.auth.rate_limits.register_per_ip = vaultpay_core::gcra::Quota::new(1000, 60)
        })
        .await;
        id_of_dup(&app).await;
        let before = counts(&app).await;
        let json_ct = "application/json";
        let big = format!(
            r#"{{"email":"big@example.com","password":"{PASSWORD}","name":"{}"}}"#,
            "x".repeat(100 * 1024)
        );
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let raw: Vec<(&str, &str, Vec<u8>, u16, Option<&str>)> = vec![
            (
                "malformed JSON",
                json_ct,
                b"{not json".to_vec(),
                400,
                Some("malformed_json"),
            ),
            (
                "truncated JSON",
                json_ct,
                br#"{"email": "x@example.com""#.to_vec(),
                400,
                Some("malformed_json"),
            ),
            (
                "trailing garbage",
                json_ct,
                format!(r#"{{"email":"t@example.com","password":"{PASSWORD}","name":"T"}} x"#)
                    .into_bytes(),
                400,
                Some("malformed_json"),
            ),
            ("empty body", json_ct, Vec::new(), 400, None),
            (
                "invalid UTF-8",
                json_ct,
                b"{\"email\": \"\xff\xfe@example.com\"}".to_vec(),
                400,
                None,
            ),
            ("deeply nested", json_ct, deep.into_bytes(), 422, None),
            (
                "wrong content type",
                "text/plain",
                reg("ct@example.com", PASSWORD, "CT")
                    .to_string()
                    .into_bytes(),
                415,
                Some("unsupported_media_type"),
            ),
            (
                "form content type",
                "application/x-www-form-urlencoded",
                b"email=f@example.com".to_vec(),
                415,
                Some("unsupported_media_type"),
            ),
            (
                "body over the limit",
                json_ct,
                big.into_bytes(),
                413,
                Some("body_too_large"),
            ),
        ];
        for (what, ct, body, status, code) in raw {
            let r = app.post_raw("/v1/auth/register", ct, body).await;
            assert_clean_refusal(what, &r, status, code);
            assert_eq!(counts(&app).await, before, "{what} wrote something");
        }
        // no content type at all
        let r = read(
            app.http
                .post(format!("{}/v1/auth/register", app.base))
                .body(reg("n@example.com", PASSWORD, "N").to_string())
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_clean_refusal("no content type", &r, 415, Some("unsupported_media_type"));

        let long_email = format!("{}@example.com", "a".repeat(250));
        let cases: Vec<(&str, Value, u16, &str)> = vec![
            (
                "wrong type",
                json!({ "email": 5, "password": PASSWORD, "name": "W" }),
                422,
                "invalid_request",
            ),
            (
                "null field",
                json!({ "email": null, "password": PASSWORD, "name": "W" }),
                422,
                "invalid_request",
            ),
            ("array body", json!([]), 422, "invalid_request"),
            // serde would build the request from its fields in order
            (
                "array of fields body",
                json!(["arr@example.com", PASSWORD, "Arr"]),
                422,
                "invalid_request",
            ),
            ("null body", Value::Null, 422, "invalid_request"),
            (
                "missing field",
                json!({ "email": "m@example.com", "password": PASSWORD }),
                422,
                "invalid_request",
            ),
            (
                "unknown field",
                json!({ "email": "u@example.com", "password": PASSWORD, "name": "U", "roles": ["admin"] }),
                422,
                "invalid_request",
            ),
            (
                "overlong name",
                reg("n@example.com", PASSWORD, &"n".repeat(101)),
                422,
                "name_invalid",
            ),
            (
                "blank name",
                reg("n@example.com", PASSWORD, "   "),
                422,
                "name_invalid",
            ),
            (
                "control char in name",
                reg("n@example.com", PASSWORD, "Eve\u{0007}"),
                422,
                "name_invalid",
            ),
            (
                "no @",
                reg("not-an-email", PASSWORD, "E"),
                422,
                "email_invalid",
            ),
            (
                "no domain dot",
                reg("a@b", PASSWORD, "E"),
                422,
                "email_invalid",
            ),
            (
                "markup in email",
                reg("<script>@example.com", PASSWORD, "E"),
                422,
                "email_invalid",
            ),
            (
                "header injection",
                reg("a@example.com\r\nBcc: x@evil.com", PASSWORD, "E"),
                422,
                "email_invalid",
            ),
            (
                "overlong email",
                reg(&long_email, PASSWORD, "E"),
                422,
                "email_invalid",
            ),
            ("empty email", reg("", PASSWORD, "E"), 422, "email_invalid"),
            (
                "short password",
                reg("p@example.com", "Sh0rt!", "P"),
                422,
                "password_too_short",
            ),
            (
                "overlong password",
                reg("p@example.com", &format!("Aa1!{}", "x".repeat(125)), "P"),
                422,
                "password_too_long",
            ),
            (
                "common password",
                reg("p@example.com", "password1234", "P"),
                422,
                "password_common",
            ),
            (
                "weak password",
                reg("p@example.com", "abcabcabcabcabc", "P"),
                422,
                "password_weak",
            ),
            (
                "duplicate email, other case",
                reg("DUP@Example.COM", PASSWORD, "D"),
                409,
                "email_taken",
            ),
            (
                "duplicate email, padded",
                reg("  dup@example.com ", PASSWORD, "D"),
                409,
                "email_taken",
            ),
        ];
        for (what, body, status, code) in cases {
            let r = app.post("/v1/auth/register", None, body).await;
            assert_clean_refusal(what, &r, status, Some(code));
            match code {
                "password_too_long" => assert_eq!(r.body["max_length"], 128, "{}", r.text),
                "password_too_short" => assert_eq!(r.body["min_length"], 12, "{}", r.text),
                "password_weak" => {
                    assert!(r.body["suggestions"].is_array(), "{}", r.text);
                    assert_eq!(r.body["min_score"], 3, "{}", r.text);
                    assert!(r.body["score"].as_u64().unwrap() < 3, "{}", r.text);
                }
                _ => {}
            }
            // the detail speaks JSON, not the server's Rust types
            let detail = r.body["detail"].as_str().unwrap_or("");
            for internal in ["struct", "RegisterRequest", "i64", "u64"] {
                assert!(!detail.contains(internal), "{what}: {detail}");
            }
            if what.ends_with(" body") {
                assert_eq!(detail, "The request body must be a JSON object.", "{what}");
            }
            assert_eq!(counts(&app).await, before, "{what} wrote something");
        }
        assert_eq!(app.mails().len(), 1, "only the first registration mailed");
        app.stop().await;
    });
}

/// Registers the account the duplicate cases collide with.
async fn id_of_dup(app: &TestApp) {
    let r = app.register("dup@example.com").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}

#[tokio::test]
async fn bad_login_and_token_input_is_refused_and_writes_nothing() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        id_of_dup(&app).await;
        let t = app.login("dup@example.com", PASSWORD).await;
        let before = counts(&app).await;
        let login = |device: Value| json!({ "email": "dup@example.com", "password": PASSWORD, "device": device });
        let cases: Vec<(&str, Value, u16, &str)> = vec![
            (
                "device name too long",
                login(json!({ "id": "d", "name": "n".repeat(101) })),
                422,
                "device_invalid",
            ),
            (
                "device id too long",
                login(json!({ "id": "d".repeat(129), "name": "n" })),
                422,
                "device_invalid",
            ),
            (
                "empty device id",
                login(json!({ "id": "", "name": "n" })),
                422,
                "device_invalid",
            ),
            (
                "control char in device name",
                login(json!({ "id": "d", "name": "a\nb" })),
                422,
                "device_invalid",
            ),
            (
                "device missing",
                json!({ "email": "dup@example.com", "password": PASSWORD }),
                422,
                "invalid_request",
            ),
            (
                "device of wrong type",
                login(json!("laptop")),
                422,
                "invalid_request",
            ),
            (
                "unknown device field",
                login(json!({ "id": "d", "name": "n", "trusted": true })),
                422,
                "invalid_request",
            ),
        ];
        for (what, body, status, code) in cases {
            let r = app.post("/v1/auth/login", None, body).await;
            assert_clean_refusal(what, &r, status, Some(code));
            assert_eq!(counts(&app).await, before, "{what} wrote something");
        }
        let r = app
            .post_raw("/v1/auth/login", "application/json", "{\"email\":")
            .await;
        assert_clean_refusal("malformed login", &r, 400, Some("malformed_json"));

        // other bodies
        let long_session = format!("/v1/sessions/{}", "s".repeat(2000));
        let other: Vec<(&str, Method, &str, Option<&str>, Value, u16, &str)> = vec![
            (
                "forgot without email",
                Method::POST,
                "/v1/auth/password/forgot",
                None,
                json!({}),
                422,
                "invalid_request",
            ),
            (
                "forgot with bad email",
                Method::POST,
                "/v1/auth/password/forgot",
                None,
                json!({ "email": "nope" }),
                422,
                "email_invalid",
            ),
            (
                "reset with wrong types",
                Method::POST,
                "/v1/auth/password/reset",
                None,
                json!({ "token": 1, "new_password": [] }),
                422,
                "invalid_request",
            ),
            (
                "reset with a huge token",
                Method::POST,
                "/v1/auth/password/reset",
                None,
                json!({ "token": "t".repeat(10_000), "new_password": PASSWORD }),
                400,
                "invalid_token",
            ),
            (
                "verify with a huge token",
                Method::POST,
                "/v1/auth/verify-email",
                None,
                json!({ "token": "t".repeat(10_000) }),
                400,
                "invalid_token",
            ),
            (
                "change with a missing field",
                Method::POST,
                "/v1/auth/password/change",
                Some(&t.access),
                json!({ "new_password": PASSWORD }),
                422,
                "invalid_request",
            ),
            (
                "logout with a wrong type",
                Method::POST,
                "/v1/auth/logout",
                Some(&t.access),
                json!({ "everywhere": "yes" }),
                422,
                "invalid_request",
            ),
            (
                "logout with an unknown field",
                Method::POST,
                "/v1/auth/logout",
                Some(&t.access),
                json!({ "all": true }),
                422,
                "invalid_request",
            ),
            (
                "session id of 2000 chars",
                Method::DELETE,
                &long_session,
                Some(&t.access),
                Value::Null,
                404,
                "not_found",
            ),
        ];
        for (what, method, path, token, body, status, code) in other {
            let body = (!body.is_null()).then_some(body);
            let r = app.send(method, path, token, body).await;
            assert_clean_refusal(what, &r, status, Some(code));
            assert_eq!(counts(&app).await, before, "{what} wrote something");
        }
        for (what, path) in [
            (
                "verify link without token",
                "/v1/auth/verify-email".to_owned(),
            ),
            (
                "verify link with a long token",
                format!("/v1/auth/verify-email?token={}", "t".repeat(3000)),
            ),
            (
                "verify link with an unknown parameter",
                "/v1/auth/verify-email?token=a&x=1".to_owned(),
            ),
        ] {
            let r = app.get(&path, None).await;
            assert!(r.status.is_client_error(), "{what}: {}", r.text);
            assert_clean_refusal(what, &r, r.status.as_u16(), None);
        }
        assert_eq!(counts(&app).await, before);
        // still alive and well
        assert_eq!(
            app.get("/v1/me", Some(&t.access)).await.status,
            StatusCode::OK
        );
        app.stop().await;
    });
}

/// Logout reads its optional body as every endpoint reads one: malformed JSON is 400
/// `malformed_json`, a body over the limit 413 `body_too_large` (it was plain text),
/// both problem documents, and the session lives on; no body at all logs out.
#[tokio::test]
async fn logout_refuses_an_unreadable_body_as_every_endpoint_does() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    id_of_dup(&app).await;
    let t = app.login("dup@example.com", PASSWORD).await;
    let logout = |body: Vec<u8>| {
        let req = app
            .http
            .post(format!("{}/v1/auth/logout", app.base))
            .bearer_auth(&t.access)
            .header("content-type", "application/json")
            .body(body);
        async move { read(req.send().await.unwrap()).await }
    };
    let r = logout(b"{not json".to_vec()).await;
    assert_clean_refusal("malformed", &r, 400, Some("malformed_json"));
    let big = format!(
        "{{\"everywhere\": false, \"pad\": \"{}\"}}",
        "x".repeat(200_000)
    );
    let r = logout(big.into_bytes()).await;
    assert_clean_refusal("oversized", &r, 413, Some("body_too_large"));
    assert_eq!(
        app.get("/v1/me", Some(&t.access)).await.status,
        StatusCode::OK
    );
    let r = logout(Vec::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        app.get("/v1/me", Some(&t.access)).await.status,
        StatusCode::UNAUTHORIZED
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_admin_input_is_refused() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let admin = app.admin_mfa().await;
    let before = counts(&app).await;
    for (q, code) in [
        ("limit=0", "invalid_query"),
        ("limit=-1", "invalid_query"),
        ("limit=abc", "invalid_query"),
        ("cursor=abc", "invalid_cursor"),
        ("from=yesterday", "invalid_query"),
        ("to=2024-13-45T00:00:00Z", "invalid_query"),
        ("sort=seq", "invalid_query"),
    ] {
        let r = app
            .get(&format!("/v1/admin/audit?{q}"), Some(&admin.access))
            .await;
        assert_clean_refusal(q, &r, 400, Some(code));
    }
    // a page larger than the server gives is capped, as the ledger's lists are
    let r = app
        .get("/v1/admin/audit?limit=100000", Some(&admin.access))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let id = admin_id(&admin.access);
    for (what, body, status, code) in [
        (
            "role of wrong type",
            json!({ "role": 5 }),
            422,
            "invalid_request",
        ),
        (
            "unknown role",
            json!({ "role": "root" }),
            422,
            "role_unknown",
        ),
        (
            "extra field",
            json!({ "role": "support", "by": "x" }),
            422,
            "invalid_request",
        ),
    ] {
        let r = app
            .post(
                &format!("/v1/admin/users/{id}/roles"),
                Some(&admin.access),
                body,
            )
            .await;
        assert_clean_refusal(what, &r, status, Some(code));
    }
    assert_eq!(counts(&app).await, before);
    app.stop().await;
}

fn admin_id(token: &str) -> String {
    crate::auth_flows::jwt_part(token, 1)["sub"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// U+0000 anywhere a client can put text (JSON fields, path parameters, query strings,
/// OAuth form fields) is refused as bad input on both backends. PostgreSQL cannot
/// store it in text, so without this a NUL reached the database as a 500 there (found
/// by the Schemathesis run, `api_fuzz.rs`).
#[tokio::test]
async fn nul_characters_are_refused_everywhere_on_every_backend() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let t = app.user("nul@example.com").await;
        let before = counts(&app).await;
        let post = |path: &'static str, token: Option<String>, body: Value, key: bool| {
            let app = &app;
            async move {
                let mut req = app.http.post(format!("{}{path}", app.base)).json(&body);
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                if key {
                    req = req.header("idempotency-key", "nul-1");
                }
                read(req.send().await.unwrap()).await
            }
        };
        let r = post(
            "/v1/transfers",
            Some(t.access.clone()),
            json!({"from_account_id": "a\u{0}b", "to_account_id": "x", "amount": 1, "currency": "USD", "description": "d"}),
            true,
        )
        .await;
        assert_clean_refusal("json field", &r, 422, Some("invalid_request"));
        let r = post(
            "/v1/auth/login",
            None,
            json!({"email": "nul@example.com\u{0}", "password": PASSWORD, "device": {"id": "d", "name": "d"}}),
            false,
        )
        .await;
        assert_clean_refusal("login email", &r, 422, Some("invalid_request"));
        // the text \u0000 (an escaped backslash) is ordinary text
        let r = post(
            "/v1/auth/register",
            None,
            json!({"email": "text@example.com", "password": PASSWORD, "name": "a\\u0000b"}),
            false,
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["name"], "a\\u0000b");
        let after_register = counts(&app).await;
        for (what, path) in [
            ("path parameter", "/v1/accounts/%00abc"),
            ("path parameter (admin users)", "/v1/admin/users/%00"),
            ("query", "/v1/accounts?cursor=%00"),
            ("query (audit)", "/v1/admin/audit?action=%00"),
        ] {
            let r = app.get(path, Some(&t.access)).await;
            assert_clean_refusal(what, &r, 422, Some("invalid_request"));
        }
        // a path that does not decode to UTF-8: problem+json, not axum's plain text
        for path in ["/v1/accounts/%FF", "/v1/sessions/%C3%28"] {
            let r = app.get(path, Some(&t.access)).await;
            assert_clean_refusal(path, &r, 400, Some("invalid_path"));
        }
        let r = app
            .token_form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", "a\u{0}b"),
                ("device_id", "dev-1"),
            ])
            .await;
        assert!(r.status.is_client_error(), "{}", r.text);
        let r = app
            .http
            .post(format!("{}/oauth/token", app.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials&client_id=%00&client_secret=x")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
        // in HTTP Basic credentials: raw, and percent-encoded (decoded by the server)
        for (what, creds) in [("raw", "a\u{0}b:x"), ("percent-encoded", "a%00:x")] {
            let r = app
                .http
                .post(format!("{}/oauth/token", app.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .header(
                    "authorization",
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(creds)
                    ),
                )
                .body("grant_type=client_credentials")
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body: Value = r.json().await.unwrap();
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
            assert_eq!(body["error"], "invalid_client", "{what}");
        }
        assert_eq!(counts(&app).await[0], after_register[0]);
        assert_eq!(
            after_register[0],
            before[0] + 1,
            "only the registration wrote a user"
        );
        app.stop().await;
    });
}

/// The server-wide body limit (64 KiB) does not cap the batch API below its 1,000
/// transfers: the batch route has a limit of its own (`ledger.batch_body_limit_bytes`),
/// and a body over that is refused whole, with nothing moved.
#[tokio::test]
async fn a_full_batch_fits_and_a_body_over_its_limit_is_refused() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let admin = app.admin().await.access;
    let u = app.user("batcher@example.com").await;
    let (a, b) = (
        app.open_wallet(&u.access, "USD").await,
        app.open_wallet(&u.access, "USD").await,
    );
    let r = ledger_post(
        &app,
        "/v1/admin/deposits",
        &admin,
        "batch-dep",
        json!({ "account_id": a, "amount": 5_000, "currency": "USD", "reference": "r" }),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let item = json!({ "from_account_id": a, "to_account_id": b, "amount": 1,
        "currency": "USD", "description": "x".repeat(200) });
    let full = json!({ "transfers": vec![item.clone(); 1000] });
    assert!(
        full.to_string().len() > 4 * 64 * 1024,
        "the body is well over 64 KiB"
    );
    let r = ledger_post(&app, "/v1/transfers/batch", &u.access, "batch-full", full).await;
    assert!(r.status.is_success(), "{}", r.text);
    assert_eq!(r.body["succeeded"], 1000, "{}", r.text);

    // over the batch route's own limit: 413 before anything runs
    let huge = json!({ "transfers": vec![item; 1000], "pad": "y".repeat(4 * 1024 * 1024) });
    let r = ledger_post(&app, "/v1/transfers/batch", &u.access, "batch-huge", huge).await;
    assert_clean_refusal("batch body over its limit", &r, 413, Some("body_too_large"));
    let balance = app.get(&format!("/v1/accounts/{a}"), Some(&u.access)).await;
    assert_eq!(balance.body["balance"], 4_000, "{}", balance.text);

    // every other route keeps the server-wide limit
    let r = ledger_post(
        &app,
        "/v1/transfers",
        &u.access,
        "single-huge",
        json!({ "from_account_id": a, "to_account_id": b, "amount": 1, "currency": "USD",
            "description": "z".repeat(100 * 1024) }),
    )
    .await;
    assert_clean_refusal(
        "transfer body over the server limit",
        &r,
        413,
        Some("body_too_large"),
    );
    app.stop().await;
}
