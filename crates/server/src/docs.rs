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
    doc
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

pub async fn openapi_json() -> Response {
    match serde_json::to_value(document())
        .map(problems_as_problem_json)
        .map(described)
        .and_then(|v| serde_json::to_string(&v))
    {
        Ok(json) => {
            let mut res = json.into_response();
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
