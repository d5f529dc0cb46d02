//! Ed25519 signature verification against a known public key, with precomputed
//! tables for the key and the base point.
//!
//! A JWT verifier checks many signatures against the same two or three public keys, so
//! each key is worth a table. Verification is RFC 8032's cofactorless equation,
//! `[s]B = R + [k]A` with `k = SHA-512(R || A || M) mod L`, computed as
//! `R' = [s]B + [k](-A)` and accepted only when `R'` encodes to exactly the signature's
//! `R` bytes. Both products come from fixed-base comb tables (radix 256, signed digits:
//! 32 digits per scalar, so at most 64 point additions and no doublings) instead of
//! `ed25519-dalek`'s double-base ladder (about 253 doublings), which makes a
//! verification about 2.5 times cheaper. The group arithmetic is curve25519-dalek's; this
//! module only chooses which additions to do.
//!
//! Everything here is public data (keys, signatures, messages), so the table lookups
//! may depend on it (variable time), as any signature verification's may.
//!
//! The verdicts are those of `ed25519_dalek::VerifyingKey::verify_strict` (2.2): the
//! hash covers the public key's bytes as given, `s` must be canonical (`s < L`), `R`
//! must be byte-equal to the computed point's canonical encoding, a small-order `R` is
//! refused, and a small-order public key is refused (here when the key is prepared).
//! The tests check the verdicts against `verify_strict` on random keys, messages and
//! tampered signatures, on a key with a torsion component, and against RFC 8032's test
//! vectors, and check the table arithmetic against curve25519-dalek's scalar
//! multiplication, torsion included.

use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity;
use sha2::{Digest, Sha512};
use std::sync::{Arc, LazyLock, OnceLock};

/// A public key cannot be used for verification.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    #[error("not the encoding of a curve point")]
    NotAPoint,
    #[error("the point has small order (a weak key any signature would pass for)")]
    SmallOrder,
}

/// Signed radix-256 digits per scalar: scalars are below 2^253, so 32 digits hold
/// every one with no carry out of the top digit.
const DIGITS: usize = 32;
/// Multiples per digit position: |digit| is 1..=128.
const PER_DIGIT: usize = 128;

/// `j * 256^i * P` for every digit position `i` and `j` in 1..=128: 4,096 points
/// (640 KiB), built once per key in about a millisecond.
struct CombTable(Box<[EdwardsPoint]>);

impl CombTable {
    fn new(p: &EdwardsPoint) -> Self {
        let mut table = Vec::with_capacity(DIGITS * PER_DIGIT);
        let mut base = *p;
        for _ in 0..DIGITS {
            let mut multiple = base;
            for _ in 0..PER_DIGIT {
                table.push(multiple);
                multiple += base;
            }
            // `multiple` is now 129 * base; the next position's base is 256 * base.
            for _ in 0..8 {
                base = base + base;
            }
        }
        Self(table.into_boxed_slice())
    }

    /// `acc + [s]P`, where `P` is this table's point.
    fn add_multiple(&self, s: &Scalar, acc: &mut EdwardsPoint) {
        let bytes = s.as_bytes();
        let mut carry = 0i16;
        for (i, &byte) in bytes.iter().enumerate() {
            // One signed digit per byte: byte + carry is 0..=256; 128 and above become
            // negative with a carry into the next byte, so the digit is in -128..=127.
            let mut d = i16::from(byte) + carry;
            carry = 0;
            if d >= 128 {
                d -= 256;
                carry = 1;
            }
            let row = &self.0[i * PER_DIGIT..(i + 1) * PER_DIGIT];
            match d {
                0 => {}
                d if d > 0 => *acc += row[d as usize - 1],
                d => *acc -= row[d.unsigned_abs() as usize - 1],
            }
        }
        // s < L < 2^253: the top byte is at most 0x10, so no carry is left.
        debug_assert_eq!(carry, 0);
    }
}

static BASEPOINT: LazyLock<CombTable> = LazyLock::new(|| CombTable::new(&ED25519_BASEPOINT_POINT));

/// The canonical encodings of the eight points of small order. A signature's `R` must
/// equal the canonical encoding of the computed point, so that point has small order
/// exactly when `R` is one of these: comparing bytes answers `verify_strict`'s
/// small-order check on `R` before any curve arithmetic (it cost three doublings and a
/// comparison per verification).
static SMALL_ORDER_ENCODINGS: LazyLock<[[u8; 32]; 8]> =
    LazyLock::new(|| EIGHT_TORSION.map(|p| p.compress().to_bytes()));

/// An Ed25519 public key ready to verify signatures; cheap to clone. Its table is
/// built on the first verification.
#[derive(Clone)]
pub struct PreparedKey(Arc<Inner>);

struct Inner {
    public: [u8; 32],
    minus_a: EdwardsPoint,
    table: OnceLock<CombTable>,
}

impl std::fmt::Debug for PreparedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedKey({})", hex::encode(self.0.public))
    }
}

impl PreparedKey {
    /// Decodes a public key; refuses bytes that are not a point and small-order
    /// points (for those, `[s]B = R + [k]A` is met by `R = identity, s = 0` whatever
    /// the message).
    pub fn new(public: &[u8; 32]) -> Result<Self, KeyError> {
        let a = CompressedEdwardsY(*public)
            .decompress()
            .ok_or(KeyError::NotAPoint)?;
        if a.is_small_order() {
            return Err(KeyError::SmallOrder);
        }
        Ok(Self(Arc::new(Inner {
            public: *public,
            minus_a: -a,
            table: OnceLock::new(),
        })))
    }

    /// The 32-byte encoding this key was made from.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.public
    }

    /// Whether `signature` (R || s) is this key's signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let (r_bytes, s_tail) = signature.split_at(32);
        if SMALL_ORDER_ENCODINGS.iter().any(|e| e[..] == *r_bytes) {
            return false;
        }
        let mut s_bytes = [0u8; 32];
        s_bytes.copy_from_slice(s_tail);
        let Some(s) = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes)) else {
            return false;
        };
        let k = {
            let mut h = Sha512::new();
            h.update(r_bytes);
            h.update(self.0.public);
            h.update(message);
            Scalar::from_bytes_mod_order_wide(&h.finalize().into())
        };
        let table = self.0.table.get_or_init(|| CombTable::new(&self.0.minus_a));
        let mut r = EdwardsPoint::identity();
        BASEPOINT.add_multiple(&s, &mut r);
        table.add_multiple(&k, &mut r);
        r.compress().as_bytes()[..] == *r_bytes
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
    use proptest::prelude::*;

    fn dalek_strict(public: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
        VerifyingKey::from_bytes(public)
            .map(|k| {
                k.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(sig))
                    .is_ok()
            })
            .unwrap_or(false)
    }

    fn unhex<const N: usize>(s: &str) -> [u8; N] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    #[test]
    fn the_comb_multiplies_like_the_ladder() {
        let p = ED25519_BASEPOINT_POINT * Scalar::from(987_654_321u64);
        let table = CombTable::new(&p);
        let minus_one = -Scalar::ONE; // L - 1, the largest scalar
        let mut edge = vec![Scalar::ZERO, Scalar::ONE, minus_one, Scalar::from(128u64)];
        // digits of exactly ±128 and carries running through every byte
        edge.push(Scalar::from_bytes_mod_order([0x80; 32]));
        edge.push(Scalar::from_bytes_mod_order([0xff; 32]));
        edge.push(Scalar::from_bytes_mod_order([0x7f; 32]));
        let mut rng = rand::thread_rng();
        for _ in 0..200 {
            let mut wide = [0u8; 64];
            rand::RngCore::fill_bytes(&mut rng, &mut wide);
            edge.push(Scalar::from_bytes_mod_order_wide(&wide));
        }
        for s in edge {
            let mut acc = EdwardsPoint::identity();
            table.add_multiple(&s, &mut acc);
            assert_eq!(acc, p * s, "scalar {:?}", s.as_bytes());
        }
    }

    fn torsion8() -> EdwardsPoint {
        CompressedEdwardsY(unhex(
            "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        ))
        .decompress()
        .unwrap()
    }

    /// Canonical scalars whose every byte is a digit edge (±128 and the carries
    /// around it), on a point with a component of order 8: the comb must give the exact
    /// multiple, not only one equal modulo the prime-order subgroup.
    #[test]
    fn the_comb_is_exact_on_digit_edges_and_torsion() {
        let p = ED25519_BASEPOINT_POINT * Scalar::from(987_654_321u64) + torsion8();
        assert!(!p.is_torsion_free());
        let table = CombTable::new(&p);
        for (fill, top) in [
            (0x80u8, 0x00u8),
            (0x80, 0x0f),
            (0xff, 0x0f),
            (0x7f, 0x0f),
            (0x81, 0x00),
        ] {
            let mut b = [fill; 32];
            b[31] = top;
            let s = Option::<Scalar>::from(Scalar::from_canonical_bytes(b)).unwrap();
            let mut acc = EdwardsPoint::identity();
            table.add_multiple(&s, &mut acc);
            assert_eq!(acc, p * s, "fill {fill:#x}, top {top:#x}");
        }
    }

    /// A key with an order-8 component (not small order, so accepted as a key):
    /// `[k]T` vanishes only when 8 divides k, so an honest-looking signature verifies
    /// for some messages and not others. The verdict must be dalek's every time.
    #[test]
    fn a_mixed_order_key_gets_dalek_s_verdicts() {
        let a = Scalar::from(0x1234_5678u64);
        let public = (ED25519_BASEPOINT_POINT * a + torsion8())
            .compress()
            .to_bytes();
        let key = PreparedKey::new(&public).unwrap();
        let (mut accepted, mut refused) = (0, 0);
        for n in 1u64..200 {
            let r = Scalar::from(n);
            let rb = (ED25519_BASEPOINT_POINT * r).compress().to_bytes();
            let mut h = Sha512::new();
            h.update(rb);
            h.update(public);
            h.update(b"m");
            let k = Scalar::from_bytes_mod_order_wide(&h.finalize().into());
            let mut sig = [0u8; 64];
            sig[..32].copy_from_slice(&rb);
            sig[32..].copy_from_slice((r + k * a).as_bytes());
            let ours = key.verify(b"m", &sig);
            assert_eq!(ours, dalek_strict(&public, b"m", &sig), "n = {n}");
            assert_eq!(ours, k.as_bytes()[0] & 7 == 0, "n = {n}");
            if ours {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        assert!(accepted > 0 && refused > 0);
    }

    /// RFC 8032 §7.1, tests 1, 2, 3 and "SHA(abc)".
    #[test]
    fn rfc8032_vectors() {
        let vectors = [
            (
                "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
                "",
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
            ),
            (
                "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
                "72",
                "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
            ),
            (
                "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
                "af82",
                "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
            ),
            (
                "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
                "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
                "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
            ),
        ];
        for (public, msg, sig) in vectors {
            let public: [u8; 32] = unhex(public);
            let msg = hex::decode(msg).unwrap();
            let sig: [u8; 64] = unhex(sig);
            let key = PreparedKey::new(&public).unwrap();
            assert!(key.verify(&msg, &sig));
            let mut other = msg.clone();
            other.push(0);
            assert!(!key.verify(&other, &sig));
        }
    }

    /// The eight small-order points (canonical encodings). A key that is one of them
    /// would accept `R = identity, s = 0` for any message; such keys are refused.
    #[test]
    fn small_order_keys_are_refused() {
        let weak = [
            "0100000000000000000000000000000000000000000000000000000000000000",
            "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "0000000000000000000000000000000000000000000000000000000000000000",
            "0000000000000000000000000000000000000000000000000000000000000080",
            "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
            "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
            "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
            "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        ];
        // non-canonical encodings of small-order points decode too: the identity with
        // the sign bit set, and y = p + 1 (the identity again)
        let non_canonical = [
            "0100000000000000000000000000000000000000000000000000000000000080",
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ];
        let mut forged = [0u8; 64];
        forged[0] = 1; // R = identity, s = 0
        for w in weak.into_iter().chain(non_canonical) {
            let public: [u8; 32] = unhex(w);
            let point = CompressedEdwardsY(public).decompress().unwrap();
            assert!(point.is_small_order(), "{w} is a small-order point");
            assert_eq!(PreparedKey::new(&public).unwrap_err(), KeyError::SmallOrder);
            assert!(!dalek_strict(&public, b"anything", &forged));
        }
        // y = 2 is not on the curve
        let mut not_a_point = [0u8; 32];
        not_a_point[0] = 2;
        assert_eq!(
            PreparedKey::new(&not_a_point).unwrap_err(),
            KeyError::NotAPoint
        );
    }

    #[test]
    fn a_non_canonical_s_is_refused() {
        let sk = SigningKey::from_bytes(&[9; 32]);
        let msg = b"pay 10 to bob";
        let sig = sk.sign(msg).to_bytes();
        let key = PreparedKey::new(&sk.verifying_key().to_bytes()).unwrap();
        assert!(key.verify(msg, &sig));
        // s + L is the same scalar mod L, so the equation still holds: only the
        // canonical-s rule refuses it (the malleability RFC 8032 §5.1.7 forbids).
        let l = Scalar::ZERO - Scalar::ONE; // L - 1
        let mut s_plus_l = [0u8; 32];
        let mut carry = 1u16; // + 1, to get L from L - 1 ...
        for (i, b) in l.as_bytes().iter().enumerate() {
            let v = u16::from(*b) + u16::from(sig[32 + i]) + carry;
            s_plus_l[i] = v as u8;
            carry = v >> 8;
        }
        assert_eq!(carry, 0, "s + L fits in 256 bits for this signature");
        let mut malleated = sig;
        malleated[32..].copy_from_slice(&s_plus_l);
        assert!(!key.verify(msg, &malleated));
        assert!(!dalek_strict(&key.to_bytes(), msg, &malleated));
    }

    /// The key's owner can make `R` the identity: with `k = H(R || A || M)` and
    /// `s = k·a`, `[s]B - [k]A` is the identity. Cofactorless `verify` accepts that
    /// signature; strict verification, and this module, refuse a small-order `R`.
    #[test]
    fn a_small_order_r_is_refused() {
        let sk = SigningKey::from_bytes(&[5; 32]);
        let public = sk.verifying_key().to_bytes();
        let msg = b"transfer 1";
        let mut r = [0u8; 32];
        r[0] = 1; // the identity
        let mut h = Sha512::new();
        h.update(r);
        h.update(public);
        h.update(msg);
        let k = Scalar::from_bytes_mod_order_wide(&h.finalize().into());
        let s = k * sk.to_scalar();
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&r);
        sig[32..].copy_from_slice(s.as_bytes());
        let dalek = VerifyingKey::from_bytes(&public).unwrap();
        let sig_d = ed25519_dalek::Signature::from_bytes(&sig);
        assert!(
            ed25519_dalek::Verifier::verify(&dalek, msg, &sig_d).is_ok(),
            "the equation holds"
        );
        assert!(dalek.verify_strict(msg, &sig_d).is_err());
        assert!(!PreparedKey::new(&public).unwrap().verify(msg, &sig));
    }

    /// Every small-order `R`, not only the identity: with a key `A = [a]B + T` (T of
    /// order 8) and `s = k·a`, the computed point is `-[k]T`, one of the eight
    /// small-order points, and equals `R` for about one message in eight. Those
    /// signatures satisfy the cofactorless equation (dalek's `verify` accepts them);
    /// strict verification, and this module's byte comparison, refuse them all.
    #[test]
    fn every_small_order_r_is_refused() {
        let a = Scalar::from(0x0bad_cafeu64);
        let public = (ED25519_BASEPOINT_POINT * a + torsion8())
            .compress()
            .to_bytes();
        let key = PreparedKey::new(&public).unwrap();
        let dalek = VerifyingKey::from_bytes(&public).unwrap();
        let mut refused = [false; 8];
        for n in 0u32..4_000 {
            let msg = n.to_le_bytes();
            for (i, t) in EIGHT_TORSION.iter().enumerate() {
                let r = t.compress().to_bytes();
                let mut h = Sha512::new();
                h.update(r);
                h.update(public);
                h.update(msg);
                let k = Scalar::from_bytes_mod_order_wide(&h.finalize().into());
                let mut sig = [0u8; 64];
                sig[..32].copy_from_slice(&r);
                sig[32..].copy_from_slice((k * a).as_bytes());
                let sig_d = ed25519_dalek::Signature::from_bytes(&sig);
                if ed25519_dalek::Verifier::verify(&dalek, &msg, &sig_d).is_ok() {
                    assert!(!key.verify(&msg, &sig), "R = T{i}, message {n}");
                    assert!(dalek.verify_strict(&msg, &sig_d).is_err());
                    refused[i] = true;
                }
            }
        }
        assert_eq!(
            refused, [true; 8],
            "a forgery was found for every small-order R"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Same verdict as ed25519-dalek's verify_strict on valid signatures and on
        /// signatures, messages and keys with one bit flipped.
        #[test]
        fn agrees_with_dalek(
            secret in any::<[u8; 32]>(),
            msg in proptest::collection::vec(any::<u8>(), 0..700),
            flip in 0usize..(64 + 32 + 8) * 8,
        ) {
            let sk = SigningKey::from_bytes(&secret);
            let public = sk.verifying_key().to_bytes();
            let sig = sk.sign(&msg).to_bytes();
            let key = PreparedKey::new(&public).unwrap();
            prop_assert!(key.verify(&msg, &sig));
            prop_assert!(dalek_strict(&public, &msg, &sig));

            // one bit flipped: in the signature, the key, or the message
            let (mut sig2, mut public2, mut msg2) = (sig, public, msg.clone());
            let byte = flip / 8;
            let bit = 1u8 << (flip % 8);
            if byte < 64 {
                sig2[byte] ^= bit;
            } else if byte < 96 {
                public2[byte - 64] ^= bit;
            } else if msg2.is_empty() {
                msg2.push(bit);
            } else {
                let i = (byte - 96) % msg2.len();
                msg2[i] ^= bit;
            }
            let ours = PreparedKey::new(&public2)
                .map(|k| k.verify(&msg2, &sig2))
                .unwrap_or(false);
            prop_assert_eq!(ours, dalek_strict(&public2, &msg2, &sig2));
            prop_assert!(!ours);
        }
    }
}
