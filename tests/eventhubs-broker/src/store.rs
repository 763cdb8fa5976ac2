//! The in-memory event log: hubs, partitions, and the events they retain.
//!
//! Every event is kept for the life of the broker, so `begin_sequence_number` is always 0.
//! Sequence numbers count from 0 per partition. Offsets are byte positions in a notional log
//! where each event takes its body length (at least one byte): numeric strings that grow with the
//! data, like the service's, and never equal the sequence number once bodies are bigger than a
//! byte, so a client that confuses the two is caught.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fe2o3_amqp::types::{
    messaging::{Body, Message},
    primitives::Value,
};
use tokio::sync::watch;

use crate::{
    error::Error,
    filter::{SelectorField, SelectorValue, StartSelector},
    hash::partition_index_for_key,
};

/// A decoded AMQP message as clients send and receive it.
pub(crate) type AmqpMessage = Message<Body<Value>>;

/// One stored event.
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) sequence_number: i64,
    pub(crate) offset: i64,
    pub(crate) enqueued_time_ms: i64,
    pub(crate) partition_key: Option<String>,
    pub(crate) message: AmqpMessage,
}

/// A partition's position summary, as `$management` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    /// The first retained sequence number: 0, since nothing expires.
    pub begin_sequence_number: i64,
    /// The last sequence number, or -1 when the partition is empty.
    pub last_enqueued_sequence_number: i64,
    /// The last offset, or `"-1"` when the partition is empty.
    pub last_enqueued_offset: String,
    /// When the last event was enqueued (millisecond precision), if any.
    pub last_enqueued_time: Option<SystemTime>,
    /// How many events the partition holds.
    pub count: u64,
}

impl PartitionState {
    /// Whether the partition holds no event.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A stored event, for test assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// The sequence number within its partition.
    pub sequence_number: i64,
    /// The offset, as delivered in `x-opt-offset`.
    pub offset: String,
    /// The enqueued time, as delivered in `x-opt-enqueued-time` (millisecond precision).
    pub enqueued_time: SystemTime,
    /// The `x-opt-partition-key` the producer set, if any.
    pub partition_key: Option<String>,
    /// The body: the concatenated Data sections, or a binary or string AMQP value.
    pub body: Vec<u8>,
    /// The application properties with string values.
    pub properties: std::collections::BTreeMap<String, String>,
    /// The `content-type` property, if any.
    pub content_type: Option<String>,
}

/// The string-valued application properties of a message.
fn string_properties(message: &AmqpMessage) -> std::collections::BTreeMap<String, String> {
    let Some(properties) = message.application_properties.as_ref() else {
        return Default::default();
    };
    properties
        .0
        .iter()
        .filter_map(|(k, v)| match v {
            fe2o3_amqp::types::primitives::SimpleValue::String(s) => Some((k.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

/// The body bytes of a message, as tests see them.
fn body_bytes(message: &AmqpMessage) -> Vec<u8> {
    match &message.body {
        Body::Data(sections) => sections.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(value) => match &value.0 {
            Value::Binary(bytes) => bytes.to_vec(),
            Value::String(text) => text.as_bytes().to_vec(),
            _ => Vec::new(),
        },
        Body::Sequence(_) | Body::Empty => Vec::new(),
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub(crate) fn system_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

#[derive(Debug, Default)]
struct Log {
    records: Vec<Arc<Record>>,
    next_offset: i64,
}

/// One partition of a hub.
#[derive(Debug)]
pub(crate) struct Partition {
    pub(crate) id: String,
    log: Mutex<Log>,
    /// Carries the event count, so readers can wait for new events without polling.
    appended: watch::Sender<usize>,
}

impl Partition {
    fn new(id: String) -> Self {
        Self {
            id,
            log: Mutex::new(Log::default()),
            appended: watch::channel(0).0,
        }
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        // A panic while holding this lock cannot leave the log half-written (appends push whole
        // records), so a poisoned lock is still consistent.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a batch atomically, all with the same enqueued time, as the service stores a
    /// batch. Returns the sequence number of the first event.
    pub(crate) fn append(&self, events: Vec<(Option<String>, AmqpMessage)>) -> i64 {
        let enqueued_time_ms = now_ms();
        let mut log = self.log();
        let first = log.records.len() as i64;
        for (partition_key, message) in events {
            let size = body_bytes(&message).len().max(1) as i64;
            let record = Record {
                sequence_number: log.records.len() as i64,
                offset: log.next_offset,
                enqueued_time_ms,
                partition_key,
                message,
            };
            log.next_offset += size;
            log.records.push(Arc::new(record));
        }
        let count = log.records.len();
        drop(log);
        self.appended.send_replace(count);
        first
    }

    /// Up to `max` records starting at index `from`.
    pub(crate) fn read(&self, from: usize, max: usize) -> Vec<Arc<Record>> {
        let log = self.log();
        log.records.iter().skip(from).take(max).cloned().collect()
    }

    /// A receiver that changes whenever events are appended.
    pub(crate) fn subscribe(&self) -> watch::Receiver<usize> {
        self.appended.subscribe()
    }

    /// The index of the first event a reader with `selector` receives.
    pub(crate) fn start_index(&self, selector: &StartSelector) -> usize {
        let log = self.log();
        let records = &log.records;
        let number = match selector.value {
            SelectorValue::Latest => return records.len(),
            SelectorValue::Number(n) => n,
        };
        let key = |r: &Record| match selector.field {
            SelectorField::Offset => r.offset,
            SelectorField::SequenceNumber => r.sequence_number,
            SelectorField::EnqueuedTime => r.enqueued_time_ms,
        };
        // All three keys grow monotonically with the index, so a partition point is exact.
        records.partition_point(|r| {
            if selector.inclusive {
                key(r) < number
            } else {
                key(r) <= number
            }
        })
    }

    pub(crate) fn state(&self) -> PartitionState {
        let log = self.log();
        match log.records.last() {
            Some(last) => PartitionState {
                begin_sequence_number: 0,
                last_enqueued_sequence_number: last.sequence_number,
                last_enqueued_offset: last.offset.to_string(),
                last_enqueued_time: Some(system_time(last.enqueued_time_ms)),
                count: log.records.len() as u64,
            },
            None => PartitionState {
                begin_sequence_number: 0,
                last_enqueued_sequence_number: -1,
                last_enqueued_offset: "-1".to_owned(),
                last_enqueued_time: None,
                count: 0,
            },
        }
    }

    pub(crate) fn events(&self) -> Vec<StoredEvent> {
        let log = self.log();
        log.records
            .iter()
            .map(|r| StoredEvent {
                sequence_number: r.sequence_number,
                offset: r.offset.to_string(),
                enqueued_time: system_time(r.enqueued_time_ms),
                partition_key: r.partition_key.clone(),
                body: body_bytes(&r.message),
                properties: string_properties(&r.message),
                content_type: r
                    .message
                    .properties
                    .as_ref()
                    .and_then(|p| p.content_type.as_ref())
                    .map(|t| t.0.clone()),
            })
            .collect()
    }
}

/// One event hub.
#[derive(Debug)]
pub(crate) struct Hub {
    /// The name as configured (lookups ignore case, as the service's do).
    pub(crate) name: String,
    pub(crate) partitions: Vec<Arc<Partition>>,
    next_round_robin: AtomicUsize,
}

impl Hub {
    pub(crate) fn partition(&self, id: &str) -> Option<&Arc<Partition>> {
        self.partitions.iter().find(|p| p.id == id)
    }

    /// The partition for a send to the hub itself: by key hash, or round robin without a key.
    pub(crate) fn route(&self, partition_key: Option<&str>) -> &Arc<Partition> {
        let index = match partition_key {
            Some(key) => partition_index_for_key(key, self.partitions.len()),
            None => self.next_round_robin.fetch_add(1, Ordering::Relaxed) % self.partitions.len(),
        };
        &self.partitions[index]
    }
}

/// A hub to create when the broker starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// The event hub name.
    pub name: String,
    /// How many partitions it has (ids `"0"`..`"n-1"`).
    pub partition_count: u32,
}

impl std::str::FromStr for HubConfig {
    type Err = Error;

    /// Parses `NAME:PARTITIONS`, the binary's `--hub` syntax.
    fn from_str(spec: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidHub {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let (name, count) = spec
            .rsplit_once(':')
            .ok_or_else(|| invalid("expected NAME:PARTITIONS"))?;
        let partition_count = count
            .parse::<u32>()
            .map_err(|_| invalid("the partition count is not a number"))?;
        Self::new(name, partition_count)
    }
}

impl HubConfig {
    /// A hub named `name` with `partition_count` partitions (1 to 1024).
    pub fn new(name: impl Into<String>, partition_count: u32) -> Result<Self, Error> {
        let name = name.into();
        let invalid = |reason: &str| Error::InvalidHub {
            spec: format!("{name}:{partition_count}"),
            reason: reason.to_owned(),
        };
        if name.is_empty() || name.contains(['/', '?', '#', ':']) || name.starts_with('$') {
            return Err(invalid(
                "the name must be non-empty, not start with $, and hold no / ? # :",
            ));
        }
        if !(1..=1024).contains(&partition_count) {
            return Err(invalid("the partition count must be between 1 and 1024"));
        }
        Ok(Self {
            name,
            partition_count,
        })
    }
}

/// All hubs. The set is fixed at start; only the logs change.
#[derive(Debug)]
pub(crate) struct Store {
    hubs: BTreeMap<String, Hub>,
    pub(crate) created_at_ms: i64,
}

impl Store {
    pub(crate) fn new(configs: &[HubConfig]) -> Result<Self, Error> {
        let mut hubs = BTreeMap::new();
        for config in configs {
            let hub = Hub {
                name: config.name.clone(),
                partitions: (0..config.partition_count)
                    .map(|i| Arc::new(Partition::new(i.to_string())))
                    .collect(),
                next_round_robin: AtomicUsize::new(0),
            };
            if hubs.insert(config.name.to_lowercase(), hub).is_some() {
                return Err(Error::InvalidHub {
                    spec: config.name.clone(),
                    reason: "the hub is configured twice".to_owned(),
                });
            }
        }
        Ok(Self {
            hubs,
            created_at_ms: now_ms(),
        })
    }

    pub(crate) fn hub(&self, name: &str) -> Option<&Hub> {
        self.hubs.get(&name.to_lowercase())
    }

    pub(crate) fn partition(&self, hub: &str, partition: &str) -> Result<&Arc<Partition>, Error> {
        let found = self
            .hub(hub)
            .ok_or_else(|| Error::UnknownHub(hub.to_owned()))?;
        found
            .partition(partition)
            .ok_or_else(|| Error::UnknownPartition {
                hub: hub.to_owned(),
                partition: partition.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp::types::{messaging::Data, primitives::Binary};

    use super::*;

    fn message(body: &[u8]) -> AmqpMessage {
        Message::builder()
            .body(Body::Data(vec![Data(Binary::from(body.to_vec()))].into()))
            .build()
    }

    fn selector(field: SelectorField, inclusive: bool, value: i64) -> StartSelector {
        StartSelector {
            field,
            inclusive,
            value: SelectorValue::Number(value),
        }
    }

    #[test]
    fn empty_partition_state_matches_the_service() {
        let partition = Partition::new("0".into());
        let state = partition.state();
        assert_eq!(state.begin_sequence_number, 0);
        assert_eq!(state.last_enqueued_sequence_number, -1);
        assert_eq!(state.last_enqueued_offset, "-1");
        assert_eq!(state.last_enqueued_time, None);
        assert!(state.is_empty());
    }

    #[test]
    fn sequence_numbers_and_offsets_grow() {
        let partition = Partition::new("0".into());
        assert_eq!(partition.append(vec![(None, message(b"abc"))]), 0);
        assert_eq!(
            partition.append(vec![
                (None, message(b"")),
                (Some("k".into()), message(b"hello"))
            ]),
            1
        );
        let events = partition.events();
        let offsets: Vec<&str> = events.iter().map(|e| e.offset.as_str()).collect();
        assert_eq!(offsets, ["0", "3", "4"]);
        assert_eq!(events[2].partition_key.as_deref(), Some("k"));
        assert_eq!(events[2].body, b"hello");
        assert_eq!(partition.state().last_enqueued_sequence_number, 2);
        assert_eq!(partition.state().last_enqueued_offset, "4");
    }

    #[test]
    fn start_index_follows_the_selector() {
        let partition = Partition::new("0".into());
        partition.append(vec![(None, message(b"aa")), (None, message(b"bb"))]);
        partition.append(vec![(None, message(b"cc"))]);
        // Offsets are 0, 2, 4.
        let earliest = selector(SelectorField::Offset, false, -1);
        assert_eq!(partition.start_index(&earliest), 0);
        assert_eq!(partition.start_index(&StartSelector::LATEST), 3);
        assert_eq!(
            partition.start_index(&selector(SelectorField::Offset, false, 2)),
            2
        );
        assert_eq!(
            partition.start_index(&selector(SelectorField::Offset, true, 2)),
            1
        );
        assert_eq!(
            partition.start_index(&selector(SelectorField::Offset, false, 1)),
            1
        );
        let seq = SelectorField::SequenceNumber;
        assert_eq!(partition.start_index(&selector(seq, true, 1)), 1);
        assert_eq!(partition.start_index(&selector(seq, false, 1)), 2);
        assert_eq!(partition.start_index(&selector(seq, false, 99)), 3);
        let time = partition.events()[2].enqueued_time;
        let ms = time.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        let enqueued = SelectorField::EnqueuedTime;
        // Events 0 and 1 share a batch time; event 2 may fall in the same millisecond.
        assert!(partition.start_index(&selector(enqueued, true, ms)) <= 2);
        assert_eq!(partition.start_index(&selector(enqueued, false, ms)), 3);
    }

    #[test]
    fn hub_routes_keys_like_the_sdk_and_round_robins_without() {
        let store = Store::new(&[HubConfig::new("Hub", 4).unwrap()]).unwrap();
        let hub = store.hub("hub").unwrap();
        assert_eq!(hub.route(Some("7")).id, "3");
        let ids: Vec<&str> = (0..5).map(|_| hub.route(None).id.as_str()).collect();
        assert_eq!(ids, ["0", "1", "2", "3", "0"]);
        assert!(matches!(
            store.partition("hub", "4"),
            Err(Error::UnknownPartition { .. })
        ));
        assert!(matches!(
            store.partition("nope", "0"),
            Err(Error::UnknownHub(_))
        ));
    }

    #[test]
    fn hub_specs_parse() {
        let config: HubConfig = "telemetry:4".parse().unwrap();
        assert_eq!(config, HubConfig::new("telemetry", 4).unwrap());
        for bad in [
            "telemetry",
            "telemetry:x",
            "telemetry:0",
            ":2",
            "$cbs:1",
            "a/b:1",
        ] {
            assert!(bad.parse::<HubConfig>().is_err(), "{bad:?}");
        }
        assert!(
            Store::new(&[
                HubConfig::new("a", 1).unwrap(),
                HubConfig::new("A", 1).unwrap()
            ])
            .is_err()
        );
    }
}
