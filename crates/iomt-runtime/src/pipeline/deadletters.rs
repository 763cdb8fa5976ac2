//! Dead letters: where they are kept (a local file, or a Blob container in cluster mode), the
//! task that makes records durable before their items are acknowledged, and the task that
//! turns an internal hub's deliveries into acknowledgements or dead letters.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use iomt_core::{Backoff, Measurement, Timestamp};
use iomt_eventhubs::blob::{BlobContainer, BlobError};
use iomt_files::deadletter::{DeadLetter, DeadLetterWriter, Stage, encode_new, parse_dead_letters};
use tokio::sync::mpsc;

use crate::config::DeadLetterTarget;

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

/// Where dead letters are kept.
#[derive(Debug)]
pub enum DeadLetterStore {
    /// A JSON Lines file, synced before a write returns.
    File(DeadLetterWriter),
    /// A Blob container: each batch one blob, written before a write returns.
    Blob(BlobDeadLetters),
}

impl DeadLetterStore {
    /// Opens the store a configuration names (a file is created and read; a container is
    /// created on the first write).
    pub fn open(target: &DeadLetterTarget) -> std::io::Result<Self> {
        Ok(match target {
            DeadLetterTarget::File(path) => Self::File(DeadLetterWriter::open(path)?),
            DeadLetterTarget::Blob(container) => {
                Self::Blob(BlobDeadLetters::new(container.clone()))
            }
        })
    }

    /// Makes the records not yet kept durable; returns how many were new.
    async fn write(self, records: Vec<DeadLetter>) -> (Self, Result<usize, String>) {
        match self {
            Self::File(mut writer) => {
                let joined = tokio::task::spawn_blocking(move || {
                    let result = writer.write(&records);
                    (writer, result)
                })
                .await;
                match joined {
                    Ok((writer, result)) => (Self::File(writer), result.map_err(|e| e.to_string())),
                    // The writer panicked (it does not): nothing to keep writing with.
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                }
            }
            Self::Blob(mut blob) => {
                let result = blob.write(&records).await.map_err(|e| e.to_string());
                (Self::Blob(blob), result)
            }
        }
    }

    /// The file or container, for messages (without credentials).
    pub fn describe(&self) -> String {
        match self {
            Self::File(w) => w.path().display().to_string(),
            Self::Blob(b) => b.container.url().to_string(),
        }
    }
}

impl From<DeadLetterWriter> for DeadLetterStore {
    fn from(writer: DeadLetterWriter) -> Self {
        Self::File(writer)
    }
}

/// Dead letters in a Blob container, in the file's JSON Lines format: each batch is one block
/// blob `pipeline/YYYY/MM/DD/HHMMSS-<hash of its records>.jsonl`, written with
/// `If-None-Match: *`.
///
/// A batch written again after a crash before its acknowledgement may be batched differently,
/// so a record can be in two blobs; [`read_blob_dead_letters`] keeps one of each.
#[derive(Debug)]
pub struct BlobDeadLetters {
    container: BlobContainer,
    ensured: bool,
    /// Keys written by this process, so that a redelivered item is not written twice; cleared
    /// when it grows large (the reader drops any copy that slips through).
    written: HashSet<u64>,
}

/// How many keys [`BlobDeadLetters`] remembers before it starts over.
const REMEMBERED_KEYS: usize = 1 << 20;

impl BlobDeadLetters {
    /// Dead letters in `container`.
    pub fn new(container: BlobContainer) -> Self {
        Self {
            container,
            ensured: false,
            written: HashSet::new(),
        }
    }

    /// Writes the records not yet written as one blob; returns how many were new.
    pub async fn write(&mut self, records: &[DeadLetter]) -> Result<usize, BlobError> {
        let (text, keys) = encode_new(records, &self.written);
        if keys.is_empty() {
            return Ok(0);
        }
        if !self.ensured {
            self.container.ensure().await?;
            self.ensured = true;
        }
        // The batch's own time, so that a retry of it lands on the same blob.
        let time = records.first().map_or_else(Timestamp::now, |r| r.time);
        let name = format!("{PIPELINE_PREFIX}{}", batch_name(time, &keys));
        self.container.put_once(&name, text.into_bytes()).await?;
        if self.written.len() + keys.len() > REMEMBERED_KEYS {
            self.written.clear();
        }
        self.written.extend(&keys);
        Ok(keys.len())
    }
}

/// Where the pipeline's dead letters are in the container; change events' dead letters are
/// under `events/<subscription>/`.
const PIPELINE_PREFIX: &str = "pipeline/";

/// A batch's blob name: its time (so names sort by time and a day can be listed by prefix),
/// then a hash of what identifies its records (so the same batch retried gets the same name).
pub(crate) fn batch_name(time: Timestamp, identity: &(impl std::hash::Hash + ?Sized)) -> String {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    identity.hash(&mut h);
    let text = time.to_string();
    let (date, clock) = (&text[..10], &text[11..19]);
    format!(
        "{}/{}-{:016x}.jsonl",
        date.replace('-', "/"),
        clock.replace(':', ""),
        h.finish()
    )
}

/// Every dead-letter record in a container, oldest blob first, each item once; lines that are
/// not records are named `blob:line`.
pub async fn read_blob_dead_letters(
    container: &BlobContainer,
) -> Result<(Vec<DeadLetter>, Vec<String>), BlobError> {
    let (mut records, mut unreadable, mut seen) = (Vec::new(), Vec::new(), HashSet::new());
    for name in container.names(PIPELINE_PREFIX).await? {
        let Some(text) = container.read_text(&name).await? else {
            continue;
        };
        let (read, bad) = parse_dead_letters(&text);
        records.extend(read.into_iter().filter(|r| seen.insert(r.key())));
        unreadable.extend(bad.into_iter().map(|line| format!("{name}:{line}")));
    }
    Ok((records, unreadable))
}

pub(super) async fn dead_letter_task<S: Sink>(
    mut rx: mpsc::Receiver<DeadLetters>,
    mut store: DeadLetterStore,
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
            let (kept, result) = store.write(records.clone()).await;
            store = kept;
            match result {
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(store = %store.describe(), error = %e, "cannot write dead letters; retrying");
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
