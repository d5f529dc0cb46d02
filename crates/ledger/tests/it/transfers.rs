use crate::common::*;
use serde_json::json;
use vaultpay_ledger::LedgerConfig;

#[tokio::test]
async fn transfer_moves_money_with_double_entry() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, bob, a, bb) = app.alice_and_bob(10_000).await;

        let t = app.transfer(&alice, &a, &bb, 2_550).await.expect(201);
        assert_eq!(t.body["status"], "posted");
        assert_eq!(t.body["kind"], "transfer");
        assert_eq!(t.body["amount"], 2_550);
        assert_eq!(t.body["pending"], false);
        assert_eq!(app.balance(&alice, &a).await, (7_450, 7_450));
        assert_eq!(app.balance(&bob, &bb).await, (2_550, 2_550));

        // both parties can read the transfer; a stranger cannot
        let tid = t.id();
        app.get(&format!("/v1/transfers/{tid}"), &alice)
            .await
            .expect(200);
        app.get(&format!("/v1/transfers/{tid}"), &bob)
            .await
            .expect(200);
        let hidden = app
            .get(&format!("/v1/transfers/{tid}"), &app.customer("eve"))
            .await
            .problem(404, "transfer_not_found");
        // ... answered like a transfer that does not exist
        let missing = app
            .get(
                "/v1/transfers/0190c0de-0000-7000-8000-000000000000",
                &app.customer("eve"),
            )
            .await
            .problem(404, "transfer_not_found");
        assert_eq!(hidden.body["detail"], missing.body["detail"]);
        // a settlement account's owner (none) matches nobody: deposits stay the payee's
        let dep = app.deposit(&a, 1, "USD").await.expect(201).id();
        app.get(&format!("/v1/transfers/{dep}"), &alice)
            .await
            .expect(200);
        app.get(&format!("/v1/transfers/{dep}"), &bob)
            .await
            .problem(404, "transfer_not_found");
        app.get(
            &format!("/v1/transfers/{tid}"),
            &app.token("c", &["compliance"]),
        )
        .await
        .expect(200);

        // audit entry and outbox event were written with it
        let audit = app
            .get("/v1/admin/ledger/audit", &app.admin())
            .await
            .expect(200);
        assert!(audit.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "ledger.transfer.posted" && e["resource"] == tid.as_str()));
        let mut events = app.ledger.subscribe();
        assert!(app.ledger.relay_outbox().await.unwrap() >= 3);
        let mut topics = Vec::new();
        while let Ok(ev) = events.try_recv() {
            topics.push(ev.topic);
        }
        assert!(
            topics.iter().any(|t| t == "ledger.transfer.posted"),
            "{topics:?}"
        );
        assert_eq!(app.ledger.relay_outbox().await.unwrap(), 0);
        app.assert_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn every_failure_has_its_code_and_is_recorded() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let bob = app.customer("bob");
        let admin = app.admin();
        let a = app.open(&alice, "USD").await;
        let a2 = app.open(&alice, "USD").await;
        let e = app.open(&alice, "EUR").await;
        let bb = app.open(&bob, "USD").await;
        app.deposit(&a, 1_000, "USD").await.expect(201);

        let r = app
            .transfer(&alice, &a, &bb, 1_001)
            .await
            .problem(422, "insufficient_funds");
        assert_eq!(r.body["available"], 1_000);
        assert_eq!(r.body["requested"], 1_001);
        app.transfer(&alice, &a, &bb, 0)
            .await
            .problem(422, "amount_invalid");
        app.transfer(&alice, &a, &bb, -5)
            .await
            .problem(422, "amount_invalid");
        app.transfer(&alice, &a, &bb, 2_000_000_000_000_000)
            .await
            .problem(422, "amount_invalid");
        app.transfer(&alice, &a, &a, 1)
            .await
            .problem(422, "same_account");
        app.transfer(&alice, &a, &e, 1)
            .await
            .problem(422, "currency_mismatch");
        app.transfer(&alice, &a, "missing", 1)
            .await
            .problem(404, "account_not_found");
        app.transfer(&alice, "missing", &bb, 1)
            .await
            .problem(404, "account_not_found");
        // IDOR: bob cannot move alice's money and cannot tell her account exists
        app.transfer(&bob, &a, &bb, 1)
            .await
            .problem(404, "account_not_found");
        // staff can see the account, but it is not theirs to move
        app.transfer(&admin, &a, &bb, 1)
            .await
            .problem(403, "not_account_owner");
        let r = app
            .post(
                "/v1/transfers",
                &alice,
                Some(&key()),
                json!({"from_account_id": a, "to_account_id": bb, "amount": 1, "currency": "EUR"}),
            )
            .await
            .problem(422, "currency_mismatch");
        assert_eq!(r.body["account_currency"], "USD");
        // a code that is no currency at all is named as such, as on opening an account;
        // a control character in the description is named as such
        for (currency, description, code, says) in [
            ("usd", "", "currency_unknown", "usd"),
            ("XYZ", "", "currency_unknown", "XYZ"),
            ("USD", "two\nlines", "invalid_request", "control characters"),
        ] {
            let r = app
                .post(
                    "/v1/transfers",
                    &alice,
                    Some(&key()),
                    json!({"from_account_id": a, "to_account_id": bb, "amount": 1,
                        "currency": currency, "description": description}),
                )
                .await
                .problem(422, code);
            assert!(
                r.body["detail"].as_str().unwrap().contains(says),
                "{}",
                r.text
            );
        }
        // an amount too large for an integer is named in JSON's terms
        let r = app
            .post(
                "/v1/transfers",
                &alice,
                Some(&key()),
                json!({"from_account_id": a, "to_account_id": bb, "amount": 1e20, "currency": "USD"}),
            )
            .await
            .problem(422, "invalid_request");
        let detail = r.body["detail"].as_str().unwrap();
        assert!(
            detail.starts_with("amount: ")
                && detail.contains("expected a whole number between")
                && !detail.contains("i64"),
            "{detail}"
        );
        // frozen / closed
        app.post(
            &format!("/v1/admin/accounts/{bb}/freeze"),
            &admin,
            None,
            json!({"reason": "fraud check"}),
        )
        .await
        .expect(200);
        app.transfer(&alice, &a, &bb, 1)
            .await
            .problem(409, "account_frozen");
        app.post(
            &format!("/v1/admin/accounts/{a2}/close"),
            &admin,
            None,
            json!({"reason": "customer request"}),
        )
        .await
        .expect(200);
        app.transfer(&alice, &a, &a2, 1)
            .await
            .problem(409, "account_closed");
        // missing key
        app.post(
            "/v1/transfers",
            &alice,
            None,
            json!({"from_account_id": a, "to_account_id": bb, "amount": 1, "currency": "USD"}),
        )
        .await
        .problem(400, "idempotency_key_required");
        app.post(
            "/v1/transfers",
            &alice,
            Some(&"x".repeat(300)),
            json!({"from_account_id": a, "to_account_id": bb, "amount": 1, "currency": "USD"}),
        )
        .await
        .problem(400, "idempotency_key_invalid");

        // nothing moved
        assert_eq!(app.balance(&alice, &a).await, (1_000, 1_000));
        // failed transfers are listed for compliance, with their reasons
        let c = app.token("comp", &["compliance"]);
        let list = app
            .get("/v1/admin/failed-transfers?limit=100", &c)
            .await
            .expect(200);
        let reasons: Vec<&str> = list.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["reason"].as_str().unwrap())
            .collect();
        for code in [
            "insufficient_funds",
            "amount_invalid",
            "same_account",
            "currency_mismatch",
            "account_not_found",
            "not_account_owner",
            "account_frozen",
            "account_closed",
        ] {
            assert!(reasons.contains(&code), "{code} missing from {reasons:?}");
        }
        let p = app
            .get("/v1/admin/failed-transfers?limit=2", &c)
            .await
            .expect(200);
        let cur = p.body["next_cursor"].as_str().unwrap().to_owned();
        let p2 = app
            .get(
                &format!("/v1/admin/failed-transfers?limit=2&cursor={cur}"),
                &c,
            )
            .await
            .expect(200);
        assert_ne!(p.body["items"][0]["id"], p2.body["items"][0]["id"]);
        // one user's attempts: bob's refused try at alice's account, none of alice's
        let bobs = app
            .get("/v1/admin/failed-transfers?user_id=bob&limit=100", &c)
            .await
            .expect(200);
        let bobs = bobs.body["items"].as_array().unwrap().clone();
        assert_eq!(bobs.len(), 1, "{bobs:?}");
        assert_eq!(bobs[0]["user_id"], "bob");
        assert_eq!(bobs[0]["reason"], "account_not_found");
        let alices = app
            .get("/v1/admin/failed-transfers?user_id=alice&limit=2", &c)
            .await
            .expect(200);
        let cur = alices.body["next_cursor"].as_str().unwrap().to_owned();
        let rest = app
            .get(
                &format!("/v1/admin/failed-transfers?user_id=alice&limit=100&cursor={cur}"),
                &c,
            )
            .await
            .expect(200);
        let alices: Vec<&serde_json::Value> = alices.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .chain(rest.body["items"].as_array().unwrap())
            .collect();
        assert!(alices.iter().all(|f| f["user_id"] == "alice"), "{alices:?}");
        // every failure but bob's and the admin's, each once
        assert_eq!(alices.len(), list.body["items"].as_array().unwrap().len() - 2);
        let none = app
            .get("/v1/admin/failed-transfers?user_id=nobody", &c)
            .await
            .expect(200);
        assert_eq!(none.body["items"], json!([]));
        // a parameter this list does not have is refused, not ignored
        app.get("/v1/admin/failed-transfers?owner_id=bob", &c)
            .await
            .problem(400, "invalid_query");
        app.get("/v1/admin/failed-transfers", &alice)
            .await
            .problem(403, "forbidden");
        app.get("/v1/admin/failed-transfers", &app.token("s", &["support"]))
            .await
            .problem(403, "forbidden");
        app.assert_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn history_has_running_balance_pagination_time_filters_and_csv() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, bob, a, bb) = app.alice_and_bob(10_000).await;
        for amount in [100, 200, 300] {
            app.transfer(&alice, &a, &bb, amount).await.expect(201);
        }
        let mid = rfc(vaultpay_core::time::now_micros());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        app.transfer(&bob, &bb, &a, 50).await.expect(201);

        let all = app
            .get(&format!("/v1/accounts/{a}/transactions"), &alice)
            .await
            .expect(200);
        let items = all.body["items"].as_array().unwrap();
        assert_eq!(items.len(), 5);
        // newest first, with running balances
        let balances: Vec<i64> = items
            .iter()
            .map(|i| i["balance_after"].as_i64().unwrap())
            .collect();
        assert_eq!(balances, vec![9_450, 9_400, 9_700, 9_900, 10_000]);
        let amounts: Vec<i64> = items
            .iter()
            .map(|i| i["amount"].as_i64().unwrap())
            .collect();
        assert_eq!(amounts, vec![50, -300, -200, -100, 10_000]);
        assert_eq!(items[0]["counterparty_account_id"], bb.as_str());

        // cursor pagination
        let p1 = app
            .get(&format!("/v1/accounts/{a}/transactions?limit=2"), &alice)
            .await
            .expect(200);
        assert_eq!(p1.body["items"].as_array().unwrap().len(), 2);
        let mut seen = 2;
        let mut cursor = p1.body["next_cursor"].as_str().map(str::to_owned);
        while let Some(c) = cursor {
            let p = app
                .get(
                    &format!("/v1/accounts/{a}/transactions?limit=2&cursor={c}"),
                    &alice,
                )
                .await
                .expect(200);
            seen += p.body["items"].as_array().unwrap().len();
            cursor = p.body["next_cursor"].as_str().map(str::to_owned);
        }
        assert_eq!(seen, 5);

        // time filters
        let after = app
            .get(&format!("/v1/accounts/{a}/transactions?from={mid}"), &alice)
            .await
            .expect(200);
        assert_eq!(after.body["items"].as_array().unwrap().len(), 1);
        let before = app
            .get(&format!("/v1/accounts/{a}/transactions?to={mid}"), &alice)
            .await
            .expect(200);
        assert_eq!(before.body["items"].as_array().unwrap().len(), 4);

        // CSV statement, oldest first, in major units
        let csv = app
            .get(&format!("/v1/accounts/{a}/statement.csv"), &alice)
            .await
            .expect(200);
        assert!(csv.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv"));
        let lines: Vec<&str> = csv.text.lines().collect();
        assert_eq!(lines.len(), 6);
        assert!(lines[0].starts_with("date,"));
        assert!(lines[1].ends_with(",100.00,100.00,USD"), "{}", lines[1]);
        assert!(lines[5].ends_with(",0.50,94.50,USD"), "{}", lines[5]);
        // a statement is the whole period: it takes no cursor or limit
        for q in ["limit=1", "cursor=x"] {
            app.get(&format!("/v1/accounts/{a}/statement.csv?{q}"), &alice)
                .await
                .problem(400, "invalid_query");
        }

        // IDOR on history
        app.get(&format!("/v1/accounts/{a}/transactions"), &bob)
            .await
            .problem(404, "account_not_found");
        app.get(&format!("/v1/accounts/{a}/statement.csv"), &bob)
            .await
            .problem(404, "account_not_found");
        app.assert_consistent().await;
    })
    .await;
}

/// (seq, created_at) of an account's postings, in sequence order.
async fn posting_times(app: &TestApp, account: &str) -> Vec<(i64, i64)> {
    use sqlx::Row;
    sqlx::query(
        "SELECT account_seq, created_at FROM postings WHERE account_id = $1 ORDER BY account_seq",
    )
    .bind(account)
    .fetch_all(app.db.read())
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1)))
    .collect()
}

/// The sequence numbers an account's history lists for `query` (newest first).
async fn window(app: &TestApp, token: &str, account: &str, query: &str) -> Vec<i64> {
    let r = app
        .get(
            &format!("/v1/accounts/{account}/transactions?limit=100&{query}"),
            token,
        )
        .await
        .expect(200);
    r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["seq"].as_i64().unwrap())
        .collect()
}

/// `micros` as RFC 3339, escaped for a query string.
fn rfc(micros: i64) -> String {
    vaultpay_core::time::rfc3339(micros)
        .replace(':', "%3A")
        .replace('+', "%2B")
}

/// History time windows are sequence ranges found by binary search (no index on time):
/// every window, with bounds on, between and beyond posting times, returns exactly the
/// postings a scan would, on histories with runs of equal times (batches).
#[tokio::test]
async fn history_time_windows_match_a_scan() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let (a, bb) = app.funded_pair(&alice, 1_000_000).await;
        for round in 0..4 {
            for amount in 1..=4 {
                app.transfer(&alice, &a, &bb, amount).await.expect(201);
            }
            let items: Vec<_> = (0..3 + round)
                .map(|_| json!({"from_account_id": a, "to_account_id": bb, "amount": 7, "currency": "USD"}))
                .collect();
            app.post("/v1/transfers/batch", &alice, Some(&key()), json!({ "transfers": items }))
                .await
                .expect(200);
        }
        let times = posting_times(&app, &a).await;
        assert_eq!(times.len(), 1 + 4 * 4 + 3 + 4 + 5 + 6);
        let mut bounds: Vec<i64> = times.iter().flat_map(|&(_, t)| [t - 1, t, t + 1]).collect();
        bounds.extend([0, i64::from(i32::MAX) * 1_000_000]);
        bounds.sort_unstable();
        bounds.dedup();
        let step = (bounds.len() / 9).max(1);
        let picks: Vec<i64> = bounds.iter().copied().step_by(step).collect();
        for &from in &picks {
            for &to in picks.iter().filter(|&&t| t > from) {
                for (query, lo, hi) in [
                    (format!("from={}&to={}", rfc(from), rfc(to)), from, to),
                    (format!("from={}", rfc(from)), from, i64::MAX),
                    (format!("to={}", rfc(to)), i64::MIN, to),
                ] {
                    let got = window(&app, &alice, &a, &query).await;
                    let want: Vec<i64> = times
                        .iter()
                        .rev()
                        .filter(|&&(_, t)| t >= lo && t < hi)
                        .map(|&(s, _)| s)
                        .collect();
                    assert_eq!(got, want, "{b:?} {query}");
                }
            }
        }
        app.assert_consistent().await;

        // The window is a sequence range, not a scan with a time filter: a first
        // posting stamped (out of order) with the last posting's time is outside the
        // range the search finds for that time, so it is not listed.
        let (last_seq, last_at) = *times.last().unwrap();
        app.unguard_postings().await;
        sqlx::query("UPDATE postings SET created_at = $1 WHERE account_id = $2 AND account_seq = 1")
            .bind(last_at)
            .bind(&a)
            .execute(app.db.writer())
            .await
            .unwrap();
        let got = window(&app, &alice, &a, &format!("from={}", rfc(last_at))).await;
        let want: Vec<i64> = times
            .iter()
            .rev()
            .filter(|&&(s, t)| t == last_at && s != 1)
            .map(|&(s, _)| s)
            .collect();
        assert_eq!(got, want, "{b:?}");
        assert!(got.contains(&last_seq) && !got.contains(&1));
    })
    .await;
}

/// A clock that has gone back does not put an account's postings out of time order:
/// a new posting takes the time of the account's last one instead, on every write path
/// (a deposit, a single transfer, a batch), and the time window still finds it.
#[tokio::test]
async fn postings_stay_in_time_order_when_the_clock_goes_back() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let (a, bb) = app.funded_pair(&alice, 10_000).await;
        // As if bob's last posting had been written an hour from now.
        let later = vaultpay_core::time::now_micros() + 3_600_000_000;
        sqlx::query("UPDATE accounts SET last_posted_at = $1 WHERE id = $2")
            .bind(later)
            .bind(&bb)
            .execute(app.db.writer())
            .await
            .unwrap();
        app.deposit(&bb, 500, "USD").await.expect(201);
        app.transfer(&alice, &a, &bb, 100).await.expect(201);
        app.post(
            "/v1/transfers/batch",
            &alice,
            Some(&key()),
            json!({"transfers": [{"from_account_id": a, "to_account_id": bb, "amount": 5, "currency": "USD"}]}),
        )
        .await
        .expect(200);
        let bob_times: Vec<i64> = posting_times(&app, &bb).await.iter().map(|p| p.1).collect();
        assert_eq!(bob_times, [later, later, later]);
        // alice's own postings keep the real time.
        assert!(posting_times(&app, &a).await.iter().all(|p| p.1 < later));
        let bob = app.token("bob", &["customer"]);
        let r = app
            .get(&format!("/v1/accounts/{bb}/transactions?from={}", rfc(later)), &bob)
            .await
            .expect(200);
        assert_eq!(r.body["items"].as_array().unwrap().len(), 3);
        app.assert_consistent().await;

        // And `verify` names an account whose postings are out of time order, or whose
        // last posting time is not its last posting's; or one whose running balance
        // (shown by history and statements) is wrong on a posting before its last, or
        // whose postings' numbers have a gap.
        app.unguard_postings().await;
        for (tamper, undo, invariant) in [
            (
                "UPDATE postings SET created_at = created_at + 1 WHERE account_id = $1 AND account_seq = 1",
                "UPDATE postings SET created_at = created_at - 1 WHERE account_id = $1 AND account_seq = 1",
                "posting_times_ordered",
            ),
            (
                "UPDATE accounts SET last_posted_at = 0 WHERE id = $1",
                "UPDATE accounts SET last_posted_at = (SELECT MAX(created_at) FROM postings WHERE account_id = $1) WHERE id = $1",
                "posting_times_ordered",
            ),
            (
                "UPDATE postings SET balance_after = balance_after + 7 WHERE account_id = $1 AND account_seq = 1",
                "UPDATE postings SET balance_after = balance_after - 7 WHERE account_id = $1 AND account_seq = 1",
                "running_balance_matches",
            ),
            (
                "UPDATE postings SET account_seq = 0 WHERE account_id = $1 AND account_seq = 1",
                "UPDATE postings SET account_seq = 1 WHERE account_id = $1 AND account_seq = 0",
                "running_balance_matches",
            ),
        ] {
            sqlx::query(tamper).bind(&bb).execute(app.db.writer()).await.unwrap();
            assert_eq!(
                app.violations().await,
                [(invariant, bb.clone())],
                "{tamper}"
            );
            sqlx::query(undo).bind(&bb).execute(app.db.writer()).await.unwrap();
            app.assert_consistent().await;
        }
    })
    .await;
}

/// The database itself refuses to rewrite the ledger's history (migration 0011):
/// postings are never changed or removed, transfers never removed and their terms never
/// changed (a hold's expiry included, migration 0013), accounts never removed and their
/// identity never changed. What the service
/// does update (balances, holds, status, times) still can be, and nothing refused
/// changed anything.
#[tokio::test]
async fn the_database_refuses_to_rewrite_ledger_history() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, _bob, a, bb) = app.alice_and_bob(10_000).await;
        app.transfer(&alice, &a, &bb, 2_500).await.expect(201);
        let before = (
            app.scalar("SELECT COUNT(*) FROM postings").await,
            app.scalar("SELECT COUNT(*) FROM transfers").await,
            app.scalar("SELECT COUNT(*) FROM accounts").await,
            app.scalar("SELECT CAST(SUM(amount) AS BIGINT) FROM postings WHERE amount > 0")
                .await,
        );
        let mut refused = vec![
            (
                "UPDATE postings SET amount = amount * 2",
                "postings are append-only",
            ),
            (
                "UPDATE postings SET created_at = created_at",
                "postings are append-only",
            ),
            ("DELETE FROM postings", "postings are append-only"),
            ("DELETE FROM transfers", "transfers are never deleted"),
            (
                "UPDATE transfers SET amount = amount + 1",
                "the terms of a transfer never change",
            ),
            (
                "UPDATE transfers SET to_account_id = from_account_id",
                "the terms of a transfer never change",
            ),
            (
                "UPDATE transfers SET initiated_by = 'mallory'",
                "the terms of a transfer never change",
            ),
            (
                "UPDATE transfers SET expires_at = 4102444800000000",
                "the terms of a transfer never change",
            ),
            (
                "DELETE FROM accounts WHERE kind <> 'settlement'",
                "accounts are closed, never deleted",
            ),
            (
                "UPDATE accounts SET owner_id = 'mallory'",
                "the identity of an account never changes",
            ),
            (
                "UPDATE accounts SET currency = 'EUR'",
                "the identity of an account never changes",
            ),
            (
                "UPDATE accounts SET number = id",
                "the identity of an account never changes",
            ),
        ];
        if b == vaultpay_store::Backend::Postgres {
            refused.extend([
                ("TRUNCATE postings", "postings are append-only"),
                ("TRUNCATE transfers, postings", "never deleted"),
                ("TRUNCATE accounts, transfers, postings", "never deleted"),
            ]);
        }
        for (sql, why) in refused {
            let err = sqlx::raw_sql(sql)
                .execute(app.db.writer())
                .await
                .expect_err(sql)
                .to_string();
            assert!(err.contains(why), "{b:?} {sql}: {err}");
        }
        let after = (
            app.scalar("SELECT COUNT(*) FROM postings").await,
            app.scalar("SELECT COUNT(*) FROM transfers").await,
            app.scalar("SELECT COUNT(*) FROM accounts").await,
            app.scalar("SELECT CAST(SUM(amount) AS BIGINT) FROM postings WHERE amount > 0")
                .await,
        );
        assert_eq!(after, before, "{b:?}");
        // What the service updates is not guarded.
        for sql in [
            "UPDATE accounts SET updated_at = updated_at, status = status, held = held",
            "UPDATE transfers SET updated_at = updated_at, status = status, captured = captured",
        ] {
            sqlx::raw_sql(sql).execute(app.db.writer()).await.unwrap();
        }
        app.assert_consistent().await;
    })
    .await;
}

/// `verify` names rows whose references lead nowhere, written as a restore or a
/// session that bypassed the foreign keys would (SQLite with `foreign_keys` off,
/// PostgreSQL with `session_replication_role = replica`): a voided hold from an
/// account that does not exist, and a pair of postings (summing to zero, so no other
/// check sees them) of a transfer that does not exist.
#[tokio::test]
async fn verify_names_rows_whose_references_lead_nowhere() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (_alice, _bob, a, bb) = app.alice_and_bob(1_000).await;
        app.assert_consistent().await;
        let insert = format!(
            "INSERT INTO transfers (id, kind, from_account_id, to_account_id, amount, captured, currency, \
             description, status, expires_at, initiated_by, batch_id, created_at, updated_at) \
             VALUES ('t-orphan', 'hold', 'no-such-account', '{bb}', 5, 0, 'USD', 'x', 'voided', NULL, 'u', NULL, 1, 1);"
        );
        let (bypass, restore) = match b {
            vaultpay_store::Backend::Sqlite => (
                "PRAGMA foreign_keys = OFF;".to_owned(),
                "PRAGMA foreign_keys = ON;",
            ),
            vaultpay_store::Backend::Postgres => (
                "BEGIN; SET LOCAL session_replication_role = replica;".to_owned(),
                "COMMIT;",
            ),
        };
        sqlx::raw_sql(&format!("{bypass} {insert} {restore}"))
            .execute(app.db.writer())
            .await
            .unwrap();
        assert_eq!(
            app.violations().await,
            [("references_exist", "t-orphan".to_owned())],
            "{b:?}"
        );

        // Two postings of a transfer that does not exist, +3 and -3 on accounts that do,
        // each the account's next posting.
        let seq = |id: &str| format!("SELECT posting_seq FROM accounts WHERE id = '{id}'");
        let (sa, sb) = (app.scalar(&seq(&a)).await, app.scalar(&seq(&bb)).await);
        let postings = format!(
            "INSERT INTO postings (id, transfer_id, account_id, account_seq, amount, currency, balance_after, created_at) \
             VALUES ('p-orphan-1', 'no-such-transfer', '{a}', {}, -3, 'USD', 0, 1), \
             ('p-orphan-2', 'no-such-transfer', '{bb}', {}, 3, 'USD', 0, 1);",
            sa + 1,
            sb + 1
        );
        sqlx::raw_sql(&format!("{bypass} {postings} {restore}"))
            .execute(app.db.writer())
            .await
            .unwrap();
        let found = app.violations().await;
        let mut named: Vec<&str> = found
            .iter()
            .filter(|v| v.0 == "references_exist")
            .map(|v| v.1.as_str())
            .collect();
        named.sort_unstable();
        assert_eq!(named, ["p-orphan-1", "p-orphan-2", "t-orphan"], "{b:?}: {found:?}");
    })
    .await;
}

/// `verify` names a posting that is not on its transfer's accounts or not in its
/// currency, written with everything else consistent (the postings sum to zero, the
/// balances, sequences and times follow them, every reference exists): a transfer
/// from Alice to Carol whose credit went to Bob, and one in EUR whose postings are in
/// dollars.
#[tokio::test]
async fn verify_names_postings_off_their_transfer() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (_alice, _bob, a, bb) = app.alice_and_bob(1_000).await;
        let carol = app.customer("carol");
        let c = app.open(&carol, "USD").await;
        app.assert_consistent().await;
        // Writes transfer `id` (Alice to `to`, 5 in `currency`) with its postings on
        // Alice's and Bob's accounts in USD, each the account's next one.
        let write = |id: &'static str, to: String, currency: &'static str| {
            let (app, a, bb) = (&app, a.clone(), bb.clone());
            async move {
                let at = app
                    .scalar(&format!(
                        "SELECT MAX(last_posted_at) + 1 FROM accounts WHERE id IN ('{a}', '{bb}')"
                    ))
                    .await;
                // the account's next sequence number, and its balance after `amount`
                let next = |acct: &str, amount: i64| {
                    format!(
                        "(SELECT posting_seq + 1 FROM accounts WHERE id = '{acct}'), {amount}, 'USD', \
                         (SELECT balance + {amount} FROM accounts WHERE id = '{acct}')"
                    )
                };
                let sql = format!(
                    "INSERT INTO transfers (id, kind, from_account_id, to_account_id, amount, captured, currency, \
                     description, status, expires_at, initiated_by, batch_id, created_at, updated_at) \
                     VALUES ('{id}', 'transfer', '{a}', '{to}', 5, 0, '{currency}', 'x', 'posted', NULL, 'u', NULL, {at}, {at}); \
                     INSERT INTO postings (id, transfer_id, account_id, account_seq, amount, currency, balance_after, created_at) \
                     VALUES ('{id}-debit', '{id}', '{a}', {}, {at}), ('{id}-credit', '{id}', '{bb}', {}, {at}); \
                     UPDATE accounts SET balance = balance - 5, posting_seq = posting_seq + 1, last_posted_at = {at} WHERE id = '{a}'; \
                     UPDATE accounts SET balance = balance + 5, posting_seq = posting_seq + 1, last_posted_at = {at} WHERE id = '{bb}';",
                    next(&a, -5),
                    next(&bb, 5),
                );
                sqlx::raw_sql(&sql).execute(app.db.writer()).await.unwrap();
            }
        };
        // The same rows as the transfer would have written pass.
        write("t-honest", bb.clone(), "USD").await;
        app.assert_consistent().await;
        write("t-to-carol", c.clone(), "USD").await;
        assert_eq!(
            app.violations().await,
            [("postings_follow_their_transfer", "t-to-carol-credit".to_owned())],
            "{b:?}"
        );
        write("t-in-euros", bb.clone(), "EUR").await;
        let mut found = app.violations().await;
        found.sort();
        assert_eq!(
            found,
            [
                ("postings_follow_their_transfer", "t-in-euros-credit".to_owned()),
                ("postings_follow_their_transfer", "t-in-euros-debit".to_owned()),
                ("postings_follow_their_transfer", "t-to-carol-credit".to_owned()),
            ],
            "{b:?}"
        );
    })
    .await;
}

/// Two relays at once (the background task and a direct call) publish every event
/// exactly once between them; what one backs off from goes out on the next run.
#[tokio::test]
async fn overlapping_relays_publish_each_event_once() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let (a, bb) = app.funded_pair(&alice, 10_000).await;
        let mut events = app.ledger.subscribe();
        let mut published = 0;
        // several rounds: each is a chance for the two relays' reads to overlap
        for _ in 0..8 {
            for _ in 0..3 {
                app.transfer(&alice, &a, &bb, 10).await.expect(201);
            }
            let (x, y) = tokio::join!(app.ledger.relay_outbox(), app.ledger.relay_outbox());
            published += x.unwrap() + y.unwrap();
            loop {
                let n = app.ledger.relay_outbox().await.unwrap();
                if n == 0 {
                    break;
                }
                published += n;
            }
        }
        let mut ids = Vec::new();
        while let Ok(ev) = events.try_recv() {
            ids.push(ev.id);
        }
        assert_eq!(ids.len() as u64, published);
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "an event went out twice: {ids:?}");
        // the deposit and the 24 transfers, at least, each went out once
        assert!(ids.len() >= 25, "{ids:?}");
    })
    .await;
}

/// A database that cannot be reached answers 503 `service_unavailable` with
/// `Retry-After` (the caller may retry, with the same idempotency key), not 500:
/// reads, single transfers through the group committer, and batches alike.
#[tokio::test]
async fn an_unreachable_database_answers_503() {
    use axum::http::Method;
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, _bob, a, bb) = app.alice_and_bob(10_000).await;
        app.db.close().await;

        let transfer =
            json!({"from_account_id": a, "to_account_id": bb, "amount": 100, "currency": "USD"});
        let batch = json!({"transfers": [transfer]});
        let k = key();
        let mut requests = vec![(Method::GET, format!("/v1/accounts/{a}"), None, None)];
        // On PostgreSQL the committer has connections of its own, which closing the
        // test's handle does not close.
        if b == vaultpay_store::Backend::Sqlite {
            requests.push((
                Method::POST,
                "/v1/transfers".into(),
                Some(k.as_str()),
                Some(transfer),
            ));
            requests.push((
                Method::POST,
                "/v1/transfers/batch".into(),
                Some(k.as_str()),
                Some(batch),
            ));
        }
        for (method, path, key, body) in requests {
            let r = app
                .raw_unchecked(
                    method,
                    &path,
                    Some(&alice),
                    key,
                    body.map(|b| b.to_string()),
                )
                .await;
            assert_eq!(r.status.as_u16(), 503, "{path}: {}", r.text);
            assert_eq!(r.code(), "service_unavailable", "{path}");
            assert!(
                r.headers.contains_key("retry-after"),
                "{path}: {:?}",
                r.headers
            );
        }
    })
    .await;
}

/// Published outbox events past their retention are purged, oldest first; unpublished
/// ones never are, however old, and the purge stops at the first of them.
#[tokio::test]
async fn published_outbox_events_are_purged_after_their_retention() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, _bob, a, bb) = app.alice_and_bob(10_000).await;
        app.transfer(&alice, &a, &bb, 100).await.expect(201);
        let count = || app.scalar("SELECT COUNT(*) FROM outbox");
        let old = vaultpay_core::time::now_micros() - vaultpay_core::time::secs(30 * 86_400);
        let age = || {
            let db = app.db.clone();
            async move {
                sqlx::query("UPDATE outbox SET created_at = $1")
                    .bind(old)
                    .execute(db.writer())
                    .await
                    .unwrap();
            }
        };
        let total = count().await;
        assert!(total >= 3, "{total}");
        // old but unpublished: kept
        age().await;
        assert_eq!(app.ledger.purge_outbox().await.unwrap(), 0);
        assert_eq!(count().await, total);
        // published and old: gone
        assert_eq!(app.ledger.relay_outbox().await.unwrap() as i64, total);
        app.transfer(&alice, &a, &bb, 100).await.expect(201);
        let max_published: i64 =
            sqlx::query_scalar("SELECT MAX(seq) FROM outbox WHERE published_at IS NOT NULL")
                .fetch_one(app.db.read())
                .await
                .unwrap();
        assert_eq!(app.ledger.purge_outbox().await.unwrap() as i64, total);
        let left: i64 = sqlx::query_scalar("SELECT MIN(seq) FROM outbox")
            .fetch_one(app.db.read())
            .await
            .unwrap();
        assert!(left > max_published, "the new, unpublished events stay");
        // published but young: kept
        let n = count().await;
        assert_eq!(app.ledger.relay_outbox().await.unwrap() as i64, n);
        assert_eq!(app.ledger.purge_outbox().await.unwrap(), 0);
        assert_eq!(count().await, n);
    })
    .await;
}

/// The outbox relay hands a page to the event sink (a broker) before it marks it
/// published: a sink that does not take it leaves every event unpublished (the relay
/// answers 503-class `Unavailable`) for the next run, and a sink that does gets them
/// in order, once per successful relay.
#[tokio::test]
async fn the_relay_marks_events_published_only_once_the_sink_took_them() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use vaultpay_ledger::{EventSink, OutboxEvent};
    #[derive(Default)]
    struct Broker {
        down: AtomicBool,
        got: parking_lot::Mutex<Vec<(i64, String)>>,
    }
    impl EventSink for Broker {
        fn publish<'a>(
            &'a self,
            events: &'a [OutboxEvent],
        ) -> futures::future::BoxFuture<'a, Result<(), String>> {
            Box::pin(async move {
                if self.down.load(Ordering::SeqCst) {
                    return Err("broker unreachable".into());
                }
                let mut got = self.got.lock();
                got.extend(events.iter().map(|e| (e.seq, e.id.clone())));
                Ok(())
            })
        }
    }
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let broker = std::sync::Arc::new(Broker::default());
        assert!(app.ledger.set_event_sink(broker.clone()));
        let (alice, _bob, a, bb) = app.alice_and_bob(10_000).await;
        app.transfer(&alice, &a, &bb, 100).await.expect(201);
        let unpublished = || app.scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL");
        let pending = unpublished().await;
        assert!(pending >= 3, "{pending}");

        broker.down.store(true, Ordering::SeqCst);
        let err = app.ledger.relay_outbox().await.unwrap_err();
        assert!(err.is_unreachable(), "{err}");
        assert_eq!(unpublished().await, pending);
        assert!(broker.got.lock().is_empty());

        broker.down.store(false, Ordering::SeqCst);
        assert_eq!(app.ledger.relay_outbox().await.unwrap() as i64, pending);
        assert_eq!(unpublished().await, 0);
        let got = broker.got.lock().clone();
        assert_eq!(got.len() as i64, pending);
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "in order: {got:?}");
        assert_eq!(app.ledger.relay_outbox().await.unwrap(), 0);
        assert_eq!(broker.got.lock().len() as i64, pending, "nothing twice");

        // PostgreSQL: one relay at a time across processes (pages stay in order); one
        // that finds another running leaves the page to it.
        if b == vaultpay_store::Backend::Postgres {
            app.transfer(&alice, &a, &bb, 100).await.expect(201);
            let mut other = app.db.begin().await.unwrap();
            app.db.lock(&mut other, 4).await.unwrap();
            assert_eq!(app.ledger.relay_outbox().await.unwrap(), 0);
            assert!(unpublished().await > 0);
            other.rollback().await.unwrap();
            assert!(app.ledger.relay_outbox().await.unwrap() > 0);
            assert_eq!(unpublished().await, 0);
        }
    })
    .await;
}

/// A CSV statement is built whole in memory: one longer than `statement_max_rows`
/// transactions is refused (422 `statement_too_large`) instead of built; one that
/// fills the limit exactly, or a shorter period of the same account, is answered.
#[tokio::test]
async fn a_statement_longer_than_the_limit_is_refused() {
    each_backend(|b| async move {
        let app = TestApp::with_config(
            b,
            LedgerConfig {
                statement_max_rows: 3,
                ..LedgerConfig::default()
            },
        )
        .await;
        let alice = app.customer("alice");
        // a deposit and a transfer out: two rows on `a`
        let (a, bb) = app.funded_pair(&alice, 100).await;
        let path = format!("/v1/accounts/{a}/statement.csv");
        app.transfer(&alice, &a, &bb, 10).await.expect(201);
        let lines = |r: Resp| r.expect(200).text.lines().count();
        assert_eq!(lines(app.get(&path, &alice).await), 3);
        // a third: exactly the limit
        app.transfer(&alice, &a, &bb, 10).await.expect(201);
        assert_eq!(lines(app.get(&path, &alice).await), 4);
        let mid = rfc(vaultpay_core::time::now_micros());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        // a fourth: over it
        app.transfer(&alice, &a, &bb, 10).await.expect(201);
        app.get(&path, &alice)
            .await
            .problem(422, "statement_too_large");
        // a shorter period still works
        assert_eq!(
            lines(app.get(&format!("{path}?from={mid}"), &alice).await),
            2
        );
        app.assert_consistent().await;
    })
    .await;
}
