//! The `iomt mapping` commands as a template author or a CI job calls them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn iomt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iomt"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn json_test(mapping: &Path, flag: &str, input: &Path) -> (i32, Value) {
    json_test_with(mapping, None, flag, input)
}

/// Runs `mapping test --output json`, optionally with a FHIR mapping, and parses stdout.
fn json_test_with(mapping: &Path, fhir: Option<&Path>, flag: &str, input: &Path) -> (i32, Value) {
    let mut args = vec![
        "mapping",
        "test",
        "--device-mapping",
        mapping.to_str().unwrap(),
    ];
    if let Some(fhir) = fhir {
        args.extend(["--fhir-mapping", fhir.to_str().unwrap()]);
    }
    args.extend([flag, input.to_str().unwrap(), "--output", "json"]);
    let out = iomt(&args);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let json: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}"));
    (out.status.code().unwrap(), json)
}

fn write(dir: &tempfile::TempDir, name: &str, content: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    path
}

#[test]
fn valid_message_exits_zero_with_measurements() {
    let (code, out) = json_test(
        &repo("mappings/heartrate/devicecontent.json"),
        "--message",
        &repo("examples/messages/heartrate/watch.json"),
    );
    assert_eq!(code, 0);
    assert_eq!(out["measurements"][0]["properties"][0]["value"], "72");
    assert_eq!(out["errors"], Value::Array(vec![]));
    assert_eq!(out["observations"], Value::Array(vec![]));
}

#[test]
fn data_errors_exit_one() {
    let (code, out) = json_test(
        &repo("mappings/heartrate/devicecontent.json"),
        "--message",
        &repo("examples/messages/heartrate/watch-missing-time.json"),
    );
    assert_eq!(code, 1);
    let e = &out["errors"][0];
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("TimestampExpression")
    );
    assert_eq!(e["line"], 11);
    assert_eq!(e["path"], "$.template[0].template.timestampExpression");
}

#[test]
fn message_that_is_not_json_names_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let msg = write(&dir, "bad.json", b"{\"heartRate\": 72,\n  \"deviceId\": }");
    let (code, out) = json_test(
        &repo("mappings/heartrate/devicecontent.json"),
        "--message",
        &msg,
    );
    assert_eq!(code, 1);
    let m = out["errors"][0]["message"].as_str().unwrap();
    assert!(m.contains("line 2 column 15"), "{m}");
}

#[test]
fn oversized_and_deeply_nested_messages_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let big = write(
        &dir,
        "big.json",
        format!("{{\"a\":\"{}\"}}", "x".repeat(1024 * 1024)).as_bytes(),
    );
    let (code, out) = json_test(
        &repo("mappings/heartrate/devicecontent.json"),
        "--message",
        &big,
    );
    assert_eq!(code, 1);
    assert!(
        out["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("over the limit of 1048576 bytes (limits.message_bytes)")
    );

    let deep = write(
        &dir,
        "deep.json",
        ("[".repeat(10_000) + &"]".repeat(10_000)).as_bytes(),
    );
    let (code, out) = json_test(
        &repo("mappings/heartrate/devicecontent.json"),
        "--event",
        &deep,
    );
    assert_eq!(code, 1);
    assert!(
        out["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("recursion limit")
    );
}

#[test]
fn invalid_template_lists_every_error_with_paths_and_exits_two() {
    let dir = tempfile::tempdir().unwrap();
    let mapping = write(
        &dir,
        "map.json",
        br#"{
  "templateType": "CollectionContent",
  "template": [
    { "templateType": "JsonPathContent",
      "template": {
        "typeName": 42,
        "typeMatchExpression": "$..[?(@hr",
        "deviceIdExpression": "$.d",
        "timestampExpression": "$.t",
        "values": [ { "valueName": "hr", "valueExpression": "$.hr", "required": "maybe" } ]
      } },
    { "templateType": "CalculatedContent",
      "template": { "typeName": "x", "typeMatchExpression": { "value": "Body[?", "language": "JmesPath" },
                    "deviceIdExpression": "$.d", "timestampExpression": "$.t", "valuez": [] } }
  ]
}"#,
    );
    let msg = write(&dir, "m.json", b"{}");
    let (code, out) = json_test(&mapping, "--message", &msg);
    assert_eq!(code, 2);
    let errors = out["errors"].as_array().unwrap();
    let paths: Vec<&str> = errors.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        vec![
            "$.template[0].template.typeName",
            "$.template[0].template.typeMatchExpression",
            "$.template[0].template.values[0].required",
            "$.template[1].template.valuez",
            "$.template[1].template.typeMatchExpression",
        ]
    );
    let lines: Vec<i64> = errors.iter().map(|e| e["line"].as_i64().unwrap()).collect();
    assert_eq!(lines, vec![6, 7, 10, 14, 13]);
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("must be a string, found a number")
    );
    assert!(
        errors[3]["message"]
            .as_str()
            .unwrap()
            .contains("did you mean 'values'")
    );
}

#[test]
fn unreadable_files_still_print_one_json_object() {
    let (code, out) = json_test(
        Path::new("/nonexistent/map.json"),
        "--message",
        &repo("examples/messages/heartrate/watch.json"),
    );
    assert_eq!(code, 2);
    assert!(
        out["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/map.json")
    );
}

#[test]
fn text_output_explains_why_nothing_matched() {
    let dir = tempfile::tempdir().unwrap();
    let msg = write(
        &dir,
        "m.json",
        br#"{"HeartRate": 72, "deviceId": "d", "measuredAt": "2026-11-20T08:15:30Z"}"#,
    );
    let out = iomt(&[
        "mapping",
        "test",
        "--device-mapping",
        repo("mappings/heartrate/devicecontent.json")
            .to_str()
            .unwrap(),
        "--message",
        msg.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("no match"), "{text}");
    assert!(text.contains("differs only in case"), "{text}");

    // A bare payload given as --event to an IoT Hub template: the envelope is missing.
    let out = iomt(&[
        "mapping",
        "test",
        "--device-mapping",
        repo("mappings/iothub/devicecontent.json").to_str().unwrap(),
        "--event",
        repo("examples/messages/heartrate/watch.json")
            .to_str()
            .unwrap(),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("use --message") || text.contains("pass the message with --message"),
        "{text}"
    );
}

#[test]
fn text_output_shows_each_expression_result() {
    let out = iomt(&[
        "mapping",
        "test",
        "--device-mapping",
        repo("mappings/spo2/devicecontent.json").to_str().unwrap(),
        "--message",
        repo("examples/messages/spo2/oximeter.json")
            .to_str()
            .unwrap(),
        "--color",
        "never",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("matched 2 token(s)"), "{text}");
    assert!(
        text.contains("fromUnixTimestamp(matchedToken.t)  → \"2026-11-20T08:15:30Z\""),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "no colour codes when --color never"
    );
}

#[test]
fn validate_reports_valid_and_invalid() {
    let out = iomt(&[
        "mapping",
        "validate",
        repo("mappings/iothub/devicecontent.json").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("3 template(s)")
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        &dir,
        "bad.json",
        br#"{"templateType": "CollectionFhir", "template": []}"#,
    );
    let out = iomt(&[
        "mapping",
        "validate",
        bad.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["errors"][0]["path"], "$.templateType");
}

#[test]
fn fhir_mapping_produces_observations_with_marked_placeholders() {
    let (code, out) = json_test_with(
        &repo("mappings/bloodpressure/devicecontent.json"),
        Some(&repo("mappings/bloodpressure/fhirmapping.json")),
        "--message",
        &repo("examples/messages/bloodpressure/cuff.json"),
    );
    assert_eq!(code, 0, "{out}");
    let o = &out["observations"][0];
    assert_eq!(o["resourceType"], "Observation");
    assert_eq!(o["component"][0]["valueQuantity"]["value"], 128);
    assert!(
        o["subject"]["display"]
            .as_str()
            .unwrap()
            .contains("placeholder")
    );
    assert!(
        o["device"]["display"]
            .as_str()
            .unwrap()
            .contains("placeholder")
    );
}

#[test]
fn missing_fhir_template_is_a_data_error() {
    let dir = tempfile::tempdir().unwrap();
    let fhir = write(
        &dir,
        "fhir.json",
        br#"{"templateType": "CollectionFhir", "template": [{"templateType": "CodeValueFhir", "template": {"typeName": "other", "codes": []}}]}"#,
    );
    let (code, out) = json_test_with(
        &repo("mappings/heartrate/devicecontent.json"),
        Some(&fhir),
        "--message",
        &repo("examples/messages/heartrate/watch.json"),
    );
    assert_eq!(code, 1);
    assert_eq!(out["measurements"].as_array().unwrap().len(), 1);
    assert_eq!(out["observations"], Value::Array(vec![]));
    assert_eq!(out["errors"][0]["kind"], "TemplateNotFoundException");
    assert_eq!(out["errors"][0]["type"], "heartrate");
}

#[test]
fn validate_checks_both_mappings_and_names_both_files() {
    let out = iomt(&[
        "mapping",
        "validate",
        repo("mappings/iothub/devicecontent.json").to_str().unwrap(),
        repo("mappings/iothub/fhirmapping.json").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let dir = tempfile::tempdir().unwrap();
    let bad = write(&dir, "fhir.json", br#"{"templateType": "CollectionFhir", "template": [{"templateType": "CodeValueFhir", "template": {"codes": []}}]}"#);
    let out = iomt(&[
        "mapping",
        "validate",
        repo("mappings/iothub/devicecontent.json").to_str().unwrap(),
        bad.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["errors"][0]["file"]
            .as_str()
            .unwrap()
            .ends_with("fhir.json")
    );
    assert_eq!(json["errors"][0]["path"], "$.template[0].template.typeName");
}

#[test]
fn deeply_nested_expressions_are_template_errors_not_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let nested = format!("{}Body.a{}", "not_null(".repeat(5_000), ")".repeat(5_000));
    let chained = format!("Body{}", ".a".repeat(20_000));
    let mapping = write(
        &dir,
        "map.json",
        format!(
            r#"{{
  "templateType": "CollectionContent",
  "template": [
    {{ "templateType": "CalculatedContent",
      "template": {{ "typeName": "x", "typeMatchExpression": {{ "value": "{nested}", "language": "JmesPath" }},
                    "deviceIdExpression": "$.d", "timestampExpression": "$.t",
                    "values": [ {{ "valueName": "v", "valueExpression": {{ "value": "{chained}", "language": "JmesPath" }}, "required": true }} ] }} }}
  ]
}}"#
        )
        .as_bytes(),
    );
    let msg = write(&dir, "m.json", b"{}");
    let (code, out) = json_test(&mapping, "--message", &msg);
    assert_eq!(code, 2, "{out}");
    let errors = out["errors"].as_array().unwrap();
    let paths: Vec<&str> = errors.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        vec![
            "$.template[0].template.typeMatchExpression",
            "$.template[0].template.values[0].valueExpression",
        ]
    );
    assert!(
        errors
            .iter()
            .all(|e| e["line"].as_i64() == Some(5) || e["line"].as_i64() == Some(7))
    );
}

#[test]
fn sampled_data_values_that_are_not_numbers_are_data_errors() {
    let dir = tempfile::tempdir().unwrap();
    let message = write(
        &dir,
        "m.json",
        br#"{"deviceId": "watch-0042", "patientId": "patient-17", "heartRate": "70 80 90",
            "measuredAt": "2026-11-20T08:15:30.125Z"}"#,
    );
    let (code, out) = json_test_with(
        &repo("mappings/heartrate/devicecontent.json"),
        Some(&repo("mappings/heartrate/fhirmapping.json")),
        "--message",
        &message,
    );
    assert_eq!(code, 1, "{out}");
    assert_eq!(out["observations"], Value::Array(vec![]));
    assert_eq!(
        out["errors"][0]["kind"], "InvalidSampledDataFhirValueException",
        "{out}"
    );
}

#[test]
fn validate_sees_handlebars_templates() {
    let dir = tempfile::tempdir().unwrap();
    let fhir = write(
        &dir,
        "fhir.json",
        br#"{"templateType": "CollectionFhir", "template": [{"templateType": "HandlebarsFhir", "template": {
          "typeName": "heartrate", "periodInterval": 0, "key": "{{ids.device}}.{{type}}",
          "resource": "{\"resourceType\": \"Observation\", \"status\": \"final\"}"}}]}"#,
    );
    let out = iomt(&[
        "mapping",
        "validate",
        repo("mappings/heartrate/devicecontent.json")
            .to_str()
            .unwrap(),
        fhir.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("HandlebarsFhir 'heartrate'"), "{text}");
    assert!(
        !text.contains("no FHIR template for device type 'heartrate'"),
        "{text}"
    );
}

#[test]
fn captured_lines_read_as_a_replay_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let mapping = repo("mappings/heartrate/devicecontent.json");
    // A poison message captured as text: the replay dead-letters it as not JSON.
    let line = write(
        &dir,
        "poison.json",
        br#"{"BodyText": "{\"heartRate\": 72, \"deviceId\": \"d\"", "Properties": {}, "SystemProperties": {}}"#,
    );
    let (code, out) = json_test(&mapping, "--event", &line);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out["errors"][0]["kind"], "InvalidDataFormat", "{out}");
    assert!(
        out["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not JSON"),
        "{out}"
    );
    // A captured envelope with a JSON body matches as the replay would.
    let good = write(
        &dir,
        "good.json",
        br#"{"Body": {"heartRate": 72, "deviceId": "d", "measuredAt": "2026-11-20T08:15:30Z"}, "SystemProperties": {"x-opt-enqueued-time": "2026-11-20T08:15:31Z"}}"#,
    );
    let (code, out) = json_test(&mapping, "--event", &good);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["measurements"].as_array().unwrap().len(), 1, "{out}");
    // A body with a byte order mark is refused, and the message says why.
    let bom = write(&dir, "bom.json", b"\xEF\xBB\xBF{\"heartRate\": 72}");
    let (code, out) = json_test(&mapping, "--message", &bom);
    assert_eq!(code, 1, "{out}");
    assert!(
        out["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("byte order mark"),
        "{out}"
    );
}

#[test]
fn oversized_mapping_files_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let mut big = b"{\"templateType\": \"CollectionContent\", \"template\": [], \"x\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'x', 5 * 1024 * 1024));
    big.extend(b"\"}");
    let mapping = write(&dir, "big.json", &big);
    let out = iomt(&["mapping", "validate", mapping.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("the limit is") && said.contains("big.json"),
        "{said}"
    );
}

/// Every limit can be moved (`[limits]`, `IOMT__LIMITS__*`), and the message names the key;
/// the ones that guard the stack cannot be raised past their ceiling.
#[test]
fn limits_are_configurable_and_named_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let with = |pairs: &[(&str, &str)], args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_iomt"))
            .args(args)
            .envs(pairs.iter().copied())
            .env("NO_COLOR", "1")
            .env_remove("IOMT_CONFIG")
            .output()
            .unwrap()
    };
    let heartrate = repo("mappings/heartrate/devicecontent.json");
    let heartrate = heartrate.to_str().unwrap();
    // A 40-byte message is over a 20-byte limit.
    let message = write(&dir, "m.json", br#"{"heartRate": 70, "deviceId": "d1"}"#);
    let out = with(
        &[("IOMT__LIMITS__MESSAGE_BYTES", "20")],
        &[
            "mapping",
            "test",
            "--device-mapping",
            heartrate,
            "--message",
            message.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("(limits.message_bytes)"), "{stdout}");

    // Expressions nested three deep, over a limit of two.
    let nested = write(
        &dir,
        "nested.json",
        br#"{"templateType": "CollectionContent", "template": [{"templateType": "JsonPathContent",
            "template": {"typeName": "hr", "typeMatchExpression": "$..[?(@.a[0][1])]",
            "deviceIdExpression": "$.d", "timestampExpression": "$.t",
            "values": [{"valueName": "v", "valueExpression": "$.v", "required": true}]}}]}"#,
    );
    let validate = ["mapping", "validate", nested.to_str().unwrap()];
    assert_eq!(with(&[], &validate).status.code(), Some(0));
    let out = with(&[("IOMT__LIMITS__EXPRESSION_NESTING", "2")], &validate);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("limits.expression_nesting"), "{said}");
    assert!(said.contains("typeMatchExpression"), "{said}");

    // The template file size.
    let out = with(&[("IOMT__LIMITS__TEMPLATE_FILE_BYTES", "100")], &validate);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("limits.template_file_bytes"), "{said}");

    // Past the ceiling, or zero, the configuration is refused.
    let out = with(
        &[
            ("IOMT__LIMITS__EXPRESSION_NESTING", "10000"),
            ("IOMT__LIMITS__MEASUREMENTS_PER_EVENT", "0"),
        ],
        &[
            "config",
            "check",
            "--device-mapping",
            heartrate,
            "--fhir-mapping",
            repo("mappings/heartrate/fhirmapping.json")
                .to_str()
                .unwrap(),
        ],
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("limits.expression_nesting")
            && said.contains("limits.measurements_per_event"),
        "{said}"
    );
}

/// `mapping import` writes the two templates of a MedTech service as Azure exports it: an ARM
/// template with the connector and its FHIR destination, or the az CLI's output of each, and
/// `mapping validate` points an export given as a template at it.
#[test]
fn mapping_import_unwraps_medtech_exports() {
    let dir = tempfile::tempdir().unwrap();
    let read = |path: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(repo(path)).unwrap()).unwrap()
    };
    let (device, fhir) = (
        read("mappings/heartrate/devicecontent.json"),
        read("mappings/heartrate/fhirmapping.json"),
    );
    let arm = serde_json::json!({"resources": [
        {"type": "Microsoft.HealthcareApis/workspaces/iotconnectors", "name": "ws/medtech",
         "properties": {"deviceMapping": {"content": device}}},
        {"type": "Microsoft.HealthcareApis/workspaces/iotconnectors/fhirdestinations",
         "name": "ws/medtech/fhir",
         "properties": {"resourceIdentityResolutionType": "Lookup", "fhirMapping": {"content": fhir}}}]});
    let export = write(&dir, "arm.json", arm.to_string().as_bytes());
    let out = dir.path().join("templates");
    let run = iomt(&[
        "mapping",
        "import",
        export.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(0), "{text}");
    assert!(text.contains("mode = \"lookup\""), "{text}");
    let written = |name: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(name)).unwrap()).unwrap()
    };
    assert_eq!(written("devicecontent.json"), device);
    assert_eq!(written("fhirmapping.json"), fhir);

    // Written files are not replaced without --force.
    let again = iomt(&[
        "mapping",
        "import",
        export.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    // The az CLI's output: the connector and its FHIR destination, properties at the top and
    // the FHIR mapping as JSON text.
    let connector = write(
        &dir,
        "connector.json",
        serde_json::json!({"name": "medtech", "deviceMapping": {"content": device}})
            .to_string()
            .as_bytes(),
    );
    let destination = write(
        &dir,
        "destination.json",
        serde_json::json!({"name": "fhir", "resourceIdentityResolutionType": "Create",
            "fhirMapping": {"content": fhir.to_string()}})
        .to_string()
        .as_bytes(),
    );
    let cli_out = dir.path().join("from-cli");
    let run = iomt(&[
        "mapping",
        "import",
        connector.to_str().unwrap(),
        destination.to_str().unwrap(),
        "--out",
        cli_out.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(0), "{text}");
    assert!(text.contains("mode = \"create\""), "{text}");

    // The export given as a template: one error that names the command.
    let validate = iomt(&["mapping", "validate", export.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&validate.stdout);
    assert_eq!(validate.status.code(), Some(2), "{text}");
    assert!(text.contains("iomt mapping import"), "{text}");
    assert!(!text.contains("unknown member"), "{text}");

    // Not an export at all.
    let other = write(&dir, "other.json", br#"{"a": 1}"#);
    let run = iomt(&[
        "mapping",
        "import",
        other.to_str().unwrap(),
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("no deviceMapping.content"));
}

/// A JSON Lines file or a folder of messages is a batch: a line per message and totals, exit 1
/// when any message did not fit.
#[test]
fn mapping_test_runs_a_batch_of_messages() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(repo("examples/messages/heartrate/watch.json")).unwrap();
    let good: Value = serde_json::from_str(&good).unwrap();
    let lines = format!(
        "{good}\n\n{}\nnot json\n",
        serde_json::json!({"unrelated": 1})
    );
    let file = write(&dir, "batch.jsonl", lines.as_bytes());
    let mapping = repo("mappings/heartrate/devicecontent.json");
    let fhir = repo("mappings/heartrate/fhirmapping.json");
    let run = iomt(&[
        "mapping",
        "test",
        "--device-mapping",
        mapping.to_str().unwrap(),
        "--fhir-mapping",
        fhir.to_str().unwrap(),
        "--message",
        file.to_str().unwrap(),
        "--color",
        "never",
    ]);
    let text = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert!(text.contains("batch.jsonl:1  ok"), "{text}");
    assert!(text.contains("batch.jsonl:3  no match"), "{text}");
    assert!(text.contains("batch.jsonl:4  error"), "{text}");
    assert!(
        text.contains("3 message(s): 1 ok, 1 with errors, 1 matched no template; 1 measurement(s), 1 observation(s)"),
        "{text}"
    );

    // A folder: each .json file one message, JSON output with totals; all fit, exit 0.
    let folder = dir.path().join("messages");
    std::fs::create_dir(&folder).unwrap();
    for i in 0..3 {
        std::fs::write(
            folder.join(format!("m{i}.json")),
            serde_json::to_string_pretty(&good).unwrap(),
        )
        .unwrap();
    }
    std::fs::write(folder.join("readme.txt"), "not a message").unwrap();
    let run = iomt(&[
        "mapping",
        "test",
        "--device-mapping",
        mapping.to_str().unwrap(),
        "--message",
        folder.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(run.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["totals"]["messages"], 3);
    assert_eq!(report["totals"]["ok"], 3);
    assert_eq!(report["totals"]["types"]["heartrate"], 3);

    // One pretty-printed document over many lines is still one message.
    let single = write(
        &dir,
        "single.json",
        serde_json::to_string_pretty(&good).unwrap().as_bytes(),
    );
    let (code, report) = json_test(&mapping, "--message", &single);
    assert_eq!(code, 0);
    assert_eq!(report["measurements"].as_array().unwrap().len(), 1);
}

/// A device typeName that no FHIR template takes is an error of `mapping validate`, with the
/// closest FHIR type name; `--allow-unmapped-types` makes it a warning.
#[test]
fn validate_refuses_an_unmapped_type_name_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let device = std::fs::read_to_string(repo("mappings/heartrate/devicecontent.json"))
        .unwrap()
        .replace("\"heartrate\"", "\"heartrates\"");
    let device = write(&dir, "device.json", device.as_bytes());
    let fhir = repo("mappings/heartrate/fhirmapping.json");
    let args = [
        "mapping",
        "validate",
        device.to_str().unwrap(),
        fhir.to_str().unwrap(),
    ];
    let out = iomt(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("no FHIR template takes typeName 'heartrates'; did you mean 'heartrate'?"),
        "{text}"
    );
    let out = iomt(&[&args[..], &["--output", "json"]].concat());
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["errors"][0]["kind"], "unmappedType");
    assert_eq!(json["errors"][0]["path"], "$.template[0].template.typeName");
    let out = iomt(&[&args[..], &["--allow-unmapped-types"]].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("warning:"), "{text}");
}
