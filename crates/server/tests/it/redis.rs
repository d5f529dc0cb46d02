//! Rate limits shared through Redis (cargo feature `redis`), against the real Redis
//! named by `VAULTPAY_TEST_REDIS_URL` (CI sets it; unset: skipped with a notice).

use crate::helpers::*;
use vaultpay_core::gcra::Quota;
use vaultpay_server::redis_limiter::RedisRateLimiter;
use vaultpay_store::Backend;
use vaultpay_web::RateLimiter;

fn redis_url() -> Option<String> {
    let url = std::env::var("VAULTPAY_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!("note: VAULTPAY_TEST_REDIS_URL is not set; Redis tests skipped");
    }
    url
}

#[tokio::test]
async fn replicas_share_one_budget() {
    let Some(url) = redis_url() else { return };
    let prefix = format!("vaultpay-test:{}:", uuid::Uuid::now_v7());
    let a = RedisRateLimiter::new(&url)
        .unwrap()
        .with_prefix(prefix.clone());
    let b = RedisRateLimiter::new(&url).unwrap().with_prefix(prefix);
    let q = Quota::new(3, 60);
    assert!(a.check("k", q).await.unwrap().allowed);
    assert_eq!(b.check("k", q).await.unwrap().remaining, 1);
    assert!(a.check("k", q).await.unwrap().allowed);
    let refused = b.check("k", q).await.unwrap();
    assert!(!refused.allowed);
    assert_eq!(refused.retry_after_secs, 20);
    // other keys are independent, reset clears
    assert!(b.check("other", q).await.unwrap().allowed);
    a.reset("k").await.unwrap();
    assert!(b.check("k", q).await.unwrap().allowed);
}

#[tokio::test]
async fn unreachable_redis_fails_closed() {
    let l = RedisRateLimiter::new("redis://127.0.0.1:1").unwrap();
    assert!(l.check("k", Quota::new(1, 1)).await.is_err());
}

#[tokio::test]
async fn two_servers_enforce_the_same_login_limit() {
    let Some(url) = redis_url() else { return };
    let tweak = |cfg: &mut vaultpay_server::Config| {
        cfg.redis_url = Some(vaultpay_core::secret::Secret::new(url.clone()));
        cfg.auth.rate_limits.login_per_account = Quota::new(2, 60);
    };
    let one = TestApp::spawn_with(Backend::Sqlite, tweak).await;
    let two = TestApp::spawn_with(Backend::Sqlite, tweak).await;
    // a fresh address so earlier runs' keys don't interfere
    let email = format!("shared-{}@example.com", uuid::Uuid::now_v7().simple());
    assert_eq!(
        one.login_device(&email, "wrong-password-1", "d")
            .await
            .status,
        401
    );
    assert_eq!(
        two.login_device(&email, "wrong-password-2", "d")
            .await
            .status,
        401
    );
    let third = one.login_device(&email, "wrong-password-3", "d").await;
    third.assert_problem(429, "rate_limited");
    assert!(third.header("retry-after").is_some());
    one.stop().await;
    two.stop().await;
}
