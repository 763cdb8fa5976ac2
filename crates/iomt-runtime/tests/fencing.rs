//! Checkpoint fencing at the runtime level, against Azurite (`tests/azurite`, started by
//! `tests/run.sh`, which exports `IOMT_TEST_AZURITE_URL`): a pipeline whose partition was taken
//! over by another process, and which does not know it yet, commits its checkpoints through
//! [`EventHubsCheckpoints`] and the blob store fenced with its owner id, as `iomt run` does. The
//! store refuses them (412, ownership lost), and the new owner's checkpoint stays.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use azure_core::http::StatusCode;
use azure_messaging_eventhubs::CheckpointStore as _;
use azure_messaging_eventhubs::models::{Checkpoint, Ownership};
use iomt_core::SourceEvent;
use iomt_core::{DeviceEvent, MeasurementGroup};
use iomt_eventhubs::blob::{BlobAuth, BlobCheckpointStore, is_ownership_lost};
use iomt_eventhubs::{EventHubSettings, EventHubsAuth};
use iomt_files::deadletter::DeadLetterWriter;
use iomt_group::GroupConfig;
use iomt_runtime::source::eventhubs::EventHubsCheckpoints;
use iomt_runtime::templates::{LiveTemplates, Templates};
use iomt_runtime::{
    CheckpointError, CheckpointStore as _, Committed, Input, Metrics, Origin, Pipeline,
    PipelineConfig, Sink, SinkError, SourceItem, in_process,
};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

const NAMESPACE: &str = "iomt-test.servicebus.windows.net";
const HUB: &str = "devicedata";
const GROUP: &str = "iomt";
const PARTITION: &str = "0";

fn azurite() -> String {
    std::env::var("IOMT_TEST_AZURITE_URL")
        .expect("IOMT_TEST_AZURITE_URL is not set: run tests/run.sh, which starts Azurite")
        .trim_end_matches('/')
        .to_owned()
}

/// The settings `iomt run --owner-id OWNER` reads the hub with; only the names matter here.
fn settings(owner: &str) -> EventHubSettings {
    EventHubSettings {
        namespace: NAMESPACE.to_owned(),
        hub: HUB.to_owned(),
        consumer_group: GROUP.to_owned(),
        auth: EventHubsAuth::ConnectionString(format!(
            "Endpoint=sb://{NAMESPACE}/;SharedAccessKeyName=listen;SharedAccessKey=unused"
        )),
        custom_endpoint: None,
        application_id: Some(owner.to_owned()),
    }
}

fn ownership(owner: &str, etag: Option<azure_core::http::Etag>) -> Ownership {
    Ownership {
        fully_qualified_namespace: NAMESPACE.to_owned(),
        event_hub_name: HUB.to_owned(),
        consumer_group: GROUP.to_owned(),
        partition_id: PARTITION.to_owned(),
        owner_id: Some(owner.to_owned()),
        etag,
        last_modified_time: None,
    }
}

/// A checkpoint write through the store, and its outcome.
#[derive(Debug)]
struct Write {
    sequence_number: Option<i64>,
    result: Result<(), Refusal>,
}

/// Why the store refused a checkpoint.
#[derive(Debug)]
struct Refusal {
    ownership_lost: bool,
    status: Option<StatusCode>,
    message: String,
}

/// The blob store, recording each checkpoint write and its outcome.
#[derive(Debug)]
struct Recording {
    store: BlobCheckpointStore,
    writes: Mutex<Vec<Write>>,
}

impl Recording {
    fn new(store: BlobCheckpointStore) -> Arc<Self> {
        Arc::new(Self {
            store,
            writes: Mutex::default(),
        })
    }

    /// Waits (up to a minute) for a write of at least `sequence_number`, and returns its
    /// outcome.
    async fn wait_for_write(&self, sequence_number: i64) -> Result<(), Refusal> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            {
                let mut writes = self.writes.lock().unwrap();
                if let Some(i) = writes
                    .iter()
                    .position(|w| w.sequence_number >= Some(sequence_number))
                {
                    return writes.remove(i).result;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no checkpoint write of {sequence_number}: {:?}",
                self.writes.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[async_trait]
impl azure_messaging_eventhubs::CheckpointStore for Recording {
    async fn claim_ownership(
        &self,
        ownerships: &[Ownership],
    ) -> azure_core::Result<Vec<Ownership>> {
        self.store.claim_ownership(ownerships).await
    }

    async fn list_checkpoints(
        &self,
        namespace: &str,
        event_hub_name: &str,
        consumer_group: &str,
    ) -> azure_core::Result<Vec<Checkpoint>> {
        self.store
            .list_checkpoints(namespace, event_hub_name, consumer_group)
            .await
    }

    async fn list_ownerships(
        &self,
        namespace: &str,
        event_hub_name: &str,
        consumer_group: &str,
    ) -> azure_core::Result<Vec<Ownership>> {
        self.store
            .list_ownerships(namespace, event_hub_name, consumer_group)
            .await
    }

    async fn update_checkpoint(&self, checkpoint: Checkpoint) -> azure_core::Result<()> {
        let sequence_number = checkpoint.sequence_number;
        let result = self.store.update_checkpoint(checkpoint).await;
        self.writes.lock().unwrap().push(Write {
            sequence_number,
            result: result.as_ref().map(|_| ()).map_err(|e| Refusal {
                ownership_lost: is_ownership_lost(e),
                status: e.http_status(),
                message: e.to_string(),
            }),
        });
        result
    }
}

/// A sink that takes every group at once.
#[derive(Debug)]
struct Accept;

impl Sink for Accept {
    async fn write(&self, _group: &MeasurementGroup) -> Result<Vec<iomt_core::Written>, SinkError> {
        Ok(Vec::new())
    }

    fn describe(&self) -> String {
        "accept".to_owned()
    }
}

/// Heart rate events of partition 0 at sequence numbers `from..=to`, as the Event Hubs source
/// hands them over.
fn events(index: u32, from: i64, to: i64) -> Vec<SourceItem> {
    (from..=to)
        .map(|i| {
            let body = json!({
                "deviceId": "watch-0", "patientId": "p-0", "heartRate": 60 + i % 40,
                "measuredAt": format!("2026-11-20T06:{:02}:{:02}Z", (i / 60) % 60, i % 60),
            });
            SourceItem {
                origin: Origin {
                    partition: index,
                    position: i,
                },
                input: Input::Event(SourceEvent {
                    partition: PARTITION.to_owned(),
                    sequence_number: i,
                    offset: None,
                    source: format!("partition {PARTITION} #{i}"),
                    event: DeviceEvent {
                        body: body.to_string().into_bytes(),
                        ..DeviceEvent::default()
                    },
                }),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owners_pipeline_cannot_overwrite_the_new_owners_checkpoint() {
    let container = format!(
        "fencing-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let store = BlobCheckpointStore::new(
        &format!("{}/{container}", azurite()),
        BlobAuth::development_storage(),
    )
    .unwrap();
    assert!(store.ensure_container().await.unwrap());
    // Each process's store is fenced with its owner id, as `iomt run` builds it.
    let a_store = Recording::new(store.clone().with_owner("pod-a"));
    let b_store = store.clone().with_owner("pod-b");

    // A owns partition 0 and runs its pipeline over it; its checkpoints go through.
    let granted = a_store
        .claim_ownership(&[ownership("pod-a", None)])
        .await
        .unwrap();
    assert_eq!(granted.len(), 1);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(&container);
    std::fs::create_dir_all(&dir).unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/capture");
    let templates = LiveTemplates::new(
        Templates::load(
            &examples.join("devicecontent.json"),
            &examples.join("fhirmapping.json"),
        )
        .unwrap(),
    );
    let config = PipelineConfig {
        group: GroupConfig::new(1000, Duration::from_millis(100)).unwrap(),
        checkpoint_interval: Duration::from_millis(50),
        ..PipelineConfig::default()
    };
    let pipeline = Pipeline::new(
        config.clone(),
        templates,
        Arc::new(Accept),
        Arc::new(Metrics::new()),
        Vec::new(),
    );
    // The source opens the partition when the processor hands it over.
    let index = pipeline.partitions().open(PARTITION);
    let (producer, consumers) = in_process(config.hub_partitions, config.hub_capacity);
    let (input, rx) = mpsc::channel(4);
    let (stop, stopped) = oneshot::channel::<()>();
    let checkpoints = EventHubsCheckpoints::new(a_store.clone(), &settings("pod-a"));
    let running = tokio::spawn(pipeline.run(
        rx,
        producer,
        consumers,
        DeadLetterWriter::open(&dir.join("deadletter.jsonl")).unwrap(),
        checkpoints,
        async move {
            stopped.await.ok();
        },
    ));
    input.send(events(index, 1, 10)).await.unwrap();
    a_store
        .wait_for_write(10)
        .await
        .expect("A's checkpoint while it owns the partition");

    // B takes the partition over (A's ownership expired, or B stole it to balance the load),
    // resumes after A's checkpoint, and commits its own.
    let current = store.list_ownerships(NAMESPACE, HUB, GROUP).await.unwrap();
    let taken = b_store
        .claim_ownership(&[ownership("pod-b", current[0].etag.clone())])
        .await
        .unwrap();
    assert_eq!(taken.len(), 1, "B's claim");
    let mut b_checkpoints = EventHubsCheckpoints::new(Arc::new(b_store), &settings("pod-b"));
    b_checkpoints
        .commit(&[Committed {
            index: 0,
            partition: PARTITION.to_owned(),
            position: 20,
        }])
        .await
        .unwrap();

    // A has not noticed: its pipeline reads on, and its next checkpoint, past B's, is refused.
    input.send(events(index, 11, 30)).await.unwrap();
    let refused = a_store
        .wait_for_write(30)
        .await
        .expect_err("a stale owner's checkpoint must be refused");
    assert!(refused.ownership_lost, "{}", refused.message);
    assert_eq!(
        refused.status,
        Some(StatusCode::PreconditionFailed),
        "{}",
        refused.message
    );

    // A's pipeline stops, committing a last time; every checkpoint it tried past 10 (its
    // position when B took over) was refused.
    stop.send(()).unwrap();
    let report = running.await.unwrap();
    assert!(!report.abandoned);
    assert_eq!(
        report.positions.get(&index),
        Some(&30),
        "A processed 1..=30"
    );
    {
        let writes = a_store.writes.lock().unwrap();
        let late: Vec<&Write> = writes
            .iter()
            .filter(|w| w.sequence_number > Some(10))
            .collect();
        assert!(!late.is_empty(), "A's final commit");
        assert!(
            late.iter()
                .all(|w| w.result.as_ref().is_err_and(|r| r.ownership_lost)),
            "{late:?}"
        );
    }

    // The refusal reaches the pipeline typed, so it is told from an outage.
    let mut a_checkpoints = EventHubsCheckpoints::new(a_store.clone(), &settings("pod-a"));
    let stale = a_checkpoints
        .commit(&[Committed {
            index: 0,
            partition: PARTITION.to_owned(),
            position: 31,
        }])
        .await;
    match stale {
        Err(CheckpointError::Remote(failures)) => {
            assert_eq!(failures.len(), 1);
            assert_eq!(failures[0].partition, PARTITION);
            assert!(failures[0].ownership_lost, "{}", failures[0]);
        }
        other => panic!("a stale owner's commit: {other:?}"),
    }

    // The checkpoint is B's, and so is the partition.
    let stored = store.list_checkpoints(NAMESPACE, HUB, GROUP).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].sequence_number, Some(20), "B's checkpoint stays");
    let owners = store.list_ownerships(NAMESPACE, HUB, GROUP).await.unwrap();
    assert_eq!(owners[0].owner_id.as_deref(), Some("pod-b"));
    std::fs::remove_dir_all(&dir).ok();
}
