//! Customer-facing wallet account numbers: 12 decimal digits, the last one a Luhn
//! check digit so typos are caught before any lookup, shown masked
//! (`********1234`) to everyone but their owner.
//!
//! Account numbers are identifiers, not secrets or capabilities: knowing one grants
//! nothing. They are random so they reveal neither account count nor creation order.

use rand::Rng;

/// Number of digits in an account number, check digit included.
pub const LENGTH: usize = 12;

/// Digits left visible by [`mask`].
const VISIBLE: usize = 4;

/// Generates a fresh account number: 11 random digits (the first nonzero) followed
/// by their Luhn check digit. Uniqueness is the caller's concern (retry on conflict).
pub fn generate(rng: &mut impl Rng) -> String {
    let mut digits = [0u8; LENGTH];
    digits[0] = rng.gen_range(1..=9);
    for d in &mut digits[1..LENGTH - 1] {
        *d = rng.gen_range(0..=9);
    }
    digits[LENGTH - 1] = luhn_check_digit(&digits[..LENGTH - 1]);
    digits.iter().map(|&d| char::from(b'0' + d)).collect()
}

/// True when `s` is exactly [`LENGTH`] ASCII digits whose last digit is the correct
/// Luhn check digit for the others.
pub fn is_valid(s: &str) -> bool {
    let bytes = s.as_bytes();
    if bytes.len() != LENGTH || !bytes.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let (payload, check) = bytes.split_at(LENGTH - 1);
    let mut digits = [0u8; LENGTH - 1];
    for (d, b) in digits.iter_mut().zip(payload) {
        *d = b - b'0';
    }
    check == [b'0' + luhn_check_digit(&digits)]
}

/// Masks all but the last four characters with `*`: `"123456789012"` →
/// `"********9012"`. The output has as many characters as the input; input of four
/// characters or fewer is masked completely, so a mask never reveals a whole value.
pub fn mask(s: &str) -> String {
    let len = s.chars().count();
    if len <= VISIBLE {
        return "*".repeat(len);
    }
    let hidden = len - VISIBLE;
    s.chars()
        .enumerate()
        .map(|(i, c)| if i < hidden { '*' } else { c })
        .collect()
}

/// The Luhn check digit to append to `payload` (digit values `0..=9`).
fn luhn_check_digit(payload: &[u8]) -> u8 {
    // With a check digit appended, the payload's rightmost digit sits in a doubled
    // position; compute the sum as if the check digit were 0, then complete it.
    let sum = luhn_sum(payload.iter().copied().chain([0]));
    // `sum % 10` is below 10, so the result fits a digit.
    ((10 - sum % 10) % 10) as u8
}

/// Luhn sum over digit values `0..=9`, rightmost digit not doubled.
fn luhn_sum(digits: impl DoubleEndedIterator<Item = u8>) -> u32 {
    digits
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// Replaces the byte at `i` (ASCII, so char-safe).
    fn with_digit(s: &str, i: usize, d: u8) -> String {
        let mut bytes = s.as_bytes().to_vec();
        bytes[i] = d;
        String::from_utf8(bytes).unwrap()
    }

    fn swapped(s: &str, i: usize) -> String {
        let mut bytes = s.as_bytes().to_vec();
        bytes.swap(i, i + 1);
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn known_luhn_values() {
        // Classic Luhn example: 7992739871 has check digit 3.
        assert_eq!(luhn_check_digit(&[7, 9, 9, 2, 7, 3, 9, 8, 7, 1]), 3);
        assert!(is_valid("100000000008"));
        assert!(is_valid("123456789015"));
        assert!(!is_valid("123456789012"));
        assert!(is_valid("000000000000"));
    }

    #[test]
    fn generated_numbers_are_valid() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..10_000 {
            let n = generate(&mut rng);
            assert_eq!(n.len(), LENGTH);
            assert_ne!(n.as_bytes()[0], b'0', "{n}");
            assert!(is_valid(&n), "{n}");
        }
    }

    #[test]
    fn generation_spreads_out() {
        let mut rng = StdRng::seed_from_u64(42);
        let set: std::collections::HashSet<String> =
            (0..1000).map(|_| generate(&mut rng)).collect();
        assert_eq!(set.len(), 1000);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "12345678901",
            "1234567890155",
            " 23456789015",
            "12345678901 ",
            "1234-5678-9015",
            "12345678901a",
            "١٢٣٤٥٦٧٨٩٠١٥",
            "+23456789015",
        ] {
            assert!(!is_valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn every_single_digit_error_is_caught() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut samples: Vec<String> = (0..20).map(|_| generate(&mut rng)).collect();
        samples.push("123456789015".to_owned());
        samples.push("100000000008".to_owned());
        for n in &samples {
            assert!(is_valid(n));
            for i in 0..LENGTH {
                for d in b'0'..=b'9' {
                    if d == n.as_bytes()[i] {
                        continue;
                    }
                    let typo = with_digit(n, i, d);
                    assert!(!is_valid(&typo), "{n} -> {typo}");
                }
            }
        }
    }

    #[test]
    fn adjacent_transpositions_are_caught_except_09() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut checked = 0;
        for _ in 0..200 {
            let n = generate(&mut rng);
            let b = n.as_bytes();
            for i in 0..LENGTH - 1 {
                let pair = (b[i], b[i + 1]);
                if pair.0 == pair.1 || matches!(pair, (b'0', b'9') | (b'9', b'0')) {
                    continue;
                }
                let t = swapped(&n, i);
                assert!(!is_valid(&t), "{n} -> {t}");
                checked += 1;
            }
        }
        assert!(checked > 1000);
    }

    #[test]
    fn the_09_transposition_is_the_known_blind_spot() {
        // Documented Luhn limitation: "09" <-> "90" keeps the sum.
        let n = "100000000008";
        assert!(is_valid(n));
        let mut found = false;
        for payload in ["10900000000", "10090000000"] {
            let digits: Vec<u8> = payload.bytes().map(|b| b - b'0').collect();
            let full = format!("{payload}{}", luhn_check_digit(&digits));
            assert!(is_valid(&full));
            let i = full.find("09").or_else(|| full.find("90")).unwrap();
            found |= is_valid(&swapped(&full, i));
        }
        assert!(found);
    }

    #[test]
    fn mask_examples() {
        assert_eq!(mask("123456781234"), "********1234");
        assert_eq!(mask("12345"), "*2345");
        assert_eq!(mask("1234"), "****");
        assert_eq!(mask(""), "");
        assert_eq!(mask("ééééé"), "*éééé");
    }

    proptest! {
        #[test]
        fn generated_validate_and_mask(seed in any::<u64>()) {
            let mut rng = StdRng::seed_from_u64(seed);
            let n = generate(&mut rng);
            prop_assert!(is_valid(&n));
            let m = mask(&n);
            prop_assert_eq!(&m[..LENGTH - VISIBLE], "********");
            prop_assert_eq!(&m[LENGTH - VISIBLE..], &n[LENGTH - VISIBLE..]);
        }

        #[test]
        fn exactly_one_check_digit_fits(payload in "[1-9][0-9]{10}") {
            let valid: Vec<u8> = (b'0'..=b'9')
                .filter(|&d| is_valid(&format!("{payload}{}", char::from(d))))
                .collect();
            prop_assert_eq!(valid.len(), 1);
        }

        #[test]
        fn is_valid_and_mask_never_panic(s in "\\PC{0,20}") {
            let _ = is_valid(&s);
            prop_assert_eq!(mask(&s).chars().count(), s.chars().count());
        }
    }
}
