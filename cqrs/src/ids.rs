//! Time-ordered ids (UUID v7) for new events and command contexts.
//!
//! A v7 id is 48 bits of milliseconds since the Unix epoch, then 74 bits that RFC 9562
//! leaves to a random or counter source. The `uuid` crate draws those bits from a
//! cryptographic generator on every call; an id only has to be unique, so here each thread
//! seeds a SplitMix64 sequence once from that generator and then takes 64 of the 74 bits
//! from it. SplitMix64's output is a bijection of its counter, so one thread never repeats
//! those 64 bits within 2^64 ids, whatever the clock does; two threads collide only if
//! their random 64-bit starting points fall within the number of ids drawn of each other.
//! The remaining 10 bits come from the same sequence's next output.
//!
//! Such ids are unique, not unguessable: whoever sees one can compute the thread's next
//! ones. Nothing in the framework treats an event or command id as a secret; an id that
//! must not be guessed (a resource a URL alone grants access to) comes from
//! [`Uuid::new_v4`] or [`Uuid::now_v7`], as the example service's order ids do. As with the
//! `uuid` crate's own thread-local generator, a child process forked from a thread that has
//! made ids continues that thread's sequence: it must not make ids on that thread.

use std::cell::Cell;

use uuid::{Builder, Uuid};

/// SplitMix64's increment (the golden ratio's fractional part, odd).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

thread_local! {
    /// This thread's SplitMix64 counter; 0 until the thread's first id.
    static COUNTER: Cell<u64> = const { Cell::new(0) };
}

/// The next output of this thread's sequence.
fn next() -> u64 {
    COUNTER.with(|counter| {
        let mut state = counter.get();
        if state == 0 {
            // Seeded once per thread from the `uuid` crate's random source.
            state = (Uuid::new_v4().as_u128() as u64) | 1;
        }
        state = state.wrapping_add(GOLDEN);
        counter.set(state);
        mix(state)
    })
}

/// SplitMix64's output function: a bijection on `u64`.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A UUID v7 of `millis` since the Unix epoch, its other 74 bits from this thread's
/// sequence.
pub(crate) fn v7_at(millis: u64) -> Uuid {
    let unique = next();
    v7_from(millis, unique, next())
}

/// A UUID v7 of `millis` that keeps all 64 bits of `unique` and 10 bits of `extra`.
///
/// Of the builder's 80 input bits it drops the top 4 of byte 0 (the version's place) and
/// the top 2 of byte 2 (the variant's): `unique` fills bytes 2 to 9, and its 2 top bits,
/// which byte 2 would lose, go into byte 0 beside 2 bits of `extra`.
fn v7_from(millis: u64, unique: u64, extra: u64) -> Uuid {
    let unique = unique.to_be_bytes();
    let extra = extra.to_be_bytes();
    let mut random = [0u8; 10];
    random[0] = ((unique[0] >> 6) << 2) | (extra[0] & 0x03);
    random[1] = extra[1];
    random[2..].copy_from_slice(&unique);
    Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// A UUID v7 of the current time.
pub(crate) fn now_v7() -> Uuid {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64);
    v7_at(millis)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ids_are_v7_of_the_given_millisecond() {
        let id = v7_at(1_700_000_000_123);
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        let (seconds, nanos) = id.get_timestamp().map(|t| t.to_unix()).unwrap_or_default();
        assert_eq!((seconds, nanos / 1_000_000), (1_700_000_000, 123));
    }

    #[test]
    fn ids_of_one_millisecond_are_all_distinct() {
        let ids: HashSet<Uuid> = (0..100_000).map(|_| v7_at(42)).collect();
        assert_eq!(ids.len(), 100_000);
    }

    #[test]
    fn threads_draw_different_sequences() {
        let of_thread = || {
            std::thread::spawn(|| (0..1_000).map(|_| v7_at(7)).collect::<Vec<_>>())
                .join()
                .unwrap_or_default()
        };
        let (a, b) = (of_thread(), of_thread());
        assert_eq!(a.len(), 1_000);
        let all: HashSet<Uuid> = a.iter().chain(&b).copied().collect();
        assert_eq!(all.len(), 2_000);
    }

    #[test]
    fn every_bit_of_the_sequence_reaches_the_id() {
        let base = v7_from(5, 0, 0);
        for bit in 0..64 {
            let id = v7_from(5, 1 << bit, 0);
            assert_ne!(id, base, "bit {bit} of the sequence is lost");
            assert_eq!(
                (id.get_version_num(), id.get_variant()),
                (7, uuid::Variant::RFC4122)
            );
        }
        for bit in 0..10 {
            let extra = if bit < 2 {
                1u64 << (56 + bit)
            } else {
                1 << (48 + bit - 2)
            };
            assert_ne!(
                v7_from(5, 0, extra),
                base,
                "bit {bit} of the extra bits is lost"
            );
        }
    }
}
