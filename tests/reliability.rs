//! The chaos suite: kills during a replay and during an Event Hubs run, FHIR faults with an
//! outage, and a flood of poison events. Each test checks the end state against the oracle
//! (nothing lost, nothing duplicated, each dead letter once) and prints its figures, which
//! `docs/reliability.md` records.
//!
//! The quick mode (the default, run by `tests/run.sh`: 3 kills of each kind, a 10 s outage, the
//! cut capture through the faults, 3 large bodies) keeps the suite within the CI budget;
//! `IOMT_CHAOS=long` runs the long campaign: 20 kills of each kind, a 60 s outage, the whole
//! capture through the faults, and a flood with every 5 MiB body its share calls for. The FHIR
//! tests use the FHIR test server and the Event Hubs test uses the test broker and Azurite, as
//! `tests/run.sh` starts them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use iomt_eventhubs_broker::HubConfig;
use iomt_tests::eventhubs::{
    Cluster, export_dead_letters, hub_section, keda_lag, send, storage_connection_string,
    toml_string,
};
use iomt_tests::faults::{FaultProxy, Faults};
use iomt_tests::golden::{
    Capture, Server, assert_same_content, capture_dir, check_dead_letters, check_server,
    read_json_lines, rng,
};
use iomt_tests::replay::{Replay, Running, events_read, free_port, kill_campaign, serial};
use iomt_tests::{IomtProcess, Scratch};
use serde_json::{Value, json};

/// Whether the long campaign was asked for.
fn long() -> bool {
    std::env::var("IOMT_CHAOS").is_ok_and(|v| v == "long")
}

/// Quick or long.
fn mode<T>(quick: T, long_mode: T) -> T {
    if long() { long_mode } else { quick }
}

// ---------------------------------------------------------------------------------------------
// Kills.

/// SIGKILL at random moments during a replay into the FHIR server, again and again; the
/// server ends in the golden state, each dead letter once.
#[test]
fn replay_killed_again_and_again_converges_to_the_golden_state() {
    let _serial = serial();
    let server = Server::from_env();
    let mut rng = rng();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "chaos-replay-kills");
    let capture = Capture::for_fhir(scratch.path());
    let mut replay = Replay::new(&capture, scratch.path()).fhir(&server.base);
    server.reset();
    let started = Instant::now();
    let campaign = kill_campaign(
        &mut replay,
        mode(3, 20),
        mode(Duration::from_secs(3), Duration::from_secs(20)),
        &mut rng,
    );
    check_server(&server, &capture, &mut rng);
    check_dead_letters(&replay.dead_letters(), &capture);
    let events = capture.records.len() as u64;
    eprintln!(
        "chaos replay: {} events, {} runs, {} killed, {} resumed; {} events read, {} read twice; \
         lost 0, duplicates 0 ({:.0} s)",
        events,
        campaign.runs,
        campaign.killed,
        campaign.resumed,
        campaign.events_read,
        campaign.events_read.saturating_sub(events),
        started.elapsed().as_secs_f64()
    );
}

const HUB: &str = "devicedata";
const PARTITIONS: u32 = 4;
const CONSUMER_GROUP: &str = "iomt";

/// SIGKILL at random moments during `iomt run` on the Event Hubs test broker, each time
/// restarted as a pod's container is, under the same owner id; once the backlog is
/// checkpointed the FHIR server holds the oracle's state and the dead-letter container each
/// dead letter once.
#[test]
fn event_hubs_run_killed_again_and_again_loses_nothing() {
    let _serial = serial();
    let started = Instant::now();
    let server = Server::from_env();
    let mut rng = rng();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "chaos-eventhubs-kills");
    let dir = scratch.path();
    let capture = Capture::cut(dir);
    let lines: Vec<String> = std::fs::read_to_string(&capture.path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    server.reset();
    let Cluster {
        rt,
        broker,
        store,
        container,
    } = Cluster::start(vec![HubConfig::new(HUB, PARTITIONS).unwrap()], "chaos");
    let config = dir.join("iomt.toml");
    std::fs::write(
        &config,
        format!(
            "[templates]\ndevice_mapping = {}\nfhir_mapping = {}\n\n[fhir]\nurl = {}\n\n\
             [identity]\nmode = \"create\"\n\n[group]\nmax_wait = \"500ms\"\n\n\
             [pipeline]\ncheckpoint_interval = \"200ms\"\n\n[source]\n{}start_at = \"earliest\"\n\n\
             [checkpoints]\nconnection_string = {}\ncontainer = {}\n\n\
             [dead_letters]\ncontainer = {}\n",
            toml_string(capture_dir().join("devicecontent.json").to_str().unwrap()),
            toml_string(capture_dir().join("fhirmapping.json").to_str().unwrap()),
            toml_string(&server.base),
            hub_section(&broker, HUB, CONSUMER_GROUP, "1s", "3s"),
            toml_string(&storage_connection_string()),
            toml_string(&container),
            toml_string(&format!("{container}-dl")),
        ),
    )
    .unwrap();
    let lag = || rt.block_on(keda_lag(&broker, &store, HUB, CONSUMER_GROUP));
    let total = lines.len() as i64;
    // The events arrive in parts, one before each run, so that each run has work when killed.
    let kills = mode(3, 20);
    let mut parts = lines.chunks(lines.len().div_ceil(kills + 1));
    let (mut killed, mut read_before_kills, mut runs) = (0, 0u64, 0);
    let deadline = Instant::now() + Duration::from_secs(600);
    let final_run = loop {
        runs += 1;
        if let Some(part) = parts.next() {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(120), send(&broker, HUB, part))
                    .await
                    .expect("sending to the test broker hung")
            });
        }
        let port = free_port();
        let state = dir.join(format!("state-{runs}"));
        let metrics = format!("127.0.0.1:{port}");
        let args = [
            "run",
            "--config",
            config.to_str().unwrap(),
            "--owner-id",
            "pod-0",
            "--state-dir",
            state.to_str().unwrap(),
            "--metrics-addr",
            &metrics,
            "--summary",
            "json",
        ];
        let mut process = IomtProcess::start(
            dir,
            &format!("run-{runs}"),
            args,
            "info,azure_messaging_eventhubs=warn,azure_core_amqp=warn",
        );
        if killed == kills {
            assert!(parts.next().is_none());
            break process;
        }
        // Wait for progress (the lag shrinks), then a random moment more, then SIGKILL.
        let before = lag();
        while lag() >= before && before > 0 {
            process.assert_running();
            assert!(Instant::now() < deadline, "run {runs}: no progress");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(rng.u64(0..1500)));
        process.assert_running();
        let read = events_read(port).unwrap_or(0);
        drop(process); // SIGKILL
        killed += 1;
        read_before_kills += read;
        eprintln!(
            "run {runs}: killed, {read} events read; lag {before} -> {}",
            lag()
        );
    };
    let mut process = final_run;
    while lag() > 0 {
        process.assert_running();
        assert!(Instant::now() < deadline, "lag never reached 0: {}", lag());
        std::thread::sleep(Duration::from_millis(200));
    }
    let summary: Value =
        serde_json::from_str(&process.terminate(Duration::from_secs(120))).expect("a JSON summary");
    rt.block_on(broker.stop());

    check_server(&server, &capture, &mut rng);
    let records = export_dead_letters(&config, dir);
    let mut distinct: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &records {
        let identity = match r["stage"].as_str() {
            Some("normalize") => format!("{} {}", r["partition"], r["sequenceNumber"]),
            _ => r["payload"].to_string(),
        };
        distinct
            .entry(r["kind"].as_str().unwrap().to_owned())
            .or_default()
            .insert(identity);
    }
    let counts: BTreeMap<String, usize> =
        distinct.iter().map(|(k, s)| (k.clone(), s.len())).collect();
    assert_eq!(
        counts, capture.dead_letters,
        "distinct dead letters per kind"
    );
    assert_eq!(
        records.len(),
        capture.dead_letters.values().sum::<usize>(),
        "each once"
    );
    let read = read_before_kills + summary["events"].as_u64().unwrap_or(0);
    eprintln!(
        "chaos event hubs: {total} events, {runs} runs, {killed} killed; {read} events read, {} \
         read twice; lost 0, duplicates 0 ({:.0} s)",
        read.saturating_sub(total as u64),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// FHIR faults.

/// A replay through a proxy that answers 20 % of requests with 429, 503, a reset or a stall
/// past the client's timeout, and resets everything for an outage: the replay recovers by
/// itself and the server ends in the golden state.
#[test]
fn fhir_faults_and_an_outage_lose_nothing() {
    let _serial = serial();
    let server = Server::from_env();
    let mut rng = rng();
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "chaos-fhir-faults");
    let capture = if long() {
        Capture::for_fhir(scratch.path())
    } else {
        Capture::cut(scratch.path())
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (origin, path) = server
        .base
        .strip_prefix("http://")
        .and_then(|rest| rest.split_once('/'))
        .expect("an http:// FHIR base URL");
    let proxy = FaultProxy::start(
        &rt,
        origin,
        Faults {
            rate: 0.2,
            stall: Duration::from_secs(3),
        },
    );
    let mut replay = Replay::new(&capture, scratch.path()).fhir(&format!("{}/{path}", proxy.base));
    replay.env.extend(
        [
            ("IOMT__FHIR__REQUEST_TIMEOUT", "2s"),
            ("IOMT__FHIR__BACKOFF_CAP", "2s"),
            ("IOMT__PIPELINE__RETRY_CAP", "5s"),
            ("IOMT__PIPELINE__CHECKPOINT_INTERVAL", "100ms"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    replay.args.extend(["--summary".into(), "json".into()]);
    server.reset();
    let started = Instant::now();
    let mut run = Running::start(&replay, 1);
    // The outage starts once a quarter of the input is durable.
    let quarter = capture.records.len() as i64 / 4;
    while replay.checkpoint().is_none_or(|c| c.position <= quarter) && run.exited().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let outage = mode(Duration::from_secs(10), Duration::from_secs(60));
    proxy.outage(outage);
    let at_outage = replay.checkpoint();
    let outage_started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(900);
    let status = loop {
        if let Some(status) = run.exited() {
            break status;
        }
        assert!(Instant::now() < deadline, "the replay never finished");
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = started.elapsed().as_secs_f64();
    assert!(status.success(), "{status}\n{}", run.stderr());
    assert!(
        outage_started.elapsed() >= outage,
        "the replay finished within the outage: the test proves nothing"
    );
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(scratch.path().join("run-1.stdout")).unwrap(),
    )
    .unwrap();
    check_server(&server, &capture, &mut rng);
    check_dead_letters(&replay.dead_letters(), &capture);
    let counts = &proxy.counts;
    assert!(counts.faults() > 0);
    eprintln!(
        "chaos fhir faults: {} events in {elapsed:.1} s ({:.0} events/s) with a {} s outage \
         (checkpoint at its start {at_outage:?}); {}; {} retries; lost 0, duplicates 0",
        capture.records.len(),
        capture.records.len() as f64 / elapsed,
        outage.as_secs(),
        counts.describe(),
        summary["retries"],
    );
}

// ---------------------------------------------------------------------------------------------
// Poison flood.

/// What a poison event must become.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// Dead-lettered once, at `stage`, as `kind`, with a message containing `says`.
    Dead {
        stage: &'static str,
        kind: &'static str,
        says: &'static str,
    },
    /// Matched no template: counted as dropped (MedTech drops such events; so does iomt).
    Dropped,
}

/// One kind of poison: its name, a generator of the capture line (from its number, for a
/// device id of its own), and what must become of it.
struct Poison {
    name: &'static str,
    line: fn(usize) -> Vec<u8>,
    outcome: Outcome,
}

fn envelope(body: Value) -> Vec<u8> {
    json!({"Partition": "7", "Body": body, "Properties": {},
        "SystemProperties": {"x-opt-enqueued-time": "2026-11-20T06:00:02.731Z"}})
    .to_string()
    .into_bytes()
}

fn text_envelope(text: &str) -> Vec<u8> {
    json!({"Partition": "7", "BodyText": text, "Properties": {},
        "SystemProperties": {"x-opt-enqueued-time": "2026-11-20T06:00:02.731Z"}})
    .to_string()
    .into_bytes()
}

/// A heart-rate reading of device `poison-watch-N`, with `set` applied.
fn heart_rate(n: usize, set: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut m = json!({"deviceId": format!("poison-watch-{n}"), "patientId": format!("poison-{n}"),
        "heartRate": 70, "measuredAt": "2026-11-20T06:00:02.000Z"});
    set(m.as_object_mut().unwrap());
    m
}

const fn dead(stage: &'static str, kind: &'static str, says: &'static str) -> Outcome {
    Outcome::Dead { stage, kind, says }
}

const NORMALIZE: &str = "normalize";
const INVALID: &str = "InvalidDataFormatException";
const INCOMPATIBLE: &str = "IncompatibleDataException";

fn poisons() -> Vec<Poison> {
    vec![
        Poison {
            name: "not JSON",
            line: |n| text_envelope(&format!("poison {n}: not json")),
            outcome: dead(NORMALIZE, INVALID, "not JSON"),
        },
        Poison {
            name: "truncated JSON",
            line: |n| text_envelope(&heart_rate(n, |_| {}).to_string()[..30]),
            outcome: dead(NORMALIZE, INVALID, "EOF while parsing"),
        },
        Poison {
            name: "invalid UTF-8",
            line: |n| {
                let mut line = text_envelope(&format!("poison {n} \u{1}"));
                let at = line.len() - 90;
                line[at] = 0xff;
                line
            },
            outcome: dead(NORMALIZE, INVALID, "not valid UTF-8"),
        },
        Poison {
            name: "5 MiB body",
            line: |n| {
                let pad = "x".repeat(5 << 20);
                text_envelope(
                    &heart_rate(n, |m| drop(m.insert("pad".into(), pad.into()))).to_string(),
                )
            },
            outcome: dead(NORMALIZE, INVALID, "over the limit"),
        },
        Poison {
            name: "10,000-level nesting",
            line: |_| text_envelope(&format!("{}{}", "[".repeat(10_000), "]".repeat(10_000))),
            outcome: dead(NORMALIZE, INVALID, "recursion limit"),
        },
        Poison {
            name: "missing timestamp",
            line: |n| envelope(heart_rate(n, |m| drop(m.remove("measuredAt")))),
            outcome: dead(NORMALIZE, INCOMPATIBLE, "timestampExpression"),
        },
        Poison {
            name: "ill-typed timestamp",
            line: |n| {
                envelope(heart_rate(n, |m| {
                    drop(m.insert("measuredAt".into(), "yesterday".into()))
                }))
            },
            outcome: dead(NORMALIZE, INCOMPATIBLE, "timestampExpression"),
        },
        Poison {
            name: "missing required value",
            line: |n| {
                envelope(heart_rate(n, |m| {
                    drop(m.insert("heartRate".into(), Value::Null))
                }))
            },
            outcome: dead(NORMALIZE, INCOMPATIBLE, "valueExpression"),
        },
        Poison {
            name: "NaN",
            line: |n| text_envelope(&heart_rate(n, |_| {}).to_string().replace("70", "NaN")),
            outcome: dead(NORMALIZE, INVALID, "not JSON"),
        },
        Poison {
            name: "huge number",
            line: |n| text_envelope(&heart_rate(n, |_| {}).to_string().replace("70", "1e400")),
            outcome: dead(NORMALIZE, INVALID, "number out of range"),
        },
        Poison {
            name: "duplicate keys",
            line: |n| {
                format!(
                    r#"{{"Partition":"7","Body":{},"Body":{{}},"Properties":{{}},"SystemProperties":{{}}}}"#,
                    heart_rate(n, |_| {})
                )
                .into_bytes()
            },
            outcome: dead(NORMALIZE, INVALID, "duplicate field `Body`"),
        },
        Poison {
            name: "type without a FHIR template",
            line: |n| {
                envelope(
                    json!({"probe": format!("poison-probe-{n}"), "owner": format!("poison-{n}"),
                    "at": "2026-11-20T06:00:02.000Z", "celsius": 37.2}),
                )
            },
            outcome: dead("convert", "TemplateNotFoundException", "no FHIR template"),
        },
        Poison {
            name: "unknown type",
            line: |n| envelope(json!({"poison": n, "reading": "unknown"})),
            outcome: Outcome::Dropped,
        },
        Poison {
            name: "array body",
            line: |n| envelope(json!([n, "not a reading"])),
            outcome: Outcome::Dropped,
        },
        Poison {
            name: "empty body",
            line: |_| text_envelope(""),
            outcome: Outcome::Dropped,
        },
    ]
}

/// One NDJSON replay: its summary and how long it took.
fn replay_ndjson(input: &Path, dir: &Path) -> (Value, f64) {
    let capture = capture_dir();
    let started = Instant::now();
    let output = std::process::Command::new(iomt_tests::iomt())
        .args([
            "replay",
            input.to_str().unwrap(),
            "--no-progress",
            "--summary",
            "json",
        ])
        .arg("--device-mapping")
        .arg(capture.join("devicecontent.json"))
        .arg("--fhir-mapping")
        .arg(capture.join("fhirmapping.json"))
        .arg("--out")
        .arg(dir.join("out"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env_remove("IOMT_CONFIG")
        .output()
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    (serde_json::from_slice(&output.stdout).unwrap(), seconds)
}

/// The resources of one type in an NDJSON output.
fn ndjson(dir: &Path, resource_type: &str) -> Vec<Value> {
    let path = dir.join("out").join(format!("{resource_type}.ndjson"));
    if path.exists() {
        read_json_lines(&path)
    } else {
        Vec::new()
    }
}

/// The shipped capture with 10 % poison events of 15 kinds mixed in: every poison event is
/// dead-lettered once with its reason (or dropped, where MedTech drops it), the good events
/// give exactly the clean run's resources, and the throughput drop is printed.
#[test]
fn a_poison_flood_is_classified_and_leaves_good_events_alone() {
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "chaos-poison");
    let dir = scratch.path();
    let good: Vec<Vec<u8>> = std::fs::read(capture_dir().join("wearables.jsonl"))
        .unwrap()
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let kinds = poisons();
    let bad_total = good.len() / 9; // 10 % of all events
    let per_kind = bad_total / kinds.len();
    // Each 5 MiB body costs time in a debug build: a few in the quick mode.
    let big = mode(3, per_kind);
    let mut rng = fastrand::Rng::with_seed(13);
    let mut bad: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut n = 0;
    for (k, kind) in kinds.iter().enumerate() {
        let count = if kind.name == "5 MiB body" {
            big
        } else {
            per_kind
        };
        for _ in 0..count {
            bad.push((k, (kind.line)(n)));
            n += 1;
        }
    }
    rng.shuffle(&mut bad);
    // Mix the poison in at random places, remembering the line of each.
    let mut lines: Vec<(Option<usize>, Vec<u8>)> = good.into_iter().map(|l| (None, l)).collect();
    for (k, line) in bad {
        let at = rng.usize(0..=lines.len());
        lines.insert(at, (Some(k), line));
    }
    let flood_path = dir.join("flood.jsonl");
    let clean_path = dir.join("clean.jsonl");
    let (mut flood, mut clean) = (Vec::new(), Vec::new());
    let mut expected_at_line: BTreeMap<usize, usize> = BTreeMap::new();
    let mut convert_expected: BTreeMap<usize, usize> = BTreeMap::new();
    for (i, (k, line)) in lines.iter().enumerate() {
        flood.write_all(line).unwrap();
        flood.push(b'\n');
        match k {
            Some(k) => {
                expected_at_line.insert(i + 1, *k);
                *convert_expected.entry(*k).or_default() += 1;
            }
            None => {
                clean.write_all(line).unwrap();
                clean.push(b'\n');
            }
        }
    }
    std::fs::write(&flood_path, flood).unwrap();
    std::fs::write(&clean_path, clean).unwrap();

    let clean_dir = dir.join("clean");
    let flood_dir = dir.join("flood");
    // Each twice, alternately, keeping the faster run: one run of a few seconds is noisy.
    let (mut clean_seconds, mut flood_seconds) = (f64::MAX, f64::MAX);
    let (mut clean_summary, mut flood_summary) = (Value::Null, Value::Null);
    for _ in 0..2 {
        for (path, dir, seconds, summary) in [
            (
                &clean_path,
                &clean_dir,
                &mut clean_seconds,
                &mut clean_summary,
            ),
            (
                &flood_path,
                &flood_dir,
                &mut flood_seconds,
                &mut flood_summary,
            ),
        ] {
            std::fs::remove_dir_all(dir).ok();
            let (s, t) = replay_ndjson(path, dir);
            *seconds = seconds.min(t);
            *summary = s;
        }
    }

    // The good events are unaffected.
    for t in ["Patient", "Device", "Observation"] {
        let (clean, flood) = (ndjson(&clean_dir, t), ndjson(&flood_dir, t));
        assert_eq!(clean.len(), flood.len(), "{t} resources");
        assert_same_content(t, &clean, &flood);
    }

    // Each poison event has its outcome, once.
    let clean_dead = read_dead(&clean_dir);
    let flood_dead = read_dead(&flood_dir);
    let mut classified = vec![0usize; kinds.len()];
    let mut convert_dead: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen_lines = BTreeSet::new();
    let prefix = format!("{}:", flood_path.display());
    let clean_convert = clean_dead
        .iter()
        .filter(|r| r["stage"] == "convert")
        .count();
    for r in &flood_dead {
        if r["stage"] == "convert" {
            // No source line: the measurement's device names the poison (or the clean run's
            // own dead letters, which the capture has).
            let device = r["payload"]["json"]["deviceId"]
                .as_str()
                .unwrap_or_default();
            *convert_dead
                .entry(device.split('-').take(2).collect::<Vec<_>>().join("-"))
                .or_default() += 1;
            continue;
        }
        let line: usize = r["source"]
            .as_str()
            .and_then(|s| s.strip_prefix(&prefix))
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("no source line: {r}"));
        assert!(seen_lines.insert(line), "line {line} dead-lettered twice");
        let Some(&k) = expected_at_line.get(&line) else {
            continue; // one of the capture's own bad events
        };
        let kind = &kinds[k];
        let Outcome::Dead {
            stage,
            kind: name,
            says,
        } = kind.outcome
        else {
            panic!("{} (line {line}) was dead-lettered: {r}", kind.name);
        };
        assert_eq!(r["stage"], stage, "{}: {r}", kind.name);
        assert_eq!(r["kind"], name, "{}: {r}", kind.name);
        assert!(
            r["message"].as_str().is_some_and(|m| m.contains(says)),
            "{}: {r}",
            kind.name
        );
        classified[k] += 1;
    }
    let probe = kinds
        .iter()
        .position(|k| k.name == "type without a FHIR template")
        .unwrap();
    classified[probe] = convert_dead.get("poison-probe").copied().unwrap_or(0);
    assert_eq!(
        flood_dead.len() - clean_dead.len(),
        (0..kinds.len())
            .filter(|&k| matches!(kinds[k].outcome, Outcome::Dead { .. }))
            .map(|k| convert_expected[&k])
            .sum::<usize>(),
        "dead letters beyond the clean run's ({clean_convert} of them convert-stage)"
    );
    let dropped: usize = (0..kinds.len())
        .filter(|&k| kinds[k].outcome == Outcome::Dropped)
        .map(|k| convert_expected[&k])
        .sum();
    assert_eq!(
        flood_summary["dropped"].as_u64().unwrap() - clean_summary["dropped"].as_u64().unwrap(),
        dropped as u64,
        "dropped"
    );
    let mut report = Vec::new();
    for (k, kind) in kinds.iter().enumerate() {
        if let Outcome::Dead { .. } = kind.outcome {
            assert_eq!(classified[k], convert_expected[&k], "{}", kind.name);
        }
        report.push(format!("{} {}", kind.name, convert_expected[&k]));
    }
    let good_events = clean_summary["events"].as_u64().unwrap() as f64;
    let flood_events = flood_summary["events"].as_u64().unwrap() as f64;
    eprintln!(
        "chaos poison flood: {} good events in {clean_seconds:.2} s ({:.0}/s); with {} poison \
         events of {} kinds ({}): {flood_seconds:.2} s ({:.0} events/s, good events {:.0}/s); \
         good-event throughput drop {:.0} %",
        good_events,
        good_events / clean_seconds,
        flood_events - good_events,
        kinds.len(),
        report.join(", "),
        flood_events / flood_seconds,
        good_events / flood_seconds,
        100.0 * (1.0 - clean_seconds / flood_seconds)
    );
}

fn read_dead(dir: &Path) -> Vec<Value> {
    let path = dir.join("state").join("deadletter.jsonl");
    if path.exists() {
        read_json_lines(&path)
    } else {
        Vec::new()
    }
}
