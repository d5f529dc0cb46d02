//! Time as the domain sees it: UTC instants in microseconds since the Unix epoch.
//!
//! Storage keeps `i64` microseconds (portable across SQLite and PostgreSQL); the API
//! speaks RFC 3339. Domain rules take `now` as an argument so tests never sleep.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

pub const MICROS_PER_SEC: i64 = 1_000_000;

/// The current time in microseconds.
pub fn now_micros() -> Micros {
    let now = OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000) as i64
}

/// Seconds to microseconds, saturating.
pub fn secs(s: i64) -> Micros {
    s.saturating_mul(MICROS_PER_SEC)
}

/// RFC 3339 rendering of a microsecond instant (`1970-01-01T00:00:00Z` when out of range).
pub fn rfc3339(micros: Micros) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// Parses an RFC 3339 timestamp into microseconds.
pub fn parse_rfc3339(s: &str) -> Option<Micros> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_rfc3339() {
        let t = 1_700_000_000_123_456;
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123456Z");
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
