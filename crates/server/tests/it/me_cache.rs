//! `GET /v1/me` answers from memory, yet a revoked session is refused at once and a
//! changed profile is seen at once: every revocation path drops the entry when it
//! commits. The tests set the entry lifetime to an hour, so only the drop (not the
//! lifetime running out) can explain the refusal.

use crate::auth_flows::{mail_token, refresh, NEW_PASSWORD};
use crate::each_backend;
use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;
use vaultpay_store::Backend;

const HOUR_MS: i64 = 3_600_000;

async fn me_ok(app: &TestApp, token: &str) {
    let r = app.get("/v1/me", Some(token)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

async fn me_revoked(app: &TestApp, token: &str, what: &str) {
    let r = app.get("/v1/me", Some(token)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {}", r.text);
    assert_eq!(r.body["code"], "session_revoked", "{what}: {}", r.text);
}

#[tokio::test]
async fn me_is_refused_at_once_after_every_kind_of_revocation() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn_with(backend, |c| c.auth.me_cache_ttl_ms = HOUR_MS).await;
        let email = "cached@example.com";
        app.register(email).await;

        // logout
        let t = app.login(email, PASSWORD).await;
        me_ok(&app, &t.access).await;
        me_ok(&app, &t.access).await; // (now from memory)
        app.post("/v1/auth/logout", Some(&t.access), json!({}))
            .await;
        me_revoked(&app, &t.access, "logout").await;

        // DELETE /v1/sessions/{id} from another session
        let a = app.login(email, PASSWORD).await;
        let b = app.login(email, PASSWORD).await;
        me_ok(&app, &a.access).await;
        let r = app
            .delete(&format!("/v1/sessions/{}", a.session), Some(&b.access))
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        me_revoked(&app, &a.access, "session revoked").await;

        // logout everywhere
        let c = app.login(email, PASSWORD).await;
        me_ok(&app, &b.access).await;
        app.post(
            "/v1/auth/logout",
            Some(&c.access),
            json!({"everywhere": true}),
        )
        .await;
        me_revoked(&app, &b.access, "logout everywhere").await;

        // a password change ends the other sessions
        let d = app.login(email, PASSWORD).await;
        let e = app.login(email, PASSWORD).await;
        me_ok(&app, &d.access).await;
        let r = app
            .post(
                "/v1/auth/password/change",
                Some(&e.access),
                json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        me_revoked(&app, &d.access, "password change").await;
        me_ok(&app, &e.access).await;

        // refresh-token reuse revokes the session
        let f = app.login(email, NEW_PASSWORD).await;
        me_ok(&app, &f.access).await;
        assert_eq!(refresh(&app, &f.refresh).await.status, StatusCode::OK);
        me_ok(&app, &f.access).await;
        assert!(refresh(&app, &f.refresh).await.status.is_client_error());
        me_revoked(&app, &f.access, "refresh reuse").await;

        // a confirmed email change is seen at once
        me_ok(&app, &e.access).await;
        let r = app
            .post(
                "/v1/auth/email/change",
                Some(&e.access),
                json!({"new_email": "moved@example.com", "password": NEW_PASSWORD}),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let token = mail_token(&app, "moved@example.com", "email/confirm?token=");
        app.post("/v1/auth/email/confirm", None, json!({"token": token}))
            .await;
        let me = app.get("/v1/me", Some(&e.access)).await;
        assert_eq!(me.body["email"], "moved@example.com", "{}", me.text);
        app.stop().await;
    });
}

/// Two replicas sharing PostgreSQL and Redis: a logout on one is refused by the other's
/// `/v1/me` well within the (hour-long) entry lifetime: the drop travels over the bus.
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_logout_on_one_replica_is_refused_by_the_other() {
    let Some((one, two)) = two_replicas(|c| c.auth.me_cache_ttl_ms = HOUR_MS).await else {
        return;
    };

    let t = one.user("replica@example.com").await;
    me_ok(&two, &t.access).await;
    me_ok(&two, &t.access).await;
    one.post("/v1/auth/logout", Some(&t.access), json!({}))
        .await;
    me_revoked(&one, &t.access, "logout, same replica").await;
    // the other replica hears of it over Redis pub/sub (delivery is asynchronous)
    let mut refused = false;
    for _ in 0..100 {
        if two.get("/v1/me", Some(&t.access)).await.status == StatusCode::UNAUTHORIZED {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        refused,
        "replica two still answered /v1/me for a logged-out session"
    );
    one.stop().await;
    two.stop().await;
}
