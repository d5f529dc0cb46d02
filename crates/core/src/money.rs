//! Money as integers: ISO 4217 currencies, positive transfer amounts and checked
//! balance arithmetic, all in minor units (cents, yen, fils…). Floats never appear.
//!
//! Amounts cross the API as `i64` minor units plus a currency code; the decimal
//! rendering in [`format_minor`] / [`parse_major`] exists for human-facing output
//! such as CSV statements and is exact in both directions.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Errors from the money domain. Each variant has a stable machine [`code`](Self::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Not an active ISO 4217 code with a minor unit (holds a truncated copy of the input).
    #[error("unknown currency {0:?}: expected an active ISO 4217 code such as \"USD\"")]
    UnknownCurrency(String),
    /// An amount that is zero, negative or above [`Amount::MAX`].
    #[error("amount must be a positive integer number of minor units, at most {MAX_MINOR_UNITS}")]
    AmountInvalid,
    /// Arithmetic or parsing left the range of a balance (`i64`).
    #[error("amount out of range")]
    Overflow,
    /// A decimal amount that could not be parsed (the reason, not the input).
    #[error("invalid amount format: {0}")]
    InvalidFormat(String),
}

impl MoneyError {
    /// Stable machine-readable code, suitable for an RFC 9457 problem `code`.
    pub fn code(&self) -> &'static str {
        match self {
            MoneyError::UnknownCurrency(_) => "currency_unknown",
            MoneyError::AmountInvalid => "amount_invalid",
            MoneyError::Overflow => "amount_overflow",
            MoneyError::InvalidFormat(_) => "amount_format",
        }
    }
}

/// An ISO 4217 alphabetic currency code together with its minor-unit exponent
/// (the number of decimal digits after the point: 2 for USD, 0 for JPY, 3 for KWD).
///
/// Only codes from the built-in table can be constructed, so a `Currency` value is
/// always valid. Ordering is alphabetical by code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Ord, PartialOrd)]
pub struct Currency {
    code: &'static str,
    exponent: u8,
}

/// Active ISO 4217 currencies (and fund codes) that have a minor unit, sorted by
/// code so lookups can binary-search. Precious metals, SDR and testing codes
/// (XAU, XDR, XTS, XXX, …) have no minor unit and are deliberately absent, as are
/// withdrawn codes (HRK, SLL, VEF, MRO, STD, ZWL, …).
const CURRENCIES: &[(&str, u8)] = &[
    ("AED", 2),
    ("AFN", 2),
    ("ALL", 2),
    ("AMD", 2),
    // Netherlands Antillean guilder: being replaced by XCG (2025); kept during the transition.
    ("ANG", 2),
    ("AOA", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("AWG", 2),
    ("AZN", 2),
    ("BAM", 2),
    ("BBD", 2),
    ("BDT", 2),
    ("BGN", 2),
    ("BHD", 3),
    ("BIF", 0),
    ("BMD", 2),
    ("BND", 2),
    ("BOB", 2),
    ("BOV", 2),
    ("BRL", 2),
    ("BSD", 2),
    ("BTN", 2),
    ("BWP", 2),
    ("BYN", 2),
    ("BZD", 2),
    ("CAD", 2),
    ("CDF", 2),
    ("CHE", 2),
    ("CHF", 2),
    ("CHW", 2),
    ("CLF", 4),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("COU", 2),
    ("CRC", 2),
    ("CUP", 2),
    ("CVE", 2),
    ("CZK", 2),
    ("DJF", 0),
    ("DKK", 2),
    ("DOP", 2),
    ("DZD", 2),
    ("EGP", 2),
    ("ERN", 2),
    ("ETB", 2),
    ("EUR", 2),
    ("FJD", 2),
    ("FKP", 2),
    ("GBP", 2),
    ("GEL", 2),
    ("GHS", 2),
    ("GIP", 2),
    ("GMD", 2),
    ("GNF", 0),
    ("GTQ", 2),
    ("GYD", 2),
    ("HKD", 2),
    ("HNL", 2),
    ("HTG", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("IQD", 3),
    ("IRR", 2),
    ("ISK", 0),
    ("JMD", 2),
    ("JOD", 3),
    ("JPY", 0),
    ("KES", 2),
    ("KGS", 2),
    ("KHR", 2),
    ("KMF", 0),
    ("KPW", 2),
    ("KRW", 0),
    ("KWD", 3),
    ("KYD", 2),
    ("KZT", 2),
    ("LAK", 2),
    ("LBP", 2),
    ("LKR", 2),
    ("LRD", 2),
    ("LSL", 2),
    ("LYD", 3),
    ("MAD", 2),
    ("MDL", 2),
    ("MGA", 2),
    ("MKD", 2),
    ("MMK", 2),
    ("MNT", 2),
    ("MOP", 2),
    ("MRU", 2),
    ("MUR", 2),
    ("MVR", 2),
    ("MWK", 2),
    ("MXN", 2),
    ("MXV", 2),
    ("MYR", 2),
    ("MZN", 2),
    ("NAD", 2),
    ("NGN", 2),
    ("NIO", 2),
    ("NOK", 2),
    ("NPR", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PAB", 2),
    ("PEN", 2),
    ("PGK", 2),
    ("PHP", 2),
    ("PKR", 2),
    ("PLN", 2),
    ("PYG", 0),
    ("QAR", 2),
    ("RON", 2),
    ("RSD", 2),
    ("RUB", 2),
    ("RWF", 0),
    ("SAR", 2),
    ("SBD", 2),
    ("SCR", 2),
    ("SDG", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("SHP", 2),
    ("SLE", 2),
    ("SOS", 2),
    ("SRD", 2),
    ("SSP", 2),
    ("STN", 2),
    ("SVC", 2),
    ("SYP", 2),
    ("SZL", 2),
    ("THB", 2),
    ("TJS", 2),
    ("TMT", 2),
    ("TND", 3),
    ("TOP", 2),
    ("TRY", 2),
    ("TTD", 2),
    ("TWD", 2),
    ("TZS", 2),
    ("UAH", 2),
    ("UGX", 0),
    ("USD", 2),
    ("USN", 2),
    ("UYI", 0),
    ("UYU", 2),
    ("UYW", 4),
    ("UZS", 2),
    ("VED", 2),
    ("VES", 2),
    ("VND", 0),
    ("VUV", 0),
    ("WST", 2),
    ("XAF", 0),
    ("XCD", 2),
    ("XCG", 2),
    ("XOF", 0),
    ("XPF", 0),
    ("YER", 2),
    ("ZAR", 2),
    ("ZMW", 2),
    ("ZWG", 2),
];

/// Longest prefix of rejected input kept in [`MoneyError::UnknownCurrency`], so a
/// hostile payload cannot inflate error messages and logs.
const MAX_ECHO_CHARS: usize = 8;

impl Currency {
    /// US dollar.
    pub const USD: Currency = Currency::known("USD", 2);
    /// Euro.
    pub const EUR: Currency = Currency::known("EUR", 2);
    /// Pound sterling.
    pub const GBP: Currency = Currency::known("GBP", 2);
    /// Japanese yen (no minor unit).
    pub const JPY: Currency = Currency::known("JPY", 0);
    /// Kuwaiti dinar (three decimals).
    pub const KWD: Currency = Currency::known("KWD", 3);

    /// Builds a constant for a code that is in [`CURRENCIES`] (checked by a test).
    const fn known(code: &'static str, exponent: u8) -> Currency {
        Currency { code, exponent }
    }

    /// Parses an ISO 4217 alphabetic code: exactly three uppercase ASCII letters
    /// naming an active currency. Lowercase, whitespace and unknown codes are refused.
    pub fn parse(s: &str) -> Result<Currency, MoneyError> {
        let well_formed = s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase());
        if well_formed {
            if let Ok(i) = CURRENCIES.binary_search_by(|(code, _)| (*code).cmp(s)) {
                let (code, exponent) = CURRENCIES[i];
                return Ok(Currency { code, exponent });
            }
        }
        Err(MoneyError::UnknownCurrency(
            s.chars().take(MAX_ECHO_CHARS).collect(),
        ))
    }

    /// The three-letter code, e.g. `"USD"`.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// Number of decimal digits in the minor unit (2 for USD, 0 for JPY, 3 for KWD).
    pub fn exponent(&self) -> u8 {
        self.exponent
    }

    /// Every supported currency, in code order.
    pub fn all() -> impl Iterator<Item = Currency> {
        CURRENCIES
            .iter()
            .map(|&(code, exponent)| Currency { code, exponent })
    }

    /// `10^exponent`: how many minor units make one major unit.
    fn scale(&self) -> u64 {
        10u64.pow(u32::from(self.exponent))
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

impl FromStr for Currency {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::parse(s)
    }
}

impl TryFrom<&str> for Currency {
    type Error = MoneyError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Currency::parse(s)
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.code)
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CurrencyVisitor;

        impl Visitor<'_> for CurrencyVisitor {
            type Value = Currency;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an ISO 4217 currency code such as \"USD\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Currency, E> {
                Currency::parse(v).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(CurrencyVisitor)
    }
}

/// Largest amount accepted by [`Amount::new`], in minor units (10^15: ten trillion
/// dollars). Over 9,000 maximal amounts can be summed before an `i64` balance overflows.
pub const MAX_MINOR_UNITS: i64 = 1_000_000_000_000_000;

/// A strictly positive number of minor units, at most [`Amount::MAX`]: the size of a
/// transfer, hold or deposit. Direction is carried elsewhere, never by the sign.
///
/// Serializes as a plain JSON integer; deserializing validates the range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Ord, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Amount(i64);

impl Amount {
    /// The largest valid amount ([`MAX_MINOR_UNITS`] minor units).
    pub const MAX: Amount = Amount(MAX_MINOR_UNITS);
    /// The smallest valid amount (one minor unit).
    pub const MIN: Amount = Amount(1);

    /// Accepts `1..=MAX_MINOR_UNITS` minor units; zero, negatives and larger values
    /// are refused with [`MoneyError::AmountInvalid`].
    pub fn new(minor_units: i64) -> Result<Amount, MoneyError> {
        if (1..=MAX_MINOR_UNITS).contains(&minor_units) {
            Ok(Amount(minor_units))
        } else {
            Err(MoneyError::AmountInvalid)
        }
    }

    /// The number of minor units (always in `1..=MAX_MINOR_UNITS`).
    pub fn get(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for Amount {
    type Error = MoneyError;

    fn try_from(minor_units: i64) -> Result<Self, Self::Error> {
        Amount::new(minor_units)
    }
}

impl From<Amount> for i64 {
    fn from(amount: Amount) -> i64 {
        amount.0
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// `a + b` for balances in minor units, or [`MoneyError::Overflow`].
pub fn checked_add_balance(a: i64, b: i64) -> Result<i64, MoneyError> {
    a.checked_add(b).ok_or(MoneyError::Overflow)
}

/// `a - b` for balances in minor units, or [`MoneyError::Overflow`].
pub fn checked_sub_balance(a: i64, b: i64) -> Result<i64, MoneyError> {
    a.checked_sub(b).ok_or(MoneyError::Overflow)
}

/// Renders minor units as a plain decimal in major units, with exactly
/// `currency.exponent()` fractional digits and no grouping or symbol:
/// 12345 USD → `"123.45"`, -5 USD → `"-0.05"`, 100 JPY → `"100"`, 1234 KWD → `"1.234"`.
///
/// Works for the whole `i64` range; [`parse_major`] is its exact inverse.
pub fn format_minor(amount: i64, currency: Currency) -> String {
    let sign = if amount < 0 { "-" } else { "" };
    let magnitude = amount.unsigned_abs();
    let digits = usize::from(currency.exponent());
    if digits == 0 {
        return format!("{sign}{magnitude}");
    }
    let scale = currency.scale();
    let whole = magnitude / scale;
    let fraction = magnitude % scale;
    format!("{sign}{whole}.{fraction:0digits$}")
}

/// Parses a decimal amount in major units into minor units, exactly.
///
/// Grammar: an optional leading `-`, one or more ASCII digits, then (only if the
/// currency has a minor unit) optionally `.` followed by 1 to `exponent` digits.
/// Fewer fractional digits are padded (`"1.5"` USD → 150). Anything else — `+`,
/// whitespace, grouping separators, exponents, a bare `.`, too many fractional digits
/// — is [`MoneyError::InvalidFormat`]; a value outside `i64` is [`MoneyError::Overflow`].
pub fn parse_major(s: &str, currency: Currency) -> Result<i64, MoneyError> {
    let format_err = |reason: &str| MoneyError::InvalidFormat(reason.to_owned());

    let (negative, unsigned) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (whole, fraction) = match unsigned.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (unsigned, None),
    };

    let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) {
        return Err(format_err(
            "expected digits with an optional leading '-' and decimal point",
        ));
    }
    let exponent = usize::from(currency.exponent());
    let fraction = match fraction {
        None => "",
        Some(_) if exponent == 0 => {
            return Err(format_err("this currency has no fractional digits"));
        }
        Some(f) if f.is_empty() || !all_digits(f) => {
            return Err(format_err("expected digits after the decimal point"));
        }
        Some(f) if f.len() > exponent => {
            return Err(format_err(
                "more fractional digits than the currency's minor unit",
            ));
        }
        Some(f) => f,
    };

    // Accumulate the magnitude in u64 (|i64::MIN| fits), then apply the sign.
    let mut magnitude: u64 = 0;
    let padding = exponent - fraction.len();
    let digits = whole
        .bytes()
        .chain(fraction.bytes())
        .chain(std::iter::repeat_n(b'0', padding));
    for b in digits {
        magnitude = magnitude
            .checked_mul(10)
            .and_then(|m| m.checked_add(u64::from(b - b'0')))
            .ok_or(MoneyError::Overflow)?;
    }

    if negative {
        0i64.checked_sub_unsigned(magnitude)
            .ok_or(MoneyError::Overflow)
    } else {
        i64::try_from(magnitude).map_err(|_| MoneyError::Overflow)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cur(code: &str) -> Currency {
        Currency::parse(code).unwrap()
    }

    #[test]
    fn table_is_sorted_unique_and_well_formed() {
        for pair in CURRENCIES.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{} before {}", pair[0].0, pair[1].0);
        }
        for (code, exponent) in CURRENCIES {
            assert!(code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()));
            assert!(*exponent <= 4, "{code}");
        }
    }

    #[test]
    fn required_exponents() {
        let expected = [
            ("USD", 2),
            ("EUR", 2),
            ("GBP", 2),
            ("JPY", 0),
            ("KRW", 0),
            ("CHF", 2),
            ("CAD", 2),
            ("AUD", 2),
            ("NZD", 2),
            ("CNY", 2),
            ("HKD", 2),
            ("SGD", 2),
            ("SEK", 2),
            ("NOK", 2),
            ("DKK", 2),
            ("PLN", 2),
            ("CZK", 2),
            ("HUF", 2),
            ("INR", 2),
            ("BRL", 2),
            ("MXN", 2),
            ("ZAR", 2),
            ("TRY", 2),
            ("ILS", 2),
            ("AED", 2),
            ("SAR", 2),
            ("NGN", 2),
            ("KES", 2),
            ("CLP", 0),
            ("ISK", 0),
            ("VND", 0),
            ("UGX", 0),
            ("XOF", 0),
            ("XAF", 0),
            ("KWD", 3),
            ("BHD", 3),
            ("OMR", 3),
            ("JOD", 3),
            ("TND", 3),
            ("LYD", 3),
            ("IQD", 3),
            ("CLF", 4),
            ("UYW", 4),
        ];
        for (code, exponent) in expected {
            let c = cur(code);
            assert_eq!(c.code(), code);
            assert_eq!(c.exponent(), exponent, "{code}");
        }
    }

    #[test]
    fn constants_match_table() {
        for c in [
            Currency::USD,
            Currency::EUR,
            Currency::GBP,
            Currency::JPY,
            Currency::KWD,
        ] {
            assert_eq!(Currency::parse(c.code()).unwrap(), c);
        }
        assert_eq!(Currency::all().count(), CURRENCIES.len());
    }

    #[test]
    fn parse_rejects_malformed_and_unknown() {
        for bad in [
            "", "usd", "Usd", "US", "USDD", " USD", "USD ", "U D", "XAU", "XXX", "HRK", "ABC",
            "ÜSD", "123",
        ] {
            let err = Currency::parse(bad).unwrap_err();
            assert!(matches!(err, MoneyError::UnknownCurrency(_)), "{bad:?}");
            assert_eq!(err.code(), "currency_unknown");
        }
    }

    #[test]
    fn unknown_currency_error_does_not_echo_long_input() {
        let long = "A".repeat(10_000);
        let MoneyError::UnknownCurrency(echo) = Currency::parse(&long).unwrap_err() else {
            panic!("wrong variant");
        };
        assert_eq!(echo.len(), MAX_ECHO_CHARS);
        // Multi-byte input is truncated on a char boundary.
        assert!(Currency::parse("ééééééééééé").is_err());
    }

    #[test]
    fn currency_display_fromstr_and_ordering() {
        assert_eq!(Currency::USD.to_string(), "USD");
        assert_eq!("EUR".parse::<Currency>().unwrap(), Currency::EUR);
        assert!(Currency::EUR < Currency::USD);
    }

    #[test]
    fn currency_serde_is_the_code() {
        assert_eq!(serde_json::to_string(&Currency::KWD).unwrap(), "\"KWD\"");
        let c: Currency = serde_json::from_str("\"JPY\"").unwrap();
        assert_eq!(c, Currency::JPY);
        assert!(serde_json::from_str::<Currency>("\"jpy\"").is_err());
        assert!(serde_json::from_str::<Currency>("\"ZZZ\"").is_err());
        assert!(serde_json::from_str::<Currency>("42").is_err());
        // Owned strings (escapes force serde_json to allocate) also work.
        let c: Currency = serde_json::from_str("\"\\u0055SD\"").unwrap();
        assert_eq!(c, Currency::USD);
    }

    #[test]
    fn amount_bounds() {
        assert_eq!(Amount::new(1).unwrap().get(), 1);
        assert_eq!(Amount::new(MAX_MINOR_UNITS).unwrap(), Amount::MAX);
        assert_eq!(Amount::MIN.get(), 1);
        for bad in [0, -1, i64::MIN, MAX_MINOR_UNITS + 1, i64::MAX] {
            let err = Amount::new(bad).unwrap_err();
            assert_eq!(err, MoneyError::AmountInvalid);
            assert_eq!(err.code(), "amount_invalid");
        }
    }

    #[test]
    fn amount_serde_is_a_validated_integer() {
        let a = Amount::new(1234).unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), "1234");
        assert_eq!(serde_json::from_str::<Amount>("1234").unwrap(), a);
        assert!(serde_json::from_str::<Amount>("0").is_err());
        assert!(serde_json::from_str::<Amount>("-5").is_err());
        assert!(serde_json::from_str::<Amount>("1.5").is_err());
        assert!(serde_json::from_str::<Amount>("\"12\"").is_err());
        assert!(serde_json::from_str::<Amount>("1000000000000001").is_err());
    }

    #[test]
    fn checked_arithmetic() {
        assert_eq!(checked_add_balance(2, 3), Ok(5));
        assert_eq!(checked_sub_balance(2, 3), Ok(-1));
        assert_eq!(checked_add_balance(i64::MAX, 1), Err(MoneyError::Overflow));
        assert_eq!(checked_sub_balance(i64::MIN, 1), Err(MoneyError::Overflow));
        assert_eq!(checked_sub_balance(0, i64::MIN), Err(MoneyError::Overflow));
        assert_eq!(MoneyError::Overflow.code(), "amount_overflow");
    }

    #[test]
    fn format_examples() {
        assert_eq!(format_minor(12345, Currency::USD), "123.45");
        assert_eq!(format_minor(-5, Currency::USD), "-0.05");
        assert_eq!(format_minor(0, Currency::USD), "0.00");
        assert_eq!(format_minor(100, Currency::JPY), "100");
        assert_eq!(format_minor(-100, Currency::JPY), "-100");
        assert_eq!(format_minor(1234, Currency::KWD), "1.234");
        assert_eq!(format_minor(5, cur("CLF")), "0.0005");
        assert_eq!(
            format_minor(i64::MIN, Currency::USD),
            "-92233720368547758.08"
        );
        assert_eq!(
            format_minor(i64::MAX, Currency::USD),
            "92233720368547758.07"
        );
    }

    #[test]
    fn parse_examples() {
        assert_eq!(parse_major("123.45", Currency::USD), Ok(12345));
        assert_eq!(parse_major("-0.05", Currency::USD), Ok(-5));
        assert_eq!(parse_major("1.5", Currency::USD), Ok(150));
        assert_eq!(parse_major("7", Currency::USD), Ok(700));
        assert_eq!(parse_major("100", Currency::JPY), Ok(100));
        assert_eq!(parse_major("1.234", Currency::KWD), Ok(1234));
        assert_eq!(parse_major("-0", Currency::USD), Ok(0));
        assert_eq!(
            parse_major("-92233720368547758.08", Currency::USD),
            Ok(i64::MIN)
        );
        assert_eq!(
            parse_major("92233720368547758.07", Currency::USD),
            Ok(i64::MAX)
        );
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in [
            "", "-", ".", "1.", ".5", "-.5", "+1", "--1", "1-", " 1", "1 ", "1,000", "1_000",
            "1e3", "1.2.3", "0x10", "1.234", "١٢", "NaN", "1.-2", "1.+2",
        ] {
            let err = parse_major(bad, Currency::USD).unwrap_err();
            assert!(matches!(err, MoneyError::InvalidFormat(_)), "{bad:?}");
            assert_eq!(err.code(), "amount_format");
        }
        assert!(matches!(
            parse_major("1.0", Currency::JPY),
            Err(MoneyError::InvalidFormat(_))
        ));
        assert!(matches!(
            parse_major("1.2345", Currency::KWD),
            Err(MoneyError::InvalidFormat(_))
        ));
    }

    #[test]
    fn parse_rejects_overflow() {
        for bad in [
            "92233720368547758.08",
            "-92233720368547758.09",
            "100000000000000000000000000",
            "18446744073709551616",
        ] {
            assert_eq!(
                parse_major(bad, Currency::USD),
                Err(MoneyError::Overflow),
                "{bad}"
            );
        }
        assert_eq!(
            parse_major("9223372036854775808", Currency::JPY),
            Err(MoneyError::Overflow)
        );
        assert_eq!(
            parse_major("-9223372036854775808", Currency::JPY),
            Ok(i64::MIN)
        );
    }

    fn any_currency() -> impl Strategy<Value = Currency> {
        (0..CURRENCIES.len()).prop_map(|i| Currency::all().nth(i).unwrap())
    }

    fn one_per_exponent() -> impl Strategy<Value = Currency> {
        prop_oneof![
            Just(cur("JPY")),
            Just(cur("USD")),
            Just(cur("KWD")),
            Just(cur("CLF")),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_bounded(
            amount in -MAX_MINOR_UNITS..=MAX_MINOR_UNITS,
            currency in one_per_exponent(),
        ) {
            let text = format_minor(amount, currency);
            prop_assert_eq!(parse_major(&text, currency), Ok(amount));
        }

        #[test]
        fn round_trip_full_range(amount in any::<i64>(), currency in any_currency()) {
            let text = format_minor(amount, currency);
            prop_assert_eq!(parse_major(&text, currency), Ok(amount));
        }

        #[test]
        fn format_has_exactly_exponent_fraction_digits(
            amount in any::<i64>(),
            currency in any_currency(),
        ) {
            let text = format_minor(amount, currency);
            let fraction = text.split_once('.').map_or(0, |(_, f)| f.len());
            prop_assert_eq!(fraction, usize::from(currency.exponent()));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,30}", currency in any_currency()) {
            let _ = parse_major(&s, currency);
        }

        #[test]
        fn parse_never_panics_on_numberish(s in "-?[0-9]{0,25}(\\.[0-9]{0,6})?", currency in any_currency()) {
            let _ = parse_major(&s, currency);
        }

        #[test]
        fn checked_arithmetic_never_panics_and_is_exact(a in any::<i64>(), b in any::<i64>()) {
            let wide_sum = i128::from(a) + i128::from(b);
            let wide_diff = i128::from(a) - i128::from(b);
            match checked_add_balance(a, b) {
                Ok(v) => prop_assert_eq!(i128::from(v), wide_sum),
                Err(e) => {
                    prop_assert_eq!(e, MoneyError::Overflow);
                    prop_assert!(i64::try_from(wide_sum).is_err());
                }
            }
            match checked_sub_balance(a, b) {
                Ok(v) => prop_assert_eq!(i128::from(v), wide_diff),
                Err(e) => {
                    prop_assert_eq!(e, MoneyError::Overflow);
                    prop_assert!(i64::try_from(wide_diff).is_err());
                }
            }
        }

        #[test]
        fn amounts_within_bounds_never_overflow_when_summed(
            xs in proptest::collection::vec(1..=MAX_MINOR_UNITS, 0..100),
        ) {
            let mut balance = 0i64;
            for x in xs {
                let amount = Amount::new(x).unwrap();
                balance = checked_add_balance(balance, amount.get()).unwrap();
            }
            prop_assert!(balance >= 0);
        }

        #[test]
        fn amount_new_accepts_exactly_the_range(n in any::<i64>()) {
            prop_assert_eq!(Amount::new(n).is_ok(), (1..=MAX_MINOR_UNITS).contains(&n));
        }
    }
}
