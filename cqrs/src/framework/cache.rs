//! The state cache: the states of recently used aggregates, kept in memory so that a
//! dispatch on one of them reads nothing from the store.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use smol_str::SmolStr;
use uuid::Uuid;

/// An aggregate's state with the sequence of the last event folded into it.
#[derive(Debug, Clone)]
pub(super) struct Loaded<S> {
    pub(super) state: S,
    pub(super) sequence: i64,
    /// The aggregate's `aggregate_type_id`, made on its first append and kept with the
    /// cached state, so that later commands do not format the id again.
    pub(super) key: Option<SmolStr>,
}

impl<S> Loaded<S> {
    pub(super) fn new(state: S, sequence: i64) -> Self {
        Loaded {
            state,
            sequence,
            key: None,
        }
    }
}

/// States of recently used aggregates, bounded.
///
/// Two generations approximate least-recently-used eviction in O(1): new and refreshed
/// entries go to `young`; when `young` holds `capacity` entries, `old` is dropped and
/// `young` becomes `old`. An entry used since then moves back to `young` when the dispatch
/// puts it back. So the `capacity` most recently used states are always kept, and at most
/// twice that many are held. A dispatch *takes* its entry out (no clone of the state) and puts the new state
/// back after its append, so a concurrent dispatch on the same aggregate reads the store.
pub(super) struct StateCache<S> {
    capacity: usize,
    generations: Mutex<Generations<S>>,
}

/// Keyed by ids that callers choose: a seeded hasher, much cheaper than SipHash.
type CacheMap<S> = HashMap<Uuid, Loaded<S>, foldhash::quality::RandomState>;

struct Generations<S> {
    young: CacheMap<S>,
    old: CacheMap<S>,
}

impl<S> StateCache<S> {
    pub(super) fn new(capacity: usize) -> Self {
        StateCache {
            capacity: capacity.max(2),
            generations: Mutex::new(Generations {
                young: CacheMap::default(),
                old: CacheMap::default(),
            }),
        }
    }

    /// How many states are kept at least (up to twice as many are held).
    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, Generations<S>> {
        // A poisoned lock means a panic elsewhere while it was held; the maps are still
        // valid maps, and a wrong entry is caught by the append's conflict check anyway.
        self.generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn take(&self, id: Uuid) -> Option<Loaded<S>> {
        let mut generations = self.lock();
        match generations.young.remove(&id) {
            Some(loaded) => Some(loaded),
            None => generations.old.remove(&id),
        }
    }

    pub(super) fn remove(&self, id: Uuid) {
        let mut generations = self.lock();
        generations.young.remove(&id);
        generations.old.remove(&id);
    }

    pub(super) fn put(&self, id: Uuid, loaded: Loaded<S>) {
        let mut generations = self.lock();
        let generations = &mut *generations;
        // The old generation is empty until the first eviction: no lookup there.
        let loaded = match (!generations.old.is_empty())
            .then(|| generations.old.remove(&id))
            .flatten()
        {
            Some(older) if older.sequence > loaded.sequence => older,
            _ => loaded,
        };
        if generations.young.len() >= self.capacity && !generations.young.contains_key(&id) {
            generations.old = std::mem::take(&mut generations.young);
        }
        // One lookup in the young generation for the usual put (an entry the dispatch took).
        match generations.young.entry(id) {
            Entry::Occupied(mut existing) => {
                // Another dispatch put a newer state meanwhile: keep it.
                if existing.get().sequence < loaded.sequence {
                    existing.insert(loaded);
                }
            }
            Entry::Vacant(vacant) => {
                vacant.insert(loaded);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let generations = self.lock();
        generations.young.len() + generations.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::{Loaded, StateCache};
    use uuid::Uuid;

    fn loaded(sequence: i64) -> Loaded<i64> {
        Loaded::new(sequence * 10, sequence)
    }

    #[test]
    fn cache_is_bounded_and_keeps_recently_used_entries() {
        let cache = StateCache::new(4);
        let hot = Uuid::new_v4();
        cache.put(hot, loaded(1));
        for n in 0..100 {
            cache.put(Uuid::new_v4(), loaded(n));
            // The hot entry is used on every round, as a dispatch would: taken, put back.
            let entry = cache.take(hot).expect("a recently used entry stays cached");
            cache.put(hot, entry);
            assert!(
                cache.len() <= 8,
                "{} entries for a capacity of 4",
                cache.len()
            );
        }
    }

    #[test]
    fn the_capacity_most_recently_used_entries_are_always_kept() {
        // Round robin over exactly `capacity` aggregates: every one stays cached.
        let cache = StateCache::new(16);
        let ids: Vec<Uuid> = (0..16).map(|_| Uuid::new_v4()).collect();
        for &id in &ids {
            cache.put(id, loaded(1));
        }
        for round in 2..10 {
            for &id in &ids {
                let entry = cache.take(id).expect("one of the 16 most recently used");
                cache.put(
                    id,
                    Loaded {
                        sequence: round,
                        ..entry
                    },
                );
            }
        }
    }

    #[test]
    fn an_older_state_never_replaces_a_newer_one() {
        let cache = StateCache::new(8);
        let id = Uuid::new_v4();
        cache.put(id, loaded(5));
        cache.put(id, loaded(3));
        assert_eq!(cache.take(id).map(|l| l.sequence), Some(5));
        assert!(cache.take(id).is_none(), "take removes the entry");
    }

    #[test]
    fn a_newer_state_in_the_old_generation_wins_over_an_older_put() {
        let cache = StateCache::new(2);
        let id = Uuid::new_v4();
        cache.put(id, loaded(7));
        // Fills the young generation so that `id` moves to the old one.
        cache.put(Uuid::new_v4(), loaded(1));
        cache.put(id, loaded(6));
        assert_eq!(cache.take(id).map(|l| (l.sequence, l.state)), Some((7, 70)));
    }
}
