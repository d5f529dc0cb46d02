//! The group committer's fast path for plain transfers (not holds).
//!
//! A run of consecutive plain transfers in a group is executed as a unit instead of
//! job by job: the accounts of all of them are locked with one statement (ascending id
//! order, as everywhere), every transfer is checked against the run's in-memory account
//! state in queue order (the same checks, in the same order, as [`ops::transfer`]), and
//! the results are written with one multi-row statement per table: transfers, postings,
//! account balances, refused transfers (`failed_transfers`), audit entries (one
//! `append_many`, so one chain-head read at most) and outbox events.
//!
//! A refused transfer is decided in memory and writes nothing but its failure row, so no
//! savepoint per job is needed. An unexpected database error fails the whole run; the
//! caller then rolls the run back (it runs inside one savepoint) and retries its jobs one
//! by one on the savepoint-per-job path, so one bad job still fails alone.

use crate::engine::{fingerprint_reply, Job, NewKey, Op, Prefetched, Reply};
use crate::error::LedgerError;
use crate::model::{AccountRow, TransferRow, POSTING_COLS, TRANSFER_COLS};
use crate::ops;
use crate::Core;
use std::collections::HashMap;
use vaultpay_core::time::now_micros;
use vaultpay_proto::ledger::TransferRequest;
use vaultpay_store::audit::{self, NewAudit};
use vaultpay_store::{Backend, Db, Tx};

/// Rows per multi-row statement (14 columns × 200 stays far below both backends'
/// parameter limits).
const CHUNK: usize = 200;

/// Whether `job` can take the fast path.
pub(crate) fn is_plain_transfer(job: &Job) -> bool {
    matches!(&job.op, Op::Transfer(r) if !r.pending && r.timeout_secs.is_none())
}

fn request(job: &Job) -> Result<&TransferRequest, LedgerError> {
    match &job.op {
        Op::Transfer(r) => Ok(r),
        _ => Err(LedgerError::Internal(
            "fast path given a non-transfer".into(),
        )),
    }
}

/// A refused transfer's `failed_transfers` row.
pub(crate) struct Failure {
    pub user_id: String,
    pub key: Option<String>,
    /// `transfer`, or `batch_item` for an item of a batch.
    pub operation: &'static str,
    pub from: String,
    pub to: String,
    pub amount: i64,
    pub currency: String,
    pub reason: &'static str,
    pub detail: String,
}

impl Failure {
    /// The row for `req`, refused with `e`, from `job` (counted in the metrics).
    pub(crate) fn new(
        job: &Job,
        operation: &'static str,
        req: &TransferRequest,
        e: &LedgerError,
    ) -> Self {
        crate::tally::count("ledger_failed_transfers_total", "reason", e.code(), 1);
        Failure {
            user_id: job.actor.user_id.clone(),
            key: job.key.clone(),
            operation,
            from: req.from_account_id.chars().take(64).collect(),
            to: req.to_account_id.chars().take(64).collect(),
            amount: req.amount,
            currency: req.currency.chars().take(16).collect(),
            reason: e.code(),
            detail: e.to_string(),
        }
    }
}

/// A posting of a run: (transfer index, account id, account seq, signed amount, balance
/// after, time).
pub(crate) type Posting = (usize, String, i64, i64, i64, i64);

/// Binds a posting's row (`id, transfer_id, account_id, account_seq, amount, currency,
/// balance_after, created_at`), `t` being its transfer.
pub(crate) fn bind_posting<'q>(
    q: ops::AnyQuery<'q>,
    t: &'q TransferRow,
    (_, acct, seq, amount, after, at): &'q Posting,
) -> ops::AnyQuery<'q> {
    q.bind(crate::ids::new_id())
        .bind(&t.id)
        .bind(acct)
        .bind(*seq)
        .bind(*amount)
        .bind(&t.currency)
        .bind(*after)
        .bind(*at)
}

/// The audit entries of a run, appended by [`append_audits`]: (job index, transfer id,
/// metadata) per posted transfer.
pub(crate) type RunAudits = Vec<(usize, String, serde_json::Value)>;

/// Runs `jobs` (all plain transfers, in queue order) inside `tx`. Returns one outcome
/// per job, in order, and the run's audit entries, which the caller must append with
/// [`append_audits`] in the same transaction (after its own last row lock: see
/// `engine`'s lock order); `Err` means the caller must roll back everything this wrote.
pub(crate) async fn run_transfers(
    core: &Core,
    tx: &mut Tx,
    jobs: &[&Job],
    prefetched: &Prefetched,
) -> Result<(Vec<(Reply, Option<NewKey>)>, RunAudits), LedgerError> {
    // Idempotency first: replays and reused keys are answered without running.
    let mut outcomes: Vec<Option<(Reply, Option<NewKey>)>> = Vec::with_capacity(jobs.len());
    let mut fingerprints: Vec<String> = Vec::with_capacity(jobs.len());
    let mut ids: Vec<&str> = Vec::with_capacity(jobs.len() * 2);
    for job in jobs {
        let fp = job.fingerprint.clone();
        let stored = crate::engine::stored_reply(job, &fp, Some(prefetched));
        if stored.is_none() {
            let r = request(job)?;
            ids.push(&r.from_account_id);
            ids.push(&r.to_account_id);
        }
        outcomes.push(stored.map(|r| (r, None)));
        fingerprints.push(fp);
    }
    ids.sort_unstable();
    ids.dedup();
    let mut accts: HashMap<String, AccountRow> = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        accts.extend(ops::lock_accounts(&core.db, tx, chunk).await?);
    }

    let now = now_micros();
    let mut transfers: Vec<TransferRow> = Vec::new();
    let mut postings: Vec<Posting> = Vec::new();
    let mut failures: Vec<Failure> = Vec::new();
    let mut audits: Vec<(usize, usize, serde_json::Value)> = Vec::new(); // (job, transfer, meta)
    let mut bodies: Vec<String> = Vec::new(); // per transfer: the 201 body = outbox payload
    for (i, job) in jobs.iter().enumerate() {
        if outcomes[i].is_some() {
            continue;
        }
        let req = request(job)?;
        let ti = transfers.len();
        match ops::apply_and_post(
            &job.actor,
            req,
            None,
            now,
            &mut accts,
            &mut transfers,
            &mut postings,
        ) {
            Ok(t) => {
                let reply = Reply::json(201, &t.to_wire())?;
                bodies.push(reply.body.clone());
                audits.push((i, ti, ops::transfer_meta(t, serde_json::Value::Null)));
                let key = fingerprint_reply(
                    job,
                    std::mem::take(&mut fingerprints[i]),
                    &reply,
                    Some(t.id.clone()),
                    None,
                );
                outcomes[i] = Some((reply, key));
            }
            Err(e) if e.is_server_error() => return Err(e),
            Err(e) => {
                failures.push(Failure::new(job, "transfer", req, &e));
                let reply = Reply::problem(&e, job.origin.request_id.clone());
                let key = fingerprint_reply(
                    job,
                    std::mem::take(&mut fingerprints[i]),
                    &reply,
                    None,
                    None,
                );
                outcomes[i] = Some((reply, key));
            }
        }
    }

    let rows = Rows {
        transfers: &transfers,
        postings: &postings,
        accts: &accts,
        failures: &failures,
        bodies: &bodies,
        now,
    };
    let combined = core.db.backend() == Backend::Postgres && rows.params() <= MAX_COMBINED_PARAMS;
    if combined {
        write_combined_pg(&core.db, tx, &rows).await?;
    } else {
        write_transfers(&core.db, tx, &transfers).await?;
        write_postings(&core.db, tx, &transfers, &postings).await?;
        ops::save_balances(&core.db, tx, &rows.touched(), now).await?;
        write_failures(&core.db, tx, &failures, now).await?;
        write_outbox(&core.db, tx, &bodies, now).await?;
    }
    crate::tally::count(
        "ledger_transfers_total",
        "kind",
        "transfer",
        transfers.len() as u64,
    );

    let audits = audits
        .into_iter()
        .map(|(i, ti, meta)| (i, transfers[ti].id.clone(), meta))
        .collect();
    let outcomes = outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| LedgerError::Internal("fast path lost a job".into())))
        .collect::<Result<_, _>>()?;
    Ok((outcomes, audits))
}

/// Appends a run's audit entries (one `ledger.transfer.posted` per posted transfer)
/// with one multi-row insert. The transaction must hold the chain lock.
pub(crate) async fn append_audits(
    core: &Core,
    tx: &mut Tx,
    jobs: &[&Job],
    audits: &mut RunAudits,
) -> Result<(), LedgerError> {
    if audits.is_empty() {
        return Ok(());
    }
    let mut entries = Vec::with_capacity(audits.len());
    for (i, id, meta) in audits.iter_mut() {
        let job = jobs
            .get(*i)
            .ok_or_else(|| LedgerError::Internal("audit entry without its job".into()))?;
        entries.push((
            &job.origin,
            NewAudit::success("ledger.transfer.posted")
                .actor(&job.actor.user_id)
                .resource(id)
                .metadata(std::mem::take(meta)),
        ));
    }
    audit::append_many_locked(&core.db, tx, &entries).await?;
    Ok(())
}

/// Everything a run writes besides its audit entries.
struct Rows<'a> {
    transfers: &'a [TransferRow],
    postings: &'a [Posting],
    accts: &'a HashMap<String, AccountRow>,
    failures: &'a [Failure],
    bodies: &'a [String],
    now: i64,
}

impl Rows<'_> {
    fn touched(&self) -> Vec<&AccountRow> {
        ops::touched(self.accts, self.postings.iter().map(|p| p.1.as_str()))
    }

    fn params(&self) -> usize {
        self.transfers.len() * 14
            + self.postings.len() * 8
            + self.postings.len() * 5
            + self.failures.len() * 11
            + self.bodies.len() * 4
    }
}

/// PostgreSQL allows 65,535 parameters per statement; stay well below.
const MAX_COMBINED_PARAMS: usize = 30_000;

/// PostgreSQL: transfers, postings, failure rows, outbox events and the new balances in
/// ONE statement (data-modifying CTEs; foreign keys are checked at its end), so a run
/// costs one round trip for all of them instead of five.
async fn write_combined_pg(db: &Db, tx: &mut Tx, rows: &Rows<'_>) -> Result<(), LedgerError> {
    use vaultpay_store::params::values_from;
    let b = db.backend();
    let touched = rows.touched();
    let mut parts: Vec<String> = Vec::new();
    let mut n = 1;
    if !rows.transfers.is_empty() {
        parts.push(format!(
            "t AS (INSERT INTO transfers ({TRANSFER_COLS}) VALUES {})",
            values_from(b, n, rows.transfers.len(), 14)
        ));
        n += rows.transfers.len() * 14;
    }
    if !rows.postings.is_empty() {
        parts.push(format!(
            "p AS (INSERT INTO postings ({POSTING_COLS}) VALUES {})",
            values_from(b, n, rows.postings.len(), 8)
        ));
        n += rows.postings.len() * 8;
    }
    if !rows.failures.is_empty() {
        parts.push(format!(
            "f AS (INSERT INTO failed_transfers (id, user_id, idempotency_key, operation, from_account_id, to_account_id, \
             amount, currency, reason, detail, created_at) VALUES {})",
            values_from(b, n, rows.failures.len(), 11)
        ));
        n += rows.failures.len() * 11;
    }
    if !rows.bodies.is_empty() {
        parts.push(format!(
            "o AS (INSERT INTO outbox (id, topic, payload, created_at) VALUES {})",
            values_from(b, n, rows.bodies.len(), 4)
        ));
        n += rows.bodies.len() * 4;
    }
    let main = if touched.is_empty() {
        "SELECT 1".to_owned()
    } else {
        ops::balances_sql(db, n, touched.len())
    };
    let sql = if parts.is_empty() {
        main
    } else {
        format!("WITH {} {main}", parts.join(", "))
    };
    let mut q = sqlx::query(&sql).persistent(false);
    for t in rows.transfers {
        q = ops::bind_transfer(q, t);
    }
    for p in rows.postings {
        let t = rows
            .transfers
            .get(p.0)
            .ok_or_else(|| LedgerError::Internal("posting without transfer".into()))?;
        q = bind_posting(q, t, p);
    }
    for f in rows.failures {
        q = q
            .bind(crate::ids::new_id())
            .bind(&f.user_id)
            .bind(&f.key)
            .bind(f.operation)
            .bind(&f.from)
            .bind(&f.to)
            .bind(f.amount)
            .bind(&f.currency)
            .bind(f.reason)
            .bind(&f.detail)
            .bind(rows.now);
    }
    for body in rows.bodies {
        q = q
            .bind(crate::ids::new_id())
            .bind("ledger.transfer.posted")
            .bind(body)
            .bind(rows.now);
    }
    for a in &touched {
        q = ops::bind_balance(q, a, rows.now);
    }
    q.execute(&mut **tx).await?;
    Ok(())
}

async fn write_transfers(
    db: &Db,
    tx: &mut Tx,
    transfers: &[TransferRow],
) -> Result<(), LedgerError> {
    for chunk in transfers.chunks(CHUNK) {
        let sql = ops::insert_sql(db, "transfers", TRANSFER_COLS, chunk.len(), 14);
        let mut q = sqlx::query(&sql).persistent(false);
        for t in chunk {
            q = ops::bind_transfer(q, t);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

async fn write_postings(
    db: &Db,
    tx: &mut Tx,
    transfers: &[TransferRow],
    postings: &[Posting],
) -> Result<(), LedgerError> {
    for chunk in postings.chunks(CHUNK) {
        let sql = ops::insert_sql(db, "postings", POSTING_COLS, chunk.len(), 8);
        let mut q = sqlx::query(&sql).persistent(false);
        for p in chunk {
            let t = transfers
                .get(p.0)
                .ok_or_else(|| LedgerError::Internal("posting without transfer".into()))?;
            q = bind_posting(q, t, p);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

pub(crate) async fn write_failures(
    db: &Db,
    tx: &mut Tx,
    failures: &[Failure],
    now: i64,
) -> Result<(), LedgerError> {
    for chunk in failures.chunks(CHUNK) {
        let sql = ops::insert_sql(
            db,
            "failed_transfers",
            "id, user_id, idempotency_key, operation, from_account_id, to_account_id, \
             amount, currency, reason, detail, created_at",
            chunk.len(),
            11,
        );
        let mut q = sqlx::query(&sql).persistent(false);
        for f in chunk {
            q = q
                .bind(crate::ids::new_id())
                .bind(&f.user_id)
                .bind(&f.key)
                .bind(f.operation)
                .bind(&f.from)
                .bind(&f.to)
                .bind(f.amount)
                .bind(&f.currency)
                .bind(f.reason)
                .bind(&f.detail)
                .bind(now);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

async fn write_outbox(
    db: &Db,
    tx: &mut Tx,
    bodies: &[String],
    now: i64,
) -> Result<(), LedgerError> {
    for chunk in bodies.chunks(CHUNK) {
        let sql = ops::insert_sql(
            db,
            "outbox",
            "id, topic, payload, created_at",
            chunk.len(),
            4,
        );
        let mut q = sqlx::query(&sql).persistent(false);
        for body in chunk {
            q = q
                .bind(crate::ids::new_id())
                .bind("ledger.transfer.posted")
                .bind(body)
                .bind(now);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "group_tests.rs"]
mod tests;
