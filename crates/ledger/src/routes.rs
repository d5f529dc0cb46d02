//! HTTP routes: parse, call one [`Ledger`] method, map the result. No SQL here.

use crate::admin::AccountAction;
use crate::engine::Reply;
use crate::error::LedgerError;
use crate::model::Actor;
use crate::query::HistoryFilter;
use crate::Ledger;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use utoipa::OpenApi;
use vaultpay_proto::ledger::{self as wire, IDEMPOTENCY_KEY_HEADER, IDEMPOTENT_REPLAYED_HEADER};
use vaultpay_proto::{Problem, PROBLEM_CONTENT_TYPE};
use vaultpay_web::{
    limit_param, time_param, ApiError, ApiJson, ApiQuery, Ctx, OptionalJson, Principal,
};

pub(crate) fn router(ledger: Ledger) -> Router {
    // A route's own limit replaces the server-wide one (`DefaultBodyLimit` is read by
    // the innermost layer that set it).
    let batch_limit = DefaultBodyLimit::max(ledger.config().batch_body_limit_bytes);
    Router::new()
        .route("/v1/accounts", post(open_account).get(list_accounts))
        .route("/v1/accounts/{id}", get(get_account))
        .route("/v1/accounts/{id}/transactions", get(transactions))
        .route("/v1/accounts/{id}/statement.csv", get(statement))
        .route("/v1/transfers", post(create_transfer))
        .route("/v1/transfers/batch", post(batch).layer(batch_limit))
        .route("/v1/transfers/{id}", get(get_transfer))
        .route("/v1/transfers/{id}/post", post(post_hold))
        .route("/v1/transfers/{id}/void", post(void_hold))
        .route("/v1/admin/deposits", post(deposit))
        .route("/v1/admin/withdrawals", post(withdraw))
        .route("/v1/admin/accounts/{id}/freeze", post(freeze))
        .route("/v1/admin/accounts/{id}/unfreeze", post(unfreeze))
        .route("/v1/admin/accounts/{id}/close", post(close))
        .route("/v1/admin/failed-transfers", get(failed_transfers))
        .route("/v1/admin/ledger/audit", get(audit_log))
        .with_state(ledger)
}

/// The caller; a token AuthShield issued to an OAuth client without the `api` scope
/// is refused (403, as AuthShield's own API refuses it).
fn actor(p: &Principal, ctx: &Ctx) -> Result<Actor, ApiError> {
    Actor::from_principal(p, ctx.ip)
        .ok_or_else(|| ApiError::forbidden("forbidden", "This needs the `scope:api` permission."))
}

/// The Idempotency-Key header, if present (its shape is checked by the service).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(LedgerError::IdempotencyKeyInvalid.into());
    }
    let v = v
        .to_str()
        .map_err(|_| ApiError::from(LedgerError::IdempotencyKeyInvalid))?;
    Ok(Some(v.to_owned()))
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let ct = if self.status >= 400 {
            PROBLEM_CONTENT_TYPE
        } else {
            "application/json"
        };
        let mut res = (status, self.body).into_response();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.replayed {
            h.insert(IDEMPOTENT_REPLAYED_HEADER, HeaderValue::from_static("true"));
        }
        res
    }
}

type ApiResult<T> = Result<T, ApiError>;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    /// Opaque cursor from the previous page's `next_cursor`.
    cursor: Option<String>,
    /// Entries per page: at least 1 (default 50); more than the server's maximum
    /// (`ledger.page_size_max`, 200 unless configured) is capped to it.
    #[param(minimum = 1)]
    limit: Option<i64>,
    /// Staff only: list another user's accounts.
    owner_id: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryQuery {
    /// Opaque cursor from the previous page's `next_cursor`.
    cursor: Option<String>,
    /// Entries per page: at least 1 (default 50); more than the server's maximum
    /// (`ledger.page_size_max`, 200 unless configured) is capped to it.
    #[param(minimum = 1)]
    limit: Option<i64>,
    /// RFC 3339, inclusive.
    from: Option<String>,
    /// RFC 3339, exclusive.
    to: Option<String>,
}

/// A statement is the whole period in one file (at most `ledger.statement_max_rows`
/// transactions), so it takes no cursor or limit: a request naming one is refused
/// rather than answered with a file that silently ignores it.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatementQuery {
    /// RFC 3339, inclusive.
    from: Option<String>,
    /// RFC 3339, exclusive.
    to: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct FailedTransfersQuery {
    /// Opaque cursor from the previous page's `next_cursor`.
    cursor: Option<String>,
    /// Entries per page: at least 1 (default 50); more than the server's maximum
    /// (`ledger.page_size_max`, 200 unless configured) is capped to it.
    #[param(minimum = 1)]
    limit: Option<i64>,
    /// Only the attempts this user made.
    user_id: Option<String>,
}

/// The ledger's audit log pages by sequence number only (it keeps no index by actor,
/// action or time; see migration 0003).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    /// Opaque cursor from the previous page's `next_cursor`.
    cursor: Option<String>,
    /// Entries per page: at least 1 (default 50); more than 499 is capped to 499.
    #[param(minimum = 1)]
    limit: Option<i64>,
}

#[utoipa::path(post, path = "/v1/accounts", tag = "ledger", request_body = wire::OpenAccountRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the request safely retryable")),
    responses((status = 201, body = wire::Account),
        (status = 422, body = Problem, description = "`currency_unknown`, `invalid_request` (a field's value is refused) or `idempotency_key_reused`")))]
async fn open_account(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    headers: HeaderMap,
    ApiJson(req): ApiJson<wire::OpenAccountRequest>,
) -> ApiResult<Reply> {
    let key = idempotency_key(&headers)?;
    Ok(l.open_account(&actor(&p, &ctx)?, key, req, ctx.origin())
        .await?)
}

#[utoipa::path(get, path = "/v1/accounts", tag = "ledger", params(PageQuery),
    responses((status = 200, body = wire::AccountList)))]
async fn list_accounts(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<axum::Json<wire::AccountList>> {
    Ok(axum::Json(
        l.list_accounts(
            &actor(&p, &ctx)?,
            q.owner_id.as_deref(),
            q.cursor.as_deref(),
            limit_param(q.limit)?,
            &ctx.origin(),
        )
        .await?,
    ))
}

#[utoipa::path(get, path = "/v1/accounts/{id}", tag = "ledger", params(("id" = String, Path)),
    responses((status = 200, body = wire::Account), (status = 404, body = Problem)))]
async fn get_account(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<wire::Account>> {
    Ok(axum::Json(
        l.get_account(&actor(&p, &ctx)?, &id, &ctx.origin()).await?,
    ))
}

#[utoipa::path(get, path = "/v1/accounts/{id}/transactions", tag = "ledger", params(("id" = String, Path), HistoryQuery),
    responses((status = 200, body = wire::TransactionList), (status = 404, body = Problem)))]
async fn transactions(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> ApiResult<axum::Json<wire::TransactionList>> {
    let filter = HistoryFilter {
        from: time_param("from", q.from.as_deref())?,
        to: time_param("to", q.to.as_deref())?,
        limit: limit_param(q.limit)?.unwrap_or(50),
        ..Default::default()
    };
    Ok(axum::Json(
        l.transactions(
            &actor(&p, &ctx)?,
            &id,
            filter,
            q.cursor.as_deref(),
            &ctx.origin(),
        )
        .await?,
    ))
}

#[utoipa::path(get, path = "/v1/accounts/{id}/statement.csv", tag = "ledger", params(("id" = String, Path), StatementQuery),
    responses((status = 200, content_type = "text/csv", body = String), (status = 404, body = Problem),
        (status = 422, body = Problem, description = "`statement_too_large`: more transactions in the period than `ledger.statement_max_rows`")))]
async fn statement(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<StatementQuery>,
) -> ApiResult<Response> {
    let from = time_param("from", q.from.as_deref())?;
    let to = time_param("to", q.to.as_deref())?;
    let csv = l
        .statement_csv(&actor(&p, &ctx)?, &id, from, to, &ctx.origin())
        .await?;
    let disposition = format!(
        "attachment; filename=\"statement-{}.csv\"",
        id.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect::<String>()
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        csv,
    )
        .into_response())
}

#[utoipa::path(post, path = "/v1/transfers", tag = "ledger", request_body = wire::TransferRequest,
    params(("Idempotency-Key" = String, Header, description = "Required; scoped to the caller")),
    responses((status = 201, body = wire::Transfer),
        (status = 403, body = Problem, description = "`not_account_owner`: the caller does not own the source account; or `forbidden`, `untrusted_network`"),
        (status = 404, body = Problem, description = "`account_not_found`"),
        (status = 409, body = Problem, description = "`account_frozen`, `account_closed` or `idempotency_request_in_progress`"),
        (status = 422, body = Problem, description = "`amount_invalid`, `same_account`, `currency_unknown`, `currency_mismatch`, `insufficient_funds`, `invalid_request` (a field's value is refused) or `idempotency_key_reused`")))]
async fn create_transfer(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    headers: HeaderMap,
    ApiJson(req): ApiJson<wire::TransferRequest>,
) -> ApiResult<Reply> {
    let key = idempotency_key(&headers)?;
    Ok(l.transfer(&actor(&p, &ctx)?, key, req, ctx.origin())
        .await?)
}

#[utoipa::path(post, path = "/v1/transfers/batch", tag = "ledger", request_body = wire::BatchRequest,
    params(("Idempotency-Key" = String, Header, description = "Required; scoped to the caller")),
    responses((status = 200, body = wire::BatchResponse),
        (status = 422, body = Problem, description = "`batch_too_large`, `batch_failed` (an atomic batch with a refused item: nothing was posted), `invalid_request` or `idempotency_key_reused`")))]
async fn batch(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    headers: HeaderMap,
    ApiJson(req): ApiJson<wire::BatchRequest>,
) -> ApiResult<Reply> {
    let key = idempotency_key(&headers)?;
    Ok(l.batch(&actor(&p, &ctx)?, key, req, ctx.origin()).await?)
}

#[utoipa::path(get, path = "/v1/transfers/{id}", tag = "ledger", params(("id" = String, Path)),
    responses((status = 200, body = wire::Transfer), (status = 404, body = Problem)))]
async fn get_transfer(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<wire::Transfer>> {
    Ok(axum::Json(l.get_transfer(&actor(&p, &ctx)?, &id).await?))
}

#[utoipa::path(post, path = "/v1/transfers/{id}/post", tag = "ledger", request_body = wire::PostHoldRequest,
    params(("id" = String, Path), ("Idempotency-Key" = String, Header)),
    responses((status = 200, body = wire::Transfer),
        (status = 403, body = Problem, description = "`not_account_owner`; or `forbidden`, `untrusted_network`"),
        (status = 404, body = Problem, description = "`transfer_not_found` (no such hold, or not the caller's) or `account_not_found`"),
        (status = 409, body = Problem, description = "`hold_not_pending`, `hold_expired`, `account_frozen`, `account_closed` or `idempotency_request_in_progress`"),
        (status = 422, body = Problem, description = "`amount_invalid` (more than the hold), `invalid_request` or `idempotency_key_reused`")))]
async fn post_hold(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    OptionalJson(req): OptionalJson<wire::PostHoldRequest>,
) -> ApiResult<Reply> {
    let key = idempotency_key(&headers)?;
    Ok(l.post_hold(&actor(&p, &ctx)?, key, &id, req, ctx.origin())
        .await?)
}

#[utoipa::path(post, path = "/v1/transfers/{id}/void", tag = "ledger", request_body = wire::VoidHoldRequest,
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = wire::Transfer),
        (status = 403, body = Problem, description = "`not_account_owner`; or `forbidden`, `untrusted_network`"),
        (status = 404, body = Problem, description = "`transfer_not_found` (no such hold, or not the caller's) or `account_not_found`"),
        (status = 409, body = Problem, description = "`hold_not_pending`, `hold_expired` or `idempotency_request_in_progress`"),
        (status = 422, body = Problem, description = "`invalid_request` (the reason is refused) or `idempotency_key_reused`")))]
async fn void_hold(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    OptionalJson(req): OptionalJson<wire::VoidHoldRequest>,
) -> ApiResult<Reply> {
    let key = idempotency_key(&headers)?;
    Ok(l.void_hold(&actor(&p, &ctx)?, key, &id, req, ctx.origin())
        .await?)
}

#[utoipa::path(post, path = "/v1/admin/deposits", tag = "ledger-admin", request_body = wire::TreasuryRequest,
    params(("Idempotency-Key" = String, Header)),
    responses((status = 201, body = wire::Transfer), (status = 403, body = Problem),
        (status = 404, body = Problem, description = "`account_not_found`"),
        (status = 409, body = Problem, description = "`settlement_account` (a settlement account cannot be named), `account_frozen`, `account_closed` or `idempotency_request_in_progress`"),
        (status = 422, body = Problem, description = "`amount_invalid`, `currency_unknown`, `currency_mismatch`, `invalid_request` (a field's value is refused) or `idempotency_key_reused`")))]
async fn deposit(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    headers: HeaderMap,
    ApiJson(req): ApiJson<wire::TreasuryRequest>,
) -> ApiResult<Reply> {
    let key = idempotency_key(&headers)?;
    Ok(l.treasury(&actor(&p, &ctx)?, key, req, true, ctx.origin())
        .await?)
}

#[utoipa::path(post, path = "/v1/admin/withdrawals", tag = "ledger-admin", request_body = wire::TreasuryRequest,
    params(("Idempotency-Key" = String, Header)),
    responses((status = 201, body = wire::Transfer), (status = 403, body = Problem),
        (status = 404, body = Problem, description = "`account_not_found`"),
        (status = 409, body = Problem, description = "`settlement_account` (a settlement account cannot be named), `account_frozen`, `account_closed` or `idempotency_request_in_progress`"),
        (status = 422, body = Problem, description = "`amount_invalid`, `insufficient_funds`, `currency_unknown`, `currency_mismatch`, `invalid_request` (a field's value is refused) or `idempotency_key_reused`")))]
async fn withdraw(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    headers: HeaderMap,
    ApiJson(req): ApiJson<wire::TreasuryRequest>,
) -> ApiResult<Reply> {
    let key = idempotency_key(&headers)?;
    Ok(l.treasury(&actor(&p, &ctx)?, key, req, false, ctx.origin())
        .await?)
}

async fn account_action(
    l: Ledger,
    ctx: Ctx,
    p: Principal,
    id: String,
    action: AccountAction,
    req: wire::AccountActionRequest,
) -> ApiResult<axum::Json<wire::Account>> {
    Ok(axum::Json(
        l.account_action(&actor(&p, &ctx)?, &id, action, &req.reason, ctx.origin())
            .await?,
    ))
}

#[utoipa::path(post, path = "/v1/admin/accounts/{id}/freeze", tag = "ledger-admin", request_body = wire::AccountActionRequest,
    params(("id" = String, Path)), responses((status = 200, body = wire::Account),
        (status = 404, body = Problem, description = "`account_not_found`"),
        (status = 409, body = Problem, description = "`account_frozen` (already), `account_closed` or `settlement_account`"),
        (status = 422, body = Problem, description = "`invalid_request`: the reason is missing, too long or contains control characters")))]
async fn freeze(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::AccountActionRequest>,
) -> ApiResult<axum::Json<wire::Account>> {
    account_action(l, ctx, p, id, AccountAction::Freeze, req).await
}

#[utoipa::path(post, path = "/v1/admin/accounts/{id}/unfreeze", tag = "ledger-admin", request_body = wire::AccountActionRequest,
    params(("id" = String, Path)), responses((status = 200, body = wire::Account),
        (status = 404, body = Problem, description = "`account_not_found`"),
        (status = 409, body = Problem, description = "`account_not_frozen`, `account_closed` or `settlement_account`"),
        (status = 422, body = Problem, description = "`invalid_request`: the reason is missing, too long or contains control characters")))]
async fn unfreeze(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::AccountActionRequest>,
) -> ApiResult<axum::Json<wire::Account>> {
    account_action(l, ctx, p, id, AccountAction::Unfreeze, req).await
}

#[utoipa::path(post, path = "/v1/admin/accounts/{id}/close", tag = "ledger-admin", request_body = wire::AccountActionRequest,
    params(("id" = String, Path)), responses((status = 200, body = wire::Account),
        (status = 404, body = Problem, description = "`account_not_found`"),
        (status = 409, body = Problem, description = "`account_not_empty` (a balance or a pending hold remains), `account_closed` (already) or `settlement_account`"),
        (status = 422, body = Problem, description = "`invalid_request`: the reason is missing, too long or contains control characters")))]
async fn close(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::AccountActionRequest>,
) -> ApiResult<axum::Json<wire::Account>> {
    account_action(l, ctx, p, id, AccountAction::Close, req).await
}

#[utoipa::path(get, path = "/v1/admin/failed-transfers", tag = "ledger-admin", params(FailedTransfersQuery),
    responses((status = 200, body = wire::FailedTransferList), (status = 403, body = Problem)))]
async fn failed_transfers(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    ApiQuery(q): ApiQuery<FailedTransfersQuery>,
) -> ApiResult<axum::Json<wire::FailedTransferList>> {
    Ok(axum::Json(
        l.failed_transfers(
            &actor(&p, &ctx)?,
            q.user_id.as_deref(),
            q.cursor.as_deref(),
            limit_param(q.limit)?,
            &ctx.origin(),
        )
        .await?,
    ))
}

#[utoipa::path(get, path = "/v1/admin/ledger/audit", tag = "ledger-admin", params(AuditQuery),
    responses((status = 200, body = wire::AuditList), (status = 403, body = Problem)))]
async fn audit_log(
    State(l): State<Ledger>,
    ctx: Ctx,
    p: Principal,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<axum::Json<wire::AuditList>> {
    Ok(axum::Json(
        l.audit_log(
            &actor(&p, &ctx)?,
            q.cursor.as_deref(),
            limit_param(q.limit)?,
            &ctx.origin(),
        )
        .await?,
    ))
}

#[derive(OpenApi)]
#[openapi(
    paths(
        open_account, list_accounts, get_account, transactions, statement, create_transfer, batch, get_transfer,
        post_hold, void_hold, deposit, withdraw, freeze, unfreeze, close, failed_transfers, audit_log
    ),
    components(schemas(
        wire::OpenAccountRequest, wire::Account, wire::AccountList, wire::AccountKind, wire::AccountStatus,
        wire::TransferRequest, wire::Transfer, wire::TransferKind, wire::TransferStatus, wire::PostHoldRequest,
        wire::VoidHoldRequest, wire::BatchRequest, wire::BatchResponse, wire::BatchItem, wire::TreasuryRequest,
        wire::AccountActionRequest, wire::AccountTransaction, wire::TransactionList, wire::FailedTransfer,
        wire::FailedTransferList, wire::AuditEntry, wire::AuditList, Problem
    )),
    tags((name = "ledger", description = "Wallets, transfers, holds"), (name = "ledger-admin", description = "Treasury and account management")),
    modifiers(&EveryRouteAuthenticated)
)]
struct LedgerApi;

/// What every ledger route shares, said once instead of on each annotation: a bearer
/// access token (`security`), and the refusals any route can give: a 401 for the
/// token, a 403 for a token without the `api` scope (or a permission the route needs),
/// a 503 when the database (or, for a check of the session, AuthShield) cannot be
/// reached, for a GET with query parameters a 400 (unknown parameter, bad cursor or
/// time) and, for a POST, 400 (malformed JSON, a missing or bad `Idempotency-Key`),
/// 413 (body over the limit) and 415 (not JSON); for one that takes an
/// `Idempotency-Key`, the 409 of a request still running under the same key and the
/// 422 of a key reused for another request.
struct EveryRouteAuthenticated;

impl utoipa::Modify for EveryRouteAuthenticated {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::content::ContentBuilder;
        use utoipa::openapi::path::ParameterIn;
        use utoipa::openapi::security::SecurityRequirement;
        use utoipa::openapi::{Ref, ResponseBuilder};
        let problem = |what: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                )
                .build()
        };
        for (path, item) in doc.paths.paths.iter_mut() {
            // a hold's post and void take an optional body of any content type
            let any_body = path.ends_with("/post") || path.ends_with("/void");
            let ops = [(false, &mut item.get), (true, &mut item.post)];
            for (post, op) in ops
                .into_iter()
                .filter_map(|(p, op)| Some((p, op.as_mut()?)))
            {
                let param = |place: ParameterIn, name: Option<&str>| {
                    op.parameters.iter().flatten().any(|p| {
                        p.parameter_in == place
                            && name.is_none_or(|n| p.name.eq_ignore_ascii_case(n))
                    })
                };
                let has_query = param(ParameterIn::Query, None);
                let idempotent = param(ParameterIn::Header, Some(IDEMPOTENCY_KEY_HEADER));
                op.security = Some(vec![SecurityRequirement::new(
                    "bearer",
                    Vec::<String>::new(),
                )]);
                let r = &mut op.responses.responses;
                let mut add = |status: &str, what: &str| {
                    r.entry(status.to_owned())
                        .or_insert_with(|| problem(what).into());
                };
                if !post && has_query {
                    add("400", "`invalid_query` (an unknown parameter, a bad limit or time) or `invalid_cursor`");
                }
                add("401", "No valid access token: missing, malformed, expired or revoked (`missing_token`, `invalid_token`, `session_revoked`), or step-up required (`insufficient_user_authentication`)");
                add("403", "`forbidden`: the token lacks the `api` scope or the permission this route needs; or `untrusted_network`: the request comes from a network the account has not confirmed");
                add("503", "`service_unavailable`: the database, or AuthShield for a live-session check, cannot be reached; nothing was written, retry after `Retry-After`");
                if post {
                    add(
                        "400",
                        "`malformed_json` (the body is not valid JSON), or `idempotency_key_required` / `idempotency_key_invalid` (the `Idempotency-Key` header is missing where required, repeated or malformed)",
                    );
                    add("413", "`body_too_large`: the body is over the limit");
                    if !any_body {
                        add(
                            "415",
                            "`unsupported_media_type`: the body is not application/json",
                        );
                    }
                }
                if idempotent {
                    add("409", "`idempotency_request_in_progress`: a request with this `Idempotency-Key` is still running; retry it later");
                    add("422", "`idempotency_key_reused`: this `Idempotency-Key` was used for a different request");
                }
            }
        }
    }
}

/// The OpenAPI document of the ledger routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    LedgerApi::openapi()
}
