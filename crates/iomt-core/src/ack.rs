//! In-order acknowledgement tracking: where a partition's checkpoint may safely move.
//!
//! Events are read in order but finish out of order: FHIR writes run concurrently, and one
//! event's measurements may sit in a group buffer for minutes while later events are already
//! written. A checkpoint at position P promises that nothing at or below P will ever need to be
//! read again, so it may only move to the highest position below which *every* event has been
//! written to FHIR or dead-lettered. [`AckTracker`] computes exactly that, per partition.
//!
//! Positions are the hub's sequence numbers: they increase by one per event within a
//! partition, but a reader may start anywhere and skip nothing after that.

use std::collections::VecDeque;

/// Why an ack was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The position was never registered as in flight (or was already acknowledged).
    #[error("position {0} is not in flight")]
    NotInFlight(i64),
    /// Positions must be registered in increasing order.
    #[error("position {got} registered after {last}")]
    OutOfOrder {
        /// The last registered position.
        last: i64,
        /// The rejected one.
        got: i64,
    },
}

/// Ordered acknowledgement tracking for one partition.
///
/// Positions are registered in increasing order, so the registered events form a queue sorted
/// by position: an ack finds its event by binary search, and the checkpoint moves as events at
/// the front finish. Every operation is a search and a few queue pops, without the per-event
/// tree nodes of a map.
#[derive(Debug, Clone, Default)]
pub struct AckTracker {
    /// Registered events past the checkpoint, in position order, with how many acks each
    /// still needs (0: done, waiting for an earlier event).
    queue: VecDeque<(i64, u32)>,
    /// Events in the queue that still need acks.
    in_flight: usize,
    /// The last registered position.
    last_registered: Option<i64>,
    /// The highest position below which everything registered is acknowledged.
    safe: Option<i64>,
}

impl AckTracker {
    /// Registers a read event that must be acknowledged `parts` times (one per measurement
    /// group or dead-letter record that came from it) before the checkpoint may pass it. An
    /// event that produced nothing (`parts == 0`) is done at once.
    pub fn register(&mut self, position: i64, parts: u32) -> Result<(), AckError> {
        if let Some(last) = self.last_registered
            && position <= last
        {
            return Err(AckError::OutOfOrder {
                last,
                got: position,
            });
        }
        self.last_registered = Some(position);
        self.queue.push_back((position, parts));
        if parts == 0 {
            self.advance();
        } else {
            self.in_flight += 1;
        }
        Ok(())
    }

    /// The queue index of an event still in flight.
    fn find(&self, position: i64) -> Result<usize, AckError> {
        // Sources number their events consecutively, so the offset from the front is nearly
        // always the index; a search covers gaps (a reader that skipped ahead).
        let guess = self
            .queue
            .front()
            .and_then(|&(first, _)| usize::try_from(position.checked_sub(first)?).ok())
            .filter(|&i| self.queue.get(i).is_some_and(|&(p, _)| p == position));
        let found = guess.or_else(|| self.queue.binary_search_by_key(&position, |&(p, _)| p).ok());
        match found {
            Some(i) if self.queue[i].1 > 0 => Ok(i),
            _ => Err(AckError::NotInFlight(position)),
        }
    }

    /// Adds parts to an event still in flight (its measurements split into more groups than
    /// first known).
    pub fn add_parts(&mut self, position: i64, parts: u32) -> Result<(), AckError> {
        let i = self.find(position)?;
        self.queue[i].1 += parts;
        Ok(())
    }

    /// One part of the event at `position` is durably written (or dead-lettered).
    pub fn ack(&mut self, position: i64) -> Result<(), AckError> {
        let i = self.find(position)?;
        self.queue[i].1 -= 1;
        if self.queue[i].1 == 0 {
            self.in_flight -= 1;
            if i == 0 {
                self.advance();
            }
        }
        Ok(())
    }

    fn advance(&mut self) {
        while let Some(&(position, 0)) = self.queue.front() {
            self.queue.pop_front();
            self.safe = Some(position);
        }
    }

    /// The position a checkpoint may be written at: every registered event at or below it is
    /// done. `None` while nothing is.
    pub fn checkpoint(&self) -> Option<i64> {
        self.safe
    }

    /// Events registered but not fully acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn checkpoint_waits_for_the_oldest_event() {
        let mut t = AckTracker::default();
        for p in 10..15 {
            t.register(p, 1).unwrap();
        }
        t.ack(12).unwrap();
        t.ack(11).unwrap();
        assert_eq!(t.checkpoint(), None, "10 is still in flight");
        t.ack(10).unwrap();
        assert_eq!(t.checkpoint(), Some(12));
        t.ack(14).unwrap();
        assert_eq!(t.checkpoint(), Some(12));
        t.ack(13).unwrap();
        assert_eq!(t.checkpoint(), Some(14));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn multi_part_events_and_empty_events() {
        let mut t = AckTracker::default();
        t.register(1, 2).unwrap();
        t.register(2, 0).unwrap();
        t.register(3, 1).unwrap();
        t.add_parts(1, 1).unwrap();
        t.ack(1).unwrap();
        t.ack(1).unwrap();
        t.ack(3).unwrap();
        assert_eq!(t.checkpoint(), None);
        t.ack(1).unwrap();
        assert_eq!(t.checkpoint(), Some(3));
        assert_eq!(t.ack(1), Err(AckError::NotInFlight(1)));
        assert_eq!(
            t.register(3, 1),
            Err(AckError::OutOfOrder { last: 3, got: 3 })
        );
    }

    proptest! {
        /// Whatever the order of acks, the checkpoint is always the highest position with
        /// every registered position at or below it acknowledged, and never moves back.
        #[test]
        fn checkpoint_is_the_contiguous_prefix(parts in prop::collection::vec(0u32..3, 1..40), seed in any::<u64>()) {
            let mut t = AckTracker::default();
            let mut acks = Vec::new();
            for (i, n) in parts.iter().enumerate() {
                t.register(i as i64, *n).unwrap();
                acks.extend(std::iter::repeat_n(i as i64, *n as usize));
            }
            // A deterministic shuffle.
            let mut state = seed;
            for i in (1..acks.len()).rev() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                acks.swap(i, (state >> 33) as usize % (i + 1));
            }
            let mut remaining: Vec<u32> = parts.clone();
            let mut previous = None;
            let expected = |remaining: &[u32]| -> Option<i64> {
                let prefix = remaining.iter().take_while(|r| **r == 0).count();
                (prefix > 0).then(|| prefix as i64 - 1)
            };
            prop_assert_eq!(t.checkpoint(), expected(&remaining));
            for p in acks {
                t.ack(p).unwrap();
                remaining[p as usize] -= 1;
                prop_assert_eq!(t.checkpoint(), expected(&remaining));
                prop_assert!(t.checkpoint() >= previous);
                previous = t.checkpoint();
            }
            prop_assert_eq!(t.checkpoint(), Some(parts.len() as i64 - 1));
        }
    }
}
