//! The source contract: what every source hands the pipeline, and how far the pipeline got.
//!
//! A source reads items in order per partition and sends them in batches ([`SourceItem`]:
//! an [`Input`] and its [`Origin`]). The pipeline acknowledges each item once its output is
//! durable; per partition, [`Partitions`] turns acknowledgements into the position a
//! checkpoint may move to ([`Committed`]), and a [`CheckpointStore`] records it. A restarted
//! source resumes after the checkpoint, so work may be repeated but is never skipped.
//!
//! The sources: capture files and standard input ([`files`]), dead-letter files
//! ([`deadletters`]), Event Hubs partitions ([`eventhubs`]), and Kafka topics ([`kafka`], the
//! event log of change events in cluster mode).

mod acks;
pub mod bulk;
pub mod changefeed;
pub mod checkpoint;
pub mod deadletters;
pub mod eventhubs;
pub mod files;
pub mod kafka;

use std::future::Future;

use iomt_core::{BadRecord, Measurement, SourceEvent};
use tokio::sync::{mpsc, watch};

pub(crate) use acks::Acks;
pub use acks::Partitions;
pub use checkpoint::{CheckpointError, CheckpointStore, FileCheckpoint, PartitionFailure};

/// A source of items for the pipeline.
pub trait Source: Send + 'static {
    /// Why the source failed.
    type Error: std::error::Error + Send + 'static;

    /// Sends items to `tx`, in batches, until the input ends (`Ok(true)`), the pipeline stops
    /// taking them or `stop` turns true (`Ok(false)`), or the source fails.
    fn run(
        self,
        tx: mpsc::Sender<Vec<SourceItem>>,
        stop: watch::Receiver<bool>,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;
}

/// Where the event behind a measurement was read: the source partition (an index into the
/// runtime's ack trackers) and its position there. Acknowledging an origin lets that
/// partition's checkpoint pass it once everything before it is acknowledged too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin {
    /// Source partition index.
    pub partition: u32,
    /// Position (sequence number or record ordinal) within the partition.
    pub position: i64,
}

/// What the source hands the pipeline.
#[derive(Debug, Clone)]
pub enum Input {
    /// A device event to normalize.
    Event(SourceEvent),
    /// A record that is not a readable event; it is dead-lettered.
    Bad(BadRecord),
    /// An already normalized measurement (a convert-stage dead letter being replayed).
    Measurement(Box<Measurement>),
}

/// One input item and where it was read.
#[derive(Debug, Clone)]
pub struct SourceItem {
    /// Its source partition and position, registered for checkpointing.
    pub origin: Origin,
    /// The item.
    pub input: Input,
}

/// A position that is safe to commit: every event of the partition up to it is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The partition's slot (what [`Origin::partition`] holds).
    pub index: u32,
    /// The partition's name (an Event Hubs partition id, `replay`, …).
    pub partition: String,
    /// The last position done.
    pub position: i64,
}
