//! `POST /oauth/token` (every grant), RFC 7662 introspection and RFC 7009 revocation.

use super::clients::Client;
use super::{
    has_scope, presented_client, split_scope, OAuthError, GRANT_CLIENT_CREDENTIALS, GRANT_CODE,
    GRANT_DEVICE, GRANT_REFRESH,
};
use crate::service::SessionFacts;
use crate::{AuthError, AuthService};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use sqlx::Row;
use vaultpay_core::crypto::{opaque_token, sha256_hex};
use vaultpay_core::jwt::{AccessClaims, Audience};
use vaultpay_core::time::{now_micros, secs};
use vaultpay_store::audit::{append, NewAudit};
use vaultpay_store::Tx;
use vaultpay_web::{ApiError, ApiForm, Ctx};

/// Every field any grant of the token endpoint takes.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct TokenParams {
    pub grant_type: Option<String>,
    pub refresh_token: Option<String>,
    /// First-party refresh: the device id of the session.
    pub device_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub code: Option<String>,
    pub redirect_uri: Option<String>,
    pub code_verifier: Option<String>,
    pub scope: Option<String>,
    pub device_code: Option<String>,
}

pub(crate) fn no_store(res: impl IntoResponse) -> Response {
    let mut res = res.into_response();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    res
}

fn form_error(e: ApiError) -> OAuthError {
    OAuthError::request(e.problem.detail.unwrap_or_default())
}

/// `POST /oauth/token`.
pub(crate) async fn token_endpoint(
    svc: &AuthService,
    ctx: &Ctx,
    headers: &HeaderMap,
    form: Result<ApiForm<TokenParams>, ApiError>,
) -> Result<Response, OAuthError> {
    let ApiForm(f) = form.map_err(form_error)?;
    let presented = presented_client(headers, f.client_id.as_deref(), f.client_secret.as_deref())?;
    match f.grant_type.as_deref() {
        Some(GRANT_REFRESH) => {
            let rt = f
                .refresh_token
                .as_deref()
                .ok_or_else(|| OAuthError::request("refresh_token is required"))?;
            // An OAuth refresh names a registered client (with or without a secret);
            // anything else is the first-party refresh of a device-bound session.
            let oauth = match &presented {
                Some(p) if p.secret.is_some() => true,
                Some(p) => super::clients::get(svc.db(), &p.client_id).await?.is_some(),
                None => false,
            };
            if !oauth {
                let tokens = svc.refresh(ctx, rt, f.device_id.as_deref()).await?;
                return Ok(no_store(Json(tokens)));
            }
            let client = svc.authenticate_client(ctx, presented).await?;
            refresh(svc, ctx, &client, rt, f.scope.as_deref()).await
        }
        Some(GRANT_CODE) => {
            let client = svc.authenticate_client(ctx, presented).await?;
            if !client.allows_grant(GRANT_CODE) {
                return Err(OAuthError::new(
                    "unauthorized_client",
                    "this client may not use the authorization code grant",
                ));
            }
            exchange_code(svc, ctx, &client, &f).await
        }
        Some(GRANT_CLIENT_CREDENTIALS) => {
            let client = svc.authenticate_client(ctx, presented).await?;
            client_credentials(svc, ctx, &client, f.scope.as_deref()).await
        }
        Some(GRANT_DEVICE) => {
            let client = svc.authenticate_client(ctx, presented).await?;
            if !client.allows_grant(GRANT_DEVICE) {
                return Err(OAuthError::new(
                    "unauthorized_client",
                    "this client may not use the device grant",
                ));
            }
            let dc = f
                .device_code
                .as_deref()
                .ok_or_else(|| OAuthError::request("device_code is required"))?;
            super::device::poll(svc, ctx, &client, dc).await
        }
        Some(other) => Err(OAuthError::new(
            "unsupported_grant_type",
            format!(
                "grant_type `{}` is not supported",
                other.chars().take(64).collect::<String>()
            ),
        )),
        None => Err(OAuthError::request("grant_type is required")),
    }
}

/// The device id OAuth sessions carry (so first-party refresh can never match them).
pub(crate) fn oauth_device(client_id: &str) -> String {
    format!("oauth:{client_id}")
}

/// What a grant hands out for a user.
pub(crate) struct Grant<'a> {
    pub client: &'a Client,
    pub user_id: &'a str,
    pub scope: &'a str,
    pub nonce: Option<String>,
    pub auth_time: i64,
    pub amr: Vec<String>,
    /// The upstream provider the user signed in through, if any (kept on the session:
    /// unlinking the provider ends it).
    pub upstream: Option<String>,
}

impl AuthService {
    /// Creates an OAuth session in `tx` (refresh token only with `offline_access`).
    /// Returns (session id, refresh token). Refuses an account locked by "this wasn't
    /// me" with `AuthError::ResetRequired` (see [`Self::refuse_locked_grant`]): a code or
    /// device approval issued before the lock opens no session after it. The lock is
    /// read under the user row's lock, which orders this with the lock's own
    /// transaction as for a password sign-in (`sessions::sign_in_check_sql`).
    pub(crate) async fn oauth_session(
        &self,
        tx: &mut Tx,
        ctx: &Ctx,
        g: &Grant<'_>,
    ) -> Result<(String, Option<String>), AuthError> {
        match crate::sessions::security_locked_in(&self.inner.db, tx, g.user_id).await? {
            Some(false) => {}
            Some(true) => return Err(AuthError::ResetRequired),
            None => {
                return Err(AuthError::OAuth(
                    "invalid_grant",
                    "the account no longer exists".into(),
                ))
            }
        }
        let cfg = self.config();
        let now = now_micros();
        let sid = uuid::Uuid::now_v7().to_string();
        let expires = now + secs(cfg.session_absolute_ttl_secs);
        let idle = (now + secs(cfg.session_idle_ttl_secs)).min(expires);
        sqlx::query(
            "INSERT INTO sessions (id, user_id, device_id, device_name, ip, user_agent, created_at, last_seen_at, \
             idle_expires_at, expires_at, auth_time, amr, client_id, scope, upstream_provider) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(&sid)
        .bind(g.user_id)
        .bind(oauth_device(&g.client.client_id))
        .bind(&g.client.name)
        .bind(ctx.ip.map(|i| i.to_string()))
        .bind(&ctx.user_agent)
        .bind(now)
        .bind(idle)
        .bind(expires)
        .bind(g.auth_time)
        .bind(g.amr.join(" "))
        .bind(&g.client.client_id)
        .bind(g.scope)
        .bind(&g.upstream)
        .execute(&mut **tx)
        .await?;
        let refresh = if has_scope(g.scope, "offline_access")
            && g.client.allows_grant(GRANT_REFRESH)
        {
            let token = opaque_token();
            sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)")
                .bind(sha256_hex(token.as_bytes()))
                .bind(&sid)
                .bind(now)
                .execute(&mut **tx)
                .await?;
            Some(token)
        } else {
            None
        };
        Ok((sid, refresh))
    }

    /// Answers a grant that [`Self::oauth_session`] refused for a "this wasn't me" lock:
    /// rolls `tx` back (SQLite's one writer is needed for the audit), audits the refusal
    /// and returns `invalid_grant`.
    pub(crate) async fn refuse_locked_grant(&self, tx: Tx, ctx: &Ctx, user_id: &str) -> OAuthError {
        if let Err(e) = tx.rollback().await {
            return AuthError::from(e).into();
        }
        match self.refuse_security_locked(ctx, user_id).await {
            AuthError::ResetRequired => {
                OAuthError::grant("the account is locked until its password is reset")
            }
            other => other.into(),
        }
    }

    /// Signs an access token for an OAuth session or a client.
    pub(crate) fn oauth_access(
        &self,
        facts: &SessionFacts,
        roles: Vec<String>,
        scope: &str,
        client_id: &str,
        ttl: i64,
    ) -> Result<String, AuthError> {
        let now = now_micros() / 1_000_000;
        let claims = AccessClaims {
            iss: self.config().issuer.clone(),
            sub: facts.user_id.clone(),
            aud: Audience::One(self.config().audience.clone()),
            exp: now + ttl,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::now_v7().to_string(),
            sid: facts.session_id.clone(),
            roles,
            device_id: facts.device_id.clone(),
            auth_time: facts.auth_time / 1_000_000,
            amr: facts.amr.clone(),
            acr: vaultpay_core::step_up::acr_for(&facts.amr),
            scope: Some(scope.to_owned()),
            client_id: Some(client_id.to_owned()),
        };
        let signer = self.inner.signer.read().clone();
        metrics::counter!("auth_tokens_issued_total", "kind" => "oauth_access").increment(1);
        signer
            .sign_access(&claims)
            .map_err(|e| AuthError::Internal(e.to_string()))
    }

    /// The token response of a user grant without its refresh token (see
    /// [`token_answer`]).
    pub(crate) async fn user_token_body(
        &self,
        g: &Grant<'_>,
        session_id: &str,
    ) -> Result<serde_json::Value, AuthError> {
        let facts = self.answer_facts(g.client, g.user_id, g.scope).await?;
        self.sign_token_body(g, session_id, facts).await
    }

    /// What a user grant's answer reads (roles with `api`, the profile with `openid`,
    /// an ES256 key made on first use), read before a grant's transaction: on
    /// PostgreSQL reads share the writer's pool, and a read inside a transaction that
    /// holds the audit chain's lock could wait for a connection held by a transaction
    /// waiting for that lock; on SQLite, creating the ES256 key would wait for the
    /// transaction's own connection.
    pub(crate) async fn answer_facts(
        &self,
        client: &Client,
        user_id: &str,
        scope: &str,
    ) -> Result<AnswerFacts, AuthError> {
        let openid = has_scope(scope, "openid");
        if openid && client.id_token_alg == "ES256" {
            self.es256().await?;
        }
        // Roles ride in an OAuth token only when the user granted `api`.
        let roles = if has_scope(scope, "api") {
            self.effective(user_id).await?.roles.clone()
        } else {
            Vec::new()
        };
        let profile = if openid {
            Some(self.profile(user_id, scope).await?)
        } else {
            None
        };
        Ok(AnswerFacts {
            user_id: user_id.to_owned(),
            roles,
            profile,
        })
    }

    /// Signs a user grant's tokens from `facts` (no database read).
    pub(crate) async fn sign_token_body(
        &self,
        g: &Grant<'_>,
        session_id: &str,
        facts: AnswerFacts,
    ) -> Result<serde_json::Value, AuthError> {
        if facts.user_id != g.user_id {
            return Err(AuthError::Internal("token facts of another user".into()));
        }
        let session = SessionFacts {
            user_id: g.user_id.to_owned(),
            session_id: session_id.to_owned(),
            device_id: oauth_device(&g.client.client_id),
            auth_time: g.auth_time,
            amr: g.amr.clone(),
        };
        let ttl = self.config().access_token_ttl_secs;
        let access = self.oauth_access(&session, facts.roles, g.scope, &g.client.client_id, ttl)?;
        let mut body = serde_json::json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ttl,
            "scope": g.scope,
        });
        if let Some(profile) = facts.profile {
            body["id_token"] = self
                .id_token(
                    g.client,
                    g.user_id,
                    session_id,
                    profile,
                    g.nonce.clone(),
                    g.auth_time,
                    g.amr.clone(),
                )
                .await?
                .into();
        }
        Ok(body)
    }
}

/// What [`AuthService::answer_facts`] read for a user's grant.
pub(crate) struct AnswerFacts {
    user_id: String,
    roles: Vec<String>,
    profile: Option<super::oidc::Profile>,
}

/// The user (none before a device code is approved) and scope of the code or device
/// code `hash` in `column` of `table`, read without a write transaction: one that was
/// never issued (a guess, a flood of them) is refused without taking the writer (on
/// SQLite, the only one) that a real one needs. Both are fixed once set.
pub(crate) async fn granted(
    db: &vaultpay_store::Db,
    table: &'static str,
    column: &'static str,
    hash: &str,
) -> Result<Option<(Option<String>, String)>, AuthError> {
    let row = sqlx::query(&format!(
        "SELECT user_id, scope FROM {table} WHERE {column} = $1"
    ))
    .bind(hash)
    .fetch_optional(db.read())
    .await?;
    Ok(match row {
        Some(r) => Some((r.try_get("user_id")?, r.try_get("scope")?)),
        None => None,
    })
}

async fn exchange_code(
    svc: &AuthService,
    ctx: &Ctx,
    client: &Client,
    f: &TokenParams,
) -> Result<Response, OAuthError> {
    let code = f
        .code
        .as_deref()
        .filter(|c| !c.is_empty() && c.len() <= 256)
        .ok_or_else(|| OAuthError::request("code is required"))?;
    let db = svc.db();
    let now = now_micros();
    let code_hash = sha256_hex(code.as_bytes());
    let Some((Some(granted_user), granted_scope)) =
        granted(db, "oauth_codes", "code_hash", &code_hash).await?
    else {
        return Err(OAuthError::grant("the authorization code is invalid"));
    };
    let facts = svc
        .answer_facts(client, &granted_user, &granted_scope)
        .await?;
    let mut tx = db.begin().await?;
    let owner =
        crate::sessions::lock_owner(db, &mut tx, "oauth_codes", "code_hash", &code_hash).await?;
    let r = sqlx::query(&format!(
        "SELECT client_id, user_id, redirect_uri, scope, nonce, code_challenge, auth_time, amr, expires_at, \
         used_at, session_id, upstream_provider FROM oauth_codes WHERE code_hash = $1{}",
        db.for_update()
    ))
    .bind(&code_hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(r) = r else {
        return Err(OAuthError::grant("the authorization code is invalid"));
    };
    let code_client: String = r.try_get("client_id")?;
    let user_id: String = r.try_get("user_id")?;
    if owner.as_deref() != Some(user_id.as_str()) {
        // the account is gone
        return Err(OAuthError::grant("the authorization code is invalid"));
    }
    let used_at: Option<i64> = r.try_get("used_at")?;
    if used_at.is_some() {
        // Replay: whoever holds this code is not (only) the client. Revoke what it gave.
        let sid: Option<String> = r.try_get("session_id")?;
        if let Some(sid) = &sid {
            sqlx::query("UPDATE sessions SET revoked_at = $1, revoked_reason = 'code_reuse' WHERE id = $2 AND revoked_at IS NULL")
                .bind(now)
                .bind(sid)
                .execute(&mut *tx)
                .await?;
        }
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::failure("oauth.code_reuse")
                .actor(&user_id)
                .resource(&code_client)
                .metadata(serde_json::json!({ "session_revoked": sid })),
        )
        .await?;
        tx.commit().await?;
        svc.sessions_changed(Some(&user_id)).await;
        metrics::counter!("auth_oauth_code_reuse_total").increment(1);
        return Err(OAuthError::grant(
            "the authorization code was already used; the tokens issued from it have been revoked",
        ));
    }
    if code_client != client.client_id {
        return Err(OAuthError::grant(
            "the authorization code was issued to another client",
        ));
    }
    let expires_at: i64 = r.try_get("expires_at")?;
    if expires_at <= now {
        return Err(OAuthError::grant("the authorization code has expired"));
    }
    let redirect_uri: String = r.try_get("redirect_uri")?;
    let redirect_ok = if redirect_uri.is_empty() {
        // The request named none: the token request may omit it or name the one used.
        f.redirect_uri
            .as_deref()
            .is_none_or(|u| client.redirect_uris.len() == 1 && client.redirect_uris[0] == u)
    } else {
        f.redirect_uri.as_deref() == Some(redirect_uri.as_str())
    };
    if !redirect_ok {
        return Err(OAuthError::grant(
            "redirect_uri does not match the authorization request",
        ));
    }
    let challenge: Option<String> = r.try_get("code_challenge")?;
    match (&challenge, f.code_verifier.as_deref()) {
        (Some(c), Some(v))
            if super::authorize::pkce_shape_ok(v) && super::authorize::pkce_s256_ok(v, c) => {}
        (Some(_), Some(_)) => return Err(OAuthError::grant("PKCE verification failed")),
        (Some(_), None) => return Err(OAuthError::grant("code_verifier is required")),
        (None, Some(_)) => {
            return Err(OAuthError::grant(
                "no code_challenge was sent with this authorization",
            ))
        }
        (None, None) => {}
    }
    let scope: String = r.try_get("scope")?;
    if scope != granted_scope || user_id != granted_user {
        // Fixed when the code is issued: the answer's facts were read for these.
        return Err(OAuthError::grant("the authorization code is invalid"));
    }
    let amr: String = r.try_get("amr")?;
    let g = Grant {
        client,
        user_id: &user_id,
        scope: &scope,
        nonce: r.try_get("nonce")?,
        auth_time: r.try_get("auth_time")?,
        amr: split_scope(&amr),
        upstream: r.try_get("upstream_provider")?,
    };
    let (sid, refresh) = match svc.oauth_session(&mut tx, ctx, &g).await {
        Err(AuthError::ResetRequired) => {
            return Err(svc.refuse_locked_grant(tx, ctx, &user_id).await)
        }
        r => r?,
    };
    let n = sqlx::query("UPDATE oauth_codes SET used_at = $1, session_id = $2 WHERE code_hash = $3 AND used_at IS NULL")
        .bind(now)
        .bind(&sid)
        .bind(&code_hash)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if n != 1 {
        return Err(OAuthError::grant("the authorization code is invalid"));
    }
    append(
        db,
        &mut tx,
        &ctx.origin(),
        NewAudit::success("oauth.code_exchanged")
            .actor(&user_id)
            .resource(&sid)
            .metadata(serde_json::json!({ "client_id": client.client_id, "scope": scope })),
    )
    .await?;
    // The answer is made before the commit: a failure making it after the code is spent
    // would make the client's retry a replay, which revokes the session.
    let body = svc.sign_token_body(&g, &sid, facts).await?;
    tx.commit().await?;
    Ok(token_answer(body, refresh))
}

/// Whether a row with `hash` in `column` exists, read without a write transaction: a
/// code or device code that was never issued (a guess, a flood of them) is refused
/// without taking the writer (on SQLite, the only one) that a real one needs.
pub(crate) async fn code_exists(
    db: &vaultpay_store::Db,
    table: &'static str,
    column: &'static str,
    hash: &str,
) -> Result<bool, AuthError> {
    Ok(
        sqlx::query(&format!("SELECT 1 FROM {table} WHERE {column} = $1"))
            .bind(hash)
            .fetch_optional(db.read())
            .await?
            .is_some(),
    )
}

/// A user grant's token response: `body` plus its refresh token, if any.
pub(crate) fn token_answer(mut body: serde_json::Value, refresh: Option<String>) -> Response {
    if let Some(r) = refresh {
        body["refresh_token"] = r.into();
    }
    no_store(Json(body))
}

async fn refresh(
    svc: &AuthService,
    ctx: &Ctx,
    client: &Client,
    token: &str,
    scope: Option<&str>,
) -> Result<Response, OAuthError> {
    if !client.allows_grant(GRANT_REFRESH) {
        return Err(OAuthError::new(
            "unauthorized_client",
            "this client may not use refresh tokens",
        ));
    }
    // The answer is made before the token is rotated: once the rotation commits the
    // old token is spent, and a failure after it (a scope beyond the grant, a database
    // read timing out under load) would make the client's retry with the same token a
    // reuse that ends the session. A token of another client's session gets no answer
    // made: its rotation is refused, and ends that session. (A step-up between the
    // session's reading and the rotation shows in the next refresh's tokens.)
    let start = svc
        .start_refresh(
            ctx,
            token,
            Some(&oauth_device(&client.client_id)),
            Some(&client.client_id),
        )
        .await?;
    let prepared = if start.client_id.as_deref() == Some(client.client_id.as_str()) {
        Some(refresh_body(svc, client, &start, scope).await?)
    } else {
        None
    };
    let rotated = svc
        .rotate_refresh(start.rotation, &start.facts.user_id)
        .await?;
    let mut body = prepared
        .ok_or_else(|| AuthError::Internal("a refresh rotated for another client".into()))?;
    body["refresh_token"] = rotated.refresh_token.into();
    Ok(no_store(Json(body)))
}

/// A refresh's answer (without its refresh token) for the session `start` read. A
/// scope beyond the session's grant is refused; a narrower one is the new access
/// token's (RFC 6749 §6), while the session keeps its whole grant for later refreshes.
async fn refresh_body(
    svc: &AuthService,
    client: &Client,
    start: &crate::sessions::RefreshStart,
    scope: Option<&str>,
) -> Result<serde_json::Value, OAuthError> {
    let granted = start.scope.clone().unwrap_or_default();
    let scope = match scope.map(super::requested_scope).transpose()? {
        Some(s) if s.iter().any(|x| !has_scope(&granted, x)) => {
            return Err(OAuthError::new(
                "invalid_scope",
                "the scope exceeds what was granted",
            ));
        }
        Some(s) => s.join(" "),
        None => granted,
    };
    let f = &start.facts;
    let g = Grant {
        client,
        user_id: &f.user_id,
        scope: &scope,
        nonce: None,
        auth_time: f.auth_time,
        amr: f.amr.clone(),
        upstream: None, // (a refresh opens no session)
    };
    Ok(svc.user_token_body(&g, &f.session_id).await?)
}

async fn client_credentials(
    svc: &AuthService,
    ctx: &Ctx,
    client: &Client,
    scope: Option<&str>,
) -> Result<Response, OAuthError> {
    if client.public || !client.allows_grant(GRANT_CLIENT_CREDENTIALS) {
        return Err(OAuthError::new(
            "unauthorized_client",
            "this client may not use client_credentials",
        ));
    }
    let requested = scope
        .map(super::requested_scope)
        .transpose()?
        .unwrap_or_default();
    for s in &requested {
        // No user: openid, offline_access and api (user roles) mean nothing here.
        if !client.allows_scope(s)
            || matches!(
                s.as_str(),
                "openid" | "offline_access" | "api" | "profile" | "email"
            )
        {
            return Err(OAuthError::new(
                "invalid_scope",
                format!(
                    "scope `{}` is not allowed for this client",
                    s.chars().take(64).collect::<String>()
                ),
            ));
        }
    }
    let scope = requested.join(" ");
    let cfg = svc.config();
    let ttl = if cfg.oauth.client_credentials_ttl_secs > 0 {
        cfg.oauth.client_credentials_ttl_secs
    } else {
        cfg.access_token_ttl_secs
    };
    let facts = SessionFacts {
        user_id: client.client_id.clone(),
        session_id: String::new(),
        device_id: String::new(),
        auth_time: now_micros(),
        amr: Vec::new(),
    };
    let access = svc.oauth_access(&facts, Vec::new(), &scope, &client.client_id, ttl)?;
    let _ = ctx;
    Ok(no_store(Json(serde_json::json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": ttl,
        "scope": scope,
    }))))
}

/// Introspection and revocation form.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct TokenOnlyForm {
    pub token: Option<String>,
    pub token_type_hint: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    /// For the ledger: the address of the end user's request at the resource server;
    /// the token is reported inactive when it is outside the user's trusted networks.
    pub client_ip: Option<String>,
}

/// What a token is, for introspection and revocation.
enum Found {
    Access(Box<AccessClaims>),
    Refresh {
        session_id: String,
        user_id: String,
        client_id: Option<String>,
        scope: Option<String>,
        live: bool,
    },
    Unknown,
}

async fn find(svc: &AuthService, token: &str) -> Result<Found, AuthError> {
    if token.is_empty() || token.len() > 8192 {
        return Ok(Found::Unknown);
    }
    if token.matches('.').count() == 2 {
        if let Ok(c) = svc.verifier().verify(token).await {
            return Ok(Found::Access(Box::new(c)));
        }
        return Ok(Found::Unknown);
    }
    if token.len() > 256 {
        return Ok(Found::Unknown);
    }
    let r = sqlx::query(
        "SELECT r.session_id AS session_id, r.used_at AS used_at, s.user_id AS user_id, s.client_id AS client_id, \
         s.scope AS scope, s.revoked_at AS revoked_at, s.expires_at AS expires_at, s.idle_expires_at AS idle_expires_at \
         FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id WHERE r.token_hash = $1",
    )
    .bind(sha256_hex(token.as_bytes()))
    .fetch_optional(svc.db().read())
    .await?;
    let Some(r) = r else {
        return Ok(Found::Unknown);
    };
    let now = now_micros();
    let used: Option<i64> = r.try_get("used_at")?;
    let revoked: Option<i64> = r.try_get("revoked_at")?;
    let exp: i64 = r.try_get("expires_at")?;
    let idle: i64 = r.try_get("idle_expires_at")?;
    Ok(Found::Refresh {
        session_id: r.try_get("session_id")?,
        user_id: r.try_get("user_id")?,
        client_id: r.try_get("client_id")?,
        scope: r.try_get("scope")?,
        live: used.is_none() && revoked.is_none() && exp > now && idle > now,
    })
}

pub(crate) async fn jti_revoked(svc: &AuthService, jti: &str) -> Result<bool, AuthError> {
    svc.inner.oauth.revoked.contains(svc.db(), jti).await
}

/// RFC 7662 for an authenticated OAuth client: only its own tokens are active to it.
pub(crate) async fn introspect_for_client(
    svc: &AuthService,
    ctx: &Ctx,
    headers: &HeaderMap,
    form: Result<ApiForm<TokenOnlyForm>, ApiError>,
) -> Result<Response, OAuthError> {
    let presented = match &form {
        Ok(ApiForm(f)) => {
            presented_client(headers, f.client_id.as_deref(), f.client_secret.as_deref())?
        }
        Err(_) => presented_client(headers, None, None)?,
    };
    let client = svc.authenticate_client(ctx, presented).await?;
    if client.public {
        return Err(OAuthError::invalid_client(
            "public clients cannot introspect",
        ));
    }
    let ApiForm(f) = form.map_err(form_error)?;
    let token = f
        .token
        .ok_or_else(|| OAuthError::request("token is required"))?;
    let inactive = || no_store(Json(serde_json::json!({ "active": false })));
    match find(svc, &token).await? {
        Found::Access(c) => {
            if c.client_id.as_deref() != Some(client.client_id.as_str()) {
                return Ok(inactive());
            }
            let live = if c.sid.is_empty() {
                !jti_revoked(svc, &c.jti).await?
            } else {
                svc.session_live(&c.sid, &c.sub).await?
            };
            if !live {
                return Ok(inactive());
            }
            Ok(no_store(Json(serde_json::json!({
                "active": true,
                "scope": c.scope.unwrap_or_default(),
                "client_id": client.client_id,
                "sub": c.sub,
                "token_type": "Bearer",
                "exp": c.exp,
                "iat": c.iat,
                "nbf": c.nbf,
                "iss": c.iss,
                "aud": c.aud,
                "jti": c.jti,
                "sid": (!c.sid.is_empty()).then_some(c.sid),
            }))))
        }
        Found::Refresh {
            user_id,
            client_id,
            scope,
            live,
            session_id,
        } => {
            if !live || client_id.as_deref() != Some(client.client_id.as_str()) {
                return Ok(inactive());
            }
            Ok(no_store(Json(serde_json::json!({
                "active": true,
                "scope": scope.unwrap_or_default(),
                "client_id": client.client_id,
                "sub": user_id,
                "token_type": "refresh_token",
                "sid": session_id,
            }))))
        }
        Found::Unknown => Ok(inactive()),
    }
}

/// `POST /oauth/revoke` (RFC 7009): revokes the client's own token (the whole session
/// for session tokens); unknown or foreign tokens are answered 200 all the same.
#[utoipa::path(post, path = "/oauth/revoke", tag = "oauth",
    request_body(content = TokenOnlyForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200), (status = 401, body = vaultpay_proto::auth::OAuthError)))]
pub(crate) async fn revoke(
    State(svc): State<AuthService>,
    ctx: Ctx,
    headers: HeaderMap,
    form: Result<ApiForm<TokenOnlyForm>, ApiError>,
) -> Result<Response, OAuthError> {
    let presented = match &form {
        Ok(ApiForm(f)) => {
            presented_client(&headers, f.client_id.as_deref(), f.client_secret.as_deref())?
        }
        Err(_) => presented_client(&headers, None, None)?,
    };
    let client = svc.authenticate_client(&ctx, presented).await?;
    let ApiForm(f) = form.map_err(form_error)?;
    let token = f
        .token
        .ok_or_else(|| OAuthError::request("token is required"))?;
    let db = svc.db();
    match find(&svc, &token).await? {
        Found::Access(c) if c.client_id.as_deref() == Some(client.client_id.as_str()) => {
            if c.sid.is_empty() {
                // A revoked client-credentials token is kept (and reloaded by every
                // replica) until it expires: limited per client. Users' sign-outs are
                // not charged (a public client's id is no secret).
                vaultpay_web::enforce(
                    &*svc.limiter(),
                    &format!("oauth:revoke:client:{}", client.client_id),
                    svc.config().rate_limits.oauth_revoke_per_client,
                )
                .await?;
            }
            let mut tx = db.begin().await?;
            if c.sid.is_empty() {
                sqlx::query(&format!(
                    "INSERT INTO oauth_revoked_tokens (jti, expires_at) VALUES ($1, $2) {}",
                    "ON CONFLICT (jti) DO NOTHING"
                ))
                .bind(&c.jti)
                .bind(c.exp * 1_000_000)
                .execute(&mut *tx)
                .await
                .map_err(AuthError::from)?;
            } else {
                revoke_session(&mut tx, &c.sid).await?;
            }
            append(
                db,
                &mut tx,
                &ctx.origin(),
                NewAudit::success("oauth.token_revoked")
                    .actor(&client.client_id)
                    .resource(if c.sid.is_empty() { &c.jti } else { &c.sid })
                    .metadata(serde_json::json!({ "token_type": "access_token" })),
            )
            .await?;
            tx.commit().await.map_err(AuthError::from)?;
            if c.sid.is_empty() {
                svc.inner.oauth.revoked.insert(&c.jti, c.exp * 1_000_000);
            } else {
                svc.sessions_changed(Some(&c.sub)).await;
            }
        }
        Found::Refresh {
            session_id,
            user_id,
            client_id,
            ..
        } if client_id.as_deref() == Some(client.client_id.as_str()) => {
            let mut tx = db.begin().await?;
            revoke_session(&mut tx, &session_id).await?;
            append(
                db,
                &mut tx,
                &ctx.origin(),
                NewAudit::success("oauth.token_revoked")
                    .actor(&client.client_id)
                    .resource(&session_id)
                    .metadata(serde_json::json!({ "token_type": "refresh_token" })),
            )
            .await?;
            tx.commit().await.map_err(AuthError::from)?;
            svc.sessions_changed(Some(&user_id)).await;
        }
        _ => {}
    }
    Ok(no_store(StatusCode::OK))
}

async fn revoke_session(tx: &mut Tx, sid: &str) -> Result<(), AuthError> {
    sqlx::query("UPDATE sessions SET revoked_at = $1, revoked_reason = 'oauth_revoke' WHERE id = $2 AND revoked_at IS NULL")
        .bind(now_micros())
        .bind(sid)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
