//! Requests this server makes to other services (sign-in providers; the ledger's calls
//! to AuthShield): which URLs may carry a secret, and reading an answer with a cap.

/// Whether `url` may carry a client secret or users' tokens: `https`, or `http` to a
/// loopback address (a service on the same host, as in tests and single-host setups).
pub fn is_secure_url(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    match u.scheme() {
        "https" => u.host().is_some(),
        "http" => u.host_str().is_some_and(is_loopback_host),
        _ => false,
    }
}

/// Whether `host` (a name, an IP address, or an IPv6 address in brackets) is this
/// host: `localhost` or a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Sends `req` and reads a 2xx answer's body, refusing one over `max` bytes before
/// reading past it (a broken or hostile peer must not fill this server's memory).
pub async fn read_capped(req: reqwest::RequestBuilder, max: usize) -> Result<Vec<u8>, String> {
    let res = req
        .send()
        .await
        .map_err(|e| e.to_string())?
        .error_for_status()
        .map_err(|e| e.to_string())?;
    read_body_capped(res, max).await
}

/// Reads `res`'s body (whatever its status), refusing one over `max` bytes before
/// reading past it.
pub async fn read_body_capped(mut res: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let too_large = || format!("answer larger than {max} bytes");
    if res.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_go_over_https_or_to_loopback_only() {
        for ok in [
            "https://idp.example/",
            "https://github.example/login/oauth/access_token",
            "http://127.0.0.1:8080/token",
            "http://localhost/x",
            "http://[::1]:9000/",
        ] {
            assert!(super::is_secure_url(ok), "{ok}");
        }
        for bad in [
            "http://idp.example/token",
            "http://10.0.0.5/",
            "ftp://idp.example/",
            "https://",
            "not a url",
            "",
        ] {
            assert!(!super::is_secure_url(bad), "{bad}");
        }
    }
}
