//! `iomt replay`, `iomt deadletter replay` and `iomt config` as an operator runs them, on the
//! embedded default (NDJSON output). The FHIR-server runs are in `tests/replay.rs`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use apache_avro::types::Value as Avro;
use apache_avro::{Codec, DeflateSettings, Schema, Writer};
use iomt_files::capture::CAPTURE_SCHEMA;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn iomt(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iomt"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("IOMT_CONFIG")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The first `n` lines of the shipped capture.
fn capture_lines(n: usize) -> Vec<String> {
    std::fs::read_to_string(repo("examples/capture/wearables.jsonl"))
        .unwrap()
        .lines()
        .take(n)
        .map(str::to_owned)
        .collect()
}

fn mapping_args<'a>(device: &'a str, fhir: &'a str) -> Vec<&'a str> {
    vec![
        "--device-mapping",
        device,
        "--fhir-mapping",
        fhir,
        "--no-progress",
    ]
}

fn observations(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("out/Observation.ndjson"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Writes heart rate events in the Event Hubs Capture Avro format.
fn write_avro(path: &Path, count: i64) {
    let schema = Schema::parse_str(CAPTURE_SCHEMA).unwrap();
    let mut writer = Writer::with_codec(
        &schema,
        Vec::new(),
        Codec::Deflate(DeflateSettings::default()),
    );
    for seq in 0..count {
        let body = format!(
            r#"{{"deviceId": "avro-watch", "patientId": "avro-patient", "heartRate": {}, "measuredAt": "2026-11-20T09:00:{:02}Z"}}"#,
            60 + seq,
            seq
        );
        let mut record = apache_avro::types::Record::new(&schema).unwrap();
        record.put("SequenceNumber", seq);
        record.put("Offset", format!("{}", seq * 100));
        record.put("EnqueuedTimeUtc", "11/20/2026 9:00:30 AM");
        record.put("SystemProperties", Avro::Map(Default::default()));
        record.put("Properties", Avro::Map(Default::default()));
        record.put(
            "Body",
            Avro::Union(1, Box::new(Avro::Bytes(body.into_bytes()))),
        );
        writer.append(record).unwrap();
    }
    std::fs::write(path, writer.into_inner().unwrap()).unwrap();
}

#[test]
fn replay_reads_folders_globs_avro_and_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    std::fs::create_dir_all(input.join("nested")).unwrap();
    let lines = capture_lines(300);
    std::fs::write(input.join("a.jsonl"), lines[..100].join("\n")).unwrap();
    std::fs::write(input.join("nested/b.jsonl"), lines[100..].join("\n")).unwrap();
    write_avro(&input.join("c.avro"), 20);
    let (device, fhir) = (
        repo("examples/capture/devicecontent.json"),
        repo("examples/capture/fhirmapping.json"),
    );
    let (device, fhir) = (device.to_str().unwrap(), fhir.to_str().unwrap());

    let out = iomt(
        &[
            &["replay", "input", "--out", "out"],
            &mapping_args(device, fhir)[..],
        ]
        .concat(),
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("320 events"), "{stdout}");
    assert!(stdout.contains("NDJSON files in out"), "{stdout}");
    let folder_observations = observations(dir.path());
    assert!(folder_observations > 0);

    // A glob over the same JSON Lines files, into a fresh directory.
    let out = iomt(
        &[
            &[
                "replay",
                "input/**/*.jsonl",
                "--out",
                "glob-out",
                "--state-dir",
                "g",
            ],
            &mapping_args(device, fhir)[..],
        ]
        .concat(),
        dir.path(),
    );
    assert!(
        text(&out.stdout).starts_with("300 events"),
        "{}",
        text(&out.stdout)
    );

    // Standard input: the same events again, into the first output: nothing changes.
    let mut child = Command::new(env!("CARGO_BIN_EXE_iomt"))
        .args(
            [
                &["replay", "-", "--out", "out"],
                &mapping_args(device, fhir)[..],
            ]
            .concat(),
        )
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.join("\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("300 events"), "{stdout}");
    assert!(stdout.contains(" 0 created, 0 updated"), "{stdout}");
    assert_eq!(observations(dir.path()), folder_observations);
}

#[test]
fn dead_letters_replay_once_the_template_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let (device, fhir) = (
        repo("examples/capture/devicecontent.json"),
        repo("examples/capture/fhirmapping.json"),
    );
    let (device, fhir_path) = (device.to_str().unwrap(), fhir.to_str().unwrap());
    let out = iomt(
        &[
            &["replay"],
            &[repo("examples/capture/wearables.jsonl").to_str().unwrap()][..],
            &["--out", "out"],
            &mapping_args(device, fhir_path)[..],
        ]
        .concat(),
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let before = observations(dir.path());

    // Add the missing FHIR template for the thermometer readings.
    let mut mapping: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&fhir).unwrap()).unwrap();
    mapping["template"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "templateType": "CodeValueFhir",
            "template": {"typeName": "bodytemperature", "periodInterval": 0,
                "codes": [{"code": "8310-5", "system": "http://loinc.org"}],
                "value": {"valueName": "temperature", "valueType": "Quantity", "unit": "Cel"}}
        }));
    std::fs::write(dir.path().join("fixed.json"), mapping.to_string()).unwrap();
    let out = iomt(
        &[
            &[
                "deadletter",
                "replay",
                ".iomt/deadletter.jsonl",
                "--out",
                "out",
            ],
            &["--device-mapping", device, "--fhir-mapping", "fixed.json"][..],
        ]
        .concat(),
        dir.path(),
    );
    let stdout = text(&out.stdout);
    // The 4 thermometer readings are written; the 8 events that are broken still fail.
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with("12 dead-letter records"), "{stdout}");
    assert!(stdout.contains("4 written in 4 groups"), "{stdout}");
    assert_eq!(observations(dir.path()), before + 4);
    let retry = std::fs::read_to_string(dir.path().join(".iomt/deadletter.retry.jsonl")).unwrap();
    assert_eq!(retry.lines().count(), 8);
}

/// Cluster mode keeps dead letters in a Blob container (Azurite here, started by
/// `tests/run.sh`). A run that dead-letters the same items again (here a second run from
/// scratch, as after a crash that lost its checkpoint) adds blobs, but an export and a replay
/// read each item once.
#[test]
fn dead_letters_in_a_blob_container_are_read_once_and_replayed() {
    let azurite = std::env::var("IOMT_TEST_AZURITE_URL")
        .expect("IOMT_TEST_AZURITE_URL is not set: run tests/run.sh, which starts Azurite");
    let dir = tempfile::tempdir().unwrap();
    let container = format!("dl-{:08x}", std::process::id() ^ 0x5eed_0000);
    std::fs::write(
        dir.path().join("iomt.toml"),
        format!(
            "[checkpoints]\nconnection_string = \"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint={azurite};\"\n\
             [dead_letters]\nstore = \"blob\"\ncontainer = \"{container}\"\n"
        ),
    )
    .unwrap();
    let (device, fhir) = (
        repo("examples/capture/devicecontent.json"),
        repo("examples/capture/fhirmapping.json"),
    );
    let (device, fhir) = (device.to_str().unwrap(), fhir.to_str().unwrap());
    let capture = repo("examples/capture/wearables.jsonl");
    for state in ["first", "again"] {
        let out = iomt(
            &[
                &["replay", capture.to_str().unwrap(), "--config", "iomt.toml"][..],
                &["--out", "out", "--state-dir", state],
                &mapping_args(device, fhir)[..],
            ]
            .concat(),
            dir.path(),
        );
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
        assert!(
            stdout.contains(&format!("dead-lettered  12 -> {azurite}/{container}")),
            "{stdout}"
        );
        assert!(!dir.path().join(state).join("deadletter.jsonl").exists());
    }
    let out = iomt(
        &[
            "deadletter",
            "export",
            "--config",
            "iomt.toml",
            "--out",
            "exported.jsonl",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let exported = std::fs::read_to_string(dir.path().join("exported.jsonl")).unwrap();
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for line in exported.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        *kinds
            .entry(record["kind"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        kinds,
        [
            ("IncompatibleDataException".to_owned(), 3),
            ("InvalidDataFormatException".to_owned(), 5),
            ("TemplateNotFoundException".to_owned(), 4)
        ]
        .into(),
        "{exported}"
    );

    // Replayed from the container: the same 12, which fail again into the local retry file.
    let out = iomt(
        &[
            &["deadletter", "replay", "--blob", "--config", "iomt.toml"][..],
            &["--out", "out", "--state-dir", "retry"],
            &["--device-mapping", device, "--fhir-mapping", fhir],
        ]
        .concat(),
        dir.path(),
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.starts_with(&format!(
            "12 dead-letter records from {azurite}/{container}"
        )),
        "{stdout}"
    );
    let retry = std::fs::read_to_string(dir.path().join("retry/deadletter.retry.jsonl")).unwrap();
    assert_eq!(retry.lines().count(), 12);
}

#[test]
fn config_check_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.toml"),
        "[fhir]\nurl = \"not a url\"\nauth = \"client-secret\"\n[group]\nmax_wait = \"10ms\"\n",
    )
    .unwrap();
    let out = iomt(&["config", "check", "--config", "bad.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    for key in [
        "templates.device_mapping",
        "fhir.url",
        "fhir.tenant_id",
        "fhir.client_secret",
        "group.max_wait",
    ] {
        assert!(stderr.contains(key), "{key} missing from: {stderr}");
    }
    let ok = iomt(
        &[
            "config",
            "check",
            "--config",
            repo("examples/capture/iomt.toml").to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
}

/// `config check --role R` checks what `iomt run --role R` needs, and an error set by an
/// environment variable names the variable.
#[test]
fn config_check_for_a_role_checks_its_hubs_and_names_environment_variables() {
    let dir = tempfile::tempdir().unwrap();
    let example = repo("examples/capture/iomt.toml");
    let check = |role: Option<&str>, env: &[(&str, &str)]| {
        let mut args = vec!["config", "check", "--config", example.to_str().unwrap()];
        if let Some(role) = role {
            args.extend(["--role", role]);
        }
        let mut command = Command::new(env!("CARGO_BIN_EXE_iomt"));
        command
            .args(&args)
            .current_dir(dir.path())
            .env("NO_COLOR", "1")
            .env_remove("IOMT_CONFIG");
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().unwrap()
    };
    // The example is a replay configuration: valid for a replay, not for `iomt run`.
    assert_eq!(check(None, &[]).status.code(), Some(0));
    let out = check(Some("convert"), &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    for key in [
        "internal_hub.hub",
        "internal_hub.connection_string",
        "checkpoints",
    ] {
        assert!(stderr.contains(key), "{key} missing from: {stderr}");
    }
    assert!(!stderr.contains("source.hub"), "{stderr}");

    let hubs = [
        ("IOMT__INTERNAL_HUB__HUB", "normalized"),
        (
            "IOMT__INTERNAL_HUB__CONNECTION_STRING",
            "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v",
        ),
        (
            "IOMT__CHECKPOINTS__CONNECTION_STRING",
            "UseDevelopmentStorage=true",
        ),
    ];
    let out = check(Some("convert"), &hubs);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("reads Event Hub normalized"),
        "{}",
        text(&out.stdout)
    );

    let bad = [
        hubs.as_slice(),
        &[("IOMT__INTERNAL_HUB__OWNERSHIP_EXPIRY", "soon")],
    ]
    .concat();
    let out = check(Some("convert"), &bad);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("IOMT__INTERNAL_HUB__OWNERSHIP_EXPIRY: internal_hub.ownership_expiry"),
        "{stderr}"
    );
    assert!(!stderr.contains("iomt.toml"), "{stderr}");
}

#[test]
fn sigterm_drains_and_the_next_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    // Two hours of watch readings paced at 600x: about 12 s if left alone.
    std::fs::write(dir.path().join("cap.jsonl"), capture_lines(2000).join("\n")).unwrap();
    let (device, fhir) = (
        repo("examples/capture/devicecontent.json"),
        repo("examples/capture/fhirmapping.json"),
    );
    let (device, fhir) = (device.to_str().unwrap(), fhir.to_str().unwrap());
    let args = [
        &["replay", "cap.jsonl", "--out", "out"][..],
        &mapping_args(device, fhir)[..],
    ]
    .concat();
    let child = Command::new(env!("CARGO_BIN_EXE_iomt"))
        .args(&args)
        .args(["--speed", "600", "--max-wait", "200ms"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("run the same command again to resume"));
    let checkpoint: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(".iomt/replay-checkpoint.json")).unwrap(),
    )
    .unwrap();
    let done = checkpoint["partitions"]["0"].as_i64().unwrap();
    assert!(done > 0 && done < 2000, "{checkpoint}");

    let out = iomt(&args, dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!(
            "resuming an unfinished replay after record {done}"
        )),
        "{}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    let expected = format!("{} events", 2000 - done);
    assert!(stdout.replace(',', "").starts_with(&expected), "{stdout}");
}

/// Status of `GET path` on `addr`, with a raw HTTP/1.0 request; `None` when nothing answers.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A dependency that cannot be reached at start (here the checkpoint container) is waited for:
/// the process stays up, alive but not ready, says what it waits for, and stops on SIGTERM;
/// it is not reported as an invalid configuration.
#[test]
fn an_unreachable_dependency_is_waited_for_not_reported_as_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", closed_port());
    let blob = closed_port();
    std::fs::write(
        dir.path().join("iomt.toml"),
        format!(
            "[templates]\ndevice_mapping = {:?}\nfhir_mapping = {:?}\n\n\
             [source]\nhub = \"devicedata\"\n\
             connection_string = \"Endpoint=sb://localhost/;SharedAccessKeyName=k;SharedAccessKey=a2V5;EntityPath=devicedata\"\n\
             custom_endpoint = \"amqp://127.0.0.1:{}\"\n\n\
             [checkpoints]\nconnection_string = \"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:{blob}/devstoreaccount1;\"\ncontainer = \"iomt\"\n\n\
             [output]\nstate_dir = \"state\"\nmetrics_addr = \"{metrics}\"\n",
            repo("examples/capture/devicecontent.json"),
            repo("examples/capture/fhirmapping.json"),
            closed_port(),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_iomt"))
        .args(["run", "--config", "iomt.toml"])
        .current_dir(dir.path())
        .env_remove("IOMT_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while http_status(&metrics, "/healthz") != Some(200) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "iomt exited: {}",
            std::fs::read_to_string(dir.path().join("stderr")).unwrap()
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "/healthz never answered"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "iomt gave up");
    assert_eq!(http_status(&metrics, "/readyz"), Some(503));
    let stderr = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    assert!(
        stderr.contains("cannot reach a dependency") && stderr.contains("checkpoints"),
        "{stderr}"
    );
    assert!(!stderr.contains("configuration is invalid"), "{stderr}");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(40),
            "SIGTERM did not stop it"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stopped before checkpoints could be reached"),
        "{stderr}"
    );
}
