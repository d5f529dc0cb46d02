//! Request-level middleware: request id (accepted or generated, echoed, in every log
//! line), W3C trace context, a deadline, security headers and metrics.

use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::time::{Duration, Instant};
use tracing::Instrument;
use vaultpay_web::{ApiError, REQUEST_ID};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn valid_request_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The trace id of a valid W3C `traceparent` header.
fn trace_id(req: &Request) -> Option<String> {
    let tp = req.headers().get("traceparent")?.to_str().ok()?;
    let mut parts = tp.split('-');
    let (Some(ver), Some(trace), Some(span), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    (hex(ver, 2)
        && ver != "ff"
        && hex(trace, 32)
        && trace != "0".repeat(32)
        && hex(span, 16)
        && hex(flags, 2))
    .then(|| trace.to_owned())
}

#[derive(Clone, Copy)]
pub struct Deadline(pub Duration);

pub async fn request_context(
    deadline: axum::extract::State<Deadline>,
    req: Request,
    next: Next,
) -> Response {
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().clone();
    let traceparent = req.headers().get("traceparent").cloned();
    let span = tracing::info_span!("request", request_id = %id, method = %method, route = %route, trace_id = tracing::field::Empty);
    if let Some(t) = trace_id(&req) {
        span.record("trace_id", t.as_str());
    }
    let start = Instant::now();
    let work = REQUEST_ID.scope(id.clone(), async move {
        // a NUL in the path would reach the database through a path parameter
        // (PostgreSQL refuses it in text); bodies and queries are checked by the
        // extractors
        if vaultpay_web::urlencoded_has_nul(req.uri().path().as_bytes()) {
            return vaultpay_web::nul_refused().into_response();
        }
        if !vaultpay_web::path_is_utf8(req.uri().path().as_bytes()) {
            return vaultpay_web::path_not_utf8().into_response();
        }
        match tokio::time::timeout(deadline.0 .0, next.run(req)).await {
            Ok(res) => res,
            Err(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", "Request timed out")
                .detail("The request took too long and was abandoned; it is safe to retry with the same Idempotency-Key.")
                .into_response(),
        }
    });
    let mut res = work.instrument(span.clone()).await;
    let elapsed = start.elapsed();
    let status = res.status().as_u16();
    let _enter = span.enter();
    if status >= 500 {
        tracing::error!(
            status,
            latency_ms = elapsed.as_secs_f64() * 1e3,
            "request failed"
        );
    } else {
        tracing::info!(status, latency_ms = elapsed.as_secs_f64() * 1e3, "request");
    }
    let labels = [
        ("route", route),
        ("method", method_label(&method).to_owned()),
        ("status", status.to_string()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels).record(elapsed.as_secs_f64());
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert(X_REQUEST_ID, v);
    }
    if let Some(tp) = traceparent {
        h.insert("traceparent", tp);
    }
    security_headers(h);
    res
}

/// The metrics label of a request method: the standard ones by name, any other as
/// `other` (a method is any token a client cares to send, and each label value is a
/// series the process keeps for its lifetime).
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method as M;
    match *m {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::PATCH => "PATCH",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => "other",
    }
}

fn security_headers(h: &mut axum::http::HeaderMap) {
    let mut set = |k: HeaderName, v: &'static str| {
        h.entry(k).or_insert(HeaderValue::from_static(v));
    };
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    // Answers carry personal and financial data (profiles, balances, statements):
    // no shared or browser cache keeps them unless a route says otherwise (the JWKS
    // and discovery documents do).
    set(header::CACHE_CONTROL, "no-store");
    set(header::X_FRAME_OPTIONS, "DENY");
    set(header::REFERRER_POLICY, "no-referrer");
    set(
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; frame-ancestors 'none'",
    );
    set(
        HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    set(
        HeaderName::from_static("cross-origin-resource-policy"),
        "same-origin",
    );
    set(
        HeaderName::from_static("permissions-policy"),
        "interest-cohort=()",
    );
}

/// 404 for unknown paths, as a problem document.
pub async fn not_found() -> ApiError {
    ApiError::not_found("route_not_found", "There is no such endpoint.")
}

/// 405 for known paths with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "Method not allowed",
    )
    .detail("This endpoint does not accept that HTTP method.")
}

/// A panic in a handler becomes a logged 500 problem, not a dropped connection.
pub fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let msg = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("panic");
    ApiError::internal(format!("handler panicked: {msg}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_and_traceparent() {
        assert!(valid_request_id("abc-123_x.y:z"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a b"));
        assert!(!valid_request_id(&"a".repeat(129)));
        let req = |v: &str| {
            Request::builder()
                .header("traceparent", v)
                .body(axum::body::Body::empty())
                .unwrap_or_default()
        };
        assert_eq!(
            trace_id(&req(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            ))
            .as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            trace_id(&req(
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
            )),
            None
        );
        assert_eq!(trace_id(&req("garbage")), None);
    }
}
