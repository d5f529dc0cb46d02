//! The append-only, hash-chained audit log each service keeps in its own database.
//!
//! Entries are appended inside the transaction that makes the change they record, so
//! an audited change and its entry commit together or not at all. Appends are
//! serialised (advisory lock on PostgreSQL, the write lock on SQLite) so the chain
//! has no forks; the database itself refuses UPDATE and DELETE on the table.

use crate::{Db, StoreError, Tx};
use sqlx::any::AnyRow;
use sqlx::Row;
use vaultpay_core::audit::{AuditEntry, BrokenLink, ChainVerifier, GENESIS};

/// The lock key ([`Db::lock`], [`Db::begin_locked`]) that serialises appends.
pub const CHAIN_LOCK: i64 = 2;

/// Where a request came from, recorded with every audit entry it causes.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
}

/// What to record.
#[derive(Debug, Clone)]
pub struct NewAudit<'a> {
    pub actor: Option<&'a str>,
    pub action: &'a str,
    pub resource: Option<&'a str>,
    pub outcome: &'a str,
    pub metadata: serde_json::Value,
}

impl<'a> NewAudit<'a> {
    pub fn success(action: &'a str) -> Self {
        Self {
            actor: None,
            action,
            resource: None,
            outcome: "success",
            metadata: serde_json::Value::Null,
        }
    }

    pub fn failure(action: &'a str) -> Self {
        Self {
            outcome: "failure",
            ..Self::success(action)
        }
    }

    pub fn actor(mut self, actor: &'a str) -> Self {
        self.actor = Some(actor);
        self
    }

    pub fn resource(mut self, resource: &'a str) -> Self {
        self.resource = Some(resource);
        self
    }

    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }
}

const COLUMNS: &str =
    "seq, id, at, actor, action, resource, outcome, ip, user_agent, request_id, metadata, prev_hash, hash";

fn entry(row: &AnyRow) -> Result<AuditEntry, sqlx::Error> {
    Ok(AuditEntry {
        seq: row.try_get("seq")?,
        id: row.try_get("id")?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        resource: row.try_get("resource")?,
        outcome: row.try_get("outcome")?,
        ip: row.try_get("ip")?,
        user_agent: row.try_get("user_agent")?,
        request_id: row.try_get("request_id")?,
        metadata: row.try_get("metadata")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

/// Appends one entry within `tx`; returns its sequence number.
pub async fn append(
    db: &Db,
    tx: &mut Tx,
    origin: &Origin,
    new: NewAudit<'_>,
) -> Result<i64, StoreError> {
    append_many(db, tx, &[(origin, new)]).await
}

/// Appends one entry in a transaction of its own (a refusal or a request that changes
/// nothing else); returns its sequence number.
pub async fn append_alone(db: &Db, origin: &Origin, new: NewAudit<'_>) -> Result<i64, StoreError> {
    let mut tx = db.begin().await?;
    let seq = append(db, &mut tx, origin, new).await?;
    tx.commit().await?;
    Ok(seq)
}

/// Appends several entries, in order, within `tx` with one multi-row statement (the
/// group writers use it: one audit round trip per group, not per change). Returns the
/// sequence number of the last one; an empty slice appends nothing and returns 0.
pub async fn append_many(
    db: &Db,
    tx: &mut Tx,
    items: &[(&Origin, NewAudit<'_>)],
) -> Result<i64, StoreError> {
    if items.is_empty() {
        return Ok(0);
    }
    db.lock(tx, CHAIN_LOCK).await?;
    append_many_locked(db, tx, items).await
}

/// [`append_many`] (or, with one item, [`append`]) in a transaction that already holds
/// [`CHAIN_LOCK`], e.g. opened with `db.begin_locked(&[CHAIN_LOCK], &[])`: saves the
/// lock's round trip on PostgreSQL.
pub async fn append_many_locked(
    db: &Db,
    tx: &mut Tx,
    items: &[(&Origin, NewAudit<'_>)],
) -> Result<i64, StoreError> {
    append_core(db, tx, &[], items).await
}

/// A one-row INSERT sent to the database with an audit append ([`append_with`]):
/// `target` is `"table (column, …)"`, `values` one per column, in order. It must
/// write exactly one row or fail (no `OR IGNORE`, no ignoring trigger): on SQLite the
/// append tells its own row from these by the statements' total row count.
#[derive(Debug, Clone)]
pub struct Insert {
    pub target: &'static str,
    pub values: Vec<Param>,
}

/// A value of an [`Insert`].
#[derive(Debug, Clone)]
pub enum Param {
    Text(Option<String>),
    Int(i64),
}

/// [`append`] with one-row `inserts` written first, in the same round trip as the
/// audit entry when the cached chain head is current (the common case): one statement
/// on PostgreSQL (data-modifying CTEs), one multi-statement call on SQLite. A sign-in
/// writes its session and refresh token this way (two round trips fewer per login).
/// Takes the chain lock itself, like [`append`].
pub async fn append_with(
    db: &Db,
    tx: &mut Tx,
    inserts: &[Insert],
    origin: &Origin,
    new: NewAudit<'_>,
) -> Result<i64, StoreError> {
    db.lock(tx, CHAIN_LOCK).await?;
    append_core(db, tx, inserts, &[(origin, new)]).await
}

fn chain(
    items: &[(&Origin, NewAudit<'_>)],
    mut seq: i64,
    mut prev_hash: String,
) -> Vec<AuditEntry> {
    let at = vaultpay_core::time::now_micros();
    items
        .iter()
        .map(|(origin, new)| {
            seq += 1;
            let e = AuditEntry {
                seq,
                id: uuid::Uuid::now_v7().to_string(),
                at,
                actor: new.actor.map(str::to_owned),
                action: new.action.to_owned(),
                resource: new.resource.map(str::to_owned),
                outcome: new.outcome.to_owned(),
                ip: origin.ip.clone(),
                user_agent: origin.user_agent.clone(),
                request_id: origin.request_id.clone(),
                metadata: if new.metadata.is_null() {
                    "{}".to_owned()
                } else {
                    new.metadata.to_string()
                },
                prev_hash: std::mem::take(&mut prev_hash),
                hash: String::new(),
            }
            .seal();
            prev_hash.clone_from(&e.hash);
            e
        })
        .collect()
}

/// The SQL of `inserts` as a prefix of the statement that follows it (`WITH … ` on
/// PostgreSQL, `…; ` on SQLite), and the number of parameters it uses.
fn prelude_sql(b: crate::Backend, inserts: &[Insert]) -> (String, usize) {
    let mut sql = String::new();
    let mut used = 0;
    for (i, ins) in inserts.iter().enumerate() {
        let values = crate::params::values_from(b, used + 1, 1, ins.values.len());
        used += ins.values.len();
        match b {
            crate::Backend::Postgres => {
                sql.push_str(if i == 0 { "WITH " } else { ", " });
                sql.push_str(&format!(
                    "i{i} AS (INSERT INTO {} VALUES {values})",
                    ins.target
                ));
            }
            crate::Backend::Sqlite => {
                sql.push_str(&format!("INSERT INTO {} VALUES {values}; ", ins.target));
            }
        }
    }
    if b == crate::Backend::Postgres && !inserts.is_empty() {
        sql.push(' ');
    }
    (sql, used)
}

fn bind_inserts<'q>(mut q: AnyQuery<'q>, inserts: &'q [Insert]) -> AnyQuery<'q> {
    for p in inserts.iter().flat_map(|i| &i.values) {
        q = match p {
            Param::Text(t) => q.bind(t.as_deref()),
            Param::Int(n) => q.bind(*n),
        };
    }
    q
}

async fn append_core(
    db: &Db,
    tx: &mut Tx,
    inserts: &[Insert],
    items: &[(&Origin, NewAudit<'_>)],
) -> Result<i64, StoreError> {
    let b = db.backend();
    // The rows to send, until a statement has carried them.
    let mut unsent = inserts;
    // Fast path: one statement, guarded so it inserts only if the database's head is
    // exactly the cached one (same seq and hash, nothing after it). A stale cache (a
    // rolled-back transaction, another process appending) inserts nothing and falls
    // through to reading the head, so the chain can never fork or gap.
    let n = items.len();
    if let Some((seq, hash)) = db.audit_head().filter(|_| n > 0 && n <= CHUNK) {
        let entries = chain(items, seq, hash.clone());
        let (mut sql, used) = prelude_sql(b, inserts);
        sql.push_str(&guarded_insert_sql(b, used + 1, n));
        let mut q = bind_inserts(sqlx::query(&sql).persistent(n == 1), inserts);
        for e in &entries {
            q = bind_entry(q, e);
        }
        let affected = q
            .bind(seq)
            .bind(&hash)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        // SQLite counts every statement's rows; PostgreSQL only the main one's.
        let inserted = match b {
            crate::Backend::Sqlite => affected.saturating_sub(inserts.len() as u64),
            crate::Backend::Postgres => affected,
        };
        if inserted == n as u64 {
            return Ok(set_head(db, entries));
        }
        unsent = &[];
    }
    if !unsent.is_empty() {
        run_prelude(db, tx, unsent).await?;
    }
    if n == 0 {
        return Ok(0);
    }
    let last = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut **tx)
        .await?;
    let (prev_seq, prev_hash) = match last {
        Some(r) => (r.try_get::<i64, _>("seq")?, r.try_get::<String, _>("hash")?),
        None => (0, GENESIS.to_owned()),
    };
    let entries = chain(items, prev_seq, prev_hash);
    for part in entries.chunks(CHUNK) {
        let sql = format!(
            "{} INTO audit_log ({COLUMNS}) VALUES {}",
            db.insert_or_fail(),
            values(db.backend(), part.len())
        );
        let mut q = sqlx::query(&sql).persistent(part.len() == 1);
        for e in part {
            q = bind_entry(q, e);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(set_head(db, entries))
}

/// `inserts` on their own (no cached head to append behind).
async fn run_prelude(db: &Db, tx: &mut Tx, inserts: &[Insert]) -> Result<(), StoreError> {
    let b = db.backend();
    let (mut sql, _) = prelude_sql(b, inserts);
    if b == crate::Backend::Postgres {
        sql.push_str("SELECT 1");
    }
    bind_inserts(sqlx::query(&sql), inserts)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The fast path's insert of `n` entries, guarded by the cached head: the last two
/// parameters are its seq and hash. The head is read as "the last row by seq" (a
/// backward index probe). The earlier form, `NOT EXISTS (SELECT 1 FROM audit_log WHERE
/// seq > head)`, was planned on PostgreSQL as a sequential scan expected to stop at its
/// first match; there never is one, so every append read the whole table (a third of
/// PostgreSQL's CPU in the ledger bench, and growing with the log). Parameters are
/// numbered from `first` (after those of the rows sent with it, see [`append_with`]).
fn guarded_insert_sql(b: crate::Backend, first: usize, n: usize) -> String {
    let mut guard = [String::new(), String::new()];
    for (i, g) in guard.iter_mut().enumerate() {
        crate::params::param(b, first + n * 13 + i, g);
    }
    format!(
        "{} INTO audit_log ({COLUMNS}) SELECT * FROM (VALUES {}) AS v \
         WHERE ({}, {}) = (SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1)",
        b.insert_or_fail(),
        crate::params::values_from(b, first, n, 13),
        guard[0],
        guard[1],
    )
}

/// Rows per multi-row audit insert (13 parameters each).
const CHUNK: usize = 500;

/// `($1, …, $13), ($14, …, $26), …` for `rows` entries.
fn values(backend: crate::Backend, rows: usize) -> String {
    crate::params::values(backend, rows, 13)
}

fn set_head(db: &Db, mut entries: Vec<AuditEntry>) -> i64 {
    match entries.pop() {
        Some(last) => {
            let seq = last.seq;
            db.set_audit_head(seq, last.hash);
            seq
        }
        None => 0,
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

fn bind_entry<'q>(q: AnyQuery<'q>, e: &'q AuditEntry) -> AnyQuery<'q> {
    q.bind(e.seq)
        .bind(&e.id)
        .bind(e.at)
        .bind(&e.actor)
        .bind(&e.action)
        .bind(&e.resource)
        .bind(&e.outcome)
        .bind(&e.ip)
        .bind(&e.user_agent)
        .bind(&e.request_id)
        .bind(&e.metadata)
        .bind(&e.prev_hash)
        .bind(&e.hash)
}

/// Result of walking the whole chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainReport {
    Intact { entries: u64 },
    Broken { checked: u64, link: BrokenLink },
}

/// Walks the whole chain in order and reports the first broken link.
pub async fn verify_chain(db: &Db) -> Result<ChainReport, StoreError> {
    Ok(verify_chain_to_head(db).await?.0)
}

/// [`verify_chain`], with the last entry it verified, `(seq, hash)`: the head to record
/// elsewhere (read by the walk itself, so never an entry appended after it).
pub async fn verify_chain_to_head(
    db: &Db,
) -> Result<(ChainReport, Option<(i64, String)>), StoreError> {
    let mut verifier = ChainVerifier::default();
    let report = walk(db, &mut verifier).await?;
    let head = verifier.last().map(|(s, h)| (s, h.to_owned()));
    Ok((report, head))
}

async fn walk(db: &Db, verifier: &mut ChainVerifier) -> Result<ChainReport, StoreError> {
    let mut after = 0i64;
    loop {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT 1000"
        ))
        .bind(after)
        .fetch_all(db.read())
        .await?;
        if rows.is_empty() {
            return Ok(ChainReport::Intact {
                entries: verifier.checked,
            });
        }
        for row in &rows {
            let e = entry(row)?;
            if let Err(link) = verifier.push(&e) {
                return Ok(ChainReport::Broken {
                    checked: verifier.checked,
                    link,
                });
            }
            after = e.seq;
        }
    }
}

/// The hash of entry `seq`, if there is one.
pub async fn hash_at(db: &Db, seq: i64) -> Result<Option<String>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT hash FROM audit_log WHERE seq = $1")
            .bind(seq)
            .fetch_optional(db.read())
            .await?,
    )
}

/// Filters for listing audit entries, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub request_id: Option<String>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    /// Only entries with `seq` below this (the cursor).
    pub before_seq: Option<i64>,
    pub limit: i64,
}

/// Lists entries matching `f`, newest first.
pub async fn list(db: &Db, f: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
    let mut sql = format!("SELECT {COLUMNS} FROM audit_log WHERE 1 = 1");
    let mut n = 0;
    let mut next = |col: &str, op: &str| {
        n += 1;
        format!(" AND {col} {op} ${n}")
    };
    if f.actor.is_some() {
        sql += &next("actor", "=");
    }
    if f.action.is_some() {
        sql += &next("action", "=");
    }
    if f.request_id.is_some() {
        sql += &next("request_id", "=");
    }
    if f.from.is_some() {
        sql += &next("at", ">=");
    }
    if f.to.is_some() {
        sql += &next("at", "<");
    }
    if f.before_seq.is_some() {
        sql += &next("seq", "<");
    }
    sql += &format!(" ORDER BY seq DESC LIMIT {}", f.limit.clamp(1, 500));
    let mut q = sqlx::query(&sql);
    for s in [&f.actor, &f.action, &f.request_id].into_iter().flatten() {
        q = q.bind(s.as_str());
    }
    for i in [f.from, f.to, f.before_seq].into_iter().flatten() {
        q = q.bind(i);
    }
    let rows = q.fetch_all(db.read()).await?;
    rows.iter()
        .map(|r| entry(r).map_err(StoreError::from))
        .collect()
}

/// Refused uses of a permission (a customer calling an admin route, a staff member
/// whose role was revoked), written to the audit chain as `outcome = "failure"`
/// entries: who, which permission, from where. At most [`DenialLog::PER_ACTOR`] per
/// actor per minute reach the chain, so a caller hammering a staff route cannot turn
/// every refusal into a write (on SQLite, one through the single writer); the rest
/// are only logged. A refusal stands whether or not its entry could be written.
#[derive(Default)]
pub struct DenialLog {
    limiter: vaultpay_core::gcra::MemoryLimiter,
}

impl DenialLog {
    /// Entries per actor per minute (all of them may come at once).
    pub const PER_ACTOR: u32 = 10;

    /// Records that `actor` was refused `permission`, as `action`, in its own
    /// transaction; returns whether an entry was written.
    pub async fn record(
        &self,
        db: &Db,
        origin: &Origin,
        action: &str,
        actor: &str,
        permission: &str,
    ) -> bool {
        if !self.admit(actor) {
            tracing::warn!(
                actor,
                permission,
                action,
                "permission refused (over the audit rate, not in the chain)"
            );
            return false;
        }
        Self::write(db, origin, action, actor, permission, permission).await
    }

    /// Whether `actor`'s next refusal may reach the chain (at most [`Self::PER_ACTOR`]
    /// a minute); counts it when it may.
    pub fn admit(&self, actor: &str) -> bool {
        let quota = vaultpay_core::gcra::Quota::new(Self::PER_ACTOR, 60);
        let now = vaultpay_core::time::now_micros();
        self.limiter.check(actor, quota, now).allowed
    }

    /// Writes one refusal [`Self::admit`] let through: `actor` refused `permission` on
    /// `resource` (the permission itself, or the record asked for). Returns whether it
    /// was written.
    pub async fn write(
        db: &Db,
        origin: &Origin,
        action: &str,
        actor: &str,
        permission: &str,
        resource: &str,
    ) -> bool {
        let entry = NewAudit::failure(action)
            .actor(actor)
            .resource(resource)
            .metadata(serde_json::json!({ "permission": permission }));
        match append_alone(db, origin, entry).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(actor, permission, action, error = %e, "permission refused; its audit entry could not be written");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{Backend, Service};

    /// Rows sent with an append are written exactly once, and the entry too, whether
    /// the chain head is unknown (nothing cached yet), cached and current (one round
    /// trip), or cached and stale (the guarded insert writes nothing; the entry is
    /// appended after reading the head): three entries, six rows, an intact chain.
    #[tokio::test]
    async fn inserts_sent_with_an_append_are_written_once_on_every_path() {
        for b in crate::testing::backends() {
            let db = crate::testing::fresh_db(Service::Ledger, b).await.unwrap();
            let origin = Origin::default();
            let row = |id: String| Insert {
                target: "outbox (id, topic, payload, created_at)",
                values: vec![
                    Param::Text(Some(id)),
                    Param::Text(Some("t".into())),
                    Param::Text(None),
                    Param::Int(1),
                ],
            };
            // `payload` is NOT NULL: a row the database refuses fails the append.
            let mut tx = db.begin().await.unwrap();
            assert!(append_with(
                &db,
                &mut tx,
                &[row("x".into())],
                &origin,
                NewAudit::success("x")
            )
            .await
            .is_err());
            tx.rollback().await.unwrap();
            let row = |id: String| {
                let mut r = row(id);
                r.values[2] = Param::Text(Some("{}".into()));
                r
            };
            for (i, case) in ["unknown", "current", "stale"].into_iter().enumerate() {
                if case == "stale" {
                    let (seq, _) = db.audit_head().unwrap();
                    db.set_audit_head(seq, "not-the-head".into());
                }
                let mut tx = db.begin().await.unwrap();
                let seq = append_with(
                    &db,
                    &mut tx,
                    &[row(format!("a{i}")), row(format!("b{i}"))],
                    &origin,
                    NewAudit::success(case),
                )
                .await
                .unwrap();
                tx.commit().await.unwrap();
                assert_eq!(seq, i as i64 + 1, "{b:?} {case}");
            }
            let n: i64 = sqlx::query("SELECT COUNT(DISTINCT id) FROM outbox")
                .fetch_one(db.read())
                .await
                .unwrap()
                .try_get(0)
                .unwrap();
            assert_eq!(n, 6, "{b:?}");
            assert_eq!(
                verify_chain(&db).await.unwrap(),
                ChainReport::Intact { entries: 3 },
                "{b:?}"
            );
        }
    }

    /// The guard reads the head through the primary key however long the log is: on
    /// PostgreSQL, with 20,000 entries not yet analysed (a log growing faster than
    /// autovacuum analyses it, as under load), the plan of the guarded insert has no
    /// sequential scan of audit_log. The former NOT EXISTS guard had one (checked).
    #[tokio::test]
    async fn the_head_guard_never_scans_the_log() {
        if !crate::testing::backends().contains(&Backend::Postgres) {
            return;
        }
        let db = crate::testing::fresh_db(Service::Ledger, Backend::Postgres)
            .await
            .unwrap();
        let origin = Origin::default();
        let mut tx = db.begin().await.unwrap();
        for _ in 0..40 {
            let items: Vec<_> = (0..500)
                .map(|_| (&origin, NewAudit::success("bulk")))
                .collect();
            append_many(&db, &mut tx, &items).await.unwrap();
        }
        tx.commit().await.unwrap();
        let (seq, hash) = db.audit_head().unwrap();
        let entries = vec![AuditEntry {
            seq: seq + 1,
            id: "x".into(),
            at: 0,
            actor: None,
            action: "a".into(),
            resource: None,
            outcome: "success".into(),
            ip: None,
            user_agent: None,
            request_id: None,
            metadata: "{}".into(),
            prev_hash: hash.clone(),
            hash: "h".into(),
        }];
        let sql = format!("EXPLAIN {}", guarded_insert_sql(Backend::Postgres, 1, 1));
        let mut q = sqlx::query(&sql);
        for e in &entries {
            q = bind_entry(q, e);
        }
        let plan: Vec<String> = q
            .bind(seq)
            .bind(&hash)
            .fetch_all(db.writer())
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get::<String, _>(0).unwrap())
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("audit_log_pkey"), "{plan}");
        assert!(!plan.contains("Seq Scan on audit_log"), "{plan}");
    }
}
