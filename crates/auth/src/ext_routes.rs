//! Routes of IP trust (held logins, emailed confirm / deny links, trusted networks)
//! and custom roles.

use crate::{AuthError, AuthService};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::OpenApi;
use vaultpay_proto::auth as wire;
use vaultpay_proto::iptrust as iwire;
use vaultpay_proto::Problem;
use vaultpay_web::{ApiError, ApiForm, ApiJson, ApiQuery, Ctx, Principal};

type ApiResult<T> = Result<T, ApiError>;

pub(crate) fn router(svc: AuthService) -> Router {
    Router::new()
        .route("/v1/auth/login/complete", post(complete_login))
        .route("/v1/auth/login/confirm", get(confirm_page).post(confirm))
        .route("/v1/auth/login/deny", get(deny_page).post(deny))
        .route(
            "/v1/auth/email/confirm",
            get(email_confirm_page).post(email_confirm),
        )
        .route("/v1/me/trusted-networks", get(list_networks))
        .route("/v1/me/trusted-networks/{id}", delete(revoke_network))
        .route("/v1/me/identities", get(list_identities))
        .route("/v1/me/identities/{provider}", delete(unlink_identity))
        .route("/v1/admin/roles", post(create_role))
        .route("/v1/admin/roles/{name}", delete(delete_role))
        .with_state(svc)
}

#[derive(OpenApi)]
#[openapi(
    paths(
        complete_login,
        confirm_page,
        confirm,
        deny_page,
        deny,
        email_confirm_page,
        email_confirm,
        list_networks,
        revoke_network,
        list_identities,
        unlink_identity,
        create_role,
        delete_role
    ),
    components(schemas(
        iwire::LoginHeld,
        iwire::LoginCompleteRequest,
        iwire::TrustedNetwork,
        iwire::TrustedNetworkList,
        iwire::LinkedIdentity,
        iwire::LinkedIdentityList,
        iwire::CreateRoleRequest
    ))
)]
pub(crate) struct ExtApi;

fn no_store<T: IntoResponse>(status: StatusCode, body: T) -> Response {
    let mut res = (status, body).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The answer of a login that is held or still pending: `202` with the ticket.
pub(crate) fn held(ticket: String) -> Response {
    no_store(
        StatusCode::ACCEPTED,
        Json(iwire::LoginHeld {
            status: "ip_confirmation_required".into(),
            login_ticket: ticket,
        }),
    )
}

/// Finish a held login once its network was confirmed by email (`202` until then).
#[utoipa::path(post, path = "/v1/auth/login/complete", tag = "auth", request_body = iwire::LoginCompleteRequest,
    responses((status = 200, body = wire::TokenResponse), (status = 202, body = iwire::LoginHeld),
        (status = 400, body = Problem, description = "`invalid_login_ticket`: the ticket is invalid, expired, already used, or used from another device or network"),
        (status = 423, body = Problem, description = "`account_locked` or `password_reset_required`")))]
async fn complete_login(
    State(svc): State<AuthService>,
    ctx: Ctx,
    ApiJson(req): ApiJson<iwire::LoginCompleteRequest>,
) -> ApiResult<Response> {
    match svc.complete_login(&ctx, req).await {
        Ok(tokens) => Ok(no_store(StatusCode::OK, Json(tokens))),
        Err(AuthError::IpConfirmationRequired(t)) => Ok(held(t)),
        Err(AuthError::MfaRequired(c)) => Ok(no_store(StatusCode::ACCEPTED, Json(c))),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize, utoipa::IntoParams, utoipa::ToSchema)]
#[into_params(parameter_in = Query)]
struct TokenParam {
    token: String,
}

/// A tiny page with one button: link scanners that prefetch GETs change nothing.
pub(crate) fn page(
    title: &str,
    text: &str,
    action: &str,
    button: &str,
    token: &str,
) -> ApiResult<Response> {
    page_with(title, text, action, button, token, "")
}

/// [`page`] with `fields` (trusted HTML: inputs) in its form before the button.
pub(crate) fn page_with(
    title: &str,
    text: &str,
    action: &str,
    button: &str,
    token: &str,
    fields: &str,
) -> ApiResult<Response> {
    let ok = !token.is_empty()
        && token.len() <= 128
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(AuthError::BadEmailToken.into());
    }
    Ok(html_page(
        title,
        &format!(
            "<p>{text}</p><form method=\"post\" action=\"{action}\">\
             <input type=\"hidden\" name=\"token\" value=\"{token}\">{fields}\
             <button type=\"submit\">{button}</button></form>"
        ),
    ))
}

/// A page saying `text` (trusted), e.g. after a form of [`page_with`] was sent.
pub(crate) fn done_page(title: &str, text: &str) -> Response {
    html_page(title, &format!("<p>{text}</p>"))
}

/// A page titled `title` saying what went wrong (`e`'s detail), with `e`'s status: the
/// answer to a person at one of the mailed links' pages when the action failed.
/// A server error's outcome is unknown, so its page says only that (not `title`); its
/// headers (`Retry-After`) are kept.
pub(crate) fn failed_page(title: &str, e: impl Into<ApiError>) -> Response {
    let e: ApiError = e.into();
    let detail = e.problem.detail.clone().unwrap_or_default();
    let title = if e.status().is_server_error() {
        "Something went wrong"
    } else {
        title
    };
    let mut res = done_page(title, &crate::oauth::pages::esc(&detail));
    *res.status_mut() = e.status();
    for (k, v) in e.headers {
        res.headers_mut().append(k, v);
    }
    res
}

/// The answer to a mailed link's button: for a person at its page (`page`, see
/// [`wants_page`]) a page saying `done` (title, text) or, when it failed,
/// [`failed_page`] titled `failed`; for an API client the JSON of `r` (or its problem).
pub(crate) fn link_answer<T: serde::Serialize>(
    page: bool,
    r: Result<T, AuthError>,
    done: (&str, &str),
    failed: &str,
) -> ApiResult<Response> {
    Ok(match (page, r) {
        (true, Ok(_)) => done_page(done.0, done.1),
        (true, Err(e)) => failed_page(failed, e),
        (false, r) => no_store(StatusCode::OK, Json(r?)),
    })
}

/// Whether a mailed link's form post comes from a person at its page: a browser's form
/// submission is form-encoded and a navigation (`Sec-Fetch-Mode: navigate`, which
/// current browsers send and scripts cannot set). An `Accept` header is no sign: some
/// HTTP libraries ask for `text/html` by default. Anything else (an API client, an
/// older browser) gets JSON, as before.
pub(crate) fn wants_page(headers: &HeaderMap) -> bool {
    form_encoded(headers)
        && headers
            .get("sec-fetch-mode")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("navigate"))
}

/// A page of `body` (trusted HTML), not stored, framed or sent with a referrer.
fn html_page(title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head><body>\
         <h1>{title}</h1>{body}</body></html>"
    );
    let mut res = no_store(StatusCode::OK, axum::response::Html(html));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; form-action 'self'; frame-ancestors 'none'"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

/// The emailed "this was me" link: a page whose button confirms.
#[utoipa::path(get, path = "/v1/auth/login/confirm", tag = "auth", params(TokenParam),
    responses((status = 200, description = "HTML confirmation page"), (status = 400, body = Problem, description = "`invalid_token`: the token is malformed")))]
async fn confirm_page(ApiQuery(q): ApiQuery<TokenParam>) -> ApiResult<Response> {
    page(
        "Confirm this sign-in",
        "Trust the network of the sign-in and let it finish?",
        "/v1/auth/login/confirm",
        "Yes, it was me",
        &q.token,
    )
}

/// Confirm the network of a held login (form field `token`). A browser's form
/// submission is answered with a page.
#[utoipa::path(post, path = "/v1/auth/login/confirm", tag = "auth", request_body(content = TokenParam, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, body = wire::Accepted, description = "Confirmed (a browser's form submission: an HTML page)"), (status = 400, body = Problem, description = "`invalid_token`: the link is invalid, expired or already used")))]
async fn confirm(
    State(svc): State<AuthService>,
    ctx: Ctx,
    headers: HeaderMap,
    ApiForm(f): ApiForm<TokenParam>,
) -> ApiResult<Response> {
    let done = svc.confirm_login_network(&ctx, &f.token).await;
    link_answer(
        wants_page(&headers),
        done,
        (
                "Sign-in confirmed",
                "The sign-in can finish now, and its network is trusted from now on. You can close this page.",
        ),
        "Sign-in not confirmed",
    )
}

/// The emailed "this wasn't me" link: a page whose button locks the account.
#[utoipa::path(get, path = "/v1/auth/login/deny", tag = "auth", params(TokenParam),
    responses((status = 200, description = "HTML page"), (status = 400, body = Problem, description = "`invalid_token`: the token is malformed")))]
async fn deny_page(ApiQuery(q): ApiQuery<TokenParam>) -> ApiResult<Response> {
    page(
        "This wasn't me",
        "Sign out every session and lock the account until the password is reset?",
        "/v1/auth/login/deny",
        "Lock my account",
        &q.token,
    )
}

/// "This wasn't me": every session ends; the account is locked until a password reset.
/// A browser's form submission is answered with a page.
#[utoipa::path(post, path = "/v1/auth/login/deny", tag = "auth", request_body(content = TokenParam, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, body = wire::Accepted, description = "Locked (a browser's form submission: an HTML page)"), (status = 400, body = Problem, description = "`invalid_token`: the link is invalid, expired or already used")))]
async fn deny(
    State(svc): State<AuthService>,
    ctx: Ctx,
    headers: HeaderMap,
    ApiForm(f): ApiForm<TokenParam>,
) -> ApiResult<Response> {
    let done = svc.deny_login_network(&ctx, &f.token).await;
    link_answer(
        wants_page(&headers),
        done,
        (
                "Account locked",
                "Every session has been signed out and the account is locked. Reset your password to unlock it.",
        ),
        "Account not locked",
    )
}

/// The link mailed to a new email address: a page whose button confirms the change
/// (a mail scanner that prefetches links must not move the account to an address
/// its owner mistyped).
#[utoipa::path(get, path = "/v1/auth/email/confirm", tag = "auth", params(TokenParam),
    responses((status = 200, description = "HTML confirmation page"), (status = 400, body = Problem, description = "`invalid_token`: the token is malformed")))]
async fn email_confirm_page(ApiQuery(q): ApiQuery<TokenParam>) -> ApiResult<Response> {
    page(
        "Confirm your new email address",
        "Use this address for your VaultPay account from now on?",
        "/v1/auth/email/confirm",
        "Yes, use this address",
        &q.token,
    )
}

/// Complete an email change: the token from the link, as the page's form field
/// `token` or as JSON `{"token": …}`. A browser's form submission is answered with a
/// page.
#[utoipa::path(post, path = "/v1/auth/email/confirm", tag = "auth", request_body = wire::TokenRequestBody,
    responses((status = 200, body = wire::User, description = "Changed (a browser's form submission: an HTML page)"), (status = 400, body = Problem, description = "`invalid_token`: the link is invalid, expired or already used"), (status = 409, body = Problem, description = "`email_taken`")))]
async fn email_confirm(
    State(svc): State<AuthService>,
    ctx: Ctx,
    req: axum::extract::Request,
) -> ApiResult<Response> {
    let page = wants_page(req.headers());
    let token = link_token(req).await?;
    let user = svc.confirm_email_change(&ctx, &token).await;
    link_answer(
        page,
        user,
        (
            "Email address changed",
            "Your VaultPay account uses this address from now on.",
        ),
        "Email address not changed",
    )
}

/// The token of a mailed link's confirmation: the form field `token` (the link's page
/// posts it) or JSON `{"token": …}` (an API client).
pub(crate) async fn link_token(req: axum::extract::Request) -> ApiResult<String> {
    use axum::extract::FromRequest;
    Ok(if form_encoded(req.headers()) {
        ApiForm::<TokenParam>::from_request(req, &()).await?.0.token
    } else {
        ApiJson::<wire::TokenRequestBody>::from_request(req, &())
            .await?
            .0
            .token
    })
}

/// Whether a body is form-encoded (a page's form), not JSON (an API client).
pub(crate) fn form_encoded(headers: &HeaderMap) -> bool {
    const FORM: &str = "application/x-www-form-urlencoded";
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.get(..FORM.len()))
        .is_some_and(|t| t.eq_ignore_ascii_case(FORM))
}

/// The caller's trusted networks.
#[utoipa::path(get, path = "/v1/me/trusted-networks", tag = "auth",
    responses((status = 200, body = iwire::TrustedNetworkList), (status = 401, body = Problem)), security(("bearer" = [])))]
async fn list_networks(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
) -> ApiResult<Json<iwire::TrustedNetworkList>> {
    Ok(Json(svc.list_trusted_networks(&ctx, &p).await?))
}

/// Stop trusting one of the caller's networks (another user's: 404).
#[utoipa::path(delete, path = "/v1/me/trusted-networks/{id}", tag = "auth", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = Problem)), security(("bearer" = [])))]
async fn revoke_network(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    svc.revoke_trusted_network(&ctx, &p, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The sign-in providers (GitHub, OpenID Connect) linked to the caller's account.
#[utoipa::path(get, path = "/v1/me/identities", tag = "auth",
    responses((status = 200, body = iwire::LinkedIdentityList), (status = 401, body = Problem)), security(("bearer" = [])))]
async fn list_identities(
    State(svc): State<AuthService>,
    p: Principal,
) -> ApiResult<Json<iwire::LinkedIdentityList>> {
    Ok(Json(svc.list_identities(&p).await?))
}

/// Unlink a sign-in provider from the caller's account (a recent sign-in needed, as
/// for an email change). Ends the sessions signed in through it (the caller's too, if
/// it was one) and its codes not yet exchanged. 409 `last_sign_in_method` when the
/// account has no password and no other provider this server offers; 404 when none is
/// linked.
#[utoipa::path(delete, path = "/v1/me/identities/{provider}", tag = "auth", params(("provider" = String, Path)),
    responses((status = 204), (status = 401, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
async fn unlink_identity(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    Path(provider): Path<String>,
) -> ApiResult<StatusCode> {
    svc.unlink_identity(&ctx, &p, &provider).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Create a custom role (`roles:manage`; only permissions the caller holds).
#[utoipa::path(post, path = "/v1/admin/roles", tag = "auth", request_body = iwire::CreateRoleRequest,
    responses((status = 201, body = wire::Role), (status = 403, body = Problem), (status = 409, body = Problem),
        (status = 422, body = Problem, description = "`role_name_invalid`, `description_invalid`, `permissions_invalid`, `permission_unknown` or `permission_not_delegable`")), security(("bearer" = [])))]
async fn create_role(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    ApiJson(req): ApiJson<iwire::CreateRoleRequest>,
) -> ApiResult<Response> {
    crate::routes::admin(&svc, &ctx, &p, "roles:manage").await?;
    let role = svc.create_role(&ctx, &p, req).await?;
    Ok((StatusCode::CREATED, Json(role)).into_response())
}

/// Delete a custom role (`roles:manage`; built-in roles: 409).
#[utoipa::path(delete, path = "/v1/admin/roles/{name}", tag = "auth", params(("name" = String, Path)),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)), security(("bearer" = [])))]
async fn delete_role(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    crate::routes::admin(&svc, &ctx, &p, "roles:manage").await?;
    svc.delete_role(&ctx, &p, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    /// Only a browser's form submission (a navigation) gets a page: not a client that
    /// asks for HTML, not a navigation that posts JSON.
    #[test]
    fn only_a_browsers_form_submission_wants_a_page() {
        const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
        assert!(wants_page(&headers(&[
            FORM,
            ("sec-fetch-mode", "navigate")
        ])));
        assert!(wants_page(&headers(&[
            (
                "content-type",
                "Application/X-WWW-Form-Urlencoded; charset=utf-8"
            ),
            ("sec-fetch-mode", " Navigate "),
        ])));
        assert!(!wants_page(&headers(&[FORM, ("accept", "text/html")])));
        assert!(!wants_page(&headers(&[FORM, ("sec-fetch-mode", "cors")])));
        assert!(!wants_page(&headers(&[FORM])));
        assert!(!wants_page(&headers(&[
            ("content-type", "application/json"),
            ("sec-fetch-mode", "navigate"),
        ])));
    }

    /// A refusal's page has the caller's title and status; a server error's says only
    /// that something went wrong (its outcome is unknown) and keeps `Retry-After`.
    #[test]
    fn failed_pages_keep_the_status_and_say_less_for_server_errors() {
        let r = failed_page("Not confirmed", AuthError::BadEmailToken);
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = failed_page("Not confirmed", ApiError::unavailable("down"));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
        let body =
            futures::executor::block_on(axum::body::to_bytes(r.into_body(), 1 << 16)).unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.contains("<h1>Something went wrong</h1>"), "{body}");
        assert!(!body.contains("Not confirmed"), "{body}");
    }
}
