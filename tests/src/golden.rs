//! The shipped capture (`examples/capture/wearables.jsonl`), its oracle `expected.json`
//! (computed by `examples/capture/generate.py` from the generated data and the MedTech rules,
//! independently of iomt), and the checks of a run's output against it, on NDJSON files or on
//! the FHIR test server (`tests/fhir-server`, whose URL `tests/run.sh` exports as
//! `IOMT_TEST_FHIR_URL`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::repo_root;

/// The system of the identifiers iomt (like MedTech) gives Observations.
pub const SYSTEM: &str = "https://azure.microsoft.com/en-us/services/iomt-fhir-connector/";

/// `examples/capture`: the capture, its templates and its oracle.
pub fn capture_dir() -> PathBuf {
    repo_root().join("examples/capture")
}

fn sha256_hex(text: &str) -> String {
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

/// The FHIR id of the resource with this identifier (Observations: the service system; Patients
/// and Devices in Create mode: no system).
pub fn resource_id(system: &str, value: &str) -> String {
    sha256_hex(&format!("{system}_{value}"))
}

/// The JSON values of a JSON Lines file, blank lines skipped.
pub fn read_json_lines(path: &Path) -> Vec<Value> {
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
pub fn fhir_template(type_name: &str) -> Option<&'static Value> {
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

// ---------------------------------------------------------------------------------------------
// The capture and what it must produce.

/// A capture file and the output the oracle expects from it.
#[derive(Debug)]
pub struct Capture {
    /// As passed to `iomt replay`.
    pub path: PathBuf,
    /// Its records, in file order (line n is `records[n - 1]`).
    pub records: Vec<Value>,
    /// Observation identifier value → the oracle's summary of it.
    pub observations: BTreeMap<String, Value>,
    /// Dead-letter kind → records.
    pub dead_letters: BTreeMap<String, usize>,
    /// Events that match no template.
    pub dropped: u64,
}

impl Capture {
    /// The whole shipped capture.
    pub fn shipped() -> Self {
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

    /// What the golden and crash tests replay: the whole capture, or the cut described in
    /// `tests/replay.rs` with `IOMT_TEST_CUT_CAPTURE=1` (for quick local runs).
    pub fn for_fhir(dir: &Path) -> Self {
        if std::env::var("IOMT_TEST_CUT_CAPTURE").is_ok_and(|v| v == "1") {
            return Self::cut(dir);
        }
        Self::shipped()
    }

    /// The cut described in `tests/replay.rs`: the first five watches and the first oximeter,
    /// cuff and band.
    pub fn cut(dir: &Path) -> Self {
        let cut = Self::wearables(dir, "wearables-cut.jsonl", |kind, n| match kind {
            "watch" => n < 5,
            _ => n < 1,
        });
        let all = oracle_observations(|_| true).len();
        assert!(cut.observations.len() > 100 && cut.observations.len() < all);
        cut
    }

    /// The capture with only the wearables (`watch-…`, `oxi-…`, `bp-cuff-…`, `band-…`) that
    /// `keep(kind, n)` accepts (`watch-003` is `("watch", 3)`), written to `dir/name`. The
    /// poisoned events come from the first five watches, which must be kept, and from the
    /// other devices, which are kept whole: the dead letters and dropped events are those of
    /// the whole capture.
    pub fn wearables(dir: &Path, name: &str, keep: impl Fn(&str, u32) -> bool) -> Self {
        assert!(
            (0..5).all(|n| keep("watch", n)),
            "watch-000 to watch-004 have poisoned events, and must be kept"
        );
        let kept = |device: &str| -> bool {
            let Some((kind, n)) = device.rsplit_once('-') else {
                return true;
            };
            let Ok(n) = n.parse::<u32>() else {
                return true;
            };
            match kind {
                "watch" | "oxi" | "bp-cuff" | "band" => keep(kind, n),
                _ => true,
            }
        };
        let shipped = Self::shipped();
        let path = dir.join(name);
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
        Capture {
            path,
            records,
            observations,
            // Every event of the poisoned devices is kept.
            dead_letters: shipped.dead_letters,
            dropped: shipped.dropped,
        }
    }

    /// The ids of the Patients the Observations reference, and of the Devices with their
    /// Patient's.
    pub fn identities(&self) -> (BTreeSet<String>, BTreeMap<String, String>) {
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

    /// The record of a line of the file (from 1).
    pub fn record_at_line(&self, line: usize) -> Option<&Value> {
        self.records.get(line.checked_sub(1)?)
    }
}

/// The device a captured event came from (its IoT Hub connection).
pub fn connection_device(record: &Value) -> &str {
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
pub fn check_observation(o: &Value, key: &str, expected: &Value) {
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
pub fn check_observations(observations: &[Value], capture: &Capture) {
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
pub fn check_identities(patients: &[Value], devices: &[Value], capture: &Capture) {
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

// ---------------------------------------------------------------------------------------------
// FHIR server.

/// The test FHIR server, through plain HTTP (not iomt's client).
#[derive(Debug)]
pub struct Server {
    /// The FHIR base URL, without a trailing slash.
    pub base: String,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Server {
    /// The server at `IOMT_TEST_FHIR_URL`.
    pub fn from_env() -> Self {
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
    pub fn reset(&self) {
        let status = self.rt.block_on(async {
            let response = self.http.post(self.control_url("/__reset")).send().await;
            response.expect("the FHIR test server answers").status()
        });
        assert!(status.is_success(), "reset: {status}");
    }

    /// `POST` to a test-only control endpoint (`/__history`, `/__faults`), which must succeed.
    pub fn control(&self, path: &str, body: &Value) {
        let status = self.rt.block_on(async {
            let response = self
                .http
                .post(self.control_url(path))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await;
            response.expect("the FHIR test server answers").status()
        });
        assert!(status.is_success(), "{path}: {status}");
    }

    /// The status of `GET` of a test-only control endpoint (`/__bulk/N`).
    pub fn control_status(&self, path: &str) -> u16 {
        self.rt.block_on(async {
            let response = self.http.get(self.control_url(path)).send().await;
            response
                .expect("the FHIR test server answers")
                .status()
                .as_u16()
        })
    }

    /// A write (`PUT`, `POST`, `DELETE`) of `path` under the base, retried while the server
    /// answers 429 or 503: its status and answer.
    pub fn write(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let url = format!("{}/{path}", self.base);
        self.rt.block_on(async {
            loop {
                let mut request = self
                    .http
                    .request(method.clone(), &url)
                    .header("content-type", "application/fhir+json");
                if let Some(body) = body {
                    request = request.body(body.to_string());
                }
                let response = request.send().await.expect("the FHIR test server answers");
                let status = response.status().as_u16();
                if status == 429 || status == 503 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let text = response.text().await.unwrap_or_default();
                return (status, serde_json::from_str(&text).unwrap_or(Value::Null));
            }
        })
    }

    /// `GET {base}/{query}`, which must succeed, as JSON.
    pub fn get(&self, query: &str) -> Value {
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

    /// Every version of every resource of the types iomt writes, from each resource's
    /// history: `(type, id, versionId)`.
    pub fn versions(&self) -> std::collections::BTreeSet<(String, String, String)> {
        let mut versions = std::collections::BTreeSet::new();
        for t in ["Observation", "Patient", "Device"] {
            for r in self.all(t) {
                let id = r["id"].as_str().unwrap();
                let history = self.get(&format!("{t}/{id}/_history"));
                for entry in history["entry"].as_array().unwrap() {
                    let version = entry["resource"]["meta"]["versionId"].as_str().unwrap();
                    versions.insert((t.to_owned(), id.to_owned(), version.to_owned()));
                }
            }
        }
        versions
    }

    /// Every resource of a type, page by page (`_offset`: the test server gives no next links).
    pub fn all(&self, resource_type: &str) -> Vec<Value> {
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

    /// The Observations with the service's identifier `value`, by identifier search.
    pub fn observations_with_identifier(&self, value: &str) -> Vec<Value> {
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
pub fn check_server(server: &Server, capture: &Capture, rng: &mut fastrand::Rng) {
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

/// A random generator seeded with `IOMT_TEST_SEED`, or at random; the seed is printed.
pub fn rng() -> fastrand::Rng {
    let seed = std::env::var("IOMT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("IOMT_TEST_SEED={seed}");
    fastrand::Rng::with_seed(seed)
}

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

/// Checks dead-letter records against the capture and the oracle's counts per kind, each
/// expected item exactly once (also after crashes: an item processed again is not written
/// again). Each record is identified by where it came from: the capture line (normalize stage)
/// or the measurement (convert stage).
pub fn check_dead_letters(records: &[Value], capture: &Capture) {
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

/// Resources by id, without what a write stamps (`meta`, `issued`).
pub fn content(resources: &[Value]) -> BTreeMap<String, Value> {
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
pub fn assert_same_content(what: &str, before: &[Value], after: &[Value]) {
    let (before, after) = (content(before), content(after));
    let ids: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for id in ids {
        assert!(before.get(id) == after.get(id), "{what}/{id} changed");
    }
}
