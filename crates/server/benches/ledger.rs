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
//! uniform and Zipf s=1.1 (hot-account) traffic; then an open loop at half the uniform
//! peak, reporting p50/p99/p99.9 latency measured from each request's scheduled send
//! time (so a stall cannot hide behind coordinated omission); then the batch API (1,000
//! transfers a request). At the end of every server run, `vaultpay_ledger::verify`
//! checks all ledger invariants and the audit chain, and the run fails if any is broken.
//! The server and the load generator run on separate tokio runtimes in one process and
//! share the 2 cores. Every request carries a bearer token and an `Idempotency-Key`.
//!
//! Environment: `VAULTPAY_BENCH_SECS` (per phase, default 10), `VAULTPAY_BENCH_DB`
//! (`sqlite` or `postgres`: only that backend), `VAULTPAY_BENCH_PHASES` (comma list of
//! `uniform,zipf,open,batch,nogc`; default all; `nogc` adds the one-transaction-per-
//! request comparison run), `VAULTPAY_BENCH_OPEN_RATE` (fixed open-loop rate instead
//! of half the uniform peak), `VAULTPAY_BENCH_BATCH_CLIENTS` (default 8; 4, 8
//! and 16 compared in BENCHMARKS.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::percentile;

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

fn env_num(name: &str) -> Option<f64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn phase(name: &str) -> bool {
    match std::env::var("VAULTPAY_BENCH_PHASES") {
        Ok(p) if !p.trim().is_empty() => p.split(',').any(|x| x.trim() == name),
        _ => true,
    }
}

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

/// A transfer request body. Typed, so the generator spends less of the two shared
/// cores building it than a `serde_json::Value` of maps costs.
#[derive(serde::Serialize)]
struct Body<'a> {
    from_account_id: &'a str,
    to_account_id: &'a str,
    amount: i64,
    currency: &'static str,
    description: &'static str,
}

/// The part of a batch response the generator counts; the rest of the ~400 KB body is
/// still read and checked to be JSON, without building a tree of it.
#[derive(serde::Deserialize)]
struct BatchSummary {
    succeeded: u64,
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

    fn transfer_body(&self, traffic: Traffic, rng: &mut impl Rng) -> Body<'_> {
        let (a, b) = self.pair(traffic, rng);
        Body {
            from_account_id: &self.accounts[a],
            to_account_id: &self.accounts[b],
            amount: rng.gen_range(1..100),
            currency: "USD",
            description: "bench",
        }
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

/// Closed loop: `CLIENTS` clients sending back to back; returns transfers/s, failures
/// and the p50/p99 latency (ms).
async fn peak(ctx: &Arc<Ctx>, traffic: Traffic) -> (f64, u64, f64, f64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs());
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (ctx, ok, failed) = (ctx.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    if ctx.transfer(traffic).await {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    lat.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99) = if lat.is_empty() {
        (0.0, 0.0)
    } else {
        (percentile(&lat, 50.0), percentile(&lat, 99.0))
    };
    (
        ok.load(Ordering::Relaxed) as f64 / elapsed,
        failed.load(Ordering::Relaxed),
        p50,
        p99,
    )
}

/// Open loop of uniform transfers at `rate`/s.
async fn open_loop(ctx: &Arc<Ctx>, rate: f64) -> common::OpenLoop {
    let ctx = ctx.clone();
    common::open_loop(rate, secs() as f64, move || {
        let ctx = ctx.clone();
        async move { ctx.transfer(Traffic::Uniform).await }
    })
    .await
}

fn batch_clients() -> usize {
    env_num("VAULTPAY_BENCH_BATCH_CLIENTS").map_or(8, |n| (n as usize).max(1))
}

/// Batches of 1,000 transfers from `batch_clients()` clients; returns transfers/s.
async fn batches(ctx: &Arc<Ctx>) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs());
    let start = Instant::now();
    let tasks: Vec<_> = (0..batch_clients())
        .map(|_| {
            let (ctx, done) = (ctx.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let transfers: Vec<Body<'_>> = {
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
                    let v: BatchSummary = r.json().await.unwrap();
                    done.fetch_add(v.succeeded, Ordering::Relaxed);
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
    cfg.database.max_connections = 32;
    cfg.ledger.group_commit = group_commit;
    // The accounts are funded with deposits far over the step-up threshold, by an
    // admin with no second factor; the measured transfers are all below it.
    cfg.ledger.step_up_large_transfers = false;
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
        .thread_name("loadgen")
        .enable_all()
        .build()
        .unwrap();
    let only = std::env::var("VAULTPAY_BENCH_DB").unwrap_or_default();
    for backend in vaultpay_store::testing::backends() {
        let name = match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        };
        if !only.is_empty() && only != name {
            continue;
        }
        let mut peaks = Vec::new();
        let modes: &[bool] = if phase("nogc") {
            &[true, false]
        } else {
            &[true]
        };
        for &group_commit in modes {
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
                let mut uniform = 0.0;
                if phase("uniform") {
                    let (tps, f, p50, p99) = peak(&ctx, Traffic::Uniform).await;
                    println!("[{backend:?}] [{mode}] single transfers, {CLIENTS} clients, uniform over {ACCOUNTS} accounts: {tps:.0} transfers/s (failed {f}; closed-loop p50 {p50:.2} ms, p99 {p99:.2} ms)");
                    uniform = tps;
                    peaks.push(tps);
                }
                if phase("zipf") {
                    let (tps, f, p50, p99) = peak(&ctx, Traffic::Zipf).await;
                    println!("[{backend:?}] [{mode}] single transfers, {CLIENTS} clients, Zipf s=1.1 (hot accounts): {tps:.0} transfers/s (failed {f}; closed-loop p50 {p50:.2} ms, p99 {p99:.2} ms)");
                }
                if phase("open") {
                    let rate = env_num("VAULTPAY_BENCH_OPEN_RATE").unwrap_or(uniform / 2.0).max(1.0);
                    let run = open_loop(&ctx, rate).await;
                    println!("[{backend:?}] [{mode}] open loop at {rate:.0}/s: {}", run.summary());
                }
                if group_commit && phase("batch") {
                    let b = batches(&ctx).await;
                    println!("[{backend:?}] batch API (1,000 per request, {} clients): {b:.0} transfers/s", batch_clients());
                }
            });
            let ledger = running.ledger.clone().expect("ledger running");
            let report = server_rt
                .block_on(vaultpay_ledger::verify(ledger.db()))
                .unwrap();
            assert!(
                report.is_consistent(),
                "[{backend:?}] [{mode}] verify: {report}"
            );
            println!("[{backend:?}] [{mode}] verify ok: {} accounts, {} transfers, {} postings, {} audit entries", report.accounts, report.transfers, report.postings, report.audit_entries);
            server_rt.block_on(running.stop()).unwrap();
        }
        if peaks.len() == 2 {
            println!(
                "[{backend:?}] group commit gain: {:.2}x the one-transaction-per-request peak",
                peaks[0] / peaks[1]
            );
        }
    }
}
