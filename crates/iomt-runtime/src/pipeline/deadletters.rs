//! Dead letters: the task that makes records durable before their items are acknowledged, and
//! the task that turns an internal hub's deliveries into acknowledgements or dead letters.

use std::sync::Arc;
use std::time::Duration;

use iomt_core::{Backoff, Measurement, Timestamp};
use iomt_files::deadletter::{DeadLetter, DeadLetterWriter, Stage};
use tokio::sync::mpsc;

use super::Shared;
use crate::hub::Delivery;
use crate::sink::Sink;
use crate::source::Origin;

/// Dead-letter records and the origins to acknowledge once they are durable.
#[derive(Debug)]
pub(super) struct DeadLetters {
    pub(super) records: Vec<DeadLetter>,
    pub(super) origins: Vec<Origin>,
}

/// The error MedTech reports when normalized events cannot be written to its internal hub.
const HUB_SEND_ERROR: &str = "EventHubProducerClientException";

/// Acknowledges measurements a hub between processes stored, and dead-letters those it
/// refused.
pub(super) async fn delivery_task<S: Sink>(
    mut deliveries: mpsc::UnboundedReceiver<Delivery>,
    dead_letters: mpsc::Sender<DeadLetters>,
    shared: Arc<Shared<S>>,
) {
    while let Some(delivery) = deliveries.recv().await {
        match delivery {
            Delivery::Stored(messages) => shared.acks.ack(messages.iter().map(|m| m.origin)),
            Delivery::Failed { messages, error } => {
                shared.metrics.error(HUB_SEND_ERROR, "Normalization");
                tracing::debug!(messages, %error, "internal hub send failed; retrying");
            }
            Delivery::Refused { messages, reason } => {
                shared.metrics.error(HUB_SEND_ERROR, "Normalization");
                let now = Timestamp::now();
                let records = messages
                    .iter()
                    .map(|m| {
                        measurement_dead_letter(
                            &shared,
                            Stage::Normalize,
                            &m.measurement,
                            m.origin,
                            (HUB_SEND_ERROR, &reason, None),
                            now,
                        )
                    })
                    .collect();
                let origins = messages.iter().map(|m| m.origin).collect();
                if dead_letters
                    .send(DeadLetters { records, origins })
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "dead-letter sink closed; refused measurements will be replayed"
                    );
                }
            }
        }
    }
}

/// The dead-letter record of one measurement: what failed (`kind`, `message`, `template`)
/// and the source event it came from.
pub(super) fn measurement_dead_letter<S>(
    shared: &Shared<S>,
    stage: Stage,
    measurement: &Measurement,
    origin: Origin,
    failure: (&str, &str, Option<&str>),
    time: Timestamp,
) -> DeadLetter {
    let partition = shared
        .acks
        .slot(origin.partition)
        .map_or_else(|| origin.partition.to_string(), |s| s.name.clone());
    DeadLetter::measurement(
        stage,
        measurement,
        (partition, origin.position),
        failure,
        time,
    )
}

pub(super) async fn dead_letter_task<S: Sink>(
    mut rx: mpsc::Receiver<DeadLetters>,
    mut writer: DeadLetterWriter,
    shared: Arc<Shared<S>>,
) {
    while let Some(first) = rx.recv().await {
        let mut batches = vec![first];
        while batches.len() < 64 {
            match rx.try_recv() {
                Ok(b) => batches.push(b),
                Err(_) => break,
            }
        }
        let records: Vec<DeadLetter> = batches
            .iter_mut()
            .flat_map(|b| std::mem::take(&mut b.records))
            .collect();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let (w, result) = match tokio::task::spawn_blocking({
                let records = records.clone();
                move || {
                    let result = writer.write(&records);
                    (writer, result)
                }
            })
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "dead-letter writer failed");
                    return;
                }
            };
            writer = w;
            match result {
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(path = %writer.path().display(), error = %e, "cannot write dead letters; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        for r in &records {
            shared.metrics.dead_letter(r.stage.name(), &r.kind, 1);
        }
        for b in batches {
            shared.acks.ack(b.origins);
        }
    }
}
