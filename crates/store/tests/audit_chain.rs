//! The audit chain stays intact when this process's cached head is stale: after a
//! rolled-back append, and when another process appends to the same database.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use vaultpay_store::audit::{append, verify_chain, ChainReport, NewAudit, Origin};
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
