//! The internal hub on Azure Event Hubs: normalized measurements go out in MedTech's wire
//! format with MedTech's device partition key, so every measurement of a device lands on one
//! partition and the convert side (which reads the hub with the partition processor) sees all
//! of them. Sending, retries and outcome reports are [`iomt_eventhubs::producer`]'s: a
//! measurement's source event is checkpointed once the hub reports it stored, and one the hub
//! refuses (too large) is dead-lettered.

use azure_core::Uuid;
use azure_messaging_eventhubs::models::EventData;
use iomt_core::wire;
pub use iomt_eventhubs::producer::ProducerOptions;
use iomt_eventhubs::producer::{Outbound, Producer};
use iomt_eventhubs::{EventHubSettings, OpenError};
use tokio::sync::mpsc;

use super::{Delivery, HubError, HubMessage, HubProducer};

impl Outbound for HubMessage {
    fn event(&self, message_id: Uuid) -> EventData {
        EventData::builder()
            .with_body(wire::encode(&self.measurement))
            .with_content_type("application/json".to_owned())
            .with_message_id(message_id)
            .build()
    }

    fn partition_key(&self) -> Option<String> {
        Some(self.measurement.partition_key())
    }
}

/// The producer side of an internal hub on Event Hubs.
#[derive(Debug)]
pub struct EventHubsProducer(Producer<HubMessage>);

impl EventHubsProducer {
    /// Opens the hub (failing fast on a hub that cannot be opened) and starts sending.
    pub async fn open(
        settings: EventHubSettings,
        options: ProducerOptions,
    ) -> Result<Self, OpenError> {
        Producer::open(settings, options).await.map(Self)
    }
}

impl HubProducer for EventHubsProducer {
    fn partitions(&self) -> usize {
        // The partition key routes each measurement; the caller need not.
        1
    }

    async fn send(&mut self, _partition: usize, batch: Vec<HubMessage>) -> Result<(), HubError> {
        self.0.send(batch).await.map_err(|_| HubError::Closed)
    }

    fn deliveries(&mut self) -> Option<mpsc::UnboundedReceiver<Delivery>> {
        self.0.reports()
    }

    async fn close(self) {
        self.0.close().await;
    }
}
