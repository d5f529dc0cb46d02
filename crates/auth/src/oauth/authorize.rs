//! `GET /oauth/authorize` (authorization code + PKCE) and its browser steps:
//! sign-in → (second factor) → consent → redirect with a single-use code.
//!
//! The client and redirect URI are checked first; if either is wrong the browser
//! gets an error page and is never redirected. Later errors go back to the verified
//! redirect URI as `error=…&state=…` (RFC 6749 §4.1.2.1).

use super::clients::Client;
use super::signin::{second_factor_required, signin_failure, verify_second_factor};
use super::{has_scope, pages, split_scope, GRANT_CODE};
use crate::{AuthError, AuthService};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sqlx::Row;
use std::collections::HashMap;
use vaultpay_core::crypto::{ct_eq, opaque_token, sha256_hex};
use vaultpay_core::step_up::ACR_MFA;
use vaultpay_core::time::{now_micros, secs};
use vaultpay_store::audit::{append, NewAudit};
use vaultpay_web::{ApiForm, ApiQuery, Ctx};

pub(crate) const COOKIE: &str = "vp_authz";

/// Appends query parameters to a redirect URI.
pub(crate) fn with_params(uri: &str, params: &[(&str, &str)]) -> String {
    let mut out = uri.to_owned();
    let mut sep = if uri.contains('?') { '&' } else { '?' };
    for (k, v) in params {
        out.push(sep);
        out.push_str(k);
        out.push('=');
        out.push_str(&urlencoding::encode(v));
        sep = '&';
    }
    out
}

fn redirect(to: &str) -> Response {
    let mut res = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// An error answered to the client's redirect URI, with `state` and `iss` (RFC 9207:
/// on error responses too, so a client can tell which server answered).
fn error_redirect(
    uri: &str,
    error: &str,
    description: &str,
    state: Option<&str>,
    issuer: &str,
) -> Response {
    let mut params = vec![("error", error), ("error_description", description)];
    if let Some(s) = state {
        params.push(("state", s));
    }
    params.push(("iss", issuer));
    redirect(&with_params(uri, &params))
}

/// A valid PKCE code challenge / verifier: 43–128 unreserved characters (RFC 7636 §4.1).
pub(crate) fn pkce_shape_ok(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// `BASE64URL(SHA256(verifier)) == challenge`, compared in constant time.
pub(crate) fn pkce_s256_ok(verifier: &str, challenge: &str) -> bool {
    use base64::Engine;
    use sha2::Digest;
    let digest = sha2::Sha256::digest(verifier.as_bytes());
    let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
    ct_eq(computed.as_bytes(), challenge.as_bytes())
}

/// The authorization request, checked.
struct Checked {
    client: Client,
    redirect_uri: String,
    redirect_given: bool,
    scope: Vec<String>,
    state: Option<String>,
    nonce: Option<String>,
    code_challenge: Option<String>,
    /// OIDC `login_hint`: pre-fills the email field when it looks like an address.
    login_hint: Option<String>,
    /// `acr_values` asked for a second factor (RFC 9470 step-up by a client).
    acr_mfa: bool,
    /// `prompt=login` or `max_age`: the user must authenticate now, with a credential
    /// this server checks (see [`providers_for`]).
    fresh_login: bool,
}

/// `Err(page)`: shown in the browser; `Err(redirect)`: sent back to the client.
#[allow(clippy::result_large_err)]
fn check_request(
    client: Client,
    q: &HashMap<String, String>,
    issuer: &str,
) -> Result<Checked, Response> {
    let get = |k: &str| q.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let redirect_uri = match get("redirect_uri") {
        Some(u) if client.redirect_matches(u) => u.to_owned(),
        Some(_) => {
            return Err(pages::error(
                StatusCode::BAD_REQUEST,
                "The redirect URI is not registered for this application.",
            ))
        }
        None if client.redirect_uris.len() == 1 => client.redirect_uris[0].clone(),
        None => {
            return Err(pages::error(
                StatusCode::BAD_REQUEST,
                "The request has no redirect URI.",
            ))
        }
    };
    let state = get("state").map(str::to_owned);
    let fail = |e: &str, d: &str| {
        Err(error_redirect(
            &redirect_uri,
            e,
            d,
            state.as_deref(),
            issuer,
        ))
    };
    if state.as_ref().is_some_and(|s| s.len() > 512) || get("nonce").is_some_and(|n| n.len() > 512)
    {
        return fail(
            "invalid_request",
            "state and nonce must be at most 512 characters",
        );
    }
    match get("response_type") {
        Some("code") => {}
        Some(_) => {
            return fail(
                "unsupported_response_type",
                "only response_type=code is supported",
            )
        }
        None => return fail("invalid_request", "response_type is required"),
    }
    if !client.allows_grant(GRANT_CODE) {
        return fail(
            "unauthorized_client",
            "this client may not use the authorization code grant",
        );
    }
    let scope = match get("scope").map(super::requested_scope) {
        Some(Ok(s)) => s,
        Some(Err(_)) => return fail("invalid_scope", "the scope is too long"),
        None => vec!["openid".to_owned()],
    };
    if scope.is_empty() || scope.iter().any(|s| !client.allows_scope(s)) {
        return fail(
            "invalid_scope",
            "a requested scope is not allowed for this client",
        );
    }
    let challenge = get("code_challenge");
    let method = get("code_challenge_method");
    let code_challenge = match (challenge, method) {
        (Some(c), Some("S256")) if pkce_shape_ok(c) => Some(c.to_owned()),
        (Some(_), Some("S256")) => return fail("invalid_request", "code_challenge is malformed"),
        (Some(_), _) => {
            return fail(
                "invalid_request",
                "only code_challenge_method=S256 is supported (plain is refused)",
            )
        }
        (None, Some(_)) => return fail("invalid_request", "code_challenge is required"),
        (None, None) if client.public => {
            return fail(
                "invalid_request",
                "PKCE (code_challenge, S256) is required for public clients",
            )
        }
        // A confidential client's code must be bound to its request one way or the
        // other (RFC 9700 §2.1.1: against code injection): PKCE, or an OpenID Connect
        // nonce its ID token will carry.
        (None, None) if !(scope.iter().any(|s| s == "openid") && get("nonce").is_some()) => {
            return fail(
                "invalid_request",
                "PKCE (code_challenge, S256) is required, or a nonce with the openid scope",
            )
        }
        (None, None) => None,
    };
    // OIDC Core §3.1.2.1 / §6: request objects are not supported
    if get("request").is_some() {
        return fail("request_not_supported", "request objects are not supported");
    }
    if get("request_uri").is_some() {
        return fail("request_uri_not_supported", "request_uri is not supported");
    }
    if get("max_age").is_some_and(|m| m.len() > 10 || m.parse::<u32>().is_err()) {
        return fail(
            "invalid_request",
            "max_age must be a non-negative number of seconds",
        );
    }
    let prompt: Vec<&str> = get("prompt")
        .map(|p| p.split(' ').filter(|v| !v.is_empty()).collect())
        .unwrap_or_default();
    if prompt
        .iter()
        .any(|v| !matches!(*v, "none" | "login" | "consent" | "select_account"))
    {
        return fail("invalid_request", "unknown prompt value");
    }
    if prompt.contains(&"none") {
        if prompt.len() > 1 {
            return fail(
                "invalid_request",
                "prompt=none cannot be combined with other values",
            );
        }
        // Every authorization here signs the user in afresh (there is no single
        // sign-on session to reuse), so a request that forbids any page cannot be
        // answered silently (OIDC Core §3.1.2.6).
        return fail(
            "login_required",
            "the user must sign in, which prompt=none forbids",
        );
    }
    // max_age and prompt=login are satisfied by the sign-in every authorization here
    // asks for, and the ID token carries auth_time; but a sign-in provider may answer
    // from its own session without asking the user anything, so for these requests
    // only the password sign-in is offered (`fresh_login`).
    let login_hint = get("login_hint")
        .filter(|h| h.len() <= 254 && h.contains('@') && !h.chars().any(char::is_control))
        .map(str::to_owned);
    // acr_values is a request, not a filter (OIDC Core §3.1.2.1): values other than
    // the second-factor one are ignored; that one is enforced after sign-in.
    let acr_mfa = get("acr_values").is_some_and(|v| v.split(' ').any(|a| a == ACR_MFA));
    Ok(Checked {
        client,
        redirect_given: get("redirect_uri").is_some(),
        redirect_uri,
        scope,
        state,
        nonce: get("nonce").map(str::to_owned),
        code_challenge,
        login_hint,
        acr_mfa,
        fresh_login: prompt.contains(&"login") || get("max_age").is_some(),
    })
}

/// The sign-in providers the page of request offers: none when it asked for a fresh
/// sign-in.
fn providers_for(svc: &AuthService, fresh_login: bool) -> Vec<(String, String)> {
    if fresh_login {
        Vec::new()
    } else {
        super::upstream::providers(svc)
    }
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

pub(crate) fn read_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    cookie_value(headers, name).map(str::to_owned)
}

pub(crate) fn set_cookie(
    res: &mut Response,
    svc: &AuthService,
    name: &str,
    value: &str,
    path: &str,
) {
    let secure = if svc.public_url().starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    let c = format!("{name}={value}; Path={path}; HttpOnly; SameSite=Lax; Max-Age=900{secure}");
    if let Ok(v) = HeaderValue::from_str(&c) {
        res.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// The start of the authorization code flow (RFC 6749 §4.1, PKCE S256 per RFC 7636):
/// `response_type=code`, `client_id`, `redirect_uri`, `scope`, `state`, `nonce`,
/// `code_challenge`, `code_challenge_method=S256`. Answers the sign-in page; an unknown
/// client or unregistered redirect URI gets an error page, never a redirect.
#[utoipa::path(get, path = "/oauth/authorize", tag = "oauth",
    responses((status = 200, description = "Sign-in page (HTML)", content_type = "text/html"),
        (status = 303, description = "Error redirect to the verified redirect URI"),
        (status = 400, description = "Error page (HTML)", content_type = "text/html"),
        (status = 429, body = vaultpay_proto::Problem, description = "Too many requests from this address")))]
pub(crate) async fn authorize(
    State(svc): State<AuthService>,
    ctx: vaultpay_web::Ctx,
    q: Result<ApiQuery<Vec<(String, String)>>, vaultpay_web::ApiError>,
) -> Response {
    let Ok(ApiQuery(pairs)) = q else {
        return pages::error(
            StatusCode::BAD_REQUEST,
            "The authorization request is malformed.",
        );
    };
    // RFC 6749 §3.1: parameters must not be repeated. Taking the last of two
    // `redirect_uri`s or `scope`s would decide on another value than a proxy or
    // filter in front that read the first.
    let mut q = HashMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        if q.insert(k, v).is_some() {
            return pages::error(
                StatusCode::BAD_REQUEST,
                "The authorization request repeats a parameter.",
            );
        }
    }
    let client = match q
        .get("client_id")
        .filter(|c| !c.is_empty() && c.len() <= 128)
    {
        Some(id) => super::clients::get(svc.db(), id).await,
        None => Ok(None),
    };
    let client = match client {
        Ok(Some(c)) => c,
        Ok(None) => {
            return pages::error(StatusCode::BAD_REQUEST, "Unknown application (client_id).")
        }
        Err(e) => return vaultpay_web::ApiError::from(e).into_response(),
    };
    let c = match check_request(client, &q, &svc.config().issuer) {
        Ok(c) => c,
        Err(res) => return res,
    };
    // A valid request writes a pending authorization, anonymously: bounded per address
    // (one refused before it writes anything does not count).
    if let Err(e) = vaultpay_web::enforce(
        &*svc.limiter(),
        &format!("oauth:start:ip:{}", ctx.ip_key()),
        svc.config().rate_limits.oauth_start_per_ip,
    )
    .await
    {
        return e.into_response();
    }
    match start_request(&svc, &c).await {
        Ok((id, csrf)) => {
            let mut res = pages::signin(
                StatusCode::OK,
                &csrf,
                &c.client.name,
                None,
                &providers_for(&svc, c.fresh_login),
                c.login_hint.as_deref(),
            );
            set_cookie(&mut res, &svc, COOKIE, &id, "/oauth/authorize");
            res
        }
        Err(e) => vaultpay_web::ApiError::from(e).into_response(),
    }
}

async fn start_request(svc: &AuthService, c: &Checked) -> Result<(String, String), AuthError> {
    let id = opaque_token();
    let csrf = opaque_token();
    let now = now_micros();
    let db = svc.db();
    let mut tx = db.begin().await?;
    sqlx::query("DELETE FROM oauth_requests WHERE expires_at < $1")
        .bind(now)
        .execute(&mut *tx)
        .await?;
    // Spent and expired codes are kept a day (a late replay still revokes), then go.
    sqlx::query("DELETE FROM oauth_codes WHERE expires_at < $1")
        .bind(now - secs(86_400))
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO oauth_requests (id_hash, csrf_hash, client_id, redirect_uri, scope, state, nonce, code_challenge, \
         stage, created_at, expires_at, redirect_given, acr_mfa, fresh_login) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'signin', $9, $10, $11, $12, $13)",
    )
    .bind(sha256_hex(id.as_bytes()))
    .bind(sha256_hex(csrf.as_bytes()))
    .bind(&c.client.client_id)
    .bind(&c.redirect_uri)
    .bind(c.scope.join(" "))
    .bind(&c.state)
    .bind(&c.nonce)
    .bind(&c.code_challenge)
    .bind(now)
    .bind(now + secs(svc.config().oauth.request_ttl_secs))
    .bind(i64::from(c.redirect_given))
    .bind(i64::from(c.acr_mfa))
    .bind(i64::from(c.fresh_login))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((id, csrf))
}

/// A pending request found by the browser's cookie and the form's CSRF token.
pub(crate) struct Pending {
    pub(crate) id_hash: String,
    client: Client,
    redirect_uri: String,
    redirect_given: bool,
    scope: String,
    state: Option<String>,
    nonce: Option<String>,
    code_challenge: Option<String>,
    user_id: Option<String>,
    auth_time: Option<i64>,
    amr: Option<String>,
    /// The upstream provider the user signed in through, if any.
    upstream_provider: Option<String>,
    acr_mfa: bool,
    /// The request asked for a fresh sign-in: no sign-in provider may answer it.
    pub(crate) fresh_login: bool,
    pub(crate) stage: String,
}

/// The pending request of this browser (its cookie), checked against the form's CSRF
/// token.
pub(crate) async fn pending_request(
    svc: &AuthService,
    headers: &HeaderMap,
    csrf: Option<&str>,
) -> Result<Result<Pending, Response>, AuthError> {
    let Some(id) = cookie_value(headers, COOKIE) else {
        return Ok(Err(expired_page()));
    };
    load_pending(svc, &sha256_hex(id.as_bytes()), csrf).await
}

fn expired_page() -> Response {
    pages::error(
        StatusCode::BAD_REQUEST,
        "This sign-in request has expired or is not valid. Go back to the application and start again.",
    )
}

async fn load_pending(
    svc: &AuthService,
    id_hash: &str,
    csrf: Option<&str>,
) -> Result<Result<Pending, Response>, AuthError> {
    let expired = || {
        pages::error(
            StatusCode::BAD_REQUEST,
            "This sign-in request has expired or is not valid. Go back to the application and start again.",
        )
    };
    let r = sqlx::query(
        "SELECT id_hash, csrf_hash, client_id, redirect_uri, redirect_given, scope, state, nonce, code_challenge, user_id, auth_time, \
         amr, upstream_provider, acr_mfa, fresh_login, stage, expires_at FROM oauth_requests WHERE id_hash = $1",
    )
    .bind(id_hash)
    .fetch_optional(svc.db().read())
    .await?;
    let Some(r) = r else {
        return Ok(Err(expired()));
    };
    let csrf_hash: String = r.try_get("csrf_hash")?;
    if csrf.is_some_and(|c| !ct_eq(sha256_hex(c.as_bytes()).as_bytes(), csrf_hash.as_bytes())) {
        return Ok(Err(pages::error(
            StatusCode::FORBIDDEN,
            "The form is not valid (CSRF check failed).",
        )));
    }
    let expires_at: i64 = r.try_get("expires_at")?;
    if expires_at <= now_micros() {
        return Ok(Err(expired()));
    }
    let client_id: String = r.try_get("client_id")?;
    let Some(client) = super::clients::get(svc.db(), &client_id).await? else {
        return Ok(Err(expired()));
    };
    Ok(Ok(Pending {
        id_hash: r.try_get("id_hash")?,
        client,
        redirect_uri: r.try_get("redirect_uri")?,
        redirect_given: r.try_get::<i64, _>("redirect_given")? != 0,
        scope: r.try_get("scope")?,
        state: r.try_get("state")?,
        nonce: r.try_get("nonce")?,
        code_challenge: r.try_get("code_challenge")?,
        user_id: r.try_get("user_id")?,
        auth_time: r.try_get("auth_time")?,
        amr: r.try_get("amr")?,
        upstream_provider: r.try_get("upstream_provider")?,
        acr_mfa: r.try_get::<i64, _>("acr_mfa")? != 0,
        fresh_login: r.try_get::<i64, _>("fresh_login")? != 0,
        stage: r.try_get("stage")?,
    }))
}

/// Moves a request to its next stage (only from the stage it was read in), with the
/// audit entry of the sign-in step, in one transaction, which first re-checks `proof`
/// under the user's row lock: a password reset that committed after the sign-in
/// matched the old password refuses it (`InvalidCredentials`); a request already
/// signed in is deleted by such a reset, which this lock orders this step with.
#[allow(clippy::too_many_arguments)]
async fn advance(
    svc: &AuthService,
    ctx: &Ctx,
    p: &Pending,
    to: &str,
    user_id: &str,
    auth_time: i64,
    amr: &str,
    proof: crate::sessions::Proof<'_>,
) -> Result<bool, AuthError> {
    let db = svc.db();
    let mut tx = db.begin().await?;
    crate::sessions::recheck_authority(db, &mut tx, user_id, proof).await?;
    let n = sqlx::query(
        "UPDATE oauth_requests SET stage = $1, user_id = $2, auth_time = $3, amr = $4 WHERE id_hash = $5 AND stage = $6",
    )
    .bind(to)
    .bind(user_id)
    .bind(auth_time)
    .bind(amr)
    .bind(&p.id_hash)
    .bind(&p.stage)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n != 1 {
        return Ok(false);
    }
    append(
        db,
        &mut tx,
        &ctx.origin(),
        NewAudit::success(if p.stage == "signin" {
            "oauth.signin"
        } else {
            "oauth.second_factor"
        })
        .actor(user_id)
        .resource(&p.client.client_id)
        .metadata(serde_json::json!({ "amr": amr, "next": to })),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

fn internal(e: AuthError) -> Response {
    vaultpay_web::ApiError::from(e).into_response()
}

/// What every browser step's post starts with: its form parsed, and this browser's
/// pending request found (by cookie) and checked against the form's CSRF token; the
/// error page otherwise.
async fn step<F>(
    svc: &AuthService,
    headers: &HeaderMap,
    form: Result<ApiForm<F>, vaultpay_web::ApiError>,
    csrf: impl Fn(&F) -> &str,
) -> Result<(F, Pending), Response> {
    let Ok(ApiForm(form)) = form else {
        return Err(pages::error(
            StatusCode::BAD_REQUEST,
            "The form is incomplete.",
        ));
    };
    match pending_request(svc, headers, Some(csrf(&form))).await {
        Ok(Ok(p)) => Ok((form, p)),
        Ok(Err(page)) => Err(page),
        Err(e) => Err(internal(e)),
    }
}

#[derive(Deserialize)]
pub(crate) struct SigninForm {
    csrf: String,
    email: String,
    password: String,
}

fn stage_error() -> Response {
    pages::error(
        StatusCode::BAD_REQUEST,
        "This step does not belong here. Go back to the application and start again.",
    )
}

/// The sign-in form's post (browser; CSRF token bound to the request cookie).
#[utoipa::path(post, path = "/oauth/authorize/signin", tag = "oauth",
    responses((status = 200, description = "Consent or second-factor page (HTML)", content_type = "text/html"),
        (status = 401, description = "Sign-in page with an error", content_type = "text/html")))]
pub(crate) async fn signin(
    State(svc): State<AuthService>,
    ctx: Ctx,
    headers: HeaderMap,
    form: Result<ApiForm<SigninForm>, vaultpay_web::ApiError>,
) -> Response {
    let (form, p) = match step(&svc, &headers, form, |f| &f.csrf).await {
        Ok(v) => v,
        Err(page) => return page,
    };
    if p.stage != "signin" {
        return stage_error();
    }
    // The sign-in page again with what went wrong, or an error page.
    let refused = |e: AuthError| match signin_failure(&e) {
        Some((status, text)) => pages::signin(
            status,
            &form.csrf,
            &p.client.name,
            Some(text),
            &providers_for(&svc, p.fresh_login),
            None,
        ),
        None => internal(e),
    };
    let (user_id, matched) = match svc.check_password(&ctx, &form.email, &form.password).await {
        Ok(u) => u,
        Err(e) => return refused(e),
    };
    let now = now_micros();
    let needs_2fa = second_factor_required(&svc, &ctx, &user_id, true).await;
    if p.acr_mfa && !needs_2fa {
        return unmet_acr(&svc, &ctx, &p, &user_id).await;
    }
    let next = if needs_2fa {
        "second_factor"
    } else {
        "consent"
    };
    let proof = crate::sessions::Proof::password(&matched);
    match advance(&svc, &ctx, &p, next, &user_id, now, "pwd", proof).await {
        Ok(true) => {}
        Ok(false) => return stage_error(),
        Err(e) => return refused(e),
    }
    if needs_2fa {
        pages::second_factor(StatusCode::OK, &form.csrf, None)
    } else {
        pages::consent(&form.csrf, &p.client.name, &split_scope(&p.scope))
    }
}

/// After an upstream provider vouched for `user_id`: the request (found by its id, the
/// callback having checked the browser) moves on, under a fresh CSRF token.
pub(crate) async fn federated_signin(
    svc: &AuthService,
    ctx: &Ctx,
    id_hash: &str,
    user_id: &str,
    provider: &str,
) -> Result<Option<Response>, AuthError> {
    let p = match load_pending(svc, id_hash, None).await? {
        Ok(p) if p.stage == "signin" => p,
        _ => return Ok(None),
    };
    let needs_2fa = second_factor_required(svc, ctx, user_id, true).await;
    if p.acr_mfa && !needs_2fa {
        return Ok(Some(unmet_acr(svc, ctx, &p, user_id).await));
    }
    let next = if needs_2fa {
        "second_factor"
    } else {
        "consent"
    };
    let csrf = opaque_token();
    let db = svc.db();
    let mut tx = db.begin().await?;
    // The link the callback found is still there, under the user's row lock: an unlink
    // (which takes that row first) that committed since then ends this sign-in.
    crate::sessions::recheck_authority(db, &mut tx, user_id, Default::default()).await?;
    let linked =
        sqlx::query("SELECT user_id FROM upstream_identities WHERE user_id = $1 AND provider = $2")
            .bind(user_id)
            .bind(provider)
            .fetch_optional(&mut *tx)
            .await?;
    if linked.is_none() {
        return Ok(None);
    }
    let n = sqlx::query(
        "UPDATE oauth_requests SET stage = $1, user_id = $2, auth_time = $3, amr = 'fed', csrf_hash = $4, \
         upstream_provider = $5 WHERE id_hash = $6 AND stage = 'signin'",
    )
    .bind(next)
    .bind(user_id)
    .bind(now_micros())
    .bind(sha256_hex(csrf.as_bytes()))
    .bind(provider)
    .bind(id_hash)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n != 1 {
        return Ok(None);
    }
    append(
        db,
        &mut tx,
        &ctx.origin(),
        NewAudit::success("oauth.signin")
            .actor(user_id)
            .resource(&p.client.client_id)
            .metadata(serde_json::json!({ "amr": "fed", "provider": provider, "next": next })),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(if needs_2fa {
        pages::second_factor(StatusCode::OK, &csrf, None)
    } else {
        pages::consent(&csrf, &p.client.name, &split_scope(&p.scope))
    }))
}

/// The client asked for a second factor (`acr_values`) and the user has none: the
/// request ends with `unmet_authentication_requirements` (OpenID Connect Unmet
/// Authentication Requirements 1.0) rather than a token that would be refused again.
async fn unmet_acr(svc: &AuthService, ctx: &Ctx, p: &Pending, user_id: &str) -> Response {
    let ended = async {
        let db = svc.db();
        let mut tx = db.begin().await?;
        let n = sqlx::query("DELETE FROM oauth_requests WHERE id_hash = $1 AND stage = $2")
            .bind(&p.id_hash)
            .bind(&p.stage)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 1 {
            append(
                db,
                &mut tx,
                &ctx.origin(),
                NewAudit::failure("oauth.acr_unmet")
                    .actor(user_id)
                    .resource(&p.client.client_id)
                    .metadata(serde_json::json!({ "acr_values": ACR_MFA })),
            )
            .await?;
            tx.commit().await?;
        }
        Ok::<_, AuthError>(n == 1)
    };
    match ended.await {
        Ok(true) => error_redirect(
            &p.redirect_uri,
            "unmet_authentication_requirements",
            "the application requires a second factor and the account has none; enrol one first",
            p.state.as_deref(),
            &svc.config().issuer,
        ),
        Ok(false) => stage_error(),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
pub(crate) struct CodeForm {
    csrf: String,
    code: String,
}

/// The second-factor step: a TOTP, emailed or recovery code of the signed-in user.
#[utoipa::path(post, path = "/oauth/authorize/second-factor", tag = "oauth",
    responses((status = 200, description = "Consent page (HTML)", content_type = "text/html"),
        (status = 401, description = "The second-factor page again: the code is wrong", content_type = "text/html")))]
pub(crate) async fn second_factor(
    State(svc): State<AuthService>,
    ctx: Ctx,
    headers: HeaderMap,
    form: Result<ApiForm<CodeForm>, vaultpay_web::ApiError>,
) -> Response {
    let (form, p) = match step(&svc, &headers, form, |f| &f.csrf).await {
        Ok(v) => v,
        Err(page) => return page,
    };
    let (Some(user_id), "second_factor") = (p.user_id.clone(), p.stage.as_str()) else {
        return stage_error();
    };
    if !verify_second_factor(&svc, &ctx, &user_id, form.code.trim()).await {
        return pages::second_factor(
            StatusCode::UNAUTHORIZED,
            &form.csrf,
            Some("The code is wrong."),
        );
    }
    // as a first-party sign-in's second factor says it (`mfa::with_mfa_amr`)
    let amr = format!(
        "{} {} {}",
        p.amr.as_deref().unwrap_or("pwd"),
        vaultpay_core::step_up::AMR_OTP,
        vaultpay_core::step_up::AMR_MFA
    );
    match advance(
        &svc,
        &ctx,
        &p,
        "consent",
        &user_id,
        p.auth_time.unwrap_or_else(now_micros),
        &amr,
        crate::sessions::Proof::default(),
    )
    .await
    {
        Ok(true) => pages::consent(&form.csrf, &p.client.name, &split_scope(&p.scope)),
        Ok(false) => stage_error(),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
pub(crate) struct ConsentForm {
    csrf: String,
    decision: String,
}

/// The consent page's post: a code goes back to the client, or `access_denied`.
#[utoipa::path(post, path = "/oauth/authorize/consent", tag = "oauth",
    responses((status = 303, description = "Redirect with `code`, `state` and `iss`, or `error=access_denied`")))]
pub(crate) async fn consent(
    State(svc): State<AuthService>,
    ctx: Ctx,
    headers: HeaderMap,
    form: Result<ApiForm<ConsentForm>, vaultpay_web::ApiError>,
) -> Response {
    let (form, p) = match step(&svc, &headers, form, |f| &f.csrf).await {
        Ok(v) => v,
        Err(page) => return page,
    };
    let (Some(user_id), "consent") = (p.user_id.clone(), p.stage.as_str()) else {
        return stage_error();
    };
    match issue_code(&svc, &ctx, &p, &user_id, form.decision == "approve").await {
        Ok(Some(code)) => {
            let mut params = vec![("code", code.as_str())];
            if let Some(s) = &p.state {
                params.push(("state", s));
            }
            params.push(("iss", svc.config().issuer.as_str()));
            redirect(&with_params(&p.redirect_uri, &params))
        }
        Ok(None) if form.decision == "approve" => stage_error(),
        Ok(None) => error_redirect(
            &p.redirect_uri,
            "access_denied",
            "the user denied the request",
            p.state.as_deref(),
            &svc.config().issuer,
        ),
        Err(e) => internal(e),
    }
}

/// Ends the pending request (once) and, if approved, stores a hashed single-use code.
async fn issue_code(
    svc: &AuthService,
    ctx: &Ctx,
    p: &Pending,
    user_id: &str,
    approve: bool,
) -> Result<Option<String>, AuthError> {
    let db = svc.db();
    let now = now_micros();
    let mut tx = db.begin().await?;
    let n = sqlx::query("DELETE FROM oauth_requests WHERE id_hash = $1 AND stage = 'consent'")
        .bind(&p.id_hash)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if n != 1 {
        return Ok(None);
    }
    if !approve {
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::failure("oauth.consent_denied")
                .actor(user_id)
                .resource(&p.client.client_id),
        )
        .await?;
        tx.commit().await?;
        return Ok(None);
    }
    let code = opaque_token();
    sqlx::query(
        "INSERT INTO oauth_codes (code_hash, client_id, user_id, redirect_uri, scope, nonce, code_challenge, auth_time, amr, \
         upstream_provider, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(sha256_hex(code.as_bytes()))
    .bind(&p.client.client_id)
    .bind(user_id)
    .bind(if p.redirect_given {
        p.redirect_uri.as_str()
    } else {
        ""
    })
    .bind(&p.scope)
    .bind(&p.nonce)
    .bind(&p.code_challenge)
    .bind(p.auth_time.unwrap_or(now))
    .bind(p.amr.as_deref().unwrap_or("pwd"))
    .bind(&p.upstream_provider)
    .bind(now)
    .bind(now + secs(svc.config().oauth.code_ttl_secs))
    .execute(&mut *tx)
    .await?;
    append(
        db,
        &mut tx,
        &ctx.origin(),
        NewAudit::success("oauth.code_issued")
            .actor(user_id)
            .resource(&p.client.client_id)
            .metadata(serde_json::json!({ "scope": p.scope, "offline": has_scope(&p.scope, "offline_access") })),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_rfc7636_appendix_b() {
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(pkce_shape_ok(verifier));
        assert!(pkce_s256_ok(verifier, challenge));
        assert!(
            !pkce_s256_ok(challenge, challenge),
            "plain must not pass as S256"
        );
        assert!(!pkce_s256_ok(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXX",
            challenge
        ));
    }

    #[test]
    fn pkce_shape_is_43_to_128_unreserved() {
        assert!(!pkce_shape_ok(&"a".repeat(42)));
        assert!(pkce_shape_ok(&"a".repeat(43)));
        assert!(pkce_shape_ok(&"a".repeat(128)));
        assert!(!pkce_shape_ok(&"a".repeat(129)));
        assert!(!pkce_shape_ok(&format!("{}+", "a".repeat(43))));
    }

    #[test]
    fn params_are_encoded_onto_the_redirect() {
        assert_eq!(
            with_params(
                "https://a.example/cb",
                &[("code", "x y"), ("state", "&s=1")]
            ),
            "https://a.example/cb?code=x%20y&state=%26s%3D1"
        );
        assert_eq!(
            with_params("https://a.example/cb?k=v", &[("code", "c")]),
            "https://a.example/cb?k=v&code=c"
        );
    }
}
