//! Routes of second factors and step-up (merged into AuthShield's router).

use crate::AuthService;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use utoipa::OpenApi;
use vaultpay_proto::auth as wire;
use vaultpay_proto::mfa as mw;
use vaultpay_proto::Problem;
use vaultpay_web::{ApiError, ApiJson, Ctx, Principal};

type ApiResult<T> = Result<T, ApiError>;

/// The MFA routes, without state (the caller applies it).
pub(crate) fn routes() -> Router<AuthService> {
    Router::new()
        .route("/v1/mfa", get(status))
        .route("/v1/mfa/totp", post(totp_enroll))
        .route("/v1/mfa/totp/confirm", post(totp_confirm))
        .route("/v1/mfa/totp/disable", post(totp_disable))
        .route("/v1/mfa/email/enable", post(email_enable))
        .route("/v1/mfa/email/confirm", post(email_confirm))
        .route("/v1/mfa/email/disable", post(email_disable))
        .route("/v1/auth/mfa/verify", post(mfa_verify))
        .route("/v1/auth/mfa/email", post(mfa_email))
        .route("/v1/auth/step-up", post(step_up))
        .route("/v1/auth/step-up/email", post(step_up_email))
        .route("/v1/admin/users/{id}/mfa/reset", post(admin_reset))
}

#[derive(OpenApi)]
#[openapi(
    paths(
        status,
        totp_enroll,
        totp_confirm,
        totp_disable,
        email_enable,
        email_confirm,
        email_disable,
        mfa_verify,
        mfa_email,
        step_up,
        step_up_email,
        admin_reset
    ),
    components(schemas(
        mw::TotpEnrollment,
        mw::CodeRequest,
        mw::TotpConfirmed,
        mw::TotpDisableRequest,
        mw::MfaStatus,
        mw::PasswordRequest,
        mw::MfaChallenge,
        mw::MfaVerifyRequest,
        mw::MfaTicketRequest,
        mw::StepUpRequest,
        mw::MfaResetRequest
    ))
)]
pub(crate) struct MfaApi;

fn no_store<T: IntoResponse>(status: StatusCode, body: T) -> Response {
    let mut res = (status, body).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The caller's second factors.
#[utoipa::path(get, path = "/v1/mfa", tag = "auth",
    responses((status = 200, body = mw::MfaStatus), (status = 401, body = Problem)), security(("bearer" = [])))]
async fn status(State(svc): State<AuthService>, p: Principal) -> ApiResult<Json<mw::MfaStatus>> {
    Ok(Json(svc.mfa_status(&p).await?))
}

/// Remove every second factor of a user who has lost them (`users:manage`, every
/// permission the user has, and a fresh second factor of the caller's own): TOTP,
/// recovery codes and emailed codes go, the user's sessions and pending sign-ins end
/// (and with `require_password_reset` the account is locked until a password reset),
/// and the user is told by mail. 409 `mfa_not_enrolled` if the user has none.
#[utoipa::path(post, path = "/v1/admin/users/{id}/mfa/reset", tag = "auth", params(("id" = String, Path)),
    request_body = mw::MfaResetRequest,
    responses((status = 200, body = wire::Accepted),
        (status = 401, description = "`insufficient_user_authentication`: step up first (RFC 9470)", body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 422, body = Problem, description = "`reason_invalid`, or `mfa_reset_self` (an administrator's own second factor is turned off by its owner)")), security(("bearer" = [])))]
async fn admin_reset(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    axum::extract::Path(id): axum::extract::Path<String>,
    ApiJson(req): ApiJson<mw::MfaResetRequest>,
) -> ApiResult<Json<wire::Accepted>> {
    svc.require_live_session(&p).await?;
    svc.require(&ctx, &p, "users:manage").await?;
    Ok(Json(svc.admin_reset_mfa(&ctx, &p, &id, &req).await?))
}

/// Start TOTP enrolment: a pending secret, its `otpauth://` URI and QR code (SVG).
#[utoipa::path(post, path = "/v1/mfa/totp", tag = "auth",
    responses((status = 201, body = mw::TotpEnrollment), (status = 401, body = Problem), (status = 409, body = Problem)), security(("bearer" = [])))]
async fn totp_enroll(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
) -> ApiResult<Response> {
    let e = svc.totp_enroll(&ctx, &p).await?;
    Ok(no_store(StatusCode::CREATED, Json(e)))
}

/// Confirm TOTP with a current code: enables it and answers 10 recovery codes, once.
#[utoipa::path(post, path = "/v1/mfa/totp/confirm", tag = "auth", request_body = mw::CodeRequest,
    responses((status = 200, body = mw::TotpConfirmed), (status = 401, body = Problem), (status = 403, body = Problem, description = "`mfa_code_invalid`: the code is wrong, expired or already used"),
        (status = 422, body = Problem, description = "`totp_not_pending`: no enrolment to confirm")), security(("bearer" = [])))]
async fn totp_confirm(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    ApiJson(req): ApiJson<mw::CodeRequest>,
) -> ApiResult<Response> {
    let r = svc.totp_confirm(&ctx, &p, &req.code).await?;
    Ok(no_store(StatusCode::OK, Json(r)))
}

/// Turn TOTP off (password and a current code required); recovery codes die with it.
#[utoipa::path(post, path = "/v1/mfa/totp/disable", tag = "auth", request_body = mw::TotpDisableRequest,
    responses((status = 200, body = wire::Accepted), (status = 401, body = Problem), (status = 403, body = Problem, description = "`current_password_wrong` (it counts toward the lockout) or `mfa_code_invalid`: the code is wrong, expired or already used"),
        (status = 422, body = Problem, description = "`mfa_method_required` (the account has both factors: say which), `mfa_method_unavailable` or `mfa_method_unknown`"), (status = 423, body = Problem)), security(("bearer" = [])))]
async fn totp_disable(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    ApiJson(req): ApiJson<mw::TotpDisableRequest>,
) -> ApiResult<Json<wire::Accepted>> {
    Ok(Json(svc.totp_disable(&ctx, &p, req).await?))
}

/// Mail a code that turns emailed one-time codes on as a second factor.
#[utoipa::path(post, path = "/v1/mfa/email/enable", tag = "auth",
    responses((status = 202, body = wire::Accepted), (status = 401, body = Problem), (status = 429, body = Problem)), security(("bearer" = [])))]
async fn email_enable(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
) -> ApiResult<Response> {
    let r = svc.email_mfa_start(&ctx, &p).await?;
    Ok((StatusCode::ACCEPTED, Json(r)).into_response())
}

/// Confirm the emailed code: emailed codes become a login factor.
#[utoipa::path(post, path = "/v1/mfa/email/confirm", tag = "auth", request_body = mw::CodeRequest,
    responses((status = 200, body = mw::MfaStatus), (status = 401, body = Problem), (status = 403, body = Problem, description = "`mfa_code_invalid`: the code is wrong, expired or already used")), security(("bearer" = [])))]
async fn email_confirm(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    ApiJson(req): ApiJson<mw::CodeRequest>,
) -> ApiResult<Json<mw::MfaStatus>> {
    Ok(Json(svc.email_mfa_confirm(&ctx, &p, &req.code).await?))
}

/// Turn emailed codes off: the password and a stepped-up token (`/v1/auth/step-up`).
#[utoipa::path(post, path = "/v1/mfa/email/disable", tag = "auth", request_body = mw::PasswordRequest,
    responses((status = 200, body = mw::MfaStatus), (status = 401, body = Problem), (status = 403, body = Problem, description = "`current_password_wrong`: the password is wrong (it counts toward the lockout)"),
        (status = 422, body = Problem, description = "`mfa_method_unavailable`: emailed codes are not on"), (status = 423, body = Problem)), security(("bearer" = [])))]
async fn email_disable(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    ApiJson(req): ApiJson<mw::PasswordRequest>,
) -> ApiResult<Json<mw::MfaStatus>> {
    Ok(Json(svc.email_mfa_disable(&ctx, &p, req.password).await?))
}

/// Finish a login that answered `mfa_required`: ticket + code → tokens
/// (`amr` `["pwd","otp","mfa"]`, `acr` `urn:vaultpay:acr:mfa`).
#[utoipa::path(post, path = "/v1/auth/mfa/verify", tag = "auth", request_body = mw::MfaVerifyRequest,
    responses((status = 200, body = wire::TokenResponse), (status = 401, body = Problem),
        (status = 422, body = Problem, description = "`mfa_method_required` (the account has both factors: say which), `mfa_method_unavailable` or `mfa_method_unknown`"), (status = 423, body = Problem), (status = 429, body = Problem)))]
async fn mfa_verify(
    State(svc): State<AuthService>,
    ctx: Ctx,
    ApiJson(req): ApiJson<mw::MfaVerifyRequest>,
) -> ApiResult<Response> {
    let t = svc.mfa_verify(&ctx, req).await?;
    Ok(no_store(StatusCode::OK, Json(t)))
}

/// Mail the login code for an MFA ticket (rate limited).
#[utoipa::path(post, path = "/v1/auth/mfa/email", tag = "auth", request_body = mw::MfaTicketRequest,
    responses((status = 202, body = wire::Accepted), (status = 401, body = Problem),
        (status = 422, body = Problem, description = "`mfa_method_unavailable`: emailed codes are not on for this account"), (status = 429, body = Problem)))]
async fn mfa_email(
    State(svc): State<AuthService>,
    ctx: Ctx,
    ApiJson(req): ApiJson<mw::MfaTicketRequest>,
) -> ApiResult<Response> {
    let r = svc.mfa_login_email(&ctx, &req.mfa_ticket).await?;
    Ok((StatusCode::ACCEPTED, Json(r)).into_response())
}

/// Step-up (RFC 9470): prove a second factor for the current session; answers a new
/// access token for the same session with `acr`, `amr` and `auth_time` updated.
#[utoipa::path(post, path = "/v1/auth/step-up", tag = "auth", request_body = mw::StepUpRequest,
    responses((status = 200, body = wire::TokenResponse), (status = 401, body = Problem), (status = 403, body = Problem, description = "`mfa_code_invalid`: the code is wrong, expired or already used"),
        (status = 422, body = Problem, description = "`mfa_not_enrolled` (no second factor to step up with), `mfa_method_required` (the account has both factors: say which), `mfa_method_unavailable` or `mfa_method_unknown`"), (status = 423, body = Problem)), security(("bearer" = [])))]
async fn step_up(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    ApiJson(req): ApiJson<mw::StepUpRequest>,
) -> ApiResult<Response> {
    let t = svc.step_up(&ctx, &p, req).await?;
    Ok(no_store(StatusCode::OK, Json(t)))
}

/// Mail a step-up code for the current session.
#[utoipa::path(post, path = "/v1/auth/step-up/email", tag = "auth",
    responses((status = 202, body = wire::Accepted), (status = 401, body = Problem),
        (status = 422, body = Problem, description = "`mfa_method_unavailable`: emailed codes are not on for this account"), (status = 429, body = Problem)), security(("bearer" = [])))]
async fn step_up_email(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
) -> ApiResult<Response> {
    let r = svc.step_up_email(&ctx, &p).await?;
    Ok((StatusCode::ACCEPTED, Json(r)).into_response())
}
