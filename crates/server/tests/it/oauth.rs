//! AuthShield as an OAuth 2.0 / OpenID Connect provider: clients, authorization code +
//! PKCE through the server-rendered pages, refresh by client, client credentials,
//! the device grant, ID tokens, userinfo, introspection and revocation, and the attacks
//! each check exists for.

use crate::auth_flows::{assert_oauth_error, audit_action, b64url, jwt_part};
use crate::each_backend;
use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use vaultpay_store::Backend;

pub const CB: &str = "https://app.example/cb";

/// A registered client.
#[derive(Debug, Clone)]
pub struct OClient {
    pub id: String,
    pub secret: Option<String>,
}

pub async fn create_client(app: &TestApp, admin: &str, body: Value) -> OClient {
    let r = app.post("/v1/admin/clients", Some(admin), body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    OClient {
        id: r.body["client_id"].as_str().unwrap().to_owned(),
        secret: r.body["client_secret"].as_str().map(str::to_owned),
    }
}

/// A confidential client for the code flow with every user scope.
pub async fn web_client(app: &TestApp, admin: &str) -> OClient {
    create_client(
        app,
        admin,
        json!({ "name": "Web App", "redirect_uris": [CB],
                "grant_types": ["authorization_code", "refresh_token"],
                "scopes": ["openid", "profile", "email", "offline_access", "api"] }),
    )
    .await
}

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

/// (verifier, S256 challenge).
pub fn pkce() -> (String, String) {
    let verifier = format!("v{}", uuid::Uuid::now_v7().simple()) + "-0123456789abcdefghijklmnop";
    let challenge = b64url(&hex_bytes(&vaultpay_core::crypto::sha256_hex(
        verifier.as_bytes(),
    )));
    (verifier, challenge)
}

/// A browser without redirects and with one cookie jar entry per name.
pub struct Browser {
    pub http: reqwest::Client,
    pub cookies: Vec<(String, String)>,
    pub base: String,
}

pub struct Page {
    pub status: StatusCode,
    pub location: Option<String>,
    pub text: String,
}

impl Page {
    pub fn csrf(&self) -> String {
        let marker = "name=\"csrf\" value=\"";
        let at = self.text.find(marker).expect("page has a csrf field") + marker.len();
        let end = self.text[at..].find('"').unwrap();
        self.text[at..at + end].to_owned()
    }

    /// A query parameter of the redirect.
    pub fn param(&self, name: &str) -> Option<String> {
        let loc = self.location.as_deref()?;
        let q = loc.split_once('?')?.1;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| urlencoding::decode(v).unwrap().into_owned())
        })
    }
}

impl Browser {
    pub fn new(app: &TestApp) -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: Vec::new(),
            base: app.base.clone(),
        }
    }

    async fn take(&mut self, res: reqwest::Response) -> Page {
        for v in res.headers().get_all("set-cookie") {
            let pair = v.to_str().unwrap().split(';').next().unwrap().to_owned();
            let (k, val) = pair.split_once('=').unwrap();
            self.cookies.retain(|(n, _)| n != k);
            self.cookies.push((k.to_owned(), val.to_owned()));
        }
        let status = res.status();
        let location = res
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned());
        Page {
            status,
            location,
            text: res.text().await.unwrap(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub async fn get(&mut self, path_and_query: &str) -> Page {
        let res = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.take(res).await
    }

    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let res = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .form(form)
            .send()
            .await
            .unwrap();
        self.take(res).await
    }

    /// Posts the sign-in form of the pending authorization.
    pub async fn sign_in(&mut self, csrf: &str, email: &str, password: &str) -> Page {
        self.post(
            "/oauth/authorize/signin",
            &[("csrf", csrf), ("email", email), ("password", password)],
        )
        .await
    }

    /// Posts the consent form: `"approve"` or `"deny"`.
    pub async fn consent(&mut self, csrf: &str, decision: &str) -> Page {
        self.post(
            "/oauth/authorize/consent",
            &[("csrf", csrf), ("decision", decision)],
        )
        .await
    }
}

pub fn authorize_query(
    client: &str,
    redirect: &str,
    scope: &str,
    challenge: Option<&str>,
) -> String {
    let mut q = format!(
        "/oauth/authorize?response_type=code&client_id={}&redirect_uri={}&scope={}&state=st-123&nonce=n-456",
        urlencoding::encode(client),
        urlencoding::encode(redirect),
        urlencoding::encode(scope)
    );
    if let Some(c) = challenge {
        q.push_str(&format!("&code_challenge={c}&code_challenge_method=S256"));
    }
    q
}

/// Runs the browser part: authorize → sign in → consent → the redirect's code.
pub async fn get_code(
    app: &TestApp,
    client: &str,
    redirect: &str,
    scope: &str,
    challenge: &str,
    email: &str,
) -> String {
    let mut b = Browser::new(app);
    let p = b
        .get(&authorize_query(client, redirect, scope, Some(challenge)))
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    assert!(p.text.contains("<form"), "{}", p.text);
    let csrf = p.csrf();
    let p = b.sign_in(&csrf, email, PASSWORD).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    assert!(p.text.contains("Allow access"), "{}", p.text);
    let p = b.consent(&csrf, "approve").await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.text);
    assert!(p.location.as_deref().unwrap().starts_with(redirect));
    assert_eq!(p.param("state").as_deref(), Some("st-123"));
    p.param("code").expect("code in redirect")
}

/// `POST /oauth/token` with `grant_type=client_credentials`, authenticated as client
/// `id` with `secret`.
pub async fn client_credentials_grant(app: &TestApp, id: &str, secret: &str) -> Resp {
    form_post(
        app,
        "/oauth/token",
        Some((id, secret)),
        &[("grant_type", "client_credentials")],
    )
    .await
}

pub async fn form_post(
    app: &TestApp,
    path: &str,
    basic: Option<(&str, &str)>,
    fields: &[(&str, &str)],
) -> Resp {
    let mut req = app.http.post(format!("{}{path}", app.base)).form(fields);
    if let Some((u, p)) = basic {
        req = req.basic_auth(u, Some(p));
    }
    read(req.send().await.unwrap()).await
}

pub async fn exchange(
    app: &TestApp,
    c: &OClient,
    code: &str,
    redirect: &str,
    verifier: &str,
) -> Resp {
    form_post(
        app,
        "/oauth/token",
        Some((&c.id, c.secret.as_deref().unwrap_or(""))),
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect),
            ("code_verifier", verifier),
        ],
    )
    .await
}

async fn introspect(app: &TestApp, c: &OClient, token: &str) -> Resp {
    form_post(
        app,
        "/oauth/introspect",
        Some((&c.id, c.secret.as_deref().unwrap())),
        &[("token", token)],
    )
    .await
}

async fn user_email(app: &TestApp, email: &str) {
    let r = app.register(email).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}

#[tokio::test]
async fn code_flow_with_pkce_ids_userinfo_refresh_introspect_revoke() {
    each_backend!(code_flow_case);
}

async fn code_flow_case(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.admin().await.access;
    let c = web_client(&app, &admin).await;
    assert!(c.secret.is_some());
    user_email(&app, "olivia@example.com").await;
    let (verifier, challenge) = pkce();
    let code = get_code(
        &app,
        &c.id,
        CB,
        "openid profile email offline_access",
        &challenge,
        "olivia@example.com",
    )
    .await;
    let r = exchange(&app, &c, &code, CB, &verifier).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let access = r.body["access_token"].as_str().unwrap().to_owned();
    let refresh = r.body["refresh_token"].as_str().unwrap().to_owned();
    let id_token = r.body["id_token"].as_str().unwrap().to_owned();
    assert_eq!(r.body["token_type"], "Bearer");

    // The ID token: EdDSA, verifiable with the JWKS, for this client, with the nonce.
    let jwks = app.get("/.well-known/jwks.json", None).await.body;
    let keys = vaultpay_core::jwt::KeySet::from_jwks(&jwks).unwrap();
    let claims: Value = keys.verify_signature(&id_token).unwrap();
    assert_eq!(jwt_part(&id_token, 0)["alg"], "EdDSA");
    // an access token says so in its header (RFC 9068); an ID token does not, and is
    // refused where an access token is expected
    assert_eq!(jwt_part(&access, 0)["typ"], "at+jwt");
    assert_eq!(jwt_part(&id_token, 0)["typ"], "JWT");
    let r = app.get("/userinfo", Some(&id_token)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
    assert_eq!(r.body["error"], "invalid_token", "{}", r.text);
    assert_eq!(claims["aud"], c.id.as_str());
    assert_eq!(claims["nonce"], "n-456");
    assert_eq!(claims["email"], "olivia@example.com");
    assert_eq!(claims["iss"], app.cfg.auth.issuer.as_str());
    let access_claims = jwt_part(&access, 1);
    assert_eq!(access_claims["client_id"], c.id.as_str());
    assert_eq!(access_claims["sub"], claims["sub"]);
    // Without `api` an OAuth token carries no roles and cannot use the first-party API.
    assert_eq!(access_claims["roles"], json!([]));
    let me = app.get("/v1/sessions", Some(&access)).await;
    me.assert_problem(403, "forbidden");

    // Userinfo.
    let ui = app.get("/userinfo", Some(&access)).await;
    assert_eq!(ui.status, StatusCode::OK, "{}", ui.text);
    assert_eq!(ui.body["sub"], claims["sub"]);
    assert_eq!(ui.body["email"], "olivia@example.com");
    assert_eq!(ui.body["name"], "Test User");

    // Introspection by the client.
    let i = introspect(&app, &c, &access).await;
    assert_eq!(i.body["active"], true, "{}", i.text);
    assert_eq!(i.body["client_id"], c.id.as_str());
    assert!(i.body["scope"].as_str().unwrap().contains("openid"));
    let i = introspect(&app, &c, &refresh).await;
    assert_eq!(i.body["active"], true, "{}", i.text);
    assert_eq!(i.body["token_type"], "refresh_token");

    // Another client sees nothing of these tokens.
    let other = create_client(&app, &admin, json!({ "name": "Other", "redirect_uris": [CB], "grant_types": ["authorization_code", "refresh_token", "client_credentials"] })).await;
    assert_eq!(
        introspect(&app, &other, &access).await.body["active"],
        false
    );

    // First-party refresh of an OAuth session's token is refused (no device id matches).
    let fp = app
        .token_form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("device_id", "dev-1"),
        ])
        .await;
    assert_oauth_error(&fp, 400, "invalid_grant");
    // That attempt revoked the session (a client mismatch, like reuse, ends the family).
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&c.id, c.secret.as_deref().unwrap())),
        &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
    )
    .await;
    assert_oauth_error(&r, 400, "invalid_grant");
    assert_eq!(introspect(&app, &c, &access).await.body["active"], false);

    // A fresh authorization: refresh rotates; the old refresh token is then reuse.
    let (verifier, challenge) = pkce();
    let code = get_code(
        &app,
        &c.id,
        CB,
        "openid offline_access",
        &challenge,
        "olivia@example.com",
    )
    .await;
    let r = exchange(&app, &c, &code, CB, &verifier).await;
    let rt1 = r.body["refresh_token"].as_str().unwrap().to_owned();
    let r = form_post(
        &app,
        "/oauth/token",
        None,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt1),
            ("client_id", &c.id),
            ("client_secret", c.secret.as_deref().unwrap()),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let rt2 = r.body["refresh_token"].as_str().unwrap().to_owned();
    let at2 = r.body["access_token"].as_str().unwrap().to_owned();
    assert!(r.body["id_token"].is_string());
    assert_eq!(jwt_part(&at2, 1)["client_id"], c.id.as_str());
    // A scope beyond the grant is refused before the token is rotated, so the client's
    // retry with the same token is a normal refresh, not reuse ending the session.
    let secret = c.secret.as_deref().unwrap();
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&c.id, secret)),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt2),
            ("scope", "openid admin"),
        ],
    )
    .await;
    assert_oauth_error(&r, 400, "invalid_scope");
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&c.id, secret)),
        &[("grant_type", "refresh_token"), ("refresh_token", &rt2)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let full = r.body["scope"].as_str().unwrap().to_owned();
    let rt2 = r.body["refresh_token"].as_str().unwrap().to_owned();
    // A narrower scope gives an access token of that scope (RFC 6749 §6); the grant
    // stays whole for the next refresh.
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&c.id, secret)),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt2),
            ("scope", "openid"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["scope"], "openid");
    let narrow = r.body["access_token"].as_str().unwrap();
    assert_eq!(jwt_part(narrow, 1)["scope"], "openid");
    let rt2 = r.body["refresh_token"].as_str().unwrap().to_owned();
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&c.id, secret)),
        &[("grant_type", "refresh_token"), ("refresh_token", &rt2)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["scope"], full.as_str());
    let rt2 = r.body["refresh_token"].as_str().unwrap().to_owned();
    let at2 = r.body["access_token"].as_str().unwrap().to_owned();
    // Refresh by another client: refused.
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&other.id, other.secret.as_deref().unwrap())),
        &[("grant_type", "refresh_token"), ("refresh_token", &rt2)],
    )
    .await;
    assert_oauth_error(&r, 400, "invalid_grant");
    assert_eq!(introspect(&app, &c, &at2).await.body["active"], false);

    // Revocation (RFC 7009) of a refresh token ends its session.
    let (verifier, challenge) = pkce();
    let code = get_code(
        &app,
        &c.id,
        CB,
        "openid offline_access",
        &challenge,
        "olivia@example.com",
    )
    .await;
    let r = exchange(&app, &c, &code, CB, &verifier).await;
    let rt = r.body["refresh_token"].as_str().unwrap().to_owned();
    let at = r.body["access_token"].as_str().unwrap().to_owned();
    // Another client's revocation is a silent no-op.
    let rv = form_post(
        &app,
        "/oauth/revoke",
        None,
        &[
            ("token", &rt),
            ("client_id", &other.id),
            ("client_secret", other.secret.as_deref().unwrap()),
        ],
    )
    .await;
    assert_eq!(rv.status, StatusCode::OK);
    assert_eq!(introspect(&app, &c, &at).await.body["active"], true);
    let rv = form_post(
        &app,
        "/oauth/revoke",
        Some((&c.id, c.secret.as_deref().unwrap())),
        &[("token", &rt), ("token_type_hint", "refresh_token")],
    )
    .await;
    assert_eq!(rv.status, StatusCode::OK, "{}", rv.text);
    assert_eq!(introspect(&app, &c, &at).await.body["active"], false);
    assert_eq!(
        app.get("/userinfo", Some(&at)).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Unknown tokens: 200 as well.
    let rv = form_post(
        &app,
        "/oauth/revoke",
        Some((&c.id, c.secret.as_deref().unwrap())),
        &[("token", "nonsense")],
    )
    .await;
    assert_eq!(rv.status, StatusCode::OK);

    // Without offline_access there is no refresh token.
    let (verifier, challenge) = pkce();
    let code = get_code(&app, &c.id, CB, "openid", &challenge, "olivia@example.com").await;
    let r = exchange(&app, &c, &code, CB, &verifier).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.body.get("refresh_token").is_none(), "{}", r.text);

    // Without `api` the ledger shows the token nothing of the user's (no wallets), and
    // /v1/me refuses it.
    let olivia = app.login("olivia@example.com", PASSWORD).await;
    let open = app
        .http
        .post(format!("{}/v1/accounts", app.base))
        .bearer_auth(&olivia.access)
        .header("idempotency-key", "olivia-open-1")
        .json(&json!({"currency": "USD", "kind": "current", "name": "Main"}))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), StatusCode::CREATED);
    let (verifier, challenge) = pkce();
    let code = get_code(
        &app,
        &c.id,
        CB,
        "openid email",
        &challenge,
        "olivia@example.com",
    )
    .await;
    let r = exchange(&app, &c, &code, CB, &verifier).await;
    let narrow = r.body["access_token"].as_str().unwrap().to_owned();
    // without `api` the ledger refuses the token outright (it used to answer as if
    // for a caller who owns nothing: 200 with an empty list)
    let l = app.get("/v1/accounts", Some(&narrow)).await;
    l.assert_problem(403, "forbidden");
    assert!(!l.text.contains("Main"), "{}", l.text);
    assert!(app
        .get("/v1/accounts", Some(&olivia.access))
        .await
        .text
        .contains("Main"));
    app.get("/v1/me", Some(&narrow))
        .await
        .assert_problem(403, "forbidden");

    // With `api` the token acts on the first-party API with the user's roles.
    let (verifier, challenge) = pkce();
    let code = get_code(
        &app,
        &c.id,
        CB,
        "openid api",
        &challenge,
        "olivia@example.com",
    )
    .await;
    let r = exchange(&app, &c, &code, CB, &verifier).await;
    let at = r.body["access_token"].as_str().unwrap();
    assert_eq!(jwt_part(at, 1)["roles"], json!(["customer"]));
    assert_eq!(
        app.get("/v1/sessions", Some(at)).await.status,
        StatusCode::OK
    );
    assert_eq!(app.get("/v1/me", Some(at)).await.status, StatusCode::OK);
    assert!(app
        .get("/v1/accounts", Some(at))
        .await
        .text
        .contains("Main"));

    assert!(!audit_action(&app, &admin, "oauth.code_exchanged")
        .await
        .is_empty());
    app.stop().await;
}

#[tokio::test]
async fn discovery_and_es256_id_tokens() {
    each_backend!(discovery_case);
}

async fn discovery_case(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let d = app.get("/.well-known/openid-configuration", None).await;
    assert_eq!(d.status, StatusCode::OK);
    assert_eq!(d.body["issuer"], app.cfg.auth.issuer.as_str());
    assert_eq!(d.body["code_challenge_methods_supported"], json!(["S256"]));
    assert!(d.body["id_token_signing_alg_values_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("ES256")));
    let doc = app.get("/openapi.json", None).await.body;
    for path in [
        "/oauth/authorize",
        "/oauth/token",
        "/oauth/revoke",
        "/oauth/device_authorization",
        "/v1/admin/clients",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    assert!(doc["paths"]["/userinfo"]["post"].is_object());
    // No ES256 key before an ES256 client exists; one after.
    let jwks = app.get("/.well-known/jwks.json", None).await.body;
    assert!(jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["kty"] == "OKP"));
    let admin = app.admin().await.access;
    let c = create_client(
        &app,
        &admin,
        json!({ "name": "Legacy", "redirect_uris": [CB], "id_token_alg": "ES256" }),
    )
    .await;
    user_email(&app, "ed@example.com").await;
    let (verifier, challenge) = pkce();
    let code = get_code(
        &app,
        &c.id,
        CB,
        "openid email",
        &challenge,
        "ed@example.com",
    )
    .await;
    let r = exchange(&app, &c, &code, CB, &verifier).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let id = r.body["id_token"].as_str().unwrap();
    let h = jwt_part(id, 0);
    assert_eq!(h["alg"], "ES256");
    let jwks = app.get("/.well-known/jwks.json", None).await.body;
    let ec = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kty"] == "EC")
        .expect("EC key in JWKS")
        .clone();
    assert_eq!(ec["kid"], h["kid"]);
    assert_eq!(ec["crv"], "P-256");
    // Access tokens stay EdDSA (what the ledger verifies).
    assert_eq!(
        jwt_part(r.body["access_token"].as_str().unwrap(), 0)["alg"],
        "EdDSA"
    );
    // The EdDSA-only verifier does not accept the ES256 token.
    let keys = vaultpay_core::jwt::KeySet::from_jwks(&jwks).unwrap();
    assert!(keys.verify_signature::<Value>(id).is_err());
    app.stop().await;
}

/// `keys rotate` rotates the ES256 ID-token key too (once there is one): new ID tokens
/// carry the new key, the JWKS keeps the old one for the overlap, and retiring it drops
/// it at once. The signing key cannot be retired.
#[tokio::test]
async fn the_es256_id_token_key_rotates_and_retires() {
    each_backend!(es256_rotation_case);
}

async fn es256_rotation_case(backend: Backend) {
    use vaultpay_auth::oauth::es256;
    let app = TestApp::spawn(backend).await;
    let admin = app.admin().await.access;
    let env = crate::auth_attacks::envelope(&app);
    let db = app.auth_db();
    assert_eq!(
        es256::rotate(db, &env, 0, 3600, "test").await.unwrap(),
        None
    );
    let c = create_client(
        &app,
        &admin,
        json!({ "name": "Legacy", "redirect_uris": [CB], "id_token_alg": "ES256" }),
    )
    .await;
    user_email(&app, "rot@example.com").await;
    let id_token_kid = || async {
        let (verifier, challenge) = pkce();
        let code = get_code(&app, &c.id, CB, "openid", &challenge, "rot@example.com").await;
        let r = exchange(&app, &c, &code, CB, &verifier).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let h = jwt_part(r.body["id_token"].as_str().unwrap(), 0);
        assert_eq!(h["alg"], "ES256");
        h["kid"].as_str().unwrap().to_owned()
    };
    let ec_kids = || async {
        let jwks = app.get("/.well-known/jwks.json", None).await.body;
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["kty"] == "EC")
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let old = id_token_kid().await;
    assert_eq!(ec_kids().await, vec![old.clone()]);

    let new = es256::rotate(db, &env, 0, 3600, "test")
        .await
        .unwrap()
        .unwrap();
    assert_ne!(new, old);
    app.auth().reload_keys().await.unwrap();
    assert_eq!(id_token_kid().await, new);
    assert_eq!(ec_kids().await, vec![new.clone(), old.clone()]);

    assert!(!vaultpay_auth::keys::retire(db, &new, "test").await.unwrap());
    assert!(vaultpay_auth::keys::retire(db, &old, "test").await.unwrap());
    assert_eq!(ec_kids().await, vec![new.clone()]);
    assert_eq!(id_token_kid().await, new);
    // a staged rotation: the next key is in the JWKS at once, the current one signs on
    let staged = es256::rotate(db, &env, 3600, 3600, "test")
        .await
        .unwrap()
        .unwrap();
    app.auth().reload_keys().await.unwrap();
    assert_eq!(ec_kids().await, vec![staged.clone(), new.clone()]);
    assert_eq!(id_token_kid().await, new);
    assert!(!vaultpay_auth::keys::retire(db, &new, "test").await.unwrap());
    // an hour on, the staged key signs; the one it replaced is still in the JWKS
    crate::auth_attacks::an_hour_passes_for(db, "oauth_es256_keys").await;
    app.auth().reload_keys().await.unwrap();
    assert_eq!(id_token_kid().await, staged);
    assert_eq!(ec_kids().await, vec![staged.clone(), new.clone()]);
    assert_eq!(
        app.count_where(
            "audit_log",
            "action = 'key.rotated' AND metadata LIKE '%ES256%'"
        )
        .await,
        2
    );
    app.stop().await;
}

/// Both keys rotated with no publication delay, the old ones verifying for an hour.
const NOW_3600: vaultpay_auth::keys::Rotation = vaultpay_auth::keys::Rotation {
    publish_ahead_secs: 0,
    overlap_secs: 3600,
    id_overlap_secs: 3600,
};

/// `vaultpay keys rotate` rotates the Ed25519 signing key and the ES256 ID-token key in
/// one transaction: when the second cannot be made, the first is not rotated either.
#[tokio::test]
async fn rotating_both_keys_is_all_or_nothing() {
    each_backend!(|backend: Backend| async move {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await.access;
        let env = crate::auth_attacks::envelope(&app);
        let db = app.auth_db();
        // an ES256 client makes the ES256 key
        create_client(
            &app,
            &admin,
            json!({ "name": "Legacy", "redirect_uris": [CB], "id_token_alg": "ES256" }),
        )
        .await;
        let keys = || async {
            (
                app.count_where("signing_keys", "retired_at IS NULL").await,
                app.count("signing_keys").await,
                app.count("oauth_es256_keys").await,
            )
        };
        let before = keys().await;
        assert_eq!((before.0, before.2), (1, 1));
        let sqls: &[&str] = match backend {
            Backend::Sqlite => &["CREATE TRIGGER no_ec BEFORE INSERT ON oauth_es256_keys \
                 BEGIN SELECT RAISE(ABORT, 'injected fault'); END"],
            Backend::Postgres => &[
                "CREATE FUNCTION no_ec() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 RAISE EXCEPTION 'injected fault'; END; $$",
                "CREATE TRIGGER no_ec BEFORE INSERT ON oauth_es256_keys FOR EACH ROW \
                 EXECUTE FUNCTION no_ec()",
            ],
        };
        for s in sqls {
            sqlx::raw_sql(s).execute(db.writer()).await.unwrap();
        }
        assert!(vaultpay_auth::keys::rotate_all(db, &env, NOW_3600, "test")
            .await
            .is_err());
        assert_eq!(keys().await, before, "a half rotation");
        sqlx::raw_sql(match backend {
            Backend::Sqlite => "DROP TRIGGER no_ec",
            Backend::Postgres => "DROP TRIGGER no_ec ON oauth_es256_keys",
        })
        .execute(db.writer())
        .await
        .unwrap();
        let (_, ec, _) = vaultpay_auth::keys::rotate_all(db, &env, NOW_3600, "test")
            .await
            .unwrap();
        assert!(ec.is_some());
        assert_eq!(keys().await, (1, before.1 + 1, before.2 + 1));
        app.stop().await;
    });
}

#[tokio::test]
async fn authorize_refuses_bad_requests() {
    each_backend!(authorize_bad_case);
}

async fn authorize_bad_case(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.admin().await.access;
    let c = web_client(&app, &admin).await;
    let public = create_client(
        &app,
        &admin,
        json!({ "name": "CLI", "public": true, "redirect_uris": ["http://127.0.0.1/cb"] }),
    )
    .await;
    assert!(public.secret.is_none());
    let mut b = Browser::new(&app);
    let (_, challenge) = pkce();

    // Unknown client: an error page, never a redirect.
    let p = b
        .get(&authorize_query("vpc_nope", CB, "openid", Some(&challenge)))
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.location.is_none());
    assert!(p.text.contains("Unknown application"));
    // Redirect URI not registered: error page, no redirect to the attacker.
    let p = b
        .get(&authorize_query(
            &c.id,
            "https://evil.example/cb",
            "openid",
            Some(&challenge),
        ))
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.location.is_none(), "{:?}", p.location);
    let p = b
        .get(&authorize_query(
            &c.id,
            "https://app.example/cb/extra",
            "openid",
            Some(&challenge),
        ))
        .await;
    assert!(p.location.is_none());
    // Plain PKCE is refused (back to the verified redirect, with state).
    let p = b
        .get(
            &(authorize_query(&c.id, CB, "openid", None)
                + "&code_challenge="
                + &challenge
                + "&code_challenge_method=plain"),
        )
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(p.param("error").as_deref(), Some("invalid_request"));
    assert_eq!(p.param("state").as_deref(), Some("st-123"));
    // A challenge without a method defaults to plain: refused too.
    let p = b
        .get(&(authorize_query(&c.id, CB, "openid", None) + "&code_challenge=" + &challenge))
        .await;
    assert_eq!(p.param("error").as_deref(), Some("invalid_request"));
    // A confidential client binds its code with PKCE or an OIDC nonce (RFC 9700
    // §2.1.1): with neither, refused; a nonce with openid is enough.
    let bare = authorize_query(&c.id, CB, "openid", None).replace("&nonce=n-456", "");
    for q in [
        bare.clone(),
        bare.replace("scope=openid", "scope=profile") + "&nonce=n-1",
    ] {
        let p = Browser::new(&app).get(&q).await;
        assert_eq!(p.status, StatusCode::SEE_OTHER, "{q}");
        assert_eq!(p.param("error").as_deref(), Some("invalid_request"), "{q}");
    }
    let p = Browser::new(&app)
        .get(&authorize_query(&c.id, CB, "openid", None))
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    // Public client without PKCE.
    let p = b
        .get(&authorize_query(
            &public.id,
            "http://127.0.0.1:40123/cb",
            "openid",
            None,
        ))
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(p.param("error").as_deref(), Some("invalid_request"));
    assert!(p
        .location
        .unwrap()
        .starts_with("http://127.0.0.1:40123/cb?"));
    // Loopback redirect with any port works for the native client (RFC 8252).
    let p = b
        .get(&authorize_query(
            &public.id,
            "http://127.0.0.1:40123/cb",
            "openid",
            Some(&challenge),
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    // Scope not allowed for the client.
    let p = b
        .get(&authorize_query(
            &public.id,
            "http://127.0.0.1:1/cb",
            "openid api",
            Some(&challenge),
        ))
        .await;
    assert_eq!(p.param("error").as_deref(), Some("invalid_scope"));
    // A scope longer than any this server grants (one allowed scope repeated): refused
    // by its length before it is split.
    let long = vec!["openid"; 200].join(" ");
    let p = b
        .get(&authorize_query(&c.id, CB, &long, Some(&challenge)))
        .await;
    assert_eq!(p.param("error").as_deref(), Some("invalid_scope"));
    let d = p.param("error_description").unwrap_or_default();
    assert!(urlencoding::decode(&d).unwrap().contains("too long"), "{d}");
    // A repeated parameter (RFC 6749 §3.1): an error page, not a redirect to either
    // redirect URI, whichever a filter in front may have read.
    let requests = app.count("oauth_requests").await;
    for extra in [
        "&redirect_uri=https%3A%2F%2Fevil.example%2Fcb",
        "&scope=openid%20api",
        "&state=other",
    ] {
        let p = b
            .get(&(authorize_query(&c.id, CB, "openid", Some(&challenge)) + extra))
            .await;
        assert_eq!(p.status, StatusCode::BAD_REQUEST, "{extra}");
        assert!(p.location.is_none(), "{extra}: {:?}", p.location);
        assert!(p.text.contains("repeats a parameter"), "{extra}");
    }
    assert_eq!(app.count("oauth_requests").await, requests);
    // Unsupported response type.
    let p = b
        .get(
            &authorize_query(&c.id, CB, "openid", Some(&challenge))
                .replace("response_type=code", "response_type=token"),
        )
        .await;
    assert_eq!(
        p.param("error").as_deref(),
        Some("unsupported_response_type")
    );
    // OIDC parameters: prompt=none cannot be answered without a page (every
    // authorization signs the user in), request objects are not supported, and
    // malformed prompt / max_age values are refused; nothing is stored for them.
    let requests = app.count("oauth_requests").await;
    let base = authorize_query(&c.id, CB, "openid", Some(&challenge));
    for (extra, error) in [
        ("&prompt=none", "login_required"),
        ("&prompt=none%20login", "invalid_request"),
        ("&prompt=bogus", "invalid_request"),
        ("&max_age=-1", "invalid_request"),
        ("&max_age=soon", "invalid_request"),
        ("&request=eyJhbGciOiJub25lIn0.e30.", "request_not_supported"),
        (
            "&request_uri=https%3A%2F%2Fevil.example%2Fr",
            "request_uri_not_supported",
        ),
    ] {
        let p = b.get(&format!("{base}{extra}")).await;
        assert_eq!(p.status, StatusCode::SEE_OTHER, "{extra}: {}", p.text);
        assert_eq!(p.param("error").as_deref(), Some(error), "{extra}");
        assert_eq!(p.param("state").as_deref(), Some("st-123"), "{extra}");
        // RFC 9207: the issuer on error responses too
        let iss = p
            .param("iss")
            .map(|i| urlencoding::decode(&i).unwrap().into_owned());
        assert_eq!(
            iss.as_deref(),
            Some(app.auth().config().issuer.as_str()),
            "{extra}"
        );
        assert!(p.location.as_deref().unwrap().starts_with(CB), "{extra}");
    }
    assert_eq!(app.count("oauth_requests").await, requests);
    // prompt=login / consent and max_age are honoured by the fresh sign-in every
    // authorization gets; login_hint pre-fills the email (escaped)
    let p = b
        .get(&format!(
            "{base}&prompt=login%20consent&max_age=0&login_hint=%22%3E%3Cx%3Ea%40example.com"
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    assert!(
        p.text
            .contains("value=\"&quot;&gt;&lt;x&gt;a@example.com\""),
        "{}",
        p.text
    );
    assert!(!p.text.contains("<x>"));

    // CSRF: a sign-in post with the wrong token (or without the cookie) is refused.
    let mut b = Browser::new(&app);
    let p = b
        .get(&authorize_query(&c.id, CB, "openid", Some(&challenge)))
        .await;
    let csrf = p.csrf();
    user_email(&app, "csrf@example.com").await;
    let bad = b
        .post(
            "/oauth/authorize/signin",
            &[
                ("csrf", "forged"),
                ("email", "csrf@example.com"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(bad.status, StatusCode::FORBIDDEN);
    let mut other = Browser::new(&app);
    let bad = other.sign_in(&csrf, "csrf@example.com", PASSWORD).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    // Consent before sign-in: refused.
    let bad = b.consent(&csrf, "approve").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.location.is_none());
    // Wrong password: the form again, 401.
    let p = b
        .sign_in(&csrf, "csrf@example.com", "wrong-password-123")
        .await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    assert!(p.text.contains("wrong"));
    // Deny: access_denied to the client.
    let p = b.sign_in(&csrf, "csrf@example.com", PASSWORD).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    let p = b.consent(&csrf, "deny").await;
    assert_eq!(p.param("error").as_deref(), Some("access_denied"));
    assert_eq!(p.param("state").as_deref(), Some("st-123"));
    assert!(p.param("iss").is_some(), "{:?}", p.location);
    // The request is spent.
    let p = b.consent(&csrf, "approve").await;
    assert!(p.location.is_none());
    app.stop().await;
}

#[tokio::test]
async fn token_endpoint_refuses_bad_input() {
    each_backend!(token_bad_case);
}

async fn token_bad_case(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.admin().await.access;
    let c = web_client(&app, &admin).await;
    let secret = c.secret.clone().unwrap();
    user_email(&app, "tom@example.com").await;

    // Unknown client and bad secret: 401 invalid_client with a Basic challenge.
    let r = form_post(
        &app,
        "/oauth/token",
        Some(("vpc_unknown", "x")),
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_oauth_error(&r, 401, "invalid_client");
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));
    let r = client_credentials_grant(&app, &c.id, "wrong-secret").await;
    assert_oauth_error(&r, 401, "invalid_client");
    let r = form_post(
        &app,
        "/oauth/token",
        None,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", &c.id),
            ("client_secret", "wrong"),
            ("code", "x"),
        ],
    )
    .await;
    assert_oauth_error(&r, 401, "invalid_client");
    // A confidential client without its secret.
    let r = form_post(
        &app,
        "/oauth/token",
        None,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", &c.id),
            ("code", "x"),
        ],
    )
    .await;
    assert_oauth_error(&r, 401, "invalid_client");
    // Both methods at once.
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&c.id, &secret)),
        &[
            ("grant_type", "authorization_code"),
            ("client_secret", &secret),
            ("code", "x"),
        ],
    )
    .await;
    assert_oauth_error(&r, 400, "invalid_request");
    // Wrong grant for the client.
    let r = client_credentials_grant(&app, &c.id, &secret).await;
    assert_oauth_error(&r, 400, "unauthorized_client");
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&c.id, &secret)),
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", "x"),
        ],
    )
    .await;
    assert_oauth_error(&r, 400, "unauthorized_client");
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&c.id, &secret)),
        &[("grant_type", "password")],
    )
    .await;
    assert_oauth_error(&r, 400, "unsupported_grant_type");

    // PKCE verifier mismatch.
    let (verifier, challenge) = pkce();
    let code = get_code(
        &app,
        &c.id,
        CB,
        "openid offline_access",
        &challenge,
        "tom@example.com",
    )
    .await;
    let (other_verifier, _) = pkce();
    let r = exchange(&app, &c, &code, CB, &other_verifier).await;
    assert_oauth_error(&r, 400, "invalid_grant");
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&c.id, &secret)),
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", CB),
        ],
    )
    .await;
    assert_oauth_error(&r, 400, "invalid_grant");
    // Wrong redirect_uri.
    let r = exchange(&app, &c, &code, "https://app.example/other", &verifier).await;
    assert_oauth_error(&r, 400, "invalid_grant");
    // Another client cannot redeem it.
    let other = web_client(&app, &admin).await;
    let r = exchange(&app, &other, &code, CB, &verifier).await;
    assert_oauth_error(&r, 400, "invalid_grant");
    // The right verifier still works (failed attempts do not burn the code)...
    let r = exchange(&app, &c, &code, CB, &verifier).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let access = r.body["access_token"].as_str().unwrap().to_owned();
    let refresh = r.body["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(introspect(&app, &c, &access).await.body["active"], true);
    // ...and a replay of the code is refused and revokes what it issued.
    let r = exchange(&app, &c, &code, CB, &verifier).await;
    assert_oauth_error(&r, 400, "invalid_grant");
    assert!(r.body["error_description"]
        .as_str()
        .unwrap()
        .contains("revoked"));
    assert_eq!(introspect(&app, &c, &access).await.body["active"], false);
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&c.id, &secret)),
        &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
    )
    .await;
    assert_oauth_error(&r, 400, "invalid_grant");
    assert_eq!(
        app.get("/userinfo", Some(&access)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert!(!audit_action(&app, &admin, "oauth.code_reuse")
        .await
        .is_empty());

    // Expired code.
    let (verifier, challenge) = pkce();
    let code = get_code(&app, &c.id, CB, "openid", &challenge, "tom@example.com").await;
    sqlx::query("UPDATE oauth_codes SET expires_at = 1 WHERE used_at IS NULL")
        .execute(app.auth_db().writer())
        .await
        .unwrap();
    let r = exchange(&app, &c, &code, CB, &verifier).await;
    assert_oauth_error(&r, 400, "invalid_grant");
    assert!(r.body["error_description"]
        .as_str()
        .unwrap()
        .contains("expired"));
    // Codes are stored hashed.
    let n: i64 = {
        use sqlx::Row;
        sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM oauth_codes WHERE code_hash = $1")
            .bind(&code)
            .fetch_one(app.auth_db().read())
            .await
            .unwrap()
            .get("n")
    };
    assert_eq!(n, 0);
    // Garbage never 500s.
    let r = app
        .post_raw(
            "/oauth/token",
            "application/x-www-form-urlencoded",
            "%%%&&==",
        )
        .await;
    assert!(r.status.is_client_error(), "{}", r.text);
    let r = app
        .post_raw("/oauth/introspect", "application/json", "{}")
        .await;
    assert!(r.status.is_client_error(), "{}", r.text);
    app.stop().await;
}

#[tokio::test]
async fn client_credentials_and_admin_api() {
    each_backend!(client_credentials_case);
}

async fn client_credentials_case(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.admin().await.access;
    // Only clients:manage may register clients.
    let u = app.user("carl@example.com").await;
    let r = app
        .post(
            "/v1/admin/clients",
            Some(&u.access),
            json!({ "name": "x", "grant_types": ["client_credentials"] }),
        )
        .await;
    r.assert_problem(403, "forbidden");
    // A service client acts for itself: no user scopes unless asked for.
    let r = app
        .post(
            "/v1/admin/clients",
            Some(&admin),
            json!({ "name": "svc-defaults", "grant_types": ["client_credentials"] }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["scopes"], json!([]));
    // Metadata is validated.
    let r = app
        .post(
            "/v1/admin/clients",
            Some(&admin),
            json!({ "name": "x", "redirect_uris": ["http://evil.example/cb"] }),
        )
        .await;
    r.assert_problem(422, "invalid_client_metadata");
    let r = app
        .post(
            "/v1/admin/clients",
            Some(&admin),
            json!({ "name": "x", "public": true, "grant_types": ["client_credentials"] }),
        )
        .await;
    r.assert_problem(422, "invalid_client_metadata");
    let r = app
        .post(
            "/v1/admin/clients",
            Some(&admin),
            json!({ "name": "x", "grant_types": ["implicit"] }),
        )
        .await;
    r.assert_problem(422, "invalid_client_metadata");

    // A user scope makes no sense without a user: refused at registration too.
    for scope in ["openid", "api"] {
        let r = app
            .post(
                "/v1/admin/clients",
                Some(&admin),
                json!({ "name": "Batch job", "grant_types": ["client_credentials"], "scopes": [scope] }),
            )
            .await;
        r.assert_problem(422, "invalid_client_metadata");
        assert!(r.text.contains("acts for itself"), "{}", r.text);
    }
    let svc = create_client(
        &app,
        &admin,
        json!({ "name": "Batch job", "grant_types": ["client_credentials"] }),
    )
    .await;
    let secret = svc.secret.clone().unwrap();
    let r = client_credentials_grant(&app, &svc.id, &secret).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.body.get("refresh_token").is_none());
    let at = r.body["access_token"].as_str().unwrap().to_owned();
    let claims = jwt_part(&at, 1);
    assert_eq!(claims["sub"], svc.id.as_str());
    assert_eq!(claims["client_id"], svc.id.as_str());
    assert_eq!(claims["roles"], json!([]));
    // client_secret_post works as well.
    let r = form_post(
        &app,
        "/oauth/token",
        None,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &svc.id),
            ("client_secret", &secret),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // A user scope makes no sense without a user.
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&svc.id, &secret)),
        &[("grant_type", "client_credentials"), ("scope", "openid")],
    )
    .await;
    assert_oauth_error(&r, 400, "invalid_scope");
    // The token is no key to the user API or the ledger.
    assert!(app
        .get("/v1/sessions", Some(&at))
        .await
        .status
        .is_client_error());
    let open = app
        .http
        .post(format!("{}/v1/accounts", app.base))
        .bearer_auth(&at)
        .header("idempotency-key", "cc-open-1")
        .json(&json!({"currency": "USD", "kind": "current", "name": "Main"}))
        .send()
        .await
        .unwrap();
    let open = read(open).await;
    open.assert_problem(403, "forbidden");
    // every ledger route refuses it alike, reads included (not an empty list)
    for path in ["/v1/accounts", "/v1/admin/failed-transfers"] {
        app.get(path, Some(&at))
            .await
            .assert_problem(403, "forbidden");
    }
    let transfer = ledger_post(
        &app,
        "/v1/transfers",
        &at,
        "cc-t-1",
        json!({"from_account_id": "a", "to_account_id": "b", "amount": 1, "currency": "USD", "description": ""}),
    )
    .await;
    transfer.assert_problem(403, "forbidden");
    // Introspection (client_secret_post) and revocation.
    let i = form_post(
        &app,
        "/oauth/introspect",
        None,
        &[
            ("token", &at),
            ("client_id", &svc.id),
            ("client_secret", &secret),
        ],
    )
    .await;
    assert_eq!(i.body["active"], true, "{}", i.text);
    assert_eq!(i.body["sub"], svc.id.as_str());
    let bad = form_post(
        &app,
        "/oauth/introspect",
        Some((&svc.id, "nope")),
        &[("token", &at)],
    )
    .await;
    assert_oauth_error(&bad, 401, "invalid_client");
    assert!(bad.header("www-authenticate").is_some());
    let rv = form_post(
        &app,
        "/oauth/revoke",
        Some((&svc.id, &secret)),
        &[("token", &at)],
    )
    .await;
    assert_eq!(rv.status, StatusCode::OK);
    let i = form_post(
        &app,
        "/oauth/introspect",
        Some((&svc.id, &secret)),
        &[("token", &at)],
    )
    .await;
    assert_eq!(i.body["active"], false);

    // A revocation made by another replica (straight into the shared database) counts
    // here too, within the in-memory set's reload interval.
    let r = client_credentials_grant(&app, &svc.id, &secret).await;
    let at2 = r.body["access_token"].as_str().unwrap().to_owned();
    let claims = crate::auth_flows::jwt_part(&at2, 1);
    let basic = (svc.id.as_str(), secret.as_str());
    let fields = [("token", at2.as_str())];
    let introspect2 = || form_post(&app, "/oauth/introspect", Some(basic), &fields);
    assert_eq!(introspect2().await.body["active"], true);
    sqlx::query("INSERT INTO oauth_revoked_tokens (jti, expires_at) VALUES ($1, $2)")
        .bind(claims["jti"].as_str().unwrap())
        .bind(claims["exp"].as_i64().unwrap() * 1_000_000)
        .execute(app.auth_db().writer())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if introspect2().await.body["active"] == false {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "another replica's revocation never counted"
        );
        tokio::task::yield_now().await;
    }

    // List and delete; deleting revokes the client's sessions.
    let l = app.get("/v1/admin/clients", Some(&admin)).await;
    assert_eq!(l.status, StatusCode::OK);
    assert!(l.body["clients"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["client_id"] == svc.id.as_str()));
    assert!(l.text.find("secret").is_none(), "{}", l.text);
    let web = web_client(&app, &admin).await;
    let (verifier, challenge) = pkce();
    let code = get_code(&app, &web.id, CB, "openid", &challenge, "carl@example.com").await;
    let r = exchange(&app, &web, &code, CB, &verifier).await;
    let at = r.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(app.get("/userinfo", Some(&at)).await.status, StatusCode::OK);
    assert_eq!(
        app.delete(&format!("/v1/admin/clients/{}", web.id), Some(&admin))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.get("/userinfo", Some(&at)).await.status,
        StatusCode::UNAUTHORIZED
    );
    app.delete(&format!("/v1/admin/clients/{}", web.id), Some(&admin))
        .await
        .assert_problem(404, "not_found");
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&web.id, web.secret.as_deref().unwrap())),
        &[("grant_type", "authorization_code"), ("code", "x")],
    )
    .await;
    assert_oauth_error(&r, 401, "invalid_client");
    app.stop().await;
}

/// "This wasn't me" refuses the sessions that grants issued before it would open: an
/// authorization code and an approved device code, both still unused when the lock is
/// set (directly here, to open that window deterministically), are refused with
/// `invalid_grant` and audited, and open no session.
#[tokio::test]
async fn a_locked_account_gets_no_session_from_an_earlier_grant() {
    each_backend!(locked_grant_case);
}

async fn locked_grant_case(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.auth.oauth.device_poll_interval_secs = 0).await;
    let admin = app.admin().await.access;
    let web = web_client(&app, &admin).await;
    let cli = device_client(&app, &admin).await;
    let email = "lena@example.com";
    let u = app.user(email).await;
    let (verifier, challenge) = pkce();
    let code = get_code(&app, &web.id, CB, "openid", &challenge, email).await;
    let d = device_start(&app, &cli, "openid api").await;
    let dc = d["device_code"].as_str().unwrap().to_owned();
    // a token of a session signed in long ago (a stolen one, say) approves nothing: an
    // approval mints a refreshable session of its own
    sqlx::query("UPDATE sessions SET auth_time = auth_time - 901000000 WHERE id = $1")
        .bind(&u.session)
        .execute(app.auth_db().writer())
        .await
        .unwrap();
    let r = crate::auth_flows::refresh(&app, &u.refresh).await;
    let old = r.body["access_token"].as_str().unwrap().to_owned();
    let r = app
        .post(
            "/v1/oauth/device/approve",
            Some(&old),
            json!({ "user_code": d["user_code"] }),
        )
        .await;
    r.assert_problem(401, "insufficient_user_authentication");
    let u = app.login(email, PASSWORD).await;
    let r = app
        .post(
            "/v1/oauth/device/approve",
            Some(&u.access),
            json!({ "user_code": d["user_code"] }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    sqlx::query("UPDATE users SET security_locked_at = 1 WHERE email = $1")
        .bind(email)
        .execute(app.auth_db().writer())
        .await
        .unwrap();
    let oauth_sessions = "client_id IS NOT NULL";
    let before = app.count_where("sessions", oauth_sessions).await;
    assert_oauth_error(
        &exchange(&app, &web, &code, CB, &verifier).await,
        400,
        "invalid_grant",
    );
    assert_oauth_error(&device_poll(&app, &cli, &dc).await, 400, "invalid_grant");
    assert_eq!(app.count_where("sessions", oauth_sessions).await, before);
    assert_eq!(
        app.count_where("audit_log", "action = 'login.refused_security_lock'")
            .await,
        2
    );
    app.stop().await;
}

/// A password reset, a password change and "log out everywhere" end the grants not yet
/// exchanged: an authorization code and an approved device code issued before it open
/// no session after it (whoever holds them may have had the old password). Another
/// user's grants are untouched.
#[tokio::test]
async fn revoking_a_users_sessions_ends_their_unexchanged_grants() {
    each_backend!(revoked_grants_case);
}

async fn revoked_grants_case(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.auth.oauth.device_poll_interval_secs = 0).await;
    let admin = app.admin().await.access;
    let web = web_client(&app, &admin).await;
    let cli = device_client(&app, &admin).await;
    let oauth_sessions = "client_id IS NOT NULL";
    for how in ["reset", "change", "logout_everywhere"] {
        let victim = format!("{how}@example.com");
        let other = format!("other-{how}@example.com");
        let v = app.user(&victim).await;
        let o = app.user(&other).await;
        // Each user: an authorization code and an approved device code, both unused, and
        // a browser signed in to an authorization request, at its consent page.
        let mut grants = Vec::new();
        let mut at_consent = Vec::new();
        for (email, tokens) in [(&victim, &v), (&other, &o)] {
            let (verifier, challenge) = pkce();
            let code = get_code(&app, &web.id, CB, "openid", &challenge, email).await;
            let (consent_verifier, consent_challenge) = pkce();
            let mut b = Browser::new(&app);
            let p = b
                .get(&authorize_query(
                    &web.id,
                    CB,
                    "openid",
                    Some(&consent_challenge),
                ))
                .await;
            let csrf = p.csrf();
            let p = b.sign_in(&csrf, email, PASSWORD).await;
            assert!(p.text.contains("Allow access"), "{}", p.text);
            at_consent.push((b, csrf, consent_verifier));
            let d = device_start(&app, &cli, "openid api").await;
            let r = app
                .post(
                    "/v1/oauth/device/approve",
                    Some(&tokens.access),
                    json!({ "user_code": d["user_code"] }),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            let dc = d["device_code"].as_str().unwrap().to_owned();
            grants.push((code, verifier, dc));
        }
        crate::auth_flows::end_sessions_by(&app, how, &victim, &v.access).await;
        let before = app.count_where("sessions", oauth_sessions).await;
        let (code, verifier, dc) = &grants[0];
        assert_oauth_error(
            &exchange(&app, &web, code, CB, verifier).await,
            400,
            "invalid_grant",
        );
        assert_oauth_error(&device_poll(&app, &cli, dc).await, 400, "expired_token");
        let (b, csrf, _) = &mut at_consent[0];
        let p = b.consent(csrf, "approve").await;
        assert_eq!(p.status, StatusCode::BAD_REQUEST, "{how}: {}", p.text);
        assert!(
            p.param("code").is_none(),
            "{how}: a code after the revocation"
        );
        assert_eq!(
            app.count_where("sessions", oauth_sessions).await,
            before,
            "{how}: a revoked grant opened a session"
        );
        // The other user's grants still work.
        let (code, verifier, dc) = &grants[1];
        let r = exchange(&app, &web, code, CB, verifier).await;
        assert_eq!(r.status, StatusCode::OK, "{how}: {}", r.text);
        let r = device_poll(&app, &cli, dc).await;
        assert_eq!(r.status, StatusCode::OK, "{how}: {}", r.text);
        let (b, csrf, verifier) = &mut at_consent[1];
        let p = b.consent(csrf, "approve").await;
        assert_eq!(p.status, StatusCode::SEE_OTHER, "{how}: {}", p.text);
        let code = p.param("code").expect("code in redirect");
        let r = exchange(&app, &web, &code, CB, verifier).await;
        assert_eq!(r.status, StatusCode::OK, "{how}: {}", r.text);
        assert_eq!(
            app.count_where("sessions", oauth_sessions).await,
            before + 3
        );
    }
    app.stop().await;
}

/// A public client for the device flow, with scopes `openid api`.
pub async fn device_client(app: &TestApp, admin: &str) -> OClient {
    create_client(
        app,
        admin,
        json!({ "name": "vaultpay CLI", "public": true,
                "grant_types": ["urn:ietf:params:oauth:grant-type:device_code"],
                "scopes": ["openid", "api"] }),
    )
    .await
}

pub async fn device_start(app: &TestApp, c: &OClient, scope: &str) -> Value {
    let r = form_post(
        app,
        "/oauth/device_authorization",
        None,
        &[("client_id", &c.id), ("scope", scope)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body
}

async fn device_poll(app: &TestApp, c: &OClient, device_code: &str) -> Resp {
    form_post(
        app,
        "/oauth/token",
        None,
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code),
            ("client_id", &c.id),
        ],
    )
    .await
}

#[tokio::test]
async fn device_flow() {
    each_backend!(device_case);
}

async fn device_case(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.auth.oauth.device_poll_interval_secs = 0).await;
    let admin = app.admin().await.access;
    let cli = create_client(
        &app,
        &admin,
        json!({ "name": "vaultpay CLI", "public": true,
                "grant_types": ["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"],
                "scopes": ["openid", "offline_access", "api"] }),
    )
    .await;
    let u = app.user("dora@example.com").await;

    // Approved from a signed-in session with a bearer token.
    let d = device_start(&app, &cli, "openid offline_access api").await;
    let dc = d["device_code"].as_str().unwrap().to_owned();
    let uc = d["user_code"].as_str().unwrap().to_owned();
    assert_eq!(uc.len(), 9);
    assert!(d["verification_uri"]
        .as_str()
        .unwrap()
        .ends_with("/oauth/device"));
    assert_oauth_error(
        &device_poll(&app, &cli, &dc).await,
        400,
        "authorization_pending",
    );
    let r = app
        .post(
            "/v1/oauth/device/approve",
            Some(&u.access),
            json!({ "user_code": uc.to_lowercase() }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let t = device_poll(&app, &cli, &dc).await;
    assert_eq!(t.status, StatusCode::OK, "{}", t.text);
    assert!(t.body["refresh_token"].is_string());
    let at = t.body["access_token"].as_str().unwrap();
    assert_eq!(
        app.get("/v1/sessions", Some(at)).await.status,
        StatusCode::OK
    );
    // The device code is single use.
    assert_oauth_error(&device_poll(&app, &cli, &dc).await, 400, "invalid_grant");
    // Approving again / unknown code: 404.
    app.post(
        "/v1/oauth/device/approve",
        Some(&u.access),
        json!({ "user_code": uc }),
    )
    .await
    .assert_problem(404, "device_code_unknown");
    // Refresh by the public client.
    let r = form_post(
        &app,
        "/oauth/token",
        None,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", t.body["refresh_token"].as_str().unwrap()),
            ("client_id", &cli.id),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // Denied through the page (sign in + code + deny), with its CSRF check.
    let d = device_start(&app, &cli, "openid").await;
    let dc = d["device_code"].as_str().unwrap().to_owned();
    let uc = d["user_code"].as_str().unwrap().to_owned();
    let mut b = Browser::new(&app);
    let p = b.get(&format!("/oauth/device?user_code={uc}")).await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(p.text.contains(&uc));
    // what is being approved: the client and the scopes it asks for (RFC 8628 §5.4)
    assert!(
        p.text
            .contains("<strong>vaultpay CLI</strong> on a device asks to"),
        "{}",
        p.text
    );
    assert!(p.text.contains("Know who you are"), "{}", p.text);
    // a code no request has: said so, nothing shown
    let unknown = Browser::new(&app)
        .get("/oauth/device?user_code=BCDF-GHJK")
        .await;
    assert!(
        unknown.text.contains("No pending request has this code"),
        "{}",
        unknown.text
    );
    assert!(!unknown.text.contains("asks to"));
    let csrf = p.csrf();
    let mut other = Browser::new(&app);
    let bad = other
        .post(
            "/oauth/device",
            &[
                ("csrf", &csrf),
                ("user_code", &uc),
                ("email", "dora@example.com"),
                ("password", PASSWORD),
                ("decision", "approve"),
            ],
        )
        .await;
    assert_eq!(bad.status, StatusCode::FORBIDDEN);
    let p = b
        .post(
            "/oauth/device",
            &[
                ("csrf", &csrf),
                ("user_code", &uc),
                ("shown", &uc),
                ("email", "dora@example.com"),
                ("password", "wrong-pass-1234"),
                ("decision", "approve"),
            ],
        )
        .await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    // the page that says so still counts the request as shown
    assert!(p.text.contains("name=\"shown\""), "{}", p.text);
    assert_oauth_error(
        &device_poll(&app, &cli, &dc).await,
        400,
        "authorization_pending",
    );
    let p = b
        .post(
            "/oauth/device",
            &[
                ("csrf", &csrf),
                ("user_code", &uc),
                ("email", "dora@example.com"),
                ("password", PASSWORD),
                ("decision", "deny"),
            ],
        )
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    assert_oauth_error(&device_poll(&app, &cli, &dc).await, 400, "access_denied");

    // Approved through the page, the code typed in: the first approval only shows what
    // the request asks for (RFC 8628 §5.4), the one from that page approves.
    let d = device_start(&app, &cli, "openid").await;
    let dc = d["device_code"].as_str().unwrap().to_owned();
    let uc = d["user_code"].as_str().unwrap().to_owned();
    let p = b.get("/oauth/device").await;
    let csrf = p.csrf();
    let typed = [
        ("csrf", csrf.as_str()),
        ("user_code", uc.as_str()),
        ("email", "dora@example.com"),
        ("password", PASSWORD),
        ("decision", "approve"),
    ];
    let p = b.post("/oauth/device", &typed).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    assert!(
        p.text
            .contains("<strong>vaultpay CLI</strong> on a device asks to"),
        "{}",
        p.text
    );
    assert_oauth_error(
        &device_poll(&app, &cli, &dc).await,
        400,
        "authorization_pending",
    );
    let mut confirmed = typed.to_vec();
    confirmed.push(("shown", uc.as_str()));
    let p = b.post("/oauth/device", &confirmed).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    assert!(p.text.contains("Device connected"), "{}", p.text);
    let t = device_poll(&app, &cli, &dc).await;
    assert_eq!(t.status, StatusCode::OK, "{}", t.text);
    assert!(t.body["id_token"].is_string());

    // Expired.
    let d = device_start(&app, &cli, "openid").await;
    sqlx::query("UPDATE oauth_device_codes SET expires_at = 1 WHERE status = 'pending'")
        .execute(app.auth_db().writer())
        .await
        .unwrap();
    assert_oauth_error(
        &device_poll(&app, &cli, d["device_code"].as_str().unwrap()).await,
        400,
        "expired_token",
    );
    // Another client's device code.
    let d = device_start(&app, &cli, "openid").await;
    let other = create_client(&app, &admin, json!({ "name": "other", "public": true, "grant_types": ["urn:ietf:params:oauth:grant-type:device_code"] })).await;
    assert_oauth_error(
        &device_poll(&app, &other, d["device_code"].as_str().unwrap()).await,
        400,
        "invalid_grant",
    );
    // Scope not allowed.
    let r = form_post(
        &app,
        "/oauth/device_authorization",
        None,
        &[("client_id", &other.id), ("scope", "api")],
    )
    .await;
    assert_oauth_error(&r, 400, "invalid_scope");
    app.stop().await;
}

#[tokio::test]
async fn device_flow_slow_down() {
    each_backend!(slow_down_case);
}

async fn slow_down_case(backend: Backend) {
    let app = TestApp::spawn_with(backend, |c| c.auth.oauth.device_poll_interval_secs = 30).await;
    let admin = app.admin().await.access;
    let cli = create_client(&app, &admin, json!({ "name": "cli", "public": true, "grant_types": ["urn:ietf:params:oauth:grant-type:device_code"] })).await;
    let d = device_start(&app, &cli, "openid").await;
    assert_eq!(d["interval"], 30);
    let dc = d["device_code"].as_str().unwrap();
    assert_oauth_error(
        &device_poll(&app, &cli, dc).await,
        400,
        "authorization_pending",
    );
    let r = device_poll(&app, &cli, dc).await;
    assert_oauth_error(&r, 400, "slow_down");
    assert!(r.body["error_description"].as_str().unwrap().contains("35"));
    app.stop().await;
}

#[tokio::test]
async fn redirect_uri_may_be_omitted_with_one_registered() {
    each_backend!(omitted_redirect_case);
}

async fn omitted_redirect_case(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.admin().await.access;
    let c = web_client(&app, &admin).await;
    user_email(&app, "ria@example.com").await;
    let (verifier, challenge) = pkce();
    let mut b = Browser::new(&app);
    let q = format!(
        "/oauth/authorize?response_type=code&client_id={}&scope=openid&state=s1&code_challenge={challenge}&code_challenge_method=S256",
        c.id
    );
    let p = b.get(&q).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    let csrf = p.csrf();
    b.sign_in(&csrf, "ria@example.com", PASSWORD).await;
    let p = b.consent(&csrf, "approve").await;
    assert!(p.location.as_deref().unwrap().starts_with(CB));
    let code = p.param("code").unwrap();
    // A redirect_uri the request did not name is refused; omitting it works.
    let r = exchange(&app, &c, &code, "https://app.example/elsewhere", &verifier).await;
    assert_oauth_error(&r, 400, "invalid_grant");
    let r = form_post(
        &app,
        "/oauth/token",
        Some((&c.id, c.secret.as_deref().unwrap())),
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // The sign-in step is audited.
    let signins = audit_action(&app, &admin, "oauth.signin").await;
    assert_eq!(signins.len(), 1);
    assert_eq!(signins[0]["resource"], c.id.as_str());
    app.stop().await;
}

/// A TestApp whose issuer is its real address (needed when another server calls it).
pub async fn spawn_addressed(
    backend: Backend,
    tweak: impl FnOnce(&mut vaultpay_server::Config),
) -> TestApp {
    let port = free_port();
    TestApp::spawn_with(backend, |c| {
        c.listen = format!("127.0.0.1:{port}").parse().unwrap();
        c.auth.issuer = format!("http://127.0.0.1:{port}");
        tweak(c);
    })
    .await
}

#[tokio::test]
async fn upstream_oidc_sign_in_with_another_vaultpay() {
    each_backend!(upstream_case);
}

async fn upstream_case(backend: Backend) {
    use crate::auth_flows::mail_token;
    // The upstream provider is another AuthShield.
    let up = spawn_addressed(backend, |_| {}).await;
    let up_admin = up.admin().await.access;
    let down_port = free_port();
    let cb = format!("http://127.0.0.1:{down_port}/oauth/authorize/upstream/corp/callback");
    let up_client = create_client(
        &up,
        &up_admin,
        json!({ "name": "Downstream", "redirect_uris": [cb], "scopes": ["openid", "email", "profile"] }),
    )
    .await;
    up.register("fed@example.com").await;
    let t = mail_token(&up, "fed@example.com", "verify-email?token=");
    assert_eq!(
        up.post("/v1/auth/verify-email", None, json!({ "token": t }))
            .await
            .status,
        StatusCode::OK
    );
    up.register("unverified@example.com").await;

    let up_issuer = up.cfg.auth.issuer.clone();
    let (cid, secret) = (up_client.id.clone(), up_client.secret.clone().unwrap());
    let down = TestApp::spawn_with(backend, move |c| {
        c.listen = format!("127.0.0.1:{down_port}").parse().unwrap();
        c.auth.issuer = format!("http://127.0.0.1:{down_port}");
        c.auth.oauth.upstream.insert(
            "corp".into(),
            vaultpay_auth::oauth::upstream::UpstreamConfig {
                kind: "oidc".into(),
                display_name: "Corp SSO".into(),
                issuer: Some(up_issuer),
                client_id: cid,
                client_secret: vaultpay_core::secret::Secret::new(secret),
                scopes: None,
                authorize_url: None,
                token_url: None,
                api_url: None,
                link_by_verified_email: false,
            },
        );
    })
    .await;
    let admin = down.admin().await.access;
    let web = web_client(&down, &admin).await;

    // One full federated sign-in; returns (downstream browser, callback path, ID token claims).
    async fn federated(
        down: &TestApp,
        up: &TestApp,
        web: &OClient,
        email: &str,
    ) -> (Browser, String, Page, String) {
        let (verifier, challenge) = pkce();
        let mut bd = Browser::new(down);
        let mut bu = Browser::new(up);
        let p = bd
            .get(&authorize_query(
                &web.id,
                CB,
                "openid email",
                Some(&challenge),
            ))
            .await;
        assert!(p.text.contains("Sign in with Corp SSO"), "{}", p.text);
        let csrf = p.csrf();
        let p = bd
            .post("/oauth/authorize/upstream/corp", &[("csrf", &csrf)])
            .await;
        assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.text);
        let to_up = p.location.unwrap();
        assert!(to_up.contains("code_challenge_method=S256") && to_up.contains("nonce="));
        let p = bu.get(to_up.strip_prefix(&up.base).unwrap()).await;
        assert_eq!(p.status, StatusCode::OK, "{}", p.text);
        let ucsrf = p.csrf();
        bu.sign_in(&ucsrf, email, PASSWORD).await;
        let p = bu.consent(&ucsrf, "approve").await;
        let back = p.location.unwrap();
        let path = back.strip_prefix(&down.base).unwrap().to_owned();
        let p = bd.get(&path).await;
        (bd, path, p, verifier)
    }

    let (mut bd, path, p, verifier) = federated(&down, &up, &web, "fed@example.com").await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    assert!(p.text.contains("Allow access"), "{}", p.text);
    let csrf = p.csrf();
    let p2 = bd.consent(&csrf, "approve").await;
    let code = p2.param("code").unwrap();
    let r = exchange(&down, &web, &code, CB, &verifier).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let id = jwt_part(r.body["id_token"].as_str().unwrap(), 1);
    assert_eq!(id["email"], "fed@example.com");
    assert_eq!(id["amr"], json!(["fed"]));
    let local_sub = id["sub"].clone();
    // A local account was created for the upstream identity, with the upstream email.
    assert_eq!(down.count("upstream_identities").await, 1);
    assert!(!audit_action(&down, &admin, "account.created_upstream")
        .await
        .is_empty());
    // The callback is single use.
    let again = bd.get(&path).await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    // A second sign-in reuses the link (no new account).
    let (mut bd, _, p, verifier) = federated(&down, &up, &web, "fed@example.com").await;
    let csrf = p.csrf();
    let p = bd.consent(&csrf, "approve").await;
    let r = exchange(&down, &web, &p.param("code").unwrap(), CB, &verifier).await;
    assert_eq!(
        jwt_part(r.body["id_token"].as_str().unwrap(), 1)["sub"],
        local_sub
    );
    assert_eq!(down.count("upstream_identities").await, 1);
    // A callback opened in another browser (no pending request cookie): refused.
    let mut stranger = Browser::new(&down);
    let (bd2, path2, _) = {
        // Stop before the downstream callback: redo the upstream part by hand.
        let (_, challenge) = pkce();
        let mut bd = Browser::new(&down);
        let mut bu = Browser::new(&up);
        let p = bd
            .get(&authorize_query(&web.id, CB, "openid", Some(&challenge)))
            .await;
        let csrf = p.csrf();
        let p = bd
            .post("/oauth/authorize/upstream/corp", &[("csrf", &csrf)])
            .await;
        let p = bu
            .get(p.location.unwrap().strip_prefix(&up.base).unwrap())
            .await;
        let ucsrf = p.csrf();
        bu.sign_in(&ucsrf, "fed@example.com", PASSWORD).await;
        let p = bu.consent(&ucsrf, "approve").await;
        let path = p
            .location
            .unwrap()
            .strip_prefix(&down.base)
            .unwrap()
            .to_owned();
        (bd, path, ())
    };
    let p = stranger.get(&path2).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST, "{}", p.text);
    drop(bd2);
    // An unverified upstream email creates nothing.
    let (_, _, p, _) = federated(&down, &up, &web, "unverified@example.com").await;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "{}", p.text);
    // An upstream identity whose email is a local account's is not merged silently.
    down.register("taken@example.com").await;
    up.register("taken@example.com").await;
    let t = mail_token(&up, "taken@example.com", "verify-email?token=");
    up.post("/v1/auth/verify-email", None, json!({ "token": t }))
        .await;
    let (_, _, p, _) = federated(&down, &up, &web, "taken@example.com").await;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "{}", p.text);
    assert!(p.text.contains("already exists"));
    assert_eq!(down.count("upstream_identities").await, 1);
    down.stop().await;
    up.stop().await;
}

/// A fake GitHub: token endpoint, `/user` and `/user/emails`; records token requests.
async fn fake_github() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::routing::{get, post};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s2 = seen.clone();
    let app = axum::Router::new()
        .route(
            "/login/oauth/access_token",
            post(move |headers: axum::http::HeaderMap, body: String| {
                let s2 = s2.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    s2.lock().unwrap().push(format!("{auth} {body}"));
                    axum::Json(json!({ "access_token": "gho_fake", "token_type": "bearer" }))
                }
            }),
        )
        .route(
            "/user",
            get(|| async {
                axum::Json(json!({ "id": 4242, "login": "octocat", "name": "Octo Cat" }))
            }),
        )
        .route(
            "/user/emails",
            get(|| async {
                axum::Json(json!([
                    { "email": "old@example.com", "primary": false, "verified": true },
                    { "email": "octo@example.com", "primary": true, "verified": true }
                ]))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn upstream_github_sign_in() {
    each_backend!(github_case);
}

async fn github_case(backend: Backend) {
    let (gh, seen) = fake_github().await;
    let g = gh.clone();
    let down = spawn_addressed(backend, move |c| {
        c.auth.oauth.upstream.insert("gh".into(), gh_config(g));
    })
    .await;
    let admin = down.admin().await.access;
    let web = web_client(&down, &admin).await;
    let (verifier, challenge) = pkce();
    let mut b = Browser::new(&down);
    let p = b
        .get(&authorize_query(
            &web.id,
            CB,
            "openid email profile",
            Some(&challenge),
        ))
        .await;
    assert!(p.text.contains("Sign in with GitHub"));
    let csrf = p.csrf();
    let p = b
        .post("/oauth/authorize/upstream/gh", &[("csrf", &csrf)])
        .await;
    let to_gh = p.location.unwrap();
    assert!(
        to_gh.starts_with(&format!("{gh}/login/oauth/authorize?")),
        "{to_gh}"
    );
    let state = p_param(&to_gh, "state");
    // GitHub sends the browser back with a code.
    let p = b
        .get(&format!(
            "/oauth/authorize/upstream/gh/callback?code=gh-code&state={}",
            urlencoding::encode(&state)
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    let token_request = seen.lock().unwrap()[0].clone();
    assert!(token_request.starts_with("Basic "), "{token_request}");
    assert!(token_request.contains("code=gh-code") && token_request.contains("code_verifier="));
    let csrf = p.csrf();
    let p = b.consent(&csrf, "approve").await;
    let r = exchange(&down, &web, &p.param("code").unwrap(), CB, &verifier).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let id = jwt_part(r.body["id_token"].as_str().unwrap(), 1);
    assert_eq!(id["email"], "octo@example.com");
    assert_eq!(id["name"], "Octo Cat");
    // The GitHub user id is the linked subject.
    use sqlx::Row;
    let subject: String =
        sqlx::query("SELECT subject FROM upstream_identities WHERE provider = 'gh'")
            .fetch_one(down.auth_db().read())
            .await
            .unwrap()
            .get("subject");
    assert_eq!(subject, "4242");
    // A forged state is refused.
    let p = b
        .get("/oauth/authorize/upstream/gh/callback?code=x&state=forged")
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);

    // Unlinking GitHub ends what a GitHub sign-in gave, and nothing else.
    // 1. the session of the exchange above
    let fed = r.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(introspect(&down, &web, &fed).await.body["active"], true);
    // 2. a code from a second GitHub sign-in, not yet exchanged
    let (mut b2, consent2, verifier2) = gh_to_consent(&down, &web, "openid").await;
    let code2 = b2
        .consent(&consent2, "approve")
        .await
        .param("code")
        .unwrap();
    // 3. a third GitHub sign-in left at its consent page
    let (mut b3, consent3, _) = gh_to_consent(&down, &web, "openid").await;
    // 4. an api-scoped GitHub session (which may not approve devices: only the user's
    // own first-party sessions do)
    let (mut b4, consent4, verifier4) = gh_to_consent(&down, &web, "openid api").await;
    let code4 = b4
        .consent(&consent4, "approve")
        .await
        .param("code")
        .unwrap();
    let fed_api = exchange(&down, &web, &code4, CB, &verifier4).await;
    let fed_api = fed_api.body["access_token"].as_str().unwrap().to_owned();
    let cli = device_client(&down, &admin).await;
    let start = device_start(&down, &cli, "openid api").await;
    down.post(
        "/v1/oauth/device/approve",
        Some(&fed_api),
        json!({ "user_code": start["user_code"] }),
    )
    .await
    .assert_problem(403, "first_party_session_required");
    let r = down.get("/v1/me", Some(&fed_api)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // each knows its provider (not only by its "fed" amr, which a session from before
    // auth migration 0009 is matched by)
    assert_eq!(
        down.count_where(
            "sessions",
            "upstream_provider = 'gh' AND revoked_at IS NULL"
        )
        .await,
        2
    );
    // The account gets a password (another account's hash) and a password session.
    down.user("donor.gh@example.com").await;
    sqlx::query(
        "UPDATE users SET password_hash = \
         (SELECT password_hash FROM users WHERE email = 'donor.gh@example.com') \
         WHERE email = 'octo@example.com'",
    )
    .execute(down.auth_db().writer())
    .await
    .unwrap();
    let octo = down.login("octo@example.com", PASSWORD).await;
    let r = down
        .delete("/v1/me/identities/gh", Some(&octo.access))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let r = introspect(&down, &web, &fed).await;
    assert_eq!(r.body["active"], false, "the sign-in's session lives on");
    let r = down.get("/v1/me", Some(&fed_api)).await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the api one's session lives on: {}",
        r.text
    );
    let r = exchange(&down, &web, &code2, CB, &verifier2).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.body["error"], "invalid_grant");
    let p = b3.consent(&consent3, "approve").await;
    assert!(
        p.param("code").is_none(),
        "a code after the unlink: {:?}",
        p.location
    );
    // the password session lives on
    let me = down.get("/v1/me", Some(&octo.access)).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.text);
    let entries = audit_action(&down, &admin, "account.unlinked_upstream").await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["metadata"]["sessions_ended"], 2);
    down.stop().await;
}

/// The fake GitHub at `g` as the upstream provider "gh".
fn gh_config(g: String) -> vaultpay_auth::oauth::upstream::UpstreamConfig {
    vaultpay_auth::oauth::upstream::UpstreamConfig {
        kind: "github".into(),
        display_name: "GitHub".into(),
        issuer: None,
        client_id: "gh-client".into(),
        client_secret: vaultpay_core::secret::Secret::new("gh-secret"),
        scopes: None,
        authorize_url: Some(format!("{g}/login/oauth/authorize")),
        token_url: Some(format!("{g}/login/oauth/access_token")),
        api_url: Some(g),
        link_by_verified_email: false,
    }
}

/// A new identity's first GitHub sign-in whose account insert meets an account made
/// meanwhile with the same address (PostgreSQL: a registration the test holds open,
/// committed while the sign-in waits on the unique key) is refused with the page for
/// an existing address, not a 500.
#[tokio::test]
async fn a_sign_in_racing_an_account_of_its_address_is_refused_cleanly() {
    if !vaultpay_store::testing::backends().contains(&Backend::Postgres) {
        return;
    }
    let (gh, _) = fake_github().await;
    let down = spawn_addressed(Backend::Postgres, move |c| {
        c.auth.oauth.upstream.insert("gh".into(), gh_config(gh));
    })
    .await;
    let admin = down.admin().await.access;
    let web = web_client(&down, &admin).await;
    let (_, challenge) = pkce();
    let mut b = Browser::new(&down);
    let p = b
        .get(&authorize_query(&web.id, CB, "openid", Some(&challenge)))
        .await;
    let p = b
        .post("/oauth/authorize/upstream/gh", &[("csrf", &p.csrf())])
        .await;
    let state = p_param(&p.location.unwrap(), "state");
    // an account with the identity's address, not yet committed
    let mut other = down.auth_db().writer().begin().await.unwrap();
    sqlx::query(
        "INSERT INTO users (id, email, name, password_hash, email_verified, created_at, updated_at) \
         VALUES ('racer', 'octo@example.com', 'Racer', '!', 1, 1, 1)",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    let callback_path = format!(
        "/oauth/authorize/upstream/gh/callback?code=gh-code&state={}",
        urlencoding::encode(&state)
    );
    let callback = b.get(&callback_path);
    let commit = async {
        until_waiting_at(&down, "INSERT INTO users").await;
        other.commit().await.unwrap();
    };
    let (p, ()) = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        futures::future::join(callback, commit),
    )
    .await
    .expect("the sign-in neither waited nor answered");
    assert_eq!(p.status, StatusCode::FORBIDDEN, "{}", p.text);
    assert!(p.text.contains("already exists"), "{}", p.text);
    assert_eq!(down.count("upstream_identities").await, 0);
    down.stop().await;
}

/// A browser signed in through the fake GitHub ("gh") for `scope`, at the consent page:
/// the browser, the page's CSRF token and the PKCE verifier.
async fn gh_to_consent(app: &TestApp, web: &OClient, scope: &str) -> (Browser, String, String) {
    let (verifier, challenge) = pkce();
    let mut b = Browser::new(app);
    let p = b
        .get(&authorize_query(&web.id, CB, scope, Some(&challenge)))
        .await;
    let p = b
        .post("/oauth/authorize/upstream/gh", &[("csrf", &p.csrf())])
        .await;
    let state = p_param(&p.location.unwrap(), "state");
    let p = b
        .get(&format!(
            "/oauth/authorize/upstream/gh/callback?code=gh-code&state={}",
            urlencoding::encode(&state)
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    let csrf = p.csrf();
    (b, csrf, verifier)
}

fn p_param(url: &str, name: &str) -> String {
    let q = url.split_once('?').unwrap().1;
    q.split('&')
        .find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| urlencoding::decode(v).unwrap().into_owned())
        })
        .unwrap()
}

/// A user lists the sign-in providers linked to the account and unlinks one (audited,
/// told by mail); never another user's, and never the last way into an account that
/// has no password. (The links are made by the upstream sign-in tests above; here
/// they are written directly.)
#[tokio::test]
async fn linked_identities_are_listed_and_unlinked() {
    each_backend!(|backend: Backend| async move {
        // "github" is offered; "corp" and "legacy" are not (links left from an earlier
        // configuration)
        // (never contacted here)
        let app = TestApp::spawn_with(backend, |c| {
            let github = gh_config("http://127.0.0.1:9".into());
            c.auth.oauth.upstream.insert("github".into(), github);
        })
        .await;
        let link = |user: String, provider: &'static str, subject: &'static str| {
            let db = app.auth_db().writer().clone();
            async move {
                sqlx::query(
                    "INSERT INTO upstream_identities (provider, subject, user_id, email, created_at) \
                     VALUES ($1, $2, $3, 'x@example.net', 1)",
                )
                .bind(provider)
                .bind(subject)
                .bind(user)
                .execute(&db)
                .await
                .unwrap();
            }
        };
        let ann_email = "ann.links@example.com";
        let ann = app.user(ann_email).await;
        let ann_id = jwt_part(&ann.access, 1)["sub"].as_str().unwrap().to_owned();
        let bob = app.user("bob.links@example.com").await;
        let bob_id = jwt_part(&bob.access, 1)["sub"].as_str().unwrap().to_owned();
        link(ann_id.clone(), "github", "gh-ann").await;
        link(bob_id.clone(), "corp", "corp-bob").await;

        let r = app.get("/v1/me/identities", Some(&ann.access)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["identities"].as_array().unwrap().len(), 1);
        assert_eq!(r.body["identities"][0]["provider"], "github");
        // another user's provider is not ann's to unlink
        app.delete("/v1/me/identities/corp", Some(&ann.access))
            .await
            .assert_problem(404, "not_found");
        // a session signed in long ago must sign in again first
        let stale = crate::email_change::aged_token(&app, &ann, 7_200).await;
        app.delete("/v1/me/identities/github", Some(&stale))
            .await
            .assert_problem(401, "insufficient_user_authentication");
        let ann = app.login(ann_email, PASSWORD).await;
        let notices = || {
            app.mails()
                .iter()
                .filter(|m| {
                    m.contains(&format!("To: {ann_email}"))
                        && m.contains("Subject: A sign-in provider was unlinked from your account")
                })
                .count()
        };
        assert_eq!(notices(), 0, "nothing before the unlink");
        let r = app
            .delete("/v1/me/identities/github", Some(&ann.access))
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let r = app.get("/v1/me/identities", Some(&ann.access)).await;
        assert_eq!(r.body["identities"], json!([]));
        app.delete("/v1/me/identities/github", Some(&ann.access))
            .await
            .assert_problem(404, "not_found");
        assert_eq!(notices(), 1);
        let admin = app.admin().await.access;
        let entries = audit_action(&app, &admin, "account.unlinked_upstream").await;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["metadata"]["provider"], "github");
        assert_eq!(
            app.count_where("upstream_identities", "provider = 'corp'")
                .await,
            1
        );

        // an account with no password keeps its last provider
        sqlx::query("UPDATE users SET password_hash = '!' WHERE id = $1")
            .bind(&bob_id)
            .execute(app.auth_db().writer())
            .await
            .unwrap();
        app.delete("/v1/me/identities/corp", Some(&bob.access))
            .await
            .assert_problem(409, "last_sign_in_method");
        // a link to a provider this server no longer offers is no way in either
        link(bob_id.clone(), "legacy", "legacy-bob").await;
        app.delete("/v1/me/identities/corp", Some(&bob.access))
            .await
            .assert_problem(409, "last_sign_in_method");
        link(bob_id.clone(), "github", "gh-bob").await;
        let r = app
            .delete("/v1/me/identities/corp", Some(&bob.access))
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        app.delete("/v1/me/identities/github", Some(&bob.access))
            .await
            .assert_problem(409, "last_sign_in_method");
        // no token, no list
        assert_eq!(
            app.get("/v1/me/identities", None).await.status,
            StatusCode::UNAUTHORIZED
        );
        app.stop().await;
    });
}

/// Starting OAuth requests is bounded per address: each `GET /oauth/authorize` and
/// `POST /oauth/device_authorization` writes a pending request before anyone has signed
/// in, so a flood from one address is refused (429 with `Retry-After`) and writes
/// nothing more.
#[tokio::test]
async fn starting_oauth_requests_is_rate_limited() {
    let app = TestApp::spawn_with(Backend::Sqlite, |c| {
        c.auth.rate_limits.oauth_start_per_ip = vaultpay_core::gcra::Quota::new(3, 600);
    })
    .await;
    let admin = app.admin().await.access;
    let web = web_client(&app, &admin).await;
    let cli = device_client(&app, &admin).await;
    let (_, challenge) = pkce();
    let authorize = authorize_query(&web.id, CB, "openid", Some(&challenge));
    for _ in 0..2 {
        let r = Browser::new(&app).get(&authorize).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    device_start(&app, &cli, "openid").await;
    let pending = app.count("oauth_requests").await + app.count("oauth_device_codes").await;
    let r = Browser::new(&app).get(&authorize).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    let r = form_post(
        &app,
        "/oauth/device_authorization",
        None,
        &[("client_id", &cli.id), ("scope", "openid")],
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    assert_eq!(
        app.count("oauth_requests").await + app.count("oauth_device_codes").await,
        pending,
        "a refused start wrote nothing"
    );
    app.stop().await;
}

/// A deleted client's client_credentials tokens are no longer active at introspection
/// (what the ledger asks before a sensitive operation), though they have not expired.
#[tokio::test]
async fn a_deleted_clients_tokens_are_not_active() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let admin = app.admin().await.access;
    let svc = create_client(
        &app,
        &admin,
        json!({ "name": "Short-lived job", "grant_types": ["client_credentials"] }),
    )
    .await;
    let secret = svc.secret.clone().unwrap();
    let r = client_credentials_grant(&app, &svc.id, &secret).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let at = r.body["access_token"].as_str().unwrap().to_owned();
    assert!(app.auth().introspect_token(&at).await.unwrap().active);
    let d = app
        .delete(&format!("/v1/admin/clients/{}", svc.id), Some(&admin))
        .await;
    assert!(d.status.is_success(), "{}", d.text);
    assert!(!app.auth().introspect_token(&at).await.unwrap().active);
    app.stop().await;
}

/// Revocations are limited per client (each revoked client-credentials token is kept,
/// and reloaded by every replica, until it expires); other clients are not affected.
#[tokio::test]
async fn token_revocations_are_rate_limited_per_client() {
    let app = TestApp::spawn_with(Backend::Sqlite, |c| {
        c.auth.rate_limits.oauth_revoke_per_client = vaultpay_core::gcra::Quota::new(2, 600);
    })
    .await;
    let admin = app.admin().await.access;
    let body = json!({ "name": "svc", "grant_types": ["client_credentials"] });
    let a = create_client(&app, &admin, body.clone()).await;
    let b = create_client(&app, &admin, body).await;
    let revoke = |c: &OClient, token: String| {
        let (id, secret) = (c.id.clone(), c.secret.clone().unwrap());
        let app = &app;
        async move {
            form_post(
                app,
                "/oauth/revoke",
                Some((&id, &secret)),
                &[("token", &token)],
            )
            .await
        }
    };
    for _ in 0..2 {
        let t = client_credentials_grant(&app, &a.id, a.secret.as_deref().unwrap()).await;
        let at = t.body["access_token"].as_str().unwrap().to_owned();
        assert_eq!(revoke(&a, at).await.status, StatusCode::OK);
    }
    let t = client_credentials_grant(&app, &a.id, a.secret.as_deref().unwrap()).await;
    let at = t.body["access_token"].as_str().unwrap().to_owned();
    let r = revoke(&a, at.clone()).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        introspect(&app, &a, &at).await.body["active"],
        true,
        "the refused revocation wrote nothing"
    );
    let t = client_credentials_grant(&app, &b.id, b.secret.as_deref().unwrap()).await;
    let bt = t.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(revoke(&b, bt).await.status, StatusCode::OK);
    app.stop().await;
}
