//! Upstream OIDC sign-in trusts an ID token only when its signature verifies against
//! the provider's JWK Set. The provider is a small mock (discovery, JWKS, token
//! endpoint) whose ID tokens the test writes itself: RS256 with a fixed 2048-bit test
//! key (`fixtures/upstream_rs256.pem`), ES256 with a key made per run, and forgeries.
//! The `upstream_oidc_sign_in_with_another_vaultpay` test in `oauth.rs` covers EdDSA.

use crate::each_backend;
use crate::helpers::*;
use crate::oauth::{authorize_query, exchange, pkce, web_client, Browser, OClient, Page, CB};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use reqwest::StatusCode;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair, RsaPublicKeyComponents};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use vaultpay_store::Backend;

const CLIENT_ID: &str = "vaultpay-down";
const REFUSED: &str = "Signing in with the provider failed.";

fn enc(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// The fixed RS256 test key (PKCS#8, made with `openssl genpkey -algorithm RSA`).
fn rsa_key() -> RsaKeyPair {
    let pem = include_str!("fixtures/upstream_rs256.pem");
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    RsaKeyPair::from_pkcs8(&STANDARD.decode(b64).unwrap()).unwrap()
}

fn rsa_jwk(kid: &str, key: &RsaKeyPair) -> Value {
    let c = RsaPublicKeyComponents::<Vec<u8>>::from(key.public());
    json!({ "kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid, "n": enc(&c.n), "e": enc(&c.e) })
}

fn es_key() -> EcdsaKeyPair {
    let rng = SystemRandom::new();
    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap()
}

fn es_jwk(kid: &str, key: &EcdsaKeyPair) -> Value {
    let p = key.public_key().as_ref();
    json!({ "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": enc(&p[1..33]), "y": enc(&p[33..]) })
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        enc(header.to_string().as_bytes()),
        enc(claims.to_string().as_bytes())
    )
}

fn rs256(kid: &str, key: &RsaKeyPair, claims: &Value) -> String {
    let input = signing_input(&json!({ "alg": "RS256", "typ": "JWT", "kid": kid }), claims);
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &signature::RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{input}.{}", enc(&sig))
}

fn es256(kid: &str, key: &EcdsaKeyPair, claims: &Value) -> String {
    let input = signing_input(&json!({ "alg": "ES256", "typ": "JWT", "kid": kid }), claims);
    let sig = key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    format!("{input}.{}", enc(sig.as_ref()))
}

/// A mock OpenID provider: discovery, JWKS (counting fetches) and a token endpoint
/// that answers each code with the ID token the test put there.
struct MockIdp {
    base: String,
    keys: Mutex<Vec<Value>>,
    jwks_fetches: AtomicUsize,
    publish_jwks_uri: AtomicBool,
    id_tokens: Mutex<HashMap<String, String>>,
}

impl MockIdp {
    async fn start(keys: Vec<Value>) -> Arc<MockIdp> {
        use axum::response::IntoResponse;
        use axum::routing::{get, post};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idp = Arc::new(MockIdp {
            base: format!("http://{}", listener.local_addr().unwrap()),
            keys: Mutex::new(keys),
            jwks_fetches: AtomicUsize::new(0),
            publish_jwks_uri: AtomicBool::new(true),
            id_tokens: Mutex::new(HashMap::new()),
        });
        let (d, j, t) = (idp.clone(), idp.clone(), idp.clone());
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || async move {
                    let b = &d.base;
                    let mut doc = json!({
                        "issuer": b,
                        "authorization_endpoint": format!("{b}/authorize"),
                        "token_endpoint": format!("{b}/token"),
                        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                    });
                    if d.publish_jwks_uri.load(Ordering::SeqCst) {
                        doc["jwks_uri"] = json!(format!("{b}/jwks"));
                    }
                    axum::Json(doc)
                }),
            )
            .route(
                "/jwks",
                get(move || async move {
                    j.jwks_fetches.fetch_add(1, Ordering::SeqCst);
                    axum::Json(json!({ "keys": j.keys.lock().unwrap().clone() }))
                }),
            )
            .route(
                "/token",
                post(move |body: String| async move {
                    let code = body
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("code="))
                        .unwrap_or_default()
                        .to_owned();
                    let id_token = t.id_tokens.lock().unwrap().remove(&code);
                    match id_token {
                        Some(id) => axum::Json(json!({
                            "access_token": "mock-at", "token_type": "Bearer", "id_token": id,
                        }))
                        .into_response(),
                        None => axum::http::StatusCode::BAD_REQUEST.into_response(),
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        idp
    }

    fn fetches(&self) -> usize {
        self.jwks_fetches.load(Ordering::SeqCst)
    }

    /// ID token claims as a well-behaved provider writes them.
    fn claims(&self, nonce: &str, sub: &str) -> Value {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        json!({
            "iss": self.base, "sub": sub, "aud": CLIENT_ID, "azp": CLIENT_ID,
            "exp": now + 300, "iat": now, "nonce": nonce,
            "email": format!("{sub}@example.com"), "email_verified": true, "name": sub,
        })
    }
}

fn upstream(idp: &MockIdp, name: &str) -> vaultpay_auth::oauth::upstream::UpstreamConfig {
    vaultpay_auth::oauth::upstream::UpstreamConfig {
        kind: "oidc".into(),
        display_name: name.into(),
        issuer: Some(idp.base.clone()),
        client_id: CLIENT_ID.into(),
        client_secret: vaultpay_core::secret::Secret::new("mock-secret"),
        scopes: None,
        authorize_url: None,
        token_url: None,
        api_url: None,
        link_by_verified_email: false,
    }
}

/// What a refused sign-in must leave untouched.
#[derive(Debug, PartialEq, Eq)]
struct Footprint {
    users: i64,
    identities: i64,
    signed_in_requests: i64,
    signins_audited: i64,
}

async fn footprint(down: &TestApp) -> Footprint {
    Footprint {
        users: down.count("users").await,
        identities: down.count("upstream_identities").await,
        signed_in_requests: down
            .count_where("oauth_requests", "user_id IS NOT NULL")
            .await,
        signins_audited: down
            .count_where("audit_log", "action = 'oauth.signin'")
            .await,
    }
}

/// One attempt through provider `name`: the browser starts at the downstream
/// authorization page, is sent to the provider (the mock has no page: the test reads
/// the nonce from the redirect and answers the code with `id_token(nonce)`), and comes
/// back to the callback. Returns the browser, the callback's page and the PKCE
/// verifier of the downstream request.
async fn attempt(
    down: &TestApp,
    web: &OClient,
    idp: &MockIdp,
    name: &str,
    id_token: impl FnOnce(&str) -> String,
) -> (Browser, Page, String) {
    let (verifier, challenge) = pkce();
    let mut b = Browser::new(down);
    let p = b
        .get(&authorize_query(
            &web.id,
            CB,
            "openid email profile",
            Some(&challenge),
        ))
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    let csrf = p.csrf();
    let p = b
        .post(
            &format!("/oauth/authorize/upstream/{name}"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.text);
    assert!(
        p.location
            .as_deref()
            .unwrap()
            .starts_with(&format!("{}/authorize?", idp.base)),
        "{:?}",
        p.location
    );
    let (state, nonce) = (p.param("state").unwrap(), p.param("nonce").unwrap());
    let code = uuid::Uuid::now_v7().to_string();
    idp.id_tokens
        .lock()
        .unwrap()
        .insert(code.clone(), id_token(&nonce));
    let p = b
        .get(&format!(
            "/oauth/authorize/upstream/{name}/callback?code={code}&state={}",
            urlencoding::encode(&state)
        ))
        .await;
    (b, p, verifier)
}

/// The sign-in went through: consent, code, and a downstream ID token for `email`.
async fn assert_signed_in(
    down: &TestApp,
    web: &OClient,
    (mut b, p, verifier): (Browser, Page, String),
    email: &str,
) {
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    assert!(p.text.contains("Allow access"), "{}", p.text);
    let csrf = p.csrf();
    let p = b.consent(&csrf, "approve").await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.text);
    let r = exchange(down, web, &p.param("code").unwrap(), CB, &verifier).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let id = crate::auth_flows::jwt_part(r.body["id_token"].as_str().unwrap(), 1);
    assert_eq!(id["email"], email);
    assert_eq!(id["amr"], json!(["fed"]));
}

/// An attempt that must be refused: the error page, and nothing changed (no account,
/// no link, no user on the authorization request, no sign-in audited).
async fn assert_refused(
    down: &TestApp,
    web: &OClient,
    idp: &MockIdp,
    name: &str,
    what: &str,
    id_token: impl FnOnce(&str) -> String,
) {
    let before = footprint(down).await;
    let (_, p, _) = attempt(down, web, idp, name, id_token).await;
    assert_eq!(p.status, StatusCode::BAD_GATEWAY, "{what}: {}", p.text);
    assert!(p.text.contains(REFUSED), "{what}: {}", p.text);
    assert!(!p.text.contains("Allow access"), "{what}");
    assert_eq!(footprint(down).await, before, "{what}");
}

/// A browser at the downstream sign-in page of a new authorization request, and the
/// page's CSRF token.
async fn sign_in_page(down: &TestApp, web: &OClient) -> (Browser, String) {
    let (_, challenge) = pkce();
    let mut b = Browser::new(down);
    let p = b
        .get(&authorize_query(&web.id, CB, "openid", Some(&challenge)))
        .await;
    let csrf = p.csrf();
    (b, csrf)
}

/// A downstream server whose upstream provider `name` is a mock IdP serving `rsa-1`
/// (the fixture RSA key), and a registered web client.
async fn with_mock_idp(
    backend: Backend,
    name: &'static str,
    display: &'static str,
) -> (RsaKeyPair, Arc<MockIdp>, TestApp, OClient) {
    let rsa = rsa_key();
    let idp = MockIdp::start(vec![rsa_jwk("rsa-1", &rsa)]).await;
    let i = idp.clone();
    let down = crate::oauth::spawn_addressed(backend, move |c| {
        c.auth
            .oauth
            .upstream
            .insert(name.into(), upstream(&i, display));
    })
    .await;
    let admin = down.admin().await.access;
    let web = web_client(&down, &admin).await;
    (rsa, idp, down, web)
}

#[tokio::test]
async fn upstream_oidc_id_token_signature_is_verified() {
    each_backend!(signature_case);
}

async fn signature_case(backend: Backend) {
    let (rsa, idp, down, web) = with_mock_idp(backend, "mock", "Mock IdP").await;

    // A valid RS256 ID token: signed in, with an account and a link.
    let start = footprint(&down).await;
    let a = attempt(&down, &web, &idp, "mock", |n| {
        rs256("rsa-1", &rsa, &idp.claims(n, "alice"))
    })
    .await;
    assert_signed_in(&down, &web, a, "alice@example.com").await;
    let after = footprint(&down).await;
    assert_eq!(after.users, start.users + 1);
    assert_eq!(after.identities, 1);
    assert_eq!(idp.fetches(), 1, "the JWK Set was fetched once");

    // The payload changed under a valid signature (another subject and email).
    assert_refused(&down, &web, &idp, "mock", "tampered payload", |n| {
        let t = rs256("rsa-1", &rsa, &idp.claims(n, "bob"));
        let parts: Vec<&str> = t.split('.').collect();
        let forged = idp.claims(n, "eve");
        format!(
            "{}.{}.{}",
            parts[0],
            enc(forged.to_string().as_bytes()),
            parts[2]
        )
    })
    .await;

    // alg "none", with and without a signature part.
    for sig in ["", "c2ln"] {
        assert_refused(&down, &web, &idp, "mock", "alg none", |n| {
            let h = json!({ "alg": "none", "typ": "JWT", "kid": "rsa-1" });
            format!("{}.{sig}", signing_input(&h, &idp.claims(n, "eve")))
        })
        .await;
    }

    // HS256 keyed with the provider's public key (the algorithm-confusion attack),
    // with the modulus and with the DER public key as the HMAC secret.
    let c = RsaPublicKeyComponents::<Vec<u8>>::from(rsa.public());
    for secret in [rsa.public().as_ref().to_vec(), c.n.clone()] {
        assert_refused(
            &down,
            &web,
            &idp,
            "mock",
            "HS256 with the public key",
            |n| {
                let input = signing_input(
                    &json!({ "alg": "HS256", "typ": "JWT", "kid": "rsa-1" }),
                    &idp.claims(n, "eve"),
                );
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
                format!(
                    "{input}.{}",
                    enc(ring::hmac::sign(&key, input.as_bytes()).as_ref())
                )
            },
        )
        .await;
    }

    // ES256 in the header for the RSA key's kid (a valid ES256 signature by a key the
    // provider does not publish).
    let stray = es_key();
    assert_refused(
        &down,
        &web,
        &idp,
        "mock",
        "alg disagrees with the key",
        |n| es256("rsa-1", &stray, &idp.claims(n, "eve")),
    )
    .await;

    // A valid signature, but the checks of OIDC Core §3.1.3.7 fail.
    type Tweak = fn(&mut Value);
    let tweaks: [(&str, Tweak); 8] = [
        // a subject PostgreSQL cannot store (was a 500), and one with a space
        ("NUL in sub", |c| c["sub"] = json!("eve\u{0}x")),
        ("space in sub", |c| c["sub"] = json!("eve x")),
        ("nonce mismatch", |c| c["nonce"] = json!("not-the-nonce")),
        ("other issuer", |c| c["iss"] = json!("https://evil.example")),
        ("other audience", |c| c["aud"] = json!("someone-else")),
        ("expired", |c| {
            c["exp"] = json!(c["iat"].as_i64().unwrap() - 10)
        }),
        ("issued in the future", |c| {
            c["iat"] = json!(c["iat"].as_i64().unwrap() + 3600)
        }),
        ("several audiences, no azp", |c| {
            c["aud"] = json!([CLIENT_ID, "another-client"]);
            c.as_object_mut().unwrap().remove("azp");
        }),
    ];
    for (what, tweak) in tweaks {
        assert_refused(&down, &web, &idp, "mock", what, |n| {
            let mut claims = idp.claims(n, "eve");
            tweak(&mut claims);
            rs256("rsa-1", &rsa, &claims)
        })
        .await;
    }
    // Several audiences with azp = our client id: fine (and the link is reused).
    let a = attempt(&down, &web, &idp, "mock", |n| {
        let mut claims = idp.claims(n, "alice");
        claims["aud"] = json!([CLIENT_ID, "another-client"]);
        rs256("rsa-1", &rsa, &claims)
    })
    .await;
    assert_signed_in(&down, &web, a, "alice@example.com").await;
    assert_eq!(down.count("upstream_identities").await, 1);
    assert_eq!(
        idp.fetches(),
        1,
        "none of the above needed another JWK Set fetch"
    );

    // An unknown kid refetches the JWK Set once, then refuses; another unknown kid
    // soon after does not fetch again.
    assert_refused(&down, &web, &idp, "mock", "unknown kid", |n| {
        rs256("rsa-unknown", &rsa, &idp.claims(n, "eve"))
    })
    .await;
    assert_eq!(idp.fetches(), 2, "one refetch for the unknown kid");
    assert_refused(&down, &web, &idp, "mock", "second unknown kid", |n| {
        rs256("rsa-unknown-2", &rsa, &idp.claims(n, "eve"))
    })
    .await;
    assert_eq!(idp.fetches(), 2, "refetches are rate-limited");
    // The known key still works from the cache.
    let a = attempt(&down, &web, &idp, "mock", |n| {
        rs256("rsa-1", &rsa, &idp.claims(n, "alice"))
    })
    .await;
    assert_signed_in(&down, &web, a, "alice@example.com").await;
    assert_eq!(idp.fetches(), 2);

    // Oversized and garbage tokens: refused on the same page, never a 500.
    for junk in [
        format!(
            "{}.{}.c2ln",
            enc(br#"{"alg":"RS256","kid":"rsa-1"}"#),
            "A".repeat(20_000)
        ),
        "not-a-jwt".to_owned(),
        "!!!.???.***".to_owned(),
        format!("{}.e30.c2ln", enc(b"\xff\xfe\x00")),
    ] {
        assert_refused(&down, &web, &idp, "mock", "junk token", |_| junk.clone()).await;
    }

    // A provider whose discovery document has no jwks_uri cannot be used at all.
    idp.publish_jwks_uri.store(false, Ordering::SeqCst);
    let (mut b, csrf) = sign_in_page(&down, &web).await;
    let p = b
        .post("/oauth/authorize/upstream/mock", &[("csrf", &csrf)])
        .await;
    assert_eq!(p.status, StatusCode::BAD_GATEWAY, "{}", p.text);
    assert!(p.text.contains("not reachable"), "{}", p.text);
    down.stop().await;
}

#[tokio::test]
async fn upstream_oidc_key_rotation_is_picked_up() {
    each_backend!(rotation_case);
}

async fn rotation_case(backend: Backend) {
    let (rsa, idp, down, web) = with_mock_idp(backend, "rot", "Rotating IdP").await;
    let a = attempt(&down, &web, &idp, "rot", |n| {
        rs256("rsa-1", &rsa, &idp.claims(n, "carol"))
    })
    .await;
    assert_signed_in(&down, &web, a, "carol@example.com").await;
    assert_eq!(idp.fetches(), 1);

    // The provider rotates to an ES256 key after the set was cached: the unknown kid
    // refetches the set once and the new key is accepted.
    let es = es_key();
    idp.keys.lock().unwrap().push(es_jwk("es-2", &es));
    let a = attempt(&down, &web, &idp, "rot", |n| {
        es256("es-2", &es, &idp.claims(n, "dave"))
    })
    .await;
    assert_signed_in(&down, &web, a, "dave@example.com").await;
    assert_eq!(idp.fetches(), 2);
    assert_eq!(down.count("upstream_identities").await, 2);
    // Both keys now verify from the cache.
    let a = attempt(&down, &web, &idp, "rot", |n| {
        rs256("rsa-1", &rsa, &idp.claims(n, "carol"))
    })
    .await;
    assert_signed_in(&down, &web, a, "carol@example.com").await;
    let a = attempt(&down, &web, &idp, "rot", |n| {
        es256("es-2", &es, &idp.claims(n, "dave"))
    })
    .await;
    assert_signed_in(&down, &web, a, "dave@example.com").await;
    assert_eq!(idp.fetches(), 2);
    down.stop().await;
}

/// Starting a provider sign-in stores a state and asks the provider for its endpoints:
/// bounded per address (the sign-in page's form could otherwise be posted for ever).
#[tokio::test]
async fn starting_a_provider_sign_in_is_rate_limited() {
    let idp = MockIdp::start(vec![rsa_jwk("rsa-1", &rsa_key())]).await;
    let i = idp.clone();
    let down = crate::oauth::spawn_addressed(Backend::Sqlite, move |c| {
        c.auth
            .oauth
            .upstream
            .insert("mock".into(), upstream(&i, "Mock IdP"));
        c.auth.rate_limits.oauth_start_per_ip = vaultpay_core::gcra::Quota::new(2, 3_600);
    })
    .await;
    let admin = down.admin().await.access;
    let web = web_client(&down, &admin).await;
    let (mut b, csrf) = sign_in_page(&down, &web).await;
    for _ in 0..2 {
        let p = b
            .post("/oauth/authorize/upstream/mock", &[("csrf", &csrf)])
            .await;
        assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.text);
    }
    let states = down.count("oauth_upstream_states").await;
    let p = b
        .post("/oauth/authorize/upstream/mock", &[("csrf", &csrf)])
        .await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS, "{}", p.text);
    assert_eq!(down.count("oauth_upstream_states").await, states);
    down.stop().await;
}

/// With `link_by_verified_email`, a provider vouching for an existing account's
/// verified address links the two, and the account's owner is told (a new way into
/// the account must not appear silently).
#[tokio::test]
async fn linking_by_verified_email_tells_the_owner() {
    let rsa = rsa_key();
    let idp = MockIdp::start(vec![rsa_jwk("rsa-1", &rsa)]).await;
    let i = idp.clone();
    let down = crate::oauth::spawn_addressed(Backend::Sqlite, move |c| {
        let mut up = upstream(&i, "Mock IdP");
        up.link_by_verified_email = true;
        c.auth.oauth.upstream.insert("mock".into(), up);
    })
    .await;
    let admin = down.admin().await.access;
    let web = web_client(&down, &admin).await;
    down.user("carol@example.com").await;
    sqlx::query("UPDATE users SET email_verified = 1 WHERE email = 'carol@example.com'")
        .execute(down.auth_db().writer())
        .await
        .unwrap();
    let users = down.count("users").await;
    let notices = || {
        down.mails()
            .iter()
            .filter(|m| {
                m.contains("To: carol@example.com")
                    && m.contains("A sign-in provider was linked to your account")
            })
            .count()
    };
    assert_eq!(notices(), 0);
    let a = attempt(&down, &web, &idp, "mock", |n| {
        rs256("rsa-1", &rsa, &idp.claims(n, "carol"))
    })
    .await;
    assert_signed_in(&down, &web, a, "carol@example.com").await;
    assert_eq!(
        down.count("users").await,
        users,
        "linked, not a new account"
    );
    assert_eq!(notices(), 1);
    // a later sign-in through the same link is no news
    let a = attempt(&down, &web, &idp, "mock", |n| {
        rs256("rsa-1", &rsa, &idp.claims(n, "carol"))
    })
    .await;
    assert_signed_in(&down, &web, a, "carol@example.com").await;
    assert_eq!(notices(), 1);
    down.stop().await;
}

/// A client asking for a fresh sign-in (`prompt=login`, `max_age`) gets only the
/// password sign-in: a provider may answer from its own session without asking the
/// user anything, and the ID token would still claim an authentication just now.
#[tokio::test]
async fn a_fresh_sign_in_is_not_offered_through_a_provider() {
    let (_rsa, _idp, down, web) = with_mock_idp(Backend::Sqlite, "mock", "Mock IdP").await;
    let (_, challenge) = pkce();
    let plain = authorize_query(&web.id, CB, "openid", Some(&challenge));
    let mut b = Browser::new(&down);
    let p = b.get(&plain).await;
    assert!(
        p.text.contains("/oauth/authorize/upstream/mock"),
        "{}",
        p.text
    );
    for extra in ["&prompt=login", "&max_age=0", "&max_age=600"] {
        let mut b = Browser::new(&down);
        let p = b.get(&format!("{plain}{extra}")).await;
        assert_eq!(p.status, StatusCode::OK, "{}", p.text);
        assert!(
            !p.text.contains("/oauth/authorize/upstream/mock"),
            "{extra}: {}",
            p.text
        );
        let states = down.count("oauth_upstream_states").await;
        let p = b
            .post("/oauth/authorize/upstream/mock", &[("csrf", &p.csrf())])
            .await;
        assert_eq!(p.status, StatusCode::BAD_REQUEST, "{extra}: {}", p.text);
        assert_eq!(down.count("oauth_upstream_states").await, states);
    }
    down.stop().await;
}
