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
    two_servers_share_a_login_limit(&url, None).await;
}

/// The Redis with TLS named by `VAULTPAY_TEST_REDIS_TLS_URL` (`rediss://`), whose
/// certificate the PEM authority in `VAULTPAY_TEST_REDIS_CA` signed (CI starts one).
fn redis_tls() -> Option<(String, std::path::PathBuf)> {
    let url = std::env::var("VAULTPAY_TEST_REDIS_TLS_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let ca = std::env::var("VAULTPAY_TEST_REDIS_CA")
        .ok()
        .filter(|u| !u.is_empty());
    match (url, ca) {
        (Some(u), Some(c)) => Some((u, c.into())),
        (None, None) => {
            eprintln!("note: VAULTPAY_TEST_REDIS_TLS_URL is not set; Redis TLS tests skipped");
            None
        }
        _ => panic!("set both VAULTPAY_TEST_REDIS_TLS_URL and VAULTPAY_TEST_REDIS_CA"),
    }
}

/// Over TLS: trusting the configured authority it works (limiter, and two servers
/// sharing a login limit); trusting only the system's roots, the self-signed authority
/// is refused and the limiter fails closed.
#[tokio::test]
async fn rediss_with_its_authority_works_and_without_it_fails_closed() {
    let Some((url, ca)) = redis_tls() else { return };
    let prefix = format!("vaultpay-test:{}:", uuid::Uuid::now_v7());
    let l = RedisRateLimiter::with_ca(&url, Some(&ca))
        .unwrap()
        .with_prefix(prefix.clone());
    let q = Quota::new(1, 60);
    assert!(l.check("k", q).await.unwrap().allowed);
    assert!(!l.check("k", q).await.unwrap().allowed);
    let untrusting = RedisRateLimiter::new(&url).unwrap().with_prefix(prefix);
    assert!(untrusting.check("k2", q).await.is_err());
    two_servers_share_a_login_limit(&url, Some(ca)).await;
}

/// Plain `redis://` carries the password and the limits in clear: only to loopback.
#[tokio::test]
async fn plain_redis_is_refused_off_loopback_without_echoing_the_password() {
    for url in [
        "redis://:hunter2-secret@10.1.2.3:6379",
        "redis://:hunter2-secret@redis.internal/0",
    ] {
        let e = RedisRateLimiter::new(url).err().expect(url).to_string();
        assert!(e.contains("rediss://"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
    for url in [
        "redis://127.0.0.1:6379",
        "redis://localhost:6379",
        "redis://[::1]:6379",
        "rediss://redis.internal:6380",
    ] {
        assert!(RedisRateLimiter::new(url).is_ok(), "{url}");
    }
    let ca = std::env::temp_dir().join(format!("vp-noca-{}", uuid::Uuid::now_v7()));
    std::fs::write(&ca, "not a certificate").unwrap();
    let e = RedisRateLimiter::with_ca("redis://127.0.0.1:6379", Some(&ca))
        .err()
        .unwrap();
    assert!(e.to_string().contains("not rediss://"), "{e}");
    let e = RedisRateLimiter::with_ca("rediss://127.0.0.1:6380", Some(&ca))
        .err()
        .unwrap();
    assert!(e.to_string().contains("no PEM certificate"), "{e}");
    std::fs::remove_file(&ca).unwrap();
}

async fn two_servers_share_a_login_limit(url: &str, ca: Option<std::path::PathBuf>) {
    let tweak = |cfg: &mut vaultpay_server::Config| {
        cfg.redis_url = Some(vaultpay_core::secret::Secret::new(url.to_owned()));
        cfg.redis_ca_path = ca.clone();
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

/// A TCP relay to `target` whose connections opened so far can be frozen (`freeze`):
/// they stay open and forward nothing, as a connection a NAT or load balancer dropped
/// without a word; connections opened later pass.
struct FreezableRelay {
    addr: std::net::SocketAddr,
    opened: std::sync::Arc<std::sync::atomic::AtomicU64>,
    frozen: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FreezableRelay {
    async fn start(target: &str) -> FreezableRelay {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (opened, frozen) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (o, f) = (opened.clone(), frozen.clone());
        let target = target.to_owned();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let n = o.fetch_add(1, Ordering::SeqCst) + 1;
                let Ok(up) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pump(dr, uw, n, f.clone()));
                tokio::spawn(pump(ur, dw, n, f.clone()));
            }
        });
        FreezableRelay {
            addr,
            opened,
            frozen,
        }
    }

    fn freeze(&self) {
        use std::sync::atomic::Ordering;
        self.frozen
            .store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    n: u64,
    frozen: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let k = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(k) => k,
        };
        if n <= frozen.load(std::sync::atomic::Ordering::SeqCst) {
            // frozen: the connection stays open and forwards nothing
            std::future::pending::<()>().await;
        }
        if w.write_all(&buf[..k]).await.is_err() {
            return;
        }
    }
}

/// The permission invalidation subscription notices a connection that went silent
/// (it pings it) and reconnects, dropping every cached permission, as messages may have
/// been missed: a role removed meanwhile stops counting. Before, the subscriber waited
/// on the dead connection for good, and the cache served the role until its TTL.
#[tokio::test]
async fn a_silently_dead_subscription_is_noticed() {
    let Some(url) = redis_url() else { return };
    let target = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let relay = FreezableRelay::start(&target).await;
    let app = TestApp::spawn_with(Backend::Sqlite, |c| {
        c.redis_url = Some(vaultpay_core::secret::Secret::new(format!(
            "redis://{}",
            relay.addr
        )));
        c.auth.permission_cache_ttl_secs = 3_600;
    })
    .await;
    // Until its subscription is up, a node uses no permission cache (it could miss an
    // invalidation): wait for it (bounded), so that the cache is in play below.
    for _ in 0..300 {
        if app.auth().invalidations_heard() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(app.auth().invalidations_heard(), "never subscribed");
    let email = format!("deaf-{}@example.com", uuid::Uuid::now_v7().simple());
    let id = crate::auth_flows::id_of(&app.register(&email).await);
    sqlx::query("INSERT INTO user_roles (user_id, role, granted_at, granted_by) VALUES ($1, 'compliance', 0, 'test')")
        .bind(&id)
        .execute(app.auth_db().writer())
        .await
        .unwrap();
    let t = app.login(&email, PASSWORD).await;
    let audit = || app.get("/v1/admin/audit?limit=1", Some(&t.access));
    assert_eq!(audit().await.status, reqwest::StatusCode::OK);
    // the role goes without an invalidation (as if its message were lost)
    sqlx::query("DELETE FROM user_roles WHERE user_id = $1 AND role = 'compliance'")
        .bind(&id)
        .execute(app.auth_db().writer())
        .await
        .unwrap();
    assert_eq!(
        audit().await.status,
        reqwest::StatusCode::OK,
        "served from the cache"
    );
    relay.freeze();
    // Bounded wait for the reconnect (a ping every 5 s, 3 s to answer), not a timing
    // assertion; without the ping it never comes.
    let mut refused = false;
    for _ in 0..300 {
        if audit().await.status == reqwest::StatusCode::FORBIDDEN {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(refused, "the dead subscription was not noticed");
    app.stop().await;
}

/// A trusted network revoked on a replica whose Redis connection has gone silent is
/// still dropped from the shared store (the command that timed out opens a fresh
/// connection, and the drop is retried), so the other replica holds the next sign-in
/// from it. Before, the other replica trusted it until the set's TTL (up to an hour).
#[tokio::test]
async fn a_network_revoked_while_redis_stalls_is_dropped_everywhere() {
    let Some(url) = redis_url() else { return };
    if !vaultpay_store::testing::backends().contains(&Backend::Postgres) {
        eprintln!("note: VAULTPAY_TEST_PG_URL is not set; skipped");
        return;
    }
    use crate::iptrust::{login_from, send_from};
    use vaultpay_core::secret::Secret;
    let target = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let relay = FreezableRelay::start(&target).await;
    let tweak = |c: &mut vaultpay_server::Config, redis: String| {
        c.redis_url = Some(Secret::new(redis));
        c.trusted_proxies = vec!["127.0.0.1".into()];
        c.auth.rate_limits.login_per_account = Quota::new(100, 60);
    };
    let mut cfg1 = test_config(Backend::Postgres).await;
    tweak(&mut cfg1, format!("redis://{}", relay.addr));
    let one = TestApp::start(cfg1).await;
    let mut cfg2 = test_config(Backend::Postgres).await;
    tweak(&mut cfg2, url.clone());
    cfg2.database = one.cfg.database.clone();
    cfg2.master_key = one.cfg.master_key.clone();
    let two = TestApp::start(cfg2).await;

    let email = format!("stall-{}@example.com", uuid::Uuid::now_v7().simple());
    one.register(&email).await;
    let first = login_from(&one, "198.51.100.1", &email, "d1").await;
    assert_eq!(first.status, reqwest::StatusCode::OK, "{}", first.text);
    // the other replica trusts the network through the shared set
    let r = login_from(&two, "198.51.100.7", &email, "d2").await;
    assert_eq!(r.status, reqwest::StatusCode::OK, "{}", r.text);
    let access = first.body["access_token"].as_str().unwrap().to_owned();
    let nets = send_from(
        &one,
        "198.51.100.1",
        reqwest::Method::GET,
        "/v1/me/trusted-networks",
        Some(&access),
        None,
    )
    .await;
    let net = nets.body["networks"][0]["id"].as_str().unwrap().to_owned();

    relay.freeze();
    let r = send_from(
        &one,
        "198.51.100.1",
        reqwest::Method::DELETE,
        &format!("/v1/me/trusted-networks/{net}"),
        Some(&access),
        None,
    )
    .await;
    assert_eq!(r.status, reqwest::StatusCode::NO_CONTENT, "{}", r.text);
    // Bounded wait for the retried drop (not a timing assertion).
    let mut held = false;
    for _ in 0..40 {
        let r = login_from(&two, "198.51.100.7", &email, "d2").await;
        if r.status == reqwest::StatusCode::ACCEPTED {
            held = true;
            break;
        }
        assert_eq!(r.status, reqwest::StatusCode::OK, "{}", r.text);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert!(held, "the other replica still trusts the revoked network");
    one.stop().await;
    two.stop().await;
}

/// A Redis that accepts connections and never answers (a host that went away behind a
/// load balancer): a burst of rate-limit checks fails closed without each opening its
/// own connection and waiting out its own timeout in turn (which queued sign-ins past
/// their deadline); a failed connect is tried again only after a second.
#[tokio::test]
async fn a_burst_against_a_mute_redis_fails_together() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let tarpit = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tarpit.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicU64::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = tarpit.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            held.push(c); // open, silent
        }
    });
    let l = std::sync::Arc::new(RedisRateLimiter::new(&format!("redis://{addr}")).unwrap());
    let checks = (0..20).map(|i| {
        let l = l.clone();
        tokio::spawn(async move { l.check(&format!("k{i}"), Quota::new(1, 1)).await })
    });
    for c in futures::future::join_all(checks).await {
        assert!(c.unwrap().is_err(), "fails closed");
    }
    let n = accepted.load(Ordering::SeqCst);
    assert!(n <= 4, "{n} connections for one burst");
}

/// A Redis stand-in that accepts connections and answers nothing, or (`handshake`) only
/// the connection handshake (`CLIENT SETINFO`): counts the connections it accepted and
/// the SUBSCRIBEs it got.
struct DeafRedis {
    url: String,
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    subscribes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl DeafRedis {
    async fn start(handshake: bool) -> DeafRedis {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let (accepted, subscribes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (a, s) = (accepted.clone(), subscribes.clone());
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
                    loop {
                        while let Some((cmd, used)) =
                            vaultpay_server::redis_test_support::resp_command(&buf)
                        {
                            buf.drain(..used);
                            if cmd == "SUBSCRIBE" {
                                s.fetch_add(1, Ordering::SeqCst);
                            } else if handshake && c.write_all(b"+OK\r\n").await.is_err() {
                                return;
                            }
                        }
                        match c.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    }
                });
            }
        });
        DeafRedis {
            url,
            accepted,
            subscribes,
        }
    }
}

/// The permission invalidation subscriber bounds its connect and its SUBSCRIBE: against
/// a Redis that accepts and never answers, or answers all but the SUBSCRIBE (a host gone
/// behind a load balancer, a wedged server), it gives up and tries a new connection.
/// Before, it waited on the first for good, every invalidation missed meanwhile.
#[tokio::test]
async fn the_subscriber_gives_up_on_a_redis_that_never_answers() {
    use std::sync::atomic::Ordering;
    use vaultpay_server::redis_cluster::RedisCluster;
    // no redis_url: nothing but the subscribers below talks to the stand-ins
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mute = DeafRedis::start(false).await;
    let deaf = DeafRedis::start(true).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let subscribers: Vec<_> = [&mute.url, &deaf.url]
        .into_iter()
        .map(|url| {
            RedisCluster::new(url)
                .unwrap()
                .spawn_subscriber(app.auth().clone(), stopped.clone())
        })
        .collect();
    // Bounded wait for the second attempts (a try gets 5 s, the next comes a second
    // later), not a timing assertion: unbounded, the first try never ends.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while mute.accepted.load(Ordering::SeqCst) < 2 || deaf.subscribes.load(Ordering::SeqCst) < 2
        {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        mute.accepted.load(Ordering::SeqCst) >= 2,
        "the subscriber waited for good on a connect that got no answer"
    );
    assert!(
        deaf.subscribes.load(Ordering::SeqCst) >= 2 && deaf.accepted.load(Ordering::SeqCst) >= 2,
        "the subscriber waited for good on a SUBSCRIBE that got no answer"
    );
    stop.send(true).unwrap();
    for s in subscribers {
        tokio::time::timeout(std::time::Duration::from_secs(10), s)
            .await
            .expect("the subscriber stops")
            .unwrap();
    }
    app.stop().await;
}
