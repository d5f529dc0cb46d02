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
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_CONNECT_AFTER: Duration = Duration::from_secs(1);

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
        match self.next()? {
            Next::Ready(c) => Ok(c),
            Next::Wait(n) => {
                let woken = n.notified();
                // The connect may have ended between `next` and `notified`.
                if let Some(c) = self.current() {
                    return Ok(c);
                }
                let _ = tokio::time::timeout(CONNECT_TIMEOUT * 2, woken).await;
                self.current()
                    .ok_or_else(|| "Redis is unreachable (connecting failed)".to_owned())
            }
            Next::Connect(n) => {
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
                    slot.connecting = None;
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
                n.notify_waiters();
                out
            }
        }
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
