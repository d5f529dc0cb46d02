//! The split deployment: `vaultpay serve auth` and `vaultpay serve ledger --auth-url`
//! as two real processes talking over loopback. The ledger verifies tokens against
//! AuthShield's JWKS and introspects over HTTP for sensitive operations.

use crate::helpers::*;
use serde_json::json;
use vaultpay_store::Backend;

#[tokio::test]
async fn ledger_in_its_own_process_trusts_authshield_tokens_and_revocations() {
    for backend in vaultpay_store::testing::backends() {
        run(backend).await;
    }
}

async fn run(backend: Backend) {
    let dir = temp_dir();
    let auth_db = vaultpay_store::testing::fresh_location(backend)
        .await
        .unwrap();
    let ledger_db = vaultpay_store::testing::fresh_location(backend)
        .await
        .unwrap();
    let (pa, pl) = (free_port(), free_port());
    let common = vec![
        ("VAULTPAY_DATA_DIR", dir.display().to_string()),
        ("VAULTPAY_DATABASE__AUTH_URL", auth_db),
        ("VAULTPAY_DATABASE__LEDGER_URL", ledger_db),
        ("VAULTPAY_DATABASE__SQLITE_SYNCHRONOUS_FULL", "false".into()),
        (
            "VAULTPAY_AUTH__INTROSPECTION_SECRET",
            "split-test-secret".into(),
        ),
        // the ledger alone must be told AuthShield's issuer
        ("VAULTPAY_AUTH__ISSUER", format!("http://127.0.0.1:{pa}")),
        (
            "VAULTPAY_MASTER_KEY",
            vaultpay_core::crypto::MasterKey::generate()
                .to_hex()
                .to_string(),
        ),
        ("VAULTPAY_BOOTSTRAP_ADMIN_EMAIL", "admin@example.com".into()),
        ("VAULTPAY_BOOTSTRAP_ADMIN_PASSWORD", PASSWORD.into()),
        ("VAULTPAY_LOG_FORMAT", "pretty".into()),
        // X-Forwarded-For from loopback names the client (the untrusted-network step)
        ("VAULTPAY_TRUSTED_PROXIES", "[\"127.0.0.1\"]".into()),
        (
            "VAULTPAY_AUTH__RATE_LIMITS__LOGIN_PER_ACCOUNT",
            "{ burst = 100, period_secs = 60 }".into(),
        ),
    ];
    let mut auth = Proc::spawn(
        &["serve", "auth", "--listen", &format!("127.0.0.1:{pa}")],
        &common,
        dir.join("auth.log"),
    );
    // The ledger's calls to AuthShield go direct even with a proxy in its environment
    // (a proxy would see the introspection secret and could serve its own JWKS; this
    // one is not there at all); it reloads the JWKS every second here.
    let mut ledger_env = common.clone();
    for proxy in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
        ledger_env.push((proxy, "http://127.0.0.1:9".into()));
    }
    ledger_env.push(("VAULTPAY_JWKS_REFRESH_SECS", "1".into()));
    let mut ledger = spawn_ledger(pl, pa, &ledger_env, dir.join("ledger.log"));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let (a, l) = (
        format!("http://127.0.0.1:{pa}"),
        format!("http://127.0.0.1:{pl}"),
    );
    auth.wait_ready(&http, &a).await;
    ledger.wait_ready(&http, &l).await;

    let post = |base: &str,
                path: &str,
                token: Option<&str>,
                key: Option<&str>,
                body: serde_json::Value| {
        let mut r = http.post(format!("{base}{path}")).json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        async move { read(r.send().await.unwrap()).await }
    };
    let login = |email: &'static str| {
        let body =
            json!({"email": email, "password": PASSWORD, "device": {"id": "d1", "name": "d1"}});
        let r = http.post(format!("{a}/v1/auth/login")).json(&body);
        async move {
            let r = read(r.send().await.unwrap()).await;
            assert_eq!(r.status, 200, "{}", r.text);
            r.body["access_token"].as_str().unwrap().to_owned()
        }
    };

    // routes are split: AuthShield does not serve the ledger and vice versa
    assert_eq!(
        http.get(format!("{a}/v1/accounts"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        http.get(format!("{l}/v1/me"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    let r = post(
        &a,
        "/v1/auth/register",
        None,
        None,
        json!({"email": "ann@example.com", "password": PASSWORD, "name": "Ann"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let ann = login("ann@example.com").await;
    let admin = login("admin@example.com").await;

    // the ledger verifies AuthShield's token locally (JWKS fetched over HTTP)
    let acct = post(
        &l,
        "/v1/accounts",
        Some(&ann),
        Some("open-1"),
        json!({"currency": "USD", "kind": "current", "name": "Main"}),
    )
    .await;
    assert_eq!(acct.status, 201, "{}", acct.text);
    let acct_id = acct.body["id"].as_str().unwrap().to_owned();
    let other = post(
        &l,
        "/v1/accounts",
        Some(&ann),
        Some("open-2"),
        json!({"currency": "USD", "kind": "savings", "name": "Savings"}),
    )
    .await;
    let other_id = other.body["id"].as_str().unwrap().to_owned();

    // an admin action: introspected over HTTP, roles from the token; 500,000 in
    // deposits under the step-up threshold (100,000: the bootstrap admin has no
    // second factor)
    for (n, amount) in [99_999, 99_999, 99_999, 99_999, 99_999, 5]
        .into_iter()
        .enumerate()
    {
        let dep = post(
            &l,
            "/v1/admin/deposits",
            Some(&admin),
            Some(&format!("dep-{n}")),
            json!({"account_id": acct_id, "amount": amount, "currency": "USD", "reference": "split"}),
        )
        .await;
        assert!(dep.status.is_success(), "{}", dep.text);
    }

    // a large transfer (>= the introspection threshold) needs step-up (RFC 9470)…
    let t = json!({"from_account_id": acct_id, "to_account_id": other_id, "amount": 200_000, "currency": "USD", "description": "big"});
    let r = post(&l, "/v1/transfers", Some(&ann), Some("big-1"), t.clone()).await;
    r.assert_problem(401, "insufficient_user_authentication");
    // …satisfied at AuthShield (enrol TOTP, step up) without logging out
    let e = post(&a, "/v1/mfa/totp", Some(&ann), None, json!({})).await;
    assert_eq!(e.status, 201, "{}", e.text);
    let secret = vaultpay_core::totp::base32_decode(e.body["secret"].as_str().unwrap()).unwrap();
    let step = vaultpay_core::totp::step_of(vaultpay_core::time::now_micros() / 1_000_000, 30);
    let code = |s: i64| vaultpay_core::totp::code_for_step(&secret, s, 6);
    let r = post(
        &a,
        "/v1/mfa/totp/confirm",
        Some(&ann),
        None,
        json!({"code": code(step - 1)}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = post(
        &a,
        "/v1/auth/step-up",
        Some(&ann),
        None,
        json!({"code": code(step)}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let ann = r.body["access_token"].as_str().unwrap().to_owned();
    // while the session is live
    let r = post(&l, "/v1/transfers", Some(&ann), Some("big-1"), t.clone()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // the same from a network Ann never confirmed: the ledger passes the client
    // address to AuthShield's introspection, which refuses it
    let r = read(
        http.post(format!("{l}/v1/transfers"))
            .bearer_auth(&ann)
            .header("idempotency-key", "big-away")
            .header("x-forwarded-for", "203.0.113.50")
            .json(&t)
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.assert_problem(403, "untrusted_network");

    // log out at AuthShield: the ledger refuses sensitive operations at once…
    let r = post(&a, "/v1/auth/logout", Some(&ann), None, json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = post(&l, "/v1/transfers", Some(&ann), Some("big-2"), t).await;
    r.assert_problem(401, "session_revoked");
    // …while plain reads accept the still-unexpired token
    let r = read(
        http.get(format!("{l}/v1/accounts/{acct_id}"))
            .bearer_auth(&ann)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["balance"], 300_000);

    // a token AuthShield never signed is refused
    let (evil, _) = vaultpay_core::jwt::Signer25519::generate("evil");
    let now = vaultpay_core::time::now_micros() / 1_000_000;
    let forged = evil
        .sign_access(&json!({"iss": format!("http://127.0.0.1:{pa}"), "sub": "x", "aud": "vaultpay", "exp": now + 60, "iat": now, "nbf": now, "jti": "j", "auth_time": now, "roles": ["admin"]}))
        .unwrap();
    let r = read(
        http.get(format!("{l}/v1/accounts"))
            .bearer_auth(&forged)
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.assert_problem(401, "invalid_token");

    // A key AuthShield retires (a compromised one) stops verifying at the ledger too,
    // without a restart: the ledger reloads the JWKS, not only on an unknown `kid`.
    let old_kid = crate::auth_flows::jwt_part(&admin, 0)["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vaultpay"));
        cmd.args(args);
        for (k, v) in &common {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    // a compromised key: the new one signs at once, then the old one is retired
    cli(&["keys", "rotate", "--now"]);
    let accounts = || {
        let r = http.get(format!("{l}/v1/accounts")).bearer_auth(&admin);
        async move { read(r.send().await.unwrap()).await }
    };
    assert_eq!(
        accounts().await.status,
        200,
        "a rotated-out key still verifies"
    );
    cli(&["keys", "retire", &old_kid]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let refused = loop {
        let r = accounts().await;
        if r.status == 401 || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    refused.assert_problem(401, "invalid_token");

    // graceful shutdown: logins in flight when SIGTERM arrives still complete
    let inflight: Vec<_> = (0..12)
        .map(|i| {
            let body = json!({"email": "admin@example.com", "password": PASSWORD, "device": {"id": format!("g{i}"), "name": "g"}});
            let req = http.post(format!("{a}/v1/auth/login")).json(&body);
            tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let status = auth.terminate();
    for t in inflight {
        assert_eq!(
            t.await
                .unwrap()
                .expect("accepted requests are answered, not dropped"),
            200
        );
    }
    assert!(status.success(), "SIGTERM exits cleanly: {status:?}");
    // Without AuthShield the ledger's JWKS reloads fail: after three reload periods
    // (1 s each here) it stops calling itself ready, as a key retired meanwhile would
    // still verify with it.
    let mut stale = None;
    for _ in 0..400 {
        let r = read(http.get(format!("{l}/readyz")).send().await.unwrap()).await;
        if r.status == 503 {
            stale = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stale
        .expect("the ledger stayed ready with no JWKS answer for 20 s")
        .assert_problem(503, "service_unavailable");
    assert!(ledger.terminate().success());
}

/// A ledger run alone that cannot reach AuthShield's JWKS is not ready, and answers a
/// token it cannot check with 503 (retry later), not 401 (a client would throw a good
/// token away).
#[tokio::test]
async fn a_ledger_without_authshield_keys_is_not_ready() {
    use base64::Engine;
    let dir = temp_dir();
    let (nowhere, pl) = (free_port(), free_port());
    let env = vec![
        ("VAULTPAY_DATA_DIR", dir.display().to_string()),
        ("VAULTPAY_DATABASE__SQLITE_SYNCHRONOUS_FULL", "false".into()),
        (
            "VAULTPAY_AUTH__INTROSPECTION_SECRET",
            "split-test-secret".into(),
        ),
        (
            "VAULTPAY_AUTH__ISSUER",
            format!("http://127.0.0.1:{nowhere}"),
        ),
        ("VAULTPAY_LOG_FORMAT", "pretty".into()),
    ];
    let _ledger = spawn_ledger(pl, nowhere, &env, dir.join("ledger.log"));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://127.0.0.1:{pl}");
    // up (healthz), not ready
    let mut up = false;
    for _ in 0..600 {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        up,
        "the ledger never listened; see {}",
        dir.join("ledger.log").display()
    );
    let r = read(http.get(format!("{base}/readyz")).send().await.unwrap()).await;
    r.assert_problem(503, "service_unavailable");
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let token = format!(
        "{}.{}.{}",
        b64(json!({"alg": "EdDSA", "typ": "JWT", "kid": "k1"})),
        b64(json!({"sub": "u"})),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0u8; 64])
    );
    let r = read(
        http.get(format!("{base}/v1/accounts"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.assert_problem(503, "service_unavailable");
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
}

/// A ledger run alone with another introspection secret than AuthShield's is not
/// ready, and says why: it probes AuthShield's introspection at start (and with every
/// JWKS reload) instead of letting the first user's sensitive operation find out. The
/// keys still load, so nothing else would tell.
#[tokio::test]
async fn a_ledger_whose_introspection_secret_authshield_refuses_is_not_ready() {
    let (r, log) = not_ready_while(
        |_| ("the-secret-authshield-has", None),
        |_| ("another-secret-entirely", None),
        "AuthShield refuses this ledger's introspection credentials",
    )
    .await;
    assert!(!r.text.contains("secret"), "{}", r.text);
    // the probe named the setting to fix
    assert!(log.contains("auth.introspection_secret differs"), "{log}");
}

/// A ledger run alone that expects another issuer than AuthShield's (the issuer an
/// operator copied from somewhere else, `localhost` for `127.0.0.1`) is not ready and
/// names the issuer to set: before, it called itself ready and refused every token as
/// `invalid_token`.
#[tokio::test]
async fn a_ledger_expecting_another_issuer_than_authshields_is_not_ready() {
    let (_, log) = not_ready_while(
        |_| ("the-same-secret-both-have", None),
        |pa| {
            (
                "the-same-secret-both-have",
                Some(format!("http://localhost:{pa}")),
            )
        },
        // `/readyz`'s own reason, logged with its 503
        "AuthShield names another issuer",
    )
    .await;
    // the probe named the value to set
    assert!(
        log.contains("AuthShield issues tokens as")
            && log.contains("VAULTPAY_AUTH__ISSUER=http://127.0.0.1:"),
        "{log}"
    );
}

/// Runs AuthShield and a ledger alone (each given an introspection secret and, for the
/// ledger, an issuer other than AuthShield's own when `Some`, as functions of
/// AuthShield's port), waits until the ledger's log says `needle` while its `/readyz`
/// answers 503, and returns that answer and the log.
async fn not_ready_while(
    auth: impl Fn(u16) -> (&'static str, Option<String>),
    ledger: impl Fn(u16) -> (&'static str, Option<String>),
    needle: &str,
) -> (crate::helpers::Resp, String) {
    let (pa, pl) = (free_port(), free_port());
    let env = |dir: &std::path::Path, (secret, issuer): (&str, Option<String>)| {
        vec![
            ("VAULTPAY_DATA_DIR", dir.display().to_string()),
            ("VAULTPAY_DATABASE__SQLITE_SYNCHRONOUS_FULL", "false".into()),
            ("VAULTPAY_AUTH__INTROSPECTION_SECRET", secret.into()),
            (
                "VAULTPAY_AUTH__ISSUER",
                issuer.unwrap_or_else(|| format!("http://127.0.0.1:{pa}")),
            ),
            ("VAULTPAY_JWKS_REFRESH_SECS", "1".into()),
            ("VAULTPAY_LOG_FORMAT", "pretty".into()),
        ]
    };
    let (da, dl) = (temp_dir(), temp_dir());
    let mut auth = Proc::spawn(
        &["serve", "auth", "--listen", &format!("127.0.0.1:{pa}")],
        &env(&da, auth(pa)),
        da.join("auth.log"),
    );
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    auth.wait_ready(&http, &format!("http://127.0.0.1:{pa}"))
        .await;
    let _ledger = spawn_ledger(pl, pa, &env(&dl, ledger(pa)), dl.join("ledger.log"));
    let base = format!("http://127.0.0.1:{pl}");
    // `/readyz` answers a generic 503 (its reasons go to the log, not to whoever
    // probes it): wait for one given for `needle`.
    let log = || std::fs::read_to_string(dl.join("ledger.log")).unwrap_or_default();
    for _ in 0..600 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            let r = read(r).await;
            if r.status == 503 && log().contains(needle) {
                r.assert_problem(503, "service_unavailable");
                return (r, log());
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "the ledger never reported {needle:?}; see {}",
        dl.join("ledger.log").display()
    )
}

/// `vaultpay serve ledger` on port `port`, with AuthShield at `http://127.0.0.1:{auth}`.
fn spawn_ledger(port: u16, auth: u16, env: &[(&str, String)], log: std::path::PathBuf) -> Proc {
    Proc::spawn(
        &[
            "serve",
            "ledger",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--auth-url",
            &format!("http://127.0.0.1:{auth}"),
        ],
        env,
        log,
    )
}
