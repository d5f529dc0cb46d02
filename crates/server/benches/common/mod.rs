//! What every server benchmark starts from: a free port, a fresh data dir and fresh
//! databases on `backend`, durable commits, a generated master key.

use vaultpay_server::Config;
use vaultpay_store::Backend;

pub async fn server_config(backend: Backend) -> Config {
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: std::env::temp_dir()
            .join("vaultpay-bench")
            .join(uuid::Uuid::now_v7().to_string()),
        ..Config::default()
    };
    std::fs::create_dir_all(&cfg.data_dir).unwrap();
    let auth = vaultpay_store::testing::fresh_location(backend)
        .await
        .unwrap();
    let ledger = vaultpay_store::testing::fresh_location(backend)
        .await
        .unwrap();
    cfg.database.auth_url = Some(vaultpay_core::secret::Secret::new(auth));
    cfg.database.ledger_url = Some(vaultpay_core::secret::Secret::new(ledger));
    cfg.database.sqlite_synchronous_full = true; // durable commits
    cfg.master_key = Some(vaultpay_core::secret::Secret::new(
        vaultpay_core::crypto::MasterKey::generate()
            .to_hex()
            .to_string(),
    ));
    cfg
}

/// What an open loop measured: every request's latency in ms (sorted), counted from its
/// scheduled send time; how many failed; and how late the pacer itself sent (p99, ms).
pub struct OpenLoop {
    pub latencies_ms: Vec<f64>,
    pub errors: usize,
    pub pacer_late_p99_ms: f64,
}

impl OpenLoop {
    /// p50, p99, p99.9 and max latency, errors, and the pacer's lateness, for a report.
    pub fn summary(&self) -> String {
        let lat = &self.latencies_ms;
        format!(
            "p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms, errors {} (pacer's own lateness p99 {:.3} ms, included)",
            percentile(lat, 50.0),
            percentile(lat, 99.0),
            percentile(lat, 99.9),
            lat.last().copied().unwrap_or(f64::NAN),
            self.errors,
            self.pacer_late_p99_ms,
        )
    }
}

/// The `p`th percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Starts `op()` `rate` times a second for `secs` seconds, each at its scheduled time
/// whatever the earlier ones are doing (open loop), on the calling tokio runtime.
/// Latency counts from the scheduled time, so neither a stall of the server nor a late
/// start by the generator can hide (no coordinated omission).
///
/// A pacer thread sleeps to each scheduled instant (timer slack 1 µs) and spawns the
/// request. Tokio's own timer is not used for pacing: its wheel has 1 ms ticks and
/// rounds every deadline up, which added the same 0–1 ms (depending on when the run
/// started) to every latency of a run.
pub async fn open_loop<F, Fut>(rate: f64, secs: f64, op: F) -> OpenLoop
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    use std::time::{Duration, Instant};
    let handle = tokio::runtime::Handle::current();
    let total = (rate * secs).round() as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let pacer = std::thread::spawn(move || {
        // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
        }
        let start = Instant::now() + Duration::from_millis(50);
        let mut tasks = Vec::with_capacity(total);
        let mut late = Vec::with_capacity(total);
        for i in 0..total {
            let at = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            late.push(at.elapsed().as_secs_f64() * 1e3);
            let fut = op();
            tasks.push(handle.spawn(async move {
                let ok = fut.await;
                (at.elapsed().as_secs_f64() * 1e3, ok)
            }));
        }
        (tasks, late)
    });
    let (tasks, mut late) = tokio::task::spawn_blocking(move || pacer.join().unwrap())
        .await
        .unwrap();
    let mut latencies_ms = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    for t in tasks {
        let (ms, ok) = t.await.unwrap();
        errors += usize::from(!ok);
        latencies_ms.push(ms);
    }
    latencies_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    late.sort_by(|a, b| a.partial_cmp(b).unwrap());
    OpenLoop {
        pacer_late_p99_ms: percentile(&late, 99.0),
        latencies_ms,
        errors,
    }
}
