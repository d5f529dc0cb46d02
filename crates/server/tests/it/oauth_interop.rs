//! Interoperability: the real `vaultpay` binary, clients registered through the CLI
//! (`vaultpay clients create`) and the admin API, then `scripts/interop/oauth_authlib.py`
//! (Python Authlib + requests + PyJWT) drives every grant against it and must exit 0.
//!
//! The Python packages are installed by `scripts/test.sh`; a machine without them
//! fails this test loudly rather than skipping it.

use crate::helpers::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use vaultpay_store::Backend;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

#[tokio::test]
async fn authlib_and_pyjwt_interoperate_with_the_running_binary() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import authlib, requests, jwt, cryptography"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python3 with authlib, requests, pyjwt and cryptography is required: run scripts/test.sh \
         (it installs them) or `python3 -m pip install authlib requests pyjwt cryptography`"
    );
    for backend in vaultpay_store::testing::backends() {
        eprintln!("-- backend {backend:?}");
        run(backend).await;
    }
}

async fn create(http: &reqwest::Client, base: &str, admin: &str, body: Value) -> Value {
    let r = http
        .post(format!("{base}/v1/admin/clients"))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

fn cli_create(env: &[(&str, String)], args: &[&str]) -> Value {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vaultpay"));
    cmd.args(["clients", "create"]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "vaultpay clients create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

async fn run(backend: Backend) {
    let dir = temp_dir();
    let auth_db = vaultpay_store::testing::fresh_location(backend)
        .await
        .unwrap();
    let ledger_db = vaultpay_store::testing::fresh_location(backend)
        .await
        .unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let env = vec![
        ("VAULTPAY_DATA_DIR", dir.display().to_string()),
        ("VAULTPAY_DATABASE__AUTH_URL", auth_db),
        ("VAULTPAY_DATABASE__LEDGER_URL", ledger_db),
        ("VAULTPAY_DATABASE__SQLITE_SYNCHRONOUS_FULL", "false".into()),
        ("VAULTPAY_AUTH__ISSUER", base.clone()),
        (
            "VAULTPAY_MASTER_KEY",
            vaultpay_core::crypto::MasterKey::generate()
                .to_hex()
                .to_string(),
        ),
        (
            "VAULTPAY_AUTH__OAUTH__DEVICE_POLL_INTERVAL_SECS",
            "1".into(),
        ),
        ("VAULTPAY_BOOTSTRAP_ADMIN_EMAIL", "admin@example.com".into()),
        ("VAULTPAY_BOOTSTRAP_ADMIN_PASSWORD", PASSWORD.into()),
        ("VAULTPAY_LOG_FORMAT", "pretty".into()),
        (
            "VAULTPAY_AUTH__RATE_LIMITS__LOGIN_PER_ACCOUNT",
            "{ burst = 100, period_secs = 60 }".into(),
        ),
    ];
    let mut server = Proc::spawn(
        &["serve", "--listen", &format!("127.0.0.1:{port}")],
        &env,
        dir.join("server.log"),
    );
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    server.wait_ready(&http, &base).await;

    // The confidential web client through the CLI, against the running server's database.
    let web = cli_create(
        &env,
        &[
            "--name",
            "Authlib web app",
            "--redirect-uri",
            "http://127.0.0.1/callback",
            "--scope",
            "openid",
            "--scope",
            "profile",
            "--scope",
            "email",
            "--scope",
            "offline_access",
        ],
    );
    assert!(web["client_secret"].is_string(), "{web}");
    // The rest through the admin API.
    let login = http
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({ "email": "admin@example.com", "password": PASSWORD, "device": { "id": "it", "name": "interop" } }))
        .send()
        .await
        .unwrap();
    let admin: Value = login.json().await.unwrap();
    let admin = admin["access_token"].as_str().unwrap().to_owned();
    let legacy = create(&http, &base, &admin, json!({ "name": "RS256-era library", "redirect_uris": ["http://127.0.0.1/callback"], "id_token_alg": "ES256" })).await;
    let cli = create(
        &http,
        &base,
        &admin,
        json!({ "name": "CLI", "public": true,
        "grant_types": ["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"],
        "scopes": ["openid", "offline_access"] }),
    )
    .await;
    let svc = create(
        &http,
        &base,
        &admin,
        json!({ "name": "batch", "grant_types": ["client_credentials"], "scopes": [] }),
    )
    .await;
    let r = http
        .post(format!("{base}/v1/auth/register"))
        .json(&json!({ "email": "py@example.com", "password": PASSWORD, "name": "Py Thon" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let clients = json!({ "web": web, "legacy": legacy, "cli": cli, "svc": svc });
    let out = tokio::process::Command::new("python3")
        .arg(repo_root().join("scripts/interop/oauth_authlib.py"))
        .env("VP_BASE", &base)
        .env("VP_ISSUER", &base)
        .env("VP_CLIENTS", clients.to_string())
        .env("VP_EMAIL", "py@example.com")
        .env("VP_PASSWORD", PASSWORD)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "interop script failed ({}):\n{stdout}\n{stderr}\nserver log: {}",
        out.status,
        dir.join("server.log").display()
    );
    assert!(stdout.contains("ALL OK"));

    // `vaultpay clients list|delete` against the running server's database.
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vaultpay"));
        cmd.arg("clients").args(args);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let svc_id = svc["client_id"].as_str().unwrap();
    let list = cli(&["list"]);
    assert!(list.status.success());
    let list = String::from_utf8(list.stdout).unwrap();
    assert_eq!(list.lines().count(), 4, "{list}");
    assert!(list.contains(svc_id) && !list.contains("secret"), "{list}");
    assert!(cli(&["delete", svc_id]).status.success());
    assert!(!cli(&["delete", svc_id]).status.success());
    // The server stops accepting the client (its client cache lasts at most 2 s).
    let mut refused = false;
    for _ in 0..100 {
        let r = http
            .post(format!("{base}/oauth/token"))
            .basic_auth(svc_id, svc["client_secret"].as_str())
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        if r.status() == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(refused, "a deleted client still authenticates");
    server.terminate();
}
