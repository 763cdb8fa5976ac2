//! `iomt run` on a live Event Hub: the real SDK client against the test broker
//! (`tests/eventhubs-broker`), with checkpoints and ownership in Azurite (started by
//! `tests/run.sh`, which exports `IOMT_TEST_AZURITE_URL`).
//!
//! The output of a live run must equal the output of `iomt replay` over the same events (which
//! `tests/replay.rs` checks against the capture's oracle), and the checkpoints it leaves must
//! read, the way KEDA's `blobMetadata` strategy reads them, as zero lag.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iomt_eventhubs::blob::BlobCheckpointStore;
use iomt_eventhubs_broker::{BrokerConfig, BrokerHandle, CONNECTION_STRING, HubConfig};
use iomt_tests::eventhubs::{keda_lag, send, storage_connection_string};
use iomt_tests::replay::{free_port, metric, scrape};
use iomt_tests::{Scratch, iomt, repo_root};
use serde_json::Value;

const HUB: &str = "devicedata";
const PARTITIONS: u32 = 4;
const CONSUMER_GROUP: &str = "iomt";
/// Events of the shipped capture sent to the hub.
const EVENTS: usize = 3000;

/// The first lines of the shipped capture.
fn capture_lines() -> Vec<String> {
    std::fs::read_to_string(repo_root().join("examples/capture/wearables.jsonl"))
        .unwrap()
        .lines()
        .take(EVENTS)
        .map(str::to_owned)
        .collect()
}

/// Starts `iomt run` on the broker's hub, serving `/metrics` on `metrics_port`.
fn start_run(dir: &Path, broker: &BrokerHandle, container: &str, metrics_port: u16) -> Child {
    Command::new(iomt())
        .args(["run", "--owner-id", "test-process", "--max-wait", "300ms"])
        .arg("--device-mapping")
        .arg(repo_root().join("examples/capture/devicecontent.json"))
        .arg("--fhir-mapping")
        .arg(repo_root().join("examples/capture/fhirmapping.json"))
        .arg("--out")
        .arg(dir.join("live"))
        .arg("--state-dir")
        .arg(dir.join("live-state"))
        .current_dir(dir)
        .env_remove("IOMT_CONFIG")
        .env("IOMT__SOURCE__CONNECTION_STRING", CONNECTION_STRING)
        .env("IOMT__SOURCE__HUB", HUB)
        .env("IOMT__SOURCE__CONSUMER_GROUP", CONSUMER_GROUP)
        .env("IOMT__SOURCE__CUSTOM_ENDPOINT", broker.endpoint())
        .env("IOMT__SOURCE__UPDATE_INTERVAL", "1s")
        .env("IOMT__SOURCE__OWNERSHIP_EXPIRY", "3s")
        // Receivers that wedge after the link drop are found within seconds.
        .env("IOMT__SOURCE__STALL_AFTER", "2s")
        .env(
            "IOMT__CHECKPOINTS__CONNECTION_STRING",
            storage_connection_string(),
        )
        .env("IOMT__CHECKPOINTS__CONTAINER", container)
        .env("IOMT__PIPELINE__CHECKPOINT_INTERVAL", "200ms")
        .env(
            "IOMT__OUTPUT__METRICS_ADDR",
            format!("127.0.0.1:{metrics_port}"),
        )
        .env(
            "RUST_LOG",
            "info,azure_messaging_eventhubs=warn,azure_core_amqp=warn",
        )
        .stdout(Stdio::piped())
        // Kept with the scratch directory when the test fails.
        .stderr(std::fs::File::create(dir.join("run.log")).unwrap())
        .spawn()
        .unwrap()
}

/// Resources of an NDJSON directory, without what differs between runs: `meta`, `issued`, and
/// `status` (`amended` once a window was merged, which a live run's frequent flushes do).
fn resources(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for kind in ["Observation", "Patient", "Device"] {
        let Ok(text) = std::fs::read_to_string(dir.join(format!("{kind}.ndjson"))) else {
            continue;
        };
        for line in text.lines() {
            let mut v: Value = serde_json::from_str(line).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.remove("meta");
                o.remove("issued");
                o.remove("status");
            }
            out.insert(v.to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_run_equals_replay_and_leaves_no_lag() {
    live_run(false).await;
}

/// Links dropped mid-stream (a gateway restart): the SDK reconnects, re-reads from where each
/// receiver was opened, and the pipeline takes each position once; nothing is lost. Some SDK
/// receivers do not recover (they fail to attach again, or wedge without an error); the source
/// rebuilds its client for those, the wedged ones found by its receive watchdog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_links_lose_nothing() {
    live_run(true).await;
}

async fn live_run(drop_links: bool) {
    let scratch = Scratch::new(
        env!("CARGO_TARGET_TMPDIR"),
        if drop_links {
            "eventhubs-drop"
        } else {
            "eventhubs-live"
        },
    );
    let dir = scratch.path();
    let broker = BrokerHandle::start(BrokerConfig::new(vec![
        HubConfig::new(HUB, PARTITIONS).unwrap(),
    ]))
    .await
    .unwrap();
    let container = format!("live-{:08x}", fastrand::u32(..));
    let store =
        BlobCheckpointStore::from_connection_string(&storage_connection_string(), &container)
            .unwrap();
    let lines = capture_lines();
    send(&broker, HUB, &lines[..EVENTS / 2]).await;

    let port = free_port();
    let mut child = start_run(dir, &broker, &container, port);
    // Mid-stream: the rest arrives while the first half is processed; lag is what KEDA sees.
    if drop_links {
        // Once the run has taken partitions and made progress.
        let deadline = Instant::now() + Duration::from_secs(60);
        while store
            .checkpoints("localhost", HUB, CONSUMER_GROUP)
            .await
            .map_or(true, |c| c.is_empty())
        {
            assert!(Instant::now() < deadline, "no checkpoint before the drop");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(broker.drop_links(HUB).await > 0);
    }
    send(&broker, HUB, &lines[EVENTS / 2..]).await;
    let mut lags = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let lag = if store.ensure_container().await.is_ok() {
            keda_lag(&broker, &store, HUB, CONSUMER_GROUP).await
        } else {
            i64::MAX
        };
        lags.push(lag);
        if lag == 0 {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "iomt run exited early with {status}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "lag never reached 0: {lags:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Lag was positive before it reached zero: KEDA saw the backlog.
    assert!(lags.iter().any(|l| *l > 0 && *l != i64::MAX), "{lags:?}");
    if !drop_links {
        // Partitions read to the end and left idle for a few watchdog periods: the watchdog
        // finds them idle, and must not rebuild the client.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let log = std::fs::read_to_string(dir.join("run.log")).unwrap();
        assert!(!log.contains("rebuilding the Event Hubs client"), "{log}");
        // The run's own figures agree with KEDA's: every partition owned, none behind, and
        // checkpoints that are current (an idle partition's checkpoint does not age).
        let metrics = scrape(port).unwrap();
        assert_eq!(
            metric(&metrics, "PartitionsOwned"),
            Some(f64::from(PARTITIONS))
        );
        for partition in 0..PARTITIONS {
            let series = |name: &str| format!("{name}{{partition=\"{partition}\"}}");
            assert_eq!(
                metric(&metrics, &series("PartitionLag")),
                Some(0.0),
                "{metrics}"
            );
            let age = metric(&metrics, &series("CheckpointAgeSeconds")).unwrap();
            assert!(age < 2.0, "{metrics}");
        }
    }

    let stdout = stop(child);
    assert_eq!(events_read(&stdout), EVENTS as i64, "{stdout}");

    // The same events replayed from a file give the same resources.
    let capture = dir.join("capture.jsonl");
    std::fs::write(&capture, lines.join("\n")).unwrap();
    let replay = Command::new(iomt())
        .arg("replay")
        .arg(&capture)
        .args(["--no-progress", "--device-mapping"])
        .arg(repo_root().join("examples/capture/devicecontent.json"))
        .arg("--fhir-mapping")
        .arg(repo_root().join("examples/capture/fhirmapping.json"))
        .arg("--out")
        .arg(dir.join("replayed"))
        .arg("--state-dir")
        .arg(dir.join("replay-state"))
        .current_dir(dir)
        .env_remove("IOMT_CONFIG")
        .output()
        .unwrap();
    assert!(replay.status.success());
    let (live, replayed) = (
        resources(&dir.join("live")),
        resources(&dir.join("replayed")),
    );
    assert!(!replayed.is_empty());
    assert_eq!(live.len(), replayed.len());
    assert!(
        live == replayed,
        "the live run's output differs from the replay's"
    );
    broker.stop().await;
}

/// The events a run's summary says it read (`3,000 events in …`).
fn events_read(stdout: &str) -> i64 {
    let first = stdout.split_whitespace().next().unwrap_or_default();
    first
        .replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("no event count in {stdout}"))
}

/// SIGTERM, then the run's summary; the run must have drained and exited 0.
fn stop(child: Child) -> String {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "iomt run failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A run stopped mid-stream commits everything it drained, so the next run starts where it
/// stopped: together they read each event once, and their output is a replay's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_run_commits_what_it_drained_and_the_next_resumes_there() {
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "eventhubs-resume");
    let dir = scratch.path();
    let broker = BrokerHandle::start(BrokerConfig::new(vec![
        HubConfig::new(HUB, PARTITIONS).unwrap(),
    ]))
    .await
    .unwrap();
    let container = format!("resume-{:08x}", fastrand::u32(..));
    let store =
        BlobCheckpointStore::from_connection_string(&storage_connection_string(), &container)
            .unwrap();
    let lines = capture_lines();
    send(&broker, HUB, &lines).await;

    // Stopped as soon as it has made progress, with most of the backlog still unread.
    let child = start_run(dir, &broker, &container, free_port());
    let deadline = Instant::now() + Duration::from_secs(60);
    while store
        .checkpoints("localhost", HUB, CONSUMER_GROUP)
        .await
        .map_or(true, |c| c.is_empty())
    {
        assert!(Instant::now() < deadline, "no checkpoint");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = events_read(&stop(child));
    assert!(
        first < EVENTS as i64,
        "the backlog was read before the stop"
    );
    // Everything the stopped run read is behind its checkpoints.
    assert_eq!(
        keda_lag(&broker, &store, HUB, CONSUMER_GROUP).await,
        EVENTS as i64 - first
    );

    let child = start_run(dir, &broker, &container, free_port());
    let deadline = Instant::now() + Duration::from_secs(90);
    while keda_lag(&broker, &store, HUB, CONSUMER_GROUP).await > 0 {
        assert!(Instant::now() < deadline, "lag never reached 0");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let second = events_read(&stop(child));
    assert_eq!(first + second, EVENTS as i64, "events read twice or never");
    broker.stop().await;
}

/// A device mapping of heart rate (`hr`) and, from version 2 on, respiration (`rr`).
fn reload_device_mapping(with_respiration: bool) -> String {
    let template = |type_name: &str, field: &str| {
        serde_json::json!({
            "templateType": "JsonPathContent",
            "template": {
                "typeName": type_name,
                "typeMatchExpression": format!("$..[?(@{field})]"),
                "deviceIdExpression": "$.deviceId",
                "patientIdExpression": "$.patientId",
                "timestampExpression": "$.time",
                "values": [{"required": true, "valueExpression": format!("$.{field}"), "valueName": type_name}]
            }
        })
    };
    let mut templates = vec![template("hr", "heartRate")];
    if with_respiration {
        templates.push(template("rr", "respRate"));
    }
    serde_json::json!({"templateType": "CollectionContent", "template": templates}).to_string()
}

/// The FHIR mapping of both types, one Observation per reading.
fn reload_fhir_mapping() -> String {
    let template = |type_name: &str, code: &str| {
        serde_json::json!({
            "templateType": "CodeValueFhir",
            "template": {
                "typeName": type_name,
                "periodInterval": 0,
                "codes": [{"code": code, "system": "http://loinc.org"}],
                "value": {"valueName": type_name, "valueType": "Quantity", "unit": "/min"}
            }
        })
    };
    serde_json::json!({
        "templateType": "CollectionFhir",
        "template": [template("hr", "8867-4"), template("rr", "9279-1")]
    })
    .to_string()
}

/// `n` capture lines from `device`, each with a heart rate and a respiration rate, a second
/// apart from `start` seconds past the hour.
fn vitals(device: &str, start: u32, n: u32) -> Vec<String> {
    (start..start + n)
        .map(|s| {
            let body = serde_json::json!({
                "deviceId": device,
                "patientId": format!("patient-{device}"),
                "time": format!("2026-12-01T10:{:02}:{:02}Z", s / 60, s % 60),
                "heartRate": 60 + s % 40,
                "respRate": 12 + s % 8,
            });
            serde_json::json!({
                "Body": body,
                "SystemProperties": {"iothub-connection-device-id": device}
            })
            .to_string()
        })
        .collect()
}

/// Waits until the `/metrics` on `port` satisfies `done`, failing after 60 s or if the process
/// exits; returns the scrape.
fn wait_for_metrics(
    process: &mut iomt_tests::IomtProcess,
    port: u16,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        process.assert_running();
        if let Some(text) = iomt_tests::replay::scrape(port)
            && done(&text)
        {
            return text;
        }
        assert!(
            Instant::now() < until,
            "never saw {what}:\n{}",
            process.log("stderr")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn template_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("TemplateVersion{hash=\""))
        .and_then(|rest| rest.split('"').next())
        .map(str::to_owned)
}

/// Templates edited under a running `iomt run` (as a ConfigMap update does) take effect
/// without a restart: a new version is swapped in for the events read after it, a broken
/// version is rejected and counted while the version in use goes on, and nothing read
/// meanwhile is lost or dead-lettered.
#[test]
fn templates_reload_under_a_running_pipeline() {
    use iomt_tests::eventhubs::{Cluster, hub_section, toml_string};

    let cluster = Cluster::start(vec![HubConfig::new(HUB, 2).unwrap()], "reload");
    let scratch = Scratch::new(env!("CARGO_TARGET_TMPDIR"), "eventhubs-reload");
    let dir = scratch.path();
    let (device, fhir) = (dir.join("devicecontent.json"), dir.join("fhirmapping.json"));
    std::fs::write(&device, reload_device_mapping(false)).unwrap();
    std::fs::write(&fhir, reload_fhir_mapping()).unwrap();
    let port = free_port();
    let config = dir.join("iomt.toml");
    std::fs::write(
        &config,
        format!(
            "[templates]\ndevice_mapping = {}\nfhir_mapping = {}\nreload_interval = \"200ms\"\n\n\
             [source]\n{}\n[checkpoints]\nconnection_string = {}\ncontainer = {}\n\n\
             [group]\nmax_wait = \"200ms\"\n\n[dead_letters]\nstore = \"file\"\n\n\
             [output]\ndir = {}\nmetrics_addr = \"127.0.0.1:{port}\"\n",
            toml_string(device.to_str().unwrap()),
            toml_string(fhir.to_str().unwrap()),
            hub_section(&cluster.broker, HUB, CONSUMER_GROUP, "1s", "3s"),
            toml_string(&storage_connection_string()),
            toml_string(&cluster.container),
            toml_string(dir.join("out").to_str().unwrap()),
        ),
    )
    .unwrap();
    let mut run = iomt_tests::eventhubs::start_role(dir, &config, "all");
    let events = |text: &str| metric(text, "DeviceEvent_total").unwrap_or(0.0);
    // Two devices, 20 readings each, from `start` seconds past the hour.
    let phase = |start| -> Vec<String> {
        ["dev-a", "dev-b"]
            .iter()
            .flat_map(|d| vitals(d, start, 20))
            .collect()
    };

    // Version 1 maps heart rate only: respiration readings match no template.
    let first = wait_for_metrics(&mut run, port, "the first version", |t| {
        template_version(t).is_some()
    });
    let v1 = template_version(&first).unwrap();
    cluster.rt.block_on(send(&cluster.broker, HUB, &phase(0)));
    wait_for_metrics(&mut run, port, "the first 40 events", |t| events(t) >= 40.0);

    // Version 2 adds respiration: the events read after the swap have both.
    std::fs::write(&device, reload_device_mapping(true)).unwrap();
    let second = wait_for_metrics(&mut run, port, "the second version", |t| {
        template_version(t).is_some_and(|v| v != v1)
    });
    let v2 = template_version(&second).unwrap();
    assert_eq!(
        metric(&second, "TemplateReload_total{outcome=\"applied\"}"),
        Some(1.0)
    );
    cluster.rt.block_on(send(&cluster.broker, HUB, &phase(100)));
    wait_for_metrics(&mut run, port, "the next 40 events", |t| events(t) >= 80.0);

    // A broken version (an invalid JSONPath) is rejected once; version 2 stays in use.
    std::fs::write(
        &device,
        reload_device_mapping(true).replace("$.respRate", "$.[respRate"),
    )
    .unwrap();
    let rejected = wait_for_metrics(&mut run, port, "the rejection", |t| {
        metric(t, "TemplateReload_total{outcome=\"rejected\"}") == Some(1.0)
    });
    assert_eq!(template_version(&rejected).as_deref(), Some(v2.as_str()));
    cluster.rt.block_on(send(&cluster.broker, HUB, &phase(200)));
    let last = wait_for_metrics(&mut run, port, "the last 40 events", |t| events(t) >= 120.0);
    assert_eq!(
        metric(&last, "TemplateReload_total{outcome=\"rejected\"}"),
        Some(1.0),
        "a broken file is reported once, not at every look"
    );
    assert!(
        run.log("stderr")
            .contains("new templates rejected; the version in use stays"),
        "{}",
        run.log("stderr")
    );
    run.terminate(Duration::from_secs(30));

    // Heart rate from all three phases; respiration only from the last two.
    let observations =
        std::fs::read_to_string(dir.join("out/Observation.ndjson")).unwrap_or_default();
    let mut by_code: std::collections::BTreeMap<String, usize> = Default::default();
    for line in observations.lines() {
        let o: Value = serde_json::from_str(line).unwrap();
        let code = o["code"]["coding"][0]["code"].as_str().unwrap().to_owned();
        *by_code.entry(code).or_default() += 1;
    }
    assert_eq!(by_code.get("8867-4"), Some(&120), "{by_code:?}");
    assert_eq!(by_code.get("9279-1"), Some(&80), "{by_code:?}");
    let dead_letters = std::fs::read_to_string(dir.join("all/deadletter.jsonl")).unwrap();
    assert!(dead_letters.is_empty(), "{dead_letters}");
}
