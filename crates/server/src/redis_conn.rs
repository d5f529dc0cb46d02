//! One Redis connection a component shares (cargo feature `redis`): opened on first use,
//! failing fast (2 s to connect, 2 s per answer, one retry), and opened afresh after a
//! command that got no answer in time. `ConnectionManager` reconnects by itself only
//! after an error that closes the socket; a connection that died without a word (a NAT
//! or load balancer dropping it) kept timing out every command for good.

use redis::aio::ConnectionManager;
use std::time::Duration;

pub(crate) struct SharedConn {
    client: redis::Client,
    slot: tokio::sync::Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    conn: Option<ConnectionManager>,
    /// When the last attempt to connect failed: callers within [`RETRY_CONNECT_AFTER`]
    /// of it fail at once instead of each waiting out its own connect timeout in turn
    /// (a burst of sign-ins against an unreachable Redis queued for 2 s apiece, past
    /// the request deadline).
    failed_at: Option<std::time::Instant>,
}

const RETRY_CONNECT_AFTER: Duration = Duration::from_secs(1);

impl SharedConn {
    pub(crate) fn new(client: redis::Client) -> Self {
        Self {
            client,
            slot: tokio::sync::Mutex::new(Slot::default()),
        }
    }

    /// The connection, opened if there is none.
    pub(crate) async fn get(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = &slot.conn {
            return Ok(c.clone());
        }
        if slot
            .failed_at
            .is_some_and(|t| t.elapsed() < RETRY_CONNECT_AFTER)
        {
            return Err("Redis is unreachable (a connection just failed)".into());
        }
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2));
        match ConnectionManager::new_with_config(self.client.clone(), cfg).await {
            Ok(c) => {
                slot.conn = Some(c.clone());
                slot.failed_at = None;
                Ok(c)
            }
            Err(e) => {
                slot.failed_at = Some(std::time::Instant::now());
                Err(e.to_string())
            }
        }
    }

    /// A command's result as the components report it; a timeout drops the connection
    /// so that the next command opens a fresh one.
    pub(crate) async fn done<T>(&self, r: redis::RedisResult<T>) -> Result<T, String> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_timeout() {
                    tracing::warn!(error = %e, "Redis did not answer in time; reconnecting");
                    self.slot.lock().await.conn = None;
                }
                Err(e.to_string())
            }
        }
    }
}
