//! Background tasks: void expired holds, purge old idempotency keys, relay the outbox.

use crate::engine::begin;
use crate::error::LedgerError;
use crate::ops::expire_hold;
use crate::Core;
use sqlx::Row;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};
use vaultpay_core::time::{now_micros, secs};
use vaultpay_web::every;

/// An event relayed from the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    pub seq: i64,
    pub id: String,
    pub topic: String,
    pub payload: serde_json::Value,
    pub created_at: i64,
}

/// A broker the outbox relay hands events to, besides the in-process subscribers (the
/// server's `nats` feature: NATS JetStream). The relay marks a page published only
/// once [`EventSink::publish`] returned `Ok`; a crash or error before that publishes
/// the page again, so a sink must let the broker drop a re-publication by the
/// event's `id` (JetStream: the `Nats-Msg-Id` header within its duplicate window), and
/// consumers see each event at least once.
pub trait EventSink: Send + Sync {
    /// Publishes `events` in order; `Ok` once the broker has acknowledged every one.
    fn publish<'a>(
        &'a self,
        events: &'a [OutboxEvent],
    ) -> futures::future::BoxFuture<'a, Result<(), String>>;
}

/// Voids every hold whose timeout has passed; each exactly once, up to 64 in a
/// transaction (one by one if such a transaction fails). A hold that cannot be expired
/// is logged and counted
/// (`ledger_hold_expiry_failures_total`) and tried again on the next run; it does not
/// stop the holds after it (they would stay reserved, and unpostable, for good).
/// Returns how many were expired.
pub async fn expire_holds(core: &Core) -> Result<u64, LedgerError> {
    expire_holds_as_of(core, now_micros()).await
}

/// [`expire_holds`] as if the time were `now` (microseconds).
pub async fn expire_holds_as_of(core: &Core, now: i64) -> Result<u64, LedgerError> {
    let mut n = 0;
    // Page by page in (expires_at, id) order, each page after the last hold of the one
    // before: a page's worth of holds that keep failing does not hide the holds behind
    // it (with the first page read again each run, they stayed reserved for good).
    // The first page starts after (i64::MIN, ""), i.e. at the beginning.
    let (mut after_at, mut after_id) = (i64::MIN, String::new());
    loop {
        let rows = sqlx::query(
            "SELECT id, expires_at FROM transfers WHERE status = 'pending' AND expires_at <= $1 \
             AND (expires_at > $2 OR (expires_at = $2 AND id > $3)) ORDER BY expires_at, id LIMIT $4",
        )
        .bind(now)
        .bind(after_at)
        .bind(&after_id)
        .bind(EXPIRY_PAGE)
        .fetch_all(core.db.read())
        .await?;
        let full = rows.len() as i64 == EXPIRY_PAGE;
        let mut ids = Vec::with_capacity(rows.len());
        for r in rows {
            ids.push(r.try_get::<String, _>("id")?);
            after_at = r.try_get("expires_at")?;
        }
        if let Some(last) = ids.last() {
            after_id = last.clone();
        }
        for chunk in ids.chunks(EXPIRY_TX) {
            n += expire_together(core, chunk, now).await;
        }
        if !full {
            break;
        }
    }
    if n > 0 {
        metrics::counter!("ledger_holds_expired_total").increment(n);
    }
    Ok(n)
}

/// Holds one expiry query reads.
const EXPIRY_PAGE: i64 = 500;

/// Holds expired in one transaction: a burst of holds sharing a timeout took the
/// exclusive write lock (and a commit) once per hold, stalling transfers each time.
const EXPIRY_TX: usize = 64;

/// Expires `ids` in one transaction; if that fails, one by one (so a hold that cannot
/// be expired fails alone). Returns how many expired.
async fn expire_together(core: &Core, ids: &[String], now: i64) -> u64 {
    if ids.len() > 1 {
        match expire_in_one_tx(core, ids, now).await {
            Ok(n) => return n,
            Err(e) => {
                tracing::warn!(holds = ids.len(), error = %e, "could not expire holds together; one by one");
            }
        }
    }
    let mut n = 0;
    for id in ids {
        match expire_in_one_tx(core, std::slice::from_ref(id), now).await {
            Ok(expired) => n += expired,
            Err(e) => {
                // Logged and counted; tried again on the next run.
                tracing::error!(hold = %id, error = %e, "could not expire a hold; going on with the others");
                metrics::counter!("ledger_hold_expiry_failures_total").increment(1);
            }
        }
    }
    n
}

/// Expires `ids` in one transaction: how many expired (the others were resolved
/// meanwhile).
async fn expire_in_one_tx(core: &Core, ids: &[String], now: i64) -> Result<u64, LedgerError> {
    let mut tx = begin(&core.db).await?;
    let mut expired = 0;
    for id in ids {
        expired += u64::from(expire_hold(core, &mut tx, id, now).await?);
    }
    tx.commit().await?;
    Ok(expired)
}

/// Deletes idempotency keys older than the configured TTL (at least 24 hours), except
/// those whose resource is a hold still pending, or a batch with a hold still pending
/// (a batch's key names its batch id when it may have placed holds): a partial post or
/// a batch retried with its key after a day would otherwise capture or hold again
/// (holds live up to `hold_max_timeout_secs`). They go once the holds are resolved.
///
/// Deletes in chunks of [`PURGE_CHUNK`], each its own statement, so that a backlog (a
/// day of keys after a day down) never holds the writer for one long DELETE while
/// transfers wait behind it.
pub async fn purge_idempotency(core: &Core) -> Result<u64, LedgerError> {
    let ttl = core.config.idempotency_ttl_secs.max(86_400);
    let cutoff = now_micros().saturating_sub(secs(ttl));
    let mut purged = 0;
    loop {
        let n = sqlx::query(
            "DELETE FROM idempotency_keys WHERE (user_id, key) IN (SELECT user_id, key FROM idempotency_keys \
             WHERE created_at < $1 AND NOT EXISTS \
             (SELECT 1 FROM transfers t WHERE t.id = idempotency_keys.resource_id AND t.status = 'pending') \
             AND NOT EXISTS (SELECT 1 FROM transfers t WHERE t.batch_id = idempotency_keys.resource_id \
             AND t.status = 'pending') \
             ORDER BY created_at LIMIT $2)",
        )
        .bind(cutoff)
        .bind(PURGE_CHUNK)
        .execute(core.db.writer())
        .await?
        .rows_affected();
        purged += n;
        if n < PURGE_CHUNK as u64 {
            break;
        }
    }
    Ok(purged)
}

/// Rows one purge statement deletes at most.
const PURGE_CHUNK: i64 = 1_000;

/// Deletes published outbox events older than `outbox_retention_secs` (at least an
/// hour), oldest first, a chunk at a time, up to the first event that is unpublished
/// or younger (the table is read in `seq` order through its primary key; nothing
/// unpublished is ever deleted).
pub async fn purge_outbox(core: &Core) -> Result<u64, LedgerError> {
    let cutoff = now_micros().saturating_sub(secs(core.config.outbox_retention_secs.max(3_600)));
    let mut purged = 0;
    loop {
        let head =
            sqlx::query("SELECT seq, created_at, published_at FROM outbox ORDER BY seq LIMIT $1")
                .bind(PURGE_CHUNK)
                .fetch_all(core.db.read())
                .await?;
        let mut upto = None;
        for r in &head {
            let published: Option<i64> = r.try_get("published_at")?;
            let created: i64 = r.try_get("created_at")?;
            if published.is_none() || created >= cutoff {
                break;
            }
            upto = Some(r.try_get::<i64, _>("seq")?);
        }
        let Some(upto) = upto else {
            break;
        };
        let n = sqlx::query("DELETE FROM outbox WHERE seq <= $1 AND published_at IS NOT NULL")
            .bind(upto)
            .execute(core.db.writer())
            .await?
            .rows_affected();
        purged += n;
        if n < PURGE_CHUNK as u64 {
            break;
        }
    }
    Ok(purged)
}

/// Publishes unpublished outbox events, in order, to `sink` (when there is one, and
/// first: a page it does not acknowledge stays unpublished and is tried again) and to
/// in-process subscribers, and marks them published.
pub async fn relay_outbox(
    core: &Core,
    events: &broadcast::Sender<OutboxEvent>,
    sink: Option<&dyn EventSink>,
) -> Result<u64, LedgerError> {
    const PAGE: &str =
        "SELECT seq, id, topic, payload, created_at FROM outbox WHERE published_at IS NULL ORDER BY seq LIMIT 1000";
    let backend = core.db.backend();
    // PostgreSQL: relays of several processes share the table, so a page is read with
    // its rows locked (SKIP LOCKED) in the transaction that marks it. SQLite: one process
    // and one relay; the page is read from a reader's snapshot, and the single writer is
    // taken only for the UPDATE that marks it, not while a thousand rows are read and
    // parsed (that held every group commit waiting, most after a burst).
    let (tx, rows) = match backend {
        vaultpay_store::Backend::Postgres => {
            let mut tx = core.db.begin().await?;
            // One relay at a time across processes, so that pages go out in order (with
            // SKIP LOCKED alone, a second relay published the next page while the first
            // still held its own, and a first that then failed left them out of order).
            if !core.db.try_lock(&mut tx, RELAY_LOCK).await? {
                tx.rollback().await?;
                return Ok(0);
            }
            let rows = sqlx::query(&format!("{PAGE} FOR UPDATE SKIP LOCKED"))
                .fetch_all(&mut *tx)
                .await?;
            (Some(tx), rows)
        }
        vaultpay_store::Backend::Sqlite => {
            (None, sqlx::query(PAGE).fetch_all(core.db.read()).await?)
        }
    };
    if rows.is_empty() {
        if let Some(tx) = tx {
            tx.rollback().await?;
        }
        return Ok(0);
    }
    let now = now_micros();
    let mut evs = Vec::with_capacity(rows.len());
    for r in &rows {
        evs.push(OutboxEvent {
            seq: r.try_get("seq")?,
            id: r.try_get("id")?,
            topic: r.try_get("topic")?,
            payload: serde_json::from_str(&r.try_get::<String, _>("payload")?)
                .unwrap_or(serde_json::Value::Null),
            created_at: r.try_get("created_at")?,
        });
    }
    if let Some(sink) = sink {
        // A broker that is slow but alive must not hold the page (and on PostgreSQL its
        // rows and a connection) for one acknowledgement timeout per event.
        let published = tokio::time::timeout(PUBLISH_TIMEOUT, sink.publish(&evs))
            .await
            .unwrap_or_else(|_| Err(format!("no acknowledgement within {PUBLISH_TIMEOUT:?}")));
        if let Err(e) = published {
            metrics::counter!("ledger_outbox_publish_failures_total").increment(1);
            if let Some(tx) = tx {
                tx.rollback().await?;
            }
            return Err(LedgerError::Unavailable(format!(
                "the event broker did not take the outbox page: {e}"
            )));
        }
    }
    // One statement marks the whole page: this transaction holds the writer (SQLite) or
    // the rows (PostgreSQL), and one UPDATE per event kept ledger commits waiting.
    let mut tx = match tx {
        Some(tx) => tx,
        None => core.db.begin().await?,
    };
    let mut sql = String::from("UPDATE outbox SET published_at = ");
    vaultpay_store::params::param(backend, 1, &mut sql);
    sql.push_str(" WHERE seq IN (");
    for i in 0..evs.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        vaultpay_store::params::param(backend, i + 2, &mut sql);
    }
    // Only rows still unpublished: on SQLite the page was read outside this
    // transaction, so another relay (a second caller of `Ledger::relay_outbox`) may have
    // published part of it meanwhile. Then this relay publishes nothing and leaves the
    // rest to the next tick, so no event goes out twice from here.
    sql.push_str(") AND published_at IS NULL");
    let mut q = sqlx::query(&sql).persistent(false).bind(now);
    for ev in &evs {
        q = q.bind(ev.seq);
    }
    let marked = q.execute(&mut *tx).await?.rows_affected();
    let n = evs.len() as u64;
    if marked != n {
        tx.rollback().await?;
        return Ok(0);
    }
    for ev in evs {
        let _ = events.send(ev);
    }
    tx.commit().await?;
    Ok(n)
}

/// The outbox relay's advisory lock on PostgreSQL (see `engine::WRITE_LOCK`).
const RELAY_LOCK: i64 = 4;
/// Longest a sink may take to acknowledge one page.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn spawn_all(
    core: Arc<Core>,
    events: broadcast::Sender<OutboxEvent>,
    sink: Option<Arc<dyn EventSink>>,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let c1 = core.clone();
    let c2 = core.clone();
    let c3 = core.clone();
    vec![
        every(
            "expire_holds",
            Duration::from_millis(core.config.expiry_interval_ms.max(10)),
            shutdown.clone(),
            move || {
                let c = c1.clone();
                async move { expire_holds(&c).await }
            },
        ),
        every(
            "purge_idempotency",
            Duration::from_secs(core.config.purge_interval_secs.max(1)),
            shutdown.clone(),
            move || {
                let c = c2.clone();
                async move {
                    Ok::<_, LedgerError>(purge_idempotency(&c).await? + purge_outbox(&c).await?)
                }
            },
        ),
        every(
            "relay_outbox",
            Duration::from_millis(core.config.outbox_interval_ms.max(10)),
            shutdown,
            move || {
                let c = c3.clone();
                let ev = events.clone();
                let sink = sink.clone();
                async move { relay_outbox(&c, &ev, sink.as_deref()).await }
            },
        ),
    ]
}
