//! The event log of cluster mode, on an Event Hub or a Kafka topic: the convert role appends
//! one record per resource version it wrote, keyed by `Type/id`, and `iomt run --role events`
//! reads it once per subscription, each in its own consumer group with its own checkpoints.
//!
//! A record is the write as JSON (`resourceType`, `id`, `versionId`, `lastUpdated`, `action`).
//! An unchanged write is appended as the version it found (`Created` for version 1, `Updated`
//! otherwise) unless this process appended that version itself: after a crash between a FHIR
//! write and its append, the redone write comes back unchanged, and its append restores the
//! lost record, with the same event id. A duplicate record is harmless for the same reason.

use std::time::Duration;

use iomt_core::{Action, Written};
use iomt_eventhubs::producer::{Confirmed, Message, NotStored, ProducerOptions};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::EventLog;

/// Why an append did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RemoteLogError {
    /// The hub could not be opened.
    #[error(transparent)]
    Open(#[from] iomt_eventhubs::OpenError),
    /// A record was not stored on the hub.
    #[error("event log record not stored: {0}")]
    NotStored(#[from] NotStored),
    /// Kafka refused the producer's settings or a record (librdkafka names settings, never
    /// their values).
    #[error("event log on Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Where records go.
enum Sink {
    Hub {
        settings: iomt_eventhubs::EventHubSettings,
        producer: tokio::sync::OnceCell<Confirmed>,
    },
    Kafka {
        producer: FutureProducer,
        topic: String,
    },
}

/// The appending side of the event log of cluster mode.
pub struct RemoteLog {
    sink: Sink,
    /// Versions this process appended, so that an unchanged rewrite of one is not appended
    /// again; bounded, and empty after a restart (when a rewrite may be repairing a loss).
    appended: moka::future::Cache<(String, String, String), ()>,
}

impl std::fmt::Debug for RemoteLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.sink {
            Sink::Hub { .. } => "RemoteLog(Event Hub)",
            Sink::Kafka { .. } => "RemoteLog(Kafka)",
        })
    }
}

impl RemoteLog {
    /// The event log `log` names; an Event Hub is opened at the first append.
    pub fn new(log: &EventLog) -> Result<Self, RemoteLogError> {
        let sink = match log {
            EventLog::Hub(settings) => Sink::Hub {
                settings: settings.clone(),
                producer: tokio::sync::OnceCell::new(),
            },
            EventLog::Kafka(kafka) => Sink::Kafka {
                // Idempotent and acknowledged by every in-sync replica: a record the broker
                // confirms is there once.
                producer: crate::source::kafka::client_config(&kafka.brokers, &kafka.properties)
                    .set("enable.idempotence", "true")
                    .set("acks", "all")
                    .set("linger.ms", "5")
                    .create()?,
                topic: kafka.topic.clone(),
            },
        };
        Ok(Self {
            sink,
            appended: moka::future::Cache::new(200_000),
        })
    }

    /// Appends the records of `written`; returns once every one is stored.
    pub async fn append(&self, written: &[Written]) -> Result<(), RemoteLogError> {
        let key = |w: &Written| {
            (
                w.resource_type.clone(),
                w.id.clone(),
                w.version_id.clone().unwrap_or_default(),
            )
        };
        let records: Vec<(Message, _)> = written
            .iter()
            .filter(|w| w.action != Action::Unchanged || !self.appended.contains_key(&key(w)))
            .map(|w| (record(w), key(w)))
            .collect();
        if records.is_empty() {
            return Ok(());
        }
        let (messages, keys): (Vec<Message>, Vec<_>) = records.into_iter().unzip();
        match &self.sink {
            Sink::Hub { settings, producer } => {
                let producer = producer
                    .get_or_try_init(|| {
                        Confirmed::open(
                            settings.clone(),
                            ProducerOptions {
                                max_wait: Duration::from_millis(10),
                                ..Default::default()
                            },
                        )
                    })
                    .await?;
                for result in producer.send(messages).await {
                    result?;
                }
            }
            Sink::Kafka { producer, topic } => {
                let sends = messages.iter().map(|m| {
                    let key = m.partition_key.as_deref().unwrap_or_default();
                    let record = FutureRecord::to(topic).key(key).payload(&m.body);
                    // librdkafka retries within its own timeout (message.timeout.ms).
                    producer.send(record, Duration::from_secs(30))
                });
                for result in futures::future::join_all(sends).await {
                    result.map_err(|(e, _)| e)?;
                }
            }
        }
        for key in keys {
            self.appended.insert(key, ()).await;
        }
        Ok(())
    }
}

/// The record of a write.
fn record(w: &Written) -> Message {
    let mut w = w.clone();
    if w.action == Action::Unchanged {
        w.action = match w.version_id.as_deref() {
            Some("1") => Action::Created,
            _ => Action::Updated,
        };
    }
    Message {
        body: serde_json::to_vec(&w).unwrap_or_default(),
        content_type: Some("application/json".to_owned()),
        properties: Vec::new(),
        partition_key: Some(w.reference()),
    }
}

/// A record read back; `None` for anything else.
pub(crate) fn read_record(body: &[u8]) -> Option<Written> {
    serde_json::from_slice(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(version: &str, action: Action) -> Written {
        Written {
            resource_type: "Observation".into(),
            id: "o1".into(),
            version_id: Some(version.into()),
            last_updated: Some("2024-03-05T09:00:00Z".into()),
            action,
            identity: false,
        }
    }

    #[test]
    fn records_read_back_and_unchanged_writes_name_their_version() {
        let r = record(&written("3", Action::Updated));
        assert_eq!(r.partition_key.as_deref(), Some("Observation/o1"));
        assert_eq!(read_record(&r.body), Some(written("3", Action::Updated)));
        let first = record(&written("1", Action::Unchanged));
        assert_eq!(read_record(&first.body).unwrap().action, Action::Created);
        let later = record(&written("2", Action::Unchanged));
        assert_eq!(read_record(&later.body).unwrap().action, Action::Updated);
        assert_eq!(read_record(b"{\"not\":\"a record\"}"), None);
    }
}
