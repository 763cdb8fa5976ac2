//! The change feed (`iomt run --role changes`) against the FHIR test server, whose wrapper
//! serves system and type history from a change log (newest first, offset paging) and lets
//! the test inject the hard cases: many entries at one instant, a late arrival with an older
//! `lastUpdated`, a delete without a resource, an entry without a request, 429 answers, writes
//! between page reads, and history switched off. Each change must arrive exactly once after
//! deduplication by event id, with the feed killed with SIGKILL at random moments.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iomt_tests::eventhubs::{storage_connection_string, toml_string};
use iomt_tests::golden::{Server, read_json_lines, rng};
use iomt_tests::replay::serial;
use iomt_tests::{IomtProcess, Scratch};
use reqwest::Method;
use serde_json::{Value, json};

/// A change: kind, type, id, version.
type Change = (String, String, String, String);

fn write_config(dir: &Path, server: &Server, extra: &str) -> PathBuf {
    let config = format!(
        "[fhir]\nurl = {}\n\n[pipeline]\nrole = \"changes\"\n\n\
         [change_feed]\nsettle = \"1s\"\noverlap = \"15s\"\npoll_interval = \"200ms\"\npage_size = 7\n{extra}\n\
         [output]\nstate_dir = {}\n\n[events]\npoll_interval = \"200ms\"\n\n\
         [[subscriptions]]\nname = \"all\"\ndestination = {{ kind = \"ndjson\", path = {} }}\n",
        toml_string(&server.base),
        toml_string(dir.join("state").to_str().unwrap()),
        toml_string(dir.join("events.ndjson").to_str().unwrap()),
    );
    let path = dir.join("iomt.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn start(dir: &Path, config: &Path, n: usize) -> IomtProcess {
    IomtProcess::start(
        dir,
        &format!("feed-{n}"),
        ["run", "--config", config.to_str().unwrap()],
        "info",
    )
}

/// The delivered events: each distinct id with its change, and how many were delivered.
fn delivered(dir: &Path) -> (BTreeMap<String, Change>, usize) {
    let path = dir.join("events.ndjson");
    if !path.exists() {
        return (BTreeMap::new(), 0);
    }
    // Read while the delivery may be appending: a last line without its newline is still being
    // written, and is left for the next look.
    let text = std::fs::read_to_string(&path).unwrap();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let events: Vec<Value> = complete
        .lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect();
    let mut by_id = BTreeMap::new();
    for e in &events {
        let kind = e["type"]
            .as_str()
            .unwrap()
            .trim_start_matches("Microsoft.HealthcareApis.FhirResource")
            .to_owned();
        let d = &e["data"];
        let change = (
            kind,
            d["resourceType"].as_str().unwrap().to_owned(),
            d["resourceFhirId"].as_str().unwrap().to_owned(),
            // A number when it is one, as Azure sends it.
            match &d["resourceVersionId"] {
                Value::String(v) => v.clone(),
                v => v.to_string(),
            },
        );
        let id = e["id"].as_str().unwrap().to_owned();
        if let Some(before) = by_id.insert(id.clone(), change.clone()) {
            assert_eq!(before, change, "event {id} names two changes");
        }
    }
    (by_id, events.len())
}

/// Writes a resource; its change.
fn put(server: &Server, resource: &Value) -> Change {
    let path = format!(
        "{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    let (status, answer) = server.write(Method::PUT, &path, Some(resource));
    assert!(
        status == 200 || status == 201,
        "PUT {path}: {status} {answer}"
    );
    (
        if status == 201 { "Created" } else { "Updated" }.to_owned(),
        answer["resourceType"].as_str().unwrap().to_owned(),
        answer["id"].as_str().unwrap().to_owned(),
        answer["meta"]["versionId"].as_str().unwrap().to_owned(),
    )
}

/// The instant `seconds` ago.
fn now_minus(seconds: f64) -> String {
    minus(iomt_core::Timestamp::now(), seconds)
}

fn minus(t: iomt_core::Timestamp, seconds: f64) -> String {
    let millis = t.unix_millis() - (seconds * 1000.0) as i64;
    iomt_core::Timestamp::from_unix_millis(millis)
        .unwrap()
        .to_string()
}

/// The watermark the feed checkpointed last.
fn watermark(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("state/changefeed.json")).ok()?;
    serde_json::from_str::<Value>(&text).ok()?["watermark"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn every_change_arrives_once_through_the_hard_cases_and_kills() {
    let _serial = serial();
    let server = Server::from_env();
    let mut rng = rng();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "changefeed");
    let dir = scratch.path();
    server.reset();
    let config = write_config(dir, &server, "");
    let mut expected: BTreeSet<Change> = BTreeSet::new();

    // History before the feed starts (it reads from the beginning).
    for i in 0..20 {
        expected.insert(put(
            &server,
            &json!({"resourceType": "Patient", "id": format!("p{i}"), "active": true}),
        ));
    }
    // Thirty changes at one instant, a delete without a resource, an entry without a request.
    let instant = now_minus(0.5);
    let mut injected = Vec::new();
    for i in 0..30 {
        let id = format!("same-{i:02}");
        injected.push(
            json!({"resourceType": "Observation", "id": id, "versionId": "1",
            "lastUpdated": instant, "method": "PUT", "created": true,
            "resource": {"resourceType": "Observation", "id": id, "status": "final",
                "code": {"text": "x"}, "meta": {"versionId": "1", "lastUpdated": instant}}}),
        );
        expected.insert(("Created".into(), "Observation".into(), id, "1".into()));
    }
    injected.push(
        json!({"resourceType": "Patient", "id": "gone", "versionId": "3",
        "lastUpdated": now_minus(0.4), "method": "DELETE"}),
    );
    expected.insert((
        "Deleted".into(),
        "Patient".into(),
        "gone".into(),
        "3".into(),
    ));
    let at = now_minus(0.3);
    injected.push(json!({"resourceType": "Device", "id": "quiet", "versionId": "2", "lastUpdated": at,
        "resource": {"resourceType": "Device", "id": "quiet", "meta": {"versionId": "2", "lastUpdated": at}}}));
    expected.insert((
        "Updated".into(),
        "Device".into(),
        "quiet".into(),
        "2".into(),
    ));
    server.control("/__history", &json!({"entries": injected}));

    // Writes while the feed runs (they shift the pages it reads), 429s now and then, and
    // SIGKILL at random moments.
    let kills = 3;
    let mut runs = 1;
    let mut feed = start(dir, &config, runs);
    let mut last_version: BTreeMap<String, String> = BTreeMap::new();
    for round in 0..kills + 1 {
        for i in 0..25 {
            let n = rng.usize(0..20);
            let id = format!("p{n}");
            if rng.u8(0..10) == 0 {
                server.control(
                    "/__faults",
                    &json!([{"status": 429, "headers": {"Retry-After": "0"}}]),
                );
            }
            let change = if rng.u8(0..6) == 0 && last_version.contains_key(&id) {
                let (status, answer) = server.write(Method::DELETE, &format!("Patient/{id}"), None);
                assert!(status < 300, "DELETE: {status} {answer}");
                let version = last_version.remove(&id).unwrap();
                ("Deleted".to_owned(), "Patient".to_owned(), id, version)
            } else {
                let c = put(
                    &server,
                    &json!({"resourceType": "Patient", "id": id,
                    "name": [{"family": format!("r{round}-{i}")}]}),
                );
                last_version.insert(c.2.clone(), c.3.clone());
                c
            };
            expected.insert(change);
            std::thread::sleep(Duration::from_millis(rng.u64(0..40)));
        }
        if round < kills {
            feed.assert_running();
            drop(feed); // SIGKILL
            runs += 1;
            feed = start(dir, &config, runs);
        }
    }

    // A late arrival: a change that becomes visible after the watermark passed its time.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mark = loop {
        if let Some(w) = watermark(dir) {
            break w;
        }
        assert!(Instant::now() < deadline, "the feed never checkpointed");
        std::thread::sleep(Duration::from_millis(100));
    };
    let before_mark = minus(iomt_core::Timestamp::parse(&mark).unwrap(), 3.0);
    server.control(
        "/__history",
        &json!({"entries": [{"resourceType": "Encounter", "id": "late",
        "versionId": "1", "lastUpdated": before_mark, "method": "POST", "created": true,
        "resource": {"resourceType": "Encounter", "id": "late", "status": "finished",
            "class": {"code": "AMB"}, "meta": {"versionId": "1", "lastUpdated": before_mark}}}]}),
    );
    expected.insert((
        "Created".into(),
        "Encounter".into(),
        "late".into(),
        "1".into(),
    ));

    // Everything arrives; then the feed is stopped.
    loop {
        feed.assert_running();
        let (by_id, _) = delivered(dir);
        let got: BTreeSet<Change> = by_id.values().cloned().collect();
        if expected.is_subset(&got) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing after 60 s: {:?}",
            expected.difference(&got).take(5).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let summary = feed.terminate(Duration::from_secs(30));
    let (by_id, total) = delivered(dir);
    let got: BTreeSet<Change> = by_id.values().cloned().collect();
    assert_eq!(got, expected, "exactly the changes made, none more");
    assert_eq!(by_id.len(), expected.len(), "one event id per change");
    assert!(summary.contains("late arrivals"), "{summary}");
    let late: u64 = summary
        .split(" late arrivals")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(late >= 1, "the late arrival was counted: {summary}");
    eprintln!(
        "change feed: {} changes, {total} events delivered ({} more than once, across {} kills); {late} late arrival(s)",
        expected.len(),
        total - by_id.len(),
        kills
    );
}

#[test]
fn a_server_without_history_is_refused_and_type_history_is_used_without_system_history() {
    let _serial = serial();
    let server = Server::from_env();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "changefeed-capabilities");
    let dir = scratch.path();
    server.reset();
    let config = write_config(dir, &server, "");

    server.control("/__history", &json!({"enabled": false}));
    let mut feed = start(dir, &config, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = feed.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the feed did not give up");
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = feed.log("stderr");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("history-system") && stderr.contains("history-type"),
        "{stderr}"
    );

    // Type history only: the feed reads each type's. With a checkpoint container (cluster
    // mode), its checkpoint is a blob there.
    server.control("/__history", &json!({"enabled": true, "system": false}));
    let container = format!("feed-{:08x}", fastrand::u32(..));
    let config = write_config(
        dir,
        &server,
        &format!(
            "\n[checkpoints]\nconnection_string = {}\ncontainer = {}\n",
            toml_string(&storage_connection_string()),
            toml_string(&container)
        ),
    );
    let change = put(&server, &json!({"resourceType": "Device", "id": "typed"}));
    let mut feed = start(dir, &config, 2);
    loop {
        feed.assert_running();
        if delivered(dir).0.values().any(|c| *c == change) {
            break;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(30),
            "not delivered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    feed.terminate(Duration::from_secs(30));
    server.reset();
    let blobs = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            iomt_eventhubs::blob::BlobContainer::from_connection_string(
                &storage_connection_string(),
                &container,
            )
            .unwrap()
            .names("changefeed/")
            .await
            .unwrap()
        });
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    assert!(!dir.join("state/changefeed.json").exists());
}

/// Runs `iomt export ARGS… --config CONFIG --status {dir}/status.jsonl`, which must succeed
/// and publish 6 changes with 1 deletion; its summary.
fn export_six_changes(dir: &Path, config: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new(iomt_tests::iomt())
        .arg("export")
        .args(args)
        .arg("--config")
        .arg(config)
        .arg("--status")
        .arg(dir.join("status.jsonl"))
        .env_remove("IOMT_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("exported 6 changes (1 deletions"),
        "{stdout}"
    );
    stdout
}

/// The status events two export runs appended: their types.
fn assert_two_exports_reported(status: &[Value]) {
    let types: Vec<&str> = status.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "iomt.bulkexport.started",
            "iomt.bulkexport.completed",
            "iomt.bulkexport.started",
            "iomt.bulkexport.completed"
        ]
    );
}

/// A Bulk Data export folder (manifest, resource files and a `deleted` file) published with
/// `iomt export --from`: every change arrives once, the deletions as deletions, and a second
/// run of the same export adds nothing.
#[test]
fn a_bulk_data_export_is_published_complete_and_once() {
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "bulk-export");
    let dir = scratch.path();
    let export = dir.join("export");
    std::fs::create_dir_all(&export).unwrap();
    let lines = |values: Vec<Value>| values.iter().map(|v| format!("{v}\n")).collect::<String>();
    let at = "2026-11-01T10:00:00.000Z";
    std::fs::write(
        export.join("Patient.ndjson"),
        lines(
            (0..3)
                .map(|i| {
                    json!({"resourceType": "Patient", "id": format!("p{i}"),
                    "meta": {"versionId": (i + 1).to_string(), "lastUpdated": at}})
                })
                .collect(),
        ),
    )
    .unwrap();
    std::fs::write(
        export.join("Observation.ndjson"),
        lines(
            (0..2)
                .map(|i| {
                    json!({"resourceType": "Observation", "id": format!("o{i}"), "status": "final",
                    "code": {"text": "x"}, "meta": {"versionId": "1", "lastUpdated": at}})
                })
                .collect(),
        ),
    )
    .unwrap();
    std::fs::write(
        export.join("deleted-Patient.ndjson"),
        lines(vec![
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "DELETE", "url": "Patient/p9"}}]}),
        ]),
    )
    .unwrap();
    std::fs::write(
        export.join("manifest.json"),
        json!({"transactionTime": "2026-11-02T00:00:00Z", "request": "https://fhir.example.org/$export?_since=2026-10-01",
            "requiresAccessToken": true,
            "output": [{"type": "Patient", "url": "https://files.example.org/x/Patient.ndjson"},
                       {"type": "Observation", "url": "https://files.example.org/x/Observation.ndjson"}],
            "deleted": [{"type": "Bundle", "url": "https://files.example.org/x/deleted-Patient.ndjson"}],
            "error": []})
        .to_string(),
    )
    .unwrap();
    let config = dir.join("iomt.toml");
    std::fs::write(
        &config,
        format!(
            "[output]\nstate_dir = {}\n\n[events]\ndrain_deadline = \"10s\"\n\n\
             [[subscriptions]]\nname = \"all\"\ndestination = {{ kind = \"ndjson\", path = {} }}\n",
            toml_string(dir.join("state").to_str().unwrap()),
            toml_string(dir.join("events.ndjson").to_str().unwrap()),
        ),
    )
    .unwrap();
    let expected: BTreeSet<Change> = [
        ("Created", "Patient", "p0", "1"),
        ("Updated", "Patient", "p1", "2"),
        ("Updated", "Patient", "p2", "3"),
        ("Created", "Observation", "o0", "1"),
        ("Created", "Observation", "o1", "1"),
        ("Deleted", "Patient", "p9", "0"),
    ]
    .into_iter()
    .map(|(a, b, c, d)| (a.into(), b.into(), c.into(), d.into()))
    .collect();
    for run in 0..2 {
        export_six_changes(dir, &config, &["--from", export.to_str().unwrap()]);
        let (by_id, total) = delivered(dir);
        let got: BTreeSet<Change> = by_id.values().cloned().collect();
        assert_eq!(got, expected, "run {run}");
        assert_eq!(total, 6, "run {run}: nothing delivered twice");
    }
    let status = read_json_lines(&dir.join("status.jsonl"));
    assert_two_exports_reported(&status);
    assert_eq!(status[1]["data"]["deletions"], 1);
    assert_eq!(
        status[1]["id"], status[3]["id"],
        "status event ids are deterministic"
    );
}

/// `iomt export --server` runs a Bulk Data export on the FHIR server: kicks it off with
/// `Prefer: respond-async`, polls its status URL as told, downloads its files next to a
/// manifest naming them, and publishes every current version once, with the resources
/// deleted since `_since` as deletions; a second export adds no event.
#[test]
fn an_export_run_by_the_server_is_downloaded_and_published_once() {
    let _serial = serial();
    let server = Server::from_env();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "server-export");
    let dir = scratch.path();
    server.reset();
    let since = now_minus(60.0);
    for i in 0..3 {
        put(
            &server,
            &json!({"resourceType": "Patient", "id": format!("p{i}")}),
        );
    }
    for i in 0..3 {
        put(
            &server,
            &json!({"resourceType": "Observation", "id": format!("o{i}"), "status": "final",
                    "code": {"text": "x"}, "subject": {"reference": "Patient/p0"}}),
        );
    }
    put(
        &server,
        &json!({"resourceType": "Patient", "id": "p1", "active": true}),
    );
    put(&server, &json!({"resourceType": "Device", "id": "d1"}));
    let (status, _) = server.write(Method::DELETE, "Observation/o2", None);
    assert!(status < 300, "DELETE: {status}");

    let mut expected: BTreeSet<(String, String, String)> = BTreeSet::new();
    for t in ["Patient", "Observation"] {
        for r in server.all(t) {
            let (id, version) = (r["id"].as_str().unwrap(), r["meta"]["versionId"].as_str());
            expected.insert((t.to_owned(), id.to_owned(), version.unwrap().to_owned()));
        }
    }
    assert_eq!(expected.len(), 5);
    expected.insert(("Observation".into(), "o2".into(), "0".into()));
    let config = dir.join("iomt.toml");
    std::fs::write(
        &config,
        format!(
            "[fhir]\nurl = {}\n\n[output]\nstate_dir = {}\n\n[events]\ndrain_deadline = \"10s\"\n\n\
             [[subscriptions]]\nname = \"all\"\ndestination = {{ kind = \"ndjson\", path = {} }}\n",
            toml_string(&server.base),
            toml_string(dir.join("state").to_str().unwrap()),
            toml_string(dir.join("events.ndjson").to_str().unwrap()),
        ),
    )
    .unwrap();
    for run in 0..2 {
        export_six_changes(
            dir,
            &config,
            &[
                "--server",
                "--type",
                "Patient,Observation",
                "--since",
                &since,
            ],
        );
        let (by_id, total) = delivered(dir);
        let got: BTreeSet<(String, String, String)> = by_id
            .values()
            .map(|(kind, t, id, v)| {
                assert_eq!(kind == "Deleted", id == "o2", "{kind} {t}/{id}");
                (t.clone(), id.clone(), v.clone())
            })
            .collect();
        assert_eq!(got, expected, "run {run}");
        assert_eq!(total, 6, "run {run}: nothing delivered twice");
    }
    // The downloads: the files and a manifest naming them where they are.
    let exports: Vec<PathBuf> = std::fs::read_dir(dir.join("state/exports"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(exports.len(), 2, "{exports:?}");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(exports[0].join("manifest.json")).unwrap())
            .unwrap();
    for entry in manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .chain(manifest["deleted"].as_array().unwrap())
    {
        assert!(
            exports[0].join(entry["url"].as_str().unwrap()).is_file(),
            "{manifest}"
        );
    }
    let status = read_json_lines(&dir.join("status.jsonl"));
    assert_two_exports_reported(&status);
    assert!(
        status[0]["subject"].as_str().unwrap().contains("/__bulk/0"),
        "{}",
        status[0]
    );
    assert!(
        status[0]["data"]["request"]
            .as_str()
            .unwrap()
            .contains("_since=")
    );
    assert_ne!(
        status[0]["id"], status[2]["id"],
        "two exports, two status events"
    );

    // An export the server never finishes is cancelled there at --timeout, and the run fails
    // saying so, with a failed status event.
    server.control("/__bulk", &json!({"stuck": true}));
    let output = std::process::Command::new(iomt_tests::iomt())
        .args(["export", "--server", "--timeout", "2s", "--config"])
        .arg(&config)
        .arg("--status")
        .arg(dir.join("status.jsonl"))
        .env_remove("IOMT_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("still in progress after 2s; cancelled on the server"),
        "{stderr}"
    );
    assert_eq!(
        server.control_status("/__bulk/2"),
        404,
        "the job was deleted"
    );
    let status = read_json_lines(&dir.join("status.jsonl"));
    assert_eq!(
        status.last().unwrap()["type"].as_str(),
        Some("iomt.bulkexport.failed")
    );
}

/// Without any history, `fallback = "last-updated-search"` searches each type by
/// `_lastUpdated`; and the doorbell (`POST /notify`) starts a cycle at once, long before the
/// next poll.
#[test]
fn the_search_fallback_and_the_doorbell() {
    let _serial = serial();
    let server = Server::from_env();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "changefeed-doorbell");
    let dir = scratch.path();
    server.reset();
    server.control("/__history", &json!({"enabled": false}));
    let port = iomt_tests::replay::free_port();
    let config = write_config(
        dir,
        &server,
        &format!("fallback = \"last-updated-search\"\ndoorbell_addr = \"127.0.0.1:{port}\"\n"),
    );
    // A poll every minute: only the doorbell can bring changes in during the test.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "poll_interval = \"200ms\"\npage_size",
        "poll_interval = \"60s\"\npage_size",
    );
    std::fs::write(&config, text).unwrap();
    let mut feed = start(dir, &config, 1);
    // The first cycle runs at start; wait until it checkpointed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while watermark(dir).is_none() {
        feed.assert_running();
        assert!(Instant::now() < deadline, "no first cycle");
        std::thread::sleep(Duration::from_millis(50));
    }
    let change = put(
        &server,
        &json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
        "class": {"code": "AMB"}}),
    );
    // Older than the settle interval by the server's clock (its Date header counts whole
    // seconds), then the bell.
    std::thread::sleep(Duration::from_millis(2500));
    let rang = Instant::now();
    let mut bell = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(
        &mut bell,
        b"POST /notify HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .unwrap();
    // A search shows versions without their answers: on a server with opaque versions the
    // fallback cannot tell a creation from an update, so the kind is not compared.
    let same_version = |c: &Change| (&c.1, &c.2, &c.3) == (&change.1, &change.2, &change.3);
    loop {
        feed.assert_running();
        if delivered(dir).0.values().any(same_version) {
            break;
        }
        assert!(
            rang.elapsed() < Duration::from_secs(10),
            "the doorbell did not bring the change in"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "doorbell to delivery: {:.2} s",
        rang.elapsed().as_secs_f64()
    );
    feed.terminate(Duration::from_secs(30));
    server.reset();
}
