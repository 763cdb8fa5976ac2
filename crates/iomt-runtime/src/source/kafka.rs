//! Reading a Kafka topic as a source: the event log in cluster mode, when it is a Kafka topic.
//!
//! A consumer group spreads the topic's partitions over the processes reading it (the events
//! role's pods); each partition a process is assigned gets a slot in the partition table, and
//! its checkpoint is the group's committed offset, which KEDA's Kafka scaler reads for lag.
//! When a rebalance takes a partition away, its slot is closed before the partition goes:
//! what is in flight for it still completes, but its offsets are no longer committed here.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use iomt_core::{DeviceEvent, SourceEvent};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use super::{
    CheckpointError, CheckpointStore, Committed, Input, Origin, PartitionFailure, Partitions,
    SourceItem,
};

/// A librdkafka configuration: `brokers` and `properties` (security settings and the like).
pub(crate) fn client_config(brokers: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in properties {
        config.set(key, value);
    }
    config
}

/// Why the Kafka source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSourceError {
    /// The consumer could not be created or subscribed (librdkafka names settings, never
    /// their values).
    #[error("Kafka consumer: {0}")]
    Consumer(#[from] rdkafka::error::KafkaError),
}

/// Partition number to its slot in the partition table, shared with the rebalance callback.
type Slots = Arc<Mutex<HashMap<i32, u32>>>;

/// Closes the slots of partitions a rebalance revokes.
struct Rebalancing {
    partitions: Partitions,
    slots: Slots,
}

impl ClientContext for Rebalancing {}

impl ConsumerContext for Rebalancing {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            for element in list.elements() {
                if let Some(index) = slots.remove(&element.partition()) {
                    self.partitions.close(index);
                }
            }
        }
    }
}

/// A topic read in a consumer group.
pub struct KafkaSource {
    consumer: Arc<StreamConsumer<Rebalancing>>,
    topic: String,
    partitions: Partitions,
    slots: Slots,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// Joins `group` on `topic`; a group without committed offsets starts at the earliest.
    /// Returns the source and the checkpoint store that commits its positions.
    pub fn subscribe(
        config: &ClientConfig,
        topic: &str,
        group: &str,
        partitions: Partitions,
    ) -> Result<(Self, KafkaCheckpoints), KafkaSourceError> {
        let slots = Slots::default();
        let context = Rebalancing {
            partitions: partitions.clone(),
            slots: slots.clone(),
        };
        let consumer: StreamConsumer<Rebalancing> = config
            .clone()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create_with_context(context)?;
        consumer.subscribe(&[topic])?;
        let consumer = Arc::new(consumer);
        let checkpoints = KafkaCheckpoints {
            consumer: consumer.clone(),
            topic: topic.to_owned(),
        };
        Ok((
            Self {
                consumer,
                topic: topic.to_owned(),
                partitions,
                slots,
            },
            checkpoints,
        ))
    }

    /// The slot of a partition, opened at its first message since it was assigned.
    fn slot(&self, partition: i32) -> u32 {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        *slots
            .entry(partition)
            .or_insert_with(|| self.partitions.open(&partition.to_string()))
    }
}

impl super::Source for KafkaSource {
    type Error = KafkaSourceError;

    async fn run(
        self,
        tx: mpsc::Sender<Vec<SourceItem>>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<bool, KafkaSourceError> {
        loop {
            let message = tokio::select! {
                m = self.consumer.recv() => m,
                _ = stop.wait_for(|s| *s) => return Ok(false),
            };
            let message = match message {
                Ok(m) => m,
                // librdkafka recovers from broker errors by itself; say so and go on.
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "Kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let (partition, offset) = (message.partition(), message.offset());
            let item = SourceItem {
                origin: Origin {
                    partition: self.slot(partition),
                    position: offset,
                },
                input: Input::Event(SourceEvent {
                    partition: partition.to_string(),
                    sequence_number: offset,
                    offset: Some(offset.to_string()),
                    source: format!("{} partition {partition} offset {offset}", self.topic),
                    event: DeviceEvent {
                        body: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                        properties: Default::default(),
                        system_properties: Default::default(),
                        enqueued_time: None,
                    },
                }),
            };
            if tx.send(vec![item]).await.is_err() {
                return Ok(false);
            }
        }
    }
}

/// Commits a Kafka source's positions as its group's offsets (the next offset to read).
pub struct KafkaCheckpoints {
    consumer: Arc<StreamConsumer<Rebalancing>>,
    topic: String,
}

impl std::fmt::Debug for KafkaCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaCheckpoints")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl CheckpointStore for KafkaCheckpoints {
    async fn commit(&mut self, positions: &[Committed]) -> Result<(), CheckpointError> {
        let mut list = TopicPartitionList::new();
        for c in positions {
            if let Ok(partition) = c.partition.parse::<i32>() {
                list.add_partition_offset(&self.topic, partition, Offset::Offset(c.position + 1))
                    .ok();
            }
        }
        let consumer = self.consumer.clone();
        // A synchronous commit blocks its thread until the coordinator answers.
        let result = tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync))
            .await
            .unwrap_or(Err(rdkafka::error::KafkaError::Canceled));
        result.map_err(|e| {
            CheckpointError::Remote(
                positions
                    .iter()
                    .map(|c| PartitionFailure {
                        partition: c.partition.clone(),
                        // The group moved on: another member owns these partitions now.
                        ownership_lost: matches!(
                            e.rdkafka_error_code(),
                            Some(
                                rdkafka::types::RDKafkaErrorCode::RebalanceInProgress
                                    | rdkafka::types::RDKafkaErrorCode::IllegalGeneration
                                    | rdkafka::types::RDKafkaErrorCode::UnknownMemberId
                            )
                        ),
                        error: azure_core::Error::new(
                            azure_core::error::ErrorKind::Other,
                            e.clone(),
                        ),
                    })
                    .collect(),
            )
        })
    }
}
