//! Ledger load generator: transfers over HTTP against the real server on this machine,
//! durable commits on (SQLite `synchronous=FULL`; PostgreSQL `synchronous_commit=on`).
//!
//! ```sh
//! cargo bench -p vaultpay-server --bench ledger                    # SQLite
//! VAULTPAY_TEST_PG_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   cargo bench -p vaultpay-server --bench ledger                  # + PostgreSQL
//! VAULTPAY_BENCH_SECS=20 cargo bench -p vaultpay-server --bench ledger
//! ```
//!
//! For each backend, with group commit on and then off (one transaction per request):
//! peak throughput of single transfers from 64 concurrent clients (closed loop), with
//! uniform and Zipf (hot-account) traffic; then an open loop at half the uniform peak,
//! reporting p50/p99/p99.9 latency measured from each request's scheduled send time;
//! then the batch API (1,000 transfers a request). The server and the load generator
//! run on separate tokio runtimes in one process and share the 2 cores.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use rand::Rng;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vaultpay_server::{Config, Mode};
use vaultpay_store::Backend;

const PASSWORD: &str = "correct-Horse-battery-staple-42";
const ACCOUNTS: usize = 200;
const CLIENTS: usize = 64;

fn secs() -> u64 {
    std::env::var("VAULTPAY_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

/// Zipf(s) over `n` ranks by inverse CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }

    fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.gen();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

#[derive(Clone, Copy)]
enum Traffic {
    Uniform,
    Zipf,
}

struct Ctx {
    http: reqwest::Client,
    base: String,
    token: String,
    accounts: Vec<String>,
    zipf: Zipf,
    seq: AtomicU64,
}

impl Ctx {
    fn pair(&self, traffic: Traffic, rng: &mut impl Rng) -> (usize, usize) {
        loop {
            let (a, b) = match traffic {
                Traffic::Uniform => (rng.gen_range(0..ACCOUNTS), rng.gen_range(0..ACCOUNTS)),
                Traffic::Zipf => (self.zipf.sample(rng), self.zipf.sample(rng)),
            };
            if a != b {
                return (a, b);
            }
        }
    }

    fn transfer_body(&self, traffic: Traffic, rng: &mut impl Rng) -> Value {
        let (a, b) = self.pair(traffic, rng);
        json!({"from_account_id": self.accounts[a], "to_account_id": self.accounts[b],
               "amount": rng.gen_range(1..100), "currency": "USD", "description": "bench"})
    }

    async fn transfer(&self, traffic: Traffic) -> bool {
        let body = self.transfer_body(traffic, &mut rand::thread_rng());
        let key = format!("t-{}", self.seq.fetch_add(1, Ordering::Relaxed));
        let r = self
            .http
            .post(format!("{}/v1/transfers", self.base))
            .bearer_auth(&self.token)
            .header("idempotency-key", key)
            .json(&body)
            .send()
            .await;
        match r {
            Ok(r) => {
                let ok = r.status().as_u16() == 201;
                let _ = r.bytes().await;
                ok
            }
            Err(_) => false,
        }
    }
}

async fn setup(base: String) -> Arc<Ctx> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap();
    let login: Value = http
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({"email": "admin@example.com", "password": PASSWORD, "device": {"id": "bench", "name": "bench"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap().to_owned();
    let mut accounts = Vec::new();
    for i in 0..ACCOUNTS {
        let a: Value = http
            .post(format!("{base}/v1/accounts"))
            .bearer_auth(&token)
            .header("idempotency-key", format!("open-{i}"))
            .json(&json!({"currency": "USD", "kind": "current", "name": format!("bench {i}")}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = a["id"].as_str().unwrap().to_owned();
        let r = http
            .post(format!("{base}/v1/admin/deposits"))
            .bearer_auth(&token)
            .header("idempotency-key", format!("fund-{i}"))
            .json(&json!({"account_id": id, "amount": 1_000_000_000i64, "currency": "USD", "reference": "bench"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "deposit: {}", r.status());
        accounts.push(id);
    }
    Arc::new(Ctx {
        http,
        base,
        token,
        accounts,
        zipf: Zipf::new(ACCOUNTS, 1.1),
        seq: AtomicU64::new(0),
    })
}

/// Closed loop: `CLIENTS` clients sending back to back; returns transfers/s.
async fn peak(ctx: &Arc<Ctx>, traffic: Traffic) -> (f64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs());
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (ctx, ok, failed) = (ctx.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    if ctx.transfer(traffic).await {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (
        ok.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(),
        failed.load(Ordering::Relaxed),
    )
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[(((p / 100.0) * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
}

/// Open loop at `rate`/s: latency from each request's scheduled time (ms).
async fn open_loop(ctx: &Arc<Ctx>, rate: f64) -> (f64, f64, f64, u64) {
    let total = (rate * secs() as f64) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let handles: Vec<_> = (0..total)
        .map(|i| {
            let ctx = ctx.clone();
            let at = start + interval.mul_f64(i as f64);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let ok = ctx.transfer(Traffic::Uniform).await;
                (at.elapsed().as_secs_f64() * 1e3, ok)
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(handles.len());
    let mut errors = 0;
    for h in handles {
        let (ms, ok) = h.await.unwrap();
        errors += u64::from(!ok);
        lat.push(ms);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (pct(&lat, 50.0), pct(&lat, 99.0), pct(&lat, 99.9), errors)
}

/// Batches of 1,000 transfers from 4 clients; returns transfers/s.
async fn batches(ctx: &Arc<Ctx>) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs());
    let start = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (ctx, done) = (ctx.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let transfers: Vec<Value> = {
                        let mut rng = rand::thread_rng();
                        (0..1000)
                            .map(|_| ctx.transfer_body(Traffic::Uniform, &mut rng))
                            .collect()
                    };
                    let key = format!("b-{}", ctx.seq.fetch_add(1, Ordering::Relaxed));
                    let r = ctx
                        .http
                        .post(format!("{}/v1/transfers/batch", ctx.base))
                        .bearer_auth(&ctx.token)
                        .header("idempotency-key", key)
                        .json(&json!({"transfers": transfers, "atomic": false}))
                        .send()
                        .await
                        .unwrap();
                    assert!(r.status().is_success(), "batch: {}", r.status());
                    let v: Value = r.json().await.unwrap();
                    done.fetch_add(v["succeeded"].as_u64().unwrap_or(0), Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn config(backend: Backend, group_commit: bool) -> Config {
    let mut cfg = common::server_config(backend).await;
    cfg.body_limit_bytes = 4 * 1024 * 1024;
    cfg.database.max_connections = 32;
    cfg.ledger.group_commit = group_commit;
    cfg
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for backend in vaultpay_store::testing::backends() {
        let mut peaks = Vec::new();
        for group_commit in [true, false] {
            let mode = if group_commit {
                "group commit"
            } else {
                "one tx per request"
            };
            let running = server_rt.block_on(async {
                let bootstrap = vaultpay_auth::Bootstrap {
                    admin_email: Some("admin@example.com".into()),
                    admin_password: Some(vaultpay_core::secret::Secret::new(PASSWORD)),
                };
                vaultpay_server::start(config(backend, group_commit).await, Mode::All, bootstrap)
                    .await
                    .unwrap()
            });
            let base = format!("http://{}", running.addr);
            client_rt.block_on(async {
                let ctx = setup(base).await;
                let (uniform, f1) = peak(&ctx, Traffic::Uniform).await;
                println!("[{backend:?}] [{mode}] single transfers, {CLIENTS} clients, uniform over {ACCOUNTS} accounts: {uniform:.0} transfers/s (failed {f1})");
                let (zipf, f2) = peak(&ctx, Traffic::Zipf).await;
                println!("[{backend:?}] [{mode}] single transfers, {CLIENTS} clients, Zipf s=1.1 (hot accounts): {zipf:.0} transfers/s (failed {f2})");
                let (p50, p99, p999, errors) = open_loop(&ctx, (uniform / 2.0).max(1.0)).await;
                println!("[{backend:?}] [{mode}] open loop at {:.0}/s (half of peak): p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms, errors {errors}", uniform / 2.0);
                if group_commit {
                    let b = batches(&ctx).await;
                    println!("[{backend:?}] batch API (1,000 per request, 4 clients): {b:.0} transfers/s");
                }
                peaks.push(uniform);
            });
            server_rt.block_on(running.stop()).unwrap();
        }
        println!(
            "[{backend:?}] group commit gain: {:.2}x the one-transaction-per-request peak",
            peaks[0] / peaks[1]
        );
    }
}
