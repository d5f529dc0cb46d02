//! The audit chain stays intact when this process's cached head is stale: after a
//! rolled-back append, and when another process appends to the same database.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use vaultpay_store::audit::{
    append, append_many, list, verify_chain, AuditFilter, ChainReport, NewAudit, Origin,
};
use vaultpay_store::testing::{backends, fresh_location};
use vaultpay_store::{Db, DbOptions, Service};

async fn add(db: &Db, action: &str, commit: bool) -> i64 {
    let mut tx = db.begin().await.unwrap();
    let seq = append(db, &mut tx, &Origin::default(), NewAudit::success(action))
        .await
        .unwrap();
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
    seq
}

#[tokio::test]
async fn stale_cached_heads_never_fork_or_gap_the_chain() {
    for backend in backends() {
        let loc = fresh_location(backend).await.unwrap();
        let opts = DbOptions {
            sqlite_synchronous_full: false,
            ..DbOptions::default()
        };
        let one = Db::open(&loc, Service::Auth, &opts).await.unwrap();
        assert_eq!(add(&one, "a", true).await, 1);
        assert_eq!(add(&one, "b", true).await, 2);
        // rolled back: this process's cached head now names a row that does not exist
        assert_eq!(add(&one, "rolled-back", false).await, 3);
        assert_eq!(
            add(&one, "c", true).await,
            3,
            "the guard refuses the stale head"
        );
        // another process (its own cache) appends to the same database
        let two = Db::open(&loc, Service::Auth, &opts).await.unwrap();
        assert_eq!(add(&two, "from-two", true).await, 4);
        assert_eq!(add(&one, "d", true).await, 5);
        assert_eq!(add(&two, "e", true).await, 6);
        assert_eq!(
            verify_chain(&one).await.unwrap(),
            ChainReport::Intact { entries: 6 },
            "{backend:?}"
        );
        one.close().await;
        two.close().await;
    }
}

async fn add_many(db: &Db, actions: &[&str], commit: bool) -> i64 {
    let origin = Origin {
        ip: Some("192.0.2.7".into()),
        ..Origin::default()
    };
    let items: Vec<_> = actions
        .iter()
        .map(|a| (&origin, NewAudit::success(a).actor("u1")))
        .collect();
    let mut tx = db.begin().await.unwrap();
    let seq = append_many(db, &mut tx, &items).await.unwrap();
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
    seq
}

#[tokio::test]
async fn multi_row_appends_chain_in_order_and_survive_stale_heads() {
    for backend in backends() {
        let loc = fresh_location(backend).await.unwrap();
        let opts = DbOptions {
            sqlite_synchronous_full: false,
            ..DbOptions::default()
        };
        let one = Db::open(&loc, Service::Auth, &opts).await.unwrap();
        assert_eq!(add_many(&one, &[], true).await, 0, "nothing to append");
        assert_eq!(add(&one, "first", true).await, 1);
        assert_eq!(add_many(&one, &["g1", "g2", "g3"], true).await, 4);
        // a rolled-back group leaves a stale cached head: the next group must not fork
        assert_eq!(add_many(&one, &["x1", "x2"], false).await, 6);
        assert_eq!(add_many(&one, &["h1", "h2"], true).await, 6);
        // another process appends between two groups of this one
        let two = Db::open(&loc, Service::Auth, &opts).await.unwrap();
        assert_eq!(add_many(&two, &["t1"], true).await, 7);
        let big: Vec<String> = (0..1_200).map(|i| format!("bulk{i}")).collect();
        let big: Vec<&str> = big.iter().map(String::as_str).collect();
        assert_eq!(add_many(&one, &big, true).await, 1_207, "several chunks");
        assert_eq!(
            verify_chain(&one).await.unwrap(),
            ChainReport::Intact { entries: 1_207 },
            "{backend:?}"
        );
        let page = list(
            &one,
            &AuditFilter {
                limit: 10,
                before_seq: Some(8),
                ..AuditFilter::default()
            },
        )
        .await
        .unwrap();
        let actions: Vec<&str> = page.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["t1", "h2", "h1", "g3", "g2", "g1", "first"]);
        assert!(page[..6]
            .iter()
            .all(|e| e.ip.as_deref() == Some("192.0.2.7")));
        one.close().await;
        two.close().await;
    }
}
