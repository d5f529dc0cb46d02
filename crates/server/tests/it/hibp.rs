//! Registration consults a Have-I-Been-Pwned-compatible range API (a local server
//! here): a breached password is refused; an unreachable service fails open or closed
//! as configured.

use crate::helpers::*;
use axum::extract::Path;
use axum::routing::get;
use serde_json::json;
use vaultpay_store::Backend;

/// Serves `/range/{prefix}` listing `breached` with a large count, plus padding.
async fn range_server(breached: &'static str) -> String {
    let (prefix, suffix) = vaultpay_core::password::hibp_prefix_suffix(breached);
    let app = axum::Router::new().route(
        "/range/{p}",
        get(move |Path(p): Path<String>| {
            let (prefix, suffix) = (prefix.clone(), suffix.clone());
            async move {
                let mut body = String::from("0018A45C4D1DEF81644B54AB7F969B88D65:1\r\n00D4F6E8FA6EECAD2A3AA415EEC418D38EC:0\r\n");
                if p == prefix {
                    body.push_str(&format!("{suffix}:52341\r\n"));
                }
                body
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn breached_passwords_are_refused_at_registration() {
    let breached = "Tr0ub4dor&3-horse-staple";
    let url = range_server(breached).await;
    let app = TestApp::spawn_with(Backend::Sqlite, |cfg| {
        cfg.auth.hibp.enabled = true;
        cfg.auth.hibp.base_url = url;
    })
    .await;
    let r = app
        .post(
            "/v1/auth/register",
            None,
            json!({"email": "b@example.com", "password": breached, "name": "B"}),
        )
        .await;
    r.assert_problem(422, "password_breached");
    assert_eq!(r.body["count"], 52341);
    let users = app.count("users").await;
    let r = app.register("ok@example.com").await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(app.count("users").await, users + 1);
    app.stop().await;
}

#[tokio::test]
async fn unreachable_breach_service_fails_open_or_closed_as_configured() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }; // closed again: connections are refused
    for fail_open in [true, false] {
        let url = dead.clone();
        let app = TestApp::spawn_with(Backend::Sqlite, move |cfg| {
            cfg.auth.hibp.enabled = true;
            cfg.auth.hibp.base_url = url;
            cfg.auth.hibp.fail_open = fail_open;
        })
        .await;
        let r = app.register("c@example.com").await;
        if fail_open {
            assert_eq!(r.status, 201, "{}", r.text);
        } else {
            r.assert_problem(503, "service_unavailable");
            assert_eq!(app.count("users").await, 1, "only the bootstrap admin");
        }
        app.stop().await;
    }
}
