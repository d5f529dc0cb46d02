//! The attacks AuthShield's flows prevent, one test each: refresh-token reuse and
//! theft, credential guessing (generic errors, lockout, rate limits), reaching other
//! users' sessions or admin routes, forged and garbage tokens, rotated-out keys, and
//! unauthenticated introspection.

use crate::auth_flows::{assert_oauth_error, audit_action, b64url, id_of, jwt_part, refresh};
use crate::each_backend;
use crate::helpers::*;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::StatusCode;
use serde_json::{json, Value};
use vaultpay_core::gcra::Quota;
use vaultpay_core::secret::Secret;
use vaultpay_store::Backend;

pub fn envelope(app: &TestApp) -> vaultpay_core::crypto::Envelope {
    vaultpay_core::crypto::Envelope::new(&vaultpay_server::app::master_key(&app.cfg).unwrap())
}

/// Signs `claims` with AuthShield's real current signing key (as an attacker who had
/// stolen it could, or to prove that a refusal is about the claims, not the signature).
async fn sign_with_real_key(app: &TestApp, claims: &Value) -> String {
    let loaded = vaultpay_auth::keys::load(app.auth_db(), &envelope(app))
        .await
        .unwrap();
    loaded.signer.sign_access(claims).unwrap()
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// HS256 over `header.payload` keyed with `key`.
fn hs256(header: &Value, payload: &Value, key: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(payload.to_string().as_bytes())
    );
    let mac = hex_decode(&vaultpay_core::crypto::blind_index(key, input.as_bytes()));
    format!("{input}.{}", b64url(&mac))
}

/// GET /v1/me with a raw Authorization header value (or several, or none).
async fn me_with(app: &TestApp, auth: &[HeaderValue]) -> Resp {
    let mut headers = HeaderMap::new();
    for v in auth {
        headers.append(AUTHORIZATION, v.clone());
    }
    read(
        app.http
            .get(format!("{}/v1/me", app.base))
            .headers(headers)
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[track_caller]
fn assert_refused(r: &Resp, code: &str, what: &str) {
    assert!(!r.status.is_server_error(), "{what}: {}", r.text);
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {}", r.text);
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "{what}"
    );
    assert_eq!(r.body["code"], code, "{what}: {}", r.text);
    assert!(
        r.header("www-authenticate")
            .unwrap_or("")
            .starts_with("Bearer"),
        "{what}: {:?}",
        r.headers
    );
}

#[tokio::test]
async fn refresh_token_reuse_revokes_the_family() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let t = app.user("victim@example.com").await;
        // another session of the same user, not part of the stolen family
        let other = app
            .login_device("victim@example.com", PASSWORD, "dev-9")
            .await;
        let other_at = other.body["access_token"].as_str().unwrap().to_owned();

        let r = refresh(&app, &t.refresh).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let at2 = r.body["access_token"].as_str().unwrap().to_owned();
        let rt2 = r.body["refresh_token"].as_str().unwrap().to_owned();

        // the spent token comes back (stolen, or replayed)
        let reuse = refresh(&app, &t.refresh).await;
        assert_oauth_error(&reuse, 400, "invalid_grant");
        // the whole family is dead: the newest refresh token and every access token
        assert_oauth_error(&refresh(&app, &rt2).await, 400, "invalid_grant");
        app.get("/v1/me", Some(&at2))
            .await
            .assert_problem(401, "session_revoked");
        app.get("/v1/me", Some(&t.access))
            .await
            .assert_problem(401, "session_revoked");
        // the user's other session is untouched
        assert_eq!(
            app.get("/v1/me", Some(&other_at)).await.status,
            StatusCode::OK
        );

        let admin = app.admin().await;
        let e = audit_action(&app, &admin.access, "refresh.reuse_detected").await;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0]["resource"], t.session.as_str());
        assert_eq!(e[0]["outcome"], "failure");
        assert_eq!(e[0]["metadata"]["reason"], "refresh_token_reuse");
        let m = app.get("/metrics", None).await;
        assert!(
            m.text.contains("auth_refresh_reuse_detected_total"),
            "{}",
            m.text
        );
        app.stop().await;
    });
}

#[tokio::test]
async fn refresh_reuse_grace_window_gives_one_more_pair() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn_with(backend, |cfg| cfg.auth.refresh_reuse_grace_secs = 30).await;
        let t = app.user("racer@example.com").await;
        let r2 = refresh(&app, &t.refresh).await;
        assert_eq!(r2.status, StatusCode::OK, "{}", r2.text);
        let rt2 = r2.body["refresh_token"].as_str().unwrap().to_owned();
        // a client that refreshed twice concurrently: one more pair, same session
        let r3 = refresh(&app, &t.refresh).await;
        assert_eq!(r3.status, StatusCode::OK, "{}", r3.text);
        assert_eq!(r3.body["session_id"], t.session.as_str());
        let rt3 = r3.body["refresh_token"].as_str().unwrap().to_owned();
        let at3 = r3.body["access_token"].as_str().unwrap().to_owned();
        assert_ne!(rt3, rt2);
        assert_eq!(app.get("/v1/me", Some(&at3)).await.status, StatusCode::OK);
        // but only one: a third presentation is reuse and revokes the family
        assert_oauth_error(&refresh(&app, &t.refresh).await, 400, "invalid_grant");
        assert_oauth_error(&refresh(&app, &rt2).await, 400, "invalid_grant");
        assert_oauth_error(&refresh(&app, &rt3).await, 400, "invalid_grant");
        app.get("/v1/me", Some(&at3))
            .await
            .assert_problem(401, "session_revoked");

        let admin = app.admin().await;
        assert_eq!(
            audit_action(&app, &admin.access, "token.refreshed_in_grace")
                .await
                .len(),
            1
        );
        assert_eq!(
            audit_action(&app, &admin.access, "refresh.reuse_detected")
                .await
                .len(),
            1
        );
        app.stop().await;
    });
}

/// The grace window covers a concurrent double refresh only: once the token's
/// successor has itself been used, the old token coming back is reuse (it used to get
/// a pair of its own, a second token chain for the session that reuse detection never
/// saw again).
#[tokio::test]
async fn no_grace_once_the_successor_was_used() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn_with(backend, |cfg| cfg.auth.refresh_reuse_grace_secs = 30).await;
        let t = app.user("chain@example.com").await;
        let r2 = refresh(&app, &t.refresh).await;
        assert_eq!(r2.status, StatusCode::OK, "{}", r2.text);
        let rt2 = r2.body["refresh_token"].as_str().unwrap().to_owned();
        let r3 = refresh(&app, &rt2).await;
        assert_eq!(r3.status, StatusCode::OK, "{}", r3.text);
        let rt3 = r3.body["refresh_token"].as_str().unwrap().to_owned();
        assert_oauth_error(&refresh(&app, &t.refresh).await, 400, "invalid_grant");
        assert_oauth_error(&refresh(&app, &rt3).await, 400, "invalid_grant");
        let admin = app.admin().await;
        assert!(
            audit_action(&app, &admin.access, "token.refreshed_in_grace")
                .await
                .is_empty()
        );
        assert_eq!(
            audit_action(&app, &admin.access, "refresh.reuse_detected")
                .await
                .len(),
            1
        );
        app.stop().await;
    });
}

#[tokio::test]
async fn refresh_is_bound_to_its_device_and_validates_the_form() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let t = app.user("mobile@example.com").await;
        // missing or empty device_id: a malformed request, the session survives
        let r = app
            .token_form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", &t.refresh),
            ])
            .await;
        assert_oauth_error(&r, 400, "invalid_request");
        let r = app
            .token_form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", &t.refresh),
                ("device_id", ""),
            ])
            .await;
        assert_oauth_error(&r, 400, "invalid_request");
        assert_oauth_error(
            &app.token_form(&[("grant_type", "refresh_token"), ("device_id", "dev-1")])
                .await,
            400,
            "invalid_request",
        );
        assert_oauth_error(
            &app.token_form(&[("refresh_token", &t.refresh), ("device_id", "dev-1")])
                .await,
            400,
            "invalid_request",
        );
        let r = app
            .token_form(&[
                ("grant_type", "password"),
                ("username", "x"),
                ("password", "y"),
            ])
            .await;
        assert_oauth_error(&r, 400, "unsupported_grant_type");
        assert_oauth_error(
            &refresh(&app, "not-a-real-token").await,
            400,
            "invalid_grant",
        );
        assert_oauth_error(
            &refresh(&app, &"A".repeat(5000)).await,
            400,
            "invalid_grant",
        );
        let r = app
            .post_raw(
                "/oauth/token",
                "application/json",
                r#"{"grant_type":"refresh_token"}"#,
            )
            .await;
        assert_oauth_error(&r, 400, "invalid_request");
        assert_eq!(
            app.get("/v1/me", Some(&t.access)).await.status,
            StatusCode::OK
        );

        let r = refresh(&app, &t.refresh).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let rt2 = r.body["refresh_token"].as_str().unwrap().to_owned();
        // a stolen refresh token used from another device revokes the session
        let r = app
            .token_form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", &rt2),
                ("device_id", "attacker-box"),
            ])
            .await;
        assert_oauth_error(&r, 400, "invalid_grant");
        assert_oauth_error(&refresh(&app, &rt2).await, 400, "invalid_grant");
        app.get("/v1/me", Some(&t.access))
            .await
            .assert_problem(401, "session_revoked");
        let admin = app.admin().await;
        let e = audit_action(&app, &admin.access, "refresh.device_mismatch").await;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0]["metadata"]["reason"], "refresh_device_mismatch");
        app.stop().await;
    });
}

#[tokio::test]
async fn login_failures_are_indistinguishable() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        id_of(&app.register("known@example.com").await);
        let strip = |r: &Resp| {
            r.assert_problem(401, "invalid_credentials");
            let mut b = r.body.clone();
            assert!(b["request_id"].is_string());
            b.as_object_mut().unwrap().remove("request_id");
            let mut h: Vec<(String, String)> = r
                .headers
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "x-request-id" | "date" | "content-length"))
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                .collect();
            h.sort();
            (b, h)
        };
        let wrong = strip(
            &app.login_device("known@example.com", "Wrong-password-123!", "d")
                .await,
        );
        let unknown = strip(
            &app.login_device("unknown@example.com", "Wrong-password-123!", "d")
                .await,
        );
        assert_eq!(
            wrong, unknown,
            "a wrong password and an unknown email look the same"
        );
        let not_email = strip(
            &app.login_device("not an email", "Wrong-password-123!", "d")
                .await,
        );
        assert_eq!(wrong, not_email);
        let huge = strip(
            &app.login_device("known@example.com", &"x".repeat(5000), "d")
                .await,
        );
        assert_eq!(wrong, huge);
        app.stop().await;
    });
}

/// A stolen access token cannot guess the current password through password change:
/// wrong guesses lock the account as failed logins do, and a locked account is refused
/// there before any password is checked, even the right one.
#[tokio::test]
async fn password_change_guesses_lock_the_account() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn_with(backend, |cfg| cfg.auth.lockout.threshold = 3).await;
        let stolen = app.user("victim@example.com").await;
        let change = |current: &'static str| {
            let access = stolen.access.clone();
            let app = &app;
            async move {
                app.post(
                    "/v1/auth/password/change",
                    Some(&access),
                    json!({ "current_password": current, "new_password": crate::auth_flows::NEW_PASSWORD }),
                )
                .await
            }
        };
        for _ in 0..3 {
            change("Wrong-guess-1234!")
                .await
                .assert_problem(403, "current_password_wrong");
        }
        change("Wrong-guess-1234!")
            .await
            .assert_problem(423, "account_locked");
        // the right password is refused too while locked, and nothing changed
        change(PASSWORD).await.assert_problem(423, "account_locked");
        app.login_device("victim@example.com", PASSWORD, "d")
            .await
            .assert_problem(423, "account_locked");
        app.stop().await;
    });
}

/// The lockout counts consecutive failures: a successful sign-in starts the count
/// again.
#[tokio::test]
async fn a_successful_sign_in_resets_the_failure_count() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn_with(backend, |cfg| cfg.auth.lockout.threshold = 3).await;
        let email = "reset-count@example.com";
        app.register(email).await;
        let count = || async {
            sqlx::query_scalar::<_, i64>("SELECT failed_logins FROM users WHERE email = $1")
                .bind(email)
                .fetch_one(app.auth_db().read())
                .await
                .unwrap()
        };
        for round in 0..3 {
            for _ in 0..2 {
                app.login_device(email, "Wrong-password-123!", "d")
                    .await
                    .assert_problem(401, "invalid_credentials");
            }
            assert_eq!(count().await, 2, "round {round}");
            let ok = app.login_device(email, PASSWORD, "dev-1").await;
            assert_eq!(ok.status.as_u16(), 200, "round {round}: {}", ok.text);
            assert_eq!(count().await, 0, "round {round}");
        }
        app.stop().await;
    });
}

#[tokio::test]
async fn lockout_then_admin_unlock() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn_with(backend, |cfg| cfg.auth.lockout.threshold = 3).await;
        let id = id_of(&app.register("guess@example.com").await);
        for _ in 0..3 {
            app.login_device("guess@example.com", "Wrong-password-123!", "d")
                .await
                .assert_problem(401, "invalid_credentials");
        }
        // even the right password is refused while locked
        let locked = app
            .login_device("guess@example.com", PASSWORD, "dev-1")
            .await;
        locked.assert_problem(423, "account_locked");
        let retry: i64 = locked.header("retry-after").unwrap().parse().unwrap();
        assert!(
            (1..=60).contains(&retry),
            "first lock lasts base_secs: {retry}"
        );
        assert_eq!(locked.body["retry_after"], retry);

        let admin = app.admin().await;
        let e = audit_action(&app, &admin.access, "account.locked").await;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0]["resource"], id.as_str());
        assert_eq!(e[0]["actor"], "system");
        assert_eq!(
            audit_action(&app, &admin.access, "login.failed")
                .await
                .len(),
            3
        );

        // a customer cannot unlock anyone
        let other = app.user("other@example.com").await;
        app.post(
            &format!("/v1/admin/users/{id}/unlock"),
            Some(&other.access),
            json!({}),
        )
        .await
        .assert_problem(403, "forbidden");
        app.login_device("guess@example.com", PASSWORD, "dev-1")
            .await
            .assert_problem(423, "account_locked");

        let r = app
            .post(
                &format!("/v1/admin/users/{id}/unlock"),
                Some(&admin.access),
                json!({}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let e = audit_action(&app, &admin.access, "account.unlocked").await;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0]["resource"], id.as_str());
        assert_eq!(e[0]["actor"], jwt_part(&admin.access, 1)["sub"]);
        app.login("guess@example.com", PASSWORD).await;

        // the next lock lasts longer (growing back-off)
        for _ in 0..3 {
            app.login_device("guess@example.com", "Wrong-password-123!", "d")
                .await
                .assert_problem(401, "invalid_credentials");
        }
        let locked = app
            .login_device("guess@example.com", PASSWORD, "dev-1")
            .await;
        locked.assert_problem(423, "account_locked");
        let retry2: i64 = locked.header("retry-after").unwrap().parse().unwrap();
        assert!(
            retry2 > 60 && retry2 <= 120,
            "second lock doubles: {retry2}"
        );
        app.post(
            "/v1/admin/users/00000000-0000-0000-0000-000000000000/unlock",
            Some(&admin.access),
            json!({}),
        )
        .await
        .assert_problem(404, "not_found");
        app.stop().await;
    });
}

#[track_caller]
fn assert_rate_limited(r: &Resp, limit: u32) {
    r.assert_problem(429, "rate_limited");
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(
        r.header("ratelimit-limit"),
        Some(limit.to_string().as_str())
    );
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    let reset: u64 = r
        .header("ratelimit-reset")
        .expect("RateLimit-Reset")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&reset), "{reset}");
}

#[tokio::test]
async fn rate_limits_answer_429_with_headers() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn_with(backend, |cfg| {
            let rl = &mut cfg.auth.rate_limits;
            rl.login_per_ip = Quota::new(2, 60);
            rl.register_per_ip = Quota::new(2, 60);
            rl.refresh_per_ip = Quota::new(2, 60);
            rl.reset_per_ip = Quota::new(1, 60);
        })
        .await;
        id_of(&app.register("rl1@example.com").await);
        id_of(&app.register("rl2@example.com").await);
        let users = app.count("users").await;
        let r = app.register("rl3@example.com").await;
        assert_rate_limited(&r, 2);
        assert_eq!(app.count("users").await, users, "nothing written");

        let t = app.login("rl1@example.com", PASSWORD).await;
        app.login_device("rl2@example.com", "Wrong-password-123!", "d")
            .await
            .assert_problem(401, "invalid_credentials");
        let audit_rows = app.count("audit_log").await;
        // the right password does not get through either
        let r = app.login_device("rl1@example.com", PASSWORD, "dev-1").await;
        assert_rate_limited(&r, 2);
        assert_eq!(
            app.count("audit_log").await,
            audit_rows,
            "a refused attempt is not even counted"
        );

        let r1 = refresh(&app, &t.refresh).await;
        assert_eq!(r1.status, StatusCode::OK, "{}", r1.text);
        let r2 = refresh(&app, r1.body["refresh_token"].as_str().unwrap()).await;
        assert_eq!(r2.status, StatusCode::OK, "{}", r2.text);
        let rt3 = r2.body["refresh_token"].as_str().unwrap().to_owned();
        let r3 = refresh(&app, &rt3).await;
        assert_eq!(r3.status, StatusCode::TOO_MANY_REQUESTS, "{}", r3.text);
        assert_eq!(r3.body["error"], "slow_down", "{}", r3.text);
        assert!(r3.header("retry-after").is_some(), "{:?}", r3.headers);

        let f = app
            .post(
                "/v1/auth/password/forgot",
                None,
                json!({ "email": "rl1@example.com" }),
            )
            .await;
        assert_eq!(f.status, StatusCode::ACCEPTED, "{}", f.text);
        let f = app
            .post(
                "/v1/auth/password/forgot",
                None,
                json!({ "email": "rl1@example.com" }),
            )
            .await;
        assert_rate_limited(&f, 1);
        app.stop().await;
    });
}

#[tokio::test]
async fn users_cannot_reach_each_others_sessions_or_admin_routes() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let a = app.user("a@example.com").await;
        let a_id = jwt_part(&a.access, 1)["sub"].as_str().unwrap().to_owned();
        let b = app.user("b@example.com").await;
        let b_id = jwt_part(&b.access, 1)["sub"].as_str().unwrap().to_owned();

        let list = app.get("/v1/sessions", Some(&b.access)).await;
        assert_eq!(list.status, StatusCode::OK);
        let ids: Vec<&str> = list.body["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec![b.session.as_str()], "B sees only B's sessions");
        assert!(!list.text.contains(&a.session));

        let r = app
            .delete(&format!("/v1/sessions/{}", a.session), Some(&b.access))
            .await;
        r.assert_problem(404, "not_found");
        // the same answer as for a session that does not exist: no oracle
        let r2 = app
            .delete(
                "/v1/sessions/00000000-0000-7000-8000-000000000000",
                Some(&b.access),
            )
            .await;
        r2.assert_problem(404, "not_found");
        assert_eq!(r.body["detail"], r2.body["detail"]);
        assert_eq!(
            app.get("/v1/me", Some(&a.access)).await.status,
            StatusCode::OK,
            "A's session lives"
        );

        // customers get 403 on every admin route, and cannot escalate
        for path in [
            "/v1/admin/audit",
            "/v1/admin/roles",
            &format!("/v1/admin/users/{a_id}"),
        ] {
            app.get(path, Some(&b.access))
                .await
                .assert_problem(403, "forbidden");
        }
        app.post(
            &format!("/v1/admin/users/{b_id}/roles"),
            Some(&b.access),
            json!({ "role": "admin" }),
        )
        .await
        .assert_problem(403, "forbidden");
        app.delete(
            &format!("/v1/admin/users/{a_id}/roles/customer"),
            Some(&b.access),
        )
        .await
        .assert_problem(403, "forbidden");
        let me = app.get("/v1/me", Some(&b.access)).await;
        assert_eq!(me.body["roles"], json!(["customer"]), "{}", me.text);
        // no token at all
        app.get("/v1/admin/audit", None)
            .await
            .assert_problem(401, "missing_token");
        app.get("/v1/sessions", None)
            .await
            .assert_problem(401, "missing_token");
        app.stop().await;
    });
}

#[tokio::test]
async fn forged_and_garbage_tokens_are_refused() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let t = app.user("target@example.com").await;
        let jwks = app.get("/.well-known/jwks.json", None).await;
        let kid = jwks.body["keys"][0]["kid"].as_str().unwrap().to_owned();
        let x = jwks.body["keys"][0]["x"].as_str().unwrap().to_owned();
        let header = jwt_part(&t.access, 0);
        let claims = jwt_part(&t.access, 1);
        let sig = t.access.rsplit('.').next().unwrap().to_owned();
        let bearer = |tok: &str| HeaderValue::from_str(&format!("Bearer {tok}")).unwrap();
        let enc = |v: &Value| b64url(v.to_string().as_bytes());

        // control: the real token works, in any scheme case
        assert_eq!(
            me_with(&app, &[bearer(&t.access)]).await.status,
            StatusCode::OK
        );
        let lower = HeaderValue::from_str(&format!("bearer {}", t.access)).unwrap();
        assert_eq!(me_with(&app, &[lower]).await.status, StatusCode::OK);

        let none_hdr = json!({ "alg": "none", "typ": "JWT", "kid": kid });
        let mut admin_claims = claims.clone();
        admin_claims["roles"] = json!(["admin"]);
        let hs_hdr = json!({ "alg": "HS256", "typ": "JWT", "kid": kid });
        let (attacker, _) = vaultpay_core::jwt::Signer25519::generate("attacker-kid");
        let (attacker_same_kid, _) = vaultpay_core::jwt::Signer25519::generate(kid.clone());
        let x_bytes = crate::auth_flows::b64url_decode(&x);
        let forged: Vec<(&str, String)> = vec![
            (
                "alg none, empty signature",
                format!("{}.{}.", enc(&none_hdr), enc(&claims)),
            ),
            (
                "alg none, no signature part",
                format!("{}.{}", enc(&none_hdr), enc(&claims)),
            ),
            (
                "alg none, original signature",
                format!("{}.{}.{sig}", enc(&none_hdr), enc(&claims)),
            ),
            (
                "alg NONE",
                format!(
                    "{}.{}.",
                    enc(&json!({ "alg": "NONE", "kid": kid })),
                    enc(&claims)
                ),
            ),
            (
                "HS256 keyed with the raw public key",
                hs256(&hs_hdr, &claims, &x_bytes),
            ),
            (
                "HS256 keyed with the JWK x string",
                hs256(&hs_hdr, &claims, x.as_bytes()),
            ),
            ("unknown kid", attacker.sign_access(&claims).unwrap()),
            (
                "real kid, attacker key",
                attacker_same_kid.sign_access(&admin_claims).unwrap(),
            ),
            (
                "no kid",
                format!(
                    "{}.{}.{sig}",
                    enc(&json!({ "alg": "EdDSA", "typ": "JWT" })),
                    enc(&claims)
                ),
            ),
            (
                "crit header",
                format!(
                    "{}.{}.{sig}",
                    enc(&json!({ "alg": "EdDSA", "kid": kid, "crit": ["exp"] })),
                    enc(&claims)
                ),
            ),
            (
                "tampered roles",
                format!("{}.{}.{sig}", enc(&header), enc(&admin_claims)),
            ),
            (
                "signature stripped",
                format!("{}.{}.", enc(&header), enc(&claims)),
            ),
            ("four parts", format!("{}.x", t.access)),
            ("not base64", "a.b.c".to_owned()),
            (
                "huge header",
                format!("{}.{}.{sig}", b64url(&[b'{'; 600]), enc(&claims)),
            ),
        ];
        for (what, tok) in &forged {
            assert_refused(&me_with(&app, &[bearer(tok)]).await, "invalid_token", what);
        }

        // validly signed with the real key, but the claims are wrong
        let now = vaultpay_core::time::now_micros() / 1_000_000;
        let mut ok = claims.clone();
        ok["iat"] = json!(now);
        ok["nbf"] = json!(now);
        ok["exp"] = json!(now + 60);
        let control = sign_with_real_key(&app, &ok).await;
        // the same claims under the real key, but typed as some other JWT (an ID
        // token's `typ: JWT`): not an access token (RFC 9068), refused
        let loaded = vaultpay_auth::keys::load(app.auth_db(), &envelope(&app))
            .await
            .unwrap();
        let other_jwt = loaded.signer.sign(&ok).unwrap();
        assert_refused(
            &me_with(&app, &[bearer(&other_jwt)]).await,
            "invalid_token",
            "typ JWT",
        );
        assert_eq!(
            me_with(&app, &[bearer(&control)]).await.status,
            StatusCode::OK,
            "the forging path itself works"
        );
        let variants: Vec<(&str, Value)> = vec![
            (
                "expired",
                json!({ "exp": now - 60, "iat": now - 360, "nbf": now - 360 }),
            ),
            ("not yet valid", json!({ "nbf": now + 120 })),
            ("wrong audience", json!({ "aud": "someone-else" })),
            ("wrong audience list", json!({ "aud": ["a", "b"] })),
            ("wrong issuer", json!({ "iss": "https://evil.example" })),
        ];
        for (what, patch) in variants {
            let mut c = ok.clone();
            for (k, v) in patch.as_object().unwrap() {
                c[k] = v.clone();
            }
            let tok = sign_with_real_key(&app, &c).await;
            assert_refused(&me_with(&app, &[bearer(&tok)]).await, "invalid_token", what);
        }

        // garbage Authorization headers
        let garbage: Vec<(&str, HeaderValue)> = vec![
            ("scheme only", HeaderValue::from_static("Bearer")),
            ("Basic", HeaderValue::from_static("Basic abc")),
            (
                "Basic with credentials",
                HeaderValue::from_static("Basic dmF1bHRwYXktbGVkZ2VyOnNlY3JldA=="),
            ),
            ("token with a space", HeaderValue::from_static("Bearer a b")),
            (
                "raw token, no scheme",
                HeaderValue::from_str(&t.access).unwrap(),
            ),
            (
                "5000 chars",
                HeaderValue::from_str(&format!("Bearer {}", "a".repeat(5000))).unwrap(),
            ),
            (
                "non-ASCII",
                HeaderValue::from_bytes("Bearer tökén".as_bytes()).unwrap(),
            ),
            (
                "tab inside",
                HeaderValue::from_bytes(b"Bearer a\tb").unwrap(),
            ),
            (
                "latin-1 bytes",
                HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
            ),
            ("quotes", HeaderValue::from_static("Bearer \"abc\"")),
            ("dots only", HeaderValue::from_static("Bearer ...")),
        ];
        for (what, v) in garbage {
            assert_refused(&me_with(&app, &[v]).await, "invalid_token", what);
        }
        assert_refused(
            &me_with(&app, &[bearer(&t.access), bearer(&t.access)]).await,
            "invalid_token",
            "two headers",
        );
        let none = me_with(&app, &[]).await;
        assert_refused(&none, "missing_token", "no header");
        // no credentials sent: the challenge carries no error code (RFC 6750 §3.1)
        assert_eq!(none.header("www-authenticate"), Some("Bearer"));
        // after all that, the real token still works (nothing was poisoned)
        assert_eq!(
            me_with(&app, &[bearer(&t.access)]).await.status,
            StatusCode::OK
        );
        app.stop().await;
    });
}

/// A sign-in whose password was changed while Argon2 checked it opens no session.
/// PostgreSQL, to order it deterministically: a transaction holds the user's row, so
/// the sign-in, having matched the old hash, waits at its session transaction; the
/// password then changes and that transaction commits. (SQLite has no row lock to
/// hold the sign-in there.)
#[tokio::test]
async fn a_password_changed_during_the_hash_refuses_the_sign_in() {
    for backend in vaultpay_store::testing::backends() {
        if backend != Backend::Postgres {
            continue;
        }
        let app = TestApp::spawn(backend).await;
        let email = "race@example.com";
        let id = crate::auth_flows::id_of(&app.register(email).await);
        // a first sign-in trusts the network (the first one's IP-trust step locks the
        // user row too)
        app.login(email, PASSWORD).await;
        // the sign-in waits at its session transaction, after Argon2
        let r = sign_in_while_the_password_changes(
            &app,
            &id,
            "UPDATE users SET failed_logins = 0",
            app.login_device(email, PASSWORD, "dev-race"),
        )
        .await;
        r.assert_problem(401, "invalid_credentials");
        assert_eq!(
            app.count_where("sessions", "device_id = 'dev-race'").await,
            0
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn rotated_out_keys_stop_verifying_when_retired() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let old = app.user("rotor@example.com").await;
        let old_kid = jwt_part(&old.access, 0)["kid"].as_str().unwrap().to_owned();
        let env = envelope(&app);
        let db = app.auth_db();

        // no publication delay: the new key signs at once
        let new_kid = vaultpay_auth::keys::rotate(db, &env, 0, 3600, "test")
            .await
            .unwrap();
        assert_ne!(new_kid, old_kid);
        app.auth().reload_keys().await.unwrap();
        let kids = published_kids(&app).await;
        assert_eq!(kids.len(), 2, "{kids:?}");
        assert!(kids.contains(&old_kid) && kids.contains(&new_kid));
        // the overlap: tokens of the old key still verify; new ones use the new key
        assert_eq!(
            app.get("/v1/me", Some(&old.access)).await.status,
            StatusCode::OK
        );
        let fresh = app.login("rotor@example.com", PASSWORD).await;
        assert_eq!(jwt_part(&fresh.access, 0)["kid"], new_kid.as_str());
        assert_eq!(
            app.get("/v1/me", Some(&fresh.access)).await.status,
            StatusCode::OK
        );

        // the signing key cannot be retired; the rotated-out one can
        assert!(!vaultpay_auth::keys::retire(db, &new_kid, "test")
            .await
            .unwrap());
        assert!(vaultpay_auth::keys::retire(db, &old_kid, "test")
            .await
            .unwrap());
        app.auth().reload_keys().await.unwrap();
        assert_eq!(published_kids(&app).await, vec![new_kid.clone()]);
        let r = app.get("/v1/me", Some(&old.access)).await;
        assert_refused(&r, "invalid_token", "token of a retired key");
        assert_eq!(
            app.get("/v1/me", Some(&fresh.access)).await.status,
            StatusCode::OK
        );
        // the old session itself is fine: its refresh token yields a token of the new key
        let r = refresh(&app, &old.refresh).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(
            jwt_part(r.body["access_token"].as_str().unwrap(), 0)["kid"],
            new_kid.as_str()
        );
        app.login("rotor@example.com", PASSWORD).await;

        let admin = app.admin().await;
        assert_eq!(
            audit_action(&app, &admin.access, "key.rotated").await.len(),
            1
        );
        assert_eq!(
            audit_action(&app, &admin.access, "key.retired").await.len(),
            1
        );
        app.stop().await;
    });
}

/// Moves every time of the keys in `table` an hour back, as if an hour had passed.
pub(crate) async fn an_hour_passes_for(db: &vaultpay_store::Db, table: &str) {
    for col in ["signs_from", "retired_at", "verify_until", "created_at"] {
        sqlx::query(&format!(
            "UPDATE {table} SET {col} = {col} - 3600000000 WHERE {col} IS NOT NULL"
        ))
        .execute(db.writer())
        .await
        .unwrap();
    }
}

/// The kids a server's JWKS publishes.
async fn published_kids(app: &TestApp) -> Vec<String> {
    let jwks = app.get("/.well-known/jwks.json", None).await;
    jwks.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// The kid that signs the next login's access token (after the server reloads its keys).
async fn signing_kid(app: &TestApp, email: &str) -> String {
    app.auth().reload_keys().await.unwrap();
    let t = app.login(email, PASSWORD).await;
    jwt_part(&t.access, 0)["kid"].as_str().unwrap().to_owned()
}

/// `keys rotate` publishes the new key before it signs: a relying party that cached the
/// JWKS would refuse tokens of a key it has not fetched. Until the switch the old key
/// signs and cannot be retired; at the switch the new one signs and the old one
/// verifies for the overlap. `keys rotate --now` (a compromised key) skips the wait.
#[tokio::test]
async fn a_rotated_in_key_is_published_before_it_signs() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let email = "herald@example.com";
        let old = app.user(email).await;
        let old_kid = jwt_part(&old.access, 0)["kid"].as_str().unwrap().to_owned();
        let env = envelope(&app);
        let db = app.auth_db();

        let staged = vaultpay_auth::keys::rotate(db, &env, 3600, 600, "test")
            .await
            .unwrap();
        app.auth().reload_keys().await.unwrap();
        let kids = published_kids(&app).await;
        assert!(
            kids.contains(&staged) && kids.contains(&old_kid),
            "{kids:?}"
        );
        assert_eq!(signing_kid(&app, email).await, old_kid, "not yet switched");
        let list = vaultpay_auth::keys::list(db).await.unwrap();
        let row = |kid: &str| list.iter().find(|k| k.kid == kid).unwrap().clone();
        assert!(row(&old_kid).signing && !row(&staged).signing, "{list:?}");
        assert!(row(&staged).signs_from.is_some(), "{list:?}");
        assert_eq!(row(&old_kid).signs_until, row(&staged).signs_from);
        // the key that still signs cannot be retired, nor can the one about to
        for kid in [&old_kid, &staged] {
            assert!(!vaultpay_auth::keys::retire(db, kid, "test").await.unwrap());
        }

        an_hour_passes_for(db, "signing_keys").await;
        assert_eq!(signing_kid(&app, email).await, staged, "switched");
        assert_eq!(
            app.get("/v1/me", Some(&old.access)).await.status,
            StatusCode::OK,
            "the old key's tokens verify for the overlap"
        );
        assert!(published_kids(&app).await.contains(&old_kid));
        assert!(vaultpay_auth::keys::retire(db, &old_kid, "test")
            .await
            .unwrap());
        // a later rotation never lengthens a retired key's life, even when a clock
        // that ran ahead put its stop time after the new switch
        sqlx::query("UPDATE signing_keys SET retired_at = retired_at + 7200000000 WHERE kid = $1")
            .bind(&old_kid)
            .execute(db.writer())
            .await
            .unwrap();
        let until = || async {
            sqlx::query_scalar::<_, i64>("SELECT verify_until FROM signing_keys WHERE kid = $1")
                .bind(&old_kid)
                .fetch_one(db.read())
                .await
                .unwrap()
        };
        let retired_until = until().await;

        // a compromise during a staged rotation: `--now` signs with a newer key at once;
        // the staged key never signs and can be retired straight away
        let staged2 = vaultpay_auth::keys::rotate(db, &env, 3600, 600, "test")
            .await
            .unwrap();
        let now_kid = vaultpay_auth::keys::rotate(db, &env, 0, 600, "test")
            .await
            .unwrap();
        assert_eq!(until().await, retired_until, "a retired key stays retired");
        assert_eq!(signing_kid(&app, email).await, now_kid);
        for kid in [&staged, &staged2] {
            assert!(vaultpay_auth::keys::retire(db, kid, "test").await.unwrap());
        }
        app.auth().reload_keys().await.unwrap();
        assert_eq!(published_kids(&app).await, vec![now_kid.clone()]);
        assert!(!vaultpay_auth::keys::retire(db, &now_kid, "test")
            .await
            .unwrap());
        app.stop().await;
    });
}

#[tokio::test]
async fn introspection_needs_client_auth_and_follows_the_session() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn_with(backend, |cfg| {
            cfg.auth.introspection_secret = Some(Secret::new("ledger-secret-42"))
        })
        .await;
        let t = app.user("intro@example.com").await;
        let introspect = |user: Option<(&'static str, &'static str)>, token: String| {
            let mut req = app
                .http
                .post(format!("{}/oauth/introspect", app.base))
                .form(&[("token", token)]);
            if let Some((u, p)) = user {
                req = req.basic_auth(u, Some(p));
            }
            async move { read(req.send().await.unwrap()).await }
        };
        for creds in [
            None,
            Some(("vaultpay-ledger", "wrong")),
            Some(("someone-else", "ledger-secret-42")),
        ] {
            let r = introspect(creds, t.access.clone()).await;
            assert_oauth_error(&r, 401, "invalid_client");
            assert!(
                r.header("www-authenticate")
                    .unwrap_or("")
                    .starts_with("Basic"),
                "{:?}",
                r.headers
            );
            assert!(r.body.get("active").is_none());
        }
        let ledger = Some(("vaultpay-ledger", "ledger-secret-42"));
        let r = introspect(ledger, t.access.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["active"], true);
        assert_eq!(r.body["sid"], t.session.as_str());
        assert_eq!(r.body["sub"], jwt_part(&t.access, 1)["sub"]);
        assert!(r.body["roles"]
            .as_array()
            .unwrap()
            .contains(&json!("customer")));
        let r = introspect(ledger, "garbage".into()).await;
        assert_eq!(r.body, json!({ "active": false }), "{}", r.text);

        let out = app
            .send(
                reqwest::Method::POST,
                "/v1/auth/logout",
                Some(&t.access),
                None,
            )
            .await;
        assert_eq!(out.status, StatusCode::OK);
        let r = introspect(ledger, t.access.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(
            r.body,
            json!({ "active": false }),
            "a logged-out token is inactive: {}",
            r.text
        );
        app.stop().await;
    });
}

#[tokio::test]
async fn a_revoked_sessions_token_cannot_act() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let stolen = app.user("owner@example.com").await;
        let r = app
            .login_device("owner@example.com", PASSWORD, "dev-2")
            .await;
        let mine = r.body["access_token"].as_str().unwrap().to_owned();
        // the owner ends the stolen session; its access token has not expired yet
        let del = app
            .delete(&format!("/v1/sessions/{}", stolen.session), Some(&mine))
            .await;
        assert_eq!(del.status, StatusCode::NO_CONTENT, "{}", del.text);
        let mails = app.mails().len();
        let audit_rows = app.count("audit_log").await;

        // "log out everywhere" with the dead token would end the owner's live sessions
        let r = app
            .post(
                "/v1/auth/logout",
                Some(&stolen.access),
                json!({ "everywhere": true }),
            )
            .await;
        r.assert_problem(401, "session_revoked");
        assert_eq!(
            app.get("/v1/me", Some(&mine)).await.status,
            StatusCode::OK,
            "the owner's session survives"
        );
        app.post("/v1/auth/password/change", Some(&stolen.access), json!({ "current_password": PASSWORD, "new_password": crate::auth_flows::NEW_PASSWORD }))
            .await
            .assert_problem(401, "session_revoked");
        app.send(
            reqwest::Method::POST,
            "/v1/auth/verify-email/resend",
            Some(&stolen.access),
            None,
        )
        .await
        .assert_problem(401, "session_revoked");
        app.get("/v1/sessions", Some(&stolen.access))
            .await
            .assert_problem(401, "session_revoked");
        app.delete(
            &format!("/v1/sessions/{}", stolen.session),
            Some(&stolen.access),
        )
        .await
        .assert_problem(401, "session_revoked");
        assert_eq!(app.mails().len(), mails, "no mail sent");
        assert_eq!(app.count("audit_log").await, audit_rows, "nothing written");
        app.stop().await;
    });
}

#[tokio::test]
async fn device_ids_compare_the_same_at_login_and_refresh() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        id_of(&app.register("pad@example.com").await);
        let r = app
            .login_device("pad@example.com", PASSWORD, " phone-7 ")
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let rt = r.body["refresh_token"].as_str().unwrap().to_owned();
        // the client presents the very device id it logged in with
        let r = app
            .token_form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", &rt),
                ("device_id", " phone-7 "),
            ])
            .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "the same device must not be treated as another one: {}",
            r.text
        );
        app.stop().await;
    });
}

#[tokio::test]
async fn a_reset_spends_every_outstanding_reset_token() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        id_of(&app.register("twice@example.com").await);
        for _ in 0..2 {
            let r = app
                .post(
                    "/v1/auth/password/forgot",
                    None,
                    json!({ "email": "twice@example.com" }),
                )
                .await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        }
        let mails: Vec<String> = app
            .mails()
            .into_iter()
            .filter(|m| m.contains("password/reset?token="))
            .collect();
        assert_eq!(mails.len(), 2);
        let token_of = |m: &str| -> String {
            let i = m.find("password/reset?token=").unwrap() + "password/reset?token=".len();
            m[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect()
        };
        let (older, newer) = (token_of(&mails[0]), token_of(&mails[1]));
        assert_ne!(older, newer);
        let r = crate::auth_flows::reset_pw(&app, &newer, crate::auth_flows::NEW_PASSWORD).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        // an older link (say, from a mailbox the attacker once read) no longer works
        crate::auth_flows::reset_pw(&app, &older, crate::auth_flows::THIRD_PASSWORD)
            .await
            .assert_problem(400, "invalid_token");
        app.login("twice@example.com", crate::auth_flows::NEW_PASSWORD)
            .await;
        app.stop().await;
    });
}

#[tokio::test]
async fn concurrent_refreshes_spend_a_token_once() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let t = app.user("twins@example.com").await;
        let results = futures::future::join_all((0..4).map(|_| refresh(&app, &t.refresh))).await;
        for r in &results {
            assert!(!r.status.is_server_error(), "{}", r.text);
        }
        let ok: Vec<&Resp> = results
            .iter()
            .filter(|r| r.status == StatusCode::OK)
            .collect();
        assert_eq!(
            ok.len(),
            1,
            "a refresh token is spent exactly once: {:?}",
            results.iter().map(|r| &r.text).collect::<Vec<_>>()
        );
        for r in results.iter().filter(|r| r.status != StatusCode::OK) {
            assert_oauth_error(r, 400, "invalid_grant");
        }
        // the replays were reuse: the family is revoked, the winner's pair included
        let winner_rt = ok[0].body["refresh_token"].as_str().unwrap();
        assert_oauth_error(&refresh(&app, winner_rt).await, 400, "invalid_grant");
        app.get("/v1/me", Some(&t.access))
            .await
            .assert_problem(401, "session_revoked");
        app.stop().await;
    });
}

#[tokio::test]
async fn concurrent_registrations_of_one_email_create_one_account() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let users = app.count("users").await;
        let emails = [
            "race@example.com",
            "RACE@example.com",
            " race@example.com",
            "Race@Example.com",
        ];
        let results = futures::future::join_all(emails.iter().map(|e| app.register(e))).await;
        let created = results
            .iter()
            .filter(|r| r.status == StatusCode::CREATED)
            .count();
        assert_eq!(
            created,
            1,
            "{:?}",
            results.iter().map(|r| &r.text).collect::<Vec<_>>()
        );
        for r in results.iter().filter(|r| r.status != StatusCode::CREATED) {
            r.assert_problem(409, "email_taken");
        }
        assert_eq!(app.count("users").await, users + 1);
        app.stop().await;
    });
}

#[tokio::test]
async fn expired_email_links_are_refused() {
    each_backend!(|backend: Backend| async move {
        // a lifetime of 0 seconds: every link is expired the moment it is mailed
        let app = TestApp::spawn_with(backend, |cfg| {
            cfg.auth.email_verify_ttl_secs = 0;
            cfg.auth.password_reset_ttl_secs = 0;
        })
        .await;
        id_of(&app.register("late@example.com").await);
        let token = crate::auth_flows::mail_token(&app, "late@example.com", "verify-email?token=");
        app.post("/v1/auth/verify-email", None, json!({ "token": token }))
            .await
            .assert_problem(400, "invalid_token");
        let r = app
            .post(
                "/v1/auth/password/forgot",
                None,
                json!({ "email": "late@example.com" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let token =
            crate::auth_flows::mail_token(&app, "late@example.com", "password/reset?token=");
        crate::auth_flows::reset_pw(&app, &token, crate::auth_flows::NEW_PASSWORD)
            .await
            .assert_problem(400, "invalid_token");
        app.login("late@example.com", PASSWORD).await;
        app.stop().await;
    });
}

/// Rotations commit in groups; each is still decided as if it ran alone: fresh tokens
/// rotate, a token presented twice in the same burst is reuse (its session revoked,
/// the winner's pair included), garbage is refused, and the audit chain stays whole.
#[tokio::test]
async fn grouped_rotations_decide_each_token_as_if_alone() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn_with(backend, |cfg| {
            cfg.auth.rate_limits.register_per_ip = Quota::new(100, 60);
            cfg.auth.rate_limits.login_per_ip = Quota::new(100, 60);
        })
        .await;
        let mut users = Vec::new();
        for i in 0..12 {
            users.push(app.user(&format!("burst{i}@example.com")).await);
        }
        // users 0..8 refresh once; users 8..12 present their token twice
        let mut presented: Vec<(usize, String)> = Vec::new();
        for (i, t) in users.iter().enumerate() {
            presented.push((i, t.refresh.clone()));
            if i >= 8 {
                presented.push((i, t.refresh.clone()));
            }
        }
        presented.push((usize::MAX, "not-a-refresh-token".into()));
        let results =
            futures::future::join_all(presented.iter().map(|(_, rt)| refresh(&app, rt))).await;
        for r in &results {
            assert!(!r.status.is_server_error(), "{}", r.text);
        }
        for (i, user) in users.iter().enumerate() {
            let mine: Vec<&Resp> = presented
                .iter()
                .zip(&results)
                .filter(|((who, _), _)| *who == i)
                .map(|(_, r)| r)
                .collect();
            let ok: Vec<&&Resp> = mine.iter().filter(|r| r.status == StatusCode::OK).collect();
            assert_eq!(ok.len(), 1, "user {i}: one rotation wins");
            let next = ok[0].body["refresh_token"].as_str().unwrap();
            let again = refresh(&app, next).await;
            if i < 8 {
                assert_eq!(again.status, StatusCode::OK, "user {i}: {}", again.text);
            } else {
                // the duplicate was reuse: the whole family is gone
                assert_oauth_error(&again, 400, "invalid_grant");
                app.get("/v1/me", Some(&user.access))
                    .await
                    .assert_problem(401, "session_revoked");
            }
        }
        assert_oauth_error(results.last().unwrap(), 400, "invalid_grant");
        let reuse = app
            .count_where("audit_log", "action = 'refresh.reuse_detected'")
            .await;
        assert_eq!(reuse, 4);
        assert_eq!(
            vaultpay_store::audit::verify_chain(app.auth_db())
                .await
                .unwrap(),
            vaultpay_store::audit::ChainReport::Intact {
                entries: app.count("audit_log").await as u64
            }
        );
        app.stop().await;
    });
}

/// A rotation that fails in the database (a fault injected by a trigger on one
/// session's row) fails alone: the rotations committed with it in the same burst
/// succeed, and the failed one wrote nothing, so its token still works afterwards.
#[tokio::test]
async fn a_failing_rotation_fails_alone_and_writes_nothing() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn_with(backend, |cfg| {
            cfg.auth.rate_limits.register_per_ip = Quota::new(100, 60);
            cfg.auth.rate_limits.login_per_ip = Quota::new(100, 60);
        })
        .await;
        let mut users = Vec::new();
        for i in 0..6 {
            users.push(app.user(&format!("fault{i}@example.com")).await);
        }
        let bad = &users[2];
        let db = app.auth_db();
        let install: Vec<String> = match backend {
            Backend::Sqlite => vec![format!(
                "CREATE TRIGGER fail_one BEFORE UPDATE ON sessions WHEN NEW.id = '{}' \
                 BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
                bad.session
            )],
            Backend::Postgres => vec![
                format!(
                    "CREATE FUNCTION fail_one() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                     IF NEW.id = '{}' THEN RAISE EXCEPTION 'injected fault'; END IF; RETURN NEW; END $$",
                    bad.session
                ),
                "CREATE TRIGGER fail_one BEFORE UPDATE ON sessions FOR EACH ROW EXECUTE FUNCTION fail_one()"
                    .into(),
            ],
        };
        for sql in &install {
            sqlx::raw_sql(sql).execute(db.writer()).await.unwrap();
        }
        let results =
            futures::future::join_all(users.iter().map(|u| refresh(&app, &u.refresh))).await;
        for (i, r) in results.iter().enumerate() {
            if i == 2 {
                assert!(r.status.is_server_error(), "{}", r.text);
            } else {
                assert_eq!(r.status, StatusCode::OK, "user {i}: {}", r.text);
            }
        }
        let drop = match backend {
            Backend::Sqlite => "DROP TRIGGER fail_one",
            Backend::Postgres => "DROP TRIGGER fail_one ON sessions",
        };
        sqlx::raw_sql(drop).execute(db.writer()).await.unwrap();
        // nothing of the failed rotation was written: its token is still unspent
        let again = refresh(&app, &bad.refresh).await;
        assert_eq!(again.status, StatusCode::OK, "{}", again.text);
        assert_eq!(
            vaultpay_store::audit::verify_chain(db).await.unwrap(),
            vaultpay_store::audit::ChainReport::Intact {
                entries: app.count("audit_log").await as u64
            }
        );
        app.stop().await;
    });
}
