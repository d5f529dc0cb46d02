//! The fast path, driven deterministically: whole groups are handed to `run_group`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::engine::{run_group, run_single, Job, Op, Queued, Reply};
use crate::error::LedgerError;
use crate::model::Actor;
use crate::{Core, LedgerConfig};
use sqlx::Row;
use tokio::sync::oneshot;
use vaultpay_proto::ledger::{
    AccountKind, BatchRequest, OpenAccountRequest, TransferRequest, TreasuryRequest,
};
use vaultpay_store::audit::Origin;
use vaultpay_store::{Backend, Service};

fn job(actor: &Actor, key: &str, op: Op) -> Job {
    Job::new(
        actor.clone(),
        Some(key.to_owned()),
        op,
        Origin::default(),
        None,
    )
}

fn tr(from: &str, to: &str, amount: i64, description: &str) -> Op {
    Op::Transfer(TransferRequest {
        from_account_id: from.to_owned(),
        to_account_id: to.to_owned(),
        amount,
        currency: "USD".into(),
        description: description.into(),
        pending: false,
        timeout_secs: None,
    })
}

fn deposit(account: &str, amount: i64) -> Op {
    Op::Deposit(TreasuryRequest {
        account_id: account.to_owned(),
        amount,
        currency: "USD".into(),
        reference: "test".into(),
    })
}

async fn open(core: &Core, actor: &Actor) -> String {
    let r = run_single(
        core,
        job(
            actor,
            &uuid::Uuid::now_v7().to_string(),
            Op::Open(OpenAccountRequest {
                currency: "USD".into(),
                kind: AccountKind::Current,
                name: "Main".into(),
            }),
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    r.value()["id"].as_str().unwrap().to_owned()
}

/// Runs `jobs` as ONE group and returns each job's answer, in order.
async fn group(core: &Core, jobs: Vec<Job>) -> Vec<Result<Reply, LedgerError>> {
    let mut rxs = Vec::new();
    let mut g: Vec<Queued> = Vec::new();
    for j in jobs {
        let (tx, rx) = oneshot::channel();
        g.push((j, tx));
        rxs.push(rx);
    }
    run_group(core, &mut g).await;
    let mut out = Vec::new();
    for rx in rxs {
        out.push(rx.await.unwrap());
    }
    out
}

async fn count(core: &Core, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(core.db.read())
        .await
        .unwrap()
        .try_get::<i64, _>(0)
        .unwrap()
}

async fn balance(core: &Core, id: &str) -> i64 {
    sqlx::query("SELECT balance FROM accounts WHERE id = $1")
        .bind(id)
        .fetch_one(core.db.read())
        .await
        .unwrap()
        .try_get::<i64, _>(0)
        .unwrap()
}

async fn setup(backend: Backend) -> Core {
    let db = vaultpay_store::testing::fresh_db(Service::Ledger, backend)
        .await
        .unwrap();
    Core {
        db,
        config: LedgerConfig::default(),
    }
}

/// A fresh ledger with alice and two of her accounts: `a` with 100 (deposited by an
/// admin), `b` empty.
async fn two_accounts(backend: Backend) -> (Core, Actor, String, String) {
    let core = setup(backend).await;
    let admin = Actor::new("admin", vec!["admin".into()], "");
    let alice = Actor::new("alice", vec!["customer".into()], "");
    let a = open(&core, &alice).await;
    let b = open(&core, &alice).await;
    let r = run_single(&core, job(&admin, "d0", deposit(&a, 100)))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    (core, alice, a, b)
}

/// Idempotency keys belong to their user inside a group too: a key another user has
/// stored under the same name is neither replayed nor refused as reused, and the
/// owner's own key is replayed (the group looks keys up by user and key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_looks_up_keys_per_user() {
    for backend in vaultpay_store::testing::backends() {
        let (core, alice, a, b) = two_accounts(backend).await;
        let admin = Actor::new("admin", vec!["admin".into()], "");
        let bob = Actor::new("bob", vec!["customer".into()], "");
        let c = open(&core, &bob).await;
        let d = open(&core, &bob).await;
        let r = run_single(&core, job(&admin, "d1", deposit(&c, 50)))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
        let first = run_single(&core, job(&alice, "same", tr(&a, &b, 7, "alice")))
            .await
            .unwrap();
        assert_eq!(first.status, 201);
        let out = group(
            &core,
            vec![
                job(&bob, "same", tr(&c, &d, 5, "bob")),
                job(&alice, "same", tr(&a, &b, 7, "alice")),
                job(&bob, "other", tr(&c, &d, 1, "bob")),
            ],
        )
        .await;
        let out: Vec<&Reply> = out.iter().map(|r| r.as_ref().unwrap()).collect();
        assert_eq!(out[0].status, 201, "{backend:?}: {}", out[0].body);
        assert!(
            !out[0].replayed,
            "{backend:?}: bob got alice's stored reply"
        );
        assert_eq!(out[0].value()["amount"], 5);
        assert!(out[1].replayed, "{backend:?}: alice's own key is replayed");
        assert_eq!(out[1].body, first.body);
        assert_eq!(out[2].status, 201);
        assert_eq!(balance(&core, &c).await, 44, "{backend:?}");
        assert_eq!(balance(&core, &a).await, 93, "{backend:?}");
    }
}

/// One group mixing successes, refusals (in-memory checks against the group's running
/// balances), a replay, a reused key and a deposit that splits the transfers into two
/// runs: every outcome matches what one-by-one execution gives, and every success has
/// its transfer, two postings, audit entry, outbox event and stored key, every refusal
/// its `failed_transfers` row and stored problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_transfers_matches_one_by_one_semantics() {
    for backend in vaultpay_store::testing::backends() {
        let core = setup(backend).await;
        let admin = Actor::new("admin", vec!["admin".into()], "");
        let alice = Actor::new("alice", vec!["customer".into()], "");
        let bob = Actor::new("bob", vec!["customer".into()], "");
        let a = open(&core, &alice).await;
        let b = open(&core, &bob).await;
        let r = run_single(&core, job(&admin, "d0", deposit(&a, 100)))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
        let pre = run_single(&core, job(&alice, "pre", tr(&a, &b, 1, "pre")))
            .await
            .unwrap();
        assert_eq!(pre.status, 201);
        let old = run_single(&core, job(&alice, "old", tr(&a, &b, 1, "old")))
            .await
            .unwrap();
        assert_eq!(old.status, 201);
        // a = 98, b = 2
        let mut jobs = vec![
            job(&alice, "pre", tr(&a, &b, 1, "pre")), // replay
            job(&alice, "old", tr(&a, &b, 2, "old")), // same key, other request
            job(&alice, "steal", tr(&b, &a, 1, "x")), // not alice's account: 404
        ];
        for i in 0..6 {
            jobs.push(job(&alice, &format!("g{i}"), tr(&a, &b, 10, "g")));
        }
        // a = 38 here; the deposit is a slow job between two runs
        jobs.push(job(&admin, "d1", deposit(&a, 5)));
        for i in 6..11 {
            jobs.push(job(&alice, &format!("g{i}"), tr(&a, &b, 10, "g")));
        }
        // a = 43 before g6: g6..g9 succeed (a = 3), g10 is refused
        let out = group(&core, jobs).await;
        let st: Vec<u16> = out.iter().map(|r| r.as_ref().unwrap().status).collect();
        assert_eq!(
            st,
            vec![201, 422, 404, 201, 201, 201, 201, 201, 201, 201, 201, 201, 201, 201, 422],
            "{backend:?}"
        );
        let replay = out[0].as_ref().unwrap();
        assert!(replay.replayed);
        assert_eq!(replay.body, pre.body, "a replay answers the stored body");
        assert_eq!(
            out[1].as_ref().unwrap().value()["code"],
            "idempotency_key_reused"
        );
        assert_eq!(
            out[2].as_ref().unwrap().value()["code"],
            "account_not_found"
        );
        assert_eq!(
            out[14].as_ref().unwrap().value()["code"],
            "insufficient_funds"
        );
        assert_eq!(balance(&core, &a).await, 3);
        assert_eq!(balance(&core, &b).await, 2 + 100);

        // 2 + 10 transfers by alice, each with its postings, audit entry and event
        assert_eq!(
            count(
                &core,
                "SELECT COUNT(*) FROM transfers WHERE kind = 'transfer'"
            )
            .await,
            12
        );
        assert_eq!(
            count(&core, "SELECT COUNT(*) FROM postings p JOIN transfers t ON t.id = p.transfer_id WHERE t.kind = 'transfer'").await,
            24
        );
        assert_eq!(
            count(&core, "SELECT COUNT(*) FROM audit_log WHERE action = 'ledger.transfer.posted' AND actor = 'alice'").await,
            12
        );
        assert_eq!(
            count(
                &core,
                "SELECT COUNT(*) FROM outbox WHERE topic = 'ledger.transfer.posted'"
            )
            .await,
            12
        );
        // refusals are recorded with their key and reason; the replay and the reused
        // key are not refusals of a transfer
        assert_eq!(
            count(&core, "SELECT COUNT(*) FROM failed_transfers WHERE idempotency_key = 'steal' AND reason = 'account_not_found'").await,
            1
        );
        assert_eq!(
            count(&core, "SELECT COUNT(*) FROM failed_transfers WHERE idempotency_key = 'g10' AND reason = 'insufficient_funds'").await,
            1
        );
        assert_eq!(
            count(&core, "SELECT COUNT(*) FROM failed_transfers").await,
            2
        );
        // every new key stored (and alice's account opening), with the answer it got
        assert_eq!(
            count(
                &core,
                "SELECT COUNT(*) FROM idempotency_keys WHERE user_id = 'alice'"
            )
            .await,
            1 + 2 + 1 + 11
        );
        for (i, k) in [(3usize, "g0"), (14, "g10"), (2, "steal")] {
            let again = run_single(
                &core,
                job(
                    &alice,
                    k,
                    tr(
                        if k == "steal" { &b } else { &a },
                        if k == "steal" { &a } else { &b },
                        if k == "steal" { 1 } else { 10 },
                        if k == "steal" { "x" } else { "g" },
                    ),
                ),
            )
            .await
            .unwrap();
            assert!(again.replayed, "{k}");
            assert_eq!(again.body, out[i].as_ref().unwrap().body, "{k}");
        }
        // the running balance of each posting of account a follows its sequence
        let rows = sqlx::query(
            "SELECT amount, balance_after FROM postings WHERE account_id = $1 ORDER BY account_seq",
        )
        .bind(&a)
        .fetch_all(core.db.read())
        .await
        .unwrap();
        let mut running = 0i64;
        for r in &rows {
            running += r.try_get::<i64, _>("amount").unwrap();
            assert_eq!(running, r.try_get::<i64, _>("balance_after").unwrap());
        }
        assert_eq!(running, 3);
        let report = crate::verify(&core.db).await.unwrap();
        assert!(report.is_consistent(), "{backend:?}: {report}");
    }
}

/// Of three jobs, the first and last answered `ok` and the middle one failed with a
/// server error and stored no idempotency key (`k2`).
async fn failed_alone(core: &Core, out: &[Result<Reply, LedgerError>], ok: u16) {
    assert_eq!(out[0].as_ref().unwrap().status, ok);
    assert!(
        matches!(out[1], Err(ref e) if e.is_server_error()),
        "{:?}",
        out[1]
    );
    assert_eq!(out[2].as_ref().unwrap().status, ok);
    assert_eq!(
        count(
            core,
            "SELECT COUNT(*) FROM idempotency_keys WHERE key = 'k2'"
        )
        .await,
        0
    );
}

/// A database error inside a run of transfers fails only the job that caused it: the
/// run is rolled back and retried job by job, and the failed job stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_error_in_a_run_fails_only_its_job() {
    for backend in vaultpay_store::testing::backends() {
        let (core, alice, a, b) = two_accounts(backend).await;
        install_boom(&core, backend).await;
        let out = group(
            &core,
            vec![
                job(&alice, "k1", tr(&a, &b, 10, "ok")),
                job(&alice, "k2", tr(&a, &b, 20, "boom")),
                job(&alice, "k3", tr(&a, &b, 30, "ok")),
            ],
        )
        .await;
        failed_alone(&core, &out, 201).await;
        assert_eq!(balance(&core, &a).await, 60);
        assert_eq!(
            count(&core, "SELECT COUNT(*) FROM failed_transfers").await,
            0
        );
        assert_eq!(
            count(
                &core,
                "SELECT COUNT(*) FROM audit_log WHERE action = 'ledger.transfer.posted'"
            )
            .await,
            2
        );
        let report = crate::verify(&core.db).await.unwrap();
        assert!(report.is_consistent(), "{backend:?}: {report}");
    }
}

fn batch(atomic: bool, items: Vec<Op>) -> Op {
    Op::Batch(BatchRequest {
        transfers: items
            .into_iter()
            .map(|op| match op {
                Op::Transfer(r) => r,
                _ => unreachable!(),
            })
            .collect(),
        atomic,
    })
}

async fn install_boom(core: &Core, backend: Backend) {
    let sqls: &[&str] = match backend {
        Backend::Sqlite => &["CREATE TRIGGER boom BEFORE INSERT ON transfers WHEN NEW.description = 'boom' \
             BEGIN SELECT RAISE(ABORT, 'injected fault'); END"],
        Backend::Postgres => &[
            "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.description = 'boom' THEN RAISE EXCEPTION 'injected fault'; END IF; RETURN NEW; END; $$",
            "CREATE TRIGGER boom BEFORE INSERT ON transfers FOR EACH ROW EXECUTE FUNCTION boom()",
        ],
    };
    for s in sqls {
        sqlx::raw_sql(s).execute(core.db.writer()).await.unwrap();
    }
}

/// A group made only of batches runs without savepoints: mixed outcomes, an atomic
/// batch that fails (nothing applied, its failing item recorded), and later a replay
/// (the exact stored body) and a reused key (422), all as one-by-one execution gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_batches_matches_one_by_one_semantics() {
    for backend in vaultpay_store::testing::backends() {
        let (core, alice, a, b) = two_accounts(backend).await;
        let mixed = batch(
            false,
            vec![
                tr(&a, &b, 30, "one"),
                tr(&a, &b, 500, "too much"),
                tr(&a, &a, 1, "same account"),
                tr(&b, &a, 10, "back"),
            ],
        );
        let atomic = batch(
            true,
            vec![tr(&a, &b, 10, "x"), tr(&a, &b, 1_000, "too much")],
        );
        let plain = batch(false, vec![tr(&a, &b, 5, "five")]);
        let out = group(
            &core,
            vec![
                job(&alice, "b1", mixed.clone()),
                job(&alice, "b2", atomic),
                job(&alice, "b3", plain),
            ],
        )
        .await;
        let r1 = out[0].as_ref().unwrap();
        assert_eq!(r1.status, 200, "{}", r1.body);
        let v = r1.value();
        assert_eq!(
            (v["succeeded"].as_i64(), v["failed"].as_i64()),
            (Some(2), Some(2))
        );
        assert_eq!(v["items"][1]["problem"]["code"], "insufficient_funds");
        assert_eq!(v["items"][2]["problem"]["code"], "same_account");
        let r2 = out[1].as_ref().unwrap();
        assert_eq!(r2.status, 422, "{}", r2.body);
        assert_eq!(r2.value()["code"], "batch_failed");
        assert_eq!(out[2].as_ref().unwrap().status, 200);
        // 100 - 30 + 10 - 5 (the atomic batch applied nothing)
        assert_eq!(balance(&core, &a).await, 75);
        assert_eq!(balance(&core, &b).await, 25);
        // failed items: two of b1, the failing one of b2
        assert_eq!(
            count(&core, "SELECT COUNT(*) FROM failed_transfers").await,
            3
        );
        assert_eq!(
            count(
                &core,
                "SELECT COUNT(*) FROM idempotency_keys WHERE key IN ('b1', 'b2', 'b3')"
            )
            .await,
            3
        );

        // A later group: replay of b1 (exact body), b1's key with another request.
        let out2 = group(
            &core,
            vec![
                job(&alice, "b1", mixed),
                job(&alice, "b3", batch(false, vec![tr(&a, &b, 6, "six")])),
            ],
        )
        .await;
        let replay = out2[0].as_ref().unwrap();
        assert!(replay.replayed);
        assert_eq!((replay.status, &replay.body), (r1.status, &r1.body));
        assert_eq!(out2[1].as_ref().unwrap().status, 422);
        assert_eq!(
            out2[1].as_ref().unwrap().value()["code"],
            "idempotency_key_reused"
        );
        assert_eq!(balance(&core, &a).await, 75);
        let report = crate::verify(&core.db).await.unwrap();
        assert!(report.is_consistent(), "{backend:?}: {report}");
    }
}

/// A database error in one batch of a batch-only group fails only that batch: the
/// group is rolled back and its jobs run one by one; the failed one stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_error_in_a_batch_group_fails_only_its_job() {
    for backend in vaultpay_store::testing::backends() {
        let (core, alice, a, b) = two_accounts(backend).await;
        install_boom(&core, backend).await;
        let out = group(
            &core,
            vec![
                job(
                    &alice,
                    "k1",
                    batch(false, vec![tr(&a, &b, 10, "ok"), tr(&a, &b, 1, "ok")]),
                ),
                job(
                    &alice,
                    "k2",
                    batch(false, vec![tr(&a, &b, 20, "ok"), tr(&a, &b, 2, "boom")]),
                ),
                job(&alice, "k3", batch(true, vec![tr(&a, &b, 30, "ok")])),
            ],
        )
        .await;
        failed_alone(&core, &out, 200).await;
        assert_eq!(balance(&core, &a).await, 59);
        assert_eq!(
            count(
                &core,
                "SELECT COUNT(*) FROM audit_log WHERE action = 'ledger.batch.posted'"
            )
            .await,
            2
        );
        // retryable once the fault is gone
        sqlx::raw_sql("DROP TRIGGER boom ON transfers")
            .execute(core.db.writer())
            .await
            .ok();
        sqlx::raw_sql("DROP TRIGGER IF EXISTS boom")
            .execute(core.db.writer())
            .await
            .ok();
        let again = run_single(
            &core,
            job(
                &alice,
                "k2",
                batch(false, vec![tr(&a, &b, 20, "ok"), tr(&a, &b, 2, "boom")]),
            ),
        )
        .await
        .unwrap();
        assert_eq!(again.status, 200, "{}", again.body);
        assert_eq!(balance(&core, &a).await, 37);
        let report = crate::verify(&core.db).await.unwrap();
        assert!(report.is_consistent(), "{backend:?}: {report}");
    }
}

/// Two plain groups over different accounts and an exclusive group (a deposit) run at
/// the same time, as the committer's two lanes do on PostgreSQL (shared write lock, chain
/// lock taken last; the deposit waits for the write lock): every transfer is applied
/// once, and the ledger, audit chain included, verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_groups_side_by_side_keep_every_invariant() {
    for backend in vaultpay_store::testing::backends() {
        let core = setup(backend).await;
        let admin = Actor::new("admin", vec!["admin".into()], "");
        let alice = Actor::new("alice", vec!["customer".into()], "");
        let mut acct = Vec::new();
        for _ in 0..4 {
            acct.push(open(&core, &alice).await);
        }
        for (i, a) in acct.iter().enumerate() {
            let r = run_single(&core, job(&admin, &format!("d{i}"), deposit(a, 1_000)))
                .await
                .unwrap();
            assert_eq!(r.status, 201, "{}", r.body);
        }
        for round in 0..10 {
            let left: Vec<Job> = (0..8)
                .map(|i| {
                    job(
                        &alice,
                        &format!("l{round}-{i}"),
                        tr(&acct[0], &acct[1], 3, "l"),
                    )
                })
                .collect();
            let right: Vec<Job> = (0..8)
                .map(|i| {
                    job(
                        &alice,
                        &format!("r{round}-{i}"),
                        tr(&acct[2], &acct[3], 5, "r"),
                    )
                })
                .collect();
            let excl = vec![job(&admin, &format!("x{round}"), deposit(&acct[1], 7))];
            let (l, r, x) =
                tokio::join!(group(&core, left), group(&core, right), group(&core, excl));
            for out in l.iter().chain(&r).chain(&x) {
                assert_eq!(out.as_ref().unwrap().status, 201, "{backend:?}");
            }
        }
        assert_eq!(
            balance(&core, &acct[0]).await,
            1_000 - 10 * 8 * 3,
            "{backend:?}"
        );
        assert_eq!(balance(&core, &acct[1]).await, 1_000 + 10 * (8 * 3 + 7));
        assert_eq!(balance(&core, &acct[2]).await, 1_000 - 10 * 8 * 5);
        assert_eq!(balance(&core, &acct[3]).await, 1_000 + 10 * 8 * 5);
        let report = crate::verify(&core.db).await.unwrap();
        assert!(report.is_consistent(), "{backend:?}: {report}");
        assert_eq!(
            count(
                &core,
                "SELECT COUNT(*) FROM audit_log WHERE action = 'ledger.transfer.posted'"
            )
            .await,
            160
        );
    }
}

fn hold(from: &str, to: &str, amount: i64) -> Op {
    match tr(from, to, amount, "hold") {
        Op::Transfer(mut r) => {
            r.pending = true;
            Op::Transfer(r)
        }
        _ => unreachable!(),
    }
}

/// A group whose transaction breaks outside any one job's savepoint (here: storing the
/// group's idempotency keys fails for one key) wrote nothing, so its jobs are run again
/// one by one: only the job that breaks it fails, the others get their own answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_group_is_rerun_job_by_job() {
    for backend in vaultpay_store::testing::backends() {
        let (core, alice, a, b) = two_accounts(backend).await;
        let sqls: &[&str] = match backend {
            Backend::Sqlite => &["CREATE TRIGGER key_boom BEFORE INSERT ON idempotency_keys \
                 WHEN NEW.key = 'k2' BEGIN SELECT RAISE(ABORT, 'injected fault'); END"],
            Backend::Postgres => &[
                "CREATE FUNCTION key_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 IF NEW.key = 'k2' THEN RAISE EXCEPTION 'injected fault'; END IF; RETURN NEW; END; $$",
                "CREATE TRIGGER key_boom BEFORE INSERT ON idempotency_keys FOR EACH ROW \
                 EXECUTE FUNCTION key_boom()",
            ],
        };
        for s in sqls {
            sqlx::raw_sql(s).execute(core.db.writer()).await.unwrap();
        }
        // a hold in the group makes it an exclusive one, run with savepoints
        let out = group(
            &core,
            vec![
                job(&alice, "k1", tr(&a, &b, 10, "ok")),
                job(&alice, "k2", hold(&a, &b, 20)),
                job(&alice, "k3", tr(&a, &b, 30, "ok")),
            ],
        )
        .await;
        failed_alone(&core, &out, 201).await;
        assert_eq!(balance(&core, &a).await, 60, "{backend:?}");
        assert_eq!(
            count(
                &core,
                "SELECT COUNT(*) FROM transfers WHERE status = 'pending'"
            )
            .await,
            0,
            "{backend:?}: the failed hold left nothing behind"
        );
        let report = crate::verify(&core.db).await.unwrap();
        assert!(report.is_consistent(), "{backend:?}: {report}");
    }
}

/// A COMMIT refused for a lost race (here a deferred trigger raising PostgreSQL's
/// serialization failure for one transfer) wrote nothing: the group's jobs are run again
/// one by one, the others succeed and the one that keeps losing gets a retryable 503,
/// for a group of plain transfers and for an exclusive group alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_commit_loses_a_race_is_rerun_job_by_job() {
    for backend in vaultpay_store::testing::backends() {
        if backend != Backend::Postgres {
            continue; // SQLite has no deferred triggers
        }
        let (core, alice, a, b) = two_accounts(backend).await;
        for s in [
            "CREATE FUNCTION lose() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.description = 'lose' THEN \
             RAISE EXCEPTION 'injected conflict' USING ERRCODE = '40001'; END IF; \
             RETURN NULL; END; $$",
            "CREATE CONSTRAINT TRIGGER lose AFTER INSERT ON transfers \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION lose()",
        ] {
            sqlx::raw_sql(s).execute(core.db.writer()).await.unwrap();
        }
        for (round, last) in [("p", tr(&a, &b, 1, "ok")), ("x", hold(&a, &b, 1))] {
            let k = |n: u8| format!("{round}{n}");
            let out = group(
                &core,
                vec![
                    job(&alice, &k(1), tr(&a, &b, 10, "ok")),
                    job(&alice, &k(2), tr(&a, &b, 20, "lose")),
                    job(&alice, &k(3), last),
                ],
            )
            .await;
            assert_eq!(out[0].as_ref().unwrap().status, 201, "{round}");
            assert!(
                matches!(out[1], Err(ref e) if e.is_transient()),
                "{round}: {:?}",
                out[1]
            );
            assert_eq!(out[2].as_ref().unwrap().status, 201, "{round}");
        }
        // 100 - (10 + 1) - 10: the held 1 is reserved, not yet taken from the balance
        assert_eq!(balance(&core, &a).await, 79);
        assert_eq!(
            count(
                &core,
                "SELECT COUNT(*) FROM idempotency_keys WHERE key IN ('p2', 'x2')"
            )
            .await,
            0
        );
        let report = crate::verify(&core.db).await.unwrap();
        assert!(report.is_consistent(), "{report}");
    }
}
