use crate::common::*;
use rand::Rng;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use vaultpay_ledger::LedgerConfig;
use vaultpay_store::audit::{list, AuditFilter};

async fn storm(app: Arc<TestApp>, tasks: usize, per_task: usize) {
    let users = ["u0", "u1", "u2", "u3"];
    let mut accounts: Vec<(String, String)> = Vec::new(); // (owner token, account)
    for u in users {
        let tok = app.customer(u);
        for _ in 0..2 {
            let acct = app.open(&tok, "USD").await;
            app.deposit(&acct, 10_000, "USD").await.expect(201);
            accounts.push((tok.clone(), acct));
        }
    }
    let accounts = Arc::new(accounts);
    let ok = Arc::new(AtomicI64::new(0));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (app, accounts, ok) = (app.clone(), accounts.clone(), ok.clone());
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                let (from, to, amount) = {
                    let mut rng = rand::thread_rng();
                    // account 0 is hot: half of all transfers touch it
                    let hot = rng.gen_bool(0.5);
                    let mut from = if hot && rng.gen_bool(0.5) {
                        0
                    } else {
                        rng.gen_range(0..accounts.len())
                    };
                    let mut to = if hot && from != 0 {
                        0
                    } else {
                        rng.gen_range(0..accounts.len())
                    };
                    if from == to {
                        to = (to + 1) % accounts.len();
                    }
                    if rng.gen_bool(0.05) {
                        from = to; // some same_account failures
                    }
                    (from, to, rng.gen_range(1..4_000))
                };
                let r = app
                    .transfer(
                        &accounts[from].0,
                        &accounts[from].1,
                        &accounts[to].1,
                        amount,
                    )
                    .await;
                match r.status.as_u16() {
                    201 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    422 => assert!(
                        ["insufficient_funds", "same_account"].contains(&r.code()),
                        "{}",
                        r.text
                    ),
                    s => panic!("unexpected {s}: {}", r.text),
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let mut total = 0;
    for (tok, acct) in accounts.iter() {
        let (bal, avail) = app.balance(tok, acct).await;
        assert!(bal >= 0 && avail >= 0);
        total += bal;
    }
    assert_eq!(total, 80_000, "money is conserved");
    let report = vaultpay_ledger::verify(&app.db).await.unwrap();
    assert!(report.is_consistent(), "{report}");
    // 8 deposits + the successful transfers
    assert_eq!(report.transfers, 8 + ok.load(Ordering::Relaxed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_transfer_storm_with_hot_accounts_keeps_every_invariant() {
    each_backend(|b| async move {
        for group_commit in [true, false] {
            let cfg = LedgerConfig {
                group_commit,
                ..LedgerConfig::default()
            };
            let app = Arc::new(TestApp::with_config(b, cfg).await);
            storm(app, 24, 25).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_transfer_posts_after_a_freeze_commits() {
    each_backend(|b| async move {
        let app = Arc::new(TestApp::new(b).await);
        let alice = app.customer("alice");
        let (a, bb) = app.funded_pair(&alice, 1_000_000).await;
        let frozen = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for _ in 0..8 {
            let (app, alice, a, bb, frozen) = (
                app.clone(),
                alice.clone(),
                a.clone(),
                bb.clone(),
                frozen.clone(),
            );
            handles.push(tokio::spawn(async move {
                let mut posted = Vec::new();
                loop {
                    let started_after_freeze = frozen.load(Ordering::SeqCst);
                    let r = app.transfer(&alice, &a, &bb, 1).await;
                    match r.status.as_u16() {
                        201 => {
                            assert!(
                                !started_after_freeze,
                                "a transfer posted after the freeze committed"
                            );
                            posted.push(r.id());
                        }
                        409 => {
                            assert_eq!(r.code(), "account_frozen");
                            if started_after_freeze {
                                return posted;
                            }
                        }
                        s => panic!("unexpected {s}: {}", r.text),
                    }
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        app.post(
            &format!("/v1/admin/accounts/{a}/freeze"),
            &app.admin(),
            None,
            json!({"reason": "race"}),
        )
        .await
        .expect(200);
        frozen.store(true, Ordering::SeqCst);
        let mut posted = std::collections::HashSet::new();
        for h in handles {
            posted.extend(h.await.unwrap());
        }
        assert!(!posted.is_empty(), "some transfers ran before the freeze");
        // In commit order (the audit chain), every posted transfer precedes the freeze.
        let entries = list(
            &app.db,
            &AuditFilter {
                limit: 500,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut all = entries;
        while all.len() < 5_000 {
            let before = all.last().map(|e| e.seq).unwrap_or(0);
            if before <= 1 {
                break;
            }
            let more = list(
                &app.db,
                &AuditFilter {
                    limit: 500,
                    before_seq: Some(before),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            if more.is_empty() {
                break;
            }
            all.extend(more);
        }
        let freeze_seq = all
            .iter()
            .find(|e| e.action == "ledger.account.frozen")
            .unwrap()
            .seq;
        let mut checked = 0;
        for e in &all {
            if e.action == "ledger.transfer.posted"
                && posted.contains(e.resource.as_deref().unwrap_or(""))
            {
                assert!(
                    e.seq < freeze_seq,
                    "transfer {:?} committed after the freeze",
                    e.resource
                );
                checked += 1;
            }
        }
        assert_eq!(checked, posted.len());
        app.assert_consistent().await;
    })
    .await;
}
