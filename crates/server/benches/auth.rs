//! AuthShield benchmarks on this machine. Run:
//!
//! ```sh
//! cargo bench -p vaultpay-server --bench auth                      # SQLite
//! VAULTPAY_TEST_PG_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   cargo bench -p vaultpay-server --bench auth                    # + PostgreSQL
//! ```
//!
//! Measures (1) local JWT verification per core, (2) raw Argon2id verifications per
//! second on all cores against password logins over HTTP in the same run (alternating
//! 3 s windows of each), (3) refresh
//! rotations per second over HTTP, (4) the latency of an authenticated `GET /v1/me`
//! at a fixed open-loop rate of 1,000 requests/s (latency counted from each request's
//! scheduled send time, so a stall is not hidden by the generator waiting).
//! (5) OAuth: `client_credentials` grants per second and RFC 7662 introspections per
//! second (client_secret_basic), each with p50/p99 latency, 32 concurrent clients,
//! closed loop (`VAULTPAY_BENCH_OAUTH_SECS`, default 5 s per phase).
//! The load generator runs in the same process as the server, on the same 2 cores.
//! `VAULTPAY_BENCH_ONLY=jwt,login,refresh,me` runs only the named phases.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{open_loop, percentile};

use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vaultpay_core::jwt::{AccessClaims, Audience, KeySet, Rules, Signer25519};
use vaultpay_core::password::PasswordHasher;
use vaultpay_server::{Config, Mode};
use vaultpay_store::Backend;

const PASSWORD: &str = "correct-Horse-battery-staple-42";

/// Whether a phase was asked for (`VAULTPAY_BENCH_ONLY`, comma-separated; unset = all).
fn phase(name: &str) -> bool {
    match std::env::var("VAULTPAY_BENCH_ONLY") {
        Ok(v) => v.split(',').any(|p| p.trim() == name),
        Err(_) => true,
    }
}

fn jwt_verification() {
    let (signer, _) = Signer25519::generate("k1");
    let mut keys = KeySet::default();
    keys.insert("k1", &signer.public_key()).unwrap();
    let now = vaultpay_core::time::now_micros() / 1_000_000;
    let claims = AccessClaims {
        iss: "http://127.0.0.1:8080".into(),
        sub: uuid::Uuid::now_v7().to_string(),
        aud: Audience::One("vaultpay".into()),
        exp: now + 300,
        iat: now,
        nbf: now,
        jti: uuid::Uuid::now_v7().to_string(),
        sid: uuid::Uuid::now_v7().to_string(),
        roles: vec!["customer".into()],
        device_id: "laptop-1".into(),
        auth_time: now,
        amr: vec!["pwd".into()],
        acr: None,
        scope: None,
        client_id: None,
    };
    let token = signer.sign_access(&claims).unwrap();
    let rules = Rules {
        issuer: claims.iss.clone(),
        audience: "vaultpay".into(),
        leeway_secs: 5,
    };
    for _ in 0..2_000 {
        vaultpay_core::jwt::verify(&token, &keys, &rules, now).unwrap();
    }
    let n = 100_000;
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box(
            vaultpay_core::jwt::verify(std::hint::black_box(&token), &keys, &rules, now).unwrap(),
        );
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "jwt_verify_single_core (full Ed25519 verification with the key's tables, token not seen before): {:.0} verifications/s ({:.2} µs each, token {} bytes)",
        n as f64 / secs,
        secs * 1e6 / n as f64,
        token.len()
    );
    // The server's path: TokenVerifier, where a token seen before (the common case: a
    // token is presented many times in its 5-minute life) is answered from the
    // verified-token cache. One thread, so per core.
    struct NoKeys;
    impl vaultpay_web::KeySource for NoKeys {
        fn fetch(&self) -> futures::future::BoxFuture<'_, Result<KeySet, String>> {
            Box::pin(async { Err("none".to_owned()) })
        }
    }
    let v = vaultpay_web::TokenVerifier::new(rules, Arc::new(NoKeys), keys);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        v.verify(&token).await.unwrap();
        let n = 1_000_000;
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(v.verify(std::hint::black_box(&token)).await.unwrap());
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "jwt_verify_single_core (TokenVerifier, token seen before): {:.0} verifications/s ({:.2} µs each)",
            n as f64 / secs,
            secs * 1e6 / n as f64
        );
    });
}

fn argon2_ceiling(seconds: f64) -> f64 {
    let hasher = PasswordHasher::default();
    let phc = hasher.hash(PASSWORD).unwrap();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (h, p, c) = (hasher.clone(), phc.clone(), count.clone());
            s.spawn(move || {
                while Instant::now() < deadline {
                    assert!(h.verify(PASSWORD, &p));
                    c.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// (2) Password logins over HTTP (8 concurrent clients) against raw Argon2id
/// verifications on every core, in alternating windows: raw, logins, raw, logins, raw,
/// logins, raw (3 s each). This VM's speed drifts by several percent within a minute, so
/// one ceiling before and one after a single long login window compared the logins
/// with whichever moment was faster; windows taken in turn see the same drift. The
/// ratio is printed against the mean of the raw windows and, conservatively, against
/// the fastest one.
async fn login_vs_argon2(c: &Arc<Client>, backend: Backend) {
    const ROUNDS: usize = 3;
    const WINDOW: f64 = 3.0;
    let mut raw = vec![raw_window(WINDOW).await];
    let mut rates = Vec::new();
    let mut per_round = Vec::new();
    for _ in 0..ROUNDS {
        let c = c.clone();
        let (rate, _) = closed_loop(8, WINDOW, move || {
            let c = c.clone();
            async move {
                c.login("bench@example.com", "dev-login").await;
            }
        })
        .await;
        let before = *raw.last().unwrap();
        let after = raw_window(WINDOW).await;
        raw.push(after);
        per_round.push(format!("{:.1}%", 100.0 * rate / ((before + after) / 2.0)));
        rates.push(rate);
    }
    let rate = rates.iter().sum::<f64>() / rates.len() as f64;
    let mean = raw.iter().sum::<f64>() / raw.len() as f64;
    let max = raw.iter().copied().fold(0.0, f64::max);
    println!(
        "[{backend:?}] http_password_logins (8 concurrent): {rate:.1} logins/s = {:.1}% of the raw Argon2 ceiling's mean ({mean:.1}/s), {:.1}% of its fastest window ({max:.1}/s); rounds (vs the windows either side): {}; raw windows: {}",
        100.0 * rate / mean,
        100.0 * rate / max,
        per_round.join(", "),
        raw.iter().map(|r| format!("{r:.1}")).collect::<Vec<_>>().join(", ")
    );
}

async fn raw_window(seconds: f64) -> f64 {
    tokio::task::spawn_blocking(move || argon2_ceiling(seconds))
        .await
        .unwrap()
}

async fn config(backend: Backend) -> Config {
    let mut cfg = common::server_config(backend).await;
    if let Some(n) = std::env::var("VAULTPAY_BENCH_HASH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.auth.hash_concurrency = n;
    }
    // The benchmark drives many requests from one address and a few accounts.
    let big = vaultpay_core::gcra::Quota::new(1_000_000, 1);
    let rl = &mut cfg.auth.rate_limits;
    rl.login_per_ip = big;
    rl.login_per_account = big;
    rl.register_per_ip = big;
    rl.register_per_account = big;
    rl.refresh_per_ip = big;
    rl.refresh_per_session = big;
    cfg
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn post(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }

    async fn login(&self, email: &str, device: &str) -> Value {
        self.post(
            "/v1/auth/login",
            json!({"email": email, "password": PASSWORD, "device": {"id": device, "name": device}}),
        )
        .await
    }
}

async fn http_benchmarks(base: String, backend: Backend, login: bool) {
    let c = Arc::new(Client {
        http: reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(256)
            .build()
            .unwrap(),
        base,
    });
    c.post(
        "/v1/auth/register",
        json!({"email": "bench@example.com", "password": PASSWORD, "name": "Bench"}),
    )
    .await;

    // (2) logins over HTTP vs the raw Argon2 ceiling
    if login {
        login_vs_argon2(&c, backend).await;
    }

    // (3) refresh rotations: 64 clients, each rotating its own session's chain
    if phase("refresh") {
        refresh_rotations(&c, backend).await;
    }
    if phase("me") {
        me_open_loop(&c, backend).await;
    }
}

async fn refresh_rotations(c: &Arc<Client>, backend: Backend) {
    let clients = 64;
    let mut chains = Vec::new();
    for i in 0..clients {
        let t = c.login("bench@example.com", &format!("r-{i}")).await;
        chains.push((
            format!("r-{i}"),
            t["refresh_token"].as_str().unwrap().to_owned(),
        ));
    }
    let n = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    let start = Instant::now();
    let tasks: Vec<_> = chains
        .into_iter()
        .map(|(device, mut rt)| {
            let (c, n) = (c.clone(), n.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let r = c
                        .http
                        .post(format!("{}/oauth/token", c.base))
                        .form(&[
                            ("grant_type", "refresh_token"),
                            ("refresh_token", rt.as_str()),
                            ("device_id", device.as_str()),
                        ])
                        .send()
                        .await
                        .unwrap();
                    assert!(r.status().is_success(), "refresh: {}", r.status());
                    let v: Value = r.json().await.unwrap();
                    rt = v["refresh_token"].as_str().unwrap().to_owned();
                    n.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rate = n.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    println!("[{backend:?}] http_refresh_rotations ({clients} concurrent, durable commits): {rate:.0} rotations/s");
}

/// (4) GET /v1/me at a fixed 1,000 requests/s, open loop
async fn me_open_loop(c: &Arc<Client>, backend: Backend) {
    let token = c.login("bench@example.com", "me-bench").await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = Arc::new(token);
    let (rate, secs) = (1000, 10);
    get_open_loop(
        c,
        "/v1/me",
        Some(token),
        rate,
        secs,
        &format!("[{backend:?}] get_me_open_loop at {rate}/s for {secs}s"),
    )
    .await;
    // The floor under that number: the same open loop against /healthz (no token, no
    // database), so what /v1/me itself adds can be told from the harness and the VM.
    get_open_loop(
        c,
        "/healthz",
        None,
        rate,
        secs,
        &format!("[{backend:?}] get_healthz_open_loop (baseline) at {rate}/s for {secs}s"),
    )
    .await;
}

/// An open loop of `GET {path}` (with the bearer token, if any) at `rate`/s for `secs`.
async fn get_open_loop(
    c: &Arc<Client>,
    path: &'static str,
    token: Option<Arc<String>>,
    rate: u64,
    secs: u64,
    label: &str,
) {
    let c = c.clone();
    let run = open_loop(rate as f64, secs as f64, move || {
        let (c, token) = (c.clone(), token.clone());
        async move {
            let mut req = c.http.get(format!("{}{path}", c.base));
            if let Some(t) = &token {
                req = req.bearer_auth(&**t);
            }
            let r = req.send().await.unwrap();
            let ok = r.status().is_success();
            let _ = r.bytes().await;
            ok
        }
    })
    .await;
    println!("{label}: {}", run.summary());
}

/// Runs `op` from `workers` concurrent tasks for `secs`; returns (ops/s, sorted ms).
async fn closed_loop<F, Fut>(workers: usize, secs: f64, op: F) -> (f64, Vec<f64>)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    op().await;
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (rate, all)
}

/// (5) client_credentials grants/s and introspections/s (targets: ≥3,000/s; ≥10,000/s
/// with p99 < 5 ms).
async fn oauth_benchmarks(base: String, backend: Backend) {
    let secs: f64 = std::env::var("VAULTPAY_BENCH_OAUTH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let c = Client {
        http: http.clone(),
        base: base.clone(),
    };
    let admin = c.login(ADMIN, "oauth-bench").await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = http
        .post(format!("{base}/v1/admin/clients"))
        .bearer_auth(&admin)
        .json(&json!({"name": "bench", "grant_types": ["client_credentials"], "scopes": []}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "create client: {}", r.status());
    let client: Value = r.json().await.unwrap();
    let id = Arc::new(client["client_id"].as_str().unwrap().to_owned());
    let secret = Arc::new(client["client_secret"].as_str().unwrap().to_owned());
    let url = Arc::new(format!("{base}/oauth/token"));
    let (h, i, s, u) = (http.clone(), id.clone(), secret.clone(), url.clone());
    let (rate, lat) = closed_loop(32, secs, move || {
        let (h, i, s, u) = (h.clone(), i.clone(), s.clone(), u.clone());
        async move {
            let r = h
                .post(&*u)
                .basic_auth(&*i, Some(&*s))
                .form(&[("grant_type", "client_credentials")])
                .send()
                .await
                .unwrap();
            assert!(
                r.status().is_success(),
                "client_credentials: {}",
                r.status()
            );
            let _ = r.bytes().await;
        }
    })
    .await;
    println!(
        "[{backend:?}] oauth_client_credentials (32 concurrent): {rate:.0} grants/s, p50 {:.3} ms, p99 {:.3} ms (target >= 3000/s)",
        percentile(&lat, 50.0),
        percentile(&lat, 99.0)
    );
    let r = http
        .post(&*url)
        .basic_auth(&*id, Some(&*secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    let token: Value = r.json().await.unwrap();
    let token = Arc::new(token["access_token"].as_str().unwrap().to_owned());
    let url = Arc::new(format!("{base}/oauth/introspect"));
    let (http2, id2, secret2, url2, token2) = (
        http.clone(),
        id.clone(),
        secret.clone(),
        url.clone(),
        token.clone(),
    );
    let (rate, lat) = closed_loop(32, secs, move || {
        let (h, i, s, u, t) = (
            http.clone(),
            id.clone(),
            secret.clone(),
            url.clone(),
            token.clone(),
        );
        async move {
            let r = h
                .post(&*u)
                .basic_auth(&*i, Some(&*s))
                .form(&[("token", t.as_str())])
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "introspect: {}", r.status());
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["active"], true);
        }
    })
    .await;
    println!(
        "[{backend:?}] oauth_introspection (32 concurrent, peak): {rate:.0} introspections/s, p50 {:.3} ms, p99 {:.3} ms",
        percentile(&lat, 50.0),
        percentile(&lat, 99.0)
    );
    // The target as stated: 10,000 introspections/s, and the p99 at that rate.
    let rate = 10_000;
    let run = open_loop(rate as f64, secs.ceil(), move || {
        let (h, i, s, u, t) = (
            http2.clone(),
            id2.clone(),
            secret2.clone(),
            url2.clone(),
            token2.clone(),
        );
        async move {
            let Ok(r) = h
                .post(&*u)
                .basic_auth(&*i, Some(&*s))
                .form(&[("token", t.as_str())])
                .send()
                .await
            else {
                return false;
            };
            let Ok(v) = r.json::<Value>().await else {
                return false;
            };
            v["active"] == true
        }
    })
    .await;
    println!(
        "[{backend:?}] oauth_introspection open loop at {rate}/s (target >= 10000/s with p99 < 5 ms): {}",
        run.summary()
    );
}

const ADMIN: &str = "bench-admin@example.com";

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if phase("jwt") {
        jwt_verification();
    }
    // The server and the load generator get separate runtimes (as separate processes
    // would), so server tasks never queue behind client tasks; both share the 2 cores.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("loadgen")
        .enable_all()
        .build()
        .unwrap();
    for backend in vaultpay_store::testing::backends() {
        let running = server_rt.block_on(async {
            let cfg = config(backend).await;
            // An administrator registers the OAuth client of phase (5).
            let bootstrap = vaultpay_auth::Bootstrap {
                admin_email: Some(ADMIN.into()),
                admin_password: Some(vaultpay_core::secret::Secret::new(PASSWORD)),
            };
            vaultpay_server::start(cfg, Mode::All, bootstrap)
                .await
                .unwrap()
        });
        let base = format!("http://{}", running.addr);
        client_rt.block_on(http_benchmarks(base.clone(), backend, phase("login")));
        if phase("oauth") {
            client_rt.block_on(oauth_benchmarks(base, backend));
        }
        server_rt.block_on(running.stop()).unwrap();
    }
}
