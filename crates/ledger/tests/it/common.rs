//! Test harness: a ledger on a fresh database, its router behind a token verifier,
//! tokens minted with a test key, and an introspector whose sessions can be revoked.

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use tower::ServiceExt;
use vaultpay_core::jwt::{AccessClaims, Audience, KeySet, Rules, Signer25519};
use vaultpay_ledger::{Ledger, LedgerConfig};
use vaultpay_proto::auth::Introspection;
use vaultpay_store::{Backend, Db, Service};
use vaultpay_web::{Introspector, KeySource, TokenVerifier};

pub struct StaticKeys(pub KeySet);

impl KeySource for StaticKeys {
    fn fetch(&self) -> BoxFuture<'_, Result<KeySet, String>> {
        let k = self.0.clone();
        Box::pin(async move { Ok(k) })
    }
}

/// Sessions are live unless their `sid` was revoked; users keep their token's roles
/// unless they were `demoted` (AuthShield then reports none).
pub struct TestIntrospector {
    keys: KeySet,
    pub revoked: Mutex<HashSet<String>>,
    pub demoted: Mutex<HashSet<String>>,
    pub calls: Mutex<u64>,
}

impl Introspector for TestIntrospector {
    fn introspect<'a>(
        &'a self,
        token: &'a str,
        _ip: Option<IpAddr>,
    ) -> BoxFuture<'a, Result<Introspection, String>> {
        Box::pin(async move {
            *self.calls.lock() += 1;
            let claims: AccessClaims = self
                .keys
                .verify_signature(token)
                .map_err(|e| e.to_string())?;
            let active = !self.revoked.lock().contains(&claims.sid);
            let roles = if self.demoted.lock().contains(&claims.sub) {
                Vec::new()
            } else {
                claims.roles
            };
            Ok(Introspection {
                active,
                sub: Some(claims.sub),
                sid: Some(claims.sid),
                exp: Some(claims.exp),
                iat: Some(claims.iat),
                token_type: Some("Bearer".into()),
                roles: Some(roles),
                client_id: None,
                network_trusted: None,
            })
        })
    }
}

pub struct TestApp {
    pub backend: Backend,
    pub db: Db,
    pub ledger: Ledger,
    pub router: axum::Router,
    pub signer: Signer25519,
    pub introspector: Arc<TestIntrospector>,
    verifier: Arc<TokenVerifier>,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }
    #[track_caller]
    pub fn expect(self, status: u16) -> Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text
        );
        self
    }
    #[track_caller]
    pub fn problem(self, status: u16, code: &str) -> Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text
        );
        assert_eq!(self.code(), code, "unexpected code; body: {}", self.text);
        let ct = self
            .headers
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(ct, "application/problem+json");
        self
    }
    pub fn id(&self) -> String {
        self.body["id"].as_str().unwrap().to_owned()
    }
}

pub fn key() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl TestApp {
    pub async fn new(backend: Backend) -> TestApp {
        Self::with_config(backend, LedgerConfig::default()).await
    }

    pub async fn with_config(backend: Backend, config: LedgerConfig) -> TestApp {
        let db = vaultpay_store::testing::fresh_db(Service::Ledger, backend)
            .await
            .expect("fresh db");
        let (signer, _) = Signer25519::generate("test-key");
        let mut keys = KeySet::default();
        keys.insert("test-key", &signer.public_key()).unwrap();
        let introspector = Arc::new(TestIntrospector {
            keys: keys.clone(),
            revoked: Mutex::default(),
            demoted: Mutex::default(),
            calls: Mutex::new(0),
        });
        let ledger = Ledger::new(db.clone(), config, introspector.clone());
        let rules = Rules {
            issuer: "https://auth.test".into(),
            audience: "vaultpay".into(),
            leeway_secs: 5,
        };
        let verifier = Arc::new(TokenVerifier::new(
            rules,
            Arc::new(StaticKeys(keys.clone())),
            keys,
        ));
        let router = ledger.router().layer(axum::Extension(verifier.clone()));
        TestApp {
            backend,
            db,
            ledger,
            router,
            signer,
            introspector,
            verifier,
        }
    }

    /// A second ledger process on the same database (a replica), with its own
    /// committer and in-memory state, accepting the same tokens.
    pub fn replica(&self) -> TestApp {
        let ledger = Ledger::new(
            self.db.clone(),
            self.ledger.config().clone(),
            self.introspector.clone(),
        );
        let router = ledger
            .router()
            .layer(axum::Extension(self.verifier.clone()));
        TestApp {
            backend: self.backend,
            db: self.db.clone(),
            ledger,
            router,
            signer: self.signer.clone(),
            introspector: self.introspector.clone(),
            verifier: self.verifier.clone(),
        }
    }

    /// A token for `user` with `roles`, in session `sid`.
    pub fn token_sid(&self, user: &str, roles: &[&str], sid: &str) -> String {
        let now = vaultpay_core::time::now_micros() / 1_000_000;
        let claims = AccessClaims {
            iss: "https://auth.test".into(),
            sub: user.into(),
            aud: Audience::One("vaultpay".into()),
            exp: now + 3600,
            iat: now,
            nbf: now,
            jti: key(),
            sid: sid.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            device_id: String::new(),
            auth_time: now,
            // Test callers have a fresh second factor, so large transfers pass step-up
            // (step-up itself is tested end to end in the server's `mfa` tests).
            amr: vec!["pwd".into(), "otp".into(), "mfa".into()],
            acr: Some(vaultpay_core::step_up::ACR_MFA.into()),
            scope: None,
            client_id: None,
        };
        self.signer.sign_access(&claims).unwrap()
    }

    /// A token whose `acr` and `auth_time` (this many seconds ago) are as given.
    pub fn token_acr(
        &self,
        user: &str,
        roles: &[&str],
        acr: Option<&str>,
        age_secs: i64,
    ) -> String {
        let now = vaultpay_core::time::now_micros() / 1_000_000;
        let claims = AccessClaims {
            iss: "https://auth.test".into(),
            sub: user.into(),
            aud: Audience::One("vaultpay".into()),
            exp: now + 3600,
            iat: now,
            nbf: now,
            jti: key(),
            sid: format!("sid-{user}"),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            device_id: String::new(),
            auth_time: now - age_secs,
            amr: vec!["pwd".into()],
            acr: acr.map(str::to_owned),
            scope: None,
            client_id: None,
        };
        self.signer.sign_access(&claims).unwrap()
    }

    pub fn token(&self, user: &str, roles: &[&str]) -> String {
        self.token_sid(user, roles, &format!("sid-{user}"))
    }

    pub fn customer(&self, user: &str) -> String {
        self.token(user, &["customer"])
    }

    pub fn admin(&self) -> String {
        self.token("admin-1", &["admin"])
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<String>,
    ) -> Resp {
        let r = self.raw_unchecked(method, path, token, key, body).await;
        assert!(
            r.status.as_u16() < 500,
            "server error {}: {}",
            r.status,
            r.text
        );
        r
    }

    /// Like [`raw`](Self::raw) but a 5xx is not a test failure.
    pub async fn raw_unchecked(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<String>,
    ) -> Resp {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        if let Some(k) = key {
            b = b.header("idempotency-key", k);
        }
        let req = match body {
            Some(s) => b
                .header("content-type", "application/json")
                .body(Body::from(s))
                .unwrap(),
            None => b.body(Body::empty()).unwrap(),
        };
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 24)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.raw(Method::GET, path, Some(token), None, None).await
    }

    pub async fn post(&self, path: &str, token: &str, key: Option<&str>, body: Value) -> Resp {
        self.raw(Method::POST, path, Some(token), key, Some(body.to_string()))
            .await
    }

    pub async fn open(&self, token: &str, currency: &str) -> String {
        self.post(
            "/v1/accounts",
            token,
            None,
            json!({"currency": currency, "kind": "current", "name": "Main"}),
        )
        .await
        .expect(201)
        .id()
    }

    /// A USD wallet of `payer` holding `amount` (deposited), and one of bob's: the
    /// (payer's, bob's) account ids.
    pub async fn funded_pair(&self, payer: &str, amount: i64) -> (String, String) {
        let a = self.open(payer, "USD").await;
        let b = self.open(&self.customer("bob"), "USD").await;
        self.deposit(&a, amount, "USD").await.expect(201);
        (a, b)
    }

    /// Customers alice and bob with a USD account each, alice's holding `deposit`:
    /// their tokens and account ids (alice, bob, alice's account, bob's account).
    pub async fn alice_and_bob(&self, deposit: i64) -> (String, String, String, String) {
        let alice = self.customer("alice");
        let bob = self.customer("bob");
        let a = self.open(&alice, "USD").await;
        let b = self.open(&bob, "USD").await;
        self.deposit(&a, deposit, "USD").await.expect(201);
        (alice, bob, a, b)
    }

    pub async fn deposit(&self, account: &str, amount: i64, currency: &str) -> Resp {
        let admin = self.admin();
        self.post(
            "/v1/admin/deposits",
            &admin,
            Some(&key()),
            json!({"account_id": account, "amount": amount, "currency": currency, "reference": "test"}),
        )
        .await
    }

    pub async fn transfer(&self, token: &str, from: &str, to: &str, amount: i64) -> Resp {
        self.post(
            "/v1/transfers",
            token,
            Some(&key()),
            json!({"from_account_id": from, "to_account_id": to, "amount": amount, "currency": "USD", "description": "t"}),
        )
        .await
    }

    pub async fn balance(&self, token: &str, account: &str) -> (i64, i64) {
        let r = self
            .get(&format!("/v1/accounts/{account}"), token)
            .await
            .expect(200);
        (
            r.body["balance"].as_i64().unwrap(),
            r.body["available_balance"].as_i64().unwrap(),
        )
    }

    /// Drops the trigger that refuses changes to postings (migration 0011), so that a
    /// test can corrupt a posting as a broken database or a hand edit would, and check
    /// that `verify` names it.
    pub async fn unguard_postings(&self) {
        let sql = match self.backend {
            Backend::Sqlite => "DROP TRIGGER postings_no_update",
            Backend::Postgres => "DROP TRIGGER postings_no_change ON postings",
        };
        sqlx::raw_sql(sql).execute(self.db.writer()).await.unwrap();
    }

    /// The one integer `sql` selects (a count, a sum, a column of one row).
    pub async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(self.db.read())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// What `verify` finds: (invariant, detail) for each violation.
    pub async fn violations(&self) -> Vec<(&'static str, String)> {
        vaultpay_ledger::verify(&self.db)
            .await
            .unwrap()
            .violations
            .into_iter()
            .map(|v| (v.invariant, v.detail))
            .collect()
    }

    pub async fn assert_consistent(&self) {
        let report = vaultpay_ledger::verify(&self.db).await.unwrap();
        assert!(report.is_consistent(), "{:?}: {report}", self.backend);
    }
}

/// Runs `f` once per backend.
pub async fn each_backend<F, Fut>(f: F)
where
    F: Fn(Backend) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for b in vaultpay_store::testing::backends() {
        f(b).await;
    }
}
