//! Second factors and step-up: TOTP enrolment and login, replay, recovery codes,
//! emailed codes, MFA tickets, lockout by wrong codes, RFC 9470 step-up at AuthShield
//! and for large ledger transfers.
//!
//! TOTP codes are computed from the enrolled secret at the current time: the ±1 step
//! window lets a test use the codes of steps now-1, now and now+1 in ascending order
//! without waiting. Expiry is shown by moving the stored deadline into the past (the
//! database is the clock the server reads), never by sleeping.

use crate::auth_flows::{audit_action, jwt_part};
use crate::each_backend;
use crate::helpers::{ledger_post, Resp, TestApp, PASSWORD};
use reqwest::StatusCode;
use serde_json::{json, Value};
use vaultpay_core::step_up::ACR_MFA;
use vaultpay_core::totp;
use vaultpay_store::Backend;

fn now_secs() -> i64 {
    vaultpay_core::time::now_micros() / 1_000_000
}

/// The TOTP code of the current step plus `offset`.
fn code(secret: &[u8], offset: i64) -> String {
    totp::code_for_step(secret, totp::step_of(now_secs(), 30) + offset, 6)
}

/// Waits, when needed, until at least 3 s of the current 30 s TOTP step remain: a
/// code for the previous step made now must still be inside the server's ±1 window
/// when the request arrives, which a step boundary in between would break (on a
/// loaded machine a request can take long enough to cross one).
async fn away_from_step_boundary() {
    let into = now_secs() % 30;
    if into >= 27 {
        tokio::time::sleep(std::time::Duration::from_secs((30 - into) as u64)).await;
    }
}

/// Enrols and confirms TOTP (with the code of step now-1); returns the secret and the
/// recovery codes.
async fn enable_totp(app: &TestApp, access: &str) -> (Vec<u8>, Vec<String>) {
    let r = app.post("/v1/mfa/totp", Some(access), json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let secret = totp::base32_decode(r.body["secret"].as_str().unwrap()).unwrap();
    away_from_step_boundary().await;
    let r = app
        .post(
            "/v1/mfa/totp/confirm",
            Some(access),
            json!({ "code": code(&secret, -1) }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let codes = r.body["recovery_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    (secret, codes)
}

async fn login(app: &TestApp, email: &str, password: &str) -> Resp {
    app.login_device(email, password, "dev-1").await
}

/// Logs in a user with a second factor: answers the ticket.
async fn ticket(app: &TestApp, email: &str) -> String {
    let r = login(app, email, PASSWORD).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    r.body["mfa_ticket"].as_str().unwrap().to_owned()
}

async fn verify(app: &TestApp, ticket: &str, code: &str, method: Option<&str>) -> Resp {
    let mut body = json!({ "mfa_ticket": ticket, "code": code });
    if let Some(m) = method {
        body["method"] = json!(m);
    }
    app.post("/v1/auth/mfa/verify", None, body).await
}

/// The newest mail with an emailed code sent to `to`.
fn code_mail(app: &TestApp, to: &str) -> String {
    app.mails()
        .into_iter()
        .rev()
        .find(|m| m.contains(&format!("To: {to}")) && m.contains("Your VaultPay code is "))
        .unwrap_or_else(|| panic!("no code mailed to {to}"))
}

/// The newest emailed code sent to `to`.
fn mailed_code(app: &TestApp, to: &str) -> String {
    let mail = code_mail(app, to);
    let marker = "Your VaultPay code is ";
    let start = mail.rfind(marker).unwrap() + marker.len();
    mail[start..start + 6].to_owned()
}

/// Turns on emailed codes for `who` (signed in as `token`): enable, then confirm with
/// the mailed code.
async fn enable_email(app: &TestApp, token: &str, who: &str) {
    let r = app
        .post("/v1/mfa/email/enable", Some(token), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    // the mail says what the code is for
    let mail = code_mail(app, who);
    assert!(
        mail.contains("Subject: Confirm emailed sign-in codes for VaultPay")
            && mail.contains("If you did not ask to turn on emailed sign-in codes"),
        "{mail}"
    );
    let c = mailed_code(app, who);
    let r = app
        .post("/v1/mfa/email/confirm", Some(token), json!({ "code": c }))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

fn mails_with_code(app: &TestApp, to: &str) -> usize {
    app.mails()
        .iter()
        .filter(|m| m.contains(&format!("To: {to}")) && m.contains("Your VaultPay code is "))
        .count()
}

fn assert_mfa_claims(access: &str) {
    let claims = jwt_part(access, 1);
    assert_eq!(claims["acr"], ACR_MFA, "{claims}");
    assert_eq!(claims["amr"], json!(["pwd", "otp", "mfa"]), "{claims}");
    assert!((claims["auth_time"].as_i64().unwrap() - now_secs()).abs() <= 5);
}

async fn exec(app: &TestApp, sql: &str, user_email: &str) {
    sqlx::query(sql)
        .bind(user_email)
        .execute(app.auth_db().read())
        .await
        .unwrap();
}

#[tokio::test]
async fn totp_enrol_confirm_login_and_replay_refused() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let t = app.user("tia@example.com").await;
        let r = app.get("/v1/mfa", Some(&t.access)).await;
        assert_eq!(r.body["totp_enabled"], false, "{}", r.text);

        let r = app.post("/v1/mfa/totp", Some(&t.access), json!({})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let b32 = r.body["secret"].as_str().unwrap().to_owned();
        let secret = totp::base32_decode(&b32).unwrap();
        assert_eq!(secret.len(), 20);
        let uri = r.body["otpauth_uri"].as_str().unwrap();
        assert!(
            uri.starts_with("otpauth://totp/VaultPay:tia%40example.com?secret=")
                && uri.contains(&b32),
            "{uri}"
        );
        assert!(r.body["qr_svg"].as_str().unwrap().contains("<svg"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        // sealed at rest with the envelope, not stored in clear
        let sealed: String = sqlx::query_scalar("SELECT secret_sealed FROM mfa_totp")
            .fetch_one(app.auth_db().read())
            .await
            .unwrap();
        assert!(
            sealed.starts_with("v1.") && !sealed.contains(&b32),
            "{sealed}"
        );
        // pending: login still needs only the password
        assert_eq!(login(&app, "tia@example.com", PASSWORD).await.status, 200);

        // a code outside the ±1 window does not confirm
        let r = app
            .post(
                "/v1/mfa/totp/confirm",
                Some(&t.access),
                json!({ "code": code(&secret, 3) }),
            )
            .await;
        r.assert_problem(403, "mfa_code_invalid");
        away_from_step_boundary().await;
        let confirm_code = code(&secret, -1);
        let r = app
            .post(
                "/v1/mfa/totp/confirm",
                Some(&t.access),
                json!({ "code": confirm_code }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let recovery = r.body["recovery_codes"].as_array().unwrap();
        assert_eq!(recovery.len(), 10);
        let distinct: std::collections::HashSet<_> = recovery.iter().collect();
        assert_eq!(distinct.len(), 10);
        assert_eq!(app.count("mfa_recovery_codes").await, 10);
        let stored: Vec<String> = sqlx::query_scalar("SELECT code_hash FROM mfa_recovery_codes")
            .fetch_all(app.auth_db().read())
            .await
            .unwrap();
        for c in recovery {
            let c = c.as_str().unwrap();
            assert!(stored.iter().all(|h| !h.contains(c) && h.len() == 64));
        }
        // a second enrolment needs the first factor (step-up)…
        assert_step_up_challenge(&app.post("/v1/mfa/totp", Some(&t.access), json!({})).await);

        // login now answers 202 with a ticket
        let r = login(&app, "tia@example.com", PASSWORD).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        assert_eq!(r.body["status"], "mfa_required");
        assert_eq!(r.body["methods"], json!(["totp", "recovery_code"]));
        assert!(r.body.get("access_token").is_none());
        let ticket = r.body["mfa_ticket"].as_str().unwrap().to_owned();
        assert_eq!(r.header("cache-control"), Some("no-store"));

        // the code that confirmed enrolment (its step is spent) is a replay
        verify(&app, &ticket, &confirm_code, None)
            .await
            .assert_problem(401, "mfa_code_invalid");
        let good = code(&secret, 1);
        let r = verify(&app, &ticket, &good, Some("totp")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(r.body["refresh_token"].is_string());
        let access = r.body["access_token"].as_str().unwrap().to_owned();
        assert_mfa_claims(&access);
        assert_eq!(app.get("/v1/me", Some(&access)).await.status, 200);
        // …and is refused while TOTP is enabled
        app.post("/v1/mfa/totp", Some(&access), json!({}))
            .await
            .assert_problem(409, "totp_already_enabled");

        // the ticket is single use; the code is single use on a fresh ticket too
        verify(&app, &ticket, &good, None)
            .await
            .assert_problem(401, "mfa_ticket_invalid");
        let t2 = ticket_for(&app, "tia@example.com").await;
        verify(&app, &t2, &good, None)
            .await
            .assert_problem(401, "mfa_code_invalid");

        // refreshed tokens keep the second factor of the session
        let rt = r.body["refresh_token"].as_str().unwrap();
        let r = crate::auth_flows::refresh(&app, rt).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(
            jwt_part(r.body["access_token"].as_str().unwrap(), 1)["acr"],
            ACR_MFA
        );

        let admin = app.admin().await;
        assert_eq!(
            audit_action(&app, &admin.access, "mfa.totp_enabled")
                .await
                .len(),
            1
        );
        assert_eq!(
            audit_action(&app, &admin.access, "login.mfa_required")
                .await
                .len(),
            2
        );
        assert_eq!(
            audit_action(&app, &admin.access, "login.mfa_failed")
                .await
                .len(),
            2
        );
        let ok = audit_action(&app, &admin.access, "login.succeeded").await;
        assert!(ok.iter().any(|e| e["metadata"]["mfa_method"] == "totp"));
        app.stop().await;
    });
}

async fn ticket_for(app: &TestApp, email: &str) -> String {
    ticket(app, email).await
}

/// A login waiting for its second factor, begun with the password before a password
/// reset, opens no session after it, even with a valid code (a factor an intruder
/// enrolled while they had the account would give them one).
#[tokio::test]
async fn a_ticket_from_before_a_password_reset_is_spent() {
    each_backend!(|backend: Backend| async move {
        use crate::auth_flows::{reset_link, reset_pw, NEW_PASSWORD};
        let app = TestApp::spawn(backend).await;
        let email = "spent@example.com";
        app.register(email).await;
        let t = app.login(email, PASSWORD).await;
        let (secret, _) = enable_totp(&app, &t.access).await;
        let tk = ticket(&app, email).await;
        let token = reset_link(&app, email).await;
        let r = reset_pw(&app, &token, NEW_PASSWORD).await;
        assert!(r.status.is_success(), "{}", r.text);
        verify(&app, &tk, &code(&secret, 0), None)
            .await
            .assert_problem(401, "mfa_ticket_invalid");
        // The new password's ticket works.
        let r = login(&app, email, NEW_PASSWORD).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let tk = r.body["mfa_ticket"].as_str().unwrap();
        let r = verify(&app, tk, &code(&secret, 0), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        app.stop().await;
    });
}

/// A password change or reset and every second factor added or removed are told to the
/// account's address (an owner whose password someone else has learns of it), with no
/// link in the mail that acts.
#[tokio::test]
async fn security_changes_are_mailed_to_the_account() {
    each_backend!(|backend: Backend| async move {
        use crate::auth_flows::{reset_link, reset_pw, NEW_PASSWORD, THIRD_PASSWORD};
        let app = TestApp::spawn(backend).await;
        let who = "notice@example.com";
        let t = app.user(who).await;
        let notices = |subject: &str| {
            let mails: Vec<String> = app
                .mails()
                .into_iter()
                .filter(|m| {
                    m.contains(&format!("To: {who}")) && m.contains(&format!("Subject: {subject}"))
                })
                .collect();
            for m in &mails {
                assert!(!m.contains("token="), "a notice with a link that acts: {m}");
                assert!(m.contains("If this was not you"), "{m}");
            }
            mails.len()
        };
        const ADDED: &str = "A second factor was added to your account";
        const REMOVED: &str = "A second factor was removed from your account";
        assert_eq!(notices("Your password was changed"), 0);

        let r = app
            .post(
                "/v1/auth/password/change",
                Some(&t.access),
                json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(notices("Your password was changed"), 1);

        let token = reset_link(&app, who).await;
        assert_eq!(
            notices("Your password was reset"),
            0,
            "not before the reset"
        );
        let r = reset_pw(&app, &token, THIRD_PASSWORD).await;
        assert!(r.status.is_success(), "{}", r.text);
        assert_eq!(notices("Your password was reset"), 1);

        let t = app.login(who, THIRD_PASSWORD).await;
        let (secret, _) = enable_totp(&app, &t.access).await;
        assert_eq!((notices(ADDED), notices(REMOVED)), (1, 0));
        let r = app
            .post(
                "/v1/mfa/totp/disable",
                Some(&t.access),
                json!({"password": THIRD_PASSWORD, "code": code(&secret, 0)}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!((notices(ADDED), notices(REMOVED)), (1, 1));
        enable_email(&app, &t.access, who).await;
        assert_eq!((notices(ADDED), notices(REMOVED)), (2, 1));
        app.stop().await;
    });
}

#[tokio::test]
async fn recovery_codes_work_once() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let t = app.user("rory@example.com").await;
        let (_secret, codes) = enable_totp(&app, &t.access).await;
        // any case, without dashes, method guessed from the shape
        let sloppy = codes[0].to_lowercase().replace('-', " ");
        let tk = ticket(&app, "rory@example.com").await;
        let r = verify(&app, &tk, &sloppy, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_mfa_claims(r.body["access_token"].as_str().unwrap());
        let tk = ticket(&app, "rory@example.com").await;
        verify(&app, &tk, &codes[0], Some("recovery_code"))
            .await
            .assert_problem(401, "mfa_code_invalid");
        let tk = ticket(&app, "rory@example.com").await;
        let r = verify(&app, &tk, &codes[1], Some("recovery_code")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let access = r.body["access_token"].as_str().unwrap().to_owned();
        let r = app.get("/v1/mfa", Some(&access)).await;
        assert_eq!(r.body["recovery_codes_remaining"], 8, "{}", r.text);
        // a method the account does not have is refused as such
        let tk = ticket(&app, "rory@example.com").await;
        verify(&app, &tk, "123456", Some("email"))
            .await
            .assert_problem(422, "mfa_method_unavailable");
        app.stop().await;
    });
}

#[tokio::test]
async fn wrong_codes_count_toward_lockout_and_kill_the_ticket() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let t = app.user("brute@example.com").await;
        let (secret, _) = enable_totp(&app, &t.access).await;
        let tk = ticket(&app, "brute@example.com").await;
        // an attacker with the password guesses codes: threshold (5) wrong ones lock
        for i in 0..5 {
            let guess = code(&secret, 5 + i); // never inside the window
            verify(&app, &tk, &guess, Some("totp"))
                .await
                .assert_problem(401, "mfa_code_invalid");
        }
        // locked: the password alone no longer even gets a ticket…
        login(&app, "brute@example.com", PASSWORD)
            .await
            .assert_problem(423, "account_locked");
        // …and the ticket is dead, whatever the code
        let r = verify(&app, &tk, &code(&secret, 1), Some("totp")).await;
        assert!(
            r.status == 401 || r.status == 423,
            "a dead ticket or a locked account: {}",
            r.text
        );
        let locked: Option<i64> =
            sqlx::query_scalar("SELECT locked_until FROM users WHERE email = $1")
                .bind("brute@example.com")
                .fetch_one(app.auth_db().read())
                .await
                .unwrap();
        assert!(locked.is_some());
        let admin = app.admin().await;
        assert!(
            audit_action(&app, &admin.access, "account.locked")
                .await
                .len()
                == 1
        );
        app.stop().await;
    });
}

#[tokio::test]
async fn tickets_expire_and_are_bound_to_the_device() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let t = app.user("tick@example.com").await;
        let (secret, _) = enable_totp(&app, &t.access).await;
        let tk = ticket(&app, "tick@example.com").await;
        // stored hashed
        let n: i64 = sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM mfa_tickets WHERE ticket_hash = $1",
        )
        .bind(vaultpay_core::crypto::sha256_hex(tk.as_bytes()))
        .fetch_one(app.auth_db().read())
        .await
        .unwrap();
        assert_eq!(n, 1);
        // expire it (the deadline is what the server reads)
        sqlx::query("UPDATE mfa_tickets SET expires_at = 0")
            .execute(app.auth_db().read())
            .await
            .unwrap();
        verify(&app, &tk, &code(&secret, 0), None)
            .await
            .assert_problem(401, "mfa_ticket_invalid");
        // presented for another device: burnt
        let tk = ticket(&app, "tick@example.com").await;
        let r = app
            .post(
                "/v1/auth/mfa/verify",
                None,
                json!({"mfa_ticket": tk, "code": code(&secret, 0), "device_id": "other"}),
            )
            .await;
        r.assert_problem(401, "mfa_ticket_invalid");
        let r = app
            .post(
                "/v1/auth/mfa/verify",
                None,
                json!({"mfa_ticket": tk, "code": code(&secret, 0), "device_id": "dev-1"}),
            )
            .await;
        r.assert_problem(401, "mfa_ticket_invalid");
        // the right device
        let tk = ticket(&app, "tick@example.com").await;
        let r = app
            .post(
                "/v1/auth/mfa/verify",
                None,
                json!({"mfa_ticket": tk, "code": code(&secret, 1), "device_id": "dev-1"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let claims = jwt_part(r.body["access_token"].as_str().unwrap(), 1);
        assert_eq!(claims["device_id"], "dev-1");
        // garbage tickets
        for bad in ["", "x", &"a".repeat(500)] {
            verify(&app, bad, "123456", None)
                .await
                .assert_problem(401, "mfa_ticket_invalid");
        }
        app.stop().await;
    });
}

#[tokio::test]
async fn email_codes_expire_die_after_attempts_and_work_once() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn_with(backend, |c| {
            // wrong guesses here are about the code's own attempt limit
            c.auth.lockout.threshold = 100;
            c.auth.mfa.ticket_max_attempts = 100;
            c.auth.mfa.email_send.burst = 20;
            c.auth.rate_limits.login_per_account.burst = 100;
        })
        .await;
        let who = "eve.mail@example.com";
        let t = app.user(who).await;
        let r = app
            .post("/v1/mfa/email/enable", Some(&t.access), json!({}))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let c = mailed_code(&app, who);
        // stored hashed
        let h: String = sqlx::query_scalar("SELECT code_hash FROM mfa_email_codes")
            .fetch_one(app.auth_db().read())
            .await
            .unwrap();
        assert!(h.len() == 64 && !h.contains(&c));
        let r = app
            .post(
                "/v1/mfa/email/confirm",
                Some(&t.access),
                json!({ "code": c }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["email_enabled"], true);

        let tk = ticket(&app, who).await;
        let r = login(&app, who, PASSWORD).await;
        assert_eq!(r.body["methods"], json!(["email"]));
        let sent = mails_with_code(&app, who);
        let r = app
            .post("/v1/auth/mfa/email", None, json!({ "mfa_ticket": tk }))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        assert_eq!(mails_with_code(&app, who), sent + 1);
        let c = mailed_code(&app, who);
        let wrong = format!("{:06}", (c.parse::<u32>().unwrap() + 1) % 1_000_000);
        // five wrong guesses kill the code: the right one then fails too
        for _ in 0..5 {
            verify(&app, &tk, &wrong, Some("email"))
                .await
                .assert_problem(401, "mfa_code_invalid");
        }
        verify(&app, &tk, &c, Some("email"))
            .await
            .assert_problem(401, "mfa_code_invalid");
        // a fresh code works, once
        app.post("/v1/auth/mfa/email", None, json!({ "mfa_ticket": tk }))
            .await;
        let c2 = mailed_code(&app, who);
        let r = verify(&app, &tk, &c2, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_mfa_claims(r.body["access_token"].as_str().unwrap());
        let tk = ticket(&app, who).await;
        verify(&app, &tk, &c2, Some("email"))
            .await
            .assert_problem(401, "mfa_code_invalid");
        // an expired code fails
        app.post("/v1/auth/mfa/email", None, json!({ "mfa_ticket": tk }))
            .await;
        let c3 = mailed_code(&app, who);
        exec(
            &app,
            "UPDATE mfa_email_codes SET expires_at = 0 WHERE user_id = (SELECT id FROM users WHERE email = $1)",
            who,
        )
        .await;
        verify(&app, &tk, &c3, Some("email"))
            .await
            .assert_problem(401, "mfa_code_invalid");
        // a code mailed for one ticket does not complete another
        app.post("/v1/auth/mfa/email", None, json!({ "mfa_ticket": tk }))
            .await;
        let c4 = mailed_code(&app, who);
        let other = ticket(&app, who).await;
        verify(&app, &other, &c4, Some("email"))
            .await
            .assert_problem(401, "mfa_code_invalid");
        app.stop().await;
    });
}

#[tokio::test]
async fn emailed_codes_are_rate_limited() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let who = "spam@example.com";
        let t = app.user(who).await;
        // default quota: 3 codes per 5 minutes per user
        for _ in 0..3 {
            let r = app
                .post("/v1/mfa/email/enable", Some(&t.access), json!({}))
                .await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        }
        let r = app
            .post("/v1/mfa/email/enable", Some(&t.access), json!({}))
            .await;
        r.assert_problem(429, "rate_limited");
        assert!(r.header("retry-after").is_some());
        assert_eq!(mails_with_code(&app, who), 3);
        // only the newest code is alive
        let c = mailed_code(&app, who);
        let r = app
            .post(
                "/v1/mfa/email/confirm",
                Some(&t.access),
                json!({ "code": c }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        app.stop().await;
    });
}

#[tokio::test]
async fn disabling_totp_needs_password_and_code() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let t = app.user("dis@example.com").await;
        let (secret, _) = enable_totp(&app, &t.access).await;
        let r = app
            .post(
                "/v1/mfa/totp/disable",
                Some(&t.access),
                json!({"password": "wrong-password-123", "code": code(&secret, 0)}),
            )
            .await;
        r.assert_problem(403, "current_password_wrong");
        let r = app
            .post(
                "/v1/mfa/totp/disable",
                Some(&t.access),
                json!({"password": PASSWORD, "code": code(&secret, 4)}),
            )
            .await;
        r.assert_problem(403, "mfa_code_invalid");
        assert_eq!(
            app.get("/v1/mfa", Some(&t.access)).await.body["totp_enabled"],
            true
        );
        let r = app
            .post(
                "/v1/mfa/totp/disable",
                Some(&t.access),
                json!({"password": PASSWORD, "code": code(&secret, 0)}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(
            app.get("/v1/mfa", Some(&t.access)).await.body["totp_enabled"],
            false
        );
        assert_eq!(app.count("mfa_recovery_codes").await, 0);
        // the password alone logs in again
        assert_eq!(login(&app, "dis@example.com", PASSWORD).await.status, 200);
        let admin = app.admin().await;
        assert_eq!(
            audit_action(&app, &admin.access, "mfa.totp_disabled")
                .await
                .len(),
            1
        );
        assert_eq!(
            audit_action(&app, &admin.access, "mfa.totp_disable_failed")
                .await
                .len(),
            2
        );
        // a lost authenticator: a recovery code stands in for the current code, once
        let (_lost, codes) = enable_totp(&app, &t.access).await;
        let r = app
            .post(
                "/v1/mfa/totp/disable",
                Some(&t.access),
                json!({"password": PASSWORD, "code": codes[3]}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(login(&app, "dis@example.com", PASSWORD).await.status, 200);
        app.stop().await;
    });
}

fn assert_step_up_challenge(r: &Resp) {
    r.assert_problem(401, "insufficient_user_authentication");
    let h = r.header("www-authenticate").unwrap();
    assert!(
        h.starts_with("Bearer error=\"insufficient_user_authentication\", error_description=\""),
        "{h}"
    );
    assert!(
        h.ends_with(&format!(", acr_values=\"{ACR_MFA}\", max_age=900")),
        "{h}"
    );
    assert_eq!(r.body["acr_values"], ACR_MFA);
    assert_eq!(r.body["max_age"], 900);
}

#[tokio::test]
async fn step_up_challenge_and_satisfying_it_without_logging_out() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let who = "step@example.com";
        let t = app.user(who).await;
        let (secret, _) = enable_totp(&app, &t.access).await;
        // the token from before enrolment has no second factor
        let change =
            json!({"current_password": PASSWORD, "new_password": crate::auth_flows::NEW_PASSWORD});
        let r = app
            .post("/v1/auth/password/change", Some(&t.access), change.clone())
            .await;
        assert_step_up_challenge(&r);

        // wrong code: refused and counted
        let r = app
            .post(
                "/v1/auth/step-up",
                Some(&t.access),
                json!({"code": code(&secret, 5)}),
            )
            .await;
        r.assert_problem(403, "mfa_code_invalid");
        let failed: i64 = sqlx::query_scalar("SELECT failed_logins FROM users WHERE email = $1")
            .bind(who)
            .fetch_one(app.auth_db().read())
            .await
            .unwrap();
        assert_eq!(failed, 1);

        let used = code(&secret, 0);
        let r = app
            .post(
                "/v1/auth/step-up",
                Some(&t.access),
                json!({"code": used, "method": "totp"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["session_id"], t.session.as_str());
        let stepped = r.body["access_token"].as_str().unwrap().to_owned();
        assert_mfa_claims(&stepped);
        assert_eq!(jwt_part(&stepped, 1)["sid"], t.session.as_str());
        let r = app
            .post("/v1/auth/password/change", Some(&stepped), change)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);

        // the session keeps the step-up: refreshed tokens carry it…
        let r = crate::auth_flows::refresh(&app, &t.refresh).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let refreshed = r.body["access_token"].as_str().unwrap().to_owned();
        assert_eq!(jwt_part(&refreshed, 1)["acr"], ACR_MFA);
        // …until max_age passes (moved back in the session row)
        sqlx::query("UPDATE sessions SET auth_time = auth_time - 901000000 WHERE id = $1")
            .bind(&t.session)
            .execute(app.auth_db().read())
            .await
            .unwrap();
        let rt = r.body["refresh_token"].as_str().unwrap();
        let r = crate::auth_flows::refresh(&app, rt).await;
        let old = r.body["access_token"].as_str().unwrap().to_owned();
        let back =
            json!({"current_password": crate::auth_flows::NEW_PASSWORD, "new_password": PASSWORD});
        assert_step_up_challenge(&app.post("/v1/auth/password/change", Some(&old), back).await);
        // a replayed step-up code does not help
        let r = app
            .post("/v1/auth/step-up", Some(&old), json!({"code": used}))
            .await;
        r.assert_problem(403, "mfa_code_invalid");
        let admin = app.admin().await;
        assert_eq!(
            audit_action(&app, &admin.access, "mfa.step_up").await.len(),
            1
        );
        assert_eq!(
            audit_action(&app, &admin.access, "mfa.step_up_failed")
                .await
                .len(),
            2
        );
        app.stop().await;
    });
}

/// With both TOTP and emailed codes on, six digits without `method` could be either:
/// refused as ambiguous before anything is counted (the mailed code checked as TOTP
/// used to fail and count towards the lockout), and accepted once the method is named.
#[tokio::test]
async fn an_ambiguous_code_asks_for_its_method() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let who = "two-factors@example.com";
        let t = app.user(who).await;
        let (secret, _) = enable_totp(&app, &t.access).await;
        let r = app
            .post(
                "/v1/auth/step-up",
                Some(&t.access),
                json!({"code": code(&secret, 0)}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let stepped = r.body["access_token"].as_str().unwrap().to_owned();
        enable_email(&app, &stepped, who).await;

        let tk = ticket(&app, who).await;
        let r = app
            .post("/v1/auth/mfa/email", None, json!({ "mfa_ticket": tk }))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let mail = code_mail(&app, who);
        assert!(
            mail.contains("Subject: Your VaultPay sign-in code")
                && mail.contains("If you did not try to sign in"),
            "{mail}"
        );
        let c = mailed_code(&app, who);
        let r = verify(&app, &tk, &c, None).await;
        r.assert_problem(422, "mfa_method_required");
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap()
                .contains("say which one this code is from"),
            "{}",
            r.text
        );
        let failures: i64 = sqlx::query_scalar("SELECT failed_logins FROM users WHERE email = $1")
            .bind(who)
            .fetch_one(app.auth_db().read())
            .await
            .unwrap();
        assert_eq!(failures, 0, "an ambiguous code is not a wrong one");
        let r = verify(&app, &tk, &c, Some("email")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        app.stop().await;
    });
}

#[tokio::test]
async fn step_up_by_emailed_code_and_for_role_changes() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let target = app.user("promote@example.com").await;
        let id = jwt_part(&target.access, 1)["sub"]
            .as_str()
            .unwrap()
            .to_owned();
        // the admin turns on emailed codes
        enable_email(&app, &admin.access, "admin@example.com").await;
        let path = format!("/v1/admin/users/{id}/roles");
        let r = app
            .post(&path, Some(&admin.access), json!({"role": "support"}))
            .await;
        assert_step_up_challenge(&r);
        let r = app
            .post("/v1/auth/step-up/email", Some(&admin.access), json!({}))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let mail = code_mail(&app, "admin@example.com");
        assert!(
            mail.contains("Subject: Your VaultPay confirmation code")
                && mail.contains("confirm a sensitive action"),
            "{mail}"
        );
        let c = mailed_code(&app, "admin@example.com");
        let r = app
            .post(
                "/v1/auth/step-up",
                Some(&admin.access),
                json!({"code": c, "method": "email"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let stepped = r.body["access_token"].as_str().unwrap().to_owned();
        let r = app
            .post(&path, Some(&stepped), json!({"role": "support"}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        // the same code does not step up twice
        let r = app
            .post(
                "/v1/auth/step-up",
                Some(&admin.access),
                json!({"code": c, "method": "email"}),
            )
            .await;
        r.assert_problem(403, "mfa_code_invalid");
        // turning emailed codes off: step-up and the password
        let off = json!({"password": PASSWORD});
        assert_step_up_challenge(
            &app.post("/v1/mfa/email/disable", Some(&admin.access), off.clone())
                .await,
        );
        app.post(
            "/v1/mfa/email/disable",
            Some(&stepped),
            json!({"password": "wrong-password-123"}),
        )
        .await
        .assert_problem(403, "current_password_wrong");
        let r = app.post("/v1/mfa/email/disable", Some(&stepped), off).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["email_enabled"], false);
        // the password alone logs the admin in again
        assert_eq!(
            login(&app, "admin@example.com", PASSWORD).await.status,
            StatusCode::OK
        );
        let admin2 = app.admin().await;
        assert_eq!(
            audit_action(&app, &admin2.access, "mfa.email_disabled")
                .await
                .len(),
            1
        );
        app.stop().await;
    });
}

#[tokio::test]
async fn large_ledger_transfers_need_step_up() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let u = app.user("rich@example.com").await;
        let open = |k: &'static str| {
            let app = &app;
            let tok = u.access.clone();
            async move {
                let r = ledger_post(
                    app,
                    "/v1/accounts",
                    &tok,
                    k,
                    json!({"currency": "USD", "kind": "current", "name": k}),
                )
                .await;
                assert_eq!(r.status, 201, "{}", r.text);
                r.body["id"].as_str().unwrap().to_owned()
            }
        };
        let a = open("open-a").await;
        let b = open("open-b").await;
        // money entering the ledger at the threshold or more: the admin steps up too
        let deposit =
            json!({"account_id": a, "amount": 500_000, "currency": "USD", "reference": "x"});
        let r = ledger_post(
            &app,
            "/v1/admin/deposits",
            &admin.access,
            "dep-1",
            deposit.clone(),
        )
        .await;
        assert_step_up_challenge(&r);
        let admin_stepped = app.admin_mfa().await.access;
        let r = ledger_post(&app, "/v1/admin/deposits", &admin_stepped, "dep-1", deposit).await;
        assert!(r.status.is_success(), "{}", r.text);
        let transfer = |amount: i64| json!({"from_account_id": a, "to_account_id": b, "amount": amount, "currency": "USD", "description": "t"});
        // small: the password session is enough
        let r = ledger_post(&app, "/v1/transfers", &u.access, "t-small", transfer(100)).await;
        assert_eq!(r.status, 201, "{}", r.text);
        // at the threshold: step-up, with the RFC 9470 challenge, which tells a user
        // without a second factor where to enrol one
        let r = ledger_post(&app, "/v1/transfers", &u.access, "t-big", transfer(100_000)).await;
        assert_step_up_challenge(&r);
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap()
                .contains("POST /v1/mfa/totp"),
            "{}",
            r.text
        );
        let r = ledger_post(
            &app,
            "/v1/transfers/batch",
            &u.access,
            "b-big",
            json!({"transfers": [transfer(60_000), transfer(60_000)]}),
        )
        .await;
        assert_step_up_challenge(&r);
        // an amount no transfer may have moves nothing: refused as such at once, not
        // sent through a step-up it could never pass (nor counted in a batch's total)
        for (key, amount) in [
            ("t-max", i64::MAX),
            ("t-over", 1_000_000_000_000_001),
            ("t-neg", -100_000),
        ] {
            ledger_post(&app, "/v1/transfers", &u.access, key, transfer(amount))
                .await
                .assert_problem(422, "amount_invalid");
        }
        let r = ledger_post(
            &app,
            "/v1/transfers/batch",
            &u.access,
            "b-huge-item",
            json!({"transfers": [transfer(i64::MAX), transfer(10)]}),
        )
        .await;
        assert!(r.status.is_success(), "{}", r.text);
        assert_eq!(
            (r.body["succeeded"].as_i64(), r.body["failed"].as_i64()),
            (Some(1), Some(1)),
            "{}",
            r.text
        );
        // enrol, step up, retry the same request
        let (secret, _) = enable_totp(&app, &u.access).await;
        let r = app
            .post(
                "/v1/auth/step-up",
                Some(&u.access),
                json!({"code": code(&secret, 0)}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let stepped = r.body["access_token"].as_str().unwrap().to_owned();
        let r = ledger_post(&app, "/v1/transfers", &stepped, "t-big", transfer(100_000)).await;
        assert_eq!(r.status, 201, "{}", r.text);
        // a retry of it, even with the token from before the step-up, replays the
        // answer: it is not sent to step up for a payment that was made
        let again = ledger_post(&app, "/v1/transfers", &u.access, "t-big", transfer(100_000)).await;
        assert_eq!(again.status, 201, "{}", again.text);
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        assert_eq!(again.body["id"], r.body["id"]);
        // the same key for another request is neither replayed nor challenged: it can
        // never run under this key, whatever the step-up
        ledger_post(&app, "/v1/transfers", &u.access, "t-big", transfer(100_001))
            .await
            .assert_problem(422, "idempotency_key_reused");
        let r = app.get(&format!("/v1/accounts/{b}"), Some(&stepped)).await;
        assert_eq!(r.body["balance"], 100_110, "{}", r.text);
        app.stop().await;
    });
}

#[tokio::test]
async fn mfa_routes_refuse_bad_input_with_4xx_and_are_documented() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let t = app.user("junk@example.com").await;
    let long = "9".repeat(5000);
    let cases: Vec<(&str, bool, Value)> = vec![
        ("/v1/mfa/totp/confirm", true, json!({"code": long})),
        ("/v1/mfa/totp/confirm", true, json!({"code": 123456})),
        (
            "/v1/mfa/totp/confirm",
            true,
            json!({"code": "123456", "x": 1}),
        ),
        (
            "/v1/mfa/totp/disable",
            true,
            json!({"password": long, "code": "1"}),
        ),
        (
            "/v1/mfa/email/confirm",
            true,
            json!({"code": "１２３４５６"}),
        ),
        (
            "/v1/auth/mfa/verify",
            false,
            json!({"mfa_ticket": long, "code": long}),
        ),
        (
            "/v1/auth/mfa/verify",
            false,
            json!({"mfa_ticket": "t", "code": "1", "method": "sms"}),
        ),
        ("/v1/auth/mfa/verify", false, json!({})),
        ("/v1/auth/mfa/email", false, json!({"mfa_ticket": long})),
        (
            "/v1/auth/step-up",
            true,
            json!({"code": long, "method": "totp"}),
        ),
        (
            "/v1/auth/step-up",
            true,
            json!({"code": "123456", "method": "sms"}),
        ),
        ("/v1/auth/step-up", true, json!([])),
    ];
    for (path, authed, body) in cases {
        let token = authed.then_some(t.access.as_str());
        let r = app.post(path, token, body.clone()).await;
        assert!(
            r.status.is_client_error(),
            "{path} {body}: {} {}",
            r.status,
            r.text
        );
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
    }
    // without a token: 401
    for path in [
        "/v1/mfa/totp",
        "/v1/auth/step-up",
        "/v1/auth/step-up/email",
        "/v1/mfa/email/enable",
    ] {
        app.post(path, None, json!({"code": "123456"}))
            .await
            .assert_problem(401, "missing_token");
    }
    let doc = app.get("/openapi.json", None).await;
    for path in [
        "/v1/mfa",
        "/v1/mfa/totp",
        "/v1/mfa/totp/confirm",
        "/v1/mfa/totp/disable",
        "/v1/mfa/email/enable",
        "/v1/mfa/email/confirm",
        "/v1/mfa/email/disable",
        "/v1/auth/mfa/verify",
        "/v1/auth/mfa/email",
        "/v1/auth/step-up",
        "/v1/auth/step-up/email",
    ] {
        assert!(
            doc.body["paths"][path].is_object(),
            "{path} is not documented"
        );
    }
    assert!(doc.body["paths"]["/v1/auth/login"]["post"]["responses"]["202"].is_object());
    assert!(doc.body["components"]["schemas"]["MfaChallenge"].is_object());
    app.stop().await;
}

#[tokio::test]
async fn one_totp_code_raced_on_several_tickets_logs_in_once() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let who = "race@example.com";
        let t = app.user(who).await;
        let (secret, _) = enable_totp(&app, &t.access).await;
        let mut tickets = Vec::new();
        for _ in 0..4 {
            tickets.push(ticket(&app, who).await);
        }
        let c = code(&secret, 0);
        let results =
            futures::future::join_all(tickets.iter().map(|tk| verify(&app, tk, &c, Some("totp"))))
                .await;
        let ok = results
            .iter()
            .filter(|r| r.status == StatusCode::OK)
            .count();
        assert_eq!(ok, 1, "exactly one login with one code");
        for r in results.iter().filter(|r| r.status != StatusCode::OK) {
            r.assert_problem(401, "mfa_code_invalid");
        }
        // and a step-up with it on the session that won is a replay too
        let winner = results.iter().find(|r| r.status == StatusCode::OK).unwrap();
        let access = winner.body["access_token"].as_str().unwrap();
        app.post("/v1/auth/step-up", Some(access), json!({ "code": c }))
            .await
            .assert_problem(403, "mfa_code_invalid");
        // a revoked session cannot step up
        app.post("/v1/auth/logout", Some(access), json!({})).await;
        app.post(
            "/v1/auth/step-up",
            Some(access),
            json!({ "code": code(&secret, 1) }),
        )
        .await
        .assert_problem(401, "session_revoked");
        app.stop().await;
    });
}

#[tokio::test]
async fn enrolling_a_factor_needs_a_recent_sign_in_or_step_up() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let who = "stolen@example.com";
        let t = app.user(who).await;
        // a token of a session signed in long ago (refreshed since): refused, with a
        // max_age challenge (sign in again), so a stolen token cannot enrol a device
        sqlx::query("UPDATE sessions SET auth_time = auth_time - 901000000 WHERE id = $1")
            .bind(&t.session)
            .execute(app.auth_db().read())
            .await
            .unwrap();
        let r = crate::auth_flows::refresh(&app, &t.refresh).await;
        let old = r.body["access_token"].as_str().unwrap().to_owned();
        for path in ["/v1/mfa/totp", "/v1/mfa/email/enable"] {
            let r = app.post(path, Some(&old), json!({})).await;
            r.assert_problem(401, "insufficient_user_authentication");
            let h = r.header("www-authenticate").unwrap();
            assert!(
                h.starts_with("Bearer error=\"insufficient_user_authentication\"")
                    && h.ends_with(", max_age=900")
                    && !h.contains("acr_values"),
                "{h}"
            );
        }
        assert_eq!(app.count("mfa_totp").await, 0);
        // a fresh sign-in may enrol; a second factor then needs step-up to add another
        let fresh = app.login(who, PASSWORD).await;
        let (secret, _) = enable_totp(&app, &fresh.access).await;
        let r = app
            .post("/v1/mfa/email/enable", Some(&fresh.access), json!({}))
            .await;
        assert_step_up_challenge(&r);
        let r = app
            .post(
                "/v1/auth/step-up",
                Some(&fresh.access),
                json!({"code": code(&secret, 0)}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let stepped = r.body["access_token"].as_str().unwrap().to_owned();
        let r = app
            .post("/v1/mfa/email/enable", Some(&stepped), json!({}))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        app.stop().await;
    });
}

/// Confirming a new network by email replaces no factor: the held login of a user with
/// TOTP goes on to the MFA step, and only a valid code ends it with tokens.
#[tokio::test]
async fn an_ip_confirmed_login_still_needs_the_second_factor() {
    use crate::iptrust::{complete_from, link_post, login_from, spawn_proxied, user_at};
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |_| {}).await;
        let email = "both@example.com";
        let (_, t) = user_at(&app, email, "198.51.100.10").await;
        let (secret, _) = enable_totp(&app, &t.access).await;

        let away = "203.0.113.5";
        let held = login_from(&app, away, email, "dev-2").await;
        assert_eq!(held.status, StatusCode::ACCEPTED, "{}", held.text);
        assert_eq!(held.body["status"], "ip_confirmation_required");
        let login_ticket = held.body["login_ticket"].as_str().unwrap().to_owned();
        let confirm = crate::auth_flows::mail_token(&app, email, "login/confirm?token=");
        let r = link_post(&app, "confirm", &confirm).await;
        assert!(r.status.is_success(), "{}", r.text);

        // earlier wrong guesses (of codes, say): completing the held login with the
        // right password must not wipe them before the second factor has passed
        let failures = || async {
            sqlx::query_scalar::<_, i64>("SELECT failed_logins FROM users WHERE email = $1")
                .bind(email)
                .fetch_one(app.auth_db().read())
                .await
                .unwrap()
        };
        sqlx::query("UPDATE users SET failed_logins = 3 WHERE email = $1")
            .bind(email)
            .execute(app.auth_db().writer())
            .await
            .unwrap();
        let next = complete_from(&app, away, &login_ticket, "dev-2").await;
        assert_eq!(next.status, StatusCode::ACCEPTED, "{}", next.text);
        assert_eq!(next.body["status"], "mfa_required");
        assert_eq!(failures().await, 3);
        assert!(next.body.get("access_token").is_none());
        let mfa_ticket = next.body["mfa_ticket"].as_str().unwrap().to_owned();
        // the login ticket is spent: it cannot skip the second factor on a retry
        let again = complete_from(&app, away, &login_ticket, "dev-2").await;
        assert_eq!(again.status, StatusCode::BAD_REQUEST, "{}", again.text);

        verify(&app, &mfa_ticket, "000000", None)
            .await
            .assert_problem(401, "mfa_code_invalid");
        assert_eq!(failures().await, 4);
        let done = verify(&app, &mfa_ticket, &code(&secret, 0), None).await;
        assert_eq!(done.status, StatusCode::OK, "{}", done.text);
        assert_mfa_claims(done.body["access_token"].as_str().unwrap());
        assert_eq!(failures().await, 0);
        app.stop().await;
    });
}

/// The OAuth browser sign-in of a user with TOTP shows the code step after the
/// password: no code, a wrong one or a replayed one gets no consent page; a fresh
/// code does, and the authorization code it leads to carries `mfa` in `amr`.
#[tokio::test]
async fn oauth_browser_sign_in_asks_for_the_second_factor() {
    use crate::oauth::{authorize_query, exchange, pkce, web_client, Browser, CB};
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let client = web_client(&app, &admin.access).await;
        let email = "browser2fa@example.com";
        let t = app.user(email).await;
        let (secret, _) = enable_totp(&app, &t.access).await;

        let redirect = CB.to_owned();
        let (verifier, challenge) = pkce();
        let mut b = Browser::new(&app);
        let p = b
            .get(&authorize_query(
                &client.id,
                &redirect,
                "openid email",
                Some(&challenge),
            ))
            .await;
        let csrf = p.csrf();
        let p = b.sign_in(&csrf, email, PASSWORD).await;
        assert_eq!(p.status, StatusCode::OK, "{}", p.text);
        assert!(
            p.text.contains("/oauth/authorize/second-factor"),
            "{}",
            p.text
        );
        assert!(!p.text.contains("Allow access"));
        // consent cannot be skipped to
        let skip = b.consent(&csrf, "approve").await;
        assert!(skip.location.is_none(), "{}", skip.text);
        let wrong = b
            .post(
                "/oauth/authorize/second-factor",
                &[("csrf", &csrf), ("code", "000000")],
            )
            .await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{}", wrong.text);
        let ok = b
            .post(
                "/oauth/authorize/second-factor",
                &[("csrf", &csrf), ("code", &code(&secret, 0))],
            )
            .await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
        assert!(ok.text.contains("Allow access"), "{}", ok.text);
        let p = b.consent(&csrf, "approve").await;
        let code_param = p.param("code").expect("code in redirect");
        let tokens = exchange(&app, &client, &code_param, &redirect, &verifier).await;
        assert_eq!(tokens.status, StatusCode::OK, "{}", tokens.text);
        let id = crate::auth_flows::jwt_part(tokens.body["id_token"].as_str().unwrap(), 1);
        // the same methods as a first-party sign-in with a second factor
        assert_eq!(id["amr"], json!(["pwd", "otp", "mfa"]), "{id}");
        assert_eq!(id["acr"], ACR_MFA, "{id}");
        app.stop().await;
    });
}

/// RFC 9470 for OAuth clients: a client refused with `acr_values` sends the user back
/// to /oauth/authorize with them; the sign-in then requires the second factor, and an
/// account without one ends with `unmet_authentication_requirements` instead of a
/// token the resource would refuse again.
#[tokio::test]
async fn oauth_acr_values_ask_for_a_second_factor() {
    use crate::oauth::{authorize_query, exchange, pkce, web_client, Browser, CB};
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let client = web_client(&app, &admin.access).await;
        let acr = format!(
            "&acr_values=urn%3Aexample%3Aother%20{}",
            urlencoding::encode(ACR_MFA)
        );
        let sign_in = |email: &'static str, extra: String| {
            let (app, client) = (&app, &client);
            async move {
                let (verifier, challenge) = pkce();
                let mut b = Browser::new(app);
                let q = authorize_query(&client.id, CB, "openid", Some(&challenge)) + &extra;
                let csrf = b.get(&q).await.csrf();
                let p = b.sign_in(&csrf, email, PASSWORD).await;
                (b, p, csrf, verifier)
            }
        };

        // no second factor: refused back to the client, the request ended, audited
        app.user("plain@example.com").await;
        let requests = app.count("oauth_requests").await;
        let (mut b, p, csrf, _) = sign_in("plain@example.com", acr.clone()).await;
        assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.text);
        assert_eq!(
            p.param("error").as_deref(),
            Some("unmet_authentication_requirements")
        );
        assert_eq!(p.param("state").as_deref(), Some("st-123"));
        assert!(p.param("code").is_none());
        assert_eq!(app.count("oauth_requests").await, requests);
        let again = b.consent(&csrf, "approve").await;
        assert!(again.location.is_none(), "{}", again.text);
        assert_eq!(
            audit_action(&app, &admin.access, "oauth.acr_unmet")
                .await
                .len(),
            1
        );
        // without acr_values the same account signs in, with no acr in the ID token
        let (mut b, p, csrf, verifier) = sign_in("plain@example.com", String::new()).await;
        assert!(p.text.contains("Allow access"), "{}", p.text);
        let p = b.consent(&csrf, "approve").await;
        let tokens = exchange(&app, &client, &p.param("code").unwrap(), CB, &verifier).await;
        let id = jwt_part(tokens.body["id_token"].as_str().unwrap(), 1);
        assert!(id.get("acr").is_none(), "{id}");

        // with TOTP: the second factor is asked, and the tokens say so
        let t = app.user("strong@example.com").await;
        let (secret, _) = enable_totp(&app, &t.access).await;
        let (mut b, p, csrf, verifier) = sign_in("strong@example.com", acr).await;
        assert!(
            p.text.contains("/oauth/authorize/second-factor"),
            "{}",
            p.text
        );
        let ok = b
            .post(
                "/oauth/authorize/second-factor",
                &[("csrf", &csrf), ("code", &code(&secret, 0))],
            )
            .await;
        assert!(ok.text.contains("Allow access"), "{}", ok.text);
        let p = b.consent(&csrf, "approve").await;
        let tokens = exchange(&app, &client, &p.param("code").unwrap(), CB, &verifier).await;
        assert_eq!(tokens.status, StatusCode::OK, "{}", tokens.text);
        let id = jwt_part(tokens.body["id_token"].as_str().unwrap(), 1);
        assert_eq!(id["acr"], ACR_MFA, "{id}");
        let access = jwt_part(tokens.body["access_token"].as_str().unwrap(), 1);
        assert_eq!(access["acr"], ACR_MFA, "{access}");
        let d = app.get("/.well-known/openid-configuration", None).await;
        assert_eq!(d.body["acr_values_supported"], json!([ACR_MFA]));
        app.stop().await;
    });
}

/// A "helpdesk" role with `users:manage` alone (made by `admin`), given to a new user
/// `email` with a second factor: that user's tokens, with a fresh factor.
async fn helpdesk(app: &TestApp, admin: &str, email: &str) -> crate::helpers::Tokens {
    let r = app
        .post(
            "/v1/admin/roles",
            Some(admin),
            json!({ "name": "helpdesk", "permissions": ["users:manage"] }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = crate::auth_flows::id_of(&app.register(email).await);
    let r = app
        .post(
            &format!("/v1/admin/users/{id}/roles"),
            Some(admin),
            json!({ "role": "helpdesk" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    app.with_mfa(email).await
}

/// Registers `email` with TOTP on; returns the user id.
async fn totp_user(app: &TestApp, email: &str) -> String {
    app.register(email).await;
    let t = app.login(email, PASSWORD).await;
    enable_totp(app, &t.access).await;
    jwt_part(&t.access, 1)["sub"].as_str().unwrap().to_owned()
}

/// An administrator removes the second factors of a user who lost them (or on whose
/// account someone else enrolled one): the user then signs in with the password
/// alone, their sessions and pending second-factor sign-ins end, the reset is audited
/// with its reason and the user is told by mail. Only `users:manage`, only with a
/// fresh second factor of the administrator's, never on their own account.
#[tokio::test]
async fn an_administrator_resets_a_users_second_factors() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let email = "lost-phone@example.com";
        app.register(email).await;
        let t = app.login(email, PASSWORD).await;
        let (_, recovery) = enable_totp(&app, &t.access).await;
        // and emailed codes (a second factor is enrolled after a step-up)
        let r = app
            .post(
                "/v1/auth/step-up",
                Some(&t.access),
                json!({ "code": recovery[0], "method": "recovery_code" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let stepped = r.body["access_token"].as_str().unwrap().to_owned();
        let r = app
            .post("/v1/mfa/email/enable", Some(&stepped), json!({}))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let r = app
            .post(
                "/v1/mfa/email/confirm",
                Some(&stepped),
                json!({ "code": mailed_code(&app, email) }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let pending = ticket(&app, email).await;
        // a login code mailed for the pending ticket
        let r = app
            .post("/v1/auth/mfa/email", None, json!({ "mfa_ticket": pending }))
            .await;
        assert!(r.status.is_success(), "{}", r.text);
        let mailed = mailed_code(&app, email);
        let uid = jwt_part(&t.access, 1)["sub"].as_str().unwrap().to_owned();
        let of_user = |more: &str| format!("user_id = '{uid}'{more}");
        assert_eq!(
            app.count_where("mfa_recovery_codes", &of_user("")).await,
            10
        );
        let path = format!("/v1/admin/users/{uid}/mfa/reset");
        let body = json!({ "reason": "identity checked by video call, ticket 4711" });

        // a customer may not; an admin without a fresh second factor must step up
        app.post(&path, Some(&t.access), body.clone())
            .await
            .assert_problem(403, "forbidden");
        let plain = app.admin().await;
        app.post(&path, Some(&plain.access), body.clone())
            .await
            .assert_problem(401, "insufficient_user_authentication");
        let admin = app.admin_mfa().await;
        // bad input: no reason, an unknown field, an unknown user, the admin's own
        app.post(&path, Some(&admin.access), json!({ "reason": "  " }))
            .await
            .assert_problem(422, "reason_invalid");
        let r = app
            .post(
                &path,
                Some(&admin.access),
                json!({ "reason": "x", "all": true }),
            )
            .await;
        assert!(r.status.is_client_error(), "{}", r.text);
        app.post(
            "/v1/admin/users/no-such-user/mfa/reset",
            Some(&admin.access),
            body.clone(),
        )
        .await
        .assert_problem(404, "not_found");
        let own = jwt_part(&admin.access, 1)["sub"]
            .as_str()
            .unwrap()
            .to_owned();
        app.post(
            &format!("/v1/admin/users/{own}/mfa/reset"),
            Some(&admin.access),
            body.clone(),
        )
        .await
        .assert_problem(422, "mfa_reset_self");
        assert_eq!(
            login(&app, email, PASSWORD).await.status,
            StatusCode::ACCEPTED,
            "nothing was reset by the refused requests"
        );

        let r = app.post(&path, Some(&admin.access), body.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["status"], "mfa_reset");
        // the password alone signs in now; the old session and ticket are dead
        let r = login(&app, email, PASSWORD).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(
            app.get("/v1/me", Some(&t.access)).await.status,
            StatusCode::UNAUTHORIZED
        );
        verify(&app, &pending, &mailed, Some("email"))
            .await
            .assert_problem(401, "mfa_ticket_invalid");
        for table in ["mfa_totp", "mfa_recovery_codes", "mfa_email"] {
            assert_eq!(app.count_where(table, &of_user("")).await, 0, "{table}");
        }
        assert_eq!(
            app.count_where("mfa_email_codes", &of_user(" AND used_at IS NULL"))
                .await,
            0
        );
        let fresh = r.body["access_token"].as_str().unwrap().to_owned();
        let status = app.get("/v1/mfa", Some(&fresh)).await;
        assert_eq!(status.body["totp_enabled"], false, "{}", status.text);
        let entries = audit_action(&app, &admin.access, "mfa.reset").await;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["actor"], own.as_str());
        assert_eq!(entries[0]["resource"], uid.as_str());
        assert_eq!(
            entries[0]["metadata"]["reason"],
            "identity checked by video call, ticket 4711"
        );
        assert!(app
            .mails()
            .iter()
            .any(|m| m.contains(&format!("To: {email}"))
                && m.contains("Subject: Your second factors were reset by an administrator")));
        // nothing left to reset
        app.post(&path, Some(&admin.access), body.clone())
            .await
            .assert_problem(409, "mfa_not_enrolled");

        // a factor someone else enrolled, who knows the password: the account is also
        // locked until its password is reset
        let other = "taken-over@example.com";
        let oid = totp_user(&app, other).await;
        let r = app
            .post(
                &format!("/v1/admin/users/{oid}/mfa/reset"),
                Some(&admin.access),
                json!({ "reason": "owner reported an unknown authenticator", "require_password_reset": true }),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        login(&app, other, PASSWORD)
            .await
            .assert_problem(423, "password_reset_required");

        // a help desk with `users:manage` alone resets a customer's factors, never an
        // administrator's (who can do more than it can)
        let desk = helpdesk(&app, &admin.access, "desk@example.com").await;
        app.post(
            &format!("/v1/admin/users/{own}/mfa/reset"),
            Some(&desk.access),
            body.clone(),
        )
        .await
        .assert_problem(403, "forbidden");
        let tid = totp_user(&app, "third@example.com").await;
        let r = app
            .post(
                &format!("/v1/admin/users/{tid}/mfa/reset"),
                Some(&desk.access),
                body.clone(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        app.stop().await;
    });
}

/// A help desk's reset of a user's second factors checks the user's permissions under
/// the user's row, which a role change takes too: a role granted while the reset waits
/// is ordered after it (the reset saw a customer), never between its check and its
/// action. Before, the reset checked cached permissions before its transaction and a
/// grant did not take the row, so an administrator made meanwhile lost their factors
/// to a help desk. PostgreSQL (row locks order the two).
#[tokio::test]
async fn a_role_granted_during_a_factor_reset_is_ordered_after_it() {
    if !vaultpay_store::testing::backends().contains(&Backend::Postgres) {
        return;
    }
    let app = TestApp::spawn(Backend::Postgres).await;
    let admin = app.admin_mfa().await;
    let desk = helpdesk(&app, &admin.access, "desk.race@example.com").await;
    let target = totp_user(&app, "rising@example.com").await;
    let (reset, grant) = crate::helpers::one_after_the_other(
        &app,
        &target,
        app.post(
            &format!("/v1/admin/users/{target}/mfa/reset"),
            Some(&desk.access),
            json!({ "reason": "lost phone", "require_password_reset": false }),
        ),
        app.post(
            &format!("/v1/admin/users/{target}/roles"),
            Some(&admin.access),
            json!({ "role": "admin" }),
        ),
    )
    .await;
    assert_eq!(grant.status, StatusCode::OK, "{}", grant.text);
    use sqlx::Row;
    let order: Vec<String> = sqlx::query(
        "SELECT action FROM audit_log WHERE resource = $1 \
         AND action IN ('mfa.reset', 'role.granted') ORDER BY seq",
    )
    .bind(&target)
    .fetch_all(app.auth_db().read())
    .await
    .unwrap()
    .iter()
    .map(|r| r.get("action"))
    .collect();
    if reset.status == StatusCode::OK {
        assert_eq!(
            order,
            ["mfa.reset", "role.granted"],
            "the reset acted on an administrator"
        );
    } else {
        reset.assert_problem(403, "forbidden");
        assert_eq!(order, ["role.granted"]);
    }
    app.stop().await;
}

/// The device page with the right password and a guessed code, once per guess.
async fn device_page_guess(
    app: &TestApp,
    cli: &crate::oauth::OClient,
    email: &str,
    otp: &str,
) -> crate::oauth::Page {
    use crate::oauth::{device_start, Browser};
    let d = device_start(app, cli, "openid").await;
    let uc = d["user_code"].as_str().unwrap().to_owned();
    let mut b = Browser::new(app);
    let csrf = b.get(&format!("/oauth/device?user_code={uc}")).await.csrf();
    b.post(
        "/oauth/device",
        &[
            ("csrf", &csrf),
            ("user_code", &uc),
            ("shown", &uc),
            ("email", email),
            ("password", PASSWORD),
            ("otp", otp),
            ("decision", "approve"),
        ],
    )
    .await
}

/// The browser sign-ins (device and authorize pages) reset the failure count only once
/// the second factor passed: someone who knows the password and guesses codes, one
/// sign-in page after another, is locked out as after the API's login. Before, each
/// right password wiped the count the wrong codes had added.
#[tokio::test]
async fn browser_sign_ins_keep_the_failure_count_until_the_second_factor_passes() {
    use crate::oauth::{authorize_query, device_client, pkce, web_client, Browser, CB};
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let cli = device_client(&app, &admin.access).await;
        let client = web_client(&app, &admin.access).await;
        let email = "pagebrute@example.com";
        let t = app.user(email).await;
        let (secret, _) = enable_totp(&app, &t.access).await;
        // the lockout threshold is 5: guesses alternate between the two pages
        for i in 0..5 {
            let guess = code(&secret, 5 + i); // never inside the window
            if i % 2 == 0 {
                let p = device_page_guess(&app, &cli, email, &guess).await;
                assert_eq!(p.status, StatusCode::UNAUTHORIZED, "{}", p.text);
            } else {
                let (_, challenge) = pkce();
                let mut b = Browser::new(&app);
                let q = authorize_query(&client.id, CB, "openid", Some(&challenge));
                let csrf = b.get(&q).await.csrf();
                let p = b.sign_in(&csrf, email, PASSWORD).await;
                assert!(
                    p.text.contains("/oauth/authorize/second-factor"),
                    "{}",
                    p.text
                );
                let w = b
                    .post(
                        "/oauth/authorize/second-factor",
                        &[("csrf", &csrf), ("code", &guess)],
                    )
                    .await;
                assert_eq!(w.status, StatusCode::UNAUTHORIZED, "{}", w.text);
            }
        }
        login(&app, email, PASSWORD)
            .await
            .assert_problem(423, "account_locked");
        app.stop().await;
    });
}

/// A user whose only factor is emailed codes approves a device: the page mails a code
/// when the form has none, and the code typed from that mail is the one checked (a
/// second mail sent before checking it used to void it). A right code resets the
/// failure count.
#[tokio::test]
async fn device_page_takes_an_emailed_code() {
    use crate::oauth::device_client;
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let cli = device_client(&app, &admin.access).await;
        let who = "mailonly@example.com";
        let t = app.user(who).await;
        enable_email(&app, &t.access, who).await;

        let sent = mails_with_code(&app, who);
        let p = device_page_guess(&app, &cli, who, "").await;
        assert_eq!(p.status, StatusCode::UNAUTHORIZED, "{}", p.text);
        assert!(p.text.contains("on its way"), "{}", p.text);
        assert_eq!(mails_with_code(&app, who), sent + 1);
        let wrong = device_page_guess(&app, &cli, who, "000000").await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{}", wrong.text);
        // no new mail for a form that carries a code
        assert_eq!(mails_with_code(&app, who), sent + 1);
        let failed: i64 = sqlx::query_scalar("SELECT failed_logins FROM users WHERE email = $1")
            .bind(who)
            .fetch_one(app.auth_db().read())
            .await
            .unwrap();
        assert!(failed >= 1, "a wrong code counts: {failed}");
        let ok = device_page_guess(&app, &cli, who, &mailed_code(&app, who)).await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
        assert!(ok.text.contains("Device connected"), "{}", ok.text);
        let failed: i64 = sqlx::query_scalar("SELECT failed_logins FROM users WHERE email = $1")
            .bind(who)
            .fetch_one(app.auth_db().read())
            .await
            .unwrap();
        assert_eq!(failed, 0);
        // the factor that passed is audited
        let passed = audit_action(&app, &admin.access, "oauth.mfa_passed").await;
        assert_eq!(passed.len(), 1, "{passed:?}");
        assert_eq!(passed[0]["metadata"]["mfa_method"], "email", "{passed:?}");
        app.stop().await;
    });
}

/// A step-up with a token issued to an OAuth client answers a token for that client,
/// with its scope, not a first-party one: it cannot be used where only the user's own
/// session may act (approving a device code).
#[tokio::test]
async fn step_up_keeps_an_oauth_token_the_clients() {
    use crate::oauth::{
        authorize_query, device_client, device_start, exchange, pkce, web_client, Browser, CB,
    };
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let client = web_client(&app, &admin.access).await;
        let email = "stepclient@example.com";
        let t = app.user(email).await;
        let (secret, _) = enable_totp(&app, &t.access).await;

        let (verifier, challenge) = pkce();
        let mut b = Browser::new(&app);
        let csrf = b
            .get(&authorize_query(
                &client.id,
                CB,
                "openid api",
                Some(&challenge),
            ))
            .await
            .csrf();
        b.sign_in(&csrf, email, PASSWORD).await;
        let ok = b
            .post(
                "/oauth/authorize/second-factor",
                &[("csrf", &csrf), ("code", &code(&secret, 0))],
            )
            .await;
        assert!(ok.text.contains("Allow access"), "{}", ok.text);
        let p = b.consent(&csrf, "approve").await;
        let tokens = exchange(&app, &client, &p.param("code").unwrap(), CB, &verifier).await;
        assert_eq!(tokens.status, StatusCode::OK, "{}", tokens.text);
        let access = tokens.body["access_token"].as_str().unwrap().to_owned();

        let r = app
            .post(
                "/v1/auth/step-up",
                Some(&access),
                json!({"code": code(&secret, 1)}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["scope"], "openid api", "{}", r.text);
        let stepped = r.body["access_token"].as_str().unwrap().to_owned();
        let claims = jwt_part(&stepped, 1);
        assert_eq!(claims["client_id"], client.id.as_str(), "{claims}");
        assert_eq!(claims["scope"], "openid api", "{claims}");
        assert!(claims["amr"].as_array().unwrap().iter().any(|m| m == "mfa"));

        let cli = device_client(&app, &admin.access).await;
        let d = device_start(&app, &cli, "openid").await;
        app.post(
            "/v1/oauth/device/approve",
            Some(&stepped),
            json!({ "user_code": d["user_code"] }),
        )
        .await
        .assert_problem(403, "first_party_session_required");
        app.stop().await;
    });
}

/// A token issued to an OAuth client, even with the `api` scope and a fresh sign-in,
/// adds no second factor for the user (it would hold the only TOTP secret and the
/// recovery codes) and changes no credential: 403 `first_party_session_required`. The
/// user's own session does all of it.
#[tokio::test]
async fn oauth_clients_cannot_enrol_factors_or_change_credentials() {
    use crate::oauth::{exchange, get_code, pkce, web_client, CB};
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let client = web_client(&app, &admin.access).await;
        let email = "delegated@example.com";
        let own = app.user(email).await;
        let (verifier, challenge) = pkce();
        let code = get_code(&app, &client.id, CB, "openid api", &challenge, email).await;
        let tokens = exchange(&app, &client, &code, CB, &verifier).await;
        assert_eq!(tokens.status, StatusCode::OK, "{}", tokens.text);
        let delegated = tokens.body["access_token"].as_str().unwrap().to_owned();
        // the client may act on the API (it has `api`)
        assert_eq!(
            app.get("/v1/me", Some(&delegated)).await.status,
            StatusCode::OK
        );
        for (path, body) in [
            ("/v1/mfa/totp", json!({})),
            ("/v1/mfa/email/enable", json!({})),
            (
                "/v1/auth/password/change",
                json!({ "current_password": PASSWORD, "new_password": "An0ther-correct-Horse-battery" }),
            ),
            (
                "/v1/auth/email/change",
                json!({ "new_email": "elsewhere@example.com", "password": PASSWORD }),
            ),
        ] {
            app.post(path, Some(&delegated), body)
                .await
                .assert_problem(403, "first_party_session_required");
        }
        assert_eq!(app.count_where("mfa_totp", "1 = 1").await, 0);
        // the user's own session enrols
        let r = app.post("/v1/mfa/totp", Some(&own.access), json!({})).await;
        assert!(r.status.is_success(), "{}", r.text);
        // nor removes a factor, ends the user's other sessions, or logs out everywhere
        for (path, body) in [
            (
                "/v1/mfa/totp/disable",
                json!({ "password": PASSWORD, "code": "123456" }),
            ),
            ("/v1/mfa/email/disable", json!({ "password": PASSWORD })),
            ("/v1/auth/logout", json!({ "everywhere": true })),
        ] {
            app.post(path, Some(&delegated), body)
                .await
                .assert_problem(403, "first_party_session_required");
        }
        let own_sid = jwt_part(&own.access, 1)["sid"].as_str().unwrap().to_owned();
        app.delete(&format!("/v1/sessions/{own_sid}"), Some(&delegated))
            .await
            .assert_problem(403, "first_party_session_required");
        assert_eq!(
            app.get("/v1/me", Some(&own.access)).await.status,
            StatusCode::OK,
            "the user's own session is untouched"
        );
        // an administrator's delegated token manages no OAuth clients (a deletion ends
        // every session of the client's users); their own session does
        let (verifier, challenge) = pkce();
        let code = get_code(
            &app,
            &client.id,
            CB,
            "openid api",
            &challenge,
            "admin@example.com",
        )
        .await;
        let tokens = exchange(&app, &client, &code, CB, &verifier).await;
        let delegated_admin = tokens.body["access_token"].as_str().unwrap().to_owned();
        let new_client = json!({ "name": "x", "grant_types": ["client_credentials"] });
        app.post(
            "/v1/admin/clients",
            Some(&delegated_admin),
            new_client.clone(),
        )
        .await
        .assert_problem(403, "first_party_session_required");
        app.delete(
            &format!("/v1/admin/clients/{}", client.id),
            Some(&delegated_admin),
        )
        .await
        .assert_problem(403, "first_party_session_required");
        // nor exercises an administrator's powers: unlocking, reading the audit trail,
        // moving the treasury's money
        let own_user = jwt_part(&own.access, 1)["sub"].as_str().unwrap().to_owned();
        app.post(
            &format!("/v1/admin/users/{own_user}/unlock"),
            Some(&delegated_admin),
            json!({}),
        )
        .await
        .assert_problem(403, "first_party_session_required");
        app.get("/v1/admin/audit", Some(&delegated_admin))
            .await
            .assert_problem(403, "first_party_session_required");
        let r = ledger_post(
            &app,
            "/v1/admin/deposits",
            &delegated_admin,
            "delegated-deposit",
            json!({ "account_id": "acc_x", "amount": 100, "currency": "USD", "reference": "r" }),
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
        let r = app
            .post("/v1/admin/clients", Some(&admin.access), new_client)
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        // a client may still end its own session
        let delegated_sid = jwt_part(&delegated, 1)["sid"].as_str().unwrap().to_owned();
        let r = app
            .delete(&format!("/v1/sessions/{delegated_sid}"), Some(&delegated))
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        app.stop().await;
    });
}
