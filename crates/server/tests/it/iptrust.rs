//! IP trust: first login trusts its network, logins from other networks are held
//! until the emailed link confirms them, "this wasn't me" locks the account, and the
//! trust check at refresh, introspection and the ledger's sensitive operations.
//!
//! Every request reaches the test server from 127.0.0.1; the servers here trust
//! 127.0.0.1 as a proxy, so `X-Forwarded-For` names the client address.

use crate::auth_flows::{assert_oauth_error, audit_action, id_of, mail_token, reset_pw};
use crate::each_backend;
use crate::helpers::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use vaultpay_store::Backend;

const HOME: &str = "198.51.100.10";
const HOME_NEIGHBOUR: &str = "198.51.100.99";
const AWAY: &str = "203.0.113.5";
const AWAY_NEIGHBOUR: &str = "203.0.113.77";
const ELSEWHERE: &str = "192.0.2.1";

pub async fn spawn_proxied(
    backend: Backend,
    tweak: impl FnOnce(&mut vaultpay_server::Config),
) -> TestApp {
    TestApp::spawn_with(backend, |c| {
        c.trusted_proxies = vec!["127.0.0.1".into()];
        tweak(c);
    })
    .await
}

/// A request whose client address (through the trusted proxy) is `ip`.
pub async fn send_from(
    app: &TestApp,
    ip: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Resp {
    let mut req = app
        .http
        .request(method, format!("{}{path}", app.base))
        .header("x-forwarded-for", ip);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    read(req.send().await.unwrap()).await
}

pub async fn login_from(app: &TestApp, ip: &str, email: &str, device: &str) -> Resp {
    send_from(
        app,
        ip,
        Method::POST,
        "/v1/auth/login",
        None,
        Some(json!({ "email": email, "password": PASSWORD, "device": { "id": device, "name": format!("{device} phone") } })),
    )
    .await
}

pub async fn complete_from(app: &TestApp, ip: &str, ticket: &str, device: &str) -> Resp {
    send_from(
        app,
        ip,
        Method::POST,
        "/v1/auth/login/complete",
        None,
        Some(json!({ "login_ticket": ticket, "device_id": device })),
    )
    .await
}

/// POSTs the emailed link's token as the HTML form would (`confirm` or `deny`).
pub async fn link_post(app: &TestApp, which: &str, token: &str) -> Resp {
    let req = app
        .http
        .post(format!("{}/v1/auth/login/{which}", app.base))
        .form(&[("token", token)]);
    read(req.send().await.unwrap()).await
}

async fn refresh_from(app: &TestApp, ip: &str, rt: &str, device: &str) -> Resp {
    let req = app
        .http
        .post(format!("{}/oauth/token", app.base))
        .header("x-forwarded-for", ip)
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt),
            ("device_id", device),
        ]);
    read(req.send().await.unwrap()).await
}

#[track_caller]
fn ticket_of(r: &Resp) -> String {
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.body["status"], "ip_confirmation_required", "{}", r.text);
    assert!(r.body.get("access_token").is_none(), "{}", r.text);
    assert!(r.body.get("refresh_token").is_none(), "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    r.body["login_ticket"].as_str().unwrap().to_owned()
}

/// Registers `email` and logs in once from `ip` (its first, trusted network).
pub async fn user_at(app: &TestApp, email: &str, ip: &str) -> (String, Tokens) {
    let id = id_of(&app.register(email).await);
    let r = login_from(app, ip, email, "dev-1").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "first login is not held: {}",
        r.text
    );
    let t = Tokens {
        access: r.body["access_token"].as_str().unwrap().to_owned(),
        refresh: r.body["refresh_token"].as_str().unwrap().to_owned(),
        session: r.body["session_id"].as_str().unwrap().to_owned(),
    };
    (id, t)
}

#[tokio::test]
async fn first_login_trusts_then_new_network_is_held_until_confirmed() {
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |_| {}).await;
        let admin = app.admin().await.access;
        let email = "nina@example.com";
        let (uid, t) = user_at(&app, email, HOME).await;

        let nets = send_from(
            &app,
            HOME,
            Method::GET,
            "/v1/me/trusted-networks",
            Some(&t.access),
            None,
        )
        .await;
        assert_eq!(nets.status, StatusCode::OK, "{}", nets.text);
        let list = nets.body["networks"].as_array().unwrap();
        assert_eq!(list.len(), 1, "{}", nets.text);
        assert_eq!(list[0]["network"], "198.51.100.0/24");
        assert_eq!(list[0]["current"], true);
        let first = audit_action(&app, &admin, "ip_trust.added").await;
        assert!(first
            .iter()
            .any(|e| e["actor"] == uid.as_str() && e["metadata"]["reason"] == "first_login"));

        // the same /24 is the same network
        assert_eq!(
            login_from(&app, HOME_NEIGHBOUR, email, "dev-1")
                .await
                .status,
            StatusCode::OK
        );

        // another network: held, a mail with both links, no tokens
        let mails = app.mails().len();
        let held = login_from(&app, AWAY, email, "dev-2").await;
        let ticket = ticket_of(&held);
        assert_eq!(app.mails().len(), mails + 1);
        let confirm = mail_token(&app, email, "login/confirm?token=");
        let deny = mail_token(&app, email, "login/deny?token=");
        assert_ne!(confirm, deny);
        let mail = app.mails().last().unwrap().clone();
        assert!(
            mail.contains(AWAY) && mail.contains("203.0.113.0/24"),
            "{mail}"
        );
        let held_audit = audit_action(&app, &admin, "login.held_untrusted_network").await;
        assert_eq!(held_audit[0]["actor"], uid.as_str());
        assert_eq!(held_audit[0]["outcome"], "failure");
        // nothing is stored in clear
        let n: i64 = sqlx::query_scalar::<_, i64>(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM login_holds WHERE ticket_hash = $1 OR confirm_hash = $2 OR deny_hash = $3",
        )
        .bind(&ticket)
        .bind(&confirm)
        .bind(&deny)
        .fetch_one(app.auth_db().read())
        .await
        .unwrap();
        assert_eq!(n, 0, "tokens are stored hashed");

        // pending until confirmed
        let pending = complete_from(&app, AWAY, &ticket, "dev-2").await;
        assert_eq!(ticket_of(&pending), ticket);
        // the GET link only shows a page (scanners prefetch links)
        let page = app
            .get(&format!("/v1/auth/login/confirm?token={confirm}"), None)
            .await;
        assert_eq!(page.status, StatusCode::OK);
        assert!(page.text.contains("<form method=\"post\""), "{}", page.text);
        assert!(page.header("content-security-policy").is_some());
        ticket_of(&complete_from(&app, AWAY, &ticket, "dev-2").await);
        app.get("/v1/auth/login/confirm?token=%22%3E%3Cscript%3E", None)
            .await
            .assert_problem(400, "invalid_token");

        // the ticket is bound to the device and the network of the held login
        complete_from(&app, AWAY, &ticket, "dev-1")
            .await
            .assert_problem(400, "invalid_login_ticket");
        complete_from(&app, ELSEWHERE, &ticket, "dev-2")
            .await
            .assert_problem(400, "invalid_login_ticket");
        complete_from(&app, AWAY, "not-a-ticket", "dev-2")
            .await
            .assert_problem(400, "invalid_login_ticket");

        let ok = link_post(&app, "confirm", &confirm).await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
        assert_eq!(ok.body["status"], "network_confirmed");
        link_post(&app, "confirm", &confirm)
            .await
            .assert_problem(400, "invalid_token");

        let done = complete_from(&app, AWAY, &ticket, "dev-2").await;
        assert_eq!(done.status, StatusCode::OK, "{}", done.text);
        let access = done.body["access_token"].as_str().unwrap();
        assert!(done.body["refresh_token"].is_string());
        let me = send_from(&app, AWAY, Method::GET, "/v1/me", Some(access), None).await;
        assert_eq!(me.status, StatusCode::OK, "{}", me.text);
        assert_eq!(me.body["id"], uid.as_str());
        let claims = crate::auth_flows::jwt_part(access, 1);
        assert_eq!(claims["device_id"], "dev-2");
        // single use
        complete_from(&app, AWAY, &ticket, "dev-2")
            .await
            .assert_problem(400, "invalid_login_ticket");

        // the confirmed network (its /24) is trusted from now on
        assert_eq!(
            login_from(&app, AWAY_NEIGHBOUR, email, "dev-3")
                .await
                .status,
            StatusCode::OK
        );
        let nets = send_from(
            &app,
            AWAY,
            Method::GET,
            "/v1/me/trusted-networks",
            Some(access),
            None,
        )
        .await;
        let list = nets.body["networks"].as_array().unwrap();
        assert_eq!(list.len(), 2, "{}", nets.text);
        assert!(list
            .iter()
            .any(|n| n["network"] == "203.0.113.0/24" && n["current"] == true));
        let added = audit_action(&app, &admin, "ip_trust.added").await;
        assert!(
            added
                .iter()
                .any(|e| e["actor"] == uid.as_str()
                    && e["metadata"]["reason"] == "confirmed_by_email")
        );
        let logins = audit_action(&app, &admin, "login.succeeded").await;
        assert!(logins
            .iter()
            .any(|e| e["actor"] == uid.as_str() && e["metadata"]["via"] == "ip_confirmation"));
        // a wrong password from an untrusted network is a plain 401 (no hold, no mail)
        let mails = app.mails().len();
        let r = send_from(&app, ELSEWHERE, Method::POST, "/v1/auth/login", None,
            Some(json!({ "email": email, "password": "wrong-password-here", "device": { "id": "x", "name": "x" } }))).await;
        r.assert_problem(401, "invalid_credentials");
        assert_eq!(app.mails().len(), mails);
        app.stop().await;
    });
}

/// A login held for a network confirmation, begun with the password before a password
/// reset or before the account's email moved to another address, does nothing after
/// it: its confirm link (mailed to the old address) and its completion are refused. So
/// is a reset link mailed to the old address before the move.
#[tokio::test]
async fn a_held_login_begun_before_a_reset_or_an_email_change_does_nothing_after_it() {
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |_| {}).await;
        for how in ["reset", "email_change"] {
            let email = format!("held-{how}@example.com");
            let (_, t) = user_at(&app, &email, HOME).await;
            let ticket = ticket_of(&login_from(&app, AWAY, &email, "evil").await);
            let confirm = mail_token(&app, &email, "login/confirm?token=");
            let reset = crate::auth_flows::reset_link(&app, &email).await;
            if how == "reset" {
                let r = reset_pw(&app, &reset, crate::auth_flows::NEW_PASSWORD).await;
                assert!(r.status.is_success(), "{}", r.text);
            } else {
                let new_email = format!("moved-{how}@example.com");
                let r = send_from(
                    &app,
                    HOME,
                    Method::POST,
                    "/v1/auth/email/change",
                    Some(&t.access),
                    Some(json!({ "new_email": new_email, "password": PASSWORD })),
                )
                .await;
                assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
                let link = mail_token(&app, &new_email, "email/confirm?token=");
                let r = app
                    .post("/v1/auth/email/confirm", None, json!({ "token": link }))
                    .await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.text);
                reset_pw(&app, &reset, crate::auth_flows::NEW_PASSWORD)
                    .await
                    .assert_problem(400, "invalid_token");
            }
            link_post(&app, "confirm", &confirm)
                .await
                .assert_problem(400, "invalid_token");
            complete_from(&app, AWAY, &ticket, "evil")
                .await
                .assert_problem(400, "invalid_login_ticket");
        }
        app.stop().await;
    });
}

/// PostgreSQL: a sign-in from a new network whose password is changed while it waits
/// after Argon2 gets no held login (the hold would outlive the reset that revoked the
/// others). Ordered by holding the user's row, as in `auth_attacks`.
#[tokio::test]
async fn no_hold_for_a_password_changed_during_the_hash() {
    for backend in vaultpay_store::testing::backends() {
        if backend != Backend::Postgres {
            continue;
        }
        let app = spawn_proxied(backend, |_| {}).await;
        let email = "held-race@example.com";
        let (id, _) = user_at(&app, email, HOME).await;
        // the first-network check or the hold's own read: both after Argon2
        let r = sign_in_while_the_password_changes(
            &app,
            &id,
            "FROM users WHERE id = $1 FOR NO KEY UPDATE",
            login_from(&app, AWAY, email, "evil"),
        )
        .await;
        r.assert_problem(401, "invalid_credentials");
        assert_eq!(
            app.count_where("login_holds", "device_id = 'evil'").await,
            0
        );
        app.stop().await;
    }
}

#[tokio::test]
async fn this_wasnt_me_revokes_every_session_and_locks_until_reset() {
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |_| {}).await;
        let admin = app.admin().await.access;
        let email = "otto@example.com";
        let (uid, t) = user_at(&app, email, HOME).await;
        let second = login_from(&app, HOME, email, "dev-9").await;
        assert_eq!(second.status, StatusCode::OK);

        // the attacker has the password; the login is held; a second held login too
        let ticket = ticket_of(&login_from(&app, AWAY, email, "evil").await);
        let deny = mail_token(&app, email, "login/deny?token=");
        let other_ticket = ticket_of(&login_from(&app, ELSEWHERE, email, "evil-2").await);
        let other_confirm = mail_token(&app, email, "login/confirm?token=");

        let page = app
            .get(&format!("/v1/auth/login/deny?token={deny}"), None)
            .await;
        assert_eq!(page.status, StatusCode::OK);
        assert_eq!(
            send_from(&app, HOME, Method::GET, "/v1/me", Some(&t.access), None)
                .await
                .status,
            StatusCode::OK,
            "GET changes nothing"
        );

        let r = link_post(&app, "deny", &deny).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["status"], "account_locked");
        link_post(&app, "deny", &deny)
            .await
            .assert_problem(400, "invalid_token");

        // every session ended
        send_from(&app, HOME, Method::GET, "/v1/me", Some(&t.access), None)
            .await
            .assert_problem(401, "session_revoked");
        let second_access = second.body["access_token"].as_str().unwrap();
        send_from(&app, HOME, Method::GET, "/v1/me", Some(second_access), None)
            .await
            .assert_problem(401, "session_revoked");
        assert_oauth_error(
            &refresh_from(&app, HOME, &t.refresh, "dev-1").await,
            400,
            "invalid_grant",
        );
        // the held logins are dead, even if the other one gets confirmed now
        link_post(&app, "confirm", &other_confirm)
            .await
            .assert_problem(400, "invalid_token");
        complete_from(&app, AWAY, &ticket, "evil")
            .await
            .assert_problem(400, "invalid_login_ticket");
        complete_from(&app, ELSEWHERE, &other_ticket, "evil-2")
            .await
            .assert_problem(400, "invalid_login_ticket");
        // the password alone no longer logs in, from any network
        let r = login_from(&app, HOME, email, "dev-1").await;
        r.assert_problem(423, "password_reset_required");
        login_from(&app, AWAY, email, "evil")
            .await
            .assert_problem(423, "password_reset_required");

        let denied = audit_action(&app, &admin, "login.denied_by_user").await;
        assert_eq!(denied[0]["actor"], uid.as_str());
        assert_eq!(denied[0]["metadata"]["sessions_revoked"], 2);
        let locked = audit_action(&app, &admin, "account.locked").await;
        assert!(
            locked
                .iter()
                .any(|e| e["resource"] == uid.as_str()
                    && e["metadata"]["reason"] == "ip_login_denied")
        );
        assert!(!audit_action(&app, &admin, "login.refused_security_lock")
            .await
            .is_empty());

        // a password reset lifts the lock
        let r = app
            .post("/v1/auth/password/forgot", None, json!({ "email": email }))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        let token = mail_token(&app, email, "password/reset?token=");
        let new_password = crate::auth_flows::NEW_PASSWORD;
        assert_eq!(
            reset_pw(&app, &token, new_password).await.status,
            StatusCode::OK
        );
        let body = |ip: &str| {
            let _ = ip;
            json!({ "email": email, "password": new_password, "device": { "id": "dev-1", "name": "d" } })
        };
        let r = send_from(
            &app,
            HOME,
            Method::POST,
            "/v1/auth/login",
            None,
            Some(body(HOME)),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        // the attacker's network never became trusted
        let r = send_from(
            &app,
            AWAY,
            Method::POST,
            "/v1/auth/login",
            None,
            Some(body(AWAY)),
        )
        .await;
        ticket_of(&r);
        app.stop().await;
    });
}

/// A person who presses the button of a mailed sign-in link's page gets a page back,
/// not JSON: the confirmation, or what went wrong (a second press of a spent link).
#[tokio::test]
async fn a_browser_at_the_sign_in_links_gets_pages() {
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |_| {}).await;
        let email = "page@example.com";
        let (_, t) = user_at(&app, email, HOME).await;
        let ticket = ticket_of(&login_from(&app, AWAY, email, "dev-2").await);
        let confirm = mail_token(&app, email, "login/confirm?token=");
        let deny = mail_token(&app, email, "login/deny?token=");
        let r = browser_post(&app, "/v1/auth/login/confirm", &[("token", &confirm)]).await;
        assert_page(&r, 200, "Sign-in confirmed");
        let done = complete_from(&app, AWAY, &ticket, "dev-2").await;
        assert_eq!(done.status, StatusCode::OK, "{}", done.text);
        let again = browser_post(&app, "/v1/auth/login/confirm", &[("token", &confirm)]).await;
        assert_page(&again, 400, "Sign-in not confirmed");
        // a client that merely accepts HTML is still answered with JSON
        html_accepting_client_post(&app, "/v1/auth/login/confirm", &[("token", &confirm)])
            .await
            .assert_problem(400, "invalid_token");
        assert!(
            again.text.contains("invalid, expired or already used"),
            "{}",
            again.text
        );

        let r = browser_post(&app, "/v1/auth/login/deny", &[("token", &deny)]).await;
        assert_page(&r, 200, "Account locked");
        send_from(&app, HOME, Method::GET, "/v1/me", Some(&t.access), None)
            .await
            .assert_problem(401, "session_revoked");
        let again = browser_post(&app, "/v1/auth/login/deny", &[("token", &deny)]).await;
        assert_page(&again, 400, "Account not locked");
        app.stop().await;
    });
}

#[tokio::test]
async fn a_confirmed_network_is_untrusted_again_by_this_wasnt_me() {
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |_| {}).await;
        let email = "pia@example.com";
        user_at(&app, email, HOME).await;
        let ticket = ticket_of(&login_from(&app, AWAY, email, "dev-2").await);
        let confirm = mail_token(&app, email, "login/confirm?token=");
        let deny = mail_token(&app, email, "login/deny?token=");
        assert_eq!(
            link_post(&app, "confirm", &confirm).await.status,
            StatusCode::OK
        );
        let done = complete_from(&app, AWAY, &ticket, "dev-2").await;
        assert_eq!(done.status, StatusCode::OK);
        // clicked "confirm" by mistake; "this wasn't me" still works and un-trusts it
        assert_eq!(link_post(&app, "deny", &deny).await.status, StatusCode::OK);
        let access = done.body["access_token"].as_str().unwrap();
        send_from(&app, AWAY, Method::GET, "/v1/me", Some(access), None)
            .await
            .assert_problem(401, "session_revoked");
        let token = {
            app.post("/v1/auth/password/forgot", None, json!({ "email": email }))
                .await;
            mail_token(&app, email, "password/reset?token=")
        };
        assert_eq!(
            reset_pw(&app, &token, crate::auth_flows::NEW_PASSWORD)
                .await
                .status,
            StatusCode::OK
        );
        let r = send_from(&app, AWAY, Method::POST, "/v1/auth/login", None,
            Some(json!({ "email": email, "password": crate::auth_flows::NEW_PASSWORD, "device": { "id": "d", "name": "d" } }))).await;
        ticket_of(&r);
        app.stop().await;
    });
}

#[tokio::test]
async fn held_logins_expire() {
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |c| c.auth.ip_trust.hold_ttl_secs = 1).await;
        let email = "quinn@example.com";
        user_at(&app, email, HOME).await;
        let ticket = ticket_of(&login_from(&app, AWAY, email, "dev-2").await);
        let confirm = mail_token(&app, email, "login/confirm?token=");
        let deny = mail_token(&app, email, "login/deny?token=");
        // poll (no fixed sleep) until the hold has expired
        let mut expired = false;
        for _ in 0..100 {
            let r = complete_from(&app, AWAY, &ticket, "dev-2").await;
            if r.status == StatusCode::BAD_REQUEST {
                r.assert_problem(400, "invalid_login_ticket");
                expired = true;
                break;
            }
            ticket_of(&r);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(expired, "the hold never expired");
        link_post(&app, "confirm", &confirm)
            .await
            .assert_problem(400, "invalid_token");
        link_post(&app, "deny", &deny)
            .await
            .assert_problem(400, "invalid_token");
        // nothing became trusted; a new login is held again
        ticket_of(&login_from(&app, AWAY, email, "dev-2").await);
        app.stop().await;
    });
}

#[tokio::test]
async fn refresh_from_an_untrusted_network_is_refused_and_the_session_survives() {
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |_| {}).await;
        let admin = app.admin().await.access;
        let (_, t) = user_at(&app, "rita@example.com", HOME).await;
        let r = refresh_from(&app, AWAY, &t.refresh, "dev-1").await;
        assert_oauth_error(&r, 400, "invalid_grant");
        assert!(
            r.body["error_description"]
                .as_str()
                .unwrap()
                .contains("network"),
            "{}",
            r.text
        );
        let refused = audit_action(&app, &admin, "token.refresh_refused_untrusted_network").await;
        assert_eq!(refused[0]["resource"], t.session.as_str());
        assert_eq!(refused[0]["metadata"]["session_revoked"], false);
        // not revoked, not consumed: the same token still refreshes from home
        let r = refresh_from(&app, HOME, &t.refresh, "dev-1").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(
            send_from(&app, HOME, Method::GET, "/v1/me", Some(&t.access), None)
                .await
                .status,
            StatusCode::OK
        );
        // a spent token replayed from anywhere still trips reuse detection
        let r2 = refresh_from(&app, AWAY, &t.refresh, "dev-1").await;
        assert_oauth_error(&r2, 400, "invalid_grant");
        assert!(
            r2.body["error_description"]
                .as_str()
                .unwrap()
                .contains("revoked"),
            "{}",
            r2.text
        );
        app.stop().await;
    });
}

#[tokio::test]
async fn introspection_reports_untrusted_client_addresses() {
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |c| {
            c.auth.introspection_secret = Some(vaultpay_core::secret::Secret::new("intro-secret"));
        })
        .await;
        let (_, t) = user_at(&app, "sam@example.com", HOME).await;
        let introspect = |fields: Vec<(&'static str, String)>| {
            let req = app
                .http
                .post(format!("{}/oauth/introspect", app.base))
                .basic_auth("vaultpay-ledger", Some("intro-secret"))
                .form(&fields);
            async move { read(req.send().await.unwrap()).await }
        };
        let r = introspect(vec![("token", t.access.clone())]).await;
        assert_eq!(r.body["active"], true, "{}", r.text);
        assert!(r.body.get("network_trusted").is_none());
        let r = introspect(vec![
            ("token", t.access.clone()),
            ("client_ip", HOME_NEIGHBOUR.into()),
        ])
        .await;
        assert_eq!(r.body["active"], true, "{}", r.text);
        assert_eq!(r.body["network_trusted"], true);
        let r = introspect(vec![
            ("token", t.access.clone()),
            ("client_ip", AWAY.into()),
        ])
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body["active"], false, "{}", r.text);
        assert_eq!(r.body["network_trusted"], false);
        assert!(
            r.body.get("sub").is_none(),
            "an inactive answer says nothing else"
        );
        let r = introspect(vec![
            ("token", t.access.clone()),
            ("client_ip", "not-an-ip".into()),
        ])
        .await;
        assert_oauth_error(&r, 400, "invalid_request");
        app.stop().await;
    });
}

#[tokio::test]
async fn ledger_refuses_sensitive_operations_from_untrusted_networks() {
    each_backend!(|backend: Backend| async move {
        // about networks only: step-up for large transfers is tested in mfa.rs
        let app = spawn_proxied(backend, |c| c.ledger.step_up_large_transfers = false).await;
        let admin = app.admin().await.access;
        let (_, t) = user_at(&app, "tess@example.com", HOME).await;
        let post = |ip: &'static str,
                    path: &'static str,
                    token: String,
                    key: &'static str,
                    body: Value| {
            let req = app
                .http
                .post(format!("{}{path}", app.base))
                .header("x-forwarded-for", ip)
                .header("idempotency-key", key)
                .bearer_auth(token)
                .json(&body);
            async move { read(req.send().await.unwrap()).await }
        };
        let open = |key: &'static str, kind: &'static str| {
            post(
                HOME,
                "/v1/accounts",
                t.access.clone(),
                key,
                json!({"currency": "USD", "kind": kind, "name": key}),
            )
        };
        let a = open("open-a", "current").await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
        let b = open("open-b", "savings").await;
        let (a, b) = (
            a.body["id"].as_str().unwrap().to_owned(),
            b.body["id"].as_str().unwrap().to_owned(),
        );
        // the admin's own first login came from 127.0.0.1 (no forwarded header)
        let dep = app
            .http
            .post(format!("{}/v1/admin/deposits", app.base))
            .header("idempotency-key", "dep-1")
            .bearer_auth(&admin)
            .json(&json!({"account_id": a, "amount": 900_000, "currency": "USD", "reference": "t"}))
            .send()
            .await
            .unwrap();
        assert!(dep.status().is_success(), "{}", dep.text().await.unwrap());

        let big = json!({"from_account_id": a, "to_account_id": b, "amount": 200_000, "currency": "USD", "description": "big"});
        let r = post(
            AWAY,
            "/v1/transfers",
            t.access.clone(),
            "big-away",
            big.clone(),
        )
        .await;
        r.assert_problem(403, "untrusted_network");
        let r = post(
            HOME_NEIGHBOUR,
            "/v1/transfers",
            t.access.clone(),
            "big-home",
            big,
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        // small transfers are not introspected (threshold), reads are not either
        let small = json!({"from_account_id": a, "to_account_id": b, "amount": 100, "currency": "USD", "description": "small"});
        let r = post(AWAY, "/v1/transfers", t.access.clone(), "small-away", small).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let r = send_from(
            &app,
            AWAY,
            Method::GET,
            &format!("/v1/accounts/{a}"),
            Some(&t.access),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["balance"], 900_000 - 200_000 - 100);
        assert!(
            !audit_action(&app, &admin, "introspection.untrusted_network")
                .await
                .is_empty()
        );
        app.stop().await;
    });
}

#[tokio::test]
async fn trusted_networks_list_and_revoke_only_ones_own() {
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |_| {}).await;
        let admin = app.admin().await.access;
        let (uid, t) = user_at(&app, "uma@example.com", HOME).await;
        let (_, other) = user_at(&app, "vic@example.com", AWAY).await;
        let list = |token: String, ip: &'static str| {
            let app = &app;
            async move {
                send_from(
                    app,
                    ip,
                    Method::GET,
                    "/v1/me/trusted-networks",
                    Some(&token),
                    None,
                )
                .await
            }
        };
        let mine = list(t.access.clone(), HOME).await;
        let id = mine.body["networks"][0]["id"].as_str().unwrap().to_owned();
        // another user cannot see or delete it
        let theirs = list(other.access.clone(), AWAY).await;
        assert_eq!(theirs.body["networks"].as_array().unwrap().len(), 1);
        assert_ne!(theirs.body["networks"][0]["id"], id.as_str());
        send_from(
            &app,
            AWAY,
            Method::DELETE,
            &format!("/v1/me/trusted-networks/{id}"),
            Some(&other.access),
            None,
        )
        .await
        .assert_problem(404, "not_found");
        assert_eq!(
            list(t.access.clone(), HOME).await.body["networks"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        // no token: 401
        app.get("/v1/me/trusted-networks", None)
            .await
            .assert_problem(401, "missing_token");

        let r = send_from(
            &app,
            HOME,
            Method::DELETE,
            &format!("/v1/me/trusted-networks/{id}"),
            Some(&t.access),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        send_from(
            &app,
            HOME,
            Method::DELETE,
            &format!("/v1/me/trusted-networks/{id}"),
            Some(&t.access),
            None,
        )
        .await
        .assert_problem(404, "not_found");
        assert!(list(t.access.clone(), HOME).await.body["networks"]
            .as_array()
            .unwrap()
            .is_empty());
        let revoked = audit_action(&app, &admin, "ip_trust.revoked").await;
        assert_eq!(revoked[0]["actor"], uid.as_str());
        assert_eq!(revoked[0]["resource"], id.as_str());
        // at once: refresh from there is refused, and a new login is held (a user who
        // once trusted a network never gets the silent first-login trust again)
        assert_oauth_error(
            &refresh_from(&app, HOME, &t.refresh, "dev-1").await,
            400,
            "invalid_grant",
        );
        ticket_of(&login_from(&app, HOME, "uma@example.com", "dev-1").await);
        app.stop().await;
    });
}

#[tokio::test]
async fn spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing() {
    each_backend!(|backend: Backend| async move {
        // 127.0.0.1 (every test request's peer) is NOT a trusted proxy here
        let app =
            TestApp::spawn_with(backend, |c| c.trusted_proxies = vec!["10.0.0.0/8".into()]).await;
        let email = "wes@example.com";
        let uid = id_of(&app.register(email).await);
        // the user's only trusted network is 203.0.113.0/24
        let now = vaultpay_core::time::now_micros();
        sqlx::query("INSERT INTO trusted_networks (id, user_id, network, created_at, last_used_at, expires_at) VALUES ($1, $2, $3, $4, $4, $5)")
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(&uid)
            .bind("203.0.113.0/24")
            .bind(now)
            .bind(now + 86_400_000_000)
            .execute(app.auth_db().writer())
            .await
            .unwrap();
        // claiming to come from it through a forged header does not make the login trusted
        let r = login_from(&app, AWAY, email, "dev-1").await;
        ticket_of(&r);
        let r = app
            .http
            .post(format!("{}/v1/auth/login", app.base))
            .header("forwarded", format!("for={AWAY}"))
            .json(&json!({ "email": email, "password": PASSWORD, "device": { "id": "d", "name": "d" } }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        app.stop().await;
    });
}

#[tokio::test]
async fn ip_trust_can_be_disabled() {
    let app = spawn_proxied(Backend::Sqlite, |c| c.auth.ip_trust.enabled = false).await;
    let email = "xena@example.com";
    user_at(&app, email, HOME).await;
    assert_eq!(
        login_from(&app, AWAY, email, "dev-1").await.status,
        StatusCode::OK
    );
    app.stop().await;
}

#[tokio::test]
async fn exact_address_trust_with_full_prefixes() {
    let app = spawn_proxied(Backend::Sqlite, |c| {
        c.auth.ip_trust.ipv4_prefix = 32;
        c.auth.ip_trust.ipv6_prefix = 128;
    })
    .await;
    let email = "yuri@example.com";
    user_at(&app, email, "2001:db8:1:2::10").await;
    assert_eq!(
        login_from(&app, "2001:db8:1:2::10", email, "dev-1")
            .await
            .status,
        StatusCode::OK
    );
    ticket_of(&login_from(&app, "2001:db8:1:2::11", email, "dev-1").await);
    ticket_of(&login_from(&app, HOME, email, "dev-1").await);
    app.stop().await;
}

#[tokio::test]
async fn trust_slides_forward_when_used_and_lapses_when_not() {
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |_| {}).await;
        let email = "zoe@example.com";
        let (uid, _) = user_at(&app, email, HOME).await;
        let now = vaultpay_core::time::now_micros();
        let day = 86_400_000_000i64;
        let expiry = || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT expires_at FROM trusted_networks WHERE user_id = $1 AND network = '198.51.100.0/24'",
            )
            .bind(&uid)
            .fetch_one(app.auth_db().read())
            .await
            .unwrap()
        };
        // last used long ago, expiring in a day: a login from it pushes it to ~90 days
        sqlx::query(
            "UPDATE trusted_networks SET last_used_at = $1, expires_at = $2 WHERE user_id = $3",
        )
        .bind(now - 89 * day)
        .bind(now + day)
        .bind(&uid)
        .execute(app.auth_db().writer())
        .await
        .unwrap();
        // (a fresh in-memory copy may still hold the old expiry; the write goes by the database)
        assert_eq!(
            login_from(&app, HOME, email, "dev-1").await.status,
            StatusCode::OK
        );
        assert!(
            expiry().await > now + 89 * day,
            "sliding expiry moved forward"
        );
        // expired: no longer trusted (and not silently re-trusted)
        sqlx::query("UPDATE trusted_networks SET expires_at = $1 WHERE user_id = $2")
            .bind(now - 1)
            .bind(&uid)
            .execute(app.auth_db().writer())
            .await
            .unwrap();
        let mut held = false;
        // the node's copy is reloaded within 30 s; poll instead of sleeping blindly
        for _ in 0..400 {
            let r = login_from(&app, HOME, email, "dev-1").await;
            if r.status == StatusCode::ACCEPTED {
                held = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(held, "an expired network stops being trusted");
        app.stop().await;
    });
}

/// The OAuth browser sign-in applies the same trust: a new network gets no consent
/// page but a mailed confirm link; after confirming, signing in again works.
#[tokio::test]
async fn oauth_browser_sign_in_from_a_new_network_is_held() {
    use crate::oauth::{authorize_query, pkce, web_client, Browser, CB};
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |_| {}).await;
        let admin = app.admin().await;
        let client = web_client(&app, &admin.access).await;
        let email = "olga@example.com";
        user_at(&app, email, HOME).await;
        let browser_at = |ip: &str| {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert("x-forwarded-for", ip.parse().unwrap());
            Browser {
                http: reqwest::Client::builder()
                    .no_proxy()
                    .redirect(reqwest::redirect::Policy::none())
                    .default_headers(headers)
                    .build()
                    .unwrap(),
                cookies: Vec::new(),
                base: app.base.clone(),
            }
        };
        let client_id = client.id.clone();
        let sign_in = |mut b: Browser| {
            let client_id = client_id.clone();
            async move {
                let (_, challenge) = pkce();
                let p = b
                    .get(&authorize_query(&client_id, CB, "openid", Some(&challenge)))
                    .await;
                let csrf = p.csrf();
                b.sign_in(&csrf, email, PASSWORD).await
            }
        };
        let mails = app.mails().len();
        let held = sign_in(browser_at(AWAY)).await;
        assert!(!held.text.contains("Allow access"), "{}", held.text);
        assert!(held.text.contains("confirm"), "{}", held.text);
        assert_eq!(app.mails().len(), mails + 1);
        let confirm = mail_token(&app, email, "login/confirm?token=");
        let r = link_post(&app, "confirm", &confirm).await;
        assert!(r.status.is_success(), "{}", r.text);
        let again = sign_in(browser_at(AWAY)).await;
        assert!(again.text.contains("Allow access"), "{}", again.text);
        app.stop().await;
    });
}

/// Several first sign-ins of a new account at once (a user with two devices, or a
/// retrying client) all succeed from the network the first one trusts: none is held
/// and none fails (PostgreSQL runs them in parallel).
#[tokio::test]
async fn concurrent_first_logins_all_trust_the_same_network() {
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |c| {
            c.auth.rate_limits.login_per_account = vaultpay_core::gcra::Quota::new(100, 60);
        })
        .await;
        let email = "quinn@example.com";
        id_of(&app.register(email).await);
        let devices: Vec<String> = (0..8).map(|i| format!("dev-{i}")).collect();
        let results =
            futures::future::join_all(devices.iter().map(|d| login_from(&app, HOME, email, d)))
                .await;
        for r in &results {
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        }
        assert_eq!(
            app.count_where("trusted_networks", "revoked_at IS NULL")
                .await,
            1
        );
        app.stop().await;
    });
}

/// A second-factor ticket issued before "this wasn't me" opens no session after it:
/// the lock spends the user's open tickets, and the second-factor step also re-reads
/// the lock under the user row's lock, for a ticket the revocation did not see (set
/// directly here, to open that window deterministically).
#[tokio::test]
async fn a_second_factor_ticket_dies_with_this_wasnt_me() {
    each_backend!(|backend: Backend| async move {
        use vaultpay_core::totp;
        let app = spawn_proxied(backend, |_| {}).await;
        let email = "mia@example.com";
        let (_, t) = user_at(&app, email, HOME).await;
        let r = send_from(
            &app,
            HOME,
            Method::POST,
            "/v1/mfa/totp",
            Some(&t.access),
            Some(json!({})),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let secret = totp::base32_decode(r.body["secret"].as_str().unwrap()).unwrap();
        let now = vaultpay_core::time::now_micros() / 1_000_000;
        let code = totp::code_for_step(&secret, totp::step_of(now, 30), 6);
        let r = send_from(
            &app,
            HOME,
            Method::POST,
            "/v1/mfa/totp/confirm",
            Some(&t.access),
            Some(json!({ "code": code })),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let recovery: Vec<String> = r.body["recovery_codes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();

        // trusted-network logins wait for their second factor...
        let r = login_from(&app, HOME, email, "dev-2").await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let ticket = r.body["mfa_ticket"].as_str().unwrap().to_owned();
        let r = login_from(&app, HOME, email, "dev-2").await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let unseen = r.body["mfa_ticket"].as_str().unwrap().to_owned();
        // ...when the user answers an attacker's held login with "this wasn't me"
        ticket_of(&login_from(&app, AWAY, email, "evil").await);
        let deny = mail_token(&app, email, "login/deny?token=");
        let r = link_post(&app, "deny", &deny).await;
        assert_eq!(r.body["status"], "account_locked", "{}", r.text);
        // (the second ticket unspent again: as if issued after the revocation read them)
        sqlx::query("UPDATE mfa_tickets SET used_at = NULL WHERE ticket_hash = $1")
            .bind(vaultpay_core::crypto::sha256_hex(unseen.as_bytes()))
            .execute(app.auth_db().writer())
            .await
            .unwrap();

        let verify = |ticket: String, code: String| {
            let app = &app;
            async move {
                send_from(
                    app,
                    HOME,
                    Method::POST,
                    "/v1/auth/mfa/verify",
                    None,
                    Some(json!({ "mfa_ticket": ticket, "code": code, "method": "recovery_code" })),
                )
                .await
            }
        };
        verify(ticket, recovery[0].clone())
            .await
            .assert_problem(401, "mfa_ticket_invalid");
        verify(unseen, recovery[1].clone())
            .await
            .assert_problem(423, "password_reset_required");
        assert_eq!(
            app.count_where("sessions", "device_id = 'dev-2'").await,
            0,
            "no session for the ticket"
        );
    });
}

/// A held login of a locked account cannot be confirmed into a trusted network (a
/// hold opened beside "this wasn't me", which denies only the holds it finds; the lock
/// is set directly here to open that window deterministically).
#[tokio::test]
async fn a_locked_account_confirms_no_new_network() {
    each_backend!(|backend: Backend| async move {
        let app = spawn_proxied(backend, |_| {}).await;
        let email = "noor@example.com";
        let (uid, _) = user_at(&app, email, HOME).await;
        ticket_of(&login_from(&app, AWAY, email, "evil").await);
        let confirm = mail_token(&app, email, "login/confirm?token=");
        sqlx::query("UPDATE users SET security_locked_at = 1 WHERE id = $1")
            .bind(&uid)
            .execute(app.auth_db().writer())
            .await
            .unwrap();
        link_post(&app, "confirm", &confirm)
            .await
            .assert_problem(423, "password_reset_required");
        assert_eq!(
            app.count_where("trusted_networks", &format!("user_id = '{uid}'"))
                .await,
            1,
            "only the first network"
        );
        assert_eq!(
            app.count_where(
                "audit_log",
                &format!("action = 'login.refused_security_lock' AND actor = '{uid}'")
            )
            .await,
            1,
            "the refusal is audited"
        );
    });
}

/// A client behind the trusted proxy cannot name its own address in the header the
/// proxy does not write (`Forwarded` beside the proxy's `X-Forwarded-For`), nor with a
/// malformed entry to the right of it: the login from a new network is held all the
/// same, and the per-address limit counts it there.
#[tokio::test]
async fn a_client_cannot_choose_its_address_through_the_proxy() {
    let app = spawn_proxied(Backend::Sqlite, |_| {}).await;
    let email = "spoof@example.com";
    user_at(&app, email, HOME).await;
    let body = json!({ "email": email, "password": PASSWORD,
                       "device": { "id": "evil", "name": "evil phone" } });
    for (xff, forwarded) in [
        (AWAY.to_owned(), Some(format!("for={HOME}"))),
        (format!("{HOME}, {AWAY}:4711"), None),
        (format!("{HOME}, garbage"), None),
    ] {
        let mut req = app
            .http
            .post(format!("{}/v1/auth/login", app.base))
            .header("x-forwarded-for", &xff)
            .json(&body);
        if let Some(f) = &forwarded {
            req = req.header("forwarded", f);
        }
        let r = read(req.send().await.unwrap()).await;
        assert_eq!(
            r.status,
            StatusCode::ACCEPTED,
            "{xff} {forwarded:?}: {}",
            r.text
        );
    }
    // the operator who runs a Forwarded-writing proxy says so, and then only that counts
    let app = spawn_proxied(Backend::Sqlite, |c| c.forwarded_header = "forwarded".into()).await;
    let email = "spoof2@example.com";
    let id = id_of(&app.register(email).await);
    assert!(!id.is_empty());
    let r = read(
        app.http
            .post(format!("{}/v1/auth/login", app.base))
            .header("forwarded", format!("for={HOME}"))
            .header("x-forwarded-for", AWAY)
            .json(&json!({ "email": email, "password": PASSWORD,
                           "device": { "id": "d1", "name": "phone" } }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = login_from(&app, HOME, email, "d2").await; // X-Forwarded-For only: ignored
    let net: Option<String> =
        sqlx::query_scalar("SELECT ip FROM sessions ORDER BY created_at DESC LIMIT 1")
            .fetch_one(app.auth_db().read())
            .await
            .unwrap();
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "the proxy's own address is not HOME: {}",
        r.text
    );
    assert_eq!(net.as_deref(), Some(HOME), "the first session's address");
}
