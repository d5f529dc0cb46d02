//! AuthShield flows end to end: register → login → me → refresh → logout, sessions,
//! email verification and password reset through the file outbox, password change,
//! the JWKS and the claims of access tokens, and role changes.
//!
//! The small helpers at the top (`b64url`, JWT decoding, audit queries, requests with
//! extra headers) are shared with the other AuthShield test files.

use crate::each_backend;
use crate::helpers::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use vaultpay_store::Backend;

/// A second strong password (not in anyone's history at the start).
pub const NEW_PASSWORD: &str = "Tangerine-Quokka-Lantern-97";
/// A third one.
pub const THIRD_PASSWORD: &str = "Velvet-Glacier-Mosaic-31x";
/// The User-Agent every helper here sends, so audit entries can be checked.
pub const UA: &str = "vaultpay-it/1.0";

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding (RFC 4648 §5).
pub fn b64url(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Decodes base64url (padding tolerated).
pub fn b64url_decode(s: &str) -> Vec<u8> {
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in s.trim_end_matches('=').bytes() {
        let v = B64
            .iter()
            .position(|&x| x == c)
            .unwrap_or_else(|| panic!("not base64url: {s}")) as u32;
        bits = (bits << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    out
}

/// Part `i` (0 header, 1 payload) of a JWT as JSON.
pub fn jwt_part(token: &str, i: usize) -> Value {
    let part = token.split('.').nth(i).unwrap();
    serde_json::from_slice(&b64url_decode(part)).unwrap()
}

/// Sends a request with `X-Request-Id: rid` (when given), a User-Agent and extra headers.
pub async fn send_with(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
    rid: Option<&str>,
) -> Resp {
    let mut req = app
        .http
        .request(method, format!("{}{path}", app.base))
        .header("user-agent", UA);
    if let Some(r) = rid {
        req = req.header("x-request-id", r);
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    read(req.send().await.unwrap()).await
}

/// `POST /oauth/token` form post with a request id and User-Agent.
pub async fn token_form_rid(app: &TestApp, fields: &[(&str, &str)], rid: &str) -> Resp {
    let req = app
        .http
        .post(format!("{}/oauth/token", app.base))
        .header("user-agent", UA)
        .header("x-request-id", rid)
        .form(fields);
    read(req.send().await.unwrap()).await
}

/// The refresh grant for device `dev-1`.
pub async fn refresh(app: &TestApp, rt: &str) -> Resp {
    app.token_form(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", rt),
        ("device_id", "dev-1"),
    ])
    .await
}

/// Asserts an RFC 6749 §5.2 error (JSON `{error, error_description}`, no problem document).
#[track_caller]
pub fn assert_oauth_error(r: &Resp, status: u16, error: &str) {
    assert_eq!(r.status.as_u16(), status, "{}", r.text);
    assert_eq!(r.body["error"], error, "{}", r.text);
    assert!(r.body["error_description"].is_string(), "{}", r.text);
    assert!(
        r.body.get("code").is_none(),
        "OAuth errors are not problem documents: {}",
        r.text
    );
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("application/json"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
}

/// Audit entries matching `query` (e.g. `action=login.failed&actor=…`), newest first.
pub async fn audit(app: &TestApp, admin: &str, query: &str) -> Vec<Value> {
    let r = app
        .get(&format!("/v1/admin/audit?{query}"), Some(admin))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["entries"].as_array().unwrap().clone()
}

/// Audit entries with `action`, newest first.
pub async fn audit_action(app: &TestApp, admin: &str, action: &str) -> Vec<Value> {
    audit(app, admin, &format!("action={action}&limit=500")).await
}

/// The single-use token in the newest mail to `to` whose link contains `marker`
/// (`verify-email?token=` or `password/reset?token=`).
pub fn mail_token(app: &TestApp, to: &str, marker: &str) -> String {
    let mails = app.mails();
    let mail = mails
        .iter()
        .rev()
        .find(|m| m.contains(&format!("To: {to}")) && m.contains(marker))
        .unwrap_or_else(|| panic!("no mail to {to} with {marker} in {mails:?}"));
    let start = mail.find(marker).unwrap() + marker.len();
    let token: String = mail[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    assert_eq!(token.len(), 43, "a 256-bit token: {mail}");
    token
}

/// Mails to `to` so far.
pub fn mails_to(app: &TestApp, to: &str) -> usize {
    app.mails()
        .iter()
        .filter(|m| m.contains(&format!("To: {to}")))
        .count()
}

/// The user id from a registration response.
pub fn id_of(r: &Resp) -> String {
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn register_login_me_refresh_logout() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let r = app.register("Alice@Example.com").await;
        let id = id_of(&r);
        assert_eq!(r.body["email"], "alice@example.com", "email normalised");
        assert_eq!(r.body["email_verified"], false);
        assert_eq!(r.body["roles"], json!(["customer"]));
        assert!(
            r.body.get("password_hash").is_none() && !r.text.contains("argon2"),
            "{}",
            r.text
        );

        let login = app
            .login_device("alice@example.com", PASSWORD, "dev-1")
            .await;
        assert_eq!(login.status, StatusCode::OK, "{}", login.text);
        assert_eq!(login.body["token_type"], "Bearer");
        assert_eq!(login.body["expires_in"], 300);
        assert_eq!(login.header("cache-control"), Some("no-store"));
        let at1 = login.body["access_token"].as_str().unwrap().to_owned();
        let rt1 = login.body["refresh_token"].as_str().unwrap().to_owned();
        let sid = login.body["session_id"].as_str().unwrap().to_owned();
        assert_eq!(
            b64url_decode(&rt1).len(),
            32,
            "256-bit opaque refresh token"
        );

        let me = app.get("/v1/me", Some(&at1)).await;
        assert_eq!(me.status, StatusCode::OK, "{}", me.text);
        assert_eq!(me.body["id"], id.as_str());
        assert_eq!(me.body["email"], "alice@example.com");
        assert_eq!(me.body["session_id"], sid.as_str());
        let perms: Vec<&str> = me.body["permissions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert!(
            perms.contains(&"profile:read") && perms.contains(&"sessions:manage"),
            "{perms:?}"
        );
        assert!(
            !perms.contains(&"audit:read") && !perms.contains(&"roles:manage"),
            "{perms:?}"
        );

        let r = refresh(&app, &rt1).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(r.body["token_type"], "Bearer");
        assert_eq!(r.body["session_id"], sid.as_str(), "the same session");
        let at2 = r.body["access_token"].as_str().unwrap().to_owned();
        let rt2 = r.body["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(at2, at1);
        assert_ne!(rt2, rt1, "refresh tokens rotate");
        let me = app.get("/v1/me", Some(&at2)).await;
        assert_eq!(me.status, StatusCode::OK, "{}", me.text);
        assert_eq!(me.body["id"], id.as_str());

        // logout with an empty body ends this session
        let out = app
            .send(Method::POST, "/v1/auth/logout", Some(&at2), None)
            .await;
        assert_eq!(out.status, StatusCode::OK, "{}", out.text);
        assert_eq!(out.body["status"], "logged_out");
        app.get("/v1/me", Some(&at2))
            .await
            .assert_problem(401, "session_revoked");
        app.get("/v1/me", Some(&at1))
            .await
            .assert_problem(401, "session_revoked");
        app.get("/v1/sessions", Some(&at1))
            .await
            .assert_problem(401, "session_revoked");
        let r = refresh(&app, &rt2).await;
        assert_oauth_error(&r, 400, "invalid_grant");
        app.stop().await;
    });
}

#[tokio::test]
async fn sessions_list_revoke_and_logout_everywhere() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let t1 = app.user("bob@example.com").await;
        let r = app.login_device("bob@example.com", PASSWORD, "dev-2").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let at2 = r.body["access_token"].as_str().unwrap().to_owned();
        let s2 = r.body["session_id"].as_str().unwrap().to_owned();

        let list = app.get("/v1/sessions", Some(&t1.access)).await;
        assert_eq!(list.status, StatusCode::OK, "{}", list.text);
        let sessions = list.body["sessions"].as_array().unwrap();
        assert_eq!(sessions.len(), 2, "{}", list.text);
        let mine = sessions
            .iter()
            .find(|s| s["id"] == t1.session.as_str())
            .unwrap();
        assert_eq!(mine["current"], true);
        assert_eq!(mine["device_id"], "dev-1");
        assert_eq!(mine["device_name"], "dev-1 laptop");
        assert_eq!(mine["ip"], "127.0.0.1");
        for k in ["created_at", "last_seen_at", "expires_at"] {
            assert!(
                vaultpay_core::time::parse_rfc3339(mine[k].as_str().unwrap()).is_some(),
                "{k}: {mine}"
            );
        }
        let other = sessions.iter().find(|s| s["id"] == s2.as_str()).unwrap();
        assert_eq!(other["current"], false);
        assert_eq!(other["device_name"], "dev-2 laptop");
        // from the other device, that one is current
        let list2 = app.get("/v1/sessions", Some(&at2)).await;
        let cur: Vec<_> = list2.body["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["current"] == true)
            .collect();
        assert_eq!(cur.len(), 1);
        assert_eq!(cur[0]["id"], s2.as_str());

        // revoke one session by id
        let del = app
            .delete(&format!("/v1/sessions/{s2}"), Some(&t1.access))
            .await;
        assert_eq!(del.status, StatusCode::NO_CONTENT, "{}", del.text);
        app.get("/v1/me", Some(&at2))
            .await
            .assert_problem(401, "session_revoked");
        let list = app.get("/v1/sessions", Some(&t1.access)).await;
        assert_eq!(
            list.body["sessions"].as_array().unwrap().len(),
            1,
            "{}",
            list.text
        );
        // revoking it again: it is no longer live
        app.delete(&format!("/v1/sessions/{s2}"), Some(&t1.access))
            .await
            .assert_problem(404, "not_found");

        // log out everywhere
        let r = app.login_device("bob@example.com", PASSWORD, "dev-3").await;
        let at3 = r.body["access_token"].as_str().unwrap().to_owned();
        let rt3 = r.body["refresh_token"].as_str().unwrap().to_owned();
        let out = app
            .post(
                "/v1/auth/logout",
                Some(&t1.access),
                json!({ "everywhere": true }),
            )
            .await;
        assert_eq!(out.status, StatusCode::OK, "{}", out.text);
        for t in [&t1.access, &at3] {
            app.get("/v1/me", Some(t))
                .await
                .assert_problem(401, "session_revoked");
        }
        let r = app
            .token_form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", &rt3),
                ("device_id", "dev-3"),
            ])
            .await;
        assert_oauth_error(&r, 400, "invalid_grant");
        assert_oauth_error(&refresh(&app, &t1.refresh).await, 400, "invalid_grant");

        let admin = app.admin().await;
        let e = audit_action(&app, &admin.access, "logout.everywhere").await;
        assert_eq!(e.len(), 1);
        assert_eq!(e[0]["metadata"]["sessions_revoked"], 2);
        let e = audit_action(&app, &admin.access, "session.revoked").await;
        assert_eq!(e.len(), 1);
        assert_eq!(e[0]["resource"], s2.as_str());
        app.stop().await;
    });
}

/// The verification page's button: the token as a form field.
async fn verify_form(app: &TestApp, token: &str) -> Resp {
    crate::oauth::form_post(app, "/v1/auth/verify-email", None, &[("token", token)]).await
}

/// A person who presses the verification page's button gets a page back, not JSON.
#[tokio::test]
async fn a_browser_confirming_its_address_gets_pages() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        app.register("dora@example.com").await;
        let token = mail_token(&app, "dora@example.com", "verify-email?token=");
        let r = browser_post(&app, "/v1/auth/verify-email", &[("token", &token)]).await;
        assert_page(&r, 200, "Email address confirmed");
        let t = app.login("dora@example.com", PASSWORD).await;
        let me = app.get("/v1/me", Some(&t.access)).await;
        assert_eq!(me.body["email_verified"], true, "{}", me.text);
        let again = browser_post(&app, "/v1/auth/verify-email", &[("token", &token)]).await;
        assert_page(&again, 400, "Email address not confirmed");
        app.stop().await;
    });
}

#[tokio::test]
async fn email_verification_through_the_outbox() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let id = id_of(&app.register("carol@example.com").await);
        assert_eq!(mails_to(&app, "carol@example.com"), 1);
        let token = mail_token(&app, "carol@example.com", "verify-email?token=");

        // a wrong token does nothing
        verify_form(&app, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
            .await
            .assert_problem(400, "invalid_token");
        // opening the link (or a mail scanner prefetching it) only shows a page whose
        // button posts the token; the address is not verified yet
        let page = app
            .get(&format!("/v1/auth/verify-email?token={token}"), None)
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text);
        assert!(
            page.text.contains("action=\"/v1/auth/verify-email\"")
                && page.text.contains(&format!("value=\"{token}\"")),
            "{}",
            page.text
        );
        let verified = || async {
            sqlx::query_scalar::<_, i64>("SELECT email_verified FROM users WHERE id = $1")
                .bind(&id)
                .fetch_one(app.auth_db().read())
                .await
                .unwrap()
        };
        assert_eq!(verified().await, 0);
        let r = verify_form(&app, &token).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["id"], id.as_str());
        assert_eq!(r.body["email_verified"], true);
        assert_eq!(verified().await, 1);
        // single use, by the page's form or by JSON
        verify_form(&app, &token)
            .await
            .assert_problem(400, "invalid_token");
        app.post("/v1/auth/verify-email", None, json!({ "token": token }))
            .await
            .assert_problem(400, "invalid_token");

        let t = app.login("carol@example.com", PASSWORD).await;
        let me = app.get("/v1/me", Some(&t.access)).await;
        assert_eq!(me.body["email_verified"], true, "{}", me.text);
        // already verified: resend answers 202 and sends nothing
        let r = app
            .send(
                Method::POST,
                "/v1/auth/verify-email/resend",
                Some(&t.access),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        assert_eq!(mails_to(&app, "carol@example.com"), 1);

        // a verification token cannot be used as a reset token
        let r = app
            .post(
                "/v1/auth/password/reset",
                None,
                json!({ "token": token, "new_password": NEW_PASSWORD }),
            )
            .await;
        r.assert_problem(400, "invalid_token");

        // an unverified user can ask for another link, which works once
        let t2 = app.user("dan@example.com").await;
        let r = app
            .send(
                Method::POST,
                "/v1/auth/verify-email/resend",
                Some(&t2.access),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        assert_eq!(mails_to(&app, "dan@example.com"), 2);
        let token2 = mail_token(&app, "dan@example.com", "verify-email?token=");
        let r = app
            .post("/v1/auth/verify-email", None, json!({ "token": token2 }))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["email_verified"], true);
        app.stop().await;
    });
}

/// `POST /v1/auth/password/forgot` for `email`; the token of the reset link it mails.
pub async fn reset_link(app: &TestApp, email: &str) -> String {
    let r = app
        .post("/v1/auth/password/forgot", None, json!({ "email": email }))
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    mail_token(app, email, "password/reset?token=")
}

/// Ends the sessions of `email` the way `how` names ("reset": by a password reset,
/// "change": a password change from `access`'s session, else "log out everywhere"
/// from it), and checks that it worked.
pub async fn end_sessions_by(app: &TestApp, how: &str, email: &str, access: &str) {
    let r = match how {
        "reset" => {
            let token = reset_link(app, email).await;
            reset_pw(app, &token, NEW_PASSWORD).await
        }
        "change" => {
            app.post(
                "/v1/auth/password/change",
                Some(access),
                json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD }),
            )
            .await
        }
        _ => {
            app.post(
                "/v1/auth/logout",
                Some(access),
                json!({ "everywhere": true }),
            )
            .await
        }
    };
    assert!(r.status.is_success(), "{how}: {}", r.text);
}

/// `POST /v1/auth/password/reset`.
pub async fn reset_pw(app: &TestApp, token: &str, new_password: &str) -> Resp {
    app.post(
        "/v1/auth/password/reset",
        None,
        json!({ "token": token, "new_password": new_password }),
    )
    .await
}

#[tokio::test]
async fn password_reset_flow() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let old = app.user("dave@example.com").await;
        let before = app.mails().len();

        let known = app
            .post(
                "/v1/auth/password/forgot",
                None,
                json!({ "email": "Dave@example.com" }),
            )
            .await;
        let unknown = app
            .post(
                "/v1/auth/password/forgot",
                None,
                json!({ "email": "nobody@example.com" }),
            )
            .await;
        assert_eq!(known.status, StatusCode::ACCEPTED, "{}", known.text);
        assert_eq!(unknown.status, StatusCode::ACCEPTED, "{}", unknown.text);
        assert_eq!(
            known.body, unknown.body,
            "same answer for known and unknown emails"
        );
        assert_eq!(
            app.mails().len(),
            before + 1,
            "only the known account gets mail"
        );
        // both cost one audited write: the unknown address's shows someone trying it
        let admin = app.admin().await.access;
        let asked = audit_action(&app, &admin, "password.reset_requested").await;
        assert_eq!(asked.len(), 2, "{asked:?}");
        let (failed, done): (Vec<&Value>, Vec<&Value>) =
            asked.iter().partition(|e| e["outcome"] == "failure");
        assert_eq!((failed.len(), done.len()), (1, 1), "{asked:?}");
        assert_eq!(failed[0]["metadata"]["email"], "nobody@example.com");
        assert_eq!(failed[0]["metadata"]["reason"], "unknown_email");
        assert!(failed[0]["resource"].is_null(), "{}", failed[0]);
        assert!(done[0]["resource"].is_string(), "{}", done[0]);
        let token = mail_token(&app, "dave@example.com", "password/reset?token=");

        // policy and history errors do not burn the token
        reset_pw(&app, &token, "password1234")
            .await
            .assert_problem(422, "password_common");
        reset_pw(&app, &token, PASSWORD)
            .await
            .assert_problem(422, "password_reused");
        let r = reset_pw(&app, &token, NEW_PASSWORD).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["status"], "password_reset");

        // every old session is gone
        app.get("/v1/me", Some(&old.access))
            .await
            .assert_problem(401, "session_revoked");
        assert_oauth_error(&refresh(&app, &old.refresh).await, 400, "invalid_grant");
        app.login_device("dave@example.com", PASSWORD, "dev-1")
            .await
            .assert_problem(401, "invalid_credentials");
        let t = app.login("dave@example.com", NEW_PASSWORD).await;
        assert_eq!(
            app.get("/v1/me", Some(&t.access)).await.status,
            StatusCode::OK
        );

        // the token is single use
        reset_pw(&app, &token, THIRD_PASSWORD)
            .await
            .assert_problem(400, "invalid_token");
        app.post(
            "/v1/auth/password/reset",
            None,
            json!({ "token": "not-a-token", "new_password": THIRD_PASSWORD }),
        )
        .await
        .assert_problem(400, "invalid_token");

        // a password from the history (not the current one) is refused too
        let r = app
            .post(
                "/v1/auth/password/forgot",
                None,
                json!({ "email": "dave@example.com" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        let token2 = mail_token(&app, "dave@example.com", "password/reset?token=");
        assert_ne!(token2, token);
        reset_pw(&app, &token2, PASSWORD)
            .await
            .assert_problem(422, "password_reused");
        // the live session survived the refused attempts
        assert_eq!(
            app.get("/v1/me", Some(&t.access)).await.status,
            StatusCode::OK
        );

        let admin = app.admin().await;
        let e = audit_action(&app, &admin.access, "password.reset").await;
        assert_eq!(e.len(), 1);
        assert_eq!(e[0]["metadata"]["sessions_revoked"], 1);
        app.stop().await;
    });
}

#[tokio::test]
async fn password_change_needs_current_and_keeps_this_session() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let t1 = app.user("erin@example.com").await;
        let t2 = app
            .login_device("erin@example.com", PASSWORD, "dev-2")
            .await;
        let at2 = t2.body["access_token"].as_str().unwrap().to_owned();

        let wrong = app
            .post(
                "/v1/auth/password/change",
                Some(&t1.access),
                json!({ "current_password": "not-my-Password-99", "new_password": NEW_PASSWORD }),
            )
            .await;
        // 403, not 401: the token is fine (a 401 tells clients to drop it)
        wrong.assert_problem(403, "current_password_wrong");
        assert!(wrong.header("www-authenticate").is_none());
        // nothing changed: both sessions live
        assert_eq!(app.get("/v1/me", Some(&at2)).await.status, StatusCode::OK);

        app.post(
            "/v1/auth/password/change",
            Some(&t1.access),
            json!({ "current_password": PASSWORD, "new_password": "password1234" }),
        )
        .await
        .assert_problem(422, "password_common");
        app.post(
            "/v1/auth/password/change",
            Some(&t1.access),
            json!({ "current_password": PASSWORD, "new_password": PASSWORD }),
        )
        .await
        .assert_problem(422, "password_reused");

        let ok = app
            .post(
                "/v1/auth/password/change",
                Some(&t1.access),
                json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD }),
            )
            .await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
        assert_eq!(ok.body["status"], "password_changed");
        assert_eq!(
            app.get("/v1/me", Some(&t1.access)).await.status,
            StatusCode::OK,
            "current session kept"
        );
        app.get("/v1/me", Some(&at2))
            .await
            .assert_problem(401, "session_revoked");
        // the kept session still refreshes
        assert_eq!(refresh(&app, &t1.refresh).await.status, StatusCode::OK);

        app.login_device("erin@example.com", PASSWORD, "dev-1")
            .await
            .assert_problem(401, "invalid_credentials");
        app.login("erin@example.com", NEW_PASSWORD).await;
        // back to the old one: in the history
        app.post(
            "/v1/auth/password/change",
            Some(&t1.access),
            json!({ "current_password": NEW_PASSWORD, "new_password": PASSWORD }),
        )
        .await
        .assert_problem(422, "password_reused");

        let admin = app.admin().await;
        assert_eq!(
            audit_action(&app, &admin.access, "password.change_failed")
                .await
                .len(),
            1
        );
        let e = audit_action(&app, &admin.access, "password.changed").await;
        assert_eq!(e.len(), 1);
        assert_eq!(e[0]["metadata"]["other_sessions_revoked"], 1);
        app.stop().await;
    });
}

#[tokio::test]
async fn jwks_and_access_token_claims() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let jwks = app.get("/.well-known/jwks.json", None).await;
        assert_eq!(jwks.status, StatusCode::OK);
        let keys = jwks.body["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1, "{}", jwks.text);
        let k = &keys[0];
        assert_eq!(k["kty"], "OKP");
        assert_eq!(k["crv"], "Ed25519");
        assert_eq!(k["alg"], "EdDSA");
        assert_eq!(k["use"], "sig");
        assert_eq!(b64url_decode(k["x"].as_str().unwrap()).len(), 32);
        assert!(
            k.get("d").is_none(),
            "no private key in the JWKS: {}",
            jwks.text
        );
        assert!(!jwks.text.contains("\"d\""), "{}", jwks.text);
        let kid = k["kid"].as_str().unwrap();

        let id = id_of(&app.register("fay@example.com").await);
        let t = app.login("fay@example.com", PASSWORD).await;
        let h = jwt_part(&t.access, 0);
        assert_eq!(h["alg"], "EdDSA");
        assert_eq!(h["kid"], kid);
        let c = jwt_part(&t.access, 1);
        assert_eq!(c["iss"], app.cfg.auth.issuer.as_str());
        assert_eq!(c["sub"], id.as_str());
        assert_eq!(c["aud"], "vaultpay");
        let (iat, exp, nbf) = (
            c["iat"].as_i64().unwrap(),
            c["exp"].as_i64().unwrap(),
            c["nbf"].as_i64().unwrap(),
        );
        assert_eq!(exp - iat, 300);
        assert!(nbf <= iat, "{c}");
        let now = vaultpay_core::time::now_micros() / 1_000_000;
        assert!((iat - now).abs() <= 5, "{c}");
        assert_eq!(c["jti"].as_str().unwrap().len(), 36);
        assert_eq!(c["sid"], t.session.as_str());
        assert!(
            c["roles"].as_array().unwrap().contains(&json!("customer")),
            "{c}"
        );
        assert_eq!(c["device_id"], "dev-1");
        let auth_time = c["auth_time"].as_i64().unwrap();
        assert!(auth_time <= iat && iat - auth_time <= 5, "{c}");
        assert_eq!(c["amr"], json!(["pwd"]));

        // a refreshed token: new jti, same session, device and auth_time
        let r = refresh(&app, &t.refresh).await;
        let c2 = jwt_part(r.body["access_token"].as_str().unwrap(), 1);
        assert_ne!(c2["jti"], c["jti"]);
        assert_eq!(c2["sid"], c["sid"]);
        assert_eq!(c2["device_id"], "dev-1");
        assert_eq!(c2["auth_time"], c["auth_time"]);
        assert_eq!(c2["amr"], json!(["pwd"]));
        // admins carry the admin role
        let a = app.admin().await;
        assert!(jwt_part(&a.access, 1)["roles"]
            .as_array()
            .unwrap()
            .contains(&json!("admin")));
        app.stop().await;
    });
}

#[tokio::test]
async fn admin_grants_and_revokes_roles() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin_mfa().await;
        let admin_id = jwt_part(&admin.access, 1)["sub"]
            .as_str()
            .unwrap()
            .to_owned();
        let id = id_of(&app.register("frank@example.com").await);
        let t = app.login("frank@example.com", PASSWORD).await;
        let perms = |r: &Resp| -> Vec<String> {
            r.body["permissions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_owned())
                .collect()
        };
        // warms the permission cache
        let me = app.get("/v1/me", Some(&t.access)).await;
        assert!(
            !perms(&me).contains(&"users:read".to_owned()),
            "{}",
            me.text
        );
        app.get(&format!("/v1/admin/users/{id}"), Some(&t.access))
            .await
            .assert_problem(403, "forbidden");

        let r = app
            .post(
                &format!("/v1/admin/users/{id}/roles"),
                Some(&admin.access),
                json!({ "role": "support" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(
            r.body["roles"]
                .as_array()
                .unwrap()
                .contains(&json!("support")),
            "{}",
            r.text
        );
        // at once, with the same access token
        let me = app.get("/v1/me", Some(&t.access)).await;
        assert!(perms(&me).contains(&"users:read".to_owned()), "{}", me.text);
        assert!(me.body["roles"]
            .as_array()
            .unwrap()
            .contains(&json!("support")));
        let u = app
            .get(&format!("/v1/admin/users/{id}"), Some(&t.access))
            .await;
        assert_eq!(u.status, StatusCode::OK, "{}", u.text);
        // support cannot manage roles
        app.post(
            &format!("/v1/admin/users/{id}/roles"),
            Some(&t.access),
            json!({ "role": "admin" }),
        )
        .await
        .assert_problem(403, "forbidden");
        // granting twice is idempotent and audited once
        let r = app
            .post(
                &format!("/v1/admin/users/{id}/roles"),
                Some(&admin.access),
                json!({ "role": "support" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);

        let r = app
            .delete(
                &format!("/v1/admin/users/{id}/roles/support"),
                Some(&admin.access),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(!r.body["roles"]
            .as_array()
            .unwrap()
            .contains(&json!("support")));
        let me = app.get("/v1/me", Some(&t.access)).await;
        assert!(
            !perms(&me).contains(&"users:read".to_owned()),
            "{}",
            me.text
        );
        app.get(&format!("/v1/admin/users/{id}"), Some(&t.access))
            .await
            .assert_problem(403, "forbidden");

        // bad requests
        app.post(
            &format!("/v1/admin/users/{id}/roles"),
            Some(&admin.access),
            json!({ "role": "superuser" }),
        )
        .await
        .assert_problem(422, "role_unknown");
        app.post(
            "/v1/admin/users/00000000-0000-0000-0000-000000000000/roles",
            Some(&admin.access),
            json!({ "role": "support" }),
        )
        .await
        .assert_problem(404, "not_found");
        app.delete(
            &format!("/v1/admin/users/{admin_id}/roles/admin"),
            Some(&admin.access),
        )
        .await
        .assert_problem(422, "cannot_revoke_own_admin");

        let granted = audit_action(&app, &admin.access, "role.granted").await;
        assert_eq!(granted.len(), 1, "{granted:?}");
        assert_eq!(granted[0]["actor"], admin_id.as_str());
        assert_eq!(granted[0]["resource"], id.as_str());
        assert_eq!(granted[0]["metadata"]["role"], "support");
        let revoked = audit_action(&app, &admin.access, "role.revoked").await;
        assert_eq!(revoked.len(), 1, "{revoked:?}");
        assert_eq!(revoked[0]["actor"], admin_id.as_str());
        assert_eq!(revoked[0]["resource"], id.as_str());
        app.stop().await;
    });
}

/// The emailed reset link opens a page (opening it changes nothing) whose form posts
/// the token with the new password; the password changes once.
#[tokio::test]
async fn the_reset_link_opens_a_form_that_resets_once() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let email = "erin@example.com";
    app.user(email).await;
    let token = reset_link(&app, email).await;
    let page = app
        .get(&format!("/v1/auth/password/reset?token={token}"), None)
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    assert!(
        page.text.contains("action=\"/v1/auth/password/reset\"")
            && page.text.contains(&format!("value=\"{token}\""))
            && page.text.contains("name=\"new_password\""),
        "{}",
        page.text
    );
    app.login(email, PASSWORD).await; // the old password still works
    let form = |pw: &'static str| {
        let token = token.clone();
        let app = &app;
        async move {
            browser_post(
                app,
                "/v1/auth/password/reset",
                &[("token", &token), ("new_password", pw)],
            )
            .await
        }
    };
    // the same fields form-encoded from a script get the API's answers, not pages
    let r = crate::oauth::form_post(
        &app,
        "/v1/auth/password/reset",
        None,
        &[("token", &token), ("new_password", "password")],
    )
    .await;
    let code = r.body["code"].as_str().unwrap_or_default().to_owned();
    assert!(code.starts_with("password_"), "{}", r.text);
    r.assert_problem(422, &code);
    // a weak one is refused without spending the token: the form again, with why
    let r = form("password").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(
        r.text.contains("cannot be used") && r.text.contains(&format!("value=\"{token}\"")),
        "{}",
        r.text
    );
    // so is the current (a recent) password: the form again, not a dead end
    let r = form(PASSWORD).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(
        r.text.contains("used recently") && r.text.contains(&format!("value=\"{token}\"")),
        "{}",
        r.text
    );
    let r = form(NEW_PASSWORD).await;
    assert_page(&r, 200, "Password changed");
    let r = form(NEW_PASSWORD).await;
    assert_page(&r, 400, "Password not changed");
    let r = crate::oauth::form_post(
        &app,
        "/v1/auth/password/reset",
        None,
        &[("token", &token), ("new_password", NEW_PASSWORD)],
    )
    .await;
    r.assert_problem(400, "invalid_token");
    app.login(email, NEW_PASSWORD).await;
    app.stop().await;
}

/// Addresses an earlier version stored in another spelling (an internationalised
/// domain in Unicode) are rewritten at start, so their owners still sign in with
/// them, however they type them; one whose new spelling another account already has
/// is left as it is; each rewrite is audited; a second pass has nothing to do.
#[tokio::test]
async fn stored_emails_in_an_old_spelling_are_rewritten() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        app.user("anna@bücher.de").await;
        app.user("bob@BÜCHER.de").await;
        app.user("bob2@example.com").await;
        let db = app.auth_db();
        let set = |new: &'static str, old: &'static str| async move {
            let n = sqlx::query("UPDATE users SET email = $1 WHERE email = $2")
                .bind(new)
                .bind(old)
                .execute(db.writer())
                .await
                .unwrap()
                .rows_affected();
            assert_eq!(n, 1, "{old}");
        };
        // stored as an earlier version did: the domain in Unicode
        set("anna@bücher.de", "anna@xn--bcher-kva.de").await;
        // a second account for bob's mailbox, in the old spelling
        set("bob@bücher.de", "bob2@example.com").await;
        assert_eq!(app.auth().normalise_stored_emails().await.unwrap(), 1);
        let emails: Vec<String> = sqlx::query_scalar("SELECT email FROM users ORDER BY email")
            .fetch_all(db.read())
            .await
            .unwrap();
        for e in [
            "anna@xn--bcher-kva.de",
            "bob@xn--bcher-kva.de",
            "bob@bücher.de",
        ] {
            assert!(emails.iter().any(|x| x == e), "{e} in {emails:?}");
        }
        assert!(!emails.iter().any(|x| x == "anna@bücher.de"), "{emails:?}");
        for typed in ["anna@bücher.de", "Anna@BÜCHER.DE", "anna@xn--bcher-kva.de"] {
            app.login(typed, PASSWORD).await;
        }
        let admin = app.admin().await.access;
        let done = audit_action(&app, &admin, "user.email_normalised").await;
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(done[0]["metadata"]["from"], "anna@bücher.de");
        assert_eq!(done[0]["metadata"]["to"], "anna@xn--bcher-kva.de");
        assert_eq!(app.auth().normalise_stored_emails().await.unwrap(), 0);
        app.stop().await;
    });
}
