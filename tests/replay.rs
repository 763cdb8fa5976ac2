//! End to end runs of the `iomt` binary's `replay` command over the shipped capture
//! (`examples/capture/wearables.jsonl`), checked against its oracle `expected.json`, which
//! `examples/capture/generate.py` computes from the generated data and the MedTech rules,
//! independently of iomt.
//!
//! The NDJSON test replays the whole capture. The FHIR tests run against the real FHIR test
//! server (`tests/fhir-server`, started by `tests/run.sh`, which sets `IOMT_TEST_FHIR_URL`),
//! reset it first (`POST /__reset`) and run one at a time; nothing else may use the server
//! meanwhile (`cargo test` runs test binaries one after another). The test server searches
//! Observations by identifier in time proportional to the Observations it holds, so a replay's
//! writes (one identifier search per Observation) take time quadratic in their number: about
//! 65 s for the whole capture, and more to resume into a server that holds part of it. The
//! golden test (and the kill campaign of `tests/reliability.rs`) replay the whole capture all
//! the same (at least 10,000 events from at least 20 devices is the requirement);
//! `IOMT_TEST_CUT_CAPTURE=1` makes them replay a cut
//! (120 of its 420 Observations) for quick local runs: every event of the first five watches
//! and of the first oximeter, cuff and band, and every event of any other device (the
//! poisoned ones), so the dead letters are exactly those of the whole capture. The test of
//! windows flushed in parts always replays the cut.
//!
//! The binary is built with `cargo build` on first use (a no-op when it is fresh), in the
//! profile this test was built with.

use std::collections::BTreeMap;
use std::path::Path;

use iomt_tests::golden::{
    Capture, Server, assert_same_content, check_dead_letters, check_identities, check_observations,
    check_server, read_json_lines, rng,
};
use iomt_tests::replay::{Replay, assert_success, serial};
use iomt_tests::{PythonServer, Scratch};
use serde_json::Value;

/// Numbers of a summary line, by the word that follows each: the `resources` line
/// `resources  0 created, 0 updated, 420 unchanged` gives created 0, updated 0, unchanged 420.
fn summary_counts(stdout: &[u8], label: &str) -> BTreeMap<String, u64> {
    let stdout = String::from_utf8_lossy(stdout);
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(label) || l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in the summary:\n{stdout}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .filter_map(|w| {
            let n = w[0].replace(',', "").parse::<u64>().ok()?;
            Some((w[1].trim_end_matches(',').to_owned(), n))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// NDJSON output.

fn ndjson(dir: &Path, resource_type: &str) -> Vec<Value> {
    read_json_lines(&dir.join(format!("{resource_type}.ndjson")))
}

fn sorted_lines(path: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

#[test]
fn ndjson_replay_matches_the_oracle() {
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "replay-ndjson");
    let capture = Capture::shipped();
    let replay = Replay::new(&capture, scratch.path());

    let output = replay.run();
    assert_success(&output);
    let events = summary_counts(&output.stdout, "events");
    assert_eq!(
        events["events"],
        capture.records.len() as u64,
        "events read"
    );
    assert_eq!(
        summary_counts(&output.stdout, "dropped")["events"],
        capture.dropped
    );
    let observations = ndjson(&replay.out, "Observation");
    check_observations(&observations, &capture);
    let (patients, devices) = (
        ndjson(&replay.out, "Patient"),
        ndjson(&replay.out, "Device"),
    );
    check_identities(&patients, &devices, &capture);
    let dead_letters = replay.dead_letters();
    check_dead_letters(&dead_letters, &capture);
    assert_eq!(replay.checkpoint().map(|c| c.complete), Some(true));

    // Again into the same output: a finished replay starts over, and nothing changes.
    let files =
        ["Observation", "Patient", "Device"].map(|t| replay.out.join(format!("{t}.ndjson")));
    let before = files.each_ref().map(|f| sorted_lines(f));
    let again = replay.run();
    assert_success(&again);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !stderr.contains("resuming"),
        "a finished replay resumed:\n{stderr}"
    );
    let resources = summary_counts(&again.stdout, "resources");
    assert_eq!(
        (
            resources["created"],
            resources["updated"],
            resources["unchanged"]
        ),
        (0, 0, capture.observations.len() as u64),
        "second run: {resources:?}"
    );
    for (resource_type, before) in [
        ("Observation", &observations),
        ("Patient", &patients),
        ("Device", &devices),
    ] {
        assert_same_content(resource_type, before, &ndjson(&replay.out, resource_type));
    }
    for (file, lines) in files.iter().zip(before) {
        assert!(sorted_lines(file) == lines, "{} changed", file.display());
    }
    // The second run dead-lettered the same items, which the file already holds once.
    assert_eq!(replay.dead_letters(), dead_letters);
}

#[test]
fn fhir_golden_run() {
    let _serial = serial();
    let server = Server::from_env();
    let mut rng = rng();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "replay-fhir-golden");
    let capture = Capture::for_fhir(scratch.path());
    let replay = Replay::new(&capture, scratch.path()).fhir(&server.base);
    server.reset();

    let output = replay.run();
    assert_success(&output);
    assert_eq!(
        summary_counts(&output.stdout, "events")["events"],
        capture.records.len() as u64
    );
    assert_eq!(
        summary_counts(&output.stdout, "dropped")["events"],
        capture.dropped
    );
    check_server(&server, &capture, &mut rng);
    check_dead_letters(&replay.dead_letters(), &capture);
    assert_eq!(replay.checkpoint().map(|c| c.complete), Some(true));
}

/// A window flushed in parts (here buffers are open 100 ms at most, while the input is read in
/// about a second) is written by concurrent group writes, which must merge rather than
/// overwrite each other.
#[test]
fn windows_flushed_in_parts_keep_every_sample() {
    let _serial = serial();
    let server = Server::from_env();
    let mut rng = rng();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "replay-fhir-parts");
    let capture = Capture::cut(scratch.path());
    let mut replay = Replay::new(&capture, scratch.path()).fhir(&server.base);
    replay.args.extend(["--max-wait".into(), "100ms".into()]);
    server.reset();

    assert_success(&replay.run());
    check_server(&server, &capture, &mut rng);
    check_dead_letters(&replay.dead_letters(), &capture);
}

/// With an OTLP endpoint in the environment (here a receiver that decodes with the
/// OpenTelemetry project's protobuf definitions), a replay exports its spans as traces: each
/// group write, with the FHIR requests it made as its children, named by type, method and
/// status only; no device or patient id is in any span.
#[test]
fn a_replay_exports_its_spans_as_otlp_traces() {
    let _serial = serial();
    let server = Server::from_env();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "replay-traces");
    let dir = scratch.path();
    let record = dir.join("spans.jsonl");
    let receiver = PythonServer::start(
        "otlp_receiver.py",
        [std::ffi::OsStr::new("--record"), record.as_os_str()],
    );
    let capture = Capture::wearables(dir, "traces.jsonl", |kind, n| kind == "watch" && n < 5);
    let mut replay = Replay::new(&capture, dir).fhir(&server.base);
    replay.env.extend([
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            format!("http://127.0.0.1:{}", receiver.port),
        ),
        ("OTEL_SERVICE_NAME".to_owned(), "iomt-test".to_owned()),
    ]);
    server.reset();
    assert_success(&replay.run());

    let text = std::fs::read_to_string(&record).unwrap_or_default();
    let spans = read_json_lines(&record);
    assert!(
        spans.iter().all(|s| s["kind"] == "span"),
        "the receiver refused an export: {text}"
    );
    assert!(spans.iter().all(|s| s["service"] == "iomt-test"), "{text}");
    let named =
        |name: &str| -> Vec<&Value> { spans.iter().filter(|s| s["name"] == name).collect() };
    let groups = named("write_group");
    let requests = named("fhir_request");
    assert!(!groups.is_empty() && !requests.is_empty(), "{text}");
    for group in &groups {
        let attributes = &group["attributes"];
        assert!(attributes["type"].is_string(), "{group}");
        assert!(attributes["measurements"].as_i64() > Some(0), "{group}");
    }
    for request in &requests {
        let attributes = &request["attributes"];
        assert!(attributes["method"].is_string(), "{request}");
        assert!(attributes["resource"].is_string(), "{request}");
        assert!(attributes["status"].as_i64().is_some(), "{request}");
    }
    // The requests of a write are inside its span, in its trace.
    let group_ids: BTreeMap<&str, &str> = groups
        .iter()
        .map(|g| {
            (
                g["span_id"].as_str().unwrap(),
                g["trace_id"].as_str().unwrap(),
            )
        })
        .collect();
    let nested = requests
        .iter()
        .filter(|r| {
            group_ids.get(r["parent_span_id"].as_str().unwrap()) == r["trace_id"].as_str().as_ref()
        })
        .count();
    assert!(
        nested > 0 && nested == requests.len(),
        "{nested} of {}",
        requests.len()
    );
    for id in ["watch-00", "patient-00"] {
        assert!(!text.contains(id), "a span holds {id}: {text}");
    }
}
