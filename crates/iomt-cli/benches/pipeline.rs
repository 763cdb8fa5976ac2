//! End-to-end pipeline benchmark: `iomt replay` of a generated capture into a local blackhole
//! FHIR server, against normalize-only throughput of the same events in the same run.
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
use iomt_hub::capture::{Record, read_jsonl};
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
    for record in read_jsonl(reader, "bench", iomt_hub::capture::MAX_LINE_BYTES) {
        if let Ok(Record::Event(e)) = record {
            measurements += normalizer.normalize_event(&e.event).measurements.len();
            n += 1;
        }
    }
    assert_eq!(measurements, n, "every event yields one measurement");
    (n, n as f64 / started.elapsed().as_secs_f64())
}

fn field<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(prefix))
        .map(str::trim)
}

fn number_after(text: &str, marker: &str) -> Option<f64> {
    let at = text.find(marker)? + marker.len();
    let digits: String = text[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '.')
        .filter(|c| *c != ',')
        .collect();
    digits.parse().ok()
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
    let state = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_iomt"))
        .args([
            "replay",
            "--no-progress",
            "--restart",
            "--identity-mode",
            "lookup",
        ])
        .arg(&data)
        .arg("--device-mapping")
        .arg(&device_mapping)
        .arg("--fhir-mapping")
        .arg(&fhir_mapping)
        .args(["--fhir-url", &url, "--max-wait", "1s", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    let wall = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "replay failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rate = number_after(&stdout, "s (").unwrap_or(0.0);
    let p99 = number_after(&stdout, "p99").unwrap_or(f64::NAN);
    let rss = number_after(&stdout, "peak RSS").unwrap_or(f64::NAN);
    let written = field(&stdout, "measurements").unwrap_or("?");
    println!(
        "pipeline: iomt replay, {events} events, {devices} devices, heartrate periodInterval 60, --max-wait 1s, blackhole FHIR sink"
    );
    println!("  replay          {rate:>12.0} events/s  (process wall time {wall:.2} s)");
    println!(
        "  normalize only  {normalize_rate:>12.0} events/s  (one thread, same events, same run)"
    );
    println!("  ratio           {:>12.2}", rate / normalize_rate);
    println!("  p99 read→write  {p99:>12.0} ms");
    println!("  peak RSS        {rss:>12.0} MB");
    println!("  measurements    {written}");
    println!(
        "  blackhole       {} PUTs ({} MB), {} Observation searches, {} Device searches",
        counts.puts.load(Ordering::Relaxed),
        counts.put_bytes.load(Ordering::Relaxed) / 1_000_000,
        counts.observation_searches.load(Ordering::Relaxed),
        counts.device_searches.load(Ordering::Relaxed)
    );
    if !quick {
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        println!(
            "  targets         ≥100,000 events/s: {}; RSS ≤300 MB: {}; p99 ≤2 s: {}",
            verdict(rate >= 100_000.0),
            verdict(rss <= 300.0),
            verdict(p99 <= 2000.0)
        );
    }
}
