//! What `GET /v1/me` reads from the database (the session's liveness and the user's
//! profile), kept in memory for a short time so the most frequent authenticated call
//! needs no database round trip.
//!
//! Correctness rests on three things:
//! - every revocation of a session, and every change of a profile, drops the user's
//!   entries *after* its transaction commits (`AuthService::sessions_changed`), here
//!   and, over the invalidation bus (Redis pub/sub), on the other nodes;
//! - a reader records the generation before it reads the database and stores its
//!   answer only if no drop happened since (a drop bumps the generation under the
//!   same lock), so an answer read before a revocation committed is never cached
//!   after the drop;
//! - entries live at most `[auth] me_cache_ttl_ms` (2 s by default), which bounds
//!   staleness if a drop is lost (a replica without the Redis bus, say). A session's expiry is checked on every
//!   hit; the idle expiry is the one read, which a refresh only moves later, so a hit
//!   can only be stricter than the database.
//!
//! Only `/v1/me` uses it: every operation that changes state, and introspection (what
//! the ledger asks before moving money), still checks the session in the database.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Entries kept at most; beyond it the cache starts over.
const MAX_ENTRIES: usize = 50_000;

/// One live session and its user's profile, as read at `cached_at`.
#[derive(Debug)]
pub(crate) struct MeEntry {
    pub user_id: String,
    pub email: String,
    pub name: String,
    pub email_verified: bool,
    pub created_at: String,
    pub expires_at: i64,
    pub idle_expires_at: i64,
    pub cached_at: i64,
}

#[derive(Default)]
pub(crate) struct MeCache {
    entries: Mutex<HashMap<String, Arc<MeEntry>>>,
    generation: AtomicU64,
}

impl MeCache {
    /// The generation to pass to [`MeCache::insert`]; read it before the database.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The entry of `session_id`, when it belongs to `user_id`, was read less than
    /// `ttl` ago and the session has not expired at `now` (all micros).
    pub(crate) fn get(
        &self,
        session_id: &str,
        user_id: &str,
        now: i64,
        ttl: i64,
    ) -> Option<Arc<MeEntry>> {
        if ttl <= 0 {
            return None;
        }
        let e = self.entries.lock().get(session_id).cloned()?;
        (e.user_id == user_id
            && now - e.cached_at < ttl
            && now < e.expires_at
            && now < e.idle_expires_at)
            .then_some(e)
    }

    /// Stores what was read since `generation`, unless a drop happened meanwhile.
    pub(crate) fn insert(&self, generation: u64, session_id: &str, entry: Arc<MeEntry>) {
        let mut entries = self.entries.lock();
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(session_id.to_owned(), entry);
    }

    /// Drops the entries of `user` (of everyone when `None`).
    pub(crate) fn drop_user(&self, user: Option<&str>) {
        let mut entries = self.entries.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        match user {
            Some(u) => entries.retain(|_, e| e.user_id != u),
            None => entries.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL_MICROS: i64 = 2_000_000;

    fn entry(user: &str, now: i64) -> Arc<MeEntry> {
        Arc::new(MeEntry {
            user_id: user.into(),
            email: "a@example.com".into(),
            name: "A".into(),
            email_verified: true,
            created_at: "2026-01-01T00:00:00Z".into(),
            expires_at: now + 3_600_000_000,
            idle_expires_at: now + 600_000_000,
            cached_at: now,
        })
    }

    #[test]
    fn hits_only_for_the_owner_while_fresh_and_unexpired() {
        let c = MeCache::default();
        let now = 1_000_000_000;
        c.insert(c.generation(), "s1", entry("u1", now));
        assert!(c.get("s1", "u1", now + 1, TTL_MICROS).is_some());
        assert!(
            c.get("s1", "u2", now + 1, TTL_MICROS).is_none(),
            "another user's token"
        );
        assert!(c.get("s2", "u1", now + 1, TTL_MICROS).is_none());
        assert!(
            c.get("s1", "u1", now + TTL_MICROS, TTL_MICROS).is_none(),
            "stale"
        );
        let mut e = entry("u1", now);
        if let Some(e) = Arc::get_mut(&mut e) {
            e.idle_expires_at = now + 5;
        }
        c.insert(c.generation(), "s3", e);
        assert!(
            c.get("s3", "u1", now + 5, TTL_MICROS).is_none(),
            "idle-expired"
        );
        assert!(c.get("s1", "u1", now + 1, 0).is_none(), "0 turns it off");
    }

    #[test]
    fn a_read_from_before_a_drop_is_not_stored() {
        let c = MeCache::default();
        let now = 1_000_000_000;
        let before = c.generation();
        // a revocation commits and drops while the reader is in the database
        c.drop_user(Some("u1"));
        c.insert(before, "s1", entry("u1", now));
        assert!(c.get("s1", "u1", now, TTL_MICROS).is_none());
        // a read that started after the drop is stored
        c.insert(c.generation(), "s1", entry("u1", now));
        assert!(c.get("s1", "u1", now, TTL_MICROS).is_some());
    }

    #[test]
    fn drops_one_user_or_everyone() {
        let c = MeCache::default();
        let now = 1_000_000_000;
        c.insert(c.generation(), "s1", entry("u1", now));
        c.insert(c.generation(), "s2", entry("u2", now));
        c.drop_user(Some("u1"));
        assert!(c.get("s1", "u1", now, TTL_MICROS).is_none());
        assert!(c.get("s2", "u2", now, TTL_MICROS).is_some());
        c.drop_user(None);
        assert!(c.get("s2", "u2", now, TTL_MICROS).is_none());
    }
}
