//! Scale-out and failover of `iomt run` (issue 5): three processes share the 8 partitions of a
//! device hub on the test broker (`tests/eventhubs-broker`) through ownership blobs in Azurite,
//! and write to the FHIR test server (both started by `tests/run.sh`). One of them is killed
//! with SIGKILL mid-stream; the other two must take its partitions over once its ownership
//! expires, redo what it had not checkpointed, and leave the FHIR server holding exactly what
//! the capture's oracle expects, as a single process would: every Observation with its values,
//! none missing, none extra, none twice.
//!
//! Like the FHIR tests of `tests/replay.rs`, this test resets the FHIR test server and needs it
//! to itself (`cargo test` runs test binaries one after another).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iomt_eventhubs::blob::BlobCheckpointStore;
use iomt_eventhubs_broker::{BrokerHandle, HubConfig};
use iomt_tests::eventhubs::{
    Cluster, NAMESPACE, export_dead_letters, hub_section, keda_lag, partition_lag, send,
    storage_connection_string, toml_string,
};
use iomt_tests::golden::{Capture, Server, capture_dir, check_server, rng};
use iomt_tests::{IomtProcess, Scratch};
use serde_json::Value;

const HUB: &str = "devicedata";
const PARTITIONS: u32 = 8;
const CONSUMER_GROUP: &str = "iomt";
const PROCESSES: usize = 3;
/// How often each process renews its ownerships and rebalances.
const UPDATE_INTERVAL: Duration = Duration::from_secs(2);
/// How long the ownerships of a process that stopped renewing them stay valid.
const OWNERSHIP_EXPIRY: Duration = Duration::from_secs(6);
/// How long the survivors may take to own every partition, counted from the kill: the killed
/// process's ownerships expire at most `OWNERSHIP_EXPIRY` after the kill (less, as it last
/// renewed them before), and the survivors claim expired partitions in their next rebalancing,
/// one `UPDATE_INTERVAL` later at most, or two when a claim races the other survivor's. The
/// rest is slack for a loaded machine; a takeover that does not happen fails well before the
/// lag deadline.
const TAKEOVER_BOUND: Duration = Duration::from_secs(6 + 2 * 2 + 10);

/// Starts one `iomt run` process; its state (dead letters) is in `dir/OWNER`.
fn start_process(dir: &Path, config: &Path, owner: &str) -> IomtProcess {
    let state_dir = dir.join(owner);
    let args = [
        "run",
        "--config",
        config.to_str().unwrap(),
        "--owner-id",
        owner,
        "--state-dir",
        state_dir.to_str().unwrap(),
    ];
    IomtProcess::start(
        dir,
        owner,
        args,
        "info,azure_messaging_eventhubs=warn,azure_core_amqp=warn",
    )
}

fn write_config(dir: &Path, broker: &BrokerHandle, fhir_url: &str, container: &str) -> PathBuf {
    let capture = capture_dir();
    let path = |p: PathBuf| toml_string(p.to_str().unwrap());
    let source = hub_section(
        broker,
        HUB,
        CONSUMER_GROUP,
        &format!("{}s", UPDATE_INTERVAL.as_secs()),
        &format!("{}s", OWNERSHIP_EXPIRY.as_secs()),
    );
    let config = format!(
        r#"[templates]
device_mapping = {device_mapping}
fhir_mapping = {fhir_mapping}

[fhir]
url = {fhir_url}

[identity]
mode = "create"

[group]
max_wait = "500ms"

[pipeline]
checkpoint_interval = "200ms"

[source]
{source}start_at = "earliest"

[checkpoints]
connection_string = {storage}
container = {container}

[dead_letters]
container = {dead_letters}
"#,
        device_mapping = path(capture.join("devicecontent.json")),
        fhir_mapping = path(capture.join("fhirmapping.json")),
        fhir_url = toml_string(fhir_url),
        storage = toml_string(&storage_connection_string()),
        container = toml_string(container),
        dead_letters = toml_string(&format!("{container}-dl")),
    );
    let file = dir.join("iomt.toml");
    std::fs::write(&file, config).unwrap();
    file
}

/// Sends events to the hub (see [`send`], which sends a batch again when its send hangs),
/// failing the test rather than waiting forever if sending still does not end.
fn send_bounded(rt: &tokio::runtime::Runtime, broker: &BrokerHandle, lines: &[String]) {
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), send(broker, HUB, lines))
            .await
            .expect("sending to the test broker hung")
    });
}

/// Partition → owner id, from the ownership blobs (expired ones included).
async fn owners(store: &BlobCheckpointStore) -> BTreeMap<String, String> {
    store
        .ownerships(NAMESPACE, HUB, CONSUMER_GROUP)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|o| Some((o.partition_id, o.owner_id?)))
        .collect()
}

/// Partition → checkpointed sequence number.
async fn checkpoints(store: &BlobCheckpointStore) -> BTreeMap<String, i64> {
    store
        .checkpoints(NAMESPACE, HUB, CONSUMER_GROUP)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| Some((c.partition_id, c.sequence_number?)))
        .collect()
}

/// The partitions each owner holds.
fn by_owner(owners: &BTreeMap<String, String>) -> BTreeMap<&str, Vec<&str>> {
    let mut by_owner: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (partition, owner) in owners {
        by_owner.entry(owner).or_default().push(partition);
    }
    by_owner
}

/// What identifies a dead letter across processes and replays: the event (partition and
/// sequence number) for the normalize stage, the measurement for the convert stage.
fn dead_letter_identity(record: &Value) -> String {
    match record["stage"].as_str() {
        Some("normalize") => format!("{} {}", record["partition"], record["sequenceNumber"]),
        Some("convert") => {
            let m = &record["payload"]["json"];
            format!(
                "{} {} {}",
                m["deviceId"], m["occurrenceTimeUtc"], m["properties"]
            )
        }
        other => panic!("dead letter of stage {other:?}: {record}"),
    }
}

/// When the events start to arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Once the processes have shared the partitions out and settled.
    Settled,
    /// Before the processes start, so they share the partitions out while reading: a scale-out
    /// under load, as KEDA does it.
    Backlog,
}

#[test]
fn killed_process_partitions_are_taken_over_and_nothing_is_lost_or_duplicated() {
    scale_out(Start::Settled);
}

/// As KEDA scales out: the processes start while a backlog waits, and partitions change hands
/// while their previous owner still has writes in flight. Two owners then create one
/// Observation window at once now and then (once in about six runs before the FHIR writer
/// merged a replaced create back: an spo2 window was left with 5 of its 126 samples).
#[test]
fn scale_out_under_load_loses_nothing() {
    scale_out(Start::Backlog);
}

fn scale_out(start: Start) {
    let started = Instant::now();
    let server = Server::from_env();
    let mut rng = rng();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "scaleout");
    let dir = scratch.path();
    // Five watches, two oximeters, two cuffs, a band and the poisoned devices: 150 of the 420
    // Observations (the FHIR test server's identifier search takes time proportional to the
    // Observations it holds), with events on each of the 8 partitions.
    let capture = Capture::wearables(dir, "wearables-scaleout.jsonl", |kind, n| match kind {
        "watch" => n < 5,
        "oxi" => n == 0 || n == 5,
        "bp-cuff" => n == 2 || n == 4,
        _ => n == 1,
    });
    let lines: Vec<String> = std::fs::read_to_string(&capture.path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), capture.records.len());
    server.reset();

    let Cluster {
        rt,
        broker,
        store,
        container,
    } = Cluster::start(vec![HubConfig::new(HUB, PARTITIONS).unwrap()], "scaleout");
    let config = write_config(dir, &broker, &server.base, &container);

    // The events come in two parts: a third first, the rest just before the kill.
    let (first, rest) = lines.split_at(lines.len() / 3);
    if start == Start::Backlog {
        send_bounded(&rt, &broker, first);
    }
    let mut processes: Vec<IomtProcess> = (0..PROCESSES)
        .map(|i| start_process(dir, &config, &format!("scaleout-{i}")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    if start == Start::Settled {
        settle(&rt, &broker, &store, &mut processes, deadline);
        eprintln!(
            "settled after {:.1} s: {:?}",
            started.elapsed().as_secs_f64(),
            by_owner(&rt.block_on(owners(&store)))
        );
        send_bounded(&rt, &broker, first);
    }

    // Once every process owns partitions and one of them has checkpointed a partition it owns,
    // that one is killed.
    let (victim, before_kill) = loop {
        for p in &mut processes {
            p.assert_running();
        }
        let owners = rt.block_on(owners(&store));
        let checkpoints = rt.block_on(checkpoints(&store));
        let shared = owners.len() == PARTITIONS as usize
            && processes.iter().all(|p| {
                owners.values().filter(|o| **o == p.name).count() >= PARTITIONS as usize / PROCESSES
            });
        let progressed = processes.iter().position(|p| {
            owners
                .iter()
                .any(|(partition, o)| *o == p.name && checkpoints.contains_key(partition))
        });
        if shared && let Some(victim) = progressed {
            break (victim, owners);
        }
        assert!(
            Instant::now() < deadline,
            "no process made progress on its partitions: {:?}, checkpoints {checkpoints:?}",
            by_owner(&owners)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "progress after {:.1} s: {:?}",
        started.elapsed().as_secs_f64(),
        by_owner(&before_kill)
    );

    // The rest of the events, and at once the kill: the victim has events read, or not yet
    // read, past its checkpoints.
    send_bounded(&rt, &broker, rest);
    let victim = processes.remove(victim);
    let victim_owner = victim.name.clone();
    drop(victim); // SIGKILL
    let killed_at = Instant::now();
    let owners_at_kill = rt.block_on(owners(&store));
    let victim_partitions: Vec<String> = owners_at_kill
        .iter()
        .filter(|(_, o)| **o == victim_owner)
        .map(|(p, _)| p.clone())
        .collect();
    assert!(!victim_partitions.is_empty(), "{owners_at_kill:?}");
    let checkpoints_at_kill = rt.block_on(checkpoints(&store));
    let left_over: i64 = victim_partitions
        .iter()
        .map(|p| partition_lag(&broker, HUB, p, checkpoints_at_kill.get(p).copied()))
        .sum();
    eprintln!(
        "killed {victim_owner} owning partitions {victim_partitions:?}, {left_over} events past \
         its checkpoints {checkpoints_at_kill:?}"
    );
    assert!(
        left_over > 0,
        "the killed process had nothing left to do: the test did not kill it mid-stream"
    );

    // The survivors take every partition over.
    let survivors: BTreeSet<String> = processes.iter().map(|p| p.name.clone()).collect();
    let takeover = loop {
        for p in &mut processes {
            p.assert_running();
        }
        let owners = rt.block_on(owners(&store));
        if owners.len() == PARTITIONS as usize && owners.values().all(|o| survivors.contains(o)) {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < TAKEOVER_BOUND,
            "the survivors did not take the partitions over within {TAKEOVER_BOUND:?} of the \
             kill: {:?}",
            by_owner(&owners)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let owners_after = rt.block_on(owners(&store));
    eprintln!(
        "taken over {:.1} s after the kill (ownership expiry {OWNERSHIP_EXPIRY:?}): {:?}",
        takeover.as_secs_f64(),
        by_owner(&owners_after)
    );

    // Everything is checkpointed, as KEDA sees it.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        for p in &mut processes {
            p.assert_running();
        }
        let lag = rt.block_on(keda_lag(&broker, &store, HUB, CONSUMER_GROUP));
        if lag == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "lag never reached 0: {lag}");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "no lag {:.1} s after the start",
        started.elapsed().as_secs_f64()
    );

    for p in processes {
        let owner = p.name.clone();
        // The drain deadline is 30 s.
        let stdout = p.terminate(Duration::from_secs(120));
        eprintln!("{owner}: {}", stdout.lines().next().unwrap_or_default());
    }
    rt.block_on(broker.stop());

    // The FHIR server holds what the oracle expects, each Observation once.
    check_server(&server, &capture, &mut rng);

    // Every dead letter is in the shared dead-letter container, the killed process's included,
    // and a replayed event dead-lettered again is read once.
    let mut distinct: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let records = export_dead_letters(&config, dir);
    for r in &records {
        let kind = r["kind"].as_str().unwrap().to_owned();
        distinct
            .entry(kind)
            .or_default()
            .insert(dead_letter_identity(r));
    }
    assert_eq!(
        records.len(),
        distinct.values().map(BTreeSet::len).sum::<usize>(),
        "each dead letter once"
    );
    let distinct: BTreeMap<String, usize> =
        distinct.into_iter().map(|(k, s)| (k, s.len())).collect();
    assert_eq!(
        distinct, capture.dead_letters,
        "distinct dead letters per kind"
    );
    eprintln!("passed in {:.1} s", started.elapsed().as_secs_f64());
}

/// Waits until the processes have settled: every process owns two or three partitions, and
/// each partition has one receiver (a process that lost a partition has let it go), for two
/// rebalancing rounds in a row.
fn settle(
    rt: &tokio::runtime::Runtime,
    broker: &BrokerHandle,
    store: &BlobCheckpointStore,
    processes: &mut [IomtProcess],
    deadline: Instant,
) {
    let mut settled_since: Option<Instant> = None;
    loop {
        for p in processes.iter_mut() {
            p.assert_running();
        }
        let owners = rt.block_on(owners(store));
        let counts: Vec<usize> = processes
            .iter()
            .map(|p| owners.values().filter(|o| **o == p.name).count())
            .collect();
        let single_readers = broker
            .partition_ids(HUB)
            .unwrap()
            .iter()
            .all(|partition| broker.reader_count(HUB, CONSUMER_GROUP, partition) == 1);
        let settled = owners.len() == PARTITIONS as usize
            && counts.iter().all(|n| (2..=3).contains(n))
            && single_readers;
        if !settled {
            settled_since = None;
        } else if settled_since.get_or_insert_with(Instant::now).elapsed() >= 2 * UPDATE_INTERVAL {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the processes did not settle: {:?}, one receiver per partition: {single_readers}",
            by_owner(&owners)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
