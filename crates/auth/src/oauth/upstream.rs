//! Upstream sign-in: "Sign in with GitHub" and any OpenID Connect provider, by
//! configuration (`[auth.oauth.upstream.<name>]`), as an alternative to the password on
//! the authorization sign-in page.
//!
//! The round trip is an authorization code flow with PKCE (S256), `state` (single use,
//! bound to the browser's pending authorization request) and, for OIDC, `nonce`. The
//! OIDC provider's ID token is trusted only once its JWS signature verifies against
//! the provider's JWK Set (the discovery document's `jwks_uri`, cached per provider,
//! refetched once for an unknown `kid`): `RS256`, `ES256` or `EdDSA`, never `none`,
//! `HS*` or a header `alg` that disagrees with the key (see [`super::upstream_jws`]).
//! Then, per OIDC Core §3.1.3.7: `iss` is the configured issuer, `aud` contains our
//! client id (and with several audiences `azp` is our client id; a present `azp` must
//! be anyway), `exp` is in the future, `iat` is not more than a minute ahead (nor
//! `nbf`, when present), and `nonce` is the one sent. Any failure refuses the sign-in
//! and creates nothing. A provider identity is linked to one local account; a new
//! identity with a verified email creates an account, unless that email already
//! belongs to a local account (then the user signs in with the password: no silent
//! account merge) unless `link_by_verified_email` is set.

use super::authorize::{read_cookie, COOKIE};
use super::pages;
use super::upstream_jws::{self, JwkSet};
use crate::outbound::{is_secure_url, read_capped};
use crate::{AuthError, AuthService};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;
use std::collections::HashMap;
use vaultpay_core::crypto::{ct_eq, opaque_token, sha256_hex};
use vaultpay_core::secret::Secret;
use vaultpay_core::time::{now_micros, secs};
use vaultpay_store::audit::{append, NewAudit};
use vaultpay_web::{ApiError, ApiForm, ApiQuery, Ctx};

/// One upstream identity provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `oidc` or `github`.
    pub kind: String,
    /// Shown on the button: "Sign in with {display_name}".
    pub display_name: String,
    /// OIDC: the issuer; endpoints come from its discovery document.
    #[serde(default)]
    pub issuer: Option<String>,
    pub client_id: String,
    pub client_secret: Secret,
    /// Default: `openid email profile` (OIDC), `read:user user:email` (GitHub).
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// GitHub endpoints (defaults: github.com; set for GitHub Enterprise).
    #[serde(default)]
    pub authorize_url: Option<String>,
    #[serde(default)]
    pub token_url: Option<String>,
    #[serde(default)]
    pub api_url: Option<String>,
    /// Link a new upstream identity to an existing local account with the same email
    /// when both sides have verified it. Off by default.
    #[serde(default)]
    pub link_by_verified_email: bool,
}

struct Endpoints {
    authorize: String,
    token: String,
    userinfo: Option<String>,
    /// OIDC: where the provider publishes its signing keys.
    jwks: Option<String>,
}

fn http() -> Result<reqwest::Client, AuthError> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(std::time::Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("VaultPay/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| AuthError::Internal(e.to_string()))
}

/// Largest answer read from a provider's discovery, token, userinfo or user API
/// endpoint (a hostile or broken provider must not fill the server's memory).
const MAX_UPSTREAM_JSON_BYTES: usize = 256 * 1024;

/// Sends a request to the provider and reads its JSON answer, at most
/// [`MAX_UPSTREAM_JSON_BYTES`]; any failure (transport, non-2xx status, size, body) is
/// an upstream error.
async fn fetch_json(req: reqwest::RequestBuilder) -> Result<Value, AuthError> {
    let body = read_capped(req, MAX_UPSTREAM_JSON_BYTES)
        .await
        .map_err(upstream_err)?;
    serde_json::from_slice(&body).map_err(upstream_err)
}

/// A provider's subject fit to key an identity by: OIDC Core §2's at most 255 ASCII
/// characters, printable ones only (a NUL would be refused by PostgreSQL as a 500).
fn subject_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

impl UpstreamConfig {
    /// Checks a provider's settings when the configuration is loaded (instead of at its
    /// first sign-in): a known kind, an issuer for OIDC, and every URL `https` (or
    /// `http` to loopback), so a client secret never goes out in clear text.
    pub fn validate(&self) -> Result<(), String> {
        match self.kind.as_str() {
            "oidc" if self.issuer.is_none() => return Err("an oidc provider needs issuer".into()),
            "oidc" | "github" => {}
            other => return Err(format!("kind must be oidc or github, not {other:?}")),
        }
        for (key, v) in [
            ("issuer", &self.issuer),
            ("authorize_url", &self.authorize_url),
            ("token_url", &self.token_url),
            ("api_url", &self.api_url),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !is_secure_url(v)) {
                return Err(format!(
                    "{key} must be an https URL (http only to loopback), not {v:?}"
                ));
            }
        }
        Ok(())
    }
}

fn upstream_err(e: impl std::fmt::Display) -> AuthError {
    AuthError::Internal(format!("upstream provider: {e}"))
}

async fn endpoints(up: &UpstreamConfig) -> Result<Endpoints, AuthError> {
    match up.kind.as_str() {
        "github" => Ok(Endpoints {
            authorize: up
                .authorize_url
                .clone()
                .unwrap_or_else(|| "https://github.com/login/oauth/authorize".into()),
            token: up
                .token_url
                .clone()
                .unwrap_or_else(|| "https://github.com/login/oauth/access_token".into()),
            userinfo: None,
            jwks: None,
        }),
        "oidc" => {
            let iss = up
                .issuer
                .as_deref()
                .ok_or_else(|| upstream_err("oidc provider without issuer"))?;
            let doc: Value = fetch_json(http()?.get(format!(
                "{}/.well-known/openid-configuration",
                iss.trim_end_matches('/')
            )))
            .await?;
            if doc["issuer"].as_str() != Some(iss) {
                return Err(upstream_err("discovery issuer mismatch"));
            }
            // The discovery document's endpoints get the secret and the tokens too:
            // https, or plain http only when the issuer itself is on this host (a
            // provider's document must not point this server at its own loopback
            // services).
            let https = |u: &str| reqwest::Url::parse(u).is_ok_and(|u| u.scheme() == "https");
            let local_issuer = !https(iss) && is_secure_url(iss);
            let s = |k: &str| {
                doc[k].as_str().map(str::to_owned).filter(|u| {
                    let ok = is_secure_url(u) && (https(u) || local_issuer);
                    ok || {
                        tracing::warn!(endpoint = k, url = %u, "upstream endpoint refused: not https");
                        false
                    }
                })
            };
            Ok(Endpoints {
                authorize: s("authorization_endpoint")
                    .ok_or_else(|| upstream_err("no authorization_endpoint"))?,
                token: s("token_endpoint").ok_or_else(|| upstream_err("no token_endpoint"))?,
                userinfo: s("userinfo_endpoint"),
                jwks: Some(s("jwks_uri").ok_or_else(|| upstream_err("no jwks_uri"))?),
            })
        }
        other => Err(upstream_err(format!("unknown kind {other}"))),
    }
}

fn callback_uri(svc: &AuthService, name: &str) -> String {
    format!(
        "{}/oauth/authorize/upstream/{}/callback",
        svc.public_url(),
        urlencoding::encode(name)
    )
}

/// (name, display name) of every configured provider, for the sign-in page.
pub(crate) fn providers(svc: &AuthService) -> Vec<(String, String)> {
    svc.config()
        .oauth
        .upstream
        .iter()
        .map(|(k, v)| (k.clone(), v.display_name.clone()))
        .collect()
}

fn internal(e: AuthError) -> Response {
    ApiError::from(e).into_response()
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

#[derive(Deserialize)]
pub(crate) struct StartForm {
    csrf: String,
}

/// The sign-in page's "Sign in with …" button: off to the provider.
pub(crate) async fn start(
    State(svc): State<AuthService>,
    ctx: vaultpay_web::Ctx,
    Path(name): Path<String>,
    headers: HeaderMap,
    form: Result<ApiForm<StartForm>, ApiError>,
) -> Response {
    let Ok(ApiForm(form)) = form else {
        return pages::error(StatusCode::BAD_REQUEST, "The form is incomplete.");
    };
    let Some(up) = svc.config().oauth.upstream.get(&name).cloned() else {
        return pages::error(StatusCode::NOT_FOUND, "No such sign-in provider.");
    };
    let p = match super::authorize::pending_request(&svc, &headers, Some(&form.csrf)).await {
        Ok(Ok(p)) => p,
        Ok(Err(page)) => return page,
        Err(e) => return internal(e),
    };
    if p.stage != "signin" {
        return pages::error(StatusCode::BAD_REQUEST, "This step does not belong here.");
    }
    if p.fresh_login {
        return pages::error(
            StatusCode::BAD_REQUEST,
            "This application asked you to sign in again with your password: a sign-in provider cannot confirm that.",
        );
    }
    // Each start stores a state and asks the provider for its endpoints: bounded per
    // address like starting an authorization (one sign-in page could be posted for
    // ever, filling the state table and sending the provider requests in our name).
    if let Err(e) = vaultpay_web::enforce(
        &*svc.limiter(),
        &format!("oauth:upstream:ip:{}", ctx.ip_key()),
        svc.config().rate_limits.oauth_start_per_ip,
    )
    .await
    {
        return e.into_response();
    }
    let ep = match endpoints(&up).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, provider = %name, "upstream discovery failed");
            return pages::error(
                StatusCode::BAD_GATEWAY,
                "The sign-in provider is not reachable right now.",
            );
        }
    };
    let state = opaque_token();
    let nonce = opaque_token();
    let verifier = opaque_token();
    let challenge = {
        use sha2::Digest;
        URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()))
    };
    let now = now_micros();
    let stored = async {
        let mut tx = svc.db().begin().await?;
        sqlx::query("DELETE FROM oauth_upstream_states WHERE expires_at < $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO oauth_upstream_states (state_hash, request_id_hash, provider, nonce, verifier, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(sha256_hex(state.as_bytes()))
        .bind(&p.id_hash)
        .bind(&name)
        .bind(&nonce)
        .bind(&verifier)
        .bind(now + secs(600))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok::<(), AuthError>(())
    };
    if let Err(e) = stored.await {
        return internal(e);
    }
    let scope = up.scopes.clone().map(|s| s.join(" ")).unwrap_or_else(|| {
        if up.kind == "github" {
            "read:user user:email".into()
        } else {
            "openid email profile".into()
        }
    });
    let cb = callback_uri(&svc, &name);
    let mut params = vec![
        ("response_type", "code"),
        ("client_id", up.client_id.as_str()),
        ("redirect_uri", cb.as_str()),
        ("scope", scope.as_str()),
        ("state", state.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    if up.kind == "oidc" {
        params.push(("nonce", nonce.as_str()));
    }
    redirect(&super::authorize::with_params(&ep.authorize, &params))
}

/// What the provider says about the user.
struct Identity {
    subject: String,
    email: Option<String>,
    email_verified: bool,
    name: Option<String>,
}

/// Clock skew allowed on `iat` and `nbf`, in seconds.
const SKEW_SECS: i64 = 60;

/// A NumericDate claim (RFC 7519 §2: seconds, possibly fractional).
fn numeric_date(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite())
            .map(|f| f.floor() as i64)
    })
}

/// Reads the provider's JWK Set, at most [`upstream_jws::MAX_JWKS_BYTES`].
async fn fetch_jwks(uri: &str) -> Result<JwkSet, AuthError> {
    let req = http()?.get(uri).header(header::ACCEPT, "application/json");
    let body = read_capped(req, upstream_jws::MAX_JWKS_BYTES)
        .await
        .map_err(upstream_err)?;
    JwkSet::parse(&body).map_err(|e| upstream_err(format!("bad JWK Set: {e}")))
}

/// The ID token's claims once its signature and OIDC Core §3.1.3.7 checks pass.
async fn id_token_claims(
    svc: &AuthService,
    up: &UpstreamConfig,
    ep: &Endpoints,
    id_token: &str,
    nonce: &str,
) -> Result<Value, AuthError> {
    let jwks = ep
        .jwks
        .as_deref()
        .ok_or_else(|| upstream_err("no jwks_uri"))?;
    let claims = svc
        .inner
        .oauth
        .upstream_jwks
        .verify(jwks, id_token, std::time::Instant::now(), || {
            fetch_jwks(jwks)
        })
        .await?;
    let iss = up.issuer.as_deref().unwrap_or_default();
    let client_id = up.client_id.as_str();
    let aud_ok = match &claims["aud"] {
        Value::String(a) => a == client_id,
        Value::Array(v) => v.iter().any(|a| a.as_str() == Some(client_id)),
        _ => false,
    };
    // OIDC Core §3.1.3.7 points 4-5: several audiences need an azp, and an azp must
    // be us.
    let several = claims["aud"].as_array().is_some_and(|v| v.len() > 1);
    let azp_ok = match &claims["azp"] {
        Value::Null => !several,
        azp => azp.as_str() == Some(client_id),
    };
    let now = now_micros() / 1_000_000;
    let nonce_ok = claims["nonce"]
        .as_str()
        .is_some_and(|n| ct_eq(n.as_bytes(), nonce.as_bytes()));
    let nbf_ok = match &claims["nbf"] {
        Value::Null => true,
        nbf => numeric_date(nbf).is_some_and(|n| n <= now + SKEW_SECS),
    };
    let sub_ok = claims["sub"].as_str().is_some_and(subject_ok);
    if claims["iss"].as_str() != Some(iss)
        || !sub_ok
        || !aud_ok
        || !azp_ok
        || numeric_date(&claims["exp"]).is_none_or(|e| e <= now)
        || numeric_date(&claims["iat"]).is_none_or(|i| i > now + SKEW_SECS)
        || !nbf_ok
        || !nonce_ok
    {
        return Err(AuthError::OAuth(
            "invalid_grant",
            "the provider's ID token failed its checks".into(),
        ));
    }
    Ok(claims)
}

async fn identity(
    svc: &AuthService,
    up: &UpstreamConfig,
    ep: &Endpoints,
    cb: &str,
    code: &str,
    verifier: &str,
    nonce: &str,
) -> Result<Identity, AuthError> {
    let h = http()?;
    let tok: Value = fetch_json(
        h.post(&ep.token)
            .header(header::ACCEPT, "application/json")
            .basic_auth(
                urlencoding::encode(&up.client_id),
                Some(urlencoding::encode(up.client_secret.expose())),
            )
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", cb),
                ("code_verifier", verifier),
            ]),
    )
    .await?;
    let access = tok["access_token"]
        .as_str()
        .ok_or_else(|| upstream_err("no access_token"))?;
    if up.kind == "github" {
        let api = up
            .api_url
            .as_deref()
            .unwrap_or("https://api.github.com")
            .trim_end_matches('/');
        let get = |path: &str| {
            fetch_json(
                h.get(format!("{api}{path}"))
                    .bearer_auth(access)
                    .header(header::ACCEPT, "application/vnd.github+json"),
            )
        };
        let user = get("/user").await?;
        let emails = get("/user/emails").await?;
        let primary = emails.as_array().and_then(|a| {
            a.iter()
                .find(|e| e["primary"] == true && e["verified"] == true)
        });
        let subject = match &user["id"] {
            Value::Number(n) => n.to_string(),
            Value::String(s) if subject_ok(s) => s.clone(),
            _ => return Err(upstream_err("no user id")),
        };
        return Ok(Identity {
            subject,
            email: primary.and_then(|e| e["email"].as_str().map(str::to_owned)),
            email_verified: primary.is_some(),
            name: user["name"]
                .as_str()
                .or(user["login"].as_str())
                .map(str::to_owned),
        });
    }
    let id_token = tok["id_token"]
        .as_str()
        .ok_or_else(|| upstream_err("no id_token"))?;
    let claims = id_token_claims(svc, up, ep, id_token, nonce).await?;
    let subject = claims["sub"]
        .as_str()
        .ok_or_else(|| upstream_err("no sub"))?
        .to_owned();
    let mut info = claims;
    if info["email"].is_null() {
        if let Some(u) = &ep.userinfo {
            let ui: Value = fetch_json(h.get(u).bearer_auth(access)).await?;
            if ui["sub"].as_str() != Some(subject.as_str()) {
                return Err(upstream_err("userinfo sub mismatch"));
            }
            info = ui;
        }
    }
    Ok(Identity {
        subject,
        email: info["email"].as_str().map(str::to_owned),
        email_verified: info["email_verified"] == true,
        name: info["name"].as_str().map(str::to_owned),
    })
}

enum Mapped {
    User(String),
    Refused(&'static str),
}

/// Finds the local account of an upstream identity, linking or creating one.
async fn map_user(
    svc: &AuthService,
    ctx: &Ctx,
    provider: &str,
    up: &UpstreamConfig,
    id: &Identity,
) -> Result<Mapped, AuthError> {
    let db = svc.db();
    let mut tx = db.begin().await?;
    let linked =
        sqlx::query("SELECT user_id FROM upstream_identities WHERE provider = $1 AND subject = $2")
            .bind(provider)
            .bind(&id.subject)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(r) = linked {
        return Ok(Mapped::User(r.try_get("user_id")?));
    }
    let Some(email) = id
        .email
        .as_deref()
        .filter(|_| id.email_verified)
        .and_then(|e| crate::accounts::normalise_email(e).ok())
    else {
        return Ok(Mapped::Refused(
            "The provider did not share a verified email address.",
        ));
    };
    let now = now_micros();
    let existing = sqlx::query("SELECT id, email_verified FROM users WHERE email = $1")
        .bind(&email)
        .fetch_optional(&mut *tx)
        .await?;
    let (user_id, created) = match existing {
        Some(r) => {
            let verified: i64 = r.try_get("email_verified")?;
            if !(up.link_by_verified_email && verified != 0) {
                return Ok(Mapped::Refused(
                    "An account with this email already exists: sign in with its password.",
                ));
            }
            (r.try_get::<String, _>("id")?, false)
        }
        None => {
            let user_id = uuid::Uuid::now_v7().to_string();
            let name: String = id
                .name
                .clone()
                .unwrap_or_else(|| email.split('@').next().unwrap_or("user").to_owned())
                .chars()
                .filter(|c| !c.is_control())
                .take(100)
                .collect();
            // No password: "!" is no PHC string, so no password ever verifies.
            sqlx::query(
                "INSERT INTO users (id, email, name, password_hash, email_verified, created_at, updated_at) \
                 VALUES ($1, $2, $3, '!', 1, $4, $4)",
            )
            .bind(&user_id)
            .bind(&email)
            .bind(&name)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO user_roles (user_id, role, granted_at, granted_by) VALUES ($1, 'customer', $2, 'system')",
            )
            .bind(&user_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            (user_id, true)
        }
    };
    sqlx::query(
        "INSERT INTO upstream_identities (provider, subject, user_id, email, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(provider)
    .bind(&id.subject)
    .bind(&user_id)
    .bind(&email)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    append(
        db,
        &mut tx,
        &ctx.origin(),
        NewAudit::success(if created {
            "account.created_upstream"
        } else {
            "account.linked_upstream"
        })
        .actor(&user_id)
        .resource(&user_id)
        .metadata(serde_json::json!({ "provider": provider, "subject": id.subject })),
    )
    .await?;
    tx.commit().await?;
    if !created {
        // A new way into an existing account (by its verified address): its owner
        // hears of it, as of an unlinking or a password reset.
        svc.notify_security_change(
            &user_id,
            "A sign-in provider was linked to your account",
            &format!(
                "Signing in to your VaultPay account with {provider} was turned on, because \
                 that provider vouched for your email address."
            ),
        )
        .await;
    }
    Ok(Mapped::User(user_id))
}

/// The live sessions of user `$1` that unlinking provider `$2` ends: those signed in
/// through it, and those signed in through an
/// upstream provider before sessions recorded which (auth migration 0009), whose
/// provider is unknown.
const UNLINKED_SESSIONS: &str = "user_id = $1 AND revoked_at IS NULL AND (upstream_provider = $2 \
     OR (upstream_provider IS NULL AND (amr = 'fed' OR amr LIKE 'fed %')))";

impl AuthService {
    /// `GET /v1/me/identities`.
    pub async fn list_identities(
        &self,
        p: &vaultpay_web::Principal,
    ) -> Result<vaultpay_proto::iptrust::LinkedIdentityList, AuthError> {
        self.require_live_session(p).await?;
        let rows = sqlx::query(
            "SELECT provider, email, created_at FROM upstream_identities WHERE user_id = $1 \
             ORDER BY created_at, provider",
        )
        .bind(p.user_id())
        .fetch_all(self.db().read())
        .await?;
        let identities = rows
            .iter()
            .map(|r| {
                Ok(vaultpay_proto::iptrust::LinkedIdentity {
                    provider: r.try_get("provider")?,
                    email: r.try_get("email")?,
                    linked_at: vaultpay_core::time::rfc3339(r.try_get("created_at")?),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(vaultpay_proto::iptrust::LinkedIdentityList { identities })
    }

    /// `DELETE /v1/me/identities/{provider}`: unlinks the caller's identities at
    /// `provider`, audited and told to the account's address, and ends what a sign-in
    /// through it gave: the sessions it opened (the caller's own too, if it was one),
    /// the authorization codes not yet exchanged and the requests signed in through it.
    /// Refused when it would leave the account with no way to sign in (no password,
    /// and no other provider this server still offers).
    pub async fn unlink_identity(
        &self,
        ctx: &Ctx,
        p: &vaultpay_web::Principal,
        provider: &str,
    ) -> Result<(), AuthError> {
        self.require_live_session(p).await?;
        // a recent sign-in (or step-up), whatever the step-up policy says of email changes
        self.require_recent_auth(p).await?;
        let db = self.db();
        let user_id = p.user_id();
        // the user's row, with the session re-checked under it
        let mut tx = db.begin().await?;
        let phc = crate::sessions::recheck_authority(
            db,
            &mut tx,
            user_id,
            crate::sessions::Proof::session(p.session_id()),
        )
        .await?;
        let rows =
            sqlx::query("SELECT provider, subject FROM upstream_identities WHERE user_id = $1")
                .bind(user_id)
                .fetch_all(&mut *tx)
                .await?;
        let mut here = Vec::new();
        let mut elsewhere = 0usize;
        let offered = &self.config().oauth.upstream;
        for r in &rows {
            let prov: String = r.try_get("provider")?;
            if prov == provider {
                here.push(r.try_get::<String, _>("subject")?);
            } else if offered.contains_key(&prov) {
                // a link to a provider taken out of the configuration is no way in
                elsewhere += 1;
            }
        }
        if here.is_empty() {
            return Err(AuthError::NotFound("linked identity"));
        }
        // "!" (an account an upstream sign-in created) is no PHC string: no password
        if !phc.starts_with('$') && elsewhere == 0 {
            return Err(AuthError::Api(ApiError::conflict(
                "last_sign_in_method",
                "This provider is the account's only way to sign in: set a password first \
                 (POST /v1/auth/password/forgot), then unlink it.",
            )));
        }
        // Requests first (a consent in flight locks its request, then issues its code,
        // which the next statement then finds), then codes, then sessions.
        sqlx::query("DELETE FROM oauth_requests WHERE user_id = $1 AND upstream_provider = $2")
            .bind(user_id)
            .bind(provider)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE oauth_codes SET expires_at = 0 \
             WHERE user_id = $1 AND upstream_provider = $2 AND used_at IS NULL",
        )
        .bind(user_id)
        .bind(provider)
        .execute(&mut *tx)
        .await?;
        let ended = crate::sessions::revoke_sessions_where(
            db,
            &mut tx,
            UNLINKED_SESSIONS,
            &[user_id, provider],
            "provider_unlinked",
            vaultpay_core::time::now_micros(),
        )
        .await?;
        sqlx::query("DELETE FROM upstream_identities WHERE user_id = $1 AND provider = $2")
            .bind(user_id)
            .bind(provider)
            .execute(&mut *tx)
            .await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("account.unlinked_upstream")
                .actor(user_id)
                .resource(user_id)
                .metadata(serde_json::json!({
                    "provider": provider,
                    "subjects": here,
                    "sessions_ended": ended,
                })),
        )
        .await?;
        tx.commit().await?;
        if ended > 0 {
            self.sessions_changed(Some(user_id)).await;
        }
        self.notify_security_change(
            user_id,
            "A sign-in provider was unlinked from your account",
            &format!("Signing in to your VaultPay account with {provider} was turned off."),
        )
        .await;
        Ok(())
    }
}

/// The provider's redirect back: identity → local account → consent page.
pub(crate) async fn callback(
    State(svc): State<AuthService>,
    ctx: Ctx,
    Path(name): Path<String>,
    headers: HeaderMap,
    q: Result<ApiQuery<HashMap<String, String>>, ApiError>,
) -> Response {
    let Ok(ApiQuery(q)) = q else {
        return pages::error(
            StatusCode::BAD_REQUEST,
            "The provider's answer is malformed.",
        );
    };
    let Some(up) = svc.config().oauth.upstream.get(&name).cloned() else {
        return pages::error(StatusCode::NOT_FOUND, "No such sign-in provider.");
    };
    let bad = || {
        pages::error(
            StatusCode::BAD_REQUEST,
            "This sign-in is not valid any more. Go back to the application and start again.",
        )
    };
    let (Some(state), Some(cookie)) = (q.get("state"), read_cookie(&headers, COOKIE)) else {
        return bad();
    };
    // The state is single use and belongs to this browser's authorization request.
    let state_hash = sha256_hex(state.as_bytes());
    let row = async {
        // Unknown states (anyone can send one) are refused from a read, without
        // taking the writer.
        let known = super::tokens::code_exists(
            svc.db(),
            "oauth_upstream_states",
            "state_hash",
            &state_hash,
        )
        .await?;
        if !known {
            return Ok(None);
        }
        let mut tx = svc.db().begin().await?;
        let r = sqlx::query(
            "DELETE FROM oauth_upstream_states WHERE state_hash = $1 RETURNING request_id_hash, provider, nonce, verifier, expires_at",
        )
        .bind(&state_hash)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok::<_, AuthError>(r)
    };
    let row = match row.await {
        Ok(Some(r)) => r,
        Ok(None) => return bad(),
        Err(e) => return internal(e),
    };
    let get = |k: &str| row.try_get::<String, _>(k).unwrap_or_default();
    let expires: i64 = row.try_get("expires_at").unwrap_or(0);
    let id_hash = get("request_id_hash");
    if !ct_eq(sha256_hex(cookie.as_bytes()).as_bytes(), id_hash.as_bytes())
        || get("provider") != name
        || expires <= now_micros()
    {
        return bad();
    }
    if q.contains_key("error") {
        return pages::error(
            StatusCode::BAD_REQUEST,
            "Signing in with the provider was cancelled or refused.",
        );
    }
    let Some(code) = q.get("code") else {
        return bad();
    };
    let ep = match endpoints(&up).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, provider = %name, "upstream discovery failed");
            return pages::error(
                StatusCode::BAD_GATEWAY,
                "The sign-in provider is not reachable right now.",
            );
        }
    };
    let cb = callback_uri(&svc, &name);
    let ident = match identity(&svc, &up, &ep, &cb, code, &get("verifier"), &get("nonce")).await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, provider = %name, "upstream sign-in failed");
            return pages::error(
                StatusCode::BAD_GATEWAY,
                "Signing in with the provider failed.",
            );
        }
    };
    let mut mapped = map_user(&svc, &ctx, &name, &up, &ident).await;
    // The identity's account or link was made meanwhile (two sign-ins of a new identity
    // at once, or a registration of its address): on PostgreSQL this insert met that
    // row's unique key. Looking again finds it.
    if matches!(&mapped, Err(AuthError::Store(e)) if e.is_unique_violation()) {
        mapped = map_user(&svc, &ctx, &name, &up, &ident).await;
    }
    let user_id = match mapped {
        Ok(Mapped::User(u)) => u,
        Ok(Mapped::Refused(msg)) => return pages::error(StatusCode::FORBIDDEN, msg),
        Err(e) => return internal(e),
    };
    match super::authorize::federated_signin(&svc, &ctx, &id_hash, &user_id, &name).await {
        Ok(Some(page)) => page,
        Ok(None) => bad(),
        Err(e) => internal(e),
    }
}
