//! The ledger's one error enum and its mapping to problem documents.
//!
//! Domain errors (a refused transfer, a missing account) are 4xx problems with a stable
//! `code`; they are recorded in `failed_transfers` and stored with the idempotency key
//! so a retry replays them. Storage errors are 5xx: the transaction rolls back, nothing
//! is stored, and the key stays retryable.

use axum::http::StatusCode;
use vaultpay_proto::ledger::BatchResponse;
use vaultpay_proto::Problem;
use vaultpay_store::StoreError;
use vaultpay_web::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient funds: {available} available, {requested} requested")]
    InsufficientFunds { available: i64, requested: i64 },
    #[error("account {0} is frozen")]
    AccountFrozen(String),
    #[error("account {0} is closed")]
    AccountClosed(String),
    #[error("currency {requested} does not match the account currency {account}")]
    CurrencyMismatch { requested: String, account: String },
    #[error("unknown currency {0:?}: expected an ISO 4217 code such as USD")]
    CurrencyUnknown(String),
    #[error("no such account")]
    AccountNotFound,
    #[error("the caller does not own the account money would move from")]
    NotAccountOwner,
    #[error("{0}")]
    AmountInvalid(String),
    #[error("the source and destination accounts are the same")]
    SameAccount,
    #[error("no such transfer")]
    TransferNotFound,
    #[error("the hold is {0}, not pending: it cannot be resolved again")]
    HoldNotPending(String),
    #[error("the hold has expired")]
    HoldExpired,
    #[error("the account still holds money or has pending holds")]
    AccountNotEmpty,
    #[error("account is not frozen")]
    AccountNotFrozen,
    #[error("settlement accounts cannot be changed this way")]
    SettlementAccount,
    #[error("{0}")]
    InvalidRequest(String),
    #[error("batch of {0} transfers is larger than the limit of {1}")]
    BatchTooLarge(usize, usize),
    #[error("the statement would hold more than {0} transactions; choose a shorter period with `from` and `to`")]
    StatementTooLarge(usize),
    #[error("the atomic batch failed; no transfer in it was applied")]
    BatchFailed(Box<BatchResponse>),
    #[error("this operation needs the {0} permission")]
    Forbidden(&'static str),
    #[error("this operation needs an Idempotency-Key header")]
    IdempotencyKeyRequired,
    #[error("the Idempotency-Key must be 1 to 255 printable ASCII characters")]
    IdempotencyKeyInvalid,
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still being processed")]
    IdempotencyInProgress,
    #[error("the session of this token has been revoked")]
    SessionRevoked,
    #[error("this operation is refused from a network the account has not confirmed; sign in from here to confirm it")]
    UntrustedNetwork,
    #[error("this operation needs a second factor within the last {max_age_secs} seconds")]
    StepUpRequired { max_age_secs: i64 },
    #[error("the invalid cursor {0:?}")]
    InvalidCursor(String),
    #[error("session introspection failed: {0}")]
    IntrospectionUnavailable(String),
    /// The database cannot be reached (503 `service_unavailable`; nothing written).
    #[error("the database is unreachable: {0}")]
    Unavailable(String),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// A group's transaction lost a race (see [`LedgerError::is_transient`]); each of
    /// its jobs is answered with this.
    #[error("the transaction lost a race with a concurrent one")]
    TransactionConflict,
    #[error("internal: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for LedgerError {
    fn from(e: sqlx::Error) -> Self {
        LedgerError::Store(StoreError::Sqlx(e))
    }
}

impl From<vaultpay_core::money::MoneyError> for LedgerError {
    fn from(e: vaultpay_core::money::MoneyError) -> Self {
        use vaultpay_core::money::MoneyError as M;
        match e {
            M::UnknownCurrency(c) => LedgerError::CurrencyUnknown(c),
            other => LedgerError::AmountInvalid(other.to_string()),
        }
    }
}

impl LedgerError {
    /// True when the transaction lost a race with a concurrent one and the request may
    /// simply be sent again (503 `transaction_conflict`).
    pub fn is_transient(&self) -> bool {
        match self {
            LedgerError::Store(e) => e.is_transient(),
            LedgerError::TransactionConflict => true,
            _ => false,
        }
    }

    /// True when the database could not be reached: the request wrote nothing and may
    /// be sent again later (503 `service_unavailable`).
    pub fn is_unreachable(&self) -> bool {
        match self {
            LedgerError::Store(e) => e.is_unreachable(),
            LedgerError::Unavailable(_) => true,
            _ => false,
        }
    }

    /// True for errors the caller did not cause (storage, internal, dependency):
    /// these roll back and are never stored with an idempotency key.
    pub fn is_server_error(&self) -> bool {
        self.status().is_server_error()
    }

    pub fn status(&self) -> StatusCode {
        use LedgerError::*;
        match self {
            InsufficientFunds { .. }
            | CurrencyMismatch { .. }
            | CurrencyUnknown(_)
            | AmountInvalid(_)
            | SameAccount => StatusCode::UNPROCESSABLE_ENTITY,
            InvalidRequest(_) | BatchTooLarge(..) | StatementTooLarge(_) | BatchFailed(_)
            | IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            AccountFrozen(_)
            | AccountClosed(_)
            | HoldNotPending(_)
            | HoldExpired
            | AccountNotEmpty
            | AccountNotFrozen
            | SettlementAccount
            | IdempotencyInProgress => StatusCode::CONFLICT,
            AccountNotFound | TransferNotFound => StatusCode::NOT_FOUND,
            NotAccountOwner | Forbidden(_) => StatusCode::FORBIDDEN,
            IdempotencyKeyRequired | IdempotencyKeyInvalid | InvalidCursor(_) => {
                StatusCode::BAD_REQUEST
            }
            SessionRevoked | StepUpRequired { .. } => StatusCode::UNAUTHORIZED,
            UntrustedNetwork => StatusCode::FORBIDDEN,
            IntrospectionUnavailable(_) | Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ if self.is_transient() || self.is_unreachable() => StatusCode::SERVICE_UNAVAILABLE,
            Store(_) | Internal(_) | TransactionConflict => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        use LedgerError::*;
        match self {
            InsufficientFunds { .. } => "insufficient_funds",
            AccountFrozen(_) => "account_frozen",
            AccountClosed(_) => "account_closed",
            CurrencyMismatch { .. } => "currency_mismatch",
            CurrencyUnknown(_) => "currency_unknown",
            AccountNotFound => "account_not_found",
            NotAccountOwner => "not_account_owner",
            AmountInvalid(_) => "amount_invalid",
            SameAccount => "same_account",
            TransferNotFound => "transfer_not_found",
            HoldNotPending(_) => "hold_not_pending",
            HoldExpired => "hold_expired",
            AccountNotEmpty => "account_not_empty",
            AccountNotFrozen => "account_not_frozen",
            SettlementAccount => "settlement_account",
            InvalidRequest(_) => "invalid_request",
            BatchTooLarge(..) => "batch_too_large",
            StatementTooLarge(_) => "statement_too_large",
            BatchFailed(_) => "batch_failed",
            Forbidden(_) => "forbidden",
            IdempotencyKeyRequired => "idempotency_key_required",
            IdempotencyKeyInvalid => "idempotency_key_invalid",
            IdempotencyKeyReused => "idempotency_key_reused",
            IdempotencyInProgress => "idempotency_request_in_progress",
            SessionRevoked => "session_revoked",
            UntrustedNetwork => "untrusted_network",
            StepUpRequired { .. } => "insufficient_user_authentication",
            InvalidCursor(_) => "invalid_cursor",
            IntrospectionUnavailable(_) | Unavailable(_) => "service_unavailable",
            _ if self.is_transient() => "transaction_conflict",
            _ if self.is_unreachable() => "service_unavailable",
            Store(_) | Internal(_) | TransactionConflict => "internal_error",
        }
    }

    fn title(&self) -> &'static str {
        match self.status() {
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::CONFLICT => "Conflict",
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::UNAUTHORIZED => "Unauthorized",
            StatusCode::BAD_REQUEST => "Bad request",
            StatusCode::UNPROCESSABLE_ENTITY => "Request refused",
            StatusCode::SERVICE_UNAVAILABLE => "Service unavailable",
            _ => "Internal server error",
        }
    }

    /// The problem document for this error (5xx ones say nothing of the cause).
    pub fn problem(&self, request_id: Option<String>) -> Problem {
        let status = self.status().as_u16();
        if self.is_server_error() {
            let mut p = Problem::new(status, self.code(), self.title())
                .detail("An unexpected error occurred; it has been logged with this request id.");
            if let LedgerError::IntrospectionUnavailable(_) = self {
                p = Problem::new(status, "service_unavailable", "Service unavailable")
                    .detail("A dependency of this service is unavailable; retry later.");
            }
            p.request_id = request_id;
            return p;
        }
        let mut p = Problem::new(status, self.code(), self.title()).detail(self.to_string());
        p.request_id = request_id;
        match self {
            LedgerError::InsufficientFunds {
                available,
                requested,
            } => {
                p = p.with("available", available).with("requested", requested);
            }
            LedgerError::AccountFrozen(id) | LedgerError::AccountClosed(id) => {
                p = p.with("account_id", id)
            }
            LedgerError::CurrencyMismatch { requested, account } => {
                p = p
                    .with("requested_currency", requested)
                    .with("account_currency", account);
            }
            LedgerError::BatchFailed(resp) => p = p.with("items", &resp.items),
            _ => {}
        }
        p
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        match &e {
            _ if e.is_transient() => ApiError::transaction_conflict(&e),
            _ if e.is_unreachable() => ApiError::unavailable(&e),
            LedgerError::Store(_) | LedgerError::Internal(_) => ApiError::internal(&e),
            LedgerError::IntrospectionUnavailable(_) => ApiError::unavailable(&e),
            LedgerError::SessionRevoked => ApiError::unauthorized("session_revoked", e.to_string()),
            LedgerError::StepUpRequired { max_age_secs } => {
                vaultpay_web::step_up_required(*max_age_secs)
            }
            // the first request with the key is still running: worth a retry shortly
            LedgerError::IdempotencyInProgress => ApiError {
                problem: Box::new(e.problem(vaultpay_web::current_request_id())),
                headers: vec![(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("1"),
                )],
            },
            _ => ApiError {
                problem: Box::new(e.problem(vaultpay_web::current_request_id())),
                headers: Vec::new(),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A COMMIT that failed on a lost connection may have committed: answered 500
    /// (retry with the same key), never 503 "unavailable, nothing written"; one the
    /// database refused (a lost race) wrote nothing and stays a retryable 503.
    #[tokio::test]
    async fn a_failed_commit_is_outcome_unknown_unless_refused() {
        let lost = crate::engine::commit_failed(sqlx::Error::Io(std::io::Error::other(
            "connection reset while committing",
        )));
        assert_eq!(lost.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!lost.is_unreachable() && !lost.is_transient());
        let race = crate::engine::commit_failed(
            vaultpay_store::testing::lost_race(vaultpay_store::Backend::Sqlite)
                .await
                .unwrap(),
        );
        assert!(race.is_transient());
        assert_eq!(race.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    /// A transaction that lost a race is a retryable 503 (with `Retry-After` over
    /// HTTP), and as a server error is never stored with an idempotency key; so is
    /// what every job of a group whose transaction could not begin is answered.
    #[tokio::test]
    async fn a_lost_race_is_a_retryable_503() {
        let e = LedgerError::Store(vaultpay_store::StoreError::Sqlx(
            vaultpay_store::testing::lost_race(vaultpay_store::Backend::Sqlite)
                .await
                .unwrap(),
        ));
        assert!(e.is_transient() && e.is_server_error());
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code(), "transaction_conflict");
        let api = ApiError::from(e);
        assert_eq!(api.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(api.problem.code, "transaction_conflict");
        assert!(api
            .headers
            .iter()
            .any(|(k, v)| k == http::header::RETRY_AFTER && v == "1"));
        // a request whose key is still in use by the first one: retry shortly
        let busy = ApiError::from(LedgerError::IdempotencyInProgress);
        assert_eq!(busy.status(), StatusCode::CONFLICT);
        assert!(busy
            .headers
            .iter()
            .any(|(k, v)| k == http::header::RETRY_AFTER && v == "1"));
        // what every job of a group whose transaction could not begin is answered
        let group = LedgerError::TransactionConflict;
        assert!(group.is_transient() && group.is_server_error());
        assert_eq!(group.code(), "transaction_conflict");
        assert_eq!(
            ApiError::from(group).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            LedgerError::Internal("boom".into()).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
