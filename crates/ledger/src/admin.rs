//! Freeze, unfreeze and close. A freeze takes the same locks as a transfer (the global
//! write lock, then the account row), so no transfer posts after a freeze commits.

use crate::engine::begin;
use crate::error::LedgerError;
use crate::model::{AccountRow, Actor};
use crate::ops::{lock_accounts, outbox, save_account};
use crate::Core;
use vaultpay_core::time::now_micros;
use vaultpay_store::audit::{self, NewAudit, Origin};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountAction {
    Freeze,
    Unfreeze,
    Close,
}

impl AccountAction {
    fn name(self) -> &'static str {
        match self {
            AccountAction::Freeze => "frozen",
            AccountAction::Unfreeze => "unfrozen",
            AccountAction::Close => "closed",
        }
    }
}

pub(crate) async fn account_action(
    core: &Core,
    actor: &Actor,
    origin: &Origin,
    id: &str,
    action: AccountAction,
    reason: &str,
) -> Result<AccountRow, LedgerError> {
    if !actor.is_admin() {
        return Err(LedgerError::Forbidden("accounts:manage"));
    }
    // Not empty, at most 500 characters, no control characters (it goes into the
    // audit log and the outbox event as it is).
    crate::ops::check_text("reason", reason, 500, true)?;
    let mut tx = begin(&core.db).await?;
    let mut accts = lock_accounts(&core.db, &mut tx, &[id]).await?;
    let mut a = accts.remove(id).ok_or(LedgerError::AccountNotFound)?;
    if a.is_settlement() {
        return Err(LedgerError::SettlementAccount);
    }
    let prev = a.status.clone();
    let next = match (action, a.status.as_str()) {
        (_, "closed") => return Err(LedgerError::AccountClosed(a.id.clone())),
        (AccountAction::Freeze, "frozen") => return Err(LedgerError::AccountFrozen(a.id.clone())),
        (AccountAction::Freeze, _) => "frozen",
        (AccountAction::Unfreeze, "frozen") => "active",
        (AccountAction::Unfreeze, _) => return Err(LedgerError::AccountNotFrozen),
        (AccountAction::Close, _) if a.balance != 0 || a.held != 0 => {
            return Err(LedgerError::AccountNotEmpty)
        }
        (AccountAction::Close, _) => "closed",
    };
    // Nor with a hold paying into it still pending: it could never be posted to a
    // closed account, and the payer's money would stay reserved until it expired.
    // (A new hold to it locks it too, so none can appear before this commits.)
    if next == "closed" {
        let incoming = sqlx::query(
            "SELECT id FROM transfers WHERE to_account_id = $1 AND status = 'pending' LIMIT 1",
        )
        .bind(&a.id)
        .fetch_optional(&mut *tx)
        .await?;
        if incoming.is_some() {
            return Err(LedgerError::AccountNotEmpty);
        }
    }
    let now = now_micros();
    a.status = next.to_owned();
    a.updated_at = now;
    save_account(&mut tx, &a).await?;
    let topic = format!("ledger.account.{}", action.name());
    let meta = serde_json::json!({"reason": reason, "from": prev, "to": next});
    audit::append_many_locked(
        &core.db,
        &mut tx,
        &[(
            origin,
            NewAudit::success(&topic)
                .actor(&actor.user_id)
                .resource(&a.id)
                .metadata(meta),
        )],
    )
    .await?;
    outbox(
        &mut tx,
        &topic,
        &serde_json::json!({"account_id": a.id, "status": next, "reason": reason}),
        now,
    )
    .await?;
    tx.commit().await.map_err(crate::engine::commit_failed)?;
    Ok(a)
}
