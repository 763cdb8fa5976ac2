//! The internal hub between normalize and convert.
//!
//! MedTech puts normalized measurements on an Event Hub partitioned by device, so that every
//! measurement of a device reaches the same group buffer. [`HubProducer`] and [`HubConsumer`]
//! are that contract; [`in_process`] implements it with bounded channels for embedded mode,
//! and [`eventhubs`] sends to an Event Hub in MedTech's wire format ([`iomt_core::wire`]) for
//! scale-out (the convert side reads that hub with the partition processor). Bounded channels are also the
//! pipeline's backpressure: a full partition stops the normalize task, which stops reading.

use std::future::Future;
use std::time::Instant;

use iomt_core::Measurement;
use tokio::sync::mpsc;

pub use crate::source::Origin;

pub mod eventhubs;

/// One normalized measurement in flight.
#[derive(Debug, Clone)]
pub struct HubMessage {
    /// The measurement.
    pub measurement: Measurement,
    /// Its source event, acknowledged after the measurement is written or dead-lettered.
    pub origin: Origin,
    /// When the source event was read, for the end-to-end latency.
    pub read_at: Instant,
}

/// Why a send failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// The consumer side is gone (the pipeline is shutting down).
    #[error("the internal hub is closed")]
    Closed,
}

/// What a hub between processes reports about the measurements it was given: stored (their
/// source events are done on this side), refused for good (they are dead-lettered), or failed
/// (the producer sends them again).
pub type Delivery = iomt_eventhubs::producer::Sent<HubMessage>;

/// The sending side of the internal hub.
pub trait HubProducer: Send + 'static {
    /// Number of partitions the sender routes to (1 for a hub that routes by device itself).
    fn partitions(&self) -> usize;

    /// Sends measurements to one partition; returns once the hub has accepted them (waiting
    /// while the partition is full).
    fn send(
        &mut self,
        partition: usize,
        batch: Vec<HubMessage>,
    ) -> impl Future<Output = Result<(), HubError>> + Send;

    /// For a hub that stores messages durably in another service (Event Hubs), the reports of
    /// what it stored, taken once. Their source events are then done when their measurements
    /// are stored, not when they are written to FHIR: the convert side checkpoints the hub
    /// itself. `None` for the in-process hub, whose messages are done once written.
    fn deliveries(&mut self) -> Option<mpsc::UnboundedReceiver<Delivery>> {
        None
    }

    /// Sends what is still buffered and waits until every message is stored or refused.
    fn close(self) -> impl Future<Output = ()> + Send
    where
        Self: Sized,
    {
        async {}
    }
}

/// The receiving side of one internal-hub partition.
pub trait HubConsumer: Send + 'static {
    /// The next batch, or `None` once the producer is gone and everything was received.
    fn recv(&mut self) -> impl Future<Output = Option<Vec<HubMessage>>> + Send;
}

/// The partition of a device: FNV-1a of its id. Stable across runs and platforms, so a
/// device's buffers always live in the same group task.
pub fn device_partition(device_id: &str, partitions: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device_id.as_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % partitions.max(1) as u64) as usize
}

/// The producer of the in-process hub.
#[derive(Debug)]
pub struct InProcessProducer {
    senders: Vec<mpsc::Sender<Vec<HubMessage>>>,
}

/// One partition's consumer of the in-process hub.
#[derive(Debug)]
pub struct InProcessConsumer {
    receiver: mpsc::Receiver<Vec<HubMessage>>,
}

/// An in-process hub with `partitions` partitions, each holding at most `capacity` batches.
pub fn in_process(
    partitions: usize,
    capacity: usize,
) -> (InProcessProducer, Vec<InProcessConsumer>) {
    let (senders, consumers) = (0..partitions.max(1))
        .map(|_| {
            let (tx, rx) = mpsc::channel(capacity.max(1));
            (tx, InProcessConsumer { receiver: rx })
        })
        .unzip();
    (InProcessProducer { senders }, consumers)
}

impl HubProducer for InProcessProducer {
    fn partitions(&self) -> usize {
        self.senders.len()
    }

    async fn send(&mut self, partition: usize, batch: Vec<HubMessage>) -> Result<(), HubError> {
        let sender = self.senders.get(partition).ok_or(HubError::Closed)?;
        sender.send(batch).await.map_err(|_| HubError::Closed)
    }
}

impl HubConsumer for InProcessConsumer {
    async fn recv(&mut self) -> Option<Vec<HubMessage>> {
        self.receiver.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_spread_over_partitions_and_stay_put() {
        let mut counts = [0usize; 4];
        for i in 0..1000 {
            let p = device_partition(&format!("device-{i}"), 4);
            assert_eq!(p, device_partition(&format!("device-{i}"), 4));
            counts[p] += 1;
        }
        assert!(counts.iter().all(|c| *c > 150), "{counts:?}");
        assert_eq!(device_partition("x", 0), 0);
    }
}
