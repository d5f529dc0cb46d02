//! Open-loop load generator for the ledger's HTTP API.
//!
//! Starts the ledger in this process on a loopback port (real HTTP/1.1 over TCP, real
//! token verification, durable commits: SQLite `synchronous=FULL` or PostgreSQL), opens
//! `--accounts` wallets (one owner each) with a deposit, then drives transfers from
//! `--clients` concurrent clients for `--duration` seconds.
//!
//! Open loop: request k of a client is *scheduled* at `start + k / per_client_rate`;
//! latency is measured from the scheduled instant, so a stalled server shows up as
//! latency instead of silently lowering the offered load (no coordinated omission).
//! `--rate 0` sends as fast as the clients can (closed loop; finds the peak).
//!
//! ```text
//! cargo run --release -p vaultpay-ledger --example vaultpay-loadgen -- \
//!     --db sqlite --mode single --dist zipf --clients 64 --rate 0 --duration 10 --group-commit on
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::future::BoxFuture;
use rand::Rng;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vaultpay_core::jwt::{AccessClaims, Audience, KeySet, Rules, Signer25519};
use vaultpay_ledger::{Ledger, LedgerConfig};
use vaultpay_proto::auth::Introspection;
use vaultpay_store::{Db, DbOptions, Service};
use vaultpay_web::{Introspector, KeySource, TokenVerifier};

struct Keys(KeySet);
impl KeySource for Keys {
    fn fetch(&self) -> BoxFuture<'_, Result<KeySet, String>> {
        let k = self.0.clone();
        Box::pin(async move { Ok(k) })
    }
}

struct AlwaysLive;
impl Introspector for AlwaysLive {
    fn introspect<'a>(
        &'a self,
        _: &'a str,
        _: Option<std::net::IpAddr>,
    ) -> BoxFuture<'a, Result<Introspection, String>> {
        Box::pin(async {
            Ok(Introspection {
                active: true,
                sub: None,
                sid: None,
                exp: None,
                iat: None,
                token_type: None,
                roles: None,
                client_id: None,
                network_trusted: None,
            })
        })
    }
}

#[derive(Debug, Clone)]
struct Args {
    db: String,
    mode: String,
    dist: String,
    clients: usize,
    rate: f64,
    duration: f64,
    accounts: usize,
    group_commit: bool,
    batch_size: usize,
    zipf_s: f64,
}

fn args() -> Args {
    let mut a = Args {
        db: "sqlite".into(),
        mode: "single".into(),
        dist: "uniform".into(),
        clients: 64,
        rate: 0.0,
        duration: 10.0,
        accounts: 1000,
        group_commit: true,
        batch_size: 1000,
        zipf_s: 1.1,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--db" => a.db = val,
            "--mode" => a.mode = val,
            "--dist" => a.dist = val,
            "--clients" => a.clients = val.parse().expect("--clients"),
            "--rate" => a.rate = val.parse().expect("--rate"),
            "--duration" => a.duration = val.parse().expect("--duration"),
            "--accounts" => a.accounts = val.parse().expect("--accounts"),
            "--group-commit" => a.group_commit = val == "on",
            "--batch-size" => a.batch_size = val.parse().expect("--batch-size"),
            "--zipf-s" => a.zipf_s = val.parse().expect("--zipf-s"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

/// Zipf sampler over 0..n by inverse CDF (precomputed).
struct Zipf(Vec<f64>);
impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf(cdf)
    }
    fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.gen();
        self.0.partition_point(|c| *c < u).min(self.0.len() - 1)
    }
}

fn token(signer: &Signer25519, user: &str, roles: &[&str]) -> String {
    let now = vaultpay_core::time::now_micros() / 1_000_000;
    let c = AccessClaims {
        iss: "loadgen".into(),
        sub: user.into(),
        aud: Audience::One("vaultpay".into()),
        exp: now + 86_400,
        iat: now,
        nbf: now,
        jti: uuid::Uuid::now_v7().to_string(),
        sid: format!("s-{user}"),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        device_id: String::new(),
        auth_time: now,
        amr: vec![],
        acr: None,
        scope: None,
        client_id: None,
    };
    signer.sign(&c).unwrap()
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(args()));
}

async fn run(a: Args) {
    let location = if a.db == "sqlite" {
        let dir = std::env::temp_dir().join("vaultpay-loadgen");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("ledger-{}.db", uuid::Uuid::now_v7().simple()));
        p.display().to_string()
    } else {
        vaultpay_store::testing::fresh_location(vaultpay_store::Backend::Postgres)
            .await
            .unwrap()
    };
    let opts = DbOptions {
        max_connections: 16,
        sqlite_synchronous_full: true,
        ..DbOptions::default()
    };
    let db = Db::open(&location, Service::Ledger, &opts).await.unwrap();
    let config = LedgerConfig {
        group_commit: a.group_commit,
        introspection_threshold_minor: i64::MAX,
        ..LedgerConfig::default()
    };
    let ledger = Ledger::new(db.clone(), config, Arc::new(AlwaysLive));
    let (signer, _) = Signer25519::generate("lg");
    let mut keys = KeySet::default();
    keys.insert("lg", &signer.public_key()).unwrap();
    let rules = Rules {
        issuer: "loadgen".into(),
        audience: "vaultpay".into(),
        leeway_secs: 5,
    };
    let verifier = Arc::new(TokenVerifier::new(
        rules,
        Arc::new(Keys(keys.clone())),
        keys,
    ));
    let app = ledger.router().layer(axum::Extension(verifier));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(a.clients * 2)
        .build()
        .unwrap();
    let admin = token(&signer, "admin", &["admin"]);
    // setup: one wallet per user, each with a deposit
    let mut wallets: Vec<(String, String)> = Vec::with_capacity(a.accounts);
    let setup = Instant::now();
    let mut futs = Vec::new();
    for i in 0..a.accounts {
        let (http, base, signer, admin) =
            (http.clone(), base.clone(), signer.clone(), admin.clone());
        futs.push(tokio::spawn(async move {
            let tok = token(&signer, &format!("user-{i}"), &["customer"]);
            let r: serde_json::Value = http
                .post(format!("{base}/v1/accounts"))
                .bearer_auth(&tok)
                .json(&json!({"currency": "USD", "kind": "current", "name": "load"}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let id = r["id"].as_str().unwrap().to_owned();
            let s = http
                .post(format!("{base}/v1/admin/deposits"))
                .bearer_auth(&admin)
                .header("idempotency-key", uuid::Uuid::now_v7().to_string())
                .json(&json!({"account_id": id, "amount": 1_000_000_000i64, "currency": "USD", "reference": "seed"}))
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(s.as_u16(), 201);
            (tok, id)
        }));
    }
    for f in futs {
        wallets.push(f.await.unwrap());
    }
    eprintln!(
        "setup: {} wallets in {:.1}s",
        wallets.len(),
        setup.elapsed().as_secs_f64()
    );

    let wallets = Arc::new(wallets);
    let zipf = Arc::new(Zipf::new(a.accounts, a.zipf_s));
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = start + Duration::from_secs_f64(a.duration);
    let per_client = if a.rate > 0.0 {
        Some(a.rate / a.clients as f64)
    } else {
        None
    };
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let (http, base, wallets, zipf, a) = (
            http.clone(),
            base.clone(),
            wallets.clone(),
            zipf.clone(),
            a.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut ok, mut failed, mut transfers) = (0u64, 0u64, 0u64);
            let mut k = 0u64;
            let offset = per_client.map(|r| c as f64 / (r * a.clients as f64)).unwrap_or(0.0);
            loop {
                let scheduled = match per_client {
                    Some(r) => start + Duration::from_secs_f64(offset + k as f64 / r),
                    None => Instant::now().max(start),
                };
                if scheduled >= deadline {
                    break;
                }
                tokio::time::sleep_until(scheduled.into()).await;
                k += 1;
                let pick = |rng: &mut rand::rngs::ThreadRng| -> (usize, usize) {
                    let n = wallets.len();
                    let from = if a.dist == "zipf" { zipf.sample(rng) } else { rng.gen_range(0..n) };
                    let mut to = rng.gen_range(0..n);
                    if to == from {
                        to = (to + 1) % n;
                    }
                    (from, to)
                };
                let resp = if a.mode == "batch" {
                    // a batch is sent by the owner of its first account; all items from it
                    let (from, items) = {
                        let mut rng = rand::thread_rng();
                        let (from, _) = pick(&mut rng);
                        let items: Vec<_> = (0..a.batch_size)
                            .map(|_| {
                                let mut to = rng.gen_range(0..wallets.len());
                                if to == from {
                                    to = (to + 1) % wallets.len();
                                }
                                json!({"from_account_id": wallets[from].1, "to_account_id": wallets[to].1, "amount": 1, "currency": "USD"})
                            })
                            .collect();
                        (from, items)
                    };
                    http.post(format!("{base}/v1/transfers/batch"))
                        .bearer_auth(&wallets[from].0)
                        .header("idempotency-key", uuid::Uuid::now_v7().to_string())
                        .json(&json!({"transfers": items}))
                        .send()
                        .await
                } else {
                    let (from, to) = pick(&mut rand::thread_rng());
                    http.post(format!("{base}/v1/transfers"))
                        .bearer_auth(&wallets[from].0)
                        .header("idempotency-key", uuid::Uuid::now_v7().to_string())
                        .json(&json!({"from_account_id": wallets[from].1, "to_account_id": wallets[to].1, "amount": 1, "currency": "USD"}))
                        .send()
                        .await
                };
                match resp {
                    Ok(r) if r.status().is_success() => {
                        let n = if a.mode == "batch" {
                            let v: serde_json::Value = r.json().await.unwrap_or_default();
                            v["succeeded"].as_u64().unwrap_or(0)
                        } else {
                            let _ = r.bytes().await;
                            1
                        };
                        ok += 1;
                        transfers += n;
                    }
                    Ok(r) => {
                        failed += 1;
                        if failed < 3 {
                            eprintln!("status {}: {}", r.status(), r.text().await.unwrap_or_default());
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        if failed < 3 {
                            eprintln!("error: {e}");
                        }
                    }
                }
                lat.push(scheduled.elapsed().as_micros() as u64);
            }
            (lat, ok, failed, transfers)
        }));
    }
    let mut lat = Vec::new();
    let (mut ok, mut failed, mut transfers) = (0, 0, 0);
    for t in tasks {
        let (l, o, f, n) = t.await.unwrap();
        lat.extend(l);
        ok += o;
        failed += f;
        transfers += n;
    }
    let elapsed = start.elapsed().as_secs_f64().max(a.duration);
    lat.sort_unstable();
    let report = vaultpay_ledger::verify(&db).await.unwrap();
    println!(
        "db={} mode={} dist={} clients={} rate={} group_commit={} requests_ok={} failed={} transfers={} elapsed={:.1}s \
         throughput={:.0} transfers/s requests={:.0}/s p50={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms verify={}",
        if a.db == "sqlite" { "sqlite" } else { "postgres" },
        a.mode,
        a.dist,
        a.clients,
        if a.rate > 0.0 { format!("{}", a.rate) } else { "max".into() },
        if a.group_commit { "on" } else { "off" },
        ok,
        failed,
        transfers,
        elapsed,
        transfers as f64 / elapsed,
        ok as f64 / elapsed,
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 0.999),
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        if report.is_consistent() { "ok".to_owned() } else { format!("VIOLATIONS: {report}") },
    );
    ledger.db().close().await;
}
