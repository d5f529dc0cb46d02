//! Reads: accounts, transfers, account history and statements, failed transfers.

use crate::error::LedgerError;
use crate::model::{kind_wire, AccountRow, Actor, TransferRow, ACCOUNT_COLS, TRANSFER_COLS};
use sqlx::Row;
use vaultpay_core::money::{format_minor, Currency};
use vaultpay_core::time::rfc3339;
use vaultpay_proto::ledger as wire;
use vaultpay_store::Db;

pub(crate) async fn account_row(db: &Db, id: &str) -> Result<Option<AccountRow>, LedgerError> {
    let row = sqlx::query(&format!(
        "SELECT {ACCOUNT_COLS} FROM accounts WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(db.read())
    .await?;
    Ok(match row {
        Some(r) => Some(AccountRow::from_row(&r)?),
        None => None,
    })
}

pub(crate) fn clamp_limit(limit: Option<i64>, max: i64) -> i64 {
    limit.unwrap_or(50).clamp(1, max)
}

pub(crate) async fn list_accounts(
    db: &Db,
    actor: &Actor,
    owner: Option<&str>,
    cursor: Option<&str>,
    limit: Option<i64>,
    max: i64,
) -> Result<wire::AccountList, LedgerError> {
    let owner = match owner {
        Some(o) if o != actor.user_id && !actor.can_read_any() => {
            return Err(LedgerError::Forbidden("accounts:read"))
        }
        Some(o) => o,
        None => actor.user_id.as_str(),
    };
    let limit = clamp_limit(limit, max);
    let cursor = id_cursor(cursor)?;
    let rows = sqlx::query(&format!(
        "SELECT {ACCOUNT_COLS} FROM accounts WHERE owner_id = $1 AND id > $2 ORDER BY id LIMIT {}",
        limit + 1
    ))
    .bind(owner)
    .bind(cursor.unwrap_or(""))
    .fetch_all(db.read())
    .await?;
    let mut items = Vec::with_capacity(rows.len());
    for r in &rows {
        items.push(AccountRow::from_row(r)?.to_wire(actor));
    }
    let next_cursor = page(&mut items, limit, |a| a.id.clone());
    Ok(wire::AccountList { items, next_cursor })
}

/// A cursor that is an id of the ledger's (what `next_cursor` gives for lists ordered
/// by id): anything else is refused, not read as a place in the order (a mangled one
/// answered the first page again, and a client following cursors looped).
fn id_cursor(cursor: Option<&str>) -> Result<Option<&str>, LedgerError> {
    match cursor {
        Some(c) if uuid::Uuid::try_parse(c).is_err() => {
            Err(LedgerError::InvalidCursor(c.chars().take(64).collect()))
        }
        _ => Ok(cursor),
    }
}

/// Truncates to `limit` and returns the cursor of the last item when more exist.
fn page<T>(items: &mut Vec<T>, limit: i64, key: impl Fn(&T) -> String) -> Option<String> {
    let limit = usize::try_from(limit).unwrap_or(1);
    if items.len() > limit {
        items.truncate(limit);
        items.last().map(key)
    } else {
        None
    }
}

/// The transfer if `actor` may see it (staff, or the owner of either account); 404
/// otherwise. One statement either way, so someone else's transfer answers like a
/// missing one, in the same time (no existence leak by timing either).
pub(crate) async fn get_transfer(
    db: &Db,
    actor: &Actor,
    id: &str,
) -> Result<wire::Transfer, LedgerError> {
    let owner = (!actor.can_read_any()).then_some(actor.user_id.as_str());
    let owned = if owner.is_some() {
        " AND EXISTS (SELECT 1 FROM accounts a WHERE a.owner_id = $2 \
         AND a.id IN (transfers.from_account_id, transfers.to_account_id))"
    } else {
        ""
    };
    let sql = format!("SELECT {TRANSFER_COLS} FROM transfers WHERE id = $1{owned}");
    let q = sqlx::query(&sql).bind(id);
    let row = match owner {
        Some(o) => q.bind(o),
        None => q,
    }
    .fetch_optional(db.read())
    .await?;
    let row = row.ok_or(LedgerError::TransferNotFound)?;
    Ok(TransferRow::from_row(&row)?.to_wire())
}

/// Filters of an account history.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// Inclusive lower bound (micros).
    pub from: Option<i64>,
    /// Exclusive upper bound (micros).
    pub to: Option<i64>,
    /// Only postings with `seq` below this (newest-first pages).
    pub before_seq: Option<i64>,
    pub limit: i64,
    /// Oldest first (statements) instead of newest first.
    pub ascending: bool,
    /// Only postings with `seq` above this (oldest-first pages).
    pub after_seq: Option<i64>,
}

pub(crate) async fn history(
    db: &Db,
    account_id: &str,
    f: &HistoryFilter,
) -> Result<Vec<wire::AccountTransaction>, LedgerError> {
    let order = if f.ascending { "ASC" } else { "DESC" };
    // A time window is a range of the account's sequence: its postings are in time order
    // (`AccountRow::posting_time`), so the first posting at or after a time is found by
    // binary search over the primary key, about log2(postings) probes, in the same
    // statement. The time condition is kept as well.
    let mut ctes = Vec::new();
    let mut window = String::new();
    if f.from.is_some() {
        ctes.push(first_at("lo", "$4"));
        window.push_str("AND p.account_seq >= (SELECT MAX(l) FROM lo) ");
    }
    if f.to.is_some() {
        ctes.push(first_at("hi", "$5"));
        window.push_str("AND p.account_seq < (SELECT MAX(l) FROM hi) ");
    }
    let with = if ctes.is_empty() {
        String::new()
    } else {
        format!("WITH RECURSIVE {} ", ctes.join(", "))
    };
    let rows = sqlx::query(&format!(
        "{with}SELECT p.id, p.account_seq, p.transfer_id, p.amount, p.currency, p.balance_after, p.created_at, \
         t.kind, t.description, t.from_account_id, t.to_account_id \
         FROM postings p JOIN transfers t ON t.id = p.transfer_id \
         WHERE p.account_id = $1 AND p.account_seq < $2 AND p.account_seq > $3 {window}\
         AND p.created_at >= $4 AND p.created_at < $5 \
         ORDER BY p.account_seq {order} LIMIT {}",
        f.limit
    ))
    .bind(account_id)
    .bind(f.before_seq.unwrap_or(i64::MAX))
    .bind(f.after_seq.unwrap_or(0))
    .bind(f.from.unwrap_or(i64::MIN))
    .bind(f.to.unwrap_or(i64::MAX))
    .fetch_all(db.read())
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let from: String = r.try_get("from_account_id")?;
        let to: String = r.try_get("to_account_id")?;
        let kind: String = r.try_get("kind")?;
        out.push(wire::AccountTransaction {
            id: r.try_get("id")?,
            seq: r.try_get("account_seq")?,
            transfer_id: r.try_get("transfer_id")?,
            kind: kind_wire(&kind),
            amount: r.try_get("amount")?,
            currency: r.try_get("currency")?,
            balance_after: r.try_get("balance_after")?,
            description: r.try_get("description")?,
            counterparty_account_id: if from == account_id { to } else { from },
            created_at: rfc3339(r.try_get("created_at")?),
        });
    }
    Ok(out)
}

/// A recursive CTE `name(l, h)` whose largest `l` is the sequence number of the account
/// `$1`'s first posting at or after the time `at` (its posting count + 1 if none is):
/// a binary search over `[1, posting_seq + 1)`, relying on postings being in time order.
/// Each step reads its middle posting once, through the primary key (every sequence
/// number in `[1, posting_seq]` has its posting).
fn first_at(name: &str, at: &str) -> String {
    format!(
        "{name}(l, h) AS (SELECT CAST(1 AS BIGINT), (SELECT posting_seq + 1 FROM accounts WHERE id = $1) \
         UNION ALL SELECT CASE WHEN p.created_at >= {at} THEN l ELSE (l + h) / 2 + 1 END, \
         CASE WHEN p.created_at >= {at} THEN (l + h) / 2 ELSE h END \
         FROM {name} JOIN postings p ON p.account_id = $1 AND p.account_seq = (l + h) / 2 \
         WHERE l < h)"
    )
}

/// The history of `acct`, which the caller may read (`Ledger::readable_account`).
pub(crate) async fn transactions(
    db: &Db,
    acct: &AccountRow,
    mut f: HistoryFilter,
    cursor: Option<&str>,
) -> Result<wire::TransactionList, LedgerError> {
    let account_id = acct.id.as_str();
    if let Some(c) = cursor {
        f.before_seq = Some(
            c.parse::<i64>()
                .map_err(|_| LedgerError::InvalidCursor(c.chars().take(64).collect()))?,
        );
    }
    let limit = f.limit;
    f.limit += 1;
    let mut items = history(db, account_id, &f).await?;
    let next_cursor = page(&mut items, limit, |t| t.seq.to_string());
    Ok(wire::TransactionList { items, next_cursor })
}

fn csv_field(s: &str) -> String {
    // Neutralise spreadsheet formulas and quote every field.
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The CSV statement of an account (oldest first) between `from` and `to`, of at most
/// `max_rows` transactions (more: `statement_too_large`, before any is formatted
/// beyond the limit).
pub(crate) async fn statement(
    db: &Db,
    acct: &AccountRow,
    from: Option<i64>,
    to: Option<i64>,
    max_rows: usize,
) -> Result<String, LedgerError> {
    let account_id = acct.id.as_str();
    let currency = Currency::parse(&acct.currency)?;
    let mut out = String::from("date,transaction_id,transfer_id,kind,description,counterparty_account_id,amount,balance_after,currency\n");
    let mut after = 0i64;
    let mut rows_out = 0usize;
    loop {
        // One row past the limit tells a statement that is too long from one that
        // fills it exactly.
        let left = max_rows.saturating_sub(rows_out).saturating_add(1);
        let f = HistoryFilter {
            from,
            to,
            limit: i64::try_from(left.min(1000)).unwrap_or(1000),
            ascending: true,
            after_seq: Some(after),
            ..Default::default()
        };
        let rows = history(db, account_id, &f).await?;
        if rows.is_empty() {
            break;
        }
        rows_out += rows.len();
        if rows_out > max_rows {
            return Err(LedgerError::StatementTooLarge(max_rows));
        }
        for t in &rows {
            let kind = serde_json::to_value(t.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{}\n",
                t.created_at,
                t.id,
                t.transfer_id,
                kind,
                csv_field(&t.description),
                t.counterparty_account_id,
                format_minor(t.amount, currency),
                format_minor(t.balance_after, currency),
                t.currency
            ));
            after = t.seq;
        }
    }
    Ok(out)
}

pub(crate) async fn failed_transfers(
    db: &Db,
    actor: &Actor,
    user: Option<&str>,
    cursor: Option<&str>,
    limit: Option<i64>,
    max: i64,
) -> Result<wire::FailedTransferList, LedgerError> {
    if !actor.can_audit() {
        return Err(LedgerError::Forbidden("audit:read"));
    }
    let limit = clamp_limit(limit, max);
    let cursor = id_cursor(cursor)?;
    // newest first; one user's attempts through the (user_id, id) index
    let by_user = if user.is_some() {
        "user_id = $2 AND "
    } else {
        ""
    };
    let sql = format!(
        "SELECT id, user_id, idempotency_key, operation, transfer_id, from_account_id, to_account_id, amount, currency, \
         reason, detail, created_at \
         FROM failed_transfers WHERE {by_user}id < $1 ORDER BY id DESC LIMIT {}",
        limit + 1
    );
    let rows = sqlx::query(&sql).bind(cursor.unwrap_or("~"));
    let rows = match user {
        Some(u) => rows.bind(u),
        None => rows,
    }
    .fetch_all(db.read())
    .await?;
    let mut items = Vec::with_capacity(rows.len());
    for r in &rows {
        items.push(wire::FailedTransfer {
            id: r.try_get("id")?,
            user_id: r.try_get("user_id")?,
            operation: r.try_get("operation")?,
            transfer_id: r.try_get("transfer_id")?,
            idempotency_key: r.try_get("idempotency_key")?,
            from_account_id: r.try_get("from_account_id")?,
            to_account_id: r.try_get("to_account_id")?,
            amount: r.try_get("amount")?,
            currency: r.try_get("currency")?,
            reason: r.try_get("reason")?,
            detail: r.try_get("detail")?,
            created_at: rfc3339(r.try_get("created_at")?),
        });
    }
    let next_cursor = page(&mut items, limit, |f| f.id.clone());
    Ok(wire::FailedTransferList { items, next_cursor })
}

pub(crate) async fn audit_log(
    db: &Db,
    actor: &Actor,
    cursor: Option<&str>,
    limit: Option<i64>,
) -> Result<wire::AuditList, LedgerError> {
    if !actor.can_audit() {
        return Err(LedgerError::Forbidden("audit:read"));
    }
    let before_seq = match cursor {
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| LedgerError::InvalidCursor(c.chars().take(64).collect()))?,
        ),
        None => None,
    };
    let limit = clamp_limit(limit, 499);
    let f = vaultpay_store::audit::AuditFilter {
        before_seq,
        limit: limit + 1,
        ..Default::default()
    };
    let entries = vaultpay_store::audit::list(db, &f).await?;
    let mut items: Vec<wire::AuditEntry> = entries
        .into_iter()
        .map(|e| wire::AuditEntry {
            seq: e.seq,
            id: e.id,
            at: rfc3339(e.at),
            actor: e.actor,
            action: e.action,
            resource: e.resource,
            outcome: e.outcome,
            request_id: e.request_id,
            metadata: serde_json::from_str(&e.metadata).unwrap_or(serde_json::Value::Null),
            hash: e.hash,
        })
        .collect();
    let next_cursor = page(&mut items, limit, |e| e.seq.to_string());
    Ok(wire::AuditList { items, next_cursor })
}
