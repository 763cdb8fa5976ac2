//! The roles of `iomt run` in cluster mode, end to end: device events sent to the device hub
//! of the test broker (`tests/eventhubs-broker`) are normalized by an `iomt run --role
//! normalize` process onto the internal hub; an `iomt run --role convert` process groups and
//! converts them into the FHIR test server and appends a change event record per version to
//! the event log hub; and an `iomt run --role events` process delivers them to two
//! subscriptions, each reading the event log in its own consumer group: a JSON Lines file, and
//! a filtered one onto another Event Hub in binary CloudEvents. Checkpoints and ownership of
//! every hub live in Azurite (both services started by `tests/run.sh`).
//!
//! The FHIR server must then hold exactly what the capture's oracle expects; the internal hub
//! must carry MedTech's wire format and partition keys, every device on one partition; every
//! version on the server must be delivered to each subscription it matches, under one event
//! id, keyed `Type/id` on the destination hub; and every hub's checkpoints, per consumer group,
//! must read as zero lag the way KEDA reads them.
//!
//! Like the other FHIR tests, this one resets the FHIR test server and needs it to itself
//! (`cargo test` runs test binaries one after another).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iomt_eventhubs_broker::{BrokerHandle, HubConfig, StoredEvent};
use iomt_tests::Scratch;
use iomt_tests::eventhubs::{
    Cluster, export_dead_letters, hub_section, keda_lag, send, start_role,
    storage_connection_string, toml_string,
};
use iomt_tests::events::{Version, announced, assert_each_version_under_one_id};
use iomt_tests::golden::{Capture, Server, capture_dir, check_server, read_json_lines, rng};
use serde_json::Value;

const DEVICE_HUB: &str = "devicedata";
const INTERNAL_HUB: &str = "normalizeddata";
const EVENT_LOG: &str = "fhirchanges";
const EVENTS_OUT: &str = "fhirevents";
const CONSUMER_GROUP: &str = "iomt";
/// The subscriptions' consumer groups on the event log: their names.
const SUBSCRIPTIONS: [&str; 2] = ["all", "identities"];
/// How long a role may take to drain on SIGTERM (its drain deadline is 30 s).
const STOP_DEADLINE: Duration = Duration::from_secs(120);

fn write_config(dir: &Path, broker: &BrokerHandle, fhir_url: &str, container: &str) -> PathBuf {
    let capture = capture_dir();
    let path = |p: PathBuf| toml_string(p.to_str().unwrap());
    let hub = |name: &str| hub_section(broker, name, CONSUMER_GROUP, "1s", "3s");
    let config = format!(
        "[templates]\ndevice_mapping = {}\nfhir_mapping = {}\n\n\
         [fhir]\nurl = {}\n\n[identity]\nmode = \"create\"\n\n[group]\nmax_wait = \"500ms\"\n\n\
         [pipeline]\ncheckpoint_interval = \"200ms\"\n\n\
         [source]\n{}\n[internal_hub]\n{}\n[event_log]\n{}\n\
         [checkpoints]\nconnection_string = {}\ncontainer = {}\n\n\
         [dead_letters]\ncontainer = {}\n\n\
         [[subscriptions]]\nname = \"all\"\ndestination = {{ kind = \"ndjson\", path = {} }}\n\n\
         [[subscriptions]]\nname = \"identities\"\nformat = \"cloudevents-binary\"\n\
         filter = {{ resource_types = [\"Patient\", \"Device\"] }}\n\
         destination = {{ kind = \"event-hubs\", hub = {}, connection_string = {}, custom_endpoint = {} }}\n",
        path(capture.join("devicecontent.json")),
        path(capture.join("fhirmapping.json")),
        toml_string(fhir_url),
        hub(DEVICE_HUB),
        hub(INTERNAL_HUB),
        hub(EVENT_LOG),
        toml_string(&storage_connection_string()),
        toml_string(container),
        toml_string(&format!("{container}-dl")),
        path(dir.join("all.ndjson")),
        toml_string(EVENTS_OUT),
        toml_string(iomt_eventhubs_broker::CONNECTION_STRING),
        toml_string(&broker.endpoint()),
    );
    let file = dir.join("iomt.toml");
    std::fs::write(&file, config).unwrap();
    file
}

/// Checks the internal hub carries MedTech's normalized events: one PascalCase `Measurement`
/// per event, with MedTech's partition key, every device on one partition. Returns the number
/// of events.
fn check_internal_hub(broker: &BrokerHandle) -> usize {
    // Newtonsoft's order: the .NET class's.
    const FIELDS: [&str; 8] = [
        "Type",
        "OccurrenceTimeUtc",
        "IngestionTimeUtc",
        "DeviceId",
        "PatientId",
        "EncounterId",
        "CorrelationId",
        "Properties",
    ];
    let mut partitions_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut events = 0;
    for partition in broker.partition_ids(INTERNAL_HUB).unwrap() {
        for event in broker.events(INTERNAL_HUB, &partition).unwrap() {
            events += 1;
            let m: Value = serde_json::from_slice(&event.body).unwrap();
            let fields: Vec<&str> = m.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(fields, FIELDS, "{m}");
            let device = m["DeviceId"].as_str().unwrap();
            assert_eq!(
                event.partition_key.as_deref(),
                Some(iomt_core::measurement::partition_key(device).as_str()),
                "{m}"
            );
            assert!(m["IngestionTimeUtc"].is_string(), "{m}");
            partitions_of
                .entry(device.to_owned())
                .or_default()
                .insert(partition.clone());
        }
    }
    for (device, partitions) in &partitions_of {
        assert_eq!(partitions.len(), 1, "{device} is on {partitions:?}");
    }
    events
}

/// Every event on `hub`, with its partition.
fn broker_events(broker: &BrokerHandle, hub: &str) -> Vec<(String, StoredEvent)> {
    broker
        .partition_ids(hub)
        .unwrap()
        .into_iter()
        .flat_map(|p| {
            let events = broker.events(hub, &p).unwrap();
            events.into_iter().map(move |e| (p.clone(), e))
        })
        .collect()
}

/// Each subscription received every version on the server it matches, under one event id:
/// the JSON Lines file all of them, the Event Hub (binary CloudEvents, keyed `Type/id`, every
/// resource on one partition) the Patients and Devices.
fn check_events(server: &Server, dir: &Path, on_hub: &[(String, StoredEvent)]) {
    let versions = server.versions();
    let file = read_json_lines(&dir.join("all.ndjson"));
    assert_each_version_under_one_id(
        &versions,
        file.iter()
            .map(|e| (announced(e), e["id"].as_str().unwrap().to_owned())),
    );
    let identities: BTreeSet<Version> = versions
        .into_iter()
        .filter(|v| v.0 != "Observation")
        .collect();
    let mut partition_of: BTreeMap<String, String> = BTreeMap::new();
    let mut delivered = Vec::new();
    for (partition, e) in on_hub {
        let p = &e.properties;
        let data: Value = serde_json::from_slice(&e.body).unwrap();
        let version = announced(&serde_json::json!({ "data": data }));
        let key = format!("{}/{}", version.0, version.1);
        assert_eq!(e.partition_key.as_deref(), Some(key.as_str()));
        assert_eq!(e.content_type.as_deref(), Some("application/json"));
        assert_eq!(p["cloudEvents_specversion"], "1.0");
        assert_eq!(p["cloudEvents_partitionkey"], key);
        assert!(p["cloudEvents_type"].starts_with("Microsoft.HealthcareApis.FhirResource"));
        let first = partition_of.entry(key).or_insert_with(|| partition.clone());
        assert_eq!(
            first, partition,
            "a resource's events on several partitions"
        );
        delivered.push((version, p["cloudEvents_id"].clone()));
    }
    assert_each_version_under_one_id(&identities, delivered);
}

/// The measurements a run's summary says it normalized (`  measurements   1,234 normalized, …`).
fn normalized_count(summary: &str) -> u64 {
    let line = summary
        .lines()
        .find_map(|l| l.trim().strip_prefix("measurements"))
        .unwrap_or_else(|| panic!("no measurements line in {summary}"));
    let number = line.split_whitespace().next().unwrap().replace(',', "");
    number.parse().unwrap()
}

#[test]
fn normalize_and_convert_roles_over_the_internal_hub_fill_fhir() {
    let started = Instant::now();
    let server = Server::from_env();
    let mut rng = rng();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "roles");
    let dir = scratch.path();
    let capture = Capture::cut(dir);
    let lines: Vec<String> = std::fs::read_to_string(&capture.path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    server.reset();

    let Cluster {
        rt,
        broker,
        store,
        container,
    } = Cluster::start(
        vec![
            HubConfig::new(DEVICE_HUB, 4).unwrap(),
            HubConfig::new(INTERNAL_HUB, 4).unwrap(),
            HubConfig::new(EVENT_LOG, 4).unwrap(),
            HubConfig::new(EVENTS_OUT, 2).unwrap(),
        ],
        "roles",
    );
    let config = write_config(dir, &broker, &server.base, &container);

    // Half before the roles start, half while they run.
    let (first, second) = lines.split_at(lines.len() / 2);
    rt.block_on(send(&broker, DEVICE_HUB, first));
    let mut normalize = start_role(dir, &config, "normalize");
    let mut convert = start_role(dir, &config, "convert");
    let mut events = start_role(dir, &config, "events");
    rt.block_on(send(&broker, DEVICE_HUB, second));

    // The device hub is done once every measurement is stored on the internal hub (normalize
    // checkpoints only then), and the internal hub once every group is written.
    // The event log is done once each subscription delivered every record.
    let deadline = Instant::now() + Duration::from_secs(240);
    let readers = [(DEVICE_HUB, CONSUMER_GROUP), (INTERNAL_HUB, CONSUMER_GROUP)]
        .into_iter()
        .chain(SUBSCRIPTIONS.map(|s| (EVENT_LOG, s)));
    for (hub, group) in readers {
        loop {
            normalize.assert_running();
            convert.assert_running();
            events.assert_running();
            let lag = rt.block_on(keda_lag(&broker, &store, hub, group));
            if lag == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{hub} ({group}): lag never reached 0: {lag}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "{hub} ({group}): no lag {:.1} s after the start",
            started.elapsed().as_secs_f64()
        );
    }
    let normalized = check_internal_hub(&broker);
    let delivered_out = broker_events(&broker, EVENTS_OUT);
    let events_summary = events.terminate(STOP_DEADLINE);
    let convert_summary = convert.terminate(STOP_DEADLINE);
    let normalize_summary = normalize.terminate(STOP_DEADLINE);
    eprintln!(
        "normalize: {normalize_summary}\nconvert: {convert_summary}\nevents: {events_summary}"
    );
    rt.block_on(broker.stop());

    check_server(&server, &capture, &mut rng);
    check_events(&server, dir, &delivered_out);
    // Each measurement the normalize role made is on the internal hub, once: no send failed,
    // so none was sent again.
    assert_eq!(
        normalized as u64,
        normalized_count(&normalize_summary),
        "events on the internal hub"
    );

    // Each dead letter once, in the dead-letter container both roles share (a pod's disk
    // goes with the pod), from the stage that failed: unreadable events and events a template
    // fails on from normalize, measurements of a type without a FHIR template from convert.
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for r in export_dead_letters(&config, dir) {
        let expected = match r["kind"].as_str() {
            Some("FhirResourceNotFoundException" | "TemplateNotFoundException") => "convert",
            _ => "normalize",
        };
        assert_eq!(r["stage"], expected, "{r}");
        *kinds
            .entry(r["kind"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for role in ["normalize", "convert"] {
        assert!(
            !dir.join(role).join("deadletter.jsonl").exists(),
            "{role} wrote dead letters to its local disk"
        );
    }
    assert_eq!(kinds, capture.dead_letters, "dead letters per kind");
    eprintln!("passed in {:.1} s", started.elapsed().as_secs_f64());
}
