use crate::error::{current_request_id, ApiError};
use axum::extract::rejection::{FormRejection, JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use vaultpay_store::audit::Origin;

/// serde's wording for a field of the wrong type, with the type names a client knows
/// (`expected i64` is `expected an integer`).
fn plain_types(text: &str) -> String {
    // axum's wording around serde's ("Failed to deserialize the JSON body into the
    // target type: amount: invalid type: …") says nothing the client needs.
    let text = text
        .strip_prefix("Failed to deserialize the JSON body into the target type: ")
        .unwrap_or(text);
    let mut out = text.to_owned();
    for int in ["i64", "u64", "i32", "u32", "u16", "u8", "usize", "isize"] {
        out = out.replace(&format!("expected {int}"), "expected an integer");
    }
    // serde_json reads an integer too large for 64 bits as a float: say why it fails
    if out.contains("invalid type: floating point") && out.contains("expected an integer") {
        out = out.replacen(
            "expected an integer",
            "expected a whole number between -9223372036854775808 and 9223372036854775807",
            1,
        );
    }
    out.replace("expected f64", "expected a number")
}

fn rejection(status: StatusCode, text: String) -> ApiError {
    let (code, title) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ("body_too_large", "Request body too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "Unsupported media type"),
        StatusCode::UNPROCESSABLE_ENTITY => ("invalid_request", "Invalid request"),
        _ => ("malformed_request", "Malformed request"),
    };
    let status = if status.is_client_error() {
        status
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(status, code, title).detail(text)
}

/// PostgreSQL cannot store U+0000 in text, and no field of this API has a use for
/// it: a body or query carrying one is refused up front, on every backend alike.
pub fn nul_refused() -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        "Invalid request",
    )
    .detail("Text fields may not contain the NUL character (U+0000).")
}

/// True when a JSON document encodes U+0000 (`\u0000`; a raw NUL byte is not valid
/// JSON anyway). Escaped backslashes are skipped, so the text `\\u0000` is not one.
pub fn json_has_nul(body: &[u8]) -> bool {
    let mut i = 0;
    while i < body.len() {
        if body[i] == 0 {
            return true;
        }
        if body[i] == b'\\' {
            if body.get(i + 1) == Some(&b'u') && body.get(i + 2..i + 6) == Some(b"0000") {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

/// True when URL-encoded text (a query string, a form body, a path) carries U+0000.
pub fn urlencoded_has_nul(text: &[u8]) -> bool {
    text.contains(&0) || text.windows(3).any(|w| w == b"%00")
}

/// True when a request path, percent-decoded, is UTF-8 text: axum's `Path` extractor
/// refuses one that is not with a plain-text 400, so the server checks it first and
/// answers with [`path_not_utf8`].
pub fn path_is_utf8(path: &[u8]) -> bool {
    // borrows the path when there is nothing to decode: no allocation per request
    percent_encoding::percent_decode(path).decode_utf8().is_ok()
}

/// The answer to a path that does not decode to UTF-8.
pub fn path_not_utf8() -> ApiError {
    ApiError::bad_request(
        "invalid_path",
        "The request path does not decode to UTF-8 text.",
    )
}

fn is_json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct.split(';').next().unwrap_or("").trim();
    mime.eq_ignore_ascii_case("application/json")
        || (mime.len() > 17
            && mime[..12].eq_ignore_ascii_case("application/")
            && mime[mime.len() - 5..].eq_ignore_ascii_case("+json"))
}

/// JSON body extractor whose every rejection is a problem document.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json_content_type(req.headers()) {
            return Err(rejection(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Expected request with `Content-Type: application/json`".into(),
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|rej| rejection(rej.status(), rej.body_text()))?;
        json_body(&bytes).map(ApiJson)
    }
}

/// A JSON body as [`ApiJson`] reads it (NUL refused, an object only, errors in JSON
/// terms), from bytes already read.
fn json_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if json_has_nul(bytes) {
        return Err(nul_refused());
    }
    // Every body of this API is an object; serde would also build a struct from an
    // array of its fields in order (`["a@b", "pw", "Alice"]`).
    let trimmed = bytes.trim_ascii_start();
    if !trimmed.is_empty()
        && !trimmed.starts_with(b"{")
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        return Err(rejection(
            StatusCode::UNPROCESSABLE_ENTITY,
            "The request body must be a JSON object.".into(),
        ));
    }
    match axum::Json::<T>::from_bytes(bytes) {
        Ok(axum::Json(v)) => Ok(v),
        Err(rej) => Err(match rej {
            JsonRejection::JsonSyntaxError(_) => {
                ApiError::bad_request("malformed_json", "The request body is not valid JSON.")
            }
            other => rejection(other.status(), plain_types(&other.body_text())),
        }),
    }
}

/// An optional JSON body: none (or only whitespace) is `T::default()`, any other is
/// read as [`ApiJson`] reads one (whatever its content type, as `curl -d` sends a
/// form type), and an oversized one is a problem document like every rejection.
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|rej| rejection(rej.status(), rej.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        json_body(&bytes).map(OptionalJson)
    }
}

/// Query-string extractor whose rejections are problem documents.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if urlencoded_has_nul(parts.uri.query().unwrap_or("").as_bytes()) {
            return Err(nul_refused());
        }
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|rej: QueryRejection| ApiError::bad_request("invalid_query", rej.body_text()))
    }
}

/// Form-body extractor (OAuth endpoints); the caller maps the error to its format.
pub struct ApiForm<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiForm<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        if urlencoded_has_nul(parts.uri.query().unwrap_or("").as_bytes()) {
            return Err(nul_refused());
        }
        let bytes =
            axum::body::Bytes::from_request(Request::from_parts(parts.clone(), body), state)
                .await
                .map_err(|rej| rejection(rej.status(), rej.body_text()))?;
        if urlencoded_has_nul(&bytes) {
            return Err(nul_refused());
        }
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        axum::Form::<T>::from_request(req, state)
            .await
            .map(|f| ApiForm(f.0))
            .map_err(|rej: FormRejection| rejection(rej.status(), rej.body_text()))
    }
}

/// The one header trusted proxies report the client address in. Only that header is
/// read: a proxy appends to the header it knows and passes any other through as the
/// client sent it, so reading a second one would let the client name its own address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (nginx, HAProxy, cloud load balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded` (its `for=` parameters).
    Forwarded,
}

impl ForwardedHeader {
    /// `x-forwarded-for` or `forwarded` (any case).
    pub fn parse(name: &str) -> Result<Self, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(Self::XForwardedFor),
            "forwarded" => Ok(Self::Forwarded),
            other => Err(format!(
                "forwarded_header must be x-forwarded-for or forwarded, not {other:?}"
            )),
        }
    }
}

/// Which peers may tell us the client address, and in which header.
#[derive(Debug, Clone, Default)]
pub struct ClientIpConfig {
    /// Trusted proxy networks as (address, prefix length).
    pub trusted_proxies: Vec<(IpAddr, u8)>,
    pub header: ForwardedHeader,
}

impl ClientIpConfig {
    /// Parses entries like `10.0.0.0/8`, `127.0.0.1` or `::1/128`.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut trusted_proxies = Vec::new();
        for e in entries {
            let (addr, len) = match e.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (e.as_str(), None),
            };
            let ip: IpAddr = addr
                .trim()
                .parse()
                .map_err(|_| format!("not an IP network: {e}"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = match len {
                Some(l) => l
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or(format!("bad prefix: {e}"))?,
                None => max,
            };
            trusted_proxies.push((ip, len));
        }
        Ok(Self {
            trusted_proxies,
            header: ForwardedHeader::default(),
        })
    }

    /// The same, reading the client address from `header` (see [`ForwardedHeader`]).
    pub fn with_header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted_proxies
            .iter()
            .any(|(net, len)| in_network(peer, *net, *len))
    }
}

fn in_network(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V4(_)) => a
            .to_ipv4_mapped()
            .is_some_and(|a| in_network(IpAddr::V4(a), net, len)),
        _ => false,
    }
}

/// The client address: the peer, or, when the peer is a trusted proxy, the nearest
/// address in the configured forwarding header (walking from the right) that is not
/// itself a trusted proxy. An entry that is not an address (an obfuscated or malformed
/// node) ends the walk at the peer: what is left of it is whatever the client wrote.
pub fn client_ip(parts: &Parts) -> Option<IpAddr> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())?;
    let Some(cfg) = parts.extensions.get::<Arc<ClientIpConfig>>() else {
        return Some(peer);
    };
    if !cfg.trusts(peer) {
        return Some(peer);
    }
    let mut chain: Vec<&str> = Vec::new();
    match cfg.header {
        ForwardedHeader::XForwardedFor => {
            for v in parts.headers.get_all("x-forwarded-for") {
                chain.extend(v.to_str().unwrap_or("_").split(','));
            }
        }
        ForwardedHeader::Forwarded => {
            for v in parts.headers.get_all("forwarded") {
                for elem in v.to_str().unwrap_or("for=_").split(',') {
                    let node = elem.split(';').find_map(|pair| {
                        let (k, val) = pair.trim().split_once('=')?;
                        k.trim().eq_ignore_ascii_case("for").then_some(val)
                    });
                    // An element without `for=` names no node; skip it.
                    chain.extend(node);
                }
            }
        }
    }
    for node in chain.into_iter().rev() {
        match parse_node(node) {
            Some(ip) if cfg.trusts(ip) => continue,
            Some(ip) => return Some(ip),
            None => break,
        }
    }
    Some(peer)
}

/// One node of a forwarding header: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:80`, optionally quoted.
fn parse_node(node: &str) -> Option<IpAddr> {
    let node = node.trim().trim_matches('"');
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = node.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    node.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Who is asking, as the audit log records it.
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    pub request_id: Option<String>,
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

impl Ctx {
    pub fn origin(&self) -> Origin {
        Origin {
            ip: self.ip.map(|i| i.to_string()),
            user_agent: self.user_agent.clone(),
            request_id: self.request_id.clone(),
        }
    }

    /// The rate-limit key of the client address: an IPv4 address, or an IPv6
    /// address's /64 (one subscriber's network: the least a provider hands out, so a
    /// client cannot get a fresh budget per address by walking its own /64).
    pub fn ip_key(&self) -> String {
        match self.ip {
            Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => format!(
                    "{}/64",
                    std::net::Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))
                ),
            },
            Some(ip) => ip.to_string(),
            None => "unknown".to_owned(),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect());
        Ok(Ctx {
            request_id: current_request_id(),
            ip: client_ip(parts),
            user_agent,
        })
    }
}

/// A list's `limit` query parameter as asked for: at least 1 (400 `invalid_query`
/// below); a larger one than the list gives is capped where it is used.
pub fn limit_param(limit: Option<i64>) -> Result<Option<i64>, ApiError> {
    match limit {
        Some(n) if n < 1 => Err(ApiError::bad_request(
            "invalid_query",
            "`limit` must be at least 1.",
        )),
        _ => Ok(limit),
    }
}

/// A time query parameter (`from`, `to`): RFC 3339, else 400 `invalid_query` naming it.
pub fn time_param(name: &str, v: Option<&str>) -> Result<Option<i64>, ApiError> {
    v.map(|s| {
        vaultpay_core::time::parse_rfc3339(s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("`{name}` must be an RFC 3339 time."),
            )
        })
    })
    .transpose()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parts(peer: &str, headers: &[(&str, &str)], trusted: &[&str]) -> Parts {
        parts_via(ForwardedHeader::XForwardedFor, peer, headers, trusted)
    }

    fn parts_via(
        header: ForwardedHeader,
        peer: &str,
        headers: &[(&str, &str)],
        trusted: &[&str],
    ) -> Parts {
        let mut b = axum::http::Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let (mut p, _) = b.body(()).unwrap().into_parts();
        p.extensions
            .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        let cfg = ClientIpConfig::parse(&trusted.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
            .with_header(header);
        p.extensions.insert(Arc::new(cfg));
        p
    }

    /// A body of the wrong shape is refused naming the field and what it should be,
    /// in the API's terms rather than Rust's or axum's.
    #[test]
    fn typed_rejections_speak_the_apis_terms() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct T {
            amount: i64,
            rate: Option<f64>,
        }
        let detail = |body: &str| {
            let err = match axum::Json::<T>::from_bytes(body.as_bytes()) {
                Err(e) => e,
                Ok(v) => panic!("{body} was accepted: {v:?}"),
            };
            plain_types(&err.body_text())
        };
        let d = detail(r#"{"amount": "5"}"#);
        assert!(d.starts_with("amount: invalid type: string"), "{d}");
        assert!(d.contains("expected an integer"), "{d}");
        let d = detail(r#"{"amount": 99999999999999999999999}"#);
        assert!(
            d.contains("expected a whole number between -9223372036854775808"),
            "{d}"
        );
        let d = detail(r#"{"amount": 1, "rate": "x"}"#);
        assert!(d.contains("expected a number"), "{d}");
        assert!(!d.contains("Failed to deserialize"), "{d}");
    }

    #[test]
    fn forwarded_headers_only_from_trusted_proxies() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // untrusted peer: header ignored
        assert_eq!(
            client_ip(&parts("1.2.3.4:5", &[("x-forwarded-for", "9.9.9.9")], &[])),
            ip("1.2.3.4")
        );
        // trusted peer: the last untrusted hop
        let p = parts(
            "10.0.0.2:5",
            &[("x-forwarded-for", "6.6.6.6, 9.9.9.9, 10.0.0.3")],
            &["10.0.0.0/8"],
        );
        assert_eq!(client_ip(&p), ip("9.9.9.9"));
        let fwd = ForwardedHeader::Forwarded;
        let p = parts_via(
            fwd,
            "10.0.0.2:5",
            &[("forwarded", "for=\"[2001:db8::1]:4711\";proto=https")],
            &["10.0.0.0/8"],
        );
        assert_eq!(client_ip(&p), ip("2001:db8::1"));
        let p = parts_via(
            fwd,
            "10.0.0.2:5",
            &[(
                "forwarded",
                "for=6.6.6.6, proto=https, For=9.9.9.9:80;by=10.0.0.2",
            )],
            &["10.0.0.0/8"],
        );
        assert_eq!(client_ip(&p), ip("9.9.9.9"));
        // Only the configured header counts: a proxy passes the other one through as
        // the client wrote it.
        let both = [("x-forwarded-for", "9.9.9.9"), ("forwarded", "for=6.6.6.6")];
        assert_eq!(
            client_ip(&parts("10.0.0.2:5", &both, &["10.0.0.0/8"])),
            ip("9.9.9.9")
        );
        assert_eq!(
            client_ip(&parts_via(fwd, "10.0.0.2:5", &both, &["10.0.0.0/8"])),
            ip("6.6.6.6")
        );
        // Ports and brackets are read; an entry that is no address ends the walk at
        // the peer instead of skipping to what the client wrote left of it.
        let p = parts(
            "10.0.0.2:5",
            &[("x-forwarded-for", "6.6.6.6, 9.9.9.9:4711")],
            &["10.0.0.0/8"],
        );
        assert_eq!(client_ip(&p), ip("9.9.9.9"));
        let p = parts(
            "10.0.0.2:5",
            &[("x-forwarded-for", "6.6.6.6, [2001:db8::2]:80, 10.0.0.3")],
            &["10.0.0.0/8"],
        );
        assert_eq!(client_ip(&p), ip("2001:db8::2"));
        let p = parts(
            "10.0.0.2:5",
            &[("x-forwarded-for", "6.6.6.6, unknown")],
            &["10.0.0.0/8"],
        );
        assert_eq!(client_ip(&p), ip("10.0.0.2"));
        let p = parts_via(
            fwd,
            "10.0.0.2:5",
            &[("forwarded", "for=6.6.6.6, for=_hidden")],
            &["10.0.0.0/8"],
        );
        assert_eq!(client_ip(&p), ip("10.0.0.2"));
        // several header lines read in order
        let p = parts(
            "10.0.0.2:5",
            &[
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-for", "9.9.9.9"),
            ],
            &["10.0.0.0/8"],
        );
        assert_eq!(client_ip(&p), ip("9.9.9.9"));
        assert_eq!(ForwardedHeader::parse("Forwarded"), Ok(fwd));
        assert!(ForwardedHeader::parse("x-real-ip").is_err());
        // trusted peer, no header: the peer
        assert_eq!(
            client_ip(&parts("10.0.0.2:5", &[], &["10.0.0.0/8"])),
            ip("10.0.0.2")
        );
        assert!(ClientIpConfig::parse(&["10.0.0.0/33".into()]).is_err());
    }

    #[test]
    fn rate_limit_keys_take_an_ipv6_address_by_its_64() {
        let key = |ip: &str| {
            Ctx {
                ip: Some(ip.parse().unwrap()),
                ..Ctx::default()
            }
            .ip_key()
        };
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2::ffff"), key("2001:db8:1:2:aaaa::1"));
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(Ctx::default().ip_key(), "unknown");
    }
}

#[cfg(test)]
mod nul_tests {
    use super::*;

    #[test]
    fn json_nul_escapes_are_found_and_escaped_backslashes_are_not() {
        assert!(path_is_utf8(b"/v1/accounts/abc%20d%C3%A9"));
        assert!(path_is_utf8(b"/v1/x%"));
        assert!(path_is_utf8(b"/v1/x%zz"));
        assert!(!path_is_utf8(b"/v1/accounts/%FF"));
        assert!(!path_is_utf8(b"/v1/accounts/%C3"));
        assert!(!path_is_utf8(b"/v1/accounts/%c3%28"));
        assert!(json_has_nul(br#"{"a":"x\u0000y"}"#));
        assert!(json_has_nul(b"{\"a\":\"\0\"}"));
        assert!(!json_has_nul(br#"{"a":"x\\u0000y"}"#), "the text \\u0000");
        assert!(json_has_nul(br#"{"a":"x\\\u0000"}"#));
        assert!(!json_has_nul(br#"{"a":"\u0001"}"#));
        assert!(!json_has_nul(br#"{"a":"\n\t\""}"#));
        assert!(!json_has_nul(b"\\"), "a lone trailing backslash");
    }

    #[test]
    fn urlencoded_nul_is_found() {
        assert!(urlencoded_has_nul(b"a=1&b=%00"));
        assert!(urlencoded_has_nul(b"/v1/accounts/%00x"));
        assert!(!urlencoded_has_nul(b"a=%20&b=%2500"));
    }
}
