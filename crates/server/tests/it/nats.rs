//! The ledger's outbox relayed to NATS JetStream (cargo feature `nats`), against the
//! real NATS server named by `VAULTPAY_TEST_NATS_URL` (CI sets it; unset: skipped with
//! a notice; set and unreachable: the test fails).

use crate::helpers::*;
use async_nats::jetstream;
use serde_json::json;
use vaultpay_core::secret::Secret;
use vaultpay_store::Backend;

fn nats_url() -> Option<String> {
    let url = std::env::var("VAULTPAY_TEST_NATS_URL")
        .ok()
        .filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!("note: VAULTPAY_TEST_NATS_URL is not set; NATS tests skipped");
    }
    url
}

async fn unpublished(app: &TestApp) -> i64 {
    let db = app.running.as_ref().unwrap().ledger.as_ref().unwrap().db();
    sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(db.read())
        .await
        .unwrap()
}

/// Waits (up to 30 s, a bound against a hang, not a timing assertion) until the
/// background relay has published every outbox event.
async fn until_relayed(app: &TestApp) {
    for _ in 0..300 {
        if unpublished(app).await == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the outbox was not relayed");
}

/// Every ledger event reaches the stream once, in outbox order, on its topic's subject,
/// with its outbox id as `Nats-Msg-Id`; relaying the same events again (a crash between
/// publishing and marking them) adds nothing to the stream.
#[tokio::test]
async fn ledger_events_reach_jetstream_once() {
    let Some(url) = nats_url() else { return };
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let (prefix, stream) = (format!("vptest{tag}"), format!("VPTEST_{tag}"));
    let app = TestApp::spawn_with(Backend::Sqlite, |c| {
        c.nats_url = Some(Secret::new(url.clone()));
        c.nats_subject_prefix = prefix.clone();
        c.nats_stream = stream.clone();
    })
    .await;
    let admin = app.admin().await.access;
    let u = app.user("events@example.com").await;
    let a = app.open_wallet(&u.access, "USD").await;
    let r = ledger_post(
        &app,
        "/v1/admin/deposits",
        &admin,
        "n-dep",
        json!({ "account_id": a, "amount": 500, "currency": "USD", "reference": "r" }),
    )
    .await;
    assert_eq!(r.status, reqwest::StatusCode::CREATED, "{}", r.text);
    until_relayed(&app).await;

    let db = app
        .running
        .as_ref()
        .unwrap()
        .ledger
        .as_ref()
        .unwrap()
        .db()
        .clone();
    let rows: Vec<(i64, String, String)> =
        sqlx::query_as("SELECT seq, id, topic FROM outbox ORDER BY seq")
            .fetch_all(db.read())
            .await
            .unwrap();
    assert!(rows.len() >= 2, "{rows:?}");
    let js = jetstream::new(async_nats::connect(&url).await.expect("NATS reachable"));
    let mut s = js.get_stream(&stream).await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, rows.len() as u64);
    for (i, (seq, id, topic)) in rows.iter().enumerate() {
        let m = s.get_raw_message(i as u64 + 1).await.unwrap();
        assert_eq!(m.subject.as_str(), format!("{prefix}.{topic}"));
        assert_eq!(
            m.headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str()),
            Some(id.as_str()),
            "{:?}",
            m.headers
        );
        assert_eq!(
            m.headers.get("VaultPay-Outbox-Seq").unwrap().as_str(),
            seq.to_string()
        );
        let payload: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert!(payload.is_object(), "{payload}");
    }
    let topics: Vec<&str> = rows.iter().map(|(_, _, t)| t.as_str()).collect();
    assert!(topics.contains(&"ledger.account.opened"), "{topics:?}");
    assert!(topics.contains(&"ledger.deposit.posted"), "{topics:?}");

    // published again: JetStream drops the copies by their ids
    sqlx::query("UPDATE outbox SET published_at = NULL")
        .execute(db.writer())
        .await
        .unwrap();
    until_relayed(&app).await;
    assert_eq!(s.info().await.unwrap().state.messages, rows.len() as u64);

    // An event too large for one NATS message goes as a stub flagged truncated, and
    // does not hold back the events behind it.
    let big = json!({
        "batch_id": "batch-1", "succeeded": 3,
        "blob": "x".repeat(2 * 1024 * 1024), "transfers": ["t1", "t2", "t3"],
    })
    .to_string();
    sqlx::query("INSERT INTO outbox (id, topic, payload, created_at) VALUES ($1, $2, $3, $4)")
        .bind("big-event-1")
        .bind("ledger.test.big")
        .bind(&big)
        .bind(vaultpay_core::time::now_micros())
        .execute(db.writer())
        .await
        .unwrap();
    app.open_wallet(&u.access, "EUR").await;
    until_relayed(&app).await;
    let n = s.info().await.unwrap().state.messages;
    assert_eq!(n, rows.len() as u64 + 2);
    let stub = s.get_raw_message(rows.len() as u64 + 1).await.unwrap();
    assert_eq!(
        stub.headers.get("VaultPay-Truncated").map(|v| v.as_str()),
        Some("true")
    );
    let body: serde_json::Value = serde_json::from_slice(&stub.payload).unwrap();
    assert_eq!(body["id"], "big-event-1");
    // what a consumer needs to look the rest up is kept; what did not fit is named
    assert_eq!(
        body["payload"],
        json!({ "batch_id": "batch-1", "succeeded": 3 })
    );
    assert_eq!(body["omitted"], json!(["blob", "transfers"]));
    let after = s.get_raw_message(n).await.unwrap();
    assert_eq!(
        after.subject.as_str(),
        format!("{prefix}.ledger.account.opened")
    );

    // The stream deleted under a running server is made again.
    js.delete_stream(&stream).await.unwrap();
    app.open_wallet(&u.access, "GBP").await;
    until_relayed(&app).await;
    let mut s = js.get_stream(&stream).await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 1);

    app.stop().await;
    js.delete_stream(&stream).await.unwrap();
}

/// NATS unreachable: the server still starts, and the relay leaves every event in the
/// outbox (answering that the broker did not take them) instead of marking it.
#[tokio::test]
async fn events_wait_in_the_outbox_while_nats_is_down() {
    let app = TestApp::spawn_with(Backend::Sqlite, |c| {
        c.nats_url = Some(Secret::new("nats://127.0.0.1:1"));
    })
    .await;
    let u = app.user("waiting@example.com").await;
    app.open_wallet(&u.access, "USD").await;
    let before = unpublished(&app).await;
    assert!(before >= 1);
    let ledger = app.running.as_ref().unwrap().ledger.clone().unwrap();
    let err = ledger.relay_outbox().await.unwrap_err();
    assert!(err.is_unreachable(), "{err}");
    assert_eq!(unpublished(&app).await, before);
    app.stop().await;
}
