//! Row ids: UUID version 7 (RFC 9562), monotonic within the process like
//! `uuid::Uuid::now_v7`, but with the random bits from the thread's userspace RNG.
//! `Uuid::now_v7` makes a `getrandom` system call per id; a 1,000-transfer batch needs
//! ~3,000 ids, and `perf` put them at ~15% of the group committer thread, which runs
//! serially with the database writer.

use parking_lot::Mutex;
use rand::Rng;
use std::time::{SystemTime, UNIX_EPOCH};

/// (Unix milliseconds, 42-bit counter) of the last id.
static LAST: Mutex<(u64, u64)> = Mutex::new((0, 0));

const COUNTER_BITS: u32 = 42;

/// A new id, greater than every id this process made before (RFC 9562 §6.2, method 1:
/// a 42-bit counter below the millisecond timestamp, seeded randomly each
/// millisecond; 32 random bits after it). If the clock goes back, ids keep counting
/// from the last timestamp; a counter overflow moves on to the next millisecond.
pub(crate) fn new_id() -> String {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
        & ((1 << 48) - 1);
    let mut rng = rand::thread_rng();
    let (ms, counter) = {
        let mut last = LAST.lock();
        if now_ms > last.0 {
            // Seed below half the range, so a millisecond has 2^41 ids of headroom.
            *last = (now_ms, rng.gen::<u64>() >> (64 - (COUNTER_BITS - 1)));
        } else {
            last.1 += 1;
            if last.1 >> COUNTER_BITS != 0 {
                *last = (last.0 + 1, 0);
            }
        }
        *last
    };
    let random: u32 = rng.gen();
    let counter_high = counter >> 30; // 12 bits: rand_a
    let counter_low = counter & ((1 << 30) - 1); // 30 bits: top of rand_b
    let high: u64 = (ms << 16) | (0x7 << 12) | counter_high;
    let low: u64 = (0b10 << 62) | (counter_low << 32) | u64::from(random);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&high.to_be_bytes());
    bytes[8..].copy_from_slice(&low.to_be_bytes());
    uuid::Uuid::from_bytes(bytes).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_are_v7_increasing_unique_and_carry_the_time() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ids: Vec<String> = (0..100_000).map(|_| new_id()).collect();
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        for w in ids.windows(2) {
            assert!(w[0] < w[1], "{} !< {}", w[0], w[1]);
        }
        for id in [&ids[0], &ids[ids.len() - 1]] {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 7);
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
            let (secs, nanos) = u.get_timestamp().unwrap().to_unix();
            let ms = secs * 1000 + u64::from(nanos) / 1_000_000;
            assert!(before <= ms && ms <= after + 1, "{before} {ms} {after}");
        }
        // Interleaved with the uuid crate's own v7 ids from an earlier millisecond,
        // ours still sort after them (same layout: time first).
        let theirs = crate::ids::new_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(new_id() > theirs);
    }

    #[test]
    fn ids_increase_across_threads() {
        let handles: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..10_000).map(|_| new_id()).collect::<Vec<_>>()))
            .collect();
        let mut all: Vec<String> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
