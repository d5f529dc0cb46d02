//! Property-based fuzzing of the whole HTTP API from its own OpenAPI document:
//! Schemathesis (from PyPI) generates valid and invalid requests for every documented
//! operation and checks that none answers a 5xx, that every answer's status is one the
//! operation documents (a client generated from the document has a type for it), has
//! the documented content type (problem+json for errors) and matches its documented
//! schema, and that schema-violating requests are refused. Runs on every backend:
//! PostgreSQL is stricter about types than SQLite, so a value one accepts can be an
//! error on the other.
//!
//! `scripts/test.sh` installs Schemathesis; a machine without it fails this test loudly.

use crate::helpers::*;
use vaultpay_store::Backend;

#[tokio::test]
async fn schemathesis_finds_no_server_error_or_undocumented_answer() {
    let ok = std::process::Command::new("schemathesis")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "schemathesis is required: run scripts/test.sh (it installs it) or \
         `python3 -m pip install schemathesis`"
    );
    for backend in vaultpay_store::testing::backends() {
        eprintln!("-- backend {backend:?}");
        run(backend).await;
    }
}

async fn run(backend: Backend) {
    // Starting OAuth requests is limited per address (60 a minute); Schemathesis sends
    // every example from one, and would see only 429s there after the first minute.
    let app = TestApp::spawn_with(backend, |c| {
        c.auth.rate_limits.oauth_start_per_ip = vaultpay_core::gcra::Quota::new(1_000_000, 1);
    })
    .await;
    // an admin token reaches the admin routes too (5 minutes: the run takes less)
    let admin = app.admin().await.access;
    let schema = format!("{}/openapi.json", app.base);
    // Schemathesis keeps a cache of failures in its working directory: a scratch one,
    // so nothing lands in the checkout
    let scratch = temp_dir();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("schemathesis")
            .current_dir(&scratch)
            .args(["run", &schema])
            .args(["-H", &format!("Authorization: Bearer {admin}")])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection",
            ])
            // these end the token's session, which would leave the rest unauthenticated
            .args(["--exclude-path", "/v1/auth/logout"])
            .args(["--exclude-path-regex", "^/v1/sessions/"])
            .args(["--phases", "coverage,fuzzing"])
            .args(["--max-examples", "25", "--seed", "1", "--workers", "1"])
            .env("NO_COLOR", "1")
            .output()
            .expect("schemathesis runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures ({backend:?}):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("passed"), "{stdout}");
    app.stop().await;
}
