//! Crash safety: the real server process is killed with SIGKILL at random moments while
//! clients send transfers with idempotency keys. After each restart, every request
//! that was not acknowledged is retried with its key. At the end each acknowledged
//! transfer exists exactly once, nothing was applied twice, balances match the plan,
//! and `vaultpay ledger verify` and `vaultpay audit verify` pass.
//!
//! The seed is printed; `VAULTPAY_CRASH_SEED=<n>` replays a run's plan and kill times.

use crate::helpers::*;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use vaultpay_store::Backend;

const ACCOUNTS: usize = 4;
const TRANSFERS: usize = 240;
const WORKERS: usize = 16;
const KILLS: usize = 4;
const INITIAL: i64 = 1_000_000;

/// The server process with the environment it restarts with.
struct Server {
    proc: Option<Proc>,
    env: Vec<(&'static str, String)>,
    port: u16,
    log: std::path::PathBuf,
}

impl Server {
    fn start(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        self.proc = Some(Proc::spawn(
            &["serve", "--listen", &listen],
            &self.env,
            self.log.clone(),
        ));
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    async fn wait_ready(&mut self, http: &reqwest::Client, base: &str) {
        self.proc.as_mut().unwrap().wait_ready(http, base).await;
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vaultpay"));
        cmd.args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }
}

#[derive(Clone)]
struct Planned {
    key: String,
    body: Value,
    from: usize,
    to: usize,
    amount: i64,
}

/// Sends one planned request; `Some((status, body))` when the server answered.
async fn send(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    p: &Planned,
) -> Option<(u16, Value, bool)> {
    let res = http
        .post(format!("{base}/v1/transfers"))
        .bearer_auth(token)
        .header("idempotency-key", &p.key)
        .json(&p.body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .ok()?;
    let status = res.status().as_u16();
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let body: Value = res.json().await.ok()?;
    Some((status, body, replayed))
}

#[tokio::test]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    for backend in vaultpay_store::testing::backends() {
        run(backend).await;
    }
}

async fn run(backend: Backend) {
    let seed: u64 = std::env::var("VAULTPAY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash test on {backend:?} with VAULTPAY_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = temp_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Server {
        proc: None,
        env: vec![
            ("VAULTPAY_DATA_DIR", dir.display().to_string()),
            (
                "VAULTPAY_DATABASE__AUTH_URL",
                vaultpay_store::testing::fresh_location(backend)
                    .await
                    .unwrap(),
            ),
            (
                "VAULTPAY_DATABASE__LEDGER_URL",
                vaultpay_store::testing::fresh_location(backend)
                    .await
                    .unwrap(),
            ),
            (
                "VAULTPAY_MASTER_KEY",
                vaultpay_core::crypto::MasterKey::generate()
                    .to_hex()
                    .to_string(),
            ),
            ("VAULTPAY_BOOTSTRAP_ADMIN_EMAIL", "admin@example.com".into()),
            ("VAULTPAY_BOOTSTRAP_ADMIN_PASSWORD", PASSWORD.into()),
            ("VAULTPAY_LOG_FORMAT", "pretty".into()),
            // the funding deposits are over the step-up threshold, and the bootstrap admin
            // has no second factor (step-up is tested in the mfa and ledger tests)
            ("VAULTPAY_LEDGER__STEP_UP_LARGE_TRANSFERS", "false".into()),
            ("VAULTPAY_LOG_LEVEL", "warn".into()),
            (
                "VAULTPAY_AUTH__RATE_LIMITS__LOGIN_PER_IP",
                "{ burst = 1000, period_secs = 1 }".into(),
            ),
        ],
        port,
        log: dir.join("server.log"),
    };
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    server.start();
    server.wait_ready(&http, &base).await;

    // the admin opens the accounts and funds them (treasury), all with keys
    let login = read(
        http.post(format!("{base}/v1/auth/login"))
            .json(&json!({"email": "admin@example.com", "password": PASSWORD, "device": {"id": "crash", "name": "crash"}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let token = login.body["access_token"].as_str().unwrap().to_owned();
    let mut accounts = Vec::new();
    for i in 0..ACCOUNTS {
        let r = read(
            http.post(format!("{base}/v1/accounts"))
                .bearer_auth(&token)
                .header("idempotency-key", format!("open-{i}"))
                .json(&json!({"currency": "USD", "kind": "current", "name": format!("acct {i}")}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let id = r.body["id"].as_str().unwrap().to_owned();
        let d = read(
            http.post(format!("{base}/v1/admin/deposits"))
                .bearer_auth(&token)
                .header("idempotency-key", format!("fund-{i}"))
                .json(&json!({"account_id": id, "amount": INITIAL, "currency": "USD", "reference": "crash test"}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert!(d.status.is_success(), "{}", d.text);
        accounts.push(id);
    }

    let plan: Vec<Planned> = (0..TRANSFERS)
        .map(|i| {
            let from = rng.gen_range(0..ACCOUNTS);
            let to = (from + rng.gen_range(1..ACCOUNTS)) % ACCOUNTS;
            let amount = rng.gen_range(1..=500);
            Planned {
                key: format!("crash-{seed}-{i}"),
                body: json!({"from_account_id": accounts[from], "to_account_id": accounts[to], "amount": amount, "currency": "USD", "description": format!("t{i}")}),
                from,
                to,
                amount,
            }
        })
        .collect();

    // acknowledged: key -> transfer id
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::new(Mutex::new(HashMap::new()));
    let kill_points: Vec<u64> = (0..KILLS).map(|_| rng.gen_range(20..250)).collect();
    for (round, delay_ms) in kill_points.iter().enumerate() {
        let pending: Vec<Planned> = {
            let a = acked.lock().await;
            plan.iter()
                .filter(|p| !a.contains_key(&p.key))
                .cloned()
                .collect()
        };
        let queue = Arc::new(Mutex::new(pending));
        let mut workers = Vec::new();
        for _ in 0..WORKERS {
            let (queue, acked, http, base, token) = (
                queue.clone(),
                acked.clone(),
                http.clone(),
                base.clone(),
                token.clone(),
            );
            workers.push(tokio::spawn(async move {
                loop {
                    let Some(p) = queue.lock().await.pop() else {
                        break;
                    };
                    match send(&http, &base, &token, &p).await {
                        Some((201, body, _)) => {
                            acked
                                .lock()
                                .await
                                .insert(p.key.clone(), body["id"].as_str().unwrap().to_owned());
                        }
                        Some((status, body, _)) if status < 500 => {
                            panic!("unexpected {status}: {body}")
                        }
                        _ => break, // the server died (or answered 5xx): not acknowledged
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(*delay_ms)).await;
        server.kill();
        for w in workers {
            w.await.unwrap();
        }
        eprintln!(
            "round {round}: killed after {delay_ms} ms; {} acknowledged so far",
            acked.lock().await.len()
        );
        server.start();
        server.wait_ready(&http, &base).await;
    }

    // retry everything not acknowledged, with its key, until it is
    let pending: Vec<Planned> = {
        let a = acked.lock().await;
        plan.iter()
            .filter(|p| !a.contains_key(&p.key))
            .cloned()
            .collect()
    };
    for p in &pending {
        let (status, body, _) = send(&http, &base, &token, p).await.expect("server is up");
        assert_eq!(status, 201, "{body}");
        acked
            .lock()
            .await
            .insert(p.key.clone(), body["id"].as_str().unwrap().to_owned());
    }
    let acked = acked.lock().await.clone();
    assert_eq!(acked.len(), TRANSFERS);

    // every acknowledged request, sent again, replays the same transfer
    for p in plan.iter().step_by(7) {
        let (status, body, replayed) = send(&http, &base, &token, p).await.unwrap();
        assert_eq!(status, 201);
        assert!(
            replayed,
            "a retried key must be replayed, not executed again"
        );
        assert_eq!(body["id"].as_str().unwrap(), acked[&p.key]);
    }
    // each acknowledged transfer exists exactly once
    let mut ids: Vec<&String> = acked.values().collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        TRANSFERS,
        "two keys acknowledged the same transfer"
    );
    for id in ids.iter().step_by(5) {
        let r = read(
            http.get(format!("{base}/v1/transfers/{id}"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // balances equal the plan applied exactly once
    let mut expected = [INITIAL; ACCOUNTS];
    for p in &plan {
        expected[p.from] -= p.amount;
        expected[p.to] += p.amount;
    }
    for (i, id) in accounts.iter().enumerate() {
        let r = read(
            http.get(format!("{base}/v1/accounts/{id}"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            r.body["balance"].as_i64().unwrap(),
            expected[i],
            "account {i}: {}",
            r.text
        );
    }
    server.kill();

    // no transfer beyond the plan and the deposits was written
    let db = vaultpay_store::Db::connect(
        &server.env[2].1,
        vaultpay_store::Service::Ledger,
        &Default::default(),
    )
    .await
    .unwrap();
    use sqlx::Row;
    let n: i64 =
        sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM transfers WHERE kind = 'transfer'")
            .fetch_one(db.read())
            .await
            .unwrap()
            .get("n");
    assert_eq!(n as usize, TRANSFERS, "transfers applied more than once");
    db.close().await;

    let out = server.cli(&["ledger", "verify"]);
    assert!(
        out.status.success(),
        "ledger verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server.cli(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
