//! A step that acts on what a password reset ends (a grant, a login ticket, the
//! session, the old password) is ordered with the reset on the user's row: a step
//! ordered after it finds what it relied on ended and does nothing. Before, a code
//! exchange or a second factor locked its grant first and then waited for the user's
//! row, and the reset skipped the grant it found locked; a password change, an email
//! change or a device approval checked the session and the password before its
//! transaction and did not look again; so each went on after the reset committed. The
//! checks-before-the-transaction race exists on SQLite too, but only PostgreSQL's row
//! locks let a test order the two steps: the test holds the user's row, the reset
//! queues for it first and the step second, and both then run in that order. Each
//! test fails on the code before the change with the outcome it guards against (a
//! session, the intruder's password, a mailed link, an approval).

use crate::auth_flows::{jwt_part, reset_link, reset_pw, NEW_PASSWORD};
use crate::helpers::*;
use crate::oauth::{exchange, get_code, pkce, web_client, CB};
use reqwest::StatusCode;
use serde_json::json;
use vaultpay_store::Backend;

/// An intruder's chosen password.
const INTRUDERS: &str = "Marmalade-Zeppelin-Orchid-42";

fn on_postgres() -> bool {
    vaultpay_store::testing::backends().contains(&Backend::Postgres)
}

/// `secret`'s code `offset` steps from now.
fn totp_code(secret: &[u8], offset: i64) -> String {
    use vaultpay_core::totp;
    let now = vaultpay_core::time::now_micros() / 1_000_000;
    totp::code_for_step(secret, totp::step_of(now, 30) + offset, 6)
}

/// Enrols a TOTP authenticator for the session of `access`; returns its secret.
async fn enrol_totp(app: &TestApp, access: &str) -> Vec<u8> {
    let r = app.post("/v1/mfa/totp", Some(access), json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let secret = vaultpay_core::totp::base32_decode(r.body["secret"].as_str().unwrap()).unwrap();
    let r = app
        .post(
            "/v1/mfa/totp/confirm",
            Some(access),
            json!({ "code": totp_code(&secret, 0) }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    secret
}

fn user_id(t: &Tokens) -> String {
    jwt_part(&t.access, 1)["sub"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_code_exchanged_as_the_password_is_reset_gives_nothing() {
    if !on_postgres() {
        return;
    }
    let app = TestApp::spawn(Backend::Postgres).await;
    let admin = app.admin().await.access;
    let web = web_client(&app, &admin).await;
    let email = "code-race@example.com";
    let u = app.user(email).await;
    let (verifier, challenge) = pkce();
    let code = get_code(&app, &web.id, CB, "openid", &challenge, email).await;
    let link = reset_link(&app, email).await;
    let (reset, exchanged) = one_after_the_other(
        &app,
        &user_id(&u),
        reset_pw(&app, &link, NEW_PASSWORD),
        exchange(&app, &web, &code, CB, &verifier),
    )
    .await;
    assert!(reset.status.is_success(), "{}", reset.text);
    assert_eq!(
        exchanged.status,
        StatusCode::BAD_REQUEST,
        "{}",
        exchanged.text
    );
    assert_eq!(
        exchanged.body["error"], "invalid_grant",
        "{}",
        exchanged.text
    );
    assert_eq!(
        app.count_where("sessions", "client_id IS NOT NULL AND revoked_at IS NULL")
            .await,
        0
    );
    app.stop().await;
}

#[tokio::test]
async fn a_second_factor_entered_as_the_password_is_reset_opens_no_session() {
    if !on_postgres() {
        return;
    }
    let app = TestApp::spawn(Backend::Postgres).await;
    let email = "ticket-race@example.com";
    let u = app.user(email).await;
    let secret = enrol_totp(&app, &u.access).await;
    let r = app.login_device(email, PASSWORD, "dev-race").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let ticket = r.body["mfa_ticket"].as_str().unwrap().to_owned();
    // the next step's code (the current one confirmed the enrolment); inside the
    // server's ±1 step window
    let code = totp_code(&secret, 1);
    let link = reset_link(&app, email).await;
    let (reset, verified) = one_after_the_other(
        &app,
        &user_id(&u),
        reset_pw(&app, &link, NEW_PASSWORD),
        app.post(
            "/v1/auth/mfa/verify",
            None,
            json!({ "mfa_ticket": ticket, "code": code }),
        ),
    )
    .await;
    assert!(reset.status.is_success(), "{}", reset.text);
    verified.assert_problem(401, "mfa_ticket_invalid");
    assert_eq!(
        app.count_where("sessions", "device_id = 'dev-race'").await,
        0
    );
    app.stop().await;
}

/// The takeover this prevents: whoever has the old password and a session changes the
/// password while the owner resets it; the change, landing after the reset, set the
/// intruder's password over the owner's.
#[tokio::test]
async fn a_password_change_in_flight_does_not_undo_a_reset() {
    if !on_postgres() {
        return;
    }
    let app = TestApp::spawn(Backend::Postgres).await;
    let email = "change-race@example.com";
    let intruder = app.user(email).await;
    let link = reset_link(&app, email).await;
    let (reset, changed) = one_after_the_other(
        &app,
        &user_id(&intruder),
        reset_pw(&app, &link, NEW_PASSWORD),
        app.post(
            "/v1/auth/password/change",
            Some(&intruder.access),
            json!({ "current_password": PASSWORD, "new_password": INTRUDERS }),
        ),
    )
    .await;
    assert!(reset.status.is_success(), "{}", reset.text);
    changed.assert_problem(401, "invalid_credentials");
    app.login(email, NEW_PASSWORD).await;
    app.login_device(email, INTRUDERS, "dev-2")
        .await
        .assert_problem(401, "invalid_credentials");
    app.stop().await;
}

/// An email change requested from a session that a reset ends meanwhile mails no link
/// (its confirmation needs no session: it would have moved the account away).
#[tokio::test]
async fn an_email_change_requested_as_the_password_is_reset_mails_no_link() {
    if !on_postgres() {
        return;
    }
    let app = TestApp::spawn(Backend::Postgres).await;
    let email = "move-race@example.com";
    let intruder = app.user(email).await;
    let link = reset_link(&app, email).await;
    let (reset, requested) = one_after_the_other(
        &app,
        &user_id(&intruder),
        reset_pw(&app, &link, NEW_PASSWORD),
        app.post(
            "/v1/auth/email/change",
            Some(&intruder.access),
            json!({ "new_email": "intruder@example.net", "password": PASSWORD }),
        ),
    )
    .await;
    assert!(reset.status.is_success(), "{}", reset.text);
    requested.assert_problem(401, "invalid_credentials");
    assert_eq!(
        app.count_where("email_tokens", "purpose = 'email_change'")
            .await,
        0
    );
    app.stop().await;
}

/// A device approved through the API from a session that a reset ends meanwhile
/// stays pending (it would have given the device a session of its own).
#[tokio::test]
async fn a_device_approved_as_the_password_is_reset_stays_pending() {
    if !on_postgres() {
        return;
    }
    let app = TestApp::spawn(Backend::Postgres).await;
    let admin = app.admin().await.access;
    let device = crate::oauth::device_client(&app, &admin).await;
    let started = crate::oauth::device_start(&app, &device, "openid api").await;
    let user_code = started["user_code"].as_str().unwrap().to_owned();
    let email = "device-race@example.com";
    let intruder = app.user(email).await;
    let link = reset_link(&app, email).await;
    let (reset, approved) = one_after_the_other(
        &app,
        &user_id(&intruder),
        reset_pw(&app, &link, NEW_PASSWORD),
        app.post(
            "/v1/oauth/device/approve",
            Some(&intruder.access),
            json!({ "user_code": user_code }),
        ),
    )
    .await;
    assert!(reset.status.is_success(), "{}", reset.text);
    assert_eq!(
        approved.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        approved.text
    );
    assert_eq!(
        app.count_where("oauth_device_codes", "status = 'pending'")
            .await,
        1
    );
    app.stop().await;
}
