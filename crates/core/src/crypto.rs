//! Secrets: random tokens, hashing of stored tokens, constant-time comparison, keyed
//! blind indexes, and AES-256-GCM envelope encryption of secrets at rest.
//!
//! Envelope format (text, safe for any column type):
//! `v1.<kek version>.<b64 nonce+wrapped data key>.<b64 nonce+ciphertext>` where each
//! record gets a fresh 256-bit data key, wrapped by the key-encryption key of the
//! named version. Rotating the master key adds a version; old records stay readable.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("master key must be 32 bytes, given as 64 hex digits or base64")]
    BadMasterKey,
    #[error("ciphertext is malformed")]
    Malformed,
    #[error("no key-encryption key of version {0}")]
    UnknownKeyVersion(u32),
    #[error("decryption failed: wrong key or tampered data")]
    Decrypt,
}

/// `n` random bytes from the OS generator, URL-safe base64 without padding.
pub fn random_token(n: usize) -> String {
    let mut buf = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// A 256-bit opaque token (refresh tokens, email links, tickets).
pub fn opaque_token() -> String {
    random_token(32)
}

/// Lower-case hex SHA-256 of a token: what is stored instead of the token itself.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Constant-time equality of two byte strings.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Keyed HMAC-SHA256 blind index (hex), for looking up encrypted values.
pub fn blind_index(key: &[u8], value: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable_hmac());
    mac.update(value);
    hex::encode(mac.finalize().into_bytes())
}

fn unreachable_hmac() -> Hmac<Sha256> {
    // HMAC accepts keys of any length; this branch cannot be taken.
    #[allow(clippy::expect_used)]
    <Hmac<Sha256> as Mac>::new_from_slice(&[0u8; 32]).expect("hmac key of 32 bytes")
}

/// The 256-bit master key. Never printed; zeroed on drop.
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(**redacted**)")
    }
}

impl MasterKey {
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        Self(Zeroizing::new(k))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Parses 64 hex digits or standard/URL-safe base64 of 32 bytes.
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        let bytes = hex::decode(text)
            .ok()
            .or_else(|| STANDARD.decode(text).ok())
            .or_else(|| URL_SAFE_NO_PAD.decode(text).ok())
            .ok_or(CryptoError::BadMasterKey)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::BadMasterKey)?;
        Ok(Self::from_bytes(arr))
    }

    /// Hex encoding, for writing the generated key file.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(*self.0))
    }

    /// A purpose-bound subkey (HMAC-SHA256(master, label)), so one master key can
    /// serve the key-encryption key and blind indexes without reuse.
    pub fn derive(&self, label: &str) -> Zeroizing<[u8; 32]> {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&*self.0).unwrap_or_else(|_| unreachable_hmac());
        mac.update(label.as_bytes());
        Zeroizing::new(mac.finalize().into_bytes().into())
    }
}

/// Envelope encryption with versioned key-encryption keys.
#[derive(Clone)]
pub struct Envelope {
    current: u32,
    keks: BTreeMap<u32, Zeroizing<[u8; 32]>>,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Envelope(current=v{}, versions={})",
            self.current,
            self.keks.len()
        )
    }
}

impl Envelope {
    /// One version (1) derived from the master key.
    pub fn new(master: &MasterKey) -> Self {
        Self::with_versions(1, [(1, master)])
    }

    /// Several master keys by version; new records are sealed with `current`.
    pub fn with_versions<'a>(
        current: u32,
        keys: impl IntoIterator<Item = (u32, &'a MasterKey)>,
    ) -> Self {
        let keks = keys
            .into_iter()
            .map(|(v, k)| (v, k.derive("vaultpay/kek")))
            .collect();
        Self { current, keks }
    }

    /// Encrypts `plaintext`, binding it to `aad` (e.g. the record id).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<String, CryptoError> {
        let kek = self
            .keks
            .get(&self.current)
            .ok_or(CryptoError::UnknownKeyVersion(self.current))?;
        let mut dk = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut *dk);
        let wrapped = encrypt(kek, &*dk, b"vaultpay/dek")?;
        let body = encrypt(&dk, plaintext, aad)?;
        Ok(format!(
            "v1.{}.{}.{}",
            self.current,
            URL_SAFE_NO_PAD.encode(wrapped),
            URL_SAFE_NO_PAD.encode(body)
        ))
    }

    /// Decrypts what [`Envelope::seal`] produced with the same `aad`.
    pub fn open(&self, sealed: &str, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let mut parts = sealed.split('.');
        let (Some("v1"), Some(ver), Some(wrapped), Some(body), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(CryptoError::Malformed);
        };
        let ver: u32 = ver.parse().map_err(|_| CryptoError::Malformed)?;
        let kek = self
            .keks
            .get(&ver)
            .ok_or(CryptoError::UnknownKeyVersion(ver))?;
        let wrapped = URL_SAFE_NO_PAD
            .decode(wrapped)
            .map_err(|_| CryptoError::Malformed)?;
        let body = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| CryptoError::Malformed)?;
        let dk = Zeroizing::new(decrypt(kek, &wrapped, b"vaultpay/dek")?);
        let dk: Zeroizing<[u8; 32]> = Zeroizing::new(
            dk.as_slice()
                .try_into()
                .map_err(|_| CryptoError::Malformed)?,
        );
        Ok(Zeroizing::new(decrypt(&dk, &body, aad)?))
    }
}

fn encrypt(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key));
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Decrypt)?;
    let mut out = Vec::with_capacity(12 + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn decrypt(key: &[u8; 32], data: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if data.len() < 12 + 16 {
        return Err(CryptoError::Malformed);
    }
    let (nonce, ct) = data.split_at(12);
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key));
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| CryptoError::Decrypt)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip_and_binding() {
        let mk = MasterKey::generate();
        let env = Envelope::new(&mk);
        let sealed = env.seal(b"secret signing key", b"kid-1").unwrap();
        assert!(!sealed.contains("secret"));
        assert_eq!(
            &**env.open(&sealed, b"kid-1").unwrap(),
            b"secret signing key"
        );
        // bound to its record: another aad fails
        assert_eq!(
            env.open(&sealed, b"kid-2").unwrap_err(),
            CryptoError::Decrypt
        );
        // another master key fails
        let other = Envelope::new(&MasterKey::generate());
        assert_eq!(
            other.open(&sealed, b"kid-1").unwrap_err(),
            CryptoError::Decrypt
        );
        // tampering fails
        let mut t = sealed.clone().into_bytes();
        let n = t.len() - 3;
        t[n] = if t[n] == b'A' { b'B' } else { b'A' };
        assert!(env
            .open(std::str::from_utf8(&t).unwrap(), b"kid-1")
            .is_err());
        assert_eq!(
            env.open("garbage", b"").unwrap_err(),
            CryptoError::Malformed
        );
    }

    #[test]
    fn old_kek_versions_stay_readable() {
        let k1 = MasterKey::generate();
        let k2 = MasterKey::generate();
        let old = Envelope::new(&k1).seal(b"x", b"a").unwrap();
        let rotated = Envelope::with_versions(2, [(1, &k1), (2, &k2)]);
        assert_eq!(&**rotated.open(&old, b"a").unwrap(), b"x");
        assert!(rotated.seal(b"y", b"a").unwrap().starts_with("v1.2."));
    }

    #[test]
    fn master_key_parsing_and_redaction() {
        let mk = MasterKey::generate();
        let again = MasterKey::parse(&mk.to_hex()).unwrap();
        assert_eq!(*mk.derive("l"), *again.derive("l"));
        assert!(MasterKey::parse("abc").is_err());
        assert_eq!(format!("{mk:?}"), "MasterKey(**redacted**)");
    }

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = opaque_token();
        assert_eq!(a.len(), 43);
        assert_ne!(a, opaque_token());
        assert_eq!(sha256_hex(b"abc").len(), 64);
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"abc", b"ab"));
        assert_ne!(blind_index(b"k1", b"v"), blind_index(b"k2", b"v"));
    }
}
