//! The event log on an Event Hub, for cluster mode: the convert role appends one record per
//! resource version it wrote, keyed by `Type/id`, and `iomt run --role events` reads the hub
//! once per subscription, each in its own consumer group with its own checkpoints.
//!
//! A record is the write as JSON (`resourceType`, `id`, `versionId`, `lastUpdated`, `action`).
//! An unchanged write is appended as the version it found (`Created` for version 1, `Updated`
//! otherwise) unless this process appended that version itself: after a crash between a FHIR
//! write and its append, the redone write comes back unchanged, and its append restores the
//! lost record, with the same event id. A duplicate record is harmless for the same reason.

use iomt_core::{Action, Written};
use iomt_eventhubs::EventHubSettings;
use iomt_eventhubs::producer::{Confirmed, Message, NotStored, ProducerOptions};
use std::time::Duration;

/// Why an append did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HubLogError {
    /// The hub could not be opened.
    #[error(transparent)]
    Open(#[from] iomt_eventhubs::OpenError),
    /// A record was not stored.
    #[error("event log record not stored: {0}")]
    NotStored(#[from] NotStored),
}

/// The appending side of an event log on an Event Hub.
#[derive(Debug)]
pub struct HubLog {
    settings: EventHubSettings,
    producer: tokio::sync::OnceCell<Confirmed>,
    /// Versions this process appended, so that an unchanged rewrite of one is not appended
    /// again; bounded, and empty after a restart (when a rewrite may be repairing a loss).
    appended: moka::future::Cache<(String, String, String), ()>,
}

impl HubLog {
    /// An event log on the hub of `settings`, opened at the first append.
    pub fn new(settings: EventHubSettings) -> Self {
        Self {
            settings,
            producer: tokio::sync::OnceCell::new(),
            appended: moka::future::Cache::new(200_000),
        }
    }

    /// Appends the records of `written`; returns once the hub stored every one.
    pub async fn append(&self, written: &[Written]) -> Result<(), HubLogError> {
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
        let producer = self
            .producer
            .get_or_try_init(|| {
                Confirmed::open(
                    self.settings.clone(),
                    ProducerOptions {
                        max_wait: Duration::from_millis(10),
                        ..Default::default()
                    },
                )
            })
            .await?;
        let (messages, keys): (Vec<Message>, Vec<_>) = records.into_iter().unzip();
        for (result, key) in producer.send(messages).await.into_iter().zip(keys) {
            result?;
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
