//! `/openapi.json` (OpenAPI 3.1, both services merged) and a self-contained docs page
//! at `/docs` that renders it in the browser (no CDN, nothing downloaded at build time).

use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi;

pub fn document() -> OpenApi {
    let mut doc = vaultpay_auth::openapi();
    doc.merge(vaultpay_ledger::openapi());
    doc.info.title = "VaultPay API".into();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc.info.description = Some(
        "AuthShield (identity) and the VaultPay ledger. Errors are RFC 9457 problem documents \
         (`application/problem+json`) with a stable `code`."
            .into(),
    );
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .build(),
        ),
    );
    refusals(&mut doc);
    doc
}

/// How an operation reads its request body, which decides how it refuses one it
/// cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// No body is read.
    None,
    /// `ApiJson`: JSON only.
    Json,
    /// JSON, or the same fields form-encoded (`ApiForm`): the emailed links' pages
    /// post their forms to the same operations API clients send JSON to.
    JsonOrForm,
    /// `OptionalJson`: none, or JSON under any content type (as `curl -d` sends it).
    OptionalJson,
    /// `ApiForm`, answering problem documents.
    Form,
    /// An OAuth endpoint's form: every refusal is an RFC 6749 error object.
    OAuthForm,
    /// A browser form: refusals are HTML pages.
    Page,
}

/// Operations whose body the request-body content type alone does not describe.
const BODIES: &[(&str, &str, Body)] = &[
    ("post", "/v1/auth/verify-email", Body::JsonOrForm),
    ("post", "/v1/auth/email/confirm", Body::JsonOrForm),
    ("post", "/v1/auth/password/reset", Body::JsonOrForm),
    ("post", "/v1/auth/logout", Body::OptionalJson),
    ("post", "/v1/transfers/{id}/post", Body::OptionalJson),
    ("post", "/v1/transfers/{id}/void", Body::OptionalJson),
    ("post", "/oauth/token", Body::OAuthForm),
    ("post", "/oauth/introspect", Body::OAuthForm),
    ("post", "/oauth/revoke", Body::OAuthForm),
    ("post", "/oauth/device_authorization", Body::OAuthForm),
    ("post", "/oauth/authorize/signin", Body::Page),
    ("post", "/oauth/authorize/second-factor", Body::Page),
    ("post", "/oauth/authorize/consent", Body::Page),
    ("post", "/oauth/device", Body::Page),
];

/// Who answers an operation's 429 and in which shape: the operations that call
/// `vaultpay_web::enforce`, with the limits they draw on.
const RATE_LIMITED: &[(&str, &str, &str)] = &[
    ("post", "/v1/auth/register", "registrations per address"),
    (
        "post",
        "/v1/auth/login",
        "sign-in attempts per address and per account",
    ),
    (
        "post",
        "/v1/auth/login/complete",
        "held-login completions per address",
    ),
    (
        "post",
        "/v1/auth/verify-email/resend",
        "verification emails per account",
    ),
    (
        "post",
        "/v1/auth/password/forgot",
        "reset requests per address",
    ),
    (
        "post",
        "/v1/auth/password/reset",
        "reset attempts per address",
    ),
    (
        "post",
        "/v1/auth/password/change",
        "current-password attempts per account (the sign-in limit)",
    ),
    (
        "post",
        "/v1/auth/email/change",
        "current-password attempts per account (the sign-in limit), change requests per account",
    ),
    (
        "post",
        "/v1/auth/mfa/verify",
        "second-factor attempts per address and per account",
    ),
    (
        "post",
        "/v1/auth/mfa/email",
        "code emails per account, attempts per address",
    ),
    (
        "post",
        "/v1/auth/step-up",
        "second-factor attempts per address and per account",
    ),
    ("post", "/v1/auth/step-up/email", "code emails per account"),
    (
        "post",
        "/v1/mfa/totp/confirm",
        "second-factor attempts per address and per account",
    ),
    (
        "post",
        "/v1/mfa/totp/disable",
        "second-factor attempts per address and per account",
    ),
    ("post", "/v1/mfa/email/enable", "code emails per account"),
    (
        "post",
        "/v1/mfa/email/confirm",
        "second-factor attempts per address and per account",
    ),
    (
        "post",
        "/v1/mfa/email/disable",
        "second-factor attempts per address and per account",
    ),
    (
        "post",
        "/v1/oauth/device/approve",
        "device-code decisions per address",
    ),
    (
        "get",
        "/oauth/authorize",
        "authorization requests started per address",
    ),
    ("get", "/oauth/device", "device-code look-ups per address"),
    (
        "post",
        "/oauth/device",
        "device-code look-ups and sign-in attempts per address",
    ),
    (
        "post",
        "/oauth/authorize/signin",
        "sign-in attempts per address and per account",
    ),
    (
        "post",
        "/oauth/token",
        "failed client authentications and refreshes per address, refreshes per session",
    ),
    (
        "post",
        "/oauth/introspect",
        "failed client authentications per address",
    ),
    (
        "post",
        "/oauth/revoke",
        "failed client authentications per address, revocations per client",
    ),
    (
        "post",
        "/oauth/device_authorization",
        "device codes started per address",
    ),
];

fn body_of(method: &str, path: &str, op: &utoipa::openapi::path::Operation) -> Body {
    if let Some((_, _, b)) = BODIES.iter().find(|(m, p, _)| *m == method && *p == path) {
        return *b;
    }
    let content = op.request_body.as_ref().map(|b| &b.content);
    if content.is_some_and(|c| c.contains_key("application/json")) {
        Body::Json
    } else if content.is_some_and(|c| c.contains_key("application/x-www-form-urlencoded")) {
        Body::Form
    } else {
        Body::None
    }
}

fn response(
    what: &str,
    content_type: &str,
    schema: Option<&str>,
) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    use utoipa::openapi::content::ContentBuilder;
    use utoipa::openapi::{Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(what)
        .content(
            content_type,
            ContentBuilder::new()
                .schema(schema.map(Ref::from_schema_name))
                .build(),
        )
        .build()
        .into()
}

/// A problem document; filed under `application/json` like the annotations' own, and
/// served as `application/problem+json` (see [`problems_as_problem_json`]).
fn problem(what: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    response(what, "application/json", Some("Problem"))
}

fn oauth_error(what: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    response(what, "application/json", Some("OAuthError"))
}

fn html_page(what: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    response(what, "text/html", None)
}

/// What a response is sent as: its content types and their schemas.
fn shape(r: &utoipa::openapi::Response) -> Vec<(String, Option<String>)> {
    r.content
        .iter()
        .map(|(ct, c)| {
            let schema = match &c.schema {
                Some(utoipa::openapi::RefOr::Ref(r)) => Some(r.ref_location.clone()),
                Some(utoipa::openapi::RefOr::T(_)) => Some(String::new()),
                None => None,
            };
            (ct.clone(), schema)
        })
        .collect()
}

/// Documents `response` under `status` unless the annotation did: an annotation's own
/// response is kept, with this one's text when it has none, or this one's text added
/// when both are sent alike (a 422 problem of the password policy is also the 422
/// problem of a field of the wrong type) and its text does not name this one's code.
fn add_refusal(
    responses: &mut std::collections::BTreeMap<
        String,
        utoipa::openapi::RefOr<utoipa::openapi::Response>,
    >,
    status: &str,
    response: utoipa::openapi::RefOr<utoipa::openapi::Response>,
) {
    use std::collections::btree_map::Entry;
    use utoipa::openapi::RefOr;
    let old = match responses.entry(status.to_owned()) {
        Entry::Vacant(v) => {
            v.insert(response);
            return;
        }
        Entry::Occupied(o) => o.into_mut(),
    };
    let (RefOr::T(old), RefOr::T(new)) = (old, response) else {
        return;
    };
    if shape(old) != shape(&new) {
        return;
    }
    // the first `code` the new text names
    let code = new.description.split('`').nth(1).unwrap_or_default();
    if old.description.trim().is_empty() {
        old.description = new.description;
    } else if !code.is_empty() && !old.description.contains(&format!("`{code}`")) {
        old.description = format!(
            "{}. Also {}",
            old.description.trim_end_matches('.'),
            new.description
        );
    }
}

/// The refusals every operation of a kind can give, said once for the merged document
/// instead of on each annotation (an annotation's own, more specific, entry is kept):
/// what the extractors in `vaultpay_web::extract` answer for a body, query or path
/// they cannot read, the bearer token's 401, the rate limits' 429 and the 503 of the
/// request deadline or of a dependency that is down.
fn refusals(doc: &mut OpenApi) {
    use utoipa::openapi::path::ParameterIn;
    for (path, item) in doc.paths.paths.iter_mut() {
        let ops = [
            ("get", &mut item.get),
            ("post", &mut item.post),
            ("put", &mut item.put),
            ("patch", &mut item.patch),
            ("delete", &mut item.delete),
        ];
        for (method, op) in ops {
            let Some(op) = op.as_mut() else { continue };
            let body = body_of(method, path, op);
            let params = |place: ParameterIn| {
                op.parameters
                    .iter()
                    .flatten()
                    .any(|p| p.parameter_in == place)
            };
            let (query, in_path) = (params(ParameterIn::Query), params(ParameterIn::Path));
            let bearer = op
                .security
                .iter()
                .flatten()
                .any(|s| serde_json::to_value(s).is_ok_and(|v| v.get("bearer").is_some()));
            let limited = RATE_LIMITED
                .iter()
                .find(|(m, p, _)| *m == method && p == path)
                .map(|(_, _, what)| *what);
            let r = &mut op.responses.responses;
            let mut add = |status: &str, response| add_refusal(r, status, response);
            match body {
                Body::None => {}
                Body::Json => {
                    add(
                        "400",
                        problem("`malformed_json`: the body is not valid JSON (or is empty)"),
                    );
                    add(
                        "413",
                        problem("`body_too_large`: the body is over the size limit"),
                    );
                    add(
                        "415",
                        problem("`unsupported_media_type`: the body is not `application/json`"),
                    );
                    add("422", problem("`invalid_request`: the body is not a JSON object, a field is missing, unknown or of the wrong type, or text contains NUL"));
                }
                Body::JsonOrForm => {
                    add(
                        "400",
                        problem("`malformed_json`: the JSON body is not valid JSON (or is empty)"),
                    );
                    add(
                        "413",
                        problem("`body_too_large`: the body is over the size limit"),
                    );
                    add("415", problem("`unsupported_media_type`: the body is neither `application/json` nor `application/x-www-form-urlencoded`"));
                    add("422", problem("`invalid_request`: the JSON body is not an object, a field is missing, unknown or of the wrong type, or text contains NUL"));
                }
                Body::OptionalJson => {
                    add(
                        "400",
                        problem("`malformed_json`: the body is not valid JSON"),
                    );
                    add(
                        "413",
                        problem("`body_too_large`: the body is over the size limit"),
                    );
                    add("422", problem("`invalid_request`: the body is not a JSON object, a field is unknown or of the wrong type, or text contains NUL"));
                }
                Body::Form => {
                    add(
                        "413",
                        problem("`body_too_large`: the body is over the size limit"),
                    );
                    add("415", problem("`unsupported_media_type`: the body is not `application/x-www-form-urlencoded`"));
                    add(
                        "422",
                        problem(
                            "`invalid_request`: a field is missing or malformed, or contains NUL",
                        ),
                    );
                }
                Body::OAuthForm => {
                    add("400", oauth_error("`invalid_request` (the form is missing, unreadable, over the size limit or lacks a parameter), or the grant's own error (`invalid_grant`, `unsupported_grant_type`, `invalid_scope`, ...)"));
                    add(
                        "401",
                        oauth_error("`invalid_client`: client authentication failed"),
                    );
                }
                Body::Page => {
                    add("400", html_page("Error page: the form is incomplete, or the step does not belong to a pending request"));
                }
            }
            if query && body != Body::Page && !path.starts_with("/oauth/") {
                add(
                    "400",
                    problem("`invalid_query`: an unknown or malformed query parameter"),
                );
                add(
                    "422",
                    problem("`invalid_request`: a query parameter contains NUL"),
                );
            }
            if in_path {
                add(
                    "400",
                    problem("`invalid_path`: the path does not decode to UTF-8"),
                );
                add(
                    "422",
                    problem("`invalid_request`: a path parameter contains NUL"),
                );
            }
            if bearer {
                add("401", problem("`missing_token` or `invalid_token` (malformed, expired or revoked), `session_revoked`, or `insufficient_user_authentication` (a recent sign-in or second factor is needed)"));
            }
            if let Some(what) = limited {
                let text = format!(
                    "`rate_limited`: too many requests ({what}); retry after `Retry-After`"
                );
                add(
                    "429",
                    match body {
                        Body::OAuthForm => oauth_error(&format!(
                            "`slow_down`: too many requests ({what}); retry after `Retry-After`"
                        )),
                        Body::Page if method == "post" => html_page(&format!(
                            "The form again, with the reason: too many attempts ({what})"
                        )),
                        _ => problem(&text),
                    },
                );
            }
            add("503", problem("`service_unavailable` (the database or another dependency cannot be reached), `transaction_conflict` (lost a race with a concurrent request) or `timeout` (the request deadline passed): nothing was done; retry after `Retry-After`"));
        }
    }
}

/// Route annotations name `Problem` as the body of their error responses; utoipa files
/// those under `application/json`. The server sends them as `application/problem+json`
/// (RFC 9457), so the document says that.
fn problems_as_problem_json(mut v: serde_json::Value) -> serde_json::Value {
    let is_problem = |c: &serde_json::Value| {
        c["schema"]["$ref"]
            .as_str()
            .is_some_and(|r| r.ends_with("/Problem"))
    };
    let paths = v.get_mut("paths").and_then(|p| p.as_object_mut());
    for op in paths
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
    {
        let responses = op.get_mut("responses").and_then(|r| r.as_object_mut());
        for content in responses
            .into_iter()
            .flat_map(|r| r.values_mut())
            .filter_map(|r| r.get_mut("content").and_then(|c| c.as_object_mut()))
        {
            if content.get("application/json").is_some_and(is_problem) {
                if let Some(c) = content.remove("application/json") {
                    content.insert(vaultpay_proto::PROBLEM_CONTENT_TYPE.into(), c);
                }
            }
        }
    }
    v
}

/// A response the route annotations leave without a description gets its status's
/// reason phrase ("Created", "Not Found"): OpenAPI requires one, and generated clients
/// and documentation show it.
fn described(mut v: serde_json::Value) -> serde_json::Value {
    let paths = v.get_mut("paths").and_then(|p| p.as_object_mut());
    for (status, response) in paths
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(|item| item.as_object_mut())
        .flat_map(|item| item.values_mut())
        .filter_map(|op| op.get_mut("responses").and_then(|r| r.as_object_mut()))
        .flat_map(|r| r.iter_mut())
    {
        let empty = response
            .get("description")
            .is_none_or(|d| d.as_str().is_some_and(str::is_empty));
        let reason = status
            .parse::<u16>()
            .ok()
            .and_then(|s| axum::http::StatusCode::from_u16(s).ok())
            .and_then(|s| s.canonical_reason());
        if let (true, Some(reason), Some(r)) = (empty, reason, response.as_object_mut()) {
            r.insert("description".into(), reason.into());
        }
    }
    v
}

/// The document as `/openapi.json` serves it.
fn served() -> serde_json::Result<serde_json::Value> {
    serde_json::to_value(document())
        .map(problems_as_problem_json)
        .map(described)
}

pub async fn openapi_json() -> Response {
    // The document is the binary's own: built (and post-processed) once, not per
    // request.
    static JSON: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    let json = JSON.get_or_init(|| {
        served()
            .and_then(|v| serde_json::to_string(&v))
            .map_err(|e| e.to_string())
    });
    match json {
        Ok(json) => {
            let mut res = json.clone().into_response();
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            res
        }
        Err(e) => vaultpay_web::ApiError::internal(e).into_response(),
    }
}

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>VaultPay API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px/1.5 system-ui,sans-serif;margin:0;color:#1d2430;background:#f7f8fa}
header{background:#14213d;color:#fff;padding:16px 24px}header h1{margin:0;font-size:20px}
main{max-width:1000px;margin:0 auto;padding:16px 24px}
details{background:#fff;border:1px solid #dfe3ea;border-radius:6px;margin:8px 0}
summary{cursor:pointer;padding:10px 12px;font-family:ui-monospace,monospace}
.m{display:inline-block;min-width:64px;font-weight:700}.get{color:#0a7d32}.post{color:#1f5bd6}.delete{color:#c2261d}.put,.patch{color:#9a6300}
pre{background:#f0f2f5;padding:8px;overflow:auto;margin:0 12px 12px}p.d{margin:0 12px 8px}h2{margin-top:28px}
input{width:100%;padding:8px;font-size:15px;border:1px solid #ccd;border-radius:4px;box-sizing:border-box}
</style></head><body>
<header><h1>VaultPay API</h1><div id="info"></div></header>
<main><p>Raw document: <a href="/openapi.json">/openapi.json</a></p>
<input id="q" placeholder="Filter endpoints"><div id="ops"></div><h2>Schemas</h2><div id="schemas"></div></main>
<script>
const esc=s=>String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
fetch('/openapi.json').then(r=>r.json()).then(doc=>{
 document.getElementById('info').textContent=doc.info.title+' '+doc.info.version;
 const ops=document.getElementById('ops');let html='';
 for(const [path,item] of Object.entries(doc.paths||{})){for(const [m,op] of Object.entries(item)){
  if(typeof op!=='object'||!op.responses)continue;
  const body=op.requestBody?JSON.stringify(op.requestBody.content,null,1):'';
  const resp=Object.entries(op.responses).map(([c,r])=>c+' '+(r.description||'')).join('\n');
  html+=`<details data-k="${esc((m+' '+path).toLowerCase())}"><summary><span class="m ${m}">${m.toUpperCase()}</span> ${esc(path)}</summary>`+
   `<p class="d">${esc(op.description||op.summary||'')}</p>`+(body?`<pre>${esc(body)}</pre>`:'')+`<pre>${esc(resp)}</pre></details>`;}}
 ops.innerHTML=html;
 const sc=(doc.components||{}).schemas||{};
 document.getElementById('schemas').innerHTML=Object.entries(sc).map(([n,s])=>`<details><summary>${esc(n)}</summary><pre>${esc(JSON.stringify(s,null,1))}</pre></details>`).join('');
 document.getElementById('q').oninput=e=>{const q=e.target.value.toLowerCase();for(const d of ops.children)d.style.display=d.dataset.k.includes(q)?'':'none';};
});
</script></body></html>"#;

pub async fn page() -> Response {
    let mut res = Html(PAGE).into_response();
    // The page runs its own inline script and fetches the document from this origin.
    res.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"),
    );
    res
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut ops = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if op.get("responses").is_some() {
                    ops.push((method.clone(), path.clone(), op.clone()));
                }
            }
        }
        ops
    }

    /// The schema a response is documented with under `content_type`, if any.
    fn schema<'a>(op: &'a Value, status: &str, content_type: &str) -> Option<&'a str> {
        op["responses"][status]["content"][content_type]["schema"]["$ref"].as_str()
    }

    fn is_problem(op: &Value, status: &str) -> bool {
        schema(op, status, PROBLEM_JSON).is_some_and(|r| r.ends_with("/Problem"))
    }

    const PROBLEM_JSON: &str = vaultpay_proto::PROBLEM_CONTENT_TYPE;

    /// Every operation with a JSON request body documents what the JSON extractor
    /// answers for a body it cannot read, as the problem document it is: the
    /// generated clients would otherwise have no type for those answers (and
    /// Schemathesis' `status_code_conformance` fails).
    #[test]
    fn every_json_body_documents_the_refusals_of_its_extractor() {
        let doc = served().unwrap();
        let mut seen = 0;
        let mut other_bodies = Vec::new();
        for (method, path, op) in operations(&doc) {
            if op["requestBody"]["content"]["application/json"].is_null() {
                continue;
            }
            seen += 1;
            let want: &[&str] = match body_of_path(&method, &path) {
                Body::Json | Body::JsonOrForm => &["400", "413", "415", "422"],
                kind => {
                    other_bodies.push(format!("{method} {path} {kind:?}"));
                    match kind {
                        // any content type is read as JSON: no 415
                        Body::OptionalJson => &["400", "413", "422"],
                        other => panic!("{method} {path}: a JSON body read as {other:?}"),
                    }
                }
            };
            for status in want {
                assert!(
                    is_problem(&op, status),
                    "{method} {path}: {status} is not documented as a problem: {}",
                    op["responses"]
                );
                let text = op["responses"][status]["description"].as_str().unwrap();
                assert!(
                    text.contains('`'),
                    "{method} {path} {status}: no code in {text:?}"
                );
            }
        }
        assert!(seen >= 28, "{seen} operations with a JSON body");
        other_bodies.sort();
        assert_eq!(
            other_bodies,
            [
                "post /v1/auth/logout OptionalJson",
                "post /v1/transfers/{id}/post OptionalJson",
                "post /v1/transfers/{id}/void OptionalJson",
            ]
        );
        // the codes are the ones the extractor really uses
        let login = &doc["paths"]["/v1/auth/login"]["post"]["responses"];
        for (status, code) in [
            ("400", "malformed_json"),
            ("413", "body_too_large"),
            ("415", "unsupported_media_type"),
            ("422", "invalid_request"),
        ] {
            let text = login[status]["description"].as_str().unwrap();
            assert!(text.contains(&format!("`{code}`")), "{status}: {text}");
        }
        // an annotation's own description is kept, the extractor's added to it
        let deposit_422 = doc["paths"]["/v1/admin/deposits"]["post"]["responses"]["422"]
            ["description"]
            .as_str()
            .unwrap();
        for code in ["amount_invalid", "currency_mismatch", "invalid_request"] {
            assert!(deposit_422.contains(code), "{deposit_422}");
        }
    }

    fn body_of_path(method: &str, path: &str) -> Body {
        let doc = document();
        let item = doc.paths.paths.get(path).unwrap();
        let op = match method {
            "get" => &item.get,
            "post" => &item.post,
            "delete" => &item.delete,
            _ => &None,
        };
        body_of(method, path, op.as_ref().unwrap())
    }

    /// Form endpoints refuse in their own format: the OAuth ones with RFC 6749 error
    /// objects, the emailed links' confirmations with problem documents.
    #[test]
    fn form_bodies_are_refused_in_their_own_format() {
        let doc = served().unwrap();
        for path in [
            "/oauth/token",
            "/oauth/introspect",
            "/oauth/revoke",
            "/oauth/device_authorization",
        ] {
            let op = &doc["paths"][path]["post"];
            assert_eq!(body_of_path("post", path), Body::OAuthForm, "{path}");
            for status in ["400", "401", "429"] {
                assert!(
                    schema(op, status, "application/json")
                        .is_some_and(|r| r.ends_with("/OAuthError")),
                    "{path} {status}: {}",
                    op["responses"]
                );
            }
            assert!(op["responses"]["413"].is_null(), "{path}: its 413 is a 400");
            assert!(
                op["requestBody"]["content"]["application/x-www-form-urlencoded"].is_object(),
                "{path}"
            );
        }
        for path in ["/v1/auth/login/confirm", "/v1/auth/login/deny"] {
            let op = &doc["paths"][path]["post"];
            for status in ["413", "415", "422"] {
                assert!(
                    is_problem(op, status),
                    "{path} {status}: {}",
                    op["responses"]
                );
            }
        }
    }

    /// The tables name operations that exist; every rate-limited one documents its
    /// 429, and every operation the 503 of the request deadline.
    #[test]
    fn rate_limits_and_deadlines_are_documented() {
        let doc = served().unwrap();
        let ops = operations(&doc);
        let find = |m: &str, p: &str| {
            ops.iter()
                .find(|(method, path, _)| method == m && path == p)
                .map(|(_, _, op)| op)
                .unwrap_or_else(|| panic!("{m} {p} is not documented"))
        };
        for (m, p, _) in BODIES {
            find(m, p);
        }
        for (m, p, _) in RATE_LIMITED {
            let op = find(m, p);
            assert!(op["responses"]["429"].is_object(), "{m} {p}: no 429");
        }
        assert!(is_problem(find("post", "/v1/auth/login/complete"), "429"));
        for (method, path, op) in &ops {
            assert!(is_problem(op, "503"), "{method} {path}: no 503");
            if op["security"][0]["bearer"].is_array() {
                assert!(
                    op["responses"]["401"].is_object(),
                    "{method} {path}: no 401"
                );
            }
        }
    }
}
