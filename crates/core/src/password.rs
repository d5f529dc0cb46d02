//! Passwords: Argon2id hashing, the password policy, and Have I Been Pwned helpers.
//!
//! * [`PasswordHasher`] produces and verifies PHC strings
//!   (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`). Parameters come from [`Argon2Params`],
//!   which refuses anything weaker than OWASP's minimum (m = 19 MiB, t = 2, p = 1).
//!   Hashing is deliberately slow and synchronous: callers run it on a blocking
//!   thread pool, never on the async runtime.
//! * [`PasswordPolicy`] decides whether a new password is acceptable: length in
//!   Unicode scalar values, a bundled list of common leaked passwords, and a zxcvbn
//!   strength estimate that also knows the user's own email and name.
//! * [`hibp_prefix_suffix`] and [`hibp_count_in_range`] implement the pure half of
//!   the Have I Been Pwned k-anonymity range API; the HTTP call lives elsewhere.
//!   A positive count is reported to the user as [`PolicyViolation::Breached`].

use std::collections::HashSet;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, SaltString};
use argon2::{Algorithm, Argon2, Block, Version};
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use rand::rngs::OsRng;
use rand::RngCore as _;
use serde::ser::SerializeMap as _;
use serde::{Deserialize, Serialize, Serializer};
use sha1::{Digest as _, Sha1};
use std::cell::RefCell;

/// OWASP's minimum Argon2id memory cost, in KiB (19 MiB).
pub const MIN_M_COST_KIB: u32 = 19 * 1024;
/// OWASP's minimum Argon2id number of passes.
pub const MIN_T_COST: u32 = 2;
/// OWASP's minimum Argon2id degree of parallelism.
pub const MIN_P_COST: u32 = 1;

/// Length of the random salt put in every hash, in bytes.
const SALT_LEN: usize = 16;
/// Length of the Argon2 output put in every hash, in bytes.
const OUTPUT_LEN: usize = 32;

/// Errors from configuring or running the password hasher.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// A configured Argon2 cost is below the OWASP minimum.
    #[error("argon2 {name} = {value} is below the minimum of {minimum}")]
    WeakParams {
        /// Which parameter: `m_cost_kib`, `t_cost` or `p_cost`.
        name: &'static str,
        /// The configured value.
        value: u32,
        /// The smallest accepted value.
        minimum: u32,
    },
    /// The Argon2 implementation rejected the parameters (e.g. out of range).
    #[error("invalid argon2 parameters: {0}")]
    InvalidParams(#[source] argon2::Error),
    /// Computing the hash failed.
    #[error("password hashing failed: {0}")]
    Hash(#[source] argon2::password_hash::Error),
}

/// Argon2id cost parameters, as found in the server configuration.
///
/// Missing fields take their defaults, which are OWASP's minimum: 19 MiB of memory,
/// two passes, one lane. Raising them makes every login slower and uses
/// `m_cost_kib` KiB of memory per concurrent hash, so size the blocking pool
/// accordingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Argon2Params {
    /// Memory cost in KiB.
    pub m_cost_kib: u32,
    /// Number of passes over the memory.
    pub t_cost: u32,
    /// Degree of parallelism (lanes).
    pub p_cost: u32,
}

impl Default for Argon2Params {
    fn default() -> Self {
        Self {
            m_cost_kib: MIN_M_COST_KIB,
            t_cost: MIN_T_COST,
            p_cost: MIN_P_COST,
        }
    }
}

impl Argon2Params {
    /// Checks that the parameters are at least OWASP's minimum and that Argon2
    /// accepts them.
    pub fn validate(&self) -> Result<(), PasswordError> {
        let checks = [
            ("m_cost_kib", self.m_cost_kib, MIN_M_COST_KIB),
            ("t_cost", self.t_cost, MIN_T_COST),
            ("p_cost", self.p_cost, MIN_P_COST),
        ];
        for (name, value, minimum) in checks {
            if value < minimum {
                return Err(PasswordError::WeakParams {
                    name,
                    value,
                    minimum,
                });
            }
        }
        self.to_argon2().map(|_| ())
    }

    /// Converts to the argon2 crate's parameters without the OWASP floor.
    fn to_argon2(self) -> Result<argon2::Params, PasswordError> {
        argon2::Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(OUTPUT_LEN))
            .map_err(PasswordError::InvalidParams)
    }
}

/// Hashes and verifies passwords with Argon2id (version 0x13).
///
/// All methods are CPU- and memory-heavy on purpose; call them from a blocking
/// thread pool.
#[derive(Debug, Clone)]
pub struct PasswordHasher {
    params: Argon2Params,
    argon2_params: argon2::Params,
}

impl Default for PasswordHasher {
    /// A hasher with OWASP's minimum parameters.
    fn default() -> Self {
        let params = Argon2Params::default();
        let argon2_params = argon2::Params::new(
            params.m_cost_kib,
            params.t_cost,
            params.p_cost,
            Some(OUTPUT_LEN),
        )
        .unwrap_or(argon2::Params::DEFAULT);
        Self {
            params,
            argon2_params,
        }
    }
}

thread_local! {
    /// Argon2 working memory of this thread, reused by every verification on it.
    static ARGON2_MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Verifications needing more than this many 1 KiB blocks (256 MiB) allocate their
/// own memory instead of growing the reused one.
const REUSED_BLOCKS_MAX: usize = 256 * 1024;

impl PasswordHasher {
    /// Builds a hasher, refusing parameters below OWASP's minimum.
    pub fn new(params: Argon2Params) -> Result<Self, PasswordError> {
        params.validate()?;
        Ok(Self {
            params,
            argon2_params: params.to_argon2()?,
        })
    }

    /// Builds a hasher with any parameters Argon2 accepts, however weak. Tests only.
    #[cfg(test)]
    fn new_insecure_for_tests(params: Argon2Params) -> Result<Self, PasswordError> {
        Ok(Self {
            params,
            argon2_params: params.to_argon2()?,
        })
    }

    /// The parameters new hashes are made with.
    pub fn params(&self) -> Argon2Params {
        self.params
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            self.argon2_params.clone(),
        )
    }

    /// Hashes `password` with a fresh random 16-byte salt and returns the PHC
    /// string to store.
    pub fn hash(&self, password: &str) -> Result<String, PasswordError> {
        let salt = SaltString::generate(&mut OsRng);
        let hash = self
            .argon2()
            .hash_password(password.as_bytes(), &salt)
            .map_err(PasswordError::Hash)?;
        Ok(hash.to_string())
    }

    /// Whether `password` matches the stored PHC string.
    ///
    /// The hash's own parameters are used, so hashes made with older parameters
    /// still verify (see [`needs_rehash`](Self::needs_rehash)). The final comparison
    /// is constant-time. A malformed PHC string, or one for another algorithm than
    /// Argon2id, never matches.
    ///
    /// Argon2's memory (19 MiB at the default cost) is kept per thread and reused:
    /// allocating and faulting it in for every verification costs a tenth of the
    /// hash's time on a busy server (page faults, zeroing, returning it to the OS).
    pub fn verify(&self, password: &str, phc: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(phc) else {
            return false;
        };
        if parsed.algorithm != argon2::ARGON2ID_IDENT {
            return false;
        }
        let (Some(expected), Some(salt)) = (parsed.hash, parsed.salt) else {
            return false;
        };
        let Ok(version) = Version::try_from(parsed.version.unwrap_or(0x13)) else {
            return false;
        };
        let Ok(stored) = argon2::Params::try_from(&parsed) else {
            return false;
        };
        let Ok(params) = argon2::Params::new(
            stored.m_cost(),
            stored.t_cost(),
            stored.p_cost(),
            Some(expected.len()),
        ) else {
            return false;
        };
        let mut salt_buf = [0u8; 64];
        let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
            return false;
        };
        let argon = Argon2::new(Algorithm::Argon2id, version, params.clone());
        let mut out = zeroize::Zeroizing::new(vec![0u8; expected.len()]);
        let need = params.block_count();
        let ok = if need <= REUSED_BLOCKS_MAX {
            ARGON2_MEMORY.with(|m| {
                let mut blocks = m.borrow_mut();
                if blocks.len() < need {
                    blocks.resize(need, Block::default());
                }
                argon.hash_password_into_with_memory(
                    password.as_bytes(),
                    salt,
                    &mut out,
                    &mut blocks[..need],
                )
            })
        } else {
            argon.hash_password_into(password.as_bytes(), salt, &mut out)
        };
        ok.is_ok() && crate::crypto::ct_eq(&out, expected.as_bytes())
    }

    /// Whether a stored hash should be replaced by a fresh one after a successful
    /// login: it is malformed, not Argon2id v19, or made with other parameters
    /// than this hasher's.
    pub fn needs_rehash(&self, phc: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(phc) else {
            return true;
        };
        if parsed.algorithm != argon2::ARGON2ID_IDENT || parsed.version != Some(0x13) {
            return true;
        }
        match argon2::Params::try_from(&parsed) {
            Ok(stored) => {
                stored.m_cost() != self.params.m_cost_kib
                    || stored.t_cost() != self.params.t_cost
                    || stored.p_cost() != self.params.p_cost
                    || parsed.hash.map(|h| h.len()) != Some(OUTPUT_LEN)
            }
            Err(_) => true,
        }
    }

    /// A hash of a random, forgotten password, made with this hasher's parameters.
    ///
    /// Compute it once at startup and [`verify`](Self::verify) against it when a
    /// login names an unknown account, so that case costs the same time as a wrong
    /// password and does not reveal which emails are registered. Nothing verifies
    /// against it.
    pub fn dummy_hash(&self) -> String {
        let mut secret = [0u8; 32];
        OsRng.fill_bytes(&mut secret);
        match self.hash(&hex::encode(secret)) {
            Ok(phc) => phc,
            // Unreachable with validated parameters; fall back to a well-formed hash
            // with a random output, which costs the same to verify.
            Err(_) => self.synthetic_phc(),
        }
    }

    /// A syntactically valid PHC string with a random salt and a random output,
    /// built without running Argon2.
    fn synthetic_phc(&self) -> String {
        let mut salt = [0u8; SALT_LEN];
        let mut output = [0u8; OUTPUT_LEN];
        OsRng.fill_bytes(&mut salt);
        OsRng.fill_bytes(&mut output);
        format!(
            "$argon2id$v=19$m={},t={},p={}${}${}",
            self.params.m_cost_kib,
            self.params.t_cost,
            self.params.p_cost,
            STANDARD_NO_PAD.encode(salt),
            STANDARD_NO_PAD.encode(output),
        )
    }
}

/// The bundled list of common leaked passwords, one lowercase entry per line.
const COMMON_PASSWORDS_TXT: &str = include_str!("../data/common-passwords.txt");

/// The common-password list as a set, built on first use.
fn common_passwords() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| {
        COMMON_PASSWORDS_TXT
            .lines()
            .map(|line| line.trim_end_matches('\r'))
            .filter(|line| !line.is_empty())
            .collect()
    })
}

/// Whether `password` is on the bundled list of common passwords. The comparison
/// ignores case but is otherwise exact (no trimming).
pub fn is_common_password(password: &str) -> bool {
    common_passwords().contains(password.to_lowercase().as_str())
}

/// Rules a new password must satisfy. Part of the server configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PasswordPolicy {
    /// Minimum length in Unicode scalar values (default 12).
    pub min_length: usize,
    /// Maximum length in Unicode scalar values (default 128).
    pub max_length: usize,
    /// Minimum zxcvbn score, 0 (weakest) to 4 (default 3).
    pub min_zxcvbn_score: u8,
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        Self {
            min_length: 12,
            max_length: 128,
            min_zxcvbn_score: 3,
        }
    }
}

impl PasswordPolicy {
    /// The cheap part of [`Self::check`]: too short, too long, on the bundled list.
    pub fn check_shape(&self, password: &str) -> Result<(), PolicyViolation> {
        let length = password.chars().count();
        if length < self.min_length {
            return Err(PolicyViolation::TooShort {
                min_length: self.min_length,
                length,
            });
        }
        if length > self.max_length {
            return Err(PolicyViolation::TooLong {
                max_length: self.max_length,
                length,
            });
        }
        if is_common_password(password) {
            return Err(PolicyViolation::Common);
        }
        Ok(())
    }

    /// Checks a candidate password, in this order: too short, too long, on the
    /// common-password list, too weak by zxcvbn. Returns the first violation.
    ///
    /// `user_inputs` are strings the user is known by (email, name, username).
    /// zxcvbn treats passwords built from them as easy to guess; besides each whole
    /// input, its alphanumeric pieces of three characters or more are used too
    /// (`alice.smith@example.com` also yields `alice`, `smith`, `example`).
    ///
    /// The breach check ([`PolicyViolation::Breached`]) needs network access and is
    /// done by the caller with [`hibp_prefix_suffix`] and [`hibp_count_in_range`].
    pub fn check(&self, password: &str, user_inputs: &[&str]) -> Result<(), PolicyViolation> {
        self.check_shape(password)?;
        let inputs = expand_user_inputs(user_inputs);
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        // zxcvbn's l33t matching multiplies its dictionary lookups per substitutable
        // character: a crafted 100-character password took 0.8 s of CPU, 40 characters
        // 0.14 s. A prefix that scores high enough makes the whole password at least
        // as strong, so only the first ZXCVBN_CHARS are scored.
        let scored: String = password.chars().take(ZXCVBN_CHARS).collect();
        let entropy = zxcvbn::zxcvbn(&scored, &inputs);
        let score = u8::from(entropy.score());
        if score < self.min_zxcvbn_score {
            let (warning, suggestions) = match entropy.feedback() {
                Some(feedback) => (
                    feedback.warning().map(|w| w.to_string()),
                    feedback
                        .suggestions()
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                ),
                None => (None, Vec::new()),
            };
            return Err(PolicyViolation::Weak {
                score,
                min_score: self.min_zxcvbn_score,
                warning,
                suggestions,
            });
        }
        Ok(())
    }
}

/// Characters of a password zxcvbn scores (see [`PasswordPolicy::check`]).
pub const ZXCVBN_CHARS: usize = 40;

/// Lowercased user inputs plus their alphanumeric pieces of 3+ characters,
/// without duplicates or empty strings.
fn expand_user_inputs(user_inputs: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: &str| {
        let s = s.to_lowercase();
        if !s.is_empty() && !out.contains(&s) {
            out.push(s);
        }
    };
    for input in user_inputs {
        push(input);
        for piece in input.split(|c: char| !c.is_alphanumeric()) {
            if piece.chars().count() >= 3 {
                push(piece);
            }
        }
    }
    out
}

/// Why a password was refused.
///
/// Serializes as a flat JSON object with a stable machine `code`, a human `message`
/// and the variant's details, e.g.
/// `{"code":"password_weak","message":"…","score":1,"min_score":3,"warning":"…","suggestions":["…"]}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyViolation {
    /// Fewer characters than the policy's minimum.
    #[error("Password must be at least {min_length} characters long.")]
    TooShort {
        /// The policy's minimum.
        min_length: usize,
        /// The password's length in characters.
        length: usize,
    },
    /// More characters than the policy's maximum.
    #[error("Password must be at most {max_length} characters long.")]
    TooLong {
        /// The policy's maximum.
        max_length: usize,
        /// The password's length in characters.
        length: usize,
    },
    /// On the bundled list of common passwords.
    #[error("This password is one of the most commonly used passwords; choose another one.")]
    Common,
    /// zxcvbn estimates it is too easy to guess.
    #[error("This password is too easy to guess (strength {score} of 4, at least {min_score} required).")]
    Weak {
        /// zxcvbn score, 0 to 4.
        score: u8,
        /// The policy's minimum score.
        min_score: u8,
        /// zxcvbn's warning, if it has one.
        warning: Option<String>,
        /// zxcvbn's suggestions for a stronger password.
        suggestions: Vec<String>,
    },
    /// Found in the Have I Been Pwned corpus of breached passwords.
    #[error("This password has appeared in a known data breach; choose another one.")]
    Breached {
        /// How many times it appears in the corpus.
        count: u64,
    },
}

impl PolicyViolation {
    /// The stable machine code for API error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooShort { .. } => "password_too_short",
            Self::TooLong { .. } => "password_too_long",
            Self::Common => "password_common",
            Self::Weak { .. } => "password_weak",
            Self::Breached { .. } => "password_breached",
        }
    }

    /// A human-readable explanation, suitable for showing to the user.
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// The violation for a Have I Been Pwned count: `Some` when the password was
    /// found (`count > 0`).
    pub fn from_hibp_count(count: u64) -> Option<Self> {
        (count > 0).then_some(Self::Breached { count })
    }
}

impl Serialize for PolicyViolation {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("code", self.code())?;
        map.serialize_entry("message", &self.message())?;
        match self {
            Self::TooShort { min_length, length } => {
                map.serialize_entry("min_length", min_length)?;
                map.serialize_entry("length", length)?;
            }
            Self::TooLong { max_length, length } => {
                map.serialize_entry("max_length", max_length)?;
                map.serialize_entry("length", length)?;
            }
            Self::Common => {}
            Self::Weak {
                score,
                min_score,
                warning,
                suggestions,
            } => {
                map.serialize_entry("score", score)?;
                map.serialize_entry("min_score", min_score)?;
                if let Some(warning) = warning {
                    map.serialize_entry("warning", warning)?;
                }
                map.serialize_entry("suggestions", suggestions)?;
            }
            Self::Breached { count } => map.serialize_entry("count", count)?,
        }
        map.end()
    }
}

/// Base URL of the Have I Been Pwned range API; append the 5-character prefix.
/// Send the `Add-Padding: true` header so response sizes do not leak the prefix.
pub const HIBP_RANGE_URL: &str = "https://api.pwnedpasswords.com/range/";

/// Splits the uppercase hex SHA-1 of `password` into the 5-character prefix sent
/// to the range API and the 35-character suffix looked up in its answer.
pub fn hibp_prefix_suffix(password: &str) -> (String, String) {
    let digest = hex::encode_upper(Sha1::digest(password.as_bytes()));
    let (prefix, suffix) = digest.split_at(5);
    (prefix.to_owned(), suffix.to_owned())
}

/// How many times the password with this SHA-1 `suffix` appears in a range API
/// response `body` (`SUFFIX:COUNT` lines, LF or CRLF). Returns 0 when it is absent.
///
/// The suffix comparison ignores case. Padding entries (count 0) count as absent;
/// lines that are not a 35-hex-digit suffix and a decimal count are ignored.
pub fn hibp_count_in_range(body: &str, suffix: &str) -> u64 {
    let wanted = suffix.trim();
    body.lines()
        .filter_map(|line| {
            let (line_suffix, count) = line.trim().split_once(':')?;
            let line_suffix = line_suffix.trim();
            if line_suffix.len() != 35 || !line_suffix.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let count = count.trim().parse::<u64>().ok()?;
            line_suffix.eq_ignore_ascii_case(wanted).then_some(count)
        })
        .find(|&count| count > 0)
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Tiny parameters so tests run fast in debug builds.
    fn fast_hasher() -> PasswordHasher {
        PasswordHasher::new_insecure_for_tests(Argon2Params {
            m_cost_kib: 64,
            t_cost: 1,
            p_cost: 1,
        })
        .unwrap()
    }

    /// A password built to make zxcvbn's l33t matching explode is scored on its first
    /// ZXCVBN_CHARS characters only; a weak head is not hidden by a long strong tail,
    /// and a strong head passes whatever follows.
    #[test]
    fn zxcvbn_scores_a_bounded_prefix() {
        let policy = PasswordPolicy::default();
        let crafted: String = "4@8({[<3691!|7$5+%20".chars().cycle().take(128).collect();
        assert!(policy.check(&crafted, &[]).is_ok());
        let weak_head = format!("{}{}", "a".repeat(ZXCVBN_CHARS), "Xq7#pL9!vR2$mK4&");
        assert!(matches!(
            policy.check(&weak_head, &[]),
            Err(PolicyViolation::Weak { .. })
        ));
        let strong_head = format!("Xq7#pL9!vR2$mK4&zT8*{}", "a".repeat(60));
        assert!(policy.check(&strong_head, &[]).is_ok());
    }

    #[test]
    fn default_params_are_owasp_minimum() {
        let p = Argon2Params::default();
        assert_eq!((p.m_cost_kib, p.t_cost, p.p_cost), (19_456, 2, 1));
        p.validate().unwrap();
    }

    #[test]
    fn weak_params_are_refused() {
        let base = Argon2Params::default();
        for (weak, field) in [
            (
                Argon2Params {
                    m_cost_kib: 19_455,
                    ..base
                },
                "m_cost_kib",
            ),
            (Argon2Params { t_cost: 1, ..base }, "t_cost"),
            (Argon2Params { p_cost: 0, ..base }, "p_cost"),
        ] {
            match weak.validate() {
                Err(PasswordError::WeakParams { name, .. }) => assert_eq!(name, field),
                other => panic!("expected WeakParams for {field}, got {other:?}"),
            }
            assert!(PasswordHasher::new(weak).is_err());
        }
        // Stronger than the minimum is fine.
        Argon2Params {
            m_cost_kib: 65_536,
            t_cost: 3,
            p_cost: 4,
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn params_deserialize_with_defaults() {
        let p: Argon2Params = serde_json::from_str(r#"{"t_cost": 3}"#).unwrap();
        assert_eq!(
            p,
            Argon2Params {
                t_cost: 3,
                ..Argon2Params::default()
            }
        );
        let policy: PasswordPolicy = serde_json::from_str(r#"{"min_length": 14}"#).unwrap();
        assert_eq!(
            policy,
            PasswordPolicy {
                min_length: 14,
                ..PasswordPolicy::default()
            }
        );
    }

    #[test]
    fn round_trip_with_default_params() {
        let hasher = PasswordHasher::new(Argon2Params::default()).unwrap();
        let phc = hasher.hash("correct horse battery staple").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(hasher.verify("correct horse battery staple", &phc));
        assert!(!hasher.verify("correct horse battery stapler", &phc));
        assert!(!hasher.needs_rehash(&phc));
        assert_eq!(PasswordHasher::default().params(), hasher.params());
    }

    #[test]
    fn round_trip_and_wrong_password() {
        let hasher = fast_hasher();
        let phc = hasher.hash("hunter2 but longer").unwrap();
        assert!(hasher.verify("hunter2 but longer", &phc));
        assert!(!hasher.verify("hunter2 but longer ", &phc));
        assert!(!hasher.verify("", &phc));
        // A fresh salt every time.
        assert_ne!(phc, hasher.hash("hunter2 but longer").unwrap());
        // Salt is 16 bytes: 22 base64 characters without padding.
        let salt = phc.split('$').nth(4).unwrap();
        assert_eq!(salt.len(), 22);
    }

    #[test]
    fn unicode_passwords_round_trip() {
        let hasher = fast_hasher();
        let phc = hasher.hash("pässwörd-ünïcødé-🔐").unwrap();
        assert!(hasher.verify("pässwörd-ünïcødé-🔐", &phc));
        assert!(!hasher.verify("passwörd-ünïcødé-🔐", &phc));
    }

    #[test]
    fn malformed_phc_never_verifies() {
        let hasher = fast_hasher();
        let phc = hasher.hash("some password").unwrap();
        for bad in [
            "",
            "not a hash",
            "$argon2id$",
            "$argon2id$v=19$m=64,t=1,p=1$",
            &phc[..phc.len() - 5],
            &phc.replace("argon2id", "pbkdf2-sha256"),
            "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",
        ] {
            assert!(!hasher.verify("some password", bad), "{bad:?}");
            assert!(hasher.needs_rehash(bad), "{bad:?}");
        }
    }

    #[test]
    fn needs_rehash_when_params_change() {
        let old = fast_hasher();
        let phc = old.hash("some password").unwrap();
        assert!(!old.needs_rehash(&phc));
        let new = PasswordHasher::new_insecure_for_tests(Argon2Params {
            m_cost_kib: 128,
            t_cost: 1,
            p_cost: 1,
        })
        .unwrap();
        assert!(new.needs_rehash(&phc));
        // Old hashes still verify with the new hasher.
        assert!(new.verify("some password", &phc));
    }

    /// The reused-memory verification agrees with the argon2 crate's own verifier on
    /// hashes of other sizes, versions and algorithms, in any order on one thread
    /// (so the reused memory is larger, smaller or dirty from the last hash).
    #[test]
    fn verify_agrees_with_the_reference_verifier() {
        use argon2::password_hash::PasswordVerifier as _;
        let mut cases = Vec::new();
        for (alg, version, m, t, p) in [
            (Algorithm::Argon2id, Version::V0x13, 64, 1, 1),
            (Algorithm::Argon2id, Version::V0x13, 256, 2, 2),
            (Algorithm::Argon2id, Version::V0x10, 128, 3, 1),
            (Algorithm::Argon2id, Version::V0x13, 72, 1, 4),
            (Algorithm::Argon2i, Version::V0x13, 64, 1, 1),
            (Algorithm::Argon2d, Version::V0x13, 64, 1, 1),
        ] {
            let params = argon2::Params::new(m, t, p, Some(32)).unwrap();
            let argon = Argon2::new(alg, version, params);
            let salt = SaltString::generate(&mut OsRng);
            let phc = argon
                .hash_password(b"pw-under-test", &salt)
                .unwrap()
                .to_string();
            cases.push((alg, phc));
        }
        let hasher = fast_hasher();
        for _ in 0..2 {
            for (alg, phc) in &cases {
                let parsed = PasswordHash::new(phc).unwrap();
                for guess in ["pw-under-test", "pw-under-tesT", ""] {
                    let reference = Argon2::default()
                        .verify_password(guess.as_bytes(), &parsed)
                        .is_ok();
                    // Only Argon2id is accepted; for it, the answers agree.
                    let expected = reference && *alg == Algorithm::Argon2id;
                    assert_eq!(hasher.verify(guess, phc), expected, "{phc} {guess:?}");
                }
            }
        }
    }

    #[test]
    fn dummy_hash_is_valid_and_matches_nothing() {
        let hasher = fast_hasher();
        let dummy = hasher.dummy_hash();
        assert!(dummy.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{dummy}");
        assert!(PasswordHash::new(&dummy).is_ok());
        assert!(!hasher.needs_rehash(&dummy));
        for guess in ["", "password", "correct horse battery staple"] {
            assert!(!hasher.verify(guess, &dummy));
        }
    }

    #[test]
    fn synthetic_phc_is_well_formed() {
        let hasher = fast_hasher();
        let phc = hasher.synthetic_phc();
        let parsed = PasswordHash::new(&phc).unwrap();
        assert_eq!(parsed.salt.unwrap().as_str().len(), 22);
        assert_eq!(parsed.hash.unwrap().len(), OUTPUT_LEN);
        assert!(!hasher.needs_rehash(&phc));
        assert!(!hasher.verify("anything", &phc));
    }

    #[test]
    fn policy_too_short_counts_chars() {
        let policy = PasswordPolicy::default();
        let err = policy.check("Xk9#mPq2", &[]).unwrap_err();
        assert_eq!(
            err,
            PolicyViolation::TooShort {
                min_length: 12,
                length: 8
            }
        );
        assert_eq!(err.code(), "password_too_short");
        // 11 characters but 33 bytes: still too short.
        let cjk = "漢字漢字漢字漢字漢字漢";
        assert_eq!(cjk.len(), 33);
        assert!(matches!(
            policy.check(cjk, &[]),
            Err(PolicyViolation::TooShort { length: 11, .. })
        ));
    }

    #[test]
    fn policy_too_long() {
        let policy = PasswordPolicy::default();
        let long = "ab3$".repeat(33);
        let err = policy.check(&long, &[]).unwrap_err();
        assert_eq!(
            err,
            PolicyViolation::TooLong {
                max_length: 128,
                length: 132
            }
        );
        assert_eq!(err.code(), "password_too_long");
    }

    #[test]
    fn policy_common_is_case_insensitive_and_exact() {
        let policy = PasswordPolicy::default();
        for pw in [
            "password1234",
            "PassWord1234",
            "QWERTYUIOP123",
            "1q2w3e4r5t6y",
            "administrator",
        ] {
            let err = policy.check(pw, &[]).unwrap_err();
            assert_eq!(err, PolicyViolation::Common, "{pw}");
            assert_eq!(err.code(), "password_common");
        }
        // No trimming: surrounding whitespace makes it a different password.
        assert!(!is_common_password(" password1234"));
        assert!(is_common_password("Password1234"));
    }

    #[test]
    fn policy_weak_carries_feedback() {
        let policy = PasswordPolicy::default();
        let err = policy.check("abcabcabcabcabc", &[]).unwrap_err();
        let PolicyViolation::Weak {
            score,
            min_score,
            warning,
            suggestions,
        } = &err
        else {
            panic!("expected Weak, got {err:?}");
        };
        assert!(*score < 3);
        assert_eq!(*min_score, 3);
        assert!(warning.is_some() || !suggestions.is_empty());
        assert_eq!(err.code(), "password_weak");

        let json = serde_json::to_value(&err).unwrap();
        assert_eq!(json["code"], "password_weak");
        assert_eq!(json["score"], u64::from(*score));
        assert!(json["message"]
            .as_str()
            .unwrap()
            .contains("too easy to guess"));
        assert!(json["suggestions"].is_array());
    }

    #[test]
    fn policy_accepts_strong_password() {
        let policy = PasswordPolicy::default();
        policy
            .check(
                "plinth-Gravel-orbit-74-sonnet",
                &["alice@example.com", "Alice Smith"],
            )
            .unwrap();
        policy.check("Tröpfchen·Kumquat·Zeppelin·9", &[]).unwrap();
    }

    #[test]
    fn user_inputs_lower_the_score() {
        let email = "zephyrine.quackenbush@vaultpay.example";
        let password = "zephyrinequackenbush";
        let policy = PasswordPolicy::default();
        policy.check(password, &[]).unwrap();
        let without = u8::from(zxcvbn::zxcvbn(password, &[]).score());
        let err = policy
            .check(password, &[email, "Zephyrine Quackenbush"])
            .unwrap_err();
        let PolicyViolation::Weak { score, .. } = err else {
            panic!("expected Weak, got {err:?}");
        };
        assert!(score < without, "{score} !< {without}");

        // The whole email as the password.
        assert!(matches!(
            policy.check(email, &[email]),
            Err(PolicyViolation::Weak { .. })
        ));
    }

    #[test]
    fn expand_user_inputs_splits_pieces() {
        let got = expand_user_inputs(&["Alice.Smith@Example.com", "Alice Smith", "", "a-b"]);
        assert_eq!(
            got,
            [
                "alice.smith@example.com",
                "alice",
                "smith",
                "example",
                "com",
                "alice smith",
                "a-b"
            ]
        );
    }

    #[test]
    fn violations_serialize_with_code_and_message() {
        let short = serde_json::to_value(PolicyViolation::TooShort {
            min_length: 12,
            length: 3,
        })
        .unwrap();
        assert_eq!(short["code"], "password_too_short");
        assert_eq!(short["min_length"], 12);
        assert_eq!(
            short["message"],
            "Password must be at least 12 characters long."
        );
        let common = serde_json::to_value(PolicyViolation::Common).unwrap();
        assert_eq!(common["code"], "password_common");
        let breached = PolicyViolation::from_hibp_count(42).unwrap();
        assert_eq!(breached.code(), "password_breached");
        let breached = serde_json::to_value(breached).unwrap();
        assert_eq!(breached["code"], "password_breached");
        assert_eq!(breached["count"], 42);
        assert_eq!(PolicyViolation::from_hibp_count(0), None);
    }

    #[test]
    fn common_list_is_large_unique_and_lowercase() {
        let lines: Vec<&str> = COMMON_PASSWORDS_TXT.lines().collect();
        let set = common_passwords();
        assert!(set.len() >= 500, "only {} entries", set.len());
        assert_eq!(
            set.len(),
            lines.len(),
            "duplicate or empty lines in the list"
        );
        for entry in set {
            assert_eq!(*entry, entry.to_lowercase(), "not lowercase: {entry}");
            assert_eq!(*entry, entry.trim(), "whitespace around: {entry:?}");
        }
        for must in [
            "123456",
            "password",
            "qwerty",
            "iloveyou",
            "qwertyuiop123",
            "123456789012",
        ] {
            assert!(set.contains(must), "{must}");
        }
        assert!(set.iter().filter(|e| e.chars().count() >= 12).count() >= 50);
    }

    #[test]
    fn hibp_prefix_suffix_of_password() {
        let (prefix, suffix) = hibp_prefix_suffix("password");
        assert_eq!(prefix, "5BAA6");
        assert_eq!(suffix, "1E4C9B93F3F0682250B6CF8331B7EE68FD8");
        assert_eq!(suffix.len(), 35);
    }

    #[test]
    fn hibp_count_parses_lines() {
        let (_, suffix) = hibp_prefix_suffix("password");
        let body = "0018A45C4D1DEF81644B54AB7F969B88D65:1\r\n\
                    1E4C9B93F3F0682250B6CF8331B7EE68FD8:9659365\r\n\
                    1E4C9B93F3F0682250B6CF8331B7EE68FD9:2\r\n";
        assert_eq!(hibp_count_in_range(body, &suffix), 9_659_365);
        // LF only, lowercase suffix in the body, no trailing newline.
        let body = "0018a45c4d1def81644b54ab7f969b88d65:1\n1e4c9b93f3f0682250b6cf8331b7ee68fd8:3";
        assert_eq!(hibp_count_in_range(body, &suffix), 3);
        assert_eq!(hibp_count_in_range(body, &suffix.to_lowercase()), 3);
        assert_eq!(
            hibp_count_in_range(body, "0018A45C4D1DEF81644B54AB7F969B88D65"),
            1
        );
    }

    #[test]
    fn hibp_not_found_padding_and_garbage() {
        let (_, suffix) = hibp_prefix_suffix("password");
        assert_eq!(hibp_count_in_range("", &suffix), 0);
        let body = "0018A45C4D1DEF81644B54AB7F969B88D65:1\r\n";
        assert_eq!(hibp_count_in_range(body, &suffix), 0);
        // Padding entry for our suffix: not found.
        let padded = format!("{suffix}:0\r\n0018A45C4D1DEF81644B54AB7F969B88D65:1\r\n");
        assert_eq!(hibp_count_in_range(&padded, &suffix), 0);
        // Garbage lines are skipped, a later valid line still counts.
        let body = format!(
            "<html>oops</html>\r\n{suffix}\r\n{suffix}:lots\r\n:5\r\nXYZ:7\r\n\r\n{suffix}:12\r\n"
        );
        assert_eq!(hibp_count_in_range(&body, &suffix), 12);
        // An empty suffix matches nothing.
        assert_eq!(hibp_count_in_range(":5\n", ""), 0);
    }
}
