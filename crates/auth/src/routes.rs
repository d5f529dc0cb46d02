//! AuthShield's HTTP routes. Each handler parses, calls one service function and maps
//! the result.

use crate::{AuthError, AuthService};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::OpenApi;
use vaultpay_proto::auth as wire;
use vaultpay_proto::Problem;
use vaultpay_store::audit::{self, AuditFilter};
use vaultpay_web::{ApiError, ApiForm, ApiJson, ApiQuery, Ctx, Principal};

type ApiResult<T> = Result<T, ApiError>;

/// Every AuthShield route, with the service as state.
pub fn router(svc: AuthService) -> Router {
    Router::new()
        .route("/v1/auth/register", post(register))
        .route("/v1/auth/login", post(login))
        .route("/v1/auth/logout", post(logout))
        .route(
            "/v1/auth/verify-email",
            get(verify_email_link).post(verify_email),
        )
        .route("/v1/auth/verify-email/resend", post(resend_verification))
        .route("/v1/auth/password/forgot", post(forgot_password))
        .route(
            "/v1/auth/password/reset",
            get(reset_password_link).post(reset_password),
        )
        .route("/v1/auth/password/change", post(change_password))
        .route("/v1/auth/email/change", post(change_email))
        .route("/v1/me", get(me))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{id}", delete(revoke_session))
        .route("/v1/admin/roles", get(list_roles))
        .route("/v1/admin/users/{id}", get(get_user))
        .route("/v1/admin/users/{id}/roles", post(grant_role))
        .route("/v1/admin/users/{id}/roles/{role}", delete(revoke_role))
        .route("/v1/admin/users/{id}/unlock", post(unlock))
        .route("/v1/admin/audit", get(list_audit))
        .route("/oauth/token", post(token))
        .route("/oauth/introspect", post(introspect))
        .route("/.well-known/jwks.json", get(jwks))
        .merge(crate::mfa::routes::routes())
        .merge(crate::oauth::routes())
        .with_state(svc.clone())
        .merge(crate::ext_routes::router(svc))
}

#[derive(OpenApi)]
#[openapi(
    paths(
        register, login, logout, verify_email, verify_email_link, resend_verification, forgot_password,
        reset_password, reset_password_link, change_password, change_email, me, list_sessions, revoke_session, list_roles, get_user, grant_role,
        revoke_role, unlock, list_audit, token, introspect, jwks
    ),
    components(schemas(
        wire::RegisterRequest, wire::LoginRequest, wire::DeviceInfo, wire::TokenResponse, wire::OAuthError, crate::oauth::tokens::TokenParams, crate::oauth::tokens::TokenOnlyForm,
        wire::User, wire::Me, wire::Session, wire::SessionList, wire::TokenRequestBody, wire::EmailRequest,
        wire::ResetPasswordRequest, wire::ChangePasswordRequest, wire::ChangeEmailRequest, wire::LogoutRequest, wire::RoleChange,
        wire::Role, wire::RoleList, wire::AuditEntry, wire::AuditPage, wire::Introspection, wire::Accepted, Problem
    )),
    tags((name = "auth", description = "AuthShield: accounts, tokens, sessions, RBAC, audit"))
)]
struct AuthApi;

/// The OpenAPI document of AuthShield's routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = AuthApi::openapi();
    doc.merge(<crate::ext_routes::ExtApi as OpenApi>::openapi());
    doc.merge(<crate::mfa::routes::MfaApi as OpenApi>::openapi());
    doc.merge(crate::oauth::openapi());
    doc
}

fn no_store<T: IntoResponse>(status: StatusCode, body: T) -> Response {
    let mut res = (status, body).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Register an account (role `customer`); a verification link is mailed.
#[utoipa::path(post, path = "/v1/auth/register", tag = "auth", request_body = wire::RegisterRequest,
    responses((status = 201, body = wire::User), (status = 409, body = Problem, description = "`email_taken`"),
        (status = 422, body = Problem, description = "`email_invalid`, `name_invalid` or a password-policy refusal (`password_too_short`, `password_too_long`, `password_common`, `password_weak`, `password_breached`)"), (status = 429, body = Problem)))]
async fn register(
    State(svc): State<AuthService>,
    ctx: Ctx,
    ApiJson(req): ApiJson<wire::RegisterRequest>,
) -> ApiResult<Response> {
    let user = svc.register(&ctx, req).await?;
    Ok(no_store(StatusCode::CREATED, Json(user)))
}

/// Log in with email and password; answers an OAuth-shaped token response, or 202
/// `mfa_required` with a ticket for `/v1/auth/mfa/verify` when a second factor is on.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = wire::LoginRequest,
    responses((status = 200, body = wire::TokenResponse), (status = 202, body = vaultpay_proto::mfa::MfaChallenge, description = "A second factor is needed (`mfa_required`), or, with a `LoginHeld` body, the network must be confirmed first (`ip_confirmation_required`)"), (status = 401, body = Problem, description = "`invalid_credentials`: the email or password is wrong"),
        (status = 422, body = Problem, description = "`device_invalid`: the device id or name is refused"),
        (status = 423, body = Problem, description = "`account_locked` (too many failures; retry after `Retry-After`) or `password_reset_required` (a sign-in was reported as not the owner's)"), (status = 429, body = Problem)))]
async fn login(
    State(svc): State<AuthService>,
    ctx: Ctx,
    ApiJson(req): ApiJson<wire::LoginRequest>,
) -> ApiResult<Response> {
    match svc.login(&ctx, req).await {
        Ok(tokens) => Ok(no_store(StatusCode::OK, Json(tokens))),
        Err(AuthError::IpConfirmationRequired(ticket)) => Ok(crate::ext_routes::held(ticket)),
        Err(AuthError::MfaRequired(c)) => Ok(no_store(StatusCode::ACCEPTED, Json(c))),
        Err(e) => Err(e.into()),
    }
}

/// End the current session, or every session with `{"everywhere": true}`.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth", request_body(content = Option<wire::LogoutRequest>),
    responses((status = 200, body = wire::Accepted), (status = 401, body = Problem)), security(("bearer" = [])))]
async fn logout(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    // none, or JSON under any content type (`curl -X POST` sends none), refused as
    // every other body is: 400 malformed, 413 too large, 422 of the wrong shape
    vaultpay_web::OptionalJson(req): vaultpay_web::OptionalJson<wire::LogoutRequest>,
) -> ApiResult<Json<wire::Accepted>> {
    Ok(Json(svc.logout(&ctx, &p, req.everywhere).await?))
}

/// Confirm an email address with the token from the emailed link: the link's page
/// posts it as the form field `token` (a browser's form submission is answered with a
/// page); an API client sends JSON `{"token": …}`.
#[utoipa::path(post, path = "/v1/auth/verify-email", tag = "auth", request_body = wire::TokenRequestBody,
    responses((status = 200, body = wire::User, description = "Verified (a browser's form submission: an HTML page)"), (status = 400, body = Problem, description = "`invalid_token`: the link is invalid, expired or already used")))]
async fn verify_email(
    State(svc): State<AuthService>,
    ctx: Ctx,
    req: axum::extract::Request,
) -> ApiResult<Response> {
    let page = crate::ext_routes::wants_page(req.headers());
    let token = crate::ext_routes::link_token(req).await?;
    crate::ext_routes::link_answer(
        page,
        svc.verify_email(&ctx, &token).await,
        (
            "Email address confirmed",
            "Thank you: your VaultPay account's email address is confirmed.",
        ),
        "Email address not confirmed",
    )
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct TokenQuery {
    token: String,
}

/// The emailed link itself (opened in a browser): a page whose button confirms the
/// address. Opening the link changes nothing, so a mail scanner that prefetches links
/// cannot verify an address for whoever registered it.
#[utoipa::path(get, path = "/v1/auth/verify-email", tag = "auth", params(TokenQuery),
    responses((status = 200, description = "HTML confirmation page"), (status = 400, body = Problem, description = "`invalid_token`: the token is malformed")))]
async fn verify_email_link(ApiQuery(q): ApiQuery<TokenQuery>) -> ApiResult<Response> {
    crate::ext_routes::page(
        "Confirm your email address",
        "Confirm that this address belongs to your VaultPay account?",
        "/v1/auth/verify-email",
        "Yes, this is my address",
        &q.token,
    )
}

/// Mail a new verification link to the caller.
#[utoipa::path(post, path = "/v1/auth/verify-email/resend", tag = "auth",
    responses((status = 202, body = wire::Accepted), (status = 401, body = Problem)), security(("bearer" = [])))]
async fn resend_verification(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
) -> ApiResult<Response> {
    Ok((
        StatusCode::ACCEPTED,
        Json(svc.resend_verification(&ctx, &p).await?),
    )
        .into_response())
}

/// Ask for a password-reset email (same answer whether or not the account exists).
#[utoipa::path(post, path = "/v1/auth/password/forgot", tag = "auth", request_body = wire::EmailRequest,
    responses((status = 202, body = wire::Accepted), (status = 429, body = Problem)))]
async fn forgot_password(
    State(svc): State<AuthService>,
    ctx: Ctx,
    ApiJson(req): ApiJson<wire::EmailRequest>,
) -> ApiResult<Response> {
    Ok((
        StatusCode::ACCEPTED,
        Json(svc.forgot_password(&ctx, &req.email).await?),
    )
        .into_response())
}

/// Set a new password with a reset token; every session is revoked. JSON
/// `{token, new_password}`, or the same fields form-encoded; the emailed link's page
/// posting them from a browser (`Sec-Fetch-Mode: navigate`) is answered with pages.
#[utoipa::path(post, path = "/v1/auth/password/reset", tag = "auth",
    request_body(content = wire::ResetPasswordRequest, description = "JSON, or the same fields form-encoded (the reset page's form: a browser's submission is answered with HTML pages)"),
    responses((status = 200, body = wire::Accepted, description = "Changed (a browser's form submission: an HTML page)"),
        (status = 400, body = Problem, description = "`invalid_token`: the link is invalid, expired or already used"), (status = 422, body = Problem, description = "Refused by the password policy (a browser's form submission: the form again, with the reason)")))]
async fn reset_password(
    State(svc): State<AuthService>,
    ctx: Ctx,
    req: axum::extract::Request,
) -> ApiResult<Response> {
    use axum::extract::FromRequest;
    if crate::ext_routes::form_encoded(req.headers()) {
        let page = crate::ext_routes::wants_page(req.headers());
        let vaultpay_web::ApiForm(r) =
            vaultpay_web::ApiForm::<wire::ResetPasswordRequest>::from_request(req, &()).await?;
        if !page {
            // form-encoded from a script or an HTTP library: the API's answers
            return Ok(Json(svc.reset_password(&ctx, r).await?).into_response());
        }
        let token = r.token.clone();
        // A person at the page: the answer is a page too. A password the policy refuses
        // leaves the token unspent, so the form comes back with the reason.
        return Ok(match svc.reset_password(&ctx, r).await {
            Ok(_) => crate::ext_routes::done_page(
                "Password changed",
                "Your password has been changed and every session signed out. Sign in with the new password.",
            ),
            Err(AuthError::Password(v)) => {
                let mut res = reset_form(
                    &token,
                    &format!(
                        "That password cannot be used: {}",
                        crate::oauth::pages::esc(&v.message())
                    ),
                )?;
                *res.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
                res
            }
            // so does a recent password (the page was a dead end)
            Err(AuthError::PasswordReused) => {
                let mut res = reset_form(
                    &token,
                    "That password was used recently; choose one you have not used before.",
                )?;
                *res.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
                res
            }
            Err(e) => crate::ext_routes::failed_page("Password not changed", e),
        });
    }
    let ApiJson(r) = ApiJson::<wire::ResetPasswordRequest>::from_request(req, &()).await?;
    Ok(Json(svc.reset_password(&ctx, r).await?).into_response())
}

/// The reset page: the token and a new-password field, under `text` (trusted HTML).
fn reset_form(token: &str, text: &str) -> ApiResult<Response> {
    crate::ext_routes::page_with(
        "Choose a new password",
        text,
        "/v1/auth/password/reset",
        "Change password",
        token,
        "<p><label>New password <input type=\"password\" name=\"new_password\" \
         autocomplete=\"new-password\" required></label></p>",
    )
}

/// The emailed reset link itself (opened in a browser): a page with a new-password
/// field whose button posts it with the token. Opening it changes nothing.
#[utoipa::path(get, path = "/v1/auth/password/reset", tag = "auth", params(TokenQuery),
    responses((status = 200, description = "HTML page to choose a new password"), (status = 400, body = Problem, description = "`invalid_token`: the token is malformed")))]
async fn reset_password_link(ApiQuery(q): ApiQuery<TokenQuery>) -> ApiResult<Response> {
    reset_form(
        &q.token,
        "Enter the new password for your VaultPay account.",
    )
}

/// Start changing the email address (current password and a recent authentication
/// required): the new address gets a confirmation link, the old one a notice.
#[utoipa::path(post, path = "/v1/auth/email/change", tag = "auth", request_body = wire::ChangeEmailRequest,
    responses((status = 202, body = wire::Accepted),
        (status = 401, body = Problem, description = "No valid access token (`missing_token`, `invalid_token`, `session_revoked`, `insufficient_user_authentication`)"),
        (status = 403, body = Problem, description = "`current_password_wrong`: the current password is wrong (it counts toward the lockout)"),
        (status = 409, body = Problem, description = "`email_taken`"),
        (status = 422, body = Problem, description = "`email_invalid` or `email_unchanged`"), (status = 423, body = Problem, description = "`account_locked`: too many wrong passwords; retry after `Retry-After`"),
        (status = 429, body = Problem)), security(("bearer" = [])))]
async fn change_email(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    ApiJson(req): ApiJson<wire::ChangeEmailRequest>,
) -> ApiResult<Response> {
    Ok((
        StatusCode::ACCEPTED,
        Json(svc.request_email_change(&ctx, &p, req).await?),
    )
        .into_response())
}

/// Change the password (current one required); other sessions are revoked.
#[utoipa::path(post, path = "/v1/auth/password/change", tag = "auth", request_body = wire::ChangePasswordRequest,
    responses((status = 200, body = wire::Accepted),
        (status = 401, body = Problem, description = "No valid access token (`missing_token`, `invalid_token`, `session_revoked`, `insufficient_user_authentication`)"),
        (status = 403, body = Problem, description = "`current_password_wrong`: the current password is wrong (it counts toward the lockout)"),
        (status = 422, body = Problem, description = "a password-policy refusal (`password_too_short`, `password_too_long`, `password_common`, `password_weak`, `password_breached`), or `password_reused`"),
        (status = 423, body = Problem, description = "`account_locked`: too many wrong passwords; retry after `Retry-After`")), security(("bearer" = [])))]
async fn change_password(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    ApiJson(req): ApiJson<wire::ChangePasswordRequest>,
) -> ApiResult<Json<wire::Accepted>> {
    Ok(Json(svc.change_password(&ctx, &p, req).await?))
}

/// The caller's profile, roles and effective permissions.
#[utoipa::path(get, path = "/v1/me", tag = "auth", responses((status = 200, body = wire::Me), (status = 401, body = Problem)), security(("bearer" = [])))]
async fn me(State(svc): State<AuthService>, p: Principal) -> ApiResult<Json<wire::Me>> {
    Ok(Json(svc.me(&p).await?))
}

/// The caller's live sessions.
#[utoipa::path(get, path = "/v1/sessions", tag = "auth", responses((status = 200, body = wire::SessionList), (status = 401, body = Problem)), security(("bearer" = [])))]
async fn list_sessions(
    State(svc): State<AuthService>,
    p: Principal,
) -> ApiResult<Json<wire::SessionList>> {
    Ok(Json(svc.list_sessions(&p).await?))
}

/// Revoke one of the caller's sessions (another user's: 404).
#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "auth", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem)), security(("bearer" = [])))]
async fn revoke_session(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    svc.revoke_session(&ctx, &p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An administrative request: a live first-party session holding `perm`. Staff powers
/// (unlocking accounts, reading every user's audit trail) are not delegated to OAuth
/// clients, whatever scope the user granted one.
pub(crate) async fn admin(
    svc: &AuthService,
    ctx: &Ctx,
    p: &Principal,
    perm: &str,
) -> Result<(), AuthError> {
    svc.require_live_session(p).await?;
    crate::oauth::require_first_party(p)?;
    svc.require(ctx, p, perm).await
}

/// Roles and their permissions (`roles:manage`).
#[utoipa::path(get, path = "/v1/admin/roles", tag = "auth", responses((status = 200, body = wire::RoleList), (status = 403, body = Problem)), security(("bearer" = [])))]
async fn list_roles(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
) -> ApiResult<Json<wire::RoleList>> {
    admin(&svc, &ctx, &p, "roles:manage").await?;
    Ok(Json(svc.list_roles().await?))
}

/// A user (`users:read`).
#[utoipa::path(get, path = "/v1/admin/users/{id}", tag = "auth", params(("id" = String, Path)),
    responses((status = 200, body = wire::User), (status = 403, body = Problem), (status = 404, body = Problem)), security(("bearer" = [])))]
async fn get_user(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<wire::User>> {
    admin(&svc, &ctx, &p, "users:read").await?;
    Ok(Json(svc.user(&id).await?))
}

/// Grant a role (`roles:manage`).
#[utoipa::path(post, path = "/v1/admin/users/{id}/roles", tag = "auth", params(("id" = String, Path)), request_body = wire::RoleChange,
    responses((status = 200, body = wire::User), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 422, body = Problem, description = "`role_unknown`")), security(("bearer" = [])))]
async fn grant_role(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<wire::RoleChange>,
) -> ApiResult<Json<wire::User>> {
    admin(&svc, &ctx, &p, "roles:manage").await?;
    Ok(Json(svc.grant_role(&ctx, &p, &id, &req.role).await?))
}

/// Revoke a role (`roles:manage`).
#[utoipa::path(delete, path = "/v1/admin/users/{id}/roles/{role}", tag = "auth", params(("id" = String, Path), ("role" = String, Path)),
    responses((status = 200, body = wire::User), (status = 403, body = Problem), (status = 404, body = Problem)), security(("bearer" = [])))]
async fn revoke_role(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    Path((id, role)): Path<(String, String)>,
) -> ApiResult<Json<wire::User>> {
    admin(&svc, &ctx, &p, "roles:manage").await?;
    Ok(Json(svc.revoke_role(&ctx, &p, &id, &role).await?))
}

/// Lift a lockout (`users:manage`).
#[utoipa::path(post, path = "/v1/admin/users/{id}/unlock", tag = "auth", params(("id" = String, Path)),
    responses((status = 200, body = wire::User), (status = 403, body = Problem), (status = 404, body = Problem)), security(("bearer" = [])))]
async fn unlock(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<wire::User>> {
    admin(&svc, &ctx, &p, "users:manage").await?;
    Ok(Json(svc.unlock(&ctx, &p, &id).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    actor: Option<String>,
    action: Option<String>,
    request_id: Option<String>,
    /// RFC 3339, inclusive.
    from: Option<String>,
    /// RFC 3339, exclusive.
    to: Option<String>,
    cursor: Option<String>,
    /// Entries per page: at least 1 (default 50); more than 500 is capped to 500, as
    /// the ledger's lists cap theirs.
    #[param(minimum = 1)]
    limit: Option<i64>,
}

/// The audit log, newest first (`audit:read`: admin and compliance).
#[utoipa::path(get, path = "/v1/admin/audit", tag = "auth", params(AuditQuery),
    responses((status = 200, body = wire::AuditPage), (status = 403, body = Problem)), security(("bearer" = [])))]
async fn list_audit(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<wire::AuditPage>> {
    admin(&svc, &ctx, &p, "audit:read").await?;
    let before_seq = q
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| ApiError::bad_request("invalid_cursor", "The cursor is not valid."))
        })
        .transpose()?;
    let limit = vaultpay_web::limit_param(q.limit)?.unwrap_or(50).min(500);
    let f = AuditFilter {
        from: vaultpay_web::time_param("from", q.from.as_deref())?,
        to: vaultpay_web::time_param("to", q.to.as_deref())?,
        actor: q.actor,
        action: q.action,
        request_id: q.request_id,
        before_seq,
        limit,
    };
    let entries = audit::list(svc.db(), &f).await.map_err(AuthError::from)?;
    let next_cursor = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.seq.to_string()))
        .flatten();
    let entries = entries
        .into_iter()
        .map(|e| wire::AuditEntry {
            seq: e.seq,
            id: e.id,
            at: vaultpay_core::time::rfc3339(e.at),
            actor: e.actor,
            action: e.action,
            resource: e.resource,
            outcome: e.outcome,
            ip: e.ip,
            user_agent: e.user_agent,
            request_id: e.request_id,
            metadata: serde_json::from_str(&e.metadata).unwrap_or(serde_json::Value::Null),
            prev_hash: e.prev_hash,
            hash: e.hash,
        })
        .collect();
    Ok(Json(wire::AuditPage {
        entries,
        next_cursor,
    }))
}

/// OAuth 2.0 token endpoint (form post): authorization_code, refresh_token (OAuth
/// clients, or first-party with the `device_id` of the session's device),
/// client_credentials and the device_code grant.
#[utoipa::path(post, path = "/oauth/token", tag = "auth", request_body(content = crate::oauth::tokens::TokenParams, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, body = wire::TokenResponse), (status = 400, body = wire::OAuthError)))]
async fn token(
    State(svc): State<AuthService>,
    ctx: Ctx,
    headers: HeaderMap,
    form: Result<ApiForm<crate::oauth::tokens::TokenParams>, ApiError>,
) -> Result<Response, crate::oauth::OAuthError> {
    crate::oauth::tokens::token_endpoint(&svc, &ctx, &headers, form).await
}

fn introspection_client_ok(svc: &AuthService, headers: &HeaderMap) -> bool {
    use base64::Engine;
    let Some(secret) = &svc.config().introspection_secret else {
        return false;
    };
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(b64) = v.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return false;
    };
    let Ok(text) = String::from_utf8(raw) else {
        return false;
    };
    let Some((id, pw)) = text.split_once(':') else {
        return false;
    };
    id == "vaultpay-ledger"
        && vaultpay_core::crypto::ct_eq(pw.as_bytes(), secret.expose().as_bytes())
}

/// RFC 7662 token introspection: for the ledger service (HTTP Basic client
/// `vaultpay-ledger`) and for registered confidential OAuth clients (their own tokens).
#[utoipa::path(post, path = "/oauth/introspect", tag = "auth", request_body(content = crate::oauth::tokens::TokenOnlyForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, body = wire::Introspection), (status = 401, body = wire::OAuthError)))]
async fn introspect(
    State(svc): State<AuthService>,
    ctx: Ctx,
    headers: HeaderMap,
    form: Result<ApiForm<crate::oauth::tokens::TokenOnlyForm>, ApiError>,
) -> Result<Response, crate::oauth::OAuthError> {
    use crate::oauth::OAuthError;
    if !introspection_client_ok(&svc, &headers) {
        // Registered OAuth clients; failures are rate limited like logins (secret guessing).
        return crate::oauth::tokens::introspect_for_client(&svc, &ctx, &headers, form).await;
    }
    let ApiForm(form) =
        form.map_err(|e| OAuthError::request(e.problem.detail.unwrap_or_default()))?;
    let token = form
        .token
        .ok_or_else(|| OAuthError::request("token is required"))?;
    let client_ip = match form.client_ip.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<std::net::IpAddr>()
                .map_err(|_| OAuthError::request("client_ip is not an IP address"))?,
        ),
    };
    Ok(no_store(
        StatusCode::OK,
        Json(svc.introspect_from(&token, client_ip).await?),
    ))
}

/// The public keys that verify access tokens (RFC 7517).
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth", responses((status = 200, description = "JWK Set"), (status = 503, body = Problem)))]
async fn jwks(State(svc): State<AuthService>) -> Result<Response, ApiError> {
    let mut doc = svc.verifier().jwks();
    // A set without the ES256 keys would be cached by relying parties for a minute:
    // better no answer than a wrong one.
    crate::oauth::es256::add_to_jwks(&svc, &mut doc)
        .await
        .map_err(ApiError::unavailable)?;
    let mut res = Json(doc).into_response();
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(crate::keys::JWKS_CACHE_CONTROL),
    );
    Ok(res)
}
