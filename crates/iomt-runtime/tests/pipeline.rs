//! The runtime's guarantees, with a sink that misbehaves on purpose: everything read is
//! written or dead-lettered, unavailable outputs are retried rather than dropped, and the
//! checkpoint never passes an event whose output is not durable.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iomt_core::{Action, DeviceEvent, MeasurementGroup, Written};
use iomt_core::{BadRecord, SourceEvent};
use iomt_files::deadletter::{DeadLetterWriter, Stage, read_dead_letters};
use iomt_group::GroupConfig;
use iomt_runtime::hub::{Delivery, HubError, InProcessConsumer};
use iomt_runtime::templates::{LiveTemplates, Templates};
use iomt_runtime::{
    FileCheckpoint, HubConsumer, HubMessage, HubProducer, Input, Metrics, Origin, Pipeline,
    PipelineConfig, Report, Sink, SinkError, SourceItem, in_process,
};
use serde_json::json;
use tokio::sync::mpsc;

#[derive(Debug, Default)]
struct TestSink {
    written: Mutex<Vec<MeasurementGroup>>,
    /// Writes that fail as unavailable before writes succeed.
    unavailable: AtomicU32,
    /// Groups of this device are rejected as data errors.
    reject_device: Option<String>,
    /// Groups of this device never finish.
    stuck_device: Option<String>,
    /// Each write takes this long.
    latency: Option<Duration>,
    /// Devices being written now, and whether two writes of one device ever overlapped.
    writing: Mutex<Vec<String>>,
    overlapped: std::sync::atomic::AtomicBool,
}

impl Sink for TestSink {
    async fn write(&self, group: &MeasurementGroup) -> Result<Vec<Written>, SinkError> {
        if self.stuck_device.as_deref() == Some(&group.device_id) {
            std::future::pending::<()>().await;
        }
        if let Some(latency) = self.latency {
            {
                let mut writing = self.writing.lock().unwrap();
                if writing.contains(&group.device_id) {
                    self.overlapped.store(true, Ordering::SeqCst);
                }
                writing.push(group.device_id.clone());
            }
            tokio::time::sleep(latency).await;
            self.writing
                .lock()
                .unwrap()
                .retain(|d| *d != group.device_id);
        }
        if self.reject_device.as_deref() == Some(&group.device_id) {
            return Err(SinkError::Data {
                kind: "DeviceNotFoundException",
                message: "no such device".into(),
                template: None,
            });
        }
        if self
            .unavailable
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SinkError::Unavailable {
                kind: "FHIRServiceErrorTooManyRequests",
                message: "try later".into(),
            });
        }
        self.written.lock().unwrap().push(group.clone());
        Ok(vec![Written {
            resource_type: "Observation".to_owned(),
            id: group.device_id.clone(),
            version_id: Some("1".to_owned()),
            last_updated: None,
            action: Action::Created,
            identity: false,
        }])
    }

    fn describe(&self) -> String {
        "test sink".into()
    }
}

impl TestSink {
    fn measurements(&self) -> usize {
        self.written
            .lock()
            .unwrap()
            .iter()
            .map(|g| g.measurements.len())
            .sum()
    }
}

fn templates() -> LiveTemplates {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/capture");
    LiveTemplates::new(
        Templates::load(
            &dir.join("devicecontent.json"),
            &dir.join("fhirmapping.json"),
        )
        .unwrap(),
    )
}

/// Heart rate events from `devices` watches, one per second each, positions 1..=n.
fn events(n: i64, devices: i64) -> Vec<SourceItem> {
    (1..=n)
        .map(|i| {
            let device = format!("watch-{}", i % devices);
            let body = json!({
                "deviceId": device, "patientId": format!("p-{device}"), "heartRate": 60 + i % 40,
                "measuredAt": format!("2026-11-20T06:{:02}:{:02}Z", (i / 60) % 60, i % 60),
            });
            SourceItem {
                origin: Origin {
                    partition: 0,
                    position: i,
                },
                input: Input::Event(SourceEvent {
                    partition: "0".into(),
                    sequence_number: i,
                    offset: None,
                    source: format!("test:{i}"),
                    event: DeviceEvent {
                        body: body.to_string().into_bytes(),
                        ..DeviceEvent::default()
                    },
                }),
            }
        })
        .collect()
}

struct Run {
    report: Report<FileCheckpoint>,
    metrics: Arc<Metrics>,
    dir: tempfile::TempDir,
}

async fn run(
    sink: Arc<TestSink>,
    items: Vec<SourceItem>,
    config: PipelineConfig,
    shutdown_after: Option<Duration>,
) -> Run {
    let (producer, consumers) = in_process(config.hub_partitions, config.hub_capacity);
    run_over(sink, items, config, shutdown_after, producer, consumers).await
}

/// [`run`] over a given internal hub.
async fn run_over<P: HubProducer, C: HubConsumer>(
    sink: Arc<TestSink>,
    items: Vec<SourceItem>,
    config: PipelineConfig,
    shutdown_after: Option<Duration>,
    producer: P,
    consumers: Vec<C>,
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let pipeline = Pipeline::new(config, templates(), sink, metrics.clone(), vec!["0".into()]);
    let (tx, rx) = mpsc::channel(4);
    let feeder = tokio::spawn(async move {
        for chunk in items.chunks(16) {
            if tx.send(chunk.to_vec()).await.is_err() {
                return;
            }
        }
        // With a shutdown planned, keep the input open as a live source would.
        if shutdown_after.is_some() {
            tx.closed().await;
        }
    });
    let dead_letters = DeadLetterWriter::open(&dir.path().join("dl.jsonl")).unwrap();
    let (checkpoint, _) = FileCheckpoint::open(&dir.path().join("cp.json"), "test").unwrap();
    let shutdown = async move {
        match shutdown_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let report = pipeline
        .run(rx, producer, consumers, dead_letters, checkpoint, shutdown)
        .await;
    feeder.abort();
    Run {
        report,
        metrics,
        dir,
    }
}

fn committed(dir: &Path) -> BTreeMap<u32, i64> {
    FileCheckpoint::open(&dir.join("cp.json"), "test")
        .unwrap()
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_read_is_written_or_dead_lettered_and_checkpointed() {
    let sink = Arc::new(TestSink::default());
    let mut items = events(200, 7);
    items.push(SourceItem {
        origin: Origin {
            partition: 0,
            position: 201,
        },
        input: Input::Bad(BadRecord {
            source: "test:201".into(),
            partition: "0".into(),
            sequence_number: 201,
            payload: b"not json".to_vec(),
            reason: "not JSON".into(),
        }),
    });
    let run = run(sink.clone(), items, PipelineConfig::default(), None).await;
    assert!(!run.report.interrupted && !run.report.abandoned);
    assert_eq!(run.report.in_flight, 0);
    assert_eq!(sink.measurements(), 200);
    assert_eq!(committed(run.dir.path()), [(0, 201)].into());
    let (dead, _) = read_dead_letters(&run.dir.path().join("dl.jsonl")).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, b"not json");
    let summary = run.metrics.summary();
    assert_eq!((summary.events, summary.written_measurements), (201, 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_output_is_retried_not_dead_lettered() {
    let sink = Arc::new(TestSink {
        unavailable: AtomicU32::new(3),
        ..TestSink::default()
    });
    let config = PipelineConfig {
        retry_cap: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let run = run(sink.clone(), events(30, 3), config, None).await;
    assert_eq!(sink.measurements(), 30);
    let summary = run.metrics.summary();
    assert_eq!(summary.retries, 3);
    assert!(summary.dead_letters.is_empty());
    assert_eq!(committed(run.dir.path()), [(0, 30)].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_groups_are_dead_lettered_with_their_measurements() {
    let sink = Arc::new(TestSink {
        reject_device: Some("watch-1".into()),
        ..TestSink::default()
    });
    let run = run(sink.clone(), events(40, 4), PipelineConfig::default(), None).await;
    assert_eq!(sink.measurements(), 30);
    let (dead, _) = read_dead_letters(&run.dir.path().join("dl.jsonl")).unwrap();
    assert_eq!(dead.len(), 10);
    assert!(dead.iter().all(|d| d.stage == Stage::Convert
        && d.kind == "DeviceNotFoundException"
        && String::from_utf8_lossy(&d.payload).contains("\"deviceId\":\"watch-1\"")));
    assert_eq!(committed(run.dir.path()), [(0, 40)].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_stops_below_an_unfinished_write() {
    // watch-0 has events 5, 10, 15 ...: its group never finishes writing.
    let sink = Arc::new(TestSink {
        stuck_device: Some("watch-0".into()),
        ..TestSink::default()
    });
    let config = PipelineConfig {
        group: GroupConfig::new(1000, Duration::from_millis(100)).unwrap(),
        drain_deadline: Duration::from_millis(300),
        checkpoint_interval: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let run = run(
        sink.clone(),
        events(50, 5),
        config,
        Some(Duration::from_millis(500)),
    )
    .await;
    assert!(run.report.interrupted && run.report.abandoned);
    assert_eq!(sink.measurements(), 40);
    assert_eq!(run.report.positions, [(0, 4)].into());
    assert_eq!(committed(run.dir.path()), [(0, 4)].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_measurements_are_bounded() {
    let sink = Arc::new(TestSink::default());
    let config = PipelineConfig {
        hub_partitions: 1,
        max_buffered: 20,
        ..PipelineConfig::default()
    };
    let run = run(sink.clone(), events(300, 10), config, None).await;
    assert_eq!(sink.measurements(), 300);
    // Ten devices in one buffer each: without the bound there would be 10 groups.
    assert!(run.metrics.summary().groups > 10);
    assert!(
        run.metrics
            .encode()
            .contains("MeasurementGroup_total{name=\"MemoryLimit\"}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_one_device_never_overlap_and_keep_their_order() {
    // Small buffers flush many times per device while earlier writes are still running.
    let sink = Arc::new(TestSink {
        latency: Some(Duration::from_millis(5)),
        ..TestSink::default()
    });
    let config = PipelineConfig {
        group: GroupConfig::new(3, Duration::from_millis(100)).unwrap(),
        ..PipelineConfig::default()
    };
    let run = run(sink.clone(), events(240, 4), config, None).await;
    assert!(!sink.overlapped.load(Ordering::SeqCst));
    assert_eq!(sink.measurements(), 240);
    let written = sink.written.lock().unwrap();
    for device in 0..4 {
        let times: Vec<_> = written
            .iter()
            .filter(|g| g.device_id == format!("watch-{device}"))
            .flat_map(|g| g.measurements.iter().map(|m| m.occurrence_time_utc))
            .collect();
        assert!(times.is_sorted(), "watch-{device} written out of order");
    }
    assert_eq!(committed(run.dir.path()), [(0, 240)].into());
}

/// A hub between processes (the normalize role's internal hub), faked: every send first
/// reports a failure (which the hub retried), then stores the measurements, except that it
/// refuses those of one device for good and never stores those of another.
struct DurableHub {
    stored: Arc<Mutex<Vec<HubMessage>>>,
    refuse: &'static str,
    hold: Option<&'static str>,
    reports: mpsc::UnboundedSender<Delivery>,
    deliveries: Option<mpsc::UnboundedReceiver<Delivery>>,
}

impl DurableHub {
    fn new(refuse: &'static str, hold: Option<&'static str>) -> Self {
        let (reports, deliveries) = mpsc::unbounded_channel();
        Self {
            stored: Arc::default(),
            refuse,
            hold,
            reports,
            deliveries: Some(deliveries),
        }
    }
}

impl HubProducer for DurableHub {
    fn partitions(&self) -> usize {
        1
    }

    async fn send(&mut self, _partition: usize, batch: Vec<HubMessage>) -> Result<(), HubError> {
        let report = |d| self.reports.send(d).map_err(|_| HubError::Closed);
        report(Delivery::Failed {
            messages: batch.len(),
            error: "server busy".into(),
        })?;
        let (refused, rest): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|m| m.measurement.device_id == self.refuse);
        let stored: Vec<_> = rest
            .into_iter()
            .filter(|m| Some(m.measurement.device_id.as_str()) != self.hold)
            .collect();
        if !refused.is_empty() {
            report(Delivery::Refused {
                messages: refused,
                reason: "too large for an event".into(),
            })?;
        }
        self.stored.lock().unwrap().extend(stored.iter().cloned());
        report(Delivery::Stored(stored))?;
        Ok(())
    }

    fn deliveries(&mut self) -> Option<mpsc::UnboundedReceiver<Delivery>> {
        self.deliveries.take()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_hub_acknowledges_what_it_stored_and_refusals_are_dead_lettered() {
    let sink = Arc::new(TestSink::default());
    let hub = DurableHub::new("watch-1", None);
    let stored = hub.stored.clone();
    let no_consumers: Vec<InProcessConsumer> = Vec::new();
    let run = run_over(
        sink.clone(),
        events(40, 4),
        PipelineConfig::default(),
        None,
        hub,
        no_consumers,
    )
    .await;
    // The normalize role writes nothing itself; its events are done once stored.
    assert_eq!(sink.measurements(), 0);
    assert_eq!(stored.lock().unwrap().len(), 30);
    assert_eq!(committed(run.dir.path()), [(0, 40)].into());
    let (dead, _) = read_dead_letters(&run.dir.path().join("dl.jsonl")).unwrap();
    assert_eq!(dead.len(), 10);
    assert!(dead.iter().all(|d| d.stage == Stage::Normalize
        && d.kind == "EventHubProducerClientException"
        && d.message == "too large for an event"
        && String::from_utf8_lossy(&d.payload).contains("\"deviceId\":\"watch-1\"")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_stops_below_measurements_the_hub_has_not_stored() {
    let hub = DurableHub::new("none", Some("watch-3"));
    let no_consumers: Vec<InProcessConsumer> = Vec::new();
    let run = run_over(
        Arc::new(TestSink::default()),
        events(40, 4),
        PipelineConfig {
            drain_deadline: Duration::from_millis(200),
            ..PipelineConfig::default()
        },
        Some(Duration::from_secs(1)),
        hub,
        no_consumers,
    )
    .await;
    // watch-3's first event is position 3.
    assert_eq!(committed(run.dir.path()), [(0, 2)].into());
    assert_eq!(run.report.in_flight, 10);
}
