//! VaultPay ledger wire types.
//!
//! Amounts are integers in minor units of the named ISO 4217 currency (cents for USD,
//! yen for JPY, fils for KWD). Times are RFC 3339 strings in UTC. Ids are UUIDv7 strings.

use crate::Problem;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The header carrying a client-chosen idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Set to `true` on a response replayed from an earlier request with the same key.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    Savings,
    Current,
    /// A per-currency settlement account through which money enters and leaves.
    Settlement,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    Active,
    Frozen,
    Closed,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAccountRequest {
    /// ISO 4217 code, e.g. `USD`.
    pub currency: String,
    /// `savings` or `current`.
    pub kind: AccountKind,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Account {
    pub id: String,
    /// 12 digits with a Luhn check digit; masked (`********1234`) except to its owner.
    pub number: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    pub kind: AccountKind,
    pub name: String,
    pub currency: String,
    pub status: AccountStatus,
    /// Posted balance in minor units.
    pub balance: i64,
    /// Balance minus the funds reserved by pending holds.
    pub available_balance: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AccountList {
    pub items: Vec<Account>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    pub from_account_id: String,
    pub to_account_id: String,
    /// Minor units; must be positive.
    pub amount: i64,
    pub currency: String,
    #[serde(default)]
    pub description: String,
    /// Place a hold (two-phase transfer) instead of moving the money now.
    #[serde(default)]
    pub pending: bool,
    /// Seconds until an unresolved hold expires (default from the server config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    Transfer,
    Deposit,
    Withdrawal,
    Hold,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferStatus {
    /// Money moved (for a hold: fully captured).
    Posted,
    /// A hold still reserving funds.
    Pending,
    Voided,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Transfer {
    pub id: String,
    pub kind: TransferKind,
    pub from_account_id: String,
    pub to_account_id: String,
    pub amount: i64,
    pub currency: String,
    pub description: String,
    pub status: TransferStatus,
    /// True for a hold (two-phase transfer).
    pub pending: bool,
    /// For a hold: how much has been posted so far.
    pub captured_amount: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// Body of `POST /v1/transfers/{id}/post`; an empty body posts the whole remaining hold.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostHoldRequest {
    /// Minor units to capture (at most the remaining held amount); default: all of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<i64>,
}

/// Body of `POST /v1/transfers/{id}/void` (may be empty).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VoidHoldRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Up to 1,000 transfers.
    pub transfers: Vec<TransferRequest>,
    /// All or nothing: if any transfer fails, none is applied.
    #[serde(default)]
    pub atomic: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchItem {
    pub index: usize,
    /// The HTTP status this transfer alone would have had.
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Transfer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    pub atomic: bool,
    pub succeeded: usize,
    pub failed: usize,
    pub items: Vec<BatchItem>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TreasuryRequest {
    pub account_id: String,
    pub amount: i64,
    pub currency: String,
    #[serde(default)]
    pub reference: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountActionRequest {
    pub reason: String,
}

/// One posting on an account, with the running balance after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AccountTransaction {
    pub id: String,
    /// The account's posting number (1, 2, 3…), also the pagination cursor.
    pub seq: i64,
    pub transfer_id: String,
    pub kind: TransferKind,
    /// Signed: positive credits the account, negative debits it.
    pub amount: i64,
    pub currency: String,
    pub balance_after: i64,
    pub description: String,
    /// The other side of the transfer.
    pub counterparty_account_id: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TransactionList {
    pub items: Vec<AccountTransaction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FailedTransfer {
    pub id: String,
    pub user_id: String,
    /// `transfer`, `deposit`, `withdrawal`, `post_hold` or `void_hold`.
    pub operation: String,
    /// The hold a refused `post_hold` or `void_hold` named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_account_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_account_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// The problem code the caller received.
    pub reason: String,
    pub detail: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FailedTransferList {
    pub items: Vec<FailedTransfer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// One entry of the ledger's hash-chained audit log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub seq: i64,
    pub id: String,
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    pub hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditList {
    pub items: Vec<AuditEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}
