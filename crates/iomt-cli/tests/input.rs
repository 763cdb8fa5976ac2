//! Input records as a new user feeds them: each one is processed exactly once and none can
//! stall a replay, whatever its bytes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn command(args: &[&str], dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_iomt"));
    cmd.args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("IOMT_CONFIG");
    cmd
}

fn iomt(args: &[&str], dir: &Path) -> Output {
    command(args, dir).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `replay` arguments over the shipped capture's mappings, into `out` with state in `.iomt`.
fn replay_args(input: &str) -> Vec<String> {
    let device = repo("examples/capture/devicecontent.json");
    let fhir = repo("examples/capture/fhirmapping.json");
    [
        "replay",
        input,
        "--out",
        "out",
        "--no-progress",
        "--device-mapping",
        device.to_str().unwrap(),
        "--fhir-mapping",
        fhir.to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec()
}

fn replay(input: &str, extra: &[&str], dir: &Path) -> Output {
    let mut args = replay_args(input);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    iomt(&args, dir)
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

fn dead_letters(dir: &Path, file: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn first_event_line() -> String {
    capture_lines(1).remove(0)
}

#[test]
fn no_record_stops_a_replay() {
    let dir = tempfile::tempdir().unwrap();
    let good = first_event_line();
    let mut input = Vec::new();
    input.extend_from_slice(good.as_bytes());
    input.extend_from_slice(b"\n{\"Body\": {\"deviceId\": \"w\xff\"}}\n");
    input
        .extend_from_slice(format!("{{\"BodyText\": \"{}\"}}\n", "x".repeat(5_000_000)).as_bytes());
    input.extend_from_slice(good.replace("06:00:02.000Z", "06:00:03.000Z").as_bytes());
    input.push(b'\n');
    std::fs::write(dir.path().join("in.jsonl"), input).unwrap();
    let out = replay("in.jsonl", &["--max-line-bytes", "100000"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("4 events"),
        "{}",
        text(&out.stdout)
    );
    let records = dead_letters(dir.path(), ".iomt/deadletter.jsonl");
    let found: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r["source"].as_str().unwrap(), r["entry"].as_str().unwrap()))
        .collect();
    assert_eq!(found, [("in.jsonl:2", "record"), ("in.jsonl:3", "record")]);
    assert!(
        records[0]["message"]
            .as_str()
            .unwrap()
            .contains("not valid UTF-8")
    );
    assert!(
        records[1]["message"]
            .as_str()
            .unwrap()
            .contains("over the limit of 100000 bytes")
    );
    assert!(records[1]["payload"]["text"].as_str().unwrap().len() <= 64 * 1024);
}

#[test]
fn dead_letters_are_written_once_across_reruns() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = capture_lines(200);
    lines.insert(50, "not json".to_owned());
    lines.insert(120, "[1, 2]".to_owned());
    std::fs::write(dir.path().join("in.jsonl"), lines.join("\n")).unwrap();
    let first = replay("in.jsonl", &[], dir.path());
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let before = dead_letters(dir.path(), ".iomt/deadletter.jsonl");
    assert!(before.len() >= 2, "{before:?}");
    // A finished replay starts over; its dead letters are already recorded.
    let again = replay("in.jsonl", &[], dir.path());
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    assert_eq!(dead_letters(dir.path(), ".iomt/deadletter.jsonl"), before);
}

#[test]
fn records_rejected_before_normalize_replay_as_they_entered() {
    let dir = tempfile::tempdir().unwrap();
    let good = first_event_line();
    let lines = [
        format!("[{good}]"),
        r#"{"Body": {"deviceId": "a"}, "Body": {"deviceId": "b"}}"#.to_owned(),
        r#"{"Body": {"deviceId": "a"}, "Properties": [1]}"#.to_owned(),
        "{}".to_owned(),
        "[]".to_owned(),
    ];
    std::fs::write(dir.path().join("in.jsonl"), lines.join("\n")).unwrap();
    let out = replay("in.jsonl", &[], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("dead-lettered  5"), "{stdout}");
    assert!(!stdout.contains("dropped"), "{stdout}");
    let records = dead_letters(dir.path(), ".iomt/deadletter.jsonl");
    assert!(
        records
            .iter()
            .all(|r| r["entry"] == "record" && r["kind"] == "InvalidDataFormatException")
    );

    // Re-submitted as the lines they were, they are still unreadable: each is dead-lettered
    // again, none becomes an Observation, and the exit code says so.
    let device = repo("examples/capture/devicecontent.json");
    let fhir = repo("examples/capture/fhirmapping.json");
    let out = iomt(
        &[
            "deadletter",
            "replay",
            ".iomt/deadletter.jsonl",
            "--out",
            "out",
            "--device-mapping",
            device.to_str().unwrap(),
            "--fhir-mapping",
            fhir.to_str().unwrap(),
        ],
        dir.path(),
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with("5 dead-letter records"), "{stdout}");
    assert!(!stdout.contains("written in"), "{stdout}");
    assert_eq!(
        dead_letters(dir.path(), ".iomt/deadletter.retry.jsonl").len(),
        5
    );
}

#[test]
fn unmatched_events_are_kept_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = capture_lines(20);
    lines.push(
        r#"{"Body": {"somethingElse": 1}, "SystemProperties": {"x-opt-sequence-number": 999}}"#
            .to_owned(),
    );
    std::fs::write(dir.path().join("in.jsonl"), lines.join("\n")).unwrap();
    let out = replay(
        "in.jsonl",
        &["--keep-unmatched", "unmatched.jsonl"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("dropped        1 events"),
        "{}",
        text(&out.stdout)
    );
    let kept = std::fs::read_to_string(dir.path().join("unmatched.jsonl")).unwrap();
    let kept: Vec<Value> = kept
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["Body"], serde_json::json!({"somethingElse": 1}));
    // The file is a capture: it replays as the same event.
    let out = replay("unmatched.jsonl", &["--state-dir", "s2"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("dropped        1 events"),
        "{}",
        text(&out.stdout)
    );
}

/// Waits until `check` holds, for up to 20 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_stdin_replay(dir: &Path) -> Child {
    let args = replay_args("-");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    command(&args, dir)
        .args(["--max-wait", "100ms"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn standard_input_is_processed_as_it_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_stdin_replay(dir.path());
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "not json").unwrap();
    stdin.flush().unwrap();
    // The record is handled while stdin stays open: its dead letter is written now.
    eventually("the dead letter of a record on an open stdin", || {
        !dead_letters(dir.path(), ".iomt/deadletter.jsonl").is_empty()
    });
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn a_second_process_on_the_same_directories_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = spawn_stdin_replay(dir.path());
    let mut stdin = first.stdin.take().unwrap();
    writeln!(stdin, "{}", first_event_line()).unwrap();
    stdin.flush().unwrap();
    eventually("the first replay holds its directories", || {
        dir.path().join(".iomt/iomt.lock").exists()
    });
    std::fs::write(dir.path().join("in.jsonl"), first_event_line()).unwrap();
    let second = replay("in.jsonl", &[], dir.path());
    assert_eq!(second.status.code(), Some(2), "{}", text(&second.stdout));
    assert!(
        text(&second.stderr).contains("in use by another iomt process"),
        "{}",
        text(&second.stderr)
    );
    // Another state directory still shares the store, which is refused as well.
    let third = replay("in.jsonl", &["--state-dir", "other"], dir.path());
    assert_eq!(third.status.code(), Some(2));
    assert!(text(&third.stderr).contains("in use by another iomt process"));
    drop(stdin);
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = command(
        &[
            "mapping",
            "test",
            "--device-mapping",
            repo("mappings/spo2/devicecontent.json").to_str().unwrap(),
            "--message",
            repo("examples/messages/spo2/oximeter.json")
                .to_str()
                .unwrap(),
            "--output",
            "json",
        ],
        dir.path(),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Nobody reads stdout.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
