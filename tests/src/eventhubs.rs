//! Live Event Hubs runs: sending captured events to the test broker (`tests/eventhubs-broker`),
//! and reading the checkpoints a run leaves in Azurite (started by `tests/run.sh`, which exports
//! `IOMT_TEST_AZURITE_URL`) the way KEDA reads them.

use azure_messaging_eventhubs::models::EventData;
use azure_messaging_eventhubs::{EventDataBatchOptions, ProducerClient};
use iomt_eventhubs::blob::BlobCheckpointStore;
use iomt_eventhubs_broker::{BrokerConfig, BrokerHandle, CONNECTION_STRING, HubConfig};
use serde_json::Value;

/// The namespace the broker's connection string names, under which checkpoints are kept.
pub const NAMESPACE: &str = "localhost";

/// Azurite's Blob endpoint, `http://127.0.0.1:PORT/devstoreaccount1`.
pub fn azurite() -> String {
    std::env::var("IOMT_TEST_AZURITE_URL").unwrap_or_else(|_| {
        panic!(
            "IOMT_TEST_AZURITE_URL is not set: run tests/run.sh, which installs and starts \
             Azurite, or start Azurite and set it to http://127.0.0.1:PORT/devstoreaccount1"
        )
    })
}

/// A storage connection string for Azurite's development account.
pub fn storage_connection_string() -> String {
    format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint={};",
        azurite()
    )
}

/// What a live test runs against: the test broker serving `hubs`, on a runtime of two workers
/// the test keeps for its own sends and checks, and a new checkpoint container in Azurite.
#[derive(Debug)]
pub struct Cluster {
    /// The runtime the broker runs on: the broker stops when it is dropped.
    pub rt: tokio::runtime::Runtime,
    /// The Event Hubs test broker.
    pub broker: BrokerHandle,
    /// The checkpoint container (created).
    pub store: BlobCheckpointStore,
    /// Its name: `{prefix}-{8 random hex digits}`.
    pub container: String,
}

impl Cluster {
    /// Starts the broker with `hubs` and creates a checkpoint container named after `prefix`.
    pub fn start(hubs: Vec<HubConfig>, prefix: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let broker = rt
            .block_on(BrokerHandle::start(BrokerConfig::new(hubs)))
            .unwrap();
        let container = format!("{prefix}-{:08x}", fastrand::u32(..));
        let store =
            BlobCheckpointStore::from_connection_string(&storage_connection_string(), &container)
                .unwrap();
        rt.block_on(store.ensure_container()).unwrap();
        Cluster {
            rt,
            broker,
            store,
            container,
        }
    }
}

/// Starts `iomt run --role ROLE` under the owner id ROLE; its state (and logs) in `dir/ROLE`.
pub fn start_role(
    dir: &std::path::Path,
    config: &std::path::Path,
    role: &str,
) -> crate::IomtProcess {
    let state_dir = dir.join(role);
    let args = [
        "run",
        "--role",
        role,
        "--owner-id",
        role,
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state_dir.to_str().unwrap(),
    ];
    crate::IomtProcess::start(
        dir,
        role,
        args,
        "info,azure_messaging_eventhubs=warn,azure_core_amqp=warn",
    )
}

/// Sends captured events (lines of a capture file) to `hub` with their device as partition
/// key, as IoT Hub routes them: in batches per device, so each device's events keep their
/// order.
///
/// A send to the test broker has been seen to hang, rarely, with no timer pending in the SDK
/// (the cause is not known yet). A batch not settled within 20 s is looked up in the broker's
/// store: if it landed, sending goes on; if not, it is sent again on a new connection. So every
/// event is in the hub exactly once, as the tests' checks need.
pub async fn send(broker: &BrokerHandle, hub: &str, lines: &[String]) {
    let mut by_device: Vec<(String, Vec<EventData>)> = Vec::new();
    for line in lines {
        let record: Value = serde_json::from_str(line).unwrap();
        let body = match &record["BodyText"] {
            Value::String(text) => text.clone().into_bytes(),
            _ => record["Body"].to_string().into_bytes(),
        };
        let device = record["SystemProperties"]["iothub-connection-device-id"]
            .as_str()
            .unwrap()
            .to_owned();
        let event = EventData::builder()
            .with_body(body)
            .add_property("iothub-connection-device-id".to_owned(), device.clone())
            .build();
        match by_device.iter_mut().find(|(d, _)| *d == device) {
            Some((_, events)) => events.push(event),
            None => by_device.push((device, vec![event])),
        }
    }
    let mut producer = open_producer(broker, hub).await;
    for (device, events) in by_device {
        // What the hub held of this device before: every batch sent adds to it.
        let before = stored(broker, hub, &device);
        let mut next = 0;
        while next < events.len() {
            let batch = producer
                .create_batch(Some(EventDataBatchOptions {
                    partition_key: Some(device.clone()),
                    ..Default::default()
                }))
                .await
                .unwrap();
            let mut end = next;
            while end < events.len() && batch.try_add_event_data(events[end].clone(), None).unwrap()
            {
                end += 1;
            }
            match tokio::time::timeout(
                std::time::Duration::from_secs(20),
                producer.send_batch(batch, None),
            )
            .await
            {
                Ok(sent) => sent.unwrap(),
                Err(_) if stored(broker, hub, &device) == before + end => {
                    eprintln!("a send to the test broker hung after the batch was stored");
                    producer = open_producer(broker, hub).await;
                }
                Err(_) => {
                    assert_eq!(
                        stored(broker, hub, &device),
                        before + next,
                        "a hung send stored part of a batch"
                    );
                    eprintln!("a send to the test broker hung; sending the batch again");
                    producer = open_producer(broker, hub).await;
                    continue;
                }
            }
            next = end;
        }
    }
}

async fn open_producer(broker: &BrokerHandle, hub: &str) -> ProducerClient {
    ProducerClient::builder()
        .with_custom_endpoint(broker.endpoint())
        .open_with_connection_string(CONNECTION_STRING, Some(hub))
        .await
        .unwrap()
}

/// The events of `hub` stored under partition key `device`, in all its partitions.
fn stored(broker: &BrokerHandle, hub: &str, device: &str) -> usize {
    broker
        .partition_ids(hub)
        .unwrap()
        .iter()
        .map(|p| {
            broker
                .events(hub, p)
                .unwrap()
                .iter()
                .filter(|e| e.partition_key.as_deref() == Some(device))
                .count()
        })
        .sum()
}

/// Lag of one partition exactly as KEDA's azure-eventhub scaler computes it with
/// `checkpointStrategy: blobMetadata`: last enqueued sequence number minus the checkpoint's;
/// without a checkpoint, the whole partition; an empty partition counts 0.
pub fn partition_lag(
    broker: &BrokerHandle,
    hub: &str,
    partition: &str,
    checkpoint: Option<i64>,
) -> i64 {
    let state = broker.partition_state(hub, partition).unwrap();
    if state.last_enqueued_sequence_number < 0 {
        return 0;
    }
    match checkpoint {
        Some(done) => state.last_enqueued_sequence_number - done,
        None => state.last_enqueued_sequence_number - state.begin_sequence_number + 1,
    }
}

/// The lag of every partition of `hub`, as KEDA sees it (see [`partition_lag`]), added up.
pub async fn keda_lag(
    broker: &BrokerHandle,
    store: &BlobCheckpointStore,
    hub: &str,
    consumer_group: &str,
) -> i64 {
    // KEDA builds the blob name from the lower-cased consumer group.
    let checkpoints = store
        .checkpoints(NAMESPACE, hub, &consumer_group.to_lowercase())
        .await
        .unwrap();
    let mut total = 0;
    for partition in broker.partition_ids(hub).unwrap() {
        let checkpoint = checkpoints
            .iter()
            .find(|c| c.partition_id == partition)
            .and_then(|c| c.sequence_number);
        total += partition_lag(broker, hub, &partition, checkpoint);
    }
    total
}

/// A string as TOML: a JSON string is a TOML basic string for the paths, names and URLs the
/// tests write.
pub fn toml_string(s: &str) -> String {
    Value::from(s).to_string()
}

/// The keys of a `[source]` or `[internal_hub]` section for `hub` on the test broker.
pub fn hub_section(
    broker: &BrokerHandle,
    hub: &str,
    consumer_group: &str,
    update_interval: &str,
    ownership_expiry: &str,
) -> String {
    format!(
        "hub = {}\nconsumer_group = {}\nconnection_string = {}\ncustom_endpoint = {}\n\
         update_interval = {}\nownership_expiry = {}\n",
        toml_string(hub),
        toml_string(consumer_group),
        toml_string(CONNECTION_STRING),
        toml_string(&broker.endpoint()),
        toml_string(update_interval),
        toml_string(ownership_expiry),
    )
}

/// The dead letters in the container a configuration names (cluster mode), read as an
/// operator reads them: with `iomt deadletter export`, each item once.
pub fn export_dead_letters(config: &std::path::Path, dir: &std::path::Path) -> Vec<Value> {
    let out = dir.join("exported-dead-letters.jsonl");
    let mut cmd = std::process::Command::new(crate::iomt());
    cmd.arg("deadletter")
        .arg("export")
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(&out);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("IOMT") {
            cmd.env_remove(key);
        }
    }
    let output = cmd.output().expect("iomt runs");
    assert!(
        output.status.success(),
        "iomt deadletter export: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    crate::golden::read_json_lines(&out)
}
