use crate::common::*;
use serde_json::{json, Value};

fn item(from: &str, to: &str, amount: i64) -> Value {
    json!({"from_account_id": from, "to_account_id": to, "amount": amount, "currency": "USD"})
}

#[tokio::test]
async fn batch_reports_each_outcome_or_is_all_or_nothing() {
    each_backend(|b| async move {
        let app = TestApp::new(b).await;
        let alice = app.customer("alice");
        let bob = app.customer("bob");
        let a = app.open(&alice, "USD").await;
        let bb = app.open(&bob, "USD").await;
        app.deposit(&a, 1_000, "USD").await.expect(201);

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
        app.assert_consistent().await;
    })
    .await;
}
