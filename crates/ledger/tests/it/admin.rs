use crate::common::*;
use serde_json::json;

#[tokio::test]
async fn freeze_unfreeze_close_are_audited_and_need_admin_and_a_live_session() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let admin = app.admin();
        let (a, bb) = app.funded_pair(&alice, 100).await;

        app.post(
            &format!("/v1/admin/accounts/{a}/freeze"),
            &alice,
            None,
            json!({"reason": "x"}),
        )
        .await
        .problem(403, "forbidden");
        app.post(
            &format!("/v1/admin/accounts/{a}/freeze"),
            &admin,
            None,
            json!({"reason": ""}),
        )
        .await
        .problem(422, "invalid_request");
        // the reason goes into the audit log and the outbox event as it is
        app.post(
            &format!("/v1/admin/accounts/{a}/freeze"),
            &admin,
            None,
            json!({"reason": "kyc\nforged: line"}),
        )
        .await
        .problem(422, "invalid_request");
        let f = app
            .post(
                &format!("/v1/admin/accounts/{a}/freeze"),
                &admin,
                None,
                json!({"reason": "kyc"}),
            )
            .await
            .expect(200);
        assert_eq!(f.body["status"], "frozen");
        app.post(
            &format!("/v1/admin/accounts/{a}/freeze"),
            &admin,
            None,
            json!({"reason": "kyc"}),
        )
        .await
        .problem(409, "account_frozen");
        app.transfer(&alice, &a, &bb, 1)
            .await
            .problem(409, "account_frozen");
        // money cannot come in either
        app.deposit(&a, 1, "USD")
            .await
            .problem(409, "account_frozen");
        app.post(
            &format!("/v1/admin/accounts/{a}/unfreeze"),
            &admin,
            None,
            json!({"reason": "ok"}),
        )
        .await
        .expect(200);
        app.post(
            &format!("/v1/admin/accounts/{a}/unfreeze"),
            &admin,
            None,
            json!({"reason": "ok"}),
        )
        .await
        .problem(409, "account_not_frozen");
        app.transfer(&alice, &a, &bb, 1).await.expect(201);
        app.post(
            &format!("/v1/admin/accounts/{a}/close"),
            &admin,
            None,
            json!({"reason": "bye"}),
        )
        .await
        .problem(409, "account_not_empty");
        app.post(
            "/v1/admin/withdrawals",
            &admin,
            Some(&key()),
            json!({"account_id": a, "amount": 99, "currency": "USD", "reference": "closing"}),
        )
        .await
        .expect(201);
        let c = app
            .post(
                &format!("/v1/admin/accounts/{a}/close"),
                &admin,
                None,
                json!({"reason": "bye"}),
            )
            .await
            .expect(200);
        assert_eq!(c.body["status"], "closed");
        app.post(
            &format!("/v1/admin/accounts/{a}/unfreeze"),
            &admin,
            None,
            json!({"reason": "x"}),
        )
        .await
        .problem(409, "account_closed");
        app.post(
            "/v1/admin/accounts/nope/freeze",
            &admin,
            None,
            json!({"reason": "x"}),
        )
        .await
        .problem(404, "account_not_found");

        let audit = app
            .get(
                "/v1/admin/ledger/audit?limit=100",
                &app.token("comp", &["compliance"]),
            )
            .await
            .expect(200);
        let actions: Vec<&str> = audit.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        for a in [
            "ledger.account.frozen",
            "ledger.account.unfrozen",
            "ledger.account.closed",
            "ledger.account.opened",
            "ledger.deposit.posted",
            "ledger.withdrawal.posted",
        ] {
            assert!(actions.contains(&a), "{a} missing in {actions:?}");
        }
        let frozen = audit.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["action"] == "ledger.account.frozen")
            .unwrap();
        assert_eq!(frozen["actor"], "admin-1");
        assert_eq!(frozen["metadata"]["reason"], "kyc");
        app.get("/v1/admin/ledger/audit", &alice)
            .await
            .problem(403, "forbidden");
        app.assert_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn revoked_sessions_are_refused_for_sensitive_operations_only() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.token_sid("alice", &["customer"], "s-alice");
        let admin = app.token_sid("admin-1", &["admin"], "s-admin");
        let (a, bb) = app.funded_pair(&alice, 1_000_000).await;
        let threshold = app.ledger.config().introspection_threshold_minor;
        let hold = app
            .post(
                "/v1/transfers",
                &alice,
                Some(&key()),
                json!({"from_account_id": a, "to_account_id": bb, "amount": 100, "currency": "USD", "pending": true}),
            )
            .await
            .expect(201);
        let hold = hold.body["id"].as_str().unwrap().to_owned();

        app.introspector.revoked.lock().insert("s-alice".into());
        // releasing reserved funds is checked live as well
        app.post(&format!("/v1/transfers/{hold}/void"), &alice, None, json!({}))
            .await
            .problem(401, "session_revoked");
        let h = app.get(&format!("/v1/transfers/{hold}"), &alice).await.expect(200);
        assert_eq!(h.body["status"], "pending");
        // below the threshold: the signed token is enough
        app.transfer(&alice, &a, &bb, 10).await.expect(201);
        app.get(&format!("/v1/accounts/{a}"), &alice)
            .await
            .expect(200);
        // at the threshold: refused at once
        app.transfer(&alice, &a, &bb, threshold)
            .await
            .problem(401, "session_revoked");
        assert_eq!(
            app.balance(&app.customer("alice"), &a).await.0,
            1_000_000 - 10
        );

        app.introspector.revoked.lock().insert("s-admin".into());
        app.post(
            &format!("/v1/admin/accounts/{a}/freeze"),
            &admin,
            None,
            json!({"reason": "x"}),
        )
        .await
        .problem(401, "session_revoked");
        app.post(
            "/v1/admin/deposits",
            &admin,
            Some(&key()),
            json!({"account_id": a, "amount": 1, "currency": "USD", "reference": ""}),
        )
        .await
        .problem(401, "session_revoked");
        assert!(*app.introspector.calls.lock() >= 3);

        // staff reads of the ledger's records are checked live too
        let auditor = app.token_sid("comp-1", &["compliance"], "s-comp");
        for path in ["/v1/admin/ledger/audit", "/v1/admin/failed-transfers"] {
            app.get(path, &auditor).await.expect(200);
        }
        // the audit log pages by sequence only; a filter it does not have is refused
        for q in ["owner_id=alice", "actor=alice"] {
            app.get(&format!("/v1/admin/ledger/audit?{q}"), &auditor)
                .await
                .problem(400, "invalid_query");
        }
        app.introspector.revoked.lock().insert("s-comp".into());
        for path in ["/v1/admin/ledger/audit", "/v1/admin/failed-transfers"] {
            app.get(path, &auditor)
                .await
                .problem(401, "session_revoked");
        }
    })
    .await;
}

/// The token of a revoked session cannot move a large sum in transfers just under the
/// threshold: once what the session moved since its last live check reaches it, the
/// next transfer is checked live and refused. A live session's count starts again
/// after each check.
#[tokio::test]
async fn transfers_under_the_threshold_add_up_to_a_live_check() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.token_sid("alice", &["customer"], "s-alice");
        let (a, bb) = app.funded_pair(&alice, 10_000_000).await;
        let threshold = app.ledger.config().introspection_threshold_minor;
        let part = threshold / 3 + 1;

        // live: three parts reach the threshold; the third is checked, and passes
        let calls = *app.introspector.calls.lock();
        for _ in 0..3 {
            app.transfer(&alice, &a, &bb, part).await.expect(201);
        }
        assert_eq!(*app.introspector.calls.lock(), calls + 1);
        // and counting starts again: two more parts are not checked
        for _ in 0..2 {
            app.transfer(&alice, &a, &bb, part).await.expect(201);
        }
        assert_eq!(*app.introspector.calls.lock(), calls + 1);

        // revoked: the part that reaches the threshold is refused, and every one after
        app.introspector.revoked.lock().insert("s-alice".into());
        app.transfer(&alice, &a, &bb, part)
            .await
            .problem(401, "session_revoked");
        for _ in 0..3 {
            app.transfer(&alice, &a, &bb, part)
                .await
                .problem(401, "session_revoked");
        }
        let item = json!({"from_account_id": a, "to_account_id": bb, "amount": 1, "currency": "USD", "description": "b"});
        app.post("/v1/transfers/batch", &alice, Some(&key()), json!({"transfers": [item]}))
            .await
            .problem(401, "session_revoked");
        assert_eq!(app.balance(&alice, &a).await.0, 10_000_000 - 5 * part);

        // a session first found revoked by a large transfer moves nothing small after it
        let carol = app.token_sid("carol", &["customer"], "s-carol");
        let (c, _) = app.funded_pair(&carol, 10_000_000).await;
        app.introspector.revoked.lock().insert("s-carol".into());
        app.transfer(&carol, &c, &bb, threshold)
            .await
            .problem(401, "session_revoked");
        app.transfer(&carol, &c, &bb, 1)
            .await
            .problem(401, "session_revoked");
        assert_eq!(app.balance(&carol, &c).await.0, 10_000_000);
    })
    .await;
}

#[tokio::test]
async fn large_transfers_need_a_recent_second_factor() {
    use vaultpay_core::step_up::ACR_MFA;
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let (a, bb) = app.funded_pair(&alice, 1_000_000).await;
        let threshold = app.ledger.config().introspection_threshold_minor;
        let pwd = app.token_acr("alice", &["customer"], None, 0);
        app.transfer(&pwd, &a, &bb, threshold - 1).await.expect(201);
        let r = app
            .transfer(&pwd, &a, &bb, threshold)
            .await
            .problem(401, "insufficient_user_authentication");
        let h = r.headers.get("www-authenticate").unwrap().to_str().unwrap();
        assert!(
            h.starts_with("Bearer error=\"insufficient_user_authentication\"")
                && h.ends_with(&format!("acr_values=\"{ACR_MFA}\", max_age=900")),
            "{h}"
        );
        // a second factor older than max_age, or another acr, does not count
        let stale = app.token_acr("alice", &["customer"], Some(ACR_MFA), 901);
        app.transfer(&stale, &a, &bb, threshold)
            .await
            .problem(401, "insufficient_user_authentication");
        let other = app.token_acr("alice", &["customer"], Some("urn:other"), 0);
        app.transfer(&other, &a, &bb, threshold)
            .await
            .problem(401, "insufficient_user_authentication");
        // a batch counts its total
        let item = json!({"from_account_id": a, "to_account_id": bb, "amount": threshold / 2 + 1, "currency": "USD", "description": "b"});
        app.post(
            "/v1/transfers/batch",
            &pwd,
            Some(&key()),
            json!({"transfers": [item.clone(), item]}),
        )
        .await
        .problem(401, "insufficient_user_authentication");
        assert_eq!(
            app.balance(&alice, &a).await.0,
            1_000_000 - (threshold - 1),
            "refused transfers moved nothing"
        );
        let fresh = app.token_acr("alice", &["customer"], Some(ACR_MFA), 880);
        app.transfer(&fresh, &a, &bb, threshold).await.expect(201);
        // money entering or leaving the ledger: the same threshold, for the admin
        let treasury = |path: &'static str, tok: String, amount: i64| {
            let app = &app;
            let a = a.clone();
            async move {
                app.post(
                    path,
                    &tok,
                    Some(&key()),
                    json!({"account_id": a, "amount": amount, "currency": "USD", "reference": "t"}),
                )
                .await
            }
        };
        let admin_pwd = app.token_acr("admin-1", &["admin"], None, 0);
        let admin_mfa = app.token_acr("admin-1", &["admin"], Some(ACR_MFA), 10);
        for path in ["/v1/admin/deposits", "/v1/admin/withdrawals"] {
            treasury(path, admin_pwd.clone(), threshold - 1)
                .await
                .expect(201);
            treasury(path, admin_pwd.clone(), threshold)
                .await
                .problem(401, "insufficient_user_authentication");
            treasury(path, admin_mfa.clone(), threshold)
                .await
                .expect(201);
        }
        // The key is judged before the step-up: a malformed one is 400 (stepping up
        // would not make the request valid), and a key already used for another
        // request is 422, not a demand to step up for a request that cannot run.
        let body = |amount: i64| {
            json!({"from_account_id": a, "to_account_id": bb, "amount": amount, "currency": "USD", "description": "k"})
        };
        app.post("/v1/transfers", &pwd, Some("bad key"), body(threshold))
            .await
            .problem(400, "idempotency_key_invalid");
        let k = key();
        app.post("/v1/transfers", &pwd, Some(&k), body(1))
            .await
            .expect(201);
        app.post("/v1/transfers", &pwd, Some(&k), body(threshold))
            .await
            .problem(422, "idempotency_key_reused");
        // the same request under its key replays, even where a new one needs the step-up
        let k = key();
        app.post("/v1/transfers", &fresh, Some(&k), body(threshold))
            .await
            .expect(201);
        let r = app
            .post("/v1/transfers", &pwd, Some(&k), body(threshold))
            .await
            .expect(201);
        assert_eq!(
            r.headers.get("idempotent-replayed").map(|v| v.to_str().unwrap()),
            Some("true")
        );
    })
    .await;

    // switched off: the live session is enough
    each_backend(|b| async move {
        let cfg = vaultpay_ledger::LedgerConfig {
            step_up_large_transfers: false,
            ..Default::default()
        };
        let app = TestApp::with_config(b, cfg).await;
        let alice = app.customer("alice");
        let (a, bb) = app.funded_pair(&alice, 1_000_000).await;
        let pwd = app.token_acr("alice", &["customer"], None, 0);
        app.transfer(&pwd, &a, &bb, 500_000).await.expect(201);
    })
    .await;
}

/// A refused deposit or withdrawal writes nothing, not even the settlement account of
/// a currency that has none yet.
#[tokio::test]
async fn refused_treasury_moves_create_no_settlement_account() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let admin = app.admin();
        let eur = app.open(&alice, "EUR").await;
        let settlements = || async {
            let r = sqlx::query(
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM accounts \
                 WHERE kind = 'settlement' AND currency = 'EUR'",
            )
            .fetch_one(app.db.read())
            .await
            .unwrap();
            sqlx::Row::get::<i64, _>(&r, "n")
        };
        // a withdrawal beyond the balance
        app.post(
            "/v1/admin/withdrawals",
            &admin,
            Some(&key()),
            json!({"account_id": eur, "amount": 5, "currency": "EUR", "reference": "x"}),
        )
        .await
        .problem(422, "insufficient_funds");
        // a deposit into a frozen account
        app.post(
            &format!("/v1/admin/accounts/{eur}/freeze"),
            &admin,
            None,
            json!({"reason": "kyc"}),
        )
        .await
        .expect(200);
        app.deposit(&eur, 100, "EUR")
            .await
            .problem(409, "account_frozen");
        assert_eq!(settlements().await, 0, "no EUR settlement account yet");
        app.post(
            &format!("/v1/admin/accounts/{eur}/unfreeze"),
            &admin,
            None,
            json!({"reason": "ok"}),
        )
        .await
        .expect(200);
        app.deposit(&eur, 100, "EUR").await.expect(201);
        assert_eq!(settlements().await, 1);
        app.assert_consistent().await;
    })
    .await;
}

/// A refused staff request (freeze, deposit, a staff read, another user's accounts) is
/// in the ledger's audit log: who was refused which permission. Hammering a staff
/// route does not become a write per request: at most `DenialLog::PER_ACTOR` entries
/// per actor per minute reach the chain, which still verifies.
#[tokio::test]
async fn refused_staff_requests_are_audited_at_a_bounded_rate() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let mallory = app.customer("mallory");
        let admin = app.admin();
        let (a, _) = app.funded_pair(&app.customer("alice"), 100).await;
        let started = std::time::Instant::now();
        app.post(
            &format!("/v1/admin/accounts/{a}/freeze"),
            &mallory,
            None,
            json!({"reason": "x"}),
        )
        .await
        .problem(403, "forbidden");
        app.post(
            "/v1/admin/deposits",
            &mallory,
            Some(&key()),
            json!({"account_id": a, "amount": 5, "currency": "USD", "reference": "x"}),
        )
        .await
        .problem(403, "forbidden");
        app.get("/v1/admin/failed-transfers", &mallory)
            .await
            .problem(403, "forbidden");
        app.get("/v1/accounts?owner_id=alice", &mallory)
            .await
            .problem(403, "forbidden");

        let denials = |log: &serde_json::Value| -> Vec<String> {
            log["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["action"] == "ledger.access.denied")
                .map(|e| {
                    assert_eq!(e["actor"], "mallory", "{e}");
                    assert_eq!(e["metadata"]["permission"], e["resource"], "{e}");
                    e["resource"].as_str().unwrap().to_owned()
                })
                .collect()
        };
        let log = app
            .get("/v1/admin/ledger/audit?limit=200", &admin)
            .await
            .expect(200);
        let mut seen = denials(&log.body);
        seen.sort();
        assert_eq!(
            seen,
            [
                "accounts:manage",
                "accounts:read",
                "audit:read",
                "treasury:move"
            ]
        );

        // 20 more: the chain takes at most PER_ACTOR a minute from one actor
        for _ in 0..20 {
            app.get("/v1/admin/ledger/audit", &mallory)
                .await
                .problem(403, "forbidden");
        }
        let per_actor = u64::from(vaultpay_store::audit::DenialLog::PER_ACTOR);
        // after the first PER_ACTOR, one more per 60 s / PER_ACTOR
        let refilled = started.elapsed().as_secs() * per_actor / 60 + 1;
        let log = app
            .get("/v1/admin/ledger/audit?limit=200", &admin)
            .await
            .expect(200);
        let n = denials(&log.body).len() as u64;
        assert!(n >= per_actor, "{n} entries");
        assert!(n <= per_actor + refilled, "{n} entries");
        assert!(n < 24, "every refusal was written ({n})");
        app.assert_consistent().await;
    })
    .await;
}

/// Unfreezing and closing an account need the admin's recent second factor; freezing
/// does not (an incident must be able to stop money at once). A refused unfreeze
/// changes nothing.
#[tokio::test]
async fn unfreeze_and_close_need_a_recent_second_factor_and_freeze_does_not() {
    use vaultpay_core::step_up::ACR_MFA;
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let a = app.open(&app.customer("alice"), "USD").await;
        let pwd = app.token_acr("admin-1", &["admin"], None, 0);
        let stale = app.token_acr("admin-1", &["admin"], Some(ACR_MFA), 901);
        let mfa = app.token_acr("admin-1", &["admin"], Some(ACR_MFA), 10);
        let act = |what: &'static str, tok: String| {
            let (app, a) = (&app, a.clone());
            async move {
                app.post(
                    &format!("/v1/admin/accounts/{a}/{what}"),
                    &tok,
                    None,
                    json!({"reason": "kyc"}),
                )
                .await
            }
        };
        act("freeze", pwd.clone()).await.expect(200);
        for tok in [pwd.clone(), stale.clone()] {
            act("unfreeze", tok)
                .await
                .problem(401, "insufficient_user_authentication");
        }
        let still = app
            .get(&format!("/v1/accounts/{a}"), &mfa)
            .await
            .expect(200);
        assert_eq!(still.body["status"], "frozen");
        act("unfreeze", mfa.clone()).await.expect(200);
        act("close", pwd)
            .await
            .problem(401, "insufficient_user_authentication");
        let closed = act("close", mfa).await.expect(200);
        assert_eq!(closed.body["status"], "closed");
    })
    .await;
}

/// Ledger migration 0014 splits the failed posts and voids an earlier version recorded
/// (`post_hold:<hold id>`) into `operation` and `transfer_id`, and leaves other rows as
/// they are: the migration run again on a database put back as it was before it.
#[tokio::test]
async fn migration_0014_splits_old_failed_hold_operations() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let admin = app.admin();
        for sql in [
            "ALTER TABLE failed_transfers DROP COLUMN transfer_id",
            "DELETE FROM schema_migrations WHERE version = 14",
            "INSERT INTO failed_transfers (id, user_id, operation, reason, detail, created_at) VALUES \
             ('f1', 'alice', 'post_hold:0190-hold-a', 'hold_not_pending', 'x', 1), \
             ('f2', 'alice', 'void_hold:0190-hold-b', 'hold_expired', 'x', 2), \
             ('f3', 'alice', 'transfer', 'insufficient_funds', 'x', 3)",
        ] {
            sqlx::raw_sql(sql).execute(app.db.writer()).await.unwrap();
        }
        assert_eq!(app.db.migrate().await.unwrap(), 1);
        let list = app
            .get("/v1/admin/failed-transfers?user_id=alice", &admin)
            .await
            .expect(200);
        let mut rows: Vec<(String, String, String)> = list.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["id"].as_str().unwrap().to_owned(),
                    f["operation"].as_str().unwrap().to_owned(),
                    f["transfer_id"].as_str().unwrap_or("-").to_owned(),
                )
            })
            .collect();
        rows.sort();
        let want = [
            ("f1", "post_hold", "0190-hold-a"),
            ("f2", "void_hold", "0190-hold-b"),
            ("f3", "transfer", "-"),
        ]
        .map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()));
        assert_eq!(rows, want, "{}", list.text);
    })
    .await;
}
