use crate::common::*;
use serde_json::{json, Value};
use sqlx::Row;

fn item(from: &str, to: &str, amount: i64) -> Value {
    json!({"from_account_id": from, "to_account_id": to, "amount": amount, "currency": "USD"})
}

#[tokio::test]
async fn batch_reports_each_outcome_or_is_all_or_nothing() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, _, a, bb) = app.alice_and_bob(1_000).await;

        let body = json!({"transfers": [item(&a, &bb, 100), item(&a, &bb, 5_000), item(&a, &a, 1), item(&a, &bb, 200)]});
        let k = key();
        let r = app.post("/v1/transfers/batch", &alice, Some(&k), body.clone()).await.expect(200);
        assert_eq!(r.body["succeeded"], 2);
        assert_eq!(r.body["failed"], 2);
        let items = r.body["items"].as_array().unwrap();
        assert_eq!(items[0]["status"], 201);
        assert_eq!(items[1]["problem"]["code"], "insufficient_funds");
        assert_eq!(items[1]["problem"]["available"], 900);
        assert_eq!(items[2]["problem"]["code"], "same_account");
        assert_eq!(items[3]["transfer"]["amount"], 200);
        assert_eq!(app.balance(&alice, &a).await.0, 700);
        let again = app.post("/v1/transfers/batch", &alice, Some(&k), body).await.expect(200);
        assert!(again.replayed());
        assert_eq!(app.balance(&alice, &a).await.0, 700);

        // atomic: one failure and nothing applies
        let body = json!({"atomic": true, "transfers": [item(&a, &bb, 100), item(&a, &bb, 100), item(&a, &bb, 10_000)]});
        let r = app.post("/v1/transfers/batch", &alice, Some(&key()), body).await.problem(422, "batch_failed");
        assert_eq!(r.body["items"][0]["index"], 2);
        assert_eq!(r.body["items"][0]["problem"]["code"], "insufficient_funds");
        assert_eq!(app.balance(&alice, &a).await.0, 700);
        let body = json!({"atomic": true, "transfers": [item(&a, &bb, 100), item(&bb, &a, 50)]});
        // bob's account is not alice's to move
        app.post("/v1/transfers/batch", &alice, Some(&key()), body).await.problem(422, "batch_failed");
        let body = json!({"atomic": true, "transfers": [item(&a, &bb, 100), item(&a, &bb, 50)]});
        let r = app.post("/v1/transfers/batch", &alice, Some(&key()), body).await.expect(200);
        assert_eq!(r.body["succeeded"], 2);
        assert_eq!(app.balance(&alice, &a).await.0, 550);

        // limits
        let many: Vec<Value> = (0..1001).map(|_| item(&a, &bb, 1)).collect();
        app.post("/v1/transfers/batch", &alice, Some(&key()), json!({"transfers": many})).await.problem(422, "batch_too_large");
        app.post("/v1/transfers/batch", &alice, Some(&key()), json!({"transfers": []})).await.problem(422, "invalid_request");
        app.post("/v1/transfers/batch", &alice, None, json!({"transfers": [item(&a, &bb, 1)]})).await.problem(400, "idempotency_key_required");
        // 1000 is fine
        let full: Vec<Value> = (0..1000).map(|_| item(&a, &bb, 1)).collect();
        let r = app.post("/v1/transfers/batch", &alice, Some(&key()), json!({"transfers": full})).await.expect(200);
        assert_eq!(r.body["succeeded"], 550);
        assert_eq!(r.body["failed"], 450);
        assert_eq!(app.balance(&alice, &a).await.0, 0);
        // Every refused item is recorded, under its batch's key: 2 + 1 + 1 + 450 (an
        // atomic batch records its failing item only).
        let rows = sqlx::query(
            "SELECT reason, CAST(COUNT(*) AS BIGINT) AS n FROM failed_transfers \
             WHERE operation = 'batch_item' GROUP BY reason ORDER BY reason",
        )
        .fetch_all(app.db.read())
        .await
        .unwrap();
        let counts: Vec<(String, i64)> = rows
            .iter()
            .map(|r| (r.get("reason"), r.get("n")))
            .collect();
        assert_eq!(
            counts,
            [
                // bob's account, not alice's: not found (no existence leak)
                ("account_not_found".to_owned(), 1),
                ("insufficient_funds".to_owned(), 452),
                ("same_account".to_owned(), 1),
            ]
        );
        app.assert_consistent().await;
    })
    .await;
}

/// A batch's stored response (tens of KB here, ~400 KB for 1,000 transfers) is kept
/// LZ4-compressed and replayed byte for byte; a single transfer's short one is kept as
/// it is.
#[tokio::test]
async fn a_large_stored_response_is_compressed_and_replays_exactly() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let (alice, _, a, bb) = app.alice_and_bob(100_000).await;
        let body = json!({"transfers": (1..=100).map(|n| item(&a, &bb, n)).collect::<Vec<_>>()});
        let k = key();
        let first = app
            .post("/v1/transfers/batch", &alice, Some(&k), body.clone())
            .await
            .expect(200);
        assert!(first.text.len() > 20_000, "{}", first.text.len());
        let again = app
            .post("/v1/transfers/batch", &alice, Some(&k), body)
            .await
            .expect(200);
        assert!(again.replayed());
        assert_eq!(first.text, again.text);
        assert_eq!(
            app.balance(&alice, &a).await.0,
            100_000 - 5_050,
            "paid once"
        );

        let single =
            json!({"from_account_id": a, "to_account_id": bb, "amount": 1, "currency": "USD"});
        let k2 = key();
        let one = app
            .post("/v1/transfers", &alice, Some(&k2), single.clone())
            .await
            .expect(201);
        let one_again = app
            .post("/v1/transfers", &alice, Some(&k2), single)
            .await
            .expect(201);
        assert_eq!(one.text, one_again.text);

        let stored: Vec<(String, String, Option<Vec<u8>>)> = vaultpay_store::sqlx::query_as(
            "SELECT key, body, body_lz4 FROM idempotency_keys WHERE key IN ($1, $2)",
        )
        .bind(&k)
        .bind(&k2)
        .fetch_all(app.db.read())
        .await
        .unwrap();
        let of = |key: &str| stored.iter().find(|s| s.0 == key).unwrap();
        let (_, body, packed) = of(&k);
        assert_eq!(body, "");
        let packed = packed.as_ref().expect("compressed");
        assert!(
            packed.len() * 4 < first.text.len(),
            "{} of {}",
            packed.len(),
            first.text.len()
        );
        let (_, body, packed) = of(&k2);
        assert_eq!(body, &one.text);
        assert!(packed.is_none());
        app.assert_consistent().await;
    })
    .await;
}
