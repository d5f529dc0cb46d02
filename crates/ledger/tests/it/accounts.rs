use crate::common::*;
use axum::http::Method;
use serde_json::json;

#[tokio::test]
async fn open_list_get_with_masking_and_no_existence_leak() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let bob = app.customer("bob");
        let support = app.token("sup-1", &["support"]);

        let r = app
            .post(
                "/v1/accounts",
                &alice,
                None,
                json!({"currency": "USD", "kind": "savings", "name": "Rainy day"}),
            )
            .await
            .expect(201);
        let id = r.id();
        let number = r.body["number"].as_str().unwrap().to_owned();
        assert!(vaultpay_core::account_number::is_valid(&number), "{number}");
        assert_eq!(r.body["status"], "active");
        assert_eq!(r.body["balance"], 0);
        assert_eq!(r.body["available_balance"], 0);
        assert_eq!(r.body["currency"], "USD");
        assert_eq!(r.body["kind"], "savings");

        // JPY and KWD exist too.
        app.open(&alice, "JPY").await;
        app.open(&alice, "KWD").await;

        let list = app.get("/v1/accounts", &alice).await.expect(200);
        assert_eq!(list.body["items"].as_array().unwrap().len(), 3);
        // pagination
        let p1 = app.get("/v1/accounts?limit=2", &alice).await.expect(200);
        assert_eq!(p1.body["items"].as_array().unwrap().len(), 2);
        let cur = p1.body["next_cursor"].as_str().unwrap().to_owned();
        let p2 = app
            .get(&format!("/v1/accounts?limit=2&cursor={cur}"), &alice)
            .await
            .expect(200);
        assert_eq!(p2.body["items"].as_array().unwrap().len(), 1);
        assert!(p2.body["next_cursor"].is_null());

        // owner sees the full number; support sees it masked; bob gets 404.
        let own = app
            .get(&format!("/v1/accounts/{id}"), &alice)
            .await
            .expect(200);
        assert_eq!(own.body["number"], number.as_str());
        let s = app
            .get(&format!("/v1/accounts/{id}"), &support)
            .await
            .expect(200);
        assert_eq!(
            s.body["number"].as_str().unwrap(),
            vaultpay_core::account_number::mask(&number)
        );
        app.get(&format!("/v1/accounts/{id}"), &bob)
            .await
            .problem(404, "account_not_found");
        app.get("/v1/accounts/does-not-exist", &bob)
            .await
            .problem(404, "account_not_found");
        assert_eq!(
            app.get("/v1/accounts", &bob).await.expect(200).body["items"]
                .as_array()
                .unwrap()
                .len(),
            0
        );
        // bob cannot list alice's accounts by owner id; support can.
        app.get("/v1/accounts?owner_id=alice", &bob)
            .await
            .problem(403, "forbidden");
        assert_eq!(
            app.get("/v1/accounts?owner_id=alice", &support)
                .await
                .expect(200)
                .body["items"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
    })
    .await;
}

/// A customer asking for someone else's account gets the same 404 as for an id that
/// does not exist, but the probe is in the ledger's audit log (who asked for which
/// account); an id that does not exist leaves nothing there.
#[tokio::test]
async fn reads_of_someone_elses_account_are_audited() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let bob = app.customer("bob");
        let admin = app.admin();
        let id = app.open(&alice, "USD").await;
        // the missing id first: an entry it made would be seen below
        let missing = app
            .get("/v1/accounts/01a252d0-0000-7000-8000-000000000000", &bob)
            .await
            .problem(404, "account_not_found");
        let theirs = app
            .get(&format!("/v1/accounts/{id}"), &bob)
            .await
            .problem(404, "account_not_found");
        for member in ["type", "title", "status", "code", "detail"] {
            assert_eq!(theirs.body[member], missing.body[member], "{member}");
        }
        app.get(&format!("/v1/accounts/{id}/transactions"), &bob)
            .await
            .problem(404, "account_not_found");
        // written off the request path: wait for both entries
        let probes = || async {
            let log = app
                .get("/v1/admin/ledger/audit?limit=200", &admin)
                .await
                .expect(200);
            log.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["action"] == "ledger.access.denied")
                .cloned()
                .collect::<Vec<_>>()
        };
        let mut seen = Vec::new();
        for _ in 0..200 {
            seen = probes().await;
            if seen.len() >= 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        for e in &seen {
            assert_eq!(e["actor"], "bob", "{e}");
            assert_eq!(e["resource"], id.as_str(), "{e}");
            assert_eq!(e["outcome"], "failure", "{e}");
            assert_eq!(e["metadata"]["permission"], "accounts:read", "{e}");
        }
        app.assert_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn bad_input_is_never_a_500() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        app.post(
            "/v1/accounts",
            &alice,
            None,
            json!({"currency": "XYZ", "kind": "current", "name": "x"}),
        )
        .await
        .problem(422, "currency_unknown");
        app.post(
            "/v1/accounts",
            &alice,
            None,
            json!({"currency": "USD", "kind": "current", "name": "  "}),
        )
        .await
        .problem(422, "invalid_request");
        app.post(
            "/v1/accounts",
            &alice,
            None,
            json!({"currency": "USD", "kind": "settlement", "name": "x"}),
        )
        .await
        .problem(422, "invalid_request");
        let r = app
            .post(
                "/v1/accounts",
                &alice,
                None,
                json!({"currency": "USD", "kind": "current", "name": "x", "extra": 1}),
            )
            .await;
        assert!(r.status.is_client_error());
        let r = app
            .raw(
                Method::POST,
                "/v1/accounts",
                Some(&alice),
                None,
                Some("{not json".into()),
            )
            .await;
        assert_eq!(r.status.as_u16(), 400);
        // no token / bad token
        app.raw(Method::GET, "/v1/accounts", None, None, None)
            .await
            .problem(401, "missing_token");
        app.raw(Method::GET, "/v1/accounts", Some("abc.def.ghi"), None, None)
            .await
            .problem(401, "invalid_token");
        // a role without accounts:own cannot open wallets
        let sup = app.token("sup", &["support"]);
        app.post(
            "/v1/accounts",
            &sup,
            None,
            json!({"currency": "USD", "kind": "current", "name": "x"}),
        )
        .await
        .problem(403, "forbidden");
        // bad query parameters
        let id = app.open(&alice, "USD").await;
        app.get(
            &format!("/v1/accounts/{id}/transactions?from=yesterday"),
            &alice,
        )
        .await
        .problem(400, "invalid_query");
        app.get(
            &format!("/v1/accounts/{id}/transactions?cursor=abc"),
            &alice,
        )
        .await
        .problem(400, "invalid_cursor");
        app.get(&format!("/v1/accounts/{id}/transactions?limit=x"), &alice)
            .await
            .problem(400, "invalid_query");
        // a page of no or fewer than no entries is refused, on every paged list; one
        // over the server's maximum is capped to it
        let admin = app.admin();
        for (path, token) in [
            (format!("/v1/accounts/{id}/transactions"), &alice),
            ("/v1/accounts".to_owned(), &alice),
            ("/v1/admin/failed-transfers".to_owned(), &admin),
            ("/v1/admin/ledger/audit".to_owned(), &admin),
        ] {
            for bad in ["0", "-1"] {
                app.get(&format!("{path}?limit={bad}"), token)
                    .await
                    .problem(400, "invalid_query");
            }
            app.get(&format!("{path}?limit=100000"), token)
                .await
                .expect(200);
            // a cursor the server did not give is refused, not read as the start
            app.get(&format!("{path}?cursor=zzz"), token)
                .await
                .problem(400, "invalid_cursor");
        }
    })
    .await;
}

#[tokio::test]
async fn deposits_and_withdrawals_go_through_settlement() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let admin = app.admin();
        let acct = app.open(&alice, "USD").await;

        let d = app.deposit(&acct, 10_000, "USD").await.expect(201);
        assert_eq!(d.body["kind"], "deposit");
        assert_eq!(d.body["to_account_id"], acct.as_str());
        let settlement = d.body["from_account_id"].as_str().unwrap().to_owned();
        assert_eq!(app.balance(&alice, &acct).await, (10_000, 10_000));
        let s = app.get(&format!("/v1/accounts/{settlement}"), &admin).await.expect(200);
        assert_eq!(s.body["kind"], "settlement");
        assert_eq!(s.body["balance"], -10_000);
        // the same settlement account is reused
        let d2 = app.deposit(&acct, 5, "USD").await.expect(201);
        assert_eq!(d2.body["from_account_id"], settlement.as_str());

        let w = app
            .post("/v1/admin/withdrawals", &admin, Some(&key()), json!({"account_id": acct, "amount": 2_005, "currency": "USD", "reference": "payout"}))
            .await
            .expect(201);
        assert_eq!(w.body["kind"], "withdrawal");
        assert_eq!(app.balance(&alice, &acct).await, (8_000, 8_000));
        let r = app
            .post("/v1/admin/withdrawals", &admin, Some(&key()), json!({"account_id": acct, "amount": 8_001, "currency": "USD", "reference": "x"}))
            .await
            .problem(422, "insufficient_funds");
        assert_eq!(r.body["available"], 8_000);
        assert_eq!(r.body["requested"], 8_001);

        // treasury needs the admin role and an idempotency key
        app.post("/v1/admin/deposits", &alice, Some(&key()), json!({"account_id": acct, "amount": 1, "currency": "USD", "reference": ""}))
            .await
            .problem(403, "forbidden");
        app.post("/v1/admin/deposits", &admin, None, json!({"account_id": acct, "amount": 1, "currency": "USD", "reference": ""}))
            .await
            .problem(400, "idempotency_key_required");
        app.deposit(&acct, 1, "EUR").await.problem(422, "currency_mismatch");
        app.deposit("nope", 1, "USD").await.problem(404, "account_not_found");
        app.deposit(&acct, 0, "USD").await.problem(422, "amount_invalid");
        app.deposit(&acct, 1, "ZZZ").await.problem(422, "currency_unknown");
        app.deposit(&settlement, 1, "USD").await.problem(409, "settlement_account");
        app.assert_consistent().await;
    })
    .await;
}

/// A staff read of a customer's accounts (the account, its history, its statement,
/// the customer's list) is confirmed live with AuthShield: once the agent's support
/// role is revoked, or their session ends, the next read is refused, while the token
/// would still verify for minutes. The owner's reads of their own accounts ask
/// AuthShield nothing.
#[tokio::test]
async fn staff_reads_of_customer_accounts_are_checked_live() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let a = app.open(&alice, "USD").await;
        let reads = [
            format!("/v1/accounts/{a}"),
            format!("/v1/accounts/{a}/transactions"),
            format!("/v1/accounts/{a}/statement.csv"),
            "/v1/accounts?owner_id=alice".to_owned(),
        ];
        // the owner: no introspection
        let calls = *app.introspector.calls.lock();
        for path in &reads[..3] {
            app.get(path, &alice).await.expect(200);
        }
        assert_eq!(*app.introspector.calls.lock(), calls);
        // support, live: every read is confirmed
        let support = app.token("agent-1", &["support"]);
        for path in &reads {
            app.get(path, &support).await.expect(200);
        }
        assert_eq!(*app.introspector.calls.lock(), calls + reads.len() as u64);
        // the role revoked: refused at once with the same token
        app.introspector.demoted.lock().insert("agent-1".into());
        for path in &reads {
            app.get(path, &support).await.problem(403, "forbidden");
        }
        // another agent whose session ended: refused as such
        let other = app.token("agent-2", &["support"]);
        app.get(&reads[0], &other).await.expect(200);
        app.introspector.revoked.lock().insert("sid-agent-2".into());
        for path in &reads {
            app.get(path, &other).await.problem(401, "session_revoked");
        }
        // the owner is unaffected
        app.get(&reads[0], &alice).await.expect(200);
    })
    .await;
}
