//! End-to-end pipeline benchmark: `iomt replay` of a generated capture into a local blackhole
//! FHIR server, into the embedded store, and into the embedded store with one change event
//! subscription (for the CPU events add and their write-to-delivery latency), against
//! normalize-only throughput of the same events in the same run.
//!
//! ```sh
//! cargo bench -p iomt-cli --bench pipeline            # 1,000,000 events, 1,000 devices
//! IOMT_BENCH_EVENTS=200000 cargo bench -p iomt-cli --bench pipeline
//! ```
//!
//! The blackhole (`iomt_bench_fixtures::blackhole`) is a test-only FHIR endpoint in this
//! process: it answers Device searches with a Device linked to a Patient (Lookup mode),
//! Observation searches with an empty Bundle, and PUTs with the body and an ETag, and counts
//! every request. The pipeline runs in its own
//! process (the release `iomt` binary), so its peak RSS is its own. Templates are the heart
//! rate sample (hourly SampledData, periodInterval 60); `--max-wait 1s`.

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use iomt_bench_fixtures::{Counts, blackhole};
use iomt_files::capture::{Record, read_jsonl};
use iomt_normalize::Normalizer;
use iomt_templates::device::DeviceMapping;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes the shared workload (`iomt_bench_fixtures::generate`) as a JSON Lines capture, once.
fn generate(path: &Path, events: usize, devices: usize) {
    if path.exists() {
        return;
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_extension("tmp");
    let mut out = BufWriter::new(std::fs::File::create(&tmp).unwrap());
    for (i, e) in iomt_bench_fixtures::generate(events, devices)
        .iter()
        .enumerate()
    {
        writeln!(
            out,
            r#"{{"Body":{},"SystemProperties":{{"x-opt-enqueued-time":"{}","x-opt-sequence-number":{}}}}}"#,
            e.body,
            e.time,
            i + 1
        )
        .unwrap();
    }
    out.flush().unwrap();
    drop(out);
    std::fs::rename(tmp, path).unwrap();
}

/// Events/s of normalization alone, single-threaded, over the same file (reading and JSON
/// parsing included, as in the pipeline).
fn normalize_only(path: &Path, mapping: &Path) -> (usize, f64) {
    let normalizer =
        Normalizer::new(DeviceMapping::parse(&std::fs::read_to_string(mapping).unwrap()).unwrap());
    let started = Instant::now();
    let reader = BufReader::with_capacity(1 << 20, std::fs::File::open(path).unwrap());
    let mut n = 0;
    let mut measurements = 0;
    for record in read_jsonl(reader, "bench", iomt_files::capture::MAX_LINE_BYTES) {
        if let Ok(Record::Event(e)) = record {
            measurements += normalizer.normalize_event(&e.event).measurements.len();
            n += 1;
        }
    }
    assert_eq!(measurements, n, "every event yields one measurement");
    (n, n as f64 / started.elapsed().as_secs_f64())
}

/// One `iomt replay` of the workload; `sink` adds the output arguments. Returns the JSON summary
/// and the process's wall time.
fn replay(data: &Path, mappings: (&Path, &Path), sink: &[&str]) -> (serde_json::Value, f64) {
    let state = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_iomt"))
        .args(["replay", "--no-progress", "--restart", "--summary", "json"])
        .arg(data)
        .arg("--device-mapping")
        .arg(mappings.0)
        .arg("--fhir-mapping")
        .arg(mappings.1)
        .args(["--max-wait", "1s", "--state-dir"])
        .arg(state.path())
        .args(sink)
        .current_dir(state.path())
        .output()
        .unwrap();
    let wall = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "replay failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (serde_json::from_str(&stdout).unwrap(), wall)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and wants a quick
    // check.
    let quick = !std::env::args().any(|a| a == "--bench");
    let events = env_usize("IOMT_BENCH_EVENTS", if quick { 20_000 } else { 1_000_000 });
    let devices = env_usize("IOMT_BENCH_DEVICES", 1000);
    let root = repo();
    let data = root.join(format!(
        "target/bench-data/heartrate-{events}-{devices}.jsonl"
    ));
    generate(&data, events, devices);
    let device_mapping = root.join("mappings/heartrate/devicecontent.json");
    let fhir_mapping = root.join("mappings/heartrate/fhirmapping.json");

    let (n, normalize_rate) = normalize_only(&data, &device_mapping);
    assert_eq!(n, events);

    let counts = Arc::new(Counts::default());
    let url = blackhole(counts.clone());
    let mappings = (device_mapping.as_path(), fhir_mapping.as_path());
    let (blackhole_run, blackhole_wall) = replay(
        &data,
        mappings,
        &["--identity-mode", "lookup", "--fhir-url", &url],
    );
    // The embedded default: the SQLite store, Create-mode identities, NDJSON exported at the end.
    let (embedded_run, embedded_wall) = replay(&data, mappings, &["--out", "store"]);
    // The same with one change event subscription (CloudEvents into a file), for the cost of
    // events and their write-to-delivery latency.
    let subscribed = tempfile::tempdir().unwrap();
    let config = subscribed.path().join("events.toml");
    std::fs::write(
        &config,
        format!(
            "[[subscriptions]]\nname = \"bench\"\ndestination = {{ kind = \"ndjson\", path = \"{}\" }}\n",
            subscribed.path().join("events.ndjson").display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let (events_run, events_wall) =
        replay(&data, mappings, &["--out", "store", "--config", &config]);
    // The CPU cost of events is a few percent, under the noise of one run on a shared machine:
    // both runs are repeated, alternating, and their medians compared.
    let mut plain_cpu = vec![embedded_run["cpuSeconds"].as_f64().unwrap_or(f64::NAN)];
    let mut events_cpu = vec![events_run["cpuSeconds"].as_f64().unwrap_or(f64::NAN)];
    for _ in 0..if quick { 0 } else { 2 } {
        let (plain, _) = replay(&data, mappings, &["--out", "store"]);
        plain_cpu.push(plain["cpuSeconds"].as_f64().unwrap_or(f64::NAN));
        let (with_events, _) = replay(&data, mappings, &["--out", "store", "--config", &config]);
        events_cpu.push(with_events["cpuSeconds"].as_f64().unwrap_or(f64::NAN));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "pipeline: iomt replay, {events} events, {devices} devices, heartrate periodInterval 60, --max-wait 1s"
    );
    println!(
        "  normalize only  {normalize_rate:>12.0} events/s  (one thread, same events, same run)"
    );
    for (name, run, wall) in [
        ("blackhole FHIR", &blackhole_run, blackhole_wall),
        ("embedded store", &embedded_run, embedded_wall),
        ("embedded, 1 subscription", &events_run, events_wall),
    ] {
        let rate = run["eventsPerSecond"].as_f64().unwrap_or(0.0);
        println!("  {name}");
        println!("    replay        {rate:>12.0} events/s  (process wall time {wall:.2} s)");
        println!("    ratio         {:>12.2}", rate / normalize_rate);
        println!("    p99 read→write{:>12} ms", run["latencyMs"]["p99"]);
        println!("    peak RSS      {:>12} MB", run["peakRssMb"]);
        println!("    CPU           {:>12} s", run["cpuSeconds"]);
        println!(
            "    written       {} measurements in {} groups; resources {}",
            run["writtenMeasurements"], run["groups"], run["resources"]
        );
    }
    let change = &events_run["changeEvents"];
    println!(
        "  change events   {} delivered, write→delivery p50 {} ms, p99 {} ms, max {} ms",
        change["delivered"],
        change["latencyMs"]["p50"],
        change["latencyMs"]["p99"],
        change["latencyMs"]["max"],
    );
    println!(
        "                  CPU without events {plain_cpu:?} s, with one subscription {events_cpu:?} s"
    );
    let events_cost = median(&mut events_cpu) / median(&mut plain_cpu) - 1.0;
    println!(
        "                  median CPU {:+.1} % with one subscription",
        100.0 * events_cost
    );
    println!(
        "  blackhole       {} PUTs ({} MB), {} Observation searches, {} Device searches",
        counts.puts.load(Ordering::Relaxed),
        counts.put_bytes.load(Ordering::Relaxed) / 1_000_000,
        counts.observation_searches.load(Ordering::Relaxed),
        counts.device_searches.load(Ordering::Relaxed)
    );
    if !quick {
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let rate = |run: &serde_json::Value| run["eventsPerSecond"].as_f64().unwrap_or(0.0);
        let rss = |run: &serde_json::Value| run["peakRssMb"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  targets         blackhole ≥0.85× normalize: {}; embedded ≥150,000 events/s: {}; embedded RSS ≤150 MB: {}",
            verdict(rate(&blackhole_run) >= 0.85 * normalize_rate),
            verdict(rate(&embedded_run) >= 150_000.0),
            verdict(rss(&embedded_run) <= 150.0)
        );
        let p99 = change["latencyMs"]["p99"].as_f64().unwrap_or(f64::INFINITY);
        println!(
            "                  events ≤10 % CPU: {}; write→delivery p99 <250 ms: {}",
            verdict(events_cost <= 0.10),
            verdict(p99 < 250.0)
        );
    }
}
