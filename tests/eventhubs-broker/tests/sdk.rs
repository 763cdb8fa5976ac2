//! The real Event Hubs SDK (`azure_messaging_eventhubs` 0.16) against the test broker, through
//! the SDK's emulator recipe (`with_custom_endpoint` + `open_with_connection_string`).
//!
//! Each test starts its own broker on a free port. Waits poll a condition with a deadline; none
//! sleeps a fixed time.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use azure_messaging_eventhubs::{
    BufferedProducerClient, ConsumerClient, EventDataBatchOptions, EventProcessor, EventReceiver,
    InMemoryCheckpointStore, OpenReceiverOptions, ProcessorStrategy, ProducerClient,
    SendEventOptions, StartLocation, StartPosition,
    error::ErrorKind,
    models::{EventData, ReceivedEventData, StartPositions},
};
use futures::StreamExt;
use iomt_eventhubs_broker::{
    BrokerConfig, BrokerHandle, CONNECTION_STRING, HubConfig, hash::partition_index_for_key,
};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

const HUB: &str = "telemetry";
const DEFAULT_GROUP: &str = "$Default";
/// Long enough for a loaded 2-core machine, short enough to fail fast.
const DEADLINE: Duration = Duration::from_secs(20);

type EventResult = azure_messaging_eventhubs::Result<ReceivedEventData>;

fn init_tracing() {
    // RUST_LOG=iomt_eventhubs_broker=debug shows the broker's side of a failing test.
    // The first test to start installs the subscriber; the others find it installed.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init()
        .ok();
}

async fn start_broker(partitions: u32) -> BrokerHandle {
    init_tracing();
    let hubs = vec![HubConfig::new(HUB, partitions).unwrap()];
    BrokerHandle::start(BrokerConfig::new(hubs)).await.unwrap()
}

async fn producer(broker: &BrokerHandle) -> ProducerClient {
    ProducerClient::builder()
        .with_custom_endpoint(broker.endpoint())
        .open_with_connection_string(CONNECTION_STRING, Some(HUB))
        .await
        .unwrap()
}

async fn consumer(broker: &BrokerHandle) -> ConsumerClient {
    ConsumerClient::builder()
        .with_custom_endpoint(broker.endpoint())
        .with_consumer_group(DEFAULT_GROUP.to_owned())
        .open_with_connection_string(CONNECTION_STRING, Some(HUB))
        .await
        .unwrap()
}

fn event(body: &str) -> EventData {
    EventData::builder()
        .with_body(body.as_bytes().to_vec())
        .add_property("kind".to_owned(), "test")
        .build()
}

fn body(event: &ReceivedEventData) -> String {
    String::from_utf8(event.event_data().body().unwrap_or_default().to_vec()).unwrap()
}

fn from(location: StartLocation, inclusive: bool) -> Option<OpenReceiverOptions> {
    Some(OpenReceiverOptions {
        start_position: Some(StartPosition {
            location,
            inclusive,
        }),
        ..Default::default()
    })
}

/// Sends `bodies` as one batch, to `partition` or by `key`.
async fn send_batch(
    producer: &ProducerClient,
    partition: Option<&str>,
    key: Option<&str>,
    bodies: &[String],
) {
    let batch = producer
        .create_batch(Some(EventDataBatchOptions {
            partition_id: partition.map(str::to_owned),
            partition_key: key.map(str::to_owned),
            ..Default::default()
        }))
        .await
        .unwrap();
    for body in bodies {
        assert!(batch.try_add_event_data(event(body), None).unwrap());
    }
    producer.send_batch(batch, None).await.unwrap();
}

fn bodies(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

/// A receiver read from a task, so a test can wait for items with a deadline while the receiver
/// keeps its link (the SDK attaches on the first poll of the stream).
struct Reader {
    items: mpsc::UnboundedReceiver<EventResult>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Reader {
    fn spawn(receiver: EventReceiver) -> Self {
        let (sender, items) = mpsc::unbounded_channel();
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            {
                let stream = receiver.stream_events();
                futures::pin_mut!(stream);
                loop {
                    let item = tokio::select! {
                        _ = &mut stopped => break,
                        item = stream.next() => item,
                    };
                    let Some(item) = item else { break };
                    if sender.send(item).is_err() {
                        break;
                    }
                }
            }
            // The SDK keeps an unclosed receiver's link cached per partition on the
            // connection, and hands it to the next receiver opened on that partition.
            // A stolen link is closed already; there is nothing to report then.
            receiver.close().await.ok();
        });
        Self {
            items,
            stop: Some(stop),
            task,
        }
    }

    /// Stops reading and detaches the receiver.
    async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            // The task may have stopped on its own (the stream ended).
            stop.send(()).ok();
        }
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("the receiver did not close in time")
            .unwrap();
    }
}

async fn next_item(items: &mut mpsc::UnboundedReceiver<EventResult>) -> Option<EventResult> {
    tokio::time::timeout(DEADLINE, items.recv())
        .await
        .expect("no event before the deadline")
}

async fn next_events(
    items: &mut mpsc::UnboundedReceiver<EventResult>,
    count: usize,
) -> Vec<ReceivedEventData> {
    let mut events = Vec::with_capacity(count);
    while events.len() < count {
        match next_item(items).await {
            Some(Ok(event)) => events.push(event),
            Some(Err(error)) => panic!("receive failed after {} events: {error:?}", events.len()),
            None => panic!("the stream ended after {} events", events.len()),
        }
    }
    events
}

/// Polls `condition` until it holds or the deadline passes.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sequence_numbers(events: &[ReceivedEventData]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e.sequence_number().unwrap())
        .collect()
}

fn ms(time: SystemTime) -> u128 {
    time.duration_since(UNIX_EPOCH).unwrap().as_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_of_hub_and_partitions() {
    let broker = start_broker(4).await;
    let producer = producer(&broker).await;
    let consumer = consumer(&broker).await;

    for properties in [
        producer.get_eventhub_properties().await.unwrap(),
        consumer.get_eventhub_properties().await.unwrap(),
    ] {
        assert_eq!(properties.name, HUB);
        assert_eq!(properties.partition_ids, ["0", "1", "2", "3"]);
        assert!(properties.created_on.is_some());
    }

    let empty = consumer.get_partition_properties("1").await.unwrap();
    assert_eq!(empty.id, "1");
    assert_eq!(empty.eventhub, HUB);
    assert!(empty.is_empty);
    assert_eq!(empty.beginning_sequence_number, 0);
    assert_eq!(empty.last_enqueued_sequence_number, -1);
    assert_eq!(empty.last_enqueued_offset, "-1");
    assert_eq!(empty.last_enqueued_time_utc, None);

    send_batch(&producer, Some("1"), None, &bodies("p", 0..3)).await;
    let state = broker.partition_state(HUB, "1").unwrap();
    let stored = broker.events(HUB, "1").unwrap();
    for properties in [
        producer.get_partition_properties("1").await.unwrap(),
        consumer.get_partition_properties("1").await.unwrap(),
    ] {
        assert!(!properties.is_empty);
        assert_eq!(properties.beginning_sequence_number, 0);
        assert_eq!(properties.last_enqueued_sequence_number, 2);
        assert_eq!(properties.last_enqueued_offset, stored[2].offset);
        assert_eq!(
            properties.last_enqueued_time_utc,
            Some(stored[2].enqueued_time)
        );
    }
    assert_eq!(state.count, 3);
    assert_eq!(state.last_enqueued_sequence_number, 2);

    // Unknown partitions fail cleanly instead of hanging or panicking.
    assert!(consumer.get_partition_properties("9").await.is_err());

    // Every link was authorized first, as the service requires.
    let audiences = broker.cbs_audiences();
    assert!(
        audiences
            .iter()
            .any(|a| a.ends_with("/telemetry/$management")),
        "{audiences:?}"
    );
    assert!(
        audiences
            .iter()
            .any(|a| a.ends_with("/telemetry/Partitions/1")),
        "{audiences:?}"
    );

    producer.close().await.unwrap();
    consumer.close().await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_keys_land_where_the_sdk_resolver_puts_them() {
    let broker = start_broker(4).await;
    let keys = ["device-1", "device-2", "device-3", "7", "131", "FWfAT"];

    // The buffered producer hashes keys client side and sends to explicit partitions.
    let buffered = BufferedProducerClient::builder()
        .with_custom_endpoint(broker.endpoint())
        .with_on_send_failed(|context| async move {
            panic!("buffered send failed: {:?}", context.error);
        })
        .open_with_connection_string(CONNECTION_STRING, Some(HUB))
        .await
        .unwrap();
    for key in keys {
        buffered
            .enqueue_event(
                event(&format!("buffered-{key}")),
                Some(azure_messaging_eventhubs::EnqueueEventOptions {
                    partition_key: Some(key.to_owned()),
                    ..Default::default()
                }),
            )
            .await
            .unwrap();
    }
    buffered.flush().await.unwrap();
    buffered.close().await.unwrap();

    // The plain producer sends keyed batches to the hub, so the broker hashes.
    let producer = producer(&broker).await;
    for key in keys {
        send_batch(&producer, None, Some(key), &[format!("batch-{key}")]).await;
    }

    let mut where_stored: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
    for partition in broker.partition_ids(HUB).unwrap() {
        for stored in broker.events(HUB, &partition).unwrap() {
            let body = String::from_utf8(stored.body).unwrap();
            where_stored.insert(body, (partition.clone(), stored.partition_key));
        }
    }
    let mut partitions_used = BTreeSet::new();
    for key in keys {
        let expected = partition_index_for_key(key, 4).to_string();
        let by_client = &where_stored[&format!("buffered-{key}")];
        let by_broker = &where_stored[&format!("batch-{key}")];
        assert_eq!(
            by_client,
            &(expected.clone(), Some(key.to_owned())),
            "buffered {key}"
        );
        assert_eq!(
            by_broker,
            &(expected.clone(), Some(key.to_owned())),
            "batch {key}"
        );
        partitions_used.insert(expected);
    }
    assert!(
        partitions_used.len() > 1,
        "the keys should spread: {partitions_used:?}"
    );

    // Without a key the broker spreads single events round robin.
    for i in 0..4 {
        producer
            .send_event(event(&format!("rr-{i}")), None)
            .await
            .unwrap();
    }
    let with_round_robin = broker
        .partition_ids(HUB)
        .unwrap()
        .into_iter()
        .filter(|p| {
            broker
                .events(HUB, p)
                .unwrap()
                .iter()
                .any(|e| e.body.starts_with(b"rr-"))
        })
        .count();
    assert_eq!(with_round_robin, 4);

    producer.close().await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receives_from_every_start_position() {
    let broker = start_broker(4).await;
    let producer = producer(&broker).await;
    let consumer = consumer(&broker).await;

    send_batch(&producer, Some("2"), None, &bodies("first", 0..5)).await;
    let first_batch_time = broker.events(HUB, "2").unwrap()[0].enqueued_time;
    // The enqueued-time filter has millisecond resolution: make the second batch later.
    wait_until("the clock to pass the first batch", || {
        ms(SystemTime::now()) > ms(first_batch_time)
    })
    .await;
    producer
        .send_event(
            event("single-5"),
            Some(SendEventOptions {
                partition_id: Some("2".to_owned()),
            }),
        )
        .await
        .unwrap();
    let stored = broker.events(HUB, "2").unwrap();
    assert_eq!(stored.len(), 6);

    // Earliest: everything, with the system properties the broker stored.
    let receiver = consumer
        .open_receiver_on_partition("2".to_owned(), from(StartLocation::Earliest, false))
        .await
        .unwrap();
    let mut reader = Reader::spawn(receiver);
    let events = next_events(&mut reader.items, 6).await;
    reader.close().await;
    assert_eq!(sequence_numbers(&events), [0, 1, 2, 3, 4, 5]);
    for (received, stored) in events.iter().zip(&stored) {
        assert_eq!(received.offset().as_deref(), Some(stored.offset.as_str()));
        assert_eq!(received.enqueued_time(), Some(stored.enqueued_time));
        assert_eq!(received.event_data().body(), Some(stored.body.as_slice()));
        let properties = received.event_data().properties().unwrap();
        assert_eq!(properties.get("kind"), Some(&"test".into()));
        assert!(
            received.event_data().message_id().is_some(),
            "message id kept"
        );
    }
    assert_eq!(body(&events[5]), "single-5");
    assert_ne!(
        stored[3].offset, "3",
        "offsets are byte positions, not sequence numbers"
    );

    let cases = [
        (StartLocation::SequenceNumber(2), true, vec![2, 3, 4, 5]),
        (StartLocation::SequenceNumber(2), false, vec![3, 4, 5]),
        (
            StartLocation::Offset(stored[1].offset.clone()),
            false,
            vec![2, 3, 4, 5],
        ),
        (
            StartLocation::Offset(stored[1].offset.clone()),
            true,
            vec![1, 2, 3, 4, 5],
        ),
        (
            StartLocation::EnqueuedTime(first_batch_time),
            false,
            vec![5],
        ),
        (
            StartLocation::EnqueuedTime(first_batch_time),
            true,
            vec![0, 1, 2, 3, 4, 5],
        ),
    ];
    for (location, inclusive, expected) in cases {
        let receiver = consumer
            .open_receiver_on_partition("2".to_owned(), from(location.clone(), inclusive))
            .await
            .unwrap();
        let mut reader = Reader::spawn(receiver);
        let events = next_events(&mut reader.items, expected.len()).await;
        assert_eq!(
            sequence_numbers(&events),
            expected,
            "{location:?} inclusive={inclusive}"
        );
        reader.close().await;
    }

    // Latest: only what arrives after the link attaches, delivered live.
    wait_until("the closed readers to detach", || {
        broker.reader_count(HUB, DEFAULT_GROUP, "2") == 0
    })
    .await;
    let receiver = consumer
        .open_receiver_on_partition("2".to_owned(), from(StartLocation::Latest, false))
        .await
        .unwrap();
    let mut reader = Reader::spawn(receiver);
    wait_until("the latest reader to attach", || {
        broker.reader_count(HUB, DEFAULT_GROUP, "2") == 1
    })
    .await;
    send_batch(&producer, Some("2"), None, &bodies("late", 0..2)).await;
    let events = next_events(&mut reader.items, 2).await;
    assert_eq!(sequence_numbers(&events), [6, 7]);
    assert_eq!(body(&events[0]), "late-0");
    reader.close().await;

    producer.close().await.unwrap();
    consumer.close().await.unwrap();
    broker.stop().await;
}

fn owned(epoch: Option<i64>) -> Option<OpenReceiverOptions> {
    Some(OpenReceiverOptions {
        owner_level: epoch,
        start_position: Some(StartPosition {
            location: StartLocation::Earliest,
            inclusive: false,
        }),
        ..Default::default()
    })
}

/// Waits for the stream to report `ConsumerDisconnected`, skipping events delivered before it.
async fn expect_disconnected(items: &mut mpsc::UnboundedReceiver<EventResult>) {
    loop {
        match next_item(items).await {
            Some(Ok(_)) => continue,
            Some(Err(error)) => {
                assert!(
                    matches!(error.kind, ErrorKind::ConsumerDisconnected(_)),
                    "expected ConsumerDisconnected, got {error:?}"
                );
                return;
            }
            None => panic!("the stream ended without ConsumerDisconnected"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_steal_and_refuse() {
    let broker = start_broker(2).await;
    let producer = producer(&broker).await;
    send_batch(&producer, Some("0"), None, &bodies("e", 0..2)).await;

    // Separate clients, as separate processes would be (the SDK caches one link per path).
    let first = consumer(&broker).await;
    let mut first_reader = Reader::spawn(
        first
            .open_receiver_on_partition("0".to_owned(), owned(Some(1)))
            .await
            .unwrap(),
    );
    assert_eq!(next_events(&mut first_reader.items, 2).await.len(), 2);

    let second = consumer(&broker).await;
    let mut second_reader = Reader::spawn(
        second
            .open_receiver_on_partition("0".to_owned(), owned(Some(2)))
            .await
            .unwrap(),
    );
    expect_disconnected(&mut first_reader.items).await;
    assert_eq!(
        sequence_numbers(&next_events(&mut second_reader.items, 2).await),
        [0, 1]
    );

    // A lower epoch and a non-epoch receiver are refused while epoch 2 owns the partition.
    for epoch in [Some(1), None] {
        let other = consumer(&broker).await;
        let mut reader = Reader::spawn(
            other
                .open_receiver_on_partition("0".to_owned(), owned(epoch))
                .await
                .unwrap(),
        );
        expect_disconnected(&mut reader.items).await;
        reader.close().await;
    }
    // The owner is untouched and still live.
    send_batch(&producer, Some("0"), None, &["e-2".to_owned()]).await;
    assert_eq!(
        sequence_numbers(&next_events(&mut second_reader.items, 1).await),
        [2]
    );
    assert_eq!(broker.reader_count(HUB, DEFAULT_GROUP, "0"), 1);

    // Up to five non-epoch readers share a partition; an epoch reader evicts them all.
    let mut plain = Vec::new();
    for _ in 0..2 {
        let client = consumer(&broker).await;
        let reader = Reader::spawn(
            client
                .open_receiver_on_partition("1".to_owned(), owned(None))
                .await
                .unwrap(),
        );
        plain.push((client, reader));
    }
    wait_until("two non-epoch readers", || {
        broker.reader_count(HUB, DEFAULT_GROUP, "1") == 2
    })
    .await;
    let owner = consumer(&broker).await;
    let owner_reader = Reader::spawn(
        owner
            .open_receiver_on_partition("1".to_owned(), owned(Some(0)))
            .await
            .unwrap(),
    );
    for (_, reader) in &mut plain {
        expect_disconnected(&mut reader.items).await;
    }
    for (_, reader) in plain {
        reader.close().await;
    }
    owner_reader.close().await;
    first_reader.close().await;
    second_reader.close().await;
    broker.stop().await;
}

/// What a processor's partition task reports.
#[derive(Debug)]
enum ProcessorEvent {
    Claimed {
        processor: usize,
        partition: String,
    },
    Received {
        processor: usize,
        partition: String,
        sequence_number: i64,
    },
    Revoked {
        processor: usize,
        partition: String,
    },
}

/// Starts an `EventProcessor` whose partition clients report to `report`, checkpointing every
/// event. Must run inside a `LocalSet`.
async fn start_processor(
    broker: &BrokerHandle,
    store: Arc<InMemoryCheckpointStore>,
    processor_id: usize,
    report: mpsc::UnboundedSender<ProcessorEvent>,
) -> Arc<EventProcessor> {
    let processor = EventProcessor::builder()
        .with_load_balancing_strategy(ProcessorStrategy::Balanced)
        .with_update_interval(azure_core::time::Duration::milliseconds(300))
        .with_partition_expiration_duration(azure_core::time::Duration::seconds(3))
        .with_start_positions(StartPositions {
            default: StartPosition {
                location: StartLocation::Earliest,
                inclusive: false,
            },
            ..Default::default()
        })
        .build(consumer(broker).await, store)
        .await
        .unwrap();
    tokio::spawn({
        let processor = processor.clone();
        async move {
            if let Err(error) = processor.run().await {
                panic!("processor {processor_id} stopped: {error:?}");
            }
        }
    });
    // `PartitionClient::stream_events` is not `Send` in the SDK 0.16, so partition tasks run
    // on the test's `LocalSet`.
    tokio::task::spawn_local({
        let processor = processor.clone();
        async move {
            while let Ok(client) = processor.next_partition_client().await {
                let report = report.clone();
                // Reports are dropped (`.ok()`) once the test has stopped listening.
                tokio::task::spawn_local(async move {
                    let partition = client.get_partition_id().to_owned();
                    report
                        .send(ProcessorEvent::Claimed {
                            processor: processor_id,
                            partition: partition.clone(),
                        })
                        .ok();
                    let stream = client.stream_events();
                    futures::pin_mut!(stream);
                    while let Some(item) = stream.next().await {
                        match item {
                            Ok(event) => {
                                client.update_checkpoint(&event).await.unwrap();
                                report
                                    .send(ProcessorEvent::Received {
                                        processor: processor_id,
                                        partition: partition.clone(),
                                        sequence_number: event.sequence_number().unwrap(),
                                    })
                                    .ok();
                            }
                            Err(error) => {
                                assert!(
                                    matches!(error.kind, ErrorKind::ConsumerDisconnected(_)),
                                    "processor {processor_id} partition {partition}: {error:?}"
                                );
                                break;
                            }
                        }
                    }
                    report
                        .send(ProcessorEvent::Revoked {
                            processor: processor_id,
                            partition,
                        })
                        .ok();
                });
            }
        }
    });
    processor
}

/// What the test has seen of the processors so far.
#[derive(Debug, Default)]
struct ProcessorView {
    /// `(processor, partition)` pairs with a live partition client.
    active: BTreeSet<(usize, String)>,
    /// Which processors received each `(partition, sequence number)`.
    received: BTreeMap<(String, i64), Vec<usize>>,
}

impl ProcessorView {
    fn apply(&mut self, event: ProcessorEvent) {
        match event {
            ProcessorEvent::Claimed {
                processor,
                partition,
            } => {
                self.active.insert((processor, partition));
            }
            ProcessorEvent::Revoked {
                processor,
                partition,
            } => {
                self.active.remove(&(processor, partition));
            }
            ProcessorEvent::Received {
                processor,
                partition,
                sequence_number,
            } => {
                self.received
                    .entry((partition, sequence_number))
                    .or_default()
                    .push(processor);
            }
        }
    }

    fn partitions_of(&self, processor: usize) -> BTreeSet<&str> {
        self.active
            .iter()
            .filter(|(p, _)| *p == processor)
            .map(|(_, partition)| partition.as_str())
            .collect()
    }

    /// Folds reports until `done` holds.
    async fn until(
        &mut self,
        reports: &mut mpsc::UnboundedReceiver<ProcessorEvent>,
        what: &str,
        done: impl Fn(&Self) -> bool,
    ) {
        while !done(self) {
            let event = tokio::time::timeout(DEADLINE, reports.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}: {self:?}"))
                .expect("the report channel closed");
            self.apply(event);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_processors_share_partitions() {
    tokio::task::LocalSet::new()
        .run_until(event_processors_share_partitions_locally())
        .await;
}

async fn event_processors_share_partitions_locally() {
    let broker = start_broker(4).await;
    let producer = producer(&broker).await;
    for partition in ["0", "1", "2", "3"] {
        send_batch(&producer, Some(partition), None, &bodies(partition, 0..2)).await;
    }
    let store = Arc::new(InMemoryCheckpointStore::new());
    let (report, mut reports) = mpsc::unbounded_channel();
    let mut view = ProcessorView::default();

    // One processor takes every partition and reads everything from the start.
    let first = start_processor(&broker, store.clone(), 1, report.clone()).await;
    view.until(
        &mut reports,
        "the first processor to read everything",
        |v| v.received.len() == 8 && v.partitions_of(1).len() == 4,
    )
    .await;

    // A second processor joins and claims half; the first loses those partitions, through the
    // broker's epoch-0 steal or its own load-balancing revoke, whichever comes first.
    let second = start_processor(&broker, store.clone(), 2, report.clone()).await;
    view.until(&mut reports, "a balanced share", |v| {
        let (one, two) = (v.partitions_of(1), v.partitions_of(2));
        one.len() == 2 && two.len() == 2 && one.is_disjoint(&two)
    })
    .await;

    // New events reach whichever processor owns their partition now, once, and the newcomer
    // starts from the first processor's checkpoints rather than from the start.
    for partition in ["0", "1", "2", "3"] {
        send_batch(
            &producer,
            Some(partition),
            None,
            &[format!("{partition}-late")],
        )
        .await;
    }
    view.until(&mut reports, "the late events", |v| v.received.len() == 12)
        .await;
    for (processor, partition) in &view.active {
        assert_eq!(
            view.received[&(partition.clone(), 2)],
            [*processor],
            "late event of partition {partition}"
        );
    }
    for ((partition, sequence_number), processors) in &view.received {
        if *sequence_number < 2 {
            assert_eq!(
                processors,
                &[1],
                "partition {partition} event {sequence_number}"
            );
        }
    }
    for partition in ["0", "1", "2", "3"] {
        wait_until("one reader per partition", || {
            broker.reader_count(HUB, DEFAULT_GROUP, partition) == 1
        })
        .await;
    }

    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    producer.close().await.unwrap();
    broker.stop().await;
}

/// Sends `count` numbered events to partition 0 one at a time.
///
/// Each send has a deadline: an SDK 0.16 send whose link or connection goes away while it waits
/// for the outcome never returns on its own.
async fn send_numbered(producer: &ProducerClient, range: std::ops::Range<usize>) {
    for i in range {
        let send = producer.send_event(
            event(&format!("n-{i}")),
            Some(SendEventOptions {
                partition_id: Some("0".to_owned()),
            }),
        );
        tokio::time::timeout(DEADLINE, send)
            .await
            .unwrap_or_else(|_| panic!("send {i} did not complete"))
            .unwrap();
    }
}

/// Receives until every sequence number in `0..count` is in `seen`; returns how many events
/// arrived again.
async fn receive_all(
    items: &mut mpsc::UnboundedReceiver<EventResult>,
    seen: &mut BTreeSet<i64>,
    count: i64,
) -> usize {
    let mut duplicates = 0;
    while (seen.len() as i64) < count {
        match next_item(items).await {
            Some(Ok(event)) => {
                if !seen.insert(event.sequence_number().unwrap()) {
                    duplicates += 1;
                }
            }
            Some(Err(error)) => panic!(
                "receive failed with {} of {count} seen: {error:?}",
                seen.len()
            ),
            None => panic!("the stream ended with {} of {count} seen", seen.len()),
        }
    }
    assert_eq!(*seen, (0..count).collect::<BTreeSet<_>>());
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_recover_from_dropped_links_and_connections() {
    let broker = start_broker(1).await;
    let producer = producer(&broker).await;
    let consumer = consumer(&broker).await;
    let receiver = consumer
        .open_receiver_on_partition("0".to_owned(), from(StartLocation::Earliest, false))
        .await
        .unwrap();
    let mut reader = Reader::spawn(receiver);
    let mut seen = BTreeSet::new();

    send_numbered(&producer, 0..10).await;
    assert_eq!(receive_all(&mut reader.items, &mut seen, 10).await, 0);

    // Detach every link of the hub: the consumer re-attaches, the producer re-attaches on send.
    let dropped = broker.drop_links(HUB).await;
    assert!(dropped >= 2, "the sender and the receiver link: {dropped}");
    send_numbered(&producer, 10..20).await;
    let duplicates_after_links = receive_all(&mut reader.items, &mut seen, 20).await;

    // Close every connection: both clients reconnect.
    let dropped = broker.drop_connections().await;
    assert!(
        dropped >= 2,
        "the producer and the consumer connection: {dropped}"
    );
    send_numbered(&producer, 20..30).await;
    let duplicates_after_connections = receive_all(&mut reader.items, &mut seen, 30).await;
    assert_eq!(
        broker.partition_state(HUB, "0").unwrap().count,
        30,
        "no send was lost or doubled"
    );

    // The SDK 0.16 re-attaches with the start position it was opened with (Earliest here), so a
    // recovered receiver replays the partition from there: consumers must skip what they have
    // already seen. If the SDK starts resuming after the last event, these counts drop to 0.
    assert_eq!(
        duplicates_after_links, 10,
        "replay of 0..10 after the link drop"
    );
    assert_eq!(
        duplicates_after_connections, 20,
        "replay of 0..20 after the connection drop"
    );
    reader.close().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_entities_fail_without_hanging() {
    let broker = start_broker(1).await;
    let nowhere = ProducerClient::builder()
        .with_custom_endpoint(broker.endpoint())
        .open_with_connection_string(CONNECTION_STRING, Some("nowhere"))
        .await
        .unwrap();
    let properties = tokio::time::timeout(DEADLINE, nowhere.get_eventhub_properties()).await;
    assert!(properties.expect("properties hung").is_err());
    let sent = tokio::time::timeout(DEADLINE, nowhere.send_event(event("x"), None)).await;
    assert!(sent.expect("send to an unknown hub hung").is_err());

    let producer = producer(&broker).await;
    let options = Some(SendEventOptions {
        partition_id: Some("9".to_owned()),
    });
    let sent = tokio::time::timeout(DEADLINE, producer.send_event(event("x"), options)).await;
    assert!(sent.expect("send to an unknown partition hung").is_err());

    let consumer = consumer(&broker).await;
    let receiver = consumer
        .open_receiver_on_partition("9".to_owned(), from(StartLocation::Earliest, false))
        .await
        .unwrap();
    let mut reader = Reader::spawn(receiver);
    match next_item(&mut reader.items).await {
        Some(Err(_)) | None => {}
        Some(Ok(event)) => panic!("received {event:?} from an unknown partition"),
    }
    reader.close().await;
    assert_eq!(broker.partition_state(HUB, "0").unwrap().count, 0);
    broker.stop().await;
}
