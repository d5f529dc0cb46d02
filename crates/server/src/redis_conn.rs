//! One Redis connection a component shares (cargo feature `redis`): opened on first use,
//! failing fast (2 s to connect, 2 s per answer), and opened afresh after a command that
//! got no answer in time. `ConnectionManager` reconnects by itself only after an error
//! that closes the socket; a connection that died without a word (a NAT or load
//! balancer dropping it) kept timing out every command for good.
//!
//! No lock is held while connecting: one caller connects, the others wait for it (at
//! most the connect timeout), and after a failed connect callers fail at once for a
//! second instead of each waiting out a connect of its own in turn.

use redis::aio::ConnectionManager;
use redis::{ConnectionAddr, IntoConnectionInfo};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_CONNECT_AFTER: Duration = Duration::from_secs(1);

/// A client for `url` (which may hold a password: never echoed). `rediss://` is TLS
/// (rustls with ring), trusting the system's roots, or only the PEM authorities in
/// `ca` when given (`redis_ca_path`: an internal CA). Plain `redis://` only to a
/// loopback address or through a Unix socket: the rate limiter's counts, the trusted
/// networks that let a login skip its email confirmation and the cache invalidations
/// ride on this connection, and its password would cross the network in clear.
pub fn client(url: &str, ca: Option<&Path>) -> anyhow::Result<redis::Client> {
    let info = url
        .into_connection_info()
        .map_err(|e| anyhow::anyhow!("redis_url is not a Redis URL ({:?})", e.kind()))?;
    if let ConnectionAddr::Tcp(host, _) = &info.addr {
        if !vaultpay_auth::outbound::is_loopback_host(host) {
            anyhow::bail!(
                "redis_url must be rediss:// (TLS) unless Redis is on a loopback address; \
                 plain redis:// to {host} would carry the password and the rate limits in clear"
            );
        }
    }
    let Some(ca) = ca else {
        return Ok(redis::Client::open(info)?);
    };
    if !matches!(info.addr, ConnectionAddr::TcpTls { .. }) {
        anyhow::bail!("redis_ca_path is set, but redis_url is not rediss://");
    }
    let pem =
        std::fs::read(ca).map_err(|e| anyhow::anyhow!("redis_ca_path {}: {e}", ca.display()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        anyhow::bail!("redis_ca_path {}: no PEM certificate in it", ca.display());
    }
    Ok(redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        },
    )?)
}

pub(crate) struct SharedConn {
    client: redis::Client,
    slot: parking_lot::Mutex<Slot>,
}

/// A connection handed out, with the number of the slot's connection it is, so that a
/// late timeout on an old connection does not drop a newer one.
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) manager: ConnectionManager,
}

#[derive(Default)]
struct Slot {
    conn: Option<(u64, ConnectionManager)>,
    next_id: u64,
    /// A connect in progress; the others wait for it.
    connecting: Option<Arc<Notify>>,
    /// When the last connect failed.
    failed_at: Option<Instant>,
}

impl Slot {
    fn handout(&self) -> Option<Conn> {
        self.conn.as_ref().map(|(id, c)| Conn {
            id: *id,
            manager: c.clone(),
        })
    }
}

enum Next {
    Ready(Conn),
    Wait(Arc<Notify>),
    Connect(Arc<Notify>),
}

impl SharedConn {
    pub(crate) fn new(client: redis::Client) -> Self {
        Self {
            client,
            slot: parking_lot::Mutex::new(Slot::default()),
        }
    }

    fn next(&self) -> Result<Next, String> {
        let mut slot = self.slot.lock();
        if let Some(c) = slot.handout() {
            return Ok(Next::Ready(c));
        }
        if let Some(n) = &slot.connecting {
            return Ok(Next::Wait(n.clone()));
        }
        if slot
            .failed_at
            .is_some_and(|t| t.elapsed() < RETRY_CONNECT_AFTER)
        {
            return Err("Redis is unreachable (a connection just failed)".into());
        }
        let n = Arc::new(Notify::new());
        slot.connecting = Some(n.clone());
        Ok(Next::Connect(n))
    }

    /// The connection, opened if there is none.
    pub(crate) async fn get(&self) -> Result<Conn, String> {
        // A waiter whose connect was cancelled (its caller went away) rather than failed
        // asks again, once: it connects itself or waits for whoever does.
        for _ in 0..2 {
            match self.next()? {
                Next::Ready(c) => return Ok(c),
                Next::Connect(n) => return self.connect(n).await,
                Next::Wait(n) => {
                    let woken = n.notified();
                    // The connect may have ended between `next` and `notified`.
                    if self.current().is_none() {
                        let _ = tokio::time::timeout(CONNECT_TIMEOUT * 2, woken).await;
                    }
                }
            }
            if let Some(c) = self.current() {
                return Ok(c);
            }
            if self
                .slot
                .lock()
                .failed_at
                .is_some_and(|t| t.elapsed() < RETRY_CONNECT_AFTER)
            {
                break;
            }
        }
        Err("Redis is unreachable (connecting failed)".to_owned())
    }

    /// Makes the connect this caller was handed.
    async fn connect(&self, n: Arc<Notify>) -> Result<Conn, String> {
        // Ends the connect in progress however this call ends, a cancelled
        // caller (a client gone, a request deadline) included.
        let ending = Connecting {
            shared: self,
            notify: n,
        };
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(Duration::from_secs(2));
        let made = tokio::time::timeout(
            CONNECT_TIMEOUT * 2,
            ConnectionManager::new_with_config(self.client.clone(), cfg),
        )
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "connect timed out",
            )))
        });
        let out = {
            let mut slot = self.slot.lock();
            match made {
                Ok(c) => {
                    slot.next_id += 1;
                    let id = slot.next_id;
                    slot.conn = Some((id, c.clone()));
                    slot.failed_at = None;
                    Ok(Conn { id, manager: c })
                }
                Err(e) => {
                    slot.failed_at = Some(Instant::now());
                    Err(e.to_string())
                }
            }
        };
        drop(ending);
        out
    }

    fn current(&self) -> Option<Conn> {
        self.slot.lock().handout()
    }

    /// A command's result as the components report it; a timeout on `conn` drops it
    /// (if it is still the slot's) so that the next command opens a fresh one.
    pub(crate) fn done<T>(&self, conn: &Conn, r: redis::RedisResult<T>) -> Result<T, String> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_timeout() {
                    let mut slot = self.slot.lock();
                    if slot.conn.as_ref().is_some_and(|(id, _)| *id == conn.id) {
                        tracing::warn!(error = %e, "Redis did not answer in time; reconnecting");
                        slot.conn = None;
                    }
                }
                Err(e.to_string())
            }
        }
    }
}

/// A connect in progress. Dropped (when the connect ends, or when the caller making it
/// is cancelled mid-way) it clears the slot's mark and wakes the waiters: without it a
/// cancelled connect left the slot "connecting" for good, and every later caller waited
/// out its timeout and failed, with no connect ever tried again.
struct Connecting<'a> {
    shared: &'a SharedConn,
    notify: Arc<Notify>,
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        {
            let mut slot = self.shared.slot.lock();
            if slot
                .connecting
                .as_ref()
                .is_some_and(|n| Arc::ptr_eq(n, &self.notify))
            {
                slot.connecting = None;
            }
        }
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Poll;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What the fake answers a command (by connection number, from 1, and command
    /// name); `None`: never.
    type Answer = fn(usize, &str) -> Option<&'static str>;

    fn answers_all(_: usize, cmd: &str) -> Option<&'static str> {
        Some(if cmd == "PING" {
            "+PONG\r\n"
        } else {
            "+OK\r\n"
        })
    }

    fn answers_nothing(_: usize, _: &str) -> Option<&'static str> {
        None
    }

    /// A stand-in for Redis on a local port: counts the connections it accepts and
    /// answers each command as `answer` says, once `open` (a gate a test can hold
    /// shut, so that a connect stays in progress).
    struct FakeRedis {
        url: String,
        accepted: Arc<AtomicUsize>,
        open: tokio::sync::watch::Sender<bool>,
    }

    impl FakeRedis {
        async fn start(open: bool, answer: Answer) -> FakeRedis {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("redis://{}", listener.local_addr().unwrap());
            let accepted = Arc::new(AtomicUsize::new(0));
            let (gate, rx) = tokio::sync::watch::channel(open);
            let counted = accepted.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::spawn(serve(stream, n, answer, rx.clone()));
                }
            });
            FakeRedis {
                url,
                accepted,
                open: gate,
            }
        }

        fn client(&self) -> redis::Client {
            redis::Client::open(self.url.as_str()).unwrap()
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    async fn serve(
        mut stream: tokio::net::TcpStream,
        n: usize,
        answer: Answer,
        mut open: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some((cmd, used)) = crate::redis_test_support::resp_command(&buf) {
                buf.drain(..used);
                if open.wait_for(|o| *o).await.is_err() {
                    return;
                }
                if let Some(reply) = answer(n, &cmd) {
                    if stream.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
    }

    /// A hang guard, not a timing assertion.
    async fn guard<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("hung")
    }

    /// Several callers at once while there is no connection: one connects, the others
    /// wait for that connect (neither failing nor connecting themselves) and then share
    /// its connection.
    #[tokio::test]
    async fn one_caller_connects_and_the_others_wait_for_it() {
        let fake = FakeRedis::start(false, answers_all).await; // the handshake is held
        let shared = Arc::new(SharedConn::new(fake.client()));
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let shared = shared.clone();
                tokio::spawn(async move { shared.get().await.map(|c| c.id) })
            })
            .collect();
        // Bounded wait for the connect to reach the fake (on this one-thread runtime
        // every caller has asked for the connection by then).
        guard(async {
            while fake.accepted() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        tokio::task::yield_now().await;
        assert!(
            callers.iter().all(|c| !c.is_finished()),
            "a caller did not wait for the connect in progress"
        );
        fake.open.send(true).unwrap();
        let mut ids = Vec::new();
        for c in callers {
            ids.push(guard(c).await.unwrap().expect("connected"));
        }
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        assert_eq!(fake.accepted(), 1, "one connect for every caller");
    }

    /// A connect that fails (a Redis that accepts and never answers) fails the callers
    /// waiting for it as soon as it ends, and a caller right after fails at once
    /// without connecting again (for a second): one connection attempt in all.
    #[tokio::test]
    async fn a_failed_connect_fails_every_caller_at_once() {
        let fake = FakeRedis::start(true, answers_nothing).await;
        let shared = SharedConn::new(fake.client());
        let mut connector = Box::pin(shared.get());
        assert!(futures::poll!(&mut connector).is_pending());
        let mut waiters: Vec<_> = (0..5).map(|_| Box::pin(shared.get())).collect();
        for w in &mut waiters {
            assert!(futures::poll!(w).is_pending(), "waits for the connect");
        }
        assert!(guard(connector).await.is_err());
        for w in &mut waiters {
            // woken by the failed connect: done at the next poll, not after a wait
            assert!(
                matches!(futures::poll!(w), Poll::Ready(Err(_))),
                "a waiter did not fail with the connect"
            );
        }
        let late = shared.get().now_or_never();
        // Within the fail-fast window (measured after the call, so it held during it;
        // a VM stalled past it skips this check rather than fail).
        if shared
            .slot
            .lock()
            .failed_at
            .is_some_and(|t| t.elapsed() < RETRY_CONNECT_AFTER)
        {
            assert!(
                matches!(late, Some(Err(_))),
                "a caller right after a failed connect did not fail at once"
            );
        } else {
            eprintln!("note: the fail-fast window passed before it was checked; skipped");
        }
        assert_eq!(
            fake.accepted(),
            1,
            "one connection attempt for every caller"
        );
    }

    /// Two commands in flight on a connection that went silent both time out; the
    /// first drops it and the next caller opens a new one; the second (late) timeout,
    /// about the old connection, leaves the new one in place.
    #[tokio::test]
    async fn a_late_timeout_on_an_old_connection_keeps_the_new_one() {
        // the first connection goes silent after its handshake; later ones answer
        fn first_goes_silent(n: usize, cmd: &str) -> Option<&'static str> {
            if n == 1 && cmd != "CLIENT" {
                None
            } else {
                answers_all(n, cmd)
            }
        }
        let fake = FakeRedis::start(true, first_goes_silent).await;
        let shared = SharedConn::new(fake.client());
        let ping = |mut m: ConnectionManager| async move {
            redis::cmd("PING").query_async::<String>(&mut m).await
        };
        let old = guard(shared.get()).await.unwrap();
        let (first, late) =
            guard(async { tokio::join!(ping(old.manager.clone()), ping(old.manager.clone())) })
                .await;
        assert!(first.as_ref().is_err_and(|e| e.is_timeout()), "{first:?}");
        assert!(late.as_ref().is_err_and(|e| e.is_timeout()), "{late:?}");

        assert!(shared.done(&old, first).is_err());
        let new = guard(shared.get()).await.unwrap();
        assert_ne!(new.id, old.id);
        assert_eq!(fake.accepted(), 2);

        assert!(shared.done(&old, late).is_err());
        let after = guard(shared.get()).await.unwrap();
        assert_eq!(
            after.id, new.id,
            "the late timeout dropped the new connection"
        );
        assert_eq!(guard(ping(after.manager)).await.unwrap(), "PONG");
        assert_eq!(fake.accepted(), 2);
    }

    /// The caller making the connect is cancelled mid-way (its client went away, its
    /// request's deadline passed): the connect in progress ends with it, and a caller
    /// waiting for it is woken and makes the connect itself, which the others share.
    #[tokio::test]
    async fn a_cancelled_connect_does_not_block_the_ones_after_it() {
        let fake = FakeRedis::start(false, answers_all).await; // the handshake is held
        let shared = SharedConn::new(fake.client());
        let mut connector = Box::pin(shared.get());
        assert!(futures::poll!(&mut connector).is_pending());
        let mut waiter = Box::pin(shared.get());
        assert!(
            futures::poll!(&mut waiter).is_pending(),
            "waits for the connect"
        );
        drop(connector);
        // woken, the waiter connects itself (held by the fake until the gate opens)
        assert!(futures::poll!(&mut waiter).is_pending());
        assert!(
            shared.slot.lock().connecting.is_some(),
            "the waiter did not take the connect over"
        );
        fake.open.send(true).unwrap();
        let c = guard(waiter).await.expect("the waiter's own connect");
        assert_eq!(c.id, 1);
        for _ in 0..3 {
            let c = guard(shared.get()).await.expect("the same connection");
            assert_eq!(c.id, 1);
        }
        assert_eq!(fake.accepted(), 2, "the cancelled connect, then one more");
    }
}
