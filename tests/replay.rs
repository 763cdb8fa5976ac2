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
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use iomt_tests::{Scratch, iomt, repo_root};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The system of the identifiers iomt (like MedTech) gives Observations.
const SYSTEM: &str = "https://azure.microsoft.com/en-us/services/iomt-fhir-connector/";

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

/// The FHIR tests reset the one server they share: one at a time.
static FHIR_SERVER: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    FHIR_SERVER.lock().unwrap_or_else(PoisonError::into_inner)
}

fn capture_dir() -> PathBuf {
    repo_root().join("examples/capture")
}

fn sha256_hex(text: &str) -> String {
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

/// The FHIR id of the resource with this identifier (Observations: the service system; Patients
/// and Devices in Create mode: no system).
fn resource_id(system: &str, value: &str) -> String {
    sha256_hex(&format!("{system}_{value}"))
}

fn read_json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

fn oracle() -> &'static Value {
    static ORACLE: OnceLock<Value> = OnceLock::new();
    ORACLE.get_or_init(|| {
        let path = capture_dir().join("expected.json");
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    })
}

fn fhir_mapping() -> &'static Value {
    static MAPPING: OnceLock<Value> = OnceLock::new();
    MAPPING.get_or_init(|| {
        let path = capture_dir().join("fhirmapping.json");
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    })
}

/// The template of a type in the FHIR mapping.
fn fhir_template(type_name: &str) -> Option<&'static Value> {
    fhir_mapping()["template"]
        .as_array()?
        .iter()
        .map(|t| &t["template"])
        .find(|t| {
            t["typeName"]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(type_name))
        })
}

/// One `iomt replay` command line.
struct Replay {
    input: PathBuf,
    state: PathBuf,
    out: PathBuf,
    fhir_url: Option<String>,
    /// Scratch working directory, so that no default path lands in the repository.
    cwd: PathBuf,
    /// More options.
    args: Vec<String>,
    /// Environment of the run (configuration overrides).
    env: Vec<(String, String)>,
}

impl Replay {
    fn new(capture: &Capture, dir: &Path) -> Self {
        Replay {
            input: capture.path.clone(),
            state: dir.join("state"),
            out: dir.join("out"),
            fhir_url: None,
            cwd: dir.to_owned(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    fn fhir(mut self, url: &str) -> Self {
        self.fhir_url = Some(url.to_owned());
        self
    }

    fn command(&self) -> Command {
        let capture = capture_dir();
        let mut args: Vec<OsString> = vec![
            "replay".into(),
            self.input.clone().into(),
            "--device-mapping".into(),
            capture.join("devicecontent.json").into(),
            "--fhir-mapping".into(),
            capture.join("fhirmapping.json").into(),
            "--state-dir".into(),
            self.state.clone().into(),
            "--no-progress".into(),
        ];
        match &self.fhir_url {
            Some(url) => {
                args.extend(["--fhir-url".into(), url.into()]);
                args.extend(["--identity-mode".into(), "create".into()]);
            }
            None => args.extend(["--out".into(), self.out.clone().into()]),
        }
        args.extend(self.args.iter().map(OsString::from));
        let mut cmd = Command::new(iomt());
        cmd.args(args).current_dir(&self.cwd).stdin(Stdio::null());
        // Only this test configures the run.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("IOMT") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn run(&self) -> Output {
        let started = Instant::now();
        let output = self.command().output().expect("iomt runs");
        eprintln!(
            "iomt replay {} in {:.1} s ({})",
            self.fhir_url.as_deref().unwrap_or("NDJSON"),
            started.elapsed().as_secs_f64(),
            output.status
        );
        output
    }

    fn checkpoint(&self) -> Option<Checkpoint> {
        Checkpoint::read(&self.state.join("replay-checkpoint.json"))
    }

    fn dead_letters(&self) -> Vec<Value> {
        read_json_lines(&self.state.join("deadletter.jsonl"))
    }
}

fn assert_success(output: &Output) {
    assert_eq!(
        output.status.code(),
        Some(0),
        "iomt replay failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The replay checkpoint file: how far the output is durable.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Checkpoint {
    complete: bool,
    position: i64,
}

impl Checkpoint {
    fn read(path: &Path) -> Option<Self> {
        // Written atomically (rename), so whatever is there parses.
        let bytes = std::fs::read(path).ok()?;
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        Some(Checkpoint {
            complete: value["complete"].as_bool().expect("complete"),
            position: value["partitions"]["0"].as_i64().unwrap_or(0),
        })
    }

    /// Whether a replay started now resumes after this checkpoint.
    fn resumes(self) -> bool {
        !self.complete && self.position > 0
    }
}

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
// The capture and what it must produce.

/// A capture file and the output the oracle expects from it.
struct Capture {
    /// As passed to `iomt replay`.
    path: PathBuf,
    /// Its records, in file order (line n is `records[n - 1]`).
    records: Vec<Value>,
    /// Observation identifier value → the oracle's summary of it.
    observations: BTreeMap<String, Value>,
    /// Dead-letter kind → records.
    dead_letters: BTreeMap<String, usize>,
    /// Events that match no template.
    dropped: u64,
}

impl Capture {
    fn shipped() -> Self {
        let path = capture_dir().join("wearables.jsonl");
        let records = read_json_lines(&path);
        let oracle = oracle();
        assert_eq!(records.len() as u64, oracle["events"].as_u64().unwrap());
        let devices: BTreeSet<&str> = records.iter().map(connection_device).collect();
        assert_eq!(devices.len() as u64, oracle["devices"].as_u64().unwrap());
        Capture {
            path,
            records,
            observations: oracle_observations(|_| true),
            dead_letters: oracle_dead_letters(),
            dropped: oracle["dropped"].as_u64().unwrap(),
        }
    }

    /// What the golden and crash tests replay: the whole capture, or the cut described at
    /// the top with `IOMT_TEST_CUT_CAPTURE=1` (for quick local runs).
    fn for_fhir(dir: &Path) -> Self {
        if std::env::var("IOMT_TEST_CUT_CAPTURE").is_ok_and(|v| v == "1") {
            return Self::cut(dir);
        }
        Self::shipped()
    }

    /// The cut described at the top.
    fn cut(dir: &Path) -> Self {
        // Wearables of each kind kept; every other device (the poisoned ones) is kept whole.
        let kept = |device: &str| -> bool {
            let Some((kind, n)) = device.rsplit_once('-') else {
                return true;
            };
            let Ok(n) = n.parse::<u32>() else {
                return true;
            };
            match kind {
                "watch" => n < 5,
                "oxi" | "bp-cuff" | "band" => n < 1,
                _ => true,
            }
        };
        let shipped = Self::shipped();
        let path = dir.join("wearables-cut.jsonl");
        let text = std::fs::read_to_string(&shipped.path).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .zip(&shipped.records)
            .filter(|(_, r)| kept(connection_device(r)))
            .map(|(l, _)| l)
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let records = read_json_lines(&path);
        let kept_devices: BTreeSet<String> = records
            .iter()
            .map(|r| resource_id("", connection_device(r)))
            .collect();
        let observations =
            oracle_observations(|o| kept_devices.contains(o["device"].as_str().unwrap()));
        assert!(observations.len() > 100 && observations.len() < shipped.observations.len());
        Capture {
            path,
            records,
            observations,
            // The cut keeps every event of the poisoned devices.
            dead_letters: shipped.dead_letters,
            dropped: shipped.dropped,
        }
    }

    /// The ids of the Patients the Observations reference, and of the Devices with their
    /// Patient's.
    fn identities(&self) -> (BTreeSet<String>, BTreeMap<String, String>) {
        let mut patients = BTreeSet::new();
        let mut devices = BTreeMap::new();
        for o in self.observations.values() {
            let (patient, device) = (
                o["patient"].as_str().unwrap(),
                o["device"].as_str().unwrap(),
            );
            patients.insert(patient.to_owned());
            let previous = devices.insert(device.to_owned(), patient.to_owned());
            assert!(
                previous.is_none_or(|p| p == patient),
                "a device of two patients"
            );
        }
        (patients, devices)
    }

    fn record_at_line(&self, line: usize) -> Option<&Value> {
        self.records.get(line.checked_sub(1)?)
    }
}

fn connection_device(record: &Value) -> &str {
    record["SystemProperties"]["iothub-connection-device-id"]
        .as_str()
        .expect("every captured event names its device")
}

fn oracle_observations(keep: impl Fn(&Value) -> bool) -> BTreeMap<String, Value> {
    oracle()["observations"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, o)| keep(o))
        .map(|(k, o)| (k.clone(), o.clone()))
        .collect()
}

fn oracle_dead_letters() -> BTreeMap<String, usize> {
    oracle()["deadLetters"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap() as usize))
        .collect()
}

/// Non-empty samples of a SampledData value.
fn samples(sampled_data: &Value) -> usize {
    sampled_data["data"]
        .as_str()
        .unwrap_or_else(|| panic!("not SampledData: {sampled_data}"))
        .split(' ')
        .filter(|t| *t != "E")
        .count()
}

fn has_coding(concept: &Value, system: &str, code: &str) -> bool {
    concept["coding"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["system"] == system && c["code"] == code))
}

/// The component whose code is this value name.
fn component<'a>(o: &'a Value, value_name: &str) -> &'a Value {
    o["component"]
        .as_array()
        .and_then(|cs| {
            cs.iter()
                .find(|c| has_coding(&c["code"], SYSTEM, value_name))
        })
        .unwrap_or_else(|| panic!("no {value_name} component in {}", o["id"]))
}

fn quantity(value: &Value) -> f64 {
    value["valueQuantity"]["value"]
        .as_f64()
        .unwrap_or_else(|| panic!("not a Quantity value: {value}"))
}

/// `20261120090000Z` → `2026-11-20T09:00:00`.
fn compact_to_iso(compact: &str) -> String {
    let c = compact.as_bytes();
    assert!(
        c.len() == 15 && c[14] == b'Z',
        "not a compact time: {compact}"
    );
    let s = |a: usize, b: usize| &compact[a..b];
    format!(
        "{}-{}-{}T{}:{}:{}",
        s(0, 4),
        s(4, 6),
        s(6, 8),
        s(8, 10),
        s(10, 12),
        s(12, 14)
    )
}

/// Checks one Observation against the oracle's summary of its identifier.
fn check_observation(o: &Value, key: &str, expected: &Value) {
    let context = format!("Observation {key}");
    assert_eq!(o["resourceType"], "Observation", "{context}");
    assert_eq!(o["id"], resource_id(SYSTEM, key), "{context}: id");
    assert_eq!(
        o["identifier"],
        json!([{"system": SYSTEM, "value": key}]),
        "{context}: identifier"
    );
    assert_eq!(
        o["subject"]["reference"],
        format!("Patient/{}", expected["patient"].as_str().unwrap()),
        "{context}: subject"
    );
    assert_eq!(
        o["device"]["reference"],
        format!("Device/{}", expected["device"].as_str().unwrap()),
        "{context}: device"
    );
    let type_name = expected["type"].as_str().unwrap();
    assert!(
        has_coding(&o["code"], SYSTEM, type_name),
        "{context}: code {}",
        o["code"]
    );
    let template = fhir_template(type_name).unwrap_or_else(|| panic!("no template {type_name}"));
    for code in template["codes"].as_array().unwrap() {
        let (system, code) = (
            code["system"].as_str().unwrap(),
            code["code"].as_str().unwrap(),
        );
        assert!(
            has_coding(&o["code"], system, code),
            "{context}: no {system}|{code} in {}",
            o["code"]
        );
    }
    // The window, where the identifier spells it out (hourly windows and single readings).
    let segment = key.splitn(4, '.').nth(3).unwrap();
    if let Some((start, end)) = segment.split_once('.') {
        let period = &o["effectivePeriod"];
        for (field, compact) in [("start", start), ("end", end)] {
            let at = period[field].as_str().unwrap_or_default();
            assert!(
                at.starts_with(&compact_to_iso(compact)),
                "{context}: effectivePeriod.{field} {at}"
            );
        }
    }
    match type_name {
        "heartrate" => {
            // Only `hr` has data (no restingHeartRate in the capture).
            assert_eq!(
                o["component"].as_array().map(Vec::len),
                Some(1),
                "{context}"
            );
            let hr = &component(o, "hr")["valueSampledData"];
            assert_eq!(
                samples(hr),
                expected["samples"].as_u64().unwrap() as usize,
                "{context}: hr"
            );
        }
        "spo2" => {
            let n = expected["samples"].as_u64().unwrap() as usize;
            assert_eq!(samples(&o["valueSampledData"]), n, "{context}: spo2");
            // Every oximeter sample has a pulse rate too.
            let pr = &component(o, "pulseRate")["valueSampledData"];
            assert_eq!(samples(pr), n, "{context}: pulseRate");
        }
        "bloodpressure" => {
            for name in ["systolic", "diastolic"] {
                let c = component(o, name);
                assert_eq!(
                    quantity(c),
                    expected[name].as_f64().unwrap(),
                    "{context}: {name}"
                );
                assert_eq!(c["valueQuantity"]["code"], "mm[Hg]", "{context}: {name}");
            }
        }
        "steps" => {
            assert_eq!(
                quantity(o),
                expected["steps"].as_f64().unwrap(),
                "{context}: steps"
            );
            assert_eq!(o["valueQuantity"]["code"], "{steps}", "{context}");
        }
        other => panic!("the oracle has an Observation of type {other}"),
    }
}

/// Checks that `observations` are exactly the expected ones, once each.
fn check_observations(observations: &[Value], capture: &Capture) {
    let mut by_key: BTreeMap<&str, &Value> = BTreeMap::new();
    for o in observations {
        let key = o["identifier"][0]["value"]
            .as_str()
            .unwrap_or_else(|| panic!("an Observation without identifier: {}", o["id"]));
        assert!(
            by_key.insert(key, o).is_none(),
            "Observation {key} is there twice"
        );
    }
    let expected: BTreeSet<&str> = capture.observations.keys().map(String::as_str).collect();
    let found: BTreeSet<&str> = by_key.keys().copied().collect();
    let missing: Vec<_> = expected.difference(&found).collect();
    let extra: Vec<_> = found.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} Observations missing, e.g. {:?}; {} unexpected, e.g. {:?}",
        missing.len(),
        missing.first(),
        extra.len(),
        extra.first()
    );
    for (key, o) in by_key {
        check_observation(o, key, &capture.observations[key]);
    }
}

/// Checks the Patients and Devices: those the Observations reference, with Create mode's ids.
fn check_identities(patients: &[Value], devices: &[Value], capture: &Capture) {
    let (expected_patients, expected_devices) = capture.identities();
    let mut found = BTreeSet::new();
    for p in patients {
        let value = p["identifier"][0]["value"].as_str().unwrap();
        assert_eq!(p["id"], resource_id("", value), "Patient {value}");
        assert!(
            found.insert(p["id"].as_str().unwrap().to_owned()),
            "Patient {value} twice"
        );
    }
    assert_eq!(found, expected_patients, "Patients");
    let mut found = BTreeMap::new();
    for d in devices {
        let value = d["identifier"][0]["value"].as_str().unwrap();
        let id = d["id"].as_str().unwrap();
        assert_eq!(id, resource_id("", value), "Device {value}");
        let patient = d["patient"]["reference"].as_str().unwrap_or_default();
        let patient = patient.strip_prefix("Patient/").unwrap_or(patient);
        assert!(
            found.insert(id.to_owned(), patient.to_owned()).is_none(),
            "Device {value} twice"
        );
    }
    assert_eq!(found, expected_devices, "Devices and their Patients");
}

/// Whether each expected dead letter must be there exactly once, or at least once (after a
/// crash, events between the checkpoint and the crash are processed again: at-least-once).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Times {
    Once,
    AtLeastOnce,
}

/// Checks dead-letter records against the capture and the oracle's counts per kind. Each
/// record is identified by where it came from: the capture line (normalize stage) or the
/// measurement (convert stage).
fn check_dead_letters(records: &[Value], capture: &Capture, times: Times) {
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
    if times == Times::Once {
        assert_eq!(total, capture.dead_letters, "dead letters per kind");
    }
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
    check_dead_letters(&dead_letters, &capture, Times::Once);
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
    // The second run appended its own dead letters, the same ones.
    let all = replay.dead_letters();
    assert_eq!(all[..dead_letters.len()], dead_letters[..]);
    check_dead_letters(&all[dead_letters.len()..], &capture, Times::Once);
}

// ---------------------------------------------------------------------------------------------
// FHIR server.

/// The test FHIR server, through plain HTTP (not iomt's client).
struct Server {
    base: String,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Server {
    fn new() -> Self {
        let base = std::env::var("IOMT_TEST_FHIR_URL").expect(
            "IOMT_TEST_FHIR_URL is not set: run tests/run.sh, which starts the FHIR test server",
        );
        Server {
            base: base.trim_end_matches('/').to_owned(),
            // No idle connections: the server closes them after 5 s, and a replay takes longer.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    fn control_url(&self, path: &str) -> String {
        let root = self.base.split("/fhir/").next().unwrap_or(&self.base);
        format!("{root}{path}")
    }

    /// Forgets every resource.
    fn reset(&self) {
        let status = self.rt.block_on(async {
            let response = self.http.post(self.control_url("/__reset")).send().await;
            response.expect("the FHIR test server answers").status()
        });
        assert!(status.is_success(), "reset: {status}");
    }

    fn get(&self, query: &str) -> Value {
        let url = format!("{}/{query}", self.base);
        self.rt.block_on(async {
            let response = self.http.get(&url).send().await.expect("GET");
            let status = response.status();
            let body = response.bytes().await.expect("body");
            assert!(
                status.is_success(),
                "GET {url}: {status} {}",
                String::from_utf8_lossy(&body)
            );
            serde_json::from_slice(&body).expect("JSON")
        })
    }

    /// Every resource of a type, page by page (`_offset`: the test server gives no next links).
    fn all(&self, resource_type: &str) -> Vec<Value> {
        const PAGE: usize = 1000;
        let mut resources = Vec::new();
        loop {
            let query = format!("{resource_type}?_count={PAGE}&_offset={}", resources.len());
            let bundle = self.get(&query);
            let total = bundle["total"].as_u64();
            let page: Vec<Value> = bundle["entry"]
                .as_array()
                .map(|e| e.iter().map(|e| e["resource"].clone()).collect())
                .unwrap_or_default();
            let last = page.len() < PAGE;
            resources.extend(page);
            if last {
                if let Some(total) = total {
                    assert_eq!(resources.len() as u64, total, "{resource_type}: paging");
                }
                return resources;
            }
        }
    }

    fn observations_with_identifier(&self, value: &str) -> Vec<Value> {
        let bundle = self.get(&format!(
            "Observation?identifier={SYSTEM}|{value}&_count=10"
        ));
        bundle["entry"]
            .as_array()
            .map(|e| e.iter().map(|e| e["resource"].clone()).collect())
            .unwrap_or_default()
    }
}

/// Checks the server holds exactly the expected Observations, Patients and Devices. The
/// identifier search (what iomt itself uses to find an Observation) costs the test server time
/// proportional to the Observations it holds, so it is checked for a random sample; the whole
/// list is checked for duplicates and content.
fn check_server(server: &Server, capture: &Capture, rng: &mut fastrand::Rng) {
    let started = Instant::now();
    check_observations(&server.all("Observation"), capture);
    check_identities(&server.all("Patient"), &server.all("Device"), capture);
    let keys: Vec<&String> = capture.observations.keys().collect();
    for _ in 0..12 {
        let key = keys[rng.usize(..keys.len())];
        let found = server.observations_with_identifier(key);
        assert_eq!(found.len(), 1, "identifier search for {key}");
        check_observation(&found[0], key, &capture.observations[key]);
    }
    eprintln!(
        "checked the server in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn rng() -> fastrand::Rng {
    let seed = std::env::var("IOMT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("IOMT_TEST_SEED={seed}");
    fastrand::Rng::with_seed(seed)
}

#[test]
fn fhir_golden_run() {
    let _serial = serial();
    let server = Server::new();
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
    check_dead_letters(&replay.dead_letters(), &capture, Times::Once);
    assert_eq!(replay.checkpoint().map(|c| c.complete), Some(true));
}

/// A running replay, its output going to files (a pipe nobody reads could block it).
struct Running {
    child: Child,
    stderr: PathBuf,
}

impl Running {
    fn start(replay: &Replay, n: usize) -> Self {
        let stdout = replay.cwd.join(format!("run-{n}.stdout"));
        let stderr = replay.cwd.join(format!("run-{n}.stderr"));
        let child = replay
            .command()
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("iomt starts");
        Running { child, stderr }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// SIGKILL: no drain, no final checkpoint. (It may have finished just before.)
    fn kill(mut self) -> (ExitStatus, String) {
        self.child.kill().unwrap();
        (self.child.wait().unwrap(), self.stderr())
    }

    fn wait(mut self) -> (ExitStatus, String) {
        (self.child.wait().unwrap(), self.stderr())
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

#[test]
fn killed_replay_resumes_to_the_golden_state() {
    let _serial = serial();
    let server = Server::new();
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
    check_dead_letters(&replay.dead_letters(), &capture, Times::AtLeastOnce);
}

/// A window flushed in parts (here buffers are open 100 ms at most, while the input is read in
/// about a second) is written by concurrent group writes, which must merge rather than
/// overwrite each other.
#[test]
fn windows_flushed_in_parts_keep_every_sample() {
    let _serial = serial();
    let server = Server::new();
    let mut rng = rng();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "replay-fhir-parts");
    let capture = Capture::cut(scratch.path());
    let mut replay = Replay::new(&capture, scratch.path()).fhir(&server.base);
    replay.args.extend(["--max-wait".into(), "100ms".into()]);
    server.reset();

    assert_success(&replay.run());
    check_server(&server, &capture, &mut rng);
    check_dead_letters(&replay.dead_letters(), &capture, Times::Once);
}
