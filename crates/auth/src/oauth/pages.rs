//! Server-rendered pages of the browser flows: small, escaped, framing refused.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A whole page with security headers.
pub fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · AuthShield</title><style>body{{font-family:system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem}}\
         label{{display:block;margin:.6rem 0}}input{{width:100%;padding:.4rem}}button{{padding:.5rem 1rem;margin:.5rem .5rem 0 0}}\
         .err{{color:#a00}}</style></head><body><h1>{t}</h1>{body}</body></html>",
        t = esc(title),
    );
    let mut res = (status, Html(html)).into_response();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

/// An error shown in the browser instead of redirecting anywhere.
pub fn error(status: StatusCode, message: &str) -> Response {
    page(
        status,
        "Sign-in request refused",
        &format!("<p class=\"err\">{}</p>", esc(message)),
    )
}

fn err_line(error: Option<&str>) -> String {
    error
        .map(|e| format!("<p class=\"err\" role=\"alert\">{}</p>", esc(e)))
        .unwrap_or_default()
}

/// The sign-in form of an authorization request.
pub fn signin(
    status: StatusCode,
    csrf: &str,
    client_name: &str,
    error: Option<&str>,
    providers: &[(String, String)],
    login_hint: Option<&str>,
) -> Response {
    let upstream: String = providers
        .iter()
        .map(|(name, display)| {
            format!(
                "<form method=\"post\" action=\"/oauth/authorize/upstream/{n}\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{c}\">\
                 <button type=\"submit\">Sign in with {d}</button></form>",
                n = esc(&urlencoding::encode(name)),
                c = esc(csrf),
                d = esc(display),
            )
        })
        .collect();
    page(
        status,
        "Sign in",
        &format!(
            "<p><strong>{client}</strong> asks you to sign in with your VaultPay account.</p>{err}\
             <form method=\"post\" action=\"/oauth/authorize/signin\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label>Email <input type=\"email\" name=\"email\" autocomplete=\"username\" value=\"{hint}\" required></label>\
             <label>Password <input type=\"password\" name=\"password\" autocomplete=\"current-password\" required></label>\
             <button type=\"submit\">Sign in</button></form>{upstream}",
            client = esc(client_name),
            err = err_line(error),
            csrf = esc(csrf),
            hint = esc(login_hint.unwrap_or_default()),
        ),
    )
}

/// The second-factor step: one code field (TOTP, emailed or recovery code).
pub fn second_factor(status: StatusCode, csrf: &str, error: Option<&str>) -> Response {
    page(
        status,
        "Second factor",
        &format!(
            "<p>Enter the code from your authenticator app, the code we emailed you, or one of your recovery codes.</p>{err}\
             <form method=\"post\" action=\"/oauth/authorize/second-factor\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label>Code <input name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" required></label>\
             <button type=\"submit\">Continue</button></form>",
            err = err_line(error),
            csrf = esc(csrf),
        ),
    )
}

fn scope_text(scope: &str) -> &'static str {
    match scope {
        "openid" => "Know who you are (your account id)",
        "profile" => "See your name",
        "email" => "See your email address",
        "offline_access" => "Stay signed in (keep access while you are away)",
        "api" => "Use the VaultPay API as you, with your roles",
        _ => "Other access",
    }
}

/// The consent page.
pub fn consent(csrf: &str, client_name: &str, scopes: &[String]) -> Response {
    let items: String = scopes
        .iter()
        .map(|s| format!("<li><code>{}</code>: {}</li>", esc(s), scope_text(s)))
        .collect();
    page(
        StatusCode::OK,
        "Allow access?",
        &format!(
            "<p><strong>{client}</strong> would like to:</p><ul>{items}</ul>\
             <form method=\"post\" action=\"/oauth/authorize/consent\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <button type=\"submit\" name=\"decision\" value=\"approve\">Allow</button>\
             <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
            client = esc(client_name),
            csrf = esc(csrf),
        ),
    )
}

/// A pending device request as the device page shows it: the client's name and the
/// scopes it asks for.
pub struct DeviceRequest<'a> {
    pub client_name: &'a str,
    pub scopes: &'a [String],
}

/// The device-flow page: sign in, enter the code shown on the device, approve.
/// `confirmed`: the code's request was shown to the user already (the form keeps
/// saying so when it comes back with an error).
pub fn device(
    status: StatusCode,
    csrf: &str,
    user_code: &str,
    error: Option<&str>,
    request: Option<DeviceRequest<'_>>,
    confirmed: bool,
) -> Response {
    // What is being approved, when the code is known (RFC 8628 §5.4: a code sent by
    // someone else would otherwise connect their device to this account unseen). The
    // form says which code it was shown for: an approval of any other code shows its
    // request first (see `device_submit`).
    let shown = if request.is_some() || confirmed {
        format!(
            "<input type=\"hidden\" name=\"shown\" value=\"{}\">",
            esc(user_code)
        )
    } else {
        String::new()
    };
    let what = request
        .map(|r| {
            let items: String = r
                .scopes
                .iter()
                .map(|s| format!("<li><code>{}</code>: {}</li>", esc(s), scope_text(s)))
                .collect();
            format!(
                "<p><strong>{client}</strong> on a device asks to:</p><ul>{items}</ul>\
                 <p>Approve only if you started this yourself, on a device you have with you.</p>",
                client = esc(r.client_name),
            )
        })
        .unwrap_or_default();
    page(
        status,
        "Connect a device",
        &format!(
            "<p>Enter the code your device shows, sign in and approve.</p>{what}{err}\
             <form method=\"post\" action=\"/oauth/device\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">{shown}\
             <label>Code <input name=\"user_code\" value=\"{code}\" autocomplete=\"off\" required></label>\
             <label>Email <input type=\"email\" name=\"email\" autocomplete=\"username\" required></label>\
             <label>Password <input type=\"password\" name=\"password\" autocomplete=\"current-password\" required></label>\
             <label>Second-factor code (if you use one) <input name=\"otp\" autocomplete=\"one-time-code\"></label>\
             <button type=\"submit\" name=\"decision\" value=\"approve\">Approve</button>\
             <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
            err = err_line(error),
            csrf = esc(csrf),
            code = esc(user_code),
        ),
    )
}

/// A plain message page.
pub fn message(title: &str, text: &str) -> Response {
    page(StatusCode::OK, title, &format!("<p>{}</p>", esc(text)))
}
