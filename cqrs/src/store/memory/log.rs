//! The in-memory store's events, in position order, in fixed-size chunks.
//!
//! One vector of every event doubles its allocation as the store grows, and each doubling
//! copies every event stored so far (about 240 bytes each) into memory no cache holds: as
//! much copying, over the store's life, as storing the events in the first place. Chunks of
//! [`CHUNK`] events are allocated once and never move; only the first grows by doubling,
//! so a small store stays small.

use std::ops::{Index, IndexMut};

use crate::event::PersistableDomainEvent;

/// Events per chunk (a power of two; about 1 MB of events).
const CHUNK: usize = 4096;

/// Every event of the store; an event's index is its position minus one.
#[derive(Debug, Default)]
pub(super) struct EventLog {
    /// Full chunks of [`CHUNK`] events, then the last one, never empty unless it is the
    /// only one.
    chunks: Vec<Vec<PersistableDomainEvent>>,
    len: usize,
}

impl EventLog {
    /// How many events the log holds.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The event at `index`, if there is one.
    pub(super) fn get(&self, index: usize) -> Option<&PersistableDomainEvent> {
        self.chunks.get(index / CHUNK)?.get(index % CHUNK)
    }

    /// The chunk the next event goes into.
    fn tail(&mut self) -> &mut Vec<PersistableDomainEvent> {
        if self.len % CHUNK == 0 && self.len / CHUNK == self.chunks.len() {
            // Every chunk is full (or there is none): the first grows by doubling, the
            // others are allocated whole.
            let capacity = if self.chunks.is_empty() { 0 } else { CHUNK };
            self.chunks.push(Vec::with_capacity(capacity));
        }
        let last = self.chunks.len() - 1;
        &mut self.chunks[last]
    }

    /// Adds one event at the end.
    pub(super) fn push(&mut self, event: PersistableDomainEvent) {
        self.tail().push(event);
        self.len += 1;
    }

    /// Moves every event of `events` to the end, in order, leaving `events` empty (its
    /// allocation kept).
    pub(super) fn append(&mut self, events: &mut Vec<PersistableDomainEvent>) {
        let room = CHUNK - self.len % CHUNK;
        if events.len() <= room {
            let count = events.len();
            self.tail().append(events);
            self.len += count;
        } else {
            for event in events.drain(..) {
                self.tail().push(event);
                self.len += 1;
            }
        }
    }

    /// Clones of the events from index `from` (inclusive) to `to` (exclusive), both within
    /// the log.
    pub(super) fn to_vec(&self, from: usize, to: usize) -> Vec<PersistableDomainEvent> {
        let to = to.min(self.len);
        let mut out = Vec::with_capacity(to.saturating_sub(from));
        let mut index = from;
        while index < to {
            let chunk = &self.chunks[index / CHUNK];
            let start = index % CHUNK;
            let end = chunk.len().min(start + (to - index));
            out.extend_from_slice(&chunk[start..end]);
            index += end - start;
        }
        out
    }
}

impl Index<usize> for EventLog {
    type Output = PersistableDomainEvent;

    fn index(&self, index: usize) -> &PersistableDomainEvent {
        &self.chunks[index / CHUNK][index % CHUNK]
    }
}

impl IndexMut<usize> for EventLog {
    fn index_mut(&mut self, index: usize) -> &mut PersistableDomainEvent {
        &mut self.chunks[index / CHUNK][index % CHUNK]
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::{EventLog, CHUNK};
    use crate::store::memory::tests::event;

    /// Events keep their order and indexes across chunk boundaries, whether pushed one by
    /// one or appended in batches that straddle a boundary, and ranges read across them.
    #[test]
    fn indexes_and_ranges_hold_across_chunks() {
        let mut log = EventLog::default();
        let mut ids = Vec::new();
        let id = Uuid::new_v4();
        for n in 0..CHUNK - 3 {
            let stored = event(id, 1);
            ids.push(stored.event_id);
            if n % 2 == 0 {
                log.push(stored);
            } else {
                log.append(&mut vec![stored]);
            }
        }
        // Straddles the first boundary; then a batch larger than a whole chunk.
        for size in [7, CHUNK + 5] {
            let mut batch: Vec<_> = (0..size).map(|_| event(id, 1)).collect();
            ids.extend(batch.iter().map(|e| e.event_id));
            log.append(&mut batch);
            assert!(batch.is_empty());
        }
        assert_eq!(log.len(), ids.len());
        assert_eq!(log.chunks.len(), 3);
        assert!(log.chunks[..2].iter().all(|chunk| chunk.len() == CHUNK));
        for (index, id) in ids.iter().enumerate() {
            assert_eq!(log[index].event_id, *id);
            assert_eq!(log.get(index).map(|e| e.event_id), Some(*id));
        }
        assert!(log.get(ids.len()).is_none());
        let across: Vec<Uuid> = log
            .to_vec(CHUNK - 2, 2 * CHUNK + 1)
            .iter()
            .map(|e| e.event_id)
            .collect();
        assert_eq!(across, ids[CHUNK - 2..2 * CHUNK + 1]);
        assert_eq!(log.to_vec(ids.len() - 1, ids.len() + 10).len(), 1);
        assert!(log.to_vec(ids.len(), ids.len() + 10).is_empty());
        log[CHUNK].sequence = 99;
        assert_eq!(log.get(CHUNK).map(|e| e.sequence), Some(99));
    }
}
