use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use vaultpay_proto::{Problem, PROBLEM_CONTENT_TYPE};

tokio::task_local! {
    /// The id of the request being served, set by the request-id middleware.
    pub static REQUEST_ID: String;
}

/// The request id of the current task, if it serves a request.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// An error answered as `application/problem+json`.
#[derive(Debug)]
pub struct ApiError {
    /// Boxed: `Result<T, ApiError>` stays small on the happy path.
    pub problem: Box<Problem>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, title: &str) -> Self {
        Self {
            problem: Box::new(Problem::new(status.as_u16(), code, title)),
            headers: Vec::new(),
        }
    }

    pub fn bad_request(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, "Bad request").detail(detail)
    }

    pub fn unprocessable(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, "Invalid request").detail(detail)
    }

    pub fn not_found(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, "Not found").detail(detail)
    }

    pub fn conflict(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, "Conflict").detail(detail)
    }

    pub fn forbidden(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, "Forbidden").detail(detail)
    }

    /// 401 with a `WWW-Authenticate: Bearer` challenge (RFC 6750 §3).
    pub fn unauthorized(code: &str, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        let challenge = format!(
            "Bearer error=\"invalid_token\", error_description=\"{}\"",
            detail.replace('"', "'")
        );
        let mut e = Self::new(StatusCode::UNAUTHORIZED, code, "Unauthorized").detail(detail);
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            e.headers.push((header::WWW_AUTHENTICATE, v));
        }
        e
    }

    /// 401 for a request that sent no credentials: the challenge names the scheme
    /// only, with no error code (RFC 6750 §3.1).
    pub fn credentials_missing(code: &str, detail: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, code, "Unauthorized").detail(detail);
        e.headers
            .push((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        e
    }

    /// A 500 that logs `err` with the request id and tells the caller nothing more.
    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "Internal server error",
        )
        .detail("An unexpected error occurred; it has been logged with this request id.")
    }

    /// 503 `service_unavailable` with `Retry-After: 5` for a dependency that is down
    /// (the database, the auth service).
    pub fn unavailable(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "dependency unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "Service unavailable",
        )
        .detail("A dependency of this service is unavailable; retry later.")
        .header(header::RETRY_AFTER, 5)
    }

    /// 503 `transaction_conflict` with `Retry-After: 1`: the request's transaction lost a
    /// race with a concurrent one (a deadlock, a serialization failure, a busy database)
    /// and was rolled back; sending it again may succeed.
    pub fn transaction_conflict(err: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %err, "transaction lost a race; answered 503");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "transaction_conflict",
            "Service unavailable",
        )
        .detail("This request ran into a concurrent one; retry it.")
        .header(header::RETRY_AFTER, 1)
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.problem.detail = Some(detail.into());
        self
    }

    pub fn with(mut self, key: &str, value: impl serde::Serialize) -> Self {
        if let Ok(v) = serde_json::to_value(value) {
            self.problem.extensions.insert(key.to_owned(), v);
        }
        self
    }

    pub fn header(mut self, name: HeaderName, value: impl ToString) -> Self {
        if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
            self.headers.push((name, v));
        }
        self
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    pub fn code(&self) -> &str {
        &self.problem.code
    }
}

impl IntoResponse for ApiError {
    fn into_response(mut self) -> Response {
        if self.problem.request_id.is_none() {
            self.problem.request_id = current_request_id();
        }
        let status = self.status();
        let body = serde_json::to_vec(&self.problem).unwrap_or_default();
        let mut res = (status, body).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        for (k, v) in self.headers {
            h.append(k, v);
        }
        res
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.problem.status, self.problem.code)?;
        if let Some(d) = &self.problem.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}
