//! The audit log's hash chain.
//!
//! Each entry stores the hash of the one before it and its own hash over every field,
//! length-prefixed so no two different entries serialise alike. Changing, removing
//! or reordering any entry breaks the chain at that entry.

use sha2::{Digest, Sha256};

/// The `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub id: String,
    pub at: i64,
    pub actor: Option<String>,
    pub action: String,
    pub resource: Option<String>,
    pub outcome: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    /// A JSON object as text.
    pub metadata: String,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEntry {
    /// The hash this entry must carry, given its fields and `prev_hash`.
    pub fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        };
        fn opt(o: &Option<String>) -> &[u8] {
            o.as_deref().map(str::as_bytes).unwrap_or(b"\x00none")
        }
        field(self.prev_hash.as_bytes());
        field(&self.seq.to_be_bytes());
        field(self.id.as_bytes());
        field(&self.at.to_be_bytes());
        field(opt(&self.actor));
        field(self.action.as_bytes());
        field(opt(&self.resource));
        field(self.outcome.as_bytes());
        field(opt(&self.ip));
        field(opt(&self.user_agent));
        field(opt(&self.request_id));
        field(self.metadata.as_bytes());
        hex::encode(h.finalize())
    }

    /// Fills in `hash` from the other fields.
    pub fn seal(mut self) -> Self {
        self.hash = self.compute_hash();
        self
    }
}

/// Where and why a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at seq {seq}: {reason}")]
pub struct BrokenLink {
    pub seq: i64,
    pub reason: &'static str,
}

/// Incremental chain checker, fed entries in `seq` order.
#[derive(Debug)]
pub struct ChainVerifier {
    prev_seq: i64,
    prev_hash: String,
    pub checked: u64,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            prev_seq: 0,
            prev_hash: GENESIS.to_owned(),
            checked: 0,
        }
    }
}

impl ChainVerifier {
    /// The last entry verified so far, `(seq, hash)` (`None` before the first).
    pub fn last(&self) -> Option<(i64, &str)> {
        (self.checked > 0).then_some((self.prev_seq, self.prev_hash.as_str()))
    }

    pub fn push(&mut self, e: &AuditEntry) -> Result<(), BrokenLink> {
        let broken = |reason| Err(BrokenLink { seq: e.seq, reason });
        if e.seq != self.prev_seq + 1 {
            return broken("sequence gap: an entry is missing or out of order");
        }
        if e.prev_hash != self.prev_hash {
            return broken("prev_hash does not match the previous entry");
        }
        if e.compute_hash() != e.hash {
            return broken("hash does not match the entry's contents");
        }
        self.prev_seq = e.seq;
        self.prev_hash.clone_from(&e.hash);
        self.checked += 1;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditEntry> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let e = AuditEntry {
                    seq,
                    id: format!("id{seq}"),
                    at: seq * 10,
                    actor: Some("u".into()),
                    action: "login.succeeded".into(),
                    resource: None,
                    outcome: "success".into(),
                    ip: Some("127.0.0.1".into()),
                    user_agent: None,
                    request_id: Some("r".into()),
                    metadata: "{}".into(),
                    prev_hash: prev.clone(),
                    hash: String::new(),
                }
                .seal();
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    fn verify(entries: &[AuditEntry]) -> Result<u64, BrokenLink> {
        let mut v = ChainVerifier::default();
        for e in entries {
            v.push(e)?;
        }
        Ok(v.checked)
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(verify(&chain(5)), Ok(5));
    }

    #[test]
    fn finds_first_tampered_entry() {
        let mut c = chain(5);
        c[2].outcome = "failure".into();
        assert_eq!(verify(&c).unwrap_err().seq, 3);
        let mut c = chain(5);
        c[3].actor = None;
        assert_eq!(verify(&c).unwrap_err().seq, 4);
    }

    #[test]
    fn finds_deleted_and_reordered_entries() {
        let mut c = chain(5);
        c.remove(1);
        assert_eq!(verify(&c).unwrap_err().seq, 3);
        let mut c = chain(5);
        c.swap(1, 2);
        assert_eq!(verify(&c).unwrap_err().seq, 3);
    }

    #[test]
    fn rehashing_a_tampered_entry_breaks_the_next_link() {
        let mut c = chain(5);
        c[1].action = "nothing.happened".into();
        c[1] = c[1].clone().seal();
        assert_eq!(
            verify(&c).unwrap_err(),
            BrokenLink {
                seq: 3,
                reason: "prev_hash does not match the previous entry"
            }
        );
    }

    #[test]
    fn none_and_empty_differ() {
        let mut a = chain(1).remove(0);
        let h1 = a.compute_hash();
        a.actor = Some(String::new());
        assert_ne!(h1, a.compute_hash());
    }
}
