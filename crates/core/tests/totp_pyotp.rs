//! Cross-check of `vaultpay_core::totp` against pyotp, an independent implementation,
//! through `scripts/interop/totp_pyotp.py`. Fails (never skips) when Python or pyotp
//! is missing: `scripts/test.sh` installs pyotp.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};
use vaultpay_core::totp;

fn run_pyotp(input: &serde_json::Value) -> serde_json::Value {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/interop/totp_pyotp.py"
    );
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(&python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python} (needed for the pyotp cross-check): {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "pyotp cross-check failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn codes_and_uri_agree_with_pyotp() {
    let mut times: Vec<i64> = vec![0, 29, 30, 59, 1_111_111_109, 1_234_567_890, 2_000_000_000];
    let now = vaultpay_core::time::now_micros() / 1_000_000;
    times.extend((0..40).map(|i| now - 600 + i * 31));
    for round in 0..5 {
        let secret = totp::generate_secret();
        let b32 = totp::base32_encode(&secret);
        let uri = totp::otpauth_uri("VaultPay", &format!("user{round}@example.com"), &b32);
        let out = run_pyotp(&serde_json::json!({ "secret": b32, "uri": uri, "times": times }));
        let theirs = out["codes"].as_array().unwrap();
        for (t, c) in times.iter().zip(theirs) {
            assert_eq!(
                totp::totp(&secret, *t, 30, 6),
                c.as_str().unwrap(),
                "secret {b32} at {t}"
            );
        }
        assert_eq!(out["uri"]["secret"], b32.as_str());
        assert_eq!(out["uri"]["issuer"], "VaultPay");
        assert_eq!(out["uri"]["name"], format!("user{round}@example.com"));
        assert_eq!(out["uri"]["digits"], 6);
        assert_eq!(out["uri"]["interval"], 30);
        // a code pyotp shows now is accepted by our verifier
        let t = out["now"]["time"].as_i64().unwrap();
        let code = out["now"]["code"].as_str().unwrap();
        assert_eq!(
            totp::verify(&secret, code, t, None, totp::Params::default()),
            Some(totp::step_of(t, 30))
        );
    }
}
