//! The write path: every operation that creates or moves something runs as a [`Job`]
//! inside one database transaction that also checks and stores its idempotency key.
//!
//! With group commit on (the default), the committer (`committer`) takes the queue of
//! waiting jobs and runs as many as are ready in ONE transaction (one fsync). Plain
//! transfers go through the group fast path (`group`) without savepoints; other jobs
//! each get a savepoint so a storage failure in one job rolls back only that job.
//! Replies are sent only after the shared commit, so nothing is acknowledged before it
//! is durable. With group commit off, each job gets its own transaction.
//!
//! Lock order (no deadlocks). SQLite: `BEGIN IMMEDIATE` serialises all writers. On
//! PostgreSQL every ledger write transaction first takes [`WRITE_LOCK`]: exclusively,
//! with [`CHAIN_LOCK`] right after it, then account rows in ascending id order, then
//! the transfer row; or, for a group of plain transfers only, shared, then its account
//! rows in ascending id order, then its idempotency keys, then [`CHAIN_LOCK`] for its
//! audit entries, and nothing after that. An exclusive writer holding the chain lock
//! therefore never waits for a row held by a plain group (none runs beside it), and a
//! plain group holding the chain lock waits for nothing but its commit. An exclusive
//! writer may lock several jobs' rows in turn (a group, expiring holds in one
//! transaction): no other writer runs beside it, so their order cannot deadlock.

use crate::error::LedgerError;
use crate::model::Actor;
use crate::ops;
use crate::Core;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use sqlx::Row;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::oneshot;
use vaultpay_proto::ledger::{
    BatchRequest, OpenAccountRequest, PostHoldRequest, TransferRequest, TreasuryRequest,
    VoidHoldRequest,
};
use vaultpay_store::audit::Origin;
use vaultpay_store::{Db, Tx};

/// The ledger's write lock (an advisory lock on PostgreSQL). Every ledger write
/// transaction takes it first: exclusively ([`begin`]), except groups made only of
/// plain transfers, which take it shared ([`begin_plain`]) and can run side by side.
pub(crate) const WRITE_LOCK: i64 = 3;
/// The audit chain's append lock (the store's). Exclusive writers take it at `BEGIN`
/// with [`WRITE_LOCK`]; a plain-transfer group takes it after its last row lock, just
/// before appending its audit entries.
pub(crate) const CHAIN_LOCK: i64 = vaultpay_store::audit::CHAIN_LOCK;

/// An operation that creates or moves something.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Open(OpenAccountRequest),
    Transfer(TransferRequest),
    Deposit(TreasuryRequest),
    Withdraw(TreasuryRequest),
    Post(String, PostHoldRequest),
    Void(String, VoidHoldRequest),
    Batch(BatchRequest),
}

impl Op {
    /// SHA-256 of method, path and the canonical JSON body. The JSON is streamed into
    /// the hash (same bytes as `serde_json::to_string`, without building the string: a
    /// batch body is ~150 KB).
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"POST\n");
        h.update(self.path().as_bytes());
        h.update(b"\n");
        let mut with_body = h.clone();
        let body = match self {
            Op::Open(r) => hash_json(&mut with_body, r),
            Op::Transfer(r) => hash_json(&mut with_body, r),
            Op::Deposit(r) | Op::Withdraw(r) => hash_json(&mut with_body, r),
            Op::Post(_, r) => hash_json(&mut with_body, r),
            Op::Void(_, r) => hash_json(&mut with_body, r),
            Op::Batch(r) => hash_json(&mut with_body, r),
        };
        // Serialising these plain structs cannot fail; if it did, the body counts as
        // empty, as `to_string(..).unwrap_or_default()` did.
        hex::encode(if body.is_ok() { with_body } else { h }.finalize())
    }

    fn path(&self) -> String {
        match self {
            Op::Open(_) => "/v1/accounts".to_owned(),
            Op::Transfer(_) => "/v1/transfers".to_owned(),
            Op::Deposit(_) => "/v1/admin/deposits".to_owned(),
            Op::Withdraw(_) => "/v1/admin/withdrawals".to_owned(),
            Op::Post(id, _) => format!("/v1/transfers/{id}/post"),
            Op::Void(id, _) => format!("/v1/transfers/{id}/void"),
            Op::Batch(_) => "/v1/transfers/batch".to_owned(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Open(_) => "open_account",
            Op::Transfer(_) => "transfer",
            Op::Deposit(_) => "deposit",
            Op::Withdraw(_) => "withdrawal",
            Op::Post(..) => "post_hold",
            Op::Void(..) => "void_hold",
            Op::Batch(_) => "batch",
        }
    }
}

/// Feeds the JSON of `body` to `h` (the bytes `serde_json::to_string` would make).
fn hash_json<T: serde::Serialize>(h: &mut Sha256, body: &T) -> Result<(), serde_json::Error> {
    struct HashWriter<'a>(&'a mut Sha256);
    impl std::io::Write for HashWriter<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // Buffered: serde_json writes token by token.
    let mut w = std::io::BufWriter::with_capacity(8192, HashWriter(h));
    serde_json::to_writer(&mut w, body)?;
    std::io::Write::flush(&mut w).map_err(serde_json::Error::io)
}

/// A response as stored with its idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    /// JSON (a resource, or a problem document when `status >= 400`).
    pub body: String,
    pub replayed: bool,
}

impl Reply {
    pub fn json<T: serde::Serialize>(status: u16, v: &T) -> Result<Reply, LedgerError> {
        let body = serde_json::to_string(v).map_err(|e| LedgerError::Internal(e.to_string()))?;
        Ok(Reply {
            status,
            body,
            replayed: false,
        })
    }

    pub fn problem(e: &LedgerError, request_id: Option<String>) -> Reply {
        let body = serde_json::to_string(&e.problem(request_id)).unwrap_or_default();
        Reply {
            status: e.status().as_u16(),
            body,
            replayed: false,
        }
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as JSON (for tests and in-process callers).
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Idempotency keys with a request in flight in this process.
#[derive(Default)]
pub(crate) struct Inflight(Mutex<HashSet<(String, String)>>);

pub(crate) struct InflightGuard {
    set: Arc<Inflight>,
    entry: (String, String),
}

impl Inflight {
    pub fn claim(self: &Arc<Self>, user: &str, key: &str) -> Option<InflightGuard> {
        let entry = (user.to_owned(), key.to_owned());
        if !self.0.lock().insert(entry.clone()) {
            return None;
        }
        Some(InflightGuard {
            set: self.clone(),
            entry,
        })
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.set.0.lock().remove(&self.entry);
    }
}

pub(crate) struct Job {
    pub actor: Actor,
    pub key: Option<String>,
    pub op: Op,
    pub origin: Origin,
    /// `op.fingerprint()` when there is a key (empty otherwise). Computed when the job
    /// is made, on the caller's task, so the single committer does not spend its time
    /// re-serialising request bodies.
    pub fingerprint: String,
    pub _guard: Option<InflightGuard>,
}

impl Job {
    pub fn new(
        actor: Actor,
        key: Option<String>,
        op: Op,
        origin: Origin,
        guard: Option<InflightGuard>,
    ) -> Job {
        let fingerprint = if key.is_some() {
            op.fingerprint()
        } else {
            String::new()
        };
        Job {
            actor,
            key,
            op,
            origin,
            fingerprint,
            _guard: guard,
        }
    }
}

pub(crate) type Queued = (Job, oneshot::Sender<Result<Reply, LedgerError>>);

/// Checks an Idempotency-Key's shape.
pub(crate) fn check_key(key: &str) -> Result<(), LedgerError> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(LedgerError::IdempotencyKeyInvalid);
    }
    Ok(())
}

/// Begins an exclusive write transaction: it holds the write lock and the chain lock
/// (see the module docs), so every ledger audit append inside it may use
/// `audit::append_many_locked`.
pub(crate) async fn begin(db: &Db) -> Result<Tx, LedgerError> {
    Ok(db.begin_locked(&[WRITE_LOCK, CHAIN_LOCK], &[]).await?)
}

/// Begins a plain-transfer group's transaction: the write lock in shared mode. The
/// group takes [`CHAIN_LOCK`] itself, after its row locks ([`lock_chain`]).
pub(crate) async fn begin_plain(db: &Db) -> Result<Tx, LedgerError> {
    Ok(db.begin_locked(&[], &[WRITE_LOCK]).await?)
}

/// Takes the chain lock in a [`begin_plain`] transaction.
pub(crate) async fn lock_chain(db: &Db, tx: &mut Tx) -> Result<(), LedgerError> {
    Ok(db.lock(tx, CHAIN_LOCK).await?)
}

pub(crate) async fn exec_sql(tx: &mut Tx, sql: &str) -> Result<(), LedgerError> {
    sqlx::query(sql).execute(&mut **tx).await?;
    Ok(())
}

/// A stored idempotency record, as looked up before a job runs.
pub(crate) struct StoredKey {
    fingerprint: String,
    status: i64,
    body: String,
}

impl StoredKey {
    /// The stored answer, replayed.
    fn replay(&self) -> Reply {
        Reply {
            status: u16::try_from(self.status).unwrap_or(500),
            body: self.body.clone(),
            replayed: true,
        }
    }

    /// Reads `fingerprint`, `status`, `body` and `body_lz4` of a row.
    fn from_row(r: &sqlx::any::AnyRow) -> Result<Self, LedgerError> {
        let body: String = r.try_get("body")?;
        let packed: Option<Vec<u8>> = r.try_get("body_lz4")?;
        let body = match packed {
            None => body,
            Some(p) => unpack_body(&p)?,
        };
        Ok(Self {
            fingerprint: r.try_get("fingerprint")?,
            status: r.try_get("status")?,
            body,
        })
    }
}

/// Stored responses at least this long are kept LZ4-compressed (`body_lz4`; ledger
/// migration 0009): a 1,000-transfer batch's is ~400 KB of JSON, which shrinks several
/// times, and on SQLite was a third of the bytes the batch wrote. Shorter ones (a
/// single transfer's, ~600 bytes) are stored as they are.
const PACK_FROM: usize = 4096;

/// `body` compressed as an idempotency key stores it, if it is long enough to be.
pub(crate) fn packed_body(body: &str) -> Option<Vec<u8>> {
    (body.len() >= PACK_FROM).then(|| lz4_flex::block::compress_prepend_size(body.as_bytes()))
}

fn unpack_body(packed: &[u8]) -> Result<String, LedgerError> {
    let bytes = lz4_flex::block::decompress_size_prepended(packed)
        .map_err(|e| LedgerError::Internal(format!("stored response does not decompress: {e}")))?;
    String::from_utf8(bytes)
        .map_err(|e| LedgerError::Internal(format!("stored response is not UTF-8: {e}")))
}

/// What a group found of a key before running its job.
pub(crate) enum Found {
    /// Answered before: replayed (or 422 for another request).
    Stored(StoredKey),
    /// Running in another process (PostgreSQL, several replicas): 409.
    Running,
}

/// The keys of a whole group that were answered or are running, by (user, key).
pub(crate) type Prefetched = HashMap<(String, String), Found>;

// A PostgreSQL transaction claims the keys of the jobs it runs until it ends with an
// advisory lock in the two-key form (apart from the one-key locks such as
// `WRITE_LOCK`; nothing else here uses the two-key form): (hash of the user, hash of
// the key), 64 bits, so two different keys in flight at once practically never share
// a claim (a spurious 409).

/// An idempotency record to write with the job's outcome.
pub(crate) struct NewKey {
    user_id: String,
    key: String,
    fingerprint: String,
    status: i64,
    /// The response body, empty when it is stored compressed in `packed`.
    body: String,
    /// The body compressed (see [`packed_body`]): the column `body_lz4`.
    packed: Option<Vec<u8>>,
    resource: Option<String>,
}

async fn lookup_key<'e, E>(ex: E, user: &str, key: &str) -> Result<Option<StoredKey>, LedgerError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let row = sqlx::query(
        "SELECT fingerprint, status, body, body_lz4 FROM idempotency_keys WHERE user_id = $1 AND key = $2",
    )
    .bind(user)
    .bind(key)
    .fetch_optional(ex)
    .await?;
    row.as_ref().map(StoredKey::from_row).transpose()
}

/// The stored answer to `op` under `user`'s `key`, read outside any transaction: a
/// replay when the key was used for this same request, `idempotency_key_reused` when
/// it was used for another, `None` when it was never used.
pub(crate) async fn stored_replay(
    db: &Db,
    user: &str,
    key: &str,
    op: &Op,
) -> Result<Option<Reply>, LedgerError> {
    match lookup_key(db.read(), user, key).await? {
        Some(s) if s.fingerprint == op.fingerprint() => Ok(Some(s.replay())),
        Some(_) => Err(LedgerError::IdempotencyKeyReused),
        None => Ok(None),
    }
}

/// Looks up the stored keys of every job of a group in one statement. On PostgreSQL the
/// same statement claims each key not yet answered for this transaction: a request with
/// the same key in flight on another replica is answered 409, as one in flight in this
/// process is by its in-memory claim (without it, the second ran too and its whole
/// group failed on the key's primary key, then was retried job by job).
async fn prefetch_keys(db: &Db, tx: &mut Tx, jobs: &[&Job]) -> Result<Prefetched, LedgerError> {
    let keys: Vec<(&str, &str)> = jobs
        .iter()
        .filter_map(|j| Some((j.actor.user_id.as_str(), j.key.as_deref()?)))
        .collect();
    let mut out = Prefetched::new();
    if keys.is_empty() {
        return Ok(out);
    }
    // By the primary key (user, key): a join with the group's pairs is a primary-key
    // search per pair on both backends (SQLite scans the whole index for a row-value
    // `IN (VALUES …)`), so no second index on `key` alone is kept up to date.
    let values = vaultpay_store::params::values(db.backend(), keys.len(), 2);
    let postgres = db.backend() == vaultpay_store::Backend::Postgres;
    let sql = if postgres {
        format!(
            "SELECT v.column1 AS user_id, v.column2 AS key, k.fingerprint, k.status, k.body, k.body_lz4, \
             k.fingerprint IS NOT NULL OR pg_try_advisory_xact_lock(hashtext(v.column1), \
             hashtext(v.column2)) AS claimed \
             FROM (VALUES {values}) AS v \
             LEFT JOIN idempotency_keys k ON k.user_id = v.column1 AND k.key = v.column2"
        )
    } else {
        format!(
            "SELECT k.user_id, k.key, k.fingerprint, k.status, k.body, k.body_lz4 FROM (VALUES {values}) AS v \
             JOIN idempotency_keys k ON k.user_id = v.column1 AND k.key = v.column2"
        )
    };
    let mut q = sqlx::query(&sql).persistent(false);
    for (user, key) in &keys {
        q = q.bind(*user).bind(*key);
    }
    for r in q.fetch_all(&mut **tx).await? {
        let id = (r.try_get("user_id")?, r.try_get("key")?);
        let stored: Option<String> = r.try_get("fingerprint")?;
        if stored.is_some() {
            out.insert(id, Found::Stored(StoredKey::from_row(&r)?));
        } else if postgres && !r.try_get::<bool, _>("claimed")? {
            out.insert(id, Found::Running);
        }
    }
    Ok(out)
}

/// Writes idempotency records (several rows per statement).
async fn store_keys(db: &Db, tx: &mut Tx, keys: &[NewKey]) -> Result<(), LedgerError> {
    let now = vaultpay_core::time::now_micros();
    for chunk in keys.chunks(500) {
        let sql = crate::ops::insert_sql(
            db,
            "idempotency_keys",
            "user_id, key, fingerprint, status, body, body_lz4, resource_id, created_at",
            chunk.len(),
            8,
        );
        let mut q = sqlx::query(&sql).persistent(false);
        for k in chunk {
            q = q
                .bind(&k.user_id)
                .bind(&k.key)
                .bind(&k.fingerprint)
                .bind(k.status)
                .bind(&k.body)
                .bind(k.packed.as_deref())
                .bind(&k.resource)
                .bind(now);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Several statements without parameters in one round trip.
pub(crate) fn exec_multi<'a>(
    tx: &'a mut Tx,
    sql: &'static str,
) -> futures::future::BoxFuture<'a, Result<(), LedgerError>> {
    Box::pin(async move {
        sqlx::Executor::execute(&mut **tx, sql).await?;
        Ok(())
    })
}

/// Runs one job inside `tx`. `Err` means a server-side failure: the caller must roll
/// back whatever the job wrote (nothing is stored with its key). On success, the
/// returned record (if any) must be stored in the same transaction.
pub(crate) async fn exec_job(
    core: &Core,
    tx: &mut Tx,
    job: &Job,
    prefetched: Option<&Prefetched>,
) -> Result<(Reply, Option<NewKey>), LedgerError> {
    let fingerprint = job.fingerprint.clone();
    // A job outside a group looks its own key up.
    let own;
    let prefetched = match prefetched {
        None if job.key.is_some() => {
            own = prefetch_keys(&core.db, tx, &[job]).await?;
            Some(&own)
        }
        p => p,
    };
    if let Some(reply) = stored_reply(job, &fingerprint, prefetched) {
        return Ok((reply, None));
    }
    let (reply, resource, packed) = match ops::run(core, tx, job).await {
        Ok(done) => (done.reply, done.resource, done.packed),
        Err(e) if e.is_server_error() => return Err(e),
        Err(e) => {
            ops::record_failure(tx, job, &e).await?;
            (
                Reply::problem(&e, job.origin.request_id.clone()),
                None,
                None,
            )
        }
    };
    let new_key = fingerprint_reply(job, fingerprint, &reply, resource, packed);
    Ok((reply, new_key))
}

/// The stored answer for `job`'s idempotency key, if `prefetched` has one: a replay, or
/// a 422 when the key was used for a different request.
pub(crate) fn stored_reply(
    job: &Job,
    fingerprint: &str,
    prefetched: Option<&Prefetched>,
) -> Option<Reply> {
    let key = job.key.as_ref()?;
    let s = match prefetched?.get(&(job.actor.user_id.clone(), key.clone()))? {
        Found::Stored(s) => s,
        Found::Running => {
            return Some(Reply::problem(
                &LedgerError::IdempotencyInProgress,
                job.origin.request_id.clone(),
            ))
        }
    };
    if s.fingerprint != fingerprint {
        return Some(Reply::problem(
            &LedgerError::IdempotencyKeyReused,
            job.origin.request_id.clone(),
        ));
    }
    Some(s.replay())
}

/// The idempotency record to store for `job`'s outcome (none without a key). `packed`:
/// the body already compressed, if the caller did it; otherwise a long body is
/// compressed here (see [`PACK_FROM`]) and stored without its text.
pub(crate) fn fingerprint_reply(
    job: &Job,
    fingerprint: String,
    reply: &Reply,
    resource: Option<String>,
    packed: Option<Vec<u8>>,
) -> Option<NewKey> {
    let key = job.key.as_ref()?;
    let packed = packed.or_else(|| packed_body(&reply.body));
    Some(NewKey {
        user_id: job.actor.user_id.clone(),
        key: key.clone(),
        fingerprint,
        status: i64::from(reply.status),
        body: if packed.is_some() {
            String::new()
        } else {
            reply.body.clone()
        },
        packed,
        resource,
    })
}

/// One transaction per job (the comparison path, and group commit's fallback).
pub(crate) async fn run_single(core: &Core, job: Job) -> Result<Reply, LedgerError> {
    let mut tx = begin(&core.db).await?;
    let (done, tally) = crate::tally::collect(async {
        let (reply, key) = exec_job(core, &mut tx, &job, None).await?;
        if let Some(k) = key {
            store_keys(&core.db, &mut tx, &[k]).await?;
        }
        Ok::<_, LedgerError>(reply)
    })
    .await;
    let reply = done?;
    tx.commit().await.map_err(commit_failed)?;
    tally.flush();
    drop(job);
    Ok(reply)
}

/// The error a failed COMMIT is answered with. One the database refused (a lost race,
/// a deferred foreign key) wrote nothing, and is answered as that refusal. Any other
/// (the connection lost while committing) may have committed or not: never answered
/// as "unavailable, nothing written" (503), which invites a retry under a new key,
/// but as an internal error (500), which says to retry with the same key.
pub(crate) fn commit_failed(e: sqlx::Error) -> LedgerError {
    if commit_refused(&e) {
        return LedgerError::Store(e.into());
    }
    tracing::error!(error = %e, "commit failed; its outcome is unknown");
    LedgerError::Internal(format!("commit outcome unknown: {e}"))
}

/// Runs one group in one transaction and answers its jobs.
pub(crate) async fn run_group(core: &Core, group: &mut Vec<Queued>) {
    if group
        .iter()
        .all(|(j, _)| crate::group::is_plain_transfer(j))
    {
        run_unguarded(core, group, true).await;
        return;
    }
    if group.len() == 1 {
        if let Some((job, reply_to)) = group.pop() {
            let r = run_single(core, job).await;
            let _ = reply_to.send(r);
        }
        return;
    }
    if group.iter().all(|(j, _)| matches!(j.op, Op::Batch(_))) {
        run_unguarded(core, group, false).await;
        return;
    }
    let Some(mut tx) = begin_group(core, group).await else {
        return;
    };
    let ((results, broken), tally) =
        crate::tally::collect(run_jobs_with_savepoints(core, &mut tx, group)).await;
    if broken {
        // Nothing of it was committed: each job gets its own answer from a transaction
        // of its own, so the one that breaks the group fails alone.
        tracing::warn!(
            jobs = group.len(),
            "group commit: transaction broken; retrying its jobs one by one"
        );
        let _ = tx.rollback().await;
        drop(results);
        retry_one_by_one(core, group).await;
    } else {
        commit_and_answer(core, tx, group, results, tally).await;
    }
}

/// The jobs of an exclusive group, each in a savepoint (a run of plain transfers in one),
/// inside `tx`; their results, and whether the transaction is broken.
async fn run_jobs_with_savepoints(
    core: &Core,
    tx: &mut Tx,
    group: &[Queued],
) -> (Vec<Result<Reply, LedgerError>>, bool) {
    let mut results: Vec<Result<Reply, LedgerError>> = Vec::with_capacity(group.len());
    let mut new_keys: Vec<NewKey> = Vec::new();
    let jobs: Vec<&Job> = group.iter().map(|(j, _)| j).collect();
    let (prefetched, mut broken) = match prefetch_keys(&core.db, tx, &jobs).await {
        Ok(p) => (p, false),
        Err(e) => {
            tracing::error!(error = %e, "group commit: idempotency lookup failed");
            (Prefetched::new(), true)
        }
    };
    // One savepoint per job. After a job succeeds, releasing its savepoint and opening
    // the next one is a single round trip; after a failure, ROLLBACK TO leaves the
    // savepoint in place for the next job. Committing releases the last one.
    if !broken && exec_sql(tx, "SAVEPOINT job").await.is_err() {
        broken = true;
    }
    let mut i = 0;
    while i < jobs.len() && !broken {
        // A run of plain transfers goes through the fast path as one unit (one
        // savepoint); if that fails unexpectedly, its jobs are retried one by one.
        let run = jobs[i..]
            .iter()
            .take_while(|j| crate::group::is_plain_transfer(j))
            .count();
        if run > 1 {
            let slice = &jobs[i..i + run];
            let fast = async {
                let (outcomes, mut audits) =
                    crate::group::run_transfers(core, tx, slice, &prefetched).await?;
                crate::group::append_audits(core, tx, slice, &mut audits).await?;
                Ok::<_, LedgerError>(outcomes)
            };
            let (fast, tally) = crate::tally::collect(fast).await;
            match fast {
                Ok(outcomes) => {
                    tally.keep();
                    if exec_multi(tx, "RELEASE SAVEPOINT job; SAVEPOINT job")
                        .await
                        .is_err()
                    {
                        broken = true;
                        break;
                    }
                    for (reply, key) in outcomes {
                        new_keys.extend(key);
                        results.push(Ok(reply));
                    }
                    i += run;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, jobs = run, "group commit: fast path failed; retrying its jobs one by one");
                    if exec_sql(tx, "ROLLBACK TO SAVEPOINT job").await.is_err() {
                        broken = true;
                        break;
                    }
                }
            }
        }
        for job in &jobs[i..i + run.max(1)] {
            if !slow_job(core, tx, job, &prefetched, &mut results, &mut new_keys).await {
                broken = true;
                break;
            }
        }
        i += run.max(1);
    }
    if !broken && store_keys(&core.db, tx, &new_keys).await.is_err() {
        broken = true;
    }
    (results, broken)
}

/// Opens a group's exclusive transaction; if that fails, every job of the group is
/// answered with the error and `None` is returned.
async fn begin_group(core: &Core, group: &mut Vec<Queued>) -> Option<Tx> {
    let began = begin(&core.db).await;
    answer_if_failed(group, began)
}

fn answer_if_failed(group: &mut Vec<Queued>, began: Result<Tx, LedgerError>) -> Option<Tx> {
    match began {
        Ok(tx) => Some(tx),
        Err(e) => {
            tracing::error!(error = %e, "group commit: begin failed");
            let (transient, unreachable) = (e.is_transient(), e.is_unreachable());
            for (job, reply_to) in group.drain(..) {
                // Release the in-flight claim before answering (see `answer_group`): a
                // retry with the same key right after this answer must not get 409.
                drop(job);
                let _ = reply_to.send(Err(if transient {
                    LedgerError::TransactionConflict
                } else if unreachable {
                    LedgerError::Unavailable("the group's transaction could not begin".into())
                } else {
                    LedgerError::Internal("begin failed".into())
                }));
            }
            None
        }
    }
}

/// Answers every job of a group, in order, once its transaction has ended: its own
/// result if the group committed, an internal error otherwise.
fn answer_group(
    group: &mut Vec<Queued>,
    results: Vec<Result<Reply, LedgerError>>,
    committed: bool,
) {
    let mut results = results.into_iter();
    for (job, reply_to) in group.drain(..) {
        let r = if committed {
            results
                .next()
                .unwrap_or_else(|| Err(LedgerError::Internal("missing group result".into())))
        } else {
            Err(LedgerError::Internal("group commit failed".into()))
        };
        // Release the in-flight claim before answering: a retry that races the answer
        // then sees the committed key and replays instead of getting a 409.
        drop(job);
        let _ = reply_to.send(r);
    }
}

/// A group of batches only, or of plain transfers only (`plain`), run with no
/// savepoints. A batch, and the plain-transfer fast path, either refuse before writing
/// anything (the refusal is the answer) or succeed, so a savepoint per job only
/// matters for an unexpected error; then the whole group is rolled back and its jobs
/// run one by one, each in its own transaction, so the failing job still fails alone
/// and stores nothing. Savepoints cost two round trips per group on PostgreSQL, and on
/// SQLite an open savepoint copies every page the group touches into the sub-journal
/// (7% of the writer thread in `perf` under batch load).
///
/// A plain group holds the write lock shared and takes the chain lock only for its
/// audit append, after its row locks and its idempotency keys: two plain groups over
/// different accounts (see `committer`) run side by side on PostgreSQL up to there.
async fn run_unguarded(core: &Core, group: &mut Vec<Queued>, plain: bool) {
    let began = if plain {
        begin_plain(&core.db).await
    } else {
        begin(&core.db).await
    };
    let Some(mut tx) = answer_if_failed(group, began) else {
        return;
    };
    let (attempt, tally) = crate::tally::collect(async {
        let jobs: Vec<&Job> = group.iter().map(|(j, _)| j).collect();
        let prefetched = prefetch_keys(&core.db, &mut tx, &jobs).await?;
        let mut replies = Vec::with_capacity(jobs.len());
        let mut new_keys = Vec::new();
        // A plain group's audit entries wait for its keys (see the lock order).
        let mut audits = crate::group::RunAudits::new();
        if plain {
            let (outcomes, run_audits) =
                crate::group::run_transfers(core, &mut tx, &jobs, &prefetched).await?;
            audits = run_audits;
            for (reply, key) in outcomes {
                new_keys.extend(key);
                replies.push(reply);
            }
        } else {
            for job in &jobs {
                let (reply, key) = exec_job(core, &mut tx, job, Some(&prefetched)).await?;
                new_keys.extend(key);
                replies.push(reply);
            }
        }
        store_keys(&core.db, &mut tx, &new_keys).await?;
        if !audits.is_empty() {
            lock_chain(&core.db, &mut tx).await?;
            crate::group::append_audits(core, &mut tx, &jobs, &mut audits).await?;
        }
        Ok::<_, LedgerError>(replies)
    })
    .await;
    let replies = match attempt {
        Ok(replies) => replies,
        Err(e) => {
            tracing::warn!(error = %e, jobs = group.len(), "group commit failed unexpectedly; retrying its jobs one by one");
            let _ = tx.rollback().await;
            retry_one_by_one(core, group).await;
            return;
        }
    };
    commit_and_answer(
        core,
        tx,
        group,
        replies.into_iter().map(Ok).collect(),
        tally,
    )
    .await;
}

/// Commits a group's transaction and answers its jobs: each with its result, or each
/// with an internal error if the commit failed for a reason that leaves its outcome
/// unknown (the connection lost, say: a retry with the same key then replays or runs).
/// A COMMIT refused by a deferred foreign key (see [`refused_by_deferred_check`]) or
/// for a lost race wrote nothing: the jobs are run again one by one instead.
async fn commit_and_answer(
    core: &Core,
    tx: Tx,
    group: &mut Vec<Queued>,
    results: Vec<Result<Reply, LedgerError>>,
    tally: crate::tally::Tally,
) {
    match tx.commit().await {
        Ok(()) => {
            tally.flush();
            answer_group(group, results, true);
        }
        Err(e) if commit_refused(&e) => {
            tracing::warn!(error = %e, jobs = group.len(), "group commit refused; retrying its jobs one by one");
            await_released_claims(&core.db, group).await;
            retry_one_by_one(core, group).await;
        }
        Err(e) => {
            tracing::error!(error = %e, "group commit failed");
            answer_group(group, results, false);
        }
    }
}

/// Whether a COMMIT was refused by a deferred foreign key (SQLite's transfers and
/// postings, see the ledger's migration 0004), not by the storage: nothing of the
/// transaction was written, so its jobs can be run again one by one, and the one that
/// breaks the key then fails alone.
fn refused_by_deferred_check(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.kind() == sqlx::error::ErrorKind::ForeignKeyViolation)
}

/// Whether a failed COMMIT was refused by the database (a deferred foreign key, a lost
/// race), so that nothing of it was written; any other failure leaves its outcome
/// unknown.
fn commit_refused(e: &sqlx::Error) -> bool {
    refused_by_deferred_check(e) || vaultpay_store::is_transient(Some(e))
}

/// How long a retry after a refused COMMIT waits for that transaction's claims: the
/// server releases them microseconds after reporting the refusal, so this is ample, and
/// a key held by another process (which the wait cannot tell apart) stalls the
/// committer no longer than this.
const CLAIM_WAIT: &str = "250ms";

/// PostgreSQL: waits (up to [`CLAIM_WAIT`]) until no transaction holds the
/// idempotency claims of `group`'s keys (see [`prefetch_keys`]). PostgreSQL reports a
/// COMMIT refused by a deferred check to the client before it rolls the transaction
/// back and releases its advisory locks, so a retry sent straight after could find its
/// own group's claim still held and answer 409 (seen as a flaky test). A claim still
/// held after the wait belongs to another process: the retry then answers 409, as it
/// should.
async fn await_released_claims(db: &Db, group: &[Queued]) {
    if db.backend() != vaultpay_store::Backend::Postgres {
        return;
    }
    let keys: Vec<(&str, &str)> = group
        .iter()
        .filter_map(|(j, _)| Some((j.actor.user_id.as_str(), j.key.as_deref()?)))
        .collect();
    if keys.is_empty() {
        return;
    }
    let mut tx = match db.begin().await {
        Ok(tx) => tx,
        Err(e) => {
            tracing::warn!(error = %e, "could not wait for a refused group's idempotency claims; retrying its jobs at once");
            return;
        }
    };
    let sql = format!(
        "SELECT pg_advisory_xact_lock(hashtext(v.column1), hashtext(v.column2))::text \
         FROM (VALUES {}) AS v",
        vaultpay_store::params::values(db.backend(), keys.len(), 2)
    );
    let mut q = sqlx::query(&sql).persistent(false);
    for (user, key) in &keys {
        q = q.bind(*user).bind(*key);
    }
    let timeout = format!("SET LOCAL lock_timeout = '{CLAIM_WAIT}'");
    let waited = match sqlx::query(&timeout).execute(&mut *tx).await {
        Ok(_) => q.fetch_all(&mut *tx).await.map(drop),
        Err(e) => Err(e),
    };
    match waited {
        Ok(()) => {}
        // lock_not_available: a claim still held after the wait is another process's
        Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("55P03") => {
            tracing::debug!(
                "a refused group's idempotency claim is still held by another transaction"
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not wait for a refused group's idempotency claims; retrying its jobs at once");
        }
    }
    // Releases whatever it took (a failed rollback closes the connection).
    let _ = tx.rollback().await;
}

/// Answers a group that did not commit (and wrote nothing) by running each job in a
/// transaction of its own, so that a job that fails, fails alone. Once one of them
/// finds the database unreachable, the rest are answered at once (503, nothing
/// written, their keys retryable) instead of each waiting out the same timeout.
async fn retry_one_by_one(core: &Core, group: &mut Vec<Queued>) {
    let mut unreachable = false;
    for (job, reply_to) in group.drain(..) {
        let r = if unreachable {
            drop(job);
            Err(LedgerError::Unavailable(
                "an earlier job of its group found it so".into(),
            ))
        } else {
            run_single(core, job).await
        };
        unreachable |= matches!(&r, Err(e) if e.is_unreachable());
        let _ = reply_to.send(r);
    }
}

/// Runs one job in the current savepoint `job` and leaves a fresh one open. Returns
/// false when the transaction is unusable.
async fn slow_job(
    core: &Core,
    tx: &mut Tx,
    job: &Job,
    prefetched: &Prefetched,
    results: &mut Vec<Result<Reply, LedgerError>>,
    new_keys: &mut Vec<NewKey>,
) -> bool {
    let (done, tally) = crate::tally::collect(exec_job(core, tx, job, Some(prefetched))).await;
    match done {
        Ok((reply, key)) => {
            tally.keep();
            if exec_multi(tx, "RELEASE SAVEPOINT job; SAVEPOINT job")
                .await
                .is_err()
            {
                return false;
            }
            new_keys.extend(key);
            results.push(Ok(reply));
            true
        }
        Err(e) => {
            tracing::error!(error = %e, op = job.op.name(), "group commit: job failed; rolled back alone");
            if exec_sql(tx, "ROLLBACK TO SAVEPOINT job").await.is_err() {
                return false;
            }
            results.push(Err(e));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vaultpay_proto::ledger::AccountKind;

    /// The fingerprint as first defined: SHA-256 of "POST\n{path}\n{serde_json::to_string(body)}".
    fn reference(path: &str, body: String) -> String {
        let mut h = Sha256::new();
        h.update(format!("POST\n{path}\n{body}").as_bytes());
        hex::encode(h.finalize())
    }

    fn tr(n: i64) -> TransferRequest {
        TransferRequest {
            from_account_id: format!("a-{n}"),
            to_account_id: "b \"quoted\" \u{e9}".into(),
            amount: n,
            currency: "USD".into(),
            description: "line\nbreak".into(),
            pending: n % 2 == 0,
            timeout_secs: (n % 3 == 0).then_some(60),
        }
    }

    #[test]
    fn streamed_fingerprint_equals_the_string_one() {
        let batch = BatchRequest {
            transfers: (0..1000).map(tr).collect(),
            atomic: true,
        };
        let treasury = TreasuryRequest {
            account_id: "x".into(),
            amount: 5,
            currency: "EUR".into(),
            reference: "r".into(),
        };
        let open = OpenAccountRequest {
            currency: "USD".into(),
            kind: AccountKind::Savings,
            name: "Main".into(),
        };
        let s = |v: &dyn erased::Ser| v.json();
        let cases: Vec<(Op, String, String)> = vec![
            (Op::Open(open.clone()), "/v1/accounts".into(), s(&open)),
            (Op::Transfer(tr(7)), "/v1/transfers".into(), s(&tr(7))),
            (
                Op::Deposit(treasury.clone()),
                "/v1/admin/deposits".into(),
                s(&treasury),
            ),
            (
                Op::Withdraw(treasury.clone()),
                "/v1/admin/withdrawals".into(),
                s(&treasury),
            ),
            (
                Op::Post("t1".into(), PostHoldRequest { amount: Some(3) }),
                "/v1/transfers/t1/post".into(),
                s(&PostHoldRequest { amount: Some(3) }),
            ),
            (
                Op::Void("t2".into(), VoidHoldRequest { reason: None }),
                "/v1/transfers/t2/void".into(),
                s(&VoidHoldRequest { reason: None }),
            ),
            (
                Op::Batch(batch.clone()),
                "/v1/transfers/batch".into(),
                s(&batch),
            ),
        ];
        for (op, path, body) in cases {
            assert_eq!(op.fingerprint(), reference(&path, body), "{}", op.name());
        }
    }

    mod erased {
        pub trait Ser {
            fn json(&self) -> String;
        }
        impl<T: serde::Serialize> Ser for T {
            fn json(&self) -> String {
                serde_json::to_string(self).unwrap()
            }
        }
    }
}
