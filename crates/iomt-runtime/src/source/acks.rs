//! Ordered acknowledgement per source partition: which positions are done, and so where each
//! partition's checkpoint may move.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use iomt_core::ack::AckTracker;

use super::{Committed, Origin};
use crate::metrics::PartitionStats;

/// One source partition as the pipeline tracks it. A partition that is lost and taken again
/// gets a new slot, so acknowledgements still arriving for the old ownership never count
/// toward the new one.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) name: String,
    active: AtomicBool,
    tracker: Mutex<AckTracker>,
}

/// The source partitions a pipeline tracks, shared with the source that claims them.
#[derive(Debug, Clone)]
pub struct Partitions(pub(crate) Arc<Acks>);

impl Partitions {
    /// An empty partition table, for a reader that is not a pipeline (a subscription of the
    /// events role).
    pub(crate) fn new() -> Self {
        Self(Arc::default())
    }

    /// Starts tracking a partition just claimed; its events carry the returned index in
    /// [`Origin::partition`]. The partitions given to [`Pipeline::new`](crate::Pipeline::new) are 0, 1, ….
    pub fn open(&self, name: &str) -> u32 {
        self.0.open(name)
    }

    /// Stops committing checkpoints for a partition whose ownership was lost. Work in flight
    /// for it still completes; its new owner resumes from the last committed checkpoint.
    pub fn close(&self, index: u32) {
        self.0.close(index);
    }

    /// Whether the partitions' lag is reported: a pipeline's are, the event log readers of
    /// the events role are not.
    pub(crate) fn reports_lag(&self) -> bool {
        self.0.stats.is_some()
    }

    /// Reports the hub's newest sequence number of a partition (`None`: it is empty), from
    /// which its lag is computed.
    pub(crate) fn newest(&self, name: &str, newest: Option<i64>) {
        if let Some(stats) = &self.0.stats {
            stats.newest(name, newest);
        }
    }
}

/// Ordered acknowledgement per source partition.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    slots: RwLock<Vec<Arc<Slot>>>,
    /// Where the partitions' lag is reported (the pipeline's metrics).
    stats: Option<PartitionStats>,
}

impl Acks {
    /// A table whose partitions' lag and checkpoint age go to `stats`.
    pub(crate) fn with_stats(stats: PartitionStats) -> Self {
        Self {
            slots: RwLock::default(),
            stats: Some(stats),
        }
    }

    pub(crate) fn open(&self, name: &str) -> u32 {
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        slots.push(Arc::new(Slot {
            name: name.to_owned(),
            active: AtomicBool::new(true),
            tracker: Mutex::default(),
        }));
        (slots.len() - 1) as u32
    }

    pub(crate) fn slot(&self, index: u32) -> Option<Arc<Slot>> {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        slots.get(index as usize).cloned()
    }

    pub(crate) fn close(&self, index: u32) {
        if let Some(slot) = self.slot(index) {
            slot.active.store(false, Ordering::Relaxed);
        }
    }

    pub(crate) fn register(&self, items: &[(Origin, u32)]) {
        self.each_run(
            items.iter().map(|(o, parts)| (*o, *parts)),
            |t, position, parts| t.register(position, parts),
        );
    }

    pub(crate) fn ack(&self, origins: impl IntoIterator<Item = Origin>) {
        self.each_run(origins.into_iter().map(|o| (o, 0)), |t, position, _| {
            t.ack(position)
        });
    }

    /// Applies `f` to each origin's tracker. Origins come in runs of one partition (a batch,
    /// a group), so the slot is looked up and its tracker locked once per run, not once per
    /// measurement.
    pub(crate) fn each_run(
        &self,
        items: impl IntoIterator<Item = (Origin, u32)>,
        mut f: impl FnMut(&mut AckTracker, i64, u32) -> Result<(), iomt_core::ack::AckError>,
    ) {
        let mut items = items.into_iter().peekable();
        while let Some((first, parts)) = items.next() {
            let partition = first.partition;
            let Some(slot) = self.slot(partition) else {
                tracing::error!(partition, "an origin names an unknown partition");
                continue;
            };
            let mut tracker = slot.tracker.lock().unwrap_or_else(PoisonError::into_inner);
            let mut apply = |position, parts| {
                if let Err(e) = f(&mut tracker, position, parts) {
                    tracing::error!(partition, error = %e, "acknowledgement out of protocol");
                }
            };
            apply(first.position, parts);
            while let Some((next, parts)) = items.next_if(|(o, _)| o.partition == partition) {
                apply(next.position, parts);
            }
        }
    }

    /// Safe positions of the partitions still owned.
    pub(crate) fn committable(&self) -> Vec<Committed> {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.load(Ordering::Relaxed))
            .filter_map(|(i, s)| {
                let position = s.tracker.lock().ok()?.checkpoint()?;
                Some(Committed {
                    index: i as u32,
                    partition: s.name.clone(),
                    position,
                })
            })
            .collect()
    }

    pub(crate) fn positions(&self) -> BTreeMap<u32, i64> {
        self.committable()
            .into_iter()
            .map(|c| (c.index, c.position))
            .collect()
    }

    /// The partitions still owned, each with its events read and not yet done.
    pub(crate) fn owned(&self) -> Vec<(String, usize)> {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        slots
            .iter()
            .filter(|s| s.active.load(Ordering::Relaxed))
            .map(|s| {
                let in_flight = s.tracker.lock().map_or(0, |t| t.in_flight());
                (s.name.clone(), in_flight)
            })
            .collect()
    }

    pub(crate) fn in_flight(&self) -> usize {
        let slots = self.slots.read().unwrap_or_else(PoisonError::into_inner);
        slots
            .iter()
            .filter_map(|s| s.tracker.lock().ok().map(|t| t.in_flight()))
            .sum()
    }
}
