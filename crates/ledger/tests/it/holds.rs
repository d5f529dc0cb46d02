use crate::common::*;
use axum::http::Method;
use serde_json::json;

async fn hold(
    app: &TestApp,
    token: &str,
    from: &str,
    to: &str,
    amount: i64,
    timeout: Option<i64>,
) -> Resp {
    let mut body = json!({"from_account_id": from, "to_account_id": to, "amount": amount, "currency": "USD", "pending": true});
    if let Some(t) = timeout {
        body["timeout_secs"] = json!(t);
    }
    app.post("/v1/transfers", token, Some(&key()), body).await
}

#[tokio::test]
async fn holds_reserve_then_post_partially_and_fully_then_never_again() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, bob, a, bb) = app.alice_and_bob(1_000).await;

        let h = hold(&app, &alice, &a, &bb, 600, None).await.expect(201);
        assert_eq!(h.body["status"], "pending");
        assert_eq!(h.body["pending"], true);
        assert!(h.body["expires_at"].is_string());
        let id = h.id();
        // reserved at once, not moved
        assert_eq!(app.balance(&alice, &a).await, (1_000, 400));
        assert_eq!(app.balance(&bob, &bb).await, (0, 0));
        let r = app
            .transfer(&alice, &a, &bb, 401)
            .await
            .problem(422, "insufficient_funds");
        assert_eq!(r.body["available"], 400);

        // bob cannot post alice's hold (he is the payee, not the payer)
        app.post(
            &format!("/v1/transfers/{id}/post"),
            &bob,
            Some(&key()),
            json!({}),
        )
        .await
        .problem(403, "not_account_owner");
        app.post(
            &format!("/v1/transfers/{id}/post"),
            &app.customer("eve"),
            Some(&key()),
            json!({}),
        )
        .await
        .problem(404, "transfer_not_found");
        app.post(
            &format!("/v1/transfers/{id}/post"),
            &alice,
            Some(&key()),
            json!({"amount": 601}),
        )
        .await
        .problem(422, "amount_invalid");
        let p = app
            .post(
                &format!("/v1/transfers/{id}/post"),
                &alice,
                Some(&key()),
                json!({"amount": 200}),
            )
            .await
            .expect(200);
        assert_eq!(p.body["status"], "pending");
        assert_eq!(p.body["captured_amount"], 200);
        assert_eq!(app.balance(&alice, &a).await, (800, 400));
        assert_eq!(app.balance(&bob, &bb).await, (200, 200));
        // post the rest (empty body = everything left)
        let k = key();
        let p = app
            .raw(
                axum::http::Method::POST,
                &format!("/v1/transfers/{id}/post"),
                Some(&alice),
                Some(&k),
                None,
            )
            .await
            .expect(200);
        assert_eq!(p.body["status"], "posted");
        assert_eq!(p.body["captured_amount"], 600);
        // retry with the same key replays; a new post is refused
        let again = app
            .raw(
                axum::http::Method::POST,
                &format!("/v1/transfers/{id}/post"),
                Some(&alice),
                Some(&k),
                None,
            )
            .await
            .expect(200);
        assert!(again.replayed());
        app.post(
            &format!("/v1/transfers/{id}/post"),
            &alice,
            Some(&key()),
            json!({"amount": 1}),
        )
        .await
        .problem(409, "hold_not_pending");
        app.post(&format!("/v1/transfers/{id}/void"), &alice, None, json!({}))
            .await
            .problem(409, "hold_not_pending");
        assert_eq!(app.balance(&alice, &a).await, (400, 400));
        assert_eq!(app.balance(&bob, &bb).await, (600, 600));

        // a plain transfer is not a hold
        let t = app.transfer(&alice, &a, &bb, 1).await.expect(201).id();
        app.post(
            &format!("/v1/transfers/{t}/post"),
            &alice,
            Some(&key()),
            json!({}),
        )
        .await
        .problem(409, "hold_not_pending");
        app.assert_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn void_releases_and_resolves_once() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, bob, a, bb) = app.alice_and_bob(1_000).await;
        let id = hold(&app, &alice, &a, &bb, 300, None).await.expect(201).id();
        app.post(&format!("/v1/transfers/{id}/post"), &alice, Some(&key()), json!({"amount": 100})).await.expect(200);
        // the payee may release the rest
        let v = app.post(&format!("/v1/transfers/{id}/void"), &bob, None, json!({"reason": "not shipping"})).await.expect(200);
        assert_eq!(v.body["status"], "voided");
        assert_eq!(v.body["captured_amount"], 100);
        assert_eq!(app.balance(&alice, &a).await, (900, 900));
        app.post(&format!("/v1/transfers/{id}/void"), &alice, None, json!({})).await.problem(409, "hold_not_pending");
        app.post(&format!("/v1/transfers/{id}/post"), &alice, Some(&key()), json!({})).await.problem(409, "hold_not_pending");
        // both refusals are on record, naming the hold in its own member
        let failed = app.get("/v1/admin/failed-transfers?user_id=alice", &app.admin()).await.expect(200);
        let mut ops: Vec<(String, String)> = failed.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["operation"].as_str().unwrap().to_owned(), f["transfer_id"].as_str().unwrap_or("").to_owned()))
            .collect();
        ops.sort();
        assert_eq!(ops, [("post_hold".to_owned(), id.clone()), ("void_hold".to_owned(), id.clone())], "{}", failed.text);
        app.post(&format!("/v1/transfers/{id}/void"), &alice, None, json!({"bogus": 1})).await.problem(422, "invalid_request");
        // bad timeouts
        hold(&app, &alice, &a, &bb, 1, Some(0)).await.problem(422, "invalid_request");
        app.post("/v1/transfers", &alice, Some(&key()), json!({"from_account_id": a, "to_account_id": bb, "amount": 1, "currency": "USD", "timeout_secs": 5}))
            .await
            .problem(422, "invalid_request");
        app.assert_consistent().await;
    })
    .await;
}

/// The hold endpoints' optional bodies get the checks every JSON body gets: serde
/// would build the request from an array (`[]` posted the whole hold, `[250]` a part
/// of it), and an oversized body was a plain-text 413.
#[tokio::test]
async fn hold_bodies_are_objects_or_nothing() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, _bob, a, bb) = app.alice_and_bob(1_000).await;
        let id = hold(&app, &alice, &a, &bb, 600, None)
            .await
            .expect(201)
            .id();
        let post = format!("/v1/transfers/{id}/post");
        for body in ["[]", "[null]", "[250]", "250", "\"x\""] {
            app.raw(
                Method::POST,
                &post,
                Some(&alice),
                Some(&key()),
                Some(body.into()),
            )
            .await
            .problem(422, "invalid_request");
        }
        app.raw(
            Method::POST,
            &post,
            Some(&alice),
            Some(&key()),
            Some(r#"{"amount": 1"#.into()),
        )
        .await
        .problem(400, "malformed_json");
        app.raw(
            Method::POST,
            &post,
            Some(&alice),
            Some(&key()),
            Some(r#"{"reason": "\u0000"}"#.into()),
        )
        .await
        .problem(422, "invalid_request");
        let big = format!(r#"{{"reason": "{}"}}"#, "x".repeat(3 << 20));
        app.raw(
            Method::POST,
            &format!("/v1/transfers/{id}/void"),
            Some(&alice),
            None,
            Some(big),
        )
        .await
        .problem(413, "body_too_large");
        // nothing moved; an empty body still posts the whole hold
        assert_eq!(app.balance(&alice, &a).await, (1_000, 400));
        app.raw(Method::POST, &post, Some(&alice), Some(&key()), None)
            .await
            .expect(200);
        assert_eq!(app.balance(&alice, &a).await, (400, 400));
        app.assert_consistent().await;
    })
    .await;
}

/// An account with a pending hold paying into it cannot be closed (the hold could
/// never be posted there, and the payer's money would stay reserved); once the hold
/// is resolved it can.
#[tokio::test]
async fn an_account_with_an_incoming_hold_stays_open() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, bob, a, bb) = app.alice_and_bob(1_000).await;
        let id = hold(&app, &alice, &a, &bb, 300, None)
            .await
            .expect(201)
            .id();
        let admin = app.admin();
        let close = format!("/v1/admin/accounts/{bb}/close");
        app.post(&close, &admin, None, json!({"reason": "bye"}))
            .await
            .problem(409, "account_not_empty");
        assert_eq!(
            app.get(&format!("/v1/accounts/{bb}"), &bob)
                .await
                .expect(200)
                .body["status"],
            "active"
        );
        app.post(&format!("/v1/transfers/{id}/void"), &alice, None, json!({}))
            .await
            .expect(200);
        let c = app
            .post(&close, &admin, None, json!({"reason": "bye"}))
            .await
            .expect(200);
        assert_eq!(c.body["status"], "closed");
        app.assert_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn expired_holds_are_voided_exactly_once() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, _, a, bb) = app.alice_and_bob(1_000).await;
        let id = hold(&app, &alice, &a, &bb, 250, Some(1))
            .await
            .expect(201)
            .id();
        let keep = hold(&app, &alice, &a, &bb, 50, Some(3600))
            .await
            .expect(201)
            .id();
        assert_eq!(app.balance(&alice, &a).await, (1_000, 700));
        assert_eq!(app.ledger.expire_holds().await.unwrap(), 0);
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        // posting an expired hold is refused even before the task runs
        app.post(
            &format!("/v1/transfers/{id}/post"),
            &alice,
            Some(&key()),
            json!({}),
        )
        .await
        .problem(409, "hold_expired");
        // and so is voiding it: it is the expiry task's to release, as `expired`
        app.post(&format!("/v1/transfers/{id}/void"), &alice, None, json!({}))
            .await
            .problem(409, "hold_expired");
        // several expiry runs at once: exactly one voids it
        let (x, y, z) = tokio::join!(
            app.ledger.expire_holds(),
            app.ledger.expire_holds(),
            app.ledger.expire_holds()
        );
        assert_eq!(x.unwrap() + y.unwrap() + z.unwrap(), 1);
        assert_eq!(app.ledger.expire_holds().await.unwrap(), 0);
        let t = app
            .get(&format!("/v1/transfers/{id}"), &alice)
            .await
            .expect(200);
        assert_eq!(t.body["status"], "expired");
        assert_eq!(app.balance(&alice, &a).await, (1_000, 950));
        let k = app
            .get(&format!("/v1/transfers/{keep}"), &alice)
            .await
            .expect(200);
        assert_eq!(k.body["status"], "pending");
        // the background task does the same on its own
        let id2 = hold(&app, &alice, &a, &bb, 10, Some(1))
            .await
            .expect(201)
            .id();
        let (stop, rx) = tokio::sync::watch::channel(false);
        let mut cfg_tasks = app.ledger.spawn_background(rx);
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        let t = app
            .get(&format!("/v1/transfers/{id2}"), &alice)
            .await
            .expect(200);
        assert_eq!(t.body["status"], "expired");
        stop.send(true).unwrap();
        for h in cfg_tasks.drain(..) {
            tokio::time::timeout(std::time::Duration::from_secs(5), h)
                .await
                .unwrap()
                .unwrap();
        }
        app.assert_consistent().await;
    })
    .await;
}

/// A hold that cannot be expired (a fault injected into its update) does not stop the
/// expiry of the holds after it: each is expired in its own transaction, and the
/// failing one is tried again on the next run.
#[tokio::test]
async fn a_hold_that_fails_to_expire_does_not_block_the_others() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, _, a, bb) = app.alice_and_bob(1_000).await;
        let stuck = hold(&app, &alice, &a, &bb, 100, Some(3600))
            .await
            .expect(201)
            .id();
        let other = hold(&app, &alice, &a, &bb, 50, Some(3600))
            .await
            .expect(201)
            .id();
        // both overdue two hours on, the stuck one (made first) first in the expiry order
        let later = vaultpay_core::time::now_micros() + 7_200_000_000;
        let sqls: Vec<String> = match app.backend {
            vaultpay_store::Backend::Sqlite => vec![format!(
                "CREATE TRIGGER stuck BEFORE UPDATE ON transfers WHEN OLD.id = '{stuck}' \
                 BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
            )],
            vaultpay_store::Backend::Postgres => vec![
                format!(
                    "CREATE FUNCTION stuck() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                     IF OLD.id = '{stuck}' THEN RAISE EXCEPTION 'injected fault'; END IF; \
                     RETURN NEW; END; $$"
                ),
                "CREATE TRIGGER stuck BEFORE UPDATE ON transfers FOR EACH ROW \
                 EXECUTE FUNCTION stuck()"
                    .to_owned(),
            ],
        };
        for s in &sqls {
            sqlx::raw_sql(s).execute(app.db.writer()).await.unwrap();
        }
        assert_eq!(app.ledger.expire_holds_as_of(later).await.unwrap(), 1);
        let status = |id: String| {
            let app = &app;
            let alice = alice.clone();
            async move {
                app.get(&format!("/v1/transfers/{id}"), &alice)
                    .await
                    .expect(200)
                    .body["status"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            }
        };
        assert_eq!(status(other.clone()).await, "expired");
        assert_eq!(status(stuck.clone()).await, "pending");
        assert_eq!(app.balance(&alice, &a).await, (1_000, 900));
        sqlx::raw_sql(match app.backend {
            vaultpay_store::Backend::Sqlite => "DROP TRIGGER stuck",
            vaultpay_store::Backend::Postgres => "DROP TRIGGER stuck ON transfers",
        })
        .execute(app.db.writer())
        .await
        .unwrap();
        assert_eq!(app.ledger.expire_holds_as_of(later).await.unwrap(), 1);
        assert_eq!(status(stuck).await, "expired");
        assert_eq!(app.balance(&alice, &a).await, (1_000, 1_000));
        app.assert_consistent().await;
    })
    .await;
}

/// verify's held_equals_pending_holds check (a GROUP BY over pending holds since the
/// per-account transfer indexes were dropped) still catches both ways of breaking it.
#[tokio::test]
async fn verify_catches_held_that_does_not_match_pending_holds() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let bob = app.customer("bob");
        let a = app.open(&alice, "USD").await;
        let a2 = app.open(&alice, "USD").await;
        let bb = app.open(&bob, "USD").await;
        app.deposit(&a, 1_000, "USD").await.expect(201);
        app.deposit(&a2, 1_000, "USD").await.expect(201);
        let h = hold(&app, &alice, &a, &bb, 300, None)
            .await
            .expect(201)
            .id();
        hold(&app, &alice, &a, &bb, 200, None).await.expect(201);
        hold(&app, &alice, &a2, &bb, 50, None).await.expect(201);
        app.assert_consistent().await;
        let held = |r: vaultpay_ledger::VerifyReport| -> Vec<String> {
            r.violations
                .into_iter()
                .filter(|v| v.invariant == "held_equals_pending_holds")
                .map(|v| v.detail)
                .collect()
        };

        // held out of step with the pending holds
        sqlx::query("UPDATE accounts SET held = held + 1 WHERE id = $1")
            .bind(&a)
            .execute(app.db.writer())
            .await
            .unwrap();
        let r = vaultpay_ledger::verify(&app.db).await.unwrap();
        assert_eq!(held(r), vec![a.clone()]);
        sqlx::query("UPDATE accounts SET held = held - 1 WHERE id = $1")
            .bind(&a)
            .execute(app.db.writer())
            .await
            .unwrap();
        app.assert_consistent().await;

        // a hold that stops being pending without releasing what it reserved
        sqlx::query("UPDATE transfers SET status = 'voided' WHERE id = $1")
            .bind(&h)
            .execute(app.db.writer())
            .await
            .unwrap();
        let r = vaultpay_ledger::verify(&app.db).await.unwrap();
        assert_eq!(held(r), vec![a.clone()]);
    })
    .await;
}

/// More holds that keep failing to expire than one expiry page reads (500) do not keep
/// the holds behind them reserved: the run pages on past them.
#[tokio::test]
async fn a_page_of_failing_holds_does_not_hide_the_ones_behind_it() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, _, a, bb) = app.alice_and_bob(10_000).await;
        for _ in 0..501 {
            let body = json!({"from_account_id": a, "to_account_id": bb, "amount": 1,
                              "currency": "USD", "pending": true, "description": "stuck",
                              "timeout_secs": 3600});
            app.post("/v1/transfers", &alice, Some(&key()), body)
                .await
                .expect(201);
        }
        let good = hold(&app, &alice, &a, &bb, 50, Some(3600))
            .await
            .expect(201)
            .id();
        // all overdue two hours on, the stuck ones (made first) first in the expiry order
        let later = vaultpay_core::time::now_micros() + 7_200_000_000;
        let sqls: Vec<&str> = match app.backend {
            vaultpay_store::Backend::Sqlite => vec![
                "CREATE TRIGGER stuck BEFORE UPDATE ON transfers WHEN OLD.description = 'stuck' \
                 BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
            ],
            vaultpay_store::Backend::Postgres => vec![
                "CREATE FUNCTION stuck() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 IF OLD.description = 'stuck' THEN RAISE EXCEPTION 'injected fault'; END IF; \
                 RETURN NEW; END; $$",
                "CREATE TRIGGER stuck BEFORE UPDATE ON transfers FOR EACH ROW \
                 EXECUTE FUNCTION stuck()",
            ],
        };
        for s in sqls {
            sqlx::raw_sql(s).execute(app.db.writer()).await.unwrap();
        }
        assert_eq!(app.ledger.expire_holds_as_of(later).await.unwrap(), 1);
        let t = app
            .get(&format!("/v1/transfers/{good}"), &alice)
            .await
            .expect(200);
        assert_eq!(t.body["status"], "expired");
        assert_eq!(app.balance(&alice, &a).await, (10_000, 10_000 - 501));
    })
    .await;
}

/// Many holds expiring together are expired several to a transaction; one resolved
/// meanwhile is left as it is, and every other is released exactly once.
#[tokio::test]
async fn a_burst_of_expired_holds_is_released_once_each() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, _, a, bb) = app.alice_and_bob(1_000).await;
        let mut ids = Vec::new();
        for _ in 0..70 {
            ids.push(
                hold(&app, &alice, &a, &bb, 10, Some(1))
                    .await
                    .expect(201)
                    .id(),
            );
        }
        assert_eq!(app.balance(&alice, &a).await, (1_000, 300));
        app.post(
            &format!("/v1/transfers/{}/post", ids[3]),
            &alice,
            Some(&key()),
            json!({}),
        )
        .await
        .expect(200);
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let (x, y) = tokio::join!(app.ledger.expire_holds(), app.ledger.expire_holds());
        assert_eq!(x.unwrap() + y.unwrap(), 69);
        assert_eq!(app.ledger.expire_holds().await.unwrap(), 0);
        assert_eq!(app.balance(&alice, &a).await, (990, 990));
        let posted = app
            .get(&format!("/v1/transfers/{}", ids[3]), &alice)
            .await
            .expect(200);
        assert_eq!(posted.body["status"], "posted");
        let last = app
            .get(&format!("/v1/transfers/{}", ids[69]), &alice)
            .await
            .expect(200);
        assert_eq!(last.body["status"], "expired");
        app.assert_consistent().await;
    })
    .await;
}
