//! One Redis connection a component shares (cargo feature `redis`): opened on first use,
//! failing fast (2 s to connect, 2 s per answer, one retry), and opened afresh after a
//! command that got no answer in time. `ConnectionManager` reconnects by itself only
//! after an error that closes the socket; a connection that died without a word (a NAT
//! or load balancer dropping it) kept timing out every command for good.

use redis::aio::ConnectionManager;
use std::time::Duration;

pub(crate) struct SharedConn {
    client: redis::Client,
    slot: tokio::sync::Mutex<Option<ConnectionManager>>,
}

impl SharedConn {
    pub(crate) fn new(client: redis::Client) -> Self {
        Self {
            client,
            slot: tokio::sync::Mutex::new(None),
        }
    }

    /// The connection, opened if there is none.
    pub(crate) async fn get(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2));
        let c = ConnectionManager::new_with_config(self.client.clone(), cfg)
            .await
            .map_err(|e| e.to_string())?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// A command's result as the components report it; a timeout drops the connection
    /// so that the next command opens a fresh one.
    pub(crate) async fn done<T>(&self, r: redis::RedisResult<T>) -> Result<T, String> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_timeout() {
                    tracing::warn!(error = %e, "Redis did not answer in time; reconnecting");
                    *self.slot.lock().await = None;
                }
                Err(e.to_string())
            }
        }
    }
}
