//! OpenID Connect: discovery, ID tokens and `/userinfo`.

use super::clients::Client;
use super::{has_scope, GRANTS, SCOPES};
use crate::{AuthError, AuthService};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use sqlx::Row;
use vaultpay_core::time::now_micros;
use vaultpay_web::Principal;

#[derive(Debug, Serialize)]
pub struct IdClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub auth_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    pub amr: Vec<String>,
    /// `urn:vaultpay:acr:mfa` when a second factor was part of the sign-in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
    pub azp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email_verified: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The user's claims released under `scope`.
pub(crate) struct Profile {
    pub email: Option<String>,
    pub email_verified: Option<bool>,
    pub name: Option<String>,
}

impl AuthService {
    pub(crate) async fn profile(&self, user_id: &str, scope: &str) -> Result<Profile, AuthError> {
        let r = sqlx::query("SELECT email, name, email_verified FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(self.db().read())
            .await?
            .ok_or(AuthError::NotFound("user"))?;
        let email = has_scope(scope, "email");
        let verified: i64 = r.try_get("email_verified")?;
        Ok(Profile {
            email: email.then(|| r.try_get("email")).transpose()?,
            email_verified: email.then_some(verified != 0),
            name: has_scope(scope, "profile")
                .then(|| r.try_get("name"))
                .transpose()?,
        })
    }

    /// Signs an ID token for `client` (EdDSA, or ES256 if the client asked for it) with
    /// the claims of `p` (read by [`Self::profile`] for the grant's scope).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn id_token(
        &self,
        client: &Client,
        user_id: &str,
        session_id: &str,
        p: Profile,
        nonce: Option<String>,
        auth_time_micros: i64,
        amr: Vec<String>,
    ) -> Result<String, AuthError> {
        let now = now_micros() / 1_000_000;
        let claims = IdClaims {
            iss: self.config().issuer.clone(),
            sub: user_id.to_owned(),
            aud: client.client_id.clone(),
            exp: now + self.config().oauth.id_token_ttl_secs,
            iat: now,
            auth_time: auth_time_micros / 1_000_000,
            nonce,
            acr: vaultpay_core::step_up::acr_for(&amr),
            amr,
            azp: client.client_id.clone(),
            sid: Some(session_id.to_owned()),
            email: p.email,
            email_verified: p.email_verified,
            name: p.name,
        };
        metrics::counter!("auth_tokens_issued_total", "kind" => "id").increment(1);
        if client.id_token_alg == "ES256" {
            self.es256().await?.sign(&claims)
        } else {
            let signer = self.inner.signer.read().clone();
            signer
                .sign(&claims)
                .map_err(|e| AuthError::Internal(e.to_string()))
        }
    }
}

/// OpenID Provider metadata (OIDC Discovery 1.0).
#[utoipa::path(get, path = "/.well-known/openid-configuration", tag = "oauth",
    responses((status = 200, description = "Provider metadata")))]
pub(crate) async fn discovery(State(svc): State<AuthService>) -> Response {
    let base = svc.public_url().to_owned();
    let doc = serde_json::json!({
        "issuer": svc.config().issuer,
        "authorization_endpoint": format!("{base}/oauth/authorize"),
        "token_endpoint": format!("{base}/oauth/token"),
        "device_authorization_endpoint": format!("{base}/oauth/device_authorization"),
        "userinfo_endpoint": format!("{base}/userinfo"),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "revocation_endpoint": format!("{base}/oauth/revoke"),
        "introspection_endpoint": format!("{base}/oauth/introspect"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": GRANTS,
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["EdDSA", "ES256"],
        "scopes_supported": SCOPES,
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "acr", "amr", "azp", "sid", "email", "email_verified", "name"],
        "authorization_response_iss_parameter_supported": true,
        "acr_values_supported": [vaultpay_core::step_up::ACR_MFA],
        "request_parameter_supported": false,
        "request_uri_parameter_supported": false,
        "claims_parameter_supported": false,
    });
    let mut res = Json(doc).into_response();
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    res
}

fn bearer_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut res = (
        status,
        Json(serde_json::json!({ "error": error, "error_description": description })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "Bearer realm=\"vaultpay\", error=\"{error}\", error_description=\"{description}\""
    )) {
        res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    res
}

/// The signed-in user's claims (bearer access token with the `openid` scope):
/// `sub`, and by scope `email`, `email_verified`, `name`.
#[utoipa::path(method(get, post), path = "/userinfo", tag = "oauth",
    responses((status = 200, description = "Claims"),
        (status = 401, body = vaultpay_proto::auth::OAuthError, description = "`invalid_token` (RFC 6750; also in `WWW-Authenticate`)"),
        (status = 403, body = vaultpay_proto::auth::OAuthError, description = "`insufficient_scope`: the token lacks `openid`")),
    security(("bearer" = [])))]
pub(crate) async fn userinfo(
    State(svc): State<AuthService>,
    p: Result<Principal, vaultpay_web::ApiError>,
) -> Response {
    let Ok(p) = p else {
        return bearer_error(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "a valid access token is required",
        );
    };
    let scope = p.claims.scope.clone().unwrap_or_default();
    if !has_scope(&scope, "openid") {
        return bearer_error(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "the token lacks the openid scope",
        );
    }
    match svc.session_live(p.session_id(), p.user_id()).await {
        Ok(true) => {}
        Ok(false) => {
            return bearer_error(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "the session has ended",
            )
        }
        Err(e) => return vaultpay_web::ApiError::from(e).into_response(),
    }
    match svc.profile(p.user_id(), &scope).await {
        Ok(prof) => {
            let mut doc = serde_json::json!({ "sub": p.user_id() });
            if let Some(e) = prof.email {
                doc["email"] = e.into();
            }
            if let Some(v) = prof.email_verified {
                doc["email_verified"] = v.into();
            }
            if let Some(n) = prof.name {
                doc["name"] = n.into();
            }
            let mut res = Json(doc).into_response();
            res.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            res
        }
        Err(e) => vaultpay_web::ApiError::from(e).into_response(),
    }
}
