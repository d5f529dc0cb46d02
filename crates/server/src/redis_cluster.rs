//! State AuthShield replicas share through Redis (cargo feature `redis`):
//!
//! * trusted networks: one set per user (`SISMEMBER` answers the check), filled from
//!   the database on a miss and dropped on every change, with a generation counter
//!   so a fill that raced with a change is not stored;
//! * permission invalidations: published on a pub/sub channel; every replica
//!   subscribes and drops its cached permissions.

use crate::redis_conn::SharedConn;
use futures::future::BoxFuture;
use futures::StreamExt;
use redis::Script;
use std::time::Duration;
use vaultpay_auth::{AuthService, InvalidationBus, Lookup, TrustBackend};

/// Replaces the set only when nobody changed it since the caller's `Missing` answer.
const FILL: &str = r#"
local gen = tonumber(redis.call('GET', KEYS[2]) or '0')
if gen ~= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SADD', KEYS[1], '-')
for i = 3, #ARGV do redis.call('SADD', KEYS[1], ARGV[i]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"#;

/// How often the invalidation subscription checks its connection, and how long the
/// answer may take before the connection counts as dead (then it reconnects and drops
/// every cached permission, as messages may have been missed).
const PING_EVERY: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// A sentinel member so a user with no networks still has a (present) set.
const SENTINEL: &str = "-";
/// How long the generation counters live (far longer than any set).
const GEN_TTL_SECS: i64 = 7 * 86_400;

pub struct RedisCluster {
    client: redis::Client,
    conn: SharedConn,
    fill: Script,
    prefix: String,
}

impl RedisCluster {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        Self::with_ca(url, None)
    }

    /// As [`Self::new`], trusting the PEM authorities in `ca` for `rediss://`.
    pub fn with_ca(url: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let client = crate::redis_conn::client(url, ca)?;
        Ok(Self {
            client: client.clone(),
            conn: SharedConn::new(client),
            fill: Script::new(FILL),
            prefix: "vaultpay:".into(),
        })
    }

    /// Keys and channel under a different prefix (tests use one per run).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    fn set_key(&self, user: &str) -> String {
        format!("{}trust:{user}", self.prefix)
    }

    fn gen_key(&self, user: &str) -> String {
        format!("{}trust-gen:{user}", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}perms", self.prefix)
    }

    /// Subscribes to invalidations and applies them to `svc` until `shutdown`;
    /// reconnects after errors, dropping every cached permission on (re)connect
    /// since messages may have been missed meanwhile.
    pub fn spawn_subscriber(
        &self,
        svc: AuthService,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        let channel = self.channel();
        tokio::spawn(async move {
            loop {
                let run = async {
                    // Connecting and subscribing get a bound too: a half-dead endpoint
                    // that accepts and never answers would otherwise hold them for good.
                    let pubsub = tokio::time::timeout(PING_EVERY, async {
                        let mut pubsub = client.get_async_pubsub().await?;
                        pubsub.subscribe(&channel).await?;
                        Ok::<_, redis::RedisError>(pubsub)
                    })
                    .await
                    .map_err(|_| {
                        redis::RedisError::from((
                            redis::ErrorKind::IoError,
                            "no answer to the subscription",
                        ))
                    })??;
                    svc.drop_cached_permissions(None);
                    svc.set_invalidations_heard(true);
                    let (mut sink, mut stream) = pubsub.split();
                    // A subscription only reads: a connection that died without a word
                    // (a NAT or load balancer dropping it, a failover) would leave it
                    // waiting for good, every invalidation missed. A PING every
                    // PING_EVERY that must be answered within PING_TIMEOUT finds it.
                    let mut ping = tokio::time::interval(PING_EVERY);
                    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            msg = stream.next() => {
                                let Some(msg) = msg else { break };
                                let payload: String = msg.get_payload()?;
                                match payload.strip_prefix("user:") {
                                    Some(user) => svc.drop_cached_permissions(Some(user)),
                                    None => svc.drop_cached_permissions(None),
                                }
                            }
                            _ = ping.tick() => {
                                match tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await {
                                    Ok(r) => drop(r?),
                                    Err(_) => {
                                        return Err(redis::RedisError::from((
                                            redis::ErrorKind::IoError,
                                            "no answer to PING",
                                        )))
                                    }
                                }
                            }
                        }
                    }
                    Ok::<(), redis::RedisError>(())
                };
                tokio::select! {
                    r = run => {
                        // Until subscribed again, other nodes' invalidations are missed:
                        // the caches are bypassed meanwhile.
                        svc.set_invalidations_heard(false);
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "permission invalidation subscription lost; reconnecting");
                        }
                    }
                    _ = shutdown.changed() => return,
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        })
    }
}

impl TrustBackend for RedisCluster {
    fn contains<'a>(
        &'a self,
        user: &'a str,
        network: &'a str,
    ) -> BoxFuture<'a, Result<Lookup, String>> {
        Box::pin(async move {
            let mut conn = self.conn.get().await?;
            let r = redis::pipe()
                .exists(self.set_key(user))
                .sismember(self.set_key(user), network)
                .get(self.gen_key(user))
                .query_async(&mut conn.manager)
                .await;
            let (exists, member, generation): (bool, bool, Option<u64>) =
                self.conn.done(&conn, r)?;
            Ok(if exists {
                Lookup::Member(member)
            } else {
                Lookup::Missing(generation.unwrap_or(0))
            })
        })
    }

    fn fill<'a>(
        &'a self,
        user: &'a str,
        generation: u64,
        networks: Vec<String>,
        ttl_secs: u64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self.conn.get().await?;
            let mut inv = self.fill.key(self.set_key(user));
            inv.key(self.gen_key(user))
                .arg(generation)
                .arg(ttl_secs.max(1));
            for n in networks.iter().filter(|n| n.as_str() != SENTINEL) {
                inv.arg(n);
            }
            let r = inv.invoke_async::<i64>(&mut conn.manager).await;
            self.conn.done(&conn, r).map(drop)
        })
    }

    fn forget<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self.conn.get().await?;
            let r = redis::pipe()
                .atomic()
                .incr(self.gen_key(user), 1)
                .ignore()
                .expire(self.gen_key(user), GEN_TTL_SECS)
                .ignore()
                .del(self.set_key(user))
                .ignore()
                .query_async::<()>(&mut conn.manager)
                .await;
            self.conn.done(&conn, r)
        })
    }
}

impl InvalidationBus for RedisCluster {
    fn publish<'a>(&'a self, user: Option<&'a str>) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self.conn.get().await?;
            let payload = match user {
                Some(u) => format!("user:{u}"),
                None => "all".to_owned(),
            };
            let r = redis::cmd("PUBLISH")
                .arg(self.channel())
                .arg(payload)
                .query_async::<i64>(&mut conn.manager)
                .await;
            self.conn.done(&conn, r).map(drop)
        })
    }
}

/// With `redis_url` configured: shares trusted networks and permission
/// invalidations of `svc` through Redis; returns the subscriber task.
pub fn install(
    cfg: &crate::Config,
    svc: &AuthService,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(url) = &cfg.redis_url else {
        return Ok(None);
    };
    let cluster = std::sync::Arc::new(RedisCluster::with_ca(
        url.expose(),
        cfg.redis_ca_path.as_deref(),
    )?);
    svc.set_trust_backend(cluster.clone());
    svc.set_invalidation_bus(cluster.clone());
    Ok(Some(cluster.spawn_subscriber(svc.clone(), shutdown)))
}
