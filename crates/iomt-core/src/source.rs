//! What a source reads: an event with the position it was read at, or a record that is not an
//! event. Every source makes these (capture files, Event Hubs partitions, dead-letter files),
//! and the pipeline and the dead-letter records take them, so they live here rather than with
//! any one source.

use serde_json::{Map, Value};

use crate::{DeviceEvent, Timestamp};

/// One event and where it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceEvent {
    /// The hub partition.
    pub partition: String,
    /// The position within the partition (the Event Hubs sequence number).
    pub sequence_number: i64,
    /// The Event Hubs offset, when the source has one.
    pub offset: Option<String>,
    /// `file:line`, `file#record` or `partition N #seq`, for messages and dead-letter records.
    pub source: String,
    /// The event.
    pub event: DeviceEvent,
}

/// A record that is not a readable event; it is dead-lettered with its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRecord {
    /// `file:line` or `file#record`.
    pub source: String,
    /// The partition, when known.
    pub partition: String,
    /// The position within the partition (line or record number when nothing better is known).
    pub sequence_number: i64,
    /// The raw bytes, kept for the dead-letter record.
    pub payload: Vec<u8>,
    /// What is wrong with it.
    pub reason: String,
}

/// The enqueued time recorded in an event's system properties (`x-opt-enqueued-time`).
pub fn enqueued_time(system_properties: &Map<String, Value>) -> Option<Timestamp> {
    system_properties
        .get("x-opt-enqueued-time")
        .and_then(Value::as_str)
        .and_then(|t| Timestamp::parse(t).ok())
}
