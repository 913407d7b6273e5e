//! The in-memory store's index of event ids.

use std::hash::BuildHasher;

use hashbrown::hash_table::{Entry, HashTable};
use uuid::Uuid;

use super::log::EventLog;

/// Which stored event carries a given id: what finds a retried append and refuses an id
/// that is taken.
///
/// A slot is 8 bytes, a 32-bit hash of the id and the event's index in the store; the id
/// itself is read from the event when a slot's hash matches. A map from id to index takes
/// 24 bytes a slot, and each new id lands on a random slot: at 100,000 events that table
/// no longer fits a core's 2 MiB L2 cache, and in a profile of cached in-memory dispatch
/// the append's miss on it was about a tenth of the command. Indexes are `u32`: the store
/// refuses an append past `u32::MAX` events.
#[derive(Debug, Default)]
pub(super) struct IdIndex {
    table: HashTable<Slot>,
    hasher: foldhash::quality::RandomState,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// The low 32 bits of the id's hash.
    tag: u32,
    /// The event's index in the store.
    index: u32,
}

impl Slot {
    /// Whether this slot is the one of `id`: its event (when stored) carries `id`.
    fn is(self, tag: u32, id: Uuid, events: &EventLog) -> bool {
        self.tag == tag
            && events
                .get(self.index as usize)
                .is_some_and(|event| event.event_id == id)
    }
}

impl IdIndex {
    fn tag(&self, id: Uuid) -> u32 {
        self.hasher.hash_one(id) as u32
    }

    /// The table's 64-bit hash of a slot, from its tag alone, so that growing the table reads
    /// no event. The table takes the bucket from the low bits (the tag's, which the
    /// multiplication by an odd number permutes) and a control byte from the top 7 (mixed
    /// from all of the tag's bits).
    fn spread(tag: u32) -> u64 {
        u64::from(tag).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// The index of the stored event carrying `id`.
    pub(super) fn get(&self, id: Uuid, events: &EventLog) -> Option<usize> {
        let tag = self.tag(id);
        self.table
            .find(Self::spread(tag), |slot| slot.is(tag, id, events))
            .map(|slot| slot.index as usize)
    }

    /// Records that the event to be stored at `index` carries `id`, unless a stored event
    /// already does: then nothing changes and the answer is that event's index.
    ///
    /// An id recorded for an event not stored yet (a batch being appended) is matched by
    /// no lookup until the event is in `events`; a batch's own ids are distinct.
    pub(super) fn insert(&mut self, id: Uuid, index: u32, events: &EventLog) -> Result<(), usize> {
        let tag = self.tag(id);
        match self.table.entry(
            Self::spread(tag),
            |slot| slot.is(tag, id, events),
            |slot| Self::spread(slot.tag),
        ) {
            Entry::Occupied(taken) => Err(taken.get().index as usize),
            Entry::Vacant(slot) => {
                slot.insert(Slot { tag, index });
                Ok(())
            }
        }
    }

    /// Records `id` for the event at `index`, taking the id from any event that had it (the
    /// test hook that stores an event bypassing every check).
    pub(super) fn replace(&mut self, id: Uuid, index: u32, events: &EventLog) {
        if let Err(earlier) = self.insert(id, index, events) {
            let tag = self.tag(id);
            if let Some(slot) = self.table.find_mut(Self::spread(tag), |slot| {
                slot.tag == tag && slot.index as usize == earlier
            }) {
                slot.index = index;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::IdIndex;
    use crate::event::PersistableDomainEvent;
    use crate::store::memory::log::EventLog;
    use uuid::Uuid;

    fn event(id: Uuid) -> PersistableDomainEvent {
        PersistableDomainEvent {
            event_id: id,
            ..crate::store::memory::tests::event(Uuid::new_v4(), 1)
        }
    }

    fn log(events: &[PersistableDomainEvent]) -> EventLog {
        let mut log = EventLog::default();
        log.append(&mut events.to_vec());
        log
    }

    #[test]
    fn finds_every_stored_id_and_refuses_a_taken_one() {
        let mut index = IdIndex::default();
        let mut events = EventLog::default();
        // Enough ids for the table to grow several times: growing rehashes from tags.
        for n in 0..5_000u32 {
            let id = Uuid::new_v4();
            assert_eq!(index.insert(id, n, &events), Ok(()));
            events.push(event(id));
        }
        for n in 0..events.len() {
            let id = events[n].event_id;
            assert_eq!(index.get(id, &events), Some(n));
            assert_eq!(index.insert(id, 9_999, &events), Err(n));
        }
        assert_eq!(index.get(Uuid::new_v4(), &events), None);
    }

    #[test]
    fn an_id_recorded_for_an_event_not_stored_yet_is_not_found() {
        let mut index = IdIndex::default();
        let id = Uuid::new_v4();
        assert_eq!(index.insert(id, 0, &log(&[])), Ok(()));
        assert_eq!(index.get(id, &log(&[])), None);
        assert_eq!(index.get(id, &log(&[event(id)])), Some(0));
    }

    #[test]
    fn replace_moves_an_id_to_the_later_event() {
        let mut index = IdIndex::default();
        let id = Uuid::new_v4();
        let events = vec![event(id), event(id)];
        index.replace(id, 0, &log(&events[..0]));
        index.replace(id, 1, &log(&events[..1]));
        assert_eq!(index.get(id, &log(&events[..1])), None);
        assert_eq!(index.get(id, &log(&events)), Some(1));
    }
}
