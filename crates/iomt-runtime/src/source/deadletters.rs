//! A dead-letter file or container as a source, for `iomt deadletter replay`: each record re-enters the way
//! it first entered. An input record that could not be read is read again, a device event is
//! normalized again, a measurement is converted again (skipping the device mapping).

use std::path::Path;

use iomt_core::Measurement;
use iomt_eventhubs::blob::{BlobContainer, BlobError};
use iomt_files::capture::{Record, jsonl_record};
use iomt_files::deadletter::{DeadLetter, Entry, read_dead_letters};
use tokio::sync::{mpsc, watch};

use super::{Input, Origin, Source, SourceItem};

/// The items of a dead-letter file.
#[derive(Debug, Clone)]
pub struct DeadLetterSource {
    items: Vec<SourceItem>,
}

/// What reading a dead-letter file found besides items.
#[derive(Debug, Clone, Default)]
pub struct Unusable {
    /// Lines that are not dead-letter records: `line N` in a file, `blob:N` in a container.
    pub unreadable: Vec<String>,
    /// Records that cannot be re-submitted, and why.
    pub cannot_resubmit: Vec<String>,
}

impl DeadLetterSource {
    /// Reads a dead-letter file; records are numbered from 1 in one partition.
    pub fn read(path: &Path) -> std::io::Result<(Self, usize, Unusable)> {
        let (records, unreadable) = read_dead_letters(path)?;
        let unreadable = unreadable.iter().map(|n| format!("line {n}")).collect();
        Ok(Self::from_records(&records, unreadable))
    }

    /// Reads every dead letter of a container (cluster mode), each item once.
    pub async fn read_blob(
        container: &BlobContainer,
    ) -> Result<(Self, usize, Unusable), BlobError> {
        let (records, unreadable) = crate::pipeline::read_blob_dead_letters(container).await?;
        Ok(Self::from_records(&records, unreadable))
    }

    fn from_records(records: &[DeadLetter], unreadable: Vec<String>) -> (Self, usize, Unusable) {
        let mut items = Vec::with_capacity(records.len());
        let mut cannot_resubmit = Vec::new();
        for (i, record) in records.iter().enumerate() {
            let input = match record.entry {
                // Still unreadable, it is dead-lettered again.
                Entry::Record => {
                    let (file, line) = record.record_position();
                    match jsonl_record(&record.payload, &file, line) {
                        Record::Event(e) => Input::Event(e),
                        Record::Bad(b) => Input::Bad(b),
                    }
                }
                Entry::Event => Input::Event(record.to_event()),
                Entry::Measurement => {
                    match serde_json::from_slice::<Measurement>(&record.payload) {
                        Ok(m) => Input::Measurement(Box::new(m)),
                        Err(e) => {
                            cannot_resubmit.push(format!(
                                "record {} ({}): its payload is not a measurement ({e})",
                                i + 1,
                                record.kind
                            ));
                            continue;
                        }
                    }
                }
            };
            items.push(SourceItem {
                origin: Origin {
                    partition: 0,
                    position: i as i64 + 1,
                },
                input,
            });
        }
        let unusable = Unusable {
            unreadable,
            cannot_resubmit,
        };
        (Self { items }, records.len(), unusable)
    }
}

impl Source for DeadLetterSource {
    type Error = std::convert::Infallible;

    async fn run(
        self,
        tx: mpsc::Sender<Vec<SourceItem>>,
        _stop: watch::Receiver<bool>,
    ) -> Result<bool, Self::Error> {
        for chunk in self.items.chunks(256) {
            if tx.send(chunk.to_vec()).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
