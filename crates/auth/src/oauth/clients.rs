//! Registered OAuth clients: `POST/GET /v1/admin/clients`, `DELETE
//! /v1/admin/clients/{id}` (permission `clients:manage`) and the functions the CLI uses.

use super::{GRANTS, GRANT_CLIENT_CREDENTIALS, GRANT_CODE, SCOPES};
use crate::{AuthError, AuthService};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use vaultpay_core::crypto::{opaque_token, random_token, sha256_hex, Envelope};
use vaultpay_core::time::{now_micros, rfc3339};
use vaultpay_store::audit::{append, NewAudit, Origin};
use vaultpay_store::Db;
use vaultpay_web::{ApiError, ApiJson, Ctx, Principal};

/// A registered client.
#[derive(Debug, Clone)]
pub struct Client {
    pub client_id: String,
    pub secret_hash: Option<String>,
    pub name: String,
    pub redirect_uris: Vec<String>,
    pub grant_types: Vec<String>,
    pub scopes: Vec<String>,
    pub public: bool,
    pub id_token_alg: String,
    pub created_at: i64,
}

impl Client {
    pub fn allows_grant(&self, grant: &str) -> bool {
        self.grant_types.iter().any(|g| g == grant)
    }

    pub fn allows_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// The registered redirect URI `uri` matches: exactly, or for a loopback
    /// registration (`http://127.0.0.1:…` / `http://[::1]:…`) with any port (RFC 8252 §7.3).
    pub fn redirect_matches(&self, uri: &str) -> bool {
        self.redirect_uris
            .iter()
            .any(|r| r == uri || loopback_match(r, uri))
    }

    pub fn view(&self) -> ClientView {
        ClientView {
            client_id: self.client_id.clone(),
            name: self.name.clone(),
            redirect_uris: self.redirect_uris.clone(),
            grant_types: self.grant_types.clone(),
            scopes: self.scopes.clone(),
            public: self.public,
            id_token_alg: self.id_token_alg.clone(),
            created_at: rfc3339(self.created_at),
        }
    }
}

/// `(host, rest)` of a loopback `http` URI with its port removed.
fn loopback_parts(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("http://")?;
    let (host, after) = if let Some(r) = rest.strip_prefix("127.0.0.1") {
        ("127.0.0.1", r)
    } else if let Some(r) = rest.strip_prefix("[::1]") {
        ("[::1]", r)
    } else {
        return None;
    };
    let after = match after.strip_prefix(':') {
        Some(p) => {
            let end = p.find(|c: char| !c.is_ascii_digit()).unwrap_or(p.len());
            if end == 0 || end > 5 {
                return None;
            }
            &p[end..]
        }
        None => after,
    };
    if !(after.is_empty() || after.starts_with('/') || after.starts_with('?')) {
        return None;
    }
    Some((host, after))
}

fn loopback_match(registered: &str, uri: &str) -> bool {
    match (loopback_parts(registered), loopback_parts(uri)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// What an administrator registers.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewClient {
    pub name: String,
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    /// Default: authorization_code and refresh_token.
    #[serde(default)]
    pub grant_types: Option<Vec<String>>,
    /// Default: openid profile email offline_access.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// A public client (native app, SPA, CLI) has no secret and must use PKCE.
    #[serde(default)]
    pub public: bool,
    /// `EdDSA` (default) or `ES256`.
    #[serde(default)]
    pub id_token_alg: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClientView {
    pub client_id: String,
    pub name: String,
    pub redirect_uris: Vec<String>,
    pub grant_types: Vec<String>,
    pub scopes: Vec<String>,
    pub public: bool,
    pub id_token_alg: String,
    pub created_at: String,
}

/// A new client; the secret is shown here once and stored only as its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedClient {
    #[serde(flatten)]
    pub client: ClientView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClientList {
    pub clients: Vec<ClientView>,
}

fn invalid(detail: impl Into<String>) -> AuthError {
    AuthError::Invalid("invalid_client_metadata", detail.into())
}

/// `http://localhost`, optionally with a port, then nothing or a path: not
/// `http://localhost.evil.example/` nor `http://localhost@evil.example/`.
fn is_localhost(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("http://localhost") else {
        return false;
    };
    let (port, _) = rest.split_once('/').unwrap_or((rest, ""));
    match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(p) => !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()),
    }
}

fn valid_redirect(uri: &str) -> bool {
    if uri.len() > 2000
        || uri.contains('#')
        || uri.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return false;
    }
    if let Some(rest) = uri.strip_prefix("https://") {
        return !rest.is_empty() && !rest.starts_with('/');
    }
    if loopback_parts(uri).is_some() || is_localhost(uri) {
        return true;
    }
    // A private-use scheme of a native app (RFC 8252 §7.1): reverse domain name.
    match uri.split_once(':') {
        Some((scheme, rest)) => {
            scheme.contains('.')
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'))
                && !rest.is_empty()
        }
        None => false,
    }
}

fn check(new: &NewClient) -> Result<(Vec<String>, Vec<String>, String), AuthError> {
    let name = new.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(invalid("name must be 1–100 printable characters"));
    }
    let grants = new
        .grant_types
        .clone()
        .unwrap_or_else(|| vec![GRANT_CODE.into(), super::GRANT_REFRESH.into()]);
    if grants.is_empty() {
        return Err(invalid("at least one grant type is needed"));
    }
    for g in &grants {
        if !GRANTS.contains(&g.as_str()) {
            return Err(invalid(format!(
                "unknown grant type `{}`",
                g.chars().take(80).collect::<String>()
            )));
        }
    }
    if new.public && grants.iter().any(|g| g == GRANT_CLIENT_CREDENTIALS) {
        return Err(invalid("a public client cannot use client_credentials"));
    }
    if grants.iter().any(|g| g == GRANT_CODE) && new.redirect_uris.is_empty() {
        return Err(invalid(
            "authorization_code needs at least one redirect URI",
        ));
    }
    if new.redirect_uris.len() > 20 {
        return Err(invalid("at most 20 redirect URIs"));
    }
    for u in &new.redirect_uris {
        if !valid_redirect(u) {
            return Err(invalid(format!(
                "redirect URI `{}` must be https, a loopback http URI or a private-use scheme, without a fragment",
                u.chars().take(200).collect::<String>()
            )));
        }
    }
    // Default scopes are the user ones, for clients that act for users; a client that
    // only uses client_credentials acts for itself and gets none by default.
    let service_only = grants.iter().all(|g| g == GRANT_CLIENT_CREDENTIALS);
    let scopes = new.scopes.clone().unwrap_or_else(|| {
        if service_only {
            return Vec::new();
        }
        ["openid", "profile", "email", "offline_access"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    });
    for s in &scopes {
        if !SCOPES.contains(&s.as_str()) {
            return Err(invalid(format!(
                "unknown scope `{}`",
                s.chars().take(80).collect::<String>()
            )));
        }
        // Every scope there is concerns a user; a client that only acts for itself
        // could never be granted one (`/oauth/token` refuses them), so say so now.
        if service_only {
            return Err(invalid(format!(
                "scope `{}` concerns a user: a client_credentials-only client acts for \
                 itself (its tokens carry no user and no roles) and takes no scopes",
                s.chars().take(80).collect::<String>()
            )));
        }
    }
    let alg = new.id_token_alg.clone().unwrap_or_else(|| "EdDSA".into());
    if alg != "EdDSA" && alg != "ES256" {
        return Err(invalid("id_token_alg must be EdDSA or ES256"));
    }
    Ok((grants, scopes, alg))
}

fn from_row(r: &sqlx::any::AnyRow) -> Result<Client, sqlx::Error> {
    let uris: String = r.try_get("redirect_uris")?;
    let grants: String = r.try_get("grant_types")?;
    let scopes: String = r.try_get("scopes")?;
    let public: i64 = r.try_get("public")?;
    Ok(Client {
        client_id: r.try_get("client_id")?,
        secret_hash: r.try_get("secret_hash")?,
        name: r.try_get("name")?,
        redirect_uris: serde_json::from_str(&uris).unwrap_or_default(),
        grant_types: super::split_scope(&grants),
        scopes: super::split_scope(&scopes),
        public: public != 0,
        id_token_alg: r.try_get("id_token_alg")?,
        created_at: r.try_get("created_at")?,
    })
}

const COLUMNS: &str =
    "client_id, secret_hash, name, redirect_uris, grant_types, scopes, public, id_token_alg, created_at";

/// One client by id.
pub async fn get(db: &Db, client_id: &str) -> Result<Option<Client>, AuthError> {
    let r = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM oauth_clients WHERE client_id = $1"
    ))
    .bind(client_id)
    .fetch_optional(db.read())
    .await?;
    Ok(r.as_ref().map(from_row).transpose()?)
}

/// Every client, oldest first.
pub async fn list(db: &Db) -> Result<Vec<Client>, AuthError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM oauth_clients ORDER BY created_at, client_id"
    ))
    .fetch_all(db.read())
    .await?;
    rows.iter()
        .map(from_row)
        .collect::<Result<_, _>>()
        .map_err(AuthError::from)
}

/// Registers a client (with its audit entry, in one transaction).
/// `env` seals the ES256 key, created with the first client that needs it.
pub async fn create(
    db: &Db,
    env: &Envelope,
    origin: &Origin,
    actor: &str,
    new: NewClient,
) -> Result<CreatedClient, AuthError> {
    let (grants, scopes, alg) = check(&new)?;
    if alg == "ES256" {
        super::es256::ensure_key(db, env).await?;
    }
    let client_id = format!("vpc_{}", random_token(16));
    let secret = (!new.public).then(opaque_token);
    let now = now_micros();
    let uris = serde_json::to_string(&new.redirect_uris)
        .map_err(|e| AuthError::Internal(e.to_string()))?;
    let mut tx = db.begin().await?;
    sqlx::query(&format!(
        "INSERT INTO oauth_clients ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    ))
    .bind(&client_id)
    .bind(secret.as_ref().map(|s| sha256_hex(s.as_bytes())))
    .bind(new.name.trim())
    .bind(&uris)
    .bind(grants.join(" "))
    .bind(scopes.join(" "))
    .bind(i64::from(new.public))
    .bind(&alg)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    append(
        db,
        &mut tx,
        origin,
        NewAudit::success("oauth.client_created")
            .actor(actor)
            .resource(&client_id)
            .metadata(serde_json::json!({
                "name": new.name.trim(), "public": new.public, "grant_types": grants,
                "scopes": scopes, "redirect_uris": new.redirect_uris,
            })),
    )
    .await?;
    tx.commit().await?;
    let client = Client {
        client_id,
        secret_hash: None,
        name: new.name.trim().to_owned(),
        redirect_uris: new.redirect_uris,
        grant_types: grants,
        scopes,
        public: new.public,
        id_token_alg: alg,
        created_at: now,
    };
    Ok(CreatedClient {
        client: client.view(),
        client_secret: secret,
    })
}

/// Deletes a client and revokes every session issued to it. Returns false if unknown.
pub async fn delete(
    db: &Db,
    origin: &Origin,
    actor: &str,
    client_id: &str,
) -> Result<bool, AuthError> {
    let mut tx = db.begin().await?;
    let n = sqlx::query("DELETE FROM oauth_clients WHERE client_id = $1")
        .bind(client_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if n == 0 {
        return Ok(false);
    }
    let revoked = crate::sessions::revoke_sessions_where(
        db,
        &mut tx,
        "client_id = $1 AND revoked_at IS NULL",
        &[client_id],
        "client_deleted",
        now_micros(),
    )
    .await?;
    append(
        db,
        &mut tx,
        origin,
        NewAudit::success("oauth.client_deleted")
            .actor(actor)
            .resource(client_id)
            .metadata(serde_json::json!({ "sessions_revoked": revoked })),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Client management is the administrator's own session's: a token an OAuth client
/// holds for them (with `api`) registers and deletes no clients (a deletion ends every
/// session of the client's users).
async fn admin(svc: &AuthService, ctx: &Ctx, p: &Principal) -> Result<(), AuthError> {
    super::require_first_party(p)?;
    svc.require_live_session(p).await?;
    svc.require(ctx, p, "clients:manage").await
}

/// Register an OAuth client (`clients:manage`); the secret is shown once.
#[utoipa::path(post, path = "/v1/admin/clients", tag = "oauth", request_body = NewClient,
    responses((status = 201, body = CreatedClient), (status = 403, body = vaultpay_proto::Problem),
        (status = 422, body = vaultpay_proto::Problem, description = "`invalid_client_metadata`: a redirect URI, grant, scope or other field is refused")),
    security(("bearer" = [])))]
pub(crate) async fn create_route(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    ApiJson(req): ApiJson<NewClient>,
) -> Result<Response, ApiError> {
    admin(&svc, &ctx, &p).await?;
    let created = create(svc.db(), &svc.inner.env, &ctx.origin(), p.user_id(), req).await?;
    let mut res = (StatusCode::CREATED, Json(created)).into_response();
    res.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    Ok(res)
}

/// List OAuth clients (`clients:manage`).
#[utoipa::path(get, path = "/v1/admin/clients", tag = "oauth",
    responses((status = 200, body = ClientList), (status = 403, body = vaultpay_proto::Problem)), security(("bearer" = [])))]
pub(crate) async fn list_route(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
) -> Result<Json<ClientList>, ApiError> {
    admin(&svc, &ctx, &p).await?;
    let clients = list(svc.db()).await?.iter().map(Client::view).collect();
    Ok(Json(ClientList { clients }))
}

/// Delete an OAuth client and revoke its sessions (`clients:manage`).
#[utoipa::path(delete, path = "/v1/admin/clients/{id}", tag = "oauth", params(("id" = String, Path)),
    responses((status = 204), (status = 403, body = vaultpay_proto::Problem), (status = 404, body = vaultpay_proto::Problem)),
    security(("bearer" = [])))]
pub(crate) async fn delete_route(
    State(svc): State<AuthService>,
    ctx: Ctx,
    p: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin(&svc, &ctx, &p).await?;
    let deleted = delete(svc.db(), &ctx.origin(), p.user_id(), &id).await?;
    svc.inner.oauth.forget_client(&id);
    if deleted {
        svc.sessions_changed(None).await;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AuthError::NotFound("client").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_any_port_only_same_host_and_path() {
        let c = Client {
            client_id: "c".into(),
            secret_hash: None,
            name: "n".into(),
            redirect_uris: vec![
                "http://127.0.0.1/cb".into(),
                "http://[::1]:1234/cb".into(),
                "https://app.example/cb".into(),
            ],
            grant_types: vec![],
            scopes: vec![],
            public: true,
            id_token_alg: "EdDSA".into(),
            created_at: 0,
        };
        assert!(c.redirect_matches("http://127.0.0.1:53122/cb"));
        assert!(c.redirect_matches("http://127.0.0.1/cb"));
        assert!(c.redirect_matches("http://[::1]:9/cb"));
        assert!(c.redirect_matches("https://app.example/cb"));
        assert!(!c.redirect_matches("http://127.0.0.1:53122/cb2"));
        assert!(!c.redirect_matches("http://127.0.0.1.evil.example/cb"));
        assert!(!c.redirect_matches("http://127.0.0.1:80@evil.example/cb"));
        assert!(!c.redirect_matches("http://localhost:5000/cb"));
        assert!(!c.redirect_matches("https://app.example/cb/../x"));
        assert!(!c.redirect_matches("https://app.example:443/cb"));
    }

    #[test]
    fn localhost_redirects_name_localhost_itself() {
        for ok in [
            "http://localhost/cb",
            "http://localhost:5000/cb",
            "http://localhost",
        ] {
            assert!(valid_redirect(ok), "{ok}");
        }
        for bad in [
            "http://localhost.evil.example/cb",
            "http://localhost@evil.example/cb",
            "http://localhost:5000@evil.example/cb",
            "http://localhost:/cb",
            "http://localhost:99999999/cb",
        ] {
            assert!(!valid_redirect(bad), "{bad}");
        }
    }
}
