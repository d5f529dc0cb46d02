//! Property test: random sequences of transfers, holds, posts, voids, freezes, retries
//! and failures keep every invariant (run against the service on SQLite).

use crate::common::*;
use proptest::prelude::*;
use serde_json::json;

#[derive(Debug, Clone)]
enum Step {
    Transfer {
        from: usize,
        to: usize,
        amount: i64,
    },
    Hold {
        from: usize,
        to: usize,
        amount: i64,
        timeout: i64,
    },
    Post {
        hold: usize,
        amount: Option<i64>,
    },
    Void {
        hold: usize,
    },
    Freeze {
        acct: usize,
    },
    Unfreeze {
        acct: usize,
    },
    Deposit {
        acct: usize,
        amount: i64,
    },
    Withdraw {
        acct: usize,
        amount: i64,
    },
    Batch {
        items: Vec<(usize, usize, i64)>,
        atomic: bool,
    },
    Retry,
    Expire,
}

fn step() -> impl Strategy<Value = Step> {
    let acct = 0usize..4;
    let amount = prop_oneof![Just(0i64), 1i64..500, 400i64..3_000, Just(-1)];
    prop_oneof![
        4 => (acct.clone(), acct.clone(), amount.clone()).prop_map(|(from, to, amount)| Step::Transfer { from, to, amount }),
        2 => (acct.clone(), acct.clone(), amount.clone(), prop_oneof![Just(1i64), Just(3600)])
            .prop_map(|(from, to, amount, timeout)| Step::Hold { from, to, amount, timeout }),
        2 => (0usize..8, proptest::option::of(1i64..600)).prop_map(|(hold, amount)| Step::Post { hold, amount }),
        1 => (0usize..8).prop_map(|hold| Step::Void { hold }),
        1 => acct.clone().prop_map(|acct| Step::Freeze { acct }),
        1 => acct.clone().prop_map(|acct| Step::Unfreeze { acct }),
        1 => (acct.clone(), 1i64..2_000).prop_map(|(acct, amount)| Step::Deposit { acct, amount }),
        1 => (acct.clone(), 1i64..2_000).prop_map(|(acct, amount)| Step::Withdraw { acct, amount }),
        1 => (proptest::collection::vec((acct.clone(), acct.clone(), 1i64..800), 1..5), any::<bool>())
            .prop_map(|(items, atomic)| Step::Batch { items, atomic }),
        1 => Just(Step::Retry),
        1 => Just(Step::Expire),
    ]
}

async fn run(steps: Vec<Step>) {
    let app = TestApp::new(vaultpay_store::Backend::Sqlite).await;
    let admin = app.admin();
    let users = ["p0", "p1"];
    let mut accts = Vec::new();
    for i in 0..4 {
        let tok = app.customer(users[i % 2]);
        let id = app.open(&tok, "USD").await;
        app.deposit(&id, 2_000, "USD").await.expect(201);
        accts.push((tok, id));
    }
    let mut holds: Vec<(String, String)> = Vec::new(); // (payer token, hold id)
    let mut last: Option<(String, String, String, serde_json::Value, u16, String)> = None; // token, path, key, body, status, text
    let mut external = 4 * 2_000i64; // deposits minus withdrawals
    for s in steps {
        match s {
            Step::Transfer { from, to, amount } => {
                let body = json!({"from_account_id": accts[from].1, "to_account_id": accts[to].1, "amount": amount, "currency": "USD"});
                let k = key();
                let r = app
                    .post("/v1/transfers", &accts[from].0, Some(&k), body.clone())
                    .await;
                assert!(
                    r.status.as_u16() == 201 || r.status.is_client_error(),
                    "{}",
                    r.text
                );
                last = Some((
                    accts[from].0.clone(),
                    "/v1/transfers".into(),
                    k,
                    body,
                    r.status.as_u16(),
                    r.text,
                ));
            }
            Step::Hold {
                from,
                to,
                amount,
                timeout,
            } => {
                let body = json!({"from_account_id": accts[from].1, "to_account_id": accts[to].1, "amount": amount,
                    "currency": "USD", "pending": true, "timeout_secs": timeout});
                let r = app
                    .post("/v1/transfers", &accts[from].0, Some(&key()), body)
                    .await;
                if r.status.as_u16() == 201 {
                    holds.push((accts[from].0.clone(), r.id()));
                }
            }
            Step::Post { hold, amount } => {
                if let Some((tok, id)) = holds.get(hold) {
                    let body = match amount {
                        Some(a) => json!({"amount": a}),
                        None => json!({}),
                    };
                    let path = format!("/v1/transfers/{id}/post");
                    let k = key();
                    let r = app.post(&path, tok, Some(&k), body.clone()).await;
                    assert!(
                        r.status.as_u16() == 200 || r.status.is_client_error(),
                        "{}",
                        r.text
                    );
                    last = Some((tok.clone(), path, k, body, r.status.as_u16(), r.text));
                }
            }
            Step::Void { hold } => {
                if let Some((tok, id)) = holds.get(hold) {
                    let r = app
                        .post(&format!("/v1/transfers/{id}/void"), tok, None, json!({}))
                        .await;
                    assert!(
                        r.status.as_u16() == 200 || r.code() == "hold_not_pending",
                        "{}",
                        r.text
                    );
                }
            }
            Step::Freeze { acct } => {
                let r = app
                    .post(
                        &format!("/v1/admin/accounts/{}/freeze", accts[acct].1),
                        &admin,
                        None,
                        json!({"reason": "p"}),
                    )
                    .await;
                assert!(r.status.as_u16() == 200 || r.code() == "account_frozen");
            }
            Step::Unfreeze { acct } => {
                let r = app
                    .post(
                        &format!("/v1/admin/accounts/{}/unfreeze", accts[acct].1),
                        &admin,
                        None,
                        json!({"reason": "p"}),
                    )
                    .await;
                assert!(r.status.as_u16() == 200 || r.code() == "account_not_frozen");
            }
            Step::Deposit { acct, amount } => {
                if app
                    .deposit(&accts[acct].1, amount, "USD")
                    .await
                    .status
                    .as_u16()
                    == 201
                {
                    external += amount;
                }
            }
            Step::Withdraw { acct, amount } => {
                let r = app
                    .post("/v1/admin/withdrawals", &admin, Some(&key()), json!({"account_id": accts[acct].1, "amount": amount, "currency": "USD", "reference": ""}))
                    .await;
                if r.status.as_u16() == 201 {
                    external -= amount;
                }
            }
            Step::Batch { items, atomic } => {
                // all items from the first item's owner
                let owner = &accts[items[0].0].0;
                let transfers: Vec<_> = items
                    .iter()
                    .map(|(f, t, a)| json!({"from_account_id": accts[*f].1, "to_account_id": accts[*t].1, "amount": a, "currency": "USD"}))
                    .collect();
                let r = app
                    .post(
                        "/v1/transfers/batch",
                        owner,
                        Some(&key()),
                        json!({"transfers": transfers, "atomic": atomic}),
                    )
                    .await;
                assert!(
                    r.status.as_u16() == 200 || r.code() == "batch_failed",
                    "{}",
                    r.text
                );
            }
            Step::Retry => {
                if let Some((tok, path, k, body, status, text)) = &last {
                    let r = app.post(path, tok, Some(k), body.clone()).await;
                    assert_eq!(r.status.as_u16(), *status);
                    assert_eq!(&r.text, text, "a retry replays the first response exactly");
                    assert!(r.replayed());
                }
            }
            Step::Expire => {
                tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
                app.ledger.expire_holds().await.unwrap();
            }
        }
    }
    let mut total = 0;
    for (tok, id) in &accts {
        let (bal, avail) = app.balance(tok, id).await;
        assert!(bal >= 0 && avail >= 0 && avail <= bal);
        total += bal;
    }
    assert_eq!(
        total, external,
        "wallets hold exactly what came in minus what went out"
    );
    app.assert_consistent().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 20, ..ProptestConfig::default() })]
    #[test]
    fn random_operation_sequences_keep_every_invariant(steps in proptest::collection::vec(step(), 1..30)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(steps));
    }
}
