#!/usr/bin/env python3
"""Interoperability proof: drives a RUNNING VaultPay (AuthShield) with standard
third-party OAuth / OIDC libraries: Authlib (client side of every grant), requests
(the "browser"), PyJWT (ID- and access-token verification against the JWKS).

Flows: authorization code + PKCE S256 through the server-rendered sign-in and consent
pages to a loopback redirect; refresh (rotation); userinfo; introspection (RFC 7662);
revocation (RFC 7009); the device grant (RFC 8628) approved through the device page;
client credentials; ES256 ID tokens for a client configured so.

Input (environment):
  VP_BASE      base URL of the server, e.g. http://127.0.0.1:8080
  VP_ISSUER    the issuer (iss) the server is configured with
  VP_CLIENTS   JSON: {"web": {"client_id", "client_secret"}, "legacy": {...},
               "cli": {"client_id"}, "svc": {"client_id", "client_secret"}}
  VP_EMAIL, VP_PASSWORD   an existing user's credentials
Exit status 0 when every check passed; any failure raises (non-zero).
"""

import json
import os
import re
import secrets
import sys
import time
import urllib.parse

os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")  # loopback http in tests

import jwt  # PyJWT (cryptography backend: EdDSA, ES256)
import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.integrations.base_client.errors import OAuthError

BASE = os.environ["VP_BASE"].rstrip("/")
ISSUER = os.environ["VP_ISSUER"]
CLIENTS = json.loads(os.environ["VP_CLIENTS"])
EMAIL = os.environ["VP_EMAIL"]
PASSWORD = os.environ["VP_PASSWORD"]
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok - {what}", flush=True)


def hidden_of(html, name):
    m = re.search(rf'name="{name}" value="([^"]+)"', html)
    if not m:
        raise AssertionError(f"no {name} field in page: {html[:300]}")
    return m.group(1)


def csrf_of(html):
    return hidden_of(html, "csrf")


disc = requests.get(f"{BASE}/.well-known/openid-configuration", timeout=10).json()
check(disc["issuer"] == ISSUER, "discovery issuer matches")
check(disc["code_challenge_methods_supported"] == ["S256"], "discovery: S256 only")
# Endpoints are advertised on the public URL; this run talks to BASE.
EP = {k: BASE + urllib.parse.urlparse(disc[k]).path for k in (
    "authorization_endpoint", "token_endpoint", "userinfo_endpoint", "jwks_uri",
    "introspection_endpoint", "revocation_endpoint", "device_authorization_endpoint")}
jwks = jwt.PyJWKClient(EP["jwks_uri"], cache_keys=False)


def verify_id_token(token, client_id, alg, nonce=None):
    key = jwks.get_signing_key_from_jwt(token).key
    claims = jwt.decode(token, key, algorithms=[alg], audience=client_id, issuer=ISSUER)
    check(jwt.get_unverified_header(token)["alg"] == alg, f"ID token is {alg}")
    if nonce is not None:
        check(claims.get("nonce") == nonce, "ID token nonce round-trips")
    # A tampered token must not verify.
    head, body, sig = token.split(".")
    claims2 = dict(claims, sub="someone-else")
    forged_body = jwt.utils.base64url_encode(json.dumps(claims2).encode()).decode()
    try:
        jwt.decode(f"{head}.{forged_body}.{sig}", key, algorithms=[alg], audience=client_id, issuer=ISSUER)
        raise AssertionError("forged ID token verified")
    except jwt.InvalidSignatureError:
        print("ok - forged ID token refused", flush=True)
    try:
        jwt.decode(token, key, algorithms=[alg], audience="another-client", issuer=ISSUER)
        raise AssertionError("ID token accepted for another audience")
    except jwt.InvalidAudienceError:
        print("ok - ID token refused for another audience", flush=True)
    return claims


def verify_access_token(token):
    key = jwks.get_signing_key_from_jwt(token).key
    return jwt.decode(token, key, algorithms=["EdDSA"], audience="vaultpay", issuer=ISSUER)


def browser_code_flow(client, scope, port):
    """Authorization code + PKCE, the browser step scripted with requests."""
    redirect_uri = f"http://127.0.0.1:{port}/callback"  # loopback, any port (RFC 8252)
    sess = OAuth2Session(
        client["client_id"], client.get("client_secret"), scope=scope,
        redirect_uri=redirect_uri, code_challenge_method="S256",
        token_endpoint_auth_method="client_secret_basic")
    verifier = secrets.token_urlsafe(48)
    nonce = secrets.token_urlsafe(16)
    url, state = sess.create_authorization_url(
        EP["authorization_endpoint"], code_verifier=verifier, nonce=nonce)
    browser = requests.Session()
    page = browser.get(url, allow_redirects=False, timeout=10)
    check(page.status_code == 200 and "<form" in page.text, "authorize shows the sign-in page")
    csrf = csrf_of(page.text)
    page = browser.post(f"{BASE}/oauth/authorize/signin", allow_redirects=False, timeout=30,
                        data={"csrf": csrf, "email": EMAIL, "password": PASSWORD})
    check(page.status_code == 200 and "consent" in page.text, "sign-in leads to consent")
    res = browser.post(f"{BASE}/oauth/authorize/consent", allow_redirects=False, timeout=10,
                       data={"csrf": csrf, "decision": "approve"})
    check(res.status_code in (302, 303), "consent redirects")
    location = res.headers["Location"]
    check(location.startswith(redirect_uri + "?"), "redirect goes to the loopback URI")
    token = sess.fetch_token(EP["token_endpoint"], authorization_response=location,
                             code_verifier=verifier)
    check("access_token" in token and "id_token" in token, "code exchanged (PKCE) by Authlib")
    return sess, token, nonce


# 1. Authorization code + PKCE, EdDSA ID token, userinfo, refresh, introspection, revocation.
web = CLIENTS["web"]
sess, token, nonce = browser_code_flow(web, "openid profile email offline_access", 49152 + secrets.randbelow(10000))
id_claims = verify_id_token(token["id_token"], web["client_id"], "EdDSA", nonce)
check(id_claims["email"] == EMAIL, "ID token carries the email")
at = verify_access_token(token["access_token"])
check(at["client_id"] == web["client_id"] and at["sub"] == id_claims["sub"], "access token verifies (EdDSA, PyJWT)")
ui = sess.get(EP["userinfo_endpoint"], timeout=10)
check(ui.status_code == 200 and ui.json()["sub"] == id_claims["sub"] and ui.json()["email"] == EMAIL, "userinfo")
old_refresh = token["refresh_token"]
new = sess.refresh_token(EP["token_endpoint"], refresh_token=old_refresh)
check(new["refresh_token"] != old_refresh, "refresh rotates the refresh token")
verify_access_token(new["access_token"])
intro = sess.introspect_token(EP["introspection_endpoint"], token=new["access_token"]).json()
check(intro["active"] is True and intro["client_id"] == web["client_id"], "introspection: active")
intro = sess.introspect_token(EP["introspection_endpoint"], token=new["refresh_token"],
                              token_type_hint="refresh_token").json()
check(intro["active"] is True and intro["token_type"] == "refresh_token", "introspection of the refresh token")
r = requests.post(EP["token_endpoint"], auth=(web["client_id"], web["client_secret"]), timeout=10,
                  data={"grant_type": "refresh_token", "refresh_token": old_refresh})
check(r.status_code == 400 and r.json()["error"] == "invalid_grant", "reuse of a spent refresh token refused")
intro = sess.introspect_token(EP["introspection_endpoint"], token=new["access_token"]).json()
check(intro["active"] is False, "reuse revoked the session")
sess, token, _ = browser_code_flow(web, "openid offline_access", 49152 + secrets.randbelow(10000))
rv = sess.revoke_token(EP["revocation_endpoint"], token=token["refresh_token"], token_type_hint="refresh_token")
check(rv.status_code == 200, "revocation answered 200")
intro = sess.introspect_token(EP["introspection_endpoint"], token=token["access_token"]).json()
check(intro["active"] is False, "revoked session's access token is inactive")

# 2. ES256 ID tokens for a client configured so.
legacy = CLIENTS["legacy"]
sess, token, nonce = browser_code_flow(legacy, "openid email", 49152 + secrets.randbelow(10000))
verify_id_token(token["id_token"], legacy["client_id"], "ES256", nonce)
check(any(k["kty"] == "EC" for k in requests.get(EP["jwks_uri"], timeout=10).json()["keys"]), "JWKS publishes the P-256 key")

# 3. Device authorization grant, approved on the device page.
cli = CLIENTS["cli"]
dev = requests.post(EP["device_authorization_endpoint"], timeout=10,
                    data={"client_id": cli["client_id"], "scope": "openid offline_access"}).json()
check(re.fullmatch(r"[A-Z]{4}-[A-Z]{4}", dev["user_code"]) is not None, "device: user code issued")
cli_sess = OAuth2Session(cli["client_id"], token_endpoint_auth_method="none")


def poll():
    return cli_sess.fetch_token(EP["token_endpoint"], grant_type=DEVICE_GRANT,
                                device_code=dev["device_code"])


try:
    poll()
    raise AssertionError("device token issued before approval")
except OAuthError as e:
    check(e.error == "authorization_pending", "device: authorization_pending before approval")
browser = requests.Session()
page = browser.get(dev["verification_uri_complete"].replace(urllib.parse.urlparse(dev["verification_uri_complete"]).netloc, urllib.parse.urlparse(BASE).netloc), timeout=10)
# the form as a browser sends it: the page showed this code's request (client and
# scopes), and says so in a hidden field
page = browser.post(f"{BASE}/oauth/device", timeout=30, data={
    "csrf": csrf_of(page.text), "shown": hidden_of(page.text, "shown"),
    "user_code": dev["user_code"], "email": EMAIL,
    "password": PASSWORD, "decision": "approve"})
check(page.status_code == 200 and "connected" in page.text, "device approved on the device page")
interval = max(int(dev.get("interval", 5)), 0)
deadline = time.monotonic() + 60
while True:
    time.sleep(interval)
    try:
        tok = poll()
        break
    except OAuthError as e:
        if e.error == "slow_down":
            interval += 5
        elif e.error != "authorization_pending" or time.monotonic() > deadline:
            raise
check("refresh_token" in tok, "device: tokens issued (offline_access → refresh token)")
verify_id_token(tok["id_token"], cli["client_id"], "EdDSA")
verify_access_token(tok["access_token"])
refreshed = cli_sess.refresh_token(EP["token_endpoint"], refresh_token=tok["refresh_token"])
check("access_token" in refreshed, "device: public client refreshes")

# 4. Client credentials.
svc = CLIENTS["svc"]
svc_sess = OAuth2Session(svc["client_id"], svc["client_secret"], token_endpoint_auth_method="client_secret_post")
cc = svc_sess.fetch_token(EP["token_endpoint"], grant_type="client_credentials")
check("refresh_token" not in cc, "client_credentials: no refresh token")
claims = verify_access_token(cc["access_token"])
check(claims["sub"] == svc["client_id"] and claims["client_id"] == svc["client_id"], "client_credentials token: sub=client_id")
intro = svc_sess.introspect_token(EP["introspection_endpoint"], token=cc["access_token"]).json()
check(intro["active"] is True, "client_credentials token introspects active")
bad = OAuth2Session(svc["client_id"], "wrong-secret", token_endpoint_auth_method="client_secret_basic")
try:
    bad.fetch_token(EP["token_endpoint"], grant_type="client_credentials")
    raise AssertionError("wrong secret accepted")
except OAuthError as e:
    check(e.error == "invalid_client", "wrong client secret refused (invalid_client)")

print("ALL OK", flush=True)
sys.exit(0)
