//! Runs every sample mapping under `mappings/` against its cases and the example messages
//! under `examples/messages/`, through normalize and (where the sample has a FHIR mapping)
//! convert, so the samples customers copy from are known to work end to end.

use std::path::{Path, PathBuf};

use iomt_convert::{ResourceIds, convert_window, observation_groups};
use iomt_core::{DeviceEvent, MeasurementGroup, Timestamp};
use iomt_normalize::{Normalizer, envelope, envelope_enqueued_time, parse_body};
use iomt_templates::device::DeviceMapping;
use iomt_templates::fhir::FhirMapping;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    #[allow(dead_code)]
    description: String,
    /// `message` (a body, wrapped) or `event` (a full envelope).
    input: String,
    /// Message file, relative to the repository root.
    file: PathBuf,
    measurements: Vec<Value>,
    errors: Vec<ExpectedError>,
    /// Observations from the sample's FHIR mapping, built with placeholder Patient and Device
    /// ids, without `issued` (the time of conversion).
    #[serde(default)]
    observations: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedError {
    kind: String,
    contains: Vec<String>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_sample_mapping_passes_its_cases() {
    let root = repo_root();
    let mut used_messages = Vec::new();
    let mut samples = 0;
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("mappings"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("devicecontent.json").is_file())
        .collect();
    dirs.sort();
    for dir in dirs {
        samples += 1;
        let text = std::fs::read_to_string(dir.join("devicecontent.json")).unwrap();
        let mapping =
            DeviceMapping::parse(&text).unwrap_or_else(|e| panic!("{}: {e:?}", dir.display()));
        let normalizer = Normalizer::new(mapping);
        let fhir = std::fs::read_to_string(dir.join("fhirmapping.json"))
            .ok()
            .map(|text| {
                FhirMapping::parse(&text).unwrap_or_else(|e| panic!("{}: {e:?}", dir.display()))
            });
        let cases = json_files(&dir.join("cases"));
        assert!(!cases.is_empty(), "{} has no cases", dir.display());
        for case_path in cases {
            let case: Case = serde_json::from_str(&std::fs::read_to_string(&case_path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", case_path.display()));
            let bytes = std::fs::read(root.join(&case.file))
                .unwrap_or_else(|e| panic!("{}: {e}", case.file.display()));
            used_messages.push(root.join(&case.file).canonicalize().unwrap());
            let output = match case.input.as_str() {
                "message" => normalizer.normalize_event(&DeviceEvent {
                    body: bytes,
                    ..DeviceEvent::default()
                }),
                "event" => {
                    let doc = parse_body(&bytes).unwrap();
                    normalizer.normalize_value(
                        &doc,
                        envelope_enqueued_time(&doc),
                        &mut iomt_normalize::NoTrace,
                    )
                }
                other => panic!("{}: unknown input {other}", case_path.display()),
            };
            let observations = fhir
                .as_ref()
                .map_or_else(Vec::new, |fhir| convert(fhir, &output.measurements));
            assert_eq!(observations, case.observations, "{}", case_path.display());
            let got: Vec<Value> = output
                .measurements
                .iter()
                .map(|m| serde_json::to_value(m).unwrap())
                .collect();
            assert_eq!(got, case.measurements, "{}", case_path.display());
            assert_eq!(
                output.errors.len(),
                case.errors.len(),
                "{}: {:?}",
                case_path.display(),
                output.errors
            );
            for (got, want) in output.errors.iter().zip(&case.errors) {
                assert_eq!(
                    format!("{:?}", got.kind),
                    want.kind,
                    "{}",
                    case_path.display()
                );
                let text = serde_json::to_string(got).unwrap();
                for needle in &want.contains {
                    assert!(
                        text.contains(needle),
                        "{}: error {text} lacks {needle}",
                        case_path.display()
                    );
                }
            }
        }
    }
    assert!(
        samples >= 6,
        "expected the six sample mappings, found {samples}"
    );
    // Every example message is exercised by some case.
    for dir in std::fs::read_dir(root.join("examples/messages")).unwrap() {
        for file in json_files(&dir.unwrap().path()) {
            let file = file.canonicalize().unwrap();
            assert!(
                used_messages.contains(&file),
                "{} is not used by any mapping case",
                file.display()
            );
        }
    }
}

/// Converts measurements as the mapping debugger does, dropping the time-dependent `issued`.
fn convert(fhir: &FhirMapping, measurements: &[iomt_core::Measurement]) -> Vec<Value> {
    let mut out = Vec::new();
    for group in MeasurementGroup::group(measurements.iter().cloned()) {
        let template = fhir
            .lookup(&group.type_name)
            .unwrap_or_else(|| panic!("no FHIR template for {}", group.type_name));
        let ids = ResourceIds::placeholders(&group);
        for window in observation_groups(template.period_interval(), &group).unwrap() {
            let mut o = convert_window(template, &window, &ids, &group, Timestamp::now()).unwrap();
            o.as_object_mut().unwrap().shift_remove("issued");
            out.push(o);
        }
    }
    out
}

#[test]
fn wrapping_matches_the_service_envelope() {
    let doc = envelope(&DeviceEvent {
        body: br#"{"a":1}"#.to_vec(),
        ..DeviceEvent::default()
    })
    .unwrap();
    assert_eq!(
        doc,
        serde_json::json!({"Body": {"a": 1}, "Properties": {}, "SystemProperties": {}})
    );
}
