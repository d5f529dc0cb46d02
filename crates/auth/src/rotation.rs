//! The refresh-token writer: rotations are committed in groups.
//!
//! Each rotation is a small write (spend the old token, store the new one, touch the
//! session, append an audit entry) whose cost is dominated by the commit: one fsync on
//! SQLite, one WAL flush plus the audit-chain lock on PostgreSQL. A single writer task
//! drains every rotation waiting in its queue and decides them in order against rows
//! it locked with one query, then writes the whole group with a handful of multi-row
//! statements and one commit. Nobody gets an answer before that commit, so an issued
//! refresh token is always durable, and a group that fails is retried one rotation at
//! a time, so a bad row cannot fail its neighbours.
//!
//! Decisions inside a group are made against the group's own overlay: a token spent
//! earlier in the group counts as spent (reuse detection), and a session revoked
//! earlier in the group counts as revoked, exactly as if the rotations had committed
//! one after another.

use crate::AuthError;
use sqlx::Row;
use std::collections::{HashMap, HashSet};
use tokio::sync::{mpsc, oneshot};
use vaultpay_core::crypto::{opaque_token, sha256_hex};
use vaultpay_core::time::{now_micros, secs};
use vaultpay_store::audit::{append_many, NewAudit, Origin};
use vaultpay_store::{params, Backend, Db, Tx};

/// Rotations per group. No savepoints are used, so PostgreSQL's subtransaction cache
/// is no limit; parameters stay far below both backends' caps.
const GROUP_MAX: usize = 256;

/// One refresh to decide and write.
pub(crate) struct Rotation {
    /// SHA-256 (hex) of the presented refresh token.
    pub hash: String,
    pub device_id: String,
    /// The OAuth client refreshing, or `None` for a first-party session: a token only
    /// ever refreshes for the client its session was created for.
    pub client: Option<String>,
    pub origin: Origin,
}

/// A successful rotation: the new refresh token and what the access token needs.
pub(crate) struct Rotated {
    pub session_id: String,
    pub user_id: String,
    pub device_id: String,
    pub auth_time: i64,
    pub amr: String,
    pub refresh_token: String,
}

type Reply = oneshot::Sender<Result<Rotated, AuthError>>;

/// The settings a rotation reads.
#[derive(Clone, Copy)]
pub(crate) struct Policy {
    pub reuse_grace_secs: i64,
    pub idle_ttl_secs: i64,
}

/// The queue in front of the writer task. Dropping it stops the task.
pub(crate) struct RotationQueue {
    tx: mpsc::Sender<(Rotation, Reply)>,
}

impl RotationQueue {
    /// Starts the writer task on the current runtime.
    pub fn spawn(db: Db, policy: Policy) -> Self {
        let (tx, rx) = mpsc::channel(4 * GROUP_MAX);
        tokio::spawn(writer(db, policy, rx));
        Self { tx }
    }

    /// Queues a rotation and waits for its committed outcome.
    pub async fn rotate(&self, r: Rotation) -> Result<Rotated, AuthError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((r, reply))
            .await
            .map_err(|_| AuthError::Internal("refresh writer stopped".into()))?;
        rx.await
            .map_err(|_| AuthError::Internal("refresh writer dropped a rotation".into()))?
    }
}

async fn writer(db: Db, policy: Policy, mut rx: mpsc::Receiver<(Rotation, Reply)>) {
    let mut group: Vec<(Rotation, Reply)> = Vec::with_capacity(GROUP_MAX);
    while let Some(first) = rx.recv().await {
        group.push(first);
        while group.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(q) => group.push(q),
                Err(_) => break,
            }
        }
        metrics::histogram!("auth_refresh_group_size").record(group.len() as f64);
        let jobs: Vec<&Rotation> = group.iter().map(|(r, _)| r).collect();
        match rotate_group(&db, policy, &jobs).await {
            Ok(outcomes) => {
                for ((_, reply), outcome) in group.drain(..).zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) if group.len() == 1 => {
                if let Some((_, reply)) = group.pop() {
                    let _ = reply.send(Err(e));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, size = group.len(), "refresh group failed; retrying one by one");
                for (r, reply) in group.drain(..) {
                    let outcome = match rotate_group(&db, policy, &[&r]).await {
                        Ok(mut one) => one
                            .pop()
                            .unwrap_or_else(|| Err(AuthError::Internal("no outcome".into()))),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(outcome);
                }
            }
        }
    }
}

/// A refresh token's row joined with its session, as locked for the group.
struct Current {
    session_id: String,
    user_id: String,
    used_at: Option<i64>,
    replaced_by: Option<String>,
    session_device: String,
    client: Option<String>,
    revoked: bool,
    expires_at: i64,
    idle_expires_at: i64,
    auth_time: i64,
    amr: String,
}

struct Audit {
    origin: usize,
    action: &'static str,
    ok: bool,
    user_id: String,
    session_id: String,
    reason: Option<&'static str>,
}

fn invalid(detail: &str) -> AuthError {
    AuthError::OAuth("invalid_grant", detail.into())
}

/// Decides and writes one group in one transaction; one outcome per job, in order.
/// `Err` means nothing was written (the transaction rolled back).
async fn rotate_group(
    db: &Db,
    policy: Policy,
    jobs: &[&Rotation],
) -> Result<Vec<Result<Rotated, AuthError>>, AuthError> {
    let now = now_micros();
    let mut tx = db.begin().await?;
    let mut current = lock_rows(db, &mut tx, jobs).await?;
    let used_successors = if policy.reuse_grace_secs > 0 {
        used_successors(db, &mut tx, &current).await?
    } else {
        HashSet::new()
    };

    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut revoked: HashMap<String, &'static str> = HashMap::new();
    let mut inserts: Vec<(String, String)> = Vec::new(); // (new hash, session)
    let mut spent: Vec<(&str, String)> = Vec::new(); // (old hash, new hash)
    let mut graced: Vec<(&str, String)> = Vec::new(); // (old hash, "grace:" + new hash)
    let mut touched: Vec<(String, i64, usize)> = Vec::new(); // (session, idle expiry, origin)
    let mut audits: Vec<Audit> = Vec::new();

    for (i, job) in jobs.iter().enumerate() {
        // A concurrent double refresh is one whose other answer has not been used yet:
        // once the successor rotated (before this group, or earlier in it), the old
        // token coming back is reuse, not a race, and a second pair would start a
        // second chain of tokens for the session.
        let successor_unused = current
            .get(&job.hash)
            .and_then(|r| r.replaced_by.as_deref())
            .is_some_and(|n| !used_successors.contains(n) && !current_used(&current, n));
        let Some(row) = current.get_mut(&job.hash) else {
            outcomes.push(Err(invalid("refresh token is invalid")));
            continue;
        };
        if row.revoked || revoked.contains_key(&row.session_id) {
            outcomes.push(Err(invalid("the session has ended")));
            continue;
        }
        if row.client != job.client {
            revoked.insert(row.session_id.clone(), "refresh_client_mismatch");
            audits.push(Audit {
                origin: i,
                action: "refresh.client_mismatch",
                ok: false,
                user_id: row.user_id.clone(),
                session_id: row.session_id.clone(),
                reason: Some("refresh_client_mismatch"),
            });
            outcomes.push(Err(invalid(
                "refresh token was issued to another client; the session has been revoked",
            )));
            continue;
        }
        let mut grace = false;
        if let Some(used) = row.used_at {
            let within = policy.reuse_grace_secs > 0 && now - used <= secs(policy.reuse_grace_secs);
            let first_grace = !row
                .replaced_by
                .as_deref()
                .unwrap_or("")
                .starts_with("grace:");
            if within && first_grace && successor_unused && row.session_device == job.device_id {
                grace = true;
            } else {
                revoked.insert(row.session_id.clone(), "refresh_token_reuse");
                audits.push(Audit {
                    origin: i,
                    action: "refresh.reuse_detected",
                    ok: false,
                    user_id: row.user_id.clone(),
                    session_id: row.session_id.clone(),
                    reason: Some("refresh_token_reuse"),
                });
                metrics::counter!("auth_refresh_reuse_detected_total").increment(1);
                tracing::warn!(session_id = %row.session_id, "refresh token reuse detected; session revoked");
                outcomes.push(Err(invalid(
                    "refresh token was already used; the session has been revoked",
                )));
                continue;
            }
        }
        if row.session_device != job.device_id {
            revoked.insert(row.session_id.clone(), "refresh_device_mismatch");
            audits.push(Audit {
                origin: i,
                action: "refresh.device_mismatch",
                ok: false,
                user_id: row.user_id.clone(),
                session_id: row.session_id.clone(),
                reason: Some("refresh_device_mismatch"),
            });
            outcomes.push(Err(invalid(
                "refresh token was issued to another device; the session has been revoked",
            )));
            continue;
        }
        if row.expires_at <= now || row.idle_expires_at <= now {
            outcomes.push(Err(invalid("the session has expired")));
            continue;
        }
        let token = opaque_token();
        let new_hash = sha256_hex(token.as_bytes());
        inserts.push((new_hash.clone(), row.session_id.clone()));
        if grace {
            row.replaced_by = Some(format!("grace:{new_hash}"));
            graced.push((job.hash.as_str(), format!("grace:{new_hash}")));
        } else {
            row.used_at = Some(now);
            row.replaced_by = Some(new_hash.clone());
            spent.push((job.hash.as_str(), new_hash));
        }
        let idle = (now + secs(policy.idle_ttl_secs)).min(row.expires_at);
        touched.push((row.session_id.clone(), idle, i));
        audits.push(Audit {
            origin: i,
            action: if grace {
                "token.refreshed_in_grace"
            } else {
                "token.refreshed"
            },
            ok: true,
            user_id: row.user_id.clone(),
            session_id: row.session_id.clone(),
            reason: None,
        });
        outcomes.push(Ok(Rotated {
            session_id: row.session_id.clone(),
            user_id: row.user_id.clone(),
            device_id: row.session_device.clone(),
            auth_time: row.auth_time,
            amr: row.amr.clone(),
            refresh_token: token,
        }));
    }

    for (session, reason) in &revoked {
        sqlx::query("UPDATE sessions SET revoked_at = $1, revoked_reason = $2 WHERE id = $3 AND revoked_at IS NULL")
            .bind(now)
            .bind(*reason)
            .bind(session)
            .execute(&mut *tx)
            .await?;
    }
    insert_tokens(&mut tx, db.backend(), &inserts, now).await?;
    spend_tokens(&mut tx, db.backend(), &spent, now).await?;
    for (old, mark) in &graced {
        sqlx::query("UPDATE refresh_tokens SET replaced_by = $1 WHERE token_hash = $2")
            .bind(mark)
            .bind(*old)
            .execute(&mut *tx)
            .await?;
    }
    touch_sessions(&mut tx, db.backend(), jobs, &touched, now).await?;
    let metadata: Vec<serde_json::Value> = audits
        .iter()
        .map(|a| match a.reason {
            Some(r) => serde_json::json!({ "reason": r, "session_revoked": true }),
            None => serde_json::Value::Null,
        })
        .collect();
    let items: Vec<(&Origin, NewAudit<'_>)> = audits
        .iter()
        .zip(&metadata)
        .map(|(a, m)| {
            let new = if a.ok {
                NewAudit::success(a.action)
            } else {
                NewAudit::failure(a.action)
            };
            (
                &jobs[a.origin].origin,
                new.actor(&a.user_id)
                    .resource(&a.session_id)
                    .metadata(m.clone()),
            )
        })
        .collect();
    append_many(db, &mut tx, &items).await?;
    tx.commit().await?;
    metrics::counter!("auth_tokens_issued_total", "kind" => "refresh")
        .increment(inserts.len() as u64);
    Ok(outcomes)
}

/// Locks (PostgreSQL: `FOR UPDATE`; SQLite: the write transaction) and reads the rows
/// of every token in the group, with their sessions, in one statement, in session id
/// order (as multi-row revocations lock sessions: `sessions::revoke_sessions_where`).
/// The successors (`replaced_by`) of the locked rows that were used already: a spent
/// token whose successor rotated on gets no grace (read in the group's transaction).
async fn used_successors(
    db: &Db,
    tx: &mut Tx,
    current: &HashMap<String, Current>,
) -> Result<HashSet<String>, AuthError> {
    let next: Vec<&str> = current
        .values()
        .filter(|r| r.used_at.is_some())
        .filter_map(|r| r.replaced_by.as_deref())
        .filter(|h| !h.starts_with("grace:"))
        .collect();
    if next.is_empty() {
        return Ok(HashSet::new());
    }
    let sql = format!(
        "SELECT token_hash FROM refresh_tokens WHERE used_at IS NOT NULL AND token_hash IN ({})",
        params::list(db.backend(), next.len())
    );
    let mut q = sqlx::query(&sql).persistent(false);
    for h in &next {
        q = q.bind(*h);
    }
    q.fetch_all(&mut **tx)
        .await?
        .iter()
        .map(|r| {
            r.try_get::<String, _>("token_hash")
                .map_err(AuthError::from)
        })
        .collect()
}

/// Whether the group spent `hash` already (a row it locked and rotated).
fn current_used(current: &HashMap<String, Current>, hash: &str) -> bool {
    current.get(hash).is_some_and(|r| r.used_at.is_some())
}

async fn lock_rows(
    db: &Db,
    tx: &mut Tx,
    jobs: &[&Rotation],
) -> Result<HashMap<String, Current>, AuthError> {
    let sql = format!(
        "SELECT r.token_hash AS token_hash, r.session_id AS session_id, r.used_at AS used_at, \
         r.replaced_by AS replaced_by, s.user_id AS user_id, s.device_id AS device_id, \
         s.revoked_at AS revoked_at, s.expires_at AS expires_at, s.idle_expires_at AS idle_expires_at, \
         s.auth_time AS auth_time, s.amr AS amr, s.client_id AS client_id FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id \
         WHERE r.token_hash IN ({}) ORDER BY s.id{}",
        params::list(db.backend(), jobs.len()),
        db.for_update()
    );
    let mut q = sqlx::query(&sql).persistent(jobs.len() == 1);
    for j in jobs {
        q = q.bind(j.hash.as_str());
    }
    let mut out = HashMap::with_capacity(jobs.len());
    for r in q.fetch_all(&mut **tx).await? {
        out.insert(
            r.try_get("token_hash")?,
            Current {
                session_id: r.try_get("session_id")?,
                user_id: r.try_get("user_id")?,
                used_at: r.try_get("used_at")?,
                replaced_by: r.try_get("replaced_by")?,
                session_device: r.try_get("device_id")?,
                client: r.try_get("client_id")?,
                revoked: r.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
                expires_at: r.try_get("expires_at")?,
                idle_expires_at: r.try_get("idle_expires_at")?,
                auth_time: r.try_get("auth_time")?,
                amr: r.try_get("amr")?,
            },
        );
    }
    Ok(out)
}

/// Numbers placeholders in order of appearance (`?` on SQLite, `$n` on PostgreSQL;
/// see `vaultpay_store::params`).
struct Placeholders {
    backend: Backend,
    n: usize,
}

impl Placeholders {
    fn new(backend: Backend) -> Self {
        Self { backend, n: 0 }
    }

    fn next(&mut self, out: &mut String) {
        self.n += 1;
        params::param(self.backend, self.n, out);
    }
}

async fn insert_tokens(
    tx: &mut Tx,
    backend: Backend,
    rows: &[(String, String)],
    now: i64,
) -> Result<(), AuthError> {
    if rows.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES {}",
        params::values(backend, rows.len(), 3)
    );
    let mut q = sqlx::query(&sql).persistent(rows.len() == 1);
    for (hash, session) in rows {
        q = q.bind(hash.as_str()).bind(session.as_str()).bind(now);
    }
    q.execute(&mut **tx).await?;
    Ok(())
}

/// Marks the old tokens spent, each pointing at its successor. Every one must still be
/// unspent (the rows are locked, so anything else is a bug): otherwise the group fails.
async fn spend_tokens(
    tx: &mut Tx,
    backend: Backend,
    rows: &[(&str, String)],
    now: i64,
) -> Result<(), AuthError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut p = Placeholders::new(backend);
    let mut sql = String::from("UPDATE refresh_tokens SET used_at = ");
    p.next(&mut sql);
    sql.push_str(", replaced_by = CASE token_hash");
    for _ in rows {
        sql.push_str(" WHEN ");
        p.next(&mut sql);
        sql.push_str(" THEN ");
        p.next(&mut sql);
    }
    sql.push_str(" END WHERE used_at IS NULL AND token_hash IN (");
    for i in 0..rows.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        p.next(&mut sql);
    }
    sql.push(')');
    let mut q = sqlx::query(&sql).persistent(rows.len() == 1).bind(now);
    for (old, new) in rows {
        q = q.bind(*old).bind(new.as_str());
    }
    for (old, _) in rows {
        q = q.bind(*old);
    }
    let n = q.execute(&mut **tx).await?.rows_affected();
    if n != rows.len() as u64 {
        return Err(AuthError::Internal(format!(
            "spent {n} of {} refresh tokens",
            rows.len()
        )));
    }
    Ok(())
}

/// Slides the idle expiry and records where each touched session was last seen from.
/// A session touched twice in one group (a grace-window retry) keeps its last values.
async fn touch_sessions(
    tx: &mut Tx,
    backend: Backend,
    jobs: &[&Rotation],
    touched: &[(String, i64, usize)],
    now: i64,
) -> Result<(), AuthError> {
    let mut last: HashMap<&str, (i64, usize)> = HashMap::with_capacity(touched.len());
    let mut order: Vec<&str> = Vec::with_capacity(touched.len());
    for (session, idle, origin) in touched {
        if last.insert(session, (*idle, *origin)).is_none() {
            order.push(session);
        }
    }
    if order.is_empty() {
        return Ok(());
    }
    let mut p = Placeholders::new(backend);
    let mut sql = String::from("UPDATE sessions SET last_seen_at = ");
    p.next(&mut sql);
    for column in ["idle_expires_at", "ip", "user_agent"] {
        sql.push_str(", ");
        sql.push_str(column);
        sql.push_str(" = CASE id");
        for _ in &order {
            sql.push_str(" WHEN ");
            p.next(&mut sql);
            sql.push_str(" THEN ");
            p.next(&mut sql);
        }
        sql.push_str(" END");
    }
    sql.push_str(" WHERE id IN (");
    for i in 0..order.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        p.next(&mut sql);
    }
    sql.push(')');
    let mut q = sqlx::query(&sql).persistent(order.len() == 1).bind(now);
    for session in &order {
        q = q.bind(*session).bind(last[session].0);
    }
    for session in &order {
        q = q
            .bind(*session)
            .bind(jobs[last[session].1].origin.ip.as_deref());
    }
    for session in &order {
        q = q
            .bind(*session)
            .bind(jobs[last[session].1].origin.user_agent.as_deref());
    }
    for session in &order {
        q = q.bind(*session);
    }
    q.execute(&mut **tx).await?;
    Ok(())
}
