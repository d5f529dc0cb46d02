#!/usr/bin/env bash
# The test command (README): every crate, every feature, one integration binary per crate.
#
# PostgreSQL, Redis and NATS variants run when VAULTPAY_TEST_PG_URL /
# VAULTPAY_TEST_REDIS_URL / VAULTPAY_TEST_NATS_URL are set (.ci/run sets them and starts
# the services); a set variable whose service is unreachable fails the run. The SMTP test talks to a real SMTP server (Python aiosmtpd),
# installed here when missing, as is pyotp (scripts/interop/totp_pyotp.py cross-checks
# our TOTP against it; that test fails when pyotp is missing), and the Python OAuth/OIDC
# libraries (Authlib, requests, PyJWT) scripts/interop/oauth_authlib.py drives the server with,
# and Schemathesis, which fuzzes the whole API from its OpenAPI document.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
  echo "installing aiosmtpd (the SMTP server the mail tests send to)"
  python3 -m pip install --quiet --disable-pip-version-check aiosmtpd
fi
if ! python3 -c 'import pyotp' 2>/dev/null; then
  echo "installing pyotp (the independent TOTP implementation the interop test checks against)"
  python3 -m pip install --quiet --disable-pip-version-check pyotp
fi
if ! python3 -c 'import authlib, requests, jwt, cryptography' 2>/dev/null; then
  echo "installing Authlib, requests, PyJWT, cryptography (the OAuth interop test's clients)"
  python3 -m pip install --quiet --disable-pip-version-check authlib requests pyjwt cryptography
  python3 -c 'import authlib, requests, jwt, cryptography' \
    || { echo "error: the OAuth interop test needs authlib, requests, pyjwt and cryptography" >&2; exit 1; }
fi
if ! command -v schemathesis >/dev/null 2>&1; then
  echo "installing Schemathesis (fuzzes every operation of /openapi.json in the API fuzz test)"
  python3 -m pip install --quiet --disable-pip-version-check schemathesis
  command -v schemathesis >/dev/null \
    || { echo "error: the API fuzz test needs the schemathesis command on PATH" >&2; exit 1; }
fi
exec cargo test --workspace --all-features "$@"
