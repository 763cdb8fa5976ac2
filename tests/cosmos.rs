//! FHIR to Event Hubs to Cosmos DB, end to end: resources written to the FHIR test server are
//! read from its history by `iomt run --role changes`, appended to the event log hub of the
//! Event Hubs test broker (`tests/eventhubs-broker`), and delivered by `iomt run --role
//! events` to two containers of the Cosmos DB test server (`tests/cosmos`): one partitioned by
//! resource type that removes deleted documents, and one partitioned by patient compartment
//! that keeps tombstones. Checkpoints live in Azurite.
//!
//! Each container must then hold each resource's latest version once: a patient change moves
//! the document between partitions, a resource deleted and created again is back, and a
//! document already newer than anything the server has is left alone; both roles are killed
//! with SIGKILL once on the way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iomt_eventhubs_broker::{BrokerHandle, HubConfig};
use iomt_tests::Scratch;
use iomt_tests::cosmos::Cosmos;
use iomt_tests::eventhubs::{
    Cluster, hub_section, start_role, storage_connection_string, toml_string,
};
use iomt_tests::golden::Server;
use iomt_tests::replay::serial;
use reqwest::Method;
use serde_json::{Value, json};

const EVENT_LOG: &str = "fhirchanges";
const BY_TYPE: &str = "by-type";
const BY_PATIENT: &str = "by-patient";

fn write_config(
    dir: &Path,
    broker: &BrokerHandle,
    server: &Server,
    cosmos: &Cosmos,
    container: &str,
) -> PathBuf {
    // A key in the portal's form: the test server does not check signatures.
    let key =
        "dsZQi3KtZmCv1ljt3VNWNm7sQUF1y5rJfC6kv5JiwvW0EndXdDku/dkKBp8/ufDToSxLzR4y+O/0H/t4bQtVNw==";
    let destination = |container: &str, extra: &str| {
        format!(
            "{{ kind = \"cosmos\", endpoint = {}, database = {}, container = {}, key = {}{extra} }}",
            toml_string(&cosmos.endpoint),
            toml_string(&cosmos.database),
            toml_string(container),
            toml_string(key),
        )
    };
    let config = format!(
        "[fhir]\nurl = {}\n\n\
         [change_feed]\nsettle = \"1s\"\noverlap = \"10s\"\npoll_interval = \"200ms\"\npage_size = 5\n\n\
         [event_log]\n{}\n\
         [checkpoints]\nconnection_string = {}\ncontainer = {}\n\n\
         [events]\npoll_interval = \"200ms\"\n\n\
         [[subscriptions]]\nname = \"by-type\"\nformat = \"full-resource\"\ndestination = {}\n\n\
         [[subscriptions]]\nname = \"by-patient\"\nformat = \"full-resource\"\ndestination = {}\n",
        toml_string(&server.base),
        hub_section(broker, EVENT_LOG, "changes", "1s", "3s"),
        toml_string(&storage_connection_string()),
        toml_string(container),
        destination(BY_TYPE, ""),
        destination(
            BY_PATIENT,
            ", partition_key = \"patient\", on_delete = \"mark\"",
        ),
    );
    let path = dir.join("iomt.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn put(server: &Server, resource: Value) -> Value {
    let path = format!(
        "{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    let (status, answer) = server.write(Method::PUT, &path, Some(&resource));
    assert!(
        status == 200 || status == 201,
        "PUT {path}: {status} {answer}"
    );
    answer
}

fn delete(server: &Server, path: &str) {
    let (status, answer) = server.write(Method::DELETE, path, None);
    assert!(status < 300, "DELETE {path}: {status} {answer}");
}

fn observation(id: &str, patient: &str, value: f64) -> Value {
    json!({
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "valueQuantity": {"value": value, "unit": "/min"}
    })
}

/// What a container should hold: by document id, the partition and the document (the
/// resource as the server has it, with the destination's fields), or a tombstone.
fn expected(
    live: &BTreeMap<String, Value>,
    deleted: &BTreeMap<String, (String, String)>,
    by_patient: bool,
) -> BTreeMap<String, Value> {
    let mut want = BTreeMap::new();
    for (key, resource) in live {
        let (t, id) = key.split_once('/').unwrap();
        let partition = if !by_patient {
            t.to_owned()
        } else if t == "Patient" {
            format!("Patient/{id}")
        } else {
            resource["subject"]["reference"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let mut doc = resource.clone();
        doc["id"] = json!(format!("{t}_{id}"));
        doc["resourceId"] = json!(id);
        doc["partitionKey"] = json!(partition);
        want.insert(format!("{t}_{id}"), doc);
    }
    if by_patient {
        for (key, (version, partition)) in deleted {
            let (t, id) = key.split_once('/').unwrap();
            want.insert(
                format!("{t}_{id}"),
                json!({"id": format!("{t}_{id}"), "resourceType": t, "resourceId": id,
                       "version": version, "deleted": true, "partitionKey": partition}),
            );
        }
    }
    want
}

/// The container's documents by id, tombstones reduced to what the test can predict (the
/// delete's version and time come from the server's history); an id held twice maps to both.
fn held(cosmos: &Cosmos, container: &str) -> BTreeMap<String, Value> {
    let mut held = BTreeMap::new();
    for mut doc in cosmos.documents(container) {
        let id = doc["id"].as_str().unwrap().to_owned();
        if doc["deleted"] == json!(true) {
            let version = doc["meta"]["versionId"].clone();
            let o = doc.as_object_mut().unwrap();
            o.remove("meta");
            o.insert("version".to_owned(), version);
            // Where the resource was; or, when its content was never readable (deleted before
            // delivery read it), its type's partition.
            if o["partitionKey"] == "Observation" {
                o.insert("partitionKey".to_owned(), json!("Patient/p1"));
            }
        }
        // A document moving to another partition (its patient changed) is in both for a
        // moment, created there before it is removed here: not converged yet, which the
        // comparison with what is wanted then says.
        if let Some(first) = held.insert(id.clone(), doc.clone()) {
            held.insert(id, json!({"two documents": [first, doc]}));
        }
    }
    held
}

#[test]
fn fhir_changes_reach_cosmos_db_through_the_event_log_hub() {
    let _serial = serial();
    let server = Server::from_env();
    let cosmos = Cosmos::from_env();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "cosmos");
    let dir = scratch.path();
    server.reset();
    cosmos.create_container(BY_TYPE, "partitionKey");
    cosmos.create_container(BY_PATIENT, "partitionKey");
    // Newer than anything the server will have: must stay as it is.
    let newer = json!({"id": "Observation_kept", "resourceType": "Observation",
                       "resourceId": "kept", "partitionKey": "Observation",
                       "meta": {"versionId": "99", "lastUpdated": "2030-01-01T00:00:00Z"}});
    cosmos.create(BY_TYPE, "Observation", &newer);

    // The runtime runs the broker: it lives as long as the test.
    let Cluster {
        rt: _rt,
        broker,
        container,
        ..
    } = Cluster::start(vec![HubConfig::new(EVENT_LOG, 2).unwrap()], "cosmos");
    let config = write_config(dir, &broker, &server, &cosmos, &container);

    // Before the roles start: patients, observations, updates, a move to another patient, a
    // delete, and a delete followed by a new create.
    for p in ["p1", "p2"] {
        put(
            &server,
            json!({"resourceType": "Patient", "id": p, "active": true}),
        );
    }
    for i in 0..12 {
        put(
            &server,
            observation(&format!("o{i}"), "p1", 60.0 + f64::from(i)),
        );
    }
    put(&server, observation("o1", "p1", 99.0));
    put(&server, observation("o2", "p2", 70.0));
    delete(&server, "Observation/o3");
    delete(&server, "Observation/o4");
    put(&server, observation("o4", "p2", 71.0));
    put(&server, observation("kept", "p1", 1.0));

    let mut changes = start_role(dir, &config, "changes");
    let mut events = start_role(dir, &config, "events");

    // While they run: more of the same.
    std::thread::sleep(Duration::from_secs(2));
    put(&server, observation("o5", "p2", 80.0));
    put(
        &server,
        json!({"resourceType": "Patient", "id": "p1", "active": false}),
    );
    delete(&server, "Observation/o6");
    put(&server, observation("o12", "p2", 90.0));

    // Both roles killed (SIGKILL) at a random moment, restarted, and more changes: the event
    // log and the checkpoints must carry them through.
    std::thread::sleep(Duration::from_millis(fastrand::u64(200..2500)));
    for role in [&mut changes, &mut events] {
        role.assert_running();
        role.child.kill().unwrap();
        role.child.wait().unwrap();
    }
    let mut changes = start_role(dir, &config, "changes");
    let mut events = start_role(dir, &config, "events");
    put(&server, observation("o13", "p1", 91.0));
    put(&server, observation("o5", "p1", 81.0));
    delete(&server, "Observation/o7");

    // What the server holds now; the deleted ones with the version of their delete.
    let mut live = BTreeMap::new();
    for t in ["Patient", "Observation"] {
        for r in server.all(t) {
            let key = format!("{t}/{}", r["id"].as_str().unwrap());
            if key != "Observation/kept" {
                live.insert(key, r);
            }
        }
    }
    // The version a delete names, from the server's history (newest first; instance history
    // of a deleted resource is gone).
    let history = server.get("_history?_count=1000");
    let mut deleted = BTreeMap::new();
    for id in ["o3", "o6", "o7"] {
        let url = format!("Observation/{id}");
        let entry = history["entry"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["request"]["url"] == url.as_str())
            .unwrap();
        assert_eq!(entry["request"]["method"], "DELETE", "{entry}");
        let version = entry["response"]["etag"]
            .as_str()
            .unwrap()
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_owned();
        deleted.insert(url, (version, "Patient/p1".to_owned()));
    }
    let mut want_type = expected(&live, &deleted, false);
    want_type.insert("Observation_kept".to_owned(), newer);
    let want_patient = {
        let mut w = expected(&live, &deleted, true);
        let kept = server.get("Observation/kept");
        let mut live_kept = BTreeMap::new();
        live_kept.insert("Observation/kept".to_owned(), kept);
        w.extend(expected(&live_kept, &BTreeMap::new(), true));
        w
    };

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        changes.assert_running();
        events.assert_running();
        let (by_type, by_patient) = (held(&cosmos, BY_TYPE), held(&cosmos, BY_PATIENT));
        if by_type == want_type && by_patient == want_patient {
            break;
        }
        if Instant::now() > deadline {
            for (name, got, want) in [
                (BY_TYPE, &by_type, &want_type),
                (BY_PATIENT, &by_patient, &want_patient),
            ] {
                for (id, doc) in want {
                    if got.get(id) != Some(doc) {
                        eprintln!("{name} {id}: want {doc}\n  got {:?}", got.get(id));
                    }
                }
                for id in got.keys().filter(|id| !want.contains_key(*id)) {
                    eprintln!("{name} {id}: not expected");
                }
            }
            panic!("the containers did not converge");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    changes.terminate(Duration::from_secs(60));
    let log = events.terminate(Duration::from_secs(60));
    assert!(!log.contains("panicked"), "{log}");
}
