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
//! golden and crash tests replay the whole capture all the same (at least 10,000 events from
//! at least 20 devices is the requirement); `IOMT_TEST_CUT_CAPTURE=1` makes them replay a cut
//! (120 of its 420 Observations) for quick local runs: every event of the first five watches
//! and of the first oximeter, cuff and band, and every event of any other device (the
//! poisoned ones), so the dead letters are exactly those of the whole capture. The test of
//! windows flushed in parts always replays the cut.
//!
//! The binary is built with `cargo build` on first use (a no-op when it is fresh), in the
//! profile this test was built with.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use iomt_tests::Scratch;
use iomt_tests::golden::{
    Capture, Server, check_identities, check_observations, check_server, fhir_template,
    read_json_lines, rng,
};
use iomt_tests::replay::{Checkpoint, Replay, Running, assert_success, serial};
use serde_json::Value;

/// Every field of a dead-letter record.
const DEAD_LETTER_FIELDS: [&str; 11] = [
    "stage",
    "partition",
    "sequenceNumber",
    "source",
    "kind",
    "message",
    "template",
    "time",
    "payload",
    "properties",
    "systemProperties",
];

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

/// Checks dead-letter records against the capture and the oracle's counts per kind, each
/// expected item exactly once (also after crashes: an item processed again is not written
/// again). Each record is identified by where it came from: the capture line (normalize stage)
/// or the measurement (convert stage).
fn check_dead_letters(records: &[Value], capture: &Capture) {
    let source_prefix = format!("{}:", capture.path.display());
    let mut distinct: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    for r in records {
        for field in DEAD_LETTER_FIELDS {
            assert!(r.get(field).is_some(), "dead letter without {field}: {r}");
        }
        let kind = r["kind"].as_str().unwrap().to_owned();
        assert!(
            capture.dead_letters.contains_key(&kind),
            "unexpected dead letter {r}"
        );
        assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
        assert!(r["time"].is_string(), "{r}");
        let payload = &r["payload"];
        let identity = match r["stage"].as_str() {
            Some("normalize") => {
                let source = r["source"].as_str().unwrap_or_default();
                let line: usize = source
                    .strip_prefix(&source_prefix)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("source {source:?} is not {source_prefix}<line>"));
                let event = capture
                    .record_at_line(line)
                    .unwrap_or_else(|| panic!("{source}: no such line"));
                assert_eq!(r["partition"], event["Partition"], "{source}: partition");
                let sequence = &event["SystemProperties"]["x-opt-sequence-number"];
                assert_eq!(&r["sequenceNumber"], sequence, "{source}: sequence number");
                assert_eq!(r["systemProperties"], event["SystemProperties"], "{source}");
                assert_eq!(r["properties"], event["Properties"], "{source}");
                if let Some(text) = event.get("BodyText") {
                    assert_eq!(kind, "InvalidDataFormatException", "{source}");
                    assert_eq!(payload["text"], *text, "{source}: payload");
                } else {
                    assert_ne!(kind, "InvalidDataFormatException", "{source}");
                    assert_eq!(payload["json"], event["Body"], "{source}: payload");
                }
                source.to_owned()
            }
            Some("convert") => {
                // A measurement whose type has no FHIR template.
                assert_eq!(kind, "TemplateNotFoundException", "{r}");
                let m = &payload["json"];
                let type_name = m["type"].as_str().unwrap_or_else(|| panic!("payload {r}"));
                assert!(
                    fhir_template(type_name).is_none(),
                    "{type_name} has a template"
                );
                assert!(
                    m["deviceId"].is_string() && m["occurrenceTimeUtc"].is_string(),
                    "{r}"
                );
                assert!(
                    m["properties"].as_array().is_some_and(|p| !p.is_empty()),
                    "{r}"
                );
                format!(
                    "{} {} {}",
                    m["deviceId"], m["occurrenceTimeUtc"], m["properties"]
                )
            }
            other => panic!("dead letter of stage {other:?}: {r}"),
        };
        *total.entry(kind.clone()).or_default() += 1;
        distinct.entry(kind).or_default().insert(identity);
    }
    let distinct: BTreeMap<String, usize> =
        distinct.into_iter().map(|(k, s)| (k, s.len())).collect();
    assert_eq!(
        distinct, capture.dead_letters,
        "distinct dead letters per kind"
    );
    assert_eq!(total, capture.dead_letters, "dead letters per kind");
}

// ---------------------------------------------------------------------------------------------
// NDJSON output.

fn ndjson(dir: &Path, resource_type: &str) -> Vec<Value> {
    read_json_lines(&dir.join(format!("{resource_type}.ndjson")))
}

/// Resources by id, without what a write stamps (`meta`, `issued`).
fn content(resources: &[Value]) -> BTreeMap<String, Value> {
    resources
        .iter()
        .map(|r| {
            let mut r = r.clone();
            let m = r.as_object_mut().unwrap();
            m.remove("meta");
            m.remove("issued");
            (m["id"].as_str().unwrap().to_owned(), r)
        })
        .collect()
}

/// Checks two sets of resources are the same but for `meta` and `issued`, naming the first
/// difference.
fn assert_same_content(what: &str, before: &[Value], after: &[Value]) {
    let (before, after) = (content(before), content(after));
    let ids: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for id in ids {
        assert!(before.get(id) == after.get(id), "{what}/{id} changed");
    }
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

#[test]
fn killed_replay_resumes_to_the_golden_state() {
    let _serial = serial();
    let server = Server::from_env();
    let mut rng = rng();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "replay-fhir-killed");
    let capture = Capture::for_fhir(scratch.path());
    let mut replay = Replay::new(&capture, scratch.path()).fhir(&server.base);
    server.reset();

    // Kill the replay with SIGKILL once or twice, each time at a random moment after its
    // checkpoint moved (so that part of the output is on the server and part is not, and the
    // next run resumes), then let it finish. The checkpoint is committed every 100 ms rather
    // than every 2 s, as otherwise it moves only at the very end of a run this short. A run
    // that finishes before its kill makes the next one be killed sooner; after five runs it is
    // left to finish (the test then passes, with a warning if no run resumed).
    replay
        .env
        .push(("IOMT__PIPELINE__CHECKPOINT_INTERVAL".into(), "100ms".into()));
    let kills = rng.usize(1..=2);
    let mut max_delay = Duration::from_millis(1000);
    let (mut killed, mut resumed, mut runs) = (0, 0, 0);
    loop {
        runs += 1;
        let before = replay.checkpoint();
        let resumes = before.is_some_and(Checkpoint::resumes);
        let from = before.filter(|c| c.resumes()).map_or(0, |c| c.position);
        let mut run = Running::start(&replay, runs);
        let started = Instant::now();
        let kill = killed < kills && runs <= 5;
        let mut status = None;
        if kill {
            // Wait for the checkpoint to move past where this run started, then a random delay.
            let moved = |c: Checkpoint| !c.complete && c.position > from;
            while status.is_none() && !replay.checkpoint().is_some_and(moved) {
                let waited = started.elapsed();
                assert!(waited < Duration::from_secs(300), "run {runs}: no progress");
                std::thread::sleep(Duration::from_millis(5));
                status = run.exited();
            }
            let until = Instant::now() + max_delay.mul_f64(rng.f64());
            while status.is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
                status = run.exited();
            }
        }
        let (status, stderr) = match status {
            Some(status) => (status, run.stderr()),
            None if kill => run.kill(),
            None => run.wait(),
        };
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(
            stderr.contains("resuming"),
            resumes,
            "run {runs} after checkpoint {before:?}:\n{stderr}"
        );
        resumed += usize::from(resumes);
        if status.success() {
            eprintln!("run {runs}: finished in {elapsed:.2} s (resumed: {resumes})");
            if !kill {
                break;
            }
            // It finished before its kill: kill the next one (which starts over) sooner.
            max_delay /= 2;
        } else {
            // Killed; a run that fails on its own fails the test here.
            assert!(
                kill && status.code().is_none(),
                "run {runs}: {status}\n{stderr}"
            );
            killed += 1;
            let after = replay.checkpoint();
            eprintln!(
                "run {runs}: killed after {elapsed:.2} s (resumed: {resumes}); \
                 checkpoint {before:?} -> {after:?}"
            );
        }
    }
    eprintln!("{runs} runs, {killed} killed, {resumed} resumed");
    if resumed == 0 {
        eprintln!("warning: no run was killed mid-way; the resume path went untested");
    }
    assert_eq!(replay.checkpoint().map(|c| c.complete), Some(true));

    check_server(&server, &capture, &mut rng);
    // However often a run was killed, each item is dead-lettered once.
    check_dead_letters(&replay.dead_letters(), &capture);
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
