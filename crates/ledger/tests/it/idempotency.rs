use crate::common::*;
use axum::http::Method;
use serde_json::json;
use vaultpay_store::sqlx;

#[tokio::test]
async fn same_key_same_request_replays_exactly() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, bob, a, bb) = app.alice_and_bob(1_000).await;
        let k = key();
        let body = json!({"from_account_id": a, "to_account_id": bb, "amount": 100, "currency": "USD", "description": "rent"});
        let first = app.post("/v1/transfers", &alice, Some(&k), body.clone()).await.expect(201);
        assert!(!first.replayed());
        let second = app.post("/v1/transfers", &alice, Some(&k), body.clone()).await.expect(201);
        assert!(second.replayed());
        assert_eq!(first.text, second.text);
        assert_eq!(app.balance(&alice, &a).await.0, 900, "paid once");

        // same key, different request → 422, nothing moves
        let other = json!({"from_account_id": a, "to_account_id": bb, "amount": 101, "currency": "USD", "description": "rent"});
        app.post("/v1/transfers", &alice, Some(&k), other).await.problem(422, "idempotency_key_reused");
        // same key on another path is a different request too
        app.post("/v1/accounts", &alice, Some(&k), json!({"currency": "USD", "kind": "current", "name": "x"}))
            .await
            .problem(422, "idempotency_key_reused");
        // keys are scoped to the user: bob's use of the same key is independent
        let bob_body = json!({"from_account_id": bb, "to_account_id": a, "amount": 10, "currency": "USD", "description": "rent"});
        let rb = app.post("/v1/transfers", &bob, Some(&k), bob_body).await.expect(201);
        assert!(!rb.replayed());
        assert_eq!(app.balance(&alice, &a).await.0, 910);
        app.assert_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn client_errors_are_stored_and_replayed_but_malformed_requests_store_nothing() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let bob = app.customer("bob");
        let a = app.open(&alice, "USD").await;
        let bb = app.open(&bob, "USD").await;
        let k = key();
        let body = json!({"from_account_id": a, "to_account_id": bb, "amount": 500, "currency": "USD"});
        let first = app.post("/v1/transfers", &alice, Some(&k), body.clone()).await.problem(422, "insufficient_funds");
        app.deposit(&a, 1_000, "USD").await.expect(201);
        // the stored 4xx is replayed even though the transfer would now succeed
        let again = app.post("/v1/transfers", &alice, Some(&k), body.clone()).await.problem(422, "insufficient_funds");
        assert!(again.replayed());
        assert_eq!(first.text, again.text);
        assert_eq!(app.balance(&alice, &a).await.0, 1_000);

        // a malformed body is refused before execution and stores nothing
        let k2 = key();
        let r = app.raw(Method::POST, "/v1/transfers", Some(&alice), Some(&k2), Some("{\"from_account_id\": ".into())).await;
        assert_eq!(r.status.as_u16(), 400);
        let r = app
            .post("/v1/transfers", &alice, Some(&k2), json!({"from_account_id": a, "to_account_id": bb, "amount": 1, "currency": "USD", "bogus": true}))
            .await;
        assert!(r.status.is_client_error());
        let ok = app.post("/v1/transfers", &alice, Some(&k2), body.clone()).await.expect(201);
        assert!(!ok.replayed());
        assert_eq!(app.balance(&alice, &a).await.0, 500);
    })
    .await;
}

#[tokio::test]
async fn concurrent_retries_with_one_key_pay_once() {
    each_backend(|b| async move {
        let app = std::sync::Arc::new(TestApp::new(b).await);
        let alice = app.customer("alice");
        let bob = app.customer("bob");
        let a = app.open(&alice, "USD").await;
        let bb = app.open(&bob, "USD").await;
        app.deposit(&a, 1_000, "USD").await.expect(201);
        let k = key();
        let body =
            json!({"from_account_id": a, "to_account_id": bb, "amount": 7, "currency": "USD"});
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (app, alice, k, body) = (app.clone(), alice.clone(), k.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                app.post("/v1/transfers", &alice, Some(&k), body).await
            }));
        }
        let mut ids = std::collections::HashSet::new();
        let mut in_progress = 0;
        for t in tasks {
            let r = t.await.unwrap();
            match r.status.as_u16() {
                201 => {
                    ids.insert(r.id());
                }
                409 => {
                    assert_eq!(r.code(), "idempotency_request_in_progress");
                    in_progress += 1;
                }
                s => panic!("unexpected {s}: {}", r.text),
            }
        }
        assert_eq!(ids.len(), 1, "every success is the same transfer");
        assert!(in_progress < 16);
        assert_eq!(app.balance(&alice, &a).await.0, 993, "paid exactly once");
        app.assert_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn keys_are_kept_a_day_then_purged() {
    each_backend(|b| async move {
        // a TTL below the floor: keys are still kept 24 hours
        let cfg = vaultpay_ledger::LedgerConfig {
            idempotency_ttl_secs: 1,
            ..Default::default()
        };
        let app = TestApp::with_config(b, cfg).await;
        let alice = app.customer("alice");
        app.post(
            "/v1/accounts",
            &alice,
            Some("k-1"),
            json!({"currency": "USD", "kind": "current", "name": "x"}),
        )
        .await
        .expect(201);
        assert_eq!(app.ledger.purge_idempotency().await.unwrap(), 0);
        age_keys(&app).await;
        assert_eq!(app.ledger.purge_idempotency().await.unwrap(), 1);
        // the key is usable again (a new account is opened)
        let r = app
            .post(
                "/v1/accounts",
                &alice,
                Some("k-1"),
                json!({"currency": "USD", "kind": "current", "name": "x"}),
            )
            .await
            .expect(201);
        assert!(!r.replayed());
    })
    .await;
}

/// A key whose resource is a hold still pending outlives the 24-hour purge: a partial
/// post retried with its key after a day is replayed, not captured again. Once the hold
/// is resolved, the purge takes it.
#[tokio::test]
async fn keys_of_a_pending_hold_outlive_the_purge() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, bob, a, bb) = app.alice_and_bob(1_000).await;
        let h = app
            .post(
                "/v1/transfers",
                &alice,
                Some("hold-1"),
                json!({"from_account_id": a, "to_account_id": bb, "amount": 500, "currency": "USD", "pending": true}),
            )
            .await
            .expect(201)
            .id();
        let post = || async {
            app.post(
                &format!("/v1/transfers/{h}/post"),
                &alice,
                Some("post-1"),
                json!({"amount": 200}),
            )
            .await
        };
        post().await.expect(200);
        age_keys(&app).await;
        // the keys of the hold and of its partial post stay (the deposit's and the
        // accounts' go)
        app.ledger.purge_idempotency().await.unwrap();
        assert!(kept(&app, "hold-1").await && kept(&app, "post-1").await);
        let again = post().await.expect(200);
        assert!(again.replayed());
        assert_eq!(app.balance(&bob, &bb).await, (200, 200));
        // resolved: the purge takes them
        app.post(&format!("/v1/transfers/{h}/void"), &alice, Some(&key()), json!({}))
            .await
            .expect(200);
        age_keys(&app).await;
        app.ledger.purge_idempotency().await.unwrap();
        assert!(!kept(&app, "hold-1").await && !kept(&app, "post-1").await);
        app.assert_consistent().await;
    })
    .await;
}

/// A batch that placed holds keeps its key past the 24-hour purge while any of them is
/// pending: retried after a day, it is replayed instead of holding the money again.
/// Once its holds are resolved, the purge takes the key; a batch of plain transfers
/// (nothing pending) goes at 24 hours as before.
#[tokio::test]
async fn the_key_of_a_batch_with_pending_holds_outlives_the_purge() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, _bob, a, bb) = app.alice_and_bob(1_000).await;
        let batch = |key: &'static str, pending: bool| {
            let app = &app;
            let (alice, a, bb) = (alice.clone(), a.clone(), bb.clone());
            async move {
                app.post(
                    "/v1/transfers/batch",
                    &alice,
                    Some(key),
                    json!({"transfers": [
                        {"from_account_id": a, "to_account_id": bb, "amount": 100, "currency": "USD", "pending": pending},
                        {"from_account_id": a, "to_account_id": bb, "amount": 10, "currency": "USD"},
                    ]}),
                )
                .await
                .expect(200)
            }
        };
        let first = batch("batch-holds", true).await;
        let hold = first.body["items"][0]["transfer"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        batch("batch-plain", false).await;
        let pending = || app.scalar("SELECT COUNT(*) FROM transfers WHERE status = 'pending'");
        assert_eq!(pending().await, 1);
        age_keys(&app).await;
        app.ledger.purge_idempotency().await.unwrap();
        assert!(kept(&app, "batch-holds").await, "{b:?}: a hold of the batch is pending");
        assert!(!kept(&app, "batch-plain").await, "{b:?}: nothing of it is pending");
        let again = batch("batch-holds", true).await;
        assert!(again.replayed());
        assert_eq!(again.body, first.body);
        assert_eq!(pending().await, 1, "{b:?}: no second hold");
        // resolved: the purge takes the key
        app.post(&format!("/v1/transfers/{hold}/void"), &alice, Some(&key()), json!({}))
            .await
            .expect(200);
        age_keys(&app).await;
        app.ledger.purge_idempotency().await.unwrap();
        assert!(!kept(&app, "batch-holds").await, "{b:?}");
        app.assert_consistent().await;
    })
    .await;
}

/// Makes every stored idempotency key older than 24 hours (the purge's minimum age).
async fn age_keys(app: &TestApp) {
    let aged = vaultpay_core::time::now_micros() - vaultpay_core::time::secs(86_401);
    sqlx::query("UPDATE idempotency_keys SET created_at = $1")
        .bind(aged)
        .execute(app.db.writer())
        .await
        .unwrap();
}

/// Whether an idempotency key `k` is stored (any user's).
async fn kept(app: &TestApp, k: &str) -> bool {
    sqlx::query("SELECT 1 FROM idempotency_keys WHERE key = $1")
        .bind(k)
        .fetch_optional(app.db.read())
        .await
        .unwrap()
        .is_some()
}

/// Makes inserting a transfer described "boom" fail inside the database.
async fn install_fault(app: &TestApp) {
    let sqls: &[&str] = match app.backend {
        vaultpay_store::Backend::Sqlite => &["CREATE TRIGGER boom BEFORE INSERT ON transfers WHEN NEW.description = 'boom' \
             BEGIN SELECT RAISE(ABORT, 'injected fault'); END"],
        vaultpay_store::Backend::Postgres => &[
            "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.description = 'boom' THEN RAISE EXCEPTION 'injected fault'; END IF; RETURN NEW; END; $$",
            "CREATE TRIGGER boom BEFORE INSERT ON transfers FOR EACH ROW EXECUTE FUNCTION boom()",
        ],
    };
    for s in sqls {
        sqlx::raw_sql(s).execute(app.db.writer()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_stores_nothing_and_leaves_the_key_retryable() {
    each_backend(|b| async move {
        for group_commit in [true, false] {
            let cfg = vaultpay_ledger::LedgerConfig { group_commit, ..Default::default() };
            let app = std::sync::Arc::new(TestApp::with_config(b, cfg).await);
            let alice = app.customer("alice");
            let bob = app.customer("bob");
            let a = app.open(&alice, "USD").await;
            let bb = app.open(&bob, "USD").await;
            app.deposit(&a, 10_000, "USD").await.expect(201);
            install_fault(&app).await;

            let k = key();
            let boom = json!({"from_account_id": a, "to_account_id": bb, "amount": 100, "currency": "USD", "description": "boom"});
            // the faulty request runs among healthy ones (same group commit, when grouping)
            let mut healthy = Vec::new();
            for _ in 0..20 {
                let (app, alice, a, bb) = (app.clone(), alice.clone(), a.clone(), bb.clone());
                healthy.push(tokio::spawn(async move { app.transfer(&alice, &a, &bb, 1).await.status.as_u16() }));
            }
            let r = app.raw_unchecked(Method::POST, "/v1/transfers", Some(&alice), Some(&k), Some(boom.to_string())).await;
            assert_eq!(r.status.as_u16(), 500, "{}", r.text);
            assert_eq!(r.code(), "internal_error");
            assert!(!r.text.contains("injected"), "internal details must not leak: {}", r.text);
            for h in healthy {
                assert_eq!(h.await.unwrap(), 201, "a failure in one job does not abort the others");
            }
            assert_eq!(app.balance(&alice, &a).await.0, 10_000 - 20);
            // still failing: still a 500, nothing stored
            let r = app.raw_unchecked(Method::POST, "/v1/transfers", Some(&alice), Some(&k), Some(boom.to_string())).await;
            assert_eq!(r.status.as_u16(), 500);
            // fault cleared: the same key executes for real
            sqlx::raw_sql("DROP TRIGGER boom ON transfers").execute(app.db.writer()).await.ok();
            sqlx::raw_sql("DROP TRIGGER boom").execute(app.db.writer()).await.ok();
            let ok = app.post("/v1/transfers", &alice, Some(&k), boom.clone()).await.expect(201);
            assert!(!ok.replayed());
            assert_eq!(app.balance(&alice, &a).await.0, 10_000 - 20 - 100);
            app.assert_consistent().await;
        }
    })
    .await;
}

/// The purge deletes a backlog larger than one chunk (a day of keys after a day down)
/// in several statements, and all of it.
#[tokio::test]
async fn purge_deletes_a_backlog_in_chunks() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let old = vaultpay_core::time::now_micros() - vaultpay_core::time::secs(86_401);
        let mut tx = app.db.begin().await.unwrap();
        for i in 0..2_500 {
            sqlx::query(
                "INSERT INTO idempotency_keys (user_id, key, fingerprint, status, body, created_at) \
                 VALUES ($1, $2, 'f', 201, '{}', $3)",
            )
            .bind(format!("u{}", i % 7))
            .bind(format!("k-{i}"))
            .bind(old)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        assert_eq!(app.ledger.purge_idempotency().await.unwrap(), 2_500);
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM idempotency_keys")
            .fetch_one(app.db.read())
            .await
            .unwrap();
        assert_eq!(left, 0);
    })
    .await;
}

/// PostgreSQL with two ledger processes on one database: a request whose key is in
/// flight on one replica gets 409 on the other (not a second run that then fails the
/// other replica's whole group on the key's primary key), and once the first has
/// committed, the retry replays its answer. The first is held in flight by a test
/// transaction holding its payer's row.
#[tokio::test]
async fn a_key_in_flight_on_another_replica_is_409_then_replays() {
    if !vaultpay_store::testing::backends().contains(&vaultpay_store::Backend::Postgres) {
        eprintln!("note: PostgreSQL not configured; replica test skipped");
        return;
    }
    let app = std::sync::Arc::new(TestApp::new(vaultpay_store::Backend::Postgres).await);
    let other = app.replica();
    let (alice, _, a, bb) = app.alice_and_bob(1_000).await;
    let k = key();
    let body = json!({"from_account_id": a, "to_account_id": bb, "amount": 7, "currency": "USD"});
    let mut hold = app.db.writer().begin().await.unwrap();
    sqlx::query("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(&a)
        .fetch_one(&mut *hold)
        .await
        .unwrap();
    let first = {
        let (app, alice, k, body) = (app.clone(), alice.clone(), k.clone(), body.clone());
        tokio::spawn(async move { app.post("/v1/transfers", &alice, Some(&k), body).await })
    };
    // the first waits for the payer's row, holding its claim on the key (bounded)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the first request never waited"
        );
        let waiting: i64 = sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(app.db.read())
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        other.post("/v1/transfers", &alice, Some(&k), body.clone()),
    )
    .await
    .expect("the replica ran the request (waiting for the payer) instead of answering 409")
    .problem(409, "idempotency_request_in_progress");
    hold.rollback().await.unwrap();
    let first = first.await.unwrap().expect(201);
    let again = other
        .post("/v1/transfers", &alice, Some(&k), body)
        .await
        .expect(201);
    assert!(again.replayed());
    assert_eq!(again.id(), first.id());
    assert_eq!(app.balance(&alice, &a).await.0, 993, "paid exactly once");
    app.assert_consistent().await;
}
