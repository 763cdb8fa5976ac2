//! Change events end to end, from `iomt replay` to real receivers on loopback.
//!
//! * The shipped capture into the embedded store, with five subscriptions: two JSON Lines
//!   files (one filtered), two webhooks served by `tests/python/webhook_receiver.py`, which
//!   verifies every Standard Webhooks signature with the independent `standardwebhooks`
//!   package, answers the CloudEvents and Event Grid handshakes, and injects a 429, a 503, a 500
//!   and a timeout, and an Event Grid custom topic (the same receiver, checking the topic key).
//!   Every resource version yields exactly one event per matching subscription, no
//!   default-format event carries a patient or device identifier, and a second replay of the
//!   same data (every write unchanged) delivers nothing.
//! * A replay into the FHIR test server killed with SIGKILL at random moments and resumed:
//!   every version the server holds is delivered, none is invented, and the only duplicates
//!   carry the same event id.
//! * Kafka subscriptions (Tansu), checked by an independent consumer: keys and `ce_*` headers.
//! * A Kafka topic (Tansu) as the event log of cluster mode, read by `iomt run --role events`
//!   in a consumer group per subscription.
//!
//! `tests/run.sh` sets `IOMT_TEST_PYTHON` (a Python with the tools of `tests/python`),
//! `IOMT_TEST_KAFKA` (Tansu) and `IOMT_TEST_FHIR_URL`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use iomt_tests::events::{Version, announced, assert_each_version_under_one_id};
use iomt_tests::golden::{Capture, Server, read_json_lines, rng};
use iomt_tests::replay::{Checkpoint, Replay, Running, assert_success, serial};
use iomt_tests::{PythonServer, Scratch, python};
use serde_json::Value;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SOURCE: &str =
    "/subscriptions/s/resourceGroups/r/providers/Microsoft.HealthcareApis/workspaces/test";
const ACCOUNT: &str = "test.fhir.example.org";
const TOPIC_KEY: &str = "topic-access-key";

/// The webhook receiver, killed when dropped.
struct Receiver {
    server: PythonServer,
    record: PathBuf,
}

impl Receiver {
    fn start(dir: &Path, faults: &[&str]) -> Self {
        let record = dir.join("received.jsonl");
        let mut args: Vec<std::ffi::OsString> = vec![
            "--secret".into(),
            SECRET.into(),
            "--record".into(),
            record.clone().into(),
            "--topic-key".into(),
            TOPIC_KEY.into(),
        ];
        for fault in faults {
            args.extend(["--fault".into(), (*fault).into()]);
        }
        Receiver {
            server: PythonServer::start("webhook_receiver.py", args),
            record,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.server.port)
    }

    fn records(&self) -> Vec<Value> {
        if self.record.exists() {
            read_json_lines(&self.record)
        } else {
            Vec::new()
        }
    }
}

/// The versions in an exported store (`{Type}.ndjson` files): version 1 of every resource
/// after one replay.
fn exported(out: &Path) -> BTreeSet<Version> {
    let mut versions = BTreeSet::new();
    for t in ["Observation", "Patient", "Device"] {
        for r in read_json_lines(&out.join(format!("{t}.ndjson"))) {
            versions.insert((
                t.to_owned(),
                r["id"].as_str().unwrap().to_owned(),
                r["meta"]["versionId"].as_str().unwrap().to_owned(),
            ));
        }
    }
    versions
}

fn config(dir: &Path, receiver: &Receiver) -> PathBuf {
    let path = dir.join("events.toml");
    let file = |name: &str| dir.join(name).display().to_string();
    std::fs::write(
        &path,
        format!(
            r#"
[events]
source = "{SOURCE}"
fhir_account = "{ACCOUNT}"

[[subscriptions]]
name = "all"
destination = {{ kind = "ndjson", path = "{all}" }}

[[subscriptions]]
name = "observations-created"
format = "event-grid"
filter = {{ included_event_types = ["Microsoft.HealthcareApis.FhirResourceCreated"], resource_types = ["Observation"] }}
destination = {{ kind = "ndjson", path = "{observations}" }}

[[subscriptions]]
name = "signed"
format = "cloudevents-binary"
filter = {{ advanced_filters = [{{ operator_type = "StringNotIn", key = "data.resourceType", values = ["device"] }}] }}
destination = {{ kind = "webhook", url = "{signed}", secret = "{SECRET}", timeout = "1s" }}

[[subscriptions]]
name = "grid"
format = "event-grid"
destination = {{ kind = "webhook", url = "{grid}", secret = "{SECRET}", timeout = "1s" }}

[[subscriptions]]
name = "topic"
filter = {{ resource_types = ["Patient", "Device"] }}
destination = {{ kind = "event-grid", endpoint = "{topic}", key = "{TOPIC_KEY}" }}
"#,
            all = file("all.ndjson"),
            observations = file("observations.ndjson"),
            signed = receiver.url("signed"),
            grid = receiver.url("grid"),
            topic = receiver.url("api/events"),
        ),
    )
    .unwrap();
    path
}

#[test]
fn every_change_reaches_each_matching_subscription_once() {
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "events-embedded");
    let dir = scratch.path();
    let capture = Capture::shipped();
    let receiver = Receiver::start(dir, &["429:1", "503:1", "500", "timeout:3"]);
    let mut replay = Replay::new(&capture, dir);
    replay.args.extend([
        "--config".to_owned(),
        config(dir, &receiver).display().to_string(),
    ]);
    let started = Instant::now();
    let output = replay.run();
    assert_success(&output);
    eprintln!(
        "replay with deliveries: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);

    let versions = exported(&replay.out);
    assert_eq!(versions.len(), 420 + 24 + 24);

    // The unfiltered file: every version once, in log order, each with its own id.
    let all = read_json_lines(&dir.join("all.ndjson"));
    let announced_all: Vec<Version> = all.iter().map(announced).collect();
    assert_eq!(
        announced_all.iter().cloned().collect::<BTreeSet<_>>(),
        versions
    );
    assert_eq!(announced_all.len(), versions.len(), "no version twice");
    let ids: BTreeSet<&str> = all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), all.len());
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["source"], SOURCE);
        assert_eq!(e["sequence"], format!("{:020}", i + 1));
        let (t, id, _) = announced(e);
        assert_eq!(e["subject"], format!("{ACCOUNT}/{t}/{id}"));
        assert_eq!(e["partitionkey"], format!("{t}/{id}"));
    }

    // The filtered file, in the Event Grid schema.
    let observations = read_json_lines(&dir.join("observations.ndjson"));
    assert_eq!(observations.len(), 420);
    for e in &observations {
        assert_eq!(
            e["eventType"],
            "Microsoft.HealthcareApis.FhirResourceCreated"
        );
        assert_eq!(e["data"]["resourceType"], "Observation");
        assert_eq!(e["topic"], SOURCE);
        assert_eq!(e["dataVersion"], "1");
    }

    // The webhooks: signed (the receiver checked each signature, and would have answered an
    // invalid one 401), handshaken, and every matching version accepted once.
    let records = receiver.records();
    let kinds = |kind: &str| records.iter().filter(|r| r["kind"] == kind).count();
    assert_eq!(kinds("invalid"), 0);
    assert_eq!(kinds("options"), 1, "the CloudEvents handshake of `signed`");
    assert_eq!(kinds("validation"), 1, "Event Grid's handshake of `grid`");
    assert_eq!((kinds("fault"), kinds("late")), (3, 1));
    let mut signed = BTreeMap::new();
    let mut grid = BTreeMap::new();
    for r in records.iter().filter(|r| r["kind"] == "accepted") {
        let headers = &r["headers"];
        let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
        let id = headers["webhook-id"].as_str().unwrap().to_owned();
        if headers.get("ce-id").is_some() {
            // Binary mode: the attributes in `ce-` headers, `data` as the body.
            assert_eq!(headers["ce-id"], id.as_str());
            assert_eq!(headers["ce-specversion"], "1.0");
            assert_eq!(headers["content-type"], "application/json");
            let event = serde_json::json!({"data": body});
            let version = announced(&event);
            assert!(
                signed.insert(version.clone(), id).is_none(),
                "{version:?} twice"
            );
        } else {
            assert_eq!(headers["aeg-event-type"], "Notification");
            let events = body.as_array().expect("Event Grid posts an array");
            assert_eq!(events.len(), 1);
            assert_eq!(events[0]["id"], id.as_str());
            let version = announced(&events[0]);
            assert!(
                grid.insert(version.clone(), id).is_none(),
                "{version:?} twice"
            );
        }
    }
    let without_devices: BTreeSet<Version> = versions
        .iter()
        .filter(|v| v.0 != "Device")
        .cloned()
        .collect();
    assert_eq!(
        signed.keys().cloned().collect::<BTreeSet<_>>(),
        without_devices
    );
    assert_eq!(grid.keys().cloned().collect::<BTreeSet<_>>(), versions);
    // The Event Grid topic: CloudEvents batches with the topic key, Patients and Devices once.
    let mut published = BTreeMap::new();
    for r in records.iter().filter(|r| r["kind"] == "topic") {
        assert_eq!(
            r["content_type"],
            "application/cloudevents-batch+json; charset=utf-8"
        );
        for e in r["events"].as_array().unwrap() {
            assert_eq!(e["specversion"], "1.0");
            let version = announced(e);
            assert!(
                published.insert(version.clone(), e["id"].clone()).is_none(),
                "{version:?} twice"
            );
        }
    }
    let identities: BTreeSet<Version> = versions
        .iter()
        .filter(|v| v.0 != "Observation")
        .cloned()
        .collect();
    assert_eq!(
        published.keys().cloned().collect::<BTreeSet<_>>(),
        identities
    );
    // The same change is the same event in every subscription.
    for e in &all {
        let v = announced(e);
        assert_eq!(grid[&v], e["id"].as_str().unwrap());
    }
    assert!(
        !dir.join("state/events").read_dir().unwrap().any(|f| f
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("deadletter")),
        "nothing was dead-lettered"
    );
    assert!(stdout.contains("change events"), "{stdout}");

    // No patient or device identifier from the capture in any event.
    let mut delivered = std::fs::read_to_string(dir.join("all.ndjson")).unwrap();
    delivered.push_str(&std::fs::read_to_string(dir.join("observations.ndjson")).unwrap());
    delivered.push_str(&std::fs::read_to_string(&receiver.record).unwrap());
    let mut identifiers = BTreeSet::new();
    for record in &capture.records {
        for key in [
            "deviceId",
            "patientId",
            "device",
            "patient",
            "userId",
            "owner",
            "sensor",
            "subject",
        ] {
            if let Some(Value::String(s)) = record["Body"].get(key) {
                identifiers.insert(s.clone());
            }
        }
        if let Some(d) = record["SystemProperties"]["iothub-connection-device-id"].as_str() {
            identifiers.insert(d.to_owned());
        }
    }
    assert!(identifiers.len() > 20);
    for identifier in &identifiers {
        assert!(
            !delivered.contains(&format!("\"{identifier}\"")),
            "{identifier} appears in an event"
        );
    }

    // The same data again: every write is unchanged, so no event (the webhooks are only
    // handshaken again).
    let accepted = || {
        let records = receiver.records();
        records.iter().filter(|r| r["kind"] == "accepted").count()
    };
    let before = (
        std::fs::read_to_string(dir.join("all.ndjson")).unwrap(),
        accepted(),
    );
    replay.args.push("--restart".to_owned());
    assert_success(&replay.run());
    let after = (
        std::fs::read_to_string(dir.join("all.ndjson")).unwrap(),
        accepted(),
    );
    assert_eq!(before, after);
}

#[test]
fn killed_replays_into_a_fhir_server_deliver_every_version() {
    let _serial = serial();
    let server = Server::from_env();
    let mut rng = rng();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "events-fhir-killed");
    let dir = scratch.path();
    let capture = Capture::cut(dir);
    let mut replay = Replay::new(&capture, dir).fhir(&server.base);
    server.reset();
    let events = dir.join("all.ndjson");
    let config = dir.join("events.toml");
    std::fs::write(
        &config,
        format!(
            "[[subscriptions]]\nname = \"all\"\ndestination = {{ kind = \"ndjson\", path = \"{}\" }}\n",
            events.display()
        ),
    )
    .unwrap();
    replay
        .args
        .extend(["--config".to_owned(), config.display().to_string()]);
    replay
        .env
        .push(("IOMT__PIPELINE__CHECKPOINT_INTERVAL".into(), "100ms".into()));

    // Kill once or twice, each time at a random moment after the checkpoint moved, then let
    // the replay finish.
    let kills = rng.usize(1..=2);
    let mut killed = 0;
    for run in 1..=6 {
        let from = replay
            .checkpoint()
            .filter(|c| c.resumes())
            .map_or(0, |c| c.position);
        let mut running = Running::start(&replay, run);
        if killed < kills && run < 6 {
            let moved = |c: Checkpoint| !c.complete && c.position > from;
            let started = Instant::now();
            let mut exited = None;
            while exited.is_none() && !replay.checkpoint().is_some_and(moved) {
                assert!(started.elapsed() < Duration::from_secs(300), "no progress");
                std::thread::sleep(Duration::from_millis(5));
                exited = running.exited();
            }
            std::thread::sleep(Duration::from_millis(rng.u64(0..800)));
            if exited.is_none() && running.exited().is_none() {
                let (status, _) = running.kill();
                assert!(status.code().is_none());
                killed += 1;
                eprintln!("run {run}: killed");
                continue;
            }
        }
        let (status, stderr) = running.wait();
        assert!(status.success(), "run {run}: {status}\n{stderr}");
        if replay.checkpoint().is_some_and(|c| c.complete) && killed >= kills {
            break;
        }
    }
    assert_eq!(replay.checkpoint().map(|c| c.complete), Some(true));

    // Every version the server holds, from each resource's history.
    let on_server = server.versions();
    let delivered = read_json_lines(&events);
    assert_each_version_under_one_id(
        &on_server,
        delivered
            .iter()
            .map(|e| (announced(e), e["id"].as_str().unwrap().to_owned())),
    );
    eprintln!(
        "{killed} kills; {} versions, {} deliveries",
        on_server.len(),
        delivered.len()
    );
}

/// Runs a tool of `tests/python/kafka_tool.py`; its standard output.
fn kafka_tool(args: &[&str]) -> String {
    let script = iomt_tests::repo_root().join("tests/python/kafka_tool.py");
    let output = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("the Kafka tool runs");
    assert!(
        output.status.success(),
        "kafka_tool {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn kafka_subscriptions_are_keyed_by_resource_and_carry_cloudevents_headers() {
    let brokers = std::env::var("IOMT_TEST_KAFKA")
        .expect("IOMT_TEST_KAFKA is not set: run tests/run.sh, which starts Tansu");
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "events-kafka");
    let dir = scratch.path();
    let suffix = format!("{}-{:x}", std::process::id(), fastrand::u32(..));
    let (binary, structured) = (format!("binary-{suffix}"), format!("structured-{suffix}"));
    for topic in [&binary, &structured] {
        kafka_tool(&["create", &brokers, topic, "4"]);
    }
    let config = dir.join("events.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[events]
source = "{SOURCE}"
fhir_account = "{ACCOUNT}"

[[subscriptions]]
name = "binary"
format = "cloudevents-binary"
destination = {{ kind = "kafka", brokers = "{brokers}", topic = "{binary}" }}

[[subscriptions]]
name = "structured"
filter = {{ resource_types = ["Patient"] }}
destination = {{ kind = "kafka", brokers = "{brokers}", topic = "{structured}" }}
"#
        ),
    )
    .unwrap();
    let capture = Capture::shipped();
    let mut replay = Replay::new(&capture, dir);
    replay
        .args
        .extend(["--config".to_owned(), config.display().to_string()]);
    assert_success(&replay.run());
    let versions = exported(&replay.out);

    let records: Vec<Value> =
        kafka_tool(&["consume", &brokers, &binary, &versions.len().to_string()])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(records.len(), versions.len());
    let mut seen = BTreeSet::new();
    let mut partition_of: BTreeMap<String, i64> = BTreeMap::new();
    for r in &records {
        let headers = &r["headers"];
        let data: Value = serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
        let version = announced(&serde_json::json!({ "data": data }));
        let key = format!("{}/{}", version.0, version.1);
        assert_eq!(r["key"], key.as_str(), "the key is Type/id");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["ce_specversion"], "1.0");
        assert_eq!(headers["ce_source"], SOURCE);
        assert_eq!(
            headers["ce_type"],
            "Microsoft.HealthcareApis.FhirResourceCreated"
        );
        assert_eq!(headers["ce_subject"], format!("{ACCOUNT}/{key}").as_str());
        assert_eq!(headers["ce_partitionkey"], key.as_str());
        for attribute in [
            "ce_id",
            "ce_time",
            "ce_sequence",
            "ce_traceparent",
            "ce_dataschema",
        ] {
            assert!(headers[attribute].is_string(), "{attribute} in {headers}");
        }
        // The events of a resource stay on one partition.
        let partition = r["partition"].as_i64().unwrap();
        assert_eq!(*partition_of.entry(key).or_insert(partition), partition);
        assert!(seen.insert(version), "a version twice");
    }
    assert_eq!(seen, versions);

    let patients = versions.iter().filter(|v| v.0 == "Patient").count();
    let structured: Vec<Value> =
        kafka_tool(&["consume", &brokers, &structured, &patients.to_string()])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(structured.len(), patients);
    for r in &structured {
        assert!(
            r["headers"]["content-type"]
                .as_str()
                .unwrap()
                .starts_with("application/cloudevents+json")
        );
        let event: Value = serde_json::from_str(r["value"].as_str().unwrap()).unwrap();
        assert_eq!(event["data"]["resourceType"], "Patient");
        assert_eq!(r["key"], event["partitionkey"]);
    }
}

/// A Kafka topic as the event log of cluster mode: a replay appends a record per version
/// before its checkpoint moves, and `iomt run --role events` delivers them to two
/// subscriptions, each reading the topic in its own consumer group and committing its offsets
/// once its events are delivered.
#[test]
fn a_kafka_event_log_feeds_the_events_role() {
    let brokers = std::env::var("IOMT_TEST_KAFKA")
        .expect("IOMT_TEST_KAFKA is not set: run tests/run.sh, which starts Tansu");
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "events-kafka-log");
    let dir = scratch.path();
    let suffix = format!("{}-{:x}", std::process::id(), fastrand::u32(..));
    let topic = format!("fhir-changes-{suffix}");
    kafka_tool(&["create", &brokers, &topic, "4"]);
    let groups = [format!("all-{suffix}"), format!("patients-{suffix}")];
    let (all, patients) = (dir.join("all.ndjson"), dir.join("patients.ndjson"));
    let config = dir.join("events.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[events]
source = "{SOURCE}"
fhir_account = "{ACCOUNT}"
kafka_log = {{ brokers = "{brokers}", topic = "{topic}" }}

[[subscriptions]]
name = "all"
consumer_group = "{all_group}"
destination = {{ kind = "ndjson", path = "{all}" }}

[[subscriptions]]
name = "patients"
consumer_group = "{patients_group}"
filter = {{ resource_types = ["Patient"] }}
destination = {{ kind = "ndjson", path = "{patients}" }}
"#,
            all_group = groups[0],
            patients_group = groups[1],
            all = all.display(),
            patients = patients.display(),
        ),
    )
    .unwrap();
    let capture = Capture::shipped();
    let mut replay = Replay::new(&capture, dir);
    replay
        .args
        .extend(["--config".to_owned(), config.display().to_string()]);
    assert_success(&replay.run());
    let versions = exported(&replay.out);
    let expected_patients = versions.iter().filter(|v| v.0 == "Patient").count();

    let state = dir.join("events-state");
    let mut events = iomt_tests::IomtProcess::start(
        dir,
        "events",
        [
            "run",
            "--role",
            "events",
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
        "info,rdkafka=warn",
    );
    let lines = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    // A consumer group's first join takes Tansu about 20 s.
    let deadline = Instant::now() + Duration::from_secs(180);
    while lines(&all) < versions.len() || lines(&patients) < expected_patients {
        events.assert_running();
        assert!(
            Instant::now() < deadline,
            "delivered {} of {} and {} of {}",
            lines(&all),
            versions.len(),
            lines(&patients),
            expected_patients
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Offsets are committed on the checkpoint interval, and at the end.
    let summary = events.terminate(Duration::from_secs(60));
    eprintln!("events role: {summary}");

    let delivered = read_json_lines(&all);
    assert_each_version_under_one_id(
        &versions,
        delivered
            .iter()
            .map(|e| (announced(e), e["id"].as_str().unwrap().to_owned())),
    );
    assert_eq!(delivered.len(), versions.len(), "no version twice");
    let patient_events = read_json_lines(&patients);
    assert_eq!(patient_events.len(), expected_patients);
    assert!(
        patient_events
            .iter()
            .all(|e| e["data"]["resourceType"] == "Patient")
    );
    for group in &groups {
        let lag = kafka_tool(&["lag", &brokers, &topic, group]);
        assert_eq!(lag.trim(), "0", "{group}: every record committed");
    }
}
