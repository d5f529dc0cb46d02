//! Changing the email address (confirmed through the new address, step-up guarded),
//! and the step-up policy for the sensitive account operations: password and email
//! changes need a recent sign-in (a fresh second factor from users who have one);
//! role changes need a fresh second factor from everyone.

use crate::auth_flows::{audit_action, id_of, jwt_part, mail_token, refresh, NEW_PASSWORD};
use crate::each_backend;
use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;
use vaultpay_store::Backend;

const LINK: &str = "email/confirm?token=";

async fn change(app: &TestApp, token: &str, new_email: &str, password: &str) -> Resp {
    app.post(
        "/v1/auth/email/change",
        Some(token),
        json!({ "new_email": new_email, "password": password }),
    )
    .await
}

/// Moves the session's sign-in `secs` seconds into the past and refreshes: an access
/// token of a session signed in long ago.
pub async fn aged_token(app: &TestApp, t: &Tokens, secs: i64) -> String {
    sqlx::query("UPDATE sessions SET auth_time = auth_time - $1 WHERE id = $2")
        .bind(secs * 1_000_000)
        .bind(&t.session)
        .execute(app.auth_db().read())
        .await
        .unwrap();
    let r = refresh(app, &t.refresh).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["access_token"].as_str().unwrap().to_owned()
}

/// A person who presses the email-change page's button gets a page back, not JSON.
#[tokio::test]
async fn a_browser_confirming_a_new_address_gets_pages() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        app.register("ed@example.com").await;
        let t = app.login("ed@example.com", PASSWORD).await;
        let r = change(&app, &t.access, "edd@example.com", PASSWORD).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let token = mail_token(&app, "edd@example.com", LINK);
        let r = browser_post(&app, "/v1/auth/email/confirm", &[("token", &token)]).await;
        assert_page(&r, 200, "Email address changed");
        assert_eq!(
            app.get("/v1/me", Some(&t.access)).await.body["email"],
            "edd@example.com"
        );
        let again = browser_post(&app, "/v1/auth/email/confirm", &[("token", &token)]).await;
        assert_page(&again, 400, "Email address not changed");
        app.stop().await;
    });
}

#[tokio::test]
async fn email_change_is_confirmed_by_the_new_address() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let id = id_of(&app.register("old@example.com").await);
        app.register("taken@example.com").await;
        let t = app.login("old@example.com", PASSWORD).await;

        // bad input: nothing requested, nothing mailed
        let mails = app.mails().len();
        change(&app, &t.access, "not-an-email", PASSWORD)
            .await
            .assert_problem(422, "email_invalid");
        change(&app, &t.access, "OLD@example.com", PASSWORD)
            .await
            .assert_problem(422, "email_unchanged");
        change(&app, &t.access, "taken@example.com", PASSWORD)
            .await
            .assert_problem(409, "email_taken");
        change(&app, &t.access, "new@example.com", "Wrong-password-1!")
            .await
            .assert_problem(403, "current_password_wrong");
        app.post(
            "/v1/auth/email/change",
            None,
            json!({ "new_email": "new@example.com", "password": PASSWORD }),
        )
        .await
        .assert_problem(401, "missing_token");
        let r = app
            .post(
                "/v1/auth/email/change",
                Some(&t.access),
                json!({ "new_email": "new@example.com" }),
            )
            .await;
        assert_eq!(r.status.as_u16(), 422, "{}", r.text);
        assert_eq!(app.mails().len(), mails);
        assert_eq!(
            app.count_where("email_tokens", "purpose = 'email_change'")
                .await,
            0
        );

        // a first request, then a second one that voids the first link
        let r = change(&app, &t.access, "first@example.com", PASSWORD).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        assert_eq!(r.body["status"], "confirmation_sent");
        let first = mail_token(&app, "first@example.com", LINK);
        let r = change(&app, &t.access, "New@Example.com", PASSWORD).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let token = mail_token(&app, "new@example.com", LINK);
        // the current address is told, without a link that would do anything
        let notice = app
            .mails()
            .into_iter()
            .rev()
            .find(|m| m.contains("To: old@example.com") && m.contains("is being changed"))
            .expect("a notice to the old address");
        assert!(
            notice.contains("new@example.com") && !notice.contains("token="),
            "{notice}"
        );
        // nothing changed yet: the old address still signs in
        let me = app.get("/v1/me", Some(&t.access)).await;
        assert_eq!(me.body["email"], "old@example.com", "{}", me.text);
        app.login("old@example.com", PASSWORD).await;
        app.post("/v1/auth/email/confirm", None, json!({ "token": first }))
            .await
            .assert_problem(400, "invalid_token");

        // opening the link changes nothing (mail scanners prefetch links): it shows a
        // page whose button posts the token
        let page = app
            .get(&format!("/v1/auth/email/confirm?token={token}"), None)
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text);
        assert!(
            page.text.contains("action=\"/v1/auth/email/confirm\"")
                && page.text.contains(&format!("value=\"{token}\"")),
            "{}",
            page.text
        );
        assert_eq!(
            app.get("/v1/me", Some(&t.access)).await.body["email"],
            "old@example.com"
        );
        app.get("/v1/auth/email/confirm?token=not%20a%20token", None)
            .await
            .assert_problem(400, "invalid_token");
        // the button: switches the address and verifies it
        let post = |token: String| {
            let app = &app;
            async move {
                read(
                    app.http
                        .post(format!("{}/v1/auth/email/confirm", app.base))
                        .form(&[("token", token.as_str())])
                        .send()
                        .await
                        .unwrap(),
                )
                .await
            }
        };
        let r = post(token.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["email"], "new@example.com");
        assert_eq!(r.body["email_verified"], true);
        assert_eq!(r.body["id"], id);
        // once
        post(token.clone())
            .await
            .assert_problem(400, "invalid_token");
        app.login("new@example.com", PASSWORD).await;
        app.login_device("old@example.com", PASSWORD, "dev-1")
            .await
            .assert_problem(401, "invalid_credentials");
        // the old address may register again; the session kept working
        assert_eq!(
            app.register("old@example.com").await.status,
            StatusCode::CREATED
        );
        assert_eq!(
            app.get("/v1/me", Some(&t.access)).await.body["email"],
            "new@example.com"
        );

        let admin = app.admin().await.access;
        assert_eq!(
            audit_action(&app, &admin, "email.change_requested")
                .await
                .len(),
            2
        );
        assert_eq!(
            audit_action(&app, &admin, "email.change_failed")
                .await
                .len(),
            1
        );
        let changed = audit_action(&app, &admin, "email.changed").await;
        assert_eq!(changed.len(), 1);
        assert_eq!(
            changed[0]["metadata"],
            json!({ "from": "old@example.com", "to": "new@example.com" })
        );
        assert_eq!(changed[0]["resource"], id);
        app.stop().await;
    });
}

/// Someone with the password asks to move the account to their own address; the owner
/// is told and, as the notice says, changes the password, resets it or ends the other
/// sessions. Each of those voids the pending link, whose confirmation needs no session:
/// otherwise the intruder would confirm it afterwards and take the account over with a
/// password reset to the new address.
#[tokio::test]
async fn revoking_the_sessions_voids_a_pending_email_change() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        for how in ["reset", "change", "logout_everywhere"] {
            let email = format!("owner-{how}@example.com");
            let intruder = format!("intruder-{how}@example.net");
            app.register(&email).await;
            let stolen = app.login(&email, PASSWORD).await;
            let r = change(&app, &stolen.access, &intruder, PASSWORD).await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
            let link = mail_token(&app, &intruder, LINK);
            let owner = app.login(&email, PASSWORD).await;
            crate::auth_flows::end_sessions_by(&app, how, &email, &owner.access).await;
            app.post("/v1/auth/email/confirm", None, json!({ "token": link }))
                .await
                .assert_problem(400, "invalid_token");
            let n = app
                .count_where("users", &format!("email = '{email}'"))
                .await;
            assert_eq!(n, 1, "{how}: the address changed");
        }
        app.stop().await;
    });
}

#[tokio::test]
async fn an_email_change_link_fails_cleanly_when_expired_or_the_address_was_taken() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let t = app.user("kim@example.com").await;
        let r = change(&app, &t.access, "kim2@example.com", PASSWORD).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let token = mail_token(&app, "kim2@example.com", LINK);
        // someone registers the address before the link is opened: 409, nothing changes
        app.register("kim2@example.com").await;
        app.post("/v1/auth/email/confirm", None, json!({ "token": token }))
            .await
            .assert_problem(409, "email_taken");
        assert_eq!(
            app.get("/v1/me", Some(&t.access)).await.body["email"],
            "kim@example.com"
        );
        assert_eq!(
            app.count_where(
                "email_tokens",
                "purpose = 'email_change' AND used_at IS NULL"
            )
            .await,
            1,
            "the refused confirmation consumed nothing"
        );
        // an expired link
        let r = change(&app, &t.access, "kim3@example.com", PASSWORD).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let token = mail_token(&app, "kim3@example.com", LINK);
        sqlx::query("UPDATE email_tokens SET expires_at = 0 WHERE purpose = 'email_change' AND used_at IS NULL")
            .execute(app.auth_db().read())
            .await
            .unwrap();
        app.post("/v1/auth/email/confirm", None, json!({ "token": token }))
            .await
            .assert_problem(400, "invalid_token");
        for bad in ["", "x", &"a".repeat(200)] {
            app.post("/v1/auth/email/confirm", None, json!({ "token": bad }))
                .await
                .assert_problem(400, "invalid_token");
        }
        // change requests mail addresses the caller picks: limited (3 per 10 minutes)
        let r = change(&app, &t.access, "kim4@example.com", PASSWORD).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let mails = app.mails().len();
        change(&app, &t.access, "kim5@example.com", PASSWORD)
            .await
            .assert_problem(429, "rate_limited");
        assert_eq!(app.mails().len(), mails);
        // and asking for a taken address counts too: past the limit, a taken address
        // is not told apart from a free one (no probing for accounts this way)
        change(&app, &t.access, "kim2@example.com", PASSWORD)
            .await
            .assert_problem(429, "rate_limited");
        // a verification link cannot confirm a change, nor the reverse
        let verify = mail_token(&app, "kim@example.com", "verify-email?token=");
        app.post("/v1/auth/email/confirm", None, json!({ "token": verify }))
            .await
            .assert_problem(400, "invalid_token");
        assert_eq!(
            app.get("/v1/me", Some(&t.access)).await.body["email"],
            "kim@example.com"
        );
        app.stop().await;
    });
}

#[tokio::test]
async fn password_and_email_changes_need_a_recent_sign_in_or_second_factor() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        // without a second factor: a sign-in within max_age (RFC 9470 max_age challenge)
        let t = app.user("pat@example.com").await;
        let old = aged_token(&app, &t, 901).await;
        let pw = json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD });
        for r in [
            app.post("/v1/auth/password/change", Some(&old), pw.clone())
                .await,
            change(&app, &old, "pat2@example.com", PASSWORD).await,
        ] {
            r.assert_problem(401, "insufficient_user_authentication");
            let h = r.header("www-authenticate").unwrap();
            assert!(
                h.ends_with(", max_age=900") && !h.contains("acr_values"),
                "{h}"
            );
        }
        assert_eq!(
            app.count_where("email_tokens", "purpose = 'email_change'")
                .await,
            0
        );
        let fresh = app.login("pat@example.com", PASSWORD).await;
        let r = change(&app, &fresh.access, "pat2@example.com", PASSWORD).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);

        // with a second factor: a fresh one (acr_values challenge); a sign-in with the
        // second factor satisfies it, and so does a step-up
        app.register("mo@example.com").await;
        let m = app.with_mfa("mo@example.com").await;
        let stale = aged_token(&app, &m, 901).await;
        for r in [
            app.post("/v1/auth/password/change", Some(&stale), pw.clone())
                .await,
            change(&app, &stale, "mo2@example.com", PASSWORD).await,
        ] {
            r.assert_problem(401, "insufficient_user_authentication");
            assert_eq!(
                r.body["acr_values"],
                vaultpay_core::step_up::ACR_MFA,
                "{}",
                r.text
            );
        }
        let r = change(&app, &m.access, "mo2@example.com", PASSWORD).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        app.stop().await;
    });
}

#[tokio::test]
async fn role_changes_need_a_fresh_second_factor_from_every_admin() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let target = id_of(&app.register("target@example.com").await);
        // an admin signed in with the password only, no factor enrolled
        let plain = app.admin().await.access;
        let grant = format!("/v1/admin/users/{target}/roles");
        let role = json!({ "name": "auditor", "permissions": ["audit:read"] });
        for r in [
            app.post(&grant, Some(&plain), json!({ "role": "support" }))
                .await,
            app.delete(&format!("{grant}/customer"), Some(&plain)).await,
            app.post("/v1/admin/roles", Some(&plain), role.clone())
                .await,
            app.delete("/v1/admin/roles/auditor", Some(&plain)).await,
        ] {
            r.assert_problem(401, "insufficient_user_authentication");
            assert_eq!(r.body["mfa_enrolled"], false, "{}", r.text);
            assert!(r
                .header("www-authenticate")
                .unwrap()
                .contains("acr_values="));
        }
        let u = app
            .get(&format!("/v1/admin/users/{target}"), Some(&plain))
            .await;
        assert_eq!(u.body["roles"], json!(["customer"]), "{}", u.text);
        // other admin work goes on with the password session
        assert_eq!(
            app.get("/v1/admin/audit", Some(&plain)).await.status,
            StatusCode::OK
        );
        // enrolled and stepped up: allowed
        let stepped = app.admin_mfa().await;
        let r = app
            .post(&grant, Some(&stepped.access), json!({ "role": "support" }))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        // a second factor older than max_age no longer counts
        let aged = aged_token(&app, &stepped, 901).await;
        let r = app.post("/v1/admin/roles", Some(&aged), role).await;
        r.assert_problem(401, "insufficient_user_authentication");
        assert!(r.body.get("mfa_enrolled").is_none(), "{}", r.text);
        let claims = jwt_part(&aged, 1);
        assert!(claims["auth_time"].as_i64().is_some());
        app.stop().await;
    });
}
