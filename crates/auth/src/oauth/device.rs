//! The device authorization grant (RFC 8628): `POST /oauth/device_authorization`,
//! the `/oauth/device` page, `POST /v1/oauth/device/approve` (a signed-in CLI
//! approves with its bearer token) and polling on the token endpoint.

use super::authorize::{read_cookie, set_cookie};
use super::clients::Client;
use super::signin::{second_factor_required, signin_failure, verify_second_factor};
use super::tokens::{no_store, Grant};
use super::{pages, presented_client, split_scope, OAuthError, GRANT_DEVICE};
use crate::{AuthError, AuthService};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use sqlx::Row;
use std::collections::HashMap;
use vaultpay_core::crypto::{ct_eq, opaque_token, sha256_hex};
use vaultpay_core::time::{now_micros, secs};
use vaultpay_store::audit::{append, NewAudit};
use vaultpay_web::{ApiError, ApiForm, ApiJson, ApiQuery, Ctx, Principal};

/// Consonants only: no vowels (no words), no look-alikes (RFC 8628 §6.1).
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
const CSRF_COOKIE: &str = "vp_device_csrf";

fn user_code() -> String {
    use rand::Rng;
    let mut rng = rand::rngs::OsRng;
    (0..8)
        .map(|_| USER_CODE_ALPHABET[rng.gen_range(0..USER_CODE_ALPHABET.len())] as char)
        .collect()
}

/// `abcd-efgh` → `ABCDEFGH`; anything but letters of the alphabet is dropped.
fn normalise_user_code(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .take(16)
        .collect()
}

fn display(code: &str) -> String {
    if code.len() == 8 {
        format!("{}-{}", &code[..4], &code[4..])
    } else {
        code.to_owned()
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct DeviceAuthForm {
    client_id: Option<String>,
    client_secret: Option<String>,
    scope: Option<String>,
}

/// Device authorization request (RFC 8628 §3.1).
#[utoipa::path(post, path = "/oauth/device_authorization", tag = "oauth",
    request_body(content = DeviceAuthForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "device_code, user_code, verification_uri(_complete), expires_in, interval"),
        (status = 400, body = vaultpay_proto::auth::OAuthError), (status = 401, body = vaultpay_proto::auth::OAuthError),
        (status = 429, body = vaultpay_proto::auth::OAuthError, description = "Too many requests from this address")))]
pub(crate) async fn device_authorization(
    State(svc): State<AuthService>,
    ctx: Ctx,
    headers: HeaderMap,
    form: Result<ApiForm<DeviceAuthForm>, ApiError>,
) -> Result<Response, OAuthError> {
    let ApiForm(f) = form.map_err(|e| OAuthError::request(e.problem.detail.unwrap_or_default()))?;
    let presented = presented_client(&headers, f.client_id.as_deref(), f.client_secret.as_deref())?;
    let client = svc.authenticate_client(&ctx, presented).await?;
    if !client.allows_grant(GRANT_DEVICE) {
        return Err(OAuthError::new(
            "unauthorized_client",
            "this client may not use the device grant",
        ));
    }
    let scope = match f.scope.as_deref() {
        Some(s) => super::requested_scope(s)?,
        None => vec!["openid".to_owned()],
    };
    if scope.is_empty() || scope.iter().any(|s| !client.allows_scope(s)) {
        return Err(OAuthError::new(
            "invalid_scope",
            "a requested scope is not allowed for this client",
        ));
    }
    // A valid request writes a pending device code, anonymously: bounded per address
    // (one refused before it writes anything does not count).
    vaultpay_web::enforce(
        &*svc.limiter(),
        &format!("oauth:start:ip:{}", ctx.ip_key()),
        svc.config().rate_limits.oauth_start_per_ip,
    )
    .await?;
    let cfg = &svc.config().oauth;
    let device_code = opaque_token();
    let now = now_micros();
    let db = svc.db();
    let mut tx = db.begin().await?;
    sqlx::query("DELETE FROM oauth_device_codes WHERE expires_at < $1")
        .bind(now - secs(86_400))
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM oauth_revoked_tokens WHERE expires_at < $1")
        .bind(now)
        .execute(&mut *tx)
        .await?;
    // User codes are short and kept a day after they expire: one already taken (by
    // chance, or by someone creating many) is replaced by another, not a 500.
    let scope = scope.join(" ");
    let mut code = None;
    for _ in 0..8 {
        let candidate = user_code();
        let inserted = sqlx::query(
            "INSERT INTO oauth_device_codes (device_code_hash, user_code, client_id, scope, status, interval_secs, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7) ON CONFLICT (user_code) DO NOTHING",
        )
        .bind(sha256_hex(device_code.as_bytes()))
        .bind(&candidate)
        .bind(&client.client_id)
        .bind(&scope)
        .bind(cfg.device_poll_interval_secs)
        .bind(now)
        .bind(now + secs(cfg.device_code_ttl_secs))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 1 {
            code = Some(candidate);
            break;
        }
    }
    let code = code.ok_or_else(|| AuthError::Internal("no free user code in 8 draws".into()))?;
    tx.commit().await?;
    let uri = format!("{}/oauth/device", svc.public_url());
    Ok(no_store(Json(serde_json::json!({
        "device_code": device_code,
        "user_code": display(&code),
        "verification_uri": uri,
        "verification_uri_complete": format!("{uri}?user_code={}", display(&code)),
        "expires_in": cfg.device_code_ttl_secs,
        "interval": cfg.device_poll_interval_secs,
    }))))
}

/// The token endpoint's device_code grant.
pub(crate) async fn poll(
    svc: &AuthService,
    ctx: &Ctx,
    client: &Client,
    device_code: &str,
) -> Result<Response, OAuthError> {
    if device_code.is_empty() || device_code.len() > 256 {
        return Err(OAuthError::grant("the device code is invalid"));
    }
    let db = svc.db();
    let now = now_micros();
    let hash = sha256_hex(device_code.as_bytes());
    let Some((granted_user, granted_scope)) =
        super::tokens::granted(db, "oauth_device_codes", "device_code_hash", &hash).await?
    else {
        return Err(OAuthError::grant("the device code is invalid"));
    };
    // Approved already: what the answer reads, read before the transaction (see
    // `answer_facts`); approved after this read, the next poll answers.
    let facts = match &granted_user {
        Some(u) => Some(svc.answer_facts(client, u, &granted_scope).await?),
        None => None,
    };
    let mut tx = db.begin().await?;
    // the approving user's row, if the code has one yet (see `lock_owner`)
    let owner =
        crate::sessions::lock_owner(db, &mut tx, "oauth_device_codes", "device_code_hash", &hash)
            .await?;
    let r = sqlx::query(&format!(
        "SELECT client_id, scope, status, user_id, auth_time, amr, interval_secs, last_polled_at, \
         expires_at FROM oauth_device_codes WHERE device_code_hash = $1{}",
        db.for_update()
    ))
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(r) = r else {
        return Err(OAuthError::grant("the device code is invalid"));
    };
    let code_client: String = r.try_get("client_id")?;
    if code_client != client.client_id {
        return Err(OAuthError::grant(
            "the device code was issued to another client",
        ));
    }
    let expires_at: i64 = r.try_get("expires_at")?;
    let status: String = r.try_get("status")?;
    if expires_at <= now && status != "used" {
        return Err(OAuthError::new(
            "expired_token",
            "the device code has expired",
        ));
    }
    match status.as_str() {
        "pending" => {
            let interval: i64 = r.try_get("interval_secs")?;
            let last: Option<i64> = r.try_get("last_polled_at")?;
            let too_fast = interval > 0 && last.is_some_and(|l| now - l < secs(interval));
            let new_interval = if too_fast { interval + 5 } else { interval };
            sqlx::query("UPDATE oauth_device_codes SET last_polled_at = $1, interval_secs = $2 WHERE device_code_hash = $3")
                .bind(now)
                .bind(new_interval)
                .bind(&hash)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            if too_fast {
                Err(OAuthError::new(
                    "slow_down",
                    format!("poll at most every {new_interval} seconds"),
                ))
            } else {
                Err(OAuthError::new(
                    "authorization_pending",
                    "the user has not approved yet",
                ))
            }
        }
        "denied" => Err(OAuthError::new(
            "access_denied",
            "the user denied the request",
        )),
        "approved" => {
            let user_id: Option<String> = r.try_get("user_id")?;
            let user_id =
                user_id.ok_or_else(|| AuthError::Internal("approved without a user".into()))?;
            if owner.as_deref() != Some(user_id.as_str())
                || granted_user.as_deref() != Some(user_id.as_str())
            {
                // Approved after this poll locked its user (none, while pending): the
                // user's row was not taken first, so this poll issues nothing; the
                // next one does.
                return Err(OAuthError::new(
                    "authorization_pending",
                    "the user has not approved yet",
                ));
            }
            let scope: String = r.try_get("scope")?;
            let amr: Option<String> = r.try_get("amr")?;
            let auth_time: Option<i64> = r.try_get("auth_time")?;
            let g = Grant {
                client,
                user_id: &user_id,
                scope: &scope,
                nonce: None,
                auth_time: auth_time.unwrap_or(now),
                amr: split_scope(amr.as_deref().unwrap_or("pwd")),
                // approved from the user's own (first-party) session: no provider
                upstream: None,
            };
            let (sid, refresh) = match svc.oauth_session(&mut tx, ctx, &g).await {
                Err(AuthError::ResetRequired) => {
                    return Err(svc.refuse_locked_grant(tx, ctx, &user_id).await)
                }
                r => r?,
            };
            sqlx::query("UPDATE oauth_device_codes SET status = 'used', session_id = $1 WHERE device_code_hash = $2 AND status = 'approved'")
                .bind(&sid)
                .bind(&hash)
                .execute(&mut *tx)
                .await?;
            append(
                db,
                &mut tx,
                &ctx.origin(),
                NewAudit::success("oauth.device_token_issued")
                    .actor(&user_id)
                    .resource(&sid)
                    .metadata(serde_json::json!({ "client_id": client.client_id, "scope": scope })),
            )
            .await?;
            // Made before the commit, as for a code (see `exchange_code`).
            let facts =
                facts.ok_or_else(|| AuthError::Internal("approved without facts".into()))?;
            let body = svc.sign_token_body(&g, &sid, facts).await?;
            tx.commit().await?;
            Ok(super::tokens::token_answer(body, refresh))
        }
        _ => Err(OAuthError::grant("the device code was already used")),
    }
}

impl AuthService {
    /// Approves or denies a pending device code for `user_id`. Attempts are rate
    /// limited per address (user codes are short). False if no such pending code.
    /// `proof`: what allowed it (the device page's password, or the API caller's
    /// session), re-checked in the transaction (see
    /// [`crate::sessions::recheck_authority`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn decide_device(
        &self,
        ctx: &Ctx,
        user_code: &str,
        user_id: &str,
        auth_time: i64,
        amr: &str,
        approve: bool,
        proof: crate::sessions::Proof<'_>,
    ) -> Result<bool, AuthError> {
        vaultpay_web::enforce(
            &*self.limiter(),
            &format!("device:ip:{}", ctx.ip_key()),
            self.config().rate_limits.login_per_ip,
        )
        .await?;
        let code = normalise_user_code(user_code);
        let db = self.db();
        let now = now_micros();
        let mut tx = db.begin().await?;
        crate::sessions::recheck_authority(db, &mut tx, user_id, proof).await?;
        let n = sqlx::query(
            "UPDATE oauth_device_codes SET status = $1, user_id = $2, auth_time = $3, amr = $4 \
             WHERE user_code = $5 AND status = 'pending' AND expires_at > $6",
        )
        .bind(if approve { "approved" } else { "denied" })
        .bind(user_id)
        .bind(auth_time)
        .bind(amr)
        .bind(&code)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n != 1 {
            append(
                db,
                &mut tx,
                &ctx.origin(),
                NewAudit::failure("oauth.device_code_unknown").actor(user_id),
            )
            .await?;
            tx.commit().await?;
            return Ok(false);
        }
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success(if approve {
                "oauth.device_approved"
            } else {
                "oauth.device_denied"
            })
            .actor(user_id)
            .resource(&code),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct ApproveRequest {
    user_code: String,
    #[serde(default)]
    deny: bool,
}

/// Approve (or with `deny: true` refuse) a device code as the signed-in caller.
#[utoipa::path(post, path = "/v1/oauth/device/approve", tag = "oauth", request_body = ApproveRequest,
    responses((status = 200, description = "{status: approved|denied}"), (status = 404, body = vaultpay_proto::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn approve_route(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    ApiJson(req): ApiJson<ApproveRequest>,
) -> Result<Response, ApiError> {
    svc.require_live_session(&p).await?;
    // Only the user's own (first-party) session approves a device: a client the user
    // let act with `api` would otherwise mint a session for another client, with
    // scopes (a refresh token, say) the user never granted it.
    super::require_first_party(&p)?;
    // And a recent authentication, as enrolling a factor needs: an approval mints a
    // refreshable session of its own (up to the absolute session lifetime), so a
    // stolen five-minute access token must not be turned into one. A refusal needs
    // no such proof.
    if !req.deny {
        svc.require_recent_auth(&p).await?;
    }
    let amr = p.claims.amr.join(" ");
    let ok = svc
        .decide_device(
            &ctx,
            &req.user_code,
            p.user_id(),
            p.claims.auth_time * 1_000_000,
            &amr,
            !req.deny,
            crate::sessions::Proof::session(p.session_id()),
        )
        .await?;
    if !ok {
        return Err(ApiError::not_found(
            "device_code_unknown",
            "No pending device request has this code (it may have expired).",
        ));
    }
    Ok(
        Json(serde_json::json!({ "status": if req.deny { "denied" } else { "approved" } }))
            .into_response(),
    )
}

/// The page a person opens on another device (`?user_code=` prefills the code).
#[utoipa::path(get, path = "/oauth/device", tag = "oauth",
    responses((status = 200, description = "Device page (HTML)", content_type = "text/html")))]
pub(crate) async fn device_page(
    State(svc): State<AuthService>,
    ctx: Ctx,
    q: Result<ApiQuery<HashMap<String, String>>, ApiError>,
) -> Response {
    let code = q
        .ok()
        .and_then(|ApiQuery(q)| q.get("user_code").cloned())
        .map(|c| display(&normalise_user_code(&c)))
        .unwrap_or_default();
    let csrf = opaque_token();
    let (status, error, pending) = if code.is_empty() {
        (StatusCode::OK, None, None)
    } else {
        match pending_request(&svc, &ctx, &code).await {
            Ok(Some(p)) => (StatusCode::OK, None, Some(p)),
            Ok(None) => (
                StatusCode::OK,
                Some("No pending request has this code (it may have expired)."),
                None,
            ),
            Err(e) => return ApiError::from(e).into_response(),
        }
    };
    let request = pending.as_ref().map(|(name, scopes)| pages::DeviceRequest {
        client_name: name,
        scopes,
    });
    let mut res = pages::device(status, &csrf, &code, error, request, false);
    set_cookie(&mut res, &svc, CSRF_COOKIE, &csrf, "/oauth/device");
    res
}

/// The client name and scopes of the pending device request with `user_code`, looked
/// up under the same per-address limit as approvals (user codes are short).
async fn pending_request(
    svc: &AuthService,
    ctx: &Ctx,
    user_code: &str,
) -> Result<Option<(String, Vec<String>)>, AuthError> {
    vaultpay_web::enforce(
        &*svc.limiter(),
        &format!("device:ip:{}", ctx.ip_key()),
        svc.config().rate_limits.login_per_ip,
    )
    .await?;
    let row = sqlx::query(
        "SELECT client_id, scope FROM oauth_device_codes \
         WHERE user_code = $1 AND status = 'pending' AND expires_at > $2",
    )
    .bind(normalise_user_code(user_code))
    .bind(now_micros())
    .fetch_optional(svc.db().read())
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let client_id: String = row.try_get("client_id")?;
    let scope: String = row.try_get("scope")?;
    let name = super::clients::get(svc.db(), &client_id)
        .await?
        .map_or(client_id, |c| c.name);
    Ok(Some((name, split_scope(&scope))))
}

#[derive(Debug, Deserialize)]
pub(crate) struct DeviceForm {
    csrf: String,
    user_code: String,
    email: String,
    password: String,
    #[serde(default)]
    otp: Option<String>,
    decision: String,
    /// The code whose request (client and scopes) the page showed, if any.
    #[serde(default)]
    shown: Option<String>,
}

/// The device page's post: sign in and approve or deny.
#[utoipa::path(post, path = "/oauth/device", tag = "oauth",
    responses((status = 200, description = "Result page (HTML)", content_type = "text/html"),
        (status = 400, description = "The page again, or an error page: the form is incomplete, or no pending request has this code", content_type = "text/html"),
        (status = 401, description = "The page again, with the reason: wrong credentials or second-factor code, or the account is locked", content_type = "text/html"),
        (status = 403, description = "Error page: the CSRF check failed", content_type = "text/html")))]
pub(crate) async fn device_submit(
    State(svc): State<AuthService>,
    ctx: Ctx,
    headers: HeaderMap,
    form: Result<ApiForm<DeviceForm>, ApiError>,
) -> Response {
    let Ok(ApiForm(f)) = form else {
        return pages::error(StatusCode::BAD_REQUEST, "The form is incomplete.");
    };
    // Double-submit CSRF check: the cookie this page set must match the form.
    let cookie = read_cookie(&headers, CSRF_COOKIE).unwrap_or_default();
    if cookie.is_empty() || !ct_eq(cookie.as_bytes(), f.csrf.as_bytes()) {
        return pages::error(
            StatusCode::FORBIDDEN,
            "The form is not valid (CSRF check failed).",
        );
    }
    let code = normalise_user_code(&f.user_code);
    let confirmed = f.shown.as_deref().map(normalise_user_code) == Some(code.clone());
    let again = |status: StatusCode, msg: &str| {
        pages::device(status, &f.csrf, &f.user_code, Some(msg), None, confirmed)
    };
    let refused = |e: AuthError| match signin_failure(&e) {
        Some((status, text)) => again(status, text),
        None => ApiError::from(e).into_response(),
    };
    // An approval of a code whose request the page has not shown (typed in, or changed
    // after the page showed another): show what it asks for first, and approve only
    // from that page (RFC 8628 §5.4: a code someone sent would otherwise connect their
    // device unseen). Nothing is signed in yet.
    if f.decision == "approve" && !confirmed {
        let code = display(&code);
        return match pending_request(&svc, &ctx, &code).await {
            Ok(Some((name, scopes))) => pages::device(
                StatusCode::OK,
                &f.csrf,
                &code,
                Some("Check what this device asks for, then sign in and approve."),
                Some(pages::DeviceRequest {
                    client_name: &name,
                    scopes: &scopes,
                }),
                false,
            ),
            Ok(None) => again(
                StatusCode::BAD_REQUEST,
                "No pending request has this code (it may have expired).",
            ),
            Err(e) => refused(e),
        };
    }
    let (user_id, matched) = match svc.check_password(&ctx, &f.email, &f.password).await {
        Ok(u) => u,
        Err(e) => return refused(e),
    };
    let mut amr = "pwd".to_owned();
    let otp = f.otp.as_deref().unwrap_or("").trim();
    if second_factor_required(&svc, &ctx, &user_id, otp.is_empty()).await {
        if otp.is_empty() {
            return again(
                StatusCode::UNAUTHORIZED,
                "Enter your second-factor code (if you get codes by email, one is on its way).",
            );
        }
        if !verify_second_factor(&svc, &ctx, &user_id, otp).await {
            return again(StatusCode::UNAUTHORIZED, "The second-factor code is wrong.");
        }
        amr.push_str(" mfa");
    }
    let approve = f.decision == "approve";
    match svc
        .decide_device(
            &ctx,
            &f.user_code,
            &user_id,
            now_micros(),
            &amr,
            approve,
            crate::sessions::Proof::password(&matched),
        )
        .await
    {
        Ok(true) if approve => pages::message("Device connected", "You can return to your device."),
        Ok(true) => pages::message("Request denied", "The device was not connected."),
        Ok(false) => again(
            StatusCode::BAD_REQUEST,
            "No pending request has this code (it may have expired).",
        ),
        Err(e) => refused(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_codes_are_eight_consonants_and_normalise() {
        let c = user_code();
        assert_eq!(c.len(), 8);
        assert!(c.bytes().all(|b| USER_CODE_ALPHABET.contains(&b)));
        assert_eq!(display("BCDFGHJK"), "BCDF-GHJK");
        assert_eq!(normalise_user_code(" bcdf-ghjk "), "BCDFGHJK");
        assert_eq!(normalise_user_code("BCDF GHJK"), "BCDFGHJK");
    }
}
