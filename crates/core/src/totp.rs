//! One-time passwords: HOTP (RFC 4226) and TOTP (RFC 6238) with HMAC-SHA1, plus the
//! small RFC 4648 base32 codec authenticator apps use for secrets.
//!
//! Pure code: callers pass the time in. Verification compares every candidate in the
//! window in constant time and refuses any time step at or before the last accepted
//! one, so a code cannot be replayed (store the returned step per user).

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha1::Sha1;
use subtle::ConstantTimeEq;

/// Seconds per time step (RFC 6238 default).
pub const STEP_SECS: i64 = 30;
/// Digits of the codes VaultPay issues.
pub const DIGITS: u32 = 6;
/// Steps accepted either side of the current one (clock drift).
pub const WINDOW: i64 = 1;
/// Secret length in bytes (160 bits, the HMAC-SHA1 block-size recommendation of RFC 4226).
pub const SECRET_LEN: usize = 20;

const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// Base32 (RFC 4648 §6) without padding.
pub fn base32_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let mut buf: u64 = 0;
    let mut bits = 0u32;
    for &b in data {
        buf = (buf << 8) | u64::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buf >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buf << (5 - bits)) & 31) as usize]));
    }
    out
}

/// Decodes base32, ignoring case, spaces, dashes and trailing `=` padding.
/// `None` for any other character or a malformed length.
pub fn base32_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let mut buf: u64 = 0;
    let mut bits = 0u32;
    let trimmed = text.trim_end_matches('=');
    for c in trimmed.chars() {
        if c == ' ' || c == '-' {
            continue;
        }
        let c = c.to_ascii_uppercase();
        let v = match c {
            'A'..='Z' => c as u64 - 'A' as u64,
            '2'..='7' => c as u64 - '2' as u64 + 26,
            _ => return None,
        };
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push(((buf >> bits) & 0xff) as u8);
        }
    }
    // Leftover bits must be padding zeros of fewer than 5 bits.
    if bits >= 5 || (buf & ((1 << bits) - 1)) != 0 {
        return None;
    }
    Some(out)
}

/// A fresh random secret.
pub fn generate_secret() -> [u8; SECRET_LEN] {
    let mut s = [0u8; SECRET_LEN];
    rand::rngs::OsRng.fill_bytes(&mut s);
    s
}

/// HOTP (RFC 4226 §5.3) as a number below 10^digits.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    // HMAC accepts keys of any length; the error branch cannot happen.
    let Ok(mut mac) = <Hmac<Sha1> as Mac>::new_from_slice(secret) else {
        return u32::MAX;
    };
    mac.update(&counter.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let offset = usize::from(h[19] & 0x0f);
    let bin = (u32::from(h[offset]) & 0x7f) << 24
        | u32::from(h[offset + 1]) << 16
        | u32::from(h[offset + 2]) << 8
        | u32::from(h[offset + 3]);
    bin % 10u32.pow(digits.clamp(1, 9))
}

/// The time step of `unix_secs`.
pub fn step_of(unix_secs: i64, step_secs: i64) -> i64 {
    unix_secs.div_euclid(step_secs.max(1))
}

/// The code for a time step, zero-padded to `digits`.
pub fn code_for_step(secret: &[u8], step: i64, digits: u32) -> String {
    let n = hotp(secret, u64::try_from(step).unwrap_or(0), digits);
    format!("{n:0width$}", width = digits as usize)
}

/// TOTP (RFC 6238) at `unix_secs`.
pub fn totp(secret: &[u8], unix_secs: i64, step_secs: i64, digits: u32) -> String {
    code_for_step(secret, step_of(unix_secs, step_secs), digits)
}

/// Verification parameters.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub step_secs: i64,
    pub digits: u32,
    pub window: i64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            step_secs: STEP_SECS,
            digits: DIGITS,
            window: WINDOW,
        }
    }
}

/// Checks `code` at `unix_secs` within ±`window` steps. Steps at or before
/// `last_step` (the last one accepted for this secret) are refused: a used code, or an
/// older one, never works again. Returns the matched step, to be stored as the new
/// `last_step`.
pub fn verify(
    secret: &[u8],
    code: &str,
    unix_secs: i64,
    last_step: Option<i64>,
    p: Params,
) -> Option<i64> {
    let code = code.trim();
    if code.len() != p.digits as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now = step_of(unix_secs, p.step_secs);
    let mut found: Option<i64> = None;
    // Every candidate is computed and compared, so timing does not tell which matched.
    for step in (now - p.window)..=(now + p.window) {
        if step < 0 {
            continue;
        }
        let cand = code_for_step(secret, step, p.digits);
        let eq: bool = cand.as_bytes().ct_eq(code.as_bytes()).into();
        let fresh = last_step.is_none_or(|l| step > l);
        if eq && fresh && found.is_none() {
            found = Some(step);
        }
    }
    found
}

/// The `otpauth://` URI authenticator apps scan (Key Uri Format).
pub fn otpauth_uri(issuer: &str, account: &str, secret_b32: &str) -> String {
    let enc = |s: &str| {
        let mut o = String::new();
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                o.push(char::from(b));
            } else {
                o.push_str(&format!("%{b:02X}"));
            }
        }
        o
    };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={}&period={}",
        enc(issuer),
        enc(account),
        secret_b32,
        enc(issuer),
        DIGITS,
        STEP_SECS
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const RFC_SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc4226_hotp_vectors() {
        let expect = [
            755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489,
        ];
        for (i, e) in expect.iter().enumerate() {
            assert_eq!(hotp(RFC_SECRET, i as u64, 6), *e, "counter {i}");
        }
    }

    #[test]
    fn rfc6238_sha1_vectors_8_digits() {
        let vectors = [
            (59, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ];
        for (t, code) in vectors {
            assert_eq!(totp(RFC_SECRET, t, 30, 8), code, "T = {t}");
            let p = Params {
                digits: 8,
                ..Params::default()
            };
            assert_eq!(verify(RFC_SECRET, code, t, None, p), Some(t / 30));
        }
    }

    #[test]
    fn six_digit_codes_are_the_low_digits() {
        assert_eq!(totp(RFC_SECRET, 59, 30, 6), "287082");
        assert_eq!(totp(RFC_SECRET, 1_111_111_109, 30, 6), "081804");
    }

    #[test]
    fn window_accepts_one_step_either_side_only() {
        let t = 1_234_567_890;
        let p = Params::default();
        let now = step_of(t, 30);
        for (delta, ok) in [(-2, false), (-1, true), (0, true), (1, true), (2, false)] {
            let code = code_for_step(RFC_SECRET, now + delta, 6);
            assert_eq!(
                verify(RFC_SECRET, &code, t, None, p).is_some(),
                ok,
                "delta {delta}"
            );
        }
    }

    #[test]
    fn used_and_older_steps_are_refused() {
        let t = 1_234_567_890;
        let p = Params::default();
        let code = totp(RFC_SECRET, t, 30, 6);
        let step = verify(RFC_SECRET, &code, t, None, p).unwrap();
        assert_eq!(verify(RFC_SECRET, &code, t, Some(step), p), None);
        let prev = code_for_step(RFC_SECRET, step - 1, 6);
        assert_eq!(verify(RFC_SECRET, &prev, t, Some(step), p), None);
        let next = code_for_step(RFC_SECRET, step + 1, 6);
        assert_eq!(verify(RFC_SECRET, &next, t, Some(step), p), Some(step + 1));
    }

    #[test]
    fn malformed_codes_are_refused() {
        let p = Params::default();
        for bad in ["", "12345", "1234567", "12a456", "１２３４５６", "-12345"] {
            assert_eq!(verify(RFC_SECRET, bad, 59, None, p), None, "{bad:?}");
        }
    }

    #[test]
    fn base32_rfc4648_vectors() {
        let v = [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ];
        for (plain, enc) in v {
            assert_eq!(base32_encode(plain.as_bytes()), enc);
            assert_eq!(base32_decode(enc).unwrap(), plain.as_bytes());
        }
        assert_eq!(base32_decode("mzxw6ytboi======").unwrap(), b"foobar");
        assert_eq!(base32_decode("MZXW 6YTB-OI").unwrap(), b"foobar");
        assert_eq!(base32_decode("MZ1W"), None);
        assert_eq!(base32_decode("MY"), Some(b"f".to_vec()));
        assert_eq!(base32_decode("MZ"), None, "non-zero leftover bits");
        let s = generate_secret();
        assert_eq!(base32_decode(&base32_encode(&s)).unwrap(), s);
        assert_eq!(base32_encode(&s).len(), 32);
    }

    #[test]
    fn otpauth_uri_shape() {
        let u = otpauth_uri("Vault Pay", "a@b.c", "ABC");
        assert_eq!(
            u,
            "otpauth://totp/Vault%20Pay:a%40b.c?secret=ABC&issuer=Vault%20Pay&algorithm=SHA1&digits=6&period=30"
        );
    }
}
