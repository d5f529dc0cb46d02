//! The operations that write: open an account, move money, place and resolve holds,
//! batches. Each validates everything before it writes, so a domain error leaves the
//! transaction untouched (batches use a savepoint per item).

use crate::engine::{exec_sql, Job, Op, Reply};
use crate::error::LedgerError;
use crate::model::{AccountRow, Actor, TransferRow, ACCOUNT_COLS, POSTING_COLS, TRANSFER_COLS};
use crate::Core;
use std::collections::HashMap;
use vaultpay_core::money::{checked_add_balance, checked_sub_balance, Amount, Currency};
use vaultpay_core::time::{now_micros, secs};
use vaultpay_proto::ledger::{
    self as wire, AccountKind, BatchItem, BatchRequest, BatchResponse, TransferRequest,
    TreasuryRequest,
};
use vaultpay_store::audit::{self, NewAudit, Origin};
use vaultpay_store::{Db, Tx};

pub(crate) struct Done {
    pub reply: Reply,
    pub resource: Option<String>,
    /// The body as the idempotency key stores it, when already compressed.
    pub packed: Option<Vec<u8>>,
}

impl Done {
    fn new(reply: Reply, resource: Option<String>) -> Self {
        Done {
            reply,
            resource,
            packed: None,
        }
    }
}

pub(crate) async fn run(core: &Core, tx: &mut Tx, job: &Job) -> Result<Done, LedgerError> {
    let actor = &job.actor;
    let origin = &job.origin;
    match &job.op {
        Op::Open(req) => {
            let a = open_account(core, tx, actor, origin, req).await?;
            Ok(Done::new(Reply::json(201, &a.to_wire(actor))?, Some(a.id)))
        }
        Op::Transfer(req) => {
            let t = transfer(core, tx, actor, origin, req, None).await?;
            Ok(Done::new(Reply::json(201, &t.to_wire())?, Some(t.id)))
        }
        Op::Deposit(req) => {
            let t = treasury(core, tx, actor, origin, req, true).await?;
            Ok(Done::new(Reply::json(201, &t.to_wire())?, Some(t.id)))
        }
        Op::Withdraw(req) => {
            let t = treasury(core, tx, actor, origin, req, false).await?;
            Ok(Done::new(Reply::json(201, &t.to_wire())?, Some(t.id)))
        }
        Op::Post(id, req) => {
            let t = post_hold(core, tx, actor, origin, id, req.amount).await?;
            Ok(Done::new(Reply::json(200, &t.to_wire())?, Some(t.id)))
        }
        Op::Void(id, req) => {
            let t = void_hold(core, tx, actor, origin, id, req.reason.as_deref()).await?;
            Ok(Done::new(Reply::json(200, &t.to_wire())?, Some(t.id)))
        }
        Op::Batch(req) => batch(core, tx, job, req).await,
    }
}

/// Records a refused money movement in `failed_transfers` (in the caller's transaction).
pub(crate) async fn record_failure(
    tx: &mut Tx,
    job: &Job,
    e: &LedgerError,
) -> Result<(), LedgerError> {
    let (from, to, amount, currency) = match &job.op {
        Op::Transfer(r) => (
            Some(r.from_account_id.as_str()),
            Some(r.to_account_id.as_str()),
            Some(r.amount),
            Some(r.currency.as_str()),
        ),
        Op::Deposit(r) => (
            None,
            Some(r.account_id.as_str()),
            Some(r.amount),
            Some(r.currency.as_str()),
        ),
        Op::Withdraw(r) => (
            Some(r.account_id.as_str()),
            None,
            Some(r.amount),
            Some(r.currency.as_str()),
        ),
        Op::Post(_, r) => (None, None, r.amount, None),
        Op::Void(..) => (None, None, None, None),
        // Batches record their failed items themselves; opening an account moves nothing.
        Op::Batch(_) | Op::Open(_) => return Ok(()),
    };
    let hold = match &job.op {
        Op::Post(id, _) | Op::Void(id, _) => Some(id.as_str()),
        _ => None,
    };
    insert_failure(
        tx,
        &job.actor,
        job.key.as_deref(),
        job.op.name(),
        hold,
        from,
        to,
        amount,
        currency,
        e,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn insert_failure(
    tx: &mut Tx,
    actor: &Actor,
    key: Option<&str>,
    op: &str,
    hold: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    amount: Option<i64>,
    currency: Option<&str>,
    e: &LedgerError,
) -> Result<(), LedgerError> {
    let currency: Option<String> = currency.map(|c| c.chars().take(16).collect());
    sqlx::query(
        "INSERT INTO failed_transfers (id, user_id, idempotency_key, operation, transfer_id, from_account_id, \
         to_account_id, amount, currency, reason, detail, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(crate::ids::new_id())
    .bind(&actor.user_id)
    .bind(key)
    .bind(op)
    .bind(hold.map(|s| s.chars().take(64).collect::<String>()))
    .bind(from.map(|s| s.chars().take(64).collect::<String>()))
    .bind(to.map(|s| s.chars().take(64).collect::<String>()))
    .bind(amount)
    .bind(currency)
    .bind(e.code())
    .bind(e.to_string())
    .bind(now_micros())
    .execute(&mut **tx)
    .await?;
    crate::tally::count("ledger_failed_transfers_total", "reason", e.code(), 1);
    Ok(())
}

/// A batch item that posted.
fn posted_item(index: usize, t: &TransferRow) -> BatchItem {
    BatchItem {
        index,
        status: 201,
        transfer: Some(t.to_wire()),
        problem: None,
    }
}

/// A batch item refused with `e`.
fn refused_item(index: usize, e: &LedgerError, job: &Job) -> BatchItem {
    BatchItem {
        index,
        status: e.status().as_u16(),
        transfer: None,
        problem: Some(e.problem(job.origin.request_id.clone())),
    }
}

fn check_amount(amount: i64) -> Result<Amount, LedgerError> {
    Amount::new(amount).map_err(|_| {
        LedgerError::AmountInvalid(format!(
            "amount must be a positive integer number of minor units, at most {}",
            vaultpay_core::money::MAX_MINOR_UNITS
        ))
    })
}

pub(crate) fn check_text(
    field: &str,
    s: &str,
    max: usize,
    required: bool,
) -> Result<(), LedgerError> {
    if required && s.trim().is_empty() {
        return Err(LedgerError::InvalidRequest(format!(
            "{field} must not be empty"
        )));
    }
    if s.chars().count() > max {
        return Err(LedgerError::InvalidRequest(format!(
            "{field} must be at most {max} characters"
        )));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(LedgerError::InvalidRequest(format!(
            "{field} must not contain control characters (line breaks, tabs, NUL)"
        )));
    }
    Ok(())
}

/// Locks the given accounts (ascending id order) and returns them by id.
pub(crate) async fn lock_accounts(
    db: &Db,
    tx: &mut Tx,
    ids: &[&str],
) -> Result<HashMap<String, AccountRow>, LedgerError> {
    let mut ids: Vec<&str> = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    // One statement; rows are locked in ascending id order (ORDER BY with FOR UPDATE
    // locks as rows are returned from the sort).
    let sql = format!(
        "SELECT {ACCOUNT_COLS} FROM accounts WHERE id IN ({}) ORDER BY id{}",
        vaultpay_store::params::list(db.backend(), ids.len()),
        db.for_update()
    );
    let mut q = sqlx::query(&sql);
    for id in &ids {
        q = q.bind(*id);
    }
    let rows = q.fetch_all(&mut **tx).await?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in &rows {
        let a = AccountRow::from_row(r)?;
        out.insert(a.id.clone(), a);
    }
    Ok(out)
}

pub(crate) async fn save_account(tx: &mut Tx, a: &AccountRow) -> Result<(), LedgerError> {
    sqlx::query("UPDATE accounts SET balance = $1, held = $2, posting_seq = $3, status = $4, updated_at = $5 WHERE id = $6")
        .bind(a.balance)
        .bind(a.held)
        .bind(a.posting_seq)
        .bind(&a.status)
        .bind(a.updated_at)
        .bind(&a.id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn check_active(a: &AccountRow) -> Result<(), LedgerError> {
    match a.status.as_str() {
        "active" => Ok(()),
        "frozen" => Err(LedgerError::AccountFrozen(a.id.clone())),
        _ => Err(LedgerError::AccountClosed(a.id.clone())),
    }
}

fn check_currency(requested: &str, a: &AccountRow) -> Result<(), LedgerError> {
    if requested != a.currency {
        // a code that is no currency at all says so, as opening an account does
        if vaultpay_core::money::Currency::parse(requested).is_err() {
            return Err(LedgerError::CurrencyUnknown(
                requested.chars().take(16).collect(),
            ));
        }
        return Err(LedgerError::CurrencyMismatch {
            requested: requested.chars().take(16).collect(),
            account: a.currency.clone(),
        });
    }
    Ok(())
}

/// New balances for moving `amount` from `from` to `to`, checked before anything is written.
fn plan_move(from: &AccountRow, to: &AccountRow, amount: i64) -> Result<(i64, i64), LedgerError> {
    Ok((
        checked_sub_balance(from.balance, amount)?,
        checked_add_balance(to.balance, amount)?,
    ))
}

/// Writes the two postings of a money movement and the new balances.
async fn apply_move(
    tx: &mut Tx,
    transfer_id: &str,
    from: &mut AccountRow,
    to: &mut AccountRow,
    amount: i64,
    balances: (i64, i64),
    now: i64,
) -> Result<(), LedgerError> {
    from.balance = balances.0;
    to.balance = balances.1;
    for acct in [&mut *from, &mut *to] {
        acct.posting_seq += 1;
        acct.updated_at = now;
        acct.posting_time(now);
    }
    // Both postings in one statement, both balances in another.
    sqlx::query(
        "INSERT INTO postings (id, transfer_id, account_id, account_seq, amount, currency, balance_after, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8), ($9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(crate::ids::new_id())
    .bind(transfer_id)
    .bind(&from.id)
    .bind(from.posting_seq)
    .bind(-amount)
    .bind(&from.currency)
    .bind(from.balance)
    .bind(from.last_posted_at)
    .bind(crate::ids::new_id())
    .bind(transfer_id)
    .bind(&to.id)
    .bind(to.posting_seq)
    .bind(amount)
    .bind(&to.currency)
    .bind(to.balance)
    .bind(to.last_posted_at)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE accounts SET \
         balance = CASE WHEN id = $1 THEN $2 ELSE $3 END, \
         held = CASE WHEN id = $4 THEN $5 ELSE $6 END, \
         posting_seq = CASE WHEN id = $7 THEN $8 ELSE $9 END, \
         last_posted_at = CASE WHEN id = $10 THEN $11 ELSE $12 END, \
         updated_at = $13 WHERE id IN ($14, $15)",
    )
    .bind(&from.id)
    .bind(from.balance)
    .bind(to.balance)
    .bind(&from.id)
    .bind(from.held)
    .bind(to.held)
    .bind(&from.id)
    .bind(from.posting_seq)
    .bind(to.posting_seq)
    .bind(&from.id)
    .bind(from.last_posted_at)
    .bind(to.last_posted_at)
    .bind(now)
    .bind(&from.id)
    .bind(&to.id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub(crate) type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds a transfer row's columns in `TRANSFER_COLS` order.
pub(crate) fn bind_transfer<'q>(q: AnyQuery<'q>, t: &'q TransferRow) -> AnyQuery<'q> {
    q.bind(&t.id)
        .bind(&t.kind)
        .bind(&t.from_account_id)
        .bind(&t.to_account_id)
        .bind(t.amount)
        .bind(t.captured)
        .bind(&t.currency)
        .bind(&t.description)
        .bind(&t.status)
        .bind(t.expires_at)
        .bind(&t.initiated_by)
        .bind(&t.batch_id)
        .bind(t.created_at)
        .bind(t.updated_at)
}

async fn insert_transfer(tx: &mut Tx, t: &TransferRow) -> Result<(), LedgerError> {
    let sql = format!(
        "INSERT INTO transfers ({TRANSFER_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    );
    bind_transfer(sqlx::query(&sql), t)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(crate) async fn update_transfer(tx: &mut Tx, t: &TransferRow) -> Result<(), LedgerError> {
    sqlx::query("UPDATE transfers SET captured = $1, status = $2, updated_at = $3 WHERE id = $4")
        .bind(t.captured)
        .bind(&t.status)
        .bind(t.updated_at)
        .bind(&t.id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(crate) async fn outbox(
    tx: &mut Tx,
    topic: &str,
    payload: &serde_json::Value,
    now: i64,
) -> Result<(), LedgerError> {
    sqlx::query("INSERT INTO outbox (id, topic, payload, created_at) VALUES ($1, $2, $3, $4)")
        .bind(crate::ids::new_id())
        .bind(topic)
        .bind(payload.to_string())
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The audit metadata of a change to transfer `t`.
pub(crate) fn transfer_meta(t: &TransferRow, extra: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "kind": t.kind, "from": t.from_account_id, "to": t.to_account_id, "amount": t.amount,
        "captured": t.captured, "currency": t.currency, "status": t.status, "extra": extra,
    })
}

/// Audit entry plus outbox event for a change to transfer `t`.
async fn record(
    db: &Db,
    tx: &mut Tx,
    actor: Option<&str>,
    origin: &Origin,
    action: &str,
    t: &TransferRow,
    extra: serde_json::Value,
) -> Result<(), LedgerError> {
    let meta = transfer_meta(t, extra);
    let mut entry = NewAudit::success(action).resource(&t.id).metadata(meta);
    if let Some(a) = actor {
        entry = entry.actor(a);
    }
    audit::append_many_locked(db, tx, &[(origin, entry)]).await?;
    let payload = serde_json::to_value(t.to_wire()).unwrap_or_default();
    outbox(tx, action, &payload, t.updated_at).await
}

async fn open_account(
    core: &Core,
    tx: &mut Tx,
    actor: &Actor,
    origin: &Origin,
    req: &wire::OpenAccountRequest,
) -> Result<AccountRow, LedgerError> {
    if !actor.can_own() {
        return Err(LedgerError::Forbidden("accounts:own"));
    }
    let currency = Currency::parse(&req.currency)?;
    let kind = match req.kind {
        AccountKind::Savings => "savings",
        AccountKind::Current => "current",
        AccountKind::Settlement => {
            return Err(LedgerError::InvalidRequest(
                "kind must be savings or current".into(),
            ))
        }
    };
    check_text("name", &req.name, 100, true)?;
    let a = insert_account(
        &core.db,
        tx,
        Some(&actor.user_id),
        kind,
        req.name.trim(),
        currency,
    )
    .await?;
    let meta = serde_json::json!({"currency": a.currency, "kind": a.kind});
    audit::append_many_locked(
        &core.db,
        tx,
        &[(
            origin,
            NewAudit::success("ledger.account.opened")
                .actor(&actor.user_id)
                .resource(&a.id)
                .metadata(meta),
        )],
    )
    .await?;
    let payload = serde_json::json!({"account_id": a.id, "owner_id": a.owner_id, "currency": a.currency, "kind": a.kind});
    outbox(tx, "ledger.account.opened", &payload, a.created_at).await?;
    Ok(a)
}

async fn insert_account(
    _db: &Db,
    tx: &mut Tx,
    owner: Option<&str>,
    kind: &str,
    name: &str,
    currency: Currency,
) -> Result<AccountRow, LedgerError> {
    let now = now_micros();
    // Writers are serialised, so check-then-insert cannot race.
    let mut number = String::new();
    for _ in 0..16 {
        let candidate = vaultpay_core::account_number::generate(&mut rand::thread_rng());
        let taken = sqlx::query("SELECT id FROM accounts WHERE number = $1")
            .bind(&candidate)
            .fetch_optional(&mut **tx)
            .await?;
        if taken.is_none() {
            number = candidate;
            break;
        }
    }
    if number.is_empty() {
        return Err(LedgerError::Internal(
            "could not allocate an account number".into(),
        ));
    }
    let a = AccountRow {
        id: crate::ids::new_id(),
        number,
        owner_id: owner.map(str::to_owned),
        kind: kind.to_owned(),
        name: name.to_owned(),
        currency: currency.code().to_owned(),
        status: "active".to_owned(),
        balance: 0,
        held: 0,
        posting_seq: 0,
        created_at: now,
        updated_at: now,
        last_posted_at: 0,
    };
    sqlx::query(&format!("INSERT INTO accounts ({ACCOUNT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"))
        .bind(&a.id)
        .bind(&a.number)
        .bind(&a.owner_id)
        .bind(&a.kind)
        .bind(&a.name)
        .bind(&a.currency)
        .bind(&a.status)
        .bind(a.balance)
        .bind(a.held)
        .bind(a.posting_seq)
        .bind(a.created_at)
        .bind(a.updated_at)
        .bind(a.last_posted_at)
        .execute(&mut **tx)
        .await?;
    Ok(a)
}

/// The settlement account of `currency`, created on first use.
async fn settlement_id(db: &Db, tx: &mut Tx, currency: Currency) -> Result<String, LedgerError> {
    let row = sqlx::query("SELECT id FROM accounts WHERE kind = 'settlement' AND currency = $1")
        .bind(currency.code())
        .fetch_optional(&mut **tx)
        .await?;
    if let Some(r) = row {
        return Ok(sqlx::Row::try_get(&r, "id")?);
    }
    let a = insert_account(
        db,
        tx,
        None,
        "settlement",
        &format!("{} settlement", currency.code()),
        currency,
    )
    .await?;
    Ok(a.id)
}

/// A transfer between two customer accounts, or a hold when `req.pending`.
pub(crate) async fn transfer(
    core: &Core,
    tx: &mut Tx,
    actor: &Actor,
    origin: &Origin,
    req: &TransferRequest,
    batch_id: Option<&str>,
) -> Result<TransferRow, LedgerError> {
    let amount = check_request(req)?;
    let timeout = if req.pending {
        let t = req
            .timeout_secs
            .unwrap_or(core.config.hold_default_timeout_secs);
        if !(1..=core.config.hold_max_timeout_secs).contains(&t) {
            return Err(LedgerError::InvalidRequest(format!(
                "timeout_secs must be between 1 and {}",
                core.config.hold_max_timeout_secs
            )));
        }
        Some(t)
    } else if req.timeout_secs.is_some() {
        return Err(LedgerError::InvalidRequest(
            "timeout_secs applies only to pending transfers".into(),
        ));
    } else {
        None
    };
    let mut accts =
        lock_accounts(&core.db, tx, &[&req.from_account_id, &req.to_account_id]).await?;
    check_parties(actor, req, amount, &accts)?;
    let (Some(mut from), Some(mut to)) = (
        accts.remove(&req.from_account_id),
        accts.remove(&req.to_account_id),
    ) else {
        return Err(LedgerError::AccountNotFound);
    };
    let now = now_micros();
    let mut t = TransferRow::posted(actor, req, amount, batch_id, now);
    if let Some(timeout) = timeout {
        from.held = checked_add_balance(from.held, amount)?;
        from.updated_at = now;
        t.kind = "hold".to_owned();
        t.status = "pending".to_owned();
        t.expires_at = Some(now.saturating_add(secs(timeout)));
        insert_transfer(tx, &t).await?;
        save_account(tx, &from).await?;
        if batch_id.is_none() {
            record(
                &core.db,
                tx,
                Some(&actor.user_id),
                origin,
                "ledger.hold.created",
                &t,
                serde_json::Value::Null,
            )
            .await?;
        }
    } else {
        let balances = plan_move(&from, &to, amount)?;
        insert_transfer(tx, &t).await?;
        apply_move(tx, &t.id, &mut from, &mut to, amount, balances, now).await?;
        if batch_id.is_none() {
            record(
                &core.db,
                tx,
                Some(&actor.user_id),
                origin,
                "ledger.transfer.posted",
                &t,
                serde_json::Value::Null,
            )
            .await?;
        }
    }
    let kind = if req.pending { "hold" } else { "transfer" };
    crate::tally::count("ledger_transfers_total", "kind", kind, 1);
    Ok(t)
}

/// Deposit (settlement → account) or withdrawal (account → settlement).
async fn treasury(
    core: &Core,
    tx: &mut Tx,
    actor: &Actor,
    origin: &Origin,
    req: &TreasuryRequest,
    deposit: bool,
) -> Result<TransferRow, LedgerError> {
    if !actor.is_admin() {
        return Err(LedgerError::Forbidden("treasury:move"));
    }
    let amount = check_amount(req.amount)?.get();
    let currency = Currency::parse(&req.currency)?;
    check_text("reference", &req.reference, 500, false)?;
    // Does the account exist at all (and in which currency)? Checked before the
    // settlement account is created so a typo creates nothing.
    let exists = lock_accounts(&core.db, tx, &[&req.account_id]).await?;
    let acct = exists
        .get(&req.account_id)
        .ok_or(LedgerError::AccountNotFound)?;
    if acct.is_settlement() {
        return Err(LedgerError::SettlementAccount);
    }
    check_currency(currency.code(), acct)?;
    // Every refusal that depends only on the account comes before the settlement
    // account is created, so a refused deposit or withdrawal writes nothing (the job runs
    // exclusively: the account cannot change before it is locked again below).
    check_active(acct)?;
    if !deposit && acct.available() < amount {
        return Err(LedgerError::InsufficientFunds {
            available: acct.available(),
            requested: amount,
        });
    }
    let settlement = settlement_id(&core.db, tx, currency).await?;
    let mut accts = lock_accounts(&core.db, tx, &[&req.account_id, &settlement]).await?;
    let mut acct = accts
        .remove(&req.account_id)
        .ok_or(LedgerError::AccountNotFound)?;
    let mut settle = accts
        .remove(&settlement)
        .ok_or(LedgerError::Internal("settlement account vanished".into()))?;
    let now = now_micros();
    let (kind, from_id, to_id) = if deposit {
        ("deposit", settle.id.clone(), acct.id.clone())
    } else {
        ("withdrawal", acct.id.clone(), settle.id.clone())
    };
    let t = TransferRow {
        id: crate::ids::new_id(),
        kind: kind.to_owned(),
        from_account_id: from_id,
        to_account_id: to_id,
        amount,
        captured: 0,
        currency: currency.code().to_owned(),
        description: req.reference.clone(),
        status: "posted".to_owned(),
        expires_at: None,
        initiated_by: actor.user_id.clone(),
        batch_id: None,
        created_at: now,
        updated_at: now,
    };
    let (from, to) = if deposit {
        (&mut settle, &mut acct)
    } else {
        (&mut acct, &mut settle)
    };
    let balances = plan_move(from, to, amount)?;
    insert_transfer(tx, &t).await?;
    apply_move(tx, &t.id, from, to, amount, balances, now).await?;
    record(
        &core.db,
        tx,
        Some(&actor.user_id),
        origin,
        &format!("ledger.{kind}.posted"),
        &t,
        serde_json::Value::Null,
    )
    .await?;
    crate::tally::count("ledger_transfers_total", "kind", kind, 1);
    Ok(t)
}

/// Loads a hold, locks both of its accounts, and reloads it under the locks.
async fn lock_hold(
    db: &Db,
    tx: &mut Tx,
    id: &str,
) -> Result<(TransferRow, AccountRow, AccountRow), LedgerError> {
    let sql = format!("SELECT {TRANSFER_COLS} FROM transfers WHERE id = $1");
    let t = sqlx::query(&sql)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(LedgerError::TransferNotFound)?;
    let t = TransferRow::from_row(&t)?;
    let mut accts = lock_accounts(db, tx, &[&t.from_account_id, &t.to_account_id]).await?;
    let from = accts
        .remove(&t.from_account_id)
        .ok_or(LedgerError::AccountNotFound)?;
    let to = accts
        .remove(&t.to_account_id)
        .ok_or(LedgerError::AccountNotFound)?;
    let t = sqlx::query(&format!("{sql}{}", db.for_update()))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(LedgerError::TransferNotFound)?;
    Ok((TransferRow::from_row(&t)?, from, to))
}

async fn post_hold(
    core: &Core,
    tx: &mut Tx,
    actor: &Actor,
    origin: &Origin,
    id: &str,
    amount: Option<i64>,
) -> Result<TransferRow, LedgerError> {
    let (mut t, mut from, mut to) = lock_hold(&core.db, tx, id).await?;
    if !(from.visible_to(actor) || to.owned_by(actor)) {
        return Err(LedgerError::TransferNotFound);
    }
    if !from.owned_by(actor) {
        return Err(LedgerError::NotAccountOwner);
    }
    let now = now_micros();
    still_pending(&t, now)?;
    let remaining = t.remaining();
    let p = amount.unwrap_or(remaining);
    if p < 1 || p > remaining {
        return Err(LedgerError::AmountInvalid(format!(
            "amount must be between 1 and the {remaining} still held"
        )));
    }
    check_active(&from)?;
    check_active(&to)?;
    let balances = plan_move(&from, &to, p)?;
    from.held = checked_sub_balance(from.held, p)?;
    t.captured += p;
    if t.captured == t.amount {
        t.status = "posted".to_owned();
    }
    t.updated_at = now;
    update_transfer(tx, &t).await?;
    apply_move(tx, &t.id, &mut from, &mut to, p, balances, now).await?;
    record(
        &core.db,
        tx,
        Some(&actor.user_id),
        origin,
        "ledger.hold.posted",
        &t,
        serde_json::json!({"posted": p}),
    )
    .await?;
    Ok(t)
}

async fn void_hold(
    core: &Core,
    tx: &mut Tx,
    actor: &Actor,
    origin: &Origin,
    id: &str,
    reason: Option<&str>,
) -> Result<TransferRow, LedgerError> {
    if let Some(r) = reason {
        check_text("reason", r, 500, false)?;
    }
    let (mut t, mut from, to) = lock_hold(&core.db, tx, id).await?;
    if !(from.visible_to(actor) || to.owned_by(actor)) {
        return Err(LedgerError::TransferNotFound);
    }
    if !(from.owned_by(actor) || to.owned_by(actor)) {
        return Err(LedgerError::NotAccountOwner);
    }
    let now = now_micros();
    still_pending(&t, now)?;
    release_hold(tx, &mut t, &mut from, "voided", now).await?;
    let extra = serde_json::json!({"reason": reason});
    record(
        &core.db,
        tx,
        Some(&actor.user_id),
        origin,
        "ledger.hold.voided",
        &t,
        extra,
    )
    .await?;
    Ok(t)
}

/// Refuses to post or void `t` unless it is a hold still pending and not past its
/// timeout (an overdue hold is the expiry task's to release, as `expired`).
fn still_pending(t: &TransferRow, now: i64) -> Result<(), LedgerError> {
    if t.kind != "hold" || t.status != "pending" {
        return Err(LedgerError::HoldNotPending(if t.kind == "hold" {
            t.status.clone()
        } else {
            "not a hold".into()
        }));
    }
    if t.expires_at.is_some_and(|e| e <= now) {
        return Err(LedgerError::HoldExpired);
    }
    Ok(())
}

/// Releases what a pending hold still reserves and marks it `status`.
pub(crate) async fn release_hold(
    tx: &mut Tx,
    t: &mut TransferRow,
    from: &mut AccountRow,
    status: &str,
    now: i64,
) -> Result<(), LedgerError> {
    from.held = checked_sub_balance(from.held, t.remaining())?;
    from.updated_at = now;
    t.status = status.to_owned();
    t.updated_at = now;
    update_transfer(tx, t).await?;
    save_account(tx, from).await
}

/// Voids one expired hold, if it is still pending (exactly once: the status check
/// happens under the row locks). Returns whether it expired it.
pub(crate) async fn expire_hold(
    core: &Core,
    tx: &mut Tx,
    id: &str,
    now: i64,
) -> Result<bool, LedgerError> {
    let (mut t, mut from, _to) = match lock_hold(&core.db, tx, id).await {
        Ok(x) => x,
        Err(LedgerError::TransferNotFound) => return Ok(false),
        Err(e) => return Err(e),
    };
    if t.kind != "hold" || t.status != "pending" || t.expires_at.is_none_or(|e| e > now) {
        return Ok(false);
    }
    release_hold(tx, &mut t, &mut from, "expired", now).await?;
    record(
        &core.db,
        tx,
        None,
        &Origin::default(),
        "ledger.hold.expired",
        &t,
        serde_json::Value::Null,
    )
    .await?;
    Ok(true)
}

async fn batch(
    core: &Core,
    tx: &mut Tx,
    job: &Job,
    req: &BatchRequest,
) -> Result<Done, LedgerError> {
    let n = req.transfers.len();
    if n == 0 {
        return Err(LedgerError::InvalidRequest(
            "a batch needs at least one transfer".into(),
        ));
    }
    if n > core.config.max_batch {
        return Err(LedgerError::BatchTooLarge(n, core.config.max_batch));
    }
    let batch_id = crate::ids::new_id();
    // Batches of plain transfers take the bulk path: all accounts locked with a few
    // statements, every item checked in memory, rows written with multi-row statements.
    if !req
        .transfers
        .iter()
        .any(|t| t.pending || t.timeout_secs.is_some())
    {
        return bulk_batch(core, tx, job, req, &batch_id).await;
    }
    let mut items = Vec::with_capacity(n);
    let mut failures: Vec<(usize, LedgerError)> = Vec::new();
    // No savepoint per item: `transfer` validates everything before its first write,
    // so a refused item has written nothing (and a storage error fails the whole job).
    // Savepoints per item would also push PostgreSQL past its 64 cached subtransactions.
    // One savepoint undoes the items applied before an atomic batch's failure.
    exec_sql(tx, "SAVEPOINT batch").await?;
    // Each applied transfer is counted; an atomic batch that fails rolls them back to
    // its savepoint, and their counts go with them.
    let (applied, tally) = crate::tally::collect(async {
        for (index, item) in req.transfers.iter().enumerate() {
            match transfer(core, tx, &job.actor, &job.origin, item, Some(&batch_id)).await {
                Ok(t) => {
                    items.push(posted_item(index, &t));
                }
                Err(e) if e.is_server_error() => return Err(e),
                Err(e) => {
                    items.push(refused_item(index, &e, job));
                    failures.push((index, e));
                    if req.atomic {
                        break;
                    }
                }
            }
        }
        Ok::<_, LedgerError>(())
    })
    .await;
    applied?;
    let failed = failures.len();
    if req.atomic && failed > 0 {
        drop(tally);
        exec_sql(tx, "ROLLBACK TO SAVEPOINT batch").await?;
        exec_sql(tx, "RELEASE SAVEPOINT batch").await?;
        return Err(atomic_batch_failed(core, tx, job, req, items, &failures).await?);
    }
    tally.keep();
    exec_sql(tx, "RELEASE SAVEPOINT batch").await?;
    let response = BatchResponse {
        atomic: req.atomic,
        succeeded: n - failed,
        failed,
        items,
    };
    finish_batch(core, tx, job, req, &batch_id, &failures, &response).await?;
    let (reply, packed) = render(job, 200, &response)?;
    // This path is the one that places holds: the key names the batch, so that the
    // purge keeps it while any of its holds is pending (see `purge_idempotency`).
    Ok(Done {
        reply,
        resource: Some(batch_id),
        packed,
    })
}

/// The reply to `job` with `status` and body `v`, and the body as its idempotency key
/// stores it when that is compressed (see `engine::packed_body`).
fn render<T: serde::Serialize>(
    job: &Job,
    status: u16,
    v: &T,
) -> Result<(Reply, Option<Vec<u8>>), LedgerError> {
    let reply = Reply::json(status, v)?;
    let packed = job
        .key
        .as_ref()
        .and_then(|_| crate::engine::packed_body(&reply.body));
    Ok((reply, packed))
}

/// An atomic batch refused by one of its items: records the refusal and answers with
/// the failing item only (nothing else was applied).
async fn atomic_batch_failed(
    core: &Core,
    tx: &mut Tx,
    job: &Job,
    req: &BatchRequest,
    items: Vec<BatchItem>,
    failures: &[(usize, LedgerError)],
) -> Result<LedgerError, LedgerError> {
    let items: Vec<BatchItem> = items.into_iter().filter(|i| i.status >= 400).collect();
    record_item_failures(core, tx, job, req, failures).await?;
    Ok(LedgerError::BatchFailed(Box::new(BatchResponse {
        atomic: true,
        succeeded: 0,
        failed: failures.len(),
        items,
    })))
}

/// What a batch writes once its transfers are: its refused items, and when any item
/// posted, its audit entry and outbox event.
async fn finish_batch(
    core: &Core,
    tx: &mut Tx,
    job: &Job,
    req: &BatchRequest,
    batch_id: &str,
    failures: &[(usize, LedgerError)],
    response: &BatchResponse,
) -> Result<(), LedgerError> {
    record_item_failures(core, tx, job, req, failures).await?;
    if response.succeeded == 0 {
        return Ok(());
    }
    let ids: Vec<&str> = response
        .items
        .iter()
        .filter_map(|i| i.transfer.as_ref().map(|t| t.id.as_str()))
        .collect();
    let meta = serde_json::json!({"batch_id": batch_id, "succeeded": response.succeeded, "failed": response.failed, "transfers": ids});
    audit::append_many_locked(
        &core.db,
        tx,
        &[(
            &job.origin,
            NewAudit::success("ledger.batch.posted")
                .actor(&job.actor.user_id)
                .resource(batch_id)
                .metadata(meta.clone()),
        )],
    )
    .await?;
    outbox(tx, "ledger.batch.posted", &meta, now_micros()).await?;
    Ok(())
}

/// Records a batch's refused items in `failed_transfers`, several rows per statement
/// (a batch of 1,000 refused items was 1,000 statements on the writer).
async fn record_item_failures(
    core: &Core,
    tx: &mut Tx,
    job: &Job,
    req: &BatchRequest,
    failures: &[(usize, LedgerError)],
) -> Result<(), LedgerError> {
    let rows: Vec<crate::group::Failure> = failures
        .iter()
        .filter_map(|(index, e)| {
            let r = req.transfers.get(*index)?;
            Some(crate::group::Failure::new(job, "batch_item", r, e))
        })
        .collect();
    crate::group::write_failures(&core.db, tx, &rows, now_micros()).await
}

/// Checks one plain transfer (of a batch or a group) against the in-memory, locked
/// accounts, with the same checks as [`transfer`]; when it is valid, applies it to them
/// and pushes the posted transfer onto `transfers` and its two postings onto
/// `postings`: numbered, and with the running balances, as the accounts stand once it
/// is applied (so the postings of one account follow the order of the calls). Returns
/// the transfer.
pub(crate) fn apply_and_post<'t>(
    actor: &Actor,
    req: &TransferRequest,
    batch_id: Option<&str>,
    now: i64,
    accts: &mut HashMap<String, AccountRow>,
    transfers: &'t mut Vec<TransferRow>,
    postings: &mut Vec<crate::group::Posting>,
) -> Result<&'t TransferRow, LedgerError> {
    let amount = check_request(req)?;
    let (from, to) = check_parties(actor, req, amount, accts)?;
    let (from_balance, to_balance) = plan_move(from, to, amount)?;
    let ti = transfers.len();
    for (acct, signed, balance) in [
        (&req.from_account_id, -amount, from_balance),
        (&req.to_account_id, amount, to_balance),
    ] {
        if let Some(a) = accts.get_mut(acct) {
            a.balance = balance;
            a.posting_seq += 1;
            let at = a.posting_time(now);
            postings.push((ti, a.id.clone(), a.posting_seq, signed, a.balance, at));
        }
    }
    transfers.push(TransferRow::posted(actor, req, amount, batch_id, now));
    Ok(&transfers[ti])
}

/// What a transfer request must satisfy before any account is read: a valid amount
/// (returned), two different accounts, a description within bounds.
fn check_request(req: &TransferRequest) -> Result<i64, LedgerError> {
    let amount = check_amount(req.amount)?.get();
    if req.from_account_id == req.to_account_id {
        return Err(LedgerError::SameAccount);
    }
    check_text("description", &req.description, 500, false)?;
    Ok(amount)
}

/// What moving `amount` as `req` asks needs of the (locked) accounts in `accts`, in
/// this order: the payer exists and `actor` may see it (else not found: no existence
/// leak) and owns it; the payee exists and is no settlement account; both are in the
/// requested currency and active; the payer's available funds cover the amount.
/// Returns the payer and the payee. The single transfer ([`transfer`]) and the
/// batch and group paths ([`apply_and_post`]) both call it.
fn check_parties<'a>(
    actor: &Actor,
    req: &TransferRequest,
    amount: i64,
    accts: &'a HashMap<String, AccountRow>,
) -> Result<(&'a AccountRow, &'a AccountRow), LedgerError> {
    let from = accts
        .get(&req.from_account_id)
        .ok_or(LedgerError::AccountNotFound)?;
    if !from.visible_to(actor) {
        return Err(LedgerError::AccountNotFound);
    }
    if !from.owned_by(actor) {
        return Err(LedgerError::NotAccountOwner);
    }
    let to = accts
        .get(&req.to_account_id)
        .ok_or(LedgerError::AccountNotFound)?;
    if to.is_settlement() {
        return Err(LedgerError::AccountNotFound);
    }
    check_currency(&req.currency, from)?;
    check_currency(&req.currency, to)?;
    check_active(from)?;
    check_active(to)?;
    if from.available() < amount {
        return Err(LedgerError::InsufficientFunds {
            available: from.available(),
            requested: amount,
        });
    }
    Ok((from, to))
}

/// `(…), (…)` placeholders for `rows` rows of `cols` parameters (see
/// [`vaultpay_store::params`]: anonymous on SQLite, where numbered ones cost O(n²)).
pub(crate) fn placeholders(db: &Db, rows: usize, cols: usize) -> String {
    vaultpay_store::params::values(db.backend(), rows, cols)
}

/// Largest number of rows in one bulk statement.
const BULK_CHUNK: usize = 512;

/// Splits `rows` into chunks whose sizes are powers of two (at most [`BULK_CHUNK`]):
/// 1,000 rows are written as 512 + 256 + 128 + 64 + 32 + 8. A statement's text
/// depends only on its row count, so there are at most 10 texts per table and they
/// stay prepared in the connection's statement cache. Before, every batch built a
/// statement for its exact row count (up to 16,000 parameters) and SQLite parsed
/// it again: 8% of the SQLite writer thread in `perf` (sqlite3Prepare) under batch load.
pub(crate) fn bulk_chunks<T>(rows: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = rest.len().min(BULK_CHUNK);
        // The largest power of two <= n.
        let size = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        Some(chunk)
    })
}

/// `INSERT` (failing on a conflict) of `rows` rows of `width` columns `cols` into
/// `table`.
pub(crate) fn insert_sql(db: &Db, table: &str, cols: &str, rows: usize, width: usize) -> String {
    format!(
        "{} INTO {table} ({cols}) VALUES {}",
        db.insert_or_fail(),
        placeholders(db, rows, width)
    )
}

/// `rows` in [`bulk_chunks`], each with the text of its statement, `sql` of its row
/// count (built before the statements that borrow it).
fn chunk_statements<T>(rows: &[T], sql: impl Fn(usize) -> String) -> Vec<(String, &[T])> {
    bulk_chunks(rows).map(|c| (sql(c.len()), c)).collect()
}

/// The accounts of `ids` (first occurrence order, each once), e.g. those a run of
/// postings touched.
pub(crate) fn touched<'a, 'b>(
    accts: &'a HashMap<String, AccountRow>,
    ids: impl IntoIterator<Item = &'b str>,
) -> Vec<&'a AccountRow> {
    let mut seen = std::collections::HashSet::new();
    ids.into_iter()
        .filter(|id| seen.insert(*id))
        .filter_map(|id| accts.get(id))
        .collect()
}

/// `UPDATE accounts …` setting the balance, posting count, `updated_at` and last
/// posting time of `rows` accounts, from `(id, balance, posting_seq, updated_at,
/// last_posted_at)` parameters numbered from `first` (bound by [`bind_balance`]).
pub(crate) fn balances_sql(db: &Db, first: usize, rows: usize) -> String {
    format!(
        "UPDATE accounts SET balance = v.column2, posting_seq = v.column3, updated_at = v.column4, \
         last_posted_at = v.column5 FROM (VALUES {}) AS v WHERE accounts.id = v.column1",
        vaultpay_store::params::values_from(db.backend(), first, rows, 5)
    )
}

/// Binds one account's row of [`balances_sql`].
pub(crate) fn bind_balance<'q>(q: AnyQuery<'q>, a: &'q AccountRow, now: i64) -> AnyQuery<'q> {
    q.bind(&a.id)
        .bind(a.balance)
        .bind(a.posting_seq)
        .bind(now)
        .bind(a.last_posted_at)
}

/// Writes the balance, posting count and last posting time of `touched` accounts
/// (after a run of postings), with one multi-row UPDATE per chunk.
pub(crate) async fn save_balances(
    db: &Db,
    tx: &mut Tx,
    touched: &[&AccountRow],
    now: i64,
) -> Result<(), LedgerError> {
    for chunk in bulk_chunks(touched) {
        let sql = balances_sql(db, 1, chunk.len());
        let mut q = sqlx::query(&sql);
        for a in chunk {
            q = bind_balance(q, a, now);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// A batch of plain transfers: every account locked at once (ascending id order, as
/// everywhere), every item checked against the in-memory accounts in order, then the
/// rows written with multi-row statements, each built while the one before it runs,
/// and the reply rendered beside the first (see `pipeline`). An atomic batch with a
/// refused item writes nothing but its failure row.
async fn bulk_batch(
    core: &Core,
    tx: &mut Tx,
    job: &Job,
    req: &BatchRequest,
    batch_id: &str,
) -> Result<Done, LedgerError> {
    let mut ids: Vec<&str> = req
        .transfers
        .iter()
        .flat_map(|t| [t.from_account_id.as_str(), t.to_account_id.as_str()])
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut accts: HashMap<String, AccountRow> = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        accts.extend(lock_accounts(&core.db, tx, chunk).await?);
    }
    let now = now_micros();
    let n = req.transfers.len();
    let mut items = Vec::with_capacity(n);
    let mut failures: Vec<(usize, LedgerError)> = Vec::new();
    let mut transfers: Vec<TransferRow> = Vec::with_capacity(n);
    let mut postings: Vec<crate::group::Posting> = Vec::with_capacity(n * 2);
    for (index, item) in req.transfers.iter().enumerate() {
        match apply_and_post(
            &job.actor,
            item,
            Some(batch_id),
            now,
            &mut accts,
            &mut transfers,
            &mut postings,
        ) {
            Ok(t) => items.push(posted_item(index, t)),
            Err(e) => {
                items.push(refused_item(index, &e, job));
                failures.push((index, e));
                if req.atomic {
                    // Nothing has been written.
                    return Err(atomic_batch_failed(core, tx, job, req, items, &failures).await?);
                }
            }
        }
    }
    let failed = failures.len();
    let response = BatchResponse {
        atomic: req.atomic,
        succeeded: n - failed,
        failed,
        items,
    };
    // Transfers, then postings, then the final balances.
    let db = &core.db;
    let touched = touched(&accts, postings.iter().map(|p| p.1.as_str()));
    let transfer_sql = chunk_statements(&transfers, |n| {
        insert_sql(db, "transfers", TRANSFER_COLS, n, 14)
    });
    let posting_sql = chunk_statements(&postings, |n| {
        insert_sql(db, "postings", POSTING_COLS, n, 8)
    });
    let balance_sql = chunk_statements(&touched, |n| balances_sql(db, 1, n));
    let mut statements: Vec<crate::pipeline::Build<'_>> = Vec::new();
    for (sql, chunk) in &transfer_sql {
        statements.push(Box::new(move || {
            chunk
                .iter()
                .fold(sqlx::query(sql), |q, t| bind_transfer(q, t))
        }));
    }
    let transfers_ref = &transfers;
    for (sql, chunk) in &posting_sql {
        statements.push(Box::new(move || {
            // Each posting's index was its transfer's position when both were pushed.
            chunk.iter().fold(sqlx::query(sql), |q, p| {
                crate::group::bind_posting(q, &transfers_ref[p.0], p)
            })
        }));
    }
    for (sql, chunk) in &balance_sql {
        statements.push(Box::new(move || {
            chunk
                .iter()
                .fold(sqlx::query(sql), |q, a| bind_balance(q, a, now))
        }));
    }
    let (reply, packed) =
        crate::pipeline::run_pipelined(tx, statements, || render(job, 200, &response)).await??;
    crate::tally::count(
        "ledger_transfers_total",
        "kind",
        "transfer",
        transfers.len() as u64,
    );
    finish_batch(core, tx, job, req, batch_id, &failures, &response).await?;
    Ok(Done {
        reply,
        resource: None,
        packed,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn bulk_chunks_are_powers_of_two_in_order() {
        for n in [0usize, 1, 2, 3, 7, 8, 511, 512, 513, 1000, 1024, 1500] {
            let rows: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = super::bulk_chunks(&rows).collect();
            assert!(chunks
                .iter()
                .all(|c| c.len().is_power_of_two() && c.len() <= super::BULK_CHUNK));
            assert_eq!(chunks.concat(), rows, "n = {n}");
        }
        let sizes: Vec<usize> = super::bulk_chunks(&[0u8; 1000]).map(<[u8]>::len).collect();
        assert_eq!(sizes, [512, 256, 128, 64, 32, 8]);
    }
}
